use std::path::Path;

use super::ArchiveError;
use crate::repo::{ClusterIdentity, PutOutcome, Repository, WriteOptions};
use crate::storage::Storage;
use crate::wal::{major_from_magic, validate_segment, WalFileName};

/// What `archive_push` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Stored {
        bytes: u64,
    },
    /// The same bytes were archived before (PostgreSQL retried after a crash or a timeout).
    AlreadyArchived,
}

/// Archives the file at `path` (the `%p` of `archive_command`).
///
/// WAL segments and `.partial` files are checked before anything is written: their first page
/// must carry a long header for that very segment, of the declared size, from the cluster the
/// repository belongs to. History and `.backup` files carry no cluster identity and are stored
/// once the repository exists. Returns only once the object is durable.
pub async fn archive_push(
    storage: Storage,
    path: &Path,
    write: WriteOptions,
) -> Result<PushOutcome, ArchiveError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let name = WalFileName::parse(file_name)?;
    let content = tokio::fs::read(path)
        .await
        .map_err(|source| ArchiveError::ReadInput {
            path: path.to_path_buf(),
            source,
        })?;
    if content.is_empty() {
        return Err(ArchiveError::Empty {
            path: path.to_path_buf(),
        });
    }

    let repo = if name.holds_wal_pages() {
        let tli = name.timeline();
        // The segment number depends on the segment size, which the header declares; a wrong
        // declaration fails the address check below.
        let header =
            crate::wal::parse_long_header(&content).map_err(|source| ArchiveError::NotWal {
                path: path.to_path_buf(),
                source,
            })?;
        let seg_size = header.seg_size as u64;
        let segno = name
            .segno(seg_size)
            .expect("segment names have a segment number");
        let is_partial = matches!(name, WalFileName::Partial { .. });
        // A .partial file is a full-size segment whose tail was never written; check the header
        // but not the length (pg_receivewal-style partials may be shorter).
        let checked = if is_partial {
            Ok(header)
        } else {
            validate_segment(&content, tli, segno)
        };
        let header = checked.map_err(|source| ArchiveError::NotWal {
            path: path.to_path_buf(),
            source,
        })?;
        let cluster = ClusterIdentity {
            system_identifier: header.system_identifier,
            pg_major: major_from_magic(header.magic).expect("validated magic"),
            wal_segment_size: seg_size,
        };
        Repository::open_for_cluster(storage, &cluster, &format!("WAL file {name}"), write).await?
    } else {
        match Repository::open(storage, write).await {
            Ok(r) => r,
            Err(crate::repo::RepoError::NotInitialized { .. }) => {
                return Err(ArchiveError::NeedsDescriptor {
                    name: name.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        }
    };

    let outcome = repo.store_wal_file(&name, &content).await?;
    Ok(match outcome {
        PutOutcome::Stored => {
            tracing::info!(file = %name, bytes = content.len(), repo = %repo.location(), "archived");
            PushOutcome::Stored {
                bytes: content.len() as u64,
            }
        }
        PutOutcome::AlreadyStored => {
            tracing::info!(file = %name, "already archived with identical content");
            PushOutcome::AlreadyArchived
        }
    })
}

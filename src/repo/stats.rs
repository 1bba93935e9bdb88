//! What operations code asks of a repository without knowing its layout: how many bytes each
//! kind of data takes, and whether the location is writable at all (`pitr check`).

use bytes::Bytes;
use rand::Rng;

use super::scan::classify;
use super::{descriptor, Descriptor, ObjectKind, RepoError, Repository, Result};
use crate::codec::{self, Codec};
use crate::storage::{Storage, StorageError};

/// Folder of the short-lived objects `pitr check` writes to prove the location is writable.
/// Nothing else ever lives there; a probe left by a killed check is harmless garbage.
const PROBE_PREFIX: &str = "probe/";

/// Stored bytes by kind of data (compressed sizes, as billed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RepositoryUsage {
    /// WAL files, their summaries and streamed chunks.
    pub wal: u64,
    /// Backup catalog entries, parts, manifests and their bookkeeping objects.
    pub backups: u64,
}

impl Repository {
    /// Bytes stored per kind of data (one LIST of the whole repository).
    pub async fn usage(&self) -> Result<RepositoryUsage> {
        let mut usage = RepositoryUsage::default();
        for o in self.storage.list("").await? {
            match classify(&o.key) {
                ObjectKind::Wal(_) | ObjectKind::Summary(_) | ObjectKind::Chunk(_) => {
                    usage.wal += o.size
                }
                ObjectKind::Catalog { .. } | ObjectKind::BackupData { .. } => {
                    usage.backups += o.size
                }
                ObjectKind::Descriptor | ObjectKind::Unknown => {}
            }
        }
        Ok(usage)
    }
}

/// Proves `storage` is reachable and writable: writes a probe object, reads it back through its
/// checksums, and removes it. Returns the descriptor when the repository exists (`None`: a
/// location no pitr has written to yet). Works before a repository is created.
pub async fn probe(storage: &Storage) -> Result<Option<Descriptor>> {
    let key = format!(
        "{PROBE_PREFIX}{}-{:016x}",
        std::process::id(),
        rand::thread_rng().gen::<u64>()
    );
    let content = format!("pitr check probe {key}");
    let framed = codec::encode(content.as_bytes(), Codec::None, 0);
    storage.put_if_absent(&key, Bytes::from(framed)).await?;
    let read = storage.get(&key).await;
    let deleted = storage.delete(&key).await;
    let decoded = codec::decode(&read?).map_err(|source| RepoError::Corrupt {
        key: key.clone(),
        source,
    })?;
    deleted?;
    if decoded != content.as_bytes() {
        return Err(RepoError::Storage(StorageError::Permanent {
            op: "GET",
            key,
            message: "the probe object read back differs from what was written".into(),
        }));
    }
    descriptor::read(storage).await
}

use std::path::Path;

use super::pgdata::DataDir;
use super::prefetch::{location_id, Prefetch, Spool};
use super::{ArchiveError, Target};
use crate::repo::{RecoveryWal, RepoError, Repository, WriteOptions, WriteWalError};
use crate::storage::Storage;
use crate::wal::WalFileName;

/// What `archive_get` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetOutcome {
    Restored {
        bytes: u64,
    },
    /// The repository does not have this file: PostgreSQL's end of archive.
    NotFound,
}

/// Fetches `name` (the `%f` of `restore_command`) into `dest` (`%p`).
///
/// The file is verified against its checksum, then written to a temporary name beside `dest`
/// and renamed, so PostgreSQL never sees a partial file and no file is left behind on failure.
/// Storage errors are retried by `storage` for its configured time, then returned: the caller
/// must not report them as "not found".
///
/// With `prefetch`, a segment PostgreSQL's startup process asks for is first looked up in the
/// prefetch spool (see `prefetch`); a miss takes exactly the path above. After a segment is
/// served a background worker is started, if none runs, to fetch the next ones.
pub async fn archive_get(
    storage: Storage,
    name: &str,
    dest: &Path,
    prefetch: Option<&Prefetch>,
    options: WriteOptions,
) -> Result<GetOutcome, ArchiveError> {
    let source = Target {
        // Named only in messages about several repositories.
        name: "default".into(),
        storage,
        write: options,
        optional: false,
    };
    archive_get_from(&[source], name, dest, prefetch).await
}

/// [`archive_get`] from several repositories: the first that answers and has the file serves
/// it. A repository that fails (unreachable, vanished, corrupt object) is skipped only when
/// another one has the file; when none has it and one failed, the failure is returned, never
/// "not found" (docs/repositories.md). The prefetch spool follows the first repository only:
/// a miss takes the path above.
pub async fn archive_get_from(
    sources: &[Target],
    name: &str,
    dest: &Path,
    prefetch: Option<&Prefetch>,
) -> Result<GetOutcome, ArchiveError> {
    let name = WalFileName::parse(name)?;
    let spool = prefetch
        .filter(|p| p.ahead > 0)
        .and_then(|p| Some((Spool::engage(&name, dest)?, p)));
    if let (Some((spool, prefetch)), Some(first)) = (&spool, sources.first()) {
        let location = location_id(first.storage.location());
        if let Some(bytes) = spool.take_or_wait(&name, &location, dest).await {
            tracing::info!(file = %name, bytes, "restored from the prefetch spool");
            spool.after_serving(&name, prefetch);
            return Ok(GetOutcome::Restored { bytes });
        }
    }
    let Some(wal) = fetch_first(sources, &name).await? else {
        tracing::info!(file = %name, "not in the repository");
        return Ok(GetOutcome::NotFound);
    };
    let dest = dest.to_path_buf();
    let len = tokio::task::spawn_blocking(move || write_atomically(&dest, &wal))
        .await
        .expect("write task panicked")?;
    tracing::info!(file = %name, bytes = len, "restored");
    if let Some((spool, prefetch)) = &spool {
        spool.after_serving(&name, prefetch);
    }
    Ok(GetOutcome::Restored { bytes: len })
}

/// The content of `name` from the first repository that answers and has it; `None` only when
/// every repository answered that it does not.
async fn fetch_first(
    sources: &[Target],
    name: &WalFileName,
) -> Result<Option<RecoveryWal>, ArchiveError> {
    let several = sources.len() > 1;
    let mut failure = None;
    for source in sources {
        match fetch_one(source, name).await {
            Ok(Some(content)) => {
                if failure.is_some() {
                    tracing::info!(file = %name, repository = %source.name, "restored from this repository instead");
                }
                return Ok(Some(content));
            }
            Ok(None) if several => {
                tracing::info!(file = %name, repository = %source.name, "not in this repository");
            }
            Ok(None) => {}
            Err(e) => {
                let e = e.in_repository(&source.name, several);
                if several {
                    tracing::warn!(file = %name, error = %e, "cannot read from this repository; the others are asked");
                }
                failure.get_or_insert(e);
            }
        }
    }
    failure.map_or(Ok(None), Err)
}

/// `name` from one repository. Opening reads the descriptor, which proves the repository is
/// really there: a wrong URL or a vanished mount must fail recovery loudly, not look like the
/// end of the archive. With the key source: an encrypted repository is unlocked here, or
/// refused (fatal). The newest segment may exist only as chunks shipped by `pitr stream`.
/// A damaged object is found here (its payload checksum), so that another repository serves.
async fn fetch_one(
    source: &Target,
    name: &WalFileName,
) -> Result<Option<RecoveryWal>, ArchiveError> {
    let repo = open_for_recovery(source.storage.clone(), source.write.clone()).await?;
    let found = repo.wal_for_recovery_streamed(name).await?;
    if let Some(wal) = &found {
        wal.check()?;
    }
    Ok(found)
}

/// Opens the repository, and when run in a data directory (as PostgreSQL runs
/// `restore_command`) checks it is this cluster's, and the very one the data directory's marker
/// records for this location: a repository that vanished, or was created again after it did,
/// must not answer "not found" for WAL archived before. A location the marker does not name yet
/// is recorded there.
async fn open_for_recovery(
    storage: Storage,
    write: WriteOptions,
) -> Result<Repository, ArchiveError> {
    let Some(dir) = DataDir::working() else {
        return Ok(Repository::open(storage, write).await?);
    };
    let cluster = match dir.identity() {
        Ok(c) => c,
        Err(e) => {
            // pg_control is what PostgreSQL itself checks; not knowing it must not stop recovery.
            tracing::warn!(error = %e, "cannot read the cluster's identity; the repository is not checked against it");
            return Ok(Repository::open(storage, write).await?);
        }
    };
    let location = location_id(storage.location());
    let recorded = dir.archived_into(&location, cluster.system_identifier)?;
    let what = format!("data directory {}", dir.path().display());
    match Repository::open_existing_for_cluster(storage, &cluster, &what, write).await {
        Ok(repo) => {
            match &recorded {
                Some(a) => dir.check_same(repo.descriptor(), &location, a)?,
                // Recorded from the first file restored, so that a cluster restored from a
                // backup taken before its source ever archived is protected too.
                None => {
                    let d = repo.descriptor();
                    if let Err(e) = dir.record_archived(
                        &location,
                        d.repository_id.as_deref(),
                        d.system_identifier,
                    ) {
                        tracing::warn!(error = %e, "cannot record the repository in the data directory");
                    }
                }
            }
            Ok(repo)
        }
        Err(RepoError::NotInitialized { .. }) if recorded.is_some() => {
            Err(dir.vanished(&location, recorded.as_ref().expect("checked")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `wal` to a temporary name beside `dest`, decoding and checking it as it goes, and
/// renames it into place only once all of it is written and its checksum matched; its length.
fn write_atomically(dest: &Path, wal: &RecoveryWal) -> Result<u64, ArchiveError> {
    let err = |source| ArchiveError::WriteOutput {
        path: dest.to_path_buf(),
        source,
    };
    let file_name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
    let tmp = dest.with_file_name(format!(".{file_name}.pitr-tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(WriteWalError::Write)?;
        // Pieces are 256 KiB (lz4-blocks): written as they come, no buffering needed.
        let len = wal.write_to(&mut f)?;
        // PostgreSQL fsyncs restored segments itself when it keeps them; no fsync needed here.
        std::fs::rename(&tmp, dest).map_err(WriteWalError::Write)?;
        Ok(len)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        match e {
            WriteWalError::Repo(e) => ArchiveError::Repo(e),
            WriteWalError::Write(e) => err(e),
        }
    })
}

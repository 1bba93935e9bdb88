//! A vanished repository is not recreated by `pitr stream` either: the stream reads and writes
//! the same `pitr.repository` marker as the archive hooks, in the server's data directory, when
//! it can reach that directory (same host, same OS user as the server). docs/streaming.md and
//! docs/exit-codes.md give the rules.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::StreamError;
use crate::pg::ReplicationConn;
use crate::repo::marker::{is_recorded_one, location_key, Archived, MarkerFile, MARKER_FILE};
use crate::repo::{ClusterIdentity, RepoError, Repository, WriteOptions};
use crate::storage::Storage;

/// Opens the repository for the cluster, creating it only where the marker does not say that
/// this cluster stored WAL there before, and refusing one that replaced the recorded one.
/// `true` with it when this call created it: then it holds no WAL yet.
pub(super) async fn open_repository(
    conn: &mut ReplicationConn,
    storage: Storage,
    cluster: &ClusterIdentity,
    write: WriteOptions,
) -> Result<(Repository, bool), StreamError> {
    let marker = server_marker(conn, cluster.system_identifier).await;
    let location = location_key(storage.location());
    let bad = |m: &MarkerFile, e: &dyn std::fmt::Display| StreamError::BadMarker {
        path: m.path().to_path_buf(),
        message: e.to_string(),
    };
    let recorded = match &marker {
        Some(m) => m
            .archived_into(&location, cluster.system_identifier)
            .map_err(|e| bad(m, &e))?,
        None => None,
    };
    let opened =
        Repository::open_existing_for_cluster(storage.clone(), cluster, "stream", write.clone())
            .await;
    let (repo, created) = match (opened, recorded, &marker) {
        (Ok(repo), Some(a), Some(m)) if !is_recorded_one(repo.descriptor(), &a) => {
            return Err(replaced(repo.descriptor().repository_id.clone(), a, m))
        }
        (Ok(repo), _, _) => (repo, false),
        (Err(RepoError::NotInitialized { .. }), Some(a), Some(m)) => {
            return Err(StreamError::Vanished {
                location: a.location,
                id: a.repository_id.unwrap_or_else(|| "(none)".into()),
                marker: m.path().to_path_buf(),
            })
        }
        // `open` found no descriptor and a reachable location: create without asking again.
        (Err(RepoError::NotInitialized { .. }), _, _) => {
            Repository::create_for_cluster(storage, cluster, "stream", write).await?
        }
        (Err(e), _, _) => return Err(e.into()),
    };
    if let Some(m) = &marker {
        let d = repo.descriptor();
        // A marker that cannot be written costs the vanished-repository check, not streaming.
        if let Err(e) = m.record(&location, d.repository_id.as_deref(), d.system_identifier) {
            tracing::warn!(marker = %m.path().display(), error = %e, "cannot record the repository in the data directory");
        }
    }
    Ok((repo, created))
}

fn replaced(found: Option<String>, a: Archived, m: &MarkerFile) -> StreamError {
    StreamError::Replaced {
        location: a.location,
        found: found.unwrap_or_else(|| "(none)".into()),
        recorded: a.repository_id.unwrap_or_else(|| "(none)".into()),
        marker: m.path().to_path_buf(),
    }
}

/// The marker in the server's data directory, when this process can use it: the server tells
/// where its data directory is (superuser or pg_read_all_settings), the directory is on this
/// host (its pg_control has the server's system identifier) and belongs to this OS user, or
/// this process is root (which gives the marker the directory's owner: a marker the server's
/// user cannot read would stop its hooks).
async fn server_marker(conn: &mut ReplicationConn, system_identifier: u64) -> Option<MarkerFile> {
    let dir = match conn.show("data_directory").await {
        Ok(d) => PathBuf::from(d),
        Err(e) => {
            tracing::debug!(error = %e, "the server does not show its data directory: no pitr.repository marker");
            return None;
        }
    };
    let Some((uid, gid)) = own_data_dir(&dir, system_identifier) else {
        tracing::debug!(data_directory = %dir.display(), "the server's data directory is not this host's or not this user's: no pitr.repository marker");
        return None;
    };
    let marker = MarkerFile::new(dir.join(MARKER_FILE));
    Some(if rustix::process::geteuid().is_root() {
        marker.owned_by(uid, gid)
    } else {
        marker
    })
}

/// The owner of `dir` when it is the server's data directory on this host and this process
/// is its owner or root.
fn own_data_dir(dir: &Path, system_identifier: u64) -> Option<(u32, u32)> {
    let meta = std::fs::metadata(dir).ok()?;
    let euid = rustix::process::geteuid();
    if meta.uid() != euid.as_raw() && !euid.is_root() {
        return None;
    }
    let control = std::fs::read(dir.join("global/pg_control")).ok()?;
    let same = control.len() >= 8
        && u64::from_ne_bytes(control[..8].try_into().expect("8 bytes")) == system_identifier;
    same.then_some((meta.uid(), meta.gid()))
}

//! Interrupted backups: how a running backup keeps its claim, and how a later one removes the
//! parts of a backup that will never complete.
//!
//! A running backup rewrites `backups/<id>/lease` every [`LEASE_REFRESH`]. A backup whose
//! catalog entry is missing and whose lease is older than the threshold is abandoned: a cleanup
//! creates `backups/<id>/state` = `aborted` (put-if-absent) and, only if that succeeded or the
//! state already said so, deletes the parts. A backup that finishes creates the same object as
//! `complete` before publishing its catalog entry, so a backup that was merely slow (a paused
//! process, a long network stall) and a cleanup can never both win: either the backup publishes
//! and keeps its parts, or it fails and its parts go.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::repo::{layout, RepoError, Repository};

pub const LEASE_REFRESH: Duration = Duration::from_secs(60);
pub const DEFAULT_ABANDONED_AFTER: Duration = Duration::from_secs(15 * 60);

const COMPLETE: &[u8] = b"complete";
const ABORTED: &[u8] = b"aborted";

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    backup_id: String,
    pid: u32,
    updated_at: DateTime<Utc>,
}

async fn write_lease(repo: &Repository, id: &str) -> Result<(), RepoError> {
    let lease = Lease {
        backup_id: id.to_string(),
        pid: std::process::id(),
        updated_at: Utc::now(),
    };
    let json = serde_json::to_vec(&lease).expect("lease serializes");
    repo.put_mutable(&layout::backup_lease_key(id), &json).await
}

/// Writes the lease now and keeps refreshing it until the returned handle is aborted.
pub(super) async fn hold_lease(repo: &Repository, id: &str) -> Result<JoinHandle<()>, RepoError> {
    write_lease(repo, id).await?;
    let (repo, id) = (repo.clone(), id.to_string());
    Ok(tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEASE_REFRESH).await;
            if let Err(e) = write_lease(&repo, &id).await {
                tracing::warn!(backup = %id, error = %e, "could not refresh the backup lease");
            }
        }
    }))
}

/// Claims completion for backup `id`. Fails if a cleanup declared the backup abandoned first.
pub(super) async fn claim_completion(repo: &Repository, id: &str) -> Result<bool, RepoError> {
    let key = layout::backup_state_key(id);
    match repo
        .put_immutable(&key, &format!("state of backup {id}"), COMPLETE)
        .await
    {
        Ok(_) => Ok(true),
        Err(RepoError::ConflictingContent { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether backup `id`, which has no catalog entry, may still publish one: it completed a moment
/// ago (state `complete`, catalog entry about to be written) or holds a lease younger than
/// `abandoned_after`. Its start LSN is not known until it publishes.
pub(super) async fn may_still_publish(
    repo: &Repository,
    id: &str,
    abandoned_after: Duration,
) -> Result<bool, RepoError> {
    Ok(
        match repo
            .get_optional(&layout::backup_state_key(id))
            .await?
            .as_deref()
        {
            Some(ABORTED) => false,
            Some(_) => true,
            None => lease_age(repo, id)
                .await?
                .is_some_and(|age| age < abandoned_after),
        },
    )
}

/// How long ago backup `id` last refreshed its lease; `None` when it has no readable lease.
async fn lease_age(repo: &Repository, id: &str) -> Result<Option<Duration>, RepoError> {
    Ok(
        match repo.get_optional(&layout::backup_lease_key(id)).await? {
            Some(raw) => serde_json::from_slice::<Lease>(&raw)
                .ok()
                .map(|l| (Utc::now() - l.updated_at).to_std().unwrap_or_default()),
            None => None,
        },
    )
}

/// Removes the data of backups that never completed and whose lease is older than
/// `abandoned_after`. Returns the ids removed.
pub async fn remove_abandoned(
    repo: &Repository,
    abandoned_after: Duration,
) -> Result<Vec<String>, RepoError> {
    let mut removed = vec![];
    let ids = repo
        .storage()
        .list_folders(layout::BACKUP_DATA_PREFIX)
        .await?;
    for id in ids {
        if repo.exists(&layout::backup_info_key(&id)).await? {
            continue;
        }
        // A backup with no readable lease cannot prove it is alive.
        if lease_age(repo, &id)
            .await?
            .is_some_and(|age| age < abandoned_after)
        {
            continue;
        }
        let state_key = layout::backup_state_key(&id);
        // The mirror of `claim_completion`: whoever creates the state first decides it.
        let aborted = match repo
            .put_immutable(&state_key, &format!("state of backup {id}"), ABORTED)
            .await
        {
            Ok(_) => true,
            Err(RepoError::ConflictingContent { .. }) => false,
            Err(e) => return Err(e),
        };
        if !aborted {
            // It completed after all; its catalog entry is about to appear.
            continue;
        }
        let prefix = format!("{}{id}/", layout::BACKUP_DATA_PREFIX);
        let objects = repo.storage().list(&prefix).await?;
        // The aborted state stays, so that a backup process that wakes up later cannot claim
        // completion over deleted parts.
        for obj in objects.iter().filter(|o| o.key != state_key) {
            repo.storage().delete(&obj.key).await?;
        }
        tracing::info!(backup = %id, objects = objects.len().saturating_sub(1), "removed an abandoned backup");
        removed.push(id);
    }
    Ok(removed)
}

//! `pitr expire`: retention of backups and of the WAL only they need.
//!
//! A policy keeps a suffix of the backups in time order: everything from the Nth newest full
//! backup on (`full`: N full backups with the incrementals that build on them), or every backup
//! needed to restore to any moment of the last D (`window`: the backups that finished inside it
//! plus the newest one before it), or the union of both. The newest backup is always kept, and
//! so is every backup a kept incremental needs: its parent, its parent's parent, ... down to the
//! full backup at the root of its chain. An incremental is only ever removed with (or after) its
//! full backup, never alone: the suffix starts at or before the root of every kept chain.
//!
//! WAL is removed only below the start of the oldest kept backup: replay only ever moves forward
//! from a backup's start, whatever the timeline, so nothing below that point can be read by a
//! restore of a kept backup. Timeline history files are always kept. While another backup is
//! running, its start is unknown, so no WAL is removed in that run.
//!
//! Removal is ordered so that an interruption never leaves something half there that `list` or
//! `restore` would use: a backup gets an `expired` marker first, then loses its catalog entry
//! (from then on it is invisible), then its data, then the marker. The next run finishes any
//! backup that still has a marker. WAL goes oldest first, after the backups.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Classify, Code};
use crate::recovery::{is_full, parent_of};
use crate::repo::{BackupInfo, RepoError, Repository, StoredObject};
use crate::wal::Lsn;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep the newest N full backups, with the incrementals built on them.
    pub full: Option<usize>,
    /// Keep what restoring to any moment of this long ago until now needs.
    pub window: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExpireError {
    #[error(
        "no retention policy given: pass --retain-full N and/or --retain-window DURATION, or set \
         [retention] full / window in the config file"
    )]
    NoPolicy,
    #[error("--retain-full must be at least 1: the newest backup is always kept")]
    ZeroFull,
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl Classify for ExpireError {
    fn code(&self) -> Code {
        match self {
            ExpireError::Repo(e) => e.code(),
            ExpireError::NoPolicy | ExpireError::ZeroFull => Code::Usage,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            ExpireError::Repo(e) => e.hint(),
            ExpireError::NoPolicy | ExpireError::ZeroFull => {
                Some("example: pitr expire --retain-full 2 --retain-window 7d --dry-run".into())
            }
        }
    }
}

/// One backup in the report.
#[derive(Clone, Debug, Serialize)]
pub struct BackupSummary {
    pub id: String,
    /// The backup an incremental was taken on; `None` for a full backup.
    pub parent: Option<String>,
    pub stop_time: DateTime<Utc>,
    pub stored_bytes: u64,
}

impl From<&BackupInfo> for BackupSummary {
    fn from(b: &BackupInfo) -> Self {
        BackupSummary {
            id: b.id.clone(),
            parent: parent_of(b).map(str::to_string),
            stop_time: b.stop_time,
            stored_bytes: b.stored_bytes(),
        }
    }
}

/// What an expire run removed (or, with `dry_run`, would remove).
#[derive(Clone, Debug, Serialize)]
pub struct ExpireReport {
    pub dry_run: bool,
    pub kept: Vec<BackupSummary>,
    pub expired: Vec<BackupSummary>,
    /// Backups a previous, interrupted run had started to remove, finished now.
    pub finished_from_earlier_run: Vec<String>,
    /// WAL below this position is needed by no kept backup; `None` when no WAL is removed.
    pub wal_kept_from: Option<Lsn>,
    pub wal_objects_removed: usize,
    pub wal_bytes_removed: u64,
    /// Why WAL was left alone, when it was.
    pub wal_note: Option<String>,
}

/// Where each backup sits in its chain, by index into the same (time-ordered) list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chains {
    /// Whether each backup is a full one (backups of older pitr versions all are).
    pub full: Vec<bool>,
    /// Each incremental's parent; `None` for a full, or when the parent is not in the list.
    pub parent: Vec<Option<usize>>,
}

impl Chains {
    pub fn of(backups: &[BackupInfo]) -> Chains {
        let index = |id: &str| backups.iter().position(|b| b.id == id);
        Chains {
            full: backups.iter().map(is_full).collect(),
            parent: backups
                .iter()
                .map(|b| parent_of(b).and_then(index))
                .collect(),
        }
    }

    /// The oldest backup that the chain of backup `i` needs (its root, when complete).
    fn root(&self, mut i: usize) -> usize {
        // Parents are older, so each step goes down and the walk ends.
        while let Some(p) = self.parent[i].filter(|&p| p < i) {
            i = p;
        }
        i
    }
}

/// Which backups `policy` keeps at `now`: indexes into `backups`, which must be in time order
/// (oldest first). Always a non-empty suffix when there are backups.
pub fn backups_to_keep(
    backups: &[BackupInfo],
    policy: RetentionPolicy,
    now: DateTime<Utc>,
) -> std::ops::Range<usize> {
    keep_range(backups, &Chains::of(backups), policy, now)
}

fn keep_range(
    backups: &[BackupInfo],
    chains: &Chains,
    policy: RetentionPolicy,
    now: DateTime<Utc>,
) -> std::ops::Range<usize> {
    let n = backups.len();
    if n == 0 {
        return 0..0;
    }
    let mut first = n - 1;
    if let Some(full) = policy.full {
        // The Nth newest full backup; with fewer fulls than N, everything.
        let fulls: Vec<usize> = (0..n).filter(|&i| chains.full[i]).collect();
        let nth = fulls.len().checked_sub(full.max(1)).map_or(0, |k| fulls[k]);
        first = first.min(nth);
    }
    if let Some(window) = policy.window {
        let since = chrono::Duration::from_std(window)
            .ok()
            .and_then(|w| now.checked_sub_signed(w));
        // The newest backup that finished before the window starts is what reaches its start;
        // when none did (or the window reaches before any time), every backup is needed.
        let reaching = since
            .and_then(|since| backups.iter().rposition(|b| b.stop_time < since))
            .unwrap_or(0);
        first = first.min(reaching);
    }
    // Every kept incremental keeps its whole chain.
    let first = (first..n).map(|i| chains.root(i)).min().unwrap_or(first);
    first..n
}

/// Applies `policy` to the repository. With `dry_run` nothing is written or removed.
pub async fn expire(
    repo: &Repository,
    policy: RetentionPolicy,
    abandoned_after: Duration,
    dry_run: bool,
) -> Result<ExpireReport, ExpireError> {
    if policy.full.is_none() && policy.window.is_none() {
        return Err(ExpireError::NoPolicy);
    }
    if policy.full == Some(0) {
        return Err(ExpireError::ZeroFull);
    }
    let listed = repo.list_backups().await?;
    let Folders {
        unfinished,
        in_progress,
    } = scan_folders(repo, &listed, abandoned_after).await?;
    // A backup an earlier run marked is gone already as far as the policy is concerned.
    let mut backups: Vec<BackupInfo> = listed
        .into_iter()
        .filter(|b| !unfinished.contains(&b.id))
        .collect();
    backups.sort_by(|a, b| (a.stop_time, &a.id).cmp(&(b.stop_time, &b.id)));
    let keep_range = backups_to_keep(&backups, policy, Utc::now());
    let (expired, kept) = backups.split_at(keep_range.start);

    let seg_size = repo.descriptor().wal_segment_size;
    let wal_from = kept.iter().map(|b| b.start_lsn).min();
    let (wal_kept_from, wal_note) = match (wal_from, in_progress.first()) {
        (None, _) => (
            None,
            Some("no backups: all WAL is kept (nothing could restore without it)".to_string()),
        ),
        (Some(_), Some(id)) => (
            None,
            Some(format!(
                "backup {id} is running and its start is not known yet: no WAL removed this \
                 time; run expire again after it finishes"
            )),
        ),
        (Some(lsn), None) => (Some(lsn), None),
    };
    let wal_doomed: Vec<StoredObject> = match wal_kept_from {
        Some(lsn) => repo.wal_objects_below(lsn.segno(seg_size)).await?,
        None => vec![],
    };

    let report = ExpireReport {
        dry_run,
        kept: kept.iter().map(BackupSummary::from).collect(),
        expired: expired.iter().map(BackupSummary::from).collect(),
        finished_from_earlier_run: unfinished.clone(),
        wal_kept_from,
        wal_objects_removed: wal_doomed.len(),
        wal_bytes_removed: wal_doomed.iter().map(|o| o.size).sum(),
        wal_note,
    };
    if dry_run {
        return Ok(report);
    }

    for b in expired {
        repo.mark_expired(&b.id).await?;
        repo.unpublish_backup(&b.id).await?;
        tracing::info!(backup = %b.id, "backup expired; removing its data");
        repo.remove_backup_data(&b.id).await?;
    }
    for id in &unfinished {
        repo.unpublish_backup(id).await?;
        repo.remove_backup_data(id).await?;
        tracing::info!(backup = %id, "finished removing a backup an earlier expire left");
    }
    repo.delete_objects(&wal_doomed).await?;
    if let Some(lsn) = wal_kept_from {
        tracing::info!(objects = wal_doomed.len(), kept_from = %lsn, "removed WAL no kept backup needs");
    }
    Ok(report)
}

/// What the backup data folders say beyond the catalog.
struct Folders {
    /// Backups with an `expired` marker, from a run that stopped part-way (possibly before it
    /// removed the catalog entry).
    unfinished: Vec<String>,
    /// Backups without a catalog entry that may still publish one.
    in_progress: Vec<String>,
}

/// One LIST of the backup data folders, each sorted out by its marker, its catalog entry
/// (`listed`) and, for unpublished ones, its state and lease.
async fn scan_folders(
    repo: &Repository,
    listed: &[BackupInfo],
    abandoned_after: Duration,
) -> Result<Folders, RepoError> {
    let mut out = Folders {
        unfinished: vec![],
        in_progress: vec![],
    };
    for id in repo.backup_folders().await? {
        if repo.is_expiring(&id).await? {
            out.unfinished.push(id);
        } else if !listed.iter().any(|b| b.id == id)
            && repo.backup_may_still_publish(&id, abandoned_after).await?
        {
            out.in_progress.push(id);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(id: &str, stop: DateTime<Utc>) -> BackupInfo {
        BackupInfo {
            start_lsn: Lsn(0),
            stop_lsn: Lsn(0),
            start_time: stop,
            stop_time: stop,
            ..BackupInfo::example(id, 0, None)
        }
    }

    fn days_ago(now: DateTime<Utc>, d: i64) -> DateTime<Utc> {
        now - chrono::Duration::days(d)
    }

    #[test]
    fn policies_keep_a_suffix_and_always_the_newest() {
        let now = Utc::now();
        // Backups 10, 8, 5, 2 and 1 days old.
        let b: Vec<BackupInfo> = [10, 8, 5, 2, 1]
            .iter()
            .enumerate()
            .map(|(i, d)| backup(&format!("b{i}"), days_ago(now, *d)))
            .collect();
        let keep = |full, window_days: Option<u64>| {
            backups_to_keep(
                &b,
                RetentionPolicy {
                    full,
                    window: window_days.map(|d| Duration::from_secs(d * 86400)),
                },
                now,
            )
        };
        assert_eq!(keep(Some(2), None), 3..5);
        assert_eq!(keep(Some(9), None), 0..5);
        assert_eq!(keep(Some(1), None), 4..5);
        // A 3-day window: the backups of the last 3 days (2, 1) plus the one 5 days old, which is
        // what reaches 3 days ago.
        assert_eq!(keep(None, Some(3)), 2..5);
        // A window shorter than the newest backup's age still keeps the newest.
        assert_eq!(keep(None, Some(0)), 4..5);
        // A window older than every backup keeps them all.
        assert_eq!(keep(None, Some(30)), 0..5);
        assert_eq!(keep(None, Some(u64::MAX / 86400)), 0..5);
        // Both: the union, i.e. the longer suffix.
        assert_eq!(keep(Some(4), Some(3)), 1..5);
        assert_eq!(keep(Some(1), Some(3)), 2..5);
        assert_eq!(backups_to_keep(&[], RetentionPolicy::default(), now), 0..0);
    }

    #[test]
    fn full_counts_full_backups_and_chains_stay_whole() {
        let now = Utc::now();
        // F0 I1 I2 F3 I4 I5, one day apart: I1 <- F0, I2 <- I1, I4 <- F3, I5 <- I4.
        let b: Vec<BackupInfo> = (0..6)
            .map(|i| backup(&format!("b{i}"), days_ago(now, 6 - i)))
            .collect();
        let chains = Chains {
            full: vec![true, false, false, true, false, false],
            parent: vec![None, Some(0), Some(1), None, Some(3), Some(4)],
        };
        let keep = |full, window_days: Option<i64>| {
            keep_range(
                &b,
                &chains,
                RetentionPolicy {
                    full,
                    window: window_days.map(|d| Duration::from_secs(d as u64 * 86400)),
                },
                now,
            )
        };
        // One full: F3 and its incrementals; two: everything.
        assert_eq!(keep(Some(1), None), 3..6);
        assert_eq!(keep(Some(2), None), 0..6);
        assert_eq!(keep(Some(5), None), 0..6);
        // A 1-day window reaches I4 (2 days old): its chain goes back to F3.
        assert_eq!(keep(None, Some(1)), 3..6);
        // A 4-day window is reached by I1 (5 days old), whose chain starts at F0.
        assert_eq!(keep(None, Some(4)), 0..6);
        // The same through the catalog fields.
        let mut infos = b.clone();
        for (i, p) in [(1, 0), (2, 1), (4, 3), (5, 4)] {
            infos[i].kind = crate::repo::BackupKind::Incremental;
            infos[i].parent = Some(format!("b{p}"));
        }
        assert_eq!(Chains::of(&infos), chains);
        let policy = RetentionPolicy {
            full: Some(1),
            window: None,
        };
        assert_eq!(backups_to_keep(&infos, policy, now), 3..6);
        // An incremental whose parent is gone keeps what it can.
        let broken = Chains {
            full: vec![true, false, false, true, false, false],
            parent: vec![None, Some(0), Some(1), None, None, Some(4)],
        };
        let r = keep_range(
            &b,
            &broken,
            RetentionPolicy {
                full: None,
                window: Some(Duration::from_secs(86400)),
            },
            now,
        );
        assert_eq!(r, 4..6);
    }
}

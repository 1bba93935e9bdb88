//! Restore planning: pure, no I/O. Given the catalog, the WAL inventory, the timeline histories
//! and a request, decide which backup to use and prove the target is reachable, or say exactly
//! why not and what is recoverable.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::target::{Target, TargetAction, TimelineTarget};
use crate::repo::{BackupInfo, WalInventory};
use crate::wal::{HistoryEntry, Lsn, SegNo, TimelineId, WalFileName};

#[derive(Clone, Debug)]
pub struct RestoreRequest {
    pub target: Target,
    pub action: TargetAction,
    pub timeline: TimelineTarget,
    pub backup_id: Option<String>,
    /// `recovery_target_inclusive` (PostgreSQL's default is true).
    pub inclusive: bool,
    pub standby: bool,
}

/// The decision, printed by `--dry-run` and carried out by the executor.
#[derive(Clone, Debug)]
pub struct RestorePlan {
    pub backup: BackupInfo,
    pub target: Target,
    pub action: TargetAction,
    pub timeline: TimelineTarget,
    pub resolved_timeline: TimelineId,
    pub inclusive: bool,
    pub standby: bool,
    /// First WAL segment replay needs (the one holding the backup's start LSN).
    pub wal_first: WalFileName,
    /// Last WAL segment held contiguously from `wal_first` along the target timeline.
    pub wal_last: WalFileName,
    /// Upper bound of where replay can get to with the WAL held.
    pub recoverable_end: Lsn,
    pub bytes_to_fetch: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("the repository has no completed backup; run `pitr backup` first")]
    NoBackups,
    #[error("no backup with id {id}; `pitr list` shows the backups")]
    BackupNotFound { id: String },
    #[error("target time {target} is in the future (now is {now})")]
    TargetInFuture { target: String, now: String },
    #[error("target {target} is before the end of the oldest usable backup ({oldest}); recoverable window: {window}")]
    BeforeOldestBackup {
        target: String,
        oldest: String,
        window: String,
    },
    #[error("backup {id} ended at {stop}, after target {target}; choose an older backup or a later target")]
    BackupAfterTarget {
        id: String,
        stop: String,
        target: String,
    },
    #[error(
        "target {target} is past the end of the archived WAL ({end}); recoverable window: {window}"
    )]
    PastEnd {
        target: String,
        end: Lsn,
        window: String,
    },
    #[error("backup {id} cannot reach consistency: WAL segment {missing} is missing from the repository")]
    MissingBackupWal { id: String, missing: String },
    #[error("timeline {tli} has no history file in the repository, so its ancestry is unknown")]
    MissingHistory { tli: TimelineId },
    #[error("no backup lies on the history of timeline {tli}")]
    NoBackupOnTimeline { tli: TimelineId },
}

/// Timeline histories: for each timeline, its ancestors (from its `.history` file).
pub type Histories = BTreeMap<TimelineId, Vec<HistoryEntry>>;

/// Where each timeline on the path to `tli` begins, as (timeline, first LSN), oldest first.
fn timeline_path(
    histories: &Histories,
    tli: TimelineId,
) -> Result<Vec<(TimelineId, Lsn)>, PlanError> {
    if tli == 1 {
        return Ok(vec![(1, Lsn(0))]);
    }
    let hist = histories
        .get(&tli)
        .ok_or(PlanError::MissingHistory { tli })?;
    let mut path = vec![];
    let mut begin = Lsn(0);
    for e in hist {
        path.push((e.tli, begin));
        begin = e.switchpoint;
    }
    path.push((tli, begin));
    Ok(path)
}

/// The timeline PostgreSQL reads segment `segno` from: the newest on the path that began at or
/// before the segment's end (a new timeline's first segment holds the switch point).
fn timeline_of_segment(path: &[(TimelineId, Lsn)], segno: SegNo, seg_size: u64) -> TimelineId {
    path.iter()
        .rev()
        .find(|(_, begin)| begin.segno(seg_size) <= segno)
        .map(|&(t, _)| t)
        .unwrap_or(path[0].0)
}

/// True if the backup ended before `tli`'s path left the backup's timeline.
fn backup_on_path(b: &BackupInfo, path: &[(TimelineId, Lsn)]) -> bool {
    match path.iter().position(|&(t, _)| t == b.timeline) {
        None => false,
        Some(i) => match path.get(i + 1) {
            None => true,
            Some(&(_, next_begin)) => b.stop_lsn <= next_begin,
        },
    }
}

/// The last segment held contiguously from `from` along `path`, switching to each newer
/// timeline at the segment where it begins.
fn contiguous_end(
    inv: &WalInventory,
    path: &[(TimelineId, Lsn)],
    from: SegNo,
    seg_size: u64,
) -> Option<SegNo> {
    let mut s = from;
    let mut last = None;
    loop {
        let tli = timeline_of_segment(path, s, seg_size);
        let Some(run_end) = inv.contiguous_end(tli, s) else {
            return last;
        };
        let next_begin = path
            .iter()
            .map(|(_, b)| b.segno(seg_size))
            .filter(|&b| b > s)
            .min();
        match next_begin {
            // The run reaches the next timeline's first segment: continue there.
            Some(nb) if run_end + 1 >= nb => {
                last = Some(nb - 1);
                s = nb;
            }
            _ => return Some(run_end),
        }
    }
}

fn describe_target(t: &Target) -> String {
    match t {
        Target::Latest => "latest".into(),
        Target::Immediate => "immediate".into(),
        Target::Time(t) => super::target::format_pg_time(t),
        Target::Lsn(l) => format!("LSN {l}"),
        Target::Xid(x) => format!("xid {x}"),
        Target::Name(n) => format!("restore point {n:?}"),
    }
}

/// Decides how to restore, or refuses with the reason and the recoverable window.
pub fn plan(
    req: &RestoreRequest,
    backups: &[BackupInfo],
    inv: &WalInventory,
    histories: &Histories,
    seg_size: u64,
    now: DateTime<Utc>,
) -> Result<RestorePlan, PlanError> {
    if backups.is_empty() {
        return Err(PlanError::NoBackups);
    }
    let target_text = describe_target(&req.target);

    // Which timeline recovery will follow.
    let latest_tli = inv
        .timelines
        .keys()
        .chain(inv.histories.iter())
        .copied()
        .max()
        .unwrap_or(1);
    let chosen_for_current = req
        .backup_id
        .as_ref()
        .and_then(|id| backups.iter().find(|b| &b.id == id));
    let resolved_timeline = match req.timeline {
        TimelineTarget::Id(t) => t,
        TimelineTarget::Latest => latest_tli,
        TimelineTarget::Current => chosen_for_current
            .or(backups.last())
            .map(|b| b.timeline)
            .unwrap_or(1),
    };
    let path = timeline_path(histories, resolved_timeline)?;

    let usable: Vec<&BackupInfo> = backups
        .iter()
        .filter(|b| backup_on_path(b, &path))
        .collect();
    if usable.is_empty() {
        return Err(PlanError::NoBackupOnTimeline {
            tli: resolved_timeline,
        });
    }
    let oldest = usable[0];

    // End of WAL reachable from the oldest usable backup: the window's upper bound.
    let window_end_seg = contiguous_end(inv, &path, oldest.start_lsn.segno(seg_size), seg_size);
    let window_end = window_end_seg
        .map(|s| Lsn::from_segno(s + 1, seg_size))
        .unwrap_or(oldest.stop_lsn);
    let window = format!(
        "from {} (LSN {}, end of backup {}) to LSN {} (end of archived WAL on timeline {})",
        oldest.stop_time.format("%Y-%m-%d %H:%M:%S%:z"),
        oldest.stop_lsn,
        oldest.id,
        window_end,
        resolved_timeline
    );

    if let Target::Time(t) = &req.target {
        if t.with_timezone(&Utc) > now {
            return Err(PlanError::TargetInFuture {
                target: target_text,
                now: now.to_rfc3339(),
            });
        }
    }

    // Can this backup reach the target? Only time and LSN targets are comparable here; for xid
    // and restore-point targets the oldest backup is the safe choice unless one is named.
    let reaches = |b: &BackupInfo| match &req.target {
        Target::Time(t) => b.stop_time <= t.with_timezone(&Utc),
        Target::Lsn(l) => b.stop_lsn <= *l,
        _ => true,
    };

    let backup = match &req.backup_id {
        Some(id) => {
            let b = backups
                .iter()
                .find(|b| &b.id == id)
                .ok_or_else(|| PlanError::BackupNotFound { id: id.clone() })?;
            if !backup_on_path(b, &path) {
                return Err(PlanError::NoBackupOnTimeline {
                    tli: resolved_timeline,
                });
            }
            if !reaches(b) {
                let stop = match &req.target {
                    Target::Time(_) => b.stop_time.to_rfc3339(),
                    _ => b.stop_lsn.to_string(),
                };
                return Err(PlanError::BackupAfterTarget {
                    id: id.clone(),
                    stop,
                    target: target_text,
                });
            }
            b
        }
        None => {
            let pick = match &req.target {
                Target::Xid(_) | Target::Name(_) => usable.first().copied(),
                _ => usable.iter().rev().find(|b| reaches(b)).copied(),
            };
            pick.ok_or_else(|| PlanError::BeforeOldestBackup {
                target: target_text.clone(),
                oldest: match &req.target {
                    Target::Time(_) => oldest.stop_time.to_rfc3339(),
                    _ => format!("LSN {}", oldest.stop_lsn),
                },
                window: window.clone(),
            })?
        }
    };

    // The backup's own WAL must be complete, or PostgreSQL never reaches consistency.
    let first = backup.start_lsn.segno(seg_size);
    let stop_seg = Lsn(backup.stop_lsn.0.saturating_sub(1)).segno(seg_size);
    let end_seg = contiguous_end(inv, &path, first, seg_size);
    let missing_from = match end_seg {
        None => Some(first),
        Some(e) if e < stop_seg => Some(e + 1),
        _ => None,
    };
    if let Some(m) = missing_from {
        let tli = timeline_of_segment(&path, m, seg_size);
        return Err(PlanError::MissingBackupWal {
            id: backup.id.clone(),
            missing: WalFileName::segment(tli, m, seg_size).to_string(),
        });
    }
    let end_seg = end_seg.expect("checked above");
    let recoverable_end = Lsn::from_segno(end_seg + 1, seg_size);
    if let Target::Lsn(l) = &req.target {
        if *l > recoverable_end {
            return Err(PlanError::PastEnd {
                target: target_text,
                end: recoverable_end,
                window,
            });
        }
    }

    Ok(RestorePlan {
        backup: backup.clone(),
        target: req.target.clone(),
        action: req.action,
        timeline: req.timeline,
        resolved_timeline,
        inclusive: req.inclusive,
        standby: req.standby,
        wal_first: WalFileName::segment(
            timeline_of_segment(&path, first, seg_size),
            first,
            seg_size,
        ),
        wal_last: WalFileName::segment(
            timeline_of_segment(&path, end_seg, seg_size),
            end_seg,
            seg_size,
        ),
        recoverable_end,
        bytes_to_fetch: backup.stored_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::codec::Codec;

    const SEG: u64 = 16 << 20;

    fn backup(
        id: &str,
        tli: TimelineId,
        start_seg: u64,
        stop_seg: u64,
        stop_min: u32,
    ) -> BackupInfo {
        BackupInfo {
            id: id.into(),
            label: id.into(),
            timeline: tli,
            start_lsn: Lsn::from_segno(start_seg, SEG).checked_add(0x28).unwrap(),
            stop_lsn: Lsn::from_segno(stop_seg, SEG).checked_add(0x100).unwrap(),
            start_time: Utc
                .with_ymd_and_hms(2026, 1, 1, 0, stop_min - 1, 0)
                .unwrap(),
            stop_time: Utc.with_ymd_and_hms(2026, 1, 1, 0, stop_min, 0).unwrap(),
            pg_version_num: 150000,
            system_identifier: 1,
            archives: vec![],
            manifest: true,
            compression: Codec::Lz4,
            pitr_version: "test".into(),
        }
    }

    fn inv(names: &[&str]) -> WalInventory {
        WalInventory::from_names(names.iter().map(|n| WalFileName::parse(n).unwrap()), SEG)
    }

    fn req(target: Target) -> RestoreRequest {
        RestoreRequest {
            target,
            action: TargetAction::Promote,
            timeline: TimelineTarget::Latest,
            backup_id: None,
            inclusive: true,
            standby: false,
        }
    }

    fn at(min: u32) -> Target {
        Target::Time(
            Utc.with_ymd_and_hms(2026, 1, 1, 0, min, 0)
                .unwrap()
                .fixed_offset(),
        )
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 2, 0, 0, 0).unwrap()
    }

    fn wal_1_to(n: u64) -> Vec<String> {
        (1..=n)
            .map(|s| WalFileName::segment(1, s, SEG).to_string())
            .collect()
    }

    #[test]
    fn picks_the_newest_backup_that_ends_before_the_target() {
        let backups = [backup("a", 1, 2, 2, 10), backup("b", 1, 5, 5, 20)];
        let names = wal_1_to(8);
        let i = inv(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let h = Histories::new();
        assert_eq!(
            plan(&req(at(15)), &backups, &i, &h, SEG, now())
                .unwrap()
                .backup
                .id,
            "a"
        );
        assert_eq!(
            plan(&req(at(25)), &backups, &i, &h, SEG, now())
                .unwrap()
                .backup
                .id,
            "b"
        );
        let p = plan(&req(Target::Latest), &backups, &i, &h, SEG, now()).unwrap();
        assert_eq!(p.backup.id, "b");
        assert_eq!(p.wal_last.to_string(), "000000010000000000000008");
        assert_eq!(p.recoverable_end, Lsn::from_segno(9, SEG));
    }

    #[test]
    fn refuses_targets_outside_the_window() {
        let backups = [backup("a", 1, 2, 2, 10)];
        let names = wal_1_to(4);
        let i = inv(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let h = Histories::new();
        let e = plan(&req(at(5)), &backups, &i, &h, SEG, now()).unwrap_err();
        assert!(matches!(e, PlanError::BeforeOldestBackup { .. }), "{e}");
        assert!(e.to_string().contains("recoverable window"));
        let future = Target::Time(
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0)
                .unwrap()
                .fixed_offset(),
        );
        assert!(matches!(
            plan(&req(future), &backups, &i, &h, SEG, now()),
            Err(PlanError::TargetInFuture { .. })
        ));
        let past_end = Target::Lsn(Lsn::from_segno(6, SEG));
        assert!(matches!(
            plan(&req(past_end), &backups, &i, &h, SEG, now()),
            Err(PlanError::PastEnd { .. })
        ));
        let e = plan(&req(Target::Lsn(Lsn(5))), &backups, &i, &h, SEG, now()).unwrap_err();
        assert!(matches!(e, PlanError::BeforeOldestBackup { .. }), "{e}");
    }

    #[test]
    fn a_hole_before_consistency_is_refused_and_a_later_hole_bounds_the_window() {
        let backups = [backup("a", 1, 2, 3, 10)];
        let h = Histories::new();
        let i = inv(&["000000010000000000000002", "000000010000000000000004"]);
        let e = plan(&req(Target::Latest), &backups, &i, &h, SEG, now()).unwrap_err();
        assert_eq!(
            e,
            PlanError::MissingBackupWal {
                id: "a".into(),
                missing: "000000010000000000000003".into()
            }
        );

        let i = inv(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000005",
        ]);
        let p = plan(&req(Target::Latest), &backups, &i, &h, SEG, now()).unwrap();
        assert_eq!(p.wal_last.to_string(), "000000010000000000000003");
        let e = plan(
            &req(Target::Lsn(Lsn::from_segno(5, SEG))),
            &backups,
            &i,
            &h,
            SEG,
            now(),
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::PastEnd { .. }));
    }

    #[test]
    fn follows_a_timeline_switch() {
        // Timeline 2 forked from 1 inside segment 4.
        let backups = [backup("a", 1, 2, 2, 10)];
        let mut h = Histories::new();
        h.insert(
            2,
            vec![HistoryEntry {
                tli: 1,
                switchpoint: Lsn::from_segno(4, SEG).checked_add(0x500).unwrap(),
                reason: String::new(),
            }],
        );
        let i = inv(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004.partial",
            "000000020000000000000004",
            "000000020000000000000005",
            "00000002.history",
        ]);
        let p = plan(&req(Target::Latest), &backups, &i, &h, SEG, now()).unwrap();
        assert_eq!(p.resolved_timeline, 2);
        assert_eq!(p.wal_last.to_string(), "000000020000000000000005");
        // A backup taken on timeline 1 after the fork is not on timeline 2's history.
        let late = [backup("late", 1, 6, 6, 30)];
        assert!(matches!(
            plan(&req(Target::Latest), &late, &i, &h, SEG, now()),
            Err(PlanError::NoBackupOnTimeline { tli: 2 })
        ));
        // Timeline 2 without its history file cannot be planned.
        assert!(matches!(
            plan(
                &req(Target::Latest),
                &backups,
                &i,
                &Histories::new(),
                SEG,
                now()
            ),
            Err(PlanError::MissingHistory { tli: 2 })
        ));
    }
}

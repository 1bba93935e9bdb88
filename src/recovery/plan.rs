//! Restore planning: pure, no I/O. Given the catalog, the WAL inventory, the timeline histories,
//! what the segment summaries say ([`WalFacts`]) and a request, decide which backup to use and
//! prove the target is reachable, or say exactly why not and what is recoverable.
//!
//! Planning is two calls so that it stays pure and reads few summaries: [`summary_needs`] says
//! which segments' summaries matter (per contiguous run of WAL from a usable backup: the last
//! one holding a transaction end, or every one for a restore-point target), the caller loads
//! them into [`WalFacts`], and [`plan`] decides.
//!
//! Why targets are checked against the last archived *transaction*: PostgreSQL compares
//! `recovery_target_time` only with commit and abort records, and stops *before* the first one
//! later than the target. With no such record archived it replays to the end of the archive and
//! fails with "recovery ended before configured recovery target was reached". So a time target
//! is reachable only if an archived transaction end after the backup is later than it (or equal,
//! with `--target-exclusive`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::target::{Target, TargetAction, TimelineTarget};
use crate::error::{Classify, Code};
use crate::repo::{BackupInfo, WalInventory};
use crate::wal::{Lsn, RestorePointMark, SegNo, SegmentSummary, TimelineId, WalFileName, XactMark};

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

impl RestoreRequest {
    /// All archived WAL on the latest timeline, from whichever backup fits: what `list` and
    /// `verify` describe as the recoverable window.
    pub fn latest() -> RestoreRequest {
        RestoreRequest {
            target: Target::Latest,
            action: TargetAction::Promote,
            timeline: TimelineTarget::Latest,
            backup_id: None,
            inclusive: true,
            standby: false,
        }
    }
}

/// The decision, printed by `--dry-run` and carried out by the executor.
#[derive(Clone, Debug)]
pub struct RestorePlan {
    pub backup: BackupInfo,
    /// What restoring `backup` reads, newest first: `backup` itself, then for an incremental
    /// its parent, ..., down to the full backup at the root of its chain.
    pub chain: Vec<BackupInfo>,
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
    /// The last archived transaction end replay can reach from this backup.
    pub last_xact: Option<XactMark>,
    /// For `--target-name`: the restore point, as found in the summaries.
    pub restore_point: Option<RestorePointMark>,
    /// Every recoverable window on the resolved timeline, oldest first.
    pub windows: Vec<Window>,
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
    #[error(
        "target {target} is not before the last archived transaction ({last}): PostgreSQL stops \
         at the first transaction after the target and would end recovery before reaching it; \
         {window}"
    )]
    PastLastTransaction {
        target: String,
        last: String,
        window: String,
    },
    #[error("target {target} falls in a hole in the archived WAL: {hole}; {window}")]
    InHole {
        target: String,
        hole: String,
        window: String,
    },
    #[error(
        "transaction {xid} neither commits nor aborts in the archived WAL after a backup (it may \
         be older than the oldest backup, still running, or its WAL not archived yet); {window}"
    )]
    XidNotArchived { xid: u64, window: String },
    #[error("no restore point named {name:?} in the archived WAL reachable from a backup{known}")]
    UnknownRestorePoint { name: String, known: String },
    #[error(
        "restore point {name:?} was created {count} times ({at}); PostgreSQL stops at the first \
         one after the backup, which may not be the one meant: use --target-lsn with one of these LSNs"
    )]
    AmbiguousRestorePoint {
        name: String,
        count: usize,
        at: String,
    },
    #[error("backup {id} cannot reach consistency: WAL segment {missing} is missing from the repository")]
    MissingBackupWal { id: String, missing: String },
    #[error("timeline {tli} has no history file in the repository, so its ancestry is unknown")]
    MissingHistory { tli: TimelineId },
    #[error("no backup lies on the history of timeline {tli}")]
    NoBackupOnTimeline { tli: TimelineId },
    #[error("backup {id} cannot be restored: {source}")]
    ChainBroken {
        id: String,
        #[source]
        source: super::chain::ChainError,
    },
}

/// Every planning failure is found before anything is written.
impl Classify for PlanError {
    fn code(&self) -> Code {
        Code::RestoreRefused
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            PlanError::ChainBroken { .. } => "nothing was written; an incremental backup restores only with its whole chain: `pitr list` shows each backup's parent; restore another backup with --backup ID".into(),
            _ => "`pitr list` shows the backups and the recoverable window".into(),
        })
    }
}

pub use crate::repo::Histories;

/// Segment summaries along the resolved timeline path, by segment number: the ones
/// [`summary_needs`] asked for (others may be absent).
#[derive(Clone, Debug, Default)]
pub struct WalFacts {
    pub segments: BTreeMap<SegNo, SegmentSummary>,
}

impl WalFacts {
    /// The last transaction end at or after `from` in segments `first..=last`.
    pub fn last_xact(&self, first: SegNo, last: SegNo, from: Lsn) -> Option<&XactMark> {
        self.segments
            .range(first..=last)
            .rev()
            .find_map(|(_, s)| s.last_xact.as_ref())
            .filter(|x| x.lsn >= from)
    }

    /// Restore points named `name` in segments `first..=last`, with the segment holding each.
    fn restore_points<'a>(
        &'a self,
        name: &'a str,
        first: SegNo,
        last: SegNo,
    ) -> impl Iterator<Item = (SegNo, &'a RestorePointMark)> + 'a {
        self.segments.range(first..=last).flat_map(move |(&n, s)| {
            s.restore_points
                .iter()
                .filter(move |r| r.name == name)
                .map(move |r| (n, r))
        })
    }
}

/// A contiguous run of WAL along the timeline path, starting at a usable backup's first segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalRun {
    pub first: SegNo,
    pub last: SegNo,
}

/// Which summaries [`plan`] needs, from [`summary_needs`].
#[derive(Clone, Debug)]
pub struct SummaryNeeds {
    path: Vec<(TimelineId, Lsn)>,
    seg_size: u64,
    /// Distinct runs (by end), each from the earliest usable backup that reaches that end.
    pub runs: Vec<WalRun>,
    /// Every segment of every run (restore-point and xid targets); otherwise, per run, walking
    /// back from its end to the first summary holding a transaction end is enough.
    pub all: bool,
}

impl SummaryNeeds {
    /// The file PostgreSQL reads segment `segno` from along the resolved timeline.
    pub fn segment_name(&self, segno: SegNo) -> WalFileName {
        WalFileName::segment(
            timeline_of_segment(&self.path, segno, self.seg_size),
            segno,
            self.seg_size,
        )
    }
}

/// One stretch of time a restore can reach: from the end of a backup to the end of the WAL held
/// contiguously after it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub backup_id: String,
    pub timeline: TimelineId,
    pub from_lsn: Lsn,
    pub from_time: DateTime<Utc>,
    /// End of the contiguous WAL (the end of its last segment).
    pub to_lsn: Lsn,
    /// The last archived transaction end in the window: time targets must be before it.
    pub last_xact: Option<XactMark>,
    pub last_segment: SegNo,
}

fn fmt_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string()
}

fn describe_window(w: &Window) -> String {
    let to = match &w.last_xact {
        Some(x) => format!(
            "{} (last archived transaction, LSN {})",
            fmt_time(&x.time),
            x.lsn
        ),
        None => "no transaction archived after the backup".to_string(),
    };
    format!(
        "from {} (end of backup {}, LSN {}) to {to}; WAL to LSN {} on timeline {}",
        fmt_time(&w.from_time),
        w.backup_id,
        w.from_lsn,
        w.to_lsn,
        w.timeline
    )
}

/// "recoverable window: …" (or "windows: …; …") for error messages.
pub fn describe_windows(windows: &[Window]) -> String {
    match windows {
        [] => "nothing is recoverable yet".to_string(),
        [w] => format!("recoverable window: {}", describe_window(w)),
        ws => format!(
            "recoverable windows: {}",
            ws.iter()
                .map(describe_window)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// The resolved timeline, its path and the backups on it (oldest first).
struct Resolved<'a> {
    timeline: TimelineId,
    path: Vec<(TimelineId, Lsn)>,
    usable: Vec<&'a BackupInfo>,
}

fn resolve<'a>(
    req: &RestoreRequest,
    backups: &'a [BackupInfo],
    inv: &WalInventory,
    histories: &Histories,
) -> Result<Resolved<'a>, PlanError> {
    if backups.is_empty() {
        return Err(PlanError::NoBackups);
    }
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
    let timeline = match req.timeline {
        TimelineTarget::Id(t) => t,
        TimelineTarget::Latest => latest_tli,
        TimelineTarget::Current => chosen_for_current
            .or(backups.last())
            .map(|b| b.timeline)
            .unwrap_or(1),
    };
    let path = timeline_path(histories, timeline)?;
    let usable: Vec<&BackupInfo> = backups
        .iter()
        .filter(|b| backup_on_path(b, &path))
        .collect();
    if usable.is_empty() {
        return Err(PlanError::NoBackupOnTimeline { tli: timeline });
    }
    Ok(Resolved {
        timeline,
        path,
        usable,
    })
}

/// The contiguous run from `b`'s first segment, if it reaches the end of the backup.
fn backup_run(b: &BackupInfo, inv: &WalInventory, r: &Resolved, seg_size: u64) -> Option<WalRun> {
    let first = b.start_lsn.segno(seg_size);
    let stop_seg = Lsn(b.stop_lsn.0.saturating_sub(1)).segno(seg_size);
    let last = contiguous_end(inv, &r.path, first, seg_size)?;
    (last >= stop_seg).then_some(WalRun { first, last })
}

/// Which segment summaries [`plan`] needs for `req`.
pub fn summary_needs(
    req: &RestoreRequest,
    backups: &[BackupInfo],
    inv: &WalInventory,
    histories: &Histories,
    seg_size: u64,
) -> Result<SummaryNeeds, PlanError> {
    let r = resolve(req, backups, inv, histories)?;
    let mut runs: Vec<WalRun> = vec![];
    for b in &r.usable {
        let Some(run) = backup_run(b, inv, &r, seg_size) else {
            continue;
        };
        match runs.iter_mut().find(|x| x.last == run.last) {
            Some(x) => x.first = x.first.min(run.first),
            None => runs.push(run),
        }
    }
    Ok(SummaryNeeds {
        path: r.path,
        seg_size,
        runs,
        all: matches!(req.target, Target::Name(_) | Target::Xid(_)),
    })
}

/// The recoverable windows, oldest first: one per distinct end of contiguous WAL, starting at
/// the oldest backup that reaches it.
fn windows(r: &Resolved, inv: &WalInventory, facts: &WalFacts, seg_size: u64) -> Vec<Window> {
    let mut out: Vec<Window> = vec![];
    for b in &r.usable {
        let Some(run) = backup_run(b, inv, r, seg_size) else {
            continue;
        };
        if out.iter().any(|w| w.last_segment == run.last) {
            continue;
        }
        out.push(Window {
            backup_id: b.id.clone(),
            timeline: r.timeline,
            from_lsn: b.stop_lsn,
            from_time: b.stop_time,
            to_lsn: Lsn::from_segno(run.last + 1, seg_size),
            last_xact: facts.last_xact(run.first, run.last, b.stop_lsn).cloned(),
            last_segment: run.last,
        });
    }
    out
}

/// The recoverable windows on the timeline `req` resolves to, oldest first (for `list`).
pub fn recoverable_windows(
    req: &RestoreRequest,
    backups: &[BackupInfo],
    inv: &WalInventory,
    histories: &Histories,
    facts: &WalFacts,
    seg_size: u64,
) -> Result<Vec<Window>, PlanError> {
    let r = resolve(req, backups, inv, histories)?;
    Ok(windows(&r, inv, facts, seg_size))
}

/// The first missing stretch after segment `end` along the path, as text for messages.
fn describe_hole(
    inv: &WalInventory,
    path: &[(TimelineId, Lsn)],
    end: SegNo,
    seg_size: u64,
) -> String {
    let from = end + 1;
    let tli = timeline_of_segment(path, from, seg_size);
    let next = inv
        .timelines
        .get(&tli)
        .and_then(|t| t.ranges.iter().map(|&(a, _)| a).filter(|&a| a > from).min());
    match next {
        Some(n) => format!(
            "WAL from LSN {} to LSN {} is missing (segments {} to {})",
            Lsn::from_segno(from, seg_size),
            Lsn::from_segno(n, seg_size),
            WalFileName::segment(tli, from, seg_size),
            WalFileName::segment(tli, n - 1, seg_size)
        ),
        None => format!(
            "WAL is missing from LSN {} (segment {})",
            Lsn::from_segno(from, seg_size),
            WalFileName::segment(tli, from, seg_size)
        ),
    }
}

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

/// Decides how to restore, or refuses with the reason and the recoverable window. `facts` holds
/// the summaries [`summary_needs`] asked for.
///
/// Phases, each its own function: the time sanity check, the restore point or xid bound the
/// target resolves to ([`find_restore_point`], [`xid_floor`]), the backup choice
/// ([`choose_backup`]), then reachability from that backup ([`check_reachable`]).
pub fn plan(
    req: &RestoreRequest,
    backups: &[BackupInfo],
    inv: &WalInventory,
    histories: &Histories,
    facts: &WalFacts,
    seg_size: u64,
    now: DateTime<Utc>,
) -> Result<RestorePlan, PlanError> {
    let r = resolve(req, backups, inv, histories)?;
    let windows = windows(&r, inv, facts, seg_size);
    let ctx = Ctx {
        req,
        r: &r,
        inv,
        facts,
        seg_size,
        target_text: describe_target(&req.target),
        window: describe_windows(&windows),
        windows: &windows,
    };
    if let Target::Time(t) = &req.target {
        if t.with_timezone(&Utc) > now {
            return Err(PlanError::TargetInFuture {
                target: ctx.target_text,
                now: now.to_rfc3339(),
            });
        }
    }
    let restore_point = match &req.target {
        Target::Name(name) => Some(find_restore_point(&ctx, name)?),
        _ => None,
    };
    let floor = match &req.target {
        Target::Xid(x) => Some(xid_floor(&ctx, *x)?),
        _ => None,
    };
    let backup = choose_backup(&ctx, backups, restore_point.as_ref(), floor)?;
    let reach = check_reachable(&ctx, backup, restore_point.as_ref())?;
    // No fall-back to another backup: the user picks one with --backup.
    let chain: Vec<BackupInfo> = super::chain::chain_of(backup, backups)
        .map_err(|source| PlanError::ChainBroken {
            id: backup.id.clone(),
            source,
        })?
        .into_iter()
        .cloned()
        .collect();
    let bytes_to_fetch = chain.iter().map(BackupInfo::stored_bytes).sum();
    let path = &r.path;
    let segment = |n| WalFileName::segment(timeline_of_segment(path, n, seg_size), n, seg_size);
    Ok(RestorePlan {
        backup: backup.clone(),
        chain,
        target: req.target.clone(),
        action: req.action,
        timeline: req.timeline,
        resolved_timeline: r.timeline,
        inclusive: req.inclusive,
        standby: req.standby,
        wal_first: segment(backup.start_lsn.segno(seg_size)),
        wal_last: segment(reach.end_seg),
        recoverable_end: Lsn::from_segno(reach.end_seg + 1, seg_size),
        bytes_to_fetch,
        last_xact: reach.last_xact,
        restore_point: restore_point.map(|(_, rp)| rp),
        windows,
    })
}

/// What every planning phase reads.
struct Ctx<'a> {
    req: &'a RestoreRequest,
    r: &'a Resolved<'a>,
    inv: &'a WalInventory,
    facts: &'a WalFacts,
    seg_size: u64,
    target_text: String,
    /// The recoverable windows, as text for refusals.
    window: String,
    windows: &'a [Window],
}

impl Ctx<'_> {
    /// Where the WAL of a window begins: the start of the backup it is measured from.
    fn window_first_segment(&self, w: &Window) -> SegNo {
        self.r
            .usable
            .iter()
            .find(|b| b.id == w.backup_id)
            .map(|b| b.start_lsn.segno(self.seg_size))
            .unwrap_or(0)
    }

    /// The target as refusals name it: a restore point with its LSN.
    fn target_with_lsn(&self, restore_point: Option<&(SegNo, RestorePointMark)>) -> String {
        match restore_point {
            Some((_, rp)) => format!("{} (LSN {})", self.target_text, rp.lsn),
            None => self.target_text.clone(),
        }
    }
}

/// A restore point is found in the summaries; the newest backup that ends before it is the one
/// to replay from (PostgreSQL stops at the first restore point of that name it replays). Exactly
/// one restore point of that name may be reachable.
fn find_restore_point(ctx: &Ctx, name: &str) -> Result<(SegNo, RestorePointMark), PlanError> {
    let mut found: Vec<(SegNo, &RestorePointMark)> = vec![];
    for w in ctx.windows {
        let first = ctx.window_first_segment(w);
        for (n, rp) in ctx.facts.restore_points(name, first, w.last_segment) {
            if !found.iter().any(|(_, f)| f.lsn == rp.lsn) {
                found.push((n, rp));
            }
        }
    }
    match found.as_slice() {
        [] => {
            let mut names: Vec<&str> = ctx
                .facts
                .segments
                .values()
                .flat_map(|s| s.restore_points.iter().map(|r| r.name.as_str()))
                .collect();
            names.dedup();
            let known = if names.is_empty() {
                String::new()
            } else {
                format!("; restore points archived: {}", names.join(", "))
            };
            Err(PlanError::UnknownRestorePoint {
                name: name.to_string(),
                known,
            })
        }
        [(n, rp)] => Ok((*n, (*rp).clone())),
        many => Err(PlanError::AmbiguousRestorePoint {
            name: name.to_string(),
            count: many.len(),
            at: many
                .iter()
                .map(|(_, r)| format!("LSN {} at {}", r.lsn, fmt_time(&r.time)))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// An xid's commit (or abort) cannot end before the first segment whose summary may hold it (a
/// missing or incomplete summary counts as "may"): a backup that stops by then reaches it. With
/// every summary present and none holding it, no archived WAL can stop there and PostgreSQL
/// would replay to the end and fail, so it is refused now.
fn xid_floor(ctx: &Ctx, xid: u64) -> Result<Lsn, PlanError> {
    // recovery_target_xid compares 32-bit xids; the epoch is dropped.
    let xid32 = xid as u32;
    let mut floor: Option<SegNo> = None;
    for w in ctx.windows {
        let first = ctx.window_first_segment(w);
        let hit = (first..=w.last_segment).find(|n| {
            ctx.facts
                .segments
                .get(n)
                .is_none_or(|s| s.may_end_xid(xid32))
        });
        floor = match (floor, hit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    floor
        .map(|n| Lsn::from_segno(n, ctx.seg_size))
        .ok_or_else(|| PlanError::XidNotArchived {
            xid,
            window: ctx.window.clone(),
        })
}

/// Whether backup `b` ends before the target. For an xid, the floor is only a lower bound of
/// where it ends, so a backup the user names is taken as reaching it.
fn reaches(ctx: &Ctx, b: &BackupInfo, restore_point: Option<&(SegNo, RestorePointMark)>) -> bool {
    match &ctx.req.target {
        Target::Time(t) => b.stop_time <= t.with_timezone(&Utc),
        Target::Lsn(l) => b.stop_lsn <= *l,
        Target::Name(_) => restore_point.is_some_and(|(_, rp)| b.stop_lsn <= rp.lsn),
        _ => true,
    }
}

/// The backup the user named, checked; or the newest usable one that ends before the target.
fn choose_backup<'a>(
    ctx: &Ctx<'a>,
    backups: &'a [BackupInfo],
    restore_point: Option<&(SegNo, RestorePointMark)>,
    floor: Option<Lsn>,
) -> Result<&'a BackupInfo, PlanError> {
    let usable = &ctx.r.usable;
    if let Some(id) = &ctx.req.backup_id {
        let b = backups
            .iter()
            .find(|b| &b.id == id)
            .ok_or_else(|| PlanError::BackupNotFound { id: id.clone() })?;
        if !backup_on_path(b, &ctx.r.path) {
            return Err(PlanError::NoBackupOnTimeline {
                tli: ctx.r.timeline,
            });
        }
        if !reaches(ctx, b, restore_point) {
            return Err(PlanError::BackupAfterTarget {
                id: id.clone(),
                stop: match &ctx.req.target {
                    Target::Time(_) => b.stop_time.to_rfc3339(),
                    _ => b.stop_lsn.to_string(),
                },
                target: ctx.target_with_lsn(restore_point),
            });
        }
        return Ok(b);
    }
    let pick = match &ctx.req.target {
        // The newest backup stopping by the floor; when none does, the oldest, and PostgreSQL
        // says whether the xid ends after its consistency point.
        Target::Xid(_) => usable
            .iter()
            .rev()
            .find(|b| floor.is_some_and(|f| b.stop_lsn <= f))
            .or(usable.first())
            .copied(),
        _ => usable
            .iter()
            .rev()
            .find(|b| reaches(ctx, b, restore_point))
            .copied(),
    };
    let oldest = usable[0];
    pick.ok_or_else(|| PlanError::BeforeOldestBackup {
        target: ctx.target_with_lsn(restore_point),
        oldest: match &ctx.req.target {
            Target::Time(_) => oldest.stop_time.to_rfc3339(),
            _ => format!("LSN {}", oldest.stop_lsn),
        },
        window: ctx.window.clone(),
    })
}

/// How far replay from the chosen backup gets.
struct Reach {
    /// Last segment held contiguously from the backup's start.
    end_seg: SegNo,
    last_xact: Option<XactMark>,
}

/// The backup's own WAL must be complete (or PostgreSQL never reaches consistency), and the
/// target must lie within the WAL held contiguously after it.
fn check_reachable(
    ctx: &Ctx,
    backup: &BackupInfo,
    restore_point: Option<&(SegNo, RestorePointMark)>,
) -> Result<Reach, PlanError> {
    let (path, seg_size) = (&ctx.r.path, ctx.seg_size);
    let first = backup.start_lsn.segno(seg_size);
    let stop_seg = Lsn(backup.stop_lsn.0.saturating_sub(1)).segno(seg_size);
    let end_seg = match contiguous_end(ctx.inv, path, first, seg_size) {
        Some(e) if e >= stop_seg => e,
        other => {
            let m = other.map_or(first, |e| e + 1);
            return Err(PlanError::MissingBackupWal {
                id: backup.id.clone(),
                missing: WalFileName::segment(timeline_of_segment(path, m, seg_size), m, seg_size)
                    .to_string(),
            });
        }
    };
    let last_xact = ctx
        .facts
        .last_xact(first, end_seg, backup.stop_lsn)
        .cloned();
    let reach = Reach { end_seg, last_xact };
    match &ctx.req.target {
        Target::Lsn(l) => check_lsn_target(ctx, &reach, *l)?,
        Target::Time(t) => check_time_target(ctx, backup, &reach, t.with_timezone(&Utc))?,
        Target::Name(_) => {
            let (n, _) = restore_point.expect("name targets resolve a restore point");
            if *n > end_seg {
                return Err(PlanError::InHole {
                    target: ctx.target_with_lsn(restore_point),
                    hole: describe_hole(ctx.inv, path, end_seg, seg_size),
                    window: ctx.window.clone(),
                });
            }
        }
        _ => {}
    }
    Ok(reach)
}

/// A later window starting after the target means the target is in a hole, not past the end.
fn hole_before(ctx: &Ctx, end_seg: SegNo, later_than: impl Fn(&Window) -> bool) -> Option<String> {
    ctx.windows
        .iter()
        .any(|w| w.last_segment > end_seg && later_than(w))
        .then(|| describe_hole(ctx.inv, &ctx.r.path, end_seg, ctx.seg_size))
}

fn check_lsn_target(ctx: &Ctx, reach: &Reach, l: Lsn) -> Result<(), PlanError> {
    let end = Lsn::from_segno(reach.end_seg + 1, ctx.seg_size);
    if l <= end {
        return Ok(());
    }
    Err(match hole_before(ctx, reach.end_seg, |w| w.from_lsn > l) {
        Some(hole) => PlanError::InHole {
            target: ctx.target_text.clone(),
            hole,
            window: ctx.window.clone(),
        },
        None => PlanError::PastEnd {
            target: ctx.target_text.clone(),
            end,
            window: ctx.window.clone(),
        },
    })
}

/// PostgreSQL stops at the first transaction end after the target time: one must be archived.
fn check_time_target(
    ctx: &Ctx,
    backup: &BackupInfo,
    reach: &Reach,
    t: DateTime<Utc>,
) -> Result<(), PlanError> {
    let inclusive = ctx.req.inclusive;
    let reached =
        reach
            .last_xact
            .as_ref()
            .is_some_and(|x| if inclusive { x.time > t } else { x.time >= t });
    if reached {
        return Ok(());
    }
    if let Some(hole) = hole_before(ctx, reach.end_seg, |w| w.from_time > t) {
        return Err(PlanError::InHole {
            target: ctx.target_text.clone(),
            hole,
            window: ctx.window.clone(),
        });
    }
    Err(PlanError::PastLastTransaction {
        target: ctx.target_text.clone(),
        last: match &reach.last_xact {
            Some(x) => format!("{} at LSN {}", fmt_time(&x.time), x.lsn),
            None => format!("none archived after backup {}", backup.id),
        },
        window: ctx.window.clone(),
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use crate::wal::HistoryEntry;

    use super::*;

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
            pitr_version: "test".into(),
            ..BackupInfo::example(id, 0, None)
        }
    }

    fn inv(names: &[&str]) -> WalInventory {
        WalInventory::from_names(names.iter().map(|n| WalFileName::parse(n).unwrap()), SEG)
    }

    /// A summary for segment `segno` of timeline `tli` with one commit at minute `segno * 5`.
    fn summary(tli: TimelineId, segno: u64, rps: &[(&str, u64)]) -> SegmentSummary {
        let start = Lsn::from_segno(segno, SEG);
        let xact = XactMark {
            lsn: start.checked_add(0x1000).unwrap(),
            time: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
                + chrono::Duration::minutes(segno as i64 * 5),
            xid: 1000 + segno as u32,
            kind: crate::wal::XactKind::Commit,
        };
        SegmentSummary {
            format: crate::wal::SUMMARY_FORMAT,
            segment_start: start,
            segment_size: SEG,
            pg_major: 15,
            system_identifier: 1,
            timeline: tli,
            last_page_timeline: tli,
            skipped_continuation: None,
            first_record_lsn: Some(start.checked_add(40).unwrap()),
            last_record_lsn: Some(start.checked_add(0x2000).unwrap()),
            end_lsn: Some(start.checked_add(0x2100).unwrap()),
            record_count: 10,
            commit_count: 1,
            abort_count: 0,
            first_xact: Some(xact.clone()),
            last_xact: Some(xact),
            xid_range: Some(crate::wal::XidRange {
                min: 1000 + segno as u32,
                max: 1000 + segno as u32,
            }),
            restore_points: rps
                .iter()
                .map(|&(name, off)| RestorePointMark {
                    name: name.into(),
                    time: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
                        + chrono::Duration::minutes(segno as i64 * 5),
                    lsn: start.checked_add(off).unwrap(),
                })
                .collect(),
            checkpoints: vec![],
            ends_with_switch: false,
            end: crate::wal::SegmentEnd::Switch,
        }
    }

    /// Facts for every held segment (the newest timeline wins a segment number).
    fn facts_for(i: &WalInventory) -> WalFacts {
        let mut f = WalFacts::default();
        for (&tli, t) in &i.timelines {
            for &(a, b) in &t.ranges {
                for n in a..=b {
                    f.segments.insert(n, summary(tli, n, &[]));
                }
            }
        }
        f
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
            plan(&req(at(15)), &backups, &i, &h, &facts_for(&i), SEG, now())
                .unwrap()
                .backup
                .id,
            "a"
        );
        assert_eq!(
            plan(&req(at(25)), &backups, &i, &h, &facts_for(&i), SEG, now())
                .unwrap()
                .backup
                .id,
            "b"
        );
        let p = plan(
            &req(Target::Latest),
            &backups,
            &i,
            &h,
            &facts_for(&i),
            SEG,
            now(),
        )
        .unwrap();
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
        let e = plan(&req(at(5)), &backups, &i, &h, &facts_for(&i), SEG, now()).unwrap_err();
        assert!(matches!(e, PlanError::BeforeOldestBackup { .. }), "{e}");
        assert!(e.to_string().contains("recoverable window"));
        let future = Target::Time(
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0)
                .unwrap()
                .fixed_offset(),
        );
        assert!(matches!(
            plan(&req(future), &backups, &i, &h, &facts_for(&i), SEG, now()),
            Err(PlanError::TargetInFuture { .. })
        ));
        let past_end = Target::Lsn(Lsn::from_segno(6, SEG));
        assert!(matches!(
            plan(&req(past_end), &backups, &i, &h, &facts_for(&i), SEG, now()),
            Err(PlanError::PastEnd { .. })
        ));
        let e = plan(
            &req(Target::Lsn(Lsn(5))),
            &backups,
            &i,
            &h,
            &facts_for(&i),
            SEG,
            now(),
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::BeforeOldestBackup { .. }), "{e}");
    }

    #[test]
    fn a_hole_before_consistency_is_refused_and_a_later_hole_bounds_the_window() {
        let backups = [backup("a", 1, 2, 3, 10)];
        let h = Histories::new();
        let i = inv(&["000000010000000000000002", "000000010000000000000004"]);
        let e = plan(
            &req(Target::Latest),
            &backups,
            &i,
            &h,
            &facts_for(&i),
            SEG,
            now(),
        )
        .unwrap_err();
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
        let p = plan(
            &req(Target::Latest),
            &backups,
            &i,
            &h,
            &facts_for(&i),
            SEG,
            now(),
        )
        .unwrap();
        assert_eq!(p.wal_last.to_string(), "000000010000000000000003");
        let e = plan(
            &req(Target::Lsn(Lsn::from_segno(5, SEG))),
            &backups,
            &i,
            &h,
            &facts_for(&i),
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
        let p = plan(
            &req(Target::Latest),
            &backups,
            &i,
            &h,
            &facts_for(&i),
            SEG,
            now(),
        )
        .unwrap();
        assert_eq!(p.resolved_timeline, 2);
        assert_eq!(p.wal_last.to_string(), "000000020000000000000005");
        // A backup taken on timeline 1 after the fork is not on timeline 2's history.
        let late = [backup("late", 1, 6, 6, 30)];
        assert!(matches!(
            plan(
                &req(Target::Latest),
                &late,
                &i,
                &h,
                &facts_for(&i),
                SEG,
                now()
            ),
            Err(PlanError::NoBackupOnTimeline { tli: 2 })
        ));
        // Timeline 2 without its history file cannot be planned.
        assert!(matches!(
            plan(
                &req(Target::Latest),
                &backups,
                &i,
                &Histories::new(),
                &facts_for(&i),
                SEG,
                now()
            ),
            Err(PlanError::MissingHistory { tli: 2 })
        ));
    }

    #[test]
    fn time_targets_must_be_before_the_last_archived_transaction() {
        // Commits at minute 5 × segno: the last archived one (segment 4) is at minute 20.
        let backups = [backup("a", 1, 2, 2, 10)];
        let names = wal_1_to(4);
        let i = inv(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let h = Histories::new();
        let f = facts_for(&i);
        let p = plan(&req(at(19)), &backups, &i, &h, &f, SEG, now()).unwrap();
        assert_eq!(p.last_xact.unwrap().xid, 1004);
        // Exactly at the last commit: PostgreSQL needs a later one to stop before.
        let e = plan(&req(at(20)), &backups, &i, &h, &f, SEG, now()).unwrap_err();
        assert!(matches!(e, PlanError::PastLastTransaction { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("2026-01-01 00:20:00.000000+00:00"), "{msg}");
        assert!(
            msg.contains("recoverable window: from 2026-01-01 00:10:00"),
            "{msg}"
        );
        // --target-exclusive stops before a commit at the target itself.
        let mut r = req(at(20));
        r.inclusive = false;
        assert!(plan(&r, &backups, &i, &h, &f, SEG, now()).is_ok());
        // No summaries, no known transaction: refused rather than failing in PostgreSQL.
        let e = plan(
            &req(at(19)),
            &backups,
            &i,
            &h,
            &WalFacts::default(),
            SEG,
            now(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("none archived after backup a"),
            "{e}"
        );
        // Latest needs no transaction.
        assert!(plan(
            &req(Target::Latest),
            &backups,
            &i,
            &h,
            &WalFacts::default(),
            SEG,
            now()
        )
        .is_ok());
    }

    #[test]
    fn a_time_or_lsn_target_in_a_hole_is_refused_with_the_hole_and_both_windows() {
        // Backup a (segments 2-4), hole at 5-6, backup b from segment 7 at minute 36.
        let backups = [backup("a", 1, 2, 2, 10), backup("b", 1, 7, 7, 36)];
        let i = inv(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000007",
            "000000010000000000000008",
        ]);
        let h = Histories::new();
        let f = facts_for(&i);
        let e = plan(&req(at(30)), &backups, &i, &h, &f, SEG, now()).unwrap_err();
        assert!(matches!(e, PlanError::InHole { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("segments 000000010000000000000005 to 000000010000000000000006"),
            "{msg}"
        );
        assert!(msg.contains("recoverable windows: from"), "{msg}");
        assert!(msg.contains("end of backup b"), "{msg}");
        // Inside either window is fine.
        assert_eq!(
            plan(&req(at(15)), &backups, &i, &h, &f, SEG, now())
                .unwrap()
                .backup
                .id,
            "a"
        );
        assert_eq!(
            plan(&req(at(38)), &backups, &i, &h, &f, SEG, now())
                .unwrap()
                .backup
                .id,
            "b"
        );
        let in_hole = Target::Lsn(Lsn::from_segno(6, SEG));
        assert!(matches!(
            plan(&req(in_hole), &backups, &i, &h, &f, SEG, now()),
            Err(PlanError::InHole { .. })
        ));
        let w = recoverable_windows(&req(Target::Latest), &backups, &i, &h, &f, SEG).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].to_lsn, Lsn::from_segno(5, SEG));
        assert_eq!(w[1].last_xact.as_ref().unwrap().xid, 1008);
    }

    /// Backups a (segment 2), b (4) and c (7) over WAL segments 1 to 8 of timeline 1.
    fn three_backups_over_wal_1_to_8() -> ([BackupInfo; 3], WalInventory, Histories) {
        let backups = [
            backup("a", 1, 2, 2, 10),
            backup("b", 1, 4, 4, 20),
            backup("c", 1, 7, 7, 35),
        ];
        let names = wal_1_to(8);
        let i = inv(&names.iter().map(String::as_str).collect::<Vec<_>>());
        (backups, i, Histories::new())
    }

    #[test]
    fn an_incremental_is_chosen_like_a_full_and_needs_its_whole_chain() {
        let (mut backups, i, h) = three_backups_over_wal_1_to_8();
        for (n, parent) in [(1, "a"), (2, "b")] {
            backups[n].kind = crate::repo::BackupKind::Incremental;
            backups[n].parent = Some(parent.into());
        }
        let f = facts_for(&i);
        let p = plan(&req(at(38)), &backups, &i, &h, &f, SEG, now()).unwrap();
        assert_eq!(p.backup.id, "c");
        let chain: Vec<&str> = p.chain.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(chain, ["c", "b", "a"]);
        let p = plan(&req(at(25)), &backups, &i, &h, &f, SEG, now()).unwrap();
        assert_eq!(p.chain.len(), 2, "b and its full");

        // Without b in the catalog, c is refused, naming b: no fall-back to a.
        let without_b = [backups[0].clone(), backups[2].clone()];
        let e = plan(&req(at(38)), &without_b, &i, &h, &f, SEG, now()).unwrap_err();
        assert!(
            matches!(&e, PlanError::ChainBroken { id, source } if id == "c" && source.member == "b"),
            "{e}"
        );
        assert_eq!(e.code(), Code::RestoreRefused);
    }

    #[test]
    fn xid_targets_pick_the_newest_backup_before_the_first_segment_that_may_end_them() {
        let (backups, i, h) = three_backups_over_wal_1_to_8();
        // Segment n ends transaction 1000 + n.
        let mut f = facts_for(&i);
        let pick = |f: &WalFacts, xid: u64| {
            plan(&req(Target::Xid(xid)), &backups, &i, &h, f, SEG, now()).map(|p| p.backup.id)
        };
        assert_eq!(pick(&f, 1006).unwrap(), "b");
        assert_eq!(pick(&f, 1008).unwrap(), "c");
        assert_eq!(pick(&f, 1003).unwrap(), "a");
        // Ends in the oldest backup's own segment: no backup stops before; the oldest is tried.
        assert_eq!(pick(&f, 1002).unwrap(), "a");
        // The epoch is not part of what PostgreSQL compares.
        assert_eq!(pick(&f, (1 << 32) + 1006).unwrap(), "b");
        // Ended nowhere in the archived WAL: refused before anything is written.
        let e = pick(&f, 999).unwrap_err();
        assert!(
            matches!(e, PlanError::XidNotArchived { xid: 999, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("recoverable"), "{e}");
        // A summary that cannot say (missing, or its leading continuation skipped) may hold it:
        // the choice only moves to an older backup.
        f.segments.remove(&5);
        assert_eq!(pick(&f, 1008).unwrap(), "b");
        let mut f = facts_for(&i);
        f.segments.get_mut(&7).unwrap().skipped_continuation =
            Some(crate::wal::SkippedContinuation { rem_len: 10 });
        assert_eq!(pick(&f, 1008).unwrap(), "b");
        // A summary from before xid ranges existed, with transaction ends: "maybe".
        let mut f = facts_for(&i);
        f.segments.get_mut(&3).unwrap().xid_range = None;
        assert_eq!(pick(&f, 1006).unwrap(), "a");
        // ... and without any: it cannot hold the xid.
        f.segments.get_mut(&3).unwrap().commit_count = 0;
        assert_eq!(pick(&f, 1006).unwrap(), "b");
        // The needs of an xid target cover every segment from the oldest backup on.
        let needs = summary_needs(&req(Target::Xid(5)), &backups, &i, &h, SEG).unwrap();
        assert!(needs.all);
    }

    #[test]
    fn restore_points_pick_the_newest_backup_before_them() {
        let (backups, i, h) = three_backups_over_wal_1_to_8();
        let mut f = facts_for(&i);
        f.segments
            .insert(5, summary(1, 5, &[("before_migration", 0x800)]));
        f.segments
            .insert(6, summary(1, 6, &[("dup", 0x10), ("other", 0x20)]));
        f.segments.insert(8, summary(1, 8, &[("dup", 0x10)]));
        let name = |n: &str| req(Target::Name(n.into()));
        let p = plan(&name("before_migration"), &backups, &i, &h, &f, SEG, now()).unwrap();
        assert_eq!(p.backup.id, "b");
        assert_eq!(
            p.restore_point.unwrap().lsn,
            Lsn::from_segno(5, SEG).checked_add(0x800).unwrap()
        );
        let e = plan(&name("nope"), &backups, &i, &h, &f, SEG, now()).unwrap_err();
        assert!(matches!(e, PlanError::UnknownRestorePoint { .. }), "{e}");
        assert!(e.to_string().contains("before_migration"), "{e}");
        let e = plan(&name("dup"), &backups, &i, &h, &f, SEG, now()).unwrap_err();
        assert!(
            matches!(e, PlanError::AmbiguousRestorePoint { count: 2, .. }),
            "{e}"
        );
        // A named backup that ends after the restore point is refused.
        let mut r = name("before_migration");
        r.backup_id = Some("c".into());
        assert!(matches!(
            plan(&r, &backups, &i, &h, &f, SEG, now()),
            Err(PlanError::BackupAfterTarget { .. })
        ));
        // The needs of a name target cover every segment from the oldest backup on.
        let needs = summary_needs(&name("x"), &backups, &i, &h, SEG).unwrap();
        assert!(needs.all);
        assert_eq!(needs.runs, vec![WalRun { first: 2, last: 8 }]);
        assert_eq!(
            needs.segment_name(3).to_string(),
            "000000010000000000000003"
        );
    }
}

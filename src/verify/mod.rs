//! `pitr verify`: prove that what the repository holds can be restored, or say exactly what
//! cannot and which recovery windows that cuts.
//!
//! Checks, in one pass over every object (one LIST, then one GET per object):
//! - every object's frame (magic, header, payload and content CRC-32C);
//! - every backup against its manifest: parts decoded and tar-parsed, each file's size and
//!   CRC-32C compared, every listed file present ([`backups`]);
//! - WAL: each segment's first page header, its summary (present, and not reporting damaged
//!   records), continuity per timeline (holes as LSN ranges, with the windows they cut), the
//!   WAL each backup needs to reach consistency, and timeline histories (parse, ancestors
//!   present, switch points ordered and consistent with the parents') ([`wal`]);
//! - with `--full`, the record chain itself: every record's CRC and `xl_prev` link, across
//!   segment boundaries, by summarizing each segment with the previous one's tail.
//!
//! The job returns a [`VerifyReport`]; the CLI prints it and chooses the exit code.

mod backups;
mod wal;

use std::time::Instant;

use serde::Serialize;

use crate::recovery::Window;
use crate::repo::{ObjectKind, RepoError, Repository, ScannedObject};

#[derive(Clone, Copy, Debug, Default)]
pub struct VerifyOptions {
    /// Also walk the record chain (CRC, xl_prev) of every segment.
    pub full: bool,
}

/// How bad a finding is. Errors make `verify` fail; warnings do not put any restore at risk
/// (e.g. a missing summary, which restore rebuilds from the segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
}

/// What kind of problem, for scripts reading `--json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The object fails its frame checks (checksums, length, header).
    CorruptObject,
    /// A WAL segment's page headers or records are invalid.
    BadWal,
    /// Segments missing between two held ones on a timeline.
    WalHole,
    /// A backup lacks WAL it needs to reach consistency.
    BackupWalMissing,
    /// A backup's data does not match its manifest, or a part is missing.
    BackupMismatch,
    /// A timeline history file is unreadable or inconsistent.
    BadHistory,
    /// A segment has no summary (restore rebuilds it, at the cost of reading the segment).
    MissingSummary,
    /// A catalog or summary object does not parse.
    BadMetadata,
    /// An incremental backup's chain has a member missing from the catalog, or damaged.
    BrokenChain,
}

#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub kind: ProblemKind,
    /// The object concerned (repository key), when there is one.
    pub object: Option<String>,
    pub message: String,
    /// What this does to recovery, when it cuts a window.
    pub impact: Option<String>,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub full: bool,
    pub objects: u64,
    pub bytes: u64,
    pub backups: u64,
    pub backup_files: u64,
    pub wal_segments: u64,
    pub wal_bytes: u64,
    /// Records walked (`--full` only).
    pub wal_records: u64,
    pub seconds: f64,
    /// Seconds spent checking WAL (fetch, decode and, with `--full`, records).
    pub wal_seconds: f64,
    pub windows: Vec<Window>,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn errors(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count()
    }

    pub fn warnings(&self) -> usize {
        self.problems.len() - self.errors()
    }

    fn problem(
        &mut self,
        severity: Severity,
        kind: ProblemKind,
        object: Option<String>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            severity,
            kind,
            object,
            message: message.into(),
            impact: None,
        });
    }
}

/// Progress callbacks, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub enum VerifyProgress {
    /// Bytes (as stored) and objects about to be checked.
    Total { bytes: u64, objects: u64 },
    /// One object checked: its stored size.
    Checked { bytes: u64 },
}

/// Verifies the whole repository. Returns `Err` only when verification itself cannot proceed
/// (storage unreachable); everything found in the objects is in the report.
pub async fn verify(
    repo: &Repository,
    opts: VerifyOptions,
    progress: &(dyn Fn(VerifyProgress) + Sync),
) -> Result<VerifyReport, RepoError> {
    let started = Instant::now();
    let mut report = VerifyReport {
        full: opts.full,
        ..Default::default()
    };
    let objects = repo.scan().await?;
    progress(VerifyProgress::Total {
        bytes: objects.iter().map(|o| o.size).sum(),
        objects: objects.len() as u64,
    });

    let mut wal_objects = vec![];
    let mut backup_objects = vec![];
    let mut other = vec![];
    for o in objects {
        match o.kind {
            ObjectKind::Wal(_) | ObjectKind::Summary(_) | ObjectKind::Chunk(_) => {
                wal_objects.push(o)
            }
            ObjectKind::Catalog { .. } | ObjectKind::BackupData { .. } => backup_objects.push(o),
            ObjectKind::Descriptor | ObjectKind::Unknown => other.push(o),
        }
    }

    // Small objects with no structure to check beyond their frame (the descriptor).
    for o in &other {
        read_checked(repo, o, &mut report, progress).await?;
    }

    let catalog = backups::verify_backups(repo, &backup_objects, &mut report, progress).await?;
    wal::verify_wal(repo, &catalog, &wal_objects, opts, &mut report, progress).await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Turns a failed read into a finding, or into the job's error when storage itself failed
/// (a report saying "everything is corrupt" because the network is down would be a lie).
/// Counts `o` as checked and reads it through its frame checksum. A checksum failure or an
/// object gone since the listing is recorded as a problem and gives `None`; any other storage
/// error ends the run, since it says nothing about the repository's health.
async fn read_checked(
    repo: &Repository,
    o: &ScannedObject,
    report: &mut VerifyReport,
    progress: &(dyn Fn(VerifyProgress) + Sync),
) -> Result<Option<Vec<u8>>, RepoError> {
    report.objects += 1;
    report.bytes += o.size;
    progress(VerifyProgress::Checked { bytes: o.size });
    match repo.read_object(o).await {
        Ok(raw) => Ok(Some(raw)),
        Err(e) => record_read_error(report, o.key(), e).map(|()| None),
    }
}

fn record_read_error(report: &mut VerifyReport, key: &str, e: RepoError) -> Result<(), RepoError> {
    match e {
        RepoError::Corrupt { source, .. } => {
            report.problem(
                Severity::Error,
                ProblemKind::CorruptObject,
                Some(key.to_string()),
                format!("object fails its checksum: {source}"),
            );
            Ok(())
        }
        RepoError::Storage(s) if s.is_not_found() => {
            // Listed a moment ago, gone now: deleted while verifying.
            report.problem(
                Severity::Error,
                ProblemKind::CorruptObject,
                Some(key.to_string()),
                "object disappeared while being verified",
            );
            Ok(())
        }
        e => Err(e),
    }
}

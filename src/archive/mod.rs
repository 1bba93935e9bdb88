//! `archive-push` and `archive-get`: the `archive_command` / `restore_command` hooks.
//!
//! The contract with PostgreSQL (docs: "Continuous Archiving and Point-in-Time Recovery",
//! "restore_command"): `archive-push` exits 0 only once the file is durable in the repository;
//! `archive-get` exits 0 with the file in place, 1 when the repository does not have the file
//! (PostgreSQL's normal end of archive), and a status above 125 on any other failure, which makes
//! PostgreSQL abort recovery instead of ending it early and promoting with data missing. The exit
//! codes themselves are chosen at the CLI edge; this module returns typed outcomes and errors.

mod get;
pub mod prefetch;
mod push;

pub use get::{archive_get, GetOutcome};
pub use prefetch::{Prefetch, PrefetchError, WorkerArgs};
pub use push::{archive_push, PushOutcome};

use std::path::PathBuf;

use crate::error::{Classify, Code};
use crate::repo::{PutOutcome, RepoError, Repository, StoredSummary};
use crate::wal::{
    parse_long_header, summarize_segment, SegmentEnd, SegmentTail, WalFileName,
    XLP_FIRST_IS_CONTRECORD,
};
use crate::wal::{PageError, WalFileNameError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    #[error(transparent)]
    Name(#[from] WalFileNameError),
    #[error("cannot read {path}: {source}")]
    ReadInput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid WAL segment: {source}")]
    NotWal { path: PathBuf, source: PageError },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    WriteOutput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the repository has no descriptor yet, so a {name} cannot be checked against a cluster; \
         archive a WAL segment first (or run `pitr backup`)"
    )]
    NeedsDescriptor { name: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl Classify for ArchiveError {
    fn code(&self) -> Code {
        match self {
            ArchiveError::Repo(e) => e.code(),
            ArchiveError::Name(_)
            | ArchiveError::ReadInput { .. }
            | ArchiveError::NotWal { .. }
            | ArchiveError::Empty { .. }
            | ArchiveError::WriteOutput { .. } => Code::Input,
            ArchiveError::NeedsDescriptor { .. } => Code::Conflict,
        }
    }

    fn hint(&self) -> Option<String> {
        let hint = match self {
            ArchiveError::Repo(e) => return e.hint(),
            ArchiveError::Name(_) | ArchiveError::NotWal { .. } | ArchiveError::Empty { .. } => {
                "archive-push takes the path PostgreSQL passes as %p: a WAL segment, .partial, .backup or .history file"
            }
            ArchiveError::ReadInput { .. } => {
                "check the path and that pitr runs as the PostgreSQL OS user"
            }
            ArchiveError::WriteOutput { .. } | ArchiveError::NeedsDescriptor { .. } => {
                return None
            }
        };
        Some(hint.into())
    }
}

/// Stores one completed WAL file, whether it came from `archive-push` or from `pitr stream`.
/// Both paths go through here so that whatever the repository keeps beside a segment is kept
/// for every segment, whatever its source.
///
/// For a full segment that is its summary (see `repo::StoredSummary`), written after the
/// segment so that a summary never describes WAL the repository lacks. Odd records do not fail
/// the call: a summary that ends in corruption is stored and logged as a warning, because
/// PostgreSQL must be able to archive and `pitr verify` reports it. Storage failures do fail
/// it, so that PostgreSQL retries; the retry finds the segment already stored and writes the
/// summary.
pub async fn store_wal_file(
    repo: &Repository,
    name: &WalFileName,
    content: &[u8],
) -> Result<PutOutcome, RepoError> {
    if !matches!(name, WalFileName::Segment { .. }) {
        return repo.put_wal_file(name, content).await;
    }
    // Fetch the previous segment's carry while the segment uploads: both are network waits.
    let (outcome, prev) = tokio::join!(
        repo.put_wal_file(name, content),
        previous_carry(repo, name, content)
    );
    let outcome = outcome?;
    let started = std::time::Instant::now();
    // A carry that does not fit this segment (a damaged summary, a previous segment from
    // another history) is not this segment's fault: summarize it alone then. `verify --full`
    // checks the chain across the boundary from the segments themselves.
    let with_carry = prev
        .as_ref()
        .and_then(|tail| summarize_segment(content, Some(tail)).ok())
        .filter(|s| !matches!(&s.summary.end, SegmentEnd::Corrupt { lsn, .. } if *lsn < s.summary.segment_start));
    let summarized = match with_carry {
        Some(s) => Ok(s),
        None => summarize_segment(content, None),
    };
    let summarized = match summarized {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(file = %name, error = %e, "segment stored, but it cannot be summarized; `pitr verify` will report it");
            return Ok(outcome);
        }
    };
    let elapsed = started.elapsed();
    let s = &summarized.summary;
    if let SegmentEnd::Corrupt { lsn, error } = &s.end {
        tracing::warn!(file = %name, %lsn, %error, "segment stored, but its records are damaged from this LSN; `pitr verify` will report it");
    }
    let stored = StoredSummary::from_summarized(&summarized);
    let summary_outcome = repo.put_segment_summary(name, &stored).await?;
    tracing::debug!(
        file = %name,
        records = s.record_count,
        commits = s.commit_count,
        carried_in = prev.is_some() && s.skipped_continuation.is_none(),
        summarize_us = elapsed.as_micros() as u64,
        outcome = ?summary_outcome,
        "segment summary"
    );
    Ok(outcome)
}

/// The carry stored with the previous segment's summary, when this segment starts with the
/// continuation of a record. Best effort: absent (previous segment not archived yet, first
/// segment of a timeline) or unreadable means this segment skips the continuation.
async fn previous_carry(
    repo: &Repository,
    name: &WalFileName,
    content: &[u8],
) -> Option<SegmentTail> {
    let header = parse_long_header(content).ok()?;
    if header.info & XLP_FIRST_IS_CONTRECORD == 0 {
        return None;
    }
    let seg_size = header.seg_size as u64;
    let segno = name.segno(seg_size)?.checked_sub(1)?;
    let prev = WalFileName::segment(name.timeline(), segno, seg_size);
    match repo.segment_summary(&prev).await {
        Ok(Some(s)) => s.tail(),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(file = %prev, error = %e, "previous summary unreadable; skipping the continuation");
            None
        }
    }
}

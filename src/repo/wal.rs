//! WAL files in the repository: storing a completed file with what is kept beside it, and
//! reading timeline histories.

use std::collections::BTreeMap;

use super::{PutOutcome, RepoError, Repository, StoredSummary};
use crate::wal::{
    parse_history, parse_long_header, summarize_segment, HistoryEntry, SegmentEnd, SegmentTail,
    TimelineId, WalFileName, XLP_FIRST_IS_CONTRECORD,
};

/// Timeline histories by timeline: each timeline's ancestors, oldest first.
pub type Histories = BTreeMap<TimelineId, Vec<HistoryEntry>>;

impl Repository {
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
        &self,
        name: &WalFileName,
        content: &[u8],
    ) -> Result<PutOutcome, RepoError> {
        let repo = self;
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

impl Repository {
    /// The history files of timelines `tlis`, parsed. A timeline whose history file is absent
    /// is left out (the planner reports what it cannot follow); one that is damaged or does not
    /// parse is an error, because guessing a timeline's ancestry could replay the wrong WAL.
    pub async fn histories(&self, tlis: &[TimelineId]) -> Result<Histories, RepoError> {
        let mut out = Histories::new();
        for &tli in tlis {
            let name = WalFileName::History { tli };
            let Some(raw) = self.get_wal_file(&name).await? else {
                continue;
            };
            let entries = parse_history(&raw).map_err(|e| RepoError::BadHistory {
                name: name.to_string(),
                message: e.to_string(),
            })?;
            out.insert(tli, entries);
        }
        Ok(out)
    }
}

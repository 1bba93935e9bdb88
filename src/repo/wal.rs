//! WAL files in the repository: storing a completed file with what is kept beside it, and
//! reading timeline histories.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::object::Payload;
use super::{layout, PutOutcome, RepoError, Repository, StoredSummary};
use crate::storage::StorageError;
use crate::wal::{
    parse_history, parse_long_header, summarize_segment, HistoryEntry, SegmentEnd, SegmentTail,
    Summarized, SummaryError, TimelineId, WalFileName, XLP_FIRST_IS_CONTRECORD,
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
        let summarized = summarize(content, prev.as_ref());
        repo.store_summary(name, &summarized, prev.is_some(), started.elapsed())
            .await?;
        Ok(outcome)
    }

    /// The summary half of [`Self::store_wal_file`], computed but not stored, for a writer that
    /// stores several segments at a time with [`Self::put_wal_file`] (`pitr stream` over a slow
    /// network). `prev` is the previous segment's name and carry when the caller summarized that
    /// segment itself ([`PendingSummary::carry`]); otherwise the carry is read from its stored
    /// summary, as [`Self::store_wal_file`] does. Store it with [`Self::store_pending_summary`]
    /// once the segment is stored.
    pub async fn summarize_wal_segment(
        &self,
        name: &WalFileName,
        content: &[u8],
        prev: Option<(WalFileName, Option<SegmentTail>)>,
    ) -> PendingSummary {
        let expected = previous_segment(name, content);
        let carry = match (prev, expected) {
            // The same test `previous_carry` makes: only a segment that starts with a
            // continuation takes a carry.
            (_, None) => None,
            (Some((p, tail)), Some(e)) if p == e => tail,
            (_, Some(_)) => previous_carry(self, name, content).await,
        };
        let started = std::time::Instant::now();
        let summarized = summarize(content, carry.as_ref());
        PendingSummary {
            name: name.clone(),
            summarized,
            carried: carry.is_some(),
            elapsed: started.elapsed(),
        }
    }

    /// Stores a summary from [`Self::summarize_wal_segment`]; its segment must be stored.
    pub async fn store_pending_summary(&self, p: &PendingSummary) -> Result<(), RepoError> {
        self.store_summary(&p.name, &p.summarized, p.carried, p.elapsed)
            .await
    }

    /// [`Self::store_wal_file`] for a file this process owns (archive-push): compression and
    /// the summary, the two CPU-heavy steps, run at the same time on the blocking pool (the
    /// summary of a segment of small records takes as long as compressing it), while the
    /// segment is written. The order of what is stored is the same: segment, then summary.
    pub async fn store_wal_file_owned(
        &self,
        name: &WalFileName,
        content: Bytes,
    ) -> Result<PutOutcome, RepoError> {
        if !matches!(name, WalFileName::Segment { .. }) {
            return self.put_wal_file(name, &content).await;
        }
        let for_summary = content.clone();
        let summary = async {
            let prev = previous_carry(self, name, &for_summary).await;
            let carried = prev.is_some();
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let s = summarize(&for_summary, prev.as_ref());
                (s, carried, started.elapsed())
            })
            .await
            .expect("summary task panicked")
        };
        let (outcome, (summarized, carried, elapsed)) =
            tokio::join!(self.put_wal_bytes(name, content), summary);
        let outcome = outcome?;
        self.store_summary(name, &summarized, carried, elapsed)
            .await?;
        Ok(outcome)
    }

    /// [`Self::put_wal_file`] with the encoding on the blocking pool.
    async fn put_wal_bytes(
        &self,
        name: &WalFileName,
        content: Bytes,
    ) -> Result<PutOutcome, RepoError> {
        let key = layout::wal_key(name);
        let (codec, k, c) = (self.objects.clone(), key.clone(), content.clone());
        let framed = tokio::task::spawn_blocking(move || codec.encode(&k, &c, Payload::Data))
            .await
            .expect("encode task panicked");
        match self.storage.put_if_absent(&key, Bytes::from(framed)).await {
            Ok(()) => Ok(PutOutcome::Stored),
            Err(StorageError::AlreadyExists { .. }) => {
                self.check_identical(&key, &name.to_string(), &content)
                    .await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the summary of a segment already stored. Odd records are logged, not failed (see
    /// [`Self::store_wal_file`]); a storage failure fails the call.
    async fn store_summary(
        &self,
        name: &WalFileName,
        summarized: &Result<Summarized, SummaryError>,
        carried: bool,
        elapsed: std::time::Duration,
    ) -> Result<(), RepoError> {
        let summarized = match summarized {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %name, error = %e, "segment stored, but it cannot be summarized; `pitr verify` will report it");
                return Ok(());
            }
        };
        let s = &summarized.summary;
        if let SegmentEnd::Corrupt { lsn, error } = &s.end {
            tracing::warn!(file = %name, %lsn, %error, "segment stored, but its records are damaged from this LSN; `pitr verify` will report it");
        }
        let stored = StoredSummary::from_summarized(summarized);
        let summary_outcome = self.put_segment_summary(name, &stored).await?;
        tracing::debug!(
            file = %name,
            records = s.record_count,
            commits = s.commit_count,
            carried_in = carried && s.skipped_continuation.is_none(),
            summarize_us = elapsed.as_micros() as u64,
            outcome = ?summary_outcome,
            "segment summary"
        );
        Ok(())
    }
}

/// The summary of `content`, with the previous segment's carry when it fits. A carry that does
/// not fit this segment (a damaged summary, a previous segment from another history) is not
/// this segment's fault: summarize it alone then. `verify --full` checks the chain across the
/// boundary from the segments themselves.
fn summarize(content: &[u8], prev: Option<&SegmentTail>) -> Result<Summarized, SummaryError> {
    let with_carry = prev
        .and_then(|tail| summarize_segment(content, Some(tail)).ok())
        .filter(|s| !matches!(&s.summary.end, SegmentEnd::Corrupt { lsn, .. } if *lsn < s.summary.segment_start));
    match with_carry {
        Some(s) => Ok(s),
        None => summarize_segment(content, None),
    }
}

/// The segment before `name` when `content` starts with the continuation of a record from it.
fn previous_segment(name: &WalFileName, content: &[u8]) -> Option<WalFileName> {
    let header = parse_long_header(content).ok()?;
    if header.info & XLP_FIRST_IS_CONTRECORD == 0 {
        return None;
    }
    let seg_size = header.seg_size as u64;
    let segno = name.segno(seg_size)?.checked_sub(1)?;
    Some(WalFileName::segment(name.timeline(), segno, seg_size))
}

/// A segment's summary, computed and not yet stored ([`Repository::summarize_wal_segment`]).
pub struct PendingSummary {
    name: WalFileName,
    summarized: Result<Summarized, SummaryError>,
    carried: bool,
    elapsed: std::time::Duration,
}

impl PendingSummary {
    /// The carry the next segment's summary takes, exactly as stored with this summary.
    pub fn carry(&self) -> Option<SegmentTail> {
        let s = self.summarized.as_ref().ok()?;
        StoredSummary::from_summarized(s).tail()
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
    let prev = previous_segment(name, content)?;
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

//! [`SegmentSummary`]: what one archived WAL segment contains, stored as JSON next to it and used
//! to answer "what is recoverable" and to validate `--target-time` without reading WAL again.
//!
//! Attribution rule: a record belongs to the segment holding its **last byte**, because only once
//! that segment is archived can the record be replayed. A record that starts in segment N and
//! ends in N+1 therefore appears in N+1's summary (with an LSN inside N). Segment N cannot
//! validate it; its summary ends with [`SegmentEnd::Continues`] and [`summarize_segment`] returns
//! the record's beginning as a [`SegmentTail`]. Passing that tail when summarizing N+1 (the
//! archiver handles segments in order and keeps it in memory) verifies the record in full —
//! CRC, contents, and the `xl_prev` chain across the boundary. Without the tail (first segment
//! seen, or after a restart), N+1 skips the continuation using `xlp_rem_len` as
//! `XLogFindNextRecord` does, and records that in `skipped_continuation`.
//!
//! Timestamps are `chrono::DateTime<Utc>` (RFC 3339 in JSON), converted from PostgreSQL's
//! microseconds since 2000-01-01; LSNs are PostgreSQL's `X/X` text.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::page::{parse_long_header, PageError, XLP_FIRST_IS_CONTRECORD};
use super::reader::{EndReason, WalError, WalReader};
use super::record::Record;
use super::xact::{
    decode_event, may_be_event, pg_timestamp_to_utc, WalEvent, XactKind, POSTGRES_EPOCH_UNIX_MICROS,
};

use super::{Lsn, TimelineId};

/// Version of the JSON layout, bumped on incompatible changes.
pub const SUMMARY_FORMAT: u32 = 1;

/// A transaction end (commit or abort): what `recovery_target_time` is compared against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XactMark {
    pub lsn: Lsn,
    pub time: DateTime<Utc>,
    pub xid: u32,
    pub kind: XactKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePointMark {
    pub name: String,
    pub time: DateTime<Utc>,
    pub lsn: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMark {
    /// The checkpoint record itself.
    pub lsn: Lsn,
    /// Its redo point: replay from a backup taken at this checkpoint starts here.
    pub redo: Lsn,
    pub shutdown: bool,
}

/// How reading the segment stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SegmentEnd {
    /// The segment was read to its end; WAL goes on at `next_record` (in the next segment, or
    /// here if the record starting there continues into the next segment).
    Continues { next_record: Lsn },
    /// The segment ends with XLOG_SWITCH; the rest is padding.
    Switch,
    /// Never-written space at `lsn` (a partial segment): valid WAL ends there.
    EndOfWal { lsn: Lsn, reason: EndReason },
    /// Corruption at `lsn`; records before it are valid.
    Corrupt { lsn: Lsn, error: String },
}

/// Inclusive bounds of 32-bit xids (what `recovery_target_xid` compares, epoch dropped). Plain
/// min/max: a segment straddling xid wraparound gets a range holding nearly every xid, which only
/// makes [`SegmentSummary::may_end_xid`] say "maybe" more often.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidRange {
    pub min: u32,
    pub max: u32,
}

impl SegmentSummary {
    /// Whether a commit or abort of `xid` may end in this segment. `false` only when the summary
    /// saw every record ending here (no skipped leading continuation, no corruption) and none of
    /// them ended `xid`.
    pub fn may_end_xid(&self, xid: u32) -> bool {
        if self.skipped_continuation.is_some() || matches!(self.end, SegmentEnd::Corrupt { .. }) {
            return true;
        }
        match self.xid_range {
            Some(r) => r.min <= xid && xid <= r.max,
            None => self.commit_count + self.abort_count > 0,
        }
    }
}

/// The first page started with the tail of a record not given to us (`xlp_rem_len` bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedContinuation {
    pub rem_len: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    pub format: u32,
    /// First byte of the segment.
    pub segment_start: Lsn,
    pub segment_size: u64,
    pub pg_major: u32,
    pub system_identifier: u64,
    /// `xlp_tli` of the segment's first page.
    pub timeline: TimelineId,
    /// `xlp_tli` of the last page read (differs after a timeline switch inside the segment).
    pub last_page_timeline: TimelineId,
    /// Set when the leading continuation was skipped rather than verified (no tail given).
    pub skipped_continuation: Option<SkippedContinuation>,
    /// Start of the first record ending in this segment (may lie in the previous segment).
    pub first_record_lsn: Option<Lsn>,
    /// Start of the last complete record.
    pub last_record_lsn: Option<Lsn>,
    /// `EndRecPtr` of the last complete record: replay of this segment reaches this LSN.
    pub end_lsn: Option<Lsn>,
    pub record_count: u64,
    pub commit_count: u64,
    pub abort_count: u64,
    pub first_xact: Option<XactMark>,
    pub last_xact: Option<XactMark>,
    /// Lowest and highest xid of the transaction ends (commits and aborts) in this segment:
    /// where a `recovery_target_xid` can stop. `None` without any, or in a summary written
    /// before this field existed (then `commit_count + abort_count` says which).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid_range: Option<XidRange>,
    pub restore_points: Vec<RestorePointMark>,
    pub checkpoints: Vec<CheckpointMark>,
    pub ends_with_switch: bool,
    pub end: SegmentEnd,
}

/// The beginning of a record that continues into the next segment, plus the chain position,
/// to be handed to [`summarize_segment`] for that next segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentTail {
    /// Where the next record starts.
    pub lsn: Lsn,
    /// Start of the last record read (for the exact `xl_prev` check).
    pub prev: Option<Lsn>,
    /// Bytes from `lsn` to the end of the segment (empty when `lsn` is the next segment start).
    pub bytes: Vec<u8>,
    pub system_identifier: u64,
}

/// Result of [`summarize_segment`].
#[derive(Debug)]
pub struct Summarized {
    pub summary: SegmentSummary,
    /// For the next segment; `None` when the WAL ended or is corrupt.
    pub tail: Option<SegmentTail>,
    /// The typed error behind [`SegmentEnd::Corrupt`].
    pub error: Option<WalError>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SummaryError {
    #[error(transparent)]
    Page(#[from] PageError),
    #[error(transparent)]
    Reader(#[from] WalError),
    #[error("the tail passed in ends at {tail_end}, but this segment starts at {segment_start}")]
    TailMismatch { tail_end: Lsn, segment_start: Lsn },
}

/// Summarizes one whole segment; `prev_tail` is what summarizing the previous segment returned,
/// if available. Errs only when the segment cannot be read at all (bad first page header, wrong
/// size, unrelated tail); corruption further in is reported in the summary.
pub fn summarize_segment(
    segment: &[u8],
    prev_tail: Option<&SegmentTail>,
) -> Result<Summarized, SummaryError> {
    let mut s = SegmentSummarizer::new(segment, segment.len() as u64, prev_tail)?;
    // The reader reads the records in place from `segment`: no copy of the segment (that was
    // the largest transient allocation of `archive-push` and `pitr stream`, and most of the
    // time), only of the record continuing into the next segment.
    s.feed(segment);
    s.finish()
}

/// [`summarize_segment`] over a segment handed in piece by piece (archive-push reads the
/// segment in small blocks and never holds it whole): the same summary, whatever the pieces.
pub struct SegmentSummarizer {
    reader: WalReader,
    s: SegmentSummary,
    last_xact: Option<RawXact>,
    /// Set once reading stopped (end of WAL, corruption): later input is not looked at.
    outcome: Option<Result<Option<super::reader::EndOfWal>, WalError>>,
    fed: u64,
}

impl SegmentSummarizer {
    /// A summarizer for a segment of `len` bytes whose first bytes are `first` (at least its
    /// long page header; not consumed: feed them too).
    pub fn new(
        first: &[u8],
        len: u64,
        prev_tail: Option<&SegmentTail>,
    ) -> Result<SegmentSummarizer, SummaryError> {
        let h = parse_long_header(first)?;
        let seg_size = h.seg_size as u64;
        if len != seg_size {
            return Err(PageError::SizeMismatch {
                len,
                seg_size: h.seg_size,
            }
            .into());
        }
        let seg_start = h.pageaddr;
        if seg_start.0 % seg_size != 0 {
            return Err(PageError::AddressMismatch {
                expected: Lsn(seg_start.0 - seg_start.0 % seg_size),
                found: seg_start,
            }
            .into());
        }
        let mut reader;
        let mut skipped = None;
        match prev_tail {
            Some(t) => {
                let tail_end = Lsn(t.lsn.0 + t.bytes.len() as u64);
                if tail_end != seg_start {
                    return Err(SummaryError::TailMismatch {
                        tail_end,
                        segment_start: seg_start,
                    });
                }
                reader = WalReader::new(seg_size, t.lsn)?;
                if let Some(p) = t.prev {
                    reader.set_prev_record(p);
                }
                reader.set_system_identifier(t.system_identifier);
                reader.feed(&t.bytes);
            }
            None => {
                reader = WalReader::new(seg_size, seg_start)?;
                if h.info & XLP_FIRST_IS_CONTRECORD != 0 {
                    skipped = Some(SkippedContinuation { rem_len: h.rem_len });
                }
            }
        }
        let s = SegmentSummary {
            format: SUMMARY_FORMAT,
            segment_start: seg_start,
            segment_size: seg_size,
            pg_major: super::major_from_magic(h.magic).unwrap_or(0),
            system_identifier: h.system_identifier,
            timeline: h.tli,
            last_page_timeline: h.tli,
            skipped_continuation: skipped,
            first_record_lsn: None,
            last_record_lsn: None,
            end_lsn: None,
            record_count: 0,
            commit_count: 0,
            abort_count: 0,
            first_xact: None,
            last_xact: None,
            xid_range: None,
            restore_points: Vec::new(),
            checkpoints: Vec::new(),
            ends_with_switch: false,
            end: SegmentEnd::Switch, // replaced in `finish`
        };
        Ok(SegmentSummarizer {
            reader,
            s,
            last_xact: None,
            outcome: None,
            fed: 0,
        })
    }

    /// The next bytes of the segment. Once the records end (end of WAL, corruption), the rest
    /// is only counted: the reader would otherwise keep it all.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.fed += bytes.len() as u64;
        if self.outcome.is_some() {
            return;
        }
        let (s, last_xact) = (&mut self.s, &mut self.last_xact);
        let outcome = self.reader.read_from(
            bytes,
            #[inline(always)]
            |rec| add_record(s, last_xact, &rec),
        );
        if !matches!(outcome, Ok(None)) {
            self.outcome = Some(outcome);
        }
    }

    /// For a summarizer started with a carry: `Some(false)` once the carried record turned
    /// out corrupt (before this segment starts), `Some(true)` once it was read, or reading
    /// stopped later; `None` while the record is still being read.
    pub fn carry_verdict(&self) -> Option<bool> {
        match &self.outcome {
            Some(Err(e)) if e.lsn() < self.s.segment_start => Some(false),
            Some(_) => Some(true),
            None if self.reader.next_lsn() >= self.s.segment_start => Some(true),
            None => None,
        }
    }

    /// The summary, once the whole segment was fed (a different length is an error).
    pub fn finish(self) -> Result<Summarized, SummaryError> {
        let SegmentSummarizer {
            reader,
            mut s,
            last_xact,
            outcome,
            fed,
        } = self;
        if fed != s.segment_size {
            return Err(PageError::SizeMismatch {
                len: fed,
                seg_size: s.segment_size as u32,
            }
            .into());
        }
        s.last_xact = last_xact.map(RawXact::mark);
        let mut error = None;
        s.end = match outcome.unwrap_or(Ok(None)) {
            Ok(None) if s.ends_with_switch => SegmentEnd::Switch,
            Ok(None) => SegmentEnd::Continues {
                next_record: reader.next_lsn(),
            },
            Ok(Some(e)) => SegmentEnd::EndOfWal {
                lsn: e.lsn,
                reason: e.reason,
            },
            Err(e) => {
                let end = SegmentEnd::Corrupt {
                    lsn: e.lsn(),
                    error: e.to_string(),
                };
                error = Some(e);
                end
            }
        };
        if let Some(tli) = reader.page_tli() {
            s.last_page_timeline = tli;
        }
        let tail = match s.end {
            SegmentEnd::Continues { .. } | SegmentEnd::Switch => Some(SegmentTail {
                lsn: reader.next_lsn(),
                prev: reader.prev_record(),
                bytes: reader.unconsumed().to_vec(),
                system_identifier: s.system_identifier,
            }),
            _ => None,
        };
        Ok(Summarized {
            summary: s,
            tail,
            error,
        })
    }
}

/// A transaction end whose time is known to convert ([`pg_time_converts`]), not yet converted:
/// the summary keeps only the first and the last, so only those two pay for the calendar.
#[derive(Clone, Copy)]
struct RawXact {
    lsn: Lsn,
    xact_time: i64,
    xid: u32,
    kind: XactKind,
}

impl RawXact {
    fn mark(self) -> XactMark {
        // `unwrap_or_default` is never taken: only times `pg_time_converts` accepts get here.
        XactMark {
            lsn: self.lsn,
            time: pg_timestamp_to_utc(self.xact_time).unwrap_or_default(),
            xid: self.xid,
            kind: self.kind,
        }
    }
}

/// Whether [`pg_timestamp_to_utc`] converts `ts`, without converting: the times chrono can
/// represent form one range (a unit test pins both ends against the conversion itself).
fn pg_time_converts(ts: i64) -> bool {
    let unix =
        DateTime::<Utc>::MIN_UTC.timestamp_micros()..=DateTime::<Utc>::MAX_UTC.timestamp_micros();
    ts.checked_add(POSTGRES_EPOCH_UNIX_MICROS)
        .is_some_and(|micros| unix.contains(&micros))
}

/// Counts one record into the summary and notes what recovery targets need from it; the last
/// transaction end goes to `last_xact` (converted once, at the end of the segment).
#[inline(always)]
fn add_record(s: &mut SegmentSummary, last_xact: &mut Option<RawXact>, rec: &Record<'_>) {
    s.first_record_lsn.get_or_insert(rec.lsn);
    s.last_record_lsn = Some(rec.lsn);
    s.end_lsn = Some(rec.end_lsn);
    s.record_count += 1;
    s.ends_with_switch = false;
    if !may_be_event(rec.xl_rmid, rec.xl_info) {
        return; // nothing decode_event knows: nearly all records
    }
    match decode_event(rec) {
        Some(WalEvent::XactEnd {
            kind,
            xid,
            xact_time,
        }) => {
            if kind.is_commit() {
                s.commit_count += 1;
            } else {
                s.abort_count += 1;
            }
            s.xid_range = Some(match s.xid_range {
                Some(r) => XidRange {
                    min: r.min.min(xid),
                    max: r.max.max(xid),
                },
                None => XidRange { min: xid, max: xid },
            });
            if pg_time_converts(xact_time) {
                let raw = RawXact {
                    lsn: rec.lsn,
                    xact_time,
                    xid,
                    kind,
                };
                if s.first_xact.is_none() {
                    s.first_xact = Some(raw.mark());
                }
                *last_xact = Some(raw);
            }
        }
        Some(WalEvent::RestorePoint { name, rp_time }) => {
            if let Some(time) = pg_timestamp_to_utc(rp_time) {
                s.restore_points.push(RestorePointMark {
                    name,
                    time,
                    lsn: rec.lsn,
                });
            }
        }
        Some(WalEvent::Checkpoint { shutdown, redo, .. }) => {
            s.checkpoints.push(CheckpointMark {
                lsn: rec.lsn,
                redo,
                shutdown,
            });
        }
        Some(WalEvent::Switch) => s.ends_with_switch = true,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same summary and tail whole or in pieces of any size, with and without the carry,
    /// and a wrong total length is refused.
    #[test]
    fn a_segment_fed_in_pieces_summarizes_as_a_whole() {
        let segs = crate::wal::testdata::segments();
        let mut tail: Option<SegmentTail> = None;
        for (_, seg) in &segs {
            for carry in [None, tail.as_ref()] {
                let whole = summarize_segment(seg, carry).unwrap();
                for piece in [1usize, 7, 8192, 100_003, 256 * 1024] {
                    let mut s = SegmentSummarizer::new(seg, seg.len() as u64, carry).unwrap();
                    for p in seg.chunks(piece) {
                        s.feed(p);
                    }
                    let parts = s.finish().unwrap();
                    assert_eq!(parts.summary, whole.summary, "pieces of {piece}");
                    assert_eq!(parts.tail, whole.tail, "pieces of {piece}");
                    assert_eq!(parts.error, whole.error, "pieces of {piece}");
                }
            }
            let mut short = SegmentSummarizer::new(seg, seg.len() as u64, None).unwrap();
            short.feed(&seg[..seg.len() - 1]);
            assert!(short.finish().is_err());
            tail = summarize_segment(seg, tail.as_ref()).unwrap().tail;
        }
    }

    #[test]
    fn pg_time_converts_exactly_when_the_conversion_does() {
        let min = DateTime::<Utc>::MIN_UTC.timestamp_micros() - POSTGRES_EPOCH_UNIX_MICROS;
        let max = DateTime::<Utc>::MAX_UTC.timestamp_micros() - POSTGRES_EPOCH_UNIX_MICROS;
        let edges = [
            i64::MIN,
            min - 1,
            min,
            min + 1,
            -1,
            0,
            1,
            max - 1,
            max,
            max + 1,
            i64::MAX,
        ];
        let steps = (0..200).map(|i| min / 200 * (200 - i) + max / 200 * i);
        for ts in edges.into_iter().chain(steps) {
            assert_eq!(
                pg_time_converts(ts),
                pg_timestamp_to_utc(ts).is_some(),
                "{ts}"
            );
        }
    }
}

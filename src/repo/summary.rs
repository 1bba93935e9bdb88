//! Segment summaries in the repository: one small JSON object beside every archived WAL segment
//! (`<segment key>.summary`), framed and checksummed like every object.
//!
//! A summary is derived data: the segment is the truth, and a missing or unreadable summary can
//! always be rebuilt from it ([`Repository::segment_summary_or_compute`]). That is why storing a
//! summary never refuses WAL: PostgreSQL must be able to archive even a segment whose records we
//! cannot follow, and `pitr verify` reports such a segment instead.
//!
//! Besides the [`SegmentSummary`] itself the object carries the *carry*: the first bytes of the
//! record that continues into the next segment (usually a few hundred bytes). archive-push runs
//! once per segment in a fresh process, so without it every segment would start by skipping the
//! record that crosses its first page boundary, and a commit or restore point written across a
//! segment boundary would be in no summary at all. With it, archiving segment N+1 verifies that
//! record in full (CRC and `xl_prev` across the boundary) and attributes it to N+1.

use serde::{Deserialize, Serialize};

use super::{layout, RepoError, Repository, Result};
use crate::wal::{summarize_segment, Lsn, SegmentSummary, SegmentTail, Summarized, WalFileName};

/// Largest carry stored. A record that starts more than this before the end of its segment is a
/// large one (full-page images, big commit records with many subtransactions); the next segment
/// then skips its continuation and records that it did. 64 KiB bounds the summary object size
/// while covering every ordinary commit, abort and restore point record.
pub const MAX_CARRY_BYTES: usize = 64 << 10;

/// The beginning of a record that continues into the next segment, as stored in a summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carry {
    /// Where the continuing record starts.
    pub lsn: Lsn,
    /// Start of the record before it, for the `xl_prev` check.
    pub prev: Option<Lsn>,
    /// The record's bytes up to the end of the segment, in hex.
    pub bytes_hex: String,
}

/// The summary object: a [`SegmentSummary`] plus the optional [`Carry`].
///
/// In JSON, `system_identifier` is a decimal string, as in `repository.json`: it is above 2^53,
/// where most JSON readers lose precision. Summaries written before that hold a number; both
/// forms are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSummary {
    pub summary: SegmentSummary,
    pub carry: Option<Carry>,
}

/// [`StoredSummary`]'s JSON with `system_identifier` as a number (serde's derived form).
#[derive(Serialize, Deserialize)]
struct SummaryJson<S> {
    #[serde(flatten)]
    summary: S,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    carry: Option<Carry>,
}

const SYSTEM_IDENTIFIER: &str = "system_identifier";

impl Serialize for StoredSummary {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let json = SummaryJson {
            summary: &self.summary,
            carry: self.carry.clone(),
        };
        let mut value = serde_json::to_value(json).map_err(S::Error::custom)?;
        if let Some(id) = value.get_mut(SYSTEM_IDENTIFIER) {
            *id = self.summary.system_identifier.to_string().into();
        }
        value.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StoredSummary {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        let mut value = serde_json::Value::deserialize(d)?;
        if let Some(id) = value.get_mut(SYSTEM_IDENTIFIER) {
            if let Some(text) = id.as_str() {
                let n: u64 = text.parse().map_err(D::Error::custom)?;
                *id = n.into();
            }
        }
        let json: SummaryJson<SegmentSummary> =
            serde_json::from_value(value).map_err(D::Error::custom)?;
        Ok(StoredSummary {
            summary: json.summary,
            carry: json.carry,
        })
    }
}

impl StoredSummary {
    /// Builds the stored form of a summarization result.
    pub fn from_summarized(s: &Summarized) -> StoredSummary {
        let carry = s
            .tail
            .as_ref()
            .filter(|t| t.bytes.len() <= MAX_CARRY_BYTES)
            .map(|t| Carry {
                lsn: t.lsn,
                prev: t.prev,
                bytes_hex: hex::encode(&t.bytes),
            });
        StoredSummary {
            summary: s.summary.clone(),
            carry,
        }
    }

    /// The carry as the tail [`summarize_segment`] takes for the next segment, if it is
    /// well-formed (a damaged one is ignored: the next segment then skips the continuation).
    pub fn tail(&self) -> Option<SegmentTail> {
        let c = self.carry.as_ref()?;
        Some(SegmentTail {
            lsn: c.lsn,
            prev: c.prev,
            bytes: hex::decode(&c.bytes_hex).ok()?,
            system_identifier: self.summary.system_identifier,
        })
    }
}

/// What storing a summary did, for the caller's log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SummaryOutcome {
    Stored,
    /// A summary was there already (identical, or built with more context: it is kept).
    Kept,
}

impl Repository {
    /// Stores the summary of segment `name`, after or at the same time as the segment itself:
    /// readers take a summary only beside its segment, so one whose segment write failed
    /// describes nothing (docs/repository-format.md, "Segment summaries"). An existing summary
    /// is kept: it was
    /// built from the same bytes (the segment is immutable), possibly with the previous
    /// segment's carry that this writer did not have.
    pub async fn put_segment_summary(
        &self,
        name: &WalFileName,
        summary: &StoredSummary,
    ) -> Result<SummaryOutcome> {
        let json = serde_json::to_vec(summary).expect("summary serializes");
        let key = layout::wal_summary_key(name);
        // Whatever summary is there stays (derived data, never replaced): nothing to compare,
        // and so no read, nor a wait for another writer's create of it still in flight.
        Ok(match self.create_derived(&key, &json).await? {
            true => SummaryOutcome::Stored,
            false => SummaryOutcome::Kept,
        })
    }

    /// The stored summary of segment `name`, if there is one. A corrupt object or one that does
    /// not parse is an error: callers decide whether to rebuild or report.
    pub async fn segment_summary(&self, name: &WalFileName) -> Result<Option<StoredSummary>> {
        let key = layout::wal_summary_key(name);
        let Some(raw) = self.get_optional(&key).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| RepoError::BadDescriptor {
                key,
                message: e.to_string(),
            })
    }

    /// The summary of segment `name`: the stored one, or — when it is missing or unreadable
    /// (archived before summaries existed, or a crash between the segment and its summary) —
    /// one computed from the segment itself. `None` when the segment is not held, or when its
    /// first page is not WAL at all (logged; `pitr verify` reports it): either way nothing is
    /// known about it. A segment that fails its own checksum is an error.
    pub async fn segment_summary_or_compute(
        &self,
        name: &WalFileName,
    ) -> Result<Option<SegmentSummary>> {
        match self.segment_summary(name).await {
            Ok(Some(s)) => return Ok(Some(s.summary)),
            Ok(None) => {}
            Err(e @ RepoError::Storage(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(segment = %name, error = %e, "unreadable summary; rebuilding it from the segment")
            }
        }
        let Some(content) = self.get_wal_file(name).await? else {
            return Ok(None);
        };
        match summarize_segment(&content, None) {
            Ok(s) => Ok(Some(s.summary)),
            Err(e) => {
                tracing::warn!(segment = %name, error = %e, "segment cannot be summarized");
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::SegmentEnd;

    #[test]
    fn stored_summary_round_trips_with_carry() {
        let summary = SegmentSummary {
            format: crate::wal::SUMMARY_FORMAT,
            segment_start: Lsn(16 << 20),
            segment_size: 16 << 20,
            pg_major: 15,
            system_identifier: 7,
            timeline: 1,
            last_page_timeline: 1,
            skipped_continuation: None,
            first_record_lsn: Some(Lsn((16 << 20) + 40)),
            last_record_lsn: Some(Lsn((32 << 20) - 100)),
            end_lsn: Some(Lsn((32 << 20) - 40)),
            record_count: 3,
            commit_count: 1,
            abort_count: 0,
            first_xact: None,
            last_xact: None,
            xid_range: Some(crate::wal::XidRange { min: 5, max: 9 }),
            restore_points: vec![],
            checkpoints: vec![],
            ends_with_switch: false,
            end: SegmentEnd::Continues {
                next_record: Lsn((32 << 20) - 40),
            },
        };
        let stored = StoredSummary {
            summary,
            carry: Some(Carry {
                lsn: Lsn((32 << 20) - 40),
                prev: Some(Lsn((32 << 20) - 100)),
                bytes_hex: hex::encode([1u8; 40]),
            }),
        };
        let json = serde_json::to_string(&stored).unwrap();
        let back: StoredSummary = serde_json::from_str(&json).unwrap();
        assert_eq!(back, stored);
        let tail = back.tail().unwrap();
        assert_eq!(tail.bytes.len(), 40);
        assert_eq!(tail.system_identifier, 7);
    }

    /// `system_identifier` is written as a string (exact above 2^53 in any JSON reader) and
    /// read back from a string or, as older repositories hold it, a number.
    #[test]
    fn system_identifier_is_a_string_and_numbers_are_still_read() {
        let s7 = fixture("000000010000000000000007");
        let mut stored = StoredSummary::from_summarized(&summarize_segment(&s7, None).unwrap());
        stored.summary.system_identifier = 7715334408974327312;
        let json: serde_json::Value = serde_json::to_value(&stored).unwrap();
        assert_eq!(json["system_identifier"], "7715334408974327312");
        assert!(json.get("carry").is_some());
        let back: StoredSummary = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, stored);

        let mut old = json;
        old["system_identifier"] = serde_json::Value::from(7715334408974327312u64);
        let text = serde_json::to_string(&old).unwrap();
        assert!(text.contains("\"system_identifier\":7715334408974327312"));
        let back: StoredSummary = serde_json::from_str(&text).unwrap();
        assert_eq!(back, stored);

        old["system_identifier"] = "not a number".into();
        assert!(serde_json::from_value::<StoredSummary>(old).is_err());
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/src/wal/testdata/pg15/{name}.zst",
            env!("CARGO_MANIFEST_DIR")
        );
        zstd::decode_all(&std::fs::read(path).unwrap()[..]).unwrap()
    }

    /// The carry stored with segment 7's summary lets segment 8 verify the record crossing the
    /// boundary, exactly as if the tail had been kept in memory.
    #[test]
    fn carry_verifies_the_record_across_a_real_segment_boundary() {
        let s7 = fixture("000000010000000000000007");
        let s8 = fixture("000000010000000000000008");
        let first = summarize_segment(&s7, None).unwrap();
        let stored = StoredSummary::from_summarized(&first);
        let json = serde_json::to_vec(&stored).unwrap();
        let back: StoredSummary = serde_json::from_slice(&json).unwrap();
        let via_carry = summarize_segment(&s8, back.tail().as_ref()).unwrap();
        let direct = summarize_segment(&s8, first.tail.as_ref()).unwrap();
        assert_eq!(via_carry.summary, direct.summary);
        assert!(via_carry.summary.skipped_continuation.is_none());
        let alone = summarize_segment(&s8, None).unwrap();
        if alone.summary.skipped_continuation.is_some() {
            // The crossing record is counted only when carried.
            assert_eq!(
                via_carry.summary.record_count,
                alone.summary.record_count + 1
            );
        }
    }

    /// Damaged carries (as a corrupt or hostile summary could hold) and damaged segments give
    /// errors or Corrupt summaries, never panics.
    #[test]
    fn mutated_carries_and_segments_never_panic() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let s7 = fixture("000000010000000000000007");
        let s8 = fixture("000000010000000000000008");
        let tail = summarize_segment(&s7, None).unwrap().tail.unwrap();
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut t = tail.clone();
            match rng.gen_range(0..4) {
                0 if !t.bytes.is_empty() => {
                    let at = rng.gen_range(0..t.bytes.len());
                    t.bytes[at] ^= 1 << rng.gen_range(0..8);
                }
                1 => t.bytes.truncate(rng.gen_range(0..=t.bytes.len())),
                2 => t.lsn = Lsn(t.lsn.0.wrapping_add(rng.gen_range(1..64))),
                _ => t.prev = Some(Lsn(rng.gen())),
            }
            let mut seg = s8.clone();
            if rng.gen_bool(0.5) {
                let at = rng.gen_range(0..seg.len());
                seg[at] ^= 1 << rng.gen_range(0..8);
            }
            let _ = summarize_segment(&seg, Some(&t));
            let _ = summarize_segment(&seg, None);
        }
    }
}

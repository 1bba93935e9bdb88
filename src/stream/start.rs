//! Where streaming starts. Pure: decided from the repository's inventory, the server's
//! timeline history and the slot, so that every case is a unit test.
//!
//! Order of preference:
//! 1. the end of the WAL already in the repository on the server's timeline lineage (the
//!    segment after the last stored one): no gap, nothing shipped twice;
//! 2. the slot's `restart_lsn`: the oldest WAL the server still guarantees;
//! 3. the server's current position, with a warning that earlier WAL is not covered.
//!
//! Streaming always starts at a segment boundary, so that every stored segment is whole; the
//! caller then skips forward over chunks already stored for that segment.

use crate::repo::WalInventory;
use crate::wal::{HistoryEntry, Lsn, TimelineId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartSource {
    /// After the last segment stored in the repository.
    Repository,
    /// The slot's restart_lsn.
    Slot,
    /// The server's current WAL position: WAL before it is not in the repository.
    ServerPosition,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartPoint {
    pub tli: TimelineId,
    /// Start of a segment.
    pub lsn: Lsn,
    pub source: StartSource,
}

/// The timeline that wrote `lsn`, according to the server's history (oldest ancestor first).
pub fn timeline_of(lsn: Lsn, history: &[HistoryEntry], server_tli: TimelineId) -> TimelineId {
    history
        .iter()
        .find(|e| lsn < e.switchpoint)
        .map_or(server_tli, |e| e.tli)
}

pub fn choose_start(
    inv: &WalInventory,
    history: &[HistoryEntry],
    server_tli: TimelineId,
    slot_restart: Option<Lsn>,
    server_pos: Lsn,
    seg_size: u64,
) -> StartPoint {
    let seg_start = |lsn: Lsn| Lsn::from_segno(lsn.segno(seg_size), seg_size);
    let lineage = history
        .iter()
        .map(|e| e.tli)
        .chain(std::iter::once(server_tli));
    let repo_end = lineage
        .filter_map(|t| {
            let last = inv.timelines.get(&t)?.ranges.last()?.1;
            Some(Lsn::from_segno(last + 1, seg_size))
        })
        .max();
    let (lsn, source) = match (repo_end, slot_restart) {
        (Some(end), _) => (end, StartSource::Repository),
        (None, Some(r)) => (seg_start(r), StartSource::Slot),
        (None, None) => (seg_start(server_pos), StartSource::ServerPosition),
    };
    StartPoint {
        tli: timeline_of(lsn, history, server_tli),
        lsn,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::WalFileName;

    const SEG: u64 = 16 << 20;

    fn inv(names: &[&str]) -> WalInventory {
        WalInventory::from_names(names.iter().map(|n| WalFileName::parse(n).unwrap()), SEG)
    }

    fn hist(entries: &[(TimelineId, u64)]) -> Vec<HistoryEntry> {
        entries
            .iter()
            .map(|&(tli, sw)| HistoryEntry {
                tli,
                switchpoint: Lsn(sw),
                reason: String::new(),
            })
            .collect()
    }

    #[test]
    fn repository_end_wins() {
        let i = inv(&["000000010000000000000002", "000000010000000000000003"]);
        let s = choose_start(&i, &[], 1, Some(Lsn(SEG)), Lsn(SEG * 9), SEG);
        assert_eq!(
            s,
            StartPoint {
                tli: 1,
                lsn: Lsn(SEG * 4),
                source: StartSource::Repository
            }
        );
    }

    #[test]
    fn slot_then_server_position_rounded_to_segment_start() {
        let s = choose_start(
            &inv(&[]),
            &[],
            1,
            Some(Lsn(SEG * 2 + 40)),
            Lsn(SEG * 9),
            SEG,
        );
        assert_eq!((s.lsn, s.source), (Lsn(SEG * 2), StartSource::Slot));
        let s = choose_start(&inv(&[]), &[], 1, None, Lsn(SEG * 9 + 5), SEG);
        assert_eq!(
            (s.lsn, s.source),
            (Lsn(SEG * 9), StartSource::ServerPosition)
        );
    }

    #[test]
    fn old_timeline_is_finished_before_the_new_one() {
        // Repository has timeline 1 up to segment 2; the server is on timeline 2 since 0/3000158.
        let i = inv(&["000000010000000000000002"]);
        let h = hist(&[(1, SEG * 3 + 0x158)]);
        let s = choose_start(&i, &h, 2, None, Lsn(SEG * 5), SEG);
        assert_eq!((s.tli, s.lsn), (1, Lsn(SEG * 3)));
        // Once the repository has timeline 2's copy of segment 3, continue on 2.
        let i = inv(&["000000010000000000000002", "000000020000000000000003"]);
        let s = choose_start(&i, &h, 2, None, Lsn(SEG * 5), SEG);
        assert_eq!((s.tli, s.lsn), (2, Lsn(SEG * 4)));
    }

    #[test]
    fn timelines_outside_the_lineage_are_ignored() {
        let i = inv(&["000000030000000000000009"]);
        let s = choose_start(&i, &[], 1, Some(Lsn(SEG)), Lsn(SEG * 2), SEG);
        assert_eq!(s.source, StartSource::Slot);
    }
}

//! Where streaming starts. Pure: decided from the repository's inventory, the server's
//! timeline history and the slot, so that every case is a unit test.
//!
//! Order of preference:
//! 1. the end of the WAL already in the repository on the server's timeline lineage (the
//!    segment after the last stored one): no gap, nothing shipped twice; or, when a stream
//!    killed mid-upload left a hole just before that end, the hole;
//! 2. the slot's `restart_lsn`: the oldest WAL the server still guarantees;
//! 3. the server's current position, with a warning that earlier WAL is not covered.
//!
//! Streaming always starts at a segment boundary, so that every stored segment is whole; the
//! caller then skips forward over chunks already stored for that segment.

use crate::repo::WalInventory;
use crate::wal::{HistoryEntry, Lsn, SegNo, TimelineId};

/// How many segments before the repository's end a stream killed mid-upload can leave a hole:
/// one per job in flight (each stores at most one segment), and the one being filled.
const REORDER_WINDOW: u64 = super::uploader::IN_FLIGHT as u64 + 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartSource {
    /// After the last segment stored in the repository.
    Repository,
    /// At a segment missing shortly before the repository's end (see [`hole_window`]).
    Hole,
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
    /// WAL the repository holds of an ancestor timeline past the point where the server's
    /// timeline forked from it: kept, but on no timeline the server follows.
    pub off_lineage: Option<OffLineage>,
}

/// A range of an ancestor timeline stored in the repository that the server's history does not
/// continue: the stream was ahead of the server that was promoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffLineage {
    pub tli: TimelineId,
    /// The switch point: the new timeline's WAL starts here.
    pub from: Lsn,
    /// End of the WAL of `tli` the repository holds.
    pub to: Lsn,
}

/// The timeline that wrote `lsn`, according to the server's history (oldest ancestor first).
pub fn timeline_of(lsn: Lsn, history: &[HistoryEntry], server_tli: TimelineId) -> TimelineId {
    history
        .iter()
        .find(|e| lsn < e.switchpoint)
        .map_or(server_tli, |e| e.tli)
}

/// Where ancestor timeline `tli` ended, and the timeline that continued it; `None` for the
/// server's own timeline (or one not in its history).
pub fn switch_of(
    tli: TimelineId,
    history: &[HistoryEntry],
    server_tli: TimelineId,
) -> Option<(Lsn, TimelineId)> {
    let i = history.iter().position(|e| e.tli == tli)?;
    let next = history.get(i + 1).map_or(server_tli, |e| e.tli);
    Some((history[i].switchpoint, next))
}

/// Where the repository's WAL on the server's lineage ends, and on which timeline streaming
/// continues. An ancestor whose switch segment the repository holds (whole, or as `.partial`)
/// is complete: what follows is the next timeline's copy of that segment, whatever the
/// repository holds of the ancestor after the switch point.
fn repository_end(
    inv: &WalInventory,
    history: &[HistoryEntry],
    server_tli: TimelineId,
    seg_size: u64,
) -> Option<(TimelineId, Lsn, Option<OffLineage>)> {
    let ends = history
        .iter()
        .map(|e| (e.tli, Some(e.switchpoint)))
        .chain(std::iter::once((server_tli, None)));
    let mut best: Option<(TimelineId, Lsn, Option<OffLineage>)> = None;
    for (t, switch) in ends {
        let Some(wal) = inv.timelines.get(&t) else {
            continue;
        };
        let last = wal.ranges.last().map(|r| r.1);
        let end = last.map(|l| Lsn::from_segno(l + 1, seg_size));
        let candidate = match (switch, last) {
            (Some(sw), _)
                if last >= Some(sw.segno(seg_size))
                    || wal.partial.contains(&sw.segno(seg_size)) =>
            {
                let to = end.filter(|e| *e > sw);
                let off = to.map(|to| OffLineage {
                    tli: t,
                    from: sw,
                    to,
                });
                let seg = Lsn::from_segno(sw.segno(seg_size), seg_size);
                let next = switch_of(t, history, server_tli).map_or(server_tli, |s| s.1);
                (next, seg, off)
            }
            (_, Some(_)) => (t, end.expect("a last segment"), None),
            (_, None) => continue,
        };
        if best.as_ref().is_none_or(|b| candidate.1 >= b.1) {
            let off = candidate.2.or(best.and_then(|b| b.2));
            best = Some((candidate.0, candidate.1, off));
        }
    }
    best
}

/// The segments before `sp` where a kill can have left a hole, in order, each with the timeline
/// whose copy of it counts (the copy of a timeline's switch segment that holds all of it is the
/// next timeline's); from `bound` (the slot's `restart_lsn`) but within [`REORDER_WINDOW`].
/// Empty when `sp` does not continue the repository.
///
/// The uploader stores a few jobs at once and publishes their ends in order, so the flush
/// feedback (and with it the slot) never passes a hole; but a stream killed mid-way can leave a
/// later segment stored and an earlier one not. Everything before the slot's position is
/// durable; after it, "the end of the repository" may lie beyond a hole, and starting there
/// would skip that segment for good.
///
/// Such holes lie within [`REORDER_WINDOW`] segments of the end. Further back, a segment
/// missing after the slot was deleted on purpose (expire, while the slot lagged behind):
/// streaming it again would only bring back what retention removed. PostgreSQL 13/14 do not
/// tell the slot's position: there the window and the repository's first segment bound the
/// search, and should the server no longer have the hole's WAL, START_REPLICATION says so and
/// the stream exits naming the range.
fn hole_window(
    sp: &StartPoint,
    history: &[HistoryEntry],
    server_tli: TimelineId,
    bound: SegNo,
    seg_size: u64,
) -> Vec<(TimelineId, SegNo)> {
    if !matches!(sp.source, StartSource::Repository | StartSource::Hole) {
        return vec![];
    }
    let end_seg = sp.lsn.segno(seg_size);
    let from = bound.max(end_seg.saturating_sub(REORDER_WINDOW));
    (from..end_seg)
        .map(|s| {
            let last_byte = Lsn(Lsn::from_segno(s + 1, seg_size).0 - 1);
            (timeline_of(last_byte, history, server_tli), s)
        })
        .collect()
}

/// With the slot's position known, the segments a mirror must hold for streaming to start at
/// `sp` (see [`hole_window`]): asking for these few (HEAD requests) replaces listing the
/// mirror's whole `wal/`.
pub fn mirror_window(
    sp: &StartPoint,
    history: &[HistoryEntry],
    server_tli: TimelineId,
    slot_restart: Lsn,
    seg_size: u64,
) -> Vec<(TimelineId, SegNo)> {
    hole_window(
        sp,
        history,
        server_tli,
        slot_restart.segno(seg_size),
        seg_size,
    )
}

/// `sp`, or the first segment of `window` (see [`hole_window`]) that `held` says is missing.
pub fn back_to_missing(
    sp: StartPoint,
    window: &[(TimelineId, SegNo)],
    held: &[bool],
    seg_size: u64,
) -> StartPoint {
    match window.iter().zip(held).find(|(_, &h)| !h) {
        Some((&(tli, s), _)) => StartPoint {
            tli,
            lsn: Lsn::from_segno(s, seg_size),
            source: StartSource::Hole,
            ..sp
        },
        None => sp,
    }
}

/// `sp`, or the first hole before it that `inv` shows: the main repository's inventory, or a
/// mirror's (the stream stores every job in each, so a kill can leave a hole in either).
pub fn back_to_hole(
    sp: StartPoint,
    inv: &WalInventory,
    history: &[HistoryEntry],
    server_tli: TimelineId,
    slot_restart: Option<Lsn>,
    seg_size: u64,
) -> StartPoint {
    // Without the slot's position, only a segment between stored ones is known to be a hole.
    let first_stored = || {
        let firsts = inv.timelines.values().filter_map(|t| t.ranges.first());
        firsts.map(|r| r.0).min().unwrap_or(sp.lsn.segno(seg_size))
    };
    let bound = slot_restart.map_or_else(first_stored, |r| r.segno(seg_size));
    let window = hole_window(&sp, history, server_tli, bound, seg_size);
    let held: Vec<bool> = window.iter().map(|&(t, s)| inv.covers(t, s, s)).collect();
    back_to_missing(sp, &window, &held, seg_size)
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
    if let Some((tli, lsn, off_lineage)) = repository_end(inv, history, server_tli, seg_size) {
        let end = StartPoint {
            tli,
            lsn,
            source: StartSource::Repository,
            off_lineage,
        };
        return back_to_hole(end, inv, history, server_tli, slot_restart, seg_size);
    }
    let (lsn, source) = match slot_restart {
        Some(r) => (seg_start(r), StartSource::Slot),
        None => (seg_start(server_pos), StartSource::ServerPosition),
    };
    StartPoint {
        tli: timeline_of(lsn, history, server_tli),
        lsn,
        source,
        off_lineage: None,
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
        let s = choose_start(&i, &[], 1, Some(Lsn(SEG * 3)), Lsn(SEG * 9), SEG);
        assert_eq!(
            s,
            StartPoint {
                tli: 1,
                lsn: Lsn(SEG * 4),
                source: StartSource::Repository,
                off_lineage: None,
            }
        );
    }

    /// A stream killed while several uploads were in flight left segment 3 stored and segment
    /// 2 not (the slot, fed only in order, is still in segment 2): streaming starts at the hole,
    /// not after segment 3, else segment 2 would never be stored.
    #[test]
    fn a_hole_after_the_slot_is_streamed_again() {
        let i = inv(&["000000010000000000000001", "000000010000000000000003"]);
        let s = choose_start(&i, &[], 1, Some(Lsn(SEG * 2 + 40)), Lsn(SEG * 9), SEG);
        assert_eq!(
            (s.tli, s.lsn, s.source),
            (1, Lsn(SEG * 2), StartSource::Hole)
        );
        // A hole before the slot cannot be filled from the server: the end of the repository.
        let s = choose_start(&i, &[], 1, Some(Lsn(SEG * 3 + 40)), Lsn(SEG * 9), SEG);
        assert_eq!(s.lsn, Lsn(SEG * 4));
        // Nor one further back than uploads in flight reach (expire removed it).
        let far: Vec<String> = (0x20..0x40)
            .map(|n| format!("0000000100000000{n:08X}"))
            .collect();
        let names: Vec<&str> = ["000000010000000000000001"]
            .into_iter()
            .chain(far.iter().map(|s| s.as_str()))
            .collect();
        let s = choose_start(&inv(&names), &[], 1, Some(Lsn(SEG * 2)), Lsn(SEG * 90), SEG);
        assert_eq!(s.lsn, Lsn(SEG * 0x40));
        // Without a slot position (PostgreSQL 13/14) the window alone decides.
        let s = choose_start(&i, &[], 1, None, Lsn(SEG * 9), SEG);
        assert_eq!((s.lsn, s.source), (Lsn(SEG * 2), StartSource::Hole));
    }

    /// The hole is the switch segment: timeline 2's copy of it holds all of its WAL.
    #[test]
    fn a_hole_at_the_switch_segment_is_streamed_on_the_new_timeline() {
        let i = inv(&[
            "000000010000000000000002",
            "000000010000000000000003.partial",
            "000000020000000000000004",
        ]);
        let h = hist(&[(1, SEG * 3 + 0x158)]);
        let s = choose_start(&i, &h, 2, Some(Lsn(SEG * 3 + 0x100)), Lsn(SEG * 9), SEG);
        assert_eq!((s.tli, s.lsn), (2, Lsn(SEG * 3)));
    }

    /// A mirror asked segment by segment (HEAD, with the slot's position) finds the same start
    /// as its full inventory would: every subset of stored segments around the end, with and
    /// without a timeline switch in the window, every slot position and start.
    #[test]
    fn a_mirrors_window_finds_what_its_inventory_finds() {
        let h = hist(&[(1, SEG * 6 + 0x158)]);
        let seg = |tli: TimelineId, s: u64| WalFileName::segment(tli, s, SEG).to_string();
        for history in [vec![], h] {
            let server_tli = if history.is_empty() { 1 } else { 2 };
            for stored in 0u32..(1 << 8) {
                let names: Vec<String> = (1..=8u64)
                    .filter(|s| stored & (1 << (s - 1)) != 0)
                    .map(|s| seg(timeline_of(Lsn(SEG * (s + 1) - 1), &history, server_tli), s))
                    .collect();
                let i = WalInventory::from_names(
                    names.iter().map(|n| WalFileName::parse(n).unwrap()),
                    SEG,
                );
                for slot in 1..=9u64 {
                    for end in 2..=9u64 {
                        let sp = StartPoint {
                            tli: timeline_of(Lsn(SEG * end), &history, server_tli),
                            lsn: Lsn(SEG * end),
                            source: StartSource::Repository,
                            off_lineage: None,
                        };
                        let slot = Lsn(SEG * slot + 8);
                        let by_inventory =
                            back_to_hole(sp, &i, &history, server_tli, Some(slot), SEG);
                        let window = mirror_window(&sp, &history, server_tli, slot, SEG);
                        let held: Vec<bool> =
                            window.iter().map(|&(t, s)| i.covers(t, s, s)).collect();
                        let by_heads = back_to_missing(sp, &window, &held, SEG);
                        assert_eq!(
                            by_heads, by_inventory,
                            "stored {stored:08b} slot {slot} end {end}"
                        );
                    }
                }
            }
        }
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

    /// The repository holds timeline 1 past the switch point (the stream was ahead of the
    /// standby that was promoted): keep it, continue on timeline 2 at its copy of the switch
    /// segment, and name the range of timeline 1 that timeline 2 does not continue.
    #[test]
    fn ahead_of_the_switch_point_continues_on_the_new_timeline() {
        let i = inv(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
        ]);
        let h = hist(&[(1, SEG * 3 + 0x158)]);
        let s = choose_start(&i, &h, 2, None, Lsn(SEG * 5), SEG);
        assert_eq!((s.tli, s.lsn), (2, Lsn(SEG * 3)));
        assert_eq!(
            s.off_lineage,
            Some(OffLineage {
                tli: 1,
                from: Lsn(SEG * 3 + 0x158),
                to: Lsn(SEG * 5)
            })
        );
        // Timeline 2's own segments, once stored, decide; the range stays reported.
        let i = inv(&["000000010000000000000004", "000000020000000000000003"]);
        let s = choose_start(&i, &h, 2, None, Lsn(SEG * 5), SEG);
        assert_eq!((s.tli, s.lsn), (2, Lsn(SEG * 4)));
        assert_eq!(s.off_lineage.map(|o| o.to), Some(Lsn(SEG * 5)));
    }

    /// A `.partial` of the switch segment means timeline 1 is complete in the repository.
    #[test]
    fn a_partial_of_the_switch_segment_completes_the_old_timeline() {
        let i = inv(&[
            "000000010000000000000002",
            "000000010000000000000003.partial",
        ]);
        let h = hist(&[(1, SEG * 3 + 0x158), (2, SEG * 7)]);
        let s = choose_start(&i, &h, 3, None, Lsn(SEG * 9), SEG);
        assert_eq!((s.tli, s.lsn, s.off_lineage), (2, Lsn(SEG * 3), None));
        assert_eq!(switch_of(2, &h, 3), Some((Lsn(SEG * 7), 3)));
        assert_eq!(switch_of(3, &h, 3), None);
    }
}

//! WAL checks: segments (frame, first page header, summary, and with `--full` every record),
//! continuity per timeline, the WAL each backup needs, and timeline histories.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use futures::StreamExt;

use super::{
    read_checked, record_read_error, ProblemKind, Severity, VerifyOptions, VerifyProgress,
    VerifyReport,
};
use crate::codec::BLOCK_LEN;
use crate::recovery::{Catalog, RestoreRequest, WalFacts};
use crate::repo::Histories;
use crate::repo::{
    wal_file_key, BackupInfo, ChunkRef, FetchedObject, ObjectKind, RepoError, Repository,
    ScannedObject, StoredSummary, WalInventory,
};
use crate::storage::BufferPool;
use crate::wal::{
    parse_history, parse_long_header, validate_segment_start, Lsn, SegNo, SegmentEnd,
    SegmentSummarizer, SegmentSummary, SegmentTail, Summarized, SummaryError, TimelineId,
    WalFileName, SIZE_OF_LONG_PAGE_HEADER,
};

/// Segments fetched ahead of the one being decoded and walked: decoding a segment and walking
/// its records go block by block on the blocking pool, while the runtime thread keeps the reads
/// going. Each holds one stored object (its lz4 frame), so memory stays at a few of them.
const SEGMENTS_IN_FLIGHT: usize = 2;

/// A segment and what the listing says about it.
struct SegmentObject<'a> {
    tli: TimelineId,
    segno: SegNo,
    name: WalFileName,
    object: &'a ScannedObject,
    summary: Option<&'a ScannedObject>,
}

pub(super) async fn verify_wal(
    repo: &Repository,
    catalog: &[BackupInfo],
    objects: &[ScannedObject],
    opts: VerifyOptions,
    report: &mut VerifyReport,
    progress: &(dyn Fn(VerifyProgress) + Sync),
) -> Result<(), RepoError> {
    let started = Instant::now();
    let seg_size = repo.descriptor().wal_segment_size;
    let summaries: HashMap<&WalFileName, &ScannedObject> = objects
        .iter()
        .filter_map(|o| match &o.kind {
            ObjectKind::Summary(n) => Some((n, o)),
            _ => None,
        })
        .collect();
    let mut segments: Vec<SegmentObject> = vec![];
    let mut histories_keys = vec![];
    let mut others = vec![];
    let mut chunks = vec![];
    let mut names = vec![];
    for o in objects {
        match &o.kind {
            ObjectKind::Wal(name @ WalFileName::Segment { .. }) => {
                names.push(name.clone());
                segments.push(SegmentObject {
                    tli: name.timeline(),
                    segno: name.segno(seg_size).expect("segments have a number"),
                    name: name.clone(),
                    object: o,
                    summary: summaries.get(name).copied(),
                });
            }
            ObjectKind::Wal(name @ WalFileName::History { tli }) => {
                names.push(name.clone());
                histories_keys.push((*tli, o));
            }
            ObjectKind::Wal(name) => {
                names.push(name.clone());
                others.push(o);
            }
            // Checked with its segment; an orphaned summary is harmless and only frame-checked.
            ObjectKind::Summary(n) if names_segment(objects, n) => {}
            ObjectKind::Chunk(c) => chunks.push((c, o)),
            _ => others.push(o),
        }
    }
    segments.sort_by_key(|s| (s.tli, s.segno));
    let inv = WalInventory::from_names(names.iter().cloned(), seg_size);

    for o in others {
        read_checked(repo, o, report, progress).await?;
    }
    verify_chunks(repo, &chunks, report, progress).await?;

    let histories = verify_histories(repo, &histories_keys, &inv, report, progress).await?;
    let Segments { summaries, broken } =
        verify_segments(repo, &segments, opts, report, progress).await?;
    report.wal_seconds = started.elapsed().as_secs_f64();
    // What recovery can actually use: a damaged segment stops replay like a missing one.
    let usable_names = names.into_iter().filter(|n| match n {
        WalFileName::Segment { .. } => !broken.contains(&(
            n.timeline(),
            n.segno(seg_size).expect("segments have a number"),
        )),
        _ => true,
    });
    let inv = WalInventory::from_names(usable_names, seg_size);

    // Windows on the latest timeline, from what the summaries say.
    let recoverable = Catalog {
        backups: catalog.to_vec(),
        inventory: inv,
        histories,
        seg_size,
        streamed: Default::default(),
    };
    if let Ok(needs) = recoverable.summary_needs(&RestoreRequest::latest()) {
        let mut facts = WalFacts::default();
        for run in &needs.runs {
            for n in run.first..=run.last {
                let name = needs.segment_name(n);
                if let Some(s) = summaries.get(&(name.timeline(), n)) {
                    facts.segments.insert(n, s.clone());
                }
            }
        }
        if let Ok(w) = recoverable.windows_with(&facts) {
            report.windows = w;
        }
    }

    check_continuity(
        catalog,
        &recoverable.inventory,
        &summaries,
        &broken,
        seg_size,
        report,
    );
    Ok(())
}

/// Whether the listing holds segment `name` itself.
fn names_segment(objects: &[ScannedObject], name: &WalFileName) -> bool {
    objects
        .iter()
        .any(|o| matches!(&o.kind, ObjectKind::Wal(n) if n == name))
}

/// Frame-checks the chunks of segments not stored whole. A chunk that vanished since the
/// listing was deleted because its segment was stored whole meanwhile, as designed (a stream
/// is writing): the segment is read instead, never reported as damage.
async fn verify_chunks(
    repo: &Repository,
    chunks: &[(&ChunkRef, &ScannedObject)],
    report: &mut VerifyReport,
    progress: &(dyn Fn(VerifyProgress) + Sync),
) -> Result<(), RepoError> {
    let mut landed: BTreeSet<&WalFileName> = BTreeSet::new();
    for (c, o) in chunks {
        if landed.contains(&c.segment) {
            continue;
        }
        report.objects += 1;
        report.bytes += o.size;
        progress(VerifyProgress::Checked { bytes: o.size });
        match repo.read_object(o).await {
            Ok(_) => {}
            Err(RepoError::Storage(e)) if e.is_not_found() => {
                match repo.get_wal_file(&c.segment).await {
                    Ok(Some(_)) => {
                        tracing::debug!(segment = %c.segment, "chunks gone: the segment landed while verifying");
                        landed.insert(&c.segment);
                    }
                    Ok(None) => record_read_error(report, o.key(), RepoError::Storage(e))?,
                    Err(e) => record_read_error(report, &wal_file_key(&c.segment), e)?,
                }
            }
            Err(e) => record_read_error(report, o.key(), e)?,
        }
    }
    Ok(())
}

/// What reading the segments established.
#[derive(Default)]
struct Segments {
    /// Summaries, stored or computed, by (timeline, segment).
    summaries: BTreeMap<(TimelineId, SegNo), SegmentSummary>,
    /// Segments replay cannot get through: unreadable, not WAL, or with damaged records.
    broken: BTreeSet<(TimelineId, SegNo)>,
}

/// Reads every segment (and its summary); with `--full` walks every record, carrying the tail
/// from one segment to the next on the same timeline.
async fn verify_segments(
    repo: &Repository,
    segments: &[SegmentObject<'_>],
    opts: VerifyOptions,
    report: &mut VerifyReport,
    progress: &(dyn Fn(VerifyProgress) + Sync),
) -> Result<Segments, RepoError> {
    let mut out = Segments::default();
    // Buffers of segments (a frame as read from a local directory, or content fetched decoded),
    // handed back once checked and reused by the next fetches: no fresh memory to fault in per
    // segment (on insert WAL that was a quarter of the system time and half the peak RSS).
    let pool = BufferPool::default();
    let pool = &pool;
    let mut fetched = futures::stream::iter(segments)
        .map(|s| async move {
            let object = repo.fetch_object(s.object, pool.take()).await;
            let summary = match s.summary {
                Some(o) => Some(read_summary(repo, o).await),
                None => None,
            };
            (s, object, summary)
        })
        .buffered(SEGMENTS_IN_FLIGHT);

    // Under `taskset -c 0` this is 1: then one thread decodes and walks.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut tail: Option<(TimelineId, SegNo, SegmentTail)> = None;
    let mut next = fetched.next().await;
    while let Some((s, object, stored)) = next {
        let prev = match tail.take() {
            Some((t, n, tl)) if opts.full && t == s.tli && n + 1 == s.segno => Some(tl),
            _ => None,
        };
        let walked = match object {
            Ok(object) => {
                // Decoding, and with --full the record walk over each decoded block while it
                // is in the cache, run on the blocking pool, so that the runtime thread keeps
                // the next segments' reads going meanwhile.
                let full = opts.full;
                let walk = tokio::task::spawn_blocking(move || {
                    let walked = walk_object(&object, prev, full, cpus);
                    (walked, object)
                });
                let (walked, following) = futures::join!(walk, fetched.next());
                next = following;
                let (walked, object) = walked.expect("record walk panicked");
                object.recycle(pool);
                walked
            }
            // Not read: checked as an object that does not decode.
            Err(e) => {
                next = fetched.next().await;
                Walked {
                    decoded: Err(e),
                    head: Vec::new(),
                    summarized: None,
                }
            }
        };
        let checked = check_walked(s, walked, stored, opts, &mut tail, &mut out, report);
        progress(VerifyProgress::Checked {
            bytes: s.object.size,
        });
        checked?;
    }
    Ok(out)
}

/// What decoding a segment's object (and with `--full` walking its records) found.
struct Walked {
    /// The content length, or why the object cannot be decoded.
    decoded: Result<u64, RepoError>,
    /// The first bytes of the content (up to a long page header), for the segment checks.
    head: Vec<u8>,
    /// The summary built from the records, with `--full` (unless the content is too short).
    summarized: Option<Result<Summarized, SummaryError>>,
}

/// Decodes `object`, handing each piece to the record walk as it comes out of the decoder
/// (256 KiB as pitr writes them, still in the cache): the decoded segment is never written
/// to memory and read back, as it was when decoded whole first.
fn walk_object(
    object: &FetchedObject,
    prev: Option<SegmentTail>,
    full: bool,
    cpus: usize,
) -> Walked {
    let mut walk = ChainedWalk {
        head: Vec::with_capacity(SIZE_OF_LONG_PAGE_HEADER),
        prev,
        full,
        summarizer: None,
    };
    let decoded = match object {
        FetchedObject::Frame { .. } if full && cpus > 1 => decode_beside(object, &mut walk),
        _ => object.decode_to(|piece| walk.feed(piece)),
    };
    Walked {
        decoded,
        head: walk.head,
        summarized: walk
            .summarizer
            .map(|s| s.and_then(SegmentSummarizer::finish)),
    }
}

/// [`FetchedObject::decode_to`] on a second thread, handing its blocks to `walk` on this one:
/// decoding (lz4 and two checksums) and the walk take about as long each, so on two free CPUs
/// the segment takes half as long. The blocks go through a few reused buffers of one block
/// each, so both threads work in their caches (a copy per block, in the cache, is the price).
fn decode_beside(object: &FetchedObject, walk: &mut ChainedWalk) -> Result<u64, RepoError> {
    const BUFFERS: usize = 4;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = free_tx.send(Vec::with_capacity(BLOCK_LEN));
    }
    std::thread::scope(|scope| {
        let decoder = scope.spawn(move || {
            object.decode_to(|piece| {
                let mut buf = free_rx.recv().unwrap_or_default();
                buf.clear();
                buf.extend_from_slice(piece);
                let _ = full_tx.send(buf);
            })
            // `full_tx` goes here: the walk below ends after the last block.
        });
        for buf in full_rx {
            walk.feed(&buf);
            let _ = free_tx.send(buf);
        }
        decoder.join().expect("segment decoder panicked")
    })
}

/// The record walk of one segment fed in pieces, continuing from the previous segment's tail.
struct ChainedWalk {
    head: Vec<u8>,
    prev: Option<SegmentTail>,
    full: bool,
    summarizer: Option<Result<SegmentSummarizer, SummaryError>>,
}

impl ChainedWalk {
    /// The next piece of the content.
    fn feed(&mut self, piece: &[u8]) {
        match &mut self.summarizer {
            Some(Ok(s)) => return s.feed(piece),
            Some(Err(_)) => return,
            None => {}
        }
        let had = self.head.len();
        let take = (SIZE_OF_LONG_PAGE_HEADER - had).min(piece.len());
        self.head.extend_from_slice(&piece[..take]);
        if !self.full || self.head.len() < SIZE_OF_LONG_PAGE_HEADER {
            return;
        }
        // The long page header is here (in one piece but from odd frames): start the walk.
        let first = if had == 0 { piece } else { &self.head[..] };
        let mut started = start_walk(first, self.prev.as_ref());
        if let Ok(s) = &mut started {
            if had == 0 {
                s.feed(piece);
            } else {
                s.feed(&self.head);
                s.feed(&piece[take..]);
            }
        }
        self.summarizer = Some(started);
    }
}

/// The summarizer of a segment whose first bytes are `first`, continuing from `prev` (the
/// previous segment's tail) when it leads into this segment, as [`summarize_segment`] does. Its
/// length is taken from the page header: the segment checks compare it with the content's.
fn start_walk(first: &[u8], prev: Option<&SegmentTail>) -> Result<SegmentSummarizer, SummaryError> {
    let len = u64::from(parse_long_header(first)?.seg_size);
    match SegmentSummarizer::new(first, len, prev) {
        // The previous segment's tail does not lead into this one: read this segment on its
        // own, as without a tail.
        Err(SummaryError::TailMismatch { .. }) => SegmentSummarizer::new(first, len, None),
        r => r,
    }
}

/// The checks of one decoded segment, in the order of their findings: frame and content (by
/// decoding), first page header, stored summary, then with `--full` its records.
fn check_walked(
    s: &SegmentObject<'_>,
    walked: Walked,
    stored: Option<Result<StoredSummary, (String, String)>>,
    opts: VerifyOptions,
    tail: &mut Option<(TimelineId, SegNo, SegmentTail)>,
    out: &mut Segments,
    report: &mut VerifyReport,
) -> Result<(), RepoError> {
    report.objects += 1 + s.summary.is_some() as u64;
    report.bytes += s.object.size;
    report.wal_segments += 1;
    let len = match walked.decoded {
        Ok(len) => len,
        Err(e) => {
            out.broken.insert((s.tli, s.segno));
            return record_read_error(report, s.object.key(), e);
        }
    };
    report.wal_bytes += len;
    if let Err(e) = validate_segment_start(&walked.head, len, s.tli, s.segno) {
        out.broken.insert((s.tli, s.segno));
        report.problem(
            Severity::Error,
            ProblemKind::BadWal,
            Some(s.object.key().to_string()),
            format!("{} is not a valid WAL segment: {e}", s.name),
        );
        return Ok(());
    }
    let stored = stored_summary(s, stored, report);
    if !opts.full {
        // Without a summary the segment's records are unknown until --full.
        if let Some(st) = stored {
            record_summary(s, st.summary, out, report);
        }
        return Ok(());
    }
    let Some(summarized) = walked.summarized else {
        return Ok(()); // not reached: a valid segment holds a long page header
    };
    if let Some(summary) = walked_summary(s, summarized, tail, report) {
        record_summary(s, summary, out, report);
    } else {
        out.broken.insert((s.tli, s.segno));
    }
    Ok(())
}

/// Counts a walked segment's records and keeps its tail for the next; `None` (reported) when
/// it cannot be read at all.
fn walked_summary(
    s: &SegmentObject<'_>,
    summarized: Result<Summarized, SummaryError>,
    tail: &mut Option<(TimelineId, SegNo, SegmentTail)>,
    report: &mut VerifyReport,
) -> Option<SegmentSummary> {
    match summarized {
        Ok(x) => {
            report.wal_records += x.summary.record_count;
            *tail = x.tail.map(|t| (s.tli, s.segno, t));
            Some(x.summary)
        }
        Err(e) => {
            report.problem(
                Severity::Error,
                ProblemKind::BadWal,
                Some(s.object.key().to_string()),
                format!("{} cannot be read: {e}", s.name),
            );
            None
        }
    }
}

/// Reports how a segment's records end (damage, early end of WAL) and keeps its summary.
fn record_summary(
    s: &SegmentObject<'_>,
    summary: SegmentSummary,
    out: &mut Segments,
    report: &mut VerifyReport,
) {
    match &summary.end {
        SegmentEnd::Corrupt { lsn, error } => {
            out.broken.insert((s.tli, s.segno));
            report.problem(
                Severity::Error,
                ProblemKind::BadWal,
                Some(s.object.key().to_string()),
                format!(
                    "{}: records are damaged from LSN {lsn}: {error}; replay stops there",
                    s.name
                ),
            )
        }
        SegmentEnd::EndOfWal { lsn, .. } => report.problem(
            Severity::Warning,
            ProblemKind::BadWal,
            Some(s.object.key().to_string()),
            format!(
                "{}: WAL ends at LSN {lsn}, before the end of this complete segment",
                s.name
            ),
        ),
        _ => {}
    }
    out.summaries.insert((s.tli, s.segno), summary);
}

/// The stored summary, or `None` with a warning saying why there is none to use.
fn stored_summary(
    s: &SegmentObject<'_>,
    stored: Option<Result<StoredSummary, (String, String)>>,
    report: &mut VerifyReport,
) -> Option<StoredSummary> {
    match stored {
        None => {
            report.problem(
                Severity::Warning,
                ProblemKind::MissingSummary,
                Some(s.object.key().to_string()),
                format!(
                    "{} has no summary; restore rebuilds it by reading the segment",
                    s.name
                ),
            );
            None
        }
        Some(Ok(st)) => Some(st),
        Some(Err((key, msg))) => {
            report.problem(
                Severity::Warning,
                ProblemKind::BadMetadata,
                Some(key),
                format!(
                    "summary of {} is unreadable ({msg}); restore rebuilds it",
                    s.name
                ),
            );
            None
        }
    }
}

async fn read_summary(
    repo: &Repository,
    o: &ScannedObject,
) -> Result<StoredSummary, (String, String)> {
    let key = || o.key().to_string();
    let raw = repo
        .read_object(o)
        .await
        .map_err(|e| (key(), e.to_string()))?;
    serde_json::from_slice(&raw).map_err(|e| (key(), e.to_string()))
}

/// History files: readable, parseable, ancestors older and present, switch points increasing,
/// and each parent's history a prefix of its child's. Returns the parsed histories.
async fn verify_histories(
    repo: &Repository,
    keys: &[(TimelineId, &ScannedObject)],
    inv: &WalInventory,
    report: &mut VerifyReport,
    progress: &(dyn Fn(VerifyProgress) + Sync),
) -> Result<Histories, RepoError> {
    let mut histories = Histories::new();
    for (tli, o) in keys {
        let Some(raw) = read_checked(repo, o, report, progress).await? else {
            continue;
        };
        match parse_history(&raw) {
            Ok(entries) => {
                histories.insert(*tli, entries);
            }
            Err(e) => report.problem(
                Severity::Error,
                ProblemKind::BadHistory,
                Some(o.key().to_string()),
                format!("timeline {tli} history does not parse: {e}"),
            ),
        }
    }
    let bad = |report: &mut VerifyReport, tli: TimelineId, msg: String| {
        report.problem(
            Severity::Error,
            ProblemKind::BadHistory,
            Some(wal_file_key(&WalFileName::History { tli })),
            format!("timeline {tli}: {msg}"),
        )
    };
    for (&tli, entries) in &histories {
        let mut prev: Option<(TimelineId, Lsn)> = None;
        for e in entries {
            if e.tli >= tli {
                bad(
                    report,
                    tli,
                    format!("lists timeline {} as an ancestor", e.tli),
                );
            }
            if let Some((pt, pl)) = prev {
                if e.tli <= pt || e.switchpoint < pl {
                    bad(
                        report,
                        tli,
                        format!(
                            "ancestors out of order: timeline {} at {} after timeline {pt} at {pl}",
                            e.tli, e.switchpoint
                        ),
                    );
                }
            }
            prev = Some((e.tli, e.switchpoint));
        }
        if let Some(parent) = entries.last() {
            if parent.tli > 1 {
                match histories.get(&parent.tli) {
                    None if !inv.histories.contains(&parent.tli) => bad(
                        report,
                        tli,
                        format!("parent timeline {}'s history file is missing", parent.tli),
                    ),
                    None => {} // present but unreadable: reported above
                    Some(p) if !entries.starts_with(p) => bad(
                        report,
                        tli,
                        format!(
                            "history disagrees with parent timeline {}'s history",
                            parent.tli
                        ),
                    ),
                    Some(_) => {}
                }
            }
        }
    }
    // A timeline with WAL but no history cannot be followed by recovery.
    for &tli in inv.timelines.keys().filter(|&&t| t > 1) {
        if !inv.histories.contains(&tli) {
            bad(
                report,
                tli,
                "has WAL segments but no history file, so recovery cannot follow it".into(),
            );
        }
    }
    Ok(histories)
}

/// Holes per timeline, and the WAL each backup needs to reach consistency.
fn check_continuity(
    catalog: &[BackupInfo],
    inv: &WalInventory,
    summaries: &BTreeMap<(TimelineId, SegNo), SegmentSummary>,
    broken: &BTreeSet<(TimelineId, SegNo)>,
    seg_size: u64,
    report: &mut VerifyReport,
) {
    for (&tli, t) in &inv.timelines {
        for pair in t.ranges.windows(2) {
            let (first_missing, next_held) = (pair[0].1 + 1, pair[1].0);
            let from = Lsn::from_segno(first_missing, seg_size);
            let to = Lsn::from_segno(next_held, seg_size);
            // Backups that replay through the hole: on this timeline (or an ancestor) and
            // starting before it.
            let cut: Vec<&BackupInfo> = catalog
                .iter()
                .filter(|b| b.timeline <= tli && b.start_lsn.segno(seg_size) < first_missing)
                .collect();
            let last_before = summaries
                .range((tli, 0)..(tli, first_missing))
                .rev()
                .find_map(|(_, s)| s.last_xact.as_ref());
            let impact = if cut.is_empty() {
                None
            } else {
                Some(format!(
                    "restores from backup(s) {} stop at LSN {from}{}; targets between LSN {from} and \
                     LSN {to} are unreachable from any backup",
                    cut.iter().map(|b| b.id.as_str()).collect::<Vec<_>>().join(", "),
                    match last_before {
                        Some(x) => format!(
                            " (last transaction before the hole: {} at LSN {})",
                            x.time.format("%Y-%m-%d %H:%M:%S%.6f%:z"),
                            x.lsn
                        ),
                        None => String::new(),
                    }
                ))
            };
            report.problems.push(super::Problem {
                severity: if cut.is_empty() {
                    Severity::Warning
                } else {
                    Severity::Error
                },
                kind: ProblemKind::WalHole,
                object: Some(wal_file_key(&WalFileName::segment(
                    tli,
                    first_missing,
                    seg_size,
                ))),
                message: format!(
                    "timeline {tli}: WAL from LSN {from} to LSN {to} is {} (segments {} to {})",
                    if (first_missing..next_held).any(|n| broken.contains(&(tli, n))) {
                        "missing or damaged"
                    } else {
                        "missing"
                    },
                    WalFileName::segment(tli, first_missing, seg_size),
                    WalFileName::segment(tli, next_held - 1, seg_size)
                ),
                impact,
            });
        }
    }
    for b in catalog {
        let first = b.start_lsn.segno(seg_size);
        let last = Lsn(b.stop_lsn.0.saturating_sub(1)).segno(seg_size);
        let missing: BTreeSet<SegNo> = (first..=last)
            .filter(|&n| !inv.covers(b.timeline, n, n))
            .collect();
        if let Some(&m) = missing.first() {
            let name = WalFileName::segment(b.timeline, m, seg_size);
            report.problems.push(super::Problem {
                severity: Severity::Error,
                kind: ProblemKind::BackupWalMissing,
                object: Some(wal_file_key(&name)),
                message: format!(
                    "backup {} needs WAL segments {} to {} to reach consistency; {} of them are missing, first {name}",
                    b.id,
                    WalFileName::segment(b.timeline, first, seg_size),
                    WalFileName::segment(b.timeline, last, seg_size),
                    missing.len()
                ),
                impact: Some(format!("backup {} cannot be restored", b.id)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{frame_blocks, BlockWriter, FRAME_HEADER_LEN};
    use crate::wal::{summarize_segment, WalError};

    /// An `lz4-blocks` frame of `raw` cut into blocks of `block` bytes, as fetched.
    fn frame(raw: &[u8], block: usize) -> FetchedObject {
        let mut w = BlockWriter::new(FRAME_HEADER_LEN, raw.len());
        for b in raw.chunks(block) {
            w.block(b);
        }
        FetchedObject::Frame {
            key: "wal/x".into(),
            stored: frame_blocks(w.finish()),
        }
    }

    /// Walking each block as it comes out of the decoder gives, byte for byte, the summaries
    /// (JSON), tails and errors of walking each segment whole: whatever the block size (pitr
    /// writes 256 KiB; 13 bytes cuts even the long page header), with and without the tails
    /// carried, with a damaged record, and with a tail that does not lead into the segment.
    #[test]
    fn walking_while_decoding_summarizes_as_walking_whole_segments() {
        let segs: Vec<Vec<u8>> = crate::wal::testdata::segments()
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        let mut damaged = segs.clone();
        damaged[0][0x8_0100] ^= 0x20;
        let found = summarize_segment(&damaged[0], None).unwrap().error;
        assert!(matches!(found, Some(WalError::BadCrc { .. })), "{found:?}");
        let t7 = summarize_segment(&segs[0], None).unwrap().tail;
        let mismatched = [(segs[2].clone(), t7.clone(), None)];
        for block in [13, 8192, 100_000, BLOCK_LEN] {
            for chain in [&segs, &damaged] {
                for carry in [true, false] {
                    let mut tail = None;
                    for seg in chain {
                        let whole = summarize_segment(seg, tail.as_ref()).unwrap();
                        let prev = tail.clone();
                        assert_walk(seg, block, prev, &whole);
                        tail = if carry { whole.tail } else { None };
                    }
                }
            }
            for (seg, prev, whole_prev) in &mismatched {
                let whole = summarize_segment(seg, whole_prev.as_ref()).unwrap();
                assert_walk(seg, block, prev.clone(), &whole);
            }
        }
    }

    /// A damaged frame is refused, whichever thread decodes it.
    #[test]
    fn a_damaged_frame_fails_the_walk_on_one_thread_or_two() {
        let seg = crate::wal::testdata::segments().remove(0).1;
        let FetchedObject::Frame { key, stored } = frame(&seg, BLOCK_LEN_FOR_TESTS) else {
            unreachable!()
        };
        let mut bad = stored.to_vec();
        let at = bad.len() / 2;
        bad[at] ^= 1;
        let object = FetchedObject::Frame {
            key,
            stored: bad.into(),
        };
        for cpus in [1, 2] {
            let w = walk_object(&object, None, true, cpus);
            assert!(
                matches!(w.decoded, Err(RepoError::Corrupt { .. })),
                "{cpus} CPUs"
            );
        }
    }

    const BLOCK_LEN_FOR_TESTS: usize = 64 * 1024;

    fn assert_walk(seg: &[u8], block: usize, prev: Option<SegmentTail>, whole: &Summarized) {
        let json = |s: &SegmentSummary| serde_json::to_vec(s).unwrap();
        for object in [frame(seg, block), FetchedObject::Content(seg.to_vec())] {
            // One thread, and decoding on a second one.
            for cpus in [1, 2] {
                let w = walk_object(&object, prev.clone(), true, cpus);
                assert_eq!(w.decoded.unwrap(), seg.len() as u64);
                assert_eq!(w.head, seg[..SIZE_OF_LONG_PAGE_HEADER]);
                let walked = w.summarized.unwrap().unwrap();
                let what = format!("blocks of {block}, {cpus} CPUs");
                assert_eq!(json(&walked.summary), json(&whole.summary), "{what}");
                assert_eq!(walked.tail, whole.tail, "{what}");
                assert_eq!(walked.error, whole.error, "{what}");
            }
            // Without --full nothing is walked, and the checks still get the first bytes.
            let w = walk_object(&object, prev.clone(), false, 2);
            assert!(w.summarized.is_none());
            assert_eq!(w.head, seg[..SIZE_OF_LONG_PAGE_HEADER]);
        }
    }
}

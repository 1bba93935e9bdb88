//! `pitr stream`: continuous WAL streaming through a replication slot, straight into the
//! repository, with no local staging. The design and its guarantees are in docs/streaming.md.
//!
//! Three tasks joined by bounded channels, one per stage:
//!
//! ```text
//!  receiver (socket) --Piece--> assembler (open segment) --Job--> uploader (repository)
//!      ^                                                              |
//!      +---------------- durable LSN (watch) -------------------------+
//! ```
//!
//! - [`receiver`] owns the replication connection: XLogData in, keepalive replies and
//!   StandbyStatusUpdate out (flush = durable, never more), reconnects, timeline switches.
//! - the assembler ([`segment::OpenSegment`]) keeps the one open segment and cuts chunk and
//!   segment jobs (timer, size, synchronous mode).
//! - [`uploader`] stores jobs in order and alone decides what is durable.
//!
//! Memory is bounded by a fixed byte budget ([`budget`], two segments) plus the piece queue,
//! never by the lag: when storage stalls the budget runs out, the assembler stops taking
//! pieces, the receiver stops reading, and PostgreSQL keeps the WAL in the slot.

mod borrow;
pub mod budget;

mod error;
mod marker;
pub mod metrics;
mod options;
mod receiver;
pub mod segment;
mod standbys;
pub mod start;
mod uploader;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::pg::{self, sqlstate, ConnConfig, CreateSlotOptions, ReplicationConn};
use crate::repo::{ClusterIdentity, Repository, WalScan, WriteOptions};
use crate::storage::Storage;
use crate::wal::{parse_history, HistoryEntry, Lsn, TimelineId, WalFileName};

pub use error::StreamError;
pub use options::{Mirror, StreamOptions};

use self::budget::Budget;
use self::metrics::Progress;
use self::receiver::{Piece, Receiver};
use self::segment::{Job, OpenSegment};
use self::start::StartSource;

/// Pieces between receiver and assembler. One XLogData message carries at most 128 KiB
/// (walsender's MAX_SEND_SIZE), so this holds at most 1 MiB (each piece may pin its read
/// buffer, ~256 KiB): enough to keep the socket drained while the assembler copies.
const PIECE_QUEUE: usize = 8;

/// Jobs between assembler and uploader. The bytes they hold are bounded by the [`Budget`]
/// (two segments, open one included), not by this count: it only lets the assembler queue
/// small chunks behind a segment in upload without waiting.
const JOB_QUEUE: usize = 4;

/// What a finished stream reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    pub received: Lsn,
    pub durable: Lsn,
}

/// Runs `pitr stream` until `cancel`, then drains: everything received is made durable and
/// reported before returning. `force` (a second signal) abandons the drain.
///
/// When the server that took over was promoted from behind the stream (its history forked
/// from the stream's timeline before the stream's position), what was received is made
/// durable and the stream starts over from the repository, which then follows the new
/// timeline from its switch point (see `start`).
pub async fn run(
    storage: Storage,
    write: WriteOptions,
    cfg: ConnConfig,
    opts: StreamOptions,
    cancel: CancellationToken,
    force: CancellationToken,
) -> Result<StreamSummary, StreamError> {
    loop {
        let once = run_once(
            storage.clone(),
            write.clone(),
            cfg.clone(),
            opts.clone(),
            cancel.clone(),
            force.clone(),
        );
        match once.await {
            Err(StreamError::TimelineForked {
                tli, start, fork, ..
            }) if !cancel.is_cancelled() => {
                tracing::warn!(timeline = tli, %fork, position = %start,
                    "the new primary's history forked from timeline {tli} at {fork}, behind the stream's position {start}: \
                     starting over from the repository");
                // Never a hot loop, whatever the server answers next.
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = cancel.cancelled() => {}
                }
            }
            other => return other,
        }
    }
}

async fn run_once(
    storage: Storage,
    write: WriteOptions,
    cfg: ConnConfig,
    opts: StreamOptions,
    cancel: CancellationToken,
    force: CancellationToken,
) -> Result<StreamSummary, StreamError> {
    let Some((mut conn, sys)) = connect(&cfg, &opts, &cancel, &force).await? else {
        return Ok(StreamSummary {
            received: Lsn::INVALID,
            durable: Lsn::INVALID,
        });
    };
    let seg_size = conn.wal_segment_size().await?;
    let cluster = ClusterIdentity {
        system_identifier: sys.system_id,
        pg_major: conn.server_major(),
        wal_segment_size: seg_size,
    };
    // The slot first: a missing slot must not leave a new repository behind.
    let slot_restart = prepare_slot(&mut conn, &opts).await?;
    // The LIST of `wal/` goes out with the descriptor's GET, not after it.
    let (opened, scan) = tokio::join!(
        marker::open_repository(&mut conn, storage.clone(), &cluster, write),
        Repository::wal_scan_unopened(&storage, seg_size),
    );
    let (repo, created) = opened?;
    let scan = match created {
        // Created just now: it holds no WAL.
        true => WalScan::default(),
        false => scan?,
    };
    let mirrors = open_mirrors(&opts, &cluster).await?;
    let history = store_history(&mut conn, &repo, sys.timeline).await?;
    let sp = start_point(&repo, &scan, &mirrors, &history, &sys, slot_restart, &opts).await?;
    let (open, budget, sp) =
        resume_segment(&repo, &scan, sp, &history, sys.timeline, seg_size).await?;
    sync_mirrors(&repo, &scan, &mirrors, &sp, sys.timeline, seg_size).await?;
    let start = open.next_lsn();
    let open_tli = open.timeline();

    let progress = opts.progress.clone();
    progress.start_at(start);
    let (durable_tx, durable_rx) = watch::channel(start);
    let (piece_tx, piece_rx) = mpsc::channel(PIECE_QUEUE);
    let (job_tx, job_rx) = mpsc::channel(JOB_QUEUE);
    let uploader = tokio::spawn(uploader::run(
        repo.clone(),
        mirrors,
        job_rx,
        budget.clone(),
        durable_tx,
        progress.clone(),
        force.clone(),
    ));
    let assembler = tokio::spawn(assemble(open, piece_rx, job_tx, opts.clone(), budget));
    let keeper = standbys::spawn(&cfg, &opts, sys.system_id, durable_rx.clone());
    let mut receiver = Receiver::new(
        cfg,
        opts.slot.clone(),
        opts.clone(),
        sys.system_id,
        seg_size,
        progress.clone(),
        Some(piece_tx),
        durable_rx,
        cancel,
        force,
    );
    let streamed = receiver
        .run(Some(conn), open_tli, start)
        .await
        .map_err(|e| name_lost_range(e, slot_restart));
    keeper.cancel();
    drain(receiver, streamed, assembler, uploader, &progress).await
}

/// A removed-WAL error names the whole lost range: up to where the slot now keeps WAL.
fn name_lost_range(e: StreamError, slot_restart: Option<Lsn>) -> StreamError {
    match e {
        StreamError::WalRemoved {
            tli,
            from,
            until: None,
            server_message,
        } => StreamError::WalRemoved {
            tli,
            from,
            until: slot_restart.filter(|r| *r > from),
            server_message,
        },
        other => other,
    }
}

/// The first connection decides everything else; retries while the server starts up. `None`
/// when cancelled before a server answered.
async fn connect(
    cfg: &ConnConfig,
    opts: &StreamOptions,
    cancel: &CancellationToken,
    force: &CancellationToken,
) -> Result<Option<(ReplicationConn, pg::IdentifySystem)>, StreamError> {
    let bootstrap = Receiver::new(
        cfg.clone(),
        opts.slot.clone(),
        opts.clone(),
        0,
        0,
        Arc::new(Progress::default()),
        None,
        watch::channel(Lsn::INVALID).1,
        cancel.clone(),
        force.clone(),
    );
    let Some((mut conn, sys)) = bootstrap.connect_any().await? else {
        return Ok(None);
    };
    if !opts.allow_standby && is_standby(&mut conn).await? {
        return Err(StreamError::Standby);
    }
    if conn.show("wal_level").await? == "minimal" {
        return Err(StreamError::WalLevelMinimal);
    }
    Ok(Some((conn, sys)))
}

/// The further repositories of `opts.mirrors`, opened (created when new) for this cluster.
async fn open_mirrors(
    opts: &StreamOptions,
    cluster: &ClusterIdentity,
) -> Result<Vec<Repository>, StreamError> {
    let mut out = vec![];
    for m in &opts.mirrors {
        let what = format!("stream (repository {})", m.name);
        let repo = Repository::open_for_cluster(m.storage.clone(), cluster, &what, m.write.clone())
            .await?;
        out.push(repo);
    }
    Ok(out)
}

/// Gives the mirrors what the main repository holds of the start: the current timeline's
/// history and the open segment's stored prefix, so that what is acknowledged is durable in
/// every repository. WAL before the start that a mirror lacks is `pitr copy`'s to fill.
async fn sync_mirrors(
    repo: &Repository,
    scan: &WalScan,
    mirrors: &[Repository],
    sp: &start::StartPoint,
    tli: TimelineId,
    seg_size: u64,
) -> Result<(), StreamError> {
    if mirrors.is_empty() {
        return Ok(());
    }
    let history = WalFileName::History { tli };
    let history = match tli > 1 {
        true => repo.get_wal_file(&history).await?.map(|h| (history, h)),
        false => None,
    };
    let first = WalFileName::segment(sp.tli, sp.lsn.segno(seg_size), seg_size);
    let prefix = repo.read_chain(&scan.chunk_plan(&first)).await?;
    for m in mirrors {
        if let Some((name, content)) = &history {
            m.store_wal_file(name, content).await?;
        }
        m.store_segment_prefix(&first, &prefix).await?;
    }
    Ok(())
}

/// Stores the current timeline's history file (every restore across the switch needs it) and
/// returns its entries.
async fn store_history(
    conn: &mut ReplicationConn,
    repo: &Repository,
    tli: TimelineId,
) -> Result<Vec<HistoryEntry>, StreamError> {
    if tli <= 1 {
        return Ok(vec![]);
    }
    let (file, content) = conn.timeline_history(tli).await?;
    let entries = parse_history(&content)?;
    if let Ok(name) = WalFileName::parse(&file) {
        repo.store_wal_file(&name, &content).await?;
    }
    Ok(entries)
}

/// Where streaming starts: after the WAL the repository holds, else at the slot's restart_lsn,
/// else at the server's position (see `start`). One LIST of `wal/` (`scan`) gives both the
/// inventory and the chunk folders; in a mirror, HEAD requests for the last few segments find
/// the holes a kill left in it (a LIST where the server does not tell the slot's position).
async fn start_point(
    repo: &Repository,
    scan: &WalScan,
    mirrors: &[Repository],
    history: &[HistoryEntry],
    sys: &pg::IdentifySystem,
    slot_restart: Option<Lsn>,
    opts: &StreamOptions,
) -> Result<start::StartPoint, StreamError> {
    let seg_size = repo.descriptor().wal_segment_size;
    delete_stale_chunks(repo, scan).await;
    let mut sp = start::choose_start(
        &scan.inventory,
        history,
        sys.timeline,
        slot_restart,
        sys.xlogpos,
        seg_size,
    );
    for m in mirrors {
        sp = match slot_restart {
            // The few segments a kill can have left out: HEAD each, not LIST a year of WAL.
            Some(r) => {
                let window = start::mirror_window(&sp, history, sys.timeline, r, seg_size);
                let held = m.holds_segments(&window).await?;
                start::back_to_missing(sp, &window, &held, seg_size)
            }
            // PostgreSQL 13/14: the mirror's first segment bounds the search (see `start`).
            None => {
                let inv = m.wal_scan().await?.inventory;
                start::back_to_hole(sp, &inv, history, sys.timeline, None, seg_size)
            }
        };
    }
    if let (true, StartSource::Repository, Some(r)) = (opts.accept_gap, sp.source, slot_restart) {
        let slot_seg = Lsn::from_segno(r.segno(seg_size), seg_size);
        if slot_seg > sp.lsn {
            tracing::error!(repository_end = %sp.lsn, slot_restart_lsn = %r,
                "--accept-gap: WAL from the repository's end to the slot's restart_lsn is skipped; \
                 restores cannot cross this gap: take a new base backup");
            sp = start::StartPoint {
                tli: start::timeline_of(slot_seg, history, sys.timeline),
                lsn: slot_seg,
                source: StartSource::Slot,
                off_lineage: None,
            };
        }
    }
    if let Some(o) = &sp.off_lineage {
        log_off_lineage(o, sp.tli);
    }
    match sp.source {
        StartSource::Repository => {
            tracing::info!(start = %sp.lsn, timeline = sp.tli, "continuing after the WAL already in the repository")
        }
        StartSource::Hole => tracing::warn!(start = %sp.lsn, timeline = sp.tli,
            "a segment before the repository's end is missing (a stream stopped while storing it): streaming again from it"),
        StartSource::Slot => {
            tracing::info!(start = %sp.lsn, timeline = sp.tli, "starting at the slot's restart_lsn")
        }
        StartSource::ServerPosition => tracing::warn!(start = %sp.lsn, timeline = sp.tli,
            "the slot reserves no WAL and the repository has none: starting at the server's current position. \
             WAL before it is NOT in the repository; take a base backup after this point"),
    }
    Ok(sp)
}

/// The open segment at the start point, preloaded with the chunks already stored for it, so
/// that streaming resumes exactly after what is durable. Chunks of an ancestor timeline that
/// reach past its switch point (the stream was ahead of the server that was promoted) are kept,
/// and streaming continues on the next timeline's copy of that segment; the start point it
/// settled on is returned with it.
async fn resume_segment(
    repo: &Repository,
    scan: &WalScan,
    mut sp: start::StartPoint,
    history: &[HistoryEntry],
    server_tli: TimelineId,
    seg_size: u64,
) -> Result<(OpenSegment, Budget, start::StartPoint), StreamError> {
    let windowed = seg_size > budget::WINDOW;
    let (plan, preloaded) = loop {
        let first = WalFileName::segment(sp.tli, sp.lsn.segno(seg_size), seg_size);
        let plan = scan.chunk_plan(&first);
        // Windowed: the chunks stay where they are, durable; they are never read back.
        let preloaded = match windowed {
            true => vec![],
            false => repo.read_chain(&plan).await?,
        };
        let end = Lsn(sp.lsn.0 + preloaded.len().max(plan.end() as usize) as u64);
        match start::switch_of(sp.tli, history, server_tli) {
            Some((switch, next)) if end > switch => {
                log_off_lineage(
                    &start::OffLineage {
                        tli: sp.tli,
                        from: switch,
                        to: end,
                    },
                    next,
                );
                sp.tli = next;
            }
            _ => {
                if plan.end() > 0 {
                    tracing::info!(segment = %first, start = %end, chunks = plan.chain.len(), "resuming after the chunks already stored");
                }
                break (plan, preloaded);
            }
        }
    };
    let start = Lsn(sp.lsn.0 + u64::from(plan.end()));
    let budget = Budget::new(seg_size);
    tracing::debug!(cap_bytes = budget.cap(), windowed, "WAL memory budget");
    let first_buf = budget.segment().await;
    let open = match windowed {
        true => OpenSegment::windowed(sp.tli, start, seg_size, budget.buffer_size(), first_buf),
        false => OpenSegment::new(sp.tli, start, seg_size, preloaded, plan.all(), first_buf)?,
    };
    Ok((open, budget, sp))
}

/// The repository holds WAL of timeline `o.tli` that the timeline the server followed does not
/// continue: the stream was ahead of the server that was promoted. Transactions in that range
/// committed on the old primary but are on no timeline a restore to latest follows.
fn log_off_lineage(o: &start::OffLineage, next: TimelineId) {
    tracing::warn!(timeline = o.tli, from = %o.from, to = %o.to, next_timeline = next,
        "the repository holds WAL of timeline {} from {} to {} that is not on timeline {}: \
         kept (a restore to a target on timeline {} can use it), following timeline {} from its switch point",
        o.tli, o.from, o.to, next, o.tli, next);
}

/// Closing the piece channel makes the assembler ship its last chunk and close the job
/// channel, and the uploader stores everything queued before returning. Succeeds only when
/// everything received is durable.
async fn drain(
    mut receiver: Receiver,
    streamed: Result<Option<pg::XLogStream>, StreamError>,
    assembler: tokio::task::JoinHandle<Result<(), StreamError>>,
    uploader: tokio::task::JoinHandle<Result<(), StreamError>>,
    progress: &Progress,
) -> Result<StreamSummary, StreamError> {
    receiver.close_pipeline();
    let assembled = join(assembler).await;
    let uploaded = join(uploader).await;
    let stream = match (streamed, assembled, uploaded) {
        // The task that failed first closed the pipeline on the others: report its error.
        (Err(StreamError::PipelineClosed), a, u) if a.is_err() || u.is_err() => {
            let errors = [a.err(), u.err()].into_iter().flatten();
            let mut errors: Vec<_> = errors.collect();
            errors.sort_by_key(|e| matches!(e, StreamError::PipelineClosed));
            return Err(errors.remove(0));
        }
        (Err(e), a, u) => {
            for other in [a.err(), u.err()].into_iter().flatten() {
                tracing::error!(error = %other, "while draining after the error");
            }
            return Err(e);
        }
        (Ok(_), Err(e), _) | (Ok(_), _, Err(e)) => return Err(e),
        (Ok(s), Ok(()), Ok(())) => s,
    };
    if let Some(s) = stream {
        receiver.finish(s).await;
    }
    let summary = StreamSummary {
        received: progress.received(),
        durable: progress.durable(),
    };
    if summary.durable < summary.received {
        return Err(StreamError::NotDurable {
            received: summary.received,
            durable: summary.durable,
        });
    }
    tracing::info!(durable = %summary.durable, "stopped: everything received is durable");
    Ok(summary)
}

async fn join<T>(h: tokio::task::JoinHandle<Result<T, StreamError>>) -> Result<T, StreamError> {
    h.await
        .map_err(|e| StreamError::TaskPanicked(e.to_string()))?
}

async fn is_standby(conn: &mut ReplicationConn) -> Result<bool, pg::Error> {
    let v = match conn.connection().parameter("in_hot_standby") {
        Some(v) => v.to_string(),
        None if conn.server_version_num() >= 140000 => conn.show("in_hot_standby").await?,
        None => conn.show("transaction_read_only").await?,
    };
    Ok(v == "on")
}

/// Checks (or creates) the slot; returns its restart_lsn when the server can tell.
async fn prepare_slot(
    conn: &mut ReplicationConn,
    opts: &StreamOptions,
) -> Result<Option<Lsn>, StreamError> {
    if conn.server_version_num() >= 150000 {
        if let Some(info) = conn.read_replication_slot(&opts.slot).await? {
            return Ok(info.restart_lsn);
        }
        if !opts.create_slot {
            return Err(StreamError::MissingSlot {
                slot: opts.slot.clone(),
            });
        }
        let created = conn
            .create_replication_slot(&opts.slot, CreateSlotOptions::default())
            .await?;
        tracing::info!(slot = %opts.slot, restart_lsn = ?created.restart_lsn.map(|l| l.to_string()), "created replication slot");
        return Ok(created.restart_lsn);
    }
    // PostgreSQL 13/14 have no READ_REPLICATION_SLOT: a missing slot shows at START_REPLICATION.
    if opts.create_slot {
        match conn
            .create_replication_slot(&opts.slot, CreateSlotOptions::default())
            .await
        {
            Ok(_) => tracing::info!(slot = %opts.slot, "created replication slot"),
            Err(e) if e.sqlstate() == Some(sqlstate::DUPLICATE_OBJECT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Appends received WAL to the open segment, sending the job of each segment it completes
/// before asking for the next buffer: the budget frees that buffer only once it is stored.
async fn take_data(
    seg: &mut OpenSegment,
    budget: &Budget,
    lsn: Lsn,
    data: &[u8],
    jobs: &mpsc::Sender<Job>,
) -> Result<(), StreamError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        if seg.needs_buffer() {
            // Waits for budget: a completed segment must be stored first.
            seg.install(budget.segment().await);
        }
        off += seg.push(Lsn(lsn.0 + off as u64), &data[off..], &mut out)?;
        if seg.must_ship() {
            // Windowed: the window is full or the segment complete; its bytes leave as a chunk.
            out.extend(chunk(seg, budget).await);
            out.extend(seg.complete_windowed());
        }
        for j in out.drain(..) {
            jobs.send(j)
                .await
                .map_err(|_| StreamError::PipelineClosed)?;
        }
    }
    Ok(())
}

/// The assembler task: pieces in, jobs out. Ends when the piece channel closes, after
/// shipping what it holds as a last chunk.
async fn assemble(
    mut seg: OpenSegment,
    mut pieces: mpsc::Receiver<Piece>,
    jobs: mpsc::Sender<Job>,
    opts: StreamOptions,
    budget: Budget,
) -> Result<(), StreamError> {
    let send = |j: Job| {
        let jobs = jobs.clone();
        async move { jobs.send(j).await.map_err(|_| StreamError::PipelineClosed) }
    };
    // The first tick one interval from now, not at once: at once it would ship the first
    // piece of a catch-up as a chunk, stored and then deleted when its segment completes.
    let first_tick = tokio::time::Instant::now() + opts.chunk_interval;
    let mut tick = tokio::time::interval_at(first_tick, opts.chunk_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            piece = pieces.recv() => match piece {
                None => {
                    if let Some(j) = chunk(&mut seg, &budget).await {
                        send(j).await?;
                    }
                    return Ok(());
                }
                Some(Piece::Data { lsn, data, server_end }) => {
                    take_data(&mut seg, &budget, lsn, &data, &jobs).await?;
                    let ship = if opts.synchronous {
                        // Everything that has arrived, as one chunk (group commit).
                        pieces.is_empty()
                    } else {
                        // A segment the server has already finished completes in moments:
                        // chunking it would only upload its bytes twice.
                        seg.unshipped() >= opts.chunk_size && server_end < seg.segment_end()
                    };
                    if ship {
                        if let Some(j) = chunk(&mut seg, &budget).await {
                            send(j).await?;
                        }
                    }
                }
                Some(Piece::TimelineSwitch { next_tli, switch, history }) => {
                    if seg.is_windowed() {
                        // The `.partial` will name chunks only: ship what is held first.
                        if let Some(j) = chunk(&mut seg, &budget).await {
                            send(j).await?;
                        }
                    }
                    seg.switch_timeline(next_tli, switch, history, &mut out);
                    for j in out.drain(..) {
                        send(j).await?;
                    }
                }
            },
            _ = tick.tick(), if !opts.synchronous => {
                if let Some(j) = chunk(&mut seg, &budget).await {
                    send(j).await?;
                }
            }
        }
    }
}

/// The open segment's unshipped bytes as a chunk job, their copy paid from the budget (waits
/// while the uploader works through what the budget holds).
async fn chunk(seg: &mut OpenSegment, budget: &Budget) -> Option<Job> {
    let n = seg.unshipped();
    if n == 0 {
        return None;
    }
    if seg.is_windowed() {
        // The window itself leaves; the next one waits until the budget has room.
        return seg.take_window(budget.segment().await);
    }
    let permit = budget.bytes(n).await;
    seg.take_chunk(Some(permit))
}

/// Deletes the chunks of segments already stored whole: a stream stopped (kill -9) between
/// storing a segment and deleting its chunks leaves them. Best effort: they are never read once
/// their segment exists, so a failure only leaves garbage.
async fn delete_stale_chunks(repo: &Repository, scan: &WalScan) {
    let mut stale = scan.stale_chunks();
    // A chunked segment's object names its chunks: those are the segment, not leftovers.
    let segments: std::collections::BTreeSet<WalFileName> =
        stale.iter().map(|c| c.segment.clone()).collect();
    for segment in segments {
        match repo.chunks_in_use(&segment).await {
            Ok(used) => stale.retain(|c| c.segment != segment || !used.contains(c)),
            Err(e) => {
                tracing::warn!(%segment, error = %e, "cannot tell which chunks the segment uses; keeping them");
                stale.retain(|c| c.segment != segment);
            }
        }
    }
    if stale.is_empty() {
        return;
    }
    tracing::info!(
        chunks = stale.len(),
        "deleting chunks of segments already stored whole"
    );
    repo.delete_chunks(&stale).await;
}

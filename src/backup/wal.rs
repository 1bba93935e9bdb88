//! The backup's own WAL, streamed over a second replication connection while the data streams,
//! as `pg_basebackup -X stream` does, so that a backup completes without waiting for
//! `archive_command`.
//!
//! - The connection is opened before BASE_BACKUP (to the very server the backup comes from)
//!   and START_REPLICATION, without a slot, begins at the start of the segment holding the
//!   backup's start LSN, on the backup's timeline, as soon as the server reports it.
//! - Every completed segment is stored as archive-push and `pitr stream` store it
//!   ([`Repository::put_wal_file`]: put-if-absent, identical bytes are success, so a segment
//!   archived or streamed meanwhile is neither written twice nor conflicting), then its
//!   summary. The backup waits for the last segment, not for its summary.
//! - The stream ends once WAL up to the stop LSN is received. On a primary the server switches
//!   segments at the end of a backup, so the last needed segment completes and is stored whole.
//!   On a standby no switch happens: the bytes received of the segment holding the stop LSN
//!   are stored as chunks ([`Repository::store_segment_prefix`]), the objects `pitr stream`
//!   writes and `archive-get` serves zero-padded; an incomplete segment is never stored as a
//!   complete one.
//! - Memory: the segment being filled plus at most one being stored.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::pg::{
    self, ConnConfig, HostPort, ReplicationConn, ReplicationMessage, TargetSessionAttrs,
};
use crate::repo::{PutOutcome, RepoError, Repository};
use crate::wal::{Lsn, SegNo, SegmentTail, TimelineId, WalFileName};

/// How often the stream reports its position while the server is quiet (well within the
/// default `wal_sender_timeout` of 60 s).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// Why the backup's own WAL could not be stored.
#[derive(Debug, thiserror::Error)]
pub(super) enum OwnWalError {
    /// The server or the connection failed; the WAL may still reach the repository through
    /// archive-push or `pitr stream`.
    #[error(transparent)]
    Pg(#[from] pg::Error),
    #[error("{0}")]
    Stream(String),
    /// The repository refused or failed: waiting for archiving would meet the same repository.
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Where the stream may stop, known once BASE_BACKUP has ended.
#[derive(Clone, Copy, Debug)]
pub(super) struct StopAt {
    pub lsn: Lsn,
    pub timeline: TimelineId,
    /// The server switches segments at the end of the backup (a primary does), so the segment
    /// holding the stop LSN completes and is stored whole.
    pub segment_switch: bool,
}

/// What the stream stored.
#[derive(Debug, Default)]
pub(super) struct OwnWal {
    /// Complete segments stored (or found already stored).
    pub segments: u64,
    pub already_stored: u64,
    /// The segment holding the stop LSN, stored as chunks up to this many bytes.
    pub prefix: Option<(WalFileName, usize)>,
    /// The last segment's summary, still being stored: the backup does not need it, so it
    /// publishes meanwhile (see [`OwnWal::summary_stored`]).
    summary: Option<JoinHandle<Result<Carry, RepoError>>>,
}

impl OwnWal {
    /// Waits for the last summary. A summary is derived data (`pitr verify` rebuilds a
    /// missing one from its segment), so a failure is logged, not the backup's.
    pub async fn summary_stored(&mut self) {
        let Some(task) = self.summary.take() else {
            return;
        };
        let error = match task.await {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(%error, "the summary of the backup's last WAL segment was not stored");
    }
}

/// The connection, opened before BASE_BACKUP so that the backup knows whether it may tell the
/// server not to wait for archiving.
pub(super) struct WalConn {
    conn: ReplicationConn,
}

impl WalConn {
    /// Connects to `host`, the one server the backup comes from (never another host of a
    /// multi-host conninfo), and checks that it is the same cluster.
    pub async fn connect(
        cfg: &ConnConfig,
        host: HostPort,
        system_id: u64,
    ) -> Result<WalConn, OwnWalError> {
        let mut cfg = cfg.clone();
        cfg.hosts = vec![host];
        cfg.target_session_attrs = TargetSessionAttrs::Any;
        let mut conn = ReplicationConn::connect(&cfg).await?;
        let sys = conn.identify_system().await?;
        if sys.system_id != system_id {
            return Err(OwnWalError::Stream(format!(
                "the WAL connection reached system {}, not {system_id}",
                sys.system_id
            )));
        }
        Ok(WalConn { conn })
    }

    /// Starts streaming from the segment holding `start` on `tli`, in a task.
    pub fn spawn(
        self,
        repo: Repository,
        tli: TimelineId,
        start: Lsn,
        seg_size: u64,
    ) -> OwnWalStream {
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(stream(self.conn, repo, tli, start, seg_size, stop_rx));
        OwnWalStream { task, stop_tx }
    }
}

/// A running stream of the backup's WAL. Dropping it (the backup failed) aborts the task.
pub(super) struct OwnWalStream {
    task: JoinHandle<Result<OwnWal, OwnWalError>>,
    stop_tx: oneshot::Sender<StopAt>,
}

impl Drop for OwnWalStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OwnWalStream {
    /// Tells the stream where the backup stopped and waits, at most `timeout`, until the WAL up
    /// to there is stored.
    pub async fn finish(mut self, stop: StopAt, timeout: Duration) -> Result<OwnWal, OwnWalError> {
        let (tx, _) = oneshot::channel();
        // A send error means the task has ended already: its result says why.
        let _ = std::mem::replace(&mut self.stop_tx, tx).send(stop);
        match tokio::time::timeout(timeout, &mut self.task).await {
            Err(_) => Err(OwnWalError::Stream(format!(
                "WAL up to {} was not received within {timeout:?}",
                stop.lsn
            ))),
            Ok(Err(join)) => Err(OwnWalError::Stream(format!("the WAL task failed: {join}"))),
            Ok(Ok(result)) => result,
        }
    }
}

/// The segment being filled.
///
/// Its buffer is allocated zeroed (fresh pages the kernel maps on first write) and a piece of
/// zeros is not copied into it: the end of a switched segment, which the server pads with
/// zeros and sends at the backup's stop, costs no memory. The backup's last segment is mostly
/// that padding on a quiet server.
struct Filling {
    tli: TimelineId,
    segno: SegNo,
    seg_size: u64,
    /// Zeroed, `seg_size` long once the segment's first bytes arrive; empty before.
    buf: Vec<u8>,
    /// Bytes of `buf` received.
    filled: usize,
}

/// Whether `b` holds only zero bytes (eight at a time).
fn all_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

impl Filling {
    fn new(tli: TimelineId, segno: SegNo, seg_size: u64) -> Filling {
        Filling {
            tli,
            segno,
            seg_size,
            buf: vec![],
            filled: 0,
        }
    }

    fn next_lsn(&self) -> Lsn {
        Lsn(Lsn::from_segno(self.segno, self.seg_size).0 + self.filled as u64)
    }

    /// The bytes received of the segment being filled.
    fn received(&self) -> &[u8] {
        &self.buf[..self.filled.min(self.buf.len())]
    }

    fn name(&self) -> WalFileName {
        WalFileName::segment(self.tli, self.segno, self.seg_size)
    }

    /// Appends `data` (received at [`Filling::next_lsn`]); returns the segments it completed.
    fn push(&mut self, mut data: &[u8]) -> Vec<(WalFileName, Vec<u8>)> {
        let mut done = vec![];
        while !data.is_empty() {
            if self.buf.is_empty() {
                self.buf = vec![0; self.seg_size as usize];
            }
            let n = (self.seg_size as usize - self.filled).min(data.len());
            let (piece, rest) = data.split_at(n);
            if !all_zero(piece) {
                self.buf[self.filled..self.filled + n].copy_from_slice(piece);
            }
            self.filled += n;
            data = rest;
            if self.filled as u64 == self.seg_size {
                done.push((self.name(), std::mem::take(&mut self.buf)));
                self.filled = 0;
                self.segno += 1;
            }
        }
        done
    }
}

/// Whether everything the backup needs has been received (see [`StopAt::segment_switch`]).
fn reached(stop: &StopAt, next: Lsn, seg_size: u64) -> bool {
    if !stop.segment_switch {
        return next >= stop.lsn;
    }
    let last = Lsn(stop.lsn.0.saturating_sub(1)).segno(seg_size);
    next >= Lsn::from_segno(last + 1, seg_size)
}

/// The previous segment's name and the carry its summary holds, for the next summary.
type Carry = Option<(WalFileName, Option<SegmentTail>)>;

/// A segment being stored: the segment, then its summary.
struct Upload {
    /// Sent once the segment is durable, before its summary is stored.
    durable: oneshot::Receiver<PutOutcome>,
    /// The summary's carry once both are stored.
    task: JoinHandle<Result<Carry, RepoError>>,
    /// End of the segment.
    end: Lsn,
}

/// The upload in flight, at most one: the next completed segment waits for it.
#[derive(Default)]
struct Uploads {
    running: Option<Upload>,
    stored: OwnWal,
    /// End of the WAL stored so far, reported to the server as flushed.
    durable: Lsn,
    carry: Carry,
}

impl Uploads {
    /// Waits until the running upload's segment is durable; its summary may still be on its
    /// way (returned).
    async fn wait_durable(
        &mut self,
    ) -> Result<Option<JoinHandle<Result<Carry, RepoError>>>, OwnWalError> {
        let Some(Upload { durable, task, end }) = self.running.take() else {
            return Ok(None);
        };
        let outcome = match durable.await {
            Ok(o) => o,
            // The task ended before the segment was stored: its result says why.
            Err(_) => {
                task.await
                    .map_err(|e| OwnWalError::Stream(format!("a WAL upload failed: {e}")))??;
                return Err(OwnWalError::Stream("a WAL upload ended early".into()));
            }
        };
        self.stored.segments += 1;
        if outcome == PutOutcome::AlreadyStored {
            self.stored.already_stored += 1;
        }
        self.durable = end;
        Ok(Some(task))
    }

    /// Waits for the running upload, its summary included.
    async fn wait(&mut self) -> Result<(), OwnWalError> {
        if let Some(task) = self.wait_durable().await? {
            self.carry = task
                .await
                .map_err(|e| OwnWalError::Stream(format!("a WAL upload failed: {e}")))??;
        }
        Ok(())
    }

    /// Stores a completed segment once the previous upload is done.
    async fn store(
        &mut self,
        repo: &Repository,
        name: WalFileName,
        data: Vec<u8>,
        seg_size: u64,
    ) -> Result<(), OwnWalError> {
        self.wait().await?;
        let end = name
            .segno(seg_size)
            .map_or(Lsn::INVALID, |n| Lsn::from_segno(n + 1, seg_size));
        let (tx, durable) = oneshot::channel();
        let (repo, prev) = (repo.clone(), self.carry.take());
        let task = tokio::spawn(async move {
            // The entry point archive-push and `pitr stream` share (put-if-absent, identical
            // bytes are success), then the summary, after its segment as everywhere.
            let outcome = repo.put_wal_file(&name, &data).await?;
            tracing::debug!(file = %name, already = outcome == PutOutcome::AlreadyStored, "backup WAL stored");
            let _ = tx.send(outcome);
            let summary = repo.summarize_wal_segment(&name, &data, prev).await;
            repo.store_pending_summary(&summary).await?;
            Ok(Some((name, summary.carry())))
        });
        self.running = Some(Upload { durable, task, end });
        Ok(())
    }
}

/// The stream task: receives until the stop position (once known) is reached, stores what
/// the backup needs, and ends the replication politely.
async fn stream(
    conn: ReplicationConn,
    repo: Repository,
    tli: TimelineId,
    start: Lsn,
    seg_size: u64,
    mut stop_rx: oneshot::Receiver<StopAt>,
) -> Result<OwnWal, OwnWalError> {
    let mut seg = Filling::new(tli, start.segno(seg_size), seg_size);
    let mut s = conn
        .start_replication(None, seg.next_lsn(), Some(tli))
        .await?;
    tracing::debug!(start = %seg.next_lsn(), timeline = tli, "streaming the backup's WAL");
    let mut uploads = Uploads::default();
    let mut stop: Option<StopAt> = None;
    let mut status = tokio::time::interval(STATUS_INTERVAL);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(st) = &stop {
            if reached(st, seg.next_lsn(), seg_size) {
                break;
            }
        }
        tokio::select! {
            st = &mut stop_rx, if stop.is_none() => {
                let st = st.map_err(|_| OwnWalError::Stream("the backup ended without a stop position".into()))?;
                if st.timeline != tli {
                    return Err(OwnWalError::Stream(format!(
                        "the backup started on timeline {tli} and stopped on timeline {}", st.timeline
                    )));
                }
                stop = Some(st);
            }
            _ = status.tick() => {
                s.send_status_update(seg.next_lsn(), uploads.durable, uploads.durable, false).await?;
            }
            msg = s.next_message() => match msg? {
                Some(ReplicationMessage::XLogData { data, .. }) => {
                    for (name, bytes) in seg.push(&data) {
                        uploads.store(&repo, name, bytes, seg_size).await?;
                    }
                }
                Some(ReplicationMessage::Keepalive { reply_requested: true, .. }) => {
                    s.send_status_update(seg.next_lsn(), uploads.durable, uploads.durable, false).await?;
                }
                Some(ReplicationMessage::Keepalive { .. }) => {}
                Some(ReplicationMessage::EndOfTimeline { next_timeline, .. }) => {
                    return Err(OwnWalError::Stream(format!(
                        "timeline {tli} ended (the server switched to timeline {next_timeline}) before the backup's WAL was received"
                    )));
                }
                None => return Err(OwnWalError::Stream("the server ended the WAL stream before the backup's stop position".into())),
            }
        }
    }
    let stop = stop.expect("the loop ends only once the stop position is known");
    // Everything needed is received: the server is told so while the last segment is stored.
    let (stored, ()) = tokio::join!(
        async {
            // The last summary is stored while the backup publishes itself.
            let summary = uploads.wait_durable().await?;
            let mut stored = std::mem::take(&mut uploads.stored);
            stored.summary = summary;
            stored.prefix = store_last_prefix(&repo, &seg, &stop).await?;
            Ok::<_, OwnWalError>(stored)
        },
        end_stream(s)
    );
    stored
}

/// The segment holding the stop LSN, when it is not complete: its bytes received so far, as
/// chunks. Bytes of a later segment (the stop LSN on a boundary) are not needed.
async fn store_last_prefix(
    repo: &Repository,
    seg: &Filling,
    stop: &StopAt,
) -> Result<Option<(WalFileName, usize)>, OwnWalError> {
    let last = Lsn(stop.lsn.0.saturating_sub(1)).segno(seg.seg_size);
    let received = seg.received();
    if received.is_empty() || seg.segno != last {
        return Ok(None);
    }
    let name = seg.name();
    repo.store_segment_prefix(&name, received).await?;
    tracing::info!(segment = %name, bytes = received.len(), stop_lsn = %stop.lsn,
        "stored the backup's last, incomplete segment as chunks");
    Ok(Some((name, received.len())))
}

/// Ends START_REPLICATION with CopyDone and closes, so the server logs no broken connection.
/// Everything needed is stored already: a failure here is only logged.
async fn end_stream(mut s: pg::XLogStream) {
    match tokio::time::timeout(Duration::from_secs(5), s.finish()).await {
        Ok(Ok(_)) => {
            if let Ok(c) = s.into_conn() {
                c.close().await;
            }
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "ending the backup's WAL stream"),
        Err(_) => tracing::debug!("the server did not end the backup's WAL stream in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;

    #[test]
    fn filling_cuts_exact_segments() {
        let mut f = Filling::new(1, 3, SEG);
        assert!(f.push(&vec![1; SEG as usize - 10]).is_empty());
        let done = f.push(&[2; 30]);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0.to_string(), "000000010000000000000003");
        assert_eq!(done[0].1.len() as u64, SEG);
        assert_eq!(&done[0].1[SEG as usize - 10..], &[2; 10]);
        assert_eq!(f.next_lsn(), Lsn(4 * SEG + 20));
        assert_eq!(f.received(), &[2; 20]);
    }

    /// Pieces of zeros are skipped, not lost: the segment is byte for byte what was sent,
    /// whatever mix of zero and non-zero pieces (and a piece of zeros ending in one byte).
    #[test]
    fn zero_pieces_leave_the_segment_exact() {
        let mut sent = vec![];
        let mut f = Filling::new(1, 3, SEG);
        let mut done = vec![];
        let mut i = 0u32;
        while (sent.len() as u64) < 2 * SEG + 100 {
            let len = 1 + (i as usize * 7919) % 70_000;
            let mut piece = vec![0u8; len];
            match i % 4 {
                0 => piece.iter_mut().for_each(|b| *b = (i % 251) as u8 | 1),
                1 => *piece.last_mut().expect("not empty") = 9,
                _ => {}
            }
            sent.extend_from_slice(&piece);
            done.extend(f.push(&piece));
            i += 1;
        }
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].1, sent[..SEG as usize]);
        assert_eq!(done[1].1, sent[SEG as usize..2 * SEG as usize]);
        assert_eq!(f.received(), &sent[2 * SEG as usize..]);
        assert_eq!(f.next_lsn(), Lsn(5 * SEG + sent.len() as u64 - 2 * SEG));
    }

    #[test]
    fn stop_waits_for_the_switched_segment_on_a_primary_only() {
        let stop = |segment_switch| StopAt {
            lsn: Lsn(5 * SEG + 0x100),
            timeline: 1,
            segment_switch,
        };
        assert!(reached(&stop(false), Lsn(5 * SEG + 0x100), SEG));
        assert!(!reached(&stop(true), Lsn(5 * SEG + 0x100), SEG));
        assert!(reached(&stop(true), Lsn(6 * SEG), SEG));
        // A stop LSN on a boundary needs nothing of the next segment.
        let on_boundary = StopAt {
            lsn: Lsn(6 * SEG),
            timeline: 1,
            segment_switch: true,
        };
        assert!(reached(&on_boundary, Lsn(6 * SEG), SEG));
    }
}

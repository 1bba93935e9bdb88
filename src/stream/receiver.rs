//! The receiver: owns the replication connection. Reads XLogData into the pipeline, answers
//! keepalives, reports feedback, reconnects, and follows timeline switches.
//!
//! Feedback (StandbyStatusUpdate) is honest by construction: `flush` and `apply` are the
//! uploader's durable position, which only ever covers WAL stored in the repository; `write` is
//! what was received. The slot advances to `flush`, so PostgreSQL keeps every byte that is not
//! yet durable, through any outage of ours or of the storage.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::borrow;
use super::error::{classify_connect_error, classify_start_error, StreamError};
use super::metrics::{self as m, Progress};
use super::options::StreamOptions;
use crate::pg::{self, sqlstate, ConnConfig, ReplicationConn, ReplicationMessage, XLogStream};
use crate::wal::{Lsn, TimelineId, WalFileName};

/// What the receiver hands to the segment assembler.
#[derive(Debug)]
pub(super) enum Piece {
    /// WAL at `lsn`; `server_end` is how far the server's WAL reaches (XLogData's walEnd).
    Data {
        lsn: Lsn,
        data: Bytes,
        server_end: Lsn,
    },
    /// The timeline ended at `switch`; continue on `next_tli`.
    TimelineSwitch {
        next_tli: TimelineId,
        switch: Lsn,
        history: (WalFileName, Vec<u8>),
    },
}

/// First reconnect delay; doubles up to the configured maximum.
const FIRST_RECONNECT: Duration = Duration::from_millis(250);

/// What one message means for the stream.
enum Flow {
    Continue,
    TimelineEnded(TimelineId, Lsn),
    Lost(Option<pg::Error>),
    Returned,
}

/// How one START_REPLICATION ended.
enum StreamEnd {
    Cancelled(XLogStream),
    TimelineEnded(XLogStream, TimelineId, Lsn),
    /// The server ended the stream (shutdown) or the connection failed transiently.
    Lost(Option<pg::Error>),
    /// A borrowed stream reached its `return_at`.
    Returned(XLogStream),
}

pub(super) struct Receiver {
    pub cfg: ConnConfig,
    pub slot: String,
    pub opts: StreamOptions,
    pub system_id: u64,
    pub seg_size: u64,
    pub progress: Arc<Progress>,
    /// `None` once the pipeline is closed for draining.
    pub pieces: Option<mpsc::Sender<Piece>>,
    pub durable: watch::Receiver<Lsn>,
    pub cancel: CancellationToken,
    pub force: CancellationToken,
    /// A received piece not yet accepted by the assembler (the queue was full). Kept across
    /// reconnects: dropping it would leave a hole, since streaming resumes after it.
    pending: Option<Piece>,
    /// Highest flush position sent, to send only when it moves (plus the periodic update).
    sent_flush: Lsn,
    /// Where a stream borrowed from a standby is left for the primary (see `borrow.rs`).
    return_at: Option<Lsn>,
    /// The end of the data received in the current (or last) START_REPLICATION session.
    session_end: Option<Lsn>,
}

/// What a failed status update means. The server may already have left COPY mode (asking
/// for the exact end of a historic timeline skips COPY; a shutting-down walsender ends it):
/// then the update is moot and the next message tells what happened.
fn status_failed(r: Result<(), pg::Error>) -> Option<StreamEnd> {
    match r {
        Ok(()) => None,
        Err(pg::Error::Protocol {
            context: "StandbyStatusUpdate",
            ..
        }) => None,
        Err(e) => Some(StreamEnd::Lost(Some(e))),
    }
}

/// A connection failure that retrying cannot fix.
fn fatal(e: &pg::Error) -> bool {
    // "too many connections" is transient, except when the server allows none at all
    // (max_wal_senders = 0, as wal_level = minimal requires): that is configuration, and
    // retrying it forever would hide it.
    !e.is_transient() || e.is_no_wal_senders()
}

impl Receiver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: ConnConfig,
        slot: String,
        opts: StreamOptions,
        system_id: u64,
        seg_size: u64,
        progress: Arc<Progress>,
        pieces: Option<mpsc::Sender<Piece>>,
        durable: watch::Receiver<Lsn>,
        cancel: CancellationToken,
        force: CancellationToken,
    ) -> Receiver {
        Receiver {
            cfg,
            slot,
            opts,
            system_id,
            seg_size,
            progress,
            pieces,
            durable,
            cancel,
            force,
            pending: None,
            sent_flush: Lsn::INVALID,
            return_at: None,
            session_end: None,
        }
    }

    /// Connects to any server of the conninfo, retrying transient failures with exponential
    /// backoff until cancelled (`None`). Cancellation-safe.
    pub async fn connect_any(
        &self,
    ) -> Result<Option<(ReplicationConn, pg::IdentifySystem)>, StreamError> {
        let mut delay = FIRST_RECONNECT;
        loop {
            let attempt = async {
                let mut conn = ReplicationConn::connect(&self.cfg).await?;
                let sys = conn.identify_system().await?;
                Ok::<_, pg::Error>((conn, sys))
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = self.cancel.cancelled() => return Ok(None),
            };
            match result {
                Ok(ok) => return Ok(Some(ok)),
                Err(e) if fatal(&e) => return Err(classify_connect_error(e)),
                Err(e) => {
                    metrics::counter!(m::ERRORS, "kind" => "connection").increment(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot connect to the server; retrying");
                    if self.sleep_or_cancel(delay).await {
                        return Ok(None);
                    }
                    delay = (delay * 2).min(self.opts.max_reconnect_delay);
                }
            }
        }
    }

    /// [`Receiver::connect_any`], and the server must still be the same cluster.
    async fn connect(&self) -> Result<Option<ReplicationConn>, StreamError> {
        let Some((conn, sys)) = self.connect_any().await? else {
            return Ok(None);
        };
        if sys.system_id != self.system_id {
            return Err(StreamError::OtherServer {
                expected: self.system_id,
                found: sys.system_id,
            });
        }
        Ok(Some(conn))
    }

    /// Closes the channel to the assembler, which then ships what it holds and stops.
    pub fn close_pipeline(&mut self) {
        self.pieces = None;
    }

    /// Streams from `start` on `tli` until cancelled, reconnecting as needed. Returns the
    /// stream (if still open) so that the caller can send the final feedback after draining.
    pub async fn run(
        &mut self,
        mut conn: Option<ReplicationConn>,
        mut tli: TimelineId,
        mut start: Lsn,
    ) -> Result<Option<XLogStream>, StreamError> {
        let mut delay = FIRST_RECONNECT;
        // Set when the primary no longer has the WAL at `start`: another server may lend it.
        let mut removed: Option<StreamError> = None;
        loop {
            let (stream, borrowed) = match removed.take() {
                Some(lost) => {
                    let lent =
                        borrow::borrow_wal(&self.cfg, self.system_id, tli, start, self.seg_size);
                    match lent.await {
                        Some(b) => {
                            self.return_at = b.return_at;
                            (b.stream, true)
                        }
                        None => return Err(lost),
                    }
                }
                None => match self.start_on_primary(conn.take(), tli, start, delay).await {
                    Ok(Some(s)) => (s, false),
                    Ok(None) if self.cancel.is_cancelled() => return self.stopped().await,
                    Ok(None) => {
                        delay = (delay * 2).min(self.opts.max_reconnect_delay);
                        continue;
                    }
                    Err(lost @ StreamError::WalRemoved { .. }) => {
                        removed = Some(lost);
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            self.progress.set_connected(true);
            let ended = self.stream(stream, tli).await;
            self.return_at = None;
            if !matches!(ended, Ok(StreamEnd::TimelineEnded(..))) {
                self.progress.set_connected(false);
            }
            match ended {
                Ok(StreamEnd::Returned(s)) => {
                    // Back to the primary right after the borrowed segment.
                    if let Ok(c) = s.into_conn() {
                        c.close().await;
                    }
                    start = self.next_start().unwrap_or(start);
                }
                // The walsender reports removed WAL only once it tries to read it.
                Err(lost @ StreamError::WalRemoved { .. }) if !borrowed => {
                    start = self.next_start().unwrap_or(start);
                    removed = Some(lost);
                }
                Err(e) => return Err(e),
                Ok(StreamEnd::Cancelled(s)) => return Ok(Some(s)),
                Ok(StreamEnd::TimelineEnded(s, next_tli, switch)) => {
                    let c = self.follow_timeline(s, tli, next_tli, switch).await?;
                    // A lender served the old timeline only: the rest comes from the primary.
                    conn = match borrowed {
                        true => {
                            c.close().await;
                            None
                        }
                        false => Some(c),
                    };
                    tli = next_tli;
                    // The new timeline's copy of the switch segment is streamed from its start.
                    start = Lsn::from_segno(switch.segno(self.seg_size), self.seg_size);
                    delay = FIRST_RECONNECT;
                }
                Ok(StreamEnd::Lost(err)) => {
                    // Resume after what was received (it is in the pipeline, or pending).
                    start = self.next_start().unwrap_or(start);
                    match &err {
                        Some(e) => {
                            tracing::warn!(error = %e, %start, retry_in = ?delay, "replication connection lost; reconnecting")
                        }
                        None => {
                            tracing::warn!(%start, retry_in = ?delay, "the server ended replication (shutdown?); reconnecting")
                        }
                    }
                    metrics::counter!(m::ERRORS, "kind" => "connection").increment(1);
                    if self.sleep_or_cancel(delay).await {
                        return self.stopped().await;
                    }
                    delay = (delay * 2).min(self.opts.max_reconnect_delay);
                }
            }
        }
    }

    /// Cancelled between sessions: what was received and not yet handed over still goes to the
    /// pipeline, to be made durable by the drain.
    async fn stopped(&mut self) -> Result<Option<XLogStream>, StreamError> {
        if let Some(p) = self.pending.take() {
            self.forward(p).await?;
        }
        Ok(None)
    }

    /// START_REPLICATION on the primary (`conn`, else a new connection). `None` when cancelled
    /// or after a refusal worth retrying (the wait is done).
    async fn start_on_primary(
        &mut self,
        conn: Option<ReplicationConn>,
        tli: TimelineId,
        start: Lsn,
        delay: Duration,
    ) -> Result<Option<XLogStream>, StreamError> {
        let c = match conn {
            Some(c) => c,
            None => {
                metrics::counter!(m::RECONNECTS).increment(1);
                match self.connect().await? {
                    Some(c) => c,
                    None => return Ok(None),
                }
            }
        };
        tracing::info!(timeline = tli, %start, slot = %self.slot, "START_REPLICATION");
        match c
            .start_replication(Some(&self.slot), start, Some(tli))
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                self.progress.set_connected(false);
                self.start_failed(e, tli, start, delay).await?;
                Ok(None)
            }
        }
    }

    /// START_REPLICATION was refused: a refusal that needs a human is the error; anything else
    /// is retried after `delay` (or cancellation).
    async fn start_failed(
        &mut self,
        e: pg::Error,
        tli: TimelineId,
        start: Lsn,
        delay: Duration,
    ) -> Result<(), StreamError> {
        if let Some(err) = classify_start_error(&e, &self.slot, tli, start) {
            return Err(err);
        }
        // The slot is in use for a moment while a previous walsender of ours exits, or while
        // the standby-slot keeper confirms a position on this server just promoted: retry.
        if fatal(&e) && e.sqlstate() != Some(sqlstate::OBJECT_IN_USE) {
            return Err(StreamError::Pg(e));
        }
        tracing::warn!(error = %e, retry_in = ?delay, "START_REPLICATION failed; retrying");
        self.sleep_or_cancel(delay).await;
        Ok(())
    }

    /// After the server ended timeline `tli` at `switch`: fetches the next timeline's history
    /// and hands the switch to the pipeline, which stores the history and the `.partial`.
    async fn follow_timeline(
        &mut self,
        s: XLogStream,
        tli: TimelineId,
        next_tli: TimelineId,
        switch: Lsn,
    ) -> Result<ReplicationConn, StreamError> {
        let mut c = s.into_conn()?;
        let (file, content) = c.timeline_history(next_tli).await?;
        let name = WalFileName::parse(&file).map_err(|_| {
            StreamError::Pg(pg::Error::Protocol {
                context: "TIMELINE_HISTORY",
                message: format!("bad history file name {file:?}"),
            })
        })?;
        tracing::info!(from = tli, to = next_tli, %switch, "timeline switch: following");
        self.forward(Piece::TimelineSwitch {
            next_tli,
            switch,
            history: (name, content),
        })
        .await?;
        Ok(c)
    }

    /// Where the next START_REPLICATION must begin: right after the last byte received in the
    /// last session, if it received any (a session on a new timeline starts before the end of
    /// the previous timeline's data, at the switch segment's start).
    fn next_start(&self) -> Option<Lsn> {
        self.session_end
    }

    async fn sleep_or_cancel(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.cancel.cancelled() => true,
        }
    }

    /// Hands a piece to the assembler, waiting for room (backpressure); a forced shutdown
    /// interrupts the wait.
    async fn forward(&mut self, piece: Piece) -> Result<(), StreamError> {
        let pieces = self.pieces.as_ref().ok_or(StreamError::PipelineClosed)?;
        tokio::select! {
            r = pieces.send(piece) => r.map_err(|_| StreamError::PipelineClosed),
            _ = self.force.cancelled() => Err(StreamError::NotDurable {
                received: self.progress.received(),
                durable: self.progress.durable(),
            }),
        }
    }

    async fn send_status(
        &mut self,
        s: &mut XLogStream,
        reply_requested: bool,
    ) -> Result<(), pg::Error> {
        let flush = *self.durable.borrow();
        let write = self.progress.received().max(flush);
        s.send_status_update(write, flush, flush, reply_requested)
            .await?;
        self.sent_flush = flush;
        metrics::counter!(m::STATUS_UPDATES).increment(1);
        Ok(())
    }

    /// One START_REPLICATION session. Cancellation: returns `Cancelled` at the next message
    /// boundary, after handing over any pending piece.
    async fn stream(
        &mut self,
        mut s: XLogStream,
        tli: TimelineId,
    ) -> Result<StreamEnd, StreamError> {
        let mut status = tokio::time::interval(self.opts.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pieces = self.pieces.clone().ok_or(StreamError::PipelineClosed)?;
        self.session_end = None;
        loop {
            let has_pending = self.pending.is_some();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    if let Some(p) = self.pending.take() {
                        self.forward(p).await?;
                    }
                    return Ok(StreamEnd::Cancelled(s));
                }
                permit = pieces.reserve(), if has_pending => {
                    let permit = permit.map_err(|_| StreamError::PipelineClosed)?;
                    if let Some(p) = self.pending.take() {
                        permit.send(p);
                    }
                }
                changed = self.durable.changed() => {
                    if changed.is_err() {
                        return Err(StreamError::PipelineClosed);
                    }
                    if *self.durable.borrow() > self.sent_flush {
                        if let Some(end) = status_failed(self.send_status(&mut s, false).await) {
                            return Ok(end);
                        }
                    }
                }
                _ = status.tick() => {
                    if let Some(end) = status_failed(self.send_status(&mut s, false).await) {
                        return Ok(end);
                    }
                }
                msg = s.next_message(), if !has_pending => {
                    match self.on_message(&mut s, msg, tli).await? {
                        Flow::Continue => {}
                        Flow::TimelineEnded(next, at) => {
                            return Ok(StreamEnd::TimelineEnded(s, next, at))
                        }
                        Flow::Lost(e) => return Ok(StreamEnd::Lost(e)),
                        Flow::Returned => return Ok(StreamEnd::Returned(s)),
                    }
                }
            }
        }
    }

    /// One message from the walsender: data becomes the pending piece, keepalives are
    /// answered, the end of a timeline or of the connection ends the stream.
    async fn on_message(
        &mut self,
        s: &mut XLogStream,
        msg: Result<Option<ReplicationMessage>, pg::Error>,
        tli: TimelineId,
    ) -> Result<Flow, StreamError> {
        match msg {
            Ok(Some(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            })) => {
                // A borrowed stream gives nothing past its return point: that is the primary's.
                let (data, returned) = match self.return_at {
                    Some(at) if wal_start.0 + data.len() as u64 >= at.0 => {
                        let keep = at.0.saturating_sub(wal_start.0) as usize;
                        (data.slice(..keep.min(data.len())), true)
                    }
                    _ => (data, false),
                };
                let end = Lsn(wal_start.0 + data.len() as u64);
                if !data.is_empty() {
                    self.session_end = Some(end);
                    self.progress.set_received(end, data.len() as u64);
                    self.progress.set_server(wal_end);
                    self.pending = Some(Piece::Data {
                        lsn: wal_start,
                        data,
                        server_end: wal_end,
                    });
                }
                if returned {
                    return Ok(Flow::Returned);
                }
            }
            Ok(Some(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            })) => {
                self.progress.set_server(wal_end);
                if reply_requested {
                    if let Some(StreamEnd::Lost(e)) =
                        status_failed(self.send_status(s, false).await)
                    {
                        return Ok(Flow::Lost(e));
                    }
                }
            }
            Ok(Some(ReplicationMessage::EndOfTimeline {
                next_timeline,
                next_timeline_start,
            })) => return Ok(Flow::TimelineEnded(next_timeline, next_timeline_start)),
            Ok(None) => return Ok(Flow::Lost(None)),
            Err(e) => {
                // The walsender reports removed WAL only once it tries to read it.
                let at = self.progress.received();
                if let Some(err) = classify_start_error(&e, &self.slot, tli, at) {
                    return Err(err);
                }
                if fatal(&e) {
                    return Err(StreamError::Pg(e));
                }
                return Ok(Flow::Lost(Some(e)));
            }
        }
        Ok(Flow::Continue)
    }

    /// After the pipeline drained: the last feedback, then a polite end of the stream.
    pub async fn finish(&mut self, mut s: XLogStream) {
        if let Err(e) = self.send_status(&mut s, false).await {
            tracing::warn!(error = %e, "could not send the final status update");
            return;
        }
        let end = tokio::time::timeout(Duration::from_secs(5), s.finish()).await;
        if let Ok(Ok(_)) = end {
            if let Ok(c) = s.into_conn() {
                c.close().await;
            }
        }
    }
}

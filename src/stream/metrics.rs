//! Progress of the stream, shared by its tasks, and the Prometheus metrics derived from it.
//!
//! All metric names are defined here, with units in the names. Recording goes through the
//! `metrics` facade: without `--metrics-addr` no recorder is installed and every call is a no-op.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::wal::Lsn;

pub const RECEIVED_LSN: &str = "pitr_stream_received_lsn";
pub const DURABLE_LSN: &str = "pitr_stream_durable_lsn";
pub const SERVER_LSN: &str = "pitr_stream_server_lsn";
pub const LAG_BYTES: &str = "pitr_stream_lag_bytes";
pub const LAG_SECONDS: &str = "pitr_stream_lag_seconds";
pub const UPLOAD_SECONDS: &str = "pitr_stream_upload_seconds";
pub const UPLOADED_BYTES: &str = "pitr_stream_uploaded_bytes_total";
pub const UPLOADS: &str = "pitr_stream_uploads_total";
pub const UPLOAD_RETRIES: &str = "pitr_stream_upload_retries_total";
pub const ERRORS: &str = "pitr_stream_errors_total";
pub const RECONNECTS: &str = "pitr_stream_reconnects_total";
pub const STATUS_UPDATES: &str = "pitr_stream_status_updates_total";
pub const LAST_DURABLE_TIMESTAMP: &str = "pitr_stream_last_durable_timestamp_seconds";
pub const RECEIVED_BYTES: &str = "pitr_stream_received_bytes_total";
/// 1 while a replication connection is streaming, 0 while it is lost or being re-established.
pub const UP: &str = "pitr_stream_up";

/// Installs the Prometheus exporter, serving `/metrics` on `addr`.
pub fn install_exporter(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(UPLOAD_SECONDS.to_string()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| e.to_string())?;
    for name in [UPLOADS, UPLOAD_RETRIES, ERRORS, RECONNECTS] {
        metrics::counter!(name).absolute(0);
    }
    metrics::gauge!(UP).set(0.0);
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Positions shared by the receiver and the uploader (lock-free: the receiver must never wait
/// on the uploader just to read a number).
#[derive(Debug, Default)]
pub struct Progress {
    received: AtomicU64,
    durable: AtomicU64,
    server: AtomicU64,
    /// Wall clock (ms since the epoch) when `durable` last advanced. While WAL is waiting, the
    /// lag in seconds counts from there: under steady load it stays below the chunk interval
    /// plus one upload, during a storage outage it grows with the outage.
    last_durable_ms: AtomicU64,
    /// Wall clock (ms) when the repository last fell behind the server (0: not behind), so that
    /// the first write after an idle hour does not look like an hour of lag.
    behind_since_ms: AtomicU64,
    connected: AtomicBool,
    /// Wall clock (ms) of the last change of `connected`.
    connected_changed_ms: AtomicU64,
}

impl Progress {
    pub fn new(durable: Lsn) -> Progress {
        let p = Progress::default();
        p.start_at(durable);
        p
    }

    /// (Re)starts the positions at `durable`: the stream shares one `Progress` with its
    /// observers from before it knows where it starts.
    pub fn start_at(&self, durable: Lsn) {
        self.received.store(durable.0, Ordering::Relaxed);
        self.durable.store(durable.0, Ordering::Relaxed);
        self.last_durable_ms.store(now_ms(), Ordering::Relaxed);
        self.publish();
    }

    pub fn server(&self) -> Lsn {
        Lsn(self.server.load(Ordering::Relaxed))
    }

    /// Records whether a replication connection is streaming.
    pub fn set_connected(&self, up: bool) {
        if self.connected.swap(up, Ordering::Relaxed) != up {
            self.connected_changed_ms.store(now_ms(), Ordering::Relaxed);
        }
        metrics::gauge!(UP).set(if up { 1.0 } else { 0.0 });
    }

    /// Whether a replication connection is streaming, and for how long that has been so.
    pub fn connected(&self) -> (bool, Duration) {
        let since = self.connected_changed_ms.load(Ordering::Relaxed);
        (
            self.connected.load(Ordering::Relaxed),
            Duration::from_millis(now_ms().saturating_sub(since)),
        )
    }

    pub fn received(&self) -> Lsn {
        Lsn(self.received.load(Ordering::Relaxed))
    }

    pub fn durable(&self) -> Lsn {
        Lsn(self.durable.load(Ordering::Relaxed))
    }

    pub fn set_received(&self, lsn: Lsn, bytes: u64) {
        self.received.fetch_max(lsn.0, Ordering::Relaxed);
        metrics::counter!(RECEIVED_BYTES).increment(bytes);
        self.publish();
    }

    pub fn set_server(&self, lsn: Lsn) {
        let server = self.server.fetch_max(lsn.0, Ordering::Relaxed).max(lsn.0);
        metrics::gauge!(SERVER_LSN).set(server as f64);
    }

    /// Records that WAL up to `lsn` is durable. Monotonic: never moves back.
    pub fn set_durable(&self, lsn: Lsn) {
        self.durable.fetch_max(lsn.0, Ordering::Relaxed);
        metrics::gauge!(LAST_DURABLE_TIMESTAMP).set(now_ms() as f64 / 1000.0);
        self.last_durable_ms.store(now_ms(), Ordering::Relaxed);
        self.publish();
    }

    /// WAL the server has (or we received) that is not yet durable in the repository. The
    /// server's position is also asked on a timer (`ops`), so this grows while the stream is
    /// blocked and receives nothing.
    pub fn lag_bytes(&self) -> u64 {
        let ahead = self.received().0.max(self.server().0);
        ahead.saturating_sub(self.durable().0)
    }

    /// How long WAL has been waiting for the repository to advance (0 when caught up).
    pub fn lag(&self) -> Duration {
        if self.lag_bytes() == 0 {
            self.behind_since_ms.store(0, Ordering::Relaxed);
            return Duration::ZERO;
        }
        let now = now_ms();
        let _ = self
            .behind_since_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        let since = self
            .last_durable_ms
            .load(Ordering::Relaxed)
            .max(self.behind_since_ms.load(Ordering::Relaxed));
        Duration::from_millis(now.saturating_sub(since))
    }

    /// Publishes the position gauges; called as positions move and on a timer, so that the lag
    /// keeps growing while nothing moves.
    pub fn publish(&self) {
        metrics::gauge!(RECEIVED_LSN).set(self.received().0 as f64);
        metrics::gauge!(DURABLE_LSN).set(self.durable().0 as f64);
        metrics::gauge!(LAG_BYTES).set(self.lag_bytes() as f64);
        metrics::gauge!(LAG_SECONDS).set(self.lag().as_secs_f64());
    }
}

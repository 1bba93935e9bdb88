//! Progress of the stream, shared by its tasks, and the Prometheus metrics derived from it.
//!
//! All metric names are defined here, with units in the names. Recording goes through the
//! `metrics` facade: without `--metrics-addr` no recorder is installed and every call is a no-op.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

impl Progress {
    pub fn new(durable: Lsn) -> Progress {
        let p = Progress::default();
        p.received.store(durable.0, Ordering::Relaxed);
        p.durable.store(durable.0, Ordering::Relaxed);
        p.last_durable_ms.store(now_ms(), Ordering::Relaxed);
        p.publish();
        p
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
        self.server.fetch_max(lsn.0, Ordering::Relaxed);
        metrics::gauge!(SERVER_LSN).set(lsn.0 as f64);
    }

    /// Records that WAL up to `lsn` is durable. Monotonic: never moves back.
    pub fn set_durable(&self, lsn: Lsn) {
        self.durable.fetch_max(lsn.0, Ordering::Relaxed);
        metrics::gauge!(LAST_DURABLE_TIMESTAMP).set(now_ms() as f64 / 1000.0);
        self.last_durable_ms.store(now_ms(), Ordering::Relaxed);
        self.publish();
    }

    /// Received but not yet durable.
    pub fn lag_bytes(&self) -> u64 {
        self.received().0.saturating_sub(self.durable().0)
    }

    /// How long received WAL has been waiting for the repository to advance (0 when caught up).
    pub fn lag(&self) -> Duration {
        if self.lag_bytes() == 0 {
            return Duration::ZERO;
        }
        let since = self.last_durable_ms.load(Ordering::Relaxed);
        Duration::from_millis(now_ms().saturating_sub(since))
    }

    fn publish(&self) {
        metrics::gauge!(RECEIVED_LSN).set(self.received().0 as f64);
        metrics::gauge!(DURABLE_LSN).set(self.durable().0 as f64);
        metrics::gauge!(LAG_BYTES).set(self.lag_bytes() as f64);
        metrics::gauge!(LAG_SECONDS).set(self.lag().as_secs_f64());
    }
}

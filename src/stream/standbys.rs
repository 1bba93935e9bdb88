//! The stream's slot on the standbys of a multi-host conninfo, kept at the stream's durable
//! position. A standby that is promoted later then still holds in `pg_wal` every byte of the
//! old timeline the repository lacks (its checkpoints would otherwise remove it), so that the
//! stream, restarted against the new primary, fetches that range from it instead of stopping
//! with a hole (docs/streaming.md, "Failover").
//!
//! Best effort: a standby that is down, refuses, or runs another cluster is skipped until the
//! next round; it never stops streaming.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::options::StreamOptions;
use super::{prepare_slot, StreamError};
use crate::pg::{ConnConfig, ReplicationConn};
use crate::wal::Lsn;

/// How often the standbys' slots are moved up to the durable position.
const ROUND: Duration = Duration::from_secs(10);
/// A standby that does not answer within this is skipped for the round.
const PER_STANDBY: Duration = Duration::from_secs(10);

/// Starts keeping the slots when the conninfo names several servers; cancel the token to stop.
pub(super) fn spawn(
    cfg: &ConnConfig,
    opts: &StreamOptions,
    system_id: u64,
    durable: watch::Receiver<Lsn>,
) -> CancellationToken {
    let stop = CancellationToken::new();
    if cfg.hosts.len() > 1 {
        let (cfg, opts) = (cfg.clone(), opts.clone());
        tokio::spawn(keep_slots(cfg, opts, system_id, durable, stop.clone()));
    }
    stop
}

/// Keeps the slot on every other host of `cfg` at the durable position until `cancel`.
async fn keep_slots(
    cfg: ConnConfig,
    opts: StreamOptions,
    system_id: u64,
    durable: watch::Receiver<Lsn>,
    cancel: CancellationToken,
) {
    let opts = StreamOptions {
        create_slot: true,
        ..opts
    };
    loop {
        let at = *durable.borrow();
        for host in &cfg.hosts {
            let one = cfg.only(host);
            let kept = tokio::time::timeout(PER_STANDBY, keep_one(&one, &opts, system_id, at));
            match tokio::select! { r = kept => r, _ = cancel.cancelled() => return } {
                Ok(Ok(Some(lsn))) => {
                    tracing::debug!(host = ?host.host, slot = %opts.slot, restart_lsn = %lsn, "standby slot kept")
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(host = ?host.host, error = %e, "cannot keep the slot on this server")
                }
                Err(_) => tracing::debug!(host = ?host.host, "no answer keeping the standby slot"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ROUND) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Creates the slot on one standby of the cluster if needed and confirms `durable` on it (a
/// physical slot's restart_lsn moves to what its client reports flushed). `None` for a
/// primary (the stream's own slot is there) or a server of another cluster.
async fn keep_one(
    cfg: &ConnConfig,
    opts: &StreamOptions,
    system_id: u64,
    durable: Lsn,
) -> Result<Option<Lsn>, StreamError> {
    let mut conn = ReplicationConn::connect(cfg).await?;
    let sys = conn.identify_system().await?;
    if sys.system_id != system_id || !conn.in_hot_standby().await? {
        conn.close().await;
        return Ok(None);
    }
    prepare_slot(&mut conn, opts).await?;
    // Never past what the standby has: its slot cannot keep WAL it does not have yet.
    let at = durable.min(sys.xlogpos);
    if at == Lsn::INVALID {
        conn.close().await;
        return Ok(None);
    }
    // Streaming starts at the standby's own position, so that (almost) nothing is sent: only
    // the reported flush position matters to the slot.
    let mut s = conn
        .start_replication(Some(&opts.slot), sys.xlogpos, Some(sys.timeline))
        .await?;
    s.send_status_update(at, at, at, false).await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), s.finish()).await;
    if let Ok(c) = s.into_conn() {
        c.close().await;
    }
    Ok(Some(at))
}

//! The service's watchers, each a loop until cancelled:
//! - [`server_position`]: asks the server's WAL position on a timer over its own replication
//!   connection, so the stream's lag gauges move even while the stream is blocked (a storage
//!   outage, a full memory budget) and receives nothing; and reports `stream_down` /
//!   `stream_up` when the stream's replication connection stays lost or comes back.
//! - [`repository`]: refreshes the repository's gauges and watches the RPO.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::jobs::RepoAccess;
use super::notify::{EventKind, Notifier};
use super::status::repository_status;
use crate::pg::{ConnConfig, ReplicationConn};
use crate::repo::Repository;
use crate::stream::metrics::Progress;

/// How long the stream's connection may be lost before `stream_down` is sent: a reconnect
/// after a server restart takes a few seconds and is not worth a page.
pub const STREAM_DOWN_AFTER: Duration = Duration::from_secs(30);

pub async fn server_position(
    cfg: ConnConfig,
    progress: Arc<Progress>,
    every: Duration,
    notify: Notifier,
    cancel: CancellationToken,
) {
    let mut conn: Option<ReplicationConn> = None;
    let mut reported_down = false;
    let mut down_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => break,
        }
        if let Err(e) = ask_position(&cfg, &mut conn, &progress).await {
            tracing::debug!(error = %e, "cannot ask the server's WAL position");
            conn = None;
        }
        progress.publish();
        // Measured from this loop's own first sight of the outage: before the stream's first
        // connection, `Progress` has no meaningful time of change.
        let (up, _) = progress.connected();
        let since = match (up, down_since) {
            (true, _) => {
                down_since = None;
                Duration::ZERO
            }
            (false, None) => {
                down_since = Some(Instant::now());
                Duration::ZERO
            }
            (false, Some(t)) => t.elapsed(),
        };
        if !up && since >= STREAM_DOWN_AFTER && !reported_down {
            reported_down = true;
            notify.send(
                EventKind::StreamDown,
                None,
                format!("the replication stream has been down for {}s; WAL is not reaching the repository (the slot keeps it on the server)", since.as_secs()),
            );
        } else if up && reported_down {
            reported_down = false;
            notify.send(
                EventKind::StreamUp,
                None,
                "the replication stream is up again",
            );
        }
    }
    if let Some(c) = conn {
        c.close().await;
    }
}

async fn ask_position(
    cfg: &ConnConfig,
    conn: &mut Option<ReplicationConn>,
    progress: &Progress,
) -> Result<(), crate::pg::Error> {
    if conn.is_none() {
        *conn = Some(ReplicationConn::connect(cfg).await?);
    }
    let c = conn.as_mut().expect("connected above");
    let sys = tokio::time::timeout(Duration::from_secs(10), c.identify_system())
        .await
        .map_err(|_| crate::pg::Error::Timeout {
            host: c.connection().host().host.to_string(),
            port: c.connection().host().port,
        })??;
    progress.set_server(sys.xlogpos);
    Ok(())
}

/// Refreshes the repository gauges every `every`, and with `rpo` set, sends `rpo_breached`
/// when the newest recoverable transaction is older than `rpo` and `rpo_restored` when it is
/// not any more.
pub async fn repository(
    access: RepoAccess,
    every: Duration,
    rpo: Option<Duration>,
    notify: Notifier,
    cancel: CancellationToken,
) {
    let mut repo: Option<Repository> = None;
    let mut breached = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => break,
        }
        if repo.is_none() {
            // The stream creates the repository on its first run: wait for it.
            repo = Repository::open(access.storage.clone(), access.write.clone())
                .await
                .ok();
        }
        let Some(r) = &repo else { continue };
        let status = match repository_status(r).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the repository's state for the metrics");
                continue;
            }
        };
        status.publish();
        let Some(rpo) = rpo else { continue };
        let behind = status
            .recoverable_until
            .map(|t| (Utc::now() - t).to_std().unwrap_or_default());
        let over = behind.is_none_or(|b| b > rpo);
        let rpo_text = humantime::format_duration(rpo);
        match (over, breached) {
            (true, false) => notify.send(
                EventKind::RpoBreached,
                None,
                match (behind, status.recoverable_until) {
                    (Some(b), Some(t)) => format!(
                        "the newest recoverable transaction is from {} ({}s ago), older than the RPO of {rpo_text}",
                        t.to_rfc3339(),
                        b.as_secs()
                    ),
                    _ => format!("nothing is recoverable from the repository (RPO {rpo_text}): take a base backup"),
                },
            ),
            (false, true) => notify.send(
                EventKind::RpoRestored,
                None,
                format!("the newest recoverable transaction is within the RPO of {rpo_text} again"),
            ),
            _ => {}
        }
        breached = over;
    }
}

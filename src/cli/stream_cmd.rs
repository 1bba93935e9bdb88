//! `pitr stream`: arguments, signals, metrics endpoint, and the exit code.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::conn_args::ConnArgs;
use super::exit::{Code, Failure};
use crate::backup::expire::RetentionPolicy;
use crate::config::{OpsOverrides, Settings};
use crate::ops::notify::NotifyOptions;
use crate::ops::service::Schedules;
use crate::ops::{run_service, ServiceOptions};
use crate::storage::Storage;
use crate::stream::{self, StreamOptions};

#[derive(Args, Debug)]
pub struct StreamArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Physical replication slot to stream through; it holds WAL on the server until it is
    /// durable in the repository.
    #[arg(long, value_name = "NAME", default_value = "pitr")]
    pub slot: String,
    /// Create the slot (reserving WAL at once) if it does not exist.
    #[arg(long)]
    pub create_slot: bool,
    /// application_name of the connection, for synchronous_standby_names and pg_stat_replication.
    #[arg(long, value_name = "NAME", default_value = "pitr")]
    pub application_name: String,
    /// Ship new WAL of the open segment at least this often.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub chunk_interval: Duration,
    /// Ship a chunk as soon as this many bytes are waiting (e.g. 4MiB).
    #[arg(long, value_name = "BYTES", default_value = "4194304")]
    pub chunk_size: usize,
    /// Report WAL flushed only once it is in the repository, shipping each write at once: name
    /// the application_name in synchronous_standby_names for RPO 0.
    #[arg(long)]
    pub synchronous: bool,
    /// Send a status update to the server at least this often.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub status_interval: Duration,
    /// Longest wait between reconnection attempts.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_reconnect_delay: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9187).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Allow streaming from a standby (cascading replication).
    #[arg(long)]
    pub allow_standby: bool,
    /// If the server no longer has the WAL after the repository's end, start at the slot's
    /// restart_lsn instead of failing. Leaves a gap: take a new base backup.
    #[arg(long)]
    pub accept_gap: bool,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// Schedules and notifications (docs/operations.md); each is also a config file key.
#[derive(Args, Debug)]
pub struct OpsArgs {
    /// Take a full base backup on this schedule: 5-field cron in UTC ("30 2 * * *"), @hourly,
    /// @daily, @weekly, or "every 6h". With a [retention] policy, expire after each backup.
    #[arg(long, env = "PITR_BACKUP_SCHEDULE", value_name = "SPEC")]
    pub backup_schedule: Option<String>,
    /// Take an incremental backup on the newest backup on this schedule (a full one when there
    /// is none to build on yet).
    #[arg(long, env = "PITR_BACKUP_INCREMENTAL_SCHEDULE", value_name = "SPEC")]
    pub backup_incremental_schedule: Option<String>,
    /// Run `pitr verify` on this schedule.
    #[arg(long, env = "PITR_VERIFY_SCHEDULE", value_name = "SPEC")]
    pub verify_schedule: Option<String>,
    /// Run `pitr drill` (restore to latest into a scratch directory, start PostgreSQL, run the
    /// default check, measure the RTO) on this schedule.
    #[arg(long, env = "PITR_DRILL_SCHEDULE", value_name = "SPEC")]
    pub drill_schedule: Option<String>,
    /// POST a JSON event here when a scheduled job fails or recovers, when the RPO is breached or
    /// restored, and when the stream goes down or comes back.
    #[arg(long, env = "PITR_NOTIFY_URL", value_name = "URL")]
    pub notify_url: Option<String>,
    /// Run this shell command with the same JSON event on stdin (e.g. a mail or chat CLI).
    #[arg(long, env = "PITR_NOTIFY_COMMAND", value_name = "CMD")]
    pub notify_command: Option<String>,
    /// Notify when the newest recoverable transaction is older than this (e.g. 15m).
    #[arg(long, env = "PITR_RPO_ALERT", value_name = "DURATION")]
    pub rpo_alert: Option<String>,
    /// Refresh the repository's gauges (and check the RPO) this often; each refresh lists the
    /// repository once.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = humantime::parse_duration)]
    pub stats_interval: Duration,
}

impl OpsArgs {
    pub fn overrides(&self) -> OpsOverrides {
        OpsOverrides {
            backup_schedule: self.backup_schedule.clone(),
            backup_incremental_schedule: self.backup_incremental_schedule.clone(),
            verify_schedule: self.verify_schedule.clone(),
            drill_schedule: self.drill_schedule.clone(),
            notify_url: self.notify_url.clone(),
            notify_command: self.notify_command.clone(),
            rpo_alert: self.rpo_alert.clone(),
        }
    }
}

fn service_options(settings: &Settings, a: &StreamArgs) -> ServiceOptions {
    let o = &settings.ops;
    let retention = (settings.retain_full.is_some() || settings.retain_window.is_some()).then_some(
        RetentionPolicy {
            full: settings.retain_full,
            window: settings.retain_window,
        },
    );
    ServiceOptions {
        schedules: Schedules {
            backup: o.backup_schedule.clone(),
            backup_incremental: o.backup_incremental_schedule.clone(),
            verify: o.verify_schedule.clone(),
            drill: o.drill_schedule.clone(),
        },
        restore_command: super::restore_cmd::restore_command(settings),
        retention,
        notify: NotifyOptions {
            url: o.notify_url.clone(),
            command: o.notify_command.clone(),
        },
        rpo_alert: o.rpo_alert,
        stats_interval: a.ops.stats_interval.max(Duration::from_secs(1)),
        position_interval: a
            .status_interval
            .clamp(Duration::from_secs(1), Duration::from_secs(10)),
        ..ServiceOptions::default()
    }
}

/// First SIGTERM/SIGINT: stop and drain. Second: give up draining.
fn install_signals(cancel: CancellationToken, force: CancellationToken) -> Result<(), Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| {
        Failure::new(
            Code::Internal,
            format!("cannot install SIGTERM handler: {e}"),
            None,
        )
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| {
        Failure::new(
            Code::Internal,
            format!("cannot install SIGINT handler: {e}"),
            None,
        )
    })?;
    tokio::spawn(async move {
        let mut first = true;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if first {
                tracing::info!(
                    "shutting down: making received WAL durable (signal again to abandon)"
                );
                cancel.cancel();
                first = false;
            } else {
                tracing::warn!("second signal: abandoning WAL not yet durable (the slot keeps it)");
                force.cancel();
                return;
            }
        }
    });
    Ok(())
}

/// Every configured repository but the one streamed into first (docs/repositories.md).
fn mirrors(settings: &Settings) -> Result<Vec<stream::Mirror>, Failure> {
    let others = settings
        .repositories
        .iter()
        .filter(|r| r.location != settings.repo);
    others
        .map(|r| {
            let storage = Storage::open(&r.location, settings.storage_retry_timeout)
                .map_err(|e| Failure::from(e).in_repository(&r.name))?;
            Ok(stream::Mirror {
                name: r.name.clone(),
                storage,
                write: settings.write_for(r),
            })
        })
        .collect()
}

pub async fn stream(storage: Storage, settings: &Settings, a: StreamArgs) -> Result<Code, Failure> {
    let conn = a.conn.config(a.application_name.clone())?;
    if let Some(addr) = a.metrics_addr {
        stream::metrics::install_exporter(addr).map_err(|m| {
            Failure::new(
                Code::Input,
                format!("cannot serve metrics on {addr}: {m}"),
                None,
            )
        })?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let svc = service_options(settings, &a);
    let opts = StreamOptions {
        slot: a.slot,
        create_slot: a.create_slot,
        chunk_interval: a.chunk_interval,
        chunk_size: a.chunk_size.max(1),
        synchronous: a.synchronous,
        status_interval: a.status_interval,
        max_reconnect_delay: a.max_reconnect_delay,
        allow_standby: a.allow_standby,
        accept_gap: a.accept_gap,
        mirrors: mirrors(settings)?,
        ..StreamOptions::default()
    };
    let cancel = CancellationToken::new();
    let force = CancellationToken::new();
    install_signals(cancel.clone(), force.clone())?;
    run_service(
        storage,
        settings.write.clone(),
        conn,
        opts,
        svc,
        cancel,
        force,
    )
    .await?;
    Ok(Code::Ok)
}

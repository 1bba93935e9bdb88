//! `pitr stream`: arguments, signals, metrics endpoint, and the exit code.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::conn_args::ConnArgs;
use super::exit::{Code, Failure};
use crate::config::Settings;
use crate::storage::Storage;
use crate::stream::{self, StreamError, StreamOptions};

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
}

fn failure(e: StreamError) -> Failure {
    match e {
        StreamError::Repo(r) => Failure::from_repo(r),
        StreamError::Pg(p) => Failure::from_pg(p),
        e @ StreamError::MissingSlot { .. } => Failure::new(
            Code::Postgres,
            e,
            Some("pass --create-slot to create it, or name an existing physical slot with --slot".into()),
        ),
        e @ StreamError::Standby => Failure::new(
            Code::Postgres,
            e,
            Some("connect to the primary (target_session_attrs=read-write), or pass --allow-standby".into()),
        ),
        e @ StreamError::WalLevelMinimal => Failure::new(
            Code::Postgres,
            e,
            Some("set wal_level = replica and max_wal_senders > 0, then restart PostgreSQL".into()),
        ),
        e @ StreamError::WalRemoved { .. } => Failure::new(
            Code::WalGap,
            e,
            Some("take a new base backup (`pitr backup`), then run `pitr stream --accept-gap` once to continue from the slot; \
                  keep the slot so that this cannot happen again".into()),
        ),
        e @ StreamError::RepositoryAhead { .. } => Failure::new(Code::Conflict, e, Some("use a separate repository for this server".into())),
        e @ StreamError::OtherServer { .. } => Failure::new(Code::Conflict, e, None),
        e @ StreamError::NotDurable { .. } => Failure::new(
            Code::Storage,
            e,
            Some("start `pitr stream` again: it resumes from what is durable, and the slot kept the rest".into()),
        ),
        e => Failure::new(Code::Internal, e, None),
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
    };
    let cancel = CancellationToken::new();
    let force = CancellationToken::new();
    install_signals(cancel.clone(), force.clone())?;
    stream::run(storage, settings.write.clone(), conn, opts, cancel, force)
        .await
        .map_err(failure)?;
    Ok(Code::Ok)
}

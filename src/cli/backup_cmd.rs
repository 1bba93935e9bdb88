//! `pitr backup`: argument handling, progress bar and output.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::audit_cmd::{Changes, Gate};
use super::conn_args::ConnArgs;
use super::exit::{Code, Failure};
use super::restore_cmd::human_bytes;
use crate::backup::{self, BackupOptions, BackupProgress};
use crate::config::Settings;
use crate::repo::IncrementalMode;
use crate::storage::Storage;

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Backup label, shown in pg_stat_progress_basebackup and backup_label.
    #[arg(long)]
    pub label: Option<String>,
    /// fast: checkpoint immediately; spread: wait for the next checkpoint to spread the I/O.
    #[arg(long, value_enum, default_value_t = Checkpoint::Fast)]
    pub checkpoint: Checkpoint,
    /// How long to wait after the data for the backup's WAL to be stored (streamed by the
    /// backup itself, or, when it cannot, by archive-push or `pitr stream`).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub wal_timeout: Duration,
    /// Limit the server's transfer rate, in kB/s (32 to 1048576).
    #[arg(long, value_name = "KB")]
    pub max_rate: Option<u32>,
    /// Remove unfinished backups whose lease has not been refreshed for this long, while this
    /// one runs (a running backup refreshes its lease every minute; this one is never removed).
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration)]
    pub abandoned_after: Duration,
    /// The configured repository to write (docs/repositories.md; default: the first).
    #[arg(long, value_name = "NAME")]
    pub to: Option<String>,
    /// Store only what changed since a parent backup: on PostgreSQL 17+ with summarize_wal = on
    /// the server sends only changed blocks; otherwise pitr compares blocks with the parent's
    /// block map.
    #[arg(long)]
    pub incremental: bool,
    /// The parent of an incremental backup (default: the newest complete backup of the same
    /// cluster and timeline).
    #[arg(long, value_name = "ID", requires = "incremental")]
    pub parent: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    Fast,
    Spread,
}

pub async fn backup(
    storage: Storage,
    settings: &Settings,
    a: BackupArgs,
    changes: &mut Changes,
    gate: Gate,
) -> Result<Code, Failure> {
    let conn = a.conn.config("pitr backup")?;
    let opts = BackupOptions {
        label: a.label,
        fast_checkpoint: a.checkpoint == Checkpoint::Fast,
        wal_timeout: a.wal_timeout,
        max_rate_kb: a.max_rate,
        abandoned_after: a.abandoned_after,
        incremental: a.incremental,
        parent: a.parent,
    };
    let bar = if std::io::stderr().is_terminal() && !a.json {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    let progress = |p: BackupProgress| match p {
        BackupProgress::Started { id, total_bytes } => {
            if let Some(t) = total_bytes {
                bar.set_length(t);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
            }
            bar.set_message(format!("backup {id}"));
        }
        BackupProgress::Bytes { done } => bar.set_position(done),
        BackupProgress::WaitingForWal { segment } => {
            bar.set_message(format!("waiting for WAL {segment}"))
        }
        BackupProgress::Incremental { parent, mode, why } if !a.json => {
            let how = match mode {
                IncrementalMode::Server => "server mode: the server sends only changed blocks",
                IncrementalMode::Block => {
                    "block mode: the server sends every file, pitr stores only changed blocks"
                }
            };
            bar.suspend(|| println!("incremental backup on {parent}, {how} ({why})"));
        }
        BackupProgress::Incremental { .. } => {}
    };
    let go_ahead: backup::GoAhead = Box::pin(gate.passed());
    let write = settings.write.clone();
    let info = backup::run_backup(storage, write, &conn, &opts, &progress, Some(go_ahead)).await;
    bar.finish_and_clear();
    let info = info?;
    changes.created.push(format!("backup {}", info.id));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info).expect("json"));
    } else {
        let kind = match (&info.parent, info.incremental_mode) {
            (Some(p), Some(m)) => format!("incremental backup ({m} mode, parent {p})"),
            _ => "backup".into(),
        };
        println!(
            "{kind} {} complete: {} stored as {} ({}), LSN {} to {} on timeline {}{}",
            info.id,
            human_bytes(info.raw_bytes()),
            human_bytes(info.stored_bytes()),
            info.compression,
            info.start_lsn,
            info.stop_lsn,
            info.timeline,
            info.source
                .as_ref()
                .map_or(String::new(), |s| format!(", from the {s}"))
        );
    }
    Ok(Code::Ok)
}

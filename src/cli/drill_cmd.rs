//! `pitr drill`: argument handling, signals and output.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::audit_cmd::Changes;
use super::exit::{Code, Failure};
use super::restore_cmd::restore_command;
use crate::config::Settings;
use crate::drill::{self, DrillError, DrillFailure, DrillOptions, DrillReport};
use crate::recovery::{self, RestoreRequest, Target};
use crate::repo::Repository;
use crate::storage::Storage;
use crate::wal::Lsn;

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").args(["target_time", "target_lsn", "target_name"])))]
pub struct DrillArgs {
    /// Restore to this time instead of the latest archived WAL (RFC 3339 or PostgreSQL's format).
    #[arg(long, value_name = "TIME")]
    pub target_time: Option<String>,
    /// Restore to this WAL position (e.g. 0/3000060).
    #[arg(long, value_name = "LSN")]
    pub target_lsn: Option<Lsn>,
    /// Restore to this restore point (pg_create_restore_point).
    #[arg(long, value_name = "NAME")]
    pub target_name: Option<String>,
    /// Query to run on the restored server; its first row is reported. Default: read the
    /// catalog of every database.
    #[arg(long, value_name = "SQL")]
    pub check_sql: Option<String>,
    /// Database the check query runs in.
    #[arg(long, value_name = "NAME", default_value = "postgres")]
    pub check_dbname: String,
    /// Directory of the PostgreSQL server binaries (default: /usr/lib/postgresql/N/bin for the
    /// repository's major version N, else PATH).
    #[arg(long, value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// Keep the scratch directory (stopped cleanly) instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// Where to create the scratch directory (default: $TMPDIR, else /tmp). It needs room for
    /// the whole restored cluster.
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// How long PostgreSQL may take to replay to the target and promote.
    #[arg(long, value_name = "DURATION", default_value = "6h", value_parser = humantime::parse_duration)]
    pub replay_timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn request(a: &DrillArgs) -> Result<RestoreRequest, Failure> {
    let target = if let Some(t) = &a.target_time {
        Target::Time(recovery::parse_target_time(t).map_err(Failure::input)?)
    } else if let Some(l) = a.target_lsn {
        Target::Lsn(l)
    } else if let Some(n) = &a.target_name {
        Target::Name(n.clone())
    } else {
        Target::Latest
    };
    Ok(RestoreRequest {
        target,
        ..RestoreRequest::latest()
    })
}

fn failure(e: DrillError) -> Failure {
    Failure::from(e)
}

/// SIGINT and SIGTERM, caught from the start so that neither kills pitr before it has
/// stopped the drill's server.
struct Signals(Option<(Signal, Signal)>);

impl Signals {
    fn catch() -> Signals {
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(int), Ok(term)) => Signals(Some((int, term))),
            _ => Signals(None),
        }
    }

    /// Resolves when one arrives; its name.
    async fn recv(&mut self) -> &'static str {
        let Some((int, term)) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
}

pub async fn drill(
    storage: Storage,
    settings: &Settings,
    a: DrillArgs,
    changes: &mut Changes,
) -> Result<Code, Failure> {
    let mut signals = Signals::catch();
    let opts = DrillOptions {
        request: request(&a)?,
        check_sql: a.check_sql.clone(),
        dbname: a.check_dbname.clone(),
        pg_bin: a.pg_bin.clone(),
        keep: a.keep,
        scratch_parent: a.scratch_dir.clone().unwrap_or_else(std::env::temp_dir),
        restore_command: restore_command(settings),
        replay_timeout: a.replay_timeout,
    };
    let repo = Repository::open(storage, settings.write.clone()).await?;
    // Dropping the drill on a signal stops its server and removes its directory (its guards'
    // Drop), before this process exits.
    let result = tokio::select! {
        r = drill::run(&repo, &opts) => r,
        sig = signals.recv() => {
            return Err(Failure::new(
                Code::JobFailed,
                format!("interrupted by {sig}: the drill's server was stopped and its scratch directory removed"),
                None,
            ));
        }
    };
    let report = match &result {
        Ok(r) => r,
        Err(DrillFailure { report, .. }) => report,
    };
    changes.details = serde_json::to_value(report).ok();
    print(report, a.json);
    if let (true, Some(dir)) = (a.json, &report.kept_dir) {
        eprintln!("pitr drill: kept the scratch directory {}", dir.display());
    }
    result.map(|_| Code::Ok).map_err(|f| failure(f.error))
}

fn print(r: &DrillReport, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("report serializes")
        );
        return;
    }
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let secs = |v: Option<f64>| v.map_or("-".into(), |s| format!("{s:.1}s"));
    println!("drill:          {}", if r.ok { "ok" } else { "FAILED" });
    println!("backup:         {}", or_dash(&r.backup));
    println!("target:         {}", r.target);
    println!("restore:        {}", secs(r.restore_seconds));
    println!("replay:         {}", secs(r.replay_seconds));
    println!(
        "RTO:            {} (from the start of the drill to accepting connections)",
        secs(r.rto_seconds)
    );
    println!(
        "recovered to:   LSN {}, last commit {}",
        or_dash(&r.recovered_lsn),
        or_dash(&r.recovered_time)
    );
    println!(
        "WAL fetched:    {}",
        super::restore_cmd::human_bytes(r.wal_fetched_bytes)
    );
    if let Some(row) = &r.check_rows {
        let cells: Vec<String> = row
            .iter()
            .map(|c| c.clone().unwrap_or_else(|| "NULL".into()))
            .collect();
        println!("check:          {}", cells.join(" | "));
    }
    if let Some(dir) = &r.kept_dir {
        println!(
            "kept:           {} (start it with pg_ctl -D {}/data)",
            dir.display(),
            dir.display()
        );
    }
}

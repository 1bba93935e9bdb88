//! `pitr check`: arguments and the report.

use std::time::Duration;

use clap::Args;

use super::conn_args::ConnArgs;
use super::exit::{Code, Failure};
use crate::config::Settings;
use crate::ops::check::{self, CheckOptions, CheckReport};
use crate::storage::Storage;

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print the report as JSON: {"ok": bool, "checks": [{"name", "ok", "message"}]}.
    #[arg(long)]
    pub json: bool,
    /// How long the segment of pg_switch_wal() may take to reach the repository.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The replication slot `pitr stream` uses (for clusters without archive_command).
    #[arg(long, value_name = "NAME", default_value = "pitr")]
    pub slot: String,
}

pub async fn check(storage: Storage, settings: &Settings, a: CheckArgs) -> Result<Code, Failure> {
    let conn = a.conn.config("pitr check")?;
    let opts = CheckOptions {
        timeout: a.timeout,
        slot: a.slot,
        repo_url: crate::ops::notify::public_location(&settings.repo.to_string()),
    };
    let report = check::check(storage, settings.write.clone(), &conn, &opts).await;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print_report(&report);
    }
    Ok(if report.ok {
        Code::Ok
    } else {
        Code::CheckFailed
    })
}

fn print_report(r: &CheckReport) {
    for c in &r.checks {
        let mark = if c.ok { "ok    " } else { "FAILED" };
        println!("{mark} {}: {}", c.name, c.message);
    }
    let failed = r.checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        println!("all checks passed");
    } else {
        println!(
            "{failed} check(s) failed (exit code {})",
            Code::CheckFailed as u8
        );
    }
}

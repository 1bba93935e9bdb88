//! `pitr status`: the repository's gauges, once (for clusters that archive with
//! archive_command and run no `pitr stream`: node_exporter's textfile collector, or scripts).

use clap::Args;

use super::exit::{Code, Failure};
use super::restore_cmd::human_bytes;
use crate::config::Settings;
use crate::ops::status::{repository_status, RepositoryStatus};
use crate::repo::Repository;
use crate::storage::Storage;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print the gauges in Prometheus text format.
    #[arg(long, conflicts_with = "json")]
    pub prometheus: bool,
    /// Print the gauges as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn status(storage: Storage, settings: &Settings, a: StatusArgs) -> Result<Code, Failure> {
    let repo = Repository::open(storage, settings.write.clone()).await?;
    let s = repository_status(&repo).await?;
    if a.prometheus {
        print!("{}", s.to_prometheus());
    } else if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&s.to_json()).expect("status serializes")
        );
    } else {
        print_text(&s);
    }
    Ok(Code::Ok)
}

fn print_text(s: &RepositoryStatus) {
    println!("repository: {}", s.repository);
    match &s.recoverable_until {
        Some(t) => println!(
            "recoverable until: {} ({}s ago)",
            t.to_rfc3339(),
            (chrono::Utc::now() - *t).num_seconds()
        ),
        None => println!("recoverable until: nothing is recoverable (no backup with its WAL)"),
    }
    match &s.last_backup {
        Some(b) => println!(
            "last backup: {} finished {} in {:.0}s, {} stored ({} backup(s) in all)",
            b.id,
            b.stop_time.to_rfc3339(),
            b.duration_seconds,
            human_bytes(b.stored_bytes),
            s.backups
        ),
        None => println!("last backup: none"),
    }
    println!(
        "stored: WAL {}, backups {}",
        human_bytes(s.repository_bytes.wal),
        human_bytes(s.repository_bytes.backups)
    );
}

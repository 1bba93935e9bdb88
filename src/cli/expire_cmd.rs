//! `pitr expire`: argument handling and output.

use clap::Args;

use super::audit_cmd::Changes;
use super::exit::{Code, Failure};
use super::restore_cmd::human_bytes;
use crate::backup::expire::{self, ExpireReport, RetentionPolicy};
use crate::backup::DEFAULT_ABANDONED_AFTER;
use crate::config::Settings;
use crate::repo::Repository;
use crate::storage::Storage;

#[derive(Args, Debug)]
pub struct ExpireArgs {
    /// Keep the newest N full backups, with the incremental backups built on them.
    #[arg(long, value_name = "N", env = "PITR_RETAIN_FULL")]
    pub retain_full: Option<usize>,
    /// Keep what restoring to any moment of the last DURATION needs (e.g. 7d, 36h).
    #[arg(long, value_name = "DURATION", env = "PITR_RETAIN_WINDOW")]
    pub retain_window: Option<String>,
    /// Show what would be removed and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn expire(
    storage: Storage,
    settings: &Settings,
    args: ExpireArgs,
    changes: &mut Changes,
) -> Result<Code, Failure> {
    let repo = Repository::open(storage, settings.write.clone()).await?;
    // Flags and PITR_RETAIN_* were merged with the config file's [retention] by `Settings`.
    let policy = RetentionPolicy {
        full: settings.retain_full,
        window: settings.retain_window,
    };
    let report = expire::expire(&repo, policy, DEFAULT_ABANDONED_AFTER, args.dry_run).await?;
    if !report.dry_run {
        record_changes(&report, changes);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print_report(&report);
    }
    Ok(Code::Ok)
}

fn record_changes(r: &ExpireReport, changes: &mut Changes) {
    for b in &r.expired {
        changes.deleted.push(format!("backup {}", b.id));
    }
    for id in &r.finished_from_earlier_run {
        changes
            .deleted
            .push(format!("backup {id} (rest of an interrupted expire)"));
    }
    if r.wal_objects_removed > 0 {
        changes.deleted.push(format!(
            "{} WAL objects ({} bytes)",
            r.wal_objects_removed, r.wal_bytes_removed
        ));
    }
}

fn print_report(r: &ExpireReport) {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    if r.expired.is_empty() {
        println!("no backup to expire");
    }
    for b in &r.expired {
        let kind = match &b.parent {
            Some(p) => format!("incremental on {p}, "),
            None => String::new(),
        };
        println!(
            "{verb} backup {} ({kind}finished {}, {})",
            b.id,
            b.stop_time.to_rfc3339(),
            human_bytes(b.stored_bytes)
        );
    }
    for id in &r.finished_from_earlier_run {
        println!("{verb} the rest of backup {id} (an earlier expire was interrupted)");
    }
    match (r.wal_kept_from, &r.wal_note) {
        (_, Some(note)) => println!("WAL: {note}"),
        (Some(lsn), None) => println!(
            "WAL: {verb} {} objects ({}) before {lsn}, the start of the oldest kept backup",
            r.wal_objects_removed,
            human_bytes(r.wal_bytes_removed)
        ),
        (None, None) => {}
    }
    let kept: Vec<&str> = r.kept.iter().map(|b| b.id.as_str()).collect();
    println!("kept {} backup(s): {}", kept.len(), kept.join(", "));
    if r.dry_run {
        println!("dry run: nothing was changed");
    }
}

//! `pitr expire`: argument handling and output.

use clap::Args;
use serde::Serialize;

use super::audit_cmd::Changes;
use super::exit::{Code, Failure};
use super::restore_cmd::human_bytes;
use super::storage_of;
use crate::backup::expire::{self, ExpireReport, RetentionPolicy};
use crate::backup::DEFAULT_ABANDONED_AFTER;
use crate::config::{RepositorySettings, Settings};
use crate::repo::{Repository, WriteOptions};
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
    // Flags and PITR_RETAIN_* were merged with the config file's [retention] by `Settings`.
    let policy = RetentionPolicy {
        full: settings.retain_full,
        window: settings.retain_window,
    };
    let report = expire_one(storage, settings.write.clone(), policy, args.dry_run).await?;
    if !report.dry_run {
        record_changes(&report, changes);
    }
    if args.json {
        println!("{}", to_json(&report));
    } else {
        print_report(&report);
    }
    Ok(Code::Ok)
}

async fn expire_one(
    storage: Storage,
    write: WriteOptions,
    policy: RetentionPolicy,
    dry_run: bool,
) -> Result<ExpireReport, Failure> {
    let repo = Repository::open(storage, write).await?;
    Ok(expire::expire(&repo, policy, DEFAULT_ABANDONED_AFTER, dry_run).await?)
}

/// What expire did in one of several repositories.
#[derive(Serialize)]
struct RepositoryOutcome {
    repository: String,
    /// `expired` (the report's fields follow), `no_policy` or `failed` (with `error`).
    outcome: &'static str,
    #[serde(flatten)]
    report: Option<ExpireReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<u8>,
}

/// `pitr expire` with several repositories: each by its own policy (`[repository.retention]`,
/// else `[retention]`; flags win), in order, each audited in its own trail. A repository that
/// fails does not stop the others; the exit code is the first failure's.
pub async fn expire_each(
    primary: Storage,
    settings: &Settings,
    args: &ExpireArgs,
) -> Result<Code, Failure> {
    if !settings.repositories.iter().any(|r| r.retention.is_set()) {
        return Err(expire::ExpireError::NoPolicy.into());
    }
    let mut outcomes = vec![];
    let mut first_failure: Option<Failure> = None;
    for r in &settings.repositories {
        let result = expire_in(&primary, settings, r, args.dry_run).await;
        let outcome = match result {
            Ok(Some(report)) => RepositoryOutcome::expired(&r.name, report),
            Ok(None) => RepositoryOutcome::no_policy(&r.name),
            Err(f) => {
                let outcome = RepositoryOutcome::failed(&r.name, &f);
                first_failure.get_or_insert(f);
                outcome
            }
        };
        if !args.json {
            print_outcome(&outcome);
        }
        outcomes.push(outcome);
    }
    if args.json {
        let json = serde_json::to_string_pretty(&outcomes).expect("report serializes");
        println!("{json}");
    }
    match first_failure {
        Some(f) if args.json => Ok(f.code),
        Some(f) => Err(f),
        None => Ok(Code::Ok),
    }
}

/// Expires repository `r` by its policy, audited unless a dry run; `None` without a policy.
async fn expire_in(
    primary: &Storage,
    settings: &Settings,
    r: &RepositorySettings,
    dry_run: bool,
) -> Result<Option<ExpireReport>, Failure> {
    if !r.retention.is_set() {
        return Ok(None);
    }
    let policy = RetentionPolicy {
        full: r.retention.full,
        window: r.retention.window,
    };
    let storage = storage_of(primary, r, settings)?;
    let write = settings.write_for(r);
    let mut report = None;
    let run = async {
        let mut changes = Changes::default();
        let result = expire_one(storage.clone(), write.clone(), policy, dry_run).await;
        let result = result.map(|rep| {
            if !rep.dry_run {
                record_changes(&rep, &mut changes);
            }
            report = Some(rep);
            Code::Ok
        });
        (result, changes)
    };
    let done = if dry_run {
        run.await.0
    } else {
        let run = |gate| super::audit_cmd::after(gate, run);
        super::audit_cmd::recorded(&storage, &write, "expire", run).await
    };
    done.map_err(|f| f.in_repository(&r.name))?;
    Ok(report)
}

impl RepositoryOutcome {
    fn expired(name: &str, report: ExpireReport) -> RepositoryOutcome {
        RepositoryOutcome {
            repository: name.to_string(),
            outcome: "expired",
            report: Some(report),
            error: None,
            exit_code: None,
        }
    }

    fn no_policy(name: &str) -> RepositoryOutcome {
        RepositoryOutcome {
            repository: name.to_string(),
            outcome: "no_policy",
            report: None,
            error: None,
            exit_code: None,
        }
    }

    fn failed(name: &str, f: &Failure) -> RepositoryOutcome {
        RepositoryOutcome {
            repository: name.to_string(),
            outcome: "failed",
            report: None,
            error: Some(f.message.clone()),
            exit_code: Some(f.code as u8),
        }
    }
}

fn print_outcome(o: &RepositoryOutcome) {
    println!("repository {}:", o.repository);
    match (&o.report, &o.error) {
        (Some(report), _) => print_report(report),
        (None, Some(e)) => println!("error: {e}"),
        (None, None) => println!(
            "no retention policy (set [repository.retention] or [retention]): nothing removed"
        ),
    }
}

fn to_json(report: &ExpireReport) -> String {
    serde_json::to_string_pretty(report).expect("report serializes")
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

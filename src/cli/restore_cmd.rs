//! `pitr restore` and `pitr list`: argument handling and output.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::Utc;
use clap::Args;
use serde_json::json;

use super::audit_cmd::{Changes, Gate};
use super::exit::{Code, Failure};
use crate::config::{RepositorySettings, Settings};
use crate::key_source::KeySource;
use crate::recovery::{
    self, Catalog, RecoveryError, RestoreRequest, Target, TargetAction, TimelineTarget, Window,
};
use crate::repo::Repository;
use crate::restore::recovery_conf::shell_word;
use crate::restore::{self, RestoreOptions};
use crate::storage::{Location, Storage};
use crate::wal::{Lsn, WalFileName};

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").args(["target_time", "target_lsn", "target_xid", "target_name", "target_immediate"])))]
pub struct RestoreArgs {
    /// Directory to restore into: must be empty or missing (with --delta: may hold a stopped
    /// cluster).
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,
    /// Restore into an existing, stopped data directory: keep files that already match the
    /// backup, rewrite the others, remove what the backup does not have.
    #[arg(long)]
    pub delta: bool,
    /// Stop at this time: RFC 3339 (2026-11-23T03:18:29Z) or PostgreSQL's format (2026-11-23 03:18:29+00).
    #[arg(long, value_name = "TIME")]
    pub target_time: Option<String>,
    /// Stop at this WAL position (e.g. 0/3000060).
    #[arg(long, value_name = "LSN")]
    pub target_lsn: Option<Lsn>,
    /// Stop at the commit of this transaction ID.
    #[arg(long, value_name = "XID")]
    pub target_xid: Option<u64>,
    /// Stop at this restore point (pg_create_restore_point).
    #[arg(long, value_name = "NAME")]
    pub target_name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long)]
    pub target_immediate: bool,
    /// Stop just before the target instead of just after it.
    #[arg(long)]
    pub target_exclusive: bool,
    /// What PostgreSQL does when it reaches the target.
    #[arg(long, value_enum, default_value_t = TargetAction::Promote)]
    pub target_action: TargetAction,
    /// Timeline to follow: latest (default), current, or a number.
    #[arg(long, value_name = "TLI", default_value = "latest")]
    pub target_timeline: TimelineTarget,
    /// Use this backup instead of choosing one.
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// Relocate a tablespace: OLD=NEW directories (repeatable).
    #[arg(long, value_name = "OLD=NEW")]
    pub tablespace_map: Vec<String>,
    /// Write standby.signal instead of recovery.signal: keep following the archive as a standby.
    #[arg(long)]
    pub standby: bool,
    /// Print the plan (backup, WAL range, bytes to fetch) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn target_of(a: &RestoreArgs) -> Result<Target, Failure> {
    Ok(if let Some(t) = &a.target_time {
        Target::Time(recovery::parse_target_time(t).map_err(Failure::input)?)
    } else if let Some(l) = a.target_lsn {
        Target::Lsn(l)
    } else if let Some(x) = a.target_xid {
        Target::Xid(x)
    } else if let Some(n) = &a.target_name {
        Target::Name(n.clone())
    } else if a.target_immediate {
        Target::Immediate
    } else {
        Target::Latest
    })
}

/// The restore_command written into the restored cluster: this very binary, with the
/// repository (or config file) it was given, never a secret. `%` is doubled because PostgreSQL
/// expands `%` sequences in restore_command.
pub(super) fn restore_command(settings: &Settings) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "pitr".into());
    let mut words = vec![shell_word(&exe)];
    if let Some(cfg) = &settings.config_file {
        let abs = std::path::absolute(cfg).unwrap_or_else(|_| cfg.clone());
        words.push("--config".into());
        words.push(shell_word(&abs.display().to_string()));
    }
    words.push("--repo".into());
    words.push(shell_word(&settings.repo.to_string()));
    // Where the key is, never the key: the server's restore_command must open the repository
    // the way this restore did, whether the source came from a flag, a variable or the file.
    match &settings.write.encryption_key {
        Some(KeySource::File(path)) => {
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            words.push("--encryption-key-file".into());
            words.push(shell_word(&abs.display().to_string()));
        }
        Some(KeySource::Command(command)) => {
            words.push("--encryption-key-command".into());
            words.push(shell_word(command));
        }
        None => {}
    }
    let cmd = words.join(" ").replace('%', "%%");
    format!("{cmd} archive-get %f %p")
}

pub async fn restore(
    storage: Storage,
    settings: &Settings,
    a: RestoreArgs,
    changes: &mut Changes,
    gate: Gate,
) -> Result<Code, Failure> {
    let target = target_of(&a)?;
    // Refuse a non-empty directory (or, for --delta, a running server's) before any other work.
    if a.delta {
        restore::check_stopped(&a.pgdata)?;
    } else {
        restore::check_target_dir(&a.pgdata)?;
    }
    let mut tablespace_map = vec![];
    for m in &a.tablespace_map {
        let (old, new) = m
            .split_once('=')
            .ok_or_else(|| Failure::input(format!("--tablespace-map {m:?}: expected OLD=NEW")))?;
        tablespace_map.push((old.to_string(), PathBuf::from(new)));
    }

    let req = RestoreRequest {
        target,
        action: a.target_action,
        timeline: a.target_timeline,
        backup_id: a.backup.clone(),
        inclusive: !a.target_exclusive,
        standby: a.standby,
    };
    let (repo, plan, chosen) = open_and_plan(storage, settings, &req).await?;
    // Recovery reads the repository the plan was made from: with several, another one may lack
    // WAL this one has, and one that is gone would stop recovery at its end (docs/repositories.md).
    let settings = &Settings {
        repo: chosen.location.clone(),
        write: settings.write_for(&chosen),
        repositories: vec![chosen],
        ..settings.clone()
    };

    let summary = json!({
        "backup": plan.backup.id,
        // What the restore reads, newest first: the backup, then (for an incremental) its
        // parent, ..., the full backup at the root.
        "chain": plan.chain.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        "backup_stop_lsn": plan.backup.stop_lsn,
        "backup_stop_time": plan.backup.stop_time,
        "timeline": plan.resolved_timeline,
        "wal_first": plan.wal_first.to_string(),
        "wal_last_archived": plan.wal_last.to_string(),
        "recoverable_end_lsn": plan.recoverable_end,
        "last_archived_transaction": plan.last_xact,
        "restore_point": plan.restore_point,
        "bytes_to_fetch": plan.bytes_to_fetch,
        "restore_command": restore_command(settings),
        "pgdata": a.pgdata,
        "dry_run": a.dry_run,
    });
    if a.dry_run {
        print_plan(&summary, a.json);
        return Ok(Code::Ok);
    }
    let opts = RestoreOptions {
        pgdata: a.pgdata.clone(),
        tablespace_map,
        restore_command: restore_command(settings),
        delta: a.delta,
    };
    // Planned (reads only) while the audit record was written; nothing is written before it is.
    gate.pass().await?;
    let report = restore::execute(&repo, &plan, &opts).await?;
    changes.created.push(format!(
        "restored backup {} into {}",
        plan.backup.id,
        a.pgdata.display()
    ));
    print_result(summary, &report, &a, settings, repo.storage_location());
    Ok(Code::Ok)
}

/// The plan and what the restore did, as text or JSON.
fn print_result(
    mut s: serde_json::Value,
    report: &restore::RestoreReport,
    a: &RestoreArgs,
    settings: &Settings,
    location: &Location,
) {
    if a.json {
        s["files"] = json!(report.files);
        s["bytes"] = json!(report.bytes);
        s["seconds"] = json!(report.seconds);
        s["delta"] = json!(a.delta);
        s["written_files"] = json!(report.written_files);
        s["written_bytes"] = json!(report.written_bytes);
        s["kept_files"] = json!(report.kept_files);
        s["kept_bytes"] = json!(report.kept_bytes);
        s["removed"] = json!(report.removed);
        s["rebuilt_files"] = json!(report.rebuilt_files);
        println!("{}", serde_json::to_string_pretty(&s).expect("json"));
    } else {
        print_plan(&s, false);
        println!(
            "restored {} files, {} in {:.1}s into {}",
            report.files,
            human_bytes(report.bytes),
            report.seconds,
            a.pgdata.display()
        );
        if report.rebuilt_files > 0 {
            println!(
                "reconstructed {} files from the chain's blocks, each checked",
                report.rebuilt_files
            );
        }
        if a.delta {
            println!(
                "delta: {} files ({}) written, {} files ({}) kept unchanged, {} removed (not in the backup)",
                report.written_files,
                human_bytes(report.written_bytes),
                report.kept_files,
                human_bytes(report.kept_bytes),
                report.removed
            );
        }
        println!(
            "start PostgreSQL on it to replay WAL to the target, e.g.: pg_ctl -D {} start",
            a.pgdata.display()
        );
        if matches!(
            location,
            Location::S3 { .. } | Location::Gcs { .. } | Location::Azure { .. }
        ) && settings.config_file.is_none()
        {
            println!(
                "note: restore_command reads the repository with PostgreSQL's environment; give the server the \
                 storage credentials, or use --config FILE so restore_command carries it"
            );
        }
    }
}

/// The first repository that answers and can restore to the target, with its plan. With
/// several repositories (docs/repositories.md) a failing one is skipped with a warning; when
/// none can, the first one's failure is the answer.
async fn open_and_plan(
    primary: Storage,
    settings: &Settings,
    req: &RestoreRequest,
) -> Result<(Repository, recovery::RestorePlan, RepositorySettings), Failure> {
    let several = settings.repositories.len() > 1;
    let mut first_failure = None;
    for r in &settings.repositories {
        let storage = match super::storage_of(&primary, r, settings) {
            Ok(s) => s,
            Err(f) => {
                first_failure.get_or_insert(f);
                continue;
            }
        };
        let attempt = async {
            let repo = Repository::open(storage, settings.write_for(r)).await?;
            let catalog = Catalog::load(&repo).await?;
            let plan = catalog.plan(&repo, req, Utc::now()).await?;
            Ok::<_, Failure>((repo, plan))
        };
        match attempt.await {
            Ok(found) => {
                if several {
                    tracing::info!(repository = %r.name, location = %r.location, "restoring from this repository");
                }
                return Ok((found.0, found.1, r.clone()));
            }
            Err(f) if several => {
                let f = f.in_repository(&r.name);
                tracing::warn!(error = %f.message, "cannot restore from this repository; trying the next");
                first_failure.get_or_insert(f);
            }
            Err(f) => return Err(f),
        }
    }
    Err(first_failure.unwrap_or_else(|| Failure::input("no repository is configured")))
}

fn print_plan(s: &serde_json::Value, as_json: bool) {
    if as_json {
        println!("{}", serde_json::to_string_pretty(s).expect("json"));
        return;
    }
    let b = |k: &str| {
        s[k].as_str()
            .map(str::to_string)
            .unwrap_or_else(|| s[k].to_string())
    };
    println!(
        "backup:            {} (ends at LSN {}, {})",
        b("backup"),
        b("backup_stop_lsn"),
        b("backup_stop_time")
    );
    if let Some(chain) = s["chain"].as_array().filter(|c| c.len() > 1) {
        let ids: Vec<&str> = chain.iter().filter_map(|v| v.as_str()).collect();
        println!(
            "chain:             {} (incremental, {} members; the last is the full backup)",
            ids.join(" <- "),
            ids.len()
        );
    }
    println!("timeline:          {}", b("timeline"));
    println!("WAL needed from:   {}", b("wal_first"));
    println!(
        "WAL archived to:   {} (recoverable up to LSN {})",
        b("wal_last_archived"),
        b("recoverable_end_lsn")
    );
    if let Some(x) = s["last_archived_transaction"].as_object() {
        println!(
            "last transaction:  {} (LSN {})",
            x["time"].as_str().unwrap_or_default(),
            x["lsn"].as_str().unwrap_or_default()
        );
    }
    if let Some(rp) = s["restore_point"].as_object() {
        println!(
            "restore point:     {:?} at LSN {}, {}",
            rp["name"].as_str().unwrap_or_default(),
            rp["lsn"].as_str().unwrap_or_default(),
            rp["time"].as_str().unwrap_or_default()
        );
    }
    println!(
        "to fetch:          {}",
        human_bytes(s["bytes_to_fetch"].as_u64().unwrap_or(0))
    );
    println!("restore_command:   {}", b("restore_command"));
}

/// A recoverable window in words: from the end of its backup to its last archived transaction.
pub fn window_text(w: &Window) -> String {
    let to = match &w.last_xact {
        Some(x) => format!(
            "{} (last archived transaction, LSN {})",
            x.time.format("%Y-%m-%d %H:%M:%S%.6f%:z"),
            x.lsn
        ),
        None => "no transaction archived after the backup yet".into(),
    };
    format!(
        "from {} (end of backup {}, LSN {}) to {to}",
        w.from_time.format("%Y-%m-%d %H:%M:%S%:z"),
        w.backup_id,
        w.from_lsn
    )
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A backup in `list --json`: its catalog object, with `stored_bytes` also for backups of
/// older pitr versions (their archives' stored size).
fn backup_json(b: &crate::repo::BackupInfo) -> serde_json::Value {
    let mut v = serde_json::to_value(b).expect("backup info serializes");
    v["stored_bytes"] = json!(b.stored_bytes());
    v
}

pub async fn list(storage: Storage, settings: &Settings, as_json: bool) -> Result<Code, Failure> {
    let repo = Repository::open(storage, settings.write.clone()).await?;
    let catalog = Catalog::load(&repo).await?;
    let seg = catalog.seg_size;
    let window: Result<Vec<Window>, String> = match catalog.windows(&repo).await {
        Ok(w) => Ok(w),
        Err(RecoveryError::Plan(e)) => Err(e.to_string()),
        Err(RecoveryError::Repo(e)) => return Err(e.into()),
    };
    let (backups, inv, streamed) = (&catalog.backups, &catalog.inventory, &catalog.streamed);
    let mut wal = BTreeMap::new();
    for (tli, t) in &inv.timelines {
        let ranges: Vec<_> = t
            .ranges
            .iter()
            .map(|&(a, b)| json!({"first": WalFileName::segment(*tli, a, seg).to_string(), "last": WalFileName::segment(*tli, b, seg).to_string(), "segments": b - a + 1}))
            .collect();
        wal.insert(tli.to_string(), ranges);
    }
    let d = repo.descriptor();
    let window_json = |w: &Window| {
        json!({
            "from_backup": w.backup_id,
            "from_time": w.from_time,
            "from_lsn": w.from_lsn,
            "to_time": w.last_xact.as_ref().map(|x| x.time),
            "to_transaction_lsn": w.last_xact.as_ref().map(|x| x.lsn),
            "to_lsn": w.to_lsn,
            "timeline": w.timeline,
        })
    };
    let windows_json = match &window {
        Ok(ws) => json!(ws.iter().map(window_json).collect::<Vec<_>>()),
        Err(e) => json!({"error": e}),
    };
    // The window a restore to `latest` uses (the newest), kept under the old key.
    let latest_json = match &window {
        Ok(ws) => ws
            .last()
            .map(window_json)
            .unwrap_or_else(|| json!({"error": "no backup has all of its WAL archived yet"})),
        Err(e) => json!({"error": e}),
    };
    if as_json {
        let out = json!({
            "repository": repo.location(),
            "system_identifier": d.system_identifier.to_string(),
            "pg_major": d.pg_major,
            "wal_segment_size": d.wal_segment_size,
            "backups": backups.iter().map(backup_json).collect::<Vec<_>>(),
            "wal": wal,
            // Newest streamed position (end of the newest chunk chain), on the highest
            // timeline that has chunks; null when no stream has shipped chunks.
            "streamed_to_lsn": streamed.values().next_back(),
            "streamed": streamed.iter().map(|(t, l)| (t.to_string(), *l)).collect::<BTreeMap<_, _>>(),
            "recoverable_window": latest_json,
            "recoverable_windows": windows_json,
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(Code::Ok);
    }
    println!(
        "repository {} (system {}, PostgreSQL {}, {} WAL segments)",
        repo.location(),
        d.system_identifier,
        d.pg_major,
        human_bytes(d.wal_segment_size)
    );
    println!();
    if backups.is_empty() {
        println!("no backups yet: run `pitr backup -d CONNINFO`");
    } else {
        println!(
            "{:<23} {:<11} {:>3} {:<14} {:<14} {:<26} {:>10} {:>10}  {:<23}  SOURCE",
            "BACKUP",
            "KIND",
            "TLI",
            "START LSN",
            "STOP LSN",
            "STOP TIME",
            "SIZE",
            "STORED",
            "PARENT"
        );
        for b in backups {
            println!(
                "{:<23} {:<11} {:>3} {:<14} {:<14} {:<26} {:>10} {:>10}  {:<23}  {}",
                b.id,
                b.kind.to_string(),
                b.timeline,
                b.start_lsn.to_string(),
                b.stop_lsn.to_string(),
                b.stop_time.format("%Y-%m-%d %H:%M:%S%:z").to_string(),
                human_bytes(b.raw_bytes()),
                human_bytes(b.stored_bytes()),
                b.parent.as_deref().unwrap_or("-"),
                // Backups of older pitr versions did not record it.
                b.source.as_ref().map_or("-".to_string(), |s| s.to_string())
            );
        }
    }
    println!();
    if inv.timelines.is_empty() {
        println!("no WAL archived yet");
    }
    for (tli, t) in &inv.timelines {
        for &(a, b) in &t.ranges {
            println!(
                "WAL timeline {tli}: {} .. {} ({} segments)",
                WalFileName::segment(*tli, a, seg),
                WalFileName::segment(*tli, b, seg),
                b - a + 1
            );
        }
        if t.ranges.len() > 1 {
            println!("  warning: {} holes on timeline {tli}", t.ranges.len() - 1);
        }
    }
    for (tli, lsn) in streamed {
        println!(
            "WAL timeline {tli}: streamed to {lsn} (segment {}, in chunks)",
            WalFileName::segment(*tli, lsn.segno(seg), seg)
        );
    }
    println!();
    match window {
        Ok(ws) if ws.is_empty() => {
            println!("recoverable: nothing yet (no backup has all of its WAL archived)")
        }
        Ok(ws) => {
            for w in &ws {
                println!("recoverable: {}", window_text(w));
                println!(
                    "             WAL to LSN {} on timeline {}",
                    w.to_lsn, w.timeline
                );
            }
        }
        Err(e) => println!("recoverable: nothing yet ({e})"),
    }
    Ok(Code::Ok)
}

//! `pitr copy`: argument handling, progress bar and output.

use std::io::IsTerminal;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::audit_cmd::Changes;
use super::exit::{Code, Failure};
use super::restore_cmd::human_bytes;
use crate::config::Settings;
use crate::copy::{self, CopyProgress, Side};
use crate::storage::Storage;

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The configured repository to copy from ([[repository]] name).
    #[arg(long, value_name = "NAME")]
    pub from: String,
    /// The configured repository to copy into; created when its location is empty.
    #[arg(long, value_name = "NAME")]
    pub to: String,
    /// Print the counts as JSON.
    #[arg(long)]
    pub json: bool,
}

struct Bar(ProgressBar);

impl CopyProgress for Bar {
    fn start(&self, objects: u64, bytes: u64) {
        self.0.set_length(bytes);
        self.0.set_message(format!("{objects} objects"));
    }

    fn copied(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

/// `target` is the repository `--to` names, opened by the caller.
pub async fn copy(
    target: Storage,
    settings: &Settings,
    a: CopyArgs,
    changes: &mut Changes,
) -> Result<Code, Failure> {
    if a.from == a.to {
        return Err(Failure::input(format!(
            "--from and --to both name {:?}: copy between two repositories",
            a.from
        )));
    }
    let from = settings.repository(&a.from)?;
    let to = settings.repository(&a.to)?;
    let source = Storage::open(&from.location, settings.storage_retry_timeout)
        .map_err(|e| Failure::from(e).in_repository(&from.name))?;
    let bar = if std::io::stderr().is_terminal() && !a.json {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "copy {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        )
    } else {
        ProgressBar::hidden()
    };
    let bar = Bar(bar);
    let side = |r: &crate::config::RepositorySettings, storage| Side {
        name: r.name.clone(),
        storage,
        write: settings.write_for(r),
    };
    let report = copy::copy(side(from, source), side(to, target), &bar).await;
    bar.0.finish_and_clear();
    let report = report?;
    if report.created_target {
        changes.created.push(format!("repository {}", to.location));
    }
    changes.created.push(format!(
        "copied {} objects ({} bytes) from {}",
        report.objects_copied, report.bytes_copied, from.name
    ));
    changes.created.extend(
        report
            .backups_copied
            .iter()
            .map(|id| format!("backup {id}")),
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
        return Ok(Code::Ok);
    }
    if report.created_target {
        println!("created repository {} for the same cluster", to.name);
    }
    println!(
        "copied {} objects ({}) from {} to {}; {} already there ({}); backups now in {}: {}",
        report.objects_copied,
        human_bytes(report.bytes_copied),
        from.name,
        to.name,
        report.objects_skipped,
        human_bytes(report.bytes_skipped),
        to.name,
        if report.backups_copied.is_empty() {
            "none new".to_string()
        } else {
            report.backups_copied.join(", ")
        }
    );
    Ok(Code::Ok)
}

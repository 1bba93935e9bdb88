//! `pitr verify`: argument handling, progress bar and the report.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use super::exit::{Code, Failure};
use super::restore_cmd::{human_bytes, window_text};
use crate::config::Settings;
use crate::repo::Repository;
use crate::storage::Storage;
use crate::verify::{self, Severity, VerifyOptions, VerifyProgress, VerifyReport};

pub async fn verify(
    storage: Storage,
    settings: &Settings,
    full: bool,
    as_json: bool,
) -> Result<Code, Failure> {
    let repo = Repository::open(storage, settings.write.clone()).await?;
    // Drawn only on a terminal: under cron or in CI the report alone goes out.
    let bar = if std::io::stderr().is_terminal() && !as_json {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} verifying [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let progress = |p: VerifyProgress| match p {
        VerifyProgress::Total { bytes, .. } => bar.set_length(bytes),
        VerifyProgress::Checked { bytes } => bar.inc(bytes),
    };
    let report = verify::verify(&repo, VerifyOptions { full }, &progress).await?;
    bar.finish_and_clear();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print_report(&repo, &report);
    }
    Ok(if report.errors() > 0 {
        Code::VerifyFailed
    } else {
        Code::Ok
    })
}

fn print_report(repo: &Repository, r: &VerifyReport) {
    println!(
        "verified {} objects ({}) in {:.1}s at {}",
        r.objects,
        human_bytes(r.bytes),
        r.seconds,
        repo.location()
    );
    println!(
        "  backups: {} ({} files checked against their manifests)",
        r.backups, r.backup_files
    );
    print!(
        "  WAL: {} segments ({})",
        r.wal_segments,
        human_bytes(r.wal_bytes)
    );
    if r.full {
        let mbs = if r.wal_seconds > 0.0 {
            r.wal_bytes as f64 / r.wal_seconds / 1e6
        } else {
            0.0
        };
        print!(", {} records walked ({mbs:.0} MB/s)", r.wal_records);
    }
    println!();
    for w in &r.windows {
        println!(
            "  recoverable: {}; WAL to LSN {} on timeline {}",
            window_text(w),
            w.to_lsn,
            w.timeline
        );
    }
    if r.problems.is_empty() {
        println!("OK: no problems found");
        return;
    }
    println!();
    println!("{} error(s), {} warning(s):", r.errors(), r.warnings());
    for p in &r.problems {
        let sev = match p.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        println!("  {sev}: {}", p.message);
        if let Some(o) = &p.object {
            println!("      object: {o}");
        }
        if let Some(i) = &p.impact {
            println!("      impact: {i}");
        }
    }
    if r.errors() > 0 {
        println!();
        println!("FAILED: the repository has problems that put restores at risk (exit code 10)");
    }
}

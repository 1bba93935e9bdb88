//! The scheduled jobs: thin adapters from the job APIs (`backup`, `verify`) to
//! [`scheduler::Job`](super::scheduler::Job). Each returns the error as `pitr` would print it.

use crate::backup::expire::{self, RetentionPolicy};
use crate::backup::{self, BackupError, BackupOptions, DEFAULT_ABANDONED_AFTER};
use crate::drill::{self, DrillOptions};
use crate::pg::ConnConfig;
use crate::recovery::RestoreRequest;
use crate::repo::{BackupInfo, Repository, WriteOptions};
use crate::storage::Storage;
use crate::verify::{self, VerifyOptions};

use super::metrics as m;
use super::scheduler::Job;

/// What every job needs to reach the repository.
#[derive(Clone, Debug)]
pub struct RepoAccess {
    pub storage: Storage,
    pub write: WriteOptions,
}

impl RepoAccess {
    async fn open(&self) -> Result<Repository, String> {
        Repository::open(self.storage.clone(), self.write.clone())
            .await
            .map_err(|e| e.to_string())
    }
}

/// Runs `f`'s future on a thread and runtime of its own. The verify and expire futures are
/// Send in fact, but the compiler cannot prove it through their higher-ranked closures
/// (rust-lang/rust#102211), and the scheduler needs Send futures.
async fn on_own_thread<F, Fut, T>(f: F) -> Result<T, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pitr-job".into())
        .spawn(move || {
            let r = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(f()),
                Err(e) => Err(format!("cannot start the job's runtime: {e}")),
            };
            let _ = tx.send(r);
        })
        .map_err(|e| format!("cannot start the job's thread: {e}"))?;
    rx.await
        .map_err(|_| "the job's thread ended without a result".to_string())?
}

/// A base backup over the service's own connection settings: full, or incremental on the
/// newest backup when `opts.incremental` (`--backup-incremental-schedule`).
#[derive(Clone)]
pub struct BackupJob {
    pub repo: RepoAccess,
    pub conn: ConnConfig,
    pub opts: BackupOptions,
}

impl BackupJob {
    async fn take(&self, opts: &BackupOptions) -> Result<BackupInfo, BackupError> {
        let (storage, write) = (self.repo.storage.clone(), self.repo.write.clone());
        backup::run_backup(storage, write, &self.conn, opts, &|_| {}, None).await
    }
}

#[async_trait::async_trait]
impl Job for BackupJob {
    fn name(&self) -> &'static str {
        match self.opts.incremental {
            true => m::JOB_BACKUP_INCREMENTAL,
            false => m::JOB_BACKUP,
        }
    }

    async fn run(&self) -> Result<String, String> {
        let info = match self.take(&self.opts).await {
            // A schedule of incremental backups starts its own chain: with nothing to build
            // on (a new repository, or every full backup expired), it takes a full one.
            Err(BackupError::NoParent { timeline }) if self.opts.incremental => {
                tracing::info!(
                    timeline,
                    "no backup to take the scheduled incremental backup on; taking a full backup"
                );
                let full = BackupOptions {
                    incremental: false,
                    parent: None,
                    ..self.opts.clone()
                };
                self.take(&full).await
            }
            other => other,
        }
        .map_err(|e| format!("backup failed: {e}"))?;
        // At once, not at the next repository refresh: the alert must clear now.
        let took = (info.stop_time - info.start_time).num_milliseconds() as f64 / 1000.0;
        metrics::gauge!(m::BACKUP_LAST_SUCCESS)
            .set(info.stop_time.timestamp_millis() as f64 / 1000.0);
        metrics::gauge!(m::BACKUP_LAST_DURATION).set(took);
        metrics::gauge!(m::BACKUP_LAST_STORED_BYTES).set(info.stored_bytes() as f64);
        Ok(format!(
            "backup {} complete: {} bytes stored in {took:.1}s, LSN {} to {}",
            info.id,
            info.stored_bytes(),
            info.start_lsn,
            info.stop_lsn
        ))
    }
}

/// Expiry by the configured `[retention]` policy, after each scheduled backup.
pub struct ExpireJob {
    pub repo: RepoAccess,
    pub policy: RetentionPolicy,
}

#[async_trait::async_trait]
impl Job for ExpireJob {
    fn name(&self) -> &'static str {
        m::JOB_EXPIRE
    }

    async fn run(&self) -> Result<String, String> {
        let (access, policy) = (self.repo.clone(), self.policy);
        let r = on_own_thread(move || async move {
            let repo = access.open().await?;
            expire::expire(&repo, policy, DEFAULT_ABANDONED_AFTER, false)
                .await
                .map_err(|e| format!("expire failed: {e}"))
        })
        .await?;
        Ok(format!(
            "expired {} backup(s) and {} WAL object(s), kept {} backup(s)",
            r.expired.len(),
            r.wal_objects_removed,
            r.kept.len()
        ))
    }
}

/// `pitr verify` (without `--full`) of the whole repository.
pub struct VerifyJob {
    pub repo: RepoAccess,
    pub full: bool,
}

#[async_trait::async_trait]
impl Job for VerifyJob {
    fn name(&self) -> &'static str {
        m::JOB_VERIFY
    }

    async fn run(&self) -> Result<String, String> {
        let (access, full) = (self.repo.clone(), self.full);
        let report = on_own_thread(move || async move {
            let repo = access.open().await?;
            verify::verify(&repo, VerifyOptions { full }, &|_| {})
                .await
                .map_err(|e| format!("verify could not read the repository: {e}"))
        })
        .await?;
        if report.errors() > 0 {
            let first = report
                .problems
                .iter()
                .find(|p| p.severity == verify::Severity::Error)
                .map(|p| p.message.clone())
                .unwrap_or_default();
            return Err(format!(
                "verify found {} problem(s) that put restores at risk; first: {first}",
                report.errors()
            ));
        }
        metrics::gauge!(m::VERIFY_LAST_SUCCESS)
            .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        Ok(format!(
            "verified {} objects ({} bytes): no problems",
            report.objects, report.bytes
        ))
    }
}

/// `pitr drill` to the latest point with the default check: proof that the repository restores,
/// and the RTO it takes.
pub struct DrillJob {
    pub repo: RepoAccess,
    pub restore_command: String,
}

#[async_trait::async_trait]
impl Job for DrillJob {
    fn name(&self) -> &'static str {
        m::JOB_DRILL
    }

    async fn run(&self) -> Result<String, String> {
        let access = self.repo.clone();
        let opts = DrillOptions {
            request: RestoreRequest::latest(),
            check_sql: None,
            dbname: "postgres".into(),
            pg_bin: None,
            keep: false,
            scratch_parent: std::env::temp_dir(),
            restore_command: self.restore_command.clone(),
            replay_timeout: std::time::Duration::from_secs(6 * 3600),
        };
        // On this runtime, not on a thread of its own: when the service stops, dropping this
        // future stops the drill's server and removes its directory (the drill's guards).
        let repo = access.open().await?;
        let report = drill::run(&repo, &opts)
            .await
            .map_err(|f| format!("drill failed: {}", f.error))?;
        let rto = report.rto_seconds.unwrap_or_default();
        metrics::gauge!(m::DRILL_LAST_SUCCESS).set(chrono::Utc::now().timestamp() as f64);
        metrics::gauge!(m::DRILL_LAST_RTO).set(rto);
        Ok(format!(
            "drill of backup {} reached {} in {rto:.1}s",
            report.backup.as_deref().unwrap_or("-"),
            report.recovered_lsn.as_deref().unwrap_or("the target")
        ))
    }
}

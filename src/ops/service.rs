//! `pitr stream` as a service: the stream, plus the schedules, the watchers and the
//! notifications around it. The stream is the service's reason to live: nothing here can stop
//! it, and when it stops, everything else stops with it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::jobs::{BackupJob, DrillJob, ExpireJob, RepoAccess, VerifyJob};
use super::notify::{EventKind, Notifier, NotifyOptions};
use super::schedule::Schedule;
use super::scheduler::{Job, Scheduler};
use super::watch;
use crate::backup::expire::RetentionPolicy;
use crate::backup::BackupOptions;
use crate::pg::ConnConfig;
use crate::repo::WriteOptions;
use crate::storage::Storage;
use crate::stream::{self, StreamError, StreamOptions, StreamSummary};

/// When each scheduled job runs; `None`: not scheduled.
#[derive(Clone, Debug, Default)]
pub struct Schedules {
    pub backup: Option<Schedule>,
    pub backup_incremental: Option<Schedule>,
    pub verify: Option<Schedule>,
    pub drill: Option<Schedule>,
}

#[derive(Clone, Debug)]
pub struct ServiceOptions {
    pub schedules: Schedules,
    /// The restore_command a scheduled drill's cluster fetches WAL with.
    pub restore_command: String,
    /// Expire by this policy after every scheduled backup.
    pub retention: Option<RetentionPolicy>,
    /// How scheduled backups are taken.
    pub backup: BackupOptions,
    pub notify: NotifyOptions,
    /// Notify when the newest recoverable transaction is older than this.
    pub rpo_alert: Option<Duration>,
    /// How often the repository's gauges are refreshed (one LIST of the repository each).
    pub stats_interval: Duration,
    /// How often the server's WAL position is asked.
    pub position_interval: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            schedules: Schedules::default(),
            restore_command: "pitr archive-get %f %p".into(),
            retention: None,
            backup: BackupOptions {
                label: None,
                fast_checkpoint: true,
                wal_timeout: Duration::from_secs(300),
                max_rate_kb: None,
                abandoned_after: crate::backup::DEFAULT_ABANDONED_AFTER,
                incremental: false,
                parent: None,
            },
            notify: NotifyOptions::default(),
            rpo_alert: None,
            stats_interval: Duration::from_secs(60),
            position_interval: Duration::from_secs(10),
        }
    }
}

/// The scheduled jobs, one line each. To add a kind of job (e.g. `drill`): implement
/// [`Job`], give it a field in [`Schedules`], and add its line here.
fn schedule_jobs(s: &mut Scheduler, svc: &ServiceOptions, repo: &RepoAccess, conn: &ConnConfig) {
    let expire = svc.retention.map(|policy| -> Arc<dyn Job> {
        Arc::new(ExpireJob {
            repo: repo.clone(),
            policy,
        })
    });
    let mut add = |schedule: &Option<Schedule>, job: Arc<dyn Job>, after: Option<Arc<dyn Job>>| {
        if let Some(schedule) = schedule {
            s.add(schedule.clone(), job, after);
        }
    };
    let backup = BackupJob {
        repo: repo.clone(),
        conn: conn.clone(),
        opts: svc.backup.clone(),
    };
    let verify = VerifyJob {
        repo: repo.clone(),
        full: false,
    };
    let incremental = BackupJob {
        opts: BackupOptions {
            incremental: true,
            parent: None,
            ..backup.opts.clone()
        },
        ..backup.clone()
    };
    add(&svc.schedules.backup, Arc::new(backup), expire.clone());
    add(
        &svc.schedules.backup_incremental,
        Arc::new(incremental),
        expire,
    );
    add(&svc.schedules.verify, Arc::new(verify), None);
    let drill = DrillJob {
        repo: repo.clone(),
        restore_command: svc.restore_command.clone(),
    };
    add(&svc.schedules.drill, Arc::new(drill), None);
}

/// Runs the stream with everything around it until `cancel` (see `stream::run`).
pub async fn run_service(
    storage: Storage,
    write: WriteOptions,
    conn: ConnConfig,
    stream_opts: StreamOptions,
    svc: ServiceOptions,
    cancel: CancellationToken,
    force: CancellationToken,
) -> Result<StreamSummary, StreamError> {
    let notify = Notifier::start(svc.notify.clone(), &storage.location().to_string());
    let repo = RepoAccess {
        storage: storage.clone(),
        write: write.clone(),
    };
    let backup_conn = conn.clone().application_name("pitr backup");
    let mut scheduler = Scheduler::new(notify.clone());
    schedule_jobs(&mut scheduler, &svc, &repo, &backup_conn);

    let ops = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(scheduler.run(ops.clone()));
    tasks.spawn(watch::server_position(
        conn.clone().application_name("pitr stream position"),
        stream_opts.progress.clone(),
        svc.position_interval,
        notify.clone(),
        ops.clone(),
    ));
    tasks.spawn(watch::repository(
        repo,
        svc.stats_interval,
        svc.rpo_alert,
        notify.clone(),
        ops.clone(),
    ));

    let result = stream::run(storage, write, conn, stream_opts, cancel, force).await;
    if let Err(e) = &result {
        notify.send(
            EventKind::StreamDown,
            None,
            format!("pitr stream stopped: {e}"),
        );
    }
    ops.cancel();
    while tasks.join_next().await.is_some() {}
    notify.finish(Duration::from_secs(20)).await;
    result
}

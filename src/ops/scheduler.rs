//! Runs jobs at their schedule's slots inside `pitr stream`.
//!
//! - A job never runs twice at once: a slot that comes while the previous run is still going
//!   is skipped and counted (`pitr_job_runs_total{outcome="skipped"}`).
//! - A failed run is logged, counted, notified (`job_failed`), and simply tried again at the
//!   next slot; the first success after failures sends `job_recovered`. Nothing a job does
//!   stops the stream.
//! - A job may have a follow-up that runs right after each of its successes (expiry after a
//!   backup), counted and notified as a job of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::metrics as m;
use super::notify::{EventKind, Notifier};
use super::schedule::Schedule;

/// One kind of scheduled work. `run` returns a one-line summary, or the error as the user
/// should read it.
#[async_trait::async_trait]
pub trait Job: Send + Sync {
    /// The `job` label and the name in logs and notifications.
    fn name(&self) -> &'static str;
    async fn run(&self) -> Result<String, String>;
}

/// A job with its bookkeeping: at most one run at a time, and whether the last run failed.
struct Tracked {
    job: Arc<dyn Job>,
    running: AtomicBool,
    failing: AtomicBool,
}

impl Tracked {
    fn new(job: Arc<dyn Job>) -> Arc<Tracked> {
        metrics::gauge!(m::JOB_FAILING, "job" => job.name()).set(0.0);
        for outcome in ["success", "failure", "skipped"] {
            metrics::counter!(m::JOB_RUNS, "job" => job.name(), "outcome" => outcome).absolute(0);
        }
        Arc::new(Tracked {
            job,
            running: AtomicBool::new(false),
            failing: AtomicBool::new(false),
        })
    }

    /// Runs the job once unless a run is in progress; `None` when skipped.
    async fn run_once(&self, notify: &Notifier) -> Option<bool> {
        let name = self.job.name();
        if self.running.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                job = name,
                "the previous run is still going: skipping this slot"
            );
            count(name, "skipped");
            return None;
        }
        tracing::info!(job = name, "scheduled job starting");
        let result = self.job.run().await;
        self.running.store(false, Ordering::Release);
        let ok = result.is_ok();
        let was_failing = self.failing.swap(!ok, Ordering::AcqRel);
        metrics::gauge!(m::JOB_FAILING, "job" => name).set(if ok { 0.0 } else { 1.0 });
        match result {
            Ok(summary) => {
                count(name, "success");
                tracing::info!(job = name, %summary, "scheduled job succeeded");
                if was_failing {
                    notify.send(EventKind::JobRecovered, Some(name), summary);
                }
            }
            Err(e) => {
                count(name, "failure");
                tracing::error!(job = name, error = %e, "scheduled job failed; it runs again at its next slot");
                notify.send(EventKind::JobFailed, Some(name), e);
            }
        }
        Some(ok)
    }
}

fn count(job: &'static str, outcome: &'static str) {
    metrics::counter!(m::JOB_RUNS, "job" => job, "outcome" => outcome).increment(1);
}

struct Entry {
    schedule: Schedule,
    job: Arc<Tracked>,
    after_success: Option<Arc<Tracked>>,
}

/// The service's schedules. Build with [`Scheduler::add`], then [`Scheduler::run`].
pub struct Scheduler {
    entries: Vec<Entry>,
    notify: Notifier,
}

impl Scheduler {
    pub fn new(notify: Notifier) -> Scheduler {
        Scheduler {
            entries: vec![],
            notify,
        }
    }

    /// Runs `job` at every slot of `schedule`, and `after_success` after each of its successes.
    pub fn add(
        &mut self,
        schedule: Schedule,
        job: Arc<dyn Job>,
        after_success: Option<Arc<dyn Job>>,
    ) {
        tracing::info!(job = job.name(), %schedule, "scheduled");
        self.entries.push(Entry {
            schedule,
            job: Tracked::new(job),
            after_success: after_success.map(Tracked::new),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Runs every schedule until `cancel`. A run in progress at cancellation is abandoned
    /// (a backup's lease then expires and the next backup cleans it up).
    pub async fn run(self, cancel: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for entry in self.entries {
            tasks.spawn(slots(entry, self.notify.clone(), cancel.clone()));
        }
        cancel.cancelled().await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// One schedule's loop: waits for each slot and starts a run in the background, so that the
/// next slot is seen (and skipped) even while the run goes on.
async fn slots(entry: Entry, notify: Notifier, cancel: CancellationToken) {
    let entry = Arc::new(entry);
    let mut runs = tokio::task::JoinSet::new();
    loop {
        let Some(wait) = entry.schedule.wait_from(Utc::now()) else {
            tracing::warn!(
                job = entry.job.job.name(),
                "the schedule has no further slot"
            );
            break;
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => break,
        }
        while runs.try_join_next().is_some() {}
        let (entry, notify) = (entry.clone(), notify.clone());
        runs.spawn(async move {
            if entry.job.run_once(&notify).await == Some(true) {
                if let Some(next) = &entry.after_success {
                    next.run_once(&notify).await;
                }
            }
        });
    }
    // Wait until the abandoned runs are dropped: a drill's guards stop its server and remove
    // its directory then, which must happen before the process exits.
    runs.abort_all();
    while runs.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    struct Slow {
        calls: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Job for Slow {
        fn name(&self) -> &'static str {
            "backup"
        }
        async fn run(&self) -> Result<String, String> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            if n == 0 {
                Err("first run fails".into())
            } else {
                Ok("ok".into())
            }
        }
    }

    #[tokio::test]
    async fn a_running_job_is_skipped_and_a_failure_is_retried() {
        let job = Tracked::new(Arc::new(Slow {
            calls: AtomicU32::new(0),
        }));
        let notify = Notifier::disabled();
        let (a, b) = tokio::join!(job.run_once(&notify), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            job.run_once(&notify).await
        });
        assert_eq!(a, Some(false));
        assert_eq!(b, None, "the overlapping run must be skipped");
        assert!(job.failing.load(Ordering::SeqCst));
        assert_eq!(job.run_once(&notify).await, Some(true));
        assert!(!job.failing.load(Ordering::SeqCst));
    }
}

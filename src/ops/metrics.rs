//! Names of the operations metrics (the stream's own are in `stream::metrics`). Units are in
//! the names; docs/operations.md says what each means and which alert reads it.

/// Completion time of the newest completed backup in the repository (0: none).
pub const BACKUP_LAST_SUCCESS: &str = "pitr_backup_last_success_timestamp_seconds";
/// How long the newest completed backup took, start to stored.
pub const BACKUP_LAST_DURATION: &str = "pitr_backup_last_duration_seconds";
/// Stored (compressed) bytes of the newest completed backup.
pub const BACKUP_LAST_STORED_BYTES: &str = "pitr_backup_last_stored_bytes";
/// Scheduled job runs, labels `job` (backup, expire, verify) and `outcome` (success, failure,
/// skipped).
pub const JOB_RUNS: &str = "pitr_job_runs_total";
/// 1 while a scheduled job's last run failed, label `job`.
pub const JOB_FAILING: &str = "pitr_job_failing";
/// Completion time of the last successful scheduled verify of this service (absent until one).
pub const VERIFY_LAST_SUCCESS: &str = "pitr_verify_last_success_timestamp_seconds";
/// Commit time of the newest transaction the repository can restore to (0: nothing
/// recoverable). `time() - this` is the data a restore now would lose.
pub const RECOVERABLE_UNTIL: &str = "pitr_recoverable_until_timestamp_seconds";
/// Stored bytes, label `kind` (wal, backups).
pub const REPOSITORY_BYTES: &str = "pitr_repository_bytes";

/// Completion time of the last successful scheduled drill of this service (absent until one).
pub const DRILL_LAST_SUCCESS: &str = "pitr_drill_last_success_timestamp_seconds";
/// The RTO the last successful scheduled drill measured: start to accepting connections.
pub const DRILL_LAST_RTO: &str = "pitr_drill_last_rto_seconds";

/// Job labels.
pub const JOB_BACKUP: &str = "backup";
pub const JOB_BACKUP_INCREMENTAL: &str = "backup_incremental";
pub const JOB_EXPIRE: &str = "expire";
pub const JOB_VERIFY: &str = "verify";
pub const JOB_DRILL: &str = "drill";

// Storage requests, counted in the storage layer (`storage::Storage`) for every command and
// exported by `pitr stream --metrics-addr` like everything above; docs/costs.md turns them
// into a monthly bill.
/// Requests sent to the repository's storage, label `kind` (put, get, head, list, delete).
pub const STORAGE_REQUESTS: &str = crate::storage::METRIC_REQUESTS;
/// Object bytes sent to (`direction` = up) and read from (`direction` = down) the storage.
pub const STORAGE_BYTES: &str = crate::storage::METRIC_BYTES;

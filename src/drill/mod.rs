//! `pitr drill`: prove that the repository restores, and measure how long it takes.
//!
//! A composite job above `restore`: plan with [`crate::recovery`], lay the backup out with
//! [`crate::restore::execute`] into a new scratch directory, start PostgreSQL of the
//! repository's major version on it (private socket directory, 127.0.0.1 only, no archiving:
//! a drill never writes to the repository), wait until it has replayed to the target and
//! promoted, run a check query, stop it and remove the directory. The RTO it reports is the
//! wall time from the start of the drill to the server accepting connections.
//!
//! Cleanup is tied to ownership, not to reaching the end: the server and the scratch directory
//! are guards in [`Resources`], so dropping the drill future (SIGINT/SIGTERM) stops the server
//! and removes the directory just as a failure does.

mod scratch;
mod server;

use crate::error::{Classify, Code};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use crate::recovery::{Catalog, PlanError, RecoveryError, RestorePlan, RestoreRequest, Target};
use crate::repo::{RepoError, Repository};
use crate::restore::{self, RestoreError, RestoreOptions};
use crate::wal::Lsn;

use scratch::Scratch;
use server::{Server, ServerConfig, ServerUser};

/// Lines of the server log quoted in a failure.
const LOG_LINES: usize = 20;
/// Attempts at starting the server when another process took its port first.
const START_ATTEMPTS: u32 = 3;

#[derive(Clone, Debug)]
pub struct DrillOptions {
    pub request: RestoreRequest,
    /// `None`: read every database's catalog.
    pub check_sql: Option<String>,
    /// The database the check query (and the drill's own questions) run in.
    pub dbname: String,
    pub pg_bin: Option<PathBuf>,
    pub keep: bool,
    /// Where the scratch directory is created.
    pub scratch_parent: PathBuf,
    /// The restore_command the restored cluster fetches WAL with.
    pub restore_command: String,
    /// How long PostgreSQL may take to replay and promote.
    pub replay_timeout: Duration,
}

/// What a drill measured. Serialized as `pitr drill --json` prints it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DrillReport {
    pub ok: bool,
    pub backup: Option<String>,
    pub target: String,
    pub restore_seconds: Option<f64>,
    pub replay_seconds: Option<f64>,
    pub rto_seconds: Option<f64>,
    pub recovered_lsn: Option<String>,
    /// The last replayed commit (UTC, RFC 3339).
    pub recovered_time: Option<String>,
    /// The first row of the check query.
    pub check_rows: Option<Vec<Option<String>>>,
    /// Bytes of WAL files PostgreSQL restored from the repository (uncompressed).
    pub wal_fetched_bytes: u64,
    /// The scratch directory, when kept.
    #[serde(skip)]
    pub kept_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Refused(PlanError),
    #[error(transparent)]
    Repo(RepoError),
    #[error(transparent)]
    Restore(RestoreError),
    /// The drill cannot run here: no binaries of the right version, no `postgres` user.
    #[error("{0}")]
    Setup(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("PostgreSQL did not reach the target: {reason}\n--- last lines of the server log ---\n{log}")]
    NotReached { reason: String, log: String },
    #[error("the check query failed: {reason}\n--- last lines of the server log ---\n{log}")]
    CheckFailed { reason: String, log: String },
}

impl Classify for DrillError {
    fn code(&self) -> Code {
        match self {
            DrillError::Refused(p) => p.code(),
            DrillError::Repo(r) => r.code(),
            DrillError::Restore(r) => r.code(),
            DrillError::Setup(_) | DrillError::Io { .. } => Code::Input,
            DrillError::NotReached { .. } => Code::DrillNotReached,
            DrillError::CheckFailed { .. } => Code::DrillCheckFailed,
        }
    }

    fn hint(&self) -> Option<String> {
        let hint = match self {
            DrillError::Refused(p) => return p.hint(),
            DrillError::Repo(r) => return r.hint(),
            DrillError::Restore(r) => return r.hint(),
            DrillError::Setup(_) => {
                "install the server binaries of the repository's PostgreSQL version, or pass --pg-bin DIR"
            }
            DrillError::NotReached { .. } => {
                "the server log above says why; `pitr verify` checks the repository's WAL"
            }
            DrillError::Io { .. } | DrillError::CheckFailed { .. } => return None,
        };
        Some(hint.into())
    }
}

/// A failed drill: the error, and what was measured before it.
#[derive(Debug)]
pub struct DrillFailure {
    pub report: DrillReport,
    pub error: DrillError,
}

/// What must be undone however the drill ends. Fields drop in order: the server stops before
/// its directory is removed.
#[derive(Default)]
struct Resources {
    server: Option<Server>,
    scratch: Option<Scratch>,
}

/// Runs a drill. Never writes to the repository; cancellation-safe (see the module docs).
pub async fn run(repo: &Repository, opts: &DrillOptions) -> Result<DrillReport, DrillFailure> {
    let mut report = DrillReport {
        target: describe_target(&opts.request.target),
        ..Default::default()
    };
    let mut res = Resources::default();
    let result = drill(repo, opts, &mut report, &mut res).await;
    if let Some(server) = res.server.as_mut() {
        server.stop(opts.keep);
    }
    if let Some(scratch) = res.scratch.as_mut() {
        report.wal_fetched_bytes = wal_fetched(scratch, repo.descriptor().wal_segment_size);
        scratch.keep(opts.keep);
        if opts.keep {
            report.kept_dir = Some(scratch.root().to_path_buf());
        }
    }
    drop(res);
    match result {
        Ok(()) => {
            report.ok = true;
            Ok(report)
        }
        Err(error) => Err(DrillFailure { report, error }),
    }
}

async fn drill(
    repo: &Repository,
    opts: &DrillOptions,
    report: &mut DrillReport,
    res: &mut Resources,
) -> Result<(), DrillError> {
    let t0 = Instant::now();
    let catalog = Catalog::load(repo).await.map_err(DrillError::Repo)?;
    let plan = catalog
        .plan(repo, &opts.request, Utc::now())
        .await
        .map_err(|e| match e {
            RecoveryError::Plan(p) => DrillError::Refused(p),
            RecoveryError::Repo(r) => DrillError::Repo(r),
        })?;
    report.backup = Some(plan.backup.id.clone());
    let bin_dir = server::find_bin_dir(opts.pg_bin.as_deref(), repo.descriptor().pg_major)
        .map_err(DrillError::Setup)?;
    let user = ServerUser::for_this_process().map_err(DrillError::Setup)?;
    let scratch = Scratch::create(&opts.scratch_parent, user.as_ref())
        .map_err(io_at(&opts.scratch_parent))?;
    let scratch = res.scratch.insert(scratch);

    let restore_opts = RestoreOptions {
        pgdata: scratch.data_dir(),
        tablespace_map: tablespace_map(&plan, scratch),
        restore_command: opts.restore_command.clone(),
        delta: false,
    };
    restore::execute(repo, &plan, &restore_opts)
        .await
        .map_err(DrillError::Restore)?;
    prepare(scratch, user.as_ref())?;
    let restored = Instant::now();
    report.restore_seconds = Some(seconds(restored - t0));

    let config = ServerConfig {
        bin_dir,
        data_dir: scratch.data_dir(),
        socket_dir: scratch.socket_dir(),
        hba_file: scratch.hba_file(),
        log_file: scratch.log_file(),
        port: 0,
        user,
    };
    let (spawned, ready) = start_and_wait(config, opts, res).await?;
    let (restore_s, replay_s) = (seconds(restored - t0), seconds(ready - spawned));
    report.replay_seconds = Some(replay_s);
    // Floating-point addition may exceed the whole by an ulp: the parts must never.
    report.rto_seconds = Some(seconds(ready - t0).max(restore_s + replay_s));
    let server = res.server.as_mut().expect("started");
    check_reached(server, opts, &plan, report).await?;
    report.check_rows = Some(run_check(server, opts).await?);
    Ok(())
}

/// `latest`, or the target's value as PostgreSQL's recovery_target_* setting would hold it.
fn describe_target(t: &Target) -> String {
    match t {
        Target::Latest => "latest".into(),
        Target::Immediate => "immediate".into(),
        Target::Time(t) => t.to_rfc3339(),
        Target::Lsn(l) => l.to_string(),
        Target::Xid(x) => x.to_string(),
        Target::Name(n) => n.clone(),
    }
}

/// Whole milliseconds, so that restore + replay never exceeds the RTO through rounding.
fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> DrillError + '_ {
    move |source| DrillError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every tablespace goes inside the scratch directory: a drill must never write where the
/// source server keeps its tablespaces (it may be this very host).
fn tablespace_map(plan: &RestorePlan, scratch: &Scratch) -> Vec<(String, PathBuf)> {
    plan.backup
        .archives
        .iter()
        .filter_map(|a| Some((a.tablespace_location.clone()?, a.tablespace_oid?)))
        .map(|(location, oid)| (location, scratch.tablespace_dir(oid)))
        .collect()
}

/// Makes the restored directory startable here: a postgresql.conf (a Debian cluster keeps its
/// configuration in /etc, so its backups have none), and everything owned by the server user.
fn prepare(scratch: &Scratch, user: Option<&ServerUser>) -> Result<(), DrillError> {
    let conf = scratch.data_dir().join("postgresql.conf");
    if !conf.exists() {
        std::fs::write(&conf, "# written by pitr drill: the backup had none\n")
            .map_err(io_at(&conf))?;
    }
    if let Some(u) = user {
        scratch::chown_tree(scratch.root(), u).map_err(io_at(scratch.root()))?;
    }
    Ok(())
}

/// Starts the server (on a new port if another process took the first) and waits until it
/// accepts connections out of recovery. Returns when it was spawned and when it was ready.
async fn start_and_wait(
    mut config: ServerConfig,
    opts: &DrillOptions,
    res: &mut Resources,
) -> Result<(Instant, Instant), DrillError> {
    let log_file = config.log_file.clone();
    let not_reached = |reason: String| DrillError::NotReached {
        reason,
        log: server::log_tail(&log_file, LOG_LINES),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        config.port = server::free_port().map_err(|e| not_reached(e.to_string()))?;
        let spawned = Instant::now();
        let server = Server::start(config.clone())
            .map_err(|e| not_reached(format!("cannot start postgres: {e}")))?;
        let server = res.server.insert(server);
        match wait_promoted(server, &opts.dbname, spawned + opts.replay_timeout).await {
            Ok(ready) => return Ok((spawned, ready)),
            Err(Wait::Exited(status)) => {
                let tail = server.log_tail(LOG_LINES);
                let port_taken =
                    tail.contains("could not bind") || tail.contains("Address already in use");
                if port_taken && attempt < START_ATTEMPTS {
                    tracing::info!(port = config.port, "port taken; starting on another");
                    res.server = None;
                    continue;
                }
                return Err(not_reached(format!("the server exited ({status})")));
            }
            Err(Wait::Timeout(last)) => {
                return Err(not_reached(format!(
                    "still not accepting connections after {} ({last})",
                    humantime::format_duration(opts.replay_timeout)
                )))
            }
            Err(Wait::Refused(e)) => {
                return Err(DrillError::CheckFailed {
                    reason: format!("{e} (set PGUSER to a role of the restored cluster)"),
                    log: server.log_tail(LOG_LINES),
                })
            }
        }
    }
}

enum Wait {
    Exited(std::process::ExitStatus),
    Timeout(String),
    /// The server is up but refuses us (a role or database that does not exist).
    Refused(String),
}

/// Polls until the server answers `pg_is_in_recovery() = false`. With hot_standby off it
/// refuses connections until recovery has ended, so the first answer is normally the last.
async fn wait_promoted(server: &mut Server, db: &str, deadline: Instant) -> Result<Instant, Wait> {
    loop {
        if let Some(status) = server.exited() {
            return Err(Wait::Exited(status));
        }
        let last = match server.query(db, "select pg_is_in_recovery()").await {
            Ok(rows) if first_value(&rows).as_deref() == Some("f") => return Ok(Instant::now()),
            Ok(_) => "still in recovery".to_string(),
            Err(e) if e.contains("does not exist") => return Err(Wait::Refused(e)),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(Wait::Timeout(last));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn first_value(rows: &[Vec<Option<String>>]) -> Option<String> {
    rows.first()?.first()?.clone()
}

/// Records where replay ended, and refuses an end short of the plan: with the default target
/// PostgreSQL promotes wherever restore_command first says "not found", so a segment that
/// vanished after planning would otherwise look like success.
async fn check_reached(
    server: &Server,
    opts: &DrillOptions,
    plan: &RestorePlan,
    report: &mut DrillReport,
) -> Result<(), DrillError> {
    let sql = "select pg_last_wal_replay_lsn(), to_char(pg_last_xact_replay_timestamp() \
               at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";
    let rows = server
        .query(&opts.dbname, sql)
        .await
        .map_err(|reason| DrillError::CheckFailed {
            reason,
            log: server.log_tail(LOG_LINES),
        })?;
    let row = rows.into_iter().next().unwrap_or_default();
    report.recovered_lsn = row.first().cloned().flatten();
    report.recovered_time = row.get(1).cloned().flatten();
    let recovered: Option<Lsn> = report.recovered_lsn.as_deref().and_then(|l| l.parse().ok());
    if let (Target::Latest, Some(x)) = (&plan.target, &plan.last_xact) {
        if recovered.is_none_or(|r| r < x.lsn) {
            return Err(DrillError::NotReached {
                reason: format!(
                    "replay ended at {}, before the last archived transaction at {} that the plan expected",
                    report.recovered_lsn.as_deref().unwrap_or("an unknown position"),
                    x.lsn
                ),
                log: server.log_tail(LOG_LINES),
            });
        }
    }
    Ok(())
}

/// The catalog tables the default check reads in each database.
const CATALOG_CHECK: &str = "select (select count(*) from pg_catalog.pg_class), \
     (select count(*) from pg_catalog.pg_attribute), \
     (select count(*) from pg_catalog.pg_namespace), \
     (select count(*) from pg_catalog.pg_type)";

/// Runs the check: `--check-sql` in the drill's database, or by default the catalog of every
/// database that accepts connections (then the row is `[databases, relations]`).
async fn run_check(
    server: &Server,
    opts: &DrillOptions,
) -> Result<Vec<Option<String>>, DrillError> {
    let failed = |reason: String| DrillError::CheckFailed {
        reason,
        log: server.log_tail(LOG_LINES),
    };
    if let Some(sql) = &opts.check_sql {
        let rows = server.query(&opts.dbname, sql).await.map_err(failed)?;
        return Ok(rows.into_iter().next().unwrap_or_default());
    }
    let dbs = server
        .query(
            &opts.dbname,
            "select datname from pg_catalog.pg_database where datallowconn order by 1",
        )
        .await
        .map_err(failed)?;
    let mut relations = 0u64;
    for db in dbs.iter().filter_map(|r| r.first().cloned().flatten()) {
        let rows = server
            .query(&db, CATALOG_CHECK)
            .await
            .map_err(|e| failed(format!("database {db}: {e}")))?;
        relations += first_value(&rows).and_then(|v| v.parse().ok()).unwrap_or(0);
    }
    Ok(vec![
        Some(dbs.len().to_string()),
        Some(relations.to_string()),
    ])
}

/// Bytes of the WAL files the server log says were restored from the archive: segments count
/// as a segment each, history files as their size.
fn wal_fetched(scratch: &Scratch, seg_size: u64) -> u64 {
    let log = std::fs::read_to_string(scratch.log_file()).unwrap_or_default();
    let pg_wal = scratch.data_dir().join("pg_wal");
    log.lines()
        .filter_map(|l| l.split("restored log file \"").nth(1)?.split('"').next())
        .map(|name| {
            if name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                seg_size
            } else {
                std::fs::metadata(pg_wal.join(name)).map_or(0, |m| m.len())
            }
        })
        .sum()
}

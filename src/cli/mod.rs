//! Command-line parsing and output. Calls the library; holds no logic.

mod audit_cmd;
mod backup_cmd;
mod check_cmd;
mod conn_args;
mod copy_cmd;
mod drill_cmd;
mod exit;
mod expire_cmd;
mod key_cmd;
mod restore_cmd;
mod status_cmd;
mod stream_cmd;
mod verify_cmd;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::archive::{self, GetOutcome};
use crate::config::{Overrides, RepositorySettings, Settings};
use crate::repo::WriteOptions;
use crate::storage::Storage;
use audit_cmd::Gate;

pub use exit::{Code, Failure};

#[derive(Parser, Debug)]
#[command(
    name = "pitr",
    version,
    about = "PostgreSQL WAL archiving, streaming, base backups and point-in-time recovery",
    long_about = "PostgreSQL WAL archiving, streaming, base backups and point-in-time recovery.\n\n\
        Wire it into postgresql.conf:\n  \
        archive_mode = on\n  \
        archive_command = 'pitr --repo /var/lib/pitr archive-push %p'\n  \
        restore_command = 'pitr --repo /var/lib/pitr archive-get %f %p'\n\n\
        Exit codes are listed in docs/exit-codes.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// TOML configuration file (flags and PITR_* variables override it).
    #[arg(long, global = true, env = "PITR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Repository: a directory (/var/lib/pitr, file:///var/lib/pitr), s3://bucket/prefix,
    /// gs://bucket/prefix or az://container/prefix. S3 credentials, region and endpoint come from
    /// the standard AWS_* variables (AWS_ENDPOINT_URL for MinIO, R2 and other S3-compatible stores).
    #[arg(long, global = true, env = "PITR_REPO", value_name = "URL")]
    pub repo: Option<String>,
    /// Compression for new objects: lz4 (default), zstd or none.
    #[arg(long, global = true, env = "PITR_COMPRESSION", value_name = "CODEC")]
    pub compression: Option<String>,
    /// zstd level, 1-19 (default 3).
    #[arg(long, global = true, env = "PITR_COMPRESSION_LEVEL", value_name = "N")]
    pub compression_level: Option<i32>,
    /// How long to keep retrying transient storage errors before failing (e.g. 30s, 5m; default 60s).
    #[arg(
        long,
        global = true,
        env = "PITR_STORAGE_RETRY_TIMEOUT",
        value_name = "DURATION"
    )]
    pub storage_retry_timeout: Option<String>,
    /// Log filter: error, warn, info (default), debug, trace, or a tracing filter expression.
    #[arg(long, global = true, env = "PITR_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log format on stderr: text (default) or json.
    #[arg(long, global = true, env = "PITR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Encryption passphrase file (trailing newline stripped): required by an encrypted
    /// repository, and creates one when the repository is new (docs/encryption.md).
    #[arg(
        long,
        global = true,
        env = "PITR_ENCRYPTION_KEY_FILE",
        value_name = "FILE"
    )]
    pub encryption_key_file: Option<PathBuf>,
    /// Command (run with sh -c) that prints the encryption passphrase, e.g. a KMS or vault CLI.
    #[arg(
        long,
        global = true,
        env = "PITR_ENCRYPTION_KEY_COMMAND",
        value_name = "CMD"
    )]
    pub encryption_key_command: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Archive one WAL file: use as archive_command = 'pitr archive-push %p'.
    ///
    /// Exits 0 only once the file is durable in the repository. Re-archiving identical content
    /// succeeds; different content under an archived name is refused.
    ///
    /// With several repositories (docs/repositories.md) it stores into each at once and exits 0
    /// only when every one that is not optional has the file.
    ArchivePush {
        /// A configured repository whose failure is only a warning (repeatable; also
        /// `optional = true` in its [[repository]] table).
        #[arg(long, value_name = "NAME")]
        repo_optional: Vec<String>,
        /// Path of the WAL file (%p), relative to the data directory or absolute.
        path: PathBuf,
    },
    /// Restore one WAL file: use as restore_command = 'pitr archive-get %f %p'.
    ///
    /// Exits 0 when the file was restored, 1 when the repository does not have it (end of
    /// archive), and 200 on any other failure, which makes PostgreSQL stop recovery rather than
    /// finish early with data missing. On a standby (standby.signal in the working directory)
    /// repository failures exit 1 after logging the error, so that it keeps streaming.
    ///
    /// Run by PostgreSQL from the data directory into pg_wal, it keeps the next segments
    /// (`--prefetch`, 8 by default) in pg_wal/.pitr-prefetch, fetched by a background worker
    /// while PostgreSQL replays: docs/prefetch.md.
    ArchiveGet {
        /// Segments to fetch ahead of replay, 0 to 64; 0 disables prefetching (default 8).
        #[arg(long, env = "PITR_PREFETCH", value_name = "N")]
        prefetch: Option<u32>,
        /// Name of the WAL file (%f).
        wal_file: String,
        /// Where to write it (%p).
        dest: PathBuf,
    },
    /// Take a base backup over the replication protocol, straight into the repository.
    ///
    /// Nothing is staged on local disk. The backup becomes visible to `list` and `restore` only
    /// when complete: its files checked against the server's manifest, and the WAL from its start
    /// to its end in the repository (archive_command = 'pitr archive-push %p', or `pitr stream`).
    Backup(backup_cmd::BackupArgs),
    /// Show backups, archived WAL per timeline, and the recoverable window.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into an empty directory and configure recovery to a target.
    ///
    /// Picks the newest backup that can reach the target, refuses targets outside the
    /// recoverable window before writing anything, verifies every file against the backup
    /// manifest, and writes recovery.signal plus restore_command and recovery_target_* settings
    /// into postgresql.auto.conf. Start PostgreSQL on the directory to replay to the target.
    Restore(restore_cmd::RestoreArgs),
    /// Check every object's checksum, every backup against its manifest, WAL continuity per
    /// timeline and timeline histories; `--full` also checks every WAL record (CRC, xl_prev).
    /// Exits 10 when it finds a problem that puts a restore at risk.
    Verify {
        /// Also walk the WAL record chain of every segment.
        #[arg(long)]
        full: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stream WAL continuously through a replication slot into the repository (docs/streaming.md),
    /// with scheduled backups, expiry and verification, metrics and notifications
    /// (docs/operations.md).
    Stream(stream_cmd::StreamArgs),
    /// Check that the cluster and the repository are wired correctly, end to end: the
    /// repository is writable and this cluster's, wal_level, replication privilege, and that
    /// the segment of pg_switch_wal() reaches the repository. Exits 12 when a check fails.
    Check(check_cmd::CheckArgs),
    /// Print the repository's gauges once: recoverable-until, last backup, stored bytes
    /// (--prometheus for node_exporter's textfile collector, --json).
    Status(status_cmd::StatusArgs),
    /// Remove backups outside a retention policy, and the WAL only they needed.
    ///
    /// Keeps the newest N full backups with the incrementals built on them (--retain-full), or
    /// what restoring to any moment of the last DURATION needs (--retain-window), or both (the
    /// union); the newest backup, and every backup a kept incremental needs, are always kept.
    /// WAL is removed only below the start of the oldest kept backup. Try --dry-run first.
    /// With several [[repository]] tables, every repository is expired by its own
    /// [repository.retention] (else [retention]); flags win everywhere.
    Expire(expire_cmd::ExpireArgs),
    /// Prove the repository restores: restore into a scratch directory, start PostgreSQL on it,
    /// wait until it has replayed to the target and promoted, run a check query, and report the
    /// RTO measured. Never writes to the repository (except its audit record); leaves nothing
    /// running or on disk, also when interrupted. Exit codes 13 and 14: docs/exit-codes.md.
    Drill(drill_cmd::DrillArgs),
    /// Copy what one configured repository lacks of another: backups, WAL, summaries, object
    /// for object, each verified; safe to interrupt and run again (docs/repositories.md).
    Copy(copy_cmd::CopyArgs),
    /// List the audit trail: every backup, expire, restore and drill, newest last.
    Audit(audit_cmd::AuditArgs),
    /// Manage the encryption key of an encrypted repository (docs/encryption.md).
    Key(key_cmd::KeyArgs),
    /// The background worker of archive-get's prefetch; started by archive-get itself.
    #[command(name = archive::prefetch::WORKER_COMMAND, hide = true)]
    PrefetchWorker(PrefetchWorkerArgs),
}

#[derive(Args, Debug)]
pub struct PrefetchWorkerArgs {
    #[arg(long)]
    spool: PathBuf,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    after: String,
    #[arg(long)]
    ahead: u32,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::ArchivePush { .. } => "archive-push",
            Command::ArchiveGet { .. } => "archive-get",
            Command::Backup(_) => "backup",
            Command::List { .. } => "list",
            Command::Restore(_) => "restore",
            Command::Verify { .. } => "verify",
            Command::Expire(_) => "expire",
            Command::Stream(_) => "stream",
            Command::Check(_) => "check",
            Command::Status(_) => "status",
            Command::Drill(_) => "drill",
            Command::Audit(_) => "audit",
            Command::Copy(_) => "copy",
            Command::Key(_) => "key",
            Command::PrefetchWorker(_) => archive::prefetch::WORKER_COMMAND,
        }
    }
}

fn overrides(g: &GlobalArgs) -> Overrides {
    Overrides {
        config: g.config.clone(),
        repo: g.repo.clone(),
        compression: g.compression.clone(),
        compression_level: g.compression_level,
        storage_retry_timeout: g.storage_retry_timeout.clone(),
        encryption_key_file: g.encryption_key_file.clone(),
        encryption_key_command: g.encryption_key_command.clone(),
        ..Default::default()
    }
}

/// The global options as flags, for the prefetch worker: it must open the same repository with
/// the same settings. Values that came from PITR_* variables are passed as flags too, which
/// resolves to the same thing; secrets live in the environment or the config file, never here
/// (the encryption key file and key command are where the key is, not the key).
fn forwarded_global_args(g: &GlobalArgs) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec![];
    let mut push = |flag: &str, value: Option<OsString>| {
        if let Some(v) = value {
            out.push(flag.into());
            out.push(v);
        }
    };
    push("--config", g.config.clone().map(Into::into));
    push("--repo", g.repo.clone().map(Into::into));
    push("--compression", g.compression.clone().map(Into::into));
    push(
        "--compression-level",
        g.compression_level.map(|l| l.to_string().into()),
    );
    push(
        "--storage-retry-timeout",
        g.storage_retry_timeout.clone().map(Into::into),
    );
    push(
        "--encryption-key-file",
        g.encryption_key_file.clone().map(Into::into),
    );
    push(
        "--encryption-key-command",
        g.encryption_key_command.clone().map(Into::into),
    );
    push("--log-level", g.log_level.clone().map(Into::into));
    push(
        "--log-format",
        g.log_format.map(|f| {
            match f {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .into()
        }),
    );
    out
}

/// archive-get's prefetch settings, or `None` when it is off or cannot work here.
fn prefetch_settings(g: &GlobalArgs, ahead: u32) -> Option<archive::Prefetch> {
    if ahead == 0 {
        return None;
    }
    match std::env::current_exe() {
        Ok(program) => Some(archive::Prefetch {
            ahead,
            program,
            global_args: forwarded_global_args(g),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot find the pitr binary; not prefetching");
            None
        }
    }
}

fn init_logging(g: &GlobalArgs) {
    // Logging starts before the settings are validated, so it reads the file's two log keys
    // itself; a broken file is reported by Settings::resolve right after.
    let file = g
        .config
        .as_deref()
        .and_then(|p| crate::config::read_file(p).ok());
    let level = g
        .log_level
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.log_level.clone()))
        .unwrap_or_else(|| "info".into());
    let format =
        g.log_format.unwrap_or_else(
            || match file.as_ref().and_then(|f| f.log_format.as_deref()) {
                Some("json") => LogFormat::Json,
                _ => LogFormat::Text,
            },
        );
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // PostgreSQL captures a hook's stderr into its log file: colour codes there are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// Entry point of the binary: parse, run, and turn the result into an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::SUCCESS; // --help, --version
            }
            // A misconfigured restore_command must stop recovery, not look like end of archive.
            let is_get = std::env::args().any(|a| a == "archive-get");
            return if is_get {
                Code::RecoveryFatal.into()
            } else {
                Code::Usage.into()
            };
        }
    };
    init_logging(&cli.global);
    let command = cli.command.name();
    // The streamer receives, compresses and uploads at once: give it worker threads.
    let runtime = match if matches!(cli.command, Command::Stream(_)) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pitr: cannot start the async runtime: {e}");
            return Code::Internal.into();
        }
    };
    let result = runtime.block_on(run(cli));
    shut_down(runtime);
    match result {
        Ok(code) => code.into(),
        Err(failure) => {
            eprintln!("pitr {command}: error: {}", failure.message);
            if let Some(hint) = &failure.hint {
                eprintln!("hint: {hint}");
            }
            failure.code.into()
        }
    }
}

/// How long work still on the blocking pool after a command has finished may hold up its exit.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Drops the runtime without waiting forever for its blocking threads (dropping it would): the
/// command has awaited everything its result depends on, so what is left is abandoned work, and
/// a stuck read or write must not keep a finished command from exiting.
fn shut_down(runtime: tokio::runtime::Runtime) {
    let began = std::time::Instant::now();
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    if began.elapsed() >= SHUTDOWN_GRACE {
        tracing::warn!(
            waited = ?SHUTDOWN_GRACE,
            "exiting with blocking work still running (it was no longer needed)"
        );
    }
}

async fn run(cli: Cli) -> Result<Code, Failure> {
    let is_get = matches!(cli.command, Command::ArchiveGet { .. });
    let mut o = overrides(&cli.global);
    match &cli.command {
        Command::ArchiveGet { prefetch, .. } => o.prefetch = *prefetch,
        Command::ArchivePush { repo_optional, .. } => o.repo_optional = repo_optional.clone(),
        Command::Backup(a) => o.primary = a.to.clone(),
        Command::Copy(a) => o.primary = Some(a.to.clone()),
        Command::Expire(a) => {
            o.retain_full = a.retain_full;
            o.retain_window = a.retain_window.clone();
        }
        Command::Stream(a) => o.ops = a.ops.overrides(),
        _ => {}
    }
    let settings = Settings::resolve(&o).map_err(|e| Failure::for_command(e, is_get))?;
    let mut storage = Storage::open(&settings.repo, settings.storage_retry_timeout)
        .map_err(|e| Failure::for_command(e, is_get))?;
    let mut write = settings.write.clone();
    if matches!(cli.command, Command::Restore(_)) {
        (storage, write) = first_answering(storage, &settings).await;
    }
    // Audited commands record themselves before they change anything (docs/operations.md);
    // whichever command creates the repository records that too.
    crate::repo::set_invocation(audit_cmd::arguments());
    // Several repositories: each is expired by its own policy and audited on its own.
    if let Command::Expire(args) = &cli.command {
        if settings.repositories.len() > 1 {
            return expire_cmd::expire_each(storage, &settings, args).await;
        }
    }
    match audit_cmd::audited_name(&cli.command) {
        Some(name) => {
            let audit = storage.clone();
            let command = |gate| async {
                let mut changes = audit_cmd::Changes::default();
                let result = run_command(cli, storage, &settings, &mut changes, gate).await;
                (result, changes)
            };
            audit_cmd::recorded(&audit, &write, name, command).await
        }
        None => {
            let mut changes = audit_cmd::Changes::default();
            run_command(cli, storage, &settings, &mut changes, Gate::open()).await
        }
    }
}

async fn run_command(
    cli: Cli,
    storage: Storage,
    settings: &Settings,
    changes: &mut audit_cmd::Changes,
    gate: Gate,
) -> Result<Code, Failure> {
    // A backup reaches its server and a restore plans while their start is recorded; the rest
    // wait for the record.
    let gate = match &cli.command {
        Command::Backup(_) | Command::Restore(_) => gate,
        _ => {
            gate.pass().await?;
            Gate::open()
        }
    };
    match cli.command {
        Command::ArchivePush { path, .. } => {
            let targets = targets(storage, settings)?;
            archive::archive_push_all(&targets, &path).await?;
            Ok(Code::Ok)
        }
        Command::ArchiveGet { wal_file, dest, .. } => {
            let prefetch = prefetch_settings(&cli.global, settings.prefetch);
            let mode = archive::RecoveryMode::of_working_dir();
            let sources =
                targets(storage, settings).map_err(|e| Failure::for_archive_get_in(e, mode))?;
            match archive::archive_get_from(&sources, &wal_file, &dest, prefetch.as_ref())
                .await
                .map_err(|e| Failure::for_archive_get_in(e, mode))?
            {
                GetOutcome::Restored { .. } => Ok(Code::Ok),
                GetOutcome::NotFound => Ok(Code::NotFound),
            }
        }
        Command::Backup(args) => backup_cmd::backup(storage, settings, args, changes, gate).await,
        Command::List { json } => restore_cmd::list(storage, settings, json).await,
        Command::Restore(args) => {
            restore_cmd::restore(storage, settings, args, changes, gate).await
        }
        Command::Verify { full, json } => verify_cmd::verify(storage, settings, full, json).await,
        Command::Stream(args) => stream_cmd::stream(storage, settings, args).await,
        Command::Check(args) => check_cmd::check(storage, settings, args).await,
        Command::Status(args) => status_cmd::status(storage, settings, args).await,
        Command::Expire(args) => expire_cmd::expire(storage, settings, args, changes).await,
        Command::Drill(args) => drill_cmd::drill(storage, settings, args, changes).await,
        Command::Audit(args) => audit_cmd::audit(storage, args).await,
        Command::Copy(args) => copy_cmd::copy(storage, settings, args, changes).await,
        Command::Key(args) => key_cmd::key(storage, settings, args, changes).await,
        Command::PrefetchWorker(a) => {
            let args = archive::WorkerArgs {
                spool: a.spool,
                data_dir: a.data_dir,
                after: a.after,
                ahead: a.ahead,
            };
            // Always 0: nobody waits for the worker, and where PostgreSQL is PID 1 (a container
            // without an init) the postmaster reaps it and would take any other status for a
            // crashed server process.
            if let Err(e) =
                archive::prefetch::run_worker(storage, args, settings.write.clone()).await
            {
                tracing::warn!(error = %e, "prefetch worker stopped");
            }
            Ok(Code::Ok)
        }
    }
}

/// With several repositories, the first that opens: where restore records itself in the audit
/// trail, so that a repository that is gone is neither written to nor in the way.
async fn first_answering(primary: Storage, settings: &Settings) -> (Storage, WriteOptions) {
    if settings.repositories.len() < 2 {
        return (primary, settings.write.clone());
    }
    for r in &settings.repositories {
        let Ok(storage) = storage_of(&primary, r, settings) else {
            continue;
        };
        let write = settings.write_for(r);
        if crate::repo::Repository::open(storage.clone(), write.clone())
            .await
            .is_ok()
        {
            return (storage, write);
        }
    }
    (primary, settings.write.clone())
}

/// The storage of configured repository `r`: `primary` when it is that one (already open).
pub(super) fn storage_of(
    primary: &Storage,
    r: &RepositorySettings,
    settings: &Settings,
) -> Result<Storage, Failure> {
    if &r.location == primary.location() {
        return Ok(primary.clone());
    }
    Storage::open(&r.location, settings.storage_retry_timeout)
        .map_err(|e| Failure::from(e).in_repository(&r.name))
}

/// Every configured repository, opened, in order; `primary` (already open) is reused for the
/// repository it is. For the commands that use them all (archive-push, archive-get).
fn targets(primary: Storage, settings: &Settings) -> Result<Vec<archive::Target>, Failure> {
    settings
        .repositories
        .iter()
        .map(|r| {
            let storage = storage_of(&primary, r, settings)?;
            Ok(archive::Target {
                name: r.name.clone(),
                storage,
                write: settings.write_for(r),
                optional: r.optional,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker command line archive-get builds must parse back to the same request.
    #[test]
    fn the_worker_command_line_round_trips() {
        let global = GlobalArgs {
            config: Some("/etc/pitr.toml".into()),
            repo: Some("s3://b/p".into()),
            compression: None,
            compression_level: Some(5),
            storage_retry_timeout: Some("5s".into()),
            log_level: Some("debug".into()),
            log_format: Some(LogFormat::Json),
            encryption_key_file: None,
            encryption_key_command: Some("vault kv get -field=k 'secret/p q'".into()),
        };
        let args = archive::WorkerArgs {
            spool: "/data/pg_wal/.pitr-prefetch".into(),
            data_dir: "/data".into(),
            after: "000000010000000000000003".into(),
            ahead: 8,
        };
        let mut argv: Vec<OsString> = vec!["pitr".into()];
        argv.extend(forwarded_global_args(&global));
        argv.extend(args.to_args());
        let cli = Cli::try_parse_from(argv).unwrap();
        assert_eq!(cli.global.repo, global.repo);
        assert_eq!(cli.global.config, global.config);
        assert_eq!(cli.global.compression_level, Some(5));
        assert_eq!(
            cli.global.storage_retry_timeout,
            global.storage_retry_timeout
        );
        assert_eq!(cli.global.log_level, global.log_level);
        assert_eq!(cli.global.log_format, Some(LogFormat::Json));
        assert_eq!(
            cli.global.encryption_key_command,
            global.encryption_key_command
        );
        match cli.command {
            Command::PrefetchWorker(a) => {
                assert_eq!(
                    archive::WorkerArgs {
                        spool: a.spool,
                        data_dir: a.data_dir,
                        after: a.after,
                        ahead: a.ahead
                    },
                    args
                );
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}

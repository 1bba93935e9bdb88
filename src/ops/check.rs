//! `pitr check`: is this cluster wired to this repository correctly, end to end? Each check
//! is one line; a failing one says what to change. Server errors are told apart by SQLSTATE,
//! never by their (translated) message text.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::pg::{self, sqlstate, ConnConfig, Connection, ReplicationConn};
use crate::repo::{self, Descriptor, Repository, WriteOptions};
use crate::storage::Storage;
use crate::wal::WalFileName;

/// Check names, as in `--json`.
pub const REPOSITORY: &str = "repository";
pub const CONNECTION: &str = "connection";
pub const WAL_LEVEL: &str = "wal_level";
pub const REPLICATION: &str = "replication";
pub const SYSTEM_IDENTIFIER: &str = "system_identifier";
pub const ARCHIVING: &str = "archiving";
pub const WAL_ARRIVES: &str = "wal_arrives";

/// SQLSTATEs only `check` needs.
const INVALID_CATALOG_NAME: &str = "3D000";

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found; for a failed check, also how to fix it.
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// How long WAL may take to reach the repository after `pg_switch_wal()`.
    pub timeout: Duration,
    /// The slot `pitr stream` uses, for clusters without archive_command.
    pub slot: String,
    /// The repository as the user named it, for the fixes printed.
    pub repo_url: String,
}

/// What the SQL connection tells about the server.
struct ServerFacts {
    wal_level: String,
    archive_mode: String,
    archive_command: String,
    max_wal_senders: String,
    can_replicate: bool,
    user: String,
}

struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, name: &'static str, ok: bool, message: impl Into<String>) -> bool {
        self.0.push(Check {
            name,
            ok,
            message: message.into(),
        });
        ok
    }
}

pub async fn check(
    storage: Storage,
    write: WriteOptions,
    cfg: &ConnConfig,
    opts: &CheckOptions,
) -> CheckReport {
    let mut c = Checks(vec![]);
    let location = storage.location().to_string();
    let (repo_ok, descriptor) = match repo::probe(&storage).await {
        Ok(d) => {
            let what = match &d {
                Some(d) => format!("a repository of system {}", d.system_identifier),
                None => {
                    "no repository yet (the first archive-push, backup or stream creates it)".into()
                }
            };
            c.add(
                REPOSITORY,
                true,
                format!("{location} is reachable and writable: {what}"),
            );
            (true, d)
        }
        Err(e) => {
            c.add(REPOSITORY, false, format!(
                "cannot write and remove a probe object at {location}: {e}; fix: check --repo / PITR_REPO, \
                 that the bucket or directory exists, and the credentials' permissions (put, get, delete)"));
            (false, None)
        }
    };
    let Some((mut sql, facts)) = connect_sql(&mut c, cfg, opts.timeout).await else {
        return finish(c);
    };
    let level_ok = check_wal_level(&mut c, &facts);
    let system_id = check_replication(&mut c, cfg, &facts, opts.timeout).await;
    let same_system = match system_id {
        Some(id) => check_system(&mut c, id, descriptor.as_ref(), &location),
        None => false,
    };
    let archiving = check_archiving(&mut c, &mut sql, &facts, opts).await;
    if repo_ok && level_ok && same_system && archiving.is_some() {
        let mode = archiving.unwrap_or(Mode::Stream);
        check_wal_arrives(&mut c, &mut sql, (storage, write), mode, opts).await;
    }
    sql.close().await;
    finish(c)
}

fn finish(c: Checks) -> CheckReport {
    CheckReport {
        ok: c.0.iter().all(|x| x.ok),
        checks: c.0,
    }
}

async fn first_row(conn: &mut Connection, sql: &str) -> Result<Vec<Option<String>>, pg::Error> {
    let sets = conn.simple_query(sql).await?;
    Ok(sets
        .into_iter()
        .next()
        .and_then(|s| s.rows.into_iter().next())
        .unwrap_or_default())
}

/// An ordinary connection (for settings, catalogs and `pg_switch_wal()`) to the first host
/// that accepts it, and what it tells about the server.
async fn connect_sql(
    c: &mut Checks,
    cfg: &ConnConfig,
    limit: Duration,
) -> Option<(Connection, ServerFacts)> {
    let mut last = None;
    for hp in &cfg.hosts {
        match tokio::time::timeout(limit, Connection::connect_sql(cfg, hp)).await {
            Ok(Ok(mut conn)) => match read_facts(&mut conn).await {
                Ok(f) => {
                    let v = conn.parameter("server_version").unwrap_or("?").to_string();
                    c.add(
                        CONNECTION,
                        true,
                        format!("connected to PostgreSQL {v} at {} as {}", hp.host, f.user),
                    );
                    return Some((conn, f));
                }
                Err(e) => last = Some(format!("{e}")),
            },
            Ok(Err(e)) => last = Some(connection_fix(&e, cfg)),
            Err(_) => {
                last = Some(format!(
                    "{}:{} did not answer within {limit:?}",
                    hp.host, hp.port
                ))
            }
        }
    }
    c.add(
        CONNECTION,
        false,
        format!(
            "cannot connect to PostgreSQL: {}",
            last.unwrap_or_else(|| "no host given".into())
        ),
    );
    None
}

fn connection_fix(e: &pg::Error, cfg: &ConnConfig) -> String {
    let fix = match e.sqlstate() {
        Some(sqlstate::INVALID_PASSWORD) => "fix: check the password (PGPASSWORD, ~/.pgpass or the connection string)".to_string(),
        Some(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION) => format!(
            "fix: add a pg_hba.conf line for user {} (and one for the `replication` database) and reload", cfg.user),
        Some(INVALID_CATALOG_NAME) => "fix: name an existing database with dbname= in the connection string (check needs one for SQL)".to_string(),
        _ => "fix: check host, port and that PostgreSQL is running".to_string(),
    };
    format!("{e}; {fix}")
}

async fn read_facts(conn: &mut Connection) -> Result<ServerFacts, pg::Error> {
    let row = first_row(conn,
        "select current_setting('wal_level'), current_setting('archive_mode'), \
         coalesce(current_setting('archive_command', true), ''), current_setting('max_wal_senders'), \
         (select rolreplication or rolsuper from pg_roles where rolname = current_user)::text, current_user::text").await?;
    let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    Ok(ServerFacts {
        wal_level: get(0),
        archive_mode: get(1),
        archive_command: get(2),
        max_wal_senders: get(3),
        can_replicate: get(4) == "true",
        user: get(5),
    })
}

fn check_wal_level(c: &mut Checks, f: &ServerFacts) -> bool {
    if matches!(f.wal_level.as_str(), "replica" | "logical") {
        return c.add(WAL_LEVEL, true, format!("wal_level = {}", f.wal_level));
    }
    c.add(WAL_LEVEL, false, format!(
        "wal_level = {}: WAL from it cannot restore a backup; fix: set wal_level = replica and max_wal_senders > 0 \
         in postgresql.conf, then restart PostgreSQL", f.wal_level))
}

/// The role can open a replication connection; returns the cluster's system identifier.
async fn check_replication(
    c: &mut Checks,
    cfg: &ConnConfig,
    f: &ServerFacts,
    limit: Duration,
) -> Option<u64> {
    let role = &f.user;
    let attempt = tokio::time::timeout(limit, async {
        let mut rc = ReplicationConn::connect(cfg).await?;
        let sys = rc.identify_system().await;
        rc.close().await;
        sys
    })
    .await
    .unwrap_or_else(|_| {
        Err(pg::Error::Timeout {
            host: "the server".into(),
            port: 0,
        })
    });
    match attempt {
        Ok(sys) if f.can_replicate => {
            c.add(
                REPLICATION,
                true,
                format!("role {role} can open a replication connection"),
            );
            Some(sys.system_id)
        }
        Ok(sys) => {
            c.add(
                REPLICATION,
                false,
                format!(
                    "role {role} has no REPLICATION attribute; fix: ALTER ROLE {role} REPLICATION"
                ),
            );
            Some(sys.system_id)
        }
        Err(e) => {
            let fix = match e.sqlstate() {
                _ if !f.can_replicate => format!("role {role} has no REPLICATION attribute; fix: ALTER ROLE {role} REPLICATION"),
                Some(sqlstate::INSUFFICIENT_PRIVILEGE) => format!("role {role} may not replicate; fix: ALTER ROLE {role} REPLICATION"),
                Some(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION) => format!(
                    "pg_hba.conf does not let {role} connect for replication; fix: add a line like \
                     `host replication {role} <address>/32 scram-sha-256` and reload"),
                Some(sqlstate::TOO_MANY_CONNECTIONS) => format!(
                    "no WAL sender is free (max_wal_senders = {}); fix: raise max_wal_senders (restart needed)", f.max_wal_senders),
                _ => "fix: check the connection string and pg_hba.conf's `replication` lines".into(),
            };
            c.add(
                REPLICATION,
                false,
                format!("cannot open a replication connection: {e}; {fix}"),
            );
            None
        }
    }
}

fn check_system(c: &mut Checks, id: u64, d: Option<&Descriptor>, location: &str) -> bool {
    match d {
        None => c.add(SYSTEM_IDENTIFIER, true, format!(
            "the repository is new: it will belong to this cluster (system {id})")),
        Some(d) if d.system_identifier == id => c.add(SYSTEM_IDENTIFIER, true, format!(
            "the repository belongs to this cluster (system {id})")),
        Some(d) => c.add(SYSTEM_IDENTIFIER, false, format!(
            "the repository at {location} belongs to PostgreSQL system {}, but this cluster is system {id}; \
             fix: use a separate repository (or prefix) for each cluster", d.system_identifier)),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Archive,
    Stream,
}

/// How WAL leaves the server: archive_command, or a `pitr stream` attached to its slot.
async fn check_archiving(
    c: &mut Checks,
    sql: &mut Connection,
    f: &ServerFacts,
    opts: &CheckOptions,
) -> Option<Mode> {
    let example = format!(
        "archive_command = 'pitr --repo {} archive-push %p'",
        opts.repo_url
    );
    if f.archive_mode != "off" {
        let cmd = f.archive_command.trim();
        if cmd.is_empty() {
            c.add(ARCHIVING, false, format!(
                "archive_mode = {} but archive_command is not set: WAL is not archived; fix: {example}, then reload", f.archive_mode));
            return None;
        }
        if !cmd.contains("pitr") {
            c.add(
                ARCHIVING,
                false,
                format!("archive_command = '{cmd}' does not run pitr; fix: {example}, then reload"),
            );
            return None;
        }
        c.add(
            ARCHIVING,
            true,
            format!(
                "archive_mode = {}, archive_command = '{cmd}'",
                f.archive_mode
            ),
        );
        return Some(Mode::Archive);
    }
    let slot = opts.slot.replace('\'', "''");
    let row = first_row(
        sql,
        &format!("select active::text from pg_replication_slots where slot_name = '{slot}'"),
    )
    .await;
    let fix = format!(
        "fix: run `pitr --repo {} stream -d CONNINFO --create-slot` as a service, or set archive_mode = on and {example}",
        opts.repo_url);
    match row {
        Ok(r) if r.first().cloned().flatten().as_deref() == Some("true") => {
            c.add(
                ARCHIVING,
                true,
                format!(
                    "archive_mode = off; slot {} is active (pitr stream)",
                    opts.slot
                ),
            );
            Some(Mode::Stream)
        }
        Ok(r) if r.is_empty() => {
            c.add(ARCHIVING, false, format!(
                "archive_mode = off (archive_command not used) and there is no replication slot {:?}: no WAL reaches the repository; {fix}", opts.slot));
            None
        }
        Ok(_) => {
            c.add(ARCHIVING, false, format!(
                "archive_mode = off and slot {:?} exists but no pitr stream is attached to it; {fix}", opts.slot));
            None
        }
        Err(e) => {
            c.add(
                ARCHIVING,
                false,
                format!("cannot read pg_replication_slots: {e}"),
            );
            None
        }
    }
}

/// Forces a WAL switch and waits for the finished segment to reach the repository.
async fn check_wal_arrives(
    c: &mut Checks,
    sql: &mut Connection,
    (storage, write): (Storage, WriteOptions),
    mode: Mode,
    opts: &CheckOptions,
) {
    let seg = match first_row(sql, "select pg_walfile_name(pg_switch_wal())").await {
        Ok(r) => r.first().cloned().flatten().unwrap_or_default(),
        Err(e) => {
            let fix = match e.sqlstate() {
                Some(sqlstate::INSUFFICIENT_PRIVILEGE) => "fix: GRANT EXECUTE ON FUNCTION pg_switch_wal() TO the role, or run check as a superuser",
                _ => "fix: run check against the primary",
            };
            c.add(
                WAL_ARRIVES,
                false,
                format!("cannot force a WAL switch: {e}; {fix}"),
            );
            return;
        }
    };
    let Ok(name) = WalFileName::parse(&seg) else {
        c.add(
            WAL_ARRIVES,
            false,
            format!("the server named segment {seg:?}, which is not a WAL file name"),
        );
        return;
    };
    let started = Instant::now();
    let mut repo = None;
    while started.elapsed() < opts.timeout {
        if repo.is_none() {
            // A new repository appears with the first WAL archived or streamed into it.
            repo = Repository::open(storage.clone(), write.clone()).await.ok();
        }
        if let Some(r) = &repo {
            if let Ok(true) = r.has_wal_file(&name).await {
                c.add(
                    WAL_ARRIVES,
                    true,
                    format!(
                        "segment {seg} from pg_switch_wal() reached the repository in {:.1}s",
                        started.elapsed().as_secs_f64()
                    ),
                );
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let why = match mode {
        Mode::Archive => {
            let stats = first_row(sql, "select failed_count::text, coalesce(last_failed_wal, '') from pg_stat_archiver").await.unwrap_or_default();
            let get = |i: usize| stats.get(i).cloned().flatten().unwrap_or_default();
            format!("pg_stat_archiver: {} failure(s), last failed {:?}; fix: read the server log for archive_command errors \
                     and make sure archive_command uses this repository (--repo {})", get(0), get(1), opts.repo_url)
        }
        Mode::Stream => format!("fix: read the pitr stream log, and make sure it streams into this repository (--repo {})", opts.repo_url),
    };
    c.add(
        WAL_ARRIVES,
        false,
        format!(
            "segment {seg} from pg_switch_wal() did not reach the repository within {}; {why}",
            humantime::format_duration(opts.timeout)
        ),
    );
}

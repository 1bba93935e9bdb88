//! Replication topologies: standbys made with pg_basebackup, catch-up waits, and running a hook
//! the way PostgreSQL runs it (as the server user, from the data directory).

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use super::pg::{pg_bin, PgBuilder, PgCluster};
use super::util::{command_as_server_user, pitr_bin, poll, run_checked, run_pitr, TestDir};

/// `pg_basebackup` of `upstream` (a primary or a standby) into the empty directory `dest`,
/// with `args` added (e.g. `-R` to write standby.signal and primary_conninfo, `-X none`).
pub fn base_backup(upstream: &PgCluster, dest: &Path, args: &[&str]) -> Result<()> {
    let mut bb = command_as_server_user(pg_bin("pg_basebackup"));
    bb.arg("-h")
        .arg(upstream.socket_dir())
        .args(["-p", &upstream.port().to_string(), "-U", "postgres", "-D"])
        .arg(dest)
        .args(["-c", "fast", "--no-sync"])
        .args(args);
    run_checked(&mut bb).map(|_| ()).context("pg_basebackup")
}

/// A streaming standby of `upstream` in `work/<name>`: a base backup with `-R` (so
/// standby.signal and primary_conninfo), WAL streamed with it, then `b`'s settings on top.
/// Not started: call `start()` (it returns once the standby accepts connections).
pub fn standby_of(
    upstream: &PgCluster,
    work: &TestDir,
    name: &str,
    b: PgBuilder,
) -> Result<PgCluster> {
    let dir = work.subdir(name);
    base_backup(upstream, &dir, &["-R", "-X", "stream"])?;
    b.existing_data_dir(&dir).init()
}

/// The WAL position a server has: written on a primary, replayed on a standby.
pub fn wal_position(pg: &PgCluster) -> Result<String> {
    pg.psql(
        "select case when pg_is_in_recovery() then pg_last_wal_replay_lsn() \
         else pg_current_wal_lsn() end",
    )
}

/// Waits until `standby` has replayed everything `upstream` has now.
pub fn wait_caught_up(upstream: &PgCluster, standby: &PgCluster, timeout: Duration) -> Result<()> {
    let lsn = wal_position(upstream)?;
    standby
        .wait_for(
            &format!("select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
            "t",
            timeout,
        )
        .with_context(|| format!("standby log:\n{}", standby.log_contents()))
}

/// Runs `pitr args` as PostgreSQL runs its hooks: as the server user, from the data directory
/// `dir`, with `env` only.
pub fn pitr_hook<I, S>(dir: &Path, args: I, env: &[(String, String)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd: Command = command_as_server_user(pitr_bin());
    cmd.current_dir(dir)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)));
    run_pitr(cmd)
}

/// Polls `pg_stat_archiver` until `wal` (a file name) is archived; the server log on timeout.
pub fn wait_archived(pg: &PgCluster, wal: &str, timeout: Duration) -> Result<()> {
    poll(&format!("{wal} to be archived"), timeout, || {
        let last = pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver")?;
        Ok((last.as_str() >= wal).then_some(()))
    })
    .with_context(|| format!("server log:\n{}", pg.log_contents()))
}

/// Polls `pg_stat_archiver` until archiving `wal` has failed at least once.
pub fn wait_archive_failed(pg: &PgCluster, wal: &str, timeout: Duration) -> Result<()> {
    poll(&format!("archiving {wal} to fail"), timeout, || {
        let last = pg.psql("select coalesce(last_failed_wal, '') from pg_stat_archiver")?;
        Ok((last == wal).then_some(()))
    })
    .with_context(|| format!("server log:\n{}", pg.log_contents()))
}

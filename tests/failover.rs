//! `pitr stream` across a failover (issue 16, "failover without holes"): a primary with a
//! streaming standby, the stream on a multi-host conninfo. When the stream was stopped before
//! the promotion, it fetches the rest of the old timeline from the new primary; when it was
//! ahead of the standby, it keeps what it has and follows the new timeline from the switch.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::{assert_code, stderr, stdout, Backend, TestRepo};
use crate::harness::topology::{standby_of, wait_caught_up};
use crate::harness::{clean_env, pitr_bin, poll, PgCluster, TestDir};

const WAIT: Duration = Duration::from_secs(90);

/// A running `pitr stream`, its stderr in a file shown when a test fails.
pub(crate) struct Streamer {
    child: Option<Child>,
    log: PathBuf,
    _dir: TestDir,
}

impl Streamer {
    pub(crate) fn start(repo: &TestRepo, conninfo: &str) -> Streamer {
        let dir = TestDir::new();
        let log = dir.join("stream.log");
        let mut cmd = Command::new(pitr_bin());
        clean_env(&mut cmd);
        cmd.args(repo.args(&[
            "stream",
            "-d",
            conninfo,
            "--create-slot",
            "--chunk-interval",
            "200ms",
            "--max-reconnect-delay",
            "1s",
        ]))
        .envs(repo.env.iter().map(|(k, v)| (k, v)))
        .env("PITR_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
        Streamer {
            child: Some(cmd.spawn().expect("spawning pitr stream")),
            log,
            _dir: dir,
        }
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (the stream drains first).
    pub(crate) fn term(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let st = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("pitr stream did not stop\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn psql1(pg: &PgCluster, sql: &str) -> String {
    pg.psql(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}\n{}", pg.log_contents()))
}

/// Waits until the slot's restart_lsn on `pg` (the stream's flush feedback) reaches `lsn`.
pub(crate) fn wait_flushed(pg: &PgCluster, s: &Streamer, lsn: &str) {
    poll("flush feedback", WAIT, || {
        let ok = pg.psql(&format!(
            "select coalesce(restart_lsn >= '{lsn}'::pg_lsn, false) from pg_replication_slots where slot_name = 'pitr'"
        ))?;
        Ok((ok == "t").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n--- stream log ---\n{}", s.log()));
}

/// Waits until the stream streams from `pg`: on PostgreSQL 13 and 14 a stream with a new slot
/// starts at the server's position when it connects, so WAL written before that is not its.
fn wait_active(pg: &PgCluster, s: &Streamer) {
    poll("the stream's slot to be active", WAIT, || {
        let active = pg.psql(
            "select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = 'pitr'",
        )?;
        Ok((active == "t").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n--- stream log ---\n{}", s.log()));
}

/// Forces a segment switch; returns the LSN after it.
fn switch(pg: &PgCluster) -> String {
    psql1(
        pg,
        "select pg_current_wal_lsn()::text from (select pg_switch_wal()) s",
    )
}

/// Both servers in one conninfo: the stream follows whichever is the primary.
fn multi_host(a: &PgCluster, b: &PgCluster) -> String {
    format!(
        "host={},{} port={},{} user=postgres target_session_attrs=read-write",
        a.socket_dir().display(),
        b.socket_dir().display(),
        a.port(),
        b.port()
    )
}

/// A primary that keeps its WAL (so does the standby made from it: the settings are copied),
/// with 1 MiB segments, and a streaming standby of it.
fn primary_and_standby(work: &TestDir) -> (PgCluster, PgCluster) {
    let primary = PgCluster::builder().wal_segsize(1).start().unwrap();
    psql1(&primary, "create table t(id int primary key, tl int)");
    let mut standby = standby_of(&primary, work, "standby", PgCluster::builder()).unwrap();
    standby.start().unwrap();
    (primary, standby)
}

fn insert(pg: &PgCluster, from: u32, to: u32, tl: u32) {
    psql1(
        pg,
        &format!("insert into t select g, {tl} from generate_series({from}, {to}) g"),
    );
}

/// Restores the latest backup to the end of the repository's newest timeline and returns
/// `count(*), max(id)` of `t`, and the restored server's timeline.
fn restore_latest(repo: &TestRepo) -> (String, PgCluster, TestDir) {
    let dir = TestDir::new();
    let pgdata = dir.join("restored");
    let out = repo.pitr(&["restore", "--pgdata", pgdata.to_str().unwrap()]);
    assert_code(&out, 0);
    let restored = PgCluster::builder()
        .existing_data_dir(&pgdata)
        .envs(repo.env.clone())
        .conf("archive_mode = off")
        .start()
        .unwrap();
    restored
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.log_contents()));
    let rows = psql1(&restored, "select count(*) || ' ' || max(id) from t");
    (rows, restored, dir)
}

/// The standby to be promoted loses the stream's slot while the primary writes four segments of
/// rows (ids 1001 to 5000) that it replays.
fn drop_slot_and_write_on(primary: &PgCluster, standby: &PgCluster) {
    psql1(standby, "select pg_drop_replication_slot('pitr')");
    for i in 0..4 {
        insert(primary, 1001 + i * 1000, 2000 + i * 1000, 1);
        switch(primary);
    }
    wait_caught_up(primary, standby, WAIT).unwrap();
}

/// Checkpoints on the new primary `pg` (1 MiB segments) until the timeline-1 segment holding
/// `durable`, the one the repository needs next, is gone from its `pg_wal`; returns its name.
fn checkpoint_until_removed(pg: &PgCluster, durable: &str) -> String {
    let (hi, lo) = durable.split_once('/').unwrap();
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    let segno = lsn >> 20;
    let needed = format!("00000001{:08X}{:08X}", segno >> 12, segno & 0xFFF);
    poll("the old timeline's segment to be removed", WAIT, || {
        switch(pg);
        pg.psql("checkpoint")?;
        let gone = !pg.data_dir().join("pg_wal").join(&needed).exists();
        Ok(gone.then_some(()))
    })
    .unwrap();
    needed
}

fn verify_clean(repo: &TestRepo) {
    let out = repo.pitr(&["verify"]);
    assert_code(&out, 0);
    let report = stdout(&out) + &stderr(&out);
    assert!(!report.to_lowercase().contains("gap"), "{report}");
}

/// The stream stops well before the promotion while the old primary commits (and the standby
/// replays) several segments of rows; after the promotion the stream restarts against the new
/// primary: it fetches the rest of timeline 1 from it, stores the `.partial` and the history,
/// and continues on timeline 2. Restore to latest has every row of both timelines.
#[test]
fn failover_after_the_stream_stopped_has_no_hole() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let (mut primary, mut standby) = primary_and_standby(&work);
    let conninfo = multi_host(&primary, &standby);
    let mut s = Streamer::start(&repo, &conninfo);
    wait_active(&primary, &s);
    insert(&primary, 1, 1000, 1);
    let out = repo.pitr(&["backup", "-d", &primary.conninfo()]);
    assert_code(&out, 0);
    let durable = switch(&primary);
    wait_flushed(&primary, &s, &durable);
    // The stream keeps its slot on the standby at its durable position.
    poll("the stream's slot on the standby", WAIT, || {
        let kept = standby.psql(&format!(
            "select coalesce(bool_or(restart_lsn >= '{durable}'::pg_lsn), false) from pg_replication_slots where slot_name = 'pitr'"
        ))?;
        Ok((kept == "t").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    assert!(s.term().success(), "{}", s.log());

    // Stream down: several segments of rows on timeline 1, replicated to the standby.
    for i in 0..4 {
        insert(&primary, 1001 + i * 1000, 2000 + i * 1000, 1);
        switch(&primary);
    }
    insert(&primary, 5001, 5100, 1);
    wait_caught_up(&primary, &standby, WAIT).unwrap();
    // A clean stop sends all WAL to the standby first.
    primary.stop().unwrap();
    standby.promote().unwrap();
    standby
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap();
    insert(&standby, 5101, 6000, 2);
    // The new primary's checkpoints keep what the slot reserved, nothing else of timeline 1.
    psql1(&standby, "checkpoint");

    let mut s = Streamer::start(&repo, &conninfo);
    wait_flushed(&standby, &s, &switch(&standby));
    assert!(s.term().success(), "{}", s.log());
    let log = s.log();
    assert!(log.contains("timeline switch: following"), "{log}");
    assert!(repo.object_file("wal/00000002.history").exists(), "{log}");
    let partials: Vec<_> = fs::read_dir(repo.object_file("wal/0000000100000000"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert_eq!(partials.len(), 1, "one .partial of timeline 1\n{log}");

    let (rows, restored, _dir) = restore_latest(&repo);
    assert_eq!(rows, "6000 6000", "{}", restored.log_contents());
    verify_clean(&repo);
}

/// The stream was ahead of the standby on timeline 1 (the standby stopped receiving, the old
/// primary wrote on, the stream stored it): after the promotion the stream keeps what the
/// repository has, says which range of timeline 1 is not on timeline 2, and follows timeline 2
/// from the switch point. Restore to latest is timeline 2's history. `restart`: the stream is
/// stopped before the promotion and started after it; otherwise it runs through it.
fn stream_ahead_at_failover(restart: bool) {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let (mut primary, mut standby) = primary_and_standby(&work);
    let conninfo = multi_host(&primary, &standby);
    let mut s = Streamer::start(&repo, &conninfo);
    wait_active(&primary, &s);
    insert(&primary, 1, 1000, 1);
    let out = repo.pitr(&["backup", "-d", &primary.conninfo()]);
    assert_code(&out, 0);
    wait_caught_up(&primary, &standby, WAIT).unwrap();
    // The stream has created its slot on the standby before the standby stops.
    poll("the stream's slot on the standby", WAIT, || {
        let n =
            standby.psql("select count(*) from pg_replication_slots where slot_name = 'pitr'")?;
        Ok((n == "1").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    standby.stop().unwrap();
    // Only the stream gets these.
    insert(&primary, 1001, 3000, 1);
    switch(&primary);
    insert(&primary, 3001, 3100, 1);
    let end = psql1(&primary, "select pg_current_wal_lsn()");
    wait_flushed(&primary, &s, &end);
    if restart {
        assert!(s.term().success(), "{}", s.log());
    }
    primary.stop_immediate().unwrap();
    // The standby comes back with no primary to receive from, and is promoted.
    standby.start().unwrap();
    standby.promote().unwrap();
    standby
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap();
    insert(&standby, 5001, 5500, 2);

    if restart {
        s = Streamer::start(&repo, &conninfo);
    }
    wait_flushed(&standby, &s, &switch(&standby));
    assert!(s.term().success(), "{}", s.log());
    let log = s.log();
    assert!(log.contains("not on timeline 2"), "{log}");
    if !restart {
        assert!(log.contains("starting over from the repository"), "{log}");
    }
    let (rows, restored, _dir) = restore_latest(&repo);
    assert_eq!(rows, "1500 5500", "{}", restored.log_contents());
    let tl = psql1(&restored, "select timeline_id from pg_control_checkpoint()");
    assert!(tl.parse::<u32>().unwrap() >= 2, "{tl}");
}

#[test]
fn failover_with_the_stream_ahead_follows_the_new_timeline() {
    stream_ahead_at_failover(true);
}

#[test]
fn failover_with_the_stream_running_ahead_follows_the_new_timeline() {
    stream_ahead_at_failover(false);
}

/// Without the slot on the standby (dropped there by hand) the new primary's checkpoint removes
/// the old timeline's WAL the repository lacks, and the old primary is gone: the stream stops
/// with exit 11 naming where the lost range starts on timeline 1.
#[test]
fn failover_with_the_old_timeline_gone_everywhere_is_exit_11() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let (mut primary, mut standby) = primary_and_standby(&work);
    let conninfo = multi_host(&primary, &standby);
    let mut s = Streamer::start(&repo, &conninfo);
    wait_active(&primary, &s);
    insert(&primary, 1, 1000, 1);
    let durable = switch(&primary);
    wait_flushed(&primary, &s, &durable);
    poll("the slot on the standby", WAIT, || {
        let n =
            standby.psql("select count(*) from pg_replication_slots where slot_name = 'pitr'")?;
        Ok((n == "1").then_some(()))
    })
    .unwrap();
    assert!(s.term().success(), "{}", s.log());
    drop_slot_and_write_on(&primary, &standby);
    primary.stop().unwrap();
    standby.promote().unwrap();
    standby
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap();
    insert(&standby, 5001, 5100, 2);
    checkpoint_until_removed(&standby, &durable);
    let out = repo.pitr(&["stream", "-d", &conninfo, "--create-slot"]);
    assert_code(&out, 11);
    let err = stderr(&out);
    assert!(err.contains("on timeline 1"), "{err}");
    assert!(err.contains(&format!("WAL from {durable}")), "{err}");
}

/// As above, but a second standby, still holding the old timeline (its copy of the stream's
/// slot keeps it), follows the new primary: the restarted stream borrows the rest of timeline 1
/// from it, up to the switch point, then continues on the new primary. No hole, no exit 11.
#[test]
fn failover_borrows_the_old_timeline_from_another_standby() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let (mut primary, standby) = primary_and_standby(&work);
    let mut other = standby_of(&primary, &work, "other", PgCluster::builder()).unwrap();
    other.start().unwrap();
    let conninfo = format!(
        "host={},{},{} port={},{},{} user=postgres target_session_attrs=read-write",
        primary.socket_dir().display(),
        standby.socket_dir().display(),
        other.socket_dir().display(),
        primary.port(),
        standby.port(),
        other.port()
    );
    let mut s = Streamer::start(&repo, &conninfo);
    wait_active(&primary, &s);
    let out = repo.pitr(&["backup", "-d", &primary.conninfo()]);
    assert_code(&out, 0);
    insert(&primary, 1, 1000, 1);
    let durable = switch(&primary);
    wait_flushed(&primary, &s, &durable);
    for pg in [&standby, &other] {
        poll("the slot on the standbys", WAIT, || {
            let n =
                pg.psql("select count(*) from pg_replication_slots where slot_name = 'pitr'")?;
            Ok((n == "1").then_some(()))
        })
        .unwrap();
    }
    assert!(s.term().success(), "{}", s.log());
    // The standby to be promoted loses its slot; the other one keeps it.
    drop_slot_and_write_on(&primary, &standby);
    wait_caught_up(&primary, &other, WAIT).unwrap();
    primary.stop().unwrap();
    let mut standby = standby;
    standby.promote().unwrap();
    standby
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap();
    // The other standby follows the new primary (primary_conninfo reloads since PostgreSQL 13).
    psql1(
        &other,
        &format!(
            "alter system set primary_conninfo = 'host={} port={} user=postgres'",
            standby.socket_dir().display(),
            standby.port()
        ),
    );
    psql1(&other, "select pg_reload_conf()");
    insert(&standby, 5001, 5100, 2);
    switch(&standby);
    wait_caught_up(&standby, &other, WAIT).unwrap();
    let needed = checkpoint_until_removed(&standby, &durable);
    assert!(
        other.data_dir().join("pg_wal").join(&needed).exists(),
        "the other standby was expected to keep {needed}"
    );

    let mut s = Streamer::start(&repo, &conninfo);
    // Past the point where the stream's new slot starts on the new primary: flushed there means
    // everything before is durable too.
    wait_active(&standby, &s);
    insert(&standby, 5101, 5200, 2);
    let end = switch(&standby);
    wait_flushed(&standby, &s, &end);
    let log = s.log();
    assert!(log.contains("streaming it from a standby"), "{log}");
    assert!(s.term().success(), "{}", s.log());
    verify_clean(&repo);
    let (rows, restored, _dir) = restore_latest(&repo);
    assert_eq!(rows, "5200 5200");
    assert_eq!(
        psql1(&restored, "select count(*) from t where tl = 2"),
        "200"
    );
}

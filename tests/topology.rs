//! The archive hooks in the topologies PostgreSQL supports, with real primaries and standbys:
//! a history file as the first file of a repository, a standby whose repository vanishes, a
//! repository moved away under a primary and under a restored cluster, `archive_mode = always`,
//! and our own versions of the situations PostgreSQL's src/test/recovery suite archives or
//! restores in.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::common::{switch_and_wait, Backend, TestRepo};
use crate::harness::topology::{
    base_backup, pitr_hook, standby_of, wait_archive_failed, wait_archived, wait_caught_up,
};
use crate::harness::{conf_quote, make_accessible, poll, PgCluster, TestDir};
use crate::pitr::ok;

const WAIT: Duration = Duration::from_secs(90);
/// The timeline a server writes on now (pg_control's checkpoint lags right after promotion).
const CURRENT_TIMELINE: &str =
    "select ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int";

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `archive_command` that archives timeline history files only and reports everything else
/// done, as a filtering command (or 025_stuck_on_old_timeline's cp_history_files) does.
fn history_only_archive_command(repo: &TestRepo) -> String {
    let push = repo.command("archive-push %p");
    format!(
        "archive_command = {}",
        conf_quote(&format!(
            "case %f in *.history) {push} ;; *) exit 0 ;; esac"
        ))
    )
}

/// The descriptor of a local repository, as JSON (the frame is 40 bytes, uncompressed).
fn descriptor(repo: &TestRepo) -> serde_json::Value {
    let raw = fs::read(repo.object_file("repository.json")).expect("repository.json");
    serde_json::from_slice(&raw[40..]).unwrap()
}

fn system_identifier(pg: &PgCluster) -> String {
    pg.psql("select system_identifier from pg_control_system()")
        .unwrap()
}

/// Moves a local repository away and leaves an empty directory behind, as an unmounted
/// filesystem does. Returns where it went.
fn move_away(repo: &TestRepo) -> PathBuf {
    let root = PathBuf::from(&repo.url);
    let moved = root.with_extension("moved");
    fs::rename(&root, &moved).unwrap();
    fs::create_dir(&root).unwrap();
    make_accessible(&root).unwrap();
    moved
}

fn bring_back(repo: &TestRepo, moved: &Path) {
    let root = PathBuf::from(&repo.url);
    // A push with the local cache may have left its segment there before its check failed
    // (docs/repository-format.md, "archive-push's local cache"): see `stray_files`.
    fs::remove_dir_all(&root).unwrap();
    fs::rename(moved, &root).unwrap();
}

/// The files under `dir`, as paths relative to it.
fn stray_files(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn count(pg: &PgCluster, table: &str) -> String {
    pg.psql(&format!("select count(*) from {table}")).unwrap()
}

/// A cascading standby that archives only history files (archive_mode = always) into an empty
/// repository: when its upstream is promoted it follows timeline 2 and archives
/// 00000002.history first, which creates the repository from its global/pg_control. Meanwhile
/// its restore_command finds no repository, which a standby answers with 1 and keeps streaming.
#[test]
fn a_cascading_standby_archives_a_history_file_into_an_empty_repository() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let mut primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("wal_keep_size = 128MB")
        .start()
        .unwrap();
    primary.psql("create table t as select 1 as a").unwrap();
    let mut standby = standby_of(&primary, &work, "standby", PgCluster::builder()).unwrap();
    standby.start().unwrap();
    let mut cascade = standby_of(
        &standby,
        &work,
        "cascade",
        PgCluster::builder()
            .conf("archive_mode = always")
            .conf(history_only_archive_command(&repo))
            .conf(repo.restore_command_conf())
            .conf("wal_retrieve_retry_interval = '200ms'")
            .envs(repo.env.clone()),
    )
    .unwrap();
    cascade.start().unwrap();
    wait_caught_up(&primary, &cascade, WAIT).unwrap();

    primary.stop().unwrap();
    standby.promote().unwrap();
    standby.psql("insert into t values (2)").unwrap();
    let history = repo.object_file("wal/00000002.history");
    poll("00000002.history in the repository", WAIT, || {
        Ok(history.exists().then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n--- cascade log ---\n{}", cascade.log_contents()));

    let d = descriptor(&repo);
    assert_eq!(d["system_identifier"], system_identifier(&standby).as_str());
    assert_eq!(d["wal_segment_size"], 1 << 20, "read from pg_control: {d}");
    assert_eq!(d["pg_major"], crate::harness::pg_major());
    let log = cascade.log_contents();
    assert!(
        log.contains("creating it for the cluster of global/pg_control"),
        "{log}"
    );
    // Before that, the cascade asked the empty location for files: "no repository", exit 1.
    assert!(log.contains("no pitr repository at"), "{log}");
    let fetched = work.subdir("fetched").join("00000002.history");
    let stored = pitr_hook(
        work.path(),
        repo.args(&["archive-get", "00000002.history", fetched.to_str().unwrap()]),
        &repo.env,
    );
    assert_eq!(code(&stored), 0, "{}", stderr(&stored));
    let original = fs::read(standby.data_dir().join("pg_wal/00000002.history")).unwrap();
    assert_eq!(fs::read(&fetched).unwrap(), original);
    wait_caught_up(&standby, &cascade, WAIT).unwrap();
    assert_eq!(count(&cascade, "t"), "2");
    assert!(
        cascade.data_dir().join("pitr.repository").exists(),
        "the cascade records where it archived"
    );

    // Another cluster's history is refused, by its pg_control, as its WAL would be.
    let other = PgCluster::builder().wal_segsize(1).init().unwrap();
    let copy = other.data_dir().join("pg_wal/00000002.history");
    fs::write(&copy, &original).unwrap();
    make_accessible(&copy).unwrap();
    let refused = pitr_hook(
        other.data_dir(),
        repo.args(&["archive-push", "pg_wal/00000002.history"]),
        &repo.env,
    );
    assert_eq!(code(&refused), 4, "{}", stderr(&refused));
    assert!(stderr(&refused).contains("belongs to PostgreSQL system"));

    // Outside a data directory there is no pg_control to read: a history file cannot start a
    // repository.
    let empty = TestRepo::new(Backend::Local);
    let out = pitr_hook(
        work.path(),
        empty.args(&["archive-push", copy.to_str().unwrap()]),
        &empty.env,
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("archive a WAL segment first"));
    assert!(!empty.object_file("repository.json").exists());
}

/// A standby streaming from its primary, with restore_command on the primary's repository:
/// the repository is moved away. archive-get answers 1 with the problem in the log, so the
/// standby keeps running and streaming, also across a restart (which asks the archive first).
/// In archive recovery the same answer is 200.
#[test]
fn a_standby_keeps_streaming_when_its_repository_vanishes() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .conf("wal_keep_size = 128MB")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    primary.psql("create table t(id int)").unwrap();
    switch_and_wait(&primary);
    let mut standby = standby_of(
        &primary,
        &work,
        "standby",
        PgCluster::builder()
            .conf(repo.restore_command_conf())
            .env("PITR_STORAGE_RETRY_TIMEOUT", "1s")
            .envs(repo.env.clone()),
    )
    .unwrap();
    standby.start().unwrap();
    assert!(standby.data_dir().join("pitr.repository").exists());
    primary.psql("insert into t values (1)").unwrap();
    wait_caught_up(&primary, &standby, WAIT).unwrap();

    let _moved = move_away(&repo);
    let out_dir = work.subdir("out");
    let dest = out_dir.join("seg");
    let get = |dir: &Path| {
        pitr_hook(
            dir,
            repo.args(&[
                "archive-get",
                "000000010000000000000002",
                dest.to_str().unwrap(),
            ]),
            &repo.env,
        )
    };
    let o = get(standby.data_dir());
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("has vanished"), "{}", stderr(&o));
    assert!(stderr(&o).contains("standby.signal"), "{}", stderr(&o));
    assert!(!dest.exists());

    standby.restart().unwrap();
    primary.psql("insert into t values (2)").unwrap();
    wait_caught_up(&primary, &standby, WAIT).unwrap();
    assert_eq!(count(&standby, "t"), "2");
    let log = standby.log_contents();
    assert!(
        log.contains("pitr archive-get: error: the repository at"),
        "{log}"
    );
    assert!(!log.contains("startup process (PID"), "{log}");

    // The same data directory in archive recovery (recovery.signal): fatal for recovery.
    let recovering = work.subdir("recovering");
    for f in ["PG_VERSION", "pitr.repository"] {
        fs::copy(standby.data_dir().join(f), recovering.join(f)).unwrap();
    }
    fs::create_dir_all(recovering.join("global")).unwrap();
    fs::copy(
        standby.data_dir().join("global/pg_control"),
        recovering.join("global/pg_control"),
    )
    .unwrap();
    fs::write(recovering.join("recovery.signal"), "").unwrap();
    make_accessible(&recovering).unwrap();
    let o = get(&recovering);
    assert_eq!(code(&o), 200, "{}", stderr(&o));
    assert!(stderr(&o).contains("has vanished"), "{}", stderr(&o));
}

/// A local repository moved away under a running primary (an unmounted disk leaves an empty
/// directory): the next archive-push refuses with exit 5 and creates nothing; once it is back,
/// archiving resumes. A cluster restored from one of its backups carries the record: with the
/// repository gone its recovery stops (archive-get 200) instead of ending early.
#[test]
fn a_repository_moved_away_is_never_recreated() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let mut primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .conf("archive_timeout = 0")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    primary
        .psql("create table t as select g as id from generate_series(1, 10) g")
        .unwrap();
    // Archiving has started (and recorded the repository) before the backup copies the
    // data directory.
    switch_and_wait(&primary);
    ok(&repo, &["backup", "-d", &primary.conninfo()]);
    primary
        .psql("insert into t select g from generate_series(11, 20) g")
        .unwrap();
    switch_and_wait(&primary);

    let moved = move_away(&repo);
    primary.psql("insert into t values (21)").unwrap();
    let seg = primary
        .psql("select pg_walfile_name(pg_switch_wal())")
        .unwrap();
    wait_archive_failed(&primary, &seg, WAIT).unwrap();
    assert!(!repo.object_file("repository.json").exists());
    let log = primary.log_contents();
    assert!(log.contains("has vanished"), "{log}");
    assert!(log.contains("failed with exit code 5"), "{log}");
    let o = pitr_hook(
        primary.data_dir(),
        repo.args(&["archive-push", &format!("pg_wal/{seg}")]),
        &repo.env,
    );
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("pitr.repository"),
        "the hint names the marker: {}",
        stderr(&o)
    );
    assert!(!repo.object_file("repository.json").exists());
    // At most the first failed push's segment and summary, written before its descriptor check
    // answered; every later attempt reads the descriptor first.
    let stray = stray_files(Path::new(&repo.url));
    let seg_key = format!("wal/{}/{seg}", &seg[..16]);
    assert!(
        stray
            .iter()
            .all(|f| *f == seg_key || *f == format!("{seg_key}.summary")),
        "{stray:?}"
    );

    bring_back(&repo, &moved);
    wait_archived(&primary, &seg, WAIT).unwrap();
    primary.stop().unwrap();

    // A cluster restored from the backup: the marker came with it.
    let dir = work.subdir("restored");
    ok(&repo, &["restore", "--pgdata", dir.to_str().unwrap()]);
    assert!(dir.join("pitr.repository").exists());
    let moved = move_away(&repo);
    let mut restored = PgCluster::builder()
        .existing_data_dir(&dir)
        .envs(repo.env.clone())
        .init()
        .unwrap();
    let failed = restored.start();
    assert!(failed.is_err(), "recovery must stop without its repository");
    let log = restored.log_contents();
    assert!(log.contains("has vanished"), "{log}");
    assert!(!repo.object_file("repository.json").exists());

    bring_back(&repo, &moved);
    restored.start().unwrap();
    restored
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.log_contents()));
    assert_eq!(count(&restored, "t"), "21");
}

/// `archive_mode = always`: a primary and its standby archive the same segments into one
/// repository (identical bytes, accepted from both); at failover the standby archives its
/// `.partial` of timeline 1 and 00000002.history; a restore follows them onto timeline 2.
#[test]
fn archive_mode_always_on_a_primary_and_its_standby() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let mut primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .conf("wal_keep_size = 128MB")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    primary.psql("create table t(id int)").unwrap();
    ok(&repo, &["backup", "-d", &primary.conninfo()]);
    let mut standby = standby_of(
        &primary,
        &work,
        "standby",
        PgCluster::builder()
            .conf("archive_mode = always")
            .conf(repo.restore_command_conf())
            .envs(repo.env.clone()),
    )
    .unwrap();
    standby.start().unwrap();
    let mut last = String::new();
    for i in 0..3 {
        primary
            .psql(&format!(
                "insert into t select g from generate_series(1, {}) g",
                100 * (i + 1)
            ))
            .unwrap();
        last = switch_and_wait(&primary);
    }
    wait_caught_up(&primary, &standby, WAIT).unwrap();
    wait_archived(&standby, &last, WAIT).unwrap();
    let failures = "select failed_count from pg_stat_archiver";
    assert_eq!(
        primary.psql(failures).unwrap(),
        "0",
        "{}",
        primary.log_contents()
    );
    assert_eq!(
        standby.psql(failures).unwrap(),
        "0",
        "{}",
        standby.log_contents()
    );
    let both = primary.log_contents() + &standby.log_contents();
    assert!(
        both.contains("already archived with identical content"),
        "the second server to archive a segment finds it stored: {both}"
    );

    let rows = count(&primary, "t");
    primary.stop().unwrap();
    standby.promote().unwrap();
    standby.psql("insert into t values (-1)").unwrap();
    let tl2 = switch_and_wait(&standby);
    assert!(tl2.starts_with("00000002"), "{tl2}");
    assert!(repo.object_file("wal/00000002.history").exists());
    let tl1 = fs::read_dir(repo.object_file("wal/0000000100000000")).unwrap();
    let partials: Vec<String> = tl1
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert_eq!(partials.len(), 1, "{partials:?}");
    assert_eq!(
        standby.psql(failures).unwrap(),
        "0",
        "{}",
        standby.log_contents()
    );
    drop(standby);

    let (restored, n) = restore_count(&repo, &work, "restored");
    assert_eq!(
        n,
        (rows.parse::<u64>().unwrap() + 1).to_string(),
        "{}",
        restored.log_contents()
    );
    assert_eq!(restored.psql(CURRENT_TIMELINE).unwrap(), "3");
}

/// Restores the newest state into `work/<name>` (not archiving), starts it to the end of
/// recovery, and counts `t`.
fn restore_count(repo: &TestRepo, work: &TestDir, name: &str) -> (PgCluster, String) {
    let dir = work.subdir(name);
    ok(repo, &["restore", "--pgdata", dir.to_str().unwrap()]);
    let pg = PgCluster::builder()
        .existing_data_dir(&dir)
        .conf("archive_mode = off")
        .envs(repo.env.clone())
        .start()
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    pg.wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", pg.log_contents()));
    let n = count(&pg, "t");
    (pg, n)
}

/// As src/test/recovery/t/002_archiving.pl: a standby that restores from the archive only (no
/// streaming) replays what the primary archives; promoted, it archives its history into the
/// same repository, where a second standby from the same backup finds it and follows it.
#[test]
fn a_standby_restoring_only_from_the_archive_and_its_promotion() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(repo.env.clone())
        .start()
        .unwrap();
    let archive_standby = |name: &str| {
        let dir = work.subdir(name);
        base_backup(&primary, &dir, &["-X", "stream"]).unwrap();
        fs::write(dir.join("standby.signal"), "").unwrap();
        PgCluster::builder()
            .existing_data_dir(&dir)
            .conf(repo.restore_command_conf())
            .conf("wal_retrieve_retry_interval = '100ms'")
            .envs(repo.env.clone())
            .init()
            .unwrap()
    };
    let mut standby = archive_standby("standby");
    let mut standby2 = archive_standby("standby2");
    standby.start().unwrap();
    primary
        .psql("create table tab_int as select generate_series(1, 1000) as a; checkpoint")
        .unwrap();
    let lsn = primary.psql("select pg_current_wal_lsn()").unwrap();
    switch_and_wait(&primary);
    primary
        .psql("insert into tab_int values (generate_series(1001, 2000))")
        .unwrap();
    standby
        .wait_for(
            &format!("select '{lsn}'::pg_lsn <= pg_last_wal_replay_lsn()"),
            "t",
            WAIT,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", standby.log_contents()));
    assert_eq!(count(&standby, "tab_int"), "1000");

    standby.promote().unwrap();
    let history = repo.object_file("wal/00000002.history");
    poll("00000002.history archived", WAIT, || {
        Ok(history.exists().then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", standby.log_contents()));

    standby2.start().unwrap();
    standby2.promote().unwrap();
    let log = standby2.log_contents();
    assert!(
        log.contains("restored log file \"00000002.history\" from archive"),
        "{log}"
    );
    for f in ["RECOVERYHISTORY", "RECOVERYXLOG"] {
        assert!(!standby2.data_dir().join("pg_wal").join(f).exists(), "{f}");
    }
    assert_eq!(standby2.psql(CURRENT_TIMELINE).unwrap(), "3");
}

/// As src/test/recovery/t/023_pitr_prepared_xact.pl: recovery to a restore point keeps a
/// transaction prepared before it, which can then be committed, and survives a crash after.
#[test]
fn pitr_keeps_a_prepared_transaction() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .conf("max_prepared_transactions = 10")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    primary.psql("create table foo(i int)").unwrap();
    switch_and_wait(&primary);
    ok(&repo, &["backup", "-d", &primary.conninfo()]);
    primary
        .psql("begin; insert into foo values (1); prepare transaction 'fooinsert'")
        .unwrap();
    primary
        .psql("select pg_create_restore_point('rp')")
        .unwrap();
    primary.psql("insert into foo values (2)").unwrap();
    switch_and_wait(&primary);

    let dir = work.subdir("restored");
    ok(
        &repo,
        &[
            "restore",
            "--pgdata",
            dir.to_str().unwrap(),
            "--target-name",
            "rp",
        ],
    );
    let mut restored = PgCluster::builder()
        .existing_data_dir(&dir)
        .conf("archive_mode = off")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    restored
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.log_contents()));
    assert_eq!(
        restored.psql("select gid from pg_prepared_xacts").unwrap(),
        "fooinsert"
    );
    assert_eq!(count(&restored, "foo"), "0");
    restored.psql("commit prepared 'fooinsert'").unwrap();
    restored.stop_immediate().unwrap();
    restored.start().unwrap();
    assert_eq!(count(&restored, "foo"), "1");
}

/// As src/test/recovery/t/028_pitr_timelines.pl: the restore point is on timeline 1 but the
/// only archived copy of its segment is timeline 2's (the old primary died before archiving
/// it; the promoted standby archived it as a `.partial` and as the first segment of timeline 2).
/// Recovery to it must stop on timeline 1 (switching to 3), and a later recovery follows 1 -> 3.
#[test]
fn pitr_to_a_target_only_archived_in_a_newer_timelines_segment() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let mut primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("archive_mode = on")
        // The standby streams from the backup's start; nothing may be recycled before.
        .conf("wal_keep_size = 128MB")
        .conf(repo.archive_command_conf())
        .envs(repo.env.clone())
        .start()
        .unwrap();
    let mut copies = vec![];
    for name in ["standby", "pitr", "pitr2"] {
        let dir = work.subdir(name);
        let args: &[&str] = if name == "standby" {
            &["-R", "-X", "stream"]
        } else {
            &["-X", "stream"]
        };
        base_backup(&primary, &dir, args).unwrap();
        copies.push(dir);
    }
    primary
        .psql(
            "create table foo(i int); insert into foo values (1); \
             select pg_create_restore_point('rp'); insert into foo values (2)",
        )
        .unwrap();
    let mut standby = PgCluster::builder()
        .existing_data_dir(&copies[0])
        .conf("archive_mode = always")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    wait_caught_up(&primary, &standby, WAIT).unwrap();
    primary.stop_immediate().unwrap();
    standby.promote().unwrap();
    let seg = standby
        .psql("select pg_walfile_name(pg_current_wal_lsn())")
        .unwrap();
    standby.psql("select pg_switch_wal()").unwrap();
    wait_archived(&standby, &seg, WAIT).unwrap();
    standby.stop().unwrap();

    let recovering = |dir: &Path, target: Option<&str>| {
        fs::write(dir.join("recovery.signal"), "").unwrap();
        let mut b = PgCluster::builder()
            .existing_data_dir(dir)
            .conf(repo.restore_command_conf())
            .conf("recovery_target_action = 'promote'")
            .envs(repo.env.clone());
        if let Some(t) = target {
            b = b.conf(format!("recovery_target_name = '{t}'"));
        }
        let pg = b.start().unwrap();
        pg.wait_for("select pg_is_in_recovery()", "f", WAIT)
            .unwrap_or_else(|e| panic!("{e}\n{}", pg.log_contents()));
        pg
    };
    let mut pitr = recovering(&copies[1], Some("rp"));
    assert_eq!(pitr.psql("select max(i) from foo").unwrap(), "1");
    assert_eq!(pitr.psql(CURRENT_TIMELINE).unwrap(), "3");
    pitr.psql("insert into foo values (3)").unwrap();
    poll("the archiver to run", WAIT, || {
        let n =
            pitr.psql("select count(*) from pg_stat_activity where backend_type = 'archiver'")?;
        Ok((n == "1").then_some(()))
    })
    .unwrap();
    // A clean shutdown switches to a new segment and archives the last one.
    pitr.stop().unwrap();
    assert!(repo.object_file("wal/00000003.history").exists());

    let pitr2 = recovering(&copies[2], None);
    assert_eq!(
        pitr2.psql("select max(i) from foo").unwrap(),
        "3",
        "{}",
        pitr2.log_contents()
    );
}

/// `pitr stream` records the repository in the server's data directory like the hooks do (the
/// marker keeps the server user as its owner, so the hooks still read it); with the repository
/// moved away, a restarted stream refuses with exit 5 and creates nothing; once it is back the
/// stream resumes.
#[test]
fn a_stream_never_recreates_a_vanished_repository() {
    use crate::failover::{wait_flushed, Streamer};
    let repo = TestRepo::new(Backend::Local);
    let primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("wal_keep_size = '1GB'")
        .start()
        .unwrap();
    let mut s = Streamer::start(&repo, &primary.conninfo());
    primary
        .psql("create table t as select g as id from generate_series(1, 10) g")
        .unwrap();
    let end = primary
        .psql("select pg_current_wal_lsn()::text from (select pg_switch_wal()) s")
        .unwrap();
    wait_flushed(&primary, &s, &end);
    assert!(s.term().success(), "{}", s.log());
    let marker = fs::read_to_string(primary.data_dir().join("pitr.repository")).unwrap();
    let id = descriptor(&repo)["repository_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(marker.contains(&id), "{marker}");
    // The server's own hooks can still read (and extend) the marker the stream wrote.
    primary.psql("insert into t values (0)").unwrap();
    let prev = primary
        .psql("select pg_walfile_name(pg_switch_wal())")
        .unwrap();
    let o = pitr_hook(
        primary.data_dir(),
        repo.args(&["archive-push", &format!("pg_wal/{prev}")]),
        &repo.env,
    );
    assert_eq!(
        code(&o),
        0,
        "{}\n{:?}",
        stderr(&o),
        fs::read_dir(primary.data_dir().join("pg_wal"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );

    let moved = move_away(&repo);
    let o = repo.pitr(&["stream", "-d", &primary.conninfo()]);
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("has vanished"), "{}", stderr(&o));
    assert!(stderr(&o).contains("pitr.repository"), "{}", stderr(&o));
    assert!(!repo.object_file("repository.json").exists());

    bring_back(&repo, &moved);
    let mut s = Streamer::start(&repo, &primary.conninfo());
    primary.psql("insert into t values (11)").unwrap();
    let end = primary
        .psql("select pg_current_wal_lsn()::text from (select pg_switch_wal()) s")
        .unwrap();
    wait_flushed(&primary, &s, &end);
    assert!(s.term().success(), "{}", s.log());
}

//! Our own versions of the situations PostgreSQL's src/test/recovery suite archives or restores
//! in (issue 18), with `pitr archive-push` / `archive-get` as the hooks: what each upstream file
//! expects of an archive must hold of pitr. The upstream file each test follows is named in its
//! comment; 002, 023 and 028 are in tests/topology.rs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{switch_and_wait, Backend, TestRepo};
use crate::harness::topology::{base_backup, wait_archived, wait_caught_up};
use crate::harness::{command_as_server_user, conf_quote, pg_bin, poll, PgCluster, TestDir};
use crate::pitr::ok;

const WAIT: Duration = Duration::from_secs(120);

fn psql1(pg: &PgCluster, sql: &str) -> String {
    pg.psql(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}\n{}", pg.log_contents()))
}

/// A primary archiving into `repo` with pitr, 1 MiB segments, plus `extra` settings.
fn archiving_primary(repo: &TestRepo, extra: &[&str]) -> PgCluster {
    let mut b = PgCluster::builder()
        .wal_segsize(1)
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(repo.env.clone());
    for c in extra {
        b = b.conf(*c);
    }
    b.start().unwrap()
}

/// A copy of the data directory `src` (taken while its server is stopped, or a base backup).
fn copy_dir(src: &Path, work: &TestDir, name: &str) -> PathBuf {
    let dest = work.subdir(name);
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(&dest)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {}", src.display());
    dest
}

/// A server on the data directory `dir` that restores from `repo` with pitr archive-get, in
/// standby mode (`standby.signal`) or archive recovery (`recovery.signal`), with `extra`.
fn restoring(repo: &TestRepo, dir: &Path, standby: bool, extra: &[String]) -> PgCluster {
    let signal = if standby {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    fs::write(dir.join(signal), "").unwrap();
    let mut b = PgCluster::builder()
        .existing_data_dir(dir)
        .conf(repo.restore_command_conf())
        .conf("wal_retrieve_retry_interval = '100ms'")
        .envs(repo.env.clone());
    for c in extra {
        b = b.conf(c.clone());
    }
    b.init().unwrap()
}

fn wait_replayed(pg: &PgCluster, lsn: &str) {
    pg.wait_for(
        &format!("select '{lsn}'::pg_lsn <= pg_last_wal_replay_lsn()"),
        "t",
        WAIT,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", pg.log_contents()));
}

/// As 003_recovery_targets.pl: from one base backup, recovery to `immediate`, an xid (after a
/// bumped xid epoch), a time, a restore point name and an LSN each stop at the exact row count,
/// with every file fetched by archive-get; overriding settings are allowed, conflicting ones
/// refused; and a target past the end of the archive ends in PostgreSQL's FATAL "recovery ended
/// before configured recovery target was reached", which needs archive-get's "not found" (1).
#[test]
fn recovery_targets_as_003() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let mut primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(repo.env.clone())
        .init()
        .unwrap();
    let mut reset = command_as_server_user(pg_bin("pg_resetwal"));
    reset.args(["--epoch", "1"]).arg(primary.data_dir());
    assert!(reset.status().unwrap().success());
    primary.start().unwrap();
    psql1(
        &primary,
        "create table tab_int as select generate_series(1, 1000) as a",
    );
    let lsn1 = psql1(&primary, "select pg_current_wal_lsn()");
    let backup = work.subdir("backup");
    base_backup(&primary, &backup, &["-X", "stream"]).unwrap();
    psql1(
        &primary,
        "insert into tab_int values (generate_series(1001, 2000))",
    );
    let row = psql1(
        &primary,
        "select pg_current_wal_lsn() || '|' || pg_current_xact_id()",
    );
    let (lsn2, xid) = row.split_once('|').unwrap();
    psql1(
        &primary,
        "insert into tab_int values (generate_series(2001, 3000))",
    );
    let lsn3 = psql1(&primary, "select pg_current_wal_lsn()");
    let time = psql1(&primary, "select now()");
    psql1(
        &primary,
        "insert into tab_int values (generate_series(3001, 4000))",
    );
    let lsn4 = psql1(&primary, "select pg_current_wal_lsn()");
    psql1(&primary, "select pg_create_restore_point('my_target')");
    psql1(
        &primary,
        "insert into tab_int values (generate_series(4001, 5000))",
    );
    let lsn5 = psql1(&primary, "select pg_current_wal_lsn()");
    psql1(
        &primary,
        "insert into tab_int values (generate_series(5001, 6000))",
    );
    switch_and_wait(&primary);

    let cases: [(&str, Vec<String>, &str, &str); 6] = [
        (
            "immediate",
            vec!["recovery_target = 'immediate'".into()],
            "1000",
            &lsn1,
        ),
        (
            "xid",
            vec![format!("recovery_target_xid = '{xid}'")],
            "2000",
            lsn2,
        ),
        (
            "time",
            vec![format!("recovery_target_time = '{time}'")],
            "3000",
            &lsn3,
        ),
        (
            "name",
            vec!["recovery_target_name = 'my_target'".into()],
            "4000",
            &lsn4,
        ),
        (
            "lsn",
            vec![format!("recovery_target_lsn = '{lsn5}'")],
            "5000",
            &lsn5,
        ),
        (
            "overriding",
            vec![
                "recovery_target_name = 'my_target'".into(),
                "recovery_target_name = ''".into(),
                format!("recovery_target_time = '{time}'"),
            ],
            "3000",
            &lsn3,
        ),
    ];
    for (name, params, rows, until) in cases {
        let dir = copy_dir(&backup, &work, name);
        let mut standby = restoring(&repo, &dir, true, &params);
        standby.start().unwrap();
        wait_replayed(&standby, until);
        let n = psql1(&standby, "select count(*) from tab_int");
        assert_eq!(n, rows, "{name}\n{}", standby.log_contents());
        standby.stop_immediate().unwrap();
    }

    let dir = copy_dir(&backup, &work, "conflicting");
    let conflicting = [
        "recovery_target_name = 'my_target'".to_string(),
        format!("recovery_target_time = '{time}'"),
    ];
    let mut standby = restoring(&repo, &dir, true, &conflicting);
    assert!(
        standby.start().is_err(),
        "conflicting targets must not start"
    );
    assert!(standby
        .log_contents()
        .contains("multiple recovery targets specified"));

    let dir = copy_dir(&backup, &work, "not_reached");
    let params = ["recovery_target_name = 'does_not_exist'".to_string()];
    let mut pitr = restoring(&repo, &dir, false, &params);
    let _ = pitr.start_nowait();
    poll("the server to stop", WAIT, || {
        let log = pitr.log_contents();
        Ok(log.contains("database system is shut down").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", pitr.log_contents()));
    let log = pitr.log_contents();
    assert!(
        log.contains("recovery ended before configured recovery target was reached"),
        "{log}"
    );
}

/// As 004_timeline_switch.pl (its archiving half): a primary restarted as a standby and
/// promoted switches to timeline 2; a standby made from a backup taken before follows it onto
/// timeline 2, by streaming and with pitr archive-get as its restore_command. The promoted
/// server archives its history and its old timeline's last segment with pitr.
#[test]
fn a_standby_follows_a_primary_on_a_newer_timeline_as_004() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let mut primary = archiving_primary(&repo, &["wal_keep_size = 512MB"]);
    let dir = work.subdir("standby");
    base_backup(&primary, &dir, &["-R", "-X", "stream"]).unwrap();
    let mut standby = PgCluster::builder()
        .existing_data_dir(&dir)
        .conf(repo.restore_command_conf())
        .conf("recovery_target_timeline = 'latest'")
        .envs(repo.env.clone())
        .init()
        .unwrap();
    primary.stop().unwrap();
    fs::write(primary.data_dir().join("standby.signal"), "").unwrap();
    primary.start().unwrap();
    primary.promote().unwrap();
    primary
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap();
    standby.start().unwrap();
    psql1(&primary, "create table tab_int as select 1 as a");
    wait_caught_up(&primary, &standby, WAIT).unwrap();
    assert_eq!(psql1(&standby, "select count(*) from tab_int"), "1");
    let history = repo.object_file("wal/00000002.history");
    poll("00000002.history archived", WAIT, || {
        Ok(history.exists().then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", primary.log_contents()));
    assert!(!primary.log_contents().contains("archive command failed"));
}

fn status_file(pg: &PgCluster, seg: &str, ext: &str) -> bool {
    pg.data_dir()
        .join(format!("pg_wal/archive_status/{seg}.{ext}"))
        .exists()
}

/// As 020_archive_status.pl: a failing archive-push leaves `.ready` (no `.done`), kept through
/// a crash; once it succeeds the archiver marks it `.done`. A standby made from a cold copy with
/// archive_mode = on restores with archive-get and creates `.done`, never `.ready`; with
/// archive_mode = always it keeps `.ready` while its archive-push fails, and then archives both
/// segments into the same repository as the primary (identical bytes accepted twice).
#[test]
fn archive_status_files_as_020() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    // The default segment size, as upstream: the counts below depend on it.
    let mut primary = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .conf("autovacuum = off")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    let failing = format!(
        "{} --repo {} archive-push %p_does_not_exist",
        crate::harness::pitr_bin().display(),
        repo.url
    );
    psql1(
        &primary,
        &format!(
            "alter system set archive_command to {}",
            conf_quote(&failing)
        ),
    );
    psql1(&primary, "select pg_reload_conf()");
    let seg1 = psql1(&primary, "select pg_walfile_name(pg_current_wal_lsn())");
    psql1(
        &primary,
        "create table mine as select generate_series(1, 10) as x",
    );
    psql1(&primary, "select pg_switch_wal()");
    psql1(&primary, "checkpoint");
    primary
        .wait_for("select failed_count > 0 from pg_stat_archiver", "t", WAIT)
        .unwrap();
    assert!(status_file(&primary, &seg1, "ready"));
    assert!(!status_file(&primary, &seg1, "done"));
    assert_eq!(
        psql1(
            &primary,
            "select archived_count || '|' || last_failed_wal from pg_stat_archiver"
        ),
        format!("0|{seg1}")
    );
    primary.stop_immediate().unwrap();
    let cold = copy_dir(primary.data_dir(), &work, "cold");
    primary.start().unwrap();
    assert!(
        status_file(&primary, &seg1, "ready"),
        "kept through crash recovery"
    );
    psql1(&primary, "alter system reset archive_command");
    psql1(&primary, "select pg_reload_conf()");
    wait_archived(&primary, &seg1, WAIT).unwrap();
    assert!(!status_file(&primary, &seg1, "ready"));
    assert!(status_file(&primary, &seg1, "done"));

    let seg2 = psql1(&primary, "select pg_walfile_name(pg_current_wal_lsn())");
    psql1(
        &primary,
        "insert into mine select generate_series(10, 20); checkpoint",
    );
    let lsn = psql1(&primary, "select pg_switch_wal()");
    wait_archived(&primary, &seg2, WAIT).unwrap();

    let on = ["archive_mode = on".to_string()];
    let mut standby1 = restoring(&repo, &copy_dir(&cold, &work, "standby1"), true, &on);
    standby1.start().unwrap();
    wait_replayed(&standby1, &lsn);
    psql1(&standby1, "checkpoint");
    assert!(
        !status_file(&standby1, &seg1, "ready"),
        "inherited .ready removed"
    );
    assert!(!status_file(&standby1, &seg2, "ready"));
    assert!(status_file(&standby1, &seg2, "done"));

    let always = ["archive_mode = always".to_string()];
    let mut standby2 = restoring(&repo, &copy_dir(&cold, &work, "standby2"), true, &always);
    standby2.start().unwrap();
    wait_replayed(&standby2, &lsn);
    psql1(&standby2, "checkpoint");
    assert!(status_file(&standby2, &seg1, "ready"));
    assert!(status_file(&standby2, &seg2, "ready"));
    psql1(&standby2, "select pg_stat_reset_shared('archiver')");
    standby2.stop_immediate().unwrap();
    standby2.start().unwrap();
    assert!(
        status_file(&standby2, &seg1, "ready"),
        "kept through crash recovery"
    );
    psql1(&standby2, "alter system reset archive_command");
    psql1(&standby2, "select pg_reload_conf()");
    wait_archived(&standby2, &seg2, WAIT).unwrap();
    assert_eq!(
        psql1(&standby2, "select archived_count from pg_stat_archiver"),
        "2"
    );
    for seg in [&seg1, &seg2] {
        assert!(!status_file(&standby2, seg, "ready"), "{seg}");
        assert!(status_file(&standby2, seg, "done"), "{seg}");
    }
    standby1.stop().unwrap();
    standby2.stop().unwrap();
}

/// As 025_stuck_on_old_timeline.pl: the primary archives only history files; its standby is
/// promoted; a cascading standby made from the standby with `-X none` has only the history file
/// in the repository (created by it from pg_control) and must still follow timeline 2 by
/// streaming.
#[test]
fn a_cascading_standby_is_not_stuck_on_the_old_timeline_as_025() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let push = repo.command("archive-push %p");
    let history_only = format!(
        "archive_command = {}",
        conf_quote(&format!(
            "case %f in *.history) {push} ;; *) exit 0 ;; esac"
        ))
    );
    let primary = PgCluster::builder()
        .wal_segsize(1)
        .conf("archive_mode = on")
        .conf(history_only)
        .conf("wal_keep_size = 128MB")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    let sdir = work.subdir("standby");
    base_backup(&primary, &sdir, &["-R", "-X", "stream"]).unwrap();
    let mut standby = PgCluster::builder()
        .existing_data_dir(&sdir)
        .envs(repo.env.clone())
        .start()
        .unwrap();
    let cdir = work.subdir("cascade");
    base_backup(&standby, &cdir, &["-R", "-X", "none"]).unwrap();
    let mut cascade = PgCluster::builder()
        .existing_data_dir(&cdir)
        .conf(repo.restore_command_conf())
        .conf("recovery_target_timeline = 'latest'")
        .conf("wal_retrieve_retry_interval = '100ms'")
        .envs(repo.env.clone())
        .init()
        .unwrap();
    standby.promote().unwrap();
    standby
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap();
    let seg = psql1(&standby, "select pg_walfile_name(pg_current_wal_lsn())");
    psql1(&standby, "select pg_switch_wal()");
    wait_archived(&standby, &seg, WAIT).unwrap();
    assert!(repo.object_file("wal/00000002.history").exists());
    cascade.start().unwrap();
    psql1(&standby, "create table tab_int as select 1 as a");
    wait_caught_up(&standby, &cascade, WAIT).unwrap();
    assert_eq!(psql1(&cascade, "select count(*) from tab_int"), "1");
}

/// As 026_overwrite_contrecord.pl, with archiving: a record that crosses into a segment lost in
/// a crash is overwritten at restart (OVERWRITE_CONTRECORD). A standby streaming from the
/// primary and a restore from the repository (the first segment archived by pitr ends in the
/// incomplete record) both replay past it.
#[test]
fn an_overwritten_contrecord_is_replayed_from_the_archive_as_026() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let mut primary = archiving_primary(&repo, &["wal_keep_size = 1GB"]);
    psql1(&primary, "create table filler (a int)");
    switch_and_wait(&primary);
    ok(&repo, &["backup", "-d", &primary.conninfo()]);
    let start = psql1(&primary, "select pg_current_wal_insert_lsn() - '0/0'");
    psql1(
        &primary,
        "insert into filler select * from generate_series(1, 1000)",
    );
    let end = psql1(&primary, "select pg_current_wal_insert_lsn() - '0/0'");
    let rows_walsize = end.parse::<u64>().unwrap() - start.parse::<u64>().unwrap();
    psql1(
        &primary,
        &format!(
            "insert into filler select g from generate_series(1, 1000 * ((1024 * 1024) - \
             ((pg_current_wal_insert_lsn() - '0/0') % (1024 * 1024))) / {rows_walsize}) g"
        ),
    );
    let initfile = psql1(
        &primary,
        "select pg_walfile_name(pg_current_wal_insert_lsn())",
    );
    psql1(
        &primary,
        "select pg_logical_emit_message(true, 'test 026', repeat('xyzxz', 123456))",
    );
    let endfile = psql1(
        &primary,
        "select pg_walfile_name(pg_current_wal_insert_lsn())",
    );
    assert_ne!(initfile, endfile);
    primary.stop_immediate().unwrap();
    fs::remove_file(primary.data_dir().join("pg_wal").join(&endfile)).unwrap();
    let sdir = copy_dir(primary.data_dir(), &work, "standby");
    let mut b = PgCluster::builder()
        .existing_data_dir(&sdir)
        .conf(format!(
            "primary_conninfo = {}",
            conf_quote(&primary.conninfo())
        ))
        .conf(repo.restore_command_conf())
        .conf("archive_mode = off")
        .envs(repo.env.clone());
    b = b.conf("wal_retrieve_retry_interval = '100ms'");
    fs::write(sdir.join("standby.signal"), "").unwrap();
    let mut standby = b.init().unwrap();
    primary.start().unwrap();
    standby.start().unwrap();
    psql1(
        &primary,
        "create table foo (a text); insert into foo values ('hello')",
    );
    psql1(
        &primary,
        "select pg_logical_emit_message(true, 'test 026', 'AABBCC')",
    );
    wait_caught_up(&primary, &standby, WAIT).unwrap();
    assert_eq!(psql1(&standby, "select * from foo"), "hello");
    poll("the standby to log the skipped contrecord", WAIT, || {
        let log = standby.log_contents();
        Ok(log
            .contains("successfully skipped missing contrecord at")
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", standby.log_contents()));
    switch_and_wait(&primary);
    wait_archived(&primary, &initfile, WAIT).unwrap();

    let dir = work.subdir("restored");
    ok(&repo, &["restore", "--pgdata", dir.to_str().unwrap()]);
    let restored = PgCluster::builder()
        .existing_data_dir(&dir)
        .conf("archive_mode = off")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    restored
        .wait_for("select pg_is_in_recovery()", "f", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.log_contents()));
    assert_eq!(psql1(&restored, "select * from foo"), "hello");
    assert!(restored
        .log_contents()
        .contains("successfully skipped missing contrecord at"));
}

/// As 045_archive_restartpoint.pl: archive recovery through many segments (each ending with a
/// checkpoint) with max_wal_size = 2 MB, so that restartpoints run during recovery and remove
/// the segments archive-get restored, replays to the target.
#[test]
fn restartpoints_during_archive_recovery_as_045() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let mut primary = archiving_primary(&repo, &[]);
    let backup = work.subdir("backup");
    base_backup(&primary, &backup, &["-X", "stream"]).unwrap();
    psql1(
        &primary,
        "do $$begin for i in 1..64 loop checkpoint; perform pg_switch_wal(); end loop; end$$",
    );
    let until = psql1(&primary, "select pg_current_wal_lsn()");
    psql1(&primary, "select pg_switch_wal()");
    primary.stop().unwrap();
    let params = [
        format!("recovery_target_lsn = '{until}'"),
        "recovery_target_action = 'pause'".to_string(),
        "max_wal_size = 2MB".to_string(),
        "log_checkpoints = on".to_string(),
    ];
    let mut restore = restoring(&repo, &backup, true, &params);
    restore.start().unwrap();
    wait_replayed(&restore, &until);
    // Restartpoints run in the checkpointer, behind the replay.
    poll("a restartpoint", WAIT, || {
        Ok(restore
            .log_contents()
            .contains("restartpoint complete")
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", restore.log_contents()));
    restore.stop().unwrap();
}

/// As 043_no_contrecord_switch.pl: the page holding the continuation of a record that spans two
/// pages is zeroed in the last segment, and that segment is archived with archive-push. Two
/// standbys restoring with archive-get stop at the zeroed page; one is promoted (the timeline
/// switch falls right before the broken record) and switches WAL; the other, streaming from it
/// and still restoring from the repository, follows it onto the new timeline.
#[test]
fn a_timeline_switch_before_a_broken_continuation_record_as_043() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let mut primary = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .conf("autovacuum = off")
        .conf("checkpoint_timeout = '30min'")
        .conf("wal_keep_size = 1GB")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    let backup = work.subdir("backup");
    base_backup(&primary, &backup, &["-X", "stream"]).unwrap();
    psql1(&primary, "create table t as select 0");
    let setting = |name: &str| -> u64 {
        psql1(
            &primary,
            &format!("select setting from pg_settings where name = '{name}'"),
        )
        .parse()
        .unwrap()
    };
    let (seg_size, block) = (setting("wal_segment_size"), setting("wal_block_size"));
    let tli: u64 = psql1(&primary, "select timeline_id from pg_control_checkpoint()")
        .parse()
        .unwrap();
    let emit = |size: u64| -> u64 {
        psql1(
            &primary,
            &format!("select pg_logical_emit_message(true, '', repeat('a', {size})) - '0/0'"),
        )
        .parse()
        .unwrap()
    };
    let insert_lsn = || -> u64 {
        psql1(&primary, "select pg_current_wal_insert_lsn() - '0/0'")
            .parse()
            .unwrap()
    };
    // Near the end of a page, with room for the start of a record only.
    emit(0);
    let mut end = insert_lsn();
    while end % block >= block - block / 4 {
        emit(block / 4);
        end = insert_lsn();
    }
    let end = emit(block - end % block);
    primary.stop_immediate().unwrap();

    let start_page = end & !(block - 1);
    let (segno, offset) = (start_page / seg_size, start_page % seg_size);
    let per_id = 0x1_0000_0000 / seg_size;
    let name = format!("{tli:08X}{:08X}{:08X}", segno / per_id, segno % per_id);
    let path = primary.data_dir().join("pg_wal").join(&name);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&vec![0u8; block as usize]).unwrap();
    }
    ok(&repo, &["archive-push", path.to_str().unwrap()]);

    let mut standby1 = restoring(&repo, &copy_dir(&backup, &work, "standby1"), true, &[]);
    let mut standby2 = restoring(&repo, &copy_dir(&backup, &work, "standby2"), true, &[]);
    standby1.start().unwrap();
    standby2.start().unwrap();
    for s in [&standby1, &standby2] {
        poll("the zeroed page to be reached", WAIT, || {
            let log = s.log_contents();
            let hit = log.lines().any(|l| {
                l.contains("invalid magic number 0000")
                    && l.contains(&name)
                    && l.contains(&format!("offset {offset}"))
            });
            Ok(hit.then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log_contents()));
    }
    standby1.promote().unwrap();
    psql1(&standby1, "select pg_switch_wal()");
    psql1(
        &standby1,
        "insert into t select * from generate_series(1, 1000)",
    );
    standby2
        .append_conf(&format!(
            "primary_conninfo = {}",
            conf_quote(&standby1.conninfo())
        ))
        .unwrap();
    standby2.reload().unwrap();
    wait_caught_up(&standby1, &standby2, WAIT).unwrap();
    assert_eq!(psql1(&standby2, "select count(*) from t"), "1001");
}

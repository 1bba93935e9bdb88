//! Backups that carry their own WAL, and backups taken from a streaming standby, with real
//! PostgreSQL and real replication: each backup completes without waiting for archive_command,
//! and a restore from it replays to exactly the rows committed up to the target.

use std::thread::sleep;
use std::time::{Duration, Instant};

use pitr::wal::Lsn;

use crate::common::{switch_and_wait, Backend, TestRepo};
use crate::harness::topology::{standby_of, wait_caught_up};
use crate::harness::{PgCluster, TestDir};
use crate::pitr::{insert, ok, primary, restore_and_read};

/// Far longer than any backup here takes: a backup that waited for archiving would fail.
const WAL_TIMEOUT: &str = "90s";
const QUICK: Duration = Duration::from_secs(45);

const MARKS: &str = "create table marks(id serial primary key, phase text not null, \
                     at timestamptz default clock_timestamp())";

fn list_json(repo: &TestRepo) -> serde_json::Value {
    serde_json::from_str(&ok(repo, &["list", "--json"])).unwrap()
}

/// `pitr backup -d conninfo --json`; returns the catalog entry and how long it took.
fn backup(repo: &TestRepo, conninfo: &str) -> (serde_json::Value, Duration) {
    let began = Instant::now();
    let out = ok(
        repo,
        &[
            "backup",
            "-d",
            conninfo,
            "--wal-timeout",
            WAL_TIMEOUT,
            "--json",
        ],
    );
    (serde_json::from_str(&out).unwrap(), began.elapsed())
}

fn lsn(v: &serde_json::Value) -> Lsn {
    v.as_str().unwrap().parse().unwrap()
}

/// `archive_mode = off` and no stream: the only WAL the repository gets is what the backup
/// streams itself, and that is enough to restore it.
#[test]
fn a_backup_without_archiving_completes_from_its_own_wal_and_restores() {
    let repo = TestRepo::new(Backend::Local);
    let pg = PgCluster::builder()
        .conf("archive_mode = off")
        .start()
        .unwrap();
    pg.psql(MARKS).unwrap();
    insert(&pg, "a_base");

    let (info, took) = backup(&repo, &pg.conninfo());
    assert!(
        took < QUICK,
        "the backup took {took:?}: did it wait for WAL?"
    );
    assert_eq!(info["source"]["standby"], false, "{info}");
    assert_eq!(info["source"]["port"], pg.port(), "{info}");
    // Not in the repository: nothing archives after the backup.
    insert(&pg, "b_not_archived");

    let v = list_json(&repo);
    let seg = v["wal_segment_size"].as_u64().unwrap();
    let first = lsn(&info["start_lsn"]).segno(seg);
    let last = Lsn(lsn(&info["stop_lsn"]).0 - 1).segno(seg);
    let ranges = v["wal"]["1"].as_array().unwrap();
    assert_eq!(ranges.len(), 1, "{v}");
    assert!(
        ranges[0]["segments"].as_u64().unwrap() > last - first,
        "the backup's segments {first}..={last} are not all stored: {v}"
    );
    assert!(
        v["recoverable_window"]["from_backup"].is_string(),
        "not recoverable: {v}"
    );

    let work = TestDir::new();
    let (restored, got) = restore_and_read(&repo, &work, "restored", &[], false);
    assert_eq!(got, "a_base:10", "{}", restored.log_contents());
}

/// A primary archiving into the repository, a streaming standby, and backups taken from the
/// standby: once while the primary is quiet (no segment switch anywhere, so the backup's last
/// segment is only ever stored as chunks by the backup itself) and once while pgbench writes
/// on the primary. A restore to a time after the backups has exactly the rows committed by then.
#[test]
fn backups_from_a_standby_restore_to_exact_rows() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let pg = primary(&repo);
    pg.psql(MARKS).unwrap();
    pg.pgbench_init(1).unwrap();
    let mut standby = standby_of(&pg, &work, "standby", PgCluster::builder()).unwrap();
    standby.start().unwrap();
    // A checkpoint the standby can restart at, then rows: the backup starts and stops in the
    // middle of a segment the primary has not finished.
    pg.psql("checkpoint").unwrap();
    insert(&pg, "a_base");
    wait_caught_up(&pg, &standby, Duration::from_secs(60)).unwrap();

    // Quiet: the primary archives nothing until its current segment is switched.
    let (quiet, took) = backup(&repo, &standby.conninfo());
    assert!(
        took < QUICK,
        "the backup took {took:?}: did it wait for archiving?"
    );
    assert_eq!(quiet["source"]["standby"], true, "{quiet}");
    assert_eq!(quiet["source"]["port"], standby.port(), "{quiet}");
    assert_eq!(quiet["timeline"], 1, "{quiet}");
    let v = list_json(&repo);
    let streamed = &v["streamed"]["1"];
    assert!(
        streamed.is_string() && lsn(streamed) >= lsn(&quiet["stop_lsn"]),
        "the backup's last, incomplete segment is not stored as chunks: {v}"
    );
    let listing = ok(&repo, &["list"]);
    assert!(
        listing.contains(&format!("standby {}", standby.socket_dir().display())),
        "{listing}"
    );

    // Busy: pgbench on the primary for the whole backup.
    insert(&pg, "b_before_busy");
    let busy = std::thread::scope(|s| {
        let bench = s.spawn(|| pg.pgbench(["-n", "-c", "2", "-T", "6"]));
        sleep(Duration::from_secs(1));
        let (busy, took) = backup(&repo, &standby.conninfo());
        assert!(took < QUICK, "the backup took {took:?}");
        bench.join().unwrap().unwrap();
        busy
    });
    assert_eq!(busy["source"]["standby"], true, "{busy}");
    insert(&pg, "c_after_busy");
    let history = pg.psql("select count(*) from pgbench_history").unwrap();
    assert_ne!(history, "0");
    sleep(Duration::from_millis(1100));
    let target = pg.psql("select now()").unwrap();
    sleep(Duration::from_millis(1100));
    insert(&pg, "d_after_target");
    pg.pgbench(["-n", "-c", "1", "-t", "50"]).unwrap();
    switch_and_wait(&pg);

    let want = "a_base:10,b_before_busy:10,c_after_busy:10";
    for (name, pick) in [("busy", &busy), ("quiet", &quiet)] {
        let id = pick["id"].as_str().unwrap();
        let (restored, got) = restore_and_read(
            &repo,
            &work,
            name,
            &["--target-time", &target, "--backup", id],
            false,
        );
        let log = restored.log_contents();
        assert_eq!(got, want, "from the {name} backup\n{log}");
        assert_eq!(
            restored
                .psql("select count(*) from pgbench_history")
                .unwrap(),
            history,
            "from the {name} backup\n{log}"
        );
    }
}

/// With a single WAL sender the backup cannot stream its own WAL: it says so and falls back to
/// waiting for archive_command, which stores the WAL, and completes.
#[test]
fn a_backup_without_a_free_wal_sender_falls_back_to_archiving() {
    let repo = TestRepo::new(Backend::Local);
    let pg = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .conf("max_wal_senders = 1")
        .envs(repo.env.clone())
        .start()
        .unwrap();
    pg.psql(MARKS).unwrap();
    insert(&pg, "a_base");
    let o = crate::pitr::run(
        &repo,
        &["backup", "-d", &pg.conninfo(), "--wal-timeout", WAL_TIMEOUT],
    );
    assert_eq!(crate::common::code(&o), 0, "{}", crate::common::text(&o));
    assert!(
        crate::common::text(&o).contains("second replication connection"),
        "no warning about the fallback: {}",
        crate::common::text(&o)
    );
    let work = TestDir::new();
    let (restored, got) = restore_and_read(&repo, &work, "restored", &[], false);
    assert_eq!(got, "a_base:10", "{}", restored.log_contents());
}

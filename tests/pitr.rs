//! Base backup + point-in-time restore with real PostgreSQL, on a local directory and on S3:
//! marker rows before and after each kind of target, restore, start PostgreSQL, and check that
//! exactly the rows committed before the target exist.

use std::process::Output;
use std::thread::sleep;
use std::time::Duration;

use crate::common::{assert_code, code, on_local_and_s3, switch_and_wait, text, Backend, TestRepo};
use crate::harness::{pitr_as_server_user, poll, PgCluster, TestDir};

/// Runs pitr as the server user, as PostgreSQL's hooks do, so a local repository stays
/// writable by both.
pub(crate) fn run(repo: &TestRepo, args: &[&str]) -> Output {
    pitr_as_server_user(repo.args(args), &repo.env)
}

pub(crate) fn ok(repo: &TestRepo, args: &[&str]) -> String {
    let o = run(repo, args);
    assert_eq!(code(&o), 0, "pitr {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn primary(repo: &TestRepo) -> PgCluster {
    PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(repo.env.clone())
        .start()
        .unwrap()
}

pub(crate) fn insert(pg: &PgCluster, phase: &str) {
    pg.psql(&format!(
        "insert into marks(phase) select '{phase}' from generate_series(1, 10)"
    ))
    .unwrap();
}

/// Restores with `target_args` into a fresh directory, starts PostgreSQL on it, waits for the
/// end of recovery, and returns the phases present with their row counts.
pub(crate) fn restore_and_read(
    repo: &TestRepo,
    work: &TestDir,
    name: &str,
    target_args: &[&str],
    archive: bool,
) -> (PgCluster, String) {
    let dir = work.subdir(name);
    let mut args = vec!["restore", "--pgdata", dir.to_str().unwrap()];
    args.extend_from_slice(target_args);
    ok(repo, &args);
    let mut b = PgCluster::builder()
        .existing_data_dir(&dir)
        .envs(repo.env.clone());
    if !archive {
        // Several restores of one primary must not archive into its repository.
        b = b.conf("archive_mode = off");
    }
    let pg = b.start().unwrap_or_else(|e| panic!("{name}: {e:#}"));
    pg.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", pg.log_contents()));
    let phases = pg.psql("select string_agg(phase || ':' || n, ',' order by phase) from (select phase, count(*) n from marks group by phase) s").unwrap();
    (pg, phases)
}

fn pitr_targets(backend: Backend) {
    let repo = TestRepo::new(backend);
    let pg = primary(&repo);
    pg.psql("create table marks(id serial primary key, phase text not null, at timestamptz default clock_timestamp())").unwrap();
    insert(&pg, "a_base");
    let out = ok(&repo, &["backup", "-d", &pg.conninfo()]);
    assert!(out.contains("complete"), "{out}");

    insert(&pg, "b_before_time");
    sleep(Duration::from_millis(1100));
    let t = pg.psql("select now()").unwrap();
    sleep(Duration::from_millis(1100));
    insert(&pg, "c_before_lsn");
    let lsn = pg.psql("select pg_current_wal_insert_lsn()").unwrap();
    insert(&pg, "d_before_name");
    pg.psql("select pg_create_restore_point('before_e')")
        .unwrap();
    // One implicit transaction: the insert and the xid it got.
    let xid = pg.psql("insert into marks(phase) select 'e_at_xid' from generate_series(1, 10); select txid_current()").unwrap();
    insert(&pg, "f_final");
    switch_and_wait(&pg);

    let listing = ok(&repo, &["list"]);
    assert!(listing.contains("recoverable: from"), "{listing}");

    let work = TestDir::new();
    let cases: [(&str, Vec<&str>, &str); 5] = [
        (
            "time",
            vec!["--target-time", &t],
            "a_base:10,b_before_time:10",
        ),
        (
            "lsn",
            vec!["--target-lsn", &lsn],
            "a_base:10,b_before_time:10,c_before_lsn:10",
        ),
        (
            "name",
            vec!["--target-name", "before_e"],
            "a_base:10,b_before_time:10,c_before_lsn:10,d_before_name:10",
        ),
        (
            "xid",
            vec!["--target-xid", &xid],
            "a_base:10,b_before_time:10,c_before_lsn:10,d_before_name:10,e_at_xid:10",
        ),
        (
            "latest",
            vec![],
            "a_base:10,b_before_time:10,c_before_lsn:10,d_before_name:10,e_at_xid:10,f_final:10",
        ),
    ];
    for (name, args, want) in cases {
        let (restored, got) = restore_and_read(&repo, &work, name, &args, false);
        assert_eq!(
            got,
            want,
            "target {name} {args:?}\n{}",
            restored.log_contents()
        );
    }
}

on_local_and_s3!(
    pitr_targets,
    pitr_to_every_target_kind_on_local_directory,
    pitr_to_every_target_kind_on_s3
);

/// Restore, promote (timeline 2), keep archiving, and restore again: recovery follows the
/// history file from the timeline-1 backup onto timeline 2.
#[test]
fn restore_follows_a_timeline_switch() {
    let repo = TestRepo::new(Backend::Local);
    let pg = primary(&repo);
    pg.psql("create table marks(id serial primary key, phase text not null, at timestamptz default clock_timestamp())").unwrap();
    insert(&pg, "a_tl1");
    ok(&repo, &["backup", "-d", &pg.conninfo()]);
    insert(&pg, "b_tl1");
    switch_and_wait(&pg);
    drop(pg);

    let work = TestDir::new();
    let (tl2, got) = restore_and_read(&repo, &work, "first", &[], true);
    assert_eq!(got, "a_tl1:10,b_tl1:10");
    assert_eq!(
        tl2.psql("select timeline_id from pg_control_checkpoint()")
            .unwrap(),
        "2"
    );
    insert(&tl2, "c_tl2");
    switch_and_wait(&tl2);
    drop(tl2);

    let listing = ok(&repo, &["list"]);
    assert!(listing.contains("WAL timeline 2"), "{listing}");
    let (again, got) = restore_and_read(&repo, &work, "second", &[], false);
    assert_eq!(
        got,
        "a_tl1:10,b_tl1:10,c_tl2:10",
        "{}",
        again.log_contents()
    );
    assert_eq!(
        again
            .psql("select timeline_id from pg_control_checkpoint()")
            .unwrap(),
        "3"
    );
}

/// Targets outside the window, and a non-empty directory, are refused before anything is
/// written, with the recoverable window in the message.
#[test]
fn restore_refuses_what_it_cannot_do() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let target = work.subdir("target");

    let o = run(&repo, &["restore", "--pgdata", target.to_str().unwrap()]);
    assert_eq!(code(&o), 5, "no repository yet: {}", text(&o));

    let pg = primary(&repo);
    pg.psql("create table marks(id serial primary key, phase text not null)")
        .unwrap();
    let before_backup = pg.psql("select now()").unwrap();
    sleep(Duration::from_millis(1100));
    ok(&repo, &["backup", "-d", &pg.conninfo()]);
    switch_and_wait(&pg);

    // A transaction that never ends in the archived WAL (xid 3 is the bootstrap xid).
    let refusals: [(&[&str], &str); 5] = [
        (
            &["--target-time", "2999-01-01 00:00:00+00"],
            "in the future",
        ),
        (
            &["--target-time", &before_backup],
            "before the end of the oldest usable backup",
        ),
        (
            &["--target-lsn", "FF/0"],
            "past the end of the archived WAL",
        ),
        (&["--backup", "nope"], "no backup with id nope"),
        (
            &["--target-xid", "3"],
            "transaction 3 neither commits nor aborts in the archived WAL",
        ),
    ];
    for (args, msg) in refusals {
        let mut a = vec!["restore", "--pgdata", target.to_str().unwrap()];
        a.extend_from_slice(args);
        let o = run(&repo, &a);
        assert_eq!(code(&o), 8, "{args:?}: {}", text(&o));
        assert!(text(&o).contains(msg), "{args:?}: {}", text(&o));
        assert!(
            std::fs::read_dir(&target).unwrap().next().is_none(),
            "{args:?} wrote into the target"
        );
    }
    let o = run(
        &repo,
        &[
            "restore",
            "--pgdata",
            target.to_str().unwrap(),
            "--target-time",
            "2026-01-01 00:00:00",
        ],
    );
    assert_code(&o, 3);
    assert!(text(&o).contains("no time zone"), "{}", text(&o));

    std::fs::write(target.join("PG_VERSION"), "15").unwrap();
    let o = run(&repo, &["restore", "--pgdata", target.to_str().unwrap()]);
    assert_code(&o, 8);
    assert!(text(&o).contains("is not empty"), "{}", text(&o));

    // A backup of another cluster into this repository is refused.
    let other = PgCluster::start_default().unwrap();
    let o = run(&repo, &["backup", "-d", &other.conninfo()]);
    assert_code(&o, 4);
    assert!(
        text(&o).contains("belongs to PostgreSQL system"),
        "{}",
        text(&o)
    );

    let dry = work.subdir("dry");
    let o = run(
        &repo,
        &[
            "restore",
            "--pgdata",
            dry.to_str().unwrap(),
            "--dry-run",
            "--json",
        ],
    );
    assert_code(&o, 0);
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(plan["bytes_to_fetch"].as_u64().unwrap() > 0);
    assert!(
        std::fs::read_dir(&dry).unwrap().next().is_none(),
        "--dry-run wrote into the target"
    );
}

/// Each bad input to `pitr backup` is a clear error and leaves no backup behind.
#[test]
fn backup_refusals_and_interruption() {
    let repo = TestRepo::new(Backend::Local);
    let pg = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .hba("host replication repl 127.0.0.1/32 scram-sha-256")
        .hba("host replication norepl 127.0.0.1/32 scram-sha-256")
        .start()
        .unwrap();
    pg.psql("set password_encryption = 'scram-sha-256'; create role repl login replication password 'secret'; create role norepl login password 'secret'").unwrap();
    let tcp = |user: &str, pw: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={pw} dbname=postgres",
            pg.port()
        )
    };

    let o = run(&repo, &["backup", "-d", &tcp("repl", "wrong")]);
    assert_code(&o, 7);
    assert!(text(&o).contains("password"), "{}", text(&o));
    assert!(
        !text(&o).contains("wrong"),
        "the password leaked: {}",
        text(&o)
    );

    let o = run(&repo, &["backup", "-d", &tcp("norepl", "secret")]);
    assert_code(&o, 7);
    assert!(text(&o).contains("REPLICATION"), "{}", text(&o));

    let o = run(
        &repo,
        &[
            "backup",
            "-d",
            "host=127.0.0.1 port=1 user=postgres connect_timeout=2",
        ],
    );
    assert_code(&o, 7);

    // A connection cut mid-backup fails the backup and publishes nothing.
    pg.pgbench_init(5).unwrap();
    let conninfo = pg.conninfo();
    let args = repo.args(&["backup", "-d", &conninfo, "--max-rate", "8192"]);
    let env = repo.env.clone();
    let runner = std::thread::spawn(move || pitr_as_server_user(args, &env));
    // Cut the connection once the first part is stored, so the orphan holds real data.
    let backups = repo.object_file("backups");
    poll("a stored part", Duration::from_secs(60), || {
        let Ok(dirs) = std::fs::read_dir(&backups) else {
            return Ok(None);
        };
        let stored = dirs
            .flatten()
            .any(|d| d.path().join("base.tar").join("00000000").exists());
        Ok(stored.then_some(()))
    })
    .unwrap();
    let cut = pg
        .psql(
            "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity \
             where backend_type = 'walsender'",
        )
        .unwrap();
    assert_ne!(cut, "0", "no walsender to cut: the backup was not running");
    let o = runner.join().unwrap();
    assert!(matches!(code(&o), 7 | 9), "{}", text(&o));
    let listing = ok(&repo, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        v["backups"].as_array().unwrap().len(),
        0,
        "an interrupted backup was published: {listing}"
    );

    // The interrupted backup's parts are there but unpublished; the next backup removes them
    // once their lease is stale (0s here), keeping only the "aborted" state.
    let orphans: Vec<_> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert!(orphans[0].join("base.tar").join("00000000").exists());
    let out = ok(
        &repo,
        &["backup", "-d", &conninfo, "--abandoned-after", "0s"],
    );
    assert!(out.contains("complete"), "{out}");
    let left = std::fs::read_dir(orphans[0].join("base.tar"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "abandoned parts were not removed");
    assert!(!orphans[0].join("lease").exists());
    let state = std::fs::read(orphans[0].join("state")).unwrap();
    assert_eq!(pitr::codec::decode(&state).unwrap(), b"aborted");

    // max_wal_senders exhausted
    let mut pg = pg;
    pg.append_conf("max_wal_senders = 0").unwrap();
    pg.append_conf("archive_mode = off").unwrap();
    pg.restart().unwrap();
    let o = run(&repo, &["backup", "-d", &conninfo]);
    assert_code(&o, 7);
    assert!(text(&o).contains("max_wal_senders"), "{}", text(&o));

    // One sender: the backup cannot stream its own WAL, and nothing archives it. It waits for
    // the archiver's copy before it claims completion, so the failed backup is left without a
    // state, for a cleanup to remove (as one killed while waiting would be).
    let before = files_under(&backups);
    pg.append_conf("max_wal_senders = 1").unwrap();
    pg.restart().unwrap();
    let o = run(&repo, &["backup", "-d", &conninfo, "--wal-timeout", "2s"]);
    assert_code(&o, 9);
    assert!(
        text(&o).contains("did not reach the repository"),
        "{}",
        text(&o)
    );
    let added: Vec<_> = files_under(&backups)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    assert!(added.iter().any(|f| f.ends_with("lease")), "{added:?}");
    assert!(
        !added.iter().any(|f| f.ends_with("state")),
        "the backup claimed completion before its WAL was there: {added:?}"
    );
}

/// Every file below `dir`, as paths relative to it.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            match e.file_type().unwrap().is_dir() {
                true => todo.push(e.path()),
                false => out.push(e.path().strip_prefix(dir).unwrap().to_path_buf()),
            }
        }
    }
    out.sort();
    out
}

//! `pitr drill` with real PostgreSQL, on a local directory and on S3: a healthy repository
//! drills `ok` with plausible timings; a failing check, WAL damaged after planning and SIGTERM
//! mid-replay each end non-zero with no server running and no scratch directory left.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{code, text};
use crate::common::{switch_and_wait, Backend, TestRepo};
use crate::harness::{clean_env, make_accessible, pitr_bin, poll, PgCluster, TestDir};
use crate::pitr::{insert, ok, primary, run};

/// A primary archiving into `repo` with a backup and rows after it, all archived.
fn healthy(repo: &TestRepo) -> PgCluster {
    let pg = primary(repo);
    pg.psql("create table marks(id serial primary key, phase text not null, at timestamptz default clock_timestamp())").unwrap();
    insert(&pg, "a_base");
    ok(repo, &["backup", "-d", &pg.conninfo()]);
    insert(&pg, "b_after_backup");
    switch_and_wait(&pg);
    pg
}

/// A directory the drill may create its scratch directory in (the server user needs it).
fn scratch_parent(work: &TestDir) -> PathBuf {
    let dir = work.subdir("scratch");
    make_accessible(&dir).unwrap();
    dir
}

/// Processes whose command line mentions `path` (a postmaster started with `-D path/...`).
fn processes_under(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) {
                found.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// Nothing of a drill is left under `parent`: no directory, no process.
fn assert_nothing_left(parent: &Path) {
    // A process that is exiting when the drill returns gets a moment to be gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut procs = processes_under(parent);
    while !procs.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        procs = processes_under(parent);
    }
    assert!(procs.is_empty(), "processes left running: {procs:?}");
    let left: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "scratch directories left: {left:?}");
}

fn drill_json(repo: &TestRepo, parent: &Path, extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec!["drill", "--json", "--scratch-dir", parent.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = run(repo, &args);
    let json = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    (code(&o), json, text(&o))
}

/// The repository's objects other than the audit trail, with their sizes.
fn objects_outside_audit(repo: &TestRepo) -> Vec<(String, u64)> {
    let root = repo.object_file("");
    let mut out = vec![];
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel.starts_with("audit") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((rel, e.metadata().unwrap().len()));
            }
        }
    }
    out.sort();
    out
}

fn healthy_drill(backend: Backend) {
    let repo = TestRepo::new(backend);
    let pg = healthy(&repo);
    let rows = pg.psql("select count(*) from marks").unwrap();
    let work = TestDir::new();
    let parent = scratch_parent(&work);
    let before = objects_outside_audit(&repo);

    let (c, v, out) = drill_json(
        &repo,
        &parent,
        &["--check-sql", "select count(*), max(phase) from marks"],
    );
    assert_eq!(c, 0, "{out}");
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let mut want = vec![
        "ok",
        "backup",
        "target",
        "restore_seconds",
        "replay_seconds",
        "rto_seconds",
        "recovered_lsn",
        "recovered_time",
        "check_rows",
        "wal_fetched_bytes",
    ];
    want.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, want, "{out}");
    assert_eq!(v["ok"], true, "{out}");
    assert_eq!(v["target"], "latest");
    assert_eq!(
        v["check_rows"],
        serde_json::json!([rows, "b_after_backup"]),
        "{out}"
    );
    let (r, p, t) = (
        v["restore_seconds"].as_f64().unwrap(),
        v["replay_seconds"].as_f64().unwrap(),
        v["rto_seconds"].as_f64().unwrap(),
    );
    // serde_json's default float parsing is not always correctly rounded: the parsed parts
    // can sum an ulp above the whole the drill computed from the same values.
    assert!(
        r > 0.0 && p > 0.0 && r + p <= t + 1e-9 && t < 300.0,
        "{out}"
    );
    assert!(
        v["wal_fetched_bytes"].as_u64().unwrap() >= 16 << 20,
        "{out}"
    );
    assert!(
        v["recovered_time"].as_str().unwrap().ends_with('Z'),
        "{out}"
    );
    let listing = ok(&repo, &["list", "--json"]);
    let list: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(v["backup"], list["backups"][0]["id"], "{out}");
    assert_nothing_left(&parent);
    if matches!(backend, Backend::Local) {
        assert_eq!(
            objects_outside_audit(&repo),
            before,
            "the drill changed the repository"
        );
    }

    // The default check reads every database's catalog: [databases, relations].
    let (c, v, out) = drill_json(&repo, &parent, &[]);
    assert_eq!(c, 0, "{out}");
    let row = v["check_rows"].as_array().unwrap();
    assert_eq!(row[0], "2", "postgres and template1: {out}");
    assert!(
        row[1].as_str().unwrap().parse::<u64>().unwrap() > 100,
        "{out}"
    );
    assert_nothing_left(&parent);

    // The human summary.
    let o = run(&repo, &["drill", "--scratch-dir", parent.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("RTO:"), "{}", text(&o));
}

#[test]
fn drill_on_a_healthy_local_repository() {
    healthy_drill(Backend::Local);
}

#[test]
fn drill_on_a_healthy_s3_repository() {
    healthy_drill(Backend::S3);
}

#[test]
fn failed_drills_exit_non_zero_and_leave_nothing() {
    let repo = TestRepo::new(Backend::Local);
    let pg = healthy(&repo);
    let work = TestDir::new();
    let parent = scratch_parent(&work);

    let (c, v, out) = drill_json(
        &repo,
        &parent,
        &["--check-sql", "select * from no_such_table"],
    );
    assert_eq!(c, 14, "{out}");
    assert_eq!(v["ok"], false, "{out}");
    assert!(
        out.contains("no_such_table") && out.contains("server log"),
        "{out}"
    );
    assert_nothing_left(&parent);

    let (c, _, out) = drill_json(&repo, &parent, &["--target-time", "2999-01-01T00:00:00Z"]);
    assert_eq!(c, 8, "{out}");
    assert_nothing_left(&parent);

    // Damage the last archived segment after planning could see it: its object fails its
    // checksum when PostgreSQL asks for it, and replay stops short of the target.
    let seg = pg
        .psql("select last_archived_wal from pg_stat_archiver")
        .unwrap();
    let key = format!("wal/{}/{seg}", &seg[..16]);
    let file = repo.object_file(&key);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let (c, v, out) = drill_json(&repo, &parent, &[]);
    assert_eq!(c, 13, "{out}");
    assert_eq!(v["ok"], false, "{out}");
    assert!(out.contains("did not reach the target"), "{out}");
    assert_nothing_left(&parent);
}

#[test]
fn sigterm_mid_replay_leaves_nothing_behind() {
    let repo = TestRepo::new(Backend::Local);
    let pg = healthy(&repo);
    // Enough WAL after the backup that replay takes a while.
    pg.pgbench_init(20).unwrap();
    switch_and_wait(&pg);
    let work = TestDir::new();
    let parent = scratch_parent(&work);

    let mut cmd = Command::new(pitr_bin());
    clean_env(&mut cmd);
    let child = cmd
        .args(repo.args(&["drill", "--scratch-dir", parent.to_str().unwrap()]))
        .envs(repo.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    poll(
        "the drill's server to start",
        Duration::from_secs(120),
        || {
            let started = std::fs::read_dir(&parent)?
                .flatten()
                .any(|d| d.path().join("data/postmaster.pid").exists());
            Ok(started.then_some(()))
        },
    )
    .unwrap();
    let t = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "the drill finished before SIGTERM: {all}"
    );
    assert!(all.contains("interrupted by SIGTERM"), "{all}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "cleanup took {:?}",
        t.elapsed()
    );
    assert_nothing_left(&parent);
}

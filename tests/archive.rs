//! archive-push / archive-get against real PostgreSQL, on a local directory and on S3.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{
    assert_code, code, on_local_and_s3, stderr, switch_and_wait, Backend, TestRepo,
};
use crate::harness::{command_as_server_user, pg_bin, pitr, PgCluster, TestDir};

/// A primary archiving into the repository under pgbench load; a base backup taken with
/// pg_basebackup (no WAL included) recovers everything from the repository alone.
fn archive_and_recover(backend: Backend) {
    let repo = TestRepo::new(backend);
    let mut primary = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(repo.env.clone())
        .start()
        .unwrap();
    primary.pgbench_init(1).unwrap();

    let work = TestDir::new();
    let base = work.join("base");
    let mut bb = command_as_server_user(pg_bin("pg_basebackup"));
    bb.arg("-h").arg(primary.socket_dir()).args([
        "-p",
        &primary.port().to_string(),
        "-U",
        "postgres",
    ]);
    bb.arg("-D")
        .arg(&base)
        .args(["-X", "none", "-c", "fast", "--no-sync"]);
    let out = bb.output().unwrap();
    assert!(out.status.success(), "pg_basebackup: {}", stderr(&out));

    primary.pgbench(["-T", "3", "-c", "2"]).unwrap();
    primary.psql("create table marker(id int primary key, note text); insert into marker select g, 'row ' || g from generate_series(1, 1000) g").unwrap();
    let history = primary
        .psql("select count(*) from pgbench_history")
        .unwrap();
    let balance = primary
        .psql("select sum(abalance) from pgbench_accounts")
        .unwrap();
    let last = switch_and_wait(&primary);
    primary.stop().unwrap();

    fs::write(base.join("recovery.signal"), "").unwrap();
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(base.join("postgresql.auto.conf"))
        .unwrap();
    use std::io::Write;
    writeln!(conf, "{}", repo.restore_command_conf()).unwrap();
    // The restored copy must not archive into the same repository as the primary.
    writeln!(conf, "archive_mode = off").unwrap();
    drop(conf);

    let mut restored = PgCluster::builder()
        .existing_data_dir(&base)
        .envs(repo.env.clone())
        .start()
        .unwrap();
    restored
        .wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.log_contents()));
    assert_eq!(
        restored.psql("select count(*) from marker").unwrap(),
        "1000"
    );
    assert_eq!(
        restored
            .psql("select count(*) from pgbench_history")
            .unwrap(),
        history
    );
    assert_eq!(
        restored
            .psql("select sum(abalance) from pgbench_accounts")
            .unwrap(),
        balance
    );
    let log = restored.log_contents();
    assert!(
        log.contains(&format!("restored log file \"{last}\" from archive")),
        "{last} was not restored:\n{log}"
    );
    // restore_command ran from the data directory into pg_wal, so prefetch was on: from the
    // third segment on, the worker (started after the first) is ahead of replay or fetching
    // the very segment asked for, which the call then waits for. And the end of recovery took
    // the spool and its worker away.
    let replayed: std::collections::BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains("restored log file") && l.contains(" from archive"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    if replayed.len() >= 3 {
        assert!(
            log.contains("restored from the prefetch spool"),
            "no segment came from the prefetch spool:\n{log}"
        );
    }
    let spool = base.join("pg_wal/.pitr-prefetch");
    crate::harness::poll("the prefetch spool to go", Duration::from_secs(5), || {
        Ok((!spool.exists()).then_some(()))
    })
    .unwrap();
    restored.stop().unwrap();
}

on_local_and_s3!(
    archive_and_recover,
    archive_and_recover_on_local_directory,
    archive_and_recover_on_s3
);

/// A cluster with 1 MiB segments and a few finished segments to play with.
pub(crate) fn cluster_with_segments() -> (PgCluster, Vec<String>) {
    let pg = PgCluster::builder().wal_segsize(1).start().unwrap();
    pg.psql("create table t as select generate_series(1, 20000) g")
        .unwrap();
    let mut segs = vec![];
    for _ in 0..2 {
        segs.push(
            pg.psql("select pg_walfile_name(pg_current_wal_lsn())")
                .unwrap(),
        );
        pg.psql("select pg_switch_wal(); insert into t select 1")
            .unwrap();
    }
    (pg, segs)
}

pub(crate) fn copy_segment(pg: &PgCluster, name: &str, to: &Path) -> std::path::PathBuf {
    let dest = to.join(name);
    fs::copy(pg.data_dir().join("pg_wal").join(name), &dest).unwrap();
    dest
}

/// The exit-code contract PostgreSQL relies on, pinned end to end.
fn exit_code_contract(backend: Backend) {
    let repo = TestRepo::new(backend);
    let (pg, segs) = cluster_with_segments();
    let work = TestDir::new();
    let seg_a = copy_segment(&pg, &segs[0], work.path());
    let env = &repo.env;
    let push = |path: &Path| pitr(repo.args(&["archive-push", path.to_str().unwrap()]), env);
    let get = |name: &str, dest: &Path| {
        pitr(
            repo.args(&["archive-get", name, dest.to_str().unwrap()]),
            env,
        )
    };

    // found
    let o = push(&seg_a);
    assert_eq!(code(&o), 0, "push: {}", stderr(&o));
    let dest = work.join("restored");
    let o = get(&segs[0], &dest);
    assert_eq!(code(&o), 0, "get: {}", stderr(&o));
    assert_eq!(fs::read(&dest).unwrap(), fs::read(&seg_a).unwrap());

    // not found: exit 1 and nothing written
    let missing = work.join("missing");
    let o = get("0000000100000000000000FF", &missing);
    assert_code(&o, 1);
    assert!(!missing.exists());
    assert_eq!(code(&get("00000009.history", &missing)), 1);

    // re-push of identical bytes succeeds (PostgreSQL retries after a crash)
    assert_eq!(code(&push(&seg_a)), 0);

    // different bytes under an archived name: refused, stored object untouched
    let changed_dir = work.subdir("changed");
    let changed = changed_dir.join(&segs[0]);
    let mut bytes = fs::read(&seg_a).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    fs::write(&changed, &bytes).unwrap();
    let o = push(&changed);
    assert_code(&o, 4);
    assert!(stderr(&o).contains("different content"), "{}", stderr(&o));
    assert_eq!(code(&get(&segs[0], &dest)), 0);
    assert_eq!(
        fs::read(&dest).unwrap(),
        fs::read(&seg_a).unwrap(),
        "stored object was changed"
    );

    // another cluster's WAL is refused
    let (other, other_segs) = cluster_with_segments();
    let foreign_dir = work.subdir("foreign");
    let foreign = copy_segment(&other, &other_segs[1], &foreign_dir);
    let o = push(&foreign);
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains("belongs to PostgreSQL system"),
        "{}",
        stderr(&o)
    );

    // not WAL, wrong size, missing file: clear input errors
    let junk = work.join("000000010000000000000042");
    fs::write(&junk, vec![7u8; 1 << 20]).unwrap();
    let o = push(&junk);
    assert_code(&o, 3);
    assert!(stderr(&o).contains("not a valid WAL segment"));
    let short_dir = work.subdir("short");
    let short = short_dir.join(&segs[1]);
    fs::write(
        &short,
        &fs::read(pg.data_dir().join("pg_wal").join(&segs[1])).unwrap()[..4096],
    )
    .unwrap();
    let o = push(&short);
    assert_code(&o, 3);
    assert_eq!(code(&push(&work.join("000000010000000000000077"))), 3);
    assert_eq!(code(&push(&work.join("notwal"))), 3);

    // a corrupt object is never served: >125 and no file left behind
    let second = copy_segment(&pg, &segs[1], &work.subdir("second"));
    assert_eq!(code(&push(&second)), 0);
    let key = format!("wal/{}/{}", &segs[1][..16], segs[1]);
    let stored = repo.object_file(&key);
    let mut obj = fs::read(&stored).unwrap();
    let n = obj.len();
    obj[n - 100] ^= 0x01;
    fs::write(&stored, &obj).unwrap();
    let bad = work.join("bad");
    let o = get(&segs[1], &bad);
    assert_code(&o, 200);
    assert!(
        stderr(&o).contains("corrupt") && stderr(&o).contains(&key),
        "{}",
        stderr(&o)
    );
    assert!(!bad.exists());
    assert!(fs::read_dir(work.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("pitr-tmp")));

    // a bad repository URL or config stops recovery instead of ending it
    let o = pitr(
        [
            "--repo",
            "ftp://nowhere",
            "archive-get",
            &segs[0],
            dest.to_str().unwrap(),
        ],
        env,
    );
    assert_code(&o, 200);
    let o = pitr(
        [
            "--repo",
            "ftp://nowhere",
            "archive-push",
            seg_a.to_str().unwrap(),
        ],
        env,
    );
    assert_code(&o, 3);
    let cfg = work.write_file(
        "pitr.toml",
        format!("repo = \"{}\"\nretry_timeout = \"5s\"\n", repo.url),
    );
    let o = pitr(
        [
            "--config",
            cfg.to_str().unwrap(),
            "archive-push",
            seg_a.to_str().unwrap(),
        ],
        env,
    );
    assert_code(&o, 3);
    assert!(stderr(&o).contains("retry_timeout"), "{}", stderr(&o));
    let o = pitr(["archive-get", "--bogus-flag", &segs[0], "x"], env);
    assert_code(&o, 200);
}

#[test]
fn exit_code_contract_on_local_directory() {
    exit_code_contract(Backend::Local);
    // A repository that is not there (unmounted, wrong path) is not "end of archive".
    let work = TestDir::new();
    let o = pitr(
        [
            "--repo",
            work.join("nothing").to_str().unwrap(),
            "archive-get",
            "000000010000000000000001",
            "x",
        ],
        &[],
    );
    assert_code(&o, 200);
}

#[test]
fn exit_code_contract_on_s3() {
    exit_code_contract(Backend::S3);
}

/// Storage failures on S3: an outage, a missing bucket, wrong credentials.
#[test]
fn s3_failures_stop_recovery_and_fail_archiving() {
    let mut repo = TestRepo::new(Backend::S3);
    let (pg, segs) = cluster_with_segments();
    let work = TestDir::new();
    let seg = copy_segment(&pg, &segs[0], work.path());
    let seg = seg.to_str().unwrap();
    let dest = work.join("dest");
    let dest = dest.to_str().unwrap();
    assert_eq!(code(&repo.pitr(&["archive-push", seg])), 0);

    // wrong credentials
    let mut bad_env = repo.env.clone();
    bad_env.retain(|(k, _)| k != "AWS_SECRET_ACCESS_KEY");
    bad_env.push(("AWS_SECRET_ACCESS_KEY".into(), "wrong".into()));
    let o = pitr(repo.args(&["archive-get", &segs[0], dest]), &bad_env);
    assert_code(&o, 200);
    let o = pitr(repo.args(&["archive-push", seg]), &bad_env);
    assert_code(&o, 5);
    assert!(stderr(&o).contains("credentials"), "{}", stderr(&o));

    // missing bucket
    let s3 = repo.s3.as_ref().unwrap();
    let url = format!("s3://no-such-bucket-{}/x", s3.port());
    let o = pitr(["--repo", &url, "archive-push", seg], &repo.env);
    assert_code(&o, 5);
    assert!(stderr(&o).contains("bucket"), "{}", stderr(&o));
    let o = pitr(["--repo", &url, "archive-get", &segs[0], dest], &repo.env);
    assert_code(&o, 200);

    // outage: bounded retries, then a fatal status; nothing written
    repo.s3.as_mut().unwrap().stop();
    let started = Instant::now();
    let o = repo.pitr(&[
        "--storage-retry-timeout",
        "2s",
        "archive-get",
        &segs[0],
        dest,
    ]);
    assert_code(&o, 200);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "retried for {:?}",
        started.elapsed()
    );
    assert!(!Path::new(dest).exists());
    let o = repo.pitr(&["--storage-retry-timeout", "2s", "archive-push", seg]);
    assert_code(&o, 5);

    // back up: the same request works
    repo.s3.as_mut().unwrap().start().unwrap();
    let o = repo.pitr(&["archive-get", &segs[0], dest]);
    assert_code(&o, 0);
}

/// A repository written by a newer pitr is refused, not misread.
#[test]
fn newer_repository_format_is_refused() {
    let repo = TestRepo::new(Backend::Local);
    let (pg, segs) = cluster_with_segments();
    let work = TestDir::new();
    let seg = copy_segment(&pg, &segs[0], work.path());
    assert_eq!(
        code(&pitr(
            repo.args(&["archive-push", seg.to_str().unwrap()]),
            &[]
        )),
        0
    );
    let desc = repo.object_file("repository.json");
    let framed = fs::read(&desc).unwrap();
    let json = String::from_utf8(pitr::codec::decode(&framed).unwrap()).unwrap();
    let newer = json.replace("\"format_version\": 1", "\"format_version\": 99");
    fs::write(
        &desc,
        pitr::codec::encode(newer.as_bytes(), pitr::codec::Codec::None, 0),
    )
    .unwrap();
    let o = pitr(repo.args(&["archive-push", seg.to_str().unwrap()]), &[]);
    assert_code(&o, 4);
    assert!(stderr(&o).contains("format version 99"), "{}", stderr(&o));
    let o = pitr(
        repo.args(&["archive-get", &segs[0], work.join("x").to_str().unwrap()]),
        &[],
    );
    assert_code(&o, 200);
}

/// The storage contract, on a real S3-compatible server.
#[tokio::test]
async fn s3_backend_keeps_the_storage_contract() {
    let s3 = crate::harness::S3Server::new().unwrap();
    let loc = pitr::storage::Location::parse(&s3.repo_url("contract"))
        .unwrap()
        .with_s3_settings(s3.settings());
    let storage = pitr::storage::Storage::open(&loc, Duration::from_secs(5)).unwrap();
    // s3s-fs checks If-None-Match, then writes: not atomic under a race (see run_contract).
    pitr::storage::contract::run_contract(&storage, false).await;
}

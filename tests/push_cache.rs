//! archive-push's local cache in the data directory (docs/repository-format.md, "archive-push's
//! local cache"): the descriptor and the last segment's carry kept from one push to the next, so
//! that a push reads nothing before it writes. The stored descriptor is still checked on every
//! push: a vanished or replaced repository fails the push with the exit code of the ordinary
//! path, never 0. The hooks run here as PostgreSQL runs them: in the data directory, as the
//! server's user, on segments of a real cluster.

use std::fs;
use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

use crate::common::{assert_code, on_local_and_s3, stderr, Backend, TestRepo};
use crate::harness::topology::pitr_hook;
use crate::harness::{make_accessible, PgCluster, TestDir};

const CACHE: &str = "pitr.push-cache";

/// A cluster with 1 MiB segments (not archiving) and the names of the full segments one long
/// insert wrote: records cross their boundaries, so each starts with a continuation.
fn cluster_with_run() -> (PgCluster, Vec<String>) {
    let pg = PgCluster::builder().wal_segsize(1).start().unwrap();
    pg.psql("create table t(id int, note text)").unwrap();
    let first = pg
        .psql("select pg_walfile_name(pg_current_wal_lsn())")
        .unwrap();
    pg.psql("insert into t select g, md5(g::text) from generate_series(1, 60000) g")
        .unwrap();
    let last = pg
        .psql("select pg_walfile_name(pg_current_wal_lsn())")
        .unwrap();
    let mut segs: Vec<String> = fs::read_dir(pg.data_dir().join("pg_wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && *n > first && *n < last)
        .collect();
    segs.sort();
    assert!(segs.len() >= 4, "the insert filled {} segments", segs.len());
    segs.truncate(4);
    (pg, segs)
}

fn push(pg: &PgCluster, repo: &TestRepo, seg: &str) -> Output {
    pitr_hook(
        pg.data_dir(),
        repo.args(&["archive-push", &format!("pg_wal/{seg}")]),
        &repo.env,
    )
}

fn segment_key(seg: &str) -> String {
    format!("wal/{}/{seg}", &seg[..16])
}

fn summary_key(seg: &str) -> String {
    format!("{}.summary", segment_key(seg))
}

fn summary(repo: &TestRepo, seg: &str) -> Value {
    let raw = fs::read(repo.object_file(&summary_key(seg))).unwrap();
    serde_json::from_slice(&pitr::codec::decode(&raw).unwrap()).unwrap()
}

fn cache(pg: &PgCluster) -> Value {
    serde_json::from_slice(&fs::read(pg.data_dir().join(CACHE)).unwrap()).unwrap()
}

/// Removes every object of the repository, as a deleted bucket prefix or an unmounted disk
/// would leave it: an empty location.
fn delete_repository(repo: &TestRepo) {
    let root: PathBuf = repo
        .object_file("repository.json")
        .parent()
        .unwrap()
        .to_path_buf();
    fs::remove_dir_all(&root).unwrap();
    fs::create_dir_all(&root).unwrap();
    make_accessible(&root).unwrap();
}

/// The carry comes from the cache: with the previous summary deleted from the repository (so
/// that reading it back could not supply it), the next segment's summary still has no
/// skipped continuation, where a push without the cache skips it.
fn archive_push_cache_carries_across_segments(backend: Backend) {
    let repo = TestRepo::new(backend);
    let (pg, segs) = cluster_with_run();
    assert_code(&push(&pg, &repo, &segs[0]), 0);
    assert_eq!(cache(&pg)["repositories"][0]["last_segment"], segs[0]);
    for pair in segs.windows(2) {
        fs::remove_file(repo.object_file(&summary_key(&pair[0]))).unwrap();
        assert_code(&push(&pg, &repo, &pair[1]), 0);
        let s = summary(&repo, &pair[1]);
        assert!(s["skipped_continuation"].is_null(), "{}: {s}", pair[1]);
        assert_eq!(cache(&pg)["repositories"][0]["last_segment"], pair[1]);
    }
    // The same segment pushed alone, with no cache and no previous summary, skips it: the
    // check above can fail.
    let other = TestRepo::new(Backend::Local);
    let elsewhere = TestDir::new();
    let copy = elsewhere.write_file(
        &segs[1],
        fs::read(pg.data_dir().join("pg_wal").join(&segs[1])).unwrap(),
    );
    let o = pitr_hook(
        elsewhere.path(),
        other.args(&["archive-push", copy.to_str().unwrap()]),
        &other.env,
    );
    assert_code(&o, 0);
    let alone = summary(&other, &segs[1]);
    assert!(!alone["skipped_continuation"].is_null(), "{alone}");
    assert!(!elsewhere.join(CACHE).exists());
}

on_local_and_s3!(
    archive_push_cache_carries_across_segments,
    archive_push_cache_carries_across_segments_on_local_directory,
    archive_push_cache_carries_across_segments_on_s3
);

/// The repository deleted after a push: the next push (which writes before its check answers)
/// fails with exit 5 "vanished", drops the cache, and every retry fails the same way and writes
/// nothing more.
fn archive_push_cache_checks_a_vanished_repository(backend: Backend) {
    let repo = TestRepo::new(backend);
    let (pg, segs) = cluster_with_run();
    assert_code(&push(&pg, &repo, &segs[0]), 0);
    assert_code(&push(&pg, &repo, &segs[1]), 0);
    delete_repository(&repo);
    let o = push(&pg, &repo, &segs[2]);
    assert_code(&o, 5);
    assert!(stderr(&o).contains("has vanished"), "{}", stderr(&o));
    assert!(cache(&pg)["repositories"].as_array().unwrap().is_empty());
    assert!(!repo.object_file("repository.json").exists());
    assert!(
        repo.object_file(&segment_key(&segs[2])).exists(),
        "written before the check answered"
    );
    // At most this one segment was written before the check failed (the spec's stray object).
    for seg in [&segs[2], &segs[3]] {
        let o = push(&pg, &repo, seg);
        assert_code(&o, 5);
    }
    assert!(!repo.object_file(&segment_key(&segs[3])).exists());
    assert!(!repo.object_file("repository.json").exists());
}

on_local_and_s3!(
    archive_push_cache_checks_a_vanished_repository,
    archive_push_cache_checks_a_vanished_repository_on_local_directory,
    archive_push_cache_checks_a_vanished_repository_on_s3
);

/// The repository deleted and created again (a new id) at the same location: the push fails
/// with exit 4, as on the ordinary path, and so does every retry.
#[test]
fn archive_push_cache_checks_a_replaced_repository() {
    let repo = TestRepo::new(Backend::Local);
    let (pg, segs) = cluster_with_run();
    assert_code(&push(&pg, &repo, &segs[0]), 0);
    assert_code(&push(&pg, &repo, &segs[1]), 0);
    delete_repository(&repo);
    // Created again by a push outside the data directory (no marker there).
    let elsewhere = TestDir::new();
    let copy = elsewhere.write_file(
        &segs[0],
        fs::read(pg.data_dir().join("pg_wal").join(&segs[0])).unwrap(),
    );
    let o = pitr_hook(
        elsewhere.path(),
        repo.args(&["archive-push", copy.to_str().unwrap()]),
        &repo.env,
    );
    assert_code(&o, 0);
    for _ in 0..2 {
        let o = push(&pg, &repo, &segs[2]);
        assert_code(&o, 4);
        assert!(
            stderr(&o).contains("not the one this cluster archived into"),
            "{}",
            stderr(&o)
        );
    }
}

/// A push that died between its two PUTs (either one stored, the cache not updated): PostgreSQL
/// runs it again, and the retry converges to the segment, its summary (with the carry) and the
/// cache, with exit 0; `verify` finds nothing wrong.
#[test]
fn archive_push_cache_retry_after_a_crash_between_puts_converges() {
    let repo = TestRepo::new(Backend::Local);
    let (pg, segs) = cluster_with_run();
    assert_code(&push(&pg, &repo, &segs[0]), 0);
    let before = fs::read(pg.data_dir().join(CACHE)).unwrap();
    let restore_cache = || fs::write(pg.data_dir().join(CACHE), &before).unwrap();
    assert_code(&push(&pg, &repo, &segs[1]), 0);
    let wal = fs::read(pg.data_dir().join("pg_wal").join(&segs[1])).unwrap();

    // 1. The segment stored, not its summary.
    fs::remove_file(repo.object_file(&summary_key(&segs[1]))).unwrap();
    restore_cache();
    let o = push(&pg, &repo, &segs[1]);
    assert_code(&o, 0);
    let s = summary(&repo, &segs[1]);
    assert!(s["skipped_continuation"].is_null(), "{s}");
    assert_eq!(cache(&pg)["repositories"][0]["last_segment"], segs[1]);

    // 2. The summary stored, not the segment.
    fs::remove_file(repo.object_file(&segment_key(&segs[1]))).unwrap();
    restore_cache();
    assert_code(&push(&pg, &repo, &segs[1]), 0);
    let work = TestDir::new();
    let out = work.join("restored");
    let o = repo.pitr(&["archive-get", &segs[1], out.to_str().unwrap()]);
    assert_code(&o, 0);
    assert!(
        fs::read(&out).unwrap() == wal,
        "the segment reads back as archived"
    );

    assert_code(&push(&pg, &repo, &segs[2]), 0);
    let s = summary(&repo, &segs[2]);
    assert!(s["skipped_continuation"].is_null(), "{s}");
    let o = repo.pitr(&["verify"]);
    assert_code(&o, 0);
}

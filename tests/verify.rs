//! Segment summaries, target validation and `pitr verify`, against real PostgreSQL.
//!
//! Every scenario starts from a real cluster archiving into the repository with
//! `archive-push`, a `pitr backup`, and transactions whose commit times are read back from the
//! server; damage is then done to the stored objects the way disks and operators do it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::common::{assert_code, code, on_local_and_s3, stderr, stdout, Backend, TestRepo};
use crate::harness::{PgCluster, TestDir};

/// A cluster with 1 MiB segments archiving into `repo`, with a completed `pitr backup`.
struct Archived {
    repo: TestRepo,
    pg: PgCluster,
    backup_id: String,
}

impl Archived {
    fn new(backend: Backend) -> Archived {
        let repo = TestRepo::new(backend);
        let pg = PgCluster::builder()
            .wal_segsize(1)
            .conf("archive_mode = on")
            .conf(repo.archive_command_conf())
            .envs(repo.env.clone())
            .start()
            .unwrap();
        pg.psql("create table t(id int primary key, note text)")
            .unwrap();
        let o = repo.pitr(&[
            "backup",
            "-d",
            &pg.conninfo(),
            "--json",
            "--wal-timeout",
            "60s",
        ]);
        assert_eq!(code(&o), 0, "backup: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let backup_id = v["id"]
            .as_str()
            .or_else(|| v["backup"].as_str())
            .unwrap_or_else(|| panic!("no id in {v}"))
            .to_string();
        Archived {
            repo,
            pg,
            backup_id,
        }
    }

    /// Inserts rows `from..to` in one transaction; returns its commit time as PostgreSQL
    /// recorded it (track_commit_timestamp is off, so read the clock right after commit).
    fn insert(&self, from: i32, to: i32) {
        self.pg
            .psql(&format!(
                "insert into t select g, 'row ' || g from generate_series({from}, {}) g",
                to - 1
            ))
            .unwrap();
    }

    fn now(&self) -> String {
        self.pg.psql("select now()").unwrap()
    }

    /// Switches to a new segment and waits until the finished one is archived; returns it.
    fn switch_and_wait(&self) -> String {
        crate::common::switch_and_wait(&self.pg)
    }

    fn pitr(&self, args: &[&str]) -> Output {
        self.repo.pitr(args)
    }

    fn segment_key(seg: &str) -> String {
        format!("wal/{}/{seg}", &seg[..16])
    }

    fn object(&self, key: &str) -> PathBuf {
        self.repo.object_file(key)
    }
}

/// Rewrites the stored object `path` with `f` applied to its content, re-framed with a valid
/// frame checksum: damage that only reading the content itself can find.
fn reframe(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let framed = fs::read(path).unwrap();
    let mut raw = pitr::codec::decode(&framed).unwrap();
    f(&mut raw);
    fs::write(path, pitr::codec::encode(&raw, pitr::codec::Codec::Lz4, 0)).unwrap();
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(o), stderr(o)))
}

/// archive-push stores a summary beside every segment; `list` shows the window in times; a
/// time target after the last archived commit is refused up front with the window, and one
/// before it is planned.
#[test]
fn summaries_bound_time_targets_by_the_last_archived_commit() {
    let a = Archived::new(Backend::Local);
    a.insert(0, 100);
    let mid = a.now();
    std::thread::sleep(Duration::from_millis(20));
    a.insert(100, 200);
    let after_last = a.now();
    let seg = a.switch_and_wait();

    let summary_key = format!("{}.summary", Archived::segment_key(&seg));
    let raw = pitr::codec::decode(&fs::read(a.object(&summary_key)).unwrap()).unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert!(summary["commit_count"].as_u64().unwrap() >= 1, "{summary}");

    let o = a.pitr(&["list", "--json"]);
    assert_code(&o, 0);
    let v = json(&o);
    let w = &v["recoverable_window"];
    let to_time = w["to_time"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(w["from_time"].is_string(), "{v}");
    let o = a.pitr(&["list"]);
    assert!(
        stdout(&o).contains("(last archived transaction, LSN"),
        "{}",
        stdout(&o)
    );

    let work = TestDir::new();
    let dest = work.join("restored");
    let o = a.pitr(&[
        "restore",
        "--pgdata",
        dest.to_str().unwrap(),
        "--target-time",
        &after_last,
    ]);
    assert_code(&o, 8);
    let err = stderr(&o);
    assert!(err.contains("last archived transaction"), "{err}");
    assert!(err.contains("recoverable window: from"), "{err}");
    assert!(
        err.contains(&to_time[..19].replace('T', " ")),
        "{err}\n{to_time}"
    );
    assert!(!dest.exists(), "restore wrote before refusing");

    let o = a.pitr(&[
        "restore",
        "--pgdata",
        dest.to_str().unwrap(),
        "--target-time",
        &mid,
        "--dry-run",
        "--json",
    ]);
    assert_code(&o, 0);
    assert_eq!(json(&o)["backup"], a.backup_id.as_str());
}

/// `--target-name` finds the restore point in the summaries, picks the newest backup that ends
/// before it, and PostgreSQL replays exactly the rows committed before it. An unknown name is
/// refused before anything is written.
#[test]
fn target_name_restores_exactly_the_rows_before_the_restore_point() {
    let a = Archived::new(Backend::Local);
    a.insert(0, 100);
    a.switch_and_wait();
    // A second backup, taken before the restore point: the one to choose.
    let o = a.pitr(&[
        "backup",
        "-d",
        &a.pg.conninfo(),
        "--json",
        "--wal-timeout",
        "60s",
    ]);
    assert_eq!(code(&o), 0, "backup: {}", stderr(&o));
    let second = json(&o)["id"].as_str().unwrap().to_string();
    a.insert(100, 250);
    a.pg.psql("select pg_create_restore_point('before_purge')")
        .unwrap();
    a.pg.psql("delete from t where id < 200").unwrap();
    a.insert(1000, 1010);
    a.switch_and_wait();

    let work = TestDir::new();
    let refused = work.join("refused");
    let o = a.pitr(&[
        "restore",
        "--pgdata",
        refused.to_str().unwrap(),
        "--target-name",
        "no_such_point",
    ]);
    assert_code(&o, 8);
    assert!(stderr(&o).contains("before_purge"), "{}", stderr(&o));
    assert!(!refused.exists());

    let dest = work.subdir("restored");
    let o = a.pitr(&[
        "restore",
        "--pgdata",
        dest.to_str().unwrap(),
        "--target-name",
        "before_purge",
        "--json",
    ]);
    assert_code(&o, 0);
    let v = json(&o);
    assert_eq!(v["backup"], second.as_str(), "{v}");
    assert_eq!(v["restore_point"]["name"], "before_purge", "{v}");
    assert_ne!(second, a.backup_id);

    let restored = PgCluster::builder()
        .existing_data_dir(&dest)
        .conf("archive_mode = off")
        .envs(a.repo.env.clone())
        .start()
        .unwrap();
    restored
        .wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.log_contents()));
    assert_eq!(
        restored
            .psql("select count(*), min(id), max(id) from t")
            .unwrap(),
        "250|0|249"
    );
    assert!(
        restored
            .log_contents()
            .contains("recovery stopping at restore point \"before_purge\""),
        "{}",
        restored.log_contents()
    );
}

on_local_and_s3!(
    verify_finds_damage,
    verify_finds_flipped_byte_deleted_segment_and_truncated_history_on_local_directory,
    verify_finds_flipped_byte_deleted_segment_and_truncated_history_on_s3
);

/// Clean repository verifies clean; then one byte flipped in a stored segment, a deleted
/// segment and a truncated history file are each found, naming the object and the window cut;
/// a time target in the hole is refused with both windows.
fn verify_finds_damage(backend: Backend) {
    let a = Archived::new(backend);
    a.insert(0, 100);
    let seg_a = a.switch_and_wait();
    a.insert(100, 200);
    let in_hole = a.now();
    let seg_b = a.switch_and_wait();
    std::thread::sleep(Duration::from_millis(20));
    let o = a.pitr(&[
        "backup",
        "-d",
        &a.pg.conninfo(),
        "--json",
        "--wal-timeout",
        "60s",
    ]);
    assert_eq!(code(&o), 0, "backup: {}", stderr(&o));
    a.insert(200, 300);
    a.switch_and_wait();
    // A history file for a timeline that forks far ahead, so timeline 1 stays on its path.
    let work = TestDir::new();
    let hist = work.write_file(
        "00000002.history",
        "1\tFF/0\tno recovery target specified\n",
    );
    let o = a.pitr(&["archive-push", hist.to_str().unwrap()]);
    assert_code(&o, 0);

    let o = a.pitr(&["verify"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("OK: no problems found"),
        "{}",
        stdout(&o)
    );
    let o = a.pitr(&["verify", "--full", "--json"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let v = json(&o);
    assert!(v["wal_records"].as_u64().unwrap() > 100, "{v}");
    assert!(v["backup_files"].as_u64().unwrap() > 100, "{v}");

    // 1. One byte flipped in the stored segment A.
    let key_a = Archived::segment_key(&seg_a);
    let path_a = a.object(&key_a);
    let good = fs::read(&path_a).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    fs::write(&path_a, &bad).unwrap();
    let o = a.pitr(&["verify"]);
    assert_eq!(code(&o), 10, "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(&key_a), "{out}");
    assert!(out.contains("checksum"), "{out}");
    assert!(out.contains("missing or damaged"), "{out}");
    assert!(out.contains("impact: restores from backup(s)"), "{out}");
    fs::write(&path_a, &good).unwrap();

    // 2. Segment B deleted: a hole; the window from the first backup ends before it.
    let key_b = Archived::segment_key(&seg_b);
    fs::remove_file(a.object(&key_b)).unwrap();
    let o = a.pitr(&["verify", "--json"]);
    assert_eq!(code(&o), 10, "{}{}", stdout(&o), stderr(&o));
    let v = json(&o);
    let hole = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "wal_hole")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(hole["object"], key_b.as_str(), "{hole}");
    assert!(
        hole["impact"].as_str().unwrap().contains(&a.backup_id),
        "{hole}"
    );
    assert_eq!(v["windows"].as_array().unwrap().len(), 2, "{v}");
    // A time target inside the hole is refused before anything is written.
    let dest = work.join("restored");
    let o = a.pitr(&[
        "restore",
        "--pgdata",
        dest.to_str().unwrap(),
        "--target-time",
        &in_hole,
    ]);
    assert_code(&o, 8);
    let err = stderr(&o);
    assert!(err.contains("falls in a hole"), "{err}");
    assert!(err.contains(&seg_b), "{err}");
    assert!(err.contains("recoverable windows: from"), "{err}");
    assert!(!dest.exists());

    // 3. The stored history file truncated.
    let key_h = "wal/00000002.history";
    let path_h = a.object(key_h);
    let h = fs::read(&path_h).unwrap();
    fs::write(&path_h, &h[..h.len() - 10]).unwrap();
    let o = a.pitr(&["verify"]);
    assert_eq!(code(&o), 10, "{}", stdout(&o));
    assert!(stdout(&o).contains(key_h), "{}", stdout(&o));
}

on_local_and_s3!(
    only_full_verify_catches_a_broken_record,
    only_full_verify_catches_a_broken_record_behind_a_valid_frame_on_local_directory,
    only_full_verify_catches_a_broken_record_behind_a_valid_frame_on_s3
);

/// A segment whose page headers and frame are valid but whose records are broken (one record
/// CRC patched, object re-framed with a valid checksum) passes the object checks and is caught
/// by `--full`, which names the segment and the LSN.
fn only_full_verify_catches_a_broken_record(backend: Backend) {
    let a = Archived::new(backend);
    a.insert(0, 100);
    a.switch_and_wait();
    // This segment starts right after a switch: its first record begins at byte 40, right
    // after the long page header.
    a.insert(100, 200);
    let seg = a.switch_and_wait();
    a.insert(200, 300);
    a.switch_and_wait();

    let key = Archived::segment_key(&seg);
    reframe(&a.object(&key), |raw| {
        assert_eq!(
            u32::from_le_bytes(raw[16..20].try_into().unwrap()),
            0,
            "xlp_rem_len"
        );
        raw[40 + 20] ^= 0xFF; // xl_crc of the first record
    });
    let o = a.pitr(&["verify"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let o = a.pitr(&["verify", "--full"]);
    assert_eq!(code(&o), 10, "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(&key), "{out}");
    assert!(out.contains("records are damaged from LSN"), "{out}");
}

//! A second implementation reads what pitr wrote. `tests/independent_reader/pitr_reader.py` was
//! written from docs/repository-format.md alone (Python, its standard library and Debian's lz4,
//! zstandard and crc32c modules); here it reads a repository that archive-push, `pitr stream` and
//! `pitr backup` filled from a real PostgreSQL, and what it returns is compared with the server's
//! own files: pg_wal for WAL, and the backup_manifest PostgreSQL computed for backup files.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{switch_and_wait, Backend, TestRepo};
use crate::harness::{
    command_as_server_user, kill_group, pitr, pitr_as_server_user, pitr_bin, poll, spawn_in_group,
    PgCluster, TestDir,
};

/// Debian's interpreter: the one python3-lz4, python3-zstandard and python3-crc32c install for.
const PYTHON: &str = "/usr/bin/python3";

/// The reader's interpreter; `-B`: no `__pycache__` in the source tree.
fn python() -> Command {
    let mut cmd = Command::new(PYTHON);
    cmd.arg("-B");
    cmd
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/independent_reader/pitr_reader.py")
}

/// Runs the reader and returns its stdout; any non-zero exit fails the test with its stderr.
fn reader(args: &[&str]) -> String {
    let out = python().arg(script()).args(args).output().expect(
        "running /usr/bin/python3 (scripts/install-test-deps.sh installs the reader's modules)",
    );
    assert!(
        out.status.success(),
        "pitr_reader.py {args:?}: exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn reader_json(args: &[&str]) -> Value {
    let out = reader(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}\n{out}"))
}

/// `reader cat`: the decoded content of one object.
fn object(repo: &str, key: &str, tmp: &TestDir) -> Vec<u8> {
    let dest = tmp.join("object");
    reader(&["cat", repo, key, dest.to_str().unwrap()]);
    fs::read(dest).unwrap()
}

/// A running `pitr stream` (as the server user), killed when dropped.
struct Stream {
    child: Child,
    log: PathBuf,
    _dir: TestDir,
}

impl Stream {
    fn start(repo: &TestRepo, pg: &PgCluster) -> Stream {
        let dir = TestDir::new();
        let log = dir.join("stream.log");
        // As the server user, like archive_command: both write into the same directories.
        let mut cmd = command_as_server_user(pitr_bin());
        let conninfo = pg.conninfo();
        cmd.args(repo.args(&[
            "stream",
            "-d",
            &conninfo,
            "--create-slot",
            "--chunk-interval",
            "100ms",
            // archive-push and backup use lz4: the reader meets every codec in one repository.
            "--compression",
            "zstd",
        ]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
        Stream {
            child: spawn_in_group(&mut cmd),
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

fn psql(pg: &PgCluster, sql: &str) -> String {
    pg.psql(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}\n{}", pg.log_contents()))
}

fn get_wal(repo: &str, name: &str, tmp: &TestDir, unpadded: bool) -> (Vec<u8>, String) {
    let dest = tmp.join(name);
    let mut args = vec!["get-wal", repo, name, dest.to_str().unwrap()];
    if unpadded {
        args.push("--unpadded");
    }
    let info = reader_json(&args);
    let source = info["source"].as_str().unwrap().to_string();
    (fs::read(&dest).unwrap(), source)
}

#[test]
fn independent_reader_reproduces_wal_and_backups() {
    // Declared before the cluster so that it is removed after the cluster stopped.
    let ts_parent = TestDir::new();
    let ts_dir = ts_parent.subdir("ts");
    let repo = TestRepo::new(Backend::Local);
    // 1 MiB segments: several segment boundaries with little data. pg_wal keeps every segment,
    // so that each can be compared with the repository.
    let pg = PgCluster::builder()
        .wal_segsize(1)
        .conf("wal_keep_size = '1GB'")
        .conf("max_wal_size = '1GB'")
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .start()
        .unwrap();
    let stream = Stream::start(&repo, &pg);
    let tmp = TestDir::new();
    let root = repo.url.as_str();

    psql(
        &pg,
        &format!("create tablespace ts location '{}'", ts_dir.display()),
    );
    psql(&pg, "create table in_ts tablespace ts as select g, md5(g::text) m from generate_series(1, 20000) g");
    psql(
        &pg,
        "create table t as select g, md5(g::text) m from generate_series(1, 20000) g",
    );
    let out = pitr_as_server_user(
        repo.args(&["backup", "-d", &pg.conninfo(), "--wal-timeout", "60s"]),
        &repo.env,
    );
    assert!(
        out.status.success(),
        "backup: {}\n--- stream log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        stream.log()
    );
    for _ in 0..3 {
        psql(
            &pg,
            "insert into t select g, md5(g::text) from generate_series(1, 5000) g",
        );
        switch_and_wait(&pg);
    }
    // Written after the last switch: the open segment, in the repository only as chunks.
    psql(
        &pg,
        "insert into t select g, 'open segment' from generate_series(1, 2000) g",
    );
    let row = psql(
        &pg,
        "select pg_walfile_name(pg_current_wal_lsn()) || ' ' || pg_current_wal_lsn()",
    );
    let (open_seg, lsn) = row.split_once(' ').unwrap();
    let lsn_value = parse_lsn(lsn);

    // The reader's own rules (chain from offset 0, segment wins) find the open segment.
    let report = poll(
        "chunks reaching the server's position",
        Duration::from_secs(60),
        || {
            let w = reader_json(&["wal", root]);
            let newest = &w["newest"]["1"];
            let reached = newest["source"] == "chunks"
                && newest["segment"] == open_seg
                && parse_lsn(newest["end"].as_str().unwrap()) >= lsn_value;
            Ok(reached.then_some(w))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n--- stream log ---\n{}", stream.log()));

    assert_open_segment_matches(&pg, &repo, open_seg, &tmp);
    assert_archived_segments_match(&pg, root, &report, &tmp);
    assert_backup_matches_manifest(&repo, root, &tmp);

    drop(stream);
    let check = reader_json(&["check", root]);
    assert_eq!(check["damaged"], Value::Array(vec![]), "{check}");
    assert!(check["objects"].as_u64().unwrap() > 20, "{check}");

    let damaged_key = assert_chunk_rules_agree_with_pitr(&repo, open_seg, &tmp);
    // Every frame is checked: the one damaged object, and only it, is reported.
    let out = python()
        .args([script().to_str().unwrap(), "check", root])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let check: Value = serde_json::from_slice(&out.stdout).unwrap();
    let damaged = check["damaged"].as_array().unwrap();
    assert!(
        damaged.len() == 1 && damaged[0].as_str().unwrap().starts_with(&damaged_key),
        "{check}"
    );
}

fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').unwrap();
    u64::from_str_radix(hi, 16).unwrap() << 32 | u64::from_str_radix(lo, 16).unwrap()
}

/// The chunk chain is a prefix of the server's current segment, and the served segment is that
/// prefix zero-padded to the segment size.
fn assert_open_segment_matches(pg: &PgCluster, repo: &TestRepo, open_seg: &str, tmp: &TestDir) {
    let root = repo.url.as_str();
    let (chain, source) = get_wal(root, open_seg, tmp, true);
    assert_eq!(source, "chunks");
    let server = fs::read(pg.data_dir().join("pg_wal").join(open_seg)).unwrap();
    assert!(!chain.is_empty() && chain.len() < server.len());
    assert!(
        chain[..] == server[..chain.len()],
        "{open_seg}: the {} bytes assembled from chunks differ from pg_wal",
        chain.len()
    );
    let (padded, _) = get_wal(root, open_seg, tmp, false);
    assert_eq!(padded.len(), server.len());
    assert_eq!(&padded[..chain.len()], &chain[..]);
    assert!(padded[chain.len()..].iter().all(|&b| b == 0));
    // The stream wrote its chunks with zstd (frame byte 5 is the codec).
    let folder = repo.object_file(&format!("wal/{}/chunks/{open_seg}", &open_seg[..16]));
    let chunk = fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .expect("a chunk file");
    assert_eq!(
        fs::read(chunk).unwrap()[5],
        2,
        "codec of the stream's chunks"
    );
}

/// Every complete segment the reader finds equals pg_wal's file; their summaries hold the
/// system identifier as a string.
fn assert_archived_segments_match(pg: &PgCluster, root: &str, report: &Value, tmp: &TestDir) {
    let segments: Vec<&str> = report["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(segments.len() >= 5, "{report}");
    // No gap: every segment from the first archived one to the one before the open segment.
    let segno = |name: &str| u64::from_str_radix(&name[8..], 16).unwrap();
    let open = report["newest"]["1"]["segment"].as_str().unwrap();
    for (i, name) in segments.iter().enumerate() {
        assert_eq!(
            segno(name),
            segno(open) - (segments.len() - i) as u64,
            "{report}"
        );
    }
    for name in &segments {
        let (stored, source) = get_wal(root, name, tmp, false);
        assert_eq!(source, "segment");
        let original = fs::read(pg.data_dir().join("pg_wal").join(name)).unwrap();
        assert!(stored == original, "{name}: differs from pg_wal");
    }
    for name in report["backup_files"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let (stored, _) = get_wal(root, name, tmp, false);
        if let Ok(original) = fs::read(pg.data_dir().join("pg_wal").join(name)) {
            assert_eq!(stored, original, "{name}");
        }
    }
    let descriptor: Value = serde_json::from_slice(&object(root, "repository.json", tmp)).unwrap();
    let last = segments.last().unwrap();
    let key = format!("wal/{}/{last}.summary", &last[..16]);
    let summary: Value = serde_json::from_slice(&object(root, &key, tmp)).unwrap();
    assert!(summary["system_identifier"].is_string(), "{summary}");
    assert_eq!(
        summary["system_identifier"],
        descriptor["system_identifier"]
    );
}

/// The backup extracted by the reader: every file the server's manifest lists, with its size
/// and CRC-32C, checked here again independently of the reader's own check.
fn assert_backup_matches_manifest(repo: &TestRepo, root: &str, tmp: &TestDir) {
    let backups = reader_json(&["backups", root]);
    let backups = backups.as_array().unwrap();
    assert_eq!(backups.len(), 1, "{backups:?}");
    let info = &backups[0];
    let id = info["id"].as_str().unwrap();
    let tablespace = info["archives"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a["tablespace_oid"].as_u64())
        .expect("a tablespace archive");

    let dest = tmp.join("extracted");
    let report = reader_json(&["extract", root, id, dest.to_str().unwrap()]);
    assert_eq!(report["mismatches"], Value::Array(vec![]), "{report}");
    assert_eq!(report["missing"], Value::Array(vec![]), "{report}");

    let manifest: Value =
        serde_json::from_slice(&object(root, &format!("backups/{id}/backup_manifest"), tmp))
            .unwrap();
    let ts_prefix = format!("pg_tblspc/{tablespace}/");
    let mut in_tablespace = 0;
    let files = manifest["Files"].as_array().unwrap();
    for f in files {
        let path = f["Path"].as_str().expect("UTF-8 paths in this cluster");
        let on_disk = match path.strip_prefix(&ts_prefix) {
            Some(rest) => {
                in_tablespace += 1;
                dest.join("tablespaces")
                    .join(tablespace.to_string())
                    .join(rest)
            }
            None => dest.join("data").join(path),
        };
        let bytes = fs::read(&on_disk).unwrap_or_else(|e| panic!("{}: {e}", on_disk.display()));
        assert_eq!(bytes.len() as u64, f["Size"].as_u64().unwrap(), "{path}");
        assert_eq!(f["Checksum-Algorithm"], "CRC32C", "{path}");
        let crc = hex::encode(crc32c::crc32c(&bytes).to_le_bytes());
        assert_eq!(crc, f["Checksum"].as_str().unwrap(), "{path}");
    }
    assert!(files.len() > 100 && in_tablespace > 0, "{manifest}");

    // The state object, byte for byte as the document gives it (default codec lz4).
    let state = fs::read(repo.object_file(&format!("backups/{id}/state"))).unwrap();
    assert_eq!(
        hex::encode(state),
        "5049545201010000080000000000000009000000000000009d831f085f5cba9900000000ab1c5a80\
         80636f6d706c657465"
    );
}

/// The document's chain rule, as the reader implements it and as `pitr archive-get` serves the
/// open segment, on chunks PostgreSQL did not write: a shorter chunk at offset 0 and a chunk after
/// a gap (both garbage, both to be ignored), then a damaged chain chunk (an error for both).
/// Returns the damaged chunk's key.
fn assert_chunk_rules_agree_with_pitr(repo: &TestRepo, open_seg: &str, tmp: &TestDir) -> String {
    let root = repo.url.as_str();
    let (before, _) = get_wal(root, open_seg, tmp, false);
    let (chain, _) = get_wal(root, open_seg, tmp, true);
    let folder = format!("wal/{}/chunks/{open_seg}", &open_seg[..16]);
    let mut chunks: Vec<(u32, u32)> = fs::read_dir(repo.object_file(&folder))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let (a, b) = name.split_once('-')?;
            Some((
                u32::from_str_radix(a, 16).ok()?,
                u32::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    chunks.sort();
    let first_end = chunks[0].1;
    let end = chain.len() as u32;
    assert!(chunks[0].0 == 0 && first_end > 1);
    for (start, stop) in [(0, first_end - 1), (end + 0x100, end + 0x200)] {
        let garbage = vec![0xAA; (stop - start) as usize];
        let key = format!("{folder}/{start:08X}-{stop:08X}");
        let framed = pitr::codec::encode(&garbage, pitr::codec::Codec::None, 0);
        fs::write(repo.object_file(&key), framed).unwrap();
    }
    let (after, _) = get_wal(root, open_seg, tmp, false);
    assert!(after == before, "the reader used a stray chunk");
    assert!(
        archive_get(repo, open_seg, tmp) == Ok(before),
        "archive-get differs"
    );

    // Damage inside the last chain chunk's payload: never served, by either.
    let (start, stop) = *chunks.iter().rfind(|c| c.1 == end).unwrap();
    let key = format!("{folder}/{start:08X}-{stop:08X}");
    let path = repo.object_file(&key);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    fs::write(&path, bytes).unwrap();
    let dest = tmp.join("damaged");
    let out = python()
        .arg(script())
        .args(["get-wal", root, open_seg, dest.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "reader on a damaged chunk");
    let code = archive_get(repo, open_seg, tmp).unwrap_err();
    assert!(code > 125, "archive-get on a damaged chunk: exit {code}");
    key
}

/// `pitr archive-get NAME`: the bytes, or the exit code.
fn archive_get(repo: &TestRepo, name: &str, tmp: &TestDir) -> Result<Vec<u8>, i32> {
    let dest = tmp.join(format!("{name}.archive-get"));
    let _ = fs::remove_file(&dest);
    let out = pitr(
        repo.args(&["archive-get", name, dest.to_str().unwrap()]),
        &repo.env,
    );
    match out.status.code() {
        Some(0) => Ok(fs::read(&dest).unwrap()),
        code => Err(code.unwrap_or(-1)),
    }
}

//! Encryption at rest (docs/encryption.md) against real PostgreSQL, on a local directory and on
//! S3: what is stored reveals no content, a missing or wrong key stops every command before it
//! writes anything, rotation touches only the key objects, and damage is found on read.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::archive::{cluster_with_segments, copy_segment};
use crate::common::{
    assert_code, on_local_and_s3, stderr, switch_and_wait, text, Backend, TestRepo,
};
use crate::harness::{
    clean_env, make_accessible, pitr_as_server_user, pitr_bin, sh_quote, PgCluster, TestDir,
};

/// Inserted into the database; must never appear in a stored byte of an encrypted repository.
const MARKER: &str = "ENC-MARKER-7c1f9a2b-plaintext";

/// `copy_segment`, readable by the server user (who runs pitr here, as archive_command does).
fn copy_wal(pg: &PgCluster, name: &str, to: &Path) -> PathBuf {
    let p = copy_segment(pg, name, to);
    make_accessible(&p).unwrap();
    p
}

/// A passphrase in a file readable by the server user only.
fn key_file(dir: &TestDir, name: &str, passphrase: &str) -> PathBuf {
    let p = dir.write_file(name, format!("{passphrase}\n"));
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn env_with(repo: &TestRepo, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = repo.env.clone();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// `pitr --repo URL args` as the server user (a local repository stays writable by both).
fn run(repo: &TestRepo, env: &[(String, String)], args: &[&str]) -> Output {
    pitr_as_server_user(repo.args(args), env)
}

fn ok(repo: &TestRepo, env: &[(String, String)], args: &[&str]) -> String {
    let o = run(repo, env, args);
    assert_code(&o, 0);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every stored object and its bytes, read behind pitr's back.
fn objects(repo: &TestRepo) -> BTreeMap<String, Vec<u8>> {
    let storage = repo.storage();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut out = BTreeMap::new();
        for o in storage.list("").await.unwrap() {
            let bytes = storage.get(&o.key).await.unwrap();
            out.insert(o.key, bytes.to_vec());
        }
        out
    })
}

fn holding(objects: &BTreeMap<String, Vec<u8>>, needle: &[u8]) -> Vec<String> {
    objects
        .iter()
        .filter(|(_, b)| b.windows(needle.len()).any(|w| w == needle))
        .map(|(k, _)| k.clone())
        .collect()
}

fn data_objects(objects: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    objects
        .iter()
        // The audit trail records the rotation itself: metadata, not data.
        .filter(|(k, _)| {
            !k.starts_with("keys/") && !k.starts_with("audit/") && !k.ends_with("/lease")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn insert_marker(pg: &PgCluster, phase: &str) {
    pg.psql(&format!(
        "insert into marks(phase, note) select '{phase}', '{MARKER}-' || g from generate_series(1, 50) g"
    ))
    .unwrap();
}

/// `pitr stream` with the key given by command, as a flag after the subcommand.
fn start_stream(repo: &TestRepo, pg: &PgCluster, key_command: &str, log: &Path) -> Child {
    let mut cmd = Command::new(pitr_bin());
    clean_env(&mut cmd);
    let conninfo = pg.conninfo();
    let args = repo.args(&[
        "stream",
        "-d",
        &conninfo,
        "--create-slot",
        "--encryption-key-command",
        key_command,
    ]);
    cmd.args(args)
        .envs(repo.env.iter().map(|(k, v)| (k, v)))
        .env("PITR_COMPRESSION", "none")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap());
    cmd.spawn().expect("spawning pitr stream")
}

/// Restores with `env` into `dir` and starts PostgreSQL on it with the repository's
/// environment only (no key variable): the restore_command must name the key source itself.
fn restore_and_read(
    repo: &TestRepo,
    env: &[(String, String)],
    dir: &Path,
    target: &[&str],
) -> (PgCluster, String) {
    let mut args = vec!["restore", "--pgdata", dir.to_str().unwrap()];
    args.extend_from_slice(target);
    ok(repo, env, &args);
    let pg = PgCluster::builder()
        .existing_data_dir(dir)
        .envs(repo.env.clone())
        .conf("archive_mode = off")
        .start()
        .unwrap();
    pg.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", pg.log_contents()));
    let phases = pg
        .psql("select string_agg(phase || ':' || n, ',' order by phase) from (select phase, count(*) n from marks group by phase) s")
        .unwrap();
    (pg, phases)
}

/// Archive (archive-push), stream and back up into an encrypted repository, restore to a time
/// with the key from the environment, and recover with the key the restore_command names.
fn encrypted_round_trip(backend: Backend) {
    let repo = TestRepo::new(backend);
    let keys = TestDir::new();
    let key = key_file(&keys, "key", "correct horse battery staple");
    let key_path = key.to_str().unwrap().to_string();
    // Uncompressed, so that only encryption can hide the marker.
    let env = env_with(
        &repo,
        &[
            ("PITR_ENCRYPTION_KEY_FILE", &key_path),
            ("PITR_COMPRESSION", "none"),
        ],
    );
    let pg = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(env.clone())
        .start()
        .unwrap();
    pg.psql("create table marks(id serial primary key, phase text not null, note text)")
        .unwrap();
    insert_marker(&pg, "a_base");
    let out = ok(&repo, &env, &["backup", "-d", &pg.conninfo()]);
    assert!(out.contains("complete"), "{out}");
    let work = TestDir::new();
    let stream_log = work.join("stream.log");
    let mut stream = start_stream(&repo, &pg, &format!("cat {}", sh_quote(&key)), &stream_log);

    insert_marker(&pg, "b_before_time");
    std::thread::sleep(Duration::from_millis(1100));
    let t = pg.psql("select now()").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    insert_marker(&pg, "c_after_time");
    switch_and_wait(&pg);
    // The streamer ships the same WAL; give it a moment, then stop it.
    std::thread::sleep(Duration::from_secs(2));
    let _ = Command::new("kill")
        .args(["-TERM", &stream.id().to_string()])
        .status();
    let status = stream.wait().unwrap();
    let slog = fs::read_to_string(&stream_log).unwrap_or_default();
    assert!(status.success(), "pitr stream: {status:?}\n{slog}");
    assert!(
        !slog.contains("correct horse"),
        "the key is in the log:\n{slog}"
    );

    let stored = objects(&repo);
    assert!(
        stored.keys().any(|k| k.starts_with("keys/")),
        "{:?}",
        stored.keys()
    );
    let leaking = holding(&stored, MARKER.as_bytes());
    assert!(
        leaking.is_empty(),
        "the marker is stored in clear in {leaking:?}"
    );
    assert!(holding(&stored, b"correct horse").is_empty());

    let dir = work.subdir("restored");
    let (restored, phases) = restore_and_read(&repo, &env, &dir, &["--target-time", &t]);
    assert_eq!(
        phases,
        "a_base:50,b_before_time:50",
        "{}",
        restored.log_contents()
    );
    let auto = fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("--encryption-key-file") && auto.contains(&key_path),
        "{auto}"
    );
    assert!(!auto.contains("correct horse"));
    assert!(!restored.log_contents().contains("correct horse"));
    assert!(holding(&data_dir_files(&dir), b"correct horse").is_empty());
    // verify reads every object through its seal.
    let o = run(&repo, &env, &["verify"]);
    assert_code(&o, 0);
}

on_local_and_s3!(
    encrypted_round_trip,
    encrypted_archive_stream_backup_restore_on_local_directory,
    encrypted_archive_stream_backup_restore_on_s3
);

/// Every file under a data directory, for "no key material here".
fn data_dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = fs::read(&p) {
                out.insert(p.display().to_string(), b);
            }
        }
    }
    out
}

/// The control for the marker check: without encryption (and without compression) the marker
/// is in the stored WAL and backup.
#[test]
fn without_encryption_the_marker_is_stored_in_clear() {
    let repo = TestRepo::new(Backend::Local);
    let env = env_with(&repo, &[("PITR_COMPRESSION", "none")]);
    let pg = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(env.clone())
        .start()
        .unwrap();
    pg.psql("create table marks(id serial primary key, phase text not null, note text)")
        .unwrap();
    insert_marker(&pg, "a");
    ok(&repo, &env, &["backup", "-d", &pg.conninfo()]);
    switch_and_wait(&pg);
    let stored = objects(&repo);
    let found = holding(&stored, MARKER.as_bytes());
    assert!(found.iter().any(|k| k.starts_with("wal/")), "{found:?}");
    assert!(found.iter().any(|k| k.starts_with("backups/")), "{found:?}");
}

/// An encrypted repository with two archived segments, made with `key`.
struct Encrypted {
    repo: TestRepo,
    pg: PgCluster,
    segs: Vec<String>,
    work: TestDir,
    key: PathBuf,
}

impl Encrypted {
    fn new(backend: Backend) -> Encrypted {
        let repo = TestRepo::new(backend);
        let (pg, segs) = cluster_with_segments();
        let work = TestDir::new();
        let key = key_file(&work, "key", "the-right-key");
        let e = Encrypted {
            repo,
            pg,
            segs,
            work,
            key,
        };
        let first = e.segment(0);
        let o = e.pitr(&[
            "--encryption-key-file",
            e.key(),
            "archive-push",
            first.to_str().unwrap(),
        ]);
        assert_code(&o, 0);
        e
    }

    fn key(&self) -> &str {
        self.key.to_str().unwrap()
    }

    fn segment(&self, i: usize) -> PathBuf {
        copy_wal(
            &self.pg,
            &self.segs[i],
            &self.work.subdir(format!("seg{i}")),
        )
    }

    fn pitr(&self, args: &[&str]) -> Output {
        run(&self.repo, &self.repo.env, args)
    }

    fn get(&self, key_args: &[&str], seg: usize) -> (Output, PathBuf) {
        let dest = self.work.join(format!("got-{seg}-{}", key_args.len()));
        let _ = fs::remove_file(&dest);
        let mut args = key_args.to_vec();
        args.extend(["archive-get", &self.segs[seg], dest.to_str().unwrap()]);
        (self.pitr(&args), dest)
    }

    fn seg_key(&self, i: usize) -> String {
        format!("wal/{}/{}", &self.segs[i][..16], self.segs[i])
    }
}

fn refused_without_key_or_with_the_wrong_one(backend: Backend) {
    let e = Encrypted::new(backend);
    let wrong = key_file(&e.work, "wrong", "not-the-key");
    let failing = "echo the-right-key; echo leaked-on-stderr >&2; exit 3".to_string();
    let before = objects(&e.repo);
    let second = e.segment(1);
    let second = second.to_str().unwrap();
    let no_key: &[&str] = &[];
    let wrong_key = ["--encryption-key-file", wrong.to_str().unwrap()];
    let bad_command = ["--encryption-key-command", failing.as_str()];
    for key_args in [no_key, &wrong_key[..], &bad_command[..]] {
        let (o, dest) = e.get(key_args, 0);
        assert_code(&o, 200);
        assert!(!dest.exists());
        let mut push = key_args.to_vec();
        push.extend(["archive-push", second]);
        let o = e.pitr(&push);
        assert_code(&o, 3);
        for cmd in [
            &["list"][..],
            &["verify"],
            &["expire", "--retain-full", "1"],
        ] {
            let mut args = key_args.to_vec();
            args.extend(cmd);
            let o = e.pitr(&args);
            assert_code(&o, 3);
        }
        let msg = stderr(&o);
        if key_args.is_empty() {
            assert!(msg.contains("this repository is encrypted: set --encryption-key-file or --encryption-key-command"), "{msg}");
        } else if key_args == wrong_key {
            assert!(msg.contains("does not open the repository"), "{msg}");
        } else {
            assert!(
                msg.contains("exit status 3") && msg.contains("echo the-right-key"),
                "{msg}"
            );
            // The command is named; what it printed (stdout or stderr) is not.
            let rest = msg.replace(&failing, "");
            assert!(
                !rest.contains("the-right-key") && !rest.contains("leaked-on-stderr"),
                "{msg}"
            );
        }
    }
    let o = e.pitr(&["restore", "--pgdata", e.work.subdir("r").to_str().unwrap()]);
    assert_code(&o, 3);
    assert_eq!(
        objects(&e.repo),
        before,
        "a refused command wrote something"
    );
    // The key from the environment or a config file works like the flag.
    let env = env_with(&e.repo, &[("PITR_ENCRYPTION_KEY_FILE", e.key())]);
    let via_env = e.work.join("via-env");
    let o = run(
        &e.repo,
        &env,
        &["archive-get", &e.segs[0], via_env.to_str().unwrap()],
    );
    assert_code(&o, 0);
    let cfg = e.work.write_file(
        "pitr.toml",
        format!("[encryption]\nkey_command = \"cat {}\"\n", e.key()),
    );
    let o = e.pitr(&["--config", cfg.to_str().unwrap(), "archive-push", second]);
    assert_code(&o, 0);
}

on_local_and_s3!(
    refused_without_key_or_with_the_wrong_one,
    missing_or_wrong_key_is_refused_on_local_directory,
    missing_or_wrong_key_is_refused_on_s3
);

#[test]
fn an_unencrypted_repository_refuses_a_key() {
    let repo = TestRepo::new(Backend::Local);
    let (pg, segs) = cluster_with_segments();
    let work = TestDir::new();
    let key = key_file(&work, "key", "some-key");
    let first = copy_wal(&pg, &segs[0], &work.subdir("a"));
    assert_code(
        &run(&repo, &repo.env, &["archive-push", first.to_str().unwrap()]),
        0,
    );
    let before = objects(&repo);
    let second = copy_wal(&pg, &segs[1], &work.subdir("b"));
    let with_key = ["--encryption-key-file", key.to_str().unwrap()];
    let o = run(
        &repo,
        &repo.env,
        &[&with_key[..], &["archive-push", second.to_str().unwrap()]].concat(),
    );
    assert_code(&o, 3);
    assert!(stderr(&o).contains("is not encrypted"), "{}", stderr(&o));
    let dest = work.join("got");
    let o = run(
        &repo,
        &repo.env,
        &[
            &with_key[..],
            &["archive-get", &segs[0], dest.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_code(&o, 200);
    assert!(!dest.exists());
    assert_code(
        &run(&repo, &repo.env, &[&with_key[..], &["list"]].concat()),
        3,
    );
    assert_eq!(objects(&repo), before);
}

/// A flipped byte anywhere in an encrypted object: archive-get stops recovery, verify says
/// which object. One flip is plain damage (the CRC finds it); the other is a forgery with the
/// CRCs recomputed, which only the authentication tag finds.
#[test]
fn a_flipped_byte_in_an_encrypted_object_is_refused_and_reported() {
    let e = Encrypted::new(Backend::Local);
    let second = e.segment(1);
    let key_args = ["--encryption-key-file", e.key()];
    assert_code(
        &e.pitr(&[&key_args[..], &["archive-push", second.to_str().unwrap()]].concat()),
        0,
    );
    let (o, _) = e.get(&key_args, 0);
    assert_code(&o, 0);
    let damaged = e.repo.object_file(&e.seg_key(0));
    let mut bytes = fs::read(&damaged).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x20;
    fs::write(&damaged, &bytes).unwrap();
    let forged = e.repo.object_file(&e.seg_key(1));
    let mut bytes = fs::read(&forged).unwrap();
    assert_eq!(bytes[4], 2, "an encrypted object is a version 2 frame");
    bytes[200] ^= 0x01;
    let crc = crc32c::crc32c(&bytes[40..]);
    bytes[28..32].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&bytes[..36]);
    bytes[36..40].copy_from_slice(&hcrc.to_le_bytes());
    fs::write(&forged, &bytes).unwrap();
    for seg in [0, 1] {
        let (o, dest) = e.get(&key_args, seg);
        assert_code(&o, 200);
        assert!(stderr(&o).contains(&e.seg_key(seg)), "{}", stderr(&o));
        assert!(!dest.exists());
    }
    let o = e.pitr(&[&key_args[..], &["verify", "--json"]].concat());
    assert_code(&o, 10);
    let out = text(&o);
    assert!(
        out.contains(&e.seg_key(0)) && out.contains(&e.seg_key(1)),
        "{out}"
    );
    assert!(out.contains("authentication"), "{out}");
}

/// Rotation: the new key opens everything, the old one nothing, no data object changed, and
/// a restore with the new key recovers.
fn rotation_then_restore(backend: Backend) {
    let repo = TestRepo::new(backend);
    let work = TestDir::new();
    let old = key_file(&work, "old", "old-passphrase");
    let new = key_file(&work, "new", "new-passphrase");
    let (old, new) = (old.to_str().unwrap(), new.to_str().unwrap());
    let env_old = env_with(&repo, &[("PITR_ENCRYPTION_KEY_FILE", old)]);
    let env_new = env_with(&repo, &[("PITR_ENCRYPTION_KEY_FILE", new)]);
    let mut pg = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(env_old.clone())
        .start()
        .unwrap();
    pg.psql("create table marks(id serial primary key, phase text not null, note text)")
        .unwrap();
    insert_marker(&pg, "a");
    ok(&repo, &env_old, &["backup", "-d", &pg.conninfo()]);
    insert_marker(&pg, "b");
    switch_and_wait(&pg);
    pg.stop().unwrap();

    let before = data_objects(&objects(&repo));
    // The current key as a flag after the subcommand, like any global option.
    let out = ok(
        &repo,
        &repo.env,
        &[
            "key",
            "rotate",
            "--encryption-key-file",
            old,
            "--new-key-file",
            new,
        ],
    );
    assert!(out.contains("generation 1 -> 2"), "{out}");
    let after = objects(&repo);
    assert_eq!(
        data_objects(&after),
        before,
        "rotation changed a data object"
    );
    assert_eq!(after.keys().filter(|k| k.starts_with("keys/")).count(), 1);

    let o = run(&repo, &env_old, &["list"]);
    assert_code(&o, 3);
    let o = run(
        &repo,
        &env_old,
        &[
            "archive-get",
            "00000001.history",
            work.join("h").to_str().unwrap(),
        ],
    );
    assert_code(&o, 200);
    let dir = work.subdir("restored");
    let (restored, phases) = restore_and_read(&repo, &env_new, &dir, &[]);
    assert_eq!(phases, "a:50,b:50", "{}", restored.log_contents());
}

on_local_and_s3!(
    rotation_then_restore,
    rotation_then_restore_on_local_directory,
    rotation_then_restore_on_s3
);

/// A crash between the two steps of a rotation (new keyring created, old one not yet removed)
/// leaves a repository both keys open; running the rotation again finishes it. Done by hand:
/// the old keyring is put back after a rotation, which is exactly that state.
#[test]
fn a_rotation_interrupted_between_its_steps_leaves_both_keys_working() {
    let e = Encrypted::new(Backend::Local);
    let new = key_file(&e.work, "new", "the-new-key");
    let new = new.to_str().unwrap();
    let gen1 = e.repo.object_file("keys/0000000001.json");
    let saved = fs::read(&gen1).unwrap();
    ok(
        &e.repo,
        &e.repo.env,
        &[
            "--encryption-key-file",
            e.key(),
            "key",
            "rotate",
            "--new-key-file",
            new,
        ],
    );
    assert!(!gen1.exists());
    fs::write(&gen1, &saved).unwrap();
    make_accessible(&gen1).unwrap();
    for key in [e.key(), new] {
        let (o, dest) = e.get(&["--encryption-key-file", key], 0);
        assert_code(&o, 0);
        assert_eq!(fs::read(dest).unwrap(), fs::read(e.segment(0)).unwrap());
    }
    // Another rotation from the old key to a third one is refused: it would fork the keys.
    let third = key_file(&e.work, "third", "a-third-key");
    let o = e.pitr(&[
        "--encryption-key-file",
        e.key(),
        "key",
        "rotate",
        "--new-key-file",
        third.to_str().unwrap(),
    ]);
    assert_code(&o, 4);
    // The same rotation run again finishes it.
    let out = ok(
        &e.repo,
        &e.repo.env,
        &[
            "--encryption-key-file",
            e.key(),
            "key",
            "rotate",
            "--new-key-command",
            "echo the-new-key",
        ],
    );
    assert!(out.contains("finished an interrupted rotation"), "{out}");
    assert!(!gen1.exists());
    let (o, _) = e.get(&["--encryption-key-file", e.key()], 0);
    assert_code(&o, 200);
    let (o, _) = e.get(&["--encryption-key-file", new], 0);
    assert_code(&o, 0);
}

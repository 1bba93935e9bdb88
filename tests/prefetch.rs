//! archive-get's prefetch spool, driven as PostgreSQL's startup process drives it: from a data
//! directory (PG_VERSION, recovery.signal, global/pg_control, pg_wal/) into pg_wal/RECOVERYXLOG,
//! one segment after another, with WAL archived from a real cluster.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::{assert_code, code, on_local_and_s3, stderr, Backend, TestRepo};
use crate::harness::{clean_env, pitr_bin, poll, PgCluster, TestDir};

const SEG_SIZE: usize = 1 << 20;

/// Segments of a real cluster (1 MiB segments), copied out of its pg_wal as each one completes.
struct Wal {
    names: Vec<String>,
    dir: TestDir,
    pg_control: Vec<u8>,
}

impl Wal {
    fn generate(count: usize) -> Wal {
        let pg = PgCluster::builder().wal_segsize(1).start().unwrap();
        pg.psql("create table t(id int, pad text)").unwrap();
        let dir = TestDir::new();
        let mut names = vec![];
        for i in 0..count {
            // The insert puts WAL into the current segment; the switch finishes it and names it.
            let name = pg
                .psql(&format!(
                    "insert into t select g, repeat('x', 100) from generate_series(1, {}) g; \
                     select pg_walfile_name(pg_switch_wal())",
                    200 * (i + 1)
                ))
                .unwrap();
            fs::copy(pg.data_dir().join("pg_wal").join(&name), dir.join(&name)).unwrap();
            names.push(name);
        }
        for w in names.windows(2) {
            assert!(w[0] < w[1], "segments in order, each once: {names:?}");
        }
        let pg_control = fs::read(pg.data_dir().join("global/pg_control")).unwrap();
        Wal {
            names,
            dir,
            pg_control,
        }
    }

    fn path(&self, i: usize) -> PathBuf {
        self.dir.join(&self.names[i])
    }

    fn bytes(&self, i: usize) -> Vec<u8> {
        fs::read(self.path(i)).unwrap()
    }

    /// The name of the segment after the last one: never archived.
    fn next_name(&self) -> String {
        let last = self.names.last().unwrap();
        let n = u64::from_str_radix(&last[16..], 16).unwrap() + 1;
        format!("{}{n:08X}", &last[..16])
    }
}

fn push(repo: &TestRepo, wal: &Wal, range: std::ops::Range<usize>) {
    for i in range {
        let o = repo.pitr(&["archive-push", wal.path(i).to_str().unwrap()]);
        assert_eq!(code(&o), 0, "archive-push: {}", stderr(&o));
    }
}

/// A data directory as restore_command sees it, inside `work`.
struct DataDir {
    path: PathBuf,
    repo_url: String,
    env: Vec<(String, String)>,
}

impl DataDir {
    fn new(work: &TestDir, repo: &TestRepo, wal: &Wal) -> DataDir {
        let path = work.subdir("data");
        fs::write(path.join("PG_VERSION"), "15\n").unwrap();
        fs::write(path.join("recovery.signal"), "").unwrap();
        fs::create_dir_all(path.join("global")).unwrap();
        fs::write(path.join("global/pg_control"), &wal.pg_control).unwrap();
        fs::create_dir_all(path.join("pg_wal")).unwrap();
        DataDir {
            path,
            repo_url: repo.url.clone(),
            env: repo.env.clone(),
        }
    }

    /// `pitr --repo R archive-get [extra] NAME pg_wal/RECOVERYXLOG`, from the data directory.
    fn get(&self, name: &str, extra: &[&str]) -> Output {
        let mut cmd = Command::new(pitr_bin());
        clean_env(&mut cmd);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.path)
            .args(["--repo", &self.repo_url, "archive-get"])
            .args(extra)
            .args([name, "pg_wal/RECOVERYXLOG"])
            .stdin(Stdio::null());
        // Returns when archive-get exits: the worker holds none of our pipes.
        cmd.output().expect("spawning pitr")
    }

    /// Takes the restored file away, as PostgreSQL does once it has read it.
    fn take_restored(&self) -> Vec<u8> {
        let p = self.path.join("pg_wal/RECOVERYXLOG");
        let b = fs::read(&p).unwrap();
        fs::remove_file(&p).unwrap();
        b
    }

    fn spool(&self) -> PathBuf {
        self.path.join("pg_wal/.pitr-prefetch")
    }

    /// Segment names of the spool entries (`<segment>.<crc>`), sorted.
    fn spooled(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.spool())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let f = e.file_name().into_string().ok()?;
                let (seg, crc) = f.split_once('.')?;
                (seg.len() == 24 && crc.len() == 8).then(|| seg.to_string())
            })
            .collect();
        v.sort();
        v
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        fs::read_dir(self.spool())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{name}."))
            })
            .unwrap_or_else(|| panic!("{name} is not spooled: {:?}", self.spooled()))
    }

    fn wait_spooled(&self, names: &[String]) {
        poll(
            "the worker to spool segments",
            Duration::from_secs(30),
            || {
                let have = self.spooled();
                Ok(names.iter().all(|n| have.contains(n)).then_some(()))
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}: wanted {names:?}, spooled {:?}\nworker log:\n{}",
                self.spooled(),
                self.worker_log()
            )
        });
    }

    fn worker_log(&self) -> String {
        fs::read_to_string(self.spool().join("worker.log")).unwrap_or_default()
    }

    /// Lines of the worker log saying the worker stopped at `name` because it is not found.
    fn not_found_lines(&self, name: &str) -> usize {
        self.worker_log()
            .lines()
            .filter(|l| l.contains("not in the repository") && l.contains(name))
            .count()
    }

    /// Waits until the worker has refilled the spool after replay asked for `name`.
    fn wait_refill(&self, name: &str) {
        let after = format!("after={name}");
        poll("the worker's refill", Duration::from_secs(30), || {
            Ok((self.worker_log().lines())
                .any(|l| l.contains("prefetched") && l.contains(&after))
                .then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.worker_log()));
    }

    /// Pids of prefetch workers of this data directory.
    fn workers(&self) -> Vec<u32> {
        workers_of(&self.spool())
    }

    /// Recovery ends: PostgreSQL removes recovery.signal. The worker must remove the spool and
    /// exit within about a second.
    fn end_recovery(&self) {
        fs::remove_file(self.path.join("recovery.signal")).unwrap();
        self.wait_worker_gone("the spool to be removed at the end of recovery");
        assert!(!self.spool().exists(), "spool left behind");
    }

    fn wait_worker_gone(&self, what: &str) {
        poll(what, Duration::from_secs(3), || {
            Ok((self.workers().is_empty() && !self.spool().exists()).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e}; workers {:?}", self.workers()));
    }
}

/// Processes whose command line is a prefetch worker for `spool`.
fn workers_of(spool: &Path) -> Vec<u32> {
    let spool = spool.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            // A zombie has an empty command line and is gone already.
            (args.iter().any(|a| a == "prefetch-worker") && args.contains(&spool)).then_some(pid)
        })
        .collect()
}

fn stored_object(repo: &TestRepo, name: &str) -> Vec<u8> {
    let key = format!("wal/{}/{name}", &name[..16]);
    pitr::codec::decode(&fs::read(repo.object_file(&key)).unwrap()).unwrap()
}

const HIT: &str = "restored from the prefetch spool";

/// A replay from start to end of archive: the first call misses, the worker fills the spool,
/// the next calls are served from it byte for byte, the worker follows replay, the end of the
/// archive is still exit 1, and the end of recovery removes the spool and the worker.
fn replay_through_the_spool(backend: Backend) {
    let wal = Wal::generate(12);
    let repo = TestRepo::new(backend);
    push(&repo, &wal, 0..wal.names.len());
    let work = TestDir::new();
    let data = DataDir::new(&work, &repo, &wal);
    let n = &wal.names;

    let o = data.get(&n[0], &[]);
    assert_code(&o, 0);
    assert!(!stderr(&o).contains(HIT), "{}", stderr(&o));
    assert_eq!(data.take_restored(), wal.bytes(0));

    // The default is 8 ahead of the segment just served, and no more.
    data.wait_spooled(&n[1..=8]);
    assert_eq!(data.spooled(), n[1..=8].to_vec());
    assert_eq!(data.workers().len(), 1, "one worker per spool");

    for (i, name) in n.iter().enumerate().take(9).skip(1) {
        let o = data.get(name, &[]);
        assert_code(&o, 0);
        assert!(
            stderr(&o).contains(HIT),
            "{name} was not a hit: {}",
            stderr(&o)
        );
        let got = data.take_restored();
        assert!(got == wal.bytes(i), "{name} differs from pg_wal");
        assert!(
            got == stored_object(&repo, name),
            "{name} differs from the repository"
        );
        assert!(
            data.spooled().iter().all(|s| s > name),
            "segments replay has passed are removed: {:?}",
            data.spooled()
        );
    }

    // The worker followed replay: the rest of the archive, and it stopped at its end.
    data.wait_spooled(&n[9..]);
    for (i, name) in n.iter().enumerate().skip(9) {
        let o = data.get(name, &[]);
        assert_code(&o, 0);
        assert!(stderr(&o).contains(HIT), "{}", stderr(&o));
        assert!(data.take_restored() == wal.bytes(i));
    }
    let o = data.get(&wal.next_name(), &[]);
    assert_eq!(code(&o), 1, "end of archive: {}", stderr(&o));
    assert!(!data.path.join("pg_wal/RECOVERYXLOG").exists());

    data.end_recovery();
}

on_local_and_s3!(
    replay_through_the_spool,
    replay_through_the_spool_on_local_directory,
    replay_through_the_spool_on_s3
);

/// A spooled segment with a flipped byte, or cut short, is never served: the call returns the
/// repository's bytes and the bad file is gone. A deleted data directory stops the worker.
#[test]
fn a_damaged_spool_file_is_not_served() {
    let wal = Wal::generate(5);
    let repo = TestRepo::new(Backend::Local);
    push(&repo, &wal, 0..5);
    let work = TestDir::new();
    let data = DataDir::new(&work, &repo, &wal);
    let n = &wal.names;

    assert_eq!(code(&data.get(&n[0], &["--prefetch", "3"])), 0);
    data.take_restored();
    data.wait_spooled(&n[1..=3]);

    let flipped = data.entry_path(&n[1]);
    let mut b = fs::read(&flipped).unwrap();
    b[SEG_SIZE / 2] ^= 0x01;
    fs::write(&flipped, &b).unwrap();
    let o = data.get(&n[1], &["--prefetch", "3"]);
    assert_code(&o, 0);
    assert!(!stderr(&o).contains(HIT), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("damaged prefetched segment") && stderr(&o).contains("crc32c"),
        "{}",
        stderr(&o)
    );
    assert!(data.take_restored() == wal.bytes(1));
    assert!(!flipped.exists(), "the damaged file is removed");
    assert!(!data.spooled().contains(&n[1]));

    // Let the worker finish its refill after n[1] (else it could fetch n[2] again right after
    // the call below removed the short file, and the call would wait for that good copy).
    data.wait_refill(&n[1]);
    let short = data.entry_path(&n[2]);
    let b = fs::read(&short).unwrap();
    fs::write(&short, &b[..SEG_SIZE / 2]).unwrap();
    let o = data.get(&n[2], &["--prefetch", "3"]);
    assert_code(&o, 0);
    assert!(!stderr(&o).contains(HIT), "{}", stderr(&o));
    assert!(stderr(&o).contains("bytes instead of"), "{}", stderr(&o));
    assert!(data.take_restored() == wal.bytes(2));
    assert!(!short.exists());

    // The worker is lingering for more; the data directory disappears under it. (After its
    // refill: a file it creates meanwhile would make remove_dir_all fail.)
    data.wait_refill(&n[2]);
    assert_eq!(data.workers().len(), 1);
    fs::remove_dir_all(&data.path).unwrap();
    poll("the worker to exit", Duration::from_secs(2), || {
        Ok(data.workers().is_empty().then_some(()))
    })
    .unwrap();
}

/// A segment that exists only as `pitr stream` chunks is served (zero-padded) by the repository
/// path but never spooled: the worker stops at it, every time.
#[test]
fn a_segment_of_stream_chunks_is_never_spooled() {
    let wal = Wal::generate(4);
    let repo = TestRepo::new(Backend::Local);
    push(&repo, &wal, 0..3);
    let n = &wal.names;
    // The open segment as the stream uploader stores it: chunks of its first half.
    let open = wal.bytes(3);
    let half = SEG_SIZE / 2;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            use pitr::repo::{ChunkRef, Repository, WriteOptions};
            let loc = pitr::storage::Location::parse(&repo.url).unwrap();
            let storage = pitr::storage::Storage::open(&loc, Duration::from_secs(5)).unwrap();
            let r = Repository::open(storage, WriteOptions::default())
                .await
                .unwrap();
            let name = pitr::wal::WalFileName::parse(&n[3]).unwrap();
            for (start, end) in [(0, half / 2), (half / 2, half)] {
                let chunk = ChunkRef {
                    segment: name.clone(),
                    start: start as u32,
                    end: end as u32,
                };
                r.put_chunk(&chunk, &open[start..end]).await.unwrap();
            }
        });
    let work = TestDir::new();
    let data = DataDir::new(&work, &repo, &wal);

    assert_eq!(code(&data.get(&n[1], &[])), 0);
    data.take_restored();
    data.wait_spooled(&n[2..=2]);
    poll(
        "the worker to stop at the chunked segment",
        Duration::from_secs(30),
        || Ok((data.not_found_lines(&n[3]) >= 1).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", data.worker_log()));
    assert_eq!(data.spooled(), vec![n[2].clone()]);

    let o = data.get(&n[2], &[]);
    assert!(stderr(&o).contains(HIT), "{}", stderr(&o));
    assert!(data.take_restored() == wal.bytes(2));
    // Replay moved on: the worker tries again and stops at the chunks again.
    poll("the worker to look again", Duration::from_secs(30), || {
        Ok((data.not_found_lines(&n[3]) >= 2).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", data.worker_log()));
    assert!(data.spooled().is_empty(), "{:?}", data.spooled());

    let o = data.get(&n[3], &[]);
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains("assembled from streamed chunks"),
        "{}",
        stderr(&o)
    );
    let mut expected = open[..half].to_vec();
    expected.resize(SEG_SIZE, 0);
    assert!(data.take_restored() == expected);
    assert!(data.spooled().is_empty(), "{:?}", data.spooled());

    // SIGTERM (a system shutdown): the worker exits at once and takes the spool with it.
    let workers = data.workers();
    assert_eq!(workers.len(), 1, "{workers:?}");
    let o = Command::new("kill")
        .args(["-TERM", &workers[0].to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    data.wait_worker_gone("the worker to exit on SIGTERM");
}

/// Writes a spool entry the way a worker names it: `<segment>.<crc32c of content>`.
fn forge_entry(data: &DataDir, name: &str, content: &[u8]) -> PathBuf {
    fs::create_dir_all(data.spool()).unwrap();
    let p = data
        .spool()
        .join(format!("{name}.{:08x}", crc32c::crc32c(content)));
    fs::write(&p, content).unwrap();
    p
}

fn forge_source(data: &DataDir, location: &str, system: &str) {
    fs::create_dir_all(data.spool()).unwrap();
    let source = serde_json::json!({
        "format": 1,
        "location": location,
        "system_identifier": system,
        "created_at": "2026-01-01T00:00:00+00:00",
        "wal_segment_size": SEG_SIZE,
    });
    fs::write(data.spool().join("source"), source.to_string()).unwrap();
}

/// A spool filled from another repository is discarded, not served; so is a segment of another
/// cluster under a `source` naming this repository.
#[test]
fn a_spool_of_another_repository_is_wiped() {
    let wal = Wal::generate(4);
    let repo = TestRepo::new(Backend::Local);
    push(&repo, &wal, 0..4);
    let work = TestDir::new();
    let data = DataDir::new(&work, &repo, &wal);
    let n = &wal.names;
    let real_system = u64::from_ne_bytes(wal.pg_control[..8].try_into().unwrap()).to_string();

    // Another location: a sound segment, CRC and all, is still not served.
    forge_source(&data, "/somewhere/else", &real_system);
    let mut other = wal.bytes(1);
    other[SEG_SIZE - 1] ^= 0xFF;
    let forged = forge_entry(&data, &n[1], &other);
    let o = data.get(&n[1], &["--prefetch", "2"]);
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains("filled from another repository"),
        "{}",
        stderr(&o)
    );
    assert!(data.take_restored() == wal.bytes(1));
    assert!(!forged.exists());
    // The worker makes the spool this repository's and fills it.
    data.wait_spooled(&n[2..=3]);
    let source: serde_json::Value =
        serde_json::from_slice(&fs::read(data.spool().join("source")).unwrap()).unwrap();
    let location =
        pitr::archive::prefetch::location_id(&pitr::storage::Location::parse(&repo.url).unwrap());
    assert_eq!(source["location"], location.as_str());
    assert_eq!(source["system_identifier"], real_system.as_str());
    data.end_recovery();

    // This location, but a segment of another cluster (a repository recreated here): its first
    // page names another system, so it is refused whatever `source` claims.
    fs::write(data.path.join("recovery.signal"), "").unwrap();
    forge_source(&data, &location, "1");
    let mut foreign = wal.bytes(2);
    foreign[24..32].copy_from_slice(&1u64.to_le_bytes());
    let forged = forge_entry(&data, &n[2], &foreign);
    let o = data.get(&n[2], &["--prefetch", "2"]);
    assert_code(&o, 0);
    assert!(!stderr(&o).contains(HIT), "{}", stderr(&o));
    assert!(stderr(&o).contains("system 1"), "{}", stderr(&o));
    assert!(data.take_restored() == wal.bytes(2));
    assert!(!forged.exists());
    // The worker does not trust that `source` either: it wipes and refills from the repository.
    data.wait_spooled(&n[3..=3]);
    let source: serde_json::Value =
        serde_json::from_slice(&fs::read(data.spool().join("source")).unwrap()).unwrap();
    assert_eq!(source["system_identifier"], real_system.as_str());
    let o = data.get(&n[3], &[]);
    assert!(stderr(&o).contains(HIT), "{}", stderr(&o));
    assert!(data.take_restored() == wal.bytes(3));
    data.end_recovery();
}

/// Outside a data directory, for other file kinds, and with `--prefetch 0`, archive-get is what
/// it was: no spool, no worker.
#[test]
fn prefetch_stays_out_of_other_calls() {
    let wal = Wal::generate(3);
    let repo = TestRepo::new(Backend::Local);
    push(&repo, &wal, 0..3);
    let work = TestDir::new();
    let data = DataDir::new(&work, &repo, &wal);
    let n = &wal.names;

    let o = data.get(&n[0], &["--prefetch", "0"]);
    assert_code(&o, 0);
    assert!(data.take_restored() == wal.bytes(0));
    let o = data.get("00000002.history", &[]);
    assert_code(&o, 1);
    // A directory not named pg_wal.
    let elsewhere = work.subdir("elsewhere");
    let o = repo.pitr(&[
        "archive-get",
        &n[1],
        elsewhere.join("RECOVERYXLOG").to_str().unwrap(),
    ]);
    assert_code(&o, 0);
    assert!(!elsewhere.join(".pitr-prefetch").exists());
    assert!(!data.spool().exists());
    assert!(data.workers().is_empty());
    // PITR_PREFETCH=0 turns it off too.
    let mut env = data.env.clone();
    env.push(("PITR_PREFETCH".into(), "0".into()));
    let off = DataDir {
        path: data.path.clone(),
        repo_url: data.repo_url.clone(),
        env,
    };
    assert_eq!(code(&off.get(&n[1], &[])), 0);
    assert!(!data.spool().exists());
    // Out of range is a configuration error, which stops recovery.
    let o = data.get(&n[1], &["--prefetch", "65"]);
    assert_code(&o, 200);
}

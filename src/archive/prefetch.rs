//! The archive-get prefetch spool: segments fetched ahead of PostgreSQL's replay.
//!
//! PostgreSQL's startup process runs `restore_command` once per segment and waits for it. Each
//! call pays a process start, the descriptor read, the GET, the decode and a 16 MiB write. With a
//! spool, a background worker fetches the next segments while PostgreSQL replays the current
//! one, so that the common call only verifies a local file and renames it into place.
//!
//! Safety rests on a few rules:
//! - a spooled file is named `<segment>.<crc32c of its content>` and is checked (length and CRC)
//!   before it is served; anything odd is deleted and the call falls back to the repository;
//! - only whole segment objects are spooled, never a segment assembled from `pitr stream` chunks
//!   (its zero padding is later replaced by WAL), and a "not found" is never remembered: the
//!   call that misses the spool asks the repository exactly as without prefetch, so the exit
//!   code contract (0 / 1 / 200) is unchanged;
//! - the spool records which repository filled it (`source`); a call for another repository
//!   discards it, and a worker checks the repository's descriptor before trusting it;
//! - a prefetch failure is a warning, never a failed call.
//!
//! Layout of `<directory of %p>/.pitr-prefetch/` (same file system as `%p`, so rename works):
//! `<segment>.<crc32c as 8 hex>` spooled segments, `tmp.<segment>.<pid>` segments being fetched
//! and written (a call that misses waits for those rather than fetch twice), `lock` (the
//! worker's flock), `source` (JSON identity of the repository), `requested` (the last segment
//! PostgreSQL asked for: how the worker follows replay) and `worker.log`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::repo::{RepoError, Repository, WriteOptions};
use crate::storage::{Location, Storage};
use crate::wal::WalFileName;

/// Segments kept ahead of replay when nothing else is configured.
pub const DEFAULT_AHEAD: u32 = 8;
/// The most segments a spool may be asked to hold (also bounded by [`MAX_SPOOL_BYTES`]).
pub const MAX_AHEAD: u32 = 64;
/// Name of the spool directory, beside `%p`.
pub const SPOOL_DIR: &str = ".pitr-prefetch";
/// The hidden subcommand that runs [`run_worker`]; the CLI must parse [`WorkerArgs::to_args`].
pub const WORKER_COMMAND: &str = "prefetch-worker";

const LOCK_FILE: &str = "lock";
const SOURCE_FILE: &str = "source";
const REQUESTED_FILE: &str = "requested";
const LOG_FILE: &str = "worker.log";
const TMP_PREFIX: &str = "tmp.";
const SOURCE_FORMAT: u32 = 1;

/// How long a worker waits for replay to ask for another segment before it gives up. Replay of
/// one segment takes well under a second; a standby waiting for new WAL starts a new worker
/// when a segment arrives.
const LINGER: Duration = Duration::from_secs(30);
/// How often a worker looks at `requested` and at the data directory's signal files. Bounds how
/// long it outlives the end of recovery or a deleted data directory.
const POLL: Duration = Duration::from_millis(150);
/// Disk budget of the spool: with 1 GiB segments `--prefetch 8` would otherwise put 8 GiB into
/// pg_wal's file system, and a full pg_wal stops PostgreSQL.
pub const MAX_SPOOL_BYTES: u64 = 1 << 30;
/// A spooled segment is written only if the file system keeps at least this share free after it
/// (and at least [`MIN_FREE_BYTES`]): the spool must never be what fills pg_wal.
const MIN_FREE_PERCENT: u64 = 5;
const MIN_FREE_BYTES: u64 = 1 << 30;
/// The longest a call waits for a segment the worker is fetching; then it fetches it itself.
const MAX_WAIT: Duration = Duration::from_secs(10);
const WAIT_STEP: Duration = Duration::from_millis(5);
/// Read size when checking a spooled segment.
const CHECK_BUFFER: usize = 256 << 10;
/// `worker.log` is cut back to empty beyond this, when a worker starts.
const MAX_LOG_BYTES: u64 = 1 << 20;
/// GETs in flight at once: enough to hide one request's latency behind another, few enough to
/// leave the CPU (lz4 decode) to PostgreSQL's replay.
const PARALLEL_FETCHES: usize = 2;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrefetchError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot start the prefetch worker {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("the prefetch worker was given {name:?}, which is not a WAL segment name")]
    NotASegment { name: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PrefetchError + 'a {
    move |source| PrefetchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Prefetch settings of one archive-get call.
#[derive(Clone, Debug)]
pub struct Prefetch {
    /// Segments to keep ahead of the requested one; 0 disables prefetching.
    pub ahead: u32,
    /// The pitr binary that runs the worker (normally `std::env::current_exe()`).
    pub program: PathBuf,
    /// Options placed before [`WORKER_COMMAND`], so that the worker opens the same repository
    /// with the same settings (`--repo`, `--config`, ...). The environment is inherited too.
    pub global_args: Vec<OsString>,
}

/// What a worker is told by the archive-get that starts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The spool directory (absolute).
    pub spool: PathBuf,
    /// The data directory (absolute): its `recovery.signal` / `standby.signal` say whether
    /// recovery is still running.
    pub data_dir: PathBuf,
    /// The segment just served: the worker fetches the ones after it.
    pub after: String,
    pub ahead: u32,
}

impl WorkerArgs {
    /// The worker's command line after the global options: `prefetch-worker --spool ...`.
    pub fn to_args(&self) -> Vec<OsString> {
        vec![
            WORKER_COMMAND.into(),
            "--spool".into(),
            self.spool.clone().into(),
            "--data-dir".into(),
            self.data_dir.clone().into(),
            "--after".into(),
            self.after.clone().into(),
            "--ahead".into(),
            self.ahead.to_string().into(),
        ]
    }
}

/// Which repository filled a spool. Written by the worker once it has read the descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SpoolSource {
    format: u32,
    /// [`location_id`] of the repository: what a call can check without touching storage.
    location: String,
    /// Descriptor fields: a repository recreated at the same location is another repository.
    system_identifier: String,
    created_at: String,
    wal_segment_size: u64,
}

impl SpoolSource {
    fn of(repo: &Repository) -> SpoolSource {
        let d = repo.descriptor();
        SpoolSource {
            format: SOURCE_FORMAT,
            location: location_id(repo.storage().location()),
            system_identifier: d.system_identifier.to_string(),
            created_at: d.created_at.to_rfc3339(),
            wal_segment_size: d.wal_segment_size,
        }
    }
}

/// The repository location as the spool records it. For S3 the endpoint is part of it: the same
/// bucket name on two endpoints is two repositories.
pub fn location_id(location: &Location) -> String {
    match location {
        Location::S3 { settings, .. } => {
            let endpoint = settings
                .endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                .unwrap_or_else(|| "aws".into());
            format!("{location} at {endpoint}")
        }
        other => other.to_string(),
    }
}

/// `(log, seg)` of a segment name: orders segments by position whatever the segment size and
/// the timeline, since `seg` is always below the number of segments per log id.
fn position(name: &WalFileName) -> Option<(u32, u32)> {
    match *name {
        WalFileName::Segment { log, seg, .. } => Some((log, seg)),
        _ => None,
    }
}

fn entry_name(name: &WalFileName, crc: u32) -> String {
    format!("{name}.{crc:08x}")
}

/// The segment and CRC of a spool entry's file name, `None` for anything else.
fn parse_entry(file_name: &str) -> Option<(WalFileName, u32)> {
    let (seg, crc) = file_name.split_once('.')?;
    if crc.len() != 8 || !crc.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let name = WalFileName::parse(seg).ok()?;
    position(&name)?;
    Some((name, u32::from_str_radix(crc, 16).ok()?))
}

/// The spool entries present: `(file name, segment, crc)`. A missing directory has none.
fn entries(dir: &Path) -> Vec<(String, WalFileName, u32)> {
    let Ok(rd) = fs::read_dir(dir) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let (name, crc) = parse_entry(&file)?;
            Some((file, name, crc))
        })
        .collect()
}

fn read_source(dir: &Path) -> Option<SpoolSource> {
    let text = fs::read(dir.join(SOURCE_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes `name` in `dir` through a temporary file and a rename, so readers see all or nothing.
fn write_small_atomically(dir: &Path, name: &str, content: &[u8]) -> Result<(), PrefetchError> {
    let tmp = dir.join(format!("{TMP_PREFIX}{name}.{}", std::process::id()));
    let path = dir.join(name);
    let result = fs::write(&tmp, content).and_then(|()| fs::rename(&tmp, &path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err("cannot write", &path))
}

/// A worker's `tmp.<segment>.<pid>`, as opposed to the short-lived temporary of a small file
/// that an archive-get may be renaming into place right now.
fn is_segment_tmp(file: &str) -> bool {
    file.strip_prefix(TMP_PREFIX)
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(seg, _)| WalFileName::parse(seg).is_ok_and(|n| position(&n).is_some()))
}

fn read_requested(dir: &Path) -> Option<WalFileName> {
    let text = fs::read_to_string(dir.join(REQUESTED_FILE)).ok()?;
    let name = WalFileName::parse(text.trim()).ok()?;
    position(&name).map(|_| name)
}

/// Removes everything a spool holds except its lock, the worker's log and `requested`: the
/// segments of a repository that is not the one in use.
fn wipe(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        if file == SOURCE_FILE || is_segment_tmp(&file) || parse_entry(&file).is_some() {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn recovery_running(data_dir: &Path) -> bool {
    data_dir.join("recovery.signal").exists() || data_dir.join("standby.signal").exists()
}

/// The spool of one archive-get call, when prefetching applies to it.
#[derive(Debug)]
pub(super) struct Spool {
    dir: PathBuf,
    data_dir: PathBuf,
}

impl Spool {
    /// The spool for `name` restored to `dest`, if this call is PostgreSQL's startup process
    /// asking for a segment: a regular segment name, `%p` inside a directory named `pg_wal`, and
    /// a current directory holding `PG_VERSION` (PostgreSQL runs restore_command from the data
    /// directory) and `recovery.signal` or `standby.signal`. Anything else (a `.history`,
    /// `.partial` or `.backup` file, a manual call into another directory, pg_rewind) is served
    /// exactly as without prefetch.
    pub(super) fn engage(name: &WalFileName, dest: &Path) -> Option<Spool> {
        position(name)?;
        let parent = dest.parent()?;
        if parent.file_name()? != "pg_wal" || !Path::new("PG_VERSION").is_file() {
            return None;
        }
        let data_dir = std::env::current_dir().ok()?;
        // A worker started now would only remove the spool again.
        if !recovery_running(&data_dir) {
            return None;
        }
        let dir = std::path::absolute(parent).ok()?.join(SPOOL_DIR);
        Some(Spool { dir, data_dir })
    }

    /// The hit path: serves `name` from the spool into `dest` if a sound copy is there, without
    /// touching storage. Returns the bytes served; `None` sends the call to the repository.
    pub(super) fn take(&self, name: &WalFileName, location: &str, dest: &Path) -> Option<u64> {
        if !self.dir.is_dir() {
            return None;
        }
        let present = entries(&self.dir);
        let source = match read_source(&self.dir) {
            Some(s) if s.location == location => s,
            Some(s) => {
                tracing::info!(spool = %self.dir.display(), filled_from = %s.location,
                    "the prefetch spool was filled from another repository; discarding it");
                wipe(&self.dir);
                return None;
            }
            // Segments of unknown origin (no worker writes one before `source`).
            None => {
                if !present.is_empty() {
                    wipe(&self.dir);
                }
                return None;
            }
        };
        let cluster_system = cluster_system_identifier(&self.data_dir);
        for (file, _, crc) in present.into_iter().filter(|(_, n, _)| n == name) {
            let path = self.dir.join(&file);
            let expect = Expect {
                name,
                crc,
                seg_size: source.wal_segment_size,
                source_system: &source.system_identifier,
                cluster_system,
            };
            match check_entry(&path, &expect) {
                Ok(len) => match fs::rename(&path, dest) {
                    Ok(()) => return Some(len),
                    // Vanished meanwhile (a worker's clean-up): the repository has it.
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e,
                            "cannot move a prefetched segment into place; fetching it from the repository");
                        let _ = fs::remove_file(&path);
                    }
                },
                // Removed by a worker's clean-up since the directory was read: not damage.
                Err(_) if !path.exists() => {}
                Err(problem) => {
                    tracing::warn!(file = %path.display(), %problem,
                        "discarding a damaged prefetched segment; fetching it from the repository");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        None
    }

    /// [`Spool::take`], and when the worker is fetching `name` at this moment, waits for it
    /// (up to [`MAX_WAIT`]) rather than fetching the same segment a second time: that happens
    /// when replay is faster than fetching, and two fetches of one segment only slow each other.
    pub(super) async fn take_or_wait(
        &self,
        name: &WalFileName,
        location: &str,
        dest: &Path,
    ) -> Option<u64> {
        if let Some(n) = self.take(name, location, dest) {
            return Some(n);
        }
        let started = Instant::now();
        let mut worker_seen = Instant::now();
        while self.in_flight(name) && started.elapsed() < MAX_WAIT {
            // A worker that died leaves its marker behind but not its lock.
            if worker_seen.elapsed() >= POLL {
                if !worker_running(&self.dir).unwrap_or(false) {
                    break;
                }
                worker_seen = Instant::now();
            }
            tokio::time::sleep(WAIT_STEP).await;
            if let Some(n) = self.take(name, location, dest) {
                tracing::debug!(file = %name, waited = ?started.elapsed(), "waited for the prefetch worker");
                return Some(n);
            }
        }
        // The fetch may have ended between two looks.
        self.take(name, location, dest)
    }

    fn in_flight(&self, name: &WalFileName) -> bool {
        let prefix = format!("{TMP_PREFIX}{name}.");
        fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|f| f.starts_with(&prefix))
            })
    }

    /// After `name` was served: drops what replay has passed, tells the worker where replay is,
    /// and starts a worker unless one runs. Never fails the call: problems are warnings.
    pub(super) fn after_serving(&self, name: &WalFileName, prefetch: &Prefetch) {
        if let Err(e) = self.after_serving_inner(name, prefetch) {
            tracing::warn!(error = %e, "prefetch not started; archive-get is unaffected");
        }
    }

    fn after_serving_inner(
        &self,
        name: &WalFileName,
        prefetch: &Prefetch,
    ) -> Result<(), PrefetchError> {
        fs::create_dir_all(&self.dir).map_err(io_err("cannot create", &self.dir))?;
        let pos = position(name);
        for (file, n, _) in entries(&self.dir) {
            // Any timeline: replay never goes back to a lower position.
            if position(&n) < pos {
                let _ = fs::remove_file(self.dir.join(file));
            }
        }
        write_small_atomically(&self.dir, REQUESTED_FILE, name.to_string().as_bytes())?;
        if worker_running(&self.dir)? {
            return Ok(());
        }
        let args = WorkerArgs {
            spool: self.dir.clone(),
            data_dir: self.data_dir.clone(),
            after: name.to_string(),
            ahead: prefetch.ahead,
        };
        spawn_worker(prefetch, &args)
    }
}

/// What a spooled segment must match besides its own CRC.
struct Expect<'a> {
    name: &'a WalFileName,
    crc: u32,
    seg_size: u64,
    /// The repository's system identifier, as the spool's `source` says.
    source_system: &'a str,
    /// The data directory's own, from `global/pg_control`, when readable.
    cluster_system: Option<u64>,
}

/// Length of a spool entry whose content is sound, or what is wrong with it.
///
/// Beyond the CRC (a torn or damaged file), the segment's first page must say it is this
/// segment of this cluster. PostgreSQL would refuse it otherwise, and in archive recovery a
/// refused segment can end recovery early; the spool's own records are not trusted for that.
///
/// This is the whole cost of a hit, so the file is streamed through a small buffer: reading it
/// into one 16 MiB allocation cost more in page faults than the copy and the CRC together.
fn check_entry(path: &Path, e: &Expect) -> Result<u64, String> {
    use crate::wal::{parse_long_header, Lsn, PageError};
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len != e.seg_size {
        return Err(format!(
            "{len} bytes instead of a {}-byte segment",
            e.seg_size
        ));
    }
    let segno = e.name.segno(e.seg_size).ok_or("not a segment")?;
    // Page-aligned: the kernel's copy into a buffer misaligned by malloc's 16-byte header runs
    // at a quarter of the speed on AMD EPYC (fast-string copies), 6.5 ms instead of 1.5 ms per
    // 16 MiB.
    let mut backing = vec![0u8; CHECK_BUFFER + 4096];
    let start = backing.as_ptr().align_offset(4096).min(4096);
    let buf = &mut backing[start..start + CHECK_BUFFER.min(len as usize)];
    let (mut crc, mut done) = (0u32, 0u64);
    while done < len {
        let n = buf.len().min((len - done) as usize);
        file.read_exact(&mut buf[..n]).map_err(|e| e.to_string())?;
        if done == 0 {
            let h = parse_long_header(&buf[..n]).map_err(|err| err.to_string())?;
            let expected = Lsn::from_segno(segno, e.seg_size);
            let problem = if u64::from(h.seg_size) != e.seg_size {
                Some(PageError::SizeMismatch {
                    len,
                    seg_size: h.seg_size,
                })
            } else if h.pageaddr != expected {
                Some(PageError::AddressMismatch {
                    expected,
                    found: h.pageaddr,
                })
            } else if h.tli > e.name.timeline() {
                Some(PageError::TimelineMismatch {
                    expected: e.name.timeline(),
                    found: h.tli,
                })
            } else {
                None
            };
            if let Some(p) = problem {
                return Err(p.to_string());
            }
            let system = h.system_identifier;
            if system.to_string() != e.source_system
                || e.cluster_system.is_some_and(|c| c != system)
            {
                return Err(format!(
                    "WAL of system {system}, not of this cluster or repository"
                ));
            }
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        done += n as u64;
    }
    // Nothing may have been appended behind the length checked above.
    if file.read(&mut buf[..1]).map_err(|e| e.to_string())? != 0 {
        return Err("the file grew while it was read".into());
    }
    if crc != e.crc {
        return Err(format!("crc32c {crc:08x}, named {:08x}", e.crc));
    }
    Ok(len)
}

/// The system identifier in `global/pg_control`: its first field, in the server's byte order.
fn cluster_system_identifier(data_dir: &Path) -> Option<u64> {
    use std::io::Read;
    let mut first = [0u8; 8];
    File::open(data_dir.join("global/pg_control"))
        .and_then(|mut f| f.read_exact(&mut first))
        .ok()?;
    Some(u64::from_ne_bytes(first))
}

/// Whether a worker holds the spool's lock.
fn worker_running(dir: &Path) -> Result<bool, PrefetchError> {
    let path = dir.join(LOCK_FILE);
    let file = open_lock(&path)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        // Closing the file releases the lock at once: the worker about to start takes it.
        Ok(()) => Ok(false),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(true),
        Err(e) => Err(PrefetchError::Io {
            what: "cannot lock",
            path,
            source: e.into(),
        }),
    }
}

fn open_lock(path: &Path) -> Result<File, PrefetchError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("cannot open", path))
}

fn spawn_worker(prefetch: &Prefetch, args: &WorkerArgs) -> Result<(), PrefetchError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.spool.join(LOG_FILE))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    let mut cmd = std::process::Command::new(&prefetch.program);
    cmd.args(&prefetch.global_args)
        .args(args.to_args())
        // PostgreSQL reads restore_command's output and waits for it: the worker must hold
        // none of its descriptors. Its own process group keeps it out of the signals
        // PostgreSQL sends to restore_command's group.
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
    // Not waited for: archive-get exits at once and the worker is re-parented.
    let child = cmd.spawn().map_err(|source| PrefetchError::Spawn {
        program: prefetch.program.clone(),
        source,
    })?;
    tracing::debug!(pid = child.id(), spool = %args.spool.display(), "prefetch worker started");
    Ok(())
}

/// The worker's exclusive hold on a spool.
struct SpoolLock {
    _file: File,
}

impl SpoolLock {
    /// `None` when another worker holds the spool.
    fn acquire(dir: &Path) -> Result<Option<SpoolLock>, PrefetchError> {
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let path = dir.join(LOCK_FILE);
        let file = open_lock(&path)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => {
                return Err(PrefetchError::Io {
                    what: "cannot lock",
                    path,
                    source: e.into(),
                })
            }
        }
        // A worker on its way out unlinks the lock file while still holding it: a lock on that
        // unlinked file excludes nobody, so only the file still at the path counts.
        let held = file.metadata().map_err(io_err("cannot stat", &path))?;
        match fs::metadata(&path) {
            Ok(m) if m.dev() == held.dev() && m.ino() == held.ino() => {
                Ok(Some(SpoolLock { _file: file }))
            }
            _ => Ok(None),
        }
    }
}

/// How a worker's run ended.
#[derive(Debug, PartialEq, Eq)]
enum WorkerEnd {
    /// Replay asked for nothing new for [`LINGER`].
    Idle,
    /// Neither recovery.signal nor standby.signal exists any more (or the data directory is gone).
    RecoveryOver,
    Terminated,
    /// The spool now belongs to another repository's calls: leave it to them.
    Superseded,
}

/// The prefetch worker: keeps the `ahead` segments after the last requested one in the spool
/// until replay stops asking, recovery ends, or SIGTERM. Started by archive-get, detached.
pub async fn run_worker(storage: Storage, args: WorkerArgs) -> Result<(), PrefetchError> {
    let after = WalFileName::parse(&args.after)
        .ok()
        .filter(|n| position(n).is_some())
        .ok_or_else(|| PrefetchError::NotASegment {
            name: args.after.clone(),
        })?;
    let Some(lock) = SpoolLock::acquire(&args.spool)? else {
        tracing::debug!(spool = %args.spool.display(), "another prefetch worker holds the spool");
        return Ok(());
    };
    trim_log(&args.spool.join(LOG_FILE));
    // Left by a worker that was killed mid-write; only workers write segments here.
    for e in fs::read_dir(&args.spool).into_iter().flatten().flatten() {
        if is_segment_tmp(&e.file_name().to_string_lossy()) {
            let _ = fs::remove_file(e.path());
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("cannot handle SIGTERM for", &args.spool))?;
    let started = Instant::now();
    let end = tokio::select! {
        end = follow_replay(&storage, &args, after) => end,
        () = recovery_over(&args.data_dir) => WorkerEnd::RecoveryOver,
        _ = term.recv() => WorkerEnd::Terminated,
    };
    tracing::info!(?end, ran_for = ?started.elapsed(), "prefetch worker exits");
    if end != WorkerEnd::Superseded {
        // A spool left behind after recovery would sit in pg_wal for good: nothing else
        // removes it. The next archive-get starts over if recovery goes on.
        remove_spool(&args.spool, lock);
    }
    Ok(())
}

async fn recovery_over(data_dir: &Path) {
    while recovery_running(data_dir) {
        tokio::time::sleep(POLL).await;
    }
}

fn trim_log(path: &Path) {
    if fs::metadata(path).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
        // Opened in append mode by every archive-get: writers carry on at the new end.
        let _ = OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(0));
    }
}

/// Removes the spool, the lock file last and while still locked (see [`SpoolLock::acquire`]).
fn remove_spool(dir: &Path, lock: SpoolLock) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name() != LOCK_FILE {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_file(dir.join(LOCK_FILE));
    // Fails when an archive-get has just put something in: then the spool lives on for it.
    let _ = fs::remove_dir(dir);
    drop(lock);
}

/// Refills the spool each time replay moves on, until replay stops asking for [`LINGER`].
async fn follow_replay(storage: &Storage, args: &WorkerArgs, after: WalFileName) -> WorkerEnd {
    let spool = &args.spool;
    let mut current = after;
    let mut last_move = Instant::now();
    let mut repo: Option<(Repository, SpoolSource)> = None;
    let mut filled_for: Option<WalFileName> = None;
    loop {
        if let Some(r) = read_requested(spool) {
            if r != current {
                current = r;
                last_move = Instant::now();
            }
        }
        if let Some((_, source)) = &repo {
            if read_source(spool).as_ref() != Some(source) {
                tracing::info!("the spool was taken over for another repository");
                return WorkerEnd::Superseded;
            }
        }
        if filled_for.as_ref() != Some(&current) {
            // Once per position: a segment not found now is retried when replay moves on,
            // not every poll.
            filled_for = Some(current.clone());
            if repo.is_none() {
                match claim(storage, spool).await {
                    Ok(r) => repo = Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open the repository; not prefetching")
                    }
                }
            }
            if let Some((r, source)) = &repo {
                fill(r, source, args, &current).await;
            }
        }
        if last_move.elapsed() >= LINGER {
            return WorkerEnd::Idle;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Opens the repository and makes the spool its own: a spool filled from anything else (another
/// location, or a repository recreated at this one) is wiped first.
async fn claim(
    storage: &Storage,
    spool: &Path,
) -> Result<(Repository, SpoolSource), PrefetchError> {
    let repo = Repository::open(storage.clone(), WriteOptions::default()).await?;
    let source = SpoolSource::of(&repo);
    if read_source(spool).as_ref() != Some(&source) {
        wipe(spool);
        let json = serde_json::to_vec_pretty(&source).expect("source serializes");
        write_small_atomically(spool, SOURCE_FILE, &json)?;
    }
    Ok((repo, source))
}

/// The number of segments to keep ahead: `ahead`, within the spool's disk budget.
fn effective_ahead(ahead: u32, seg_size: u64) -> u64 {
    let budget = (MAX_SPOOL_BYTES / seg_size.max(1)).max(1);
    u64::from(ahead.min(MAX_AHEAD)).min(budget)
}

/// Fetches the segments after `current` that are not spooled yet, in order, a few at a time,
/// and stops at the first one that is not found or fails.
async fn fill(repo: &Repository, source: &SpoolSource, args: &WorkerArgs, current: &WalFileName) {
    let seg_size = source.wal_segment_size;
    let Some(segno) = current.segno(seg_size) else {
        return;
    };
    let have: HashSet<WalFileName> = entries(&args.spool)
        .into_iter()
        .map(|(_, n, _)| n)
        .collect();
    let wanted: Vec<WalFileName> = (1..=effective_ahead(args.ahead, seg_size))
        .filter_map(|i| segno.checked_add(i))
        .map(|s| WalFileName::segment(current.timeline(), s, seg_size))
        .filter(|n| !have.contains(n))
        .collect();
    if wanted.is_empty() {
        return;
    }
    // Whole segment objects only (`get_wal_file`), never chunks of the open segment: those are
    // served by the repository path, which sees the latest of them.
    let spool = &args.spool;
    let mut fetches = futures::stream::iter(wanted.clone())
        .map(|name| async move {
            // The empty temporary file says "being fetched": a call that misses the spool for
            // this segment waits for it instead of fetching it a second time.
            let _ = File::create(tmp_path(spool, &name));
            let r = repo.get_wal_file(&name).await;
            (name, r)
        })
        .buffered(PARALLEL_FETCHES);
    let mut stored = 0;
    while let Some((name, result)) = fetches.next().await {
        match result {
            Ok(Some(content)) => match store(args, source, &name, &content) {
                Ok(true) => stored += 1,
                Ok(false) => {}
                Err(reason) => {
                    tracing::warn!(file = %name, %reason, "prefetch stops");
                    break;
                }
            },
            Ok(None) => {
                tracing::info!(file = %name, "not in the repository (yet); prefetch stops here");
                break;
            }
            Err(e) => {
                tracing::warn!(file = %name, error = %e, "prefetch stops");
                break;
            }
        }
    }
    drop(fetches);
    // Markers of fetches abandoned after a stop (a stored segment's was renamed away).
    for name in &wanted {
        let _ = fs::remove_file(tmp_path(spool, name));
    }
    tracing::info!(after = %current, stored, "prefetched");
}

/// Where a worker writes `name` before renaming it into place.
fn tmp_path(spool: &Path, name: &WalFileName) -> PathBuf {
    spool.join(format!("{TMP_PREFIX}{name}.{}", std::process::id()))
}

/// Writes one fetched segment into the spool. `Ok(false)`: not needed any more.
fn store(
    args: &WorkerArgs,
    source: &SpoolSource,
    name: &WalFileName,
    content: &[u8],
) -> Result<bool, String> {
    let spool = &args.spool;
    if content.len() as u64 != source.wal_segment_size {
        return Err(format!(
            "{} bytes in the repository, not a {}-byte segment",
            content.len(),
            source.wal_segment_size
        ));
    }
    if read_requested(spool).is_some_and(|r| position(&r) >= position(name)) {
        return Ok(false); // replay got there first
    }
    if read_source(spool).as_ref() != Some(source) {
        return Err("the spool was taken over for another repository".into());
    }
    let stat = rustix::fs::statvfs(spool.as_path()).map_err(|e| format!("statvfs: {e}"))?;
    let unit = stat.f_frsize.max(1);
    let (avail, total) = (stat.f_bavail * unit, stat.f_blocks * unit);
    let reserve = (total / 100 * MIN_FREE_PERCENT).max(MIN_FREE_BYTES);
    if avail < reserve + content.len() as u64 {
        return Err(format!(
            "only {} MiB free on the file system of {}; keeping at least {} MiB for PostgreSQL",
            avail >> 20,
            spool.display(),
            reserve >> 20
        ));
    }
    let crc = crc32c::crc32c(content);
    let tmp = tmp_path(spool, name);
    let path = spool.join(entry_name(name, crc));
    // No fsync: a file torn by an OS crash fails its CRC when used and is fetched again.
    let result = File::create(&tmp)
        .and_then(|mut f| f.write_all(content))
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    tracing::debug!(file = %name, "spooled");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_round_trip_and_reject_others() {
        let n = WalFileName::parse("0000000200000001000000FE").unwrap();
        let file = entry_name(&n, 0xE306_9283);
        assert_eq!(file, "0000000200000001000000FE.e3069283");
        assert_eq!(parse_entry(&file), Some((n, 0xE306_9283)));
        for other in [
            "lock",
            "source",
            "requested",
            "worker.log",
            "tmp.0000000200000001000000FE.123",
            "0000000200000001000000FE",
            "0000000200000001000000FE.partial",
            "00000002.history",
            "0000000200000001000000FE.e306928",
            "0000000200000001000000FE.00000028.backup",
        ] {
            assert_eq!(parse_entry(other), None, "{other}");
        }
    }

    #[test]
    fn positions_order_segments_across_timelines() {
        let p = |s: &str| position(&WalFileName::parse(s).unwrap());
        assert!(p("000000030000000000000005") < p("000000010000000000000006"));
        assert!(p("0000000100000000000000FF") < p("000000010000000100000000"));
        assert_eq!(p("00000002.history"), None);
        assert_eq!(p("000000010000000000000003.partial"), None);
    }

    #[test]
    fn the_disk_budget_bounds_the_segments_ahead() {
        assert_eq!(effective_ahead(8, 16 << 20), 8);
        assert_eq!(effective_ahead(64, 16 << 20), 64);
        assert_eq!(effective_ahead(64, 64 << 20), 16);
        assert_eq!(effective_ahead(8, 1 << 30), 1);
        assert_eq!(effective_ahead(1000, 1 << 20), u64::from(MAX_AHEAD));
    }

    #[test]
    fn engages_only_for_segments_into_pg_wal_from_a_data_directory() {
        // The current directory of `cargo test` holds no PG_VERSION.
        let seg = WalFileName::parse("000000010000000000000003").unwrap();
        assert!(Spool::engage(&seg, Path::new("pg_wal/RECOVERYXLOG")).is_none());
        let hist = WalFileName::parse("00000002.history").unwrap();
        assert!(Spool::engage(&hist, Path::new("pg_wal/RECOVERYHISTORY")).is_none());
    }

    #[test]
    fn the_hit_path_checks_length_crc_and_the_first_page() {
        let d = tempfile::tempdir().unwrap();
        let seg_size = 1u32 << 20;
        let name = WalFileName::segment(1, 5, seg_size.into());
        // A first page with a valid long header: magic, flags, tli, address, sysid, sizes.
        let mut content = vec![0u8; seg_size as usize];
        content[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        content[2..4].copy_from_slice(&crate::wal::XLP_LONG_HEADER.to_le_bytes());
        content[4..8].copy_from_slice(&1u32.to_le_bytes());
        content[8..16].copy_from_slice(&(5 * u64::from(seg_size)).to_le_bytes());
        content[24..32].copy_from_slice(&42u64.to_le_bytes());
        content[32..36].copy_from_slice(&seg_size.to_le_bytes());
        content[36..40].copy_from_slice(&8192u32.to_le_bytes());
        let crc = crc32c::crc32c(&content);
        let p = d.path().join("x");
        fs::write(&p, &content).unwrap();
        let ok = Expect {
            name: &name,
            crc,
            seg_size: seg_size.into(),
            source_system: "42",
            cluster_system: Some(42),
        };
        assert_eq!(check_entry(&p, &ok), Ok(seg_size.into()));
        let err = |e: Expect| check_entry(&p, &e).unwrap_err();
        assert!(err(Expect { crc: crc ^ 1, ..ok }).contains("crc32c"));
        assert!(err(Expect {
            seg_size: 2 << 20,
            ..ok
        })
        .contains("bytes"));
        assert!(err(Expect {
            source_system: "7",
            ..ok
        })
        .contains("system 42"));
        assert!(err(Expect {
            cluster_system: Some(7),
            ..ok
        })
        .contains("system 42"));
        let other = WalFileName::segment(1, 6, seg_size.into());
        assert!(err(Expect { name: &other, ..ok }).contains("page address"));
        assert_eq!(
            check_entry(
                &p,
                &Expect {
                    cluster_system: None,
                    ..ok
                }
            ),
            Ok(seg_size.into())
        );
        assert!(check_entry(&d.path().join("gone"), &ok).is_err());
    }

    #[test]
    fn wipe_keeps_the_lock_log_and_position() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "lock",
            "worker.log",
            "requested",
            "source",
            "tmp.000000010000000000000004.1",
            "tmp.requested.1",
            "000000010000000000000003.e3069283",
            "unrelated",
        ] {
            fs::write(d.path().join(f), b"").unwrap();
        }
        wipe(d.path());
        let mut left: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "lock",
                "requested",
                "tmp.requested.1",
                "unrelated",
                "worker.log"
            ]
        );
        assert!(is_segment_tmp("tmp.000000010000000000000003.4242"));
        assert!(!is_segment_tmp("tmp.requested.4242"));
        assert!(!is_segment_tmp("000000010000000000000003.e3069283"));
    }
}

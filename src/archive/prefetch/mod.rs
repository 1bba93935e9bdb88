//! The archive-get prefetch spool: segments fetched ahead of PostgreSQL's replay.
//!
//! PostgreSQL's startup process runs `restore_command` once per segment and waits for it. Each
//! call pays a process start, the descriptor read, the GET, the decode and a 16 MiB write. With a
//! spool, a background worker fetches the next segments while PostgreSQL replays the current
//! one, so that the common call only verifies a local file and renames it into place.
//!
//! Safety rests on a few rules:
//! - a spooled file is named `<segment>.<crc32c of its content>` and is checked (length, CRC,
//!   and a first page saying it is this segment of this cluster) before it is served; anything
//!   odd is deleted and the call falls back to the repository;
//! - only whole segment objects are spooled, never a segment assembled from `pitr stream` chunks
//!   (its zero padding is later replaced by WAL), and a "not found" is never remembered: the
//!   call that misses the spool asks the repository exactly as without prefetch, so the exit
//!   code contract (0 / 1 / 200) is unchanged;
//! - the spool records which repository filled it (`source`); a call for another repository
//!   discards it, and a worker checks the repository's descriptor before trusting it;
//! - a prefetch failure is a warning, never a failed call.
//!
//! `spool` is the archive-get side (the hit path, starting the worker), `worker` the detached
//! process that fills the spool.
//!
//! Layout of `<directory of %p>/.pitr-prefetch/` (same file system as `%p`, so rename works):
//! `<segment>.<crc32c as 8 hex>` spooled segments, `tmp.<segment>.<pid>` segments being fetched
//! and written (a call that misses waits for those rather than fetch twice), `lock` (the
//! worker's flock), `source` (JSON identity of the repository), `requested` (the last segment
//! PostgreSQL asked for: how the worker follows replay) and `worker.log`.

mod spool;
mod worker;

pub(in crate::archive) use spool::Spool;
pub use worker::run_worker;

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Classify, Code};
use crate::repo::{RepoError, Repository};
use crate::storage::Location;
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

/// How often a worker looks at `requested` and at the data directory's signal files. Bounds how
/// long it outlives the end of recovery or a deleted data directory.
const POLL: Duration = Duration::from_millis(150);
/// Disk budget of the spool: with 1 GiB segments `--prefetch 8` would otherwise put 8 GiB into
/// pg_wal's file system, and a full pg_wal stops PostgreSQL.
pub const MAX_SPOOL_BYTES: u64 = 1 << 30;

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

/// Never an exit status today (the worker always exits 0, and archive-get turns prefetch
/// problems into warnings); this is what each would mean if one were.
impl Classify for PrefetchError {
    fn code(&self) -> Code {
        match self {
            PrefetchError::Repo(e) => e.code(),
            PrefetchError::Io { .. } => Code::Input,
            PrefetchError::NotASegment { .. } => Code::Usage,
            PrefetchError::Spawn { .. } => Code::Internal,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            PrefetchError::Repo(e) => e.hint(),
            PrefetchError::Io { .. }
            | PrefetchError::NotASegment { .. }
            | PrefetchError::Spawn { .. } => None,
        }
    }
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
            location: location_id(repo.storage_location()),
            system_identifier: d.system_identifier.to_string(),
            created_at: d.created_at.to_rfc3339(),
            wal_segment_size: d.wal_segment_size,
        }
    }
}

/// The repository location as the spool records it. For S3 the endpoint is part of it: the same
/// bucket name on two endpoints is two repositories.
pub fn location_id(location: &Location) -> String {
    crate::repo::marker::location_key(location)
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

/// A worker's `tmp.<segment>.<pid>`, as opposed to the temporary of a small file (`source`)
/// that another process may be renaming into place right now.
fn is_segment_tmp(file: &str) -> bool {
    file.strip_prefix(TMP_PREFIX)
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(seg, _)| WalFileName::parse(seg).is_ok_and(|n| position(&n).is_some()))
}

/// Records the segment replay asked for last, for the worker: `requested` is a symbolic link
/// whose target is the segment name, replaced atomically by a rename.
///
/// Not a regular file: on ext4 both ways of replacing a small file's content wait for that
/// file's previous data to be written back (a rename over it flushes the new file first,
/// auto_da_alloc; a truncation waits for pages under writeback), and that I/O queues behind
/// the worker's 16 MiB segment writes. Either made a hit take 30-160 ms now and then instead
/// of 6. A short symlink has no data blocks (its target lives in the inode), so replacing it
/// is metadata only.
fn write_requested(dir: &Path, name: &WalFileName) -> Result<(), PrefetchError> {
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{REQUESTED_FILE}.{}",
        std::process::id()
    ));
    let path = dir.join(REQUESTED_FILE);
    let _ = fs::remove_file(&tmp);
    let result =
        std::os::unix::fs::symlink(name.to_string(), &tmp).and_then(|()| fs::rename(&tmp, &path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err("cannot write", &path))
}

fn read_requested(dir: &Path) -> Option<WalFileName> {
    let target = fs::read_link(dir.join(REQUESTED_FILE)).ok()?;
    let name = WalFileName::parse(target.to_str()?).ok()?;
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
    fn requested_round_trips_and_anything_else_reads_as_nothing() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_requested(d.path()), None);
        let n = WalFileName::parse("000000020000000100000003").unwrap();
        write_requested(d.path(), &n).unwrap();
        assert_eq!(read_requested(d.path()), Some(n.clone()));
        write_requested(d.path(), &WalFileName::segment(2, 0x104, 16 << 20)).unwrap();
        assert_eq!(
            read_requested(d.path()).unwrap().to_string(),
            "000000020000000100000004"
        );
        // Not a link, or a link to something else: nothing.
        let p = d.path().join(REQUESTED_FILE);
        fs::remove_file(&p).unwrap();
        fs::write(&p, "000000020000000100000003").unwrap();
        assert_eq!(read_requested(d.path()), None);
        fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("00000002.history", &p).unwrap();
        assert_eq!(read_requested(d.path()), None);
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

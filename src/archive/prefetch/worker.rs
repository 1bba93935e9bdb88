//! The prefetch worker: a detached process that keeps the spool ahead of replay.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{
    entries, entry_name, io_err, is_segment_tmp, open_lock, position, read_requested, read_source,
    recovery_running, wipe, write_small_atomically, PrefetchError, SpoolSource, WorkerArgs,
    LOCK_FILE, LOG_FILE, MAX_AHEAD, MAX_SPOOL_BYTES, POLL, SOURCE_FILE, TMP_PREFIX,
};
use crate::repo::{Repository, WriteOptions};
use crate::storage::Storage;
use crate::wal::WalFileName;

/// How long a worker waits for replay to ask for another segment before it gives up. Replay of
/// one segment takes well under a second; a standby waiting for new WAL starts a new worker
/// when a segment arrives.
const LINGER: Duration = Duration::from_secs(30);
/// A spooled segment is written only if the file system keeps at least this share free after it
/// (and at least [`MIN_FREE_BYTES`]): the spool must never be what fills pg_wal.
const MIN_FREE_PERCENT: u64 = 5;
const MIN_FREE_BYTES: u64 = 1 << 30;
/// `worker.log` is cut back to empty beyond this, when a worker starts.
const MAX_LOG_BYTES: u64 = 1 << 20;
/// GETs in flight at once: enough to hide one request's latency behind another, few enough to
/// leave the CPU (lz4 decode) to PostgreSQL's replay.
const PARALLEL_FETCHES: usize = 2;

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
pub async fn run_worker(
    storage: Storage,
    args: WorkerArgs,
    write: WriteOptions,
) -> Result<(), PrefetchError> {
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
        end = follow_replay(&storage, &args, after, &write) => end,
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
async fn follow_replay(
    storage: &Storage,
    args: &WorkerArgs,
    after: WalFileName,
    write: &WriteOptions,
) -> WorkerEnd {
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
                match claim(storage, spool, write).await {
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
    write: &WriteOptions,
) -> Result<(Repository, SpoolSource), PrefetchError> {
    let repo = Repository::open(storage.clone(), write.clone()).await?;
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
    let crc = crate::codec::crc::crc32c(content);
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
    fn the_disk_budget_bounds_the_segments_ahead() {
        assert_eq!(effective_ahead(8, 16 << 20), 8);
        assert_eq!(effective_ahead(64, 16 << 20), 64);
        assert_eq!(effective_ahead(64, 64 << 20), 16);
        assert_eq!(effective_ahead(8, 1 << 30), 1);
        assert_eq!(effective_ahead(1000, 1 << 20), u64::from(MAX_AHEAD));
    }
}

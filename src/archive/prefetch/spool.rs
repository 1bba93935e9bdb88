//! The archive-get side of the spool: serving a segment from it, and starting the worker.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{
    entries, io_err, position, read_requested, read_source, recovery_running, wipe, worker_running,
    write_requested, Prefetch, PrefetchError, WorkerArgs, LOG_FILE, POLL, SPOOL_DIR, TMP_PREFIX,
};
use crate::wal::WalFileName;

/// The longest a call waits for a segment the worker is fetching; then it fetches it itself.
const MAX_WAIT: Duration = Duration::from_secs(10);
const WAIT_STEP: Duration = Duration::from_millis(5);
/// Read size when checking a spooled segment.
const CHECK_BUFFER: usize = 256 << 10;

/// The spool of one archive-get call, when prefetching applies to it.
#[derive(Debug)]
pub(in crate::archive) struct Spool {
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
    pub(in crate::archive) fn engage(name: &WalFileName, dest: &Path) -> Option<Spool> {
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
    pub(in crate::archive) fn take(
        &self,
        name: &WalFileName,
        location: &str,
        dest: &Path,
    ) -> Option<u64> {
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
                Ok(len) => {
                    // Replay's position is published before the entry leaves the spool: a
                    // worker that saw it gone while `requested` still named the segment
                    // before would fetch it again and leave it behind for the next call.
                    if let Err(e) = write_requested(&self.dir, name) {
                        tracing::debug!(error = %e, "replay's position not recorded before the hit");
                    }
                    match fs::rename(&path, dest) {
                        Ok(()) => return Some(len),
                        // Vanished meanwhile (a worker's clean-up): the repository has it.
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e,
                                "cannot move a prefetched segment into place; fetching it from the repository");
                            let _ = fs::remove_file(&path);
                        }
                    }
                }
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
    pub(in crate::archive) async fn take_or_wait(
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
    pub(in crate::archive) fn after_serving(&self, name: &WalFileName, prefetch: &Prefetch) {
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
        // A hit recorded it already (see `take`).
        if read_requested(&self.dir).as_ref() != Some(name) {
            write_requested(&self.dir, name)?;
        }
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
    // crate::codec::crc sums 16 MiB in a third of the crc32c crate's time: after the read
    // itself this was the largest part of a hit.
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
        crc = crate::codec::crc::crc32c_append(crc, &buf[..n]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engages_only_for_segments_into_pg_wal_from_a_data_directory() {
        // The current directory of `cargo test` holds no PG_VERSION.
        let seg = WalFileName::parse("000000010000000000000003").unwrap();
        assert!(Spool::engage(&seg, Path::new("pg_wal/RECOVERYXLOG")).is_none());
        let hist = WalFileName::parse("00000002.history").unwrap();
        assert!(Spool::engage(&hist, Path::new("pg_wal/RECOVERYHISTORY")).is_none());
    }

    /// Segment 5 of timeline 1 of system 42: a first page with a valid long header (magic,
    /// flags, tli, address, sysid, sizes), zeros after it.
    fn segment_5(seg_size: u32) -> Vec<u8> {
        let mut content = vec![0u8; seg_size as usize];
        content[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        content[2..4].copy_from_slice(&crate::wal::XLP_LONG_HEADER.to_le_bytes());
        content[4..8].copy_from_slice(&1u32.to_le_bytes());
        content[8..16].copy_from_slice(&(5 * u64::from(seg_size)).to_le_bytes());
        content[24..32].copy_from_slice(&42u64.to_le_bytes());
        content[32..36].copy_from_slice(&seg_size.to_le_bytes());
        content[36..40].copy_from_slice(&8192u32.to_le_bytes());
        content
    }

    /// A hit records replay's position before the segment leaves the spool (the call's clean-up
    /// after serving comes too late: a worker would fetch the segment again meanwhile).
    #[test]
    fn a_hit_records_the_position_before_the_segment_leaves() {
        let d = tempfile::tempdir().unwrap();
        let seg_size = 1u32 << 20;
        let name = WalFileName::segment(1, 5, seg_size.into());
        let content = segment_5(seg_size);
        let spool = Spool {
            dir: d.path().join("spool"),
            data_dir: d.path().to_path_buf(),
        };
        fs::create_dir(&spool.dir).unwrap();
        let source = super::super::SpoolSource {
            format: super::super::SOURCE_FORMAT,
            location: "file:///repo".into(),
            system_identifier: "42".into(),
            created_at: "2026-12-05T00:00:00+00:00".into(),
            wal_segment_size: seg_size.into(),
        };
        let json = serde_json::to_vec(&source).unwrap();
        super::super::write_small_atomically(&spool.dir, super::super::SOURCE_FILE, &json).unwrap();
        let crc = crc32c::crc32c(&content);
        fs::write(
            spool.dir.join(super::super::entry_name(&name, crc)),
            &content,
        )
        .unwrap();
        write_requested(&spool.dir, &WalFileName::segment(1, 4, seg_size.into())).unwrap();

        let dest = d.path().join("RECOVERYXLOG");
        assert_eq!(
            spool.take(&name, "file:///repo", &dest),
            Some(seg_size.into())
        );
        assert_eq!(read_requested(&spool.dir), Some(name));
        assert!(fs::read(&dest).unwrap() == content);
        assert!(entries(&spool.dir).is_empty());
    }

    #[test]
    fn the_hit_path_checks_length_crc_and_the_first_page() {
        let d = tempfile::tempdir().unwrap();
        let seg_size = 1u32 << 20;
        let name = WalFileName::segment(1, 5, seg_size.into());
        let content = segment_5(seg_size);
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

        // The CRC covers every read of the file: a flipped bit in its first read (past the
        // header), in a middle one, or in its very last byte is found.
        for at in [100, content.len() / 2 + 3, content.len() - 1] {
            let mut damaged = content.clone();
            damaged[at] ^= 0x10;
            fs::write(&p, &damaged).unwrap();
            assert!(
                check_entry(&p, &ok).unwrap_err().contains("crc32c"),
                "at {at}"
            );
        }
    }
}

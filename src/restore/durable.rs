//! Getting the restored tree onto the disk while the restore is still running.
//!
//! A restored data directory must be durable when `pitr restore` says "restored", and
//! PostgreSQL will not start recovery before it has synced the whole directory itself (it
//! always does for a backup, whose control file says "in production"). If the restore leaves
//! the writeback to the kernel, that sync happens serially at startup: measured 4.2 s for an
//! 806 MB database. If instead the restore fsyncs each file, every small file costs a journal
//! commit: about a thousand of them in a pgbench database, and the restore was no faster than
//! pgBackRest's.
//!
//! So on Linux a background thread fdatasyncs large files every few MiB while the writer goes on
//! (the bandwidth part, overlapped with fetching and decoding), and at the end one `syncfs` per
//! target filesystem makes everything else durable, small files, directories and ownership
//! changes, in a single journal commit. That is the trade PostgreSQL makes with
//! `recovery_init_sync_method = syncfs`: other dirty data on the same filesystem is flushed too.
//! Elsewhere each file is fsynced when complete, then every directory.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};

use super::error::RestoreError;

/// Jobs waiting for the sync thread. Bounded, so that a slow disk slows the writer down instead
/// of piling up open files.
const SYNC_QUEUE: usize = 64;

/// How many bytes of one file the writer lets pile up before it has them flushed, so that a
/// 1 GiB relation segment streams to the disk instead of landing there at its end.
pub(super) const FLUSH_EVERY: u64 = 16 << 20;

enum Job {
    /// Flush what has been written to this file so far (a second descriptor of it).
    Flush { file: File, path: PathBuf },
    /// The file is complete.
    Done { file: File, path: PathBuf },
}

/// A background thread that pushes written bytes to the disk; see the module docs.
pub(super) struct Syncer {
    tx: SyncSender<Job>,
    thread: std::thread::JoinHandle<Result<(), RestoreError>>,
}

/// The writer's side of a [`Syncer`]. Sends fail only once the sync thread has stopped on an
/// error, which [`Syncer::finish`] reports, so they are ignored here.
#[derive(Clone)]
pub(super) struct SyncHandle {
    tx: SyncSender<Job>,
}

impl SyncHandle {
    /// [`FLUSH_EVERY`] more bytes were written to `file`.
    pub(super) fn flush(&self, file: &File, path: &Path) {
        // A second descriptor, so the writer keeps its own and never waits for the disk.
        if let Ok(file) = file.try_clone() {
            let path = path.to_path_buf();
            let _ = self.tx.send(Job::Flush { file, path });
        }
    }

    /// `file` is complete; the descriptor closes once it is handled.
    pub(super) fn done(&self, file: File, path: PathBuf) {
        let _ = self.tx.send(Job::Done { file, path });
    }
}

impl Syncer {
    pub(super) fn start() -> Syncer {
        let (tx, rx) = sync_channel::<Job>(SYNC_QUEUE);
        let thread = std::thread::spawn(move || {
            for job in rx {
                let (result, path) = match job {
                    Job::Flush { file, path } => (file.sync_data(), path),
                    Job::Done { file, path } => (finish_file(&file), path),
                };
                result.map_err(|source| RestoreError::Io { path, source })?;
            }
            Ok(())
        });
        Syncer { tx, thread }
    }

    pub(super) fn handle(&self) -> SyncHandle {
        SyncHandle {
            tx: self.tx.clone(),
        }
    }

    /// Returns once everything written under `roots` (each a directory tree the restore created)
    /// is durable.
    pub(super) fn finish(self, roots: &[PathBuf]) -> Result<(), RestoreError> {
        drop(self.tx);
        self.thread.join().expect("sync thread panicked")?;
        for root in roots {
            sync_tree(root).map_err(|source| RestoreError::Io {
                path: root.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Small files are left to the final `syncfs`: one journal commit for all of them instead of
/// one each.
#[cfg(target_os = "linux")]
fn finish_file(_file: &File) -> io::Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn finish_file(file: &File) -> io::Result<()> {
    file.sync_all()
}

/// One `syncfs` of the filesystem holding `root` (Linux 5.8+ reports writeback errors through
/// it).
#[cfg(target_os = "linux")]
fn sync_tree(root: &Path) -> io::Result<()> {
    let dir = File::open(root)?;
    rustix::fs::syncfs(&dir)?;
    Ok(())
}

/// fsyncs every directory under `root` (not following symlinks), so new entries are durable;
/// the files themselves were synced one by one.
#[cfg(not(target_os = "linux"))]
fn sync_tree(root: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(root)?;
    if !meta.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(root)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree(&e.path())?;
        }
    }
    File::open(root)?.sync_all()
}

//! Delta restore (`pitr restore --delta`): restore into an existing, stopped data directory,
//! rewriting only what differs from the backup.
//!
//! The backup is streamed as in a normal restore (every file still checked against the
//! manifest), but where a file of the same size is already there, its bytes are compared with
//! the backup's as they arrive: a file that matches to the end is left alone, one that differs
//! is rewritten from its first differing piece on. Comparing bytes instead of trusting equal
//! size and CRC-32C costs the same read and cannot be fooled: every valid `pg_control` has the
//! same CRC-32C, since it ends with the CRC-32C of its own content. Afterwards every file, link or directory that the backup does not
//! have is removed, like pgBackRest's `--delta`: stale WAL in `pg_wal` would otherwise be
//! replayed, a `standby.signal` or `backup_label.old` of an earlier run would change how the
//! server starts, and a relation file of a table dropped after the backup would linger.
//! `postgresql.auto.conf` is in every backup, so it is rewritten and gets fresh recovery
//! settings, as in a normal restore. Only `postmaster.opts` is kept: PostgreSQL leaves it out
//! of base backups and rewrites it at every start.
//!
//! A data directory whose `postmaster.pid` names a live process is refused before anything is
//! read: rewriting files under a running server corrupts it.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::error::RestoreError;

/// Top-level entries of the data directory a delta restore keeps although the backup does not
/// have them.
const KEPT_IN_PGDATA: &[&str] = &["postmaster.opts"];

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses a directory a delta restore must not touch: one that is not empty and has no
/// `PG_VERSION` (a typo in `--pgdata` must not empty someone's home directory), and a data
/// directory that a running server uses: `postmaster.pid` names a process that exists. A stale
/// `postmaster.pid` (the process is gone) is removed later like any file not in the backup.
pub fn check_stopped(pgdata: &Path) -> Result<(), RestoreError> {
    match fs::read_dir(pgdata) {
        Ok(mut entries) => {
            if entries.next().is_some() && !pgdata.join("PG_VERSION").exists() {
                return Err(RestoreError::NotDataDir {
                    path: pgdata.to_path_buf(),
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(pgdata)(e)),
    }
    let pid_file = pgdata.join("postmaster.pid");
    let text = match fs::read_to_string(&pid_file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(&pid_file)(e)),
    };
    // The first line is the postmaster's PID (negative for a single-user backend).
    let pid: Option<i32> = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
        .map(i32::abs);
    let alive = match pid.and_then(rustix::process::Pid::from_raw) {
        Some(p) => match rustix::process::test_kill_process(p) {
            Ok(()) => true,
            // The process exists but belongs to another user.
            Err(e) => e == rustix::io::Errno::PERM,
        },
        // Unreadable: it cannot be shown stale, so it is treated as live.
        None => true,
    };
    if alive {
        return Err(RestoreError::ServerRunning {
            path: pgdata.to_path_buf(),
            pid: pid.unwrap_or(0),
        });
    }
    Ok(())
}

/// What a delta restore knows and has done; lives in the restore's file writer.
#[derive(Debug, Default)]
pub(super) struct Delta {
    /// Every path the backup has, with whether it is a directory entry.
    seen: HashMap<PathBuf, bool>,
    pub kept_files: u64,
    pub kept_bytes: u64,
    pub removed: u64,
}

impl Delta {
    /// The backup has `path`; a directory entry when `dir`.
    pub fn see(&mut self, path: &Path, dir: bool) {
        self.seen.insert(path.to_path_buf(), dir);
    }

    /// Whether a regular file of `size` bytes is at `path`: the writer then compares its bytes
    /// with the backup's instead of writing a new one.
    pub fn same_size(&mut self, path: &Path, size: u64) -> Result<bool, RestoreError> {
        match fs::symlink_metadata(path) {
            Ok(m) => Ok(m.is_file() && m.len() == size),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_at(path)(e)),
        }
    }

    /// A file of `size` bytes turned out equal to the backup's.
    pub fn kept(&mut self, size: u64) {
        self.kept_files += 1;
        self.kept_bytes += size;
    }

    /// Removes whatever is at `path` so that a new file or link can be created there. A
    /// directory (or a link to one) stays when `dir`: the entry is a directory too.
    pub fn clear(&mut self, path: &Path, dir: bool) -> Result<(), RestoreError> {
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_at(path)(e)),
        };
        if dir && fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        remove_any(path, &meta)?;
        self.removed += 1;
        Ok(())
    }

    /// Removes everything under `root` that the backup does not have. In a tablespace's
    /// directory (`pgdata` false) only the version subdirectories the backup has are cleaned:
    /// the same location may hold other major versions' directories.
    pub fn remove_unseen(&mut self, root: &Path, pgdata: bool) -> Result<(), RestoreError> {
        for e in fs::read_dir(root).map_err(io_at(root))? {
            let path = e.map_err(io_at(root))?.path();
            let protected = !pgdata
                || path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| KEPT_IN_PGDATA.contains(&n));
            if protected && !self.seen.contains_key(&path) {
                continue;
            }
            self.clean(&path)?;
        }
        Ok(())
    }

    fn clean(&mut self, path: &Path) -> Result<(), RestoreError> {
        match self.seen.get(path) {
            // A directory the backup has (or a link to one, such as a pg_wal moved elsewhere).
            Some(true) => {
                for e in fs::read_dir(path).map_err(io_at(path))? {
                    let child = e.map_err(io_at(path))?.path();
                    self.clean(&child)?;
                }
                Ok(())
            }
            Some(false) => Ok(()),
            None => {
                let meta = fs::symlink_metadata(path).map_err(io_at(path))?;
                remove_any(path, &meta)?;
                self.removed += 1;
                Ok(())
            }
        }
    }
}

/// Removes a file, a link (never what it points to) or a directory tree.
fn remove_any(path: &Path, meta: &fs::Metadata) -> Result<(), RestoreError> {
    tracing::debug!(path = %path.display(), "delta restore: removing what the backup does not have");
    if meta.is_dir() {
        fs::remove_dir_all(path).map_err(io_at(path))
    } else {
        fs::remove_file(path).map_err(io_at(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_postmaster_is_refused_and_a_stale_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        check_stopped(dir.path()).unwrap();
        check_stopped(&dir.path().join("missing")).unwrap();
        fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        let e = check_stopped(dir.path()).unwrap_err();
        assert!(matches!(e, RestoreError::NotDataDir { .. }), "{e}");
        fs::write(dir.path().join("PG_VERSION"), b"17\n").unwrap();
        check_stopped(dir.path()).unwrap();
        let pid_file = dir.path().join("postmaster.pid");
        fs::write(&pid_file, format!("{}\n/data\n", std::process::id())).unwrap();
        let e = check_stopped(dir.path()).unwrap_err();
        assert!(matches!(e, RestoreError::ServerRunning { .. }), "{e}");
        // PIDs are below 2^22 on Linux: this one cannot exist.
        fs::write(&pid_file, "2147483646\n/data\n").unwrap();
        check_stopped(dir.path()).unwrap();
    }

    #[test]
    fn keeps_equal_files_and_removes_what_the_backup_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("base/1")).unwrap();
        fs::create_dir_all(root.join("pg_wal")).unwrap();
        fs::write(root.join("base/1/100"), b"same").unwrap();
        fs::write(root.join("base/1/101"), b"old!").unwrap();
        fs::write(root.join("base/1/102"), b"dropped").unwrap();
        fs::write(root.join("pg_wal/000000010000000000000009"), b"stale").unwrap();
        fs::write(root.join("postmaster.opts"), b"opts").unwrap();
        fs::write(root.join("standby.signal"), b"").unwrap();
        let mut d = Delta::default();
        for dir in ["base", "base/1", "pg_wal"] {
            d.see(&root.join(dir), true);
        }
        for f in ["base/1/100", "base/1/101"] {
            d.see(&root.join(f), false);
        }
        assert!(d.same_size(&root.join("base/1/100"), 4).unwrap());
        assert!(!d.same_size(&root.join("base/1/101"), 5).unwrap());
        assert!(!d.same_size(&root.join("base/1/103"), 5).unwrap());
        d.remove_unseen(root, true).unwrap();
        assert_eq!(d.removed, 3);
        assert!(
            root.join("base/1/101").exists(),
            "rewritten by the writer, not here"
        );
        assert!(!root.join("base/1/102").exists());
        assert!(!root.join("standby.signal").exists());
        assert!(root.join("postmaster.opts").exists());
        assert_eq!(fs::read_dir(root.join("pg_wal")).unwrap().count(), 0);
    }
}

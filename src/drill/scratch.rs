//! The drill's scratch directory: `pitr-drill-<time>-<pid>/` holding `data/` (the restored
//! cluster), `sock/` (the server's private socket directory), `pg_hba.conf` and `postgres.log`.
//! Removed when dropped, unless kept.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::archive::prefetch::SPOOL_DIR;

use super::server::ServerUser;

#[derive(Debug)]
pub struct Scratch {
    root: PathBuf,
    keep: bool,
}

impl Scratch {
    /// Creates a new, private directory under `parent`, owned by `owner` when given.
    pub fn create(parent: &Path, owner: Option<&ServerUser>) -> io::Result<Scratch> {
        let name = format!(
            "pitr-drill-{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            std::process::id()
        );
        let root = std::path::absolute(parent.join(name))?;
        fs::DirBuilder::new().mode(0o700).create(&root)?;
        let scratch = Scratch { root, keep: false };
        fs::DirBuilder::new()
            .mode(0o700)
            .create(scratch.socket_dir())?;
        // The server reads its configuration from here: only its owner may change it.
        fs::write(scratch.hba_file(), HBA)?;
        fs::set_permissions(scratch.hba_file(), fs::Permissions::from_mode(0o600))?;
        if let Some(u) = owner {
            chown_tree(&scratch.root, u)?;
        }
        Ok(scratch)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }
    pub fn hba_file(&self) -> PathBuf {
        self.root.join("pg_hba.conf")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("postgres.log")
    }
    pub fn tablespace_dir(&self, oid: u32) -> PathBuf {
        self.root.join("tablespaces").join(oid.to_string())
    }

    /// Keep the directory when dropped (`--keep`).
    pub fn keep(&mut self, keep: bool) {
        self.keep = keep;
    }
}

/// Only the private socket directory is trusted: it is 0700, so only the server's OS user
/// (and root) can reach it. TCP on 127.0.0.1 is open but no line lets anyone in through it.
const HBA: &str = "# pitr drill: the private socket directory only\nlocal all all trust\n";

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        self.end_prefetch();
        // A restore cancelled mid-way may still be finishing a file on its blocking thread:
        // retry while it winds down.
        for attempt in 0..50 {
            match fs::remove_dir_all(&self.root) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if attempt == 49 => {
                    tracing::error!(dir = %self.root.display(), error = %e, "cannot remove the drill's scratch directory");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Scratch {
    /// The server's `archive-get` may have started a prefetch worker (docs/prefetch.md); it
    /// exits, removing its spool, once no signal file says recovery is running. Waits a moment
    /// for that, so that no process of the drill outlives it.
    fn end_prefetch(&self) {
        let data = self.data_dir();
        let _ = fs::remove_file(data.join("recovery.signal"));
        let _ = fs::remove_file(data.join("standby.signal"));
        let spool = data.join("pg_wal").join(SPOOL_DIR);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while spool.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Gives `path` and everything below it to `owner` (symlinks themselves, not their targets).
pub fn chown_tree(path: &Path, owner: &ServerUser) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), owner)?;
        }
    }
    Ok(())
}

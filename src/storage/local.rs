//! The local-directory backend: the zero-set-up default, and a production backend.
//!
//! Durability follows the classic recipe: write a temporary file in the destination directory,
//! fsync it, publish it under its final name, fsync the directory. `put_if_absent` publishes
//! with `link(2)`, which fails when the name exists, so an existing object is never replaced,
//! even by a concurrent writer. Temporary files start with [`TMP_PREFIX`] and are never listed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Backend, ObjectInfo, Result, StorageError};

pub const TMP_PREFIX: &str = ".tmp.";

#[derive(Clone, Debug)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    pub fn new(root: PathBuf) -> LocalBackend {
        LocalBackend { root }
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        let rel = Path::new(key);
        let ok = !key.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(StorageError::Permanent {
                op: "resolve",
                key: key.into(),
                message: "invalid object key".into(),
            });
        }
        Ok(self.root.join(rel))
    }
}

fn io_err(op: &'static str, key: &str, e: io::Error) -> StorageError {
    match e.kind() {
        io::ErrorKind::NotFound => StorageError::NotFound {
            key: key.to_string(),
        },
        io::ErrorKind::AlreadyExists => StorageError::AlreadyExists {
            key: key.to_string(),
        },
        io::ErrorKind::PermissionDenied => StorageError::AccessDenied {
            op,
            key: key.to_string(),
            message: e.to_string(),
        },
        io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            StorageError::Transient {
                op,
                key: key.to_string(),
                message: e.to_string(),
            }
        }
        _ => StorageError::Permanent {
            op,
            key: key.to_string(),
            message: e.to_string(),
        },
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entries changed so that the
/// new directories survive a crash together with the file about to be published in them.
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = vec![];
    let mut cur = dir;
    while !cur.exists() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    fs::create_dir_all(dir)?;
    let owner = repository_owner(cur);
    for d in missing.iter().rev() {
        if let Some(m) = &owner {
            take_owner(d, m);
        }
        if let Some(parent) = d.parent() {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

/// The owner new objects under `dir` must take, when pitr runs as root; `None` otherwise. pitr
/// run as root (a manual `pitr backup`, a scheduled job) must not leave directories or objects
/// that the archiver, running as the PostgreSQL user, can no longer write beside: that would
/// stop WAL archiving. Only root can change an owner, and anyone else creates objects it owns
/// itself, so the usual archive-push pays nothing here.
fn repository_owner(dir: &Path) -> Option<fs::Metadata> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    fs::metadata(dir).ok()
}

/// Gives `path` the owner of the repository directory it was created in (`like`).
fn take_owner(path: &Path, like: &fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = fs::symlink_metadata(path) else {
        return;
    };
    if (m.uid(), m.gid()) != (like.uid(), like.gid()) {
        let _ = std::os::unix::fs::chown(path, Some(like.uid()), Some(like.gid()));
    }
}

/// Creates a fresh temporary file beside `path` (and the directories it needs, durably).
fn create_temp(path: &Path) -> io::Result<(File, PathBuf)> {
    let dir = path.parent().expect("object paths have a parent");
    create_dir_durable(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{name}.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    if let Some(m) = repository_owner(dir) {
        take_owner(&tmp, &m);
    }
    Ok((f, tmp))
}

/// Writes `data` to a fresh temporary file beside `path` and fsyncs it.
fn write_temp(path: &Path, data: &[u8]) -> io::Result<PathBuf> {
    let (mut f, tmp) = create_temp(path)?;
    let res = f.write_all(data).and_then(|_| f.sync_all());
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn put_if_absent_sync(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = write_temp(path, data)?;
    publish_if_absent(path, &tmp)
}

/// Publishes the fsynced temporary file `tmp` as `path` unless `path` exists, and fsyncs the
/// directory so that the new name survives a crash; `tmp` is removed either way.
fn publish_if_absent(path: &Path, tmp: &Path) -> io::Result<()> {
    let linked = fs::hard_link(tmp, path);
    let _ = fs::remove_file(tmp);
    linked?;
    fsync_dir(path.parent().expect("object paths have a parent"))
}

/// An object written to its temporary file piece by piece as it is produced (archive-push's
/// compressed segment), then published as `put_if_absent` does: no object-sized buffer.
/// Durability is the same recipe: [`Self::finish_if_absent`] fsyncs the file before it links
/// it, then the directory. Dropped unfinished, the temporary file is removed.
#[derive(Debug)]
pub struct LocalUpload {
    key: String,
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    /// Bytes appended so far, and how many of them were handed to the kernel's writeback.
    written: u64,
    flushed: u64,
    /// The thread that asks for the writeback, once started.
    writeback: Option<Writeback>,
}

/// A thread that hands ranges of a file to the kernel's writeback (`POSIX_FADV_DONTNEED`
/// starts it without waiting, as PostgreSQL's `pg_flush_data` does where `sync_file_range` is
/// missing; rustix has no `sync_file_range`). Not on the writer's thread: pages still dirty or
/// under writeback cannot be dropped, and for those the kernel drains the page lists of every
/// CPU and waits for it (`lru_add_drain_all`), that is, until the other CPU gets to run its
/// worker: 0.13 ms a call with the other CPU idle (1.1 ms per 16 MiB segment pushed), once 4 ms
/// with it busy (docs/benchmarks.md, round eight). Advice only: durability is the final
/// fsync's, so a request that is late or dropped costs time, never data.
#[derive(Debug)]
struct Writeback {
    ranges: std::sync::mpsc::SyncSender<(u64, u64)>,
}

impl Writeback {
    fn start(file: &File) -> Option<Writeback> {
        let file = file.try_clone().ok()?;
        let (ranges, requests) = std::sync::mpsc::sync_channel::<(u64, u64)>(16);
        std::thread::Builder::new()
            .name("pitr-writeback".into())
            .spawn(move || {
                // Ends when the upload finishes or is dropped (the sender goes).
                for (offset, len) in requests {
                    let len = std::num::NonZeroU64::new(len);
                    let _ = rustix::fs::fadvise(&file, offset, len, rustix::fs::Advice::DontNeed);
                }
            })
            .ok()?;
        Some(Writeback { ranges })
    }
}

/// Appended bytes between two early-writeback requests (see [`LocalUpload::write`]).
const WRITEBACK_STEP: u64 = 1 << 20;

impl LocalUpload {
    fn create(key: &str, path: PathBuf) -> Result<LocalUpload> {
        let (file, tmp) = create_temp(&path).map_err(|e| io_err("put", key, e))?;
        Ok(LocalUpload {
            key: key.to_string(),
            path,
            tmp,
            file: Some(file),
            written: 0,
            flushed: 0,
            writeback: None,
        })
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("open until finished")
    }

    /// Appends `data` at the end of what was written (one `write` per call, as a rule).
    ///
    /// Every [`WRITEBACK_STEP`] the bytes written since are handed to the kernel's writeback
    /// (by a [`Writeback`] thread), so that the device writes while the caller compresses the
    /// next blocks and the final fsync waits only for the tail.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        (&mut self.file())
            .write_all(data)
            .map_err(|e| self.err(e))?;
        self.written += data.len() as u64;
        if self.written - self.flushed >= WRITEBACK_STEP {
            if self.writeback.is_none() {
                self.writeback = Writeback::start(self.file());
            }
            if let Some(w) = &self.writeback {
                // A full queue means the thread is behind: the fsync writes the rest.
                let _ = w
                    .ranges
                    .try_send((self.flushed, self.written - self.flushed));
            }
            self.flushed = self.written;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, over what was written there (a header filled in last).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file()
            .write_all_at(data, offset)
            .map_err(|e| self.err(e))
    }

    /// Makes the file durable and publishes it under its key unless an object is there
    /// (`AlreadyExists`, as `put_if_absent`). Blocking: call it off the async threads.
    pub fn finish_if_absent(mut self) -> Result<()> {
        self.writeback = None;
        // A failed fsync leaves the file open: dropping `self` then removes it.
        self.file().sync_all().map_err(|e| self.err(e))?;
        self.file = None;
        publish_if_absent(&self.path, &self.tmp).map_err(|e| self.err(e))
    }

    fn err(&self, e: io::Error) -> StorageError {
        io_err("put", &self.key, e)
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        // Unfinished (a failed read or write): the object is not published.
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn put_overwrite_sync(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = write_temp(path, data)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(path.parent().expect("object paths have a parent"))
}

fn list_sync(root: &Path, dir: &Path, out: &mut Vec<ObjectInfo>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(TMP_PREFIX) {
            continue;
        }
        let ft = entry.file_type()?;
        if ft.is_dir() {
            list_sync(root, &entry.path(), out)?;
        } else if ft.is_file() {
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("walk stays under root")
                .to_path_buf();
            let key = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push(ObjectInfo {
                key,
                size: entry.metadata()?.len(),
            });
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("storage I/O task panicked")
}

#[async_trait]
impl Backend for LocalBackend {
    fn upload(&self, key: &str) -> Option<Result<LocalUpload>> {
        Some(self.path_of(key).and_then(|p| LocalUpload::create(key, p)))
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path_of(key)?;
        blocking(move || put_if_absent_sync(&path, &data))
            .await
            .map_err(|e| io_err("put", key, e))
    }

    async fn put_overwrite(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path_of(key)?;
        blocking(move || put_overwrite_sync(&path, &data))
            .await
            .map_err(|e| io_err("put", key, e))
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.get_into(key, Vec::new()).await.map(Bytes::from)
    }

    async fn get_into(&self, key: &str, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        let path = self.path_of(key)?;
        blocking(move || {
            let mut f = fs::File::open(path)?;
            buf.clear();
            buf.reserve(f.metadata()?.len() as usize);
            f.read_to_end(&mut buf)?;
            Ok(buf)
        })
        .await
        .map_err(|e| io_err("get", key, e))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path_of(key)?;
        match blocking(move || fs::metadata(path)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let root = self.root.clone();
        let dir = self.root.join(prefix.trim_end_matches('/'));
        let mut objects = blocking(move || {
            let mut out = vec![];
            list_sync(&root, &dir, &mut out).map(|_| out)
        })
        .await
        .map_err(|e| io_err("list", prefix, e))?;
        objects.retain(|o| o.key.starts_with(prefix));
        Ok(objects)
    }

    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.root.join(prefix.trim_end_matches('/'));
        let res = blocking(move || -> io::Result<Vec<String>> {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
                Err(e) => return Err(e),
            };
            let mut out = vec![];
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    out.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            Ok(out)
        })
        .await;
        res.map_err(|e| io_err("list", prefix, e))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        let res = blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
            fsync_dir(path.parent().expect("object paths have a parent"))
        })
        .await;
        res.map_err(|e| io_err("delete", key, e))
    }

    async fn check_reachable(&self) -> Result<()> {
        // A missing directory is fine: the first write creates it. A file in its place is not.
        let root = self.root.clone();
        let key = self.root.display().to_string();
        match blocking(move || fs::metadata(root)).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(StorageError::Permanent {
                op: "open",
                key,
                message: "the repository path exists but is not a directory".into(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("open", &key, e)),
        }
    }
}

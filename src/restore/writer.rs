//! Writing a backup's archives into place: parts are fetched a few at a time ahead of the
//! writer (a bounded number of stored bytes, so memory stays flat whatever the backup size) and
//! handed over a bounded channel to [`super::pipeline`], where one thread decodes and checks
//! each while another writes the files of the one before directly into place. No file is
//! staged; every byte is checked twice: by the object checksum when decoded and by the manifest
//! checksum when written. Used by a full restore and by the restore of an incremental chain,
//! which wraps [`FileWriter`].

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use futures::future::{self, BoxFuture, Either};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::delta::Delta;
use super::durable::{SyncHandle, FLUSH_EVERY};
use super::error::RestoreError;
use super::pipeline;
use crate::format::archive_check::{ArchiveSink, FileSum, Mismatch};
use crate::format::manifest;
use crate::format::tar::{EntryKind, TarHeader};
use crate::repo::{BackupArchive, FetchedPart, Repository, Result as RepoResult};
use crate::storage::BufferPool;

/// Parts fetched ahead of the writer: at most this many stored bytes (each part's size is
/// listed first), and at most [`PREFETCH_PARTS_MAX`] parts. A fetched part holds its stored
/// (compressed) bytes only, never more than its content; it is decoded when the writer reaches
/// it. So restore memory is bounded by a few parts (two decoded, 8 MiB of content each, 16 MiB
/// in backups of older pitr) and this budget, whatever the backup size.
const PREFETCH_BYTES: u64 = 8 << 20;
/// Requests in flight at once. 20 ms from an object store a part's GET (a round trip, then its
/// bytes) takes longer than the writer's ~14-20 ms per 8 MiB part: with 2 restore ran at
/// 0.53-0.67x its 0 ms rate, with 4 at 0.60-0.77x, with up to 8 within the byte budget at
/// 0.77-0.88x (docs/benchmarks.md, "Round eleven"). Without the budget 8 held up to 8 of the
/// largest parts (indexes: 3.2 MB stored where table parts take 0.5): 69 MiB peak RSS.
const PREFETCH_PARTS_MAX: usize = 8;

pub(super) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses a directory that exists and is not empty. Called before planning writes anything.
pub fn check_target_dir(dir: &Path) -> Result<(), RestoreError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(RestoreError::NotEmpty {
                    path: dir.to_path_buf(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RestoreError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

pub(super) fn create_private_dir(dir: &Path) -> Result<(), RestoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_at(dir))?;
    // PostgreSQL refuses a data directory readable by others.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_at(dir))
}

/// Joins a tar entry path under `root`, refusing anything that could escape it.
pub(super) fn safe_join(root: &Path, entry: &str) -> Result<PathBuf, RestoreError> {
    let rel = Path::new(entry);
    if entry.is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(RestoreError::UnsafePath {
            path: entry.to_string(),
        });
    }
    Ok(root.join(rel))
}

/// Writes the entries of a backup's archives into place as they are read. Owns all its state
/// so it can move to the blocking thread that writes each archive.
pub(super) struct FileWriter {
    /// Where the current archive's entries go: the data directory or a tablespace's directory.
    pub root: PathBuf,
    /// Tablespace relocations: old location → new directory.
    pub links: HashMap<String, PathBuf>,
    current: Option<OpenFile>,
    pub syncer: SyncHandle,
    /// Set for a delta restore: what may stay, and what the backup has.
    pub delta: Option<Delta>,
    pub written_files: u64,
    pub written_bytes: u64,
    /// A delta restore's buffer for the bytes already on disk.
    scratch: Vec<u8>,
}

struct OpenFile {
    file: File,
    path: PathBuf,
    len: u64,
    /// Length when the last flush was asked for.
    flushed: u64,
    /// Delta restore: the file was already there with the right size, and every byte so far
    /// equals the backup's, so nothing has been written to it yet.
    same: bool,
}

impl FileWriter {
    pub(super) fn new(
        root: PathBuf,
        links: HashMap<String, PathBuf>,
        syncer: SyncHandle,
        delta: Option<Delta>,
    ) -> FileWriter {
        FileWriter {
            root,
            links,
            current: None,
            syncer,
            delta,
            written_files: 0,
            written_bytes: 0,
            scratch: vec![],
        }
    }

    /// What the writer did; drops its sync handle.
    pub(super) fn into_results(self) -> (Option<Delta>, u64, u64) {
        (self.delta, self.written_files, self.written_bytes)
    }

    fn create_file(&mut self, path: PathBuf) -> Result<(), RestoreError> {
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_at(parent))?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_at(&path))?;
        self.current = Some(OpenFile {
            file,
            path,
            len: 0,
            flushed: 0,
            same: false,
        });
        Ok(())
    }

    /// Delta restore: a file of the right size is already at `path`; its bytes are compared
    /// with the backup's as they arrive and rewritten from the first difference on. A byte
    /// comparison, not the manifest's CRC-32C: files that end with a CRC-32C of their own
    /// content (`pg_control`, `pg_filenode.map`) all have the same CRC-32C.
    fn compare_file(&mut self, path: PathBuf) -> Result<(), RestoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        self.current = Some(OpenFile {
            file,
            path,
            len: 0,
            flushed: 0,
            same: true,
        });
        Ok(())
    }

    /// pg_tblspc/<oid> links: point relocated tablespaces at their new home.
    fn create_link(&self, link_target: &str, path: &Path) -> Result<(), RestoreError> {
        let target = self
            .links
            .get(link_target)
            .cloned()
            .unwrap_or_else(|| link_target.into());
        std::os::unix::fs::symlink(&target, path).map_err(io_at(path))
    }
}

impl ArchiveSink for FileWriter {
    type Error = RestoreError;

    fn entry(&mut self, h: &TarHeader) -> Result<(), RestoreError> {
        let path = safe_join(&self.root, &h.path)?;
        if let Some(d) = &mut self.delta {
            let dir = h.kind == EntryKind::Directory;
            d.see(&path, dir);
            if h.kind == EntryKind::File && d.same_size(&path, h.size)? {
                return self.compare_file(path);
            }
            d.clear(&path, dir)?;
        }
        match h.kind {
            EntryKind::Directory => create_private_dir(&path),
            EntryKind::File => self.create_file(path),
            EntryKind::Symlink => self.create_link(&h.link_target, &path),
            EntryKind::Other(_) => Ok(()),
        }
    }

    fn data(&mut self, d: &[u8]) -> Result<(), RestoreError> {
        let Some(f) = &mut self.current else {
            return Ok(());
        };
        if f.same {
            self.scratch.resize(d.len(), 0);
            f.file
                .read_exact_at(&mut self.scratch, f.len)
                .map_err(io_at(&f.path))?;
            if self.scratch[..] == *d {
                f.len += d.len() as u64;
                return Ok(());
            }
            f.same = false;
        }
        f.file.write_all_at(d, f.len).map_err(io_at(&f.path))?;
        f.len += d.len() as u64;
        self.written_bytes += d.len() as u64;
        if f.len - f.flushed >= FLUSH_EVERY {
            self.syncer.flush(&f.file, &f.path);
            f.flushed = f.len;
        }
        Ok(())
    }

    /// Each file is checked against the manifest as soon as it is written.
    fn file_end(&mut self, _: &FileSum, verdict: Result<(), Mismatch>) -> Result<(), RestoreError> {
        verdict.map_err(mismatch_error)?;
        match self.current.take() {
            Some(f) if f.same => {
                if let Some(d) = &mut self.delta {
                    d.kept(f.len);
                }
            }
            Some(f) => {
                self.written_files += 1;
                self.syncer.done(f.file, f.path);
            }
            // Not a file pitr writes (a delta restore's kept entries all are).
            None => {}
        }
        Ok(())
    }
}

pub(super) fn mismatch_error(m: Mismatch) -> RestoreError {
    match m {
        Mismatch::Size {
            path,
            expected,
            actual,
        } => RestoreError::SizeMismatch {
            path,
            expected,
            actual,
        },
        Mismatch::Checksum {
            path,
            expected,
            actual,
        } => RestoreError::ChecksumMismatch {
            path,
            expected: manifest::format_crc32c(expected),
            actual: manifest::format_crc32c(actual),
        },
    }
}

/// [`pipeline::Extraction`] writing files (the pipeline owns the type: it moves it between its
/// threads; this module only names the usual sink).
pub(super) type Extraction<S = FileWriter> = pipeline::Extraction<S>;

/// Fetches the parts of `archive` in order, a few ahead, and feeds them to the writer on a
/// blocking thread; returns the extraction once the whole archive is written.
pub(super) async fn restore_archive<S>(
    repo: &Repository,
    backup_id: &str,
    archive: &BackupArchive,
    extraction: Extraction<S>,
) -> Result<Extraction<S>, RestoreError>
where
    S: ArchiveSink<Error = RestoreError> + Send + 'static,
{
    // Capacity 1: one part is decoded, one waits, the rest are being fetched.
    let (tx, rx) = mpsc::channel::<FetchedPart>(1);
    // Parts' stored bytes go back to be read into again once decoded.
    let pool = extraction.buffers.fetched.clone();
    let writer = pipeline::spawn(archive, extraction, rx);
    let fetched = send_parts(repo, backup_id, archive, tx, &pool).await;
    let written = writer.await.expect("restore writer panicked");
    fetched?;
    written
}

/// Fetches the parts of `archive` ahead of the writer within [`PREFETCH_BYTES`] and
/// [`PREFETCH_PARTS_MAX`], and sends them in order. Stops quietly when the writer has stopped:
/// its error is the one reported.
async fn send_parts(
    repo: &Repository,
    backup_id: &str,
    archive: &BackupArchive,
    tx: mpsc::Sender<FetchedPart>,
    pool: &BufferPool,
) -> Result<(), RestoreError> {
    let average = archive.stored_bytes / u64::from(archive.parts.max(1));
    let fetch = |part: u32, size: u64| -> BoxFuture<'_, (u64, RepoResult<FetchedPart>)> {
        let buf = pool.take_for(size as usize);
        let fetch = repo.fetch_backup_part(backup_id, &archive.name, part, buf);
        Box::pin(async move { (size, fetch.await) })
    };
    let list = repo.backup_part_sizes(backup_id, &archive.name, archive.parts);
    let mut fetching = FuturesOrdered::new();
    let (mut next, mut ahead) = (0usize, 0u64);
    // The first part's GET goes out with the LIST of the sizes: a round trip less, per
    // archive, before the writer has bytes. Its size is not known yet: the average stands in.
    let listed = match archive.parts {
        0 => list.await?,
        _ => {
            (next, ahead) = (1, average);
            match future::select(Box::pin(list), fetch(0, average)).await {
                Either::Left((listed, first)) => {
                    fetching.push_back(first);
                    listed?
                }
                Either::Right((first, list)) => {
                    fetching.push_back(Box::pin(future::ready(first)));
                    list.await?
                }
            }
        }
    };
    let sizes: Vec<u64> = listed.into_iter().map(|s| s.unwrap_or(average)).collect();
    loop {
        while next < sizes.len()
            && fetching.len() < PREFETCH_PARTS_MAX
            && (fetching.is_empty() || ahead + sizes[next] <= PREFETCH_BYTES)
        {
            fetching.push_back(fetch(next as u32, sizes[next]));
            ahead += sizes[next];
            next += 1;
        }
        let Some((size, part)) = fetching.next().await else {
            return Ok(());
        };
        ahead -= size;
        if tx.send(part?).await.is_err() {
            return Ok(());
        }
    }
}

/// Creates the directory a tablespace archive is restored into: its old location, or where
/// `--tablespace-map` moves it.
pub(super) fn tablespace_dir(
    archive: &BackupArchive,
    oid: u32,
    links: &HashMap<String, PathBuf>,
    delta: bool,
) -> Result<PathBuf, RestoreError> {
    let old = archive
        .tablespace_location
        .clone()
        .ok_or(RestoreError::NoTablespaceLocation { oid })?;
    let dir = links
        .get(&old)
        .cloned()
        .unwrap_or_else(|| PathBuf::from(&old));
    if !delta {
        check_target_dir(&dir)?;
    }
    create_private_dir(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::super::durable::Syncer;
    use super::*;
    use crate::format::archive_check::{ArchiveReader, FeedError, Manifest, ManifestCheck};
    use crate::format::manifest::ManifestFile;
    use crate::format::tar::build::{file, header, link, END};

    fn writer(root: &Path, syncer: &Syncer) -> FileWriter {
        FileWriter::new(
            root.to_path_buf(),
            [("/old/ts".to_string(), PathBuf::from("/new/ts"))].into(),
            syncer.handle(),
            None,
        )
    }

    fn write(archive: &[u8], w: &mut FileWriter, manifest: Manifest) -> Result<(), RestoreError> {
        let mut check = ManifestCheck::new(Some(manifest));
        let mut reader = ArchiveReader::new(None);
        for piece in archive.chunks(700) {
            reader.feed(piece, &mut check, w).map_err(|e| match e {
                FeedError::Tar(t) => panic!("{t}"),
                FeedError::Sink(e) => e,
            })?;
        }
        reader.finish().unwrap();
        Ok(())
    }

    #[test]
    fn writes_files_links_and_directories_and_checks_each_file() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start();
        let mut a = header("global", b'5', 0).to_vec();
        a.extend_from_slice(&file("global/pg_control", &[7u8; 1500]));
        a.extend_from_slice(&header("pg_tblspc", b'5', 0));
        a.extend_from_slice(&link("pg_tblspc/16384", "/old/ts"));
        a.extend_from_slice(&END);
        let want = ManifestFile {
            size: 1500,
            crc32c: Some(crc32c::crc32c(&[7u8; 1500])),
        };
        let manifest: Manifest = [("global/pg_control".to_string(), want.clone())].into();
        write(&a, &mut writer(dir.path(), &syncer), manifest).unwrap();
        let control = dir.path().join("global/pg_control");
        assert_eq!(fs::read(&control).unwrap(), vec![7u8; 1500]);
        assert_eq!(fs::metadata(&control).unwrap().mode() & 0o777, 0o600);
        let target = fs::read_link(dir.path().join("pg_tblspc/16384")).unwrap();
        assert_eq!(target, PathBuf::from("/new/ts"));

        let other = tempfile::tempdir().unwrap();
        let bad = [(
            "global/pg_control".to_string(),
            ManifestFile {
                crc32c: Some(1),
                ..want
            },
        )];
        let e = write(&a, &mut writer(other.path(), &syncer), bad.into()).unwrap_err();
        assert!(
            matches!(&e, RestoreError::ChecksumMismatch { path, .. } if path == "global/pg_control"),
            "{e}"
        );
        syncer.finish(&[dir.path().to_path_buf()]).unwrap();
    }

    #[test]
    fn delta_rewrites_only_files_that_differ() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start();
        fs::create_dir_all(dir.path().join("global")).unwrap();
        let mut old = vec![7u8; 1500];
        old[1000] = 1;
        fs::write(dir.path().join("global/pg_control"), &old).unwrap();
        fs::write(dir.path().join("global/1262"), [2u8; 1500]).unwrap();
        let mut a = header("global", b'5', 0).to_vec();
        a.extend_from_slice(&file("global/1262", &[2u8; 1500]));
        a.extend_from_slice(&file("global/pg_control", &[7u8; 1500]));
        a.extend_from_slice(&END);
        let entry = |b: u8| ManifestFile {
            size: 1500,
            crc32c: Some(crc32c::crc32c(&[b; 1500])),
        };
        let manifest: Manifest = [
            ("global/pg_control".to_string(), entry(7)),
            ("global/1262".to_string(), entry(2)),
        ]
        .into();
        let mut w = writer(dir.path(), &syncer);
        w.delta = Some(Delta::default());
        write(&a, &mut w, manifest).unwrap();
        let (delta, files, bytes) = w.into_results();
        // Rewritten from the piece with the first difference on.
        assert_eq!(files, 1);
        assert!(bytes > 0 && bytes <= 1500 - 1000 + 700, "{bytes}");
        assert_eq!(delta.unwrap().kept_files, 1);
        assert_eq!(
            fs::read(dir.path().join("global/pg_control")).unwrap(),
            vec![7u8; 1500]
        );
        syncer.finish(&[dir.path().to_path_buf()]).unwrap();
    }

    #[test]
    fn refuses_entries_outside_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start();
        let mut a = file("../escaped", b"x");
        a.extend_from_slice(&END);
        let e = write(&a, &mut writer(dir.path(), &syncer), Manifest::new()).unwrap_err();
        assert!(
            matches!(&e, RestoreError::UnsafePath { path } if path == "../escaped"),
            "{e}"
        );
        assert!(!dir.path().parent().unwrap().join("escaped").exists());
    }
}

//! Carrying out a [`RestorePlan`]: lay the backup out, verify it, write recovery settings.
//!
//! Parts are fetched and decoded a few at a time ahead of the extractor (bounded, so memory
//! stays flat whatever the backup size) and handed over a bounded channel to one blocking thread
//! that writes files directly into place. No file is staged; every byte is checked twice: by the
//! object checksum when fetched and by the manifest checksum when written.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::chain;
use super::delta::{self, Delta};
use super::durable::{SyncHandle, Syncer, FLUSH_EVERY};
use super::recovery_conf;
use crate::format::archive_check::{
    ArchiveReader, ArchiveSink, FeedError, FileSum, Manifest, ManifestCheck, Mismatch, Outcome,
};
use crate::format::manifest;
use crate::format::tar::{EntryKind, TarHeader};
use crate::recovery::RestorePlan;

use super::error::RestoreError;
use crate::repo::{BackupArchive, BackupInfo, RepoError, Repository};

/// Parts fetched and decoded ahead of the writer. Each is at most one backup part (16 MiB) raw
/// plus its compressed copy, so this bounds restore memory at roughly 4 × 32 MiB.
const PREFETCH_PARTS: usize = 3;

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    /// Tablespace relocations: old location (as on the source server) → new directory.
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// The full restore_command to write; built by the caller so it can name the binary and the
    /// repository or config file exactly as the user gave them.
    pub restore_command: String,
    /// Restore into an existing, stopped data directory, rewriting only what differs
    /// (`--delta`, see [`super::delta`]).
    pub delta: bool,
}

#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    /// Files and bytes of the backup.
    pub files: u64,
    pub bytes: u64,
    /// Of those, written; the rest were already in place (delta restore).
    pub written_files: u64,
    pub written_bytes: u64,
    pub kept_files: u64,
    pub kept_bytes: u64,
    /// Files, links and directories a delta restore removed: not in the backup.
    pub removed: u64,
    /// Files reconstructed from the blocks of an incremental chain.
    pub rebuilt_files: u64,
    pub seconds: f64,
}

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
    fn into_results(self) -> (Option<Delta>, u64, u64) {
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

/// What the writer thread needs, moved to it for each archive and back.
pub(super) struct Extraction<S = FileWriter> {
    pub check: ManifestCheck,
    pub writer: S,
}

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
    // Capacity 1: the writer holds one part, one waits, PREFETCH_PARTS are being fetched.
    let (tx, rx) = mpsc::channel::<Vec<u8>>(1);
    let writer = spawn_writer(archive, extraction, rx);
    let fetched = send_parts(repo, backup_id, archive, tx).await;
    let written = writer.await.expect("restore writer panicked");
    fetched?;
    written
}

/// Writes the parts received on `rx`, on a blocking thread.
fn spawn_writer<S>(
    archive: &BackupArchive,
    mut ex: Extraction<S>,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> tokio::task::JoinHandle<Result<Extraction<S>, RestoreError>>
where
    S: ArchiveSink<Error = RestoreError> + Send + 'static,
{
    let name = archive.name.clone();
    let mut reader = ArchiveReader::new(archive.tablespace_oid);
    let tar_error = |name: &str, source| RestoreError::Tar {
        archive: name.to_string(),
        source,
    };
    tokio::task::spawn_blocking(move || {
        while let Some(chunk) = rx.blocking_recv() {
            reader
                .feed(&chunk, &mut ex.check, &mut ex.writer)
                .map_err(|e| match e {
                    FeedError::Tar(source) => tar_error(&name, source),
                    FeedError::Sink(e) => e,
                })?;
        }
        reader.finish().map_err(|source| tar_error(&name, source))?;
        Ok(ex)
    })
}

/// Fetches and verifies the parts of `archive`, a few ahead, and sends them in order. Stops
/// quietly when the writer has stopped: its error is the one reported.
async fn send_parts(
    repo: &Repository,
    backup_id: &str,
    archive: &BackupArchive,
    tx: mpsc::Sender<Vec<u8>>,
) -> Result<(), RestoreError> {
    let mut parts = futures::stream::iter(0..archive.parts)
        .map(|i| repo.backup_part(backup_id, &archive.name, i))
        .buffered(PREFETCH_PARTS);
    while let Some(part) = parts.next().await {
        if tx.send(part?).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// When run as root, hands the restored tree to the owner of the (pre-created) target directory:
/// PostgreSQL refuses to start on a data directory it does not own.
fn chown_tree(root: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(root, Some(uid), Some(gid))?;
    if fs::symlink_metadata(root)?.is_dir() {
        for e in fs::read_dir(root)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Restores `plan` into `opts.pgdata`. The caller has checked the directory with
/// [`check_target_dir`] before planning.
pub async fn execute(
    repo: &Repository,
    plan: &RestorePlan,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    if plan.chain.len() > 1 {
        chain::check_members(repo, &plan.chain).await?;
    }
    let owner = prepare_target(&opts.pgdata, opts.delta)?;
    let manifest = load_manifest(repo, &plan.backup).await?;
    let syncer = Syncer::start();
    let extraction = Extraction {
        writer: FileWriter::new(
            opts.pgdata.clone(),
            opts.tablespace_map.iter().cloned().collect(),
            syncer.handle(),
            opts.delta.then(Delta::default),
        ),
        check: ManifestCheck::new(manifest.clone()),
    };
    let (outcome, relocated, writer, rebuilt) =
        write_backup(repo, plan, extraction, manifest.as_ref()).await?;
    // The writer's sync handle goes here: the syncer finishes only once every handle is gone.
    let (delta, written_files, written_bytes) = writer.into_results();
    check_complete(&outcome)?;
    let removed = match delta {
        Some(mut d) => {
            d.remove_unseen(&opts.pgdata, true)?;
            for (_, dir) in &relocated {
                d.remove_unseen(dir, false)?;
            }
            tracing::info!(kept = d.kept_files, removed = d.removed, "delta restore");
            Some(d)
        }
        None => None,
    };
    finish_layout(&opts.pgdata, plan, opts, &relocated)?;
    let roots: Vec<PathBuf> = std::iter::once(opts.pgdata.clone())
        .chain(relocated.iter().map(|(_, d)| d.clone()))
        .collect();
    make_durable(syncer, roots, owner).await?;
    let d = removed.unwrap_or_default();
    Ok(RestoreReport {
        files: outcome.files,
        bytes: outcome.bytes,
        written_files,
        written_bytes,
        kept_files: d.kept_files,
        kept_bytes: d.kept_bytes,
        removed: d.removed,
        rebuilt_files: rebuilt,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes the backup (or, for an incremental one, its chain) into place; returns what was
/// read, where each tablespace went, the writer, and how many files were reconstructed from
/// incremental entries (each checked against the manifest).
async fn write_backup(
    repo: &Repository,
    plan: &RestorePlan,
    extraction: Extraction,
    manifest: Option<&Manifest>,
) -> Result<(Outcome, Vec<(u32, PathBuf)>, FileWriter, u64), RestoreError> {
    if plan.chain.len() <= 1 {
        let (outcome, relocated, writer) = restore_archives(repo, &plan.backup, extraction).await?;
        return Ok((outcome, relocated, writer, 0));
    }
    let mut done = chain::restore_chain(repo, &plan.chain, extraction).await?;
    chain::check_rebuilt(&done.rebuilt, manifest, &mut done.outcome)?;
    Ok((
        done.outcome,
        done.relocated,
        done.writer,
        done.rebuilt.len() as u64,
    ))
}

/// Creates the data directory; returns who owns it, if it existed: the user may have prepared
/// it for the server's account. A delta restore takes an existing directory whose server is
/// stopped.
fn prepare_target(pgdata: &Path, delta: bool) -> Result<Option<(u32, u32)>, RestoreError> {
    if delta {
        delta::check_stopped(pgdata)?;
    } else {
        check_target_dir(pgdata)?;
    }
    // Remember who owns the directory the user prepared, before we create anything.
    let owner = fs::metadata(pgdata).ok().map(|m| (m.uid(), m.gid()));
    create_private_dir(pgdata)?;
    Ok(owner)
}

async fn load_manifest(
    repo: &Repository,
    backup: &BackupInfo,
) -> Result<Option<Manifest>, RestoreError> {
    if !backup.manifest {
        return Ok(None);
    }
    let raw = repo.backup_manifest(&backup.id).await?.ok_or_else(|| {
        RestoreError::Repo(RepoError::Storage(crate::storage::StorageError::NotFound {
            key: repo.backup_manifest_key(&backup.id),
        }))
    })?;
    Ok(Some(manifest::parse(&raw)?))
}

/// Writes every archive into place, in order; returns what was read, where each tablespace
/// went, and the writer (its counts).
async fn restore_archives(
    repo: &Repository,
    backup: &BackupInfo,
    mut ex: Extraction,
) -> Result<(Outcome, Vec<(u32, PathBuf)>, FileWriter), RestoreError> {
    let pgdata = ex.writer.root.clone();
    let mut relocated: Vec<(u32, PathBuf)> = vec![];
    for archive in &backup.archives {
        ex.writer.root = match archive.tablespace_oid {
            None => pgdata.clone(),
            Some(oid) => {
                let delta = ex.writer.delta.is_some();
                let dir = tablespace_dir(archive, oid, &ex.writer.links, delta)?;
                relocated.push((oid, dir.clone()));
                dir
            }
        };
        let (files, bytes) = (ex.check.files(), ex.check.bytes());
        ex = restore_archive(repo, &backup.id, archive, ex).await?;
        let (files, bytes) = (ex.check.files() - files, ex.check.bytes() - bytes);
        tracing::info!(archive = %archive.name, files, bytes, "restored archive");
    }
    Ok((ex.check.finish(), relocated, ex.writer))
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

/// Every file the manifest lists must have arrived.
fn check_complete(outcome: &Outcome) -> Result<(), RestoreError> {
    if let Some(example) = outcome.missing.first() {
        return Err(RestoreError::MissingFiles {
            count: outcome.missing.len(),
            example: example.clone(),
        });
    }
    // The server lists every file it sends; an unlisted one was written unchecked, not lost.
    if let Some(example) = outcome.extra.first() {
        tracing::warn!(count = outcome.extra.len(), %example, "files in the backup are not in its manifest");
    }
    Ok(())
}

/// Hands the tree to the directory's owner when run as root, then waits until everything
/// written is on disk: a crash after "restored" must not leave a half-written tree.
async fn make_durable(
    syncer: Syncer,
    roots: Vec<PathBuf>,
    owner: Option<(u32, u32)>,
) -> Result<(), RestoreError> {
    if is_root() {
        if let Some((uid, gid)) = owner.filter(|&(uid, _)| uid != 0) {
            for dir in &roots {
                chown_tree(dir, uid, gid).map_err(io_at(dir))?;
            }
        }
    }
    tokio::task::spawn_blocking(move || syncer.finish(&roots))
        .await
        .expect("sync task panicked")
}

/// pg_wal, tablespace_map, signal file and recovery settings.
fn finish_layout(
    pgdata: &Path,
    plan: &RestorePlan,
    opts: &RestoreOptions,
    relocated: &[(u32, PathBuf)],
) -> Result<(), RestoreError> {
    // BASE_BACKUP sends pg_wal empty (or not at all); PostgreSQL needs it and archive_status.
    create_private_dir(&pgdata.join("pg_wal").join("archive_status"))?;

    // With TABLESPACE_MAP the server lists tablespaces in tablespace_map instead of sending
    // symlinks; PostgreSQL recreates the links from it, so relocations are written there.
    let map_path = pgdata.join("tablespace_map");
    if !relocated.is_empty() && map_path.exists() {
        let lines: String = relocated
            .iter()
            .map(|(oid, dir)| format!("{oid} {}\n", dir.display()))
            .collect();
        fs::write(&map_path, lines).map_err(io_at(&map_path))?;
    }

    let signal = pgdata.join(if plan.standby {
        "standby.signal"
    } else {
        "recovery.signal"
    });
    File::create(&signal).map_err(io_at(&signal))?;
    let auto_conf = pgdata.join("postgresql.auto.conf");
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&auto_conf)
        .map_err(io_at(&auto_conf))?;
    f.write_all(recovery_conf::settings_block(plan, &opts.restore_command).as_bytes())
        .map_err(io_at(&auto_conf))?;
    // These few small files are written last, after the background sync has started draining.
    for p in [&map_path, &signal, &auto_conf] {
        if p.exists() {
            File::open(p).and_then(|f| f.sync_all()).map_err(io_at(p))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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

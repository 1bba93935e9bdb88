//! Carrying out a [`RestorePlan`]: lay the backup out, verify it, write recovery settings.
//!
//! Parts are fetched and decoded a few at a time ahead of the extractor (bounded, so memory
//! stays flat whatever the backup size) and handed over a bounded channel to one blocking thread
//! that writes files directly into place. No file is staged; every byte is checked twice: by the
//! object checksum when fetched and by the manifest checksum when written.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;

use super::durable::{SyncHandle, Syncer, FLUSH_EVERY};
use super::recovery_conf;
use crate::error::{Classify, Code};
use crate::format::manifest::{self, ManifestFile};
use crate::format::tar::{EntryKind, TarError, TarEvent, TarReader};
use crate::recovery::RestorePlan;
use crate::repo::{BackupArchive, RepoError, Repository};

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
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    #[error("{path} is not empty; restore needs an empty or missing directory")]
    NotEmpty { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("backup archive {archive}: {source}")]
    Tar { archive: String, source: TarError },
    #[error("backup entry {path:?} would be written outside the target directory")]
    UnsafePath { path: String },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(
        "{path}: checksum mismatch against the backup manifest (expected {expected}, got {actual})"
    )]
    ChecksumMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: size {actual} differs from the backup manifest's {expected}")]
    SizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{count} file(s) listed in the backup manifest were not in the backup, e.g. {example}"
    )]
    MissingFiles { count: usize, example: String },
    #[error("tablespace {oid} has no location recorded; pass --tablespace-map OLD=NEW")]
    NoTablespaceLocation { oid: u32 },
}

impl Classify for RestoreError {
    fn code(&self) -> Code {
        match self {
            RestoreError::Repo(e) => e.code(),
            RestoreError::NotEmpty { .. } => Code::RestoreRefused,
            RestoreError::NoTablespaceLocation { .. } => Code::Input,
            RestoreError::Io { .. }
            | RestoreError::Tar { .. }
            | RestoreError::UnsafePath { .. }
            | RestoreError::Manifest(_)
            | RestoreError::ChecksumMismatch { .. }
            | RestoreError::SizeMismatch { .. }
            | RestoreError::MissingFiles { .. } => Code::JobFailed,
        }
    }

    fn hint(&self) -> Option<String> {
        let hint = match self {
            RestoreError::Repo(e) => return e.hint(),
            RestoreError::NotEmpty { .. } => {
                "restore into a new directory, or empty this one if you really mean to replace it"
            }
            RestoreError::NoTablespaceLocation { .. } => return None,
            RestoreError::Io { .. }
            | RestoreError::Tar { .. }
            | RestoreError::UnsafePath { .. }
            | RestoreError::Manifest(_)
            | RestoreError::ChecksumMismatch { .. }
            | RestoreError::SizeMismatch { .. }
            | RestoreError::MissingFiles { .. } => {
                "the target directory is incomplete: empty it before retrying; `pitr verify` checks the repository"
            }
        };
        Some(hint.into())
    }
}

#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    pub files: u64,
    pub bytes: u64,
    pub seconds: f64,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RestoreError + '_ {
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

fn create_private_dir(dir: &Path) -> Result<(), RestoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_at(dir))?;
    // PostgreSQL refuses a data directory readable by others.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_at(dir))
}

/// Joins a tar entry path under `root`, refusing anything that could escape it.
fn safe_join(root: &Path, entry: &str) -> Result<PathBuf, RestoreError> {
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

/// Writes one tar stream under `root`, checking each file against the manifest as it is
/// written (manifest paths are relative to the data directory, so tablespace entries are looked
/// up under `manifest_prefix`). Owns all its state so it can move to a blocking thread.
struct ArchiveExtractor {
    archive: String,
    root: PathBuf,
    manifest_prefix: String,
    expected: Arc<HashMap<String, ManifestFile>>,
    links: Arc<HashMap<String, PathBuf>>,
    reader: TarReader,
    current: Option<OpenFile>,
    seen: HashSet<String>,
    files: u64,
    bytes: u64,
    syncer: SyncHandle,
}

struct OpenFile {
    file: File,
    manifest_path: String,
    crc: u32,
    len: u64,
    /// Length when the last flush was asked for.
    flushed: u64,
}

impl ArchiveExtractor {
    fn feed(&mut self, chunk: &[u8]) -> Result<(), RestoreError> {
        let mut reader = std::mem::take(&mut self.reader);
        let res = reader.feed(chunk, &mut |ev| self.on_event(ev));
        self.reader = reader;
        res.map_err(|e| match e {
            RestoreError::Tar { source, .. } => RestoreError::Tar {
                archive: self.archive.clone(),
                source,
            },
            other => other,
        })
    }

    fn finish(self) -> Result<Self, RestoreError> {
        self.reader.finish().map_err(|source| RestoreError::Tar {
            archive: self.archive.clone(),
            source,
        })?;
        Ok(self)
    }

    fn on_event(&mut self, ev: TarEvent<'_>) -> Result<(), RestoreError> {
        match ev {
            TarEvent::Entry(h) => {
                let path = safe_join(&self.root, &h.path)?;
                match h.kind {
                    EntryKind::Directory => create_private_dir(&path)?,
                    EntryKind::File => {
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
                        let manifest_path = format!("{}{}", self.manifest_prefix, h.path);
                        self.current = Some(OpenFile {
                            file,
                            manifest_path,
                            crc: 0,
                            len: 0,
                            flushed: 0,
                        });
                    }
                    EntryKind::Symlink => {
                        // pg_tblspc/<oid> links: point relocated tablespaces at their new home.
                        let target = self
                            .links
                            .get(&h.link_target)
                            .cloned()
                            .unwrap_or_else(|| h.link_target.clone().into());
                        std::os::unix::fs::symlink(&target, &path).map_err(io_at(&path))?;
                    }
                    EntryKind::Other(_) => {}
                }
            }
            TarEvent::Data(d) => {
                if let Some(f) = &mut self.current {
                    f.file.write_all(d).map_err(|source| RestoreError::Io {
                        path: self.root.join(&f.manifest_path),
                        source,
                    })?;
                    f.crc = crc32c::crc32c_append(f.crc, d);
                    f.len += d.len() as u64;
                    if f.len - f.flushed >= FLUSH_EVERY {
                        self.syncer
                            .flush(&f.file, &self.root.join(&f.manifest_path));
                        f.flushed = f.len;
                    }
                }
            }
            TarEvent::EntryEnd => {
                if let Some(f) = self.current.take() {
                    self.check_against_manifest(&f)?;
                    self.files += 1;
                    self.bytes += f.len;
                    self.syncer.done(f.file, self.root.join(&f.manifest_path));
                    self.seen.insert(f.manifest_path);
                }
            }
        }
        Ok(())
    }

    fn check_against_manifest(&self, f: &OpenFile) -> Result<(), RestoreError> {
        let Some(exp) = self.expected.get(&f.manifest_path) else {
            return Ok(());
        };
        if exp.size != f.len {
            return Err(RestoreError::SizeMismatch {
                path: f.manifest_path.clone(),
                expected: exp.size,
                actual: f.len,
            });
        }
        match exp.crc32c {
            Some(want) if want != f.crc => Err(RestoreError::ChecksumMismatch {
                path: f.manifest_path.clone(),
                expected: manifest::format_crc32c(want),
                actual: manifest::format_crc32c(f.crc),
            }),
            _ => Ok(()),
        }
    }
}

/// Fetches the parts of `archive` in order, a few ahead, and feeds them to the extractor on a
/// blocking thread; returns the extractor once the whole archive is written.
async fn restore_archive(
    repo: &Repository,
    backup_id: &str,
    archive: &BackupArchive,
    mut extractor: ArchiveExtractor,
) -> Result<ArchiveExtractor, RestoreError> {
    // Capacity 1: the writer holds one part, one waits, PREFETCH_PARTS are being fetched.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
    let writer = tokio::task::spawn_blocking(move || -> Result<ArchiveExtractor, RestoreError> {
        while let Some(chunk) = rx.blocking_recv() {
            extractor.feed(&chunk)?;
        }
        extractor.finish()
    });
    let mut parts = futures::stream::iter(0..archive.parts)
        .map(|i| repo.backup_part(backup_id, &archive.name, i))
        .buffered(PREFETCH_PARTS);
    let mut fetch_result = Ok(());
    while let Some(part) = parts.next().await {
        match part {
            // A send fails only when the writer stopped on an error, which is reported below.
            Ok(bytes) => {
                if tx.send(bytes).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                fetch_result = Err(RestoreError::from(e));
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.expect("restore writer panicked");
    fetch_result?;
    written
}

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
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
    let backup = &plan.backup;
    check_target_dir(&opts.pgdata)?;
    // Remember who owns the directory the user prepared, before we create anything.
    let owner = fs::metadata(&opts.pgdata).ok().map(|m| (m.uid(), m.gid()));
    create_private_dir(&opts.pgdata)?;

    let expected = if backup.manifest {
        let raw = repo.backup_manifest(&backup.id).await?.ok_or_else(|| {
            RestoreError::Repo(RepoError::Storage(crate::storage::StorageError::NotFound {
                key: format!("backup_manifest of backup {}", backup.id),
            }))
        })?;
        manifest::parse(&raw)?
    } else {
        HashMap::new()
    };
    let expected = Arc::new(expected);
    let links: Arc<HashMap<String, PathBuf>> =
        Arc::new(opts.tablespace_map.iter().cloned().collect());

    let mut report = RestoreReport::default();
    let mut seen: HashSet<String> = HashSet::new();
    let mut relocated: Vec<(u32, PathBuf)> = vec![];
    let syncer = Syncer::start();
    for archive in &backup.archives {
        let (root, manifest_prefix) = match archive.tablespace_oid {
            None => (opts.pgdata.clone(), String::new()),
            Some(oid) => {
                let old = archive
                    .tablespace_location
                    .clone()
                    .ok_or(RestoreError::NoTablespaceLocation { oid })?;
                let dir = links
                    .get(&old)
                    .cloned()
                    .unwrap_or_else(|| PathBuf::from(&old));
                check_target_dir(&dir)?;
                create_private_dir(&dir)?;
                relocated.push((oid, dir.clone()));
                (dir, format!("pg_tblspc/{oid}/"))
            }
        };
        let extractor = ArchiveExtractor {
            archive: archive.name.clone(),
            root,
            manifest_prefix,
            expected: expected.clone(),
            links: links.clone(),
            reader: TarReader::new(),
            current: None,
            seen: HashSet::new(),
            files: 0,
            bytes: 0,
            syncer: syncer.handle(),
        };
        let done = restore_archive(repo, &backup.id, archive, extractor).await?;
        tracing::info!(archive = %archive.name, files = done.files, bytes = done.bytes, "restored archive");
        report.files += done.files;
        report.bytes += done.bytes;
        seen.extend(done.seen);
    }

    // Every file the manifest lists must have arrived.
    let missing: Vec<&String> = expected.keys().filter(|p| !seen.contains(*p)).collect();
    if let Some(example) = missing.first() {
        return Err(RestoreError::MissingFiles {
            count: missing.len(),
            example: (*example).clone(),
        });
    }

    finish_layout(&opts.pgdata, plan, opts, &relocated)?;
    let roots: Vec<PathBuf> = std::iter::once(opts.pgdata.clone())
        .chain(relocated.iter().map(|(_, d)| d.clone()))
        .collect();
    if is_root() {
        if let Some((uid, gid)) = owner.filter(|&(uid, _)| uid != 0) {
            for dir in &roots {
                chown_tree(dir, uid, gid).map_err(io_at(dir))?;
            }
        }
    }
    // Restored means durable: a crash after "restored" must not leave a half-written tree.
    tokio::task::spawn_blocking(move || syncer.finish(&roots))
        .await
        .expect("sync task panicked")?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
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

// The tar reader reports its own errors through the sink's error type; the archive name is
// filled in by `ArchiveExtractor::feed`.
impl From<TarError> for RestoreError {
    fn from(source: TarError) -> Self {
        RestoreError::Tar {
            archive: String::new(),
            source,
        }
    }
}

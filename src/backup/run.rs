use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::task::JoinSet;

use super::{MAX_UPLOADS_IN_FLIGHT, PART_SIZE};
use crate::error::{Classify, Code};
use crate::format::manifest;
use crate::format::tar::{EntryKind, TarError, TarEvent, TarReader};
use crate::pg::{self, BackupEvent, BaseBackupOptions, ConnConfig, ReplicationConn};
use crate::repo::{
    BackupArchive, BackupInfo, ClusterIdentity, RepoError, Repository, WriteOptions,
};
use crate::storage::Storage;
use crate::wal::{Lsn, TimelineId, WalFileName};

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub label: Option<String>,
    pub fast_checkpoint: bool,
    /// How long to wait, after BASE_BACKUP ends, for the WAL it needs to reach the repository
    /// (through archive-push or `pitr stream`).
    pub wal_timeout: Duration,
    pub max_rate_kb: Option<u32>,
    /// Unfinished backups whose lease is older than this are removed before this one starts.
    pub abandoned_after: Duration,
}

/// Reported as the backup runs, for a progress bar.
#[derive(Clone, Debug)]
pub enum BackupProgress {
    Started {
        id: String,
        total_bytes: Option<u64>,
    },
    Bytes {
        done: u64,
    },
    WaitingForWal {
        segment: String,
    },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    #[error(transparent)]
    Pg(#[from] pg::Error),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("the server sent a malformed tar stream in {archive}: {source}")]
    Tar { archive: String, source: TarError },
    #[error("the server's backup manifest is invalid: {0}")]
    Manifest(String),
    #[error(
        "{path}: the bytes received do not match the manifest (expected {expected}, got {actual})"
    )]
    ManifestMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("the backup stream ended early: {what}")]
    Incomplete { what: String },
    #[error("a cleanup declared this backup abandoned while it ran (its lease was not refreshed); nothing was published")]
    Abandoned,
    #[error(
        "WAL segment {segment}, needed to restore this backup, did not reach the repository within {waited:?}; \
         is archive_command set to `pitr archive-push %p` for this repository, or `pitr stream` running?"
    )]
    WalTimeout { segment: String, waited: Duration },
}

impl Classify for BackupError {
    fn code(&self) -> Code {
        match self {
            BackupError::Pg(e) => e.code(),
            BackupError::Repo(e) => e.code(),
            BackupError::Tar { .. }
            | BackupError::Manifest(_)
            | BackupError::ManifestMismatch { .. }
            | BackupError::Incomplete { .. }
            | BackupError::Abandoned
            | BackupError::WalTimeout { .. } => Code::JobFailed,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            BackupError::Pg(e) => e.hint(),
            BackupError::Repo(e) => e.hint(),
            BackupError::Tar { .. }
            | BackupError::Manifest(_)
            | BackupError::ManifestMismatch { .. }
            | BackupError::Incomplete { .. }
            | BackupError::Abandoned
            | BackupError::WalTimeout { .. } => {
                Some("nothing was published: `pitr list` will not show this backup".into())
            }
        }
    }
}

impl From<TarError> for BackupError {
    fn from(source: TarError) -> Self {
        BackupError::Tar {
            archive: String::new(),
            source,
        }
    }
}

/// One tar stream being received: its parts go to storage, its files are checksummed.
struct ArchiveUpload {
    meta: BackupArchive,
    buf: Vec<u8>,
    manifest_prefix: String,
    reader: TarReader,
    current: Option<(String, u32, u64)>,
}

impl ArchiveUpload {
    fn new(name: String, tablespace: Option<(u32, String)>) -> ArchiveUpload {
        let manifest_prefix = tablespace
            .as_ref()
            .map(|(oid, _)| format!("pg_tblspc/{oid}/"))
            .unwrap_or_default();
        ArchiveUpload {
            meta: BackupArchive {
                name,
                tablespace_oid: tablespace.as_ref().map(|t| t.0),
                tablespace_location: tablespace.map(|t| t.1),
                parts: 0,
                raw_bytes: 0,
                stored_bytes: 0,
            },
            buf: Vec::with_capacity(PART_SIZE),
            manifest_prefix,
            reader: TarReader::new(),
            current: None,
        }
    }

    /// Feeds received bytes to the checksummer; returns full parts ready to upload.
    fn push(
        &mut self,
        data: &[u8],
        checksums: &mut HashMap<String, (u64, u32)>,
    ) -> Result<Vec<(u32, Vec<u8>)>, BackupError> {
        let prefix = &self.manifest_prefix;
        let current = &mut self.current;
        self.reader
            .feed(data, &mut |ev| -> Result<(), TarError> {
                match ev {
                    TarEvent::Entry(h) if h.kind == EntryKind::File => {
                        *current = Some((format!("{prefix}{}", h.path), 0, 0))
                    }
                    TarEvent::Entry(_) => {}
                    TarEvent::Data(d) => {
                        if let Some((_, crc, len)) = current {
                            *crc = crc32c::crc32c_append(*crc, d);
                            *len += d.len() as u64;
                        }
                    }
                    TarEvent::EntryEnd => {
                        if let Some((path, crc, len)) = current.take() {
                            checksums.insert(path, (len, crc));
                        }
                    }
                }
                Ok(())
            })
            .map_err(|source| BackupError::Tar {
                archive: self.meta.name.clone(),
                source,
            })?;
        self.meta.raw_bytes += data.len() as u64;
        let mut ready = vec![];
        let mut rest = data;
        while !rest.is_empty() {
            let take = (PART_SIZE - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == PART_SIZE {
                ready.push(self.take_part());
            }
        }
        Ok(ready)
    }

    fn take_part(&mut self) -> (u32, Vec<u8>) {
        let n = self.meta.parts;
        self.meta.parts += 1;
        (
            n,
            std::mem::replace(&mut self.buf, Vec::with_capacity(PART_SIZE)),
        )
    }

    /// The last, short part (an empty archive still gets one part, so restore finds it).
    fn finish(&mut self) -> Result<Option<(u32, Vec<u8>)>, BackupError> {
        self.reader.finish().map_err(|source| BackupError::Tar {
            archive: self.meta.name.clone(),
            source,
        })?;
        Ok((!self.buf.is_empty() || self.meta.parts == 0).then(|| self.take_part()))
    }
}

/// Uploads run concurrently, bounded; the first failure aborts the backup.
struct Uploads {
    set: JoinSet<Result<(String, u64), RepoError>>,
    stored: HashMap<String, u64>,
}

impl Uploads {
    async fn spawn(
        &mut self,
        repo: &Repository,
        id: &str,
        archive: &str,
        part: u32,
        data: Vec<u8>,
    ) -> Result<(), BackupError> {
        while self.set.len() >= MAX_UPLOADS_IN_FLIGHT {
            self.join_one().await?;
        }
        let repo = repo.clone();
        let (id, archive) = (id.to_string(), archive.to_string());
        self.set.spawn(async move {
            repo.put_backup_part(&id, &archive, part, data)
                .await
                .map(|n| (archive, n))
        });
        Ok(())
    }

    async fn join_one(&mut self) -> Result<(), BackupError> {
        if let Some(res) = self.set.join_next().await {
            let (archive, n) = res.expect("upload task panicked")?;
            *self.stored.entry(archive).or_default() += n;
        }
        Ok(())
    }

    async fn join_all(&mut self) -> Result<(), BackupError> {
        while !self.set.is_empty() {
            self.join_one().await?;
        }
        Ok(())
    }
}

/// Takes a base backup of the server `conn_cfg` points at into the repository.
pub async fn run_backup(
    storage: Storage,
    write: WriteOptions,
    conn_cfg: &ConnConfig,
    opts: &BackupOptions,
    progress: &(dyn Fn(BackupProgress) + Sync),
) -> Result<BackupInfo, BackupError> {
    let mut conn = ReplicationConn::connect(conn_cfg).await?;
    let system = conn.identify_system().await?;
    let seg_size = conn.wal_segment_size().await?;
    let version = conn.server_version_num();
    let cluster = ClusterIdentity {
        system_identifier: system.system_id,
        pg_major: conn.server_major(),
        wal_segment_size: seg_size,
    };
    let repo = Repository::open_for_cluster(storage, &cluster, "backup", write).await?;

    match repo.remove_abandoned_backups(opts.abandoned_after).await {
        Ok(ids) if !ids.is_empty() => tracing::info!(removed = ?ids, "removed abandoned backups"),
        Ok(_) => {}
        // Cleaning up is housekeeping: it must not stop a new backup.
        Err(e) => tracing::warn!(error = %e, "could not check for abandoned backups"),
    }

    let start_time = Utc::now();
    let id = repo.claim_backup_id(start_time).await?;
    let label = opts.label.clone().unwrap_or_else(|| format!("pitr {id}"));
    let bb_opts = BaseBackupOptions {
        label: label.clone(),
        fast_checkpoint: opts.fast_checkpoint,
        manifest: true,
        // Where archive_command is in use, let the server wait for its own archiving first; we
        // check the repository afterwards either way.
        wait_for_wal_archive: true,
        max_rate_kb: opts.max_rate_kb,
        progress: true,
    };
    tracing::info!(backup = %id, server_version = version, "starting base backup");
    let lease = repo.hold_backup_lease(&id);
    let started = Started {
        repo,
        id,
        label,
        start_time,
        version,
        system_id: system.system_id,
        seg_size,
    };
    let result = receive_and_publish(&started, conn, bb_opts, opts, progress).await;
    lease.abort();
    result
}

/// What is known once the backup has been requested.
struct Started {
    repo: Repository,
    id: String,
    label: String,
    start_time: chrono::DateTime<Utc>,
    version: u32,
    system_id: u64,
    seg_size: u64,
}

/// Receives the backup, stores it, waits for its WAL and publishes it. Any error leaves the
/// backup unpublished (its parts are removed by a later backup once its lease expires).
async fn receive_and_publish(
    started: &Started,
    conn: ReplicationConn,
    bb_opts: BaseBackupOptions,
    opts: &BackupOptions,
    progress: &(dyn Fn(BackupProgress) + Sync),
) -> Result<BackupInfo, BackupError> {
    let Started {
        repo,
        id,
        label,
        start_time,
        version,
        system_id,
        seg_size,
    } = started;
    let (repo, id, seg_size) = (repo.clone(), id.clone(), *seg_size);
    let mut stream = conn.base_backup(bb_opts).await?;

    let mut uploads = Uploads {
        set: JoinSet::new(),
        stored: HashMap::new(),
    };
    let mut archives: Vec<BackupArchive> = vec![];
    let mut current: Option<ArchiveUpload> = None;
    let mut checksums: HashMap<String, (u64, u32)> = HashMap::new();
    let mut manifest_bytes: Vec<u8> = vec![];
    let mut start: Option<(Lsn, TimelineId)> = None;
    let mut end: Option<(Lsn, TimelineId)> = None;
    let mut received: u64 = 0;

    macro_rules! close_archive {
        () => {
            if let Some(mut a) = current.take() {
                if let Some((n, data)) = a.finish()? {
                    uploads.spawn(&repo, &id, &a.meta.name, n, data).await?;
                }
                archives.push(a.meta);
            }
        };
    }

    while let Some(ev) = stream.next_event().await? {
        match ev {
            BackupEvent::Start {
                start_lsn,
                timeline,
                tablespaces,
            } => {
                start = Some((start_lsn, timeline));
                let total = tablespaces
                    .iter()
                    .map(|t| t.size_kb)
                    .sum::<Option<u64>>()
                    .map(|kb| kb * 1024);
                progress(BackupProgress::Started {
                    id: id.clone(),
                    total_bytes: total,
                });
            }
            BackupEvent::Archive { name, tablespace } => {
                close_archive!();
                current = Some(ArchiveUpload::new(name, tablespace));
            }
            BackupEvent::Data(bytes) => {
                let a = current.as_mut().ok_or_else(|| BackupError::Incomplete {
                    what: "data before any archive".into(),
                })?;
                received += bytes.len() as u64;
                for (n, data) in a.push(&bytes, &mut checksums)? {
                    let name = a.meta.name.clone();
                    uploads.spawn(&repo, &id, &name, n, data).await?;
                }
                progress(BackupProgress::Bytes { done: received });
            }
            BackupEvent::Manifest(bytes) => {
                close_archive!();
                manifest_bytes.extend_from_slice(&bytes);
            }
            BackupEvent::Progress { .. } => {}
            BackupEvent::End { stop_lsn, timeline } => end = Some((stop_lsn, timeline)),
        }
    }
    close_archive!();
    uploads.join_all().await?;
    let (start_lsn, timeline) = start.ok_or_else(|| BackupError::Incomplete {
        what: "no start position".into(),
    })?;
    let (stop_lsn, _) = end.ok_or_else(|| BackupError::Incomplete {
        what: "no end position".into(),
    })?;
    for a in &mut archives {
        a.stored_bytes = uploads.stored.get(&a.name).copied().unwrap_or(0);
    }

    verify_against_manifest(&manifest_bytes, &checksums)?;
    repo.put_backup_manifest(&id, manifest_bytes).await?;

    wait_for_wal(
        &repo,
        timeline,
        start_lsn,
        stop_lsn,
        seg_size,
        opts.wal_timeout,
        progress,
    )
    .await?;

    if !repo.claim_backup_completion(&id).await? {
        return Err(BackupError::Abandoned);
    }
    let info = BackupInfo {
        id: id.clone(),
        label: label.clone(),
        timeline,
        start_lsn,
        stop_lsn,
        start_time: *start_time,
        stop_time: Utc::now(),
        pg_version_num: *version,
        system_identifier: *system_id,
        archives,
        manifest: true,
        compression: repo.write_codec(),
        pitr_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    repo.put_backup_info(&info).await?;
    tracing::info!(backup = %id, %start_lsn, %stop_lsn, bytes = info.raw_bytes(), stored = info.stored_bytes(), "backup complete");
    Ok(info)
}

/// Every file the manifest lists must have passed with the same size and checksum.
fn verify_against_manifest(
    raw: &[u8],
    seen: &HashMap<String, (u64, u32)>,
) -> Result<(), BackupError> {
    if raw.is_empty() {
        return Err(BackupError::Incomplete {
            what: "no backup manifest".into(),
        });
    }
    let files = manifest::parse(raw).map_err(|e| BackupError::Manifest(e.to_string()))?;
    for (path, exp) in &files {
        let Some(&(len, crc)) = seen.get(path) else {
            return Err(BackupError::ManifestMismatch {
                path: path.clone(),
                expected: "present".into(),
                actual: "missing".into(),
            });
        };
        if len != exp.size {
            return Err(BackupError::ManifestMismatch {
                path: path.clone(),
                expected: format!("{} bytes", exp.size),
                actual: format!("{len} bytes"),
            });
        }
        if let Some(want) = exp.crc32c {
            if want != crc {
                return Err(BackupError::ManifestMismatch {
                    path: path.clone(),
                    expected: manifest::format_crc32c(want),
                    actual: manifest::format_crc32c(crc),
                });
            }
        }
    }
    Ok(())
}

/// Waits until every segment from the one holding `start` to the one holding the last byte
/// before `stop` is in the repository: without them the backup cannot be restored.
async fn wait_for_wal(
    repo: &Repository,
    tli: TimelineId,
    start: Lsn,
    stop: Lsn,
    seg_size: u64,
    timeout: Duration,
    progress: &(dyn Fn(BackupProgress) + Sync),
) -> Result<(), BackupError> {
    let began = Instant::now();
    let last = Lsn(stop.0.saturating_sub(1)).segno(seg_size);
    for segno in start.segno(seg_size)..=last {
        let name = WalFileName::segment(tli, segno, seg_size);
        let mut announced = false;
        loop {
            if repo.has_wal_file(&name).await? {
                break;
            }
            if began.elapsed() > timeout {
                return Err(BackupError::WalTimeout {
                    segment: name.to_string(),
                    waited: timeout,
                });
            }
            if !announced {
                progress(BackupProgress::WaitingForWal {
                    segment: name.to_string(),
                });
                announced = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

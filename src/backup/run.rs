use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::blockdiff::{BackupMaps, DiffError, TarDiff};
use super::wal::{OwnWal, OwnWalError, OwnWalStream, StopAt, WalConn};
use super::{MAX_UPLOADS_IN_FLIGHT, PART_BUFFERS, PART_SIZE};
use crate::error::{Classify, Code};
use crate::format::archive_check::{ArchiveReader, Discard, FeedError, ManifestCheck, Mismatch};
use crate::format::manifest;
use crate::format::tar::TarError;
use crate::pg::{self, BackupEvent, BaseBackupOptions, ConnConfig, ReplicationConn};
use crate::repo::{
    new_backup_id, BackupArchive, BackupInfo, BackupKind, BackupSource, ClusterIdentity,
    IncrementalMode, PartEncoder, RepoError, Repository, WriteOptions,
};
use crate::storage::{BufferPool, Storage};
use crate::wal::{Lsn, TimelineId, WalFileName};

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub label: Option<String>,
    pub fast_checkpoint: bool,
    /// How long to wait, after BASE_BACKUP ends, for the WAL it needs to reach the repository
    /// (streamed by the backup itself, or through archive-push or `pitr stream` when the
    /// backup could not stream it).
    pub wal_timeout: Duration,
    pub max_rate_kb: Option<u32>,
    /// Unfinished backups whose lease is older than this are removed before this one starts.
    pub abandoned_after: Duration,
    /// Take an incremental backup on `parent` (default: the newest complete backup of the
    /// same cluster and timeline).
    pub incremental: bool,
    pub parent: Option<String>,
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
    /// An incremental backup: its parent, how it is computed and why.
    Incremental {
        parent: String,
        mode: IncrementalMode,
        why: String,
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
    #[error("there is no complete backup of this cluster on timeline {timeline} to take an incremental backup on")]
    NoParent { timeline: TimelineId },
    #[error("parent backup {id} is not in the repository's catalog")]
    ParentNotFound { id: String },
    #[error("parent backup {id} {problem}")]
    BadParent { id: String, problem: String },
    #[error("backup {id} has no block map (it was taken by an older pitr): it cannot be the parent of an incremental backup")]
    ParentWithoutBlockMap { id: String },
    #[error("the server refused the incremental backup: {0}")]
    IncrementalRefused(pg::Error),
    #[error("temporary file for a file's changed blocks: {0}")]
    Spill(std::io::Error),
    #[error(
        "WAL segment {segment}, needed to restore this backup, did not reach the repository within {waited:?}; \
         is archive_command set to `pitr archive-push %p` for this repository, or `pitr stream` running?"
    )]
    WalTimeout { segment: String, waited: Duration },
    /// Another backup claimed the same id (same second, same random suffix) first; the backup
    /// is retried under another id before this is ever reported.
    #[error("backup id {id} was claimed by another backup started at the same moment")]
    IdTaken { id: String },
    /// The caller withheld its go-ahead (its audit record could not be written) and reports
    /// why itself; nothing was written.
    #[error("the backup was not started: its start could not be recorded")]
    NotRecorded,
}

impl Classify for BackupError {
    fn code(&self) -> Code {
        match self {
            BackupError::Pg(e) | BackupError::IncrementalRefused(e) => e.code(),
            BackupError::Repo(e) => e.code(),
            BackupError::Tar { .. }
            | BackupError::Manifest(_)
            | BackupError::ManifestMismatch { .. }
            | BackupError::Incomplete { .. }
            | BackupError::Abandoned
            | BackupError::Spill(_)
            | BackupError::WalTimeout { .. }
            | BackupError::IdTaken { .. }
            | BackupError::NotRecorded => Code::JobFailed,
            BackupError::NoParent { .. }
            | BackupError::ParentNotFound { .. }
            | BackupError::BadParent { .. }
            | BackupError::ParentWithoutBlockMap { .. } => Code::Usage,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            BackupError::Pg(e) | BackupError::IncrementalRefused(e) => e.hint(),
            BackupError::Repo(e) => e.hint(),
            BackupError::NoParent { .. } => Some(
                "take a full backup first: `pitr backup` without --incremental".into(),
            ),
            BackupError::ParentNotFound { .. } | BackupError::BadParent { .. } => Some(
                "`pitr list` shows the backups; omit --parent to use the newest one".into(),
            ),
            BackupError::ParentWithoutBlockMap { .. } => Some(
                "take a full backup (`pitr backup` without --incremental); incremental backups can follow it"
                    .into(),
            ),
            BackupError::Tar { .. }
            | BackupError::Manifest(_)
            | BackupError::ManifestMismatch { .. }
            | BackupError::Incomplete { .. }
            | BackupError::Abandoned
            | BackupError::Spill(_)
            | BackupError::WalTimeout { .. }
            | BackupError::IdTaken { .. }
            | BackupError::NotRecorded => {
                Some("nothing was published: `pitr list` will not show this backup".into())
            }
        }
    }
}

impl From<DiffError> for BackupError {
    fn from(e: DiffError) -> Self {
        match e {
            DiffError::Repo(e) => BackupError::Repo(e),
            DiffError::Spill(e) => BackupError::Spill(e),
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
    /// The part being filled: gathered whole in `buf`, or compressed as it comes by `encoder`
    /// (see [`Uploads::streamed`]).
    buf: Vec<u8>,
    encoder: Option<PartEncoder>,
    reader: ArchiveReader,
    /// Rewrites relation files as incremental entries, hashes their blocks.
    diff: TarDiff,
}

impl ArchiveUpload {
    fn new(name: String, tablespace: Option<(u32, String)>) -> ArchiveUpload {
        let reader = ArchiveReader::new(tablespace.as_ref().map(|t| t.0));
        let diff = TarDiff::new(tablespace.as_ref().map(|t| t.0));
        ArchiveUpload {
            meta: BackupArchive {
                name,
                tablespace_oid: tablespace.as_ref().map(|t| t.0),
                tablespace_location: tablespace.map(|t| t.1),
                parts: 0,
                raw_bytes: 0,
                stored_bytes: 0,
            },
            buf: Vec::new(),
            encoder: None,
            reader,
            diff,
        }
    }

    /// Feeds the server's bytes to the checksummer.
    fn check(&mut self, data: &[u8], files: &mut ManifestCheck) -> Result<(), BackupError> {
        // The manifest comes after the archives, so files are checked in `verify_against_manifest`.
        self.reader
            .feed(data, files, &mut Discard)
            .map_err(|e| match e {
                FeedError::Tar(source) => BackupError::Tar {
                    archive: self.meta.name.clone(),
                    source,
                },
                FeedError::Sink(m) => mismatch_error(m),
            })
    }

    /// Content bytes in the part being filled.
    fn filled(&self) -> usize {
        self.encoder
            .as_ref()
            .map_or(self.buf.len(), PartEncoder::len)
    }

    /// Appends bytes to store (the rewritten stream) to the part being filled, whose buffer or
    /// encoder the caller provides; returns how many were taken and the part, once full.
    fn fill(&mut self, data: &[u8]) -> (usize, Option<(u32, Part)>) {
        let take = (PART_SIZE - self.filled()).min(data.len());
        match &mut self.encoder {
            Some(e) => e.write(&data[..take]),
            None => self.buf.extend_from_slice(&data[..take]),
        }
        self.meta.raw_bytes += take as u64;
        let full = (self.filled() == PART_SIZE).then(|| self.take_part());
        (take, full)
    }

    fn take_part(&mut self) -> (u32, Part) {
        let n = self.meta.parts;
        self.meta.parts += 1;
        let part = match self.encoder.take() {
            Some(e) => Part::Encoded(e),
            None => Part::Whole(std::mem::take(&mut self.buf)),
        };
        (n, part)
    }

    /// The last, short part (an empty archive still gets one part, so restore finds it).
    fn finish(&mut self) -> Result<Option<(u32, Part)>, BackupError> {
        self.reader.finish().map_err(|source| BackupError::Tar {
            archive: self.meta.name.clone(),
            source,
        })?;
        let started = self.encoder.is_some() || !self.buf.is_empty();
        Ok((started || self.meta.parts == 0).then(|| self.take_part()))
    }
}

/// A full part, or an archive's last one, for [`Uploads::spawn`].
enum Part {
    /// Gathered whole in a part buffer: compressed on the blocking pool.
    Whole(Vec<u8>),
    /// Compressed as its bytes came.
    Encoded(PartEncoder),
}

/// Uploads run concurrently, bounded; the first failure aborts the backup.
///
/// Memory: parts compressed as they come ([`Self::streamed`]) need no part buffer, only one
/// block's `stage`. Otherwise at most [`PART_BUFFERS`] part buffers exist (the one being
/// filled and those being compressed); each comes back as soon as its part is compressed and
/// is refilled, never freed: freed and reallocated part-sized buffers would stay resident in
/// the allocator's arenas. An upload in flight holds only its stored (compressed) bytes, in a
/// buffer that goes back to `outputs` once stored: as many of those exist as parts were ever
/// in flight at once.
struct Uploads {
    set: JoinSet<Result<(String, u64), RepoError>>,
    stored: HashMap<String, u64>,
    /// LZ4 parts are compressed on the receiving thread, block by block as the bytes come
    /// ([`Repository::backup_part_encoder`]), each block while it is in the cache: on two
    /// CPUs, one of them the walsender's, a compressing thread beside the receiving one made
    /// them take turns, and handing parts between them cost a copy of every byte (see
    /// docs/benchmarks.md, round nine). zstd and sealed parts are compressed on the blocking
    /// pool, part by part, which this thread does not wait for.
    streamed: bool,
    /// The next encoder's block buffer.
    stage: Vec<u8>,
    outputs: Arc<BufferPool>,
    /// Empty buffers, ready for the next part.
    pool: Vec<Vec<u8>>,
    /// Buffers allocated so far.
    buffers: usize,
    /// Buffers given back by the uploads once their part is compressed.
    back_tx: mpsc::UnboundedSender<Vec<u8>>,
    back_rx: mpsc::UnboundedReceiver<Vec<u8>>,
    /// Set by [`Self::release`].
    released: bool,
}

impl Uploads {
    fn new() -> Uploads {
        let (back_tx, back_rx) = mpsc::unbounded_channel();
        Uploads {
            set: JoinSet::new(),
            stored: HashMap::new(),
            // Until the repository says it does not store LZ4 blocks.
            streamed: true,
            stage: Vec::new(),
            outputs: Arc::default(),
            pool: vec![],
            buffers: 0,
            back_tx,
            back_rx,
            released: false,
        }
    }

    /// An empty buffer for the next part: a recycled one, a new one while fewer than
    /// [`PART_BUFFERS`] exist, or else the next one a compression gives back.
    async fn buffer(&mut self) -> Result<Vec<u8>, BackupError> {
        loop {
            while let Ok(b) = self.back_rx.try_recv() {
                self.give_back(b);
            }
            if let Some(b) = self.pool.pop() {
                return Ok(b);
            }
            if self.buffers < PART_BUFFERS {
                self.buffers += 1;
                return Ok(Vec::with_capacity(PART_SIZE));
            }
            // Every buffer is in a compression, which gives it back; an upload that failed
            // meanwhile ends the backup now.
            tokio::select! {
                Some(b) = self.back_rx.recv() => self.give_back(b),
                Some(res) = self.set.join_next() => self.collect(res)?,
            }
        }
    }

    /// Few bytes follow: the spare buffers are freed, and those being compressed are freed as
    /// they come back (a part still needed after all gets a new one).
    fn release(&mut self) {
        self.released = true;
        self.buffers -= self.pool.len();
        self.pool = vec![];
        self.stage = Vec::new();
        // The uploads still running hand theirs to the old pool, freed with the last of them.
        self.outputs = Arc::default();
    }

    /// The encoder of part `part` of `archive`, while parts are [`Self::streamed`].
    fn encoder(
        &mut self,
        repo: &Repository,
        id: &str,
        archive: &str,
        part: u32,
    ) -> Option<PartEncoder> {
        if !self.streamed {
            return None;
        }
        let (out, stage) = (self.outputs.take(), std::mem::take(&mut self.stage));
        let encoder = repo.backup_part_encoder(id, archive, part, PART_SIZE, out, stage);
        self.streamed = encoder.is_some();
        encoder
    }

    fn give_back(&mut self, mut buf: Vec<u8>) {
        // An empty archive's part has no buffer of the pool.
        if buf.capacity() < PART_SIZE {
            return;
        }
        if self.released {
            self.buffers -= 1;
        } else {
            buf.clear();
            self.pool.push(buf);
        }
    }

    async fn spawn(
        &mut self,
        repo: &Repository,
        id: &str,
        archive: &str,
        n: u32,
        part: Part,
    ) -> Result<(), BackupError> {
        while self.set.len() >= MAX_UPLOADS_IN_FLIGHT {
            self.join_one().await?;
        }
        let repo = repo.clone();
        let (id, archive) = (id.to_string(), archive.to_string());
        let outputs = self.outputs.clone();
        let encoded = match part {
            Part::Encoded(e) => {
                let (encoded, stage) = e.finish();
                self.stage = stage;
                encoded
            }
            Part::Whole(data) => {
                let back = self.back_tx.clone();
                self.set.spawn(async move {
                    let out = outputs.take();
                    let (encoded, buf) = repo.encode_backup_part(&id, &archive, n, data, out).await;
                    // The receiver is gone only when the backup has failed.
                    let _ = back.send(buf);
                    let stored = repo.put_encoded_part(encoded, &outputs).await;
                    stored.map(|n| (archive, n))
                });
                return Ok(());
            }
        };
        self.set.spawn(async move {
            let stored = repo.put_encoded_part(encoded, &outputs).await;
            stored.map(|n| (archive, n))
        });
        Ok(())
    }

    fn collect(
        &mut self,
        res: Result<Result<(String, u64), RepoError>, tokio::task::JoinError>,
    ) -> Result<(), BackupError> {
        let (archive, n) = res.expect("upload task panicked")?;
        *self.stored.entry(archive).or_default() += n;
        Ok(())
    }

    async fn join_one(&mut self) -> Result<(), BackupError> {
        while let Ok(b) = self.back_rx.try_recv() {
            self.give_back(b);
        }
        if let Some(res) = self.set.join_next().await {
            self.collect(res)?;
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

/// The caller's permission to write, given or withheld later: `pitr backup` records its start
/// in the audit trail meanwhile.
pub type GoAhead = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// Takes a base backup of the server `conn_cfg` points at into the repository. With
/// `go_ahead`, the server is reached while it is pending, and nothing is written (nor the
/// backup requested) before it says yes.
pub async fn run_backup(
    storage: Storage,
    write: WriteOptions,
    conn_cfg: &ConnConfig,
    opts: &BackupOptions,
    progress: &(dyn Fn(BackupProgress) + Sync),
    go_ahead: Option<GoAhead>,
) -> Result<BackupInfo, BackupError> {
    let mut refused = None;
    let mut attempts = 0;
    let mut go_ahead = go_ahead;
    loop {
        attempts += 1;
        let s = (storage.clone(), write.clone());
        let go = go_ahead.take();
        match run_once(s, conn_cfg, opts, progress, refused.clone(), go).await {
            // The server could not take its incremental backup on this parent (e.g. its WAL
            // summaries do not reach back to the parent's start): pitr computes it instead.
            Err(BackupError::IncrementalRefused(e)) if refused.is_none() => {
                tracing::warn!(error = %e, "the server refused the incremental backup; using block mode");
                refused = Some(e.to_string());
            }
            // One chance in 2^24 per backup started in the same second.
            Err(BackupError::IdTaken { id }) if attempts < 3 => {
                tracing::info!(backup = %id, "backup id taken by another backup; starting again under another");
            }
            other => return other,
        }
    }
}

/// One attempt; `server_refused`: the server refused a server-mode incremental before.
async fn run_once(
    (storage, write): (Storage, WriteOptions),
    conn_cfg: &ConnConfig,
    opts: &BackupOptions,
    progress: &(dyn Fn(BackupProgress) + Sync),
    server_refused: Option<String>,
    go_ahead: Option<GoAhead>,
) -> Result<BackupInfo, BackupError> {
    // The server is reached, and the repository's descriptor read, while the caller records
    // the command: three waits at once, and nothing written before the go-ahead.
    let go_ahead = async {
        match go_ahead {
            Some(go) => go.await,
            None => true,
        }
    };
    let (server, found, go) = tokio::join!(
        connect_source(conn_cfg),
        Repository::read_descriptor(&storage),
        go_ahead
    );
    if !go {
        return Err(BackupError::NotRecorded);
    }
    let Source {
        mut conn,
        wal_conn,
        system,
        seg_size,
        source,
        cluster,
    } = server?;
    let version = conn.server_version_num();
    let repo =
        Repository::open_found_for_cluster(storage, found?, &cluster, "backup", write).await?;

    let parent = match opts.incremental {
        true => Some(choose_parent(&repo, opts.parent.as_deref(), &system).await?),
        false => None,
    };
    let mut incremental = None;
    if let Some((p, _)) = &parent {
        let (mode, why) = match &server_refused {
            Some(e) => (
                IncrementalMode::Block,
                format!("the server refused an incremental backup on this parent: {e}"),
            ),
            None => incremental_mode(&repo, &mut conn, p).await?,
        };
        tracing::info!(parent = %p.id, %mode, %why, "incremental backup");
        progress(BackupProgress::Incremental {
            parent: p.id.clone(),
            mode,
            why,
        });
        incremental = Some((p.id.clone(), mode));
    }
    let server_mode = matches!(incremental, Some((_, IncrementalMode::Server)));

    let start_time = Utc::now();
    let id = new_backup_id(start_time);
    let label = opts.label.clone().unwrap_or_else(|| format!("pitr {id}"));
    let bb_opts = BaseBackupOptions {
        label: label.clone(),
        fast_checkpoint: opts.fast_checkpoint,
        manifest: true,
        // With its own WAL stream the backup stores the WAL it needs itself, as
        // `pg_basebackup -X stream` does, so the server need not wait for its archiver (it
        // checks once a second: about a second per backup). Without that stream the server
        // waits where archiving is on. Either way the repository is checked afterwards.
        wait_for_wal_archive: wal_conn.is_none(),
        max_rate_kb: opts.max_rate_kb,
        progress: true,
        incremental: server_mode,
    };
    tracing::info!(backup = %id, server_version = version, source = %source, "starting base backup");
    // The server checkpoints while the id is claimed; nothing is read from it, and so nothing
    // stored, before the claim holds.
    let stream = conn.base_backup(bb_opts).await?;
    if !repo.claim_backup(&id).await? {
        return Err(BackupError::IdTaken { id });
    }
    let lease = repo.hold_backup_lease(&id);
    // Housekeeping, beside the backup: this backup's lease is there, so it is not abandoned.
    let cleanup = tokio::spawn(remove_abandoned(
        repo.clone(),
        opts.abandoned_after,
        id.clone(),
    ));
    let maps = BackupMaps {
        parent: parent.map(|(_, map)| map),
        writer: repo.put_block_map(&id),
        files_whole: 0,
        files_incremental: 0,
        blocks_changed: 0,
        blocks_same: 0,
        server_mode,
    };
    let started = Started {
        repo,
        id,
        label,
        start_time,
        version,
        system_id: system.system_id,
        seg_size,
        source,
        incremental,
    };
    let mut withdraw = false;
    let result = receive_and_publish(
        &started,
        stream,
        wal_conn,
        maps,
        opts,
        progress,
        &mut withdraw,
    )
    .await;
    lease.abort();
    let _ = cleanup.await;
    let what = match &result {
        // Nothing but the lease was written; the retry takes another id.
        Err(BackupError::IncrementalRefused(_)) => "the refused backup's lease",
        // Its state says `complete`, so no cleanup would ever take it; it will not publish.
        Err(_) if withdraw => "the data of the backup that failed after its state said complete",
        _ => return result,
    };
    if let Err(e) = started.repo.remove_backup_data(&started.id).await {
        tracing::warn!(backup = %started.id, error = %e, "could not remove {what}");
    }
    result
}

/// The server a backup comes from, as its first connection found it.
struct Source {
    conn: ReplicationConn,
    /// The second connection, for the backup's own WAL.
    wal_conn: Option<WalConn>,
    system: pg::IdentifySystem,
    seg_size: u64,
    source: BackupSource,
    cluster: ClusterIdentity,
}

async fn connect_source(conn_cfg: &ConnConfig) -> Result<Source, BackupError> {
    let mut conn = ReplicationConn::connect(conn_cfg).await?;
    let system = conn.identify_system().await?;
    let seg_size = conn.wal_segment_size().await?;
    let hp = conn.connection().host().clone();
    let source = BackupSource {
        host: hp.host.to_string(),
        port: hp.port,
        standby: conn.in_hot_standby().await?,
    };
    let cluster = ClusterIdentity {
        system_identifier: system.system_id,
        pg_major: conn.server_major(),
        wal_segment_size: seg_size,
    };
    let wal_conn = match WalConn::connect(conn_cfg, hp, system.system_id).await {
        Ok(c) => Some(c),
        // Without its own WAL a backup still completes once archiving or a stream stores it.
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a second replication connection to stream the backup's WAL; \
                 it must reach the repository through archive-push or `pitr stream`");
            None
        }
    };
    Ok(Source {
        conn,
        wal_conn,
        system,
        seg_size,
        source,
        cluster,
    })
}

/// Removes unfinished backups whose lease expired. Housekeeping: a failure is logged, and
/// never stops a backup.
async fn remove_abandoned(repo: Repository, abandoned_after: Duration, own: String) {
    match repo
        .remove_abandoned_backups(abandoned_after, Some(&own))
        .await
    {
        Ok(ids) if !ids.is_empty() => tracing::info!(removed = ?ids, "removed abandoned backups"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not check for abandoned backups"),
    }
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
    source: BackupSource,
    /// The parent and mode of an incremental backup.
    incremental: Option<(String, IncrementalMode)>,
}

/// The parent of an incremental backup and its block map: `requested`, or the newest complete
/// backup of the same cluster and timeline.
async fn choose_parent(
    repo: &Repository,
    requested: Option<&str>,
    system: &pg::IdentifySystem,
) -> Result<(BackupInfo, crate::repo::BlockMap), BackupError> {
    let backups = repo.list_backups().await?;
    let parent = match requested {
        Some(id) => backups
            .into_iter()
            .find(|b| b.id == id)
            .ok_or_else(|| BackupError::ParentNotFound { id: id.into() })?,
        None => backups
            .into_iter()
            .rev()
            .find(|b| b.system_identifier == system.system_id && b.timeline == system.timeline)
            .ok_or(BackupError::NoParent {
                timeline: system.timeline,
            })?,
    };
    if parent.system_identifier != system.system_id {
        return Err(BackupError::BadParent {
            id: parent.id,
            problem: "belongs to another cluster".into(),
        });
    }
    match repo.block_map(&parent.id).await? {
        Some(map) => Ok((parent, map)),
        None => Err(BackupError::ParentWithoutBlockMap { id: parent.id }),
    }
}

/// Server mode where the server can compute the incremental (PostgreSQL 17+ summarizing WAL):
/// the parent's manifest is uploaded on `conn` then. Otherwise block mode. With the reason.
async fn incremental_mode(
    repo: &Repository,
    conn: &mut ReplicationConn,
    parent: &BackupInfo,
) -> Result<(IncrementalMode, String), BackupError> {
    let major = conn.server_major();
    let block = |why: String| Ok((IncrementalMode::Block, why));
    if major < 17 {
        return block(format!(
            "PostgreSQL {major} has no incremental BASE_BACKUP, which came in 17"
        ));
    }
    if conn.show("summarize_wal").await? != "on" {
        return block(
            "summarize_wal is off on the server (turn it on for server-side incremental backups)"
                .into(),
        );
    }
    let Some(manifest) = repo.backup_manifest(&parent.id).await? else {
        return block(format!("backup {} has no stored manifest", parent.id));
    };
    conn.upload_manifest(&manifest).await?;
    Ok((
        IncrementalMode::Server,
        format!("PostgreSQL {major} with summarize_wal = on"),
    ))
}

/// Receives the backup, stores it, waits for its WAL and publishes it. Any error leaves the
/// backup unpublished (its parts are removed by a later backup once its lease expires), except
/// one after its state says complete: then `withdraw` is set, and the caller removes it.
#[allow(clippy::too_many_arguments)]
async fn receive_and_publish(
    started: &Started,
    mut stream: pg::BaseBackupStream,
    wal_conn: Option<WalConn>,
    maps: BackupMaps,
    opts: &BackupOptions,
    progress: &(dyn Fn(BackupProgress) + Sync),
    withdraw: &mut bool,
) -> Result<BackupInfo, BackupError> {
    let Started {
        repo,
        id,
        label,
        start_time,
        version,
        system_id,
        seg_size,
        source,
        incremental,
    } = started;
    let (repo, id, seg_size) = (repo.clone(), id.clone(), *seg_size);
    let server_mode = maps.server_mode;
    let mut receiver = Receiver::new(&repo, &id, seg_size, wal_conn, maps);
    let mut first = true;
    loop {
        let ev = match stream.next_event().await {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            // The server checks its WAL summaries before it sends anything.
            Err(e) if first && server_mode && matches!(e, pg::Error::Server { .. }) => {
                return Err(BackupError::IncrementalRefused(e))
            }
            Err(e) => return Err(e.into()),
        };
        first = false;
        receiver.on_event(ev, progress).await?;
    }
    // The server has sent everything: a backup streaming its own WAL claims its completion
    // while its last parts, its manifest and its WAL are stored, which saves a round trip or two
    // in a row. Should any of it fail, the caller removes the backup (no cleanup would: its
    // state says complete). Without its own WAL the wait for the archiver's copy can be long, and
    // a backup killed then (Ctrl-C) must stay one that a cleanup removes: it claims afterwards.
    let claim = repo.claim_backup_completion(&id);
    let own_wal_streaming = receiver.own_wal.is_some();
    let stored = store_the_rest(&repo, receiver, source.standby, seg_size, opts, progress);
    let (claimed, stored) = match own_wal_streaming {
        true => tokio::join!(claim, stored),
        false => {
            let stored = stored.await?;
            (claim.await, Ok(stored))
        }
    };
    if !claimed? {
        return Err(BackupError::Abandoned);
    }
    let (received, mut own_wal) = stored.inspect_err(|_| *withdraw = true)?;
    let Received {
        archives,
        metadata_stored,
        start: (start_lsn, timeline),
        stop: (stop_lsn, _),
        ..
    } = received;
    let stored = archives.iter().map(|a| a.stored_bytes).sum::<u64>() + metadata_stored;
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
        source: Some(source.clone()),
        kind: match incremental {
            Some(_) => BackupKind::Incremental,
            None => BackupKind::Full,
        },
        parent: incremental.as_ref().map(|(p, _)| p.clone()),
        incremental_mode: incremental.as_ref().map(|(_, m)| *m),
        stored_total: Some(stored),
    };
    repo.put_backup_info(&info).await?;
    if let Some(w) = &mut own_wal {
        w.summary_stored().await;
    }
    tracing::info!(backup = %id, %start_lsn, %stop_lsn, bytes = info.raw_bytes(), stored = info.stored_bytes(), "backup complete");
    Ok(info)
}

/// Once the server has sent everything: the last parts, the manifest (checked against what
/// came) and the block map stored, then the WAL from the backup's start to its stop.
async fn store_the_rest(
    repo: &Repository,
    receiver: Receiver<'_>,
    standby: bool,
    seg_size: u64,
    opts: &BackupOptions,
    progress: &(dyn Fn(BackupProgress) + Sync),
) -> Result<(Received, Option<OwnWal>), BackupError> {
    let mut received = receiver.finish().await?;
    let files = std::mem::take(&mut received.files);
    verify_against_manifest(&received.manifest_bytes, files)?;
    let maps = &received.maps;
    tracing::info!(
        files_whole = maps.files_whole,
        files_incremental = maps.files_incremental,
        blocks_changed = maps.blocks_changed,
        blocks_unchanged = maps.blocks_same,
        "relation files"
    );
    let began = Instant::now();
    let ((start_lsn, timeline), (stop_lsn, stop_timeline)) = (received.start, received.stop);
    let stop = StopAt {
        lsn: stop_lsn,
        timeline: stop_timeline,
        segment_switch: !standby,
    };
    let own_wal = own_wal_stored(received.own_wal.take(), stop, opts.wal_timeout).await?;
    if own_wal.is_none() {
        let timeout = opts.wal_timeout.saturating_sub(began.elapsed());
        wait_for_wal(
            repo, timeline, start_lsn, stop_lsn, seg_size, timeout, progress,
        )
        .await?;
    }
    Ok((received, own_wal))
}

/// A backup stream being received: each archive is checksummed and stored part by part as it
/// comes.
struct Receiver<'a> {
    repo: &'a Repository,
    id: &'a str,
    uploads: Uploads,
    archives: Vec<BackupArchive>,
    current: Option<ArchiveUpload>,
    files: ManifestCheck,
    manifest_bytes: Vec<u8>,
    start: Option<(Lsn, TimelineId)>,
    stop: Option<(Lsn, TimelineId)>,
    received: u64,
    seg_size: u64,
    /// Opened before BASE_BACKUP; streaming starts once the start position is known.
    wal_conn: Option<WalConn>,
    own_wal: Option<OwnWalStream>,
    maps: BackupMaps,
    /// The bytes the block diff makes (tar headers, incremental entries) for one CopyData
    /// message, reused; the bytes passing through unchanged go from the message to the part
    /// buffer directly.
    scratch: Vec<u8>,
}

/// What the server sent, once every part is stored.
struct Received {
    archives: Vec<BackupArchive>,
    /// Checked once the manifest is known, in [`verify_against_manifest`].
    files: ManifestCheck,
    manifest_bytes: Vec<u8>,
    /// Bytes stored for the manifest and the block map.
    metadata_stored: u64,
    start: (Lsn, TimelineId),
    stop: (Lsn, TimelineId),
    /// The backup's own WAL, still streaming.
    own_wal: Option<OwnWalStream>,
    maps: BackupMaps,
}

impl<'a> Receiver<'a> {
    fn new(
        repo: &'a Repository,
        id: &'a str,
        seg_size: u64,
        wal_conn: Option<WalConn>,
        maps: BackupMaps,
    ) -> Receiver<'a> {
        Receiver {
            repo,
            id,
            uploads: Uploads::new(),
            archives: vec![],
            current: None,
            files: ManifestCheck::new(None),
            manifest_bytes: vec![],
            start: None,
            stop: None,
            received: 0,
            seg_size,
            wal_conn,
            own_wal: None,
            maps,
            scratch: Vec::new(),
        }
    }

    async fn on_event(
        &mut self,
        ev: BackupEvent,
        progress: &(dyn Fn(BackupProgress) + Sync),
    ) -> Result<(), BackupError> {
        match ev {
            BackupEvent::Start {
                start_lsn,
                timeline,
                tablespaces,
            } => {
                self.start = Some((start_lsn, timeline));
                if let Some(c) = self.wal_conn.take() {
                    let repo = self.repo.clone();
                    self.own_wal = Some(c.spawn(repo, timeline, start_lsn, self.seg_size));
                }
                let total = tablespaces
                    .iter()
                    .map(|t| t.size_kb)
                    .sum::<Option<u64>>()
                    .map(|kb| kb * 1024);
                progress(BackupProgress::Started {
                    id: self.id.to_string(),
                    total_bytes: total,
                });
            }
            BackupEvent::Archive { name, tablespace } => {
                self.close_archive().await?;
                self.current = Some(ArchiveUpload::new(name, tablespace));
            }
            BackupEvent::Data(bytes) => {
                self.data(&bytes).await?;
                progress(BackupProgress::Bytes {
                    done: self.received,
                });
            }
            BackupEvent::Manifest(bytes) => {
                self.close_archive().await?;
                self.release();
                self.manifest_bytes.extend_from_slice(&bytes);
            }
            BackupEvent::Progress { .. } => {}
            BackupEvent::End { stop_lsn, timeline } => self.stop = Some((stop_lsn, timeline)),
        }
        Ok(())
    }

    async fn data(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        let a = self
            .current
            .as_mut()
            .ok_or_else(|| BackupError::Incomplete {
                what: "data before any archive".into(),
            })?;
        self.received += bytes.len() as u64;
        a.check(bytes, &mut self.files)?;
        let mut rest = bytes;
        let mut out = std::mem::take(&mut self.scratch);
        while !rest.is_empty() {
            out.clear();
            let fed = a.diff.feed(rest, &mut self.maps, &mut out).await?;
            store(a, &mut self.uploads, self.repo, self.id, &out).await?;
            store(a, &mut self.uploads, self.repo, self.id, &rest[fed.pass]).await?;
            rest = &rest[fed.used..];
            // A file's spilled blocks, a piece at a time so parts upload as they fill.
            while let Some(piece) = a.diff.drain()? {
                store(a, &mut self.uploads, self.repo, self.id, &piece).await?;
            }
        }
        if a.meta.tablespace_oid.is_none() && a.diff.at_end() && !self.uploads.released {
            self.release();
        }
        // Kept only while small: a rare large rewrite (a whole file's incremental entry) must
        // not stay resident for the rest of the backup.
        if out.capacity() <= 1 << 20 {
            self.scratch = out;
        }
        Ok(())
    }

    /// The data is all in (the main archive, which the server sends last, has reached its
    /// end-of-archive blocks; or the manifest has come): the parent's block map and the spare
    /// part buffers go now, before the segment switch at the backup's stop fills the WAL
    /// segment buffer (16 MiB) of the backup's own WAL stream. Should an archive follow after
    /// all, its files are stored whole: correct, only larger.
    fn release(&mut self) {
        self.maps.parent = None;
        self.uploads.release();
    }

    async fn close_archive(&mut self) -> Result<(), BackupError> {
        if let Some(mut a) = self.current.take() {
            if let Some((n, data)) = a.finish()? {
                self.uploads
                    .spawn(self.repo, self.id, &a.meta.name, n, data)
                    .await?;
            }
            self.archives.push(a.meta);
        }
        Ok(())
    }

    /// The stream has ended: stores the manifest and the block map while the last parts
    /// upload (a round trip each over a slow network; nothing is published before all are in).
    async fn finish(mut self) -> Result<Received, BackupError> {
        self.close_archive().await?;
        let (repo, id) = (self.repo, self.id);
        let manifest = async {
            let stored = repo
                .put_backup_manifest(id, self.manifest_bytes.clone())
                .await?;
            Ok::<_, BackupError>(stored)
        };
        let map = async { Ok::<_, BackupError>(self.maps.writer.finish().await?) };
        let ((), manifest_stored, map_stored) =
            tokio::try_join!(self.uploads.join_all(), manifest, map)?;
        let start = self.start.ok_or_else(|| BackupError::Incomplete {
            what: "no start position".into(),
        })?;
        let stop = self.stop.ok_or_else(|| BackupError::Incomplete {
            what: "no end position".into(),
        })?;
        for a in &mut self.archives {
            a.stored_bytes = self.uploads.stored.get(&a.name).copied().unwrap_or(0);
        }
        Ok(Received {
            archives: self.archives,
            files: self.files,
            manifest_bytes: self.manifest_bytes,
            metadata_stored: manifest_stored + map_stored,
            start,
            stop,
            own_wal: self.own_wal,
            maps: self.maps,
        })
    }
}

/// Adds `data` to archive `a`'s parts, uploading each part once full.
async fn store(
    a: &mut ArchiveUpload,
    uploads: &mut Uploads,
    repo: &Repository,
    id: &str,
    mut data: &[u8],
) -> Result<(), BackupError> {
    while !data.is_empty() {
        if a.encoder.is_none() && a.buf.is_empty() {
            a.encoder = uploads.encoder(repo, id, &a.meta.name, a.meta.parts);
        }
        if a.encoder.is_none() && a.buf.capacity() == 0 {
            a.buf = uploads.buffer().await?;
        }
        let (used, full) = a.fill(data);
        data = &data[used..];
        if let Some((n, part)) = full {
            uploads.spawn(repo, id, &a.meta.name, n, part).await?;
        }
    }
    Ok(())
}

/// Every file the manifest lists must have passed with the same size and checksum.
fn verify_against_manifest(raw: &[u8], mut files: ManifestCheck) -> Result<(), BackupError> {
    if raw.is_empty() {
        return Err(BackupError::Incomplete {
            what: "no backup manifest".into(),
        });
    }
    let manifest = manifest::parse(raw).map_err(|e| BackupError::Manifest(e.to_string()))?;
    files.set_manifest(manifest);
    let outcome = files.finish();
    if let Some(m) = outcome.mismatches.into_iter().next() {
        return Err(mismatch_error(m));
    }
    if let Some(path) = outcome.missing.into_iter().next() {
        return Err(BackupError::ManifestMismatch {
            path,
            expected: "present".into(),
            actual: "missing".into(),
        });
    }
    // The server lists every file it sends; an unlisted one is restored unchecked, not lost.
    if let Some(example) = outcome.extra.first() {
        tracing::warn!(count = outcome.extra.len(), %example, "files in the backup are not in its manifest");
    }
    Ok(())
}

fn mismatch_error(m: Mismatch) -> BackupError {
    let (path, expected, actual) = match m {
        Mismatch::Size {
            path,
            expected,
            actual,
        } => (path, format!("{expected} bytes"), format!("{actual} bytes")),
        Mismatch::Checksum {
            path,
            expected,
            actual,
        } => (
            path,
            manifest::format_crc32c(expected),
            manifest::format_crc32c(actual),
        ),
    };
    BackupError::ManifestMismatch {
        path,
        expected,
        actual,
    }
}

/// Waits until the backup's own WAL is stored; `None` when it could not be streamed for a
/// reason that must not fail the backup (the server or the connection failed, or was too
/// slow): then the WAL may still reach the repository through archive-push or `pitr stream`,
/// which [`wait_for_wal`] checks. A repository failure fails the backup: waiting would meet
/// the same repository.
async fn own_wal_stored(
    own_wal: Option<OwnWalStream>,
    stop: StopAt,
    timeout: Duration,
) -> Result<Option<OwnWal>, BackupError> {
    let Some(own_wal) = own_wal else {
        return Ok(None);
    };
    match own_wal.finish(stop, timeout).await {
        Ok(w) => {
            tracing::info!(segments = w.segments, already_stored = w.already_stored,
                incomplete_segment = ?w.prefix.as_ref().map(|(n, len)| format!("{n} ({len} bytes, as chunks)")),
                "the backup's own WAL is stored");
            Ok(Some(w))
        }
        Err(OwnWalError::Repo(e)) => Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "could not stream the backup's WAL; waiting for archive-push or `pitr stream` to store it");
            Ok(None)
        }
    }
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

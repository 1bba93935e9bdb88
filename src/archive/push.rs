use std::path::Path;
use std::sync::Arc;

use super::pgdata::{Archived, CachedRepository, DataDir};
use super::prefetch::location_id;
use super::{ArchiveError, Target};
use crate::codec::{aligned_buffer, BLOCK_LEN};
use crate::repo::{
    read_full, ClusterIdentity, Descriptor, PrevCarry, PutOutcome, RepoError, Repository,
    SegmentUpload, SummaryOrder, UploadOutcome, WriteOptions,
};
use crate::storage::Storage;
use crate::wal::{major_from_magic, validate_segment_start, WalFileName};

/// What `archive_push` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Stored {
        bytes: u64,
    },
    /// The same bytes were archived before (PostgreSQL retried after a crash or a timeout).
    AlreadyArchived,
}

/// Archives the file at `path` into every repository of `targets` at once, each through
/// [`archive_push`]. Succeeds only when every repository that is not optional has the file
/// durably: one that is down fails the push, so that PostgreSQL keeps the file and retries and no
/// repository silently misses WAL. An optional repository's failure is a warning (`pitr copy`
/// fills the gap later). `AlreadyArchived` only when no repository stored anything new.
pub async fn archive_push_all(
    targets: &[Target],
    path: &Path,
) -> Result<PushOutcome, ArchiveError> {
    let several = targets.len() > 1;
    let results = futures::future::join_all(targets.iter().map(|t| async move {
        archive_push(t.storage.clone(), path, t.write.clone())
            .await
            .map_err(|e| e.in_repository(&t.name, several))
    }))
    .await;
    let (mut stored, mut outcome, mut failure, mut missed) = (None, None, None, None);
    for (t, result) in targets.iter().zip(results) {
        match result {
            Ok(o @ PushOutcome::Stored { .. }) => stored = Some(o),
            Ok(o) => outcome = Some(o),
            Err(e) if t.optional => {
                tracing::warn!(repository = %t.name, error = %e, "not archived into this optional repository; `pitr copy` can fill it in later");
                missed.get_or_insert(e);
            }
            Err(e) => {
                if several {
                    tracing::error!(repository = %t.name, error = %e, "not archived into this repository: the push fails, and PostgreSQL retries it");
                }
                failure.get_or_insert(e);
            }
        }
    }
    match (failure, stored.or(outcome), missed) {
        (Some(e), _, _) => Err(e),
        (None, Some(o), _) => Ok(o),
        // Only optional repositories, all failed: nothing is archived anywhere.
        (None, None, Some(e)) => Err(e),
        (None, None, None) => Ok(PushOutcome::AlreadyArchived),
    }
}

/// Archives the file at `path` (the `%p` of `archive_command`).
///
/// WAL segments and `.partial` files are checked before anything is written: their first page
/// must carry a long header for that very segment, of the declared size, from the cluster the
/// repository belongs to. History and `.backup` files carry no cluster identity: when run in a
/// data directory (as PostgreSQL runs `archive_command`) they are checked against its
/// `global/pg_control`, which can also create the repository; elsewhere they are stored only
/// once the repository exists. Returns only once the object is durable.
///
/// In a data directory the location is recorded in its `pitr.repository` marker, and a
/// location the marker names is never created again (see `pgdata`).
pub async fn archive_push(
    storage: Storage,
    path: &Path,
    write: WriteOptions,
) -> Result<PushOutcome, ArchiveError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let name = WalFileName::parse(file_name)?;
    let data_dir = DataDir::working();
    let (repo, outcome, bytes) = if matches!(name, WalFileName::Segment { .. }) {
        push_segment(storage, path, &name, data_dir.as_ref(), write).await?
    } else {
        push_whole(storage, path, &name, data_dir.as_ref(), write).await?
    };
    if let Some(dir) = &data_dir {
        // The WAL is durable whatever happens here: a marker that cannot be written costs the
        // vanished-repository check, not archiving.
        let d = repo.descriptor();
        let location = location_id(repo.storage_location());
        if let Err(e) =
            dir.record_archived(&location, d.repository_id.as_deref(), d.system_identifier)
        {
            tracing::warn!(error = %e, "cannot record the repository in the data directory");
        }
    }
    Ok(match outcome {
        PutOutcome::Stored => {
            tracing::info!(file = %name, bytes, repo = %repo.location(), "archived");
            PushOutcome::Stored { bytes }
        }
        PutOutcome::AlreadyStored => {
            tracing::info!(file = %name, "already archived with identical content");
            PushOutcome::AlreadyArchived
        }
    })
}

/// A `.partial`, history or `.backup` file (small, or rare): read whole, then stored.
async fn push_whole(
    storage: Storage,
    path: &Path,
    name: &WalFileName,
    data_dir: Option<&DataDir>,
    write: WriteOptions,
) -> Result<(Repository, PutOutcome, u64), ArchiveError> {
    let content = read_whole(path).await?;
    let from_wal = if name.holds_wal_pages() {
        Some(identity_from_wal(
            path,
            name,
            &content,
            content.len() as u64,
        )?)
    } else {
        None
    };
    let repo = open_repository(storage, name, from_wal, data_dir, write).await?;
    let bytes = content.len() as u64;
    let outcome = repo.store_wal_file_owned(name, content).await?;
    Ok((repo, outcome, bytes))
}

async fn read_whole(path: &Path) -> Result<bytes::Bytes, ArchiveError> {
    let content = tokio::fs::read(path)
        .await
        .map(bytes::Bytes::from)
        .map_err(|source| ArchiveError::ReadInput {
            path: path.to_path_buf(),
            source,
        })?;
    if content.is_empty() {
        return Err(ArchiveError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(content)
}

/// A WAL segment, read in blocks of [`BLOCK_LEN`] into one buffer and handed to the repository
/// as it is read (compressed and summarized on the way): the segment is never held whole.
///
/// In a data directory whose push cache knows the repository, nothing is read from the
/// repository before the upload: the stored descriptor is read while the segment is compressed
/// and checked against the cached one before success is reported, and the segment and its
/// summary are written at once (docs/repository-format.md, "archive-push's local cache").
async fn push_segment(
    storage: Storage,
    path: &Path,
    name: &WalFileName,
    data_dir: Option<&DataDir>,
    write: WriteOptions,
) -> Result<(Repository, PutOutcome, u64), ArchiveError> {
    let (file, len, mut buf, first) = open_segment(path).await?;
    let cluster = identity_from_wal(path, name, &buf.get()[..first], len)?;
    let what = format!("WAL file {name}");
    let cached = match data_dir {
        Some(d) => from_cache(&storage, d, &cluster, &what, &write)?,
        None => None,
    };
    let (repo, prev, check) = match cached {
        Some((repo, recorded, entry)) => {
            // Read while the segment is compressed: no request before the upload.
            let s = storage.clone();
            let check = tokio::spawn(async move { Repository::read_descriptor(&s).await });
            let prev = match entry.last_carry() {
                Some((n, tail)) => PrevCarry::Known(n, tail),
                None => PrevCarry::Lookup,
            };
            (repo, prev, Some((check, recorded)))
        }
        None => {
            let from_wal = Some(cluster.clone());
            let repo = open_repository(storage.clone(), name, from_wal, data_dir, write).await?;
            (repo, PrevCarry::Lookup, None)
        }
    };
    let order = match check {
        Some(_) => SummaryOrder::Parallel,
        None => SummaryOrder::AfterSegment,
    };
    let up = repo
        .segment_upload(name, &buf.get()[..first], len, file.clone(), prev.clone())
        .await;
    let up = feed(path, up, file, buf, first, len).await?;
    let stored = repo.store_segment_upload(up, order).await;
    let descriptor = match (check, data_dir) {
        (Some((check, recorded)), Some(dir)) => {
            let fresh = check.await.expect("descriptor check panicked");
            let wrote = matches!(stored, Ok((UploadOutcome::Done(PutOutcome::Stored), _)));
            let checked = (&storage, dir, &recorded, &cluster, what.as_str());
            confirm(&repo, checked, fresh, name, wrote).await?
        }
        _ => repo.descriptor().clone(),
    };
    let (outcome, next_carry) = match stored? {
        (UploadOutcome::Done(o), next) => (o, next),
        // Stored before (PostgreSQL retries after a crash or a timeout): compare the whole.
        (UploadOutcome::NeedsContent, _) => {
            let content = read_whole(path).await?;
            let s = repo
                .store_wal_file_with(name, content, prev, SummaryOrder::AfterSegment)
                .await?;
            (s.outcome, s.next_carry)
        }
    };
    if let Some(dir) = data_dir {
        remember(dir, &repo, descriptor, name, next_carry.as_ref());
    }
    Ok((repo, outcome, len))
}

/// The segment file (shared with the repository's summary and tail threads, which read it
/// at their own offsets), its length, and its first block read into the buffer.
async fn open_segment(
    path: &Path,
) -> Result<(Arc<std::fs::File>, u64, AlignedBlock, usize), ArchiveError> {
    let p = path.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&p)?;
        let len = file.metadata()?.len();
        // Page-aligned: the kernel's copy into it runs at full speed (codec::aligned_buffer).
        let mut buf = AlignedBlock::new();
        let first = read_full(&mut &file, buf.get())?;
        std::io::Result::Ok((Arc::new(file), len, buf, first))
    })
    .await
    .expect("read task panicked")
    .map_err(|source| ArchiveError::ReadInput {
        path: path.to_path_buf(),
        source,
    })?;
    if opened.3 == 0 {
        return Err(ArchiveError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(opened)
}

/// Hands the segment to `up`, block by block, from the first block already in `buf`, until
/// the end or the blocks `up`'s tail thread took, and joins those.
async fn feed(
    path: &Path,
    mut up: SegmentUpload,
    file: Arc<std::fs::File>,
    mut buf: AlignedBlock,
    first: usize,
    len: u64,
) -> Result<SegmentUpload, ArchiveError> {
    let read_err = |source| ArchiveError::ReadInput {
        path: path.to_path_buf(),
        source,
    };
    let (up, read) = tokio::task::spawn_blocking(move || {
        let mut n = first;
        let mut read = 0u64;
        // Block by block until the end, or until the blocks a tail thread took from the back.
        while n > 0 {
            up.write(&buf.get()[..n]);
            read += n as u64;
            if !up.claim_next() {
                break;
            }
            n = read_full(&mut &*file, buf.get())?;
        }
        read += up.finish_input()?;
        std::io::Result::Ok((up, read))
    })
    .await
    .expect("read task panicked")
    .map_err(read_err)?;
    if read != len {
        // PostgreSQL never changes a segment it asks to archive; something else did.
        return Err(read_err(std::io::Error::other(format!(
            "the file changed while being read: {len} bytes at the start, {read} read"
        ))));
    }
    Ok(up)
}

/// The repository as the push cache knows it, with what the marker records of it: only for a
/// location this cluster archived into before, whose cached descriptor is the recorded
/// repository's and this cluster's, unencrypted. Anything else takes the ordinary path, which
/// reads the descriptor first (and reports what is wrong).
fn from_cache(
    storage: &Storage,
    dir: &DataDir,
    cluster: &ClusterIdentity,
    what: &str,
    write: &WriteOptions,
) -> Result<Option<(Repository, Archived, CachedRepository)>, ArchiveError> {
    let location = location_id(storage.location());
    let Some(recorded) = dir.archived_into(&location, cluster.system_identifier)? else {
        return Ok(None);
    };
    let Some(entry) = dir.cached(&location) else {
        return Ok(None);
    };
    if dir
        .check_same(&entry.descriptor, &location, &recorded)
        .is_err()
    {
        return Ok(None);
    }
    let copy = entry.descriptor.clone();
    Ok(
        match Repository::open_from_copy(storage.clone(), copy, cluster, what, write.clone()) {
            Ok(Some(repo)) => Some((repo, recorded, entry)),
            Ok(None) | Err(_) => None,
        },
    )
}

/// What [`confirm`] checks against: the location, its data directory, the marker's record
/// of it, the cluster and what the WAL came from (for messages).
type Checked<'a> = (
    &'a Storage,
    &'a DataDir,
    &'a Archived,
    &'a ClusterIdentity,
    &'a str,
);

/// Checks the descriptor read during the upload: the push succeeds only if it is still the
/// recorded repository of this cluster, with the errors (and exit codes) of the ordinary path
/// otherwise, after which the cache entry is dropped (the retry reads the descriptor before it
/// writes anything). Returns the stored descriptor.
async fn confirm(
    repo: &Repository,
    (storage, dir, recorded, cluster, what): Checked<'_>,
    fresh: Result<Option<Descriptor>, RepoError>,
    name: &WalFileName,
    wrote: bool,
) -> Result<Descriptor, ArchiveError> {
    let location = location_id(storage.location());
    let checked = async {
        let Some(stored) = fresh? else {
            // As `Repository::open`: a missing bucket is told apart from an empty location.
            storage.check_reachable().await.map_err(RepoError::from)?;
            return Err(dir.vanished(&location, recorded));
        };
        dir.check_same(&stored, &location, recorded)?;
        repo.check_stored_descriptor(&stored, cluster, what)?;
        Ok(stored)
    };
    let result = checked.await;
    if result.is_err() {
        forget(dir, storage);
        if wrote {
            tracing::warn!(key = %crate::repo::wal_file_key(name), "this segment was stored before the repository check failed: it is this cluster's WAL under its own name (docs/repository-format.md, \"archive-push's local cache\")");
        }
    }
    result
}

/// Keeps what the next push needs in the push cache: the descriptor and this segment's carry.
/// Only for an unencrypted repository (an encrypted one always takes the ordinary path).
fn remember(
    dir: &DataDir,
    repo: &Repository,
    descriptor: Descriptor,
    name: &WalFileName,
    carry: Option<&crate::wal::SegmentTail>,
) {
    if descriptor.encryption.is_some() {
        return;
    }
    let location = location_id(repo.storage_location());
    let mut entry = CachedRepository {
        location: location.clone(),
        descriptor,
        last_segment: None,
        carry: None,
    };
    entry.set_last(name, carry);
    if let Err(e) = dir.update_cache(&location, Some(entry)) {
        tracing::warn!(error = %e, "cannot update the push cache; the next push reads the descriptor first");
    }
}

/// Drops the cache entry of a repository that failed its check: the retry takes the ordinary
/// path, which writes nothing before the descriptor is read.
fn forget(dir: &DataDir, storage: &Storage) {
    let location = location_id(storage.location());
    if let Err(e) = dir.update_cache(&location, None) {
        tracing::warn!(error = %e, "cannot update the push cache");
    }
}

/// A page-aligned buffer of [`BLOCK_LEN`] bytes.
struct AlignedBlock(Vec<u8>, usize);

impl AlignedBlock {
    fn new() -> AlignedBlock {
        let (backing, start) = aligned_buffer(BLOCK_LEN);
        AlignedBlock(backing, start)
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.0[self.1..self.1 + BLOCK_LEN]
    }
}

/// The identity a segment or `.partial` file declares in its long header, once the header is
/// checked to be that very segment's.
fn identity_from_wal(
    path: &Path,
    name: &WalFileName,
    content: &[u8],
    len: u64,
) -> Result<ClusterIdentity, ArchiveError> {
    let not_wal = |source| ArchiveError::NotWal {
        path: path.to_path_buf(),
        source,
    };
    // The segment number depends on the segment size, which the header declares; a wrong
    // declaration fails the address check below.
    let header = crate::wal::parse_long_header(content).map_err(not_wal)?;
    let seg_size = header.seg_size as u64;
    let segno = name
        .segno(seg_size)
        .expect("segment names have a segment number");
    // A .partial file is a full-size segment whose tail was never written; check the header
    // but not the length (pg_receivewal-style partials may be shorter).
    let header = if matches!(name, WalFileName::Partial { .. }) {
        header
    } else {
        validate_segment_start(content, len, name.timeline(), segno).map_err(not_wal)?
    };
    Ok(ClusterIdentity {
        system_identifier: header.system_identifier,
        pg_major: major_from_magic(header.magic).expect("validated magic"),
        wal_segment_size: seg_size,
    })
}

/// Opens the repository `name` goes to, checked against the cluster: the one the WAL header
/// names, else the data directory's. Creates it only where the data directory's marker does not
/// say this cluster archived before, and refuses one that replaced the recorded repository.
async fn open_repository(
    storage: Storage,
    name: &WalFileName,
    from_wal: Option<ClusterIdentity>,
    dir: Option<&DataDir>,
    write: WriteOptions,
) -> Result<Repository, ArchiveError> {
    let (cluster, what) = match (from_wal, dir) {
        (Some(c), _) => (c, format!("WAL file {name}")),
        (None, Some(d)) => (
            d.identity()?,
            format!("{name} (global/pg_control of {})", d.path().display()),
        ),
        (None, None) => {
            return match Repository::open(storage, write).await {
                Ok(r) => Ok(r),
                Err(RepoError::NotInitialized { .. }) => Err(ArchiveError::NeedsDescriptor {
                    name: name.to_string(),
                }),
                Err(e) => Err(e.into()),
            }
        }
    };
    let location = location_id(storage.location());
    let recorded = match dir {
        Some(d) => d.archived_into(&location, cluster.system_identifier)?,
        None => None,
    };
    let opened =
        Repository::open_existing_for_cluster(storage.clone(), &cluster, &what, write.clone())
            .await;
    let repo = match (opened, &recorded, dir) {
        (Ok(repo), Some(a), Some(d)) => {
            d.check_same(repo.descriptor(), &location, a)?;
            repo
        }
        (Ok(repo), _, _) => repo,
        (Err(RepoError::NotInitialized { .. }), Some(a), Some(d)) => {
            return Err(d.vanished(&location, a))
        }
        (Err(RepoError::NotInitialized { .. }), _, _) => {
            let source = if name.holds_wal_pages() {
                "its WAL header"
            } else {
                "global/pg_control of the data directory"
            };
            tracing::info!(location = %location, system_id = cluster.system_identifier, file = %name, "no repository here yet: creating it for the cluster of {source}");
            Repository::open_for_cluster(storage, &cluster, &what, write).await?
        }
        (Err(e), _, _) => return Err(e.into()),
    };
    Ok(repo)
}

//! The repository: layout of keys, the descriptor, and verified reads and writes of objects.
//!
//! Uses `storage` to move bytes and `codec` to frame them; knows WAL file names but nothing of
//! the replication protocol. The format is specified in docs/repository-format.md.

mod audit;
mod backup_check;
mod backups;
mod blockmap;
mod catalog;
mod chunks;
mod copy;
mod descriptor;
mod key_cache;
mod keys;
mod layout;
pub mod marker;
mod object;
mod scan;
mod stats;
mod summary;
#[cfg(test)]
mod tests_memory;
mod wal;
mod wal_tail;

use bytes::Bytes;

pub use audit::{set_invocation, AuditEntry, AuditLog, AuditOutcome, AuditRecord, AUDIT_PREFIX};
pub use backups::{
    new_backup_id, EncodedPart, FetchedPart, PartEncoder, StoredObject, DEFAULT_ABANDONED_AFTER,
    LEASE_REFRESH,
};
pub use blockmap::{block_hash, BlockHash, BlockMap, BlockMapWriter, FileBlocks};
pub use catalog::{
    BackupArchive, BackupInfo, BackupKind, BackupSource, IncrementalMode, TimelineWal, WalInventory,
};
pub use chunks::{plan_chain, ChunkPlan, ChunkRef, WalForRecovery, WalScan};
pub use copy::CopyPlan;
pub use descriptor::{ClusterIdentity, Descriptor, Encryption, EncryptionKdf, FORMAT_VERSION};
pub use keys::Rotation;
pub use scan::{wal_file_key, BackupItem, FetchedObject, ObjectKind, ScannedObject};
pub use stats::{probe, RepositoryUsage};
pub use summary::{Carry, StoredSummary, SummaryOutcome, MAX_CARRY_BYTES};
pub use wal::{
    Histories, PendingSummary, PrevCarry, RecoveryWal, SegmentUpload, SummaryOrder, UploadOutcome,
    WalStored, WriteWalError,
};
pub(crate) use wal_tail::read_full;
pub use wal_tail::SegmentSource;

use crate::codec::crypt::CryptError;
use crate::codec::{Codec, CodecError};
use crate::error::{Classify, Code};
use crate::key_source::{KeySource, KeySourceError};
use crate::storage::{Storage, StorageError};
use crate::wal::WalFileName;
use object::{ObjectCodec, Payload};

/// Small objects read at once where several are needed (catalog entries, history files): each
/// is a round trip to an object store, and reading them one after another made `restore` and
/// `list` take a round trip per backup.
const SMALL_READS_IN_FLIGHT: usize = 16;

/// How often a conditional create that found its key taken, but no object under it, is asked
/// again (waits of 40 ms doubling to 1.3 s: 2.5 s in all).
const CREATE_RACE_RETRIES: u32 = 6;

/// After a conditional create found its key taken and a read found nothing there: another
/// writer's create of the key was still in flight (S3 refuses a conditional create racing
/// another with 409). Its object appears when that create ends, or never if it failed. Waits
/// a little and says whether to ask again (`raced`: the retries so far; false when spent).
async fn raced_create_settles(raced: &mut u32) -> bool {
    if *raced >= CREATE_RACE_RETRIES {
        return false;
    }
    *raced += 1;
    tokio::time::sleep(std::time::Duration::from_millis(20 << *raced)).await;
    true
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("object {key} is corrupt: {source}")]
    Corrupt { key: String, source: CodecError },
    #[error("no pitr repository at {location}")]
    NotInitialized { location: String },
    #[error("the repository at {location} has format version {found}; this pitr reads up to {supported}")]
    NewerFormat {
        location: String,
        found: u32,
        supported: u32,
    },
    #[error(
        "the repository at {location} belongs to PostgreSQL system {repo_system_id}, \
         not to system {system_id} that this {what} comes from"
    )]
    OtherCluster {
        location: String,
        repo_system_id: u64,
        system_id: u64,
        what: String,
    },
    #[error("the repository at {location} holds WAL segments of {repo} bytes, but this cluster uses {cluster}")]
    SegmentSizeMismatch {
        location: String,
        repo: u64,
        cluster: u64,
    },
    #[error(
        "{name} is already archived at {key} with different content \
         (stored {stored_len} bytes crc32c {stored_crc:08x}, new {new_len} bytes crc32c {new_crc:08x})"
    )]
    ConflictingContent {
        name: String,
        key: String,
        stored_len: u64,
        stored_crc: u32,
        new_len: u64,
        new_crc: u32,
    },
    #[error("timeline history {name} is unreadable: {message}")]
    BadHistory { name: String, message: String },
    #[error("chunked segment {key} is unreadable: {message}")]
    BadChunkedSegment { key: String, message: String },
    #[error("descriptor {key} is unreadable: {message}")]
    BadDescriptor { key: String, message: String },
    #[error("audit record {key} is unreadable: {message}")]
    BadAudit { key: String, message: String },
    #[error("this repository is encrypted: set --encryption-key-file or --encryption-key-command to open it ({location})")]
    KeyRequired { location: String },
    #[error("the repository at {location} is not encrypted, but an encryption key is configured: refusing to use it")]
    NotEncrypted { location: String },
    #[error("the encryption key does not open the repository at {location}: it is not the key of any of its key generations")]
    WrongKey { location: String },
    #[error("the repository at {location} is encrypted but has no keyring under keys/")]
    NoKeyring { location: String },
    #[error("a keyring of the repository at {location} is unusable: {source}")]
    BadKeyring {
        location: String,
        source: CryptError,
    },
    #[error(transparent)]
    KeySource(KeySourceError),
    #[error("the repository at {location} is not encrypted with the same data key as the source (or one of the two is not encrypted): objects cannot be copied into it as stored")]
    OtherDataKey { location: String },
    #[error("another key rotation created key generation {generation} of {location} meanwhile; this one changed nothing")]
    RotationConflict { location: String, generation: u64 },
    #[error("the current key opens key generation {opens} of {location}, but generation {newest} exists and the new key does not open it either: another rotation happened")]
    NotNewestKey {
        location: String,
        opens: u64,
        newest: u64,
    },
}

impl Classify for RepoError {
    fn code(&self) -> Code {
        match self {
            RepoError::Storage(e) => e.code(),
            RepoError::Corrupt { .. }
            | RepoError::BadDescriptor { .. }
            | RepoError::BadHistory { .. }
            | RepoError::BadChunkedSegment { .. }
            | RepoError::BadAudit { .. }
            | RepoError::NoKeyring { .. }
            | RepoError::BadKeyring { .. } => Code::Corrupt,
            // A key that is missing, wrong or superfluous is a configuration error.
            RepoError::KeyRequired { .. }
            | RepoError::NotEncrypted { .. }
            | RepoError::WrongKey { .. }
            | RepoError::KeySource(_) => Code::Input,
            RepoError::RotationConflict { .. } | RepoError::NotNewestKey { .. } => Code::Conflict,
            RepoError::OtherDataKey { .. } => Code::Conflict,
            // No repository is where the user pointed: the storage location is wrong.
            RepoError::NotInitialized { .. } => Code::Storage,
            RepoError::NewerFormat { .. }
            | RepoError::OtherCluster { .. }
            | RepoError::SegmentSizeMismatch { .. }
            | RepoError::ConflictingContent { .. } => Code::Conflict,
        }
    }

    fn hint(&self) -> Option<String> {
        let hint = match self {
            RepoError::Storage(e) => return e.hint(),
            RepoError::Corrupt { .. } | RepoError::BadChunkedSegment { .. } => {
                "the stored object is damaged; run `pitr verify` and take a new base backup if WAL is lost"
            }
            RepoError::NotInitialized { .. } => {
                "check --repo / PITR_REPO; a repository is created by the first archive-push, backup or stream"
            }
            RepoError::NewerFormat { .. } => "upgrade pitr",
            RepoError::OtherCluster { .. } => {
                "use a separate repository (or prefix) for each cluster"
            }
            RepoError::ConflictingContent { .. } => {
                "another server may be archiving into this repository, or the file was changed after \
                 archiving; the stored object was kept untouched"
            }
            RepoError::BadHistory { .. } => {
                "recovery cannot follow a timeline whose history is damaged; `pitr verify` reports it"
            }
            RepoError::KeyRequired { .. } => {
                "or PITR_ENCRYPTION_KEY_FILE / PITR_ENCRYPTION_KEY_COMMAND, or [encryption] key_file / key_command in the config file"
            }
            RepoError::NotEncrypted { .. } => {
                "check --repo; a repository is encrypted only if created with a key: remove the key settings for this one, or use a new repository"
            }
            RepoError::WrongKey { .. } => {
                "check the key file or key command; after `pitr key rotate` only the new key opens the repository"
            }
            RepoError::KeySource(e) => return Some(e.hint()),
            RepoError::NoKeyring { .. } | RepoError::BadKeyring { .. } => {
                "the key objects under keys/ are damaged or missing: restore them from a copy; without them nothing in the repository can be decrypted"
            }
            RepoError::RotationConflict { .. } | RepoError::NotNewestKey { .. } => {
                "run `pitr key rotate` with the newest key as the current one (only one rotation at a time)"
            }
            RepoError::OtherDataKey { .. } => {
                "copy into an empty location (it gets the source's descriptor settings and keyrings), or between repositories made that way"
            }
            RepoError::SegmentSizeMismatch { .. }
            | RepoError::BadDescriptor { .. }
            | RepoError::BadAudit { .. } => return None,
        };
        Some(hint.into())
    }
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// How this process writes the repository: compression of new objects, and where the
/// encryption passphrase comes from (never the passphrase itself).
#[derive(Clone, Debug)]
pub struct WriteOptions {
    pub codec: Codec,
    pub level: i32,
    /// Required exactly when the repository is encrypted; creating a repository with a key
    /// makes it an encrypted one.
    pub encryption_key: Option<KeySource>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            codec: Codec::Lz4,
            level: 3,
            encryption_key: None,
        }
    }
}

/// The outcome of storing an immutable object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    /// The object was already there with byte-identical content: nothing to do.
    AlreadyStored,
}

/// Refuses a repository of another cluster, or of another WAL segment size.
fn check_cluster(
    storage: &Storage,
    descriptor: &Descriptor,
    cluster: &ClusterIdentity,
    what: &str,
) -> Result<()> {
    let location = storage.location().to_string();
    if descriptor.system_identifier != cluster.system_identifier {
        return Err(RepoError::OtherCluster {
            location,
            repo_system_id: descriptor.system_identifier,
            system_id: cluster.system_identifier,
            what: what.to_string(),
        });
    }
    if descriptor.wal_segment_size != cluster.wal_segment_size {
        return Err(RepoError::SegmentSizeMismatch {
            location,
            repo: descriptor.wal_segment_size,
            cluster: cluster.wal_segment_size,
        });
    }
    Ok(())
}

/// A WAL file's object, framed (compressed, checksummed, encrypted) for one repository and not
/// yet stored: [`Repository::encode_wal_file`].
#[derive(Debug)]
pub struct EncodedWal {
    key: String,
    name: String,
    framed: Bytes,
}

impl EncodedWal {
    /// Bytes of the stored object.
    pub fn stored_len(&self) -> usize {
        self.framed.len()
    }

    /// The stored object, for its buffer to be used again
    /// ([`crate::storage::BufferPool::give_bytes`]).
    pub fn into_framed(self) -> Bytes {
        self.framed
    }
}

/// An open repository whose descriptor has been read and checked.
#[derive(Clone, Debug)]
pub struct Repository {
    storage: Storage,
    descriptor: Descriptor,
    objects: ObjectCodec,
}

impl Repository {
    /// Opens an existing repository. Every reader starts here: a missing descriptor means the
    /// location is wrong or empty, which must never look like "this object does not exist".
    /// An encrypted repository is unlocked here (one key source call, then the local key cache
    /// or one KDF).
    pub async fn open(storage: Storage, write: WriteOptions) -> Result<Repository> {
        match descriptor::read(&storage).await? {
            Some(descriptor) => {
                let key =
                    keys::unlock_for(&storage, &descriptor, write.encryption_key.as_ref()).await?;
                Ok(Repository::assemble(storage, descriptor, write, key))
            }
            None => {
                // Tell "bucket missing / unreachable" apart from "empty location".
                storage.check_reachable().await?;
                Err(RepoError::NotInitialized {
                    location: storage.location().to_string(),
                })
            }
        }
    }

    fn assemble(
        storage: Storage,
        descriptor: Descriptor,
        write: WriteOptions,
        key: Option<keys::DataKey>,
    ) -> Repository {
        Repository {
            storage,
            descriptor,
            objects: ObjectCodec {
                write,
                data_key: key.map(std::sync::Arc::new),
            },
        }
    }

    /// Opens the repository for `cluster`, creating the descriptor if this is the first write
    /// (encrypted when a key is configured). Refuses a repository that belongs to another
    /// cluster.
    pub async fn open_for_cluster(
        storage: Storage,
        cluster: &ClusterIdentity,
        what: &str,
        write: WriteOptions,
    ) -> Result<Repository> {
        let found = descriptor::read(&storage).await?;
        Repository::open_found_for_cluster(storage, found, cluster, what, write).await
    }

    /// [`Self::open_for_cluster`] with the descriptor already read
    /// ([`Self::read_descriptor`], while the caller did something else).
    pub async fn open_found_for_cluster(
        storage: Storage,
        found: Option<Descriptor>,
        cluster: &ClusterIdentity,
        what: &str,
        write: WriteOptions,
    ) -> Result<Repository> {
        let Some(d) = found else {
            storage.check_reachable().await?;
            let (repo, _) = Repository::create_for_cluster(storage, cluster, what, write).await?;
            return Ok(repo);
        };
        let key = keys::unlock_for(&storage, &d, write.encryption_key.as_ref()).await?;
        check_cluster(&storage, &d, cluster, what)?;
        Ok(Repository::assemble(storage, d, write, key))
    }

    /// Creates the repository for `cluster` where [`Repository::open`] just found no
    /// descriptor (`NotInitialized`), without reading it again: for callers that decided
    /// creating is right. With it, whether this call wrote the descriptor (`false`: a
    /// concurrent creator's was there first, and is opened instead). A repository this call
    /// created holds nothing else yet, so its caller may skip listing it.
    pub async fn create_for_cluster(
        storage: Storage,
        cluster: &ClusterIdentity,
        what: &str,
        write: WriteOptions,
    ) -> Result<(Repository, bool)> {
        let source = write.encryption_key.as_ref();
        let create = Repository::create(&storage, cluster, source);
        let (descriptor, key, created) =
            audit::creating_repository(&storage, cluster, create).await?;
        check_cluster(&storage, &descriptor, cluster, what)?;
        Ok((
            Repository::assemble(storage, descriptor, write, key),
            created,
        ))
    }

    /// Creates the descriptor, and with a key source the first keyring before it; `true` with
    /// them when this call wrote the descriptor.
    async fn create(
        storage: &Storage,
        cluster: &ClusterIdentity,
        source: Option<&KeySource>,
    ) -> Result<(Descriptor, Option<keys::DataKey>, bool)> {
        let (encryption, key) = match source {
            Some(source) => {
                let (e, k) = keys::create_first(storage, source).await?;
                (Some(e), Some(k))
            }
            None => (None, None),
        };
        let (d, created) = descriptor::create(storage, cluster, encryption).await?;
        // A concurrent creator may have won with the other kind of repository.
        keys::check_configured(storage, &d, key.is_some())?;
        Ok((d, key, created))
    }

    /// Like [`Repository::open_for_cluster`], but never creates: a location without a
    /// descriptor is `NotInitialized`, for callers that must decide whether creating is right.
    pub async fn open_existing_for_cluster(
        storage: Storage,
        cluster: &ClusterIdentity,
        what: &str,
        write: WriteOptions,
    ) -> Result<Repository> {
        let repo = Repository::open(storage, write).await?;
        check_cluster(&repo.storage, &repo.descriptor, cluster, what)?;
        Ok(repo)
    }

    /// Opens an unencrypted repository from a copy of its descriptor kept by the caller
    /// (archive-push's local cache), without reading the stored one: no request. The caller
    /// must compare the stored descriptor ([`Repository::read_descriptor`]) with the copy
    /// before it reports success (docs/repository-format.md, "archive-push's local cache").
    /// `None` when the copy is not usable that way: an encrypted repository, or a key
    /// configured (both take the ordinary path, which reads the keyring too); and
    /// `Err` when it belongs to another cluster.
    pub fn open_from_copy(
        storage: Storage,
        copy: Descriptor,
        cluster: &ClusterIdentity,
        what: &str,
        write: WriteOptions,
    ) -> Result<Option<Repository>> {
        if copy.encryption.is_some() || write.encryption_key.is_some() {
            return Ok(None);
        }
        check_cluster(&storage, &copy, cluster, what)?;
        Ok(Some(Repository::assemble(storage, copy, write, None)))
    }

    /// The stored descriptor at `storage`'s location, read and checked as
    /// [`Repository::open`] reads it; `None` when there is none.
    pub async fn read_descriptor(storage: &Storage) -> Result<Option<Descriptor>> {
        descriptor::read(storage).await
    }

    /// Whether a descriptor read now is the one this repository was opened with, or one it may
    /// go on writing into (the same cluster and segment size, unencrypted). An encrypted one
    /// with the same id cannot be (descriptors are never rewritten), but is refused all the
    /// same: plaintext must never be written into it.
    pub fn check_stored_descriptor(
        &self,
        stored: &Descriptor,
        cluster: &ClusterIdentity,
        what: &str,
    ) -> Result<()> {
        check_cluster(&self.storage, stored, cluster, what)?;
        if stored.encryption.is_some() {
            return Err(RepoError::KeyRequired {
                location: self.location(),
            });
        }
        Ok(())
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    pub fn location(&self) -> String {
        self.storage.location().to_string()
    }

    /// Where the repository lives, as configured (e.g. to tell two repositories apart).
    pub fn storage_location(&self) -> &crate::storage::Location {
        self.storage.location()
    }

    /// Stores `content` under `key` unless it is there already. If it is, the stored object is
    /// read back and compared: identical bytes are success (PostgreSQL retries an archive
    /// command after a crash, an object store may have kept a PUT whose answer was lost),
    /// different bytes are refused and the stored object is untouched.
    async fn put_immutable(&self, key: &str, name: &str, content: &[u8]) -> Result<PutOutcome> {
        let framed = Bytes::from(self.objects.encode(key, content, Payload::Data));
        self.put_framed(key, name, framed, Some(content)).await
    }

    /// Creates `key` unless it is taken, without reading what is there: for derived data that
    /// keeps whichever version came first (a summary). `false` when it was taken, also by a
    /// create still in flight.
    async fn create_derived(&self, key: &str, content: &[u8]) -> Result<bool> {
        let framed = Bytes::from(self.objects.encode(key, content, Payload::Data));
        match self.storage.put_if_absent(key, framed).await {
            Ok(()) => Ok(true),
            Err(StorageError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// [`Self::put_immutable`] of an object already framed. `content` is what `framed` holds,
    /// when the caller still has it; without it the framed object is decoded to compare.
    async fn put_framed(
        &self,
        key: &str,
        name: &str,
        framed: Bytes,
        content: Option<&[u8]>,
    ) -> Result<PutOutcome> {
        let mut raced = 0;
        loop {
            match self.storage.put_if_absent(key, framed.clone()).await {
                Ok(()) => return Ok(PutOutcome::Stored),
                Err(StorageError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let checked = match content {
                Some(content) => self.check_identical(key, name, content).await,
                None => {
                    let content = self.objects.decode(key, &framed)?;
                    self.check_identical(key, name, &content).await
                }
            };
            match checked {
                // Taken, yet not there (a WAL segment stored by archive-push and by the
                // backup's own stream at the same moment, say).
                Err(RepoError::Storage(StorageError::NotFound { .. }))
                    if raced_create_settles(&mut raced).await => {}
                other => return other,
            }
        }
    }

    /// After a conditional create found `key` taken: `AlreadyStored` when it holds `content`.
    async fn check_identical(&self, key: &str, name: &str, content: &[u8]) -> Result<PutOutcome> {
        let mut stored = self.get_verified(key).await?;
        let storing_manifest = content.starts_with(chunks::CHUNKED_SEGMENT_MAGIC);
        if let (Ok(wal), false) = (WalFileName::parse(name), storing_manifest) {
            // A chunked segment is compared as the segment it names.
            stored = self.resolve_chunked(&wal, stored).await?;
        }
        if stored == content {
            return Ok(PutOutcome::AlreadyStored);
        }
        Err(RepoError::ConflictingContent {
            name: name.to_string(),
            key: key.to_string(),
            stored_len: stored.len() as u64,
            stored_crc: crc32c::crc32c(&stored),
            new_len: content.len() as u64,
            new_crc: crc32c::crc32c(content),
        })
    }

    /// Stores an object that is mutable by design (a lease), replacing any previous version.
    /// Never used for WAL or backup data.
    async fn put_mutable(&self, key: &str, content: &[u8]) -> Result<()> {
        let framed = self.objects.encode(key, content, Payload::Control);
        self.storage.put_overwrite(key, Bytes::from(framed)).await?;
        Ok(())
    }

    /// Reads an object and verifies its checksums.
    async fn get_verified(&self, key: &str) -> Result<Vec<u8>> {
        let bytes = self.storage.get(key).await?;
        self.objects.decode(key, &bytes)
    }

    /// Whether an object exists (a HEAD: nothing is read or verified).
    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.storage.head(key).await?.is_some())
    }

    /// Reads an object if it exists; corruption and storage failures are errors, never `None`.
    async fn get_optional(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.get_verified(key).await {
            Ok(v) => Ok(Some(v)),
            Err(RepoError::Storage(StorageError::NotFound { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn put_wal_file(&self, name: &WalFileName, content: &[u8]) -> Result<PutOutcome> {
        self.put_immutable(&layout::wal_key(name), &name.to_string(), content)
            .await
    }

    /// WAL file `name` framed for storing, as archive-push frames a segment (`lz4-blocks` in an
    /// unencrypted lz4 repository, in `out`, a spare buffer: [`ObjectCodec::encode_reusing`]),
    /// for a caller that lets the content go before the upload: the stream frees a segment's
    /// buffer for the next one while the object is on its way to a distant object store.
    pub fn encode_wal_file(&self, name: &WalFileName, content: &[u8], out: Vec<u8>) -> EncodedWal {
        let key = layout::wal_key(name);
        let framed = self.objects.encode_reusing(&key, content, out);
        EncodedWal {
            key,
            name: name.to_string(),
            framed,
        }
    }

    /// Stores `e` as [`Repository::put_wal_file`] stores its content: unless it is there
    /// already, and then identical content is success and different content is refused.
    pub async fn put_encoded_wal(&self, e: &EncodedWal) -> Result<PutOutcome> {
        // The content itself was let go: the framed object gives it back if needed.
        self.put_framed(&e.key, &e.name, e.framed.clone(), None)
            .await
    }

    /// Whether WAL file `name` is stored (a HEAD: nothing is read).
    pub async fn has_wal_file(&self, name: &WalFileName) -> Result<bool> {
        self.exists(&layout::wal_key(name)).await
    }

    pub async fn get_wal_file(&self, name: &WalFileName) -> Result<Option<Vec<u8>>> {
        match self.get_optional(&layout::wal_key(name)).await? {
            Some(content) => Ok(Some(self.resolve_chunked(name, content).await?)),
            None => Ok(None),
        }
    }
}

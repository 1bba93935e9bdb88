//! The repository: layout of keys, the descriptor, and verified reads and writes of objects.
//!
//! Uses `storage` to move bytes and `codec` to frame them; knows WAL file names but nothing of
//! the replication protocol. The format is specified in docs/repository-format.md.

mod backups;
mod catalog;
mod chunks;
mod descriptor;
mod layout;
mod object;
mod scan;
mod stats;
mod summary;
#[cfg(test)]
mod tests_memory;
mod wal;

use bytes::Bytes;

pub use backups::{StoredObject, DEFAULT_ABANDONED_AFTER, LEASE_REFRESH};
pub use catalog::{BackupArchive, BackupInfo, BackupSource, TimelineWal, WalInventory};
pub use chunks::{plan_chain, ChunkPlan, ChunkRef, WalForRecovery, WalScan};
pub use descriptor::{ClusterIdentity, Descriptor, FORMAT_VERSION};
pub use scan::{wal_file_key, BackupItem, ObjectKind, ScannedObject};
pub use stats::{probe, RepositoryUsage};
pub use summary::{Carry, StoredSummary, SummaryOutcome, MAX_CARRY_BYTES};
pub use wal::Histories;

use crate::codec::{Codec, CodecError};
use crate::error::{Classify, Code};
use crate::storage::{Storage, StorageError};
use crate::wal::WalFileName;
use object::{ObjectCodec, Payload};

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
    #[error("descriptor {key} is unreadable: {message}")]
    BadDescriptor { key: String, message: String },
}

impl Classify for RepoError {
    fn code(&self) -> Code {
        match self {
            RepoError::Storage(e) => e.code(),
            RepoError::Corrupt { .. }
            | RepoError::BadDescriptor { .. }
            | RepoError::BadHistory { .. } => Code::Corrupt,
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
            RepoError::Corrupt { .. } => {
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
            RepoError::SegmentSizeMismatch { .. } | RepoError::BadDescriptor { .. } => {
                return None
            }
        };
        Some(hint.into())
    }
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// How content is compressed when written.
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    pub codec: Codec,
    pub level: i32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            codec: Codec::Lz4,
            level: 3,
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
    pub async fn open(storage: Storage, write: WriteOptions) -> Result<Repository> {
        match descriptor::read(&storage).await? {
            Some(descriptor) => Ok(Repository {
                storage,
                descriptor,
                objects: ObjectCodec { write },
            }),
            None => {
                // Tell "bucket missing / unreachable" apart from "empty location".
                storage.check_reachable().await?;
                Err(RepoError::NotInitialized {
                    location: storage.location().to_string(),
                })
            }
        }
    }

    /// Opens the repository for `cluster`, creating the descriptor if this is the first write.
    /// Refuses a repository that belongs to another cluster.
    pub async fn open_for_cluster(
        storage: Storage,
        cluster: &ClusterIdentity,
        what: &str,
        write: WriteOptions,
    ) -> Result<Repository> {
        let descriptor = match descriptor::read(&storage).await? {
            Some(d) => d,
            None => {
                storage.check_reachable().await?;
                descriptor::create(&storage, cluster).await?
            }
        };
        Repository::for_cluster(storage, descriptor, cluster, what, write)
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
        Repository::for_cluster(repo.storage, repo.descriptor, cluster, what, write)
    }

    fn for_cluster(
        storage: Storage,
        descriptor: Descriptor,
        cluster: &ClusterIdentity,
        what: &str,
        write: WriteOptions,
    ) -> Result<Repository> {
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
        Ok(Repository {
            storage,
            descriptor,
            objects: ObjectCodec { write },
        })
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
        let framed = self.objects.encode(key, content, Payload::Data);
        match self.storage.put_if_absent(key, Bytes::from(framed)).await {
            Ok(()) => Ok(PutOutcome::Stored),
            Err(StorageError::AlreadyExists { .. }) => {
                self.check_identical(key, name, content).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// After a conditional create found `key` taken: `AlreadyStored` when it holds `content`.
    async fn check_identical(&self, key: &str, name: &str, content: &[u8]) -> Result<PutOutcome> {
        let stored = self.get_verified(key).await?;
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

    /// Whether WAL file `name` is stored (a HEAD: nothing is read).
    pub async fn has_wal_file(&self, name: &WalFileName) -> Result<bool> {
        self.exists(&layout::wal_key(name)).await
    }

    pub async fn get_wal_file(&self, name: &WalFileName) -> Result<Option<Vec<u8>>> {
        self.get_optional(&layout::wal_key(name)).await
    }
}

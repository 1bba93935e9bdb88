//! Object-store backends behind one small type. Knows nothing of PostgreSQL.
//!
//! [`Storage`] is what the rest of pitr holds: a [`Backend`] (our own local directory backend, or
//! `object_store` for S3, GCS and Azure) plus the retry policy for transient errors. Keys are
//! `/`-separated relative paths; the backend maps them under the repository root.
//! [`Storage::in_memory`] is a repository in memory for unit tests of repository rules.
//!
//! Contract every backend keeps (pinned by the shared contract tests):
//! - `put_if_absent` is atomic and never replaces an existing object: of two writers racing for
//!   one key, exactly one wins and the other gets [`StorageError::AlreadyExists`];
//! - an object is durable when a put returns `Ok`;
//! - nothing half-written is ever visible under a key;
//! - a missing object is [`StorageError::NotFound`], never a generic error.

mod local;
mod location;
mod memory;
mod object;
mod options;
mod pool;
mod requests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Classify, Code};
use requests::Kind;

pub use local::{LocalBackend, LocalUpload, TMP_PREFIX as LOCAL_TMP_PREFIX};
pub use location::{Location, LocationError, S3Settings};
pub use object::ObjectStoreBackend;
pub use options::{AzureSettings, BackendOptions, GcsSettings, AZURITE_ACCOUNT, AZURITE_KEY};
pub use pool::BufferPool;
pub use requests::{RequestCounts, METRIC_BYTES, METRIC_REQUESTS};

/// One stored object, as returned by [`Storage::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("object {key} already exists")]
    AlreadyExists { key: String },
    /// Worth retrying: network errors, timeouts, 5xx, throttling.
    #[error("{op} {key}: {message}")]
    Transient {
        op: &'static str,
        key: String,
        message: String,
    },
    /// Retrying will not help: bad credentials, a missing bucket, a permission error.
    #[error("{op} {key}: {message}")]
    Permanent {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("{op} {key}: access denied: {message}")]
    AccessDenied {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("{op} {key}: gave up after retrying for {elapsed:?}: {last}")]
    RetriesExhausted {
        op: &'static str,
        key: String,
        elapsed: Duration,
        last: Box<StorageError>,
    },
}

impl Classify for StorageError {
    fn code(&self) -> Code {
        Code::Storage
    }

    fn hint(&self) -> Option<String> {
        let hint = match self {
            StorageError::AccessDenied { .. } => {
                "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the config file) and permissions"
            }
            // object_store's own wording (English whatever the locale), not a server's.
            StorageError::Permanent { message, .. } if message.contains("bucket") => {
                "create the bucket first, or fix the bucket name in --repo"
            }
            StorageError::RetriesExhausted { .. } => {
                "the storage was unreachable; check the endpoint and network, or raise --storage-retry-timeout"
            }
            StorageError::NotFound { .. }
            | StorageError::AlreadyExists { .. }
            | StorageError::Transient { .. }
            | StorageError::Permanent { .. } => return None,
        };
        Some(hint.into())
    }
}

impl StorageError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StorageError::Transient { .. })
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What a storage backend must do. Kept small on purpose: every operation here must have the
/// same meaning on a local disk and on every object store.
#[async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `key` unless an object is there already. Durable when it returns.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()>;
    /// Stores `data` under `key`, replacing any previous object atomically. Only for objects
    /// that are mutable by design (never WAL or backup data).
    async fn put_overwrite(&self, key: &str, data: Bytes) -> Result<()>;
    async fn get(&self, key: &str) -> Result<Bytes>;
    /// [`Backend::get`] into `buf` (cleared first), for callers that read many large objects
    /// and reuse one buffer: no fresh memory to fault in per object where the backend can fill
    /// it (a local directory). Elsewhere the body arrives in its own buffer, and `buf` goes.
    async fn get_into(&self, key: &str, buf: Vec<u8>) -> Result<Vec<u8>> {
        drop(buf);
        self.get(key).await.map(Vec::from)
    }
    /// Size of the object, or `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<u64>>;
    /// Every object whose key starts with `prefix` (a `/`-terminated folder, or "" for all),
    /// in no particular order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Names of the immediate sub-folders of `prefix` (a `/`-terminated folder), e.g. the backup
    /// ids under `backups/`, without listing everything below them.
    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>>;
    /// Removes `key`; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Checks that the repository location exists and is reachable, e.g. that the bucket exists.
    async fn check_reachable(&self) -> Result<()>;
    /// An object written as it is produced, for backends that can (a local directory); `None`
    /// elsewhere, where the caller gathers the object and uses `put_if_absent`. Blocking.
    fn upload(&self, _key: &str) -> Option<Result<LocalUpload>> {
        None
    }
}

/// A storage backend plus the policy for transient errors, counting the requests it sends.
#[derive(Clone, Debug)]
pub struct Storage {
    backend: Arc<dyn Backend>,
    retry_for: Duration,
    location: Location,
    requests: Arc<requests::Counter>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Storage {
    /// Opens the backend for `location`. Transient errors are retried for up to `retry_for`.
    pub fn open(location: &Location, retry_for: Duration) -> Result<Storage, LocationError> {
        let backend: Arc<dyn Backend> = match location {
            Location::Local(path) => Arc::new(LocalBackend::new(path.clone())),
            _ => Arc::new(ObjectStoreBackend::new(location)?),
        };
        Ok(Storage::from_backend(backend, location.clone(), retry_for))
    }

    pub fn from_backend(
        backend: Arc<dyn Backend>,
        location: Location,
        retry_for: Duration,
    ) -> Storage {
        Storage {
            backend,
            retry_for,
            location,
            requests: Arc::default(),
        }
    }

    /// Requests sent by this storage and its clones since it was opened, retries included.
    pub fn requests(&self) -> RequestCounts {
        self.requests.snapshot()
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Runs `op`, retrying transient errors with exponential backoff until `retry_for` is spent.
    async fn retry<T, F, Fut>(&self, op: &'static str, key: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            match f().await {
                Err(e) if e.is_transient() => {
                    let elapsed = start.elapsed();
                    if elapsed + backoff > self.retry_for {
                        return Err(StorageError::RetriesExhausted {
                            op,
                            key: key.to_string(),
                            elapsed,
                            last: Box::new(e),
                        });
                    }
                    tracing::warn!(%e, retry_in = ?backoff, "storage error, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                other => return other,
            }
        }
    }

    /// A streamed `put_if_absent` where the backend has one (see [`Backend::upload`]); counted
    /// as one put. Blocking (creates the temporary file).
    pub fn upload(&self, key: &str) -> Option<Result<LocalUpload>> {
        let up = self.backend.upload(key)?;
        self.requests.request(Kind::Put, 1);
        Some(up)
    }

    pub async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()> {
        self.retry("put", key, || {
            self.requests.request(Kind::Put, 1);
            self.requests.bytes_up(data.len());
            self.backend.put_if_absent(key, data.clone())
        })
        .await
    }
    pub async fn put_overwrite(&self, key: &str, data: Bytes) -> Result<()> {
        self.retry("put", key, || {
            self.requests.request(Kind::Put, 1);
            self.requests.bytes_up(data.len());
            self.backend.put_overwrite(key, data.clone())
        })
        .await
    }
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let data = self
            .retry("get", key, || {
                self.requests.request(Kind::Get, 1);
                self.backend.get(key)
            })
            .await?;
        self.requests.bytes_down(data.len());
        Ok(data)
    }
    /// [`Storage::get`], read into `buf` where the backend can (see [`Backend::get_into`]). A
    /// transient failure is retried as `get` retries it.
    pub async fn get_into(&self, key: &str, buf: Vec<u8>) -> Result<Bytes> {
        self.requests.request(Kind::Get, 1);
        let data = match self.backend.get_into(key, buf).await {
            Ok(data) => Bytes::from(data),
            Err(e) if e.is_transient() => return self.get(key).await,
            Err(e) => return Err(e),
        };
        self.requests.bytes_down(data.len());
        Ok(data)
    }
    pub async fn head(&self, key: &str) -> Result<Option<u64>> {
        self.retry("head", key, || {
            self.requests.request(Kind::Head, 1);
            self.backend.head(key)
        })
        .await
    }
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let out = self
            .retry("list", prefix, || async {
                let r = self.backend.list(prefix).await;
                let keys = r.as_ref().map_or(0, Vec::len);
                self.requests
                    .request(Kind::List, requests::list_pages(keys));
                r
            })
            .await?;
        Ok(out)
    }
    pub async fn list_folders(&self, prefix: &str) -> Result<Vec<String>> {
        self.retry("list", prefix, || async {
            let r = self.backend.list_folders(prefix).await;
            let keys = r.as_ref().map_or(0, Vec::len);
            self.requests
                .request(Kind::List, requests::list_pages(keys));
            r
        })
        .await
    }
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.retry("delete", key, || {
            self.requests.request(Kind::Delete, 1);
            self.backend.delete(key)
        })
        .await
    }
    pub async fn check_reachable(&self) -> Result<()> {
        self.retry("open", "", || {
            self.requests.request(Kind::List, 1);
            self.backend.check_reachable()
        })
        .await
    }
}

#[doc(hidden)]
pub mod contract;

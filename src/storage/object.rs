//! S3, GCS and Azure through the `object_store` crate.
//!
//! Immutable objects use `PutMode::Create`, which object_store turns into `If-None-Match: *` on
//! S3 (honoured by AWS since 2024, R2 and MinIO), a generation precondition on GCS and
//! `If-None-Match` on Azure: the store itself refuses to replace an object, so two writers can
//! never overwrite each other's bytes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::{
    AzureSettings, Backend, GcsSettings, Location, LocationError, ObjectInfo, Result, S3Settings,
    StorageError, AZURITE_KEY,
};

#[derive(Debug)]
pub struct ObjectStoreBackend {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
}

// Our own retry loop (in `Storage`) owns the overall time budget; object_store's retries only
// smooth over single hiccups, so they are kept short.
fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
}

/// A secret kept in a file: its content, one trailing newline stripped.
fn read_secret(path: &std::path::Path, what: &str) -> Result<String, String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let s = s.strip_suffix('\n').unwrap_or(&s);
    Ok(s.strip_suffix('\r').unwrap_or(s).to_string())
}

// Configuration keys are applied after `from_env`: a key in the file names this repository
// and wins over the environment every process shares.
fn s3_store(bucket: &str, settings: &S3Settings) -> Result<AmazonS3, String> {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry_config())
        .with_client_options(client_options());
    if let Some(v) = &settings.endpoint {
        b = b.with_endpoint(v);
    }
    if let Some(v) = &settings.region {
        b = b.with_region(v);
    }
    if let Some(v) = &settings.access_key_id {
        b = b.with_access_key_id(v);
    }
    if let Some(v) = &settings.secret_access_key {
        b = b.with_secret_access_key(v);
    }
    if let Some(p) = &settings.secret_access_key_file {
        b = b.with_secret_access_key(read_secret(p, "secret_access_key_file")?);
    }
    if let Some(v) = settings.virtual_hosted_style {
        b = b.with_virtual_hosted_style_request(v);
    }
    // An http:// endpoint (MinIO or s3s on a private network) is an explicit choice.
    let endpoint = settings
        .endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT").ok());
    if settings.allow_http == Some(true) || endpoint.is_some_and(|e| e.starts_with("http://")) {
        b = b.with_allow_http(true);
    }
    b.build().map_err(|e| e.to_string())
}

fn gcs_store(bucket: &str, settings: &GcsSettings) -> Result<GoogleCloudStorage, String> {
    let mut b = GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry_config())
        .with_client_options(client_options());
    if let Some(p) = &settings.service_account_file {
        b = b.with_service_account_path(p.display().to_string());
    }
    if let Some(k) = &settings.service_account_key {
        b = b.with_service_account_key(k);
    }
    if let Some(e) = &settings.endpoint {
        b = b.with_base_url(e.trim_end_matches('/'));
        if e.starts_with("http://") {
            b = b.with_client_options(client_options().with_allow_http(true));
        }
    }
    b.build().map_err(|e| e.to_string())
}

fn azure_store(container: &str, settings: &AzureSettings) -> Result<MicrosoftAzure, String> {
    let mut b = MicrosoftAzureBuilder::from_env()
        .with_container_name(container)
        .with_retry(retry_config())
        .with_client_options(client_options());
    let (account, endpoint) = settings.resolved_endpoint();
    if let Some(a) = account {
        b = b.with_account(a);
    }
    if let Some(e) = endpoint {
        if e.starts_with("http://") {
            b = b.with_client_options(client_options().with_allow_http(true));
        }
        b = b.with_endpoint(e);
    }
    // `use_emulator` in the file replaces object_store's emulator mode (and its variable), whose
    // address comes only from an environment variable; without the key the variable applies.
    if settings.use_emulator.is_some() {
        b = b.with_use_emulator(false);
    }
    match (&settings.access_key, settings.sas_pairs()) {
        (Some(k), _) => b = b.with_access_key(k),
        (None, Some(pairs)) => b = b.with_sas_authorization(pairs),
        (None, None) if settings.use_emulator == Some(true) => b = b.with_access_key(AZURITE_KEY),
        (None, None) => {}
    }
    b.build().map_err(|e| e.to_string())
}

impl ObjectStoreBackend {
    pub fn new(location: &Location) -> Result<ObjectStoreBackend, LocationError> {
        let url = location.to_string();
        let err = |reason: String| LocationError {
            url: url.clone(),
            reason,
        };
        let (store, prefix): (Arc<dyn ObjectStore>, &str) = match location {
            Location::S3 {
                bucket,
                prefix,
                settings,
            } => (Arc::new(s3_store(bucket, settings).map_err(err)?), prefix),
            Location::Gcs {
                bucket,
                prefix,
                settings,
            } => (Arc::new(gcs_store(bucket, settings).map_err(err)?), prefix),
            Location::Azure {
                container,
                prefix,
                settings,
            } => (
                Arc::new(azure_store(container, settings).map_err(err)?),
                prefix,
            ),
            Location::Local(_) => unreachable!("local repositories use LocalBackend"),
        };
        Ok(Self::from_store(store, prefix, url))
    }

    /// A backend over any `object_store` store, with keys under `prefix` (no slashes around it).
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: &str, url: String) -> Self {
        ObjectStoreBackend {
            store,
            prefix: prefix.to_string(),
            url,
        }
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn key_of(&self, path: &ObjectPath) -> String {
        let full = path.as_ref();
        if self.prefix.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&self.prefix)
                .map(|k| k.trim_start_matches('/'))
                .unwrap_or(full)
                .to_string()
        }
    }
}

fn map_err(op: &'static str, key: &str, e: object_store::Error) -> StorageError {
    let key = key.to_string();
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound { key },
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            StorageError::AlreadyExists { key }
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => StorageError::AccessDenied {
            op,
            key,
            message: e.to_string(),
        },
        object_store::Error::InvalidPath { .. }
        | object_store::Error::NotSupported { .. }
        | object_store::Error::NotImplemented { .. } => StorageError::Permanent {
            op,
            key,
            message: e.to_string(),
        },
        other => {
            let message = other.to_string();
            match http_status(&message) {
                _ if message.contains("NoSuchBucket") => StorageError::Permanent {
                    op,
                    key,
                    message: format!("the bucket does not exist ({message})"),
                },
                Some(401 | 403) => StorageError::AccessDenied { op, key, message },
                // Other 4xx answers will not change by asking again; 408 and 429 will.
                Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => {
                    StorageError::Permanent { op, key, message }
                }
                // Transport errors, timeouts, throttling and 5xx that outlived object_store's
                // own short retries: our retry loop keeps trying within its time budget.
                _ => StorageError::Transient { op, key, message },
            }
        }
    }
}

/// The HTTP status in an object_store error message. object_store maps only a few statuses to
/// error variants (list requests not even those) and keeps its `RetryError`, which carries the
/// status, in a private module: its message is the only place the status can be read.
fn http_status(message: &str) -> Option<u16> {
    let at = message.find("status code: ")? + "status code: ".len();
    message.get(at..at + 3)?.parse().ok()
}

#[async_trait]
impl Backend for ObjectStoreBackend {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store
            .put_opts(&self.path(key), PutPayload::from(data), opts)
            .await
            .map_err(|e| map_err("put", key, e))?;
        Ok(())
    }

    async fn put_overwrite(&self, key: &str, data: Bytes) -> Result<()> {
        self.store
            .put(&self.path(key), PutPayload::from(data))
            .await
            .map_err(|e| map_err("put", key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let res = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| map_err("get", key, e))?;
        res.bytes().await.map_err(|e| map_err("get", key, e))
    }

    /// The body streamed into the buffer it is given, sized once from the response's length,
    /// as the local backend does: restore reads parts ahead into buffers it reuses, where
    /// collecting each body into a fresh buffer held ~4 MiB more (8 parts in flight: peak RSS
    /// 59-60 vs 63-64 MiB).
    async fn get_into(&self, key: &str, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        let res = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| map_err("get", key, e))?;
        buf.clear();
        buf.reserve(usize::try_from(res.meta.size).unwrap_or(0));
        let mut body = res.into_stream();
        while let Some(chunk) = body.try_next().await.map_err(|e| map_err("get", key, e))? {
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(map_err("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let base = self.path(prefix.trim_end_matches('/'));
        let base = if base.as_ref().is_empty() {
            None
        } else {
            Some(&base)
        };
        let metas: Vec<_> = self
            .store
            .list(base)
            .try_collect()
            .await
            .map_err(|e| map_err("list", prefix, e))?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .map(|m| ObjectInfo {
                key: self.key_of(&m.location),
                size: m.size,
            })
            .collect();
        out.retain(|o| o.key.starts_with(prefix));
        Ok(out)
    }

    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>> {
        let base = self.path(prefix.trim_end_matches('/'));
        let base = if base.as_ref().is_empty() {
            None
        } else {
            Some(&base)
        };
        let res = self
            .store
            .list_with_delimiter(base)
            .await
            .map_err(|e| map_err("list", prefix, e))?;
        Ok(res
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err("delete", key, e)),
        }
    }

    async fn check_reachable(&self) -> Result<()> {
        // One LIST request: it fails with NotFound on a missing bucket and AccessDenied on bad
        // credentials, which a GET of a missing key could not tell apart.
        let base = if self.prefix.is_empty() {
            None
        } else {
            Some(ObjectPath::from(self.prefix.as_str()))
        };
        match self.store.list_with_delimiter(base.as_ref()).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::Permanent {
                op: "open",
                key: self.url.clone(),
                message: "the bucket does not exist".into(),
            }),
            Err(e) => Err(map_err("open", &self.url, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::BackendOptions;

    fn open(url: &str, o: &BackendOptions) -> Result<ObjectStoreBackend, LocationError> {
        ObjectStoreBackend::new(&Location::parse(url).unwrap().with_options(o))
    }

    #[test]
    fn every_backend_opens_from_its_table_alone() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cr3t\n").unwrap();
        let sa = dir.path().join("sa.json");
        std::fs::write(
            &sa,
            r#"{"private_key": "k", "private_key_id": "i", "client_email": "e", "disable_oauth": true}"#,
        )
        .unwrap();
        let o = BackendOptions {
            s3: Some(S3Settings {
                endpoint: Some("http://127.0.0.1:1".into()),
                access_key_id: Some("id".into()),
                secret_access_key_file: Some(secret),
                ..Default::default()
            }),
            gcs: Some(GcsSettings {
                service_account_file: Some(sa),
                endpoint: Some("http://127.0.0.1:1".into()),
                ..Default::default()
            }),
            azure: Some(AzureSettings {
                account: Some("acct".into()),
                sas_token: Some("?sv=2022-11-02&sig=abc".into()),
                ..Default::default()
            }),
        };
        for url in ["s3://b/p", "gs://b/p", "az://c/p"] {
            open(url, &o).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        let emulator = BackendOptions {
            azure: Some(AzureSettings {
                use_emulator: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        open("az://c/p", &emulator).unwrap();
    }

    #[test]
    fn a_missing_secret_file_is_named() {
        let o = BackendOptions {
            s3: Some(S3Settings {
                secret_access_key_file: Some("/nonexistent/pitr-secret".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = open("s3://b/p", &o).unwrap_err();
        assert!(e.reason.contains("/nonexistent/pitr-secret"), "{e}");
    }

    #[test]
    fn a_secret_file_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "abc\r\n").unwrap();
        assert_eq!(read_secret(&p, "x").unwrap(), "abc");
        std::fs::write(&p, "abc\n\n").unwrap();
        assert_eq!(read_secret(&p, "x").unwrap(), "abc\n");
    }

    #[test]
    fn reads_the_status_from_object_store_messages() {
        let m = "Error performing GET http://x/b in 1ms - Server returned non-2xx status code: 404 Not Found: <Error>";
        assert_eq!(super::http_status(m), Some(404));
        assert_eq!(super::http_status("connection refused"), None);
    }
}

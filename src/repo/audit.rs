//! The audit trail: one immutable object per command that changed the repository or restored
//! from it, under `audit/` (docs/repository-format.md, "Audit trail").
//!
//! A command writes `audit/<stem>.started` before it changes anything, so that a repository
//! that refuses the audit record refuses the command too (no silent gaps), and a command that
//! dies mid-way still leaves a trace. When it ends it writes `audit/<stem>.json`, the record,
//! and removes its `.started` object. `<stem>` is `<UTC time>-<host>-<pid>`, so key order is
//! time order. Both objects are created with a conditional create and never rewritten.

use std::future::Future;
use std::sync::OnceLock;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{ClusterIdentity, RepoError, Result};
use crate::codec::{self, Codec};
use crate::storage::{Storage, StorageError};

/// Folder of the audit trail.
pub const AUDIT_PREFIX: &str = "audit/";
/// Suffix of a finished command's record.
const RECORD_SUFFIX: &str = ".json";
/// Suffix of the object a command writes when it starts, removed once its record is written.
const STARTED_SUFFIX: &str = ".started";

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    /// Written in the `.started` object: the command has not ended yet.
    Started,
    Success,
    Failure,
    /// Listed for a `.started` object without a record: the command was killed, or is still
    /// running.
    Unfinished,
}

/// One audit object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The subcommand: `backup`, `expire`, `restore`, `drill`, `create-repository`, ...
    pub command: String,
    /// The command line after the program name, with secrets replaced by `***`.
    pub arguments: Vec<String>,
    /// The OS user that ran the command.
    pub user: String,
    pub host: String,
    pub pid: u32,
    pub pitr_version: String,
    pub started: DateTime<Utc>,
    pub finished: Option<DateTime<Utc>>,
    pub outcome: AuditOutcome,
    pub exit_code: Option<u8>,
    pub error: Option<String>,
    /// What the command created: `backup <id>`, `restored backup <id> into <dir>`, ...
    #[serde(default)]
    pub created: Vec<String>,
    /// What it deleted: `backup <id>`, `<n> WAL objects (<bytes> bytes)`, ...
    #[serde(default)]
    pub deleted: Vec<String>,
    /// Command-specific facts (a drill's measured RTO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl AuditRecord {
    /// A record for a command starting now, in this process.
    pub fn starting(command: &str, arguments: Vec<String>) -> AuditRecord {
        AuditRecord {
            command: command.to_string(),
            arguments,
            user: os_user(),
            host: host_name(),
            pid: std::process::id(),
            pitr_version: env!("CARGO_PKG_VERSION").to_string(),
            started: Utc::now(),
            finished: None,
            outcome: AuditOutcome::Started,
            exit_code: None,
            error: None,
            created: vec![],
            deleted: vec![],
            details: None,
        }
    }

    /// `<UTC time>-<host>-<pid>`: unique per process and sorted by time.
    fn stem(&self) -> String {
        let host: String = self
            .host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!(
            "{}-{host}-{}",
            self.started.format("%Y%m%dT%H%M%S%.6fZ"),
            self.pid
        )
    }
}

/// The audit trail of a repository location. Works on the storage, not on an open
/// [`super::Repository`]: the first command against a location writes its record before the
/// repository descriptor exists.
#[derive(Clone, Debug)]
pub struct AuditLog {
    storage: Storage,
}

/// A command's entry, begun and not yet finished.
#[derive(Debug)]
pub struct AuditEntry {
    storage: Storage,
    stem: String,
    pub record: AuditRecord,
}

impl AuditLog {
    pub fn new(storage: Storage) -> AuditLog {
        AuditLog { storage }
    }

    /// Writes the `.started` object. Fails when the repository refuses it: the caller must
    /// not go on to change anything.
    pub async fn begin(&self, record: AuditRecord) -> Result<AuditEntry> {
        let stem = record.stem();
        put_new(
            &self.storage,
            &format!("{AUDIT_PREFIX}{stem}{STARTED_SUFFIX}"),
            &record,
        )
        .await?;
        Ok(AuditEntry {
            storage: self.storage.clone(),
            stem,
            record,
        })
    }

    /// Every record that started at or after `since`, oldest first. A `.started` object
    /// without a record is listed with outcome `unfinished`.
    pub async fn list(&self, since: Option<DateTime<Utc>>) -> Result<Vec<AuditRecord>> {
        let objects = self.storage.list(AUDIT_PREFIX).await?;
        let keys: std::collections::BTreeSet<&str> =
            objects.iter().map(|o| o.key.as_str()).collect();
        let mut out = vec![];
        for key in &keys {
            let unfinished = match key.strip_suffix(STARTED_SUFFIX) {
                Some(stem) if keys.contains(format!("{stem}{RECORD_SUFFIX}").as_str()) => continue,
                Some(_) => true,
                None if key.ends_with(RECORD_SUFFIX) => false,
                None => continue,
            };
            let mut record = read(&self.storage, key).await?;
            if unfinished {
                record.outcome = AuditOutcome::Unfinished;
            }
            if since.is_none_or(|s| record.started >= s) {
                out.push(record);
            }
        }
        out.sort_by_key(|r| r.started);
        Ok(out)
    }
}

impl AuditEntry {
    /// Writes the record with its outcome, then removes the `.started` object (a failure to
    /// remove it is only a warning: the record that supersedes it is stored).
    pub async fn finish(mut self, exit_code: u8, error: Option<String>) -> Result<AuditRecord> {
        self.record.finished = Some(Utc::now());
        self.record.exit_code = Some(exit_code);
        self.record.outcome = if exit_code == 0 {
            AuditOutcome::Success
        } else {
            AuditOutcome::Failure
        };
        self.record.error = error;
        let key = format!("{AUDIT_PREFIX}{}{RECORD_SUFFIX}", self.stem);
        put_new(&self.storage, &key, &self.record).await?;
        let started = format!("{AUDIT_PREFIX}{}{STARTED_SUFFIX}", self.stem);
        if let Err(e) = self.storage.delete(&started).await {
            tracing::warn!(key = %started, error = %e, "cannot remove the audit start marker");
        }
        Ok(self.record)
    }
}

/// The command line of this process (secrets removed), set by the CLI: repository creation,
/// which any writer may do, records itself with it.
static INVOCATION: OnceLock<Vec<String>> = OnceLock::new();

/// Sets the command line that [`creating_repository`] records; the first call wins.
pub fn set_invocation(arguments: Vec<String>) {
    let _ = INVOCATION.set(arguments);
}

/// Runs `create` (the descriptor's creation) inside a `create-repository` audit entry, when
/// this process is the CLI. A refused audit record refuses the creation.
pub(super) async fn creating_repository<T>(
    storage: &Storage,
    cluster: &ClusterIdentity,
    create: impl Future<Output = Result<T>>,
) -> Result<T> {
    let Some(arguments) = INVOCATION.get() else {
        return create.await;
    };
    let mut record = AuditRecord::starting("create-repository", arguments.clone());
    record.created = vec![format!(
        "repository for PostgreSQL {} system {}",
        cluster.pg_major, cluster.system_identifier
    )];
    let entry = AuditLog::new(storage.clone()).begin(record).await?;
    let result = create.await;
    let error = result.as_ref().err().map(|e| e.to_string());
    entry.finish(u8::from(error.is_some()), error).await?;
    result
}

/// Stores `record` under `key`, which must not exist: an audit object is never replaced.
async fn put_new(storage: &Storage, key: &str, record: &AuditRecord) -> Result<()> {
    let json = serde_json::to_vec_pretty(record).expect("audit record serializes");
    // Uncompressed, like the descriptor: `tail -c +41` shows it to a human.
    let framed = codec::encode(&json, Codec::None, 0);
    match storage
        .put_if_absent(key, Bytes::from(framed.clone()))
        .await
    {
        // An object store kept a PUT whose answer was lost: the retry finds our own bytes.
        Err(StorageError::AlreadyExists { .. }) if storage.get(key).await? == framed => Ok(()),
        other => Ok(other?),
    }
}

async fn read(storage: &Storage, key: &str) -> Result<AuditRecord> {
    let bytes = storage.get(key).await?;
    let raw = codec::decode(&bytes).map_err(|source| RepoError::Corrupt {
        key: key.to_string(),
        source,
    })?;
    serde_json::from_slice(&raw).map_err(|e| RepoError::BadAudit {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// The host name, from the kernel (no libc call: the crate forbids unsafe code).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// The name of the effective OS user (from /etc/passwd), else its uid.
fn os_user() -> String {
    let uid = rustix::process::geteuid().as_raw();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_sort_by_time_and_are_safe_keys() {
        let mut a = AuditRecord::starting("backup", vec![]);
        a.host = "db 1/x".into();
        a.pid = 42;
        a.started = "2026-12-04T08:45:24.5Z".parse().unwrap();
        assert_eq!(a.stem(), "20261204T084524.500000Z-db_1_x-42");
        let mut b = a.clone();
        b.started = "2026-12-04T10:00:00Z".parse().unwrap();
        assert!(a.stem() < b.stem());
    }

    #[test]
    fn records_round_trip() {
        let r = AuditRecord::starting("expire", vec!["--retain-full".into(), "2".into()]);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"outcome\":\"started\""), "{json}");
        assert_eq!(serde_json::from_str::<AuditRecord>(&json).unwrap(), r);
    }
}

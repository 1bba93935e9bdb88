//! Exit codes and the one clear message each failure gets. Documented in docs/exit-codes.md;
//! keep the two in step.

use std::process::ExitCode;

use crate::archive::ArchiveError;
use crate::config::ConfigError;
use crate::repo::RepoError;
use crate::restore::RestoreError;
use crate::storage::StorageError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    /// archive-get: the repository does not have the file (end of archive).
    NotFound = 1,
    /// Bad command-line usage.
    Usage = 2,
    /// Bad input: a file that is not WAL, a malformed URL, an invalid config file.
    Input = 3,
    /// The repository refuses: another cluster's, a newer format, different content under a name.
    Conflict = 4,
    /// Storage failed (after retrying transient errors): unreachable, missing bucket, denied.
    Storage = 5,
    /// A stored object failed its checksum.
    Corrupt = 6,
    /// PostgreSQL refused or failed: connection, authentication, privileges, protocol.
    Postgres = 7,
    /// restore refused before writing anything: target outside the recoverable window,
    /// non-empty directory, no usable backup.
    RestoreRefused = 8,
    /// A backup or restore failed part-way (nothing usable was published or the directory must
    /// be emptied before retrying).
    JobFailed = 9,
    /// verify found problems that put a restore at risk (the report lists them).
    VerifyFailed = 10,
    /// stream: the server no longer has WAL the repository needs next; continuity is broken.
    WalGap = 11,
    /// Internal error (a bug).
    Internal = 70,
    /// archive-get: any failure other than "not found". Above 125, so PostgreSQL aborts recovery.
    RecoveryFatal = 200,
}

impl From<Code> for ExitCode {
    fn from(c: Code) -> ExitCode {
        ExitCode::from(c as u8)
    }
}

/// A failure as the user sees it: exit code, one message, and what to do about it.
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(code: Code, message: impl ToString, hint: Option<String>) -> Failure {
        Failure {
            code,
            message: message.to_string(),
            hint,
        }
    }

    /// For archive-get every failure must stop recovery.
    fn for_command(mut self, is_get: bool) -> Failure {
        if is_get {
            self.code = Code::RecoveryFatal;
        }
        self
    }

    pub fn from_config(e: ConfigError, is_get: bool) -> Failure {
        let hint = match &e {
            ConfigError::Parse { .. } => {
                Some("check the key names against docs/configuration.md".to_string())
            }
            _ => None,
        };
        Failure::new(Code::Input, e, hint).for_command(is_get)
    }

    pub fn input(e: impl ToString, is_get: bool) -> Failure {
        Failure::new(Code::Input, e, None).for_command(is_get)
    }

    /// A PostgreSQL connection or protocol failure, with the fix for the common causes.
    pub fn from_pg(e: crate::pg::Error) -> Failure {
        let hint = if matches!(e, crate::pg::Error::Auth { .. }) {
            Some("check the user and password (PGPASSWORD, ~/.pgpass or the connection string)")
        } else if e.is_insufficient_privilege() {
            Some("the role needs REPLICATION (ALTER ROLE name REPLICATION) and a pg_hba.conf line for `replication`")
        } else if e.to_string().contains("max_wal_senders (currently 0)") {
            // Also SQLSTATE 53300, like busy senders, but raising nothing else will help.
            Some("replication needs wal_level = replica (or logical) and max_wal_senders > 0 on the server")
        } else if e.is_too_many_connections() {
            Some("all WAL senders are busy: raise max_wal_senders or stop another replication client")
        } else if matches!(e, crate::pg::Error::UnsupportedServerVersion { .. }) {
            Some("pitr supports PostgreSQL 13 and later")
        } else {
            None
        };
        Failure::new(Code::Postgres, e, hint.map(str::to_string))
    }

    pub fn from_repo(e: RepoError) -> Failure {
        classify_repo(e)
    }

    pub fn from_restore(e: RestoreError) -> Failure {
        match e {
            RestoreError::Repo(r) => classify_repo(r),
            e @ RestoreError::NotEmpty { .. } => Failure::new(
                Code::RestoreRefused,
                e,
                Some("restore into a new directory, or empty this one if you really mean to replace it".into()),
            ),
            e @ RestoreError::NoTablespaceLocation { .. } => Failure::new(Code::Input, e, None),
            e => Failure::new(
                Code::JobFailed,
                e,
                Some("the target directory is incomplete: empty it before retrying; `pitr verify` checks the repository".into()),
            ),
        }
    }

    pub fn from_archive_push(e: ArchiveError) -> Failure {
        classify_archive(e)
    }

    pub fn from_archive_get(e: ArchiveError) -> Failure {
        classify_archive(e).for_command(true)
    }
}

fn classify_archive(e: ArchiveError) -> Failure {
    match e {
        ArchiveError::Repo(r) => classify_repo(r),
        e @ (ArchiveError::NotWal { .. } | ArchiveError::Empty { .. } | ArchiveError::Name(_)) => Failure::new(
            Code::Input,
            e,
            Some("archive-push takes the path PostgreSQL passes as %p: a WAL segment, .partial, .backup or .history file".into()),
        ),
        e @ ArchiveError::ReadInput { .. } => {
            Failure::new(Code::Input, e, Some("check the path and that pitr runs as the PostgreSQL OS user".into()))
        }
        e @ ArchiveError::WriteOutput { .. } => Failure::new(Code::Input, e, None),
        e @ ArchiveError::NeedsDescriptor { .. } => Failure::new(Code::Conflict, e, None),
    }
}

fn classify_repo(e: RepoError) -> Failure {
    match e {
        RepoError::Storage(s) => classify_storage(s),
        e @ RepoError::Corrupt { .. } => Failure::new(
            Code::Corrupt,
            e,
            Some("the stored object is damaged; run `pitr verify` and take a new base backup if WAL is lost".into()),
        ),
        e @ RepoError::NotInitialized { .. } => Failure::new(
            Code::Storage,
            e,
            Some("check --repo / PITR_REPO; a repository is created by the first archive-push, backup or stream".into()),
        ),
        e @ RepoError::NewerFormat { .. } => Failure::new(Code::Conflict, e, Some("upgrade pitr".into())),
        e @ RepoError::OtherCluster { .. } => Failure::new(
            Code::Conflict,
            e,
            Some("use a separate repository (or prefix) for each cluster".into()),
        ),
        e @ RepoError::SegmentSizeMismatch { .. } => Failure::new(Code::Conflict, e, None),
        e @ RepoError::ConflictingContent { .. } => Failure::new(
            Code::Conflict,
            e,
            Some(
                "another server may be archiving into this repository, or the file was changed after \
                 archiving; the stored object was kept untouched"
                    .into(),
            ),
        ),
        e @ (RepoError::BadDescriptor { .. } | RepoError::BadHistory { .. }) => {
            Failure::new(Code::Corrupt, e, None)
        }
        // Encryption (docs/encryption.md): a missing, wrong or superfluous key is configuration.
        e @ RepoError::KeyRequired { .. } => Failure::new(
            Code::Input,
            e,
            Some("or PITR_ENCRYPTION_KEY_FILE / PITR_ENCRYPTION_KEY_COMMAND, or [encryption] key_file / key_command in the config file".into()),
        ),
        e @ RepoError::NotEncrypted { .. } => Failure::new(
            Code::Input,
            e,
            Some("check --repo; a repository is encrypted only if created with a key: remove the key settings for this one, or use a new repository".into()),
        ),
        e @ RepoError::WrongKey { .. } => Failure::new(
            Code::Input,
            e,
            Some("check the key file or key command; after `pitr key rotate` only the new key opens the repository".into()),
        ),
        RepoError::KeySource(e) => {
            let hint = e.hint();
            Failure::new(Code::Input, e, Some(hint))
        }
        e @ (RepoError::NoKeyring { .. } | RepoError::BadKeyring { .. }) => Failure::new(
            Code::Corrupt,
            e,
            Some("the key objects under keys/ are damaged or missing: restore them from a copy; without them nothing in the repository can be decrypted".into()),
        ),
        e @ (RepoError::RotationConflict { .. } | RepoError::NotNewestKey { .. }) => Failure::new(
            Code::Conflict,
            e,
            Some("run `pitr key rotate` with the newest key as the current one (only one rotation at a time)".into()),
        ),
    }
}

fn classify_storage(e: StorageError) -> Failure {
    let hint = match &e {
        StorageError::AccessDenied { .. } => {
            Some("check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the config file) and permissions".into())
        }
        StorageError::Permanent { message, .. } if message.contains("bucket") => {
            Some("create the bucket first, or fix the bucket name in --repo".into())
        }
        StorageError::RetriesExhausted { .. } => Some(
            "the storage was unreachable; check the endpoint and network, or raise --storage-retry-timeout".into(),
        ),
        _ => None,
    };
    Failure::new(Code::Storage, e, hint)
}

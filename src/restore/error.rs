//! How a restore fails, and what each failure means for the target directory.

use std::io;
use std::path::PathBuf;

use crate::error::{Classify, Code};
use crate::format::manifest;
use crate::format::tar::TarError;
use crate::repo::RepoError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    #[error("{path} is not empty; restore needs an empty or missing directory")]
    NotEmpty { path: PathBuf },
    #[error(
        "{path} is in use by a running PostgreSQL (postmaster.pid names process {pid}); a delta restore needs a stopped server"
    )]
    ServerRunning { path: PathBuf, pid: i32 },
    #[error("{path} is not empty and has no PG_VERSION: not a PostgreSQL data directory, so --delta will not clean it")]
    NotDataDir { path: PathBuf },
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
    #[error("{path}: block {block} differs from the backup's block map")]
    BlockMismatch { path: String, block: u64 },
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
    #[error("backup {backup} cannot be restored: member {member} of its chain {problem}")]
    ChainBroken {
        backup: String,
        member: String,
        problem: String,
    },
    #[error("{path}: not a valid incremental file: {reason}")]
    BadIncremental { path: PathBuf, reason: String },
    #[error(
        "{path}: {blocks} block(s) were found in no member of the chain ({files} file(s) incomplete)"
    )]
    ChainIncomplete {
        path: String,
        blocks: u32,
        files: usize,
    },
}

impl Classify for RestoreError {
    fn code(&self) -> Code {
        match self {
            RestoreError::Repo(e) => e.code(),
            RestoreError::NotEmpty { .. }
            | RestoreError::ServerRunning { .. }
            | RestoreError::NotDataDir { .. }
            | RestoreError::ChainBroken { .. } => Code::RestoreRefused,
            RestoreError::NoTablespaceLocation { .. } => Code::Input,
            RestoreError::Io { .. }
            | RestoreError::Tar { .. }
            | RestoreError::UnsafePath { .. }
            | RestoreError::Manifest(_)
            | RestoreError::ChecksumMismatch { .. }
            | RestoreError::SizeMismatch { .. }
            | RestoreError::MissingFiles { .. }
            | RestoreError::BadIncremental { .. }
            | RestoreError::BlockMismatch { .. }
            | RestoreError::ChainIncomplete { .. } => Code::JobFailed,
        }
    }

    fn hint(&self) -> Option<String> {
        let hint = match self {
            RestoreError::Repo(e) => return e.hint(),
            RestoreError::NotEmpty { .. } => {
                "restore into a new directory, or empty this one if you really mean to replace it"
            }
            RestoreError::ServerRunning { .. } => {
                "stop the server first (pg_ctl -D DIR stop); if no server runs, the process is another one reusing the PID: remove postmaster.pid"
            }
            RestoreError::NoTablespaceLocation { .. } => return None,
            RestoreError::NotDataDir { .. } => {
                "check --pgdata; a delta restore removes everything the backup does not have, so it only works on a data directory (or an empty or missing one)"
            }
            RestoreError::ChainBroken { .. } => {
                "nothing was written; `pitr verify` checks every chain; restore an older backup with --backup ID (`pitr list` shows each backup's parent)"
            }
            RestoreError::Io { .. }
            | RestoreError::Tar { .. }
            | RestoreError::UnsafePath { .. }
            | RestoreError::Manifest(_)
            | RestoreError::ChecksumMismatch { .. }
            | RestoreError::SizeMismatch { .. }
            | RestoreError::MissingFiles { .. }
            | RestoreError::BadIncremental { .. }
            | RestoreError::BlockMismatch { .. }
            | RestoreError::ChainIncomplete { .. } => {
                "the target directory is incomplete: empty it before retrying; `pitr verify` checks the repository"
            }
        };
        Some(hint.into())
    }
}

//! `archive-push` and `archive-get`: the `archive_command` / `restore_command` hooks.
//!
//! The contract with PostgreSQL (docs: "Continuous Archiving and Point-in-Time Recovery",
//! "restore_command"): `archive-push` exits 0 only once the file is durable in the repository;
//! `archive-get` exits 0 with the file in place, 1 when the repository does not have the file
//! (PostgreSQL's normal end of archive), and a status above 125 on any other failure, which makes
//! PostgreSQL abort recovery instead of ending it early and promoting with data missing. The exit
//! codes themselves are chosen at the CLI edge; this module returns typed outcomes and errors.

mod get;
mod push;

pub use get::{archive_get, GetOutcome};
pub use push::{archive_push, PushOutcome};

use std::path::PathBuf;

use crate::repo::{PutOutcome, RepoError, Repository};
use crate::wal::WalFileName;
use crate::wal::{PageError, WalFileNameError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    #[error(transparent)]
    Name(#[from] WalFileNameError),
    #[error("cannot read {path}: {source}")]
    ReadInput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid WAL segment: {source}")]
    NotWal { path: PathBuf, source: PageError },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    WriteOutput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the repository has no descriptor yet, so a {name} cannot be checked against a cluster; \
         archive a WAL segment first (or run `pitr backup`)"
    )]
    NeedsDescriptor { name: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Stores one completed WAL file, whether it came from `archive-push` or from `pitr stream`.
/// Both paths go through here so that whatever the repository keeps beside a segment is kept
/// for every segment, whatever its source.
pub async fn store_wal_file(
    repo: &Repository,
    name: &WalFileName,
    content: &[u8],
) -> Result<PutOutcome, RepoError> {
    repo.put_wal_file(name, content).await
}

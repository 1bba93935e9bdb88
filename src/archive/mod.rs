//! `archive-push` and `archive-get`: the `archive_command` / `restore_command` hooks.
//!
//! The contract with PostgreSQL (docs: "Continuous Archiving and Point-in-Time Recovery",
//! "restore_command"): `archive-push` exits 0 only once the file is durable in the repository;
//! `archive-get` exits 0 with the file in place, 1 when the repository does not have the file
//! (PostgreSQL's normal end of archive), and a status above 125 on any other failure, which makes
//! PostgreSQL abort recovery instead of ending it early and promoting with data missing. The exit
//! codes themselves are chosen at the CLI edge; this module returns typed outcomes and errors.

mod get;
pub mod pgdata;
pub mod prefetch;
mod push;

pub use get::{archive_get, archive_get_from, GetOutcome};
pub use pgdata::RecoveryMode;
pub use prefetch::{Prefetch, PrefetchError, WorkerArgs};
pub use push::{archive_push, archive_push_all, PushOutcome};

use std::path::PathBuf;

use crate::error::{Classify, Code};
use crate::repo::{RepoError, WriteOptions};
use crate::storage::Storage;
use crate::wal::{PageError, WalFileNameError};

/// One of several repositories archive-push writes and archive-get reads (docs/repositories.md).
#[derive(Clone, Debug)]
pub struct Target {
    /// The configured name, for messages.
    pub name: String,
    pub storage: Storage,
    pub write: WriteOptions,
    /// archive-push: a failure to store here is a warning, not a failed push.
    pub optional: bool,
}

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
    #[error("{path}: {message}")]
    BadDataDir { path: PathBuf, message: String },
    #[error(
        "the repository at {location} has vanished: this cluster archived into it before \
         (repository id {id}, recorded in {marker}), and its descriptor is gone; pitr does not \
         create a new one there, since WAL archived earlier would then read as never archived"
    )]
    Vanished {
        location: String,
        id: String,
        marker: PathBuf,
    },
    #[error(
        "the repository at {location} is not the one this cluster archived into: it has \
         repository id {found}, {marker} records {recorded}; it was recreated, and the WAL \
         archived before is not in it"
    )]
    Replaced {
        location: String,
        found: String,
        recorded: String,
        marker: PathBuf,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A failure in one of several repositories, named.
    #[error("repository {name}: {source}")]
    InRepository {
        name: String,
        source: Box<ArchiveError>,
    },
}

impl ArchiveError {
    /// Names the repository, when there are several to tell apart.
    pub(crate) fn in_repository(self, name: &str, several: bool) -> ArchiveError {
        if !several {
            return self;
        }
        ArchiveError::InRepository {
            name: name.to_string(),
            source: Box::new(self),
        }
    }
}

impl Classify for ArchiveError {
    fn code(&self) -> Code {
        match self {
            ArchiveError::Repo(e) => e.code(),
            ArchiveError::InRepository { source, .. } => source.code(),
            ArchiveError::Name(_)
            | ArchiveError::ReadInput { .. }
            | ArchiveError::NotWal { .. }
            | ArchiveError::Empty { .. }
            | ArchiveError::WriteOutput { .. }
            | ArchiveError::BadDataDir { .. } => Code::Input,
            ArchiveError::NeedsDescriptor { .. } | ArchiveError::Replaced { .. } => Code::Conflict,
            // The repository this cluster archived into is not where it was: a storage problem
            // (a missing mount or bucket), never a reason to start a new one.
            ArchiveError::Vanished { .. } => Code::Storage,
        }
    }

    fn hint(&self) -> Option<String> {
        let hint = match self {
            ArchiveError::Repo(e) => return e.hint(),
            ArchiveError::InRepository { source, .. } => return source.hint(),
            ArchiveError::Name(_) | ArchiveError::NotWal { .. } | ArchiveError::Empty { .. } => {
                "archive-push takes the path PostgreSQL passes as %p: a WAL segment, .partial, .backup or .history file"
            }
            ArchiveError::ReadInput { .. } => {
                "check the path and that pitr runs as the PostgreSQL OS user"
            }
            ArchiveError::BadDataDir { .. } => {
                "PostgreSQL runs the hooks in its data directory; check that file (a damaged pitr.repository may be deleted: archive-push writes it again)"
            }
            ArchiveError::Vanished { location, marker, .. } => {
                return Some(format!(
                    "if the repository moved or a mount or bucket is missing, bring it back at {location} or point --repo at it; \
                     to start a new repository there on purpose, delete {} (the next archive-push creates one) and take a new base backup at once",
                    marker.display()
                ))
            }
            ArchiveError::Replaced { marker, .. } => {
                return Some(format!(
                    "point --repo at the repository this cluster archived into; to use the new one on purpose, delete {} and take a new base backup at once",
                    marker.display()
                ))
            }
            ArchiveError::WriteOutput { .. } | ArchiveError::NeedsDescriptor { .. } => {
                return None
            }
        };
        Some(hint.into())
    }
}

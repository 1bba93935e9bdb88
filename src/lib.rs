//! pitr: PostgreSQL WAL archiving, streaming, base backups and point-in-time recovery.
//!
//! Layers, and what each may use:
//!
//! | module                                   | uses                               |
//! |------------------------------------------|------------------------------------|
//! | `cli`                                    | `ops`, the jobs                    |
//! | `ops` (schedules, metrics, check, notify) | the jobs, `recovery`, `pg`, `repo` |
//! | `archive`, `stream`, `backup`, `restore`, `verify` | `recovery`, `pg`, `repo`, `codec`, `wal` |
//! | `recovery`                               | `repo`, `wal`                      |
//! | `repo`                                   | `storage`, `codec`, `wal`          |
//! | `pg`                                     | `wal`                              |
//! | `storage`, `codec`, `wal`                | nothing else in the crate          |
pub mod archive;
pub mod backup;
pub mod cli;
pub mod codec;
pub mod config;
pub mod format;
pub mod ops;
pub mod pg;
pub mod recovery;
pub mod repo;
pub mod restore;
pub mod storage;
pub mod stream;
pub mod verify;
pub mod wal;

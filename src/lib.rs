//! pitr: PostgreSQL WAL archiving, streaming, base backups and point-in-time recovery.
//!
//! Layers, and what each may use:
//!
//! | module                                             | uses                                   |
//! |----------------------------------------------------|----------------------------------------|
//! | `cli`                                              | `ops`, the jobs, `recovery`            |
//! | `ops` (schedules, metrics, check, notify)          | the jobs, `recovery`, `pg`, `repo`     |
//! | `drill` (a composite job above `restore`)          | `restore`, `recovery`, `repo`, `wal`   |
//! | `archive`, `stream`, `backup`, `restore`, `verify`, `copy` | `recovery`, `pg`, `repo`, `format`, `wal` |
//! | `recovery` (what can be restored, and how)         | `repo`, `wal`                          |
//! | `repo` (the only owner of the repository format)   | `storage`, `codec`, `wal`              |
//! | `pg`                                               | `wal`                                  |
//! | `storage`, `codec`, `format`, `wal`                | nothing else in the crate              |
//!
//! A job never imports another job, and only `repo` calls `storage` with keys.
#[cfg(test)]
mod architecture_tests;
pub mod archive;
pub mod backup;
pub mod cli;
pub mod codec;
pub mod config;
pub mod copy;
pub mod drill;
pub mod error;
pub mod format;
pub mod key_source;
pub mod ops;
pub mod pg;
pub mod recovery;
pub mod repo;
pub mod restore;
pub mod storage;
pub mod stream;
pub mod verify;
pub mod wal;

//! pitr: PostgreSQL WAL archiving, streaming, base backups and point-in-time recovery.
//!
//! Layers, and what each may use:
//!
//! | module                                   | uses                               |
//! |------------------------------------------|------------------------------------|
//! | `cli`                                    | the jobs                           |
//! | `archive`, `stream`, `backup`, `restore` | `pg`, `repo`, `codec`, `storage`, `wal` |
//! | `repo`                                   | `storage`, `codec`, `wal`          |
//! | `pg`                                     | `wal`                              |
//! | `storage`, `codec`, `wal`                | nothing else in the crate          |
pub mod archive;
pub mod backup;
pub mod cli;
pub mod codec;
pub mod config;
pub mod error;
pub mod format;
pub mod pg;
pub mod repo;
pub mod restore;
pub mod storage;
pub mod stream;
pub mod verify;
pub mod wal;

//! pitr: PostgreSQL WAL archiving, streaming, base backups and point-in-time recovery.
//!
//! Layers, and what each may use:
//!
//! | module                                   | uses                               |
//! |------------------------------------------|------------------------------------|
//! | `cli`                                    | the jobs                           |
//! | `drill` (a composite job above `restore`) | `restore`, `recovery`, `repo`, `wal` |
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
pub mod drill;
pub mod format;
pub mod pg;
pub mod recovery;
pub mod repo;
pub mod restore;
pub mod storage;
pub mod stream;
pub mod verify;
pub mod wal;

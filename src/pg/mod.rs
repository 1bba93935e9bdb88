//! PostgreSQL wire and replication protocol client. Knows nothing of storage or archiving.
//!
//! Layers, from the bytes up:
//!
//! | file             | owns                                                                 |
//! |------------------|----------------------------------------------------------------------|
//! | `message.rs`     | backend message parsing, frontend encoding (pure)                    |
//! | `xlog.rs`        | XLogData / PrimaryKeepalive / StandbyStatusUpdate (pure)             |
//! | `auth.rs`        | trust, password, md5, SCRAM-SHA-256(-PLUS) state machine (pure)      |
//! | `config.rs`      | conninfo strings, URLs, `PG*` environment, `.pgpass` (pure + 1 read) |
//! | `conn.rs`        | sockets, TLS, startup, simple queries: the only I/O                  |
//! | `replication.rs` | IDENTIFY_SYSTEM, SHOW, slots, TIMELINE_HISTORY, START_REPLICATION    |
//! | `base_backup.rs` | BASE_BACKUP, both the PostgreSQL 15+ and the 13/14 wire formats      |
//!
//! Only physical replication is spoken: the connection is opened with `replication=true`, so
//! the server accepts replication commands and SHOW, never SQL.

mod auth;
mod base_backup;
mod config;
mod conn;
mod error;
mod message;
mod replication;
mod xlog;

pub use auth::Password;
pub use base_backup::{BackupEvent, BaseBackupOptions, BaseBackupStream, Tablespace};
pub use config::{ConnConfig, Host, HostPort, SslMode, TargetSessionAttrs, DEFAULT_PORT};
pub use conn::{parse_server_version, Connection, ResultSet};
pub use error::{sqlstate, Error, Result};
pub use replication::{
    parse_size, CreateSlotOptions, IdentifySystem, ReplicationConn, ReplicationMessage,
    ReplicationSlotInfo, SlotInfo, XLogStream, MIN_SERVER_VERSION_NUM,
};
pub use xlog::{decode_server_copy, PgTimestamp, ServerCopyMessage, StandbyStatusUpdate};

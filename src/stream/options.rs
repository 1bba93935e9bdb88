//! What `pitr stream` is told to do.

use std::sync::Arc;
use std::time::Duration;

use super::metrics::Progress;
use crate::repo::WriteOptions;
use crate::storage::Storage;

/// A further repository every job is stored into, beside the main one (docs/repositories.md).
#[derive(Clone, Debug)]
pub struct Mirror {
    pub name: String,
    pub storage: Storage,
    pub write: WriteOptions,
}

#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub slot: String,
    pub create_slot: bool,
    /// Ship the open segment's new bytes at least this often.
    pub chunk_interval: Duration,
    /// Ship a chunk once this many bytes are waiting (unless the segment is about to complete).
    pub chunk_size: usize,
    /// Ship every received byte at once and report it flushed as soon as it is durable.
    pub synchronous: bool,
    /// Send a StandbyStatusUpdate at least this often.
    pub status_interval: Duration,
    pub max_reconnect_delay: Duration,
    /// Stream from a standby (cascading) instead of refusing.
    pub allow_standby: bool,
    /// When the repository's end is no longer on the server, start from the slot instead of
    /// failing, leaving a recorded gap (a new base backup is needed).
    pub accept_gap: bool,
    /// Positions and connection state, shared with observers (`ops` watches the lag with it).
    pub progress: Arc<Progress>,
    /// Further repositories: WAL is durable (and acknowledged) only once stored in every one.
    pub mirrors: Vec<Mirror>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            slot: "pitr".into(),
            create_slot: false,
            chunk_interval: Duration::from_secs(1),
            chunk_size: 4 << 20,
            synchronous: false,
            status_interval: Duration::from_secs(10),
            max_reconnect_delay: Duration::from_secs(30),
            allow_standby: false,
            accept_gap: false,
            progress: Arc::new(Progress::default()),
            mirrors: vec![],
        }
    }
}

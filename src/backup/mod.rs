//! `pitr backup`: BASE_BACKUP streamed into the repository.
//!
//! Each tar stream is cut into parts of [`PART_SIZE`] bytes, compressed and uploaded while the
//! next part is being received. Memory stays flat whatever the database size, and nothing is
//! staged on disk: with lz4 each part is compressed block by block on the receiving thread as
//! its bytes come (one block buffered); with zstd or encryption [`PART_BUFFERS`] part buffers
//! are filled, compressed on the blocking pool and refilled in turn. At most
//! [`MAX_UPLOADS_IN_FLIGHT`] compressed parts are being stored. As the bytes pass,
//! a tar reader computes each file's CRC-32C, which is checked against the manifest the server
//! sends at the end. The backup becomes visible only when its catalog object is written, after all
//! parts, the manifest and the WAL from its start to its stop LSN are in the repository: the
//! backup streams that WAL itself over a second replication connection ([`wal`]), falling back
//! to waiting for archive-push or `pitr stream` when it cannot.

mod blockdiff;
pub mod expire;
mod run;
mod wal;

pub use crate::repo::DEFAULT_ABANDONED_AFTER;
pub use run::{run_backup, BackupError, BackupOptions, BackupProgress, GoAhead};

/// Raw bytes per stored part: large enough that request overhead is small (an object store
/// answers each PUT in a round trip), small enough that a few parts in memory keep a backup
/// well under 64 MiB. Older pitr versions wrote 16 MiB parts; readers take any size.
pub const PART_SIZE: usize = 8 << 20;

/// Part buffers of a repository whose parts are not lz4 blocks (zstd, encrypted): the one being
/// filled and the one being compressed meanwhile (a third bought no throughput and 8 MiB more
/// memory, see docs/benchmarks.md).
pub const PART_BUFFERS: usize = 2;

/// Parts being stored at once: compressed bytes only, so more of them cost little memory and
/// hide an object store's latency.
pub const MAX_UPLOADS_IN_FLIGHT: usize = 3;

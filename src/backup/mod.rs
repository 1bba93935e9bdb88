//! `pitr backup`: BASE_BACKUP streamed into the repository.
//!
//! Each tar stream is cut into parts of [`PART_SIZE`] bytes, compressed and uploaded while the
//! next part is being received, with at most [`MAX_UPLOADS_IN_FLIGHT`] parts in memory: nothing is
//! staged on disk and memory stays flat whatever the database size. As the bytes pass, a tar
//! reader computes each file's CRC-32C, which is checked against the manifest the server sends
//! at the end. The backup becomes visible only when its catalog object is written, after all
//! parts, the manifest and the WAL from its start to its stop LSN are in the repository: the
//! backup streams that WAL itself over a second replication connection ([`wal`]), falling back
//! to waiting for archive-push or `pitr stream` when it cannot.

mod blockdiff;
pub mod expire;
mod run;
mod wal;

pub use crate::repo::DEFAULT_ABANDONED_AFTER;
pub use run::{run_backup, BackupError, BackupOptions, BackupProgress};

/// Raw bytes per stored part: large enough that request overhead is small, small enough that a
/// few parts in flight keep memory well under the 256 MiB budget.
pub const PART_SIZE: usize = 16 << 20;

/// Parts being compressed and uploaded at once.
pub const MAX_UPLOADS_IN_FLIGHT: usize = 3;

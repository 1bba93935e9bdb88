//! `pitr restore`: plan and execute a point-in-time restore.
//!
//! Validate, plan, then act: [`crate::recovery::plan`] is pure and decides everything (which backup, which
//! WAL, whether the target is reachable) before a single byte is written; `--dry-run` prints
//! the plan. Execution lays the backup out, verifies it against its manifest, and writes the
//! recovery settings PostgreSQL needs to replay to exactly the target.

mod chain;
mod check;
mod delta;
mod durable;
mod error;
mod execute;
mod pipeline;
pub mod recovery_conf;
mod writer;

pub use delta::check_stopped;
pub use error::RestoreError;
pub use execute::{execute, RestoreOptions, RestoreReport};
pub use writer::check_target_dir;

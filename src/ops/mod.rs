//! Operations: what lets a DBA run pitr unattended. Schedules inside `pitr stream`
//! ([`scheduler`], [`schedule`], [`jobs`]), the repository's gauges and the RPO watch
//! ([`status`], [`watch`]), notifications ([`notify`]) and the pre-flight `pitr check`
//! ([`check`]).
//!
//! A layer above the jobs: it calls `backup`, `verify`, `stream` and `recovery` through their
//! public APIs and never touches repository keys. The CLI parses flags into [`ServiceOptions`]
//! and prints; everything that decides lives here. Metric names are in [`metrics`].

pub mod check;
pub mod jobs;
pub mod metrics;
pub mod notify;
pub mod schedule;
pub mod scheduler;
pub mod service;
pub mod status;
pub mod watch;

pub use schedule::Schedule;
pub use service::{run_service, ServiceOptions};

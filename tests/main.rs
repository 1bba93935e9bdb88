//! The integration test binary: one binary so that the crate links once.
//! Every test here runs real PostgreSQL and, where it says so, a real S3-compatible server.
mod harness;

mod archive;
mod audit;
mod check;
mod common;
mod deploy;
mod drill;
mod encryption;
mod expire;
mod failover;
mod flaky;
mod incremental;
mod incremental_restore;
mod independent_reader;
mod locale;
mod multi_repo;
mod ops;
mod pg_client;
mod pitr;
mod prefetch;
mod push_cache;
mod standby_backup;
mod storage_backends;
mod stream;
mod topology;
mod upstream_recovery;
mod verify;

//! The integration test binary: one binary so that the crate links once.
//! Every test here runs real PostgreSQL and, where it says so, a real S3-compatible server.
mod harness;

mod archive;
mod common;
mod encryption;
mod expire;
mod flaky;
mod pg_client;
mod pitr;
mod prefetch;
mod stream;
mod verify;

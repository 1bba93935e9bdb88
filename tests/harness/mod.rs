//! Test harness: real PostgreSQL clusters and a real S3-compatible server on 127.0.0.1.
//!
//! - [`PgCluster`]: `PgCluster::builder().conf("archive_mode = on").envs(s3.env()).start()?`
//! - [`S3Server`]: `S3Server::new()?`, `stop()`/`start()` for outages, `object_path(key)`.
//! - [`Emulator`]: moto (S3), fake-gcs-server (GCS) or Azurite (Azure) with one bucket.
//! - [`Proxy`]: a misbehaving network in front of a server (lost answers, dribbled bytes).
//! - [`pitr_bin`], [`pitr`], [`pitr_as_server_user`], [`TestDir`], [`make_accessible`],
//!   [`free_port`], [`conf_quote`].
//!
//! When the tests run as root (CI), PostgreSQL runs as the `postgres` user: anything the
//! test writes that the server or archive_command must use goes through `TestDir::subdir`,
//! `TestDir::write_file` or `make_accessible`.
//!
//! Every test module of the crate shares this binary and not all use every helper.
#![allow(dead_code, unused_imports)]

mod emulators;
mod pg;
mod proxy;
mod s3;
mod selftest;
pub mod topology;
mod util;

pub use emulators::{Emulator, EmulatorKind};
pub use pg::{pg_bin, pg_bin_dir, PgBuilder, PgCluster};
pub use proxy::Proxy;
pub use s3::{s3s_fs_bin, S3Server};
pub use util::{
    clean_env, command_as_server_user, conf_quote, free_port, is_root, kill_group, make_accessible,
    pitr, pitr_as_server_user, pitr_bin, poll, run_checked, sh_quote, spawn_in_group, temp_base,
    TestDir, Watchdog,
};
// The major of the binaries under test, for expectations that differ by major.
pub use pg::pg_major;

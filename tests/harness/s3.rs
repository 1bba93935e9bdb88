//! A real S3-compatible server per test: `s3s-fs` on 127.0.0.1, storing objects as
//! plain files (`<root>/<bucket>/<key>`), so tests can also reach and corrupt them.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::util::{clean_env, free_port, poll, TestDir, Watchdog};

const INSTALL_HINT: &str =
    "install it with `cargo install s3s-fs --version 0.14.1 --features binary --locked` \
     (or set S3S_FS to its path)";

/// Path of the `s3s-fs` binary: `$S3S_FS`, else on PATH, else in `$CARGO_HOME/bin` or
/// `~/.cargo/bin`. Panics with the install command when missing: never skip.
pub fn s3s_fs_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("S3S_FS") {
            let p = PathBuf::from(p);
            assert!(
                p.exists(),
                "S3S_FS={} does not exist; {INSTALL_HINT}",
                p.display()
            );
            return p;
        }
        let mut candidates: Vec<PathBuf> =
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
        if let Some(ch) = std::env::var_os("CARGO_HOME") {
            candidates.push(PathBuf::from(ch).join("bin"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(home).join(".cargo/bin"));
        }
        candidates
            .into_iter()
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!("s3s-fs not found on PATH nor in ~/.cargo/bin; {INSTALL_HINT}")
            })
    })
}

pub const ACCESS_KEY: &str = "pitr-test-access";
pub const SECRET_KEY: &str = "pitr-test-secret-key-0123456789";
pub const REGION: &str = "us-east-1";

/// An `s3s-fs` server with one bucket. `stop()`/`start()` simulate an outage (same port,
/// same data); dropping it kills the server and removes its data.
pub struct S3Server {
    // Field order matters for Drop: the watchdog dies first, then the dir is removed.
    watchdog: Option<Watchdog>,
    child: Option<Child>,
    dir: TestDir,
    port: u16,
    bucket: String,
}

impl S3Server {
    /// Starts a server on a free port with the bucket `pitr-test`.
    pub fn new() -> Result<S3Server> {
        Self::with_bucket("pitr-test")
    }

    pub fn with_bucket(bucket: &str) -> Result<S3Server> {
        let dir = TestDir::without_watchdog("s3");
        let watchdog = Watchdog::spawn(
            Some(&dir.join("s3s-fs.pid")),
            Some("KILL"),
            Some(dir.path()),
        );
        let mut s = S3Server {
            watchdog: Some(watchdog),
            child: None,
            dir,
            port: free_port(),
            bucket: bucket.to_string(),
        };
        // In s3s-fs a bucket is a directory under the root (verified by the self-test,
        // which writes through the S3 API and finds the file at object_path()).
        fs::create_dir_all(s.root().join(bucket))?;
        let mut last_err = None;
        for _ in 0..5 {
            match s.start() {
                Ok(()) => return Ok(s),
                Err(e) => {
                    // Most likely another process took the port: try another one.
                    last_err = Some(e);
                    s.port = free_port();
                }
            }
        }
        Err(last_err
            .expect("tried")
            .context("starting s3s-fs (5 tries)"))
    }

    /// The directory s3s-fs serves; objects are at `<root>/<bucket>/<key>`.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("s3s-fs.log")
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.join("s3s-fs.pid")
    }

    /// (Re)starts the server on its port with its data, waiting until it accepts
    /// connections. After `stop()` this ends the simulated outage.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("s3s-fs already running");
        }
        fs::create_dir_all(self.root())?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(s3s_fs_bin());
        clean_env(&mut cmd);
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root())
            .stdin(Stdio::null())
            // A file, not our pipes: nextest waits for pipes held by leftover processes.
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", s3s_fs_bin().display()))?;
        fs::write(self.pid_path(), format!("{}\n", child.id()))?;
        self.child = Some(child);
        let port = self.port;
        let ready = poll(
            "s3s-fs to accept connections",
            Duration::from_secs(30),
            || {
                if let Some(status) = self.child.as_mut().expect("child").try_wait()? {
                    bail!("s3s-fs exited with {status}");
                }
                Ok(TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()))
            },
        );
        if let Err(e) = ready {
            self.stop();
            let log = fs::read_to_string(self.log_path()).unwrap_or_default();
            return Err(e.context(format!("s3s-fs on port {port}; its log:\n{log}")));
        }
        Ok(())
    }

    /// Kills the server (SIGKILL: an abrupt outage). Connections are then refused.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.pid_path());
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn access_key(&self) -> &str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &str {
        SECRET_KEY
    }

    pub fn region(&self) -> &str {
        REGION
    }

    /// Environment for pitr (and object_store's `AmazonS3Builder::from_env`).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The same settings as [`S3Server::env`], for `Location::with_s3_settings`: a test that
    /// opens the repository with the library passes them there, never through the process
    /// environment (tests share one process).
    pub fn settings(&self) -> pitr::storage::S3Settings {
        pitr::storage::S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some(REGION.to_string()),
            access_key_id: Some(ACCESS_KEY.to_string()),
            secret_access_key: Some(SECRET_KEY.to_string()),
            ..Default::default()
        }
    }

    /// `s3://<bucket>/<prefix>` (no trailing slash added).
    pub fn repo_url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_start_matches('/'))
    }

    /// Where s3s-fs keeps the object `key` on disk (to inspect or corrupt it).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root()
            .join(&self.bucket)
            .join(key.trim_start_matches('/'))
    }

    /// An object_store client for the bucket, for tests that inspect the repository.
    pub fn object_store(&self) -> Result<object_store::aws::AmazonS3> {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region(REGION)
            .with_bucket_name(&self.bucket)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .context("building the object_store S3 client")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        self.watchdog.take();
    }
}

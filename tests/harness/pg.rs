//! A real PostgreSQL cluster per test: own temp dir, own port, own Unix socket dir,
//! started with `pg_ctl` as the `postgres` user when the tests run as root.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::util::{
    command_as_server_user, command_timeout, free_port, make_accessible, output_within, poll,
    run_checked, sh_quote, TestDir, Watchdog,
};

const INSTALL_HINT: &str =
    "install PostgreSQL server binaries: `apt-get install postgresql-15` (Debian), \
     or point PG_BIN at a directory holding initdb, pg_ctl, postgres, psql";

/// The directory holding initdb, pg_ctl, psql, pg_waldump, ...: `$PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` with initdb, else the directory of `initdb` on PATH
/// (symlinks resolved). `pg_config --bindir` is not used: /usr/local/bin may hold
/// wrappers. Panics with install instructions when nothing is found: never skip.
pub fn pg_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PG_BIN") {
            let dir = PathBuf::from(dir);
            assert!(
                dir.join("initdb").exists(),
                "PG_BIN={} has no initdb; {INSTALL_HINT}",
                dir.display()
            );
            return dir;
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return bin;
        }
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let initdb = dir.join("initdb");
            if initdb.exists() {
                let real = fs::canonicalize(&initdb).unwrap_or(initdb);
                return real
                    .parent()
                    .expect("initdb has a parent dir")
                    .to_path_buf();
            }
        }
        panic!("no PostgreSQL binaries found; {INSTALL_HINT}");
    })
}

/// The major version (13 ... 18) of the binaries in [`pg_bin_dir`], from `postgres --version`
/// ("postgres (PostgreSQL) 13.23"): for tests whose expectations differ by major.
pub fn pg_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = Command::new(pg_bin("postgres"))
            .arg("--version")
            .output()
            .expect("running postgres --version");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .last()
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the major from `postgres --version`: {text}"))
    })
}

/// Path of a PostgreSQL program (pg_waldump, pg_basebackup, ...); panics if missing.
pub fn pg_bin(name: &str) -> PathBuf {
    let p = pg_bin_dir().join(name);
    assert!(p.exists(), "{} not found; {INSTALL_HINT}", p.display());
    p
}

/// Settings every harness cluster gets, before the test's own lines (which win, as the
/// last setting of a parameter in postgresql.conf is the one used).
const DEFAULT_CONF: &str = "\
# --- pitr test harness defaults ---
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
# The cluster's own durability is not under test (the repository's is): save time.
fsync = off
shared_buffers = 16MB
max_connections = 30
logging_collector = off
log_line_prefix = '%m [%p] %b '
log_checkpoints = on
# The default from 14 on; 13 hashes new passwords with md5, which scram-sha-256 hba lines
# then refuse.
password_encryption = 'scram-sha-256'
";

/// Options for a cluster; get one with [`PgCluster::builder`].
#[derive(Debug, Clone, Default)]
pub struct PgBuilder {
    conf: Vec<String>,
    hba: Vec<String>,
    env: BTreeMap<String, String>,
    existing_data_dir: Option<PathBuf>,
    wal_segsize_mb: Option<u32>,
    initdb_args: Vec<String>,
}

impl PgBuilder {
    /// A postgresql.conf line, e.g. `"archive_mode = on"`; appended after the defaults.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.conf.push(line.into());
        self
    }

    /// A pg_hba.conf line; put BEFORE initdb's trust-everything lines (first match wins).
    pub fn hba(mut self, line: impl Into<String>) -> Self {
        self.hba.push(line.into());
        self
    }

    /// An environment variable for the postmaster, hence for archive_command and
    /// restore_command (the postmaster otherwise gets only PATH, with the PG bin dir first).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Several environment variables, e.g. `S3Server::env()`.
    pub fn envs<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in vars {
            self.env.insert(k.into(), v.into());
        }
        self
    }

    /// Start from this data directory (e.g. laid out by `pitr restore`) instead of
    /// running initdb. It is chowned to the server user and set to mode 0700 at start;
    /// the harness does not delete it (its owner, e.g. a TestDir, does).
    pub fn existing_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.existing_data_dir = Some(dir.into());
        self
    }

    /// initdb `--wal-segsize` in MB (a power of 2 from 1 to 1024).
    pub fn wal_segsize(mut self, mb: u32) -> Self {
        self.wal_segsize_mb = Some(mb);
        self
    }

    /// Any other initdb argument, e.g. `--data-checksums`.
    pub fn initdb_arg(mut self, arg: impl Into<String>) -> Self {
        self.initdb_args.push(arg.into());
        self
    }

    /// Creates the cluster (initdb, or adopts the existing data dir) without starting it.
    pub fn init(self) -> Result<PgCluster> {
        PgCluster::create(self)
    }

    /// Creates and starts the cluster.
    pub fn start(self) -> Result<PgCluster> {
        let mut c = self.init()?;
        c.start()?;
        Ok(c)
    }
}

/// A PostgreSQL cluster owned by one test. Dropping it stops the server (immediate)
/// and removes its temp dir; a watchdog does the same if the test process is killed.
pub struct PgCluster {
    // Field order matters for Drop: the watchdog dies first, then the dir is removed.
    watchdog: Option<Watchdog>,
    dir: TestDir,
    data_dir: PathBuf,
    port: u16,
    env: BTreeMap<String, String>,
    running: bool,
}

impl PgCluster {
    pub fn builder() -> PgBuilder {
        PgBuilder::default()
    }

    /// A default cluster (initdb, 16MB segments), started.
    pub fn start_default() -> Result<PgCluster> {
        Self::builder().start()
    }

    fn create(b: PgBuilder) -> Result<PgCluster> {
        let dir = TestDir::without_watchdog("pg");
        let external = b.existing_data_dir.is_some();
        let data_dir = match &b.existing_data_dir {
            Some(d) => {
                if !d.join("PG_VERSION").exists() {
                    bail!(
                        "{} is not a PostgreSQL data directory (no PG_VERSION)",
                        d.display()
                    );
                }
                fs::canonicalize(d)?
            }
            None => dir.join("data"),
        };
        // From here on the watchdog owns cleanup if the test process dies: it stops the
        // postmaster (whatever its pid is then) and removes the cluster's temp dir.
        let watchdog = Watchdog::spawn(
            Some(&data_dir.join("postmaster.pid")),
            Some("QUIT"),
            Some(dir.path()),
        );
        let c = PgCluster {
            watchdog: Some(watchdog),
            dir,
            data_dir,
            port: free_port(),
            env: b.env,
            running: false,
        };
        if external {
            c.fix_data_dir_ownership()?;
        } else {
            let mut cmd = command_as_server_user(pg_bin("initdb"));
            cmd.arg("-D").arg(&c.data_dir).args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
            if let Some(mb) = b.wal_segsize_mb {
                cmd.arg(format!("--wal-segsize={mb}"));
            }
            cmd.args(&b.initdb_args);
            run_checked(&mut cmd).context("initdb")?;
        }
        let mut conf = String::from("\n");
        conf.push_str(DEFAULT_CONF);
        for line in &b.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        c.append_conf_text(&conf)?;
        if !b.hba.is_empty() {
            let hba_path = c.data_dir.join("pg_hba.conf");
            let old = fs::read_to_string(&hba_path).unwrap_or_default();
            let new = format!("# --- pitr test harness ---\n{}\n{old}", b.hba.join("\n"));
            fs::write(&hba_path, new)?;
        }
        Ok(c)
    }

    fn fix_data_dir_ownership(&self) -> Result<()> {
        make_accessible(&self.data_dir)?;
        // PostgreSQL refuses data dirs with group/other write or any other access.
        fs::set_permissions(&self.data_dir, fs::Permissions::from_mode(0o700))?;
        Ok(())
    }

    fn append_conf_text(&self, text: &str) -> Result<()> {
        use std::io::Write;
        let path = self.data_dir.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        drop(f);
        make_accessible(&path)
    }

    /// Appends a line to postgresql.conf (takes effect on reload/restart).
    pub fn append_conf(&self, line: &str) -> Result<()> {
        self.append_conf_text(&format!("{line}\n"))
    }

    /// Sets or replaces an environment variable for the postmaster (effective at next start).
    pub fn set_env(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.env.insert(key.into(), value.into());
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = command_as_server_user(pg_bin("pg_ctl"));
        cmd.arg("-D").arg(&self.data_dir);
        cmd
    }

    /// Starts the server and waits until it accepts connections (pg_ctl -w, 5 min: a
    /// PITR start replays WAL first). Retries with a new port if another process took ours.
    pub fn start(&mut self) -> Result<()> {
        self.start_inner(true)
    }

    /// Starts the server without waiting for it to accept connections (for tests whose
    /// recovery is expected to fail or pause); see [`PgCluster::wait_ready`].
    pub fn start_nowait(&mut self) -> Result<()> {
        self.start_inner(false)
    }

    fn start_inner(&mut self, wait: bool) -> Result<()> {
        if self.running {
            bail!("cluster already running");
        }
        if self.dir.path().join("data") != self.data_dir {
            // An adopted data dir may have been rewritten by the test (pitr restore) as root.
            self.fix_data_dir_ownership()?;
        }
        let mut last_err = None;
        for _attempt in 0..5 {
            let log_offset = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
            let mut cmd = self.pg_ctl();
            // Port, socket dir and listen address on the command line: they override the
            // config files, which matters for a data dir restored from another cluster.
            let opts = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1",
                self.port,
                sh_quote(self.dir.path())
            );
            cmd.arg("-l")
                .arg(self.log_path())
                .args(["-o", &opts])
                .arg(if wait { "-w" } else { "-W" })
                .args(["-t", "300", "start"]);
            let mut path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .collect::<Vec<_>>();
            path.insert(0, pg_bin_dir().to_path_buf());
            cmd.env("PATH", std::env::join_paths(path)?);
            cmd.envs(&self.env);
            match run_checked(&mut cmd) {
                Ok(_) => {
                    self.running = true;
                    return Ok(());
                }
                Err(e) => {
                    let log = self.log_contents();
                    let new_log = log.get(log_offset as usize..).unwrap_or("").to_string();
                    if new_log.contains("could not bind")
                        || new_log.contains("Address already in use")
                    {
                        // Another process took the port between free_port() and bind.
                        self.port = free_port();
                        last_err = Some(e);
                        continue;
                    }
                    // pg_ctl may have given up while the postmaster lives on: stop it.
                    let _ = self.stop_mode("immediate");
                    return Err(e.context(format!("starting PostgreSQL; server log:\n{new_log}")));
                }
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow!("could not start"))
            .context("no free port after 5 tries"))
    }

    fn stop_mode(&mut self, mode: &str) -> Result<()> {
        let mut cmd = self.pg_ctl();
        cmd.args(["-m", mode, "-w", "-t", "120", "stop"]);
        let res = run_checked(&mut cmd);
        if res.is_ok() || !self.data_dir.join("postmaster.pid").exists() {
            self.running = false;
        }
        res.map(|_| ())
            .with_context(|| format!("pg_ctl stop -m {mode}"))
    }

    /// Fast shutdown (a clean one: final checkpoint, last segment archived when archiving).
    pub fn stop(&mut self) -> Result<()> {
        self.stop_mode("fast")
    }

    /// Immediate shutdown: like a crash, the next start runs crash recovery.
    pub fn stop_immediate(&mut self) -> Result<()> {
        self.stop_mode("immediate")
    }

    /// Fast stop then start, keeping port and env (use `set_env`/`append_conf` before).
    pub fn restart(&mut self) -> Result<()> {
        if self.running {
            self.stop()?;
        }
        self.start()
    }

    /// Promotes a server in recovery and waits for it to leave recovery.
    pub fn promote(&mut self) -> Result<()> {
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", "300", "promote"]);
        run_checked(&mut cmd).map(|_| ()).context("pg_ctl promote")
    }

    /// `pg_ctl reload`: re-read config files (SIGHUP).
    pub fn reload(&self) -> Result<()> {
        let mut cmd = self.pg_ctl();
        cmd.arg("reload");
        run_checked(&mut cmd).map(|_| ()).context("pg_ctl reload")
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(pg_bin(program));
        super::util::clean_env(&mut cmd);
        cmd.env("PGCONNECT_TIMEOUT", "10")
            .arg("-h")
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres"]);
        cmd
    }

    fn psql_command(&self) -> Command {
        let mut cmd = self.client("psql");
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
            "-f",
            "-",
        ]);
        cmd
    }

    /// Runs `sql` (one or more statements, read by psql from stdin) over the Unix socket;
    /// returns the rows as psql -A -t prints them ('|' between columns), trimmed.
    /// Blocking: from a current-thread tokio test that also runs async code, use
    /// [`PgCluster::psql_async`].
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = output_within(
            &mut self.psql_command(),
            Some(sql.to_string()),
            command_timeout(),
        )
        .map_err(|e| anyhow!("{e}\nSQL: {sql}"))?;
        if !out.status.success() {
            bail!(
                "psql failed ({}) on port {}: {}\nSQL: {sql}",
                out.status,
                self.port,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// [`PgCluster::psql`] without blocking the tokio runtime.
    pub async fn psql_async(&self, sql: &str) -> Result<String> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::from(self.psql_command())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning psql")?;
        let mut stdin = child.stdin.take().expect("stdin");
        let script = sql.to_string();
        // Concurrently with reading the output, for the same reason as in psql().
        let writer = tokio::spawn(async move { stdin.write_all(script.as_bytes()).await });
        let out = child.wait_with_output().await?;
        let _ = writer.await;
        if !out.status.success() {
            bail!(
                "psql failed ({}) on port {}: {}\nSQL: {sql}",
                out.status,
                self.port,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `pgbench -i -s scale` (quiet) into the postgres database.
    pub fn pgbench_init(&self, scale: u32) -> Result<()> {
        let mut cmd = self.client("pgbench");
        cmd.args(["-i", "-q", "-s", &scale.to_string(), "postgres"]);
        run_checked(&mut cmd).map(|_| ()).context("pgbench -i")
    }

    /// `pgbench <args> postgres`; returns its stdout (the report).
    pub fn pgbench<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.client("pgbench");
        cmd.args(args).arg("postgres");
        let out = run_checked(&mut cmd).context("pgbench")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Unix socket directory (the cluster's temp dir).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's private temp dir (socket, log; also free for the test to use).
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// libpq key=value string over the Unix socket, superuser `postgres`.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.socket_dir().display(),
            self.port
        )
    }

    /// libpq key=value string over TCP on 127.0.0.1 (trust auth unless hba lines say otherwise).
    pub fn tcp_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// Path of a PostgreSQL program of the same installation.
    pub fn bin(&self, name: &str) -> PathBuf {
        pg_bin(name)
    }

    /// Waits (up to 60 s) until `SELECT 1` succeeds.
    pub fn wait_ready(&self) -> Result<()> {
        poll(
            "PostgreSQL to accept connections",
            Duration::from_secs(60),
            || self.psql("SELECT 1").map(|s| (s == "1").then_some(())),
        )
        .with_context(|| format!("server log:\n{}", self.log_tail()))
    }

    /// Polls `sql` every 100 ms until its trimmed output equals `expected`.
    pub fn wait_for(&self, sql: &str, expected: &str, timeout: Duration) -> Result<()> {
        let mut last = String::new();
        poll(&format!("`{sql}` to return {expected:?}"), timeout, || {
            let out = self.psql(sql)?;
            let done = out == expected;
            last = out;
            Ok(done.then_some(()))
        })
        .with_context(|| format!("last output: {last:?}"))
    }

    /// The whole server log so far.
    pub fn log_contents(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log_contents();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        // Only when we started it: an adopted data dir may carry a stale postmaster.pid.
        if self.running {
            if let Err(e) = self.stop_mode("immediate") {
                eprintln!(
                    "harness: stopping PostgreSQL on port {} failed: {e:#}",
                    self.port
                );
                // Last resort: SIGKILL the postmaster; its children exit on postmaster death.
                if let Ok(pid) = fs::read_to_string(&pid_file) {
                    if let Some(pid) = pid.lines().next() {
                        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
                    }
                }
            }
        }
        self.watchdog.take();
        // `dir` (a TestDir) is removed when the fields drop.
    }
}

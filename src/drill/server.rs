//! PostgreSQL process control for a drill: find the binaries, start the postmaster on a scratch
//! data directory, ask it questions with `psql`, and stop it — also when the drill is dropped
//! half-way (the [`Server`] guard stops it in `Drop`).

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// The OS account that runs the server: `postgres` when the drill runs as root (the
/// postmaster refuses root), else the current user (`None`).
#[derive(Clone, Debug)]
pub struct ServerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl ServerUser {
    /// `Ok(None)` when not root; `Err` when root and there is no `postgres` account.
    pub fn for_this_process() -> Result<Option<ServerUser>, String> {
        if !rustix::process::geteuid().is_root() {
            return Ok(None);
        }
        let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 5 && f[0] == "postgres")
            .and_then(|f| {
                Some(ServerUser {
                    name: f[0].to_string(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: PathBuf::from(f[5]),
                })
            })
            .map(Some)
            .ok_or_else(|| {
                "running as root, but there is no `postgres` OS user to run PostgreSQL as".into()
            })
    }

    /// Makes `cmd` run as this user, with its HOME, USER and LOGNAME.
    fn apply(&self, cmd: &mut Command) {
        cmd.uid(self.uid)
            .gid(self.gid)
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name);
    }
}

/// Where `postgres` and `psql` of major version `major` are: `explicit`, else Debian's
/// /usr/lib/postgresql/N/bin, else PATH. The version is checked: a drill with other binaries
/// would fail in replay with a far less clear message.
pub fn find_bin_dir(explicit: Option<&Path>, major: u32) -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = vec![];
    match explicit {
        Some(d) => candidates.push(d.to_path_buf()),
        None => {
            candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
            if let Some(path) = std::env::var_os("PATH") {
                candidates.extend(std::env::split_paths(&path));
            }
        }
    }
    let mut seen = vec![];
    for dir in candidates {
        if !dir.join("postgres").is_file() || !dir.join("psql").is_file() {
            continue;
        }
        match server_major(&dir) {
            Some(m) if m == major => return Ok(dir),
            found => seen.push(format!(
                "{} ({})",
                dir.display(),
                found.map_or("?".into(), |m| m.to_string())
            )),
        }
    }
    Err(if seen.is_empty() {
        format!("no PostgreSQL {major} server binaries (postgres and psql) found")
    } else {
        format!(
            "the repository holds PostgreSQL {major}, but the binaries found are other versions: {}",
            seen.join(", ")
        )
    })
}

/// The major version `postgres --version` reports ("postgres (PostgreSQL) 15.10 (Debian ...)").
fn server_major(dir: &Path) -> Option<u32> {
    let out = Command::new(dir.join("postgres"))
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split(')').nth(1)?.split_whitespace().next()?;
    version.split(['.', 'b', 'r']).next()?.parse().ok()
}

/// What the postmaster is started with.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub hba_file: PathBuf,
    pub log_file: PathBuf,
    pub port: u16,
    pub user: Option<ServerUser>,
}

/// A running postmaster, stopped when dropped.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    child: Option<Child>,
}

impl Server {
    /// Starts the postmaster. Settings that keep the drill private and harmless are given on
    /// the command line, where they override the restored configuration files: no archiving
    /// (a drill never writes to the repository), only 127.0.0.1 and a private socket
    /// directory, our pg_hba.conf, the log on stderr (our log file), no hot standby (the drill
    /// waits for the end of recovery anyway).
    pub fn start(config: ServerConfig) -> io::Result<Server> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&config.log_file)?;
        let mut cmd = Command::new(config.bin_dir.join("postgres"));
        cmd.arg("-D").arg(&config.data_dir);
        let settings = [
            ("port", config.port.to_string()),
            ("listen_addresses", "127.0.0.1".into()),
            (
                "unix_socket_directories",
                config.socket_dir.display().to_string(),
            ),
            ("hba_file", config.hba_file.display().to_string()),
            ("archive_mode", "off".into()),
            ("hot_standby", "off".into()),
            ("logging_collector", "off".into()),
            ("log_destination", "stderr".into()),
            ("log_min_messages", "warning".into()),
            ("cluster_name", "pitr-drill".into()),
        ];
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for pitr must reach pitr, which then stops
            // the server in order, not the server directly.
            .process_group(0);
        if let Some(u) = &config.user {
            u.apply(&mut cmd);
        }
        let child = cmd.spawn()?;
        tracing::debug!(
            pid = child.id(),
            port = config.port,
            "started the drill's PostgreSQL"
        );
        Ok(Server {
            config,
            child: Some(child),
        })
    }

    /// `Some(status)` once the postmaster has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Runs `sql` in `dbname` with psql; the first row's values, or psql's error text.
    pub async fn query(&self, dbname: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let mut cmd = Command::new(self.config.bin_dir.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-z", "-R", "\x1e", "-P", NULL_MARK])
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.config.socket_dir)
            .arg("-p")
            .arg(self.config.port.to_string())
            .arg("-d")
            .arg(dbname)
            .arg("-c")
            .arg(sql)
            .env("PGCONNECT_TIMEOUT", "5")
            .env_remove("PGHOST")
            .env_remove("PGHOSTADDR")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null());
        if let Some(u) = &self.config.user {
            u.apply(&mut cmd);
        }
        let out = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(parse_unaligned(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Stops the server: `fast` (a clean shutdown, for a directory that is kept) or immediate.
    /// Escalates to SIGKILL if it does not exit in time; returns once it is gone.
    pub fn stop(&mut self, fast: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let steps = [
            (
                if fast { Signal::INT } else { Signal::QUIT },
                Duration::from_secs(60),
            ),
            (Signal::QUIT, Duration::from_secs(10)),
        ];
        for (signal, wait) in steps {
            if let Some(pid) = pid {
                let _ = kill_process(pid, signal);
            }
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        tracing::warn!(
            pid = child.id(),
            "the drill's PostgreSQL ignored shutdown: killing it"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.config.log_file, n)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Reached without `stop` only when the drill failed or was cancelled: no need to be
        // gentle with a scratch server.
        self.stop(false);
    }
}

/// How psql shows NULL: a control character no text value of a check query holds.
const NULL_MARK: &str = "null=\x01";
const NULL_VALUE: &str = "\x01";

/// psql's unaligned, tuples-only output with NUL between fields and RS between rows.
fn parse_unaligned(out: &str) -> Vec<Vec<Option<String>>> {
    out.trim_end_matches('\n')
        .split('\x1e')
        .filter(|row| !row.is_empty())
        .map(|row| {
            row.trim_start_matches('\n')
                .split('\0')
                .map(|v| (v != NULL_VALUE).then(|| v.to_string()))
                .collect()
        })
        .collect()
}

/// The last `n` lines of the server log at `path`, without the refusals our own readiness
/// probes caused, or a note that it cannot be read.
pub fn log_tail(path: &Path, n: usize) -> String {
    const PROBE_NOISE: [&str; 4] = [
        "FATAL:  the database system is starting up",
        "FATAL:  the database system is not accepting connections",
        "FATAL:  the database system is in recovery mode",
        "DETAIL:  Hot standby mode is disabled.",
    ];
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !PROBE_NOISE.iter().any(|p| l.contains(p)))
                .collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(server log {} unreadable: {e})", path.display()),
    }
}

/// A free TCP port on 127.0.0.1, picked by the kernel. Another process may take it before the
/// postmaster binds it: the caller retries on "could not bind".
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_output_is_split_into_rows_and_fields() {
        let rows = parse_unaligned("1\0a b\x1e\n2\0\x01\n");
        assert_eq!(
            rows,
            vec![
                vec![Some("1".into()), Some("a b".into())],
                vec![Some("2".into()), None]
            ]
        );
        assert!(parse_unaligned("").is_empty());
    }
}

//! Process-independent helpers: who runs the server, temp dirs it can use, ports,
//! the `pitr` binary, and the watchdog that cleans up after a killed test process.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Name of the system account that runs PostgreSQL when the tests run as root
/// (initdb and the postmaster refuse to run as root).
pub const SERVER_USER: &str = "postgres";

/// True when this test process runs as root (CI does). Read from /proc so that
/// no `unsafe` libc call is needed (the crate forbids unsafe code).
pub fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .expect("reading /proc/self to learn the effective uid")
    })
}

/// uid and gid of the account the server runs as: `postgres` when root, else ourselves.
pub fn server_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        if !is_root() {
            let m = fs::metadata("/proc/self").expect("stat /proc/self");
            return (m.uid(), m.gid());
        }
        let passwd = fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4 && f[0] == SERVER_USER {
                return (
                    f[2].parse().expect("uid in /etc/passwd"),
                    f[3].parse().expect("gid in /etc/passwd"),
                );
            }
        }
        panic!(
            "tests run as root but there is no `{SERVER_USER}` system user to run PostgreSQL as; \
             install PostgreSQL (`apt-get install postgresql-15` creates it) or \
             `useradd --system --home /var/lib/postgresql {SERVER_USER}`"
        )
    })
}

/// A `Command` that runs `program` as the server user: through `runuser` when we are
/// root, directly otherwise. The environment is cleared except PATH so that the
/// developer's PG*/AWS_* variables never leak into a test; add what is needed.
pub fn command_as_server_user(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", SERVER_USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    clean_env(&mut cmd);
    cmd
}

/// Spawns `cmd` as the leader of its own process group, so that [`kill_group`] reaches what it
/// runs too: killing `runuser` (see [`command_as_server_user`]) with SIGKILL would leave its
/// child running, since a SIGKILL cannot be relayed.
pub fn spawn_in_group(cmd: &mut Command) -> Child {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {:?}: {e}", cmd.get_program()))
}

/// SIGKILLs the process group of a child spawned by [`spawn_in_group`] and reaps the child.
pub fn kill_group(child: &mut Child) -> std::process::ExitStatus {
    kill_process_group(child.id());
    child.wait().expect("waiting for a killed child")
}

fn kill_process_group(leader: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{leader}")])
        .status();
}

/// Clears the environment of `cmd`, keeping PATH (and HOME when not root: runuser sets
/// the server user's own HOME).
pub fn clean_env(cmd: &mut Command) {
    cmd.env_clear();
    cmd.env(
        "PATH",
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
    );
    if !is_root() {
        if let Some(home) = std::env::var_os("HOME") {
            cmd.env("HOME", home);
        }
    }
}

/// Runs `cmd` to completion; Err (with both output streams) unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Makes `path` usable by the server user: when root, chowns it (recursively, without
/// following symlinks) to `postgres` and makes every ancestor directory traversable.
/// Call it on anything the test process (root) wrote that the server or an
/// `archive_command` running as `postgres` must read or write: a config file, a local
/// repository directory, a restored data directory. A no-op when not root.
pub fn make_accessible(path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let (uid, gid) = server_ids();
    chown_recursive(path, uid, gid)?;
    make_ancestors_traversable(path)
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Adds o+x to every ancestor directory that lacks it, so the server user can reach
/// `path`. Only the missing bit is added; nothing is made readable or writable.
pub fn make_ancestors_traversable(path: &Path) -> Result<()> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    for dir in abs.ancestors().skip(1) {
        if dir.join("PG_VERSION").exists() && dir.join("global").exists() {
            // A data directory: PostgreSQL refuses modes other than 0700/0750, and its
            // owner (the server user) needs no help.
            continue;
        }
        let meta = fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o001))
                .with_context(|| format!("chmod o+x {}", dir.display()))?;
        }
    }
    Ok(())
}

/// True if the server user can reach and execute `path` (only meaningful for root:
/// checks the "other" permission bits along the path, as postgres owns none of them).
fn others_can_execute(path: &Path) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    if meta.permissions().mode() & 0o005 != 0o005 {
        return false;
    }
    path.ancestors().skip(1).all(|d| {
        fs::metadata(d)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// A free TCP port on 127.0.0.1, picked by the kernel. Another process may take it
/// before we bind it again: callers retry on "address in use".
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0 to find a free port")
        .port()
}

/// Base for every temp dir of the harness. Unix socket paths are limited to 107 bytes,
/// and the cluster's socket lives in its temp dir, so a long $TMPDIR falls back to /tmp.
pub fn temp_base() -> PathBuf {
    let t = std::env::temp_dir();
    if t.as_os_str().len() <= 60 {
        t
    } else {
        PathBuf::from("/tmp")
    }
}

/// A temporary directory owned by the server user (so PostgreSQL and archive_command
/// may write into it), removed on drop, and also removed by a watchdog if the test
/// process is killed before it can drop it (nextest timeouts, Ctrl-C).
pub struct TestDir {
    // Field order matters: the watchdog is stopped before the dir is removed.
    watchdog: Option<Watchdog>,
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> Self {
        Self::with_prefix("pitr")
    }

    pub fn with_prefix(prefix: &str) -> Self {
        let mut td = Self::create(prefix);
        td.watchdog = Some(Watchdog::spawn(None, None, Some(td.path())));
        td
    }

    /// For owners (PgCluster, S3Server) whose own watchdog removes the dir after it
    /// has stopped their server: a second watchdog would race it.
    pub(crate) fn without_watchdog(prefix: &str) -> Self {
        let td = Self::create(prefix);
        // Which test process owns the servers in this dir: .ci/run's leak check tells
        // leaked servers (owner gone) from those of another run still going.
        fs::write(
            td.join("harness.owner"),
            format!("{}\n", std::process::id()),
        )
        .expect("writing harness.owner");
        td
    }

    fn create(prefix: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}."))
            .tempdir_in(temp_base())
            .expect("creating a temp dir");
        make_accessible(dir.path()).expect("making the temp dir accessible to the server user");
        TestDir {
            watchdog: None,
            dir: Some(dir),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("TestDir used after drop").path()
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path().join(p)
    }

    /// Creates (if needed) a subdirectory owned by the server user and returns its path.
    /// Use it for local repositories written by `archive_command`.
    pub fn subdir(&self, name: impl AsRef<Path>) -> PathBuf {
        let p = self.join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        make_accessible(&p).expect("chown subdir");
        p
    }

    /// Writes `contents` to `name` inside the dir and makes it readable by the server user.
    pub fn write_file(&self, name: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("mkdir parent");
        }
        fs::write(&p, contents).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        make_accessible(&p).expect("chown file");
        p
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        self.watchdog.take();
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                // Files a server wrote while we were removing can make this fail once.
                if e.kind() != ErrorKind::NotFound {
                    let _ = fs::remove_dir_all(&path);
                }
            }
        }
    }
}

/// Quotes `s` for POSIX sh.
pub fn sh_quote(s: impl AsRef<OsStr>) -> String {
    let s = s.as_ref().to_string_lossy();
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Quotes `s` as a postgresql.conf string value: `archive_command = {conf_quote(..)}`.
pub fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A detached `sh` (own session, so nextest's process-group kill spares it) that
/// waits for this test process to die and then cleans up what its owner would have
/// cleaned in `Drop`: signals the process whose pid is in `pid_file` (read every
/// second, so restarts are followed) and removes `remove_dir`. Dropping the Watchdog
/// (the normal path) kills it without doing anything.
pub struct Watchdog {
    child: Child,
}

impl Watchdog {
    /// `kill`: (pid file, signal name), e.g. (postmaster.pid, "QUIT").
    pub fn spawn(pid_file: Option<&Path>, signal: Option<&str>, remove_dir: Option<&Path>) -> Self {
        let mut script = format!(
            "T={}; F={}; p=\n",
            std::process::id(),
            sh_quote(pid_file.unwrap_or(Path::new("")))
        );
        script.push_str(
            "while kill -0 \"$T\" 2>/dev/null; do\n\
             \x20 if [ -n \"$F\" ] && [ -f \"$F\" ]; then read -r p < \"$F\" || true; else p=; fi\n\
             \x20 sleep 1\n\
             done\n",
        );
        if pid_file.is_some() {
            let sig = signal.unwrap_or("TERM");
            script.push_str(&format!(
                "if [ -n \"$p\" ]; then kill -{sig} \"$p\" 2>/dev/null; \
                 for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 \"$p\" 2>/dev/null || break; sleep 0.5; done; \
                 kill -KILL \"$p\" 2>/dev/null; fi\n"
            ));
        }
        if let Some(d) = remove_dir {
            script.push_str(&format!("rm -rf {}\n", sh_quote(d)));
        }
        let child = Command::new("setsid")
            .arg("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            // Never hold the test's stdout/stderr pipes: nextest would wait for them.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the cleanup watchdog (setsid sh, from util-linux)");
        Watchdog { child }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Path of the built `pitr` binary, executable by the server user (for
/// `archive_command`/`restore_command`). When root and the build dir is not reachable
/// by `postgres`, the binary is copied once per build into a shared dir under the temp
/// base (`pitr-harness-bin/`, which `.ci/run` removes).
pub fn pitr_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_pitr"));
        assert!(
            built.exists(),
            "{} missing: build it with `cargo build`",
            built.display()
        );
        if !is_root() || others_can_execute(&built) {
            return built;
        }
        copy_for_server_user(&built).expect("copying pitr where the postgres user can run it")
    })
    .clone()
}

fn copy_for_server_user(built: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(built)?;
    let key = format!(
        "{}-{}",
        meta.len(),
        meta.mtime_nsec() as u64 ^ (meta.mtime() as u64)
    );
    let dir = temp_base().join("pitr-harness-bin").join(key);
    let dest = dir.join("pitr");
    if dest.exists() {
        return Ok(dest);
    }
    fs::create_dir_all(&dir)?;
    for d in [dir.parent().unwrap(), dir.as_path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
    }
    // Copy then rename: parallel test processes may race to create it.
    let tmp = dir.join(format!("pitr.tmp.{}", std::process::id()));
    fs::copy(built, &tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, &dest)?;
    make_ancestors_traversable(&dest)?;
    Ok(dest)
}

/// Runs `pitr args` as the current user with a clean environment (PATH only) plus `env`.
pub fn pitr<I, S>(args: I, env: &[(String, String)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(pitr_bin());
    clean_env(&mut cmd);
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    run_pitr(cmd)
}

/// Like [`pitr`], but as the server user (`postgres` when root), exactly as
/// `archive_command` would run it: use it when a local repository must stay writable
/// by the archiver.
pub fn pitr_as_server_user<I, S>(args: I, env: &[(String, String)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = command_as_server_user(pitr_bin());
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    run_pitr(cmd)
}

/// Runs a `pitr` command to its end (stdin null); panics, with its threads' stacks, should it
/// still run after [`command_timeout`].
pub fn run_pitr(mut cmd: Command) -> Output {
    output_within(&mut cmd, None, command_timeout()).unwrap_or_else(|e| panic!("{e}"))
}

/// How long one `pitr` or `psql` command of a test may run: under nextest's 5-minute limit, so
/// that a hung command is reported with its threads' stacks instead of as a silent test timeout.
pub fn command_timeout() -> Duration {
    let secs = std::env::var("PITR_TEST_COMMAND_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    Duration::from_secs(secs)
}

/// Runs `cmd` to its end like [`Command::output`], with `input` on its stdin (else null). Still
/// running after `limit`: killed, and the error holds what it printed so far and the stack of
/// every thread (gdb).
pub fn output_within(
    cmd: &mut Command,
    input: Option<String>,
    limit: Duration,
) -> std::result::Result<Output, String> {
    use std::io::{Read, Write};
    let stdin = match input {
        Some(_) => Stdio::piped(),
        None => Stdio::null(),
    };
    let mut child = spawn_in_group(
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // From a thread: the child may fill its stdout pipe before it has read all of its input.
    let writer = child.stdin.take().map(|mut pipe| {
        let input = input.unwrap_or_default();
        std::thread::spawn(move || pipe.write_all(input.as_bytes()))
    });
    // Read both pipes on their own threads: a child blocked on a full pipe never exits.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    // Waited for on a thread, so that the exit is seen at once and the limit is a timeout.
    let pid = child.id();
    let (exited, wait_exit) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait().expect("waiting for a child");
        let _ = exited.send(());
        status
    });
    if wait_exit.recv_timeout(limit).is_err() {
        let stacks = thread_stacks(pid);
        kill_process_group(pid);
        let _ = waiter.join();
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        return Err(format!(
            "{:?} still running after {limit:?}; killed.\nstdout:\n{}\nstderr:\n{}\nthreads:\n{stacks}",
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        ));
    }
    let status = waiter.join().expect("the waiting thread panicked");
    // A write error (the child exited before reading it all) shows in its exit status.
    if let Some(w) = writer {
        let _ = w.join();
    }
    Ok(Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    })
}

/// Every thread's stack of process `pid` (and its children: `runuser` runs pitr as one), from
/// gdb; the kernel's wait channels when gdb is missing.
fn thread_stacks(pid: u32) -> String {
    let mut pids = vec![pid];
    let children = format!("/proc/{pid}/task/{pid}/children");
    if let Ok(list) = fs::read_to_string(children) {
        pids.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    let mut report = String::new();
    for p in pids {
        let gdb = Command::new("gdb")
            .args(["-p", &p.to_string(), "-batch", "-ex", "thread apply all bt"])
            .stdin(Stdio::null())
            .output();
        match gdb {
            Ok(o) if o.status.success() => {
                report += &format!("--- pid {p} (gdb)\n{}", String::from_utf8_lossy(&o.stdout));
            }
            _ => {
                report += &format!("--- pid {p} (no gdb: wait channels)\n");
                let tasks = fs::read_dir(format!("/proc/{p}/task"))
                    .into_iter()
                    .flatten();
                for t in tasks.flatten() {
                    let wchan = fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
                    let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                    report += &format!("{:?} {} {wchan}\n", t.file_name(), comm.trim());
                }
            }
        }
    }
    report
}

/// Polls `f` every 100 ms until it returns Ok(Some(_)) or `timeout` passes.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

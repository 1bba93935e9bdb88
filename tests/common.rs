//! Repository fixtures shared by the integration tests: the same test body runs against a
//! local directory and a real S3-compatible server ([`on_local_and_s3!`]), and pitr's output
//! is read and checked with [`code`], [`stdout`], [`stderr`], [`text`] and [`assert_code`].

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use pitr::storage::{Location, Storage};

use crate::harness::{
    conf_quote, pitr, pitr_bin, poll, Emulator, EmulatorKind, PgCluster, S3Server, TestDir,
};

/// Defines two tests that run `body(Backend)`: `$local` on a local directory and `$s3` on a real
/// S3-compatible server. Names are spelled out because CI filters tests by name.
macro_rules! on_local_and_s3 {
    ($body:ident, $local:ident, $s3:ident) => {
        #[test]
        fn $local() {
            $body($crate::common::Backend::Local);
        }

        #[test]
        fn $s3() {
            $body($crate::common::Backend::S3);
        }
    };
}
pub(crate) use on_local_and_s3;

/// The exit code of a finished pitr, or -1 when a signal ended it.
pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Everything pitr printed: stdout, then stderr.
pub fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// Asserts the exit code; on a mismatch the panic shows everything pitr printed.
#[track_caller]
pub fn assert_code(o: &Output, expected: i32) {
    assert_eq!(
        code(o),
        expected,
        "pitr exited with {}, expected {expected}:\n{}",
        code(o),
        text(o)
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Local,
    /// s3s-fs.
    S3,
    /// moto's S3 server, configured through `[s3]` in a config file.
    Moto,
    /// fake-gcs-server, configured through `[gcs]`.
    Gcs,
    /// Azurite, configured through `[azure]`.
    Azure,
}

/// Defines one test per cloud emulator that runs `body(Backend)`, as [`on_local_and_s3!`] does.
macro_rules! on_emulators {
    ($body:ident, $moto:ident, $gcs:ident, $azure:ident) => {
        #[test]
        fn $moto() {
            $body($crate::common::Backend::Moto);
        }

        #[test]
        fn $gcs() {
            $body($crate::common::Backend::Gcs);
        }

        #[test]
        fn $azure() {
            $body($crate::common::Backend::Azure);
        }
    };
}
pub(crate) use on_emulators;

/// A repository for one test, with whatever it needs kept alive.
pub struct TestRepo {
    pub url: String,
    pub env: Vec<(String, String)>,
    /// Holds the local repository (and is removed with it).
    _dir: TestDir,
    pub s3: Option<S3Server>,
    /// The emulator of a Moto, Gcs or Azure repository, reached through [`TestRepo::config`].
    pub emulator: Option<Emulator>,
    /// `--config FILE` that every pitr command of this repository gets (emulators only).
    pub config: Option<PathBuf>,
    prefix: String,
}

impl TestRepo {
    pub fn new(backend: Backend) -> TestRepo {
        let dir = TestDir::new();
        match backend {
            Backend::Local => {
                let root = dir.subdir("repo");
                TestRepo {
                    url: root.display().to_string(),
                    env: vec![],
                    _dir: dir,
                    s3: None,
                    emulator: None,
                    config: None,
                    prefix: String::new(),
                }
            }
            Backend::S3 => {
                let s3 = S3Server::new().expect("starting s3s-fs");
                let prefix = "clusters/db1".to_string();
                TestRepo {
                    url: s3.repo_url(&prefix),
                    env: s3.env(),
                    _dir: dir,
                    s3: Some(s3),
                    emulator: None,
                    config: None,
                    prefix,
                }
            }
            Backend::Moto => Self::on_emulator(dir, EmulatorKind::Moto),
            Backend::Gcs => Self::on_emulator(dir, EmulatorKind::FakeGcs),
            Backend::Azure => Self::on_emulator(dir, EmulatorKind::Azurite),
        }
    }

    fn on_emulator(dir: TestDir, kind: EmulatorKind) -> TestRepo {
        let emu = Emulator::start(kind).unwrap_or_else(|e| panic!("starting {kind:?}: {e:#}"));
        let prefix = "clusters/db1".to_string();
        // Readable by the server user: archive_command and restore_command read it.
        let config = dir.write_file("pitr.toml", emu.config_toml());
        TestRepo {
            url: emu.repo_url(&prefix),
            env: vec![],
            _dir: dir,
            s3: None,
            emulator: Some(emu),
            config: Some(config),
            prefix,
        }
    }

    /// Where the object `key` lives on disk, to corrupt or inspect it.
    pub fn object_file(&self, key: &str) -> PathBuf {
        assert!(
            self.emulator.is_none(),
            "an emulator's objects are not files to inspect"
        );
        match &self.s3 {
            None => PathBuf::from(&self.url).join(key),
            Some(s3) => s3.object_path(&format!("{}/{key}", self.prefix)),
        }
    }

    /// `pitr --repo URL <rest>` as one shell command line for postgresql.conf.
    pub fn command(&self, rest: &str) -> String {
        let config = match &self.config {
            Some(c) => format!(" --config {}", c.display()),
            None => String::new(),
        };
        format!(
            "{}{config} --repo {} {rest}",
            pitr_bin().display(),
            self.url
        )
    }

    pub fn archive_command_conf(&self) -> String {
        format!(
            "archive_command = {}",
            conf_quote(&self.command("archive-push %p"))
        )
    }

    pub fn restore_command_conf(&self) -> String {
        format!(
            "restore_command = {}",
            conf_quote(&self.command("archive-get %f %p"))
        )
    }

    pub fn args<'a>(&'a self, rest: &[&'a str]) -> Vec<String> {
        let mut v = vec![];
        if let Some(c) = &self.config {
            v.extend(["--config".to_string(), c.display().to_string()]);
        }
        v.extend(["--repo".to_string(), self.url.clone()]);
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    }

    /// Sends pitr's S3 requests (of [`TestRepo::pitr`] and of the commands in postgresql.conf)
    /// to `endpoint`, e.g. a [`crate::harness::Proxy`] in front of the server.
    pub fn set_s3_endpoint(&mut self, endpoint: &str) {
        assert!(self.s3.is_some(), "only an S3 repository has an endpoint");
        for (k, v) in &mut self.env {
            if k == "AWS_ENDPOINT_URL" {
                *v = endpoint.to_string();
            }
        }
    }

    /// Runs `pitr --repo URL <rest>` with the repository's environment; waits for it to exit.
    pub fn pitr(&self, rest: &[&str]) -> Output {
        pitr(self.args(rest), &self.env)
    }

    /// The repository's location with its S3 settings carried in it: the library opens it from
    /// a test without touching the process environment, which every test shares.
    pub fn location(&self) -> Location {
        let loc = Location::parse(&self.url).unwrap();
        match (&self.s3, &self.emulator) {
            (Some(s3), _) => loc.with_s3_settings(s3.settings()),
            (None, Some(emu)) => loc.with_options(&emu.options()),
            (None, None) => loc,
        }
    }

    /// The port of the repository's server (s3s-fs or an emulator).
    pub fn endpoint_port(&self) -> u16 {
        match (&self.s3, &self.emulator) {
            (Some(s3), _) => s3.port(),
            (None, Some(emu)) => emu.port(),
            (None, None) => panic!("a local repository has no server"),
        }
    }

    /// [`TestRepo::location`] with every request sent to `endpoint`, e.g. a proxy.
    pub fn location_at(&self, endpoint: &str) -> Location {
        let loc = Location::parse(&self.url).unwrap();
        match (&self.s3, &self.emulator) {
            (Some(s3), _) => loc.with_s3_settings(pitr::storage::S3Settings {
                endpoint: Some(endpoint.to_string()),
                ..s3.settings()
            }),
            (None, Some(emu)) => loc.with_options(&emu.options_at(endpoint)),
            (None, None) => panic!("a local repository has no endpoint"),
        }
    }

    /// The repository's storage, opened with the library, for looking behind pitr's back.
    pub fn storage(&self) -> Storage {
        Storage::open(&self.location(), Duration::from_secs(5)).unwrap()
    }
}

/// Forces a segment switch and waits until PostgreSQL reports the finished segment archived;
/// returns its name.
pub fn switch_and_wait(pg: &PgCluster) -> String {
    // A record first: with nothing written since the last switch (a backup just ended with
    // one), pg_switch_wal() is a no-op and names a segment that never completes.
    let seg = pg
        .psql(
            "select pg_walfile_name(pg_switch_wal()) \
             from (select pg_logical_emit_message(false, 'pitr-test', 'switch')) m",
        )
        .unwrap();
    poll("archiving", Duration::from_secs(60), || {
        let last = pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver")?;
        Ok((last.as_str() >= seg.as_str()).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n--- server log ---\n{}", pg.log_contents()));
    seg
}

//! Repository fixtures shared by the integration tests: the same test body runs against a
//! local directory and a real S3-compatible server.

use std::path::PathBuf;

use std::time::Duration;

use crate::harness::{conf_quote, pitr_bin, poll, PgCluster, S3Server, TestDir};

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Local,
    S3,
}

/// A repository for one test, with whatever it needs kept alive.
pub struct TestRepo {
    pub url: String,
    pub env: Vec<(String, String)>,
    /// Holds the local repository (and is removed with it).
    _dir: TestDir,
    pub s3: Option<S3Server>,
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
                    prefix,
                }
            }
        }
    }

    /// Where the object `key` lives on disk, to corrupt or inspect it.
    pub fn object_file(&self, key: &str) -> PathBuf {
        match &self.s3 {
            None => PathBuf::from(&self.url).join(key),
            Some(s3) => s3.object_path(&format!("{}/{key}", self.prefix)),
        }
    }

    /// `pitr --repo URL <rest>` as one shell command line for postgresql.conf.
    pub fn command(&self, rest: &str) -> String {
        format!("{} --repo {} {rest}", pitr_bin().display(), self.url)
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
        let mut v = vec!["--repo".to_string(), self.url.clone()];
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    }
}

/// Forces a segment switch and waits until PostgreSQL reports the finished segment archived;
/// returns its name.
pub fn switch_and_wait(pg: &PgCluster) -> String {
    let seg = pg.psql("select pg_walfile_name(pg_switch_wal())").unwrap();
    poll("archiving", Duration::from_secs(60), || {
        let last = pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver")?;
        Ok((last.as_str() >= seg.as_str()).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n--- server log ---\n{}", pg.log_contents()));
    seg
}

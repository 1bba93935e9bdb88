//! Several repositories (docs/repositories.md): a local directory and a real S3 server named in
//! one config file. archive-push writes both, a repository that is down fails the push until it
//! is back, restore reads the one that answers, and `pitr copy` fills one from the other,
//! interrupted or not.

use std::fs;
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::Duration;

use crate::common::{assert_code, code, switch_and_wait, text};
use crate::harness::{
    command_as_server_user, conf_quote, kill_group, pitr_as_server_user, pitr_bin, poll,
    spawn_in_group, PgCluster, Proxy, S3Server, TestDir,
};

/// A local repository and an S3 repository, as `[[repository]]` tables of one config file.
struct TwoRepos {
    work: TestDir,
    local: std::path::PathBuf,
    s3: S3Server,
    s3_url: String,
    config: std::path::PathBuf,
}

impl TwoRepos {
    /// `offsite_extra` goes into the S3 repository's table (e.g. `optional = true`).
    fn new(offsite_extra: &str) -> TwoRepos {
        let work = TestDir::new();
        let local = work.subdir("local");
        let s3 = S3Server::new().expect("starting s3s-fs");
        let s3_url = s3.repo_url("clusters/db1");
        let config = work.write_file(
            "pitr.toml",
            format!(
                "storage_retry_timeout = \"2s\"\n\
                 [[repository]]\nname = \"local\"\nurl = \"{}\"\n\
                 [[repository]]\nname = \"offsite\"\nurl = \"{s3_url}\"\n{offsite_extra}\n",
                local.display()
            ),
        );
        TwoRepos {
            work,
            local,
            s3,
            s3_url,
            config,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        self.s3.env()
    }

    /// `pitr --config FILE <args>` as the server user.
    fn pitr(&self, args: &[&str]) -> Output {
        let mut all = vec!["--config", self.config.to_str().unwrap()];
        all.extend_from_slice(args);
        pitr_as_server_user(all, &self.env())
    }

    /// `pitr --repo URL <args>`: one of the two repositories alone.
    fn pitr_on(&self, url: &str, args: &[&str]) -> Output {
        let mut all = vec!["--repo", url];
        all.extend_from_slice(args);
        pitr_as_server_user(all, &self.env())
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.pitr(args);
        assert_code(&o, 0);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn local_url(&self) -> String {
        self.local.display().to_string()
    }

    /// Whether the repository at `url` alone serves WAL file `name`.
    fn has_wal(&self, url: &str, name: &str) -> bool {
        let dest = self.work.subdir("fetched").join(name);
        let o = self.pitr_on(
            url,
            &[
                "archive-get",
                "--prefetch",
                "0",
                name,
                dest.to_str().unwrap(),
            ],
        );
        let _ = fs::remove_file(&dest);
        match code(&o) {
            0 => true,
            1 => false,
            _ => panic!("archive-get from {url}: {}", text(&o)),
        }
    }

    fn primary(&self) -> PgCluster {
        self.primary_with(&self.config)
    }

    /// A primary whose archive_command reads `config`.
    fn primary_with(&self, config: &std::path::Path) -> PgCluster {
        let cmd = format!(
            "{} --config {} archive-push %p",
            pitr_bin().display(),
            config.display()
        );
        PgCluster::builder()
            .conf("archive_mode = on")
            .conf(format!("archive_command = {}", conf_quote(&cmd)))
            .envs(self.env())
            .start()
            .unwrap()
    }
}

fn insert(pg: &PgCluster, phase: &str) {
    pg.psql(&format!(
        "insert into marks(phase) select '{phase}' from generate_series(1, 10)"
    ))
    .unwrap();
}

fn marks(pg: &PgCluster) -> String {
    pg.psql("select string_agg(phase || ':' || n, ',' order by phase) from (select phase, count(*) n from marks group by phase) s").unwrap()
}

/// Archive and back up into both; the first repository deleted entirely; a restore to a time
/// reads the second and gives exactly the rows committed before it.
#[test]
fn two_repositories_survive_losing_the_first() {
    let repos = TwoRepos::new("");
    let pg = repos.primary();
    pg.psql("create table marks(id serial primary key, phase text not null)")
        .unwrap();
    insert(&pg, "a_base");
    let conninfo = pg.conninfo();
    assert!(repos.ok(&["backup", "-d", &conninfo]).contains("complete"));
    let out = repos.ok(&["backup", "--to", "offsite", "-d", &conninfo]);
    assert!(out.contains("complete"), "{out}");
    insert(&pg, "b_before_time");
    sleep(Duration::from_millis(1100));
    let t = pg.psql("select now()").unwrap();
    sleep(Duration::from_millis(1100));
    insert(&pg, "c_after_time");
    let last = switch_and_wait(&pg);

    // Each repository has its own backup and every segment, on its own.
    for url in [repos.local_url(), repos.s3_url.clone()] {
        let o = repos.pitr_on(&url, &["list", "--json"]);
        assert_code(&o, 0);
        let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            list["backups"].as_array().unwrap().len(),
            1,
            "{url}: {list}"
        );
        assert_code(&repos.pitr_on(&url, &["verify"]), 0);
        assert!(repos.has_wal(&url, &last), "{url} lacks {last}");
    }

    fs::remove_dir_all(&repos.local).unwrap();
    let dir = repos.work.subdir("restored");
    let out = repos.ok(&[
        "restore",
        "--pgdata",
        dir.to_str().unwrap(),
        "--target-time",
        &t,
    ]);
    // Recovery reads the repository the restore came from.
    assert!(out.contains(&repos.s3_url), "{out}");
    let restored = PgCluster::builder()
        .existing_data_dir(&dir)
        .envs(repos.env())
        .conf("archive_mode = off")
        .start()
        .unwrap();
    restored
        .wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.log_contents()));
    assert_eq!(marks(&restored), "a_base:10,b_before_time:10");
    assert!(
        !repos.local.exists(),
        "nothing recreated the deleted repository"
    );
}

/// The S3 repository down: archive-push fails (PostgreSQL keeps the segment and retries) and
/// succeeds once it is back, with both repositories complete. Marked optional, its outage is a
/// warning.
#[test]
fn a_repository_that_is_down_fails_the_push_until_it_returns() {
    let mut repos = TwoRepos::new("");
    let pg = repos.primary();
    let first = switch_and_wait(&pg);
    repos.s3.stop();
    let seg = pg
        .psql("select pg_walfile_name(pg_switch_wal()) from (select pg_logical_emit_message(false, 'pitr-test', 'down')) m")
        .unwrap();
    crate::harness::topology::wait_archive_failed(&pg, &seg, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", pg.log_contents()));
    let log = pg.log_contents();
    assert!(log.contains("repository offsite"), "{log}");
    assert!(first < seg);

    // archive-get of that segment: the local repository has it, the S3 one is down.
    let out_dir = repos.work.subdir("get");
    let dest = out_dir.join(&seg);
    let o = repos.pitr(&[
        "archive-get",
        "--prefetch",
        "0",
        &seg,
        dest.to_str().unwrap(),
    ]);
    assert_code(&o, 0);
    // One that no repository has while one is down: the outage, not the end of the archive.
    let o = repos.pitr(&[
        "archive-get",
        "--prefetch",
        "0",
        "0000000100000000000000FF",
        out_dir.join("x").to_str().unwrap(),
    ]);
    assert!(code(&o) > 125, "{}", text(&o));

    repos.s3.start().unwrap();
    // A new segment wakes the archiver, which retries the failed one first.
    let next = switch_and_wait(&pg);
    assert!(next > seg);
    for url in [repos.local_url(), repos.s3_url.clone()] {
        assert!(repos.has_wal(&url, &seg), "{url} lacks {seg}");
    }

    // The same outage with the S3 repository optional: the push succeeds, with a warning.
    let mut optional = TwoRepos::new("optional = true");
    let pg2 = optional.primary();
    switch_and_wait(&pg2);
    optional.s3.stop();
    let seg2 = switch_and_wait(&pg2);
    let log = pg2.log_contents();
    assert!(log.contains("optional repository"), "{log}");
    assert!(optional.has_wal(&optional.local_url(), &seg2));
    optional.s3.start().unwrap();
    assert!(!optional.has_wal(&optional.s3_url, &seg2));
}

/// `pitr copy` from the S3 repository into the empty local one, killed half-way (the S3
/// answers slowed by a proxy), and run again: it completes, `pitr verify` passes on the copy,
/// and a third run has nothing to do.
#[test]
fn an_interrupted_copy_completes_when_run_again() {
    let repos = TwoRepos::new("");
    // Only the S3 repository is written: the local one is made by the copy.
    let s3_only = repos.work.write_file(
        "s3.toml",
        format!(
            "[[repository]]\nname = \"offsite\"\nurl = \"{}\"\n",
            repos.s3_url
        ),
    );
    let pg = repos.primary_with(&s3_only);
    pg.psql("create table marks(id serial primary key, phase text not null)")
        .unwrap();
    insert(&pg, "a_base");
    repos.ok(&["backup", "--to", "offsite", "-d", &pg.conninfo()]);
    for _ in 0..6 {
        insert(&pg, "more");
        switch_and_wait(&pg);
    }
    assert_eq!(count_files(&repos.local), Some(0));

    // Killed once it has copied some WAL, and before it is done.
    let proxy = Proxy::dribble(repos.s3.port(), 4096, Duration::from_millis(5));
    let mut env = repos.env();
    for (k, v) in &mut env {
        if k == "AWS_ENDPOINT_URL" {
            *v = proxy.endpoint();
        }
    }
    let mut cmd = command_as_server_user(pitr_bin());
    cmd.args(["--config", repos.config.to_str().unwrap()])
        .args(["copy", "--from", "offsite", "--to", "local"])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = spawn_in_group(&mut cmd);
    let copied = poll("the copy to start", Duration::from_secs(60), || {
        Ok(count_files(&repos.local.join("wal")).filter(|n| *n >= 2))
    });
    let status = kill_group(&mut child);
    copied.unwrap();
    assert!(
        !status.success(),
        "the copy finished before it was interrupted"
    );
    assert_eq!(
        count_files(&repos.local.join("catalog/backups")).unwrap_or(0),
        0,
        "a killed copy left a visible backup"
    );

    let o = repos.pitr(&["copy", "--from", "offsite", "--to", "local", "--json"]);
    assert_code(&o, 0);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["objects_copied"].as_u64().unwrap() > 0, "{report}");
    assert!(report["objects_skipped"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["created_target"], false, "{report}");
    assert_eq!(
        report["backups_copied"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    assert_code(&repos.pitr_on(&repos.local_url(), &["verify"]), 0);
    let o = repos.pitr_on(&repos.local_url(), &["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["backups"].as_array().unwrap().len(), 1, "{list}");

    let o = repos.pitr(&["copy", "--from", "offsite", "--to", "local", "--json"]);
    assert_code(&o, 0);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["objects_copied"], 0, "{report}");
    assert!(report["objects_skipped"].as_u64().unwrap() > 0, "{report}");
}

/// Files below `dir`, or `None` when it does not exist yet.
fn count_files(dir: &std::path::Path) -> Option<usize> {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !e
                .file_name()
                .to_string_lossy()
                .starts_with(pitr::storage::LOCAL_TMP_PREFIX)
            {
                // Objects only: a copy still downloading holds temporary files (never listed).
                n += 1;
            }
        }
    }
    Some(n)
}

/// `pitr stream` writes both repositories in step: the flush feedback (the slot's
/// restart_lsn) is the lower of the two, so an S3 outage holds it back while the local
/// repository moves on, and it catches up once S3 returns.
#[test]
fn stream_writes_every_repository_and_acknowledges_the_lowest() {
    let mut repos = TwoRepos::new("");
    let pg = PgCluster::builder().start().unwrap();
    let log = repos.work.join("stream.log");
    let mut cmd = Command::new(pitr_bin());
    cmd.args(["--config", repos.config.to_str().unwrap()])
        .args(["stream", "-d", &pg.conninfo(), "--create-slot"])
        .envs(repos.env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    let stream_log = || fs::read_to_string(&log).unwrap_or_default();
    let flushed = |lsn: &str| {
        pg.psql(&format!(
            "select coalesce(bool_or(restart_lsn >= '{lsn}'::pg_lsn), false) from pg_replication_slots where slot_name = 'pitr'"
        ))
        .unwrap()
            == "t"
    };
    poll("the stream to attach", Duration::from_secs(60), || {
        let active = pg.psql("select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = 'pitr'")?;
        Ok((active == "t").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", stream_log()));
    pg.psql("create table t(x int); insert into t select generate_series(1, 1000)")
        .unwrap();
    let (seg, lsn) = switch_segment(&pg);
    poll("flush feedback", Duration::from_secs(60), || {
        Ok(flushed(&lsn).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", stream_log()));
    assert!(repos.has_wal(&repos.local_url(), &seg));
    assert!(repos.has_wal(&repos.s3_url, &seg));

    repos.s3.stop();
    pg.psql("insert into t select generate_series(1, 1000)")
        .unwrap();
    let (seg2, lsn2) = switch_segment(&pg);
    poll("the local repository", Duration::from_secs(30), || {
        Ok(repos.has_wal(&repos.local_url(), &seg2).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", stream_log()));
    // The outage outlasts the storage retries (2 s): the stream says so, and holds back.
    poll(
        "the stream to report S3 down",
        Duration::from_secs(60),
        || {
            Ok(stream_log()
                .contains("repository unavailable")
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", stream_log()));
    assert!(
        !flushed(&lsn2),
        "acknowledged while S3 was down:\n{}",
        stream_log()
    );
    repos.s3.start().unwrap();
    poll(
        "flush feedback after the outage",
        Duration::from_secs(90),
        || Ok(flushed(&lsn2).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", stream_log()));
    assert!(repos.has_wal(&repos.s3_url, &seg2));
    let _ = child.kill();
    let _ = child.wait();
}

/// Switches to a new segment; returns the finished one and the position after the switch.
fn switch_segment(pg: &PgCluster) -> (String, String) {
    let seg = pg
        .psql("select pg_walfile_name(pg_switch_wal()) from (select pg_logical_emit_message(false, 'pitr-test', 'switch')) m")
        .unwrap();
    let lsn = pg.psql("select pg_current_wal_insert_lsn()").unwrap();
    (seg, lsn)
}

/// A command with an unknown repository name is refused before anything runs.
#[test]
fn unknown_repository_names_are_refused() {
    let repos = TwoRepos::new("");
    let o = repos.pitr(&["backup", "--to", "elsewhere", "-d", "host=/nonexistent"]);
    assert_code(&o, 3);
    assert!(text(&o).contains("\"elsewhere\""), "{}", text(&o));
    let o = repos.pitr(&["copy", "--from", "local", "--to", "nowhere"]);
    assert_code(&o, 3);
    assert!(text(&o).contains("local, offsite"), "{}", text(&o));
}

/// Each repository is expired by its own policy (`[repository.retention]`, else `[retention]`)
/// and records the expire in its own audit trail; a repository that is down fails the command
/// without stopping the others.
#[test]
fn each_repository_is_expired_by_its_own_policy() {
    // `[retention]` after the tables is a top-level table (TOML), the policy of every
    // repository without its own: here the offsite one; the local one has its own table.
    let mut repos = TwoRepos::new("[retention]\nfull = 3\n");
    let config = fs::read_to_string(&repos.config).unwrap().replace(
        "[[repository]]\nname = \"offsite\"",
        "[repository.retention]\nfull = 1\n[[repository]]\nname = \"offsite\"",
    );
    fs::write(&repos.config, config).unwrap();
    let pg = repos.primary();
    let conninfo = pg.conninfo();
    for _ in 0..2 {
        repos.ok(&["backup", "-d", &conninfo]);
        repos.ok(&["backup", "--to", "offsite", "-d", &conninfo]);
    }
    let count = |repos: &TwoRepos, url: &str| {
        let o = repos.pitr_on(url, &["list", "--json"]);
        assert_code(&o, 0);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["backups"].as_array().unwrap().len()
    };
    let (local, offsite) = (repos.local_url(), repos.s3_url.clone());

    let out = repos.ok(&["expire", "--dry-run", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["repository"], "local", "{v}");
    assert_eq!(v[0]["expired"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[1]["repository"], "offsite", "{v}");
    assert_eq!(v[1]["expired"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(
        (count(&repos, &local), count(&repos, &offsite)),
        (2, 2),
        "a dry run changes nothing"
    );

    let out = repos.ok(&["expire"]);
    assert!(out.contains("repository local:\nremoved backup"), "{out}");
    assert!(
        out.contains("repository offsite:\nno backup to expire"),
        "{out}"
    );
    assert_eq!((count(&repos, &local), count(&repos, &offsite)), (1, 2));
    for url in [&local, &offsite] {
        let o = repos.pitr_on(url, &["audit", "--json"]);
        assert_code(&o, 0);
        let trail = String::from_utf8_lossy(&o.stdout);
        assert!(trail.contains("\"expire\""), "{url}: {trail}");
    }

    // The offsite repository down: the local one is still expired, the command fails.
    repos.ok(&["backup", "-d", &conninfo]);
    repos.s3.stop();
    let o = repos.pitr(&["expire", "--json"]);
    assert_ne!(code(&o), 0, "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["outcome"], "expired", "{v}");
    assert_eq!(v[1]["outcome"], "failed", "{v}");
    assert_eq!(
        v[1]["exit_code"].as_u64(),
        Some(u64::from(code(&o) as u8)),
        "{v}"
    );
    assert_eq!(count(&repos, &local), 1);
}

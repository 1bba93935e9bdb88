//! `pitr stream` as a service against real PostgreSQL: scheduled backups with expiry and
//! verification, notifications to a receiver on 127.0.0.1, the metrics it serves, and the
//! alert rules in deploy/prometheus fed with those real metrics through `promtool test rules`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::{Backend, TestRepo};
use crate::harness::{clean_env, free_port, pitr, pitr_bin, poll, PgCluster, TestDir};

/// A `pitr` child process (killed on drop), its stderr in a file shown on failure.
pub struct Service {
    child: Child,
    log: PathBuf,
    _dir: TestDir,
}

impl Service {
    pub fn start(repo: &TestRepo, args: &[String]) -> Service {
        let dir = TestDir::new();
        let log = dir.join("service.log");
        let err = fs::File::create(&log).unwrap();
        let mut cmd = Command::new(pitr_bin());
        clean_env(&mut cmd);
        cmd.args(args)
            .envs(repo.env.iter().map(|(k, v)| (k, v)))
            .env("PITR_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        Service {
            child: cmd.spawn().expect("spawning pitr"),
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the process to exit (what a service manager does).
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        poll("the service to exit", Duration::from_secs(60), || {
            Ok(self.child.try_wait().unwrap().map(|_| ()))
        })
        .unwrap_or_else(|e| panic!("{e}\n--- log ---\n{}", self.log()));
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny HTTP receiver for `--notify-url`: answers 200 and keeps each JSON body.
pub struct Receiver {
    pub url: String,
    pub events: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let events = Arc::new(Mutex::new(vec![]));
        let keep = events.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_ok() {
                    if let Ok(v) = serde_json::from_slice(&body) {
                        keep.lock().unwrap().push(v);
                    }
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        Receiver { url, events }
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits for an event of `kind` (for `job`, if given) after the first `skip` events.
    pub fn wait_for(&self, kind: &str, job: Option<&str>, skip: usize, svc: &Service) -> usize {
        poll(
            &format!("{kind} notification"),
            Duration::from_secs(120),
            || {
                Ok(self
                    .events()
                    .iter()
                    .enumerate()
                    .skip(skip)
                    .find_map(|(i, e)| {
                        (e["event"] == kind && job.is_none_or(|j| e["job"] == j)).then_some(i)
                    }))
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nevents: {:?}\n--- log ---\n{}",
                self.events(),
                svc.log()
            )
        })
    }
}

/// One scrape of /metrics: `name{sorted labels}` to value, and when it was taken.
pub struct Scrape {
    pub at: f64,
    pub values: BTreeMap<String, f64>,
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

pub fn scrape(port: u16) -> Option<Scrape> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1;
    let mut values = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ')?;
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut l: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                l.sort_unstable();
                format!("{name}{{{}}}", l.join(","))
            }
            None => series.to_string(),
        };
        values.insert(key, value.parse().ok()?);
    }
    Some(Scrape { at: now(), values })
}

impl Scrape {
    pub fn get(&self, key: &str) -> f64 {
        *self
            .values
            .get(key)
            .unwrap_or_else(|| panic!("{key} not served; got {:?}", self.values.keys()))
    }
}

fn wait_metric(port: u16, svc: &Service, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    poll(what, Duration::from_secs(180), || {
        Ok(scrape(port).filter(|s| ok(s)))
    })
    .unwrap_or_else(|e| panic!("{e}\n--- log ---\n{}", svc.log()))
}

fn runs(s: &Scrape, job: &str, outcome: &str) -> f64 {
    s.values
        .get(&format!(
            "pitr_job_runs_total{{job=\"{job}\",outcome=\"{outcome}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
}

/// `pitr stream` with the scheduled jobs `schedules` (flags and their specs) and its metrics
/// on a free port.
fn start_scheduled(repo: &TestRepo, pg: &PgCluster, schedules: &[&str]) -> (Service, u16) {
    let port = free_port();
    let (conninfo, metrics) = (pg.conninfo(), format!("127.0.0.1:{port}"));
    let mut words = vec![
        "stream",
        "-d",
        &conninfo,
        "--create-slot",
        "--metrics-addr",
        &metrics,
    ];
    words.extend_from_slice(schedules);
    (Service::start(repo, &repo.args(&words)), port)
}

/// Waits until `job` succeeded `n` times, writing a row of `beat` at every look so that there
/// is always new WAL to back up.
fn wait_runs(port: u16, svc: &Service, pg: &PgCluster, job: &str, n: f64) -> Scrape {
    wait_metric(port, svc, &format!("{n} successful {job} runs"), |s| {
        let _ = pg.psql("insert into beat default values");
        runs(s, job, "success") >= n
    })
}

fn backup_ids(repo: &TestRepo) -> Vec<String> {
    let o = pitr(repo.args(&["list", "--json"]), &repo.env);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// `--backup-incremental-schedule` alone: the first slot finds nothing to build on and takes a
/// full backup, the next ones incremental backups each on the one before, counted under their
/// own job (restoring such chains: tests/incremental_restore.rs).
#[test]
fn scheduled_incremental_backups_start_their_own_chain() {
    let repo = TestRepo::new(Backend::Local);
    let pg = PgCluster::builder().start().unwrap();
    pg.psql("create table beat(id serial primary key)").unwrap();
    let (mut svc, port) =
        start_scheduled(&repo, &pg, &["--backup-incremental-schedule", "every 5s"]);
    let done = wait_runs(port, &svc, &pg, "backup_incremental", 3.0);
    assert_eq!(
        runs(&done, "backup_incremental", "failure"),
        0.0,
        "{}",
        svc.log()
    );
    assert_eq!(runs(&done, "backup", "success"), 0.0);
    svc.terminate();
    let o = pitr(repo.args(&["list", "--json"]), &repo.env);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let backups = v["backups"].as_array().unwrap();
    assert!(backups.len() >= 3, "{v}");
    assert_eq!(backups[0]["kind"], "full", "{v}");
    for (b, parent) in backups[1..].iter().zip(backups) {
        assert_eq!(b["kind"], "incremental", "{v}");
        assert_eq!(b["parent"], parent["id"], "{v}");
    }
}

/// A replication client that holds a WAL sender while it lives (an idle psql in walsender mode).
fn occupy_wal_sender(pg: &PgCluster) -> Child {
    let mut cmd = Command::new(pg.bin("psql"));
    clean_env(&mut cmd);
    cmd.arg(format!("{} replication=true", pg.conninfo()))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn().unwrap()
}

/// The schedule runs backups every 10s: the first, refused by the server (no free WAL
/// sender), is notified as job_failed, the first success after it as job_recovered; expiry
/// keeps the [retention] policy; verify runs; metrics are served under the contract's names;
/// and each alert rule fires on the real values when it should, and not otherwise.
#[test]
fn scheduled_backups_expire_notify_and_feed_the_alert_rules() {
    let repo = TestRepo::new(Backend::Local);
    let pg = PgCluster::builder()
        .conf("max_wal_senders = 3")
        .start()
        .unwrap();
    pg.psql("create table beat(id serial primary key, at timestamptz default now())")
        .unwrap();
    let dir = TestDir::new();
    let config = dir.write_file("pitr.toml", "[retention]\nfull = 2\n");
    let receiver = Receiver::start();
    let port = free_port();
    // stream + its position watcher take two senders; the third goes to this client, so the
    // first scheduled backup is refused.
    let mut occupier = occupy_wal_sender(&pg);
    std::thread::sleep(Duration::from_millis(500));
    let mut args = vec!["--config".to_string(), config.display().to_string()];
    args.extend(repo.args(&[
        "stream",
        "-d",
        &pg.conninfo(),
        "--create-slot",
        "--backup-schedule",
        "every 10s",
        "--verify-schedule",
        "every 10s",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--stats-interval",
        "1s",
        "--notify-url",
        &receiver.url,
        "--rpo-alert",
        "1h",
    ]));
    let svc = Service::start(&repo, &args);

    let failed = receiver.wait_for("job_failed", Some("backup"), 0, &svc);
    let failing = wait_metric(port, &svc, "backup failing", |s| {
        s.values.get("pitr_job_failing{job=\"backup\"}") == Some(&1.0)
    });
    let _ = occupier.kill();
    let _ = occupier.wait();
    receiver.wait_for("job_recovered", Some("backup"), failed, &svc);

    // Backups keep coming, expiry keeps two, WAL and transactions keep the RPO.
    let done = wait_metric(port, &svc, "three backups, expiry and verify", |s| {
        let _ = pg.psql("insert into beat default values");
        runs(s, "backup", "success") >= 3.0
            && runs(s, "expire", "success") >= 2.0
            && runs(s, "verify", "success") >= 1.0
            && s.values
                .get("pitr_recoverable_until_timestamp_seconds")
                .is_some_and(|v| now() - v < 60.0)
    });
    let ids = backup_ids(&repo);
    assert!(
        !ids.is_empty() && ids.len() <= 2,
        "retention full = 2 kept {ids:?}\n{}",
        svc.log()
    );
    receiver.wait_for("rpo_restored", None, 0, &svc);

    for name in [
        "pitr_backup_last_success_timestamp_seconds",
        "pitr_backup_last_duration_seconds",
        "pitr_backup_last_stored_bytes",
        "pitr_verify_last_success_timestamp_seconds",
        "pitr_recoverable_until_timestamp_seconds",
        "pitr_repository_bytes{kind=\"wal\"}",
        "pitr_repository_bytes{kind=\"backups\"}",
        "pitr_stream_lag_seconds",
        "pitr_stream_lag_bytes",
        "pitr_stream_up",
    ] {
        assert!(
            done.values.contains_key(name),
            "{name} missing: {:?}",
            done.values.keys()
        );
    }
    assert!(now() - done.get("pitr_backup_last_success_timestamp_seconds") < 60.0);
    assert!(done.get("pitr_backup_last_stored_bytes") > 0.0);
    assert!(done.get("pitr_repository_bytes{kind=\"wal\"}") > 0.0);
    assert!(done.get("pitr_repository_bytes{kind=\"backups\"}") > 0.0);
    assert_eq!(done.get("pitr_stream_up"), 1.0);
    assert!(runs(&done, "backup", "failure") >= 1.0);

    // Every event has exactly the documented fields and no secrets.
    for e in receiver.events() {
        let mut keys: Vec<&String> = e.as_object().unwrap().keys().collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["at", "event", "host", "job", "message", "repository"],
            "{e}"
        );
        assert_eq!(e["repository"], repo.url.as_str());
    }

    // A damaged backup makes the next scheduled verify fail.
    let newest = backup_ids(&repo).pop().unwrap();
    let part = repo.object_file(&format!("backups/{newest}/base.tar/00000000"));
    let mut bytes = fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&part, bytes).unwrap();
    let verify_failing = wait_metric(port, &svc, "verify failing", |s| {
        s.values.get("pitr_job_failing{job=\"verify\"}") == Some(&1.0)
    });
    receiver.wait_for("job_failed", Some("verify"), 0, &svc);

    promtool_test(&[&failing, &done, &verify_failing]);
}

/// Builds a `promtool test rules` file from real scrapes and runs it: timestamps become
/// offsets from the scrape, since promtool's clock starts at 0.
fn promtool_test(scrapes: &[&Scrape; 3]) {
    let [failing, ok, verify_failing] = scrapes;
    let rel = |s: &Scrape, k: &str| s.get(k) - s.at;
    let dir = TestDir::new();
    let rules = rules_without_annotations(&dir);
    let backup = rel(ok, "pitr_backup_last_success_timestamp_seconds");
    let rec = rel(ok, "pitr_recoverable_until_timestamp_seconds");
    let verified = rel(ok, "pitr_verify_last_success_timestamp_seconds");
    let bf = failing.get("pitr_job_failing{job=\"backup\"}");
    let bo = ok.get("pitr_job_failing{job=\"backup\"}");
    let vf = verify_failing.get("pitr_job_failing{job=\"verify\"}");
    let vo = ok.get("pitr_job_failing{job=\"verify\"}");
    let lag = ok.get("pitr_stream_lag_seconds");
    let test = format!(
        r#"rule_files: ["{rules}"]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'pitr_backup_last_success_timestamp_seconds'
        values: '{backup}x1700'
      - series: 'pitr_recoverable_until_timestamp_seconds'
        values: '{rec}x60'
      - series: 'pitr_job_failing{{job="backup"}}'
        values: '{bf}x10 {bo}x20'
      - series: 'pitr_job_failing{{job="verify"}}'
        values: '{vo}x10 {vf}x20'
      - series: 'pitr_stream_lag_seconds'
        values: '{lag}x60'
    alert_rule_test:
      - {{eval_time: 10m, alertname: PitrBackupTooOld, exp_alerts: []}}
      - {{eval_time: 27h, alertname: PitrBackupTooOld, exp_alerts: [{{exp_labels: {{severity: critical}}}}]}}
      - {{eval_time: 10m, alertname: PitrRecoverableUntilBehindRPO, exp_alerts: []}}
      - {{eval_time: 30m, alertname: PitrRecoverableUntilBehindRPO, exp_alerts: [{{exp_labels: {{severity: critical}}}}]}}
      - {{eval_time: 5m, alertname: PitrScheduledJobFailing, exp_alerts: [{{exp_labels: {{severity: warning, job: backup}}}}]}}
      - {{eval_time: 20m, alertname: PitrScheduledJobFailing, exp_alerts: [{{exp_labels: {{severity: warning, job: verify}}}}]}}
      - {{eval_time: 5m, alertname: PitrVerifyFailing, exp_alerts: []}}
      - {{eval_time: 20m, alertname: PitrVerifyFailing, exp_alerts: [{{exp_labels: {{severity: critical, job: verify}}}}]}}
      - {{eval_time: 30m, alertname: PitrStreamLagging, exp_alerts: []}}
  - interval: 1h
    input_series:
      - series: 'pitr_verify_last_success_timestamp_seconds'
        values: '{verified}x300'
    alert_rule_test:
      - {{eval_time: 2d, alertname: PitrVerifyNotRun, exp_alerts: []}}
      - {{eval_time: 10d, alertname: PitrVerifyNotRun, exp_alerts: [{{exp_labels: {{severity: warning}}}}]}}
"#
    );
    run_promtool(&dir, &test);
}

/// The shipped rules without their annotations: promtool compares annotations too, and these
/// tests are about when each alert fires.
pub fn rules_without_annotations(dir: &TestDir) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/pitr-alerts.yml");
    let text = fs::read_to_string(src).unwrap();
    let mut out = String::new();
    let mut skip_deeper_than: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(d) = skip_deeper_than {
            if indent > d || line.trim().is_empty() {
                continue;
            }
            skip_deeper_than = None;
        }
        if line.trim() == "annotations:" {
            skip_deeper_than = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    dir.write_file("rules.yml", out).display().to_string()
}

pub fn run_promtool(dir: &TestDir, test: &str) {
    let path = dir.write_file("test.yml", test);
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&path)
        .output()
        .expect("promtool (Debian package prometheus; scripts/install-test-deps.sh installs it)");
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}\n{}\n--- test ---\n{test}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shipped rules pass `promtool check rules`.
#[test]
fn alert_rules_pass_promtool_check() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/pitr-alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(src)
        .output()
        .expect("promtool (Debian package prometheus; scripts/install-test-deps.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// While storage is down the stream is blocked and receives little, yet its lag gauges keep
/// moving (the server's position is asked on a timer); a lost server connection is notified as
/// stream_down then stream_up; and the stream alerts fire on these real values.
#[test]
fn lag_moves_while_blocked_and_stream_down_is_notified() {
    let mut repo = TestRepo::new(Backend::S3);
    let mut pg = PgCluster::builder().start().unwrap();
    pg.psql("create table t(x text)").unwrap();
    let receiver = Receiver::start();
    let port = free_port();
    let args = repo.args(&[
        "--storage-retry-timeout",
        "10m",
        "stream",
        "-d",
        &pg.conninfo(),
        "--create-slot",
        "--status-interval",
        "1s",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--notify-url",
        &receiver.url,
    ]);
    let svc = Service::start(&repo, &args);
    let ok = wait_metric(port, &svc, "streaming", |s| {
        s.values.get("pitr_stream_up") == Some(&1.0)
    });

    repo.s3.as_mut().unwrap().stop();
    pg.psql("insert into t select repeat('x', 1000) from generate_series(1, 20000)")
        .unwrap();
    let first = wait_metric(port, &svc, "lag while blocked", |s| {
        s.values
            .get("pitr_stream_lag_bytes")
            .is_some_and(|b| *b > 0.0)
            && s.values
                .get("pitr_stream_lag_seconds")
                .is_some_and(|l| *l > 0.0)
    });
    std::thread::sleep(Duration::from_secs(4));
    let later = scrape(port).unwrap();
    let grew = later.get("pitr_stream_lag_seconds") - first.get("pitr_stream_lag_seconds");
    assert!(
        grew >= 2.0,
        "lag_seconds moved by {grew} in 4s while blocked\n{}",
        svc.log()
    );
    assert!(later.get("pitr_stream_lag_bytes") >= first.get("pitr_stream_lag_bytes"));
    repo.s3.as_mut().unwrap().start().unwrap();
    wait_metric(port, &svc, "caught up", |s| {
        s.values.get("pitr_stream_lag_bytes") == Some(&0.0)
    });

    assert!(
        receiver
            .events()
            .iter()
            .all(|e| e["event"] != "stream_down"),
        "no outage yet: {:?}",
        receiver.events()
    );
    let before = receiver.events().len();
    pg.stop().unwrap();
    let down = wait_metric(port, &svc, "stream down", |s| {
        s.values.get("pitr_stream_up") == Some(&0.0)
    });
    let at = receiver.wait_for("stream_down", None, before, &svc);
    pg.start().unwrap();
    receiver.wait_for("stream_up", None, at, &svc);

    // Lag grows at the rate seen while blocked, from the value seen then.
    let per_min = grew / (later.at - first.at) * 60.0;
    let (l0, l1) = (
        ok.get("pitr_stream_lag_seconds"),
        first.get("pitr_stream_lag_seconds"),
    );
    let (up, dn) = (ok.get("pitr_stream_up"), down.get("pitr_stream_up"));
    let dir = TestDir::new();
    let rules = rules_without_annotations(&dir);
    let test = format!(
        r#"rule_files: ["{rules}"]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'pitr_stream_up'
        values: '{up}x10 {dn}x20'
      - series: 'pitr_stream_lag_seconds'
        values: '{l0}x10 {l1}+{per_min}x30'
    alert_rule_test:
      - {{eval_time: 9m, alertname: PitrStreamDown, exp_alerts: []}}
      - {{eval_time: 20m, alertname: PitrStreamDown, exp_alerts: [{{exp_labels: {{severity: critical}}}}]}}
      - {{eval_time: 9m, alertname: PitrStreamLagging, exp_alerts: []}}
      - {{eval_time: 35m, alertname: PitrStreamLagging, exp_alerts: [{{exp_labels: {{severity: warning}}}}]}}
"#
    );
    run_promtool(&dir, &test);
}

/// `--drill-schedule`: the service drills the latest point on its schedule (after its first
/// scheduled backup exists) and reports the measured RTO under the contract's names.
#[test]
fn scheduled_drill_reports_its_rto() {
    let mut repo = TestRepo::new(Backend::Local);
    let pg = PgCluster::builder().start().unwrap();
    pg.psql("create table beat(id serial primary key)").unwrap();
    // The drill's server runs as the server user: its scratch directory must be reachable.
    let scratch = TestDir::new();
    let parent = scratch.subdir("tmp");
    crate::harness::make_accessible(&parent).unwrap();
    repo.env
        .push(("TMPDIR".into(), parent.display().to_string()));
    let schedules = [
        "--backup-schedule",
        "every 10s",
        "--drill-schedule",
        "every 15s",
    ];
    let (mut svc, port) = start_scheduled(&repo, &pg, &schedules);
    let done = wait_runs(port, &svc, &pg, "drill", 1.0);
    let rto = done.get("pitr_drill_last_rto_seconds");
    assert!(rto > 0.0 && rto < 170.0, "rto {rto}\n{}", svc.log());
    assert!(now() - done.get("pitr_drill_last_success_timestamp_seconds") < 180.0);
    // Stopped (possibly mid-drill), the service leaves no server and no scratch directory.
    svc.terminate();
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&parent.display().to_string()))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "left running: {left:?}\n{}", svc.log());
    assert_eq!(
        fs::read_dir(&parent).unwrap().count(),
        0,
        "scratch left behind\n{}",
        svc.log()
    );
}

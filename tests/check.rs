//! `pitr check` against real PostgreSQL: passes on a correct setup (archive_command, or
//! `pitr stream`), and names each problem, with exit code 12.

use std::time::Duration;

use crate::common::{Backend, TestRepo};
use crate::harness::{pitr, poll, PgCluster, TestDir};
use crate::ops::Service;

fn check(repo: &TestRepo, conninfo: &str, timeout: &str) -> (i32, serde_json::Value) {
    let o = pitr(
        repo.args(&["check", "-d", conninfo, "--json", "--timeout", timeout]),
        &repo.env,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap_or(-1), v)
}

/// The failed checks' names, each with its message.
fn failed(v: &serde_json::Value) -> Vec<(String, String)> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn assert_fails(code: i32, v: &serde_json::Value, name: &str, says: &str) {
    assert_eq!(code, 12, "{v:#}");
    assert_eq!(v["ok"], false, "{v:#}");
    let f = failed(v);
    assert!(
        f.iter()
            .any(|(n, m)| n == name && m.contains(says) && m.contains("fix")),
        "expected {name} to fail saying {says:?} and how to fix it: {f:#?}"
    );
}

#[test]
fn check_passes_with_archive_command_and_names_each_problem() {
    let repo = TestRepo::new(Backend::Local);
    let pg = crate::pitr::primary(&repo);

    let (code, v) = check(&repo, &pg.conninfo(), "60s");
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["ok"], true);
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "repository",
        "system_identifier",
        "wal_level",
        "replication",
        "archiving",
        "wal_arrives",
    ] {
        assert!(names.contains(&n), "{n} not checked: {v:#}");
    }
    for c in v["checks"].as_array().unwrap() {
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 3, "{c}");
    }

    // A role without REPLICATION.
    pg.psql("create role norepl login").unwrap();
    let conn = pg.conninfo().replace("user=postgres", "user=norepl");
    let (code, v) = check(&repo, &conn, "60s");
    assert_fails(code, &v, "replication", "ALTER ROLE norepl REPLICATION");

    // archive_command archives somewhere else: the switched segment never arrives here.
    let elsewhere = TestRepo::new(Backend::Local);
    let (code, v) = check(&elsewhere, &pg.conninfo(), "5s");
    assert_fails(code, &v, "wal_arrives", "did not reach the repository");

    // A location that cannot be written.
    let dir = TestDir::new();
    let file = dir.write_file("not-a-dir", "x");
    let mut bad = TestRepo::new(Backend::Local);
    bad.url = file.join("repo").display().to_string();
    let (code, v) = check(&bad, &pg.conninfo(), "5s");
    assert_fails(code, &v, "repository", "cannot write");

    // Another cluster, with archive_mode on and no archive_command.
    let other = PgCluster::builder()
        .conf("archive_mode = on")
        .start()
        .unwrap();
    let (code, v) = check(&repo, &other.conninfo(), "5s");
    assert_fails(
        code,
        &v,
        "system_identifier",
        "belongs to PostgreSQL system",
    );
    assert_fails(code, &v, "archiving", "archive_command is not set");
    drop(other);

    // wal_level = minimal (which also means no WAL senders).
    let minimal = PgCluster::builder()
        .conf("wal_level = minimal")
        .conf("max_wal_senders = 0")
        .start()
        .unwrap();
    let (code, v) = check(&repo, &minimal.conninfo(), "5s");
    assert_fails(code, &v, "wal_level", "wal_level = minimal");
}

#[test]
fn check_passes_with_pitr_stream_and_fails_without_it() {
    let repo = TestRepo::new(Backend::S3);
    let pg = PgCluster::builder().start().unwrap();
    let (code, v) = check(&repo, &pg.conninfo(), "5s");
    assert_fails(code, &v, "archiving", "archive_command");

    let svc = Service::start(
        &repo,
        &repo.args(&["stream", "-d", &pg.conninfo(), "--create-slot"]),
    );
    poll("stream attached", Duration::from_secs(60), || {
        let a = pg.psql("select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = 'pitr'")?;
        Ok((a == "t").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", svc.log()));
    let (code, v) = check(&repo, &pg.conninfo(), "60s");
    assert_eq!(code, 0, "{v:#}\n{}", svc.log());
}

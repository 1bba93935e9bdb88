//! The deployment files, checked without containers: the compose file's PostgreSQL init script
//! on a real cluster (pitr stream and archive-push are accepted with it, refused without it),
//! and the systemd units through `systemd-analyze verify` (scripts/install-test-deps.sh installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{code, text};
use crate::common::{switch_and_wait, Backend, TestRepo};
use crate::harness::{clean_env, make_accessible, pitr_bin, poll, PgCluster, TestDir};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// What a client in another container meets in the official postgres image: no
/// `replication` line, password authentication for everything over TCP.
const IMAGE_HBA: &str = "local all all trust\nhost all all all scram-sha-256\n";

#[test]
fn compose_init_script_lets_stream_and_archive_push_in() {
    let repo = TestRepo::new(Backend::S3);
    let mut pg = PgCluster::builder()
        .envs(repo.env.clone())
        .env("PITR_REPO", repo.url.clone())
        .init()
        .unwrap();
    let hba = pg.data_dir().join("pg_hba.conf");
    std::fs::write(&hba, IMAGE_HBA).unwrap();
    make_accessible(&hba).unwrap();
    pg.start().unwrap();
    pg.psql("alter role postgres password 'pw'").unwrap();
    let conninfo = format!("{} password=pw", pg.tcp_conninfo());

    // Without the script: refused, as in the issue.
    let o = crate::harness::pitr(
        repo.args(&["stream", "-d", &conninfo, "--create-slot"]),
        &repo.env,
    );
    assert_eq!(code(&o), 7, "{}", text(&o));
    assert!(text(&o).contains("replication"), "{}", text(&o));

    // The script, as the image's entrypoint runs it (PGDATA set, before the real start).
    pg.stop().unwrap();
    let mut script = Command::new("sh");
    clean_env(&mut script);
    let out = script
        .arg(repo_file("deploy/postgres-init.sh"))
        .env("PGDATA", pg.data_dir())
        .env("PITR_BIN", pitr_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.start().unwrap();

    // archive-push: archive_command as the script wrote it, with the repository from the
    // server's environment.
    switch_and_wait(&pg);
    let failed = pg
        .psql("select failed_count from pg_stat_archiver")
        .unwrap();
    assert_eq!(failed, "0", "{}", pg.log_contents());

    // stream: accepted over TCP with a password; stops cleanly on SIGTERM.
    let mut cmd = Command::new(pitr_bin());
    clean_env(&mut cmd);
    let child = cmd
        .args(repo.args(&["stream", "-d", &conninfo, "--create-slot"]))
        .envs(repo.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let active = poll(
        "the stream's slot to be active",
        Duration::from_secs(60),
        || {
            let a = pg.psql("select coalesce((select active::text from pg_replication_slots where slot_name = 'pitr'), '')")?;
            Ok((a == "true").then_some(()))
        },
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    active.unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The units, with the binary path pointed at the built pitr so the check of ExecStart passes.
#[test]
fn systemd_units_verify() {
    let units_dir = repo_file("deploy/systemd");
    let units: Vec<PathBuf> = std::fs::read_dir(&units_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("service" | "timer")
            )
        })
        .collect();
    for kind in ["backup", "expire", "verify", "drill"] {
        for ext in ["service", "timer"] {
            assert!(
                units_dir.join(format!("pitr-{kind}.{ext}")).exists(),
                "pitr-{kind}.{ext}"
            );
        }
    }
    let stream = std::fs::read_to_string(units_dir.join("pitr-stream.service")).unwrap();
    let prevent = stream
        .lines()
        .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .unwrap();
    assert!(prevent.split_whitespace().any(|c| c == "11"), "{prevent}");

    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok(),
        "systemd-analyze is missing: run scripts/install-test-deps.sh (apt-get install systemd)"
    );
    let work = TestDir::new();
    let mut copies = vec![];
    for unit in &units {
        let text = std::fs::read_to_string(unit).unwrap();
        let text = text.replace("/usr/local/bin/pitr", &pitr_bin().display().to_string());
        let copy = work.join(unit.file_name().unwrap());
        std::fs::write(&copy, text).unwrap();
        copies.push(copy);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&copies)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Parse problems are warnings ("..., ignoring"): they fail the check too.
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("Failed to open /etc/pitr/pitr.env"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(out.status.success() && problems.is_empty(), "{stderr}");
}

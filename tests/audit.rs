//! The audit trail with real PostgreSQL: each command that changes the repository or restores
//! from it leaves one record under `audit/`, with secrets removed; a repository that refuses
//! the record refuses the command before it changes anything.

use serde_json::Value;

use crate::common::{code, text};
use crate::common::{switch_and_wait, Backend, TestRepo};
use crate::harness::{make_accessible, TestDir};
use crate::pitr::{insert, ok, primary, run};

const SECRET: &str = "Sup3rSecretPw";

fn audit_files(repo: &TestRepo) -> Vec<(String, String)> {
    let dir = repo.object_file("audit");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let raw = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                String::from_utf8_lossy(&raw).into_owned(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn mutating_commands_leave_audit_records_without_secrets() {
    let repo = TestRepo::new(Backend::Local);
    let pg = primary(&repo);
    pg.psql("create table marks(id serial primary key, phase text not null, at timestamptz default clock_timestamp())").unwrap();
    insert(&pg, "a");
    // Trust authentication: the password is never asked for, but it is on the command line.
    let conninfo = format!("{} password={SECRET}", pg.conninfo());
    let first: Value =
        serde_json::from_str(&ok(&repo, &["backup", "--json", "-d", &conninfo])).unwrap();
    insert(&pg, "b");
    ok(&repo, &["backup", "-d", &pg.conninfo()]);
    switch_and_wait(&pg);
    let work = TestDir::new();
    let pgdata = work.subdir("restored");
    ok(&repo, &["restore", "--pgdata", pgdata.to_str().unwrap()]);
    ok(&repo, &["expire", "--retain-full", "1", "--dry-run"]);
    ok(&repo, &["expire", "--retain-full", "1"]);
    let scratch = work.subdir("scratch");
    make_accessible(&scratch).unwrap();
    ok(
        &repo,
        &["drill", "--scratch-dir", scratch.to_str().unwrap()],
    );

    let files = audit_files(&repo);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        files.len() >= 6,
        "one record per command and the repository's creation, none for the dry run: {names:?}"
    );
    for (name, content) in &files {
        assert!(
            name.ends_with(".json") && name.chars().next().unwrap().is_ascii_digit(),
            "{name}"
        );
        assert!(
            !content.contains(SECRET),
            "the password leaked into {name}: {content}"
        );
    }

    let listed: Value = serde_json::from_str(&ok(&repo, &["audit", "--json"])).unwrap();
    let all = listed.as_array().unwrap();
    // Whichever came first, archive-push or backup, created the repository and recorded it.
    let (created, records): (Vec<&Value>, Vec<&Value>) = all
        .iter()
        .partition(|r| r["command"] == "create-repository");
    assert!(!created.is_empty(), "{listed}");
    assert!(
        created[0]["created"][0]
            .as_str()
            .unwrap()
            .starts_with("repository"),
        "{listed}"
    );
    let commands: Vec<&str> = records
        .iter()
        .map(|r| r["command"].as_str().unwrap())
        .collect();
    assert_eq!(commands, ["backup", "backup", "restore", "expire", "drill"]);
    for r in &records {
        assert_eq!(r["outcome"], "success", "{r}");
        assert!(
            r["finished"].is_string() && !r["user"].as_str().unwrap().is_empty(),
            "{r}"
        );
        assert_eq!(r["pitr_version"], env!("CARGO_PKG_VERSION"));
    }
    let args = records[0]["arguments"].to_string();
    assert!(args.contains("password=***"), "{args}");
    let first_id = first["id"].as_str().unwrap();
    assert_eq!(records[0]["created"][0], format!("backup {first_id}"));
    assert!(records[2]["created"][0]
        .as_str()
        .unwrap()
        .starts_with("restored backup"));
    assert_eq!(records[3]["deleted"][0], format!("backup {first_id}"));
    assert_eq!(records[4]["details"]["ok"], true, "{}", records[4]);

    // --since filters; the human listing names each command.
    let none = ok(
        &repo,
        &["audit", "--json", "--since", "2999-01-01T00:00:00Z"],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&none).unwrap(),
        Value::Array(vec![])
    );
    let human = ok(&repo, &["audit", "--since", "1h"]);
    assert!(
        human.contains("expire") && human.contains("password=***"),
        "{human}"
    );
    assert!(!human.contains(SECRET), "{human}");
}

#[test]
fn an_unwritable_audit_trail_refuses_the_command_before_it_acts() {
    let repo = TestRepo::new(Backend::Local);
    let pg = primary(&repo);
    switch_and_wait(&pg);
    // A file where the audit folder should be: no object can be created under audit/.
    let audit = repo.object_file("audit");
    std::fs::remove_dir_all(&audit).unwrap();
    std::fs::write(&audit, "not a folder").unwrap();
    make_accessible(&audit).unwrap();

    let o = run(&repo, &["backup", "-d", &pg.conninfo()]);
    assert_eq!(code(&o), 5, "{}", text(&o));
    assert!(text(&o).contains("audit record"), "{}", text(&o));
    assert!(
        !repo.object_file("backups").exists(),
        "the backup started anyway"
    );
    assert!(
        !repo.object_file("catalog").exists(),
        "the backup started anyway"
    );

    let work = TestDir::new();
    let pgdata = work.join("restored");
    let o = run(&repo, &["restore", "--pgdata", pgdata.to_str().unwrap()]);
    assert_eq!(code(&o), 5, "{}", text(&o));
    assert!(!pgdata.exists(), "the restore started anyway");

    let o = run(&repo, &["expire", "--retain-full", "1"]);
    assert_eq!(code(&o), 5, "{}", text(&o));

    // Reading commands are not audited and still work.
    ok(&repo, &["list"]);
}

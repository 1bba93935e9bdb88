//! The restore side of incremental backups (issue 13) against real PostgreSQL: delta restore
//! into a directory restored before, and restores from chains of incremental backups.

use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use crate::common::{assert_code, switch_and_wait, text, Backend, TestRepo};
use crate::harness::{pg_major, PgCluster, TestDir};
use crate::pitr::{insert, ok, restore_and_read, run};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Starts PostgreSQL on a restored directory, waits until it has promoted, and reads the
/// marker rows as `phase:count,...`.
fn start_and_read(repo: &TestRepo, dir: &Path) -> (PgCluster, String) {
    let pg = PgCluster::builder()
        .existing_data_dir(dir)
        .envs(repo.env.clone())
        .conf("archive_mode = off")
        .start()
        .unwrap();
    pg.wait_for("select pg_is_in_recovery()", "f", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", pg.log_contents()));
    let phases = pg.psql("select string_agg(phase || ':' || n, ',' order by phase) from (select phase, count(*) n from marks group by phase) s").unwrap();
    (pg, phases)
}

/// A primary with marker rows and a table large enough that a delta restore has something to
/// keep. On PostgreSQL 17+ it summarizes WAL, so incremental backups are the server's own
/// (server mode); older servers give pitr's block mode: the restore side is the same.
fn primary_with_data(repo: &TestRepo) -> PgCluster {
    let mut b = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(repo.env.clone());
    if pg_major() >= 17 {
        b = b.conf("summarize_wal = on");
    }
    let pg = b.start().unwrap();
    pg.psql("create table marks(id serial primary key, phase text not null)")
        .unwrap();
    pg.psql("create table big as select g as id, repeat('x', 300) as pad from generate_series(1, 60000) g")
        .unwrap();
    pg.psql("checkpoint").unwrap();
    pg
}

/// A timestamp between two inserts, a second clear of each.
fn time_between(pg: &PgCluster) -> String {
    sleep(Duration::from_millis(1100));
    let t = pg.psql("select now()").unwrap();
    sleep(Duration::from_millis(1100));
    t
}

#[test]
fn delta_restore_back_to_an_earlier_time() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let pg = primary_with_data(&repo);
    insert(&pg, "a");
    ok(&repo, &["backup", "-d", &pg.conninfo()]);
    insert(&pg, "b");
    let t = time_between(&pg);
    insert(&pg, "c");
    switch_and_wait(&pg);

    let (mut restored, phases) = restore_and_read(&repo, &work, "delta", &[], false);
    assert_eq!(phases, "a:10,b:10,c:10");
    let dir = restored.data_dir().to_path_buf();
    let dir_arg = dir.to_str().unwrap();
    let delta_args = [
        "restore",
        "--delta",
        "--pgdata",
        dir_arg,
        "--target-time",
        &t,
    ];

    // Refused while its server runs: exit 8, nothing touched.
    let o = run(&repo, &delta_args);
    assert_code(&o, 8);
    assert!(text(&o).contains("running PostgreSQL"), "{}", text(&o));
    assert!(dir.join("postmaster.pid").exists());

    restored.stop().unwrap();
    drop(restored);
    let mut args = delta_args.to_vec();
    args.push("--json");
    let v = json(&ok(&repo, &args));
    let (bytes, written) = (
        v["bytes"].as_u64().unwrap(),
        v["written_bytes"].as_u64().unwrap(),
    );
    assert!(v["kept_files"].as_u64().unwrap() > 0, "{v}");
    assert!(
        written * 2 < bytes,
        "a delta restore writes less than half of a full one: {v}"
    );
    assert_eq!(
        v["kept_bytes"].as_u64().unwrap() + written,
        bytes,
        "every byte of the backup is either kept or written: {v}"
    );
    // Stale WAL of the first restore's timeline and its backup_label.old are gone.
    assert!(!dir.join("backup_label.old").exists());
    let (_pg, phases) = start_and_read(&repo, &dir);
    assert_eq!(phases, "a:10,b:10");

    // The text output gives the figures too.
    drop(_pg);
    let out = ok(&repo, &delta_args);
    assert!(out.contains("kept unchanged"), "{out}");
}

fn backup_id(repo: &TestRepo, args: &[&str]) -> String {
    let v = json(&ok(repo, args));
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

#[test]
fn a_chain_of_three_incrementals_restores_to_a_time_and_expires_whole() {
    let repo = TestRepo::new(Backend::Local);
    let work = TestDir::new();
    let pg = primary_with_data(&repo);
    let conn = pg.conninfo();
    let full_args = ["backup", "-d", conn.as_str(), "--json"];
    let incr_args = ["backup", "-d", conn.as_str(), "--incremental", "--json"];
    insert(&pg, "a");
    let full = backup_id(&repo, &full_args);
    insert(&pg, "b");
    let i1 = backup_id(&repo, &incr_args);
    insert(&pg, "c");
    // About 2 % of the large table changes.
    pg.psql("update big set pad = repeat('y', 300) where id <= 1200")
        .unwrap();
    let i2 = backup_id(&repo, &incr_args);
    insert(&pg, "d");
    let i3 = backup_id(&repo, &incr_args);
    insert(&pg, "e");
    let t = time_between(&pg);
    insert(&pg, "f");
    switch_and_wait(&pg);

    let list = json(&ok(&repo, &["list", "--json"]));
    let parents: Vec<(String, serde_json::Value)> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["id"].as_str().unwrap().to_string(), b["parent"].clone()))
        .collect();
    assert_eq!(
        parents,
        vec![
            (full.clone(), serde_json::Value::Null),
            (i1.clone(), full.as_str().into()),
            (i2.clone(), i1.as_str().into()),
            (i3.clone(), i2.as_str().into()),
        ],
        "{list}"
    );

    // Restored to a time after the last incremental: its chain, exact rows.
    let dir = work.subdir("chain");
    let v = json(&ok(
        &repo,
        &[
            "restore",
            "--pgdata",
            dir.to_str().unwrap(),
            "--target-time",
            &t,
            "--json",
        ],
    ));
    assert_eq!(v["backup"], i3.as_str(), "{v}");
    assert_eq!(v["chain"], serde_json::json!([i3, i2, i1, full]), "{v}");
    assert!(v["rebuilt_files"].as_u64().unwrap() > 0, "{v}");
    // The large table is read only after the delta restore below: a first read sets hint bits
    // on every page (server-mode incrementals do not carry hint-bit-only changes), which would
    // give the delta restore all of it to rewrite.
    let (mut restored, phases) = start_and_read(&repo, &dir);
    assert_eq!(phases, "a:10,b:10,c:10,d:10,e:10");
    restored
        .psql("delete from marks where phase = 'a'")
        .unwrap();
    restored.stop().unwrap();
    drop(restored);

    // Delta restore from the chain into that directory: reconstructed files are compared block
    // by block, so little is written, and the rows are exact again.
    let v = json(&ok(
        &repo,
        &[
            "restore",
            "--delta",
            "--pgdata",
            dir.to_str().unwrap(),
            "--target-time",
            &t,
            "--json",
        ],
    ));
    let (bytes, written) = (
        v["bytes"].as_u64().unwrap(),
        v["written_bytes"].as_u64().unwrap(),
    );
    assert!(written * 4 < bytes, "{v}");
    let (restored, phases) = start_and_read(&repo, &dir);
    assert_eq!(phases, "a:10,b:10,c:10,d:10,e:10");
    let changed = restored
        .psql("select count(*) from big where pad like 'y%'")
        .unwrap();
    assert_eq!(changed, "1200");
    assert_eq!(restored.psql("select count(*) from big").unwrap(), "60000");
    drop(restored);

    // A healthy chain verifies clean: INCREMENTAL entries stand for their files.
    let out = ok(&repo, &["verify"]);
    assert!(!out.contains("chain"), "{out}");

    // A lost object of the middle member: refused before writing, naming it; no fall-back.
    let lost = repo.object_file(&format!("backups/{i2}/base.tar/00000000"));
    std::fs::remove_file(&lost).unwrap_or_else(|e| panic!("{}: {e}", lost.display()));
    let refused = work.subdir("refused");
    let o = run(
        &repo,
        &[
            "restore",
            "--pgdata",
            refused.to_str().unwrap(),
            "--target-time",
            &t,
        ],
    );
    assert_code(&o, 8);
    assert!(text(&o).contains(&i2), "{}", text(&o));
    assert!(
        std::fs::read_dir(&refused).map_or(true, |mut d| d.next().is_none()),
        "nothing written"
    );
    let o = run(&repo, &["verify"]);
    assert_code(&o, 10);
    assert!(
        text(&o).contains(&i3) && text(&o).contains("chain"),
        "{}",
        text(&o)
    );

    // Retention counts full backups and keeps chains whole: with a second full, keeping one
    // full removes the first with all three incrementals.
    let v = json(&ok(
        &repo,
        &["expire", "--retain-full", "2", "--json", "--dry-run"],
    ));
    assert_eq!(v["expired"].as_array().unwrap().len(), 0, "{v}");
    insert(&pg, "g");
    let full2 = backup_id(&repo, &full_args);
    let v = json(&ok(&repo, &["expire", "--retain-full", "1", "--json"]));
    let expired: Vec<&str> = v["expired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(expired, vec![&full, &i1, &i2, &i3], "{v}");
    let kept: Vec<&str> = v["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(kept, vec![&full2], "{v}");
}

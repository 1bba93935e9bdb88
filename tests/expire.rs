//! `pitr expire` against real PostgreSQL, on a local directory and on S3: three backups with
//! marker rows between them, a policy that keeps two, then the repository must hold exactly what
//! restoring the kept backups needs, and a restore to the latest point must bring every row back.

use std::collections::BTreeSet;

use crate::common::{assert_code, on_local_and_s3, switch_and_wait, text, Backend, TestRepo};
use crate::harness::TestDir;
use crate::pitr::{insert, ok, primary, restore_and_read, run};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn backup_ids(repo: &TestRepo) -> Vec<String> {
    let v = json(&ok(repo, &["list", "--json"]));
    v["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// The repository's storage, opened with the library, for looking behind pitr's back.
fn storage(repo: &TestRepo) -> (tokio::runtime::Runtime, pitr::storage::Storage) {
    (tokio::runtime::Runtime::new().unwrap(), repo.storage())
}

/// Every key under `prefix`.
fn keys(repo: &TestRepo, prefix: &str) -> BTreeSet<String> {
    let (rt, storage) = storage(repo);
    rt.block_on(storage.list(prefix))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// The log and segment digits (the last 16 of a segment name) of the 16 MiB segment holding
/// `lsn` ("X/Y").
fn segment_digits(lsn: &str) -> String {
    let (hi, lo) = lsn.split_once('/').unwrap();
    let lo = u64::from_str_radix(lo, 16).unwrap();
    format!(
        "{:08X}{:08X}",
        u64::from_str_radix(hi, 16).unwrap(),
        lo >> 24
    )
}

fn expire_keeps_what_restores_need(backend: Backend) {
    let repo = TestRepo::new(backend);
    let pg = primary(&repo);
    pg.psql("create table marks(id serial primary key, phase text not null)")
        .unwrap();
    let mut ids = vec![];
    for phase in ["a", "b", "c"] {
        insert(&pg, phase);
        switch_and_wait(&pg);
        let v = json(&ok(&repo, &["backup", "-d", &pg.conninfo(), "--json"]));
        ids.push(
            v["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{v}"))
                .to_string(),
        );
    }
    insert(&pg, "d");
    switch_and_wait(&pg);
    assert_eq!(backup_ids(&repo), ids);
    let list = json(&ok(&repo, &["list", "--json"]));
    let second_start = list["backups"][1]["start_lsn"]
        .as_str()
        .unwrap()
        .to_string();

    // No policy: a usage error that says what to pass.
    let o = run(&repo, &["expire"]);
    assert_code(&o, 2);
    assert!(text(&o).contains("--retain-full"), "{}", text(&o));

    // A dry run reports the oldest backup and changes nothing.
    let wal_before = keys(&repo, "wal/");
    let v = json(&ok(
        &repo,
        &["expire", "--retain-full", "2", "--dry-run", "--json"],
    ));
    assert_eq!(v["expired"][0]["id"], ids[0].as_str(), "{v}");
    assert_eq!(v["kept"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["wal_kept_from"], second_start.as_str(), "{v}");
    let doomed = v["wal_objects_removed"].as_u64().unwrap();
    assert!(
        doomed >= 2,
        "the first backup's segments and summaries: {v}"
    );
    assert_eq!(backup_ids(&repo), ids);
    assert_eq!(keys(&repo, "wal/"), wal_before);

    // While another backup runs (a fresh lease, no catalog entry yet), its start is unknown:
    // the first backup goes, but no WAL.
    let (rt, st) = storage(&repo);
    let lease_key = "backups/20991231T000000Z/lease";
    let lease = serde_json::json!({
        "backup_id": "20991231T000000Z",
        "pid": 1,
        "updated_at": chrono::Utc::now(),
    });
    rt.block_on(st.put_overwrite(
        lease_key,
        pitr::codec::encode(lease.to_string().as_bytes(), pitr::codec::Codec::None, 0).into(),
    ))
    .unwrap();
    let v = json(&ok(&repo, &["expire", "--retain-full", "2", "--json"]));
    assert_eq!(v["expired"][0]["id"], ids[0].as_str(), "{v}");
    assert_eq!(v["wal_objects_removed"], 0, "{v}");
    assert!(
        v["wal_note"].as_str().unwrap().contains("20991231T000000Z"),
        "{v}"
    );
    assert_eq!(backup_ids(&repo), ids[1..].to_vec());
    assert!(keys(&repo, &format!("backups/{}/", ids[0])).is_empty());
    assert_eq!(keys(&repo, "wal/"), wal_before);

    // Once it is gone, the next run removes exactly the WAL before the second backup's start.
    rt.block_on(st.delete(lease_key)).unwrap();
    let v = json(&ok(&repo, &["expire", "--retain-full", "2", "--json"]));
    assert_eq!(v["expired"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["wal_objects_removed"].as_u64().unwrap(), doomed, "{v}");
    let wal_after = keys(&repo, "wal/");
    assert_eq!(wal_before.len() - wal_after.len(), doomed as usize);
    let first_kept = segment_digits(&second_start);
    for k in wal_before.difference(&wal_after) {
        assert!(!k.ends_with(".history"), "history files stay: {k}");
        let name = k
            .split('/')
            .find(|p| p.len() >= 24 && p.as_bytes()[..24].iter().all(u8::is_ascii_hexdigit))
            .unwrap_or_else(|| panic!("{k}"));
        assert!(
            name[8..24] < first_kept[..],
            "{k} removed but it is not before {first_kept}"
        );
    }
    for k in wal_after.iter().filter(|k| !k.ends_with(".history")) {
        let name = k.rsplit('/').next().unwrap();
        if name.len() >= 24 && !k.contains("/chunks/") {
            assert!(
                name[8..24] >= first_kept[..],
                "{k} kept but before {first_kept}"
            );
        }
    }
    // Running it again finds nothing more to do.
    let v = json(&ok(&repo, &["expire", "--retain-full", "2", "--json"]));
    assert_eq!(v["expired"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["wal_objects_removed"], 0, "{v}");

    // What is left verifies clean and restores every row.
    let o = run(&repo, &["verify"]);
    assert_code(&o, 0);
    let work = TestDir::new();
    let (_restored, phases) = restore_and_read(&repo, &work, "latest", &[], false);
    assert_eq!(phases, "a:10,b:10,c:10,d:10");

    // An interrupted run left an `expired` marker on the second backup: the next run finishes
    // removing it even though the policy alone would keep it.
    let marker = format!("backups/{}/expired", ids[1]);
    rt.block_on(st.put_overwrite(
        &marker,
        pitr::codec::encode(b"{}", pitr::codec::Codec::None, 0).into(),
    ))
    .unwrap();
    let v = json(&ok(&repo, &["expire", "--retain-full", "5", "--json"]));
    assert_eq!(v["finished_from_earlier_run"][0], ids[1].as_str(), "{v}");
    assert_eq!(backup_ids(&repo), ids[2..].to_vec());
    assert!(keys(&repo, &format!("backups/{}/", ids[1])).is_empty());
}

on_local_and_s3!(
    expire_keeps_what_restores_need,
    expire_keeps_what_restores_need_on_local_directory,
    expire_keeps_what_restores_need_on_s3
);

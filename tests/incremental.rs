//! The backup side of incremental backups (issue 13) against real PostgreSQL: pitr's
//! block-level mode, the catalog fields `list` shows, and the refusals.

use std::fs;

use crate::common::{assert_code, text, Backend, TestRepo};
use crate::harness::{pg_major, PgCluster};
use crate::pitr::{ok, primary, run};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// A table of ~100k rows of poorly compressible text (~35 MB), frozen and checkpointed so that
/// hint bits and the visibility map do not change every block after the full backup.
fn primary_with_big_table(repo: &TestRepo) -> PgCluster {
    table_in(primary(repo))
}

fn table_in(pg: PgCluster) -> PgCluster {
    pg.psql(
        "create table big as select g as id, md5(g::text) || md5((g * 3)::text) || md5((g * 7)::text) \
         || md5((g * 11)::text) || md5((g * 13)::text) || md5((g * 17)::text) as pad \
         from generate_series(1, 100000) g",
    )
    .unwrap();
    pg.psql("vacuum (freeze, analyze) big").unwrap();
    pg.psql("checkpoint").unwrap();
    pg
}

fn backups(repo: &TestRepo) -> Vec<serde_json::Value> {
    json(&ok(repo, &["list", "--json"]))["backups"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn block_mode_stores_only_changed_blocks() {
    let repo = TestRepo::new(Backend::Local);
    let pg = primary_with_big_table(&repo);
    let full = json(&ok(&repo, &["backup", "-d", &pg.conninfo(), "--json"]));
    let full_id = full["id"].as_str().unwrap().to_string();
    assert_eq!(full["kind"], "full");
    assert!(full["parent"].is_null());

    // 2 % of the rows, a contiguous id range.
    pg.psql("update big set pad = upper(pad) where id <= 2000")
        .unwrap();
    pg.psql("checkpoint").unwrap();
    let out = ok(&repo, &["backup", "-d", &pg.conninfo(), "--incremental"]);
    assert!(out.contains("block mode"), "{out}");
    assert!(out.contains(&format!("on {full_id}")), "{out}");

    let list = backups(&repo);
    assert_eq!(list.len(), 2, "{list:?}");
    let (f, i) = (&list[0], &list[1]);
    assert_eq!(f["kind"], "full");
    assert!(f["parent"].is_null());
    assert_eq!(i["kind"], "incremental");
    assert_eq!(i["parent"], full_id.as_str());
    assert_eq!(i["incremental_mode"], "block");
    let (fs_, is_) = (
        f["stored_bytes"].as_u64().unwrap(),
        i["stored_bytes"].as_u64().unwrap(),
    );
    eprintln!("stored bytes: full {fs_}, incremental {is_}");
    assert!(
        is_ * 4 < fs_,
        "incremental stored {is_} bytes, the full {fs_}"
    );
    let table = ok(&repo, &["list"]);
    assert!(
        table.contains("incremental") && table.contains(&full_id),
        "{table}"
    );

    // The incremental holds the table's relation file as an INCREMENTAL entry: its own
    // block map still describes the whole file.
    let inc_id = i["id"].as_str().unwrap();
    assert!(repo
        .object_file(&format!("backups/{inc_id}/blockmap/index"))
        .exists());

    // A second incremental takes the first as its parent by default.
    pg.psql("update big set pad = lower(pad) where id > 99000")
        .unwrap();
    let out = ok(
        &repo,
        &["backup", "-d", &pg.conninfo(), "--incremental", "--json"],
    );
    assert_eq!(json(&out)["parent"], inc_id);
}

#[test]
fn incremental_without_a_parent_is_refused() {
    let repo = TestRepo::new(Backend::Local);
    let pg = primary(&repo);
    let o = run(&repo, &["backup", "-d", &pg.conninfo(), "--incremental"]);
    assert_code(&o, 2);
    let t = text(&o);
    assert!(t.contains("`pitr backup` without --incremental"), "{t}");

    // A parent without a block map (as taken by an older pitr) is refused with a hint.
    let full = json(&ok(&repo, &["backup", "-d", &pg.conninfo(), "--json"]));
    let id = full["id"].as_str().unwrap();
    fs::remove_file(repo.object_file(&format!("backups/{id}/blockmap/index"))).unwrap();
    let o = run(&repo, &["backup", "-d", &pg.conninfo(), "--incremental"]);
    assert_code(&o, 2);
    let t = text(&o);
    assert!(
        t.contains("no block map") && t.contains("full backup"),
        "{t}"
    );

    let o = run(
        &repo,
        &[
            "backup",
            "-d",
            &pg.conninfo(),
            "--incremental",
            "--parent",
            "nope",
        ],
    );
    assert_code(&o, 2);
    assert!(text(&o).contains("parent backup nope"), "{}", text(&o));
}

/// PostgreSQL 17+ with summarize_wal = on: the server sends only the changed blocks (run with
/// PG_BIN pointing at 17 or 18); older servers take the block mode and say why.
#[test]
fn server_mode_where_the_server_summarizes_wal() {
    let repo = TestRepo::new(Backend::Local);
    let major = pg_major();
    let mut b = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(repo.env.clone());
    if major >= 17 {
        b = b.conf("summarize_wal = on");
    }
    let pg = table_in(b.start().unwrap());
    let full = json(&ok(&repo, &["backup", "-d", &pg.conninfo(), "--json"]));
    pg.psql("update big set pad = upper(pad) where id <= 2000")
        .unwrap();
    pg.psql("checkpoint").unwrap();
    let out = ok(&repo, &["backup", "-d", &pg.conninfo(), "--incremental"]);
    let list = backups(&repo);
    let i = &list[1];
    assert_eq!(i["parent"], full["id"]);
    if major >= 17 {
        assert!(
            out.contains("server mode") && out.contains("summarize_wal = on"),
            "{out}"
        );
        assert_eq!(i["incremental_mode"], "server");
    } else {
        assert!(
            out.contains(&format!("PostgreSQL {major} has no incremental")),
            "{out}"
        );
        assert_eq!(i["incremental_mode"], "block");
    }
    let (fs_, is_) = (
        list[0]["stored_bytes"].as_u64().unwrap(),
        i["stored_bytes"].as_u64().unwrap(),
    );
    eprintln!("stored bytes: full {fs_}, incremental {is_}");
    assert!(
        is_ * 4 < fs_,
        "incremental stored {is_} bytes, the full {fs_}"
    );

    // The next incremental (server mode on the incremental's manifest) still works.
    pg.psql("update big set pad = lower(pad) where id > 99000")
        .unwrap();
    let out = ok(
        &repo,
        &["backup", "-d", &pg.conninfo(), "--incremental", "--json"],
    );
    assert_eq!(json(&out)["parent"], i["id"]);
}

/// The server cannot compute the incremental (the WAL summaries since the parent's start are
/// gone): pitr computes it in block mode and says why.
#[test]
fn an_incremental_the_server_refuses_falls_back_to_block_mode() {
    let repo = TestRepo::new(Backend::Local);
    let major = pg_major();
    let mut b = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(repo.archive_command_conf())
        .envs(repo.env.clone());
    if major >= 17 {
        b = b.conf("summarize_wal = on");
    }
    let pg = table_in(b.start().unwrap());
    let full = json(&ok(&repo, &["backup", "-d", &pg.conninfo(), "--json"]));
    pg.psql("update big set pad = upper(pad) where id <= 2000")
        .unwrap();
    pg.psql("checkpoint").unwrap();
    if major >= 17 {
        // Once the WAL since the full backup is summarized, its summaries are lost.
        pg.psql("select pg_switch_wal()").unwrap();
        pg.psql("checkpoint").unwrap();
        let lsn = &full["start_lsn"].as_str().unwrap();
        pg.wait_for(
            &format!(
                "select count(*) > 0 from pg_available_wal_summaries() where end_lsn > '{lsn}'"
            ),
            "t",
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        for f in fs::read_dir(pg.data_dir().join("pg_wal/summaries")).unwrap() {
            fs::remove_file(f.unwrap().path()).unwrap();
        }
    }
    let out = ok(&repo, &["backup", "-d", &pg.conninfo(), "--incremental"]);
    let list = backups(&repo);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[1]["parent"], full["id"]);
    assert_eq!(list[1]["incremental_mode"], "block", "{out}");
    if major >= 17 {
        assert!(out.contains("the server refused"), "{out}");
    }
    // Only the published backups hold objects: the refused attempt removed its lease.
    let ids: Vec<&str> = list.iter().map(|b| b["id"].as_str().unwrap()).collect();
    for d in fs::read_dir(repo.object_file("backups")).unwrap() {
        let d = d.unwrap();
        let name = d.file_name().into_string().unwrap();
        let objects = fs::read_dir(d.path()).unwrap().count();
        assert!(
            ids.contains(&name.as_str()) || objects == 0,
            "{name}: {objects} objects"
        );
    }
}

//! Self-tests of the harness: if these fail, every other integration test would too.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use object_store::{path::Path as ObjPath, ObjectStoreExt, PutPayload};

use super::*;

/// Alive = exists and is not a zombie (PID 1 here may reap orphans lazily).
fn process_alive(pid: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(Path::new("/proc").join(pid.trim()).join("stat")) else {
        return false;
    };
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    !matches!(state, Some(Some('Z' | 'X')))
}

#[test]
fn pg_cluster_create_insert_read_back() -> Result<()> {
    let pg = PgCluster::start_default()?;
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g;")?;
    assert_eq!(pg.psql("SELECT count(*), max(v) FROM t")?, "100|row 99");
    assert_eq!(pg.psql("SHOW wal_level")?, "replica");
    assert_eq!(pg.psql("SHOW listen_addresses")?, "127.0.0.1");
    assert!(pg.conninfo().contains(&format!("port={}", pg.port())));
    // psql errors carry the server's message.
    let err = pg
        .psql("SELECT * FROM no_such_table")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_such_table"), "{err}");
    assert!(pg.bin("pg_waldump").exists());
    // The server is the major the binaries say (the version matrix runs each with PG_BIN).
    let num: u32 = pg.psql("SHOW server_version_num")?.parse()?;
    assert_eq!(num / 10000, super::pg_major());
    assert!(pg.log_contents().contains("database system is ready"));
    // Over TCP too.
    let out = std::process::Command::new(pg.bin("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-d",
            &pg.tcp_conninfo(),
            "-c",
            "SELECT 42",
        ])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    Ok(())
}

#[test]
fn two_clusters_at_once_and_drop_stops_them() -> Result<()> {
    let a = PgCluster::start_default()?;
    let b = PgCluster::builder().wal_segsize(1).start()?;
    assert_ne!(a.port(), b.port());
    a.psql("CREATE TABLE only_in_a ()")?;
    assert_eq!(
        b.psql("SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'")?,
        "0"
    );
    assert_eq!(b.psql("SHOW wal_segment_size")?, "1MB");
    let pid = std::fs::read_to_string(a.data_dir().join("postmaster.pid"))?;
    let pid = pid.lines().next().unwrap().to_string();
    let dir = a.temp_dir().to_path_buf();
    assert!(process_alive(&pid));
    drop(a);
    assert!(!process_alive(&pid), "postmaster {pid} survived drop");
    assert!(!dir.exists(), "{} survived drop", dir.display());
    Ok(())
}

#[test]
fn archive_command_sees_env_and_writes_to_test_dir() -> Result<()> {
    let td = TestDir::new();
    let archive = td.subdir("archive");
    let cmd = format!(
        "test \"$PITR_MARK\" = yes && cp %p {}/%f",
        sh_quote(&archive)
    );
    let mut pg = PgCluster::builder()
        .conf("archive_mode = on")
        .conf(format!("archive_command = {}", conf_quote(&cmd)))
        .env("PITR_MARK", "yes")
        .start()?;
    let seg = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")?;
    pg.psql("CREATE TABLE x (); SELECT pg_switch_wal();")?;
    pg.wait_for(
        "SELECT last_archived_wal FROM pg_stat_archiver",
        &seg,
        Duration::from_secs(30),
    )?;
    assert!(archive.join(&seg).exists());
    // restart keeps port and env; stop_immediate then start runs crash recovery.
    let port = pg.port();
    pg.restart()?;
    assert_eq!(pg.port(), port);
    pg.stop_immediate()?;
    pg.start()?;
    pg.wait_ready()?;
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_class WHERE relname = 'x'")?,
        "1"
    );
    Ok(())
}

#[test]
fn start_on_existing_data_dir_then_promote() -> Result<()> {
    let src = PgCluster::start_default()?;
    src.psql("CREATE TABLE kept AS SELECT 7 AS v")?;
    // Lay out a data dir as root (like `pitr restore` would), then start on it as a standby.
    let td = TestDir::new();
    let data = td.join("restored");
    let out = std::process::Command::new(src.bin("pg_basebackup"))
        .args(["-d", &src.conninfo(), "-D"])
        .arg(&data)
        .args(["-X", "stream", "-R", "-c", "fast"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut standby = PgCluster::builder().existing_data_dir(&data).start()?;
    assert_ne!(standby.port(), src.port());
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()")?, "t");
    standby.promote()?;
    assert_eq!(
        standby.psql("SELECT pg_is_in_recovery(), v FROM kept")?,
        "f|7"
    );
    drop(standby);
    assert!(
        data.exists(),
        "an adopted data dir belongs to the test, not the cluster"
    );
    Ok(())
}

#[test]
fn psql_large_script_and_output_do_not_deadlock() -> Result<()> {
    let pg = PgCluster::start_default()?;
    // ~1 MB of script whose output (~1 MB) also overflows the pipe buffers.
    let script: String = (0..20_000)
        .map(|i| format!("SELECT {i}, repeat('x', 40);\n"))
        .collect();
    let out = pg.psql(&script)?;
    assert_eq!(out.lines().count(), 20_000);
    Ok(())
}

#[tokio::test]
async fn psql_async_works() -> Result<()> {
    let pg = PgCluster::start_default()?;
    assert_eq!(pg.psql_async("SELECT 1 + 1").await?, "2");
    assert!(pg.psql_async("SELEC").await.is_err());
    Ok(())
}

#[test]
fn pgbench_runs() -> Result<()> {
    let pg = PgCluster::start_default()?;
    pg.pgbench_init(1)?;
    let report = pg.pgbench(["-t", "20", "-c", "2"])?;
    assert!(
        report.contains("number of transactions actually processed: 40"),
        "{report}"
    );
    Ok(())
}

#[test]
fn pitr_binary_runs_as_server_user() {
    let out = pitr_as_server_user(["--help"], &[]);
    assert!(out.status.success(), "{out:?}");
    let out = pitr(["--help"], &[("PITR_X".into(), "1".into())]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn test_dir_is_removed_on_drop() {
    let td = TestDir::new();
    let f = td.write_file("conf/pitr.toml", "x = 1\n");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "x = 1\n");
    let p = td.path().to_path_buf();
    drop(td);
    assert!(!p.exists());
}

#[tokio::test]
async fn s3_put_get_outage_and_recovery() -> Result<()> {
    let mut s3 = S3Server::new()?;
    let store = s3.object_store()?;
    let key = ObjPath::from("repo/wal/000000010000000000000001");
    store
        .put(&key, PutPayload::from_static(b"segment bytes"))
        .await?;
    let got = store.get(&key).await?.bytes().await?;
    assert_eq!(&got[..], b"segment bytes");
    // The stored object is a plain file: tests can corrupt it there.
    assert_eq!(
        std::fs::read(s3.object_path(key.as_ref()))?,
        b"segment bytes"
    );
    assert_eq!(s3.repo_url("repo"), "s3://pitr-test/repo");

    // The env() variables are enough for object_store's from_env (as pitr will use them).
    let mut b = object_store::aws::AmazonS3Builder::new().with_bucket_name(s3.bucket());
    for (k, v) in s3.env() {
        b = b.with_config(k.to_ascii_lowercase().parse()?, v);
    }
    let from_env = b.build()?;
    assert_eq!(
        &from_env.get(&key).await?.bytes().await?[..],
        b"segment bytes"
    );

    // Wrong credentials are rejected: s3s-fs really checks signatures.
    let bad = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(s3.bucket())
        .with_access_key_id(s3.access_key())
        .with_secret_access_key("wrong")
        .build()?;
    assert!(bad.get(&key).await.is_err());

    s3.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", s3.port())).is_err());
    let no_retry = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(s3.bucket())
        .with_access_key_id(s3.access_key())
        .with_secret_access_key(s3.secret_key())
        .with_retry(object_store::RetryConfig {
            max_retries: 0,
            ..Default::default()
        })
        .build()?;
    assert!(
        no_retry.get(&key).await.is_err(),
        "stopped server still answers"
    );

    s3.start()?;
    let got = no_retry.get(&key).await?.bytes().await?;
    assert_eq!(&got[..], b"segment bytes");
    Ok(())
}

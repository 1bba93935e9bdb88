//! Live tests of `pitr::pg` against a real PostgreSQL started per test: Debian's 15 by
//! default, any major from 14 on with `PG_BIN` (scripts/test-matrix.sh). Where the protocol
//! differs by major (progress messages, READ_REPLICATION_SLOT: 15+), the test checks the
//! behaviour of the server's major.
//!
//! Each test gets its own harness cluster ([`PgCluster`]: temp dir, free port, Unix socket in
//! the temp dir, stopped on drop and by a watchdog if the test process is killed), so the tests
//! run in parallel. Missing PostgreSQL binaries fail the test with an install hint; nothing is
//! skipped.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pitr::format::archive_check::{ArchiveReader, Discard, ManifestCheck};
use pitr::pg::{
    self, BackupEvent, BaseBackupOptions, ConnConfig, CreateSlotOptions, ReplicationConn,
    ReplicationMessage,
};
use pitr::wal::{Lsn, WalFileName};

use crate::harness::{
    command_as_server_user, free_port, make_accessible, run_checked, PgCluster, Proxy, TestDir,
};

const SEG: u64 = 16 * 1024 * 1024;

/// pg_hba.conf lines, placed before initdb's trust-everything defaults (first match wins).
/// Local connections (the superuser over the socket) fall through to those defaults: trust.
/// The last line keeps other TCP replication users out, as no default may let them in.
const HBA: &[&str] = &[
    "host replication repl 127.0.0.1/32 scram-sha-256",
    "host replication md5user 127.0.0.1/32 md5",
    "host replication norepl 127.0.0.1/32 scram-sha-256",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host replication all all reject",
];

/// A primary with replication users and a self-signed TLS certificate (`root.crt` in its
/// temp dir is a copy, for `sslrootcert`).
fn start_primary() -> Result<PgCluster> {
    let mut b = PgCluster::builder()
        .conf("wal_sender_timeout = '2s'")
        .conf("ssl = on")
        .conf("ssl_cert_file = 'server.crt'")
        .conf("ssl_key_file = 'server.key'");
    for line in HBA {
        b = b.hba(*line);
    }
    let mut cluster = b.init()?;
    make_cert(&cluster)?;
    cluster.start()?;
    cluster.psql("CREATE ROLE repl LOGIN REPLICATION PASSWORD 'replpw'")?;
    cluster.psql("CREATE ROLE norepl LOGIN PASSWORD 'noreplpw'")?;
    cluster.psql(
        "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5pw'",
    )?;
    Ok(cluster)
}

/// `openssl req`: a self-signed certificate and its key (no passphrase).
fn openssl_self_signed(
    subject: &str,
    san: Option<&str>,
    days: &str,
    key: &Path,
    cert: &Path,
) -> Result<()> {
    let mut c = Command::new("openssl");
    c.args([
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", days,
    ])
    .args(["-subj", subject]);
    if let Some(san) = san {
        c.arg("-addext").arg(format!("subjectAltName={san}"));
    }
    c.arg("-keyout").arg(key).arg("-out").arg(cert);
    run_checked(&mut c).context("openssl must be installed for the TLS tests")?;
    Ok(())
}

/// Writes server.crt/server.key into the (not yet started) cluster's data dir.
fn make_cert(cluster: &PgCluster) -> Result<()> {
    let data = cluster.data_dir();
    let (key, crt) = (data.join("server.key"), data.join("server.crt"));
    openssl_self_signed(
        "/CN=localhost",
        Some("DNS:localhost,IP:127.0.0.1"),
        "2",
        &key,
        &crt,
    )?;
    std::fs::copy(&crt, cluster.temp_dir().join("root.crt"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    make_accessible(&key)?;
    make_accessible(&crt)?;
    Ok(())
}

/// Conninfo over the Unix socket as the superuser (trust).
fn socket_conninfo(cluster: &PgCluster) -> String {
    format!(
        "host={} port={} user=postgres sslmode=disable",
        cluster.socket_dir().display(),
        cluster.port()
    )
}

fn tcp_conninfo(cluster: &PgCluster, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} sslmode=disable",
        cluster.port()
    )
}

fn system_identifier(cluster: &PgCluster) -> Result<u64> {
    let mut c = command_as_server_user(cluster.bin("pg_controldata"));
    c.arg("-D").arg(cluster.data_dir());
    let out = String::from_utf8(run_checked(&mut c)?.stdout)?;
    let line = out
        .lines()
        .find(|l| l.starts_with("Database system identifier:"))
        .context("no system identifier in pg_controldata output")?;
    Ok(line.rsplit(':').next().unwrap_or("").trim().parse()?)
}

/// The cluster's major version (14, 15, ...), from the server itself.
fn server_major(cluster: &PgCluster) -> Result<u32> {
    let num: u32 = cluster.psql("SHOW server_version_num")?.trim().parse()?;
    Ok(num / 10000)
}

fn env_none(_: &str) -> Option<String> {
    None
}

async fn connect(conninfo: &str) -> pg::Result<ReplicationConn> {
    let cfg = ConnConfig::parse_with_env(conninfo, env_none)?.application_name("pitr-test");
    ReplicationConn::connect(&cfg).await
}

#[tokio::test]
async fn unix_socket_trust_and_identify_system() -> Result<()> {
    let cluster = start_primary()?;
    let mut conn = connect(&socket_conninfo(&cluster)).await?;
    let major = server_major(&cluster)?;
    assert_eq!(conn.server_major(), major);
    assert!(conn.server_version_num() >= major * 10000);
    let id = conn.identify_system().await?;
    assert_eq!(id.system_id, system_identifier(&cluster)?);
    assert_eq!(id.timeline, 1);
    assert!(id.xlogpos > Lsn(0));
    assert_eq!(id.dbname, None);
    assert_eq!(conn.show("wal_segment_size").await?, "16MB");
    assert_eq!(conn.wal_segment_size().await?, SEG);
    assert_eq!(conn.show("wal_level").await?, "replica");
    // An error leaves the connection usable.
    let err = conn.show("no_such_setting").await.expect_err("unknown GUC");
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    assert_eq!(conn.identify_system().await?.system_id, id.system_id);
    conn.close().await;
    Ok(())
}

#[tokio::test]
async fn password_methods_and_refusals() -> Result<()> {
    let cluster = start_primary()?;
    // SCRAM-SHA-256 over TCP.
    let mut c = connect(&tcp_conninfo(&cluster, "repl", "replpw")).await?;
    assert!(!c.connection().is_tls());
    c.identify_system().await?;
    // md5 over TCP.
    let mut c = connect(&tcp_conninfo(&cluster, "md5user", "md5pw")).await?;
    c.identify_system().await?;

    // Wrong password: an Auth error with 28P01, not transient, password not in the message.
    let err = connect(&tcp_conninfo(&cluster, "repl", "wrong-secret"))
        .await
        .expect_err("wrong password");
    assert!(matches!(err, pg::Error::Auth { .. }), "{err:?}");
    assert_eq!(err.sqlstate(), Some("28P01"));
    assert!(!err.is_transient());
    assert!(!format!("{err} {err:?}").contains("wrong-secret"));

    // A role without REPLICATION.
    let err = connect(&tcp_conninfo(&cluster, "norepl", "noreplpw"))
        .await
        .expect_err("no replication attribute");
    assert!(err.is_insufficient_privilege(), "{err:?}");

    // No password at all for a SCRAM user.
    let err = connect(&format!(
        "host=127.0.0.1 port={} user=repl sslmode=disable passfile=/nonexistent",
        cluster.port()
    ))
    .await
    .expect_err("no password");
    assert!(matches!(err, pg::Error::Auth { .. }), "{err:?}");

    // Nothing listening: a transient Connect error.
    let err = connect(&format!("host=127.0.0.1 port={} user=x", free_port()))
        .await
        .expect_err("closed port");
    assert!(err.is_transient(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn pgpass_and_url_and_host_list() -> Result<()> {
    let cluster = start_primary()?;
    let passfile = cluster.temp_dir().join("pgpass");
    std::fs::write(
        &passfile,
        format!("127.0.0.1:{}:replication:repl:replpw\n", cluster.port()),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600))?;
    // The first host refuses connections, the second is the server.
    let conninfo = format!(
        "postgres://repl@127.0.0.1:{},127.0.0.1:{}/?sslmode=disable&passfile={}",
        free_port(),
        cluster.port(),
        passfile.display()
    );
    let mut c = connect(&conninfo).await?;
    c.identify_system().await?;

    // target_session_attrs: the primary is read-write, never a standby.
    let ok = format!(
        "{} target_session_attrs=read-write",
        socket_conninfo(&cluster)
    );
    connect(&ok).await?;
    let primary = format!("{} target_session_attrs=primary", socket_conninfo(&cluster));
    connect(&primary).await?;
    let standby = format!("{} target_session_attrs=standby", socket_conninfo(&cluster));
    let err = connect(&standby).await.expect_err("not a standby");
    assert!(
        matches!(err, pg::Error::WrongSessionAttrs { .. }),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn tls_modes_and_scram_plus() -> Result<()> {
    let cluster = start_primary()?;
    let root = cluster.temp_dir().join("root.crt");
    let base = |mode: &str, host: &str| {
        format!(
            "host={host} port={} user=repl password=replpw sslmode={mode} sslrootcert={}",
            cluster.port(),
            root.display()
        )
    };
    for mode in ["prefer", "require", "verify-ca"] {
        let c = connect(&base(mode, "127.0.0.1")).await?;
        assert!(c.connection().is_tls(), "sslmode={mode}");
    }
    // verify-full: the certificate names localhost and 127.0.0.1.
    let mut c = connect(&base("verify-full", "localhost")).await?;
    assert!(c.connection().is_tls());
    // Over TLS the server offers channel binding and we take it.
    assert_eq!(c.connection().sasl_mechanism(), Some("SCRAM-SHA-256-PLUS"));
    let c2 = connect(&base("verify-full", "127.0.0.1")).await?;
    assert!(c2.connection().is_tls(), "IP address SAN");
    let plain = connect(&tcp_conninfo(&cluster, "repl", "replpw")).await?;
    assert_eq!(plain.connection().sasl_mechanism(), Some("SCRAM-SHA-256"));
    c.identify_system().await?;
    // A different root: verification fails.
    let other = cluster.temp_dir().join("other.crt");
    openssl_self_signed(
        "/CN=other",
        None,
        "1",
        &cluster.temp_dir().join("other.key"),
        &other,
    )?;
    let err = connect(&format!(
        "host=localhost port={} user=repl password=replpw sslmode=verify-full sslrootcert={}",
        cluster.port(),
        other.display()
    ))
    .await
    .expect_err("untrusted certificate");
    assert!(matches!(err, pg::Error::Tls { .. }), "{err:?}");
    // verify-ca ignores the name but not the chain.
    let err = connect(&format!(
        "host=127.0.0.1 port={} user=repl password=replpw sslmode=verify-ca sslrootcert={}",
        cluster.port(),
        other.display()
    ))
    .await
    .expect_err("untrusted certificate");
    assert!(matches!(err, pg::Error::Tls { .. }), "{err:?}");
    // verify-full needs a root certificate.
    let err = connect(&format!(
        "host=localhost port={} user=repl password=replpw sslmode=verify-full sslrootcert=/nonexistent",
        cluster.port()
    ))
    .await
    .expect_err("no root certificate");
    assert!(matches!(err, pg::Error::Tls { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn slots_create_read_drop() -> Result<()> {
    let cluster = start_primary()?;
    let mut c = connect(&socket_conninfo(&cluster)).await?;
    let slot = c
        .create_replication_slot("pitr_test", CreateSlotOptions::default())
        .await?;
    assert_eq!(slot.name, "pitr_test");
    let restart_sql = cluster
        .psql("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'pitr_test'")?;
    let restart_sql: Lsn = restart_sql.trim().parse()?;
    assert!(restart_sql > Lsn(0), "RESERVE_WAL sets restart_lsn");
    let modern = server_major(&cluster)? >= 15;
    if modern {
        let restart = slot.restart_lsn.context("RESERVE_WAL sets restart_lsn")?;
        assert_eq!(restart, restart_sql);
        let info = c
            .read_replication_slot("pitr_test")
            .await?
            .context("slot exists")?;
        assert_eq!(info.restart_lsn, Some(restart));
        assert_eq!(info.restart_tli, Some(1));
    } else {
        // READ_REPLICATION_SLOT is 15+: no restart_lsn, and a clear error, nothing sent.
        assert_eq!(slot.restart_lsn, None);
        assert!(c.read_replication_slot("pitr_test").await.is_err());
    }
    assert_eq!(
        cluster.psql("SELECT slot_type FROM pg_replication_slots WHERE slot_name = 'pitr_test'")?,
        "physical"
    );
    let dup = c
        .create_replication_slot("pitr_test", CreateSlotOptions::default())
        .await
        .expect_err("duplicate");
    assert_eq!(dup.sqlstate(), Some(pg::sqlstate::DUPLICATE_OBJECT));
    c.drop_replication_slot("pitr_test", false).await?;
    if modern {
        assert_eq!(c.read_replication_slot("pitr_test").await?, None);
    }
    assert_eq!(
        cluster.psql("SELECT count(*) FROM pg_replication_slots")?,
        "0"
    );
    let missing = c
        .drop_replication_slot("pitr_test", false)
        .await
        .expect_err("gone");
    assert_eq!(missing.sqlstate(), Some(pg::sqlstate::UNDEFINED_OBJECT));
    // Names are validated before anything is sent.
    assert!(c.drop_replication_slot("Bad Name", false).await.is_err());
    Ok(())
}

/// A base backup archive as received: name, tablespace (oid, location), tar bytes.
type Archive = (String, Option<(u32, String)>, Vec<u8>);

/// A user tablespace comes as its own archive, `<oid>.tar`, besides base.tar. Before
/// PostgreSQL 15 each archive (and the manifest) is a CopyOut response of its own, matched to
/// the tablespace list by position; from 15 on one CopyOut announces them with 'n' messages.
#[tokio::test]
async fn base_backup_with_a_tablespace() -> Result<()> {
    // Declared first, dropped last: the cluster is stopped before the directory goes.
    let ts_parent = TestDir::new();
    let location = ts_parent.join("ts");
    std::fs::create_dir(&location)?;
    make_accessible(&location)?;
    let location = location.to_str().context("UTF-8 temp path")?.to_string();
    let cluster = start_primary()?;
    cluster.psql(&format!("CREATE TABLESPACE ts LOCATION '{location}'"))?;
    cluster.psql(
        "CREATE TABLE in_ts TABLESPACE ts AS SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
    )?;
    let oid: u32 = cluster
        .psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'")?
        .trim()
        .parse()?;
    let conn = connect(&tcp_conninfo(&cluster, "repl", "replpw")).await?;
    let major = conn.server_major();
    let opts = BaseBackupOptions {
        label: "tablespace test".into(),
        fast_checkpoint: true,
        ..Default::default()
    };
    let mut backup = conn.base_backup(opts).await?;
    let mut listed = Vec::new();
    let mut archives: Vec<Archive> = Vec::new();
    let mut manifest = Vec::new();
    let mut ended = false;
    while let Some(ev) = backup.next_event().await? {
        match ev {
            BackupEvent::Start { tablespaces, .. } => listed = tablespaces,
            BackupEvent::Archive { name, tablespace } => {
                archives.push((name, tablespace, Vec::new()))
            }
            BackupEvent::Data(d) => archives
                .last_mut()
                .context("data before archive")?
                .2
                .extend_from_slice(&d),
            BackupEvent::Manifest(d) => manifest.extend_from_slice(&d),
            BackupEvent::Progress { .. } => {}
            BackupEvent::End { .. } => ended = true,
        }
    }
    ensure!(ended, "no End");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed
        .iter()
        .any(|t| t.oid == Some(oid) && t.location.as_deref() == Some(location.as_str())));
    let mut names: Vec<&str> = archives.iter().map(|a| a.0.as_str()).collect();
    names.sort();
    let ts_name = format!("{oid}.tar");
    let mut want = vec!["base.tar", ts_name.as_str()];
    want.sort();
    assert_eq!(names, want);

    let entries = |bytes: &[u8]| -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in tar::Archive::new(bytes).entries()? {
            out.push(e?.path()?.to_string_lossy().into_owned());
        }
        Ok(out)
    };
    let (_, ts, ts_tar) = archives.iter().find(|a| a.0 == ts_name).unwrap();
    assert_eq!(ts, &Some((oid, location.clone())));
    let ts_entries = entries(ts_tar)?;
    let version_dir = format!("PG_{major}_");
    assert!(
        ts_entries
            .iter()
            .any(|e| e.starts_with(&version_dir) && e.matches('/').count() >= 2),
        "no relation files under {version_dir}* in {ts_name}: {ts_entries:?}"
    );
    let (_, base_ts, base_tar) = archives.iter().find(|a| a.0 == "base.tar").unwrap();
    assert_eq!(base_ts, &None);
    let base_entries = entries(base_tar)?;
    assert!(base_entries.iter().any(|e| e == "PG_VERSION"));
    assert!(base_entries.iter().any(|e| e == "backup_label"));

    // The manifest covers the tablespace's files too, under pg_tblspc/<oid>/.
    let json: serde_json::Value = serde_json::from_slice(&manifest)?;
    let files = json["Files"].as_array().context("Files")?;
    let prefix = format!("pg_tblspc/{oid}/{version_dir}");
    assert!(
        files
            .iter()
            .any(|f| f["Path"].as_str().is_some_and(|p| p.starts_with(&prefix))),
        "no {prefix}* in the manifest"
    );

    // pitr's archive check agrees with the server: every file matches, none is missing and none
    // unlisted, the tablespace's members found under pg_tblspc/<oid>/.
    let mut check = ManifestCheck::new(Some(pitr::format::manifest::parse(&manifest)?));
    for (name, ts, bytes) in &archives {
        let mut reader = ArchiveReader::new(ts.as_ref().map(|t| t.0));
        if let Err(e) = reader.feed(bytes, &mut check, &mut Discard) {
            bail!("{name}: {e:?}");
        }
        reader.finish()?;
    }
    let outcome = check.finish();
    assert!(outcome.files > 100, "{outcome:?}");
    assert!(outcome.missing.is_empty(), "{:?}", outcome.missing);
    assert!(outcome.extra.is_empty(), "{:?}", outcome.extra);

    let mut conn = backup.into_conn()?;
    conn.identify_system().await?;
    Ok(())
}

/// Streams a whole segment while the caller's select! keeps cancelling `next_message`, and
/// checks every byte against the server's own pg_wal file. The server's bytes come through a
/// proxy in 64 KiB pieces 2 ms apart, so XLogData messages (up to 128 KiB) arrive in parts and
/// next_message is cancelled in the middle of reading one.
#[tokio::test]
async fn start_replication_matches_pg_wal_and_survives_cancellation() -> Result<()> {
    let cluster = start_primary()?;
    let proxy = Proxy::dribble(cluster.port(), 64 * 1024, Duration::from_millis(2));
    let mut conn = connect(&format!(
        "host=127.0.0.1 port={} user=repl password=replpw sslmode=disable",
        proxy.port()
    ))
    .await?;
    let id = conn.identify_system().await?;
    conn.create_replication_slot("stream_test", CreateSlotOptions::default())
        .await?;
    let seg_start = Lsn::from_segno(id.xlogpos.segno(SEG), SEG);
    // Fill and switch the segment so that it is complete on disk.
    cluster.psql("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g")?;
    cluster.psql("SELECT pg_switch_wal()")?;

    let mut stream = conn
        .start_replication(Some("stream_test"), seg_start, None)
        .await?;
    let seg_end = Lsn(seg_start.0 + SEG);
    let mut received = Vec::with_capacity(SEG as usize);
    let mut cancelled = 0u32;
    // XLogData that arrived on a call made after a cancelled one: the stream was dropped
    // mid-wait and still delivered the next bytes in order.
    let mut resumed = 0u32;
    let mut after_cancel = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stream.received_lsn() < seg_end {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out streaming"
        );
        // A tiny timeout drops next_message mid-read over and over; the stream must not lose
        // or duplicate a byte (it checks XLogData contiguity itself, and we compare below).
        let msg = tokio::select! {
            m = stream.next_message() => m?,
            _ = tokio::time::sleep(Duration::from_micros(20)) => {
                cancelled += 1;
                after_cancel = true;
                continue;
            }
        };
        match msg {
            Some(ReplicationMessage::XLogData {
                wal_start, data, ..
            }) => {
                ensure!(wal_start.0 == seg_start.0 + received.len() as u64);
                resumed += u32::from(std::mem::take(&mut after_cancel));
                received.extend_from_slice(&data);
            }
            Some(ReplicationMessage::Keepalive {
                reply_requested: true,
                ..
            }) => {
                let pos = stream.received_lsn();
                stream.send_status_update(pos, pos, Lsn(0), false).await?;
            }
            Some(_) => {}
            None => bail!("stream ended early"),
        }
    }
    received.truncate(SEG as usize);
    let name = WalFileName::segment(id.timeline, seg_start.segno(SEG), SEG).to_string();
    let on_disk = std::fs::read(cluster.data_dir().join("pg_wal").join(&name))?;
    assert_eq!(on_disk.len(), received.len());
    assert!(
        on_disk == received,
        "streamed bytes differ from pg_wal/{name}"
    );
    eprintln!("select! cancelled next_message {cancelled} times, {resumed} resumed with data");
    // Otherwise the test proved nothing about cancellation.
    assert!(
        cancelled > 0 && resumed > 0 && proxy.pieces() > received.len() / (128 * 1024),
        "next_message was cancelled {cancelled} times, {resumed} times before data arrived; \
         the proxy forwarded {} pieces",
        proxy.pieces()
    );

    // Keepalive: with wal_sender_timeout = 2s the server asks for a reply within ~1s of
    // silence; answering keeps the connection, and the flush position reaches the slot.
    let flushed = seg_end;
    let mut answered = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout_at(until, stream.next_message()).await {
            Err(_) => break,
            Ok(m) => match m? {
                Some(ReplicationMessage::Keepalive {
                    reply_requested: true,
                    ..
                }) => {
                    stream
                        .send_status_update(flushed, flushed, Lsn(0), false)
                        .await?;
                    answered += 1;
                }
                Some(_) => {}
                None => bail!("server ended the stream"),
            },
        }
    }
    assert!(
        answered >= 2,
        "expected keepalives needing replies, got {answered}"
    );
    let restart = cluster
        .psql("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'stream_test'")?;
    assert_eq!(
        restart.parse::<Lsn>()?,
        flushed,
        "slot advanced to our flush position"
    );

    // finish() leaves the connection usable for commands.
    assert_eq!(stream.finish().await?, None);
    let mut conn = stream.into_conn()?;
    assert_eq!(conn.identify_system().await?.system_id, id.system_id);
    Ok(())
}

#[tokio::test]
async fn base_backup_yields_tar_manifest_and_lsns() -> Result<()> {
    let cluster = start_primary()?;
    let conn = connect(&tcp_conninfo(&cluster, "repl", "replpw")).await?;
    let major = conn.server_major();
    let opts = BaseBackupOptions {
        label: "pitr test".into(),
        fast_checkpoint: true,
        ..Default::default()
    };
    let mut backup = conn.base_backup(opts).await?;
    let mut archives: Vec<(String, Vec<u8>)> = Vec::new();
    let mut manifest = Vec::new();
    let (mut start, mut stop, mut progress) = (None, None, 0u64);
    let mut max_chunk = 0;
    while let Some(ev) = backup.next_event().await? {
        match ev {
            BackupEvent::Start {
                start_lsn,
                timeline,
                tablespaces,
            } => {
                assert_eq!(timeline, 1);
                assert!(
                    tablespaces.iter().any(|t| t.oid.is_none()),
                    "main data dir listed"
                );
                start = Some(start_lsn);
            }
            BackupEvent::Archive { name, tablespace } => {
                assert_eq!(tablespace, None);
                archives.push((name, Vec::new()));
            }
            BackupEvent::Data(d) => {
                max_chunk = max_chunk.max(d.len());
                archives
                    .last_mut()
                    .context("data before archive")?
                    .1
                    .extend_from_slice(&d);
            }
            BackupEvent::Manifest(d) => manifest.extend_from_slice(&d),
            BackupEvent::Progress { bytes_done } => {
                assert!(bytes_done >= progress, "progress is monotonic");
                progress = bytes_done;
            }
            BackupEvent::End { stop_lsn, timeline } => {
                assert_eq!(timeline, 1);
                stop = Some(stop_lsn);
            }
        }
    }
    let (start, stop) = (start.context("no Start")?, stop.context("no End")?);
    assert!(start <= stop);
    assert!(max_chunk < 1 << 20, "archives arrive in chunks, not whole");
    assert_eq!(archives.len(), 1);
    let (name, tar_bytes) = &archives[0];
    assert_eq!(name, "base.tar");
    // Progress messages are part of the PostgreSQL 15+ format only.
    if major >= 15 {
        assert!(progress > 0);
    } else {
        assert_eq!(progress, 0);
    }

    let mut entries = Vec::new();
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    for e in ar.entries()? {
        let e = e?;
        entries.push(e.path()?.to_string_lossy().into_owned());
    }
    for want in ["PG_VERSION", "global/pg_control", "backup_label"] {
        assert!(
            entries.iter().any(|e| e == want),
            "{want} missing from base.tar"
        );
    }

    let json: serde_json::Value = serde_json::from_slice(&manifest)?;
    // Version 2 (PostgreSQL 17+) adds the system identifier.
    let manifest_version = if major >= 17 { 2 } else { 1 };
    assert_eq!(json["PostgreSQL-Backup-Manifest-Version"], manifest_version);
    let files = json["Files"].as_array().context("Files")?;
    assert!(files.iter().any(|f| f["Path"] == "global/pg_control"));
    assert!(files.iter().all(|f| f["Checksum-Algorithm"] == "CRC32C"));
    let range = &json["WAL-Ranges"][0];
    assert_eq!(
        range["Start-LSN"].as_str().map(|s| s.parse::<Lsn>()),
        Some(Ok(start))
    );
    assert_eq!(
        range["End-LSN"].as_str().map(|s| s.parse::<Lsn>()),
        Some(Ok(stop))
    );

    // The connection can be used again afterwards.
    let mut conn = backup.into_conn()?;
    conn.identify_system().await?;
    Ok(())
}

/// Promotes a standby, then streams the old timeline from it: the server ends timeline 1 at
/// the switch point, and streaming resumes on timeline 2 from there.
#[tokio::test]
async fn timeline_switch_after_promotion() -> Result<()> {
    let primary = start_primary()?;
    primary.psql("CREATE TABLE before_promotion AS SELECT 1 AS x")?;
    // Build a standby with pg_basebackup (-R writes primary_conninfo and standby.signal).
    // Declared before the standby cluster so that the server stops before its dir goes.
    let standby_dir = TestDir::with_prefix("pitr-standby");
    let sdata = standby_dir.subdir("data");
    let mut c = command_as_server_user(primary.bin("pg_basebackup"));
    c.arg("-D")
        .arg(&sdata)
        .args(["-h", "127.0.0.1", "-p", &primary.port().to_string()])
        .args(["-U", "repl", "-R", "-X", "stream", "-c", "fast"])
        .env("PGPASSWORD", "replpw");
    run_checked(&mut c)?;
    let mut standby = PgCluster::builder()
        .existing_data_dir(&sdata)
        .conf("hot_standby = on")
        .start()?;

    // While still a standby: target_session_attrs=standby accepts it.
    let mut conn = connect(&format!(
        "{} target_session_attrs=standby",
        socket_conninfo(&standby)
    ))
    .await?;
    let before = conn.identify_system().await?;
    assert_eq!(before.timeline, 1);
    conn.close().await;

    standby.promote()?;

    let mut conn = connect(&socket_conninfo(&standby)).await?;
    let id = conn.identify_system().await?;
    assert_eq!(id.timeline, 2);
    let (name, content) = conn.timeline_history(2).await?;
    assert_eq!(name, "00000002.history");
    let history = pitr::wal::parse_history(&content)?;
    let switch = history.last().context("history entry")?.switchpoint;

    let start = Lsn::from_segno(switch.segno(SEG), SEG);
    let mut stream = conn.start_replication(None, start, Some(1)).await?;
    let mut bytes_on_tli1 = 0u64;
    let (next_tli, next_start) = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next_message()).await?? {
            Some(ReplicationMessage::XLogData { data, .. }) => bytes_on_tli1 += data.len() as u64,
            Some(ReplicationMessage::Keepalive { .. }) => {}
            Some(ReplicationMessage::EndOfTimeline {
                next_timeline,
                next_timeline_start,
            }) => break (next_timeline, next_timeline_start),
            None => bail!("stream ended without EndOfTimeline"),
        }
    };
    assert_eq!(next_tli, 2);
    assert_eq!(next_start, switch);
    assert_eq!(
        start.0 + bytes_on_tli1,
        switch.0,
        "all of timeline 1 up to the switch"
    );

    // Back in command mode: continue on timeline 2.
    let conn = stream.into_conn()?;
    let mut stream = conn.start_replication(None, next_start, Some(2)).await?;
    let first = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next_message()).await?? {
            Some(ReplicationMessage::XLogData {
                wal_start, data, ..
            }) if !data.is_empty() => break wal_start,
            Some(_) => {}
            None => bail!("no WAL on timeline 2"),
        }
    };
    assert_eq!(first, next_start);
    Ok(())
}

//! Every storage backend against a real server on 127.0.0.1: the storage contract
//! (`pitr::storage::contract`) on a local directory, s3s-fs, moto (a second S3), fake-gcs-server
//! (GCS) and Azurite (Azure), plus retries through a lossy network and an outage; then one
//! end-to-end PITR per cloud emulator (archive, backup, restore to a time; stream, crash,
//! restore), reusing the bodies that run on local and S3.

use std::time::Duration;

use bytes::Bytes;
use pitr::storage::contract::run_contract;
use pitr::storage::{Location, Storage, StorageError};

use crate::common::{on_emulators, switch_and_wait, Backend, TestRepo};
use crate::harness::{Proxy, TestDir};
use crate::pitr::{insert, ok, primary, restore_and_read};
use crate::stream::crash_and_restore_latest;

/// Whether the server behind `backend` gives a race of conditional creates (`PutMode::Create`)
/// for one key exactly one winner. Every server here refuses an existing key when asked one
/// after the other (the contract checks it); docs/storage.md says what a non-atomic race means
/// for safety.
fn atomic_race(backend: Backend) -> bool {
    match backend {
        // link(2).
        Backend::Local => true,
        // s3s-fs checks If-None-Match, then writes: every racer may win.
        Backend::S3 => false,
        // moto checks If-None-Match: * and then stores, with no lock between the two (moto
        // 5.2.5, s3/responses.py): two racers can both win, though they rarely do.
        Backend::Moto => false,
        // fake-gcs-server checks ifGenerationMatch under its store's lock (reached through the
        // harness's upload shim, see tests/harness/emulators.rs).
        Backend::Gcs => true,
        // Azurite checks If-None-Match: * and inserts in one synchronous step of its event
        // loop (LokiBlobMetadataStore.createBlob).
        Backend::Azure => true,
    }
}

fn open(loc: &Location, retry_for: Duration) -> Storage {
    Storage::open(loc, retry_for).unwrap()
}

async fn contract(backend: Backend) {
    let repo = TestRepo::new(backend);
    let s = open(&repo.location(), Duration::from_secs(5));
    let atomic = atomic_race(backend);
    run_contract(&s, atomic).await;
    if !atomic {
        // Said out loud so that a server that starts honouring the race is noticed.
        eprintln!("{backend:?}: a racing conditional create is not atomic on this server");
    }
    // Every request went through the counters: the contract sends each kind.
    let c = s.requests();
    assert!(
        c.put >= 10 && c.get >= 4 && c.head >= 2 && c.list >= 4 && c.delete >= 2,
        "{backend:?}: {c:?}"
    );
    if backend != Backend::Local {
        retries(&repo, backend).await;
    }
}

/// A lost answer to a PUT (the object stored, the client never told) is retried into a clean
/// outcome; a server that is down exhausts the retry budget with a transient error, each
/// attempt counted.
async fn retries(repo: &TestRepo, backend: Backend) {
    let port = repo.endpoint_port();
    let proxy = Proxy::lose_first_put_response(port);
    let s = open(
        &repo.location_at(&proxy.endpoint()),
        Duration::from_secs(10),
    );
    let data = Bytes::from(vec![7u8; 4096]);
    match s.put_if_absent("retry/lost-answer", data.clone()).await {
        // Ok when the retry's precondition saw nothing (or the first attempt won), AlreadyExists
        // when it saw the first attempt's object: either way the bytes are there, whole.
        Ok(()) | Err(StorageError::AlreadyExists { .. }) => {}
        Err(e) => panic!("{backend:?}: {e}"),
    }
    assert_eq!(
        proxy.cut_keys().len(),
        1,
        "{backend:?}: the proxy did not cut the answer; errors {:?}",
        proxy.errors()
    );
    assert_eq!(s.get("retry/lost-answer").await.unwrap(), data);
    drop(proxy);

    // Nothing listens on the proxy's port any more.
    let down = open(
        &repo.location_at(&format!("http://127.0.0.1:{}", crate::harness::free_port())),
        Duration::from_millis(700),
    );
    let e = down.head("retry/x").await.unwrap_err();
    assert!(
        matches!(e, StorageError::RetriesExhausted { .. }),
        "{backend:?}: {e}"
    );
    assert!(down.requests().head >= 2, "{:?}", down.requests());
}

macro_rules! contract_test {
    ($name:ident, $backend:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            contract($backend).await;
        }
    };
}

contract_test!(local_directory_keeps_the_storage_contract, Backend::Local);
contract_test!(s3s_fs_keeps_the_storage_contract, Backend::S3);
contract_test!(moto_keeps_the_storage_contract, Backend::Moto);
contract_test!(fake_gcs_server_keeps_the_storage_contract, Backend::Gcs);
contract_test!(azurite_keeps_the_storage_contract, Backend::Azure);

/// archive_command, a backup, and a restore to a time on the backend: exactly the rows
/// committed before the target.
fn archive_backup_restore_to_time(backend: Backend) {
    let repo = TestRepo::new(backend);
    let pg = primary(&repo);
    pg.psql("create table marks(id serial primary key, phase text not null)")
        .unwrap();
    insert(&pg, "a_base");
    let out = ok(&repo, &["backup", "-d", &pg.conninfo()]);
    assert!(out.contains("complete"), "{out}");
    insert(&pg, "b_before_time");
    std::thread::sleep(Duration::from_millis(1100));
    let t = pg.psql("select now()").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    insert(&pg, "c_after_time");
    switch_and_wait(&pg);
    let work = TestDir::new();
    let (restored, got) = restore_and_read(&repo, &work, "time", &["--target-time", &t], false);
    assert_eq!(
        got,
        "a_base:10,b_before_time:10",
        "{backend:?}\n{}",
        restored.log_contents()
    );
}

on_emulators!(
    archive_backup_restore_to_time,
    archive_backup_restore_to_time_on_moto,
    archive_backup_restore_to_time_on_fake_gcs_server,
    archive_backup_restore_to_time_on_azurite
);

on_emulators!(
    crash_and_restore_latest,
    stream_crash_and_restore_latest_on_moto,
    stream_crash_and_restore_latest_on_fake_gcs_server,
    stream_crash_and_restore_latest_on_azurite
);

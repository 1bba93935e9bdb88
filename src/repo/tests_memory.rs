//! Repository rules on an in-memory repository (`Storage::in_memory`): no server, no disk.
//! The pattern for unit tests of repo, verify, expire and the restore planner.

use super::*;

const CLUSTER: ClusterIdentity = ClusterIdentity {
    system_identifier: 7_000_000_000_000_000_001,
    pg_major: 16,
    wal_segment_size: 16 << 20,
};

async fn repo() -> Repository {
    Repository::open_for_cluster(
        Storage::in_memory(),
        &CLUSTER,
        "test",
        WriteOptions::default(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn put_immutable_twice_with_the_same_bytes_is_success() {
    let repo = repo().await;
    let key = "wal/0000000100000000/000000010000000000000001";
    let name = "000000010000000000000001";
    assert_eq!(
        repo.put_immutable(key, name, b"wal bytes").await.unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        repo.put_immutable(key, name, b"wal bytes").await.unwrap(),
        PutOutcome::AlreadyStored
    );
    assert_eq!(repo.get_verified(key).await.unwrap(), b"wal bytes");
}

#[tokio::test]
async fn put_immutable_refuses_other_bytes_and_keeps_the_stored_ones() {
    let repo = repo().await;
    let key = "wal/0000000100000000/000000010000000000000002";
    let name = "000000010000000000000002";
    repo.put_immutable(key, name, b"first").await.unwrap();
    let e = repo.put_immutable(key, name, b"second").await.unwrap_err();
    assert!(
        matches!(
            &e,
            RepoError::ConflictingContent {
                stored_len: 5,
                new_len: 6,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(repo.get_verified(key).await.unwrap(), b"first");
}

#[tokio::test]
async fn a_repository_of_another_cluster_is_refused() {
    let storage = Storage::in_memory();
    Repository::open_for_cluster(storage.clone(), &CLUSTER, "test", WriteOptions::default())
        .await
        .unwrap();
    let other = ClusterIdentity {
        system_identifier: 42,
        ..CLUSTER
    };
    let e = Repository::open_for_cluster(storage, &other, "backup", WriteOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, RepoError::OtherCluster { system_id: 42, .. }),
        "{e}"
    );
}

//! Repository rules on an in-memory repository (`Storage::in_memory`): no server, no disk.
//! The pattern for unit tests of repo, verify, expire and the restore planner.

use super::*;
use crate::storage::BufferPool;

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

/// A WAL file stored from its framed object alone (the stream lets the content go first):
/// read back as the content, again with the same content is success, and other content is
/// refused with the stored object untouched (the framed object gives the content back).
#[tokio::test]
async fn an_encoded_wal_file_is_stored_once_and_compared_without_its_content() {
    let repo = repo().await;
    let name = WalFileName::segment(1, 3, CLUSTER.wal_segment_size);
    // A spare buffer holding an earlier object's bytes: none of them may show.
    let first = repo.encode_wal_file(&name, b"segment bytes", vec![0xAA; 100]);
    let header = crate::codec::peek_header(&first.framed).unwrap();
    assert_eq!(header.codec, crate::codec::Codec::Lz4Blocks);
    assert_eq!(
        repo.put_encoded_wal(&first).await.unwrap(),
        PutOutcome::Stored
    );
    let again = repo.encode_wal_file(&name, b"segment bytes", Vec::new());
    assert_eq!(
        repo.put_encoded_wal(&again).await.unwrap(),
        PutOutcome::AlreadyStored
    );
    let other = repo.encode_wal_file(&name, b"other bytes!!", Vec::new());
    assert!(matches!(
        repo.put_encoded_wal(&other).await,
        Err(RepoError::ConflictingContent { .. })
    ));
    assert_eq!(
        repo.get_wal_file(&name).await.unwrap().unwrap(),
        b"segment bytes"
    );
}

/// `create_for_cluster` says whether it wrote the descriptor: the stream skips listing a
/// repository it created, and must not skip one that a concurrent creator (archive-push) made
/// first and may already have stored WAL into.
#[tokio::test]
async fn create_for_cluster_tells_whether_it_created_the_repository() {
    let storage = Storage::in_memory();
    let create = || {
        Repository::create_for_cluster(storage.clone(), &CLUSTER, "test", WriteOptions::default())
    };
    let (first, created) = create().await.unwrap();
    assert!(created);
    let (second, created) = create().await.unwrap();
    assert!(!created, "the descriptor was there already");
    assert_eq!(
        first.descriptor().repository_id,
        second.descriptor().repository_id
    );
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

#[tokio::test]
async fn backups_started_in_the_same_second_get_different_ids() {
    let repo = repo().await;
    let t = chrono::Utc::now();
    let a = repo.claim_backup_id(t).await.unwrap();
    let b = repo.claim_backup_id(t).await.unwrap();
    assert_ne!(a, b);
    let stamp = t.format("%Y%m%dT%H%M%SZ-").to_string();
    assert!(a.starts_with(&stamp) && b.starts_with(&stamp), "{a} {b}");
    assert_eq!(repo.backup_folders().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_backup_part_stored_again_after_a_lost_answer_is_success() {
    let repo = repo().await;
    let id = repo.claim_backup_id(chrono::Utc::now()).await.unwrap();
    let part = vec![7u8; 100_000];
    let first = repo
        .put_backup_part(&id, "base.tar", 0, part.clone())
        .await
        .unwrap();
    let again = repo
        .put_backup_part(&id, "base.tar", 0, part.clone())
        .await
        .unwrap();
    assert_eq!(first, again, "the stored size is reported both times");
    assert!(matches!(
        repo.put_backup_part(&id, "base.tar", 0, vec![8u8; 100])
            .await,
        Err(RepoError::ConflictingContent { .. })
    ));
    assert_eq!(repo.backup_part(&id, "base.tar", 0).await.unwrap(), part);
    repo.put_backup_manifest(&id, b"{}".to_vec()).await.unwrap();
    repo.put_backup_manifest(&id, b"{}".to_vec()).await.unwrap();
}

/// `compressible` bytes of a repeating pattern, then `noise` bytes that do not compress.
fn mixed_part(compressible: u32, noise: u64) -> Vec<u8> {
    let mut part: Vec<u8> = (0..compressible).map(|i| (i % 251) as u8).collect();
    part.extend((0..noise).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8));
    part
}

/// With lz4 and no encryption a backup part is written as LZ4 blocks (codec 3), block by
/// block; it reads back whole, decoded by its header, and a retried upload of the same content
/// is success while different content is refused.
#[tokio::test]
async fn an_encoded_backup_part_is_lz4_blocks_and_reads_back() {
    let repo = repo().await;
    let id = repo.claim_backup_id(chrono::Utc::now()).await.unwrap();
    // Compressible and incompressible stretches, longer than one block.
    let part = mixed_part(700_000, 300_000);
    let spare = BufferPool::default();
    let (encoded, back) = repo
        .encode_backup_part(&id, "base.tar", 0, part.clone(), Vec::new())
        .await;
    assert_eq!(back, part, "the content's buffer comes back unchanged");
    let stored = repo.put_encoded_part(encoded, &spare).await.unwrap();
    let key = layout::backup_part_key(&id, "base.tar", 0);
    let raw = repo.storage.get(&key).await.unwrap();
    assert_eq!(raw.len() as u64, stored);
    assert_eq!(
        crate::codec::peek_header(&raw).unwrap().codec,
        Codec::Lz4Blocks
    );
    assert!(stored < part.len() as u64);
    assert_eq!(repo.backup_part(&id, "base.tar", 0).await.unwrap(), part);
    let fetched = repo
        .fetch_backup_part(&id, "base.tar", 0, Vec::new())
        .await
        .unwrap();
    assert_eq!(fetched.decode().unwrap(), part);
    // Encoded again into a used buffer (what the pool hands round): the same stored bytes.
    let used = vec![0xA5; 3 << 20];
    let (again, _) = repo
        .encode_backup_part(&id, "base.tar", 0, part.clone(), used)
        .await;
    assert_eq!(again.framed, raw);
    assert_eq!(repo.put_encoded_part(again, &spare).await.unwrap(), stored);
    let (other, _) = repo
        .encode_backup_part(&id, "base.tar", 0, vec![1; 10], Vec::new())
        .await;
    assert!(matches!(
        repo.put_encoded_part(other, &spare).await,
        Err(RepoError::ConflictingContent { .. })
    ));
}

/// A part compressed as its bytes come, in pieces of every size (smaller than a block, across
/// block boundaries, several blocks at once), is stored byte for byte as the part encoded
/// whole; the staging buffer comes back for the next part, and an empty part is a valid one.
#[tokio::test]
async fn a_part_encoded_as_it_comes_is_the_part_encoded_whole() {
    let repo = repo().await;
    let id = repo.claim_backup_id(chrono::Utc::now()).await.unwrap();
    let part = mixed_part(900_000, 400_000);
    let (whole, _) = repo
        .encode_backup_part(&id, "base.tar", 0, part.clone(), Vec::new())
        .await;
    // As a single writer frames the content (what backups stored before encoders existed).
    let mut one = crate::codec::BlockWriter::new(crate::codec::FRAME_HEADER_LEN, part.len());
    one.write(&part);
    assert_eq!(whole.framed, crate::codec::frame_blocks(one.finish()));
    let mut stage = Vec::new();
    for sizes in [
        &[1usize, 511, 32_768][..],
        &[262_144],
        &[600_000, 7],
        &[1 << 20],
    ] {
        let used = vec![0x5A; 1 << 20];
        let encoder = repo.backup_part_encoder(&id, "base.tar", 0, part.len(), used, stage);
        let mut enc = encoder.expect("a repository storing lz4 blocks encodes parts as they come");
        let (mut rest, mut k) = (&part[..], 0);
        while !rest.is_empty() {
            let n = sizes[k % sizes.len()].min(rest.len());
            enc.write(&rest[..n]);
            rest = &rest[n..];
            k += 1;
        }
        assert_eq!(enc.len(), part.len());
        let (encoded, back) = enc.finish();
        assert_eq!(encoded.framed, whole.framed, "pieces {sizes:?}");
        assert!(back.is_empty() && back.capacity() >= crate::codec::BLOCK_LEN);
        stage = back;
    }
    let (empty_whole, _) = repo
        .encode_backup_part(&id, "base.tar", 1, Vec::new(), Vec::new())
        .await;
    let empty = repo.backup_part_encoder(&id, "base.tar", 1, 0, Vec::new(), Vec::new());
    let empty = empty.unwrap();
    assert!(empty.is_empty());
    let (empty, _) = empty.finish();
    assert_eq!(empty.framed, empty_whole.framed);
    let spare = BufferPool::default();
    repo.put_encoded_part(empty, &spare).await.unwrap();
    assert_eq!(repo.backup_part(&id, "base.tar", 1).await.unwrap(), b"");
}

#[tokio::test]
async fn completion_and_abandonment_exclude_each_other() {
    let repo = repo().await;
    let id = repo.claim_backup_id(chrono::Utc::now()).await.unwrap();
    // A zero threshold makes every unpublished backup abandoned at once.
    let removed = repo
        .remove_abandoned_backups(std::time::Duration::ZERO, None)
        .await
        .unwrap();
    assert_eq!(removed, vec![id.clone()]);
    assert!(!repo.claim_backup_completion(&id).await.unwrap());

    let id2 = repo.claim_backup_id(chrono::Utc::now()).await.unwrap();
    assert!(repo.claim_backup_completion(&id2).await.unwrap());
    assert!(repo
        .remove_abandoned_backups(std::time::Duration::ZERO, None)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_complete_backup_without_a_live_lease_holds_back_no_expiry() {
    let repo = repo().await;
    let id = repo.claim_backup_id(chrono::Utc::now()).await.unwrap();
    assert!(repo.claim_backup_completion(&id).await.unwrap());
    let hour = std::time::Duration::from_secs(3600);
    // Its process holds a fresh lease: its catalog entry may be about to appear.
    assert!(repo.backup_may_still_publish(&id, hour).await.unwrap());
    // The same backup whose process died before publishing: its lease is older than any
    // threshold (zero here), and a `complete` state alone keeps nothing back.
    let zero = std::time::Duration::ZERO;
    assert!(!repo.backup_may_still_publish(&id, zero).await.unwrap());
    // Nor is it removed by a cleanup: only its own process may, which withdraws it.
    assert!(repo
        .remove_abandoned_backups(zero, None)
        .await
        .unwrap()
        .is_empty());
    repo.remove_backup_data(&id).await.unwrap();
    assert!(!repo.backup_may_still_publish(&id, hour).await.unwrap());
}

#[tokio::test]
async fn the_callers_own_backup_is_never_abandoned() {
    let repo = repo().await;
    let own = repo.claim_backup_id(chrono::Utc::now()).await.unwrap();
    let other = repo.claim_backup_id(chrono::Utc::now()).await.unwrap();
    let removed = repo
        .remove_abandoned_backups(std::time::Duration::ZERO, Some(&own))
        .await
        .unwrap();
    assert_eq!(removed, vec![other]);
    assert!(repo.claim_backup_completion(&own).await.unwrap());
}

#[tokio::test]
async fn recovery_prefers_the_whole_segment_and_pads_chunks() {
    let repo = repo().await;
    let seg = crate::wal::WalFileName::segment(1, 3, CLUSTER.wal_segment_size);
    assert!(repo.wal_file_for_recovery(&seg).await.unwrap().is_none());
    let c = |start, end| ChunkRef {
        segment: seg.clone(),
        start,
        end,
    };
    repo.put_chunk(&c(0, 4), b"abcd").await.unwrap();
    repo.put_chunk(&c(4, 6), b"ef").await.unwrap();
    // After a hole: never served.
    repo.put_chunk(&c(8, 9), b"z").await.unwrap();
    match repo.wal_file_for_recovery(&seg).await.unwrap() {
        Some(WalForRecovery::FromChunks(b)) => {
            assert_eq!(&b[..6], b"abcdef");
            assert!(b[6..].iter().all(|&x| x == 0));
            assert_eq!(b.len() as u64, CLUSTER.wal_segment_size);
        }
        other => panic!("{other:?}"),
    }
    let whole = vec![1u8; CLUSTER.wal_segment_size as usize];
    repo.put_wal_file(&seg, &whole).await.unwrap();
    assert!(matches!(
        repo.wal_file_for_recovery(&seg).await.unwrap(),
        Some(WalForRecovery::Stored(b)) if b == whole
    ));
}

#[tokio::test]
async fn a_segment_prefix_continues_the_stored_chain_and_never_conflicts_silently() {
    let repo = repo().await;
    let seg = WalFileName::segment(1, 9, CLUSTER.wal_segment_size);
    let wal: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    // A running stream shipped [0, 3000).
    let streamed = ChunkRef {
        segment: seg.clone(),
        start: 0,
        end: 3000,
    };
    repo.put_chunk(&streamed, &wal[..3000]).await.unwrap();
    // The backup's prefix extends that chain instead of starting a rival one.
    let o = repo.store_segment_prefix(&seg, &wal[..7000]).await.unwrap();
    assert_eq!(o, PutOutcome::Stored);
    let plan = repo.list_chunks(&seg).await.unwrap();
    assert_eq!(plan.end(), 7000);
    assert!(plan.stray.is_empty(), "{plan:?}");
    assert_eq!(repo.read_chain(&plan).await.unwrap(), &wal[..7000]);
    // Shorter than the chain: nothing to write.
    let o = repo.store_segment_prefix(&seg, &wal[..5000]).await.unwrap();
    assert_eq!(o, PutOutcome::AlreadyStored);
    // Different bytes are refused.
    let mut other = wal[..8000].to_vec();
    other[10] ^= 1;
    let e = repo.store_segment_prefix(&seg, &other).await.unwrap_err();
    assert!(matches!(e, RepoError::ConflictingContent { .. }), "{e}");
    // Once the segment is stored whole, prefixes are moot.
    repo.put_wal_file(&seg, &wal).await.unwrap();
    let o = repo.store_segment_prefix(&seg, &other).await.unwrap();
    assert_eq!(o, PutOutcome::AlreadyStored);
}

#[tokio::test]
async fn a_block_map_spans_parts_and_is_read_back_by_path() {
    let repo = repo().await;
    let mut w = repo.put_block_map("b1");
    // 3.2 MB of hashes per file: a part every two files.
    let files: Vec<FileBlocks> = (0..6u128)
        .map(|i| FileBlocks {
            path: format!("base/5/{}", 16384 + i),
            size: 200_000 * 8192,
            hashes: (0..200_000u128).map(|b| b ^ (i << 64)).collect(),
        })
        .collect();
    for f in &files {
        w.add(f).await.unwrap();
    }
    assert!(w.finish().await.unwrap() > 0);
    let mut map = repo.block_map("b1").await.unwrap().unwrap();
    assert_eq!(map.len(), 6);
    // Out of order, so parts are evicted and read again.
    for i in [5usize, 0, 3, 1, 5, 2, 4] {
        let got = map.get(&files[i].path).await.unwrap().unwrap();
        assert_eq!(*got, files[i]);
    }
    assert!(map.get("base/5/1").await.unwrap().is_none());
    assert!(repo.block_map("b2").await.unwrap().is_none());
}

#[tokio::test]
async fn a_chunked_segment_reads_as_its_chunks_and_keeps_them() {
    let repo = repo().await;
    let size = CLUSTER.wal_segment_size as usize;
    let seg = WalFileName::segment(1, 4, CLUSTER.wal_segment_size);
    let wal: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    let half = size as u32 / 2;
    let c = |start, end| ChunkRef {
        segment: seg.clone(),
        start,
        end,
    };
    repo.put_chunk(&c(0, 100), &wal[..100]).await.unwrap();
    repo.put_chunk(&c(100, half), &wal[100..half as usize])
        .await
        .unwrap();
    // Not complete yet: refused, nothing stored.
    assert!(repo.store_chunked_segment(&seg, size as u64).await.is_err());
    assert!(!repo.has_wal_file(&seg).await.unwrap());
    repo.put_chunk(&c(half, size as u32), &wal[half as usize..])
        .await
        .unwrap();
    assert_eq!(
        repo.store_chunked_segment(&seg, size as u64).await.unwrap(),
        PutOutcome::Stored
    );
    // A restart storing it again: the same manifest.
    assert_eq!(
        repo.store_chunked_segment(&seg, size as u64).await.unwrap(),
        PutOutcome::AlreadyStored
    );
    assert!(repo.has_wal_file(&seg).await.unwrap());
    assert_eq!(repo.get_wal_file(&seg).await.unwrap().unwrap(), wal);
    assert!(matches!(
        repo.wal_file_for_recovery(&seg).await.unwrap(),
        Some(WalForRecovery::Stored(b)) if b == wal
    ));
    let scanned = repo.scan().await.unwrap();
    let o = scanned
        .iter()
        .find(|o| o.kind == ObjectKind::Wal(seg.clone()))
        .unwrap();
    assert_eq!(repo.read_object(o).await.unwrap(), wal);
    // Its chunks are the segment: in use, never stale garbage.
    assert_eq!(repo.chunks_in_use(&seg).await.unwrap().len(), 3);
    // A missing chunk is damage, reported, never a short segment.
    repo.storage
        .delete(&layout::wal_chunk_key(&seg, 100, half))
        .await
        .unwrap();
    let e = repo.get_wal_file(&seg).await.unwrap_err();
    assert!(matches!(e, RepoError::BadChunkedSegment { .. }), "{e}");
}

#[tokio::test]
async fn a_chunked_partial_is_zero_padded() {
    let repo = repo().await;
    let seg = WalFileName::segment(1, 5, CLUSTER.wal_segment_size);
    let WalFileName::Segment { tli, log, seg: s } = seg.clone() else {
        unreachable!()
    };
    let partial = WalFileName::Partial { tli, log, seg: s };
    let c = |start, end| ChunkRef {
        segment: seg.clone(),
        start,
        end,
    };
    repo.put_chunk(&c(0, 4), b"abcd").await.unwrap();
    repo.put_chunk(&c(4, 9), b"efghi").await.unwrap();
    // The `.partial` ends at the switch: the chunk past it is not named.
    repo.store_chunked_segment(&partial, 4).await.unwrap();
    let b = repo.get_wal_file(&partial).await.unwrap().unwrap();
    assert_eq!(&b[..4], b"abcd");
    assert!(b[4..].iter().all(|&x| x == 0));
    assert_eq!(b.len() as u64, CLUSTER.wal_segment_size);
}

/// `holds_segments` answers as the scan's inventory does: whole segments only (chunks and a
/// `.partial` of the same segment do not count), on the timeline asked for.
#[tokio::test]
async fn holds_segments_agrees_with_the_inventory() {
    let repo = repo().await;
    let size = CLUSTER.wal_segment_size;
    let seg = |tli, n| crate::wal::WalFileName::segment(tli, n, size);
    let whole = vec![1u8; size as usize];
    repo.put_wal_file(&seg(1, 2), &whole).await.unwrap();
    repo.put_wal_file(&seg(2, 4), &whole).await.unwrap();
    let chunk = ChunkRef {
        segment: seg(1, 3),
        start: 0,
        end: 4,
    };
    repo.put_chunk(&chunk, b"abcd").await.unwrap();
    let partial = crate::wal::WalFileName::parse("000000010000000000000004.partial").unwrap();
    repo.put_wal_file(&partial, &whole).await.unwrap();
    let asked = [(1, 2), (1, 3), (1, 4), (2, 4), (2, 2)];
    let held = repo.holds_segments(&asked).await.unwrap();
    assert_eq!(held, [true, false, false, true, false]);
    let inv = repo.wal_scan().await.unwrap().inventory;
    let by_inventory: Vec<bool> = asked.iter().map(|&(t, s)| inv.covers(t, s, s)).collect();
    assert_eq!(held, by_inventory);
}

/// Restore budgets its read-ahead by the parts' listed sizes: each part's own stored size, in
/// order, and `None` for one that is not stored (its GET reports it).
#[tokio::test]
async fn backup_part_sizes_are_the_stored_sizes_in_order() {
    let repo = repo().await;
    let id = repo.claim_backup_id(chrono::Utc::now()).await.unwrap();
    let spare = BufferPool::default();
    let mut stored = vec![];
    for (n, part) in [mixed_part(700_000, 300_000), vec![7; 50_000]]
        .into_iter()
        .enumerate()
    {
        let (encoded, _) = repo
            .encode_backup_part(&id, "base.tar", n as u32, part, Vec::new())
            .await;
        stored.push(Some(repo.put_encoded_part(encoded, &spare).await.unwrap()));
    }
    assert_ne!(stored[0], stored[1]);
    stored.push(None);
    assert_eq!(
        repo.backup_part_sizes(&id, "base.tar", 3).await.unwrap(),
        stored
    );
}

/// A backend whose first conditional create of each key answers "taken" without storing: how
/// S3 answers a create that races another writer's create of the same key, still in flight.
#[derive(Debug)]
struct RacedCreates {
    inner: crate::storage::ObjectStoreBackend,
    raced: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[async_trait::async_trait]
impl crate::storage::Backend for RacedCreates {
    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> crate::storage::Result<()> {
        if self.raced.lock().unwrap().insert(key.to_string()) {
            return Err(StorageError::AlreadyExists { key: key.into() });
        }
        self.inner.put_if_absent(key, data).await
    }
    async fn put_overwrite(&self, key: &str, data: bytes::Bytes) -> crate::storage::Result<()> {
        self.inner.put_overwrite(key, data).await
    }
    async fn get(&self, key: &str) -> crate::storage::Result<bytes::Bytes> {
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> crate::storage::Result<Option<u64>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> crate::storage::Result<Vec<crate::storage::ObjectInfo>> {
        self.inner.list(prefix).await
    }
    async fn list_folders(&self, prefix: &str) -> crate::storage::Result<Vec<String>> {
        self.inner.list_folders(prefix).await
    }
    async fn delete(&self, key: &str) -> crate::storage::Result<()> {
        self.inner.delete(key).await
    }
    async fn check_reachable(&self) -> crate::storage::Result<()> {
        self.inner.check_reachable().await
    }
}

#[tokio::test]
async fn a_create_that_raced_another_in_flight_is_asked_again() {
    let backend = RacedCreates {
        inner: crate::storage::ObjectStoreBackend::from_store(
            std::sync::Arc::new(object_store::memory::InMemory::new()),
            "repo",
            "memory:".into(),
        ),
        raced: Default::default(),
    };
    let storage = Storage::from_backend(
        std::sync::Arc::new(backend),
        crate::storage::Location::Local("memory:".into()),
        std::time::Duration::ZERO,
    );
    // The descriptor's own create races too.
    let repo = Repository::open_for_cluster(storage, &CLUSTER, "test", WriteOptions::default())
        .await
        .unwrap();
    let name = crate::wal::WalFileName::segment(1, 5, CLUSTER.wal_segment_size);
    let outcome = repo.put_wal_file(&name, b"segment bytes").await.unwrap();
    assert_eq!(outcome, PutOutcome::Stored);
    assert_eq!(
        repo.put_wal_file(&name, b"segment bytes").await.unwrap(),
        PutOutcome::AlreadyStored
    );
}

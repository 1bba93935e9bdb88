//! Copying stored objects from one repository of a cluster into another (`pitr copy`).
//!
//! Objects are copied as stored, byte for byte, so that the copy is the same object (same
//! frame, same compression, same sealing in an encrypted repository): the two repositories of
//! one cluster share the system identifier, the segment size and, when encrypted, the data key
//! (a copy into an empty location copies the keyrings along with the descriptor's settings).
//! Every object is read back through the object codec before it is written, so damage in the
//! source is never propagated, and written with a conditional create, so that an object the
//! target has is never replaced.

use std::collections::HashMap;

use super::descriptor::{self, ClusterIdentity, Descriptor};
use super::scan::{self, BackupItem, ObjectKind, ScannedObject};
use super::{layout, PutOutcome, RepoError, Repository, Result, WriteOptions};
use crate::storage::{Storage, StorageError};
use crate::wal::WalFileName;

/// What [`Repository::copy_plan`] finds to copy, in the order it must be copied.
#[derive(Clone, Debug, Default)]
pub struct CopyPlan {
    /// WAL files (histories, segments, `.partial`, `.backup`) and segment summaries.
    pub wal: Vec<ScannedObject>,
    /// Each completed backup's state object: first, so that the target's cleanup of abandoned
    /// backups never takes a half-copied backup for one.
    pub backup_states: Vec<ScannedObject>,
    /// Backup parts and manifests.
    pub backup_data: Vec<ScannedObject>,
    /// Catalog entries, last: a backup becomes visible in the target only once its parts are
    /// there.
    pub catalogs: Vec<ScannedObject>,
    /// Objects left out: stream chunks (the whole segment is copied once it is stored), leases,
    /// backups that are not complete or are being expired, unknown keys.
    pub left_out: usize,
}

impl CopyPlan {
    /// Every object, in copying order.
    pub fn phases(&self) -> [&[ScannedObject]; 4] {
        [
            &self.wal,
            &self.backup_states,
            &self.backup_data,
            &self.catalogs,
        ]
    }
}

/// Copy order of a WAL object: by segment, a chunk before the segment object naming it.
fn wal_copy_order(o: &ScannedObject) -> (String, u8, String) {
    match &o.kind {
        ObjectKind::Chunk(c) => (scan::wal_file_key(&c.segment), 0, o.key().to_string()),
        ObjectKind::Wal(WalFileName::Partial { tli, log, seg }) => {
            let segment = WalFileName::Segment {
                tli: *tli,
                log: *log,
                seg: *seg,
            };
            (scan::wal_file_key(&segment), 1, o.key().to_string())
        }
        _ => (o.key().to_string(), 1, o.key().to_string()),
    }
}

impl Repository {
    /// Sorts every object of this repository (one LIST) into what `pitr copy` copies.
    pub async fn copy_plan(&self) -> Result<CopyPlan> {
        let objects = self.scan().await?;
        let mut complete = std::collections::HashSet::new();
        let mut expiring = std::collections::HashSet::new();
        for o in &objects {
            match &o.kind {
                ObjectKind::Catalog { backup_id } => complete.insert(backup_id.clone()),
                ObjectKind::BackupData {
                    backup_id,
                    item: BackupItem::Expired,
                } => expiring.insert(backup_id.clone()),
                _ => false,
            };
        }
        let copied = |id: &String| complete.contains(id) && !expiring.contains(id);
        let mut plan = CopyPlan::default();
        let mut chunks = vec![];
        for o in objects {
            match &o.kind {
                ObjectKind::Wal(_) | ObjectKind::Summary(_) => plan.wal.push(o),
                ObjectKind::Chunk(_) => {
                    chunks.push(o);
                    plan.left_out += 1
                }
                ObjectKind::Catalog { backup_id } if copied(backup_id) => plan.catalogs.push(o),
                ObjectKind::BackupData { backup_id, item } if copied(backup_id) => match item {
                    BackupItem::State => plan.backup_states.push(o),
                    BackupItem::Part { .. } | BackupItem::Manifest => plan.backup_data.push(o),
                    _ => plan.left_out += 1,
                },
                _ => plan.left_out += 1,
            }
        }
        plan.left_out -= self.take_chunks_in_use(&mut plan.wal, &chunks).await?;
        // Oldest WAL first: an interrupted copy leaves the target with a prefix of the WAL; a
        // chunked segment's chunks before it, so that it never names a chunk not copied yet.
        plan.wal.sort_by_cached_key(wal_copy_order);
        Ok(plan)
    }

    /// Adds to `wal` the chunks that chunked segments in it name (docs/repository-format.md,
    /// "Chunked segments"); returns how many. Only small segment objects can be chunked
    /// segments, so only those are read.
    async fn take_chunks_in_use(
        &self,
        wal: &mut Vec<ScannedObject>,
        chunks: &[ScannedObject],
    ) -> Result<usize> {
        const MANIFEST_MAX: u64 = 1 << 20;
        let mut taken = 0;
        let segments: Vec<WalFileName> = wal
            .iter()
            .filter(|o| o.size <= MANIFEST_MAX && !chunks.is_empty())
            .filter_map(|o| match &o.kind {
                ObjectKind::Wal(
                    n @ (WalFileName::Segment { .. } | WalFileName::Partial { .. }),
                ) => Some(n.clone()),
                _ => None,
            })
            .collect();
        for name in segments {
            let used = self.chunks_in_use(&name).await?;
            for o in chunks {
                if matches!(&o.kind, ObjectKind::Chunk(c) if used.contains(c)) {
                    wal.push(o.clone());
                    taken += 1;
                }
            }
        }
        Ok(taken)
    }

    /// The size of every object this repository holds, by key (one LIST).
    pub async fn object_sizes(&self) -> Result<HashMap<String, u64>> {
        let objects = self.storage.list("").await?;
        Ok(objects.into_iter().map(|o| (o.key, o.size)).collect())
    }

    /// Copies object `o` of this repository into `to`, as stored, once it decodes here (and in
    /// `to`, when encrypted). `AlreadyStored` when `to` holds the same content under its key;
    /// different content there is [`RepoError::ConflictingContent`], and it is left untouched.
    pub async fn copy_object_to(&self, to: &Repository, o: &ScannedObject) -> Result<PutOutcome> {
        let key = o.key();
        let stored = self.storage.get(key).await?;
        let content = self.objects.decode_blocking(key, stored.clone()).await?;
        if to.objects.data_key.is_some() {
            // The content is the same; the question is whether the target's key opens it.
            to.objects
                .decode_blocking(key, stored.clone())
                .await
                .map_err(|_| RepoError::OtherDataKey {
                    location: to.location(),
                })?;
        }
        match to.storage.put_if_absent(key, stored.clone()).await {
            Ok(()) => Ok(PutOutcome::Stored),
            Err(StorageError::AlreadyExists { .. }) => {
                if to.storage.get(key).await? == stored {
                    return Ok(PutOutcome::AlreadyStored);
                }
                to.check_identical(key, key, &content).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Checks that `to` can take copies of this repository's objects: the same cluster and
    /// segment size, and encrypted exactly when this one is.
    pub fn check_copy_target(&self, to: &Repository) -> Result<()> {
        let d = &self.descriptor;
        let cluster = self.cluster();
        let what = format!("copy from {}", self.location());
        super::check_cluster(&to.storage, &to.descriptor, &cluster, &what)?;
        if d.encryption.is_some() != to.descriptor.encryption.is_some() {
            return Err(RepoError::OtherDataKey {
                location: to.location(),
            });
        }
        Ok(())
    }

    /// Creates a repository at `storage` for this repository's cluster, with its settings (and
    /// its keyrings, when encrypted: the copied objects are sealed under its data key), then
    /// opens it with `write`. Its repository id is its own. An existing descriptor there is
    /// kept (and checked by the caller with [`Repository::check_copy_target`]).
    pub async fn create_copy_target(
        &self,
        storage: Storage,
        write: WriteOptions,
    ) -> Result<Repository> {
        storage.check_reachable().await?;
        if self.descriptor.encryption.is_some() {
            for o in self.storage.list(layout::KEYS_PREFIX).await? {
                if layout::parse_keyring_key(&o.key).is_none() {
                    continue;
                }
                let stored = self.storage.get(&o.key).await?;
                crate::codec::decode(&stored).map_err(|source| RepoError::Corrupt {
                    key: o.key.clone(),
                    source,
                })?;
                match storage.put_if_absent(&o.key, stored).await {
                    Ok(()) | Err(StorageError::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let (created, _) = descriptor::create(
            &storage,
            &self.cluster(),
            self.descriptor.encryption.clone(),
        )
        .await?;
        tracing::info!(location = %storage.location(), repository_id = created.repository_id.as_deref().unwrap_or(""), "created the copy's repository");
        Repository::open(storage, write).await
    }

    fn cluster(&self) -> ClusterIdentity {
        cluster_of(&self.descriptor)
    }
}

fn cluster_of(d: &Descriptor) -> ClusterIdentity {
    ClusterIdentity {
        system_identifier: d.system_identifier,
        pg_major: d.pg_major,
        wal_segment_size: d.wal_segment_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::WalFileName;

    const CLUSTER: ClusterIdentity = ClusterIdentity {
        system_identifier: 7_000_000_000_000_000_002,
        pg_major: 16,
        wal_segment_size: 16 << 20,
    };

    async fn source() -> Repository {
        let repo = Repository::open_for_cluster(
            Storage::in_memory(),
            &CLUSTER,
            "test",
            WriteOptions::default(),
        )
        .await
        .unwrap();
        let seg = WalFileName::parse("000000010000000000000003").unwrap();
        let history = WalFileName::parse("00000002.history").unwrap();
        let objects = [
            (layout::wal_key(&seg), "segment"),
            (layout::wal_summary_key(&seg), "summary"),
            (layout::wal_key(&history), "history"),
            (layout::wal_chunk_key(&seg, 0, 0x2000), "chunk"),
            (layout::backup_state_key("b1"), "completed"),
            (layout::backup_part_key("b1", "base.tar", 0), "part"),
            (layout::backup_manifest_key("b1"), "manifest"),
            (layout::backup_info_key("b1"), "{}"),
            (layout::backup_part_key("b2", "base.tar", 0), "unfinished"),
            (layout::backup_lease_key("b2"), "lease"),
        ];
        for (key, content) in objects {
            repo.put_immutable(&key, &key, content.as_bytes())
                .await
                .unwrap();
        }
        repo
    }

    async fn copy_all(from: &Repository, to: &Repository) -> (usize, usize) {
        let (mut stored, mut already) = (0, 0);
        for phase in from.copy_plan().await.unwrap().phases() {
            for o in phase {
                match from.copy_object_to(to, o).await.unwrap() {
                    PutOutcome::Stored => stored += 1,
                    PutOutcome::AlreadyStored => already += 1,
                }
            }
        }
        (stored, already)
    }

    #[tokio::test]
    async fn a_copy_creates_the_target_and_takes_only_completed_backups_and_wal() {
        let a = source().await;
        let plan = a.copy_plan().await.unwrap();
        assert_eq!(plan.catalogs.len(), 1);
        assert_eq!(plan.backup_states.len(), 1);
        assert_eq!(plan.backup_data.len(), 2);
        assert_eq!(plan.wal.len(), 3);
        // The chunk, the unfinished backup's part and its lease, and the descriptor.
        assert_eq!(plan.left_out, 4);
        let b_storage = Storage::in_memory();
        let b = a
            .create_copy_target(b_storage.clone(), WriteOptions::default())
            .await
            .unwrap();
        assert_eq!(b.descriptor().system_identifier, CLUSTER.system_identifier);
        assert_ne!(b.descriptor().repository_id, a.descriptor().repository_id);
        a.check_copy_target(&b).unwrap();
        assert_eq!(copy_all(&a, &b).await, (7, 0));
        assert!(b.exists(&layout::backup_info_key("b1")).await.unwrap());
        assert!(!b.exists(&layout::backup_lease_key("b2")).await.unwrap());
        let seg = WalFileName::parse("000000010000000000000003").unwrap();
        assert_eq!(b.get_wal_file(&seg).await.unwrap().unwrap(), b"segment");
        // Idempotent: everything is already there.
        assert_eq!(copy_all(&a, &b).await, (0, 7));
    }

    #[tokio::test]
    async fn other_content_in_the_target_is_an_error_and_is_kept() {
        let a = source().await;
        let b = a
            .create_copy_target(Storage::in_memory(), WriteOptions::default())
            .await
            .unwrap();
        let key = layout::backup_manifest_key("b1");
        b.put_immutable(&key, &key, b"other").await.unwrap();
        let plan = a.copy_plan().await.unwrap();
        let manifest = plan.backup_data.iter().find(|o| o.key() == key).unwrap();
        let e = a.copy_object_to(&b, manifest).await.unwrap_err();
        assert!(matches!(e, RepoError::ConflictingContent { .. }), "{e}");
        assert_eq!(b.get_verified(&key).await.unwrap(), b"other");
    }

    #[tokio::test]
    async fn a_damaged_source_object_is_not_copied() {
        let a = source().await;
        let b = a
            .create_copy_target(Storage::in_memory(), WriteOptions::default())
            .await
            .unwrap();
        let key = layout::backup_part_key("b1", "base.tar", 0);
        let mut stored = a.storage.get(&key).await.unwrap().to_vec();
        let last = stored.len() - 1;
        stored[last] ^= 0xff;
        a.storage.put_overwrite(&key, stored.into()).await.unwrap();
        let plan = a.copy_plan().await.unwrap();
        let part = plan.backup_data.iter().find(|o| o.key() == key).unwrap();
        let e = a.copy_object_to(&b, part).await.unwrap_err();
        assert!(matches!(e, RepoError::Corrupt { .. }), "{e}");
        assert!(!b.exists(&key).await.unwrap());
    }

    #[tokio::test]
    async fn a_target_of_another_cluster_is_refused() {
        let a = source().await;
        let other = ClusterIdentity {
            system_identifier: 42,
            ..CLUSTER
        };
        let b = Repository::open_for_cluster(
            Storage::in_memory(),
            &other,
            "test",
            WriteOptions::default(),
        )
        .await
        .unwrap();
        let e = a.check_copy_target(&b).unwrap_err();
        assert!(matches!(e, RepoError::OtherCluster { .. }), "{e}");
    }

    fn with_key(passphrase: &str) -> WriteOptions {
        WriteOptions {
            encryption_key: Some(crate::key_source::KeySource::Command(format!(
                "printf {passphrase}"
            ))),
            ..WriteOptions::default()
        }
    }

    /// A copy of an encrypted repository into an empty location takes its keyrings: the same
    /// passphrase opens the copy and its objects. A repository of another key is refused.
    #[tokio::test]
    async fn an_encrypted_repository_copies_with_its_keyrings() {
        let a =
            Repository::open_for_cluster(Storage::in_memory(), &CLUSTER, "test", with_key("k1"))
                .await
                .unwrap();
        let seg = WalFileName::parse("000000010000000000000004").unwrap();
        a.put_wal_file(&seg, b"sealed wal").await.unwrap();
        let b_storage = Storage::in_memory();
        let b = a
            .create_copy_target(b_storage.clone(), with_key("k1"))
            .await
            .unwrap();
        assert!(b.descriptor().encryption.is_some());
        a.check_copy_target(&b).unwrap();
        assert_eq!(copy_all(&a, &b).await, (1, 0));
        let reopened = Repository::open(b_storage, with_key("k1")).await.unwrap();
        assert_eq!(
            reopened.get_wal_file(&seg).await.unwrap().unwrap(),
            b"sealed wal"
        );

        // Same cluster, encrypted too, but under its own data key.
        let c =
            Repository::open_for_cluster(Storage::in_memory(), &CLUSTER, "test", with_key("k1"))
                .await
                .unwrap();
        a.check_copy_target(&c).unwrap();
        let plan = a.copy_plan().await.unwrap();
        let e = a.copy_object_to(&c, &plan.wal[0]).await.unwrap_err();
        assert!(matches!(e, RepoError::OtherDataKey { .. }), "{e}");
        assert!(!c.has_wal_file(&seg).await.unwrap());
        // Plain and encrypted do not mix.
        let plain = source().await;
        let e = a.check_copy_target(&plain).unwrap_err();
        assert!(matches!(e, RepoError::OtherDataKey { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_chunked_segment_is_copied_with_its_chunks_first() {
        let a = source().await;
        let size = CLUSTER.wal_segment_size as usize;
        let seg = WalFileName::segment(1, 4, CLUSTER.wal_segment_size);
        let wal: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let half = size as u32 / 2;
        for (start, end) in [(0, half), (half, size as u32)] {
            let c = super::super::ChunkRef {
                segment: seg.clone(),
                start,
                end,
            };
            a.put_chunk(&c, &wal[start as usize..end as usize])
                .await
                .unwrap();
        }
        a.store_chunked_segment(&seg, size as u64).await.unwrap();
        let plan = a.copy_plan().await.unwrap();
        let keys: Vec<&str> = plan.wal.iter().map(|o| o.key()).collect();
        let at = |k: &str| keys.iter().position(|x| *x == k).unwrap();
        let manifest = at(&layout::wal_key(&seg));
        assert!(at(&layout::wal_chunk_key(&seg, 0, half)) < manifest);
        assert!(at(&layout::wal_chunk_key(&seg, half, size as u32)) < manifest);
        // The leftover chunk of the segment stored whole stays out.
        assert_eq!(plan.left_out, 4);
        let b = a
            .create_copy_target(Storage::in_memory(), WriteOptions::default())
            .await
            .unwrap();
        copy_all(&a, &b).await;
        assert_eq!(b.get_wal_file(&seg).await.unwrap().unwrap(), wal);
    }
}

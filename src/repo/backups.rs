//! Backup data and the protocol that decides a backup's fate: ids, leases, the `state` object,
//! the `expired` marker.
//!
//! A running backup claims a fresh id by creating `backups/<id>/lease` (conditional create, so
//! two backups never share an id whatever their timing) and rewrites it every
//! [`LEASE_REFRESH`]. A backup whose catalog entry is missing and whose lease is older than the
//! threshold is abandoned: a cleanup creates `backups/<id>/state` = `aborted` (put-if-absent)
//! and, only if that succeeded or the state already said so, deletes the parts. A backup that
//! finishes creates the same object as `complete` once the server has sent everything (while
//! its last parts and its WAL are stored) and before publishing its catalog entry, so a backup
//! that was merely slow (a paused process, a long network stall) and a cleanup can never both
//! win: either the backup publishes and keeps its parts, or it fails and its parts go (removed
//! by the backup itself when it fails after claiming completion).
//!
//! `pitr expire` removes a backup in an order that an interruption can never expose half-done:
//! [`Repository::mark_expired`] first, then [`Repository::unpublish_backup`], then
//! [`Repository::remove_backup_data`], which removes the marker last.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::object::{ObjectCodec, Payload};
use super::{layout, PutOutcome, RepoError, Repository, Result};
use crate::codec::{self, BlockWriter, FRAME_HEADER_LEN};
use crate::storage::{BufferPool, StorageError};
use crate::wal::{SegNo, WalFileName};

pub const LEASE_REFRESH: Duration = Duration::from_secs(60);
pub const DEFAULT_ABANDONED_AFTER: Duration = Duration::from_secs(15 * 60);

const COMPLETE: &[u8] = b"complete";
const ABORTED: &[u8] = b"aborted";

/// Deletes in flight at once: object stores answer each in a round trip.
const DELETES_IN_FLIGHT: usize = 16;

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    backup_id: String,
    pid: u32,
    updated_at: DateTime<Utc>,
}

fn lease_json(id: &str) -> Vec<u8> {
    let lease = Lease {
        backup_id: id.to_string(),
        pid: std::process::id(),
        updated_at: Utc::now(),
    };
    serde_json::to_vec(&lease).expect("lease serializes")
}

/// A new backup id for a backup started at `start`: `<UTC start>-<6 hex>`, to claim with
/// [`Repository::claim_backup`].
pub fn new_backup_id(start: DateTime<Utc>) -> String {
    format!(
        "{}-{:06x}",
        start.format("%Y%m%dT%H%M%SZ"),
        rand::thread_rng().gen_range(0..1u32 << 24)
    )
}

/// A backup part compressed (and sealed) for storage, not yet stored (see
/// [`Repository::encode_backup_part`]).
pub struct EncodedPart {
    key: String,
    pub(super) framed: Bytes,
}

/// A backup part compressed block by block on the caller's thread as its bytes arrive (see
/// [`Repository::backup_part_encoder`]): the content is never gathered whole, each block is
/// compressed while its bytes are still in the cache, and the stored bytes are the same as
/// [`Repository::encode_backup_part`] makes of the same content.
pub struct PartEncoder {
    key: String,
    writer: BlockWriter,
    /// The next block's bytes (less than a block).
    stage: Vec<u8>,
    len: usize,
}

impl PartEncoder {
    /// Content bytes taken so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the next `data` of the part's content.
    pub fn write(&mut self, mut data: &[u8]) {
        self.len += data.len();
        let (writer, stage) = (&mut self.writer, &mut self.stage);
        while !data.is_empty() {
            if stage.is_empty() && data.len() >= codec::BLOCK_LEN {
                // A whole block in the caller's bytes: compressed from there, not copied.
                let (block, rest) = data.split_at(codec::BLOCK_LEN);
                writer.block(block);
                data = rest;
                continue;
            }
            let take = (codec::BLOCK_LEN - stage.len()).min(data.len());
            stage.extend_from_slice(&data[..take]);
            data = &data[take..];
            if stage.len() == codec::BLOCK_LEN {
                writer.block(stage);
                stage.clear();
            }
        }
    }

    /// The part, ready for [`Repository::put_encoded_part`], and the staging buffer for the
    /// next part's encoder.
    pub fn finish(self) -> (EncodedPart, Vec<u8>) {
        let PartEncoder {
            key,
            mut writer,
            mut stage,
            ..
        } = self;
        if !stage.is_empty() {
            writer.block(&stage);
            stage.clear();
        }
        let framed = codec::frame_blocks(writer.finish());
        (EncodedPart { key, framed }, stage)
    }
}

/// A backup part fetched from storage and not yet decoded (see
/// [`Repository::fetch_backup_part`]).
pub struct FetchedPart {
    key: String,
    stored: Bytes,
    objects: ObjectCodec,
}

impl FetchedPart {
    /// The part's content, verified like every object read: a damaged part is
    /// [`RepoError::Corrupt`]. Decompresses: call it off the async threads.
    pub fn decode(self) -> Result<Vec<u8>> {
        self.objects.decode(&self.key, &self.stored)
    }

    /// [`Self::decode`] into `out`, reusing its allocation (and, when it already holds as many
    /// bytes, without zeroing it first): a restore cycles two buffers through all its parts.
    pub fn decode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        self.objects.decode_into(&self.key, &self.stored, out)
    }

    /// Hands the buffer the part was read into to `pool`, for the next
    /// [`Repository::fetch_backup_part`].
    pub fn recycle(self, pool: &BufferPool) {
        pool.give_bytes(self.stored);
    }
}

/// A stored object that a job may count and hand back for deletion, without knowing its key's
/// layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredObject {
    key: String,
    pub size: u64,
}

impl StoredObject {
    /// The object's key, for messages.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Repository {
    /// Claims a new backup id for a backup started at `start`: `<UTC start>-<6 hex>`. The id is
    /// taken by creating its lease with a conditional create, so a second backup started in
    /// the same second (or a replayed id) gets another one.
    pub async fn claim_backup_id(&self, start: DateTime<Utc>) -> Result<String> {
        loop {
            let id = new_backup_id(start);
            if self.claim_backup(&id).await? {
                return Ok(id);
            }
        }
    }

    /// Claims backup `id` (from [`new_backup_id`]) by creating its lease, the backup's first
    /// object; `false` when another backup holds that id (the caller takes another).
    pub async fn claim_backup(&self, id: &str) -> Result<bool> {
        let key = layout::backup_lease_key(id);
        let lease = lease_json(id);
        let framed = self.objects.encode(&key, &lease, Payload::Control);
        match self.storage.put_if_absent(&key, Bytes::from(framed)).await {
            Ok(()) => Ok(true),
            // A retried create whose first answer was lost finds its own lease.
            Err(StorageError::AlreadyExists { .. }) => {
                Ok(self.get_optional(&key).await?.as_deref() == Some(&lease[..]))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn write_lease(&self, id: &str) -> Result<()> {
        self.put_mutable(&layout::backup_lease_key(id), &lease_json(id))
            .await
    }

    /// Keeps refreshing backup `id`'s lease until the returned handle is aborted.
    pub fn hold_backup_lease(&self, id: &str) -> JoinHandle<()> {
        let (repo, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_REFRESH).await;
                if let Err(e) = repo.write_lease(&id).await {
                    tracing::warn!(backup = %id, error = %e, "could not refresh the backup lease");
                }
            }
        })
    }

    /// Claims completion for backup `id`. `false` if a cleanup declared it abandoned first.
    pub async fn claim_backup_completion(&self, id: &str) -> Result<bool> {
        self.create_state(id, COMPLETE).await
    }

    /// Creates backup `id`'s state object; `false` when it exists with the other state.
    async fn create_state(&self, id: &str, state: &[u8]) -> Result<bool> {
        let key = layout::backup_state_key(id);
        match self
            .put_immutable(&key, &format!("state of backup {id}"), state)
            .await
        {
            Ok(_) => Ok(true),
            Err(RepoError::ConflictingContent { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether backup `id`, which has no catalog entry, may still publish one: it is not
    /// aborted and holds a lease younger than `abandoned_after` (a backup refreshes its lease
    /// until it has published, also while its state says `complete`). Its start LSN is not
    /// known until it publishes.
    pub async fn backup_may_still_publish(
        &self,
        id: &str,
        abandoned_after: Duration,
    ) -> Result<bool> {
        let state = self.get_optional(&layout::backup_state_key(id)).await?;
        if state.as_deref() == Some(ABORTED) {
            return Ok(false);
        }
        // A `complete` state alone proves nothing: its process may have died before publishing.
        Ok(self
            .lease_age(id)
            .await?
            .is_some_and(|age| age < abandoned_after))
    }

    /// How long ago backup `id` last refreshed its lease; `None` when it has no readable lease.
    async fn lease_age(&self, id: &str) -> Result<Option<Duration>> {
        Ok(
            match self.get_optional(&layout::backup_lease_key(id)).await? {
                Some(raw) => serde_json::from_slice::<Lease>(&raw)
                    .ok()
                    .map(|l| (Utc::now() - l.updated_at).to_std().unwrap_or_default()),
                None => None,
            },
        )
    }

    /// Removes the data of backups that never completed and whose lease is older than
    /// `abandoned_after`, except `own`'s (the backup the caller is taking, alive whatever
    /// `abandoned_after` says). Returns the ids removed.
    pub async fn remove_abandoned_backups(
        &self,
        abandoned_after: Duration,
        own: Option<&str>,
    ) -> Result<Vec<String>> {
        let mut removed = vec![];
        // A backup published after the catalog was listed has its state `complete`, which
        // the state check below respects; listing once spares a request per backup.
        let (folders, published) = tokio::try_join!(self.backup_folders(), self.catalog_ids())?;
        for id in folders {
            if published.contains(&id) || own == Some(id.as_str()) {
                continue;
            }
            let keys = self.backup_folder_keys(&id).await?;
            if keys.is_empty() {
                // An empty folder left by a removal (the local backend keeps directories).
                continue;
            }
            // A backup with no readable lease cannot prove it is alive.
            if self
                .lease_age(&id)
                .await?
                .is_some_and(|age| age < abandoned_after)
            {
                continue;
            }
            // The mirror of `claim_backup_completion`: whoever creates the state first decides.
            if !self.create_state(&id, ABORTED).await? {
                // It completed after all; its catalog entry is about to appear.
                continue;
            }
            // The aborted state stays, so that a backup process that wakes up later cannot
            // claim completion over deleted parts.
            let state_key = layout::backup_state_key(&id);
            let keys: Vec<String> = keys.into_iter().filter(|k| *k != state_key).collect();
            if keys.is_empty() {
                continue; // removed by an earlier run: only its state is left
            }
            let n = self.delete_all(keys.into_iter()).await?;
            tracing::info!(backup = %id, objects = n, "removed an abandoned backup");
            removed.push(id);
        }
        Ok(removed)
    }

    /// The ids of every backup folder under `backups/`, published or not.
    pub async fn backup_folders(&self) -> Result<Vec<String>> {
        Ok(self
            .storage
            .list_folders(layout::BACKUP_DATA_PREFIX)
            .await?)
    }

    /// The ids of the backups with a catalog entry.
    async fn catalog_ids(&self) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .storage
            .list(layout::BACKUP_CATALOG_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| layout::backup_id_of_info_key(&o.key))
            .collect())
    }

    async fn backup_folder_keys(&self, id: &str) -> Result<Vec<String>> {
        let prefix = layout::backup_prefix(id);
        Ok(self
            .storage
            .list(&prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    async fn delete_all(&self, keys: impl Iterator<Item = String>) -> Result<usize> {
        let storage = &self.storage;
        let done = futures::stream::iter(keys)
            .map(|k| async move { storage.delete(&k).await })
            .buffered(DELETES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(done.len())
    }

    /// Whether an earlier `pitr expire` started removing backup `id` (its marker is there).
    pub async fn is_expiring(&self, id: &str) -> Result<bool> {
        self.exists(&layout::backup_expired_key(id)).await
    }

    /// First step of removing backup `id`: the marker that lets a later run finish the job.
    pub async fn mark_expired(&self, id: &str) -> Result<()> {
        let marker = serde_json::to_vec(&serde_json::json!({ "expired_at": Utc::now() }))
            .expect("marker serializes");
        self.put_mutable(&layout::backup_expired_key(id), &marker)
            .await
    }

    /// Removes backup `id`'s catalog entry: from now on `list` and `restore` do not see it.
    pub async fn unpublish_backup(&self, id: &str) -> Result<()> {
        Ok(self.storage.delete(&layout::backup_info_key(id)).await?)
    }

    /// Removes everything under `backups/<id>/`, the `expired` marker last.
    pub async fn remove_backup_data(&self, id: &str) -> Result<()> {
        let marker = layout::backup_expired_key(id);
        let keys = self.backup_folder_keys(id).await?;
        self.delete_all(keys.into_iter().filter(|k| *k != marker))
            .await?;
        self.storage.delete(&marker).await?;
        Ok(())
    }

    /// WAL objects (files, summaries, stream chunks) of segments numbered below `first_kept`,
    /// on any timeline, oldest first. Timeline history files are never among them.
    pub async fn wal_objects_below(&self, first_kept: SegNo) -> Result<Vec<StoredObject>> {
        let seg_size = self.descriptor().wal_segment_size;
        let mut doomed: Vec<(SegNo, StoredObject)> = self
            .storage
            .list(layout::WAL_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| {
                let segno = layout::wal_object_owner(&o.key)
                    .as_ref()
                    .and_then(|n: &WalFileName| n.segno(seg_size))?;
                (segno < first_kept).then_some((
                    segno,
                    StoredObject {
                        key: o.key,
                        size: o.size,
                    },
                ))
            })
            .collect();
        doomed.sort_by(|a, b| (a.0, &a.1.key).cmp(&(b.0, &b.1.key)));
        Ok(doomed.into_iter().map(|(_, o)| o).collect())
    }

    /// Deletes objects found by a scan of this repository.
    pub async fn delete_objects(&self, objects: &[StoredObject]) -> Result<()> {
        self.delete_all(objects.iter().map(|o| o.key.clone()))
            .await?;
        Ok(())
    }

    /// Stores part `part` of archive `archive` of backup `id`; returns the stored size.
    pub async fn put_backup_part(
        &self,
        id: &str,
        archive: &str,
        part: u32,
        content: Vec<u8>,
    ) -> Result<u64> {
        self.put_part(layout::backup_part_key(id, archive, part), content)
            .await
            .map(|(stored, _)| stored)
    }

    /// An encoder for part `part` of archive `archive` of backup `id`, of at most `max_len`
    /// content bytes, writing into `out` (an empty buffer from the caller's pool, which
    /// [`Self::put_encoded_part`] refills) and gathering each block in `stage`. `None` unless
    /// the repository stores LZ4 blocks, unencrypted: zstd and sealing are too slow for the
    /// thread that receives a backup, and go through [`Self::encode_backup_part`] instead.
    pub fn backup_part_encoder(
        &self,
        id: &str,
        archive: &str,
        part: u32,
        max_len: usize,
        out: Vec<u8>,
        mut stage: Vec<u8>,
    ) -> Option<PartEncoder> {
        if !self.objects.writes_lz4_blocks() {
            return None;
        }
        stage.clear();
        stage.reserve(codec::BLOCK_LEN);
        Some(PartEncoder {
            key: layout::backup_part_key(id, archive, part),
            writer: BlockWriter::reusing(out, FRAME_HEADER_LEN, max_len),
            stage,
            len: 0,
        })
    }

    /// The first half of [`Self::put_backup_part`]: compresses (and seals) part `part` on the
    /// blocking pool and hands the content's buffer straight back, so that a backup refills
    /// the same few part buffers while the stored bytes upload ([`Self::put_encoded_part`]).
    /// The stored bytes are written into `out` (an empty buffer from the caller's pool, which
    /// [`Self::put_encoded_part`] refills once they are stored).
    pub async fn encode_backup_part(
        &self,
        id: &str,
        archive: &str,
        part: u32,
        content: Vec<u8>,
        out: Vec<u8>,
    ) -> (EncodedPart, Vec<u8>) {
        let encoder = self.backup_part_encoder(id, archive, part, content.len(), out, Vec::new());
        let Some(mut encoder) = encoder else {
            // zstd, none, or sealed: encoded into a buffer of its own (`out` is not used).
            let key = layout::backup_part_key(id, archive, part);
            let (framed, content) = self.objects.encode_blocking(&key, content).await;
            let framed = Bytes::from(framed);
            return (EncodedPart { key, framed }, content);
        };
        // lz4 in blocks (codec 3), as archive-push stores segments: the output grows block by
        // block instead of being a zeroed buffer of lz4's bound for the whole part (8 MiB
        // written for ~1 MiB kept, resident wherever the allocator reuses it), and each
        // block's checksums are taken while it is in the cache. The output buffer goes round
        // the caller's pool: a fresh one per part had its pages faulted in and zeroed, then
        // unmapped, for every 8 MiB (~12 % of a backup's CPU).
        tokio::task::spawn_blocking(move || {
            encoder.write(&content);
            (encoder.finish().0, content)
        })
        .await
        .expect("encode task panicked")
    }

    /// The second half of [`Self::put_backup_part`]: stores an encoded part; returns the stored
    /// size. Idempotent like [`Self::put_part`]: when the part is already stored (a retried
    /// PUT), its content is compared with this part's, decoded again for that rare case.
    /// The stored bytes' buffer goes to `spare` (when the storage kept no reference to it).
    pub async fn put_encoded_part(&self, part: EncodedPart, spare: &BufferPool) -> Result<u64> {
        let EncodedPart { key, framed } = part;
        let stored = framed.len() as u64;
        match self.storage.put_if_absent(&key, framed.clone()).await {
            Ok(()) => {
                spare.give_bytes(framed);
                Ok(stored)
            }
            Err(StorageError::AlreadyExists { .. }) => {
                let content = self.objects.decode(&key, &framed)?;
                let name = key.rsplit('/').take(3).collect::<Vec<_>>().join(" ");
                let outcome = self.check_identical(&key, &name, &content).await?;
                debug_assert_eq!(outcome, PutOutcome::AlreadyStored);
                Ok(self.storage.head(&key).await?.unwrap_or(stored))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores backup `id`'s `backup_manifest` as the server sent it; returns the stored size.
    pub async fn put_backup_manifest(&self, id: &str, content: Vec<u8>) -> Result<u64> {
        self.put_part(layout::backup_manifest_key(id), content)
            .await
            .map(|(stored, _)| stored)
    }

    /// Part `part` of archive `archive` of backup `id`, verified.
    pub async fn backup_part(&self, id: &str, archive: &str, part: u32) -> Result<Vec<u8>> {
        self.get_verified(&layout::backup_part_key(id, archive, part))
            .await
    }

    /// Part `part` of archive `archive` of backup `id` as stored, read into `buf` where the
    /// storage can (see [`FetchedPart::recycle`]): read ahead, it holds only the stored
    /// (compressed) bytes, and [`FetchedPart::decode`] verifies and decodes it when its turn
    /// comes.
    pub async fn fetch_backup_part(
        &self,
        id: &str,
        archive: &str,
        part: u32,
        buf: Vec<u8>,
    ) -> Result<FetchedPart> {
        let key = layout::backup_part_key(id, archive, part);
        let stored = self.storage.get_into(&key, buf).await?;
        Ok(FetchedPart {
            key,
            stored,
            objects: self.objects.clone(),
        })
    }

    /// The stored size of each of the `parts` parts of archive `archive` of backup `id`, in
    /// order (one LIST): restore reads ahead within a budget of stored bytes. `None` for a part
    /// not listed, whose GET will say what is wrong.
    pub async fn backup_part_sizes(
        &self,
        id: &str,
        archive: &str,
        parts: u32,
    ) -> Result<Vec<Option<u64>>> {
        let listed: std::collections::HashMap<String, u64> = self
            .storage
            .list(&layout::backup_parts_prefix(id, archive))
            .await?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
        Ok((0..parts)
            .map(|p| {
                listed
                    .get(&layout::backup_part_key(id, archive, p))
                    .copied()
            })
            .collect())
    }

    /// Backup `id`'s manifest, verified; `None` when it is not stored.
    pub async fn backup_manifest(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.get_optional(&layout::backup_manifest_key(id)).await
    }

    /// Stores a backup part or manifest with the configured codec; returns the stored size.
    /// Compression runs on the blocking pool so that a backup compresses on every core while
    /// the async threads keep reading from the server.
    ///
    /// Idempotent under retries like every immutable object: when the object store kept a PUT
    /// whose response was lost, the retry finds the object there; identical content is success,
    /// different content is refused and the stored object untouched. Returns the stored size
    /// and the content's buffer.
    pub(super) async fn put_part(&self, key: String, content: Vec<u8>) -> Result<(u64, Vec<u8>)> {
        let (framed, content) = self.objects.encode_blocking(&key, content).await;
        let stored = framed.len() as u64;
        match self.storage.put_if_absent(&key, Bytes::from(framed)).await {
            Ok(()) => Ok((stored, content)),
            Err(StorageError::AlreadyExists { .. }) => {
                let name = key.rsplit('/').take(3).collect::<Vec<_>>().join(" ");
                let outcome = self.check_identical(&key, &name, &content).await?;
                debug_assert_eq!(outcome, PutOutcome::AlreadyStored);
                Ok((self.storage.head(&key).await?.unwrap_or(stored), content))
            }
            Err(e) => Err(e.into()),
        }
    }
}

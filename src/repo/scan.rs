//! The whole-repository scan: every object, sorted into what it is. `pitr verify` walks it;
//! object keys stay opaque to the caller (printed in reports, never parsed).

use bytes::Bytes;

use super::chunks::{may_be_chunked_segment, parse_chunk_key};
use super::{layout, ChunkRef, RepoError, Repository, Result};
use crate::codec::{self, Codec, CodecError};
use crate::storage::BufferPool;
use crate::wal::WalFileName;

/// What a stored object is, from its key alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Descriptor,
    /// A WAL file: segment, `.partial`, `.backup` or timeline history.
    Wal(WalFileName),
    /// The summary of a WAL segment.
    Summary(WalFileName),
    /// A chunk of a segment `pitr stream` has not stored whole yet.
    Chunk(ChunkRef),
    /// A completed backup's catalog entry.
    Catalog {
        backup_id: String,
    },
    /// Anything under a backup's data folder: parts, manifest, lease, state, expired marker.
    BackupData {
        backup_id: String,
        item: BackupItem,
    },
    /// A key this version of pitr does not write.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupItem {
    Part {
        archive: String,
        part: u32,
    },
    Manifest,
    Lease,
    State,
    Expired,
    /// A part or the index of the backup's block map (`blockmap/...`).
    BlockMap,
    Unknown,
}

/// One object found by [`Repository::scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedObject {
    key: String,
    pub size: u64,
    pub kind: ObjectKind,
}

impl ScannedObject {
    /// The object's key, for reports.
    pub fn key(&self) -> &str {
        &self.key
    }
}

pub(super) fn classify(key: &str) -> ObjectKind {
    if key == layout::DESCRIPTOR_KEY {
        return ObjectKind::Descriptor;
    }
    if key.starts_with(layout::BACKUP_CATALOG_PREFIX) {
        return match layout::backup_id_of_info_key(key) {
            Some(backup_id) => ObjectKind::Catalog { backup_id },
            None => ObjectKind::Unknown,
        };
    }
    if let Some(rest) = key.strip_prefix(layout::BACKUP_DATA_PREFIX) {
        let Some((id, item)) = rest.split_once('/') else {
            return ObjectKind::Unknown;
        };
        return ObjectKind::BackupData {
            backup_id: id.to_string(),
            item: classify_backup_item(item),
        };
    }
    if key.starts_with(layout::WAL_PREFIX) {
        if let Some((_, chunk)) = parse_chunk_key(key) {
            return ObjectKind::Chunk(chunk);
        }
        let file = key.rsplit('/').next().unwrap_or_default();
        if let Some(seg) = file.strip_suffix(layout::SUMMARY_SUFFIX) {
            return match WalFileName::parse(seg) {
                Ok(n) if layout::wal_summary_key(&n) == key => ObjectKind::Summary(n),
                _ => ObjectKind::Unknown,
            };
        }
        return match WalFileName::parse(file) {
            Ok(n) if layout::wal_key(&n) == key => ObjectKind::Wal(n),
            _ => ObjectKind::Unknown,
        };
    }
    ObjectKind::Unknown
}

fn classify_backup_item(item: &str) -> BackupItem {
    match item {
        "backup_manifest" => BackupItem::Manifest,
        "lease" => BackupItem::Lease,
        "state" => BackupItem::State,
        "expired" => BackupItem::Expired,
        _ if item.starts_with("blockmap/") => BackupItem::BlockMap,
        _ => match item.split_once('/') {
            Some((archive, part))
                if part.len() == 8 && part.bytes().all(|c| c.is_ascii_digit()) =>
            {
                BackupItem::Part {
                    archive: archive.to_string(),
                    part: part.parse().unwrap_or(u32::MAX),
                }
            }
            _ => BackupItem::Unknown,
        },
    }
}

/// A stored object as [`Repository::fetch_object`] fetched it.
pub enum FetchedObject {
    /// Decoded already (encrypted, small, or not `lz4-blocks`).
    Content(Vec<u8>),
    /// An `lz4-blocks` frame as stored, checked only when decoded.
    Frame { key: String, stored: Bytes },
}

impl FetchedObject {
    /// Hands the content to `sink` in order: a frame kept as stored one block (at most
    /// [`codec::BLOCK_LEN`] bytes as pitr writes them) at a time, so that the caller works on
    /// each while it is in the cache and the content is never held whole; other content in one
    /// piece. Returns the content length. The frame's checks are those of reading it whole, but
    /// the content checksum is known only at the end: on error, discard what `sink` got.
    /// Blocking: a segment is up to 1 GiB.
    pub fn decode_to(&self, mut sink: impl FnMut(&[u8])) -> Result<u64> {
        match self {
            FetchedObject::Content(c) => {
                sink(c);
                Ok(c.len() as u64)
            }
            FetchedObject::Frame { key, stored } => codec::decode_to(stored, |piece| {
                sink(piece);
                Ok::<(), CodecError>(())
            })
            .map_err(|source| RepoError::Corrupt {
                key: key.clone(),
                source,
            }),
        }
    }

    /// Hands the object's buffer to `pool` for the next [`Repository::fetch_object`]: the
    /// decoded content, or the frame as read.
    pub fn recycle(self, pool: &BufferPool) {
        match self {
            FetchedObject::Content(c) => pool.give(c),
            FetchedObject::Frame { stored, .. } => pool.give_bytes(stored),
        }
    }
}

/// The key of WAL file `name`, for reports that name an object (present or missing).
pub fn wal_file_key(name: &WalFileName) -> String {
    layout::wal_key(name)
}

impl Repository {
    /// Every object in the repository (one LIST), each with its kind.
    pub async fn scan(&self) -> Result<Vec<ScannedObject>> {
        Ok(self
            .storage
            .list("")
            .await?
            .into_iter()
            .map(|o| ScannedObject {
                kind: classify(&o.key),
                key: o.key,
                size: o.size,
            })
            .collect())
    }

    /// Reads a scanned object through its frame checksums. Decoding runs on the blocking pool:
    /// a segment is up to 1 GiB.
    pub async fn read_object(&self, o: &ScannedObject) -> Result<Vec<u8>> {
        let bytes = self.storage.get(&o.key).await?;
        let content = self.objects.decode_blocking(&o.key, bytes).await?;
        match &o.kind {
            // A chunked segment reads as the segment it names.
            ObjectKind::Wal(name) => self.resolve_chunked(name, content).await,
            _ => Ok(content),
        }
    }

    /// [`Self::read_object`] into `buf`, reusing its allocation (a reader of many segments
    /// passes the previous one's buffer back in). Gives the buffer back, filled on success.
    pub async fn read_object_into(&self, o: &ScannedObject, buf: Vec<u8>) -> (Result<()>, Vec<u8>) {
        match self.storage.get(&o.key).await {
            Ok(bytes) => self.decode_stored_into(o, bytes, buf).await,
            Err(e) => (Err(e.into()), buf),
        }
    }

    /// Fetches `o` for [`FetchedObject::decode_to`], reading it into `buf` where the storage can:
    /// an unencrypted `lz4-blocks` frame too big to be a chunked segment's list is kept as
    /// stored (in `buf`, handed back by [`FetchedObject::recycle`]), to be decoded block by
    /// block; anything else is decoded as [`Self::read_object_into`] decodes it, into a new
    /// buffer.
    pub async fn fetch_object(&self, o: &ScannedObject, buf: Vec<u8>) -> Result<FetchedObject> {
        let stored = self.storage.get_into(&o.key, buf).await?;
        let maybe_chunked = match &o.kind {
            ObjectKind::Wal(name) => may_be_chunked_segment(name, &stored),
            _ => false,
        };
        let streamable = self.objects.data_key.is_none()
            && !maybe_chunked
            && matches!(codec::peek_header(&stored), Ok(h) if h.codec == Codec::Lz4Blocks && !h.encrypted);
        if streamable {
            let frame = FetchedObject::Frame {
                key: o.key.clone(),
                stored,
            };
            return Ok(frame);
        }
        let (decoded, content) = self.decode_stored_into(o, stored, Vec::new()).await;
        decoded.map(|()| FetchedObject::Content(content))
    }

    async fn decode_stored_into(
        &self,
        o: &ScannedObject,
        stored: Bytes,
        buf: Vec<u8>,
    ) -> (Result<()>, Vec<u8>) {
        let (decoded, buf) = self.objects.decode_blocking_into(&o.key, stored, buf).await;
        match (&o.kind, decoded) {
            // A chunked segment reads as the segment it names (its buffer replaces `buf`).
            (ObjectKind::Wal(name), Ok(()))
                if buf.starts_with(super::chunks::CHUNKED_SEGMENT_MAGIC) =>
            {
                match self.resolve_chunked(name, buf).await {
                    Ok(content) => (Ok(()), content),
                    Err(e) => (Err(e), Vec::new()),
                }
            }
            (_, decoded) => (decoded, buf),
        }
    }

    /// The key of part `part` of archive `archive` of backup `id`, for reports.
    pub fn backup_part_key(&self, id: &str, archive: &str, part: u32) -> String {
        layout::backup_part_key(id, archive, part)
    }

    /// The key of backup `id`'s manifest, for reports.
    pub fn backup_manifest_key(&self, id: &str) -> String {
        layout::backup_manifest_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame read into a reused buffer gives that very buffer back (verify reads hundreds of
    /// segments through a few of them); one still shared is not taken.
    #[test]
    fn a_frame_hands_its_buffer_back_without_a_copy() {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(&[7u8; 1000]);
        let at = buf.as_ptr();
        let frame = |stored| FetchedObject::Frame {
            key: "k".into(),
            stored,
        };
        let pool = BufferPool::default();
        frame(Bytes::from(buf)).recycle(&pool);
        let back = pool.take();
        assert_eq!(
            (back.as_ptr(), back.len(), back.capacity()),
            (at, 1000, 1 << 20)
        );
        let shared = Bytes::from(back);
        let _other = shared.clone();
        frame(shared).recycle(&pool);
        assert_eq!(pool.take().capacity(), 0);
    }

    #[test]
    fn keys_classify_to_their_kind() {
        let seg = WalFileName::parse("000000010000000A000000FF").unwrap();
        assert_eq!(classify("repository.json"), ObjectKind::Descriptor);
        assert_eq!(
            classify(&layout::wal_key(&seg)),
            ObjectKind::Wal(seg.clone())
        );
        assert_eq!(
            classify(&layout::wal_summary_key(&seg)),
            ObjectKind::Summary(seg.clone())
        );
        assert!(matches!(
            classify(&layout::wal_chunk_key(&seg, 0, 0x2000)),
            ObjectKind::Chunk(c) if c.segment == seg && c.end == 0x2000
        ));
        assert_eq!(
            classify(&layout::backup_info_key("20261204T082000Z-abc123")),
            ObjectKind::Catalog {
                backup_id: "20261204T082000Z-abc123".into()
            }
        );
        assert_eq!(
            classify(&layout::backup_part_key("b1", "base.tar", 7)),
            ObjectKind::BackupData {
                backup_id: "b1".into(),
                item: BackupItem::Part {
                    archive: "base.tar".into(),
                    part: 7
                }
            }
        );
        for (key, item) in [
            (layout::backup_manifest_key("b1"), BackupItem::Manifest),
            (layout::backup_lease_key("b1"), BackupItem::Lease),
            (layout::backup_state_key("b1"), BackupItem::State),
            (layout::backup_expired_key("b1"), BackupItem::Expired),
            ("backups/b1/blockmap/00000000".into(), BackupItem::BlockMap),
            ("backups/b1/blockmap/index".into(), BackupItem::BlockMap),
        ] {
            assert_eq!(
                classify(&key),
                ObjectKind::BackupData {
                    backup_id: "b1".into(),
                    item
                }
            );
        }
        assert_eq!(
            classify("wal/0000000100000000/notes.txt"),
            ObjectKind::Unknown
        );
        assert_eq!(
            classify("wal/000000010000000A000000FF"),
            ObjectKind::Unknown
        );
        assert_eq!(classify("elsewhere"), ObjectKind::Unknown);
    }
}

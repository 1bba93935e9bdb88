//! Sub-segment chunks: how the open segment's bytes are found again in the repository.
//!
//! `pitr stream` ships the segment it is filling as immutable chunk objects
//! (`wal/<16 hex>/chunks/<segment>/<start>-<end>`, see [`layout::wal_chunk_key`]), each holding
//! bytes `[start, end)` of that segment. Two readers need them back:
//! - `pitr stream` itself after a restart (kill -9, crash), to resume exactly at the end of
//!   what is durable instead of re-shipping or, worse, shipping different chunk boundaries;
//! - `archive-get`, to serve the newest, still incomplete segment during restore to latest.
//!
//! Both use the same rule, [`plan_chain`]: start at offset 0 and follow chunks whose start is
//! the previous chunk's end. Anything that does not continue the chain (a gap, an overlap)
//! is ignored, because bytes after a hole cannot be replayed anyway. The planning is pure; the
//! one I/O function reads and checks the chain.

use std::collections::{BTreeMap, BTreeSet};

use super::object::Payload;
use super::{layout, PutOutcome, RepoError, Repository, WalInventory};
use crate::codec::CodecError;
use crate::storage::StorageError;
use crate::wal::{Lsn, SegNo, TimelineId, WalFileName};

/// One chunk object: bytes `[start, end)` of `segment`. The object's key is derived from it
/// (see [`layout::wal_chunk_key`]) and never leaves this module.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkRef {
    pub segment: WalFileName,
    pub start: u32,
    pub end: u32,
}

impl ChunkRef {
    fn key(&self) -> String {
        layout::wal_chunk_key(&self.segment, self.start, self.end)
    }
}

impl std::fmt::Display for ChunkRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{:08X}-{:08X}]", self.segment, self.start, self.end)
    }
}

/// The contiguous chain of chunks from offset 0, and what else was found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Chunks to concatenate, in order: `chain[0].start == 0`, `chain[i+1].start == chain[i].end`.
    pub chain: Vec<ChunkRef>,
    /// Chunks not on the chain (after a gap, or overlapping it). Never read; deleted with the rest.
    pub stray: Vec<ChunkRef>,
}

impl ChunkPlan {
    /// Bytes covered by the chain: the segment offset where the next byte belongs.
    pub fn end(&self) -> u32 {
        self.chain.last().map_or(0, |c| c.end)
    }

    /// Every chunk, chain and stray, e.g. to delete once the full segment is stored.
    pub fn all(&self) -> Vec<ChunkRef> {
        self.chain.iter().chain(&self.stray).cloned().collect()
    }
}

/// Picks the chain from offset 0. At each position the chunk reaching furthest wins, so that
/// a restarted streamer's longer chunk with the same start is preferred over a shorter one.
pub fn plan_chain(mut chunks: Vec<ChunkRef>) -> ChunkPlan {
    chunks.sort_by_key(|c| (c.start, std::cmp::Reverse(c.end)));
    let mut plan = ChunkPlan::default();
    let mut pos = 0u32;
    for c in chunks {
        if c.start == pos && c.end > pos {
            pos = c.end;
            plan.chain.push(c);
        } else {
            plan.stray.push(c);
        }
    }
    plan
}

impl Repository {
    /// Lists the chunks of `segment` (one LIST request) and plans the chain.
    pub async fn list_chunks(&self, segment: &WalFileName) -> Result<ChunkPlan, RepoError> {
        let prefix = layout::wal_chunk_prefix(segment);
        let objects = self.storage.list(&prefix).await?;
        let chunks = objects
            .into_iter()
            .filter_map(|o| parse_chunk_key(&o.key).map(|(_, c)| c))
            .filter(|c| &c.segment == segment)
            .collect();
        Ok(plan_chain(chunks))
    }

    /// Stores one chunk. Same chunk, same bytes after a restart: `AlreadyStored`; different
    /// bytes under the same offsets: refused, the stored chunk untouched.
    pub async fn put_chunk(&self, chunk: &ChunkRef, data: &[u8]) -> Result<PutOutcome, RepoError> {
        let key = chunk.key();
        self.put_immutable(&key, &format!("chunk {key}"), data)
            .await
    }

    /// Stores bytes `[0, data.len())` of `segment`, a segment not complete yet (the end of a
    /// backup's own WAL), as a chunk continuing the chain already stored for it, so that the
    /// chunks a running `pitr stream` ships and this one form a single chain. Nothing is
    /// written when the segment is stored whole or the chain already reaches as far. The
    /// chain must hold the same bytes: a chain that differs is refused, untouched.
    pub async fn store_segment_prefix(
        &self,
        segment: &WalFileName,
        data: &[u8],
    ) -> Result<PutOutcome, RepoError> {
        if data.is_empty() || self.has_wal_file(segment).await? {
            return Ok(PutOutcome::AlreadyStored);
        }
        let plan = self.list_chunks(segment).await?;
        let have = plan.end() as usize;
        if have > 0 {
            let stored = match self.read_chain(&plan).await {
                Ok(b) => b,
                // The segment was stored whole meanwhile and its chunks deleted.
                Err(RepoError::Storage(StorageError::NotFound { .. }))
                    if self.has_wal_file(segment).await? =>
                {
                    return Ok(PutOutcome::AlreadyStored)
                }
                Err(e) => return Err(e),
            };
            let n = have.min(data.len());
            if stored[..n] != data[..n] {
                return Err(RepoError::ConflictingContent {
                    name: format!("the chunks of {segment}"),
                    key: layout::wal_chunk_prefix(segment),
                    stored_len: n as u64,
                    stored_crc: crc32c::crc32c(&stored[..n]),
                    new_len: n as u64,
                    new_crc: crc32c::crc32c(&data[..n]),
                });
            }
        }
        if have >= data.len() {
            return Ok(PutOutcome::AlreadyStored);
        }
        let chunk = ChunkRef {
            segment: segment.clone(),
            // Offsets fit in u32: PostgreSQL segments are at most 1 GiB.
            start: have as u32,
            end: data.len() as u32,
        };
        self.put_chunk(&chunk, &data[have..]).await
    }

    /// Deletes chunks whose bytes are stored in their complete segment. Best effort: a leftover
    /// chunk is never read once its segment exists, so a failure only leaves garbage (logged).
    pub async fn delete_chunks(&self, chunks: &[ChunkRef]) {
        for c in chunks {
            if let Err(e) = self.storage.delete(&c.key()).await {
                tracing::warn!(chunk = %c, error = %e, "could not delete a chunk of a stored segment");
            }
        }
    }

    /// Reads the chain's chunks, each verified against its checksum and its declared length, and
    /// returns their concatenation: bytes `[0, plan.end())` of the segment.
    ///
    /// A chunk that disappears between the LIST and the GET (the full segment was stored and its
    /// chunks deleted meanwhile) is reported as `StorageError::NotFound`; callers then look for
    /// the segment object again.
    pub async fn read_chain(&self, plan: &ChunkPlan) -> Result<Vec<u8>, RepoError> {
        let mut out = Vec::with_capacity(plan.end() as usize);
        for c in &plan.chain {
            let key = c.key();
            let bytes = self.get_verified(&key).await?;
            let expected = u64::from(c.end - c.start);
            if bytes.len() as u64 != expected {
                // The name is part of the contract: a chunk whose size disagrees with its name
                // is as corrupt as one failing its checksum.
                return Err(RepoError::Corrupt {
                    key,
                    source: CodecError::ContentLength {
                        expected,
                        actual: bytes.len() as u64,
                    },
                });
            }
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    /// For `archive-get`: WAL file `name` as recovery should see it: the stored object, or for a
    /// segment not stored whole, the bytes `pitr stream` shipped for it as chunks, zero-padded
    /// to the segment size (as PostgreSQL and pg_receivewal leave an unfinished segment).
    /// `None` when the repository has neither.
    ///
    /// Safety rules:
    /// - a complete segment always wins: chunks are deleted only after the segment object is
    ///   stored, so when chunks vanish under us (or none are found) the segment object is looked
    ///   up once more before answering "not found";
    /// - only the chain from offset 0 is served; bytes after a hole are never served;
    /// - the zero padding reads as the end of WAL to PostgreSQL (a page with a zero magic),
    ///   exactly where replay of a `.partial` stops. A later request for the same name (a
    ///   standby polling its restore_command) gets more of the segment, or the complete object.
    pub async fn wal_file_for_recovery(
        &self,
        name: &WalFileName,
    ) -> Result<Option<WalForRecovery>, RepoError> {
        if let Some(full) = self.get_wal_file(name).await? {
            return Ok(Some(WalForRecovery::Stored(full)));
        }
        if !matches!(name, WalFileName::Segment { .. }) {
            return Ok(None);
        }
        Ok(self
            .assemble_partial_segment(name)
            .await?
            .map(|(bytes, whole)| match whole {
                true => WalForRecovery::Stored(bytes),
                false => WalForRecovery::FromChunks(bytes),
            }))
    }

    /// Segment `name` from its chunks (`false`), or its complete object if that appeared
    /// meanwhile (`true`).
    async fn assemble_partial_segment(
        &self,
        name: &WalFileName,
    ) -> Result<Option<(Vec<u8>, bool)>, RepoError> {
        let seg_size = self.descriptor().wal_segment_size as usize;
        // Two rounds cover one race: chunks deleted between the LIST and the GETs because the
        // segment was completed and stored meanwhile.
        for _ in 0..2 {
            let plan = self.list_chunks(name).await?;
            if plan.chain.is_empty() {
                return Ok(self.get_wal_file(name).await?.map(|b| (b, true)));
            }
            match self.read_chain(&plan).await {
                Ok(mut bytes) => {
                    if !plan.stray.is_empty() {
                        tracing::warn!(file = %name, stray = plan.stray.len(), "chunks after a hole were not used");
                    }
                    let wal_bytes = bytes.len();
                    bytes.resize(seg_size, 0);
                    tracing::info!(file = %name, wal_bytes, chunks = plan.chain.len(),
                        "serving the newest, incomplete segment assembled from streamed chunks (zero-padded)");
                    return Ok(Some((bytes, false)));
                }
                Err(RepoError::Storage(StorageError::NotFound { .. })) => {
                    if let Some(full) = self.get_wal_file(name).await? {
                        return Ok(Some((full, true)));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(self.get_wal_file(name).await?.map(|b| (b, true)))
    }
}

/// What [`Repository::wal_file_for_recovery`] found.
#[derive(Debug)]
pub enum WalForRecovery {
    /// The stored WAL file object.
    Stored(Vec<u8>),
    /// A segment not stored whole yet, assembled from its chunks and zero-padded. Never spool or
    /// cache it: the complete segment may later differ past the chunks' end.
    FromChunks(Vec<u8>),
}

impl WalForRecovery {
    pub fn bytes(&self) -> &[u8] {
        match self {
            WalForRecovery::Stored(b) | WalForRecovery::FromChunks(b) => b,
        }
    }
}

/// What one LIST of `wal/` shows: the inventory of WAL files, and the chunk folders beside
/// them. `pitr list` and `pitr stream`'s startup read both from the same request.
#[derive(Debug, Default)]
pub struct WalScan {
    pub inventory: WalInventory,
    /// Chunk folders by segment, with the chunks found in each.
    pub chunk_folders: BTreeMap<WalFileName, Vec<ChunkRef>>,
    /// Segment objects present (complete segments only).
    segments: BTreeSet<WalFileName>,
}

/// The chunk a key `wal/<16 hex>/chunks/<segment>/<start>-<end>` names.
pub(super) fn parse_chunk_key(key: &str) -> Option<(WalFileName, ChunkRef)> {
    let mut parts = key.rsplit('/');
    let _file = parts.next()?;
    let segment = WalFileName::parse(parts.next()?).ok()?;
    if parts.next()? != "chunks" || !matches!(segment, WalFileName::Segment { .. }) {
        return None;
    }
    let (start, end) = layout::parse_wal_chunk_key(key)?;
    Some((
        segment.clone(),
        ChunkRef {
            segment,
            start,
            end,
        },
    ))
}

impl Repository {
    /// What the repository holds under `wal/` (one LIST request): the inventory of WAL files
    /// and the chunk folders beside them.
    pub async fn wal_scan(&self) -> Result<WalScan, RepoError> {
        Repository::wal_scan_unopened(&self.storage, self.descriptor().wal_segment_size).await
    }

    /// [`Self::wal_scan`] of the repository at `storage`, for a caller that opens it at the
    /// same time (one round trip instead of two) and uses the scan only once the opened
    /// descriptor says `seg_size`: the keys of `wal/` are plaintext, encrypted or not.
    pub async fn wal_scan_unopened(
        storage: &crate::storage::Storage,
        seg_size: u64,
    ) -> Result<WalScan, RepoError> {
        let objects = storage.list(layout::WAL_PREFIX).await?;
        Ok(WalScan::from_keys(
            objects.into_iter().map(|o| o.key),
            seg_size,
        ))
    }

    /// Whether each of `segments` (timeline, number) is stored whole, as [`Self::wal_scan`]'s
    /// inventory would say: one HEAD request each, all at once. For a few segments of a large
    /// repository, where one LIST would read every key.
    pub async fn holds_segments(
        &self,
        segments: &[(TimelineId, SegNo)],
    ) -> Result<Vec<bool>, RepoError> {
        let seg_size = self.descriptor().wal_segment_size;
        let heads = segments.iter().map(|&(tli, segno)| {
            let key = layout::wal_key(&WalFileName::segment(tli, segno, seg_size));
            async move { self.storage.head(&key).await }
        });
        let found = futures::future::try_join_all(heads).await?;
        Ok(found.into_iter().map(|f| f.is_some()).collect())
    }
}

impl WalScan {
    /// Sorts the keys under `wal/` into WAL files and chunks.
    pub(super) fn from_keys(keys: impl IntoIterator<Item = String>, seg_size: u64) -> WalScan {
        let mut scan = WalScan::default();
        let mut names = vec![];
        for key in keys {
            if let Some((segment, chunk)) = parse_chunk_key(&key) {
                scan.chunk_folders.entry(segment).or_default().push(chunk);
                continue;
            }
            let Some(name) = key
                .rsplit('/')
                .next()
                .and_then(|f| WalFileName::parse(f).ok())
            else {
                continue;
            };
            if matches!(name, WalFileName::Segment { .. }) {
                scan.segments.insert(name.clone());
            }
            names.push(name);
        }
        scan.inventory = WalInventory::from_names(names, seg_size);
        scan
    }

    /// The chunks stored for `segment`, planned as [`Repository::list_chunks`] plans them: from
    /// this scan, without a LIST of their folder.
    pub fn chunk_plan(&self, segment: &WalFileName) -> ChunkPlan {
        plan_chain(self.chunk_folders.get(segment).cloned().unwrap_or_default())
    }

    /// Chunks of segments whose complete object is stored: left behind when a stream stopped
    /// between storing a segment and deleting its chunks. Never read again; safe to delete.
    pub fn stale_chunks(&self) -> Vec<ChunkRef> {
        self.chunk_folders
            .iter()
            .filter(|(seg, _)| self.segments.contains(seg))
            .flat_map(|(_, chunks)| chunks.iter().cloned())
            .collect()
    }

    /// Per timeline, how far WAL reaches in the repository counting the chunks of segments not
    /// yet complete (the end of each chunk chain from offset 0): the streamed position.
    /// Timelines without such chunks are absent.
    pub fn streamed_ends(&self, seg_size: u64) -> BTreeMap<TimelineId, Lsn> {
        let mut out = BTreeMap::new();
        for (seg, chunks) in &self.chunk_folders {
            if self.segments.contains(seg) {
                continue;
            }
            let end = plan_chain(chunks.clone()).end();
            let Some(segno) = seg.segno(seg_size) else {
                continue;
            };
            if end == 0 {
                continue;
            }
            let lsn = Lsn(Lsn::from_segno(segno, seg_size).0 + u64::from(end));
            let e = out.entry(seg.timeline()).or_insert(lsn);
            *e = (*e).max(lsn);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(start: u32, end: u32) -> ChunkRef {
        ChunkRef {
            segment: WalFileName::parse("000000010000000000000005").unwrap(),
            start,
            end,
        }
    }

    #[test]
    fn chain_follows_contiguous_chunks_from_zero() {
        let p = plan_chain(vec![c(100, 250), c(0, 100), c(250, 4096)]);
        assert_eq!(p.chain, vec![c(0, 100), c(100, 250), c(250, 4096)]);
        assert!(p.stray.is_empty());
        assert_eq!(p.end(), 4096);
    }

    #[test]
    fn chain_stops_at_a_gap() {
        let p = plan_chain(vec![c(0, 100), c(200, 300)]);
        assert_eq!(p.end(), 100);
        assert_eq!(p.stray, vec![c(200, 300)]);
        assert_eq!(p.all().len(), 2);
    }

    #[test]
    fn chain_without_a_start_is_empty() {
        let p = plan_chain(vec![c(8192, 9000)]);
        assert_eq!(p.end(), 0);
        assert!(p.chain.is_empty());
    }

    #[test]
    fn longest_chunk_wins_and_overlaps_are_stray() {
        let p = plan_chain(vec![c(0, 100), c(0, 300), c(100, 200), c(300, 400)]);
        assert_eq!(p.chain, vec![c(0, 300), c(300, 400)]);
        assert_eq!(p.stray, vec![c(0, 100), c(100, 200)]);
    }
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    #[test]
    fn scan_finds_streamed_ends_and_stale_chunks() {
        let seg = 16u64 << 20;
        let keys = [
            "wal/0000000100000000/000000010000000000000003",
            "wal/0000000100000000/000000010000000000000004",
            // stale: segment 4 is stored
            "wal/0000000100000000/chunks/000000010000000000000004/00000000-00001000",
            // open segment 5: a chain 0..0x3000 and a stray after a gap
            "wal/0000000100000000/chunks/000000010000000000000005/00000000-00001000",
            "wal/0000000100000000/chunks/000000010000000000000005/00001000-00003000",
            "wal/0000000100000000/chunks/000000010000000000000005/00004000-00005000",
            "wal/00000002.history",
            "wal/0000000200000000/chunks/000000020000000000000005/00000000-00000100",
        ];
        let scan = WalScan::from_keys(keys.iter().map(|k| k.to_string()), seg);
        assert_eq!(scan.inventory.timelines[&1].ranges, vec![(3, 4)]);
        assert_eq!(scan.inventory.histories, vec![2]);
        assert_eq!(
            scan.stale_chunks()
                .iter()
                .map(|c| c.key())
                .collect::<Vec<_>>(),
            vec![keys[2].to_string()],
            "only chunks of stored segments are stale"
        );
        let ends = scan.streamed_ends(seg);
        assert_eq!(ends[&1], Lsn(5 * seg + 0x3000));
        assert_eq!(ends[&2], Lsn(5 * seg + 0x100));
    }
}

/// Whether a stored WAL object could be a chunked segment: only segments and `.partial`s are,
/// and their objects are small (a list of chunks); a whole segment's frame is bigger unless it
/// compresses below this, when decoding it whole costs little anyway. Readers that stream a
/// stored frame (never holding the content whole) decode such an object whole instead, so that
/// one naming its chunks is resolved rather than served as WAL.
pub(super) fn may_be_chunked_segment(name: &WalFileName, stored: &[u8]) -> bool {
    const CHUNKED_SEGMENT_MAX: usize = 1 << 20;
    matches!(
        name,
        WalFileName::Segment { .. } | WalFileName::Partial { .. }
    ) && stored.len() <= CHUNKED_SEGMENT_MAX
}

/// First bytes of a chunked segment's content: a segment object that names its chunks instead
/// of holding its bytes (docs/repository-format.md, "Chunked segments"). A WAL segment can
/// never start like this: its first two bytes are the page magic, whose second byte is 0xD0 or
/// above, and it is `wal_segment_size` bytes long, far more than any manifest.
pub const CHUNKED_SEGMENT_MAGIC: &[u8] = b"PITR chunked segment 1\n";

/// The JSON after [`CHUNKED_SEGMENT_MAGIC`].
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ChunkedSegment {
    segment_size: u64,
    /// Bytes of WAL the chunks hold, from offset 0; the rest, up to `segment_size`, is zeros
    /// (only a `.partial` has any).
    wal_bytes: u64,
    /// `[start, end)` of each chunk, in order, contiguous from 0 to `wal_bytes`.
    chunks: Vec<(u32, u32)>,
}

impl ChunkedSegment {
    fn encode(&self) -> Vec<u8> {
        let mut out = CHUNKED_SEGMENT_MAGIC.to_vec();
        out.extend_from_slice(&serde_json::to_vec(self).expect("plain data serializes"));
        out
    }

    /// The manifest in `content`, if it is one; `Err` when it is one but does not hold up.
    fn decode(content: &[u8]) -> Option<Result<ChunkedSegment, String>> {
        let json = content.strip_prefix(CHUNKED_SEGMENT_MAGIC)?;
        Some(
            serde_json::from_slice::<ChunkedSegment>(json)
                .map_err(|e| e.to_string())
                .and_then(|m| m.check().map(|()| m)),
        )
    }

    fn check(&self) -> Result<(), String> {
        let mut pos = 0u64;
        for &(start, end) in &self.chunks {
            if u64::from(start) != pos || end <= start {
                return Err(format!(
                    "chunk [{start:08X}-{end:08X}) does not continue at {pos:08X}"
                ));
            }
            pos = u64::from(end);
        }
        if pos != self.wal_bytes || self.wal_bytes > self.segment_size || self.wal_bytes == 0 {
            return Err(format!(
                "chunks reach {pos} bytes, wal_bytes is {}, segment_size {}",
                self.wal_bytes, self.segment_size
            ));
        }
        Ok(())
    }
}

impl Repository {
    /// Stores segment (or `.partial`) `name` as a chunked segment: an object under the segment's
    /// key naming the chain of chunks already durable that hold its bytes `[0, wal_bytes)` (one
    /// LIST finds them; each repository, a mirror too, names its own). Used by `pitr stream` for
    /// segments larger than its memory budget, so that a segment is never held whole. The chunks
    /// are then part of the segment and are never deleted on their own.
    pub async fn store_chunked_segment(
        &self,
        name: &WalFileName,
        wal_bytes: u64,
    ) -> Result<PutOutcome, RepoError> {
        let folder = match name {
            WalFileName::Partial { tli, log, seg } => WalFileName::Segment {
                tli: *tli,
                log: *log,
                seg: *seg,
            },
            n => n.clone(),
        };
        let listed = self.list_chunks(&folder).await?.all();
        // Any contiguous path will do: chunk boundaries differ when a backup, a restarted
        // stream or a mirror's sync shipped part of the segment.
        let chain = covering_chain(listed, wal_bytes).unwrap_or_default();
        let manifest = ChunkedSegment {
            segment_size: self.descriptor().wal_segment_size,
            wal_bytes,
            chunks: chain.iter().map(|c| (c.start, c.end)).collect(),
        };
        if let Err(message) = manifest.check() {
            // A bug in the writer: never store a segment that would not read back.
            return Err(RepoError::BadChunkedSegment {
                key: layout::wal_key(name),
                message,
            });
        }
        let key = layout::wal_key(name);
        let framed = self.objects.encode(&key, &manifest.encode(), Payload::Data);
        match self.storage.put_if_absent(&key, framed.into()).await {
            Ok(()) => Ok(PutOutcome::Stored),
            Err(StorageError::AlreadyExists { .. }) => {
                self.chunked_already_stored(name, &manifest).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The key of chunked segment `name` is taken. The same WAL stored another way is success:
    /// a manifest naming other chunks (a restart, a backup's chunk), or the whole segment (an
    /// archive-push of the same file; it wins, and its chunks become leftovers). The whole
    /// segment is not compared byte for byte: that would hold it in memory, which is what
    /// chunked segments avoid; its own checksums stand for it.
    async fn chunked_already_stored(
        &self,
        name: &WalFileName,
        mine: &ChunkedSegment,
    ) -> Result<PutOutcome, RepoError> {
        let key = layout::wal_key(name);
        // A manifest is a few KiB; anything this large is a whole segment, never read here.
        const MANIFEST_MAX: u64 = 1 << 20;
        if self.storage.head(&key).await?.unwrap_or(0) > MANIFEST_MAX {
            tracing::info!(file = %name, "the whole segment is already stored; keeping it");
            return Ok(PutOutcome::AlreadyStored);
        }
        let stored = self.get_verified(&key).await?;
        match ChunkedSegment::decode(&stored) {
            Some(Ok(m)) if m.wal_bytes == mine.wal_bytes && m.segment_size == mine.segment_size => {
                Ok(PutOutcome::AlreadyStored)
            }
            None if stored.len() as u64 == mine.segment_size => Ok(PutOutcome::AlreadyStored),
            _ => Err(RepoError::ConflictingContent {
                name: name.to_string(),
                key,
                stored_len: stored.len() as u64,
                stored_crc: crc32c::crc32c(&stored),
                new_len: mine.wal_bytes,
                new_crc: 0,
            }),
        }
    }

    /// The content of WAL file `name` given its stored object's decoded `content`: the content
    /// itself, or for a chunked segment its chunks read, checked and concatenated (zero-padded
    /// to the segment size). Every reader of segment objects goes through here.
    pub(super) async fn resolve_chunked(
        &self,
        name: &WalFileName,
        content: Vec<u8>,
    ) -> Result<Vec<u8>, RepoError> {
        if !matches!(
            name,
            WalFileName::Segment { .. } | WalFileName::Partial { .. }
        ) {
            return Ok(content);
        }
        let Some(manifest) = ChunkedSegment::decode(&content) else {
            return Ok(content);
        };
        let key = layout::wal_key(name);
        let bad = |message| RepoError::BadChunkedSegment {
            key: key.clone(),
            message,
        };
        let manifest = manifest.map_err(bad)?;
        if manifest.segment_size != self.descriptor().wal_segment_size {
            return Err(bad(format!(
                "segment_size {} is not the repository's",
                manifest.segment_size
            )));
        }
        let plan = ChunkPlan {
            chain: manifest_chain(name, &manifest),
            stray: vec![],
        };
        // A chunk of a chunked segment is never deleted on its own: missing is damage.
        let mut bytes = self.read_chain(&plan).await.map_err(|e| match e {
            RepoError::Storage(StorageError::NotFound { key: k, .. }) => {
                bad(format!("its chunk {k} is missing"))
            }
            e => e,
        })?;
        bytes.resize(manifest.segment_size as usize, 0);
        Ok(bytes)
    }

    /// The chunks a stored chunked segment `name` is made of (empty for a segment stored
    /// whole, or absent): those must never be deleted as leftovers.
    pub async fn chunks_in_use(&self, name: &WalFileName) -> Result<Vec<ChunkRef>, RepoError> {
        let Some(content) = self.get_optional(&layout::wal_key(name)).await? else {
            return Ok(vec![]);
        };
        match ChunkedSegment::decode(&content) {
            Some(Ok(m)) => Ok(manifest_chain(name, &m)),
            // Damaged: keep every chunk, `pitr verify` reports it.
            Some(Err(_)) => Ok(self.list_chunks(name).await?.all()),
            None => Ok(vec![]),
        }
    }
}

/// Chunks covering `[0, end)` exactly, one after the other, if the chunks allow it. Offsets only
/// grow along a path, so one pass in order of `start` finds every reachable offset.
fn covering_chain(mut chunks: Vec<ChunkRef>, end: u64) -> Option<Vec<ChunkRef>> {
    chunks.sort_by_key(|c| (c.start, std::cmp::Reverse(c.end)));
    let mut via: BTreeMap<u32, Option<usize>> = BTreeMap::from([(0, None)]);
    for (i, c) in chunks.iter().enumerate() {
        if u64::from(c.end) <= end && via.contains_key(&c.start) {
            via.entry(c.end).or_insert(Some(i));
        }
    }
    let mut path = vec![];
    let mut pos = u32::try_from(end).ok()?;
    while pos > 0 {
        let c = &chunks[(*via.get(&pos)?)?];
        pos = c.start;
        path.push(c.clone());
    }
    path.reverse();
    Some(path)
}

/// The chunk objects a manifest names. A `.partial`'s chunks are in the folder of the segment
/// of the same number and timeline.
fn manifest_chain(name: &WalFileName, m: &ChunkedSegment) -> Vec<ChunkRef> {
    let segment = match name {
        WalFileName::Partial { tli, log, seg } => WalFileName::Segment {
            tli: *tli,
            log: *log,
            seg: *seg,
        },
        n => n.clone(),
    };
    m.chunks
        .iter()
        .map(|&(start, end)| ChunkRef {
            segment: segment.clone(),
            start,
            end,
        })
        .collect()
}

#[cfg(test)]
mod chunked_tests {
    use super::*;

    #[test]
    fn a_covering_chain_is_found_across_mixed_boundaries() {
        let c = |start, end| ChunkRef {
            segment: WalFileName::parse("000000010000000000000005").unwrap(),
            start,
            end,
        };
        // A backup shipped [0x100, 0x500); the stream [0x100, 0x300) and went on from 0x300.
        let chunks = vec![
            c(0, 0x100),
            c(0x100, 0x500),
            c(0x100, 0x300),
            c(0x300, 0x1000),
        ];
        let path = covering_chain(chunks.clone(), 0x1000).unwrap();
        assert_eq!(path, vec![c(0, 0x100), c(0x100, 0x300), c(0x300, 0x1000)]);
        assert_eq!(covering_chain(chunks.clone(), 0x500).unwrap().len(), 2);
        assert!(covering_chain(chunks, 0x400).is_none());
    }

    #[test]
    fn manifest_round_trips_and_is_checked() {
        let m = ChunkedSegment {
            segment_size: 1 << 26,
            wal_bytes: 1 << 26,
            chunks: vec![(0, 0x100), (0x100, 1 << 26)],
        };
        let enc = m.encode();
        assert!(enc.starts_with(CHUNKED_SEGMENT_MAGIC));
        assert_eq!(ChunkedSegment::decode(&enc).unwrap().unwrap(), m);
        // WAL never reads as a manifest.
        assert!(ChunkedSegment::decode(&[0x10, 0xD1, 6, 0]).is_none());
        for bad in [
            vec![(0, 0x100), (0x200, 1 << 26)],
            vec![(0x100, 1 << 26)],
            vec![(0, 0x100)],
        ] {
            let b = ChunkedSegment {
                chunks: bad,
                segment_size: m.segment_size,
                wal_bytes: m.wal_bytes,
            };
            assert!(ChunkedSegment::decode(&b.encode()).unwrap().is_err());
        }
    }
}

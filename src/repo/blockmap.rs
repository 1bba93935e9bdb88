//! Block maps: for every backup pitr takes, one hash per 8 KiB block of every relation file of
//! the backup's FINAL (reconstructed) content. Block-level incremental backups compare against
//! the parent's map; server-mode incrementals carry the parent's map forward; restore can check
//! reconstructed files against it.
//!
//! Stored through the object codec (compressed, encrypted when the repository is) as
//! `backups/<id>/blockmap/<part, 8 digits>` plus `backups/<id>/blockmap/index`. Parts hold
//! files in the order the writer was given them (the server's readdir order, which the next
//! backup of the same cluster mostly repeats) and are cut at [`PART_TARGET`] bytes, so a reader
//! keeps only the index (one small row per file) and [`CACHED_PARTS`] decoded parts: memory is
//! bounded whatever the database size. See docs/repository-format.md for the byte layout.
//!
//! Hash: XXH3-128 of the block's 8192 bytes. A changed block is missed only if its new content
//! has the same 128-bit hash as the parent's block at the same position: for accidental changes
//! 2^-128 per block, i.e. never across any realistic number of blocks (2^40 blocks = 8 PiB still
//! leaves ~2^-88). 64 bits would leave ~2^-24 over 2^40 blocks, which is why the map pays 16
//! bytes per block (0.2 % of the data).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{layout, RepoError, Repository, Result};

/// The hash of one block.
pub type BlockHash = u128;

/// Raw bytes after which a part is stored and a new one begun.
pub const PART_TARGET: usize = 4 << 20;
/// Decoded parts a reader keeps.
const CACHED_PARTS: usize = 2;
const INDEX_VERSION: u32 = 1;
const HASH_NAME: &str = "xxh3-128";

/// The hash of a block (or the short tail of a file).
pub fn block_hash(block: &[u8]) -> BlockHash {
    twox_hash::XxHash3_128::oneshot(block)
}

/// One file of a block map: its size and one hash per 8 KiB block (the last one possibly short).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileBlocks {
    /// Relative to the archive's root, as in the tar stream (`base/5/16384`, or
    /// `PG_15_.../5/16384` in a tablespace archive), prefixed `pg_tblspc/<oid>/` for tablespaces.
    pub path: String,
    pub size: u64,
    pub hashes: Vec<BlockHash>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    version: u32,
    hash: String,
    block_size: u32,
    parts: u32,
    /// `(path, part)` for every file, in the order written.
    files: Vec<(String, u32)>,
}

fn part_key(id: &str, part: u32) -> String {
    format!("{}blockmap/{part:08}", layout::backup_prefix(id))
}

fn index_key(id: &str) -> String {
    format!("{}blockmap/index", layout::backup_prefix(id))
}

/// Writes a backup's block map part by part; [`BlockMapWriter::finish`] writes the index.
pub struct BlockMapWriter {
    repo: Repository,
    id: String,
    buf: Vec<u8>,
    parts: u32,
    files: Vec<(String, u32)>,
    stored: u64,
}

impl Repository {
    /// A writer of backup `id`'s block map.
    pub fn put_block_map(&self, id: &str) -> BlockMapWriter {
        BlockMapWriter {
            repo: self.clone(),
            id: id.to_string(),
            buf: Vec::new(),
            parts: 0,
            files: vec![],
            stored: 0,
        }
    }

    /// Backup `id`'s block map; `None` when the backup has none (taken by an older pitr).
    pub async fn block_map(&self, id: &str) -> Result<Option<BlockMap>> {
        let key = index_key(id);
        let Some(raw) = self.get_optional(&key).await? else {
            return Ok(None);
        };
        let bad = |message: String| RepoError::BadDescriptor {
            key: key.clone(),
            message,
        };
        let index: Index = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
        if index.version != INDEX_VERSION || index.hash != HASH_NAME || index.block_size != 8192 {
            return Err(bad(format!(
                "unsupported block map (version {}, hash {}, block size {})",
                index.version, index.hash, index.block_size
            )));
        }
        let files = index.files.into_iter().collect();
        Ok(Some(BlockMap {
            repo: self.clone(),
            id: id.to_string(),
            parts: index.parts,
            files,
            cache: vec![],
        }))
    }
}

impl BlockMapWriter {
    /// Adds one file; stores a part when enough has accumulated.
    pub async fn add(&mut self, file: &FileBlocks) -> Result<()> {
        // Sized for a part and grown only by what a record needs: doubling past PART_TARGET
        // would hold twice the part in memory.
        let need = record_len(file);
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(PART_TARGET.max(need));
        } else if self.buf.capacity() - self.buf.len() < need {
            self.buf.reserve_exact(need);
        }
        encode_file(&mut self.buf, file);
        self.files.push((file.path.clone(), self.parts));
        if self.buf.len() >= PART_TARGET {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let content = std::mem::take(&mut self.buf);
        let (stored, mut buf) = self
            .repo
            .put_part(part_key(&self.id, self.parts), content)
            .await?;
        // The next part fills the same buffer.
        buf.clear();
        self.buf = buf;
        self.stored += stored;
        self.parts += 1;
        Ok(())
    }

    /// Stores the last part and the index, both at once (nothing reads a block map before its
    /// backup is published); returns the bytes stored for the whole map.
    pub async fn finish(&mut self) -> Result<u64> {
        let last = std::mem::take(&mut self.buf);
        let last_part = (!last.is_empty()).then_some(self.parts);
        let index = Index {
            version: INDEX_VERSION,
            hash: HASH_NAME.into(),
            block_size: 8192,
            parts: self.parts + u32::from(last_part.is_some()),
            files: std::mem::take(&mut self.files),
        };
        let json = serde_json::to_vec(&index).expect("block map index serializes");
        let last = async {
            match last_part {
                Some(n) => Ok(self.repo.put_part(part_key(&self.id, n), last).await?.0),
                None => Ok(0),
            }
        };
        let (last, index) = tokio::try_join!(last, self.repo.put_part(index_key(&self.id), json))?;
        Ok(self.stored + last + index.0)
    }
}

/// A stored block map, read part by part as files are looked up.
pub struct BlockMap {
    repo: Repository,
    id: String,
    parts: u32,
    files: HashMap<String, u32>,
    /// Most recently used last.
    cache: Vec<(u32, HashMap<String, Arc<FileBlocks>>)>,
}

impl BlockMap {
    /// Whether the map has an entry for `path`.
    pub fn contains(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    /// Files in the map.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The paths of the map's files, in no particular order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// The blocks of `path`, `None` when the map has no such file.
    pub async fn get(&mut self, path: &str) -> Result<Option<Arc<FileBlocks>>> {
        let Some(&part) = self.files.get(path) else {
            return Ok(None);
        };
        if let Some(i) = self.cache.iter().position(|(p, _)| *p == part) {
            let entry = self.cache.remove(i);
            self.cache.push(entry);
        } else {
            // The least recently used part goes before the next is read and decoded: after,
            // three decoded parts and a stored one would be held at once.
            if self.cache.len() >= CACHED_PARTS {
                self.cache.remove(0);
            }
            let decoded = self.load(part).await?;
            self.cache.push((part, decoded));
        }
        let (_, files) = self.cache.last().expect("just cached");
        Ok(files.get(path).cloned())
    }

    async fn load(&self, part: u32) -> Result<HashMap<String, Arc<FileBlocks>>> {
        let key = part_key(&self.id, part);
        if part >= self.parts {
            return Err(RepoError::BadDescriptor {
                key,
                message: format!("the index has {} parts", self.parts),
            });
        }
        let raw = self.repo.get_verified(&key).await?;
        decode_part(&raw).map_err(|message| RepoError::BadDescriptor { key, message })
    }
}

/// Bytes [`encode_file`] appends for `f`.
fn record_len(f: &FileBlocks) -> usize {
    4 + f.path.len() + 8 + 4 + 16 * f.hashes.len()
}

/// Record: path length (u32 LE), path (UTF-8), size (u64 LE), block count (u32 LE), then one
/// 16-byte little-endian hash per block.
fn encode_file(out: &mut Vec<u8>, f: &FileBlocks) {
    out.extend_from_slice(&(f.path.len() as u32).to_le_bytes());
    out.extend_from_slice(f.path.as_bytes());
    out.extend_from_slice(&f.size.to_le_bytes());
    out.extend_from_slice(&(f.hashes.len() as u32).to_le_bytes());
    for h in &f.hashes {
        out.extend_from_slice(&h.to_le_bytes());
    }
}

fn decode_part(mut raw: &[u8]) -> std::result::Result<HashMap<String, Arc<FileBlocks>>, String> {
    fn take<'a>(raw: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], String> {
        if raw.len() < n {
            return Err("truncated record".into());
        }
        let (head, rest) = raw.split_at(n);
        *raw = rest;
        Ok(head)
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let mut out = HashMap::new();
    while !raw.is_empty() {
        let len = u32_at(take(&mut raw, 4)?) as usize;
        let path = String::from_utf8(take(&mut raw, len)?.to_vec()).map_err(|e| e.to_string())?;
        let size = u64::from_le_bytes(take(&mut raw, 8)?.try_into().expect("8 bytes"));
        let count = u32_at(take(&mut raw, 4)?) as usize;
        let hashes = take(&mut raw, count.checked_mul(16).ok_or("bad count")?)?
            .chunks_exact(16)
            .map(|h| u128::from_le_bytes(h.try_into().expect("16 bytes")))
            .collect();
        let f = FileBlocks { path, size, hashes };
        out.insert(f.path.clone(), Arc::new(f));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, blocks: u128) -> FileBlocks {
        FileBlocks {
            path: path.into(),
            size: blocks as u64 * 8192,
            hashes: (0..blocks).map(|b| b * 7 + 1).collect(),
        }
    }

    #[test]
    fn parts_round_trip() {
        let mut buf = vec![];
        let (a, b) = (file("base/5/16384", 3), file("global/1262", 0));
        encode_file(&mut buf, &a);
        assert_eq!(buf.len(), record_len(&a));
        encode_file(&mut buf, &b);
        assert_eq!(buf.len(), record_len(&a) + record_len(&b));
        let decoded = decode_part(&buf).unwrap();
        assert_eq!(*decoded["base/5/16384"], a);
        assert_eq!(*decoded["global/1262"], b);
        assert!(decode_part(&buf[..buf.len() - 1]).is_err());
    }

    #[test]
    fn hashes_tell_blocks_apart() {
        let mut block = vec![0u8; 8192];
        let h0 = block_hash(&block);
        block[8191] = 1;
        assert_ne!(h0, block_hash(&block));
        assert_eq!(h0, block_hash(&[0u8; 8192]));
    }
}

//! Block-level incremental backups, computed by pitr on any PostgreSQL version: the server
//! sends the full backup, and each relation file whose parent has a block map entry is stored as
//! `INCREMENTAL.<name>` in PostgreSQL's incremental format (only the blocks whose hash differs),
//! other files whole. Every backup (full ones too) records the hashes of its relation files'
//! blocks in its block map, which the next incremental compares against.
//!
//! The tar stream is split here by its 512-byte headers, so entries that are not rewritten pass
//! through byte for byte. Memory stays bounded: a file's changed blocks are kept in memory up to
//! [`SPILL_AT`], then in an unnamed temporary file (a 1 GiB relation segment at most).

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use crate::format::incremental::{self, IncrementalHeader, BLCKSZ};
use crate::repo::{block_hash, BlockHash, BlockMap, BlockMapWriter, FileBlocks, RepoError};

/// Changed blocks of one file kept in memory before they go to a temporary file. Small: the
/// blocks are copied once more into the part being filled, and a backup's whole budget is
/// 64 MiB (a temporary file costs page cache, not process memory).
pub const SPILL_AT: usize = 4 << 20;
/// Bytes of a spilled file handed out at once.
pub const DRAIN_CHUNK: usize = 1 << 20;
const TAR_BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("temporary file for changed blocks: {0}")]
    Spill(#[from] std::io::Error),
}

/// What the whole backup shares: the parent's map (for an incremental), the new map, counts.
pub struct BackupMaps {
    pub parent: Option<BlockMap>,
    pub writer: BlockMapWriter,
    pub files_whole: u64,
    pub files_incremental: u64,
    pub blocks_changed: u64,
    pub blocks_same: u64,
    /// Server mode: the server sent `INCREMENTAL.` entries itself and files it sent whole stay
    /// whole (its manifest lists them so); the map is carried forward from the parent's.
    pub server_mode: bool,
}

/// Whether a file name is a relation file: `<relfilenode>[_fsm|_vm|_init][.<segment>]`.
fn is_relation_name(name: &str) -> bool {
    let (base, seg) = match name.split_once('.') {
        Some((b, s)) => (b, Some(s)),
        None => (name, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let node = ["_fsm", "_vm", "_init"]
        .iter()
        .find_map(|f| base.strip_suffix(f))
        .unwrap_or(base);
    digits(node) && seg.is_none_or(digits)
}

/// Whether `path` (in its archive) is under a directory whose files are relations.
fn is_relation_path(path: &str, tablespace: bool) -> bool {
    let Some((dir, name)) = path.rsplit_once('/') else {
        return false;
    };
    let dir_ok = if tablespace {
        // `PG_<major>_<catversion>/<dboid>`
        dir.starts_with("PG_") && dir.matches('/').count() == 1
    } else {
        dir == "global" || (dir.starts_with("base/") && dir.matches('/').count() == 1)
    };
    dir_ok && is_relation_name(name)
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).collect();
    let s = std::str::from_utf8(&s).ok()?.trim();
    u64::from_str_radix(s, 8).ok()
}

fn set_checksum(h: &mut [u8; TAR_BLOCK]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&x| x as u64).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn pad_of(size: u64) -> u64 {
    (TAR_BLOCK as u64 - size % TAR_BLOCK as u64) % TAR_BLOCK as u64
}

/// A relation file being received.
struct RelFile {
    header: [u8; TAR_BLOCK],
    path: String,
    key: String,
    size: u64,
    done: u64,
    partial: Vec<u8>,
    hashes: Vec<BlockHash>,
    /// The parent's blocks; `None`: the file passes through whole.
    parent: Option<Arc<FileBlocks>>,
    changed: Vec<u32>,
    data: Vec<u8>,
    spill: Option<std::fs::File>,
    spill_at: usize,
}

enum State {
    Header(Vec<u8>),
    /// Bytes of the current entry (data and padding) still to pass through.
    Pass(u64),
    Rel(Box<RelFile>),
    /// Server mode: an `INCREMENTAL.` entry the server sent, passing through.
    ServerInc(Box<ServerInc>),
    /// After the end-of-archive blocks: everything passes through.
    Trailer,
}

/// One tar stream being rewritten.
pub struct TarDiff {
    /// `pg_tblspc/<oid>/` for a tablespace's archive, empty for `base.tar`.
    prefix: String,
    tablespace: bool,
    state: State,
    /// A spilled file's content still to be emitted, in [`DRAIN_CHUNK`] pieces.
    pending: Option<(std::fs::File, u64)>,
    /// [`SPILL_AT`], smaller in tests.
    spill_at: usize,
}

/// What [`TarDiff::feed`] did with its input.
#[derive(Debug)]
pub struct Fed {
    /// Bytes of the input used.
    pub used: usize,
    /// The input's bytes that pass through unchanged, after `out`'s.
    pub pass: std::ops::Range<usize>,
}

impl TarDiff {
    pub fn new(tablespace_oid: Option<u32>) -> TarDiff {
        TarDiff {
            prefix: tablespace_oid.map_or(String::new(), |o| format!("pg_tblspc/{o}/")),
            tablespace: tablespace_oid.is_some(),
            state: State::Header(Vec::with_capacity(TAR_BLOCK)),
            pending: None,
            spill_at: SPILL_AT,
        }
    }

    /// Rewrites a prefix of `data`: bytes it makes (headers, incremental entries) go to
    /// `out`, and bytes that pass through unchanged are not copied but named by
    /// [`Fed::pass`], which follows `out` in the stream. It stops after a run that passes
    /// through, and when a file's changed blocks were spilled it stops after that file:
    /// [`TarDiff::drain`] then hands them out. The rest of `data` is fed again.
    pub async fn feed(
        &mut self,
        data: &[u8],
        maps: &mut BackupMaps,
        out: &mut Vec<u8>,
    ) -> Result<Fed, DiffError> {
        let mut used = 0;
        while used < data.len() && self.pending.is_none() {
            let rest = &data[used..];
            let start = used;
            match &mut self.state {
                State::Trailer => used = data.len(),
                State::Pass(left) => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    used += n;
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::Header(Vec::with_capacity(TAR_BLOCK));
                    }
                }
                State::Header(h) => {
                    let n = (TAR_BLOCK - h.len()).min(rest.len());
                    h.extend_from_slice(&rest[..n]);
                    used += n;
                    if h.len() == TAR_BLOCK {
                        let h: [u8; TAR_BLOCK] = h.as_slice().try_into().expect("512 bytes");
                        self.state = self.on_header(h, maps, out).await?;
                    }
                    continue;
                }
                State::ServerInc(f) => {
                    let n = (f.size - f.done).min(rest.len() as u64) as usize;
                    f.take(&rest[..n])?;
                    used += n;
                    if f.done == f.size {
                        let pad = pad_of(f.size);
                        if let State::ServerInc(f) = std::mem::replace(&mut self.state, pass(pad)) {
                            f.finish(maps).await?;
                        }
                    }
                }
                State::Rel(f) => {
                    let n = (f.size - f.done).min(rest.len() as u64) as usize;
                    let whole = f.parent.is_none();
                    f.take(&rest[..n])?;
                    used += n;
                    if f.done == f.size {
                        let next = State::Header(Vec::with_capacity(TAR_BLOCK));
                        if let State::Rel(f) = std::mem::replace(&mut self.state, next) {
                            self.pending = f.finish(maps, out).await?;
                        }
                    }
                    if !whole {
                        continue;
                    }
                }
            }
            // Passed through: the caller stores `out`, then these bytes.
            return Ok(Fed {
                used,
                pass: start..used,
            });
        }
        Ok(Fed {
            used,
            pass: used..used,
        })
    }

    /// Whether the end-of-archive blocks have passed: no entry follows.
    pub fn at_end(&self) -> bool {
        matches!(self.state, State::Trailer)
    }

    /// The next piece of a spilled file's content, `None` when there is none left.
    pub fn drain(&mut self) -> Result<Option<Vec<u8>>, DiffError> {
        let Some((file, left)) = &mut self.pending else {
            return Ok(None);
        };
        let n = (*left).min(DRAIN_CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact(&mut buf)?;
        *left -= n as u64;
        if *left == 0 {
            self.pending = None;
        }
        Ok(Some(buf))
    }

    /// A complete 512-byte header: decides how the entry is stored.
    async fn on_header(
        &mut self,
        h: [u8; TAR_BLOCK],
        maps: &mut BackupMaps,
        out: &mut Vec<u8>,
    ) -> Result<State, DiffError> {
        if h.iter().all(|&b| b == 0) {
            out.extend_from_slice(&h);
            return Ok(State::Trailer);
        }
        let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let path = String::from_utf8_lossy(&h[..name_end]).into_owned();
        let regular = h[156] == b'0' || h[156] == 0;
        // Sizes above 8 GiB are base-256 (never a relation segment): pass through.
        let size = parse_octal(&h[124..136]);
        let ustar_prefix_empty = h[345] == 0;
        let eligible = regular
            && ustar_prefix_empty
            && size.is_some_and(|s| s > 0 && s % BLCKSZ as u64 == 0)
            && name_end + incremental::PREFIX.len() < 100
            && is_relation_path(&path, self.tablespace);
        if maps.server_mode && regular && ustar_prefix_empty {
            if let (Some(size), Some(target)) = (size, incremental::target_name(&path)) {
                if is_relation_path(&target, self.tablespace) {
                    out.extend_from_slice(&h);
                    maps.files_incremental += 1;
                    let key = format!("{}{target}", self.prefix);
                    let f = ServerInc::new(key, size);
                    return Ok(if size == 0 {
                        pass(0)
                    } else {
                        State::ServerInc(Box::new(f))
                    });
                }
            }
        }
        if !eligible {
            out.extend_from_slice(&h);
            let size = match size {
                Some(s) => s,
                None => base256(&h[124..136]),
            };
            return Ok(pass(size + pad_of(size)));
        }
        let size = size.expect("checked");
        let key = format!("{}{path}", self.prefix);
        let parent = match maps.parent.as_mut() {
            Some(m) if !maps.server_mode => m.get(&key).await?,
            _ => None,
        };
        if parent.is_none() {
            out.extend_from_slice(&h);
            maps.files_whole += 1;
        }
        Ok(State::Rel(Box::new(RelFile {
            header: h,
            path,
            key,
            size,
            done: 0,
            partial: Vec::with_capacity(BLCKSZ),
            hashes: Vec::with_capacity((size / BLCKSZ as u64) as usize),
            parent,
            changed: vec![],
            data: vec![],
            spill: None,
            spill_at: self.spill_at,
        })))
    }
}

fn pass(n: u64) -> State {
    if n == 0 {
        State::Header(Vec::with_capacity(TAR_BLOCK))
    } else {
        State::Pass(n)
    }
}

fn base256(field: &[u8]) -> u64 {
    field[1..].iter().fold((field[0] & 0x7f) as u64, |v, &b| {
        v.wrapping_mul(256) + b as u64
    })
}

/// An `INCREMENTAL.` entry the server sent: its carried blocks are hashed as they pass.
struct ServerInc {
    key: String,
    size: u64,
    done: u64,
    head: Vec<u8>,
    header: Option<IncrementalHeader>,
    partial: Vec<u8>,
    carried: Vec<BlockHash>,
}

impl ServerInc {
    fn new(key: String, size: u64) -> ServerInc {
        ServerInc {
            key,
            size,
            done: 0,
            head: vec![],
            header: None,
            partial: Vec::with_capacity(BLCKSZ),
            carried: vec![],
        }
    }

    fn take(&mut self, mut bytes: &[u8]) -> Result<(), DiffError> {
        self.done += bytes.len() as u64;
        while self.header.is_none() && !bytes.is_empty() {
            let need = IncrementalHeader::needed(&self.head).map_err(bad_entry)?;
            let n = (need - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if let Some((h, _)) = IncrementalHeader::parse(&self.head).map_err(bad_entry)? {
                self.header = Some(h);
                self.head = vec![];
            }
        }
        while !bytes.is_empty() {
            let n = (BLCKSZ - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.partial.len() == BLCKSZ {
                self.carried.push(block_hash(&self.partial));
                self.partial.clear();
            }
        }
        Ok(())
    }

    /// The final file's hashes: carried blocks, else the parent's below the truncation
    /// length, else zeros (a block no backup supplies reads as zeros).
    async fn finish(self, maps: &mut BackupMaps) -> Result<(), DiffError> {
        let h = self
            .header
            .ok_or_else(|| bad_entry("the entry ends in its header"))?;
        if self.carried.len() != h.blocks.len() || !self.partial.is_empty() {
            return Err(bad_entry(
                "the entry's length does not match its block count",
            ));
        }
        let parent = match maps.parent.as_mut() {
            Some(m) => m.get(&self.key).await?,
            None => None,
        };
        let zero = block_hash(&[0u8; BLCKSZ]);
        let len = h.reconstructed_blocks() as usize;
        let mut hashes: Vec<BlockHash> = (0..len)
            .map(|b| match &parent {
                Some(p) if (b as u32) < h.truncation_block_length => {
                    p.hashes.get(b).copied().unwrap_or(zero)
                }
                _ => zero,
            })
            .collect();
        for (b, hash) in h.blocks.iter().zip(&self.carried) {
            hashes[*b as usize] = *hash;
        }
        maps.blocks_changed += h.blocks.len() as u64;
        maps.blocks_same += (len - h.blocks.len()) as u64;
        let size = (len * BLCKSZ) as u64;
        maps.writer
            .add(&FileBlocks {
                path: self.key,
                size,
                hashes,
            })
            .await?;
        Ok(())
    }
}

fn bad_entry(e: impl std::fmt::Display) -> DiffError {
    DiffError::Spill(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("an INCREMENTAL entry from the server: {e}"),
    ))
}

impl RelFile {
    /// Takes the file's next bytes: whole files pass through, every block is hashed, blocks
    /// that differ from the parent's are kept.
    fn take(&mut self, mut bytes: &[u8]) -> Result<(), DiffError> {
        self.done += bytes.len() as u64;
        // Whole blocks are hashed where they are; only a block split between two reads is
        // gathered in `partial`.
        while self.partial.is_empty() && bytes.len() >= BLCKSZ {
            let (block, rest) = bytes.split_at(BLCKSZ);
            self.block(block)?;
            bytes = rest;
        }
        while !bytes.is_empty() {
            let n = (BLCKSZ - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.partial.len() == BLCKSZ {
                let block = std::mem::take(&mut self.partial);
                self.block(&block)?;
                self.partial = block;
                self.partial.clear();
            }
        }
        Ok(())
    }

    fn block(&mut self, block: &[u8]) -> Result<(), DiffError> {
        let n = self.hashes.len();
        let h = block_hash(block);
        self.hashes.push(h);
        let Some(parent) = &self.parent else {
            return Ok(());
        };
        if parent.hashes.get(n) == Some(&h) {
            return Ok(());
        }
        self.changed.push(n as u32);
        if let Some(f) = &mut self.spill {
            f.write_all(block)?;
        } else {
            self.data.extend_from_slice(block);
            if self.data.len() >= self.spill_at {
                let mut f = tempfile::tempfile()?;
                f.write_all(&std::mem::take(&mut self.data))?;
                self.spill = Some(f);
            }
        }
        Ok(())
    }

    /// The whole file is in: records its blocks in the map and writes its entry, unless it
    /// passed through. Returns a spilled file's content still to emit.
    async fn finish(
        mut self,
        maps: &mut BackupMaps,
        out: &mut Vec<u8>,
    ) -> Result<Option<(std::fs::File, u64)>, DiffError> {
        let blocks = FileBlocks {
            path: self.key.clone(),
            size: self.size,
            hashes: std::mem::take(&mut self.hashes),
        };
        maps.writer.add(&blocks).await?;
        if self.parent.is_none() {
            return Ok(None);
        }
        let nblocks = blocks.hashes.len() as u64;
        let changed = self.changed.len() as u64;
        maps.blocks_changed += changed;
        maps.blocks_same += nblocks - changed;
        maps.files_incremental += 1;
        let inc = IncrementalHeader {
            truncation_block_length: nblocks as u32,
            blocks: std::mem::take(&mut self.changed),
        };
        let len = inc.encoded_len();
        let mut h = self.header;
        let name = incremental::incremental_name(&self.path);
        h[..100].fill(0);
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[124..136].copy_from_slice(format!("{len:011o}\0").as_bytes());
        set_checksum(&mut h);
        out.extend_from_slice(&h);
        inc.write_header(out)?;
        let pad = vec![0u8; pad_of(len) as usize];
        match self.spill {
            None => {
                out.extend_from_slice(&self.data);
                out.extend_from_slice(&pad);
                Ok(None)
            }
            Some(mut f) => {
                f.write_all(&pad)?;
                let total = f.stream_position()?;
                f.seek(SeekFrom::Start(0))?;
                Ok(Some((f, total)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_names() {
        for ok in ["16384", "16384_fsm", "16384_vm.1", "1259.12", "16384_init"] {
            assert!(is_relation_name(ok), "{ok}");
        }
        for bad in [
            "pg_internal.init",
            "t3_16384",
            "PG_VERSION",
            "16384.",
            "_fsm",
            "1.2.3",
        ] {
            assert!(!is_relation_name(bad), "{bad}");
        }
        assert!(is_relation_path("base/5/16384", false));
        assert!(is_relation_path("global/1262", false));
        assert!(!is_relation_path("base/5/sub/16384", false));
        assert!(!is_relation_path("pg_xact/0000", false));
        assert!(is_relation_path("PG_15_202209061/5/16384", true));
        assert!(!is_relation_path("16384", true));
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use crate::format::tar::build::{file, END};
    use crate::format::tar::{TarEvent, TarReader};
    use crate::repo::{ClusterIdentity, Repository, WriteOptions};
    use crate::storage::Storage;

    async fn repo() -> Repository {
        let cluster = ClusterIdentity {
            system_identifier: 7,
            pg_major: 15,
            wal_segment_size: 16 << 20,
        };
        Repository::open_for_cluster(Storage::in_memory(), &cluster, "t", WriteOptions::default())
            .await
            .unwrap()
    }

    fn blocks(fill: &[u8]) -> Vec<u8> {
        fill.iter().flat_map(|&b| vec![b; BLCKSZ]).collect()
    }

    fn archive(rel: &[u8]) -> Vec<u8> {
        let mut a = file("PG_VERSION", b"15\n");
        a.extend(file("base/5/16384", rel));
        a.extend(file("base/5/pg_filenode.map", &[1; 512]));
        a.extend_from_slice(&END);
        a
    }

    /// Feeds `input` in small pieces, as the server's CopyData messages come.
    async fn run(input: &[u8], maps: &mut BackupMaps) -> Vec<u8> {
        run_spilling(input, maps, SPILL_AT).await
    }

    async fn run_spilling(input: &[u8], maps: &mut BackupMaps, spill_at: usize) -> Vec<u8> {
        run_pieces(input, maps, spill_at, 1000).await
    }

    async fn run_pieces(
        input: &[u8],
        maps: &mut BackupMaps,
        spill_at: usize,
        piece: usize,
    ) -> Vec<u8> {
        let mut diff = TarDiff::new(None);
        diff.spill_at = spill_at;
        let mut out = vec![];
        for chunk in input.chunks(piece) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let fed = diff.feed(rest, maps, &mut out).await.unwrap();
                out.extend_from_slice(&rest[fed.pass]);
                rest = &rest[fed.used..];
                while let Some(p) = diff.drain().unwrap() {
                    out.extend(p);
                }
            }
        }
        assert!(
            diff.at_end(),
            "every test archive ends with its end-of-archive blocks"
        );
        out
    }

    fn maps(repo: &Repository, id: &str, parent: Option<BlockMap>) -> BackupMaps {
        BackupMaps {
            parent,
            writer: repo.put_block_map(id),
            files_whole: 0,
            files_incremental: 0,
            blocks_changed: 0,
            blocks_same: 0,
            server_mode: false,
        }
    }

    #[tokio::test]
    async fn a_full_passes_through_and_an_incremental_keeps_changed_blocks() {
        let repo = repo().await;
        let full = archive(&blocks(b"abcd"));
        let mut m = maps(&repo, "full", None);
        assert_eq!(run(&full, &mut m).await, full);
        m.writer.finish().await.unwrap();

        // Block 1 changes, block 4 is new.
        let parent = repo.block_map("full").await.unwrap();
        let mut m = maps(&repo, "inc", parent);
        let out = run(&archive(&blocks(b"aXcdY")), &mut m).await;
        assert_eq!(
            (m.blocks_changed, m.blocks_same, m.files_incremental),
            (2, 3, 1)
        );
        m.writer.finish().await.unwrap();

        let mut entries: Vec<(String, Vec<u8>)> = vec![];
        let mut reader = TarReader::new();
        reader
            .feed::<crate::format::tar::TarError>(&out, &mut |ev| {
                match ev {
                    TarEvent::Entry(h) => entries.push((h.path, vec![])),
                    TarEvent::Data(d) => entries.last_mut().unwrap().1.extend_from_slice(d),
                    TarEvent::EntryEnd => {}
                }
                Ok(())
            })
            .unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "PG_VERSION",
                "base/5/INCREMENTAL.16384",
                "base/5/pg_filenode.map"
            ]
        );
        let inc = &entries[1].1;
        let (h, len) = IncrementalHeader::parse(inc).unwrap().unwrap();
        assert_eq!(h.truncation_block_length, 5);
        assert_eq!(h.blocks, [1, 4]);
        assert_eq!(&inc[len..], blocks(b"XY"));
        // The new map describes the final file.
        let mut map = repo.block_map("inc").await.unwrap().unwrap();
        let f = map.get("base/5/16384").await.unwrap().unwrap();
        assert_eq!(f.hashes[1], block_hash(&[b'X'; BLCKSZ]));
        assert_eq!(f.hashes.len(), 5);
    }

    #[tokio::test]
    async fn spilled_blocks_come_out_in_place() {
        let repo = repo().await;
        let mut m = maps(&repo, "full", None);
        run(&archive(&blocks(b"abcdefgh")), &mut m).await;
        m.writer.finish().await.unwrap();
        let changed = archive(&blocks(b"aXcXeXgXZ"));
        let mut m = maps(&repo, "a", repo.block_map("full").await.unwrap());
        let in_memory = run(&changed, &mut m).await;
        let mut m = maps(&repo, "b", repo.block_map("full").await.unwrap());
        let spilled = run_spilling(&changed, &mut m, 2 * BLCKSZ).await;
        assert_eq!(m.blocks_changed, 5);
        assert_eq!(in_memory, spilled);
    }

    /// Blocks are hashed in place when a read holds them whole, gathered when split: the
    /// output and the block map are the same whatever the reads' sizes.
    #[tokio::test]
    async fn any_read_size_gives_the_same_output_and_map() {
        let repo = repo().await;
        let mut m = maps(&repo, "full", None);
        run(&archive(&blocks(b"abcdefgh")), &mut m).await;
        m.writer.finish().await.unwrap();
        let changed = archive(&blocks(b"aXcXeXgXZ"));
        let mut m = maps(&repo, "ref", repo.block_map("full").await.unwrap());
        let reference = run(&changed, &mut m).await;
        m.writer.finish().await.unwrap();
        let want = repo
            .block_map("ref")
            .await
            .unwrap()
            .unwrap()
            .get("base/5/16384")
            .await;
        let want = want.unwrap().unwrap().hashes.clone();
        for (i, piece) in [BLCKSZ, 3 * BLCKSZ + 512, 7777, changed.len()]
            .into_iter()
            .enumerate()
        {
            let id = format!("p{i}");
            let mut m = maps(&repo, &id, repo.block_map("full").await.unwrap());
            let out = run_pieces(&changed, &mut m, 2 * BLCKSZ, piece).await;
            assert_eq!(out, reference, "pieces of {piece}");
            assert_eq!(
                (m.blocks_changed, m.blocks_same),
                (5, 4),
                "pieces of {piece}"
            );
            m.writer.finish().await.unwrap();
            let mut map = repo.block_map(&id).await.unwrap().unwrap();
            assert_eq!(map.get("base/5/16384").await.unwrap().unwrap().hashes, want);
            // A full backup passes every byte through unchanged.
            let whole = archive(&blocks(b"abcdefgh"));
            let mut m = maps(&repo, &format!("f{i}"), None);
            assert_eq!(run_pieces(&whole, &mut m, SPILL_AT, piece).await, whole);
        }
    }
}

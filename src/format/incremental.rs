//! PostgreSQL's incremental file format: the `INCREMENTAL.<name>` files that
//! `BASE_BACKUP (INCREMENTAL)` sends on PostgreSQL 17+ (`sendFile()` in
//! src/backend/backup/basebackup.c, read back by src/bin/pg_combinebackup/reconstruct.c), and
//! that pitr's block-level incremental backups write itself, so restore has one algorithm.
//!
//! Layout, all integers little-endian `u32` (the server's byte order; pitr only supports
//! little-endian servers' backups here, as every supported platform is):
//! magic `0xd3ae1f0d`, block count `n`, truncation block length, `n` block numbers relative to
//! the file, then zero padding up to a multiple of BLCKSZ when `n > 0` (so the blocks that
//! follow are aligned; no padding when `n == 0`), then the `n` blocks of BLCKSZ bytes in the
//! order of the block numbers. The truncation block length is the file's length in blocks at
//! the backup: blocks at or above it are not taken from older backups. The reconstructed file
//! is `max(truncation, max(block)+1)` blocks long. Pure code: no I/O beyond `Write`.

use std::io::Write;

/// PostgreSQL's block size (BLCKSZ), which incremental files are made of.
pub const BLCKSZ: usize = 8192;
/// `INCREMENTAL_MAGIC` in PostgreSQL's basebackup_incremental.h.
pub const MAGIC: u32 = 0xd3ae_1f0d;
/// RELSEG_SIZE (1 GiB of 8 KiB blocks): no relation segment file has more blocks.
pub const MAX_BLOCKS: u32 = 131_072;
/// The prefix of an incremental file's name.
pub const PREFIX: &str = "INCREMENTAL.";
/// The fixed part of the header: magic, block count, truncation block length.
const FIXED: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IncrementalError {
    #[error("bad magic number 0x{0:08x} (not an incremental file)")]
    BadMagic(u32),
    #[error("{count} blocks, truncation length {truncation}: more than a segment's {MAX_BLOCKS}")]
    TooLarge { count: u32, truncation: u32 },
    #[error("block number {0} is not below the segment size {MAX_BLOCKS}")]
    BadBlock(u32),
}

/// The header of an incremental file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncrementalHeader {
    /// The file's length in blocks at the backup: older backups supply only blocks below it.
    pub truncation_block_length: u32,
    /// The blocks this file carries, in the order their contents follow the header.
    pub blocks: Vec<u32>,
}

/// Header bytes (padding included) of an incremental file carrying `count` blocks.
pub fn header_len(count: usize) -> usize {
    let raw = FIXED + 4 * count;
    if count > 0 {
        raw.next_multiple_of(BLCKSZ)
    } else {
        raw
    }
}

impl IncrementalHeader {
    /// Bytes of the header, padding included.
    pub fn header_len(&self) -> usize {
        header_len(self.blocks.len())
    }

    /// Bytes of the whole incremental file: header and blocks.
    pub fn encoded_len(&self) -> u64 {
        self.header_len() as u64 + (self.blocks.len() * BLCKSZ) as u64
    }

    /// The reconstructed file's length in blocks (`find_reconstructed_block_length()`).
    pub fn reconstructed_blocks(&self) -> u32 {
        let top = self.blocks.iter().map(|&b| b + 1).max().unwrap_or(0);
        top.max(self.truncation_block_length)
    }

    /// Writes the header, padding included; the caller writes the blocks after it.
    pub fn write_header<W: Write>(&self, out: &mut W) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(self.header_len());
        for w in [
            MAGIC,
            self.blocks.len() as u32,
            self.truncation_block_length,
        ] {
            buf.extend_from_slice(&w.to_le_bytes());
        }
        for b in &self.blocks {
            buf.extend_from_slice(&b.to_le_bytes());
        }
        buf.resize(self.header_len(), 0);
        out.write_all(&buf)
    }

    /// Parses the header at the start of `head` (an entry's first bytes). `Ok(None)`: more
    /// bytes are needed, at least [`IncrementalHeader::needed`] of them; `Ok(Some((h, len)))`:
    /// the header and its length with padding (the blocks start at `len`).
    pub fn parse(head: &[u8]) -> Result<Option<(IncrementalHeader, usize)>, IncrementalError> {
        let need = Self::needed(head)?;
        if head.len() < need {
            return Ok(None);
        }
        let count = word(head, 1) as usize;
        let blocks: Vec<u32> = (0..count).map(|i| word(head, 3 + i)).collect();
        if let Some(&b) = blocks.iter().find(|&&b| b >= MAX_BLOCKS) {
            return Err(IncrementalError::BadBlock(b));
        }
        let h = IncrementalHeader {
            truncation_block_length: word(head, 2),
            blocks,
        };
        Ok(Some((h, need)))
    }

    /// How many bytes the header at the start of `head` takes, as far as `head` tells: 12 until
    /// the block count is known.
    pub fn needed(head: &[u8]) -> Result<usize, IncrementalError> {
        if head.len() < FIXED {
            return Ok(FIXED);
        }
        let (magic, count, truncation) = (word(head, 0), word(head, 1), word(head, 2));
        if magic != MAGIC {
            return Err(IncrementalError::BadMagic(magic));
        }
        if count > MAX_BLOCKS || truncation > MAX_BLOCKS {
            return Err(IncrementalError::TooLarge { count, truncation });
        }
        Ok(header_len(count as usize))
    }
}

fn word(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes"))
}

/// Whether `path`'s file name starts with `INCREMENTAL.`.
pub fn is_incremental_name(path: &str) -> bool {
    target_name(path).is_some()
}

/// The file an `INCREMENTAL.<name>` entry reconstructs (`dir/INCREMENTAL.x` → `dir/x`), or
/// `None` for a whole file.
pub fn target_name(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, path),
    };
    let target = name.strip_prefix(PREFIX).filter(|t| !t.is_empty())?;
    Some(match dir {
        Some(dir) => format!("{dir}/{target}"),
        None => target.to_string(),
    })
}

/// The name of the incremental entry standing for `path` (`dir/x` → `dir/INCREMENTAL.x`).
pub fn incremental_name(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{PREFIX}{name}"),
        None => format!("{PREFIX}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(incremental_name("base/1/16384"), "base/1/INCREMENTAL.16384");
        assert_eq!(
            target_name("base/1/INCREMENTAL.16384").unwrap(),
            "base/1/16384"
        );
        assert_eq!(target_name("INCREMENTAL.x").unwrap(), "x");
        assert_eq!(target_name("base/1/16384"), None);
        assert_eq!(target_name("base/INCREMENTAL./x"), None);
        assert!(!is_incremental_name("base/1/INCREMENTAL."));
        assert!(is_incremental_name("global/INCREMENTAL.1262"));
    }

    #[test]
    fn header_is_padded_to_a_block_only_when_blocks_follow() {
        let empty = IncrementalHeader {
            truncation_block_length: 7,
            blocks: vec![],
        };
        assert_eq!(empty.header_len(), 12);
        assert_eq!(empty.encoded_len(), 12);
        let two = IncrementalHeader {
            truncation_block_length: 3,
            blocks: vec![5, 1],
        };
        assert_eq!(two.header_len(), BLCKSZ);
        assert_eq!(two.encoded_len(), 3 * BLCKSZ as u64);
        assert_eq!(two.reconstructed_blocks(), 6);
        // 2045 block numbers still fit one block; 2046 need a second.
        assert_eq!(header_len(2045), BLCKSZ);
        assert_eq!(header_len(2046), 2 * BLCKSZ);
    }

    #[test]
    fn write_then_parse() {
        let h = IncrementalHeader {
            truncation_block_length: 9,
            blocks: vec![0, 8, 3],
        };
        let mut buf = vec![];
        h.write_header(&mut buf).unwrap();
        assert_eq!(buf.len(), h.header_len());
        assert_eq!(&buf[..4], &MAGIC.to_le_bytes());
        assert_eq!(IncrementalHeader::parse(&buf[..11]).unwrap(), None);
        assert_eq!(IncrementalHeader::parse(&buf[..100]).unwrap(), None);
        assert_eq!(IncrementalHeader::parse(&buf).unwrap(), Some((h, BLCKSZ)));
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut buf = vec![0u8; 12];
        assert_eq!(
            IncrementalHeader::parse(&buf),
            Err(IncrementalError::BadMagic(0))
        );
        buf[..4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[4..8].copy_from_slice(&(MAX_BLOCKS + 1).to_le_bytes());
        assert!(matches!(
            IncrementalHeader::parse(&buf),
            Err(IncrementalError::TooLarge { .. })
        ));
    }
}

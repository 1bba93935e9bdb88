//! WAL record layout: the fixed `XLogRecord` header, the block-reference / main-data headers that
//! follow it (xlogrecord.h), and [`Record`], one validated record as the reader hands it out.
//!
//! Layout of a record (all little-endian, nothing aligned after the header):
//! `XLogRecord` (24 bytes) · zero or more `XLogRecordBlockHeader`s · optional origin / toplevel-xid
//! fragments · `XLogRecordDataHeader{Short,Long}` · block images and data · main data.
//! The header itself has been the same in PostgreSQL 13 to 18.

use std::ops::Range;

use super::Lsn;

/// `SizeOfXLogRecord`: `xl_tot_len u32 @0, xl_xid u32 @4, xl_prev u64 @8, xl_info u8 @16,
/// xl_rmid u8 @17, 2 bytes padding, xl_crc u32 @20`.
pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// `offsetof(XLogRecord, xl_crc)`: the CRC covers the header up to here.
pub const XL_CRC_OFFSET: usize = 20;
/// `XLogRecordMaxSize` (PostgreSQL 16+, 1020 MiB). Older versions were bounded by palloc's 1 GiB
/// limit in practice; the smaller figure is what a sane writer stays under, and it keeps a
/// corrupt length from making us wait for (or allocate) a gigabyte.
pub const XLOG_RECORD_MAX_SIZE: u32 = 1020 * 1024 * 1024;
/// `MAXIMUM_ALIGNOF` on every platform we support: records start on 8-byte boundaries.
pub const MAXIMUM_ALIGNOF: u64 = 8;

/// `MAXALIGN`.
pub const fn maxalign(n: u64) -> u64 {
    (n + MAXIMUM_ALIGNOF - 1) & !(MAXIMUM_ALIGNOF - 1)
}

/// The rmgr-owned bits of `xl_info` (`XLR_RMGR_INFO_MASK`); the low four are the WAL machinery's.
pub const XLR_RMGR_INFO_MASK: u8 = 0xF0;

// Resource manager ids (rmgrlist.h). Only the ones we decode or name.
pub const RM_XLOG_ID: u8 = 0;
pub const RM_XACT_ID: u8 = 1;
/// `RM_MAX_BUILTIN_ID` (RM_LOGICALMSG_ID) in 13-18.
pub const RM_MAX_BUILTIN_ID: u8 = 21;
/// PostgreSQL 15+ reserves 128-255 for custom resource managers (`RM_MIN_CUSTOM_ID`).
pub const RM_MIN_CUSTOM_ID: u8 = 128;

/// Names pg_waldump prints for the built-in resource managers, indexed by rmid.
pub const RMGR_NAMES: [&str; 22] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// pg_waldump's name for a built-in resource manager id; `None` for custom (128-255) and unknown.
pub fn rmgr_name(rmid: u8) -> Option<&'static str> {
    RMGR_NAMES.get(rmid as usize).copied()
}

/// `RmgrIdIsValid`: built-in ids, plus the custom range from 15 on.
pub fn rmgr_id_is_valid(rmid: u8, major: u32) -> bool {
    rmid <= RM_MAX_BUILTIN_ID || (major >= 15 && rmid >= RM_MIN_CUSTOM_ID)
}

// Block ids that are not block references (xlogrecord.h).
pub const XLR_MAX_BLOCK_ID: u8 = 32;
pub const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
pub const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
pub const XLR_BLOCK_ID_ORIGIN: u8 = 253;
pub const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

// XLogRecordBlockHeader.fork_flags.
pub const BKPBLOCK_FORK_MASK: u8 = 0x0F;
pub const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
pub const BKPBLOCK_HAS_DATA: u8 = 0x20;
#[allow(dead_code)] // named for completeness; redo-only meaning
pub const BKPBLOCK_WILL_INIT: u8 = 0x40;
pub const BKPBLOCK_SAME_REL: u8 = 0x80;

// XLogRecordBlockImageHeader.bimg_info. The meaning of bits 0x02/0x04 changed in 15 when LZ4 and
// zstd image compression arrived, which is why image decoding needs the major version.
pub const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// 13-14: the image is pglz-compressed.
pub const BKPIMAGE_IS_COMPRESSED_PG13: u8 = 0x02;
/// 15+: any of BKPIMAGE_COMPRESS_PGLZ (0x04), _LZ4 (0x08), _ZSTD (0x10).
pub const BKPIMAGE_COMPRESSED_MASK_PG15: u8 = 0x04 | 0x08 | 0x10;
/// `BLCKSZ`: data page size; an uncompressed image without a hole is exactly this long.
pub const BLCKSZ: u16 = 8192;
/// `sizeof(RelFileNode)` / `sizeof(RelFileLocator)` (16+): spcOid, dbOid, relNumber.
const SIZE_OF_REL_FILE_LOCATOR: usize = 12;

/// The fixed header of a WAL record (`XLogRecord`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XLogRecord {
    pub xl_tot_len: u32,
    pub xl_xid: u32,
    pub xl_prev: Lsn,
    pub xl_info: u8,
    pub xl_rmid: u8,
    pub xl_crc: u32,
}

impl XLogRecord {
    /// Reads the header from the first [`SIZE_OF_XLOG_RECORD`] bytes; `None` if shorter.
    pub fn parse(b: &[u8]) -> Option<XLogRecord> {
        let h: &[u8; SIZE_OF_XLOG_RECORD] = b.get(..SIZE_OF_XLOG_RECORD)?.try_into().ok()?;
        Some(XLogRecord {
            xl_tot_len: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            xl_xid: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
            xl_prev: Lsn(u64::from_le_bytes([
                h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15],
            ])),
            xl_info: h[16],
            xl_rmid: h[17],
            xl_crc: u32::from_le_bytes([h[20], h[21], h[22], h[23]]),
        })
    }
}

/// CRC-32C of a whole record as `ValidXLogRecord` computes it: the bytes after the header first,
/// then the header up to (not including) `xl_crc`. `record` must be at least 24 bytes.
pub fn record_crc(record: &[u8]) -> u32 {
    record_crc_with(record, &mut CrcScratch::default())
}

/// Up to this many bytes (body + 20 header bytes) crc-fast sums with plain CRC32 instructions,
/// where a call costs about as much as its bytes.
const ONE_CALL: usize = 256;

/// Where [`record_crc_with`] lays out a small record in CRC order. Kept by the reader so that
/// it is not zeroed for every record; 8-byte aligned so crc-fast has no unaligned head to do
/// a byte at a time.
#[repr(align(8))]
pub(crate) struct CrcScratch([u8; ONE_CALL]);

impl Default for CrcScratch {
    fn default() -> CrcScratch {
        CrcScratch([0; ONE_CALL])
    }
}

/// [`record_crc`], the reader's way. This is most of the reader's work, so it uses crc-fast
/// (PCLMULQDQ folding, 2-3x the `crc32c` crate at every record size; already built for
/// object_store). Most records are small, and there a call costs more than the bytes: a small
/// record is copied into `scratch` in CRC order and summed in one call instead of two.
#[inline]
pub(crate) fn record_crc_with(record: &[u8], scratch: &mut CrcScratch) -> u32 {
    let (head, body) = record.split_at(SIZE_OF_XLOG_RECORD.min(record.len()));
    let head = &head[..XL_CRC_OFFSET.min(head.len())];
    let len = body.len() + head.len();
    if len <= ONE_CALL {
        // Word by word, not through memcpy: two library calls per record cost more than the
        // copying.
        let mut words = body.chunks_exact(8);
        let mut at = 0;
        for w in &mut words {
            scratch.0[at..at + 8].copy_from_slice(w);
            at += 8;
        }
        for &b in words.remainder() {
            scratch.0[at] = b;
            at += 1;
        }
        for (to, &b) in scratch.0[at..len].iter_mut().zip(head) {
            *to = b;
        }
        crc_fast::crc32_iscsi(&scratch.0[..len])
    } else {
        // 20 bytes after a long body: the `crc32c` crate continues a finished CRC cheaply.
        crc32c::crc32c_append(crc_fast::crc32_iscsi(body), head)
    }
}

/// What `DecodeXLogRecord` learns from the fragment headers; ranges index the whole record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DecodedBody {
    pub main_data: Range<usize>,
    pub block_count: u8,
    pub record_origin: Option<u16>,
    pub toplevel_xid: Option<u32>,
    /// Where the block data area starts (after all fragment headers).
    pub data_start: usize,
}

/// One block reference (`XLogRecordBlockHeader` and what follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef<'a> {
    pub block_id: u8,
    pub fork: u8,
    pub flags: u8,
    /// `(spcOid, dbOid, relNumber)`; repeated from the previous block when BKPBLOCK_SAME_REL.
    pub rel: (u32, u32, u32),
    pub blkno: u32,
    /// The full-page image bytes as stored (possibly compressed, hole removed).
    pub image: Option<&'a [u8]>,
    pub bimg_info: u8,
    pub hole_offset: u16,
    pub data: &'a [u8],
}

/// A small cursor over the fragment headers that fails instead of panicking on short input.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.at.checked_add(N)?;
        let s: [u8; N] = self.b.get(self.at..end)?.try_into().ok()?;
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take::<2>().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
}

/// Raw block header fields as parsed, before the data area is located.
#[derive(Clone, Copy)]
struct RawBlock {
    block_id: u8,
    fork_flags: u8,
    data_len: u16,
    bimg_len: u16,
    bimg_info: u8,
    hole_offset: u16,
    rel: (u32, u32, u32),
    blkno: u32,
}

/// Walks the fragment headers of `record` (whole record, header included). Calls `on_block` for
/// each block reference in order, so the same code serves validation (no callback work) and
/// [`Record::blocks`]. Mirrors the checks `DecodeXLogRecord` makes; returns what was wrong.
#[inline(always)]
fn walk_fragments(
    record: &[u8],
    major: u32,
    mut on_block: impl FnMut(&RawBlock),
) -> Result<DecodedBody, &'static str> {
    const SHORT: &str = "record is shorter than its fragment headers say";
    let mut c = Cursor {
        b: record,
        at: SIZE_OF_XLOG_RECORD,
    };
    let remaining_total = record.len().saturating_sub(SIZE_OF_XLOG_RECORD) as u64;
    let mut out = DecodedBody::default();
    let mut datatotal: u64 = 0;
    let mut main_len: u64 = 0;
    let mut max_block_id: i32 = -1;
    let mut last_rel: Option<(u32, u32, u32)> = None;
    while remaining_total - (c.at - SIZE_OF_XLOG_RECORD) as u64 > datatotal {
        let block_id = c.u8().ok_or(SHORT)?;
        match block_id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = c.u8().ok_or(SHORT)? as u64;
                datatotal += main_len;
                break; // main data is always the last fragment
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = c.u32().ok_or(SHORT)? as u64;
                datatotal += main_len;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => out.record_origin = Some(c.u16().ok_or(SHORT)?),
            XLR_BLOCK_ID_TOPLEVEL_XID => out.toplevel_xid = Some(c.u32().ok_or(SHORT)?),
            id if id <= XLR_MAX_BLOCK_ID => {
                if i32::from(id) <= max_block_id {
                    return Err("block ids out of order");
                }
                max_block_id = i32::from(id);
                let fork_flags = c.u8().ok_or(SHORT)?;
                let data_len = c.u16().ok_or(SHORT)?;
                let has_data = fork_flags & BKPBLOCK_HAS_DATA != 0;
                if has_data && data_len == 0 {
                    return Err("BKPBLOCK_HAS_DATA set, but no data included");
                }
                if !has_data && data_len != 0 {
                    return Err("BKPBLOCK_HAS_DATA not set, but data length is not zero");
                }
                datatotal += data_len as u64;
                let mut blk = RawBlock {
                    block_id: id,
                    fork_flags,
                    data_len,
                    bimg_len: 0,
                    bimg_info: 0,
                    hole_offset: 0,
                    rel: (0, 0, 0),
                    blkno: 0,
                };
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    blk.bimg_len = c.u16().ok_or(SHORT)?;
                    blk.hole_offset = c.u16().ok_or(SHORT)?;
                    blk.bimg_info = c.u8().ok_or(SHORT)?;
                    let compressed = if major >= 15 {
                        blk.bimg_info & BKPIMAGE_COMPRESSED_MASK_PG15 != 0
                    } else {
                        blk.bimg_info & BKPIMAGE_IS_COMPRESSED_PG13 != 0
                    };
                    let has_hole = blk.bimg_info & BKPIMAGE_HAS_HOLE != 0;
                    let hole_length = if compressed {
                        if has_hole {
                            c.u16().ok_or(SHORT)?
                        } else {
                            0
                        }
                    } else {
                        BLCKSZ.wrapping_sub(blk.bimg_len)
                    };
                    datatotal += blk.bimg_len as u64;
                    if has_hole
                        && (blk.hole_offset == 0 || hole_length == 0 || blk.bimg_len == BLCKSZ)
                    {
                        return Err("BKPIMAGE_HAS_HOLE set, but hole offset, hole length or image length is wrong");
                    }
                    if !has_hole && (blk.hole_offset != 0 || hole_length != 0) {
                        return Err(
                            "BKPIMAGE_HAS_HOLE not set, but hole offset or length is not zero",
                        );
                    }
                    if compressed && blk.bimg_len == BLCKSZ {
                        return Err("compressed block image is a whole page long");
                    }
                    if !has_hole && !compressed && blk.bimg_len != BLCKSZ {
                        return Err("uncompressed block image without a hole is not a whole page");
                    }
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    let r: [u8; SIZE_OF_REL_FILE_LOCATOR] = c.take().ok_or(SHORT)?;
                    let w = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
                    blk.rel = (w(0), w(4), w(8));
                    last_rel = Some(blk.rel);
                } else {
                    blk.rel = last_rel.ok_or("BKPBLOCK_SAME_REL set but no previous relation")?;
                }
                blk.blkno = c.u32().ok_or(SHORT)?;
                out.block_count += 1;
                on_block(&blk);
            }
            _ => return Err("invalid block id"),
        }
    }
    let consumed = (c.at - SIZE_OF_XLOG_RECORD) as u64;
    if remaining_total - consumed != datatotal {
        return Err("fragment lengths do not add up to xl_tot_len");
    }
    out.data_start = c.at;
    // Main data is the last thing in the record.
    out.main_data = record.len() - main_len as usize..record.len();
    Ok(out)
}

/// Validates the fragment headers and locates the main data.
#[inline(always)]
pub(crate) fn decode_body(record: &[u8], major: u32) -> Result<DecodedBody, &'static str> {
    walk_fragments(record, major, |_| {})
}

/// One WAL record that passed every check (page headers, `xl_prev` chain, CRC, fragment headers).
/// Borrows the reader's buffer: copy out what you need before asking for the next record.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// Where the record starts (`ReadRecPtr`).
    pub lsn: Lsn,
    /// Where the next record starts (`EndRecPtr`): the MAXALIGNed end of this one, or the start of
    /// the next segment after `XLOG_SWITCH`. Recovery that replays this record reaches this LSN.
    pub end_lsn: Lsn,
    pub xl_tot_len: u32,
    pub xl_xid: u32,
    pub xl_prev: Lsn,
    pub xl_info: u8,
    pub xl_rmid: u8,
    pub xl_crc: u32,
    /// The rmgr-specific main data (`XLogRecGetData`).
    pub main_data: &'a [u8],
    /// `XLR_BLOCK_ID_ORIGIN`: replication origin of the record, if any.
    pub record_origin: Option<u16>,
    /// `XLR_BLOCK_ID_TOPLEVEL_XID`: top-level xid when the record belongs to a subtransaction.
    pub toplevel_xid: Option<u32>,
    /// Number of block references.
    pub block_count: u8,
    /// PostgreSQL major version of the WAL (from the page magic).
    pub major: u32,
    /// The whole record, header included, reassembled if it crossed pages.
    pub raw: &'a [u8],
}

impl<'a> Record<'a> {
    /// `xl_info & XLR_RMGR_INFO_MASK`: the record type within its resource manager.
    pub fn rmgr_info(&self) -> u8 {
        self.xl_info & XLR_RMGR_INFO_MASK
    }

    /// The block references, decoded lazily so records nobody looks at cost nothing extra.
    pub fn blocks(&self) -> Vec<BlockRef<'a>> {
        let mut raw = Vec::with_capacity(self.block_count as usize);
        let Ok(body) = walk_fragments(self.raw, self.major, |b| raw.push(*b)) else {
            return Vec::new(); // cannot happen: the reader validated the same bytes
        };
        let mut at = body.data_start;
        let mut out = Vec::with_capacity(raw.len());
        for b in raw {
            let mut take = |n: usize| {
                let s = self.raw.get(at..at + n).unwrap_or(&[]);
                at += n;
                s
            };
            let image = (b.fork_flags & BKPBLOCK_HAS_IMAGE != 0).then(|| take(b.bimg_len as usize));
            let data = take(b.data_len as usize);
            out.push(BlockRef {
                block_id: b.block_id,
                fork: b.fork_flags & BKPBLOCK_FORK_MASK,
                flags: b.fork_flags & !BKPBLOCK_FORK_MASK,
                rel: b.rel,
                blkno: b.blkno,
                image,
                bimg_info: b.bimg_info,
                hole_offset: b.hole_offset,
                data,
            });
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a record: header with a correct CRC, then `fragments` (already encoded fragment
    /// headers and data, in the order they appear after the header).
    pub(crate) fn build_record(rmid: u8, info: u8, xid: u32, prev: Lsn, body: &[u8]) -> Vec<u8> {
        let tot = (SIZE_OF_XLOG_RECORD + body.len()) as u32;
        let mut r = Vec::with_capacity(tot as usize);
        r.extend_from_slice(&tot.to_le_bytes());
        r.extend_from_slice(&xid.to_le_bytes());
        r.extend_from_slice(&prev.0.to_le_bytes());
        r.push(info);
        r.push(rmid);
        r.extend_from_slice(&[0, 0]);
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(body);
        let crc = record_crc(&r);
        r[20..24].copy_from_slice(&crc.to_le_bytes());
        r
    }

    /// Fragment encoding of main data only (short or long header as PostgreSQL picks).
    pub(crate) fn main_data_body(main: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        if main.len() < 256 {
            b.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, main.len() as u8]);
        } else if !main.is_empty() {
            b.push(XLR_BLOCK_ID_DATA_LONG);
            b.extend_from_slice(&(main.len() as u32).to_le_bytes());
        }
        b.extend_from_slice(main);
        b
    }

    #[test]
    fn record_crc_matches_the_crc32c_crate_on_both_sides_of_the_one_call_limit() {
        let data: Vec<u8> = (0u32..20_000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (SIZE_OF_XLOG_RECORD..600).chain([4095, 8192, 8193, 20_000]) {
            let r = &data[..len];
            let expected = crc32c::crc32c_append(crc32c::crc32c(&r[24..]), &r[..20]);
            assert_eq!(record_crc(r), expected, "len {len}");
        }
    }

    #[test]
    fn header_and_crc_round_trip() {
        let r = build_record(RM_XLOG_ID, 0x70, 7, Lsn(0x1234), &main_data_body(b"hello"));
        let h = XLogRecord::parse(&r).unwrap();
        assert_eq!(h.xl_tot_len as usize, r.len());
        assert_eq!(
            (h.xl_xid, h.xl_prev, h.xl_info, h.xl_rmid),
            (7, Lsn(0x1234), 0x70, 0)
        );
        assert_eq!(h.xl_crc, record_crc(&r));
        let body = decode_body(&r, 15).unwrap();
        assert_eq!(&r[body.main_data], b"hello");
        assert!(XLogRecord::parse(&r[..23]).is_none());
    }

    #[test]
    fn decodes_blocks_origin_and_long_main_data() {
        let main = vec![9u8; 300];
        let mut body = vec![
            XLR_BLOCK_ID_ORIGIN,
            5,
            0,
            XLR_BLOCK_ID_TOPLEVEL_XID,
            1,
            2,
            0,
            0,
        ];
        // block 0: data, new rel; block 2: image with hole, same rel, no data
        body.extend_from_slice(&[0, BKPBLOCK_HAS_DATA, 3, 0]);
        body.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
        body.extend_from_slice(&42u32.to_le_bytes());
        body.extend_from_slice(&[2, BKPBLOCK_HAS_IMAGE | BKPBLOCK_SAME_REL | 1, 0, 0]);
        body.extend_from_slice(&100u16.to_le_bytes()); // bimg_len
        body.extend_from_slice(&40u16.to_le_bytes()); // hole_offset
        body.push(BKPIMAGE_HAS_HOLE);
        body.extend_from_slice(&43u32.to_le_bytes());
        body.push(XLR_BLOCK_ID_DATA_LONG);
        body.extend_from_slice(&300u32.to_le_bytes());
        body.extend_from_slice(&[1, 2, 3]); // block 0 data
        body.extend_from_slice(&[7u8; 100]); // block 2 image
        body.extend_from_slice(&main);
        let r = build_record(10, 0, 1, Lsn(8), &body);
        let d = decode_body(&r, 16).unwrap();
        assert_eq!(d.block_count, 2);
        assert_eq!(d.record_origin, Some(5));
        assert_eq!(d.toplevel_xid, Some(0x201));
        assert_eq!(&r[d.main_data.clone()], &main[..]);
        let rec = Record {
            lsn: Lsn(0),
            end_lsn: Lsn(0),
            xl_tot_len: r.len() as u32,
            xl_xid: 1,
            xl_prev: Lsn(8),
            xl_info: 0,
            xl_rmid: 10,
            xl_crc: 0,
            main_data: &r[d.main_data],
            record_origin: d.record_origin,
            toplevel_xid: d.toplevel_xid,
            block_count: d.block_count,
            major: 16,
            raw: &r,
        };
        let blocks = rec.blocks();
        assert_eq!(blocks.len(), 2);
        assert_eq!(
            (blocks[0].rel, blocks[0].blkno, blocks[0].data),
            ((1, 2, 3), 42, &[1u8, 2, 3][..])
        );
        assert_eq!(
            (
                blocks[1].block_id,
                blocks[1].fork,
                blocks[1].rel,
                blocks[1].blkno
            ),
            (2, 1, (1, 2, 3), 43)
        );
        assert_eq!(blocks[1].image.map(<[u8]>::len), Some(100));
    }

    #[test]
    fn rejects_inconsistent_fragments() {
        let bad = |body: &[u8], why: &str| {
            let r = build_record(10, 0, 1, Lsn(8), body);
            assert!(decode_body(&r, 15).is_err(), "{why}");
        };
        bad(
            &[XLR_BLOCK_ID_DATA_SHORT, 5, 1, 2],
            "main data longer than record",
        );
        bad(&[XLR_BLOCK_ID_DATA_SHORT, 1, 1, 2], "trailing bytes");
        bad(&[40, 0, 0, 0], "block id out of range");
        bad(&[0, BKPBLOCK_HAS_DATA, 0, 0], "HAS_DATA with zero length");
        bad(
            &[0, BKPBLOCK_SAME_REL, 0, 0, 1, 0, 0, 0],
            "SAME_REL on first block",
        );
        bad(&[XLR_BLOCK_ID_ORIGIN], "truncated origin");
        // a 13/14 "compressed" image (0x02) with a hole carries the extra hole length field;
        // read as 15 (where 0x02 is BKPIMAGE_APPLY) it is an uncompressed image of the wrong size
        let mut body = vec![
            0,
            BKPBLOCK_HAS_IMAGE,
            0,
            0,
            10,
            0,
            4,
            0,
            BKPIMAGE_HAS_HOLE | 0x02,
            8,
            0,
        ];
        body.extend_from_slice(&[0; 12]);
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&[0; 10]);
        let r = build_record(10, 0, 1, Lsn(8), &body);
        assert!(decode_body(&r, 14).is_ok());
        assert!(decode_body(&r, 15).is_err());
    }
}

//! WAL page headers (`XLogPageHeaderData`, `XLogLongPageHeaderData` in xlog_internal.h).
//!
//! Layout, little-endian as written by the x86-64 and arm64 builds we support:
//! `xlp_magic u16 @0, xlp_info u16 @2, xlp_tli u32 @4, xlp_pageaddr u64 @8, xlp_rem_len u32 @16`,
//! padded to 24 bytes; the long header adds `xlp_sysid u64 @24, xlp_seg_size u32 @32,
//! xlp_xlog_blcksz u32 @36` (40 bytes after MAXALIGN).

use super::{is_valid_segment_size, Lsn, TimelineId, XLOG_BLCKSZ};

/// The page starts with the continuation of a record begun on an earlier page.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// The page carries a long header (only ever the first page of a segment).
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// Full-page images starting on this page may be dropped (historical, still set by PostgreSQL).
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
/// PostgreSQL 14+: a record that should have continued here was abandoned at crash recovery; the
/// page starts with an `XLOG_OVERWRITE_CONTRECORD` record instead.
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
/// Every defined flag. XLP_FIRST_IS_OVERWRITE_CONTRECORD was added in 14 and back-patched into
/// the November 2021 minor releases of 10-13 without a magic change, so 13 WAL may carry it too.
pub const XLP_ALL_FLAGS: u16 = 0x000F;
/// `SizeOfXLogShortPHD`: MAXALIGN of the 20-byte `XLogPageHeaderData`.
pub const SIZE_OF_SHORT_PAGE_HEADER: usize = 24;
/// `SizeOfXLogLongPHD`.
pub const SIZE_OF_LONG_PAGE_HEADER: usize = 40;

/// The fields every page header has (`XLogPageHeaderData`); see [`parse_page_header`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    pub tli: TimelineId,
    pub pageaddr: Lsn,
    /// `xlp_rem_len`: bytes of the record continued from the previous page still to come.
    pub rem_len: u32,
}

impl PageHeader {
    /// `XLogPageHeaderSize`: where the page's payload starts.
    pub fn header_size(&self) -> usize {
        if self.info & XLP_LONG_HEADER != 0 {
            SIZE_OF_LONG_PAGE_HEADER
        } else {
            SIZE_OF_SHORT_PAGE_HEADER
        }
    }
}

/// Reads the short page header fields at the start of `bytes`, without validating them (the
/// reader does that, because what is valid depends on where the page sits in the stream).
pub fn parse_page_header(bytes: &[u8]) -> Option<PageHeader> {
    if bytes.len() < SIZE_OF_SHORT_PAGE_HEADER {
        return None;
    }
    Some(PageHeader {
        magic: u16_at(bytes, 0),
        info: u16_at(bytes, 2),
        tli: u32_at(bytes, 4),
        pageaddr: Lsn(u64_at(bytes, 8)),
        rem_len: u32_at(bytes, 16),
    })
}

/// PostgreSQL major version for a WAL page magic (`XLOG_PAGE_MAGIC`). The magic changes
/// whenever the WAL format does, which is at most once per major release.
pub fn major_from_magic(magic: u16) -> Option<u32> {
    Some(match magic {
        0xD106 => 13,
        0xD10D => 14,
        0xD110 => 15,
        0xD113 => 16,
        0xD116 => 17,
        0xD118 => 18,
        _ => return None,
    })
}

/// The long page header that starts every WAL segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongPageHeader {
    pub magic: u16,
    pub info: u16,
    pub tli: TimelineId,
    pub pageaddr: Lsn,
    pub rem_len: u32,
    pub system_identifier: u64,
    pub seg_size: u32,
    pub xlog_blcksz: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PageError {
    #[error("too short for a WAL page header: {len} bytes")]
    TooShort { len: usize },
    #[error("WAL page magic 0x{magic:04X} is not a PostgreSQL 13-18 WAL format")]
    UnknownMagic { magic: u16 },
    #[error("the first page has no long page header (xlp_info 0x{info:04X})")]
    NotLongHeader { info: u16 },
    #[error("page header flags 0x{info:04X} contain unknown bits")]
    BadFlags { info: u16 },
    #[error(
        "WAL segment size {seg_size} in the page header is not a power of two from 1 MiB to 1 GiB"
    )]
    BadSegmentSize { seg_size: u32 },
    #[error("WAL block size {blcksz} is not supported (only {XLOG_BLCKSZ})")]
    BadBlockSize { blcksz: u32 },
    #[error("file is {len} bytes but its header says segments are {seg_size} bytes")]
    SizeMismatch { len: u64, seg_size: u32 },
    #[error("page address {found} does not match the file name, which implies {expected}")]
    AddressMismatch { expected: Lsn, found: Lsn },
    #[error("page header timeline {found} is later than the file name's timeline {expected}")]
    TimelineMismatch {
        expected: TimelineId,
        found: TimelineId,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

/// Parses and sanity-checks the long page header at the start of a segment.
pub fn parse_long_header(bytes: &[u8]) -> Result<LongPageHeader, PageError> {
    if bytes.len() < SIZE_OF_LONG_PAGE_HEADER {
        return Err(PageError::TooShort { len: bytes.len() });
    }
    let h = LongPageHeader {
        magic: u16_at(bytes, 0),
        info: u16_at(bytes, 2),
        tli: u32_at(bytes, 4),
        pageaddr: Lsn(u64_at(bytes, 8)),
        rem_len: u32_at(bytes, 16),
        system_identifier: u64_at(bytes, 24),
        seg_size: u32_at(bytes, 32),
        xlog_blcksz: u32_at(bytes, 36),
    };
    if major_from_magic(h.magic).is_none() {
        return Err(PageError::UnknownMagic { magic: h.magic });
    }
    if h.info & !XLP_ALL_FLAGS != 0 {
        return Err(PageError::BadFlags { info: h.info });
    }
    if h.info & XLP_LONG_HEADER == 0 {
        return Err(PageError::NotLongHeader { info: h.info });
    }
    if !is_valid_segment_size(h.seg_size as u64) {
        return Err(PageError::BadSegmentSize {
            seg_size: h.seg_size,
        });
    }
    if h.xlog_blcksz != XLOG_BLCKSZ {
        return Err(PageError::BadBlockSize {
            blcksz: h.xlog_blcksz,
        });
    }
    Ok(h)
}

/// Checks that `bytes` is a whole WAL segment for timeline `tli`, segment `segno`: a valid long
/// header, the size the header declares, and the page address the name implies. A segment may
/// start with a page of an earlier timeline's tli only when it was switched to mid-segment, so
/// the header's timeline may be lower than the name's but never higher.
pub fn validate_segment(
    bytes: &[u8],
    tli: TimelineId,
    segno: u64,
) -> Result<LongPageHeader, PageError> {
    validate_segment_start(bytes, bytes.len() as u64, tli, segno)
}

/// [`validate_segment`] for a segment of `len` bytes of which `first` holds the start (at
/// least the long page header): archive-push reads the rest later, in blocks.
pub fn validate_segment_start(
    first: &[u8],
    len: u64,
    tli: TimelineId,
    segno: u64,
) -> Result<LongPageHeader, PageError> {
    let h = parse_long_header(first)?;
    if len != h.seg_size as u64 {
        return Err(PageError::SizeMismatch {
            len,
            seg_size: h.seg_size,
        });
    }
    let expected = Lsn::from_segno(segno, h.seg_size as u64);
    if h.pageaddr != expected {
        return Err(PageError::AddressMismatch {
            expected,
            found: h.pageaddr,
        });
    }
    if h.tli > tli {
        return Err(PageError::TimelineMismatch {
            expected: tli,
            found: h.tli,
        });
    }
    Ok(h)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A synthetic segment whose first page carries a valid long header.
    pub(crate) fn fake_segment(sysid: u64, tli: u32, segno: u64, seg_size: u32) -> Vec<u8> {
        let mut b = vec![0u8; seg_size as usize];
        b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        b[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        b[4..8].copy_from_slice(&tli.to_le_bytes());
        b[8..16].copy_from_slice(&(segno * seg_size as u64).to_le_bytes());
        b[24..32].copy_from_slice(&sysid.to_le_bytes());
        b[32..36].copy_from_slice(&seg_size.to_le_bytes());
        b[36..40].copy_from_slice(&XLOG_BLCKSZ.to_le_bytes());
        b
    }

    #[test]
    fn accepts_a_valid_segment() {
        let seg = fake_segment(42, 1, 3, 1 << 20);
        let h = validate_segment(&seg, 1, 3).unwrap();
        assert_eq!(h.system_identifier, 42);
        assert_eq!(major_from_magic(h.magic), Some(15));
    }

    #[test]
    fn rejects_wrong_address_size_magic_and_timeline() {
        let seg = fake_segment(42, 1, 3, 1 << 20);
        assert!(matches!(
            validate_segment(&seg, 1, 4),
            Err(PageError::AddressMismatch { .. })
        ));
        assert!(matches!(
            validate_segment(&seg[..1 << 19], 1, 3),
            Err(PageError::SizeMismatch { .. })
        ));
        assert!(matches!(
            validate_segment(&seg, 0, 3),
            Err(PageError::TimelineMismatch { .. })
        ));
        // a page of timeline 1 at the start of a timeline-2 segment is legitimate
        assert!(validate_segment(&seg, 2, 3).is_ok());
        let mut bad = seg.clone();
        bad[0] = 0;
        assert!(matches!(
            validate_segment(&bad, 1, 3),
            Err(PageError::UnknownMagic { .. })
        ));
        let mut short = seg.clone();
        short[2] = 0;
        assert!(matches!(
            validate_segment(&short, 1, 3),
            Err(PageError::NotLongHeader { .. })
        ));
        assert!(matches!(
            parse_long_header(&[0u8; 10]),
            Err(PageError::TooShort { len: 10 })
        ));
    }
}

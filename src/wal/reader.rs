//! Streaming WAL record reader: [`WalReader`] is fed WAL bytes in LSN order, in chunks of any
//! size, and hands out validated [`Record`]s. It owns page-boundary handling (short and long page
//! headers, `xlp_rem_len` continuations, records spanning pages and segments, XLOG_SWITCH
//! padding), every check `xlogreader.c` makes (page magic, address, timeline, `xl_prev` chain,
//! CRC-32C, `xl_tot_len`, fragment headers), and telling the end of WAL (zeros) from corruption.
//!
//! Pure code: no I/O. Allocation happens only when the input buffer or the buffer reassembling a
//! multi-page record has to grow; records that fit in one page are handed out in place.

use super::page::{
    parse_page_header, PageHeader, SIZE_OF_LONG_PAGE_HEADER, SIZE_OF_SHORT_PAGE_HEADER,
    XLP_ALL_FLAGS, XLP_FIRST_IS_CONTRECORD, XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};
use super::record::{
    decode_body, maxalign, record_crc_with, rmgr_id_is_valid, CrcScratch, DecodedBody, Record,
    XLogRecord, RM_XLOG_ID, SIZE_OF_XLOG_RECORD, XLOG_RECORD_MAX_SIZE, XLR_RMGR_INFO_MASK,
};
use super::{is_valid_segment_size, major_from_magic, Lsn, TimelineId, XLOG_BLCKSZ};

const BLCKSZ: u64 = XLOG_BLCKSZ as u64;
/// `XLOG_SWITCH` in `RM_XLOG_ID` (pg_control.h).
const XLOG_SWITCH: u8 = 0x40;

/// Why the WAL ended without being corrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// A record was expected and `xl_tot_len` is zero: never-written space (PostgreSQL's
    /// "invalid record length at X: wanted 24, got 0").
    ZeroRecord,
    /// A page where a record was expected has an all-zero header: never written.
    ZeroPage,
    /// A record started but the page holding its continuation was never written: the record is
    /// torn and, like PostgreSQL at crash recovery, we stop before it.
    TornRecord,
}

/// The end of valid WAL, found where `lsn` is (the start of the record that is not there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndOfWal {
    pub lsn: Lsn,
    pub reason: EndReason,
}

/// What [`WalReader::next_record`] found.
#[derive(Debug)]
pub enum Next<'a> {
    Record(Record<'a>),
    /// The bytes fed so far end inside the next record (or its page header): feed more.
    NeedInput,
    /// Valid WAL ends here; every later call returns the same.
    EndOfWal(EndOfWal),
}

/// Corruption or inconsistency found while reading, always with the LSN where it was found.
/// `page` LSNs point at a page header, `lsn` at a record start.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum WalError {
    #[error("WAL segment size {seg_size} is not a power of two from 1 MiB to 1 GiB")]
    BadSegmentSize { seg_size: u64 },
    #[error("cannot start reading at {lsn}: {why}")]
    BadStart { lsn: Lsn, why: &'static str },
    #[error("invalid magic number {magic:04X} in WAL page at {page}")]
    BadMagic { page: Lsn, magic: u16 },
    #[error("WAL page at {page} has magic {found:04X}, earlier pages had {expected:04X}")]
    MagicChanged {
        page: Lsn,
        expected: u16,
        found: u16,
    },
    #[error("invalid info bits {info:04X} in WAL page at {page}")]
    BadPageFlags { page: Lsn, info: u16 },
    #[error("WAL page at {page} {}", if *long { "has a long header but is not the first page of a segment" } else { "is the first page of a segment but has no long header" })]
    MisplacedLongHeader { page: Lsn, long: bool },
    #[error("WAL page at {page} declares segment size {found}, expected {expected}")]
    SegmentSizeMismatch {
        page: Lsn,
        expected: u64,
        found: u32,
    },
    #[error("WAL page at {page} declares XLOG_BLCKSZ {found}, only 8192 is supported")]
    BlockSizeMismatch { page: Lsn, found: u32 },
    #[error("WAL page at {page} is from a different database system: identifier {found}, expected {expected}")]
    SystemIdMismatch {
        page: Lsn,
        expected: u64,
        found: u64,
    },
    #[error("unexpected pageaddr {found} in WAL page at {page}")]
    PageAddrMismatch { page: Lsn, found: Lsn },
    /// The page holds an older address: a recycled segment not yet overwritten. PostgreSQL treats
    /// this as the end of WAL during crash recovery; in an archived segment it is a hole.
    #[error(
        "WAL page at {page} is a stale page from {found} (recycled segment): WAL ends before it"
    )]
    StalePage { page: Lsn, found: Lsn },
    #[error("out-of-sequence timeline ID {tli} (after {prev_tli}) in WAL page at {page}")]
    TimelineRegressed {
        page: Lsn,
        tli: TimelineId,
        prev_tli: TimelineId,
    },
    #[error(
        "WAL page at {page} has XLP_FIRST_IS_CONTRECORD where a new record ({lsn}) should start"
    )]
    UnexpectedContrecord { page: Lsn, lsn: Lsn },
    #[error("there is no contrecord flag in WAL page at {page} continuing the record at {lsn}")]
    MissingContrecord { page: Lsn, lsn: Lsn },
    #[error("invalid contrecord length {rem_len} (expected {expected}) in WAL page at {page} for the record at {lsn}")]
    BadContrecordLength {
        page: Lsn,
        lsn: Lsn,
        rem_len: u32,
        expected: u32,
    },
    #[error("invalid record offset at {lsn}")]
    BadRecordOffset { lsn: Lsn },
    #[error("invalid record length at {lsn}: expected at least 24, got {xl_tot_len}")]
    RecordTooShort { lsn: Lsn, xl_tot_len: u32 },
    #[error("record length {xl_tot_len} at {lsn} is too long")]
    RecordTooLong { lsn: Lsn, xl_tot_len: u32 },
    #[error("invalid resource manager ID {rmid} at {lsn}")]
    BadRmgr { lsn: Lsn, rmid: u8 },
    #[error("record with incorrect prev-link {xl_prev} at {lsn}{}", expected.map(|e| format!(" (expected {e})")).unwrap_or_default())]
    BadPrevLink {
        lsn: Lsn,
        xl_prev: Lsn,
        expected: Option<Lsn>,
    },
    #[error("incorrect resource manager data checksum in record at {lsn}: stored {stored:08X}, computed {computed:08X}")]
    BadCrc {
        lsn: Lsn,
        stored: u32,
        computed: u32,
    },
    #[error("invalid record at {lsn}: {what}")]
    BadRecordBody { lsn: Lsn, what: &'static str },
}

impl WalError {
    /// The LSN the error is about (a page start or a record start).
    pub fn lsn(&self) -> Lsn {
        use WalError::*;
        match *self {
            BadSegmentSize { .. } => Lsn::INVALID,
            BadMagic { page, .. }
            | MagicChanged { page, .. }
            | BadPageFlags { page, .. }
            | MisplacedLongHeader { page, .. }
            | SegmentSizeMismatch { page, .. }
            | BlockSizeMismatch { page, .. }
            | SystemIdMismatch { page, .. }
            | PageAddrMismatch { page, .. }
            | StalePage { page, .. }
            | TimelineRegressed { page, .. } => page,
            BadStart { lsn, .. }
            | UnexpectedContrecord { lsn, .. }
            | MissingContrecord { lsn, .. }
            | BadContrecordLength { lsn, .. }
            | BadRecordOffset { lsn }
            | RecordTooShort { lsn, .. }
            | RecordTooLong { lsn, .. }
            | BadRmgr { lsn, .. }
            | BadPrevLink { lsn, .. }
            | BadCrc { lsn, .. }
            | BadRecordBody { lsn, .. } => lsn,
        }
    }
}

/// Result of looking at the page header at a page boundary.
enum PageLook {
    Header(PageHeader),
    Zero,
    NeedInput,
}

/// Streaming reader over WAL bytes. Feed bytes with [`feed`](Self::feed) in LSN order starting at
/// the `start` given to [`new`](Self::new); pull records with [`next_record`](Self::next_record)
/// until it says [`Next::NeedInput`]. Or hand it each piece of input with
/// [`read_from`](Self::read_from), which reads the records in place instead of copying the input.
///
/// `start` is either a page boundary (typically a segment start) — then any continuation of a
/// record that began earlier is skipped, as `XLogFindNextRecord` does, and the first record
/// returned is the first one that *starts* at or after `start` — or the start of a record known to
/// be valid (e.g. a checkpoint's redo LSN).
pub struct WalReader {
    st: State,
    /// Input bytes not yet consumed (and, until the next feed, the consumed prefix); `buf[0]` is
    /// at LSN `buf_lsn`. After [`read_from`](Self::read_from) this holds only the start of a
    /// record that continues past that input.
    buf: Vec<u8>,
    buf_lsn: u64,
    /// Reassembly buffer for records that cross a page boundary; reused.
    rec_buf: Vec<u8>,
}

/// Everything the reader knows apart from its buffers, so that the same code reads from the
/// reader's own buffer or from a slice the caller lends ([`Src`]).
struct State {
    seg_size: u64,
    /// Where the next record starts, or a page boundary before it.
    next: u64,
    /// `next` is a page boundary whose continuation data (if any) belongs to a record we did not
    /// see and must be skipped.
    skip_contrecord: bool,
    /// Start of the previous record, for the `xl_prev` check; `None` before the first record when
    /// the caller did not say, and then only `xl_prev < lsn` is checked (PostgreSQL's randAccess).
    prev: Option<Lsn>,
    /// Page-header state, as `XLogReaderValidatePageHeader` keeps it.
    magic: Option<u16>,
    major: u32,
    system_identifier: Option<u64>,
    latest_page: u64,
    latest_tli: TimelineId,
    /// Do not retry before the input reaches this LSN (the end of a record known to be longer).
    need_until: u64,
    /// Sticky outcome once reading cannot go on.
    stopped: Option<Result<EndOfWal, WalError>>,
    /// Record most recently abandoned because of XLP_FIRST_IS_OVERWRITE_CONTRECORD.
    overwritten: Option<Lsn>,
    crc_scratch: CrcScratch,
}

/// Contiguous input the reader works on: `bytes[0]` is at LSN `lsn`. It always starts at or
/// before `next`, so everything the reader looks at (page headers, records) is at or after `lsn`.
#[derive(Clone, Copy)]
struct Src<'b> {
    lsn: u64,
    bytes: &'b [u8],
}

impl<'b> Src<'b> {
    fn end(&self) -> u64 {
        self.lsn + self.bytes.len() as u64
    }

    /// The bytes `[lsn, lsn + len)`, if all are here.
    fn get(&self, lsn: u64, len: usize) -> Option<&'b [u8]> {
        let from = usize::try_from(lsn.checked_sub(self.lsn)?).ok()?;
        self.bytes.get(from..from.checked_add(len)?)
    }
}

impl WalReader {
    /// A reader for WAL with segments of `seg_size` bytes, whose first fed byte is at `start`.
    pub fn new(seg_size: u64, start: Lsn) -> Result<WalReader, WalError> {
        if !is_valid_segment_size(seg_size) {
            return Err(WalError::BadSegmentSize { seg_size });
        }
        let off = start.0 % BLCKSZ;
        let page_boundary = off == 0;
        if !page_boundary {
            let min_off = if start.0 % seg_size < BLCKSZ {
                SIZE_OF_LONG_PAGE_HEADER
            } else {
                SIZE_OF_SHORT_PAGE_HEADER
            } as u64;
            if off < min_off || start.0 % 8 != 0 {
                return Err(WalError::BadStart {
                    lsn: start,
                    why: "neither a page boundary nor a possible record start",
                });
            }
        }
        Ok(WalReader {
            st: State {
                seg_size,
                next: start.0,
                skip_contrecord: page_boundary,
                prev: None,
                magic: None,
                major: 0,
                system_identifier: None,
                latest_page: 0,
                latest_tli: 0,
                need_until: 0,
                stopped: None,
                overwritten: None,
                crc_scratch: CrcScratch::default(),
            },
            buf: Vec::new(),
            buf_lsn: start.0,
            rec_buf: Vec::new(),
        })
    }

    /// Declares the start of the record before the first one we will read, so that the first
    /// record's `xl_prev` is checked exactly instead of only for `< lsn`. This also says `start`
    /// continues a known stream: if it is a page boundary, the previous record ended exactly
    /// there, so a continuation on that page is an error rather than something to skip.
    pub fn set_prev_record(&mut self, prev: Lsn) {
        self.st.prev = Some(prev);
        self.st.skip_contrecord = false;
    }

    /// Requires every long page header to carry this system identifier.
    pub fn set_system_identifier(&mut self, sysid: u64) {
        self.st.system_identifier = Some(sysid);
    }

    /// Where the next record starts (or the page boundary before it). After [`Next::NeedInput`]
    /// this is the start of the incomplete record: valid WAL read so far ends here.
    pub fn next_lsn(&self) -> Lsn {
        Lsn(self.st.next)
    }

    /// Start of the last record returned.
    pub fn prev_record(&self) -> Option<Lsn> {
        self.st.prev
    }

    /// LSN just past the last byte fed.
    pub fn fed_until(&self) -> Lsn {
        Lsn(self.buf_lsn + self.buf.len() as u64)
    }

    /// Magic of the pages read so far, once one page header has been seen.
    pub fn page_magic(&self) -> Option<u16> {
        self.st.magic
    }

    /// Timeline of the latest page header read.
    pub fn page_tli(&self) -> Option<TimelineId> {
        self.st.magic.map(|_| self.st.latest_tli)
    }

    /// Set when a partial record was abandoned because the following page was flagged
    /// XLP_FIRST_IS_OVERWRITE_CONTRECORD (PostgreSQL 14+ after crash recovery): its start LSN.
    pub fn overwritten_record(&self) -> Option<Lsn> {
        self.st.overwritten
    }

    /// The bytes fed but not consumed: from [`next_lsn`](Self::next_lsn) to the end of input
    /// (empty if `next_lsn` lies beyond it). After the last [`Next::NeedInput`] of a segment this
    /// is the start of the record that continues into the next segment.
    pub fn unconsumed(&self) -> &[u8] {
        let from = self.st.next.saturating_sub(self.buf_lsn) as usize;
        self.buf.get(from..).unwrap_or(&[])
    }

    /// Appends input. Bytes before [`next_lsn`](Self::next_lsn) that are not needed (XLOG_SWITCH
    /// padding) are dropped without being looked at.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        self.drop_consumed();
        if self.buf.is_empty() && self.st.next > self.buf_lsn {
            // Everything buffered is consumed; skip input up to `next`.
            let skip = (self.st.next - self.buf_lsn).min(bytes.len() as u64);
            bytes = &bytes[skip as usize..];
            self.buf_lsn += skip;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Forgets the buffered bytes before `next`. Cheap: what remains is at most one pending
    /// record.
    fn drop_consumed(&mut self) {
        let end = self.fed_until().0;
        if self.st.next >= end {
            self.buf.clear();
            self.buf_lsn = end;
        } else if self.st.next > self.buf_lsn {
            self.buf.drain(..(self.st.next - self.buf_lsn) as usize);
            self.buf_lsn = self.st.next;
        }
    }

    /// Reads the next record. Returns [`Next::NeedInput`] when the input ends inside it (feed
    /// more and call again), [`Next::EndOfWal`] at never-written space, an error on corruption.
    /// End of WAL and errors are sticky.
    pub fn next_record(&mut self) -> Result<Next<'_>, WalError> {
        let src = Src {
            lsn: self.buf_lsn,
            bytes: &self.buf,
        };
        self.st.next_record(src, &mut self.rec_buf)
    }

    /// Reads all the records `input` (the bytes following those already fed) completes, handing
    /// each to `on_record`. The same records, checks and outcome as [`feed`](Self::feed)`(input)`
    /// followed by [`next_record`](Self::next_record) until it returns no record — `Ok(None)`
    /// for [`Next::NeedInput`], `Ok(Some(_))` for [`Next::EndOfWal`] — and the reader is left in
    /// the same state, but `input` is not copied: records lying in it are handed out in place.
    /// Copied are only a record straddling earlier input and this one (into the internal buffer,
    /// as much of `input` as it takes) and the record continuing past the end of `input`.
    pub fn read_from(
        &mut self,
        input: &[u8],
        mut on_record: impl FnMut(Record<'_>),
    ) -> Result<Option<EndOfWal>, WalError> {
        let input_lsn = self.fed_until().0;
        let input_end = input_lsn + input.len() as u64;
        self.drop_consumed();
        if self.st.stopped.is_none() && self.st.need_until > input_end {
            // The pending record cannot be complete even with `input`: like `next_record`, do
            // not look at it again before it can be.
            self.buf.extend_from_slice(input);
            return Ok(None);
        }
        // A record begun in the bytes carried over from earlier input is finished in `buf`: move
        // in as much of `input` as it needs, then read on from `input` itself.
        let mut moved = 0usize;
        while self.st.next < self.fed_until().0 {
            let src = Src {
                lsn: self.buf_lsn,
                bytes: &self.buf,
            };
            let outcome = match self.st.next_record(src, &mut self.rec_buf) {
                Ok(Next::Record(rec)) => {
                    on_record(rec);
                    continue;
                }
                Ok(Next::NeedInput) if moved < input.len() => {
                    let fed = self.fed_until().0;
                    let need = self.st.need_until;
                    let take = if need > input_end {
                        // It continues past `input`. Still validate the continuation pages that
                        // are there now, as `feed(input)` + `next_record` would: all of `input`
                        // in, and walk the pages again.
                        self.st.need_until = 0;
                        input.len() - moved
                    } else if need > fed {
                        // Its end is known and in `input`.
                        (need - fed) as usize
                    } else {
                        // Its length is not known yet (page or record header cut short).
                        (BLCKSZ as usize).min(input.len() - moved)
                    };
                    self.buf.extend_from_slice(&input[moved..moved + take]);
                    moved += take;
                    continue;
                }
                Ok(Next::NeedInput) => Ok(None),
                Ok(Next::EndOfWal(e)) => Ok(Some(e)),
                Err(e) => Err(e),
            };
            // Stopped inside the carried record: the rest of `input` counts as fed, as with feed.
            self.buf.extend_from_slice(&input[moved..]);
            return outcome;
        }
        let src = Src {
            lsn: input_lsn + moved as u64,
            bytes: &input[moved..],
        };
        let outcome = loop {
            match self.st.next_record(src, &mut self.rec_buf) {
                Ok(Next::Record(rec)) => on_record(rec),
                Ok(Next::NeedInput) => break Ok(None),
                Ok(Next::EndOfWal(e)) => break Ok(Some(e)),
                Err(e) => break Err(e),
            }
        };
        // Keep what the next call needs: the bytes from `next` on (none when `next` lies beyond
        // the input, e.g. after XLOG_SWITCH; later input is skipped up to it).
        let keep = self.st.next.clamp(src.lsn, src.end());
        self.buf.clear();
        self.buf
            .extend_from_slice(&input[(keep - input_lsn) as usize..]);
        self.buf_lsn = keep;
        outcome
    }
}

impl State {
    #[inline(always)]
    fn is_segment_start(&self, page: u64) -> bool {
        // seg_size is a power of two (checked in `new`): a mask, not a division per record.
        page & (self.seg_size - 1) == 0
    }

    #[inline(always)]
    fn header_size_at(&self, page: u64) -> u64 {
        if self.is_segment_start(page) {
            SIZE_OF_LONG_PAGE_HEADER as u64
        } else {
            SIZE_OF_SHORT_PAGE_HEADER as u64
        }
    }

    /// Reads and validates the page header at `page` (a page boundary).
    fn look_at_page(&mut self, src: Src<'_>, page: u64) -> Result<PageLook, WalError> {
        let Some(short) = src.get(page, SIZE_OF_SHORT_PAGE_HEADER) else {
            return Ok(PageLook::NeedInput);
        };
        if short.iter().all(|&b| b == 0) {
            return Ok(PageLook::Zero);
        }
        let Some(h) = parse_page_header(short) else {
            return Ok(PageLook::NeedInput);
        };
        let page_lsn = Lsn(page);
        // The first page fixes the format version; every later page must carry the same magic.
        match self.magic {
            None if major_from_magic(h.magic).is_none() => {
                return Err(WalError::BadMagic {
                    page: page_lsn,
                    magic: h.magic,
                });
            }
            Some(m) if m != h.magic => {
                return Err(if major_from_magic(h.magic).is_none() {
                    WalError::BadMagic {
                        page: page_lsn,
                        magic: h.magic,
                    }
                } else {
                    WalError::MagicChanged {
                        page: page_lsn,
                        expected: m,
                        found: h.magic,
                    }
                });
            }
            _ => {}
        }
        if h.info & !XLP_ALL_FLAGS != 0 {
            return Err(WalError::BadPageFlags {
                page: page_lsn,
                info: h.info,
            });
        }
        let long = h.info & XLP_LONG_HEADER != 0;
        if long != self.is_segment_start(page) {
            return Err(WalError::MisplacedLongHeader {
                page: page_lsn,
                long,
            });
        }
        if long {
            let Some(l) = src.get(page, SIZE_OF_LONG_PAGE_HEADER) else {
                return Ok(PageLook::NeedInput);
            };
            let sysid = u64::from_le_bytes(l[24..32].try_into().unwrap_or_default());
            let seg_size = u32::from_le_bytes(l[32..36].try_into().unwrap_or_default());
            let blcksz = u32::from_le_bytes(l[36..40].try_into().unwrap_or_default());
            if seg_size as u64 != self.seg_size {
                return Err(WalError::SegmentSizeMismatch {
                    page: page_lsn,
                    expected: self.seg_size,
                    found: seg_size,
                });
            }
            if blcksz != XLOG_BLCKSZ {
                return Err(WalError::BlockSizeMismatch {
                    page: page_lsn,
                    found: blcksz,
                });
            }
            match self.system_identifier {
                Some(expected) if expected != sysid => {
                    return Err(WalError::SystemIdMismatch {
                        page: page_lsn,
                        expected,
                        found: sysid,
                    })
                }
                _ => self.system_identifier = Some(sysid),
            }
        }
        if h.pageaddr != page_lsn {
            return Err(if h.pageaddr < page_lsn && h.pageaddr.0 % BLCKSZ == 0 {
                WalError::StalePage {
                    page: page_lsn,
                    found: h.pageaddr,
                }
            } else {
                WalError::PageAddrMismatch {
                    page: page_lsn,
                    found: h.pageaddr,
                }
            });
        }
        // Timelines only go forward; pages we re-read (after NeedInput) are not compared again.
        if page > self.latest_page || self.magic.is_none() {
            if self.magic.is_some() && h.tli < self.latest_tli {
                return Err(WalError::TimelineRegressed {
                    page: page_lsn,
                    tli: h.tli,
                    prev_tli: self.latest_tli,
                });
            }
            self.latest_page = page;
            self.latest_tli = h.tli;
        }
        if self.magic.is_none() {
            self.magic = Some(h.magic);
            self.major = major_from_magic(h.magic).unwrap_or(0);
        }
        Ok(PageLook::Header(h))
    }

    /// [`WalReader::next_record`] over `src`; multi-page records are assembled in `rec_buf`.
    #[inline(always)]
    fn next_record<'b>(
        &mut self,
        src: Src<'b>,
        rec_buf: &'b mut Vec<u8>,
    ) -> Result<Next<'b>, WalError> {
        if let Some(stopped) = &self.stopped {
            return stopped.clone().map(Next::EndOfWal);
        }
        let found = loop {
            if src.end() < self.need_until {
                return Ok(Next::NeedInput);
            }
            match self.step(src, rec_buf) {
                Ok(Step::Found(found)) => break found,
                Ok(Step::Restart) => continue,
                Ok(Step::NeedInput) => return Ok(Next::NeedInput),
                Err(stop) => {
                    self.stopped = Some(stop.clone());
                    return stop.map(Next::EndOfWal);
                }
            }
        };
        let raw: &'b [u8] = match found.in_place {
            Some(off) => src.bytes.get(off..).unwrap_or(&[]),
            None => rec_buf,
        };
        match self.check_record(&found, raw) {
            Ok((h, body)) => Ok(Next::Record(self.record(&found, raw, h, body))),
            Err(e) => {
                self.stopped = Some(Err(e.clone()));
                Err(e)
            }
        }
    }

    #[inline(always)]
    fn step(
        &mut self,
        src: Src<'_>,
        rec_buf: &mut Vec<u8>,
    ) -> Result<Step, Result<EndOfWal, WalError>> {
        // A page boundary at `next`: read the page header, skip continuation data if asked to.
        while self.next % BLCKSZ == 0 {
            let page = self.next;
            let h = match self.look_at_page(src, page).map_err(Err)? {
                PageLook::Header(h) => h,
                PageLook::NeedInput => return Ok(Step::NeedInput),
                PageLook::Zero => {
                    return Err(Ok(EndOfWal {
                        lsn: Lsn(page),
                        reason: EndReason::ZeroPage,
                    }))
                }
            };
            let hdr = h.header_size() as u64;
            if h.info & XLP_FIRST_IS_CONTRECORD == 0 {
                self.next = page + hdr;
            } else if !self.skip_contrecord {
                return Err(Err(WalError::UnexpectedContrecord {
                    page: Lsn(page),
                    lsn: Lsn(page + hdr),
                }));
            } else if maxalign(h.rem_len as u64) >= BLCKSZ - hdr {
                // The tail of a record we did not see the start of fills this page.
                self.next = page + BLCKSZ;
                continue;
            } else {
                self.next = page + hdr + maxalign(h.rem_len as u64);
            }
            // A skipped tail can end exactly at the page end: then look at the next page header.
        }
        self.skip_contrecord = false;
        let lsn = self.next;
        let off = lsn % BLCKSZ;
        if off < self.header_size_at(lsn - off) || lsn % 8 != 0 {
            return Err(Err(WalError::BadRecordOffset { lsn: Lsn(lsn) }));
        }

        // xl_tot_len is always on the record's first page: records are 8-byte aligned and pages
        // are a multiple of 8, so at least 8 bytes of it are there.
        let Some(len_bytes) = src.get(lsn, 4) else {
            return Ok(Step::NeedInput);
        };
        let tot_len = u32::from_le_bytes(len_bytes.try_into().unwrap_or_default());
        if tot_len == 0 {
            return Err(Ok(EndOfWal {
                lsn: Lsn(lsn),
                reason: EndReason::ZeroRecord,
            }));
        }
        if (tot_len as usize) < SIZE_OF_XLOG_RECORD {
            return Err(Err(WalError::RecordTooShort {
                lsn: Lsn(lsn),
                xl_tot_len: tot_len,
            }));
        }
        if tot_len > XLOG_RECORD_MAX_SIZE {
            return Err(Err(WalError::RecordTooLong {
                lsn: Lsn(lsn),
                xl_tot_len: tot_len,
            }));
        }
        self.locate(src, lsn, tot_len, rec_buf)
    }

    /// Finds the bytes of the record of `tot_len` bytes at `lsn`, validating continuation page
    /// headers. When not all are fed yet, sets `need_until` so the pages are not walked again
    /// before the record can be complete.
    #[inline(always)]
    fn locate(
        &mut self,
        src: Src<'_>,
        lsn: u64,
        tot_len: u32,
        rec_buf: &mut Vec<u8>,
    ) -> Result<Step, Result<EndOfWal, WalError>> {
        let tot = tot_len as u64;
        let first_page_end = (lsn / BLCKSZ + 1) * BLCKSZ;
        let first_len = tot.min(first_page_end - lsn);
        if first_len == tot {
            if src.end() < lsn + tot {
                self.need_until = lsn + tot;
                return Ok(Step::NeedInput);
            }
            let off = (lsn - src.lsn) as usize;
            return Ok(Step::Found(Found {
                lsn,
                in_place: Some(off),
                phys_end: lsn + tot,
            }));
        }
        // The record continues on later pages. Where it ends if the pages are well-formed (long
        // headers exactly at segment starts; `look_at_page` enforces that):
        let mut got = first_len;
        let mut page = first_page_end;
        let phys_end = loop {
            let hdr = self.header_size_at(page);
            let chunk = (tot - got).min(BLCKSZ - hdr);
            got += chunk;
            if got == tot {
                break page + hdr + chunk;
            }
            page += BLCKSZ;
        };
        // Copy only once everything is here, but validate the pages already fed right away so that
        // a garbage length fails now rather than looking like "record continues past the input".
        let complete = src.end() >= phys_end;
        rec_buf.clear();
        if complete {
            rec_buf.reserve(tot as usize);
        }
        match self.walk_continuations(src, lsn, tot, first_len, complete, rec_buf)? {
            Walk::Complete if complete => Ok(Step::Found(Found {
                lsn,
                in_place: None,
                phys_end,
            })),
            Walk::Complete | Walk::Incomplete => {
                self.need_until = phys_end;
                Ok(Step::NeedInput)
            }
            Walk::Overwritten => Ok(Step::Restart),
        }
    }

    /// Validates the continuation pages of the record at `lsn` as far as they are fed, copying its
    /// fragments into `out` when `copy`.
    #[inline(never)] // multi-page records only: keep it out of the per-record path
    fn walk_continuations(
        &mut self,
        src: Src<'_>,
        lsn: u64,
        tot: u64,
        first_len: u64,
        copy: bool,
        out: &mut Vec<u8>,
    ) -> Result<Walk, Result<EndOfWal, WalError>> {
        if copy {
            match src.get(lsn, first_len as usize) {
                Some(b) => out.extend_from_slice(b),
                None => return Ok(Walk::Incomplete),
            }
        }
        let mut got = first_len;
        let mut page = (lsn / BLCKSZ + 1) * BLCKSZ;
        while got < tot {
            let h = match self.look_at_page(src, page).map_err(Err)? {
                PageLook::Header(h) => h,
                PageLook::NeedInput => return Ok(Walk::Incomplete),
                PageLook::Zero => {
                    return Err(Ok(EndOfWal {
                        lsn: Lsn(lsn),
                        reason: EndReason::TornRecord,
                    }))
                }
            };
            if h.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0 {
                // The rest of this record was never written; after crash recovery PostgreSQL
                // wrote an XLOG_OVERWRITE_CONTRECORD record here instead. Resume at this page and
                // keep `prev`: the new record's xl_prev is the record before the abandoned one.
                self.overwritten = Some(Lsn(lsn));
                self.next = page;
                self.need_until = 0;
                return Ok(Walk::Overwritten);
            }
            if h.info & XLP_FIRST_IS_CONTRECORD == 0 {
                return Err(Err(WalError::MissingContrecord {
                    page: Lsn(page),
                    lsn: Lsn(lsn),
                }));
            }
            let expected = (tot - got) as u32;
            if h.rem_len != expected {
                return Err(Err(WalError::BadContrecordLength {
                    page: Lsn(page),
                    lsn: Lsn(lsn),
                    rem_len: h.rem_len,
                    expected,
                }));
            }
            let hdr = h.header_size() as u64;
            let chunk = (tot - got).min(BLCKSZ - hdr);
            if copy {
                match src.get(page + hdr, chunk as usize) {
                    Some(b) => out.extend_from_slice(b),
                    None => return Ok(Walk::Incomplete),
                }
            }
            got += chunk;
            page += BLCKSZ;
        }
        Ok(Walk::Complete)
    }

    /// Header checks (`ValidXLogRecordHeader`), CRC (`ValidXLogRecord`) and fragment headers
    /// (`DecodeXLogRecord`) of a located record; on success advances past it.
    /// `raw` starts at the record (and may go on past it).
    #[inline(always)]
    fn check_record(
        &mut self,
        f: &Found,
        raw: &[u8],
    ) -> Result<(XLogRecord, DecodedBody), WalError> {
        let lsn = Lsn(f.lsn);
        let h = XLogRecord::parse(raw).ok_or(WalError::RecordTooShort {
            lsn,
            xl_tot_len: raw.len() as u32,
        })?;
        let raw = raw.get(..h.xl_tot_len as usize).unwrap_or(raw);
        if !rmgr_id_is_valid(h.xl_rmid, self.major) {
            return Err(WalError::BadRmgr {
                lsn,
                rmid: h.xl_rmid,
            });
        }
        let prev_ok = match self.prev {
            Some(p) => h.xl_prev == p,
            // Reading from a random position: it can only be checked to point backwards.
            None => h.xl_prev < lsn,
        };
        if !prev_ok {
            return Err(WalError::BadPrevLink {
                lsn,
                xl_prev: h.xl_prev,
                expected: self.prev,
            });
        }
        let computed = record_crc_with(raw, &mut self.crc_scratch);
        if computed != h.xl_crc {
            return Err(WalError::BadCrc {
                lsn,
                stored: h.xl_crc,
                computed,
            });
        }
        let body =
            decode_body(raw, self.major).map_err(|what| WalError::BadRecordBody { lsn, what })?;

        let mut end = maxalign(f.phys_end);
        if h.xl_rmid == RM_XLOG_ID && h.xl_info & XLR_RMGR_INFO_MASK == XLOG_SWITCH {
            // The rest of the segment is padding; the next record starts the next segment.
            end = end.div_ceil(self.seg_size) * self.seg_size;
        }
        self.next = end;
        self.prev = Some(lsn);
        self.need_until = 0;
        Ok((h, body))
    }

    /// The [`Record`] for a record `check_record` accepted.
    #[inline(always)]
    fn record<'b>(&self, f: &Found, raw: &'b [u8], h: XLogRecord, body: DecodedBody) -> Record<'b> {
        let raw = raw.get(..h.xl_tot_len as usize).unwrap_or(&[]);
        Record {
            lsn: Lsn(f.lsn),
            end_lsn: Lsn(self.next),
            xl_tot_len: h.xl_tot_len,
            xl_xid: h.xl_xid,
            xl_prev: h.xl_prev,
            xl_info: h.xl_info,
            xl_rmid: h.xl_rmid,
            xl_crc: h.xl_crc,
            main_data: raw.get(body.main_data).unwrap_or(&[]),
            record_origin: body.record_origin,
            toplevel_xid: body.toplevel_xid,
            block_count: body.block_count,
            major: self.major,
            raw,
        }
    }
}

/// A record whose bytes are all present.
struct Found {
    lsn: u64,
    /// Offset in the input (`Src`) when the record is in one piece there; `None` when in
    /// `rec_buf`.
    in_place: Option<usize>,
    /// LSN just past its last byte.
    phys_end: u64,
}

enum Step {
    Found(Found),
    NeedInput,
    /// The record was abandoned (overwritten contrecord): look again from `next`.
    Restart,
}

/// How far [`WalReader::walk_continuations`] got.
enum Walk {
    Complete,
    Incomplete,
    Overwritten,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::testdata::{segments, SEG_SIZE};

    /// What a test compares of a record: position, header and a digest of its bytes.
    type Seen = (Lsn, Lsn, u32, u8, u32, u32, usize);

    fn seen(rec: &Record<'_>) -> Seen {
        (
            rec.lsn,
            rec.end_lsn,
            rec.xl_crc,
            rec.block_count,
            crc32c::crc32c(rec.raw),
            crc32c::crc32c(rec.main_data),
            rec.raw.len(),
        )
    }

    /// The reader's position after reading, to compare the two ways of feeding it.
    fn position(r: &WalReader) -> (Lsn, Option<Lsn>, Lsn, Vec<u8>, Option<u16>, Option<u32>) {
        (
            r.next_lsn(),
            r.prev_record(),
            r.fed_until(),
            r.unconsumed().to_vec(),
            r.page_magic(),
            r.page_tli(),
        )
    }

    type Outcome = Result<Option<EndOfWal>, WalError>;

    /// `feed` + `next_record` over `all` in chunks of `chunk` bytes.
    fn by_feed(start: Lsn, all: &[u8], chunk: usize) -> (Vec<Seen>, Outcome, WalReader) {
        let mut r = WalReader::new(SEG_SIZE, start).unwrap();
        let mut out = Vec::new();
        let mut end = Ok(None);
        'input: for c in all.chunks(chunk) {
            r.feed(c);
            loop {
                match r.next_record() {
                    Ok(Next::Record(rec)) => out.push(seen(&rec)),
                    Ok(Next::NeedInput) => break,
                    Ok(Next::EndOfWal(e)) => {
                        end = Ok(Some(e));
                        break 'input;
                    }
                    Err(e) => {
                        end = Err(e);
                        break 'input;
                    }
                }
            }
        }
        (out, end, r)
    }

    /// `read_from` over `all` in chunks of `chunk` bytes.
    fn by_read_from(start: Lsn, all: &[u8], chunk: usize) -> (Vec<Seen>, Outcome, WalReader) {
        let mut r = WalReader::new(SEG_SIZE, start).unwrap();
        let mut out = Vec::new();
        let mut end = Ok(None);
        for c in all.chunks(chunk) {
            end = r.read_from(c, |rec| out.push(seen(&rec)));
            if !matches!(end, Ok(None)) {
                break;
            }
        }
        (out, end, r)
    }

    #[test]
    fn read_from_gives_what_feed_and_next_record_give() {
        // Three segments: records within a page, across pages (up to 25 of them), across the
        // segment boundary 07 -> 08, XLOG_SWITCH padding in 08 and the end of WAL in 09. Chunk
        // sizes put chunk boundaries inside page headers, record headers and records, and
        // exactly on pages and segments.
        let segs = segments();
        let all: Vec<u8> = segs.iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let start = Lsn::from_segno(segs[0].0, SEG_SIZE);
        let (reference, end, _) = by_feed(start, &all, all.len());
        assert!(reference.len() > 500);
        assert!(matches!(end, Ok(Some(_))));
        for chunk in [1usize, 7, 24, 4096, 8192, 8193, 100_000, SEG_SIZE as usize] {
            let (records, outcome, reader) = by_read_from(start, &all, chunk);
            assert_eq!(records, reference, "chunk size {chunk}");
            assert_eq!(outcome, end, "chunk size {chunk}");
            let (_, _, fed) = by_feed(start, &all, chunk);
            assert_eq!(position(&reader), position(&fed), "chunk size {chunk}");
        }
        // Stopping with a record continuing into input not given yet leaves the same carry.
        let seg7 = &segs[0].1;
        let (_, _, fed) = by_feed(start, seg7, seg7.len());
        let (_, outcome, read) = by_read_from(start, seg7, seg7.len());
        assert_eq!(outcome, Ok(None));
        assert_eq!(position(&read), position(&fed));
        assert!(!read.unconsumed().is_empty()); // the "cross" message, continued in 08
    }

    #[test]
    fn read_from_hands_out_records_in_place_and_assembles_only_page_crossers() {
        let segs = segments();
        let seg = &segs[0].1;
        let start = Lsn::from_segno(segs[0].0, SEG_SIZE);
        let inside = seg.as_ptr_range();
        let mut r = WalReader::new(SEG_SIZE, start).unwrap();
        let (mut in_place, mut assembled) = (0, 0);
        let end = r.read_from(seg, |rec| {
            let first_page = rec.lsn.0 / BLCKSZ;
            let last_page = (rec.lsn.0 + rec.xl_tot_len as u64 - 1) / BLCKSZ;
            let borrowed = inside.contains(&rec.raw.as_ptr());
            if first_page == last_page {
                assert!(borrowed, "record at {} should be read in place", rec.lsn);
                let at = (rec.lsn.0 - start.0) as usize;
                assert_eq!(rec.raw, &seg[at..at + rec.xl_tot_len as usize]);
                in_place += 1;
            } else {
                assert!(!borrowed, "record at {} crosses pages", rec.lsn);
                assembled += 1;
            }
        });
        assert_eq!(end, Ok(None));
        assert!(in_place > 500 && assembled > 20, "{in_place} {assembled}");
    }

    #[test]
    fn read_from_and_feed_agree_on_damaged_wal() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let segs = segments();
        let start = Lsn::from_segno(segs[0].0, SEG_SIZE);
        let base = &segs[0].1[..300 * 1024];
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut b = base.to_vec();
            for _ in 0..rng.gen_range(1..3) {
                let at = rng.gen_range(0..b.len());
                match rng.gen_range(0..3) {
                    0 => b[at] ^= 1 << rng.gen_range(0..8),
                    1 => {
                        let end = (at + rng.gen_range(1..20_000)).min(b.len());
                        b[at..end].fill(0);
                    }
                    _ => b.truncate(at),
                }
            }
            let chunk = rng.gen_range(1..40_000);
            let (want, want_end, fed) = by_feed(start, &b, chunk);
            let (got, got_end, read) = by_read_from(start, &b, chunk);
            assert_eq!(got, want, "seed {seed}");
            assert_eq!(got_end, want_end, "seed {seed}");
            assert_eq!(
                (read.next_lsn(), read.prev_record()),
                (fed.next_lsn(), fed.prev_record()),
                "seed {seed}"
            );
        }
    }
}

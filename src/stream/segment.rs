//! The open segment: received WAL bytes turned into upload jobs. Pure: no I/O, no clocks.
//!
//! [`OpenSegment`] holds the bytes of the one segment being filled, at most one segment
//! (`wal_segment_size`) of memory, whatever the lag. It hands out:
//! - a [`Job::Segment`] as soon as the segment is complete, with exactly the bytes PostgreSQL
//!   wrote to `pg_wal/<name>`, so the stored object is byte-identical to archive-push's;
//! - a [`Job::Chunk`] on demand (timer, size, synchronous mode) with the bytes received since
//!   the previous chunk: chunks of one segment never overlap and always continue the chain;
//! - on a timeline switch, the `.history` file and the old timeline's last segment as
//!   `.partial`, zero-padded to the segment size as PostgreSQL and pg_receivewal leave it.

use tokio::sync::OwnedSemaphorePermit;

use super::budget::{ChunkData, SegBuf};
use crate::repo::ChunkRef;
use crate::wal::{Lsn, SegNo, TimelineId, WalFileName};

/// Work for the uploader, in the order it must become durable.
#[derive(Debug)]
pub enum Job {
    /// Bytes `[start, end)` of the open segment `segment`.
    Chunk {
        segment: WalFileName,
        start: u32,
        end: u32,
        data: ChunkData,
        durable_end: Lsn,
    },
    /// A completed segment; `chunks` are its chunks, deleted once it is stored.
    Segment {
        name: WalFileName,
        data: SegBuf,
        chunks: Vec<ChunkRef>,
        durable_end: Lsn,
    },
    /// The last, incomplete segment of a timeline that ended (`<name>.partial`).
    Partial {
        name: WalFileName,
        data: SegBuf,
        chunks: Vec<ChunkRef>,
        durable_end: Lsn,
    },
    /// A timeline history file, fetched with TIMELINE_HISTORY.
    History { name: WalFileName, data: Vec<u8> },
    /// A segment (or `.partial`) larger than the memory window, complete in its chunks, all
    /// shipped before this job: stored as a chunked segment naming them.
    Chunked {
        name: WalFileName,
        wal_bytes: u64,
        durable_end: Lsn,
    },
}

impl Job {
    /// The WAL position durable in the repository once this job is stored (`None`: a history
    /// file, which does not move the WAL position).
    pub fn durable_end(&self) -> Option<Lsn> {
        match self {
            Job::Chunk { durable_end, .. }
            | Job::Segment { durable_end, .. }
            | Job::Partial { durable_end, .. }
            | Job::Chunked { durable_end, .. } => Some(*durable_end),
            Job::History { .. } => None,
        }
    }

    /// Bytes of WAL content this job stores.
    pub fn content_len(&self) -> usize {
        match self {
            Job::Chunk { data, .. } => data.data.len(),
            Job::Segment { data, .. } | Job::Partial { data, .. } => data.len(),
            Job::History { data, .. } => data.len(),
            Job::Chunked { .. } => 0,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Job::Chunk { .. } => "chunk",
            Job::Segment { .. } => "segment",
            Job::Partial { .. } => "partial",
            Job::History { .. } => "history",
            Job::Chunked { .. } => "chunked",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("WAL is not contiguous: expected data at {expected}, got {got}")]
    NotContiguous { expected: Lsn, got: Lsn },
    #[error(
        "resuming at {start} needs the segment's first {needed} bytes, but {have} were loaded"
    )]
    BadPreload { start: Lsn, needed: u64, have: u64 },
}

/// The segment being filled.
#[derive(Debug)]
pub struct OpenSegment {
    seg_size: u64,
    tli: TimelineId,
    segno: SegNo,
    /// Bytes `[base, base + buf.len())` of the segment. Between segments (after one completed, before
    /// the assembler installs the next buffer) an unbudgeted empty placeholder.
    buf: SegBuf,
    /// Segment offset of `buf[0]`: 0, except in windowed mode, where shipped bytes leave `buf`.
    base: usize,
    /// Windowed mode (segments larger than the memory budget allows): `buf` holds at most this
    /// many bytes, every byte leaves as a chunk, and a complete segment becomes
    /// [`Job::Chunked`]. The whole segment is never in memory.
    window: Option<usize>,
    /// Bytes `buf[..shipped]` were handed out as chunks (or were already stored when resuming).
    shipped: usize,
    /// Chunk objects of this segment, to delete once the segment is stored.
    chunks: Vec<ChunkRef>,
}

impl OpenSegment {
    /// Starts filling at `start` on `tli`. When resuming inside a segment, `preloaded` holds the
    /// segment's bytes before `start` (read back from its chunks, all of them durable) and
    /// `chunks` the chunk objects found. `buf` is the (empty) buffer to fill.
    pub fn new(
        tli: TimelineId,
        start: Lsn,
        seg_size: u64,
        preloaded: Vec<u8>,
        chunks: Vec<ChunkRef>,
        mut buf: SegBuf,
    ) -> Result<OpenSegment, SegmentError> {
        let offset = start.segment_offset(seg_size);
        if preloaded.len() as u64 != offset {
            return Err(SegmentError::BadPreload {
                start,
                needed: offset,
                have: preloaded.len() as u64,
            });
        }
        buf.clear();
        buf.extend_from_slice(&preloaded);
        Ok(OpenSegment {
            seg_size,
            tli,
            segno: start.segno(seg_size),
            shipped: buf.len(),
            base: 0,
            window: None,
            buf,
            chunks,
        })
    }

    /// Starts filling at `start` in windowed mode (see [`OpenSegment::window`]): `buf` holds
    /// `window` bytes at most. The segment's bytes before `start` are durable in its chunks and
    /// are not read back.
    pub fn windowed(
        tli: TimelineId,
        start: Lsn,
        seg_size: u64,
        window: usize,
        mut buf: SegBuf,
    ) -> OpenSegment {
        buf.clear();
        OpenSegment {
            seg_size,
            tli,
            segno: start.segno(seg_size),
            shipped: 0,
            base: start.segment_offset(seg_size) as usize,
            window: Some(window),
            buf,
            chunks: vec![],
        }
    }

    pub fn is_windowed(&self) -> bool {
        self.window.is_some()
    }

    /// Segment offset of the next received byte.
    fn filled(&self) -> usize {
        self.base + self.buf.len()
    }

    /// Windowed mode: the window is full or the segment complete, and the bytes must leave as
    /// a chunk before more can be taken (or the segment stored).
    pub fn must_ship(&self) -> bool {
        let Some(window) = self.window else {
            return false;
        };
        self.unshipped() > 0 && (self.buf.len() == window || self.filled() as u64 == self.seg_size)
    }

    /// Windowed mode: once the complete segment's last chunk is handed out, the job storing it
    /// as a chunked segment; the open segment moves on to the next one.
    pub fn complete_windowed(&mut self) -> Option<Job> {
        if self.window.is_none() || self.filled() as u64 != self.seg_size || self.unshipped() > 0 {
            return None;
        }
        let job = Job::Chunked {
            name: self.name(),
            wal_bytes: self.seg_size,
            durable_end: self.segment_end(),
        };
        self.segno += 1;
        self.base = 0;
        self.buf.clear();
        self.shipped = 0;
        self.chunks.clear();
        Some(job)
    }

    pub fn timeline(&self) -> TimelineId {
        self.tli
    }

    fn seg_start(&self) -> Lsn {
        Lsn::from_segno(self.segno, self.seg_size)
    }

    /// Where the next received byte belongs.
    pub fn next_lsn(&self) -> Lsn {
        Lsn(self.seg_start().0 + self.filled() as u64)
    }

    /// First byte after the open segment.
    pub fn segment_end(&self) -> Lsn {
        Lsn::from_segno(self.segno + 1, self.seg_size)
    }

    /// Received bytes not yet handed out as a chunk or segment.
    pub fn unshipped(&self) -> usize {
        self.buf.len() - self.shipped
    }

    pub fn name(&self) -> WalFileName {
        WalFileName::segment(self.tli, self.segno, self.seg_size)
    }

    /// Whether a buffer must be [`install`](Self::install)ed before the next [`push`](Self::push)
    /// (after a segment completed or the timeline switched).
    pub fn needs_buffer(&self) -> bool {
        !self.buf.is_budgeted() && self.buf.capacity() == 0
    }

    /// Gives the open segment its (empty) buffer.
    pub fn install(&mut self, mut buf: SegBuf) {
        debug_assert!(self.buf.is_empty());
        buf.clear();
        self.buf = buf;
    }

    /// Appends WAL received at `lsn`, up to the end of the open segment; returns how many bytes
    /// it took. Pushes a [`Job::Segment`] to `out` when the segment completes; the rest of
    /// `data` goes into the next segment, after [`install`](Self::install). A gap or overlap is
    /// an error: it would store WAL that PostgreSQL never wrote.
    pub fn push(
        &mut self,
        lsn: Lsn,
        data: &[u8],
        out: &mut Vec<Job>,
    ) -> Result<usize, SegmentError> {
        let expected = self.next_lsn();
        if lsn != expected {
            return Err(SegmentError::NotContiguous { expected, got: lsn });
        }
        if data.is_empty() {
            return Ok(0);
        }
        assert!(!self.needs_buffer(), "push without a segment buffer");
        let mut room = self.seg_size as usize - self.filled();
        if let Some(window) = self.window {
            room = room.min(window - self.buf.len());
        }
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.window.is_none() && self.buf.len() as u64 == self.seg_size {
            out.push(self.complete());
        }
        Ok(n)
    }

    fn complete(&mut self) -> Job {
        let name = self.name();
        let durable_end = self.segment_end();
        let data = std::mem::take(&mut self.buf);
        let chunks = std::mem::take(&mut self.chunks);
        self.segno += 1;
        self.shipped = 0;
        Job::Segment {
            name,
            data,
            chunks,
            durable_end,
        }
    }

    /// The bytes received since the last chunk, as a chunk job; `None` when there are none
    /// (an idle stream ships nothing).
    /// `permit` is the budget for the copy ([`unshipped`](Self::unshipped) bytes).
    pub fn take_chunk(&mut self, permit: Option<OwnedSemaphorePermit>) -> Option<Job> {
        if self.unshipped() == 0 {
            return None;
        }
        let segment = self.name();
        // Offsets fit in u32: PostgreSQL segments are at most 1 GiB.
        let (start, end) = ((self.base + self.shipped) as u32, self.filled() as u32);
        self.chunks.push(ChunkRef {
            segment: segment.clone(),
            start,
            end,
        });
        let data = ChunkData {
            data: bytes::Bytes::copy_from_slice(&self.buf[self.shipped..]),
            permit,
        };
        let durable_end = self.next_lsn();
        if self.window.is_some() {
            // Shipped bytes leave memory: the chunk is the only copy the stream keeps.
            self.base += self.buf.len();
            self.buf.clear();
            self.shipped = 0;
        } else {
            self.shipped = self.buf.len();
        }
        Some(Job::Chunk {
            segment,
            start,
            end,
            data,
            durable_end,
        })
    }

    /// [`Self::switch_timeline`] in windowed mode: everything received is already shipped as
    /// chunks (the assembler ships before switching), so the `.partial` names them.
    fn switch_windowed(&mut self, next_tli: TimelineId, switch: Lsn, out: &mut Vec<Job>) -> Lsn {
        debug_assert_eq!(self.unshipped(), 0, "ship before switching");
        if self.filled() > 0 {
            out.push(Job::Chunked {
                name: self.partial_name(),
                wal_bytes: self.filled() as u64,
                durable_end: self.next_lsn(),
            });
        }
        self.tli = next_tli;
        self.segno = switch.segno(self.seg_size);
        self.base = 0;
        self.buf.clear();
        self.shipped = 0;
        self.chunks.clear();
        self.seg_start()
    }

    fn partial_name(&self) -> WalFileName {
        let per_id = 0x1_0000_0000 / self.seg_size;
        WalFileName::Partial {
            tli: self.tli,
            log: (self.segno / per_id) as u32,
            seg: (self.segno % per_id) as u32,
        }
    }

    /// Windowed mode: the bytes received since the last chunk leave as a chunk in the very
    /// buffer that holds them (no copy; it goes back to the pool, and its budget is released,
    /// once the chunk is stored) and `next` becomes the window. `None` when there are none.
    pub fn take_window(&mut self, next: SegBuf) -> Option<Job> {
        debug_assert!(self.window.is_some() && self.shipped == 0);
        if self.unshipped() == 0 {
            return None;
        }
        let segment = self.name();
        let (start, end) = (self.base as u32, self.filled() as u32);
        let durable_end = self.next_lsn();
        self.base = self.filled();
        let mut next = next;
        next.clear();
        let full = std::mem::replace(&mut self.buf, next);
        Some(Job::Chunk {
            segment,
            start,
            end,
            data: ChunkData {
                data: bytes::Bytes::from_owner(full),
                permit: None,
            },
            durable_end,
        })
    }

    /// The timeline ended at `switch` (all its WAL up to there has been pushed). Emits the new
    /// timeline's history file and the old timeline's last segment as `.partial`, then restarts
    /// on `next_tli` at the start of the segment holding `switch`: the server streams the new
    /// timeline's copy of that segment from its beginning, as pg_receivewal asks it to.
    pub fn switch_timeline(
        &mut self,
        next_tli: TimelineId,
        switch: Lsn,
        history: (WalFileName, Vec<u8>),
        out: &mut Vec<Job>,
    ) -> Lsn {
        out.push(Job::History {
            name: history.0,
            data: history.1,
        });
        if self.window.is_some() {
            return self.switch_windowed(next_tli, switch, out);
        }
        if !self.buf.is_empty() {
            let name = self.partial_name();
            let durable_end = self.next_lsn();
            let mut data = std::mem::take(&mut self.buf);
            data.resize(self.seg_size as usize, 0);
            out.push(Job::Partial {
                name,
                data,
                chunks: std::mem::take(&mut self.chunks),
                durable_end,
            });
        }
        self.tli = next_tli;
        self.segno = switch.segno(self.seg_size);
        self.buf = SegBuf::default();
        self.shipped = 0;
        self.chunks.clear();
        self.seg_start()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;

    fn buf() -> SegBuf {
        SegBuf::unbudgeted(Vec::with_capacity(SEG as usize))
    }

    /// Pushes all of `data`, installing a fresh buffer whenever a segment completes.
    fn push_all(
        s: &mut OpenSegment,
        lsn: Lsn,
        data: &[u8],
        out: &mut Vec<Job>,
    ) -> Result<(), SegmentError> {
        let mut off = 0;
        loop {
            if s.needs_buffer() {
                s.install(buf());
            }
            off += s.push(Lsn(lsn.0 + off as u64), &data[off..], out)?;
            if off == data.len() {
                return Ok(());
            }
        }
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn segments_complete_with_exact_bytes_across_messages() {
        let mut s = OpenSegment::new(1, Lsn(SEG * 3), SEG, vec![], vec![], buf()).unwrap();
        let all = bytes(2 * SEG as usize + 100, 7);
        let mut out = vec![];
        let mut lsn = SEG * 3;
        for piece in all.chunks(128 * 1024 + 3) {
            push_all(&mut s, Lsn(lsn), piece, &mut out).unwrap();
            lsn += piece.len() as u64;
        }
        assert_eq!(out.len(), 2);
        match &out[0] {
            Job::Segment {
                name,
                data,
                durable_end,
                ..
            } => {
                assert_eq!(name.to_string(), "000000010000000000000003");
                assert_eq!(data.as_slice(), &all[..SEG as usize]);
                assert_eq!(*durable_end, Lsn(SEG * 4));
            }
            j => panic!("{j:?}"),
        }
        assert_eq!(s.next_lsn(), Lsn(SEG * 5 + 100));
        assert_eq!(s.unshipped(), 100);
    }

    #[test]
    fn chunks_continue_each_other_and_idle_ships_nothing() {
        let mut s = OpenSegment::new(1, Lsn(0), SEG, vec![], vec![], buf()).unwrap();
        let mut out = vec![];
        push_all(&mut s, Lsn(0), &bytes(1000, 1), &mut out).unwrap();
        let Some(Job::Chunk {
            start,
            end,
            durable_end,
            ..
        }) = s.take_chunk(None)
        else {
            panic!()
        };
        assert_eq!((start, end, durable_end), (0, 1000, Lsn(1000)));
        assert!(s.take_chunk(None).is_none());
        push_all(&mut s, Lsn(1000), &bytes(500, 2), &mut out).unwrap();
        let Some(Job::Chunk { start, end, .. }) = s.take_chunk(None) else {
            panic!()
        };
        assert_eq!((start, end), (1000, 1500));
        // Completing the segment hands over the chunk keys for deletion.
        push_all(&mut s, Lsn(1500), &bytes(SEG as usize - 1500, 3), &mut out).unwrap();
        let Job::Segment { chunks, .. } = &out[0] else {
            panic!()
        };
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[1].start, chunks[1].end), (1000, 1500));
    }

    #[test]
    fn gaps_and_overlaps_are_refused() {
        let mut s = OpenSegment::new(1, Lsn(0), SEG, vec![], vec![], buf()).unwrap();
        let mut out = vec![];
        push_all(&mut s, Lsn(0), &[1; 10], &mut out).unwrap();
        assert!(push_all(&mut s, Lsn(11), &[1], &mut out).is_err());
        assert!(push_all(&mut s, Lsn(9), &[1], &mut out).is_err());
    }

    #[test]
    fn resume_preloads_durable_bytes() {
        let pre = bytes(4096, 9);
        let k = ChunkRef {
            segment: WalFileName::segment(1, 1, SEG),
            start: 0,
            end: 4096,
        };
        assert!(OpenSegment::new(1, Lsn(SEG + 100), SEG, pre.clone(), vec![], buf()).is_err());
        let mut s =
            OpenSegment::new(1, Lsn(SEG + 4096), SEG, pre.clone(), vec![k.clone()], buf()).unwrap();
        assert_eq!(s.unshipped(), 0);
        let mut out = vec![];
        push_all(
            &mut s,
            Lsn(SEG + 4096),
            &bytes(SEG as usize - 4096, 1),
            &mut out,
        )
        .unwrap();
        let Job::Segment { data, chunks, .. } = &out[0] else {
            panic!()
        };
        assert_eq!(&data[..4096], pre.as_slice());
        assert_eq!(chunks, &vec![k]);
    }

    #[test]
    fn timeline_switch_stores_padded_partial_and_rewinds() {
        let mut s = OpenSegment::new(1, Lsn(SEG * 3), SEG, vec![], vec![], buf()).unwrap();
        let mut out = vec![];
        push_all(&mut s, Lsn(SEG * 3), &bytes(0x158, 4), &mut out).unwrap();
        let hist = (
            WalFileName::History { tli: 2 },
            b"1\t0/300158\tno reason\n".to_vec(),
        );
        let restart = s.switch_timeline(2, Lsn(SEG * 3 + 0x158), hist, &mut out);
        assert_eq!(restart, Lsn(SEG * 3));
        assert_eq!(s.name().to_string(), "000000020000000000000003");
        assert!(matches!(&out[0], Job::History { .. }));
        let Job::Partial {
            name,
            data,
            durable_end,
            ..
        } = &out[1]
        else {
            panic!()
        };
        assert_eq!(name.to_string(), "000000010000000000000003.partial");
        assert_eq!(data.len() as u64, SEG);
        assert!(data[0x158..].iter().all(|&b| b == 0));
        assert_eq!(*durable_end, Lsn(SEG * 3 + 0x158));
    }

    const WIN: usize = 64 * 1024;

    /// Pushes all of `data` in windowed mode, shipping chunks as the assembler does.
    fn push_windowed(s: &mut OpenSegment, lsn: Lsn, data: &[u8], out: &mut Vec<Job>) {
        let mut off = 0;
        while off < data.len() {
            off += s.push(Lsn(lsn.0 + off as u64), &data[off..], out).unwrap();
            if s.must_ship() {
                let next = SegBuf::unbudgeted(Vec::with_capacity(WIN));
                out.extend(s.take_window(next));
                out.extend(s.complete_windowed());
            }
        }
    }

    #[test]
    fn windowed_segments_leave_as_chunks_and_never_fill_memory() {
        let buf = || SegBuf::unbudgeted(Vec::with_capacity(WIN));
        // Resuming 0x3000 bytes into segment 2.
        let mut s = OpenSegment::windowed(1, Lsn(2 * SEG + 0x3000), SEG, WIN, buf());
        let all = bytes(2 * SEG as usize, 5);
        let mut out = vec![];
        let mut lsn = 2 * SEG + 0x3000;
        for piece in all.chunks(100_003) {
            push_windowed(&mut s, Lsn(lsn), piece, &mut out);
            assert!(s.buf.len() <= WIN && s.buf.capacity() <= WIN);
            lsn += piece.len() as u64;
        }
        let mut pos = 2 * SEG + 0x3000;
        let mut got = vec![];
        let mut completed = vec![];
        for j in &out {
            match j {
                Job::Chunk {
                    segment,
                    start,
                    end,
                    data,
                    ..
                } => {
                    let seg_start = segment.segno(SEG).unwrap() * SEG;
                    assert_eq!(seg_start + u64::from(*start), pos, "chunks continue");
                    assert!((*end - *start) as usize <= WIN);
                    pos = seg_start + u64::from(*end);
                    got.extend_from_slice(&data.data);
                }
                Job::Chunked {
                    name,
                    wal_bytes,
                    durable_end,
                } => {
                    assert_eq!(*wal_bytes, SEG);
                    assert_eq!(*durable_end, Lsn(pos), "stored after its last chunk");
                    completed.push(name.to_string());
                }
                j => panic!("{j:?}"),
            }
        }
        assert_eq!(
            completed,
            ["000000010000000000000002", "000000010000000000000003"]
        );
        assert_eq!(got, &all[..got.len()]);
        assert_eq!(s.next_lsn(), Lsn(lsn));
        // A timeline switch after shipping names the chunks as a `.partial`.
        out.clear();
        out.extend(s.take_window(buf()));
        let hist = (WalFileName::History { tli: 2 }, b"1\t0/1\tx\n".to_vec());
        let restart = s.switch_timeline(2, s.next_lsn(), hist, &mut out);
        assert_eq!(restart, Lsn(4 * SEG));
        let Some(Job::Chunked {
            name, wal_bytes, ..
        }) = out.last()
        else {
            panic!("{out:?}")
        };
        assert_eq!(name.to_string(), "000000010000000000000004.partial");
        assert_eq!(*wal_bytes, 0x3000);
    }
}

//! The `lz4-blocks` payload (codec id 3): the content cut into blocks, each compressed with lz4
//! on its own, so that a writer compresses as it reads (one small reused input buffer) and a
//! reader decompresses block by block into its destination (no content-sized buffer).
//!
//! ```text
//! payload = block*            (no blocks for empty content)
//! block   = raw_len u32 LE    1 ..= MAX_BLOCK_LEN bytes of content
//!           word u32 LE       bits 0..31: stored_len; bit 31: 1 = stored as is (stored_len = raw_len)
//!           stored_len bytes  an lz4 block (lz4_flex::block / LZ4_compress_default format)
//!                             decompressing to exactly raw_len bytes, or the content as is
//! ```
//! The frame header's checksums cover the whole payload and the whole content, as for every
//! codec; the raw lengths must add up to the header's `raw_len` and the last block must end the
//! payload. Blocks are independent (no dictionary from the previous one): lz4 looks back 64 KiB
//! at most, so blocks of [`BLOCK_LEN`] lose little.

use super::error::CodecError;

/// Content bytes per block that pitr writes (readers accept any size up to the maximum).
pub const BLOCK_LEN: usize = 256 * 1024;
/// Largest block a reader accepts: bounds what a crafted header makes it allocate.
pub const MAX_BLOCK_LEN: usize = 4 << 20;
const BLOCK_HEADER_LEN: usize = 8;
const STORED_AS_IS: u32 = 1 << 31;

/// Page size the buffers below align to: the kernel copies between a page-aligned buffer and
/// the page cache with fast string moves; into or from a buffer misaligned by malloc's 16-byte
/// header the same copy ran at a quarter of the speed on AMD EPYC (measured for the prefetch
/// spool's check, src/archive/prefetch/spool.rs). On the Intel VM of docs/benchmarks.md it
/// makes no measurable difference; it costs one page.
pub const ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes whose slice `[start..start + len]` is page-aligned: the
/// buffer and `start`.
pub fn aligned_buffer(len: usize) -> (Vec<u8>, usize) {
    let backing = vec![0u8; len + ALIGN];
    let start = backing.as_ptr().align_offset(ALIGN).min(ALIGN);
    (backing, start)
}

/// Largest payload `raw_len` bytes of content can take, cut into blocks of [`BLOCK_LEN`].
pub fn max_payload_len(raw_len: usize) -> usize {
    let blocks = raw_len.div_ceil(BLOCK_LEN);
    blocks * BLOCK_HEADER_LEN + raw_len
}

/// Builds an `lz4-blocks` payload block by block, after `room` leading bytes left for headers.
/// The CRC-32C of the content and of the payload are kept as it goes.
pub struct BlockWriter {
    out: Vec<u8>,
    /// Where the room starts in `out` (0, or what page-aligns it).
    start: usize,
    /// Bytes of `out` written; `out` may be longer (zeroed room for the next block, already
    /// touched), so that growing it never zeroes the same pages twice.
    used: usize,
    room: usize,
    raw_len: u64,
    raw_crc: u32,
    payload_crc: u32,
    /// Payload bytes handed out by [`BlockWriter::flush`] (no longer in `out`).
    flushed: u64,
}

/// Lengths and checksums of a payload written by a [`BlockWriter`], for its frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSums {
    pub raw_len: u64,
    pub payload_len: u64,
    pub raw_crc32c: u32,
    pub payload_crc32c: u32,
}

/// What [`BlockWriter::finish`] hands back.
pub struct Blocks {
    /// `start` bytes of padding, `room` bytes (zero), then the payload.
    pub out: Vec<u8>,
    pub start: usize,
    pub raw_len: u64,
    pub raw_crc32c: u32,
    pub payload_crc32c: u32,
}

impl BlockWriter {
    /// A writer for content of about `expected_len` bytes: the output's capacity is reserved up
    /// front (address space only; pages are touched as the payload grows into them), so it
    /// never moves.
    pub fn new(room: usize, expected_len: usize) -> BlockWriter {
        Self::with_buffer(Vec::new(), room, expected_len, false)
    }

    /// [`Self::new`] writing into `out` (emptied first): a job that encodes object after object
    /// hands the same few buffers round, so their pages are faulted in once, not per object.
    pub fn reusing(out: Vec<u8>, room: usize, expected_len: usize) -> BlockWriter {
        Self::with_buffer(out, room, expected_len, false)
    }

    /// [`Self::new`], with the room page-aligned (see [`ALIGN`]): for output that is written to
    /// a file as it lies. [`Blocks::start`] says where it begins.
    pub fn aligned(room: usize, expected_len: usize) -> BlockWriter {
        Self::with_buffer(Vec::new(), room, expected_len, true)
    }

    fn with_buffer(mut out: Vec<u8>, room: usize, expected_len: usize, align: bool) -> BlockWriter {
        // The last block is compressed into lz4's bound, a little over its length.
        out.clear();
        out.reserve(
            ALIGN
                + room
                + max_payload_len(expected_len)
                + lz4_flex::block::get_maximum_output_size(BLOCK_LEN)
                + BLOCK_HEADER_LEN,
        );
        let start = match align {
            true => out.as_ptr().align_offset(ALIGN).min(ALIGN),
            false => 0,
        };
        out.resize(start + room, 0);
        BlockWriter {
            out,
            start,
            used: start + room,
            room,
            raw_len: 0,
            raw_crc: 0,
            payload_crc: 0,
            flushed: 0,
        }
    }

    /// A writer whose blocks are taken out with [`Self::flush`] as they are made (written to
    /// a file by the caller), so that it holds one block at a time: no room, and a page-aligned
    /// buffer of one compressed block, reused (zeroed once).
    pub fn streamed() -> BlockWriter {
        Self::with_buffer(Vec::new(), 0, BLOCK_LEN, true)
    }

    /// Hands the payload bytes made since the last flush to `sink`, then forgets them (the
    /// checksums keep them). For a writer without room ([`Self::streamed`]).
    pub fn flush<E>(&mut self, sink: impl FnOnce(&[u8]) -> Result<(), E>) -> Result<(), E> {
        let from = self.start + self.room;
        sink(&self.out[from..self.used])?;
        self.flushed += (self.used - from) as u64;
        self.used = from;
        Ok(())
    }

    /// Lengths and checksums of the whole payload so far, flushed or not.
    pub fn sums(&self) -> BlockSums {
        BlockSums {
            raw_len: self.raw_len,
            payload_len: self.flushed + (self.used - self.start - self.room) as u64,
            raw_crc32c: self.raw_crc,
            payload_crc32c: self.payload_crc,
        }
    }

    /// Appends `raw` as blocks of at most [`BLOCK_LEN`] bytes.
    pub fn write(&mut self, raw: &[u8]) {
        for block in raw.chunks(BLOCK_LEN) {
            self.block(block);
        }
    }

    /// Appends `raw` (1 ..= [`MAX_BLOCK_LEN`] bytes) as one block.
    pub(crate) fn block(&mut self, raw: &[u8]) {
        let start = self.used;
        // lz4's bound is above raw.len(); room for it is zeroed once and reused.
        let room = BLOCK_HEADER_LEN + lz4_flex::block::get_maximum_output_size(raw.len());
        if self.out.len() < start + room {
            self.out.resize(start + room, 0);
        }
        self.used = start + encode_block(raw, &mut self.out[start..]);
        self.raw_len += raw.len() as u64;
        self.raw_crc = super::crc::crc32c_append(self.raw_crc, raw);
        self.payload_crc = super::crc::crc32c_append(self.payload_crc, &self.out[start..self.used]);
    }

    /// Appends blocks made elsewhere ([`BlockArena`]) for the content that follows this
    /// writer's: blocks are independent, so the joined payload is byte for byte the one a
    /// single writer makes, and the checksums are combined.
    pub fn join(&mut self, run: &BlockRun<'_>) {
        self.out.truncate(self.used);
        self.out.extend_from_slice(run.payload);
        self.used = self.out.len();
        self.count(run);
    }

    /// [`Self::join`] for a streamed writer whose caller writes `run`'s payload out itself,
    /// right after flushing this writer: only the lengths and checksums are joined.
    pub fn join_flushed(&mut self, run: &BlockRun<'_>) {
        debug_assert_eq!(self.used, self.start + self.room, "blocks still pending");
        self.count(run);
        self.flushed += run.payload.len() as u64;
    }

    fn count(&mut self, run: &BlockRun<'_>) {
        let payload_len = run.payload.len() as u64;
        self.raw_len += run.raw_len;
        self.raw_crc = super::crc::crc32c_combine(self.raw_crc, run.raw_crc32c, run.raw_len);
        self.payload_crc =
            super::crc::crc32c_combine(self.payload_crc, run.payload_crc32c, payload_len);
    }

    pub fn finish(mut self) -> Blocks {
        self.out.truncate(self.used);
        debug_assert!(self.out.len() >= self.start + self.room);
        Blocks {
            out: self.out,
            start: self.start,
            raw_len: self.raw_len,
            raw_crc32c: self.raw_crc,
            payload_crc32c: self.payload_crc,
        }
    }
}

/// Encodes `raw` (1 ..= [`MAX_BLOCK_LEN`] bytes) as one block at the start of `out`, which
/// has room for lz4's bound; the block's length.
fn encode_block(raw: &[u8], out: &mut [u8]) -> usize {
    let data = &mut out[BLOCK_HEADER_LEN..];
    let (stored_len, word) = match lz4_flex::block::compress_into(raw, data) {
        Ok(n) if n < raw.len() => (n, n as u32),
        // Not smaller (or, impossibly, over the bound): keep the bytes as they are.
        _ => {
            data[..raw.len()].copy_from_slice(raw);
            (raw.len(), raw.len() as u32 | STORED_AS_IS)
        }
    };
    out[0..4].copy_from_slice(&(raw.len() as u32).to_le_bytes());
    out[4..BLOCK_HEADER_LEN].copy_from_slice(&word.to_le_bytes());
    BLOCK_HEADER_LEN + stored_len
}

/// Consecutive blocks of a payload, with their checksums: what [`BlockWriter::join`] appends.
#[derive(Clone, Copy, Debug)]
pub struct BlockRun<'a> {
    pub payload: &'a [u8],
    pub raw_len: u64,
    pub raw_crc32c: u32,
    pub payload_crc32c: u32,
}

/// Blocks made in any order (a second thread taking a content's blocks from its end), kept in
/// one buffer and handed back in content order. One scratch block zeroed once; the buffer
/// holds only what the blocks take.
pub struct BlockArena {
    out: Vec<u8>,
    scratch: Vec<u8>,
    /// Content position (any key that orders the blocks), range in `out`, raw length and CRCs.
    blocks: Vec<(u64, std::ops::Range<usize>, u64, u32, u32)>,
}

impl BlockArena {
    /// An arena for blocks of up to `max_raw` bytes, about `expected` bytes of them in all.
    pub fn new(max_raw: usize, expected: usize) -> BlockArena {
        BlockArena {
            out: Vec::with_capacity(max_payload_len(expected)),
            scratch: vec![0; BLOCK_HEADER_LEN + lz4_flex::block::get_maximum_output_size(max_raw)],
            blocks: Vec::new(),
        }
    }

    /// Encodes `raw` (1 ..= the arena's `max_raw` bytes) as the block at content position
    /// `at`.
    pub fn add(&mut self, at: u64, raw: &[u8]) {
        let n = encode_block(raw, &mut self.scratch);
        let from = self.out.len();
        self.out.extend_from_slice(&self.scratch[..n]);
        let payload_crc = super::crc::crc32c(&self.out[from..]);
        let raw_crc = super::crc::crc32c(raw);
        self.blocks.push((
            at,
            from..self.out.len(),
            raw.len() as u64,
            raw_crc,
            payload_crc,
        ));
    }

    /// The blocks in content order, one run each.
    pub fn in_order(&mut self) -> impl Iterator<Item = BlockRun<'_>> {
        self.blocks.sort_unstable_by_key(|b| b.0);
        let out = &self.out;
        self.blocks
            .iter()
            .map(move |(_, range, raw_len, raw_crc, payload_crc)| BlockRun {
                payload: &out[range.clone()],
                raw_len: *raw_len,
                raw_crc32c: *raw_crc,
                payload_crc32c: *payload_crc,
            })
    }

    /// Content bytes of all the blocks.
    pub fn raw_len(&self) -> u64 {
        self.blocks.iter().map(|b| b.2).sum()
    }
}

/// One block of a payload, located and checked for shape (not yet decompressed).
struct BlockRef<'a> {
    raw_len: usize,
    stored: &'a [u8],
    as_is: bool,
}

fn bad(at: usize, what: impl std::fmt::Display) -> CodecError {
    CodecError::Decompress {
        message: format!("lz4 block at payload offset {at}: {what}"),
    }
}

/// Splits off the block at the start of `rest` (which is at payload offset `at`).
fn next_block(rest: &[u8], at: usize) -> Result<(BlockRef<'_>, &[u8]), CodecError> {
    if rest.len() < BLOCK_HEADER_LEN {
        return Err(bad(at, "block header cut short"));
    }
    let raw_len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let word = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let as_is = word & STORED_AS_IS != 0;
    let stored_len = (word & !STORED_AS_IS) as usize;
    if raw_len == 0 || raw_len > MAX_BLOCK_LEN {
        return Err(bad(at, format_args!("block length {raw_len} out of range")));
    }
    if as_is && stored_len != raw_len {
        return Err(bad(at, "stored block of the wrong length"));
    }
    let body = &rest[BLOCK_HEADER_LEN..];
    if stored_len > body.len() {
        return Err(bad(at, "block cut short"));
    }
    let (stored, rest) = body.split_at(stored_len);
    Ok((
        BlockRef {
            raw_len,
            stored,
            as_is,
        },
        rest,
    ))
}

/// Decompresses one block into `dest` (exactly `b.raw_len` bytes).
fn expand(b: &BlockRef<'_>, dest: &mut [u8], at: usize) -> Result<(), CodecError> {
    if b.as_is {
        dest.copy_from_slice(b.stored);
        return Ok(());
    }
    match lz4_flex::block::decompress_into(b.stored, dest) {
        Ok(n) if n == b.raw_len => Ok(()),
        Ok(n) => Err(bad(
            at,
            format_args!("decompresses to {n} bytes, not {}", b.raw_len),
        )),
        Err(e) => Err(bad(at, e)),
    }
}

/// Decodes `payload` block by block, handing each block's content to `sink` in order; returns
/// the CRC-32C of the content. Fails, having passed on at most `raw_len` bytes, when the blocks
/// do not decode to exactly `raw_len` bytes. `sink` errors are returned as they are.
pub fn decode_blocks<E: From<CodecError>>(
    payload: &[u8],
    raw_len: u64,
    mut sink: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<u32, E> {
    // Page-aligned (see ALIGN): `sink` typically writes it to a file.
    let (mut backing, mut at0) = (Vec::new(), 0);
    let (mut rest, mut done, mut crc) = (payload, 0u64, 0u32);
    while !rest.is_empty() {
        let at = payload.len() - rest.len();
        let (b, after) = next_block(rest, at)?;
        if done + b.raw_len as u64 > raw_len {
            return Err(too_long(raw_len).into());
        }
        if backing.len() < at0 + b.raw_len {
            (backing, at0) = aligned_buffer(b.raw_len);
        }
        let scratch = &mut backing[at0..at0 + b.raw_len];
        expand(&b, scratch, at)?;
        crc = super::crc::crc32c_append(crc, scratch);
        sink(scratch)?;
        done += b.raw_len as u64;
        rest = after;
    }
    if done != raw_len {
        return Err(CodecError::ContentLength {
            expected: raw_len,
            actual: done,
        }
        .into());
    }
    Ok(crc)
}

fn too_long(raw_len: u64) -> CodecError {
    CodecError::ContentLength {
        expected: raw_len,
        actual: raw_len + 1,
    }
}

/// Decodes `payload` into one buffer of exactly `raw_len` bytes (the caller checked `raw_len`
/// against the frame's maximum).
pub fn decompress_blocks(payload: &[u8], raw_len: u64) -> Result<Vec<u8>, CodecError> {
    // Zeroed by the allocator (fresh pages), then every byte written once, in place.
    let mut out = vec![0u8; raw_len as usize];
    expand_blocks(payload, raw_len, &mut out)?;
    Ok(out)
}

/// [`decompress_blocks`] into `out`, reusing its allocation (verify reads segment after
/// segment into the same buffers). Every byte of `out` is written by a block or the call fails,
/// so stale content from a previous use never survives into a successful result.
pub fn decompress_blocks_into(
    payload: &[u8],
    raw_len: u64,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    out.resize(raw_len as usize, 0);
    expand_blocks(payload, raw_len, out)
}

/// The CRC-32C of a payload and of its content, as [`decompress_blocks_summed`] computes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sums {
    pub payload: u32,
    pub content: u32,
}

/// [`decompress_blocks_into`] into `out` (exactly `raw_len` bytes long; the caller sized it)
/// that also sums the payload and the content, each block right after it is expanded, while
/// its stored and its decoded bytes are still in the cache: one pass over the content instead
/// of three (verify spent 15-20 % of its CPU in the separate passes, reading 16 MiB back from
/// memory each time). On failure the error comes with the CRC-32C of the whole payload, so
/// that the caller can report a damaged payload first, as checking it beforehand would.
pub fn decompress_blocks_summed(
    payload: &[u8],
    raw_len: u64,
    out: &mut [u8],
) -> Result<Sums, (CodecError, u32)> {
    let mut sums = Sums {
        payload: 0,
        content: 0,
    };
    let walked = walk_blocks(payload, raw_len, out, |stored, content| {
        sums.payload = super::crc::crc32c_append(sums.payload, stored);
        sums.content = super::crc::crc32c_append(sums.content, content);
    });
    match walked {
        Ok(()) => Ok(sums),
        // The blocks before `at` are summed already.
        Err((e, at)) => Err((e, super::crc::crc32c_append(sums.payload, &payload[at..]))),
    }
}

fn expand_blocks(payload: &[u8], raw_len: u64, out: &mut [u8]) -> Result<(), CodecError> {
    walk_blocks(payload, raw_len, out, |_, _| {}).map_err(|(e, _)| e)
}

/// Expands the blocks of `payload` into `out` in order, handing `each` every block as stored
/// (header included) and as expanded. Fails, with the payload offset of the block it stopped
/// at (`payload.len()` when the blocks were all read), unless they fill exactly `raw_len`
/// bytes of `out`.
fn walk_blocks(
    payload: &[u8],
    raw_len: u64,
    out: &mut [u8],
    mut each: impl FnMut(&[u8], &[u8]),
) -> Result<(), (CodecError, usize)> {
    let (mut rest, mut done) = (payload, 0usize);
    while !rest.is_empty() {
        let at = payload.len() - rest.len();
        let step = next_block(rest, at).and_then(|(b, after)| {
            let dest = out
                .get_mut(done..done + b.raw_len)
                .ok_or_else(|| too_long(raw_len))?;
            expand(&b, dest, at)?;
            Ok((b.raw_len, after))
        });
        let (n, after) = step.map_err(|e| (e, at))?;
        each(&rest[..rest.len() - after.len()], &out[done..done + n]);
        done += n;
        rest = after;
    }
    if done as u64 != raw_len {
        let e = CodecError::ContentLength {
            expected: raw_len,
            actual: done as u64,
        };
        return Err((e, payload.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content() -> Vec<u8> {
        // Compressible text with some noise, over several blocks and not a whole number of them.
        (0..(5 * BLOCK_LEN + 12_345) as u32)
            .map(|i| match i % 97 {
                0 => (i.wrapping_mul(2_654_435_761) >> 24) as u8,
                r => b'a' + (r % 26) as u8,
            })
            .collect()
    }

    fn one_writer(raw: &[u8]) -> Blocks {
        let mut w = BlockWriter::new(0, raw.len());
        w.write(raw);
        w.finish()
    }

    /// A writer given a used buffer (longer, shorter, full of other bytes) writes the same
    /// payload as a fresh one, into that buffer's allocation when it is large enough.
    #[test]
    fn a_reused_buffer_makes_the_same_payload() {
        let raw = content();
        let fresh = one_writer(&raw);
        for used in [vec![0xA5; 8 * BLOCK_LEN], vec![7; 10], Vec::new()] {
            // 8 blocks hold lz4's bound for this content's 5.05 blocks.
            let big = used.len() == 8 * BLOCK_LEN;
            let at = used.as_ptr();
            let mut w = BlockWriter::reusing(used, 0, raw.len());
            w.write(&raw);
            let again = w.finish();
            assert_eq!(again.out, fresh.out);
            assert_eq!(again.raw_crc32c, fresh.raw_crc32c);
            assert_eq!(again.payload_crc32c, fresh.payload_crc32c);
            if big {
                assert_eq!(again.out.as_ptr(), at, "the buffer's allocation is reused");
            }
        }
    }

    /// A payload joined from a head made by a writer and a tail made block by block from the
    /// back in an arena is byte for byte the one writer's, with the same lengths and
    /// checksums, gathered and streamed.
    #[test]
    fn a_joined_tail_is_the_single_writers_payload() {
        let raw = content();
        let whole = one_writer(&raw);
        for blocks_in_head in [0, 1, 3, 5] {
            let (head, tail) = raw.split_at(blocks_in_head * BLOCK_LEN);
            let mut arena = BlockArena::new(BLOCK_LEN, tail.len());
            let pieces: Vec<&[u8]> = tail.chunks(BLOCK_LEN).collect();
            for (i, piece) in pieces.iter().enumerate().rev() {
                arena.add(i as u64, piece);
            }
            assert_eq!(arena.raw_len(), tail.len() as u64);

            let mut gathered = BlockWriter::new(0, raw.len());
            gathered.write(head);
            for run in arena.in_order() {
                gathered.join(&run);
            }
            let sums = gathered.sums();
            let joined = gathered.finish();
            assert_eq!(
                joined.out, whole.out,
                "gathered, {blocks_in_head} head blocks"
            );
            assert_eq!(joined.raw_crc32c, whole.raw_crc32c);
            assert_eq!(joined.payload_crc32c, whole.payload_crc32c);
            assert_eq!(sums.raw_len, raw.len() as u64);
            assert_eq!(sums.payload_len, whole.out.len() as u64);

            let mut streamed = BlockWriter::streamed();
            let mut out = Vec::new();
            for piece in head.chunks(BLOCK_LEN) {
                streamed.write(piece);
                streamed
                    .flush(|b| {
                        out.extend_from_slice(b);
                        Ok::<_, ()>(())
                    })
                    .unwrap();
            }
            for run in arena.in_order() {
                streamed.join_flushed(&run);
                out.extend_from_slice(run.payload);
            }
            let s = streamed.sums();
            assert_eq!(out, whole.out, "streamed, {blocks_in_head} head blocks");
            assert_eq!(
                (s.raw_crc32c, s.payload_crc32c),
                (whole.raw_crc32c, whole.payload_crc32c)
            );
            assert_eq!(
                (s.raw_len, s.payload_len),
                (raw.len() as u64, whole.out.len() as u64)
            );
        }
    }
}

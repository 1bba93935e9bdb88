use std::fmt;
use std::str::FromStr;

use super::blocks::{self, BlockSums, BlockWriter, Blocks};
use super::error::CodecError;

/// First bytes of every stored object.
pub const FRAME_MAGIC: [u8; 4] = *b"PITR";
/// Version of the frame layout below; readers refuse versions they do not know.
pub const FRAME_VERSION: u8 = 1;
/// Version of an encrypted frame (flag bit 0 set, payload sealed, `raw_crc32c` zero): a pitr
/// that predates encryption says "upgrade pitr" instead of failing to decompress ciphertext.
pub const FRAME_VERSION_ENCRYPTED: u8 = 2;
/// Flag bit of an encrypted frame.
pub const FLAG_ENCRYPTED: u16 = 1;
/// Header bytes fixed before the payload is sealed (magic, version, codec, flags, raw_len,
/// payload_len): an encrypted object's AAD binds them; the checksums after them cover the
/// sealed bytes and are computed last.
pub const SEALED_HEADER_PREFIX_LEN: usize = 24;
pub const FRAME_HEADER_LEN: usize = 40;
/// Largest content one frame may hold: a 1 GiB WAL segment plus room to spare.
pub const MAX_RAW_LEN: u64 = 2 << 30;

/// How the payload is encoded. The numbers are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    None,
    /// lz4, the whole content as one block (id 1: what pitr wrote before `lz4-blocks`).
    Lz4,
    Zstd,
    /// lz4 in independent blocks (id 3, src/codec/blocks.rs): written and read block by block.
    /// Never configured: archive-push writes it where `lz4` is configured. Never serialized.
    #[serde(skip)]
    Lz4Blocks,
}

impl Codec {
    fn id(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
            Codec::Lz4Blocks => 3,
        }
    }

    fn from_id(id: u8) -> Option<Codec> {
        Some(match id {
            0 => Codec::None,
            1 => Codec::Lz4,
            2 => Codec::Zstd,
            3 => Codec::Lz4Blocks,
            _ => return None,
        })
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
            Codec::Lz4Blocks => "lz4-blocks",
        })
    }
}

impl FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            "zstd" => Ok(Codec::Zstd),
            _ => Err(format!("unknown compression {s:?}: use lz4, zstd or none")),
        }
    }
}

/// The decoded 40-byte frame header.
///
/// ```text
/// 0  magic "PITR"        4  version u8   5  codec u8   6  flags u16 (0)
/// 8  raw_len u64         16 payload_len u64
/// 24 raw_crc32c u32      28 payload_crc32c u32
/// 32 reserved u32 (0)    36 header_crc32c u32 (over bytes 0..36)
/// ```
/// All integers little-endian. The payload checksum lets a reader reject a damaged object before
/// feeding it to a decompressor; the content checksum proves what is returned is what was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub codec: Codec,
    pub raw_len: u64,
    pub payload_len: u64,
    pub raw_crc32c: u32,
    pub payload_crc32c: u32,
    /// Version 2 frame: the payload is sealed (docs/encryption.md), `raw_crc32c` is zero.
    pub encrypted: bool,
}

/// Frames `raw` with `codec`. zstd uses `level`; lz4 and none ignore it.
pub fn encode(raw: &[u8], codec: Codec, level: i32) -> Vec<u8> {
    // The payload is written straight after room for the header, so a 16 MiB segment is never
    // held twice in compressed form (that copy was most of the stream's memory over its cap).
    let (codec, mut out) = compress_with_room(raw, codec, level, FRAME_HEADER_LEN);
    let header = FrameHeader {
        codec,
        raw_len: raw.len() as u64,
        payload_len: (out.len() - FRAME_HEADER_LEN) as u64,
        raw_crc32c: super::crc::crc32c(raw),
        payload_crc32c: super::crc::crc32c(&out[FRAME_HEADER_LEN..]),
        encrypted: false,
    };
    out[..FRAME_HEADER_LEN].copy_from_slice(&header_bytes(&header));
    out
}

/// `room` zero bytes followed by `raw` compressed with `codec`, and the codec actually used.
/// Encryption (src/repo/object.rs) asks for room for the frame and seal headers, so that the
/// payload is sealed where it lies.
pub fn compress_with_room(raw: &[u8], codec: Codec, level: i32, room: usize) -> (Codec, Vec<u8>) {
    if codec == Codec::Lz4Blocks {
        let mut w = BlockWriter::new(room, raw.len());
        w.write(raw);
        let b = w.finish();
        debug_assert_eq!(b.start, 0);
        return (codec, b.out);
    }
    let bound = match codec {
        Codec::None | Codec::Lz4Blocks => raw.len(),
        Codec::Lz4 => lz4_flex::block::get_maximum_output_size(raw.len()),
        Codec::Zstd => zstd::zstd_safe::compress_bound(raw.len()),
    };
    let mut out = vec![0u8; room + bound];
    let payload_len = match codec {
        Codec::None | Codec::Lz4Blocks => {
            out[room..].copy_from_slice(raw);
            Ok(raw.len())
        }
        Codec::Lz4 => {
            lz4_flex::block::compress_into(raw, &mut out[room..]).map_err(|e| e.to_string())
        }
        Codec::Zstd => {
            zstd::bulk::compress_to_buffer(raw, &mut out[room..], level).map_err(|e| e.to_string())
        }
    };
    // Compression into a buffer of the codec's own bound only fails on an invalid zstd level
    // (validated at configuration time) or an allocation failure: store uncompressed rather
    // than fail an archive.
    let Ok(payload_len) = payload_len else {
        return compress_with_room(raw, Codec::None, 0, room);
    };
    out.truncate(room + payload_len);
    out.shrink_to_fit();
    (codec, out)
}

/// The 40 header bytes of `h`: version 2 and the encrypted flag when `h.encrypted`.
pub fn header_bytes(h: &FrameHeader) -> [u8; FRAME_HEADER_LEN] {
    let mut b = [0u8; FRAME_HEADER_LEN];
    b[0..4].copy_from_slice(&FRAME_MAGIC);
    if h.encrypted {
        b[4] = FRAME_VERSION_ENCRYPTED;
        b[6..8].copy_from_slice(&FLAG_ENCRYPTED.to_le_bytes());
    } else {
        b[4] = FRAME_VERSION;
    }
    b[5] = h.codec.id();
    b[8..16].copy_from_slice(&h.raw_len.to_le_bytes());
    b[16..24].copy_from_slice(&h.payload_len.to_le_bytes());
    b[24..28].copy_from_slice(&h.raw_crc32c.to_le_bytes());
    b[28..32].copy_from_slice(&h.payload_crc32c.to_le_bytes());
    let crc = super::crc::crc32c(&b[0..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Reads and checks the header of a frame without touching the payload.
pub fn peek_header(bytes: &[u8]) -> Result<FrameHeader, CodecError> {
    if bytes.len() < FRAME_HEADER_LEN || bytes[0..4] != FRAME_MAGIC {
        return Err(CodecError::BadMagic);
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    if u32_at(36) != super::crc::crc32c(&bytes[0..36]) {
        return Err(CodecError::HeaderChecksum);
    }
    let encrypted = match bytes[4] {
        FRAME_VERSION => false,
        FRAME_VERSION_ENCRYPTED => true,
        found => return Err(CodecError::NewerVersion { found }),
    };
    // Version 1 never set flags (and never checked them); version 2 has exactly one.
    let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
    if encrypted && flags != FLAG_ENCRYPTED {
        return Err(CodecError::UnknownFlags { flags });
    }
    let codec = Codec::from_id(bytes[5]).ok_or(CodecError::UnknownCodec { id: bytes[5] })?;
    Ok(FrameHeader {
        codec,
        raw_len: u64_at(8),
        payload_len: u64_at(16),
        raw_crc32c: u32_at(24),
        payload_crc32c: u32_at(28),
        encrypted,
    })
}

/// The payload of a frame whose header is `h`, after checking its length and checksum (so
/// damage is found before a decompressor or a cipher sees it, and without the key).
pub fn checked_payload<'a>(h: &FrameHeader, bytes: &'a [u8]) -> Result<&'a [u8], CodecError> {
    let payload = sized_payload(h, bytes)?;
    check_payload_crc(h, super::crc::crc32c(payload))?;
    // The header is checksummed, but a crafted one must still not make us allocate without bound.
    if h.raw_len > MAX_RAW_LEN {
        return Err(CodecError::ContentLength {
            expected: h.raw_len,
            actual: 0,
        });
    }
    Ok(payload)
}

/// The payload of a frame whose header is `h`, after checking its length only.
fn sized_payload<'a>(h: &FrameHeader, bytes: &'a [u8]) -> Result<&'a [u8], CodecError> {
    let payload = &bytes[FRAME_HEADER_LEN..];
    if payload.len() as u64 != h.payload_len {
        return Err(CodecError::PayloadLength {
            expected: h.payload_len,
            found: payload.len() as u64,
        });
    }
    Ok(payload)
}

fn check_payload_crc(h: &FrameHeader, actual: u32) -> Result<(), CodecError> {
    if actual != h.payload_crc32c {
        return Err(CodecError::PayloadChecksum {
            expected: h.payload_crc32c,
            actual,
        });
    }
    Ok(())
}

fn check_content_crc(h: &FrameHeader, actual: u32) -> Result<(), CodecError> {
    if actual != h.raw_crc32c {
        return Err(CodecError::ContentChecksum {
            expected: h.raw_crc32c,
            actual,
        });
    }
    Ok(())
}

/// [`decode_into`] of an `lz4-blocks` frame of at most [`MAX_RAW_LEN`] bytes: both checksums
/// computed block by block as it decodes ([`blocks::decompress_blocks_summed`]), with the same
/// outcome, error for error, as checking the payload first and the content last.
fn decode_blocks_into(h: &FrameHeader, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    let payload = sized_payload(h, bytes)?;
    if (out.capacity() as u64) < h.raw_len {
        // Fresh zeroed pages from the allocator, as `decompress` takes (no memset).
        *out = vec![0u8; h.raw_len as usize];
    }
    // Every byte is written by a block or the call fails: stale content never survives.
    out.resize(h.raw_len as usize, 0);
    match blocks::decompress_blocks_summed(payload, h.raw_len, out) {
        Ok(sums) => {
            check_payload_crc(h, sums.payload)?;
            check_content_crc(h, sums.content)
        }
        Err((e, payload_crc)) => {
            check_payload_crc(h, payload_crc)?;
            Err(e)
        }
    }
}

/// Decompresses `payload` into exactly `raw_len` bytes.
pub fn decompress(codec: Codec, payload: &[u8], raw_len: u64) -> Result<Vec<u8>, CodecError> {
    let raw = match codec {
        Codec::None => payload.to_vec(),
        Codec::Lz4 => lz4_flex::block::decompress(payload, raw_len as usize).map_err(|e| {
            CodecError::Decompress {
                message: e.to_string(),
            }
        })?,
        Codec::Zstd => zstd::bulk::decompress(payload, raw_len as usize).map_err(|e| {
            CodecError::Decompress {
                message: e.to_string(),
            }
        })?,
        Codec::Lz4Blocks => blocks::decompress_blocks(payload, raw_len)?,
    };
    if raw.len() as u64 != raw_len {
        return Err(CodecError::ContentLength {
            expected: raw_len,
            actual: raw.len() as u64,
        });
    }
    Ok(raw)
}

/// [`decompress`] into `out`, reusing its allocation: reading many segments one after the other
/// then touches the same memory again instead of a fresh zeroed buffer (page faults and a memset
/// of 16 MiB each) per segment. lz4 writes every byte of `out`, so a reused buffer needs no
/// zeroing. When `out` is too small, and for the other codecs, it is replaced by what
/// [`decompress`] allocates (so [`decode`] costs what it did before).
pub fn decompress_into(
    codec: Codec,
    payload: &[u8],
    raw_len: u64,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    if codec == Codec::Lz4Blocks && (out.capacity() as u64) >= raw_len {
        return blocks::decompress_blocks_into(payload, raw_len, out);
    }
    if codec != Codec::Lz4 || (out.capacity() as u64) < raw_len {
        *out = decompress(codec, payload, raw_len)?;
        return Ok(());
    }
    out.resize(raw_len as usize, 0);
    let n = lz4_flex::block::decompress_into(payload, out).map_err(|e| CodecError::Decompress {
        message: e.to_string(),
    })?;
    if n as u64 != raw_len {
        return Err(CodecError::ContentLength {
            expected: raw_len,
            actual: n as u64,
        });
    }
    Ok(())
}

/// Verifies a whole unencrypted frame and returns its content. An encrypted frame is
/// [`CodecError::Encrypted`]: src/repo/object.rs opens those, with the key.
pub fn decode(bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
    let mut raw = Vec::new();
    decode_into(bytes, &mut raw)?;
    Ok(raw)
}

/// [`decode`] into `out` (its previous content is replaced), reusing its allocation.
pub fn decode_into(bytes: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    let h = peek_header(bytes)?;
    if h.encrypted {
        return Err(CodecError::Encrypted);
    }
    if h.codec == Codec::Lz4Blocks && h.raw_len <= MAX_RAW_LEN {
        return decode_blocks_into(&h, bytes, out);
    }
    let payload = checked_payload(&h, bytes)?;
    decompress_into(h.codec, payload, h.raw_len, out)?;
    check_content_crc(&h, super::crc::crc32c(out))
}

/// The frame of an `lz4-blocks` payload built by a [`BlockWriter`] with `room` =
/// [`FRAME_HEADER_LEN`]: the header goes into that room, so the payload is never copied (nor
/// is the frame: the result shares the writer's buffer, from its `start`).
pub fn frame_blocks(b: Blocks) -> bytes::Bytes {
    let (mut out, start) = (b.out, b.start);
    let header = blocks_header(&BlockSums {
        raw_len: b.raw_len,
        payload_len: (out.len() - start - FRAME_HEADER_LEN) as u64,
        raw_crc32c: b.raw_crc32c,
        payload_crc32c: b.payload_crc32c,
    });
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&header);
    bytes::Bytes::from(out).slice(start..)
}

/// The frame header of an `lz4-blocks` payload written apart from it (streamed to a file by a
/// [`BlockWriter::streamed`], the header written last at offset 0).
pub fn blocks_header(s: &BlockSums) -> [u8; FRAME_HEADER_LEN] {
    header_bytes(&FrameHeader {
        codec: Codec::Lz4Blocks,
        raw_len: s.raw_len,
        payload_len: s.payload_len,
        raw_crc32c: s.raw_crc32c,
        payload_crc32c: s.payload_crc32c,
        encrypted: false,
    })
}

/// [`decode`] that hands the content to `sink` piece by piece instead of returning it: an
/// `lz4-blocks` or uncompressed frame is never held whole in memory. The header and the payload
/// checksum are checked before `sink` sees anything; the content checksum only at the end, so
/// on any error the caller must discard what `sink` received. Returns the content length.
pub fn decode_to<E: From<CodecError>>(
    bytes: &[u8],
    mut sink: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    let h = peek_header(bytes)?;
    if h.encrypted {
        return Err(CodecError::Encrypted.into());
    }
    let payload = checked_payload(&h, bytes)?;
    let crc = match h.codec {
        Codec::Lz4Blocks => blocks::decode_blocks(payload, h.raw_len, sink)?,
        Codec::None if payload.len() as u64 == h.raw_len => {
            for piece in payload.chunks(blocks::BLOCK_LEN) {
                sink(piece)?;
            }
            super::crc::crc32c(payload)
        }
        _ => {
            let raw = decompress(h.codec, payload, h.raw_len)?;
            sink(&raw)?;
            super::crc::crc32c(&raw)
        }
    };
    check_content_crc(&h, crc)?;
    Ok(h.raw_len)
}

#[cfg(test)]
mod tests {
    use super::super::blocks::BLOCK_LEN;
    use super::*;

    fn sample() -> Vec<u8> {
        (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trips_every_codec() {
        let raw = sample();
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let framed = encode(&raw, codec, 3);
            assert_eq!(peek_header(&framed).unwrap().codec, codec);
            assert_eq!(decode(&framed).unwrap(), raw, "{codec}");
        }
        assert_eq!(decode(&encode(b"", Codec::Lz4, 0)).unwrap(), b"");
    }

    #[test]
    fn decode_into_reuses_a_dirty_buffer_and_still_checks() {
        let raw = sample();
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let framed = encode(&raw, codec, 3);
            // Reused buffers: longer than the content, shorter, and exactly as long.
            for len in [raw.len() + 4096, 100, raw.len()] {
                let mut out = vec![0xAB; len];
                decode_into(&framed, &mut out).unwrap();
                assert_eq!(out, raw, "{codec}, buffer of {len}");
            }
            let mut bad = framed.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(
                decode_into(&bad, &mut vec![0; raw.len()]).is_err(),
                "{codec}"
            );
        }
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let raw = sample();
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
            let framed = encode(&raw[..3000], codec, 3);
            for i in 0..framed.len() {
                let mut bad = framed.clone();
                bad[i] ^= 0x40;
                assert!(decode(&bad).is_err(), "{codec}: flip at {i} not detected");
            }
        }
    }

    #[test]
    fn truncation_and_newer_versions_are_refused() {
        let framed = encode(&sample(), Codec::Lz4, 0);
        assert!(matches!(
            decode(&framed[..framed.len() - 1]),
            Err(CodecError::PayloadLength { .. })
        ));
        assert_eq!(decode(&framed[..10]), Err(CodecError::BadMagic));
        let mut newer = framed.clone();
        newer[4] = 9;
        let crc = crc32c::crc32c(&newer[0..36]);
        newer[36..40].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&newer), Err(CodecError::NewerVersion { found: 9 }));
    }

    /// A frame of `lz4-blocks` with blocks of `block` bytes (pitr writes 256 KiB ones; readers
    /// take any size, and small ones keep the every-byte tests fast).
    fn blocks_frame(raw: &[u8], block: usize) -> Vec<u8> {
        let mut w = BlockWriter::new(FRAME_HEADER_LEN, raw.len());
        for b in raw.chunks(block) {
            w.block(b);
        }
        frame_blocks(w.finish()).to_vec()
    }

    /// Content with an incompressible stretch, so that some blocks are stored as they are.
    fn mixed() -> Vec<u8> {
        let mut raw = sample()[..2000].to_vec();
        let mut x = 0x2545_f491_u32;
        raw.extend((0..1500).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        }));
        raw.extend_from_slice(&sample()[..900]);
        raw
    }

    fn decode_by_pieces(framed: &[u8]) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        decode_to(framed, |p| {
            out.extend_from_slice(p);
            Ok::<(), CodecError>(())
        })?;
        Ok(out)
    }

    #[test]
    fn lz4_blocks_round_trip_whole_and_by_pieces() {
        let big: Vec<u8> = sample()
            .into_iter()
            .cycle()
            .take(3 * BLOCK_LEN + 123)
            .collect();
        for (raw, block) in [
            (mixed(), 700),
            (mixed(), 1 << 20),
            (big, BLOCK_LEN),
            (vec![], 9),
        ] {
            let framed = blocks_frame(&raw, block);
            let h = peek_header(&framed).unwrap();
            assert_eq!(h.codec, Codec::Lz4Blocks);
            assert_eq!(framed[5], 3, "codec id 3");
            assert_eq!(decode(&framed).unwrap(), raw);
            assert_eq!(decode_by_pieces(&framed).unwrap(), raw);
            // The writer used by `encode` and `compress_with_room` makes the same frames.
            assert_eq!(
                encode(&raw, Codec::Lz4Blocks, 0),
                blocks_frame(&raw, BLOCK_LEN)
            );
            // Page-aligned output, as archive-push writes it: the same frame, aligned.
            let mut w = BlockWriter::aligned(FRAME_HEADER_LEN, raw.len());
            w.write(&raw);
            let aligned = frame_blocks(w.finish());
            assert_eq!(aligned.as_ptr() as usize % 4096, 0);
            assert_eq!(aligned, blocks_frame(&raw, BLOCK_LEN));
        }
        // Stored-as-is blocks are used where lz4 does not shrink the content.
        let framed = blocks_frame(&mixed(), 700);
        let mut at = FRAME_HEADER_LEN;
        let mut as_is = 0;
        while at < framed.len() {
            let word = u32::from_le_bytes(framed[at + 4..at + 8].try_into().unwrap());
            as_is += (word >> 31) as usize;
            at += 8 + (word & 0x7fff_ffff) as usize;
        }
        assert!(as_is >= 1, "no block stored as is");
    }

    #[test]
    fn every_flipped_byte_of_an_lz4_blocks_frame_is_detected() {
        let framed = blocks_frame(&mixed(), 700);
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} not detected");
            assert!(
                decode_by_pieces(&bad).is_err(),
                "flip at {i} not detected by pieces"
            );
        }
    }

    /// `decode_into` as it was before the checksums were computed block by block: payload
    /// length and checksum, decompression, content checksum, one after the other.
    fn decode_in_passes(bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        let h = peek_header(bytes)?;
        let payload = checked_payload(&h, bytes)?;
        let raw = decompress(h.codec, payload, h.raw_len)?;
        check_content_crc(&h, crc32c::crc32c(&raw))?;
        Ok(raw)
    }

    /// Summing while decoding finds what checking in passes finds, error for error: every
    /// flipped byte, every cut (header fixed or not), every content length off by one, into
    /// fresh and into dirty buffers.
    #[test]
    fn lz4_blocks_summed_while_decoding_fail_as_in_passes() {
        let raw = mixed();
        let framed = blocks_frame(&raw, 700);
        let mut cases = vec![framed.clone()];
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 0x40;
            cases.push(bad);
        }
        for cut in FRAME_HEADER_LEN..framed.len() {
            cases.push(framed[..cut].to_vec());
            cases.push(reframe(framed[..cut].to_vec(), raw.len() as u64));
        }
        for n in [raw.len() as u64 - 1, raw.len() as u64 + 1] {
            cases.push(reframe(framed.clone(), n));
        }
        // A payload damaged in a block header, whose checksums are then fixed: only decoding
        // can tell.
        let mut wrong = framed.clone();
        wrong[FRAME_HEADER_LEN] ^= 1;
        cases.push(reframe(wrong, raw.len() as u64));
        for (i, case) in cases.iter().enumerate() {
            let expected = decode_in_passes(case);
            for mut out in [Vec::new(), vec![0xAB; raw.len() + 9], vec![0xCD; 10]] {
                let got = decode_into(case, &mut out).map(|()| out);
                assert_eq!(got, expected, "case {i}");
            }
        }
    }

    /// Rewrites the header's lengths and every checksum after a deliberate change, so that only
    /// the block structure can tell.
    fn reframe(mut framed: Vec<u8>, raw_len: u64) -> Vec<u8> {
        let mut h = peek_header(&framed).unwrap();
        h.raw_len = raw_len;
        h.payload_len = (framed.len() - FRAME_HEADER_LEN) as u64;
        h.payload_crc32c = crc32c::crc32c(&framed[FRAME_HEADER_LEN..]);
        framed[..FRAME_HEADER_LEN].copy_from_slice(&header_bytes(&h));
        framed
    }

    #[test]
    fn lz4_blocks_truncation_and_wrong_lengths_are_refused() {
        let raw = mixed();
        let framed = blocks_frame(&raw, 700);
        let n = raw.len() as u64;
        // Cut anywhere: the header's payload length, and with it fixed, the blocks.
        for cut in [FRAME_HEADER_LEN + 3, FRAME_HEADER_LEN + 8, framed.len() - 1] {
            assert!(decode(&framed[..cut]).is_err(), "cut at {cut}");
            let fixed = reframe(framed[..cut].to_vec(), n);
            assert!(decode(&fixed).is_err(), "cut at {cut}, header fixed");
            assert!(
                decode_by_pieces(&fixed).is_err(),
                "cut at {cut}, header fixed"
            );
        }
        // A header whose content length is off by one either way.
        for len in [n - 1, n + 1, 0, MAX_RAW_LEN + 1] {
            let wrong = reframe(framed.clone(), len);
            assert!(decode(&wrong).is_err(), "raw_len {len}");
            assert!(decode_by_pieces(&wrong).is_err(), "raw_len {len}");
        }
        // A block whose own length is wrong, checksums fixed: refused by the block decoder.
        for delta in [1u32, u32::MAX] {
            let mut bad = framed.clone();
            let at = FRAME_HEADER_LEN;
            let len = u32::from_le_bytes(bad[at..at + 4].try_into().unwrap());
            bad[at..at + 4].copy_from_slice(&len.wrapping_add(delta).to_le_bytes());
            let bad = reframe(bad, n);
            assert!(matches!(decode(&bad), Err(CodecError::Decompress { .. })));
            assert!(matches!(
                decode_by_pieces(&bad),
                Err(CodecError::Decompress { .. })
            ));
        }
        // Trailing bytes after the last block, checksums fixed.
        let mut longer = framed.clone();
        longer.extend_from_slice(&[0, 0, 0]);
        assert!(decode(&reframe(longer, n)).is_err());
    }

    #[test]
    fn frames_of_before_still_decode() {
        // Codec id 1 (one lz4 block over the whole content) is what pitr wrote until
        // `lz4-blocks`; `encode` still writes it for everything but archive-push.
        let raw = sample();
        let old = encode(&raw, Codec::Lz4, 0);
        assert_eq!(old[5], 1);
        assert_eq!(decode(&old).unwrap(), raw);
        assert_eq!(decode_by_pieces(&old).unwrap(), raw);
        let none = encode(&raw, Codec::None, 0);
        assert_eq!(decode_by_pieces(&none).unwrap(), raw);
        let zstd = encode(&raw, Codec::Zstd, 3);
        assert_eq!(decode_by_pieces(&zstd).unwrap(), raw);
        // A fixed frame of before, byte for byte: header, lz4 block, checksums.
        let hello = b"hello hello hello hello";
        let stored = encode(hello, Codec::Lz4, 0);
        assert_eq!(&stored[..8], b"PITR\x01\x01\x00\x00");
        assert_eq!(decode(&stored).unwrap(), hello);
    }
}

//! Object framing, compression and checksums.
//!
//! Every object pitr stores is one frame: a fixed 40-byte header followed by the (possibly
//! compressed) payload. The header carries the codec, both lengths and the CRC-32C of the
//! uncompressed content, so every read verifies what it returns. Pure code: no I/O.
//! The byte layout is specified in docs/repository-format.md; keep the two in step.

mod blocks;
pub mod crc;
pub mod crypt;
mod error;
mod frame;

pub use blocks::{aligned_buffer, BlockArena, BlockRun, BlockSums, BlockWriter, BLOCK_LEN};
pub use error::CodecError;

pub use frame::{
    blocks_header, checked_payload, compress_with_room, decode, decode_into, decode_to, decompress,
    decompress_into, encode, frame_blocks, header_bytes, peek_header, Codec, FrameHeader,
    FRAME_HEADER_LEN, FRAME_MAGIC, SEALED_HEADER_PREFIX_LEN,
};

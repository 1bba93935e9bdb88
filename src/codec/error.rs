//! What can be wrong with a stored object's frame, shared by the frame and block codecs.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    #[error("not a pitr object (bad magic)")]
    BadMagic,
    #[error("object frame version {found} is newer than this pitr understands; upgrade pitr")]
    NewerVersion { found: u8 },
    #[error("object uses unknown codec id {id}")]
    UnknownCodec { id: u8 },
    #[error("object header checksum mismatch: the header is corrupt")]
    HeaderChecksum,
    #[error("object is truncated or has trailing bytes: header says {expected} payload bytes, found {found}")]
    PayloadLength { expected: u64, found: u64 },
    #[error("payload checksum mismatch: expected crc32c {expected:08x}, computed {actual:08x}")]
    PayloadChecksum { expected: u32, actual: u32 },
    #[error("object payload does not decompress: {message}")]
    Decompress { message: String },
    #[error("content checksum mismatch: expected crc32c {expected:08x}, computed {actual:08x}")]
    ContentChecksum { expected: u32, actual: u32 },
    #[error("decompressed length {actual} differs from the {expected} bytes the header records")]
    ContentLength { expected: u64, actual: u64 },
    #[error("object frame has unknown flags {flags:#06x}")]
    UnknownFlags { flags: u16 },
    #[error("object is encrypted, but this repository is not: it was not written here by pitr")]
    Encrypted,
    #[error("object is not encrypted, but this repository is: it was not written here by pitr")]
    NotEncrypted,
    #[error(transparent)]
    Sealed(#[from] super::crypt::CryptError),
}

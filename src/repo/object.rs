//! The one transform between an object's content and its stored bytes. Every object except the
//! descriptor goes through [`ObjectCodec`]: framing with checksums, compression, and in an
//! encrypted repository authenticated encryption bound to the object's key. Jobs never see
//! stored bytes.
//!
//! Encrypted objects are frames of version 2 (docs/repository-format.md, "Encryption"):
//! compress, then seal the compressed payload under the repository's data key with AAD = the
//! object's key and the frame header fields fixed before sealing. The plaintext CRC is zero (a
//! checksum of the content in clear would let anyone confirm a guess of it); the GCM tag takes
//! its place, and the payload CRC over the sealed bytes still finds damage without the key.

use std::sync::Arc;

use super::keys::DataKey;
use super::{layout, RepoError, Result, WriteOptions};
use crate::codec::crypt::{self, Dek, SEAL_HEADER_LEN, SEAL_OVERHEAD};
use crate::codec::{self, Codec, CodecError, FrameHeader, FRAME_HEADER_LEN};

/// How this repository turns content into stored bytes and back. Cheap to clone, so that the
/// CPU-heavy work can run on the blocking pool.
#[derive(Clone, Debug)]
pub(super) struct ObjectCodec {
    pub write: WriteOptions,
    /// The repository's data key when it is encrypted.
    pub data_key: Option<Arc<DataKey>>,
}

/// What kind of object is written: data is compressed with the configured codec; small
/// mutable control objects (leases, markers) are stored uncompressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Payload {
    Data,
    Control,
}

/// Objects stored as plain frames even in an encrypted repository: the descriptor (read before
/// any key), the keyrings (which hold the wrapped data key, and are what opens the rest), and
/// the audit trail (written before a repository exists, and readable by an auditor who holds
/// no key; it holds command names, redacted arguments, hosts and times, never data).
fn is_plain(key: &str) -> bool {
    key == layout::DESCRIPTOR_KEY
        || key.starts_with(layout::KEYS_PREFIX)
        || key.starts_with(super::audit::AUDIT_PREFIX)
}

impl ObjectCodec {
    /// Whether data objects written block by block (archive-push's segments, backup parts) are
    /// `lz4-blocks` frames: with lz4 and no encryption (docs/repository-format.md).
    pub fn writes_lz4_blocks(&self) -> bool {
        self.data_key.is_none() && self.write.codec == Codec::Lz4
    }

    /// The stored bytes of `content` under `key`.
    pub fn encode(&self, key: &str, content: &[u8], payload: Payload) -> Vec<u8> {
        let (codec, level) = match payload {
            Payload::Data => (self.write.codec, self.write.level),
            Payload::Control => (Codec::None, 0),
        };
        match &self.data_key {
            Some(k) if !is_plain(key) => encode_sealed(&k.dek, key, content, codec, level),
            _ => codec::encode(content, codec, level),
        }
    }

    /// [`Self::encode`] of a data object into `out` (emptied first) where its frame is
    /// `lz4-blocks` (lz4, no encryption): a writer that encodes object after object hands the
    /// same few buffers round, so their pages are faulted in once, and no segment-sized buffer
    /// is zeroed per object. Elsewhere `out` is not used.
    pub fn encode_reusing(&self, key: &str, content: &[u8], out: Vec<u8>) -> bytes::Bytes {
        if !self.writes_lz4_blocks() || is_plain(key) {
            return bytes::Bytes::from(self.encode(key, content, Payload::Data));
        }
        let mut w = codec::BlockWriter::reusing(out, FRAME_HEADER_LEN, content.len());
        w.write(content);
        codec::frame_blocks(w.finish())
    }

    /// The content of the object stored under `key`, checked: a damaged object is
    /// [`RepoError::Corrupt`], never content.
    pub fn decode(&self, key: &str, stored: &[u8]) -> Result<Vec<u8>> {
        let corrupt = |source| RepoError::Corrupt {
            key: key.to_string(),
            source,
        };
        match &self.data_key {
            Some(k) if !is_plain(key) => decode_sealed(&k.dek, key, stored).map_err(corrupt),
            _ => codec::decode(stored).map_err(corrupt),
        }
    }

    /// [`Self::decode`] into `out`, reusing its allocation (see [`codec::decode_into`]).
    pub fn decode_into(&self, key: &str, stored: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let corrupt = |source| RepoError::Corrupt {
            key: key.to_string(),
            source,
        };
        match &self.data_key {
            Some(k) if !is_plain(key) => {
                *out = decode_sealed(&k.dek, key, stored).map_err(corrupt)?;
                Ok(())
            }
            _ => codec::decode_into(stored, out).map_err(corrupt),
        }
    }

    /// [`Self::decode_into`] on the blocking pool; gives `out` back, filled on success.
    pub async fn decode_blocking_into(
        &self,
        key: &str,
        stored: bytes::Bytes,
        mut out: Vec<u8>,
    ) -> (Result<()>, Vec<u8>) {
        let (this, key) = (self.clone(), key.to_string());
        tokio::task::spawn_blocking(move || (this.decode_into(&key, &stored, &mut out), out))
            .await
            .expect("decode task panicked")
    }

    /// [`Self::encode`] on the blocking pool (compressing a 16 MiB part takes milliseconds).
    pub async fn encode_blocking(&self, key: &str, content: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
        let (this, key) = (self.clone(), key.to_string());
        tokio::task::spawn_blocking(move || {
            let stored = this.encode(&key, &content, Payload::Data);
            (stored, content)
        })
        .await
        .expect("encode task panicked")
    }

    /// [`Self::decode`] on the blocking pool (a segment is up to 1 GiB).
    pub async fn decode_blocking(&self, key: &str, stored: bytes::Bytes) -> Result<Vec<u8>> {
        let (this, key) = (self.clone(), key.to_string());
        tokio::task::spawn_blocking(move || this.decode(&key, &stored))
            .await
            .expect("decode task panicked")
    }
}

/// The AAD of an encrypted object: its key and the header fields fixed before sealing.
fn aad(key: &str, header: &FrameHeader) -> Vec<u8> {
    let bytes = codec::header_bytes(header);
    crypt::object_aad(key, &bytes[..codec::SEALED_HEADER_PREFIX_LEN])
}

/// Compress, then seal in place: one buffer, the frame header filled in last.
fn encode_sealed(dek: &Dek, key: &str, content: &[u8], codec: Codec, level: i32) -> Vec<u8> {
    let room = FRAME_HEADER_LEN + SEAL_HEADER_LEN;
    let (codec, mut out) = codec::compress_with_room(content, codec, level, room);
    let mut header = FrameHeader {
        codec,
        raw_len: content.len() as u64,
        payload_len: (out.len() - room + SEAL_OVERHEAD) as u64,
        raw_crc32c: 0,
        payload_crc32c: 0,
        encrypted: true,
    };
    // Only the system's random number generator can fail here; an archive must not be
    // written unsealed, and there is nothing sensible to continue with.
    crypt::seal_in_place(dek, &aad(key, &header), &mut out, FRAME_HEADER_LEN)
        .expect("the operating system's random number generator failed");
    header.payload_crc32c = crate::codec::crc::crc32c(&out[FRAME_HEADER_LEN..]);
    out[..FRAME_HEADER_LEN].copy_from_slice(&codec::header_bytes(&header));
    out
}

/// Checks the frame, opens the payload, decompresses. Every object of an encrypted repository
/// must be sealed: an unencrypted frame there was put by someone without the key.
fn decode_sealed(dek: &Dek, key: &str, stored: &[u8]) -> Result<Vec<u8>, CodecError> {
    let header = codec::peek_header(stored)?;
    if !header.encrypted {
        return Err(CodecError::NotEncrypted);
    }
    let payload = codec::checked_payload(&header, stored)?;
    let mut sealed = payload.to_vec();
    let plain = crypt::open_in_place(dek, &aad(key, &header), &mut sealed)?;
    codec::decompress(header.codec, plain, header.raw_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(dek: Option<Dek>) -> ObjectCodec {
        ObjectCodec {
            write: WriteOptions::default(),
            data_key: dek.map(|dek| Arc::new(DataKey { dek, generation: 1 })),
        }
    }

    const KEY: &str = "wal/0000000100000000/000000010000000000000003";

    fn content() -> Vec<u8> {
        b"MARKER-pitr-enc "
            .iter()
            .copied()
            .cycle()
            .take(20_000)
            .collect()
    }

    #[test]
    fn unencrypted_objects_are_the_plain_frames_of_before() {
        let c = codec(None);
        let raw = content();
        assert_eq!(
            c.encode(KEY, &raw, Payload::Data),
            codec::encode(&raw, Codec::Lz4, 3)
        );
        assert_eq!(
            c.encode(KEY, &raw, Payload::Control),
            codec::encode(&raw, Codec::None, 0)
        );
    }

    #[test]
    fn encrypted_objects_round_trip_and_hide_the_content() {
        let c = codec(Some(Dek::generate().unwrap()));
        let raw = content();
        for payload in [Payload::Data, Payload::Control] {
            let stored = c.encode(KEY, &raw, payload);
            let h = codec::peek_header(&stored).unwrap();
            assert!(h.encrypted);
            assert_eq!(h.raw_crc32c, 0);
            assert_eq!(stored[4], 2, "frame version 2");
            assert!(!stored.windows(16).any(|w| w == b"MARKER-pitr-enc "));
            assert_eq!(c.decode(KEY, &stored).unwrap(), raw);
            // Without the key, or to a reader that predates encryption: refused, not garbage.
            assert!(matches!(
                codec(None).decode(KEY, &stored),
                Err(RepoError::Corrupt {
                    source: CodecError::Encrypted,
                    ..
                })
            ));
        }
        let empty = c.encode(KEY, b"", Payload::Data);
        assert_eq!(c.decode(KEY, &empty).unwrap(), b"");
    }

    #[test]
    fn every_flipped_byte_of_an_encrypted_object_is_refused() {
        let c = codec(Some(Dek::generate().unwrap()));
        let stored = c.encode(KEY, &content()[..3000], Payload::Data);
        for i in 0..stored.len() {
            let mut bad = stored.clone();
            bad[i] ^= 0x04;
            assert!(c.decode(KEY, &bad).is_err(), "flip at {i} not detected");
        }
        // Recomputing the CRCs (what a deliberate change would do) does not help: the tag fails.
        let mut forged = stored.clone();
        forged[FRAME_HEADER_LEN + SEAL_HEADER_LEN + 3] ^= 1;
        let crc = crc32c::crc32c(&forged[FRAME_HEADER_LEN..]);
        forged[28..32].copy_from_slice(&crc.to_le_bytes());
        let hcrc = crc32c::crc32c(&forged[..36]);
        forged[36..40].copy_from_slice(&hcrc.to_le_bytes());
        assert!(matches!(
            c.decode(KEY, &forged),
            Err(RepoError::Corrupt {
                source: CodecError::Sealed(crypt::CryptError::Authentication),
                ..
            })
        ));
    }

    #[test]
    fn moved_foreign_or_plain_objects_are_refused() {
        let c = codec(Some(Dek::generate().unwrap()));
        let stored = c.encode(KEY, b"segment", Payload::Data);
        let other_key = "wal/0000000100000000/000000010000000000000004";
        assert!(c.decode(other_key, &stored).is_err());
        let other_repo = codec(Some(Dek::generate().unwrap()));
        assert!(other_repo.decode(KEY, &stored).is_err());
        let plain = codec::encode(b"planted", Codec::None, 0);
        assert!(matches!(
            c.decode(KEY, &plain),
            Err(RepoError::Corrupt {
                source: CodecError::NotEncrypted,
                ..
            })
        ));
        // The descriptor and keyrings stay plain frames.
        let keyring = "keys/0000000001.json";
        assert_eq!(c.decode(keyring, &plain).unwrap(), b"planted");
        assert_eq!(c.encode(keyring, b"k", Payload::Control)[4], 1);
    }
}

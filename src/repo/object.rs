//! The one transform between an object's content and its stored bytes. Every object except the
//! descriptor goes through [`ObjectCodec`]: framing with checksums, compression, and (once a
//! repository is encrypted) authenticated encryption bound to the object's key. Jobs never see
//! stored bytes.

use super::{RepoError, Result, WriteOptions};
use crate::codec::{self, Codec};

/// How this repository turns content into stored bytes and back. Cheap to clone, so that the
/// CPU-heavy work can run on the blocking pool.
#[derive(Clone, Debug)]
pub(super) struct ObjectCodec {
    pub write: WriteOptions,
}

/// What kind of object is written: data is compressed with the configured codec; small
/// mutable control objects (leases, markers) are stored uncompressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Payload {
    Data,
    Control,
}

impl ObjectCodec {
    /// The stored bytes of `content` under `key`.
    pub fn encode(&self, _key: &str, content: &[u8], payload: Payload) -> Vec<u8> {
        match payload {
            Payload::Data => codec::encode(content, self.write.codec, self.write.level),
            Payload::Control => codec::encode(content, Codec::None, 0),
        }
    }

    /// The content of the object stored under `key`, checked: a damaged object is
    /// [`RepoError::Corrupt`], never content.
    pub fn decode(&self, key: &str, stored: &[u8]) -> Result<Vec<u8>> {
        codec::decode(stored).map_err(|source| RepoError::Corrupt {
            key: key.to_string(),
            source,
        })
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

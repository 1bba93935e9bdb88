//! The repository descriptor: which PostgreSQL cluster the repository belongs to.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{layout::DESCRIPTOR_KEY, RepoError, Result};
use crate::codec::{self, crypt, Codec};
use crate::storage::{Storage, StorageError};

/// Version of the repository layout this pitr writes. Bump it when a reader of the old version
/// would misread the new layout; readers refuse anything newer than they know.
pub const FORMAT_VERSION: u32 = 1;
/// Format version of an encrypted repository: its objects are frames of version 2, which a
/// pitr without encryption cannot read, and into which it must not write plaintext.
pub const FORMAT_VERSION_ENCRYPTED: u32 = 2;

/// What identifies the cluster a repository belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterIdentity {
    pub system_identifier: u64,
    pub pg_major: u32,
    pub wal_segment_size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub format_version: u32,
    /// As a string: JSON numbers lose precision above 2^53 in most readers.
    #[serde(with = "u64_as_string")]
    pub system_identifier: u64,
    pub pg_major: u32,
    pub wal_segment_size: u64,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    /// Random, chosen at creation: tells this repository from one created later at the same
    /// location (which would hold none of its WAL). Absent in descriptors written before it
    /// existed; those repositories keep working, but cannot be told apart from a successor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<String>,
    /// Present when the repository is encrypted (docs/encryption.md). Absent, not null, in an
    /// unencrypted repository, so that its descriptor is what it always was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// The descriptor's `encryption` entry: what a command without a key needs to say "this
/// repository is encrypted", and what the repository was created with. The keyrings under
/// `keys/` say which key generations exist now, with their own KDF parameters and salts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub cipher: crypt::Cipher,
    pub kdf: EncryptionKdf,
    /// The key generation the repository was created with (the descriptor is never rewritten).
    pub key_generation: u64,
}

/// The KDF and its cost parameters at creation (the salt is in the keyring).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionKdf {
    pub algorithm: crypt::KdfAlgorithm,
    pub version: u32,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Encryption {
    pub(super) fn of(keyring: &crypt::Keyring) -> Encryption {
        let k = &keyring.kdf;
        Encryption {
            cipher: keyring.cipher,
            kdf: EncryptionKdf {
                algorithm: k.algorithm,
                version: k.version,
                m_cost_kib: k.m_cost_kib,
                t_cost: k.t_cost,
                p_cost: k.p_cost,
            },
            key_generation: keyring.generation,
        }
    }
}

pub(super) mod u64_as_string {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

pub(super) async fn read(storage: &Storage) -> Result<Option<Descriptor>> {
    let bytes = match storage.get(DESCRIPTOR_KEY).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let raw = codec::decode(&bytes).map_err(|source| RepoError::Corrupt {
        key: DESCRIPTOR_KEY.into(),
        source,
    })?;
    // Look at the version before the rest: a newer format may have changed other fields.
    let version: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|e| RepoError::BadDescriptor {
            key: DESCRIPTOR_KEY.into(),
            message: e.to_string(),
        })?;
    let found = version
        .get("format_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as u32;
    if found > FORMAT_VERSION_ENCRYPTED {
        return Err(RepoError::NewerFormat {
            location: storage.location().to_string(),
            found,
            supported: FORMAT_VERSION_ENCRYPTED,
        });
    }
    let d: Descriptor = serde_json::from_value(version).map_err(|e| RepoError::BadDescriptor {
        key: DESCRIPTOR_KEY.into(),
        message: e.to_string(),
    })?;
    if (d.format_version == FORMAT_VERSION_ENCRYPTED) != d.encryption.is_some() {
        return Err(RepoError::BadDescriptor {
            key: DESCRIPTOR_KEY.into(),
            message: format!(
                "format_version {} {} an `encryption` entry",
                d.format_version,
                if d.encryption.is_some() {
                    "with"
                } else {
                    "without"
                }
            ),
        });
    }
    Ok(Some(d))
}

/// 128 random bits in hex: unique without coordination between writers.
fn new_repository_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Creates the descriptor. Two first writers may race: the loser reads the winner's.
pub(super) async fn create(
    storage: &Storage,
    cluster: &ClusterIdentity,
    encryption: Option<Encryption>,
) -> Result<(Descriptor, bool)> {
    let d = Descriptor {
        format_version: match encryption {
            Some(_) => FORMAT_VERSION_ENCRYPTED,
            None => FORMAT_VERSION,
        },
        system_identifier: cluster.system_identifier,
        pg_major: cluster.pg_major,
        wal_segment_size: cluster.wal_segment_size,
        created_at: Utc::now(),
        created_by: format!("pitr {}", env!("CARGO_PKG_VERSION")),
        repository_id: Some(new_repository_id()),
        encryption,
    };
    let json = serde_json::to_vec_pretty(&d).expect("descriptor serializes");
    // Uncompressed so that `tail -c +41 repository.json` shows it to a human.
    let framed = Bytes::from(codec::encode(&json, Codec::None, 0));
    let mut raced = 0;
    loop {
        match storage.put_if_absent(DESCRIPTOR_KEY, framed.clone()).await {
            Ok(()) => {
                tracing::info!(location = %storage.location(), system_id = d.system_identifier, repository_id = d.repository_id.as_deref().unwrap_or(""), "created repository");
                return Ok((d, true));
            }
            Err(StorageError::AlreadyExists { .. }) => match read(storage).await? {
                Some(found) => return Ok((found, false)),
                None if super::raced_create_settles(&mut raced).await => {}
                None => {
                    return Err(RepoError::NotInitialized {
                        location: storage.location().to_string(),
                    })
                }
            },
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor written before `repository_id` existed still reads, as one without an id.
    #[test]
    fn descriptors_without_a_repository_id_still_read() {
        let old = r#"{"format_version":1,"system_identifier":"7711201025540057278","pg_major":15,
            "wal_segment_size":16777216,"created_at":"2026-11-23T03:18:20.249Z","created_by":"pitr 0.1.0"}"#;
        let d: Descriptor = serde_json::from_str(old).unwrap();
        assert_eq!(d.repository_id, None);
        assert_eq!(d.system_identifier, 7711201025540057278);
        let id = new_repository_id();
        assert_eq!(id.len(), 32);
        assert_ne!(id, new_repository_id());
        let with = Descriptor {
            repository_id: Some(id.clone()),
            ..d
        };
        let json = serde_json::to_string(&with).unwrap();
        assert!(
            json.contains(&format!("\"repository_id\":\"{id}\"")),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Descriptor>(&json).unwrap(), with);
    }
}

//! An encrypted repository's keyrings (`keys/<generation>.json`): creating the first one,
//! unlocking the data key with the configured passphrase, and rotating the passphrase.
//!
//! Rotation protocol (docs/encryption.md, "Rotation"): the next generation is created by
//! conditional create, read back and opened, and only then are the older generations removed.
//! At every moment one of the two passphrases opens the repository; two rotations cannot both
//! create the same generation; no data object is touched (the data key does not change).

use std::sync::Arc;

use bytes::Bytes;

use super::descriptor::{Descriptor, Encryption};
use super::key_cache::KeyCache;
use super::{layout, RepoError, Repository, Result};
use crate::codec::crypt::{self, CryptError, Dek, KdfParams, Keyring};
use crate::codec::{self, Codec};
use crate::key_source::{KeySource, Passphrase};
use crate::storage::{Storage, StorageError};

/// The unwrapped data key of an open repository, and the key generation that opened it.
#[derive(Debug)]
pub(super) struct DataKey {
    pub dek: Dek,
    pub generation: u64,
}

/// What [`Repository::rotate_key`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// The generation the current key opened (the newest that existed before).
    pub from: u64,
    /// The generation the new key opens, now the only one.
    pub to: u64,
    /// An interrupted rotation to the same new key was finished (nothing new was created).
    pub resumed: bool,
}

/// Runs the key source off the async threads: a key command may take a KMS round trip.
async fn passphrase(source: &KeySource) -> Result<Passphrase> {
    let source = source.clone();
    tokio::task::spawn_blocking(move || source.resolve())
        .await
        .expect("key source task panicked")
        .map_err(RepoError::KeySource)
}

/// Argon2id is deliberately slow: off the async threads too.
async fn open_keyring(keyring: Keyring, passphrase: Arc<Passphrase>) -> Result<Dek, CryptError> {
    tokio::task::spawn_blocking(move || crypt::open_keyring(&keyring, passphrase.as_bytes()))
        .await
        .expect("keyring task panicked")
}

/// The key generations present, oldest first.
async fn generations(storage: &Storage) -> Result<Vec<u64>> {
    let mut found: Vec<u64> = storage
        .list(layout::KEYS_PREFIX)
        .await?
        .iter()
        .filter_map(|o| layout::parse_keyring_key(&o.key))
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// Reads keyring `generation` through its frame checksum (a plain frame: it is what opens the
/// sealed ones).
async fn read_keyring(storage: &Storage, generation: u64) -> Result<Keyring> {
    let key = layout::keyring_key(generation);
    let bytes = storage.get(&key).await?;
    let json = codec::decode(&bytes).map_err(|source| RepoError::Corrupt { key, source })?;
    Keyring::from_json(&json, generation).map_err(|source| RepoError::BadKeyring {
        location: storage.location().to_string(),
        source,
    })
}

/// Creates keyring `keyring.generation`; `false` when it exists already.
async fn create_keyring(storage: &Storage, keyring: &Keyring) -> Result<bool> {
    let framed = codec::encode(&keyring.to_json(), Codec::None, 0);
    let key = layout::keyring_key(keyring.generation);
    match storage.put_if_absent(&key, Bytes::from(framed)).await {
        Ok(()) => Ok(true),
        Err(StorageError::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The data key of a repository with this descriptor, or `None` when it is not encrypted.
/// Refuses, before anything is written, an encrypted repository without a key and an
/// unencrypted one with a key (a typo in a repository URL must never leave WAL in plaintext).
pub(super) async fn unlock_for(
    storage: &Storage,
    descriptor: &Descriptor,
    source: Option<&KeySource>,
) -> Result<Option<DataKey>> {
    // Unit tests stay out of the user's cache; they pass theirs to `unlock_with_cache`.
    let cache = if cfg!(test) {
        None
    } else {
        KeyCache::from_env()
    };
    unlock_with_cache(storage, descriptor, source, cache).await
}

/// [`unlock_for`] with the key cache `cache` (none: always the slow path).
pub(super) async fn unlock_with_cache(
    storage: &Storage,
    descriptor: &Descriptor,
    source: Option<&KeySource>,
    cache: Option<KeyCache>,
) -> Result<Option<DataKey>> {
    check_configured(storage, descriptor, source.is_some())?;
    let Some(source) = source else {
        return Ok(None);
    };
    let passphrase = Arc::new(passphrase(source).await?);
    // A repository without an id cannot be told from its successor at the same location:
    // nothing to bind an entry to, so no cache.
    let entry = match (cache, &descriptor.repository_id) {
        (Some(c), Some(id)) => Some(c.entry(&storage.location().to_string(), id)),
        _ => None,
    };
    let found = generations(storage).await?;
    let newest = found.last().copied();
    if let (Some(entry), Some(newest)) = (&entry, newest) {
        // Only for the newest generation: after a rotation the old passphrase must not open
        // the repository, and the slow path would try the newest first anyway.
        if let Some(dek) = entry.load(newest, passphrase.as_bytes()) {
            return Ok(Some(DataKey {
                dek,
                generation: newest,
            }));
        }
    }
    let key = unlock_listed(storage, found, passphrase.clone()).await?;
    if let Some(entry) = entry.filter(|_| Some(key.generation) == newest) {
        entry.store(&key.dek, key.generation, passphrase.as_bytes());
    }
    Ok(Some(key))
}

/// Whether a key is configured exactly when the repository is encrypted.
pub(super) fn check_configured(
    storage: &Storage,
    descriptor: &Descriptor,
    has_key: bool,
) -> Result<()> {
    let location = storage.location().to_string();
    match (&descriptor.encryption, has_key) {
        (Some(_), false) => Err(RepoError::KeyRequired { location }),
        (None, true) => Err(RepoError::NotEncrypted { location }),
        _ => Ok(()),
    }
}

/// Opens the newest keyring the passphrase opens. Older generations are tried too: after an
/// interrupted rotation both exist, and the old key must keep working until it is finished.
async fn unlock(storage: &Storage, passphrase: Arc<Passphrase>) -> Result<DataKey> {
    unlock_listed(storage, generations(storage).await?, passphrase).await
}

/// [`unlock`] over the generations `found` (oldest first), as listed by the caller.
async fn unlock_listed(
    storage: &Storage,
    found: Vec<u64>,
    passphrase: Arc<Passphrase>,
) -> Result<DataKey> {
    let location = storage.location().to_string();
    let mut first_error = None;
    for generation in found.into_iter().rev() {
        let keyring = match read_keyring(storage, generation).await {
            Ok(k) => k,
            // Removed by a rotation since the LIST: the next older (or none) decides.
            Err(RepoError::Storage(e)) if e.is_not_found() => continue,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        match open_keyring(keyring, passphrase.clone()).await {
            Ok(dek) => return Ok(DataKey { dek, generation }),
            Err(CryptError::WrongKey { .. }) => {
                first_error.get_or_insert(RepoError::WrongKey {
                    location: location.clone(),
                });
            }
            Err(source) => {
                first_error.get_or_insert(RepoError::BadKeyring {
                    location: location.clone(),
                    source,
                });
            }
        }
    }
    Err(first_error.unwrap_or(RepoError::NoKeyring { location }))
}

/// For a repository being created: its first keyring and data key. A keyring left by a creator
/// that stopped before writing the descriptor (or written by a concurrent creator) is opened
/// with the passphrase instead, so every creator ends up with the same data key.
pub(super) async fn create_first(
    storage: &Storage,
    source: &KeySource,
) -> Result<(Encryption, DataKey)> {
    let passphrase = Arc::new(passphrase(source).await?);
    if generations(storage).await?.is_empty() {
        let p = passphrase.clone();
        let (keyring, dek) = tokio::task::spawn_blocking(move || {
            crypt::create_keyring(p.as_bytes(), KdfParams::generate()?)
        })
        .await
        .expect("keyring task panicked")
        .map_err(|source| RepoError::BadKeyring {
            location: storage.location().to_string(),
            source,
        })?;
        if create_keyring(storage, &keyring).await? {
            let encryption = Encryption::of(&keyring);
            return Ok((encryption, DataKey { dek, generation: 1 }));
        }
    }
    let key = unlock(storage, passphrase).await?;
    let keyring = read_keyring(storage, key.generation).await?;
    Ok((Encryption::of(&keyring), key))
}

impl Repository {
    /// Rewraps the data key under the passphrase of `new` as the next key generation, then
    /// removes the older generations. Run again with the same `new` after an interruption
    /// (with either key as the current one), it finishes the job.
    pub async fn rotate_key(&self, new: &KeySource) -> Result<Rotation> {
        let location = self.location();
        let Some(current) = self.objects.data_key.clone() else {
            return Err(RepoError::NotEncrypted { location });
        };
        let newest =
            *generations(&self.storage)
                .await?
                .last()
                .ok_or_else(|| RepoError::NoKeyring {
                    location: location.clone(),
                })?;
        let new_passphrase = Arc::new(passphrase(new).await?);
        if current.generation < newest {
            return self.resume_rotation(&current, newest, new_passphrase).await;
        }
        let next = current.generation + 1;
        let newest_keyring = read_keyring(&self.storage, current.generation).await?;
        let (p, key) = (new_passphrase.clone(), current.clone());
        let keyring = tokio::task::spawn_blocking(move || {
            crypt::rewrap_keyring(
                &newest_keyring,
                &key.dek,
                p.as_bytes(),
                KdfParams::generate()?,
            )
        })
        .await
        .expect("keyring task panicked")
        .map_err(|source| RepoError::BadKeyring {
            location: location.clone(),
            source,
        })?;
        if !create_keyring(&self.storage, &keyring).await? {
            return Err(RepoError::RotationConflict {
                location,
                generation: next,
            });
        }
        // Read back what is now stored: the old keyrings go only once the new one is proven.
        let stored = read_keyring(&self.storage, next).await?;
        open_keyring(stored, new_passphrase)
            .await
            .map_err(|source| RepoError::BadKeyring {
                location: location.clone(),
                source,
            })?;
        // TODO(audit): record "key rotated from generation {from} to {next}" once the audit
        // trail exists; the log line below is the record until then.
        self.remove_generations_below(next).await?;
        tracing::info!(repo = %location, from = current.generation, to = next, "encryption key rotated");
        Ok(Rotation {
            from: current.generation,
            to: next,
            resumed: false,
        })
    }

    /// The current key opened an older generation than the newest: finish the rotation if the
    /// new key opens the newest one (an interrupted run of this same rotation), else refuse.
    async fn resume_rotation(
        &self,
        current: &DataKey,
        newest: u64,
        new_passphrase: Arc<Passphrase>,
    ) -> Result<Rotation> {
        let keyring = read_keyring(&self.storage, newest).await?;
        match open_keyring(keyring, new_passphrase).await {
            Ok(_) => {
                self.remove_generations_below(newest).await?;
                tracing::info!(repo = %self.location(), to = newest, "finished an interrupted key rotation");
                Ok(Rotation {
                    from: current.generation,
                    to: newest,
                    resumed: true,
                })
            }
            Err(_) => Err(RepoError::NotNewestKey {
                location: self.location(),
                opens: current.generation,
                newest,
            }),
        }
    }

    async fn remove_generations_below(&self, keep: u64) -> Result<()> {
        for generation in generations(&self.storage).await? {
            if generation < keep {
                match self.storage.delete(&layout::keyring_key(generation)).await {
                    Err(e) if !e.is_not_found() => return Err(e.into()),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The key generation that opened this repository, `None` when it is not encrypted.
    pub fn key_generation(&self) -> Option<u64> {
        self.objects.data_key.as_ref().map(|k| k.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ClusterIdentity, PutOutcome, WriteOptions};
    use super::*;
    use crate::wal::WalFileName;

    const CLUSTER: ClusterIdentity = ClusterIdentity {
        system_identifier: 7_000_000_000_000_000_002,
        pg_major: 16,
        wal_segment_size: 16 << 20,
    };

    fn with_key(passphrase: &str) -> WriteOptions {
        WriteOptions {
            encryption_key: Some(KeySource::Command(format!("printf {passphrase}"))),
            ..WriteOptions::default()
        }
    }

    fn segment() -> WalFileName {
        WalFileName::parse("000000010000000000000001").unwrap()
    }

    async fn encrypted(storage: &Storage, passphrase: &str) -> Repository {
        Repository::open_for_cluster(storage.clone(), &CLUSTER, "test", with_key(passphrase))
            .await
            .unwrap()
    }

    /// Every stored key and its bytes, to prove a refusal wrote nothing.
    async fn snapshot(storage: &Storage) -> Vec<(String, Bytes)> {
        let mut out = vec![];
        for o in storage.list("").await.unwrap() {
            let bytes = storage.get(&o.key).await.unwrap();
            out.push((o.key, bytes));
        }
        out
    }

    #[tokio::test]
    async fn a_repository_created_with_a_key_is_encrypted() {
        let storage = Storage::in_memory();
        let repo = encrypted(&storage, "one").await;
        let d = repo.descriptor();
        assert_eq!(d.format_version, 2);
        assert_eq!(d.encryption.as_ref().unwrap().key_generation, 1);
        assert_eq!(generations(&storage).await.unwrap(), vec![1]);
        repo.put_wal_file(&segment(), b"MARKER in WAL")
            .await
            .unwrap();
        let stored = storage.get(&layout::wal_key(&segment())).await.unwrap();
        assert!(!stored.windows(6).any(|w| w == b"MARKER"));
        assert_eq!(stored[4], 2, "frame version 2");
        // A second process with the same key reads it; re-archiving is idempotent.
        let again = Repository::open(storage.clone(), with_key("one"))
            .await
            .unwrap();
        assert_eq!(
            again.get_wal_file(&segment()).await.unwrap().unwrap(),
            b"MARKER in WAL"
        );
        assert_eq!(
            again
                .put_wal_file(&segment(), b"MARKER in WAL")
                .await
                .unwrap(),
            PutOutcome::AlreadyStored
        );
    }

    #[tokio::test]
    async fn missing_wrong_or_superfluous_keys_are_refused_without_writing() {
        let storage = Storage::in_memory();
        encrypted(&storage, "right")
            .await
            .put_wal_file(&segment(), b"wal")
            .await
            .unwrap();
        let before = snapshot(&storage).await;
        let e = Repository::open(storage.clone(), WriteOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::KeyRequired { .. }), "{e}");
        assert!(e
            .to_string()
            .starts_with("this repository is encrypted: set"));
        let e = Repository::open_for_cluster(storage.clone(), &CLUSTER, "t", with_key("wrong"))
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        let failing = WriteOptions {
            encryption_key: Some(KeySource::Command("echo right; exit 1".into())),
            ..WriteOptions::default()
        };
        let e = Repository::open(storage.clone(), failing)
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::KeySource(_)), "{e}");
        assert_eq!(snapshot(&storage).await, before);

        let plain = Storage::in_memory();
        Repository::open_for_cluster(plain.clone(), &CLUSTER, "t", WriteOptions::default())
            .await
            .unwrap();
        let before = snapshot(&plain).await;
        let e = Repository::open_for_cluster(plain.clone(), &CLUSTER, "t", with_key("k"))
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::NotEncrypted { .. }), "{e}");
        assert_eq!(snapshot(&plain).await, before);
    }

    #[tokio::test]
    async fn rotation_rewraps_without_touching_data() {
        let storage = Storage::in_memory();
        let repo = encrypted(&storage, "old").await;
        repo.put_wal_file(&segment(), b"wal").await.unwrap();
        let wal_before = storage.get(&layout::wal_key(&segment())).await.unwrap();
        let r = repo
            .rotate_key(&KeySource::Command("printf new".into()))
            .await
            .unwrap();
        assert_eq!((r.from, r.to, r.resumed), (1, 2, false));
        assert_eq!(generations(&storage).await.unwrap(), vec![2]);
        let wal_after = storage.get(&layout::wal_key(&segment())).await.unwrap();
        assert_eq!(wal_before, wal_after);
        let e = Repository::open(storage.clone(), with_key("old"))
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        let reopened = Repository::open(storage.clone(), with_key("new"))
            .await
            .unwrap();
        assert_eq!(reopened.key_generation(), Some(2));
        assert_eq!(
            reopened.get_wal_file(&segment()).await.unwrap().unwrap(),
            b"wal"
        );
        // The stale process still holding generation 1 cannot rotate over generation 2.
        let e = repo
            .rotate_key(&KeySource::Command("printf other".into()))
            .await
            .unwrap_err();
        assert!(
            matches!(e, RepoError::NotNewestKey { newest: 2, .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_interrupted_rotation_leaves_both_keys_working_and_is_finished_by_a_rerun() {
        let storage = Storage::in_memory();
        let repo = encrypted(&storage, "old").await;
        repo.put_wal_file(&segment(), b"wal").await.unwrap();
        let gen1 = storage.get(&layout::keyring_key(1)).await.unwrap();
        repo.rotate_key(&KeySource::Command("printf new".into()))
            .await
            .unwrap();
        // The state a crash between "create generation 2" and "remove generation 1" leaves.
        storage
            .put_if_absent(&layout::keyring_key(1), gen1)
            .await
            .unwrap();
        for key in ["old", "new"] {
            let r = Repository::open(storage.clone(), with_key(key))
                .await
                .unwrap();
            assert_eq!(r.get_wal_file(&segment()).await.unwrap().unwrap(), b"wal");
        }
        // Re-running the same rotation (old key still configured as current) finishes it.
        let old = Repository::open(storage.clone(), with_key("old"))
            .await
            .unwrap();
        assert_eq!(old.key_generation(), Some(1));
        let r = old
            .rotate_key(&KeySource::Command("printf new".into()))
            .await
            .unwrap();
        assert_eq!((r.to, r.resumed), (2, true));
        assert_eq!(generations(&storage).await.unwrap(), vec![2]);
        assert!(Repository::open(storage.clone(), with_key("old"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn two_rotations_at_once_cannot_both_win() {
        let storage = Storage::in_memory();
        let repo = encrypted(&storage, "old").await;
        let other = Repository::open(storage.clone(), with_key("old"))
            .await
            .unwrap();
        let (key_a, key_b) = (
            KeySource::Command("printf a".into()),
            KeySource::Command("printf b".into()),
        );
        let (a, b) = tokio::join!(repo.rotate_key(&key_a), other.rotate_key(&key_b));
        let wins = [a.is_ok(), b.is_ok()];
        assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{a:?} {b:?}");
        let winner = if wins[0] { "a" } else { "b" };
        let loser = if wins[0] { "b" } else { "a" };
        assert!(Repository::open(storage.clone(), with_key(winner))
            .await
            .is_ok());
        assert!(Repository::open(storage.clone(), with_key(loser))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn concurrent_creators_with_the_same_key_share_the_data_key() {
        let storage = Storage::in_memory();
        let (a, b) = tokio::join!(encrypted(&storage, "k"), encrypted(&storage, "k"));
        a.put_wal_file(&segment(), b"from a").await.unwrap();
        assert_eq!(
            b.get_wal_file(&segment()).await.unwrap().unwrap(),
            b"from a"
        );
        // A keyring left without a descriptor (creator stopped in between) is reused.
        let storage = Storage::in_memory();
        let first = encrypted(&storage, "k").await;
        first.put_wal_file(&segment(), b"x").await.unwrap();
        let keyring = storage.get(&layout::keyring_key(1)).await.unwrap();
        let fresh = Storage::in_memory();
        fresh
            .put_if_absent(&layout::keyring_key(1), keyring)
            .await
            .unwrap();
        let e = Repository::open_for_cluster(fresh.clone(), &CLUSTER, "t", with_key("bad"))
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        assert!(storage_has_no_descriptor(&fresh).await);
        encrypted(&fresh, "k").await;
    }

    async fn storage_has_no_descriptor(storage: &Storage) -> bool {
        storage
            .head(layout::DESCRIPTOR_KEY)
            .await
            .unwrap()
            .is_none()
    }

    /// Unlocks with `passphrase` through the key cache in `dir`.
    async fn unlock_cached(
        storage: &Storage,
        passphrase: &str,
        dir: &std::path::Path,
    ) -> Result<DataKey> {
        let d = super::super::descriptor::read(storage)
            .await
            .unwrap()
            .unwrap();
        let source = KeySource::Command(format!("printf {passphrase}"));
        let cache = Some(KeyCache::at(dir.to_path_buf()));
        unlock_with_cache(storage, &d, Some(&source), cache)
            .await
            .map(|k| k.expect("encrypted"))
    }

    /// Every file in `dir` and its bytes.
    fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(p).unwrap()))
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn the_key_cache_skips_the_keyring_and_the_kdf() {
        let storage = Storage::in_memory();
        encrypted(&storage, "k").await;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        assert_eq!(
            unlock_cached(&storage, "k", &dir).await.unwrap().generation,
            1
        );
        assert_eq!(files(&dir).len(), 1, "one entry written");
        // With the keyring object unreadable, only the cache can open the repository: proof
        // that neither the keyring GET nor Argon2id ran.
        let keyring = storage.get(&layout::keyring_key(1)).await.unwrap();
        storage
            .put_overwrite(&layout::keyring_key(1), Bytes::from_static(b"damaged"))
            .await
            .unwrap();
        let key = unlock_cached(&storage, "k", &dir).await.unwrap();
        assert_eq!(key.generation, 1);
        let other = tempfile::tempdir().unwrap();
        assert!(unlock_cached(&storage, "k", other.path()).await.is_err());
        // The cached key is the repository's: it reads what the slow path wrote.
        storage
            .put_overwrite(&layout::keyring_key(1), keyring)
            .await
            .unwrap();
        let repo = Repository::open(storage.clone(), with_key("k"))
            .await
            .unwrap();
        repo.put_wal_file(&segment(), b"wal").await.unwrap();
        let slow = repo.objects.data_key.clone().unwrap();
        let sealed = crypt::seal(&slow.dek, b"aad", b"text").unwrap();
        assert_eq!(crypt::open(&key.dek, b"aad", &sealed).unwrap(), b"text");
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_despite_the_cache_and_writes_nothing() {
        let storage = Storage::in_memory();
        encrypted(&storage, "right").await;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        unlock_cached(&storage, "right", &dir).await.unwrap();
        let (repo_before, cache_before) = (snapshot(&storage).await, files(&dir));
        let e = unlock_cached(&storage, "wrong", &dir).await.unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        assert_eq!(snapshot(&storage).await, repo_before);
        assert_eq!(files(&dir), cache_before);
        // Nor is anything created by a refusal in an empty cache.
        let empty = tmp.path().join("empty");
        let e = unlock_cached(&storage, "wrong", &empty).await.unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        assert!(!empty.exists());
        // The right key still hits the entry.
        assert!(unlock_cached(&storage, "right", &dir).await.is_ok());
        assert_eq!(files(&dir), cache_before);
    }

    #[tokio::test]
    async fn a_rotation_invalidates_the_cache() {
        let storage = Storage::in_memory();
        let repo = encrypted(&storage, "old").await;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        unlock_cached(&storage, "old", &dir).await.unwrap();
        repo.rotate_key(&KeySource::Command("printf new".into()))
            .await
            .unwrap();
        let before = files(&dir);
        let e = unlock_cached(&storage, "old", &dir).await.unwrap_err();
        assert!(matches!(e, RepoError::WrongKey { .. }), "{e}");
        assert_eq!(files(&dir), before, "a refusal rewrites nothing");
        let key = unlock_cached(&storage, "new", &dir).await.unwrap();
        assert_eq!(key.generation, 2);
        let after = files(&dir);
        assert_eq!(after.len(), 1);
        assert_ne!(after, before, "the entry now holds generation 2");
        // And the new entry is the one used from now on.
        storage
            .put_overwrite(&layout::keyring_key(2), Bytes::from_static(b"damaged"))
            .await
            .unwrap();
        assert_eq!(
            unlock_cached(&storage, "new", &dir)
                .await
                .unwrap()
                .generation,
            2
        );
    }
}

//! The local key cache: an encrypted repository's data key, wrapped under the passphrase, in a
//! file of the user running pitr, so that a process that already knows the passphrase skips
//! Argon2id and the keyring GET (archive-push runs once per WAL segment). docs/encryption.md,
//! "Key cache", has the threat model.
//!
//! One entry per repository (location and repository id), bound to one key generation: it is
//! used only when that generation is still the newest one listed, so that a rotation
//! invalidates it, and it opens only with the passphrase that wrote it, so that another key
//! falls back to the slow path, which refuses it as before. An entry that is unreadable, not
//! ours, or open to other users is ignored. Nothing here is ever an error: the cache can only
//! save time.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::codec::crypt::{self, Dek};

/// The environment variable that turns the cache off (`off`) or moves it (an absolute path).
pub const ENV: &str = "PITR_ENCRYPTION_KEY_CACHE";
const CACHE_VERSION: u32 = 1;
const AAD_LABEL: &[u8] = b"pitr key cache v1\0";
/// An entry is a few hundred bytes; anything much larger is not one.
const MAX_ENTRY_LEN: u64 = 4096;

/// Where entries live; `None` from [`KeyCache::from_env`] means no caching.
#[derive(Clone, Debug)]
pub(super) struct KeyCache {
    dir: PathBuf,
}

/// The cache entry of one repository.
#[derive(Debug)]
pub(super) struct Entry {
    path: PathBuf,
    location: String,
    repository_id: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    cache_version: u32,
    location: String,
    repository_id: String,
    generation: u64,
    /// Hex of [`crypt::wrap_dek_for_cache`]'s output.
    wrapped_dek: String,
}

impl KeyCache {
    pub fn at(dir: PathBuf) -> KeyCache {
        KeyCache { dir }
    }

    /// From `PITR_ENCRYPTION_KEY_CACHE`: unset or `on` is `$XDG_CACHE_HOME/pitr/keys` (else
    /// `~/.cache/pitr/keys`), `off` none, an absolute path that directory.
    pub fn from_env() -> Option<KeyCache> {
        Self::from_setting(
            std::env::var_os(ENV),
            std::env::var_os("XDG_CACHE_HOME"),
            std::env::var_os("HOME"),
        )
    }

    fn from_setting(
        setting: Option<OsString>,
        xdg: Option<OsString>,
        home: Option<OsString>,
    ) -> Option<KeyCache> {
        let setting = setting.unwrap_or_default();
        match setting.to_str() {
            Some("off" | "false" | "no" | "0") => return None,
            Some("" | "on" | "true" | "yes" | "1") => {}
            _ => {
                let dir = PathBuf::from(&setting);
                if dir.is_absolute() {
                    return Some(KeyCache::at(dir));
                }
                tracing::warn!(
                    "{ENV} must be `off`, `on` or an absolute directory; the key cache is off"
                );
                return None;
            }
        }
        let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
        let base = absolute(xdg).or_else(|| absolute(home).map(|h| h.join(".cache")))?;
        Some(KeyCache::at(base.join("pitr").join("keys")))
    }

    /// The entry of the repository at `location` with id `repository_id`. The file name is a
    /// digest: a location may hold any character, and names say nothing about the repository.
    pub fn entry(&self, location: &str, repository_id: &str) -> Entry {
        let mut id = Vec::with_capacity(location.len() + repository_id.len() + 1);
        id.extend_from_slice(location.as_bytes());
        id.push(0);
        id.extend_from_slice(repository_id.as_bytes());
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &id);
        Entry {
            path: self.dir.join(hex::encode(&digest.as_ref()[..16])),
            location: location.to_string(),
            repository_id: repository_id.to_string(),
        }
    }
}

impl Entry {
    fn aad(&self, generation: u64) -> Vec<u8> {
        let mut aad = AAD_LABEL.to_vec();
        for part in [self.location.as_bytes(), self.repository_id.as_bytes()] {
            aad.extend_from_slice(&(part.len() as u32).to_le_bytes());
            aad.extend_from_slice(part);
        }
        aad.extend_from_slice(&generation.to_le_bytes());
        aad
    }

    /// The cached data key, if the entry is for key generation `newest` and opens with
    /// `passphrase`.
    pub fn load(&self, newest: u64, passphrase: &[u8]) -> Option<Dek> {
        let bytes = read_private(&self.path)?;
        let stored: Stored = serde_json::from_slice(&bytes).ok()?;
        if stored.cache_version != CACHE_VERSION
            || stored.generation != newest
            || stored.location != self.location
            || stored.repository_id != self.repository_id
        {
            return None;
        }
        let wrapped = hex::decode(&stored.wrapped_dek).ok()?;
        let dek = crypt::unwrap_dek_from_cache(&wrapped, passphrase, &self.aad(newest));
        tracing::debug!(
            hit = dek.is_some(),
            generation = newest,
            "encryption key cache"
        );
        dek
    }

    /// Records the data key of generation `generation`. Best effort: a failure is logged and
    /// costs the next process one Argon2id, nothing else.
    pub fn store(&self, dek: &Dek, generation: u64, passphrase: &[u8]) {
        if let Err(e) = self.try_store(dek, generation, passphrase) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot write the encryption key cache");
        }
    }

    fn try_store(&self, dek: &Dek, generation: u64, passphrase: &[u8]) -> std::io::Result<()> {
        let wrapped = crypt::wrap_dek_for_cache(dek, passphrase, &self.aad(generation))
            .map_err(std::io::Error::other)?;
        let json = serde_json::to_vec(&Stored {
            cache_version: CACHE_VERSION,
            location: self.location.clone(),
            repository_id: self.repository_id.clone(),
            generation,
            wrapped_dek: hex::encode(wrapped),
        })?;
        let dir = self.path.parent().expect("entries live in a directory");
        private_dir(dir)?;
        // A unique temporary name, renamed over the entry: readers see the old or the new one.
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            std::process::id(),
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("entry")
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let written = file.write_all(&json);
        drop(file);
        match written.and_then(|_| std::fs::rename(&tmp, &self.path)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// Whether `meta` belongs to this user and is closed to everyone else.
fn is_private(meta: &std::fs::Metadata) -> bool {
    meta.uid() == rustix::process::geteuid().as_raw() && meta.permissions().mode() & 0o077 == 0
}

/// Creates `dir` (mode 0700) if needed; refuses one that is not this user's alone.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || !is_private(&meta) {
        return Err(std::io::Error::other(
            "the key cache directory is not a directory of this user's alone (mode 0700)",
        ));
    }
    Ok(())
}

/// The content of a regular file of this user's alone, in a directory of this user's alone
/// (a symlink, or a file others can read or replace, is not an entry).
fn read_private(path: &Path) -> Option<Vec<u8>> {
    let dir = std::fs::symlink_metadata(path.parent()?).ok()?;
    if !dir.is_dir() || !is_private(&dir) {
        return None;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || !is_private(&meta) || meta.len() > MAX_ENTRY_LEN {
        return None;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_turns_it_off_moves_it_or_defaults_to_the_user_cache() {
        let os = |s: &str| Some(OsString::from(s));
        let dir = |c: Option<KeyCache>| c.map(|c| c.dir);
        assert_eq!(
            dir(KeyCache::from_setting(None, None, os("/home/pg"))),
            Some(PathBuf::from("/home/pg/.cache/pitr/keys"))
        );
        assert_eq!(
            dir(KeyCache::from_setting(os("on"), os("/xdg"), os("/h"))),
            Some(PathBuf::from("/xdg/pitr/keys"))
        );
        assert_eq!(
            dir(KeyCache::from_setting(os("/run/pitr"), None, os("/h"))),
            Some(PathBuf::from("/run/pitr"))
        );
        for off in ["off", "no", "0", "false", "relative/dir"] {
            assert!(
                KeyCache::from_setting(os(off), None, os("/h")).is_none(),
                "{off}"
            );
        }
        assert!(KeyCache::from_setting(None, None, None).is_none());
        assert!(KeyCache::from_setting(None, os("rel"), os("rel")).is_none());
    }

    #[test]
    fn an_entry_opens_for_its_generation_and_passphrase_and_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = KeyCache::at(tmp.path().join("keys"));
        let entry = cache.entry("file:///r", "id1");
        let dek = Dek::generate().unwrap();
        assert!(entry.load(3, b"p").is_none());
        entry.store(&dek, 3, b"p");
        let meta = std::fs::metadata(&entry.path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir_mode = std::fs::metadata(tmp.path().join("keys"))
            .unwrap()
            .permissions();
        assert_eq!(dir_mode.mode() & 0o777, 0o700);
        assert!(entry.load(3, b"p").is_some());
        assert!(entry.load(4, b"p").is_none(), "another generation");
        assert!(entry.load(3, b"q").is_none(), "another passphrase");
        assert!(cache.entry("file:///r", "id2").load(3, b"p").is_none());
        // Readable by others: not trusted (someone may have planted or read it).
        std::fs::set_permissions(&entry.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(entry.load(3, b"p").is_none());
    }
}

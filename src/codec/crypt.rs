//! Encryption at rest: key derivation, data-key wrapping and authenticated object sealing.
//!
//! Pure code (no I/O, no repository keys): `src/repo` decides which objects are sealed, under
//! which AAD, and where the keyring objects live. docs/encryption.md is the user-facing
//! description and the threat model; the byte layouts below are normative, keep them in step.
//!
//! Two levels of keys, so that rotating the passphrase never rewrites data:
//! - one random 256-bit data key (DEK) per repository seals every object;
//! - the DEK is stored wrapped (AES-256-GCM) under a key-encryption key (KEK) derived from the
//!   passphrase with Argon2id. A [`Keyring`] is one such wrapping ("generation"); rotation writes
//!   generation N+1 wrapping the same DEK under the new passphrase, then removes generation N.
//!
//! Each object is sealed under its own one-time AES-256-GCM key, HKDF-SHA256(DEK, random 32-byte
//! salt). GCM's 96-bit nonce is the weak point of a long-lived key (random nonces collide after
//! ~2^32 messages; a counter needs state shared by every archive-push process). With a fresh key
//! per object a nonce is never reused under a key, whatever the number of writers, and no
//! counter has to be persisted. The per-object salt costs 32 bytes and one HKDF (about a
//! microsecond) per object.

use std::fmt;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
use zeroize::Zeroizing;

/// Length of the DEK and of the KEK.
pub const KEY_LEN: usize = 32;
/// Version of the sealed-object layout; readers refuse versions they do not know.
pub const SEAL_VERSION: u8 = 1;
/// Per-object HKDF salt: 256 bits, so that two objects never share a subkey (birthday bound
/// 2^128 objects).
pub const OBJECT_SALT_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes before the ciphertext: version, salt, nonce.
pub const SEAL_HEADER_LEN: usize = 1 + OBJECT_SALT_LEN + NONCE_LEN;
/// Sealed length = plaintext length + this.
pub const SEAL_OVERHEAD: usize = SEAL_HEADER_LEN + TAG_LEN;
/// Version of the keyring record below.
pub const KEYRING_VERSION: u32 = 1;
/// Argon2 salt length: RFC 9106 recommends 16 bytes; 32 costs nothing.
pub const KDF_SALT_LEN: usize = 32;

// Domain-separation labels (HKDF "info"): one secret is never used for two purposes.
const OBJECT_KEY_INFO: &[u8] = b"pitr object key v1";
const WRAP_KEY_INFO: &[u8] = b"pitr keyring wrap v1";
const KEY_CHECK_INFO: &[u8] = b"pitr keyring check v1";
const CACHE_WRAP_INFO: &[u8] = b"pitr key cache wrap v1";
const OBJECT_AAD_LABEL: &[u8] = b"pitr object v1\0";
const KEYRING_AAD_LABEL: &[u8] = b"pitr keyring v1\0";
/// Wrapped DEK: nonce, ciphertext of the DEK, tag.
const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
/// The DEK as the local key cache keeps it: salt || nonce || AES-256-GCM(DEK) || tag.
pub const CACHE_WRAPPED_LEN: usize = KDF_SALT_LEN + WRAPPED_LEN;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptError {
    /// The passphrase derives a key whose check value differs from the keyring's: the key is
    /// wrong (or the KDF parameters were tampered with), as opposed to a damaged wrapped key.
    #[error("the encryption key does not open this repository (key generation {generation}): it is not the repository's current key")]
    WrongKey { generation: u64 },
    #[error("the repository's key object (generation {generation}) is corrupt: {what}")]
    CorruptKeyring { generation: u64, what: String },
    #[error("encrypted object fails authentication: it was damaged or changed, stored under another name, or written with another repository's key")]
    Authentication,
    #[error("encrypted object is truncated: {len} bytes, the smallest is {SEAL_OVERHEAD}")]
    Truncated { len: usize },
    #[error("encrypted object version {found} is newer than this pitr understands ({SEAL_VERSION}); upgrade pitr")]
    NewerVersion { found: u8 },
    #[error("key derivation parameters out of range: {reason}")]
    KdfParams { reason: String },
    #[error("the operating system's random number generator failed")]
    Random,
}

/// A 256-bit secret that zeroizes on drop and never prints.
struct Secret(Zeroizing<[u8; KEY_LEN]>);

impl Secret {
    fn random() -> Result<Secret, CryptError> {
        let mut s = Secret(Zeroizing::new([0u8; KEY_LEN]));
        fill_random(&mut s.0[..])?;
        Ok(s)
    }
}

/// The repository's data key. Never leaves the process unwrapped: the keyrings wrap it under
/// Argon2id, the local key cache ([`wrap_dek_for_cache`]) under the passphrase itself.
pub struct Dek(Secret);

/// A key-encryption key derived from a passphrase ([`derive_kek`]).
pub struct Kek(Secret);

impl Dek {
    pub fn generate() -> Result<Dek, CryptError> {
        Secret::random().map(Dek)
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

/// Salts, nonces and keys come straight from the operating system (getrandom(2)), not from
/// aws-lc's RNG: seeding that one runs its CPU-jitter entropy source first, which costs tens of
/// milliseconds of CPU in every process (measured: +25 ms per archive-push, see
/// docs/benchmarks.md), and a process here draws only a few dozen random bytes.
fn fill_random(buf: &mut [u8]) -> Result<(), CryptError> {
    use rand::RngCore;
    rand::rngs::OsRng
        .try_fill_bytes(buf)
        .map_err(|_| CryptError::Random)
}

/// HKDF-SHA256(ikm, salt) expanded with `info` into a 32-byte secret.
fn hkdf_secret(ikm: &[u8], salt: &[u8], info: &[u8]) -> Secret {
    let mut out = Secret(Zeroizing::new([0u8; KEY_LEN]));
    Salt::new(HKDF_SHA256, salt)
        .extract(ikm)
        .expand(&[info], HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out.0[..]))
        // HKDF-SHA256 only fails for outputs over 255 * 32 bytes; ours is 32.
        .expect("HKDF-SHA256 expands 32 bytes");
    out
}

fn aes_key(secret: &Secret) -> LessSafeKey {
    let key = UnboundKey::new(&AES_256_GCM, &secret.0[..]).expect("AES-256-GCM takes 32 bytes");
    LessSafeKey::new(key)
}

/// The AAD `src/repo` passes for an object: its repository key and its frame header, each
/// length-prefixed so that no two (key, header) pairs give the same bytes. Sealing under it means
/// an object copied or renamed to another key, or given another header, no longer opens.
pub fn object_aad(repo_key: &str, frame_header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(OBJECT_AAD_LABEL.len() + 8 + repo_key.len() + 40);
    aad.extend_from_slice(OBJECT_AAD_LABEL);
    aad.extend_from_slice(&(repo_key.len() as u32).to_le_bytes());
    aad.extend_from_slice(repo_key.as_bytes());
    aad.extend_from_slice(&(frame_header.len() as u32).to_le_bytes());
    aad.extend_from_slice(frame_header);
    aad
}

/// Seals `plaintext` under a one-time subkey of `dek`. Layout (all of it authenticated: the
/// version through the AAD, salt and nonce because they determine key and nonce):
///
/// ```text
/// 0   version u8 (1)
/// 1   salt [32]     HKDF-SHA256 salt: subkey = HKDF(ikm = DEK, salt, info "pitr object key v1")
/// 33  nonce [12]    random; unique anyway since the subkey is used once
/// 45  ciphertext    AES-256-GCM, same length as the plaintext
/// end tag [16]      GCM tag over AAD = bytes 0..45 || caller's aad, and the ciphertext
/// ```
pub fn seal(dek: &Dek, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptError> {
    let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
    out.resize(SEAL_HEADER_LEN, 0);
    out[0] = SEAL_VERSION;
    fill_random(&mut out[1..SEAL_HEADER_LEN])?;
    let (key, nonce, full_aad) = object_key(dek, &out[..SEAL_HEADER_LEN], aad);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(&full_aad), &mut out[SEAL_HEADER_LEN..])
        .expect("AES-GCM seals inputs under 64 GiB");
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// [`seal`] without copying: `buf[at..at + SEAL_HEADER_LEN]` is room for the seal header and
/// the plaintext follows it to the end of `buf`. Writes the header, encrypts in place and
/// appends the tag, so that `buf[at..]` is what [`seal`] returns. The bytes before `at` (a frame
/// header to fill in afterwards) are left alone.
pub fn seal_in_place(
    dek: &Dek,
    aad: &[u8],
    buf: &mut Vec<u8>,
    at: usize,
) -> Result<(), CryptError> {
    let header_end = at + SEAL_HEADER_LEN;
    assert!(buf.len() >= header_end, "no room for the seal header");
    buf[at] = SEAL_VERSION;
    fill_random(&mut buf[at + 1..header_end])?;
    let (key, nonce, full_aad) = object_key(dek, &buf[at..header_end], aad);
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(&full_aad), &mut buf[header_end..])
        .expect("AES-GCM seals inputs under 64 GiB");
    buf.extend_from_slice(tag.as_ref());
    Ok(())
}

/// The subkey, nonce and GCM AAD of an object from its 45-byte seal header.
fn object_key(dek: &Dek, header: &[u8], aad: &[u8]) -> (LessSafeKey, Nonce, Vec<u8>) {
    let salt = &header[1..1 + OBJECT_SALT_LEN];
    let key = aes_key(&hkdf_secret(&dek.0 .0[..], salt, OBJECT_KEY_INFO));
    let nonce = Nonce::try_assume_unique_for_key(&header[1 + OBJECT_SALT_LEN..SEAL_HEADER_LEN])
        .expect("12-byte nonce");
    let mut full_aad = Vec::with_capacity(SEAL_HEADER_LEN + aad.len());
    full_aad.extend_from_slice(header);
    full_aad.extend_from_slice(aad);
    (key, nonce, full_aad)
}

/// Opens what [`seal`] produced under the same `dek` and `aad`.
pub fn open(dek: &Dek, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptError> {
    open_owned(dek, aad, sealed.to_vec())
}

fn check_sealed_header(sealed: &[u8]) -> Result<(), CryptError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(CryptError::Truncated { len: sealed.len() });
    }
    match sealed[0] {
        SEAL_VERSION => Ok(()),
        // Version 0 does not exist: a changed byte, not a newer writer.
        0 => Err(CryptError::Authentication),
        found => Err(CryptError::NewerVersion { found }),
    }
}

/// [`open`] without copying: decrypts in place and returns the same buffer, truncated.
pub fn open_owned(dek: &Dek, aad: &[u8], mut sealed: Vec<u8>) -> Result<Vec<u8>, CryptError> {
    check_sealed_header(&sealed)?;
    let (key, nonce, full_aad) = object_key(dek, &sealed[..SEAL_HEADER_LEN], aad);
    let len = key
        .open_within(nonce, Aad::from(&full_aad), &mut sealed, SEAL_HEADER_LEN..)
        .map_err(|_| CryptError::Authentication)?
        .len();
    sealed.truncate(len);
    Ok(sealed)
}

/// [`open`] for a sealed payload inside a larger buffer (an object read from storage, after its
/// frame header): decrypts in place and returns the plaintext, a sub-slice of `sealed`, without
/// moving or copying it.
pub fn open_in_place<'a>(
    dek: &Dek,
    aad: &[u8],
    sealed: &'a mut [u8],
) -> Result<&'a mut [u8], CryptError> {
    check_sealed_header(sealed)?;
    let (key, nonce, full_aad) = object_key(dek, &sealed[..SEAL_HEADER_LEN], aad);
    key.open_in_place(nonce, Aad::from(&full_aad), &mut sealed[SEAL_HEADER_LEN..])
        .map_err(|_| CryptError::Authentication)
}

/// The memory-hard KDF that turns a passphrase into a KEK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KdfAlgorithm {
    Argon2id,
}

/// The AEAD that seals objects and wraps the DEK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Cipher {
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
}

/// Argon2id parameters, recorded in every keyring so that a later pitr with other defaults (or a
/// second implementation) derives the same KEK.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    pub algorithm: KdfAlgorithm,
    /// Argon2 version, 19 (0x13): the only one RFC 9106 defines.
    pub version: u32,
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes over the memory.
    pub t_cost: u32,
    /// Lanes. Computed one after the other (no threads): archive-push shares the host with
    /// PostgreSQL, and the cost is per process anyway.
    pub p_cost: u32,
    #[serde(with = "hex_bytes")]
    pub salt: Vec<u8>,
}

impl KdfParams {
    /// Default cost: 8 MiB, 1 pass, 1 lane, about 3 ms here. archive-push is one process per
    /// WAL segment (~46 ms unencrypted) and pays the KDF every time; the issue's budget is
    /// +10%, so a 0.1 s KDF (64 MiB, 3 passes) would make it 3x slower and add 64 MiB per
    /// process. Key files and key commands hold machine-generated secrets, for which the KDF
    /// cost buys nothing; it only slows guessing of a weak human passphrase. A keyring records
    /// its own parameters, so raising this later (or per repository) breaks nothing.
    /// docs/encryption.md ("Key derivation cost") has the measurements.
    pub const DEFAULT_M_COST_KIB: u32 = 8 * 1024;
    pub const DEFAULT_T_COST: u32 = 1;
    pub const DEFAULT_P_COST: u32 = 1;
    /// Refused when read from a keyring: a crafted object must not make pitr allocate 4 GiB or
    /// spin for minutes before it can say the key is wrong.
    pub const MAX_M_COST_KIB: u32 = 1024 * 1024;
    pub const MAX_T_COST: u32 = 64;
    pub const MAX_P_COST: u32 = 16;

    /// Default parameters with a fresh random salt.
    pub fn generate() -> Result<KdfParams, CryptError> {
        KdfParams::with_cost(
            Self::DEFAULT_M_COST_KIB,
            Self::DEFAULT_T_COST,
            Self::DEFAULT_P_COST,
        )
    }

    /// Given cost with a fresh random salt (tests and the benchmark use small costs).
    pub fn with_cost(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Result<KdfParams, CryptError> {
        let mut salt = vec![0u8; KDF_SALT_LEN];
        fill_random(&mut salt)?;
        let params = KdfParams {
            algorithm: KdfAlgorithm::Argon2id,
            version: 0x13,
            m_cost_kib,
            t_cost,
            p_cost,
            salt,
        };
        params.argon2_params()?;
        Ok(params)
    }

    fn argon2_params(&self) -> Result<argon2::Params, CryptError> {
        let bad = |reason: String| Err(CryptError::KdfParams { reason });
        if self.version != 0x13 {
            return bad(format!(
                "argon2 version {} (only 19 is known)",
                self.version
            ));
        }
        if self.m_cost_kib > Self::MAX_M_COST_KIB
            || self.t_cost > Self::MAX_T_COST
            || self.p_cost > Self::MAX_P_COST
        {
            return bad(format!(
                "m={} KiB t={} p={} exceeds m={} t={} p={}",
                self.m_cost_kib,
                self.t_cost,
                self.p_cost,
                Self::MAX_M_COST_KIB,
                Self::MAX_T_COST,
                Self::MAX_P_COST
            ));
        }
        if self.salt.len() < 16 {
            return bad(format!("salt of {} bytes (at least 16)", self.salt.len()));
        }
        argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(KEY_LEN))
            .or_else(|e| bad(e.to_string()))
    }

    /// Canonical bytes, bound into the keyring's AAD.
    fn canonical(&self) -> Vec<u8> {
        let mut b = vec![match self.algorithm {
            KdfAlgorithm::Argon2id => 1u8,
        }];
        for v in [self.version, self.m_cost_kib, self.t_cost, self.p_cost] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.salt.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.salt);
        b
    }
}

/// Derives the KEK from a passphrase. This is the deliberately slow step (Argon2id, tens to
/// hundreds of milliseconds): a caller derives once per process and keeps the unwrapped DEK.
pub fn derive_kek(passphrase: &[u8], params: &KdfParams) -> Result<Kek, CryptError> {
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params.argon2_params()?,
    );
    let mut kek = Kek(Secret(Zeroizing::new([0u8; KEY_LEN])));
    argon
        .hash_password_into(passphrase, &params.salt, &mut kek.0 .0[..])
        .map_err(|e| CryptError::KdfParams {
            reason: e.to_string(),
        })?;
    Ok(kek)
}

/// One wrapping of the repository's DEK: stored as JSON (inside a codec-none frame, whose CRC
/// catches accidental damage before any of this is read):
///
/// ```json
/// {"keyring_version": 1, "generation": 1, "cipher": "aes-256-gcm",
///  "kdf": {"algorithm": "argon2id", "version": 19, "m_cost_kib": 65536, "t_cost": 2,
///          "p_cost": 1, "salt": "<64 hex>"},
///  "key_check": "<64 hex>", "wrapped_dek": "<120 hex>"}
/// ```
///
/// From the Argon2id output M: wrap key = HKDF(M, info "pitr keyring wrap v1"), key check =
/// HKDF(M, info "pitr keyring check v1"). `wrapped_dek` = nonce(12) || AES-256-GCM(wrap key,
/// DEK) (32) || tag(16), with AAD = "pitr keyring v1\0" || generation u64le || cipher id ||
/// canonical kdf parameters. The key check tells "wrong passphrase" (check differs) from "damaged
/// wrapped key" (check matches, tag fails); it helps an attacker no more than the wrapped DEK
/// itself does: both let one test a passphrase guess at the cost of one Argon2id.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keyring {
    pub keyring_version: u32,
    pub generation: u64,
    pub cipher: Cipher,
    pub kdf: KdfParams,
    #[serde(with = "hex_bytes")]
    pub key_check: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub wrapped_dek: Vec<u8>,
}

impl Keyring {
    fn aad(generation: u64, cipher: Cipher, kdf: &KdfParams) -> Vec<u8> {
        let mut aad = KEYRING_AAD_LABEL.to_vec();
        aad.extend_from_slice(&generation.to_le_bytes());
        aad.push(match cipher {
            Cipher::Aes256Gcm => 1,
        });
        aad.extend_from_slice(&kdf.canonical());
        aad
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("keyring serializes")
    }

    /// Parses a keyring; `generation` is the one its repository key names, used in errors when
    /// the content is unreadable and checked against the content.
    pub fn from_json(bytes: &[u8], generation: u64) -> Result<Keyring, CryptError> {
        let corrupt = |what: String| CryptError::CorruptKeyring { generation, what };
        // The version first: a newer keyring may have fields this pitr would call unknown.
        #[derive(serde::Deserialize)]
        struct Version {
            keyring_version: u32,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if v.keyring_version != KEYRING_VERSION {
            return Err(corrupt(format!(
                "keyring version {} (this pitr knows {KEYRING_VERSION}; upgrade pitr if newer)",
                v.keyring_version
            )));
        }
        let k: Keyring = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if k.generation != generation {
            return Err(corrupt(format!("it says generation {}", k.generation)));
        }
        if k.key_check.len() != KEY_LEN || k.wrapped_dek.len() != WRAPPED_LEN {
            return Err(corrupt(
                "key_check or wrapped_dek has the wrong length".into(),
            ));
        }
        Ok(k)
    }
}

/// Wraps `dek` under the KEK as keyring `generation` (`kdf` must be the parameters `kek` was
/// derived with).
pub fn wrap_dek(
    dek: &Dek,
    kek: &Kek,
    kdf: KdfParams,
    generation: u64,
) -> Result<Keyring, CryptError> {
    let master = &kek.0 .0[..];
    let wrap_key = aes_key(&hkdf_secret(master, &[], WRAP_KEY_INFO));
    let check = hkdf_secret(master, &[], KEY_CHECK_INFO);
    let mut wrapped = vec![0u8; NONCE_LEN];
    fill_random(&mut wrapped)?;
    let nonce = Nonce::try_assume_unique_for_key(&wrapped).expect("12-byte nonce");
    wrapped.extend_from_slice(&dek.0 .0[..]);
    let aad = Keyring::aad(generation, Cipher::Aes256Gcm, &kdf);
    let tag = wrap_key
        .seal_in_place_separate_tag(nonce, Aad::from(&aad), &mut wrapped[NONCE_LEN..])
        .expect("AES-GCM seals 32 bytes");
    wrapped.extend_from_slice(tag.as_ref());
    Ok(Keyring {
        keyring_version: KEYRING_VERSION,
        generation,
        cipher: Cipher::Aes256Gcm,
        kdf,
        key_check: check.0.to_vec(),
        wrapped_dek: wrapped,
    })
}

/// Unwraps the DEK with a KEK derived from `keyring.kdf`: [`CryptError::WrongKey`] when the
/// key check differs, [`CryptError::CorruptKeyring`] when it matches but the wrapped key does
/// not authenticate.
pub fn unwrap_dek(keyring: &Keyring, kek: &Kek) -> Result<Dek, CryptError> {
    let generation = keyring.generation;
    let master = &kek.0 .0[..];
    let check = hkdf_secret(master, &[], KEY_CHECK_INFO);
    if aws_lc_rs::constant_time::verify_slices_are_equal(&check.0[..], &keyring.key_check).is_err()
    {
        return Err(CryptError::WrongKey { generation });
    }
    if keyring.wrapped_dek.len() != WRAPPED_LEN {
        return Err(CryptError::CorruptKeyring {
            generation,
            what: "wrapped_dek has the wrong length".into(),
        });
    }
    let wrap_key = aes_key(&hkdf_secret(master, &[], WRAP_KEY_INFO));
    let nonce =
        Nonce::try_assume_unique_for_key(&keyring.wrapped_dek[..NONCE_LEN]).expect("12-byte nonce");
    let aad = Keyring::aad(generation, keyring.cipher, &keyring.kdf);
    let mut buf = Zeroizing::new(keyring.wrapped_dek[NONCE_LEN..].to_vec());
    let plain = wrap_key
        .open_in_place(nonce, Aad::from(&aad), &mut buf[..])
        .map_err(|_| CryptError::CorruptKeyring {
            generation,
            what: "the wrapped data key fails authentication".into(),
        })?;
    let mut dek = Dek(Secret(Zeroizing::new([0u8; KEY_LEN])));
    dek.0 .0.copy_from_slice(plain);
    Ok(dek)
}

/// A new repository's first keyring (generation 1) and its fresh DEK.
pub fn create_keyring(passphrase: &[u8], kdf: KdfParams) -> Result<(Keyring, Dek), CryptError> {
    let dek = Dek::generate()?;
    let kek = derive_kek(passphrase, &kdf)?;
    let keyring = wrap_dek(&dek, &kek, kdf, 1)?;
    Ok((keyring, dek))
}

/// Opens a keyring with a passphrase (one Argon2id).
pub fn open_keyring(keyring: &Keyring, passphrase: &[u8]) -> Result<Dek, CryptError> {
    unwrap_dek(keyring, &derive_kek(passphrase, &keyring.kdf)?)
}

/// The DEK wrapped for the local key cache (`src/repo/key_cache.rs`, docs/encryption.md "Key
/// cache"): AES-256-GCM under HKDF-SHA256(ikm = passphrase, salt = 32 random bytes, info "pitr
/// key cache wrap v1"), AAD = the caller's binding (repository, generation). Only the
/// passphrase opens it, without Argon2id: that is the point (a cache hit costs microseconds)
/// and the cost (guesses at the passphrase against this blob are cheap; see the threat model).
pub fn wrap_dek_for_cache(dek: &Dek, passphrase: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptError> {
    let mut out = vec![0u8; KDF_SALT_LEN + NONCE_LEN];
    fill_random(&mut out)?;
    let key = aes_key(&hkdf_secret(
        passphrase,
        &out[..KDF_SALT_LEN],
        CACHE_WRAP_INFO,
    ));
    let nonce = Nonce::try_assume_unique_for_key(&out[KDF_SALT_LEN..]).expect("12-byte nonce");
    out.extend_from_slice(&dek.0 .0[..]);
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[KDF_SALT_LEN + NONCE_LEN..])
        .expect("AES-GCM seals 32 bytes");
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens what [`wrap_dek_for_cache`] produced; `None` for another passphrase, another binding
/// or damaged bytes (the caller then derives the key the slow way, which tells them apart).
pub fn unwrap_dek_from_cache(wrapped: &[u8], passphrase: &[u8], aad: &[u8]) -> Option<Dek> {
    if wrapped.len() != CACHE_WRAPPED_LEN {
        return None;
    }
    let (salt, rest) = wrapped.split_at(KDF_SALT_LEN);
    let key = aes_key(&hkdf_secret(passphrase, salt, CACHE_WRAP_INFO));
    let nonce = Nonce::try_assume_unique_for_key(&rest[..NONCE_LEN]).expect("12-byte nonce");
    let mut buf = Zeroizing::new(rest[NONCE_LEN..].to_vec());
    let plain = key
        .open_in_place(nonce, Aad::from(aad), &mut buf[..])
        .ok()?;
    let mut dek = Dek(Secret(Zeroizing::new([0u8; KEY_LEN])));
    dek.0 .0.copy_from_slice(plain);
    Some(dek)
}

/// Rotation: the next generation, wrapping the same DEK under `new_passphrase` with a fresh
/// salt. The caller creates it conditionally (so two rotations cannot both win) before it
/// removes `current`, so that at every moment one of the two passphrases opens the repository.
pub fn rewrap_keyring(
    current: &Keyring,
    dek: &Dek,
    new_passphrase: &[u8],
    new_kdf: KdfParams,
) -> Result<Keyring, CryptError> {
    let kek = derive_kek(new_passphrase, &new_kdf)?;
    wrap_dek(dek, &kek, new_kdf, current.generation + 1)
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Argon2id at its cheapest: tests check the logic, not the cost.
    fn cheap_kdf() -> KdfParams {
        KdfParams::with_cost(64, 1, 1).unwrap()
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn seal_open_round_trip() {
        let dek = Dek::generate().unwrap();
        let aad = object_aad("wal/0000000100000000/000000010000000000000003", &[1; 40]);
        for len in [0, 1, 15, 16, 17, 4096, 1 << 20] {
            let plain = sample(len);
            let sealed = seal(&dek, &aad, &plain).unwrap();
            assert_eq!(sealed.len(), len + SEAL_OVERHEAD);
            assert_eq!(sealed[0], SEAL_VERSION);
            assert_eq!(open(&dek, &aad, &sealed).unwrap(), plain, "len {len}");
            let mut in_place = sealed.clone();
            assert_eq!(
                open_in_place(&dek, &aad, &mut in_place).unwrap(),
                &plain[..]
            );
            assert_eq!(open_owned(&dek, &aad, sealed).unwrap(), plain);
        }
    }

    #[test]
    fn seal_in_place_matches_seal() {
        let dek = Dek::generate().unwrap();
        let plain = sample(5000);
        let mut buf = vec![7u8; 40 + SEAL_HEADER_LEN];
        buf.extend_from_slice(&plain);
        seal_in_place(&dek, b"aad", &mut buf, 40).unwrap();
        assert_eq!(&buf[..40], &[7u8; 40][..]);
        assert_eq!(buf.len(), 40 + plain.len() + SEAL_OVERHEAD);
        assert_eq!(open(&dek, b"aad", &buf[40..]).unwrap(), plain);
    }

    #[test]
    fn ciphertext_does_not_contain_the_plaintext() {
        let dek = Dek::generate().unwrap();
        let marker = b"MARKER-4242-MARKER";
        let plain: Vec<u8> = marker.iter().copied().cycle().take(10_000).collect();
        let sealed = seal(&dek, b"k", &plain).unwrap();
        assert!(!sealed.windows(marker.len()).any(|w| w == marker));
    }

    #[test]
    fn wrong_key_and_wrong_aad_are_refused() {
        let (dek, other) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        let aad = object_aad("backups/x/base.tar/00000000", b"header");
        let sealed = seal(&dek, &aad, b"some content").unwrap();
        assert_eq!(open(&other, &aad, &sealed), Err(CryptError::Authentication));
        let moved = object_aad("backups/x/base.tar/00000001", b"header");
        assert_eq!(open(&dek, &moved, &sealed), Err(CryptError::Authentication));
        let reheadered = object_aad("backups/x/base.tar/00000000", b"headeR");
        assert_eq!(
            open(&dek, &reheadered, &sealed),
            Err(CryptError::Authentication)
        );
        // Length prefixes: shifting bytes between key and header changes the AAD.
        assert_ne!(object_aad("ab", b"c"), object_aad("a", b"bc"));
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let dek = Dek::generate().unwrap();
        let plain = sample(300);
        let sealed = seal(&dek, b"key", &plain).unwrap();
        for i in 0..sealed.len() {
            for bit in [0x01, 0x80] {
                let mut bad = sealed.clone();
                bad[i] ^= bit;
                assert!(open(&dek, b"key", &bad).is_err(), "flip {bit:#x} at {i}");
                assert!(open_in_place(&dek, b"key", &mut bad).is_err());
            }
        }
    }

    #[test]
    fn truncation_extension_and_versions_are_refused() {
        let dek = Dek::generate().unwrap();
        let sealed = seal(&dek, b"", b"content").unwrap();
        for cut in 0..sealed.len() {
            assert!(open(&dek, b"", &sealed[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert_eq!(open(&dek, b"", &longer), Err(CryptError::Authentication));
        assert_eq!(
            open(&dek, b"", &sealed[..10]),
            Err(CryptError::Truncated { len: 10 })
        );
        let mut newer = sealed.clone();
        newer[0] = 2;
        assert_eq!(
            open(&dek, b"", &newer),
            Err(CryptError::NewerVersion { found: 2 })
        );
    }

    #[test]
    fn salts_and_nonces_never_repeat() {
        let dek = Dek::generate().unwrap();
        let (mut salts, mut nonces) = (HashSet::new(), HashSet::new());
        for _ in 0..20_000 {
            let sealed = seal(&dek, b"", b"same plaintext").unwrap();
            assert!(salts.insert(sealed[1..1 + OBJECT_SALT_LEN].to_vec()));
            assert!(nonces.insert(sealed[1 + OBJECT_SALT_LEN..SEAL_HEADER_LEN].to_vec()));
        }
    }

    #[test]
    fn keyring_wraps_and_unwraps() {
        let (keyring, dek) = create_keyring(b"correct horse", cheap_kdf()).unwrap();
        assert_eq!(keyring.generation, 1);
        let json = keyring.to_json();
        let parsed = Keyring::from_json(&json, 1).unwrap();
        assert_eq!(parsed, keyring);
        let reopened = open_keyring(&parsed, b"correct horse").unwrap();
        let sealed = seal(&dek, b"k", b"data").unwrap();
        assert_eq!(open(&reopened, b"k", &sealed).unwrap(), b"data");
        assert!(!String::from_utf8(json)
            .unwrap()
            .contains(&hex::encode(&dek.0 .0[..])));
    }

    #[test]
    fn wrong_passphrase_is_told_apart_from_corruption() {
        let (keyring, _) = create_keyring(b"right", cheap_kdf()).unwrap();
        assert_eq!(
            open_keyring(&keyring, b"wrong").unwrap_err(),
            CryptError::WrongKey { generation: 1 }
        );
        for i in 0..WRAPPED_LEN {
            let mut bad = keyring.clone();
            bad.wrapped_dek[i] ^= 0x10;
            assert!(
                matches!(
                    open_keyring(&bad, b"right"),
                    Err(CryptError::CorruptKeyring { generation: 1, .. })
                ),
                "flip in wrapped_dek at {i}"
            );
        }
        // A keyring renamed to another generation does not open either.
        let mut moved = keyring.clone();
        moved.generation = 2;
        assert!(matches!(
            open_keyring(&moved, b"right"),
            Err(CryptError::CorruptKeyring { .. })
        ));
        assert!(matches!(
            Keyring::from_json(&keyring.to_json(), 2),
            Err(CryptError::CorruptKeyring { generation: 2, .. })
        ));
        assert!(matches!(
            Keyring::from_json(b"{not json", 7),
            Err(CryptError::CorruptKeyring { generation: 7, .. })
        ));
        let newer = br#"{"keyring_version": 2, "something": "new"}"#;
        let e = Keyring::from_json(newer, 1).unwrap_err().to_string();
        assert!(e.contains("keyring version 2"), "{e}");
    }

    #[test]
    fn rotation_rewraps_the_same_data_key() {
        let (old, dek) = create_keyring(b"old pass", cheap_kdf()).unwrap();
        let sealed = seal(&dek, b"k", b"written before rotation").unwrap();
        let new = rewrap_keyring(&old, &dek, b"new pass", cheap_kdf()).unwrap();
        assert_eq!(new.generation, 2);
        assert_ne!(new.kdf.salt, old.kdf.salt);
        assert_ne!(new.wrapped_dek, old.wrapped_dek);
        let via_new = open_keyring(&new, b"new pass").unwrap();
        assert_eq!(
            open(&via_new, b"k", &sealed).unwrap(),
            b"written before rotation"
        );
        assert_eq!(
            open_keyring(&new, b"old pass").unwrap_err(),
            CryptError::WrongKey { generation: 2 }
        );
        // Until generation 1 is removed, the old passphrase still opens it.
        assert!(open_keyring(&old, b"old pass").is_ok());
    }

    #[test]
    fn crafted_kdf_parameters_are_refused_before_deriving() {
        let mut kdf = cheap_kdf();
        kdf.m_cost_kib = u32::MAX;
        assert!(matches!(
            derive_kek(b"x", &kdf),
            Err(CryptError::KdfParams { .. })
        ));
        let mut kdf = cheap_kdf();
        kdf.salt.truncate(8);
        assert!(matches!(
            derive_kek(b"x", &kdf),
            Err(CryptError::KdfParams { .. })
        ));
    }

    #[test]
    fn kek_is_deterministic_and_secrets_do_not_print() {
        let kdf = cheap_kdf();
        let (a, b) = (
            derive_kek(b"p", &kdf).unwrap(),
            derive_kek(b"p", &kdf).unwrap(),
        );
        assert_eq!(a.0 .0[..], b.0 .0[..]);
        assert_ne!(derive_kek(b"q", &kdf).unwrap().0 .0[..], a.0 .0[..]);
        assert_eq!(format!("{a:?}"), "Kek(<redacted>)");
        assert_eq!(format!("{:?}", Dek::generate().unwrap()), "Dek(<redacted>)");
    }

    #[test]
    fn cache_wrapping_opens_only_with_the_same_passphrase_and_binding() {
        let dek = Dek::generate().unwrap();
        let wrapped = wrap_dek_for_cache(&dek, b"pass", b"repo 1 gen 2").unwrap();
        assert_eq!(wrapped.len(), CACHE_WRAPPED_LEN);
        let back = unwrap_dek_from_cache(&wrapped, b"pass", b"repo 1 gen 2").unwrap();
        assert_eq!(back.0 .0[..], dek.0 .0[..]);
        assert!(!wrapped.windows(KEY_LEN).any(|w| w == &dek.0 .0[..]));
        assert!(unwrap_dek_from_cache(&wrapped, b"other", b"repo 1 gen 2").is_none());
        assert!(unwrap_dek_from_cache(&wrapped, b"pass", b"repo 1 gen 3").is_none());
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 1;
            assert!(
                unwrap_dek_from_cache(&bad, b"pass", b"repo 1 gen 2").is_none(),
                "{i}"
            );
        }
        assert!(unwrap_dek_from_cache(&wrapped[1..], b"pass", b"repo 1 gen 2").is_none());
    }
}

//! The final check of the files a chain restore reconstructed: against the final manifest
//! when it lists them (pitr's block mode stores the full backup's manifest), else against the
//! backup's block map (server mode: PostgreSQL's incremental manifest lists only the
//! `INCREMENTAL.` files, which were checked as they were read). Each file is read back once.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::RestoreError;
use super::writer::{io_at, mismatch_error};
use crate::format::archive_check::{Manifest, Mismatch, Outcome};
use crate::format::incremental::{target_name, BLCKSZ};
use crate::format::manifest::ManifestFile;
use crate::repo::{block_hash, BlockMap, FileBlocks};

/// What a reconstructed file must be.
enum Expected {
    Manifest(ManifestFile),
    Blocks(Arc<FileBlocks>),
}

/// Checks every file in `rebuilt` (path, manifest path), and drops from `outcome` what
/// reconstruction explains: the reconstructed files are not missing, the `INCREMENTAL.`
/// entries are not extra; `outcome.bytes` counts the final sizes. Returns how many files could
/// be checked neither way (logged).
pub(super) async fn check_rebuilt(
    rebuilt: &[(PathBuf, String)],
    manifest: Option<&Manifest>,
    mut map: Option<&mut BlockMap>,
    outcome: &mut Outcome,
) -> Result<usize, RestoreError> {
    let mut unchecked = vec![];
    for (path, key) in rebuilt {
        let expected = match manifest.and_then(|m| m.get(key)) {
            Some(m) => Some(Expected::Manifest(m.clone())),
            None => match map.as_deref_mut() {
                Some(map) => map.get(key).await?.map(Expected::Blocks),
                None => None,
            },
        };
        let (file, name) = (path.clone(), key.clone());
        let size = tokio::task::spawn_blocking(move || check_file(&file, &name, expected.as_ref()))
            .await
            .expect("check task panicked")?;
        match size {
            Checked::Yes(size) => outcome.bytes += size,
            Checked::No(size) => {
                outcome.bytes += size;
                unchecked.push(key.as_str());
            }
        }
    }
    if let Some(example) = unchecked.first() {
        tracing::warn!(count = unchecked.len(), %example, "reconstructed files that neither the manifest nor a block map describes were not checked");
    }
    let keys: HashSet<&str> = rebuilt.iter().map(|(_, k)| k.as_str()).collect();
    outcome.missing.retain(|p| !keys.contains(p.as_str()));
    outcome.extra.retain(|p| target_name(p).is_none());
    Ok(unchecked.len())
}

#[derive(Debug)]
enum Checked {
    Yes(u64),
    No(u64),
}

/// Reads `path` once: its size, CRC-32C and block hashes against `expected`.
fn check_file(
    path: &Path,
    key: &str,
    expected: Option<&Expected>,
) -> Result<Checked, RestoreError> {
    let mut f = File::open(path).map_err(io_at(path))?;
    let mut block = vec![0u8; BLCKSZ];
    let (mut size, mut crc, mut n) = (0u64, 0u32, 0usize);
    loop {
        let len = read_block(&mut f, &mut block).map_err(io_at(path))?;
        if len == 0 {
            break;
        }
        crc = crate::codec::crc::crc32c_append(crc, &block[..len]);
        if let Some(Expected::Blocks(b)) = expected {
            if b.hashes.get(n) != Some(&block_hash(&block[..len])) {
                return Err(RestoreError::BlockMismatch {
                    path: key.to_string(),
                    block: n as u64,
                });
            }
        }
        size += len as u64;
        n += 1;
    }
    let want = match expected {
        None => return Ok(Checked::No(size)),
        Some(Expected::Manifest(m)) => m.size,
        Some(Expected::Blocks(b)) => b.size,
    };
    if size != want {
        return Err(RestoreError::SizeMismatch {
            path: key.to_string(),
            expected: want,
            actual: size,
        });
    }
    if let Some(Expected::Manifest(m)) = expected {
        if let Some(expected) = m.crc32c.filter(|&e| e != crc) {
            return Err(mismatch_error(Mismatch::Checksum {
                path: key.to_string(),
                expected,
                actual: crc,
            }));
        }
    }
    Ok(Checked::Yes(size))
}

/// Fills `buf` as far as the file goes; returns the bytes read (short only at the end).
fn read_block(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_checked_against_its_manifest_entry_or_its_block_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut data = vec![1u8; BLCKSZ];
        data.extend(vec![2u8; 100]);
        std::fs::write(&path, &data).unwrap();
        let blocks = |second: &[u8]| {
            Expected::Blocks(Arc::new(FileBlocks {
                path: "f".into(),
                size: data.len() as u64,
                hashes: vec![block_hash(&data[..BLCKSZ]), block_hash(second)],
            }))
        };
        assert!(matches!(
            check_file(&path, "f", Some(&blocks(&data[BLCKSZ..]))),
            Ok(Checked::Yes(8292))
        ));
        let e = check_file(&path, "f", Some(&blocks(b"other"))).unwrap_err();
        assert!(
            matches!(e, RestoreError::BlockMismatch { block: 1, .. }),
            "{e}"
        );
        let manifest = |crc| {
            Expected::Manifest(ManifestFile {
                size: data.len() as u64,
                crc32c: Some(crc),
            })
        };
        assert!(check_file(&path, "f", Some(&manifest(crc32c::crc32c(&data)))).is_ok());
        let e = check_file(&path, "f", Some(&manifest(7))).unwrap_err();
        assert!(matches!(e, RestoreError::ChecksumMismatch { .. }), "{e}");
        assert!(matches!(
            check_file(&path, "f", None),
            Ok(Checked::No(8292))
        ));
    }
}

//! PostgreSQL's backup manifest (`backup_manifest`, PostgreSQL 13+): the files of a backup with
//! their sizes and checksums. Only what pitr checks is parsed.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct RawManifest {
    #[serde(rename = "Files")]
    files: Vec<RawFile>,
}

#[derive(Debug, Deserialize)]
struct RawFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    /// Paths that are not valid UTF-8 are hex-encoded under this key.
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestFile {
    pub size: u64,
    /// CRC-32C as PostgreSQL prints it, when the manifest used CRC32C.
    pub crc32c: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
#[error("backup manifest is not valid: {0}")]
pub struct ManifestError(String);

/// Parses a manifest into path → expected size and checksum.
pub fn parse(bytes: &[u8]) -> Result<HashMap<String, ManifestFile>, ManifestError> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| ManifestError(e.to_string()))?;
    let mut out = HashMap::with_capacity(raw.files.len());
    for f in raw.files {
        let path = match (f.path, f.encoded_path) {
            (Some(p), _) => p,
            (None, Some(hex_path)) => {
                let bytes = hex::decode(&hex_path)
                    .map_err(|e| ManifestError(format!("Encoded-Path: {e}")))?;
                String::from_utf8_lossy(&bytes).into_owned()
            }
            (None, None) => return Err(ManifestError("a file entry has no path".into())),
        };
        let crc32c = match (f.algorithm.as_deref(), f.checksum) {
            (Some("CRC32C"), Some(hex_sum)) => Some(parse_crc32c(&hex_sum)?),
            _ => None,
        };
        out.insert(
            path,
            ManifestFile {
                size: f.size,
                crc32c,
            },
        );
    }
    Ok(out)
}

/// PostgreSQL prints the CRC's in-memory bytes in hex (`pg_checksum_final` copies the
/// `pg_crc32c`), i.e. little-endian byte order on every platform we run on.
fn parse_crc32c(hex_sum: &str) -> Result<u32, ManifestError> {
    let bytes =
        hex::decode(hex_sum).map_err(|e| ManifestError(format!("checksum {hex_sum:?}: {e}")))?;
    let arr: [u8; 4] = bytes
        .try_into()
        .map_err(|_| ManifestError(format!("checksum {hex_sum:?} is not 4 bytes")))?;
    Ok(u32::from_le_bytes(arr))
}

/// Renders a CRC-32C the way the manifest does.
pub fn format_crc32c(crc: u32) -> String {
    hex::encode(crc.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_files_and_crc() {
        let crc = crc32c::crc32c(b"15\n");
        let m = format!(
            r#"{{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [
            {{"Path": "PG_VERSION", "Size": 3, "Last-Modified": "x", "Checksum-Algorithm": "CRC32C", "Checksum": "{}"}},
            {{"Encoded-Path": "6162", "Size": 0, "Last-Modified": "x"}}],
            "WAL-Ranges": [], "Manifest-Checksum": "00"}}"#,
            format_crc32c(crc)
        );
        let files = parse(m.as_bytes()).unwrap();
        assert_eq!(
            files["PG_VERSION"],
            ManifestFile {
                size: 3,
                crc32c: Some(crc)
            }
        );
        assert_eq!(files["ab"].crc32c, None);
    }
}

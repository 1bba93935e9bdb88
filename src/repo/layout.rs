//! Object keys. Every key of the hot paths is computed from a name, so archive-push,
//! archive-get and restore never need a LIST request.

use crate::wal::WalFileName;

/// The repository descriptor, written once when the repository is created.
pub const DESCRIPTOR_KEY: &str = "repository.json";

/// Folder of all WAL objects.
pub const WAL_PREFIX: &str = "wal/";

/// Key of an archived WAL file:
/// - segments, `.partial` and `.backup` files: `wal/<first 16 hex digits of the name>/<name>`,
///   i.e. one folder per timeline and 4 GiB of WAL, like pg_wal's own naming;
/// - timeline history files: `wal/<name>` (e.g. `wal/00000002.history`).
pub fn wal_key(name: &WalFileName) -> String {
    let text = name.to_string();
    match name {
        WalFileName::History { .. } => format!("{WAL_PREFIX}{text}"),
        _ => format!("{WAL_PREFIX}{}/{text}", &text[..16]),
    }
}

/// Suffix of a segment's summary object (see [`wal_summary_key`]).
pub const SUMMARY_SUFFIX: &str = ".summary";

/// Key of a WAL segment's summary: the segment's key plus `.summary`, so that it sorts beside
/// the segment, is found without a LIST, and goes wherever the segment goes.
pub fn wal_summary_key(name: &WalFileName) -> String {
    format!("{}{SUMMARY_SUFFIX}", wal_key(name))
}

/// Folder of the sub-segment chunks `pitr stream` ships for the open segment `segment`:
/// `wal/<first 16 hex digits>/chunks/<segment>/`. The chunk objects inside are named
/// `<start>-<end>` (byte offsets inside the segment, 8 hex digits each). Their file names are not
/// WAL file names, so inventories of the WAL folder ignore them.
pub fn wal_chunk_prefix(segment: &WalFileName) -> String {
    let text = segment.to_string();
    format!("{WAL_PREFIX}{}/chunks/{text}/", &text[..16])
}

/// Key of the chunk holding bytes `[start, end)` of `segment`; see [`wal_chunk_prefix`].
pub fn wal_chunk_key(segment: &WalFileName, start: u32, end: u32) -> String {
    format!("{}{start:08X}-{end:08X}", wal_chunk_prefix(segment))
}

/// The `(start, end)` offsets of a chunk key made by [`wal_chunk_key`], `None` for other keys.
pub fn parse_wal_chunk_key(key: &str) -> Option<(u32, u32)> {
    let file = key.rsplit('/').next()?;
    let (a, b) = file.split_once('-')?;
    let hex = |s: &str| {
        (s.len() == 8 && s.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    let (start, end) = (hex(a)?, hex(b)?);
    (start < end).then_some((start, end))
}

/// The WAL file a key under [`WAL_PREFIX`] belongs to: the file itself (segment, `.partial`,
/// `.backup`), its summary, or one of its stream chunks. `None` for timeline history files,
/// which every timeline after them needs forever, and for keys this layout does not make.
pub fn wal_object_owner(key: &str) -> Option<WalFileName> {
    let rest = key.strip_prefix(WAL_PREFIX)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let name = match parts.as_slice() {
        [_, "chunks", segment, _chunk] => *segment,
        [_, file] => file.strip_suffix(SUMMARY_SUFFIX).unwrap_or(file),
        _ => return None,
    };
    WalFileName::parse(name)
        .ok()
        .filter(|n| !matches!(n, WalFileName::History { .. }))
}

/// Folder of backup data: `backups/<id>/<archive>/<part>` and `backups/<id>/backup_manifest`.
pub const BACKUP_DATA_PREFIX: &str = "backups/";

/// Folder of completed backups' metadata, one small object per backup. A backup exists for
/// `list` and `restore` only once its object here is written, which is the last step of a
/// backup; an interrupted backup leaves data under `backups/` that nothing refers to.
pub const BACKUP_CATALOG_PREFIX: &str = "catalog/backups/";

/// The folder of everything backup `backup_id` stores: `backups/<id>/`.
pub fn backup_prefix(backup_id: &str) -> String {
    format!("{BACKUP_DATA_PREFIX}{backup_id}/")
}

pub fn backup_part_key(backup_id: &str, archive: &str, part: u32) -> String {
    format!("{}{part:08}", backup_parts_prefix(backup_id, archive))
}

/// The folder of archive `archive`'s parts.
pub fn backup_parts_prefix(backup_id: &str, archive: &str) -> String {
    format!("{}{archive}/", backup_prefix(backup_id))
}

pub fn backup_manifest_key(backup_id: &str) -> String {
    format!("{}backup_manifest", backup_prefix(backup_id))
}

/// Refreshed by a running backup: proof that it is alive.
pub fn backup_lease_key(backup_id: &str) -> String {
    format!("{}lease", backup_prefix(backup_id))
}

/// Created once, by whichever comes first: the backup completing, or a cleanup declaring it
/// abandoned. Conditional creation makes the two mutually exclusive.
pub fn backup_state_key(backup_id: &str) -> String {
    format!("{}state", backup_prefix(backup_id))
}

/// Written by `pitr expire` before it removes anything of a backup, and removed last: a run
/// that was interrupted is finished by the next one.
pub fn backup_expired_key(backup_id: &str) -> String {
    format!("{}expired", backup_prefix(backup_id))
}

pub fn backup_info_key(backup_id: &str) -> String {
    format!("{BACKUP_CATALOG_PREFIX}{backup_id}.json")
}

/// The backup id of a catalog entry's key; `None` for any other key.
pub fn backup_id_of_info_key(key: &str) -> Option<String> {
    let id = key
        .strip_prefix(BACKUP_CATALOG_PREFIX)?
        .strip_suffix(".json")?;
    (!id.contains('/')).then(|| id.to_string())
}

/// Folder of an encrypted repository's keyrings: `keys/<generation, 10 digits>.json`, one per
/// key generation (normally one; two only while a rotation is under way or was interrupted).
pub const KEYS_PREFIX: &str = "keys/";

pub fn keyring_key(generation: u64) -> String {
    format!("{KEYS_PREFIX}{generation:010}.json")
}

/// The generation of a key made by [`keyring_key`], `None` for other keys.
pub fn parse_keyring_key(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(KEYS_PREFIX)?.strip_suffix(".json")?;
    (digits.len() == 10 && digits.bytes().all(|c| c.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_objects_name_their_owner() {
        let seg = WalFileName::parse("000000020000000A000000FF").unwrap();
        for key in [
            wal_key(&seg),
            wal_summary_key(&seg),
            wal_chunk_key(&seg, 0, 0x2000),
        ] {
            assert_eq!(wal_object_owner(&key), Some(seg.clone()), "{key}");
        }
        for name in [
            "000000020000000A000000FF.partial",
            "000000020000000A000000FF.00000028.backup",
        ] {
            let n = WalFileName::parse(name).unwrap();
            assert_eq!(wal_object_owner(&wal_key(&n)), Some(n));
        }
        let hist = WalFileName::parse("00000002.history").unwrap();
        assert_eq!(wal_object_owner(&wal_key(&hist)), None);
        assert_eq!(wal_object_owner("wal/0000000200000000/notes.txt"), None);
        assert_eq!(wal_object_owner("backups/x/000000020000000A000000FF"), None);
    }

    #[test]
    fn keys_are_deterministic() {
        let k = |n: &str| wal_key(&WalFileName::parse(n).unwrap());
        assert_eq!(
            k("000000010000000A000000FF"),
            "wal/000000010000000A/000000010000000A000000FF"
        );
        assert_eq!(
            k("000000010000000000000003.partial"),
            "wal/0000000100000000/000000010000000000000003.partial"
        );
        assert_eq!(
            k("000000010000000000000003.00000028.backup"),
            "wal/0000000100000000/000000010000000000000003.00000028.backup"
        );
        assert_eq!(k("00000002.history"), "wal/00000002.history");
        assert_eq!(
            wal_summary_key(&WalFileName::parse("000000010000000A000000FF").unwrap()),
            "wal/000000010000000A/000000010000000A000000FF.summary"
        );
    }

    #[test]
    fn keyring_keys_round_trip() {
        assert_eq!(keyring_key(1), "keys/0000000001.json");
        assert_eq!(parse_keyring_key(&keyring_key(42)), Some(42));
        for bad in ["keys/1.json", "keys/000000000x.json", "wal/0000000001.json"] {
            assert_eq!(parse_keyring_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn chunk_keys_round_trip() {
        let seg = WalFileName::parse("000000010000000A000000FF").unwrap();
        let key = wal_chunk_key(&seg, 0x2000, 0x3A10);
        assert_eq!(
            key,
            "wal/000000010000000A/chunks/000000010000000A000000FF/00002000-00003A10"
        );
        assert_eq!(parse_wal_chunk_key(&key), Some((0x2000, 0x3A10)));
        // Chunk names must never parse as WAL file names, or inventories would count them.
        assert!(WalFileName::parse("00002000-00003A10").is_err());
        for bad in [
            "x/00002000-00002000",
            "x/0002000-00003A10",
            "x/00002000_00003A10",
        ] {
            assert_eq!(parse_wal_chunk_key(bad), None, "{bad}");
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}

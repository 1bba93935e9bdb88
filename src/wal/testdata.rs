//! Test-only access to the real WAL fixtures in src/wal/testdata/pg15 (see generate.sh there):
//! the zstd-compressed segments and the pg_waldump output recorded for them.

use super::Lsn;

pub(crate) const SEG_SIZE: u64 = 1 << 20;
const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/wal/testdata/pg15");

/// The fixture segments in order: (segno, bytes).
pub(crate) fn segments() -> Vec<(u64, Vec<u8>)> {
    let list = std::fs::read_to_string(format!("{DIR}/segments.txt")).expect("segments.txt");
    list.lines()
        .map(|name| {
            let compressed = std::fs::read(format!("{DIR}/{name}.zst")).expect("segment file");
            let bytes = zstd::decode_all(&compressed[..]).expect("zstd");
            assert_eq!(bytes.len() as u64, SEG_SIZE);
            let segno = u64::from_str_radix(&name[16..24], 16).expect("segment name")
                + (u64::from_str_radix(&name[8..16], 16).expect("segment name") << 12);
            (segno, bytes)
        })
        .collect()
}

/// One line of pg_waldump output.
#[derive(Clone, Debug)]
pub(crate) struct DumpLine {
    pub rmgr: String,
    pub tot_len: u32,
    pub xid: u32,
    pub lsn: Lsn,
    pub prev: Lsn,
    pub desc: String,
}

impl DumpLine {
    pub fn key(&self) -> (Lsn, Lsn, String, u32, u32) {
        (
            self.lsn,
            self.prev,
            self.rmgr.clone(),
            self.tot_len,
            self.xid,
        )
    }
}

/// Parses `rmgr: Heap len (rec/tot): 54/ 150, tx: 735, lsn: 0/01000028, prev 0/00FFFFB0, desc: …`.
pub(crate) fn waldump() -> Vec<DumpLine> {
    let text = std::fs::read_to_string(format!("{DIR}/waldump.txt")).expect("waldump.txt");
    text.lines()
        .filter(|l| l.starts_with("rmgr:"))
        .map(|l| {
            let field = |name: &str| {
                let at = l.find(name).unwrap_or_else(|| panic!("{name} in {l}")) + name.len();
                l[at..].trim_start()
            };
            let word = |s: &str| s.split([',', ' ']).next().unwrap_or("").to_string();
            let rmgr = word(field("rmgr:"));
            let lens = field("len (rec/tot):");
            let tot_len = lens
                .split('/')
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            DumpLine {
                rmgr,
                tot_len,
                xid: word(field("tx:")).parse().unwrap(),
                lsn: word(field("lsn:")).parse().unwrap(),
                prev: word(field("prev")).parse().unwrap(),
                desc: field("desc:").to_string(),
            }
        })
        .collect()
}

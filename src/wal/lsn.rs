use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A position in the WAL stream (`XLogRecPtr`), printed as PostgreSQL does: `16/B374D848`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const INVALID: Lsn = Lsn(0);

    /// Segment number holding this position (`XLByteToSeg`).
    pub fn segno(self, seg_size: u64) -> u64 {
        self.0 / seg_size
    }

    /// Offset of this position inside its segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, seg_size: u64) -> u64 {
        self.0 % seg_size
    }

    /// First byte of the segment `segno` (`XLogSegNoOffsetToRecPtr` with offset 0).
    pub fn from_segno(segno: u64, seg_size: u64) -> Lsn {
        Lsn(segno * seg_size)
    }

    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {input:?}: expected two hexadecimal numbers separated by '/', like 0/3000060")]
pub struct LsnParseError {
    pub input: String,
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError {
            input: s.to_string(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let valid =
            |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid(hi) || !valid(lo) {
            return Err(err());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn(hi << 32 | lo))
    }
}

// LSNs are stored as text in JSON so that a human reading the catalog sees PostgreSQL's notation.
impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for (text, value) in [
            ("0/0", 0u64),
            ("0/3000060", 0x3000060),
            ("16/B374D848", 0x16_B374_D848),
        ] {
            assert_eq!(text.parse::<Lsn>().unwrap(), Lsn(value));
            assert_eq!(Lsn(value).to_string(), text);
        }
        assert_eq!("ffffffff/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "0",
            "/0",
            "0/",
            "0x1/2",
            "1/2/3",
            "123456789/0",
            "g/0",
            " 0/1",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn segment_arithmetic() {
        let seg = 16 << 20;
        let lsn: Lsn = "1/3000060".parse().unwrap();
        assert_eq!(lsn.segno(seg), 0x103);
        assert_eq!(lsn.segment_offset(seg), 0x60);
        assert_eq!(Lsn::from_segno(0x103, seg), "1/3000000".parse().unwrap());
    }
}

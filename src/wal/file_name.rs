use std::fmt;

use super::TimelineId;

/// WAL segment number (`XLogSegNo`): the LSN divided by the segment size.
pub type SegNo = u64;

/// The names PostgreSQL hands to `archive_command` / `restore_command` (`%f`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WalFileName {
    /// `000000010000000000000003`: a full segment.
    Segment { tli: TimelineId, log: u32, seg: u32 },
    /// `000000010000000000000003.partial`: the last, incomplete segment of a timeline that was
    /// left when a standby was promoted.
    Partial { tli: TimelineId, log: u32, seg: u32 },
    /// `00000002.history`: the timeline history file of timeline `tli`.
    History { tli: TimelineId },
    /// `000000010000000000000003.00000028.backup`: a backup history file.
    Backup {
        tli: TimelineId,
        log: u32,
        seg: u32,
        offset: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{name:?} is not a WAL file name: expected a segment (24 hex digits, like \
     000000010000000000000003), a .partial or .backup file of one, or a timeline history file \
     (00000002.history)"
)]
pub struct WalFileNameError {
    pub name: String,
}

fn hex32(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

impl WalFileName {
    pub fn parse(name: &str) -> Result<Self, WalFileNameError> {
        Self::try_parse(name).ok_or_else(|| WalFileNameError {
            name: name.to_string(),
        })
    }

    fn try_parse(name: &str) -> Option<Self> {
        if let Some(tli) = name.strip_suffix(".history") {
            return Some(WalFileName::History { tli: hex32(tli)? });
        }
        if !name.is_ascii() || name.len() < 24 {
            return None;
        }
        let (tli, log, seg) = (
            hex32(&name[0..8])?,
            hex32(&name[8..16])?,
            hex32(&name[16..24])?,
        );
        match &name[24..] {
            "" => Some(WalFileName::Segment { tli, log, seg }),
            ".partial" => Some(WalFileName::Partial { tli, log, seg }),
            rest => {
                let offset = hex32(rest.strip_prefix('.')?.strip_suffix(".backup")?)?;
                Some(WalFileName::Backup {
                    tli,
                    log,
                    seg,
                    offset,
                })
            }
        }
    }

    /// The segment name for `segno` on timeline `tli` (`XLogFileName`).
    pub fn segment(tli: TimelineId, segno: SegNo, seg_size: u64) -> Self {
        let per_id = 0x1_0000_0000 / seg_size;
        WalFileName::Segment {
            tli,
            log: (segno / per_id) as u32,
            seg: (segno % per_id) as u32,
        }
    }

    pub fn timeline(&self) -> TimelineId {
        match *self {
            WalFileName::Segment { tli, .. }
            | WalFileName::Partial { tli, .. }
            | WalFileName::History { tli }
            | WalFileName::Backup { tli, .. } => tli,
        }
    }

    /// Segment number, for names that refer to a segment (`XLogFromFileName`).
    pub fn segno(&self, seg_size: u64) -> Option<SegNo> {
        let per_id = 0x1_0000_0000 / seg_size;
        match *self {
            WalFileName::Segment { log, seg, .. }
            | WalFileName::Partial { log, seg, .. }
            | WalFileName::Backup { log, seg, .. } => Some(log as u64 * per_id + seg as u64),
            WalFileName::History { .. } => None,
        }
    }

    /// True for files whose content is WAL pages (a segment or a .partial segment).
    pub fn holds_wal_pages(&self) -> bool {
        matches!(
            self,
            WalFileName::Segment { .. } | WalFileName::Partial { .. }
        )
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment { tli, log, seg } => write!(f, "{tli:08X}{log:08X}{seg:08X}"),
            WalFileName::Partial { tli, log, seg } => {
                write!(f, "{tli:08X}{log:08X}{seg:08X}.partial")
            }
            WalFileName::History { tli } => write!(f, "{tli:08X}.history"),
            WalFileName::Backup {
                tli,
                log,
                seg,
                offset,
            } => {
                write!(f, "{tli:08X}{log:08X}{seg:08X}.{offset:08X}.backup")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_kind() {
        for name in [
            "000000010000000000000003",
            "0000000A00000001000000FF.partial",
            "00000002.history",
            "000000010000000000000003.00000028.backup",
        ] {
            assert_eq!(WalFileName::parse(name).unwrap().to_string(), name);
        }
    }

    #[test]
    fn lower_case_hex_is_accepted_but_printed_upper() {
        let n = WalFileName::parse("0000000a0000000100000001").unwrap();
        assert_eq!(n.to_string(), "0000000A0000000100000001");
    }

    #[test]
    fn rejects_other_names() {
        for bad in [
            "",
            "00000001000000000000003",
            "0000000100000000000000033",
            "000000010000000000000003.partia",
            "00000002.histor",
            "0000002.history",
            "RECOVERYXLOG",
            "000000010000000000000003.28.backup",
            "00000001000000000000000G",
            "ééééééééééééééééééééééééé",
        ] {
            assert!(WalFileName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn segno_round_trip_with_various_segment_sizes() {
        for seg_size in [1u64 << 20, 16 << 20, 1 << 30] {
            for segno in [0u64, 1, 255, 256, 4095, 4096, 123_456] {
                let name = WalFileName::segment(3, segno, seg_size);
                assert_eq!(name.segno(seg_size), Some(segno), "{name} at {seg_size}");
            }
        }
        // 16 MiB segments: 256 per log id, so segno 0x100 is log 1 seg 0.
        assert_eq!(
            WalFileName::segment(1, 0x100, 16 << 20).to_string(),
            "000000010000000100000000"
        );
    }
}

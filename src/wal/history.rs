//! Timeline history files (`00000002.history`), as written by `writeTimeLineHistory()`:
//! one line per ancestor, `parentTLI<TAB>switchpoint<TAB>reason`, with `#` comments.

use super::{Lsn, TimelineId};

/// One ancestor: timeline `tli` was left for the next one at `switchpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub tli: TimelineId,
    pub switchpoint: Lsn,
    pub reason: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HistoryError {
    #[error("timeline history line {line}: {problem}")]
    BadLine { line: usize, problem: String },
    #[error("timeline history is not UTF-8 text")]
    NotText,
    #[error("timeline history line {line}: timeline IDs must increase")]
    NotIncreasing { line: usize },
}

/// Parses a history file into its ancestors, oldest first.
pub fn parse_history(bytes: &[u8]) -> Result<Vec<HistoryEntry>, HistoryError> {
    let text = std::str::from_utf8(bytes).map_err(|_| HistoryError::NotText)?;
    let mut entries: Vec<HistoryEntry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |problem: &str| HistoryError::BadLine {
            line: i + 1,
            problem: problem.to_string(),
        };
        let mut fields = line.splitn(3, '\t');
        let tli = fields
            .next()
            .and_then(|f| f.trim().parse::<TimelineId>().ok())
            .ok_or_else(|| bad("expected a timeline ID"))?;
        let switchpoint = fields
            .next()
            .and_then(|f| f.trim().parse::<Lsn>().ok())
            .ok_or_else(|| bad("expected a switch point LSN"))?;
        let reason = fields.next().unwrap_or("").trim().to_string();
        if entries.last().is_some_and(|prev| prev.tli >= tli) {
            return Err(HistoryError::NotIncreasing { line: i + 1 });
        }
        entries.push(HistoryEntry {
            tli,
            switchpoint,
            reason,
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_real_history_file() {
        let text =
            b"1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tat restore point \"x\"\n";
        let h = parse_history(text).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            h[0],
            HistoryEntry {
                tli: 1,
                switchpoint: Lsn(0x3000158),
                reason: "no recovery target specified".into()
            }
        );
        assert_eq!(h[1].tli, 2);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(parse_history(b"1\t0/300").is_ok());
        assert!(parse_history(b"1\t0/3000158\n1\t0/4000000\n").is_err());
        assert!(parse_history(b"x\t0/1\n").is_err());
        assert!(parse_history(b"1\n").is_err());
        assert!(parse_history(&[0xff, 0xfe]).is_err());
    }
}

//! Recovery targets as the user gives them, and as PostgreSQL's recovery_target_* settings.

use std::fmt;

use chrono::{DateTime, FixedOffset, NaiveDateTime};

use crate::wal::{Lsn, TimelineId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Replay all archived WAL.
    Latest,
    /// Stop as soon as the backup is consistent.
    Immediate,
    Time(DateTime<FixedOffset>),
    Lsn(Lsn),
    Xid(u64),
    Name(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetAction {
    Pause,
    Promote,
    Shutdown,
}

impl fmt::Display for TargetAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetAction::Pause => "pause",
            TargetAction::Promote => "promote",
            TargetAction::Shutdown => "shutdown",
        })
    }
}

/// `recovery_target_timeline`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimelineTarget {
    Latest,
    Current,
    Id(TimelineId),
}

impl std::str::FromStr for TimelineTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "latest" => Ok(TimelineTarget::Latest),
            "current" => Ok(TimelineTarget::Current),
            n => n
                .parse::<TimelineId>()
                .ok()
                .filter(|&t| t > 0)
                .map(TimelineTarget::Id)
                .ok_or_else(|| {
                    format!("invalid timeline {s:?}: use latest, current or a positive number")
                }),
        }
    }
}

impl fmt::Display for TimelineTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimelineTarget::Latest => f.write_str("latest"),
            TimelineTarget::Current => f.write_str("current"),
            TimelineTarget::Id(t) => write!(f, "{t}"),
        }
    }
}

/// Parses a target time: RFC 3339 (`2026-11-23T03:18:29.5Z`) or PostgreSQL's timestamptz output
/// (`2026-11-23 03:18:29.5+00`, `...+05:30`). An explicit offset is required: PostgreSQL would
/// read a bare time in the server's `timezone`, which the user may not have in mind.
pub fn parse_target_time(s: &str) -> Result<DateTime<FixedOffset>, String> {
    let t = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d);
    }
    let t2 = t.replacen(' ', "T", 1);
    if let Ok(d) = DateTime::parse_from_rfc3339(&t2) {
        return Ok(d);
    }
    // PostgreSQL prints offsets as +00 or +05:30; RFC 3339 needs +00:00.
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%#z"] {
        if let Ok(d) = DateTime::parse_from_str(&t2, fmt) {
            return Ok(d);
        }
    }
    if NaiveDateTime::parse_from_str(&t2, "%Y-%m-%dT%H:%M:%S%.f").is_ok() {
        return Err(format!(
            "target time {s:?} has no time zone; add one, e.g. {s}+00 or {}Z",
            t2
        ));
    }
    Err(format!("invalid target time {s:?}: use RFC 3339 (2026-11-23T03:18:29Z) or PostgreSQL's format (2026-11-23 03:18:29+00)"))
}

/// The timestamp as PostgreSQL's recovery_target_time reads it, to the microsecond.
pub fn format_pg_time(t: &DateTime<FixedOffset>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_and_postgres_forms() {
        let want = parse_target_time("2026-11-23T03:18:29.123456Z").unwrap();
        for s in [
            "2026-11-23 03:18:29.123456+00",
            "2026-11-23 03:18:29.123456+00:00",
            "2026-11-23T05:18:29.123456+02",
        ] {
            assert_eq!(parse_target_time(s).unwrap(), want, "{s}");
        }
        assert_eq!(format_pg_time(&want), "2026-11-23 03:18:29.123456+00:00");
    }

    #[test]
    fn refuses_times_without_zone_or_garbage() {
        assert!(parse_target_time("2026-11-23 03:18:29")
            .unwrap_err()
            .contains("no time zone"));
        assert!(parse_target_time("yesterday").is_err());
    }

    #[test]
    fn timeline_targets() {
        assert_eq!(
            "latest".parse::<TimelineTarget>().unwrap(),
            TimelineTarget::Latest
        );
        assert_eq!(
            "3".parse::<TimelineTarget>().unwrap(),
            TimelineTarget::Id(3)
        );
        assert!("0".parse::<TimelineTarget>().is_err());
    }
}

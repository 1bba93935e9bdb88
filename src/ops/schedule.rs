//! When a scheduled job runs: a 5-field cron expression in UTC, `@hourly`, `@daily`,
//! `@weekly`, or `every DURATION` (slots aligned to multiples of DURATION since the epoch, so a
//! restart keeps the same slots).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

#[derive(Clone, Debug)]
pub enum Schedule {
    Cron { spec: String, cron: Box<Cron> },
    Every(Duration),
}

#[derive(Debug, thiserror::Error)]
#[error("schedule {spec:?}: {message} (use 5-field cron in UTC like \"30 2 * * *\", @hourly, @daily, @weekly, or \"every 6h\")")]
pub struct ScheduleError {
    spec: String,
    message: String,
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Schedule, ScheduleError> {
        let spec = s.trim();
        let err = |message: String| ScheduleError {
            spec: spec.to_string(),
            message,
        };
        if let Some(d) = spec.strip_prefix("every ") {
            let d = humantime::parse_duration(d.trim()).map_err(|e| err(e.to_string()))?;
            if d < Duration::from_secs(1) {
                return Err(err("the interval must be at least 1s".into()));
            }
            return Ok(Schedule::Every(d));
        }
        let expr = match spec {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            s if s.starts_with('@') => return Err(err("unknown shorthand".into())),
            s => s,
        };
        if expr.split_whitespace().count() != 5 {
            return Err(err(
                "a cron expression has 5 fields: minute hour day-of-month month day-of-week".into(),
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| err(e.to_string()))?;
        Ok(Schedule::Cron {
            spec: spec.to_string(),
            cron: Box::new(cron),
        })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron { spec, .. } => f.write_str(spec),
            Schedule::Every(d) => write!(f, "every {}", humantime::format_duration(*d)),
        }
    }
}

impl Schedule {
    /// The first slot strictly after `t`; `None` if the expression never matches again.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron { cron, .. } => cron.find_next_occurrence(&t, false).ok(),
            Schedule::Every(d) => {
                let step = d.as_millis() as i64;
                let now = t.timestamp_millis();
                let next = (now.div_euclid(step) + 1) * step;
                DateTime::from_timestamp_millis(next)
            }
        }
    }

    /// How long from `now` to the next slot.
    pub fn wait_from(&self, now: DateTime<Utc>) -> Option<Duration> {
        let next = self.next_after(now)?;
        (next - now).max(TimeDelta::zero()).to_std().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn cron_is_utc_and_five_fields() {
        let s: Schedule = "30 2 * * *".parse().unwrap();
        assert_eq!(
            s.next_after(at("2026-03-01T02:30:00Z")),
            Some(at("2026-03-02T02:30:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-03-01T01:00:00Z")),
            Some(at("2026-03-01T02:30:00Z"))
        );
        for bad in [
            "0 30 2 * * *",
            "* * *",
            "61 * * * *",
            "@yearly",
            "every soon",
            "every 0s",
        ] {
            let e = bad.parse::<Schedule>().unwrap_err().to_string();
            assert!(e.contains(bad.trim()), "{e}");
        }
    }

    #[test]
    fn shorthands_and_intervals() {
        let t = at("2026-03-04T10:15:00Z"); // a Wednesday
        let next = |s: &str| s.parse::<Schedule>().unwrap().next_after(t).unwrap();
        assert_eq!(next("@hourly"), at("2026-03-04T11:00:00Z"));
        assert_eq!(next("@daily"), at("2026-03-05T00:00:00Z"));
        assert_eq!(next("@weekly"), at("2026-03-08T00:00:00Z"));
        assert_eq!(next("every 6h"), at("2026-03-04T12:00:00Z"));
        assert_eq!(next("every 10s"), at("2026-03-04T10:15:10Z"));
    }
}

//! The repository's state as gauges: what `pitr status --prometheus` / `--json` print once and
//! what `pitr stream` publishes on a timer. Everything comes from the repository itself
//! (typed `repo` and `recovery` calls), so it is right after a restart and for clusters that
//! only use `archive_command`.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::metrics as m;
use super::notify::public_location;
use crate::recovery::{Catalog, RecoveryError};
use crate::repo::{Repository, RepositoryUsage};

/// The newest completed backup.
#[derive(Clone, Debug, Serialize)]
pub struct LastBackup {
    pub id: String,
    pub stop_time: DateTime<Utc>,
    pub duration_seconds: f64,
    pub stored_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RepositoryStatus {
    pub repository: String,
    /// Commit time of the newest transaction a restore can reach; `None`: nothing recoverable.
    pub recoverable_until: Option<DateTime<Utc>>,
    pub backups: usize,
    pub last_backup: Option<LastBackup>,
    pub repository_bytes: RepositoryUsage,
}

pub async fn repository_status(repo: &Repository) -> Result<RepositoryStatus, RecoveryError> {
    let catalog = Catalog::load(repo).await?;
    let windows = catalog.windows(repo).await?;
    let recoverable_until = windows
        .iter()
        .filter_map(|w| w.last_xact.as_ref().map(|x| x.time))
        .max();
    let last_backup = catalog
        .backups
        .iter()
        .max_by_key(|b| b.stop_time)
        .map(|b| LastBackup {
            id: b.id.clone(),
            stop_time: b.stop_time,
            duration_seconds: (b.stop_time - b.start_time).num_milliseconds() as f64 / 1000.0,
            stored_bytes: b.stored_bytes(),
        });
    Ok(RepositoryStatus {
        repository: public_location(&repo.location()),
        recoverable_until,
        backups: catalog.backups.len(),
        last_backup,
        repository_bytes: repo.usage().await?,
    })
}

fn seconds(t: &DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// One gauge sample: name, label, value, help.
type Sample = (
    &'static str,
    Option<(&'static str, &'static str)>,
    f64,
    &'static str,
);

impl RepositoryStatus {
    fn samples(&self) -> Vec<Sample> {
        let b = self.last_backup.as_ref();
        vec![
            (m::RECOVERABLE_UNTIL, None, self.recoverable_until.as_ref().map_or(0.0, seconds),
             "Commit time of the newest transaction the repository can restore to (0: nothing recoverable)."),
            (m::REPOSITORY_BYTES, Some(("kind", "wal")), self.repository_bytes.wal as f64,
             "Stored bytes in the repository by kind."),
            (m::REPOSITORY_BYTES, Some(("kind", "backups")), self.repository_bytes.backups as f64,
             "Stored bytes in the repository by kind."),
            (m::BACKUP_LAST_SUCCESS, None, b.map_or(0.0, |b| seconds(&b.stop_time)),
             "Completion time of the newest completed backup (0: none)."),
            (m::BACKUP_LAST_DURATION, None, b.map_or(0.0, |b| b.duration_seconds),
             "Duration of the newest completed backup."),
            (m::BACKUP_LAST_STORED_BYTES, None, b.map_or(0.0, |b| b.stored_bytes as f64),
             "Stored bytes of the newest completed backup."),
        ]
    }

    /// Sets the gauges of the installed exporter.
    pub fn publish(&self) {
        for (name, label, value, _) in self.samples() {
            match label {
                Some((k, v)) => metrics::gauge!(name, k => v).set(value),
                None => metrics::gauge!(name).set(value),
            }
        }
    }

    /// Prometheus text exposition format, for node_exporter's textfile collector.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let mut last = "";
        for (name, label, value, help) in self.samples() {
            if name != last {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                last = name;
            }
            match label {
                Some((k, v)) => {
                    let _ = writeln!(out, "{name}{{{k}=\"{v}\"}} {value}");
                }
                None => {
                    let _ = writeln!(out, "{name} {value}");
                }
            }
        }
        out
    }

    /// The same gauges as JSON (`pitr_repository_bytes` as an object by kind), plus the
    /// readable facts they come from.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (name, label, value, _) in self.samples() {
            match label {
                Some((_, kind)) => {
                    let e = map
                        .entry(name)
                        .or_insert_with(|| serde_json::Value::Object(Default::default()));
                    e[kind] = serde_json::json!(value);
                }
                None => {
                    map.insert(name.to_string(), serde_json::json!(value));
                }
            }
        }
        map.insert("repository".into(), serde_json::json!(self.repository));
        map.insert(
            "recoverable_until".into(),
            serde_json::json!(self.recoverable_until),
        );
        map.insert("backups".into(), serde_json::json!(self.backups));
        map.insert("last_backup".into(), serde_json::json!(self.last_backup));
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_one_header_per_metric() {
        let s = RepositoryStatus {
            repository: "/r".into(),
            recoverable_until: DateTime::from_timestamp(1_700_000_000, 0),
            backups: 0,
            last_backup: None,
            repository_bytes: RepositoryUsage { wal: 5, backups: 7 },
        };
        let text = s.to_prometheus();
        assert_eq!(
            text.matches("# TYPE pitr_repository_bytes gauge").count(),
            1
        );
        assert!(
            text.contains("pitr_repository_bytes{kind=\"backups\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("pitr_recoverable_until_timestamp_seconds 1700000000\n"),
            "{text}"
        );
        assert!(
            text.contains("pitr_backup_last_success_timestamp_seconds 0\n"),
            "{text}"
        );
        let j = s.to_json();
        assert_eq!(j["pitr_repository_bytes"]["wal"], 5.0);
    }
}

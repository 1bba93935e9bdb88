//! The catalog: completed backups and the WAL the repository holds.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::layout::{self, BACKUP_CATALOG_PREFIX};
use super::{PutOutcome, RepoError, Repository, Result, SMALL_READS_IN_FLIGHT};
use crate::codec::Codec;
use crate::wal::{Lsn, SegNo, TimelineId, WalFileName};
use futures::{StreamExt, TryStreamExt};

/// One tar stream of a backup: the main data directory (`base.tar`) or a tablespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupArchive {
    /// `base.tar` or `<oid>.tar`.
    pub name: String,
    pub tablespace_oid: Option<u32>,
    /// Where the tablespace lived on the source server.
    pub tablespace_location: Option<String>,
    pub parts: u32,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

/// Metadata of a completed backup, everything `list` and `restore` need without a scan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub id: String,
    pub label: String,
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    /// Wall-clock time on the pitr host when BASE_BACKUP was sent.
    pub start_time: DateTime<Utc>,
    /// Wall-clock time on the pitr host after the backup and its WAL were safely stored. Recovery
    /// to a time before this may not reach consistency with this backup.
    pub stop_time: DateTime<Utc>,
    pub pg_version_num: u32,
    #[serde(with = "super::descriptor::u64_as_string")]
    pub system_identifier: u64,
    pub archives: Vec<BackupArchive>,
    pub manifest: bool,
    pub compression: Codec,
    pub pitr_version: String,
    /// The server the backup was taken from; absent in catalogs of older pitr versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<BackupSource>,
    /// Full or incremental; absent in catalogs of older pitr versions, which are all full.
    #[serde(default)]
    pub kind: BackupKind,
    /// The backup an incremental one was taken on (a full or another incremental); `None` for
    /// a full backup.
    #[serde(default)]
    pub parent: Option<String>,
    /// How an incremental backup was computed; absent for a full one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental_mode: Option<IncrementalMode>,
    /// Bytes this backup added to the repository: the sum of its stored objects (parts,
    /// manifest, block map). Absent in catalogs of older pitr versions: see
    /// [`BackupInfo::stored_bytes`].
    #[serde(
        default,
        rename = "stored_bytes",
        skip_serializing_if = "Option::is_none"
    )]
    pub stored_total: Option<u64>,
}

/// Whether a backup holds every file whole, or only what changed since its parent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    #[default]
    Full,
    Incremental,
}

impl std::fmt::Display for BackupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
        })
    }
}

/// How an incremental backup was computed. Both store the same representation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncrementalMode {
    /// PostgreSQL 17+'s `BASE_BACKUP (INCREMENTAL)`: only changed blocks crossed the network.
    Server,
    /// pitr compared the full backup the server sent with the parent's block map.
    Block,
}

impl std::fmt::Display for IncrementalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IncrementalMode::Server => "server",
            IncrementalMode::Block => "block",
        })
    }
}

/// Where a backup was taken: a primary, or a standby (whose WAL and system identifier are its
/// primary's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSource {
    /// Host name, IP address or Unix socket directory, as connected to.
    pub host: String,
    pub port: u16,
    /// The server was in recovery (a hot standby) when the backup was taken.
    pub standby: bool,
}

impl std::fmt::Display for BackupSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = if self.standby { "standby" } else { "primary" };
        write!(f, "{role} {}:{}", self.host, self.port)
    }
}

impl BackupInfo {
    /// A backup for unit tests of the rules over catalogs: `id` on timeline 1 from `lsn` to
    /// `lsn + 1`, stopped now, full unless it has a `parent`. Tests override fields with
    /// struct update syntax.
    #[cfg(test)]
    pub fn example(id: &str, lsn: u64, parent: Option<&str>) -> BackupInfo {
        BackupInfo {
            id: id.to_string(),
            label: String::new(),
            timeline: 1,
            start_lsn: Lsn(lsn),
            stop_lsn: Lsn(lsn + 1),
            start_time: Utc::now(),
            stop_time: Utc::now(),
            pg_version_num: 170000,
            system_identifier: 1,
            archives: vec![],
            manifest: true,
            compression: Codec::Lz4,
            pitr_version: String::new(),
            source: None,
            kind: match parent {
                Some(_) => BackupKind::Incremental,
                None => BackupKind::Full,
            },
            parent: parent.map(str::to_string),
            incremental_mode: None,
            stored_total: None,
        }
    }

    pub fn raw_bytes(&self) -> u64 {
        self.archives.iter().map(|a| a.raw_bytes).sum()
    }
    /// Bytes this backup added to the repository; for catalogs of older pitr versions, the
    /// stored size of its archives.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_total
            .unwrap_or_else(|| self.archives.iter().map(|a| a.stored_bytes).sum())
    }

    pub fn is_incremental(&self) -> bool {
        self.kind == BackupKind::Incremental
    }
}

/// WAL segments held for one timeline, as contiguous ranges of segment numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimelineWal {
    pub ranges: Vec<(SegNo, SegNo)>,
    pub partial: Vec<SegNo>,
}

/// Everything in the WAL folder, summarised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalInventory {
    pub timelines: BTreeMap<TimelineId, TimelineWal>,
    pub histories: Vec<TimelineId>,
}

impl WalInventory {
    pub fn from_names(names: impl IntoIterator<Item = WalFileName>, seg_size: u64) -> WalInventory {
        let mut segs: BTreeMap<TimelineId, Vec<SegNo>> = BTreeMap::new();
        let mut inv = WalInventory::default();
        for name in names {
            match name {
                WalFileName::Segment { tli, .. } => segs
                    .entry(tli)
                    .or_default()
                    .push(name.segno(seg_size).expect("segment")),
                WalFileName::Partial { tli, .. } => inv
                    .timelines
                    .entry(tli)
                    .or_default()
                    .partial
                    .push(name.segno(seg_size).expect("segment")),
                WalFileName::History { tli } => inv.histories.push(tli),
                WalFileName::Backup { .. } => {}
            }
        }
        for (tli, mut list) in segs {
            list.sort_unstable();
            list.dedup();
            let ranges = &mut inv.timelines.entry(tli).or_default().ranges;
            for s in list {
                match ranges.last_mut() {
                    Some((_, end)) if *end + 1 == s => *end = s,
                    _ => ranges.push((s, s)),
                }
            }
        }
        inv.histories.sort_unstable();
        inv
    }

    /// True if every segment from `from` to `to` (inclusive) of `tli` is held.
    pub fn covers(&self, tli: TimelineId, from: SegNo, to: SegNo) -> bool {
        self.timelines
            .get(&tli)
            .is_some_and(|t| t.ranges.iter().any(|&(a, b)| a <= from && to <= b))
    }

    /// The last segment of the contiguous run on `tli` that contains `from`.
    pub fn contiguous_end(&self, tli: TimelineId, from: SegNo) -> Option<SegNo> {
        self.timelines
            .get(&tli)?
            .ranges
            .iter()
            .find(|&&(a, b)| a <= from && from <= b)
            .map(|&(_, b)| b)
    }
}

impl Repository {
    /// Publishes a completed backup. Written last, never replaced.
    pub async fn put_backup_info(&self, info: &BackupInfo) -> Result<PutOutcome> {
        let json = serde_json::to_vec_pretty(info).expect("backup info serializes");
        self.put_immutable(
            &layout::backup_info_key(&info.id),
            &format!("backup {}", info.id),
            &json,
        )
        .await
    }

    pub async fn backup_info(&self, id: &str) -> Result<Option<BackupInfo>> {
        let key = layout::backup_info_key(id);
        match self.get_optional(&key).await? {
            None => Ok(None),
            Some(raw) => {
                serde_json::from_slice(&raw)
                    .map(Some)
                    .map_err(|e| RepoError::BadDescriptor {
                        key,
                        message: e.to_string(),
                    })
            }
        }
    }

    /// Completed backups, oldest first.
    pub async fn list_backups(&self) -> Result<Vec<BackupInfo>> {
        let objects = self.storage.list(BACKUP_CATALOG_PREFIX).await?;
        let mut out: Vec<BackupInfo> = futures::stream::iter(objects)
            .map(|obj| async move {
                let raw = self.get_verified(&obj.key).await?;
                serde_json::from_slice(&raw).map_err(|e| RepoError::BadDescriptor {
                    key: obj.key,
                    message: e.to_string(),
                })
            })
            .buffer_unordered(SMALL_READS_IN_FLIGHT)
            .try_collect()
            .await?;
        out.sort_by(|a, b| (a.stop_lsn, &a.id).cmp(&(b.stop_lsn, &b.id)));
        Ok(out)
    }

    pub fn write_codec(&self) -> Codec {
        self.objects.write.codec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_groups_contiguous_segments() {
        let seg = 16 << 20;
        let names = [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000004",
            "000000020000000000000004",
            "00000002.history",
            "000000010000000000000004.partial",
        ]
        .iter()
        .map(|n| WalFileName::parse(n).unwrap());
        let inv = WalInventory::from_names(names, seg);
        assert_eq!(inv.timelines[&1].ranges, vec![(1, 2), (4, 4)]);
        assert_eq!(inv.timelines[&1].partial, vec![4]);
        assert_eq!(inv.timelines[&2].ranges, vec![(4, 4)]);
        assert_eq!(inv.histories, vec![2]);
        assert!(inv.covers(1, 1, 2));
        assert!(!inv.covers(1, 1, 4));
        assert_eq!(inv.contiguous_end(1, 1), Some(2));
        assert_eq!(inv.contiguous_end(1, 3), None);
    }
}

//! The data directory PostgreSQL runs `archive_command` and `restore_command` in.
//!
//! PostgreSQL starts both hooks with the data directory as the working directory, so a hook can
//! learn there what the file it is handed cannot tell: which cluster it serves (`global/pg_control`),
//! whether that cluster is a standby or in archive recovery (the signal files), and which
//! repositories the cluster has archived into before (the `pitr.repository` marker, which base
//! backups carry to every cluster restored from them). Nothing here reads or writes the
//! repository.

use std::fs;
use std::path::{Path, PathBuf};

use super::ArchiveError;
use serde::{Deserialize, Serialize};

use crate::repo::marker::{is_recorded_one, replace_local_file, MarkerFile};
use crate::repo::{Carry, ClusterIdentity, Descriptor};
use crate::wal::{parse_long_header, SegmentTail, WalFileName};

pub use crate::repo::marker::{Archived, MARKER_FILE};

/// archive-push's local cache in the data directory (docs/repository-format.md,
/// "archive-push's local cache"): what a push needs to know about each repository before it
/// can write, kept from the previous push so that it costs no request up front.
pub const PUSH_CACHE_FILE: &str = "pitr.push-cache";
const PUSH_CACHE_FORMAT: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct PushCache {
    format: u32,
    repositories: Vec<CachedRepository>,
}

/// One repository in the push cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedRepository {
    /// As the marker spells it ([`crate::repo::marker::location_key`]).
    pub location: String,
    /// The descriptor as read from the repository by an earlier push.
    pub descriptor: Descriptor,
    /// The last segment pushed there, and the carry its summary holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_segment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carry: Option<Carry>,
}

impl CachedRepository {
    /// The carry of the last segment pushed, as the summary of the next one takes it.
    pub fn last_carry(&self) -> Option<(WalFileName, Option<SegmentTail>)> {
        let name = WalFileName::parse(self.last_segment.as_deref()?).ok()?;
        let tail = self.carry.as_ref().and_then(|c| {
            Some(SegmentTail {
                lsn: c.lsn,
                prev: c.prev,
                bytes: hex::decode(&c.bytes_hex).ok()?,
                system_identifier: self.descriptor.system_identifier,
            })
        });
        // A carry that was there but does not decode is not "no carry": look it up instead.
        if self.carry.is_some() && tail.is_none() {
            return None;
        }
        Some((name, tail))
    }

    pub fn set_last(&mut self, segment: &WalFileName, tail: Option<&SegmentTail>) {
        self.last_segment = Some(segment.to_string());
        self.carry = tail.map(|t| Carry {
            lsn: t.lsn,
            prev: t.prev,
            bytes_hex: hex::encode(&t.bytes),
        });
    }
}

/// pg_control's `floatFormat`, a constant written to detect float incompatibilities. It is
/// followed by `blcksz`, `relseg_size`, `xlog_blcksz` and `xlog_seg_size` in every version
/// from 11 on, while the fields before it change size from version to version: finding it is
/// how the segment size is read without a per-version layout.
const FLOAT_FORMAT: f64 = 1234567.0;
/// `sizeof(ControlFileData)` is kept below this (`PG_CONTROL_MAX_SAFE_SIZE`).
const CONTROL_MAX_SIZE: usize = 512;

/// What the working directory says about the server that runs the hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryMode {
    /// `standby.signal`: `restore_command` is a fallback beside streaming, and a failure only
    /// means "try again later"; PostgreSQL never ends a standby's recovery because of it.
    Standby,
    /// `recovery.signal` alone: recovery ends at the first file the command reports missing.
    ArchiveRecovery,
    /// No signal file, or not a data directory (a hook run by hand, pg_rewind).
    Unknown,
}

impl RecoveryMode {
    /// The mode of the server whose data directory is the working directory. `standby.signal`
    /// wins over `recovery.signal`, as in PostgreSQL.
    pub fn of_working_dir() -> RecoveryMode {
        let Ok(dir) = std::env::current_dir() else {
            return RecoveryMode::Unknown;
        };
        if dir.join("standby.signal").exists() {
            RecoveryMode::Standby
        } else if dir.join("recovery.signal").exists() {
            RecoveryMode::ArchiveRecovery
        } else {
            RecoveryMode::Unknown
        }
    }
}

/// A PostgreSQL data directory: the working directory when it holds `PG_VERSION` and
/// `global/pg_control`.
#[derive(Clone, Debug)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    pub fn working() -> Option<DataDir> {
        DataDir::at(&std::env::current_dir().ok()?)
    }

    pub fn at(path: &Path) -> Option<DataDir> {
        let is_data_dir =
            path.join("PG_VERSION").is_file() && path.join("global/pg_control").is_file();
        is_data_dir.then(|| DataDir {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn marker_path(&self) -> PathBuf {
        self.path.join(MARKER_FILE)
    }

    fn bad(&self, file: &str, message: impl ToString) -> ArchiveError {
        ArchiveError::BadDataDir {
            path: self.path.join(file),
            message: message.to_string(),
        }
    }

    /// The cluster's identity: system identifier and segment size from `global/pg_control`
    /// (checked against its CRC), major version from `PG_VERSION`.
    pub fn identity(&self) -> Result<ClusterIdentity, ArchiveError> {
        let control = self.read_control()?;
        let version = fs::read_to_string(self.path.join("PG_VERSION"))
            .map_err(|e| self.bad("PG_VERSION", e))?;
        let pg_major: u32 = version.trim().parse().map_err(|_| {
            self.bad(
                "PG_VERSION",
                format!("{:?} is not a major version", version.trim()),
            )
        })?;
        let wal_segment_size = match segment_size_from_control(&control) {
            Some(s) => s,
            None => self.segment_size_from_wal(control.system_identifier)?,
        };
        Ok(ClusterIdentity {
            system_identifier: control.system_identifier,
            pg_major,
            wal_segment_size,
        })
    }

    /// Reads pg_control, retrying once: PostgreSQL rewrites it in place, and a read racing
    /// that write can see a torn copy that fails the CRC.
    fn read_control(&self) -> Result<Control, ArchiveError> {
        let path = "global/pg_control";
        let mut last = String::new();
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let raw = fs::read(self.path.join(path)).map_err(|e| self.bad(path, e))?;
            match parse_control(&raw) {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(self.bad(path, last))
    }

    /// The segment size declared by the long header of a segment in `pg_wal` of this cluster:
    /// the fallback when pg_control's layout is not recognised.
    fn segment_size_from_wal(&self, system_identifier: u64) -> Result<u64, ArchiveError> {
        let dir = fs::read_dir(self.path.join("pg_wal")).map_err(|e| self.bad("pg_wal", e))?;
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !matches!(WalFileName::parse(name), Ok(WalFileName::Segment { .. })) {
                continue;
            }
            let mut head = [0u8; 64];
            let Ok(n) = fs::File::open(entry.path()).and_then(|mut f| {
                use std::io::Read;
                f.read(&mut head)
            }) else {
                continue;
            };
            if let Ok(h) = parse_long_header(&head[..n]) {
                if h.system_identifier == system_identifier {
                    return Ok(h.seg_size as u64);
                }
            }
        }
        Err(self.bad(
            "global/pg_control",
            "the WAL segment size is neither in a pg_control layout this pitr knows nor in a segment in pg_wal",
        ))
    }
}

/// The fields of pg_control this module needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Control {
    system_identifier: u64,
    /// The control data, up to its CRC.
    data: Vec<u8>,
}

/// Checks pg_control and reads its system identifier (first 8 bytes, native endian). The CRC
/// (CRC-32C of everything before it, stored right after) sits at an offset that differs between
/// versions, so it is searched for; a torn or foreign file matches nowhere.
fn parse_control(raw: &[u8]) -> Result<Control, String> {
    if raw.len() < 16 {
        return Err(format!("{} bytes is too short for pg_control", raw.len()));
    }
    let u32_at = |at: usize| u32::from_ne_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if !(1300..10000).contains(&version) {
        return Err(format!(
            "pg_control_version {version} is not one of PostgreSQL 13 or later on this machine"
        ));
    }
    let end = raw.len().min(CONTROL_MAX_SIZE);
    let crc_offset = (16..end.saturating_sub(3))
        .step_by(4)
        .find(|&at| crc32c::crc32c(&raw[..at]) == u32_at(at))
        .ok_or("pg_control fails its CRC check")?;
    Ok(Control {
        system_identifier: u64::from_ne_bytes(raw[..8].try_into().expect("8 bytes")),
        data: raw[..crc_offset].to_vec(),
    })
}

/// `xlog_seg_size`, found after the `floatFormat` anchor; `None` when the anchor is missing or
/// the fields after it are not plausible.
fn segment_size_from_control(control: &Control) -> Option<u64> {
    let raw = &control.data;
    let anchor = FLOAT_FORMAT.to_ne_bytes();
    let at = (16..raw.len().saturating_sub(24))
        .step_by(8)
        .find(|&at| raw[at..at + 8] == anchor)?;
    let u32_at = |at: usize| u32::from_ne_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
    let (xlog_blcksz, seg_size) = (u32_at(at + 16), u32_at(at + 20));
    let page_ok = xlog_blcksz.is_power_of_two() && (1024..=65536).contains(&xlog_blcksz);
    let seg_ok = seg_size.is_power_of_two() && (1 << 20..=1 << 30).contains(&seg_size);
    (page_ok && seg_ok).then_some(seg_size as u64)
}

impl DataDir {
    fn marker(&self) -> MarkerFile {
        MarkerFile::new(self.marker_path())
    }

    /// What the marker records of `location` for this cluster: `Some` when this cluster (or
    /// the one it was restored from) archived there before.
    pub fn archived_into(
        &self,
        location: &str,
        system_identifier: u64,
    ) -> Result<Option<Archived>, ArchiveError> {
        self.marker()
            .archived_into(location, system_identifier)
            .map_err(|e| self.bad(MARKER_FILE, e))
    }

    /// Records that this cluster archived into `location`; nothing is written when the marker
    /// says so already, so this costs one small read per archived file.
    pub fn record_archived(
        &self,
        location: &str,
        repository_id: Option<&str>,
        system_identifier: u64,
    ) -> Result<(), ArchiveError> {
        self.marker()
            .record(location, repository_id, system_identifier)
            .map_err(|e| self.bad(MARKER_FILE, e))
    }

    fn push_cache_path(&self) -> PathBuf {
        self.path.join(PUSH_CACHE_FILE)
    }

    /// The push cache's entry for `location`. A cache: a missing, unreadable or newer file
    /// is no entry (logged), never an error.
    pub fn cached(&self, location: &str) -> Option<CachedRepository> {
        let cache = self.read_push_cache()?;
        cache
            .repositories
            .into_iter()
            .find(|r| r.location == location)
    }

    fn read_push_cache(&self) -> Option<PushCache> {
        let raw = match fs::read(self.push_cache_path()) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::debug!(error = %e, "push cache unreadable; ignored");
                return None;
            }
        };
        match serde_json::from_slice::<PushCache>(&raw) {
            Ok(c) if c.format <= PUSH_CACHE_FORMAT => Some(c),
            Ok(c) => {
                tracing::debug!(format = c.format, "push cache of a newer pitr; ignored");
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "push cache does not parse; ignored");
                None
            }
        }
    }

    /// Replaces the entry of `entry.location` (or, with `None` as `entry`, removes the one of
    /// `location`). Written to a temporary file and renamed, not fsynced: losing it costs
    /// requests, never WAL, and a torn file reads as no cache.
    pub fn update_cache(
        &self,
        location: &str,
        entry: Option<CachedRepository>,
    ) -> Result<(), ArchiveError> {
        let mut cache = self.read_push_cache().unwrap_or_default();
        cache.repositories.retain(|r| r.location != location);
        cache.repositories.extend(entry);
        cache.format = PUSH_CACHE_FORMAT;
        let json = serde_json::to_vec_pretty(&cache).expect("push cache serializes");
        replace_local_file(&self.push_cache_path(), &json, None, false)
            .map_err(|e| self.bad(PUSH_CACHE_FILE, e))
    }

    /// The error for a location the marker names that has no descriptor any more.
    pub fn vanished(&self, location: &str, recorded: &Archived) -> ArchiveError {
        ArchiveError::Vanished {
            location: location.to_string(),
            id: recorded
                .repository_id
                .clone()
                .unwrap_or_else(|| "(none: created before ids)".into()),
            marker: self.marker_path(),
        }
    }

    /// Refuses a repository at a recorded location that is not the recorded one (created
    /// again after the first vanished: it holds none of the WAL archived before).
    pub fn check_same(
        &self,
        descriptor: &Descriptor,
        location: &str,
        recorded: &Archived,
    ) -> Result<(), ArchiveError> {
        if is_recorded_one(descriptor, recorded) {
            return Ok(());
        }
        let show = |id: &Option<String>| id.clone().unwrap_or_else(|| "(none)".into());
        Err(ArchiveError::Replaced {
            location: location.to_string(),
            found: show(&descriptor.repository_id),
            recorded: show(&recorded.repository_id),
            marker: self.marker_path(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pg_control image laid out like PostgreSQL 15's on x86-64 (the fields before
    /// `floatFormat` are filler here: only their length matters), CRC included.
    fn control_image(system_identifier: u64, seg_size: u32, filler: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&system_identifier.to_ne_bytes());
        raw.extend_from_slice(&1300u32.to_ne_bytes());
        raw.extend_from_slice(&202209061u32.to_ne_bytes());
        raw.resize(16 + filler, 0x5a);
        raw.extend_from_slice(&FLOAT_FORMAT.to_ne_bytes());
        for v in [8192u32, 131072, 8192, seg_size, 64, 32, 1996, 2048] {
            raw.extend_from_slice(&v.to_ne_bytes());
        }
        raw.extend_from_slice(&[0u8; 40]);
        let crc = crc32c::crc32c(&raw);
        raw.extend_from_slice(&crc.to_ne_bytes());
        raw.resize(8192, 0);
        raw
    }

    #[test]
    fn pg_control_gives_system_identifier_and_segment_size() {
        for filler in [232, 240, 256] {
            let raw = control_image(7711201025540057278, 1 << 20, filler);
            let c = parse_control(&raw).unwrap();
            assert_eq!(c.system_identifier, 7711201025540057278);
            assert_eq!(segment_size_from_control(&c), Some(1 << 20));
        }
    }

    #[test]
    fn a_torn_or_foreign_pg_control_is_refused() {
        let mut raw = control_image(42, 16 << 20, 232);
        raw[40] ^= 1;
        assert!(parse_control(&raw).unwrap_err().contains("CRC"));
        let mut swapped = control_image(42, 16 << 20, 232);
        swapped[8..12].copy_from_slice(&1300u32.to_be_bytes());
        assert!(parse_control(&swapped).is_err());
        assert!(parse_control(&[0; 8]).is_err());
        // A CRC-valid image whose size fields make no sense gives no size (pg_wal decides).
        let odd = control_image(42, 12345, 232);
        assert_eq!(
            segment_size_from_control(&parse_control(&odd).unwrap()),
            None
        );
    }

    #[test]
    fn the_marker_records_each_location_once() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("global")).unwrap();
        fs::write(
            tmp.path().join("global/pg_control"),
            control_image(7, 1 << 24, 232),
        )
        .unwrap();
        fs::write(tmp.path().join("PG_VERSION"), "15\n").unwrap();
        let dir = DataDir::at(tmp.path()).unwrap();
        assert_eq!(dir.identity().unwrap().wal_segment_size, 1 << 24);
        assert_eq!(dir.identity().unwrap().pg_major, 15);
        assert_eq!(dir.archived_into("/repo", 7).unwrap(), None);
        dir.record_archived("/repo", Some("abc"), 7).unwrap();
        dir.record_archived("/other", None, 7).unwrap();
        let first = dir.archived_into("/repo", 7).unwrap().unwrap();
        assert_eq!(first.repository_id.as_deref(), Some("abc"));
        dir.record_archived("/repo", Some("abc"), 7).unwrap();
        assert_eq!(dir.archived_into("/repo", 7).unwrap(), Some(first));
        // Another cluster's record is not this cluster's.
        assert_eq!(dir.archived_into("/repo", 8).unwrap(), None);
        assert!(dir.archived_into("/other", 7).unwrap().is_some());
        fs::write(dir.marker_path(), "{not json").unwrap();
        assert!(dir.archived_into("/repo", 7).is_err());
    }
}

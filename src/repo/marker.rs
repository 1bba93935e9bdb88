//! The `pitr.repository` marker: which repositories a cluster has stored WAL into, kept beside
//! the cluster (in its data directory), so that a repository that vanished is never silently
//! created again (docs/repository-format.md, "The data directory marker"). The archive hooks
//! and `pitr stream` share this file and its rules; where the file lives is theirs to know.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Descriptor;
use crate::storage::Location;

/// Name of the marker file in the data directory.
pub const MARKER_FILE: &str = "pitr.repository";
const MARKER_FORMAT: u32 = 1;

/// A repository the cluster has archived into, as the marker records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archived {
    /// The repository location as [`location_key`] spells it (S3 with its endpoint).
    pub location: String,
    /// The descriptor's `repository_id`; `None` for a repository created before ids existed.
    pub repository_id: Option<String>,
    /// As a string, like the descriptor's.
    pub system_identifier: String,
    pub first_archived_at: DateTime<Utc>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Marker {
    format: u32,
    repositories: Vec<Archived>,
}

/// How a location is named in the marker: one bucket name on two endpoints is two
/// repositories, so S3 locations carry their endpoint.
pub fn location_key(location: &Location) -> String {
    match location {
        Location::S3 { settings, .. } => {
            let endpoint = settings
                .endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                .unwrap_or_else(|| "aws".into());
            format!("{location} at {endpoint}")
        }
        other => other.to_string(),
    }
}

/// What is wrong with a marker file; the caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("format {0} is newer than this pitr's ({MARKER_FORMAT})")]
    Newer(u32),
}

/// One marker file.
#[derive(Clone, Debug)]
pub struct MarkerFile {
    path: PathBuf,
    /// `(uid, gid)` a new marker is given before it replaces the old one.
    owner: Option<(u32, u32)>,
}

impl MarkerFile {
    pub fn new(path: impl Into<PathBuf>) -> MarkerFile {
        MarkerFile {
            path: path.into(),
            owner: None,
        }
    }

    /// A marker written by root for the server's user: the hooks, run as that user, must keep
    /// reading it (an unreadable marker stops archiving).
    pub fn owned_by(mut self, uid: u32, gid: u32) -> MarkerFile {
        self.owner = Some((uid, gid));
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<Marker, MarkerError> {
        let raw = match fs::read(&self.path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Marker::default()),
            Err(e) => return Err(e.into()),
        };
        let marker: Marker = serde_json::from_slice(&raw)?;
        if marker.format > MARKER_FORMAT {
            return Err(MarkerError::Newer(marker.format));
        }
        Ok(marker)
    }

    /// What the marker records of `location` for this cluster: `Some` when this cluster (or
    /// the one it was restored from) archived there before.
    pub fn archived_into(
        &self,
        location: &str,
        system_identifier: u64,
    ) -> Result<Option<Archived>, MarkerError> {
        let system_identifier = system_identifier.to_string();
        Ok(self
            .read()?
            .repositories
            .into_iter()
            .find(|a| a.location == location && a.system_identifier == system_identifier))
    }

    /// Records that this cluster archived into `location`; nothing is written when the marker
    /// says so already, so this costs one small read per call.
    pub fn record(
        &self,
        location: &str,
        repository_id: Option<&str>,
        system_identifier: u64,
    ) -> Result<(), MarkerError> {
        let mut marker = self.read()?;
        let sysid = system_identifier.to_string();
        let same = |a: &Archived| a.location == location && a.system_identifier == sysid;
        if let Some(a) = marker.repositories.iter().find(|a| same(a)) {
            if a.repository_id.as_deref() == repository_id {
                return Ok(());
            }
        }
        marker.repositories.retain(|a| !same(a));
        marker.repositories.push(Archived {
            location: location.to_string(),
            repository_id: repository_id.map(str::to_string),
            system_identifier: sysid,
            first_archived_at: Utc::now(),
        });
        marker.format = MARKER_FORMAT;
        let json = serde_json::to_vec_pretty(&marker).expect("marker serializes");
        self.write_atomically(&json)?;
        Ok(())
    }

    /// A crash leaves the old marker or the new one, never a torn one that would read as
    /// "never archived anywhere": written durably (see [`replace_local_file`]).
    fn write_atomically(&self, content: &[u8]) -> io::Result<()> {
        replace_local_file(&self.path, content, self.owner, true)
    }
}

/// Replaces the small local file `path` (mode 0600) with `content`: written to a temporary
/// file beside it and renamed, so a reader sees the old content or the new, never a torn file.
/// `owner`: chown the new file (root writing a file the server user reads). `durable`: fsync
/// the file before the rename and the directory after (a marker); a cache skips both.
pub fn replace_local_file(
    path: &Path,
    content: &[u8],
    owner: Option<(u32, u32)>,
    durable: bool,
) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        match durable {
            true => fs::File::open(dir)?.sync_all(),
            false => Ok(()),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Whether `descriptor` is the repository the marker recorded (not one created again at the
/// same location after the first vanished, which holds none of the WAL stored before).
pub fn is_recorded_one(descriptor: &Descriptor, recorded: &Archived) -> bool {
    descriptor.repository_id == recorded.repository_id
}

//! `pitr copy --from A --to B`: copies what B lacks of A, object for object (docs/repositories.md).
//!
//! Safe to interrupt and run again: every object is written by conditional create (a copy
//! already in B is never replaced, and one with other content is an error), the WAL goes first,
//! and a backup's catalog entry, which is what makes it visible, goes after all of its parts.
//! What B already has with the same size is not read again; `pitr verify` checks B in full.

use std::collections::HashMap;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::error::{Classify, Code};
use crate::repo::{PutOutcome, RepoError, Repository, ScannedObject, WriteOptions};
use crate::storage::Storage;

/// Objects copied at once: enough to keep a remote store busy, few enough for memory (an
/// object is up to one segment or backup part, read whole).
const CONCURRENCY: usize = 4;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    #[error("repository {name}: {source}")]
    Open { name: String, source: RepoError },
    #[error("copying {key}: {source}")]
    Object { key: String, source: RepoError },
    #[error("copying from {from} to {to}: {source}")]
    Repo {
        from: String,
        to: String,
        source: RepoError,
    },
}

impl Classify for CopyError {
    fn code(&self) -> Code {
        self.source().code()
    }

    fn hint(&self) -> Option<String> {
        self.source().hint()
    }
}

impl CopyError {
    fn source(&self) -> &RepoError {
        match self {
            CopyError::Open { source, .. }
            | CopyError::Object { source, .. }
            | CopyError::Repo { source, .. } => source,
        }
    }
}

/// Counts of one copy run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    pub objects_copied: u64,
    pub bytes_copied: u64,
    /// Already in the target (same size, or same content).
    pub objects_skipped: u64,
    pub bytes_skipped: u64,
    /// Backups whose catalog entry this run wrote: now visible in the target.
    pub backups_copied: Vec<String>,
    /// Source objects not copied by design: stream chunks, leases, unfinished or expiring
    /// backups, unknown keys.
    pub objects_left_out: u64,
    /// The target had no repository: this run created it.
    pub created_target: bool,
}

/// Told about the work as it goes (the CLI draws a progress bar).
pub trait CopyProgress: Sync {
    /// Before the first object: how many objects and bytes will be copied.
    fn start(&self, objects: u64, bytes: u64);
    /// After each object copied.
    fn copied(&self, bytes: u64);
}

/// The two sides of a copy, as configured.
pub struct Side {
    pub name: String,
    pub storage: Storage,
    pub write: WriteOptions,
}

/// Copies what `to` lacks of `from`, creating `to`'s repository when its location is empty.
pub async fn copy(
    from: Side,
    to: Side,
    progress: &dyn CopyProgress,
) -> Result<CopyReport, CopyError> {
    let open_err = |name: &str| {
        let name = name.to_string();
        move |source| CopyError::Open { name, source }
    };
    let source = Repository::open(from.storage, from.write)
        .await
        .map_err(open_err(&from.name))?;
    let mut report = CopyReport::default();
    let target = match Repository::open(to.storage.clone(), to.write.clone()).await {
        Ok(t) => t,
        Err(RepoError::NotInitialized { .. }) => {
            report.created_target = true;
            source
                .create_copy_target(to.storage, to.write)
                .await
                .map_err(open_err(&to.name))?
        }
        Err(e) => return Err(open_err(&to.name)(e)),
    };
    let both = |source| CopyError::Repo {
        from: from.name.clone(),
        to: to.name.clone(),
        source,
    };
    source.check_copy_target(&target).map_err(both)?;
    let plan = source.copy_plan().await.map_err(open_err(&from.name))?;
    let present = target.object_sizes().await.map_err(open_err(&to.name))?;
    report.objects_left_out = plan.left_out as u64;

    let phases: Vec<Vec<&ScannedObject>> = plan
        .phases()
        .iter()
        .map(|phase| missing(phase, &present, &mut report))
        .collect();
    let (objects, bytes) = phases
        .iter()
        .flatten()
        .fold((0, 0), |(n, b), o| (n + 1, b + o.size));
    progress.start(objects, bytes);
    // Each phase completes before the next starts: a catalog entry is never written before
    // the parts of its backup, whatever the interleaving inside a phase.
    for phase in phases {
        copy_phase(&source, &target, &phase, progress, &mut report).await?;
    }
    Ok(report)
}

/// The objects of `phase` that the target does not have with the same size; the others are
/// counted as skipped.
fn missing<'a>(
    phase: &'a [ScannedObject],
    present: &HashMap<String, u64>,
    report: &mut CopyReport,
) -> Vec<&'a ScannedObject> {
    let mut out = vec![];
    for o in phase {
        if present.get(o.key()) == Some(&o.size) {
            report.objects_skipped += 1;
            report.bytes_skipped += o.size;
        } else {
            out.push(o);
        }
    }
    out
}

async fn copy_phase(
    source: &Repository,
    target: &Repository,
    phase: &[&ScannedObject],
    progress: &dyn CopyProgress,
    report: &mut CopyReport,
) -> Result<(), CopyError> {
    let results: Vec<(&ScannedObject, PutOutcome)> = futures::stream::iter(phase.iter().copied())
        .map(|o| async move {
            let outcome =
                source
                    .copy_object_to(target, o)
                    .await
                    .map_err(|e| CopyError::Object {
                        key: o.key().to_string(),
                        source: e,
                    })?;
            progress.copied(o.size);
            Ok::<_, CopyError>((o, outcome))
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    for (o, outcome) in results {
        match outcome {
            PutOutcome::Stored => {
                report.objects_copied += 1;
                report.bytes_copied += o.size;
                if let crate::repo::ObjectKind::Catalog { backup_id } = &o.kind {
                    report.backups_copied.push(backup_id.clone());
                }
            }
            PutOutcome::AlreadyStored => {
                report.objects_skipped += 1;
                report.bytes_skipped += o.size;
            }
        }
    }
    report.backups_copied.sort();
    Ok(())
}

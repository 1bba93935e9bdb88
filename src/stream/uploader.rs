//! The uploader: stores jobs one after the other, in order, and is the only place that
//! declares WAL durable.
//!
//! Order is what makes the durable position honest: a job's end is published only after it
//! *and everything before it* is stored, so the flush position the receiver reports never
//! covers a hole. A storage outage is retried forever (the stream must not exit and must not
//! drop WAL): the queue in front of the uploader fills, the receiver stops reading the socket,
//! and PostgreSQL keeps the WAL in the slot. Only a second shutdown signal gives up, and then
//! the caller reports the WAL that is not durable and exits non-zero.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::error::StreamError;
use super::metrics::{self as m, Progress};
use super::segment::Job;
use crate::repo::{ChunkRef, PutOutcome, RepoError, Repository};
use crate::storage::StorageError;
use crate::wal::{Lsn, WalFileName};

/// First wait after a failed upload; doubles up to [`MAX_BACKOFF`]. On top of the storage
/// layer's own retries, so this loop only runs when storage has been failing for a while.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Errors worth retrying forever: the repository is unreachable or failing, not refusing.
fn is_outage(e: &RepoError) -> bool {
    match e {
        RepoError::Storage(s) => matches!(
            s,
            StorageError::Transient { .. } | StorageError::RetriesExhausted { .. }
        ),
        _ => false,
    }
}

async fn store(repo: &Repository, job: &Job) -> Result<PutOutcome, RepoError> {
    match job {
        Job::Chunk {
            segment,
            start,
            end,
            data,
            ..
        } => {
            let chunk = ChunkRef {
                segment: segment.clone(),
                start: *start,
                end: *end,
            };
            // Same chunk, same bytes after a restart: AlreadyStored. Different bytes: refused.
            repo.put_chunk(&chunk, &data.data).await
        }
        // Every completed WAL file goes through the one entry point archive-push uses, so the
        // objects (and whatever is stored beside them) are the same whatever their source.
        Job::Segment { name, data, .. } | Job::Partial { name, data, .. } => {
            repo.store_wal_file(name, data).await
        }
        Job::History { name, data } => repo.store_wal_file(name, data).await,
        Job::Chunked {
            name, wal_bytes, ..
        } => repo.store_chunked_segment(name, *wal_bytes).await,
    }
}

/// Runs until `jobs` is closed and drained (cancellation-safe only through `force`: the
/// normal shutdown path is closing the channel, so that everything queued is stored).
pub(super) async fn run(
    repo: Repository,
    mirrors: Vec<Repository>,
    mut jobs: mpsc::Receiver<Job>,
    durable_tx: watch::Sender<Lsn>,
    progress: Arc<Progress>,
    force: CancellationToken,
) -> Result<(), StreamError> {
    while let Some(job) = jobs.recv().await {
        // Into every repository at once, in step: a job is durable once each has it, so the
        // position reported (and acknowledged) is the lowest of theirs.
        let outcomes = futures::future::try_join_all(
            std::iter::once(&repo)
                .chain(&mirrors)
                .map(|r| store_until_stored(r, &job, &progress, &force)),
        )
        .await?;
        let outcome = outcomes[0];
        metrics::counter!(m::UPLOADS, "kind" => job.kind()).increment(1);
        metrics::counter!(m::UPLOADED_BYTES).increment(job.content_len() as u64);
        match &job {
            Job::Segment { name, .. }
            | Job::Partial { name, .. }
            | Job::History { name, .. }
            | Job::Chunked { name, .. } => {
                let chunked = matches!(job, Job::Chunked { .. });
                tracing::info!(file = %name, bytes = job.content_len(), chunked, already = outcome == PutOutcome::AlreadyStored, "stored");
            }
            Job::Chunk { .. } => tracing::trace!(durable = ?job.durable_end(), "chunk stored"),
        }
        if let Some(end) = job.durable_end() {
            progress.set_durable(end);
            durable_tx.send_if_modified(|d| {
                if end > *d {
                    *d = end;
                    true
                } else {
                    false
                }
            });
        }
        // The segment object now holds every byte of its chunks: they are garbage. Deleting is
        // best effort; a leftover chunk is never read once its segment exists.
        if let Job::Segment { chunks, .. } | Job::Partial { chunks, .. } = &job {
            repo.delete_chunks(chunks).await;
            for m in &mirrors {
                m.delete_chunks(chunks).await;
            }
        }
    }
    Ok(())
}

/// Stores `job`, retrying a repository outage forever (until `force`): WAL is never dropped.
async fn store_until_stored(
    repo: &Repository,
    job: &Job,
    progress: &Progress,
    force: &CancellationToken,
) -> Result<PutOutcome, StreamError> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        let started = Instant::now();
        let e = match store(repo, job).await {
            Ok(o) => {
                metrics::histogram!(m::UPLOAD_SECONDS, "kind" => job.kind())
                    .record(started.elapsed().as_secs_f64());
                if attempts > 0 {
                    tracing::warn!(attempts, "repository reachable again; catching up");
                }
                return Ok(o);
            }
            // Another source (the promoted server's archive_command) stored its own copy of
            // this .partial, with different bytes past the switch point. The new timeline's
            // segment holds everything recovery needs, so keep theirs and go on.
            Err(RepoError::ConflictingContent { .. })
                if matches!(job, Job::Partial { .. })
                    || matches!(
                        job,
                        Job::Chunked {
                            name: WalFileName::Partial { .. },
                            ..
                        }
                    ) =>
            {
                tracing::warn!(
                    kind = job.kind(),
                    "a different .partial of this segment is already stored; kept it"
                );
                return Ok(PutOutcome::AlreadyStored);
            }
            Err(e) if is_outage(&e) => e,
            Err(e) => {
                metrics::counter!(m::ERRORS, "kind" => "repository").increment(1);
                return Err(e.into());
            }
        };
        attempts += 1;
        metrics::counter!(m::UPLOAD_RETRIES).increment(1);
        metrics::counter!(m::ERRORS, "kind" => "storage").increment(1);
        tracing::error!(
            error = %e,
            repository = %repo.location(),
            kind = job.kind(),
            attempts,
            received = %progress.received(),
            durable = %progress.durable(),
            behind_bytes = progress.lag_bytes(),
            behind_seconds = progress.lag().as_secs(),
            retry_in = ?backoff,
            "repository unavailable: WAL is NOT being made durable; not acknowledging \
             (the replication slot keeps it on the server); retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = force.cancelled() => {
                return Err(StreamError::NotDurable {
                    received: progress.received(),
                    durable: progress.durable(),
                });
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

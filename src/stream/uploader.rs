//! The uploader: stores jobs a few at a time, finishes them in order, and is the only place
//! that declares WAL durable.
//!
//! Order is what makes the durable position honest: a job's end is published only after it
//! *and everything before it* is stored, so the flush position the receiver reports never
//! covers a hole. A storage outage is retried forever (the stream must not exit and must not
//! drop WAL): the queue in front of the uploader fills, the receiver stops reading the socket,
//! and PostgreSQL keeps the WAL in the slot. Only a second shutdown signal gives up, and then
//! the caller reports the WAL that is not durable and exits non-zero.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::budget::Budget;
use super::error::StreamError;
use super::metrics::{self as m, Progress};
use super::segment::Job;
use crate::repo::{ChunkRef, EncodedWal, PendingSummary, PutOutcome, RepoError, Repository};
use crate::storage::StorageError;
use crate::wal::{Lsn, SegmentTail, WalFileName};

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

/// Jobs being stored at once. What they hold is bounded by the budget, not by this: over a
/// slow network the next segment uploads while the one before is still on its way.
pub(super) const IN_FLIGHT: usize = 4;

/// What of a job one call stores: its object, or a segment's summary (after its object).
#[derive(Clone, Copy)]
enum Step<'a> {
    Object(&'a Job),
    /// A segment's object, framed for this repository.
    Encoded(&'a EncodedWal),
    Summary(&'a PendingSummary),
}

impl Step<'_> {
    fn kind(self) -> &'static str {
        match self {
            Step::Object(job) => job.kind(),
            Step::Encoded(_) | Step::Summary(_) => "segment",
        }
    }
}

async fn store(repo: &Repository, step: Step<'_>) -> Result<PutOutcome, RepoError> {
    let job = match step {
        Step::Object(job) => job,
        Step::Encoded(e) => return repo.put_encoded_wal(e).await,
        Step::Summary(p) => {
            return repo
                .store_pending_summary(p)
                .await
                .map(|()| PutOutcome::Stored)
        }
    };
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
        Job::Segment { .. } => unreachable!("store_job stores a segment's object as Step::Encoded"),
        Job::Partial { name, data, .. } => repo.store_wal_file(name, data).await,
        Job::History { name, data } => repo.store_wal_file(name, data).await,
        Job::Chunked {
            name, wal_bytes, ..
        } => repo.store_chunked_segment(name, *wal_bytes).await,
    }
}

/// One step of `job` into every repository at once, in step: a job is durable once each has
/// it, so the position reported (and acknowledged) is the lowest of theirs. The outcome is the
/// first repository's.
async fn store_everywhere(
    repos: &[Repository],
    step: Step<'_>,
    progress: &Progress,
    force: &CancellationToken,
) -> Result<PutOutcome, StreamError> {
    let outcomes = futures::future::try_join_all(
        repos
            .iter()
            .map(|r| store_until_stored(r, step, progress, force)),
    )
    .await?;
    Ok(outcomes[0])
}

/// The previous segment's name and carry, handed from each job's task to the next one's, so
/// that a segment's summary does not wait for the previous one to be stored and read back.
type Carry = Option<(WalFileName, Option<SegmentTail>)>;

/// What [`finish`] needs of a job once it is stored: not its WAL, which the job's task drops
/// (returning its budget) as soon as the segment is stored and summarized.
struct Done {
    kind: &'static str,
    len: usize,
    durable_end: Option<Lsn>,
    file: Option<WalFileName>,
    /// A chunked segment (docs/repository-format.md): said in the log line.
    chunked: bool,
    chunks: Vec<ChunkRef>,
}

impl Done {
    fn of(job: &Job) -> Done {
        let (file, chunks) = match job {
            Job::Segment { name, chunks, .. } | Job::Partial { name, chunks, .. } => {
                (Some(name.clone()), chunks.clone())
            }
            Job::History { name, .. } | Job::Chunked { name, .. } => (Some(name.clone()), vec![]),
            Job::Chunk { .. } => (None, vec![]),
        };
        Done {
            kind: job.kind(),
            len: job.content_len(),
            durable_end: job.durable_end(),
            file,
            chunked: matches!(job, Job::Chunked { .. }),
            chunks,
        }
    }
}

/// Stores `job` everywhere: its object, and for a segment its summary once the object is
/// stored. The summary is computed as soon as the previous job hands over its carry (`prev`),
/// while the object uploads; this job hands its own on (`next`). A segment's buffer goes back
/// to the budget once it is framed and summarized (see `budget`).
async fn store_job(
    repos: Arc<Vec<Repository>>,
    job: Job,
    budget: Budget,
    progress: Arc<Progress>,
    force: CancellationToken,
    prev: oneshot::Receiver<Carry>,
    next: oneshot::Sender<Carry>,
) -> Result<PutOutcome, StreamError> {
    let Job::Segment { name, data, .. } = &job else {
        let object = store_everywhere(&repos, Step::Object(&job), &progress, &force);
        // A lost carry (the job before failed) only means reading it from the repository.
        let forward = async { next.send(prev.await.unwrap_or(None)).ok() };
        return tokio::join!(object, forward).0;
    };
    let name = name.clone();
    // The object (`encode_wal_file`: lz4-blocks in an unencrypted lz4 repository, as
    // archive-push frames a segment) and the summary below are what archive-push stores, so a
    // segment's objects are the same whatever their source.
    let encoded: Vec<EncodedWal> = repos
        .iter()
        .map(|r| r.encode_wal_file(&name, data, budget.object_buffer()))
        .collect();
    let stored_len = encoded.iter().map(EncodedWal::stored_len).sum();
    let summarize = async {
        let carry = prev.await.unwrap_or(None);
        // Room for the objects is taken in job order (after the carry, before handing it on):
        // a later job holding room while it waits for this one's carry would deadlock.
        let room = budget.encoded(stored_len).await;
        let Job::Segment { data, .. } = &job else {
            unreachable!("a segment job")
        };
        let pending = repos[0].summarize_wal_segment(&name, data, carry).await;
        next.send(Some((name.clone(), pending.carry()))).ok();
        // Framed and summarized: its WAL is not needed any more. Its buffer goes back now,
        // not after the upload, so the receiver goes on while the objects travel.
        drop(job);
        (pending, room)
    };
    let objects = futures::future::try_join_all(
        repos
            .iter()
            .zip(&encoded)
            .map(|(r, e)| store_until_stored(r, Step::Encoded(e), &progress, &force)),
    );
    let (outcomes, (pending, room)) = tokio::join!(objects, summarize);
    for e in encoded {
        budget.recycle_object(e.into_framed());
    }
    drop(room);
    let outcome = outcomes?[0];
    store_everywhere(&repos, Step::Summary(&pending), &progress, &force).await?;
    Ok(outcome)
}

type InFlight = VecDeque<(Done, JoinHandle<Result<PutOutcome, StreamError>>)>;

/// The outcome of the oldest job in flight (never ready when none is: `select!` builds the
/// future of a disabled branch too).
async fn oldest(in_flight: &mut InFlight) -> Result<PutOutcome, StreamError> {
    match in_flight.front_mut() {
        Some((_, task)) => task.await.expect("upload task panicked"),
        None => std::future::pending().await,
    }
}

/// Runs until `jobs` is closed and drained (cancellation-safe only through `force`: the
/// normal shutdown path is closing the channel, so that everything queued is stored).
///
/// Up to [`IN_FLIGHT`] jobs are stored at once, but a job counts as stored, and its end as
/// durable, only once it *and every job before it* is stored: jobs finish in order.
pub(super) async fn run(
    repo: Repository,
    mirrors: Vec<Repository>,
    mut jobs: mpsc::Receiver<Job>,
    budget: Budget,
    durable_tx: watch::Sender<Lsn>,
    progress: Arc<Progress>,
    force: CancellationToken,
) -> Result<(), StreamError> {
    let repos = Arc::new(std::iter::once(repo).chain(mirrors).collect::<Vec<_>>());
    let mut in_flight = InFlight::new();
    let (first, mut carry) = oneshot::channel();
    first.send(None).ok();
    let mut open = true;
    // A chunked segment names chunks that must all be stored before it is written
    // (docs/repository-format.md): it waits here until every job before it has finished.
    let mut held: Option<Job> = None;
    let result = loop {
        if in_flight.is_empty() {
            if let Some(job) = held.take() {
                start(
                    &repos,
                    job,
                    &budget,
                    &progress,
                    &force,
                    &mut carry,
                    &mut in_flight,
                );
            }
        }
        tokio::select! {
            biased;
            stored = oldest(&mut in_flight), if !in_flight.is_empty() => {
                let (done, _) = in_flight.pop_front().expect("a job was in flight");
                match stored {
                    Ok(outcome) => finish(&repos, done, outcome, &durable_tx, &progress).await,
                    Err(e) => break Err(e),
                }
            }
            job = jobs.recv(), if open && held.is_none() && in_flight.len() < IN_FLIGHT => match job {
                Some(job @ Job::Chunked { .. }) if !in_flight.is_empty() => held = Some(job),
                Some(job) => start(&repos, job, &budget, &progress, &force, &mut carry, &mut in_flight),
                None => open = false,
            },
            else => break Ok(()),
        }
    };
    for (_, task) in &in_flight {
        task.abort();
    }
    result
}

/// Starts storing `job` in its own task, behind the jobs already in flight.
fn start(
    repos: &Arc<Vec<Repository>>,
    job: Job,
    budget: &Budget,
    progress: &Arc<Progress>,
    force: &CancellationToken,
    carry: &mut oneshot::Receiver<Carry>,
    in_flight: &mut InFlight,
) {
    let done = Done::of(&job);
    let (next, next_rx) = oneshot::channel();
    let prev = std::mem::replace(carry, next_rx);
    let task = tokio::spawn(store_job(
        repos.clone(),
        job,
        budget.clone(),
        progress.clone(),
        force.clone(),
        prev,
        next,
    ));
    in_flight.push_back((done, task));
}

/// The oldest job is stored everywhere: it is durable.
async fn finish(
    repos: &[Repository],
    done: Done,
    outcome: PutOutcome,
    durable_tx: &watch::Sender<Lsn>,
    progress: &Progress,
) {
    metrics::counter!(m::UPLOADS, "kind" => done.kind).increment(1);
    metrics::counter!(m::UPLOADED_BYTES).increment(done.len as u64);
    match &done.file {
        Some(name) => {
            tracing::info!(file = %name, bytes = done.len, chunked = done.chunked, already = outcome == PutOutcome::AlreadyStored, "stored");
        }
        None => tracing::trace!(durable = ?done.durable_end, "chunk stored"),
    }
    if let Some(end) = done.durable_end {
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
    if !done.chunks.is_empty() {
        for r in repos {
            r.delete_chunks(&done.chunks).await;
        }
    }
}

/// Stores `job`, retrying a repository outage forever (until `force`): WAL is never dropped.
async fn store_until_stored(
    repo: &Repository,
    step: Step<'_>,
    progress: &Progress,
    force: &CancellationToken,
) -> Result<PutOutcome, StreamError> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        let started = Instant::now();
        let e = match store(repo, step).await {
            Ok(o) => {
                metrics::histogram!(m::UPLOAD_SECONDS, "kind" => step.kind())
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
                if matches!(
                    step,
                    Step::Object(
                        Job::Partial { .. }
                            | Job::Chunked {
                                name: WalFileName::Partial { .. },
                                ..
                            }
                    )
                ) =>
            {
                tracing::warn!(
                    kind = step.kind(),
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
            kind = step.kind(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{ClusterIdentity, WriteOptions};
    use crate::storage::Storage;
    use crate::stream::budget::SegBuf;
    use crate::wal::WalFileName;

    const SEG: u64 = 1 << 20;

    /// An uploader into a new in-memory repository: the repository, the job queue, the
    /// durable position and the uploader's task.
    async fn started(
        budget: Budget,
    ) -> (
        Repository,
        mpsc::Sender<Job>,
        watch::Receiver<Lsn>,
        JoinHandle<Result<(), StreamError>>,
    ) {
        let cluster = ClusterIdentity {
            system_identifier: 7_000_000_000_000_000_002,
            pg_major: 16,
            wal_segment_size: SEG,
        };
        let repo = Repository::open_for_cluster(
            Storage::in_memory(),
            &cluster,
            "test",
            WriteOptions::default(),
        )
        .await
        .unwrap();
        let (tx, rx) = mpsc::channel(2);
        let (durable_tx, durable_rx) = watch::channel(Lsn(0));
        let uploader = tokio::spawn(run(
            repo.clone(),
            vec![],
            rx,
            budget,
            durable_tx,
            Arc::default(),
            CancellationToken::new(),
        ));
        (repo, tx, durable_rx, uploader)
    }

    /// Segments that do not compress (their objects need all the room for objects in upload)
    /// between segments that do (a little room) are all stored. Taken out of job order, a
    /// light job could hold a little room while it waits for the heavy one before it, which
    /// waits for all of it. This test does not force that order (the first job is always
    /// ahead here); `s3_outage_under_load_loses_nothing` in tests/stream.rs hit it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_take_the_room_for_objects_in_job_order() {
        let budget = Budget::new(SEG);
        let (_, tx, durable_rx, uploader) = started(budget.clone()).await;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut noise = || {
            (0..SEG / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect::<Vec<u8>>()
        };
        let n = 40u64;
        for i in 1..=n {
            let mut data = budget.segment().await;
            match i % 2 {
                1 => data.extend_from_slice(&noise()),
                _ => data.resize(SEG as usize, i as u8),
            }
            tx.send(Job::Segment {
                name: WalFileName::segment(1, i, SEG),
                data,
                chunks: vec![],
                durable_end: Lsn((i + 1) * SEG),
            })
            .await
            .unwrap();
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(60), uploader)
            .await
            .expect("every job is stored: the room for objects is never held in a cycle")
            .unwrap()
            .unwrap();
        assert_eq!(*durable_rx.borrow(), Lsn((n + 1) * SEG));
    }

    /// Segments stored several at a time still finish in order: every one is stored, the
    /// durable position ends at the last one's end, and closing the queue ends the uploader
    /// (also once nothing is left in flight).
    #[tokio::test]
    async fn stores_every_job_and_returns_when_the_queue_closes() {
        let (repo, tx, mut durable_rx, uploader) = started(Budget::new(SEG)).await;
        let names: Vec<_> = (1..=2 * IN_FLIGHT as u64 + 1)
            .map(|n| WalFileName::segment(1, n, SEG))
            .collect();
        let mut seen = vec![];
        for (n, name) in (1..).zip(&names) {
            tx.send(Job::Segment {
                name: name.clone(),
                data: SegBuf::unbudgeted(vec![n as u8; SEG as usize]),
                chunks: vec![],
                durable_end: Lsn((n + 1) * SEG),
            })
            .await
            .unwrap();
            seen.push(*durable_rx.borrow_and_update());
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(30), uploader)
            .await
            .expect("the uploader returns once its queue is closed")
            .unwrap()
            .unwrap();
        assert_eq!(*durable_rx.borrow(), Lsn((names.len() as u64 + 1) * SEG));
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        for (n, name) in (1..).zip(&names) {
            let stored = repo.get_wal_file(name).await.unwrap().unwrap();
            assert_eq!(stored, vec![n as u8; SEG as usize], "{name}");
        }
    }
}

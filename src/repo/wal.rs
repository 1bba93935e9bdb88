//! WAL files in the repository: storing a completed file with what is kept beside it, and
//! reading timeline histories.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::chunks::may_be_chunked_segment;
use super::object::{ObjectCodec, Payload};
use super::wal_tail::{read_full, SegmentSource, SourceReader, TailEncode};
use super::{layout, PutOutcome, RepoError, Repository, StoredSummary, WalForRecovery};
use crate::codec::CodecError;
use crate::codec::{self, BlockRun, BlockSums, BlockWriter, FRAME_HEADER_LEN};
use crate::storage::{LocalUpload, StorageError};
use crate::wal::{
    parse_history, parse_long_header, summarize_segment, HistoryEntry, SegmentEnd,
    SegmentSummarizer, SegmentTail, Summarized, SummaryError, TimelineId, WalFileName,
    XLP_FIRST_IS_CONTRECORD,
};

/// Timeline histories by timeline: each timeline's ancestors, oldest first.
pub type Histories = BTreeMap<TimelineId, Vec<HistoryEntry>>;

impl Repository {
    /// Stores one completed WAL file, whether it came from `archive-push` or from `pitr stream`.
    /// Both paths go through here so that whatever the repository keeps beside a segment is kept
    /// for every segment, whatever its source.
    ///
    /// For a full segment that is its summary (see `repo::StoredSummary`), written here after
    /// the segment (archive-push with its local cache writes both at once: a summary counts only
    /// beside its segment, docs/repository-format.md "Segment summaries"). Odd records do not fail
    /// the call: a summary that ends in corruption is stored and logged as a warning, because
    /// PostgreSQL must be able to archive and `pitr verify` reports it. Storage failures do fail
    /// it, so that PostgreSQL retries; the retry finds the segment already stored and writes the
    /// summary.
    pub async fn store_wal_file(
        &self,
        name: &WalFileName,
        content: &[u8],
    ) -> Result<PutOutcome, RepoError> {
        let repo = self;
        if !matches!(name, WalFileName::Segment { .. }) {
            return repo.put_wal_file(name, content).await;
        }
        // Fetch the previous segment's carry while the segment uploads: both are network waits.
        let (outcome, prev) = tokio::join!(
            repo.put_wal_file(name, content),
            previous_carry(repo, name, content)
        );
        let outcome = outcome?;
        let started = std::time::Instant::now();
        let summarized = summarize(content, prev.as_ref());
        repo.store_summary(name, &summarized, prev.is_some(), started.elapsed())
            .await?;
        Ok(outcome)
    }

    /// The summary half of [`Self::store_wal_file`], computed but not stored, for a writer that
    /// stores several segments at a time with [`Self::put_wal_file`] (`pitr stream` over a slow
    /// network). `prev` is the previous segment's name and carry when the caller summarized that
    /// segment itself ([`PendingSummary::carry`]); otherwise the carry is read from its stored
    /// summary, as [`Self::store_wal_file`] does. Store it with [`Self::store_pending_summary`]
    /// once the segment is stored.
    pub async fn summarize_wal_segment(
        &self,
        name: &WalFileName,
        content: &[u8],
        prev: Option<(WalFileName, Option<SegmentTail>)>,
    ) -> PendingSummary {
        let expected = previous_segment(name, content);
        let carry = match (prev, expected) {
            // The same test `previous_carry` makes: only a segment that starts with a
            // continuation takes a carry.
            (_, None) => None,
            (Some((p, tail)), Some(e)) if p == e => tail,
            (_, Some(_)) => previous_carry(self, name, content).await,
        };
        let started = std::time::Instant::now();
        let summarized = summarize(content, carry.as_ref());
        PendingSummary {
            name: name.clone(),
            summarized,
            carried: carry.is_some(),
            elapsed: started.elapsed(),
        }
    }

    /// Stores a summary from [`Self::summarize_wal_segment`]; its segment must be stored.
    pub async fn store_pending_summary(&self, p: &PendingSummary) -> Result<(), RepoError> {
        self.store_summary(&p.name, &p.summarized, p.carried, p.elapsed)
            .await
    }

    /// [`Self::store_wal_file`] for a file this process owns (archive-push): compression and
    /// the summary, the two CPU-heavy steps, run at the same time on the blocking pool (the
    /// summary of a segment of small records takes as long as compressing it), while the
    /// segment is written. The order of what is stored is the same: segment, then summary.
    pub async fn store_wal_file_owned(
        &self,
        name: &WalFileName,
        content: Bytes,
    ) -> Result<PutOutcome, RepoError> {
        let stored = self
            .store_wal_file_with(name, content, PrevCarry::Lookup, SummaryOrder::AfterSegment)
            .await?;
        Ok(stored.outcome)
    }

    /// [`Self::store_wal_file_owned`] with the previous segment's carry from `prev` and the
    /// summary stored in `order`; also returns the carry the next segment takes.
    pub async fn store_wal_file_with(
        &self,
        name: &WalFileName,
        content: Bytes,
        prev: PrevCarry,
        order: SummaryOrder,
    ) -> Result<WalStored, RepoError> {
        if !matches!(name, WalFileName::Segment { .. }) {
            let outcome = self.put_wal_file(name, &content).await?;
            return Ok(WalStored {
                outcome,
                next_carry: None,
            });
        }
        let for_summary = content.clone();
        let summary = async {
            let prev = resolve_carry(self, name, &for_summary, prev).await;
            let carried = prev.is_some();
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let s = summarize(&for_summary, prev.as_ref());
                (s, carried, started.elapsed())
            })
            .await
            .expect("summary task panicked")
        };
        let (outcome, (summarized, _, _)) = match order {
            SummaryOrder::AfterSegment => {
                let (outcome, run) = tokio::join!(self.put_wal_bytes(name, content), summary);
                let outcome = outcome?;
                self.store_summary(name, &run.0, run.1, run.2).await?;
                (outcome, run)
            }
            SummaryOrder::Parallel => {
                let put_summary = async {
                    let run = summary.await;
                    self.store_summary(name, &run.0, run.1, run.2).await?;
                    Ok::<_, RepoError>(run)
                };
                let (outcome, run) = tokio::join!(self.put_wal_bytes(name, content), put_summary);
                (outcome?, run?)
            }
        };
        Ok(WalStored {
            outcome,
            next_carry: next_carry(&summarized),
        })
    }

    /// [`Self::put_wal_file`] with the encoding on the blocking pool.
    async fn put_wal_bytes(
        &self,
        name: &WalFileName,
        content: Bytes,
    ) -> Result<PutOutcome, RepoError> {
        let key = layout::wal_key(name);
        let (codec, k, c) = (self.objects.clone(), key.clone(), content.clone());
        let framed = tokio::task::spawn_blocking(move || codec.encode(&k, &c, Payload::Data))
            .await
            .expect("encode task panicked");
        match self.storage.put_if_absent(&key, Bytes::from(framed)).await {
            Ok(()) => Ok(PutOutcome::Stored),
            Err(StorageError::AlreadyExists { .. }) => {
                self.check_identical(&key, &name.to_string(), &content)
                    .await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the summary of a segment already stored. Odd records are logged, not failed (see
    /// [`Self::store_wal_file`]); a storage failure fails the call.
    async fn store_summary(
        &self,
        name: &WalFileName,
        summarized: &Result<Summarized, SummaryError>,
        carried: bool,
        elapsed: std::time::Duration,
    ) -> Result<(), RepoError> {
        let summarized = match summarized {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %name, error = %e, "segment stored, but it cannot be summarized; `pitr verify` will report it");
                return Ok(());
            }
        };
        let s = &summarized.summary;
        if let SegmentEnd::Corrupt { lsn, error } = &s.end {
            tracing::warn!(file = %name, %lsn, %error, "segment stored, but its records are damaged from this LSN; `pitr verify` will report it");
        }
        let stored = StoredSummary::from_summarized(summarized);
        let summary_outcome = self.put_segment_summary(name, &stored).await?;
        tracing::debug!(
            file = %name,
            records = s.record_count,
            commits = s.commit_count,
            carried_in = carried && s.skipped_continuation.is_none(),
            summarize_us = elapsed.as_micros() as u64,
            outcome = ?summary_outcome,
            "segment summary"
        );
        Ok(())
    }
}

/// The summary of `content`, with the previous segment's carry when it fits. A carry that does
/// not fit this segment (a damaged summary, a previous segment from another history) is not
/// this segment's fault: summarize it alone then. `verify --full` checks the chain across the
/// boundary from the segments themselves.
fn summarize(content: &[u8], prev: Option<&SegmentTail>) -> Result<Summarized, SummaryError> {
    let with_carry = prev
        .and_then(|tail| summarize_segment(content, Some(tail)).ok())
        .filter(|s| !matches!(&s.summary.end, SegmentEnd::Corrupt { lsn, .. } if *lsn < s.summary.segment_start));
    match with_carry {
        Some(s) => Ok(s),
        None => summarize_segment(content, None),
    }
}

/// The segment before `name` when `content` starts with the continuation of a record from it.
fn previous_segment(name: &WalFileName, content: &[u8]) -> Option<WalFileName> {
    let header = parse_long_header(content).ok()?;
    if header.info & XLP_FIRST_IS_CONTRECORD == 0 {
        return None;
    }
    let seg_size = header.seg_size as u64;
    let segno = name.segno(seg_size)?.checked_sub(1)?;
    Some(WalFileName::segment(name.timeline(), segno, seg_size))
}

/// A segment's summary, computed and not yet stored ([`Repository::summarize_wal_segment`]).
pub struct PendingSummary {
    name: WalFileName,
    summarized: Result<Summarized, SummaryError>,
    carried: bool,
    elapsed: std::time::Duration,
}

impl PendingSummary {
    /// The carry the next segment's summary takes, exactly as stored with this summary.
    pub fn carry(&self) -> Option<SegmentTail> {
        let s = self.summarized.as_ref().ok()?;
        StoredSummary::from_summarized(s).tail()
    }
}

/// Where the previous segment's carry comes from when a segment is stored.
#[derive(Clone, Debug)]
pub enum PrevCarry {
    /// Read from the previous segment's stored summary (one GET before summarizing).
    Lookup,
    /// The caller kept it (archive-push's local cache): the carry the summary of segment
    /// `.0` holds. Used only when `.0` is the very segment before; otherwise it is looked up.
    Known(WalFileName, Option<SegmentTail>),
}

/// When a segment's summary is written relative to the segment (docs/repository-format.md,
/// "Segment summaries"): readers take a summary only beside its segment, so either is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SummaryOrder {
    /// Once the segment is stored (`pitr stream`, a push without a local cache).
    AfterSegment,
    /// Both PUTs at once (archive-push with its local cache): one round trip less.
    Parallel,
}

/// What storing a segment did, with the carry its summary holds for the next segment.
#[derive(Debug)]
pub struct WalStored {
    pub outcome: PutOutcome,
    /// As stored with the summary (`None` without a carry or without a summary).
    pub next_carry: Option<SegmentTail>,
}

/// The carry the next segment takes from this summary, exactly as stored with it.
fn next_carry(summarized: &Result<Summarized, SummaryError>) -> Option<SegmentTail> {
    StoredSummary::from_summarized(summarized.as_ref().ok()?).tail()
}

/// The previous segment's carry for `name`, from `prev` when it names that segment, else from
/// its stored summary.
async fn resolve_carry(
    repo: &Repository,
    name: &WalFileName,
    content: &[u8],
    prev: PrevCarry,
) -> Option<SegmentTail> {
    let expected = previous_segment(name, content)?;
    match prev {
        PrevCarry::Known(n, tail) if n == expected => tail,
        _ => previous_carry(repo, name, content).await,
    }
}

/// The carry stored with the previous segment's summary, when this segment starts with the
/// continuation of a record. Best effort: absent (previous segment not archived yet, first
/// segment of a timeline) or unreadable means this segment skips the continuation.
async fn previous_carry(
    repo: &Repository,
    name: &WalFileName,
    content: &[u8],
) -> Option<SegmentTail> {
    let prev = previous_segment(name, content)?;
    match repo.segment_summary(&prev).await {
        Ok(Some(s)) => s.tail(),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(file = %prev, error = %e, "previous summary unreadable; skipping the continuation");
            None
        }
    }
}

/// A WAL segment stored as it is read (archive-push): the caller hands it in pieces to
/// [`SegmentUpload::write`], from a blocking thread (in blocks of [`codec::BLOCK_LEN`], each
/// after [`SegmentUpload::claim_next`] when it shares them with a tail thread), then calls
/// [`SegmentUpload::finish_input`] and stores it with [`Repository::store_segment_upload`].
/// In an unencrypted lz4 repository each piece is compressed (`lz4-blocks`) as it comes, while
/// a second thread summarizes the segment and a third compresses its tail, each reading the
/// segment itself (the page cache serves it again; that costs a copy, where handing the pieces
/// over would cost buffers and a wake-up per block), so that neither the segment nor a second
/// segment-sized buffer is ever held; otherwise the pieces are gathered and stored as by
/// [`Repository::store_wal_file_owned`].
pub struct SegmentUpload {
    name: WalFileName,
    mode: UploadMode,
    /// For a gathered segment: where its summary takes the previous carry from.
    prev: PrevCarry,
}

enum UploadMode {
    Streamed {
        frame: BlockWriter,
        summary: tokio::task::JoinHandle<Option<SummaryRun>>,
        /// Where the storage takes the object as it is made (a local directory): each block is
        /// written as it is compressed, so the compressed segment is never held whole.
        file: Option<Box<FileUpload>>,
        /// The segment for a tail thread, until the caller's first claim starts one.
        source: Option<(std::sync::Arc<dyn SegmentSource>, u64)>,
        /// The tail thread (src/repo/wal_tail.rs), until joined.
        tail: Option<TailEncode>,
    },
    Whole(Vec<u8>),
}

/// The object's temporary file, and the first error writing it (reported by
/// [`Repository::store_segment_upload`]; nothing more is written after it).
///
/// The second CPU compresses blocks from the segment's end (src/repo/wal_tail.rs). Earlier
/// ways were no faster on 2 CPUs: half of each piece on a second thread, a helper encoding
/// every other block (docs/benchmarks.md, rounds four and seven: a wake-up per block), and a
/// fixed tail at the same priority as this thread (round eight: it took 1/3 of the CPU from
/// the thread that writes).
struct FileUpload {
    up: LocalUpload,
    failed: Option<StorageError>,
}

impl FileUpload {
    /// Room for the frame header, which is written last (its checksums cover everything).
    fn start(mut up: LocalUpload) -> FileUpload {
        let failed = up.write(&[0u8; FRAME_HEADER_LEN]).err();
        FileUpload { up, failed }
    }

    fn write(&mut self, frame: &mut BlockWriter, piece: &[u8]) {
        if self.failed.is_none() {
            frame.write(piece);
            self.failed = frame.flush(|b| self.up.write(b)).err();
        }
    }

    /// Writes blocks made by the tail thread after the blocks written so far.
    fn join(&mut self, frame: &mut BlockWriter, run: &BlockRun<'_>) {
        frame.join_flushed(run);
        if self.failed.is_none() {
            self.failed = self.up.write(run.payload).err();
        }
    }

    /// Fills in the header, then makes the object durable and publishes it (blocking).
    fn finish(self, sums: BlockSums) -> Result<(), StorageError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        self.up.write_at(&codec::blocks_header(&sums), 0)?;
        self.up.finish_if_absent()
    }
}

/// What [`Repository::store_segment_upload`] did.
#[derive(Debug)]
pub enum UploadOutcome {
    Done(PutOutcome),
    /// The repository holds an object under this name already: whether it is the same content
    /// takes the content, which a streamed upload no longer has. Store it whole with
    /// [`Repository::store_wal_file_owned`], which compares (and writes a missing summary).
    NeedsContent,
}

/// What the summary thread hands back: the summary, whether the carry was used, its time.
type SummaryRun = (Result<Summarized, SummaryError>, bool, std::time::Duration);

/// Bytes per read of the summary thread: the reader takes pieces of any size.
const SUMMARY_READ: usize = 64 * 1024;

/// Summarizes the segment of `len` bytes that `input` reads, with the previous segment's carry
/// when it fits. `None` when `input` cannot be read (logged): the segment is stored without a
/// summary then, as for a segment that cannot be summarized.
fn summarize_input(
    name: &WalFileName,
    mut input: impl std::io::Read,
    len: u64,
    prev: Option<SegmentTail>,
) -> Option<SummaryRun> {
    let (mut backing, start) = codec::aligned_buffer(SUMMARY_READ);
    let buf = &mut backing[start..start + SUMMARY_READ];
    let mut run = || -> std::io::Result<SummaryRun> {
        let n = read_full(&mut input, buf)?;
        let mut summary = StreamedSummary::new(&buf[..n], len, prev.as_ref());
        let mut n = n;
        while n > 0 {
            summary.feed(&buf[..n]);
            n = read_full(&mut input, buf)?;
        }
        Ok(summary.finish())
    };
    match run() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(file = %name, error = %e, "cannot read the segment to summarize it; stored without a summary, `pitr verify` reads the segment itself");
            None
        }
    }
}

/// The summary of a streamed segment, with and without the previous segment's carry as
/// [`summarize`] does: both run only until the carried record is read (a few KiB, as a rule),
/// then the one that is not needed is dropped.
struct StreamedSummary {
    state: Summarizers,
    elapsed: std::time::Duration,
}

enum Summarizers {
    Both {
        carry: Box<SegmentSummarizer>,
        alone: Result<Box<SegmentSummarizer>, SummaryError>,
    },
    /// The carried record was read: the summary with the carry stands.
    Carried(Box<SegmentSummarizer>),
    Alone(Result<Box<SegmentSummarizer>, SummaryError>),
}

impl StreamedSummary {
    fn new(first: &[u8], len: u64, prev: Option<&SegmentTail>) -> StreamedSummary {
        let alone = SegmentSummarizer::new(first, len, None).map(Box::new);
        let with_carry = prev.and_then(|t| SegmentSummarizer::new(first, len, Some(t)).ok());
        let state = match with_carry {
            Some(carry) => Summarizers::Both {
                carry: Box::new(carry),
                alone,
            },
            None => Summarizers::Alone(alone),
        };
        StreamedSummary {
            state,
            elapsed: std::time::Duration::ZERO,
        }
    }

    fn feed(&mut self, piece: &[u8]) {
        let started = std::time::Instant::now();
        let state = std::mem::replace(&mut self.state, Summarizers::Alone(Err(unfed())));
        self.state = match state {
            Summarizers::Both {
                mut carry,
                mut alone,
            } => {
                carry.feed(piece);
                if let Ok(a) = &mut alone {
                    a.feed(piece);
                }
                match carry.carry_verdict() {
                    Some(true) => Summarizers::Carried(carry),
                    Some(false) => Summarizers::Alone(alone),
                    None => Summarizers::Both { carry, alone },
                }
            }
            Summarizers::Carried(mut c) => {
                c.feed(piece);
                Summarizers::Carried(c)
            }
            Summarizers::Alone(mut a) => {
                if let Ok(a) = &mut a {
                    a.feed(piece);
                }
                Summarizers::Alone(a)
            }
        };
        self.elapsed += started.elapsed();
    }

    /// The summary, whether the carry was used, and the time spent summarizing.
    fn finish(self) -> (Result<Summarized, SummaryError>, bool, std::time::Duration) {
        let started = std::time::Instant::now();
        let (summarized, carried) = match self.state {
            Summarizers::Carried(c) => (c.finish(), true),
            Summarizers::Alone(a) => (a.and_then(|a| a.finish()), false),
            // Never verdicted: the carried record runs to the end of the segment.
            Summarizers::Both { carry, alone } => match carry.finish() {
                Ok(s) if !carry_failed(&s) => (Ok(s), true),
                _ => (alone.and_then(|a| a.finish()), false),
            },
        };
        (summarized, carried, self.elapsed + started.elapsed())
    }
}

/// Stands in for a summarizer only while `feed` moves the real one.
fn unfed() -> SummaryError {
    SummaryError::Page(crate::wal::PageError::SizeMismatch {
        len: 0,
        seg_size: 0,
    })
}

/// The test of [`summarize`]: a carry whose record is corrupt before this segment starts is
/// not this segment's fault.
fn carry_failed(s: &Summarized) -> bool {
    matches!(&s.summary.end, SegmentEnd::Corrupt { lsn, .. } if *lsn < s.summary.segment_start)
}

impl SegmentUpload {
    /// Whether the caller reads and writes the segment's next block itself: asked before each
    /// block after the first (which the caller read before the upload began), by a caller that
    /// hands the segment in blocks of [`codec::BLOCK_LEN`] and so shares them with a tail thread
    /// (started by the first call, when there is a second CPU). False once the caller has met
    /// the blocks the tail thread took, which [`Self::finish_input`] puts after the caller's.
    pub fn claim_next(&mut self) -> bool {
        let UploadMode::Streamed { source, tail, .. } = &mut self.mode else {
            return true;
        };
        if let Some((source, len)) = source.take() {
            *tail = TailEncode::start(source, len);
        }
        tail.as_ref().is_none_or(|t| t.claim_front())
    }

    /// Waits for the tail thread (blocking) and puts its blocks after the caller's: to call
    /// once the caller's reads stopped (a false [`Self::claim_next`] or the end of the file).
    /// The number of bytes the tail thread read, to check the segment's length with; an error
    /// reading them.
    pub fn finish_input(&mut self) -> std::io::Result<u64> {
        let UploadMode::Streamed {
            frame, file, tail, ..
        } = &mut self.mode
        else {
            return Ok(0);
        };
        let Some(pending) = tail.take() else {
            return Ok(0);
        };
        let mut blocks = pending.join()?;
        let read = blocks.raw_len();
        for run in blocks.in_order() {
            match file {
                Some(file) => file.join(frame, &run),
                None => frame.join(&run),
            }
        }
        Ok(read)
    }

    fn tail_pending(&self) -> bool {
        matches!(&self.mode, UploadMode::Streamed { tail: Some(_), .. })
    }

    /// The next bytes of the segment (any size; archive-push uses [`codec::BLOCK_LEN`]).
    pub fn write(&mut self, piece: &[u8]) {
        match &mut self.mode {
            UploadMode::Streamed {
                frame,
                file: Some(file),
                ..
            } => file.write(frame, piece),
            UploadMode::Streamed { frame, .. } => frame.write(piece),
            UploadMode::Whole(content) => content.extend_from_slice(piece),
        }
    }
}

impl Repository {
    /// Starts storing segment `name` of `len` bytes whose first bytes are `first` (at least its
    /// long page header, checked by the caller; hand them to `write` too). `source` is the
    /// same segment, read by the summary's thread and, if the caller claims blocks, the
    /// tail's. Takes the previous segment's carry from `prev`, reading it first when the
    /// caller does not have it (see [`Self::store_wal_file`]).
    pub async fn segment_upload(
        &self,
        name: &WalFileName,
        first: &[u8],
        len: u64,
        source: std::sync::Arc<dyn SegmentSource>,
        prev: PrevCarry,
    ) -> SegmentUpload {
        if !self.objects.writes_lz4_blocks() {
            return SegmentUpload {
                name: name.clone(),
                mode: UploadMode::Whole(Vec::with_capacity(len as usize)),
                prev,
            };
        }
        let prev = resolve_carry(self, name, first, prev).await;
        let n = name.clone();
        let input = SourceReader {
            source: source.clone(),
            pos: 0,
        };
        let summary = tokio::task::spawn_blocking(move || summarize_input(&n, input, len, prev));
        let (frame, file) = match self.streamed_file(name).await {
            Some(file) => (BlockWriter::streamed(), Some(file)),
            None => (BlockWriter::aligned(FRAME_HEADER_LEN, len as usize), None),
        };
        SegmentUpload {
            name: name.clone(),
            mode: UploadMode::Streamed {
                frame,
                summary,
                file,
                source: Some((source, len)),
                tail: None,
            },
            prev: PrevCarry::Lookup,
        }
    }

    /// The temporary file of segment `name`'s object where the storage writes objects as they
    /// are made. One that cannot be created falls back to the object gathered in memory (the
    /// put reports the error, if it persists).
    async fn streamed_file(&self, name: &WalFileName) -> Option<Box<FileUpload>> {
        let storage = self.storage.clone();
        let key = layout::wal_key(name);
        let up = tokio::task::spawn_blocking(move || storage.upload(&key))
            .await
            .expect("upload task panicked")?;
        match up {
            Ok(up) => Some(Box::new(FileUpload::start(up))),
            Err(e) => {
                tracing::debug!(error = %e, "cannot create the object's file; writing it at the end");
                None
            }
        }
    }

    /// Stores what `up` was given: the segment (durable on return) and its summary, in
    /// `order`, as [`Self::store_wal_file_with`] does; also the carry for the next segment.
    pub async fn store_segment_upload(
        &self,
        mut up: SegmentUpload,
        order: SummaryOrder,
    ) -> Result<(UploadOutcome, Option<SegmentTail>), RepoError> {
        if up.tail_pending() {
            // The caller did not join the tail: the object would lack it.
            let key = layout::wal_key(&up.name);
            let (back, joined) = tokio::task::spawn_blocking(move || {
                let r = up.finish_input();
                (up, r)
            })
            .await
            .expect("tail join panicked");
            joined.map_err(|e| StorageError::Permanent {
                op: "read",
                key,
                message: format!("the segment's tail: {e}"),
            })?;
            up = back;
        }
        let (frame, summary, file) = match up.mode {
            UploadMode::Whole(content) => {
                let s = self
                    .store_wal_file_with(&up.name, Bytes::from(content), up.prev, order)
                    .await?;
                return Ok((UploadOutcome::Done(s.outcome), s.next_carry));
            }
            UploadMode::Streamed {
                frame,
                summary,
                file,
                ..
            } => (frame, summary, file),
        };
        let key = layout::wal_key(&up.name);
        let put_segment = async {
            let put = match file {
                Some(file) => {
                    let sums = frame.sums();
                    tokio::task::spawn_blocking(move || file.finish(sums))
                        .await
                        .expect("upload task panicked")
                }
                None => {
                    let framed = codec::frame_blocks(frame.finish());
                    self.storage.put_if_absent(&key, framed).await
                }
            };
            match put {
                Ok(()) => Ok(true),
                Err(StorageError::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(RepoError::from(e)),
            }
        };
        let put_summary = |run: Option<SummaryRun>| async move {
            if let Some((summarized, carried, elapsed)) = &run {
                self.store_summary(&up.name, summarized, *carried, *elapsed)
                    .await?;
            }
            Ok::<_, RepoError>(run)
        };
        let summary = async { summary.await.expect("summary task panicked") };
        let (stored, run) = match order {
            SummaryOrder::AfterSegment => {
                let (stored, run) = tokio::join!(put_segment, summary);
                if !stored? {
                    return Ok((UploadOutcome::NeedsContent, None));
                }
                (true, put_summary(run).await?)
            }
            SummaryOrder::Parallel => {
                let (stored, run) =
                    tokio::join!(put_segment, async { put_summary(summary.await).await });
                (stored?, run?)
            }
        };
        if !stored {
            // The summary written beside it is kept (Kept) or identical: same segment name,
            // and the caller compares the content.
            return Ok((UploadOutcome::NeedsContent, None));
        }
        let next = run.and_then(|(s, _, _)| next_carry(&s));
        Ok((UploadOutcome::Done(PutOutcome::Stored), next))
    }
}

/// A WAL file found for recovery (archive-get), to be written out with
/// [`RecoveryWal::write_to`]: a stored object is decoded as it is written, block by block for
/// `lz4-blocks`, so that no segment-sized buffer is needed.
pub struct RecoveryWal(Found);

enum Found {
    Object {
        key: String,
        stored: Bytes,
        objects: ObjectCodec,
    },
    Content(Vec<u8>),
}

/// Why [`RecoveryWal::write_to`] failed.
#[derive(Debug)]
pub enum WriteWalError {
    /// The object is damaged: nothing written may be used.
    Repo(RepoError),
    Write(std::io::Error),
}

impl RecoveryWal {
    /// Checks the object's header and payload checksum: storage damage is found here, before
    /// anything is written (the content checksum is checked by `write_to`, at the end).
    pub fn check(&self) -> Result<(), RepoError> {
        let Found::Object { key, stored, .. } = &self.0 else {
            return Ok(());
        };
        codec::peek_header(stored)
            .and_then(|h| codec::checked_payload(&h, stored).map(|_| ()))
            .map_err(|source| RepoError::Corrupt {
                key: key.clone(),
                source,
            })
    }

    /// Writes the content to `w`; its length. On error, what was written must be discarded.
    pub fn write_to(&self, w: &mut impl std::io::Write) -> Result<u64, WriteWalError> {
        let (key, stored, objects) = match &self.0 {
            Found::Content(c) => {
                w.write_all(c).map_err(WriteWalError::Write)?;
                return Ok(c.len() as u64);
            }
            Found::Object {
                key,
                stored,
                objects,
            } => (key, stored, objects),
        };
        let corrupt = |source| {
            WriteWalError::Repo(RepoError::Corrupt {
                key: key.clone(),
                source,
            })
        };
        if objects.data_key.is_some() {
            // Sealed as one piece: opened and decompressed whole (docs/encryption.md).
            let content = objects.decode(key, stored).map_err(WriteWalError::Repo)?;
            w.write_all(&content).map_err(WriteWalError::Write)?;
            return Ok(content.len() as u64);
        }
        codec::decode_to(stored, |piece| w.write_all(piece).map_err(Step::Write)).map_err(|e| {
            match e {
                Step::Codec(c) => corrupt(c),
                Step::Write(e) => WriteWalError::Write(e),
            }
        })
    }
}

enum Step {
    Codec(CodecError),
    Write(std::io::Error),
}

impl From<CodecError> for Step {
    fn from(e: CodecError) -> Step {
        Step::Codec(e)
    }
}

impl Repository {
    /// [`Self::wal_file_for_recovery`], with a stored object left encoded until it is written
    /// out (see [`RecoveryWal`]).
    pub async fn wal_for_recovery_streamed(
        &self,
        name: &WalFileName,
    ) -> Result<Option<RecoveryWal>, RepoError> {
        let key = layout::wal_key(name);
        match self.storage.get(&key).await {
            Ok(stored) if may_be_chunked_segment(name, &stored) => {
                // Small enough to be a chunked segment (docs/repository-format.md): decoded
                // whole, so that one naming its chunks is resolved instead of served as WAL.
                let content = self.objects.decode(&key, &stored)?;
                let content = self.resolve_chunked(name, content).await?;
                return Ok(Some(RecoveryWal(Found::Content(content))));
            }
            Ok(stored) => {
                return Ok(Some(RecoveryWal(Found::Object {
                    key,
                    stored,
                    objects: self.objects.clone(),
                })))
            }
            Err(StorageError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(self.wal_file_for_recovery(name).await?.map(|found| {
            RecoveryWal(Found::Content(match found {
                WalForRecovery::Stored(c) | WalForRecovery::FromChunks(c) => c,
            }))
        }))
    }
}

impl Repository {
    /// The history files of timelines `tlis`, parsed. A timeline whose history file is absent
    /// is left out (the planner reports what it cannot follow); one that is damaged or does not
    /// parse is an error, because guessing a timeline's ancestry could replay the wrong WAL.
    pub async fn histories(&self, tlis: &[TimelineId]) -> Result<Histories, RepoError> {
        let read = |tli: TimelineId| async move {
            let name = WalFileName::History { tli };
            let Some(raw) = self.get_wal_file(&name).await? else {
                return Ok(None);
            };
            let entries = parse_history(&raw).map_err(|e| RepoError::BadHistory {
                name: name.to_string(),
                message: e.to_string(),
            })?;
            Ok::<_, RepoError>(Some((tli, entries)))
        };
        let read: Vec<Option<_>> = futures::stream::iter(tlis.iter().copied())
            .map(read)
            .buffer_unordered(super::SMALL_READS_IN_FLIGHT)
            .try_collect()
            .await?;
        Ok(read.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::repo::{ClusterIdentity, WriteOptions};
    use crate::storage::Storage;
    use crate::wal::testdata::{segments, SEG_SIZE};

    async fn repo() -> Repository {
        repo_with(Codec::Lz4).await
    }

    async fn repo_with(codec: Codec) -> Repository {
        let write = WriteOptions {
            codec,
            ..WriteOptions::default()
        };
        repo_on(Storage::in_memory(), write).await
    }

    async fn repo_on(storage: Storage, write: WriteOptions) -> Repository {
        let cluster = ClusterIdentity {
            system_identifier: 7_000_000_000_000_000_001,
            pg_major: 15,
            wal_segment_size: SEG_SIZE,
        };
        Repository::open_for_cluster(storage, &cluster, "test", write)
            .await
            .unwrap()
    }

    /// Segment and summary written at once with the carry handed in (archive-push's local
    /// cache) store the very objects the ordinary order stores, streamed (lz4) and gathered
    /// (zstd). Each summary is deleted once compared, so the next carry can only come from the
    /// caller.
    #[tokio::test]
    async fn parallel_order_with_a_known_carry_stores_the_same_objects() {
        for codec in [Codec::Lz4, Codec::Zstd] {
            let (ordinary, cached) = (repo_with(codec).await, repo_with(codec).await);
            let mut prev = PrevCarry::Lookup;
            let mut carried = 0;
            for (segno, seg) in segments() {
                let name = WalFileName::segment(1, segno, SEG_SIZE);
                ordinary.store_wal_file(&name, &seg).await.unwrap();
                let input = std::sync::Arc::new(seg.clone());
                let len = seg.len() as u64;
                let mut up = cached
                    .segment_upload(&name, &seg[..4096], len, input, prev)
                    .await;
                write_unclaimed(&mut up, &seg, 100_000);
                let (outcome, next) = cached
                    .store_segment_upload(up, SummaryOrder::Parallel)
                    .await
                    .unwrap();
                assert!(matches!(outcome, UploadOutcome::Done(PutOutcome::Stored)));
                assert_eq!(cached.get_wal_file(&name).await.unwrap().unwrap(), seg);
                let expected = ordinary.segment_summary(&name).await.unwrap().unwrap();
                let got = cached.segment_summary(&name).await.unwrap().unwrap();
                assert_eq!(got, expected, "{codec:?} {name}");
                assert_eq!(next, expected.tail());
                carried += usize::from(expected.summary.skipped_continuation.is_none());
                let key = layout::wal_summary_key(&name);
                cached.storage.delete(&key).await.unwrap();
                prev = PrevCarry::Known(name, next);
            }
            assert!(carried > 1, "the fixtures have a record across a boundary");
        }
    }

    /// Hands `up` the whole segment in pieces of `piece`, claiming nothing (no tail thread).
    fn write_unclaimed(up: &mut SegmentUpload, seg: &[u8], piece: usize) {
        for p in seg.chunks(piece) {
            up.write(p);
        }
    }

    /// Hands `up` the segment as archive-push does: block by block, claiming each block after
    /// the first, until the end or the tail thread's blocks; the bytes handed.
    fn write_claimed(up: &mut SegmentUpload, seg: &[u8]) -> u64 {
        let mut written = 0;
        for block in seg.chunks(codec::BLOCK_LEN) {
            up.write(block);
            written += block.len() as u64;
            if !up.claim_next() {
                break;
            }
        }
        written
    }

    /// With a second CPU a tail thread takes blocks from the back (as many as it gets to
    /// before the caller meets them); the object is byte for byte the one a single thread
    /// makes, gathered or streamed to a local file, whether the caller joins the tail or the
    /// store does. Repeated, since the split depends on timing.
    #[tokio::test]
    async fn blocks_shared_with_a_tail_thread_make_the_same_object() {
        let (segno, seg) = segments().into_iter().next().unwrap();
        let name = WalFileName::segment(1, segno, SEG_SIZE);
        let len = seg.len() as u64;
        let expected = {
            let mut w = BlockWriter::aligned(FRAME_HEADER_LEN, seg.len());
            w.write(&seg);
            codec::frame_blocks(w.finish())
        };
        let dir = tempfile::tempdir().unwrap();
        let mut tails = 0;
        for round in 0..12 {
            let repo = match round % 2 {
                0 => repo().await,
                _ => local_repo(&dir.path().join(round.to_string())).await,
            };
            let input = std::sync::Arc::new(seg.clone());
            let mut up = repo
                .segment_upload(&name, &seg[..4096], len, input, PrevCarry::Lookup)
                .await;
            let mine = write_claimed(&mut up, &seg);
            if round % 3 != 2 {
                let theirs = up.finish_input().unwrap();
                assert_eq!(mine + theirs, len, "round {round}");
                tails += u32::from(theirs > 0);
            }
            repo.store_segment_upload(up, SummaryOrder::AfterSegment)
                .await
                .unwrap();
            let stored = repo.storage.get(&layout::wal_key(&name)).await.unwrap();
            assert_eq!(stored, expected, "round {round}");
            assert_eq!(repo.get_wal_file(&name).await.unwrap().unwrap(), seg);
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 {
            assert_eq!(tails, 0, "no tail thread on one CPU");
        }
    }

    async fn upload(repo: &Repository, name: &WalFileName, seg: &[u8]) -> UploadOutcome {
        upload_in(repo, name, seg, 100_000).await
    }

    /// [`upload`] in pieces of `piece` bytes.
    async fn upload_in(
        repo: &Repository,
        name: &WalFileName,
        seg: &[u8],
        piece: usize,
    ) -> UploadOutcome {
        let first = &seg[..4096];
        let input = std::sync::Arc::new(seg.to_vec());
        let mut up = repo
            .segment_upload(name, first, seg.len() as u64, input, PrevCarry::Lookup)
            .await;
        write_unclaimed(&mut up, seg, piece);
        assert_eq!(up.finish_input().unwrap(), 0, "nothing claimed, no tail");
        repo.store_segment_upload(up, SummaryOrder::AfterSegment)
            .await
            .unwrap()
            .0
    }

    /// A streamed segment is stored as `lz4-blocks`, reads back the same, and gets the very
    /// summary the whole-segment path writes, with the carry across segment boundaries (the
    /// fixtures have a record crossing from 07 into 08) and without it.
    #[tokio::test]
    async fn streamed_segments_store_the_same_content_and_summaries() {
        let (whole, streamed, alone) = (repo().await, repo().await, repo().await);
        for (i, (segno, seg)) in segments().into_iter().enumerate() {
            let name = WalFileName::segment(1, segno, SEG_SIZE);
            whole.store_wal_file(&name, &seg).await.unwrap();
            assert!(matches!(
                upload(&streamed, &name, &seg).await,
                UploadOutcome::Done(PutOutcome::Stored)
            ));
            let key = layout::wal_key(&name);
            let stored = streamed.storage.get(&key).await.unwrap();
            assert_eq!(codec::peek_header(&stored).unwrap().codec, Codec::Lz4Blocks);
            assert_eq!(streamed.get_wal_file(&name).await.unwrap().unwrap(), seg);
            let expected = whole.segment_summary(&name).await.unwrap();
            assert!(expected.is_some());
            assert_eq!(
                streamed.segment_summary(&name).await.unwrap(),
                expected,
                "{name}"
            );
            // Without the previous segment's summary: summarized alone, as the whole path does.
            if i == 1 {
                let single = repo().await;
                single.store_wal_file(&name, &seg).await.unwrap();
                upload(&alone, &name, &seg).await;
                assert_eq!(
                    alone.segment_summary(&name).await.unwrap(),
                    single.segment_summary(&name).await.unwrap()
                );
                assert_ne!(alone.segment_summary(&name).await.unwrap(), expected);
            }
            // A retry finds the object stored: the caller must compare the whole content.
            assert!(matches!(
                upload(&streamed, &name, &seg).await,
                UploadOutcome::NeedsContent
            ));
        }
    }

    /// On a local directory each block goes to the object's temporary file as it is made: the
    /// object is byte for byte the one gathered in memory, for pieces of less than a block and
    /// of several blocks; no temporary file is left beside it, a retry finds it stored, and an upload
    /// dropped before it is stored leaves nothing.
    #[tokio::test]
    async fn streamed_to_a_local_file_stores_the_same_bytes() {
        for piece in [100_000, 700_000, 1 << 20] {
            let dir = tempfile::tempdir().unwrap();
            let local = local_repo(dir.path()).await;
            let memory = repo().await;
            for (segno, seg) in segments() {
                let name = WalFileName::segment(1, segno, SEG_SIZE);
                upload_in(&memory, &name, &seg, piece).await;
                assert!(matches!(
                    upload_in(&local, &name, &seg, piece).await,
                    UploadOutcome::Done(PutOutcome::Stored)
                ));
                let key = layout::wal_key(&name);
                let (a, b) = (
                    local.storage.get(&key).await,
                    memory.storage.get(&key).await,
                );
                assert_eq!(a.unwrap(), b.unwrap(), "{name}, pieces of {piece}");
                assert_eq!(local.get_wal_file(&name).await.unwrap().unwrap(), seg);
                assert!(matches!(
                    upload(&local, &name, &seg).await,
                    UploadOutcome::NeedsContent
                ));
            }
            assert_no_temporary_files(dir.path());
        }
    }

    async fn local_repo(dir: &std::path::Path) -> Repository {
        let loc = crate::storage::Location::Local(dir.to_path_buf());
        let storage = Storage::open(&loc, std::time::Duration::ZERO).unwrap();
        repo_on(storage, WriteOptions::default()).await
    }

    fn assert_no_temporary_files(root: &std::path::Path) {
        let mut stray = Vec::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                if p.is_dir() {
                    dirs.push(p);
                } else if n.starts_with('.') {
                    stray.push(p);
                }
            }
        }
        assert!(stray.is_empty(), "temporary files left: {stray:?}");
    }

    #[tokio::test]
    async fn a_local_upload_dropped_half_way_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let local = local_repo(dir.path()).await;
        // Dropped half-written: neither the object nor its temporary file stays.
        let (segno, seg) = segments().into_iter().last().unwrap();
        let name = WalFileName::segment(1, segno + 1, SEG_SIZE);
        let input = std::sync::Arc::new(seg.clone());
        let mut up = local
            .segment_upload(
                &name,
                &seg[..4096],
                seg.len() as u64,
                input,
                PrevCarry::Lookup,
            )
            .await;
        up.write(&seg[..seg.len() / 2]);
        drop(up);
        assert!(local.get_wal_file(&name).await.unwrap().is_none());
        assert_no_temporary_files(dir.path());
    }
}

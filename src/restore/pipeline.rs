//! Reading and writing an archive on two threads. A profile of a one-thread restore (pgbench
//! scale 30) showed that thread busy all the time: ~60 % of it in the kernel (copying into
//! the page cache, creating files), ~25 % decoding parts and summing CRC-32Cs. So one thread
//! decodes each part and reads its tar stream, checking every file against the manifest as
//! before, and records what the sink must do; a second thread replays that into the sink, which
//! writes the files, while the first decodes the next part. Every check stays where it was: the
//! object checksum when a part is decoded, the manifest's size and CRC-32C when a file ends
//! (the sink still gets the verdict with the file's end and refuses a mismatch).
//!
//! Memory: the reader holds the part it decodes, the writer the one it writes, and the hand-off
//! is a rendezvous (no queue), so two decoded parts at most, [`DECODED_MAX`] in all; their two
//! buffers are reused for every part (no zeroing, no fresh pages to fault in: 4 % of the
//! one-thread profile). Backups of older pitr have 16 MiB parts: for those the reader waits for
//! the writer before decoding the next, so one part is in memory, as before.

use std::convert::Infallible;
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::error::RestoreError;
use crate::format::archive_check::{
    ArchiveReader, ArchiveSink, FeedError, FileSum, ManifestCheck, Mismatch,
};
use crate::format::tar::TarHeader;
use crate::repo::{BackupArchive, FetchedPart};
use crate::storage::BufferPool;

/// What the writer thread needs, moved to it for each archive and back.
pub(super) struct Extraction<S> {
    pub check: ManifestCheck,
    pub writer: S,
    pub buffers: Buffers,
}

/// The buffers of one restore, moved from archive to archive with the [`Extraction`] (a chain
/// restore reads the archives of every member): allocated once per restore, not per archive.
/// Each archive's own, allocated and freed on that archive's threads, stayed resident in
/// glibc's per-thread arenas: a chain restore of three members at pgbench scale 300 peaked at
/// 61-72 MiB (55 with one arena), a full restore at 40.
#[derive(Default)]
pub(super) struct Buffers {
    /// Decoded parts' content (two once an archive has run).
    pub decoded: Vec<Vec<u8>>,
    /// Fetched parts' stored bytes.
    pub fetched: Arc<BufferPool>,
}

/// Decoded content in memory at once: two parts of 8 MiB, the size pitr cuts.
const DECODED_MAX: usize = 16 << 20;

/// One call of the sink, recorded by the reader.
enum Event {
    Entry(TarHeader),
    /// Bytes of the current file: a range of the part's content.
    Data(Range<usize>),
    /// The same, for bytes the tar reader did not take from the part's content (it does not
    /// do that today; copied rather than assumed).
    Copied(Vec<u8>),
    FileEnd(FileSum, Result<(), Mismatch>),
}

/// A decoded part and what its tar stream asks of the sink, in order.
struct Batch {
    content: Vec<u8>,
    events: Vec<Event>,
}

/// The reader's sink: records calls instead of making them.
struct Recorder<'a> {
    content: &'a [u8],
    events: Vec<Event>,
}

impl ArchiveSink for Recorder<'_> {
    type Error = Infallible;

    fn entry(&mut self, h: &TarHeader) -> Result<(), Infallible> {
        self.events.push(Event::Entry(h.clone()));
        Ok(())
    }

    fn data(&mut self, d: &[u8]) -> Result<(), Infallible> {
        // The tar reader hands out sub-slices of what it is fed: their address says where.
        let start = (d.as_ptr() as usize).wrapping_sub(self.content.as_ptr() as usize);
        let event = match start.checked_add(d.len()) {
            Some(end) if end <= self.content.len() => Event::Data(start..end),
            _ => Event::Copied(d.to_vec()),
        };
        self.events.push(event);
        Ok(())
    }

    fn file_end(&mut self, f: &FileSum, verdict: Result<(), Mismatch>) -> Result<(), Infallible> {
        self.events.push(Event::FileEnd(f.clone(), verdict));
        Ok(())
    }
}

/// Decodes and reads the parts received on `rx` on one blocking thread and writes them through
/// the extraction's sink on another; returns the extraction once the archive is written.
pub(super) fn spawn<S>(
    archive: &BackupArchive,
    ex: Extraction<S>,
    mut rx: mpsc::Receiver<FetchedPart>,
) -> tokio::task::JoinHandle<Result<Extraction<S>, RestoreError>>
where
    S: ArchiveSink<Error = RestoreError> + Send + 'static,
{
    // Fetched parts' buffers go back to the restore's pool once decoded.
    let pool = ex.buffers.fetched.clone();
    let name = archive.name.clone();
    let reader = ArchiveReader::new(archive.tablespace_oid);
    tokio::task::spawn_blocking(move || {
        let next = |out: &mut Vec<u8>| {
            rx.blocking_recv().map(|part| {
                let decoded = part.decode_into(out);
                part.recycle(&pool);
                Ok(decoded?)
            })
        };
        run(next, reader, ex, &name, DECODED_MAX)
    })
}

/// Reads the parts `next` decodes (into the buffer it is given) on this thread and writes them
/// through the sink on another, with at most `budget` bytes of decoded content at once (or one
/// part, when a part is larger).
fn run<S>(
    next: impl FnMut(&mut Vec<u8>) -> Option<Result<(), RestoreError>>,
    reader: ArchiveReader,
    ex: Extraction<S>,
    name: &str,
    budget: usize,
) -> Result<Extraction<S>, RestoreError>
where
    S: ArchiveSink<Error = RestoreError> + Send,
{
    let Extraction {
        check,
        writer,
        mut buffers,
    } = ex;
    let (tx, batches) = sync_channel::<Batch>(0);
    // Written parts' buffers go back to the reader, which decodes into them again: the same
    // two buffers serve the whole restore, without being zeroed or faulted in anew.
    let (back, spare) = sync_channel::<Vec<u8>>(2);
    buffers.decoded.truncate(2);
    std::thread::scope(|s| {
        let writing = s.spawn(move || replay(batches, writer, back));
        let send = move |b| tx.send(b).is_ok();
        let seeds = &mut buffers.decoded;
        let read = read_parts(next, &spare, seeds, reader, check, name, budget, send);
        let written = writing.join().expect("restore writer panicked");
        // The writer is behind the reader: its error (which also stops the reader) came first.
        let writer = written?;
        let check = read?;
        buffers.decoded.extend(spare.try_iter());
        Ok(Extraction {
            check,
            writer,
            buffers,
        })
    })
}

/// The reading side: checks the files of each part, hands the batch on. Stops quietly when
/// `send` says the writer has stopped: its error is the one reported. Decodes into the buffers
/// the writer gives back, else into `seeds` (a previous archive's), else new ones; a buffer it
/// took for a part that did not come goes to `seeds`.
#[allow(clippy::too_many_arguments)]
fn read_parts(
    mut next: impl FnMut(&mut Vec<u8>) -> Option<Result<(), RestoreError>>,
    spare: &Receiver<Vec<u8>>,
    seeds: &mut Vec<Vec<u8>>,
    mut reader: ArchiveReader,
    mut check: ManifestCheck,
    name: &str,
    budget: usize,
    mut send: impl FnMut(Batch) -> bool,
) -> Result<ManifestCheck, RestoreError> {
    let tar_error = |source| RestoreError::Tar {
        archive: name.to_string(),
        source,
    };
    let mut last_len = 0;
    loop {
        // Parts larger than half the budget (16 MiB parts of older pitr) are decoded only once
        // the writer is done with the one before: read and write take turns, as on one thread.
        let mut content = match 2 * last_len > budget {
            true => spare.recv().ok(),
            false => spare.try_recv().ok().or_else(|| seeds.pop()),
        }
        .unwrap_or_default();
        match next(&mut content) {
            Some(decoded) => decoded?,
            None => {
                seeds.push(content);
                reader.finish().map_err(tar_error)?;
                return Ok(check);
            }
        }
        let mut rec = Recorder {
            content: &content,
            events: vec![],
        };
        reader
            .feed(&content, &mut check, &mut rec)
            .map_err(|e| match e {
                FeedError::Tar(source) => tar_error(source),
                FeedError::Sink(never) => match never {},
            })?;
        let events = rec.events;
        last_len = content.len();
        if !send(Batch { content, events }) {
            return Ok(check);
        }
    }
}

/// The writing side: makes the recorded calls, in order. Returning (on an error) drops the
/// receiver, which stops the reader.
fn replay<S>(
    batches: Receiver<Batch>,
    mut sink: S,
    back: SyncSender<Vec<u8>>,
) -> Result<S, RestoreError>
where
    S: ArchiveSink<Error = RestoreError>,
{
    for Batch { content, events } in batches {
        for event in events {
            match event {
                Event::Entry(h) => sink.entry(&h)?,
                Event::Data(range) => sink.data(&content[range])?,
                Event::Copied(bytes) => sink.data(&bytes)?,
                Event::FileEnd(f, verdict) => sink.file_end(&f, verdict)?,
            }
        }
        // Full (or the reader gone): the buffer is simply freed.
        let _ = back.try_send(content);
    }
    Ok(sink)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::format::archive_check::Manifest;
    use crate::format::manifest::ManifestFile;
    use crate::format::tar::build::{file, header, END};
    use crate::format::tar::TarError;

    /// Every call, as the sink saw it.
    #[derive(Default)]
    struct Calls {
        log: Vec<String>,
        data: Vec<u8>,
        /// Refuse the file with this path when it ends.
        refuse: Option<String>,
        /// Take a while over each write, as a disk does.
        slow: bool,
    }

    impl ArchiveSink for Calls {
        type Error = RestoreError;

        fn entry(&mut self, h: &TarHeader) -> Result<(), RestoreError> {
            self.log.push(format!("entry {}", h.path));
            Ok(())
        }

        fn data(&mut self, d: &[u8]) -> Result<(), RestoreError> {
            if self.slow {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            self.data.extend_from_slice(d);
            Ok(())
        }

        fn file_end(&mut self, f: &FileSum, v: Result<(), Mismatch>) -> Result<(), RestoreError> {
            self.log
                .push(format!("end {} {} {:?}", f.path, f.size, v.is_ok()));
            match &self.refuse {
                Some(p) if *p == f.path => Err(RestoreError::UnsafePath { path: p.clone() }),
                _ => Ok(()),
            }
        }
    }

    /// An archive of `n` files of 3000 bytes each, file `i` filled with byte `i`, and its
    /// manifest, which has file 1 wrong.
    fn archive(n: u8) -> (Vec<u8>, Manifest) {
        let mut a = header("base", b'5', 0).to_vec();
        let mut m = Manifest::new();
        for i in 0..n {
            let body = vec![i; 3000];
            a.extend_from_slice(&file(&format!("base/{i}"), &body));
            let crc = crc32c::crc32c(&body) ^ u32::from(i == 1);
            m.insert(
                format!("base/{i}"),
                ManifestFile {
                    size: 3000,
                    crc32c: Some(crc),
                },
            );
        }
        a.extend_from_slice(&END);
        (a, m)
    }

    /// Runs the pipeline on `a` cut into parts of `chunk` bytes, starting with the buffers
    /// `given` (what a previous archive left); counts the parts asked for and the distinct
    /// buffers they were decoded into.
    #[allow(clippy::too_many_arguments)]
    fn pipelined(
        a: &[u8],
        m: &Manifest,
        chunk: usize,
        sink: Calls,
        asked: &mut usize,
        budget: usize,
        buffers: &mut HashSet<usize>,
        given: Buffers,
    ) -> Result<Extraction<Calls>, RestoreError> {
        let mut parts = a.chunks(chunk);
        let next = |out: &mut Vec<u8>| {
            *asked += 1;
            let part = parts.next()?;
            out.clear();
            out.reserve(chunk);
            buffers.insert(out.as_ptr() as usize);
            out.extend_from_slice(part);
            Some(Ok(()))
        };
        let ex = Extraction {
            check: ManifestCheck::new(Some(m.clone())),
            writer: sink,
            buffers: given,
        };
        run(next, ArchiveReader::new(None), ex, "base.tar", budget)
    }

    fn pipelined_default(
        a: &[u8],
        m: &Manifest,
        chunk: usize,
        sink: Calls,
        asked: &mut usize,
    ) -> Result<Extraction<Calls>, RestoreError> {
        pipelined(
            a,
            m,
            chunk,
            sink,
            asked,
            DECODED_MAX,
            &mut HashSet::new(),
            Buffers::default(),
        )
    }

    #[test]
    fn the_sink_sees_what_a_direct_feed_gives_it_whatever_the_parts() {
        let (a, m) = archive(5);
        let mut direct = Calls::default();
        let mut check = ManifestCheck::new(Some(m.clone()));
        let mut reader = ArchiveReader::new(None);
        reader.feed(&a, &mut check, &mut direct).unwrap();
        reader.finish().unwrap();
        assert!(direct.log.contains(&"end base/1 3000 false".to_string()));
        for chunk in [100, 512, 700, 4096, a.len()] {
            let ex = pipelined_default(&a, &m, chunk, Calls::default(), &mut 0).unwrap();
            assert_eq!(ex.writer.log, direct.log, "parts of {chunk}");
            assert_eq!(ex.writer.data, direct.data, "parts of {chunk}");
            assert_eq!(ex.check.files(), 5);
        }
    }

    #[test]
    fn a_sink_error_stops_the_reader_and_is_the_one_reported() {
        let (a, m) = archive(40);
        let sink = Calls {
            refuse: Some("base/2".into()),
            ..Calls::default()
        };
        let mut asked = 0;
        let e = pipelined_default(&a, &m, 512, sink, &mut asked)
            .err()
            .unwrap();
        assert!(
            matches!(&e, RestoreError::UnsafePath { path } if path == "base/2"),
            "{e}"
        );
        // Two parts at most are between the reader and the writer: the reader stopped early.
        let parts = a.len().div_ceil(512);
        assert!(asked < parts / 2, "asked for {asked} of {parts} parts");
    }

    #[test]
    fn a_reader_error_is_reported_once_the_writer_is_done() {
        let (mut a, m) = archive(3);
        a.truncate(a.len() - 1024 - 512);
        let e = pipelined_default(&a, &m, 700, Calls::default(), &mut 0)
            .err()
            .unwrap();
        assert!(
            matches!(&e, RestoreError::Tar { archive, source: TarError::Truncated } if archive == "base.tar"),
            "{e}"
        );
    }

    /// [`pipelined`] into a sink that takes a while over each write (so that the reader runs
    /// ahead), with a budget of 2000 bytes.
    fn slow_run(
        a: &[u8],
        m: &Manifest,
        chunk: usize,
        seen: &mut HashSet<usize>,
        given: Buffers,
    ) -> Extraction<Calls> {
        let sink = Calls {
            slow: true,
            ..Calls::default()
        };
        pipelined(a, m, chunk, sink, &mut 0, 2000, seen, given).unwrap()
    }

    #[test]
    fn two_buffers_serve_every_part_and_one_when_parts_exceed_half_the_budget() {
        let (a, m) = archive(20);
        let (mut buffers, mut big) = (HashSet::new(), HashSet::new());
        let ex = slow_run(&a, &m, 1000, &mut buffers, Buffers::default());
        assert_eq!(ex.writer.data.len(), 20 * 3000);
        // The reader decodes the next part while the writer is busy with one.
        assert_eq!(buffers.len(), 2, "parts of half the budget");
        let ex = slow_run(&a, &m, 1001, &mut big, Buffers::default());
        assert_eq!(ex.writer.data.len(), 20 * 3000);
        assert_eq!(big.len(), 1, "parts of more than half the budget");
        // Also when the archive before left two buffers: the second is not taken.
        let (mut two, mut after) = (HashSet::new(), HashSet::new());
        let ex = slow_run(&a, &m, 1000, &mut two, Buffers::default());
        assert_eq!(ex.buffers.decoded.len(), 2);
        let ex = slow_run(&a, &m, 1001, &mut after, ex.buffers);
        assert_eq!(ex.writer.data.len(), 20 * 3000);
        assert_eq!(after.len(), 1, "big parts after an archive of small ones");
    }

    /// The next archive of the same restore (a chain restore's next member) decodes into the
    /// buffers the previous one used: no new ones per archive.
    #[test]
    fn the_next_archive_reuses_the_decode_buffers() {
        let (a, m) = archive(20);
        let (mut first, mut second) = (HashSet::new(), HashSet::new());
        let ex = slow_run(&a, &m, 1000, &mut first, Buffers::default());
        assert_eq!(ex.buffers.decoded.len(), 2, "both buffers come back");
        let left: HashSet<usize> = ex
            .buffers
            .decoded
            .iter()
            .map(|b| b.as_ptr() as usize)
            .collect();
        assert_eq!(left, first);
        let ex = slow_run(&a, &m, 1000, &mut second, ex.buffers);
        assert_eq!(ex.writer.data.len(), 20 * 3000);
        assert_eq!(second, first, "the same two buffers");
        assert_eq!(ex.buffers.decoded.len(), 2);
    }
}

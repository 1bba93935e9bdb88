//! archive-push's second compressing thread. The blocks of a segment ([`codec::BLOCK_LEN`]
//! each) are claimed from both ends: the caller's thread takes them from the front, reads,
//! compresses and writes each as it goes; this thread takes them from the back and compresses
//! them into memory, until the two meet (or it holds [`TAIL_MAX_BLOCKS`]). Its blocks are then
//! written after the caller's. Blocks are independent (no dictionary), so the object is byte for
//! byte the one a single thread makes; only the checksums are joined.
//!
//! Claiming instead of a fixed split keeps a push about as fast as one thread at worst (it
//! costs ~4 ms more CPU per 16 MiB segment): on a busy machine the tail thread takes fewer
//! blocks, and the caller's thread the rest. It runs at a
//! lower priority (nice +5) so that it takes what CPU the thread that writes leaves, instead
//! of a fair share of it: with the summary's thread, three threads want two CPUs, and at equal
//! priority the writing thread, which decides when the push ends, got 2/3 of a CPU and the push
//! finished no sooner (docs/benchmarks.md, round eight).

use std::io::Read;
use std::sync::{Arc, Mutex};

use crate::codec::{self, BlockArena};

/// Most blocks the tail thread holds (compressed) until they are written: 6 MiB of content.
pub(super) const TAIL_MAX_BLOCKS: u64 = 24;

/// How much lower the tail thread's priority is than the caller's (added to its nice value).
const TAIL_NICE: i32 = 5;

/// The segment as the summary and tail threads read it: at their own offsets (`pread` on a
/// file), independently of the caller's reads.
pub trait SegmentSource: Send + Sync + 'static {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
}

impl SegmentSource for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
}

impl SegmentSource for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let rest = self.get(offset as usize..).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        Ok(n)
    }
}

/// A [`SegmentSource`] read in order from `pos` on.
pub(super) struct SourceReader {
    pub(super) source: Arc<dyn SegmentSource>,
    pub(super) pos: u64,
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.source.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads until `buf` is full or the input ends; the number of bytes read. Shared with
/// archive-push, which reads the same segment in the same blocks.
pub(crate) fn read_full(input: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Blocks `[0, front)` are the caller's, `[back, count)` the tail thread's.
#[derive(Debug)]
struct Claims {
    front: u64,
    back: u64,
    count: u64,
}

impl Claims {
    /// The caller's next block: while it has not met the tail's blocks, and to the end of the
    /// file (past `count`, to see a file that grew) when the tail took none.
    fn front(&mut self) -> bool {
        let free = self.front < self.back || self.back == self.count;
        self.front += u64::from(free);
        free
    }

    /// The tail's next block, from the back.
    fn back(&mut self) -> Option<u64> {
        let free = self.back > self.front && self.count - self.back < TAIL_MAX_BLOCKS;
        self.back -= u64::from(free);
        free.then_some(self.back)
    }
}

/// The tail thread of one segment upload.
pub(super) struct TailEncode {
    claims: Arc<Mutex<Claims>>,
    thread: std::thread::JoinHandle<std::io::Result<BlockArena>>,
}

impl TailEncode {
    /// Starts the thread for a segment of `len` bytes whose first block the caller has taken,
    /// when there is a second CPU and a block left for it.
    pub(super) fn start(source: Arc<dyn SegmentSource>, len: u64) -> Option<TailEncode> {
        let count = len.div_ceil(codec::BLOCK_LEN as u64);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 || count < 2 {
            return None;
        }
        let claims = Arc::new(Mutex::new(Claims {
            front: 1,
            back: count,
            count,
        }));
        let theirs = claims.clone();
        let thread = std::thread::Builder::new()
            .name("pitr-tail".into())
            .spawn(move || encode_from_back(source, &theirs))
            .map_err(|e| tracing::debug!(error = %e, "no tail thread: one thread compresses all"))
            .ok()?;
        Some(TailEncode { claims, thread })
    }

    /// Whether the caller reads the next block itself (false once it met the tail's blocks).
    pub(super) fn claim_front(&self) -> bool {
        lock(&self.claims).front()
    }

    /// The tail's blocks once the thread is done; an error reading the segment.
    pub(super) fn join(self) -> std::io::Result<BlockArena> {
        // The caller met the tail's blocks or read to the end: nothing is left to claim.
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the tail thread panicked")))
    }
}

/// The tail's next block, and whether it is the segment's last.
fn claim_back(claims: &Mutex<Claims>) -> Option<(u64, bool)> {
    let mut c = lock(claims);
    let count = c.count;
    c.back().map(|k| (k, k + 1 == count))
}

fn lock(claims: &Mutex<Claims>) -> std::sync::MutexGuard<'_, Claims> {
    // The claims are two counters, consistent after every change: a panic elsewhere cannot
    // leave them half-written.
    claims.lock().unwrap_or_else(|p| p.into_inner())
}

/// The tail thread: compresses the blocks it claims, last first.
fn encode_from_back(
    source: Arc<dyn SegmentSource>,
    claims: &Mutex<Claims>,
) -> std::io::Result<BlockArena> {
    // Lowering one's own priority is always allowed; if refused, it runs at the caller's.
    let me = Some(rustix::thread::gettid());
    if let Ok(nice) = rustix::process::getpriority_process(me) {
        let _ = rustix::process::setpriority_process(me, (nice + TAIL_NICE).min(19));
    }
    let block = codec::BLOCK_LEN as u64;
    let (mut backing, start) = codec::aligned_buffer(codec::BLOCK_LEN + 1);
    let max = TAIL_MAX_BLOCKS as usize * codec::BLOCK_LEN;
    let mut made = BlockArena::new(codec::BLOCK_LEN + 1, max);
    let mut input = SourceReader { source, pos: 0 };
    while let Some((k, last)) = claim_back(claims) {
        // The last block reads one byte more: a file that grew shows as a longer content.
        let want = codec::BLOCK_LEN + usize::from(last);
        let buf = &mut backing[start..start + want];
        input.pos = k * block;
        let n = read_full(&mut input, buf)?;
        if n > 0 {
            made.add(k, &buf[..n]);
        }
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two ends never claim the same block, together they claim every block once, and the
    /// tail never holds more than its maximum, whatever the order of the claims.
    #[test]
    fn claims_from_both_ends_cover_every_block_once() {
        for count in [2, 3, 10, 64, 200] {
            for pattern in 0u32..64 {
                let mut c = Claims {
                    front: 1,
                    back: count,
                    count,
                };
                let (mut mine, mut tails) = (vec![0], vec![]);
                let mut tail_done = false;
                for step in 0.. {
                    if c.front >= count && c.back == count {
                        break; // the caller read to the end of the file
                    }
                    if tail_done || (pattern >> (step % 6)) & 1 == 1 {
                        let k = c.front;
                        if !c.front() {
                            break; // met the tail's blocks
                        }
                        mine.push(k);
                    } else if let Some(k) = c.back() {
                        tails.push(k);
                    } else {
                        tail_done = true;
                    }
                }
                let mut all: Vec<u64> = mine.iter().copied().filter(|&k| k < count).collect();
                all.extend(&tails);
                all.sort_unstable();
                assert_eq!(
                    all,
                    (0..count).collect::<Vec<_>>(),
                    "count {count}, pattern {pattern:06b}"
                );
                assert!(tails.len() as u64 <= TAIL_MAX_BLOCKS);
            }
        }
    }
}

//! The byte budget that bounds the stream's WAL memory, whatever the lag.
//!
//! Every byte of WAL the pipeline holds after the receiver (the open segment's buffer, a
//! completed segment waiting for or in upload, the copy a chunk ships) holds permits of one
//! semaphore of [`Budget::cap`] bytes, acquired by the assembler alone and released when the
//! uploader drops the job. The open segment's buffer counts at its full size from the moment it
//! is taken, because that is what it occupies once filled.
//!
//! The cap is two buffers (32 MiB at the default 16 MiB `wal_segment_size`): one filling
//! while the one before it is compressed and summarized. A buffer is
//! one segment, at most [`WINDOW`]: larger segments (PostgreSQL allows up to 1 GiB) stream
//! through a window of that size (`segment::OpenSegment::windowed`), so the cap stays 32 MiB
//! whatever the segment size.
//! It cannot deadlock: the assembler is the only acquirer, it holds at most the open segment
//! (one segment) while asking for at most one more (a chunk of that segment, or the next
//! segment's buffer), and every other permit is held by a job the uploader is bound to finish.
//!
//! A completed segment gives its buffer back as soon as it is compressed and summarized, before
//! its object is uploaded: over a distant object store the upload takes longer than filling the
//! next buffer. The objects on their way hold permits of a second semaphore, of one buffer's
//! size ([`Budget::encoded`]), taken by the upload task while it still holds the segment, in
//! job order: WAL memory is the two buffers, the compressed object of the segment being
//! summarized, and one buffer's worth of objects in upload. That cannot deadlock either: what
//! holds those permits is an upload, which needs nothing else to finish, and no job takes them
//! before every earlier job has (see `uploader::store_job`).
//!
//! Segment buffers are recycled through a small pool instead of freed: a freed 16 MiB buffer
//! would otherwise stay resident in one of the allocator's per-thread arenas while the next one
//! is allocated in another, which is how catch-up used to reach 97–129 MiB. The encoded
//! objects' buffers are recycled the same way.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::storage::BufferPool;

/// Segment buffers kept for reuse: as many as the budget can have in use at once.
const POOLED: usize = 2;

type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

/// The largest buffer: segments above it are never held whole.
pub const WINDOW: u64 = 16 << 20;

#[derive(Clone, Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    /// Bytes of encoded objects in upload whose WAL is no longer held.
    encoded: Arc<Semaphore>,
    pool: Pool,
    /// The encoded objects' buffers, for the same reason as segment buffers: as many as were
    /// in use at once.
    objects: Arc<BufferPool>,
    seg_size: usize,
    cap: usize,
}

impl Budget {
    /// The budget for segments of `seg_size` bytes: two buffers of one segment, or of
    /// [`WINDOW`] for larger segments.
    pub fn new(seg_size: u64) -> Budget {
        let seg_size = seg_size.min(WINDOW) as usize;
        let cap = 2 * seg_size;
        Budget {
            sem: Arc::new(Semaphore::new(cap)),
            encoded: Arc::new(Semaphore::new(seg_size)),
            pool: Arc::default(),
            objects: Arc::default(),
            seg_size,
            cap,
        }
    }

    /// Bytes of WAL the pipeline may hold at once.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Bytes currently held.
    pub fn in_use(&self) -> usize {
        self.cap - self.sem.available_permits()
    }

    async fn acquire(&self, n: usize) -> OwnedSemaphorePermit {
        // Never more than the cap in one request (a chunk is at most one segment).
        take(&self.sem, n, self.cap).await
    }

    /// Bytes one buffer holds: a segment, or the window of a larger one.
    pub fn buffer_size(&self) -> usize {
        self.seg_size
    }

    /// An empty buffer for a whole segment (or window), waiting until the budget has room for it.
    pub async fn segment(&self) -> SegBuf {
        let permit = self.acquire(self.seg_size).await;
        let buf = self
            .pool
            .lock()
            .expect("pool lock")
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.seg_size));
        SegBuf {
            buf,
            permit: Some(permit),
            pool: Some(self.pool.clone()),
        }
    }

    /// Permits for a copy of `n` bytes (a chunk).
    pub async fn bytes(&self, n: usize) -> OwnedSemaphorePermit {
        self.acquire(n).await
    }

    /// A spare buffer to encode a segment's object in.
    pub fn object_buffer(&self) -> Vec<u8> {
        self.objects.take()
    }

    /// Keeps a stored object's buffer for the next object (dropped if still shared).
    pub fn recycle_object(&self, framed: Bytes) {
        self.objects.give_bytes(framed);
    }

    /// Permits for `n` bytes of encoded objects in upload (at most one buffer's worth in one
    /// request): taken while the segment they were made from is still held, then kept until
    /// the upload ends, so that the segment's buffer can go back at once.
    pub async fn encoded(&self, n: usize) -> OwnedSemaphorePermit {
        take(&self.encoded, n, self.seg_size).await
    }
}

/// `n` permits of `sem`, at most `max` (its size: more could never be granted).
async fn take(sem: &Arc<Semaphore>, n: usize, max: usize) -> OwnedSemaphorePermit {
    sem.clone()
        .acquire_many_owned(n.min(max) as u32)
        .await
        .expect("the budget's semaphores are never closed")
}

/// A segment buffer that returns to its pool and releases its budget when dropped.
#[derive(Debug, Default)]
pub struct SegBuf {
    buf: Vec<u8>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Option<Pool>,
}

impl SegBuf {
    /// A buffer outside any budget (tests, and the placeholder between segments).
    pub fn unbudgeted(buf: Vec<u8>) -> SegBuf {
        SegBuf {
            buf,
            permit: None,
            pool: None,
        }
    }

    /// Whether this is a real buffer rather than the empty placeholder.
    pub fn is_budgeted(&self) -> bool {
        self.permit.is_some()
    }
}

impl AsRef<[u8]> for SegBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Deref for SegBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl DerefMut for SegBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl Drop for SegBuf {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            let mut pool = pool.lock().expect("pool lock");
            if pool.len() < POOLED {
                pool.push(buf);
            }
        }
        // The permit is released after the buffer is back in the pool.
        drop(self.permit.take());
    }
}

/// Chunk bytes with the budget they hold.
#[derive(Debug)]
pub struct ChunkData {
    pub data: Bytes,
    pub permit: Option<OwnedSemaphorePermit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_are_recycled_and_the_cap_holds() {
        let b = Budget::new(1 << 20);
        let mut s1 = b.segment().await;
        s1.extend_from_slice(&[1; 100]);
        let p1 = s1.as_ptr();
        let s2 = b.segment().await;
        assert_eq!(b.in_use(), 2 << 20);
        // A third segment waits until one is dropped.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), b.segment()).await;
        assert!(waiting.is_err());
        drop(s1);
        let s3 = b.segment().await;
        assert_eq!(s3.as_ptr(), p1, "the freed buffer is reused");
        assert!(s3.is_empty());
        drop((s2, s3));
        assert_eq!(b.in_use(), 0);
    }
}

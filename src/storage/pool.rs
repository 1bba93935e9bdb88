//! Buffers handed back after use and filled again by the next read ([`super::Storage::get_into`]):
//! a job that reads many large objects one after another (verify's segments, restore's backup
//! parts) reuses a few allocations instead of faulting in fresh memory for every object.

use std::sync::Mutex;

use bytes::Bytes;

/// A stack of spare buffers; empty ones are not kept. Holds at most what was handed back, so
/// its peak is the job's own number of objects in flight.
#[derive(Debug, Default)]
pub struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A spare buffer, or a new empty one.
    pub fn take(&self) -> Vec<u8> {
        self.lock().pop().unwrap_or_default()
    }

    /// A spare buffer for an object of `len` bytes. One over twice that is dropped rather than
    /// handed out: a buffer keeps the capacity of the largest object it held, and read-ahead
    /// budgeted by objects' sizes would otherwise hold far more (restore: parts of 0.5 and
    /// 3.2 MB, eight buffers of 3.2 MB ahead).
    pub fn take_for(&self, len: usize) -> Vec<u8> {
        match self.lock().pop() {
            Some(buf) if buf.capacity() <= 2 * len => buf,
            _ => Vec::with_capacity(len),
        }
    }

    /// Keeps `buf` for a later [`take`](Self::take).
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() > 0 {
            self.lock().push(buf);
        }
    }

    /// Keeps the buffer an object was read into ([`super::Storage::get_into`] returns it as
    /// `Bytes`), without a copy; not when something else still holds it.
    pub fn give_bytes(&self, stored: Bytes) {
        if let Ok(buf) = stored.try_into_mut() {
            self.give(buf.into());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A panic elsewhere while holding the lock leaves a valid stack of buffers.
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_no_buffer_over_twice_the_object() {
        let pool = BufferPool::default();
        pool.give(Vec::with_capacity(1 << 20));
        assert_eq!(pool.take_for(100 << 10).capacity(), 100 << 10);
        assert_eq!(pool.take().capacity(), 0, "the large buffer was dropped");
        pool.give(Vec::with_capacity(1 << 20));
        assert_eq!(pool.take_for(600 << 10).capacity(), 1 << 20);
    }

    #[test]
    fn gives_back_what_it_was_given_and_drops_empty_buffers() {
        let pool = BufferPool::default();
        pool.give(Vec::new());
        assert_eq!(pool.take().capacity(), 0);
        let buf = Vec::with_capacity(4096);
        let at = buf.as_ptr();
        pool.give(buf);
        let again = pool.take();
        assert_eq!(again.as_ptr(), at);
        assert_eq!(pool.take().capacity(), 0);
    }
}

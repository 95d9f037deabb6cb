//! 8-byte aligned byte buffers, reused through a pool: frames are read into them
//! and lent out without a copy, and they come back to the pool on `release`.
//!
//! Memory only: nothing here touches a socket or parses a frame, and a pool
//! must never keep more free buffers than its bound.

/// A byte buffer backed by `u64` words, so its start is 8-aligned.
#[derive(Debug, Default)]
pub(crate) struct AlignedBuf {
    words: Vec<u64>,
}

impl AlignedBuf {
    pub fn with_capacity(bytes: usize) -> Self {
        Self { words: vec![0; bytes.div_ceil(8)] }
    }

    pub fn capacity(&self) -> usize {
        self.words.len() * 8
    }

    /// Grows (never shrinks) to hold `bytes`, keeping the contents.
    pub fn reserve_total(&mut self, bytes: usize) {
        if self.capacity() < bytes {
            self.words.resize(bytes.div_ceil(8), 0);
        }
    }

    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.words)
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.words)
    }
}

/// Free buffers of one size class, kept up to a bound.
#[derive(Debug)]
pub struct Pool {
    free: Vec<AlignedBuf>,
    min_bytes: usize,
    keep_max: usize,
}

impl Pool {
    pub fn new(min_bytes: usize, keep_max: usize) -> Self {
        Self { free: Vec::new(), min_bytes, keep_max }
    }

    /// A buffer of at least `bytes` (allocates only when the pool is empty or too small).
    pub fn get(&mut self, bytes: usize) -> AlignedBuf {
        let mut b = self.free.pop().unwrap_or_else(|| AlignedBuf::with_capacity(self.min_bytes));
        b.reserve_total(bytes.max(self.min_bytes));
        b
    }

    pub fn put(&mut self, b: AlignedBuf) {
        if self.free.len() < self.keep_max {
            self.free.push(b);
        }
    }
}

/// A send queue: one growable aligned buffer with a head and a tail. Frames are
/// reserved at the tail and written in place, sent from the head.
#[derive(Debug, Default)]
pub struct TxQueue {
    buf: AlignedBuf,
    head: usize,
    tail: usize,
}

impl TxQueue {
    pub fn pending(&self) -> usize {
        self.tail - self.head
    }

    /// Space for `len` more bytes, compacting or growing as needed. The caller has
    /// checked the queue bound. (After a partial gathered write the queue holds a
    /// frame's tail, so later frames may start unaligned in it: senders must not
    /// rely on the alignment of what `reserve` returns.)
    pub fn reserve(&mut self, len: usize) -> &mut [u8] {
        if self.tail + len > self.buf.capacity() {
            if self.head > 0 {
                let (h, t) = (self.head, self.tail);
                self.buf.bytes_mut().copy_within(h..t, 0);
                self.tail -= h;
                self.head = 0;
            }
            // grow geometrically, from small: an unauthenticated peer's queue only
            // ever holds the 40-byte challenge
            self.buf.reserve_total((self.tail + len).next_power_of_two().max(256));
        }
        let at = self.tail;
        self.tail += len;
        &mut self.buf.bytes_mut()[at..at + len]
    }

    pub fn unsent(&self) -> &[u8] {
        &self.buf.bytes()[self.head..self.tail]
    }

    pub fn consume(&mut self, n: usize) {
        self.head += n;
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_reused() {
        let mut p = Pool::new(1024, 2);
        let b = p.get(10);
        assert_eq!(b.bytes().as_ptr() as usize % 8, 0);
        assert!(b.capacity() >= 1024);
        let ptr = b.bytes().as_ptr();
        p.put(b);
        assert_eq!(p.get(100).bytes().as_ptr(), ptr, "pooled buffer handed out again");
    }

    #[test]
    fn tx_queue_compacts_and_keeps_order() {
        let mut q = TxQueue::default();
        q.reserve(8).copy_from_slice(&[1; 8]);
        q.reserve(8).copy_from_slice(&[2; 8]);
        q.consume(8);
        let big = q.buf.capacity();
        q.reserve(big - 8).fill(3);
        assert_eq!(q.unsent()[..8], [2; 8]);
        assert_eq!(q.pending(), big);
        q.consume(q.pending());
        assert_eq!(q.pending(), 0);
    }
}

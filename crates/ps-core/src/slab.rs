//! Slabs: page-aligned anonymous memory, cut into fixed-size blocks, each guarded
//! by a version word at both ends (the seqlock of DESIGN.md §1).
//!
//! A slab is allocated once and never moves, so the RDMA transport can register it
//! once as a memory region and let workers READ blocks straight out of it while
//! the owning shard thread keeps merging into it.
//!
//! ## Block layout (`BLOCK_BYTES` = 4096)
//! ```text
//! 0      8                                     4088   4096
//! | head | data: BLOCK_FLOATS (1020) x f32      | tail |
//! ```
//! ## The write protocol (owner thread only)
//! 1. `tail := v + 1` (odd: a write is in progress)
//! 2. write the data
//! 3. `head := v + 2`, then `tail := v + 2`
//!
//! ## The read check (anyone, e.g. a remote READ of the whole block)
//! A block image is whole iff `head == tail` and both are even. If a reader reads
//! the block in ascending address order (head first, tail last: one READ, or
//! several on one RC queue pair, whose responder carries them out in the order
//! posted, as the RDMA transport does when it cuts the unwanted end of a block
//! off a pull's READ) and any data write
//! overlapped its read of the data, then either it read the old head and a tail
//! already marked odd or newer, or the new head before the new tail: in both cases
//! `head != tail`. Release fences keep the compiler (and, on weaker CPUs than x86,
//! the hardware) from moving data stores across the version stores. The RDMA issue
//! adds a test of this against a real device; [`check_block`] is the reader side.

use std::sync::atomic::{fence, Ordering};

use crate::limits::BLOCK_BYTES;

/// f32 values in one block.
pub const BLOCK_FLOATS: usize = (BLOCK_BYTES - 16) / 4;
const TAIL: usize = BLOCK_BYTES - 8;

/// A run of blocks in page-aligned memory that never moves.
#[derive(Debug)]
pub struct Slab {
    map: memmap2::MmapMut,
    blocks: usize,
}

/// A block image that failed the version check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("torn block: head version {head}, tail version {tail}")]
pub struct Torn {
    /// the version word at the block's start
    pub head: u64,
    /// the version word at the block's end (odd: a write was in progress)
    pub tail: u64,
}

impl Slab {
    /// Maps `blocks` zeroed blocks. Memory is committed lazily by the kernel.
    pub fn new(blocks: usize) -> std::io::Result<Slab> {
        let blocks = blocks.max(1);
        let map = memmap2::MmapOptions::new().len(blocks * BLOCK_BYTES).map_anon()?;
        Ok(Slab { map, blocks })
    }

    /// Number of blocks (at least 1).
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// The slab's bytes, for registering as a memory region or checkpointing.
    pub fn as_bytes(&self) -> &[u8] {
        &self.map
    }

    fn word(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.map[at..at + 8].try_into().expect("8 bytes"))
    }

    fn set_word(&mut self, at: usize, v: u64) {
        self.map[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Current version of block `b` (even when no write is in progress).
    pub fn version(&self, b: usize) -> u64 {
        self.word(b * BLOCK_BYTES)
    }

    /// The data of block `b`, for the owner thread (which never races itself).
    pub fn data(&self, b: usize) -> &[f32] {
        let at = b * BLOCK_BYTES + 8;
        bytemuck::cast_slice(&self.map[at..at + BLOCK_FLOATS * 4])
    }

    /// Runs `f` on block `b`'s data inside the write protocol.
    #[inline]
    pub fn write<R>(&mut self, b: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let base = b * BLOCK_BYTES;
        let v = self.word(base);
        debug_assert_eq!(v % 2, 0, "block {b} head version is odd: a write never finished");
        self.set_word(base + TAIL, v + 1);
        fence(Ordering::Release);
        let r = f(bytemuck::cast_slice_mut(&mut self.map[base + 8..base + TAIL]));
        fence(Ordering::Release);
        self.set_word(base, v + 2);
        fence(Ordering::Release);
        self.set_word(base + TAIL, v + 2);
        r
    }

    /// Test hook: performs only the first half of a write (tail odd, data changed),
    /// as a reader racing the writer would see it mid-way.
    #[cfg(test)]
    pub(crate) fn half_write(&mut self, b: usize, f: impl FnOnce(&mut [f32])) {
        let base = b * BLOCK_BYTES;
        let v = self.word(base);
        self.set_word(base + TAIL, v + 1);
        f(bytemuck::cast_slice_mut(&mut self.map[base + 8..base + TAIL]));
    }
}

/// Checks a block image (`BLOCK_BYTES` bytes, e.g. from a one-sided READ) and
/// returns its version and data if it is whole.
pub fn check_block(image: &[u8]) -> Result<(u64, &[u8]), Torn> {
    assert_eq!(image.len(), BLOCK_BYTES, "check_block needs one whole block image");
    let head = u64::from_le_bytes(image[..8].try_into().expect("8 bytes"));
    let tail = u64::from_le_bytes(image[TAIL..].try_into().expect("8 bytes"));
    if head == tail && head % 2 == 0 {
        Ok((head, &image[8..TAIL]))
    } else {
        Err(Torn { head, tail })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_blocks_are_whole_and_zero() {
        let s = Slab::new(3).unwrap();
        assert_eq!(s.as_bytes().len(), 3 * BLOCK_BYTES);
        assert_eq!(s.as_bytes().as_ptr() as usize % 4096, 0, "page aligned");
        for b in 0..3 {
            let (v, data) = check_block(&s.as_bytes()[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES]).unwrap();
            assert_eq!(v, 0);
            assert!(data.iter().all(|x| *x == 0));
        }
    }

    #[test]
    fn a_write_bumps_the_version_by_two_and_stays_whole() {
        let mut s = Slab::new(2).unwrap();
        s.write(1, |d| d[5] = 3.0);
        s.write(1, |d| d[5] += 1.0);
        assert_eq!(s.version(1), 4);
        assert_eq!(s.version(0), 0);
        assert_eq!(s.data(1)[5], 4.0);
        assert!(check_block(&s.as_bytes()[BLOCK_BYTES..]).is_ok());
    }

    #[test]
    fn a_half_finished_write_is_detected() {
        let mut s = Slab::new(1).unwrap();
        s.write(0, |d| d.fill(1.0));
        s.half_write(0, |d| d[..10].fill(2.0));
        let e = check_block(s.as_bytes()).unwrap_err();
        assert_eq!(e, Torn { head: 2, tail: 3 });
    }

    #[test]
    fn every_interleaving_of_a_reader_with_one_write_is_caught_or_clean() {
        // Model a reader that copies the block word by word, ascending, while a
        // writer runs the protocol step by step; the writer sets every value to the
        // new version number, so a torn image is one whose values disagree.
        const WORDS: usize = BLOCK_BYTES / 8;
        let old: Vec<u64> = {
            let mut v = vec![0u64; WORDS];
            v[0] = 2;
            v[WORDS - 1] = 2;
            v
        };
        // writer steps: 0 tail:=3, 1..=WORDS-2 data word i := 1, WORDS-1 head:=4, WORDS tail:=4
        let writer_steps = WORDS + 1;
        let mut caught = 0;
        for start in 0..=writer_steps {
            // reader reads word r after `start + r * stride` writer steps, for two strides
            for stride in [0usize, 1] {
                let mut mem = old.clone();
                let mut done = 0;
                let mut image = vec![0u64; WORDS];
                let apply = |mem: &mut Vec<u64>, done: &mut usize, upto: usize| {
                    while *done < upto.min(writer_steps) {
                        match *done {
                            0 => mem[WORDS - 1] = 3,
                            d if d < WORDS - 1 => mem[d] = 1,
                            d if d == WORDS - 1 => mem[0] = 4,
                            _ => mem[WORDS - 1] = 4,
                        }
                        *done += 1;
                    }
                };
                for (r, slot) in image.iter_mut().enumerate() {
                    apply(&mut mem, &mut done, start + r * stride);
                    *slot = mem[r];
                }
                let bytes: Vec<u8> = image.iter().flat_map(|w| w.to_le_bytes()).collect();
                match check_block(&bytes) {
                    Ok(_) => {
                        let data = &image[1..WORDS - 1];
                        assert!(data.iter().all(|w| *w == data[0]), "torn image passed the check (start {start})");
                    }
                    Err(_) => caught += 1,
                }
            }
        }
        assert!(caught > 0, "the model never produced a torn read: it tests nothing");
    }
}

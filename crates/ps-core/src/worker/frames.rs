//! One request frame of one chunk, described as the runs of bytes it is made
//! of: the header, the chunk's key runs, its value runs, the padding. The
//! same description is either written into a buffer ([`ChunkFrame::write`])
//! or handed to the transport to gather from the caller's slices with no
//! copy on this side ([`ChunkFrame::send`]), so a request frame's layout is
//! spelled out once, here. Knows nothing of owners, failover or coding.

use std::ops::Range;

use crate::keys::Key;
use crate::transport::{FrameSink, PeerId, TxError, GATHER_PARTS_MAX};
use crate::wire::{DataHeader, Kind, DATA_HEADER_BYTES};

const ZEROS: [u8; 8] = [0; 8];

/// What a chunk's frame carries after its header.
#[derive(Clone, Copy, Debug)]
pub(super) enum Payload<'a> {
    /// A dense chunk: its floats (`vals`), or nothing for a pull.
    Dense { vals: Option<&'a [f32]> },
    /// A sparse chunk: the keys of `ranges` (runs of `keys`), then their
    /// values (`dim` per key, runs of `vals`) unless it is a pull.
    Sparse { keys: &'a [Key], ranges: &'a [Range<usize>], vals: Option<&'a [f32]>, dim: usize },
}

/// A request frame of one chunk, ready to be written or gathered.
#[derive(Debug)]
pub(super) struct ChunkFrame<'a> {
    /// prefix and data header
    header: [u8; DATA_HEADER_BYTES],
    /// bytes of the whole frame, padding included
    len: usize,
    /// bytes of the header and the payload the header announces
    content: usize,
    payload: Payload<'a>,
}

impl<'a> ChunkFrame<'a> {
    /// The frame `h` announces, carrying `payload`.
    pub(super) fn new(h: &DataHeader, payload: Payload<'a>) -> Self {
        let len = h.frame_len().expect("chunk sizes are bounded");
        let content = DATA_HEADER_BYTES
            + if h.dense { 0 } else { h.a as usize * 8 }
            + if h.kind == Kind::Pull { 0 } else { h.b as usize * 4 };
        Self { header: h.encode(len), len, content, payload }
    }

    /// Bytes of the whole frame.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// How many runs [`ChunkFrame::for_each_part`] hands out.
    fn parts(&self) -> usize {
        2 + match self.payload {
            Payload::Dense { .. } => 1,
            Payload::Sparse { ranges, vals, .. } => ranges.len() * (1 + vals.is_some() as usize),
        }
    }

    /// Hands out the frame's runs of bytes, in order: concatenated they are
    /// the frame.
    fn for_each_part<'s>(&'s self, mut part: impl FnMut(&'s [u8]))
    where
        'a: 's,
    {
        part(&self.header);
        match self.payload {
            Payload::Dense { vals } => {
                if let Some(v) = vals {
                    part(bytemuck::cast_slice(v));
                }
            }
            Payload::Sparse { keys, ranges, vals, dim } => {
                for r in ranges {
                    part(bytemuck::cast_slice(&keys[r.clone()]));
                }
                if let Some(v) = vals {
                    for r in ranges {
                        part(bytemuck::cast_slice(&v[r.start * dim..r.end * dim]));
                    }
                }
            }
        }
        part(&ZEROS[..self.len - self.content]);
    }

    /// Writes the frame into `buf` (of [`ChunkFrame::len`] bytes).
    pub(super) fn write(&self, buf: &mut [u8]) {
        let mut at = 0;
        self.for_each_part(|p| {
            crate::kernels::copy_bytes(&mut buf[at..at + p.len()], p);
            at += p.len();
        });
    }

    /// Queues the frame to `peer`: gathered from its runs when they are few
    /// enough for one gathered send, else written into the send queue.
    pub(super) fn send(&self, tx: &mut dyn FrameSink, peer: PeerId) -> Result<(), TxError> {
        if self.parts() > GATHER_PARTS_MAX {
            return tx.frame(peer, self.len).map(|buf| self.write(buf));
        }
        let mut parts: [&[u8]; GATHER_PARTS_MAX] = [&[]; GATHER_PARTS_MAX];
        let mut n = 0;
        self.for_each_part(|p| {
            parts[n] = p;
            n += 1;
        });
        tx.frame_gather(peer, &parts[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimSink;
    use crate::wire::{self, Frame};

    const PEER: PeerId = PeerId { index: 3, generation: 0 };

    /// The frame of a sparse chunk of `runs` runs of 2 keys each, dim 3.
    fn sparse(kind: Kind, runs: usize, keys: &[Key], vals: &[f32]) -> (DataHeader, Vec<Range<usize>>) {
        let ranges: Vec<Range<usize>> = (0..runs).map(|r| 4 * r..4 * r + 2).collect();
        let n = runs as u64 * 2;
        let h = DataHeader { kind, dense: false, table: 0, sub: 1, ts: 9, a: n, b: n * 3 };
        assert!(keys.len() >= 4 * runs && vals.len() >= 12 * runs);
        (h, ranges)
    }

    /// Written into a buffer and sent (gathered or not), the frame is the
    /// same bytes, and a shard decodes the chunk's keys and values from it.
    fn check(h: DataHeader, payload: Payload<'_>, want_keys: &[Key], want_vals: &[f32]) {
        let frame = ChunkFrame::new(&h, payload);
        let mut written = vec![0xEE; frame.len()];
        frame.write(&mut written);
        let mut sink = SimSink::default();
        frame.send(&mut sink, PEER).unwrap();
        assert_eq!(sink.frames, vec![(PEER, written.clone())]);
        let Frame::Data { h: got, keys, vals } = wire::decode(&written, 1 << 20).unwrap() else { panic!() };
        assert_eq!(got, h);
        assert_eq!(keys, bytemuck::cast_slice::<Key, u8>(want_keys));
        assert_eq!(vals, bytemuck::cast_slice::<f32, u8>(want_vals));
    }

    #[test]
    fn a_chunk_frame_is_the_same_bytes_written_or_gathered() {
        let keys: Vec<Key> = (0..1000).map(|k| k * 11).collect();
        let vals: Vec<f32> = (0..3000).map(|v| v as f32).collect();
        // few runs (gathered) and more runs than one gathered send takes (written)
        for runs in [1, 3, GATHER_PARTS_MAX] {
            for kind in [Kind::Push, Kind::Pull] {
                let (h, ranges) = sparse(kind, runs, &keys, &vals);
                let carried = (kind != Kind::Pull).then_some(&vals[..]);
                let payload = Payload::Sparse { keys: &keys, ranges: &ranges, vals: carried, dim: 3 };
                let want_keys: Vec<Key> = ranges.iter().flat_map(|r| keys[r.clone()].to_vec()).collect();
                let want_vals: Vec<f32> = match carried {
                    Some(v) => ranges.iter().flat_map(|r| v[r.start * 3..r.end * 3].to_vec()).collect(),
                    None => Vec::new(),
                };
                check(h, payload, &want_keys, &want_vals);
            }
        }
        // dense: a run of floats (odd, so the frame is padded), or none for a pull
        let h = DataHeader { kind: Kind::Push, dense: true, table: 1, sub: 0, ts: 2, a: 30, b: 7 };
        check(h, Payload::Dense { vals: Some(&vals[..7]) }, &[], &vals[..7]);
        let h = DataHeader { kind: Kind::Pull, ..h };
        check(h, Payload::Dense { vals: None }, &[], &[]);
    }
}

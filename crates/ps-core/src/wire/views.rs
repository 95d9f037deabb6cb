//! One header type per kind: [`DataHeader`]'s `a`, `b`, `ts` and `sub` hold
//! something different for each kind (see its fields); the structs here name
//! what they hold for one kind each, so no field means two things.
//!
//! Each view is read from a [`DataHeader`] with `TryFrom`, which checks the
//! kind (another kind is [`WireError::Unexpected`]), and written back with
//! `header()`. The bytes on the wire are [`DataHeader`]'s, unchanged: a view
//! is a name for its fields, not a new layout. Fields a kind leaves at 0 are
//! not in its view, and `header()` writes them as 0.
//!
//! Answers (`Ack`, `PullResp`, `Error`) echo their request's fields, so they
//! have no view of their own here, but for the chain's acknowledgement of a
//! `Forward` ([`ForwardAck`]); the views of the kinds answered with an `Ack`
//! build theirs (`ack()`).

use super::{DataHeader, Kind, WireError};

/// A header of kind `kind` with every other field 0.
fn bare(kind: Kind) -> DataHeader {
    DataHeader { kind, dense: false, table: 0, sub: 0, ts: 0, a: 0, b: 0 }
}

/// `Err(Unexpected)` unless `h` is of one of `kinds`.
fn expect(h: &DataHeader, kinds: &[Kind]) -> Result<(), WireError> {
    if kinds.contains(&h.kind) {
        Ok(())
    } else {
        Err(WireError::Unexpected(h.kind))
    }
}

/// Where a request's values are: a range of a dense table, or the keys the
/// payload lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    /// a range of a dense table ([`super::FLAG_DENSE`]; no keys in the payload)
    Dense {
        /// the first flat float, `(key - table's first key) * dim + j` (`a`)
        first_float: u64,
    },
    /// the keys at the head of the payload
    Sparse {
        /// how many (`a`)
        keys: u64,
    },
}

/// A `Push`, `Pull` or `PushPull` (worker -> shard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// `Push`, `Pull` or `PushPull`
    pub kind: Kind,
    /// the table ([`crate::keys::TableId`])
    pub table: u32,
    /// the frame's number within its timestamp, in the order the worker sent them
    pub sub: u32,
    /// the worker's timestamp of the operation
    pub ts: u64,
    /// the range or keys it addresses (the dense flag and `a`)
    pub span: Span,
    /// f32 values in the payload (`Push`, `PushPull`), or asked for (`Pull`) (`b`)
    pub values: u64,
}

/// A `Clock` (worker -> shard): the worker finished `clocks_done` clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockHeader {
    /// the worker's timestamp of the clock
    pub ts: u64,
    /// the frame's number within its timestamp (one per shard)
    pub sub: u32,
    /// clocks the worker has finished (`a`)
    pub clocks_done: u64,
    /// the worker's rank (`b`)
    pub rank: u64,
}

/// A `Checkpoint` (worker -> shard): "write a checkpoint labelled `label`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// the worker's timestamp of the request
    pub ts: u64,
    /// the frame's number within its timestamp (one per shard)
    pub sub: u32,
    /// the checkpoint's label (`a`)
    pub label: u64,
}

/// A `Watch` (worker -> shard): "answer with a `Refresh` of `table`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchHeader {
    /// the eager table watched
    pub table: u32,
}

/// A `Refresh` (shard -> worker): fresh values of rows the worker read,
/// laid out as a sparse push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshHeader {
    /// the table
    pub table: u32,
    /// keys in the payload (`a`)
    pub keys: u64,
    /// f32 values in the payload, keys * dim (`b`)
    pub values: u64,
    /// the clock stamp the values have (`ts`; see [`super::stamp_of`])
    pub stamp: u64,
    /// the last frame of the refresh: every row the worker read from this
    /// shard is now as fresh as `stamp` (`sub` 1)
    pub last: bool,
}

/// A `Bind` (client -> the head of a chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindHeader {
    /// the client's number in the chain (`a`)
    pub origin: u64,
    /// the number the origin's next push, push-pull or clock has (`b`)
    pub next_counted: u64,
}

/// A `Forward` (a copy -> the next copy of its chain): one counted frame of
/// `origin`, carried whole as the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardHeader {
    /// the client whose frame it is (`a`)
    pub origin: u64,
    /// the inner frame's number among its origin's counted frames to this shard (`ts`)
    pub number: u64,
    /// size of the inner frame / 4 (frames are 8-aligned) (`b`)
    pub inner_words: u64,
}

/// The `Ack` of a [`ForwardHeader`] (the next copy -> the copy before it):
/// the forwarded frame is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardAck {
    /// the origin of the frame acknowledged (`a`)
    pub origin: u64,
    /// its number (`ts`)
    pub number: u64,
}

/// A chunk of a `Snapshot` (a chain's tail -> a copy being rebuilt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// where this chunk starts in the whole state, bytes (`ts`)
    pub offset: u64,
    /// size of the whole state, bytes (`a`)
    pub total: u64,
    /// size of this chunk / 4, rounded up: the last chunk's payload may end
    /// in padding, `total` tells the real size (`b`)
    pub chunk_words: u64,
    /// the last chunk (`sub` 1)
    pub last: bool,
}

impl TryFrom<DataHeader> for RequestHeader {
    type Error = WireError;
    fn try_from(h: DataHeader) -> Result<Self, WireError> {
        expect(&h, &[Kind::Push, Kind::Pull, Kind::PushPull])?;
        let span = if h.dense { Span::Dense { first_float: h.a } } else { Span::Sparse { keys: h.a } };
        Ok(RequestHeader { kind: h.kind, table: h.table, sub: h.sub, ts: h.ts, span, values: h.b })
    }
}

impl RequestHeader {
    /// The header to write.
    pub fn header(self) -> DataHeader {
        let (dense, a) = match self.span {
            Span::Dense { first_float } => (true, first_float),
            Span::Sparse { keys } => (false, keys),
        };
        DataHeader { kind: self.kind, dense, table: self.table, sub: self.sub, ts: self.ts, a, b: self.values }
    }
}

impl TryFrom<DataHeader> for ClockHeader {
    type Error = WireError;
    fn try_from(h: DataHeader) -> Result<Self, WireError> {
        expect(&h, &[Kind::Clock])?;
        Ok(ClockHeader { ts: h.ts, sub: h.sub, clocks_done: h.a, rank: h.b })
    }
}

impl ClockHeader {
    /// The header to write.
    pub fn header(self) -> DataHeader {
        DataHeader { sub: self.sub, ts: self.ts, a: self.clocks_done, b: self.rank, ..bare(Kind::Clock) }
    }

    /// The shard's `Ack` of it (`ts`, `sub` and the clocks done echoed).
    pub fn ack(self) -> DataHeader {
        DataHeader { sub: self.sub, ts: self.ts, a: self.clocks_done, ..bare(Kind::Ack) }
    }
}

impl TryFrom<DataHeader> for CheckpointHeader {
    type Error = WireError;
    fn try_from(h: DataHeader) -> Result<Self, WireError> {
        expect(&h, &[Kind::Checkpoint])?;
        Ok(CheckpointHeader { ts: h.ts, sub: h.sub, label: h.a })
    }
}

impl CheckpointHeader {
    /// The header to write.
    pub fn header(self) -> DataHeader {
        DataHeader { sub: self.sub, ts: self.ts, a: self.label, ..bare(Kind::Checkpoint) }
    }

    /// The shard's `Ack` of it, once written (`ts`, `sub` and the label echoed).
    pub fn ack(self) -> DataHeader {
        DataHeader { sub: self.sub, ts: self.ts, a: self.label, ..bare(Kind::Ack) }
    }
}

impl TryFrom<DataHeader> for WatchHeader {
    type Error = WireError;
    fn try_from(h: DataHeader) -> Result<Self, WireError> {
        expect(&h, &[Kind::Watch])?;
        Ok(WatchHeader { table: h.table })
    }
}

impl WatchHeader {
    /// The header to write.
    pub fn header(self) -> DataHeader {
        DataHeader { table: self.table, ..bare(Kind::Watch) }
    }
}

impl TryFrom<DataHeader> for RefreshHeader {
    type Error = WireError;
    fn try_from(h: DataHeader) -> Result<Self, WireError> {
        expect(&h, &[Kind::Refresh])?;
        Ok(RefreshHeader { table: h.table, keys: h.a, values: h.b, stamp: h.ts, last: h.sub == 1 })
    }
}

impl RefreshHeader {
    /// The header to write.
    pub fn header(self) -> DataHeader {
        DataHeader {
            table: self.table,
            sub: self.last as u32,
            ts: self.stamp,
            a: self.keys,
            b: self.values,
            ..bare(Kind::Refresh)
        }
    }
}

impl TryFrom<DataHeader> for BindHeader {
    type Error = WireError;
    fn try_from(h: DataHeader) -> Result<Self, WireError> {
        expect(&h, &[Kind::Bind])?;
        Ok(BindHeader { origin: h.a, next_counted: h.b })
    }
}

impl BindHeader {
    /// The header to write.
    pub fn header(self) -> DataHeader {
        DataHeader { a: self.origin, b: self.next_counted, ..bare(Kind::Bind) }
    }

    /// The head's `Ack` of it: ts 0 (what tells it from any other answer),
    /// the origin echoed.
    pub fn ack(self) -> DataHeader {
        DataHeader { a: self.origin, ..bare(Kind::Ack) }
    }
}

impl TryFrom<DataHeader> for ForwardHeader {
    type Error = WireError;
    fn try_from(h: DataHeader) -> Result<Self, WireError> {
        expect(&h, &[Kind::Forward])?;
        Ok(ForwardHeader { origin: h.a, number: h.ts, inner_words: h.b })
    }
}

impl ForwardHeader {
    /// The header to write.
    pub fn header(self) -> DataHeader {
        DataHeader { ts: self.number, a: self.origin, b: self.inner_words, ..bare(Kind::Forward) }
    }

    /// What the next copy acknowledges it with, once applied.
    pub fn ack(self) -> ForwardAck {
        ForwardAck { origin: self.origin, number: self.number }
    }
}

impl TryFrom<DataHeader> for ForwardAck {
    type Error = WireError;
    fn try_from(h: DataHeader) -> Result<Self, WireError> {
        expect(&h, &[Kind::Ack])?;
        Ok(ForwardAck { origin: h.a, number: h.ts })
    }
}

impl ForwardAck {
    /// The header to write.
    pub fn header(self) -> DataHeader {
        DataHeader { ts: self.number, a: self.origin, ..bare(Kind::Ack) }
    }
}

impl TryFrom<DataHeader> for SnapshotHeader {
    type Error = WireError;
    fn try_from(h: DataHeader) -> Result<Self, WireError> {
        expect(&h, &[Kind::Snapshot])?;
        Ok(SnapshotHeader { offset: h.ts, total: h.a, chunk_words: h.b, last: h.sub == 1 })
    }
}

impl SnapshotHeader {
    /// The header to write.
    pub fn header(self) -> DataHeader {
        DataHeader {
            sub: self.last as u32,
            ts: self.offset,
            a: self.total,
            b: self.chunk_words,
            ..bare(Kind::Snapshot)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// view -> header -> bytes -> header -> view, and the bytes are the
    /// ones the raw header (`raw`) writes.
    fn round_trip<V>(view: V, raw: DataHeader)
    where
        V: TryFrom<DataHeader, Error = WireError> + Copy + PartialEq + std::fmt::Debug,
        V: Into<DataHeader>,
    {
        let h: DataHeader = view.into();
        assert_eq!(h, raw);
        let mut f = vec![0u8; h.frame_len().unwrap()];
        h.write(&mut f);
        let mut g = vec![0u8; raw.frame_len().unwrap()];
        raw.write(&mut g);
        assert_eq!(f, g, "the same bytes on the wire");
        let back = super::super::peek_header(&f).unwrap();
        assert_eq!(back, h);
        assert_eq!(V::try_from(back), Ok(view));
        // any other kind is refused
        let other = DataHeader { kind: if h.kind == Kind::Ack { Kind::Push } else { Kind::Ack }, ..h };
        assert_eq!(V::try_from(other), Err(WireError::Unexpected(other.kind)));
    }

    macro_rules! into_header {
        ($($t:ty),*) => {$(
            impl From<$t> for DataHeader {
                fn from(v: $t) -> DataHeader {
                    v.header()
                }
            }
        )*};
    }
    into_header!(
        RequestHeader,
        ClockHeader,
        CheckpointHeader,
        WatchHeader,
        RefreshHeader,
        BindHeader,
        ForwardHeader,
        ForwardAck,
        SnapshotHeader
    );

    fn raw(kind: Kind, dense: bool, table: u32, sub: u32, ts: u64, a: u64, b: u64) -> DataHeader {
        DataHeader { kind, dense, table, sub, ts, a, b }
    }

    #[test]
    fn every_view_round_trips_through_the_wire() {
        for kind in [Kind::Push, Kind::Pull, Kind::PushPull] {
            let sparse = RequestHeader { kind, table: 3, sub: 2, ts: 9, span: Span::Sparse { keys: 4 }, values: 12 };
            round_trip(sparse, raw(kind, false, 3, 2, 9, 4, 12));
            let dense = RequestHeader { span: Span::Dense { first_float: 30 }, ..sparse };
            round_trip(dense, raw(kind, true, 3, 2, 9, 30, 12));
        }
        round_trip(ClockHeader { ts: 7, sub: 1, clocks_done: 5, rank: 2 }, raw(Kind::Clock, false, 0, 1, 7, 5, 2));
        round_trip(CheckpointHeader { ts: 9, sub: 3, label: 42 }, raw(Kind::Checkpoint, false, 0, 3, 9, 42, 0));
        round_trip(WatchHeader { table: 6 }, raw(Kind::Watch, false, 6, 0, 0, 0, 0));
        for last in [false, true] {
            let r = RefreshHeader { table: 1, keys: 2, values: 6, stamp: 4, last };
            round_trip(r, raw(Kind::Refresh, false, 1, last as u32, 4, 2, 6));
            let s = SnapshotHeader { offset: 64, total: 100, chunk_words: 9, last };
            round_trip(s, raw(Kind::Snapshot, false, 0, last as u32, 64, 100, 9));
        }
        round_trip(BindHeader { origin: 3, next_counted: 17 }, raw(Kind::Bind, false, 0, 0, 0, 3, 17));
        let fwd = ForwardHeader { origin: 3, number: 17, inner_words: 12 };
        round_trip(fwd, raw(Kind::Forward, false, 0, 0, 17, 3, 12));
        round_trip(fwd.ack(), raw(Kind::Ack, false, 0, 0, 17, 3, 0));
    }

    #[test]
    fn acks_echo_what_their_request_numbers() {
        let c = ClockHeader { ts: 7, sub: 1, clocks_done: 5, rank: 2 };
        assert_eq!(c.ack(), raw(Kind::Ack, false, 0, 1, 7, 5, 0));
        let k = CheckpointHeader { ts: 9, sub: 3, label: 42 };
        assert_eq!(k.ack(), raw(Kind::Ack, false, 0, 3, 9, 42, 0));
        let b = BindHeader { origin: 3, next_counted: 17 };
        assert_eq!(b.ack(), raw(Kind::Ack, false, 0, 0, 0, 3, 0));
    }
}

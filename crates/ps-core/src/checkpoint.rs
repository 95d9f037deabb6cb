//! Checkpoints: one shard's tables as bytes, and back. I/O-free: the server
//! writes the bytes to one file per shard and memory-maps it to restore.
//!
//! ```text
//!  0  8 bytes "PSLABCK1"
//!  8  u64     header bytes (JSON: server, shard, label, tables)
//! 16  header, zero-padded to 8
//!     per table, in the header's order: keys (u64, sparse tables only), then
//!     values (f32), then the update rule's state (f32), each zero-padded to 8
//! ```
//!
//! A restore checks that the checkpoint was taken by the same server and
//! shard of a job with the same tables (ids, dims, layouts and sizes): a
//! checkpoint of another ring is refused with what differs.

use serde::{Deserialize, Serialize};

use crate::keys::{Key, TableId};

const MAGIC: &[u8; 8] = b"PSLABCK1";

/// One table's part on one shard.
#[derive(Clone, Debug, PartialEq)]
pub struct TableImage {
    /// the table
    pub id: TableId,
    /// its values per key
    pub dim: u32,
    /// whether the table is sparse (its keys listed) or dense
    pub sparse: bool,
    /// the keys of a sparse table (ascending); empty for a dense one
    pub keys: Vec<Key>,
    /// the values: a sparse table's `dim` a key, in the order of `keys`; a
    /// dense table's every value this shard owns, in its layout's order
    pub vals: Vec<f32>,
    /// the update rule's state (e.g. Adagrad's sums), laid out as the store
    /// keeps it; empty for a rule with none
    pub state: Vec<f32>,
}

/// A checkpoint's JSON header: whose it is and how many of each item follow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// rank of the server that wrote it
    pub server: u32,
    /// the shard, on that server
    pub shard: u32,
    /// what the job called this checkpoint (the lr app: the sweep it was taken after)
    pub label: u64,
    /// one entry per table, in the order their bytes follow
    pub tables: Vec<TableHeader>,
}

/// One table's entry in a checkpoint's [`Header`] (see [`TableImage`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableHeader {
    /// the table's id ([`TableId`]'s number)
    pub id: u32,
    /// its values per key
    pub dim: u32,
    /// whether keys are listed (a sparse table)
    pub sparse: bool,
    /// number of keys (u64 each) stored; 0 for a dense table
    pub keys: u64,
    /// number of values (f32 each) stored
    pub values: u64,
    /// number of the rule's state floats (f32 each) stored
    pub state: u64,
}

/// Why checkpoint bytes cannot be read, or do not fit the shard they are
/// restored into (then the text says what differs: restore the checkpoint of
/// this server and shard, taken by a job with the same tables).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    /// The bytes do not start with the magic.
    #[error("not a pslab checkpoint (no PSLABCK1 at its start)")]
    NotACheckpoint,
    /// The header's length overflows.
    #[error("header length")]
    HeaderLength,
    /// The bytes end inside the header.
    #[error("the header is cut short")]
    HeaderCut,
    /// The header is not the JSON a checkpoint holds (the parser's reason).
    #[error("checkpoint header: {0}")]
    Header(String),
    /// The header's counts overflow.
    #[error("counts overflow")]
    CountsOverflow,
    /// The bytes end before the tables the header counts.
    #[error("the checkpoint is cut short")]
    Cut,
    /// Taken by another server or shard.
    #[error("the checkpoint is of server {server} shard {shard}, this is server {this_server} shard {this_shard}")]
    OtherShard {
        /// the checkpoint's server
        server: u32,
        /// the checkpoint's shard
        shard: u32,
        /// this shard's server
        this_server: u32,
        /// this shard
        this_shard: u32,
    },
    /// The checkpoint and the job have different numbers of tables.
    #[error("the checkpoint has {checkpoint} tables, the job {job}")]
    TableCount {
        /// tables in the checkpoint
        checkpoint: usize,
        /// tables in the job
        job: usize,
    },
    /// The checkpoint holds a table (its id) the job does not have.
    #[error("the checkpoint has table {0}, the job does not")]
    UnknownTable(u32),
    /// A table's dim differs between the checkpoint and the job.
    #[error("table {table}: dim {checkpoint} in the checkpoint, {job} in the job")]
    Dim {
        /// the table's id
        table: u32,
        /// its dim in the checkpoint
        checkpoint: u32,
        /// its dim in the job
        job: u32,
    },
    /// A table (its id) does not fit its store: the reason follows.
    #[error("table {table}: {source}")]
    Table {
        /// the table's id
        table: u32,
        /// why it does not fit
        source: Box<CheckpointError>,
    },
    /// A table is dense in the checkpoint and sparse in the job, or the other way.
    #[error("dense in one, sparse in the other")]
    Layout,
    /// A sparse store already holds keys.
    #[error("a sparse store is restored only when empty")]
    NotEmpty,
    /// A sparse table's values or state do not match its keys.
    #[error("the checkpoint's {keys} keys come with {values} values and {state} state floats")]
    SparseCounts {
        /// keys in the checkpoint
        keys: usize,
        /// values in it
        values: usize,
        /// state floats in it
        state: usize,
    },
    /// A dense table's values or state do not match what this shard owns.
    #[error(
        "the checkpoint holds {values} values and {state} state floats; this shard owns {owned} and {owned_state}"
    )]
    DenseCounts {
        /// values in the checkpoint
        values: usize,
        /// state floats in it
        state: usize,
        /// values this shard owns
        owned: usize,
        /// state floats this shard keeps
        owned_state: usize,
    },
    /// A sparse table's keys are not ascending.
    #[error("{0}")]
    Keys(crate::PsError),
    /// A sparse store could not take the checkpoint's keys.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    /// A live snapshot (a copy's rebuild) ends early.
    #[error("a live snapshot cut short")]
    LiveCut,
    /// A live snapshot's table length does not fit this machine.
    #[error("a live snapshot's length")]
    LiveLength,
    /// A live snapshot's state is not the JSON it should be (the parser's reason).
    #[error("a live snapshot: {0}")]
    LiveState(String),
    /// A live snapshot of a job with another number of workers.
    #[error("a live snapshot of {snapshot} workers, the job has {job}")]
    LiveWorkers {
        /// workers in the snapshot
        snapshot: usize,
        /// workers in the job
        job: usize,
    },
}

/// Why the server could not write a checkpoint's bytes (its I/O error, or
/// any other; a `&str` or `String` converts with `.into()`), handed to
/// `ShardCore::checkpoint_written` to answer the worker that asked.
pub type WriteError = Box<dyn std::error::Error + Send + Sync>;

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(8), 0);
}

/// A checkpoint of shard `shard` of server `server`, labelled `label`, as
/// the bytes the module's layout describes.
pub fn encode(server: u32, shard: u32, label: u64, tables: &[TableImage]) -> Vec<u8> {
    let header = Header {
        server,
        shard,
        label,
        tables: tables
            .iter()
            .map(|t| TableHeader {
                id: t.id.0,
                dim: t.dim,
                sparse: t.sparse,
                keys: t.keys.len() as u64,
                values: t.vals.len() as u64,
                state: t.state.len() as u64,
            })
            .collect(),
    };
    let json = serde_json::to_vec(&header).expect("a header serialises");
    let body: usize = tables.iter().map(|t| 8 * t.keys.len() + 4 * (t.vals.len() + t.state.len()) + 24).sum();
    let mut out = Vec::with_capacity(16 + json.len() + 8 + body);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    pad(&mut out);
    for t in tables {
        out.extend_from_slice(bytemuck::cast_slice(&t.keys));
        out.extend_from_slice(bytemuck::cast_slice(&t.vals));
        pad(&mut out);
        out.extend_from_slice(bytemuck::cast_slice(&t.state));
        pad(&mut out);
    }
    out
}

/// The header alone (what `pslab lr --resume` reads the label from).
pub fn header(bytes: &[u8]) -> Result<Header, CheckpointError> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(CheckpointError::NotACheckpoint);
    }
    let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8")) as usize;
    let end = 16usize.checked_add(n).ok_or(CheckpointError::HeaderLength)?;
    let json = bytes.get(16..end).ok_or(CheckpointError::HeaderCut)?;
    serde_json::from_slice(json).map_err(|e| CheckpointError::Header(e.to_string()))
}

/// The header and tables of a checkpoint; every count is checked against the bytes.
pub fn decode(bytes: &[u8]) -> Result<(Header, Vec<TableImage>), CheckpointError> {
    let header = header(bytes)?;
    let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8")) as usize;
    let mut at = (16 + n).next_multiple_of(8);
    // `size`-byte items, then padding to 8
    let take = |at: &mut usize, count: u64, size: usize| -> Result<&[u8], CheckpointError> {
        let len =
            usize::try_from(count).ok().and_then(|c| c.checked_mul(size)).ok_or(CheckpointError::CountsOverflow)?;
        let end = at.checked_add(len).ok_or(CheckpointError::CountsOverflow)?;
        let s = bytes.get(*at..end).ok_or(CheckpointError::Cut)?;
        *at = end.next_multiple_of(8);
        Ok(s)
    };
    let mut tables = Vec::with_capacity(header.tables.len());
    for t in &header.tables {
        let keys: Vec<Key> =
            take(&mut at, t.keys, 8)?.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8"))).collect();
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect()
        };
        // (keys are 8 bytes each: no padding falls between them and the values)
        let vals = f32s(take(&mut at, t.values, 4)?);
        let state = f32s(take(&mut at, t.state, 4)?);
        tables.push(TableImage { id: TableId(t.id), dim: t.dim, sparse: t.sparse, keys, vals, state });
    }
    Ok((header, tables))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let tables = vec![
            TableImage {
                id: TableId(0),
                dim: 2,
                sparse: false,
                keys: vec![],
                vals: vec![1.0, 2.0, 3.0],
                state: vec![4.0],
            },
            TableImage { id: TableId(3), dim: 1, sparse: true, keys: vec![5, 9], vals: vec![0.5, -1.0], state: vec![] },
        ];
        let bytes = encode(1, 2, 40, &tables);
        assert_eq!(bytes.len() % 8, 0);
        let (h, back) = decode(&bytes).unwrap();
        assert_eq!((h.server, h.shard, h.label), (1, 2, 40));
        assert_eq!(back, tables);
        assert!(decode(&bytes[..bytes.len() - 8]).is_err());
        assert!(decode(b"PSLABCK2........").is_err());
        for cut in 0..bytes.len() {
            let _ = decode(&bytes[..cut]);
        }
    }
}

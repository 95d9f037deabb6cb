//! What one shard stores for one table: values in versioned slab blocks, optimizer
//! state beside them, and (for sparse tables) the slot table that maps keys to
//! where their values live.
//!
//! ## Addressing
//! Values live in a *flat float space* of blocks: flat index `f` is float
//! `f % BLOCK_FLOATS` of block `f / BLOCK_FLOATS`. A dense range of keys is a
//! contiguous flat span. A sparse key gets a *slot*; with `dim <= BLOCK_FLOATS` a
//! block holds `BLOCK_FLOATS / dim` whole slots (no slot straddles a block, so a
//! one-sided READ of one block returns whole values), otherwise a slot starts on a
//! block boundary and spans as many blocks as it needs.
//!
//! ## The sparse slot table
//! Keys arrive sorted (the worker API requires it), so the slot table
//! ([`SlotIndex`](crate::slot_index::SlotIndex), a two-level B+-tree of sorted pages) is walked in step with
//! each batch by a forward-only cursor: sequential access, instead of a random
//! hash probe per key. New keys get the next free slots (so keys pushed together
//! get consecutive slots, and their values share blocks) and go into their pages.
//!
//! Nothing here allocates per request once warmed up: scratch vectors are kept.
//!
//! ## Rooms
//!
//! - `blocks`: [`BlockStore`], the flat float space over slabs, which both
//!   stores keep their values in.
//! - `layout`: [`DenseLayout`], where a shard keeps a dense table: the shared
//!   contract with one-sided readers.
//! - `dense`: [`DenseStore`], a shard's owned key ranges of a dense table.
//! - `sparse`: [`SparseStore`], a shard's slot table and slots of a sparse table.
//!
//! No store reads a socket or a clock, and none changes a value but through
//! its block's versioned write (a one-sided reader must never see a torn one).

mod blocks;
mod dense;
mod layout;
mod sparse;

pub use blocks::BlockStore;
pub use dense::DenseStore;
pub use layout::DenseLayout;
pub use sparse::SparseStore;

use crate::keys::Key;

/// Why a shard refused part of a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The key is outside this shard's ranges: the sender's ring is stale.
    #[error("key {0} is not owned by this shard (stale ring?)")]
    NotOwned(Key),
    /// A one-sided span (in floats of the table's flat layout) crosses or
    /// leaves the ranges this shard owns.
    #[error("span of {len} floats at flat offset {start} is not inside one range this shard owns")]
    SpanNotOwned {
        /// first float of the span
        start: u64,
        /// floats in the span
        len: u64,
    },
    /// Slab memory could not be mapped; the OS error says why.
    #[error("out of memory for slabs: {0}")]
    Memory(String),
    /// The request's keys are not strictly ascending: the sender must sort and dedupe them.
    #[error("keys must be strictly ascending; {0} is not above the key before it")]
    NotSorted(Key),
    /// The sparse table has given out every slot number; new keys are refused.
    #[error("sparse table is full: {0} slots")]
    Full(usize),
}

/// The update rule a test store is built with.
#[cfg(test)]
fn rule(spec: crate::rules::RuleSpec) -> std::sync::Arc<dyn crate::rules::UpdateRule> {
    crate::rules::RuleRegistry::default().build(&spec).unwrap()
}

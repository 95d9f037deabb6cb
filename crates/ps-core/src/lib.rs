//! # ps-core: the parameter server without I/O
//!
//! Everything a parameter server *decides* lives here; everything it *does to the
//! outside world* (sockets, verbs, clocks, threads) is handed in. That split is
//! what lets one test thread run a whole cluster from a seed (`sim`), and lets the
//! TCP and RDMA transports share every line of protocol logic.
//!
//! The pieces, in the order data meets them:
//!
//! - [`keys`]: u64 keys, half-open key ranges, table specs (fixed `dim` per table).
//! - [`ring`]: consistent hashing with virtual nodes; maps contiguous key ranges of
//!   every table to a `(server, shard)` owner.
//! - [`wire`]: the versioned, length-prefixed binary frames of the data path and the
//!   JSON control messages; decoding checks every length against a bound and never
//!   panics.
//! - [`auth`]: the per-job secret and the HMAC challenge-response every connection
//!   runs before its first frame.
//! - [`transport`]: the one small, batched trait every transport implements
//!   (TCP now, RDMA next, the in-memory simulator for tests).
//! - [`slab`] and [`store`]: parameters in page-aligned slabs split into blocks, each
//!   guarded by a version word (a seqlock a one-sided RDMA READ can check); dense
//!   key ranges and sparse slot tables on top.
//! - [`kernels`]: SIMD merge kernels (scalar reference, AVX2, AVX-512).
//! - [`rules`]: server-side update rules (assign, sum, SGD, Adagrad, FTRL-proximal,
//!   and a trait for your own).
//! - [`shard`], [`worker`], [`manager`]: the three state machines.
//! - [`client`]: the blocking worker API (`push`, `pull`, `wait`, ...) over any
//!   transport.
//! - [`clock`]: worker clocks over key ranges (range vector clocks) and the
//!   consistency models (sequential, SSP, ESSP, eventual) a read is held to.
//! - [`limits`]: every tunable and bound, in one place, with its reason.
//!
//! This crate never opens a socket, never reads the wall clock and never spawns a
//! thread. `unsafe` is denied everywhere except in [`kernels`].
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations)]

#[cfg(not(target_endian = "little"))]
compile_error!("the wire format and slab layout assume a little-endian host");

pub mod auth;
pub mod cache;
pub mod chain;
pub mod checkpoint;
pub mod client;
pub mod clock;
pub mod consensus;
pub mod control;
pub mod error;
pub mod filter;
pub mod kernels;
pub mod keys;
pub mod launch;
pub mod limits;
pub mod manager;
pub mod ring;
pub mod rng;
pub mod rules;
pub mod shard;
pub mod sim;
pub mod slab;
pub mod slot_index;
pub mod store;
pub mod table;
pub mod transport;
pub mod wire;
pub mod worker;

pub use error::PsError;
pub use keys::{Key, KeyRange, Layout, TableId};
pub use rules::RuleSpec;
pub use table::TableSpec;

//! # ps-rdma: the parameter server over ibverbs
//!
//! One safe Rust type per verbs object, each holding an `Arc` of its parent so
//! teardown runs in order whatever the caller drops first (a `Pd` never outlives
//! its `Context`, nor an `Mr` or a `Qp` its `Pd` and `Cq`s): [`Context`] (an
//! opened device), [`Pd`], [`Cq`] (optionally with a completion channel whose fd
//! a poller can wait on), [`Mr`] (memory it owns, or memory the caller promises
//! to keep, e.g. a shard's slab), [`Qp`] (reliable connected, INIT -> RTR -> RTS).
//! Every failing verb is an [`RdmaError::Verb`] naming the verb, the device and
//! the errno.
//!
//! - `verbs/`: one file per verbs object (`context.rs`, `pd.rs`, `cq.rs`,
//!   `mr.rs`, `qp.rs`), re-exported here;
//! - `device.rs`: which device, port and GID to use ([`transport::Device`]);
//! - [`datapath`]: posting work requests (batched, one doorbell) and polling:
//!   the hot path, in one short file;
//! - [`transport`] (`transport/`): `ps_core::Transport` over RC QPs: pushes as
//!   WRITE_WITH_IMM into mailbox rings, dense pulls as READs of slab blocks;
//!   the control path in `mod.rs`, with one file each for the tunables, the
//!   set-up handshake, progress, the rings and credits, READ planning, and READ
//!   landing;
//! - [`doctor`]: the `pslab doctor` report.
//!
//! `unsafe` is confined to this crate's verbs layer, the datapath, and the
//! transport's posts (each naming the buffer-ownership contract it keeps):
//! every block and impl says why it is sound, and the lints below make the
//! build fail where one does not, or where an `unsafe fn` does an unsafe
//! operation outside a block of its own.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod datapath;
mod device;
pub mod doctor;
mod error;
pub mod transport;
mod verbs;

pub use error::{NoRdma, RdmaError, Refused, Result};
pub use verbs::{Context, Cq, Endpoint, Mr, Pd, Qp, QpCaps};

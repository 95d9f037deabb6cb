//! The verbs layer: one safe type per verbs object, each holding an `Arc` of
//! its parent so teardown runs in order whatever the caller drops first.
//!
//! ```text
//! Context ── Pd ──┬── Mr
//!    │            └── Qp ── Cq (send), Cq (recv)
//!    └── Cq
//! ```
//!
//! Each file wraps one object's create, query and destroy verbs. Nothing here
//! posts work requests or polls completions (that is `datapath.rs`), and
//! nothing here knows about frames, rings or the transport.

mod context;
mod cq;
mod mr;
mod pd;
mod qp;

pub use context::Context;
pub use cq::Cq;
pub use mr::Mr;
pub use pd::Pd;
pub use qp::{Endpoint, Qp, QpCaps};

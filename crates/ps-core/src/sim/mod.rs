//! The seeded simulation harness, after TigerBeetle's VOPR: a whole cluster
//! runs in one test thread from a seed, its state machines exchanging frames
//! over the packet simulator, and invariants are checked as it goes and at
//! quiescence. A failing seed is printed and replays exactly (`PS_SIM_SEED`
//! runs that seed alone; `PS_SIM_SEEDS` sets how many seeds a run takes).
//!
//! ## The rooms
//! - `packet`: the packet simulator: ordered connections with per-frame
//!   delay, loss (a closed connection), partitions that heal and process
//!   pauses, each at a rate drawn per seed; virtual time.
//! - `cluster` (tests): shards in chains of copies on servers, workers and
//!   the manager state machine, all inside; the manager decides views,
//!   failovers and where lost copies are rebuilt, and its views travel as
//!   frames. Servers crash when a run says so. `servers`: the server
//!   process's side of its control link (views, placed copies, reports).
//! - `check` (tests): the invariants: every acknowledged push is in the
//!   final values and every live copy equals its head (invariant 1), the job
//!   is never aborted, no forwarding log overflows.
//! - `failover_tests`: workers push while servers crash, over a lossy,
//!   partitioned, pausing network (2 copies any server, 3 copies two
//!   servers, rebuilds then a second death).
//! - `consistency_tests` and `ssp_tests`: unreplicated shards and workers
//!   over the same simulator without loss (their state machines do not
//!   survive a closed connection): invariant 1 with read-your-writes, filters,
//!   and invariant 2 for sequential, SSP and ESSP.
//! - `planted_tests`: a bug planted in the chain (`chain::planted`) is found
//!   within the default seeds, and not reported with it off.
//!
//! Must never: read the wall clock or any randomness but the seed's, or
//! reach into a state machine to help it along (it is driven only through
//! the API its server thread or client uses).

use crate::transport::{FrameSink, PeerId, TxError};

pub mod packet;

pub use packet::{FaultStats, Faults, Micros, PacketSim};

#[cfg(test)]
pub(crate) mod check;
#[cfg(test)]
pub(crate) mod cluster;
#[cfg(test)]
mod consistency_tests;
#[cfg(test)]
mod failover_tests;
#[cfg(test)]
mod planted_tests;
#[cfg(test)]
mod servers;
#[cfg(test)]
mod ssp_tests;

/// Collects frames written by a state machine, tagged with their destination.
#[derive(Debug, Default)]
pub struct SimSink {
    /// every frame written, in order, with the peer it was written to
    pub frames: Vec<(PeerId, Vec<u8>)>,
}

impl FrameSink for SimSink {
    fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], TxError> {
        // 8-aligned, like the real transports' buffers
        self.frames.push((peer, vec![0u8; len]));
        Ok(&mut self.frames.last_mut().expect("just pushed").1)
    }
}

/// The seeds a simulation runs: `PS_SIM_SEED` alone (to replay one), else
/// `0..PS_SIM_SEEDS`, else `0..default`.
#[cfg(test)]
pub(crate) fn seeds(default: u64) -> std::ops::Range<u64> {
    let env = |name| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    match (env("PS_SIM_SEED"), env("PS_SIM_SEEDS")) {
        (Some(s), _) => s..s + 1,
        (None, Some(n)) => 0..n,
        (None, None) => 0..default,
    }
}

//! # ps-node: the runtime of a pslab node
//!
//! ps-core decides everything and does no I/O; this crate gives it sockets,
//! threads, files and the wall clock, and is what `pslab node` runs. A job
//! has three roles, and each is one entry point here:
//!
//! - **manager** ([`manager`]: [`run_manager`], or [`Manager::bind`] then
//!   [`Manager::run`]): one replica of the manager's Raft group. It listens,
//!   links to the other replicas, moves the Raft log's messages, and holds the
//!   leader's decisions until the state they follow is committed.
//! - **server** ([`server`]: [`run_server`]): a listener per shard and per copy
//!   of another server's shard it holds (chain replication), each served by
//!   one pinned thread that owns its transport and its stores
//!   (`server/shard_loop.rs`, thread-per-core). Checkpoint files are
//!   [`checkpoint`]'s; where the threads run is [`placement`]'s.
//! - **worker** ([`worker`]: [`run_worker`]): a PS client connected to every
//!   shard's head, failover through the newest view, and the handle an
//!   application gets: [`WorkerCtx`] (rank, view, the [`PsWorker`] client,
//!   barriers). Applications are handed in by name ([`AppMain`]): this crate
//!   names none of them, so nothing here imports from an app.
//!
//! Beside the roles: [`control`] is a server's or worker's link to the
//! manager (registration, heartbeats, barriers, the rejoin of a new leader);
//! [`view::ViewBoard`] shares the newest view among a node's threads; [`net`]
//! picks the transport once (`--transport auto|rdma|tcp`; RDMA only with this
//! crate's `rdma` feature, which the binary's `rdma` feature turns on).
//!
//! Errors are typed ([`error`]): each says what failed, with the address, file
//! or setting, and what to do. Nothing here reads the command line: the
//! binary parses flags into [`ServerOpts`], [`WorkerOpts`] and [`NetOpts`].
//! Because a node is a value and not a process, a whole cluster can run on
//! threads of one test process (`tests/cluster_in_process.rs`).

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod checkpoint;
pub mod control;
pub mod error;
pub mod manager;
pub mod net;
pub mod placement;
pub mod server;
pub mod view;
pub mod worker;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

pub use error::NodeError;
pub use manager::{run_manager, Manager};
pub use net::{NetOpts, NodeTransport, TransportMode};
pub use server::{run_server, ServerOpts};
pub use worker::{run_worker, AppFailure, AppMain, PsWorker, WorkerCtx, WorkerOpts};

/// Wall-clock time since the node started (ps-core takes time as an input).
#[derive(Clone, Copy, Debug)]
pub struct StdClock(pub Instant);

impl ps_core::client::Clock for StdClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// The first address `addr` (`host:port`) resolves to.
pub fn resolve(addr: &str) -> Result<SocketAddr, NodeError> {
    addr.to_socket_addrs()
        .map_err(|e| NodeError::Resolve { addr: addr.to_string(), why: e.to_string() })?
        .next()
        .ok_or_else(|| NodeError::Resolve { addr: addr.to_string(), why: "no address".into() })
}

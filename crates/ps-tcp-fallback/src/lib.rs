//! # ps-tcp-fallback: the ps-core transport over TCP
//!
//! One [`TcpTransport`] per thread: a shard thread owns one with its own listener
//! (thread-per-core: no socket is shared between shards), a worker owns one with
//! a connection to every shard, the manager owns one with its listener.
//!
//! - **Authenticated.** A listener sends a `Challenge` to every new connection and
//!   admits it only after a `Hello` whose HMAC proves the job secret
//!   (`ps_core::auth`); it answers with its own proof. Before that, a peer may
//!   send at most `HANDSHAKE_FRAME_BYTES_MAX` bytes per frame and has
//!   `HANDSHAKE_TIMEOUT_MS` to finish.
//! - **Checked.** Every length prefix is checked against the bound before a byte
//!   of the body is buffered; a peer that breaks the framing is dropped with a
//!   logged reason, and everyone else keeps being served.
//! - **Bounded.** Each connection has a send queue of at most
//!   `tx_queue_bytes_max`; a listener does not read requests from a peer whose
//!   responses are piling up (back-pressure through TCP flow control), and a
//!   client's `frame()` waits for room. At most `CONNECTIONS_MAX` connections.
//! - **No allocation per message.** Frames are read into pooled 8-aligned
//!   buffers and lent out as they are; send queues grow to their high-water mark
//!   once and are reused.
//!
//! ## Rooms
//!
//! The control path and the datapath are separate files, as in eRPC's
//! transports, so the hot path can be read whole:
//!
//! - `control`: listen, accept, connect, the handshake, drops and expiry.
//! - `datapath`: read and cut frames, send queues and gathered sends, the event
//!   loop, and the `Transport` implementation (`rx_burst`, `release`, `flush`).
//! - `transport`: the [`TcpTransport`] value, its connection table and accessors.
//! - `conn`: one connection's state and the lent frame, [`TcpRx`].
//! - `config`: [`TcpConfig`] and this transport's own tunables.
//! - `buf`: the aligned buffers, their pool and the send queue.
//!
//! No `unsafe` anywhere in this crate.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod buf;
mod config;
mod conn;
mod control;
mod datapath;
mod transport;

pub use config::TcpConfig;
pub use conn::TcpRx;
pub use control::{generate_secret, ConnectError, RandomError};
pub use transport::{TcpStats, TcpTransport};

//! Which transport a node runs: `--transport auto|rdma|tcp` (PS_TRANSPORT), the
//! RDMA device (`--rdma-device`, PS_RDMA_DEVICE) and GID (`--rdma-gid-index`).
//!
//! Built with the `rdma` feature, every node runs `ps_rdma::RdmaTransport`: TCP
//! for every connection (authentication, liveness), RDMA for the data of the
//! worker-to-shard connections that set it up. Built without it, plain TCP.
//! `auto` uses RDMA where an active device exists and says so in one log line,
//! else TCP with the reason; `rdma` that cannot work is an error, never a
//! silent fallback; `tcp` never touches a device.

use std::net::SocketAddr;
use std::time::Duration;

use clap::ValueEnum;
use ps_core::shard::ShardCore;
use ps_core::transport::PeerId;
use ps_tcp_fallback::TcpTransport;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Default)]
pub enum TransportArg {
    /// RDMA where an active verbs device exists, else TCP (one log line says which).
    #[default]
    Auto,
    /// RDMA or fail.
    Rdma,
    /// TCP only.
    Tcp,
}

impl TransportArg {
    pub fn name(self) -> &'static str {
        match self {
            TransportArg::Auto => "auto",
            TransportArg::Rdma => "rdma",
            TransportArg::Tcp => "tcp",
        }
    }
}

/// A node's transport settings.
#[derive(Clone, Debug, Default)]
pub struct NetOpts {
    pub transport: TransportArg,
    pub rdma_device: Option<String>,
    pub rdma_gid_index: Option<i32>,
}

impl NetOpts {
    /// Puts the settings in the environment, so the processes `local` and `bench` start inherit them.
    pub fn export_env(&self) {
        std::env::set_var("PS_TRANSPORT", self.transport.name());
        if let Some(d) = &self.rdma_device {
            std::env::set_var("PS_RDMA_DEVICE", d);
        }
        if let Some(g) = self.rdma_gid_index {
            std::env::set_var("PS_RDMA_GID_INDEX", g.to_string());
        }
    }
}

/// Checked by the launchers (`local`, `bench`) before they start anything: a
/// forced RDMA that cannot work fails here, with the reason, not in a child.
pub fn preflight(net: &NetOpts) -> Result<(), String> {
    if net.transport != TransportArg::Rdma {
        return Ok(());
    }
    #[cfg(feature = "rdma")]
    {
        node_device(net).map(drop)
    }
    #[cfg(not(feature = "rdma"))]
    {
        Err(format!("--transport rdma: {NO_RDMA_BUILD}"))
    }
}

/// The RDMA device a node would use, by name (for placing its threads near it).
pub fn device_name(net: &NetOpts) -> Option<String> {
    if net.transport == TransportArg::Tcp {
        return None;
    }
    #[cfg(feature = "rdma")]
    {
        open_device(net).ok().map(|d| d.ctx.name().to_string())
    }
    #[cfg(not(feature = "rdma"))]
    {
        net.rdma_device.clone()
    }
}

#[cfg(feature = "rdma")]
pub type NodeTransport = ps_rdma::transport::RdmaTransport;
#[cfg(not(feature = "rdma"))]
pub type NodeTransport = TcpTransport;

pub const BUILT_WITH_RDMA: bool = cfg!(feature = "rdma");

#[cfg(not(feature = "rdma"))]
const NO_RDMA_BUILD: &str =
    "this pslab was built without RDMA support: rebuild with `cargo build --release --features rdma` \
     (Debian packages: libibverbs-dev librdmacm-dev libclang-dev; see the README)";

#[cfg(feature = "rdma")]
fn open_device(net: &NetOpts) -> Result<ps_rdma::transport::Device, String> {
    let choice = ps_rdma::transport::DeviceChoice { name: net.rdma_device.clone(), gid_index: net.rdma_gid_index };
    ps_rdma::transport::Device::open(&choice).map_err(|e| e.to_string())
}

/// The device this node uses, as `net` says: `Ok(Ok(device))`; `Ok(Err(why))`
/// for TCP (what a shard tells workers that ask for RDMA); `Err` when a forced
/// `--transport rdma` cannot work.
#[cfg(feature = "rdma")]
fn node_device(net: &NetOpts) -> Result<Result<ps_rdma::transport::Device, String>, String> {
    if net.transport == TransportArg::Tcp {
        return Ok(Err("the node runs --transport tcp".into()));
    }
    match open_device(net) {
        Ok(d) => Ok(Ok(d)),
        Err(e) if net.transport == TransportArg::Rdma => Err(format!("--transport rdma: {e} (run `pslab doctor`)")),
        Err(e) => {
            tracing::info!("transport: TCP (no usable RDMA device: {e})");
            Ok(Err(format!("no usable RDMA device: {e}")))
        }
    }
}

/// The transports of a server's shards (one per shard thread), around their listeners.
#[cfg(feature = "rdma")]
pub fn server_transports(tcps: Vec<TcpTransport>, net: &NetOpts) -> Result<Vec<NodeTransport>, String> {
    let dev = node_device(net)?;
    if let Ok(d) = &dev {
        tracing::info!("transport: RDMA on {} for workers that ask, TCP for the rest", d.describe());
    }
    tcps.into_iter()
        .map(|t| ps_rdma::transport::RdmaTransport::new(t, dev.clone()).map_err(|e| e.to_string()))
        .collect()
}

#[cfg(not(feature = "rdma"))]
pub fn server_transports(tcps: Vec<TcpTransport>, net: &NetOpts) -> Result<Vec<NodeTransport>, String> {
    match net.transport {
        TransportArg::Rdma => Err(format!("--transport rdma: {NO_RDMA_BUILD}")),
        TransportArg::Auto => {
            tracing::info!("transport: TCP (built without the rdma feature)");
            Ok(tcps)
        }
        TransportArg::Tcp => Ok(tcps),
    }
}

/// Lets the shard's RDMA clients READ its dense tables straight from the slabs.
#[cfg(feature = "rdma")]
#[allow(unsafe_code)]
pub fn export_slabs(t: &mut NodeTransport, core: &ShardCore) -> Result<(), String> {
    for (table, layout, slab) in core.dense_slabs() {
        // SAFETY: the shard thread owns `core` and `t` together and drops `t`
        // first (`shard_loop`); a dense table's slab never moves or grows.
        unsafe { t.export_dense(table.0, layout, slab) }.map_err(|e| format!("registering table {table:?}: {e}"))?;
    }
    Ok(())
}

#[cfg(not(feature = "rdma"))]
pub fn export_slabs(_t: &mut NodeTransport, _core: &ShardCore) -> Result<(), String> {
    Ok(())
}

/// A worker's transport (no listener), its device opened as `net` says.
#[cfg(feature = "rdma")]
pub fn worker_transport(tcp: TcpTransport, net: &NetOpts) -> Result<NodeTransport, String> {
    ps_rdma::transport::RdmaTransport::new(tcp, node_device(net)?).map_err(|e| e.to_string())
}

#[cfg(not(feature = "rdma"))]
pub fn worker_transport(tcp: TcpTransport, net: &NetOpts) -> Result<NodeTransport, String> {
    if net.transport == TransportArg::Rdma {
        return Err(format!("--transport rdma: {NO_RDMA_BUILD}"));
    }
    Ok(tcp)
}

#[cfg(feature = "rdma")]
fn tcp_of(t: &mut NodeTransport) -> &mut TcpTransport {
    t.tcp()
}

#[cfg(not(feature = "rdma"))]
fn tcp_of(t: &mut NodeTransport) -> &mut TcpTransport {
    t
}

/// Connects a copy of a replicated shard to the next copy of its chain:
/// authenticated TCP whatever the data transport (the forwarded frames are
/// what the shard thread wrote, and go as frames).
pub fn connect_copy(t: &mut NodeTransport, addr: SocketAddr) -> Result<PeerId, String> {
    tcp_of(t).connect(addr, Duration::from_secs(1)).map_err(|e| e.to_string())
}

/// Connects a worker to one shard (authenticated TCP), then moves it to RDMA
/// where the settings and both ends allow. Returns the peer and how it is served.
pub fn connect_shard(t: &mut NodeTransport, addr: SocketAddr, net: &NetOpts) -> Result<(PeerId, String), String> {
    let peer = tcp_of(t).connect(addr, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    #[cfg(feature = "rdma")]
    if t.has_device() {
        match t.connect_rdma(peer, Duration::from_secs(30)) {
            Ok(Ok(())) => return Ok((peer, "rdma".into())),
            // refused: the shard set nothing up, the TCP connection serves as it is
            Ok(Err(why)) if net.transport == TransportArg::Auto => return Ok((peer, format!("tcp ({why})"))),
            Ok(Err(why)) => return Err(format!("--transport rdma: the shard at {addr} refused RDMA: {why}")),
            Err(e) if net.transport == TransportArg::Auto => {
                // half set up: start over on a fresh, plain connection
                ps_core::transport::Transport::close(t, peer, "RDMA set-up failed");
                let peer = tcp_of(t).connect(addr, Duration::from_secs(10)).map_err(|e| e.to_string())?;
                return Ok((peer, format!("tcp ({e})")));
            }
            Err(e) => return Err(format!("--transport rdma: RDMA set-up with the shard at {addr} failed: {e}")),
        }
    }
    let _ = net;
    Ok((peer, "tcp".into()))
}

/// A waker that makes the shard's blocked poll return (for shutdown).
pub fn waker_of(t: &mut NodeTransport) -> std::io::Result<std::sync::Arc<mio::Waker>> {
    tcp_of(t).waker()
}

/// One line of transport counters for the end-of-run log (RDMA builds).
pub fn stats_line(t: &NodeTransport) -> Option<String> {
    #[cfg(feature = "rdma")]
    if t.has_device() {
        let s = t.stats();
        return Some(format!(
            "rdma: {} frames out ({:.1} MB, {} doorbells, {} credit waits), {} in ({:.1} MB); {} pulls by READ ({:.1} MB in {} chained posts), {} torn blocks re-read",
            s.frames_out,
            s.bytes_out as f64 / 1e6,
            s.doorbells,
            s.credit_waits,
            s.frames_in,
            s.bytes_in as f64 / 1e6,
            s.read_pulls,
            s.read_bytes as f64 / 1e6,
            s.read_posts,
            s.torn_retries
        ));
    }
    let _ = t;
    None
}

/// The RDMA counters as JSON (for apps that report them; zeros without RDMA).
pub fn stats_json(t: &NodeTransport) -> serde_json::Value {
    #[cfg(feature = "rdma")]
    {
        let s = t.stats();
        serde_json::json!({
            "rdma": t.has_device(), "frames_out": s.frames_out, "frames_in": s.frames_in,
            "read_pulls": s.read_pulls, "read_bytes": s.read_bytes, "torn_retries": s.torn_retries,
            "credit_waits": s.credit_waits,
        })
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = t;
        serde_json::json!({"rdma": false})
    }
}

//! Which transport a node runs: `--transport auto|rdma|tcp` (PS_TRANSPORT), the
//! RDMA device (`--rdma-device`, PS_RDMA_DEVICE) and GID (`--rdma-gid-index`).
//!
//! Built with the `rdma` feature, every node runs `ps_rdma::RdmaTransport`: TCP
//! for every connection (authentication, liveness), RDMA for the data of the
//! worker-to-shard connections that set it up. Built without it, plain TCP.
//! `auto` uses RDMA where an active device exists and says so in one log line,
//! else TCP with the reason; `rdma` that cannot work is an error, never a
//! silent fallback; `tcp` never touches a device.
//!
//! This is the one file that names ps-rdma's transport; the rest of the
//! runtime sees [`NodeTransport`] through `ps_core::transport::Transport`.

use std::net::SocketAddr;
use std::time::Duration;

use ps_core::shard::ShardCore;
use ps_core::transport::PeerId;
use ps_tcp_fallback::TcpTransport;

use crate::error::NetError;

/// The data transport a node asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TransportMode {
    /// RDMA where an active verbs device exists, else TCP (one log line says which).
    #[default]
    Auto,
    /// RDMA or fail.
    Rdma,
    /// TCP only.
    Tcp,
}

impl TransportMode {
    /// The flag's value (`--transport NAME`, PS_TRANSPORT).
    pub fn name(self) -> &'static str {
        match self {
            TransportMode::Auto => "auto",
            TransportMode::Rdma => "rdma",
            TransportMode::Tcp => "tcp",
        }
    }
}

/// A node's transport settings.
#[derive(Clone, Debug, Default)]
pub struct NetOpts {
    /// `--transport`: auto (RDMA where a device works, else TCP), rdma, tcp
    pub transport: TransportMode,
    /// `--rdma-device`: the RDMA device (`None`: the first with an active port)
    pub rdma_device: Option<String>,
    /// `--rdma-gid-index`: the GID index (`None`: RoCEv2 IPv4-mapped GID, or the LID on InfiniBand)
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
pub fn preflight(net: &NetOpts) -> Result<(), NetError> {
    if net.transport != TransportMode::Rdma {
        return Ok(());
    }
    #[cfg(feature = "rdma")]
    {
        node_device(net).map(drop)
    }
    #[cfg(not(feature = "rdma"))]
    {
        Err(NetError::NoRdmaBuild)
    }
}

/// The RDMA device a node would use, by name (for placing its threads near it).
pub fn device_name(net: &NetOpts) -> Option<String> {
    if net.transport == TransportMode::Tcp {
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

/// Every node's transport: RDMA-capable with the `rdma` feature, TCP without.
#[cfg(feature = "rdma")]
pub type NodeTransport = ps_rdma::transport::RdmaTransport;
/// Every node's transport: RDMA-capable with the `rdma` feature, TCP without.
#[cfg(not(feature = "rdma"))]
pub type NodeTransport = TcpTransport;

/// Whether this build can run RDMA at all.
pub const BUILT_WITH_RDMA: bool = cfg!(feature = "rdma");

#[cfg(feature = "rdma")]
fn open_device(net: &NetOpts) -> Result<ps_rdma::transport::Device, ps_rdma::RdmaError> {
    let choice = ps_rdma::transport::DeviceChoice { name: net.rdma_device.clone(), gid_index: net.rdma_gid_index };
    ps_rdma::transport::Device::open(&choice)
}

/// The device this node uses, as `net` says: `Ok(Ok(device))`; `Ok(Err(why))`
/// for TCP (what a shard tells workers that ask for RDMA); `Err` when a forced
/// `--transport rdma` cannot work.
#[cfg(feature = "rdma")]
fn node_device(net: &NetOpts) -> Result<Result<ps_rdma::transport::Device, ps_rdma::NoRdma>, NetError> {
    if net.transport == TransportMode::Tcp {
        return Ok(Err(ps_rdma::NoRdma::TcpOnly));
    }
    match open_device(net) {
        Ok(d) => Ok(Ok(d)),
        Err(e) if net.transport == TransportMode::Rdma => Err(NetError::RdmaUnusable(e.to_string())),
        Err(e) => {
            let why = ps_rdma::NoRdma::NoDevice(e.to_string());
            tracing::info!("transport: TCP ({why})");
            Ok(Err(why))
        }
    }
}

/// The transports of a server's shards (one per shard thread), around their listeners.
#[cfg(feature = "rdma")]
pub fn server_transports(tcps: Vec<TcpTransport>, net: &NetOpts) -> Result<Vec<NodeTransport>, NetError> {
    let dev = node_device(net)?;
    if let Ok(d) = &dev {
        tracing::info!("transport: RDMA on {} for workers that ask, TCP for the rest", d.describe());
    }
    tcps.into_iter()
        .map(|t| ps_rdma::transport::RdmaTransport::new(t, dev.clone()).map_err(|e| NetError::Transport(e.to_string())))
        .collect()
}

/// The transports of a server's shards (one per shard thread), around their listeners.
#[cfg(not(feature = "rdma"))]
pub fn server_transports(tcps: Vec<TcpTransport>, net: &NetOpts) -> Result<Vec<NodeTransport>, NetError> {
    match net.transport {
        TransportMode::Rdma => Err(NetError::NoRdmaBuild),
        TransportMode::Auto => {
            tracing::info!("transport: TCP (built without the rdma feature)");
            Ok(tcps)
        }
        TransportMode::Tcp => Ok(tcps),
    }
}

/// Lets the shard's RDMA clients READ its dense tables straight from the slabs.
#[cfg(feature = "rdma")]
#[allow(unsafe_code)]
pub fn export_slabs(t: &mut NodeTransport, core: &ShardCore) -> Result<(), NetError> {
    for (table, layout, slab) in core.dense_slabs() {
        // SAFETY: the shard thread owns `core` and `t` together and drops `t`
        // first (`shard_loop`); a dense table's slab never moves or grows.
        unsafe { t.export_dense(table.0, layout, slab) }
            .map_err(|e| NetError::Register { table: table.0, why: e.to_string() })?;
    }
    Ok(())
}

/// Lets the shard's RDMA clients READ its dense tables (nothing to do over TCP).
#[cfg(not(feature = "rdma"))]
pub fn export_slabs(_t: &mut NodeTransport, _core: &ShardCore) -> Result<(), NetError> {
    Ok(())
}

/// A worker's transport (no listener), its device opened as `net` says.
#[cfg(feature = "rdma")]
pub fn worker_transport(tcp: TcpTransport, net: &NetOpts) -> Result<NodeTransport, NetError> {
    ps_rdma::transport::RdmaTransport::new(tcp, node_device(net)?).map_err(|e| NetError::Transport(e.to_string()))
}

/// A worker's transport (no listener): TCP, this build has no RDMA.
#[cfg(not(feature = "rdma"))]
pub fn worker_transport(tcp: TcpTransport, net: &NetOpts) -> Result<NodeTransport, NetError> {
    if net.transport == TransportMode::Rdma {
        return Err(NetError::NoRdmaBuild);
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
pub fn connect_copy(t: &mut NodeTransport, addr: SocketAddr) -> Result<PeerId, NetError> {
    Ok(tcp_of(t).connect(addr, Duration::from_secs(1))?)
}

/// Connects a worker to one shard (authenticated TCP), then moves it to RDMA
/// where the settings and both ends allow. Returns the peer and how it is served.
pub fn connect_shard(t: &mut NodeTransport, addr: SocketAddr, net: &NetOpts) -> Result<(PeerId, String), NetError> {
    let peer = tcp_of(t).connect(addr, Duration::from_secs(10))?;
    #[cfg(feature = "rdma")]
    if t.has_device() {
        match t.connect_rdma(peer, Duration::from_secs(30)) {
            Ok(Ok(())) => return Ok((peer, "rdma".into())),
            // refused: the shard set nothing up, the TCP connection serves as it is
            Ok(Err(why)) if net.transport == TransportMode::Auto => return Ok((peer, format!("tcp ({why})"))),
            Ok(Err(why)) => return Err(NetError::RdmaRefused { addr, why: why.to_string() }),
            Err(e) if net.transport == TransportMode::Auto => {
                // half set up: start over on a fresh, plain connection
                ps_core::transport::Transport::close(t, peer, "RDMA set-up failed");
                let peer = tcp_of(t).connect(addr, Duration::from_secs(10))?;
                return Ok((peer, format!("tcp ({e})")));
            }
            Err(e) => return Err(NetError::RdmaSetup { addr, why: e.to_string() }),
        }
    }
    let _ = net;
    Ok((peer, "tcp".into()))
}

/// A waker that makes the shard's blocked poll return (for shutdown).
pub fn waker_of(t: &mut NodeTransport) -> Result<std::sync::Arc<mio::Waker>, NetError> {
    tcp_of(t).waker().map_err(|e| NetError::Transport(format!("cannot make a poll waker: {e}")))
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

//! The server runtime: a server's listeners (one per shard, one per copy of
//! another server's shard it holds), registration with the manager, where
//! its shard threads run, one thread per copy (`shard_loop.rs`), the copies
//! the manager places on it to rebuild a lost one, and the end-of-run
//! counters. Every decision about frames, chains and stores is ps-core's
//! (`ChainCore`, `ShardCore`); this file starts and stops threads.

mod shard_loop;

use std::net::SocketAddr;
use std::time::Duration;

use ps_core::auth::JobSecret;
use ps_core::chain::ChainCore;
use ps_core::control::{Control, Role};
use ps_core::kernels::Kernels;
use ps_core::ring::Owner;
use ps_core::rules::RuleRegistry;
use ps_core::shard::ShardCore;
use ps_core::transport::PeerHello;
use ps_tcp_fallback::{TcpConfig, TcpTransport};

use crate::checkpoint::resume;
use crate::control::{ControlLink, Member, Notice, OnAbort};
use crate::error::{ControlError, NodeError};
use crate::net::{self, NetOpts};
use crate::resolve;
use shard_loop::Units;

/// A server's settings (`pslab node --role server`).
#[derive(Clone, Debug)]
pub struct ServerOpts {
    /// the address workers and other servers reach this server at
    pub host: String,
    /// shards (one pinned thread and port each) this server serves; 0 counts as 1
    pub shards: usize,
    /// the first shard port (0: any free ports)
    pub port_base: u16,
    /// cores to pin shard threads to, in order; empty: all cores, round-robin
    pub cpus: Vec<usize>,
    /// pin each shard thread to a core (`--no-pin` turns it off)
    pub pin: bool,
    /// the rank to ask the manager for
    pub rank: Option<u32>,
    /// what tells this server apart from others on its host (see [`Member::pid`])
    pub pid: u32,
    /// what the server does when the manager aborts the job
    pub on_abort: OnAbort,
}

/// The merge kernels: the best this CPU has, or `PS_KERNELS=scalar|avx2|avx512`
/// (for comparing them, and for emulators where wide SIMD is slow).
fn kernels_from_env() -> Result<&'static Kernels, NodeError> {
    use ps_core::kernels::Isa;
    let Ok(want) = std::env::var("PS_KERNELS") else { return Ok(Kernels::best()) };
    let isa = match want.as_str() {
        "scalar" => Isa::Scalar,
        "avx2" => Isa::Avx2,
        "avx512" => Isa::Avx512,
        other => return Err(NodeError::KernelsUnknown(other.to_string())),
    };
    Kernels::for_isa(isa).ok_or(NodeError::KernelsUnsupported(want))
}

/// Runs a server until the job ends: registers with the managers at
/// `managers`, serves its shards and copies, and returns its last line.
pub fn run_server(
    secret: JobSecret,
    managers: &[SocketAddr],
    opts: ServerOpts,
    netopts: &NetOpts,
) -> Result<String, NodeError> {
    let shards = opts.shards.max(1);
    // `h`: the port's place after --port-base (none: any free port)
    let listen = |h: Option<usize>, what: &str| -> Result<TcpTransport, NodeError> {
        let port = match h {
            Some(h) if opts.port_base != 0 => opts.port_base + h as u16,
            _ => 0,
        };
        let h = h.unwrap_or(0);
        let addr = resolve(&format!("{}:{port}", opts.host))?;
        let cfg = TcpConfig::new(secret.clone(), PeerHello { role: Role::Server as u8, node: h as u32 }, false);
        TcpTransport::listen(cfg, addr).map_err(|source| NodeError::Listen { what: what.to_string(), addr, source })
    };
    let mut transports = Vec::with_capacity(shards);
    let mut ports = Vec::with_capacity(shards);
    for h in 0..shards {
        let t = listen(Some(h), &format!("shard {h}"))?;
        ports.push(t.local_addr().expect("listening").port());
        transports.push(t);
    }
    let transports = net::server_transports(transports, netopts)?;
    let member = Member {
        role: Role::Server,
        host: opts.host.clone(),
        ports: ports.clone(),
        rank: opts.rank,
        pid: opts.pid,
        on_abort: opts.on_abort,
    };
    let (rank, view, link) = ControlLink::register(secret.clone(), managers, member, Default::default())?;
    let kernels = kernels_from_env()?;
    // servers sharing a machine (`pslab local`) start at different cores
    let placement: Vec<Option<usize>> = if opts.pin {
        match crate::placement::plan(shards, rank as usize * shards, net::device_name(netopts).as_deref(), &opts.cpus) {
            Ok(p) => {
                tracing::info!("server {rank} placement: {}", p.describe());
                p.shard_cpus.into_iter().map(Some).collect()
            }
            Err(e) => {
                tracing::warn!("server {rank}: shard threads not pinned ({e})");
                vec![None; shards]
            }
        }
    } else {
        vec![None; shards]
    };
    tracing::info!(
        "server {rank}: {shards} shards on ports {ports:?}, kernels {}, pinned to CPUs {:?}",
        kernels.isa,
        placement.iter().map(|c| c.map_or("-".to_string(), |c| c.to_string())).collect::<Vec<_>>()
    );
    // a replicated job: this server also holds copies of the shards of the
    // servers before it in the ring (chain replication), each a thread of its
    // own on its shard's core, listening on a port of its own
    let copies = view.copies() as usize;
    let nr_servers = view.servers.len() as u32;
    let mut units: Vec<(Owner, usize, String)> =
        (0..shards).map(|h| (Owner { server: rank, shard: h as u32 }, h, format!("shard-{h}"))).collect();
    let mut copy_tcps = Vec::new();
    let mut copy_ports = Vec::new();
    for i in 1..copies {
        for h in 0..shards {
            let owner = Owner { server: (rank + nr_servers - i as u32) % nr_servers, shard: h as u32 };
            let t = listen(Some(i * shards + h), &format!("copy {i} of shard {h}"))?;
            copy_ports.push(t.local_addr().expect("listening").port());
            copy_tcps.push(t);
            units.push((owner, h, format!("copy-{}.{h}", owner.server)));
        }
    }
    let mut all = transports;
    all.extend(net::server_transports(copy_tcps, netopts)?);
    if copies > 1 {
        tracing::info!(
            "server {rank}: {copies} copies of every shard; holds those of servers {:?} on ports {copy_ports:?}",
            (1..copies).map(|i| (rank + nr_servers - i as u32) % nr_servers).collect::<Vec<_>>()
        );
        link.send(Control::Copies { ports: copy_ports })?;
    }
    let board = link.board().clone();
    let mut threads = Units::new(&link);
    for ((owner, h, name), mut t) in units.into_iter().zip(all) {
        let mut core = ShardCore::new(&view, owner, &RuleRegistry::default(), kernels)
            .map_err(|e| NodeError::Shard(e.to_string()))?;
        resume(&mut core)?;
        net::export_slabs(&mut t, &core)?;
        let chain = ChainCore::new(core, rank, view.chain(owner));
        threads.start(&view, t, chain, name, placement[h])?;
    }
    // copies placed on this server after a failover (rebuilds), started as the views name them
    let mut started: Vec<u64> = Vec::new();
    let mut seen_epoch = board.epoch();
    let outcome = loop {
        match link.notices().recv_timeout(Duration::from_millis(100)) {
            Ok(Notice::Shutdown(r)) => break Ok(r),
            Ok(Notice::Abort(r)) => break Err(ControlError::Aborted(r)),
            Ok(Notice::Released(_)) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break Err(ControlError::Gone),
        }
        if board.epoch() == seen_epoch {
            continue;
        }
        let v = board.get();
        seen_epoch = v.epoch;
        let mine: Vec<ps_core::control::PlacedCopy> =
            v.placed.iter().filter(|p| p.server == rank && !p.ready && !started.contains(&p.id)).copied().collect();
        for p in &mine {
            started.push(p.id);
            let h = p.owner.shard as usize;
            let tcp = listen(None, &format!("rebuilt copy of shard ({}, {h})", p.owner.server))?;
            let port = tcp.local_addr().expect("listening").port();
            let mut t = net::server_transports(vec![tcp], netopts)?.pop().expect("one transport");
            let core = ShardCore::new(&v, p.owner, &RuleRegistry::default(), kernels)
                .map_err(|e| NodeError::Shard(e.to_string()))?;
            net::export_slabs(&mut t, &core)?;
            let chain = ChainCore::new_joining(core, rank, p.id);
            let name = format!("rebuilt-{}.{h}", p.owner.server);
            tracing::info!("server {rank}: rebuilding a copy of shard ({}, {h}) on port {port}", p.owner.server);
            let cpu = placement.get(h).copied().flatten();
            threads.start(&v, t, chain, name, cpu)?;
            link.send(Control::CopyAdded { owner: p.owner, id: p.id, port })?;
        }
    };
    let lines = threads.stop(rank, copies > 1);
    for l in &lines {
        tracing::info!("server {rank} {l}");
    }
    link.close();
    Ok(outcome.map(|r| format!("server {rank} stopped: {r}"))?)
}

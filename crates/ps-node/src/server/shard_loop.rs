//! One copy of a shard on its own thread: the thread-per-core loop around
//! `ChainCore`. Between bursts it acts on a newer view, links to the next
//! copy of its chain (and a tail's shadow link to a copy being rebuilt),
//! tells the manager what its copy reached, and writes due checkpoints;
//! each burst it hands the frames it received to the chain and flushes what
//! the chain wrote. It owns its transport and its stores: nothing else
//! touches either while it runs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use ps_core::chain::{ChainCore, ChainStats};
use ps_core::control::{ClusterView, Control};
use ps_core::shard::ShardStats;
use ps_core::transport::{PeerEvent, RxFrame, Transport};

use crate::checkpoint::write_checkpoint;
use crate::control::ControlLink;
use crate::error::NodeError;
use crate::net::{self, NodeTransport};
use crate::resolve;
use crate::view::ViewBoard;

/// What one copy's thread hands back when it ends.
type UnitStats = (ShardStats, ChainStats);

/// A server's running copies: their threads, the flag and wakers that stop
/// them, and what they share (the view board, the sender to the manager).
pub(super) struct Units {
    board: Arc<ViewBoard>,
    to_manager: Sender<Control>,
    stop: Arc<AtomicBool>,
    wakers: Vec<Arc<mio::Waker>>,
    threads: Vec<(String, std::thread::JoinHandle<UnitStats>)>,
}

impl Units {
    pub(super) fn new(link: &ControlLink) -> Units {
        Units {
            board: link.board().clone(),
            to_manager: link.sender(),
            stop: Arc::new(AtomicBool::new(false)),
            wakers: Vec::new(),
            threads: Vec::new(),
        }
    }

    /// Starts the thread of one copy (`shard_loop`) on its shard's core.
    pub(super) fn start(
        &mut self,
        view: &ClusterView,
        mut t: NodeTransport,
        chain: ChainCore,
        name: String,
        cpu: Option<usize>,
    ) -> Result<(), NodeError> {
        t.set_limits(view.job.limits);
        let waker = net::waker_of(&mut t)?;
        self.board.add_waker(waker.clone());
        self.wakers.push(waker);
        let (stop, board, to_manager) = (self.stop.clone(), self.board.clone(), self.to_manager.clone());
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                }
                shard_loop(chain, t, &stop, &board, &to_manager)
            })
            .map_err(|source| NodeError::Spawn { name: name.clone(), source })?;
        self.threads.push((name, thread));
        Ok(())
    }

    /// Stops every copy's thread, waits for them, and returns one line of
    /// counters per copy (`chained`: with the chain's counters).
    pub(super) fn stop(self, rank: u32, chained: bool) -> Vec<String> {
        self.stop.store(true, Ordering::Release);
        for w in &self.wakers {
            let _ = w.wake();
        }
        let mut lines = Vec::new();
        for (name, th) in self.threads {
            match th.join() {
                Ok((s, c)) => {
                    if s.held_refused > 0 {
                        tracing::error!(
                            "server {rank} {name}: {} acknowledged pushes to sequential tables could not be merged \
                             at the end of their clock (a sparse slab is full: give the table more room)",
                            s.held_refused
                        );
                    }
                    let chain = if chained {
                        format!(
                            "; chain: {} forwarded, {} sent again to a new downstream, {} skipped as applied already, \
                             {} snapshots ({:.1} MB) sent to rebuilt copies",
                            c.forwarded,
                            c.replayed,
                            c.skipped,
                            c.snapshots,
                            c.snapshot_bytes as f64 / 1e6
                        )
                    } else {
                        String::new()
                    };
                    lines.push(format!(
                        "{name}: {} push frames, {} pull frames, {:.1} MB in, {:.1} MB out, {} refused{chain}",
                        s.push_frames,
                        s.pull_frames,
                        s.bytes_in as f64 / 1e6,
                        s.bytes_out as f64 / 1e6,
                        s.errors_sent
                    ))
                }
                Err(_) => lines.push(format!("{name}: thread panicked")),
            }
        }
        lines
    }
}

/// How long a copy waits before trying its downstream link again.
const LINK_RETRY: Duration = Duration::from_millis(50);

/// The loop of one copy's thread, until `stop`; returns its counters.
fn shard_loop(
    mut chain: ChainCore,
    mut t: NodeTransport,
    stop: &AtomicBool,
    board: &ViewBoard,
    to_manager: &Sender<Control>,
) -> UnitStats {
    let mut rx = Vec::with_capacity(64);
    let mut events = Vec::new();
    let o = chain.owner();
    let me = format!("copy of shard ({}, {})", o.server, o.shard);
    // fault injection for the tests: a slow shard (credit exhaustion, back-pressure)
    let delay =
        std::env::var("PS_TEST_SHARD_DELAY_US").ok().and_then(|v| v.parse::<u64>().ok()).map(Duration::from_micros);
    let mut seen_epoch = 0u64;
    let mut link_at = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if board.epoch() != seen_epoch {
            let v = board.get();
            seen_epoch = v.epoch;
            for p in chain.set_view(&v, &mut t) {
                t.close(p, "that copy is gone from the chain");
            }
        }
        let copy_addr = |server: u32| -> Result<SocketAddr, NodeError> {
            let v = board.get();
            let port =
                v.copy_port(o, server).ok_or(NodeError::NoPort { head: server, server: o.server, shard: o.shard })?;
            resolve(&format!("{}:{port}", v.servers[server as usize].host))
        };
        if let (Some(server), true) = (chain.link_wanted(), Instant::now() >= link_at) {
            let r = copy_addr(server).and_then(|a| {
                let peer = net::connect_copy(&mut t, a)?;
                chain.linked(peer, server, &mut t).map_err(|e| {
                    t.close(peer, "the view moved on");
                    NodeError::Transport(e.to_string())
                })
            });
            if let Err(e) = r {
                tracing::debug!("{me}: no link to server {server} yet: {e}");
                link_at = Instant::now() + LINK_RETRY;
            }
        }
        // a copy being rebuilt elsewhere: this tail sends it its state, then its frames
        if let (Some(server), true) = (chain.shadow_wanted(), Instant::now() >= link_at) {
            match copy_addr(server).and_then(|a| Ok(net::connect_copy(&mut t, a)?)) {
                Ok(peer) => chain.shadow_linked(peer, server),
                Err(e) => {
                    tracing::debug!("{me}: no link to the copy being rebuilt on server {server} yet: {e}");
                    link_at = Instant::now() + LINK_RETRY;
                }
            }
        }
        if let Some(p) = chain.shadow_peer() {
            let budget = ps_core::limits::TX_QUEUE_BYTES_MAX.saturating_sub(t.tx_pending_bytes(p)) / 2;
            chain.pump_shadow(&mut t, budget);
        }
        if chain.take_synced() {
            let id = chain.placement().expect("only placed copies are rebuilt");
            let _ = to_manager.send(Control::CopySynced { owner: o, id });
        }
        if let Some(id) = chain.take_caught_up() {
            let _ = to_manager.send(Control::CopyReady { owner: o, id });
        }
        if chain.retired() {
            tracing::info!("{me}: placed copy given up (its rebuild starts over elsewhere); thread ends");
            break;
        }
        for line in chain.drain_log() {
            tracing::info!("{line}");
        }
        let wait = if chain.shadow_peer().is_some() {
            1
        } else if chain.link_wanted().is_some() || chain.shadow_wanted().is_some() {
            20
        } else {
            200
        };
        if let Err(e) = t.rx_burst(&mut rx, Some(Duration::from_millis(wait))) {
            tracing::error!("{me}: {e}");
            break;
        }
        for f in rx.drain(..) {
            let peer = f.peer();
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            let r = chain.handle(peer, f.bytes(), &mut t);
            t.release(f);
            if let Err(e) = r {
                t.close(peer, &e.to_string());
            }
            // a clock frame may have released parked pulls whose peers are gone
            for (p, e) in chain.take_failed() {
                t.close(p, &e.to_string());
            }
        }
        if let Some(label) = chain.checkpoint_due() {
            let r = write_checkpoint(chain.core(), label).map_err(|e| e.to_string());
            if let Err(e) = &r {
                tracing::error!("{me}: checkpoint {label}: {e}");
            }
            chain.checkpoint_written(&mut t, r.map_err(Into::into));
        }
        let _ = t.flush();
        t.events(&mut events);
        for e in events.drain(..) {
            match e {
                PeerEvent::Opened { peer, hello } => tracing::debug!("{me}: {peer:?} joined as {hello:?}"),
                PeerEvent::Closed { peer, reason } => {
                    tracing::debug!("{me}: {peer:?} left: {reason}");
                    chain.on_closed(peer);
                }
            }
        }
    }
    if let Some(line) = net::stats_line(&t) {
        tracing::info!("{me} {line}");
    }
    // the transport (and the RDMA registration of the slabs) goes before the slabs
    drop(t);
    (chain.core().stats(), chain.stats())
}

//! The manager replica's runtime: its listener, the links to the other
//! replicas, the Raft log's I/O (ticks, messages, proposals, commits) and the
//! leader's effects held until the state they follow is committed. What the
//! manager decides is ps-core's (`ManagerCore`, `consensus::Replica`); this
//! file moves bytes and time and never decides anything about the job.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ps_core::auth::JobSecret;
use ps_core::client::Clock;
use ps_core::consensus::{Replica, TICK_MS};
use ps_core::control::{send_control, Control, JobSpec, Role};
use ps_core::manager::{ManagerCore, ManagerState, ManagerTimeouts, Phase};
use ps_core::transport::{FrameSink, PeerEvent, PeerHello, PeerId, RxFrame, Transport, TxError};
use ps_tcp_fallback::{TcpConfig, TcpTransport};

use crate::control::decode_control;
use crate::error::NodeError;
use crate::StdClock;

/// Frames a manager wrote, held until the state they follow is committed.
#[derive(Default)]
struct Capture(Vec<(PeerId, Vec<u8>)>);

impl FrameSink for Capture {
    fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], TxError> {
        self.0.push((peer, vec![0u8; len]));
        Ok(&mut self.0.last_mut().expect("just pushed").1)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A Raft message from another replica whose hex does not decode: a replica
/// of another version, or not a pslab manager.
#[derive(Debug, thiserror::Error)]
enum UnhexError {
    /// The text has an odd number of digits.
    #[error("a raft message's hex has an odd length {0} (is every manager replica the same pslab build?)")]
    Odd(usize),
    /// A character is not a hex digit.
    #[error("a raft message's hex has {0:?} at byte {1} (is every manager replica the same pslab build?)")]
    Digit(char, usize),
}

fn unhex(s: &str) -> Result<Vec<u8>, UnhexError> {
    if !s.len().is_multiple_of(2) {
        return Err(UnhexError::Odd(s.len()));
    }
    let digit = |i: usize| {
        let c = s.as_bytes()[i] as char;
        c.to_digit(16).map(|d| d as u8).ok_or(UnhexError::Digit(c, i))
    };
    (0..s.len()).step_by(2).map(|i| Ok(digit(i)? << 4 | digit(i + 1)?)).collect()
}

/// A committed entry of the managers' log: the state after change `seq`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Committed {
    seq: u64,
    state: ManagerState,
}

/// A manager replica, listening: [`Manager::bind`] then [`Manager::run`].
pub struct Manager {
    t: TcpTransport,
    me: usize,
    replicas: Vec<SocketAddr>,
    job: JobSpec,
    servers: u32,
    workers: u32,
}

/// One manager replica (`replicas` lists every replica's address, this one's
/// `listen` among them; empty: a lone manager). The replicas keep the
/// manager's state in a Raft log (`ps_core::consensus`); the leader runs the
/// job (`ManagerCore`) and sends what it decided only once the state that
/// follows is committed, so a new leader takes over from exactly what the
/// nodes were told. Nodes that reach a follower are told where the leader is.
///
/// Returns the job's outcome: its final message, or [`NodeError::Failed`].
pub fn run_manager(
    secret: JobSecret,
    listen: SocketAddr,
    replicas: Vec<SocketAddr>,
    job: JobSpec,
    servers: u32,
    workers: u32,
) -> Result<String, NodeError> {
    Manager::bind(secret, listen, replicas, job, servers, workers)?.run()
}

impl Manager {
    /// Checks the job, listens on `listen` and prints `@listening ADDR` (the
    /// launchers read the port from it).
    pub fn bind(
        secret: JobSecret,
        listen: SocketAddr,
        replicas: Vec<SocketAddr>,
        job: JobSpec,
        servers: u32,
        workers: u32,
    ) -> Result<Manager, NodeError> {
        job.validate().map_err(|e| NodeError::Job(e.to_string()))?;
        let replicas = if replicas.is_empty() { vec![listen] } else { replicas };
        let me = replicas
            .iter()
            .position(|a| *a == listen)
            .ok_or_else(|| NodeError::NotAReplica { listen, replicas: replicas.clone() })?;
        let mut cfg = TcpConfig::new(secret, PeerHello { role: Role::Manager as u8, node: me as u32 }, false);
        cfg.limits = job.limits;
        let t = TcpTransport::listen(cfg, listen).map_err(|source| NodeError::Listen {
            what: "manager".into(),
            addr: listen,
            source,
        })?;
        let addr = t.local_addr().expect("listening");
        // the launcher reads this line to learn the port
        println!("@listening {addr}");
        if replicas.len() == 1 {
            tracing::info!("manager on {addr}: waiting for {servers} servers and {workers} workers (app {})", job.app);
        } else {
            tracing::info!("manager replica {me} of {} on {addr} (app {})", replicas.len(), job.app);
        }
        Ok(Manager { t, me, replicas, job, servers, workers })
    }

    /// Where this replica listens (its port, when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.t.local_addr().expect("listening")
    }

    /// Runs the replica until the job's end is committed; returns the job's outcome.
    pub fn run(self) -> Result<String, NodeError> {
        let Manager { mut t, me, replicas, job, servers, workers } = self;
        let alone = replicas.len() == 1;
        let clock = StdClock(Instant::now());
        let mut raft =
            Replica::new(me as u64 + 1, replicas.len() as u64).map_err(|e| NodeError::Raft(e.to_string()))?;
        let mut core: Option<ManagerCore> = None;
        let mut committed: Option<ManagerState> = None;
        let (mut seq, mut proposed): (u64, Option<ManagerState>) = (0, None);
        // frames waiting for the commit of the state change numbered with them
        let mut held: VecDeque<(u64, Capture)> = Default::default();
        let mut links = HashMap::<u64, PeerId>::new();
        let mut link_at = HashMap::<u64, Instant>::new();
        let mut hellos = HashMap::<PeerId, PeerHello>::new();
        let mut rx = Vec::new();
        let mut events = Vec::new();
        let tick = Duration::from_millis(TICK_MS);
        let mut next_tick = Instant::now() + tick;
        let send_frames = |t: &mut TcpTransport, frames: Vec<(PeerId, Vec<u8>)>| {
            for (peer, f) in frames {
                if let Ok(buf) = FrameSink::frame(t, peer, f.len()) {
                    buf.copy_from_slice(&f);
                }
            }
        };
        loop {
            if Instant::now() >= next_tick {
                raft.tick();
                next_tick += tick;
            }
            for id in (1..=replicas.len() as u64).filter(|&id| id != me as u64 + 1) {
                if links.contains_key(&id) || link_at.get(&id).is_some_and(|&at| Instant::now() < at) {
                    continue;
                }
                match t.connect(replicas[id as usize - 1], Duration::from_millis(300)) {
                    Ok(p) => {
                        links.insert(id, p);
                    }
                    Err(_) => {
                        link_at.insert(id, Instant::now() + Duration::from_millis(200));
                    }
                }
            }
            t.rx_burst(&mut rx, Some(Duration::from_millis(if alone { 100 } else { 10 })))
                .map_err(|e| NodeError::Transport(e.to_string()))?;
            t.events(&mut events);
            for e in &events {
                if let PeerEvent::Opened { peer, hello } = e {
                    hellos.insert(*peer, *hello);
                }
            }
            let mut cap = Capture::default();
            for f in rx.drain(..) {
                let peer = f.peer();
                let hello = hellos.get(&peer).copied().unwrap_or(PeerHello { role: 0, node: 0 });
                let r = if hello.role == Role::Manager as u8 {
                    match decode_control(f.bytes()) {
                        Ok(Control::Raft { bytes }) => unhex(&bytes)
                            .map_err(|e| e.to_string())
                            .and_then(|b| raft.step(&b).map_err(|e| e.to_string())),
                        Ok(other) => Err(format!("a manager replica sent {other:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                } else if let Some(c) = core.as_mut() {
                    c.on_frame(peer, hello, f.bytes(), clock.now(), &mut cap).map_err(|e| e.to_string())
                } else {
                    // not the leader: say who is, and let the node go there
                    // (the node closes; every frame it sends meanwhile gets the same small answer)
                    let leader = raft.leader().map(|id| replicas[id as usize - 1].to_string());
                    let _ = send_control(&mut t, peer, &Control::NotLeader { leader });
                    Ok(())
                };
                t.release(f);
                if let Err(why) = r {
                    if core.is_some() || hello.role == Role::Manager as u8 {
                        tracing::debug!("dropping {peer:?}: {why}");
                    }
                    let _ = t.flush();
                    t.close(peer, &why);
                }
            }
            t.events(&mut events);
            for e in events.drain(..) {
                if let PeerEvent::Closed { peer, reason } = e {
                    hellos.remove(&peer);
                    links.retain(|_, p| *p != peer);
                    if let Some(c) = core.as_mut() {
                        c.on_closed(peer, &reason, clock.now(), &mut cap);
                    }
                }
            }
            if let Some(c) = core.as_mut() {
                c.on_tick(clock.now(), &mut cap);
                for line in c.drain_log() {
                    tracing::info!("{line}");
                }
                let state = c.state();
                if proposed.as_ref() != Some(&state) {
                    seq += 1;
                    let entry = serde_json::to_vec(&Committed { seq, state: state.clone() }).expect("state serialises");
                    raft.propose(entry).map_err(|e| NodeError::Raft(e.to_string()))?;
                    proposed = Some(state);
                    held.push_back((seq, cap));
                } else if let Some(last) = held.back_mut() {
                    // keep the order: after what waits for a commit already
                    last.1 .0.extend(cap.0);
                } else {
                    send_frames(&mut t, cap.0);
                }
            }
            for (to, bytes) in raft.take_messages() {
                if let Some(&p) = links.get(&to) {
                    let _ = send_control(&mut t, p, &Control::Raft { bytes: hex(&bytes) });
                }
            }
            for data in raft.take_committed() {
                let c: Committed = serde_json::from_slice(&data).map_err(NodeError::Committed)?;
                while held.front().is_some_and(|(s, _)| *s <= c.seq) {
                    let (_, frames) = held.pop_front().expect("looked at");
                    send_frames(&mut t, frames.0);
                }
                seq = seq.max(c.seq);
                committed = Some(c.state);
            }
            if raft.is_leader() && core.is_none() {
                let c = match committed.clone() {
                    Some(st) => ManagerCore::restore(st, ManagerTimeouts::default(), clock.now()),
                    None => ManagerCore::new(job.clone(), servers, workers, ManagerTimeouts::default()),
                };
                if !alone {
                    tracing::info!("manager replica {me} leads (term {})", raft.term());
                }
                proposed = committed.clone().or_else(|| Some(c.state()));
                core = Some(c);
            } else if !raft.is_leader() && core.is_some() {
                tracing::info!(
                    "manager replica {me} no longer leads (term {}): its nodes go to the leader",
                    raft.term()
                );
                core = None;
                held.clear();
                let nodes: Vec<PeerId> =
                    hellos.iter().filter(|(_, h)| h.role != Role::Manager as u8).map(|(p, _)| *p).collect();
                for p in nodes {
                    t.close(p, "this manager replica no longer leads");
                }
            }
            t.flush().map_err(|e| NodeError::Transport(e.to_string()))?;
            if let Some(st) = committed.as_ref().filter(|st| st.phase == Phase::Ended) {
                // the end is committed: let the last messages leave
                let until = Instant::now() + Duration::from_millis(300);
                while Instant::now() < until {
                    for (to, bytes) in raft.take_messages() {
                        if let Some(&p) = links.get(&to) {
                            let _ = send_control(&mut t, p, &Control::Raft { bytes: hex(&bytes) });
                        }
                    }
                    t.flush().ok();
                    let _ = t.rx_burst(&mut rx, Some(Duration::from_millis(20)));
                    for f in rx.drain(..) {
                        if let Ok(Control::Raft { bytes }) = decode_control(f.bytes()) {
                            let _ = unhex(&bytes).map(|b| raft.step(&b));
                        }
                        t.release(f);
                    }
                }
                return st
                    .outcome
                    .clone()
                    .unwrap_or(Err("ended without an outcome".into()))
                    .map_err(|e| NodeError::Failed(e.reason));
            }
        }
    }
}

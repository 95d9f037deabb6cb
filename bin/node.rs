//! One node of a job: the manager, a server (one pinned shard thread per core),
//! or a worker (runs the job's application). This is what `pslab node` and the
//! launchers start; everything I/O lives here, the logic in ps-core.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use ps_core::auth::JobSecret;
use ps_core::chain::ChainCore;
use ps_core::client::{Clock, Worker};
use ps_core::control::{send_control, ClusterView, Control, JobSpec, Role};
use ps_core::kernels::Kernels;
use ps_core::manager::{ManagerCore, ManagerTimeouts, Phase};
use ps_core::ring::Owner;
use ps_core::rules::RuleRegistry;
use ps_core::shard::ShardCore;
use ps_core::transport::{PeerEvent, PeerHello, PeerId, RxFrame, Transport};
use ps_core::wire::{self, Frame};
use ps_core::worker::WorkerCore;
use ps_tcp_fallback::{TcpConfig, TcpTransport};

use crate::net::{self, NetOpts, NodeTransport};

/// Wall-clock time since the process started (ps-core takes time as an input).
#[derive(Clone, Copy, Debug)]
pub struct StdClock(pub Instant);

impl Clock for StdClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

pub fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

// ------------------------------------------------------------------ manager

/// Frames a manager wrote, held until the state they follow is committed.
#[derive(Default)]
struct Capture(Vec<(PeerId, Vec<u8>)>);

impl ps_core::transport::FrameSink for Capture {
    fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], ps_core::transport::TxError> {
        self.0.push((peer, vec![0u8; len]));
        Ok(&mut self.0.last_mut().expect("just pushed").1)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd hex".into());
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string())).collect()
}

/// A committed entry of the managers' log: the state after change `seq`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Committed {
    seq: u64,
    state: ps_core::manager::ManagerState,
}

/// One manager replica (`replicas` lists every replica's address, this one's
/// `listen` among them; empty: a lone manager). The replicas keep the
/// manager's state in a Raft log (`ps_core::consensus`); the leader runs the
/// job (`ManagerCore`) and sends what it decided only once the state that
/// follows is committed, so a new leader takes over from exactly what the
/// nodes were told. Nodes that reach a follower are told where the leader is.
pub fn run_manager(
    secret: JobSecret,
    listen: SocketAddr,
    replicas: Vec<SocketAddr>,
    job: JobSpec,
    servers: u32,
    workers: u32,
) -> Result<String, String> {
    use ps_core::consensus::{Replica, TICK_MS};
    use ps_core::manager::ManagerState;
    job.validate()?;
    let replicas = if replicas.is_empty() { vec![listen] } else { replicas };
    let me = replicas.iter().position(|a| *a == listen).ok_or_else(|| {
        format!("--listen {listen} must be one of the manager replicas {replicas:?} (this replica's own address)")
    })?;
    let mut cfg = TcpConfig::new(secret, PeerHello { role: Role::Manager as u8, node: me as u32 }, false);
    cfg.limits = job.limits;
    let mut t = TcpTransport::listen(cfg, listen).map_err(|e| format!("manager cannot listen on {listen}: {e}"))?;
    let addr = t.local_addr().expect("listening");
    // the launcher reads this line to learn the port
    println!("@listening {addr}");
    let alone = replicas.len() == 1;
    if alone {
        tracing::info!("manager on {addr}: waiting for {servers} servers and {workers} workers (app {})", job.app);
    } else {
        tracing::info!("manager replica {me} of {} on {addr} (app {})", replicas.len(), job.app);
    }
    let clock = StdClock(Instant::now());
    let mut raft = Replica::new(me as u64 + 1, replicas.len() as u64)?;
    let mut core: Option<ManagerCore> = None;
    let mut committed: Option<ManagerState> = None;
    let (mut seq, mut proposed): (u64, Option<ManagerState>) = (0, None);
    // frames waiting for the commit of the state change numbered with them
    let mut held: std::collections::VecDeque<(u64, Capture)> = Default::default();
    let mut links = std::collections::HashMap::<u64, PeerId>::new();
    let mut link_at = std::collections::HashMap::<u64, Instant>::new();
    let mut hellos = std::collections::HashMap::<PeerId, PeerHello>::new();
    let mut rx = Vec::new();
    let mut events = Vec::new();
    let tick = Duration::from_millis(TICK_MS);
    let mut next_tick = Instant::now() + tick;
    let send_frames = |t: &mut TcpTransport, frames: Vec<(PeerId, Vec<u8>)>| {
        for (peer, f) in frames {
            if let Ok(buf) = ps_core::transport::FrameSink::frame(t, peer, f.len()) {
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
        t.rx_burst(&mut rx, Some(Duration::from_millis(if alone { 100 } else { 10 }))).map_err(|e| e.to_string())?;
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
                    Ok(Control::Raft { bytes }) => unhex(&bytes).and_then(|b| raft.step(&b)),
                    Ok(other) => Err(format!("a manager replica sent {other:?}")),
                    Err(e) => Err(e),
                }
            } else if let Some(c) = core.as_mut() {
                c.on_frame(peer, hello, f.bytes(), clock.now(), &mut cap)
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
                raft.propose(entry)?;
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
            let c: Committed = serde_json::from_slice(&data).map_err(|e| format!("a committed manager state: {e}"))?;
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
            tracing::info!("manager replica {me} no longer leads (term {}): its nodes go to the leader", raft.term());
            core = None;
            held.clear();
            let nodes: Vec<PeerId> =
                hellos.iter().filter(|(_, h)| h.role != Role::Manager as u8).map(|(p, _)| *p).collect();
            for p in nodes {
                t.close(p, "this manager replica no longer leads");
            }
        }
        t.flush().map_err(|e| e.to_string())?;
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
                        let _ = unhex(&bytes).and_then(|b| raft.step(&b));
                    }
                    t.release(f);
                }
            }
            return st.outcome.clone().unwrap_or(Err("ended without an outcome".into()));
        }
    }
}

// ------------------------------------------------------------------ control link

/// What a node's control thread tells its main thread.
#[derive(Debug)]
pub enum Notice {
    Released(String),
    Shutdown(String),
    Abort(String),
}

/// The newest view the manager published (`Control::View`), shared by a
/// node's threads: the control thread sets it and wakes the shard threads,
/// which act on it between bursts; a worker's reconnections read it.
pub struct ViewBoard {
    epoch: AtomicU64,
    view: Mutex<ClusterView>,
    wakers: Mutex<Vec<Arc<mio::Waker>>>,
}

impl ViewBoard {
    pub fn new(view: ClusterView) -> Arc<Self> {
        Arc::new(Self { epoch: AtomicU64::new(view.epoch), view: Mutex::new(view), wakers: Mutex::new(Vec::new()) })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn get(&self) -> ClusterView {
        self.view.lock().expect("view lock").clone()
    }

    /// Takes `view` if it is newer, and wakes every registered thread.
    pub fn set(&self, view: ClusterView) {
        let mut v = self.view.lock().expect("view lock");
        if view.epoch <= v.epoch {
            return;
        }
        self.epoch.store(view.epoch, Ordering::Release);
        *v = view;
        drop(v);
        for w in self.wakers.lock().expect("wakers lock").iter() {
            let _ = w.wake();
        }
    }

    pub fn add_waker(&self, w: Arc<mio::Waker>) {
        self.wakers.lock().expect("wakers lock").push(w);
    }
}

/// A node's link to the manager: registration, then a thread that sends
/// heartbeats and relays barriers and the end of the job.
pub struct ControlLink {
    to_thread: Sender<Control>,
    notices: Receiver<Notice>,
    thread: Option<std::thread::JoinHandle<()>>,
    board: Arc<ViewBoard>,
}

impl ControlLink {
    /// Connects (retrying while the manager starts), registers, and waits for
    /// the view. `managers` lists the manager replicas: the leader accepts,
    /// the others say where it is.
    pub fn register(
        secret: JobSecret,
        managers: &[SocketAddr],
        role: Role,
        host: &str,
        ports: Vec<u16>,
        rank: Option<u32>,
        limits: ps_core::limits::WireLimits,
    ) -> Result<(u32, ClusterView, ControlLink), String> {
        let mut cfg = TcpConfig::new(secret, PeerHello { role: role as u8, node: std::process::id() }, true);
        cfg.limits = limits;
        let mut t = TcpTransport::client(cfg).map_err(|e| e.to_string())?;
        let register = Control::Register { role, host: host.to_string(), ports, pid: std::process::id(), rank };
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut next = 0usize;
        let mut rx = Vec::new();
        let mut events = Vec::new();
        let (peer, rank, view) = 'found: loop {
            if Instant::now() > deadline {
                return Err(format!("no cluster view from the manager at {managers:?} within 3 minutes"));
            }
            let addr = managers[next % managers.len()];
            next += 1;
            let peer = match t.connect(addr, Duration::from_secs(5)) {
                Ok(p) => p,
                Err(ps_tcp_fallback::ConnectError::Connect { .. }) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                // one of several replicas may be gone: the next one, then
                Err(e) if managers.len() > 1 => {
                    tracing::debug!("manager replica at {addr}: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) => return Err(format!("manager at {addr}: {e}")),
            };
            send_control(&mut t, peer, &register).map_err(|e| e.to_string())?;
            t.flush().map_err(|e| e.to_string())?;
            'wait: loop {
                t.rx_burst(&mut rx, Some(Duration::from_millis(500))).map_err(|e| e.to_string())?;
                for f in rx.drain(..) {
                    let msg = decode_control(f.bytes());
                    t.release(f);
                    match msg? {
                        Control::Welcome { rank, view } => break 'found (peer, rank, view),
                        Control::Abort { reason } => return Err(format!("the manager refused us: {reason}")),
                        Control::NotLeader { leader } => {
                            // the leader next, if this replica knows it
                            if let Some(i) = leader.and_then(|l| managers.iter().position(|m| m.to_string() == l)) {
                                next = i;
                            } else {
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            t.close(peer, "not the leader");
                            break 'wait;
                        }
                        other => tracing::debug!("ignoring {other:?} before the welcome"),
                    }
                }
                t.events(&mut events);
                if let Some(PeerEvent::Closed { reason, .. }) =
                    events.drain(..).find(|e| matches!(e, PeerEvent::Closed { peer: p, .. } if *p == peer))
                {
                    if managers.len() == 1 {
                        return Err(format!("the manager closed the connection before the job started: {reason}"));
                    }
                    break 'wait;
                }
                if Instant::now() > deadline {
                    break 'wait;
                }
            }
            t.events(&mut events);
        };
        let (to_thread, from_main) = bounded::<Control>(64);
        let (notify, notices) = bounded::<Notice>(64);
        let board = ViewBoard::new(view.clone());
        let thread_board = board.clone();
        let link =
            Relink { managers: managers.to_vec(), rejoin: Control::Rejoin { role, rank, pid: std::process::id() } };
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control_loop(t, peer, from_main, notify, thread_board, link))
            .map_err(|e| e.to_string())?;
        Ok((rank, view, ControlLink { to_thread, notices, thread: Some(thread), board }))
    }

    pub fn notices(&self) -> &Receiver<Notice> {
        &self.notices
    }

    /// The newest view the manager published.
    pub fn board(&self) -> &Arc<ViewBoard> {
        &self.board
    }

    /// A sender for other threads' messages to the manager.
    pub fn sender(&self) -> Sender<Control> {
        self.to_thread.clone()
    }

    /// Sends a control message to the manager.
    pub fn send(&self, msg: Control) -> Result<(), String> {
        self.to_thread.send(msg).map_err(|_| "control link is gone".to_string())
    }

    /// Blocks until every worker reached barrier `name`.
    pub fn barrier(&self, name: &str) -> Result<(), String> {
        self.to_thread.send(Control::Barrier { name: name.to_string() }).map_err(|_| "control link is gone")?;
        loop {
            match self.notices.recv() {
                Ok(Notice::Released(n)) if n == name => return Ok(()),
                Ok(Notice::Released(n)) => tracing::warn!("released from barrier {n:?} while waiting for {name:?}"),
                Ok(Notice::Abort(r)) => return Err(format!("job aborted: {r}")),
                Ok(Notice::Shutdown(r)) => return Err(format!("job shut down during barrier {name:?}: {r}")),
                Err(_) => return Err("control link is gone".into()),
            }
        }
    }

    /// Closes the link (the manager sees the connection end).
    pub fn close(mut self) {
        drop(std::mem::replace(&mut self.to_thread, bounded(1).0));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Tells the manager this node's program ended, and waits for the end of the job.
    pub fn done(mut self, ok: bool, message: &str) -> Result<(), String> {
        let _ = self.to_thread.send(Control::Done { ok, message: message.to_string() });
        let r = match self.notices.recv_timeout(Duration::from_secs(30)) {
            Ok(Notice::Shutdown(_)) => Ok(()),
            Ok(Notice::Abort(r)) if ok => Err(format!("job aborted: {r}")),
            Ok(_) | Err(_) => Ok(()),
        };
        drop(self.to_thread);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        r
    }
}

fn decode_control(frame: &[u8]) -> Result<Control, String> {
    match wire::decode(frame, ps_core::limits::FRAME_BYTES_MAX)
        .map_err(|e| format!("bad frame from the manager: {e}"))?
    {
        Frame::Control(j) => Control::from_json(j).map_err(|e| e.to_string()),
        other => Err(format!("unexpected frame from the manager: {other:?}")),
    }
}

/// What a node needs to find a new manager leader after losing the old one.
struct Relink {
    managers: Vec<SocketAddr>,
    rejoin: Control,
}

/// How long a node looks for a new manager leader before it gives up.
const MANAGER_RELINK_S: u64 = 30;

/// Connects to the manager replica that leads now and rejoins there (the
/// others answer `NotLeader` and close); `None` after `MANAGER_RELINK_S`.
fn relink(t: &mut TcpTransport, link: &Relink) -> Option<PeerId> {
    let deadline = Instant::now() + Duration::from_secs(MANAGER_RELINK_S);
    let mut rx = Vec::new();
    let mut events = Vec::new();
    let mut next = 0usize;
    while Instant::now() < deadline {
        let addr = link.managers[next % link.managers.len()];
        next += 1;
        let Ok(peer) = t.connect(addr, Duration::from_millis(500)) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if send_control(t, peer, &link.rejoin).is_err() || t.flush().is_err() {
            continue;
        }
        // the leader answers with the view; a follower says who leads
        let until = Instant::now() + Duration::from_secs(2);
        let mut answer = None;
        while answer.is_none() && Instant::now() < until {
            if t.rx_burst(&mut rx, Some(Duration::from_millis(50))).is_err() {
                break;
            }
            for f in rx.drain(..) {
                answer = answer.or(Some(decode_control(f.bytes())));
                t.release(f);
            }
            t.events(&mut events);
            if events.drain(..).any(|e| matches!(e, PeerEvent::Closed { peer: p, .. } if p == peer)) && answer.is_none()
            {
                answer = Some(Err("closed".into()));
            }
        }
        match answer {
            Some(Ok(Control::View { view })) => {
                tracing::info!("rejoined the manager leader at {addr} (view {})", view.epoch);
                return Some(peer);
            }
            Some(Ok(Control::NotLeader { leader })) => {
                if let Some(i) = leader.and_then(|l| link.managers.iter().position(|m| m.to_string() == l)) {
                    next = i;
                }
            }
            Some(Ok(Control::Abort { reason })) => {
                tracing::error!("job aborted by the manager: {reason}");
                eprintln!("error: job aborted: {reason}");
                std::process::exit(1);
            }
            _ => {}
        }
        t.close(peer, "looking for the manager leader");
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn control_loop(
    mut t: TcpTransport,
    mut peer: PeerId,
    from_main: Receiver<Control>,
    notify: Sender<Notice>,
    board: Arc<ViewBoard>,
    link: Relink,
) {
    let mut rx = Vec::new();
    let mut events = Vec::new();
    let interval = Duration::from_millis(ps_core::limits::HEARTBEAT_INTERVAL_MS);
    let mut next_beat = Instant::now();
    // what a new leader must hear again: it may have been lost with the old one
    let mut waiting_barrier: Option<Control> = None;
    let mut sent_done: Option<Control> = None;
    let mut sent_copies: Option<Control> = None;
    loop {
        if Instant::now() >= next_beat {
            let _ = send_control(&mut t, peer, &Control::Heartbeat);
            next_beat = Instant::now() + interval;
        }
        loop {
            match from_main.try_recv() {
                Ok(msg) => {
                    match &msg {
                        Control::Barrier { .. } => waiting_barrier = Some(msg.clone()),
                        Control::Done { .. } => sent_done = Some(msg.clone()),
                        Control::Copies { .. } => sent_copies = Some(msg.clone()),
                        _ => {}
                    }
                    let _ = send_control(&mut t, peer, &msg);
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    let _ = t.flush();
                    return;
                }
            }
        }
        let _ = t.flush();
        if t.rx_burst(&mut rx, Some(Duration::from_millis(20))).is_err() {
            let _ = notify.send(Notice::Abort("control link failed".into()));
            return;
        }
        for f in rx.drain(..) {
            let msg = decode_control(f.bytes());
            t.release(f);
            let n = match msg {
                Ok(Control::Released { name }) => {
                    if matches!(&waiting_barrier, Some(Control::Barrier { name: n }) if *n == name) {
                        waiting_barrier = None;
                    }
                    Notice::Released(name)
                }
                Ok(Control::Shutdown { reason }) => Notice::Shutdown(reason),
                Ok(Control::Abort { reason }) => {
                    // the job is over: whatever the main thread is blocked in (a wait
                    // on a server that went silent, a barrier), this process stops now
                    tracing::error!("job aborted by the manager: {reason}");
                    eprintln!("error: job aborted: {reason}");
                    std::process::exit(1);
                }
                Ok(Control::View { view }) => {
                    tracing::debug!(
                        "view {}: dead servers {:?}, dead workers {:?}",
                        view.epoch,
                        view.dead_servers,
                        view.dead_workers
                    );
                    board.set(view);
                    continue;
                }
                Ok(other) => {
                    tracing::debug!("ignoring {other:?}");
                    continue;
                }
                Err(e) => Notice::Abort(e),
            };
            let _ = notify.send(n);
        }
        t.events(&mut events);
        let lost = events.drain(..).find_map(|e| match e {
            PeerEvent::Closed { peer: p, reason } if p == peer => Some(reason),
            _ => None,
        });
        if let Some(reason) = lost {
            if link.managers.len() == 1 {
                let _ = notify.send(Notice::Abort(format!("lost the manager: {reason}")));
                return;
            }
            tracing::warn!("lost the manager leader ({reason}); looking for the new one");
            match relink(&mut t, &link) {
                Some(p) => {
                    peer = p;
                    for msg in [&sent_copies, &waiting_barrier, &sent_done].into_iter().flatten() {
                        let _ = send_control(&mut t, peer, msg);
                    }
                }
                None => {
                    let _ = notify.send(Notice::Abort(format!(
                        "lost the manager ({reason}) and found no new leader within {MANAGER_RELINK_S} s"
                    )));
                    return;
                }
            }
        }
    }
}

// ------------------------------------------------------------------ server

pub struct ServerOpts {
    pub host: String,
    pub shards: usize,
    pub port_base: u16,
    /// cores to pin shard threads to, in order; empty: all cores, round-robin
    pub cpus: Vec<usize>,
    pub pin: bool,
    /// the rank to ask the manager for
    pub rank: Option<u32>,
}

/// Where checkpoints go: `PS_CHECKPOINT_DIR` (default `pslab-checkpoints`), one
/// directory per checkpoint (`ckpt-LABEL`), one file per shard. On several
/// machines it must be a shared file system for `--resume` to find them all.
pub fn checkpoint_dir() -> std::path::PathBuf {
    std::env::var_os("PS_CHECKPOINT_DIR").map_or_else(|| "pslab-checkpoints".into(), Into::into)
}

fn checkpoint_file(dir: &std::path::Path, server: u32, shard: u32) -> std::path::PathBuf {
    dir.join(format!("server{server}-shard{shard}.ckpt"))
}

/// Writes a shard's checkpoint whole or not at all (a temporary file, synced, renamed).
fn write_checkpoint(core: &ShardCore, label: u64) -> Result<(), String> {
    use std::io::Write;
    let dir = checkpoint_dir().join(format!("ckpt-{label}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let o = core.owner();
    let path = checkpoint_file(&dir, o.server, o.shard);
    let tmp = path.with_extension("tmp");
    let bytes = core.snapshot(label);
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(
        "server {} shard {}: checkpoint {label}: {} bytes in {}",
        o.server,
        o.shard,
        bytes.len(),
        path.display()
    );
    Ok(())
}

/// Restores a shard from `PS_RESUME` (a checkpoint directory), if set.
#[allow(unsafe_code)]
fn resume(core: &mut ShardCore) -> Result<(), String> {
    let Some(dir) = std::env::var_os("PS_RESUME") else { return Ok(()) };
    let o = core.owner();
    let path = checkpoint_file(std::path::Path::new(&dir), o.server, o.shard);
    let f = std::fs::File::open(&path).map_err(|e| {
        format!("PS_RESUME: {}: {e} (a job resumes with the same servers and shards per server)", path.display())
    })?;
    // SAFETY: read-only and private; checkpoint files are written whole under
    // another name and renamed, never changed in place.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| format!("{}: mmap: {e}", path.display()))?;
    let label = core.restore(&map).map_err(|e| {
        format!(
            "PS_RESUME: {}: {e} (a job resumes with the same servers, shards per server and tables)",
            path.display()
        )
    })?;
    tracing::info!("server {} shard {}: resumed from checkpoint {label} ({})", o.server, o.shard, path.display());
    Ok(())
}

/// The merge kernels: the best this CPU has, or `PS_KERNELS=scalar|avx2|avx512`
/// (for comparing them, and for emulators where wide SIMD is slow).
fn kernels_from_env() -> Result<&'static Kernels, String> {
    use ps_core::kernels::Isa;
    let Ok(want) = std::env::var("PS_KERNELS") else { return Ok(Kernels::best()) };
    let isa = match want.as_str() {
        "scalar" => Isa::Scalar,
        "avx2" => Isa::Avx2,
        "avx512" => Isa::Avx512,
        other => return Err(format!("PS_KERNELS={other:?}: use scalar, avx2 or avx512")),
    };
    Kernels::for_isa(isa).ok_or_else(|| format!("PS_KERNELS={want}: this CPU does not support it"))
}

pub fn run_server(
    secret: JobSecret,
    managers: &[SocketAddr],
    opts: ServerOpts,
    netopts: &NetOpts,
) -> Result<String, String> {
    let shards = opts.shards.max(1);
    // `h`: the port's place after --port-base (none: any free port)
    let listen = |h: Option<usize>, what: &str| -> Result<TcpTransport, String> {
        let port = match h {
            Some(h) if opts.port_base != 0 => opts.port_base + h as u16,
            _ => 0,
        };
        let h = h.unwrap_or(0);
        let addr = resolve(&format!("{}:{port}", opts.host))?;
        let cfg = TcpConfig::new(secret.clone(), PeerHello { role: Role::Server as u8, node: h as u32 }, false);
        TcpTransport::listen(cfg, addr).map_err(|e| format!("{what} cannot listen on {addr}: {e}"))
    };
    let mut transports = Vec::with_capacity(shards);
    let mut ports = Vec::with_capacity(shards);
    for h in 0..shards {
        let t = listen(Some(h), &format!("shard {h}"))?;
        ports.push(t.local_addr().expect("listening").port());
        transports.push(t);
    }
    let transports = net::server_transports(transports, netopts)?;
    let (rank, view, link) = ControlLink::register(
        secret.clone(),
        managers,
        Role::Server,
        &opts.host,
        ports.clone(),
        opts.rank,
        Default::default(),
    )?;
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
    let stop = Arc::new(AtomicBool::new(false));
    let mut wakers = Vec::new();
    let mut threads = Vec::new();
    for ((owner, h, name), mut t) in units.into_iter().zip(all) {
        let mut core = ShardCore::new(&view, owner, &RuleRegistry::default(), kernels)?;
        resume(&mut core)?;
        net::export_slabs(&mut t, &core)?;
        let chain = ChainCore::new(core, rank, view.chain(owner));
        threads
            .push((name.clone(), start_unit(&view, &board, &stop, &link, t, chain, name, placement[h], &mut wakers)?));
    }
    // copies placed on this server after a failover (rebuilds), started as the views name them
    let mut started: Vec<u64> = Vec::new();
    let mut seen_epoch = board.epoch();
    let outcome = loop {
        match link.notices().recv_timeout(Duration::from_millis(100)) {
            Ok(Notice::Shutdown(r)) => break Ok(r),
            Ok(Notice::Abort(r)) => break Err(format!("job aborted: {r}")),
            Ok(Notice::Released(_)) | Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break Err("control link is gone".into()),
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
            let core = ShardCore::new(&v, p.owner, &RuleRegistry::default(), kernels)?;
            net::export_slabs(&mut t, &core)?;
            let chain = ChainCore::new_joining(core, rank, p.id);
            let name = format!("rebuilt-{}.{h}", p.owner.server);
            tracing::info!("server {rank}: rebuilding a copy of shard ({}, {h}) on port {port}", p.owner.server);
            let cpu = placement.get(h).copied().flatten();
            threads.push((name.clone(), start_unit(&v, &board, &stop, &link, t, chain, name, cpu, &mut wakers)?));
            link.send(Control::CopyAdded { owner: p.owner, id: p.id, port })?;
        }
    };
    stop.store(true, Ordering::Release);
    for w in &wakers {
        let _ = w.wake();
    }
    let mut lines = Vec::new();
    for (name, th) in threads {
        match th.join() {
            Ok((s, c)) => {
                if s.held_refused > 0 {
                    tracing::error!(
                        "server {rank} {name}: {} acknowledged pushes to sequential tables could not be merged \
                         at the end of their clock (a sparse slab is full: give the table more room)",
                        s.held_refused
                    );
                }
                let chain = if copies > 1 {
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
    for l in &lines {
        tracing::info!("server {rank} {l}");
    }
    link.close();
    outcome.map(|r| format!("server {rank} stopped: {r}"))
}

/// Starts the thread of one copy (`shard_loop`) on its shard's core.
#[allow(clippy::too_many_arguments)]
fn start_unit(
    view: &ClusterView,
    board: &Arc<ViewBoard>,
    stop: &Arc<AtomicBool>,
    link: &ControlLink,
    mut t: NodeTransport,
    chain: ChainCore,
    name: String,
    cpu: Option<usize>,
    wakers: &mut Vec<Arc<mio::Waker>>,
) -> Result<std::thread::JoinHandle<(ps_core::shard::ShardStats, ps_core::chain::ChainStats)>, String> {
    t.set_limits(view.job.limits);
    let waker = net::waker_of(&mut t).map_err(|e| e.to_string())?;
    board.add_waker(waker.clone());
    wakers.push(waker);
    let (stop, board, to_manager) = (stop.clone(), board.clone(), link.sender());
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if let Some(cpu) = cpu {
                core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
            }
            shard_loop(chain, t, &stop, &board, &to_manager)
        })
        .map_err(|e| e.to_string())
}

/// How long a copy waits before trying its downstream link again.
const LINK_RETRY: Duration = Duration::from_millis(50);

fn shard_loop(
    mut chain: ChainCore,
    mut t: NodeTransport,
    stop: &AtomicBool,
    board: &ViewBoard,
    to_manager: &Sender<Control>,
) -> (ps_core::shard::ShardStats, ps_core::chain::ChainStats) {
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
        let copy_addr = |server: u32| -> Result<SocketAddr, String> {
            let v = board.get();
            let port = v.copy_port(o, server).ok_or("its port is not known yet")?;
            resolve(&format!("{}:{port}", v.servers[server as usize].host))
        };
        if let (Some(server), true) = (chain.link_wanted(), Instant::now() >= link_at) {
            let r = copy_addr(server).and_then(|a| {
                let peer = net::connect_copy(&mut t, a)?;
                chain.linked(peer, server, &mut t).map_err(|e| {
                    t.close(peer, "the view moved on");
                    e.to_string()
                })
            });
            if let Err(e) = r {
                tracing::debug!("{me}: no link to server {server} yet: {e}");
                link_at = Instant::now() + LINK_RETRY;
            }
        }
        // a copy being rebuilt elsewhere: this tail sends it its state, then its frames
        if let (Some(server), true) = (chain.shadow_wanted(), Instant::now() >= link_at) {
            match copy_addr(server).and_then(|a| net::connect_copy(&mut t, a)) {
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
            let r = write_checkpoint(chain.core(), label);
            if let Err(e) = &r {
                tracing::error!("{me}: checkpoint {label}: {e}");
            }
            chain.checkpoint_written(&mut t, r);
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

// ------------------------------------------------------------------ worker

pub type PsWorker = Worker<NodeTransport, StdClock>;

/// What an application gets: its rank, the view, the PS client and the control link.
pub struct WorkerCtx {
    pub rank: u32,
    pub view: ClusterView,
    pub ps: PsWorker,
    pub link: ControlLink,
}

impl WorkerCtx {
    pub fn barrier(&self, name: &str) -> Result<(), String> {
        self.link.barrier(name)
    }

    pub fn workers(&self) -> u32 {
        self.view.workers
    }

    /// Workers the manager found dead so far (the job goes on without them).
    pub fn dead_workers(&self) -> std::collections::BTreeSet<u32> {
        self.link.board().get().dead_workers.into_iter().collect()
    }

    /// A machine-readable line for the launcher (`@kind {json}`).
    pub fn emit(&self, kind: &str, value: serde_json::Value) {
        println!("@{kind} {value}");
    }
}

/// A PS client connected to every shard of `view` (TCP, moved to RDMA as
/// `netopts` and the shards allow); `node` is its id in the handshakes.
pub fn connect_client(secret: JobSecret, view: &ClusterView, node: u32, netopts: &NetOpts) -> Result<PsWorker, String> {
    let ring = view.ring().map_err(|e| e.to_string())?;
    let mut cfg = TcpConfig::new(secret, PeerHello { role: Role::Worker as u8, node }, true);
    cfg.limits = view.job.limits;
    let tcp = TcpTransport::client(cfg).map_err(|e| e.to_string())?;
    let mut t = net::worker_transport(tcp, netopts)?;
    t.set_limits(view.job.limits);
    let mut peers = Vec::new();
    let mut modes = std::collections::BTreeMap::<String, usize>::new();
    for s in &view.servers {
        let mut row = Vec::new();
        for h in 0..s.ports.len() {
            let owner = Owner { server: s.rank, shard: h as u32 };
            let addr = head_addr(view, owner)?;
            let (peer, mode) = net::connect_shard(&mut t, addr, netopts)
                .map_err(|e| format!("server {} shard {h} at {addr}: {e}", s.rank))?;
            *modes.entry(mode).or_default() += 1;
            row.push(peer);
        }
        peers.push(row);
    }
    let modes: Vec<String> = modes.iter().map(|(m, n)| format!("{n} shards over {m}")).collect();
    tracing::info!("client {node}: transport: {}", modes.join(", "));
    let core = WorkerCore::new(&view.job.tables, ring, peers, view.job.limits);
    Ok(Worker::new(core, t, StdClock(Instant::now()), Duration::from_secs(120)))
}

/// Where the copy of `owner` that is the head of its chain now listens.
fn head_addr(view: &ClusterView, owner: Owner) -> Result<SocketAddr, String> {
    let head =
        view.head(owner).ok_or_else(|| format!("every copy of shard ({}, {}) is gone", owner.server, owner.shard))?;
    let port = view.copy_port(owner, head).ok_or_else(|| {
        format!("server {head} has not said where its copy of shard ({}, {}) is", owner.server, owner.shard)
    })?;
    resolve(&format!("{}:{port}", view.servers[head as usize].host))
}

/// Failover for a replicated job's worker (`--copies` above 1): a lost
/// connection is replaced by one to the head the manager's newest view names,
/// and each failover is reported (`@failover`: which shard, where to, and the
/// time from noticing the loss to the new head's first answer).
pub fn enable_failover(ps: &mut PsWorker, rank: u32, board: Arc<ViewBoard>, netopts: &NetOpts) -> Result<(), String> {
    let net = netopts.clone();
    let reconnect_board = board.clone();
    let reconnect = Box::new(move |t: &mut NodeTransport, owner: Owner| {
        let view = reconnect_board.get();
        let addr = head_addr(&view, owner)?;
        net::connect_shard(t, addr, &net).map(|(peer, _)| peer)
    });
    let on_failover = Box::new(move |owner: Owner, took: Duration| {
        let view = board.get();
        let head = view.head(owner).unwrap_or(owner.server);
        tracing::info!(
            "worker {rank}: shard ({}, {}) failed over to server {head}: {:.0} ms from the lost connection to its first answer",
            owner.server,
            owner.shard,
            took.as_secs_f64() * 1e3
        );
        println!(
            "@failover {}",
            serde_json::json!({"worker": rank, "server": owner.server, "shard": owner.shard, "to": head, "ms": took.as_secs_f64() * 1e3})
        );
    });
    ps.enable_failover(rank, reconnect, on_failover).map_err(|e| e.to_string())
}

pub fn run_worker(
    secret: JobSecret,
    managers: &[SocketAddr],
    host: &str,
    rank: Option<u32>,
    netopts: &NetOpts,
) -> Result<String, String> {
    let (rank, view, link) =
        ControlLink::register(secret.clone(), managers, Role::Worker, host, vec![], rank, Default::default())?;
    match crate::placement::topology() {
        Ok(topo) => match crate::placement::plan_worker(&topo, net::device_name(netopts).as_deref()) {
            (Some(cpus), why) => match crate::placement::bind_current(&topo, &cpus) {
                Ok(()) => tracing::info!("worker {rank} placement: CPUs {cpus:?}: {why}"),
                Err(e) => tracing::warn!("worker {rank}: not bound to CPUs {cpus:?} ({e})"),
            },
            (None, why) => tracing::info!("worker {rank} placement: not bound: {why}"),
        },
        Err(e) => tracing::warn!("worker {rank}: no placement ({e})"),
    }
    let mut ps = connect_client(secret, &view, rank, netopts)?;
    ps.core_mut().set_rank(rank);
    if view.copies() > 1 {
        enable_failover(&mut ps, rank, link.board().clone(), netopts)?;
    }
    let app = view.job.app.clone();
    let mut ctx = WorkerCtx { rank, view, ps, link };
    let result = crate::apps::run(&app, &mut ctx);
    if let Some(line) = net::stats_line(ctx.ps.transport_mut()) {
        tracing::info!("worker {rank} {line}");
    }
    let WorkerCtx { link, .. } = ctx;
    match result {
        Ok(msg) => {
            link.done(true, &msg)?;
            Ok(msg)
        }
        Err(e) => {
            let _ = link.done(false, &e);
            Err(e)
        }
    }
}

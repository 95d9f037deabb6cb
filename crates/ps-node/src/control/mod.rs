//! A node's link to the manager: registration (find the leading replica,
//! register, wait for the welcome and the view), then the control thread
//! (`thread.rs`) that sends heartbeats, relays barriers, copies and the end
//! of the job, and rejoins a new leader. Servers and workers hold a
//! [`ControlLink`]; the manager never does. No data frame goes over it.

mod thread;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use ps_core::auth::JobSecret;
use ps_core::control::{send_control, ClusterView, Control, Role};
use ps_core::transport::{PeerEvent, PeerHello, RxFrame, Transport};
use ps_core::wire::{self, Frame};
use ps_tcp_fallback::{TcpConfig, TcpTransport};

use crate::error::ControlError;
use crate::view::ViewBoard;

/// How long registration waits for the manager (it may still be starting).
const REGISTER_S: u64 = 180;

/// What a node's control thread tells its main thread.
#[derive(Debug)]
pub enum Notice {
    /// The manager released barrier `name`: every live worker reached it.
    Released(String),
    /// The manager ended the job (the reason): the node returns it as its last line.
    Shutdown(String),
    /// The job was aborted (the reason); the node fails with `job aborted: ...`.
    Abort(String),
}

/// Who registers with the manager.
#[derive(Clone, Debug)]
pub struct Member {
    pub(crate) role: Role,
    /// the address others reach this node at
    pub host: String,
    /// a server's shard ports (none for a worker)
    pub ports: Vec<u16>,
    /// the rank to ask for among its role (`None`: the lowest free)
    pub rank: Option<u32>,
    /// what tells this node apart from another of its role on its host: the
    /// process id for a process (a manager leader that welcomed it already
    /// knows it again by this), a distinct number per node in one process
    pub pid: u32,
    /// what the node does when the manager aborts the job
    pub on_abort: OnAbort,
}

/// What a node does when the manager aborts the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnAbort {
    /// End the process at once (`exit(1)`, the reason on stderr): whatever
    /// its threads are blocked in, the job is over. What a node process does.
    #[default]
    ExitProcess,
    /// Tell the node's main thread (`Notice::Abort`), which returns
    /// `job aborted: ...`; for nodes that share a process (tests). A thread
    /// blocked on a silent server waits out its timeout first.
    Notify,
}

/// A node's link to the manager: registration, then a thread that sends
/// heartbeats and relays barriers and the end of the job.
///
/// When the manager aborts the job, the control thread does what
/// [`Member::on_abort`] says.
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
        member: Member,
        limits: ps_core::limits::WireLimits,
    ) -> Result<(u32, ClusterView, ControlLink), ControlError> {
        let Member { role, host, ports, rank, pid, on_abort } = member;
        let mut cfg = TcpConfig::new(secret, PeerHello { role: role as u8, node: pid }, true);
        cfg.limits = limits;
        let mut t = TcpTransport::client(cfg).map_err(|e| ControlError::Transport(e.to_string()))?;
        let register = Control::Register { role, host, ports, pid, rank };
        let deadline = Instant::now() + Duration::from_secs(REGISTER_S);
        let mut next = 0usize;
        let mut rx = Vec::new();
        let mut events = Vec::new();
        let (peer, rank, view) = 'found: loop {
            if Instant::now() > deadline {
                return Err(ControlError::NoView { managers: managers.to_vec() });
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
                Err(source) => return Err(ControlError::Manager { addr, source }),
            };
            send_control(&mut t, peer, &register).map_err(|e| ControlError::Transport(e.to_string()))?;
            t.flush().map_err(|e| ControlError::Transport(e.to_string()))?;
            'wait: loop {
                t.rx_burst(&mut rx, Some(Duration::from_millis(500)))
                    .map_err(|e| ControlError::Transport(e.to_string()))?;
                for f in rx.drain(..) {
                    let msg = decode_control(f.bytes());
                    t.release(f);
                    match msg? {
                        Control::Welcome { rank, view } => break 'found (peer, rank, view),
                        Control::Abort { reason } => return Err(ControlError::Refused(reason)),
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
                        return Err(ControlError::ClosedEarly(reason));
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
        let relink =
            thread::Relink { managers: managers.to_vec(), rejoin: Control::Rejoin { role, rank, pid }, on_abort };
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || thread::control_loop(t, peer, from_main, notify, thread_board, relink))
            .map_err(|e| ControlError::Transport(format!("cannot start the control thread: {e}")))?;
        Ok((rank, view, ControlLink { to_thread, notices, thread: Some(thread), board }))
    }

    /// What the control thread says: barrier releases, shutdown, abort.
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
    pub fn send(&self, msg: Control) -> Result<(), ControlError> {
        self.to_thread.send(msg).map_err(|_| ControlError::Gone)
    }

    /// Blocks until every worker reached barrier `name`.
    pub fn barrier(&self, name: &str) -> Result<(), ControlError> {
        self.send(Control::Barrier { name: name.to_string() })?;
        loop {
            match self.notices.recv() {
                Ok(Notice::Released(n)) if n == name => return Ok(()),
                Ok(Notice::Released(n)) => tracing::warn!("released from barrier {n:?} while waiting for {name:?}"),
                Ok(Notice::Abort(r)) => return Err(ControlError::Aborted(r)),
                Ok(Notice::Shutdown(reason)) => {
                    return Err(ControlError::ShutdownInBarrier { name: name.to_string(), reason })
                }
                Err(_) => return Err(ControlError::Gone),
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
    pub fn done(mut self, ok: bool, message: &str) -> Result<(), ControlError> {
        let _ = self.to_thread.send(Control::Done { ok, message: message.to_string() });
        let r = match self.notices.recv_timeout(Duration::from_secs(30)) {
            Ok(Notice::Shutdown(_)) => Ok(()),
            Ok(Notice::Abort(r)) if ok => Err(ControlError::Aborted(r)),
            Ok(_) | Err(_) => Ok(()),
        };
        drop(self.to_thread);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        r
    }
}

/// The control message in a frame from the manager (or from a manager replica).
pub(crate) fn decode_control(frame: &[u8]) -> Result<Control, ControlError> {
    match wire::decode(frame, ps_core::limits::FRAME_BYTES_MAX).map_err(|e| ControlError::BadFrame(e.to_string()))? {
        Frame::Control(j) => Control::from_json(j).map_err(|e| ControlError::BadFrame(e.to_string())),
        other => Err(ControlError::UnexpectedFrame(format!("{other:?}"))),
    }
}

//! The control thread of a server or worker: heartbeats on time, messages
//! from the node's threads relayed to the manager, barrier releases, views,
//! shutdown and abort relayed back; and when the leading manager replica is
//! lost, the search for the new leader and the rejoin there, with what the
//! new leader must hear again. It never touches a shard's or worker's data.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ps_core::control::{send_control, Control};
use ps_core::transport::{PeerEvent, PeerId, RxFrame, Transport};
use ps_tcp_fallback::TcpTransport;

use super::{decode_control, Notice, OnAbort};
use crate::error::ControlError;
use crate::view::ViewBoard;

/// What a node needs to find a new manager leader after losing the old one.
pub(super) struct Relink {
    pub(super) managers: Vec<SocketAddr>,
    pub(super) rejoin: Control,
    pub(super) on_abort: OnAbort,
}

/// The manager aborted the job: stop the process, or tell the node's main thread.
fn aborted(on_abort: OnAbort, notify: &Sender<Notice>, reason: String) {
    match on_abort {
        // the job is over: whatever the main thread is blocked in (a wait
        // on a server that went silent, a barrier), this process stops now
        OnAbort::ExitProcess => {
            tracing::error!("job aborted by the manager: {reason}");
            eprintln!("error: job aborted: {reason}");
            std::process::exit(1);
        }
        OnAbort::Notify => {
            tracing::error!("job aborted by the manager: {reason}");
            let _ = notify.send(Notice::Abort(reason));
        }
    }
}

/// How long a node looks for a new manager leader before it gives up.
const MANAGER_RELINK_S: u64 = 30;

/// Connects to the manager replica that leads now and rejoins there (the
/// others answer `NotLeader` and close); `None` after `MANAGER_RELINK_S`.
/// A leader that says the job was aborted ends it as `link.on_abort` says.
fn relink(t: &mut TcpTransport, link: &Relink, notify: &Sender<Notice>) -> Option<PeerId> {
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
                answer = Some(Err(ControlError::Gone));
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
                aborted(link.on_abort, notify, reason);
                return None;
            }
            _ => {}
        }
        t.close(peer, "looking for the manager leader");
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

pub(super) fn control_loop(
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
                    aborted(link.on_abort, &notify, reason);
                    return;
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
                Err(e) => Notice::Abort(e.to_string()),
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
            match relink(&mut t, &link, &notify) {
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

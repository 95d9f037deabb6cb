//! The control links of the simulated cluster: frames to and from the
//! manager state machine, and what a server process does with them as
//! `bin/node.rs` does: keeps the newest view, starts the copies the manager
//! placed on it (`CopyAdded`), hands each copy the view at a moment of its
//! own, and reports a rebuilt copy's progress (`CopySynced`, `CopyReady`).
//! A server the manager aborts stops (it was presumed dead).
//!
//! Must never: change a view (only the manager does), or tell a copy more
//! than the API its server thread has.

use super::cluster::{Cluster, CONTROL_EP, MANAGER_EP, WORKER_EP};
use crate::chain::ChainCore;
use crate::control::{send_control, Control, Role};
use crate::kernels::Kernels;
use crate::rules::RuleRegistry;
use crate::shard::ShardCore;
use crate::transport::{PeerHello, PeerId};
use crate::wire::{self, Frame};

impl Cluster {
    /// Server `s` sends the manager `msg` on its control link.
    pub(super) fn tell_manager(&mut self, s: u32, msg: &Control) {
        send_control(&mut self.sink, PeerId { index: MANAGER_EP as u32, generation: 0 }, msg).expect("a frame");
        self.send_from(CONTROL_EP + s as usize);
    }

    /// The manager takes a frame of node endpoint `from`.
    pub(super) fn at_manager(&mut self, from: usize, frame: &[u8]) {
        let hello = if from >= CONTROL_EP {
            PeerHello { role: Role::Server as u8, node: (from - CONTROL_EP) as u32 }
        } else {
            PeerHello { role: Role::Worker as u8, node: (from - WORKER_EP) as u32 }
        };
        let now = self.now();
        let peer = PeerId { index: from as u32, generation: 0 };
        if let Err(e) = self.manager.on_frame(peer, hello, frame, now, &mut self.sink) {
            self.violation.get_or_insert(format!("the manager refused a frame of {from}: {e}"));
        }
        self.send_from(MANAGER_EP);
        if let Some(Err(reason)) = self.manager.outcome() {
            self.violation.get_or_insert(format!("the manager aborted the job: {reason}"));
        }
    }

    /// A server's control link or a worker takes a frame of the manager.
    pub(super) fn heard_from_manager(&mut self, to: usize, frame: &[u8]) {
        let msg = match wire::decode(frame, crate::limits::CONTROL_BYTES_MAX + 64) {
            Ok(Frame::Control(json)) => Control::from_json(json),
            _ => Err(wire::WireError::Unexpected(wire::Kind::Control)),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                self.violation.get_or_insert(format!("endpoint {to} got a bad frame from the manager: {e}"));
                return;
            }
        };
        match (msg, to >= CONTROL_EP) {
            (Control::View { view }, true) => {
                let s = to - CONTROL_EP;
                if view.epoch > self.server_views[s].epoch {
                    self.server_views[s] = view;
                    self.start_placed(s as u32);
                }
            }
            (Control::View { view }, false) => {
                let w = to - WORKER_EP;
                if view.epoch > self.worker_views[w].epoch {
                    self.worker_views[w] = view;
                }
            }
            (Control::Abort { .. }, true) => self.kill((to - CONTROL_EP) as u32),
            (Control::Abort { reason }, false) => {
                self.violation.get_or_insert(format!("worker {} aborted: {reason}", to - WORKER_EP));
            }
            _ => {}
        }
    }

    /// Server `s` starts the copies its newest view placed on it.
    fn start_placed(&mut self, s: u32) {
        let v = self.server_views[s as usize].clone();
        let mine: Vec<_> =
            v.placed.iter().filter(|p| p.server == s && !p.ready && !self.started.contains(&p.id)).copied().collect();
        for p in mine {
            self.started.push(p.id);
            let core = ShardCore::new(&v, p.owner, &RuleRegistry::default(), Kernels::best()).expect("a shard");
            self.add(ChainCore::new_joining(core, s, p.id), s, p.owner);
            self.tell_manager(s, &Control::CopyAdded { owner: p.owner, id: p.id, port: 1 });
        }
    }

    /// Copy `c` is given its server's newest view.
    pub(super) fn tell(&mut self, c: usize) {
        let v = self.server_views[self.at[c].0 as usize].clone();
        self.told[c] = v.epoch;
        let close = self.copies[c].set_view(&v, &mut self.sink);
        self.send_from(c);
        for p in close {
            self.close(c, p.index as usize);
        }
        self.report(c);
    }

    /// What copy `c`'s server thread reports to the manager: a rebuilt copy
    /// has its snapshot, or (the tail) a rebuilt copy caught up.
    pub(super) fn report(&mut self, c: usize) {
        let (s, owner) = self.at[c];
        if self.copies[c].take_synced() {
            let id = self.copies[c].placement().expect("only placed copies are rebuilt");
            self.tell_manager(s, &Control::CopySynced { owner, id });
        }
        if let Some(id) = self.copies[c].take_caught_up() {
            self.tell_manager(s, &Control::CopyReady { owner, id });
        }
    }
}

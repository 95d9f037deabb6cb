//! Test helpers shared by the manager's rooms: a frame sink that keeps what
//! the manager sends, a small job, and frames from a node.
//!
//! Tests only: nothing here may be used outside `#[cfg(test)]`.

use std::time::Duration;

use super::ManagerCore;
use crate::control::{ClusterView, Control, JobSpec, Role};
use crate::keys::KeyRange;
use crate::rules::RuleSpec;
use crate::table::TableSpec;
use crate::transport::{FrameSink, PeerHello, PeerId};
use crate::wire::{self, Frame};

#[derive(Default)]
pub(super) struct Out(pub(super) Vec<(PeerId, Vec<u8>)>);
impl FrameSink for Out {
    fn frame(&mut self, peer: PeerId, len: usize) -> Result<&mut [u8], crate::transport::TxError> {
        self.0.push((peer, vec![0; len]));
        Ok(&mut self.0.last_mut().unwrap().1)
    }
}
impl Out {
    pub(super) fn msgs(&mut self) -> Vec<(PeerId, Control)> {
        self.0
            .drain(..)
            .map(|(p, f)| match wire::decode(&f, 1 << 20).unwrap() {
                Frame::Control(j) => (p, Control::from_json(j).unwrap()),
                _ => panic!(),
            })
            .collect()
    }
}

pub(super) fn job() -> JobSpec {
    JobSpec {
        tables: vec![TableSpec::dense(0, "w", KeyRange::new(0, 100), 1, RuleSpec::Sum)],
        app: "check".into(),
        params: serde_json::Value::Null,
        limits: Default::default(),
        partitions: 256,
        copies: 1,
    }
}

pub(super) fn p(i: u32) -> PeerId {
    PeerId { index: i, generation: 0 }
}

pub(super) fn reg(m: &mut ManagerCore, out: &mut Out, i: u32, role: Role, now: Duration) {
    let msg = Control::Register { role, host: "127.0.0.1".into(), ports: vec![1000 + i as u16], pid: i, rank: None };
    let json = msg.to_json();
    let mut f = vec![0u8; wire::control_len(json.len())];
    wire::write_control(&mut f, &json);
    m.on_frame(p(i), PeerHello { role: role as u8, node: i }, &f, now, out).unwrap();
}

pub(super) fn ctl(
    m: &mut ManagerCore,
    out: &mut Out,
    i: u32,
    role: Role,
    msg: Control,
    now: Duration,
) -> Result<(), super::ManagerError> {
    let json = msg.to_json();
    let mut f = vec![0u8; wire::control_len(json.len())];
    wire::write_control(&mut f, &json);
    m.on_frame(p(i), PeerHello { role: role as u8, node: i }, &f, now, out)
}

pub(super) fn views(out: &mut Out) -> Vec<ClusterView> {
    out.msgs()
        .into_iter()
        .filter_map(|(_, c)| match c {
            Control::View { view } => Some(view),
            _ => None,
        })
        .collect()
}

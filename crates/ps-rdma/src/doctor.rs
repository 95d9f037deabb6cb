//! The device half of `pslab doctor`: what verbs devices this machine has, their
//! ports, link layers, MTUs and GIDs, and for each problem what to do about it.
//! (The memlock and hugepage checks need no verbs and live in the binary.)
//!
//! Must never change a device or port: it opens, queries and closes, and
//! reports a problem instead of failing on it.

use rdma_sys::{ibv_mtu, ibv_port_state};

use crate::device::{gid_str, Device, DeviceChoice};
use crate::Context;

/// Lines to print, and the problems found (each with its remedy).
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub problems: Vec<String>,
}

fn mtu_bytes(m: u32) -> u32 {
    match m {
        ibv_mtu::IBV_MTU_256 => 256,
        ibv_mtu::IBV_MTU_512 => 512,
        ibv_mtu::IBV_MTU_1024 => 1024,
        ibv_mtu::IBV_MTU_2048 => 2048,
        ibv_mtu::IBV_MTU_4096 => 4096,
        _ => 0,
    }
}

fn state_name(s: u32) -> &'static str {
    match s {
        ibv_port_state::IBV_PORT_DOWN => "DOWN",
        ibv_port_state::IBV_PORT_INIT => "INIT",
        ibv_port_state::IBV_PORT_ARMED => "ARMED",
        ibv_port_state::IBV_PORT_ACTIVE => "ACTIVE",
        _ => "other",
    }
}

/// Inspects every device (port 1, as the transport uses) and tries the choice
/// the transport would make for `choice`.
pub fn devices(choice: &DeviceChoice) -> Report {
    let mut r = Report::default();
    let names = Context::device_names();
    if names.is_empty() {
        r.lines.push("verbs devices: none".into());
        r.problems.push(
            "no RDMA device: on a machine with an HCA install its provider (`apt-get install rdma-core \
             ibverbs-providers`) and check `ibv_devices`; for soft-RoCE, `modprobe rdma_rxe && rdma link add rxe0 \
             type rxe netdev <iface>` (the kernel needs CONFIG_RDMA_RXE; scripts/softroce-vm.sh runs one in a VM). \
             Until then pslab runs over TCP (--transport auto)."
                .into(),
        );
        return r;
    }
    r.lines.push(format!("verbs devices: {}", names.join(", ")));
    for name in &names {
        let ctx = match Context::open(Some(name)) {
            Ok(c) => c,
            Err(e) => {
                r.problems.push(format!("{name}: cannot open: {e} (permissions on /dev/infiniband/uverbs*?)"));
                continue;
            }
        };
        let attr = match ctx.query_port(1) {
            Ok(a) => a,
            Err(e) => {
                r.problems.push(format!("{name}: cannot query port 1: {e}"));
                continue;
            }
        };
        let roce = attr.link_layer == 2;
        r.lines.push(format!(
            "  {name} port 1: {}, {}, active MTU {} (max {}), LID {}, {} GIDs",
            state_name(attr.state),
            if roce { "Ethernet (RoCE)" } else { "InfiniBand" },
            mtu_bytes(attr.active_mtu),
            mtu_bytes(attr.max_mtu),
            attr.lid,
            attr.gid_tbl_len
        ));
        for i in 0..attr.gid_tbl_len.min(16) {
            if let Ok(g) = ctx.query_gid(1, i) {
                if g.iter().any(|b| *b != 0) {
                    let v4 = g[..10].iter().all(|b| *b == 0) && g[10] == 0xff && g[11] == 0xff;
                    r.lines.push(format!(
                        "    GID[{i}] {}{}",
                        gid_str(&g),
                        if v4 { "  (IPv4-mapped: RoCEv2 uses this one)" } else { "" }
                    ));
                }
            }
        }
        if attr.state != ibv_port_state::IBV_PORT_ACTIVE {
            r.problems.push(format!(
                "{name} port 1 is {}: bring the link up (`ip link set <iface> up`, check the cable or the subnet \
                 manager on InfiniBand: `ibstat`)",
                state_name(attr.state)
            ));
        } else if roce && ctx.ipv4_gid(1).is_err() {
            r.problems.push(format!(
                "{name}: no IPv4-mapped GID: give its netdev an IPv4 address (`ip addr add ... dev <iface>`), or \
                 pick a GID with --rdma-gid-index"
            ));
        }
    }
    match Device::open(choice) {
        Ok(d) => r.lines.push(format!("pslab would use: {}", d.describe())),
        Err(e) => r.problems.push(format!("pslab cannot use RDMA: {e}")),
    }
    r
}

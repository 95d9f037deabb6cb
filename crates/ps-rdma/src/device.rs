//! Choosing a device: which verbs device, port and GID this process uses, and
//! how they are described in the log and in `pslab doctor`.
//!
//! Must never post work or create queues: it opens the device and allocates
//! the protection domain that every connection's QP and memory hang off, and
//! that is all.

use std::sync::Arc;

use crate::{Context, Pd, RdmaError};

/// Which device, port and GID to use.
#[derive(Clone, Debug, Default)]
pub struct DeviceChoice {
    /// A device name (`PS_RDMA_DEVICE`, `--rdma-device`); `None`: the first with an active port.
    pub name: Option<String>,
    /// Overrides the GID index (RoCE: the IPv4-mapped RoCEv2 GID is found otherwise).
    pub gid_index: Option<i32>,
}

/// An opened device, its active port and our address on it.
#[derive(Debug, Clone)]
pub struct Device {
    pub ctx: Arc<Context>,
    pub pd: Arc<Pd>,
    pub port: u8,
    /// `None` on InfiniBand without an override: routed by LID.
    pub gid_index: Option<i32>,
    pub gid: [u8; 16],
    pub lid: u16,
    /// the port's active MTU (an `ibv_mtu` value)
    pub mtu: u32,
    pub roce: bool,
}

const LINK_LAYER_ETHERNET: u8 = 2;

impl Device {
    pub fn open(choice: &DeviceChoice) -> Result<Device, RdmaError> {
        let port = 1u8;
        let names = Context::device_names();
        if names.is_empty() {
            return Err(RdmaError::NoDevice(String::new()));
        }
        let mut last_err = None;
        let candidates: Vec<String> = match &choice.name {
            Some(n) => vec![n.clone()],
            None => names,
        };
        for name in candidates {
            let ctx = match Context::open(Some(&name)) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let attr = match ctx.query_port(port) {
                Ok(a) => a,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            if attr.state != rdma_sys::ibv_port_state::IBV_PORT_ACTIVE {
                last_err = Some(RdmaError::PortDown { device: name.clone(), port, state: attr.state });
                continue;
            }
            let roce = attr.link_layer == LINK_LAYER_ETHERNET;
            let (gid_index, gid) = match (choice.gid_index, roce) {
                (Some(i), _) => (Some(i), ctx.query_gid(port, i)?),
                (None, true) => {
                    let (i, g) = ctx.ipv4_gid(port)?;
                    (Some(i), g)
                }
                (None, false) => (None, [0; 16]),
            };
            let pd = Pd::new(&ctx)?;
            return Ok(Device { ctx, pd, port, gid_index, gid, lid: attr.lid, mtu: attr.active_mtu, roce });
        }
        Err(last_err.unwrap_or_else(|| RdmaError::NoDevice(String::new())))
    }

    /// One line for the log: device, port, address.
    pub fn describe(&self) -> String {
        match self.gid_index {
            Some(i) => format!(
                "{} port {} ({}, GID index {i}: {})",
                self.ctx.name(),
                self.port,
                if self.roce { "RoCE" } else { "InfiniBand" },
                gid_str(&self.gid)
            ),
            None => format!("{} port {} (InfiniBand, LID {})", self.ctx.name(), self.port, self.lid),
        }
    }
}

/// A GID as text: `::ffff:a.b.c.d` for IPv4-mapped ones, else hex groups.
pub fn gid_str(g: &[u8; 16]) -> String {
    std::net::Ipv6Addr::from(*g).to_string()
}

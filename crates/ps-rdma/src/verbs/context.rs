//! [`Context`]: an opened verbs device, the root of every other verbs object.
//! Lists devices, opens one, queries its ports and GIDs, and turns a failed
//! verb's return code into an [`RdmaError::Verb`] naming this device.
//!
//! Must never be closed while a child object lives: children hold an `Arc` of
//! it, so `Drop` runs only after the last of them is gone. Choosing which
//! device and port to use is not done here (`device.rs`).

use std::ffi::CStr;
use std::io;
use std::ptr::NonNull;

use rdma_sys::*;

use crate::{RdmaError, Result};

/// An opened verbs device.
#[derive(Debug)]
pub struct Context {
    ctx: NonNull<ibv_context>,
    name: String,
}

impl Context {
    /// Names of the verbs devices on this machine.
    pub fn device_names() -> Vec<String> {
        let mut n = 0;
        // SAFETY: 1. `n` is a valid out-pointer; 2. the list is freed below and no
        // pointer into it is kept.
        unsafe {
            let list = __ibv_get_device_list(&mut n);
            if list.is_null() {
                return Vec::new();
            }
            let names = (0..n as usize)
                .map(|i| CStr::from_ptr(ibv_get_device_name(*list.add(i))).to_string_lossy().into_owned())
                .collect();
            ibv_free_device_list(list);
            names
        }
    }

    /// Opens the device called `name`, or the first one.
    pub fn open(name: Option<&str>) -> Result<Context> {
        let mut n = 0;
        // SAFETY: as in `device_names`; the opened context does not depend on the list.
        unsafe {
            let list = __ibv_get_device_list(&mut n);
            if list.is_null() || n == 0 {
                return Err(RdmaError::NoDevice(String::new()));
            }
            let mut found = None;
            for i in 0..n as usize {
                let dev = *list.add(i);
                let dev_name = CStr::from_ptr(ibv_get_device_name(dev)).to_string_lossy().into_owned();
                if name.is_none_or(|want| want == dev_name) {
                    let ctx = ibv_open_device(dev);
                    found = Some((NonNull::new(ctx), dev_name));
                    break;
                }
            }
            ibv_free_device_list(list);
            match found {
                Some((Some(ctx), name)) => Ok(Context { ctx, name }),
                Some((None, name)) => {
                    Err(RdmaError::Verb { verb: "ibv_open_device", device: name, source: io::Error::last_os_error() })
                }
                None => Err(RdmaError::NoDevice(format!(" named {:?}", name.unwrap_or("")))),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw handle, for the child objects' verbs; open until `Drop`.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut ibv_context {
        self.ctx.as_ptr()
    }

    pub(crate) fn verb_err(&self, verb: &'static str, rc: i32) -> RdmaError {
        let source = if rc > 0 { io::Error::from_raw_os_error(rc) } else { io::Error::last_os_error() };
        RdmaError::Verb { verb, device: self.name.clone(), source }
    }

    /// Attributes of `port` (state, MTU, LID, GID table length).
    pub fn query_port(&self, port: u8) -> Result<ibv_port_attr> {
        // SAFETY: ibv_port_attr is plain C data (zero is a valid value); the context is open.
        unsafe {
            let mut attr: ibv_port_attr = std::mem::zeroed();
            let rc = ___ibv_query_port(self.ctx.as_ptr(), port, &mut attr);
            if rc != 0 {
                return Err(self.verb_err("ibv_query_port", rc));
            }
            Ok(attr)
        }
    }

    /// GID `index` of `port`.
    pub fn query_gid(&self, port: u8, index: i32) -> Result<[u8; 16]> {
        // SAFETY: ibv_gid is 16 bytes of plain data; the context is open.
        unsafe {
            let mut gid: ibv_gid = std::mem::zeroed();
            let rc = ibv_query_gid(self.ctx.as_ptr(), port, index, &mut gid);
            if rc != 0 {
                return Err(self.verb_err("ibv_query_gid", rc));
            }
            Ok(gid.raw)
        }
    }

    /// The RoCEv2 GID mapped from an IPv4 address (`::ffff:a.b.c.d`) on an active port.
    pub fn ipv4_gid(&self, port: u8) -> Result<(i32, [u8; 16])> {
        let attr = self.query_port(port)?;
        if attr.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(RdmaError::PortDown { device: self.name.clone(), port, state: attr.state });
        }
        for i in 0..attr.gid_tbl_len {
            let Ok(g) = self.query_gid(port, i) else { continue };
            if g[..10].iter().all(|b| *b == 0) && g[10] == 0xff && g[11] == 0xff {
                return Ok((i, g));
            }
        }
        Err(RdmaError::NoIpv4Gid { device: self.name.clone(), port })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child object holds an Arc of this context, so none is alive now.
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

// SAFETY: libibverbs objects may be used from any thread, and the verbs on one
// object are thread-safe (ibv_post_send(3): "thread safe"); this type holds only
// the handle and an immutable name. (The Send/Sync impls of the other verbs
// types rest on the same fact.) The transport keeps each QP and CQ on the
// thread that created it anyway.
unsafe impl Send for Context {}
// SAFETY: as for `Send`: `&Context` allows only queries, which are thread-safe
// verbs, and reads of the immutable name.
unsafe impl Sync for Context {}

//! [`Cq`]: a completion queue, optionally with a completion channel whose fd a
//! poller can sleep on. Creating, arming and draining channel events live
//! here; polling completions is the datapath's (`datapath::poll`).
//!
//! Must never be destroyed while a QP uses it (QPs hold an `Arc` of it), and
//! must never leave a channel event unacknowledged (`ibv_destroy_cq` would wait
//! for it forever).

use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::*;

use crate::{Context, Result};

/// A completion queue, optionally with a completion channel: its fd becomes
/// readable after [`Cq::arm`] once a completion arrives, so a thread can sleep in
/// poll(2) instead of spinning.
#[derive(Debug)]
pub struct Cq {
    cq: NonNull<ibv_cq>,
    channel: Option<NonNull<ibv_comp_channel>>,
    ctx: Arc<Context>,
}

impl Cq {
    pub fn new(ctx: &Arc<Context>, depth: i32, with_channel: bool) -> Result<Arc<Self>> {
        let channel = if with_channel {
            // SAFETY: the context is open.
            let ch = unsafe { ibv_create_comp_channel(ctx.as_ptr()) };
            let ch = NonNull::new(ch).ok_or_else(|| ctx.verb_err("ibv_create_comp_channel", 0))?;
            // non-blocking, so draining events never blocks the poller
            // SAFETY: `fd` is the channel's open descriptor.
            unsafe {
                let fd = ch.as_ref().fd;
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
            Some(ch)
        } else {
            None
        };
        let ch_ptr = channel.map_or(std::ptr::null_mut(), |c| c.as_ptr());
        // SAFETY: the context (and the channel, if any) are open; no user context.
        let cq = unsafe { ibv_create_cq(ctx.as_ptr(), depth, std::ptr::null_mut(), ch_ptr, 0) };
        let Some(cq) = NonNull::new(cq) else {
            let e = ctx.verb_err("ibv_create_cq", 0);
            if let Some(ch) = channel {
                // SAFETY: created above, no CQ uses it.
                unsafe { ibv_destroy_comp_channel(ch.as_ptr()) };
            }
            return Err(e);
        };
        Ok(Arc::new(Cq { cq, channel, ctx: ctx.clone() }))
    }

    /// The raw handle, for QP creation and polling; alive until `Drop`.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut ibv_cq {
        self.cq.as_ptr()
    }

    /// The device this CQ is on (for errors).
    #[inline]
    pub(crate) fn context(&self) -> &Context {
        &self.ctx
    }

    /// The completion channel's fd (for poll/epoll), if it has one.
    pub fn fd(&self) -> Option<RawFd> {
        // SAFETY: the channel is open until Drop.
        self.channel.map(|c| unsafe { c.as_ref().fd })
    }

    /// Asks for one event on the channel at the next completion. Poll the CQ once
    /// more after arming: a completion that came just before is not signalled.
    pub fn arm(&self) -> Result<()> {
        // SAFETY: the CQ is alive.
        let rc = unsafe { ibv_req_notify_cq(self.cq.as_ptr(), 0) };
        if rc != 0 {
            return Err(self.ctx.verb_err("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Takes (and acknowledges) every event waiting on the channel; returns how many.
    pub fn take_events(&self) -> usize {
        let Some(ch) = self.channel else { return 0 };
        let mut n = 0;
        loop {
            let mut cq: *mut ibv_cq = std::ptr::null_mut();
            let mut user: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the channel is open and non-blocking; the out-pointers are valid.
            let rc = unsafe { ibv_get_cq_event(ch.as_ptr(), &mut cq, &mut user) };
            if rc != 0 {
                break;
            }
            // SAFETY: the event is for our CQ (one CQ per channel); acknowledged once.
            unsafe { ibv_ack_cq_events(cq, 1) };
            n += 1;
        }
        n
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: QPs that use this CQ hold an Arc of it, so none is alive; every
        // channel event was acknowledged in `take_events`.
        unsafe {
            ibv_destroy_cq(self.cq.as_ptr());
            if let Some(ch) = self.channel {
                ibv_destroy_comp_channel(ch.as_ptr());
            }
        }
    }
}

// SAFETY: as for `Context`: a CQ and its channel may be used from any thread
// (libibverbs documents its verbs as thread-safe); this type holds only the
// handles and an Arc of the (Send + Sync) context.
unsafe impl Send for Cq {}
// SAFETY: as for `Send`; the verbs `&Cq` allows (poll, arm, take events) are
// thread-safe in libibverbs.
unsafe impl Sync for Cq {}

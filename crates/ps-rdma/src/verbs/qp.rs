//! [`Qp`]: a reliable-connected queue pair, with its queue depths ([`QpCaps`])
//! and what the other end needs to know to connect to it ([`Endpoint`]).
//! Creation and the INIT -> RTR -> RTS walk live here; posting is the
//! datapath's (`datapath.rs`).
//!
//! Must never post before [`Qp::connect`] has brought it to RTS (the datapath
//! asserts it), and must never outlive the PD and CQs it was created on (it
//! holds their `Arc`s).

use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::*;

use crate::{Context, Cq, Pd, Result};

/// What the other end of a connection needs to know about a QP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    /// Its port's active MTU (an `ibv_mtu` value; 0: unknown). The path MTU is
    /// the smaller of both ends'.
    pub mtu: u32,
}

/// A reliable-connected queue pair. It must be connected before it can post.
#[derive(Debug)]
pub struct Qp {
    qp: NonNull<ibv_qp>,
    ctx: Arc<Context>,
    connected: bool,
    max_inline: u32,
    _pd: Arc<Pd>,
    _cqs: [Arc<Cq>; 2],
}

/// Queue depths of a QP.
#[derive(Clone, Copy, Debug)]
pub struct QpCaps {
    pub send_wr: u32,
    pub recv_wr: u32,
    /// Bytes a work request may carry inline (copied at post time); the device
    /// may grant less, see [`Qp::max_inline`].
    pub inline_bytes: u32,
}

impl Qp {
    pub fn new(pd: &Arc<Pd>, send_cq: &Arc<Cq>, recv_cq: &Arc<Cq>, caps: QpCaps) -> Result<Self> {
        // SAFETY: ibv_qp_init_attr is plain C data; pd and the CQs outlive the QP
        // (it holds their Arcs).
        unsafe {
            let mut a: ibv_qp_init_attr = std::mem::zeroed();
            a.send_cq = send_cq.as_ptr();
            a.recv_cq = recv_cq.as_ptr();
            a.cap.max_send_wr = caps.send_wr;
            a.cap.max_recv_wr = caps.recv_wr;
            a.cap.max_send_sge = 1;
            a.cap.max_recv_sge = 1;
            a.cap.max_inline_data = caps.inline_bytes;
            a.qp_type = ibv_qp_type::IBV_QPT_RC;
            let mut qp = ibv_create_qp(pd.as_ptr(), &mut a);
            if qp.is_null() && caps.inline_bytes > 0 {
                // a device without inline support refuses the whole QP: retry without
                a.cap.max_inline_data = 0;
                qp = ibv_create_qp(pd.as_ptr(), &mut a);
            }
            Ok(Qp {
                qp: NonNull::new(qp).ok_or_else(|| pd.context().verb_err("ibv_create_qp", 0))?,
                ctx: pd.context().clone(),
                connected: false,
                max_inline: a.cap.max_inline_data,
                _pd: pd.clone(),
                _cqs: [send_cq.clone(), recv_cq.clone()],
            })
        }
    }

    /// The raw handle, for posting (`datapath`); alive until `Drop`.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut ibv_qp {
        self.qp.as_ptr()
    }

    /// The device this QP is on (for errors).
    #[inline]
    pub(crate) fn context(&self) -> &Context {
        &self.ctx
    }

    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP exists until Drop.
        unsafe { self.qp.as_ref().qp_num }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Bytes a work request may carry inline on this QP (0: none).
    #[inline]
    pub fn max_inline(&self) -> u32 {
        self.max_inline
    }

    /// INIT -> RTR -> RTS towards `remote`, over `port` with our GID `gid_index`
    /// (`None`: InfiniBand, routed by LID). The path MTU is the smaller of our
    /// port's active MTU and `remote.mtu` (4096 on most HCAs; soft-RoCE derives
    /// it from the netdev's). Timeouts follow the soft-RoCE notes: ack timeout
    /// 14, READ depth 16.
    pub fn connect(&mut self, port: u8, gid_index: Option<i32>, local_psn: u32, remote: &Endpoint) -> Result<()> {
        use ibv_qp_attr_mask as M;
        let qp = self.qp;
        let ctx = &self.ctx;
        let local_mtu = ctx.query_port(port)?.active_mtu;
        let path_mtu = match remote.mtu {
            0 => local_mtu,
            m => m.min(local_mtu),
        };
        let modify = |a: &mut ibv_qp_attr, mask: ibv_qp_attr_mask, what: &'static str| -> Result<()> {
            // SAFETY: `a` is fully initialised for the fields `mask` names.
            let rc = unsafe { ibv_modify_qp(qp.as_ptr(), a, mask.0 as i32) };
            if rc != 0 {
                return Err(ctx.verb_err(what, rc));
            }
            Ok(())
        };
        // SAFETY: plain C data; zero is valid for every field not set.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .0;
        modify(
            &mut a,
            M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;

        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = path_mtu;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 16;
        a.min_rnr_timer = 12;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.port_num = port;
        if let Some(gid_index) = gid_index {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
            a.ah_attr.grh.sgid_index = gid_index as u8;
            a.ah_attr.grh.hop_limit = 64;
        }
        modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;

        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = local_psn;
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.max_rd_atomic = 16;
        modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )?;
        self.connected = true;
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created in `new`; outstanding work requests are flushed by the
        // verbs layer, and the memory they name is kept by the owner until after.
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

// SAFETY: as for `Context`: a QP handle may be used from any thread; this type
// holds the handle, plain numbers and Arcs of (Send + Sync) parents. It is
// deliberately not `Sync`: the transport keeps each QP on the thread that
// created it.
unsafe impl Send for Qp {}

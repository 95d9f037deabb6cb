//! # ps-rdma: the parameter server over ibverbs
//!
//! One safe Rust type per verbs object, each holding an `Arc` of its parent so
//! teardown runs in order whatever the caller drops first (a `Pd` never outlives
//! its `Context`, nor an `Mr` or a `Qp` its `Pd` and `Cq`s): [`Context`] (an
//! opened device), [`Pd`], [`Cq`] (optionally with a completion channel whose fd
//! a poller can wait on), [`Mr`] (memory it owns, or memory the caller promises
//! to keep, e.g. a shard's slab), [`Qp`] (reliable connected, INIT -> RTR -> RTS).
//! Every failing verb is an [`RdmaError::Verb`] naming the verb, the device and
//! the errno.
//!
//! - [`datapath`]: posting work requests (batched, one doorbell) and polling;
//! - [`transport`]: `ps_core::Transport` over RC QPs: pushes as WRITE_WITH_IMM
//!   into mailbox rings, dense pulls as READs of slab blocks;
//! - [`doctor`]: the `pslab doctor` report.
//!
//! `unsafe` is confined to this crate's verbs layer and datapath: each block says
//! why it is sound.

pub mod datapath;
pub mod doctor;
pub mod transport;

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::*;

/// Why a verbs call failed, with what a user needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("{verb} failed on {device}: {source}")]
    Verb { verb: &'static str, device: String, source: io::Error },
    #[error(
        "no RDMA device{0}: is rdma_rxe loaded (`rdma link`), or libibverbs' provider installed (ibverbs-providers)?"
    )]
    NoDevice(String),
    #[error("port {port} of {device} is not active (state {state}): check the link (`ibv_devinfo`)")]
    PortDown { device: String, port: u8, state: u32 },
    #[error("{device} port {port} has no IPv4-mapped RoCEv2 GID: give the netdev an IPv4 address")]
    NoIpv4Gid { device: String, port: u8 },
    #[error("a work request failed: {0}")]
    Completion(String),
    #[error("{0}")]
    Setup(String),
}

pub type Result<T> = std::result::Result<T, RdmaError>;

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

    fn verb_err(&self, verb: &'static str, rc: i32) -> RdmaError {
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

// SAFETY (for the Send/Sync impls below): libibverbs objects may be used from
// any thread, and the verbs on one object are thread-safe (ibv_post_send(3):
// "thread safe"); these types hold only the handles and immutable names. The
// transport keeps each QP and CQ on the thread that created it anyway.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}
unsafe impl Send for Pd {}
unsafe impl Sync for Pd {}
unsafe impl Send for Cq {}
unsafe impl Sync for Cq {}
unsafe impl Send for Mr {}
unsafe impl Sync for Mr {}
unsafe impl Send for Qp {}

/// A protection domain.
#[derive(Debug)]
pub struct Pd {
    pd: NonNull<ibv_pd>,
    ctx: Arc<Context>,
}

impl Pd {
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Self>> {
        // SAFETY: the context is open while this Pd holds its Arc.
        let pd = unsafe { ibv_alloc_pd(ctx.ctx.as_ptr()) };
        Ok(Arc::new(Pd { pd: NonNull::new(pd).ok_or_else(|| ctx.verb_err("ibv_alloc_pd", 0))?, ctx: ctx.clone() }))
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs hold an Arc of the PD, so none is alive now.
        unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

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
            let ch = unsafe { ibv_create_comp_channel(ctx.ctx.as_ptr()) };
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
        let cq = unsafe { ibv_create_cq(ctx.ctx.as_ptr(), depth, std::ptr::null_mut(), ch_ptr, 0) };
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

/// Registered memory: either bytes this region owns (a boxed slice, never
/// reallocated) or memory the caller keeps alive and in place (a shard's slab).
#[derive(Debug)]
pub struct Mr {
    mr: NonNull<ibv_mr>,
    owned: Option<Box<[u8]>>,
    addr: u64,
    len: usize,
    _pd: Arc<Pd>,
}

fn access_all() -> i32 {
    (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
        | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
        | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
        .0 as i32
}

fn reg_err(pd: &Pd, len: usize) -> RdmaError {
    match pd.ctx.verb_err("ibv_reg_mr", 0) {
        RdmaError::Verb { verb, device, source } if source.raw_os_error() == Some(libc::ENOMEM) => RdmaError::Verb {
            verb,
            device,
            source: io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "{source}: registering {len} bytes exceeds the locked-memory limit? raise it with \
                     `ulimit -l unlimited` (see `pslab doctor`)"
                ),
            ),
        },
        e => e,
    }
}

impl Mr {
    /// `len` zeroed bytes, registered for local write and remote read and write.
    pub fn new(pd: &Arc<Pd>, len: usize) -> Result<Self> {
        // page-aligned in practice (a large allocation is mmapped); frames need 8
        let mut buf = vec![0u8; len.max(8)].into_boxed_slice();
        debug_assert!((buf.as_ptr() as usize).is_multiple_of(8), "registered buffers are 8-aligned");
        let (addr, len) = (buf.as_mut_ptr() as u64, buf.len());
        // SAFETY: 1. `buf` lives as long as the Mr and never moves; 2. it is
        // deregistered in Drop before `buf` is freed (fields drop after Drop::drop).
        let mr = unsafe { ibv_reg_mr(pd.pd.as_ptr(), buf.as_mut_ptr().cast(), len, access_all()) };
        let mr = NonNull::new(mr).ok_or_else(|| reg_err(pd, len))?;
        Ok(Mr { mr, owned: Some(buf), addr, len, _pd: pd.clone() })
    }

    /// Registers memory this region does not own, for remote READ only.
    ///
    /// # Safety
    /// `ptr..ptr+len` stays mapped, and in place, until this `Mr` is dropped.
    pub unsafe fn register_external(pd: &Arc<Pd>, ptr: *const u8, len: usize) -> Result<Self> {
        let access = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_READ).0 as i32;
        let mr = ibv_reg_mr(pd.pd.as_ptr(), ptr as *mut _, len, access);
        let mr = NonNull::new(mr).ok_or_else(|| reg_err(pd, len))?;
        Ok(Mr { mr, owned: None, addr: ptr as u64, len, _pd: pd.clone() })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is registered until Drop.
        unsafe { self.mr.as_ref().lkey }
    }
    pub fn rkey(&self) -> u32 {
        // SAFETY: as in `lkey`.
        unsafe { self.mr.as_ref().rkey }
    }
    /// The bytes of an owned region. Not while a posted operation that writes
    /// them is outstanding (see the contracts in [`datapath`]).
    pub fn bytes(&self) -> &[u8] {
        self.owned.as_deref().expect("bytes() of an external region")
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.owned.as_deref_mut().expect("bytes_mut() of an external region")
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered in `new`; an owned `buf` is freed only after this.
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

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
            a.send_cq = send_cq.cq.as_ptr();
            a.recv_cq = recv_cq.cq.as_ptr();
            a.cap.max_send_wr = caps.send_wr;
            a.cap.max_recv_wr = caps.recv_wr;
            a.cap.max_send_sge = 1;
            a.cap.max_recv_sge = 1;
            a.cap.max_inline_data = caps.inline_bytes;
            a.qp_type = ibv_qp_type::IBV_QPT_RC;
            let mut qp = ibv_create_qp(pd.pd.as_ptr(), &mut a);
            if qp.is_null() && caps.inline_bytes > 0 {
                // a device without inline support refuses the whole QP: retry without
                a.cap.max_inline_data = 0;
                qp = ibv_create_qp(pd.pd.as_ptr(), &mut a);
            }
            Ok(Qp {
                qp: NonNull::new(qp).ok_or_else(|| pd.ctx.verb_err("ibv_create_qp", 0))?,
                ctx: pd.ctx.clone(),
                connected: false,
                max_inline: a.cap.max_inline_data,
                _pd: pd.clone(),
                _cqs: [send_cq.clone(), recv_cq.clone()],
            })
        }
    }

    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP exists until Drop.
        unsafe { self.qp.as_ref().qp_num }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Bytes a work request may carry inline on this QP (0: none).
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

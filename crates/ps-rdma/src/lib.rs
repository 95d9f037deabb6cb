//! # ps-rdma: verbs objects for the parameter server (first part of the RDMA issue)
//!
//! One safe Rust type per verbs object, each borrowing its parent so teardown
//! runs in order (a `Pd` cannot outlive its `Context`, nor an `Mr` its `Pd`):
//! [`Context`] (an opened device), [`Pd`], [`Cq`], [`Mr`] (memory it owns and
//! registers once), [`Qp`] (reliable connected, INIT -> RTR -> RTS). Every failing
//! verb is an [`RdmaError::Verb`] naming the verb, the device and the errno.
//! The posting and polling datapath is in [`datapath`], in its own file.
//!
//! `unsafe` is confined to this crate: each block says why it is sound. Not yet a
//! member of the root workspace and not yet behind `ps_core::Transport`: that, the
//! mailbox rings and the soft-RoCE CI run are the rest of the RDMA issue.

pub mod datapath;

use std::ffi::CStr;
use std::io;
use std::marker::PhantomData;
use std::ptr::NonNull;

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
        // SAFETY: every child object borrows `self`, so none is alive now.
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// A protection domain.
#[derive(Debug)]
pub struct Pd<'c> {
    pd: NonNull<ibv_pd>,
    ctx: &'c Context,
}

impl<'c> Pd<'c> {
    pub fn new(ctx: &'c Context) -> Result<Self> {
        // SAFETY: the context is open for 'c.
        let pd = unsafe { ibv_alloc_pd(ctx.ctx.as_ptr()) };
        Ok(Pd { pd: NonNull::new(pd).ok_or_else(|| ctx.verb_err("ibv_alloc_pd", 0))?, ctx })
    }
}

impl Drop for Pd<'_> {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs borrow the PD, so none is alive now.
        unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq<'c> {
    cq: NonNull<ibv_cq>,
    ctx: &'c Context,
}

impl<'c> Cq<'c> {
    pub fn new(ctx: &'c Context, depth: i32) -> Result<Self> {
        // SAFETY: the context is open; no completion channel, no user context.
        let cq = unsafe { ibv_create_cq(ctx.ctx.as_ptr(), depth, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        Ok(Cq { cq: NonNull::new(cq).ok_or_else(|| ctx.verb_err("ibv_create_cq", 0))?, ctx })
    }
}

impl Drop for Cq<'_> {
    fn drop(&mut self) {
        // SAFETY: QPs that use this CQ borrow it, so none is alive now.
        unsafe { ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// Memory this region owns and keeps registered for its whole life: the bytes
/// never move (a boxed slice is never reallocated).
#[derive(Debug)]
pub struct Mr<'p> {
    mr: NonNull<ibv_mr>,
    buf: Box<[u8]>,
    _pd: PhantomData<&'p Pd<'p>>,
}

impl<'p> Mr<'p> {
    /// `len` zeroed bytes, registered for local write and remote read and write.
    pub fn new(pd: &'p Pd<'p>, len: usize) -> Result<Self> {
        let mut buf = vec![0u8; len].into_boxed_slice();
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        // SAFETY: 1. `buf` lives as long as the Mr and never moves; 2. it is
        // deregistered in Drop before `buf` is freed (fields drop after Drop::drop).
        let mr = unsafe { ibv_reg_mr(pd.pd.as_ptr(), buf.as_mut_ptr().cast(), len, access.0 as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| {
            let e = pd.ctx.verb_err("ibv_reg_mr", 0);
            match e {
                RdmaError::Verb { verb, device, source } if source.raw_os_error() == Some(libc::ENOMEM) => RdmaError::Verb {
                    verb,
                    device,
                    source: io::Error::new(
                        io::ErrorKind::OutOfMemory,
                        format!("{source}: registering {len} bytes exceeds the locked-memory limit? raise it with `ulimit -l unlimited`"),
                    ),
                },
                e => e,
            }
        })?;
        Ok(Mr { mr, buf, _pd: PhantomData })
    }

    pub fn addr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is registered until Drop.
        unsafe { self.mr.as_ref().lkey }
    }
    pub fn rkey(&self) -> u32 {
        // SAFETY: as in `lkey`.
        unsafe { self.mr.as_ref().rkey }
    }
    /// The bytes. Not while a posted operation that touches them is outstanding
    /// (see the contracts in [`datapath`]).
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Mr<'_> {
    fn drop(&mut self) {
        // SAFETY: registered in `new`; `buf` is freed only after this.
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
}

/// A reliable-connected queue pair. It must be connected before it can post.
#[derive(Debug)]
pub struct Qp<'p> {
    qp: NonNull<ibv_qp>,
    ctx: &'p Context,
    connected: bool,
    _pd: PhantomData<&'p Pd<'p>>,
}

/// Queue depths of a QP.
#[derive(Clone, Copy, Debug)]
pub struct QpCaps {
    pub send_wr: u32,
    pub recv_wr: u32,
}

impl<'p> Qp<'p> {
    pub fn new(pd: &'p Pd<'p>, cq: &'p Cq<'p>, caps: QpCaps) -> Result<Self> {
        // SAFETY: ibv_qp_init_attr is plain C data; pd and cq outlive the QP ('p).
        unsafe {
            let mut a: ibv_qp_init_attr = std::mem::zeroed();
            a.send_cq = cq.cq.as_ptr();
            a.recv_cq = cq.cq.as_ptr();
            a.cap.max_send_wr = caps.send_wr;
            a.cap.max_recv_wr = caps.recv_wr;
            a.cap.max_send_sge = 1;
            a.cap.max_recv_sge = 1;
            a.qp_type = ibv_qp_type::IBV_QPT_RC;
            let qp = ibv_create_qp(pd.pd.as_ptr(), &mut a);
            Ok(Qp {
                qp: NonNull::new(qp).ok_or_else(|| pd.ctx.verb_err("ibv_create_qp", 0))?,
                ctx: pd.ctx,
                connected: false,
                _pd: PhantomData,
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

    /// INIT -> RTR -> RTS towards `remote`, over `port` with our GID `gid_index`.
    /// Timeouts follow the soft-RoCE notes: ack timeout 14, READ depth 16.
    pub fn connect(&mut self, port: u8, gid_index: i32, local_psn: u32, remote: &Endpoint) -> Result<()> {
        use ibv_qp_attr_mask as M;
        let modify = |a: &mut ibv_qp_attr, mask: ibv_qp_attr_mask, what: &'static str| -> Result<()> {
            // SAFETY: `a` is fully initialised for the fields `mask` names.
            let rc = unsafe { ibv_modify_qp(self.qp.as_ptr(), a, mask.0 as i32) };
            if rc != 0 {
                return Err(self.ctx.verb_err(what, rc));
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
        a.path_mtu = ibv_mtu::IBV_MTU_1024;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 16;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.port_num = port;
        a.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
        a.ah_attr.grh.sgid_index = gid_index as u8;
        a.ah_attr.grh.hop_limit = 64;
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

impl Drop for Qp<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `new`; outstanding work requests are flushed by the verbs layer.
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

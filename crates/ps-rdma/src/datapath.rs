//! The datapath: posting work requests and polling completions. Kept in its own
//! file so the hot path can be read whole (eRPC's split).
//!
//! Posting is `unsafe` with a written ownership contract, as in rust-ibverbs:
//! the device reads or writes the local bytes *after* the call returns, until the
//! completion of that work request (or of a later signalled one on the same QP:
//! an RC send queue completes in order) has been polled.
//!
//! [`post_batch`] chains a batch of work requests and rings the doorbell once;
//! each may be signalled or not (selective signalling) and carry its data inline.
//!
//! Must never know about frames, rings, credits or peers (that is the
//! transport's), and must never let a post skip its contract: posting stays
//! `unsafe`, and every local range is checked against its region.

use std::mem::MaybeUninit;

use rdma_sys::*;

use crate::{Cq, Mr, Qp, RdmaError, Result};

/// What a work request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// RDMA WRITE (no completion at the responder).
    Write,
    /// RDMA WRITE with immediate data: consumes a receive WR at the responder,
    /// whose completion carries `imm` once every byte has landed.
    WriteImm(u32),
    /// RDMA READ into local memory.
    Read,
}

/// One work request: `len` local bytes at `local_off` of `mr`, remote `addr`/`rkey`.
#[derive(Clone, Copy, Debug)]
pub struct Wr<'a> {
    pub op: Op,
    pub mr: &'a Mr,
    pub local_off: usize,
    pub len: usize,
    pub remote_addr: u64,
    pub rkey: u32,
    pub wr_id: u64,
    pub signaled: bool,
}

/// Longest chain [`post_batch`] posts with one doorbell.
pub const BATCH_MAX: usize = 32;

/// Posts `wrs` on `qp` as one chain (one doorbell). Small WRITEs go inline when
/// the QP allows, so their local bytes are free as soon as this returns.
///
/// # Safety
/// For each READ, the local bytes are neither read nor written by anyone until
/// its completion (or a later signalled one) is polled; for each WRITE not sent
/// inline, they are not written until then; every `mr` outlives that completion.
pub unsafe fn post_batch(qp: &Qp, wrs: &[Wr<'_>]) -> Result<()> {
    assert!(qp.is_connected(), "post on a QP that is not connected");
    assert!(wrs.len() <= BATCH_MAX, "batch of {} above BATCH_MAX", wrs.len());
    if wrs.is_empty() {
        return Ok(());
    }
    // only the `n` entries used are written (and zeroed first): zeroing the
    // whole arrays (4.5 KiB) cost more than the rest of a small post, and
    // under the soft-RoCE VM's emulation a `rep stosb` memset is slow
    let mut sges = [const { MaybeUninit::<ibv_sge>::uninit() }; BATCH_MAX];
    let mut chain = [const { MaybeUninit::<ibv_send_wr>::uninit() }; BATCH_MAX];
    let n = wrs.len();
    for (i, w) in wrs.iter().enumerate() {
        assert!(
            w.local_off.checked_add(w.len).is_some_and(|e| e <= w.mr.len()),
            "local range {}+{} outside the region",
            w.local_off,
            w.len
        );
        sges[i].write(ibv_sge { addr: w.mr.addr() + w.local_off as u64, length: w.len as u32, lkey: w.mr.lkey() });
        // SAFETY: ibv_send_wr holds only integers, raw pointers and unions of
        // structs of those, for all of which all-zero bytes are a valid value
        // (null `next` and `sg_list`, no flags); the fields used are set below.
        let wr = chain[i].write(unsafe { std::mem::zeroed() });
        wr.wr_id = w.wr_id;
        wr.num_sge = if w.len == 0 { 0 } else { 1 };
        let mut flags = if w.signaled { ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 };
        wr.opcode = match w.op {
            Op::Write => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            Op::WriteImm(imm) => {
                wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
            }
            Op::Read => ibv_wr_opcode::IBV_WR_RDMA_READ,
        };
        if w.op != Op::Read && w.len > 0 && w.len <= qp.max_inline() as usize {
            flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        wr.send_flags = flags;
        wr.wr.rdma.remote_addr = w.remote_addr;
        wr.wr.rdma.rkey = w.rkey;
    }
    // link after filling: the arrays no longer move; entries 0..n are written
    let sg = sges.as_mut_ptr().cast::<ibv_sge>();
    let wrp = chain.as_mut_ptr().cast::<ibv_send_wr>();
    for i in 0..n {
        // SAFETY: 1. i < n <= BATCH_MAX, so `add(i)`, and `add(i + 1)` where
        // i + 1 < n, stay inside `sges` and `chain`; 2. entry i of `chain` was
        // initialised by `write` above, and the `&mut` to it is the only
        // reference while it lives (the `write` results are no longer used).
        unsafe {
            let wr = &mut *wrp.add(i);
            wr.sg_list = sg.add(i);
            wr.next = if i + 1 < n { wrp.add(i + 1) } else { std::ptr::null_mut() };
        }
    }
    let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
    // SAFETY: 1. the QP is alive while `qp` is borrowed, and connected
    // (asserted above); 2. the chain and its SGEs live until ibv_post_send
    // returns (it copies them; inline data is copied too), and it follows
    // `next` from the first entry only through the `n` written ones; 3. every
    // local range was checked to lie inside its registered `mr`, and what
    // happens to those bytes until the completion is the caller's contract.
    let rc = unsafe { ibv_post_send(qp.as_ptr(), wrp, &mut bad) };
    if rc != 0 {
        return Err(qp.context().verb_err("ibv_post_send", rc));
    }
    Ok(())
}

/// Posts `n` receive WRs without buffers, for WRITE_WITH_IMM (the data lands
/// where the writer put it; the receive only carries the immediate).
pub fn post_recv_imm(qp: &Qp, n: usize, wr_id: u64) -> Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH_MAX);
        // SAFETY: plain C data; no scatter list, so no memory is lent to the
        // device. Only the `k` entries linked are written (one per received
        // frame, usually: zeroing all 32 cost more than the post), and
        // ibv_post_recv follows `next` from the first through those only.
        unsafe {
            let mut chain = [const { MaybeUninit::<ibv_recv_wr>::uninit() }; BATCH_MAX];
            let wrp = chain.as_mut_ptr().cast::<ibv_recv_wr>();
            for i in 0..k {
                wrp.add(i).write(std::mem::zeroed());
                let wr = &mut *wrp.add(i);
                wr.wr_id = wr_id;
                wr.num_sge = 0;
                wr.next = if i + 1 < k { wrp.add(i + 1) } else { std::ptr::null_mut() };
            }
            let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
            let rc = ibv_post_recv(qp.as_ptr(), wrp, &mut bad);
            if rc != 0 {
                return Err(qp.context().verb_err("ibv_post_recv", rc));
            }
        }
        left -= k;
    }
    Ok(())
}

/// A finished work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub ok: bool,
    pub status: u32,
    pub bytes: u32,
    pub qp_num: u32,
    /// The immediate of a received WRITE_WITH_IMM.
    pub imm: Option<u32>,
}

impl Completion {
    pub fn status_str(&self) -> String {
        // SAFETY: ibv_wc_status_str returns a static string for any value.
        unsafe { std::ffi::CStr::from_ptr(ibv_wc_status_str(self.status)).to_string_lossy().into_owned() }
    }
}

/// Appends up to `max` finished work requests to `out`; returns how many.
pub fn poll(cq: &Cq, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
    let max = max.min(64);
    // SAFETY: ibv_wc is plain C data; zero is valid.
    let mut wc: [ibv_wc; 64] = unsafe { std::mem::zeroed() };
    // SAFETY: the CQ is alive; ibv_poll_cq writes at most `max` entries.
    let n = unsafe { ibv_poll_cq(cq.as_ptr(), max as i32, wc.as_mut_ptr()) };
    if n < 0 {
        return Err(cq.context().verb_err("ibv_poll_cq", -n));
    }
    for w in &wc[..n as usize] {
        let with_imm = w.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        out.push(Completion {
            wr_id: w.wr_id,
            ok: w.status == ibv_wc_status::IBV_WC_SUCCESS,
            status: w.status,
            bytes: w.byte_len,
            qp_num: w.qp_num,
            // SAFETY: the union holds the immediate when IBV_WC_WITH_IMM is set.
            imm: with_imm.then(|| u32::from_be(unsafe { w.imm_data_invalidated_rkey_union.imm_data })),
        });
    }
    Ok(n as usize)
}

/// Polls until `wr_id` completes (spinning: for tests and set-up, not the hot path).
pub fn wait(cq: &Cq, wr_id: u64, spins_max: u64) -> Result<Completion> {
    let mut done = Vec::new();
    for _ in 0..spins_max {
        poll(cq, &mut done, 16)?;
        if let Some(c) = done.iter().find(|c| c.wr_id == wr_id) {
            if !c.ok {
                return Err(RdmaError::Completion(format!("work request {wr_id} finished with {}", c.status_str())));
            }
            return Ok(*c);
        }
        std::thread::yield_now();
    }
    Err(RdmaError::Completion(format!("work request {wr_id} did not complete")))
}

/// One signalled WRITE or READ of `mr[off..off+len]` (tests and set-up).
///
/// # Safety
/// As [`post_batch`].
#[allow(clippy::too_many_arguments)] // one per field of the work request
pub unsafe fn post_one(
    qp: &Qp,
    op: Op,
    mr: &Mr,
    off: usize,
    len: usize,
    remote_addr: u64,
    rkey: u32,
    wr_id: u64,
) -> Result<()> {
    // SAFETY: this function's contract is `post_batch`'s, for this one work
    // request, and the caller upholds it.
    unsafe { post_batch(qp, &[Wr { op, mr, local_off: off, len, remote_addr, rkey, wr_id, signaled: true }]) }
}

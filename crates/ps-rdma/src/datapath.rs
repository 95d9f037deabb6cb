//! The datapath: posting one-sided operations and polling completions. Kept in
//! its own file so the hot path can be read whole (eRPC's split).
//!
//! Posting is `unsafe` with a written ownership contract, as in rust-ibverbs:
//! the verbs layer reads or writes the local bytes *after* the call returns.

use rdma_sys::*;

use crate::{Cq, Mr, Qp, RdmaError, Result};

/// A finished work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub ok: bool,
    pub status: u32,
    pub bytes: u32,
}

#[allow(clippy::too_many_arguments)] // one per field of the work request
fn post(
    qp: &Qp<'_>,
    opcode: u32,
    mr: &Mr<'_>,
    off: usize,
    len: usize,
    remote_addr: u64,
    rkey: u32,
    wr_id: u64,
) -> Result<()> {
    assert!(qp.is_connected(), "post on a QP that is not connected");
    assert!(off.checked_add(len).is_some_and(|e| e <= mr.len()), "local range {off}+{len} outside the region");
    let mut sge = ibv_sge { addr: mr.addr() + off as u64, length: len as u32, lkey: mr.lkey() };
    // SAFETY: 1. ibv_send_wr is plain C data, zero is valid for unused fields;
    // 2. `sge` and `wr` live until ibv_post_send returns, which copies them;
    // 3. the bytes they point to are covered by the caller's contract.
    unsafe {
        let mut wr: ibv_send_wr = std::mem::zeroed();
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = opcode;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.wr.rdma.remote_addr = remote_addr;
        wr.wr.rdma.rkey = rkey;
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        let rc = ibv_post_send(qp.qp.as_ptr(), &mut wr, &mut bad);
        if rc != 0 {
            return Err(qp.ctx.verb_err("ibv_post_send", rc));
        }
    }
    Ok(())
}

/// Writes `mr[off..off+len]` to `remote_addr` (covered by `rkey`).
///
/// # Safety
/// Until the completion with `wr_id` is polled: `mr` stays alive and its bytes
/// `off..off+len` are not written by anyone (the device reads them later).
pub unsafe fn post_write(
    qp: &Qp<'_>,
    mr: &Mr<'_>,
    off: usize,
    len: usize,
    remote_addr: u64,
    rkey: u32,
    wr_id: u64,
) -> Result<()> {
    post(qp, ibv_wr_opcode::IBV_WR_RDMA_WRITE, mr, off, len, remote_addr, rkey, wr_id)
}

/// Reads `len` bytes at `remote_addr` into `mr[off..off+len]`.
///
/// # Safety
/// Until the completion with `wr_id` is polled: `mr` stays alive and its bytes
/// `off..off+len` are neither read nor written by anyone (the device writes them).
pub unsafe fn post_read(
    qp: &Qp<'_>,
    mr: &Mr<'_>,
    off: usize,
    len: usize,
    remote_addr: u64,
    rkey: u32,
    wr_id: u64,
) -> Result<()> {
    post(qp, ibv_wr_opcode::IBV_WR_RDMA_READ, mr, off, len, remote_addr, rkey, wr_id)
}

/// Appends up to `max` finished work requests to `out`; returns how many.
pub fn poll(cq: &Cq<'_>, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
    let mut wc: Vec<ibv_wc> = Vec::with_capacity(max);
    // SAFETY: 1. the CQ is alive; 2. ibv_poll_cq writes at most `max` entries into
    // the spare capacity, and we set the length to what it reports.
    let n = unsafe {
        let n = ibv_poll_cq(cq.cq.as_ptr(), max as i32, wc.as_mut_ptr());
        if n < 0 {
            return Err(cq.ctx.verb_err("ibv_poll_cq", -n));
        }
        wc.set_len(n as usize);
        n as usize
    };
    for w in &wc {
        out.push(Completion {
            wr_id: w.wr_id,
            ok: w.status == ibv_wc_status::IBV_WC_SUCCESS,
            status: w.status,
            bytes: w.byte_len,
        });
    }
    Ok(n)
}

/// Polls until `wr_id` completes (spinning: for tests and set-up, not the hot path).
pub fn wait(cq: &Cq<'_>, wr_id: u64, spins_max: u64) -> Result<Completion> {
    let mut done = Vec::new();
    for _ in 0..spins_max {
        poll(cq, &mut done, 16)?;
        if let Some(c) = done.iter().find(|c| c.wr_id == wr_id) {
            if !c.ok {
                return Err(RdmaError::Completion(format!("work request {wr_id} finished with status {}", c.status)));
            }
            return Ok(*c);
        }
        std::thread::yield_now();
    }
    Err(RdmaError::Completion(format!("work request {wr_id} did not complete")))
}

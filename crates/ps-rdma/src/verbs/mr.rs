//! [`Mr`]: registered memory, either bytes the region owns or memory the caller
//! promises to keep in place (a shard's slab, registered for remote READ).
//!
//! Must never free or move registered bytes before they are deregistered, and
//! must never hand out the bytes of a region while a posted operation writes
//! them (the post contracts in `datapath.rs` say when that is).

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::*;

use crate::{Pd, RdmaError, Result};

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
    match pd.context().verb_err("ibv_reg_mr", 0) {
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
        let mr = unsafe { ibv_reg_mr(pd.as_ptr(), buf.as_mut_ptr().cast(), len, access_all()) };
        let mr = NonNull::new(mr).ok_or_else(|| reg_err(pd, len))?;
        Ok(Mr { mr, owned: Some(buf), addr, len, _pd: pd.clone() })
    }

    /// Registers memory this region does not own, for remote READ only.
    ///
    /// # Safety
    /// `ptr..ptr+len` stays mapped, and in place, until this `Mr` is dropped.
    pub unsafe fn register_external(pd: &Arc<Pd>, ptr: *const u8, len: usize) -> Result<Self> {
        let access = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_READ).0 as i32;
        // SAFETY: 1. the PD is allocated while `pd` is borrowed, and the region
        // keeps an Arc of it; 2. the caller keeps `ptr..ptr+len` mapped and in
        // place until this `Mr` is dropped, and `Drop` deregisters it, so the
        // device never reaches the range after it goes. LOCAL_WRITE lets only a
        // work request naming this region as its local buffer write the range,
        // and posting one is `unsafe` with its own contract (`datapath`).
        let mr = unsafe { ibv_reg_mr(pd.as_ptr(), ptr as *mut _, len, access) };
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
    /// them is outstanding (see the contracts in [`datapath`](crate::datapath)).
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

// SAFETY: as for `Context`: an MR handle may be used from any thread; the owned
// bytes are a plain boxed slice, and `&Mr` gives only shared access to them.
unsafe impl Send for Mr {}
// SAFETY: as for `Send`: `&Mr` reads the handle's keys and the owned bytes
// immutably; writing them takes `&mut Mr`.
unsafe impl Sync for Mr {}

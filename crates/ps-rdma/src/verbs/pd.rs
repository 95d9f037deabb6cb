//! [`Pd`]: a protection domain, the parent of memory regions and queue pairs.
//!
//! Must never be deallocated while a region or QP of it lives (they hold an
//! `Arc` of it), nor outlive its [`Context`] (it holds an `Arc` of that).

use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::*;

use crate::{Context, Result};

/// A protection domain.
#[derive(Debug)]
pub struct Pd {
    pd: NonNull<ibv_pd>,
    ctx: Arc<Context>,
}

impl Pd {
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Self>> {
        // SAFETY: the context is open while this Pd holds its Arc.
        let pd = unsafe { ibv_alloc_pd(ctx.as_ptr()) };
        Ok(Arc::new(Pd { pd: NonNull::new(pd).ok_or_else(|| ctx.verb_err("ibv_alloc_pd", 0))?, ctx: ctx.clone() }))
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The raw handle, for the child objects' verbs; allocated until `Drop`.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut ibv_pd {
        self.pd.as_ptr()
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs hold an Arc of the PD, so none is alive now.
        unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

// SAFETY: as for `Context`: a PD handle may be used from any thread, and this
// type holds only the handle and an Arc of the (Send + Sync) context.
unsafe impl Send for Pd {}
// SAFETY: as for `Send`; `&Pd` allows only thread-safe verbs on the handle.
unsafe impl Sync for Pd {}

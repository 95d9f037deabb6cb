//! `ViewBoard`: the newest cluster view the manager published, shared by a
//! node's threads. The control thread sets it and wakes the shard threads,
//! which act on it between bursts; a worker's reconnections read it. It holds
//! a view and wakers, nothing else: no thread reads the network through it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ps_core::control::ClusterView;

/// The newest view the manager published (`Control::View`).
pub struct ViewBoard {
    epoch: AtomicU64,
    view: Mutex<ClusterView>,
    wakers: Mutex<Vec<Arc<mio::Waker>>>,
}

impl ViewBoard {
    pub(crate) fn new(view: ClusterView) -> Arc<Self> {
        Arc::new(Self { epoch: AtomicU64::new(view.epoch), view: Mutex::new(view), wakers: Mutex::new(Vec::new()) })
    }

    /// The epoch of the newest view (cheap: threads poll it between bursts).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A copy of the newest view.
    pub fn get(&self) -> ClusterView {
        self.view.lock().expect("view lock").clone()
    }

    /// Takes `view` if it is newer, and wakes every registered thread.
    pub fn set(&self, view: ClusterView) {
        let mut v = self.view.lock().expect("view lock");
        if view.epoch <= v.epoch {
            return;
        }
        self.epoch.store(view.epoch, Ordering::Release);
        *v = view;
        drop(v);
        for w in self.wakers.lock().expect("wakers lock").iter() {
            let _ = w.wake();
        }
    }

    /// Wakes the poller behind `w` whenever a newer view arrives.
    pub fn add_waker(&self, w: Arc<mio::Waker>) {
        self.wakers.lock().expect("wakers lock").push(w);
    }
}

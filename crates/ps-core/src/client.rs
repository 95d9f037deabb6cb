//! The worker API: `push`, `pull`, `push_pull`, their range forms, and `wait`,
//! over any [`Transport`]. It is [`WorkerCore`] plus a loop that pumps the
//! transport while waiting; time comes from a [`Clock`] handed in.
//!
//! ```text
//! let ts = w.push(table, &keys, &grads)?;      // returns once the frames are queued
//! let tp = w.pull(table, &keys, buf)?;         // buf: a Vec<f32> handed over, reused
//! w.wait(ts)?;                                 // acknowledged: merged on every shard
//! let weights = w.wait_pull(tp)?;              // the Vec back, filled
//! let tq = w.pull_after(&[ts], table, &keys, buf2)?; // sent once ts has finished
//! ```
//! Keys are strictly ascending (`keys::sort_merge` makes them so). A pull issued
//! after a push of mine sees that push. A transport's sink must make room by
//! itself (flush and wait) when its queue is full, so `push` never fails for
//! back-pressure; it returns once its frames are queued.

use std::time::Duration;

use crate::error::PsError;
use crate::keys::{Key, TableId};
use crate::ring::Owner;
use crate::transport::{PeerEvent, PeerId, RxFrame, Transport};
use crate::wire::Kind;
use crate::worker::{Keys, Timestamp, WorkerCore};

/// Monotonic time since some origin, handed in so tests can run on simulated time.
pub trait Clock {
    /// Time since the clock's origin; never goes back.
    fn now(&self) -> Duration;
}

/// Connects to the copy that serves `owner` now (failover, `chain`): the
/// node hands it in, with the manager's latest view behind it.
pub type Reconnect<T> = Box<dyn FnMut(&mut T, Owner) -> Result<PeerId, ReconnectError>>;

/// Why a [`Reconnect`] found no copy to connect to yet (any error; a `&str`
/// or `String` converts with `.into()`). The worker tries again shortly.
pub type ReconnectError = Box<dyn std::error::Error + Send + Sync>;

/// Told of each failover once the new connection answered: the owner, and
/// the time from noticing the lost connection to that first answer.
pub type OnFailover = Box<dyn FnMut(Owner, Duration)>;

/// How long a worker waits before trying a lost owner again.
const RECONNECT_RETRY: Duration = Duration::from_millis(20);

struct Failover<T> {
    reconnect: Reconnect<T>,
    on_failover: OnFailover,
    /// owner -> when its connection was found lost, and when to try next
    lost_since: std::collections::HashMap<Owner, Duration>,
    retry_at: std::collections::HashMap<Owner, Duration>,
}

/// A worker: the protocol state ([`WorkerCore`]) driven over transport `T`.
pub struct Worker<T: Transport, C: Clock> {
    core: WorkerCore,
    transport: T,
    clock: C,
    rx: Vec<T::Rx>,
    events: Vec<PeerEvent>,
    op_timeout: Duration,
    failover: Option<Failover<T>>,
}

impl<T: Transport, C: Clock> std::fmt::Debug for Worker<T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("in_flight", &self.core.in_flight()).finish()
    }
}

impl<T: Transport, C: Clock> Worker<T, C> {
    /// A worker over `transport`; a wait not over after `op_timeout` (counted
    /// from its first poll) fails with [`PsError::Timeout`]. Failover is off until
    /// [`Worker::enable_failover`].
    pub fn new(core: WorkerCore, transport: T, clock: C, op_timeout: Duration) -> Self {
        Self { core, transport, clock, rx: Vec::with_capacity(64), events: Vec::new(), op_timeout, failover: None }
    }

    /// Turns on failover (a replicated job): binds to every shard as
    /// `origin`, and from now on a lost connection is replaced through
    /// `reconnect` while the operations in flight wait.
    pub fn enable_failover(
        &mut self,
        origin: u32,
        reconnect: Reconnect<T>,
        on_failover: OnFailover,
    ) -> Result<(), PsError> {
        self.core.enable_failover(&mut self.transport, origin)?;
        self.transport.flush().map_err(|e| PsError::Transport(e.to_string()))?;
        self.failover =
            Some(Failover { reconnect, on_failover, lost_since: Default::default(), retry_at: Default::default() });
        Ok(())
    }

    /// Connects lost owners to their new heads, and reports failovers done.
    fn fail_over(&mut self) -> Result<(), PsError> {
        let Some(f) = self.failover.as_mut() else { return Ok(()) };
        let now = self.clock.now();
        for o in self.core.lost_owners() {
            f.lost_since.entry(o).or_insert(now);
            if f.retry_at.get(&o).is_some_and(|&t| now < t) {
                continue;
            }
            match (f.reconnect)(&mut self.transport, o) {
                Ok(peer) => {
                    f.retry_at.remove(&o);
                    self.core.rebind(o, peer, &mut self.transport)?;
                }
                // not reachable yet (the manager has not named the new head): again shortly
                Err(_) => {
                    f.retry_at.insert(o, now + RECONNECT_RETRY);
                }
            }
        }
        for o in self.core.take_resumed() {
            if let Some(since) = f.lost_since.remove(&o) {
                (f.on_failover)(o, now.saturating_sub(since));
            }
        }
        Ok(())
    }

    /// The protocol state (counters, tables, what is in flight).
    pub fn core(&self) -> &WorkerCore {
        &self.core
    }

    /// The transport, to open connections or read its counters.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The protocol state, to change (add a push filter, set the rank).
    pub fn core_mut(&mut self) -> &mut WorkerCore {
        &mut self.core
    }

    /// Ends this worker's current clock (iteration): every shard is told, after
    /// everything this worker sent it before. Returns once the frames are
    /// queued; `wait` on the timestamp to know every shard has it. Reads of
    /// tables with a staleness bound wait for the slowest worker's clock.
    pub fn clock(&mut self) -> Result<Timestamp, PsError> {
        let ts = self.core.clock(&mut self.transport)?;
        self.transport.flush().map_err(|e| PsError::Transport(e.to_string()))?;
        Ok(ts)
    }

    fn issue(
        &mut self,
        kind: Kind,
        table: TableId,
        keys: Keys<'_>,
        vals: Option<&[f32]>,
        out: Option<Vec<f32>>,
    ) -> Result<Timestamp, PsError> {
        let ts = self.core.issue(&mut self.transport, kind, table, keys, vals, out)?;
        self.transport.flush().map_err(|e| PsError::Transport(e.to_string()))?;
        Ok(ts)
    }

    /// Pushes `dim` values per key (keys strictly ascending).
    pub fn push(&mut self, table: TableId, keys: &[Key], vals: &[f32]) -> Result<Timestamp, PsError> {
        self.issue(Kind::Push, table, Keys::List(keys), Some(vals), None)
    }

    /// Pushes `vals` into consecutive keys from `first` of a dense table.
    pub fn push_range(&mut self, table: TableId, first: Key, vals: &[f32]) -> Result<Timestamp, PsError> {
        let dim = self.core.table(table)?.dim as usize;
        let count = (vals.len() / dim) as u64;
        if !vals.len().is_multiple_of(dim) {
            return Err(PsError::WrongValueCount {
                table,
                dim: dim as u32,
                keys: count as usize,
                expected: count as usize * dim,
                got: vals.len(),
            });
        }
        self.issue(Kind::Push, table, Keys::Range { first, count }, Some(vals), None)
    }

    /// Pulls `dim` values per key into `out` (handed over; `wait_pull` returns it).
    pub fn pull(&mut self, table: TableId, keys: &[Key], out: Vec<f32>) -> Result<Timestamp, PsError> {
        self.issue(Kind::Pull, table, Keys::List(keys), None, Some(out))
    }

    /// Pulls `count` consecutive keys from `first` of a dense table.
    pub fn pull_range(&mut self, table: TableId, first: Key, count: u64, out: Vec<f32>) -> Result<Timestamp, PsError> {
        self.issue(Kind::Pull, table, Keys::Range { first, count }, None, Some(out))
    }

    /// Pushes once every timestamp in `deps` has finished (execute-after-finished;
    /// `WorkerCore::issue_after`). Returns at once; the push goes out as the
    /// worker is driven (`wait`, `poll_once`).
    pub fn push_after(
        &mut self,
        deps: &[Timestamp],
        table: TableId,
        keys: &[Key],
        vals: &[f32],
    ) -> Result<Timestamp, PsError> {
        self.core.issue_after(&mut self.transport, deps, Kind::Push, table, Keys::List(keys), Some(vals), None)
    }

    /// Pulls once every timestamp in `deps` has finished; `wait_pull` on it.
    pub fn pull_after(
        &mut self,
        deps: &[Timestamp],
        table: TableId,
        keys: &[Key],
        out: Vec<f32>,
    ) -> Result<Timestamp, PsError> {
        self.core.issue_after(&mut self.transport, deps, Kind::Pull, table, Keys::List(keys), None, Some(out))
    }

    /// Pushes, then pulls the same keys, in one round trip per chunk.
    pub fn push_pull(
        &mut self,
        table: TableId,
        keys: &[Key],
        vals: &[f32],
        out: Vec<f32>,
    ) -> Result<Timestamp, PsError> {
        self.issue(Kind::PushPull, table, Keys::List(keys), Some(vals), Some(out))
    }

    /// The range form of [`Worker::push_pull`].
    pub fn push_pull_range(
        &mut self,
        table: TableId,
        first: Key,
        vals: &[f32],
        out: Vec<f32>,
    ) -> Result<Timestamp, PsError> {
        let dim = self.core.table(table)?.dim as usize;
        let count = (vals.len() / dim) as u64;
        self.issue(Kind::PushPull, table, Keys::Range { first, count }, Some(vals), Some(out))
    }

    /// Runs the transport until `ts` is answered (or the op timeout passes).
    fn drive_until(&mut self, ts: Timestamp) -> Result<(), PsError> {
        // the clock is first read after the first poll (most waits end within
        // a few): the timeout counts from there, at most one poll late
        let mut start = None;
        loop {
            if self.core.is_done(ts)? {
                return Ok(());
            }
            let wait = if self.core.lost_owners().is_empty() { 50 } else { 5 };
            self.poll_once(Some(Duration::from_millis(wait)))?;
            let now = self.clock.now();
            if now.saturating_sub(*start.get_or_insert(now)) > self.op_timeout {
                return Err(PsError::Timeout(self.op_timeout));
            }
        }
    }

    /// Handles whatever the transport has now (or within `timeout`).
    pub fn poll_once(&mut self, timeout: Option<Duration>) -> Result<(), PsError> {
        self.core.pump(&mut self.transport);
        self.transport.flush().map_err(|e| PsError::Transport(e.to_string()))?;
        self.transport.rx_burst(&mut self.rx, timeout).map_err(|e| PsError::Transport(e.to_string()))?;
        for f in std::mem::take(&mut self.rx) {
            let peer = f.peer();
            let r = self.core.on_received(peer, f.received());
            self.transport.release(f);
            if let Err(e) = r {
                self.transport.close(peer, &e.to_string());
            }
        }
        self.transport.events(&mut self.events);
        for e in self.events.drain(..) {
            if let PeerEvent::Closed { peer, reason } = e {
                self.core.on_closed(peer, &reason);
            }
        }
        self.fail_over()?;
        // operations waiting on what just finished go out now
        self.core.pump(&mut self.transport);
        self.transport.flush().map_err(|e| PsError::Transport(e.to_string()))?;
        Ok(())
    }

    /// Waits until `ts` is acknowledged by every shard it touched. For a pull,
    /// the values are dropped: use [`Worker::wait_pull`] to get them.
    pub fn wait(&mut self, ts: Timestamp) -> Result<(), PsError> {
        self.drive_until(ts)?;
        self.core.finish(ts).map(|_| ())
    }

    /// Waits for a pull (or push-pull) and returns its values, `dim` per key.
    pub fn wait_pull(&mut self, ts: Timestamp) -> Result<Vec<f32>, PsError> {
        if !self.core.is_pull(ts) {
            self.core.is_done(ts)?;
            return Err(PsError::NotAPull(ts));
        }
        self.drive_until(ts)?;
        Ok(self.core.finish(ts)?.unwrap_or_default())
    }

    /// Blocking range pull into `out`, reusing its allocation.
    pub fn pull_into_range(
        &mut self,
        table: TableId,
        first: Key,
        count: u64,
        out: &mut Vec<f32>,
    ) -> Result<(), PsError> {
        let ts = self.pull_range(table, first, count, std::mem::take(out))?;
        *out = self.wait_pull(ts)?;
        Ok(())
    }

    /// Has every shard write a checkpoint labelled `label`, and waits until all
    /// are on disk (see `WorkerCore::checkpoint`).
    pub fn checkpoint(&mut self, label: u64) -> Result<(), PsError> {
        let ts = self.core.checkpoint(&mut self.transport, label)?;
        self.transport.flush().map_err(|e| PsError::Transport(e.to_string()))?;
        self.wait(ts)
    }

    /// Pushes what the filters of `table` held back, and waits for it.
    pub fn flush_filters(&mut self, table: TableId) -> Result<(), PsError> {
        for ts in self.core.flush_filters(&mut self.transport, table)? {
            self.wait(ts)?;
        }
        Ok(())
    }

    /// Blocking pull into `out`, reusing its allocation.
    pub fn pull_into(&mut self, table: TableId, keys: &[Key], out: &mut Vec<f32>) -> Result<(), PsError> {
        let ts = self.pull(table, keys, std::mem::take(out))?;
        *out = self.wait_pull(ts)?;
        Ok(())
    }
}

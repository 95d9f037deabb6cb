//! The packet simulator: every frame between two endpoints travels on a
//! connection that keeps its order (as TCP and RDMA RC do), with a delay of
//! its own, so frames of different connections overtake each other. Faults,
//! each with a probability drawn per seed (swarm testing: some seeds run
//! clean, some are stormy):
//! - *loss*: a frame sent with [`PacketSim::send_lossy`] may be lost; as the
//!   transports' contract says, a lost frame is a closed connection, which
//!   the caller closes (its state machines hear `on_closed`, reconnect, bind
//!   and send again);
//! - *partitions*: a set of processes is cut off from the rest for a while;
//!   frames across the cut wait until it heals (TCP retransmits), and
//!   [`PacketSim::reachable`] says a new connection across it is refused;
//! - *pauses*: a process takes no step for a while (a stop-the-world pause,
//!   a descheduled thread): nothing is delivered to it, and its driver asks
//!   [`PacketSim::paused`] before letting it act.
//!
//! Time is virtual (microseconds): it moves to the delivery time of each
//! frame. Everything random comes from the one seed, so a failing seed
//! replays exactly.
//!
//! Must never: reorder two frames of one connection, drop a frame sent with
//! [`PacketSim::send`], iterate a `HashMap` (its order is not the seed's), or
//! read the wall clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::rng::SplitMix64;

/// Virtual time, in microseconds since the run started.
pub type Micros = u64;

/// How stormy a run is. Probabilities are in millionths: per frame for loss,
/// per delivery for a partition or a pause to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faults {
    /// each frame takes 1..=`delay_us_max` to arrive
    pub delay_us_max: u64,
    /// chance per frame that it is lost, which closes its connection (millionths)
    pub loss_ppm: u64,
    /// chance per delivery that a partition starts (millionths)
    pub partition_ppm: u64,
    /// a partition heals within 1..=`partition_us_max` of virtual time
    pub partition_us_max: u64,
    /// chance per delivery that a process pauses (millionths)
    pub pause_ppm: u64,
    /// a pause ends within 1..=`pause_us_max` of virtual time
    pub pause_us_max: u64,
}

impl Faults {
    /// Ordered links, no faults: only the interleaving of connections is random.
    pub const NONE: Faults =
        Faults { delay_us_max: 1, loss_ppm: 0, partition_ppm: 0, partition_us_max: 0, pause_ppm: 0, pause_us_max: 0 };

    /// The faults of one seed: each kind is off for a quarter of the seeds and
    /// at a random rate for the others. `lossy`: whether the run's state
    /// machines survive closed connections (loss is off otherwise).
    /// Partitions and pauses stay well below the manager's heartbeat timeout,
    /// so they delay the job but never make the manager presume a node dead.
    pub fn of_seed(seed: u64, lossy: bool) -> Faults {
        let mut r = SplitMix64::new(crate::rng::mix64(seed ^ 0xFA17_5EED));
        let mut rate = |max: u64| if r.below(4) == 0 { 0 } else { 1 + r.below(max) };
        let loss_ppm = if lossy { rate(4_000) } else { 0 };
        let partition_ppm = rate(3_000);
        let pause_ppm = rate(3_000);
        let delay_us_max = 1 + r.below(2_000);
        let partition_us_max = 1_000 + r.below(300_000);
        let pause_us_max = 1_000 + r.below(200_000);
        Faults { delay_us_max, loss_ppm, partition_ppm, partition_us_max, pause_ppm, pause_us_max }
    }
}

/// Faults injected so far, for a run's report and for tests that check
/// the faults happened at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// frames that arrived
    pub delivered: u64,
    /// frames lost (each closed its connection)
    pub lost: u64,
    /// partitions started
    pub partitions: u64,
    /// process pauses started
    pub pauses: u64,
}

/// One direction of one connection: frames in flight with their arrival times.
#[derive(Debug)]
struct Link {
    from: usize,
    to: usize,
    q: VecDeque<(Micros, Vec<u8>)>,
    /// the arrival time of the newest frame (the next may not arrive earlier)
    last_at: Micros,
}

/// A seeded network of ordered connections with delay, loss, partitions and
/// pauses (see the module doc).
#[derive(Debug)]
pub struct PacketSim {
    rng: SplitMix64,
    faults: Faults,
    now: Micros,
    links: Vec<Link>,
    index: HashMap<(usize, usize), usize>,
    /// endpoint -> the process it lives in (an endpoint not named is a process of its own)
    process: HashMap<usize, usize>,
    processes: BTreeSet<usize>,
    /// process -> end of its pause
    paused: BTreeMap<usize, Micros>,
    /// the processes cut off from the others, and when the cut heals
    partition: Option<(BTreeSet<usize>, Micros)>,
    stats: FaultStats,
}

impl PacketSim {
    /// The network of one seed, with that seed's faults and no loss (for
    /// runs whose state machines do not survive a closed connection).
    pub fn new(seed: u64) -> Self {
        Self::with_faults(seed, Faults::of_seed(seed, false))
    }

    /// The network of one seed with the faults given (a test that wants
    /// a particular storm, or none).
    pub fn with_faults(seed: u64, faults: Faults) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            faults,
            now: 0,
            links: Vec::new(),
            index: HashMap::new(),
            process: HashMap::new(),
            processes: BTreeSet::new(),
            paused: BTreeMap::new(),
            partition: None,
            stats: FaultStats::default(),
        }
    }

    /// The run's one random stream: every choice of a run comes from it, so
    /// a seed replays exactly.
    pub fn rng(&mut self) -> &mut SplitMix64 {
        &mut self.rng
    }

    /// Virtual time now, microseconds since the run began.
    pub fn now(&self) -> Micros {
        self.now
    }

    /// The faults this run injects.
    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// The faults injected so far.
    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    /// Endpoint `ep` lives in process `proc` (pauses and partitions are per process).
    pub fn set_process(&mut self, ep: usize, proc: usize) {
        self.process.insert(ep, proc);
        self.processes.insert(proc);
    }

    fn proc_of(&self, ep: usize) -> usize {
        self.process.get(&ep).copied().unwrap_or(ep)
    }

    /// Whether the process of endpoint `ep` is paused now.
    pub fn paused(&self, ep: usize) -> bool {
        self.paused.get(&self.proc_of(ep)).is_some_and(|&until| until > self.now)
    }

    fn cut(&self, a: usize, b: usize) -> Option<Micros> {
        let (island, heals) = self.partition.as_ref()?;
        (*heals > self.now && island.contains(&self.proc_of(a)) != island.contains(&self.proc_of(b))).then_some(*heals)
    }

    /// Whether `a` can open a connection to `b` now (no partition between them).
    pub fn reachable(&self, a: usize, b: usize) -> bool {
        self.cut(a, b).is_none()
    }

    /// Queues a frame that is never lost (a link whose loss is out of the run's scope).
    pub fn send(&mut self, from: usize, to: usize, frame: Vec<u8>) {
        self.processes.insert(self.proc_of(from));
        self.processes.insert(self.proc_of(to));
        let delay = 1 + self.rng.below(self.faults.delay_us_max.max(1));
        let i = match self.index.get(&(from, to)) {
            Some(&i) => i,
            None => {
                self.links.push(Link { from, to, q: VecDeque::new(), last_at: 0 });
                self.index.insert((from, to), self.links.len() - 1);
                self.links.len() - 1
            }
        };
        let l = &mut self.links[i];
        let at = (self.now + delay).max(l.last_at);
        l.last_at = at;
        l.q.push_back((at, frame));
    }

    /// Queues a frame that may be lost: `false` when it was, and the caller
    /// must close its connection (frames after it on it are lost too).
    #[must_use]
    pub fn send_lossy(&mut self, from: usize, to: usize, frame: Vec<u8>) -> bool {
        if self.faults.loss_ppm > 0 && self.rng.below(1_000_000) < self.faults.loss_ppm {
            self.stats.lost += 1;
            return false;
        }
        self.send(from, to, frame);
        true
    }

    /// Drops every frame in flight from `from` to `to` (their connection closed).
    pub fn clear(&mut self, from: usize, to: usize) {
        if let Some(&i) = self.index.get(&(from, to)) {
            self.links[i].q.clear();
        }
    }

    /// Frames sent and not yet delivered, over every link.
    pub fn in_flight(&self) -> usize {
        self.links.iter().map(|l| l.q.len()).sum()
    }

    /// Maybe starts a partition or a pause (once per delivery).
    fn storm(&mut self) {
        if self.partition.as_ref().is_some_and(|(_, heals)| *heals <= self.now) {
            self.partition = None;
        }
        let procs: Vec<usize> = self.processes.iter().copied().collect();
        if procs.len() < 2 {
            return;
        }
        if self.partition.is_none() && self.rng.below(1_000_000) < self.faults.partition_ppm {
            // one process alone, or a random half
            let island: BTreeSet<usize> = if self.rng.below(2) == 0 {
                [procs[self.rng.below(procs.len() as u64) as usize]].into()
            } else {
                procs.iter().copied().filter(|_| self.rng.below(2) == 0).collect()
            };
            let heals = self.now + 1 + self.rng.below(self.faults.partition_us_max.max(1));
            self.partition = Some((island, heals));
            self.stats.partitions += 1;
        }
        if self.rng.below(1_000_000) < self.faults.pause_ppm {
            let p = procs[self.rng.below(procs.len() as u64) as usize];
            let until = self.now + 1 + self.rng.below(self.faults.pause_us_max.max(1));
            let e = self.paused.entry(p).or_insert(0);
            *e = (*e).max(until);
            self.stats.pauses += 1;
        }
    }

    /// When the frame at the head of link `l` can arrive: its time, or the
    /// end of its receiver's pause, or the healing of a cut between them.
    fn ready_at(&self, l: &Link) -> Option<Micros> {
        let (at, _) = l.q.front()?;
        let pause = self.paused.get(&self.proc_of(l.to)).copied().unwrap_or(0);
        Some((*at).max(pause).max(self.cut(l.from, l.to).unwrap_or(0)))
    }

    /// Delivers the frame that arrives first (ties broken by the seed),
    /// moving time to its arrival: `(from, to, frame)`; `None` once nothing
    /// is in flight.
    pub fn step(&mut self) -> Option<(usize, usize, Vec<u8>)> {
        self.storm();
        let mut best: Option<(Micros, usize)> = None;
        let mut ties = 0u64;
        for i in 0..self.links.len() {
            let Some(t) = self.ready_at(&self.links[i]) else { continue };
            match best {
                Some((b, _)) if t > b => {}
                Some((b, _)) if t == b => {
                    ties += 1;
                    if self.rng.below(ties + 1) == 0 {
                        best = Some((t, i));
                    }
                }
                _ => {
                    best = Some((t, i));
                    ties = 0;
                }
            }
        }
        let (t, i) = best?;
        self.now = self.now.max(t);
        self.stats.delivered += 1;
        let l = &mut self.links[i];
        let (_, frame) = l.q.pop_front().expect("a ready link has a frame");
        Some((l.from, l.to, frame))
    }

    /// Nothing in flight, but a process paused or a partition up: time
    /// moves to the first end of one. `false` when there is none.
    pub fn wake_next(&mut self) -> bool {
        let heal = self.partition.as_ref().map(|(_, heals)| *heals);
        let next = self.paused.values().copied().chain(heal).filter(|&u| u > self.now).min();
        if let Some(u) = next {
            self.now = u;
        }
        next.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(seed: u64, faults: Faults) -> Vec<(usize, u8)> {
        let mut n = PacketSim::with_faults(seed, faults);
        for i in 0..200 {
            n.send(i % 5, 9, vec![i as u8]);
        }
        std::iter::from_fn(|| n.step().map(|(f, _, b)| (f, b[0]))).collect()
    }

    #[test]
    fn the_same_seed_replays_the_same_interleaving() {
        let stormy = Faults::of_seed(3, true);
        assert_eq!(trace(4, Faults::NONE), trace(4, Faults::NONE));
        assert_ne!(trace(4, Faults::NONE), trace(5, Faults::NONE));
        assert_eq!(trace(4, stormy), trace(4, stormy));
    }

    #[test]
    fn frames_of_one_connection_keep_their_order_and_others_overtake() {
        let faults = Faults { delay_us_max: 1_000, ..Faults::NONE };
        let t = trace(1, faults);
        assert_eq!(t.len(), 200);
        for from in 0..5 {
            let mine: Vec<u8> = t.iter().filter(|(f, _)| *f == from).map(|(_, b)| *b).collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "connection {from} reordered: {mine:?}");
        }
        let order: Vec<u8> = t.iter().map(|(_, b)| *b).collect();
        assert!(order.windows(2).any(|w| w[0] > w[1]), "no frame overtook another");
    }

    #[test]
    fn pauses_and_partitions_hold_frames_and_loss_is_reported() {
        let faults = Faults {
            delay_us_max: 10,
            loss_ppm: 100_000,
            partition_ppm: 50_000,
            partition_us_max: 500,
            pause_ppm: 50_000,
            pause_us_max: 500,
        };
        let mut n = PacketSim::with_faults(9, faults);
        let mut lost = 0;
        for i in 0..2_000 {
            if !n.send_lossy(i % 4, 4 + i % 3, vec![0]) {
                lost += 1;
            }
            if i % 3 == 0 {
                n.step();
            }
        }
        while n.step().is_some() {}
        let s = n.stats();
        assert!(lost > 0 && s.lost == lost && s.partitions > 0 && s.pauses > 0, "{s:?}");
        assert_eq!(s.delivered + s.lost, 2_000);
        assert!(n.now() > 0);
    }
}

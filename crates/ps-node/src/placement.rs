//! Where a server's shard threads run: one per core (never two hyperthreads of
//! one core while cores are free), on the cores nearest the RDMA device (its
//! NUMA node, as hwloc sees the machine through `hwlocality`), or on the cores
//! `--cpus` names. The other cores are left to worker compute threads: a worker
//! process binds itself away from the cores nearest the device when the
//! machine has others ([`plan_worker`]). The plan is printed at start, with
//! why it is what it is.

use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::object::types::ObjectType;
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::TypeFilter;
use hwlocality::Topology;

use crate::error::PlacementError;

/// A placement and the reason for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// shard thread h runs on `shard_cpus[h]` (logical CPU numbers)
    pub shard_cpus: Vec<usize>,
    /// the cores shards leave free (all of them when shards take every core);
    /// a worker binds itself away from the device's cores with [`plan_worker`]
    pub worker_cpus: Vec<usize>,
    /// the NUMA node(s) the shard cores are on
    pub numa: Vec<usize>,
    pub(crate) why: String,
}

impl Placement {
    /// One line for the log: where shard threads run, and why.
    pub fn describe(&self) -> String {
        format!(
            "shard threads on CPUs {:?} (NUMA node {}), other CPUs {:?}: {}",
            self.shard_cpus,
            if self.numa.is_empty() { "?".to_string() } else { join(&self.numa) },
            self.worker_cpus,
            self.why
        )
    }
}

fn join(v: &[usize]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

fn cpus_of(o: &TopologyObject) -> Vec<usize> {
    o.cpuset().map(|s| s.iter_set().map(usize::from).collect()).unwrap_or_default()
}

/// The machine as hwloc sees it, I/O devices included (to find the RDMA device).
pub fn topology() -> Result<Topology, PlacementError> {
    Topology::builder()
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|e| PlacementError::Hwloc(e.to_string()))?
        .build()
        .map_err(|e| PlacementError::Hwloc(e.to_string()))
}

/// The CPUs nearest the OS device named `device` (its first non-I/O
/// ancestor's), if hwloc knows the device.
fn device_cpus(topo: &Topology, device: &str) -> Option<Vec<usize>> {
    topo.objects_with_type(ObjectType::OSDevice)
        .find(|o| o.name().is_some_and(|n| n.to_bytes() == device.as_bytes()))
        .and_then(|o| o.first_non_io_ancestor())
        .map(cpus_of)
}

/// Plans `shards` shard threads for a node using `device` (the RDMA device's
/// name, if any), or on `cpus` when given; the cores are taken from the
/// `offset`-th on (round robin), so servers sharing a machine spread out.
pub fn plan(shards: usize, offset: usize, device: Option<&str>, cpus: &[usize]) -> Result<Placement, PlacementError> {
    let topo = topology()?;
    // one logical CPU per core: the first of its hyperthreads
    let cores: Vec<usize> =
        topo.objects_with_type(ObjectType::Core).filter_map(|c| cpus_of(c).first().copied()).collect();
    let cores = if cores.is_empty() { cpus_of(topo.root_object()) } else { cores };
    if cores.is_empty() {
        return Err(PlacementError::NoCpu);
    }
    let numa_of = |cpu: usize| {
        topo.objects_with_type(ObjectType::NUMANode)
            .filter(|n| cpus_of(n).contains(&cpu))
            .filter_map(|n| n.os_index())
            .next()
    };
    let (candidates, why) = if !cpus.is_empty() {
        (cpus.to_vec(), "the CPUs --cpus names".to_string())
    } else {
        let local = device.and_then(|d| device_cpus(&topo, d));
        match (device, local) {
            (Some(d), Some(local)) => {
                let near: Vec<usize> = cores.iter().copied().filter(|c| local.contains(c)).collect();
                if near.is_empty() {
                    (cores.clone(), format!("{d} has no local cores hwloc can see: every core"))
                } else {
                    (near, format!("the cores nearest {d}"))
                }
            }
            (Some(d), None) => (
                cores.clone(),
                format!("{d} is not among hwloc's I/O devices (soft-RoCE has no PCI device): every core"),
            ),
            (None, _) => (cores.clone(), "no RDMA device: every core".to_string()),
        }
    };
    let mut why = why;
    if shards > candidates.len() {
        why.push_str(&format!("; {shards} shards on {} cores: some share a core", candidates.len()));
    }
    let shard_cpus: Vec<usize> = (0..shards).map(|h| candidates[(offset + h) % candidates.len()]).collect();
    let rest: Vec<usize> = cores.iter().copied().filter(|c| !shard_cpus.contains(c)).collect();
    let worker_cpus = if rest.is_empty() { cores.clone() } else { rest };
    let mut numa: Vec<usize> = shard_cpus.iter().filter_map(|&c| numa_of(c)).collect();
    numa.sort_unstable();
    numa.dedup();
    Ok(Placement { shard_cpus, worker_cpus, numa, why })
}

/// The CPUs a worker process should run on: the cores away from the RDMA
/// device's (the shard threads' by default) when the machine has any, with
/// the reason; `None` when there is nothing better than every core.
pub fn plan_worker(topo: &Topology, device: Option<&str>) -> (Option<Vec<usize>>, String) {
    let all = cpus_of(topo.root_object());
    let Some(d) = device else { return (None, "no RDMA device: every core".into()) };
    let Some(local) = device_cpus(topo, d) else {
        return (None, format!("{d} has no place hwloc can see: every core"));
    };
    let away: Vec<usize> = all.iter().copied().filter(|c| !local.contains(c)).collect();
    if away.is_empty() {
        (None, format!("every core is near {d}: shared with the shard threads"))
    } else {
        (Some(away), format!("the cores away from {d}, which shard threads use"))
    }
}

/// Binds the calling thread (a worker's compute thread) to `cpus`.
pub fn bind_current(topo: &Topology, cpus: &[usize]) -> Result<(), PlacementError> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c);
    }
    topo.bind_cpu(&set, CpuBindingFlags::THREAD).map_err(|e| PlacementError::Hwloc(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_get_distinct_cores_while_there_are_any() {
        let p = plan(1, 0, None, &[]).unwrap();
        assert_eq!(p.shard_cpus.len(), 1);
        assert!(!p.worker_cpus.is_empty());
        assert!(p.why.contains("no RDMA device"), "{}", p.why);
        let all = plan(64, 0, None, &[]).unwrap();
        let distinct: std::collections::HashSet<_> = all.shard_cpus.iter().collect();
        assert_eq!(distinct.len(), all.worker_cpus.len().min(64), "one shard per core until they run out");
    }

    #[test]
    fn a_worker_without_a_located_device_keeps_every_core() {
        let topo = topology().unwrap();
        let (cpus, why) = plan_worker(&topo, None);
        assert!(cpus.is_none() && why.contains("no RDMA device"), "{why}");
        let (cpus, why) = plan_worker(&topo, Some("no-such-device"));
        assert!(cpus.is_none() && why.contains("no place hwloc can see"), "{why}");
    }

    #[test]
    fn cpus_given_win_and_an_unknown_device_is_said() {
        let p = plan(3, 0, Some("mlx5_0"), &[1, 0]).unwrap();
        assert_eq!(p.shard_cpus, [1, 0, 1]);
        assert!(p.why.contains("--cpus"), "{}", p.why);
        let q = plan(1, 0, Some("no-such-device"), &[]).unwrap();
        assert!(q.why.contains("no-such-device is not among hwloc's I/O devices"), "{}", q.why);
    }
}

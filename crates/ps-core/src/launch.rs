//! Where a process stands in a job a launcher started: its rank, the job's
//! size, its rank on its node and the job's hosts, read from the variables
//! `mpirun` (Open MPI), PMIx, PMI (MPICH's hydra) and Slurm set. No I/O: the
//! environment is handed in as a lookup, so every launcher is a unit test.
//!
//! Order of preference: `OMPI_COMM_WORLD_*`, `PMIX_RANK`, `PMI_RANK`, then
//! `SLURM_PROCID`. Slurm comes last because `mpirun` inside an `sbatch`
//! allocation leaves every rank with the batch step's `SLURM_PROCID=0`.
//!
//! Slurm's host lists are compressed: `n[1-3,7]`, `a[01-12]b`, `x,y[2-3]`;
//! [`expand_hostlist`] expands them, and [`expand_tasks_per_node`] expands
//! `SLURM_TASKS_PER_NODE` (`2(x2),1` is 2, 2, 1).

/// A process's place in a launched job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// which launcher's variables said so: "openmpi", "pmix", "pmi", "slurm"
    pub source: &'static str,
    /// this process's rank in the job, 0..size
    pub rank: u32,
    /// the job's processes, all nodes together
    pub size: u32,
    /// rank among the job's processes on this node, when the launcher says
    pub local_rank: Option<u32>,
    /// the job's processes on this node, when the launcher says
    pub local_size: Option<u32>,
    /// the job's hosts in order (Slurm only: MPI launchers do not export them)
    pub hosts: Vec<String>,
    /// processes per host, in the order of `hosts` (Slurm only)
    pub tasks_per_host: Vec<u32>,
}

/// Why the launcher's variables cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// A variable that should hold a number does not.
    #[error("{var}={value:?} is not a number")]
    NotANumber {
        /// the variable's name
        var: &'static str,
        /// what it holds
        value: String,
    },
    /// The rank is not below the job's size.
    #[error("{rank_var} is {rank} but the job has {size} processes ({size_var})")]
    RankOutOfRange {
        /// the rank variable's name
        rank_var: &'static str,
        /// the rank it holds
        rank: u32,
        /// the size variable's name
        size_var: &'static str,
        /// the size it holds
        size: u32,
    },
    /// The launcher's rank variable is set but its size variable is not.
    #[error("{launcher} sets {rank_var} but not {size_var}: cannot tell the job's size")]
    NoSize {
        /// the launcher ([`Launch::source`]'s names)
        launcher: &'static str,
        /// the rank variable's name
        rank_var: &'static str,
        /// the size variable's name, missing
        size_var: &'static str,
    },
    /// A Slurm host list or tasks-per-node list cannot be expanded.
    #[error("host list {list:?}: {why}")]
    HostList {
        /// the list as the variable holds it
        list: String,
        /// what is wrong with it
        why: String,
    },
    /// The job's ranks cannot hold a manager, the servers asked for and a worker.
    #[error(
        "{size} ranks cannot hold a manager, {servers} server(s) and at least one worker: \
         start at least {need} ranks or ask for fewer servers"
    )]
    TooFewRanks {
        /// the job's ranks
        size: u32,
        /// the servers asked for
        servers: u32,
        /// the fewest ranks that would do
        need: u32,
    },
    /// Servers per node cannot be placed on this launch's nodes.
    #[error("{per_node} servers per node: {why}; give --servers (a total) instead")]
    ServersPerNode {
        /// the servers asked for on every node
        per_node: u32,
        /// what the launch does not say, or how its nodes do not fit
        why: String,
    },
}

/// One launcher's variables.
struct Scheme {
    source: &'static str,
    rank: &'static str,
    size: &'static str,
    local: &'static str,
    /// processes on this node ("" : the launcher has no such variable)
    local_size: &'static str,
}

const SCHEMES: [Scheme; 4] = [
    Scheme {
        source: "openmpi",
        rank: "OMPI_COMM_WORLD_RANK",
        size: "OMPI_COMM_WORLD_SIZE",
        local: "OMPI_COMM_WORLD_LOCAL_RANK",
        local_size: "OMPI_COMM_WORLD_LOCAL_SIZE",
    },
    // PMIx has no size variable of its own; Open MPI sets both, others set PMIX_SIZE
    Scheme {
        source: "pmix",
        rank: "PMIX_RANK",
        size: "PMIX_SIZE",
        local: "PMIX_LOCAL_RANK",
        local_size: "PMIX_LOCAL_SIZE",
    },
    Scheme {
        source: "pmi",
        rank: "PMI_RANK",
        size: "PMI_SIZE",
        local: "MPI_LOCALRANKID",
        local_size: "MPI_LOCALNRANKS",
    },
    // Slurm's count on this node comes from SLURM_TASKS_PER_NODE and SLURM_NODEID
    Scheme { source: "slurm", rank: "SLURM_PROCID", size: "SLURM_NTASKS", local: "SLURM_LOCALID", local_size: "" },
];

fn number(env: &dyn Fn(&str) -> Option<String>, var: &'static str) -> Result<Option<u32>, LaunchError> {
    match env(var) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| LaunchError::NotANumber { var, value: v }),
    }
}

/// The launch this process is part of, from `env` (`None`: no launcher's
/// variables are set, e.g. a process started by hand).
pub fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>, LaunchError> {
    for s in &SCHEMES {
        let Some(rank) = number(env, s.rank)? else { continue };
        let size = number(env, s.size)?.ok_or(LaunchError::NoSize {
            launcher: s.source,
            rank_var: s.rank,
            size_var: s.size,
        })?;
        if rank >= size {
            return Err(LaunchError::RankOutOfRange { rank_var: s.rank, rank, size_var: s.size, size });
        }
        let mut l = Launch {
            source: s.source,
            rank,
            size,
            local_rank: number(env, s.local)?,
            local_size: if s.local_size.is_empty() { None } else { number(env, s.local_size)? },
            hosts: Vec::new(),
            tasks_per_host: Vec::new(),
        };
        // Slurm's host list describes the allocation, whoever started the ranks
        let list = env("SLURM_STEP_NODELIST").or_else(|| env("SLURM_JOB_NODELIST")).or_else(|| env("SLURM_NODELIST"));
        if let Some(list) = list {
            l.hosts = expand_hostlist(&list)?;
            if let Some(t) = env("SLURM_STEP_TASKS_PER_NODE").or_else(|| env("SLURM_TASKS_PER_NODE")) {
                l.tasks_per_host = expand_tasks_per_node(&t)?;
            }
            if s.source == "slurm" {
                let node = number(env, "SLURM_NODEID")?;
                l.local_size = node.and_then(|n| l.tasks_per_host.get(n as usize).copied());
            }
        }
        return Ok(Some(l));
    }
    Ok(None)
}

/// Expands a Slurm host list: comma-separated names, each with any number of
/// bracketed ranges (`n[1-3,7]`, `a[01-12]b`, `r[1-2]n[1-2]`); zero-padding is
/// kept. Limited to 1 M names so a malformed list cannot eat memory.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, LaunchError> {
    const NAMES_MAX: usize = 1 << 20;
    let bad = |why: &str| LaunchError::HostList { list: list.to_string(), why: why.to_string() };
    let mut out = Vec::new();
    // split on commas outside brackets
    let mut depth = 0i32;
    let mut start = 0;
    let mut items = Vec::new();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(bad("unbalanced or nested brackets"));
        }
    }
    if depth != 0 {
        return Err(bad("an unclosed bracket"));
    }
    items.push(&list[start..]);
    for item in items.into_iter().map(str::trim) {
        if item.is_empty() {
            return Err(bad("an empty name"));
        }
        let mut names = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            let Some(open) = rest.find('[') else {
                names.iter_mut().for_each(|n| n.push_str(rest));
                break;
            };
            let close = rest.find(']').ok_or_else(|| bad("an unclosed bracket"))?;
            let prefix = &rest[..open];
            let mut alts = Vec::new();
            for part in rest[open + 1..close].split(',') {
                let (a, b) = part.split_once('-').unwrap_or((part, part));
                let (lo, hi): (u64, u64) = match (a.parse(), b.parse()) {
                    (Ok(lo), Ok(hi)) if lo <= hi => (lo, hi),
                    _ => return Err(bad(&format!("{part:?} is not a number or a range lo-hi"))),
                };
                if (hi - lo) as usize >= NAMES_MAX {
                    return Err(bad("too many names"));
                }
                let width = a.len();
                alts.extend((lo..=hi).map(|v| format!("{v:0width$}")));
            }
            if names.len().saturating_mul(alts.len()) > NAMES_MAX {
                return Err(bad("too many names"));
            }
            names = names.into_iter().flat_map(|n| alts.iter().map(move |a| format!("{n}{prefix}{a}"))).collect();
            rest = &rest[close + 1..];
        }
        out.extend(names);
        if out.len() > NAMES_MAX {
            return Err(bad("too many names"));
        }
    }
    Ok(out)
}

/// Expands `SLURM_TASKS_PER_NODE`: `2(x3),1` is 2, 2, 2, 1.
pub fn expand_tasks_per_node(s: &str) -> Result<Vec<u32>, LaunchError> {
    let bad = |why: String| LaunchError::HostList { list: s.to_string(), why };
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (n, times) = match part.split_once("(x") {
            Some((n, t)) => (n, t.strip_suffix(')').ok_or_else(|| bad(format!("{part:?}: no closing )")))?),
            None => (part, "1"),
        };
        let n: u32 = n.parse().map_err(|_| bad(format!("{part:?}: {n:?} is not a count")))?;
        let times: usize = times.parse().map_err(|_| bad(format!("{part:?}: {times:?} is not a count")))?;
        if out.len() + times > 1 << 20 {
            return Err(bad("too many nodes".into()));
        }
        out.extend(std::iter::repeat_n(n, times));
    }
    Ok(out)
}

/// The role a rank plays when the job's roles come from its rank: rank 0 is
/// the manager, the next `servers` ranks are servers, the rest workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankRole {
    /// rank 0
    Manager,
    /// the n-th server
    Server(u32),
    /// the n-th worker
    Worker(u32),
}

/// Splits a job of `size` ranks into a manager, `servers` servers and the rest
/// workers; an error if that leaves no worker.
pub fn role_of(rank: u32, size: u32, servers: u32) -> Result<RankRole, LaunchError> {
    if servers == 0 || size < servers + 2 {
        return Err(LaunchError::TooFewRanks { size, servers, need: servers.max(1) + 2 });
    }
    Ok(match rank {
        0 => RankRole::Manager,
        r if r <= servers => RankRole::Server(r - 1),
        r => RankRole::Worker(r - 1 - servers),
    })
}

/// Splits a job with `k` servers on every node: rank 0 is the manager; on
/// its node local ranks 1..=k are servers, on every other node local ranks
/// 0..k. Needs ranks placed on nodes in blocks (Open MPI's and Slurm's
/// default), the launcher's local rank, and the number of ranks per node
/// (Slurm's tasks per node, or an MPI launcher's local size, the same on every
/// node). Returns the role and the job's server count.
pub fn role_per_node(l: &Launch, k: u32) -> Result<(RankRole, u32), LaunchError> {
    let why = |w: &str| LaunchError::ServersPerNode { per_node: k, why: w.to_string() };
    let lr = l.local_rank.ok_or_else(|| why(&format!("{} does not say the local rank", l.source)))?;
    // where each node's block of ranks starts
    let per_node: Vec<u32> = if !l.tasks_per_host.is_empty() {
        l.tasks_per_host.clone()
    } else {
        let ls = l.local_size.ok_or_else(|| why(&format!("{} does not say the ranks per node", l.source)))?;
        if ls == 0 || !l.size.is_multiple_of(ls) {
            return Err(why(&format!("{} ranks do not split evenly into nodes of {ls}", l.size)));
        }
        vec![ls; (l.size / ls) as usize]
    };
    if per_node.iter().sum::<u32>() != l.size {
        return Err(why(&format!("the nodes' ranks {per_node:?} do not add up to {}", l.size)));
    }
    let start = l.rank.checked_sub(lr).ok_or_else(|| why("the local rank is above the rank"))?;
    let mut at = 0;
    let node = per_node
        .iter()
        .position(|&n| {
            let here = at == start;
            at += n;
            here
        })
        .ok_or_else(|| why("ranks are not placed on nodes in blocks"))? as u32;
    let nodes = per_node.len() as u32;
    let servers = k * nodes;
    if k == 0 || per_node[0] < k + 1 || per_node.iter().any(|&n| n < k) || l.size < servers + 2 {
        return Err(why(&format!(
            "nodes with {per_node:?} ranks cannot hold a manager, {k} servers each and a worker"
        )));
    }
    // servers on this node below local rank `lr`
    let slot = |lr: u32| if node == 0 { lr.saturating_sub(1).min(k) } else { lr.min(k) };
    let is_server = if node == 0 { (1..=k).contains(&lr) } else { lr < k };
    let role = if l.rank == 0 {
        RankRole::Manager
    } else if is_server {
        RankRole::Server(node * k + slot(lr))
    } else {
        RankRole::Worker(l.rank - 1 - (node * k + slot(lr)))
    };
    Ok((role, servers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn host_lists_expand_as_slurm_writes_them() {
        let x = |s| expand_hostlist(s).unwrap();
        assert_eq!(x("n[1-3,7]"), ["n1", "n2", "n3", "n7"]);
        assert_eq!(x("a[01-03]b"), ["a01b", "a02b", "a03b"]);
        assert_eq!(x("node7"), ["node7"]);
        assert_eq!(x("x,y[2-3],z"), ["x", "y2", "y3", "z"]);
        assert_eq!(x("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert_eq!(x("c[098-101]"), ["c098", "c099", "c100", "c101"]);
        for bad in ["n[1-3", "n1-3]", "n[3-1]", "n[a]", "", "a,,b", "n[[1]]", "n[0-99999999]"] {
            assert!(expand_hostlist(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn tasks_per_node_expand() {
        assert_eq!(expand_tasks_per_node("2(x2),1").unwrap(), [2, 2, 1]);
        assert_eq!(expand_tasks_per_node("4").unwrap(), [4]);
        assert_eq!(expand_tasks_per_node("1(x3)").unwrap(), [1, 1, 1]);
        for bad in ["2(x", "x", "2(xq)", "-1", "1(x99999999)"] {
            assert!(expand_tasks_per_node(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn every_launcher_is_detected() {
        let d = |vars: &[(&str, &str)]| detect(&env(vars)).unwrap().unwrap();
        let o = d(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "6"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
            ("PMIX_RANK", "3"),
        ]);
        assert_eq!((o.source, o.rank, o.size, o.local_rank), ("openmpi", 3, 6, Some(3)));
        let p = d(&[("PMIX_RANK", "2"), ("PMIX_SIZE", "4")]);
        assert_eq!((p.source, p.rank, p.size, p.local_rank), ("pmix", 2, 4, None));
        let m = d(&[("PMI_RANK", "1"), ("PMI_SIZE", "6"), ("MPI_LOCALRANKID", "1")]);
        assert_eq!((m.source, m.rank, m.size, m.local_rank), ("pmi", 1, 6, Some(1)));
        let s = d(&[
            ("SLURM_PROCID", "4"),
            ("SLURM_NTASKS", "5"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_STEP_NODELIST", "n[1-3]"),
            ("SLURM_TASKS_PER_NODE", "2(x2),1"),
        ]);
        assert_eq!((s.source, s.rank, s.size, s.local_rank), ("slurm", 4, 5, Some(0)));
        assert_eq!((s.hosts, s.tasks_per_host), (vec!["n1".into(), "n2".into(), "n3".into()], vec![2, 2, 1]));
        assert_eq!(detect(&env(&[("HOME", "/root")])).unwrap(), None);
    }

    #[test]
    fn mpirun_inside_sbatch_takes_the_mpi_rank_not_slurms() {
        // every rank inherits the batch step's SLURM_PROCID=0
        let l = detect(&env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_JOB_NODELIST", "n1"),
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "6"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.source, l.rank, l.size), ("openmpi", 5, 6));
        assert_eq!(l.hosts, ["n1"], "the allocation's hosts still come from Slurm");
    }

    #[test]
    fn bad_variables_are_errors_that_name_them() {
        let e = detect(&env(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("PMI_RANK"), "{e}");
        let e = detect(&env(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")])).unwrap_err();
        assert!(matches!(e, LaunchError::RankOutOfRange { .. }), "{e}");
        let e = detect(&env(&[("PMIX_RANK", "0")])).unwrap_err();
        assert!(matches!(e, LaunchError::NoSize { .. }), "{e}");
    }

    #[test]
    fn k_servers_per_node_in_blocks_of_ranks() {
        // 3 nodes of 4 ranks (Open MPI), 1 server per node
        let launch = |rank: u32| Launch {
            source: "openmpi",
            rank,
            size: 12,
            local_rank: Some(rank % 4),
            local_size: Some(4),
            hosts: vec![],
            tasks_per_host: vec![],
        };
        let roles: Vec<RankRole> = (0..12).map(|r| role_per_node(&launch(r), 1).unwrap().0).collect();
        use RankRole::*;
        assert_eq!(
            roles,
            [
                Manager,
                Server(0),
                Worker(0),
                Worker(1),
                Server(1),
                Worker(2),
                Worker(3),
                Worker(4),
                Server(2),
                Worker(5),
                Worker(6),
                Worker(7)
            ]
        );
        assert_eq!(role_per_node(&launch(5), 1).unwrap().1, 3);
        // Slurm with uneven nodes: 2(x2),1 and 1 server per node
        let s = detect(&env(&[
            ("SLURM_PROCID", "4"),
            ("SLURM_NTASKS", "5"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "2"),
            ("SLURM_STEP_NODELIST", "n[1-3]"),
            ("SLURM_TASKS_PER_NODE", "2(x2),1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s.local_size, Some(1));
        assert_eq!(role_per_node(&s, 1).unwrap(), (RankRole::Server(2), 3));
        // too few ranks per node, no local rank, uneven MPI nodes: errors that say so
        assert!(role_per_node(&launch(0), 4).unwrap_err().to_string().contains("cannot hold"));
        assert!(role_per_node(&Launch { local_rank: None, ..launch(1) }, 1)
            .unwrap_err()
            .to_string()
            .contains("local rank"));
        assert!(role_per_node(&Launch { local_size: Some(5), ..launch(1) }, 1)
            .unwrap_err()
            .to_string()
            .contains("evenly"));
    }

    #[test]
    fn ranks_split_into_manager_servers_workers() {
        let roles: Vec<_> = (0..6).map(|r| role_of(r, 6, 2).unwrap()).collect();
        assert_eq!(
            roles,
            [
                RankRole::Manager,
                RankRole::Server(0),
                RankRole::Server(1),
                RankRole::Worker(0),
                RankRole::Worker(1),
                RankRole::Worker(2)
            ]
        );
        assert!(role_of(0, 3, 2).is_err());
        assert!(role_of(0, 5, 0).is_err());
    }
}

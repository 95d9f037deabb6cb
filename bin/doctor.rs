//! `pslab doctor`: is this machine ready for RDMA, and if not, what to do.
//! Devices and ports come from ps-rdma (RDMA builds); the locked-memory limit
//! and hugepages are read here. Exit status 0 either way: a machine without a
//! device runs over TCP, and the report says so.

use ps_node::net::{NetOpts, BUILT_WITH_RDMA};

/// Connections a node is assumed to register rings for (a few dozen workers).
const DOCTOR_CONNECTIONS: u64 = 32;

fn memlock() -> Option<(u64, u64)> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // the libc call is safe to make: it only writes the struct we pass
    #[allow(unsafe_code)]
    // SAFETY: `r` is a valid out-pointer for getrlimit.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    (rc == 0).then_some((r.rlim_cur, r.rlim_max))
}

fn human(b: u64) -> String {
    if b == libc::RLIM_INFINITY {
        "unlimited".into()
    } else if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
}

pub fn run(net: &NetOpts, slab_bytes: u64) -> Result<(), String> {
    let mut problems: Vec<String> = Vec::new();
    println!("pslab doctor");
    println!("build: {}", if BUILT_WITH_RDMA { "with RDMA (ibverbs)" } else { "TCP only" });
    println!("transport setting: {}", net.transport.name());

    #[cfg(feature = "rdma")]
    {
        let choice = ps_rdma::transport::DeviceChoice { name: net.rdma_device.clone(), gid_index: net.rdma_gid_index };
        let r = ps_rdma::doctor::devices(&choice);
        for l in &r.lines {
            println!("{l}");
        }
        problems.extend(r.problems);
    }
    #[cfg(not(feature = "rdma"))]
    problems.push(
        "this build has no RDMA: `apt-get install libibverbs-dev librdmacm-dev libclang-dev` and \
         `cargo build --release --features rdma` (the TCP transport works meanwhile)"
            .into(),
    );

    let ring = ps_core::limits::WireLimits::default().rdma_conn_bytes() as u64;
    let need = slab_bytes + DOCTOR_CONNECTIONS * ring;
    match memlock() {
        Some((cur, max)) => {
            println!(
                "locked-memory limit (ulimit -l): {} (hard {}); a node serving {} needs about {}",
                human(cur),
                human(max),
                human(slab_bytes),
                human(need)
            );
            if cur != libc::RLIM_INFINITY && cur < need {
                problems.push(format!(
                    "ulimit -l is {}: registering {} will fail with ENOMEM. Raise it: `ulimit -l unlimited` in the job \
                     script, `* - memlock unlimited` in /etc/security/limits.conf, or LimitMEMLOCK=infinity for \
                     slurmd (Slurm also needs PropagateResourceLimits to pass it on)",
                    human(cur),
                    human(need)
                ));
            }
        }
        None => problems.push("cannot read the locked-memory limit (getrlimit failed)".into()),
    }
    match (meminfo("HugePages_Total:"), meminfo("HugePages_Free:"), meminfo("Hugepagesize:")) {
        (Some(t), Some(f), Some(sz)) => println!(
            "hugepages: {t} of {sz} KiB, {f} free{}",
            if t == 0 { " (none reserved: slabs use 4 KiB pages and transparent hugepages; fine)" } else { "" }
        ),
        _ => println!("hugepages: /proc/meminfo does not say"),
    }
    // where a server with one shard per core would run its threads
    let cores = core_affinity::get_core_ids().map_or(1, |c| c.len());
    match ps_node::placement::plan(cores, 0, ps_node::net::device_name(net).as_deref(), &[]) {
        Ok(p) => println!("placement ({cores} shards): {}", p.describe()),
        Err(e) => problems.push(format!("placement: {e}: shard threads will not be pinned")),
    }
    if problems.is_empty() {
        println!("no problems found");
    } else {
        println!("{} problem(s):", problems.len());
        for p in &problems {
            println!("  - {p}");
        }
    }
    Ok(())
}

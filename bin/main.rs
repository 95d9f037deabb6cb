//! `pslab`: the parameter server's one binary.
//!
//! - `pslab local`: a whole cluster on this machine (the README's first command);
//! - `pslab node`: one role of a job (what mpirun / srun / scripts start);
//! - `pslab bench`: push/pull throughput and latency beside raw TCP;
//! - `pslab secret`: a fresh per-job secret;
//! - `pslab doctor`: RDMA devices, ports, GIDs, memlock and hugepages, with remedies;
//! - `pslab plot`: a PNG of line or bar panels described in JSON (the experiments' figures);
//! - `pslab lr`: sparse logistic regression (the `lr` app) as a local cluster;
//! - `pslab prepare clothing`: the clothing reviews as LIBSVM files for the `lr` app.
//!
//! Environment: see docs/env.md.
// the exception: `doctor`'s getrlimit; the runtime's (ps-node) and the
// data readers' (ps-apps) are their crates' own
#![deny(unsafe_code)]

mod baseline;
mod benchcmd;
mod doctor;
mod jobfile;
mod local;
mod plot;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ps_core::auth::JobSecret;
use ps_node::control::OnAbort;
use ps_node::net::{self, NetOpts, TransportMode};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "pslab",
    version,
    about = "A thread-per-core parameter server for distributed ML, over RDMA (ibverbs) or TCP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Data transport between workers and shards: auto (RDMA where an active
    /// device exists, else TCP, said in the log), rdma (or fail), tcp.
    #[arg(long, global = true, value_enum, env = "PS_TRANSPORT", default_value = "auto")]
    transport: TransportArg,
    /// The RDMA device to use (default: the first with an active port).
    #[arg(long, global = true, env = "PS_RDMA_DEVICE")]
    rdma_device: Option<String>,
    /// The GID index to use (default: RoCE: the IPv4-mapped RoCEv2 GID; InfiniBand: the LID).
    #[arg(long, global = true, env = "PS_RDMA_GID_INDEX")]
    rdma_gid_index: Option<i32>,
}

/// `--transport`: the data transport between workers and shards.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Default)]
enum TransportArg {
    /// RDMA where an active verbs device exists, else TCP (one log line says which).
    #[default]
    Auto,
    /// RDMA or fail.
    Rdma,
    /// TCP only.
    Tcp,
}

impl From<TransportArg> for TransportMode {
    fn from(t: TransportArg) -> TransportMode {
        match t {
            TransportArg::Auto => TransportMode::Auto,
            TransportArg::Rdma => TransportMode::Rdma,
            TransportArg::Tcp => TransportMode::Tcp,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum RoleArg {
    Manager,
    Server,
    Worker,
    /// From the launcher's rank (mpirun, mpiexec, srun): rank 0 the manager,
    /// the next --servers ranks servers, the rest workers.
    Auto,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a manager, servers and workers as separate processes on 127.0.0.1 and run a job.
    Local {
        #[arg(long, default_value_t = 2)]
        servers: u32,
        /// Shard threads per server (each pinned to a core).
        #[arg(long, default_value_t = 1)]
        shards: u32,
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// The worker program: train-lr (the default job), check (invariant test), bench.
        #[arg(long, default_value = "train-lr")]
        app: String,
        /// Program parameters as JSON, e.g. '{"epochs": 3}'.
        #[arg(long, default_value = "{}")]
        params: String,
        /// Do not pin shard threads to cores.
        #[arg(long)]
        no_pin: bool,
        /// Print every process's log lines, not only warnings and results.
        #[arg(long, short)]
        verbose: bool,
        /// Draw the objective per sweep (apps that report `@iter`: lr) into this PNG.
        #[arg(long)]
        png: Option<String>,
        /// Copies of every shard's key ranges (chain replication over
        /// consecutive servers; 1: none). At most the number of servers count.
        #[arg(long, default_value_t = 2)]
        copies: u32,
        /// Fault injection: SIGKILL a process NAME (manager, serverN, workerN;
        /// with replicas managerN, or `leader` for the leading one) MS
        /// milliseconds after the job starts running; repeatable.
        #[arg(long, value_name = "NAME@MS")]
        kill: Vec<local::Kill>,
        /// Manager replicas (a Raft group; the job survives the loss of a minority).
        #[arg(long, default_value_t = 1)]
        managers: u32,
    },
    /// Run one role of a job (what launchers start).
    Node {
        #[arg(long, value_enum, env = "PS_ROLE")]
        role: RoleArg,
        /// The manager's address (servers and workers).
        #[arg(long, env = "PS_MANAGER")]
        manager: Option<String>,
        /// Where the manager listens (port 0: any free port, printed as `@listening ADDR`).
        #[arg(long, env = "PS_LISTEN", default_value = "127.0.0.1:7070")]
        listen: String,
        /// Manager: servers to wait for; with --role auto, how many ranks after
        /// the manager are servers.
        #[arg(long, env = "PS_SERVERS", default_value_t = 1)]
        servers: u32,
        /// Manager: workers to wait for.
        #[arg(long, env = "PS_WORKERS", default_value_t = 1)]
        workers: u32,
        /// Manager: the worker program.
        #[arg(long, env = "PS_APP", default_value = "train-lr")]
        app: String,
        /// Manager: program parameters (JSON).
        #[arg(long, env = "PS_PARAMS", default_value = "{}")]
        params: String,
        /// Manager: copies of every shard's key ranges (chain replication; 1: none).
        #[arg(long, env = "PS_COPIES", default_value_t = 2)]
        copies: u32,
        /// Manager: every manager replica's address, comma-separated, this
        /// one's --listen among them: the replicas keep the job's state in a
        /// Raft log and one leads (servers and workers list them all in --manager).
        #[arg(long, env = "PS_MANAGER_REPLICAS", value_delimiter = ',')]
        replicas: Vec<String>,
        /// Server: shard threads (default: one per core).
        #[arg(long, env = "PS_SHARDS")]
        shards: Option<usize>,
        /// Server/worker: the address others reach this node at.
        #[arg(long, env = "PS_HOST", default_value = "127.0.0.1")]
        host: String,
        /// Server: first shard port (0: any free ports).
        #[arg(long, env = "PS_PORT_BASE", default_value_t = 0)]
        port_base: u16,
        /// Server: cores to pin shard threads to, e.g. 0,2,4.
        #[arg(long, env = "PS_CPUS", value_delimiter = ',')]
        cpus: Vec<usize>,
        /// Server: do not pin shard threads.
        #[arg(long)]
        no_pin: bool,
        /// Server/worker: the rank to ask for among its role (default: the lowest free).
        #[arg(long, env = "PS_RANK")]
        rank: Option<u32>,
        /// A TOML job file (app, params, servers, servers_per_node, workers,
        /// shards, port, manager, cpus): what it sets replaces those flags' defaults.
        #[arg(long, env = "PS_JOB")]
        job: Option<String>,
        /// With --role auto: this many servers on every node (ranks placed on
        /// nodes in blocks) instead of --servers in all.
        #[arg(long, env = "PS_SERVERS_PER_NODE")]
        servers_per_node: Option<u32>,
    },
    /// Push/pull throughput and latency over value sizes, beside raw TCP in the same run.
    Bench {
        #[arg(long, default_value_t = 1)]
        servers: u32,
        #[arg(long, default_value_t = 1)]
        shards: u32,
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Seconds per phase after warm-up.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Dense value sizes in bytes (default 4K..64M).
        #[arg(long, value_delimiter = ',')]
        dense_sizes: Vec<u64>,
        /// Sparse sizes in bytes (keys = bytes / 4; default 4K..4M).
        #[arg(long, value_delimiter = ',')]
        sparse_sizes: Vec<u64>,
        /// Skip the raw-TCP baseline.
        #[arg(long)]
        no_baseline: bool,
        /// Skip the sparse phases.
        #[arg(long)]
        no_sparse: bool,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<String>,
        /// Write a PNG plot here.
        #[arg(long)]
        plot: Option<String>,
        #[arg(long)]
        no_pin: bool,
        /// Run everything this many times and report medians.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Also measure dense pushes and pulls with this many in flight
        /// (push_win, pull_win: pipelined goodput, as ib_write_bw measures).
        #[arg(long, default_value_t = 1)]
        window: usize,
        /// Measure only push_win and pull_win (with --window > 1): the soft-RoCE
        /// suite's runs beside perftest, which measures nothing else.
        #[arg(long)]
        window_only: bool,
        /// Copies of every shard (1: the data path alone, as ps-lite measures;
        /// 2 or more: what chain replication costs; at most --servers count).
        #[arg(long, default_value_t = 1)]
        copies: u32,
    },
    /// Print a fresh job secret (64 hex digits) for PS_JOB_SECRET.
    Secret,
    /// Check this machine for RDMA: devices, ports, GIDs, MTU, the memlock limit
    /// against the memory a job registers, hugepages; says what to fix.
    Doctor {
        /// Bytes of parameters this node will serve (checked against `ulimit -l`).
        #[arg(long, default_value_t = 1 << 30)]
        slab_bytes: u64,
    },
    /// Redraw the PNG of a saved `pslab bench --json` result.
    PlotBench { json: String, png: String },
    /// Draw a PNG of line or bar panels described in JSON (the experiments' figures).
    Plot {
        /// {"title": T, "panels": [{"title": T, "x": LABEL, "y": LABEL, "log_y": false, "y_fit": false,
        /// "kind": "line" | "bar", "series": [{"name": N, "points": [[x, y], ...]}]}]}
        #[arg(long)]
        json: String,
        /// The PNG to write.
        #[arg(long)]
        out: String,
    },
    /// Sparse logistic regression (the `lr` app) as a local cluster: delayed
    /// block proximal gradient with the KKT filter, or streaming FTRL.
    Lr {
        /// A directory with train.libsvm and test.libsvm (scripts/fetch-clothing.sh makes them).
        #[arg(long, default_value = "data/clothing")]
        data: String,
        #[arg(long, value_parser = ["l1", "l2"], default_value = "l1")]
        reg: String,
        /// Regularisation: l1 or l2 = 1/C.
        #[arg(long, default_value_t = 1.0)]
        c: f64,
        /// dbpg (delayed block proximal gradient) or ftrl (streaming).
        #[arg(long, value_parser = ["dbpg", "ftrl"], default_value = "dbpg")]
        solver: String,
        /// Passes over the data (default: 150 for dbpg, 3 for ftrl).
        #[arg(long)]
        sweeps: Option<u64>,
        /// The delay τ between a block's step and its use (dbpg; below the number of blocks, 16).
        #[arg(long, default_value_t = 1)]
        tau: u32,
        #[arg(long, default_value_t = 2)]
        servers: u32,
        #[arg(long, default_value_t = 4)]
        workers: u32,
        /// Write the model here (format in docs/env.md).
        #[arg(long)]
        model: Option<String>,
        /// Draw the objective per sweep into this PNG.
        #[arg(long)]
        png: Option<String>,
        /// Write a checkpoint every N sweeps into PS_CHECKPOINT_DIR (default pslab-checkpoints)/ckpt-SWEEP.
        #[arg(long)]
        checkpoint_every: Option<u64>,
        /// Resume from a checkpoint directory (e.g. pslab-checkpoints/ckpt-50): same servers and parameters.
        #[arg(long)]
        resume: Option<std::path::PathBuf>,
        /// More parameters as JSON (filters, blocks, kkt, ...: README), merged over the flags.
        #[arg(long, default_value = "{}")]
        params: String,
        #[arg(long)]
        no_pin: bool,
        #[arg(long, short)]
        verbose: bool,
        /// Copies of every shard's key ranges (chain replication; 1: none).
        #[arg(long, default_value_t = 2)]
        copies: u32,
    },
    /// Prepare a fetched dataset for the apps (scripts/fetch-clothing.sh runs it).
    Prepare {
        /// The dataset: clothing (the women's clothing reviews -> LIBSVM).
        #[arg(value_parser = ["clothing"])]
        dataset: String,
        /// The directory holding the fetched file; the prepared files go beside it.
        #[arg(long, default_value = "data/clothing")]
        dir: std::path::PathBuf,
    },
    /// (internal, tests) an extra client that pushes into the torn-read job until killed.
    #[command(hide = true)]
    Hammer { view: String },
    /// (internal) the raw-TCP baseline's server side.
    #[command(hide = true)]
    TcpBaselineServer,
}

fn init_logging() {
    let label = std::env::var("PS_ROLE_LABEL").ok();
    let filter = tracing_subscriber::EnvFilter::try_from_env("PS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    if label.is_some() {
        // the launcher prefixes the role and has its own clock
        b.without_time().init();
    } else {
        b.init();
    }
}

/// The job secret, from PS_JOB_SECRET or the file PS_JOB_SECRET_FILE (mode 0600).
fn job_secret() -> Result<JobSecret, String> {
    if let Ok(hex) = std::env::var("PS_JOB_SECRET") {
        return JobSecret::from_hex(&hex).map_err(|e| format!("PS_JOB_SECRET: {e}"));
    }
    if let Ok(path) = std::env::var("PS_JOB_SECRET_FILE") {
        let meta = std::fs::metadata(&path).map_err(|e| format!("PS_JOB_SECRET_FILE {path}: {e}"))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "PS_JOB_SECRET_FILE {path} has mode {mode:o}: other users could read the job secret; chmod 600 {path}"
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| format!("PS_JOB_SECRET_FILE {path}: {e}"))?;
        return JobSecret::from_hex(&text).map_err(|e| format!("PS_JOB_SECRET_FILE {path}: {e}"));
    }
    Err("no job secret: set PS_JOB_SECRET (64 hex digits, e.g. from `pslab secret`) or PS_JOB_SECRET_FILE (a 0600 file) in every process of the job".into())
}

/// Children started by `pslab local` stop when the launcher disappears.
fn watch_parent() {
    if std::env::var("PS_PARENT_WATCH").is_err() {
        return;
    }
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        if std::os::unix::process::parent_id() != parent {
            eprintln!("the launcher is gone; stopping");
            std::process::exit(3);
        }
    });
}

fn run_node(cmd: Cmd, netopts: &NetOpts) -> Result<String, String> {
    let Cmd::Node {
        role,
        mut manager,
        mut listen,
        mut servers,
        mut workers,
        mut app,
        mut params,
        mut copies,
        replicas,
        mut shards,
        host,
        port_base,
        mut cpus,
        no_pin,
        rank,
        job,
        mut servers_per_node,
    } = cmd
    else {
        unreachable!()
    };
    if let Some(path) = &job {
        let f = jobfile::JobFile::load(path)?;
        app = f.app.clone().unwrap_or(app);
        params = f.params_json().unwrap_or(params);
        servers = f.servers.unwrap_or(servers);
        servers_per_node = f.servers_per_node.or(servers_per_node);
        workers = f.workers.unwrap_or(workers);
        copies = f.copies.unwrap_or(copies);
        shards = f.shards.or(shards);
        cpus = f.cpus.clone().unwrap_or(cpus);
        manager = f.manager.clone().or(manager);
        if let Some(port) = f.port {
            let host = listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h).to_string();
            listen = format!("{host}:{port}");
        }
    }
    let secret = job_secret()?;
    let (role, rank, workers, manager) = match role {
        RoleArg::Auto => {
            let a = auto_role(servers, servers_per_node, manager, &listen)?;
            servers = a.servers;
            (a.role, a.rank, a.workers, a.manager)
        }
        r => (r, rank, workers, manager),
    };
    let manager_addrs = || -> Result<Vec<SocketAddr>, String> {
        let list = manager.as_deref().ok_or("--manager (or PS_MANAGER) is required for servers and workers")?;
        Ok(list.split(',').map(|a| ps_node::resolve(a.trim())).collect::<Result<_, _>>()?)
    };
    match role {
        RoleArg::Manager => {
            let params: serde_json::Value =
                serde_json::from_str(&params).map_err(|e| format!("--params is not JSON: {e}"))?;
            let job = ps_apps::job_spec(&app, &params, servers, copies)?;
            let replicas = replicas.iter().map(|a| ps_node::resolve(a)).collect::<Result<Vec<_>, _>>()?;
            Ok(ps_node::run_manager(secret, ps_node::resolve(&listen)?, replicas, job, servers, workers)?)
        }
        RoleArg::Server => {
            let cores = core_affinity::get_core_ids().map(|c| c.len()).unwrap_or(1);
            let pid = std::process::id();
            let shards = shards.unwrap_or(cores);
            let on_abort = OnAbort::ExitProcess;
            let opts = ps_node::ServerOpts { host, shards, port_base, cpus, pin: !no_pin, rank, pid, on_abort };
            Ok(ps_node::run_server(secret, &manager_addrs()?, opts, netopts)?)
        }
        RoleArg::Worker => {
            let (pid, on_abort) = (std::process::id(), OnAbort::ExitProcess);
            let opts = ps_node::WorkerOpts { host, rank, pid, place: true, on_abort };
            Ok(ps_node::run_worker(secret, &manager_addrs()?, opts, netopts, &ps_apps::lookup)?)
        }
        RoleArg::Auto => unreachable!("resolved above"),
    }
}

/// `--role auto`: this process's role, rank among its role, the job's worker
/// count and the manager's address, from the launcher's variables
/// (`ps_core::launch`). The manager is found at `--manager` if given, else at
/// the first host of a Slurm allocation (or 127.0.0.1) on `--listen`'s port.
/// What `--role auto` decided for this process.
struct AutoRole {
    role: RoleArg,
    /// its rank among its role (`None`: the manager's)
    rank: Option<u32>,
    workers: u32,
    servers: u32,
    manager: Option<String>,
}

fn auto_role(servers: u32, per_node: Option<u32>, manager: Option<String>, listen: &str) -> Result<AutoRole, String> {
    use ps_core::launch::{detect, role_of, role_per_node, RankRole};
    let l = detect(&|k| std::env::var(k).ok())
        .map_err(|e| format!("--role auto: {e}"))?
        .ok_or("--role auto needs a launcher (mpirun, mpiexec or srun): none of OMPI_COMM_WORLD_RANK, PMIX_RANK, PMI_RANK, SLURM_PROCID is set")?;
    let (role, servers) = match per_node {
        Some(k) => role_per_node(&l, k)?,
        None => (role_of(l.rank, l.size, servers)?, servers),
    };
    if let Some(p) = std::env::var("SLURM_PROCID").ok().filter(|p| l.source != "slurm" && *p != l.rank.to_string()) {
        tracing::info!("SLURM_PROCID={p} ignored: {} started this rank inside a Slurm allocation", l.source);
    }
    let port = listen.rsplit_once(':').map(|(_, p)| p).unwrap_or("7070");
    let manager = manager.or_else(|| Some(format!("{}:{port}", l.hosts.first().map_or("127.0.0.1", |h| h.as_str()))));
    let workers = l.size - 1 - servers;
    let (arg, rank) = match role {
        RankRole::Manager => (RoleArg::Manager, None),
        RankRole::Server(n) => (RoleArg::Server, Some(n)),
        RankRole::Worker(n) => (RoleArg::Worker, Some(n)),
    };
    tracing::info!(
        "rank {} of {} ({}{}): {:?}{}, manager at {}",
        l.rank,
        l.size,
        l.source,
        l.local_rank.map_or(String::new(), |r| format!(", local rank {r}")),
        role,
        if l.hosts.is_empty() { String::new() } else { format!(", hosts {}", l.hosts.join(",")) },
        manager.as_deref().unwrap_or("?")
    );
    Ok(AutoRole { role: arg, rank, workers, servers, manager })
}

fn run_local(spec: local::ClusterSpec, verbose: bool, png: Option<String>) -> Result<(), String> {
    let (servers, shards, workers, app) = (spec.servers, spec.shards, spec.workers, spec.app.clone());
    ps_apps::job_spec(&app, &spec.params, servers, spec.copies)?; // fail fast on bad parameters
    let copies = spec.copies.min(servers);
    eprintln!(
        "pslab local: manager + {servers} server(s) x {shards} shard(s) + {workers} worker(s) on 127.0.0.1, app {app}{}",
        if copies > 1 { format!(", {copies} copies of every shard") } else { String::new() }
    );
    let mut failovers: Vec<serde_json::Value> = Vec::new();
    let mut kills: Vec<serde_json::Value> = Vec::new();
    let mut last_kill: Option<std::time::Instant> = None;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut progress: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
    let mut result: Option<serde_json::Value> = None;
    let mut curve: Vec<(f64, f64)> = Vec::new();
    let started = std::time::Instant::now();
    let outcome = local::run(&spec, &mut |e| match e {
        local::Event::At { kind, value, .. } if kind == "progress" => {
            let rank = value["rank"].as_u64().unwrap_or(0);
            progress.insert(rank, (value["done"].as_u64().unwrap_or(0), value["total"].as_u64().unwrap_or(0)));
            let (done, total) = progress.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(value["unit"].as_str().unwrap_or("").to_string());
        }
        local::Event::At { kind, value, .. } if kind == "epoch" => bar.suspend(|| {
            println!(
                "epoch {}/{}  train loss {:.5}  ({} examples, {:.1} s)",
                value["epoch"],
                value["epochs"],
                value["loss"].as_f64().unwrap_or(f64::NAN),
                value["examples"],
                value["secs"].as_f64().unwrap_or(0.0)
            )
        }),
        local::Event::At { kind, value, .. } if kind == "iter" => bar.suspend(|| {
            let objective = value["objective"].as_f64().unwrap_or(f64::NAN);
            curve.push((value["sweep"].as_f64().unwrap_or(0.0), objective));
            println!(
                "sweep {}/{}  objective {objective:.4}  non-zeros {}  filtered {:.1}%  sent {} B  ({:.1} s)",
                value["sweep"],
                value["sweeps"],
                value["nonzeros"],
                value["filtered_pct"].as_f64().unwrap_or(0.0),
                value["bytes"],
                value["secs"].as_f64().unwrap_or(0.0)
            )
        }),
        local::Event::At { kind, value, .. } if kind == "result" => result = Some(value),
        local::Event::At { kind, mut value, .. } if kind == "failover" => {
            // the launcher's own measure: from its kill to the line of the first answer
            if let Some(k) = last_kill {
                value["since_kill_ms"] = (k.elapsed().as_secs_f64() * 1e3).into();
            }
            failovers.push(value)
        }
        local::Event::At { kind, value, .. } if kind == "leader" => {
            let line = format!(
                "manager failover: {} leads, {:.0} ms after the kill of the leader",
                value["name"].as_str().unwrap_or("?"),
                value["since_kill_ms"].as_f64().unwrap_or(0.0)
            );
            bar.suspend(|| println!("{line}"));
        }
        local::Event::At { kind, value, .. } if kind == "killed" => {
            bar.suspend(|| {
                eprintln!(
                    "[launcher] killed {} (pid {}) with SIGKILL {:.2} s into the job",
                    value["name"].as_str().unwrap_or("?"),
                    value["pid"],
                    value["at_s"].as_f64().unwrap_or(0.0)
                )
            });
            last_kill = Some(std::time::Instant::now());
            kills.push(value)
        }
        local::Event::At { kind, value, role } => bar.suspend(|| println!("[{role}] {kind}: {value}")),
        local::Event::Line { role, line } => {
            if verbose
                || line.contains("ERROR")
                || line.contains("WARN")
                || line.contains("finished")
                || line.contains("failed")
                || line.starts_with("error:")
            {
                bar.suspend(|| eprintln!("[{role}] {line}"));
            }
        }
    });
    bar.finish_and_clear();
    if let (Some(path), false) = (&png, curve.is_empty()) {
        let figure = plot::Figure {
            title: format!("{app}: objective per sweep"),
            panels: vec![plot::Panel {
                title: "training objective".into(),
                x: "sweep".into(),
                y: "objective".into(),
                log_y: false,
                y_fit: true,
                kind: plot::Kind::Line,
                series: vec![plot::Series { name: app.clone(), points: curve }],
            }],
        };
        plot::figure_png(path, &figure)?;
        eprintln!("pslab local: objective curve in {path}");
    }
    if let Some(r) = result.as_ref().filter(|r| r.get("planted_accuracy").is_none()) {
        println!("----------------------------------------------------------------");
        for (k, v) in r.as_object().into_iter().flatten() {
            println!("{k:<22} {v}");
        }
        println!("----------------------------------------------------------------");
    } else if let Some(r) = &result {
        println!("----------------------------------------------------------------");
        println!("held-out examples      {}", r["test_examples"]);
        println!("test accuracy          {:.4}", r["accuracy"].as_f64().unwrap_or(0.0));
        println!(
            "planted model accuracy {:.4}   (the best a learner can expect: label noise)",
            r["planted_accuracy"].as_f64().unwrap_or(0.0)
        );
        println!("agreement with planted {:.4}", r["agreement_with_planted"].as_f64().unwrap_or(0.0));
        println!("test log-loss          {:.4}", r["test_logloss"].as_f64().unwrap_or(0.0));
        println!("test AUC               {:.4}", r["auc"].as_f64().unwrap_or(0.0));
        for l in r["lost_workers"].as_array().into_iter().flatten() {
            let done = if l["policy"] == "reassign" { "dealt out to the live workers" } else { "left out" };
            println!(
                "lost worker            {}: its {} examples {done} from epoch {} on",
                l["worker"], l["examples"], l["from_epoch"]
            );
        }
        println!("----------------------------------------------------------------");
    }
    if !failovers.is_empty() {
        let ms: Vec<f64> = failovers.iter().filter_map(|f| f["ms"].as_f64()).collect();
        let longest = ms.iter().copied().fold(0.0, f64::max);
        let since_kill = failovers.iter().filter_map(|f| f["since_kill_ms"].as_f64()).fold(0.0, f64::max);
        println!(
            "failover: {} connections moved to new heads; from a lost connection to the new head's first answer: \
             longest {longest:.0} ms, mean {:.0} ms (workers' clocks); from the kill to the last of those answers: \
             {since_kill:.0} ms (the launcher's)",
            ms.len(),
            ms.iter().sum::<f64>() / ms.len().max(1) as f64
        );
    }
    match outcome {
        Ok(()) if !kills.is_empty() => {
            eprintln!(
                "pslab local: the job completed after {:.1} s, with {} killed on purpose; every other process exited cleanly",
                started.elapsed().as_secs_f64(),
                kills.iter().filter_map(|k| k["name"].as_str()).collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Ok(()) => {
            eprintln!("pslab local: every process exited cleanly after {:.1} s", started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A forced `--transport rdma` that cannot work fails before anything starts.
fn preflight(netopts: &NetOpts) -> Result<(), String> {
    Ok(net::preflight(netopts)?)
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    let netopts =
        NetOpts { transport: cli.transport.into(), rdma_device: cli.rdma_device, rdma_gid_index: cli.rdma_gid_index };
    // the processes `local` and `bench` start run the same transport
    netopts.export_env();
    let r = match cli.cmd {
        Cmd::Local { servers, shards, workers, app, params, no_pin, verbose, png, copies, kill, managers } => {
            preflight(&netopts).and_then(|()| {
                let params = serde_json::from_str(&params).map_err(|e| format!("--params is not JSON: {e}"))?;
                let spec = local::ClusterSpec {
                    servers,
                    shards,
                    workers,
                    app,
                    params,
                    pin: !no_pin,
                    copies,
                    kills: kill,
                    managers,
                };
                run_local(spec, verbose, png)
            })
        }
        cmd @ Cmd::Node { .. } => {
            watch_parent();
            run_node(cmd, &netopts).map(|msg| tracing::info!("{msg}"))
        }
        Cmd::Bench {
            servers,
            shards,
            workers,
            seconds,
            dense_sizes,
            sparse_sizes,
            no_baseline,
            no_sparse,
            json,
            plot,
            no_pin,
            repeat,
            window,
            window_only,
            copies,
        } => {
            if window_only && window < 2 {
                eprintln!("pslab bench: --window-only needs --window 2 or more");
                std::process::exit(2);
            }
            let mut params = json!({"seconds": seconds, "window": window, "window_only": window_only});
            if !dense_sizes.is_empty() {
                params["dense_sizes"] = json!(dense_sizes);
            }
            if !sparse_sizes.is_empty() {
                params["sparse_sizes"] = json!(sparse_sizes);
            }
            if no_sparse {
                params["sparse_sizes"] = json!([]);
            }
            preflight(&netopts).and_then(|()| {
                benchcmd::run(benchcmd::BenchOpts {
                    servers,
                    shards,
                    workers,
                    params,
                    baseline: !no_baseline,
                    json,
                    plot,
                    pin: !no_pin,
                    repeat,
                    copies,
                })
            })
        }
        Cmd::PlotBench { json, png } => benchcmd::replot(&json, &png),
        Cmd::Plot { json, out } => plot::figure_file(&json, &out),
        Cmd::Lr {
            data,
            reg,
            c,
            solver,
            sweeps,
            tau,
            servers,
            workers,
            model,
            png,
            checkpoint_every,
            resume,
            params,
            no_pin,
            verbose,
            copies,
        } => {
            serde_json::from_str::<serde_json::Value>(&params)
                .map_err(|e| format!("--params is not JSON: {e}"))
                .and_then(|extra| {
                    let mut p = serde_json::json!({"data": data, "reg": reg, "c": c, "solver": solver, "tau": tau});
                    if let Some(s) = sweeps {
                        p["sweeps"] = s.into();
                    }
                    if let Some(m) = model {
                        p["model"] = m.into();
                    }
                    if let Some(n) = checkpoint_every {
                        p["checkpoint_every"] = n.into();
                    }
                    if let Some(dir) = &resume {
                        // the servers load it (PS_RESUME); the workers start after its sweep
                        p["resume_sweep"] =
                            ps_node::checkpoint::checkpoint_label(dir).map_err(|e| e.to_string())?.into();
                        std::env::set_var("PS_RESUME", dir);
                    }
                    for (k, v) in extra.as_object().ok_or("--params must be a JSON object")? {
                        p[k] = v.clone();
                    }
                    preflight(&netopts)?;
                    let spec = local::ClusterSpec {
                        servers,
                        shards: 1,
                        workers,
                        app: "lr".into(),
                        params: p,
                        pin: !no_pin,
                        copies,
                        kills: Vec::new(),
                        managers: 1,
                    };
                    run_local(spec, verbose, png)
                })
        }
        Cmd::Prepare { dataset: _, dir } => ps_apps::data::clothing::run(&dir),
        Cmd::Secret => ps_tcp_fallback::generate_secret().map(|s| println!("{}", s.to_hex())),
        Cmd::Doctor { slab_bytes } => doctor::run(&netopts, slab_bytes),
        Cmd::TcpBaselineServer => baseline::serve(),
        Cmd::Hammer { view } => job_secret().and_then(|s| ps_apps::torn::hammer(s, &view, &netopts)),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

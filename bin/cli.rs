//! The command line of `pslab`: the clap definitions of its global flags
//! ([`Cli`]), its subcommands and their flags ([`Cmd`]), and the value enums
//! they take. What each subcommand does is main.rs's (and its modules'); this
//! file only says what can be typed.

use clap::{Parser, Subcommand, ValueEnum};
use ps_node::net::TransportMode;

use crate::local;

#[derive(Parser, Debug)]
#[command(
    name = "pslab",
    version,
    about = "A thread-per-core parameter server for distributed ML, over RDMA (ibverbs) or TCP"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
    /// Data transport between workers and shards: auto (RDMA where an active
    /// device exists, else TCP, said in the log), rdma (or fail), tcp.
    #[arg(long, global = true, value_enum, env = "PS_TRANSPORT", default_value = "auto")]
    pub(crate) transport: TransportArg,
    /// The RDMA device to use (default: the first with an active port).
    #[arg(long, global = true, env = "PS_RDMA_DEVICE")]
    pub(crate) rdma_device: Option<String>,
    /// The GID index to use (default: RoCE: the IPv4-mapped RoCEv2 GID; InfiniBand: the LID).
    #[arg(long, global = true, env = "PS_RDMA_GID_INDEX")]
    pub(crate) rdma_gid_index: Option<i32>,
}

/// `--transport`: the data transport between workers and shards.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Default)]
pub(crate) enum TransportArg {
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
pub(crate) enum RoleArg {
    Manager,
    Server,
    Worker,
    /// From the launcher's rank (mpirun, mpiexec, srun): rank 0 the manager,
    /// the next --servers ranks servers, the rest workers.
    Auto,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
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
        /// milliseconds after the job starts running; `NAME@connected+MS`:
        /// after every worker connected to its shards; `NAME@whole+MS`: after
        /// every lost copy has been rebuilt and joined its chain; repeatable.
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

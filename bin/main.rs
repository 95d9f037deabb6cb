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
mod benchrow;
mod cli;
mod doctor;
mod jobfile;
mod local;
mod localcmd;
mod plot;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use clap::Parser;
use ps_core::auth::JobSecret;
use ps_node::control::OnAbort;
use ps_node::net::{self, NetOpts};
use serde_json::json;

use cli::{Cli, Cmd, RoleArg};
use localcmd::run_local;

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
            let job = ps_apps::job_spec(&app, &params, servers, copies).map_err(|e| e.to_string())?;
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
        Some(k) => role_per_node(&l, k).map_err(|e| e.to_string())?,
        None => (role_of(l.rank, l.size, servers).map_err(|e| e.to_string())?, servers),
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
        Cmd::Prepare { dataset: _, dir } => ps_apps::data::clothing::run(&dir).map_err(|e| e.to_string()),
        Cmd::Secret => {
            ps_tcp_fallback::generate_secret().map(|s| println!("{}", s.to_hex())).map_err(|e| e.to_string())
        }
        Cmd::Doctor { slab_bytes } => doctor::run(&netopts, slab_bytes),
        Cmd::TcpBaselineServer => baseline::serve(),
        Cmd::Hammer { view } => {
            job_secret().and_then(|s| ps_apps::torn::hammer(s, &view, &netopts).map_err(|e| e.to_string()))
        }
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

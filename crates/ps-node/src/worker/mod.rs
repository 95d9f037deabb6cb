//! The worker runtime: registration, where the worker's thread runs, the PS
//! client connected to every shard (`client.rs`), failover through the
//! manager's newest view, and the handle an application gets
//! ([`WorkerCtx`]). The runtime names no application: the caller hands in a
//! lookup from the job's app name to its program ([`AppMain`]).

mod client;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use ps_core::auth::JobSecret;
use ps_core::client::Worker;
use ps_core::control::{ClusterView, Role};

use crate::control::{ControlLink, Member, OnAbort};
use crate::error::{ControlError, NodeError};
use crate::net::{self, NetOpts, NodeTransport};
use crate::StdClock;

pub use client::{connect_client, enable_failover};

/// The blocking PS client a worker runs (`push`, `pull`, `wait`, ...).
pub type PsWorker = Worker<NodeTransport, StdClock>;

/// Why a worker program failed: the app's own error type, boxed (the runtime
/// names no app, so it knows none of their types); its message is what the
/// manager and the log are told.
pub type AppFailure = Box<dyn std::error::Error + Send + Sync>;

/// A worker program: runs on the worker's handle and returns its last line
/// (said to the manager, logged) or why it failed.
pub type AppMain = fn(&mut WorkerCtx) -> Result<String, AppFailure>;

/// What an application gets: its rank, the view, the PS client, and through
/// the handle's methods the barriers and the manager's newest view.
pub struct WorkerCtx {
    /// this worker's rank among the workers, 0-based
    pub rank: u32,
    /// the view the worker registered into (the dead ones since: [`WorkerCtx::dead_workers`])
    pub view: ClusterView,
    /// the PS client: push, pull and wait on the tables
    pub ps: PsWorker,
    link: ControlLink,
}

impl WorkerCtx {
    /// Blocks until every live worker reached barrier `name`.
    pub fn barrier(&self, name: &str) -> Result<(), ControlError> {
        self.link.barrier(name)
    }

    /// The job's workers, dead ones included.
    pub fn workers(&self) -> u32 {
        self.view.workers
    }

    /// Workers the manager found dead so far (the job goes on without them).
    pub fn dead_workers(&self) -> BTreeSet<u32> {
        self.link.board().get().dead_workers.into_iter().collect()
    }

    /// A machine-readable line for the launcher (`@kind {json}`).
    pub fn emit(&self, kind: &str, value: serde_json::Value) {
        println!("@{kind} {value}");
    }
}

/// A worker's settings (`pslab node --role worker`).
#[derive(Clone, Debug)]
pub struct WorkerOpts {
    /// the address this worker registers with
    pub host: String,
    /// the rank to ask the manager for (`None`: the lowest free)
    pub rank: Option<u32>,
    /// what tells this worker apart from others on its host (see [`Member::pid`])
    pub pid: u32,
    /// bind the calling thread to the cores away from the RDMA device's, when
    /// the machine has any (a worker process does; threads in a test need not)
    pub place: bool,
    /// what the worker does when the manager aborts the job
    pub on_abort: OnAbort,
}

/// Binds the calling thread as `plan_worker` says, and logs where it runs.
fn place_worker(rank: u32, netopts: &NetOpts) {
    use crate::placement::{bind_current, plan_worker, topology};
    match topology() {
        Ok(topo) => match plan_worker(&topo, net::device_name(netopts).as_deref()) {
            (Some(cpus), why) => match bind_current(&topo, &cpus) {
                Ok(()) => tracing::info!("worker {rank} placement: CPUs {cpus:?}: {why}"),
                Err(e) => tracing::warn!("worker {rank}: not bound to CPUs {cpus:?} ({e})"),
            },
            (None, why) => tracing::info!("worker {rank} placement: not bound: {why}"),
        },
        Err(e) => tracing::warn!("worker {rank}: no placement ({e})"),
    }
}

/// Runs a worker until its program ends and the job with it: registers with
/// the managers at `managers`, connects to every shard, runs the program
/// `apps` names for the job's app, and tells the manager how it went.
pub fn run_worker(
    secret: JobSecret,
    managers: &[SocketAddr],
    opts: WorkerOpts,
    netopts: &NetOpts,
    apps: &dyn Fn(&str) -> Option<AppMain>,
) -> Result<String, NodeError> {
    let member = Member {
        role: Role::Worker,
        host: opts.host,
        ports: vec![],
        rank: opts.rank,
        pid: opts.pid,
        on_abort: opts.on_abort,
    };
    let (rank, view, link) = ControlLink::register(secret.clone(), managers, member, Default::default())?;
    if opts.place {
        place_worker(rank, netopts);
    }
    let board = (view.copies() > 1).then(|| link.board().clone());
    let mut ps = connect_client(secret, &view, board.as_deref(), rank, netopts)?;
    ps.core_mut().set_rank(rank);
    if view.copies() > 1 {
        enable_failover(&mut ps, rank, link.board().clone(), netopts)?;
    }
    let app = view.job.app.clone();
    let mut ctx = WorkerCtx { rank, view, ps, link };
    let result = match apps(&app) {
        Some(main) => main(&mut ctx),
        None => Err(NodeError::UnknownApp(app).into()),
    };
    if let Some(line) = net::stats_line(ctx.ps.transport_mut()) {
        tracing::info!("worker {rank} {line}");
    }
    let WorkerCtx { link, .. } = ctx;
    match result {
        Ok(msg) => {
            link.done(true, &msg)?;
            Ok(msg)
        }
        Err(e) => {
            let _ = link.done(false, &e.to_string());
            Err(NodeError::App(e))
        }
    }
}

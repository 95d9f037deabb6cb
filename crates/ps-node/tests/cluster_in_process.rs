//! A whole cluster in one test process: a manager, a server with two shards
//! and two workers, each on threads of its own, talking over loopback TCP
//! through the runtime's public API (what `pslab node` runs as processes).
//! The process tests in the root's `tests/` (kill -9, launchers) stay there.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use ps_core::auth::JobSecret;
use ps_core::control::JobSpec;
use ps_core::keys::{KeyRange, TableId};
use ps_core::rules::RuleSpec;
use ps_core::table::TableSpec;
use ps_node::control::OnAbort;
use ps_node::{AppMain, Manager, NetOpts, NodeError, ServerOpts, TransportMode, WorkerCtx, WorkerOpts};

const WORKERS: u32 = 2;
const SPARSE: TableId = TableId(0);
const DENSE: TableId = TableId(1);
const DENSE_KEYS: u64 = 10_000;
const SPARSE_KEYS: u64 = 3_000;
/// How long the whole job may take before the test calls it hung.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

fn job(app: &str) -> JobSpec {
    let tables = vec![
        TableSpec::sparse(SPARSE.0, "sparse-sum", KeyRange::FULL, 1, RuleSpec::Sum),
        TableSpec::dense(DENSE.0, "dense-sum", KeyRange::new(0, DENSE_KEYS), 4, RuleSpec::Sum),
    ];
    JobSpec {
        tables,
        app: app.into(),
        params: serde_json::json!({}),
        limits: Default::default(),
        partitions: ps_core::limits::RING_PARTITIONS,
        copies: 1,
    }
}

/// Sorted keys spread over the whole key space (so over both shards).
fn sparse_keys() -> Vec<u64> {
    let mut keys: Vec<u64> = (1..=SPARSE_KEYS).map(|k| ps_core::rng::mix64(k) % (u64::MAX - 1)).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Every worker pushes `rank + 1` to every key of both tables, waits for the
/// others, pulls, and checks each value is the sum of every worker's push.
fn sum_app(ctx: &mut WorkerCtx) -> Result<String, String> {
    let mine = ctx.rank as f32 + 1.0;
    let keys = sparse_keys();
    let ps = |e: ps_core::error::PsError| e.to_string();
    let ts = ctx.ps.push(SPARSE, &keys, &vec![mine; keys.len()]).map_err(ps)?;
    ctx.ps.wait(ts).map_err(ps)?;
    let ts = ctx.ps.push_range(DENSE, 0, &vec![mine; DENSE_KEYS as usize * 4]).map_err(ps)?;
    ctx.ps.wait(ts).map_err(ps)?;
    ctx.barrier("pushed")?;
    let ts = ctx.ps.pull(SPARSE, &keys, Vec::new()).map_err(ps)?;
    let sparse = ctx.ps.wait_pull(ts).map_err(ps)?;
    let ts = ctx.ps.pull_range(DENSE, 0, DENSE_KEYS, Vec::new()).map_err(ps)?;
    let dense = ctx.ps.wait_pull(ts).map_err(ps)?;
    let want = (1..=ctx.workers()).sum::<u32>() as f32;
    let (n_sparse, n_dense) = (sparse.len(), dense.len());
    if n_sparse != keys.len() || n_dense != DENSE_KEYS as usize * 4 {
        return Err(format!("pulled {n_sparse} sparse and {n_dense} dense values"));
    }
    if let Some((i, v)) = sparse.iter().chain(&dense).enumerate().find(|(_, &v)| v != want) {
        return Err(format!("value #{i} is {v}, not the sum of every push ({want})"));
    }
    ctx.barrier("checked")?;
    Ok(format!("{} values, each the sum {want}", n_sparse + n_dense))
}

fn apps(name: &str) -> Option<AppMain> {
    // the app speaks String errors; the runtime takes any error type, boxed
    (name == "sum").then_some((|ctx: &mut WorkerCtx| sum_app(ctx).map_err(Into::into)) as AppMain)
}

/// How each node of a job ended.
struct Outcomes {
    manager: Result<String, NodeError>,
    server: Result<String, NodeError>,
    workers: Vec<Result<String, NodeError>>,
}

/// Starts a manager, a server and `WORKERS` workers on threads for `app`;
/// returns how each ended.
fn run_cluster(app: &str) -> Outcomes {
    let secret = JobSecret::from_bytes([7; ps_core::auth::SECRET_BYTES]);
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let manager = Manager::bind(secret.clone(), listen, Vec::new(), job(app), 1, WORKERS).unwrap();
    let managers = vec![manager.local_addr()];
    let net = NetOpts { transport: TransportMode::Tcp, ..Default::default() };
    let (tx, rx) = mpsc::channel::<(String, Result<String, NodeError>)>();
    let mut threads = Vec::new();
    let done = tx.clone();
    threads.push(std::thread::spawn(move || done.send(("manager".into(), manager.run())).unwrap()));
    // nodes share this process: an aborted job returns, it does not exit
    let on_abort = OnAbort::Notify;
    let opts = ServerOpts {
        host: "127.0.0.1".into(),
        shards: 2,
        port_base: 0,
        cpus: vec![],
        pin: false,
        rank: None,
        pid: 1,
        on_abort,
    };
    let (done, s, m, n) = (tx.clone(), secret.clone(), managers.clone(), net.clone());
    threads
        .push(std::thread::spawn(move || done.send(("server".into(), ps_node::run_server(s, &m, opts, &n))).unwrap()));
    for w in 0..WORKERS {
        // one process holds every node here: each needs an id of its own
        let opts = WorkerOpts { host: "127.0.0.1".into(), rank: Some(w), pid: 100 + w, place: false, on_abort };
        let (done, s, m, n) = (tx.clone(), secret.clone(), managers.clone(), net.clone());
        threads.push(std::thread::spawn(move || {
            done.send((format!("worker{w}"), ps_node::run_worker(s, &m, opts, &n, &apps))).unwrap()
        }));
    }
    drop(tx);
    let (mut manager, mut server, mut workers) = (None, None, Vec::new());
    for _ in 0..threads.len() {
        let (name, r) = rx.recv_timeout(JOB_TIMEOUT).expect("the in-process job hung");
        match name.as_str() {
            "manager" => manager = Some(r),
            "server" => server = Some(r),
            _ => workers.push(r),
        }
    }
    for t in threads {
        t.join().expect("a node thread panicked");
    }
    Outcomes { manager: manager.expect("the manager ended"), server: server.expect("the server ended"), workers }
}

#[test]
fn a_whole_cluster_on_threads_pulls_the_sum_of_every_push() {
    let o = run_cluster("sum");
    assert_eq!(o.workers.len(), WORKERS as usize);
    for w in &o.workers {
        let msg = w.as_ref().expect("every worker's check holds");
        assert!(msg.ends_with("each the sum 3"), "{msg}");
    }
    assert!(o.server.is_ok(), "the server: {:?}", o.server);
    assert!(o.manager.is_ok(), "the manager's verdict: {:?}", o.manager);
}

#[test]
fn a_job_whose_app_no_one_knows_fails_on_every_worker() {
    let o = run_cluster("no-such-app");
    for w in &o.workers {
        let err = w.as_ref().expect_err("a worker ran an app it does not know").to_string();
        assert!(err.contains("unknown app \"no-such-app\""), "{err}");
    }
    let err = o.server.expect_err("the server outlived an aborted job").to_string();
    assert!(err.contains("job aborted"), "{err}");
    let err = o.manager.expect_err("the manager's verdict").to_string();
    assert!(err.contains("unknown app"), "{err}");
}

//! `pslab local`: a whole cluster on this machine, as separate OS processes on
//! 127.0.0.1: one manager, S servers, W workers. It makes the job secret, starts
//! the manager, learns its port from its first line, starts the rest, streams
//! every process's output with a role prefix, and stops everything on Ctrl-C or
//! the first process that fails. Lines starting with `@` are events for the
//! caller (progress, per-epoch loss, results, bench numbers).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};

pub struct ClusterSpec {
    pub servers: u32,
    pub shards: u32,
    pub workers: u32,
    pub app: String,
    pub params: serde_json::Value,
    pub pin: bool,
    /// copies of every shard (chain replication; 1: none)
    pub copies: u32,
    /// processes to kill with SIGKILL while the job runs (fault injection)
    pub kills: Vec<Kill>,
    /// manager replicas (a Raft group; 1: a lone manager)
    pub managers: u32,
}

/// `--kill NAME@MS`: SIGKILL the process `NAME` (`server1`, `worker2`,
/// `manager`, `manager1` of replicas, or `leader`: the replica leading then)
/// `MS` milliseconds after the job started running. `NAME@connected+MS`:
/// after every worker connected to every shard (so a kill lands mid-job, not
/// while workers set up, however slow the machine). `NAME@whole+MS`: after
/// every copy the manager placed to replace a lost one joined its chain (so
/// a second death does not race the rebuild of the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kill {
    pub name: String,
    pub after_ms: u64,
    /// the moment `after_ms` counts from
    pub from: KillFrom,
}

/// What a kill's delay counts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillFrom {
    /// the job running (the manager's word)
    Start,
    /// every worker connected to its shards
    Connected,
    /// every lost copy rebuilt and in its chain again
    Whole,
}

impl std::str::FromStr for Kill {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, when) = s.split_once('@').ok_or_else(|| {
            format!("--kill {s:?}: write NAME@MS, NAME@connected+MS or NAME@whole+MS, e.g. server1@1500")
        })?;
        let (from, ms) = if let Some(ms) = when.strip_prefix("whole+") {
            (KillFrom::Whole, ms)
        } else if let Some(ms) = when.strip_prefix("connected+") {
            (KillFrom::Connected, ms)
        } else {
            (KillFrom::Start, when)
        };
        let after_ms = ms.parse().map_err(|_| format!("--kill {s:?}: {ms:?} is not a number of milliseconds"))?;
        let ok = name == "manager"
            || name == "leader"
            || ["server", "worker", "manager"]
                .iter()
                .any(|r| name.strip_prefix(r).is_some_and(|n| n.parse::<u32>().is_ok()));
        if !ok {
            return Err(format!("--kill {s:?}: name a process as manager, managerN, leader, serverN or workerN"));
        }
        Ok(Kill { name: name.to_string(), after_ms, from })
    }
}

/// When the moments kills count from came, read off the processes' lines:
/// every worker connected (each says `client N: transport: ...`), and the
/// chains whole again (every copy the manager placed to replace a lost one
/// has joined its chain).
#[derive(Default)]
struct Milestones {
    workers: u32,
    connected: std::collections::BTreeSet<String>,
    connected_since: Option<Instant>,
    placed: usize,
    joined: usize,
    whole_since: Option<Instant>,
}

impl Milestones {
    fn new(workers: u32) -> Self {
        Milestones { workers, ..Default::default() }
    }

    fn see(&mut self, role: &str, line: &str) {
        if role.starts_with("worker") && line.contains("client ") && line.contains(": transport: ") {
            self.connected.insert(role.to_string());
            if self.connected_since.is_none() && self.connected.len() >= self.workers as usize {
                self.connected_since = Some(Instant::now());
            }
        }
        if !role.starts_with("manager") {
            return;
        }
        if line.contains("a new copy is rebuilt on") {
            self.placed += 1;
            self.whole_since = None;
        } else if line.contains("joined its chain:") {
            self.joined += 1;
            if self.joined >= self.placed {
                self.whole_since = Some(Instant::now());
            }
        }
    }

    /// The moment `from` names, if it has come (`start`: the job running).
    fn since(&self, from: KillFrom, start: Instant) -> Option<Instant> {
        match from {
            KillFrom::Start => Some(start),
            KillFrom::Connected => self.connected_since,
            KillFrom::Whole => self.whole_since,
        }
    }
}

/// What the processes said.
#[derive(Debug)]
pub enum Event {
    /// a plain log line
    Line { role: String, line: String },
    /// an `@kind {json}` line
    At { role: String, kind: String, value: serde_json::Value },
}

/// (role, text) of one line a process printed.
type Line = (String, String);

struct Proc {
    role: String,
    child: Child,
    status: Option<std::process::ExitStatus>,
}

fn spawn(role: &str, args: &[String], secret: &str, tx: &Sender<(String, String)>) -> Result<Proc, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let mut child = Command::new(exe)
        .args(args)
        .env("PS_JOB_SECRET", secret)
        .env("PS_PARENT_WATCH", "1")
        .env("PS_ROLE_LABEL", role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {role}: {e}"))?;
    let _ = tx.send(("launcher".into(), format!("started {role} (pid {})", child.id())));
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        let role = role.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send((role.clone(), line)).is_err() {
                    return;
                }
            }
        });
    }
    Ok(Proc { role: role.to_string(), child, status: None })
}

fn parse(role: String, line: String) -> Event {
    if let Some(rest) = line.strip_prefix('@') {
        let (kind, json) = rest.split_once(' ').unwrap_or((rest, ""));
        if let Ok(value) = serde_json::from_str(json) {
            return Event::At { role, kind: kind.to_string(), value };
        }
        if kind == "listening" {
            return Event::At { role, kind: kind.into(), value: serde_json::Value::String(json.to_string()) };
        }
    }
    Event::Line { role, line }
}

fn kill_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if p.status.is_none() {
            let _ = p.child.kill();
            p.status = p.child.wait().ok();
        }
    }
}

/// Runs the cluster to the end; `on_event` sees every line. `Ok` iff every process exited 0.
pub fn run(spec: &ClusterSpec, on_event: &mut dyn FnMut(Event)) -> Result<(), String> {
    for k in &spec.kills {
        let n = |p: &str| k.name.strip_prefix(p).and_then(|n| n.parse::<u32>().ok());
        let exists = (k.name == "manager" && spec.managers == 1)
            || (k.name == "leader" && spec.managers > 1)
            || n("manager").is_some_and(|i| i < spec.managers && spec.managers > 1)
            || n("server").is_some_and(|i| i < spec.servers)
            || n("worker").is_some_and(|i| i < spec.workers);
        if !exists {
            return Err(format!("--kill {}: this job has no such process", k.name));
        }
    }
    let secret = ps_tcp_fallback::generate_secret().map_err(|e| e.to_string())?.to_hex();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // a second Ctrl-C while we stop is the default: kill us
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let (tx, rx): (Sender<Line>, Receiver<Line>) = unbounded();
    let params = spec.params.to_string();
    let manager_args = |listen: &str, replicas: &str| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "node".into(),
            "--role".into(),
            "manager".into(),
            "--listen".into(),
            listen.into(),
            "--servers".into(),
            spec.servers.to_string(),
            "--workers".into(),
            spec.workers.to_string(),
            "--app".into(),
            spec.app.clone(),
            "--params".into(),
            params.clone(),
            "--copies".into(),
            spec.copies.to_string(),
        ];
        if !replicas.is_empty() {
            a.extend(["--replicas".into(), replicas.into()]);
        }
        a
    };
    let mut procs = Vec::new();
    let manager = if spec.managers > 1 {
        // replicas must know each other's addresses before they start: free
        // ports, found by binding and letting go (loopback, this launcher only)
        let mut addrs = Vec::new();
        for _ in 0..spec.managers {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
            addrs.push(l.local_addr().map_err(|e| e.to_string())?.to_string());
        }
        let all = addrs.join(",");
        for (i, a) in addrs.iter().enumerate() {
            procs.push(spawn(&format!("manager{i}"), &manager_args(a, &all), &secret, &tx)?);
        }
        all
    } else {
        procs.push(spawn("manager", &manager_args("127.0.0.1:0", ""), &secret, &tx)?);
        // the manager's first line tells its port
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let Ok((role, line)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
                kill_all(&mut procs);
                return Err("the manager did not start listening within 30 s".into());
            };
            match parse(role, line) {
                Event::At { kind, value: serde_json::Value::String(addr), .. } if kind == "listening" => break addr,
                e => on_event(e),
            }
            if let Ok(Some(s)) = procs[0].child.try_wait() {
                // keep reading what it said
                while let Ok((role, line)) = rx.recv_timeout(Duration::from_millis(200)) {
                    on_event(parse(role, line));
                }
                return Err(format!("the manager exited before listening ({s})"));
            }
        }
    };
    for s in 0..spec.servers {
        let mut args: Vec<String> = vec![
            "node".into(),
            "--role".into(),
            "server".into(),
            "--manager".into(),
            manager.clone(),
            "--shards".into(),
            spec.shards.to_string(),
            "--rank".into(),
            s.to_string(),
        ];
        if !spec.pin {
            args.push("--no-pin".into());
        }
        procs.push(spawn(&format!("server{s}"), &args, &secret, &tx)?);
    }
    for w in 0..spec.workers {
        let args: Vec<String> = vec![
            "node".into(),
            "--role".into(),
            "worker".into(),
            "--manager".into(),
            manager.clone(),
            "--rank".into(),
            w.to_string(),
        ];
        procs.push(spawn(&format!("worker{w}"), &args, &secret, &tx)?);
    }
    drop(tx);
    // the manager decides whether the job can go on without a process that
    // died (a failover, a worker left behind); the launcher follows it: the
    // job ends when the manager does, and fails if the manager failed or a
    // process it did not kill itself ended badly
    let mut failure: Option<String> = None;
    let mut running_since: Option<Instant> = None;
    let mut kills = spec.kills.clone();
    let mut killed: Vec<String> = Vec::new();
    let mut manager_done: Option<Instant> = None;
    let mut leader: Option<String> = None;
    let mut manager_killed_at: Option<Instant> = None;
    let mut milestones = Milestones::new(spec.workers);
    loop {
        // lines until there are none for a moment, or 50 ms passed (kills are due on time)
        let until = Instant::now() + Duration::from_millis(50);
        while let Ok((role, line)) = rx.recv_timeout(Duration::from_millis(20)) {
            if running_since.is_none() && role.starts_with("manager") && line.contains("job running") {
                running_since = Some(Instant::now());
            }
            if role.starts_with("manager") && line.contains(" leads (term ") {
                leader = Some(role.clone());
                if let Some(t) = manager_killed_at.take() {
                    on_event(Event::At {
                        role: "launcher".into(),
                        kind: "leader".into(),
                        value: serde_json::json!({"name": role, "since_kill_ms": t.elapsed().as_secs_f64() * 1e3}),
                    });
                }
            }
            milestones.see(&role, &line);
            on_event(parse(role, line));
            if Instant::now() > until {
                break;
            }
        }
        if interrupted.load(Ordering::SeqCst) {
            kill_all(&mut procs);
            failure.get_or_insert("interrupted (Ctrl-C): stopped every process".into());
            break;
        }
        if let Some(t0) = running_since {
            let due_at = |k: &Kill| {
                milestones.since(k.from, t0).is_some_and(|t| t.elapsed() >= Duration::from_millis(k.after_ms))
            };
            let due: Vec<Kill> = kills.iter().filter(|k| due_at(k)).cloned().collect();
            kills.retain(|k| !due.contains(k));
            for k in due {
                let name = if k.name == "leader" { leader.clone().unwrap_or_default() } else { k.name.clone() };
                if let Some(p) = procs.iter_mut().find(|p| p.role == name && p.status.is_none()) {
                    let pid = p.child.id();
                    let _ = p.child.kill();
                    if name.starts_with("manager") {
                        manager_killed_at = Some(Instant::now());
                    }
                    killed.push(name.clone());
                    on_event(Event::At {
                        role: "launcher".into(),
                        kind: "killed".into(),
                        value: serde_json::json!({"name": name, "pid": pid, "at_s": t0.elapsed().as_secs_f64()}),
                    });
                }
            }
        }
        for p in procs.iter_mut() {
            if p.status.is_none() {
                if let Ok(Some(st)) = p.child.try_wait() {
                    p.status = Some(st);
                    let ours = killed.contains(&p.role);
                    if p.role.starts_with("manager") && !ours {
                        manager_done = Some(Instant::now());
                        if !st.success() {
                            failure.get_or_insert(format!("{} exited with {st}", p.role));
                        }
                    } else if !st.success() && !ours {
                        on_event(Event::Line {
                            role: "launcher".into(),
                            line: format!("{} exited with {st}; the manager decides whether the job goes on", p.role),
                        });
                        failure.get_or_insert(format!("{} exited with {st}", p.role));
                    }
                }
            }
        }
        if procs.iter().all(|p| p.status.is_some()) {
            break;
        }
        // the manager is gone: the others follow it within moments, or are stopped
        if manager_done.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            kill_all(&mut procs);
            break;
        }
    }
    while let Ok((role, line)) = rx.recv_timeout(Duration::from_millis(100)) {
        on_event(parse(role, line));
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{Kill, KillFrom, Milestones};
    use std::time::Instant;

    #[test]
    fn a_kill_is_timed_from_the_start_from_connected_workers_or_whole_chains() {
        let k: Kill = "server2@7000".parse().unwrap();
        assert_eq!((k.name.as_str(), k.after_ms, k.from), ("server2", 7000, KillFrom::Start));
        let k: Kill = "server2@whole+500".parse().unwrap();
        assert_eq!((k.name.as_str(), k.after_ms, k.from), ("server2", 500, KillFrom::Whole));
        let k: Kill = "server1@connected+300".parse().unwrap();
        assert_eq!((k.name.as_str(), k.after_ms, k.from), ("server1", 300, KillFrom::Connected));
        assert!("server2@whole".parse::<Kill>().is_err());
        assert!("server2@whole+x".parse::<Kill>().is_err());
        assert!("disk0@whole+5".parse::<Kill>().is_err());
    }

    #[test]
    fn workers_are_connected_once_each_said_so() {
        let mut m = Milestones::new(2);
        let t0 = Instant::now();
        assert_eq!(m.since(KillFrom::Start, t0), Some(t0));
        m.see("worker0", " INFO client 0: transport: 2 shards over rdma");
        m.see("worker0", " INFO client 9999: transport: 2 shards over rdma");
        assert!(m.since(KillFrom::Connected, t0).is_none(), "one worker's two clients are one worker");
        m.see("server1", " INFO client 1: transport: 2 shards over rdma");
        assert!(m.since(KillFrom::Connected, t0).is_none(), "only workers count");
        m.see("worker1", " INFO client 1: transport: 2 shards over tcp");
        assert!(m.since(KillFrom::Connected, t0).is_some());
    }

    #[test]
    fn chains_are_whole_once_every_placed_copy_joined() {
        let mut r = Milestones::new(3);
        assert!(r.whole_since.is_none(), "nothing rebuilt yet is not whole again");
        r.see("manager", "shard (0, 0): a new copy is rebuilt on server 2");
        r.see("manager", "shard (1, 0): a new copy is rebuilt on server 0");
        r.see("server0", "server 2's rebuilt copy of shard (0, 0) joined its chain: 2 copies again");
        assert!(r.whole_since.is_none(), "only the manager's lines count");
        r.see("manager", "server 2's rebuilt copy of shard (0, 0) joined its chain: 2 copies again");
        assert!(r.whole_since.is_none(), "one of two joined");
        r.see("manager", "server 0's rebuilt copy of shard (1, 0) joined its chain: 2 copies again");
        assert!(r.whole_since.is_some());
        r.see("manager", "shard (2, 0): a new copy is rebuilt on server 0");
        assert!(r.whole_since.is_none(), "a new loss makes them short again");
    }
}

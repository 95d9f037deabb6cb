//! Hostile peers against a live job.
//!
//! Starts a real job (manager, one server with two shards, two `check` workers;
//! every process is the `pslab` binary) and, while the workers push, attacks the
//! server's shard ports from this process over 127.0.0.1:
//!
//! 1. random bytes without a handshake;
//! 2. a length prefix far beyond the bound, before and after a valid handshake;
//! 3. a Hello whose MAC comes from a wrong secret;
//! 4. a connection that never says anything;
//! 5. after a valid handshake: wire version 2, an unknown kind, a data frame whose
//!    counts claim more bytes than it carries, a body length that is not a
//!    multiple of 8;
//! 6. after a valid handshake: well-formed but wrong requests (unknown table,
//!    unsorted keys), which must get Error frames while the connection goes on
//!    serving a valid pull;
//! 7. a flood of 200 connections that stall inside the prefix, plus a few that
//!    send a maximal (248-byte) handshake body of garbage.
//!
//! It proves that every bad connection is refused or dropped (closed by the
//! server, each within its bound), that the good workers keep being served
//! during the attacks (their progress advances and the job ends with invariant 1
//! holding in both workers, every process exiting 0), and that the server's
//! memory stays bounded (VmRSS growth across the attacks below
//! `RSS_GROWTH_MAX_KIB`, the server still alive afterwards).

use std::fs::File;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ps_core::auth::JobSecret;
use ps_core::control::Role;
use ps_core::limits::{FRAME_BYTES_MAX, HANDSHAKE_TIMEOUT_MS};
use ps_core::rng::SplitMix64;
use ps_core::wire::{decode, encode_hello, DataHeader, Frame, Kind, HANDSHAKE_BODY_MAX};

/// The check app's parameters: many small rounds, so the workers are still
/// pushing when the attacks end (about 11 s of pushes on 2 cores unattacked, then
/// ~2 s of verification; the attacks take ~7 s).
const ROUNDS: u64 = 32_000;
const KEYS_PER_PUSH: u64 = 40;
/// Pushes a worker reports in total (`rounds` x 5 tables).
const PUSHES_PER_WORKER: u64 = ROUNDS * 5;
/// Growth of the server's resident memory the attacks may cause.
const RSS_GROWTH_MAX_KIB: u64 = 64 * 1024;
/// Connections of the flood that stall inside the 8-byte prefix.
const FLOOD_STALLED: usize = 200;
/// Connections of the flood that send a maximal handshake body of garbage.
const FLOOD_GARBAGE: usize = 8;
/// A malformed frame on its own connection must be dropped this fast: well
/// below the handshake timeout, so the drop is the server's verdict on the frame.
const DROP_WITHIN: Duration = Duration::from_secs(3);
/// Upper bound for the whole job.
const JOB_TIMEOUT: Duration = Duration::from_secs(90);

// ------------------------------------------------------------------ processes

/// Every child process of the test; kills the ones still running when dropped
/// (also on panic).
struct Procs {
    children: Vec<(&'static str, Child)>,
}

impl Procs {
    fn child(&mut self, name: &str) -> &mut Child {
        let i = self.children.iter().position(|(n, _)| *n == name).expect("known child");
        &mut self.children[i].1
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn pslab() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pslab"));
    c.env("PS_LOG", "info").env_remove("PS_PARENT_WATCH").stdin(Stdio::null());
    c
}

fn log_file(dir: &Path, name: &str) -> File {
    File::create(dir.join(format!("{name}.log"))).expect("create log file")
}

/// Waits (bounded) for a line containing `needle` in a log file; returns it.
fn wait_for_line(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no line with {needle:?} in {} within {timeout:?}", path.display());
}

fn wait_exit(child: &mut Child, name: &str, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{name} did not exit within {timeout:?}");
}

fn is_running(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

/// The server process's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server alive");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB")
}

/// Follows a worker's stdout and keeps its latest `@progress` count.
fn follow_progress(stdout: impl Read + Send + 'static, done: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(json) = line.strip_prefix("@progress ") {
                let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
                if let Some(n) = v["done"].as_u64() {
                    done.store(n, Ordering::Relaxed);
                }
            }
        }
    });
}

/// Pushes both workers have had acknowledged so far.
fn progress(workers: &[Arc<AtomicU64>]) -> u64 {
    workers.iter().map(|w| w.load(Ordering::Relaxed)).sum()
}

// ------------------------------------------------------------------ wire helpers

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to shard");
    s.set_nodelay(true).ok();
    s.set_write_timeout(Some(Duration::from_secs(5))).ok();
    s
}

/// An 8-byte prefix with arbitrary (possibly illegal) fields.
fn prefix(body_len: u32, version: u8, kind: u8) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&body_len.to_le_bytes());
    p[4] = version;
    p[5] = kind;
    p
}

/// A data frame with header `h` and the given payload (which may disagree with
/// the header's counts: the frame's length follows the payload, not the counts).
fn data_frame(h: DataHeader, keys: &[u64], vals: &[f32]) -> Vec<u8> {
    let content = 32 + keys.len() * 8 + vals.len() * 4;
    let mut f = vec![0u8; 8 + content.div_ceil(8) * 8];
    h.write(&mut f); // the prefix's body_len is the buffer's, whatever a and b say
    let mut at = 40;
    for k in keys {
        f[at..at + 8].copy_from_slice(&k.to_le_bytes());
        at += 8;
    }
    for v in vals {
        f[at..at + 4].copy_from_slice(&v.to_le_bytes());
        at += 4;
    }
    f
}

/// A well-formed sparse request header (one value per key: the check app's table 0 has dim 1).
fn sparse(kind: Kind, table: u32, ts: u64, keys: usize) -> DataHeader {
    DataHeader { kind, dense: false, table, sub: 0, ts, a: keys as u64, b: keys as u64 }
}

/// Reads one whole frame (bounded by the post-handshake frame bound).
fn read_frame(s: &mut TcpStream, timeout: Duration) -> io::Result<Vec<u8>> {
    s.set_read_timeout(Some(timeout))?;
    let mut p = [0u8; 8];
    s.read_exact(&mut p)?;
    let body = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
    if body > FRAME_BYTES_MAX {
        return Err(io::Error::new(ErrorKind::InvalidData, format!("frame body {body} above the bound")));
    }
    let mut f = vec![0u8; 8 + body];
    f[..8].copy_from_slice(&p);
    s.read_exact(&mut f[8..])?;
    Ok(f)
}

fn random_bytes(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// Reads the server's Challenge; returns its nonce.
fn read_challenge(s: &mut TcpStream) -> [u8; 32] {
    let f = read_frame(s, Duration::from_secs(5)).expect("challenge from the server");
    match decode(&f, HANDSHAKE_BODY_MAX) {
        Ok(Frame::Challenge { nonce }) => *nonce,
        other => panic!("expected a Challenge, got {other:?}"),
    }
}

/// Connects and sends a Hello whose MAC is computed with `secret`.
fn send_hello(addr: SocketAddr, secret: &JobSecret, rng: &mut SplitMix64) -> (TcpStream, [u8; 32], [u8; 32]) {
    let mut s = connect(addr);
    let ns = read_challenge(&mut s);
    let nc: [u8; 32] = random_bytes(rng, 32).try_into().expect("32 bytes");
    let node = 1000 + rng.below(1000) as u32;
    let role = Role::Worker as u8;
    let mac = secret.client_mac(&ns, &nc, role, node);
    s.write_all(&encode_hello(role, node, &nc, &mac)).expect("send hello");
    (s, ns, nc)
}

/// A connection that passed the handshake with the job's secret (and checked the server's proof).
fn authenticated(addr: SocketAddr, secret: &JobSecret, rng: &mut SplitMix64) -> TcpStream {
    let (mut s, ns, nc) = send_hello(addr, secret, rng);
    let f = read_frame(&mut s, Duration::from_secs(5)).expect("welcome from the server");
    match decode(&f, HANDSHAKE_BODY_MAX) {
        Ok(Frame::Welcome { mac }) => assert!(secret.verify_server(&ns, &nc, mac), "server proof does not verify"),
        other => panic!("expected a Welcome, got {other:?}"),
    }
    s
}

/// Sends bytes; the server may already have dropped us, so a failed write is fine.
fn send(s: &mut TcpStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
}

/// Waits until the server closes `s` (EOF or reset), discarding what it sends.
/// Returns how long that took and how many bytes arrived meanwhile.
fn await_close(s: &mut TcpStream, within: Duration) -> Result<(Duration, usize), String> {
    let start = Instant::now();
    let mut got = 0;
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return Ok((start.elapsed(), got)),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return Ok((start.elapsed(), got)), // reset by the server
        }
    }
    Err(format!("still open after {within:?} ({got} bytes received)"))
}

/// Asserts the server drops `s` within `DROP_WITHIN`; returns a summary.
fn expect_dropped(mut s: TcpStream, what: &str) -> String {
    match await_close(&mut s, DROP_WITHIN) {
        Ok((t, _)) => format!("{what}: dropped after {} ms", t.as_millis()),
        Err(e) => panic!("{what}: not dropped: {e}"),
    }
}

/// Reads the next frame and decodes it, with its kind.
fn next_response(s: &mut TcpStream) -> (Kind, u64, String) {
    let f = read_frame(s, Duration::from_secs(5)).expect("a response frame");
    match decode(&f, FRAME_BYTES_MAX) {
        Ok(Frame::Data { h, .. }) => (h.kind, h.ts, String::new()),
        Ok(Frame::Error { h, message }) => (Kind::Error, h.ts, message.to_string()),
        other => panic!("expected a data response, got {other:?}"),
    }
}

// ------------------------------------------------------------------ the attacks

fn attack_random_bytes(addr: SocketAddr, rng: &mut SplitMix64) -> String {
    let mut s = connect(addr);
    send(&mut s, &random_bytes(rng, 4096));
    expect_dropped(s, "1 random 4 KiB, no handshake")
}

fn attack_huge_prefix(addr: SocketAddr, secret: &JobSecret, rng: &mut SplitMix64) -> Vec<String> {
    let huge = prefix(0x7FFF_FFF8, 1, Kind::Push as u8);
    let mut pre = connect(addr);
    send(&mut pre, &huge);
    let mut post = authenticated(addr, secret, rng);
    send(&mut post, &huge);
    send(&mut post, &[0u8; 64]);
    vec![
        expect_dropped(pre, "2a body_len 0x7FFFFFF8 before handshake"),
        expect_dropped(post, "2b body_len 0x7FFFFFF8 after handshake"),
    ]
}

fn attack_wrong_secret(addr: SocketAddr, secret: &JobSecret, rng: &mut SplitMix64) -> String {
    let mut hex = secret.to_hex().into_bytes();
    hex[0] = if hex[0] == b'0' { b'1' } else { b'0' };
    let wrong = JobSecret::from_hex(std::str::from_utf8(&hex).expect("hex")).expect("a secret");
    assert_ne!(&wrong, secret);
    let (mut s, _, _) = send_hello(addr, &wrong, rng);
    match await_close(&mut s, DROP_WITHIN) {
        Ok((t, 0)) => format!("3 Hello with a wrong-secret MAC: no Welcome, dropped after {} ms", t.as_millis()),
        Ok((_, n)) => panic!("3 wrong secret: the server sent {n} bytes (a Welcome?) before closing"),
        Err(e) => panic!("3 wrong secret: not dropped: {e}"),
    }
}

fn attack_silent(addr: SocketAddr) -> String {
    let mut s = connect(addr);
    let (t, got) = await_close(&mut s, Duration::from_secs(10)).unwrap_or_else(|e| panic!("4 silent peer: {e}"));
    let timeout = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    assert!(
        t + Duration::from_millis(500) >= timeout,
        "4 silent peer closed after {t:?}, before the handshake timeout"
    );
    format!("4 silent peer: closed after {} ms ({got} bytes of challenge)", t.as_millis())
}

fn attack_bad_frames(addr: SocketAddr, secret: &JobSecret, rng: &mut SplitMix64) -> Vec<String> {
    let mut out = Vec::new();
    let mut s = authenticated(addr, secret, rng);
    let mut f = data_frame(sparse(Kind::Pull, 0, 1, 1), &[7], &[]);
    f[4] = 2; // wire version 2
    send(&mut s, &f);
    out.push(expect_dropped(s, "5a version 2"));

    let mut s = authenticated(addr, secret, rng);
    send(&mut s, &prefix(8, 1, 99));
    send(&mut s, &[0u8; 8]);
    out.push(expect_dropped(s, "5b unknown kind 99"));

    // a push into the check app's table 0 claiming 1000 keys, carrying 2: nothing may be applied
    let mut s = authenticated(addr, secret, rng);
    let h = DataHeader { a: 1000, b: 1000, ..sparse(Kind::Push, 0, 1, 0) };
    send(&mut s, &data_frame(h, &[1, 2], &[1.0, 1.0]));
    out.push(expect_dropped(s, "5c counts claim 1000 keys, 2 sent"));

    let mut s = authenticated(addr, secret, rng);
    send(&mut s, &prefix(12, 1, Kind::Pull as u8));
    send(&mut s, &[0u8; 16]);
    out.push(expect_dropped(s, "5d body_len 12 (not a multiple of 8)"));
    out
}

fn attack_wrong_requests(addr: SocketAddr, secret: &JobSecret, rng: &mut SplitMix64) -> String {
    let mut s = authenticated(addr, secret, rng);
    let mut errors = Vec::new();
    let wrong = [
        ("pull of unknown table 999", data_frame(sparse(Kind::Pull, 999, 11, 1), &[5], &[])),
        ("push to unknown table 999", data_frame(sparse(Kind::Push, 999, 12, 1), &[5], &[1.0])),
        ("push of unsorted keys", data_frame(sparse(Kind::Push, 0, 13, 2), &[9, 3], &[1.0, 1.0])),
    ];
    for (what, frame) in &wrong {
        s.write_all(frame).unwrap_or_else(|e| panic!("6 {what}: connection gone: {e}"));
        let (kind, ts, msg) = next_response(&mut s);
        assert_eq!(kind, Kind::Error, "6 {what}: expected an Error frame");
        assert_eq!(
            ts,
            u64::from_le_bytes(frame[16..24].try_into().expect("8")),
            "6 {what}: error answers another request"
        );
        errors.push(msg);
    }
    // the same connection still serves: pull one key of table 0 (random keys until one
    // is owned by this shard; a key it does not own gets an Error, also well-formed)
    let mut refused = 0;
    for i in 0..64u64 {
        let key = rng.next_u64() % (u64::MAX - 1);
        s.write_all(&data_frame(sparse(Kind::Pull, 0, 100 + i, 1), &[key], &[]))
            .unwrap_or_else(|e| panic!("6 valid pull: connection gone: {e}"));
        match next_response(&mut s) {
            (Kind::PullResp, ts, _) => {
                assert_eq!(ts, 100 + i);
                return format!(
                    "6 wrong requests: {} Error frames ({:?}), then a valid pull got a PullResp ({refused} unowned keys first)",
                    errors.len(),
                    errors.first().map(String::as_str).unwrap_or("")
                );
            }
            (Kind::Error, _, _) => refused += 1,
            (k, _, _) => panic!("6 valid pull: unexpected {k:?}"),
        }
    }
    panic!("6: no key of 64 gave a PullResp");
}

/// Summary of the flood, and the server's highest RSS while flood connections were open.
struct FloodReport {
    summary: String,
    rss_peak_kib: u64,
}

fn attack_flood(addrs: &[SocketAddr], server_pid: u32, rng: &mut SplitMix64) -> FloodReport {
    let mut conns = Vec::new();
    for i in 0..FLOOD_STALLED {
        let mut s = connect(addrs[i % addrs.len()]);
        send(&mut s, &prefix(80, 1, Kind::Hello as u8)[..3]);
        conns.push((false, s));
    }
    for i in 0..FLOOD_GARBAGE {
        let mut s = connect(addrs[i % addrs.len()]);
        let mut f = prefix(HANDSHAKE_BODY_MAX as u32, 1, Kind::Hello as u8).to_vec();
        f.extend(random_bytes(rng, HANDSHAKE_BODY_MAX));
        send(&mut s, &f);
        conns.push((true, s));
    }
    let start = Instant::now();
    let mut rss_peak_kib = rss_kib(server_pid);
    for (_, s) in &conns {
        s.set_nonblocking(true).expect("nonblocking");
    }
    let mut closed_at: Vec<Option<Duration>> = vec![None; conns.len()];
    let mut buf = [0u8; 512];
    while closed_at.iter().any(Option::is_none) && start.elapsed() < Duration::from_secs(15) {
        for (i, (_, s)) in conns.iter_mut().enumerate() {
            if closed_at[i].is_some() {
                continue;
            }
            match s.read(&mut buf) {
                Ok(0) => closed_at[i] = Some(start.elapsed()),
                Ok(_) => {} // the challenge
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => closed_at[i] = Some(start.elapsed()),
            }
        }
        rss_peak_kib = rss_peak_kib.max(rss_kib(server_pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let open = closed_at.iter().filter(|c| c.is_none()).count();
    assert_eq!(open, 0, "7 flood: {open} of {} connections still open after 15 s", conns.len());
    let latest = |garbage: bool| {
        conns.iter().zip(&closed_at).filter(|((g, _), _)| *g == garbage).filter_map(|(_, t)| *t).max().expect("some")
    };
    let (stalled, garbage) = (latest(false), latest(true));
    // the garbage bodies are judged on arrival, not by the handshake timeout
    assert!(garbage < Duration::from_secs(4), "7 flood: garbage handshakes took {garbage:?} to be dropped");
    FloodReport {
        summary: format!(
            "7 flood: {FLOOD_STALLED} stalled prefixes all closed by {} ms, {FLOOD_GARBAGE} garbage 248-byte handshakes by {} ms",
            stalled.as_millis(),
            garbage.as_millis()
        ),
        rss_peak_kib,
    }
}

// ------------------------------------------------------------------ the test

#[test]
fn hostile_peers_are_dropped_while_good_workers_are_served() {
    let t0 = Instant::now();
    let dir: PathBuf = std::env::temp_dir().join(format!("pslab-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let out = pslab().arg("secret").output().expect("pslab secret");
    let hex = String::from_utf8(out.stdout).expect("utf-8");
    let secret = JobSecret::from_hex(hex.trim()).expect("pslab secret prints a secret");
    let mut procs = Procs { children: Vec::new() };

    // the job
    let params = format!(r#"{{"rounds": {ROUNDS}, "keys": {KEYS_PER_PUSH}}}"#);
    let mut manager = pslab()
        .args(["node", "--role", "manager", "--listen", "127.0.0.1:0", "--servers", "1", "--workers", "2"])
        .args(["--app", "check", "--params", &params])
        .env("PS_JOB_SECRET", secret.to_hex())
        .stdout(Stdio::piped())
        .stderr(log_file(&dir, "manager"))
        .spawn()
        .expect("start manager");
    let mut lines = BufReader::new(manager.stdout.take().expect("stdout")).lines();
    procs.children.push(("manager", manager));
    let first = lines.next().expect("a line from the manager").expect("utf-8");
    let manager_addr = first.strip_prefix("@listening ").expect("@listening ADDR first").trim().to_string();
    std::thread::spawn(move || lines.for_each(drop));

    let server = pslab()
        .args(["node", "--role", "server", "--manager", &manager_addr, "--shards", "2", "--no-pin"])
        .env("PS_JOB_SECRET", secret.to_hex())
        .stdout(Stdio::null())
        .stderr(log_file(&dir, "server"))
        .spawn()
        .expect("start server");
    let server_pid = server.id();
    procs.children.push(("server", server));
    let mut workers = Vec::new();
    for (w, name) in ["worker0", "worker1"].into_iter().enumerate() {
        let mut c = pslab()
            .args(["node", "--role", "worker", "--manager", &manager_addr])
            .env("PS_JOB_SECRET", secret.to_hex())
            .stdout(Stdio::piped())
            .stderr(log_file(&dir, name))
            .spawn()
            .expect("start worker");
        workers.push(Arc::new(AtomicU64::new(0)));
        follow_progress(c.stdout.take().expect("stdout"), workers[w].clone());
        procs.children.push((name, c));
    }

    let line = wait_for_line(&dir.join("server.log"), "2 shards on ports [", Duration::from_secs(30));
    let ports = line.split("ports [").nth(1).and_then(|r| r.split(']').next()).expect("port list");
    let addrs: Vec<SocketAddr> = ports
        .split(',')
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p.trim().parse::<u16>().expect("a port"))))
        .collect();
    assert_eq!(addrs.len(), 2, "{line}");

    // warm up: the check app's sparse keys are all in the stores after a few rounds,
    // so the legitimate workload's own growth is not counted against the attacks
    let warm = Instant::now();
    while progress(&workers) < PUSHES_PER_WORKER / 10 && warm.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss_before = rss_kib(server_pid);
    let progress_before = progress(&workers);
    assert!(progress_before < 2 * PUSHES_PER_WORKER, "the workers finished pushing before the attacks");
    eprintln!("job started ({:.1} s), shard ports {ports}; server RSS {rss_before} KiB", t0.elapsed().as_secs_f64());

    // the slow attacks (timeouts) run beside the quick ones
    let attack_start = Instant::now();
    let mut summary = Vec::new();
    let flood = std::thread::scope(|scope| {
        let silent = scope.spawn(|| attack_silent(addrs[1]));
        let flood = scope.spawn(|| attack_flood(&addrs, server_pid, &mut SplitMix64::new(7)));
        let mut rng = SplitMix64::new(42);
        for (i, &addr) in addrs.iter().enumerate() {
            let mut shard = vec![attack_random_bytes(addr, &mut rng)];
            shard.extend(attack_huge_prefix(addr, &secret, &mut rng));
            shard.push(attack_wrong_secret(addr, &secret, &mut rng));
            shard.extend(attack_bad_frames(addr, &secret, &mut rng));
            shard.push(attack_wrong_requests(addr, &secret, &mut rng));
            summary.extend(shard.into_iter().map(|s| format!("[shard {i}] {s}")));
        }
        summary.push(silent.join().expect("silent attack"));
        flood.join().expect("flood attack")
    });
    summary.push(flood.summary);
    let attack_secs = attack_start.elapsed().as_secs_f64();

    // after the attacks: the server is alive, bounded, and serves a new good connection
    for name in ["server", "worker0", "worker1"] {
        assert!(is_running(procs.child(name)), "{name} exited during the attacks");
    }
    let progress_after = progress(&workers);
    assert!(progress_after > progress_before, "the workers made no progress during the attacks");
    assert!(
        progress_after < 2 * PUSHES_PER_WORKER,
        "the workers finished pushing during the attacks: make ROUNDS larger"
    );
    let mut probe = SplitMix64::new(99);
    for &addr in &addrs {
        drop(authenticated(addr, &secret, &mut probe));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = rss_kib(server_pid);
    for s in &summary {
        eprintln!("  {s}");
    }
    eprintln!(
        "attacks took {attack_secs:.1} s; worker pushes acknowledged {progress_before} -> {progress_after} of {}",
        2 * PUSHES_PER_WORKER
    );
    eprintln!(
        "server VmRSS: {rss_before} KiB before, {} KiB peak during the flood, {rss_after} KiB after (bound: +{RSS_GROWTH_MAX_KIB} KiB)",
        flood.rss_peak_kib
    );
    for (what, rss) in [("during the flood", flood.rss_peak_kib), ("after the attacks", rss_after)] {
        assert!(
            rss.saturating_sub(rss_before) < RSS_GROWTH_MAX_KIB,
            "server RSS grew by {} KiB {what} (bound {RSS_GROWTH_MAX_KIB} KiB)",
            rss.saturating_sub(rss_before)
        );
    }

    // the job completes: every process exits 0, invariant 1 holds
    for name in ["worker0", "worker1", "server", "manager"] {
        let st = wait_exit(procs.child(name), name, JOB_TIMEOUT);
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        assert!(st.success(), "{name} exited with {st}; its log:\n{log}");
    }
    for name in ["worker0", "worker1", "manager"] {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        assert!(log.contains("invariant 1 holds"), "{name}'s log does not say invariant 1 holds:\n{log}");
    }
    let server_log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let drops = server_log.lines().filter(|l| l.contains("dropped")).count();
    eprintln!(
        "job completed: all 4 processes exited 0, invariant 1 holds; server logged {drops} dropped connections; total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

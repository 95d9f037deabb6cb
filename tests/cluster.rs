//! Whole jobs as real processes: `pslab local` starts a manager, servers and
//! workers as separate OS processes talking over TCP on 127.0.0.1.
//!
//! - invariant 1 (DESIGN.md §4): after concurrent pushes from 3 workers into
//!   dense and sparse tables (dims 1 and 8, sum and SGD rules) on 2 servers x 2
//!   shards, every parameter equals the sum of the acknowledged updates;
//! - the same check fails when one update is left out of the books (so it can fail);
//! - the main job learns the planted model;
//! - a server killed with SIGKILL fails the job promptly, with the reason, and
//!   the launcher stops every other process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{pslab, run};

/// `pslab local -v --no-pin --app APP` with `servers` x `shards`, `workers` and `params`.
fn local_job(app: &str, servers: u32, shards: u32, workers: u32, params: &str) -> (bool, String) {
    let (servers, shards, workers) = (servers.to_string(), shards.to_string(), workers.to_string());
    run(&[
        "local",
        "--app",
        app,
        "--servers",
        &servers,
        "--shards",
        &shards,
        "--workers",
        &workers,
        "--no-pin",
        "-v",
        "--params",
        params,
    ])
}

#[test]
fn invariant_1_holds_across_processes() {
    let (ok, out) = local_job("check", 2, 2, 3, r#"{"rounds": 20, "keys": 1500}"#);
    assert!(ok, "job failed:\n{out}");
    assert_eq!(out.matches("finished: invariant 1 holds").count(), 3, "every worker verifies:\n{out}");
    assert!(out.matches("\"mismatches\":0").count() == 3, "{out}");
}

#[test]
fn the_check_catches_an_update_left_out_of_the_books() {
    let (ok, out) = local_job("check", 2, 1, 2, r#"{"rounds": 3, "inject_stray_push": true}"#);
    assert!(!ok, "a wrong parameter must fail the job:\n{out}");
    assert!(out.contains("invariant 1 broken: 1 of"), "{out}");
}

/// Invariant 2 across processes over TCP: worker 0 straggles; every read of
/// the others waits on the shards until the bound holds, and no read sees fewer
/// than c - s clocks of any worker.
#[test]
fn ssp_reads_keep_their_bound_with_a_slow_worker() {
    for (model, s) in [("bounded:2", 2usize), ("essp:2", 2), ("sequential", 0)] {
        // the straggler's sleep must dwarf a fast worker's clock even on a
        // loaded machine: at 25 ms, with every core busy compiling, the fast
        // workers were as slow as the straggler and no read reached lag 2
        let params = format!(r#"{{"clocks": 12, "keys": 3000, "model": "{model}", "slow_ms": 80}}"#);
        let (ok, out) = local_job("ssp", 2, 2, 3, &params);
        assert!(ok, "job failed:\n{out}");
        assert_eq!(
            out.matches("finished: ssp: the reads of all 12 clocks kept").count(),
            3,
            "every worker checks:\n{out}"
        );
        // the fast workers ran into the bound: some read saw exactly s clocks of lag
        let key = "\"staleness_seen\":[";
        let hit = out.lines().filter_map(|l| l.find(key).map(|at| &l[at + key.len()..])).any(|rest| {
            let counts: Vec<u64> =
                rest.split(']').next().unwrap_or("").split(',').filter_map(|x| x.parse().ok()).collect();
            counts.get(s).is_some_and(|&n| n > 0)
        });
        assert!(hit, "no read ran at the bound {s}: the straggler did not hold anyone back?\n{out}");
    }
}

#[test]
fn without_the_bound_the_ssp_check_fails() {
    let (ok, out) = local_job(
        "ssp",
        2,
        1,
        3,
        r#"{"clocks": 10, "keys": 500, "model": "eventual", "check": "bounded:1", "slow_ms": 40}"#,
    );
    assert!(!ok, "eventual reads held to bounded:1 must fail the job:\n{out}");
    // which clock trips first depends on timing; the message names the bound
    assert!(out.contains("of the workers: bounded:1 needs"), "{out}");
}

#[test]
fn the_main_job_learns_the_planted_model() {
    let (ok, out) = run(&["local", "--no-pin", "--params", r#"{"examples": 80000, "epochs": 3}"#]);
    assert!(ok, "job failed:\n{out}");
    let value = |label: &str| -> f64 {
        let line = out.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label:?} in:\n{out}"));
        line[label.len()..].split_whitespace().next().unwrap().parse().unwrap()
    };
    let (acc, planted) = (value("test accuracy"), value("planted model accuracy"));
    assert!(acc > planted - 0.05, "learned {acc} vs planted {planted}:\n{out}");
    assert!(value("test AUC") > 0.9, "{out}");
    assert_eq!(out.matches("train loss").count(), 3, "a loss line per epoch:\n{out}");
}

/// Without replication (`--copies 1`) a dead server takes key ranges with it:
/// the job must fail, saying which server. (With copies it fails over:
/// tests/failover.rs.)
#[test]
fn a_killed_server_fails_the_job_with_the_reason() {
    let mut child = pslab()
        .args([
            "local",
            "--app",
            "check",
            "--servers",
            "2",
            "--workers",
            "2",
            "--copies",
            "1",
            "--no-pin",
            "-v",
            "--params",
            r#"{"rounds": 1000000}"#,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let mut server_pid = None;
    let mut running = false;
    let mut seen = String::new();
    while start.elapsed() < Duration::from_secs(60) && !(running && server_pid.is_some()) {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) else { continue };
        if let Some(rest) = line.strip_prefix("[launcher] started server1 (pid ") {
            server_pid = rest.trim_end_matches(')').parse::<u32>().ok();
        }
        running |= line.contains("job running");
        seen.push_str(&line);
        seen.push('\n');
    }
    let pid = server_pid.unwrap_or_else(|| panic!("no server pid:\n{seen}"));
    assert!(running, "the job never started:\n{seen}");
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the job did not end after a server died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(!status.success(), "a job that lost a server must fail");
    assert!(
        seen.contains("server 1") && (seen.contains("disconnected") || seen.contains("lost")),
        "the reason names the server:\n{seen}"
    );
    eprintln!("job failed {:.2} s after the kill", killed.elapsed().as_secs_f64());
}

#[test]
fn a_secret_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("pslab-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("secret");
    std::fs::write(&path, "ab".repeat(32)).unwrap();
    let node = |mode: u32| {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = pslab()
            .env_remove("PS_JOB_SECRET")
            .env("PS_JOB_SECRET_FILE", &path)
            // both cases fail on the secret, before any connection is tried
            .args(["node", "--role", "worker", "--manager", "127.0.0.1:1"])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, err) = node(0o644);
    assert!(!ok && err.contains("chmod 600"), "{err}");
    std::fs::write(&path, "not hex").unwrap();
    let (ok, err) = node(0o600);
    assert!(!ok && err.contains("PS_JOB_SECRET_FILE") && err.contains("hex digits"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Invariant 3's job over this build's transport (TCP here; scripts/rdma-test.sh
/// runs it over RDMA), with a client killed by SIGKILL while its pushes are in
/// flight: everyone else is served to the end, and the killed client's pushes
/// are merged whole or not at all (one surplus per segment, at most one per push).
#[test]
fn torn_read_job_survives_a_client_killed_mid_push() {
    let (ok, out) = local_job("torn", 2, 1, 3, r#"{"keys": 16384, "rounds": 200, "reads": 400, "hammer": 20}"#);
    assert!(ok, "job failed:\n{out}");
    assert!(out.contains("killed the hammer client (SIGKILL)"), "the extra client was killed mid-run:\n{out}");
    assert_eq!(out.matches("finished: torn: ").count(), 3, "every worker finished its checks:\n{out}");
}

/// `--transport rdma` on a build or machine without RDMA is an error that says
/// what to do, never a silent fallback; `doctor` says what is missing.
#[test]
fn forced_rdma_without_rdma_is_a_clear_error_and_doctor_explains() {
    let (ok, out) =
        run(&["--transport", "rdma", "local", "--app", "check", "--no-pin", "--params", r#"{"rounds": 1}"#]);
    assert!(!ok, "a forced RDMA job must fail here:\n{out}");
    assert!(out.contains("--transport rdma"), "{out}");
    assert!(out.contains("features rdma") || out.contains("doctor"), "the error says what to do:\n{out}");
    let (ok, out) = run(&["doctor"]);
    assert!(ok, "{out}");
    assert!(out.contains("problem"), "{out}");
    assert!(out.contains("locked-memory limit"), "{out}");
}

/// Matrix factorisation on MovieLens 100k (fetched by scripts/fetch-movielens.sh,
/// which the test command runs first) as 2 servers and 4 worker processes under
/// SSP with the process cache: the test RMSE lands where the datasets note says
/// a correct MF does (ALS-WR rank 10, lambda 0.1: 0.937-0.941).
#[test]
fn mf_on_movielens_reaches_the_reference_rmse() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/data/movielens/MovieLens100k_data.parquet.brotli");
    assert!(
        std::path::Path::new(data).is_file(),
        "MovieLens 100k is missing: run scripts/fetch-movielens.sh (the test command does)"
    );
    // lr 0.015, not the default 0.02: four workers' deltas from the same
    // point overshoot at 0.02, and under load (other tests beside it) the
    // objective oscillated from clock 10 on and sometimes diverged; at 0.015 it
    // descends smoothly to the same RMSE
    let params = format!(r#"{{"data": "{data}", "clocks": 400, "model": "bounded:1", "lr": 0.015}}"#);
    let (ok, out) = local_job("mf", 2, 1, 4, &params);
    assert!(ok, "job failed:\n{out}");
    let key = "\"test_rmse\":";
    let rmse: f64 = out
        .lines()
        .find_map(|l| l.find(key).map(|at| &l[at + key.len()..]))
        .and_then(|rest| rest.split([',', '}']).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no test RMSE in the output:\n{out}"));
    assert!((0.935..=0.950).contains(&rmse), "test RMSE {rmse} is outside 0.935-0.950:\n{out}");
    // every worker's reads were counted, and some were answered by the cache
    assert_eq!(out.matches("mf-reads: ").count(), 4, "{out}");
    assert!(!out.contains("\"hits\":0,"), "a worker's cache answered no read:\n{out}");
}

/// A number of the result table `pslab local` prints (`key   value` lines).
fn result_value(out: &str, key: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix(key).filter(|r| r.starts_with(' '))?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the result table:\n{out}"))
}

/// The OSDI flagship: sparse logistic regression by delayed block proximal
/// gradient (τ = 1, KKT filter, key caching) on the clothing reviews (fetched
/// and prepared by scripts/fetch-clothing.sh, which the test command runs), as
/// 2 servers and 4 worker processes: L1 and L2 objectives within 1e-3 of the
/// liblinear optimum of the datasets note, and test AUC >= 0.93.
#[test]
fn lr_on_clothing_reaches_the_liblinear_optimum() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/data/clothing");
    assert!(
        std::path::Path::new(data).join("train.libsvm").is_file(),
        "the clothing reviews are missing: run scripts/fetch-clothing.sh (the test command does)"
    );
    for (reg, sweeps, optimum) in [("l1", 150, 3309.7433), ("l2", 200, 2456.9823)] {
        let params = format!(r#"{{"data": "{data}", "reg": "{reg}", "sweeps": {sweeps}, "tau": 1}}"#);
        let (ok, out) = local_job("lr", 2, 1, 4, &params);
        assert!(ok, "{reg} job failed:\n{out}");
        let objective = result_value(&out, "objective");
        let rel = (objective - optimum).abs() / optimum;
        assert!(rel < 1e-3, "{reg}: objective {objective} is {rel:.2e} from the optimum {optimum}:\n{out}");
        let auc = result_value(&out, "auc");
        assert!(auc >= 0.93, "{reg}: test AUC {auc} < 0.93:\n{out}");
        // the per-sweep lines came, and under L1 the KKT filter dropped keys
        assert_eq!(out.lines().filter(|l| l.starts_with("sweep ")).count(), sweeps, "{out}");
        if reg == "l1" {
            let most = out
                .split("filtered ")
                .skip(1)
                .filter_map(|r| r.split('%').next()?.parse::<f64>().ok())
                .fold(0.0, f64::max);
            assert!(most > 50.0, "the KKT filter never dropped half the keys of a sweep ({most}%):\n{out}");
        }
    }
    // the streaming mode (asynchronous minibatch FTRL, 3 passes) does not reach
    // the batch optimum, but classifies as well
    let (ok, out) = local_job("lr", 2, 1, 4, &format!(r#"{{"data": "{data}", "solver": "ftrl"}}"#));
    assert!(ok, "ftrl job failed:\n{out}");
    let objective = result_value(&out, "objective");
    assert!(objective < 3309.7433 * 1.15, "ftrl: objective {objective} is more than 15% above the optimum:\n{out}");
    assert!(result_value(&out, "auc") >= 0.93, "{out}");
}

/// Filters that hold values back (significantly-modified, random skip) and
/// the exact codecs (key caching, LZ4) lose no update: after the workers
/// flush their residuals, every value equals the sum of the acknowledged
/// pushes, exactly (the check's values are small integers), across processes.
#[test]
fn filters_lose_no_update_across_processes() {
    let filters = r#"[{"filter": "significantly_modified", "threshold": 2.5}, {"filter": "random_skip", "p": 0.3, "seed": 1},
                      {"filter": "key_cache"}, {"filter": "lz4"}]"#;
    let (ok, out) = local_job("check", 2, 1, 3, &format!(r#"{{"filters": {filters}}}"#));
    assert!(ok, "{out}");
    assert!(out.contains("invariant 1 holds"), "{out}");
    // quantisation sends its rounding error later: exact up to f32 rounding
    // (a lost update of the check's integer values is off by 1 or more)
    for bits in [8, 16] {
        let params = format!(
            r#"{{"filters": [{{"filter": "quantize", "bits": {bits}}}, {{"filter": "key_cache"}}], "tolerance": 1e-4}}"#
        );
        let (ok, out) = local_job("check", 2, 1, 3, &params);
        assert!(ok && out.contains("invariant 1 holds"), "{bits} bits:\n{out}");
    }
    // and the same tolerance catches an update left out
    let params = r#"{"filters": [{"filter": "quantize", "bits": 8}], "tolerance": 1e-4, "inject_stray_push": true}"#;
    let (ok, out) = local_job("check", 2, 1, 3, params);
    assert!(!ok && out.contains("invariant 1 broken"), "{out}");
}

/// `pslab lr`: the subcommand writes the model in its documented format and
/// the objective curve, and refuses a bad parameter with a message.
#[test]
fn the_lr_command_writes_its_model_and_curve() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/data/clothing");
    let dir = std::env::temp_dir().join(format!("pslab-lr-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (model, png) = (dir.join("model.txt"), dir.join("curve.png"));
    let (ok, out) = run(&[
        "lr",
        "--data",
        data,
        "--sweeps",
        "5",
        "--workers",
        "2",
        "--no-pin",
        "--model",
        model.to_str().unwrap(),
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&model).unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("# pslab lr model"), "{text}");
    assert!(lines.next().unwrap().starts_with("# features 13419 l1 1 l2 0 objective"), "{text}");
    let weights: Vec<(u64, f32)> = lines
        .map(|l| {
            let (k, w) = l.split_once(' ').unwrap();
            (k.parse().unwrap(), w.parse().unwrap())
        })
        .collect();
    assert!(!weights.is_empty() && weights.iter().all(|&(k, w)| (1..=13419).contains(&k) && w != 0.0));
    assert!(weights.windows(2).all(|p| p[0].0 < p[1].0), "keys ascending");
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    let (ok, out) = run(&["lr", "--data", data, "--tau", "16", "--no-pin"]);
    assert!(!ok && out.contains("tau 16 must be below blocks 16"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Checkpoint and restart (the fault-tolerance issue's item 6, for the lr
/// job): a run of 40 sweeps writes a checkpoint of every shard after sweep 20;
/// a new job started with `--resume` from it loads the tables and goes on from
/// sweep 21. Its sweep-21 line and its final objective, accuracy and AUC are
/// those of the run that was never stopped.
#[test]
fn lr_resumes_from_a_checkpoint_to_the_same_result() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/data/clothing");
    let dir = std::env::temp_dir().join(format!("pslab-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let job = |extra: &[&str]| {
        let mut args = vec!["lr", "--data", data, "--sweeps", "40", "--tau", "1", "--no-pin"];
        args.extend_from_slice(extra);
        let out = pslab().env("PS_CHECKPOINT_DIR", &dir).args(&args).output().expect("pslab runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        text
    };
    let whole = job(&["--checkpoint-every", "20"]);
    assert!(whole.contains("checkpoint: {\"sweep\":20}"), "{whole}");
    let ckpt = dir.join("ckpt-20");
    for s in 0..2 {
        assert!(ckpt.join(format!("server{s}-shard0.ckpt")).is_file(), "no checkpoint file of server {s}");
    }
    let resumed = job(&["--resume", ckpt.to_str().unwrap()]);
    assert_eq!(resumed.matches("resumed: ").count(), 4, "{resumed}");
    assert!(!resumed.lines().any(|l| l.starts_with("sweep 20/")), "the resumed job starts after sweep 20");
    let line = |out: &str| {
        out.lines().find(|l| l.starts_with("sweep 21/")).map(|l| l.split("  non-zeros").next().unwrap().to_string())
    };
    assert_eq!(line(&resumed), line(&whole), "sweep 21 differs:\n{whole}\n{resumed}");
    let (a, b) = (result_value(&whole, "objective"), result_value(&resumed, "objective"));
    assert!((a - b).abs() / a < 1e-6, "objective {a} uninterrupted, {b} resumed");
    for key in ["test_accuracy", "auc"] {
        assert!((result_value(&whole, key) - result_value(&resumed, key)).abs() < 1e-4, "{key}:\n{whole}\n{resumed}");
    }
    // a checkpoint of another shape is refused with the reason
    let out = pslab()
        .env("PS_CHECKPOINT_DIR", &dir)
        .args([
            "lr",
            "--data",
            data,
            "--sweeps",
            "40",
            "--servers",
            "3",
            "--no-pin",
            "--resume",
            ckpt.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("PS_RESUME"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

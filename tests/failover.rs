//! Fault tolerance as real processes (`pslab local --kill NAME@MS` sends
//! SIGKILL to one process of the running job):
//!
//! - a server killed while 3 workers push, with 2 copies of every shard: the
//!   job completes, every parameter equals the sum of the acknowledged pushes
//!   (invariant 1), and the time from the lost connection to the new head's
//!   first answer is measured and under a second; for each server in turn;
//! - the same kill without copies fails the job (tests/cluster.rs).

mod common;
use common::run;

/// The numbers of the `failover:` summary line: (connections moved, longest
/// ms by the workers' clocks, ms from the kill by the launcher's).
fn failover_line(out: &str) -> (u64, f64, f64) {
    let line = out.lines().find(|l| l.starts_with("failover: ")).unwrap_or_else(|| panic!("no failover line:\n{out}"));
    let num_after = |key: &str| -> f64 {
        let at = line.find(key).unwrap_or_else(|| panic!("{key:?} not in {line:?}")) + key.len();
        line[at..].trim_start().split(|c: char| !c.is_ascii_digit() && c != '.').next().unwrap().parse().unwrap()
    };
    (num_after("failover: ") as u64, num_after("longest"), num_after("to the last of those answers:"))
}

#[test]
fn a_server_killed_mid_push_fails_over_and_loses_no_acknowledged_push() {
    for victim in 0..3 {
        let kill = format!("server{victim}@400");
        let (ok, out) = run(&[
            "local",
            "--app",
            "check",
            "--servers",
            "3",
            "--workers",
            "3",
            "--copies",
            "2",
            "--no-pin",
            "-v",
            "--kill",
            &kill,
            "--params",
            r#"{"rounds": 300, "keys": 1500}"#,
        ]);
        assert!(ok, "killing server {victim}: the job failed:\n{out}");
        assert!(out.contains(&format!("killed server{victim}")), "{out}");
        assert!(out.contains(&format!("server {victim} (pid")) && out.contains("failing over"), "{out}");
        assert_eq!(out.matches("finished: invariant 1 holds").count(), 3, "every worker verifies:\n{out}");
        let (moved, longest_ms, since_kill_ms) = failover_line(&out);
        // each of the 3 workers had one connection to the dead server's shard
        assert_eq!(moved, 3, "{out}");
        assert!(longest_ms < 1000.0, "failover took {longest_ms} ms:\n{out}");
        eprintln!("server {victim}: failover {longest_ms:.0} ms (workers), {since_kill_ms:.0} ms from the kill");
    }
}

/// A worker killed mid-training: the job goes on without it, the others take
/// its examples (or leave them out), the model still learns, and the result
/// says what was done with that worker's data.
#[test]
fn a_killed_worker_is_left_behind_and_the_job_says_what_became_of_its_data() {
    for (policy, says) in [("reassign", "dealt out to the live workers"), ("skip", "left out")] {
        let params = format!(r#"{{"epochs": 4, "on_worker_loss": "{policy}"}}"#);
        let (ok, out) = run(&[
            "local",
            "--servers",
            "2",
            "--workers",
            "3",
            "--no-pin",
            "--kill",
            "worker1@1200",
            "--params",
            &params,
        ]);
        assert!(ok, "{policy}: the job failed:\n{out}");
        assert!(out.contains("killed worker1"), "{out}");
        assert!(out.contains(&format!("lost worker            1: its 133333 examples {says}")), "{policy}:\n{out}");
        let acc: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("test accuracy")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no accuracy:\n{out}"));
        assert!(acc > 0.85, "{policy}: accuracy {acc}:\n{out}");
    }
}

/// The manager's leader killed (3 replicas keep its state in a Raft log): a
/// new leader within a few seconds, every node rejoins it, and the job
/// completes with invariant 1 intact; then the same while training, where
/// every epoch ends at a barrier the new leader must release, and with a
/// server killed too, which the new leader fails over.
#[test]
fn killing_the_manager_leader_elects_another_and_the_job_completes() {
    let (ok, out) = run(&[
        "local",
        "--app",
        "check",
        "--managers",
        "3",
        "--servers",
        "3",
        "--workers",
        "3",
        "--no-pin",
        "-v",
        "--kill",
        "leader@800",
        "--params",
        r#"{"rounds": 300, "keys": 1500}"#,
    ]);
    assert!(ok, "the job failed:\n{out}");
    assert_eq!(out.matches("finished: invariant 1 holds").count(), 3, "{out}");
    let ms = leader_after_kill_ms(&out);
    assert!(ms < 5000.0, "a new leader {ms} ms after the kill:\n{out}");
    eprintln!("check: new manager leader {ms:.0} ms after the kill");

    let (ok, out) = run(&[
        "local",
        "--managers",
        "3",
        "--servers",
        "3",
        "--workers",
        "3",
        "--no-pin",
        "--kill",
        "leader@1200",
        "--kill",
        "server2@2500",
        "--params",
        r#"{"epochs": 5}"#,
    ]);
    assert!(ok, "the job failed:\n{out}");
    assert_eq!(out.matches("train loss").count(), 5, "every epoch's barrier released:\n{out}");
    assert!(out.contains("failover: 3 connections"), "the new leader failed the server over:\n{out}");
    let ms = leader_after_kill_ms(&out);
    eprintln!("train-lr: new manager leader {ms:.0} ms after the kill");
}

fn leader_after_kill_ms(out: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("manager failover: "))
        .unwrap_or_else(|| panic!("no manager failover line:\n{out}"));
    let at = line.find("leads, ").expect("leads") + "leads, ".len();
    line[at..].split(' ').next().unwrap().parse().unwrap()
}

/// A copy lost with its server is rebuilt on another (bulk-copied from its
/// chain's tail while the workers push, then the frames since; it joins the
/// chain once it acknowledged them): so a second server can die later and
/// the job still completes with invariant 1 intact. Without the rebuild that
/// second death would take the last copy of a shard.
#[test]
fn a_lost_copy_is_rebuilt_so_a_second_server_may_die_later() {
    let (ok, out) = run(&[
        "local",
        "--app",
        "check",
        "--servers",
        "3",
        "--workers",
        "3",
        "--copies",
        "2",
        "--no-pin",
        "-v",
        "--kill",
        "server1@400",
        "--kill",
        "server2@2500",
        "--params",
        r#"{"rounds": 600, "keys": 1500}"#,
    ]);
    assert!(ok, "the job failed:\n{out}");
    assert_eq!(out.matches("joined its chain: 2 copies again").count(), 2, "both lost copies rebuilt:\n{out}");
    assert!(out.contains("killed server2"), "{out}");
    assert!(!out.contains("last copy"), "{out}");
    assert_eq!(out.matches("finished: invariant 1 holds").count(), 3, "every worker verifies:\n{out}");
}

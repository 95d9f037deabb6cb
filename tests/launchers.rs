//! Jobs started by real MPI launchers: `scripts/pslab-mpirun.sh` runs one
//! `pslab node --role auto` per rank under Open MPI's `mpirun` and MPICH's
//! `mpiexec`; each rank finds its role from the launcher's variables
//! (`ps_core::launch`), and the job checks invariant 1 with 6 ranks: a
//! manager, 2 servers and 3 workers. The same under a one-node Slurm
//! (`scripts/slurm-local.sh`): `srun -n6`, `sbatch` (srun inside), and Open
//! MPI's `mpirun` inside an `sbatch` allocation, where every rank inherits
//! `SLURM_PROCID=0`. The test command installs both MPIs and Slurm (Debian's
//! openmpi-bin, mpich and slurm-wlm).

use std::process::Command;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn mpi_job(mpi: &str, launcher: &str) {
    assert!(
        Command::new("sh").args(["-c", &format!("command -v {launcher}")]).output().unwrap().status.success(),
        "{launcher} is missing: apt-get install {} (the test command installs it)",
        if mpi == "mpich" { "mpich" } else { "openmpi-bin" }
    );
    let port = free_port().to_string();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pslab-mpirun.sh"))
        .args(["--mpi", mpi, "-n", "6", "--servers", "2", "--port", &port, "--"])
        .args(["--app", "check", "--shards", "1", "--no-pin", "--params", r#"{"rounds": 8, "keys": 800}"#])
        .env("PSLAB", env!("CARGO_BIN_EXE_pslab"))
        .env("PS_LOG", "info")
        .output()
        .expect("run scripts/pslab-mpirun.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // each rank found its place: the right launcher, and its role from its rank
    check_job(mpi, out.status.success(), &text, if mpi == "mpich" { "pmi" } else { "openmpi" });
}

#[test]
fn open_mpi_mpirun_runs_a_job_that_keeps_invariant_1() {
    mpi_job("openmpi", "mpirun.openmpi");
}

#[test]
fn mpich_mpiexec_runs_a_job_that_keeps_invariant_1() {
    mpi_job("mpich", "mpiexec.mpich");
}

fn check_job(what: &str, ok: bool, text: &str, source: &str) {
    assert!(ok, "{what} failed:\n{text}");
    assert_eq!(text.matches("finished: invariant 1 holds").count(), 3, "{what}: every worker verifies:\n{text}");
    for (rank, role) in [(0, "Manager"), (1, "Server(0)"), (2, "Server(1)"), (3, "Worker(0)"), (5, "Worker(2)")] {
        let line = text.lines().find(|l| l.contains(&format!("rank {rank} of 6 ({source}")));
        assert!(line.is_some_and(|l| l.contains(&format!("): {role},"))), "{what}: rank {rank} as {role}:\n{text}");
    }
}

/// Stops the test's Slurm however the test ends.
struct Slurm(String);

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/slurm-local.sh"))
            .args(["stop", &self.0])
            .status();
    }
}

#[test]
fn slurm_runs_jobs_with_srun_sbatch_and_mpirun_inside_sbatch() {
    for tool in ["slurmctld", "slurmd", "srun", "sbatch", "mpirun.openmpi"] {
        assert!(
            Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success(),
            "{tool} is missing: apt-get install slurm-wlm openmpi-bin (the test command installs them)"
        );
    }
    let dir = "/tmp/pslab-slurm-test".to_string();
    let start = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/slurm-local.sh"))
        .args(["start", &dir])
        .output()
        .expect("run scripts/slurm-local.sh");
    let _slurm = Slurm(dir.clone());
    assert!(start.status.success(), "Slurm did not start:\n{}", String::from_utf8_lossy(&start.stderr));
    let conf = format!("{dir}/slurm.conf");
    let secret = Command::new(env!("CARGO_BIN_EXE_pslab")).arg("secret").output().unwrap();
    let secret = String::from_utf8(secret.stdout).unwrap().trim().to_string();
    let job = ["--app", "check", "--shards", "1", "--no-pin", "--params", r#"{"rounds": 6, "keys": 600}"#];

    // srun -n6
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let out = Command::new("srun")
        .args(["-n6", env!("CARGO_BIN_EXE_pslab"), "node", "--role", "auto", "--servers", "2"])
        .args(["--manager", &addr, "--listen", &addr])
        .args(job)
        .env("SLURM_CONF", &conf)
        .env("PS_JOB_SECRET", &secret)
        .env("PS_LOG", "info")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    check_job("srun -n6", out.status.success(), &text, "slurm");
    assert!(text.contains("hosts "), "srun: the host list comes from Slurm:\n{text}");

    // sbatch, with srun inside, and with Open MPI's mpirun inside
    for launch in ["srun", "mpirun"] {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log = format!("{dir}/sbatch-{launch}.out");
        let out = Command::new("sbatch")
            .args(["--wait", "-n", "6", "-o", &log, concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pslab.sbatch")])
            .args(job)
            .env("SLURM_CONF", &conf)
            .env("PSLAB", env!("CARGO_BIN_EXE_pslab"))
            .env("PS_JOB_SECRET", &secret)
            .env("PS_LOG", "info")
            .env("PS_MANAGER", &addr)
            .env("PS_LISTEN", &addr)
            .env("PS_LAUNCH", launch)
            .output()
            .unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let what = format!("sbatch ({launch} inside)");
        let source = if launch == "mpirun" { "openmpi" } else { "slurm" };
        check_job(&what, out.status.success(), &format!("{}{text}", String::from_utf8_lossy(&out.stderr)), source);
        if launch == "mpirun" {
            assert_eq!(
                text.matches("SLURM_PROCID=0 ignored").count(),
                5,
                "ranks 1-5 inherit SLURM_PROCID=0 and must not believe it:\n{text}"
            );
        }
    }
    drop(_slurm);

    // three emulated nodes (multiple slurmd), one server on each
    let dir3 = "/tmp/pslab-slurm-test3".to_string();
    let start = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/slurm-local.sh"))
        .args(["start", &dir3])
        .env("PS_SLURM_NODES", "3")
        .output()
        .expect("run scripts/slurm-local.sh");
    let _slurm3 = Slurm(dir3.clone());
    assert!(start.status.success(), "3-node Slurm did not start:\n{}", String::from_utf8_lossy(&start.stderr));
    let addr = format!("127.0.0.1:{}", free_port());
    let out = Command::new("srun")
        .args(["-N3", "-n7", env!("CARGO_BIN_EXE_pslab"), "node", "--role", "auto", "--servers-per-node", "1"])
        .args(["--manager", &addr, "--listen", &addr])
        .args(job)
        .env("SLURM_CONF", format!("{dir3}/slurm.conf"))
        .env("PS_JOB_SECRET", &secret)
        .env("PS_LOG", "info")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "srun -N3 -n7 failed:\n{text}");
    assert!(text.contains("hosts n1,n2,n3"), "three nodes:\n{text}");
    assert_eq!(text.matches("): Server(").count(), 3, "one server per node:\n{text}");
    assert_eq!(text.matches("finished: invariant 1 holds").count(), 3, "7 - manager - 3 servers:\n{text}");
}

#[test]
fn role_auto_without_a_launcher_says_what_is_missing() {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pslab"));
    c.args(["node", "--role", "auto"]).env("PS_JOB_SECRET", "00".repeat(32));
    for v in ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"] {
        c.env_remove(v);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("needs a launcher"), "{text}");
    // and a launch too small for the roles asked for says how many ranks it needs
    let out = Command::new(env!("CARGO_BIN_EXE_pslab"))
        .args(["node", "--role", "auto", "--servers", "2"])
        .env("PS_JOB_SECRET", "00".repeat(32))
        .env("PMI_RANK", "0")
        .env("PMI_SIZE", "3")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("start at least 4 ranks"), "{text}");
}

#[test]
fn a_toml_job_file_describes_the_job_for_every_rank() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("pslab-job-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("job.toml");
    std::fs::write(
        &file,
        format!("app = \"check\"\nservers = 2\nshards = 1\nport = {port}\n[params]\nrounds = 5\nkeys = 500\n"),
    )
    .unwrap();
    // the script's own --servers/--port are the defaults the file replaces
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pslab-mpirun.sh"))
        .args(["-n", "6", "--port", &port.to_string(), "--", "--job", file.to_str().unwrap(), "--no-pin"])
        .env("PSLAB", env!("CARGO_BIN_EXE_pslab"))
        .env("PS_LOG", "info")
        .output()
        .expect("run scripts/pslab-mpirun.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    check_job("mpirun --job", out.status.success(), &text, "openmpi");
    assert!(
        text.contains("values equal the sum of 75 acknowledged pushes"),
        "the file's params (5 rounds x 3 workers x 5):\n{text}"
    );
    // a misspelt key is an error that names it
    std::fs::write(&file, "app = \"check\"\nserverz = 2\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pslab"))
        .args(["node", "--role", "manager", "--job", file.to_str().unwrap()])
        .env("PS_JOB_SECRET", "00".repeat(32))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("serverz"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

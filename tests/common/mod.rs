//! What the process tests share: the pslab binary this build made, and a run
//! of it to the end with its output.

use std::process::Command;

/// The pslab binary of this build, logging at info.
pub fn pslab() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pslab"));
    c.env("PS_LOG", "info");
    c
}

/// Runs `pslab ARGS` to the end: (exited 0, stdout and stderr).
pub fn run(args: &[&str]) -> (bool, String) {
    let out = pslab().args(args).output().expect("run pslab");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

//! The harness has teeth: a bug planted in the chain (`chain::planted`: the
//! head answers a push as soon as it forwards it, before the tail has it)
//! is reported within the default seeds of the failover simulation; the
//! same seed reports it again at the same step (a failing seed replays
//! exactly), and passes with the bug off.
//!
//! Must never: leave a planted bug on (the flag is per test thread, and
//! turned off before any assertion).

use super::cluster::SERVERS;
use super::failover_tests::failover_run;
use super::seeds;
use crate::chain::planted;

/// The kills of the 2-copy failover simulation: any one server.
fn kills(seed: u64) -> Vec<u32> {
    vec![(seed % SERVERS as u64) as u32]
}

#[test]
fn a_head_answering_before_the_tail_acknowledged_is_caught() {
    planted::set_early_answer(true);
    let found = seeds(300).find_map(|seed| failover_run(seed, 2, &kills(seed), false).err().map(|e| (seed, e)));
    let again = found.as_ref().map(|(seed, _)| failover_run(*seed, 2, &kills(*seed), false));
    planted::set_early_answer(false);
    let (seed, e) = found.expect("the planted bug went unnoticed in every seed");
    eprintln!("planted bug found: {e}");
    assert_eq!(again.and_then(|r| r.err()), Some(e), "the failing seed did not replay the same way");
    if let Err(e) = failover_run(seed, 2, &kills(seed), false) {
        panic!("with the bug off, the seed that found it fails too: {e}");
    }
}

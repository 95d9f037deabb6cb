//! Every tunable of the RDMA transport in one place: queue depths, batch and
//! signalling sizes, READ landing slots and trimming, retry bounds and waits,
//! each with its reason, and compile-time checks of how they relate.
//!
//! Must never hold state or code that runs: a number that changes here is a
//! decision, and the assertions below are where its consequences are checked.

use std::time::Duration;

use ps_core::limits::{BLOCK_BYTES, RDMA_RING_SLOTS as RING_SLOTS};

use crate::datapath::BATCH_MAX;

/// Work requests posted per doorbell at most, and a WRITE is signalled at least
/// this often (the rest complete silently: an RC send queue completes in order).
pub const SIGNAL_EVERY: usize = 4;
/// Send queue depth: every slot's WRITE, every landing slot's READs (up to
/// `READ_PIECES` each), a batch, slack.
pub const SEND_WR: u32 = (2 * RING_SLOTS + READ_PIECES * READ_SLOTS + BATCH_MAX + 8) as u32;
/// Completion queue depth, shared by every connection of a transport.
pub const CQ_DEPTH: i32 = 16384;
/// Connections a transport holds over RDMA (CQ_DEPTH / the entries one may queue).
pub const RDMA_CONNECTIONS_MAX: usize = CQ_DEPTH as usize / (2 * RING_SLOTS + SEND_WR as usize);
/// Frames up to this size go inline (acks and errors: no DMA read of our memory).
pub const INLINE_BYTES: u32 = 128;
/// Landing slots for READ-served pulls, one pull chunk's blocks each (at 256 KiB
/// chunks: 16 x 66 x 4 KiB, about 4.3 MiB per client). A pull chunk holds a slot
/// from its READ's post until its completion is handled, so this is also how many
/// pull chunks a client keeps in flight; the QP's READ depth is 16 too.
pub const READ_SLOTS: usize = 16;
/// A pull's span of blocks is fetched by one READ, except that an end block of
/// which at least this many bytes are not wanted is cut: the READ stops (or
/// starts) at the wanted floats, and that block's version word at the cut end
/// is fetched by a READ of its own, 8 bytes, posted before (head) or after
/// (tail) it. A 64 KiB pull from a block boundary then moves 65.8 KiB instead
/// of 17 whole blocks (68 KiB). One MTU on RoCE: an extra small READ costs
/// about what a packet of unwanted bytes does.
pub const READ_TRIM_MIN: usize = 1024;
/// READs per pull chunk at most: the head word, the span, the tail word.
pub const READ_PIECES: usize = 3;
/// A torn block is re-read at most this often before the pull fails.
pub const TORN_RETRIES_MAX: u32 = 100_000;
/// How long `rx_burst` spins on the CQs for landed READs before it looks at TCP.
pub const READ_SPIN: Duration = Duration::from_micros(200);
/// The longest sleep of a sender waiting for a credit (a response's event wakes
/// it sooner; this bounds the cost of a missed one).
pub const CREDIT_NAP: Duration = Duration::from_millis(1);
/// How long a full sender waits for a slot before it gives up on the peer.
pub const TX_STALL: Duration = Duration::from_secs(60);

const _: () = {
    assert!(SIGNAL_EVERY <= BATCH_MAX && RING_SLOTS >= 2 && READ_SLOTS >= 1);
    assert!(SEND_WR as usize >= RING_SLOTS + BATCH_MAX, "every slot in flight plus a batch must fit the send queue");
    assert!(BATCH_MAX >= READ_PIECES && READ_TRIM_MIN >= 16 && READ_TRIM_MIN < BLOCK_BYTES);
};

//! Against a real verbs device (rxe0 in scripts/softroce-vm.sh, or the device
//! named by PS_RDMA_DEVICE): two RC QPs of one process connected to each other;
//! RDMA WRITEs and READs move patterns between registered regions, and every
//! byte is checked. Skipped (with a line saying so) where no device exists,
//! unless PS_RDMA_REQUIRE is set (scripts/rdma-test.sh sets it): then it fails.

use ps_rdma::datapath::{post_one, wait, Op};
use ps_rdma::{Context, Cq, Endpoint, Mr, Pd, Qp, QpCaps};

#[test]
fn write_and_read_between_two_connected_qps() {
    if Context::device_names().is_empty() {
        // where a device is expected (the VM, a named HCA) a missing one is a failure
        assert!(
            std::env::var_os("PS_RDMA_REQUIRE").is_none(),
            "PS_RDMA_REQUIRE is set but there is no verbs device: soft-RoCE did not come up"
        );
        eprintln!("SKIP: no verbs device here; run under scripts/softroce-vm.sh");
        return;
    }
    let ctx = std::sync::Arc::new(Context::open(std::env::var("PS_RDMA_DEVICE").ok().as_deref()).unwrap());
    let port = 1;
    let (gid_index, gid) = ctx.ipv4_gid(port).unwrap();
    let lid = ctx.query_port(port).unwrap().lid;
    eprintln!("device {} gid index {gid_index}", ctx.name());
    let pd = Pd::new(&ctx).unwrap();
    let cq = Cq::new(&ctx, 256, false).unwrap();
    let caps = QpCaps { send_wr: 64, recv_wr: 64, inline_bytes: 0 };
    let mut a = Qp::new(&pd, &cq, &cq, caps).unwrap();
    let mut b = Qp::new(&pd, &cq, &cq, caps).unwrap();
    let (ea, eb) =
        (Endpoint { qpn: a.qpn(), psn: 100, lid, gid, mtu: 0 }, Endpoint { qpn: b.qpn(), psn: 200, lid, gid, mtu: 0 });
    a.connect(port, Some(gid_index), ea.psn, &eb).unwrap();
    b.connect(port, Some(gid_index), eb.psn, &ea).unwrap();
    let mut ma = Mr::new(&pd, 1 << 20).unwrap();
    let mb = Mr::new(&pd, 1 << 20).unwrap();
    let mut wr = 0u64;
    for round in 0..64u32 {
        let len = 1 + (round as usize * 7919) % (256 << 10);
        let off = (round as usize * 4096) % (512 << 10);
        for (i, x) in ma.bytes_mut()[off..off + len].iter_mut().enumerate() {
            *x = (i as u32 ^ round.wrapping_mul(2654435761)) as u8;
        }
        wr += 1;
        // SAFETY: ma[off..off+len] is not touched until `wait` returns the completion.
        unsafe { post_one(&a, Op::Write, &ma, off, len, mb.addr() + off as u64, mb.rkey(), wr).unwrap() };
        wait(&cq, wr, 50_000_000).unwrap();
        assert_eq!(&mb.bytes()[off..off + len], &ma.bytes()[off..off + len], "round {round}: WRITE landed");
        // read it back into another part of ma
        let back = 512 << 10;
        wr += 1;
        // SAFETY: ma[back..back+len] is not touched until the completion is polled.
        unsafe { post_one(&a, Op::Read, &ma, back, len, mb.addr() + off as u64, mb.rkey(), wr).unwrap() };
        wait(&cq, wr, 50_000_000).unwrap();
        let (src, dst) = ma.bytes().split_at(back);
        assert_eq!(&dst[..len], &src[off..off + len], "round {round}: READ returned the written bytes");
    }
    eprintln!("64 WRITE + READ round trips verified on {}", ctx.name());
}

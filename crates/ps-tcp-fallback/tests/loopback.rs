//! The TCP transport against itself on 127.0.0.1, in one process: the handshake
//! both ways, frames in order, a gathered send larger than the socket takes at
//! once, and a wrong secret refused on both sides.

use std::time::{Duration, Instant};

use ps_core::auth::JobSecret;
use ps_core::transport::{FrameSink, PeerEvent, PeerHello, RxFrame, Transport};
use ps_tcp_fallback::{ConnectError, TcpConfig, TcpTransport};

fn secret(b: u8) -> JobSecret {
    JobSecret::from_bytes([b; 32])
}

fn pair(server_secret: JobSecret) -> (TcpTransport, TcpTransport) {
    let server = TcpTransport::listen(
        TcpConfig::new(server_secret, PeerHello { role: 2, node: 0 }, false),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let client = TcpTransport::client(TcpConfig::new(secret(1), PeerHello { role: 3, node: 7 }, true)).unwrap();
    (server, client)
}

/// Pumps the server until `n` frames arrived (accepting and answering the handshake meanwhile).
fn recv_frames(server: &mut TcpTransport, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut rx = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} frames arrived", got.len());
        server.rx_burst(&mut rx, Some(Duration::from_millis(10))).unwrap();
        for f in rx.drain(..) {
            got.push(f.bytes().to_vec());
            server.release(f);
        }
        server.flush().unwrap();
    }
    got
}

fn frame_of(len: usize, fill: u8) -> Vec<u8> {
    // a Control frame carrying `len - 16` bytes of `fill`
    let json = vec![fill; len - 16];
    let mut f = vec![0u8; ps_core::wire::control_len(json.len())];
    ps_core::wire::write_control(&mut f, &json);
    f
}

#[test]
fn handshake_then_frames_in_order_including_a_large_gathered_one() {
    let (mut server, mut client) = pair(secret(1));
    let addr = server.local_addr().unwrap();
    // the client's blocking handshake needs the server to answer: run it on a thread
    let t = std::thread::spawn(move || {
        let peer = client.connect(addr, Duration::from_secs(5)).unwrap();
        let small = frame_of(64, 1);
        client.frame(peer, small.len()).unwrap().copy_from_slice(&small);
        // 1 MiB gathered in three parts: more than a socket takes in one write
        let big = frame_of(1 << 20, 2);
        let (a, rest) = big.split_at(40);
        let (b, c) = rest.split_at(300_000);
        client.frame_gather(peer, &[a, b, c]).unwrap();
        let last = frame_of(64, 3);
        client.frame(peer, last.len()).unwrap().copy_from_slice(&last);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.tx_pending_bytes(peer) > 0 {
            assert!(Instant::now() < deadline);
            client.flush().unwrap();
            let mut rx = Vec::new();
            client.rx_burst(&mut rx, Some(Duration::from_millis(5))).unwrap();
        }
        client
    });
    let got = recv_frames(&mut server, 3);
    let _client = t.join().unwrap();
    assert_eq!(got[0], frame_of(64, 1));
    assert_eq!(got[1], frame_of(1 << 20, 2), "the gathered frame arrives whole and in order");
    assert_eq!(got[2], frame_of(64, 3));
    let mut ev = Vec::new();
    server.events(&mut ev);
    assert!(matches!(ev[0], PeerEvent::Opened { hello: PeerHello { role: 3, node: 7 }, .. }), "{ev:?}");
}

#[test]
fn a_wrong_secret_is_refused_and_the_client_is_told_why() {
    let (mut server, mut client) = pair(secret(9));
    let addr = server.local_addr().unwrap();
    let t = std::thread::spawn(move || client.connect(addr, Duration::from_secs(5)));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ev = Vec::new();
    while !ev.iter().any(|e| matches!(e, PeerEvent::Closed { .. })) {
        assert!(Instant::now() < deadline, "the server never dropped the impostor");
        let mut rx = Vec::new();
        server.rx_burst(&mut rx, Some(Duration::from_millis(10))).unwrap();
        assert!(rx.is_empty(), "no frame from an unauthenticated peer is delivered");
        server.flush().unwrap();
        server.events(&mut ev);
    }
    let PeerEvent::Closed { reason, .. } = ev.iter().find(|e| matches!(e, PeerEvent::Closed { .. })).unwrap() else {
        unreachable!()
    };
    assert!(reason.contains("bad MAC"), "{reason}");
    match t.join().unwrap() {
        Err(ConnectError::Handshake { why, .. }) => assert!(why.contains("secret"), "{why}"),
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

#[test]
fn a_peer_that_stops_mid_frame_is_dropped_after_the_stall_timeout() {
    let mut cfg = TcpConfig::new(secret(1), PeerHello { role: 2, node: 0 }, false);
    cfg.stall_timeout = Duration::from_millis(300);
    let mut server = TcpTransport::listen(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let mut client = TcpTransport::client(TcpConfig::new(secret(1), PeerHello { role: 3, node: 1 }, true)).unwrap();
    let t = std::thread::spawn(move || {
        let peer = client.connect(addr, Duration::from_secs(5)).unwrap();
        // half a frame: the prefix promises 1024 bytes, 100 come
        let frame = frame_of(1024, 5);
        client.frame(peer, 100).unwrap().copy_from_slice(&frame[..100]);
        client.flush().unwrap();
        client
    });
    let start = Instant::now();
    let mut ev = Vec::new();
    let mut rx = Vec::new();
    while !ev.iter().any(|e| matches!(e, PeerEvent::Closed { .. })) {
        assert!(start.elapsed() < Duration::from_secs(10), "a stalled peer was never dropped: {ev:?}");
        server.rx_burst(&mut rx, Some(Duration::from_millis(20))).unwrap();
        assert!(rx.is_empty());
        server.flush().unwrap();
        server.events(&mut ev);
    }
    let _client = t.join().unwrap();
    let PeerEvent::Closed { reason, .. } = ev.iter().find(|e| matches!(e, PeerEvent::Closed { .. })).unwrap() else {
        unreachable!()
    };
    assert!(reason.contains("stalled"), "{reason}");
    assert!(start.elapsed() >= Duration::from_millis(300), "dropped before the timeout");
}

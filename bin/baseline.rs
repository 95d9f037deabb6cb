//! The raw-TCP baseline the bench reports beside every PS number: the same bytes
//! over one plain blocking socket on 127.0.0.1 between two processes, with the
//! same shape of exchange as the PS operation it stands beside:
//!
//! - `copy`: send `size` bytes, receive an 8-byte ack (a push);
//! - `fetch`: send an 8-byte request, receive `size` bytes (a pull);
//! - `exchange`: send `size` bytes, receive `size` bytes (push->pull, fused).
//!
//! Both ends use one reused buffer (no allocation per message) and TCP_NODELAY.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const CHUNK: usize = 1 << 20;

/// The server side (`pslab tcp-baseline-server`): prints `@listening ADDR`, then
/// serves one connection: a request is (op byte, size u64).
pub fn serve() -> Result<(), String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    println!("@listening {}", l.local_addr().map_err(|e| e.to_string())?);
    let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
    s.set_nodelay(true).ok();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut hdr = [0u8; 9];
        if s.read_exact(&mut hdr).is_err() {
            return Ok(()); // client done
        }
        let size = u64::from_le_bytes(hdr[1..].try_into().expect("8")) as usize;
        if hdr[0] != b'f' {
            let mut left = size;
            while left > 0 {
                let n = s.read(&mut buf[..left.min(CHUNK)]).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("client closed mid-message".into());
                }
                left -= n;
            }
        }
        if hdr[0] == b'c' {
            s.write_all(&[1u8; 8]).map_err(|e| e.to_string())?;
        } else {
            let mut left = size;
            while left > 0 {
                let n = left.min(CHUNK);
                s.write_all(&buf[..n]).map_err(|e| e.to_string())?;
                left -= n;
            }
        }
    }
}

/// The client side: runs `op` ("copy", "fetch", "exchange") with `size` bytes for
/// at least `seconds` after a warm-up; returns the latencies.
pub struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: &str) -> Result<Self, String> {
        let s = TcpStream::connect(addr).map_err(|e| format!("baseline server {addr}: {e}"))?;
        s.set_nodelay(true).ok();
        Ok(Self { s, buf: vec![7u8; CHUNK] })
    }

    fn one(&mut self, op: u8, size: usize) -> Result<(), String> {
        let e = |e: std::io::Error| e.to_string();
        let mut hdr = [0u8; 9];
        hdr[0] = op;
        hdr[1..].copy_from_slice(&(size as u64).to_le_bytes());
        self.s.write_all(&hdr).map_err(e)?;
        if op != b'f' {
            let mut left = size;
            while left > 0 {
                let n = left.min(CHUNK);
                self.s.write_all(&self.buf[..n]).map_err(e)?;
                left -= n;
            }
        }
        let mut left = if op == b'c' { 8 } else { size };
        while left > 0 {
            let n = self.s.read(&mut self.buf[..left.min(CHUNK)]).map_err(e)?;
            if n == 0 {
                return Err("baseline server closed".into());
            }
            left -= n;
        }
        Ok(())
    }

    pub fn run(
        &mut self,
        op: &str,
        size: usize,
        seconds: f64,
        warmup: f64,
    ) -> Result<(Vec<Duration>, Duration), String> {
        let code = match op {
            "copy" => b'c',
            "fetch" => b'f',
            _ => b'x',
        };
        let w = Instant::now();
        while w.elapsed().as_secs_f64() < warmup {
            self.one(code, size)?;
        }
        let mut lat = Vec::new();
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds || lat.len() < 5 {
            let t = Instant::now();
            self.one(code, size)?;
            lat.push(t.elapsed());
        }
        Ok((lat, start.elapsed()))
    }
}

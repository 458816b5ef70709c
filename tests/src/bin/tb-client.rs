//! tb-client: requests to an echo backend from inside a pod (its namespace and
//! cgroup, so per-cgroup socket load balancing applies).
//! `tb-client (--tcp|--udp) ADDR:PORT [--count N] [--timeout-ms MS]` prints one
//! JSON outcome per request (`{"Ok":{...reply...}}` or `{"Err":"..."}`).
//! Stops early after 5 failures in a row; every request has a timeout.
//! `tb-client --udp-connected ADDR:PORT --count N --interval-ms MS` keeps ONE connected UDP
//! socket and sends on it every MS milliseconds, printing each outcome as it happens; when the
//! socket fails (e.g. destroyed by the proxy because its backend went away) it prints the error
//! and connects a new socket.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tests::client::{Outcome, Proto, Reply, parse_reply_line, request_loop};

fn usage() -> ExitCode {
    eprintln!("usage: tb-client (--tcp|--udp) ADDR:PORT [--count N] [--timeout-ms MS]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut target: Option<(Proto, SocketAddr)> = None;
    let mut count = 1usize;
    let mut timeout_ms = 2000u64;
    let mut interval_ms = 0u64;
    let mut connected = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else {
            return usage();
        };
        match a.as_str() {
            "--tcp" | "--udp" => {
                let Ok(addr) = v.parse() else {
                    return usage();
                };
                let proto = if a == "--tcp" { Proto::Tcp } else { Proto::Udp };
                target = Some((proto, addr));
            }
            "--udp-connected" => {
                let Ok(addr) = v.parse() else {
                    return usage();
                };
                target = Some((Proto::Udp, addr));
                connected = true;
            }
            "--interval-ms" => match v.parse() {
                Ok(n) if n <= 10_000 => interval_ms = n,
                _ => return usage(),
            },
            "--count" => match v.parse() {
                Ok(n) if n <= 100_000 => count = n,
                _ => return usage(),
            },
            "--timeout-ms" => match v.parse() {
                Ok(n) if (1..=60_000).contains(&n) => timeout_ms = n,
                _ => return usage(),
            },
            _ => return usage(),
        }
    }
    let Some((proto, addr)) = target else {
        return usage();
    };
    if connected {
        return connected_udp(
            addr,
            count,
            Duration::from_millis(timeout_ms),
            Duration::from_millis(interval_ms),
        );
    }
    let outcomes = request_loop(proto, addr, count, Duration::from_millis(timeout_ms));
    let mut out = std::io::stdout().lock();
    for o in &outcomes {
        let line = serde_json::to_string(o).expect("outcomes serialize");
        if writeln!(out, "{line}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn connect_udp(addr: SocketAddr, timeout: Duration) -> std::io::Result<std::net::UdpSocket> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(addr)?;
    Ok(s)
}

fn udp_exchange(s: &std::net::UdpSocket) -> Outcome {
    s.send(b"hello\n").map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let (backend, client, backend_port) =
        parse_reply_line(text.trim()).map_err(|e| e.to_string())?;
    Ok(Reply {
        backend,
        client,
        backend_port,
        peer: s.peer_addr().map_err(|e| format!("getpeername: {e}"))?,
        local: s.local_addr().map_err(|e| format!("getsockname: {e}"))?,
    })
}

/// One connected UDP socket used until it fails; outcomes printed (and flushed) as they come.
fn connected_udp(
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
    interval: Duration,
) -> ExitCode {
    let mut sock = None;
    let mut out = std::io::stdout().lock();
    for _ in 0..count {
        if sock.is_none() {
            match connect_udp(addr, timeout) {
                Ok(s) => sock = Some(s),
                Err(e) => {
                    let o: Outcome = Err(format!("connect: {e}"));
                    let _ = writeln!(out, "{}", serde_json::to_string(&o).unwrap());
                    std::thread::sleep(interval);
                    continue;
                }
            }
        }
        let o = udp_exchange(sock.as_ref().unwrap());
        if o.is_err() {
            sock = None;
        }
        if writeln!(out, "{}", serde_json::to_string(&o).unwrap()).is_err() || out.flush().is_err()
        {
            return ExitCode::FAILURE;
        }
        std::thread::sleep(interval);
    }
    ExitCode::SUCCESS
}

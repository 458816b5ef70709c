//! tb-echo: a test backend. `tb-echo --name NAME [--tcp PORT]... [--udp PORT]...`
//! listens on 0.0.0.0 on every port; to every TCP connection and every UDP
//! datagram it answers one line `NAME <peer-ip>:<peer-port> <local-port>\n`
//! (then closes the connection). Runs until killed.

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

fn usage() -> ExitCode {
    eprintln!("usage: tb-echo --name NAME [--tcp PORT]... [--udp PORT]...");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut name = None;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else {
            return usage();
        };
        match a.as_str() {
            "--name" => name = Some(v),
            "--tcp" | "--udp" => {
                let Ok(p) = v.parse::<u16>() else {
                    return usage();
                };
                if a == "--tcp" { &mut tcp } else { &mut udp }.push(p);
            }
            _ => return usage(),
        }
    }
    let Some(name) = name else {
        return usage();
    };
    if tcp.is_empty() && udp.is_empty() {
        return usage();
    }

    let mut threads = Vec::new();
    for port in tcp {
        let listener = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tb-echo: bind tcp/{port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let name = name.clone();
        threads.push(thread::spawn(move || serve_tcp(&name, listener)));
    }
    for port in udp {
        let sock = match UdpSocket::bind(("0.0.0.0", port)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tb-echo: bind udp/{port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let name = name.clone();
        threads.push(thread::spawn(move || serve_udp(&name, sock)));
    }
    println!("tb-echo ready name={name}");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
    ExitCode::FAILURE
}

fn serve_tcp(name: &str, listener: TcpListener) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let (mut stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("tb-echo: accept on tcp/{port}: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let local = stream.local_addr().map(|a| a.port()).unwrap_or(port);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let line = format!("{name} {} {local}\n", fmt_peer(peer));
        if let Err(e) = stream.write_all(line.as_bytes()) {
            eprintln!("tb-echo: write to {peer}: {e}");
        }
    }
}

fn serve_udp(name: &str, sock: UdpSocket) {
    let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let line = format!("{name} {} {port}\n", fmt_peer(peer));
                if let Err(e) = sock.send_to(line.as_bytes(), peer) {
                    eprintln!("tb-echo: send to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("tb-echo: recv on udp/{port}: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `ip:port`, with IPv4-mapped IPv6 addresses shown as IPv4.
fn fmt_peer(peer: std::net::SocketAddr) -> String {
    match peer {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => format!("{v4}:{}", v6.port()),
            None => peer.to_string(),
        },
        std::net::SocketAddr::V4(_) => peer.to_string(),
    }
}

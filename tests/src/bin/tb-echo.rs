//! tb-echo: a test backend.
//! `tb-echo --name NAME [--tcp PORT]... [--udp PORT]... [--stream PORT]...`
//! listens on [::] (IPv4 and IPv6) on every port; to every TCP connection and every UDP
//! datagram it answers one line `NAME <peer-ip>:<peer-port> <local-port>\n`
//! (then closes the connection). On a `--stream` port a connection is
//! long-lived instead: every line `L` the client sends is answered with
//! `NAME L`, until the client closes, an error, or 30 s without a line.
//! Runs until killed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

fn usage() -> ExitCode {
    eprintln!("usage: tb-echo --name NAME [--tcp PORT]... [--udp PORT]... [--stream PORT]...");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut name = None;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut stream = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else {
            return usage();
        };
        match a.as_str() {
            "--name" => name = Some(v),
            "--tcp" | "--udp" | "--stream" => {
                let Ok(p) = v.parse::<u16>() else {
                    return usage();
                };
                match a.as_str() {
                    "--tcp" => &mut tcp,
                    "--udp" => &mut udp,
                    _ => &mut stream,
                }
                .push(p);
            }
            _ => return usage(),
        }
    }
    let Some(name) = name else {
        return usage();
    };
    if tcp.is_empty() && udp.is_empty() && stream.is_empty() {
        return usage();
    }

    let mut threads = Vec::new();
    for (port, long_lived) in tcp
        .iter()
        .map(|p| (*p, false))
        .chain(stream.iter().map(|p| (*p, true)))
    {
        let listener = match TcpListener::bind(("::", port)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tb-echo: bind tcp/{port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let name = name.clone();
        threads.push(thread::spawn(move || {
            if long_lived {
                serve_streams(&name, listener)
            } else {
                serve_tcp(&name, listener)
            }
        }));
    }
    for port in udp {
        let sock = match UdpSocket::bind(("::", port)) {
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

/// Accepts long-lived connections, one thread each (see [`serve_stream`]).
fn serve_streams(name: &str, listener: TcpListener) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.to_string();
                thread::spawn(move || {
                    if let Err(e) = serve_stream(&name, stream) {
                        eprintln!("tb-echo: stream from {peer} on tcp/{port}: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("tb-echo: accept on tcp/{port}: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Answers every line `L` with `NAME L` until the client closes; gives up
/// after 30 s without a line, or on any error.
fn serve_stream(name: &str, stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let _ = stream.set_nodelay(true);
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        // A line longer than this is not from a test client: stop.
        let n = (&mut reader).take(4096).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let text = line.trim_end_matches(['\r', '\n']);
        out.write_all(format!("{name} {text}\n").as_bytes())?;
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

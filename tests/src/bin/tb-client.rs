//! tb-client: requests to an echo backend from inside a pod (its namespace and
//! cgroup, so per-cgroup socket load balancing applies).
//! `tb-client (--tcp|--udp) ADDR:PORT [--count N] [--timeout-ms MS]` prints one
//! JSON outcome per request (`{"Ok":{...reply...}}` or `{"Err":"..."}`).
//! Stops early after 5 failures in a row; every request has a timeout.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tests::client::{Proto, request_loop};

fn usage() -> ExitCode {
    eprintln!("usage: tb-client (--tcp|--udp) ADDR:PORT [--count N] [--timeout-ms MS]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut target: Option<(Proto, SocketAddr)> = None;
    let mut count = 1usize;
    let mut timeout_ms = 2000u64;
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

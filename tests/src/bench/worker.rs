//! The traffic worker: `bench worker`, a process in a client pod (its network namespace and
//! cgroup, so socket LB applies to it exactly as to a pod), driven line by line over stdin:
//!
//! - `tcp ADDR COUNT MAX_MS WARMUP`: WARMUP unmeasured, then up to COUNT sequential TCP
//!   connections (connect, read the one-line reply until the server closes, close), stopping
//!   after MAX_MS; latency of each.
//! - `udp ADDR COUNT MAX_MS WARMUP`: the same with one datagram and its reply, each from a
//!   fresh socket (a new source port, a new flow: like a DNS client).
//! - `flow ADDR MAX_MS WINDOW`: UDP on one flow (one socket): WINDOW datagrams in flight, each
//!   reply answered by a new datagram, for MAX_MS; the packet rate of an established flow.
//! - `up ADDR TIMEOUT_MS NAME|-`: tries TCP requests until one is answered (by NAME if given).
//! - `down ADDR TIMEOUT_MS`: tries TCP requests until one fails.
//!
//! Each command prints one JSON line. Times are CLOCK_MONOTONIC nanoseconds, which the parent
//! shares, so `up`/`down` report when it happened and the parent subtracts its own start time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// CLOCK_MONOTONIC in nanoseconds (the same clock in every process).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One TCP request: the answering backend's name.
fn tcp_once(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    let mut buf = [0u8; 256];
    let mut len = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("reply not complete within {timeout:?}");
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    name_of(&buf[..len])
}

fn name_of(reply: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(reply).context("reply not UTF-8")?;
    match text.split_whitespace().next() {
        Some(n) => Ok(n.to_string()),
        None => bail!("empty reply"),
    }
}

fn udp_once(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"q\n", addr)?;
    let mut buf = [0u8; 256];
    let (n, _) = s.recv_from(&mut buf)?;
    name_of(&buf[..n])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn load(udp: bool, addr: SocketAddr, count: usize, max: Duration, warmup: usize) -> Value {
    let once = |t| {
        if udp {
            udp_once(addr, t)
        } else {
            tcp_once(addr, t)
        }
    };
    // TCP: long enough that a SYN retransmission (1 s) shows as latency, not as a failure.
    // UDP has no retransmission: a datagram not answered within 1 s is lost.
    let t = Duration::from_secs(if udp { 1 } else { 3 });
    for _ in 0..warmup {
        let _ = once(t);
    }
    let mut lat = Vec::with_capacity(count);
    let (mut fail, mut in_row) = (0usize, 0usize);
    let mut first_error = None;
    let mut failed_s = 0.0;
    let start = Instant::now();
    for _ in 0..count {
        if start.elapsed() >= max || in_row >= 20 {
            break;
        }
        let t0 = Instant::now();
        match once(t) {
            Ok(_) => {
                lat.push(t0.elapsed().as_secs_f64() * 1e6);
                in_row = 0;
            }
            Err(e) => {
                fail += 1;
                in_row += 1;
                failed_s += t0.elapsed().as_secs_f64();
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The time spent waiting for requests that failed is left out of the rate (failures are
    // reported on their own): one lost datagram would otherwise stand for a second of traffic.
    let busy = (elapsed - failed_s).max(1e-9);
    lat.sort_by(f64::total_cmp);
    json!({
        "ok": lat.len(),
        "fail": fail,
        "elapsed_s": elapsed,
        "rate": lat.len() as f64 / busy,
        "p50_us": percentile(&lat, 0.50),
        "p90_us": percentile(&lat, 0.90),
        "p99_us": percentile(&lat, 0.99),
        "max_us": lat.last().copied().unwrap_or(f64::NAN),
        "error": first_error,
    })
}

/// UDP request/reply on one flow with `window` requests in flight, for `max`: every reply is
/// answered by a new request at once. After 50 ms without a reply the requests in flight count
/// as lost and a new window is sent. Reports exchanges (request + reply) per second.
fn flow(addr: SocketAddr, max: Duration, window: usize) -> Result<Value> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(addr)?;
    let mut buf = [0u8; 256];
    // One exchange first, so that the flow exists and every next hop is resolved.
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send(b"q\n")?;
    s.recv(&mut buf).context("no reply to the first request")?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    let (mut got, mut lost, mut in_flight) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < max {
        if in_flight == 0 {
            for _ in 0..window {
                s.send(b"q\n")?;
            }
            in_flight = window as u64;
        }
        match s.recv(&mut buf) {
            Ok(_) => {
                got += 1;
                s.send(b"q\n")?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                lost += in_flight;
                in_flight = 0;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json!({
        "ok": got,
        "lost": lost,
        "elapsed_s": elapsed,
        "rate": got as f64 / elapsed,
    }))
}

fn poll(addr: SocketAddr, timeout: Duration, want_up: bool, expect: Option<&str>) -> Value {
    let deadline = Instant::now() + timeout;
    let mut attempts = 0u64;
    let mut last = String::new();
    while Instant::now() < deadline {
        attempts += 1;
        let r = tcp_once(addr, Duration::from_millis(200));
        let at = mono_ns();
        let done = match &r {
            Ok(name) => want_up && expect.is_none_or(|e| e == name),
            Err(_) => !want_up,
        };
        if done {
            return json!({"ok": true, "t": at, "attempts": attempts});
        }
        last = match r {
            Ok(n) => format!("answered by {n}"),
            Err(e) => format!("{e:#}"),
        };
        thread::sleep(Duration::from_micros(300));
    }
    json!({"ok": false, "attempts": attempts, "error": last})
}

fn command(line: &str) -> Result<Value> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let addr = |i: usize| -> Result<SocketAddr> {
        f.get(i)
            .context("missing address")?
            .parse()
            .context("bad address")
    };
    let num = |i: usize| -> Result<u64> {
        f.get(i)
            .context("missing number")?
            .parse()
            .context("bad number")
    };
    Ok(match f.first().copied() {
        Some(kind @ ("tcp" | "udp")) => load(
            kind == "udp",
            addr(1)?,
            num(2)? as usize,
            Duration::from_millis(num(3)?),
            num(4)? as usize,
        ),
        Some("flow") => flow(
            addr(1)?,
            Duration::from_millis(num(2)?),
            num(3)?.clamp(1, 256) as usize,
        )?,
        Some("up") => {
            let expect = f.get(3).filter(|e| **e != "-").copied();
            poll(addr(1)?, Duration::from_millis(num(2)?), true, expect)
        }
        Some("down") => poll(addr(1)?, Duration::from_millis(num(2)?), false, None),
        _ => bail!("unknown command {line:?}"),
    })
}

/// `bench worker`: serves commands until stdin closes.
pub fn main() -> Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v = command(&line).unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")}));
        writeln!(out, "{v}")?;
        out.flush()?;
    }
    Ok(())
}

/// The parent's handle on a worker process.
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<String>,
}

impl Worker {
    /// Starts `exe worker` inside `ns` (and `cgroup`, when given), dying with this thread.
    pub fn start(ns: &str, cgroup: Option<&Path>, exe: &Path, stderr_log: &Path) -> Result<Worker> {
        let nspath = tests::netns_path(ns);
        let procs = match cgroup {
            Some(cg) => Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(cg.join("cgroup.procs"))
                    .with_context(|| format!("opening {}/cgroup.procs", cg.display()))?,
            ),
            None => None,
        };
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", nspath.display()))
            .arg("--")
            .arg(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr_log)?);
        // SAFETY: only async-signal-safe calls (write, prctl) between fork and exec.
        unsafe {
            use std::os::fd::AsRawFd as _;
            cmd.pre_exec(move || {
                if let Some(f) = &procs
                    && libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting the traffic worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Worker { child, stdin, rx })
    }

    /// Sends one command and waits up to `limit` for its JSON answer.
    pub fn call(&mut self, line: &str, limit: Duration) -> Result<Value> {
        let stdin = self.stdin.as_mut().context("worker stopped")?;
        writeln!(stdin, "{line}").context("writing to the worker")?;
        stdin.flush()?;
        let deadline = Instant::now() + limit;
        let text = loop {
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(t) => break t,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    tests::check_interrupted()?;
                    if Instant::now() >= deadline {
                        bail!("worker: no answer to {line:?} within {limit:?}");
                    }
                }
                Err(e) => bail!("worker: no answer to {line:?}: {e}"),
            }
        };
        serde_json::from_str(&text).with_context(|| format!("worker printed {text:?}"))
    }

    /// Closes its stdin (it exits), waits up to 2 s, then SIGKILL by pid.
    pub fn stop(&mut self) {
        self.stdin.take();
        if tests::cmd::wait_deadline(&mut self.child, Duration::from_secs(2)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `bench udp-echo NAME ADDR:PORT...`: answers every datagram with `NAME <peer> <port>` (as
/// tb-echo does) from a socket bound to that address, so the reply's source is the address the
/// request was sent to. Runs until killed.
pub fn udp_echo(args: Vec<String>) -> Result<()> {
    let (name, addrs) = args
        .split_first()
        .context("usage: udp-echo NAME ADDR:PORT...")?;
    let mut threads = Vec::new();
    for a in addrs {
        let addr: SocketAddr = a.parse().with_context(|| format!("bad address {a}"))?;
        let sock = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        let name = name.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match sock.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        let line = format!("{name} {peer} {}\n", addr.port());
                        let _ = sock.send_to(line.as_bytes(), peer);
                    }
                    Err(e) => {
                        eprintln!("udp-echo {addr}: {e}");
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }));
    }
    println!("udp-echo ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

//! Clients of the echo backends: one TCP connection or UDP exchange per
//! request, the reply parsed into who answered and what each side saw.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::netns::in_netns;

/// Transport protocol of a request or Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// Kubernetes spelling: `TCP` / `UDP`.
    pub fn k8s(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    /// `tb-client` flag: `--tcp` / `--udp`.
    pub fn flag(self) -> &'static str {
        match self {
            Proto::Tcp => "--tcp",
            Proto::Udp => "--udp",
        }
    }
}

/// One answered request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Name of the backend that answered (tb-echo `--name`).
    pub backend: String,
    /// The client's address as the backend saw it (source of the request).
    pub client: SocketAddr,
    /// The port the backend received the request on.
    pub backend_port: u16,
    /// The client's view of its peer: `getpeername` for TCP, the source of the
    /// reply datagram for UDP. The dialled address when the proxy is right.
    pub peer: SocketAddr,
    /// The client socket's own address.
    pub local: SocketAddr,
}

/// A request's result; the error says what went wrong.
pub type Outcome = std::result::Result<Reply, String>;

/// Parses `NAME <peer-ip>:<peer-port> <local-port>` as written by tb-echo.
pub fn parse_reply_line(line: &str) -> Result<(String, SocketAddr, u16)> {
    let mut it = line.split_whitespace();
    let (Some(name), Some(peer), Some(port), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        bail!("malformed reply {line:?}");
    };
    let peer: SocketAddr = peer
        .parse()
        .with_context(|| format!("bad peer in reply {line:?}"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("bad port in reply {line:?}"))?;
    Ok((name.to_string(), peer, port))
}

/// One TCP connection to `addr` from the calling thread's network namespace:
/// connect, read the reply line until the server closes, all within `timeout`.
pub fn tcp_request(addr: SocketAddr, timeout: Duration) -> Result<Reply> {
    let deadline = Instant::now() + timeout;
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    let peer = s.peer_addr()?;
    let local = s.local_addr()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("reply from {addr} not complete within {timeout:?}");
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 4096 {
                    bail!("reply from {addr} too long");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading reply from {addr}")),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let (backend, client, backend_port) = parse_reply_line(text.trim())?;
    Ok(Reply {
        backend,
        client,
        backend_port,
        peer,
        local,
    })
}

/// One UDP request/reply with `addr` from a fresh, unconnected socket (so every
/// request is a new flow, and replies from any source are seen).
pub fn udp_request(addr: SocketAddr, timeout: Duration) -> Result<Reply> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"hello\n", addr)
        .with_context(|| format!("send to {addr}"))?;
    let local = s.local_addr()?;
    let mut buf = [0u8; 2048];
    let (n, peer) = s
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP reply from {addr} within {timeout:?}"))?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let (backend, client, backend_port) = parse_reply_line(text.trim())?;
    Ok(Reply {
        backend,
        client,
        backend_port,
        peer,
        local,
    })
}

/// A long-lived connection to a tb-echo `--stream` port: each line sent comes
/// back as `NAME line`. Connect from inside the client's network namespace
/// (e.g. in [`in_netns`]); the connection can then be used from any thread.
pub struct EchoStream {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// Backend that answered the first line.
    pub backend: String,
    /// The client's view of its peer (the dialled address when the proxy is right).
    pub peer: SocketAddr,
    /// The client socket's own address.
    pub local: SocketAddr,
}

impl EchoStream {
    /// Connects to `addr` and exchanges a first line to learn the backend.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<EchoStream> {
        let s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect to {addr}"))?;
        let _ = s.set_nodelay(true);
        s.set_write_timeout(Some(timeout))?;
        let peer = s.peer_addr()?;
        let local = s.local_addr()?;
        let mut es = EchoStream {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            backend: String::new(),
            peer,
            local,
        };
        let (backend, _) = es.exchange_raw("hello", timeout)?;
        es.backend = backend;
        Ok(es)
    }

    /// Sends `line` and waits up to `timeout` for its echo; fails on a timeout,
    /// a closed or reset connection, a wrong echo, or a different backend than
    /// the one that answered first.
    pub fn exchange(&mut self, line: &str, timeout: Duration) -> Result<()> {
        let (backend, _) = self.exchange_raw(line, timeout)?;
        if backend != self.backend {
            bail!(
                "stream {} -> {}: answered by {backend}, was {}",
                self.local,
                self.peer,
                self.backend
            );
        }
        Ok(())
    }

    fn exchange_raw(&mut self, line: &str, timeout: Duration) -> Result<(String, String)> {
        let ctx = || format!("stream {} -> {}", self.local, self.peer);
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .with_context(ctx)?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .with_context(ctx)?;
        let mut reply = String::new();
        let n = (&mut self.reader)
            .take(4096)
            .read_line(&mut reply)
            .with_context(ctx)?;
        if n == 0 || !reply.ends_with('\n') {
            bail!("{}: closed by the peer (got {reply:?})", ctx());
        }
        let Some((backend, echoed)) = reply.trim_end().split_once(' ') else {
            bail!("{}: malformed echo {reply:?}", ctx());
        };
        if echoed != line {
            bail!("{}: sent {line:?}, echo {reply:?}", ctx());
        }
        Ok((backend.to_string(), echoed.to_string()))
    }
}

/// A plain HTTP/1.1 response: status code, headers (names lowercased), body.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.1 from the calling thread's network namespace, with
/// `Connection: close`; reads until the server closes, all within `timeout`.
/// Enough for the agent's /metrics and /healthz; not a general HTTP client.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    http_request(addr, "GET", path, timeout)
}

/// Like [`http_get`] with any method (the body of the response is read until
/// the server closes; a HEAD response has none).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("sending {method} {path} to {addr}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{method} {path} to {addr}: response not complete within {timeout:?}");
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 16 << 20 {
                    bail!("{method} {path} to {addr}: response larger than 16 MiB");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("{method} {path} to {addr}")),
        }
    }
    let text = String::from_utf8(buf).with_context(|| format!("{method} {path}: not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path} to {addr}: no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("{method} {path} to {addr}: bad status line {status_line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("{method} {path} to {addr}: bad status line {status_line:?}");
    }
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `count` requests from the calling thread's namespace, one after another.
/// Stops early (the rest recorded as not attempted) after 5 failures in a row,
/// when an overall time limit passes, or on interrupt, so a broken proxy costs
/// seconds, not minutes.
pub fn request_loop(
    proto: Proto,
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Vec<Outcome> {
    let start = Instant::now();
    let limit = timeout * 5 + Duration::from_millis(20) * count as u32 + Duration::from_secs(10);
    let mut out = Vec::with_capacity(count);
    let mut failures_in_row = 0;
    for _ in 0..count {
        if failures_in_row >= 5 {
            out.push(Err("not attempted: 5 failures in a row".to_string()));
            continue;
        }
        if start.elapsed() > limit {
            out.push(Err(format!("not attempted: time limit {limit:?} passed")));
            continue;
        }
        if crate::interrupted() {
            out.push(Err("not attempted: interrupted".to_string()));
            continue;
        }
        let r = match proto {
            Proto::Tcp => tcp_request(addr, timeout),
            Proto::Udp => udp_request(addr, timeout),
        };
        match r {
            Ok(reply) => {
                failures_in_row = 0;
                out.push(Ok(reply));
            }
            Err(e) => {
                failures_in_row += 1;
                out.push(Err(format!("{e:#}")));
            }
        }
    }
    out
}

/// [`request_loop`] over TCP from a thread inside network namespace `ns`.
pub fn tcp_requests(
    ns: &str,
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Outcome>> {
    in_netns(ns, || request_loop(Proto::Tcp, addr, count, timeout))
}

/// [`request_loop`] over UDP from a thread inside network namespace `ns`.
pub fn udp_requests(
    ns: &str,
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Outcome>> {
    in_netns(ns, || request_loop(Proto::Udp, addr, count, timeout))
}

/// Parses tb-client's output: one JSON [`Outcome`] per line.
pub fn parse_client_output(text: &str) -> Result<Vec<Outcome>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad tb-client line {l:?}")))
        .collect()
}

/// Summary of a batch of requests.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Answered requests per backend name.
    pub per_backend: BTreeMap<String, usize>,
    /// Answered requests per (backend name, backend port).
    pub per_backend_port: BTreeMap<(String, u16), usize>,
    /// Number of answered requests.
    pub ok: usize,
    /// Error of every failed request.
    pub failures: Vec<String>,
}

impl Tally {
    pub fn new(outcomes: &[Outcome]) -> Tally {
        let mut t = Tally::default();
        for o in outcomes {
            match o {
                Ok(r) => {
                    t.ok += 1;
                    *t.per_backend.entry(r.backend.clone()).or_default() += 1;
                    *t.per_backend_port
                        .entry((r.backend.clone(), r.backend_port))
                        .or_default() += 1;
                }
                Err(e) => t.failures.push(e.clone()),
            }
        }
        t
    }

    /// Total number of requests.
    pub fn total(&self) -> usize {
        self.ok + self.failures.len()
    }

    /// Fails unless every request was answered.
    pub fn expect_no_failures(&self) -> Result<()> {
        if !self.failures.is_empty() {
            let mut shown: Vec<&str> = self.failures.iter().map(String::as_str).take(5).collect();
            shown.dedup();
            bail!(
                "{} of {} requests failed, e.g.: {}",
                self.failures.len(),
                self.total(),
                shown.join(" | ")
            );
        }
        Ok(())
    }

    /// Fails unless exactly `backends` answered and each got at least
    /// `min_share` of its fair share (`ok / backends.len()`).
    pub fn expect_spread(&self, backends: &[&str], min_share: f64) -> Result<()> {
        let got: Vec<&str> = self.per_backend.keys().map(String::as_str).collect();
        let mut want: Vec<&str> = backends.to_vec();
        want.sort();
        if got != want {
            bail!("answering backends {got:?}, expected exactly {want:?} ({self})");
        }
        let fair = self.ok as f64 / backends.len() as f64;
        for (b, n) in &self.per_backend {
            if (*n as f64) < fair * min_share {
                bail!(
                    "backend {b} got {n}, less than {min_share} of the fair share {fair:.1} ({self})"
                );
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ok {} failed {}:", self.ok, self.failures.len())?;
        for (b, n) in &self.per_backend {
            write!(f, " {b}={n}")?;
        }
        Ok(())
    }
}

//! bench: proxy-agent side by side with kube-proxy's iptables and nftables modes, on one
//! machine, in one run; writes BENCHMARKS.md. Run it through `cargo xtask bench` (release
//! build, packages installed); `BENCH_QUICK=1` for a short development run.
//!
//! Every mode gets its own small bed (a 2-node emulated cluster from `tests::TestBed`): on node1
//! a client pod, a backend pod A with nine addresses (tb-echo on tcp/8080 and udp/5353, iperf3
//! on 5201), a backend pod B, and the "node" namespace between them where the rules or the agent
//! live; on node2 (no proxy) backend pod C, the endpoints of a NodePort Service that the bed's
//! external client reaches through node1. The same N Services (3 endpoints each) are programmed
//! in every mode; only the first, the last and the NodePort Service carry traffic, the others
//! have endpoints that never do. Modes are interleaved over rounds and medians reported. See
//! BENCHMARKS.md for the method in full.

#[path = "../bench/kube_rules.rs"]
mod kube_rules;
#[path = "../bench/progrun.rs"]
mod progrun;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/worker.rs"]
mod worker;
#[path = "../bench/workload.rs"]
mod workload;

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube_rules::IptSync;
use report::{Cell, Mode, Results, Unit, V, fmt_cell, fmt_ratio, table};
use tests::{Agent, Pod, TestBed, cmd};
use worker::{Worker, mono_ns};
use workload::{
    Backends, DNS_TARGET, HTTP_TARGET, IPERF_PORT, NODEPORT_TCP, NODEPORT_UDP, SERVICE_CIDRS, Svc,
};

/// Addresses the bed gives the pods (the first three pods on node1).
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const A0: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 3);
const B0: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 4);
/// Backend pod C, the first pod on node2.
const C0: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);

/// Pod A's addresses: the first, the last and the added Service get three each; pod C's three
/// are the NodePort Service's endpoints.
fn backends() -> Backends {
    let a = |k: u8| Ipv4Addr::new(198, 19, 1, k);
    let c = |k: u8| Ipv4Addr::new(198, 19, 2, k);
    Backends {
        first: [A0, a(200), a(201)],
        last: [a(202), a(203), a(204)],
        added: [a(205), a(206), a(207)],
        b: B0,
        remote: [C0, c(200), c(201)],
    }
}
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Made-up external clients of the per-packet NodePort measurement, routed by node1 via the
/// bed's external client (so the XDP program's FIB lookup finds a next hop for the replies).
const TEST_EXT_CLIENTS: &str = "198.18.16.0/20";

/// NodePort flows' conntrack entries idle this long are deleted from the agents' maps after
/// each NodePort measurement: longer than the endpoints' TIME_WAIT (60 s), see
/// [`progrun::delete_idle_node_port_flows`].
const CT_IDLE: Duration = Duration::from_secs(65);

/// Flags every agent runs with (besides the bed's own).
const AGENT_FLAGS: [&str; 8] = [
    "--poll-interval-ms",
    "10",
    "--map-size-services",
    "131072",
    "--map-size-backends",
    "524288",
    // NodePorts on node1's IPv4 LAN address only, as kube-proxy's IPv4 rules here serve them.
    "--nodeport-addresses",
    "198.18.0.0/24",
];

/// Whole-run budget: later phases are cut when it runs out.
const BUDGET: Duration = Duration::from_secs(19 * 60);

struct Config {
    quick: bool,
    sizes: Vec<usize>,
    rounds: usize,
    /// Programming time only, at this size.
    big: Option<usize>,
    big_rounds: usize,
    tcp_count: usize,
    udp_count: usize,
    /// Requests per NodePort measurement (TCP connections, UDP requests). Each is a flow whose
    /// SNAT port the agents hold for at least `CT_IDLE`: with three endpoints of 4,536 ports
    /// each, a few measurements' flows must fit with room to spare (a new flow gives up after
    /// 8 taken ports).
    np_count: usize,
    /// Length of the one-flow NodePort packet-rate measurement, and its requests in flight.
    np_flow_ms: u64,
    np_flow_window: usize,
    traffic_ms: u64,
    iperf_secs: u32,
    prog_calls: usize,
    /// Calls per packet kind of the NodePort XDP / tc per-packet measurement.
    np_prog_calls: usize,
    /// Time limit of a full load at >= 10,000 Services for the userspace-bound
    /// iptables-nft-restore (it can be killed early).
    ipt_nft_limit: Duration,
    /// Time limit of every other anchor command.
    limit: Duration,
    /// Above 10,000 Services: time limits of the agent's full load and of each later change.
    big_load_limit: Duration,
    big_op_limit: Duration,
    /// Above 10,000 Services: time limit of an anchor's full load.
    big_anchor_limit: Duration,
    out: PathBuf,
}

impl Config {
    fn from_env() -> Config {
        let mut c = Self::defaults();
        // Development knobs: BENCH_SIZES=10,1000 (sizes with traffic), BENCH_BIG=100000
        // (programming only; 0 for none), BENCH_ROUNDS=2.
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        if let Ok(v) = std::env::var("BENCH_SIZES") {
            c.sizes = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        }
        if let Some(b) = num("BENCH_BIG") {
            c.big = (b > 0).then_some(b);
        }
        if let Some(r) = num("BENCH_ROUNDS") {
            c.rounds = r.max(1);
            c.big_rounds = r.max(1);
        }
        c
    }

    fn defaults() -> Config {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
        let out = std::env::var_os("BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("BENCHMARKS.md"));
        if quick {
            Config {
                quick,
                sizes: vec![10, 1000],
                rounds: 1,
                big: None,
                big_rounds: 0,
                tcp_count: 1000,
                udp_count: 1000,
                np_count: 300,
                np_flow_ms: 500,
                np_flow_window: 16,
                traffic_ms: 3000,
                iperf_secs: 2,
                prog_calls: 5000,
                np_prog_calls: 2000,
                ipt_nft_limit: Duration::from_secs(60),
                limit: Duration::from_secs(180),
                big_load_limit: Duration::from_secs(150),
                big_op_limit: Duration::from_secs(60),
                big_anchor_limit: Duration::from_secs(240),
                out,
            }
        } else {
            Config {
                quick,
                sizes: vec![10, 1000, 10_000],
                rounds: 3,
                big: Some(100_000),
                big_rounds: 3,
                tcp_count: 2000,
                udp_count: 2000,
                np_count: 500,
                np_flow_ms: 1000,
                np_flow_window: 16,
                traffic_ms: 5000,
                iperf_secs: 3,
                prog_calls: 20_000,
                np_prog_calls: 10_000,
                ipt_nft_limit: Duration::from_secs(60),
                limit: Duration::from_secs(180),
                big_load_limit: Duration::from_secs(150),
                big_op_limit: Duration::from_secs(60),
                big_anchor_limit: Duration::from_secs(240),
                out,
            }
        }
    }
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("udp-echo") {
        return match worker::udp_echo(std::env::args().skip(2).collect()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench udp-echo: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return match worker::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench worker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn log(msg: impl AsRef<str>) {
    println!("[bench] {}", msg.as_ref());
}

// ---------------------------------------------------------------------------------------------
// One mode's bed.

struct ModeBed {
    mode: Mode,
    // Dropped before the bed: the worker must leave the pod's cgroup before it is removed.
    worker: Worker,
    /// The same in the bed's external client namespace (NodePort traffic).
    ext_worker: Worker,
    agent: Option<Agent>,
    client: Pod,
    node_ns: String,
    manifests: PathBuf,
    /// N of the Services currently programmed (None: none, or unknown).
    loaded: Option<usize>,
    /// The agent's manifests: the stage directory now shown as `svcs`.
    agent_stage: Option<usize>,
    /// Keep the first full load of this N for the later rounds (it takes too long to repeat).
    keep: Option<usize>,
    /// The agent was stopped (an operation went over its time limit), and why.
    dead: Option<String>,
    /// N at which a full load went over its limit and left nothing loaded: not retried.
    gave_up: Option<usize>,
    bed: TestBed,
}

fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    cmd::run_ok(
        Command::new("nsenter")
            .arg(format!("--net={}", tests::netns_path(ns).display()))
            .args(["--", "sysctl", "-qw"])
            .args(settings),
        cmd::SHORT,
    )?;
    Ok(())
}

/// The MAC address of `dev` in namespace `ns`.
fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = cmd::ip(&["-n", ns, "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["address"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("no MAC address of {dev} in {ns}: {out}"))
}

/// `bench udp-echo` in `pod` on port 5353 of each of `addrs`, waiting until it is ready.
fn start_udp_echo(bed: &mut TestBed, pod: &Pod, exe: &Path, addrs: &[Ipv4Addr]) -> Result<()> {
    // UDP replies must leave from the address the request went to (tb-echo binds 0.0.0.0, so
    // its replies would leave from the pod's first address): one socket per address.
    let mut args = vec!["udp-echo".to_string(), pod.name.clone()];
    args.extend(addrs.iter().map(|ip| sa(*ip, DNS_TARGET).to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let udp = bed.spawn_in_pod(pod, &exe.to_string_lossy(), &args)?;
    let udp_log = bed.log_of(udp).context("udp-echo log")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(&udp_log)
        .unwrap_or_default()
        .contains("ready")
    {
        ensure!(
            Instant::now() < deadline && bed.is_running(udp),
            "udp-echo did not start: {}",
            fs::read_to_string(&udp_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn setup_bed(mode: Mode, exe: &Path) -> Result<ModeBed> {
    let mut bed = TestBed::new(2)?;
    let client = bed.add_pod(1, "client")?;
    let a = bed.add_pod(1, "be-a")?;
    let b = bed.add_pod(1, "be-b")?;
    let c = bed.add_pod(2, "be-c")?;
    ensure!(
        (client.ip, a.ip, b.ip, c.ip) == (CLIENT_IP, A0, B0, C0),
        "unexpected pod addresses {} {} {} {}",
        client.ip,
        a.ip,
        b.ip,
        c.ip
    );
    let node_ns = bed.node(1).ns.clone();
    let node2_ns = bed.node(2).ns.clone();
    let ext_ns = bed.ext_ns().to_string();
    // Pod A answers on nine addresses: the endpoints of the exercised Services; pod C on node2
    // on three: the NodePort Service's.
    let be = backends();
    for extra in be.first[1..].iter().chain(&be.last).chain(&be.added) {
        let cidr = format!("{extra}/32");
        cmd::ip(&["-n", &a.ns, "addr", "add", &cidr, "dev", "eth0"])?;
        cmd::ip(&["-n", &node_ns, "route", "add", &cidr, "dev", &a.host_if])?;
    }
    for extra in &be.remote[1..] {
        let cidr = format!("{extra}/32");
        cmd::ip(&["-n", &c.ns, "addr", "add", &cidr, "dev", "eth0"])?;
        cmd::ip(&["-n", &node2_ns, "route", "add", &cidr, "dev", &c.host_if])?;
    }
    // node1's next hops on the LAN are fixed (the real MACs): the XDP program's FIB lookup
    // needs a resolved neighbour, also in the per-packet measurement long after any traffic.
    for (ip, ns) in [(NODE2_IP, &node2_ns), (tests::EXT_IP, &ext_ns)] {
        let mac = mac_of(ns, "lan0")?;
        cmd::ip(&[
            "-n",
            &node_ns,
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            "lan0",
            "nud",
            "permanent",
        ])?;
    }
    cmd::ip(&[
        "-n",
        &node_ns,
        "route",
        "add",
        TEST_EXT_CLIENTS,
        "via",
        &tests::EXT_IP.to_string(),
        "dev",
        "lan0",
    ])?;
    // The external client and node2 share the LAN with node1, which forwards between them on
    // the same interface: no ICMP redirects, or the client would learn to bypass node1 (the
    // no-proxy floor).
    sysctl(
        &node_ns,
        &[
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.lan0.send_redirects=0",
        ],
    )?;
    if mode == Mode::NoProxy {
        // The floor of the NodePort measurement: node1 forwards between the client and pod C
        // both ways, without any translation.
        cmd::ip(&[
            "-n",
            &ext_ns,
            "route",
            "replace",
            "198.19.2.0/24",
            "via",
            &NODE_IP.to_string(),
        ])?;
        cmd::ip(&[
            "-n",
            &node2_ns,
            "route",
            "add",
            &format!("{}/32", tests::EXT_IP),
            "via",
            &NODE_IP.to_string(),
        ])?;
    }
    // Service addresses are local to the node: a connection to a VIP that nothing translates
    // is refused at once (RST; ICMP errors would be rate-limited), so "is it programmed yet?"
    // is answered without timeouts. The tc path's reverse-translated replies then carry a
    // local source address, which the node must accept (`accept_local`, set for every mode).
    for cidr in SERVICE_CIDRS {
        cmd::ip(&["-n", &node_ns, "route", "add", "local", cidr, "dev", "lo"])?;
    }
    sysctl(&node_ns, &["net.ipv4.conf.all.accept_local=1"])?;
    // Many short connections from one client: a wide port range and TIME_WAIT reuse.
    sysctl(
        &client.ns,
        &[
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    )?;
    bed.start_echo(&a, &[HTTP_TARGET], &[])?;
    bed.start_echo(&b, &[HTTP_TARGET], &[])?;
    bed.start_echo(&c, &[HTTP_TARGET], &[])?;
    let a_addrs: Vec<Ipv4Addr> = be
        .first
        .iter()
        .chain(&be.last)
        .chain(&be.added)
        .copied()
        .collect();
    start_udp_echo(&mut bed, &a, exe, &a_addrs)?;
    start_udp_echo(&mut bed, &c, exe, &be.remote)?;
    let iperf = bed.spawn_in_pod(&a, "iperf3", &["-s", "-p", &IPERF_PORT.to_string()])?;
    let log = bed.dir().join(format!("worker-{}.log", mode.short()));
    let worker = Worker::start(&client.ns, client.cgroup.as_deref(), exe, &log)?;
    let log = bed.dir().join(format!("ext-worker-{}.log", mode.short()));
    let ext_worker = Worker::start(&ext_ns, None, exe, &log)?;
    let manifests = bed.manifests_dir().to_path_buf();
    let mut mb = ModeBed {
        mode,
        worker,
        ext_worker,
        agent: None,
        client,
        node_ns,
        manifests,
        loaded: None,
        agent_stage: None,
        keep: None,
        dead: None,
        gave_up: None,
        bed,
    };
    match mode {
        Mode::SockLb | Mode::Tc => {
            let mut args: Vec<&str> = AGENT_FLAGS.to_vec();
            // The socket-LB agent keeps the default `--xdp auto` (generic XDP on the bed's
            // veths), so its NodePort traffic takes the XDP path; the tc agent runs without
            // XDP, so its NodePort traffic takes the tc path.
            if mode == Mode::Tc {
                args.extend(["--socket-lb=false", "--xdp=off"]);
            }
            let dir = mb.manifests.clone();
            let agent = mb.bed.start_agent_with(1, &dir, &args)?;
            agent.wait_for_sync(1, Duration::from_secs(60))?;
            mb.agent = Some(agent);
        }
        Mode::IptNft | Mode::IptLegacy => {
            let base = mb.bed.dir().join("ipt-base.txt");
            fs::write(&base, kube_rules::ipt_base())?;
            let restore = ipt_bin(mode, "restore");
            mb.run(&restore, &[&base.to_string_lossy()], cmd::SHORT)?;
        }
        Mode::NoProxy | Mode::Nft => {}
        Mode::Xdp => bail!("XDP has no bed of its own"),
    }
    std::thread::sleep(Duration::from_millis(300));
    ensure!(mb.bed.is_running(iperf), "iperf3 -s exited in {}", a.ns);
    Ok(mb)
}

fn ipt_bin(mode: Mode, what: &str) -> String {
    let backend = if mode == Mode::IptNft {
        "nft"
    } else {
        "legacy"
    };
    format!("iptables-{backend}-{what}")
}

/// How a timed command ended.
enum Timed {
    Done(f64),
    Over(f64),
}

impl ModeBed {
    /// Runs a command in the node namespace; fails on a non-zero exit.
    fn run(&self, prog: &str, args: &[&str], limit: Duration) -> Result<String> {
        let mut c = self.bed.command_in(&self.node_ns, None, prog, args)?;
        cmd::run_ok(&mut c, limit)
    }

    /// Runs commands one after another under one time limit.
    fn timed(&self, steps: &[(String, Vec<String>)], limit: Duration) -> Result<Timed> {
        let start = Instant::now();
        for (prog, args) in steps {
            let left = limit.saturating_sub(start.elapsed());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = self.run(prog, &args, left.max(Duration::from_millis(1))) {
                if start.elapsed() >= limit {
                    return Ok(Timed::Over(limit.as_secs_f64()));
                }
                return Err(e);
            }
        }
        Ok(Timed::Done(start.elapsed().as_secs_f64()))
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent mode")
    }

    fn up(&mut self, addr: SocketAddr, limit: Duration, expect: Option<&str>) -> Result<u64> {
        let line = format!("up {addr} {} {}", limit.as_millis(), expect.unwrap_or("-"));
        let v = self.worker.call(&line, limit + Duration::from_secs(10))?;
        ensure!(
            v["ok"] == true,
            "{addr} did not answer{} within {limit:?}: {}",
            expect.map(|e| format!(" from {e}")).unwrap_or_default(),
            v["error"]
        );
        v["t"].as_u64().context("no time in the worker's answer")
    }

    /// Like [`ModeBed::up`] / [`ModeBed::down`], but `None` when it does not happen in time.
    fn answer_within(
        &mut self,
        up: bool,
        addr: SocketAddr,
        limit: Duration,
        expect: Option<&str>,
    ) -> Result<Option<u64>> {
        let line = if up {
            format!("up {addr} {} {}", limit.as_millis(), expect.unwrap_or("-"))
        } else {
            format!("down {addr} {}", limit.as_millis())
        };
        let v = self.worker.call(&line, limit + Duration::from_secs(10))?;
        if v["ok"] != true {
            return Ok(None);
        }
        v["t"]
            .as_u64()
            .context("no time in the worker's answer")
            .map(Some)
    }

    fn down(&mut self, addr: SocketAddr, limit: Duration) -> Result<u64> {
        let line = format!("down {addr} {}", limit.as_millis());
        let v = self.worker.call(&line, limit + Duration::from_secs(10))?;
        ensure!(v["ok"] == true, "{addr} still answers after {limit:?}");
        v["t"].as_u64().context("no time in the worker's answer")
    }
}

// ---------------------------------------------------------------------------------------------
// The agent: sync lines, CPU and memory.

#[derive(Clone, Copy, Debug)]
struct SyncLine {
    generation: u64,
    services: u64,
    elapsed_us: u64,
}

fn sync_lines(log: &str) -> Vec<SyncLine> {
    log.lines()
        .filter(|l| l.contains("sync complete"))
        .filter_map(|l| {
            let field = |k: &str| -> Option<u64> {
                l.split_whitespace()
                    .find_map(|t| t.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| v.trim_matches('"').parse().ok())
            };
            Some(SyncLine {
                generation: field("generation")?,
                services: field("services")?,
                elapsed_us: field("elapsed_us").unwrap_or(0),
            })
        })
        .collect()
}

fn last_generation(agent: &Agent) -> u64 {
    sync_lines(&agent.log_text())
        .iter()
        .map(|s| s.generation)
        .max()
        .unwrap_or(0)
}

/// [`wait_sync`], but `None` when it does not come within `limit`.
fn wait_sync_within(
    agent: &Agent,
    after: u64,
    services: usize,
    limit: Duration,
) -> Result<Option<SyncLine>> {
    match wait_sync(agent, after, services, limit) {
        Ok(s) => Ok(Some(s)),
        Err(_) if agent.is_running() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits for a `sync complete` after generation `after` with `services` frontends.
fn wait_sync(agent: &Agent, after: u64, services: usize, limit: Duration) -> Result<SyncLine> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = sync_lines(&agent.log_text())
            .into_iter()
            .find(|s| s.generation > after && s.services == services as u64)
        {
            return Ok(s);
        }
        ensure!(agent.is_running(), "agent exited: {}", agent.log_tail(20));
        if Instant::now() >= deadline {
            bail!(
                "agent: no sync with {services} services after generation {after} within {limit:?}; log:\n{}",
                agent.log_tail(10)
            );
        }
        tests::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// CPU time of a process (all its threads, user and system), in seconds: the first field of
/// every thread's schedstat, in nanoseconds (stat's clock ticks are too coarse).
fn cpu_secs(pid: u32) -> f64 {
    let mut ns = 0u64;
    for e in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// (VmRSS, VmHWM) in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |k| k / 1024.0)
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// Kernel memory charged for the BPF maps a process holds (fdinfo `memlock`), in MiB.
fn map_memory_mib(pid: u32) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = fs::read_to_string(e.path()).unwrap_or_default();
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(mem)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += mem;
        }
    }
    total as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------------------------
// One size N: the Services, and the inputs of every mode.

struct Size {
    n: usize,
    svcs: Vec<Svc>,
    /// The Service "add one" adds, and the same after "change one endpoint".
    added: Svc,
    changed: Svc,
    frontends: usize,
    large: bool,
    dir: PathBuf,
    /// Traffic is measured (false: programming time only).
    traffic: bool,
}

impl Size {
    fn new(n: usize, work: &Path, traffic: bool) -> Result<Size> {
        let be = backends();
        let svcs = workload::services(n, &be);
        let added = workload::added(n, &be, false);
        let changed = workload::added(n, &be, true);
        let frontends = workload::frontends(&svcs);
        let dir = work.join(format!("n{n}"));
        fs::create_dir_all(&dir)?;
        let large = kube_rules::large_cluster(3 * frontends);
        Ok(Size {
            n,
            svcs,
            added,
            changed,
            frontends,
            large,
            dir,
            traffic,
        })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes the iptables and nftables inputs of every operation.
    fn write_rules(&self, modes: &[Mode]) -> Result<()> {
        if modes.contains(&Mode::IptNft) || modes.contains(&Mode::IptLegacy) {
            self.write_ipt()?;
        }
        if modes.contains(&Mode::Nft) {
            self.write_nft()?;
        }
        Ok(())
    }

    fn write_ipt(&self) -> Result<()> {
        let all: Vec<&Svc> = self.svcs.iter().collect();
        fs::write(
            self.file("ipt-full.txt"),
            kube_rules::ipt_restore(&IptSync::new(&self.svcs, &all, vec![])),
        )?;
        let mut with_added = self.svcs.clone();
        with_added.push(self.added.clone());
        let added = [&self.added];
        fs::write(
            self.file("ipt-add.txt"),
            kube_rules::ipt_restore(&IptSync::new(&with_added, &added, vec![])),
        )?;
        // Below 1,000 endpoints kube-proxy reads the table (iptables-save) on every sync and
        // deletes chains no longer used at once; above, only once per sync period.
        let stale = |old: &Svc, new: Option<&Svc>| -> Vec<String> {
            if self.large {
                return vec![];
            }
            let keep = new.map(kube_rules::ipt_chains).unwrap_or_default();
            kube_rules::ipt_chains(old)
                .into_iter()
                .filter(|c| !keep.contains(c))
                .collect()
        };
        let mut with_changed = self.svcs.clone();
        with_changed.push(self.changed.clone());
        let changed = [&self.changed];
        fs::write(
            self.file("ipt-change.txt"),
            kube_rules::ipt_restore(&IptSync::new(
                &with_changed,
                &changed,
                stale(&self.added, Some(&self.changed)),
            )),
        )?;
        fs::write(
            self.file("ipt-delete.txt"),
            kube_rules::ipt_restore(&IptSync::new(&self.svcs, &[], stale(&self.changed, None))),
        )?;
        Ok(())
    }

    fn write_nft(&self) -> Result<()> {
        fs::write(
            self.file("nft-full.nft"),
            kube_rules::nft_full(NODE_IP, &self.svcs),
        )?;
        fs::write(self.file("nft-add.nft"), kube_rules::nft_add(&self.added))?;
        fs::write(
            self.file("nft-change.nft"),
            kube_rules::nft_change(&self.added, &self.changed),
        )?;
        fs::write(
            self.file("nft-delete.nft"),
            kube_rules::nft_delete(&self.changed),
        )?;
        Ok(())
    }

    fn first(&self) -> Ipv4Addr {
        self.svcs[0].vip
    }

    fn last(&self) -> Ipv4Addr {
        self.svcs[self.n - 1].vip
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

// ---------------------------------------------------------------------------------------------
// Measurements.

struct Bench {
    cfg: Config,
    res: Results,
    started: Instant,
    work: PathBuf,
    /// Source addresses for BPF_PROG_TEST_RUN flows, one per measurement.
    test_clients: u32,
}

impl Bench {
    fn budget_left(&self) -> Duration {
        BUDGET.saturating_sub(self.started.elapsed())
    }

    fn note(&mut self, s: String) {
        let mut s = s.replace('\n', " ");
        if s.len() > 400 {
            s.truncate(s.floor_char_boundary(400));
            s.push('…');
        }
        log(&s);
        self.res.notes.push(s);
    }

    fn add(&mut self, n: usize, mode: Mode, metric: &'static str, v: V) {
        self.res.add(n, mode, metric, v);
    }

    /// Time limit of an agent operation: generous up to 10,000 Services, budgeted above.
    fn agent_limit(&self, n: usize, full: bool) -> Duration {
        match (n > 10_000, full) {
            (false, _) => Duration::from_secs(600),
            (true, true) => self.cfg.big_load_limit,
            (true, false) => self.cfg.big_op_limit,
        }
    }

    /// An agent operation went over its limit: SIGKILL the agent (a sync cannot be cut short,
    /// and one still running would load the CPU under the other modes' measurements), record
    /// the operations that follow as skipped, and leave the mode out of later rounds.
    fn abandon_agent(
        &mut self,
        mb: &mut ModeBed,
        n: usize,
        what: &str,
        limit: Duration,
        rest: &[&str],
    ) -> Result<()> {
        let why = format!(
            "agent stopped after its {what} took over {:.0} s",
            limit.as_secs_f64()
        );
        let pid = mb.agent().pid;
        mb.bed.kill_with(
            pid,
            nix::sys::signal::Signal::SIGKILL,
            Duration::from_secs(10),
        )?;
        for op in rest {
            let (m, m_cmd) = match *op {
                "add" => ("add", "add_cmd"),
                "change" => ("change", "change_cmd"),
                _ => ("delete", "delete_cmd"),
            };
            self.add(n, mb.mode, m, V::Skip(why.clone()));
            self.add(n, mb.mode, m_cmd, V::Skip(why.clone()));
        }
        self.note(format!(
            "{} at {} Services: its {what} was not done within {:.0} s; the agent was stopped (SIGKILL) to stay within the budget",
            mb.mode.label(),
            n_label(n),
            limit.as_secs_f64()
        ));
        mb.dead = Some(why);
        mb.loaded = None;
        mb.keep = None;
        Ok(())
    }

    /// Clears whatever the mode has programmed (not timed).
    fn clear(&mut self, mb: &mut ModeBed) -> Result<()> {
        if mb.dead.is_some() {
            return Ok(());
        }
        match mb.mode {
            Mode::NoProxy | Mode::Xdp => {}
            Mode::SockLb | Mode::Tc => {
                let _ = fs::remove_file(mb.manifests.join("added.yaml"));
                if let Some(k) = mb.agent_stage.take() {
                    let g = last_generation(mb.agent());
                    fs::rename(
                        mb.manifests.join("svcs"),
                        mb.manifests.join(format!(".stage-{k}")),
                    )?;
                    wait_sync(mb.agent(), g, 0, Duration::from_secs(300))?;
                }
            }
            Mode::IptNft | Mode::IptLegacy => {
                let base = mb.bed.dir().join("ipt-base.txt");
                mb.run(
                    &ipt_bin(mb.mode, "restore"),
                    &[&base.to_string_lossy()],
                    Duration::from_secs(300),
                )?;
            }
            Mode::Nft => {
                let _ = mb.run(
                    "nft",
                    &["delete", "table", "ip", "kube-proxy"],
                    Duration::from_secs(300),
                );
            }
        }
        mb.loaded = None;
        Ok(())
    }

    /// Full load from empty; leaves the mode loaded with `sz` (or not, on failure).
    fn full_load(&mut self, mb: &mut ModeBed, sz: &Size) -> Result<()> {
        let n = sz.n;
        let mode = mb.mode;
        self.clear(mb)?;
        let last = sa(sz.last(), 80);
        let answer_limit = Duration::from_secs(600);
        match mode {
            Mode::NoProxy | Mode::Xdp => {
                mb.loaded = Some(n);
            }
            Mode::SockLb | Mode::Tc => {
                let agent = mb.agent().clone();
                let g = last_generation(&agent);
                let cpu0 = cpu_secs(agent.pid);
                let t0 = mono_ns();
                fs::rename(
                    mb.manifests.join(format!(".stage-{n}")),
                    mb.manifests.join("svcs"),
                )?;
                mb.agent_stage = Some(n);
                let limit = self.agent_limit(n, true);
                let Some(t1) = mb.answer_within(true, last, limit, None)? else {
                    self.add(n, mode, "full", V::Over(limit.as_secs_f64()));
                    self.add(n, mode, "full_cmd", V::Over(limit.as_secs_f64()));
                    return self.abandon_agent(
                        mb,
                        n,
                        "full load",
                        limit,
                        &["add", "change", "delete"],
                    );
                };
                self.add(n, mode, "full", V::Num(secs(t0, t1)));
                let Some(s) = wait_sync_within(&agent, g, sz.frontends, limit)? else {
                    self.add(n, mode, "full_cmd", V::Over(limit.as_secs_f64()));
                    return self.abandon_agent(
                        mb,
                        n,
                        "full load's sync",
                        limit,
                        &["add", "change", "delete"],
                    );
                };
                let cpu1 = cpu_secs(agent.pid);
                self.add(n, mode, "full_cmd", V::Num(s.elapsed_us as f64 / 1e6));
                self.add(n, mode, "agent_cpu_full", V::Num(cpu1 - cpu0));
                let (rss, hwm) = memory_mib(agent.pid);
                self.add(n, mode, "agent_rss", V::Num(rss));
                self.add(n, mode, "agent_hwm", V::Num(hwm));
                self.add(n, mode, "agent_maps", V::Num(map_memory_mib(agent.pid)));
                mb.loaded = Some(n);
            }
            Mode::IptNft | Mode::IptLegacy | Mode::Nft => {
                let limit = if mode == Mode::IptNft && n >= 10_000 {
                    self.cfg.ipt_nft_limit
                } else if n > 10_000 {
                    self.cfg.big_anchor_limit
                } else {
                    self.cfg.limit
                };
                let steps = anchor_steps(mode, sz, "full");
                let t0 = mono_ns();
                match mb.timed(&steps, limit)? {
                    Timed::Done(cmd_s) => {
                        let t1 = mb.up(last, answer_limit, None)?;
                        self.add(n, mode, "full", V::Num(secs(t0, t1)));
                        self.add(n, mode, "full_cmd", V::Num(cmd_s));
                        mb.loaded = Some(n);
                    }
                    Timed::Over(s) => {
                        self.add(n, mode, "full", V::Over(s));
                        self.add(n, mode, "full_cmd", V::Over(s));
                        self.note(format!(
                            "{} at {} Services: the one-shot full load was stopped at its {s:.0} s limit",
                            mode.label(),
                            n_label(n)
                        ));
                        self.fallback_load(mb, sz)?;
                        if mb.loaded != Some(n) {
                            mb.gave_up = Some(n);
                            let why = format!("not loaded (full load over {s:.0} s)");
                            for m in [
                                "add",
                                "add_cmd",
                                "change",
                                "change_cmd",
                                "delete",
                                "delete_cmd",
                            ] {
                                self.add(n, mode, m, V::Skip(why.clone()));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Gets the rules in place another way after a one-shot load hit its limit, so traffic can
    /// still be measured: iptables in 1,000-Service restores (the same final ruleset).
    fn fallback_load(&mut self, mb: &mut ModeBed, sz: &Size) -> Result<()> {
        self.clear(mb)?;
        if !sz.traffic || (mb.mode != Mode::IptNft && mb.mode != Mode::IptLegacy) {
            return Ok(());
        }
        let chunks = kube_rules::ipt_chunks(&sz.svcs, 1000);
        let start = Instant::now();
        let restore = ipt_bin(mb.mode, "restore");
        for (k, text) in chunks.iter().enumerate() {
            let f = sz.file(&format!("ipt-chunk-{k:03}.txt"));
            fs::write(&f, text)?;
            mb.run(
                &restore,
                &["--noflush", &f.to_string_lossy()],
                self.cfg.limit,
            )?;
        }
        let took = start.elapsed().as_secs_f64();
        mb.up(sa(sz.last(), 80), Duration::from_secs(30), None)?;
        mb.loaded = Some(sz.n);
        self.add(sz.n, mb.mode, "full_chunked", V::Num(took));
        self.note(format!(
            "{} at {} Services: loaded instead as {} restores of 1,000 Services each in {took:.1} s (same final rules), to measure traffic",
            mb.mode.label(),
            n_label(sz.n),
            chunks.len()
        ));
        Ok(())
    }

    fn traffic(&mut self, mb: &mut ModeBed, sz: &Size) -> Result<()> {
        let n = sz.n;
        let mode = mb.mode;
        let (first, last) = if mode == Mode::NoProxy {
            (A0, A0)
        } else {
            (sz.first(), sz.last())
        };
        let (http, dns) = if mode == Mode::NoProxy {
            (HTTP_TARGET, DNS_TARGET)
        } else {
            (80, 53)
        };
        let cpu0 = mb.agent.as_ref().map(|a| cpu_secs(a.pid));
        let wall0 = Instant::now();
        let limit = Duration::from_millis(self.cfg.traffic_ms) + Duration::from_secs(60);
        for (proto, count, which, ip, port) in [
            ("tcp", self.cfg.tcp_count, "first", first, http),
            ("tcp", self.cfg.tcp_count, "last", last, http),
            ("udp", self.cfg.udp_count, "first", first, dns),
            ("udp", self.cfg.udp_count, "last", last, dns),
        ] {
            let line = format!(
                "{proto} {} {count} {} 50",
                sa(ip, port),
                self.cfg.traffic_ms
            );
            let v = mb.worker.call(&line, limit)?;
            let ok = v["ok"].as_u64().unwrap_or(0);
            let fail = v["fail"].as_u64().unwrap_or(0);
            let metric = |m: &str| -> &'static str {
                match (proto, m, which) {
                    ("tcp", "rate", "first") => "tcp_rate_first",
                    ("tcp", "rate", _) => "tcp_rate_last",
                    ("tcp", "p50", "first") => "tcp_p50_first",
                    ("tcp", "p50", _) => "tcp_p50_last",
                    ("tcp", "p99", "first") => "tcp_p99_first",
                    ("tcp", "p99", _) => "tcp_p99_last",
                    ("udp", "rate", "first") => "udp_rate_first",
                    ("udp", "rate", _) => "udp_rate_last",
                    ("udp", "p50", "first") => "udp_p50_first",
                    ("udp", "p50", _) => "udp_p50_last",
                    ("udp", "p99", "first") => "udp_p99_first",
                    (_, _, _) => "udp_p99_last",
                }
            };
            if ok == 0 {
                let e = V::Fail(v["error"].as_str().unwrap_or("no answer").to_string());
                for m in ["rate", "p50", "p99"] {
                    self.add(n, mode, metric(m), e.clone());
                }
                continue;
            }
            if fail > 0 {
                self.note(format!(
                    "{} at {} Services: {fail} of {} {proto} requests to the {which} Service failed ({})",
                    mode.label(),
                    n_label(n),
                    ok + fail,
                    v["error"]
                ));
            }
            self.add(
                n,
                mode,
                metric("rate"),
                V::Num(v["rate"].as_f64().unwrap_or(f64::NAN)),
            );
            self.add(
                n,
                mode,
                metric("p50"),
                V::Num(v["p50_us"].as_f64().unwrap_or(f64::NAN)),
            );
            self.add(
                n,
                mode,
                metric("p99"),
                V::Num(v["p99_us"].as_f64().unwrap_or(f64::NAN)),
            );
        }
        match self.iperf(mb, sa(last, IPERF_PORT)) {
            Ok(g) => self.add(n, mode, "iperf", V::Num(g)),
            Err(e) => self.add(n, mode, "iperf", V::Fail(format!("{e:#}"))),
        }
        self.node_port_traffic(mb, sz)?;
        if let (Some(c0), Some(a)) = (cpu0, &mb.agent) {
            let pct = 100.0 * (cpu_secs(a.pid) - c0) / wall0.elapsed().as_secs_f64();
            self.add(n, mode, "agent_cpu_idle", V::Num(pct));
        }
        Ok(())
    }

    /// From the bed's external client to node1's NodePort (no proxy: to pod C through node1),
    /// the backends on node2: TCP connections and UDP requests, each a new flow, then UDP on one
    /// flow. In the agents' beds, checks which path the traffic took (the XDP program's
    /// `xdp_forwarded` counter) and deletes the flows' conntrack entries afterwards.
    fn node_port_traffic(&mut self, mb: &mut ModeBed, sz: &Size) -> Result<()> {
        let started = Instant::now();
        let n = sz.n;
        // The socket-LB bed's agent forwards NodePort traffic at XDP: its results are XDP's.
        let mode = if mb.mode == Mode::SockLb {
            Mode::Xdp
        } else {
            mb.mode
        };
        let (tcp, udp) = if mb.mode == Mode::NoProxy {
            (sa(C0, HTTP_TARGET), sa(C0, DNS_TARGET))
        } else {
            (sa(NODE_IP, NODEPORT_TCP), sa(NODE_IP, NODEPORT_UDP))
        };
        let bpffs = mb.agent.as_ref().map(|a| a.bpffs.clone());
        let forwarded = |b: &Option<PathBuf>| -> Result<Option<u64>> {
            b.as_ref()
                .map(|b| progrun::counter(b, progrun::COUNTER_XDP_FORWARDED))
                .transpose()
        };
        let fwd0 = forwarded(&bpffs)?;
        let snat_drops = |b: &Option<PathBuf>| -> Result<Option<u64>> {
            b.as_ref()
                .map(|b| progrun::counter(b, progrun::COUNTER_DROPPED_SNAT_PORTS))
                .transpose()
        };
        let drops0 = snat_drops(&bpffs)?;
        let limit = Duration::from_millis(self.cfg.traffic_ms) + Duration::from_secs(60);
        let mut answered = 0u64;
        for (proto, addr) in [("tcp", tcp), ("udp", udp)] {
            let line = format!(
                "{proto} {addr} {} {} 50",
                self.cfg.np_count, self.cfg.traffic_ms
            );
            let v = mb.ext_worker.call(&line, limit)?;
            let ok = v["ok"].as_u64().unwrap_or(0);
            let fail = v["fail"].as_u64().unwrap_or(0);
            answered += ok;
            let keys: [&'static str; 3] = if proto == "tcp" {
                ["np_tcp_rate", "np_tcp_p50", "np_tcp_p99"]
            } else {
                ["np_udp_rate", "np_udp_p50", "np_udp_p99"]
            };
            if ok == 0 {
                let e = V::Fail(v["error"].as_str().unwrap_or("no answer").to_string());
                for k in keys {
                    self.add(n, mode, k, e.clone());
                }
                continue;
            }
            if fail > 0 {
                self.note(format!(
                    "{} at {} Services: {fail} of {} {proto} requests to the NodePort failed ({})",
                    mode.label(),
                    n_label(n),
                    ok + fail,
                    v["error"]
                ));
            }
            for (k, field) in keys.into_iter().zip(["rate", "p50_us", "p99_us"]) {
                self.add(n, mode, k, V::Num(v[field].as_f64().unwrap_or(f64::NAN)));
            }
        }
        let line = format!(
            "flow {udp} {} {}",
            self.cfg.np_flow_ms, self.cfg.np_flow_window
        );
        let v = mb.ext_worker.call(&line, limit)?;
        match v["rate"].as_f64() {
            // Two packets through node1 per exchange: the request and the reply.
            Some(r) if v["ok"].as_u64().unwrap_or(0) > 0 => {
                answered += v["ok"].as_u64().unwrap_or(0);
                self.add(n, mode, "np_flow_pps", V::Num(2.0 * r));
                let lost = v["lost"].as_u64().unwrap_or(0);
                if lost > 0 {
                    self.note(format!(
                        "{} at {} Services: {lost} datagrams lost in the one-flow NodePort measurement",
                        mode.label(),
                        n_label(n)
                    ));
                }
            }
            _ => self.add(
                n,
                mode,
                "np_flow_pps",
                V::Fail(v["error"].as_str().unwrap_or("no answer").to_string()),
            ),
        }
        if let (Some(b), Some(f0)) = (&bpffs, fwd0) {
            let moved = forwarded(&bpffs)?.unwrap_or(0).saturating_sub(f0);
            // Every exchange is at least a request and a reply.
            if mb.mode == Mode::SockLb && moved < 2 * answered {
                self.note(format!(
                    "{} at {} Services: the XDP program forwarded only {moved} packets for {answered} NodePort exchanges (the rest went through tc)",
                    mode.label(),
                    n_label(n)
                ));
            }
            let drops = snat_drops(&bpffs)?
                .unwrap_or(0)
                .saturating_sub(drops0.unwrap_or(0));
            if drops > 0 {
                self.note(format!(
                    "{} at {} Services: {drops} NodePort packets dropped for want of a free SNAT port",
                    mode.label(),
                    n_label(n)
                ));
            }
            if mb.mode == Mode::Tc && moved > 0 {
                self.note(format!(
                    "{} at {} Services: {moved} NodePort packets were forwarded at XDP despite --xdp=off",
                    mode.label(),
                    n_label(n)
                ));
            }
            let (gone, kept) = progrun::delete_idle_node_port_flows(
                b,
                NODE_IP,
                tests::EXT_IP,
                &backends().remote,
                CT_IDLE,
            )?;
            log(format!(
                "    {}: {moved} packets forwarded at XDP; NodePort conntrack entries idle for {} s deleted: {gone}, kept: {kept}",
                mb.mode.label(),
                CT_IDLE.as_secs()
            ));
        }
        log(format!(
            "    NodePort traffic: {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// iperf3 from the client pod (its namespace and cgroup) for a few seconds: Gbit/s.
    fn iperf(&mut self, mb: &mut ModeBed, to: SocketAddr) -> Result<f64> {
        let secs = self.cfg.iperf_secs.to_string();
        let mut last_err = String::new();
        for _ in 0..2 {
            let out = mb.bed.run_in(
                &mb.client.ns,
                mb.client.cgroup.as_deref(),
                "iperf3",
                &[
                    "-c",
                    &to.ip().to_string(),
                    "-p",
                    &to.port().to_string(),
                    "-t",
                    &secs,
                    "-J",
                    "--connect-timeout",
                    "3000",
                ],
                Duration::from_secs(self.cfg.iperf_secs as u64 + 30),
            )?;
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                return Ok(bps / 1e9);
            }
            last_err = v["error"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned());
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!("iperf3 to {to}: {last_err}")
    }

    /// Add one Service, change one of its endpoints, delete it: time until it answers (and
    /// from the new endpoint), and until it stops answering.
    fn updates(&mut self, mb: &mut ModeBed, sz: &Size) -> Result<()> {
        let n = sz.n;
        let mode = mb.mode;
        let vip = sa(sz.added.vip, 80);
        let limit = Duration::from_secs(600);
        let target = "added.yaml";
        for (op, expect) in [("add", None), ("change", Some("be-b")), ("delete", None)] {
            let (m, m_cmd): (&'static str, &'static str) = match op {
                "add" => ("add", "add_cmd"),
                "change" => ("change", "change_cmd"),
                _ => ("delete", "delete_cmd"),
            };
            match mode {
                Mode::NoProxy | Mode::Xdp => return Ok(()),
                Mode::SockLb | Mode::Tc => {
                    let agent = mb.agent().clone();
                    let g = last_generation(&agent);
                    let path = mb.manifests.join(target);
                    let t0;
                    let want;
                    if op == "delete" {
                        t0 = mono_ns();
                        fs::remove_file(&path)?;
                        want = sz.frontends;
                    } else {
                        let svc = if op == "add" { &sz.added } else { &sz.changed };
                        let mut text = String::new();
                        workload::yaml(svc, &mut text);
                        let tmp = mb.bed.dir().join(".added.tmp");
                        fs::write(&tmp, text)?;
                        t0 = mono_ns();
                        fs::rename(&tmp, &path)?;
                        want = sz.frontends + 1;
                    }
                    let limit = self.agent_limit(n, false);
                    let rest: Vec<&str> = ["add", "change", "delete"]
                        .into_iter()
                        .skip_while(|o| *o != op)
                        .skip(1)
                        .collect();
                    let Some(t1) = mb.answer_within(op != "delete", vip, limit, expect)? else {
                        self.add(n, mode, m, V::Over(limit.as_secs_f64()));
                        self.add(n, mode, m_cmd, V::Over(limit.as_secs_f64()));
                        return self.abandon_agent(mb, n, op, limit, &rest);
                    };
                    self.add(n, mode, m, V::Num(secs(t0, t1)));
                    let Some(s) = wait_sync_within(&agent, g, want, limit)? else {
                        self.add(n, mode, m_cmd, V::Over(limit.as_secs_f64()));
                        return self.abandon_agent(mb, n, &format!("{op}'s sync"), limit, &rest);
                    };
                    self.add(n, mode, m_cmd, V::Num(s.elapsed_us as f64 / 1e6));
                }
                Mode::IptNft | Mode::IptLegacy | Mode::Nft => {
                    let steps = anchor_steps(mode, sz, op);
                    let t0 = mono_ns();
                    match mb.timed(&steps, self.cfg.limit)? {
                        Timed::Done(cmd_s) => {
                            let t1 = if op == "delete" {
                                mb.down(vip, limit)?
                            } else {
                                mb.up(vip, limit, expect)?
                            };
                            self.add(n, mode, m, V::Num(secs(t0, t1)));
                            self.add(n, mode, m_cmd, V::Num(cmd_s));
                        }
                        Timed::Over(s) => {
                            self.add(n, mode, m, V::Over(s));
                            self.add(n, mode, m_cmd, V::Over(s));
                            // The state is unknown now: the next round reloads.
                            mb.keep = None;
                            return Ok(());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn prog_test(&mut self, mb: &ModeBed, sz: &Size) {
        let Some(agent) = &mb.agent else { return };
        self.test_clients += 1;
        let c = self.test_clients;
        // NodePort packets at XDP and at tc, from two made-up external clients.
        let ext = |k: u32| Ipv4Addr::new(198, 18, 16 + (k / 250 % 16) as u8, 1 + (k % 250) as u8);
        let target = progrun::NodePortTarget {
            bpffs: &agent.bpffs,
            node_ns: &mb.node_ns,
            iface: "lan0",
            node_ip: NODE_IP,
            node_port: NODEPORT_TCP,
            backends: &backends().remote,
            clients: [ext(2 * c), ext(2 * c + 1)],
        };
        let started = Instant::now();
        let measured = progrun::measure_node_port(&target, self.cfg.np_prog_calls);
        log(format!(
            "    NodePort per-packet XDP / tc: {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        match measured {
            Ok(c) => {
                for (m, v) in [
                    ("np_prog_xdp_new", c.xdp_new),
                    ("np_prog_tc_new", c.tc_new),
                    ("np_prog_xdp_est", c.xdp_established),
                    ("np_prog_tc_est", c.tc_established),
                    ("np_prog_xdp_reply", c.xdp_reply),
                    ("np_prog_tc_reply", c.tc_reply),
                    ("np_prog_xdp_empty", c.xdp_empty),
                    ("np_prog_tc_empty", c.tc_empty),
                ] {
                    self.add(sz.n, mb.mode, m, V::Num(v.median));
                }
            }
            Err(e) => {
                self.add(sz.n, mb.mode, "np_prog_xdp_new", V::Fail(format!("{e:#}")));
            }
        }
        let client = Ipv4Addr::new(198, 19, 32 + (c / 250 % 32) as u8, 1 + (c % 250) as u8);
        match progrun::measure(&agent.bpffs, sz.last(), 80, A0, client, self.cfg.prog_calls) {
            Ok(c) => {
                for (m, v) in [
                    ("prog_hit_new", c.hit_new),
                    ("prog_hit_est", c.hit_established),
                    ("prog_reply", c.reply),
                    ("prog_miss", c.miss),
                    ("prog_empty", c.empty),
                    ("prog_lookup", c.lookup),
                    ("prog_miss_warm", c.miss_warm),
                    ("prog_empty_warm", c.empty_warm),
                    ("prog_lookup_warm", c.lookup_warm),
                ] {
                    self.add(sz.n, mb.mode, m, V::Num(v.median));
                }
            }
            Err(e) => {
                self.add(sz.n, mb.mode, "prog_hit_new", V::Fail(format!("{e:#}")));
            }
        }
    }

    /// One mode in one round at one size.
    fn mode_round(&mut self, mb: &mut ModeBed, sz: &Size, round: usize) -> Result<()> {
        let n = sz.n;
        if mb.dead.is_some() || mb.gave_up == Some(n) {
            return Ok(());
        }
        if mb.keep != Some(n) || mb.loaded != Some(n) {
            let started = Instant::now();
            self.full_load(mb, sz)?;
            let took = started.elapsed();
            // A load that takes long is measured once; later rounds keep its rules.
            let slow = self
                .res
                .get(n, mb.mode, "full")
                .and_then(|v| v.last())
                .is_some_and(|v| !matches!(v, V::Num(s) if *s < 10.0));
            mb.keep = (slow && mb.loaded == Some(n)).then_some(n);
            if slow && round == 0 && self.cfg.rounds > 1 {
                self.note(format!(
                    "{} at {} Services: full load measured once ({:.0} s including the clear); later rounds keep those rules",
                    mb.mode.label(),
                    n_label(n),
                    took.as_secs_f64()
                ));
            }
        }
        if mb.dead.is_some() || mb.gave_up == Some(n) {
            return Ok(());
        }
        if mb.loaded != Some(n) {
            bail!("{} not loaded with {n} Services", mb.mode.label());
        }
        // At the size without traffic (100,000) the per-packet measurements come right after the
        // full load: the add that follows may go over its limit and stop the agent.
        let probe_first = !sz.traffic;
        if probe_first && mb.mode == Mode::SockLb {
            self.prog_test(mb, sz);
        }
        if sz.traffic {
            self.traffic(mb, sz)?;
        }
        self.updates(mb, sz)?;
        if !probe_first && mb.mode == Mode::SockLb && mb.dead.is_none() {
            self.prog_test(mb, sz);
        }
        Ok(())
    }

    fn size_phase(
        &mut self,
        beds: &mut [ModeBed],
        sz: &Size,
        rounds: usize,
        modes: &[Mode],
    ) -> Result<()> {
        log(format!(
            "{} Services ({} Service ports, {} endpoints): preparing inputs",
            sz.n,
            sz.frontends,
            3 * sz.frontends
        ));
        sz.write_rules(modes)?;
        for mb in beds
            .iter_mut()
            .filter(|b| b.mode.is_agent() && modes.contains(&b.mode))
        {
            let stage = mb.manifests.join(format!(".stage-{}", sz.n));
            let _ = fs::remove_dir_all(&stage);
            fs::create_dir_all(&stage)?;
            for (name, text) in workload::yaml_files(&sz.svcs, 1000) {
                fs::write(stage.join(name), text)?;
            }
        }
        for round in 0..rounds {
            let mut order: Vec<Mode> = modes.to_vec();
            let k = round % order.len().max(1);
            order.rotate_left(k);
            for mode in order {
                tests::check_interrupted()?;
                if self.budget_left().is_zero() {
                    self.note(format!(
                        "budget: stopped before round {} of {} Services",
                        round + 1,
                        n_label(sz.n)
                    ));
                    return Ok(());
                }
                let mb = beds.iter_mut().find(|b| b.mode == mode).expect("bed");
                let t = Instant::now();
                log(format!(
                    "{} Services, round {}: {}",
                    sz.n,
                    round + 1,
                    mode.label()
                ));
                if let Err(e) = self.mode_round(mb, sz, round) {
                    self.note(format!(
                        "{} at {} Services, round {}: {e:#}",
                        mode.label(),
                        n_label(sz.n),
                        round + 1
                    ));
                    mb.keep = None;
                }
                log(format!("    {:.1} s", t.elapsed().as_secs_f64()));
            }
        }
        Ok(())
    }
}

fn secs(t0: u64, t1: u64) -> f64 {
    t1.saturating_sub(t0) as f64 / 1e9
}

/// The commands of one anchor operation (`full`, `add`, `change`, `delete`), as kube-proxy runs
/// them in one sync.
fn anchor_steps(mode: Mode, sz: &Size, op: &str) -> Vec<(String, Vec<String>)> {
    match mode {
        Mode::Nft => vec![(
            "nft".into(),
            vec![
                "-f".into(),
                sz.file(&format!("nft-{op}.nft"))
                    .to_string_lossy()
                    .into_owned(),
            ],
        )],
        _ => {
            let mut v = Vec::new();
            if !sz.large {
                v.push((ipt_bin(mode, "save"), vec!["-t".into(), "nat".into()]));
            }
            v.push((
                ipt_bin(mode, "restore"),
                vec![
                    "--noflush".into(),
                    sz.file(&format!("ipt-{op}.txt"))
                        .to_string_lossy()
                        .into_owned(),
                ],
            ));
            v
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn run() -> Result<()> {
    tests::install_interrupt_handler()?;
    ensure!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the bench needs root (network namespaces, iptables, BPF)"
    );
    let cfg = Config::from_env();
    for tool in [
        "iptables-nft-restore",
        "iptables-legacy-restore",
        "nft",
        "iperf3",
    ] {
        ensure!(
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing (cargo xtask bench installs it)"
        );
    }
    let exe = std::env::current_exe()?;
    let machine = Machine::read();
    let work = std::env::temp_dir().join(format!("pxbench-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let mut bench = Bench {
        cfg,
        res: Results::default(),
        started: Instant::now(),
        work,
        test_clients: 0,
    };
    let result = bench_all(&mut bench, &exe);
    let elapsed = bench.started.elapsed();
    let load_end = loadavg();
    if let Err(e) = &result {
        bench
            .res
            .notes
            .push(format!("THE RUN DID NOT COMPLETE: {e:#}"));
    }
    let text = render(&bench, &machine, elapsed, &load_end);
    fs::write(&bench.cfg.out, text)
        .with_context(|| format!("writing {}", bench.cfg.out.display()))?;
    let _ = fs::remove_dir_all(&bench.work);
    log(format!(
        "wrote {} ({:.1} min)",
        bench.cfg.out.display(),
        elapsed.as_secs_f64() / 60.0
    ));
    result
}

fn bench_all(bench: &mut Bench, exe: &Path) -> Result<()> {
    log("building one bed per mode");
    let mut beds = Vec::new();
    for mode in Mode::ALL {
        beds.push(setup_bed(mode, exe).with_context(|| format!("bed for {}", mode.label()))?);
    }
    let sizes = bench.cfg.sizes.clone();
    for &n in &sizes {
        let sz = Size::new(n, &bench.work, true)?;
        let rounds = bench.cfg.rounds;
        bench.size_phase(&mut beds, &sz, rounds, &Mode::ALL)?;
        let _ = fs::remove_dir_all(&sz.dir);
    }
    if let Some(big) = bench.cfg.big {
        big_phase(bench, &mut beds, big)?;
    }
    log("clearing every mode");
    for mb in beds.iter_mut().filter(|b| !b.mode.is_agent()) {
        if let Err(e) = bench.clear(mb) {
            log(format!("clearing {}: {e:#}", mb.mode.label()));
        }
    }
    drop(beds);
    Ok(())
}

/// Programming time only, at a size where some anchors would not finish within the budget.
fn big_phase(bench: &mut Bench, beds: &mut [ModeBed], n: usize) -> Result<()> {
    let ten_k = 10_000;
    let mut modes = vec![Mode::SockLb];
    for m in Mode::ANCHORS {
        let c = bench.res.cell(ten_k, m, "full");
        let why = match c {
            Cell::Over(t) => Some(format!("budget (10,000 took over {t:.0} s)")),
            Cell::Value { median, .. } if median > 10.0 => {
                Some(format!("budget (10,000 took {median:.0} s)"))
            }
            Cell::Value { .. } => None,
            // Not measured at 10,000 (a development run): the two ANCHORS.md calls slow.
            _ if m == Mode::IptLegacy => None,
            _ => Some("budget (not measured at 10,000; slow there per ANCHORS.md)".into()),
        };
        match why {
            Some(w) => {
                for metric in ["full", "add", "change", "delete"] {
                    bench.add(n, m, metric, V::Skip(w.clone()));
                }
            }
            None => modes.push(m),
        }
    }
    bench.add(
        n,
        Mode::Tc,
        "full",
        V::Skip("same agent code as socket LB".into()),
    );
    // Free the memory of the 10,000-Service rules in the modes not run here.
    for mb in beds.iter_mut().filter(|b| !modes.contains(&b.mode)) {
        bench.clear(mb)?;
    }
    let left = bench.budget_left();
    let mut rounds = bench.cfg.big_rounds;
    if left < Duration::from_secs(6 * 60) {
        rounds = rounds.min(1);
    } else if left < Duration::from_secs(9 * 60) {
        rounds = rounds.min(2);
    }
    if rounds < bench.cfg.big_rounds {
        bench.note(format!(
            "{n} Services: {rounds} round(s) instead of {} to stay within the budget",
            bench.cfg.big_rounds
        ));
    }
    let sz = Size::new(n, &bench.work, false)?;
    bench.size_phase(beds, &sz, rounds, &modes)?;
    let _ = fs::remove_dir_all(&sz.dir);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Machine {
    cpu: String,
    nproc: usize,
    mem_gib: f64,
    kernel: String,
    tools: Vec<String>,
    git: String,
    load_start: String,
    date: String,
}

fn first_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{prog}: unknown"))
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_gib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / (1024.0 * 1024.0);
        let git = {
            let rev = first_line("git", &["rev-parse", "--short", "HEAD"]);
            let dirty = Command::new("git")
                .args(["status", "--porcelain", "--untracked-files=no"])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty());
            if dirty {
                format!("{rev} plus uncommitted changes")
            } else {
                rev
            }
        };
        Machine {
            cpu,
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_gib,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            tools: vec![
                first_line("iptables-nft", &["--version"]),
                first_line("iptables-legacy", &["--version"]),
                first_line("nft", &["--version"]),
                first_line("iperf3", &["--version"]),
                first_line("rustc", &["--version"]),
            ],
            git,
            load_start: loadavg(),
            date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        }
    }
}

const OURS: [Mode; 2] = [Mode::SockLb, Mode::Tc];

/// Columns of the headline table: every bed, and XDP (the socket-LB bed's NodePort results).
const HEADLINE_COLUMNS: [Mode; 7] = [
    Mode::NoProxy,
    Mode::SockLb,
    Mode::Tc,
    Mode::Xdp,
    Mode::IptNft,
    Mode::IptLegacy,
    Mode::Nft,
];

/// Columns of the NodePort tables.
const NODE_PORT_COLUMNS: [Mode; 6] = [
    Mode::NoProxy,
    Mode::Xdp,
    Mode::Tc,
    Mode::IptNft,
    Mode::IptLegacy,
    Mode::Nft,
];

struct Metric {
    key: &'static str,
    title: &'static str,
    unit: Unit,
    higher_better: bool,
}

const fn m(key: &'static str, title: &'static str, unit: Unit, higher_better: bool) -> Metric {
    Metric {
        key,
        title,
        unit,
        higher_better,
    }
}

const PROGRAMMING: [Metric; 8] = [
    m(
        "full",
        "Full load from empty, until the last Service answers",
        Unit::Secs,
        false,
    ),
    m(
        "full_cmd",
        "Full load: the command alone (iptables-restore / nft -f) or the agent's map sync",
        Unit::Secs,
        false,
    ),
    m(
        "add",
        "Add one Service, until it answers",
        Unit::Secs,
        false,
    ),
    m(
        "add_cmd",
        "Add one Service: the command alone / the agent's map sync",
        Unit::Secs,
        false,
    ),
    m(
        "change",
        "Change one endpoint, until the new endpoint answers",
        Unit::Secs,
        false,
    ),
    m(
        "change_cmd",
        "Change one endpoint: the command alone / the agent's map sync",
        Unit::Secs,
        false,
    ),
    m(
        "delete",
        "Delete one Service, until it stops answering",
        Unit::Secs,
        false,
    ),
    m(
        "delete_cmd",
        "Delete one Service: the command alone / the agent's map sync",
        Unit::Secs,
        false,
    ),
];

const NODE_PORT_TRAFFIC: [Metric; 7] = [
    m(
        "np_tcp_rate",
        "NodePort: TCP connections per second, client outside, endpoints on node2",
        Unit::Rate,
        true,
    ),
    m(
        "np_tcp_p50",
        "NodePort: TCP connection p50 latency",
        Unit::Micros,
        false,
    ),
    m(
        "np_tcp_p99",
        "NodePort: TCP connection p99 latency",
        Unit::Micros,
        false,
    ),
    m(
        "np_udp_rate",
        "NodePort: UDP requests per second (new socket each)",
        Unit::Rate,
        true,
    ),
    m(
        "np_udp_p50",
        "NodePort: UDP request p50 latency",
        Unit::Micros,
        false,
    ),
    m(
        "np_udp_p99",
        "NodePort: UDP request p99 latency",
        Unit::Micros,
        false,
    ),
    m(
        "np_flow_pps",
        "NodePort: UDP packets per second through node1 on one flow (requests and replies)",
        Unit::Rate,
        true,
    ),
];

const TRAFFIC: [Metric; 11] = [
    m(
        "tcp_rate_first",
        "TCP connections per second, first Service",
        Unit::Rate,
        true,
    ),
    m(
        "tcp_rate_last",
        "TCP connections per second, last Service",
        Unit::Rate,
        true,
    ),
    m(
        "tcp_p50_first",
        "TCP connection p50 latency, first Service",
        Unit::Micros,
        false,
    ),
    m(
        "tcp_p99_first",
        "TCP connection p99 latency, first Service",
        Unit::Micros,
        false,
    ),
    m(
        "tcp_p50_last",
        "TCP connection p50 latency, last Service",
        Unit::Micros,
        false,
    ),
    m(
        "tcp_p99_last",
        "TCP connection p99 latency, last Service",
        Unit::Micros,
        false,
    ),
    m(
        "udp_rate_first",
        "UDP requests per second (new socket each), first Service",
        Unit::Rate,
        true,
    ),
    m(
        "udp_rate_last",
        "UDP requests per second (new socket each), last Service",
        Unit::Rate,
        true,
    ),
    m(
        "udp_p50_last",
        "UDP request p50 latency, last Service",
        Unit::Micros,
        false,
    ),
    m(
        "udp_p99_last",
        "UDP request p99 latency, last Service",
        Unit::Micros,
        false,
    ),
    m(
        "iperf",
        "TCP throughput (iperf3, one stream), last Service",
        Unit::Gbps,
        true,
    ),
];

fn n_label(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn sizes_of(res: &Results) -> Vec<usize> {
    let mut v: Vec<usize> = res.values.keys().map(|(n, _, _)| *n).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Ratios of the ClusterIP and programming tables: each of ours ÷ each anchor.
fn ours_vs_anchors() -> Vec<(Mode, Mode)> {
    OURS.iter()
        .flat_map(|o| Mode::ANCHORS.iter().map(move |a| (*o, *a)))
        .collect()
}

/// Ratios of the NodePort tables: XDP ÷ tc, then XDP and tc ÷ each anchor.
fn node_port_ratios() -> Vec<(Mode, Mode)> {
    let mut v = vec![(Mode::Xdp, Mode::Tc)];
    for o in [Mode::Xdp, Mode::Tc] {
        v.extend(Mode::ANCHORS.iter().map(|a| (o, *a)));
    }
    v
}

/// One metric over every size: modes, then the `ratios` (a ÷ b of the medians).
fn metric_table(
    out: &mut String,
    res: &Results,
    metric: &Metric,
    sizes: &[usize],
    modes: &[Mode],
    ratios: &[(Mode, Mode)],
) {
    let _ = writeln!(
        out,
        "**{}** ({})\n",
        metric.title,
        if metric.higher_better {
            "higher is better; a ratio a ÷ b above 1 favours a"
        } else {
            "lower is better; a ratio a ÷ b below 1 favours a"
        }
    );
    let mut header = vec!["Services".to_string()];
    header.extend(modes.iter().map(|m| m.label().to_string()));
    for (a, b) in ratios {
        header.push(format!("{} ÷ {}", a.short(), b.short()));
    }
    let mut rows = Vec::new();
    for &n in sizes {
        if modes.iter().all(|m| res.get(n, *m, metric.key).is_none()) {
            continue;
        }
        let mut row = vec![n_label(n)];
        for mode in modes {
            row.push(fmt_cell(&res.cell(n, *mode, metric.key), metric.unit));
        }
        for (a, b) in ratios {
            row.push(fmt_ratio(
                &res.cell(n, *a, metric.key),
                &res.cell(n, *b, metric.key),
            ));
        }
        rows.push(row);
    }
    table(out, &header, &rows);
}

fn render(bench: &Bench, mc: &Machine, elapsed: Duration, load_end: &str) -> String {
    let res = &bench.res;
    let cfg = &bench.cfg;
    let sizes = sizes_of(res);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Benchmarks: proxy-agent side by side with kube-proxy\n"
    );
    let _ = writeln!(
        o,
        "Generated by `{}` on {} ({}). The run took {:.1} minutes, not counting compilation.{}\n",
        if cfg.quick {
            "BENCH_QUICK=1 cargo xtask bench"
        } else {
            "cargo xtask bench"
        },
        mc.date,
        mc.git,
        elapsed.as_secs_f64() / 60.0,
        if cfg.quick {
            " **Quick run: 10 and 1,000 Services, one round; not for citing.**"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "## Machine\n");
    let _ = writeln!(
        o,
        "- CPU: {} ({} cores online, `nproc` {})",
        mc.cpu, mc.nproc, mc.nproc
    );
    let _ = writeln!(o, "- Memory: {:.1} GiB", mc.mem_gib);
    let _ = writeln!(o, "- Kernel: `{}`", mc.kernel);
    let _ = writeln!(
        o,
        "- Tools: {}",
        mc.tools
            .iter()
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        o,
        "- Load average (1, 5, 15 min) at the start: {}; at the end: {}. Other sessions were building and testing on this machine at the same time, so every number carries some of their noise.\n",
        mc.load_start, load_end
    );

    // Headline.
    if let Some(&top) = sizes.iter().filter(|n| **n <= 10_000).max() {
        let _ = writeln!(o, "## Headline: {} Services\n", n_label(top));
        let _ = writeln!(
            o,
            "Medians over the rounds. Times: lower is better. Rates: higher is better. † rounds differ by more than {:.0} % of the median (noisy); ¹ measured once.\n",
            report::NOISY * 100.0
        );
        let mut header = vec!["".to_string()];
        header.extend(HEADLINE_COLUMNS.iter().map(|m| m.label().to_string()));
        let mut rows = Vec::new();
        // (metric, title, unit, the no-proxy metric it is shown as a share of)
        let lines: [(&str, &str, Unit, Option<&str>); 12] = [
            (
                "full",
                "full load from empty (until it answers)",
                Unit::Secs,
                None,
            ),
            (
                "add",
                "add one Service (until it answers)",
                Unit::Secs,
                None,
            ),
            (
                "change",
                "change one endpoint (until it answers)",
                Unit::Secs,
                None,
            ),
            (
                "delete",
                "delete one Service (until it stops answering)",
                Unit::Secs,
                None,
            ),
            (
                "tcp_rate_last",
                "TCP conn/s, last Service (share of no proxy)",
                Unit::Rate,
                Some("tcp_rate_last"),
            ),
            ("tcp_p50_last", "TCP p50, last Service", Unit::Micros, None),
            ("tcp_p99_last", "TCP p99, last Service", Unit::Micros, None),
            ("udp_rate_last", "UDP req/s, last Service", Unit::Rate, None),
            ("iperf", "iperf3 throughput, last Service", Unit::Gbps, None),
            (
                "np_tcp_rate",
                "NodePort from outside to node2's pods: TCP conn/s (share of no proxy)",
                Unit::Rate,
                Some("np_tcp_rate"),
            ),
            (
                "np_udp_rate",
                "NodePort: UDP req/s, a new flow each",
                Unit::Rate,
                None,
            ),
            (
                "np_flow_pps",
                "NodePort: UDP packets/s on one flow (share of no proxy)",
                Unit::Rate,
                Some("np_flow_pps"),
            ),
        ];
        for (key, title, unit, share) in lines {
            let base = share.and_then(|k| res.cell(top, Mode::NoProxy, k).num());
            let mut row = vec![title.to_string()];
            for mode in HEADLINE_COLUMNS {
                let c = res.cell(top, mode, key);
                let mut s = fmt_cell(&c, unit);
                if let (Some(v), Some(base)) = (c.num(), base)
                    && mode != Mode::NoProxy
                {
                    let _ = write!(s, " ({:.2})", v / base);
                }
                if matches!(c, Cell::Empty) {
                    // Paths that do not carry this traffic: socket LB only pods' own
                    // connections, XDP only what arrives on the node's LAN interface.
                    s = "-".into();
                }
                row.push(s);
            }
            rows.push(row);
        }
        table(&mut o, &header, &rows);
        let hit = res.cell(top, Mode::SockLb, "prog_hit_new");
        let est = res.cell(top, Mode::SockLb, "prog_hit_est");
        let empty = res.cell(top, Mode::SockLb, "prog_empty");
        let _ = writeln!(
            o,
            "\"-\": the path does not carry that traffic (socket LB translates pods' own connections; XDP handles what arrives on the node's LAN interface for a backend on another node, here the NodePort; the socket-LB agent attaches XDP, so its NodePort traffic is the XDP column, and the tc agent runs with `--xdp=off`).\n"
        );
        let _ = writeln!(
            o,
            "The tc program per packet (BPF_PROG_TEST_RUN, single runs, median): new flow {}, established flow {}, a miss {} (warm, `repeat` 10,000: {}), an empty program {} (warm: {}). For reference (ANCHORS.md): a C XDP DNAT 113-132 ns per packet on this kind of machine, an empty program 22-26 ns.\n",
            fmt_cell(&hit, Unit::Nanos),
            fmt_cell(&est, Unit::Nanos),
            fmt_cell(&res.cell(top, Mode::SockLb, "prog_miss"), Unit::Nanos),
            fmt_cell(&res.cell(top, Mode::SockLb, "prog_miss_warm"), Unit::Nanos),
            fmt_cell(&empty, Unit::Nanos),
            fmt_cell(&res.cell(top, Mode::SockLb, "prog_empty_warm"), Unit::Nanos),
        );
        let c = |k: &str| res.cell(top, Mode::SockLb, k);
        let _ = writeln!(
            o,
            "NodePort packets to a backend on another node, at the LAN interface (BPF_PROG_TEST_RUN, single runs, median), XDP vs tc: new flow {} vs {} ({}), established {} vs {} ({}), reply {} vs {} ({}); empty programs {} vs {}.\n",
            fmt_cell(&c("np_prog_xdp_new"), Unit::Nanos),
            fmt_cell(&c("np_prog_tc_new"), Unit::Nanos),
            fmt_ratio(&c("np_prog_xdp_new"), &c("np_prog_tc_new")),
            fmt_cell(&c("np_prog_xdp_est"), Unit::Nanos),
            fmt_cell(&c("np_prog_tc_est"), Unit::Nanos),
            fmt_ratio(&c("np_prog_xdp_est"), &c("np_prog_tc_est")),
            fmt_cell(&c("np_prog_xdp_reply"), Unit::Nanos),
            fmt_cell(&c("np_prog_tc_reply"), Unit::Nanos),
            fmt_ratio(&c("np_prog_xdp_reply"), &c("np_prog_tc_reply")),
            fmt_cell(&c("np_prog_xdp_empty"), Unit::Nanos),
            fmt_cell(&c("np_prog_tc_empty"), Unit::Nanos),
        );
    }
    if let Some(&big) = sizes.iter().find(|n| **n > 10_000) {
        let _ = writeln!(
            o,
            "At {} Services (programming time only): {}.\n",
            n_label(big),
            Mode::ALL[1..]
                .iter()
                .filter(|m| **m != Mode::Tc)
                .map(|m| {
                    let c = |k: &str| fmt_cell(&res.cell(big, *m, k), Unit::Secs);
                    format!(
                        "{}: full load {} (command / map sync {}), add {}, change {}, delete {}",
                        m.label(),
                        c("full"),
                        c("full_cmd"),
                        c("add"),
                        c("change"),
                        c("delete")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        );
    }

    let _ = writeln!(o, "## Method\n");
    let _ = writeln!(o, "{}", method_text(cfg));

    let _ = writeln!(o, "## Programming time\n");
    let _ = writeln!(
        o,
        "For the agent, the clock starts when the manifests are in place (one directory rename, or one file rename) and stops when a client pod's connection through the new state succeeds (or, for a delete, is refused); `_cmd` rows are the agent's own `sync complete ... elapsed_us` (map writes only: parsing the YAML and translating come before it). For kube-proxy's rules, the clock starts when the command starts; `_cmd` rows are the command alone (with the `iptables-save -t nat` kube-proxy runs first on every sync below 1,000 endpoints).\n"
    );
    for metric in &PROGRAMMING {
        metric_table(
            &mut o,
            res,
            metric,
            &sizes,
            &Mode::ALL[1..],
            &ours_vs_anchors(),
        );
    }
    if let Some(c) = sizes
        .iter()
        .find_map(|n| res.get(*n, Mode::IptNft, "full_chunked").map(|_| *n))
    {
        let _ = writeln!(
            o,
            "iptables (nft) at {} Services was loaded for the traffic measurements as 1,000-Service restores: {} in all (medians over rounds).\n",
            n_label(c),
            fmt_cell(&res.cell(c, Mode::IptNft, "full_chunked"), Unit::Secs)
        );
    }

    let _ = writeln!(o, "## Traffic\n");
    let _ = writeln!(
        o,
        "One connection at a time from a client pod (connect, read the backend's one-line reply until it closes, close): {} connections or {} s per measurement, after 50 unmeasured. UDP: one datagram and its reply per request, each from a new socket. iperf3: one TCP stream for {} s to the last Service's port 5201. \"no proxy\" dials the backend pod's address directly (its rows repeat the same measurement for \"first\" and \"last\").\n",
        cfg.tcp_count,
        cfg.traffic_ms / 1000,
        cfg.iperf_secs
    );
    let traffic_sizes: Vec<usize> = sizes
        .iter()
        .copied()
        .filter(|n| res.get(*n, Mode::NoProxy, "tcp_rate_last").is_some())
        .collect();
    for metric in &TRAFFIC {
        metric_table(
            &mut o,
            res,
            metric,
            &traffic_sizes,
            &Mode::ALL,
            &ours_vs_anchors(),
        );
    }

    let _ = writeln!(
        o,
        "## NodePort from outside the cluster: XDP, tc and kube-proxy's rules\n"
    );
    let _ = writeln!(
        o,
        "The bed's external client (198.18.0.100, on the LAN with the nodes) to node1's NodePort (198.18.0.1:{NODEPORT_TCP}/TCP, :{NODEPORT_UDP}/UDP) of a Service whose three endpoints are on pod C on node2: node1 translates (DNAT to the endpoint, SNAT to itself, as kube-proxy's masquerade for externalTrafficPolicy Cluster does), forwards the request out of the same LAN interface to node2, and the reply back to the client. *ours: XDP*: the socket-LB bed's agent (`--xdp auto`, which attaches generic XDP on a veth such as the bed's LAN interface), whose XDP program forwards both directions with XDP_TX; *ours: tc*: the tc bed's agent, with `--xdp=off`, translating at tc ingress and leaving the forwarding to the kernel; the anchors with kube-proxy's NodePort rules (iptables: KUBE-SERVICES' last rule -> KUBE-NODEPORTS -> KUBE-EXT-* (mark for masquerade) -> KUBE-SVC-* -> KUBE-SEP-*, MASQUERADE in POSTROUTING; nftables mode: the `service-nodeports` map -> `external-*` chain -> service chain); *no proxy*: the client sends to pod C's address and node1 just routes both ways (the floor). TCP and UDP as in the traffic tables, {} requests per measurement after 50 unmeasured, each a new flow; *one flow*: UDP on one socket with {} requests in flight for {:.1} s, each reply answered by a new request at once: the packet rate of an established flow, counting requests and replies (the packets node1 forwards). Generic XDP runs after the kernel has built the socket buffer (native XDP on a physical NIC runs before), so these rates understate what XDP saves on hardware; every process here (client, node1's forwarding, pod C's server) shares the machine's {} CPUs.\n",
        cfg.np_count,
        cfg.np_flow_window,
        cfg.np_flow_ms as f64 / 1000.0,
        mc.nproc,
    );
    let np_sizes: Vec<usize> = sizes
        .iter()
        .copied()
        .filter(|n| {
            NODE_PORT_COLUMNS
                .iter()
                .any(|m| res.get(*n, *m, "np_tcp_rate").is_some())
        })
        .collect();
    for metric in &NODE_PORT_TRAFFIC {
        metric_table(
            &mut o,
            res,
            metric,
            &np_sizes,
            &NODE_PORT_COLUMNS,
            &node_port_ratios(),
        );
    }

    let _ = writeln!(
        o,
        "## Per-packet cost at the LAN interface: XDP vs tc (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(
        o,
        "The socket-LB agent's own XDP and tc programs (found through their pinned links `xdp_generic@lan0` and `tc_ingress@lan0`) and maps, with N Services programmed (the same N as above; 100,000 too, which needs no traffic), on TCP packets of the NodePort Service above: *new flow*: a SYN from a new client port each call (service lookup, backend choice by flow hash, a free SNAT port, two conntrack inserts, DNAT + SNAT with checksums; at XDP also the FIB lookup, the MAC rewrite and the TTL); *established*: the same flow again (conntrack hit); *reply*: the backend's answer to node1, reverse-translated to the client. Run as they arrive on node1's LAN interface: from a thread inside node1's network namespace (where the XDP program's FIB lookup and the test skb's device are resolved), the context naming that interface as the ingress device (`struct xdp_md` ingress_ifindex / `struct __sk_buff` ifindex). Every XDP run must return XDP_TX and every tc run TC_ACT_OK with the packet translated as expected, or the measurement fails: the XDP numbers are its forwarding path, never a pass to tc. node1 has permanent neighbour entries for node2 and the external client (their real MACs) and routes made-up clients ({TEST_EXT_CLIENTS}) via the external client, so the FIB lookup resolves both directions. {} calls per kind and path, interleaved, each `repeat = 1` with a fresh copy of the packet; median of the kernel-reported durations. After each new-flow call its two conntrack entries are deleted (outside the measured time; no packet left the node, so no endpoint holds the port), so the SNAT ports taken are those of the recent NodePort traffic only, and the agent's conntrack is left as it was. *empty*: `return XDP_PASS` / `return TC_ACT_OK` with the same contexts: the measurement's own cost, included in the others. The last row divides the largest N by the smallest: flat is 1.\n",
        cfg.np_prog_calls
    );
    {
        let header: Vec<String> = [
            "Services",
            "XDP new flow",
            "tc new flow",
            "xdp ÷ tc",
            "XDP established",
            "tc established",
            "xdp ÷ tc",
            "XDP reply",
            "tc reply",
            "xdp ÷ tc",
            "XDP empty",
            "tc empty",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = |n: usize, k: &str| res.cell(n, Mode::SockLb, k);
        let np: Vec<usize> = sizes
            .iter()
            .copied()
            .filter(|n| res.get(*n, Mode::SockLb, "np_prog_xdp_new").is_some())
            .collect();
        let mut rows = Vec::new();
        for &n in &np {
            let mut row = vec![n_label(n)];
            for kind in ["new", "est", "reply"] {
                let (x, t) = (
                    c(n, &format!("np_prog_xdp_{kind}")),
                    c(n, &format!("np_prog_tc_{kind}")),
                );
                row.push(fmt_cell(&x, Unit::Nanos));
                row.push(fmt_cell(&t, Unit::Nanos));
                row.push(fmt_ratio(&x, &t));
            }
            row.push(fmt_cell(&c(n, "np_prog_xdp_empty"), Unit::Nanos));
            row.push(fmt_cell(&c(n, "np_prog_tc_empty"), Unit::Nanos));
            rows.push(row);
        }
        if let (Some(&lo), Some(&hi)) = (np.first(), np.last())
            && hi > lo
        {
            let mut row = vec![format!("{} ÷ {}", n_label(hi), n_label(lo))];
            for kind in ["new", "est", "reply"] {
                for path in ["xdp", "tc"] {
                    let k = format!("np_prog_{path}_{kind}");
                    row.push(fmt_ratio(&c(hi, &k), &c(lo, &k)));
                }
                row.push(String::new());
            }
            for k in ["np_prog_xdp_empty", "np_prog_tc_empty"] {
                row.push(fmt_ratio(&c(hi, k), &c(lo, k)));
            }
            rows.push(row);
        }
        table(&mut o, &header, &rows);
    }

    let _ = writeln!(
        o,
        "## Per-packet cost of the tc program (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(
        o,
        "The agent's own tc program and maps (found through its pinned link), {} calls per kind, each with `repeat = 1` and a fresh copy of the packet (with `repeat` > 1 the kernel reuses the buffer, which the DNAT has already rewritten, so later runs would measure the miss path). Median of the kernel-reported durations. *new flow*: a SYN to the last Service from a new source port each call (service lookup, backend choice, conntrack insert, DNAT); *established*: the same flow again; *reply*: the backend's answer, reverse-translated to the VIP; *miss*: a packet to a pod address; *empty program*: `return TC_ACT_OK`, the cost of the measurement itself; *lookup only*: a program doing one hash lookup of the same Service key in the agent's services map. The *warm* columns run the programs that leave the packet unchanged with `repeat = 10,000` on one buffer (median of 15 such calls): no per-call setup and warm caches, which is how the usual per-packet figures are taken; the difference to the single runs is what a single run adds. Reference from ANCHORS.md: a C XDP DNAT 113-132 ns, an empty program 22-26 ns, on this kind of machine. The XDP program: see the previous section.\n",
        cfg.prog_calls
    );
    {
        let header: Vec<String> = [
            "Services",
            "new flow",
            "established",
            "reply",
            "miss",
            "empty program",
            "lookup only",
            "miss, warm",
            "empty, warm",
            "lookup only, warm",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut rows = Vec::new();
        for &n in &sizes {
            if res.get(n, Mode::SockLb, "prog_hit_new").is_none() {
                continue;
            }
            let mut row = vec![n_label(n)];
            for k in [
                "prog_hit_new",
                "prog_hit_est",
                "prog_reply",
                "prog_miss",
                "prog_empty",
                "prog_lookup",
                "prog_miss_warm",
                "prog_empty_warm",
                "prog_lookup_warm",
            ] {
                row.push(fmt_cell(&res.cell(n, Mode::SockLb, k), Unit::Nanos));
            }
            rows.push(row);
        }
        table(&mut o, &header, &rows);
    }

    let _ = writeln!(o, "## The agent's own resources\n");
    let _ = writeln!(
        o,
        "The socket-LB agent process after its full load (medians over rounds): resident memory, its peak, CPU time (user + system) spent from the manifests' rename to its `sync complete`, CPU while idle (manifests polled every 10 ms) during the traffic measurements, and the kernel memory of its BPF maps (fdinfo `memlock`; set by the `--map-size-*` flags, not by N).\n"
    );
    {
        let header: Vec<String> = [
            "Services",
            "VmRSS",
            "VmHWM",
            "CPU for the full load",
            "CPU while idle",
            "BPF maps",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut rows = Vec::new();
        for &n in &sizes {
            if res.get(n, Mode::SockLb, "agent_rss").is_none() {
                continue;
            }
            rows.push(vec![
                n_label(n),
                fmt_cell(&res.cell(n, Mode::SockLb, "agent_rss"), Unit::MiB),
                fmt_cell(&res.cell(n, Mode::SockLb, "agent_hwm"), Unit::MiB),
                fmt_cell(&res.cell(n, Mode::SockLb, "agent_cpu_full"), Unit::Secs),
                fmt_cell(&res.cell(n, Mode::SockLb, "agent_cpu_idle"), Unit::Percent),
                fmt_cell(&res.cell(n, Mode::SockLb, "agent_maps"), Unit::MiB),
            ]);
        }
        table(&mut o, &header, &rows);
    }

    let _ = writeln!(o, "## Notes from this run\n");
    if res.notes.is_empty() {
        let _ = writeln!(o, "- none");
    }
    for n in &res.notes {
        let _ = writeln!(o, "- {}", n.replace('\n', " "));
    }
    o.push('\n');
    o
}

fn method_text(cfg: &Config) -> String {
    let sizes = cfg
        .sizes
        .iter()
        .map(|n| n_label(*n))
        .collect::<Vec<_>>()
        .join(", ");
    let big = cfg
        .big
        .map(|b| format!(" and {} (programming time only)", n_label(b)))
        .unwrap_or_default();
    let big_probe = cfg
        .big
        .map(|b| {
            format!(
                " (at {} Services, which carry no traffic, right after the full load: the add that follows may go over its limit and stop the agent)",
                n_label(b)
            )
        })
        .unwrap_or_default();
    format!(
        "- **Beds.** Every mode runs in its own 2-node emulated cluster of network namespaces (the test bed of `tests/src/bed.rs`, nodes and an external client on one LAN bridge): on node1 a client pod, backend pod A with nine addresses (198.19.1.3 and .200-.207, three for each Service that carries traffic; tb-echo on tcp/8080, a UDP echo on 5353 bound to each address so replies leave from the address asked, `iperf3 -s` on 5201), backend pod B (198.19.1.4, tb-echo tcp/8080), and node1's namespace between them that holds the rules or runs the agent; on node2, which runs no proxy, backend pod C with three addresses (198.19.2.2, .200, .201; tb-echo tcp/8080, the UDP echo on 5353), the endpoints of the NodePort Service; the external client (198.18.0.100) outside both. The Service address ranges are routed locally on node1 (with `accept_local`, which the tc path's reverse-translated replies need then), so a connection that nothing translates is refused at once with a RST (that is how \"answers\" and \"stops answering\" are told apart without timeouts; ICMP unreachables would be rate-limited). node1 sends no ICMP redirects (the client and node2 share its LAN) and has permanent neighbour entries for node2 and the external client (their real MACs). The client pod has `ip_local_port_range` 1024-65535 and `tcp_tw_reuse` 1. All addresses are in 198.18.0.0/15, inside these namespaces.\n\
- **Services.** N = {sizes}{big}. Every mode is given the same N Services with 3 endpoints each. The first and the last Service lead to pod A (ClusterIP; ports tcp/80 -> 8080, udp/53 -> 5353, tcp/5201 -> 5201; the last Service's tcp/80 is the last rule of KUBE-SERVICES); the second is of type NodePort (tcp/80 -> 8080 with nodePort {np_tcp}, udp/53 -> 5353 with nodePort {np_udp}, externalTrafficPolicy Cluster) with its endpoints on pod C on node2; the others are ClusterIP Services with one port and three endpoints with unique (address, port) that never receive traffic, so the rules and maps hold N Services x 3 endpoints in full. \"Add one Service\" adds a Service with pod A's three addresses; \"change one endpoint\" swaps its third endpoint for pod B (the clock stops when pod B answers); \"delete\" removes it.\n\
- **Modes.** *ours: socket LB*: `proxy-agent run --manifests DIR` in the node namespace with the client pod in the agent's cgroup (cgroup connect/sendmsg translation). It runs with the default `--xdp auto`: XDP on its LAN interface, in generic mode there because that interface is a veth (the agent's choice on veths: frames a veth peer sends carry offloaded checksums and XDP_TX frames need the peer's NAPI, which broke NodePort flows in native mode on this bed), so its NodePort results are the *ours: XDP* column. *ours: tc*: the same agent with `--socket-lb=false --xdp=off` (per-packet DNAT and reverse NAT at tc ingress, on the pod interfaces and on the LAN interface). Both agents run with `{flags}`: the manifests are polled every 10 ms (the default 200 ms would dominate small changes), the maps are sized for 100,000 Services at every N, and NodePorts are served on node1's IPv4 LAN address (as kube-proxy's IPv4 rules here). The agents keep a flow's conntrack entries, and the SNAT port they hold (4,536 ports per endpoint), until their LRU map evicts them: run as they are, the NodePort measurements would use up the ports towards pod C's three addresses within the run (seen here after about 11,000 flows: `dropped_snat_ports` counted and SYNs retried). So after each NodePort measurement the bench deletes the entries of NodePort flows idle for {ct_idle} s or more from the agent's conntrack map, as a conntrack timeout would; not sooner, because a port freed while the endpoint still holds the old connection in TIME_WAIT (60 s) makes the new SYN fail its PAWS check there (seen here as 10-16 ms stalls of 5-13 % of connections when the entries were deleted at once). *iptables (nft)* and *iptables-legacy*: kube-proxy's iptables mode reproduced rule for rule (kube-proxy's base chains and jump rules installed once, then every sync one `iptables-restore --noflush` with KUBE-SERVICES -> KUBE-SVC-* (`-m statistic --mode random --probability`) -> KUBE-SEP-* (DNAT), chain names from SHA-256/base32 as kube-proxy makes them, per-endpoint comments dropped above 1,000 endpoints as kube-proxy's large-cluster mode does, `iptables-save -t nat` first below that; partial syncs rewrite every top-level chain, so all of KUBE-SERVICES and KUBE-NODEPORTS, plus the changed Service's chains; the NodePort Service as KUBE-NODEPORTS -> KUBE-EXT-* (KUBE-MARK-MASQ, then its KUBE-SVC-*), reached from KUBE-SERVICES' last rule `-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`). *nftables mode*: kube-proxy's nftables mode reproduced (table `ip kube-proxy` with its base chains, sets and maps; the `service-ips` verdict map -> one chain per Service port with `numgen random mod N vmap` -> one chain per endpoint with `dnat`; nodePorts as `service-nodeports` elements for node1's address in `nodeport-ips` -> an `external-*` chain (mark for masquerade, then the service chain); the first sync one `nft -f`, later syncs only the changed chains and elements). *no proxy*: the client pod dials pod A directly, and the external client pod C through node1 (routed, not translated); the floor.\n\
- **Rounds.** {rounds} round(s) per size; in every round the modes take turns in a rotated order, and each does: full load from empty, traffic (ClusterIP from the client pod, then NodePort from the external client), add / change / delete one Service, then (socket-LB agent) the BPF_PROG_TEST_RUN measurements{big_probe}. Medians over rounds. A full load that takes over 10 s is measured once and its rules kept for the later rounds. Anchor commands run under time limits ({ipt_nft} s for iptables-nft-restore at 10,000 Services and more, {big_anchor} s for any full load above 10,000, {limit} s otherwise); a load stopped at its limit is reported as \"over N s\", and iptables is then loaded in 1,000-Service pieces (the same rules) so its traffic can still be measured. At {big_n} Services the anchors whose 10,000-Service load took over 10 s are skipped (\"skipped: budget\"), the socket-LB agent stands for both of ours (same agent, same writer), and the agent's full load may take {big_load} s and each later change {big_op} s: past that it is stopped (SIGKILL; a sync cannot be cut short and would load the CPU under the other measurements) and its remaining operations are reported as skipped.\n\
- **Marks.** † the rounds differ by more than {noisy:.0} % of their median: treat as noisy. ¹ one measurement only. Ratios a ÷ b are of the medians (ours ÷ anchor, or XDP ÷ tc).\n",
        flags = AGENT_FLAGS.join(" "),
        np_tcp = NODEPORT_TCP,
        np_udp = NODEPORT_UDP,
        ct_idle = CT_IDLE.as_secs(),
        rounds = cfg.rounds,
        ipt_nft = cfg.ipt_nft_limit.as_secs(),
        limit = cfg.limit.as_secs(),
        big_n = cfg.big.map(n_label).unwrap_or_else(|| "-".into()),
        big_load = cfg.big_load_limit.as_secs(),
        big_op = cfg.big_op_limit.as_secs(),
        big_anchor = cfg.big_anchor_limit.as_secs(),
        noisy = report::NOISY * 100.0,
    )
}

//! End-to-end tests of operating proxy-agent: its Prometheus metrics and
//! health endpoints, and agent restarts (SIGTERM and SIGKILL) that must not
//! disturb established or new connections. They need root and the agent
//! binary (`cargo build -p proxy-agent`, or `PROXY_AGENT_BIN`); without them
//! they fail, they never skip.
//!
//! Every agent runs in its own node namespace, so the default metrics
//! (127.0.0.1:10249) and healthz (0.0.0.0:10256) addresses never collide.
//! VIPs: 198.18.100.30-39.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use serde_json::Value;
use tests::client::{EchoStream, HttpResponse, http_get, http_request};
use tests::inspect::{TcxAttachment, netns_interfaces, tcx_attachments, tcx_attachments_here};
use tests::{
    Agent, Endpoint, EndpointSlice, Pod, Proto, Service, Tally, TestBed, find_status_service,
    in_netns, netns_attachments, status_backends, status_services, tcp_request, tcp_requests,
    udp_requests,
};

/// Per-request timeout.
const T: Duration = Duration::from_secs(2);
/// Time an agent may take to load, attach and program the maps.
const SYNC: Duration = Duration::from_secs(60);

/// Two backends on each of two nodes.
const FOUR: [(u8, &str); 4] = [(1, "op-1a"), (1, "op-1b"), (2, "op-2a"), (2, "op-2b")];

/// Builds a 2-node bed, runs `f` on it; on failure keeps the bed's directory and
/// prints the tail of every log before failing the test.
fn with_bed(f: impl FnOnce(&mut TestBed) -> Result<()>) {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    if let Err(e) = f(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("address literal"), port)
}

fn slice_for(service: &str, backends: &[Pod]) -> EndpointSlice {
    let mut s = EndpointSlice::new("default", service, "x1");
    for p in backends {
        s = s.endpoint(Endpoint::ready(
            &p.ip.to_string(),
            &format!("node{}", p.node),
        ));
    }
    s
}

/// `GET path` from inside namespace `ns`.
fn get(ns: &str, to: SocketAddr, path: &str) -> Result<HttpResponse> {
    in_netns(ns, || http_get(to, path, T))?.with_context(|| format!("GET {path} in {ns}"))
}

/// Prometheus text exposition: `name{labels}` -> value, for every sample line.
fn parse_metrics(text: &str) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("metric line without a value: {line:?}"))?;
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .with_context(|| format!("bad value in metric line {line:?}"))?,
        };
        ensure!(
            out.insert(key.to_string(), v).is_none(),
            "metric {key} appears twice"
        );
    }
    Ok(out)
}

fn sample(m: &BTreeMap<String, f64>, key: &str) -> Result<f64> {
    m.get(key)
        .copied()
        .with_context(|| format!("no sample {key} in the metrics"))
}

/// Scrapes node `ns`'s /metrics, checks the status and content type and parses it.
fn scrape(ns: &str) -> Result<(String, BTreeMap<String, f64>)> {
    let r = get(ns, addr("127.0.0.1", 10249), "/metrics")?;
    ensure!(
        r.status == 200,
        "/metrics answered {}: {}",
        r.status,
        r.body
    );
    ensure!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "/metrics content type {:?}",
        r.header("content-type")
    );
    let m = parse_metrics(&r.body)?;
    Ok((r.body, m))
}

/// Checks a histogram's series: cumulative buckets ending in +Inf == count.
fn check_histogram(m: &BTreeMap<String, f64>, name: &str) -> Result<f64> {
    let count = sample(m, &format!("{name}_count"))?;
    let sum = sample(m, &format!("{name}_sum"))?;
    ensure!(sum >= 0.0, "{name}_sum is {sum}");
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix(&format!("{name}_bucket{{le=\""))?
                .strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    ensure!(buckets.len() >= 2, "{name}: buckets {buckets:?}");
    ensure!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name}: buckets not cumulative: {buckets:?}"
    );
    let last = buckets.last().expect("at least two buckets");
    ensure!(
        last.0.is_infinite() && last.1 == count,
        "{name}: +Inf bucket {last:?} differs from count {count}"
    );
    Ok(count)
}

/// Checks a /healthz or /livez answer: 200, JSON with kube-proxy's fields.
fn check_healthy(r: &HttpResponse, what: &str) -> Result<()> {
    ensure!(r.status == 200, "{what} answered {}: {}", r.status, r.body);
    ensure!(
        r.header("content-type") == Some("application/json"),
        "{what}: content type {:?}",
        r.header("content-type")
    );
    let v: Value =
        serde_json::from_str(&r.body).with_context(|| format!("{what}: body {:?}", r.body))?;
    for field in ["lastUpdated", "currentTime"] {
        let t = v[field].as_str().unwrap_or_default();
        // RFC 3339, UTC: 2026-01-02T03:04:05Z (fractions allowed).
        ensure!(
            t.len() >= 20 && t.as_bytes()[4] == b'-' && t.contains('T') && t.ends_with('Z'),
            "{what}: {field} {t:?} is not an RFC 3339 time: {}",
            r.body
        );
    }
    ensure!(
        v["nodeEligible"] == Value::Bool(true),
        "{what}: nodeEligible not true: {}",
        r.body
    );
    Ok(())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Every metric family the agent promises, and the sample names it must have.
const METRICS: [&str; 9] = [
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "kubeproxy_network_programming_duration_seconds",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "proxy_services_not_programmed",
    "proxy_objects_rejected",
    "proxy_datapath_packets_total",
    "proxy_map_entries",
    "proxy_map_capacity",
];

/// (1) /metrics, /healthz and /livez answer with sensible content once the
/// agent synced; healthz is reachable on the node address, metrics only on
/// loopback; unknown paths are 404; an agent with `--healthz-timeout-s 1`
/// stays healthy while its changes are programmed in time.
#[test]
fn metrics_and_healthz_are_scraped() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.31";
        let mut backends = Vec::new();
        for (node, name) in FOUR {
            let p = bed.add_pod(node, name)?;
            bed.start_echo(&p, &[8080], &[5353])?;
            backends.push(p);
        }
        let client = bed.add_pod(1, "client")?;
        let svc = Service::cluster_ip("default", "metered", VIP)
            .port("http", 80, 8080, Proto::Tcp)
            .port("dns", 53, 5353, Proto::Udp);
        let slice = slice_for("metered", &backends)
            .port("http", 8080, Proto::Tcp)
            .port("dns", 5353, Proto::Udp);
        bed.write_manifest("metered-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("metered-slice.yaml", &slice.to_yaml())?;
        let agents = bed.start_agents(SYNC)?;
        let node1 = bed.node(1).clone();

        let (_, before) = scrape(&node1.ns)?;
        let new_before = sample(
            &before,
            "proxy_datapath_packets_total{outcome=\"translated_new\"}",
        )?;
        const N: usize = 30;
        Tally::new(&tcp_requests(&client.ns, addr(VIP, 80), N, T)?).expect_no_failures()?;
        Tally::new(&udp_requests(&client.ns, addr(VIP, 53), N, T)?).expect_no_failures()?;

        let (text, m) = scrape(&node1.ns)?;
        for name in METRICS {
            ensure!(
                text.contains(&format!("# TYPE {name} ")),
                "no `# TYPE {name}` in the metrics:\n{text}"
            );
        }
        let syncs = check_histogram(&m, "kubeproxy_sync_proxy_rules_duration_seconds")?;
        ensure!(syncs >= 1.0, "sync count {syncs}");
        let programmed = check_histogram(&m, "kubeproxy_network_programming_duration_seconds")?;
        ensure!(programmed >= 1.0, "network programming count {programmed}");
        let now = unix_now();
        for name in [
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        ] {
            let t = sample(&m, name)?;
            ensure!(
                t > now - 600.0 && t <= now + 5.0,
                "{name} is {t}, now is {now}"
            );
        }
        ensure!(sample(&m, "proxy_services_not_programmed")? == 0.0);
        ensure!(sample(&m, "proxy_objects_rejected")? == 0.0);
        let outcome = |o: &str| format!("proxy_datapath_packets_total{{outcome=\"{o}\"}}");
        let new_after = sample(&m, &outcome("translated_new"))?;
        ensure!(
            new_after - new_before >= (2 * N) as f64,
            "translated_new went from {new_before} to {new_after} over {} new flows",
            2 * N
        );
        ensure!(sample(&m, &outcome("reverse_translated"))? > 0.0);

        // Map usage agrees with `status` and with what was programmed.
        let status = agents[0].status_json()?;
        let frontends = status_services(&status).len();
        ensure!(
            frontends == 2,
            "status lists {frontends} frontends: {status:#}"
        );
        let svc_entries = sample(&m, "proxy_map_entries{map=\"svc_v2\"}")?;
        ensure!(
            svc_entries == frontends as f64,
            "proxy_map_entries{{map=\"svc_v2\"}} is {svc_entries}, {frontends} frontends programmed"
        );
        for map in status["maps"].as_array().context("status has no maps")? {
            let name = map["name"].as_str().context("map without a name")?;
            let cap = sample(&m, &format!("proxy_map_capacity{{map=\"{name}\"}}"))?;
            let entries = sample(&m, &format!("proxy_map_entries{{map=\"{name}\"}}"))?;
            ensure!(
                Some(cap as u64) == map["max_entries"].as_u64(),
                "capacity of {name}: metrics {cap}, status {map}"
            );
            ensure!(entries <= cap, "{name}: {entries} entries, capacity {cap}");
            if name == "backends_v1" {
                ensure!(
                    Some(entries as u64) == map["entries"].as_u64(),
                    "entries of {name}: metrics {entries}, status {map}"
                );
            }
        }

        // Health, on loopback and on the node address, and from the LAN.
        let hz = addr("127.0.0.1", 10256);
        check_healthy(&get(&node1.ns, hz, "/healthz")?, "/healthz")?;
        check_healthy(&get(&node1.ns, hz, "/livez")?, "/livez")?;
        let node_hz = SocketAddr::new(node1.ip.into(), 10256);
        check_healthy(
            &get(&node1.ns, node_hz, "/healthz")?,
            "node-address /healthz",
        )?;
        check_healthy(
            &get(bed.ext_ns(), node_hz, "/healthz")?,
            "/healthz from LAN",
        )?;
        check_healthy(&get(&bed.node(2).ns, hz, "/healthz")?, "node2 /healthz")?;
        let (_, m2) = scrape(&bed.node(2).ns)?;
        ensure!(sample(&m2, "proxy_map_entries{map=\"svc_v2\"}")? == 2.0);

        // Metrics are not served on the node address.
        let remote_metrics = in_netns(bed.ext_ns(), || {
            http_get(SocketAddr::new(node1.ip.into(), 10249), "/metrics", T)
        })?;
        ensure!(
            remote_metrics.is_err(),
            "metrics answered on the node address from the LAN: {remote_metrics:?}"
        );

        // Unknown paths, wrong server, wrong method.
        for (port, path) in [
            (10256, "/nope"),
            (10256, "/metrics"),
            (10249, "/healthz"),
            (10249, "/metricsx"),
        ] {
            let r = get(&node1.ns, addr("127.0.0.1", port), path)?;
            ensure!(r.status == 404, "GET :{port}{path} answered {}", r.status);
        }
        let post = in_netns(&node1.ns, || http_request(hz, "POST", "/healthz", T))??;
        ensure!(post.status == 405, "POST /healthz answered {}", post.status);
        let head = in_netns(&node1.ns, || http_request(hz, "HEAD", "/healthz", T))??;
        ensure!(
            head.status == 200 && head.body.is_empty(),
            "HEAD /healthz: {head:?}"
        );

        // An agent with a 1 s healthz timeout: healthy after sync, and still
        // healthy after a change it programmed in time.
        let node2 = bed.node(2).clone();
        bed.stop_agent(&agents[1]);
        let manifests = bed.manifests_dir().to_path_buf();
        let strict = bed.start_agent_with(2, &manifests, &["--healthz-timeout-s", "1"])?;
        let g = strict.wait_for_sync(1, SYNC)?;
        check_healthy(&get(&node2.ns, hz, "/healthz")?, "strict /healthz")?;
        let (_, m_before) = scrape(&node2.ns)?;
        let queued_before = sample(
            &m_before,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        )?;
        let fewer = slice_for("metered", &backends[..3])
            .port("http", 8080, Proto::Tcp)
            .port("dns", 5353, Proto::Udp);
        bed.write_manifest("metered-slice.yaml", &fewer.to_yaml())?;
        strict.wait_for_sync(g + 1, SYNC)?;
        thread::sleep(Duration::from_millis(1500));
        check_healthy(
            &get(&node2.ns, hz, "/healthz")?,
            "strict /healthz 1.5 s after a change",
        )?;
        let (_, m_after) = scrape(&node2.ns)?;
        ensure!(
            check_histogram(&m_after, "kubeproxy_network_programming_duration_seconds")?
                > check_histogram(&m_before, "kubeproxy_network_programming_duration_seconds")?,
            "the change was not counted in kubeproxy_network_programming_duration_seconds"
        );
        ensure!(
            sample(
                &m_after,
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
            )? > queued_before,
            "last queued timestamp did not move with the change"
        );
        // One backend entry per (address, port): 3 pods x 2 ports.
        let backend_entries = sample(&m_after, "proxy_map_entries{map=\"backends_v1\"}")?;
        ensure!(
            backend_entries == 6.0,
            "backends_v1 has {backend_entries} entries after the change, want 6"
        );
        Ok(())
    });
}

/// Results of one long-lived stream's worker.
struct StreamResult {
    backend: String,
    exchanges: u64,
    error: Option<String>,
    slowest: Duration,
}

/// Exchanges a line on `s` every `every` until `stop` (or `limit` passes);
/// stops at the first error: a broken stream does not come back.
fn stream_worker(
    i: usize,
    mut s: EchoStream,
    stop: &AtomicBool,
    every: Duration,
    limit: Instant,
) -> StreamResult {
    let mut r = StreamResult {
        backend: s.backend.clone(),
        exchanges: 0,
        error: None,
        slowest: Duration::ZERO,
    };
    while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
        let started = Instant::now();
        if let Err(e) = s.exchange(&format!("s{i}-{}", r.exchanges), T) {
            r.error = Some(format!("after {} exchanges: {e:#}", r.exchanges));
            return r;
        }
        r.slowest = r.slowest.max(started.elapsed());
        r.exchanges += 1;
        thread::sleep(every);
    }
    r
}

/// Short connections one after another until `stop` (or `limit` passes, or
/// `max` connections); every outcome is kept, with the slowest connection's time.
fn dial_loop(
    to: SocketAddr,
    stop: &AtomicBool,
    limit: Instant,
    max: usize,
) -> (Vec<tests::Outcome>, Duration) {
    let mut out = Vec::new();
    let mut slowest = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) && Instant::now() < limit && out.len() < max {
        let started = Instant::now();
        out.push(tcp_request(to, T).map_err(|e| format!("{e:#}")));
        slowest = slowest.max(started.elapsed());
        thread::sleep(Duration::from_millis(5));
    }
    (out, slowest)
}

/// Samples the tcx attachments of `ifaces` every 10 ms until `stop`; returns
/// the number of samples and every distinct snapshot, in the order seen.
fn tcx_sampler(
    ifaces: &[(String, u32)],
    stop: &AtomicBool,
    limit: Instant,
) -> (usize, Vec<Vec<TcxAttachment>>) {
    let mut samples = 0;
    let mut distinct: Vec<Vec<TcxAttachment>> = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
        let now = tcx_attachments_here(ifaces);
        samples += 1;
        if distinct.last() != Some(&now) {
            distinct.push(now);
        }
        thread::sleep(Duration::from_millis(10));
    }
    (samples, distinct)
}

/// Where each thread of `pid` waits in the kernel (for a hung agent).
fn kernel_stacks(pid: u32) -> String {
    let mut out = format!("kernel stacks of {pid}:\n");
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for t in tasks.flatten().take(64) {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        out.push_str(&format!(
            "{} {} wchan={}\n{}",
            p.display(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        ));
    }
    out
}

/// Sets the flag when dropped, so that workers stop on every exit path.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Opens long-lived streams from the calling thread's namespace until every
/// backend has `per_backend` of them (at most `attempts` connections).
fn open_streams(
    to: SocketAddr,
    backends: &[String],
    per_backend: usize,
    attempts: usize,
) -> Result<Vec<EchoStream>> {
    let mut kept: Vec<EchoStream> = Vec::new();
    for _ in 0..attempts {
        if kept.len() >= backends.len() * per_backend {
            break;
        }
        let s = EchoStream::connect(to, T)?;
        ensure!(s.peer == to, "stream peer is {}, dialled {to}", s.peer);
        ensure!(
            backends.contains(&s.backend),
            "unexpected backend {}",
            s.backend
        );
        if kept.iter().filter(|k| k.backend == s.backend).count() < per_backend {
            kept.push(s);
        }
    }
    ensure!(
        kept.len() == backends.len() * per_backend,
        "{attempts} connections did not reach every backend {per_backend} times: {:?}",
        kept.iter().map(|s| &s.backend).collect::<Vec<_>>()
    );
    Ok(kept)
}

/// The tcx links on node interfaces the agent attaches to (lan0 and the pod
/// veths), ingress.
fn agent_links(all: &[TcxAttachment]) -> Vec<&TcxAttachment> {
    all.iter()
        .filter(|a| {
            a.direction == "tcx_ingress" && (a.iface == "lan0" || a.iface.starts_with("pv"))
        })
        .collect()
}

/// (2) Restarting node1's agent five times, alternating SIGTERM and SIGKILL,
/// while 8 long-lived streams exchange lines every 50 ms and a client dials
/// short connections back to back: no stream breaks, no connection fails,
/// the tcx links stay attached the whole time (same link ids, new programs),
/// and each new agent adopts the pinned maps.
#[test]
fn agent_restarts_do_not_disturb_traffic() {
    with_bed(|bed| {
        let test_start = Instant::now();
        const VIP: &str = "198.18.100.32";
        const STREAM_PORT: u16 = 9000;
        let mut backends = Vec::new();
        for (node, name) in FOUR {
            let p = bed.add_pod(node, name)?;
            bed.start_echo_streams(&p, &[8080], &[], &[STREAM_PORT])?;
            backends.push(p);
        }
        let streamer = bed.add_pod(1, "streamer")?;
        let dialer = bed.add_pod(1, "dialer")?;
        // A NodePort Service: the ClusterIP from pods, the NodePorts from the external client.
        let svc = Service::cluster_ip("default", "steady", VIP)
            .type_("NodePort")
            .spec(
                "ports",
                serde_json::json!([
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30800},
                    {"name": "stream", "port": STREAM_PORT, "targetPort": STREAM_PORT, "protocol": "TCP", "nodePort": 30900},
                ]),
            );
        let slice = slice_for("steady", &backends)
            .port("http", 8080, Proto::Tcp)
            .port("stream", STREAM_PORT, Proto::Tcp);
        bed.write_manifest("steady-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("steady-slice.yaml", &slice.to_yaml())?;
        let agents = bed.start_agents(SYNC)?;
        let mut agent: Agent = agents[0].clone();
        let node1 = bed.node(1).clone();
        let names: Vec<String> = backends.iter().map(|p| p.name.clone()).collect();
        let http = addr(VIP, 80);
        let stream_vip = addr(VIP, STREAM_PORT);

        let mut streams = in_netns(&streamer.ns, || open_streams(stream_vip, &names, 2, 200))??;
        // Through node1's NodePort from outside: one per backend, so half of them are SNATed
        // to node2's backends.
        let np_http = addr("198.18.0.1", 30800);
        let np_stream = addr("198.18.0.1", 30900);
        let ext_ns = bed.ext_ns().to_string();
        streams.extend(in_netns(&ext_ns, || {
            open_streams(np_stream, &names, 1, 200)
        })??);
        let links_before = tcx_attachments(&node1.ns)?;
        let attached_before: Vec<TcxAttachment> =
            agent_links(&links_before).into_iter().cloned().collect();
        ensure!(
            attached_before.iter().any(|a| a.iface == "lan0")
                && attached_before
                    .iter()
                    .filter(|a| a.iface.starts_with("pv"))
                    .count()
                    == 4,
            "expected tcx ingress on lan0 and 4 pod veths of node1: {links_before:?}"
        );
        ensure!(
            attached_before.iter().all(|a| a.link_id != 0),
            "attached without links: {attached_before:?}"
        );
        let ifaces = netns_interfaces(&node1.ns)?;
        let (_, m_before) = scrape(&node1.ns)?;
        let new_flows_before = sample(
            &m_before,
            "proxy_datapath_packets_total{outcome=\"translated_new\"}",
        )?;
        eprintln!(
            "setup took {:?}; streams on {:?}",
            test_start.elapsed(),
            streams.iter().map(|s| &s.backend).collect::<Vec<_>>()
        );

        let stop = AtomicBool::new(false);
        // Hard limit for every worker, whatever happens in the main thread.
        let limit = Instant::now() + Duration::from_secs(60);
        let restarts_started = Instant::now();
        let (
            cycles,
            stream_results,
            ((dials, slowest_dial), (np_dials, np_slowest)),
            (samples, tcx_history),
        ) = thread::scope(|scope| -> Result<_> {
            let _stop_guard = StopOnDrop(&stop);
            let stop = &stop;
            let workers: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(i, s)| {
                    scope.spawn(move || stream_worker(i, s, stop, Duration::from_millis(50), limit))
                })
                .collect();
            let dialer_ns = dialer.ns.clone();
            let dial =
                scope.spawn(move || in_netns(&dialer_ns, || dial_loop(http, stop, limit, 20_000)));
            let ext_ns = ext_ns.clone();
            let dial_np =
                scope.spawn(move || in_netns(&ext_ns, || dial_loop(np_http, stop, limit, 20_000)));
            let node_ns = node1.ns.clone();
            let ifaces = &ifaces;
            let sampler =
                scope.spawn(move || in_netns(&node_ns, || tcx_sampler(ifaces, stop, limit)));

            // Let traffic flow before the first restart.
            thread::sleep(Duration::from_millis(500));
            let mut cycles: Vec<(Signal, Duration)> = Vec::new();
            for i in 0..5 {
                let started = Instant::now();
                let sig = if i % 2 == 0 {
                    Signal::SIGTERM
                } else {
                    Signal::SIGKILL
                };
                let exited = bed.kill_with(agent.pid, sig, Duration::from_secs(2))?;
                ensure!(
                    exited,
                    "agent {} did not exit within 2 s of {sig}",
                    agent.pid
                );
                if sig == Signal::SIGTERM {
                    ensure!(
                        agent.log_text().contains("datapath left in place"),
                        "agent did not log a clean stop after SIGTERM:\n{}",
                        agent.log_tail(20)
                    );
                }
                thread::sleep(Duration::from_millis(300));
                agent = bed.start_agent(1)?;
                agent
                    .wait_for_sync(1, Duration::from_secs(10))
                    .map_err(|e| e.context(kernel_stacks(agent.pid)))?;
                let took = started.elapsed();
                cycles.push((sig, took));
                let log = agent.log_text();
                ensure!(
                    log.lines()
                        .any(|l| l.contains("adopted pinned maps") && l.contains("services=6")),
                    "restart {i}: the new agent did not adopt the 6 programmed frontends (2 ClusterIP, 2 NodePort x IPv4/IPv6):\n{}",
                    agent.log_tail(20)
                );
                ensure!(
                    !log.contains("defunct pinned link"),
                    "restart {i}: a pinned link was recreated:\n{}",
                    agent.log_tail(20)
                );
                // Same links, each holding a new program.
                let now = tcx_attachments(&node1.ns)?;
                let now: Vec<&TcxAttachment> = agent_links(&now);
                ensure!(
                    now.len() == attached_before.len(),
                    "restart {i}: links {now:?}, before {attached_before:?}"
                );
                for (a, b) in now.iter().zip(&attached_before) {
                    ensure!(
                        a.iface == b.iface && a.link_id == b.link_id,
                        "restart {i}: link of {} changed: {a:?}, before {b:?}",
                        b.iface
                    );
                }
                let h = get(&node1.ns, addr("127.0.0.1", 10256), "/healthz")?;
                check_healthy(&h, &format!("/healthz after restart {i}"))?;
                ensure!(
                    took < Duration::from_secs(3),
                    "restart {i} ({sig}) took {took:?}"
                );
                thread::sleep(Duration::from_millis(200));
            }
            // Traffic on the last agent for a moment, then stop everything.
            thread::sleep(Duration::from_millis(500));
            stop.store(true, Ordering::Relaxed);
            let results: Vec<StreamResult> = workers
                .into_iter()
                .map(|w| w.join().expect("stream worker panicked"))
                .collect();
            let dials = dial.join().expect("dialer panicked")?;
            let np_dials = dial_np.join().expect("NodePort dialer panicked")?;
            let sampled = sampler.join().expect("sampler panicked")?;
            Ok((cycles, results, (dials, np_dials), sampled))
        })?;
        let traffic_time = restarts_started.elapsed();

        // Streams: all alive, all answered every 50 ms or so.
        let broken: Vec<String> = stream_results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.error
                    .as_ref()
                    .map(|e| format!("stream {i} ({}): {e}", r.backend))
            })
            .collect();
        ensure!(broken.is_empty(), "streams broke: {broken:#?}");
        // A lost segment would show as a retransmission (200 ms or more).
        let slowest = stream_results
            .iter()
            .map(|r| r.slowest)
            .max()
            .unwrap_or_default();
        ensure!(
            slowest < Duration::from_millis(500),
            "a stream exchange took {slowest:?}"
        );
        let min_exchanges = (traffic_time.as_millis() / 50 / 4) as u64;
        for (i, r) in stream_results.iter().enumerate() {
            ensure!(
                r.exchanges >= min_exchanges,
                "stream {i} ({}) made only {} exchanges in {traffic_time:?}",
                r.backend,
                r.exchanges
            );
        }
        // New connections: none failed, all through the VIP.
        let tally = Tally::new(&dials);
        tally
            .expect_no_failures()
            .context("new connections during restarts")?;
        ensure!(tally.ok >= 100, "only {} new connections made", tally.ok);
        let b: Vec<&str> = names.iter().map(String::as_str).collect();
        tally.expect_spread(&b, 0.3)?;
        ensure!(
            dials.iter().flatten().all(|r| r.peer == http),
            "a new connection saw a peer other than {http}"
        );
        // A lost SYN would show as a retransmission after 1 s.
        ensure!(
            slowest_dial < Duration::from_millis(900),
            "a new connection took {slowest_dial:?}"
        );
        // The same through the NodePort, from outside the cluster.
        let np_tally = Tally::new(&np_dials);
        np_tally
            .expect_no_failures()
            .context("new NodePort connections during restarts")?;
        ensure!(
            np_tally.ok >= 50,
            "only {} NodePort connections made",
            np_tally.ok
        );
        np_tally.expect_spread(&b, 0.3)?;
        ensure!(
            np_dials.iter().flatten().all(|r| r.peer == np_http),
            "a NodePort connection saw a peer other than {np_http}"
        );
        ensure!(
            np_slowest < Duration::from_millis(900),
            "a new NodePort connection took {np_slowest:?}"
        );
        // tcx: attached in every sample, one link per interface throughout,
        // a new program after every restart.
        ensure!(samples >= 50, "only {samples} tcx samples");
        let mut programs: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        for (n, snapshot) in tcx_history.iter().enumerate() {
            let now = agent_links(snapshot);
            for b in &attached_before {
                let found: Vec<&&TcxAttachment> =
                    now.iter().filter(|a| a.iface == b.iface).collect();
                ensure!(
                    found.len() == 1 && found[0].link_id == b.link_id,
                    "tcx snapshot {n}: {} has {found:?}, expected link {}",
                    b.iface,
                    b.link_id
                );
                programs
                    .entry(b.iface.clone())
                    .or_default()
                    .insert(found[0].prog_id);
            }
        }
        for (iface, progs) in &programs {
            ensure!(
                progs.len() == 6,
                "{iface}: programs {progs:?} over 5 restarts (want 6 distinct)"
            );
        }

        // Counters were adopted, not reset.
        let (_, m_after) = scrape(&node1.ns)?;
        let new_flows_after = sample(
            &m_after,
            "proxy_datapath_packets_total{outcome=\"translated_new\"}",
        )?;
        let counter_diff: Vec<String> = m_after
            .iter()
            .filter(|(k, _)| k.starts_with("proxy_datapath_packets_total"))
            .filter_map(|(k, v)| {
                let d = v - m_before.get(k).copied().unwrap_or(0.0);
                (d != 0.0).then(|| format!("{k}+{d}"))
            })
            .collect();
        eprintln!("node1 counters during the restarts: {counter_diff:?}");
        let ports: BTreeSet<u16> = dials.iter().flatten().map(|r| r.local.port()).collect();
        let np_ports: BTreeSet<u16> = np_dials.iter().flatten().map(|r| r.local.port()).collect();
        eprintln!(
            "dialer: {} connections from {} distinct local ports",
            tally.ok,
            ports.len()
        );
        // Each distinct 5-tuple is one new flow; a source port the kernel
        // reuses finds its earlier conntrack entry (same backend).
        let new_flows = new_flows_after - new_flows_before;
        ensure!(
            new_flows >= (ports.len() + np_ports.len()) as f64
                && new_flows <= (tally.ok + np_tally.ok) as f64,
            "translated_new grew by {new_flows} over {} new connections from {} distinct ports; counter changes {counter_diff:?}",
            tally.ok,
            ports.len()
        );

        // The last agent: service programmed, attachments in place.
        let status = agent.status_json()?;
        for port in [80, STREAM_PORT] {
            let svc = find_status_service(&status, VIP, port, Proto::Tcp)
                .with_context(|| format!("{VIP}:{port} not in status: {status:#}"))?;
            ensure!(
                status_backends(svc).len() == 4,
                "backends of {VIP}:{port}: {svc}"
            );
        }
        let attached = status["attachments"]
            .as_array()
            .context("status has no attachments")?;
        for b in &attached_before {
            ensure!(
                attached.iter().any(|a| a["interface"] == b.iface.as_str()),
                "status does not list {}: {attached:?}",
                b.iface
            );
        }
        let kernel_view = netns_attachments(&node1.ns)?;
        for b in &attached_before {
            ensure!(
                kernel_view
                    .iter()
                    .any(|l| l.starts_with(&format!("{} tcx_ingress", b.iface))),
                "{} not attached at the end: {kernel_view:?}",
                b.iface
            );
        }

        let per_stream: Vec<u64> = stream_results.iter().map(|r| r.exchanges).collect();
        eprintln!(
            "restarts: {cycles:?}; traffic {traffic_time:?}; stream exchanges {per_stream:?}, slowest {slowest:?}; new connections {tally}, slowest {slowest_dial:?}; tcx samples {samples}, {} distinct; whole test {:?}",
            tcx_history.len(),
            test_start.elapsed()
        );
        ensure!(
            test_start.elapsed() < Duration::from_secs(60),
            "test took {:?}",
            test_start.elapsed()
        );
        Ok(())
    });
}

/// (3) Before its first sync the agent answers /healthz and /livez with 503
/// (kube-proxy's semantics) and its metrics show no sync: an agent whose API
/// server never answers (a kubeconfig pointing at a closed loopback port).
#[test]
fn healthz_fails_before_the_first_sync() {
    let mut bed = TestBed::new(1).expect("building the test bed (needs root)");
    let r = (|| -> Result<()> {
        let kubeconfig = bed.dir().join("kubeconfig-nowhere");
        // Port 9 on the node's own loopback: nothing listens there.
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: nowhere\n  cluster: {server: \"http://127.0.0.1:9\"}\nusers:\n- name: nobody\n  user: {token: none}\ncontexts:\n- name: nowhere\n  context: {cluster: nowhere, user: nobody}\ncurrent-context: nowhere\n",
        )?;
        let agent = bed.start_agent_kube(1, &kubeconfig, &[])?;
        let ns = bed.node(1).ns.clone();
        let hz = addr("127.0.0.1", 10256);
        // Wait (bounded) for the endpoint to listen.
        let deadline = Instant::now() + Duration::from_secs(20);
        let first = loop {
            match in_netns(&ns, || http_get(hz, "/healthz", T))? {
                Ok(r) => break r,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "/healthz never answered; agent log:\n{}",
                        agent.log_tail(20)
                    )));
                }
                Err(_) => {
                    ensure!(agent.is_running(), "agent exited:\n{}", agent.log_tail(20));
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        // Still unsynced a moment later, on both paths.
        thread::sleep(Duration::from_millis(500));
        for (path, r) in [
            ("/healthz (first answer)", first),
            ("/healthz", get(&ns, hz, "/healthz")?),
            ("/livez", get(&ns, hz, "/livez")?),
        ] {
            ensure!(r.status == 503, "{path} answered {}: {}", r.status, r.body);
            let v: Value =
                serde_json::from_str(&r.body).with_context(|| format!("{path}: {:?}", r.body))?;
            ensure!(
                v["lastUpdated"] == "" && v["currentTime"].as_str().is_some_and(|t| !t.is_empty()),
                "{path}: {}",
                r.body
            );
        }
        let (_, m) = scrape(&ns)?;
        ensure!(check_histogram(&m, "kubeproxy_sync_proxy_rules_duration_seconds")? == 0.0);
        ensure!(sample(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds")? == 0.0);
        ensure!(
            agent.is_running() && agent.generation().is_none(),
            "the agent synced or exited:\n{}",
            agent.log_tail(20)
        );
        Ok(())
    })();
    if let Err(e) = r {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

/// Polls `path` on node 1's healthz port until it answers `want`.
fn wait_health(ns: &str, path: &str, want: u16, timeout: Duration) -> Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = get(ns, addr("127.0.0.1", 10256), path)?;
        if r.status == want {
            return Ok(r);
        }
        ensure!(
            Instant::now() < deadline,
            "{path} still answers {} (want {want}): {}",
            r.status,
            r.body
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// (9) A hook the configuration requires that the kernel refuses to attach makes /healthz and
/// /livez fail with the reason and `status` exit non-zero; once the attach succeeds (retried
/// every poll) both are healthy again. The failure is real: a directory where the tc link's
/// pin belongs makes BPF_OBJ_GET fail with EACCES, so the agent cannot adopt or pin a link on
/// lan0.
#[test]
fn missing_hook_fails_health() {
    let mut bed = TestBed::new(1).expect("building the test bed (needs root)");
    let res = (|| -> Result<()> {
        let bpffs = bed.agent_bpffs(1);
        let blocker = bpffs.join("links").join("tc_ingress@lan0");
        std::fs::create_dir_all(&blocker)
            .with_context(|| format!("creating {}", blocker.display()))?;
        let agent = bed.start_agent(1)?;
        agent.wait_for_sync(1, SYNC)?;
        let ns = bed.node(1).ns.clone();
        for path in ["/healthz", "/livez"] {
            let r = wait_health(&ns, path, 503, Duration::from_secs(10))?;
            ensure!(
                r.body.contains("tc ingress not attached on lan0"),
                "{path} 503 without the reason: {}",
                r.body
            );
            let v: Value = serde_json::from_str(&r.body)
                .with_context(|| format!("{path}: body {:?}", r.body))?;
            ensure!(v["missingHooks"].is_array(), "{path}: {}", r.body);
        }
        let err = agent
            .status_json()
            .err()
            .context("status exited 0 with a hook missing")?;
        ensure!(
            format!("{err:#}").contains("required hooks not attached"),
            "status failed without naming the missing hook: {err:#}"
        );
        let on_lan0: Vec<String> = netns_attachments(&ns)?
            .into_iter()
            .filter(|a| a.starts_with("lan0 "))
            .collect();
        ensure!(
            on_lan0.is_empty(),
            "attached on lan0 although the agent reports it missing: {on_lan0:?}"
        );

        std::fs::remove_dir(&blocker).with_context(|| format!("removing {}", blocker.display()))?;
        let r = wait_health(&ns, "/healthz", 200, Duration::from_secs(10))?;
        check_healthy(&r, "/healthz after the attach")?;
        check_healthy(&get(&ns, addr("127.0.0.1", 10256), "/livez")?, "/livez")?;
        let status = agent.status_json()?;
        ensure!(
            status["sync"]["missing_hooks"]
                .as_array()
                .is_some_and(|a| a.is_empty()),
            "status still reports missing hooks: {}",
            status["sync"]
        );
        Ok(())
    })();
    if let Err(e) = res {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

/// Runs `proxy-agent check ARGS -o json` in `ns`: (exit success, the document).
fn check_json(ns: &str, args: &[String]) -> Result<(bool, Value)> {
    let out = tests::cmd::run_output(
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", tests::netns_path(ns).display()))
            .arg("--")
            .arg(tests::agent_bin()?)
            .arg("check")
            .args(args)
            .args(["-o", "json"])
            .env("NO_COLOR", "1"),
        Duration::from_secs(30),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("check printed {text:?}"))?;
    Ok((out.status.success(), v))
}

fn hook_modes(check: &Value) -> Vec<(String, String)> {
    check["kernel"]["hooks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            (
                h["hook"].as_str().unwrap_or("?").to_string(),
                h["mode"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// (10) `check` with the bed agent's flags reports this kernel as it is (the release the
/// kernel gives, tcx and XDP links present, every probed helper and map type there, each hook
/// on its preferred mode), changes nothing (no bpffs directory, nothing attached), follows the
/// flags (--xdp=off, --socket-lb=false), and exits non-zero where `run` could not work (a
/// cgroup that is not cgroup v2, a bpffs path outside a BPF filesystem).
#[test]
fn check_reports_this_kernel() {
    let bed = TestBed::new(1).expect("building the test bed (needs root)");
    let res = (|| -> Result<()> {
        let node = bed.node(1).clone();
        let bpffs = bed.agent_bpffs(1);
        let cg = node
            .cgroup
            .clone()
            .context("the bed's node has no cgroup")?;
        let mut args: Vec<String> = [
            "--interfaces",
            "lan0",
            "--pod-interfaces",
            "pv*",
            "--bpffs",
            &bpffs.to_string_lossy(),
            "--cgroup",
            &cg.to_string_lossy(),
        ]
        .map(String::from)
        .to_vec();
        let (ok, v) = check_json(&node.ns, &args)?;
        ensure!(ok, "check failed on this kernel: {v:#}");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
        ensure!(
            v["kernel"]["probes"]["kernel"] == release.trim(),
            "kernel {} (uname: {release})",
            v["kernel"]["probes"]["kernel"]
        );
        ensure!(
            v["kernel"]["probes"]["tcx"] == true && v["kernel"]["probes"]["xdp_link"] == true,
            "{v:#}"
        );
        let missing: Vec<&Value> = v["kernel"]["probes"]["features"]
            .as_array()
            .context("no features")?
            .iter()
            .filter(|f| f["supported"] != true)
            .collect();
        ensure!(missing.is_empty(), "reported missing: {missing:?}");
        let want = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        ensure!(
            hook_modes(&v)
                == want(&[
                    ("tc", "tcx"),
                    ("xdp", "bpf_link"),
                    ("socket_lb", "cgroup_link")
                ]),
            "{:?}",
            hook_modes(&v)
        );
        ensure!(!bpffs.exists(), "check created {}", bpffs.display());
        ensure!(
            netns_attachments(&node.ns)?.is_empty(),
            "check attached something: {:?}",
            netns_attachments(&node.ns)?
        );

        let mut off = args.clone();
        off.extend(["--xdp=off", "--socket-lb=false"].map(String::from));
        let (ok, v) = check_json(&node.ns, &off)?;
        ensure!(ok, "{v:#}");
        ensure!(
            hook_modes(&v) == want(&[("tc", "tcx"), ("xdp", "off"), ("socket_lb", "off")]),
            "{:?}",
            hook_modes(&v)
        );

        // A cgroup that is not cgroup v2 and a bpffs outside bpffs: both named, exit 1.
        let tmp = std::env::temp_dir();
        args[5] = tmp.join("not-bpffs").to_string_lossy().into_owned();
        args[7] = tmp.to_string_lossy().into_owned();
        let (ok, v) = check_json(&node.ns, &args)?;
        ensure!(!ok, "check passed with a bad cgroup and bpffs: {v:#}");
        let errors = v["errors"].to_string();
        ensure!(
            errors.contains("not a cgroup v2 directory")
                && errors.contains("not on a BPF filesystem"),
            "errors do not name both problems: {errors}"
        );
        Ok(())
    })();
    if let Err(e) = res {
        eprintln!("{e:#}");
        panic!("{e:#}");
    }
}

/// The tc filters on `dev` ingress in `ns`, one line each, as `tc filter show` prints them.
fn tc_filters(ns: &str, dev: &str) -> Result<Vec<String>> {
    let out = tests::cmd::run_ok(
        std::process::Command::new("tc").args(["-n", ns, "filter", "show", "dev", dev, "ingress"]),
        Duration::from_secs(20),
    )?;
    Ok(out
        .lines()
        .filter(|l| l.contains("handle"))
        .map(str::to_string)
        .collect())
}

/// Our legacy filter's priority (loader::NL_PRIORITY, 0xc5e1).
const OUR_PREF: &str = "pref 50657 ";

/// (11) `--tc-attach netlink`: the tc program goes in as a direct-action cls_bpf filter on
/// clsact (no tcx link), beside a foreign filter already there (a classic-BPF cls_bpf filter
/// at priority 100 that matches nothing); ClusterIP traffic from a pod is translated through
/// it; the filter stays while no agent runs; a restarted agent swaps its program in place
/// (still one filter of ours, a new program id) while new connections go on without a
/// failure; `cleanup` removes ours and leaves the foreign one.
#[test]
fn netlink_tc_attach_coexists_restarts_and_cleans_up() {
    let mut bed = TestBed::new(1).expect("building the test bed (needs root)");
    let res = (|| -> Result<()> {
        const VIP: &str = "198.18.100.38";
        let server = bed.add_pod(1, "nl-server")?;
        bed.start_echo(&server, &[8080], &[])?;
        let client = bed.add_pod(1, "nl-client")?;
        let svc =
            Service::cluster_ip("default", "netlinked", VIP).port("http", 80, 8080, Proto::Tcp);
        let slice =
            slice_for("netlinked", std::slice::from_ref(&server)).port("http", 8080, Proto::Tcp);
        bed.write_manifest("nl-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("nl-slice.yaml", &slice.to_yaml())?;
        let ns = bed.node(1).ns.clone();
        // The pod's node-side interface carries its traffic into the node.
        let dev = netns_interfaces(&ns)?
            .into_iter()
            .map(|(name, _)| name)
            .find(|i| i.starts_with("pv"))
            .context("no pod interface on node1")?;
        for args in [
            vec!["qdisc", "add", "dev", &dev, "clsact"],
            vec![
                "filter",
                "add",
                "dev",
                &dev,
                "ingress",
                "prio",
                "100",
                "bpf",
                "bytecode",
                "1,6 0 0 0,",
            ],
        ] {
            tests::cmd::run_ok(
                std::process::Command::new("tc")
                    .args(["-n", &ns])
                    .args(&args),
                Duration::from_secs(20),
            )?;
        }
        let dir = bed.manifests_dir().to_path_buf();
        let flags = ["--tc-attach", "netlink", "--socket-lb=false", "--xdp=off"];
        let agent = bed.start_agent_with(1, &dir, &flags)?;
        agent.wait_for_sync(1, SYNC)?;
        let ours = |f: &[String]| -> Vec<String> {
            f.iter().filter(|l| l.contains(OUR_PREF)).cloned().collect()
        };
        let wait_ours = || -> Result<Vec<String>> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let f = tc_filters(&ns, &dev)?;
                if !ours(&f).is_empty() || Instant::now() > deadline {
                    return Ok(f);
                }
                thread::sleep(Duration::from_millis(100));
            }
        };
        let f = wait_ours()?;
        let mine = ours(&f);
        ensure!(
            mine.len() == 1 && mine[0].contains("direct-action") && mine[0].contains("tc_ingress"),
            "not one direct-action filter of ours on {dev}: {f:?}"
        );
        ensure!(
            f.iter()
                .any(|l| l.contains("pref 100 ") && l.contains("bytecode")),
            "the foreign filter went: {f:?}"
        );
        let tcx: Vec<TcxAttachment> = tcx_attachments(&ns)?;
        ensure!(tcx.is_empty(), "tcx programs in netlink mode: {tcx:?}");
        let status = agent.status_json()?;
        ensure!(
            hook_modes(&status["sync"]).first() == Some(&("tc".into(), "netlink".into())),
            "status: {}",
            status["sync"]["kernel"]
        );
        let n = 20;
        Tally::new(&tcp_requests(&client.ns, addr(VIP, 80), n, T)?).expect_no_failures()?;

        bed.stop_agent(&agent);
        Tally::new(&tcp_requests(&client.ns, addr(VIP, 80), n, T)?)
            .expect_no_failures()
            .context("while no agent runs")?;
        // New connections keep being made while the new agent starts and swaps its program
        // into the filter: none may fail.
        let stop = AtomicBool::new(false);
        let client_ns = client.ns.clone();
        let (agent, after, during) = thread::scope(|scope| -> Result<_> {
            let traffic = scope.spawn(|| {
                let mut all = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match tcp_requests(&client_ns, addr(VIP, 80), 5, T) {
                        Ok(o) => all.extend(o),
                        Err(e) => return Err(e),
                    }
                }
                Ok(all)
            });
            let run = (|| -> Result<_> {
                let agent = bed.start_agent_with(1, &dir, &flags)?;
                agent.wait_for_sync(1, SYNC)?;
                let deadline = Instant::now() + Duration::from_secs(10);
                let after = loop {
                    let f = tc_filters(&ns, &dev)?;
                    if ours(&f) != mine || Instant::now() > deadline {
                        break f;
                    }
                    thread::sleep(Duration::from_millis(100));
                };
                // A little traffic after the swap too.
                thread::sleep(Duration::from_millis(300));
                Ok((agent, after))
            })();
            stop.store(true, Ordering::Relaxed);
            let during = traffic.join().expect("traffic thread")?;
            let (agent, after) = run?;
            Ok((agent, after, during))
        })?;
        ensure!(!during.is_empty(), "no connections made during the restart");
        Tally::new(&during)
            .expect_no_failures()
            .context("connections during the restart and program swap")?;
        let mine2 = ours(&after);
        ensure!(
            mine2.len() == 1 && mine2 != mine,
            "restart did not swap the program in place (before {mine:?}, after {after:?})"
        );
        ensure!(
            after.iter().any(|l| l.contains("pref 100 ")),
            "the foreign filter went at restart: {after:?}"
        );
        Tally::new(&tcp_requests(&client.ns, addr(VIP, 80), n, T)?).expect_no_failures()?;

        bed.stop_agent(&agent);
        agent.cleanup()?;
        let f = tc_filters(&ns, &dev)?;
        ensure!(ours(&f).is_empty(), "cleanup left our filter: {f:?}");
        ensure!(
            f.iter().any(|l| l.contains("pref 100 ")),
            "cleanup removed the foreign filter: {f:?}"
        );
        Ok(())
    })();
    if let Err(e) = res {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

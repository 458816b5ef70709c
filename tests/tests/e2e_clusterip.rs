//! End-to-end tests of ClusterIP Services through proxy-agent on the emulated
//! cluster. They need root and the agent binary (`cargo build -p proxy-agent`,
//! or `PROXY_AGENT_BIN`); without them they fail, they never skip.
//!
//! Every test builds its own bed (unique names) and uses its own VIPs in
//! 198.18.100.0/24, so they run concurrently.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tests::manifests::EndpointPort;
use tests::{
    Agent, Endpoint, EndpointSlice, Endpoints, Outcome, Pod, Proto, Service, Tally, TestBed,
    find_status_service, netns_attachments, status_backends, tcp_requests, udp_requests,
};

/// Per-request timeout.
const T: Duration = Duration::from_secs(2);
/// Time an agent may take to load, attach and program the maps.
const SYNC: Duration = Duration::from_secs(60);

/// Two backends on each of two nodes.
const FOUR: [(u8, &str); 4] = [(1, "web-1a"), (1, "web-1b"), (2, "web-2a"), (2, "web-2b")];

/// Builds a 2-node bed, runs `f` on it; on failure keeps the bed's directory and
/// prints the tail of every log (agent, echo servers) before failing the test.
fn with_bed(f: impl FnOnce(&mut TestBed) -> Result<()>) {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    if let Err(e) = f(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

/// Adds backend pods running tb-echo on `tcp`/`udp`, and a client pod on node1.
fn pods(
    bed: &mut TestBed,
    backends: &[(u8, &str)],
    tcp: &[u16],
    udp: &[u16],
) -> Result<(Vec<Pod>, Pod)> {
    let mut v = Vec::new();
    for (node, name) in backends {
        let p = bed.add_pod(*node, name)?;
        bed.start_echo(&p, tcp, udp)?;
        v.push(p);
    }
    let client = bed.add_pod(1, "client")?;
    Ok((v, client))
}

fn slice_for(namespace: &str, service: &str, backends: &[&Pod]) -> EndpointSlice {
    let mut s = EndpointSlice::new(namespace, service, "x1");
    for p in backends {
        s = s.endpoint(Endpoint::ready(
            &p.ip.to_string(),
            &format!("node{}", p.node),
        ));
    }
    s
}

fn addr(vip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(vip.parse().expect("VIP literal"), port)
}

fn names(pods: &[&Pod]) -> Vec<String> {
    pods.iter().map(|p| p.name.clone()).collect()
}

/// Every request answered, by exactly `backends`, each with at least half its
/// fair share; the client saw only `vip` as its peer; the backend saw the
/// client's own address (no SNAT) and answered on `target_port`.
fn check_balanced(
    what: &str,
    outcomes: &[Outcome],
    backends: &[String],
    vip: SocketAddr,
    client: IpAddr,
    target_port: u16,
) -> Result<Tally> {
    let tally = Tally::new(outcomes);
    let ctx = || format!("{what} to {vip}: {tally}");
    tally.expect_no_failures().with_context(ctx)?;
    let b: Vec<&str> = backends.iter().map(String::as_str).collect();
    tally.expect_spread(&b, 0.5).with_context(ctx)?;
    for r in outcomes.iter().flatten() {
        ensure!(
            r.peer == vip,
            "{what}: client saw peer {} instead of {vip}",
            r.peer
        );
        ensure!(
            r.client.ip() == client,
            "{what}: backend {} saw source {} instead of the client pod {client}",
            r.backend,
            r.client
        );
        ensure!(
            r.backend_port == target_port,
            "{what}: {} answered on port {} instead of {target_port}",
            r.backend,
            r.backend_port
        );
    }
    Ok(tally)
}

fn wait_for_all(agents: &[Agent], above: &[u64]) -> Result<()> {
    for (a, g) in agents.iter().zip(above) {
        a.wait_for_sync(g + 1, SYNC)?;
    }
    Ok(())
}

/// Polls `status -o json` until `pred` holds.
fn wait_status(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = agent.status_json()?;
        if pred(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("node{} status never showed {what}: {s:#}", agent.node);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (a) A pod on node1 reaches a ClusterIP with backends on both nodes, over TCP
/// and UDP, from a thread in its namespace (tc path) and from a process in its
/// cgroup (socket path when the agent attaches there).
#[test]
fn clusterip_from_pod_reaches_backends_on_both_nodes() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.11";
        let (backends, client) = pods(bed, &FOUR, &[8080], &[5353])?;
        let svc = Service::cluster_ip("default", "web", VIP)
            .port("http", 80, 8080, Proto::Tcp)
            .port("dns", 53, 5353, Proto::Udp);
        let all: Vec<&Pod> = backends.iter().collect();
        let slice = slice_for("default", "web", &all)
            .port("http", 8080, Proto::Tcp)
            .port("dns", 5353, Proto::Udp);
        bed.write_manifest("web-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("web-slice.yaml", &slice.to_yaml())?;
        bed.start_agents(SYNC)?;

        let (tcp_vip, udp_vip) = (addr(VIP, 80), addr(VIP, 53));
        let want = names(&all);
        let me = IpAddr::V4(client.ip);
        let tcp = tcp_requests(&client.ns, tcp_vip, 300, T)?;
        check_balanced("TCP from pod thread", &tcp, &want, tcp_vip, me, 8080)?;
        let udp = udp_requests(&client.ns, udp_vip, 300, T)?;
        check_balanced("UDP from pod thread", &udp, &want, udp_vip, me, 5353)?;

        let tcp = bed.pod_requests(&client, Proto::Tcp, tcp_vip, 120, T)?;
        check_balanced("TCP from pod process", &tcp, &want, tcp_vip, me, 8080)?;
        let udp = bed.pod_requests(&client, Proto::Udp, udp_vip, 120, T)?;
        check_balanced("UDP from pod process", &udp, &want, udp_vip, me, 5353)?;
        Ok(())
    });
}

/// (b) One VIP, two ports; targetPort by name (`web`) and by number; the
/// EndpointSlice carries the Service port names with resolved numbers.
#[test]
fn clusterip_multi_port_named_target_port() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.12";
        let (backends, client) = pods(bed, &[(1, "mp-1a"), (2, "mp-2a")], &[8080, 9090], &[])?;
        let svc = Service::cluster_ip("default", "multi", VIP)
            .port("http", 80, "web", Proto::Tcp)
            .port("metrics", 9100, 9090, Proto::Tcp);
        let all: Vec<&Pod> = backends.iter().collect();
        let slice = slice_for("default", "multi", &all)
            .port("http", 8080, Proto::Tcp)
            .port("metrics", 9090, Proto::Tcp);
        bed.write_manifest("multi-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("multi-slice.yaml", &slice.to_yaml())?;
        bed.start_agents(SYNC)?;

        let want = names(&all);
        let me = IpAddr::V4(client.ip);
        let http = tcp_requests(&client.ns, addr(VIP, 80), 60, T)?;
        check_balanced("http port", &http, &want, addr(VIP, 80), me, 8080)?;
        let metrics = tcp_requests(&client.ns, addr(VIP, 9100), 60, T)?;
        check_balanced("metrics port", &metrics, &want, addr(VIP, 9100), me, 9090)?;
        Ok(())
    });
}

/// (c) A selectorless Service with a hand-written v1 Endpoints object reaches
/// exactly the listed addresses.
#[test]
fn clusterip_selectorless_with_manual_endpoints() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.13";
        let (backends, client) = pods(bed, &FOUR, &[8080], &[])?;
        let svc = Service::cluster_ip("default", "manual", VIP)
            .no_selector()
            .port("", 80, 8080, Proto::Tcp);
        let listed = [&backends[1], &backends[2]];
        let eps = Endpoints::new("default", "manual").subset(
            &[
                (&listed[0].ip.to_string(), "node1"),
                (&listed[1].ip.to_string(), "node2"),
            ],
            &[EndpointPort::new("", 8080, Proto::Tcp)],
        );
        bed.write_manifest("manual-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("manual-endpoints.yaml", &eps.to_yaml())?;
        bed.start_agents(SYNC)?;

        let out = tcp_requests(&client.ns, addr(VIP, 80), 100, T)?;
        check_balanced(
            "selectorless",
            &out,
            &names(&listed),
            addr(VIP, 80),
            IpAddr::V4(client.ip),
            8080,
        )?;
        Ok(())
    });
}

/// (d) A backend removed from the EndpointSlice gets no new connections once the
/// agents have synced the change.
#[test]
fn clusterip_backend_removal() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.14";
        let (backends, client) = pods(bed, &FOUR, &[8080], &[])?;
        let svc = Service::cluster_ip("default", "shrink", VIP).port("http", 80, 8080, Proto::Tcp);
        let all: Vec<&Pod> = backends.iter().collect();
        let slice =
            |pods: &[&Pod]| slice_for("default", "shrink", pods).port("http", 8080, Proto::Tcp);
        bed.write_manifest("shrink-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("shrink-slice.yaml", &slice(&all).to_yaml())?;
        let agents = bed.start_agents(SYNC)?;
        let vip = addr(VIP, 80);
        let me = IpAddr::V4(client.ip);
        let before = tcp_requests(&client.ns, vip, 100, T)?;
        check_balanced("before removal", &before, &names(&all), vip, me, 8080)?;

        let removed = &backends[3];
        let kept: Vec<&Pod> = backends[..3].iter().collect();
        let generations: Vec<u64> = agents.iter().map(|a| a.generation().unwrap_or(0)).collect();
        bed.write_manifest("shrink-slice.yaml", &slice(&kept).to_yaml())?;
        wait_for_all(&agents, &generations)?;
        // A periodic resync could also bump the generation: make sure the change itself is in.
        let gone = removed.ip.to_string();
        for a in &agents {
            wait_status(a, "the removed backend gone", |s| {
                find_status_service(s, VIP, 80, Proto::Tcp)
                    .is_some_and(|svc| status_backends(svc).iter().all(|b| b.0 != gone))
            })?;
        }

        let after = tcp_requests(&client.ns, vip, 100, T)?;
        let t = check_balanced("after removal", &after, &names(&kept), vip, me, 8080)?;
        ensure!(
            !t.per_backend.contains_key(&removed.name),
            "{} still answered",
            removed.name
        );
        Ok(())
    });
}

/// (e) `status -o json` shows the programmed Services with VIP, port, protocol,
/// type and backends, map usage, counters and attachments.
#[test]
fn status_json_lists_programmed_services() {
    with_bed(|bed| {
        const VIP_WEB: &str = "198.18.100.15";
        const VIP_API: &str = "198.18.100.16";
        let (backends, client) = pods(bed, &FOUR, &[8080], &[5353])?;
        let web = Service::cluster_ip("default", "web", VIP_WEB)
            .port("http", 80, 8080, Proto::Tcp)
            .port("dns", 53, 5353, Proto::Udp);
        let all: Vec<&Pod> = backends.iter().collect();
        let web_slice = slice_for("default", "web", &all)
            .port("http", 8080, Proto::Tcp)
            .port("dns", 5353, Proto::Udp);
        let api_pods = [&backends[2], &backends[3]];
        let api = Service::cluster_ip("prod", "api", VIP_API).port("https", 8443, 8080, Proto::Tcp);
        let api_slice = slice_for("prod", "api", &api_pods).port("https", 8080, Proto::Tcp);
        bed.write_manifest("web-svc.yaml", &web.to_yaml())?;
        bed.write_manifest("web-slice.yaml", &web_slice.to_yaml())?;
        bed.write_manifest("api-svc.yaml", &api.to_yaml())?;
        bed.write_manifest("api-slice.yaml", &api_slice.to_yaml())?;
        let agents = bed.start_agents(SYNC)?;

        let expect = |pods: &[&Pod], port: u16| -> Vec<(String, u16)> {
            let mut v: Vec<(String, u16)> = pods.iter().map(|p| (p.ip.to_string(), port)).collect();
            v.sort();
            v
        };
        let cases = [
            (VIP_WEB, 80, Proto::Tcp, "web", expect(&all, 8080)),
            (VIP_WEB, 53, Proto::Udp, "web", expect(&all, 5353)),
            (VIP_API, 8443, Proto::Tcp, "api", expect(&api_pods, 8080)),
        ];
        for agent in &agents {
            let status = agent.status_json()?;
            for (vip, port, proto, name, want) in &cases {
                let svc = find_status_service(&status, vip, *port, *proto).with_context(|| {
                    format!(
                        "node{}: no {vip}:{port}/{proto:?} in status: {status:#}",
                        agent.node
                    )
                })?;
                ensure!(svc["type"] == "ClusterIP", "type of {vip}:{port}: {svc}");
                ensure!(
                    svc["name"].as_str().is_some_and(|n| n.contains(name)),
                    "name of {vip}:{port} should mention {name}: {svc}"
                );
                let got = status_backends(svc);
                let got_addrs: Vec<(String, u16)> =
                    got.iter().map(|b| (b.0.clone(), b.1)).collect();
                ensure!(
                    &got_addrs == want,
                    "backends of {vip}:{port}: {got:?}, want {want:?}"
                );
                ensure!(
                    got.iter().all(|b| b.2 == "active"),
                    "backend states of {vip}:{port}: {got:?}"
                );
            }
            let maps = status["maps"]
                .as_array()
                .context("status has no maps array")?;
            ensure!(!maps.is_empty(), "status lists no maps");
            for m in maps {
                let (Some(_), Some(e), Some(max)) = (
                    m["name"].as_str(),
                    m["entries"].as_u64(),
                    m["max_entries"].as_u64(),
                ) else {
                    bail!("map entry without name/entries/max_entries: {m}");
                };
                ensure!(e <= max, "map {m} has more entries than max_entries");
            }
            ensure!(
                status["counters"].is_object(),
                "status has no counters object: {status:#}"
            );
            let attached = status["attachments"]
                .as_array()
                .context("status has no attachments")?;
            ensure!(
                attached.iter().any(|a| a["interface"] == "lan0"),
                "node{}: nothing attached to lan0: {attached:?}",
                agent.node
            );
        }

        // Counters move with traffic.
        let sum = |s: &Value| -> u64 {
            s["counters"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, v)| v.as_u64())
                .sum()
        };
        let before = sum(&agents[0].status_json()?);
        let out = tcp_requests(&client.ns, addr(VIP_WEB, 80), 20, T)?;
        Tally::new(&out).expect_no_failures()?;
        wait_status(&agents[0], "counters growing after 20 connections", |s| {
            sum(s) > before
        })?;
        Ok(())
    });
}

/// (f) `cleanup` after the agent stopped removes every pin and detaches every
/// program; a second `cleanup` succeeds too.
#[test]
fn cleanup_removes_pins_and_programs() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.18";
        let (backends, client) = pods(bed, &[(1, "cl-1a"), (2, "cl-2a")], &[8080], &[])?;
        let svc = Service::cluster_ip("default", "gone", VIP).port("http", 80, 8080, Proto::Tcp);
        let all: Vec<&Pod> = backends.iter().collect();
        let slice = slice_for("default", "gone", &all).port("http", 8080, Proto::Tcp);
        bed.write_manifest("gone-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("gone-slice.yaml", &slice.to_yaml())?;
        let agents = bed.start_agents(SYNC)?;
        let out = tcp_requests(&client.ns, addr(VIP, 80), 20, T)?;
        Tally::new(&out).expect_no_failures()?;

        for a in &agents {
            let node = bed.node(a.node).clone();
            let mut attached = netns_attachments(&node.ns)?;
            if let Some(cg) = &node.cgroup {
                attached.extend(tests::cgroup_attachments(cg)?);
            }
            ensure!(
                !attached.is_empty(),
                "node{}: agent attached nothing",
                a.node
            );
            ensure!(
                a.bpffs.is_dir(),
                "{} missing while the agent runs",
                a.bpffs.display()
            );
        }
        for a in &agents {
            bed.stop_agent(a);
        }
        for round in 1..=2 {
            for a in &agents {
                a.cleanup()
                    .with_context(|| format!("cleanup round {round} on node{}", a.node))?;
                let node = bed.node(a.node).clone();
                let pins: Vec<_> = match std::fs::read_dir(&a.bpffs) {
                    Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                    Err(_) => Vec::new(),
                };
                ensure!(pins.is_empty(), "round {round}: pins left: {pins:?}");
                let mut attached = netns_attachments(&node.ns)?;
                if let Some(cg) = &node.cgroup {
                    attached.extend(tests::cgroup_attachments(cg)?);
                }
                ensure!(
                    attached.is_empty(),
                    "round {round}: still attached on node{}: {attached:?}",
                    a.node
                );
                let bpftool = tests::inspect::bpftool_net_show_json(&node.ns)?;
                for hook in ["xdp", "tc"] {
                    let n = bpftool[0][hook].as_array().map_or(0, Vec::len);
                    ensure!(
                        n == 0,
                        "round {round}: bpftool net show lists {hook} on node{}: {bpftool}",
                        a.node
                    );
                }
            }
        }

        // The datapath is gone: the VIP no longer answers, pods still do.
        let out = tcp_requests(&client.ns, addr(VIP, 80), 1, Duration::from_secs(1))?;
        ensure!(Tally::new(&out).ok == 0, "VIP still answers after cleanup");
        let direct = SocketAddr::new(backends[1].ip.into(), 8080);
        Tally::new(&tcp_requests(&client.ns, direct, 5, T)?).expect_no_failures()?;
        Ok(())
    });
}

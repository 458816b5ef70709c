//! End-to-end tests of socket load balancing (cgroup connect4/sendmsg4/recvmsg4/getpeername4)
//! on the emulated cluster: pod processes run in their node's cgroup, which the agent attaches
//! to with `--cgroup`. Needs root and the agent binary; fails, never skips.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, ensure};
use serde_json::Value;
use tests::{Agent, Endpoint, EndpointSlice, Pod, Proto, Service, Tally, TestBed};

const T: Duration = Duration::from_secs(2);
const SYNC: Duration = Duration::from_secs(60);

fn with_bed(f: impl FnOnce(&mut TestBed) -> Result<()>) {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    if let Err(e) = f(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

/// Four backends (two per node) serving TCP 8080 and UDP 5353 behind `vip` ports 80 and 53,
/// and a client pod on node1. Returns the backends' names and the client.
fn setup(bed: &mut TestBed, vip: &str) -> Result<(Vec<String>, Pod)> {
    let mut slice = EndpointSlice::new("default", "sock", "x1")
        .port("http", 8080, Proto::Tcp)
        .port("dns", 5353, Proto::Udp);
    let mut names = Vec::new();
    for (node, name) in [(1, "s-1a"), (1, "s-1b"), (2, "s-2a"), (2, "s-2b")] {
        let p = bed.add_pod(node, name)?;
        bed.start_echo(&p, &[8080], &[5353])?;
        slice = slice.endpoint(Endpoint::ready(&p.ip.to_string(), &format!("node{node}")));
        names.push(name.to_string());
    }
    let svc = Service::cluster_ip("default", "sock", vip)
        .port("http", 80, 8080, Proto::Tcp)
        .port("dns", 53, 5353, Proto::Udp);
    bed.write_manifest("sock-svc.yaml", &svc.to_yaml())?;
    bed.write_manifest("sock-slice.yaml", &slice.to_yaml())?;
    let client = bed.add_pod(1, "client")?;
    Ok((names, client))
}

fn counter(agent: &Agent, name: &str) -> Result<u64> {
    let s = agent.status_json()?;
    s["counters"][name]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no counter {name} in {s:#}"))
}

const TC_TRANSLATIONS: [&str; 3] = [
    "translated_new",
    "translated_established",
    "reverse_translated",
];

fn counters(agent: &Agent, names: &[&str]) -> Result<Vec<u64>> {
    names.iter().map(|n| counter(agent, n)).collect()
}

/// Requests from the client pod's process: all answered, spread over every backend, the
/// application sees the VIP as its peer (getpeername for TCP, recvmsg's source for UDP), and
/// the backend sees the pod's own address.
fn requests_ok(
    bed: &TestBed,
    client: &Pod,
    proto: Proto,
    vip: SocketAddr,
    backends: &[String],
) -> Result<()> {
    let out = bed.pod_requests(client, proto, vip, 100, T)?;
    let tally = Tally::new(&out);
    tally.expect_no_failures()?;
    let b: Vec<&str> = backends.iter().map(String::as_str).collect();
    tally.expect_spread(&b, 0.5)?;
    for r in out.iter().flatten() {
        ensure!(r.peer == vip, "{proto:?}: application saw peer {}", r.peer);
        ensure!(
            r.client.ip() == IpAddr::V4(client.ip),
            "backend saw {}",
            r.client
        );
    }
    Ok(())
}

fn vip(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(s.parse().unwrap(), port)
}

#[test]
fn socket_lb_translates_at_connect_and_the_tc_path_stays_idle() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.41";
        let (backends, client) = setup(bed, VIP)?;
        let agents = bed.start_agents(SYNC)?;
        let status = agents[0].status_json()?;
        let hooks: Vec<&str> = status["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["interface"] == "cgroup")
            .filter_map(|a| a["hook"].as_str())
            .collect();
        ensure!(
            hooks.len() == 8,
            "socket-LB hooks attached: {hooks:?} in {status:#}"
        );

        let tc_before: Vec<Vec<u64>> = agents
            .iter()
            .map(|a| counters(a, &TC_TRANSLATIONS))
            .collect::<Result<_>>()?;
        let sock_before = counter(&agents[0], "sock_translated")?;
        requests_ok(bed, &client, Proto::Tcp, vip(VIP, 80), &backends)?;
        requests_ok(bed, &client, Proto::Udp, vip(VIP, 53), &backends)?;

        let sock = counter(&agents[0], "sock_translated")? - sock_before;
        ensure!(sock >= 200, "sock_translated moved by {sock}, want >= 200");
        ensure!(
            counter(&agents[0], "sock_reverse_translated")? >= 200,
            "getpeername/recvmsg translations missing"
        );
        for (a, before) in agents.iter().zip(&tc_before) {
            let after = counters(a, &TC_TRANSLATIONS)?;
            ensure!(
                &after == before,
                "node{}: tc translation counters moved for socket-LB flows: {before:?} -> {after:?}",
                a.node
            );
        }
        Ok(())
    });
}

#[test]
fn socket_lb_off_falls_back_to_the_tc_path() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.42";
        let (backends, client) = setup(bed, VIP)?;
        let dir = bed.manifests_dir().to_path_buf();
        let agents: Vec<Agent> = (1..=2)
            .map(|n| bed.start_agent_with(n, &dir, &["--socket-lb=false"]))
            .collect::<Result<_>>()?;
        for a in &agents {
            a.wait_for_sync(1, SYNC)?;
        }
        let status: Value = agents[0].status_json()?;
        ensure!(
            !status["attachments"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["interface"] == "cgroup"),
            "socket LB attached despite --socket-lb=false: {status:#}"
        );
        // A reused client port may meet its own earlier flow: new or established, both count.
        let tc_total = |a: &Agent| -> Result<u64> {
            Ok(counter(a, "translated_new")? + counter(a, "translated_established")?)
        };
        let before = tc_total(&agents[0])?;
        requests_ok(bed, &client, Proto::Tcp, vip(VIP, 80), &backends)?;
        requests_ok(bed, &client, Proto::Udp, vip(VIP, 53), &backends)?;
        let tc = tc_total(&agents[0])? - before;
        ensure!(
            tc >= 200,
            "tc path translated {tc} requests' flows, want >= 200"
        );
        ensure!(counter(&agents[0], "sock_translated")? == 0);
        Ok(())
    });
}

/// A connected UDP socket keeps its backend (no per-packet NAT): when that backend is removed,
/// the agent ends the socket (SOCK_DESTROY in the pod's namespace), the application sees an
/// error, and its next socket reaches a live backend. Without that, the socket would keep
/// talking to the removed (but still running) backend.
#[test]
fn connected_udp_sockets_to_a_removed_backend_are_ended() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.43";
        let mut pods = Vec::new();
        for (node, name) in [(1, "u-1a"), (2, "u-2a")] {
            let p = bed.add_pod(node, name)?;
            bed.start_echo(&p, &[], &[5353])?;
            pods.push(p);
        }
        let slice = |keep: &[&Pod]| udp_slice("udp", keep);
        let svc = Service::cluster_ip("default", "udp", VIP).port("dns", 53, 5353, Proto::Udp);
        bed.write_manifest("udp-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("udp-slice.yaml", &slice(&[&pods[0], &pods[1]]))?;
        let client = bed.add_pod(1, "client")?;
        let agents = bed.start_agents(SYNC)?;

        let log = udp_client(bed, &client, VIP)?;
        let used = one_backend(&log, VIP)?;
        let (removed, kept) = if pods[0].name == used {
            (&pods[0], &pods[1])
        } else {
            (&pods[1], &pods[0])
        };
        let g = agents[0].generation().unwrap_or(1);
        bed.write_manifest("udp-slice.yaml", &slice(&[kept]))?;
        agents[0].wait_for_sync(g + 1, SYNC)?;
        ended_and_moved(&log, &removed.name, &kept.name)?;
        ensure!(
            agents[0].log_text().contains("ended connected UDP sockets"),
            "agent log: {}",
            agents[0].log_tail(20)
        );
        Ok(())
    });
}

/// The slice of Service `svc`'s UDP port dns (5353) with the pods `keep` as endpoints.
fn udp_slice(svc: &str, keep: &[&Pod]) -> String {
    let mut s = EndpointSlice::new("default", svc, "x1").port("dns", 5353, Proto::Udp);
    for p in keep {
        s = s.endpoint(Endpoint::ready(
            &p.ip.to_string(),
            &format!("node{}", p.node),
        ));
    }
    s.to_yaml()
}

/// A client process in `client` (in its cgroup: socket LB) sending over one connected UDP
/// socket to `vip`:53 every 20 ms, reconnecting after a failure; returns its output file.
fn udp_client(bed: &mut TestBed, client: &Pod, vip: &str) -> Result<std::path::PathBuf> {
    let bin = tests::helper_bin("tb-client")?;
    let target = format!("{vip}:53");
    let (_pid, log) = bed.spawn_full(
        &client.ns,
        client.cgroup.as_deref(),
        &bin.to_string_lossy(),
        &[
            "--udp-connected",
            &target,
            "--count",
            "600",
            "--interval-ms",
            "20",
            "--timeout-ms",
            "500",
        ],
        &[],
    )?;
    Ok(log)
}

/// At least `min` outcomes of a client's output file (waits up to 20 s for them).
fn outcomes(log: &std::path::Path, min: usize) -> Result<Vec<tests::Outcome>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Only complete lines: the client may be mid-write.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let v = tests::client::parse_client_output(complete)?;
        if v.len() >= min {
            return Ok(v);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "client produced {} outcomes, waiting for {min}",
            v.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The one backend a connected client's first 10 exchanges reached, each answered from the VIP.
fn one_backend(log: &std::path::Path, vip_addr: &str) -> Result<String> {
    let first = outcomes(log, 10)?;
    let used = match &first[0] {
        Ok(r) => r.backend.clone(),
        Err(e) => anyhow::bail!("first request failed: {e}"),
    };
    for o in &first {
        let r = o
            .as_ref()
            .map_err(|e| anyhow::anyhow!("before removal: {e}"))?;
        ensure!(r.backend == used, "one connected socket, one backend");
        ensure!(
            r.peer == vip(vip_addr, 53),
            "getpeername shows the VIP, not {}",
            r.peer
        );
    }
    Ok(used)
}

/// Called right after the sync that removed `removed`: the client's socket was ended (an
/// error), no reply came from `removed` after the sync, and a new socket reaches `kept`.
fn ended_and_moved(log: &std::path::Path, removed: &str, kept: &str) -> Result<()> {
    let at_sync = outcomes(log, 0)?.len();
    let after = outcomes(log, at_sync + 40)?;
    let late: Vec<&tests::Outcome> = after[at_sync..].iter().collect();
    // One exchange may have been in flight when the socket was ended.
    let from_removed = late
        .iter()
        .skip(1)
        .filter(|o| o.as_ref().is_ok_and(|r| r.backend == removed))
        .count();
    ensure!(
        from_removed == 0,
        "{from_removed} replies from the removed backend {removed} after the sync"
    );
    ensure!(
        late.iter().any(|o| o.is_err()) || after[..at_sync].iter().any(|o| o.is_err()),
        "the connected socket was never ended"
    );
    ensure!(
        late.iter()
            .rev()
            .take(10)
            .all(|o| o.as_ref().is_ok_and(|r| r.backend == kept)),
        "a new socket must reach the remaining backend {kept}: {:?}",
        &late[late.len() - 10..]
    );
    Ok(())
}

/// Issue 16 bug 3: one endpoint address:port backs Services A and B. Removing it from A ends
/// A's connected UDP socket to it (kube-proxy clears conntrack per Service port and endpoint:
/// pkg/proxy/conntrack/cleanup.go, CleanStaleEntries), while B's socket to the same address
/// and port keeps working untouched. Before, a backend was only ended once no UDP frontend used
/// it, so A's socket kept talking to the endpoint A no longer had.
#[test]
fn a_shared_endpoint_removed_from_one_service_ends_only_that_services_udp_sockets() {
    with_bed(|bed| {
        const VIP_A: &str = "198.18.100.46";
        const VIP_B: &str = "198.18.100.47";
        let mut pods = Vec::new();
        for (node, name) in [(1, "sh-1a"), (2, "sh-2a")] {
            let p = bed.add_pod(node, name)?;
            bed.start_echo(&p, &[], &[5353])?;
            pods.push(p);
        }
        for (svc, vip) in [("sha", VIP_A), ("shb", VIP_B)] {
            let s = Service::cluster_ip("default", svc, vip).port("dns", 53, 5353, Proto::Udp);
            bed.write_manifest(&format!("{svc}-svc.yaml"), &s.to_yaml())?;
        }
        bed.write_manifest("sha-slice.yaml", &udp_slice("sha", &[&pods[0], &pods[1]]))?;
        bed.write_manifest("shb-slice.yaml", &udp_slice("shb", &[]))?;
        let client = bed.add_pod(1, "client")?;
        let agents = bed.start_agents(SYNC)?;
        let log_a = udp_client(bed, &client, VIP_A)?;
        let used = one_backend(&log_a, VIP_A)?;
        let (shared, kept) = if pods[0].name == used {
            (&pods[0], &pods[1])
        } else {
            (&pods[1], &pods[0])
        };
        // B gets the endpoint A's socket uses, and a socket of its own to it.
        let g = agents[0].generation().unwrap_or(1);
        bed.write_manifest("shb-slice.yaml", &udp_slice("shb", &[shared]))?;
        agents[0].wait_for_sync(g + 1, SYNC)?;
        let log_b = udp_client(bed, &client, VIP_B)?;
        ensure!(one_backend(&log_b, VIP_B)? == shared.name);

        let g = agents[0].generation().unwrap_or(1);
        bed.write_manifest("sha-slice.yaml", &udp_slice("sha", &[kept]))?;
        agents[0].wait_for_sync(g + 1, SYNC)?;
        let b_at_sync = outcomes(&log_b, 0)?.len();
        ended_and_moved(&log_a, &shared.name, &kept.name)?;
        let b = outcomes(&log_b, b_at_sync + 40)?;
        for o in &b {
            let r = o
                .as_ref()
                .map_err(|e| anyhow::anyhow!("B's socket failed: {e}"))?;
            ensure!(
                r.backend == shared.name,
                "B's socket moved to {}",
                r.backend
            );
        }
        ensure!(
            agents[0].log_text().contains("frontend_backends=1"),
            "agent log: {}",
            agents[0].log_tail(20)
        );
        Ok(())
    });
}

/// A dual-stack Service: pods reach it over IPv6 (connect6/sendmsg6/recvmsg6/getpeername6) and
/// over IPv4, each family to its own endpoints, and see the VIP of the family they dialled.
#[test]
fn socket_lb_serves_ipv6_and_dual_stack_services() {
    with_bed(|bed| {
        const VIP4: &str = "198.18.100.44";
        const VIP6: &str = "fd00:18:100::44";
        let mut pods = Vec::new();
        for (node, name) in [(1, "d-1a"), (2, "d-2a")] {
            let p = bed.add_pod(node, name)?;
            bed.start_echo(&p, &[8080], &[5353])?;
            pods.push(p);
        }
        let svc = Service::cluster_ip("default", "dual", VIP4)
            .port("http", 80, 8080, Proto::Tcp)
            .port("dns", 53, 5353, Proto::Udp)
            .spec("clusterIPs", serde_json::json!([VIP4, VIP6]))
            .spec("ipFamilies", serde_json::json!(["IPv4", "IPv6"]))
            .spec("ipFamilyPolicy", serde_json::json!("RequireDualStack"));
        let slice = |suffix: &str, v6: bool| {
            let mut s = EndpointSlice::new("default", "dual", suffix)
                .port("http", 8080, Proto::Tcp)
                .port("dns", 5353, Proto::Udp);
            if v6 {
                s.address_type = "IPv6".into();
            }
            for p in &pods {
                let a = if v6 {
                    p.ip6.to_string()
                } else {
                    p.ip.to_string()
                };
                s = s.endpoint(Endpoint::ready(&a, &format!("node{}", p.node)));
            }
            s.to_yaml()
        };
        bed.write_manifest("dual-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("dual-slice4.yaml", &slice("v4", false))?;
        bed.write_manifest("dual-slice6.yaml", &slice("v6", true))?;
        let client = bed.add_pod(1, "client")?;
        let agents = bed.start_agents(SYNC)?;
        let status = agents[0].status_json()?;
        ensure!(
            status["services"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["vip"] == VIP6 && s["port"] == 80),
            "IPv6 frontend missing from status: {status:#}"
        );

        let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
            let vip6 = vip(VIP6, port);
            let out = bed.pod_requests(&client, proto, vip6, 60, T)?;
            let tally = Tally::new(&out);
            tally.expect_no_failures()?;
            let b: Vec<&str> = names.iter().map(String::as_str).collect();
            tally.expect_spread(&b, 0.3)?;
            for r in out.iter().flatten() {
                ensure!(r.peer == vip6, "{proto:?}/IPv6: application saw {}", r.peer);
                ensure!(
                    r.client.ip() == std::net::IpAddr::V6(client.ip6),
                    "{proto:?}/IPv6: backend saw {} instead of the pod's IPv6 address",
                    r.client
                );
            }
            requests_ok(bed, &client, proto, vip(VIP4, port), &names)?;
        }
        Ok(())
    });
}

//! End-to-end tests of traffic from outside the node: NodePort, LoadBalancer ingress IPs and
//! externalIPs from the external client namespace, SNAT for externalTrafficPolicy Cluster,
//! client addresses kept and healthCheckNodePort for externalTrafficPolicy Local. Needs root and
//! the agent binary; fails, never skips.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, ensure};
use serde_json::json;
use tests::{
    EXT_IP, Endpoint, EndpointSlice, Pod, Proto, Service, Tally, TestBed, client::http_get,
    node_ip, tcp_requests, udp_requests,
};

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

fn backends(bed: &mut TestBed, list: &[(u8, &str)]) -> Result<Vec<Pod>> {
    list.iter()
        .map(|(node, name)| {
            let p = bed.add_pod(*node, name)?;
            bed.start_echo(&p, &[8080], &[5353])?;
            Ok(p)
        })
        .collect()
}

fn slice(service: &str, pods: &[Pod]) -> EndpointSlice {
    let mut s = EndpointSlice::new("default", service, "x1")
        .port("http", 8080, Proto::Tcp)
        .port("dns", 5353, Proto::Udp);
    for p in pods {
        s = s.endpoint(Endpoint::ready(
            &p.ip.to_string(),
            &format!("node{}", p.node),
        ));
    }
    s
}

fn nodeport(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// Every request answered by exactly `pods`, the client seeing `addr` as its peer; returns the
/// source address each backend saw.
fn answered(
    out: &[tests::Outcome],
    addr: SocketAddr,
    pods: &[&Pod],
    what: &str,
) -> Result<Vec<(String, IpAddr)>> {
    let tally = Tally::new(out);
    tally
        .expect_no_failures()
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    tally
        .expect_spread(&names, 0.3)
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    let mut seen = Vec::new();
    for r in out.iter().flatten() {
        ensure!(
            r.peer == addr,
            "{what}: client saw {} instead of {addr}",
            r.peer
        );
        seen.push((r.backend.clone(), r.client.ip()));
    }
    Ok(seen)
}

#[test]
fn nodeport_with_cluster_policy_reaches_every_backend_through_either_node() {
    with_bed(|bed| {
        let pods = backends(bed, &[(1, "np-1a"), (2, "np-2a"), (2, "np-2b")])?;
        let svc = Service::cluster_ip("default", "np", "198.18.100.91")
            .type_("NodePort")
            .port("http", 80, 8080, Proto::Tcp)
            .port("dns", 53, 5353, Proto::Udp)
            .spec(
                "ports",
                json!([
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080},
                    {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053},
                ]),
            );
        bed.write_manifest("np-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("np-slice.yaml", &slice("np", &pods).to_yaml())?;
        let agents = bed.start_agents(SYNC)?;
        let all: Vec<&Pod> = pods.iter().collect();
        let ext = bed.ext_ns().to_string();
        for node in [1u8, 2] {
            let tcp = nodeport(node_ip(node), 30080);
            let seen = answered(&tcp_requests(&ext, tcp, 90, T)?, tcp, &all, "TCP NodePort")?;
            // Backends on the node that took the traffic see the client; the others see that
            // node (SNAT), so their replies come back through it.
            for (backend, src) in seen {
                let local = pods.iter().any(|p| p.name == backend && p.node == node);
                let want = if local {
                    IpAddr::V4(EXT_IP)
                } else {
                    IpAddr::V4(node_ip(node))
                };
                ensure!(
                    src == want,
                    "via node{node}: {backend} saw {src}, want {want}"
                );
            }
            let udp = nodeport(node_ip(node), 30053);
            answered(&udp_requests(&ext, udp, 90, T)?, udp, &all, "UDP NodePort")?;
        }
        let snat = agents[0].status_json()?["counters"]["snat"]
            .as_u64()
            .unwrap_or(0);
        ensure!(snat > 0, "node1 never SNATed");
        Ok(())
    });
}

/// NodePort traffic to a backend on another node, TCP and UDP, IPv4 and IPv6, is forwarded at
/// XDP (generic mode on the test bed's veths, as `--xdp auto` chooses there) in both
/// directions: node 1's `xdp_forwarded` counter covers at least every request and reply, and
/// `status` reports the XDP attachment and its mode. With `--xdp=off` on node 2 the same
/// traffic works through tc alone and that counter stays at zero, and node 2's agent has no XDP
/// program loaded in the kernel at all.
#[test]
fn nodeport_to_another_node_is_forwarded_at_xdp() {
    with_bed(|bed| {
        let pods = backends(bed, &[(2, "xdp-2a"), (2, "xdp-2b")])?;
        let mut remote = EndpointSlice::new("default", "xdpnp", "x1")
            .port("http", 8080, Proto::Tcp)
            .port("dns", 5353, Proto::Udp);
        for p in &pods {
            remote = remote.endpoint(Endpoint::ready(&p.ip.to_string(), "node2"));
        }
        let mut s6 = EndpointSlice::new("default", "xdpnp", "x6")
            .port("http", 8080, Proto::Tcp)
            .port("dns", 5353, Proto::Udp);
        s6.address_type = "IPv6".into();
        for p in &pods {
            s6 = s6.endpoint(Endpoint::ready(&p.ip6.to_string(), "node2"));
        }
        let svc = Service::cluster_ip("default", "xdpnp", "198.18.100.95")
            .type_("NodePort")
            .spec(
                "ports",
                json!([
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30095},
                    {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30096},
                ]),
            )
            .spec("clusterIPs", json!(["198.18.100.95", "fd00:18:100::95"]))
            .spec("ipFamilies", json!(["IPv4", "IPv6"]));
        bed.write_manifest("xdp-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("xdp-slice4.yaml", &remote.to_yaml())?;
        bed.write_manifest("xdp-slice6.yaml", &s6.to_yaml())?;
        let dir = bed.manifests_dir().to_path_buf();
        let node1 = bed.start_agent_with(1, &dir, &[])?;
        let node2 = bed.start_agent_with(2, &dir, &["--xdp=off"])?;
        node1.wait_for_sync(1, SYNC)?;
        node2.wait_for_sync(1, SYNC)?;
        // Load only what is enabled: the kernel holds node 2's tc program but no XDP program
        // of it (the programs an agent loaded are the ones using its conntrack map).
        let kinds = |a: &tests::Agent| -> Result<Vec<String>> {
            let progs = tests::inspect::programs_using_map(&a.bpffs.join("ct_v2"))?;
            Ok(progs.into_iter().map(|(kind, _)| kind).collect())
        };
        let (k1, k2) = (kinds(&node1)?, kinds(&node2)?);
        ensure!(
            k1.iter().any(|k| k == "xdp") && k1.iter().any(|k| k == "sched_cls"),
            "node1 (--xdp auto) should have XDP and tc programs loaded: {k1:?}"
        );
        ensure!(
            k2.iter().any(|k| k == "sched_cls") && !k2.iter().any(|k| k == "xdp"),
            "node2 (--xdp=off) has an XDP program loaded or no tc program: {k2:?}"
        );
        let all: Vec<&Pod> = pods.iter().collect();
        let ext = bed.ext_ns().to_string();
        let forwarded = |a: &tests::Agent| -> Result<u64> {
            Ok(a.status_json()?["counters"]["xdp_forwarded"]
                .as_u64()
                .unwrap_or(0))
        };
        let n = 40;
        for addr in [IpAddr::V4(node_ip(1)), IpAddr::V6(tests::node_ip6(1))] {
            let before = forwarded(&node1)?;
            let tcp = SocketAddr::new(addr, 30095);
            answered(
                &tcp_requests(&ext, tcp, n, T)?,
                tcp,
                &all,
                "TCP NodePort via XDP",
            )?;
            let udp = SocketAddr::new(addr, 30096);
            answered(
                &udp_requests(&ext, udp, n, T)?,
                udp,
                &all,
                "UDP NodePort via XDP",
            )?;
            // Every TCP connection is at least SYN, ACK, request, FIN each way; every UDP
            // exchange a request and a reply.
            let got = forwarded(&node1)? - before;
            ensure!(
                got >= (6 * n + 2 * n) as u64,
                "{addr}: node1 forwarded only {got} packets at XDP"
            );
        }
        let status = node1.status_json()?;
        let xdp: Vec<&serde_json::Value> = status["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| {
                a["interface"] == "lan0"
                    && a["mode"].as_str().is_some_and(|m| m.starts_with("xdp-"))
            })
            .collect();
        ensure!(
            xdp.len() == 1 && xdp[0]["mode"] == "xdp-generic",
            "status does not report XDP on lan0 in generic mode: {:#}",
            status["attachments"]
        );
        // Node 2 without XDP: the same traffic through tc only.
        let tcp = nodeport(node_ip(2), 30095);
        answered(
            &tcp_requests(&ext, tcp, n, T)?,
            tcp,
            &all,
            "TCP NodePort via tc",
        )?;
        ensure!(
            forwarded(&node2)? == 0,
            "node2 forwarded at XDP with --xdp=off"
        );
        Ok(())
    });
}

/// The conntrack collector frees finished flows (and their SNAT ports) and keeps live ones:
/// NodePort connections to a backend on another node (SNATed) that closed are gone from the
/// conntrack map soon after the closing timeout (2 s here), while an established connection
/// idle for longer than that keeps its entries and goes on working; with the collector off
/// (node 2), the finished flows' entries stay.
#[test]
fn conntrack_collector_frees_finished_flows_and_keeps_live_ones() {
    with_bed(|bed| {
        let p = bed.add_pod(2, "gc-2a")?;
        bed.start_echo_streams(&p, &[8080], &[], &[9000])?;
        let pods = vec![p];
        let svc = Service::cluster_ip("default", "gcnp", "198.18.100.94")
            .type_("NodePort")
            .spec(
                "ports",
                json!([
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30094},
                    {"name": "stream", "port": 9000, "targetPort": 9000, "protocol": "TCP", "nodePort": 30097},
                ]),
            );
        let mut gc_slice = EndpointSlice::new("default", "gcnp", "x1")
            .port("http", 8080, Proto::Tcp)
            .port("stream", 9000, Proto::Tcp);
        for p in &pods {
            gc_slice = gc_slice.endpoint(Endpoint::ready(&p.ip.to_string(), "node2"));
        }
        bed.write_manifest("gc-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("gc-slice.yaml", &gc_slice.to_yaml())?;
        let dir = bed.manifests_dir().to_path_buf();
        let flags = [
            "--conntrack-gc-interval-s",
            "1",
            "--conntrack-tcp-timeout-closing-s",
            "2",
        ];
        let node1 = bed.start_agent_with(1, &dir, &flags)?;
        let node2 = bed.start_agent_with(2, &dir, &["--conntrack-gc-interval-s", "0"])?;
        node1.wait_for_sync(1, SYNC)?;
        node2.wait_for_sync(1, SYNC)?;
        let ct_entries = |a: &tests::Agent| -> Result<u64> {
            let status = a.status_json()?;
            Ok(status["maps"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == "ct_v2")
                .and_then(|m| m["entries"].as_u64())
                .unwrap_or(0))
        };
        let all: Vec<&Pod> = pods.iter().collect();
        let ext = bed.ext_ns().to_string();
        // A long-lived connection through node 1, idle across several collector passes.
        let np1 = nodeport(node_ip(1), 30094);
        let stream_to = nodeport(node_ip(1), 30097);
        let mut stream = tests::in_netns(&ext, move || {
            tests::client::EchoStream::connect(stream_to, T)
        })??;
        let (np2, n) = (nodeport(node_ip(2), 30094), 60);
        answered(
            &tcp_requests(&ext, np1, n, T)?,
            np1,
            &all,
            "NodePort via node1",
        )?;
        answered(
            &tcp_requests(&ext, np2, n, T)?,
            np2,
            &all,
            "NodePort via node2",
        )?;
        let (busy1, busy2) = (ct_entries(&node1)?, ct_entries(&node2)?);
        ensure!(
            busy1 >= 2 * n as u64 && busy2 >= 2 * n as u64,
            "conntrack holds {busy1} and {busy2} entries after {n} connections each"
        );
        std::thread::sleep(Duration::from_secs(6));
        let (idle1, idle2) = (ct_entries(&node1)?, ct_entries(&node2)?);
        ensure!(
            idle1 <= 4,
            "node1 still holds {idle1} conntrack entries (of {busy1}) 6 s after its connections closed"
        );
        ensure!(
            idle2 >= 2 * n as u64,
            "node2 (collector off) dropped entries: {idle2} of {busy2}"
        );
        ensure!(
            ct_entries(&node1)? >= 2,
            "the idle established connection lost its entries"
        );
        tests::in_netns(&ext, move || stream.exchange("still-there", T))??;
        Ok(())
    });
}

#[test]
fn local_policy_keeps_the_client_address_and_serves_health_checks() {
    with_bed(|bed| {
        let pods = backends(bed, &[(1, "lb-1a")])?;
        let svc = Service::cluster_ip("default", "lb", "198.18.100.92")
            .type_("LoadBalancer")
            .spec(
                "ports",
                json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30090}]),
            )
            .spec("externalTrafficPolicy", json!("Local"))
            .spec("healthCheckNodePort", json!(32090))
            .spec("externalIPs", json!(["198.18.210.2"]));
        let mut v = svc.to_value();
        v["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.18.210.1"}]}});
        bed.write_manifest("lb-svc.yaml", &serde_yaml::to_string(&v)?)?;
        bed.write_manifest("lb-slice.yaml", &slice("lb", &pods).to_yaml())?;
        // The load balancer and the external IP are routed to node1 (as a router would).
        tests::cmd::ip(&[
            "-n",
            bed.ext_ns(),
            "route",
            "add",
            "198.18.210.0/24",
            "via",
            "198.18.0.1",
        ])?;
        let client_on_node2 = bed.add_pod(2, "client2")?;
        bed.start_agents(SYNC)?;
        let ext = bed.ext_ns().to_string();
        let one = [&pods[0]];
        for addr in [
            nodeport(node_ip(1), 30090),
            "198.18.210.1:80".parse()?,
            "198.18.210.2:80".parse()?,
        ] {
            let seen = answered(&tcp_requests(&ext, addr, 30, T)?, addr, &one, "eTP Local")?;
            for (_, src) in seen {
                ensure!(
                    src == IpAddr::V4(EXT_IP),
                    "{addr}: backend saw {src}, not the client"
                );
            }
        }
        // node2 has no local endpoint: it does not forward external traffic.
        let out = tcp_requests(
            &ext,
            nodeport(node_ip(2), 30090),
            3,
            Duration::from_millis(500),
        )?;
        ensure!(
            out.iter().all(|o| o.is_err()),
            "node2 forwarded eTP Local traffic: {out:?}"
        );
        // ...but pods on node2 reach the Service through node2's NodePort (short-circuit).
        let addr = nodeport(node_ip(2), 30090);
        let out = bed.pod_requests(&client_on_node2, Proto::Tcp, addr, 20, T)?;
        answered(&out, addr, &one, "pod on node2 to its own node's NodePort")?;

        // healthCheckNodePort, as load balancers probe it.
        let probe = |node: u8| {
            let addr = SocketAddr::new(IpAddr::V4(node_ip(node)), 32090);
            tests::in_netns(&ext, move || http_get(addr, "/", T))?
        };
        let r1 = probe(1)?;
        ensure!(r1.status == 200, "node1 health check: {r1:?}");
        let body: serde_json::Value = serde_json::from_str(&r1.body)?;
        ensure!(
            body["localEndpoints"] == 1
                && body["service"]["name"] == "lb"
                && body["service"]["namespace"] == "default",
            "{body}"
        );
        let r2 = probe(2)?;
        ensure!(r2.status == 503, "node2 health check: {r2:?}");
        ensure!(serde_json::from_str::<serde_json::Value>(&r2.body)?["localEndpoints"] == 0);
        Ok(())
    });
}

/// One TCP request from a chosen source address (the external client has two), returning the
/// answering backend's reply line.
fn tcp_from(src: std::net::Ipv4Addr, dst: SocketAddr, timeout: Duration) -> Result<String> {
    use std::io::Read as _;
    use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _};

    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket,
        sockopt::{ReceiveTimeout, SendTimeout},
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
    // On Linux a send timeout also bounds connect().
    setsockopt(&fd, SendTimeout, &tv)?;
    setsockopt(&fd, ReceiveTimeout, &tv)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)),
    )?;
    let SocketAddr::V4(d) = dst else {
        anyhow::bail!("IPv4 only")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(d))?;
    // SAFETY: the descriptor is ours and moves into the stream.
    let mut s = unsafe { std::net::TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let mut line = String::new();
    s.read_to_string(&mut line)?;
    Ok(line)
}

#[test]
fn load_balancer_source_ranges_admit_only_listed_clients() {
    with_bed(|bed| {
        let pods = backends(bed, &[(1, "sr-1a"), (2, "sr-2a")])?;
        let svc = Service::cluster_ip("default", "sr", "198.18.100.93")
            .type_("LoadBalancer")
            .spec(
                "ports",
                json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30111}]),
            )
            .spec("loadBalancerSourceRanges", json!(["198.18.0.100/32"]));
        let mut v = svc.to_value();
        v["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.18.211.1"}]}});
        bed.write_manifest("sr-svc.yaml", &serde_yaml::to_string(&v)?)?;
        bed.write_manifest("sr-slice.yaml", &slice("sr", &pods).to_yaml())?;
        let ext = bed.ext_ns().to_string();
        tests::cmd::ip(&[
            "-n",
            &ext,
            "route",
            "add",
            "198.18.211.0/24",
            "via",
            "198.18.0.1",
        ])?;
        tests::cmd::ip(&["-n", &ext, "addr", "add", "198.18.0.101/24", "dev", "lan0"])?;
        let agents = bed.start_agents(SYNC)?;
        let lb: SocketAddr = "198.18.211.1:80".parse()?;
        let np = nodeport(node_ip(1), 30111);
        let (allowed, other) = (EXT_IP, std::net::Ipv4Addr::new(198, 18, 0, 101));
        let results = tests::in_netns(&ext, move || {
            let lb_allowed: Vec<Result<String>> =
                (0..10).map(|_| tcp_from(allowed, lb, T)).collect();
            let lb_denied = tcp_from(other, lb, Duration::from_millis(700));
            let np_other: Vec<Result<String>> = (0..10).map(|_| tcp_from(other, np, T)).collect();
            (lb_allowed, lb_denied, np_other)
        })?;
        for r in &results.0 {
            ensure!(
                r.as_ref().is_ok_and(|l| l.starts_with("sr-")),
                "listed client refused: {r:?}"
            );
        }
        ensure!(
            results.1.is_err(),
            "a client outside the ranges got through: {:?}",
            results.1
        );
        for r in &results.2 {
            ensure!(
                r.as_ref().is_ok_and(|l| l.starts_with("sr-")),
                "source ranges must not apply to the NodePort: {r:?}"
            );
        }
        let dropped = agents[0].status_json()?["counters"]["dropped_source_range"]
            .as_u64()
            .unwrap_or(0);
        ensure!(dropped > 0, "drops were not counted");
        Ok(())
    });
}

#[test]
fn ipv6_nodeport_and_clusterip_on_the_per_packet_path() {
    with_bed(|bed| {
        let pods = backends(bed, &[(1, "v6-1a"), (2, "v6-2a")])?;
        let svc = Service::cluster_ip("default", "v6", "198.18.100.98")
            .type_("NodePort")
            .spec(
                "ports",
                json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30086}]),
            )
            .spec("clusterIPs", json!(["198.18.100.98", "fd00:18:100::98"]))
            .spec("ipFamilies", json!(["IPv4", "IPv6"]));
        let mut s6 = EndpointSlice::new("default", "v6", "x6").port("http", 8080, Proto::Tcp);
        s6.address_type = "IPv6".into();
        for p in &pods {
            s6 = s6.endpoint(Endpoint::ready(
                &p.ip6.to_string(),
                &format!("node{}", p.node),
            ));
        }
        bed.write_manifest("v6-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("v6-slice4.yaml", &slice("v6", &pods).to_yaml())?;
        bed.write_manifest("v6-slice6.yaml", &s6.to_yaml())?;
        let client = bed.add_pod(1, "client")?;
        let agents = bed.start_agents(SYNC)?;
        let all: Vec<&Pod> = pods.iter().collect();
        let node6 = tests::node_ip6(1);
        let np: SocketAddr = SocketAddr::new(IpAddr::V6(node6), 30086);
        let ext = bed.ext_ns().to_string();
        let seen = answered(&tcp_requests(&ext, np, 60, T)?, np, &all, "IPv6 NodePort")?;
        for (backend, src) in seen {
            let local = pods.iter().any(|p| p.name == backend && p.node == 1);
            let want = if local {
                IpAddr::V6(tests::EXT_IP6)
            } else {
                IpAddr::V6(node6)
            };
            ensure!(src == want, "{backend} saw {src}, want {want}");
        }
        // From a pod thread (outside the pod's cgroup): the per-packet path for IPv6.
        let vip6: SocketAddr = "[fd00:18:100::98]:80".parse()?;
        let before = agents[0].status_json()?["counters"]["translated_new"]
            .as_u64()
            .unwrap_or(0);
        answered(
            &tcp_requests(&client.ns, vip6, 60, T)?,
            vip6,
            &all,
            "IPv6 ClusterIP (tc)",
        )?;
        let after = agents[0].status_json()?["counters"]["translated_new"]
            .as_u64()
            .unwrap_or(0);
        ensure!(
            after >= before + 50,
            "the tc path translated {} IPv6 flows",
            after - before
        );
        Ok(())
    });
}

/// IPv6 UDP datagrams larger than the path MTU leave the client pod as fragments (IPv6 only
/// fragments at the source): tc translates the first fragment and sends the later ones to the
/// same backend (the fragment map), which reassembles and answers.
#[test]
fn ipv6_fragmented_udp_datagrams_reach_a_backend_on_the_per_packet_path() {
    with_bed(|bed| {
        let pods = backends(bed, &[(1, "f6-1a"), (2, "f6-2a")])?;
        let svc = Service::cluster_ip("default", "f6", "198.18.100.97")
            .spec(
                "ports",
                json!([{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]),
            )
            .spec("clusterIPs", json!(["198.18.100.97", "fd00:18:100::97"]))
            .spec("ipFamilies", json!(["IPv4", "IPv6"]));
        let mut s6 = EndpointSlice::new("default", "f6", "x6").port("dns", 5353, Proto::Udp);
        s6.address_type = "IPv6".into();
        for p in &pods {
            s6 = s6.endpoint(Endpoint::ready(
                &p.ip6.to_string(),
                &format!("node{}", p.node),
            ));
        }
        bed.write_manifest("f6-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("f6-slice6.yaml", &s6.to_yaml())?;
        let client = bed.add_pod(1, "client")?;
        let agents = bed.start_agents(SYNC)?;
        let vip6: SocketAddr = "[fd00:18:100::97]:53".parse()?;
        // From a thread in the pod's namespace, outside its cgroup: the tc path.
        let answered = tests::in_netns(&client.ns, || -> Result<usize> {
            let mut n = 0;
            for i in 0..10u8 {
                let s = std::net::UdpSocket::bind("[::]:0")?;
                s.set_read_timeout(Some(T))?;
                s.send_to(&vec![b'a' + i; 4000], vip6)?;
                let mut buf = [0u8; 512];
                if let Ok((len, peer)) = s.recv_from(&mut buf) {
                    ensure!(peer == vip6, "reply from {peer}, not the VIP");
                    let text = String::from_utf8_lossy(&buf[..len]);
                    ensure!(text.starts_with("f6-"), "reply {text:?}");
                    n += 1;
                }
            }
            Ok(n)
        })??;
        ensure!(
            answered == 10,
            "{answered} of 10 fragmented datagrams answered"
        );
        let c = &agents[0].status_json()?["counters"];
        ensure!(
            c["passed_fragment_unknown"].as_u64().unwrap_or(0) == 0,
            "later fragments went untranslated: {c}"
        );
        Ok(())
    });
}

/// The Internet checksum of a TCP segment from `src` to `dst`.
fn tcp_csum(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, seg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6]);
    add(&(seg.len() as u16).to_be_bytes());
    add(seg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A SYN straight to the backend with the tuple of a live connection that tc translated (what a
/// spoofer on the client's address sends): the backend answers it with a challenge ACK, which
/// must still be translated back to the client's real connection. Before, the SYN made tc forget
/// the connection's reply path: the untranslated challenge ACK drew a RST from the client's
/// kernel, and that RST, matching the backend's sequence numbers, killed the live connection.
#[test]
fn a_spoofed_syn_does_not_break_a_live_translated_connection() {
    with_bed(|bed| {
        let server = bed.add_pod(2, "spoof-b")?;
        bed.start_echo_streams(&server, &[8080], &[], &[9000])?;
        let svc = Service::cluster_ip("default", "spoof", "198.18.100.96").spec(
            "ports",
            json!([{"name": "s", "port": 90, "targetPort": 9000, "protocol": "TCP"}]),
        );
        let s = EndpointSlice::new("default", "spoof", "x1")
            .port("s", 9000, Proto::Tcp)
            .endpoint(Endpoint::ready(&server.ip.to_string(), "node2"));
        bed.write_manifest("spoof-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("spoof-slice.yaml", &s.to_yaml())?;
        let client = bed.add_pod(1, "spoof-c")?;
        let _agents = bed.start_agents(SYNC)?;
        let vip: SocketAddr = "198.18.100.96:90".parse()?;
        // A thread in the pod's namespace, outside its cgroup: the tc path.
        let mut st = tests::in_netns(&client.ns, || tests::client::EchoStream::connect(vip, T))??;
        st.exchange("before", T)?;
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (client.ip.into(), server.ip.into()) else {
            anyhow::bail!("IPv4 pods expected");
        };
        let mut seg = vec![0u8; 20];
        seg[0..2].copy_from_slice(&st.local.port().to_be_bytes());
        seg[2..4].copy_from_slice(&9000u16.to_be_bytes());
        seg[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        seg[12] = 0x50;
        seg[13] = 0x02;
        seg[14..16].copy_from_slice(&1024u16.to_be_bytes());
        let c = tcp_csum(src, dst, &seg);
        seg[16..18].copy_from_slice(&c.to_be_bytes());
        tests::in_netns(&client.ns, || -> Result<()> {
            // SAFETY: plain socket calls on a descriptor this closure owns and closes.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP);
                ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
                let to = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(dst.octets()),
                    },
                    sin_zero: [0; 8],
                };
                let n = libc::sendto(
                    fd,
                    seg.as_ptr().cast(),
                    seg.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                ensure!(n == seg.len() as isize, "sendto: {err}");
            }
            Ok(())
        })??;
        // Let the challenge ACK (and, if it went untranslated, the client's RST) pass.
        std::thread::sleep(Duration::from_millis(500));
        for i in 0..3 {
            st.exchange(&format!("after {i}"), T)
                .map_err(|e| e.context("the live connection broke after a spoofed SYN"))?;
        }
        Ok(())
    });
}

//! `proxy-agent explain` and `proxy-agent flows` against real connections on the two-node bed:
//! before each connection explain names the backend a new flow will get, the connection then
//! reaches exactly that backend, and afterwards explain finds it in conntrack and flows lists
//! it. NodePort (Maglev, from the external client: XDP then tc) and ClusterIP (random, from a
//! pod thread outside the agent's cgroup: tc), TCP and UDP. Needs root; fails, never skips.
use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use tests::{
    Agent, EXT_IP, Endpoint, EndpointSlice, Proto, Service, TestBed, client::parse_reply_line,
    find_status_service, in_netns, node_ip,
};

const T: Duration = Duration::from_secs(2);
const SYNC: Duration = Duration::from_secs(60);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 96);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 97);
const NP_UDP: u16 = 30353;
const NP_TCP: u16 = 30380;

fn with_bed(f: impl FnOnce(&mut TestBed) -> Result<()>) {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    if let Err(e) = f(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

/// `proxy-agent explain ... -o json` on `agent`'s node; for `--from pod`, with `--path tc`: the
/// test's pod threads are outside the agent's cgroup, so tc translates them, not socket LB.
fn explain(
    agent: &Agent,
    src: SocketAddr,
    dst: SocketAddr,
    proto: &str,
    from: &str,
) -> Result<Value> {
    let bpffs = agent.bpffs.to_string_lossy().into_owned();
    let path = if from == "pod" { "tc" } else { "auto" };
    let out = agent.cli(&[
        "explain",
        "--bpffs",
        &bpffs,
        "--src",
        &src.to_string(),
        "--dst",
        &dst.to_string(),
        "--proto",
        proto,
        "--from",
        from,
        "--path",
        path,
        "-o",
        "json",
    ])?;
    serde_json::from_str(&out).with_context(|| format!("explain output {out:?}"))
}

/// The backend address explain names, checking the outcome.
fn named_backend(e: &Value, outcome: &str) -> Result<IpAddr> {
    ensure!(e["outcome"] == outcome, "want outcome {outcome}: {e:#}");
    e["backend"]["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no backend named: {e:#}"))
}

/// A TCP connection from `src` (bound to that exact port) to `dst`: the name of the backend
/// that answered.
fn tcp_from(src: SocketAddr, dst: SocketAddr) -> Result<String> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )?;
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        anyhow::bail!("IPv4 only")
    };
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(s))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(d)).with_context(|| format!("{src} -> {dst}"))?;
    let mut stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(T))?;
    let mut line = String::new();
    stream.read_to_string(&mut line)?;
    Ok(parse_reply_line(line.trim())?.0)
}

fn udp_from(src: SocketAddr, dst: SocketAddr) -> Result<String> {
    let s = UdpSocket::bind(src).with_context(|| format!("bind {src}"))?;
    s.set_read_timeout(Some(T))?;
    s.send_to(b"hello\n", dst)?;
    let mut buf = [0u8; 2048];
    let (n, peer) = s
        .recv_from(&mut buf)
        .with_context(|| format!("{src} -> {dst}: no reply"))?;
    ensure!(peer == dst, "{src} -> {dst}: reply from {peer}");
    Ok(parse_reply_line(String::from_utf8_lossy(&buf[..n]).trim())?.0)
}

#[test]
fn explain_predicts_the_backend_of_real_connections_and_flows_lists_them() {
    with_bed(|bed| {
        let mut ip_of = BTreeMap::new();
        let mut slice = EndpointSlice::new("default", "ex", "x1")
            .port("dns", 5353, Proto::Udp)
            .port("http", 8080, Proto::Tcp);
        for (node, name) in [(1, "ex-1a"), (1, "ex-1b"), (2, "ex-2a"), (2, "ex-2b")] {
            let p = bed.add_pod(node, name)?;
            bed.start_echo(&p, &[8080], &[5353])?;
            slice = slice.endpoint(Endpoint::ready(&p.ip.to_string(), &format!("node{node}")));
            ip_of.insert(p.name.clone(), IpAddr::V4(p.ip));
        }
        let client_pod = bed.add_pod(1, "ex-client")?;
        let svc = Service::cluster_ip("default", "ex", &VIP.to_string())
            .type_("NodePort")
            .spec(
                "ports",
                json!([
                    {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": NP_UDP},
                    {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": NP_TCP},
                ]),
            );
        bed.write_manifest("ex-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("ex-slice.yaml", &slice.to_yaml())?;
        let agents = bed.start_agents(SYNC)?;
        let node1 = &agents[0];
        let ext = bed.ext_ns().to_string();

        let mut checked = 0;
        let cases: Vec<(&str, &str, SocketAddr, SocketAddr, &str)> = (0..12u16)
            .flat_map(|i| {
                let ext_src = SocketAddr::new(IpAddr::V4(EXT_IP), 21_000 + i);
                let pod_src = SocketAddr::new(IpAddr::V4(client_pod.ip), 22_000 + i);
                [
                    (
                        "udp",
                        "external",
                        ext_src,
                        SocketAddr::new(IpAddr::V4(node_ip(1)), NP_UDP),
                        ext.as_str(),
                    ),
                    (
                        "tcp",
                        "external",
                        ext_src,
                        SocketAddr::new(IpAddr::V4(node_ip(1)), NP_TCP),
                        ext.as_str(),
                    ),
                    (
                        "udp",
                        "pod",
                        pod_src,
                        SocketAddr::new(IpAddr::V4(VIP), 53),
                        client_pod.ns.as_str(),
                    ),
                    (
                        "tcp",
                        "pod",
                        pod_src,
                        SocketAddr::new(IpAddr::V4(VIP), 80),
                        client_pod.ns.as_str(),
                    ),
                ]
            })
            .collect();
        for (proto, from, src, dst, ns) in cases {
            // A pod thread of this test process is outside the agent's cgroup: tc.
            let path = if from == "pod" { "tc" } else { "xdp" };
            let before = explain(node1, src, dst, proto, from)?;
            ensure!(before["path"] == path, "{src} -> {dst}: {before:#}");
            let predicted = named_backend(&before, "new")?;
            let answered = in_netns(ns, || match proto {
                "udp" => udp_from(src, dst),
                _ => tcp_from(src, dst),
            })??;
            ensure!(
                ip_of[&answered] == predicted,
                "{proto} {src} -> {dst}: explain predicted {predicted}, {answered} ({}) answered: {before:#}",
                ip_of[&answered]
            );
            let after = explain(node1, src, dst, proto, from)?;
            ensure!(
                named_backend(&after, "established")? == predicted,
                "{after:#}"
            );
            checked += 1;
        }
        ensure!(checked == 48);

        // status: each frontend's own counters, over XDP and tc together (XDP counts what it
        // forwards, tc what XDP passes it), and the hooks that serve it.
        let st = node1.status_json()?;
        let np = find_status_service(&st, &node_ip(1).to_string(), NP_UDP, Proto::Udp)
            .context("NodePort UDP frontend")?;
        ensure!(
            np["counters"]["new_flows"] == 12
                && np["counters"]["packets"] == 12
                && np["counters"]["replies"] == 12
                && np["paths"] == json!(["socket-lb", "tc", "xdp"]),
            "one datagram and one reply per external flow: {np:#}"
        );
        let cip =
            find_status_service(&st, &VIP.to_string(), 80, Proto::Tcp).context("ClusterIP")?;
        ensure!(
            cip["counters"]["new_flows"] == 12
                && cip["counters"]["packets"].as_u64().is_some_and(|p| p >= 36)
                && cip["counters"]["rejected"] == 0,
            "12 TCP connections (SYN, ACK, FIN at least): {cip:#}"
        );
        // A Service without endpoints: each connection attempt rejected, and every rejected SYN
        // counted (a SYN whose ICMP error meets the socket locked by connect() is sent again).
        let empty = Service::cluster_ip("default", "ex-empty", &EMPTY_VIP.to_string()).spec(
            "ports",
            json!([{"name": "http", "port": 80, "targetPort": 8080}]),
        );
        bed.write_manifest("ex-empty.yaml", &empty.to_yaml())?;
        let deadline = std::time::Instant::now() + SYNC;
        while find_status_service(
            &node1.status_json()?,
            &EMPTY_VIP.to_string(),
            80,
            Proto::Tcp,
        )
        .is_none()
        {
            ensure!(
                std::time::Instant::now() < deadline,
                "ex-empty never programmed"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for i in 0..3u16 {
            let src = SocketAddr::new(IpAddr::V4(client_pod.ip), 23_000 + i);
            let refused = in_netns(&client_pod.ns, || {
                tcp_from(src, SocketAddr::new(IpAddr::V4(EMPTY_VIP), 80))
            })?;
            ensure!(
                refused.is_err(),
                "a Service without endpoints answered: {refused:?}"
            );
        }
        let st = node1.status_json()?;
        let e =
            find_status_service(&st, &EMPTY_VIP.to_string(), 80, Proto::Tcp).context("ex-empty")?;
        ensure!(
            e["counters"]["rejected"].as_u64().is_some_and(|r| r >= 3)
                && e["counters"]["packets"] == 0,
            "{e:#}"
        );

        // flows: the external client's 12 UDP flows to the NodePort, each to the backend
        // explain named, admitted by XDP or tc (local backends are passed to tc).
        let bpffs = node1.bpffs.to_string_lossy().into_owned();
        let out = node1.cli(&[
            "flows",
            "--bpffs",
            &bpffs,
            "--service",
            "default/ex",
            "--limit",
            "0",
            "-o",
            "json",
        ])?;
        let flows: Value = serde_json::from_str(&out)?;
        let list = flows["flows"].as_array().context("flows")?;
        let ext_udp: Vec<&Value> = list
            .iter()
            .filter(|f| {
                f["protocol"] == "UDP"
                    && f["frontend"] == format!("{}:{NP_UDP}", node_ip(1))
                    && f["client"]
                        .as_str()
                        .is_some_and(|c| c.starts_with(&format!("{EXT_IP}:")))
            })
            .collect();
        ensure!(
            ext_udp.len() == 12,
            "want the 12 external UDP flows: {flows:#}"
        );
        for f in &ext_udp {
            ensure!(
                f["state"] == "active" && f["idle_s"].as_f64().is_some_and(|s| s < 120.0),
                "{f:#}"
            );
            let local = ["ex-1a", "ex-1b"].iter().any(|n| {
                f["backend"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&format!("{}:", ip_of[*n]))
            });
            // Remote backends are SNATed to the node and sent out by XDP; local ones pass to tc.
            ensure!(f["snat"].is_null() == local, "{f:#}");
            ensure!(f["path"] == "xdp", "{f:#}");
        }
        let pod_tcp = list
            .iter()
            .filter(|f| {
                f["protocol"] == "TCP"
                    && f["client"]
                        .as_str()
                        .is_some_and(|c| c.starts_with(&format!("{}:", client_pod.ip)))
            })
            .count();
        ensure!(pod_tcp == 12, "the pod's 12 TCP flows: {flows:#}");
        ensure!(flows["matched"] == list.len());

        // --backend filters, and a table is printed.
        let one = ip_of["ex-2a"];
        let out = node1.cli(&[
            "flows",
            "--bpffs",
            &bpffs,
            "--backend",
            &one.to_string(),
            "-o",
            "json",
        ])?;
        let only: Value = serde_json::from_str(&out)?;
        ensure!(
            only["flows"]
                .as_array()
                .is_some_and(|l| l.iter().all(|f| f["backend"]
                    .as_str()
                    .is_some_and(|b| b.starts_with(&format!("{one}:"))))),
            "{only:#}"
        );
        let table = node1.cli(&["flows", "--bpffs", &bpffs, "--limit", "6"])?;
        eprintln!("{table}");
        ensure!(
            table.starts_with("CLIENT") && table.contains("default/ex:"),
            "{table}"
        );
        let table = node1.cli(&[
            "explain",
            "--bpffs",
            &bpffs,
            "--src",
            "198.18.0.100:21000",
            "--dst",
            &format!("{}:{NP_UDP}", node_ip(1)),
            "--proto",
            "udp",
            "--from",
            "external",
        ])?;
        eprintln!("{table}");
        ensure!(
            table.contains("OUTCOME   established") && table.contains("WHY"),
            "{table}"
        );
        let dst = format!("{}:{NP_TCP}", node_ip(1));
        let fresh = [
            "explain",
            "--bpffs",
            &bpffs,
            "--src",
            "198.18.0.100:21999",
            "--dst",
            &dst,
            "--proto",
            "tcp",
            "--from",
            "external",
        ];
        let table = node1.cli(&fresh)?;
        eprintln!("{table}");
        ensure!(
            table.contains("OUTCOME   new") && table.contains("Maglev: flow hash"),
            "{table}"
        );
        Ok(())
    })
}

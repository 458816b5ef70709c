//! End-to-end test of Maglev backend selection for traffic from outside the cluster: a NodePort
//! Service on the two-node bed, the external client sending from fixed source ports through
//! each node's NodePort. Needs root and the agent binary; fails, never skips.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use tests::{
    Agent, EXT_IP, Endpoint, EndpointSlice, Pod, Proto, Service, TestBed, client::parse_reply_line,
    find_status_service, in_netns, node_ip,
};

const T: Duration = Duration::from_secs(2);
const SYNC: Duration = Duration::from_secs(60);
const NODE_PORT: u16 = 30153;
/// The client tuples: EXT_IP from each of these source ports.
const SOURCE_PORTS: std::ops::Range<u16> = 20_000..20_300;

fn with_bed(f: impl FnOnce(&mut TestBed) -> Result<()>) {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    if let Err(e) = f(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

fn write_slice(bed: &TestBed, pods: &[&Pod]) -> Result<()> {
    let mut s = EndpointSlice::new("default", "mg", "x1").port("dns", 5353, Proto::Udp);
    for p in pods {
        s = s.endpoint(Endpoint::ready(
            &p.ip.to_string(),
            &format!("node{}", p.node),
        ));
    }
    bed.write_manifest("mg-slice.yaml", &s.to_yaml())
}

/// For each source port, the backend that answered one UDP request from EXT_IP:port to `to`
/// (a new socket per request, so the same tuple each round).
fn backends_by_port(ext: &str, to: SocketAddr) -> Result<Vec<String>> {
    in_netns(ext, || {
        SOURCE_PORTS
            .map(|sport| -> Result<String> {
                let s = UdpSocket::bind(SocketAddr::new(IpAddr::V4(EXT_IP), sport))
                    .with_context(|| format!("bind source port {sport}"))?;
                s.set_read_timeout(Some(T))?;
                s.send_to(b"hello\n", to)?;
                let mut buf = [0u8; 2048];
                let (n, peer) = s
                    .recv_from(&mut buf)
                    .with_context(|| format!("{sport} -> {to}: no reply within {T:?}"))?;
                ensure!(peer == to, "{sport} -> {to}: reply from {peer}");
                Ok(parse_reply_line(String::from_utf8_lossy(&buf[..n]).trim())?.0)
            })
            .collect()
    })?
}

/// Backends chosen per node (1, 2), tuple by tuple.
fn round(bed: &TestBed) -> Result<[Vec<String>; 2]> {
    let ext = bed.ext_ns().to_string();
    Ok([
        backends_by_port(&ext, SocketAddr::new(IpAddr::V4(node_ip(1)), NODE_PORT))?,
        backends_by_port(&ext, SocketAddr::new(IpAddr::V4(node_ip(2)), NODE_PORT))?,
    ])
}

/// Stops every agent and removes everything it pinned (conntrack included), then starts fresh
/// agents: the flows' tuples meet nodes that remember nothing about them, and number the
/// backends anew.
fn restart_from_nothing(bed: &mut TestBed, agents: &[Agent]) -> Result<Vec<Agent>> {
    for a in agents {
        bed.stop_agent(a);
        a.cleanup()?;
        ensure!(!a.bpffs.exists(), "{} left behind", a.bpffs.display());
    }
    bed.start_agents(SYNC)
}

fn shares(choices: &[String]) -> BTreeMap<String, f64> {
    let mut s = BTreeMap::new();
    for c in choices {
        *s.entry(c.clone()).or_insert(0.0) += 1.0 / choices.len() as f64;
    }
    s
}

/// With the default `--external-lb-algorithm` (maglev), a NodePort's flows are spread evenly
/// over the backends, the same tuple to the same node gets the same backend again from agents
/// that kept no state, and removing one of five backends moves only that backend's flows (plus
/// Maglev's small reshuffle, measured below; random choice by the tuple's hash modulo the
/// backend count would move about 3/4 of the others).
#[test]
fn nodeport_flows_keep_their_backend_per_node_and_move_little_on_removal() {
    with_bed(|bed| {
        let mut pods = Vec::new();
        for (node, name) in [
            (1, "mg-1a"),
            (1, "mg-1b"),
            (2, "mg-2a"),
            (2, "mg-2b"),
            (2, "mg-2c"),
        ] {
            let p = bed.add_pod(node, name)?;
            bed.start_echo(&p, &[], &[5353])?;
            pods.push(p);
        }
        let svc = Service::cluster_ip("default", "mg", "198.18.100.95")
            .type_("NodePort")
            .spec(
                "ports",
                json!([{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": NODE_PORT}]),
            );
        bed.write_manifest("mg-svc.yaml", &svc.to_yaml())?;
        write_slice(bed, &pods.iter().collect::<Vec<_>>())?;
        let agents = bed.start_agents(SYNC)?;

        // status: the NodePort frontends are Maglev with a table, the cluster IP random.
        for a in &agents {
            let s = a.status_json()?;
            let np = find_status_service(&s, &node_ip(a.node).to_string(), NODE_PORT, Proto::Udp)
                .with_context(|| format!("node{}: NodePort not programmed: {s:#}", a.node))?;
            ensure!(
                np["algorithm"] == "maglev" && np["maglev_table_size"] == 16381,
                "node{}: {np:#}",
                a.node
            );
            let cip = find_status_service(&s, "198.18.100.95", 53, Proto::Udp)
                .context("cluster IP not programmed")?;
            ensure!(
                cip["algorithm"] == "random" && cip["maglev_table_size"].is_null(),
                "{cip:#}"
            );
        }

        let first = round(bed)?;
        let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        for (node, choices) in [1, 2].iter().zip(&first) {
            let s = shares(choices);
            eprintln!("node{node}: shares {s:.3?}");
            ensure!(
                s.len() == names.len() && s.keys().all(|k| names.contains(&k.as_str())),
                "node{node}: answered by {s:?}, want every one of {names:?}"
            );
            for (backend, share) in &s {
                ensure!(
                    (share - 0.2).abs() <= 0.07,
                    "node{node}: {backend} took {share:.3} of the flows, want about 0.2"
                );
            }
        }
        ensure!(
            first[0] != first[1],
            "the nodes see different tuples (their own address), so they choose differently"
        );

        // Agents that remember nothing: the same choice, tuple by tuple.
        let agents = restart_from_nothing(bed, &agents)?;
        let again = round(bed)?;
        for node in 0..2 {
            let differ = first[node]
                .iter()
                .zip(&again[node])
                .filter(|(a, b)| a != b)
                .count();
            ensure!(
                differ == 0,
                "node{}: {differ} of {} tuples got another backend after a restart from nothing",
                node + 1,
                SOURCE_PORTS.len()
            );
        }

        // One backend gone, nodes again without state: its flows move, the others stay.
        let gone = "mg-2a";
        write_slice(
            bed,
            &pods.iter().filter(|p| p.name != gone).collect::<Vec<_>>(),
        )?;
        restart_from_nothing(bed, &agents)?;
        let after = round(bed)?;
        for node in 0..2 {
            let (mut kept, mut survivors, mut moved) = (0, 0, 0);
            for (before, now) in first[node].iter().zip(&after[node]) {
                if now == gone {
                    bail!("node{}: a flow reached the removed backend", node + 1);
                }
                if before == gone {
                    moved += 1;
                } else {
                    survivors += 1;
                    kept += usize::from(before == now);
                }
            }
            let stayed = kept as f64 / survivors as f64;
            eprintln!(
                "node{}: {moved} flows of {gone} moved; {kept} of {survivors} others kept their backend ({stayed:.3})",
                node + 1
            );
            ensure!(
                stayed >= 0.97,
                "node{}: only {stayed:.3} of the flows on surviving backends kept them",
                node + 1
            );
        }
        Ok(())
    });
}

#[test]
fn a_table_size_that_is_not_prime_is_refused_at_start() {
    with_bed(|bed| {
        let dir = bed.manifests_dir().to_path_buf();
        let agent = bed.start_agent_with(1, &dir, &["--maglev-table-size", "16383"])?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while agent.is_running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        ensure!(!agent.is_running(), "the agent runs with table size 16383");
        let log = agent.log_text();
        ensure!(
            log.contains("--maglev-table-size: Maglev table size 16383: must be a prime"),
            "{log}"
        );
        ensure!(!agent.bpffs.exists(), "nothing loaded or pinned");
        Ok(())
    });
}

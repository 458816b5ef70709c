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

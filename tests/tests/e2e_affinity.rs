//! End-to-end tests of sessionAffinity ClientIP: a client's connections stay on one backend
//! through the socket path, the per-packet path and a NodePort, until `timeoutSeconds` without a
//! new connection passes. Needs root and the agent binary; fails, never skips.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, ensure};
use serde_json::json;
use tests::{Endpoint, EndpointSlice, Outcome, Proto, Service, TestBed, node_ip, tcp_requests};

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

fn backends_of(out: &[Outcome], what: &str) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for o in out {
        let r = o.as_ref().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        seen.insert(r.backend.clone());
    }
    Ok(seen)
}

#[test]
fn client_ip_affinity_sticks_until_its_timeout() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.95";
        let mut slice =
            EndpointSlice::new("default", "sticky", "x1").port("http", 8080, Proto::Tcp);
        for (node, name) in [(1, "a-1a"), (1, "a-1b"), (2, "a-2a"), (2, "a-2b")] {
            let p = bed.add_pod(node, name)?;
            bed.start_echo(&p, &[8080], &[])?;
            slice = slice.endpoint(Endpoint::ready(&p.ip.to_string(), &format!("node{node}")));
        }
        let svc = Service::cluster_ip("default", "sticky", VIP)
            .type_("NodePort")
            .spec(
                "ports",
                json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30095}]),
            )
            .spec("sessionAffinity", json!("ClientIP"))
            .spec("sessionAffinityConfig", json!({"clientIP": {"timeoutSeconds": 1}}));
        bed.write_manifest("sticky-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("sticky-slice.yaml", &slice.to_yaml())?;
        let client = bed.add_pod(1, "client")?;
        bed.start_agents(SYNC)?;
        let vip = SocketAddr::new(VIP.parse()?, 80);
        let np = SocketAddr::new(IpAddr::V4(node_ip(1)), 30095);

        let sock = backends_of(
            &bed.pod_requests(&client, Proto::Tcp, vip, 30, T)?,
            "socket LB",
        )?;
        ensure!(sock.len() == 1, "socket LB spread one client over {sock:?}");
        let tc = backends_of(&tcp_requests(&client.ns, vip, 30, T)?, "tc path")?;
        ensure!(tc.len() == 1, "the tc path spread one client over {tc:?}");
        let ext = bed.ext_ns().to_string();
        let nodeport = backends_of(&tcp_requests(&ext, np, 30, T)?, "NodePort")?;
        ensure!(
            nodeport.len() == 1,
            "the NodePort spread one client over {nodeport:?}"
        );

        // After the timeout without connections, a client may be sent elsewhere.
        let mut seen = sock.clone();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(1300));
            let round = backends_of(&bed.pod_requests(&client, Proto::Tcp, vip, 3, T)?, "round")?;
            ensure!(
                round.len() == 1,
                "within a round the client must stick: {round:?}"
            );
            seen.extend(round);
            if seen.len() >= 2 {
                return Ok(());
            }
        }
        anyhow::bail!("the client never moved after its affinity timed out: {seen:?}")
    });
}

//! Hairpin: a backend pod that connects to its own Service and is picked itself gets a working
//! connection, through the socket path (no NAT needed) and through the per-packet path (its
//! source is SNATed to the node so the reply comes back through the reverse NAT). Needs root and
//! the agent binary; fails, never skips.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, ensure};
use tests::{Endpoint, EndpointSlice, Proto, Service, Tally, TestBed, node_ip, tcp_requests};

const T: Duration = Duration::from_secs(2);
const SYNC: Duration = Duration::from_secs(60);

#[test]
fn a_backend_reaches_its_own_service_and_is_picked_itself() {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    let run = |bed: &mut TestBed| -> Result<()> {
        const VIP: &str = "198.18.100.96";
        let me = bed.add_pod(1, "self")?;
        bed.start_echo(&me, &[8080], &[])?;
        let svc = Service::cluster_ip("default", "self", VIP).port("http", 80, 8080, Proto::Tcp);
        let slice = EndpointSlice::new("default", "self", "x1")
            .port("http", 8080, Proto::Tcp)
            .endpoint(Endpoint::ready(&me.ip.to_string(), "node1"));
        bed.write_manifest("self-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("self-slice.yaml", &slice.to_yaml())?;
        bed.start_agents(SYNC)?;
        let vip = SocketAddr::new(VIP.parse()?, 80);

        // Per-packet path: a thread in the pod's namespace (outside its cgroup).
        let out = tcp_requests(&me.ns, vip, 30, T)?;
        Tally::new(&out).expect_no_failures()?;
        for r in out.iter().flatten() {
            ensure!(r.backend == "self" && r.peer == vip, "{r:?}");
            ensure!(
                r.client.ip() == std::net::IpAddr::V4(node_ip(1)),
                "hairpin traffic must come from the node, saw {}",
                r.client
            );
        }
        // Socket path: a process in the pod's cgroup.
        let out = bed.pod_requests(&me, Proto::Tcp, vip, 30, T)?;
        Tally::new(&out).expect_no_failures()?;
        for r in out.iter().flatten() {
            ensure!(r.backend == "self" && r.peer == vip, "{r:?}");
        }
        Ok(())
    };
    if let Err(e) = run(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

//! ICMP errors for translated flows are translated too: a connected UDP socket whose Service
//! backend has nothing listening gets "connection refused" (ICMP port unreachable quoting the
//! translated packet, restored to quote what the client sent), through a ClusterIP on the
//! per-packet path and through a NodePort SNATed to another node. Needs root and the agent
//! binary; fails, never skips.
use std::{
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Result, ensure};
use serde_json::json;
use tests::{Endpoint, EndpointSlice, Proto, Service, TestBed, in_netns, node_ip};

const SYNC: Duration = Duration::from_secs(60);

/// Sends one datagram on a connected socket; the kind of error the receive ends with.
fn udp_outcome(to: SocketAddr) -> std::io::Result<ErrorKind> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.connect(to)?;
    s.send(b"anyone?\n")?;
    let mut buf = [0u8; 512];
    Ok(match s.recv(&mut buf) {
        Ok(_) => ErrorKind::Other,
        Err(e) => e.kind(),
    })
}

#[test]
fn port_unreachable_reaches_the_client_through_clusterip_and_nodeport() {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    let run = |bed: &mut TestBed| -> Result<()> {
        // The only backend listens on TCP only: UDP to it is refused by its kernel.
        let p = bed.add_pod(2, "no-udp")?;
        bed.start_echo(&p, &[8080], &[])?;
        let svc = Service::cluster_ip("default", "refuse", "198.18.100.97")
            .type_("NodePort")
            .spec(
                "ports",
                json!([{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053}]),
            );
        let slice = EndpointSlice::new("default", "refuse", "x1")
            .port("dns", 5353, Proto::Udp)
            .endpoint(Endpoint::ready(&p.ip.to_string(), "node2"));
        bed.write_manifest("refuse-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("refuse-slice.yaml", &slice.to_yaml())?;
        let client = bed.add_pod(1, "client")?;
        let agents = bed.start_agents(SYNC)?;

        let vip: SocketAddr = "198.18.100.97:53".parse()?;
        let got = in_netns(&client.ns, move || udp_outcome(vip))??;
        ensure!(
            got == ErrorKind::ConnectionRefused,
            "ClusterIP: the client saw {got:?}, not the port-unreachable error"
        );
        let np = SocketAddr::new(node_ip(1).into(), 30053);
        let got = in_netns(bed.ext_ns(), move || udp_outcome(np))??;
        ensure!(
            got == ErrorKind::ConnectionRefused,
            "NodePort: the client saw {got:?}, not the port-unreachable error"
        );
        let n = agents[0].status_json()?["counters"]["icmp_translated"]
            .as_u64()
            .unwrap_or(0);
        ensure!(n >= 2, "node1 translated {n} ICMP errors");
        Ok(())
    };
    if let Err(e) = run(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

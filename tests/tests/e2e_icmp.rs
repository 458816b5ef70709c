//! ICMP errors for translated flows are translated too: a connected UDP socket whose Service
//! backend has nothing listening gets "connection refused" (ICMP port unreachable quoting the
//! translated packet, restored to quote what the client sent), through a ClusterIP on the
//! per-packet path and through a NodePort SNATed to another node; and a router on the way to a
//! backend with a smaller MTU teaches the client the path MTU of the Service address (IPv4
//! fragmentation needed, IPv6 Packet Too Big). Needs root and the agent binary; fails, never
//! skips.
use std::{
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{Result, ensure};
use serde_json::json;
use tests::{Endpoint, EndpointSlice, Proto, Service, TestBed, cmd::ip, in_netns, node_ip};

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

fn sockopt(fd: i32, level: i32, name: i32, value: Option<i32>) -> std::io::Result<i32> {
    let mut v: libc::c_int = value.unwrap_or(0);
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let p = &mut v as *mut libc::c_int as *mut libc::c_void;
    // SAFETY: `v` and `len` outlive the call and have the sizes the kernel is told.
    let rc = unsafe {
        match value {
            Some(_) => libc::setsockopt(fd, level, name, p, len),
            None => libc::getsockopt(fd, level, name, p, &mut len),
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Sends don't-fragment datagrams of 1400 bytes to `to` on a connected socket for up to 4 s;
/// the path MTU the socket learned for `to` (1500, the link's, if no error ever matched it).
fn learned_mtu(to: SocketAddr) -> std::io::Result<i32> {
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.connect(to)?;
    let fd = s.as_raw_fd();
    let (level, discover, mtu) = if to.is_ipv4() {
        (libc::SOL_IP, libc::IP_MTU_DISCOVER, libc::IP_MTU)
    } else {
        (libc::SOL_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_MTU)
    };
    // IP_PMTUDISC_DO and IPV6_PMTUDISC_DO are both 2.
    sockopt(fd, level, discover, Some(libc::IP_PMTUDISC_DO))?;
    let mut last = 0;
    for _ in 0..40 {
        // Fails with EMSGSIZE once the smaller path MTU is known: that is the point.
        let _ = s.send(&[0x5a; 1400]);
        std::thread::sleep(Duration::from_millis(100));
        last = sockopt(fd, level, mtu, None)?;
        if last < 1500 {
            break;
        }
    }
    Ok(last)
}

#[test]
fn path_mtu_discovery_works_through_the_service_address() {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    let run = |bed: &mut TestBed| -> Result<()> {
        let p = bed.add_pod(2, "small-mtu")?;
        bed.start_echo(&p, &[], &[5353])?;
        // Node 2 forwards into the backend's link at 1280 bytes; the pod's own side keeps
        // 1500, so only a router on the path can report the smaller MTU.
        let node2 = bed.node(2).ns.clone();
        ip(&["-n", &node2, "link", "set", &p.host_if, "mtu", "1280"])?;
        let svc = Service::cluster_ip("default", "pmtu", "198.18.100.96")
            .spec(
                "ports",
                json!([{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]),
            )
            .spec("clusterIPs", json!(["198.18.100.96", "fd00:18:100::96"]))
            .spec("ipFamilies", json!(["IPv4", "IPv6"]));
        let s4 = EndpointSlice::new("default", "pmtu", "x4")
            .port("dns", 5353, Proto::Udp)
            .endpoint(Endpoint::ready(&p.ip.to_string(), "node2"));
        let mut s6 = EndpointSlice::new("default", "pmtu", "x6").port("dns", 5353, Proto::Udp);
        s6.address_type = "IPv6".into();
        s6 = s6.endpoint(Endpoint::ready(&p.ip6.to_string(), "node2"));
        bed.write_manifest("pmtu-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("pmtu-slice4.yaml", &s4.to_yaml())?;
        bed.write_manifest("pmtu-slice6.yaml", &s6.to_yaml())?;
        let client = bed.add_pod(1, "client")?;
        let agents = bed.start_agents(SYNC)?;

        let counter = |name: &str| -> Result<u64> {
            Ok(agents[0].status_json()?["counters"][name]
                .as_u64()
                .unwrap_or(0))
        };
        for vip in ["198.18.100.96:53", "[fd00:18:100::96]:53"] {
            let vip: SocketAddr = vip.parse()?;
            let (icmp, new) = (counter("icmp_translated")?, counter("translated_new")?);
            let mtu = in_netns(&client.ns, move || learned_mtu(vip))??;
            ensure!(
                mtu == 1280,
                "{vip}: the client's socket knows a path MTU of {mtu}, not the router's 1280"
            );
            ensure!(
                counter("translated_new")? > new,
                "{vip}: the datagrams were not translated on the per-packet path"
            );
            ensure!(
                counter("icmp_translated")? > icmp,
                "{vip}: node1 translated no ICMP error"
            );
        }
        Ok(())
    };
    if let Err(e) = run(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

//! The benchmark's Services: addresses, ports and endpoints, the same for every mode.
//!
//! Address plan (everything in 198.18.0.0/15, inside the bench's own namespaces):
//! - 198.18.0.0/24: the test bed's LAN (node1 198.18.0.1, node2 198.18.0.2, the external
//!   client 198.18.0.100).
//! - 198.18.16.0/20: made-up external clients of the per-packet NodePort measurement, routed
//!   via the external client by node1.
//! - 198.19.0.0/18: the pod ("cluster") CIDR. Real pods live in 198.19.1.0/24 (node1) and
//!   198.19.2.0/24 (node2); the endpoints of Services that never carry traffic come from
//!   198.19.16.0/20.
//! - Service ClusterIPs: 198.18.32.0 .. 198.18.255.255 then 198.19.64.0 .. 198.19.255.255
//!   ([`SERVICE_CIDRS`], 106,496 addresses), disjoint from every pod address.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use tests::Proto;

/// Pod CIDR: the `! -s` / `ip saddr !=` masquerade match of kube-proxy.
pub const CLUSTER_CIDR: &str = "198.19.0.0/18";
/// Service CIDRs (kube-proxy's nftables mode drops traffic to unallocated addresses in them).
pub const SERVICE_CIDRS: [&str; 5] = [
    "198.18.32.0/19",
    "198.18.64.0/18",
    "198.18.128.0/17",
    "198.19.64.0/18",
    "198.19.128.0/17",
];
/// Kubernetes namespace of every benchmark Service.
pub const NAMESPACE: &str = "bench";
/// Target ports of the exercised Services on the real backend pod.
pub const HTTP_TARGET: u16 = 8080;
pub const DNS_TARGET: u16 = 5353;
pub const IPERF_PORT: u16 = 5201;
/// nodePorts of the NodePort Service (Service 1), whose endpoints are on node2.
pub const NODEPORT_TCP: u16 = 30080;
pub const NODEPORT_UDP: u16 = 30053;
/// Index of the NodePort Service among the N.
pub const NODEPORT_INDEX: usize = 1;

/// i-th Service address.
pub fn vip(i: usize) -> Ipv4Addr {
    const FIRST: usize = 57_344; // 198.18.32.0 .. 198.18.255.255
    let base = if i < FIRST {
        u32::from(Ipv4Addr::new(198, 18, 32, 0)) + i as u32
    } else {
        u32::from(Ipv4Addr::new(198, 19, 64, 0)) + (i - FIRST) as u32
    };
    assert!(
        i < FIRST + 49_152,
        "Service index {i} out of the VIP ranges"
    );
    Ipv4Addr::from(base)
}

/// Endpoint `j` (0..3) of a Service that never carries traffic: unique (address, port) pairs
/// from 198.19.16.0/20; the port depends only on the Service, so one EndpointSlice holds all.
fn idle_endpoint(i: usize, j: usize) -> (Ipv4Addr, u16) {
    let k = 3 * (i % 1000) + j;
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 16, 0)) + k as u32);
    (ip, 20_000 + (i / 1000) as u16)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortDef {
    pub name: &'static str,
    pub proto: Proto,
    pub port: u16,
    pub target: u16,
    /// The Service's nodePort for this port (type NodePort).
    pub node_port: Option<u16>,
}

impl PortDef {
    pub fn proto_lower(&self) -> &'static str {
        match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One Service with its endpoints (every port has the same endpoint addresses).
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<PortDef>,
    pub endpoints: Vec<Ipv4Addr>,
    /// `nodeName` of every endpoint.
    pub node: &'static str,
}

impl Svc {
    /// `namespace/name:port` (kube-proxy's ServicePortName).
    pub fn port_name(&self, p: &PortDef) -> String {
        format!("{NAMESPACE}/{}:{}", self.name, p.name)
    }

    /// Type NodePort (some port has a nodePort).
    pub fn is_node_port(&self) -> bool {
        self.ports.iter().any(|p| p.node_port.is_some())
    }
}

/// The real backend pods the exercised Services lead to.
///
/// The first, the last and the added Service each get three addresses of their own on pod A:
/// were two Services' endpoints the same, one client port reused towards both would give two
/// translated flows the same reply tuple (backend:port -> client:port), which conntrack cannot
/// tell apart (the new flow is dropped and retried a second later): a real effect, but one
/// this bench would create only because its Services share a pod.
#[derive(Clone, Debug)]
pub struct Backends {
    /// Endpoints of the first Service: addresses of backend pod A (tb-echo tcp/8080 and
    /// udp/5353, iperf3 5201).
    pub first: [Ipv4Addr; 3],
    /// Endpoints of the last Service (pod A).
    pub last: [Ipv4Addr; 3],
    /// Endpoints of the added Service (pod A).
    pub added: [Ipv4Addr; 3],
    /// Backend pod B (tb-echo tcp/8080): the endpoint that "change one endpoint" swaps in.
    pub b: Ipv4Addr,
    /// Endpoints of the NodePort Service: three addresses of backend pod C on node2 (tb-echo
    /// tcp/8080 and udp/5353).
    pub remote: [Ipv4Addr; 3],
}

fn exercised_ports(last: bool) -> Vec<PortDef> {
    let http = PortDef {
        name: "http",
        proto: Proto::Tcp,
        port: 80,
        target: HTTP_TARGET,
        node_port: None,
    };
    let dns = PortDef {
        name: "dns",
        proto: Proto::Udp,
        port: 53,
        target: DNS_TARGET,
        node_port: None,
    };
    let iperf = PortDef {
        name: "iperf",
        proto: Proto::Tcp,
        port: IPERF_PORT,
        target: IPERF_PORT,
        node_port: None,
    };
    // The last Service's TCP port is the very last rule of KUBE-SERVICES.
    if last {
        vec![dns, iperf, http]
    } else {
        vec![http, dns, iperf]
    }
}

/// The NodePort Service's ports: tcp/80 -> 8080 (nodePort 30080), udp/53 -> 5353 (30053).
fn node_port_ports() -> Vec<PortDef> {
    vec![
        PortDef {
            name: "http",
            proto: Proto::Tcp,
            port: 80,
            target: HTTP_TARGET,
            node_port: Some(NODEPORT_TCP),
        },
        PortDef {
            name: "dns",
            proto: Proto::Udp,
            port: 53,
            target: DNS_TARGET,
            node_port: Some(NODEPORT_UDP),
        },
    ]
}

/// `n` Services (n >= 3). The first and the last one lead to the real backend pod A on three
/// ports (tcp/80, udp/53, tcp/5201); Service 1 is of type NodePort (tcp/80 and udp/53 with
/// nodePorts 30080 and 30053, externalTrafficPolicy Cluster) with its three endpoints on pod C
/// on node2, so traffic to node1's NodePort is forwarded to another node; the others have one
/// port (tcp/80) and three endpoints that never receive traffic.
pub fn services(n: usize, be: &Backends) -> Vec<Svc> {
    assert!(n >= 3);
    (0..n)
        .map(|i| {
            let name = format!("svc-{i:06}");
            if i == 0 || i == n - 1 {
                Svc {
                    name,
                    vip: vip(i),
                    ports: exercised_ports(i == n - 1),
                    endpoints: if i == 0 { be.first } else { be.last }.to_vec(),
                    node: "node1",
                }
            } else if i == NODEPORT_INDEX {
                Svc {
                    name,
                    vip: vip(i),
                    ports: node_port_ports(),
                    endpoints: be.remote.to_vec(),
                    node: "node2",
                }
            } else {
                let port = idle_endpoint(i, 0).1;
                Svc {
                    name,
                    vip: vip(i),
                    ports: vec![PortDef {
                        name: "http",
                        proto: Proto::Tcp,
                        port: 80,
                        target: port,
                        node_port: None,
                    }],
                    endpoints: (0..3).map(|j| idle_endpoint(i, j).0).collect(),
                    node: "node1",
                }
            }
        })
        .collect()
}

/// The Service that "add one Service" adds (`changed`: with one endpoint swapped to pod B).
pub fn added(n: usize, be: &Backends, changed: bool) -> Svc {
    let mut endpoints = be.added.to_vec();
    if changed {
        endpoints[2] = be.b;
    }
    Svc {
        name: "added".into(),
        vip: vip(n),
        ports: vec![PortDef {
            name: "http",
            proto: Proto::Tcp,
            port: 80,
            target: HTTP_TARGET,
            node_port: None,
        }],
        endpoints,
        node: "node1",
    }
}

/// Frontends the agent programs for a set of Services: one per Service port, plus one per
/// nodePort (the agents serve NodePorts on node1's one IPv4 LAN address only).
pub fn frontends(svcs: &[Svc]) -> usize {
    svcs.iter()
        .flat_map(|s| &s.ports)
        .map(|p| 1 + usize::from(p.node_port.is_some()))
        .sum()
}

/// Service + EndpointSlice as YAML documents, as the agent's `--manifests` source reads them.
pub fn yaml(s: &Svc, out: &mut String) {
    let _ = write!(
        out,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n  type: {kind}\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  selector:\n    app: {name}\n  ports:\n",
        name = s.name,
        vip = s.vip,
        kind = if s.is_node_port() {
            "NodePort"
        } else {
            "ClusterIP"
        },
    );
    for p in &s.ports {
        let _ = write!(
            out,
            "  - name: {}\n    port: {}\n    protocol: {}\n    targetPort: {}\n",
            p.name,
            p.port,
            p.proto.k8s(),
            p.target
        );
        if let Some(np) = p.node_port {
            let _ = writeln!(out, "    nodePort: {np}");
        }
    }
    let _ = write!(
        out,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x1\n  namespace: {NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nendpoints:\n",
        name = s.name
    );
    for e in &s.endpoints {
        let _ = write!(
            out,
            "- addresses: [{e}]\n  conditions: {{ready: true}}\n  nodeName: {}\n",
            s.node
        );
    }
    out.push_str("ports:\n");
    for p in &s.ports {
        let _ = write!(
            out,
            "- name: {}\n  port: {}\n  protocol: {}\n",
            p.name,
            p.target,
            p.proto.k8s()
        );
    }
    out.push_str("---\n");
}

/// The Services as YAML files of up to `per_file` Services each: (file name, text).
pub fn yaml_files(svcs: &[Svc], per_file: usize) -> Vec<(String, String)> {
    svcs.chunks(per_file)
        .enumerate()
        .map(|(k, chunk)| {
            let mut text = String::with_capacity(chunk.len() * 700);
            for s in chunk {
                yaml(s, &mut text);
            }
            (format!("services-{k:04}.yaml"), text)
        })
        .collect()
}

#[cfg(test)]
mod unit {
    use super::*;

    fn be() -> Backends {
        let a = |k: u8| Ipv4Addr::new(198, 19, 1, k);
        let c = |k: u8| Ipv4Addr::new(198, 19, 2, k);
        Backends {
            first: [a(3), a(200), a(201)],
            last: [a(202), a(203), a(204)],
            added: [a(205), a(206), a(207)],
            b: a(4),
            remote: [c(2), c(200), c(201)],
        }
    }

    #[test]
    fn vips_are_unique_and_outside_the_pod_cidr() {
        let pods = (
            u32::from(Ipv4Addr::new(198, 19, 0, 0)),
            u32::from(Ipv4Addr::new(198, 19, 63, 255)),
        );
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_010 {
            let v = u32::from(vip(i));
            assert!(seen.insert(v));
            assert!(v < pods.0 || v > pods.1, "{}", vip(i));
            assert!(v >= u32::from(Ipv4Addr::new(198, 18, 32, 0)));
        }
        assert_eq!(vip(57_343), Ipv4Addr::new(198, 18, 255, 255));
        assert_eq!(vip(57_344), Ipv4Addr::new(198, 19, 64, 0));
    }

    #[test]
    fn idle_endpoints_are_unique() {
        let svcs = services(100_000, &be());
        let mut seen = std::collections::HashSet::new();
        for s in &svcs[2..svcs.len() - 1] {
            for e in &s.endpoints {
                assert!(seen.insert((*e, s.ports[0].target)));
                let o = e.octets();
                assert!(o[0] == 198 && o[1] == 19 && (16..32).contains(&o[2]), "{e}");
            }
        }
        assert_eq!(seen.len(), 3 * 99_997);
    }

    #[test]
    fn yaml_parses_as_kubernetes_objects() {
        let svcs = services(10, &be());
        let mut text = String::new();
        yaml(&svcs[9], &mut text);
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &serde_yaml::Value| !v.is_null())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["spec"]["clusterIP"].as_str(), Some("198.18.32.9"));
        assert_eq!(docs[0]["spec"]["ports"][2]["name"].as_str(), Some("http"));
        assert_eq!(
            docs[1]["endpoints"][1]["addresses"][0].as_str(),
            Some("198.19.1.203")
        );
        assert_eq!(docs[1]["ports"][0]["port"].as_u64(), Some(5353));
        assert_eq!(docs[1]["endpoints"][0]["nodeName"].as_str(), Some("node1"));
        // 3 + 3 ports of the first and last Service, 2 ports and 2 nodePorts of the NodePort
        // Service, one port of each of the 7 others.
        assert_eq!(frontends(&svcs), 17);

        let mut text = String::new();
        yaml(&svcs[NODEPORT_INDEX], &mut text);
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &serde_yaml::Value| !v.is_null())
            .collect();
        assert_eq!(docs[0]["spec"]["type"].as_str(), Some("NodePort"));
        assert_eq!(
            docs[0]["spec"]["ports"][0]["nodePort"].as_u64(),
            Some(30080)
        );
        assert_eq!(
            docs[0]["spec"]["ports"][1]["nodePort"].as_u64(),
            Some(30053)
        );
        assert_eq!(docs[1]["endpoints"][2]["nodeName"].as_str(), Some("node2"));
        assert_eq!(
            docs[1]["endpoints"][2]["addresses"][0].as_str(),
            Some("198.19.2.201")
        );
    }
}

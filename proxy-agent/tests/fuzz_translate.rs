//! Property tests of the translation (Kubernetes objects -> desired frontends) over hostile input,
//! from a seeded generator.
//!
//! Each case builds two sets of objects:
//! - a *valid* world: Services (ClusterIP/NodePort/LoadBalancer, single and dual stack, with
//!   `clusterIPs` or only `clusterIP`, headless, ExternalName, labelled for this proxy or another
//!   one, with and without selectors, session affinity, traffic policies, the lb-algorithm
//!   annotation), their EndpointSlices
//!   (both families, named and unnamed ports, every condition combination, zone and node hints,
//!   now and then hundreds of endpoints) or hand-written Endpoints, and this node's Node;
//! - a *hostile* world that never names a valid Service nor uses a valid Service's addresses:
//!   Services with missing specs and names, garbage and mismatched `clusterIP(s)` (wrong
//!   families, CIDRs, "None", empty), ports from i32::MIN to 70000, duplicate and missing port
//!   names, unknown protocols, odd types and affinity timeouts, random labels (the
//!   service-proxy-name label included), lb-algorithm annotations with good and bad values,
//!   ClusterIPs shared between them; EndpointSlices unowned,
//!   owned by hostile or absent Services, with unknown address types, bad ports, empty, garbage
//!   and wrong-family addresses, sometimes 5000 endpoints; Endpoints with bad ports and IPs;
//!   other Nodes with random labels.
//!
//! Properties, in three tests over the same cases:
//! - `translate_survives_hostile_objects`: `translate` never panics; the valid world alone
//!   translates without errors; every valid Service is programmed identically with and without
//!   the hostile objects (adding rejected objects never changes another Service's frontends or
//!   backends); every error names an object of the input ("Service ns/name", "EndpointSlice
//!   ns/name", "Endpoints ns/name") that is a hostile one, with a field path; every programmed
//!   frontend has a port, its endpoints are sorted, unique, of its family, with ports (no
//!   per-Service endpoint limit: kube-proxy has none); every valid frontend uses the backend selection its Service's annotation
//!   asks for, or else random for cluster IPs and `--external-lb-algorithm` for the others.
//! - `error_field_paths_exist_in_their_objects`: each error's field path exists in the object it
//!   names (only its last field may be absent; `name[key]` is a map key).
//! - `health_check_ports_stay_with_their_service`: a valid Service's healthCheckNodePort is not
//!   taken over by a later Service asking for the same port, and that Service is rejected with an
//!   error naming it (or is not ours).
//!
//! Size and reproduction: `FUZZ_CASES` (default 300, the fast subset `cargo xtask test` runs; about
//! 2 s per test in a debug build) and `FUZZ_SEED` (default random, printed). Bigger run (about
//! 35 s per test on the 2-core machines, after the release build):
//!
//! ```sh
//! FUZZ_CASES=20000 cargo test --release -p proxy-agent --test fuzz_translate -- --nocapture
//! ```
//!
//! A panic inside `translate` writes the case's objects to a JSON file and names it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    panic::{AssertUnwindSafe, catch_unwind},
    time::Instant,
};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, EndpointAddress, EndpointPort as CoreEndpointPort, EndpointSubset,
            Endpoints, LoadBalancerIngress, LoadBalancerStatus, Node, Service, ServicePort,
            ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{
            Endpoint as SliceEndpoint, EndpointConditions, EndpointHints, EndpointPort,
            EndpointSlice, ForNode, ForZone,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use proxy_agent::model::{
    DesiredService, Frontend, Inputs, LbAlgorithm, Options, TranslateError, Translation,
    translate::{
        LB_ALGORITHM_ANNOTATION, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, ZONE_LABEL,
    },
};
use proxy_common::ServiceKind;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

const NODES: [&str; 3] = ["node1", "node2", "node3"];
const ZONES: [&str; 3] = ["z1", "z2", "z3"];
const OUR_PROXY: &str = "ours";

fn meta(ns: Option<&str>, name: Option<&str>, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        namespace: ns.map(String::from),
        name: name.map(String::from),
        labels: (!labels.is_empty()).then_some(labels),
        ..Default::default()
    }
}

/// "ns/name" as translate reads an object's identity.
fn key(m: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().unwrap_or("")
    )
}

/// This node's NodePort addresses (some cases use none, one or both).
const NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);

/// Valid Services' addresses (cluster, external and load-balancer IPs) come from
/// 198.18.100.0/24 and fd00:100::/64, their nodePorts and healthCheckNodePorts from
/// 30000-32767; hostile objects use none of these, nor the node's addresses.
fn reserved_for_valid(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.octets()[..3] == [198, 18, 100] || a == NODE_V4,
        IpAddr::V6(a) => a.segments()[..4] == [0xfd00, 0x100, 0, 0] || a == NODE_V6,
    }
}

const VALID_NODE_PORTS: std::ops::RangeInclusive<i32> = 30000..=32767;

struct Gen {
    rng: StdRng,
    next_vip: u16,
    next_node_port: i32,
}

/// What one case contains, for the report.
#[derive(Default)]
struct Tried {
    services: u64,
    slices: u64,
    endpoints_objects: u64,
    nodes: u64,
    endpoint_addresses: u64,
    ports: u64,
}

impl Tried {
    fn add(&mut self, i: &Inputs) {
        self.services += i.services.len() as u64;
        self.slices += i.slices.len() as u64;
        self.endpoints_objects += i.endpoints.len() as u64;
        self.nodes += i.nodes.len() as u64;
        self.endpoint_addresses += i
            .slices
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .map(|e| e.addresses.len() as u64)
            .sum::<u64>()
            + i.endpoints
                .iter()
                .flat_map(|e| e.subsets.iter().flatten())
                .map(|s| {
                    (s.addresses.as_ref().map_or(0, Vec::len)
                        + s.not_ready_addresses.as_ref().map_or(0, Vec::len))
                        as u64
                })
                .sum::<u64>();
        self.ports += i
            .services
            .iter()
            .filter_map(|s| s.spec.as_ref()?.ports.as_ref())
            .map(|p| p.len() as u64)
            .sum::<u64>();
    }
}

impl Gen {
    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v.choose(&mut self.rng).expect("non-empty").clone()
    }

    fn maybe<T>(&mut self, p: f64, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        if self.rng.random_bool(p) {
            Some(f(self))
        } else {
            None
        }
    }

    fn word(&mut self) -> String {
        let n = self.rng.random_range(0..12);
        let alphabet = b"abcXYZ09-_./:@ \xc3\xa9";
        let bytes: Vec<u8> = (0..n).map(|_| self.pick(alphabet)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn valid_vip(&mut self, v4: bool) -> IpAddr {
        self.next_vip += 1;
        let n = self.next_vip;
        if v4 {
            IpAddr::V4(Ipv4Addr::new(198, 18, 100, n as u8))
        } else {
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, n))
        }
    }

    fn pod_ip(&mut self, v4: bool) -> IpAddr {
        if v4 {
            IpAddr::V4(Ipv4Addr::new(
                198,
                19,
                self.rng.random_range(0..4),
                self.rng.random_range(1..255),
            ))
        } else {
            IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0x19,
                0,
                0,
                0,
                0,
                self.rng.random_range(0..4),
                self.rng.random_range(1..0xffff),
            ))
        }
    }

    /// Any address outside the valid VIP ranges, or a string that is not an address at all.
    fn hostile_ip(&mut self) -> String {
        let s = match self.rng.random_range(0..14) {
            0 => String::new(),
            1 => "None".into(),
            2 => "198.18.200.1".into(), // shared between hostile Services: conflicts
            3 => "fd00:200::1".into(),
            4 => "999.1.1.1".into(),
            5 => "198.18.200.5/24".into(),
            6 => "::ffff:zz".into(),
            7 => " 198.18.200.2".into(),
            8 => "::ffff:198.18.200.3".into(),
            9 => self.word(),
            10 | 11 => Ipv4Addr::from(self.rng.random::<u32>()).to_string(),
            _ => Ipv6Addr::from(self.rng.random::<u128>()).to_string(),
        };
        match s.parse::<IpAddr>() {
            Ok(a) if reserved_for_valid(a) => "198.18.200.9".into(),
            _ => s,
        }
    }

    fn valid_node_port(&mut self) -> i32 {
        self.next_node_port += 1;
        assert!(VALID_NODE_PORTS.contains(&self.next_node_port));
        self.next_node_port
    }

    /// A nodePort or healthCheckNodePort outside the valid Services' range.
    fn hostile_node_port(&mut self) -> i32 {
        match self.hostile_port() {
            p if VALID_NODE_PORTS.contains(&p) => p - 10_000,
            p => p,
        }
    }

    fn hostile_port(&mut self) -> i32 {
        match self.rng.random_range(0..15) {
            12..15 => self.pick(&[80, 443, 20000]),
            0 => i32::MIN,
            1 => i32::MAX,
            2 => -1,
            3 => 0,
            4 => 65536,
            5 => 70000,
            6 => 65535,
            7 => 1,
            _ => self.rng.random_range(-100..70000),
        }
    }

    fn protocol(&mut self, hostile: bool) -> Option<String> {
        if hostile {
            let w = self.word();
            self.pick(&[
                None,
                Some("TCP".into()),
                Some("UDP".into()),
                Some("SCTP".into()),
                Some("ICMP".into()),
                Some("tcp".into()),
                Some(String::new()),
                Some(w),
            ])
        } else {
            self.pick(&[None, Some("TCP".into()), Some("UDP".into())])
        }
    }

    fn conditions(&mut self) -> Option<EndpointConditions> {
        let mut b = || self.pick(&[None, Some(true), Some(false)]);
        let c = EndpointConditions {
            ready: b(),
            serving: b(),
            terminating: b(),
        };
        self.maybe(0.8, |_| c)
    }

    fn hints(&mut self) -> Option<EndpointHints> {
        self.maybe(0.3, |g| EndpointHints {
            for_zones: g.maybe(0.8, |g| {
                (0..g.rng.random_range(0..3))
                    .map(|_| ForZone {
                        name: g.pick(&ZONES).into(),
                    })
                    .collect()
            }),
            for_nodes: g.maybe(0.3, |g| {
                (0..g.rng.random_range(0..3))
                    .map(|_| ForNode {
                        name: g.pick(&NODES).into(),
                    })
                    .collect()
            }),
        })
    }

    fn node_name(&mut self) -> Option<String> {
        self.pick(&[None, Some("node1"), Some("node2"), Some("node3")])
            .map(String::from)
    }

    /// Most of a Service's ports as an endpoint lists them: same name and protocol, any number.
    fn target_ports(
        &mut self,
        ports: &[ServicePort],
    ) -> Vec<(Option<String>, i32, Option<String>)> {
        let mut out = Vec::new();
        for p in ports {
            if self.rng.random_bool(0.9) {
                let port = self.rng.random_range(1..=65535);
                out.push((p.name.clone(), port, p.protocol.clone()));
            }
        }
        out
    }

    /// The valid world; returns the objects and the "ns/name" of every Service.
    fn valid_world(&mut self, opts: &Options) -> (Inputs, BTreeSet<String>) {
        let mut inputs = Inputs::default();
        let mut names = BTreeSet::new();
        for i in 0..self.rng.random_range(0..=6) {
            let ns = self.pick(&["v0", "v1", "default"]);
            let name = format!("svc-{i}");
            let ns_field = if ns == "default" && self.rng.random_bool(0.5) {
                None
            } else {
                Some(ns)
            };
            let mut labels = BTreeMap::new();
            let ours = match &opts.service_proxy_name {
                Some(p) => self.rng.random_bool(0.8).then_some(p.clone()),
                None => None,
            };
            let proxy_label = if self.rng.random_bool(0.1) {
                Some("another-proxy".to_string())
            } else {
                ours
            };
            if let Some(p) = proxy_label {
                labels.insert(SERVICE_PROXY_NAME_LABEL.to_string(), p);
            }
            if self.rng.random_bool(0.3) {
                labels.insert("app".into(), name.clone());
            }
            let families: Vec<bool> = self.pick(&[
                vec![true],
                vec![true],
                vec![false],
                vec![true, false],
                vec![false, true],
            ]);
            let vips: Vec<IpAddr> = families.iter().map(|v4| self.valid_vip(*v4)).collect();
            let n_ports = self.rng.random_range(1..=4usize);
            let mut numbers = BTreeSet::new();
            while numbers.len() < n_ports {
                numbers.insert(self.rng.random_range(1..=65535i32));
            }
            let ports: Vec<ServicePort> = numbers
                .iter()
                .enumerate()
                .map(|(k, port)| ServicePort {
                    name: if n_ports == 1 {
                        self.pick(&[None, Some(String::new()), Some("p0".into())])
                    } else {
                        Some(format!("p{k}"))
                    },
                    port: *port,
                    protocol: self.protocol(false),
                    target_port: match self.rng.random_range(0..3) {
                        0 => None,
                        1 => Some(IntOrString::Int(self.rng.random_range(1..65536))),
                        _ => Some(IntOrString::String("web".into())),
                    },
                    ..Default::default()
                })
                .collect();
            let selector = self.maybe(0.7, |_| BTreeMap::from([("app".to_string(), name.clone())]));
            let shape = self.rng.random_range(0..100);
            let (mut type_, cluster_ips, cluster_ip) = match shape {
                // Headless.
                0..8 => (None, None, Some("None".to_string())),
                8..14 => (
                    Some("ExternalName".to_string()),
                    None,
                    self.maybe(0.3, |g| g.valid_vip(true).to_string()),
                ),
                14..40 if vips.len() == 1 => (
                    self.pick(&[None, Some("ClusterIP".into())]),
                    None,
                    Some(vips[0].to_string()),
                ),
                _ => (
                    self.pick(&[
                        None,
                        Some("ClusterIP".to_string()),
                        Some("NodePort".into()),
                        Some("LoadBalancer".into()),
                    ]),
                    Some(vips.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
                    self.maybe(0.7, |_| vips[0].to_string()),
                ),
            };
            // Occasionally a NodePort or LoadBalancer Service: nodePorts (allocated or not yet),
            // externalIPs, load-balancer ingress IPs (ipMode VIP or Proxy, or a hostname),
            // externalTrafficPolicy, a healthCheckNodePort.
            let external = type_.as_deref() != Some("ExternalName")
                && cluster_ip.as_deref() != Some("None")
                && self.rng.random_bool(0.35);
            let mut ports = ports;
            let mut external_ips = None;
            let mut status = None;
            let mut etp = None;
            let mut health = None;
            if external {
                type_ = Some(self.pick(&["NodePort", "LoadBalancer"]).to_string());
                for p in &mut ports {
                    p.node_port = self.maybe(0.9, Self::valid_node_port);
                }
                external_ips = self.maybe(0.3, |g| {
                    (0..g.rng.random_range(1..=2))
                        .map(|_| {
                            let v4 = g.rng.random_bool(0.7);
                            g.valid_vip(v4).to_string()
                        })
                        .collect()
                });
                if type_.as_deref() == Some("LoadBalancer") {
                    status = self.maybe(0.7, |g| ServiceStatus {
                        load_balancer: Some(LoadBalancerStatus {
                            ingress: Some(
                                (0..g.rng.random_range(0..=2))
                                    .map(|_| LoadBalancerIngress {
                                        ip: g.maybe(0.8, |g| {
                                            let v4 = g.rng.random_bool(0.7);
                                            g.valid_vip(v4).to_string()
                                        }),
                                        hostname: g.maybe(0.2, |_| "lb.example.invalid".into()),
                                        ip_mode: g.pick(&[
                                            None,
                                            Some("VIP".into()),
                                            Some("Proxy".into()),
                                        ]),
                                        ..Default::default()
                                    })
                                    .collect(),
                            ),
                        }),
                        ..Default::default()
                    });
                }
                etp = self.pick(&[None, Some("Cluster".to_string()), Some("Local".into())]);
                if etp.as_deref() == Some("Local") {
                    health = self.maybe(0.8, Self::valid_node_port);
                }
            }
            let spec = ServiceSpec {
                type_,
                cluster_ip,
                cluster_ips,
                external_ips,
                external_traffic_policy: etp,
                health_check_node_port: health,
                ip_families: self.maybe(0.5, |_| {
                    families
                        .iter()
                        .map(|v4| if *v4 { "IPv4" } else { "IPv6" }.to_string())
                        .collect()
                }),
                external_name: Some("db.example.invalid".into()),
                ports: Some(ports.clone()),
                selector: selector.clone(),
                session_affinity: self.pick(&[None, Some("None".into()), Some("ClientIP".into())]),
                session_affinity_config: self.maybe(0.3, |g| SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: g.maybe(0.8, |g| g.rng.random_range(1..=86_400)),
                    }),
                }),
                internal_traffic_policy: self.pick(&[
                    None,
                    Some("Cluster".into()),
                    Some("Local".into()),
                ]),
                traffic_distribution: self.pick(&[None, Some("PreferClose".into())]),
                ..Default::default()
            };
            let algorithm = self.maybe(0.3, |g| g.pick(&["random", "maglev"]).to_string());
            let svc = Service {
                metadata: ObjectMeta {
                    annotations: algorithm
                        .map(|a| BTreeMap::from([(LB_ALGORITHM_ANNOTATION.into(), a)])),
                    ..meta(ns_field, Some(&name), labels)
                },
                spec: Some(spec),
                status,
            };
            names.insert(key(&svc.metadata));
            inputs.services.push(svc);

            // Endpoints: slices (any Service), or a hand-written Endpoints (selectorless).
            if selector.is_none() && self.rng.random_bool(0.5) {
                let subsets = (0..self.rng.random_range(0..=2))
                    .map(|_| {
                        let addrs = |g: &mut Self, n: usize| -> Vec<EndpointAddress> {
                            (0..g.rng.random_range(0..=n))
                                .map(|_| {
                                    let v4 = g.pick(&families);
                                    EndpointAddress {
                                        ip: g.pod_ip(v4).to_string(),
                                        node_name: g.node_name(),
                                        ..Default::default()
                                    }
                                })
                                .collect()
                        };
                        EndpointSubset {
                            addresses: Some(addrs(self, 6)),
                            not_ready_addresses: self.maybe(0.3, |g| addrs(g, 3)),
                            ports: Some(
                                self.target_ports(&ports)
                                    .into_iter()
                                    .map(|(name, port, protocol)| CoreEndpointPort {
                                        name,
                                        port,
                                        protocol,
                                        ..Default::default()
                                    })
                                    .collect(),
                            ),
                        }
                    })
                    .collect();
                inputs.endpoints.push(Endpoints {
                    metadata: meta(Some(ns), Some(&name), BTreeMap::new()),
                    subsets: Some(subsets),
                });
            } else {
                for (f, v4) in families.iter().enumerate() {
                    for k in 0..self.rng.random_range(0..=2) {
                        let n_eps = if self.rng.random_bool(0.02) {
                            self.rng.random_range(300..1000)
                        } else {
                            self.rng.random_range(0..=12)
                        };
                        let endpoints = (0..n_eps)
                            .map(|_| SliceEndpoint {
                                addresses: vec![self.pod_ip(*v4).to_string()],
                                conditions: self.conditions(),
                                node_name: self.node_name(),
                                hints: self.hints(),
                                ..Default::default()
                            })
                            .collect();
                        let mut slice_ports: Vec<EndpointPort> = self
                            .target_ports(&ports)
                            .into_iter()
                            .map(|(name, port, protocol)| EndpointPort {
                                name,
                                port: Some(port),
                                protocol,
                                ..Default::default()
                            })
                            .collect();
                        if self.rng.random_bool(0.1) {
                            slice_ports.push(EndpointPort {
                                name: Some("not-a-service-port".into()),
                                port: Some(9),
                                ..Default::default()
                            });
                        }
                        inputs.slices.push(EndpointSlice {
                            metadata: meta(
                                Some(ns),
                                Some(&format!("{name}-{f}-{k}")),
                                BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), name.clone())]),
                            ),
                            address_type: if *v4 { "IPv4" } else { "IPv6" }.into(),
                            endpoints: Some(endpoints),
                            ports: Some(slice_ports),
                        });
                    }
                }
            }
        }
        // This node, with or without a zone.
        let mut labels = BTreeMap::new();
        if self.rng.random_bool(0.7) {
            labels.insert(ZONE_LABEL.to_string(), self.pick(&ZONES).into());
        }
        inputs.nodes.push(Node {
            metadata: meta(None, Some(&opts.node_name), labels),
            ..Default::default()
        });
        (inputs, names)
    }

    fn hostile_labels(&mut self, svc_names: &[String]) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        for _ in 0..self.rng.random_range(0..4) {
            let w = self.word();
            let k = self.pick(&[
                SERVICE_PROXY_NAME_LABEL.to_string(),
                SERVICE_NAME_LABEL.to_string(),
                ZONE_LABEL.to_string(),
                w,
            ]);
            let w = self.word();
            let v = match k.as_str() {
                SERVICE_PROXY_NAME_LABEL => self.pick(&[OUR_PROXY.to_string(), String::new(), w]),
                SERVICE_NAME_LABEL if !svc_names.is_empty() => self.pick(svc_names),
                _ => self.word(),
            };
            labels.insert(k, v);
        }
        labels
    }

    /// Well-formed hostile Services that collide with each other (same ClusterIP, nodePort,
    /// externalIP or load-balancer IP and port), carry a bad nodePort, healthCheckNodePort or
    /// ingress IP, or reuse a valid Service's healthCheckNodePort (not a frontend).
    fn hostile_pairs(&mut self, valid: &Inputs, inputs: &mut Inputs) {
        let valid_health: Vec<i32> = valid
            .services
            .iter()
            .filter_map(|s| s.spec.as_ref()?.health_check_node_port)
            .collect();
        let collide = self.rng.random_range(0..8);
        // 5 and 7: the last arm below.
        let reuses_valid_health = matches!(collide, 5 | 7);
        for k in 0..self.rng.random_range(0..=3) {
            // Those reusing a valid Service's health check port sort after every valid Service
            // (namespace "x"): the earlier Service in name order keeps a shared port.
            let ns = if reuses_valid_health {
                "x"
            } else {
                self.pick(&["v0", "x", "default"])
            };
            let mut spec = ServiceSpec {
                cluster_ip: Some(format!("198.18.200.{}", 100 + k)),
                ports: Some(vec![ServicePort {
                    name: Some("a".into()),
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            };
            let mut status = None;
            match collide {
                0 => spec.cluster_ip = Some("198.18.200.1".into()),
                1 => {
                    spec.type_ = Some("NodePort".into());
                    spec.ports.as_mut().unwrap()[0].node_port = Some(20000);
                }
                2 => spec.external_ips = Some(vec!["198.18.200.7".into()]),
                3 => {
                    spec.type_ = Some("LoadBalancer".into());
                    status = Some(ServiceStatus {
                        load_balancer: Some(LoadBalancerStatus {
                            ingress: Some(vec![LoadBalancerIngress {
                                ip: Some(self.pick(&["198.18.200.8", "lb.invalid"]).into()),
                                ..Default::default()
                            }]),
                        }),
                        ..Default::default()
                    });
                }
                4 => {
                    spec.type_ = Some("NodePort".into());
                    spec.ports.as_mut().unwrap()[0].node_port = Some(self.hostile_node_port());
                }
                6 => {
                    spec.type_ = Some("NodePort".into());
                    spec.external_traffic_policy = Some("Local".into());
                    spec.health_check_node_port = Some(self.hostile_node_port());
                }
                _ => {
                    spec.type_ = Some("NodePort".into());
                    spec.external_traffic_policy = Some("Local".into());
                    if let Some(p) = valid_health.choose(&mut self.rng) {
                        spec.health_check_node_port = Some(*p);
                    }
                }
            }
            inputs.services.push(Service {
                metadata: meta(Some(ns), Some(&format!("bad-pair-{k}")), BTreeMap::new()),
                spec: Some(spec),
                status,
            });
        }
    }

    /// Objects that may be rejected, never naming a valid Service nor using a valid VIP.
    fn hostile_world(&mut self, opts: &Options, valid: &Inputs) -> Inputs {
        let mut inputs = Inputs::default();
        self.hostile_pairs(valid, &mut inputs);
        let svc_names: Vec<String> = (0..5)
            .map(|i| format!("bad-{i}"))
            .chain(["ghost".into(), String::new()])
            .collect();
        let namespaces = [Some("v0"), Some("v1"), Some("default"), Some("x"), None];
        for _ in 0..self.rng.random_range(0..=6) {
            let ns = self.pick(&namespaces);
            let name = self.pick(&svc_names);
            let name = (!name.is_empty()).then_some(name);
            let labels = self.hostile_labels(&[]);
            let spec = self.maybe(0.95, |g| {
                let cluster_ips = g.maybe(0.6, |g| {
                    (0..g.rng.random_range(0..=3))
                        .map(|_| g.hostile_ip())
                        .collect()
                });
                ServiceSpec {
                    type_: g.pick(&[
                        None,
                        Some("ClusterIP".into()),
                        Some("ExternalName".into()),
                        Some("NodePort".into()),
                        Some("Bogus".into()),
                        Some(String::new()),
                    ]),
                    cluster_ip: g.maybe(0.6, Self::hostile_ip),
                    cluster_ips,
                    ip_families: g.maybe(0.5, |g| {
                        (0..g.rng.random_range(0..=3))
                            .map(|_| g.pick(&["IPv4", "IPv6", "IPv5", ""]).to_string())
                            .collect()
                    }),
                    ports: g.maybe(0.9, |g| {
                        (0..g.rng.random_range(0..=5))
                            .map(|k| ServicePort {
                                name: {
                                    let w = g.word();
                                    g.pick(&[
                                        None,
                                        Some(String::new()),
                                        Some("a".into()),
                                        Some(format!("p{k}")),
                                        Some(w),
                                    ])
                                },
                                port: g.hostile_port(),
                                protocol: g.protocol(true),
                                target_port: g.maybe(0.5, |g| IntOrString::Int(g.hostile_port())),
                                ..Default::default()
                            })
                            .collect()
                    }),
                    selector: g.maybe(0.5, |g| BTreeMap::from([(g.word(), g.word())])),
                    session_affinity: g.pick(&[
                        None,
                        Some("ClientIP".into()),
                        Some("Bogus".into()),
                    ]),
                    session_affinity_config: g.maybe(0.5, |g| SessionAffinityConfig {
                        client_ip: g.maybe(0.8, |g| ClientIPConfig {
                            timeout_seconds: g.pick(&[
                                None,
                                Some(-1),
                                Some(0),
                                Some(86_401),
                                Some(i32::MAX),
                                Some(i32::MIN),
                            ]),
                        }),
                    }),
                    internal_traffic_policy: g.pick(&[
                        None,
                        Some("Local".into()),
                        Some("bogus".into()),
                    ]),
                    external_ips: g.maybe(0.3, |g| {
                        (0..g.rng.random_range(0..=2))
                            .map(|_| g.hostile_ip())
                            .collect()
                    }),
                    external_traffic_policy: g.pick(&[
                        None,
                        Some("Local".into()),
                        Some("Cluster".into()),
                        Some("bogus".into()),
                    ]),
                    health_check_node_port: g.maybe(0.3, Self::hostile_node_port),
                    ..Default::default()
                }
            });
            let status = self.maybe(0.3, |g| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: g.maybe(0.9, |g| {
                        (0..g.rng.random_range(0..=2))
                            .map(|_| LoadBalancerIngress {
                                ip: g.maybe(0.8, Self::hostile_ip),
                                ip_mode: g.pick(&[None, Some("VIP".into()), Some("Bogus".into())]),
                                ..Default::default()
                            })
                            .collect()
                    }),
                }),
                ..Default::default()
            });
            let mut spec = spec;
            if let Some(ports) = spec.as_mut().and_then(|s| s.ports.as_mut()) {
                for p in ports {
                    p.node_port = self.maybe(0.4, Self::hostile_node_port);
                }
            }
            let algorithm = self.maybe(0.3, |g| {
                g.pick(&["maglev", "random", "Maglev", "", " maglev", "round-robin"])
                    .to_string()
            });
            inputs.services.push(Service {
                metadata: ObjectMeta {
                    annotations: algorithm
                        .map(|a| BTreeMap::from([(LB_ALGORITHM_ANNOTATION.into(), a)])),
                    ..meta(ns, name.as_deref(), labels)
                },
                spec,
                status,
            });
        }
        for i in 0..self.rng.random_range(0..=6) {
            let ns = self.pick(&namespaces);
            let name = self.maybe(0.95, |_| format!("bad-slice-{i}"));
            let mut labels = self.hostile_labels(&svc_names);
            if self.rng.random_bool(0.7) {
                let owner = self.pick(&svc_names);
                labels.insert(SERVICE_NAME_LABEL.to_string(), owner);
            }
            let n_eps = match self.rng.random_range(0..100) {
                0 => 5000,
                _ => self.rng.random_range(0..=8),
            };
            let endpoints = self.maybe(0.9, |g| {
                (0..n_eps)
                    .map(|_| SliceEndpoint {
                        addresses: (0..g.rng.random_range(0..=2))
                            .map(|_| match g.rng.random_range(0..4) {
                                0 => g.hostile_ip(),
                                1 => g.pod_ip(false).to_string(),
                                _ => g.pod_ip(true).to_string(),
                            })
                            .collect(),
                        conditions: g.conditions(),
                        node_name: g.node_name(),
                        hints: g.hints(),
                        ..Default::default()
                    })
                    .collect()
            });
            inputs.slices.push(EndpointSlice {
                metadata: meta(ns, name.as_deref(), labels),
                address_type: {
                    let w = self.word();
                    self.pick(&[
                        "IPv4".to_string(),
                        "IPv6".into(),
                        "FQDN".into(),
                        String::new(),
                        "ipv4".into(),
                        w,
                    ])
                },
                endpoints,
                ports: self.maybe(0.9, |g| {
                    (0..g.rng.random_range(0..=4))
                        .map(|k| EndpointPort {
                            name: g.pick(&[None, Some("a".into()), Some(format!("p{k}"))]),
                            port: g.maybe(0.9, Self::hostile_port),
                            protocol: g.protocol(true),
                            ..Default::default()
                        })
                        .collect()
                }),
            });
        }
        for _ in 0..self.rng.random_range(0..=3) {
            let ns = self.pick(&namespaces);
            let name = self.pick(&svc_names);
            let subsets = self.maybe(0.9, |g| {
                (0..g.rng.random_range(0..=2))
                    .map(|_| {
                        let addrs = |g: &mut Self| -> Vec<EndpointAddress> {
                            (0..g.rng.random_range(0..=3))
                                .map(|_| EndpointAddress {
                                    ip: if g.rng.random_bool(0.5) {
                                        g.hostile_ip()
                                    } else {
                                        g.pod_ip(true).to_string()
                                    },
                                    node_name: g.node_name(),
                                    ..Default::default()
                                })
                                .collect()
                        };
                        EndpointSubset {
                            addresses: g.maybe(0.9, addrs),
                            not_ready_addresses: g.maybe(0.5, addrs),
                            ports: g.maybe(0.9, |g| {
                                (0..g.rng.random_range(0..=3))
                                    .map(|k| CoreEndpointPort {
                                        name: g.pick(&[
                                            None,
                                            Some("a".into()),
                                            Some(format!("p{k}")),
                                        ]),
                                        port: g.hostile_port(),
                                        protocol: g.protocol(true),
                                        ..Default::default()
                                    })
                                    .collect()
                            }),
                        }
                    })
                    .collect()
            });
            inputs.endpoints.push(Endpoints {
                metadata: meta(
                    ns,
                    (!name.is_empty()).then_some(name.as_str()),
                    BTreeMap::new(),
                ),
                subsets,
            });
        }
        for _ in 0..self.rng.random_range(0..=2) {
            let name = self.pick(&["node2", "node3", ""]);
            if name == opts.node_name {
                continue;
            }
            let labels = self.hostile_labels(&[]);
            inputs.nodes.push(Node {
                metadata: meta(None, Some(name), labels),
                ..Default::default()
            });
        }
        inputs
    }
}

fn join(a: &Inputs, b: &Inputs) -> Inputs {
    Inputs {
        services: a.services.iter().chain(&b.services).cloned().collect(),
        slices: a.slices.iter().chain(&b.slices).cloned().collect(),
        endpoints: a.endpoints.iter().chain(&b.endpoints).cloned().collect(),
        nodes: a.nodes.iter().chain(&b.nodes).cloned().collect(),
    }
}

/// Runs `translate`, turning a panic into an error that names a file with the case's objects.
fn run(inputs: &Inputs, opts: &Options, what: &str) -> Result<Translation, String> {
    catch_unwind(AssertUnwindSafe(|| {
        proxy_agent::model::translate(inputs, opts)
    }))
    .map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "fuzz_translate-panic-{}-{:08x}.json",
            std::process::id(),
            rand::random::<u32>()
        ));
        let dump = serde_json::json!({
            "options": {"node_name": opts.node_name, "service_proxy_name": opts.service_proxy_name},
            "services": inputs.services,
            "slices": inputs.slices,
            "endpoints": inputs.endpoints,
            "nodes": inputs.nodes,
        });
        let _ = std::fs::write(&path, serde_json::to_string_pretty(&dump).unwrap());
        format!(
            "translate panicked on {what}: {msg}; objects in {}",
            path.display()
        )
    })
}

/// Whether `path` ("spec.ports[1].port") exists in `v`; only its last field may be absent.
fn field_exists(v: &serde_json::Value, path: &str) -> Result<(), String> {
    // Segments `name`, `name[index]` or `name[key]` (a map key, which may hold dots), joined by
    // dots.
    let mut parts = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let name = &rest[..end];
        rest = &rest[end..];
        let mut sub = None;
        if let Some(r) = rest.strip_prefix('[') {
            let close = r.find(']').ok_or_else(|| format!("{path:?}: no ]"))?;
            sub = Some(&r[..close]);
            rest = &r[close + 1..];
        }
        parts.push((name, sub));
        if let Some(r) = rest.strip_prefix('.') {
            rest = r;
        } else if !rest.is_empty() {
            return Err(format!("{path:?}: {rest:?} after a segment"));
        }
    }
    let mut cur = v;
    for (i, (name, sub)) in parts.iter().enumerate() {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!("{name:?} is not a field name"));
        }
        let last = i + 1 == parts.len();
        cur = match cur.get(name) {
            Some(x) => x,
            None if last && sub.is_none() => return Ok(()),
            None => return Err(format!("no field {name:?}")),
        };
        match sub.map(|s| (s, s.parse::<usize>())) {
            None => {}
            Some((_, Ok(idx))) => {
                cur = cur
                    .as_array()
                    .ok_or_else(|| format!("{name:?} is not a list"))?
                    .get(idx)
                    .ok_or_else(|| format!("{name:?} has no element {idx}"))?;
            }
            Some((key, Err(_))) => {
                cur = cur
                    .as_object()
                    .ok_or_else(|| format!("{name:?} is not a map"))?
                    .get(key)
                    .ok_or_else(|| format!("{name:?} has no key {key:?}"))?;
            }
        }
    }
    Ok(())
}

/// Every error names an object of `inputs` of the hostile world, and a field path. Paths that
/// do not exist in the object are returned (checked by their own test), with an example.
fn check_errors(
    errors: &[TranslateError],
    inputs: &Inputs,
    valid: &Inputs,
) -> Result<Vec<(String, String)>, String> {
    let mut inexact = Vec::new();
    // Every input object as JSON, by "Kind ns/name" (names may repeat).
    let mut objects: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for o in &inputs.services {
        objects
            .entry(format!("Service {}", key(&o.metadata)))
            .or_default()
            .push(serde_json::to_value(o).unwrap());
    }
    for o in &inputs.slices {
        objects
            .entry(format!("EndpointSlice {}", key(&o.metadata)))
            .or_default()
            .push(serde_json::to_value(o).unwrap());
    }
    for o in &inputs.endpoints {
        objects
            .entry(format!("Endpoints {}", key(&o.metadata)))
            .or_default()
            .push(serde_json::to_value(o).unwrap());
    }
    let valid_objects: BTreeSet<String> = valid
        .services
        .iter()
        .map(|s| format!("Service {}", key(&s.metadata)))
        .chain(
            valid
                .slices
                .iter()
                .map(|s| format!("EndpointSlice {}", key(&s.metadata))),
        )
        .chain(
            valid
                .endpoints
                .iter()
                .map(|s| format!("Endpoints {}", key(&s.metadata))),
        )
        .collect();
    for e in errors {
        let (kind, id) = e
            .object
            .split_once(' ')
            .ok_or_else(|| format!("{e}: object {:?} is not \"Kind ns/name\"", e.object))?;
        if !id.contains('/') {
            return Err(format!("{e}: object {:?} has no namespace", e.object));
        }
        if !["Service", "EndpointSlice", "Endpoints"].contains(&kind) {
            return Err(format!("{e}: unknown kind {kind:?}"));
        }
        let found = objects.get(&e.object).map(Vec::as_slice).unwrap_or(&[]);
        if found.is_empty() {
            return Err(format!("{e}: names no object of the input"));
        }
        if valid_objects.contains(&e.object) {
            return Err(format!("{e}: an error about a valid object"));
        }
        if e.field.is_empty() {
            return Err(format!("{e}: no field path"));
        }
        // Objects may share a name; the path must exist in one of them.
        let problems: Vec<String> = found
            .iter()
            .filter_map(|v| field_exists(v, &e.field).err())
            .collect();
        if problems.len() == found.len() {
            inexact.push((e.field.clone(), format!("{e} ({})", problems[0])));
        }
    }
    Ok(inexact)
}

fn frontends_of<'a>(
    t: &'a Translation,
    service: &str,
) -> BTreeMap<&'a Frontend, &'a DesiredService> {
    t.state
        .services
        .iter()
        .filter(|(_, ds)| ds.service == service)
        .collect()
}

/// Shape of the programmed state, whatever the input.
fn check_state(t: &Translation) -> Result<(), String> {
    for (fe, ds) in &t.state.services {
        if fe.port == 0 {
            return Err(format!("{fe} ({}): port 0", ds.name));
        }
        if !ds.endpoints.windows(2).all(|w| w[0] < w[1]) {
            return Err(format!("{fe}: endpoints not sorted and unique"));
        }
        if ds.endpoints.iter().any(|e| e.port == 0) {
            return Err(format!("{fe}: an endpoint with port 0"));
        }
        if ds
            .endpoints
            .iter()
            .any(|e| e.addr.is_ipv4() != fe.addr.is_ipv4())
        {
            return Err(format!("{fe}: an endpoint of the other family"));
        }
        if !ds.name.starts_with(&ds.service) {
            return Err(format!("{fe}: name {:?} vs {:?}", ds.name, ds.service));
        }
    }
    Ok(())
}

/// Broken properties that have their own test (so that the others keep being checked).
#[derive(Default)]
struct Findings {
    /// (field path, example error): paths that do not exist in their objects.
    inexact: Vec<(String, String)>,
    /// Valid Services whose health check port a hostile Service took, and hostile Services
    /// asking for a valid one's without being rejected.
    health: Vec<String>,
}

/// One case: generate, translate, check every property; returns the findings of the
/// properties that have their own test.
fn check_case(
    g: &mut Gen,
    tried: &mut Tried,
    stats: &mut BTreeMap<String, u64>,
) -> Result<Findings, String> {
    let opts = Options {
        node_name: g.pick(&NODES[..2]).to_string(),
        service_proxy_name: g.maybe(0.3, |_| OUR_PROXY.to_string()),
        node_addresses: g.pick(&[
            vec![],
            vec![IpAddr::V4(NODE_V4)],
            vec![IpAddr::V4(NODE_V4), IpAddr::V6(NODE_V6)],
        ]),
        external_lb_algorithm: g.pick(&[LbAlgorithm::Random, LbAlgorithm::Maglev]),
    };
    let (valid, names) = g.valid_world(&opts);
    let hostile = g.hostile_world(&opts, &valid);
    let all = join(&valid, &hostile);
    tried.add(&all);

    let alone = run(&valid, &opts, "the valid objects")?;
    if let Some(e) = alone.errors.first() {
        return Err(format!("valid objects rejected: {e}"));
    }
    let mixed = run(&all, &opts, "valid + hostile objects")?;
    // Also the hostile world alone, in the other order of kinds' lists.
    let mut reversed = hostile.clone();
    reversed.services.reverse();
    reversed.slices.reverse();
    run(&reversed, &opts, "the hostile objects")?;

    // Each valid frontend's algorithm: its Service's annotation, else random for cluster IPs
    // and the flag for the others.
    let annotated: BTreeMap<String, Option<&String>> = valid
        .services
        .iter()
        .map(|s| {
            let a = s.metadata.annotations.as_ref();
            (
                key(&s.metadata),
                a.and_then(|a| a.get(LB_ALGORITHM_ANNOTATION)),
            )
        })
        .collect();
    for (fe, ds) in &alone.state.services {
        let want = match annotated.get(&ds.service).copied().flatten() {
            Some(a) => LbAlgorithm::parse(a).ok_or("a valid Service has a bad annotation")?,
            None if ds.kind == ServiceKind::ClusterIp => LbAlgorithm::Random,
            None => opts.external_lb_algorithm,
        };
        if ds.algorithm != want {
            return Err(format!(
                "{fe} of {} ({:?}) uses {}, want {want}",
                ds.service, ds.kind, ds.algorithm
            ));
        }
    }
    let mut found = Findings::default();
    for t in [&alone, &mixed] {
        check_state(t)?;
        found.inexact.extend(check_errors(&t.errors, &all, &valid)?);
    }
    for name in &names {
        let (a, m) = (frontends_of(&alone, name), frontends_of(&mixed, name));
        if a != m {
            return Err(format!(
                "Service {name} is programmed differently next to hostile objects:\nalone: {a:#?}\nwith them: {m:#?}\nerrors: {:#?}",
                mixed.errors
            ));
        }
        let health = |t: &Translation| -> Vec<(u16, String)> {
            t.health_checks
                .iter()
                .filter(|(_, h)| format!("{}/{}", h.namespace, h.name) == *name)
                .map(|(p, h)| (*p, format!("{h:?}")))
                .collect()
        };
        if health(&alone) != health(&mixed) {
            let taker: Vec<String> = health(&alone)
                .iter()
                .filter_map(|(p, _)| mixed.health_checks.get(p))
                .map(|h| format!("{}/{}", h.namespace, h.name))
                .collect();
            found.health.push(format!(
                "Service {name}: alone {:?}; with hostile objects {:?}, the port served for {taker:?} (errors: {:?})",
                health(&alone),
                health(&mixed),
                mixed
                    .errors
                    .iter()
                    .filter(|e| e.field.contains("healthCheckNodePort"))
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
            ));
        }
        *stats.entry("valid Services compared".into()).or_default() += 1;
        *stats.entry("valid frontends compared".into()).or_default() += a.len() as u64;
    }
    // A hostile Service asking for a valid Service's healthCheckNodePort is rejected, naming it
    // (unless it is not ours at all).
    for s in &hostile.services {
        let Some(port) = s
            .spec
            .as_ref()
            .and_then(|sp| sp.health_check_node_port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        let Some(owner) = alone.health_checks.get(&port) else {
            continue;
        };
        let k = key(&s.metadata);
        let object = format!("Service {k}");
        if !mixed.skipped.contains(&k) && !mixed.errors.iter().any(|e| e.object == object) {
            found.health.push(format!(
                "{object} asks for port {port}, the healthCheckNodePort of {}/{}, and is neither rejected nor skipped",
                owner.namespace, owner.name
            ));
        }
        *stats
            .entry("hostile Services asking for a valid healthCheckNodePort".into())
            .or_default() += 1;
    }
    *stats.entry("errors checked".into()).or_default() += mixed.errors.len() as u64;
    for e in &mixed.errors {
        let kind = e.object.split(' ').next().unwrap_or("");
        *stats
            .entry(format!("error: {kind} {}", shape(&e.field)))
            .or_default() += 1;
    }
    Ok(found)
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// Field path with indices replaced by N, to group errors.
fn shape(field: &str) -> String {
    let mut out = String::new();
    let mut digits = false;
    for c in field.chars() {
        if c.is_ascii_digit() {
            if !digits {
                out.push('N');
            }
            digits = true;
        } else {
            digits = false;
            out.push(c);
        }
    }
    out
}

struct Run {
    seed: u64,
    cases: u64,
    /// Field paths (shape) that do not exist in their object, with an example.
    inexact: BTreeMap<String, String>,
    /// Health check ports taken from valid Services.
    health: Vec<String>,
}

/// Runs every case; panics on the first broken property (field paths aside).
fn run_cases(label: &str) -> Run {
    let cases = env_u64("FUZZ_CASES").unwrap_or(300);
    let seed = env_u64("FUZZ_SEED").unwrap_or_else(rand::random);
    println!("{label}: FUZZ_SEED={seed} FUZZ_CASES={cases}");
    let started = Instant::now();
    let mut tried = Tried::default();
    let mut stats = BTreeMap::new();
    let mut inexact = BTreeMap::new();
    let mut health = Vec::new();
    for case in 0..cases {
        // One generator per case, so a failing case reproduces alone.
        let case_seed = seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut g = Gen {
            rng: StdRng::seed_from_u64(case_seed),
            next_vip: 0,
            next_node_port: *VALID_NODE_PORTS.start() - 1,
        };
        match check_case(&mut g, &mut tried, &mut stats) {
            Ok(found) => {
                for (field, example) in found.inexact {
                    inexact.entry(shape(&field)).or_insert(example);
                }
                health.extend(
                    found
                        .health
                        .into_iter()
                        .map(|h| format!("case seed {case_seed}: {h}")),
                );
            }
            Err(e) => panic!("case {case} (FUZZ_SEED={seed}, case seed {case_seed}): {e}"),
        }
    }
    println!(
        "{label}: {cases} cases in {:.1} s, seed {seed}; objects tried: {} Services ({} ports), {} EndpointSlices, {} Endpoints, {} Nodes, {} endpoint addresses",
        started.elapsed().as_secs_f64(),
        tried.services,
        tried.ports,
        tried.slices,
        tried.endpoints_objects,
        tried.nodes,
        tried.endpoint_addresses
    );
    for (k, n) in &stats {
        println!("  {n:>9}  {k}");
    }
    Run {
        seed,
        cases,
        inexact,
        health,
    }
}

/// Never panics; valid objects are not rejected; hostile objects never change a valid
/// Service's frontends or backends; errors name a hostile input object and a field; the
/// programmed state is well-formed.
#[test]
fn translate_survives_hostile_objects() {
    run_cases("fuzz_translate");
}

/// Every error's field path exists in the object it names (only its last field may be absent):
/// `spec.ports[1].port`, not `spec.clusterIP[0]` (a string) or `spec.ports[].nodePort` (which
/// port?).
#[test]
fn error_field_paths_exist_in_their_objects() {
    let run = run_cases("fuzz_translate field paths");
    let list: Vec<String> = run
        .inexact
        .iter()
        .map(|(shape, example)| format!("  {shape}: e.g. {example}"))
        .collect();
    assert!(
        list.is_empty(),
        "error field paths that are not in their objects (FUZZ_SEED={} FUZZ_CASES={}):\n{}",
        run.seed,
        run.cases,
        list.join("\n")
    );
}

/// A Service's healthCheckNodePort stays its own next to hostile objects: another Service
/// asking for the same port (possible with hand-written manifests) must not take it over, and is
/// told so.
#[test]
fn health_check_ports_stay_with_their_service() {
    let run = run_cases("fuzz_translate health checks");
    assert!(
        run.health.is_empty(),
        "{} valid Services lost their healthCheckNodePort to a hostile Service (FUZZ_SEED={} FUZZ_CASES={}), e.g.:\n{}",
        run.health.len(),
        run.seed,
        run.cases,
        run.health[..run.health.len().min(3)].join("\n")
    );
}

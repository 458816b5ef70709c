//! Kubernetes Services + EndpointSlices (+ Endpoints) -> desired frontends and backends,
//! following kube-proxy's rules (pkg/proxy: servicechangetracker, endpointslicecache, topology).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use proxy_common::ServiceKind;

use super::desired::{
    DesiredService, DesiredState, Endpoint, EndpointState, Frontend, LbAlgorithm, Protocol, Scope,
};

/// Label that hands a Service to another proxy (kube-proxy skips Services carrying it).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label that keeps a Service away from every proxy, whatever its value (pkg/proxy/apis:
/// LabelServiceHeadless; kube-proxy watches Services with
/// `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`,
/// cmd/kube-proxy/app/server.go).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Annotation choosing how a Service's frontends choose backends: `random` or `maglev`
/// (Maglev consistent hashing). Without it, cluster IPs use random and the external frontends
/// (NodePorts, load-balancer IPs, externalIPs) `--external-lb-algorithm`.
pub const LB_ALGORITHM_ANNOTATION: &str = "proxy-agent.io/lb-algorithm";
/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kube-proxy's default sessionAffinity ClientIP timeout (v1.DefaultClientIPServiceAffinitySeconds).
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// Label carrying a Node's zone (used for topology hints).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub endpoints: Vec<Endpoints>,
    pub nodes: Vec<Node>,
}

/// Who is asking: the node the agent runs on and the proxy name it answers to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub node_name: String,
    /// `--service-proxy-name`: Services labelled with this name are ours; others labelled are not.
    pub service_proxy_name: Option<String>,
    /// This node's addresses that serve NodePorts (`--nodeport-addresses`).
    pub node_addresses: Vec<IpAddr>,
    /// `--external-lb-algorithm`: for NodePort, load-balancer and externalIP frontends of
    /// Services without the `LB_ALGORITHM_ANNOTATION`.
    pub external_lb_algorithm: LbAlgorithm,
}

/// Options plus what is known about this node.
struct NodeContext<'a> {
    name: &'a str,
    zone: Option<String>,
}

/// A rejected object (or part of one), naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateError {
    /// e.g. "Service default/web".
    pub object: String,
    /// e.g. "spec.ports[1].port".
    pub field: String,
    pub message: String,
}

impl fmt::Display for TranslateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

impl std::error::Error for TranslateError {}

#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub errors: Vec<TranslateError>,
    /// Services deliberately not handled (headless, ExternalName, other proxy), for logs.
    pub skipped: Vec<String>,
    /// healthCheckNodePort servers this node runs: port -> the Service and its local endpoints.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// One healthCheckNodePort (externalTrafficPolicy Local): load balancers ask each node whether
/// it has local endpoints for the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One endpoint address with its port table, before matching against a Service port.
struct SliceEndpoint {
    addr: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<String>,
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
}

/// A slice's port table: (port name, protocol, port number).
type PortTable = Vec<(String, Protocol, u16)>;

/// Endpoints of one Service, merged over all its slices; each slice carries its own port table.
#[derive(Default)]
struct ServiceEndpoints {
    groups: Vec<(PortTable, Vec<SliceEndpoint>)>,
}

fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err("protocol SCTP is not supported by this datapath yet".into()),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// Turns the cluster's objects into the desired datapath state. Invalid objects are rejected one
/// by one; everything else is still translated.
pub fn translate(inputs: &Inputs, opts: &Options) -> Translation {
    let mut out = Translation::default();
    let by_service = collect_endpoints(inputs, &mut out.errors);
    let node = NodeContext {
        name: &opts.node_name,
        zone: inputs
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(opts.node_name.as_str()))
            .and_then(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()),
    };

    // Claims (frontends, nodePorts, healthCheckNodePorts) are settled oldest Service first, as
    // the apiserver's allocator gave a port to the Service created first
    // (pkg/registry/core/service/portallocator); creation time ties, and Services without one
    // (hand-written manifests), go by namespace/name. Without a creation time a Service counts
    // as the newest.
    let mut services: Vec<&Service> = inputs.services.iter().collect();
    services.sort_by_key(|s| {
        let created = s.metadata.creation_timestamp.as_ref();
        (created.is_none(), created, ns_name(&s.metadata))
    });
    // nodePorts of the Services accepted so far -> "ns/name", whatever this node's addresses
    // (a Service is accepted or rejected the same way on every node).
    let mut node_ports: BTreeMap<(u16, Protocol), String> = BTreeMap::new();
    for svc in services {
        let (ns, name) = ns_name(&svc.metadata);
        match translate_service(
            svc,
            by_service.get(&(ns.clone(), name.clone())),
            opts,
            &node,
        ) {
            Ok(None) => out.skipped.push(format!("{ns}/{name}")),
            Ok(Some(Translated {
                frontends,
                health,
                node_ports: claimed,
            })) => {
                // A node port taken by an earlier Service, as its nodePort (same protocol) or
                // healthCheckNodePort: checked on every node alike, whatever its addresses.
                if let Some((field, message)) =
                    node_port_conflict(health.as_ref(), &claimed, &node_ports, &out.health_checks)
                {
                    out.errors.push(TranslateError {
                        object: format!("Service {ns}/{name}"),
                        field,
                        message,
                    });
                    continue;
                }
                // A frontend already owned by another Service: reject this one whole, so no
                // Service is ever half-programmed (the earlier one keeps it).
                if let Some((fe, _)) = frontends
                    .iter()
                    .find(|(fe, _)| out.state.services.contains_key(fe))
                {
                    let kind = frontends.iter().find(|(f, _)| f == fe).map(|(_, d)| d.kind);
                    let spec = svc.spec.as_ref();
                    let port_index = |pred: &dyn Fn(&ServicePort) -> bool| {
                        spec.and_then(|sp| sp.ports.as_ref())
                            .and_then(|ps| ps.iter().position(pred))
                            .unwrap_or(0)
                    };
                    let field = match kind {
                        Some(ServiceKind::NodePort) => format!(
                            "spec.ports[{}].nodePort",
                            port_index(&|p| p.node_port == Some(fe.port as i32))
                        ),
                        Some(ServiceKind::LoadBalancer) => "status.loadBalancer.ingress".into(),
                        Some(ServiceKind::ExternalIp) => "spec.externalIPs".into(),
                        _ => "spec.clusterIPs".into(),
                    };
                    out.errors.push(TranslateError {
                        object: format!("Service {ns}/{name}"),
                        field,
                        message: format!(
                            "frontend {fe} is already used by {}",
                            out.state.services[fe].name
                        ),
                    });
                    continue;
                }
                for (_, np, proto) in claimed {
                    node_ports
                        .entry((np, proto))
                        .or_insert_with(|| format!("{ns}/{name}"));
                }
                out.state.services.extend(frontends);
                if let Some((port, hc)) = health {
                    out.health_checks.insert(port, hc);
                }
            }
            Err(e) => out.errors.push(e),
        }
    }
    out
}

/// A node port of this Service that an earlier Service already holds: (field, message).
///
/// The apiserver allocates healthCheckNodePorts from the same service-node-port-range allocator
/// as nodePorts (pkg/registry/core/service/storage/alloc.go, allocHealthCheckNodePort), so in a
/// cluster no two Services share one, and none is another Service's nodePort; hand-written
/// manifests can still ask for it. Without this check the later Service would silently take the
/// port's health check server over. A nodePort is another Service's nodePort only with the same
/// protocol: kube-proxy programs TCP and UDP on one nodePort as separate rules
/// (pkg/proxy/nftables proxier.go, one nodePort element per protocol), so they do not collide.
fn node_port_conflict(
    health: Option<&(u16, HealthCheck)>,
    node_ports: &[(usize, u16, Protocol)],
    taken_node_ports: &BTreeMap<(u16, Protocol), String>,
    taken_health: &BTreeMap<u16, HealthCheck>,
) -> Option<(String, String)> {
    if let Some((port, _)) = health {
        if let Some(h) = taken_health.get(port) {
            return Some((
                "spec.healthCheckNodePort".into(),
                format!(
                    "port {port} is already the healthCheckNodePort of Service {}/{}",
                    h.namespace, h.name
                ),
            ));
        }
        if let Some(owner) = [Protocol::Tcp, Protocol::Udp]
            .iter()
            .find_map(|p| taken_node_ports.get(&(*port, *p)))
        {
            return Some((
                "spec.healthCheckNodePort".into(),
                format!("port {port} is already a nodePort of Service {owner}"),
            ));
        }
    }
    if let Some((i, np, proto, owner)) = node_ports
        .iter()
        .find_map(|(i, np, proto)| Some((i, np, proto, taken_node_ports.get(&(*np, *proto))?)))
    {
        return Some((
            format!("spec.ports[{i}].nodePort"),
            format!(
                "port {np}/{} is already a nodePort of Service {owner}",
                proto.as_str()
            ),
        ));
    }
    node_ports.iter().find_map(|(i, np, _)| {
        let h = taken_health.get(np)?;
        Some((
            format!("spec.ports[{i}].nodePort"),
            format!(
                "port {np} is already the healthCheckNodePort of Service {}/{}",
                h.namespace, h.name
            ),
        ))
    })
}

fn collect_endpoints(
    inputs: &Inputs,
    errors: &mut Vec<TranslateError>,
) -> BTreeMap<(String, String), ServiceEndpoints> {
    let mut by_service: BTreeMap<(String, String), ServiceEndpoints> = BTreeMap::new();
    let mut has_slices = BTreeSet::new();

    for slice in &inputs.slices {
        let (ns, name) = ns_name(&slice.metadata);
        let object = format!("EndpointSlice {ns}/{name}");
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue; // Not owned by a Service: kube-proxy ignores it too.
        };
        // FQDN slices carry names, not addresses; kube-proxy ignores them.
        let family_v4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            _ => continue,
        };
        let mut ports = Vec::new();
        let mut bad = false;
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let proto = match parse_protocol(p.protocol.as_deref()) {
                Ok(pr) => pr,
                Err(m) => {
                    errors.push(TranslateError {
                        object: object.clone(),
                        field: format!("ports[{i}].protocol"),
                        message: m,
                    });
                    continue;
                }
            };
            match p.port.and_then(valid_port) {
                Some(port) => ports.push((p.name.clone().unwrap_or_default(), proto, port)),
                None => {
                    errors.push(TranslateError {
                        object: object.clone(),
                        field: format!("ports[{i}].port"),
                        message: format!("{:?} is not a port in 1-65535", p.port),
                    });
                    bad = true;
                }
            }
        }
        if bad {
            continue;
        }
        let mut eps = Vec::new();
        for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
            let c = ep.conditions.as_ref();
            // Per the EndpointSlice API, a nil ready/serving means true, nil terminating false.
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            // kube-proxy uses only the first address of an endpoint (the rest are reserved).
            let Some(a) = ep.addresses.first() else {
                continue;
            };
            match a.parse::<IpAddr>() {
                Ok(addr) if addr.is_ipv4() == family_v4 => eps.push(SliceEndpoint {
                    addr,
                    ready,
                    serving,
                    terminating,
                    node_name: ep.node_name.clone(),
                    zone_hints: ep
                        .hints
                        .iter()
                        .flat_map(|h| h.for_zones.iter().flatten())
                        .map(|z| z.name.clone())
                        .collect(),
                    node_hints: ep
                        .hints
                        .iter()
                        .flat_map(|h| h.for_nodes.iter().flatten())
                        .map(|n| n.name.clone())
                        .collect(),
                }),
                _ => errors.push(TranslateError {
                    object: object.clone(),
                    field: format!("endpoints[{i}].addresses[0]"),
                    message: format!("{a:?} is not an {} address", slice.address_type),
                }),
            }
        }
        has_slices.insert((ns.clone(), svc.clone()));
        by_service
            .entry((ns, svc.clone()))
            .or_default()
            .groups
            .push((ports, eps));
    }

    // Selectorless Services with a hand-written Endpoints object: the EndpointSlice mirroring
    // controller turns these into slices; do the same when no slice exists for the Service.
    let selectorless: BTreeSet<(String, String)> = inputs
        .services
        .iter()
        .filter(|s| {
            s.spec
                .as_ref()
                .is_none_or(|sp| sp.selector.as_ref().is_none_or(|m| m.is_empty()))
        })
        .map(|s| ns_name(&s.metadata))
        .collect();
    for e in &inputs.endpoints {
        let key = ns_name(&e.metadata);
        if !selectorless.contains(&key) || has_slices.contains(&key) {
            continue;
        }
        let object = format!("Endpoints {}/{}", key.0, key.1);
        for (si, subset) in e.subsets.iter().flatten().enumerate() {
            let mut ports = Vec::new();
            for (i, p) in subset.ports.iter().flatten().enumerate() {
                match (parse_protocol(p.protocol.as_deref()), valid_port(p.port)) {
                    (Ok(proto), Some(port)) => {
                        ports.push((p.name.clone().unwrap_or_default(), proto, port))
                    }
                    (Err(m), _) => errors.push(TranslateError {
                        object: object.clone(),
                        field: format!("subsets[{si}].ports[{i}].protocol"),
                        message: m,
                    }),
                    (_, None) => errors.push(TranslateError {
                        object: object.clone(),
                        field: format!("subsets[{si}].ports[{i}].port"),
                        message: format!("{} is not a port in 1-65535", p.port),
                    }),
                }
            }
            let mut eps = Vec::new();
            let lists = [
                (true, "addresses", subset.addresses.iter().flatten()),
                (
                    false,
                    "notReadyAddresses",
                    subset.not_ready_addresses.iter().flatten(),
                ),
            ];
            for (ready, field, list) in lists {
                for (i, a) in list.enumerate() {
                    match a.ip.parse::<IpAddr>() {
                        Ok(addr) => eps.push(SliceEndpoint {
                            addr,
                            ready,
                            serving: ready,
                            terminating: false,
                            node_name: a.node_name.clone(),
                            zone_hints: vec![],
                            node_hints: vec![],
                        }),
                        Err(_) => errors.push(TranslateError {
                            object: object.clone(),
                            field: format!("subsets[{si}].{field}[{i}].ip"),
                            message: format!("{:?} is not an IP address", a.ip),
                        }),
                    }
                }
            }
            by_service
                .entry(key.clone())
                .or_default()
                .groups
                .push((ports, eps));
        }
    }
    by_service
}

/// One Service, translated.
struct Translated {
    frontends: Vec<(Frontend, DesiredService)>,
    /// Its healthCheckNodePort, when this node serves one for it.
    health: Option<(u16, HealthCheck)>,
    /// (index in spec.ports, nodePort, protocol): held on every node, whatever its addresses.
    node_ports: Vec<(usize, u16, Protocol)>,
}

/// `Ok(None)`: a Service this proxy does not handle. `Err`: rejected whole.
fn translate_service(
    svc: &Service,
    endpoints: Option<&ServiceEndpoints>,
    opts: &Options,
    node: &NodeContext,
) -> Result<Option<Translated>, TranslateError> {
    let (ns, name) = ns_name(&svc.metadata);
    let err = |field: String, message: String| TranslateError {
        object: format!("Service {ns}/{name}"),
        field,
        message,
    };
    if name.is_empty() {
        return Err(err("metadata.name".into(), "a Service needs a name".into()));
    }
    // kube-proxy watches Services with `!service.kubernetes.io/service-proxy-name`; a proxy
    // started with --service-proxy-name takes exactly the Services labelled with its name.
    let labels = svc.metadata.labels.as_ref();
    let proxy_label = labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL));
    if proxy_label != opts.service_proxy_name.as_ref()
        || labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL))
    {
        return Ok(None);
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    // clusterIPs is authoritative when set; clusterIP mirrors its first entry.
    let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => vec![],
    };
    if ips.is_empty() || ips.iter().any(|ip| ip == "None" || ip.is_empty()) {
        return Ok(None); // headless or not yet allocated
    }
    let field = if spec.cluster_ips.as_ref().is_some_and(|v| !v.is_empty()) {
        "spec.clusterIPs"
    } else {
        "spec.clusterIP"
    };
    let mut vips = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(a) => vips.push(a),
            Err(_) => {
                return Err(err(
                    // clusterIP is one string; clusterIPs a list.
                    if field == "spec.clusterIP" {
                        field.to_string()
                    } else {
                        format!("{field}[{i}]")
                    },
                    format!("{ip:?} is not an IP address"),
                ));
            }
        }
    }

    // An invalid value rejects the Service, like any other invalid field: programming it with
    // another algorithm than the one asked for would go unnoticed.
    let algorithm = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
    {
        None => None,
        Some(v) => Some(LbAlgorithm::parse(v).ok_or_else(|| {
            err(
                format!("metadata.annotations[{LB_ALGORITHM_ANNOTATION}]"),
                format!("{v:?} is not an algorithm: random or maglev"),
            )
        })?),
    };

    let affinity_timeout_s = if spec.session_affinity.as_deref() == Some("ClientIP") {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(|t| t.clamp(1, 86_400) as u32)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    } else {
        0
    };

    let ports: &[ServicePort] = spec.ports.as_deref().unwrap_or(&[]);
    let mut seen_names = BTreeSet::new();
    let mut checked = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let pname = p.name.clone().unwrap_or_default();
        if !seen_names.insert(pname.clone()) {
            return Err(err(
                format!("spec.ports[{i}].name"),
                format!("duplicate port name {pname:?}"),
            ));
        }
        if ports.len() > 1 && pname.is_empty() {
            return Err(err(
                format!("spec.ports[{i}].name"),
                "ports of a multi-port Service must be named".into(),
            ));
        }
        let port = valid_port(p.port).ok_or_else(|| {
            err(
                format!("spec.ports[{i}].port"),
                format!("{} is not a port in 1-65535", p.port),
            )
        })?;
        let proto = parse_protocol(p.protocol.as_deref())
            .map_err(|m| err(format!("spec.ports[{i}].protocol"), m))?;
        checked.push((pname, port, proto));
    }

    // External addresses: NodePorts on this node's addresses, load-balancer ingress IPs
    // (except ipMode Proxy: those must reach the load balancer, not be short-circuited), and
    // externalIPs. Validated up front so a Service is never half-programmed.
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let mut external: Vec<(IpAddr, ServiceKind)> = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        let a = ip.parse::<IpAddr>().map_err(|_| {
            err(
                format!("spec.externalIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            )
        })?;
        external.push((a, ServiceKind::ExternalIp));
    }
    if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(ip) = &ing.ip else { continue };
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let a = ip.parse::<IpAddr>().map_err(|_| {
                err(
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{ip:?} is not an IP address"),
                )
            })?;
            external.push((a, ServiceKind::LoadBalancer));
        }
    }
    let node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let mut source_ranges = Vec::new();
    for (i, c) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        let bad = || {
            err(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{c:?} is not a CIDR"),
            )
        };
        let (a, p) = c.trim().split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > if addr.is_ipv4() { 32 } else { 128 } {
            return Err(bad());
        }
        source_ranges.push((addr, prefix));
    }
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");

    let mut out = Vec::new();
    let mut claimed = Vec::new();
    let mut local_endpoints = BTreeSet::new();
    for (i, (pname, port, proto)) in checked.into_iter().enumerate() {
        let display = if pname.is_empty() {
            format!("{ns}/{name}")
        } else {
            format!("{ns}/{name}:{pname}")
        };
        let node_port = match ports[i].node_port {
            Some(np) if node_ports => Some(valid_port(np).ok_or_else(|| {
                err(
                    format!("spec.ports[{i}].nodePort"),
                    format!("{np} is not a port in 1-65535"),
                )
            })?),
            _ => None,
        };
        claimed.extend(node_port.map(|np| (i, np, proto)));
        let mut frontends: Vec<(IpAddr, u16, ServiceKind)> = vips
            .iter()
            .map(|v| (*v, port, ServiceKind::ClusterIp))
            .collect();
        frontends.extend(external.iter().map(|(a, k)| (*a, port, *k)));
        if let Some(np) = node_port {
            frontends.extend(
                opts.node_addresses
                    .iter()
                    .map(|a| (*a, np, ServiceKind::NodePort)),
            );
        }
        for (addr, fport, kind) in frontends {
            let eps = endpoints_for(endpoints, &pname, proto, addr.is_ipv4());
            let cat = categorize(&eps, node);
            local_endpoints.extend(
                cat.local
                    .iter()
                    .filter(|e| e.state == EndpointState::Active)
                    .map(|e| e.addr),
            );
            // kube-proxy: no endpoints at all rejects; endpoints only on other nodes under a
            // Local policy drops ("has no local endpoints").
            let reachable = !cat.cluster.is_empty() || !cat.local.is_empty();
            let entry = |scope, endpoints, local_policy: bool| {
                (
                    Frontend {
                        addr,
                        port: fport,
                        protocol: proto,
                        scope,
                    },
                    DesiredService {
                        service: format!("{ns}/{name}"),
                        name: display.clone(),
                        kind,
                        endpoints,
                        drop_without_endpoints: local_policy && reachable,
                        affinity_timeout_s,
                        // kube-proxy applies them to the load balancer's addresses only.
                        source_ranges: if kind == ServiceKind::LoadBalancer {
                            source_ranges
                                .iter()
                                .filter(|(a, _)| a.is_ipv4() == addr.is_ipv4())
                                .copied()
                                .collect()
                        } else {
                            Vec::new()
                        },
                        algorithm: algorithm.unwrap_or(if kind == ServiceKind::ClusterIp {
                            LbAlgorithm::Random
                        } else {
                            opts.external_lb_algorithm
                        }),
                    },
                )
            };
            if kind == ServiceKind::ClusterIp {
                // internalTrafficPolicy Local: cluster-IP traffic only to this node's endpoints
                // (none: dropped, as kube-proxy does).
                let local = spec.internal_traffic_policy.as_deref() == Some("Local");
                out.push(entry(
                    Scope::Internal,
                    if local { cat.local } else { cat.cluster },
                    local,
                ));
            } else if etp_local {
                // externalTrafficPolicy Local: traffic from outside only to this node's
                // endpoints, client address kept; pods and host processes still reach every
                // endpoint (kube-proxy's short-circuit).
                out.push(entry(Scope::External, cat.local, true));
                out.push(entry(Scope::Internal, cat.cluster, false));
            } else {
                out.push(entry(Scope::Internal, cat.cluster, false));
            }
        }
    }
    let health = match spec.health_check_node_port {
        Some(p) if etp_local && node_ports => Some((
            valid_port(p).ok_or_else(|| {
                err(
                    "spec.healthCheckNodePort".into(),
                    format!("{p} is not a port in 1-65535"),
                )
            })?,
            HealthCheck {
                namespace: ns.clone(),
                name: name.clone(),
                local_endpoints: local_endpoints.len(),
            },
        )),
        _ => None,
    };
    // The apiserver allocates both from one range, so they never coincide.
    if let Some((hp, _)) = &health
        && let Some((i, ..)) = claimed.iter().find(|(_, np, _)| np == hp)
    {
        return Err(err(
            "spec.healthCheckNodePort".into(),
            format!("port {hp} is also this Service's spec.ports[{i}].nodePort"),
        ));
    }
    Ok(Some(Translated {
        frontends: out,
        health,
        node_ports: claimed,
    }))
}

/// An endpoint of one Service port, with what topology and traffic policies need.
#[derive(Clone)]
struct PortEndpoint<'a> {
    addr: IpAddr,
    port: u16,
    ep: &'a SliceEndpoint,
}

/// Endpoints for one Service port: slice ports match Service ports by name and protocol (the
/// EndpointSlice controller already resolved targetPort, by number or by name, per Pod).
/// Deduplicated by address and port; the first slice's conditions win, as in kube-proxy's
/// endpointslicecache.
fn endpoints_for<'a>(
    endpoints: Option<&'a ServiceEndpoints>,
    pname: &str,
    proto: Protocol,
    v4: bool,
) -> Vec<PortEndpoint<'a>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (ports, eps) in endpoints.map(|e| e.groups.as_slice()).unwrap_or(&[]) {
        let Some(&(_, _, port)) = ports.iter().find(|(n, p, _)| n == pname && *p == proto) else {
            continue;
        };
        for ep in eps.iter().filter(|e| e.addr.is_ipv4() == v4) {
            if seen.insert((ep.addr, port)) {
                out.push(PortEndpoint {
                    addr: ep.addr,
                    port,
                    ep,
                });
            }
        }
    }
    out.sort_by_key(|e| (e.addr, e.port));
    out
}

/// The endpoint sets kube-proxy derives for one Service port (pkg/proxy/topology.go,
/// CategorizeEndpoints).
#[derive(Debug, Default, PartialEq, Eq)]
struct Categorized {
    /// For cluster-wide policies: ready endpoints allowed by topology hints, or else the
    /// serving+terminating ones (KEP-1669 terminating fallback).
    cluster: Vec<Endpoint>,
    /// For Local policies: this node's ready endpoints, or else its serving+terminating ones.
    local: Vec<Endpoint>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    Any,
    SameNode,
    SameZone,
}

/// kube-proxy's topologyModeFromHints: hints are used only when every ready endpoint carries
/// them and at least one is meant for this node (or zone); PreferSameNode hints first.
fn topology_mode(eps: &[PortEndpoint], node: &NodeContext) -> TopologyMode {
    let ready = || eps.iter().filter(|e| e.ep.ready);
    if ready().next().is_none() {
        return TopologyMode::Any;
    }
    if ready().all(|e| !e.ep.node_hints.is_empty())
        && ready().any(|e| e.ep.node_hints.iter().any(|n| n == node.name))
    {
        return TopologyMode::SameNode;
    }
    if let Some(zone) = &node.zone
        && ready().all(|e| !e.ep.zone_hints.is_empty())
        && ready().any(|e| e.ep.zone_hints.contains(zone))
    {
        return TopologyMode::SameZone;
    }
    TopologyMode::Any
}

fn categorize(eps: &[PortEndpoint], node: &NodeContext) -> Categorized {
    let mode = topology_mode(eps, node);
    let allowed = |e: &PortEndpoint| match mode {
        TopologyMode::Any => true,
        TopologyMode::SameNode => e.ep.node_hints.iter().any(|n| n == node.name),
        TopologyMode::SameZone => node
            .zone
            .as_ref()
            .is_some_and(|z| e.ep.zone_hints.contains(z)),
    };
    let is_local = |e: &PortEndpoint| e.ep.node_name.as_deref() == Some(node.name);
    let pick = |filter: &dyn Fn(&PortEndpoint) -> bool| -> Vec<Endpoint> {
        let ready: Vec<Endpoint> = eps
            .iter()
            .filter(|e| e.ep.ready && filter(e))
            .map(|e| Endpoint {
                addr: e.addr,
                port: e.port,
                state: EndpointState::Active,
                local: is_local(e),
            })
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        eps.iter()
            .filter(|e| !e.ep.ready && e.ep.serving && e.ep.terminating && filter(e))
            .map(|e| Endpoint {
                addr: e.addr,
                port: e.port,
                state: EndpointState::Terminating,
                local: is_local(e),
            })
            .collect()
    };
    Categorized {
        cluster: pick(&allowed),
        local: pick(&is_local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            node_name: "node1".into(),
            service_proxy_name: None,
            node_addresses: vec!["198.18.0.1".parse().unwrap()],
            external_lb_algorithm: LbAlgorithm::Random,
        }
    }

    fn objs(yaml: &str) -> Inputs {
        crate::source::manifests::parse_documents(yaml, "test.yaml").expect("valid test yaml")
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 198.18.100.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: metrics, port: 9100, targetPort: 9090, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: metrics, port: 9090}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [198.19.1.2]
  conditions: {ready: true}
- addresses: [198.19.2.2]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080}
endpoints:
- addresses: [198.19.2.2]
- addresses: [198.19.2.3]
  conditions: {ready: false}
"#;

    fn fe(addr: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            addr: addr.parse().unwrap(),
            port,
            protocol,
            scope: Scope::Internal,
        }
    }

    fn backends(t: &Translation, f: Frontend) -> Vec<String> {
        t.state.services[&f]
            .endpoints
            .iter()
            .map(|e| format!("{}:{}:{:?}", e.addr, e.port, e.state))
            .collect()
    }

    /// Each row: what the rule is, the frontend, and the backends it must get.
    #[test]
    fn ports_by_name_merged_and_deduplicated() {
        let t = translate(&objs(WEB), &opts());
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let rows: &[(&str, Frontend, &[&str])] = &[
            (
                "targetPort by name: slice port 'http' gives the number; two slices merged, duplicate 198.19.2.2 once, not-ready skipped",
                fe("198.18.100.10", 80, Protocol::Tcp),
                &["198.19.1.2:8080:Active", "198.19.2.2:8080:Active"],
            ),
            (
                "second port of the same Service maps by its own name",
                fe("198.18.100.10", 9100, Protocol::Tcp),
                &["198.19.1.2:9090:Active", "198.19.2.2:9090:Active"],
            ),
            (
                "UDP port matched by name and protocol",
                fe("198.18.100.10", 53, Protocol::Udp),
                &["198.19.1.2:5353:Active", "198.19.2.2:5353:Active"],
            ),
        ];
        for (rule, f, want) in rows {
            assert_eq!(backends(&t, *f), *want, "{rule}");
        }
        assert_eq!(
            t.state.services[&fe("198.18.100.10", 80, Protocol::Tcp)].name,
            "default/web:http"
        );
    }

    #[test]
    fn skipped_services() {
        let cases = [
            ("headless", "spec: {clusterIP: None, ports: [{port: 80}]}"),
            (
                "ExternalName",
                "spec: {type: ExternalName, externalName: example.invalid, ports: [{port: 80}]}",
            ),
            (
                "other proxy",
                "spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}",
            ),
            (
                "headless label",
                "spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}",
            ),
            (
                "headless label, empty value",
                "spec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}",
            ),
        ];
        for (what, spec) in cases {
            let labels = match what {
                "other proxy" => format!("labels: {{{SERVICE_PROXY_NAME_LABEL}: other}}"),
                "headless label" => format!("labels: {{{HEADLESS_LABEL}: \"true\"}}"),
                "headless label, empty value" => format!("labels: {{{HEADLESS_LABEL}: \"\"}}"),
                _ => String::new(),
            };
            let y = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: n, {labels}}}\n{spec}\n"
            );
            let t = translate(&objs(&y), &opts());
            assert!(t.state.services.is_empty(), "{what} must not be programmed");
            assert_eq!(t.skipped, vec!["n/s".to_string()], "{what}");
            assert!(t.errors.is_empty(), "{what}: {:?}", t.errors);
        }
    }

    #[test]
    fn invalid_services_rejected_one_by_one() {
        let cases = [
            (
                "clusterIP: 198.18.300.1\n  ports: [{port: 80}]",
                "spec.clusterIP",
            ),
            (
                "clusterIP: 198.18.100.2\n  ports: [{port: 0}]",
                "spec.ports[0].port",
            ),
            (
                "clusterIP: 198.18.100.2\n  ports: [{port: 70000}]",
                "spec.ports[0].port",
            ),
            (
                "clusterIP: 198.18.100.2\n  ports: [{name: a, port: 80}, {name: a, port: 81}]",
                "spec.ports[1].name",
            ),
            (
                "clusterIP: 198.18.100.2\n  ports: [{port: 80, protocol: ICMP}]",
                "spec.ports[0].protocol",
            ),
        ];
        for (spec, field) in cases {
            let y = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: default}}\nspec:\n  {spec}\n---\n{WEB}"
            );
            let t = translate(&objs(&y), &opts());
            assert_eq!(t.errors.len(), 1, "{spec}: {:?}", t.errors);
            assert_eq!(t.errors[0].object, "Service default/bad");
            assert_eq!(t.errors[0].field, field, "{spec}");
            // The good Service is untouched by the bad one.
            assert_eq!(t.state.services.len(), 3, "{spec}");
        }
    }

    #[test]
    fn conflicting_frontend_rejects_the_later_service_whole() {
        let y = format!(
            "{WEB}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: zzz, namespace: default}}\nspec: {{clusterIP: 198.18.100.10, ports: [{{name: a, port: 80}}, {{name: b, port: 81}}]}}\n"
        );
        let t = translate(&objs(&y), &opts());
        assert_eq!(t.errors.len(), 1);
        assert_eq!(t.errors[0].object, "Service default/zzz");
        assert!(
            !t.state
                .services
                .contains_key(&fe("198.18.100.10", 81, Protocol::Tcp))
        );
    }

    /// healthCheckNodePorts and nodePorts come from one range, one Service each: the first
    /// Service (here: in namespace/name order, no creation times) keeps a port, the other is
    /// rejected whole, on every node.
    /// Each row: rule, the other Service (name, spec), the error (object, field) or none, and
    /// which Service each health check port serves.
    #[test]
    fn node_port_conflicts_reject_the_later_service() {
        let svc = |name: &str, spec: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
            )
        };
        // Holds healthCheckNodePort 32000 and nodePort 30080.
        let a = svc(
            "a",
            "{type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32000, clusterIP: 198.18.100.90, ports: [{port: 80, nodePort: 30080}]}",
        );
        type Row = (
            &'static str,
            (&'static str, &'static str),
            Option<(&'static str, &'static str)>,
            &'static [(u16, &'static str)],
        );
        let rows: &[Row] = &[
            (
                "same healthCheckNodePort, later Service",
                (
                    "b",
                    "{type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32000, clusterIP: 198.18.100.91, ports: [{port: 80, nodePort: 30081}]}",
                ),
                Some(("Service default/b", "spec.healthCheckNodePort")),
                &[(32000, "a")],
            ),
            (
                "same healthCheckNodePort, earlier Service: it keeps the port, a is rejected",
                (
                    "0a",
                    "{type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32000, clusterIP: 198.18.100.91, ports: [{port: 80, nodePort: 30081}]}",
                ),
                Some(("Service default/a", "spec.healthCheckNodePort")),
                &[(32000, "0a")],
            ),
            (
                "healthCheckNodePort is another Service's nodePort",
                (
                    "b",
                    "{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 30080, clusterIP: 198.18.100.91, ports: [{port: 80, nodePort: 30081}]}",
                ),
                Some(("Service default/b", "spec.healthCheckNodePort")),
                &[(32000, "a")],
            ),
            (
                "nodePort is another Service's healthCheckNodePort (UDP too: one range for both)",
                (
                    "b",
                    "{type: NodePort, clusterIP: 198.18.100.91, ports: [{name: x, port: 81, nodePort: 30090}, {name: y, port: 82, nodePort: 32000, protocol: UDP}]}",
                ),
                Some(("Service default/b", "spec.ports[1].nodePort")),
                &[(32000, "a")],
            ),
            (
                "healthCheckNodePort is the Service's own nodePort",
                (
                    "b",
                    "{type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 30081, clusterIP: 198.18.100.91, ports: [{port: 80, nodePort: 30081}]}",
                ),
                Some(("Service default/b", "spec.healthCheckNodePort")),
                &[(32000, "a")],
            ),
            (
                "different ports: no conflict",
                (
                    "b",
                    "{type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32001, clusterIP: 198.18.100.91, ports: [{port: 80, nodePort: 30081}]}",
                ),
                None,
                &[(32000, "a"), (32001, "b")],
            ),
            (
                "externalTrafficPolicy Cluster: its healthCheckNodePort is not served, claims nothing",
                (
                    "b",
                    "{type: NodePort, healthCheckNodePort: 32000, clusterIP: 198.18.100.91, ports: [{port: 80, nodePort: 30081}]}",
                ),
                None,
                &[(32000, "a")],
            ),
        ];
        let no_addresses = Options {
            node_addresses: vec![],
            ..opts()
        };
        for o in [opts(), no_addresses] {
            let alone = translate(&objs(&a), &o);
            for (rule, (name, spec), want_error, want_health) in rows {
                let other = svc(name, spec);
                let t = translate(&objs(&format!("{a}---\n{other}")), &o);
                let errors: Vec<(&str, &str)> = t
                    .errors
                    .iter()
                    .map(|e| (e.object.as_str(), e.field.as_str()))
                    .collect();
                assert_eq!(
                    errors,
                    want_error.iter().copied().collect::<Vec<_>>(),
                    "{rule}"
                );
                let health: Vec<(u16, &str)> = t
                    .health_checks
                    .iter()
                    .map(|(p, h)| (*p, h.name.as_str()))
                    .collect();
                assert_eq!(health, *want_health, "{rule}");
                // The rejected Service is not programmed at all; the other one as if alone.
                let programmed = |svc: &str| -> Vec<(Frontend, DesiredService)> {
                    t.state
                        .services
                        .iter()
                        .filter(|(_, d)| d.service == svc)
                        .map(|(f, d)| (*f, d.clone()))
                        .collect()
                };
                match want_error.map(|(obj, _)| obj) {
                    Some("Service default/a") => {
                        assert!(programmed("default/a").is_empty(), "{rule}");
                        assert!(!programmed(&format!("default/{name}")).is_empty(), "{rule}");
                    }
                    Some(_) => {
                        assert!(programmed(&format!("default/{name}")).is_empty(), "{rule}");
                        assert_eq!(
                            programmed("default/a"),
                            alone.state.services.clone().into_iter().collect::<Vec<_>>(),
                            "{rule}"
                        );
                    }
                    None => assert!(!programmed(&format!("default/{name}")).is_empty(), "{rule}"),
                }
            }
        }
        let t = translate(
            &objs(&format!("{a}---\n{}", svc("b", rows[0].1.1))),
            &opts(),
        );
        assert_eq!(
            t.errors[0].message,
            "port 32000 is already the healthCheckNodePort of Service default/a"
        );
    }

    /// The Service created first keeps a nodePort or healthCheckNodePort, whatever the name
    /// order (the apiserver's allocator gave it to the first creator); equal or missing creation
    /// times fall back to namespace/name, a missing one counting as the newest. TCP and UDP on
    /// one nodePort number are two ports. Each row: rule, a's and the other Service's creation
    /// time, the other's name and spec, and the rejected (object, field, message) or none.
    #[test]
    fn node_port_claims_go_to_the_oldest_service() {
        let svc = |name: &str, created: Option<&str>, spec: &str| {
            let ts = created
                .map(|t| format!(", creationTimestamp: \"{t}\""))
                .unwrap_or_default();
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default{ts}}}\nspec: {spec}\n"
            )
        };
        const A: &str = "{type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32000, clusterIP: 198.18.100.90, ports: [{port: 80, nodePort: 30080}]}";
        const SAME_NP: &str =
            "{type: NodePort, clusterIP: 198.18.100.91, ports: [{port: 80, nodePort: 30080}]}";
        const SAME_NP_UDP: &str = "{type: NodePort, clusterIP: 198.18.100.91, ports: [{port: 80, nodePort: 30080, protocol: UDP}]}";
        const SAME_HC: &str = "{type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32000, clusterIP: 198.18.100.91, ports: [{port: 80, nodePort: 30081}]}";
        const T1: Option<&str> = Some("2026-01-01T00:00:00Z");
        const T2: Option<&str> = Some("2026-01-02T00:00:00Z");
        type Row = (
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
            &'static str,
            &'static str,
            Option<(&'static str, &'static str, &'static str)>,
        );
        let rows: &[Row] = &[
            (
                "same nodePort, the other created later though first by name",
                T1,
                T2,
                "0b",
                SAME_NP,
                Some((
                    "Service default/0b",
                    "spec.ports[0].nodePort",
                    "port 30080/TCP is already a nodePort of Service default/a",
                )),
            ),
            (
                "same nodePort, the other created earlier though later by name",
                T2,
                T1,
                "b",
                SAME_NP,
                Some((
                    "Service default/a",
                    "spec.ports[0].nodePort",
                    "port 30080/TCP is already a nodePort of Service default/b",
                )),
            ),
            (
                "same nodePort number, UDP: no conflict",
                T1,
                T2,
                "0b",
                SAME_NP_UDP,
                None,
            ),
            (
                "same nodePort number, UDP, created earlier: no conflict",
                T2,
                T1,
                "b",
                SAME_NP_UDP,
                None,
            ),
            (
                "same healthCheckNodePort, the other created later though first by name",
                T1,
                T2,
                "0b",
                SAME_HC,
                Some((
                    "Service default/0b",
                    "spec.healthCheckNodePort",
                    "port 32000 is already the healthCheckNodePort of Service default/a",
                )),
            ),
            (
                "same healthCheckNodePort, the other created earlier though later by name",
                T2,
                T1,
                "b",
                SAME_HC,
                Some((
                    "Service default/a",
                    "spec.healthCheckNodePort",
                    "port 32000 is already the healthCheckNodePort of Service default/b",
                )),
            ),
            (
                "the other has no creation time: it is the newest",
                T1,
                None,
                "0b",
                SAME_NP,
                Some((
                    "Service default/0b",
                    "spec.ports[0].nodePort",
                    "port 30080/TCP is already a nodePort of Service default/a",
                )),
            ),
            (
                "same creation time: name order",
                T1,
                T1,
                "0b",
                SAME_NP,
                Some((
                    "Service default/a",
                    "spec.ports[0].nodePort",
                    "port 30080/TCP is already a nodePort of Service default/0b",
                )),
            ),
        ];
        let no_addresses = Options {
            node_addresses: vec![],
            ..opts()
        };
        for o in [opts(), no_addresses] {
            for (rule, a_created, created, name, spec, want) in rows {
                let y = format!(
                    "{}---\n{}",
                    svc("a", *a_created, A),
                    svc(name, *created, spec)
                );
                let t = translate(&objs(&y), &o);
                let errors: Vec<(&str, &str, &str)> = t
                    .errors
                    .iter()
                    .map(|e| (e.object.as_str(), e.field.as_str(), e.message.as_str()))
                    .collect();
                assert_eq!(errors, want.iter().copied().collect::<Vec<_>>(), "{rule}");
                let programmed = |svc: &str| t.state.services.values().any(|d| d.service == svc);
                let other = format!("default/{name}");
                match want.map(|(obj, ..)| obj) {
                    Some("Service default/a") => {
                        assert!(!programmed("default/a") && programmed(&other), "{rule}")
                    }
                    Some(_) => assert!(programmed("default/a") && !programmed(&other), "{rule}"),
                    None => {
                        assert!(programmed("default/a") && programmed(&other), "{rule}");
                        let np = |p| {
                            t.state
                                .services
                                .keys()
                                .filter(|f| f.port == 30080 && f.protocol == p)
                                .count()
                        };
                        let want_each = o.node_addresses.len() * 2;
                        assert_eq!(
                            (np(Protocol::Tcp), np(Protocol::Udp)),
                            (want_each, o.node_addresses.len()),
                            "{rule}"
                        );
                    }
                }
            }
        }
    }

    /// kube-proxy has no per-Service endpoint limit: 5,000 endpoints (five slices of 1,000, as
    /// the EndpointSlice controller splits them) are all backends of the port.
    #[test]
    fn large_services_are_not_rejected() {
        let mut y = String::from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: default}\nspec: {clusterIP: 198.18.100.95, ports: [{port: 80, targetPort: 8080}]}\n",
        );
        for s in 0..5 {
            y.push_str(&format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: big-{s}, namespace: default, labels: {{kubernetes.io/service-name: big}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n"));
            for e in 0..1000u32 {
                let n = s * 1000 + e;
                y.push_str(&format!(
                    "- addresses: [198.19.{}.{}]\n",
                    100 + n / 250,
                    1 + n % 250
                ));
            }
        }
        let t = translate(&objs(&y), &opts());
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let eps = &t.state.services[&fe("198.18.100.95", 80, Protocol::Tcp)].endpoints;
        assert_eq!(eps.len(), 5_000);
    }

    #[test]
    fn terminating_fallback_only_without_ready_endpoints() {
        let y = r#"
apiVersion: v1
kind: Service
metadata: {name: t, namespace: default}
spec: {clusterIP: 198.18.100.20, selector: {a: b}, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: t-1, namespace: default, labels: {kubernetes.io/service-name: t}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [198.19.1.5]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [198.19.1.6]
  conditions: {ready: false, serving: false, terminating: true}
"#;
        let t = translate(&objs(y), &opts());
        let f = fe("198.18.100.20", 80, Protocol::Tcp);
        assert_eq!(backends(&t, f), ["198.19.1.5:8080:Terminating"]);
        let with_ready = y.replace(
            "- addresses: [198.19.1.6]\n  conditions: {ready: false, serving: false, terminating: true}",
            "- addresses: [198.19.1.7]",
        );
        let t = translate(&objs(&with_ready), &opts());
        assert_eq!(backends(&t, f), ["198.19.1.7:8080:Active"]);
    }

    #[test]
    fn selectorless_service_uses_endpoints_object() {
        let y = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {clusterIP: 198.18.100.30, ports: [{name: db, port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: ext, namespace: default}
subsets:
- addresses: [{ip: 198.19.2.9}, {ip: 198.19.1.9}]
  notReadyAddresses: [{ip: 198.19.1.10}]
  ports: [{name: db, port: 15432}]
"#;
        let t = translate(&objs(y), &opts());
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(
            backends(&t, fe("198.18.100.30", 5432, Protocol::Tcp)),
            ["198.19.1.9:15432:Active", "198.19.2.9:15432:Active"]
        );
        // With a selector, the Endpoints object is ignored (the slice controller owns it).
        let t = translate(
            &objs(&y.replace(
                "ports: [{name: db, port: 5432}]}",
                "selector: {a: b}, ports: [{name: db, port: 5432}]}",
            )),
            &opts(),
        );
        assert!(
            t.state.services[&fe("198.18.100.30", 5432, Protocol::Tcp)]
                .endpoints
                .is_empty()
        );
    }

    #[test]
    fn families_fqdn_and_bad_addresses() {
        let y = r#"
apiVersion: v1
kind: Service
metadata: {name: d, namespace: default}
spec:
  clusterIPs: [198.18.100.40, "fd00::40"]
  ipFamilies: [IPv4, IPv6]
  selector: {a: b}
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: d-4, namespace: default, labels: {kubernetes.io/service-name: d}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.19.1.4]}, {addresses: ["not-an-ip"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: d-6, namespace: default, labels: {kubernetes.io/service-name: d}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00::1:4"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: d-f, namespace: default, labels: {kubernetes.io/service-name: d}}
addressType: FQDN
ports: [{port: 8080}]
endpoints: [{addresses: [db.example.invalid]}]
"#;
        let t = translate(&objs(y), &opts());
        assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
        assert_eq!(t.errors[0].object, "EndpointSlice default/d-4");
        assert_eq!(t.errors[0].field, "endpoints[1].addresses[0]");
        assert_eq!(
            backends(&t, fe("198.18.100.40", 80, Protocol::Tcp)),
            ["198.19.1.4:8080:Active"]
        );
        assert_eq!(
            backends(&t, fe("fd00::40", 80, Protocol::Tcp)),
            ["fd00::1:4:8080:Active"]
        );
    }

    #[test]
    fn session_affinity_timeout() {
        let base = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\nspec: {clusterIP: 198.18.100.50, ports: [{port: 80}]";
        let cases = [
            ("}", 0),
            (", sessionAffinity: ClientIP}", 10_800),
            (
                ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}}",
                30,
            ),
        ];
        for (tail, want) in cases {
            let t = translate(&objs(&format!("{base}{tail}\n")), &opts());
            let s = &t.state.services[&fe("198.18.100.50", 80, Protocol::Tcp)];
            assert_eq!(s.affinity_timeout_s, want, "{tail}");
        }
    }

    fn sep(
        addr: &str,
        (ready, serving, terminating): (bool, bool, bool),
        node: &str,
        zones: &[&str],
        nodes: &[&str],
    ) -> SliceEndpoint {
        SliceEndpoint {
            addr: addr.parse().unwrap(),
            ready,
            serving,
            terminating,
            node_name: Some(node.to_string()),
            zone_hints: zones.iter().map(|z| z.to_string()).collect(),
            node_hints: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    const READY: (bool, bool, bool) = (true, true, false);
    const TERMINATING: (bool, bool, bool) = (false, true, true);
    const GONE: (bool, bool, bool) = (false, false, true);

    /// kube-proxy's CategorizeEndpoints, row by row: (rule, endpoints, node zone, want cluster,
    /// want local). Addresses' last octet names the endpoint; 'T' marks terminating ones.
    #[test]
    fn categorize_follows_kube_proxy() {
        type Row = (
            &'static str,
            Vec<SliceEndpoint>,
            Option<&'static str>,
            &'static str,
            &'static str,
        );
        let rows: Vec<Row> = vec![
            (
                "no hints: every ready endpoint; local = this node's",
                vec![
                    sep("198.19.1.2", READY, "node1", &[], &[]),
                    sep("198.19.2.2", READY, "node2", &[], &[]),
                ],
                Some("z1"),
                "2 2",
                "2",
            ),
            (
                "terminating fallback: none ready, serving+terminating used, not-serving never",
                vec![
                    sep("198.19.1.3", TERMINATING, "node1", &[], &[]),
                    sep("198.19.2.3", GONE, "node2", &[], &[]),
                ],
                None,
                "3T",
                "3T",
            ),
            (
                "a ready endpoint anywhere beats terminating ones",
                vec![
                    sep("198.19.1.3", TERMINATING, "node1", &[], &[]),
                    sep("198.19.2.4", READY, "node2", &[], &[]),
                ],
                None,
                "4",
                "3T",
            ),
            (
                "Local with no local endpoint: nothing (traffic dropped)",
                vec![sep("198.19.2.2", READY, "node2", &[], &[])],
                None,
                "2",
                "",
            ),
            (
                "zone hints all present and one for our zone: only our zone's",
                vec![
                    sep("198.19.1.2", READY, "node1", &["z1"], &[]),
                    sep("198.19.2.2", READY, "node2", &["z2"], &[]),
                ],
                Some("z1"),
                "2",
                "2",
            ),
            (
                "one ready endpoint without hints: hints ignored",
                vec![
                    sep("198.19.1.2", READY, "node1", &["z1"], &[]),
                    sep("198.19.2.2", READY, "node2", &[], &[]),
                ],
                Some("z1"),
                "2 2",
                "2",
            ),
            (
                "no endpoint hinted for our zone: hints ignored",
                vec![
                    sep("198.19.1.2", READY, "node1", &["z2"], &[]),
                    sep("198.19.2.2", READY, "node2", &["z2"], &[]),
                ],
                Some("z1"),
                "2 2",
                "2",
            ),
            (
                "node without a zone label: zone hints ignored",
                vec![
                    sep("198.19.1.2", READY, "node1", &["z1"], &[]),
                    sep("198.19.2.2", READY, "node2", &["z2"], &[]),
                ],
                None,
                "2 2",
                "2",
            ),
            (
                "PreferSameNode: node hints win over zone hints",
                vec![
                    sep("198.19.1.2", READY, "node1", &["z1"], &["node1"]),
                    sep("198.19.1.5", READY, "node3", &["z1"], &["node3"]),
                ],
                Some("z1"),
                "2",
                "2",
            ),
            (
                "node hints not for us: fall back to zone hints",
                vec![
                    sep("198.19.1.2", READY, "node3", &["z1"], &["node3"]),
                    sep("198.19.2.2", READY, "node4", &["z2"], &["node4"]),
                ],
                Some("z1"),
                "2",
                "",
            ),
        ];
        let node = NodeContext {
            name: "node1",
            zone: None,
        };
        for (rule, eps, zone, want_cluster, want_local) in rows {
            let node = NodeContext {
                zone: zone.map(String::from),
                ..node
            };
            let pes: Vec<PortEndpoint> = eps
                .iter()
                .map(|ep| PortEndpoint {
                    addr: ep.addr,
                    port: 80,
                    ep,
                })
                .collect();
            let c = categorize(&pes, &node);
            let show = |v: &[Endpoint]| {
                v.iter()
                    .map(|e| {
                        let IpAddr::V4(a) = e.addr else {
                            unreachable!()
                        };
                        let t = if e.state == EndpointState::Terminating {
                            "T"
                        } else {
                            ""
                        };
                        format!("{}{t}", a.octets()[3])
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            assert_eq!(show(&c.cluster), want_cluster, "cluster: {rule}");
            assert_eq!(show(&c.local), want_local, "local: {rule}");
        }
    }

    #[test]
    fn internal_traffic_policy_local_and_node_zone() {
        let y = r#"
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {topology.kubernetes.io/zone: z1}}
---
apiVersion: v1
kind: Service
metadata: {name: l, namespace: default}
spec: {clusterIP: 198.18.100.60, selector: {a: b}, internalTrafficPolicy: Local, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: z, namespace: default}
spec: {clusterIP: 198.18.100.61, selector: {a: b}, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: l-1, namespace: default, labels: {kubernetes.io/service-name: l}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.1.2], nodeName: node1}
- {addresses: [198.19.2.2], nodeName: node2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: z-1, namespace: default, labels: {kubernetes.io/service-name: z}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.19.1.3], nodeName: node1, hints: {forZones: [{name: z2}]}}
- {addresses: [198.19.2.3], nodeName: node2, hints: {forZones: [{name: z1}]}}
"#;
        let t = translate(&objs(y), &opts());
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(
            backends(&t, fe("198.18.100.60", 80, Protocol::Tcp)),
            ["198.19.1.2:8080:Active"],
            "internalTrafficPolicy Local keeps only node1's endpoint"
        );
        assert_eq!(
            backends(&t, fe("198.18.100.61", 80, Protocol::Tcp)),
            ["198.19.2.3:8080:Active"],
            "zone hints for z1 (node1's zone from its Node object)"
        );
        let other = Options {
            node_name: "node2".into(),
            ..opts()
        };
        let t = translate(&objs(y), &other);
        assert_eq!(
            backends(&t, fe("198.18.100.60", 80, Protocol::Tcp)),
            ["198.19.2.2:8080:Active"]
        );
        // node2 has no Node object here, so no zone: hints ignored.
        assert_eq!(
            backends(&t, fe("198.18.100.61", 80, Protocol::Tcp)).len(),
            2
        );
    }

    #[test]
    fn service_proxy_name_selects_services() {
        let y = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: n, labels: {{{SERVICE_PROXY_NAME_LABEL}: ours}}}}\nspec: {{clusterIP: 198.18.100.70, ports: [{{port: 80}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: plain, namespace: n}}\nspec: {{clusterIP: 198.18.100.71, ports: [{{port: 80}}]}}\n"
        );
        let names = |o: &Options| -> Vec<String> {
            translate(&objs(&y), o)
                .state
                .services
                .values()
                .map(|s| s.name.clone())
                .collect()
        };
        assert_eq!(names(&opts()), ["n/plain"], "unlabelled only, by default");
        let ours = Options {
            service_proxy_name: Some("ours".into()),
            ..opts()
        };
        assert_eq!(
            names(&ours),
            ["n/s"],
            "exactly the Services labelled with our name"
        );
    }

    /// Each row: rule, the annotation's value (None: absent), `--external-lb-algorithm`, and
    /// either the algorithm of the cluster IP and of every external frontend (NodePort,
    /// load-balancer IP, externalIP, in both scopes), or the field the Service is rejected on.
    #[test]
    fn lb_algorithm_from_annotation_and_flag() {
        use LbAlgorithm::{Maglev, Random};
        let field = format!("metadata.annotations[{LB_ALGORITHM_ANNOTATION}]");
        type Row<'a> = (
            &'a str,
            Option<&'a str>,
            LbAlgorithm,
            Result<(LbAlgorithm, LbAlgorithm), &'a str>,
        );
        let rows: &[Row] = &[
            (
                "no annotation, flag random",
                None,
                Random,
                Ok((Random, Random)),
            ),
            (
                "no annotation, flag maglev: external frontends only",
                None,
                Maglev,
                Ok((Random, Maglev)),
            ),
            (
                "annotation maglev: every frontend, whatever the flag",
                Some("maglev"),
                Random,
                Ok((Maglev, Maglev)),
            ),
            (
                "annotation random wins over the flag",
                Some("random"),
                Maglev,
                Ok((Random, Random)),
            ),
            (
                "unknown value: rejected",
                Some("round-robin"),
                Maglev,
                Err(&field),
            ),
            ("values are lower case", Some("Maglev"), Random, Err(&field)),
            ("empty value: rejected", Some(""), Random, Err(&field)),
        ];
        for (rule, annotation, flag, want) in rows {
            let annotations = annotation
                .map(|v| format!(", annotations: {{{LB_ALGORITHM_ANNOTATION}: {v:?}}}"))
                .unwrap_or_default();
            let y = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: default{annotations}}}\nspec: {{type: LoadBalancer, clusterIP: 198.18.100.85, externalIPs: [198.18.200.5], externalTrafficPolicy: Local, selector: {{a: b}}, ports: [{{port: 80, nodePort: 30085}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.18.201.5}}]}}}}\n---\n{WEB}"
            );
            let o = Options {
                external_lb_algorithm: *flag,
                ..opts()
            };
            let t = translate(&objs(&y), &o);
            let ours: Vec<&DesiredService> = t
                .state
                .services
                .values()
                .filter(|d| d.service == "default/lb")
                .collect();
            // The other Service is translated either way, with random on its cluster IP.
            let web: Vec<&DesiredService> = t
                .state
                .services
                .values()
                .filter(|d| d.service == "default/web")
                .collect();
            assert_eq!(web.len(), 3, "{rule}");
            assert!(web.iter().all(|d| d.algorithm == Random), "{rule}");
            match want {
                Ok((cluster, external)) => {
                    assert!(t.errors.is_empty(), "{rule}: {:?}", t.errors);
                    // Cluster IP; NodePort, load-balancer IP and externalIP in two scopes each.
                    assert_eq!(ours.len(), 7, "{rule}");
                    for d in ours {
                        let want = if d.kind == ServiceKind::ClusterIp {
                            cluster
                        } else {
                            external
                        };
                        assert_eq!(d.algorithm, *want, "{rule}: {:?}", d.kind);
                    }
                }
                Err(f) => {
                    assert!(ours.is_empty(), "{rule}: rejected whole");
                    assert_eq!(t.errors.len(), 1, "{rule}: {:?}", t.errors);
                    assert_eq!(t.errors[0].object, "Service default/lb", "{rule}");
                    assert_eq!(t.errors[0].field, *f, "{rule}");
                    assert!(
                        t.errors[0].message.contains("random or maglev"),
                        "{rule}: {}",
                        t.errors[0].message
                    );
                }
            }
        }
    }

    #[test]
    fn external_frontends_and_traffic_policies() {
        let y = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.80
  externalIPs: [198.18.200.1]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [198.18.0.0/24, " 198.19.0.0/16 ", "fd00::/8"]
  selector: {a: b}
  ports: [{name: http, port: 80, nodePort: 30080}]
status:
  loadBalancer:
    ingress: [{ip: 198.18.201.1}, {ip: 198.18.201.2, ipMode: Proxy}]
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.18.100.81
  selector: {a: b}
  ports: [{name: http, port: 80, nodePort: 30081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: default, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [198.19.1.2], nodeName: node1}
- {addresses: [198.19.2.2], nodeName: node2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-1, namespace: default, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [198.19.2.3], nodeName: node2}
"#;
        let t = translate(&objs(y), &opts());
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let ext = |addr: &str, port| Frontend {
            scope: Scope::External,
            ..fe(addr, port, Protocol::Tcp)
        };
        let kind = |f: Frontend| t.state.services[&f].kind;
        // Each row: rule, frontend, backends.
        let rows: Vec<(&str, Frontend, Vec<&str>)> = vec![
            (
                "ClusterIP keeps every endpoint",
                fe("198.18.100.80", 80, Protocol::Tcp),
                vec!["198.19.1.2:8080:Active", "198.19.2.2:8080:Active"],
            ),
            (
                "eTP Local NodePort from outside: local endpoints only",
                ext("198.18.0.1", 30080),
                vec!["198.19.1.2:8080:Active"],
            ),
            (
                "eTP Local NodePort from pods: short-circuit to every endpoint",
                fe("198.18.0.1", 30080, Protocol::Tcp),
                vec!["198.19.1.2:8080:Active", "198.19.2.2:8080:Active"],
            ),
            (
                "LB ingress IP (VIP mode) on the Service port",
                ext("198.18.201.1", 80),
                vec!["198.19.1.2:8080:Active"],
            ),
            (
                "externalIPs on the Service port",
                ext("198.18.200.1", 80),
                vec!["198.19.1.2:8080:Active"],
            ),
            (
                "eTP Cluster NodePort: one entry, every endpoint",
                fe("198.18.0.1", 30081, Protocol::Tcp),
                vec!["198.19.2.3:8080:Active"],
            ),
        ];
        for (rule, f, want) in rows {
            assert_eq!(backends(&t, f), want, "{rule}");
        }
        assert_eq!(kind(ext("198.18.0.1", 30080)), ServiceKind::NodePort);
        assert_eq!(kind(ext("198.18.201.1", 80)), ServiceKind::LoadBalancer);
        assert_eq!(kind(ext("198.18.200.1", 80)), ServiceKind::ExternalIp);
        assert!(
            !t.state
                .services
                .keys()
                .any(|f| f.addr.to_string() == "198.18.201.2"),
            "ipMode Proxy ingress IPs are left to the load balancer"
        );
        assert!(
            !t.state.services.contains_key(&ext("198.18.0.1", 30081)),
            "no external view for eTP Cluster"
        );
        assert!(t.state.services[&ext("198.18.0.1", 30080)].endpoints[0].local);
        let v4 = |a: &str, p| (a.parse::<IpAddr>().unwrap(), p);
        assert_eq!(
            t.state.services[&ext("198.18.201.1", 80)].source_ranges,
            vec![v4("198.18.0.0", 24), v4("198.19.0.0", 16)],
            "source ranges on the load balancer's address, of its family"
        );
        assert!(
            t.state.services[&ext("198.18.0.1", 30080)]
                .source_ranges
                .is_empty(),
            "not on NodePorts"
        );
        let bad = y.replace("198.18.0.0/24,", "198.18.0.0/33,");
        let tb = translate(&objs(&bad), &opts());
        assert_eq!(tb.errors[0].field, "spec.loadBalancerSourceRanges[0]");
        assert!(!t.state.services[&fe("198.18.0.1", 30081, Protocol::Tcp)].endpoints[0].local);
        assert_eq!(
            t.health_checks[&32000],
            HealthCheck {
                namespace: "default".into(),
                name: "lb".into(),
                local_endpoints: 1
            }
        );
        // Another node without local endpoints: its external view is empty (dropped there).
        let t2 = translate(
            &objs(y),
            &Options {
                node_name: "node3".into(),
                ..opts()
            },
        );
        let empty = &t2.state.services[&ext("198.18.0.1", 30080)];
        assert!(empty.endpoints.is_empty());
        // kube-proxy: "has no local endpoints" is a DROP, not the REJECT of a Service without
        // any endpoint; the internal view (every endpoint) is never a drop.
        assert!(empty.drop_without_endpoints);
        assert!(!t2.state.services[&fe("198.18.0.1", 30080, Protocol::Tcp)].drop_without_endpoints);
        assert_eq!(t2.health_checks[&32000].local_endpoints, 0);

        // A NodePort already taken rejects the later Service whole, naming the field.
        let dup = format!(
            "{y}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: zz, namespace: default}}\nspec: {{type: NodePort, clusterIP: 198.18.100.82, ports: [{{port: 80, nodePort: 30081}}]}}\n"
        );
        let t3 = translate(&objs(&dup), &opts());
        assert_eq!(t3.errors.len(), 1, "{:?}", t3.errors);
        assert_eq!(
            (t3.errors[0].object.as_str(), t3.errors[0].field.as_str()),
            ("Service default/zz", "spec.ports[0].nodePort")
        );
        assert!(
            !t3.state
                .services
                .contains_key(&fe("198.18.100.82", 80, Protocol::Tcp))
        );
    }
}

//! Kubernetes Services + EndpointSlices (+ Endpoints) -> desired frontends and backends,
//! following kube-proxy's rules (pkg/proxy: servicechangetracker, endpointslicecache, topology).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use proxy_common::{ServiceKind, limits::MAX_BACKENDS_PER_SERVICE};

use super::desired::{DesiredService, DesiredState, Endpoint, EndpointState, Frontend, Protocol};

/// Label that hands a Service to another proxy (kube-proxy skips Services carrying it).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kube-proxy's default sessionAffinity ClientIP timeout (v1.DefaultClientIPServiceAffinitySeconds).
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub endpoints: Vec<Endpoints>,
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
pub fn translate(inputs: &Inputs) -> Translation {
    let mut out = Translation::default();
    let by_service = collect_endpoints(inputs, &mut out.errors);

    let mut services: Vec<&Service> = inputs.services.iter().collect();
    services.sort_by_key(|s| ns_name(&s.metadata));
    for svc in services {
        let (ns, name) = ns_name(&svc.metadata);
        match translate_service(svc, by_service.get(&(ns.clone(), name.clone()))) {
            Ok(None) => out.skipped.push(format!("{ns}/{name}")),
            Ok(Some(frontends)) => {
                // A frontend already owned by another Service: reject this one whole, so no
                // Service is ever half-programmed (the earlier one in name order keeps it).
                if let Some((fe, _)) = frontends
                    .iter()
                    .find(|(fe, _)| out.state.services.contains_key(fe))
                {
                    out.errors.push(TranslateError {
                        object: format!("Service {ns}/{name}"),
                        field: "spec.clusterIPs".into(),
                        message: format!(
                            "frontend {fe} is already used by {}",
                            out.state.services[fe].name
                        ),
                    });
                    continue;
                }
                out.state.services.extend(frontends);
            }
            Err(e) => out.errors.push(e),
        }
    }
    out
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

/// `Ok(None)`: a Service this proxy does not handle. `Err`: rejected whole.
fn translate_service(
    svc: &Service,
    endpoints: Option<&ServiceEndpoints>,
) -> Result<Option<Vec<(Frontend, DesiredService)>>, TranslateError> {
    let (ns, name) = ns_name(&svc.metadata);
    let err = |field: String, message: String| TranslateError {
        object: format!("Service {ns}/{name}"),
        field,
        message,
    };
    if svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL))
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
                    format!("{field}[{i}]"),
                    format!("{ip:?} is not an IP address"),
                ));
            }
        }
    }

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

    let mut out = Vec::new();
    for (pname, port, proto) in checked {
        let display = if pname.is_empty() {
            format!("{ns}/{name}")
        } else {
            format!("{ns}/{name}:{pname}")
        };
        for vip in &vips {
            let eps = endpoints_for(endpoints, &pname, proto, vip.is_ipv4());
            if eps.len() > MAX_BACKENDS_PER_SERVICE as usize {
                return Err(err(
                    "endpoints".into(),
                    format!(
                        "{} endpoints for port {pname:?} exceed the per-Service limit of {MAX_BACKENDS_PER_SERVICE}",
                        eps.len()
                    ),
                ));
            }
            out.push((
                Frontend {
                    addr: *vip,
                    port,
                    protocol: proto,
                },
                DesiredService {
                    name: display.clone(),
                    kind: ServiceKind::ClusterIp,
                    endpoints: eps,
                    affinity_timeout_s,
                },
            ));
        }
    }
    Ok(Some(out))
}

/// Endpoints for one Service port: slice ports match Service ports by name and protocol (the
/// EndpointSlice controller already resolved targetPort, by number or by name, per Pod).
/// Ready endpoints win; with none ready, serving+terminating ones are used (KEP-1669).
fn endpoints_for(
    endpoints: Option<&ServiceEndpoints>,
    pname: &str,
    proto: Protocol,
    v4: bool,
) -> Vec<Endpoint> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for (ports, eps) in endpoints.map(|e| e.groups.as_slice()).unwrap_or(&[]) {
        let Some(&(_, _, port)) = ports.iter().find(|(n, p, _)| n == pname && *p == proto) else {
            continue;
        };
        for ep in eps.iter().filter(|e| e.addr.is_ipv4() == v4) {
            if ep.ready {
                ready.insert((ep.addr, port));
            } else if ep.serving && ep.terminating {
                terminating.insert((ep.addr, port));
            }
        }
    }
    let (set, state) = if ready.is_empty() {
        (terminating, EndpointState::Terminating)
    } else {
        (ready, EndpointState::Active)
    };
    set.into_iter()
        .map(|(addr, port)| Endpoint { addr, port, state })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let t = translate(&objs(WEB));
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
        ];
        for (what, spec) in cases {
            let labels = if what == "other proxy" {
                format!("labels: {{{SERVICE_PROXY_NAME_LABEL}: other}}")
            } else {
                String::new()
            };
            let y = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: n, {labels}}}\n{spec}\n"
            );
            let t = translate(&objs(&y));
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
                "spec.clusterIP[0]",
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
            let t = translate(&objs(&y));
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
        let t = translate(&objs(&y));
        assert_eq!(t.errors.len(), 1);
        assert_eq!(t.errors[0].object, "Service default/zzz");
        assert!(
            !t.state
                .services
                .contains_key(&fe("198.18.100.10", 81, Protocol::Tcp))
        );
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
        let t = translate(&objs(y));
        let f = fe("198.18.100.20", 80, Protocol::Tcp);
        assert_eq!(backends(&t, f), ["198.19.1.5:8080:Terminating"]);
        let with_ready = y.replace(
            "- addresses: [198.19.1.6]\n  conditions: {ready: false, serving: false, terminating: true}",
            "- addresses: [198.19.1.7]",
        );
        let t = translate(&objs(&with_ready));
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
        let t = translate(&objs(y));
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert_eq!(
            backends(&t, fe("198.18.100.30", 5432, Protocol::Tcp)),
            ["198.19.1.9:15432:Active", "198.19.2.9:15432:Active"]
        );
        // With a selector, the Endpoints object is ignored (the slice controller owns it).
        let t = translate(&objs(&y.replace(
            "ports: [{name: db, port: 5432}]}",
            "selector: {a: b}, ports: [{name: db, port: 5432}]}",
        )));
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
        let t = translate(&objs(y));
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
            let t = translate(&objs(&format!("{base}{tail}\n")));
            let s = &t.state.services[&fe("198.18.100.50", 80, Protocol::Tcp)];
            assert_eq!(s.affinity_timeout_s, want, "{tail}");
        }
    }
}

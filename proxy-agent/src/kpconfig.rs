//! kube-proxy's own configuration file (`KubeProxyConfiguration`,
//! kubeproxy.config.k8s.io/v1alpha1, as kubeadm writes it into the kube-proxy ConfigMap), read
//! into the agent's settings: what maps onto an agent setting is applied (flags given on the
//! command line win), what means nothing here is named once in the log, and an unknown field or a
//! wrong type is an error that names it.
//!
//! kube-proxy treats a zero value (`""`, `0s`, `null`) as "use the default"; so does this file:
//! only fields set to something else change a setting or earn a log line.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// A Go `time.Duration` string as metav1.Duration serialises it ("1h2m3s", "300ms", "0s").
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_go_duration(&s)
            .map(GoDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses Go's duration syntax: a sequence of decimal numbers with units ns, us (µs), ms, s,
/// m, h; "0" alone is allowed. Negative durations are refused (no field here takes one).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (want e.g. \"30s\", \"1m30s\", \"24h0m0s\")");
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() || t.starts_with('-') {
        return Err(bad());
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f32>,
    pub burst: Option<i32>,
}

/// iptables and nftables sections (nftables has no localhostNodePorts / snatNodeInternalIP).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RulesSection {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpvsSection {
    pub sync_period: Option<GoDuration>,
    pub min_sync_period: Option<GoDuration>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<GoDuration>,
    pub tcp_fin_timeout: Option<GoDuration>,
    pub udp_timeout: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WinkernelSection {
    pub network_name: Option<String>,
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub root_hns_endpoint_name: Option<String>,
    pub forward_health_check_vip: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConntrackSection {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<GoDuration>,
    pub tcp_close_wait_timeout: Option<GoDuration>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<GoDuration>,
    pub udp_stream_timeout: Option<GoDuration>,
}

/// The file as written (v1alpha1). Every field of the upstream type is known, so that an
/// unknown one is an error; `logging` is component-base's LoggingConfiguration, kept opaque.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnection>,
    pub logging: Option<serde_yaml::Value>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<RulesSection>,
    pub ipvs: Option<IpvsSection>,
    pub nftables: Option<RulesSection>,
    pub winkernel: Option<WinkernelSection>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<ConntrackSection>,
    pub config_sync_period: Option<GoDuration>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
}

/// What the file asks of the agent. `None`: the file leaves that setting to the flag (or its
/// default).
#[derive(Debug, Default, PartialEq)]
pub struct Settings {
    /// hostnameOverride (lowercased and trimmed, as kube-proxy does) -> --node-name.
    pub node_name: Option<String>,
    /// clientConnection.kubeconfig -> --kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// healthzBindAddress -> --healthz-bind-address.
    pub healthz_bind_address: Option<String>,
    /// metricsBindAddress -> --metrics-bind-address.
    pub metrics_bind_address: Option<String>,
    /// nodePortAddresses (keywords expanded) -> --nodeport-addresses.
    pub nodeport_addresses: Option<Vec<String>>,
    /// detectLocal (BridgeInterface / InterfaceNamePrefix modes) -> --pod-interfaces.
    pub pod_interfaces: Option<Vec<String>>,
    /// <mode>.syncPeriod -> --resync-period-s.
    pub sync_period: Option<Duration>,
    /// <mode>.minSyncPeriod: the least time between two syncs.
    pub min_sync_period: Option<Duration>,
    /// conntrack.tcpEstablishedTimeout.
    pub tcp_established_timeout: Option<Duration>,
    /// conntrack.tcpCloseWaitTimeout.
    pub tcp_close_wait_timeout: Option<Duration>,
    /// conntrack.udpTimeout.
    pub udp_timeout: Option<Duration>,
    /// conntrack.udpStreamTimeout.
    pub udp_stream_timeout: Option<Duration>,
    /// conntrack.maxPerCore x CPUs, at least conntrack.min: flows the conntrack map must hold.
    pub conntrack_max_flows: Option<u32>,
    /// oomScoreAdj, written to /proc/self/oom_score_adj at start.
    pub oom_score_adj: Option<i32>,
    /// bindAddressHardFail: failing to serve healthz or metrics stops the agent.
    pub bind_address_hard_fail: bool,
    /// Fields that are set but mean nothing here: (field path, why), logged once at start.
    pub no_effect: Vec<(String, String)>,
}

/// An error that names the field (or the document) it is about.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

fn set<T: PartialEq + Default>(v: &Option<T>) -> Option<&T> {
    v.as_ref().filter(|x| **x != T::default())
}

fn dur(v: &Option<GoDuration>) -> Option<Duration> {
    v.filter(|d| !d.0.is_zero()).map(|d| d.0)
}

/// Reads and interprets a KubeProxyConfiguration file.
pub fn load(path: &std::path::Path, cpus: u32) -> Result<Settings, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        message: format!("reading: {e}"),
    })?;
    parse(&text, cpus).map_err(|message| ConfigError { file, message })
}

/// Interprets the text of a KubeProxyConfiguration (`cpus`: for conntrack.maxPerCore).
pub fn parse(text: &str, cpus: u32) -> Result<Settings, String> {
    // serde_path_to_error names the whole path of a bad field ("iptables.syncPeriod").
    let c: KubeProxyConfiguration = serde_path_to_error::deserialize(
        serde_yaml::Deserializer::from_str(text),
    )
    .map_err(|e| {
        // serde_yaml prefixes the parent's path; the full one replaces it.
        let inner = e.inner().to_string();
        let msg = match inner.split_once(": ") {
            Some((p, rest)) if !p.contains(' ') => rest.to_string(),
            _ => inner,
        };
        match e.path().to_string().as_str() {
            "." => msg,
            path => format!("{path}: {msg}"),
        }
    })?;
    match c.api_version.as_deref() {
        Some(API_VERSION) => {}
        other => {
            return Err(format!(
                "apiVersion: {other:?}, want {API_VERSION:?} (the only version kube-proxy reads)"
            ));
        }
    }
    match c.kind.as_deref() {
        Some(KIND) => {}
        other => return Err(format!("kind: {other:?}, want {KIND:?}")),
    }
    let mut s = Settings::default();
    let mut no_effect = |field: &str, why: &str| s_push(&mut s.no_effect, field, why);

    if let Some(gates) = set(&c.feature_gates) {
        for (gate, on) in gates {
            no_effect(
                &format!("featureGates.{gate}"),
                &format!("kube-proxy feature gates do not apply here (set to {on})"),
            );
        }
    }
    if let Some(cc) = &c.client_connection {
        if let Some(k) = set(&cc.kubeconfig) {
            s.kubeconfig = Some(PathBuf::from(k));
        }
        if set(&cc.qps).is_some() || set(&cc.burst).is_some() {
            no_effect(
                "clientConnection.qps/burst",
                "the agent makes one list and one watch per resource, not rate-limited requests",
            );
        }
        if set(&cc.content_type).is_some() || set(&cc.accept_content_types).is_some() {
            no_effect(
                "clientConnection.contentType/acceptContentTypes",
                "the client always speaks JSON",
            );
        }
    }
    if c.logging.as_ref().is_some_and(has_non_zero) {
        no_effect(
            "logging",
            "use --log-level and --log-format (logging is set up before the file is read)",
        );
    }
    if let Some(h) = set(&c.hostname_override) {
        let h = h.trim().to_lowercase();
        if !h.is_empty() {
            s.node_name = Some(h);
        }
    }
    let bind: Option<std::net::IpAddr> = match set(&c.bind_address) {
        None => None,
        Some(b) => Some(
            b.parse()
                .map_err(|e| format!("bindAddress: {b:?} is not an IP address: {e}"))?,
        ),
    };
    let primary = bind.filter(|ip| !ip.is_unspecified());
    let v6 = bind.is_some_and(|ip| ip.is_ipv6());
    for (field, value, out, default) in [
        (
            "healthzBindAddress",
            &c.healthz_bind_address,
            &mut s.healthz_bind_address,
            if v6 { "[::]:10256" } else { "0.0.0.0:10256" },
        ),
        (
            "metricsBindAddress",
            &c.metrics_bind_address,
            &mut s.metrics_bind_address,
            if v6 { "[::1]:10249" } else { "127.0.0.1:10249" },
        ),
    ] {
        match set(value) {
            Some(a) => {
                a.parse::<std::net::SocketAddr>()
                    .map_err(|e| format!("{field}: {a:?} is not IP:port: {e}"))?;
                *out = Some(a.clone());
            }
            // kube-proxy's defaults follow bindAddress's family.
            None if v6 => *out = Some(default.to_string()),
            None => {}
        }
    }
    s.bind_address_hard_fail = c.bind_address_hard_fail.unwrap_or(false);
    if c.enable_profiling == Some(true) {
        no_effect("enableProfiling", "the agent serves no pprof handlers");
    }
    if let Some(v) = set(&c.show_hidden_metrics_for_version) {
        no_effect(
            "showHiddenMetricsForVersion",
            &format!("the agent hides no deprecated metrics (asked for {v})"),
        );
    }
    let mode = set(&c.mode).map(String::as_str).unwrap_or("");
    match mode {
        "" | "iptables" | "nftables" | "ipvs" => {}
        "kernelspace" => return Err("mode: \"kernelspace\" is Windows only".into()),
        m => {
            return Err(format!(
                "mode: {m:?} is not a kube-proxy mode (iptables, ipvs, nftables, kernelspace)"
            ));
        }
    }
    if !mode.is_empty() {
        no_effect(
            "mode",
            &format!("the eBPF datapath replaces every mode (was {mode:?})"),
        );
    }
    // The sync periods of the mode kube-proxy would have run (iptables by default on Linux).
    let (active, active_name, other, other_name) = if mode == "nftables" {
        (&c.nftables, "nftables", &c.iptables, "iptables")
    } else {
        (&c.iptables, "iptables", &c.nftables, "nftables")
    };
    if let Some(r) = active {
        s.sync_period = dur(&r.sync_period);
        s.min_sync_period = dur(&r.min_sync_period);
        rules_no_effect(r, active_name, &mut s.no_effect);
    }
    if let Some(r) = other {
        if dur(&r.sync_period).is_some() || dur(&r.min_sync_period).is_some() {
            s_push(
                &mut s.no_effect,
                &format!("{other_name}.syncPeriod/minSyncPeriod"),
                &format!("only the {active_name} section's periods apply (mode {mode:?})"),
            );
        }
        rules_no_effect(r, other_name, &mut s.no_effect);
    }
    if let Some(ipvs) = &c.ipvs
        && (dur(&ipvs.sync_period).is_some()
            || dur(&ipvs.min_sync_period).is_some()
            || set(&ipvs.scheduler).is_some()
            || set(&ipvs.exclude_cidrs).is_some()
            || ipvs.strict_arp == Some(true)
            || dur(&ipvs.tcp_timeout).is_some()
            || dur(&ipvs.tcp_fin_timeout).is_some()
            || dur(&ipvs.udp_timeout).is_some())
    {
        s_push(&mut s.no_effect, "ipvs", "there is no IPVS here");
    }
    if let Some(w) = &c.winkernel
        && (set(&w.network_name).is_some()
            || set(&w.source_vip).is_some()
            || w.enable_dsr == Some(true)
            || set(&w.root_hns_endpoint_name).is_some()
            || w.forward_health_check_vip == Some(true))
    {
        s_push(&mut s.no_effect, "winkernel", "Windows only");
    }
    let detect = c.detect_local.unwrap_or_default();
    match set(&c.detect_local_mode).map(String::as_str).unwrap_or("") {
        "" | "ClusterCIDR" | "NodeCIDR" => {
            if set(&c.cluster_cidr).is_some() {
                s_push(
                    &mut s.no_effect,
                    "clusterCIDR",
                    "pod traffic is told apart by interface (--pod-interfaces); traffic to cluster IPs from outside the cluster is not masqueraded",
                );
            }
        }
        "BridgeInterface" => {
            let b = set(&detect.bridge_interface).ok_or(
                "detectLocal.bridgeInterface: required with detectLocalMode BridgeInterface",
            )?;
            s.pod_interfaces = Some(vec![b.clone()]);
        }
        "InterfaceNamePrefix" => {
            let p = set(&detect.interface_name_prefix).ok_or(
                "detectLocal.interfaceNamePrefix: required with detectLocalMode InterfaceNamePrefix",
            )?;
            s.pod_interfaces = Some(vec![format!("{}*", glob::Pattern::escape(p))]);
        }
        m => {
            return Err(format!(
                "detectLocalMode: {m:?} is not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix"
            ));
        }
    }
    if let Some(list) = set(&c.node_port_addresses) {
        let mut cidrs = Vec::new();
        let mut all = false;
        for a in list {
            match a.as_str() {
                "all" => all = true,
                "primary" => match primary {
                    Some(ip) => cidrs.push(format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })),
                    None => {
                        s_push(
                            &mut s.no_effect,
                            "nodePortAddresses: primary",
                            "the node's primary IPs are not known without bindAddress: NodePorts are served on every --interfaces address",
                        );
                        all = true;
                    }
                },
                "localhost" => s_push(
                    &mut s.no_effect,
                    "nodePortAddresses: localhost",
                    "NodePorts are not served on loopback addresses",
                ),
                cidr => {
                    cidr.parse::<crate::datapath::external::Cidr>()
                        .map_err(|e| format!("nodePortAddresses: {cidr:?}: {e}"))?;
                    cidrs.push(cidr.to_string());
                }
            }
        }
        s.nodeport_addresses = Some(if all { Vec::new() } else { cidrs });
    }
    if let Some(v) = c.oom_score_adj {
        if !(-1000..=1000).contains(&v) {
            return Err(format!("oomScoreAdj: {v} is outside -1000..1000"));
        }
        s.oom_score_adj = Some(v);
    }
    if let Some(ct) = &c.conntrack {
        s.tcp_established_timeout = dur(&ct.tcp_established_timeout);
        s.tcp_close_wait_timeout = dur(&ct.tcp_close_wait_timeout);
        s.udp_timeout = dur(&ct.udp_timeout);
        s.udp_stream_timeout = dur(&ct.udp_stream_timeout);
        // kube-proxy: nf_conntrack_max = max(maxPerCore x CPUs, min); maxPerCore 0 leaves it.
        if let Some(per_core) = ct.max_per_core.filter(|v| *v > 0) {
            let max = (per_core as u64 * cpus.max(1) as u64).max(ct.min.unwrap_or(0).max(0) as u64);
            s.conntrack_max_flows = Some(max.min(u32::MAX as u64 / 2) as u32);
        }
        if ct.tcp_be_liberal == Some(true) {
            s_push(
                &mut s.no_effect,
                "conntrack.tcpBeLiberal",
                "the datapath's conntrack never marks out-of-window packets invalid",
            );
        }
    }
    if dur(&c.config_sync_period).is_some() {
        s_push(
            &mut s.no_effect,
            "configSyncPeriod",
            "the watches stream every change; --resync-period-s repairs the maps",
        );
    }
    if set(&c.port_range).is_some() {
        s_push(&mut s.no_effect, "portRange", "unused by kube-proxy too");
    }
    if c.windows_run_as_service == Some(true) {
        s_push(&mut s.no_effect, "windowsRunAsService", "Windows only");
    }
    Ok(s)
}

fn s_push(v: &mut Vec<(String, String)>, field: &str, why: &str) {
    v.push((field.to_string(), why.to_string()));
}

fn rules_no_effect(r: &RulesSection, name: &str, out: &mut Vec<(String, String)>) {
    if r.masquerade_all == Some(true) {
        s_push(
            out,
            &format!("{name}.masqueradeAll"),
            "cluster-IP traffic is not masqueraded (socket LB keeps the client address)",
        );
    }
    if r.masquerade_bit.is_some() {
        s_push(
            out,
            &format!("{name}.masqueradeBit"),
            "no fwmark is used: SNAT is decided in the datapath",
        );
    }
    if r.localhost_node_ports == Some(true) {
        s_push(
            out,
            &format!("{name}.localhostNodePorts"),
            "NodePorts are not served on loopback addresses",
        );
    }
    if r.snat_node_internal_ip == Some(true) {
        s_push(
            out,
            &format!("{name}.snatNodeInternalIP"),
            "SNAT uses the address of the --interfaces interface the packet arrived on",
        );
    }
}

/// True when a YAML value holds anything but zero values (for opaque sections).
fn has_non_zero(v: &serde_yaml::Value) -> bool {
    use serde_yaml::Value as V;
    match v {
        V::Null => false,
        V::Bool(b) => *b,
        V::Number(n) => n.as_f64() != Some(0.0),
        V::String(s) => !(s.is_empty() || s == "0" || s == "0s"),
        V::Sequence(s) => s.iter().any(has_non_zero),
        V::Mapping(m) => m.values().any(has_non_zero),
        V::Tagged(t) => has_non_zero(&t.value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubeadm init` writes into the kube-proxy ConfigMap's config.conf (v1.31), verbatim
    /// but for clusterCIDR.
    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 198.19.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn go_durations() {
        for (s, want) in [
            ("0", 0.0),
            ("0s", 0.0),
            ("30s", 30.0),
            ("1m30s", 90.0),
            ("24h0m0s", 86400.0),
            ("1h", 3600.0),
            ("300ms", 0.3),
            ("1.5s", 1.5),
            ("2h22m", 8520.0),
            ("100us", 0.0001),
        ] {
            assert_eq!(
                parse_go_duration(s),
                Ok(Duration::from_secs_f64(want)),
                "{s}"
            );
        }
        for s in ["", "s", "10", "5x", "-1s", "1m-1s", "abc"] {
            assert!(parse_go_duration(s).is_err(), "{s} accepted");
        }
    }

    #[test]
    fn kubeadm_default_changes_only_the_kubeconfig() {
        let s = parse(KUBEADM, 4).unwrap();
        assert_eq!(
            s.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        let fields: Vec<&str> = s.no_effect.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["clusterCIDR"]);
        assert_eq!(
            Settings {
                kubeconfig: None,
                no_effect: Vec::new(),
                ..s
            },
            Settings::default()
        );
    }

    /// Table: one field set at a time on top of kubeadm's file -> the setting it changes.
    #[test]
    fn each_field_maps_to_its_setting() {
        fn d(s: u64) -> Duration {
            Duration::from_secs(s)
        }
        type Check = fn(&Settings) -> bool;
        let cases: &[(&str, &str, Check)] = &[
            ("hostnameOverride", "hostnameOverride: ' Node-1 '", |s| {
                s.node_name.as_deref() == Some("node-1")
            }),
            (
                "healthzBindAddress",
                "healthzBindAddress: 127.0.0.1:20256",
                |s| s.healthz_bind_address.as_deref() == Some("127.0.0.1:20256"),
            ),
            (
                "metricsBindAddress",
                "metricsBindAddress: 0.0.0.0:10249",
                |s| s.metrics_bind_address.as_deref() == Some("0.0.0.0:10249"),
            ),
            (
                "bindAddress v6 moves the defaults",
                "bindAddress: '::'",
                |s| {
                    s.healthz_bind_address.as_deref() == Some("[::]:10256")
                        && s.metrics_bind_address.as_deref() == Some("[::1]:10249")
                },
            ),
            (
                "nodePortAddresses CIDRs",
                "nodePortAddresses: [198.18.0.0/24, 'fd00::/64']",
                |s| {
                    s.nodeport_addresses
                        == Some(vec!["198.18.0.0/24".to_string(), "fd00::/64".to_string()])
                },
            ),
            (
                "nodePortAddresses all",
                "nodePortAddresses: [all, 198.18.0.0/24]",
                |s| s.nodeport_addresses == Some(vec![]),
            ),
            (
                "nodePortAddresses primary with bindAddress",
                "nodePortAddresses: [primary]\nbindAddress: 198.18.0.1",
                |s| s.nodeport_addresses == Some(vec!["198.18.0.1/32".to_string()]),
            ),
            (
                "detectLocalMode InterfaceNamePrefix",
                "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: veth}",
                |s| s.pod_interfaces == Some(vec!["veth*".to_string()]),
            ),
            (
                "detectLocalMode BridgeInterface",
                "detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: cbr0}",
                |s| s.pod_interfaces == Some(vec!["cbr0".to_string()]),
            ),
            (
                "iptables periods",
                "iptables: {syncPeriod: 30s, minSyncPeriod: 1s}",
                |s| s.sync_period == Some(d(30)) && s.min_sync_period == Some(d(1)),
            ),
            (
                "nftables periods in nftables mode",
                "mode: nftables\nnftables: {syncPeriod: 45s, minSyncPeriod: 2s}\niptables: {syncPeriod: 5s}",
                |s| s.sync_period == Some(d(45)) && s.min_sync_period == Some(d(2)),
            ),
            (
                "conntrack timeouts",
                "conntrack: {tcpEstablishedTimeout: 24h0m0s, tcpCloseWaitTimeout: 1h0m0s, udpTimeout: 30s, udpStreamTimeout: 2m0s}",
                |s| {
                    s.tcp_established_timeout == Some(d(86400))
                        && s.tcp_close_wait_timeout == Some(d(3600))
                        && s.udp_timeout == Some(d(30))
                        && s.udp_stream_timeout == Some(d(120))
                },
            ),
            (
                "conntrack maxPerCore x CPUs",
                "conntrack: {maxPerCore: 32768, min: 131072}",
                |s| s.conntrack_max_flows == Some(131072),
            ),
            (
                "conntrack maxPerCore above min",
                "conntrack: {maxPerCore: 65536, min: 131072}",
                |s| s.conntrack_max_flows == Some(262144),
            ),
            ("oomScoreAdj", "oomScoreAdj: -999", |s| {
                s.oom_score_adj == Some(-999)
            }),
            ("bindAddressHardFail", "bindAddressHardFail: true", |s| {
                s.bind_address_hard_fail
            }),
            (
                "clientConnection.kubeconfig",
                "clientConnection: {kubeconfig: /etc/kp.conf}",
                |s| s.kubeconfig == Some(PathBuf::from("/etc/kp.conf")),
            ),
        ];
        for (what, extra, check) in cases {
            let text = merge(KUBEADM, extra);
            let s = parse(&text, 4).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(check(&s), "{what}: {s:#?}");
        }
    }

    #[test]
    fn fields_without_effect_are_named() {
        for (extra, field) in [
            ("mode: ipvs", "mode"),
            ("ipvs: {scheduler: rr}", "ipvs"),
            ("iptables: {masqueradeAll: true}", "iptables.masqueradeAll"),
            ("iptables: {masqueradeBit: 14}", "iptables.masqueradeBit"),
            (
                "showHiddenMetricsForVersion: '1.30'",
                "showHiddenMetricsForVersion",
            ),
            ("featureGates: {Foo: true}", "featureGates.Foo"),
            (
                "clientConnection: {qps: 5, burst: 10}",
                "clientConnection.qps/burst",
            ),
            ("configSyncPeriod: 15m0s", "configSyncPeriod"),
            ("enableProfiling: true", "enableProfiling"),
            ("logging: {verbosity: 4}", "logging"),
            ("conntrack: {tcpBeLiberal: true}", "conntrack.tcpBeLiberal"),
            ("nodePortAddresses: [primary]", "nodePortAddresses: primary"),
        ] {
            let s = parse(&merge(KUBEADM, extra), 2).unwrap_or_else(|e| panic!("{extra}: {e}"));
            assert!(
                s.no_effect.iter().any(|(f, _)| f == field),
                "{extra}: {:?}",
                s.no_effect
            );
        }
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_named() {
        for (extra, named) in [
            ("bogusField: 1", "bogusField"),
            ("iptables: {syncPeriodd: 1s}", "syncPeriodd"),
            ("conntrack: {maxPerCore: lots}", "conntrack.maxPerCore"),
            ("iptables: {syncPeriod: 5 minutes}", "iptables.syncPeriod"),
            ("oomScoreAdj: 5000", "oomScoreAdj"),
            ("healthzBindAddress: localhost", "healthzBindAddress"),
            ("bindAddress: nowhere", "bindAddress"),
            ("nodePortAddresses: [300.1.2.3/8]", "nodePortAddresses"),
            ("mode: userspace", "mode"),
            (
                "detectLocalMode: BridgeInterface",
                "detectLocal.bridgeInterface",
            ),
            ("detectLocalMode: Magic", "detectLocalMode"),
        ] {
            let err = parse(&merge(KUBEADM, extra), 2).expect_err(extra);
            assert!(
                err.contains(named),
                "{extra}: error {err:?} does not name {named}"
            );
        }
        let wrong_kind =
            KUBEADM.replace("kind: KubeProxyConfiguration", "kind: KubeletConfiguration");
        assert!(parse(&wrong_kind, 2).unwrap_err().contains("kind"));
        let wrong_version = KUBEADM.replace("v1alpha1", "v1beta1");
        assert!(parse(&wrong_version, 2).unwrap_err().contains("apiVersion"));
    }

    /// `base` with the top-level keys of `extra` replacing base's (a line-wise merge of
    /// top-level YAML keys, enough for these tests).
    fn merge(base: &str, extra: &str) -> String {
        let extra_keys: Vec<&str> = extra
            .lines()
            .filter_map(|l| l.split(':').next())
            .filter(|k| !k.starts_with(' '))
            .collect();
        let mut out = String::new();
        let mut skipping = false;
        for line in base.lines() {
            if !line.starts_with(' ') {
                let key = line.split(':').next().unwrap_or("");
                skipping = extra_keys.contains(&key);
            }
            if !skipping {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str(extra);
        out.push('\n');
        out
    }
}

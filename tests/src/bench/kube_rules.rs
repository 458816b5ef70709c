//! kube-proxy's rules for a set of ClusterIP and NodePort Services, written the way kube-proxy
//! writes them: the iptables mode's `iptables-restore --noflush` input (KUBE-SERVICES ->
//! KUBE-SVC-* with `-m statistic --mode random --probability` -> KUBE-SEP-* DNAT; NodePorts as
//! KUBE-NODEPORTS -> KUBE-EXT-* (masquerade mark) -> KUBE-SVC-*; chain names from SHA-256 and
//! base32 as in pkg/proxy/iptables) and the nftables mode's `nft -f` transactions (table
//! `ip kube-proxy`, the `service-ips` verdict map, one chain per Service port with
//! `numgen random mod N vmap`, one chain per endpoint with `dnat`; NodePorts as
//! `service-nodeports` map elements -> `external-*` chains; as in pkg/proxy/nftables). Every
//! NodePort Service has externalTrafficPolicy Cluster.
//!
//! Full syncs and the partial syncs that follow one change are both reproduced: kube-proxy's
//! iptables mode rewrites every top-level chain (all of KUBE-SERVICES) plus the chains of the
//! changed Service; its nftables mode sends only the changed chains and map elements.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::workload::{CLUSTER_CIDR, SERVICE_CIDRS, Svc};

// ---------------------------------------------------------------------------------------------
// SHA-256 and base32 (RFC 4648 standard alphabet), for kube-proxy's chain names.

fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, v) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// The first `n` characters of base32(sha256(s)) (n <= 48, no padding reached).
fn hash_b32(s: &str, n: usize) -> String {
    const ALPHA: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let h = sha256(s.as_bytes());
    let mut out = String::with_capacity(n);
    let (mut acc, mut bits) = (0u64, 0u32);
    for b in h {
        acc = (acc << 8) | b as u64;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHA[((acc >> bits) & 31) as usize] as char);
            if out.len() == n {
                return out;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// iptables mode

/// `KUBE-SVC-...` of a Service port (`ns/name:port`, protocol `tcp`/`udp`).
pub fn svc_chain(port_name: &str, proto: &str) -> String {
    format!("KUBE-SVC-{}", hash_b32(&format!("{port_name}{proto}"), 16))
}

/// `KUBE-EXT-...` of a Service port: where its external destinations (here its nodePort) jump.
/// The same hash as its KUBE-SVC chain (kube-proxy's serviceExternalChainName).
pub fn ext_chain(port_name: &str, proto: &str) -> String {
    format!("KUBE-EXT-{}", hash_b32(&format!("{port_name}{proto}"), 16))
}

/// `KUBE-SEP-...` of one endpoint (`ip:port`) of a Service port.
pub fn sep_chain(port_name: &str, proto: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash_b32(&format!("{port_name}{proto}{endpoint}"), 16)
    )
}

/// kube-proxy drops the per-endpoint comments above 1,000 endpoints ("large cluster mode").
pub fn large_cluster(total_endpoints: usize) -> bool {
    total_endpoints > 1000
}

fn total_endpoints(svcs: &[Svc]) -> usize {
    svcs.iter().map(|s| s.ports.len() * s.endpoints.len()).sum()
}

/// The chains kube-proxy declares (`-N`) and the jump rules it inserts into the built-in
/// chains before its first restore, written as a full restore (no `--noflush`): this also
/// empties the tables, so it is the bench's "back to empty" step too.
pub fn ipt_base() -> String {
    let mut o = String::new();
    o.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(o, ":{c} - [0:0]");
    }
    o.push_str(concat!(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "COMMIT\n",
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
        ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        "COMMIT\n",
    ));
    o
}

/// Which Services' own chains a sync writes, and which stale chains it deletes.
pub struct IptSync<'a> {
    /// Every Service after the change (KUBE-SERVICES lists all of them).
    pub all: &'a [Svc],
    /// Services whose KUBE-SVC/KUBE-SEP chains are (re)written: all of them in a full sync.
    pub changed: &'a [&'a Svc],
    /// Chains to flush and delete (`:CHAIN` then `-X CHAIN`).
    pub stale: Vec<String>,
    /// Large-cluster mode (no per-endpoint comments); see [`large_cluster`].
    pub large: bool,
}

impl<'a> IptSync<'a> {
    pub fn new(all: &'a [Svc], changed: &'a [&'a Svc], stale: Vec<String>) -> Self {
        IptSync {
            all,
            changed,
            stale,
            large: large_cluster(total_endpoints(all)),
        }
    }
}

/// One `iptables-restore --noflush` input, as kube-proxy's syncProxyRules writes it.
pub fn ipt_restore(sync: &IptSync) -> String {
    let large = sync.large;
    let mut chains = String::new();
    let mut rules = String::with_capacity(sync.all.len() * 160);
    let mut own = String::with_capacity(sync.changed.len() * 700);

    let mut o = String::new();
    o.push_str("*filter\n");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(o, ":{c} - [0:0]");
    }
    o.push_str(concat!(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n*nat\n",
        ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    ));
    rules.push_str(concat!(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    ));
    let changed = |s: &Svc| sync.changed.iter().any(|c| c.name == s.name);
    for s in sync.all {
        for p in &s.ports {
            let pn = s.port_name(p);
            let proto = p.proto_lower();
            let svc = svc_chain(&pn, proto);
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -m comment --comment \"{pn} cluster IP\" -m {proto} -p {proto} -d {} --dport {} -j {svc}",
                s.vip, p.port
            );
            let ext = ext_chain(&pn, proto);
            if let Some(np) = p.node_port {
                let _ = writeln!(
                    rules,
                    "-A KUBE-NODEPORTS -m comment --comment {pn} -m {proto} -p {proto} --dport {np} -j {ext}"
                );
            }
            if !changed(s) {
                continue;
            }
            if p.node_port.is_some() {
                let _ = writeln!(chains, ":{ext} - [0:0]");
            }
            let _ = writeln!(chains, ":{svc} - [0:0]");
            let _ = writeln!(
                own,
                "-A {svc} -m comment --comment \"{pn} cluster IP\" -m {proto} -p {proto} -d {} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
                s.vip, p.port
            );
            if p.node_port.is_some() {
                // externalTrafficPolicy Cluster: the endpoints may be on other nodes, so the
                // traffic is masqueraded, then takes the Service's cluster policy chain.
                let _ = writeln!(
                    own,
                    "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(own, "-A {ext} -j {svc}");
            }
            let n = s.endpoints.len();
            let mut seps = String::new();
            for (i, ep) in s.endpoints.iter().enumerate() {
                let epstr = format!("{ep}:{}", p.target);
                let sep = sep_chain(&pn, proto, &epstr);
                let _ = writeln!(chains, ":{sep} - [0:0]");
                let _ = write!(own, "-A {svc} ");
                if !large {
                    let _ = write!(own, "-m comment --comment \"{pn} -> {epstr}\" ");
                }
                if i < n - 1 {
                    let _ = write!(
                        own,
                        "-m statistic --mode random --probability {:.10} ",
                        1.0 / (n - i) as f64
                    );
                }
                let _ = writeln!(own, "-j {sep}");
                let comment = if large {
                    String::new()
                } else {
                    format!("-m comment --comment {pn} ")
                };
                let _ = writeln!(seps, "-A {sep} {comment}-s {ep} -j KUBE-MARK-MASQ");
                let _ = writeln!(
                    seps,
                    "-A {sep} {comment}-m {proto} -p {proto} -j DNAT --to-destination {epstr}"
                );
            }
            own.push_str(&seps);
        }
    }
    for c in &sync.stale {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    o.push_str(&chains);
    o.push_str(&rules);
    o.push_str(&own);
    for c in &sync.stale {
        let _ = writeln!(o, "-X {c}");
    }
    o.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n");
    o
}

/// Every KUBE-SVC, KUBE-EXT and KUBE-SEP chain of a Service.
pub fn ipt_chains(s: &Svc) -> Vec<String> {
    let mut v = Vec::new();
    for p in &s.ports {
        let pn = s.port_name(p);
        let proto = p.proto_lower();
        if p.node_port.is_some() {
            v.push(ext_chain(&pn, proto));
        }
        v.push(svc_chain(&pn, proto));
        for ep in &s.endpoints {
            v.push(sep_chain(&pn, proto, &format!("{ep}:{}", p.target)));
        }
    }
    v
}

/// A full sync's input for `svcs` split into restores of `per` Services each, appending to
/// KUBE-SERVICES: the same final ruleset, loaded in pieces (only used to get the rules in
/// place for traffic when the one-shot load is over its time limit).
pub fn ipt_chunks(svcs: &[Svc], per: usize) -> Vec<String> {
    let large = large_cluster(total_endpoints(svcs));
    let mut out = Vec::new();
    for (k, chunk) in svcs.chunks(per).enumerate() {
        let refs: Vec<&Svc> = chunk.iter().collect();
        // Comments as for the whole set (large-cluster mode is decided on all endpoints).
        let sync = IptSync {
            large,
            ..IptSync::new(chunk, &refs, vec![])
        };
        let text = ipt_restore(&sync);
        // Keep everything but the top-level chain declarations and rules after the first
        // chunk; never re-declare KUBE-SERVICES (that would flush it).
        let mut kept = String::new();
        let mut table = "";
        for line in text.lines() {
            if line.starts_with('*') {
                table = line;
            }
            let top = [
                ":KUBE-SERVICES ",
                ":KUBE-NODEPORTS ",
                ":KUBE-POSTROUTING ",
                ":KUBE-MARK-MASQ ",
                ":KUBE-EXTERNAL-SERVICES ",
                ":KUBE-FORWARD ",
                ":KUBE-PROXY-FIREWALL ",
                "-A KUBE-POSTROUTING ",
                "-A KUBE-MARK-MASQ ",
                "-A KUBE-FORWARD ",
            ]
            .iter()
            .any(|p| line.starts_with(p));
            let nodeports_last = line.contains("must be the last rule in this chain");
            if table == "*filter" && k > 0 {
                continue;
            }
            if k > 0 && top {
                continue;
            }
            if nodeports_last {
                continue;
            }
            kept.push_str(line);
            kept.push('\n');
        }
        out.push(kept);
    }
    if let Some(last) = out.last_mut() {
        let end = last.rfind("COMMIT").unwrap_or(last.len());
        last.insert_str(end, "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// nftables mode

const T: &str = "ip kube-proxy";

fn hash_and_truncate(name: &str) -> String {
    let n = format!("{}-{name}", hash_b32(name, 8));
    if n.len() > 200 {
        format!("{}...", &n[..197])
    } else {
        n
    }
}

/// `service-XXXXXXXX-ns/name/proto/port`.
pub fn nft_service_chain(s: &Svc, p: &super::workload::PortDef) -> String {
    format!(
        "service-{}",
        hash_and_truncate(&nft_base(s, p.proto_lower(), p.name))
    )
}

/// `external-XXXXXXXX-ns/name/proto/port`: where the Service port's nodePort leads.
pub fn nft_external_chain(s: &Svc, p: &super::workload::PortDef) -> String {
    format!(
        "external-{}",
        hash_and_truncate(&nft_base(s, p.proto_lower(), p.name))
    )
}

fn nft_base(s: &Svc, proto: &str, port: &str) -> String {
    format!("{}/{}/{proto}/{port}", super::workload::NAMESPACE, s.name)
}

/// `endpoint-XXXXXXXX-ns/name/proto/port__ip/port`.
pub fn nft_endpoint_chain(
    s: &Svc,
    p: &super::workload::PortDef,
    ep: Ipv4Addr,
    target: u16,
) -> String {
    format!(
        "endpoint-{}",
        hash_and_truncate(&format!(
            "{}__{ep}/{target}",
            nft_base(s, p.proto_lower(), p.name)
        ))
    )
}

/// The table, its sets, maps, base chains and rules (kube-proxy's first sync writes these).
pub fn nft_base_rules(node_ip: Ipv4Addr) -> String {
    let cidrs = SERVICE_CIDRS.join(", ");
    format!(
        r#"add table {T} {{ comment "rules for kube-proxy" ; }}
add set {T} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}
add set {T} nodeport-ips {{ type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }}
add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }}
add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }}
add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }}
add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}
add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }}
add chain {T} cluster-ips-check
add chain {T} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}
add chain {T} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}
add chain {T} filter-forward {{ type filter hook forward priority 0 ; }}
add chain {T} filter-input {{ type filter hook input priority 0 ; }}
add chain {T} filter-output {{ type filter hook output priority 0 ; }}
add chain {T} firewall-check
add chain {T} mark-for-masquerade
add chain {T} masquerading
add chain {T} nat-output {{ type nat hook output priority -100 ; }}
add chain {T} nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add chain {T} nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add chain {T} nodeport-endpoints-check
add chain {T} reject-chain {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}
add chain {T} services
add chain {T} service-endpoints-check
add rule {T} cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule {T} cluster-ips-check ip daddr {{ {cidrs} }} drop comment "Drop traffic to unallocated ClusterIPs"
add rule {T} filter-prerouting-pre-dnat ct state new jump firewall-check
add rule {T} filter-forward ct state new jump service-endpoints-check
add rule {T} filter-forward ct state new jump cluster-ips-check
add rule {T} filter-input ct state new jump nodeport-endpoints-check
add rule {T} filter-input ct state new jump service-endpoints-check
add rule {T} filter-output ct state new jump service-endpoints-check
add rule {T} filter-output-pre-dnat ct state new jump firewall-check
add rule {T} filter-output ct state new jump cluster-ips-check
add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule {T} mark-for-masquerade mark set mark or 0x4000
add rule {T} masquerading mark and 0x4000 == 0 return
add rule {T} masquerading mark set mark xor 0x4000
add rule {T} masquerading masquerade fully-random
add rule {T} nat-output jump services
add rule {T} nat-postrouting jump masquerading
add rule {T} nat-prerouting jump services
add rule {T} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule {T} reject-chain reject
add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips
add rule {T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add element {T} nodeport-ips {{ {node_ip} }}
add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"#
    )
}

/// The service chain's rules (masquerade mark, then the random endpoint choice).
fn nft_service_rules(o: &mut String, s: &Svc, p: &super::workload::PortDef) {
    let sc = nft_service_chain(s, p);
    let _ = writeln!(
        o,
        "add rule {T} {sc} ip daddr {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.vip
    );
    let gotos: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", nft_endpoint_chain(s, p, *ep, p.target)))
        .collect();
    let _ = writeln!(
        o,
        "add rule {T} {sc} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        gotos.join(" , ")
    );
}

fn nft_endpoint_rules(o: &mut String, s: &Svc, p: &super::workload::PortDef, ep: Ipv4Addr) {
    let ec = nft_endpoint_chain(s, p, ep, p.target);
    let proto = p.proto_lower();
    let _ = writeln!(
        o,
        "add rule {T} {ec} ip saddr {ep} jump mark-for-masquerade"
    );
    let _ = writeln!(
        o,
        "add rule {T} {ec} meta l4proto {proto} dnat to {ep}:{}",
        p.target
    );
}

/// The chains of one Service (declared before any rule jumps to them).
fn nft_chains(o: &mut String, s: &Svc) {
    for p in &s.ports {
        let _ = writeln!(o, "add chain {T} {}", nft_service_chain(s, p));
        if p.node_port.is_some() {
            let _ = writeln!(o, "add chain {T} {}", nft_external_chain(s, p));
        }
        for ep in &s.endpoints {
            let _ = writeln!(
                o,
                "add chain {T} {}",
                nft_endpoint_chain(s, p, *ep, p.target)
            );
        }
    }
}

/// The rules and map elements of one Service whose chains exist.
fn nft_service(o: &mut String, s: &Svc) {
    for p in &s.ports {
        let sc = nft_service_chain(s, p);
        nft_service_rules(o, s, p);
        for ep in &s.endpoints {
            nft_endpoint_rules(o, s, p, *ep);
        }
        let _ = writeln!(o, "add element {T} cluster-ips {{ {} }}", s.vip);
        let _ = writeln!(
            o,
            "add element {T} service-ips {{ {} . {} . {} : goto {sc} }}",
            s.vip,
            p.proto_lower(),
            p.port
        );
        if let Some(np) = p.node_port {
            // externalTrafficPolicy Cluster: masquerade (the endpoint may be on another
            // node), then the Service's cluster policy chain.
            let ec = nft_external_chain(s, p);
            let _ = writeln!(o, "add rule {T} {ec} jump mark-for-masquerade");
            let _ = writeln!(o, "add rule {T} {ec} goto {sc}");
            let _ = writeln!(
                o,
                "add element {T} service-nodeports {{ {} . {np} : goto {ec} }}",
                p.proto_lower()
            );
        }
    }
}

/// A full first sync: base rules and every Service; as kube-proxy writes a transaction, every
/// chain is declared before the rules and elements.
pub fn nft_full(node_ip: Ipv4Addr, svcs: &[Svc]) -> String {
    let mut o = nft_base_rules(node_ip);
    o.reserve(svcs.len() * 1500);
    for s in svcs {
        nft_chains(&mut o, s);
    }
    for s in svcs {
        nft_service(&mut o, s);
    }
    o
}

/// Adding one Service to a programmed table.
pub fn nft_add(s: &Svc) -> String {
    let mut o = String::new();
    nft_chains(&mut o, s);
    nft_service(&mut o, s);
    o
}

/// Replacing `old`'s endpoints by `new`'s (same Service, same ports): new endpoint chains,
/// the service chain rewritten, the endpoint chains no longer used flushed and deleted.
pub fn nft_change(old: &Svc, new: &Svc) -> String {
    let mut o = String::new();
    for p in &new.ports {
        for ep in new.endpoints.iter().filter(|e| !old.endpoints.contains(e)) {
            let ec = nft_endpoint_chain(new, p, *ep, p.target);
            let _ = writeln!(o, "add chain {T} {ec}");
            nft_endpoint_rules(&mut o, new, p, *ep);
        }
        let sc = nft_service_chain(new, p);
        let _ = writeln!(o, "flush chain {T} {sc}");
        nft_service_rules(&mut o, new, p);
        for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
            let ec = nft_endpoint_chain(old, p, *ep, p.target);
            let _ = writeln!(o, "flush chain {T} {ec}");
            let _ = writeln!(o, "delete chain {T} {ec}");
        }
    }
    o
}

/// Removing one Service: its map elements, then its chains.
pub fn nft_delete(s: &Svc) -> String {
    let mut o = String::new();
    for p in &s.ports {
        let _ = writeln!(
            o,
            "delete element {T} service-ips {{ {} . {} . {} }}",
            s.vip,
            p.proto_lower(),
            p.port
        );
        if let Some(np) = p.node_port {
            let _ = writeln!(
                o,
                "delete element {T} service-nodeports {{ {} . {np} }}",
                p.proto_lower()
            );
        }
    }
    let _ = writeln!(o, "delete element {T} cluster-ips {{ {} }}", s.vip);
    for p in &s.ports {
        if p.node_port.is_some() {
            let ec = nft_external_chain(s, p);
            let _ = writeln!(o, "flush chain {T} {ec}");
            let _ = writeln!(o, "delete chain {T} {ec}");
        }
        let sc = nft_service_chain(s, p);
        let _ = writeln!(o, "flush chain {T} {sc}");
        let _ = writeln!(o, "delete chain {T} {sc}");
        for ep in &s.endpoints {
            let ec = nft_endpoint_chain(s, p, *ep, p.target);
            let _ = writeln!(o, "flush chain {T} {ec}");
            let _ = writeln!(o, "delete chain {T} {ec}");
        }
    }
    o
}

#[cfg(test)]
mod unit {
    use super::super::workload::{PortDef, Svc};
    use super::*;
    use ::tests::Proto;

    #[test]
    fn sha256_known_answers() {
        let hex = |b: [u8; 32]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long = vec![b'a'; 1000];
        assert_eq!(
            hex(sha256(&long)),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
    }

    /// Names from kube-proxy's own unit tests (pkg/proxy/iptables, pkg/proxy/nftables). Its
    /// endpoint-chain examples use addresses outside the test ranges this project may use, so
    /// only the Service-level names are pinned here; endpoint chains go through the same hash.
    #[test]
    fn chain_names_match_kube_proxy() {
        assert_eq!(
            svc_chain("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(hash_b32("ns1/svc1/tcp/p80", 8), "ULMVA6XW");
        assert!(sep_chain("ns1/svc1:p80", "tcp", "198.19.1.3:80").starts_with("KUBE-SEP-"));
    }

    fn svc(name: &str, vip: [u8; 4], eps: &[[u8; 4]]) -> Svc {
        Svc {
            name: name.into(),
            vip: vip.into(),
            ports: vec![PortDef {
                name: "http",
                proto: Proto::Tcp,
                port: 80,
                target: 8080,
                node_port: None,
            }],
            endpoints: eps.iter().map(|e| (*e).into()).collect(),
            node: "node1",
        }
    }

    fn node_port_svc() -> Svc {
        let mut s = svc(
            "np",
            [198, 18, 32, 1],
            &[[198, 19, 2, 2], [198, 19, 2, 200], [198, 19, 2, 201]],
        );
        s.ports[0].node_port = Some(30080);
        s.node = "node2";
        s
    }

    /// The NodePort rules as kube-proxy's iptables mode writes them for externalTrafficPolicy
    /// Cluster (pkg/proxy/iptables/proxier.go, "Capture nodeports" and "Set up external
    /// traffic handling"): KUBE-NODEPORTS -> KUBE-EXT (mark for masquerade) -> KUBE-SVC.
    #[test]
    fn iptables_node_port_shape() {
        let s = [node_port_svc()];
        let refs: Vec<&Svc> = s.iter().collect();
        let text = ipt_restore(&IptSync::new(&s, &refs, vec![]));
        let svc = svc_chain("bench/np:http", "tcp");
        let ext = ext_chain("bench/np:http", "tcp");
        assert_eq!(&ext[9..], &svc[9..], "same hash as the KUBE-SVC chain");
        assert!(
            text.contains(&format!(
                "-A KUBE-NODEPORTS -m comment --comment bench/np:http -m tcp -p tcp --dport 30080 -j {ext}\n"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(":{ext} - [0:0]\n")));
        assert!(text.contains(&format!(
            "-A {ext} -m comment --comment \"masquerade traffic for bench/np:http external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {svc}\n"
        )));
        // The chain is declared before any rule, and KUBE-NODEPORTS is reached from the last
        // rule of KUBE-SERVICES for local destinations.
        let nat = &text[text.find("*nat\n").unwrap()..];
        let decl = nat.find(&format!(":{ext} ")).unwrap();
        let first_rule = nat.find("\n-A ").unwrap();
        assert!(decl < first_rule);
        assert!(text.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n"));
        assert!(ipt_chains(&s[0]).contains(&ext));
        // A sync that does not change the Service still rewrites KUBE-NODEPORTS (a top-level
        // chain), but not the Service's own chains.
        let other = ipt_restore(&IptSync::new(&s, &[], vec![]));
        assert!(other.contains(&format!("--dport 30080 -j {ext}\n")));
        assert!(!other.contains(&format!(":{ext} ")));
        // Chunked loads keep the NodePort rule.
        assert!(
            ipt_chunks(&s, 1)
                .concat()
                .contains("--dport 30080 -j KUBE-EXT-")
        );
    }

    /// kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go): the nodePort is an element
    /// of `service-nodeports` leading to the `external-` chain, which marks for masquerade and
    /// goes on to the service chain.
    #[test]
    fn nftables_node_port_shape() {
        let s = node_port_svc();
        let text = nft_add(&s);
        let sc = nft_service_chain(&s, &s.ports[0]);
        let ec = nft_external_chain(&s, &s.ports[0]);
        assert_eq!(
            ec,
            format!(
                "external-{}-bench/np/tcp/http",
                hash_b32("bench/np/tcp/http", 8)
            )
        );
        assert!(
            text.contains(&format!("add chain ip kube-proxy {ec}\n")),
            "{text}"
        );
        assert!(text.contains(&format!(
            "add rule ip kube-proxy {ec} jump mark-for-masquerade\nadd rule ip kube-proxy {ec} goto {sc}\n"
        )));
        assert!(text.contains(&format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 30080 : goto {ec} }}\n"
        )));
        assert!(text.find(&format!("add chain ip kube-proxy {ec}")) < text.find("add rule "));
        let d = nft_delete(&s);
        assert!(d.contains("delete element ip kube-proxy service-nodeports { tcp . 30080 }\n"));
        assert!(d.contains(&format!("delete chain ip kube-proxy {ec}\n")));
    }

    #[test]
    fn iptables_shape() {
        let s = [svc(
            "a",
            [198, 18, 32, 1],
            &[[198, 19, 1, 3], [198, 19, 1, 4], [198, 19, 1, 5]],
        )];
        let refs: Vec<&Svc> = s.iter().collect();
        let text = ipt_restore(&IptSync::new(&s, &refs, vec![]));
        let chain = svc_chain("bench/a:http", "tcp");
        assert!(text.contains(&format!("-A KUBE-SERVICES -m comment --comment \"bench/a:http cluster IP\" -m tcp -p tcp -d 198.18.32.1 --dport 80 -j {chain}\n")), "{text}");
        assert!(
            text.contains("-m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-")
        );
        assert!(
            text.contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-")
        );
        assert!(text.contains("-s 198.19.1.5 -j KUBE-MARK-MASQ"));
        assert!(text.contains("-m tcp -p tcp -j DNAT --to-destination 198.19.1.5:8080\n"));
        assert!(text.ends_with("-j KUBE-NODEPORTS\nCOMMIT\n"));
        assert_eq!(text.matches("COMMIT").count(), 2);
        // Chunked loads produce the same rules.
        let many: Vec<Svc> = (0..10)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    [198, 18, 32, i as u8],
                    &[[198, 19, 16, i as u8]],
                )
            })
            .collect();
        let refs: Vec<&Svc> = many.iter().collect();
        let whole = ipt_restore(&IptSync::new(&many, &refs, vec![]));
        let chunks = ipt_chunks(&many, 3);
        assert_eq!(chunks.len(), 4);
        let rules = |t: &str| {
            let mut v: Vec<String> = t
                .lines()
                .filter(|l| l.starts_with("-A KUBE-S"))
                .map(String::from)
                .collect();
            v.sort();
            v
        };
        assert_eq!(rules(&whole), rules(&chunks.concat()));
    }

    #[test]
    fn nftables_shape() {
        let s = svc("a", [198, 18, 32, 1], &[[198, 19, 1, 3], [198, 19, 1, 4]]);
        let text = nft_add(&s);
        let sc = format!(
            "service-{}-bench/a/tcp/http",
            hash_b32("bench/a/tcp/http", 8)
        );
        assert!(
            text.contains(&format!(
                "add element ip kube-proxy service-ips {{ 198.18.32.1 . tcp . 80 : goto {sc} }}"
            )),
            "{text}"
        );
        assert!(text.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(text.contains("__198.19.1.4/8080 meta l4proto tcp dnat to 198.19.1.4:8080\n"));
        let mut changed = s.clone();
        changed.endpoints[1] = [198, 19, 1, 9].into();
        let c = nft_change(&s, &changed);
        assert!(
            c.contains("delete chain ip kube-proxy endpoint-") && c.contains("__198.19.1.4/8080\n")
        );
        assert!(c.contains(&format!("flush chain ip kube-proxy {sc}\n")));
    }
}

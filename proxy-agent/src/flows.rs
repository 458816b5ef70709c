//! `proxy-agent flows`: the flows this node translates, from the conntrack map (per-packet
//! paths) and the socket-LB map (sockets connected to a frontend), read from the pins.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use proxy_common::{
    CT_CLOSING, CT_FORWARD, CT_SNAT, CT_XDP, CtKey, CtValue, IPPROTO_TCP, SockKey, SockValue, names,
};
use serde::Serialize;

use crate::{
    datapath::{
        addr::from_words,
        gc::monotonic_ns,
        maps::{lru, open_for_cli},
        writer::Programmed,
    },
    model::Protocol,
};

#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// `namespace/name` (every port) or `namespace/name:port`.
    pub service: Option<String>,
    pub backend: Option<IpAddr>,
    /// At most this many flows (0: all).
    pub limit: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    /// The client's address and port; for socket LB, the socket's cookie.
    pub client: String,
    pub frontend: SocketAddr,
    pub service: String,
    pub backend: SocketAddr,
    pub backend_id: u32,
    /// The node address and port the client was SNATed to.
    pub snat: Option<SocketAddr>,
    pub protocol: &'static str,
    /// "established" or "closing" (TCP), "active" (UDP), "connected" (socket LB).
    pub state: &'static str,
    /// Seconds since the flow's conntrack entries were made; null for socket LB.
    pub age_s: Option<f64>,
    /// Seconds since the flow's last packet (refreshed at most once a second); null for socket
    /// LB, which translates once, at connect.
    pub idle_s: Option<f64>,
    /// "xdp" or "tc" (the hook that admitted the flow), or "socket-lb".
    pub path: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flows {
    /// Flows matching the filter (before `limit`).
    pub matched: usize,
    pub flows: Vec<Flow>,
}

impl Filter {
    fn matches(&self, service: &str, backend: IpAddr) -> bool {
        let svc_ok = self.service.as_deref().is_none_or(|want| {
            service == want
                || service
                    .split_once(':')
                    .is_some_and(|(name, _)| name == want)
        });
        svc_ok && self.backend.is_none_or(|b| b == backend)
    }
}

/// Every flow matching `filter`, conntrack flows first (most recently active first), then
/// sockets.
pub fn collect(bpffs: &Path, filter: &Filter) -> anyhow::Result<Flows> {
    let maps = open_for_cli(bpffs)?;
    let programmed = Programmed::read(&maps)?;
    let names: HashMap<u32, &str> = programmed
        .services
        .values()
        .map(|s| (s.svc_id, s.name.as_str()))
        .collect();
    let name = |id: u32| names.get(&id).copied().unwrap_or("(removed)").to_string();
    let now = monotonic_ns();
    let mut per_packet = Vec::new();
    let ct: BpfHashMap<MapData, CtKey, CtValue> = lru(bpffs, names::CONNTRACK)?;
    for (k, v) in ct.iter().filter_map(Result::ok) {
        if k.dir != CT_FORWARD {
            continue;
        }
        let service = name(v.svc_id);
        let backend = SocketAddr::new(
            from_words(v.nat_addr, k.family),
            u16::from_be(v.nat_port_be),
        );
        if !filter.matches(&service, backend.ip()) {
            continue;
        }
        let tcp = k.proto == IPPROTO_TCP;
        per_packet.push((
            v.last_seen_ns,
            Flow {
                client: SocketAddr::new(from_words(k.saddr, k.family), u16::from_be(k.sport_be))
                    .to_string(),
                frontend: SocketAddr::new(from_words(k.daddr, k.family), u16::from_be(k.dport_be)),
                service,
                backend,
                backend_id: v.backend_id,
                snat: (v.flags & CT_SNAT != 0).then(|| {
                    SocketAddr::new(
                        from_words(v.orig_addr, k.family),
                        u16::from_be(v.orig_port_be),
                    )
                }),
                protocol: Protocol::from_number(k.proto).map_or("?", |p| p.as_str()),
                state: match (tcp, v.flags & CT_CLOSING != 0) {
                    (true, true) => "closing",
                    (true, false) => "established",
                    (false, _) => "active",
                },
                age_s: Some(now.saturating_sub(v.created_ns) as f64 / 1e9),
                idle_s: Some(now.saturating_sub(v.last_seen_ns) as f64 / 1e9),
                path: if v.flags & CT_XDP != 0 { "xdp" } else { "tc" },
            },
        ));
    }
    per_packet.sort_by_key(|(seen, _)| std::cmp::Reverse(*seen));
    let mut flows: Vec<Flow> = per_packet.into_iter().map(|(_, f)| f).collect();
    let socks: BpfHashMap<MapData, SockKey, SockValue> = lru(bpffs, names::SOCKETS)?;
    for (k, v) in socks.iter().filter_map(Result::ok) {
        if k.dir != CT_FORWARD {
            continue;
        }
        let service = name(v.svc_id);
        let backend = SocketAddr::new(from_words(v.addr, k.family), u16::from_be(v.port_be));
        if !filter.matches(&service, backend.ip()) {
            continue;
        }
        let protocol = programmed
            .services
            .iter()
            .find(|(_, s)| s.svc_id == v.svc_id)
            .map_or("?", |(fe, _)| fe.protocol.as_str());
        flows.push(Flow {
            client: format!("socket {}", k.cookie),
            frontend: SocketAddr::new(from_words(k.addr, k.family), u16::from_be(k.port_be)),
            service,
            backend,
            backend_id: v.backend_id,
            snat: None,
            protocol,
            state: "connected",
            age_s: None,
            idle_s: None,
            path: "socket-lb",
        });
    }
    let matched = flows.len();
    if filter.limit != 0 {
        flows.truncate(filter.limit);
    }
    Ok(Flows { matched, flows })
}

pub fn print_table(f: &Flows) {
    println!(
        "{:<26} {:<24} {:<24} {:<24} {:<5} {:<11} {:>8} {:>8} {:<9} SERVICE",
        "CLIENT", "FRONTEND", "BACKEND", "SNAT", "PROTO", "STATE", "AGE", "IDLE", "PATH"
    );
    for x in &f.flows {
        println!(
            "{:<26} {:<24} {:<24} {:<24} {:<5} {:<11} {:>8} {:>8} {:<9} {}",
            x.client,
            x.frontend.to_string(),
            x.backend.to_string(),
            x.snat.map_or("-".into(), |s| s.to_string()),
            x.protocol,
            x.state,
            x.age_s.map_or("-".into(), |s| format!("{s:.1}s")),
            x.idle_s.map_or("-".into(), |s| format!("{s:.1}s")),
            x.path,
            x.service
        );
    }
    if f.matched > f.flows.len() {
        println!(
            "({} of {} flows shown: --limit 0 shows all)",
            f.flows.len(),
            f.matched
        );
    } else {
        println!("({} flows)", f.matched);
    }
}

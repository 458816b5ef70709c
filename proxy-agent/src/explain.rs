//! `proxy-agent explain`: for one 5-tuple, which frontend it hits, which hook handles it,
//! whether conntrack holds it (and to which backend), and otherwise which backend a new flow
//! would get and why. Everything is read from the pinned maps, and the choice is made by
//! `proxy_common::choice`, the code the kernel programs run, so the answer is the datapath's.
use std::{
    cell::RefCell,
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    rc::Rc,
};

use aya::maps::{HashMap as BpfHashMap, MapData, lpm_trie::Key};
use proxy_common::{
    AF_INET, AF_INET6, AffinityKey, AffinityValue, BACKEND_LOCAL, CT_CLOSING, CT_FORWARD,
    CT_REVERSE, CT_SNAT, CT_XDP, CtKey, CtValue, IfaceConfig, SVC_NO_LOCAL, SVC_SOURCE_RANGES,
    SourceRange,
    choice::{self, LbMaps, MaglevEntries, Pick},
    names,
};
use serde::Serialize;

use crate::{
    datapath::{
        addr::{from_words, to_words},
        gc::monotonic_ns,
        loader::attachments,
        maps::{Maps, lru, open_for_cli},
        writer::{Programmed, ProgrammedService, kind_str},
    },
    model::{Frontend, Protocol, Scope},
};

/// Where the packet comes from, which decides the hook that sees it first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A pod on this node: socket LB at connect/sendmsg, tc on the pod's interface for
    /// processes outside the agent's cgroup.
    Pod,
    /// A host process on this node: socket LB.
    Node,
    /// A packet entering one of the node's external interfaces: XDP, then tc.
    External,
}

/// The hook to explain for; `auto` is the one that sees the packet first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PathChoice {
    Auto,
    #[value(name = "socket-lb")]
    SocketLb,
    Tc,
    Xdp,
}

/// `--proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn protocol(self) -> Protocol {
        match self {
            Self::Tcp => Protocol::Tcp,
            Self::Udp => Protocol::Udp,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Query {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub protocol: Protocol,
    pub from: Origin,
    pub path: PathChoice,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: u16,
    pub backend_id: u32,
    /// The backend runs on this node.
    pub local: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrontendView {
    pub service: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    /// "internal" or "external" (the external view of an externalTrafficPolicy Local Service).
    pub scope: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub svc_id: u32,
    pub algorithm: &'static str,
    pub backends: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConntrackView {
    pub backend: IpAddr,
    pub backend_port: u16,
    pub backend_id: u32,
    /// The node address and port the client was SNATed to.
    pub snat: Option<String>,
    pub age_s: f64,
    pub idle_s: f64,
    pub closing: bool,
    /// The hook that admitted the flow: "xdp" or "tc".
    pub admitted_by: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub client: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: &'static str,
    pub from: Origin,
    /// "socket-lb", "xdp", "tc", or "none" (no hook of this node sees the packet).
    pub path: &'static str,
    /// "established", "new", "reply" (reverse-translated), "reject", "drop" or "pass".
    pub outcome: &'static str,
    /// The counter the datapath moves for it.
    pub counter: &'static str,
    pub frontend: Option<FrontendView>,
    pub conntrack: Option<ConntrackView>,
    /// The backend the packet goes to (null for socket LB's random choice: see `candidates`).
    pub backend: Option<BackendView>,
    /// Every backend the frontend can choose among.
    pub candidates: Vec<BackendView>,
    /// Source rewrite: "node address:port" (SNAT) or, for a reply, the frontend restored.
    pub snat: Option<String>,
    /// How the decision was reached, step by step.
    pub steps: Vec<String>,
}

impl Explanation {
    /// The outcome, the counter it moves, and the step that decided it.
    fn settle(&mut self, outcome: &'static str, counter: &'static str, step: impl Into<String>) {
        self.outcome = outcome;
        self.counter = counter;
        self.steps.push(step.into());
    }
}

/// The maps opened once, for any number of queries.
pub struct Explainer {
    maps: Maps,
    programmed: Programmed,
    by_id: HashMap<u32, Frontend>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    affinity: BpfHashMap<MapData, AffinityKey, AffinityValue>,
    tables: RefCell<HashMap<u32, Option<Rc<Vec<u32>>>>>,
    xdp_attached: bool,
    sock_attached: bool,
}

fn addr_port(a: IpAddr, port: u16) -> String {
    SocketAddr::new(a, port).to_string()
}

/// The kernel programs' backend choice, over maps read from userspace.
struct Pinned<'a>(&'a Explainer);

struct Entries(Rc<Vec<u32>>);

impl MaglevEntries for Entries {
    fn entry(&self, index: u32) -> Option<u32> {
        self.0.get(index as usize).copied()
    }
}

impl LbMaps for Pinned<'_> {
    type Table = Entries;
    fn maglev(&self, svc_id: u32) -> Option<Entries> {
        let mut cache = self.0.tables.borrow_mut();
        let table = cache.entry(svc_id).or_insert_with(|| {
            let t = self.0.maps.maglev.get(&svc_id, 0).ok()?;
            let pairs: Option<Vec<[u32; 2]>> = (0..t.len()).map(|i| t.get(&i, 0).ok()).collect();
            Some(Rc::new(pairs?.into_iter().flatten().collect()))
        });
        table.clone().map(Entries)
    }
    fn slot(&self, svc_id: u32, slot: u32) -> Option<u32> {
        let fe = self.0.by_id.get(&svc_id)?;
        self.0.programmed.services[fe]
            .slots
            .get(slot as usize)
            .copied()
    }
}

impl Explainer {
    pub fn open(bpffs: &Path) -> anyhow::Result<Self> {
        let maps = open_for_cli(bpffs)?;
        let programmed = Programmed::read(&maps)?;
        let by_id = programmed
            .services
            .iter()
            .map(|(fe, s)| (s.svc_id, *fe))
            .collect();
        let hooks = attachments(bpffs);
        Ok(Self {
            conntrack: lru(bpffs, names::CONNTRACK)?,
            affinity: lru(bpffs, names::AFFINITY)?,
            maps,
            programmed,
            by_id,
            tables: RefCell::default(),
            xdp_attached: hooks.iter().any(|a| a.mode.starts_with("xdp")),
            sock_attached: hooks.iter().any(|a| a.interface == "cgroup"),
        })
    }

    fn backend(&self, id: u32) -> Option<BackendView> {
        let b = self.programmed.backends.get(&id)?;
        Some(BackendView {
            address: from_words(b.addr, b.family),
            port: u16::from_be(b.port_be),
            backend_id: id,
            local: b.flags & BACKEND_LOCAL != 0,
        })
    }

    fn frontend(&self, q: &Query) -> Option<(&Frontend, &ProgrammedService)> {
        let lookup = |scope| {
            let fe = Frontend {
                addr: q.dst.ip(),
                port: q.dst.port(),
                protocol: q.protocol,
                scope,
            };
            self.programmed.services.get_key_value(&fe)
        };
        // Packets entering an external interface see a frontend's external view first (tc and
        // XDP pass `iface` to `decide`); everything else only the internal one.
        match q.from {
            Origin::External => lookup(Scope::External).or_else(|| lookup(Scope::Internal)),
            Origin::Pod | Origin::Node => lookup(Scope::Internal),
        }
    }

    fn path(&self, q: &Query) -> &'static str {
        match (q.path, q.from) {
            (PathChoice::SocketLb, _) => "socket-lb",
            (PathChoice::Tc, _) => "tc",
            (PathChoice::Xdp, _) => "xdp",
            (PathChoice::Auto, Origin::External) if self.xdp_attached => "xdp",
            (PathChoice::Auto, Origin::External) => "tc",
            (PathChoice::Auto, _) if self.sock_attached => "socket-lb",
            // A pod's packets still cross tc on its interface; a host process's cross no hook.
            (PathChoice::Auto, Origin::Pod) => "tc",
            (PathChoice::Auto, Origin::Node) => "none",
        }
    }

    pub fn explain(&self, q: &Query) -> Explanation {
        let family = if q.dst.is_ipv4() { AF_INET } else { AF_INET6 };
        let (saddr, daddr) = (to_words(q.src.ip()), to_words(q.dst.ip()));
        let (sport_be, dport_be, proto) = (
            q.src.port().to_be(),
            q.dst.port().to_be(),
            q.protocol.number(),
        );
        let path = self.path(q);
        let mut e = Explanation {
            client: q.src,
            destination: q.dst,
            protocol: q.protocol.as_str(),
            from: q.from,
            path,
            outcome: "pass",
            counter: "passed_no_match",
            frontend: None,
            conntrack: None,
            backend: None,
            candidates: Vec::new(),
            snat: None,
            steps: Vec::new(),
        };
        let now = monotonic_ns();
        let Some((fe, svc)) = self.frontend(q) else {
            if path == "socket-lb" {
                e.steps.push(format!(
                    "{} is not a frontend: the socket connects unchanged",
                    q.dst
                ));
                e.counter = "none";
                return e;
            }
            // Not a frontend: the reply of a translated flow, or nothing of ours.
            let rkey = CtKey {
                saddr,
                daddr,
                sport_be,
                dport_be,
                proto,
                family,
                dir: CT_REVERSE,
                _pad: 0,
            };
            match self.conntrack.get(&rkey, 0) {
                Ok(r) => {
                    let front =
                        addr_port(from_words(r.nat_addr, family), u16::from_be(r.nat_port_be));
                    e.outcome = "reply";
                    e.counter = "reverse_translated";
                    e.snat = Some(front.clone());
                    e.steps.push(format!("no frontend at {}; a reverse conntrack entry: the reply of a translated flow", q.dst));
                    e.steps
                        .push(format!("source rewritten to the frontend {front}"));
                    if r.flags & CT_SNAT != 0 {
                        let client = addr_port(
                            from_words(r.orig_addr, family),
                            u16::from_be(r.orig_port_be),
                        );
                        e.steps.push(format!("destination rewritten back to the client {client} (the flow was SNATed)"));
                    }
                }
                Err(_) => e.steps.push(format!(
                    "{} is not a frontend and no translated flow answers to it: passed untouched",
                    q.dst
                )),
            }
            return e;
        };
        let v = svc.value;
        e.candidates = svc
            .slots
            .iter()
            .filter_map(|id| self.backend(*id))
            .collect();
        e.frontend = Some(FrontendView {
            service: svc.name.clone(),
            address: fe.addr,
            port: fe.port,
            protocol: fe.protocol.as_str(),
            scope: match fe.scope {
                Scope::Internal => "internal",
                Scope::External => "external",
            },
            kind: kind_str(&v),
            svc_id: v.svc_id,
            algorithm: svc.algorithm().as_str(),
            backends: svc.slots.len(),
        });
        e.steps.push(format!(
            "frontend {fe} of {} (svc_id {}, {} view)",
            svc.name,
            v.svc_id,
            e.frontend.as_ref().map_or("", |f| f.scope)
        ));
        match path {
            "none" => {
                e.settle("pass", "none", "a host process's packets cross no tc or XDP hook of this node, and socket LB is not attached: not translated");
                return e;
            }
            "socket-lb" => return self.socket_lb(e, &v),
            _ => {}
        }
        // The per-packet decision (`lb::forward`): conntrack first, so established flows keep
        // working whatever admission would say now.
        let fkey = CtKey {
            saddr,
            daddr,
            sport_be,
            dport_be,
            proto,
            family,
            dir: CT_FORWARD,
            _pad: 0,
        };
        let mut reselected = false;
        if let Ok(ct) = self.conntrack.get(&fkey, 0) {
            let still = self
                .programmed
                .backends
                .get(&ct.backend_id)
                .is_some_and(|b| b.addr == ct.nat_addr && b.port_be == ct.nat_port_be);
            // Only a packet without SYN drains: a SYN on this tuple is a new connection.
            let draining = !still && q.protocol == Protocol::Tcp;
            if ct.svc_id == v.svc_id && (still || draining) {
                let view = ConntrackView {
                    backend: from_words(ct.nat_addr, family),
                    backend_port: u16::from_be(ct.nat_port_be),
                    backend_id: ct.backend_id,
                    snat: (ct.flags & CT_SNAT != 0).then(|| {
                        addr_port(
                            from_words(ct.orig_addr, family),
                            u16::from_be(ct.orig_port_be),
                        )
                    }),
                    age_s: now.saturating_sub(ct.created_ns) as f64 / 1e9,
                    idle_s: now.saturating_sub(ct.last_seen_ns) as f64 / 1e9,
                    closing: ct.flags & CT_CLOSING != 0,
                    admitted_by: if ct.flags & CT_XDP != 0 { "xdp" } else { "tc" },
                };
                e.outcome = "established";
                e.counter = if still {
                    "translated_established"
                } else {
                    "translated_draining"
                };
                e.backend = Some(BackendView {
                    address: view.backend,
                    port: view.backend_port,
                    backend_id: ct.backend_id,
                    local: self.backend(ct.backend_id).is_some_and(|b| b.local),
                });
                e.snat = view.snat.clone();
                e.steps.push(format!(
                    "conntrack: established flow to {} (backend {}, admitted by {}, age {:.1} s, idle {:.1} s{})",
                    addr_port(view.backend, view.backend_port),
                    ct.backend_id,
                    view.admitted_by,
                    view.age_s,
                    view.idle_s,
                    if still { "" } else { "; backend removed: the TCP connection drains, a SYN would choose again" }
                ));
                e.conntrack = Some(view);
                self.xdp_step(&mut e, q);
                return e;
            }
            reselected = true;
            e.steps.push("conntrack: an entry for another frontend or a removed backend: the flow chooses again".into());
        } else {
            e.steps.push("conntrack: no entry: a new flow".into());
        }
        // Admission (`lb::forward` after the conntrack lookup).
        if v.flags & SVC_SOURCE_RANGES != 0 {
            let key = Key::new(
                32 + 128,
                SourceRange {
                    svc_id_be: v.svc_id.to_be(),
                    addr: saddr,
                },
            );
            if self.maps.source_ranges.get(&key, 0).is_err() {
                e.settle(
                    "drop",
                    "dropped_source_range",
                    format!(
                        "loadBalancerSourceRanges: {} is in none of them: dropped",
                        q.src.ip()
                    ),
                );
                return e;
            }
            e.steps.push(format!(
                "loadBalancerSourceRanges: {} is allowed",
                q.src.ip()
            ));
        }
        if v.count == 0 {
            if v.flags & SVC_NO_LOCAL != 0 {
                e.settle("drop", "dropped_no_local_backend", "no endpoint on this node and a Local traffic policy: dropped (kube-proxy's \"has no local endpoints\" rule)");
            } else {
                e.settle(
                    "reject",
                    "rejected_no_backend",
                    "no endpoints: rejected with an ICMP port unreachable (kube-proxy's REJECT)",
                );
            }
            return e;
        }
        let pick = choice::flow_hash(&saddr, &daddr, sport_be, dport_be, proto);
        let mut chosen = None;
        if v.affinity_timeout_s != 0 {
            let key = AffinityKey {
                svc_id: v.svc_id,
                kind: 0,
                client: saddr,
            };
            match self.affinity.get(&key, 0) {
                Ok(a) if choice::affinity_live(now, a.last_used_ns, v.affinity_timeout_s)
                    && self.programmed.backends.contains_key(&a.backend_id) =>
                {
                    e.steps.push(format!(
                        "sessionAffinity ClientIP: {} was sent to backend {} {:.0} s ago (timeout {} s): kept",
                        q.src.ip(),
                        a.backend_id,
                        now.saturating_sub(a.last_used_ns) as f64 / 1e9,
                        v.affinity_timeout_s
                    ));
                    chosen = Some(a.backend_id);
                }
                _ => e.steps.push(format!("sessionAffinity ClientIP (timeout {} s): no live entry for {}: chosen afresh and remembered", v.affinity_timeout_s, q.src.ip())),
            }
        }
        let id = match chosen {
            Some(id) => id,
            None => match choice::backend_for(&Pinned(self), &v, pick) {
                Some((id, how)) => {
                    e.steps.push(match how {
                        Pick::Maglev { index, size } => format!("Maglev: flow hash {pick:#010x} -> table slot {index} of {size} -> backend {id}"),
                        Pick::Slot { index, count } => format!("flow hash {pick:#010x} mod {count} backends -> slot {index} -> backend {id}"),
                    });
                    id
                }
                None => {
                    e.settle(
                        "drop",
                        "dropped_backend_missing",
                        "a slot or table entry is missing (mid-update): dropped",
                    );
                    return e;
                }
            },
        };
        let Some(b) = self.backend(id) else {
            e.settle(
                "drop",
                "dropped_backend_missing",
                format!("backend {id} is missing (mid-update): dropped"),
            );
            return e;
        };
        e.outcome = "new";
        e.counter = if reselected {
            "reselected"
        } else {
            "translated_new"
        };
        // SNAT (`lb::forward`): hairpin, or external traffic to a backend on another node.
        if b.address == q.src.ip() {
            let node = self.node_addr(0, family);
            e.snat = node.map(|a| format!("{a}:61000-65535"));
            e.steps.push(format!(
                "hairpin: the backend is the client itself: SNAT to the node address {}",
                node.map_or("(none programmed)".into(), |a| a.to_string())
            ));
        } else if q.from == Origin::External && !b.local {
            let node = self.external_addr(family);
            e.snat = node.map(|a| format!("{a}:61000-65535"));
            e.steps.push(format!("external traffic to a backend on another node: SNAT to the node address {} (a free port of 61000-65535), so replies come back here", node.map_or("(none programmed)".into(), |a| a.to_string())));
        }
        e.steps.push(format!(
            "-> {}:{} (backend {id}{})",
            b.address,
            b.port,
            if b.local { ", on this node" } else { "" }
        ));
        e.backend = Some(b);
        self.xdp_step(&mut e, q);
        e
    }

    fn socket_lb(&self, mut e: Explanation, v: &proxy_common::ServiceValue) -> Explanation {
        if v.count == 0 {
            if v.flags & SVC_NO_LOCAL != 0 {
                e.settle("drop", "dropped_no_local_backend", "no local endpoint and a Local policy: connect() goes through untranslated and tc drops it");
            } else {
                e.settle(
                    "reject",
                    "sock_rejected_no_backend",
                    "no endpoints: connect() fails with ECONNREFUSED",
                );
            }
            return e;
        }
        e.settle("new", "sock_translated", format!(
            "socket LB: connect()/sendmsg() picks one of the {} candidates at random (bpf_get_prandom_u32, kube-proxy's random balancing{}); the socket keeps it until that backend is removed",
            e.candidates.len(),
            if v.affinity_timeout_s != 0 { format!("; sessionAffinity per pod network namespace, timeout {} s", v.affinity_timeout_s) } else { String::new() }
        ));
        e
    }

    fn xdp_step(&self, e: &mut Explanation, q: &Query) {
        if e.path != "xdp" {
            return;
        }
        let Some(b) = &e.backend else { return };
        e.steps.push(if b.local {
            "XDP records the decision and passes the packet to tc, which delivers it to the local backend".into()
        } else {
            let _ = q;
            "XDP rewrites the packet and sends it out after a FIB lookup (XDP_TX / redirect); without a resolved next hop, tc sends it".into()
        });
    }

    /// Entry `ifindex` of the interfaces map (0: the hairpin address).
    fn node_addr(&self, ifindex: u32, family: u8) -> Option<IpAddr> {
        let c = self.maps.interfaces.get(&ifindex, 0).ok()?;
        iface_addr(&c, family)
    }

    /// The address of the first external interface with one of `family`.
    fn external_addr(&self, family: u8) -> Option<IpAddr> {
        let mut ifaces: Vec<(u32, IfaceConfig)> = self
            .maps
            .interfaces
            .iter()
            .filter_map(Result::ok)
            .filter(|(i, _)| *i != 0)
            .collect();
        ifaces.sort_by_key(|(i, _)| *i);
        ifaces.iter().find_map(|(_, c)| iface_addr(c, family))
    }
}

fn iface_addr(c: &IfaceConfig, family: u8) -> Option<IpAddr> {
    if family == AF_INET {
        (c.addr4 != 0).then(|| from_words([c.addr4, 0, 0, 0], AF_INET))
    } else {
        (c.addr6 != [0; 4]).then(|| from_words(c.addr6, AF_INET6))
    }
}

pub fn print_table(e: &Explanation) {
    println!(
        "{} -> {} {} from {}",
        e.client,
        e.destination,
        e.protocol,
        serde_json::to_value(e.from)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    );
    match &e.frontend {
        Some(f) => println!(
            "  SERVICE   {} ({}, {} view, {}, {} backends)",
            f.service, f.kind, f.scope, f.algorithm, f.backends
        ),
        None => println!("  SERVICE   none"),
    }
    println!("  PATH      {}", e.path);
    println!("  OUTCOME   {} (counter {})", e.outcome, e.counter);
    if let Some(b) = &e.backend {
        println!(
            "  BACKEND   {} (id {}{})",
            addr_port(b.address, b.port),
            b.backend_id,
            if b.local { ", this node" } else { "" }
        );
    }
    if let Some(s) = &e.snat {
        println!("  SNAT      {s}");
    }
    println!("  WHY");
    for s in &e.steps {
        println!("    - {s}");
    }
}

//! Service lookup, backend choice and conntrack: the decision every hook makes the same way.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use proxy_common::{
    AF_INET, AffinityKey, AffinityValue, BACKEND_LOCAL, BackendKey, CT_CLOSING, CT_FORWARD,
    CT_REVERSE, CT_SNAT, CT_UNCOUNTED, Counter, CtKey, CtValue, IPPROTO_TCP, IfaceConfig,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_NO_LOCAL, SVC_SOURCE_RANGES, ServiceKey, ServiceValue,
    SlotKey,
    choice::{self, LbMaps, MaglevEntries, backend_for},
    limits::{SNAT_PORT_COUNT, SNAT_PORT_MIN},
};

use crate::{
    maps::{
        AFFINITY, BACKENDS, CONNTRACK, CT_SCRATCH, INTERFACES, MAGLEV, MaglevTable, SERVICES,
        SLOTS, source_allowed,
    },
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// What to do with a packet.
pub enum Verdict {
    /// Rewrite the destination to this backend (and, for external traffic to a backend on
    /// another node, the source to this node's address and port `snat`).
    Dnat {
        addr: [u32; 4],
        port_be: u16,
        snat: Nat,
        counter: Counter,
        svc_id: u32,
    },
    /// Rewrite the source back to the frontend the client dialled (and the destination back to
    /// the client, `unsnat`, when the flow was SNATed).
    ReverseNat {
        addr: [u32; 4],
        port_be: u16,
        unsnat: Nat,
        svc_id: u32,
    },
    Pass(Counter),
    /// Dropped for this reason; the frontend's service id, or 0.
    Drop(Counter, u32),
    /// A new flow to a frontend without any endpoint: answer it with an ICMP port unreachable
    /// (kube-proxy's REJECT, `--reject-with icmp-port-unreachable` for TCP and UDP alike); the
    /// frontend's service id.
    Reject(u32),
}

/// A second address rewrite, or none. Not an `Option`: copying a `None` copies its
/// uninitialised payload too, and the verifier rejects a store of whatever stack slot that
/// happens to be (a pointer spilled there, say); these fields are always written.
#[derive(Clone, Copy)]
pub struct Nat {
    pub on: bool,
    pub addr: [u32; 4],
    pub port_be: u16,
}

impl Nat {
    #[inline(always)]
    pub fn when(on: bool, addr: [u32; 4], port_be: u16) -> Nat {
        if on {
            Nat { on, addr, port_be }
        } else {
            Nat {
                on,
                addr: [0; 4],
                port_be: 0,
            }
        }
    }
}

/// Refresh timestamps at most this often, to keep writes off most packets.
const TOUCH_NS: u64 = 1_000_000_000;

#[inline(always)]
fn ct_key(
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
    family: u8,
    dir: u8,
) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport_be,
        dport_be,
        proto,
        family,
        dir,
        _pad: 0,
    }
}

/// This node's address of `family` in an interface entry, if it has one.
#[inline(always)]
fn node_addr(c: &IfaceConfig, family: u8) -> Option<[u32; 4]> {
    if family == AF_INET {
        (c.addr4 != 0).then_some([c.addr4, 0, 0, 0])
    } else {
        (c.addr6 != [0; 4]).then_some(c.addr6)
    }
}

#[inline(always)]
fn touch(v: *mut CtValue, now: u64) {
    // SAFETY: `v` came from a successful lookup in this program run.
    unsafe {
        if now.wrapping_sub((*v).last_seen_ns) > TOUCH_NS {
            (*v).last_seen_ns = now;
        }
    }
}

/// The reverse entry of a flow to `flow`'s destination: the frontend to restore as the reply's
/// source and the client. Written in place (into the scratch map), not built on the stack.
#[inline(always)]
fn reply_entry(v: &mut CtValue, flow: &Flow, flags: u16, backend_id: u32, svc_id: u32, now: u64) {
    *v = CtValue {
        nat_addr: flow.daddr,
        nat_port_be: flow.dport_be,
        flags,
        backend_id,
        svc_id,
        orig_addr: flow.saddr,
        orig_port_be: flow.sport_be,
        _pad: 0,
        last_seen_ns: now,
        created_ns: now,
    };
}

/// Sets or clears `CT_CLOSING` on an entry (one write, only when it changes).
#[inline(always)]
fn mark_closing(ct: *mut CtValue, closing: bool, reopened: bool) {
    // SAFETY: `ct` came from a successful lookup in this program run.
    unsafe {
        let f = (*ct).flags;
        if closing && f & CT_CLOSING == 0 {
            (*ct).flags = f | CT_CLOSING;
        } else if reopened && f & CT_CLOSING != 0 {
            (*ct).flags = f & !CT_CLOSING;
        }
    }
}

/// A backend picked for a frontend.
pub struct Chosen {
    pub backend_id: u32,
    pub addr: [u32; 4],
    pub port_be: u16,
    /// The backend runs on this node.
    pub local: bool,
}

/// The frontend of (address of `family`, port, protocol), if it is one.
#[inline(always)]
pub fn lookup_service(
    addr: [u32; 4],
    port_be: u16,
    proto: u8,
    scope: u8,
    family: u8,
) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr,
        port_be,
        proto,
        scope,
        family,
        _pad: [0; 3],
    };
    // SAFETY: plain-data value copied out at once.
    unsafe { SERVICES.get(key) }.copied()
}

/// The kernel's view of the maps a backend choice reads.
struct KernelMaps;

/// A Maglev table in `maglev_v1`. Inner arrays are only replaced whole, never written in place.
struct KernelTable(&'static MaglevTable);

impl MaglevEntries for KernelTable {
    #[inline(always)]
    fn entry(&self, index: u32) -> Option<u32> {
        Some(self.0.get(index / 2)?[(index & 1) as usize])
    }
}

impl LbMaps for KernelMaps {
    type Table = KernelTable;
    #[inline(always)]
    fn maglev(&self, svc_id: u32) -> Option<KernelTable> {
        // SAFETY: the outer value is a map pointer the kernel keeps alive for this program run.
        unsafe { MAGLEV.get(&svc_id) }.map(KernelTable)
    }
    #[inline(always)]
    fn slot(&self, svc_id: u32, slot: u32) -> Option<u32> {
        // SAFETY: plain-data value copied out at once.
        unsafe { SLOTS.get(SlotKey { svc_id, slot }) }.map(|v| v.backend_id)
    }
}

/// Choice among the frontend's backends by `pick`: random for sockets (kube-proxy's random
/// balancing), a hash of the flow's tuple on the per-packet path; the rule itself is
/// `proxy_common::choice::backend_for`, shared with `proxy-agent explain`.
#[inline(always)]
pub fn select_backend(svc: &ServiceValue, pick: u32) -> Option<Chosen> {
    // A copy: a pointer into `svc` handed to a helper would make the compiler assume `svc`
    // changed.
    let svc = *svc;
    let (backend_id, _) = backend_for(&KernelMaps, &svc, pick)?;
    // SAFETY: plain-data value copied out at once.
    let b = unsafe { BACKENDS.get(BackendKey { backend_id }) }?;
    Some(Chosen {
        backend_id,
        addr: b.addr,
        port_be: b.port_be,
        local: b.flags & BACKEND_LOCAL != 0,
    })
}

/// The client a sessionAffinity entry is for.
#[derive(Clone, Copy)]
pub enum Client {
    Addr([u32; 4]),
    Netns(u64),
}

/// Backend choice with sessionAffinity ClientIP: a client sent to a backend keeps it while it
/// opens connections less than `timeout` apart, and the backend exists.
#[inline(always)]
pub fn choose(svc: &ServiceValue, client: Client, pick: u32) -> Option<Chosen> {
    if svc.affinity_timeout_s == 0 {
        return select_backend(svc, pick);
    }
    let key = match client {
        Client::Addr(a) => AffinityKey {
            svc_id: svc.svc_id,
            kind: 0,
            client: a,
        },
        Client::Netns(c) => AffinityKey {
            svc_id: svc.svc_id,
            kind: 1,
            client: [c as u32, (c >> 32) as u32, 0, 0],
        },
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: plain-data value copied out at once.
    if let Some(a) = unsafe { AFFINITY.get(key) }.copied()
        && choice::affinity_live(now, a.last_used_ns, svc.affinity_timeout_s)
        && let Some(b) = unsafe {
            BACKENDS.get(BackendKey {
                backend_id: a.backend_id,
            })
        }
    {
        let chosen = Chosen {
            backend_id: a.backend_id,
            addr: b.addr,
            port_be: b.port_be,
            local: b.flags & BACKEND_LOCAL != 0,
        };
        let _ = AFFINITY.insert(
            key,
            AffinityValue {
                backend_id: a.backend_id,
                _pad: 0,
                last_used_ns: now,
            },
            0,
        );
        return Some(chosen);
    }
    let chosen = select_backend(svc, pick)?;
    let _ = AFFINITY.insert(
        key,
        AffinityValue {
            backend_id: chosen.backend_id,
            _pad: 0,
            last_used_ns: now,
        },
        0,
    );
    Some(chosen)
}

/// A remembered backend is still valid if its id still exists with the same address: the ids of
/// removed backends are deleted, so flows to them choose again.
#[inline(always)]
pub fn backend_valid(backend_id: u32, addr: [u32; 4], port_be: u16) -> bool {
    // SAFETY: plain-data value read at once.
    unsafe { BACKENDS.get(BackendKey { backend_id }) }
        .is_some_and(|b| b.addr == addr && b.port_be == port_be)
}

/// `iface` is set when the packet entered an external (node-facing) interface: it then sees
/// the external view of a frontend first, and may be SNATed. `origin` goes into the flags of
/// the entries a new flow creates: `CT_XDP` from XDP, 0 from tc.
#[inline(always)]
pub fn decide(flow: &Flow, iface: Option<IfaceConfig>, origin: u16) -> Verdict {
    let lookup = |scope| lookup_service(flow.daddr, flow.dport_be, flow.proto, scope, flow.family);
    let svc = match iface {
        Some(_) => lookup(SCOPE_EXTERNAL).or_else(|| lookup(SCOPE_INTERNAL)),
        None => lookup(SCOPE_INTERNAL),
    };
    match svc {
        Some(svc) => forward(flow, &svc, iface, origin),
        None => reverse(flow),
    }
}

/// The per-packet path's pick: `proxy_common::choice::flow_hash` of the flow's 5-tuple.
#[inline(always)]
fn flow_hash(flow: &Flow) -> u32 {
    choice::flow_hash(
        &flow.saddr,
        &flow.daddr,
        flow.sport_be,
        flow.dport_be,
        flow.proto,
    )
}

/// A free source port on this node's address towards the backend, from the SNAT range.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn snat_port(
    rkey: &mut CtKey,
    pick: u32,
    node: [u32; 4],
    backend: [u32; 4],
    bport: u16,
    proto: u8,
    family: u8,
) -> Option<u16> {
    let start = (pick % SNAT_PORT_COUNT as u32) as u16;
    for i in 0..8u16 {
        let port_be = (SNAT_PORT_MIN + (start + i * 97) % SNAT_PORT_COUNT).to_be();
        *rkey = ct_key(backend, node, bport, port_be, proto, family, CT_REVERSE);
        // SAFETY: only presence is checked.
        if unsafe { CONNTRACK.get(&*rkey) }.is_none() {
            return Some(port_be);
        }
    }
    None
}

/// The translation of a packet of an established flow (`first`: the first one tc sees of a
/// flow XDP recorded).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn established(
    addr: [u32; 4],
    port_be: u16,
    flags: u16,
    orig_addr: [u32; 4],
    orig_port: u16,
    valid: bool,
    first: bool,
    svc_id: u32,
) -> Verdict {
    Verdict::Dnat {
        addr,
        port_be,
        snat: Nat::when(flags & CT_SNAT != 0, orig_addr, orig_port),
        counter: if first {
            Counter::TranslatedNew
        } else if valid {
            Counter::TranslatedEstablished
        } else {
            Counter::TranslatedDraining
        },
        svc_id,
    }
}

/// Not inlined, like `reverse`: separate BPF functions keep the stack frames of the two paths
/// apart (the verifier allows 512 bytes along any call chain).
// Map keys and values are passed by reference on purpose: by value they would be copied onto
// the stack, which is what the scratch map is for.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn forward(flow: &Flow, svc: &ServiceValue, iface: Option<IfaceConfig>, origin: u16) -> Verdict {
    let svc_id = svc.svc_id;
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(scratch) = CT_SCRATCH.get_ptr_mut(0) else {
        return Verdict::Drop(Counter::DroppedConntrackFull, svc_id);
    };
    // SAFETY: this CPU's scratch entry, used by this program run only.
    let s = unsafe { &mut *scratch };
    s.fkey = ct_key(
        flow.saddr,
        flow.daddr,
        flow.sport_be,
        flow.dport_be,
        flow.proto,
        flow.family,
        CT_FORWARD,
    );
    let mut reselected = false;
    if let Some(ct) = CONNTRACK.get_ptr_mut(&s.fkey) {
        // SAFETY: pointer from a successful lookup; fields copied out.
        let (backend_id, nat_addr, nat_port, ct_svc, flags, orig_addr, orig_port, last_seen) = unsafe {
            (
                (*ct).backend_id,
                (*ct).nat_addr,
                (*ct).nat_port_be,
                (*ct).svc_id,
                (*ct).flags,
                (*ct).orig_addr,
                (*ct).orig_port_be,
                (*ct).last_seen_ns,
            )
        };
        // A TCP connection whose backend was removed drains: it keeps its backend (the
        // conntrack entry holds the address) until it ends, as kube-proxy leaves established
        // connections alone; only a new connection (a SYN reusing the tuple) and UDP flows
        // choose again (kube-proxy flushes UDP conntrack entries of removed endpoints).
        let valid = backend_valid(backend_id, nat_addr, nat_port);
        let draining = !valid && flow.proto == IPPROTO_TCP && flow.tcp_flags & TCP_SYN == 0;
        if ct_svc == svc_id && (valid || draining) {
            touch(ct, now);
            // Recorded by XDP, which passed the packet on uncounted: it is this flow's first.
            let first = flags & CT_UNCOUNTED != 0;
            if first {
                // SAFETY: pointer from a successful lookup.
                unsafe { (*ct).flags &= !CT_UNCOUNTED };
            }
            // A FIN or RST marks the connection closing in both entries (the collector then
            // frees them, and the SNAT port, soon after it goes idle); a new SYN on the tuple
            // clears the mark.
            let tcp = flow.proto == IPPROTO_TCP;
            let closing = tcp && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0;
            let reopened = tcp && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            // A SYN on the tuple of a connection that ended is a new connection (it keeps the
            // backend, which is as good as any): counted as new, and aged from now.
            let renewed = reopened && flags & CT_CLOSING != 0;
            if renewed {
                // SAFETY: pointer from a successful lookup.
                unsafe { (*ct).created_ns = now };
            }
            let first = first || renewed;
            mark_closing(ct, closing, reopened);
            // The reply direction is a separate LRU entry: under conntrack pressure it can be
            // evicted while this one lives, and the next reply would leave untranslated (the
            // client answers it with a reset). It is looked up, and put back when missing,
            // when this entry's last_seen is due for its refresh (at most once per TOUCH_NS)
            // and when a FIN, RST or SYN marks both entries: other established packets cost
            // no lookup of it (its own replies keep it fresh in the LRU).
            if !first && !closing && !reopened && now.wrapping_sub(last_seen) <= TOUCH_NS {
                return established(
                    nat_addr, nat_port, flags, orig_addr, orig_port, valid, first, svc_id,
                );
            }
            s.rkey = ct_key(
                nat_addr,
                flow.saddr,
                nat_port,
                flow.sport_be,
                flow.proto,
                flow.family,
                CT_REVERSE,
            );
            if flags & CT_SNAT != 0 {
                s.rkey.daddr = orig_addr;
                s.rkey.dport_be = orig_port;
            }
            if let Some(r) = CONNTRACK.get_ptr_mut(&s.rkey) {
                mark_closing(r, closing, reopened);
            } else {
                reply_entry(&mut s.rval, flow, flags, backend_id, svc_id, now);
                if closing {
                    s.rval.flags |= CT_CLOSING;
                }
                let _ = CONNTRACK.insert(&s.rkey, &s.rval, 0);
            }
            return established(
                nat_addr, nat_port, flags, orig_addr, orig_port, valid, first, svc_id,
            );
        }
        reselected = true;
    }

    // Admission of a new flow: established flows were let through above, so a flow keeps
    // working when its Service loses its last ready endpoint (draining) or its client leaves
    // the source ranges, as kube-proxy's nat-table rules only ever see a connection's first
    // packet.
    if svc.flags & SVC_SOURCE_RANGES != 0 && !source_allowed(svc_id, flow.saddr) {
        return Verdict::Drop(Counter::DroppedSourceRange, svc_id);
    }
    if svc.count == 0 {
        return if svc.flags & SVC_NO_LOCAL != 0 {
            Verdict::Drop(Counter::DroppedNoLocalBackend, svc_id)
        } else {
            Verdict::Reject(svc_id)
        };
    }
    let pick = flow_hash(flow);
    let Some(Chosen {
        backend_id,
        addr: baddr,
        port_be: bport,
        local,
    }) = choose(svc, Client::Addr(flow.saddr), pick)
    else {
        return Verdict::Drop(Counter::DroppedBackendMissing, svc_id);
    };
    // Traffic from outside the node to a backend on another node is SNATed to this node, so
    // the replies come back through it (kube-proxy masquerades it too). Local backends reply
    // through this node anyway, and keep seeing the client's address.
    // Hairpin: a backend that reached its own Service and was picked itself would otherwise
    // get its own packet from itself and answer it directly, never through the reverse NAT;
    // its source becomes this node's address (entry 0 of the interfaces map), as kube-proxy
    // masquerades it.
    let snat_addr = if baddr == flow.saddr {
        // SAFETY: plain-data value read at once.
        unsafe { INTERFACES.get(0u32) }.and_then(|c| node_addr(c, flow.family))
    } else {
        iface
            .filter(|_| !local)
            .and_then(|c| node_addr(&c, flow.family))
    };
    let snat = match snat_addr {
        Some(node) => match snat_port(
            &mut s.rkey,
            pick,
            node,
            baddr,
            bport,
            flow.proto,
            flow.family,
        ) {
            Some(p) => Nat::when(true, node, p),
            None => return Verdict::Drop(Counter::DroppedSnatPorts, svc_id),
        },
        None => Nat::when(false, [0; 4], 0),
    };
    let (flags, src, sport) = if snat.on {
        (CT_SNAT | origin, snat.addr, snat.port_be)
    } else {
        (origin, flow.saddr, flow.sport_be)
    };
    s.fval = CtValue {
        nat_addr: baddr,
        nat_port_be: bport,
        flags,
        backend_id,
        svc_id,
        orig_addr: src,
        orig_port_be: sport,
        _pad: 0,
        last_seen_ns: now,
        created_ns: now,
    };
    s.rkey = ct_key(
        baddr,
        src,
        bport,
        sport,
        flow.proto,
        flow.family,
        CT_REVERSE,
    );
    reply_entry(&mut s.rval, flow, flags, backend_id, svc_id, now);
    // Reverse entry first: a reply must never find a forward entry without its way back.
    if CONNTRACK.insert(&s.rkey, &s.rval, 0).is_err()
        || CONNTRACK.insert(&s.fkey, &s.fval, 0).is_err()
    {
        return Verdict::Drop(Counter::DroppedConntrackFull, svc_id);
    }
    Verdict::Dnat {
        addr: baddr,
        port_be: bport,
        snat,
        counter: if reselected {
            Counter::Reselected
        } else {
            Counter::TranslatedNew
        },
        svc_id,
    }
}

#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn reverse(flow: &Flow) -> Verdict {
    if flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A new connection straight to this address (socket LB, or a client dialling a pod)
        // may reuse the tuple of an earlier translated flow: its replies are not ours to
        // rewrite any more, so forget that flow's reverse entry. Only once that flow has ended
        // (closing, or its forward entry gone): while it lives, the backend could not tell the
        // two connections apart anyway, and a SYN spoofed with the client's address must not
        // cut a live flow's replies off.
        let stale = ct_key(
            flow.daddr,
            flow.saddr,
            flow.dport_be,
            flow.sport_be,
            flow.proto,
            flow.family,
            CT_REVERSE,
        );
        // SAFETY: plain-data fields copied out at once.
        if let Some(r) = unsafe { CONNTRACK.get(&stale) }.map(|r| {
            (
                r.flags,
                r.orig_addr,
                r.orig_port_be,
                r.nat_addr,
                r.nat_port_be,
            )
        }) && let Some(s) = CT_SCRATCH.get_ptr_mut(0)
        {
            let (flags, orig_addr, orig_port, nat_addr, nat_port) = r;
            // SAFETY: this CPU's scratch entry, used by this program run only.
            let s = unsafe { &mut *s };
            s.fkey = ct_key(
                orig_addr,
                nat_addr,
                orig_port,
                nat_port,
                flow.proto,
                flow.family,
                CT_FORWARD,
            );
            // SAFETY: plain-data field read at once.
            let live = unsafe { CONNTRACK.get(&s.fkey) }.is_some_and(|f| f.flags & CT_CLOSING == 0);
            if flags & CT_CLOSING != 0 || !live {
                let _ = CONNTRACK.remove(&stale);
            }
        }
    }
    let rkey = ct_key(
        flow.saddr,
        flow.daddr,
        flow.sport_be,
        flow.dport_be,
        flow.proto,
        flow.family,
        CT_REVERSE,
    );
    match CONNTRACK.get_ptr_mut(rkey) {
        Some(ct) => {
            touch(ct, unsafe { bpf_ktime_get_ns() });
            // SAFETY: pointer from a successful lookup; fields copied out.
            let (addr, port_be, flags, orig_addr, orig_port, svc_id) = unsafe {
                (
                    (*ct).nat_addr,
                    (*ct).nat_port_be,
                    (*ct).flags,
                    (*ct).orig_addr,
                    (*ct).orig_port_be,
                    (*ct).svc_id,
                )
            };
            let tcp = flow.proto == IPPROTO_TCP;
            let closing = tcp && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0;
            // The backend's SYN-ACK of a new connection on a reused tuple.
            let reopened = tcp && flow.tcp_flags & TCP_SYN != 0;
            if closing || (reopened && flags & CT_CLOSING != 0) {
                mark_closing(ct, closing, reopened);
                // The forward entry: client to frontend (for SNATed flows too: the reverse
                // entry keeps the client as its original address).
                if let Some(s) = CT_SCRATCH.get_ptr_mut(0) {
                    // SAFETY: this CPU's scratch entry, used by this program run only.
                    let s = unsafe { &mut *s };
                    s.fkey = ct_key(
                        orig_addr,
                        addr,
                        orig_port,
                        port_be,
                        flow.proto,
                        flow.family,
                        CT_FORWARD,
                    );
                    if let Some(f) = CONNTRACK.get_ptr_mut(&s.fkey) {
                        mark_closing(f, closing, reopened);
                    }
                }
            }
            Verdict::ReverseNat {
                addr,
                port_be,
                unsnat: Nat::when(flags & CT_SNAT != 0, orig_addr, orig_port),
                svc_id,
            }
        }
        None => Verdict::Pass(Counter::PassedNoMatch),
    }
}

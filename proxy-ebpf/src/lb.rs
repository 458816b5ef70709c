//! Service lookup, backend choice and conntrack: the decision every hook makes the same way.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use proxy_common::{
    AF_INET, BackendKey, CT_FORWARD, CT_REVERSE, Counter, CtKey, CtValue, ServiceKey, SlotKey,
};

use crate::{
    maps::{BACKENDS, CONNTRACK, SERVICES, SLOTS},
    parse::Flow,
};

/// What to do with a packet.
pub enum Verdict {
    /// Rewrite the destination to this backend.
    Dnat {
        addr: u32,
        port_be: u16,
        counter: Counter,
    },
    /// Rewrite the source back to the frontend the client dialled.
    ReverseNat {
        addr: u32,
        port_be: u16,
    },
    Pass(Counter),
    Drop(Counter),
}

/// Refresh timestamps at most this often, to keep writes off most packets.
const TOUCH_NS: u64 = 1_000_000_000;

#[inline(always)]
fn v4(a: u32) -> [u32; 4] {
    [a, 0, 0, 0]
}

#[inline(always)]
fn ct_key(saddr: u32, daddr: u32, sport_be: u16, dport_be: u16, proto: u8, dir: u8) -> CtKey {
    CtKey {
        saddr: v4(saddr),
        daddr: v4(daddr),
        sport_be,
        dport_be,
        proto,
        family: AF_INET,
        dir,
        _pad: 0,
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

#[inline(always)]
pub fn decide(flow: &Flow) -> Verdict {
    let skey = ServiceKey {
        addr: v4(flow.daddr),
        port_be: flow.dport_be,
        proto: flow.proto,
        scope: 0,
    };
    // SAFETY: plain-data value copied out at once.
    match unsafe { SERVICES.get(skey) } {
        Some(svc) => forward(flow, svc.svc_id, svc.count),
        None => reverse(flow),
    }
}

#[inline(always)]
fn forward(flow: &Flow, svc_id: u32, count: u32) -> Verdict {
    if count == 0 {
        return Verdict::Drop(Counter::DroppedNoBackend);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let fkey = ct_key(
        flow.saddr,
        flow.daddr,
        flow.sport_be,
        flow.dport_be,
        flow.proto,
        CT_FORWARD,
    );
    let mut reselected = false;
    if let Some(ct) = CONNTRACK.get_ptr_mut(fkey) {
        // SAFETY: pointer from a successful lookup; fields copied out.
        let (backend_id, nat_addr, nat_port, ct_svc) = unsafe {
            (
                (*ct).backend_id,
                (*ct).nat_addr[0],
                (*ct).nat_port_be,
                (*ct).svc_id,
            )
        };
        // The backend must still exist with the same address: ids of removed backends are gone.
        if let Some(b) = unsafe { BACKENDS.get(BackendKey { backend_id }) }
            && ct_svc == svc_id
            && b.addr[0] == nat_addr
            && b.port_be == nat_port
        {
            touch(ct, now);
            return Verdict::Dnat {
                addr: nat_addr,
                port_be: nat_port,
                counter: Counter::TranslatedEstablished,
            };
        }
        reselected = true;
    }

    let slot = unsafe { bpf_get_prandom_u32() } % count;
    let Some(sv) = (unsafe { SLOTS.get(SlotKey { svc_id, slot }) }) else {
        return Verdict::Drop(Counter::DroppedBackendMissing);
    };
    let backend_id = sv.backend_id;
    let Some(b) = (unsafe { BACKENDS.get(BackendKey { backend_id }) }) else {
        return Verdict::Drop(Counter::DroppedBackendMissing);
    };
    let (baddr, bport) = (b.addr[0], b.port_be);

    let fval = CtValue {
        nat_addr: v4(baddr),
        nat_port_be: bport,
        flags: 0,
        backend_id,
        svc_id,
        _pad: 0,
        last_seen_ns: now,
    };
    let rkey = ct_key(
        baddr,
        flow.saddr,
        bport,
        flow.sport_be,
        flow.proto,
        CT_REVERSE,
    );
    let rval = CtValue {
        nat_addr: v4(flow.daddr),
        nat_port_be: flow.dport_be,
        flags: 0,
        backend_id,
        svc_id,
        _pad: 0,
        last_seen_ns: now,
    };
    // Reverse entry first: a reply must never find a forward entry without its way back.
    if CONNTRACK.insert(rkey, rval, 0).is_err() || CONNTRACK.insert(fkey, fval, 0).is_err() {
        return Verdict::Drop(Counter::DroppedConntrackFull);
    }
    Verdict::Dnat {
        addr: baddr,
        port_be: bport,
        counter: if reselected {
            Counter::Reselected
        } else {
            Counter::TranslatedNew
        },
    }
}

#[inline(always)]
fn reverse(flow: &Flow) -> Verdict {
    let rkey = ct_key(
        flow.saddr,
        flow.daddr,
        flow.sport_be,
        flow.dport_be,
        flow.proto,
        CT_REVERSE,
    );
    match CONNTRACK.get_ptr_mut(rkey) {
        Some(ct) => {
            touch(ct, unsafe { bpf_ktime_get_ns() });
            // SAFETY: pointer from a successful lookup; fields copied out.
            let (addr, port_be) = unsafe { ((*ct).nat_addr[0], (*ct).nat_port_be) };
            Verdict::ReverseNat { addr, port_be }
        }
        None => Verdict::Pass(Counter::PassedNoMatch),
    }
}

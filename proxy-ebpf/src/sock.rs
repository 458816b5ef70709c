//! Socket LB at cgroup sock_addr hooks: a ClusterIP is translated once, when a socket connects
//! (or sends an unconnected datagram), so the flow needs no per-packet NAT; recvmsg and
//! getpeername show the frontend again. Backend choice is the tc path's (`lb.rs`). IPv4, IPv6,
//! and IPv4-mapped IPv6 addresses on dual-stack sockets.
use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
    AF_INET, AF_INET6, CT_FORWARD, CT_REVERSE, Counter, IPPROTO_TCP, IPPROTO_UDP, SCOPE_INTERNAL,
    SVC_NO_LOCAL, SockKey, SockValue, SvcCounter,
};

use crate::{
    lb::{Chosen, Client, backend_valid, choose, lookup_service},
    maps::{SOCKETS, count, count_svc},
};

/// The hooks' verdicts: 1 lets the call proceed, 0 fails it (EPERM, or the error set by
/// `bpf_set_retval`).
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Nonzero when the kernel has `bpf_set_retval` for cgroup programs (Linux 5.18): the loader
/// clears it on older kernels, whose verifier then never sees the call (a branch on a frozen
/// read-only global is pruned at load time).
#[unsafe(no_mangle)]
static SOCK_SET_RETVAL: u8 = 1;

/// A connect or send to a frontend without any endpoint: kube-proxy's REJECT answers its first
/// packet with an ICMP port unreachable, which fails a TCP connect (and a connected UDP
/// socket's next call) with ECONNREFUSED. The socket hook fails the call with that error
/// directly; for an unconnected UDP send, where the ICMP would reach the socket only as a
/// queued error (IP_RECVERR), the send itself fails with ECONNREFUSED. Before Linux 5.18 the
/// call fails with EPERM instead.
#[inline(always)]
fn refuse(svc_id: u32) -> i32 {
    count_svc(svc_id, SvcCounter::Rejected, false);
    // SAFETY: a read of a read-only global.
    if unsafe { core::ptr::read_volatile(&SOCK_SET_RETVAL) } != 0 {
        // SAFETY: a plain helper call; it only sets the error the syscall returns.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        count(Counter::SockRejectedNoBackend);
    } else {
        count(Counter::SockDroppedNoBackend);
    }
    REFUSE
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    forward::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    forward::<true>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward::<true>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse::<true>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse::<true>(&ctx)
}

/// ::ffff:0:0/96 as it sits in memory (network order words).
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

// Each hook is compiled for one socket family (`V6`): the verifier refuses context accesses at
// computed offsets, which a shared code path would produce.

/// The address a socket call names, as the maps key it: (address words, family), or None for
/// families the proxy does not handle. A dual-stack socket dialling ::ffff:a.b.c.d means the
/// IPv4 address.
#[inline(always)]
fn user_addr<const V6: bool>(sa: &bpf_sock_addr) -> Option<([u32; 4], u8)> {
    if !V6 {
        (sa.user_family == AF_INET as u32).then_some(([sa.user_ip4, 0, 0, 0], AF_INET))
    } else if sa.user_family == AF_INET6 as u32 {
        let w = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        if w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED {
            Some(([w[3], 0, 0, 0], AF_INET))
        } else {
            Some((w, AF_INET6))
        }
    } else {
        None
    }
}

/// Writes `addr` (of `family`) back into the call's address, in the socket's own family.
#[inline(always)]
fn set_user_addr<const V6: bool>(sa: &mut bpf_sock_addr, addr: [u32; 4], family: u8, port_be: u16) {
    if !V6 {
        sa.user_ip4 = addr[0];
    } else if family == AF_INET {
        sa.user_ip6[3] = addr[0];
    } else {
        sa.user_ip6[0] = addr[0];
        sa.user_ip6[1] = addr[1];
        sa.user_ip6[2] = addr[2];
        sa.user_ip6[3] = addr[3];
    }
    sa.user_port = port_be as u32;
}

#[inline(always)]
fn key(cookie: u64, addr: [u32; 4], family: u8, port_be: u16, dir: u8) -> SockKey {
    SockKey {
        cookie,
        addr,
        port_be,
        family,
        dir,
        _pad: 0,
    }
}

#[inline(always)]
fn forward<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some((vip, family)) = user_addr::<V6>(sa) else {
        return ALLOW;
    };
    let proto = sa.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let vport = sa.user_port as u16;
    let Some(svc) = lookup_service(vip, vport, proto, SCOPE_INTERNAL, family) else {
        return ALLOW;
    };
    if svc.count == 0 {
        if svc.flags & SVC_NO_LOCAL != 0 {
            // Local policy without a local endpoint: kube-proxy drops, the client times out.
            // Left untranslated, the packets meet the tc path's drop (counted there).
            return ALLOW;
        }
        return refuse(svc.svc_id);
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let fkey = key(cookie, vip, family, vport, CT_FORWARD);
    // A socket keeps its backend for a frontend (unconnected UDP sends included), as a
    // conntrack entry would, until that backend is removed.
    // SAFETY: plain-data value copied out at once.
    let kept = unsafe { SOCKETS.get(fkey) }
        .copied()
        .filter(|v| v.svc_id == svc.svc_id && backend_valid(v.backend_id, v.addr, v.port_be));
    let chosen = match kept {
        Some(v) => Chosen {
            backend_id: v.backend_id,
            addr: v.addr,
            port_be: v.port_be,
            local: false,
        },
        None => match choose(
            &svc,
            Client::Netns(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }),
            unsafe { bpf_get_prandom_u32() },
        ) {
            Some(c) => c,
            None => return ALLOW, // mid-update: let the tc path handle it
        },
    };
    if kept.is_none() {
        let fval = SockValue {
            addr: chosen.addr,
            port_be: chosen.port_be,
            _pad: 0,
            backend_id: chosen.backend_id,
            svc_id: svc.svc_id,
        };
        let rval = SockValue {
            addr: vip,
            port_be: vport,
            _pad: 0,
            backend_id: chosen.backend_id,
            svc_id: svc.svc_id,
        };
        let rkey = key(cookie, chosen.addr, family, chosen.port_be, CT_REVERSE);
        if SOCKETS.insert(rkey, rval, 0).is_err() || SOCKETS.insert(fkey, fval, 0).is_err() {
            // Without the reverse entry the application would see the backend: leave the
            // socket to the tc path instead.
            return ALLOW;
        }
    }
    set_user_addr::<V6>(sa, chosen.addr, family, chosen.port_be);
    count(Counter::SockTranslated);
    if kept.is_none() {
        count_svc(svc.svc_id, SvcCounter::NewFlows, false);
    }
    ALLOW
}

#[inline(always)]
fn reverse<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some((addr, family)) = user_addr::<V6>(sa) else {
        return ALLOW;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rkey = key(cookie, addr, family, sa.user_port as u16, CT_REVERSE);
    // SAFETY: plain-data value copied out at once.
    if let Some(v) = unsafe { SOCKETS.get(rkey) }.copied() {
        set_user_addr::<V6>(sa, v.addr, family, v.port_be);
        count(Counter::SockReverseTranslated);
    }
    ALLOW
}

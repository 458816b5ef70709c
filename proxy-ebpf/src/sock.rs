//! Socket LB at cgroup sock_addr hooks: a ClusterIP is translated once, when a socket connects
//! (or sends an unconnected datagram), so the flow needs no per-packet NAT; recvmsg and
//! getpeername show the frontend again. Backend choice is the tc path's (`lb.rs`).
use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
    AF_INET, CT_FORWARD, CT_REVERSE, Counter, IPPROTO_TCP, IPPROTO_UDP, SockKey, SockValue,
};

use crate::{
    lb::{Chosen, backend_valid, lookup_service, select_backend, v4},
    maps::{SOCKETS, count},
};

/// The hooks' verdicts: 1 lets the call proceed, 0 fails it with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[inline(always)]
fn key(cookie: u64, addr: u32, port_be: u16, dir: u8) -> SockKey {
    SockKey {
        cookie,
        addr: v4(addr),
        port_be,
        family: AF_INET,
        dir,
        _pad: 0,
    }
}

#[inline(always)]
fn forward(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_family != AF_INET as u32 {
        return ALLOW;
    }
    let proto = sa.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let (vip, vport) = (sa.user_ip4, sa.user_port as u16);
    let Some(svc) = lookup_service(vip, vport, proto) else {
        return ALLOW;
    };
    if svc.count == 0 {
        // kube-proxy rejects connections to Services without endpoints.
        count(Counter::SockDroppedNoBackend);
        return REFUSE;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let fkey = key(cookie, vip, vport, CT_FORWARD);
    // A socket keeps its backend for a frontend (unconnected UDP sends included), as a
    // conntrack entry would, until that backend is removed.
    // SAFETY: plain-data value copied out at once.
    let kept = unsafe { SOCKETS.get(fkey) }
        .copied()
        .filter(|v| v.svc_id == svc.svc_id && backend_valid(v.backend_id, v.addr[0], v.port_be));
    let chosen = match kept {
        Some(v) => Chosen {
            backend_id: v.backend_id,
            addr: v.addr[0],
            port_be: v.port_be,
        },
        None => match select_backend(svc.svc_id, svc.count) {
            Some(c) => c,
            None => return ALLOW, // mid-update: let the tc path handle it
        },
    };
    if kept.is_none() {
        let fval = SockValue {
            addr: v4(chosen.addr),
            port_be: chosen.port_be,
            _pad: 0,
            backend_id: chosen.backend_id,
            svc_id: svc.svc_id,
        };
        let rval = SockValue {
            addr: v4(vip),
            port_be: vport,
            _pad: 0,
            backend_id: chosen.backend_id,
            svc_id: svc.svc_id,
        };
        let rkey = key(cookie, chosen.addr, chosen.port_be, CT_REVERSE);
        if SOCKETS.insert(rkey, rval, 0).is_err() || SOCKETS.insert(fkey, fval, 0).is_err() {
            // Without the reverse entry the application would see the backend: leave the
            // socket to the tc path instead.
            return ALLOW;
        }
    }
    sa.user_ip4 = chosen.addr;
    sa.user_port = chosen.port_be as u32;
    count(Counter::SockTranslated);
    ALLOW
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_family != AF_INET as u32 {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rkey = key(cookie, sa.user_ip4, sa.user_port as u16, CT_REVERSE);
    // SAFETY: plain-data value copied out at once.
    if let Some(v) = unsafe { SOCKETS.get(rkey) }.copied() {
        sa.user_ip4 = v.addr[0];
        sa.user_port = v.port_be as u32;
        count(Counter::SockReverseTranslated);
    }
    ALLOW
}

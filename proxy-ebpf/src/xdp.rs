//! XDP on external interfaces: NodePort, LoadBalancer and externalIP traffic to a backend on
//! another node, and the replies, translated and sent back out at the driver, before any
//! socket buffer exists. The decision is the tc path's own (`lb::decide`, the same conntrack),
//! so a flow is handled the same way whichever hook sees a packet. Everything XDP does not
//! finish (other traffic, local backends, fragments, IP options... or a next hop the FIB cannot
//! resolve yet) is passed on unchanged: tc ingress then finds the conntrack entry and
//! translates it.
use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    macros::xdp,
    programs::XdpContext,
};
use proxy_common::{
    AF_INET, AF_INET6, CT_UNCOUNTED, CT_XDP, Counter, IPPROTO_TCP, IPPROTO_UDP, SvcCounter,
};

use crate::{
    lb::{Nat, Verdict, decide},
    maps::{CONNTRACK, CT_SCRATCH, INTERFACES, count, count_svc},
    parse::{ETH_HLEN, ETH_P_IPV6, Flow},
};

const ETH_P_IP: u16 = 0x0800;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// `struct bpf_fib_lookup` (64 bytes), with its unions flattened to the members used here.
#[repr(C)]
struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport: u16,
    dport: u16,
    /// In: the L3 length (host order), checked against the route's MTU. Out: the MTU.
    tot_len: u16,
    ifindex: u32,
    flowinfo: u32,
    src: [u32; 4],
    dst: [u32; 4],
    vlan: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// Reads a field of the packet through bpf_xdp_load_bytes rather than direct packet access:
/// LLVM rewrites bounds checks on packet pointers into forms the verifier refuses (arithmetic
/// on the end pointer), and the helper checks the bounds itself.
#[inline(always)]
fn get<T: Copy + Default>(ctx: &XdpContext, off: usize) -> Option<T> {
    let mut v = T::default();
    // SAFETY: `v` is a `T` the helper fills with `size_of::<T>()` bytes.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            off as u32,
            &mut v as *mut T as *mut _,
            core::mem::size_of::<T>() as u32,
        )
    };
    (rc == 0).then_some(v)
}

#[inline(always)]
fn put<T>(ctx: &XdpContext, off: usize, v: T) -> Option<()> {
    let mut v = v;
    // SAFETY: `v` is `size_of::<T>()` bytes the helper copies into the packet.
    let rc = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            off as u32,
            &mut v as *mut T as *mut _,
            core::mem::size_of::<T>() as u32,
        )
    };
    (rc == 0).then_some(())
}

/// Parses an unfragmented IPv4 packet without options or an IPv6 packet without extension
/// headers, carrying TCP or UDP. Anything else is left to tc (`None`). Inlined: as a separate
/// function LLVM would pass it the packet pointers, and the verifier refuses arithmetic on a
/// packet end pointer it sees shifted.
#[inline(always)]
fn parse(ctx: &XdpContext, flow: &mut Flow) -> Option<()> {
    let ethertype = u16::from_be(get::<u16>(ctx, 12)?);
    let l3 = ETH_HLEN;
    let l4;
    if ethertype == ETH_P_IP {
        let vihl: u8 = get(ctx, l3)?;
        let frag = u16::from_be(get::<u16>(ctx, l3 + 6)?);
        // Options (ihl > 5) and fragments go the tc way, which handles them.
        if vihl != 0x45 || frag & 0x3fff != 0 {
            return None;
        }
        // A header with a bad checksum goes to the kernel, which drops and counts it; sent
        // on from here it would only be dropped one hop later.
        let mut sum = 0u32;
        for i in 0..5 {
            let w: u32 = get(ctx, l3 + 4 * i)?;
            sum += (w & 0xffff) + (w >> 16);
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        if sum != 0xffff {
            return None;
        }
        flow.proto = get(ctx, l3 + 9)?;
        flow.saddr = [get(ctx, l3 + 12)?, 0, 0, 0];
        flow.daddr = [get(ctx, l3 + 16)?, 0, 0, 0];
        flow.family = AF_INET;
        l4 = l3 + 20;
    } else if ethertype == ETH_P_IPV6 {
        let vtc: u8 = get(ctx, l3)?;
        if vtc >> 4 != 6 {
            return None;
        }
        flow.proto = get(ctx, l3 + 6)?;
        for i in 0..4 {
            flow.saddr[i] = get(ctx, l3 + 8 + 4 * i)?;
            flow.daddr[i] = get(ctx, l3 + 24 + 4 * i)?;
        }
        flow.family = AF_INET6;
        l4 = l3 + 40;
    } else {
        return None;
    }
    if flow.proto == IPPROTO_TCP {
        flow.tcp_flags = get(ctx, l4 + 13)?;
        // The checksum must be inside the packet too.
        get::<u16>(ctx, l4 + 16)?;
    } else if flow.proto == IPPROTO_UDP {
        get::<u16>(ctx, l4 + 6)?;
    } else {
        return None;
    }
    flow.sport_be = get(ctx, l4)?;
    flow.dport_be = get(ctx, l4 + 2)?;
    flow.l3_off = l3;
    flow.l4_off = l4;
    flow.has_l4 = true;
    Some(())
}

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    let mut flow = Flow::default();
    if parse(&ctx, &mut flow).is_none() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: plain-data value copied out at once.
    let Some(iface) = (unsafe { INTERFACES.get(ifindex) }).copied() else {
        return xdp_action::XDP_PASS;
    };
    let verdict = decide(&flow, Some(iface), CT_XDP);
    match verdict {
        // Not counted here: tc counts the packet when it passes. A reject is built by tc too
        // (it has the helpers to resize the packet and checksum it).
        Verdict::Pass(_) | Verdict::Reject(_) => xdp_action::XDP_PASS,
        Verdict::Drop(c, svc_id) => {
            count(c);
            count(Counter::XdpDropped);
            count_svc(svc_id, SvcCounter::of_drop(c), false);
            xdp_action::XDP_DROP
        }
        _ => {
            let action = transmit(ctx.ctx, &flow, &verdict, ifindex);
            // The frontend's counter, counted here rather than in `transmit`: the verifier
            // allows 512 bytes of stack along a call chain, and `transmit`'s frame is large.
            let (svc_id, c, new) = match verdict {
                Verdict::Dnat {
                    svc_id, counter, ..
                } => (
                    svc_id,
                    SvcCounter::Packets,
                    matches!(counter, Counter::TranslatedNew | Counter::Reselected),
                ),
                Verdict::ReverseNat { svc_id, .. } => (svc_id, SvcCounter::Replies, false),
                _ => (0, SvcCounter::Packets, false),
            };
            match action {
                // tc counts what it is passed.
                xdp_action::XDP_PASS => {
                    if new {
                        mark_uncounted();
                    }
                }
                xdp_action::XDP_DROP => count_svc(svc_id, SvcCounter::DroppedOther, false),
                _ => count_svc(svc_id, c, new),
            }
            action
        }
    }
}

/// The flow XDP just recorded goes to tc uncounted: flag its forward entry (its key is still
/// in the scratch map) so tc counts it as new. The key is passed by reference: by value it
/// would be copied onto the stack.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn mark_uncounted() {
    if let Some(s) = CT_SCRATCH.get_ptr_mut(0)
        // SAFETY: this CPU's scratch entry, written by this program run.
        && let Some(ct) = CONNTRACK.get_ptr_mut(unsafe { &(*s).fkey })
    {
        // SAFETY: pointer from a successful lookup.
        unsafe { (*ct).flags |= CT_UNCOUNTED };
    }
}

/// Ones' complement update of a checksum for a 16-bit word changing from `old` to `new` (RFC
/// 1624); words as read from the packet, so byte order does not matter.
#[inline(always)]
fn csum_replace2(csum: u16, old: u16, new: u16) -> u16 {
    let mut s = (!csum) as u32 + (!old) as u32 + new as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let c = csum_replace2(csum, old as u16, new as u16);
    csum_replace2(c, (old >> 16) as u16, (new >> 16) as u16)
}

/// Where the translated packet goes: the FIB's next hop out of this interface (XDP_TX) or of
/// another external interface (redirect). Anything else (a pod interface, no neighbour entry
/// yet, too big for the route's MTU, TTL running out) is passed on untouched for tc and the
/// kernel to handle; the conntrack entry the decision made keeps the flow consistent.
#[inline(never)]
fn transmit(md: *mut xdp_md, flow: &Flow, verdict: &Verdict, ifindex: u32) -> u32 {
    let ctx = &XdpContext::new(md);
    let pass = xdp_action::XDP_PASS;
    // New (source, destination) of the packet, and the counter its translation moves.
    let (src, dst, counter, snat_new) = match *verdict {
        Verdict::Dnat {
            addr,
            port_be,
            snat,
            counter,
            ..
        } => {
            let src = if snat.on {
                snat
            } else {
                Nat::when(true, flow.saddr, flow.sport_be)
            };
            let fresh = matches!(counter, Counter::TranslatedNew | Counter::Reselected);
            (
                src,
                Nat::when(true, addr, port_be),
                counter,
                snat.on && fresh,
            )
        }
        Verdict::ReverseNat {
            addr,
            port_be,
            unsnat,
            ..
        } => {
            let dst = if unsnat.on {
                unsnat
            } else {
                Nat::when(true, flow.daddr, flow.dport_be)
            };
            (
                Nat::when(true, addr, port_be),
                dst,
                Counter::ReverseTranslated,
                false,
            )
        }
        _ => return pass,
    };
    let v4 = flow.family == AF_INET;
    let l3 = ETH_HLEN;
    let l4 = if v4 { l3 + 20 } else { l3 + 40 };
    let tot_len = if v4 {
        match get::<u16>(ctx, l3 + 2) {
            Some(l) => u16::from_be(l),
            None => return pass,
        }
    } else {
        match get::<u16>(ctx, l3 + 4) {
            Some(l) => u16::from_be(l).wrapping_add(40),
            None => return pass,
        }
    };
    let mut p = FibParams {
        family: flow.family,
        l4_protocol: flow.proto,
        sport: src.port_be,
        dport: dst.port_be,
        tot_len,
        ifindex,
        flowinfo: 0,
        src: src.addr,
        dst: dst.addr,
        vlan: 0,
        smac: [0; 6],
        dmac: [0; 6],
    };
    // SAFETY: `p` is a `struct bpf_fib_lookup` of the size given.
    let rc = unsafe {
        bpf_fib_lookup(
            md as *mut _,
            &mut p as *mut FibParams as *mut _,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return pass;
    }
    let out = p.ifindex;
    // SAFETY: only presence is checked.
    if out != ifindex && unsafe { INTERFACES.get(out) }.is_none() {
        return pass;
    }
    match rewrite(ctx, flow, v4, l4, &src, &dst) {
        Rewrite::Done => {}
        Rewrite::Untouched => return pass,
        Rewrite::Failed => {
            count(Counter::DroppedRewriteFailed);
            return xdp_action::XDP_DROP;
        }
    }
    if put(ctx, 0, p.dmac).is_none() || put(ctx, 6, p.smac).is_none() {
        count(Counter::DroppedRewriteFailed);
        return xdp_action::XDP_DROP;
    }
    count(counter);
    count(Counter::XdpForwarded);
    if snat_new {
        count(Counter::Snat);
    }
    if out == ifindex {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(out, 0) as u32 }
    }
}

enum Rewrite {
    Done,
    /// Not written at all: pass the packet on.
    Untouched,
    /// Written in part (cannot happen once the checksum field was found in bounds; the
    /// verifier still wants every store checked): the packet must not leave.
    Failed,
}

/// Writes the new addresses and ports with their checksums, and decrements the TTL (hop
/// limit) as the kernel's forwarding would. Untouched if the TTL is about to run out (the
/// kernel then answers with time exceeded). One function per family: LLVM otherwise shares
/// registers between the branches in ways the verifier cannot follow.
#[inline(always)]
fn rewrite(ctx: &XdpContext, flow: &Flow, v4: bool, l4: usize, src: &Nat, dst: &Nat) -> Rewrite {
    if v4 {
        rewrite4(ctx, flow, src, dst)
    } else {
        rewrite6(ctx, flow, l4, src, dst)
    }
}

/// The L4 checksum offset and whether the checksum is in use (UDP over IPv4 may carry none).
#[inline(always)]
fn l4_csum_at(ctx: &XdpContext, flow: &Flow, l4: usize, v4: bool) -> Option<(usize, u16, bool)> {
    let tcp = flow.proto == IPPROTO_TCP;
    let off = if tcp { l4 + 16 } else { l4 + 6 };
    let c: u16 = get(ctx, off)?;
    Some((off, c, tcp || !v4 || c != 0))
}

/// The L4 checksum after the port changes; `on` false leaves a UDP "no checksum" alone.
#[inline(always)]
fn finish_l4(
    ctx: &XdpContext,
    flow: &Flow,
    l4: usize,
    at: (usize, bool),
    c: u16,
    src: &Nat,
    dst: &Nat,
) -> Option<()> {
    let mut c = csum_replace2(c, flow.sport_be, src.port_be);
    c = csum_replace2(c, flow.dport_be, dst.port_be);
    if at.1 {
        // A computed UDP checksum of zero is sent as all ones (zero means "none").
        if flow.proto != IPPROTO_TCP && c == 0 {
            c = 0xffff;
        }
        put(ctx, at.0, c)?;
    }
    put(ctx, l4, src.port_be)?;
    put(ctx, l4 + 2, dst.port_be)
}

#[inline(always)]
fn rewrite4(ctx: &XdpContext, flow: &Flow, src: &Nat, dst: &Nat) -> Rewrite {
    let l3 = ETH_HLEN;
    let l4 = l3 + 20;
    let (Some((off, c, on)), Some(ttl), Some(ip_csum)) = (
        l4_csum_at(ctx, flow, l4, true),
        get::<u8>(ctx, l3 + 8),
        get::<u16>(ctx, l3 + 10),
    ) else {
        return Rewrite::Untouched;
    };
    if ttl <= 1 {
        return Rewrite::Untouched;
    }
    // TTL and protocol share a 16-bit word of the header checksum.
    let old_word = u16::from_be_bytes([ttl, flow.proto]);
    let new_word = u16::from_be_bytes([ttl - 1, flow.proto]);
    let mut ic = csum_replace2(ip_csum, old_word.to_be(), new_word.to_be());
    ic = csum_replace4(ic, flow.saddr[0], src.addr[0]);
    ic = csum_replace4(ic, flow.daddr[0], dst.addr[0]);
    let mut c4 = csum_replace4(c, flow.saddr[0], src.addr[0]);
    c4 = csum_replace4(c4, flow.daddr[0], dst.addr[0]);
    let done = (|| {
        put(ctx, l3 + 8, ttl - 1)?;
        put(ctx, l3 + 10, ic)?;
        put(ctx, l3 + 12, src.addr[0])?;
        put(ctx, l3 + 16, dst.addr[0])?;
        finish_l4(ctx, flow, l4, (off, on), c4, src, dst)
    })();
    match done {
        Some(()) => Rewrite::Done,
        None => Rewrite::Failed,
    }
}

#[inline(always)]
fn rewrite6(ctx: &XdpContext, flow: &Flow, l4: usize, src: &Nat, dst: &Nat) -> Rewrite {
    let l3 = ETH_HLEN;
    let (Some((off, c, on)), Some(hop)) =
        (l4_csum_at(ctx, flow, l4, false), get::<u8>(ctx, l3 + 7))
    else {
        return Rewrite::Untouched;
    };
    if hop <= 1 {
        return Rewrite::Untouched;
    }
    let mut c6 = c;
    for i in 0..4 {
        c6 = csum_replace4(c6, flow.saddr[i], src.addr[i]);
        c6 = csum_replace4(c6, flow.daddr[i], dst.addr[i]);
    }
    let done = (|| {
        put(ctx, l3 + 7, hop - 1)?;
        for i in 0..4 {
            put(ctx, l3 + 8 + 4 * i, src.addr[i])?;
            put(ctx, l3 + 24 + 4 * i, dst.addr[i])?;
        }
        finish_l4(ctx, flow, l4, (off, on), c6, src, dst)
    })();
    match done {
        Some(()) => Rewrite::Done,
        None => Rewrite::Failed,
    }
}

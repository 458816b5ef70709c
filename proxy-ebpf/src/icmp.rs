//! ICMP and ICMPv6 errors about translated flows (port unreachable, fragmentation needed or
//! packet too big, time exceeded): the error quotes the translated packet, so the client would
//! not match it to its socket. Its outer source (when the backend itself reports), the quoted destination (and, for SNATed
//! flows, the outer destination and quoted source) are restored from the reverse conntrack
//! entry, with the IP, quoted-IP and ICMP checksums kept valid. Path MTU discovery then works
//! through the proxy.
use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{
    AF_INET, AF_INET6, CT_REVERSE, CT_SNAT, Counter, CtKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    maps::CONNTRACK,
    parse::{ETH_HLEN, ETH_P_IPV6},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Offsets and values of an ICMP error about a TCP/UDP packet.
struct IcmpError {
    outer_saddr: u32,
    outer_daddr: u32,
    icmp_off: usize,
    inner_off: usize,
    inner_l4: usize,
    inner_saddr: u32,
    inner_daddr: u32,
    inner_sport: u16,
    inner_dport: u16,
    inner_proto: u8,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<IcmpError> {
    let l3 = ETH_HLEN;
    let vihl: u8 = ctx.load(l3).ok()?;
    let ihl = (vihl & 0x0f) as usize * 4;
    let proto: u8 = ctx.load(l3 + 9).ok()?;
    let frag = u16::from_be(ctx.load::<u16>(l3 + 6).ok()?);
    if vihl >> 4 != 4 || ihl < 20 || proto != IPPROTO_ICMP || frag & 0x1fff != 0 {
        return None;
    }
    let icmp_off = l3 + ihl;
    let kind: u8 = ctx.load(icmp_off).ok()?;
    if !matches!(
        kind,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) {
        return None;
    }
    let inner_off = icmp_off + 8;
    let ivihl: u8 = ctx.load(inner_off).ok()?;
    let iihl = (ivihl & 0x0f) as usize * 4;
    if ivihl >> 4 != 4 || iihl < 20 {
        return None;
    }
    let inner_proto: u8 = ctx.load(inner_off + 9).ok()?;
    if inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP {
        return None;
    }
    let inner_l4 = inner_off + iihl;
    Some(IcmpError {
        outer_saddr: ctx.load(l3 + 12).ok()?,
        outer_daddr: ctx.load(l3 + 16).ok()?,
        icmp_off,
        inner_off,
        inner_l4,
        inner_saddr: ctx.load(inner_off + 12).ok()?,
        inner_daddr: ctx.load(inner_off + 16).ok()?,
        // RFC 792: at least the first 8 bytes of the quoted L4 header are included.
        inner_sport: ctx.load(inner_l4).ok()?,
        inner_dport: ctx.load(inner_l4 + 2).ok()?,
        inner_proto,
    })
}

/// Replaces a 4- or 2-byte field inside the ICMP message, keeping the ICMP checksum valid
/// (ICMPv4 has no pseudo-header: only the bytes count).
#[inline(always)]
fn replace_in_icmp<T: Copy + Into<u64>>(
    ctx: &TcContext,
    e: &IcmpError,
    off: usize,
    old: T,
    new: T,
) -> Result<(), ()> {
    let size = core::mem::size_of::<T>() as u64;
    ctx.l4_csum_replace(e.icmp_off + 2, old.into(), new.into(), size)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

/// Rewrites the quoted IPv4 address at `addr_off` and fixes the quoted header's checksum; both
/// changes are inside the ICMP message, so the ICMP checksum follows each.
#[inline(always)]
fn replace_inner_addr(
    ctx: &TcContext,
    e: &IcmpError,
    addr_off: usize,
    old: u32,
    new: u32,
) -> Result<(), ()> {
    let csum_off = e.inner_off + 10;
    let old_csum: u16 = ctx.load(csum_off).map_err(|_| ())?;
    // The quoted header's checksum, updated by hand (it is not the packet's L3 checksum).
    let mut sum = !u16::from_be(old_csum) as u32;
    for (o, n) in [(old >> 16, new >> 16), (old & 0xffff, new & 0xffff)] {
        // Addresses are in network order in memory: fold them as big-endian halves.
        let (o, n) = (u16::from_be(o as u16) as u32, u16::from_be(n as u16) as u32);
        sum += !o & 0xffff;
        sum += n;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let new_csum = (!(sum as u16)).to_be();
    replace_in_icmp(ctx, e, addr_off, old, new)?;
    replace_in_icmp(ctx, e, csum_off, old_csum, new_csum)
}

/// Translates an ICMP or ICMPv6 error about a translated flow. `Some(counter)` when handled.
///
/// Separate BPF functions (not inlined): their stack frames are then not added to the main
/// path's, which has to stay within the verifier's 512 bytes.
#[inline(never)]
pub fn translate(skb: *mut __sk_buff) -> Option<Result<Counter, Counter>> {
    let ethertype: u16 = TcContext::new(skb).load(12).ok()?;
    if u16::from_be(ethertype) == ETH_P_IPV6 {
        translate6(skb)
    } else {
        translate4(skb)
    }
}

#[inline(never)]
fn translate4(skb: *mut __sk_buff) -> Option<Result<Counter, Counter>> {
    let ctx = &TcContext::new(skb);
    let e = parse(ctx)?;
    // The quoted packet went backend-ward: its reply-direction key is the reverse entry.
    let rkey = CtKey {
        saddr: [e.inner_daddr, 0, 0, 0],
        daddr: [e.inner_saddr, 0, 0, 0],
        sport_be: e.inner_dport,
        dport_be: e.inner_sport,
        proto: e.inner_proto,
        family: AF_INET,
        dir: CT_REVERSE,
        _pad: 0,
    };
    // SAFETY: plain-data value copied out at once.
    let ct = unsafe { CONNTRACK.get(rkey) }.copied()?;
    let (vip, vport) = (ct.nat_addr[0], ct.nat_port_be);
    let rewrite = || -> Result<(), ()> {
        // Quoted destination: the backend becomes the frontend the client dialled.
        replace_inner_addr(ctx, &e, e.inner_off + 16, e.inner_daddr, vip)?;
        replace_in_icmp(ctx, &e, e.inner_l4 + 2, e.inner_dport, vport)?;
        if ct.flags & CT_SNAT != 0 {
            let (client, cport) = (ct.orig_addr[0], ct.orig_port_be);
            replace_inner_addr(ctx, &e, e.inner_off + 12, e.inner_saddr, client)?;
            replace_in_icmp(ctx, &e, e.inner_l4, e.inner_sport, cport)?;
            outer(ctx, 16, e.outer_daddr, client)?;
        }
        // Reported by the backend itself: it must appear to come from the frontend.
        if e.outer_saddr == e.inner_daddr {
            outer(ctx, 12, e.outer_saddr, vip)?;
        }
        Ok(())
    };
    Some(match rewrite() {
        Ok(()) => Ok(Counter::IcmpTranslated),
        Err(()) => Err(Counter::DroppedRewriteFailed),
    })
}

/// Rewrites an outer IPv4 address (ICMP has no pseudo-header: only the IP checksum changes).
#[inline(always)]
fn outer(ctx: &TcContext, field: usize, old: u32, new: u32) -> Result<(), ()> {
    ctx.l3_csum_replace(ETH_HLEN + 10, old as u64, new as u64, 4)
        .map_err(|_| ())?;
    ctx.store(ETH_HLEN + field, &new, 0).map_err(|_| ())
}

const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;
const IP6_SRC_OFF: usize = ETH_HLEN + 8;
const IP6_DST_OFF: usize = ETH_HLEN + 24;

/// Reads an IPv6 address (network-order words) at `off`.
#[inline(always)]
fn addr6(ctx: &TcContext, off: usize) -> Option<[u32; 4]> {
    Some([
        ctx.load(off).ok()?,
        ctx.load(off + 4).ok()?,
        ctx.load(off + 8).ok()?,
        ctx.load(off + 12).ok()?,
    ])
}

/// Replaces an IPv6 address at `off` word by word, keeping the ICMPv6 checksum (at
/// `icmp_off + 2`) valid. `pseudo`: the address is in the outer header, so it is part of the
/// ICMPv6 pseudo-header (RFC 4443 2.3) rather than of the message.
#[inline(always)]
fn replace_addr6(
    ctx: &TcContext,
    icmp_off: usize,
    off: usize,
    old: [u32; 4],
    new: [u32; 4],
    pseudo: bool,
) -> Result<(), ()> {
    let flags = if pseudo { BPF_F_PSEUDO_HDR as u64 } else { 0 };
    for i in 0..4 {
        if old[i] != new[i] {
            ctx.l4_csum_replace(icmp_off + 2, old[i] as u64, new[i] as u64, flags | 4)
                .map_err(|_| ())?;
            ctx.store(off + 4 * i, &new[i], 0).map_err(|_| ())?;
        }
    }
    Ok(())
}

/// Replaces a quoted port, keeping the ICMPv6 checksum valid.
#[inline(always)]
fn replace_port6(
    ctx: &TcContext,
    icmp_off: usize,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    if old != new {
        ctx.l4_csum_replace(icmp_off + 2, old as u64, new as u64, 2)
            .map_err(|_| ())?;
        ctx.store(off, &new, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// ICMPv6 errors (destination unreachable, packet too big, time exceeded, parameter problem)
/// quoting a translated TCP/UDP packet: the same restoration as for IPv4. IPv6 headers have no
/// checksum, but every changed word, quoted or outer, is covered by the ICMPv6 checksum. Outer
/// and quoted extension headers are not followed (such errors pass unchanged).
#[inline(never)]
fn translate6(skb: *mut __sk_buff) -> Option<Result<Counter, Counter>> {
    let ctx = &TcContext::new(skb);
    let l3 = ETH_HLEN;
    let vtc: u8 = ctx.load(l3).ok()?;
    let next: u8 = ctx.load(l3 + 6).ok()?;
    if vtc >> 4 != 6 || next != IPPROTO_ICMPV6 {
        return None;
    }
    let icmp_off = l3 + 40;
    let kind: u8 = ctx.load(icmp_off).ok()?;
    if !matches!(
        kind,
        ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB
    ) {
        return None;
    }
    let inner = icmp_off + 8;
    let ivtc: u8 = ctx.load(inner).ok()?;
    let inner_proto: u8 = ctx.load(inner + 6).ok()?;
    if ivtc >> 4 != 6 || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP) {
        return None;
    }
    let inner_l4 = inner + 40;
    let inner_saddr = addr6(ctx, inner + 8)?;
    let inner_daddr = addr6(ctx, inner + 24)?;
    let inner_sport: u16 = ctx.load(inner_l4).ok()?;
    let inner_dport: u16 = ctx.load(inner_l4 + 2).ok()?;
    let rkey = CtKey {
        saddr: inner_daddr,
        daddr: inner_saddr,
        sport_be: inner_dport,
        dport_be: inner_sport,
        proto: inner_proto,
        family: AF_INET6,
        dir: CT_REVERSE,
        _pad: 0,
    };
    // SAFETY: plain-data value copied out at once.
    let ct = unsafe { CONNTRACK.get(rkey) }.copied()?;
    let outer_saddr = addr6(ctx, IP6_SRC_OFF)?;
    let outer_daddr = addr6(ctx, IP6_DST_OFF)?;
    let rewrite = || -> Result<(), ()> {
        replace_addr6(ctx, icmp_off, inner + 24, inner_daddr, ct.nat_addr, false)?;
        replace_port6(ctx, icmp_off, inner_l4 + 2, inner_dport, ct.nat_port_be)?;
        if ct.flags & CT_SNAT != 0 {
            replace_addr6(ctx, icmp_off, inner + 8, inner_saddr, ct.orig_addr, false)?;
            replace_port6(ctx, icmp_off, inner_l4, inner_sport, ct.orig_port_be)?;
            replace_addr6(ctx, icmp_off, IP6_DST_OFF, outer_daddr, ct.orig_addr, true)?;
        }
        if outer_saddr == inner_daddr {
            replace_addr6(ctx, icmp_off, IP6_SRC_OFF, outer_saddr, ct.nat_addr, true)?;
        }
        Ok(())
    };
    Some(match rewrite() {
        Ok(()) => Ok(Counter::IcmpTranslated),
        Err(()) => Err(Counter::DroppedRewriteFailed),
    })
}

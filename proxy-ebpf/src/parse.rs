//! Header parsing shared by every hook: one `Flow` per packet, or the reason it has none.
use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use proxy_common::{AF_INET, AF_INET6, Counter, FragKey, FragValue, IPPROTO_TCP, IPPROTO_UDP};

use crate::maps::FRAGMENTS;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// A TCP/UDP packet's addressing (IPv4 in word 0, or IPv6), with the offsets needed to
/// rewrite it.
#[derive(Clone, Copy, Default)]
pub struct Flow {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub family: u8,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub l3_off: usize,
    pub l4_off: usize,
    /// False for non-first fragments: they carry no L4 header to rewrite.
    pub has_l4: bool,
    /// TCP flags (0 for UDP and later fragments).
    pub tcp_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Parses an Ethernet frame; `Err` carries the counter that says why the packet is passed.
///
/// A separate BPF function that fills `out` (a returned `Result<Flow, _>` would put a niche
/// discriminant inside a union in BTF, which the kernel rejects).
#[inline(never)]
pub fn parse(skb: *mut __sk_buff, out: &mut Flow) -> Result<(), Counter> {
    *out = parse_inline(&TcContext::new(skb))?;
    Ok(())
}

#[inline(always)]
fn parse_inline(ctx: &TcContext) -> Result<Flow, Counter> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| Counter::PassedMalformed)?);
    match ethertype {
        ETH_P_IP => {}
        ETH_P_IPV6 => return parse6(ctx),
        _ => return Err(Counter::PassedNotIp),
    }
    let l3_off = ETH_HLEN;
    let vihl: u8 = ctx.load(l3_off).map_err(|_| Counter::PassedMalformed)?;
    let ihl = (vihl & 0x0f) as usize * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(Counter::PassedMalformed);
    }
    let total_len = u16::from_be(
        ctx.load::<u16>(l3_off + 2)
            .map_err(|_| Counter::PassedMalformed)?,
    ) as usize;
    if total_len < ihl || (ctx.len() as usize) < l3_off + ihl {
        return Err(Counter::PassedMalformed);
    }
    let proto: u8 = ctx.load(l3_off + 9).map_err(|_| Counter::PassedMalformed)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Counter::PassedOtherProtocol);
    }
    let frag = u16::from_be(
        ctx.load::<u16>(l3_off + 6)
            .map_err(|_| Counter::PassedMalformed)?,
    );
    let saddr: u32 = ctx
        .load(l3_off + 12)
        .map_err(|_| Counter::PassedMalformed)?;
    let daddr: u32 = ctx
        .load(l3_off + 16)
        .map_err(|_| Counter::PassedMalformed)?;
    let l4_off = l3_off + ihl;

    let mut flow = Flow {
        saddr: [saddr, 0, 0, 0],
        daddr: [daddr, 0, 0, 0],
        family: AF_INET,
        sport_be: 0,
        dport_be: 0,
        proto,
        l3_off,
        l4_off,
        has_l4: true,
        tcp_flags: 0,
    };
    let fkey = || -> Result<FragKey, Counter> {
        Ok(FragKey {
            saddr: [saddr, 0, 0, 0],
            daddr: [daddr, 0, 0, 0],
            id_be: ctx
                .load::<u16>(l3_off + 4)
                .map_err(|_| Counter::PassedMalformed)? as u32,
            proto,
            family: AF_INET,
            _pad: 0,
        })
    };
    if frag & IP_OFFSET != 0 {
        // A later fragment: the ports come from what its first fragment recorded.
        flow.has_l4 = false;
        // SAFETY: plain-data value copied out at once.
        let ports = unsafe { FRAGMENTS.get(fkey()?) }.ok_or(Counter::PassedFragmentUnknown)?;
        flow.sport_be = ports.sport_be;
        flow.dport_be = ports.dport_be;
        return Ok(flow);
    }
    // TCP needs its checksum field (offset 16) in the packet, UDP its whole 8-byte header.
    let l4_min = if proto == IPPROTO_TCP { 20 } else { 8 };
    if total_len < ihl + l4_min || (ctx.len() as usize) < l4_off + l4_min {
        return Err(Counter::PassedMalformed);
    }
    flow.sport_be = ctx.load(l4_off).map_err(|_| Counter::PassedMalformed)?;
    flow.dport_be = ctx.load(l4_off + 2).map_err(|_| Counter::PassedMalformed)?;
    if proto == IPPROTO_TCP {
        flow.tcp_flags = ctx
            .load(l4_off + 13)
            .map_err(|_| Counter::PassedMalformed)?;
    }
    if frag & IP_MF != 0 {
        let v = FragValue {
            sport_be: flow.sport_be,
            dport_be: flow.dport_be,
        };
        // Best effort: if it fails, later fragments are passed and counted.
        let _ = FRAGMENTS.insert(fkey()?, v, 0);
    }
    Ok(flow)
}

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// IPv6: skips up to four extension headers to the TCP/UDP header. A fragmented datagram is
/// handled as IPv4's: its first fragment (offset 0, more fragments) records its ports, later
/// fragments take them from there (or are passed, counted, when it was not seen), as
/// kube-proxy's conntrack (which reassembles) keeps them on the datagram's flow.
#[inline(always)]
fn parse6(ctx: &TcContext) -> Result<Flow, Counter> {
    let l3_off = ETH_HLEN;
    let m = |_| Counter::PassedMalformed;
    let vtc: u8 = ctx.load(l3_off).map_err(m)?;
    if vtc >> 4 != 6 {
        return Err(Counter::PassedMalformed);
    }
    let word = |o: usize| -> Result<u32, Counter> { ctx.load::<u32>(o).map_err(m) };
    let saddr = [
        word(l3_off + 8)?,
        word(l3_off + 12)?,
        word(l3_off + 16)?,
        word(l3_off + 20)?,
    ];
    let daddr = [
        word(l3_off + 24)?,
        word(l3_off + 28)?,
        word(l3_off + 32)?,
        word(l3_off + 36)?,
    ];
    let fkey = |id_be: u32, proto: u8| FragKey {
        saddr,
        daddr,
        id_be,
        proto,
        family: AF_INET6,
        _pad: 0,
    };
    let mut next: u8 = ctx.load(l3_off + 6).map_err(m)?;
    let mut off = l3_off + 40;
    // The identification of a first fragment, whose ports later fragments need.
    let mut first_fragment = false;
    let mut frag_id = 0u32;
    for _ in 0..4 {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let len: u8 = ctx.load(off + 1).map_err(m)?;
                next = ctx.load(off).map_err(m)?;
                off += (len as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let frag = u16::from_be(ctx.load::<u16>(off + 2).map_err(m)?);
                next = ctx.load(off).map_err(m)?;
                let id: u32 = ctx.load(off + 4).map_err(m)?;
                off += 8;
                if frag & 0xfff8 != 0 {
                    // A later fragment: no L4 header, the ports come from the first fragment.
                    if next != IPPROTO_TCP && next != IPPROTO_UDP {
                        return Err(Counter::PassedOtherProtocol);
                    }
                    // SAFETY: plain-data value copied out at once.
                    let ports = unsafe { FRAGMENTS.get(fkey(id, next)) }
                        .ok_or(Counter::PassedFragmentUnknown)?;
                    return Ok(Flow {
                        saddr,
                        daddr,
                        family: AF_INET6,
                        sport_be: ports.sport_be,
                        dport_be: ports.dport_be,
                        proto: next,
                        l3_off,
                        l4_off: off,
                        has_l4: false,
                        tcp_flags: 0,
                    });
                }
                if frag & 1 != 0 {
                    first_fragment = true;
                    frag_id = id;
                }
            }
            _ => break,
        }
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Err(Counter::PassedOtherProtocol);
    }
    let l4_min = if next == IPPROTO_TCP { 20 } else { 8 };
    if (ctx.len() as usize) < off + l4_min {
        return Err(Counter::PassedMalformed);
    }
    let mut flow = Flow {
        saddr,
        daddr,
        family: AF_INET6,
        sport_be: ctx.load(off).map_err(m)?,
        dport_be: ctx.load(off + 2).map_err(m)?,
        proto: next,
        l3_off,
        l4_off: off,
        has_l4: true,
        tcp_flags: 0,
    };
    if next == IPPROTO_TCP {
        flow.tcp_flags = ctx.load(off + 13).map_err(m)?;
    }
    if first_fragment {
        let v = FragValue {
            sport_be: flow.sport_be,
            dport_be: flow.dport_be,
        };
        // Best effort, as for IPv4.
        let _ = FRAGMENTS.insert(fkey(frag_id, next), v, 0);
    }
    Ok(flow)
}

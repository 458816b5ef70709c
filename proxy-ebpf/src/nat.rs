//! Packet rewrites with incremental checksum updates.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{AF_INET6, IPPROTO_TCP};

use crate::parse::Flow;

const IP_CSUM_OFF: usize = 10;
const IP_SRC_OFF: usize = 12;
const IP_DST_OFF: usize = 16;

#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port of `flow` to `addr:port_be`.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    side: Side,
    addr: [u32; 4],
    port_be: u16,
) -> Result<(), ()> {
    if flow.family == AF_INET6 {
        return rewrite6(ctx, flow, side, addr, port_be);
    }
    let addr = addr[0];
    let (old_addr, old_port, ip_off, port_off) = match side {
        Side::Source => (flow.saddr[0], flow.sport_be, IP_SRC_OFF, 0),
        Side::Destination => (flow.daddr[0], flow.dport_be, IP_DST_OFF, 2),
    };
    if flow.has_l4 {
        let (csum_off, mangled) = if flow.proto == IPPROTO_TCP {
            (flow.l4_off + 16, 0)
        } else {
            // A zero UDP checksum means "none" and must stay zero.
            (flow.l4_off + 6, BPF_F_MARK_MANGLED_0 as u64)
        };
        if old_addr != addr {
            ctx.l4_csum_replace(
                csum_off,
                old_addr as u64,
                addr as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )
            .map_err(|_| ())?;
        }
        if old_port != port_be {
            ctx.l4_csum_replace(csum_off, old_port as u64, port_be as u64, mangled | 2)
                .map_err(|_| ())?;
            ctx.store(flow.l4_off + port_off, &port_be, 0)
                .map_err(|_| ())?;
        }
    }
    if old_addr != addr {
        ctx.l3_csum_replace(flow.l3_off + IP_CSUM_OFF, old_addr as u64, addr as u64, 4)
            .map_err(|_| ())?;
        ctx.store(flow.l3_off + ip_off, &addr, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// IPv6: no header checksum; every changed address word goes into the L4 checksum through the
/// pseudo-header.
#[inline(always)]
fn rewrite6(
    ctx: &TcContext,
    flow: &Flow,
    side: Side,
    addr: [u32; 4],
    port_be: u16,
) -> Result<(), ()> {
    let (old, old_port, ip_off, port_off) = match side {
        Side::Source => (flow.saddr, flow.sport_be, 8, 0),
        Side::Destination => (flow.daddr, flow.dport_be, 24, 2),
    };
    // UDP over IPv6 must never carry a zero checksum (RFC 8200 8.1): a result of zero is sent
    // as 0xffff.
    let (csum_off, mangled) = if flow.proto == IPPROTO_TCP {
        (flow.l4_off + 16, 0)
    } else {
        (flow.l4_off + 6, BPF_F_MARK_MANGLED_0 as u64)
    };
    // A later fragment has no L4 header: its datagram's checksum, in the first fragment, was
    // updated when that was translated.
    for i in 0..4 {
        if old[i] != addr[i] {
            if flow.has_l4 {
                ctx.l4_csum_replace(
                    csum_off,
                    old[i] as u64,
                    addr[i] as u64,
                    BPF_F_PSEUDO_HDR as u64 | mangled | 4,
                )
                .map_err(|_| ())?;
            }
            ctx.store(flow.l3_off + ip_off + 4 * i, &addr[i], 0)
                .map_err(|_| ())?;
        }
    }
    if flow.has_l4 && old_port != port_be {
        ctx.l4_csum_replace(csum_off, old_port as u64, port_be as u64, mangled | 2)
            .map_err(|_| ())?;
        ctx.store(flow.l4_off + port_off, &port_be, 0)
            .map_err(|_| ())?;
    }
    Ok(())
}

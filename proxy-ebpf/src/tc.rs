//! tc ingress on pod-facing and external interfaces: per-packet DNAT and reverse NAT.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::Counter;

use crate::{
    icmp,
    lb::{Verdict, decide},
    maps::{INTERFACES, count},
    nat::{Side, rewrite},
    parse::{Flow, parse},
};

/// Applies up to two rewrites; any failure drops the packet (a half-rewritten packet must not
/// leave).
#[inline(always)]
fn apply(
    ctx: &TcContext,
    flow: &Flow,
    first: (Side, [u32; 4], u16),
    second: Option<(Side, [u32; 4], u16)>,
) -> bool {
    if rewrite(ctx, flow, first.0, first.1, first.2).is_err() {
        return false;
    }
    match second {
        Some((side, addr, port)) => rewrite(ctx, flow, side, addr, port).is_ok(),
        None => true,
    }
}

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    let flow = match parse(&ctx) {
        Ok(f) => f,
        Err(Counter::PassedOtherProtocol) => {
            return match icmp::translate(&ctx) {
                Some(Ok(c)) => {
                    count(c);
                    TC_ACT_OK
                }
                Some(Err(c)) => {
                    count(c);
                    TC_ACT_SHOT
                }
                None => {
                    count(Counter::PassedOtherProtocol);
                    TC_ACT_OK
                }
            };
        }
        Err(c) => {
            count(c);
            return TC_ACT_OK;
        }
    };
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain-data value copied out at once.
    let iface = unsafe { INTERFACES.get(ifindex) }.copied();
    let (first, second, counter) = match decide(&flow, iface) {
        Verdict::Dnat {
            addr,
            port_be,
            snat,
            counter,
        } => {
            if snat.is_some() && counter != Counter::TranslatedEstablished {
                count(Counter::Snat);
            }
            (
                (Side::Destination, addr, port_be),
                snat.map(|(a, p)| (Side::Source, a, p)),
                counter,
            )
        }
        Verdict::ReverseNat {
            addr,
            port_be,
            unsnat,
        } => (
            (Side::Source, addr, port_be),
            unsnat.map(|(a, p)| (Side::Destination, a, p)),
            Counter::ReverseTranslated,
        ),
        Verdict::Pass(c) => {
            count(c);
            return TC_ACT_OK;
        }
        Verdict::Drop(c) => {
            count(c);
            return TC_ACT_SHOT;
        }
    };
    if !apply(&ctx, &flow, first, second) {
        count(Counter::DroppedRewriteFailed);
        return TC_ACT_SHOT;
    }
    count(counter);
    TC_ACT_OK
}

//! tc ingress on pod-facing and external interfaces: per-packet DNAT and reverse NAT.
use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{Counter, SvcCounter};

use crate::{
    icmp,
    lb::{Verdict, decide},
    maps::{INTERFACES, count, count_svc},
    nat::{Side, rewrite},
    parse::{Flow, parse},
    reject,
};

/// Applies a translation verdict's rewrites (up to two); any failure drops the packet (a
/// half-rewritten packet must not leave). A separate BPF function, like parsing and the
/// decision: the verifier allows 512 bytes of stack along a call chain, and sibling functions'
/// frames do not add up. It takes the verdict by reference: an `Option` argument would put a
/// niche discriminant inside a BTF union, which the kernel rejects.
#[inline(never)]
fn apply(skb: *mut __sk_buff, flow: &Flow, verdict: &Verdict) -> bool {
    let ctx = &TcContext::new(skb);
    let (first, second) = match *verdict {
        Verdict::Dnat {
            addr,
            port_be,
            snat,
            ..
        } => ((Side::Destination, addr, port_be), (Side::Source, snat)),
        Verdict::ReverseNat {
            addr,
            port_be,
            unsnat,
            ..
        } => ((Side::Source, addr, port_be), (Side::Destination, unsnat)),
        _ => return true,
    };
    if rewrite(ctx, flow, first.0, first.1, first.2).is_err() {
        return false;
    }
    let (side, nat) = second;
    !nat.on || rewrite(ctx, flow, side, nat.addr, nat.port_be).is_ok()
}

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    let mut flow = Flow::default();
    match parse(ctx.skb.skb, &mut flow) {
        Ok(()) => {}
        Err(Counter::PassedOtherProtocol) => {
            return match icmp::translate(ctx.skb.skb) {
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
    let verdict = decide(&flow, iface, 0);
    // The global counter, and the frontend's (service id, counter, a new flow).
    let (counter, svc) = match verdict {
        Verdict::Dnat {
            snat,
            counter,
            svc_id,
            ..
        } => {
            let new = matches!(counter, Counter::TranslatedNew | Counter::Reselected);
            if snat.on && new {
                count(Counter::Snat);
            }
            (counter, (svc_id, SvcCounter::Packets, new))
        }
        Verdict::ReverseNat { svc_id, .. } => (
            Counter::ReverseTranslated,
            (svc_id, SvcCounter::Replies, false),
        ),
        Verdict::Pass(c) => {
            count(c);
            return TC_ACT_OK;
        }
        Verdict::Drop(c, svc_id) => {
            count(c);
            count_svc(svc_id, SvcCounter::of_drop(c), false);
            return TC_ACT_SHOT;
        }
        Verdict::Reject(svc_id) => {
            return match reject::reply(ctx.skb.skb, &flow) {
                Some(action) => {
                    count(Counter::RejectedNoBackend);
                    count_svc(svc_id, SvcCounter::Rejected, false);
                    action
                }
                None => {
                    count(Counter::DroppedNoBackend);
                    count_svc(svc_id, SvcCounter::DroppedOther, false);
                    TC_ACT_SHOT
                }
            };
        }
    };
    if !apply(ctx.skb.skb, &flow, &verdict) {
        count(Counter::DroppedRewriteFailed);
        count_svc(svc.0, SvcCounter::DroppedOther, false);
        return TC_ACT_SHOT;
    }
    count(counter);
    count_svc(svc.0, svc.1, svc.2);
    TC_ACT_OK
}

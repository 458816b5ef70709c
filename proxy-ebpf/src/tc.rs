//! tc ingress on pod-facing and external interfaces: per-packet DNAT and reverse NAT.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::Counter;

use crate::{
    lb::{Verdict, decide},
    maps::count,
    nat::{Side, rewrite},
    parse::parse,
};

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    let flow = match parse(&ctx) {
        Ok(f) => f,
        Err(c) => {
            count(c);
            return TC_ACT_OK;
        }
    };
    let (side, addr, port_be, counter) = match decide(&flow) {
        Verdict::Dnat {
            addr,
            port_be,
            counter,
        } => (Side::Destination, addr, port_be, counter),
        Verdict::ReverseNat { addr, port_be } => {
            (Side::Source, addr, port_be, Counter::ReverseTranslated)
        }
        Verdict::Pass(c) => {
            count(c);
            return TC_ACT_OK;
        }
        Verdict::Drop(c) => {
            count(c);
            return TC_ACT_SHOT;
        }
    };
    if rewrite(&ctx, &flow, side, addr, port_be).is_err() {
        count(Counter::DroppedRewriteFailed);
        return TC_ACT_SHOT;
    }
    count(counter);
    TC_ACT_OK
}

//! Conntrack garbage collection. The conntrack map is an LRU, which frees entries only when it
//! is full: until then a finished connection's entries, and with them its SNAT port (each
//! backend has a few thousand), stay taken, and NodePort traffic to a busy backend on another
//! node runs out of ports (the bench saw it after about 11,000 connections to three
//! endpoints). The collector removes entries idle longer than their state allows:
//!
//! - TCP after a FIN or RST in either direction (`CT_CLOSING`): 120 s, as netfilter's
//!   TIME_WAIT. A port freed sooner could be reused while the backend still holds the old
//!   connection in TIME_WAIT (60 s on Linux), whose PAWS check then drops the new SYN.
//! - Other TCP: 6 hours (Cilium's default; netfilter keeps 5 days). A flow idle that long that
//!   comes back finds its backend again through the tuple hash.
//! - UDP and the rest: 120 s (netfilter's UDP stream timeout). The datapath puts back a reply
//!   entry that went while its flow still sends.
//!
//! An entry is read again just before it is removed, so one refreshed since the scan stays.
use std::time::Duration;

use aya::maps::{HashMap, MapData, MapError};
use proxy_common::{CT_CLOSING, CtKey, CtValue, IPPROTO_TCP};

/// How long an idle entry is kept, by state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(6 * 3600),
            tcp_closing: Duration::from_secs(120),
            other: Duration::from_secs(120),
        }
    }
}

/// The datapath refreshes `last_seen_ns` at most once a second.
const TOUCH_SLACK_NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether an entry idle since `v.last_seen_ns` has outlived its state's timeout at `now`.
pub fn expired(k: &CtKey, v: &CtValue, now: u64, t: &Timeouts) -> bool {
    let timeout = if k.proto == IPPROTO_TCP {
        if v.flags & CT_CLOSING != 0 {
            t.tcp_closing
        } else {
            t.tcp_established
        }
    } else {
        t.other
    };
    now.saturating_sub(v.last_seen_ns) > timeout.as_nanos() as u64 + TOUCH_SLACK_NS
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub scanned: usize,
    pub removed: usize,
}

/// One pass over the conntrack map at time `now` (CLOCK_MONOTONIC ns).
pub fn collect(
    ct: &mut HashMap<MapData, CtKey, CtValue>,
    now: u64,
    t: &Timeouts,
) -> Result<Pass, MapError> {
    let mut pass = Pass::default();
    let mut stale = Vec::new();
    for entry in ct.iter() {
        // An entry removed while we iterate ends or skips nothing important: next pass.
        let Ok((k, v)) = entry else { continue };
        pass.scanned += 1;
        if expired(&k, &v, now, t) {
            stale.push(k);
        }
    }
    for k in stale {
        // Refreshed since the scan: keep it.
        match ct.get(&k, 0) {
            Ok(v) if expired(&k, &v, now, t) => {}
            _ => continue,
        }
        match ct.remove(&k) {
            Ok(()) => pass.removed += 1,
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: u8) -> CtKey {
        CtKey {
            proto,
            ..Default::default()
        }
    }

    fn value(flags: u16, last_seen_ns: u64) -> CtValue {
        CtValue {
            flags,
            last_seen_ns,
            ..Default::default()
        }
    }

    #[test]
    fn timeouts_follow_the_state() {
        let t = Timeouts::default();
        let s = 1_000_000_000u64;
        let now = 100_000 * s;
        // (protocol, flags, idle seconds, expired)
        let cases = [
            (IPPROTO_TCP, 0, 60, false),
            (IPPROTO_TCP, 0, 6 * 3600 - 10, false),
            (IPPROTO_TCP, 0, 6 * 3600 + 2, true),
            (IPPROTO_TCP, CT_CLOSING, 60, false),
            (IPPROTO_TCP, CT_CLOSING, 119, false),
            (IPPROTO_TCP, CT_CLOSING, 122, true),
            (17, 0, 119, false),
            (17, 0, 122, true),
            // A timestamp in the future (set after our clock read) is not idle.
            (17, 0, 0, false),
        ];
        for (proto, flags, idle, want) in cases {
            let v = value(flags, now - idle * s);
            assert_eq!(
                expired(&key(proto), &v, now, &t),
                want,
                "proto {proto} flags {flags} idle {idle} s"
            );
        }
        assert!(!expired(&key(17), &value(0, now + s), now, &t));
    }
}

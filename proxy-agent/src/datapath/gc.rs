//! Conntrack garbage collection. The conntrack map is an LRU, which frees entries only when it
//! is full: until then a finished connection's entries, and with them its SNAT port (each
//! backend has a few thousand), stay taken, and NodePort traffic to a busy backend on another
//! node runs out of ports (the bench saw it after about 11,000 connections to three
//! endpoints). The collector removes entries idle longer than their state allows:
//!
//! - TCP after a FIN or RST in either direction (`CT_CLOSING`): 120 s, as netfilter's
//!   TIME_WAIT. A port freed sooner could be reused while the backend still holds the old
//!   connection in TIME_WAIT (60 s on Linux), whose PAWS check then drops the new SYN.
//! - Other TCP: 24 hours (kube-proxy's conntrack.tcpEstablishedTimeout). A flow idle that
//!   long that comes back finds its backend again through the tuple hash.
//! - UDP and the rest: 30 s (kube-proxy's udpTimeout, netfilter's unreplied timeout), 120 s
//!   for a stream (udpStreamTimeout). Netfilter calls a UDP flow a stream once it carries
//!   packets more than 2 s after it began; here an entry is a stream once the collector saw
//!   its `last_seen_ns` move on (the datapath refreshes it at most once a second, so traffic
//!   after the flow's first second in that entry's direction). The collector only learns that
//!   across passes, so an entry whose whole life falls between two passes counts as unreplied.
//!   The datapath puts back a reply entry that went while its flow still sends.
//!
//! Closing TCP keeps 120 s rather than kube-proxy's tcpCloseWaitTimeout (1 h): `CT_CLOSING`
//! is set at the first FIN or RST, so it covers netfilter's TIME_WAIT as well as CLOSE_WAIT,
//! and an hour there would hold the SNAT port of every finished connection for an hour. A
//! half-closed flow that still sends refreshes its entries and stays.
//!
//! An entry is read again just before it is removed, so one refreshed since the scan stays.
use std::{collections::HashMap as StdHashMap, time::Duration};

use aya::maps::{HashMap, MapData, MapError};
use proxy_common::{CT_CLOSING, CtKey, CtValue, IPPROTO_TCP};

/// How long an idle entry is kept, by state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    /// UDP and other protocols, not (yet) a stream.
    pub other: Duration,
    /// UDP (and other) entries that carried traffic after their first second.
    pub udp_stream: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_closing: Duration::from_secs(120),
            other: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
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

/// Whether an entry idle since `v.last_seen_ns` has outlived its state's timeout at `now`;
/// `stream`: a non-TCP entry known to have carried traffic after its first second.
pub fn expired(k: &CtKey, v: &CtValue, now: u64, t: &Timeouts, stream: bool) -> bool {
    let timeout = if k.proto == IPPROTO_TCP {
        if v.flags & CT_CLOSING != 0 {
            t.tcp_closing
        } else {
            t.tcp_established
        }
    } else if stream {
        t.udp_stream
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

/// What the collector remembers between passes: the `last_seen_ns` each non-TCP entry had
/// when first seen (a later value means it is a stream).
#[derive(Default)]
pub struct Streams {
    first_seen: StdHashMap<CtKey, u64>,
}

impl Streams {
    /// Notes `k` seen with `last_seen`; whether it is a stream.
    fn observe(&mut self, next: &mut StdHashMap<CtKey, u64>, k: &CtKey, last_seen: u64) -> bool {
        if k.proto == IPPROTO_TCP {
            return false;
        }
        let first = *self.first_seen.get(k).unwrap_or(&last_seen);
        next.insert(*k, first);
        last_seen != first
    }
}

/// One pass over the conntrack map at time `now` (CLOCK_MONOTONIC ns).
pub fn collect(
    ct: &mut HashMap<MapData, CtKey, CtValue>,
    now: u64,
    t: &Timeouts,
    streams: &mut Streams,
) -> Result<Pass, MapError> {
    let mut pass = Pass::default();
    let mut stale = Vec::new();
    let mut next = StdHashMap::new();
    for entry in ct.iter() {
        // An entry removed while we iterate ends or skips nothing important: next pass.
        let Ok((k, v)) = entry else { continue };
        pass.scanned += 1;
        let stream = streams.observe(&mut next, &k, v.last_seen_ns);
        if expired(&k, &v, now, t, stream) {
            stale.push((k, stream));
        }
    }
    // Entries gone from the map are forgotten.
    streams.first_seen = next;
    for (k, stream) in stale {
        // Refreshed since the scan: keep it.
        match ct.get(&k, 0) {
            Ok(v) if expired(&k, &v, now, t, stream) => {}
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
        // (protocol, flags, stream, idle seconds, expired): kube-proxy's defaults.
        let cases = [
            (IPPROTO_TCP, 0, false, 60, false),
            (IPPROTO_TCP, 0, false, 24 * 3600 - 10, false),
            (IPPROTO_TCP, 0, false, 24 * 3600 + 2, true),
            // The stream mark means nothing to TCP.
            (IPPROTO_TCP, 0, true, 24 * 3600 + 2, true),
            (IPPROTO_TCP, CT_CLOSING, false, 60, false),
            (IPPROTO_TCP, CT_CLOSING, false, 119, false),
            (IPPROTO_TCP, CT_CLOSING, false, 122, true),
            (17, 0, false, 29, false),
            (17, 0, false, 32, true),
            (17, 0, true, 32, false),
            (17, 0, true, 119, false),
            (17, 0, true, 122, true),
            // A timestamp in the future (set after our clock read) is not idle.
            (17, 0, false, 0, false),
        ];
        for (proto, flags, stream, idle, want) in cases {
            let v = value(flags, now - idle * s);
            assert_eq!(
                expired(&key(proto), &v, now, &t, stream),
                want,
                "proto {proto} flags {flags} stream {stream} idle {idle} s"
            );
        }
        assert!(!expired(&key(17), &value(0, now + s), now, &t, false));
    }

    #[test]
    fn a_stream_is_an_entry_refreshed_between_passes() {
        let mut st = Streams::default();
        let udp = key(17);
        let tcp = key(IPPROTO_TCP);
        let pass = |st: &mut Streams, entries: &[(CtKey, u64)]| -> Vec<bool> {
            let mut next = StdHashMap::new();
            let out = entries
                .iter()
                .map(|(k, seen)| st.observe(&mut next, k, *seen))
                .collect();
            st.first_seen = next;
            out
        };
        assert_eq!(pass(&mut st, &[(udp, 100), (tcp, 100)]), [false, false]);
        assert_eq!(
            pass(&mut st, &[(udp, 100), (tcp, 200)]),
            [false, false],
            "not refreshed"
        );
        assert_eq!(
            pass(&mut st, &[(udp, 300), (tcp, 300)]),
            [true, false],
            "refreshed"
        );
        assert_eq!(pass(&mut st, &[(udp, 300)]), [true], "stays a stream");
        // Gone for one pass: forgotten, a new flow with the same tuple starts unreplied.
        assert_eq!(pass(&mut st, &[]), Vec::<bool>::new());
        assert_eq!(pass(&mut st, &[(udp, 900)]), [false]);
    }
}

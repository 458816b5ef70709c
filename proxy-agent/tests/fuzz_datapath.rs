//! Packet fuzzing of the tc program through BPF_PROG_TEST_RUN, against real maps programmed by
//! the Writer, with every verdict checked by a userspace model of the translation.
//!
//! A seeded generator builds structured frames (TCP/UDP to frontends, to the Service without
//! endpoints, to wrong ports and non-VIPs, replies from backends for flows of this run and for
//! never-seen ones, SYNs straight to a backend on a translated flow's tuple, hairpin flows (a
//! client picked as its own backend, IPv4 and IPv6), IPv4 fragments first and later with
//! matching and unknown ids, ICMP echo and ICMP errors quoting translated (SNATed too) and
//! foreign flows, IPv6 with extension headers to frontends and as replies, a UDP/IPv6 datagram
//! whose checksum is 0 once translated, ARP, VLAN and QinQ tags, other ethertypes, random IPv4
//! headers, raw garbage) and then mutates a share of them (truncation at any byte, padding, byte
//! flips, random IHL and total length, IHL claiming more than present, fragment bits, checksums,
//! protocol, version, ethertype, addresses). The programmed Services change while the run goes on
//! (a backend replaced, a Service emptied and filled, a frontend removed and re-added, the
//! hairpin node address set and removed, a Service choosing by Maglev table in one phase and at
//! random in the other, another by a Maglev table rebuilt as it shrinks and grows), so
//! established flows are reselected too.
//!
//! The model (module `model`, its rules in its doc) is written from the datapath's contract —
//! what each counter in proxy-common means and what the maps hold — not from the eBPF code.
//! Each frame must end in exactly one of: passed unchanged; translated exactly as the maps say
//! (DNAT to one of the frontend's backends, the recorded backend for an established flow,
//! reverse NAT to the frontend of a recorded flow, the same L3 rewrite for later fragments, SNAT
//! of hairpin flows, ICMP errors about recorded flows translated back), with every byte but the
//! rewritten fields and checksums unchanged and every checksum changed by exactly what the
//! rewrite changed; or dropped with the reason's counter. Exactly the counters the model names
//! move: one per frame, two (`snat` and the translation's) for a new SNATed flow. The conntrack
//! and fragment maps are compared with the model's tables whenever they are flushed (to stay far
//! from LRU eviction) and at the end. A kernel refusal (EINVAL) is accepted only for frames
//! BPF_PROG_TEST_RUN cannot take (shorter than Ethernet, IPv4 shorter than 14+20, IPv6 shorter
//! than 14+40 bytes) and counted apart. Every failure prints the seed, the frame in hex, the
//! expectation and what happened; the summary groups failures by reason.
//!
//! Size and reproduction, through environment variables (`cargo xtask test` runs the default):
//! - `FUZZ_PACKETS`: how many frames to generate (default 20_000, a fast subset),
//! - `FUZZ_SEED`: the generator's seed (default random; printed at the start and on failure).
//!   The same seed gives the same frames as long as the kernel makes the same random backend
//!   choices; frames built from translated flows (replies, ICMP errors) follow those choices.
//!
//! Full run, a million frames (about 30 s of fuzzing on the 2-core machines, after the release
//! build):
//!
//! ```sh
//! FUZZ_PACKETS=1000000 cargo test --release -p proxy-agent --test fuzz_datapath -- --nocapture
//! ```
//!
//! Needs root and a mounted bpffs; fails (never skips) when it cannot run.
use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Instant,
};

use aya::{
    Ebpf, TestRun, TestRunOptions,
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray},
    programs::ProgramError,
    sys::SyscallError,
};
use proxy_agent::datapath::addr::{family, from_words, to_words};
use proxy_agent::{
    datapath::{
        loader, maps,
        writer::{Programmed, Writer},
    },
    model::{DesiredService, DesiredState, Endpoint, EndpointState, Frontend, LbAlgorithm},
};
use proxy_common::{
    COUNTER_NAMES, CT_CLOSING, CT_FORWARD, CT_REVERSE, CT_SNAT, CtKey, CtValue, FragKey, FragValue,
    IfaceConfig, ServiceKind, names,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// Conntrack and fragment tables are compared with the maps and emptied past these sizes, far
/// below the maps' capacities, so LRU eviction never makes the kernel forget what the model knows.
const CT_FLUSH_AT: usize = 40_000;
const FRAG_FLUSH_AT: usize = 2_000;
/// Failures printed in full (all are counted).
const PRINT_FAILURES: usize = 20;

/// Frame building and checksums, written independently of the datapath.
mod wire {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86dd;
    pub const ETH_P_ARP: u16 = 0x0806;
    pub const ETH_P_8021Q: u16 = 0x8100;
    pub const ETH_P_8021AD: u16 = 0x88a8;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const IP_MF: u16 = 0x2000;
    pub const IP_DF: u16 = 0x4000;
    pub const IP_OFFSET: u16 = 0x1fff;
    /// Offset of the IPv4 header in a frame.
    pub const L3: usize = 14;

    /// One's-complement sum of 16-bit big-endian words (an odd tail is padded with zero).
    pub fn sum(data: &[u8], mut acc: u64) -> u64 {
        let mut it = data.chunks_exact(2);
        for c in &mut it {
            acc += u16::from_be_bytes([c[0], c[1]]) as u64;
        }
        if let [last] = it.remainder() {
            acc += (*last as u64) << 8;
        }
        acc
    }

    pub fn fold(mut acc: u64) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// The Internet checksum of `data` with `acc` (a pseudo-header sum) added.
    pub fn csum(data: &[u8], acc: u64) -> u16 {
        !fold(sum(data, acc))
    }

    /// The folded sum of a checksummed region with +0 and -0 identified: 0xffff when the region's
    /// checksum is valid. An incremental checksum update must leave it exactly as it was.
    pub fn residual(data: &[u8], acc: u64) -> u16 {
        match fold(sum(data, acc)) {
            0 => 0xffff,
            s => s,
        }
    }

    pub fn pseudo4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u64 {
        sum(&src.octets(), 0) + sum(&dst.octets(), 0) + proto as u64 + (len as u16) as u64
    }

    pub fn pseudo6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> u64 {
        sum(&src.octets(), 0)
            + sum(&dst.octets(), 0)
            + sum(&(len as u32).to_be_bytes(), 0)
            + next as u64
    }

    pub fn be16(f: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([f[at], f[at + 1]])
    }

    pub fn ip4_at(f: &[u8], at: usize) -> Ipv4Addr {
        Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3])
    }

    pub fn ip6_at(f: &[u8], at: usize) -> Ipv6Addr {
        let o: [u8; 16] = f[at..at + 16].try_into().unwrap();
        Ipv6Addr::from(o)
    }

    pub fn ip_at(f: &[u8], at: usize, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(ip6_at(f, at))
        } else {
            IpAddr::V4(ip4_at(f, at))
        }
    }

    /// The pseudo-header sum of either family.
    pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => pseudo4(s, d, proto, len),
            (IpAddr::V6(s), IpAddr::V6(d)) => pseudo6(s, d, proto, len),
            _ => unreachable!("mixed families"),
        }
    }

    pub fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// Recomputes the IPv4 header checksum of a frame, if its whole header is present.
    pub fn fix_ip4_csum(f: &mut [u8]) {
        if f.len() <= L3 {
            return;
        }
        let ihl = (f[L3] & 0xf) as usize * 4;
        if ihl < 20 || f.len() < L3 + ihl {
            return;
        }
        f[L3 + 10..L3 + 12].copy_from_slice(&[0, 0]);
        let c = csum(&f[L3..L3 + ihl], 0);
        f[L3 + 10..L3 + 12].copy_from_slice(&c.to_be_bytes());
    }

    #[derive(Clone, Debug)]
    pub struct Ip4 {
        pub src: Ipv4Addr,
        pub dst: Ipv4Addr,
        pub proto: u8,
        pub id: u16,
        /// Flags and fragment offset, as on the wire.
        pub frag: u16,
        pub ttl: u8,
        pub tos: u8,
        /// A multiple of 4 bytes, at most 40.
        pub options: Vec<u8>,
    }

    impl Ip4 {
        /// IPv4 header (valid checksum) + `payload`.
        pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
            let ihl = 20 + self.options.len();
            let mut h = Vec::with_capacity(ihl + payload.len());
            h.push(0x40 | (ihl / 4) as u8);
            h.push(self.tos);
            h.extend_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
            h.extend_from_slice(&self.id.to_be_bytes());
            h.extend_from_slice(&self.frag.to_be_bytes());
            h.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
            h.extend_from_slice(&self.src.octets());
            h.extend_from_slice(&self.dst.octets());
            h.extend_from_slice(&self.options);
            let c = csum(&h, 0);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(payload);
            h
        }

        pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
            let mut f = eth(ETH_P_IP);
            f.extend_from_slice(&self.packet(payload));
            f
        }
    }

    #[derive(Clone, Copy, Debug)]
    pub enum Csum {
        Valid,
        Zero,
        /// The valid checksum XOR this.
        Bad(u16),
    }

    #[derive(Clone, Debug, Default)]
    pub struct Tcp {
        pub sport: u16,
        pub dport: u16,
        pub seq: u32,
        pub ack: u32,
        pub flags: u8,
        pub ns: bool,
        pub window: u16,
        pub urg: u16,
        /// A multiple of 4 bytes, at most 40.
        pub options: Vec<u8>,
    }

    fn apply(valid: u16, c: Csum) -> u16 {
        match c {
            Csum::Valid => valid,
            Csum::Zero => 0,
            Csum::Bad(x) => valid ^ x,
        }
    }

    /// A TCP segment (header + payload) for the pseudo-header of `src` -> `dst`.
    pub fn tcp(src: Ipv4Addr, dst: Ipv4Addr, t: &Tcp, payload: &[u8], c: Csum) -> Vec<u8> {
        let doff = 20 + t.options.len();
        let mut s = Vec::with_capacity(doff + payload.len());
        s.extend_from_slice(&t.sport.to_be_bytes());
        s.extend_from_slice(&t.dport.to_be_bytes());
        s.extend_from_slice(&t.seq.to_be_bytes());
        s.extend_from_slice(&t.ack.to_be_bytes());
        s.push(((doff / 4) as u8) << 4 | t.ns as u8);
        s.push(t.flags);
        s.extend_from_slice(&t.window.to_be_bytes());
        s.extend_from_slice(&[0, 0]);
        s.extend_from_slice(&t.urg.to_be_bytes());
        s.extend_from_slice(&t.options);
        s.extend_from_slice(payload);
        let v = csum(&s, pseudo4(src, dst, TCP, s.len()));
        s[16..18].copy_from_slice(&apply(v, c).to_be_bytes());
        s
    }

    /// A UDP datagram (header + payload); a computed checksum of 0 is sent as 0xffff.
    pub fn udp(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        (sport, dport): (u16, u16),
        payload: &[u8],
        c: Csum,
    ) -> Vec<u8> {
        let mut s = Vec::with_capacity(8 + payload.len());
        s.extend_from_slice(&sport.to_be_bytes());
        s.extend_from_slice(&dport.to_be_bytes());
        s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        s.extend_from_slice(&[0, 0]);
        s.extend_from_slice(payload);
        let v = match csum(&s, pseudo4(src, dst, UDP, s.len())) {
            0 => 0xffff,
            v => v,
        };
        s[6..8].copy_from_slice(&apply(v, c).to_be_bytes());
        s
    }

    /// An ICMP message: type, code, the 4 "rest of header" bytes, then `body`.
    pub fn icmp(typ: u8, code: u8, rest: [u8; 4], body: &[u8], valid: bool) -> Vec<u8> {
        let mut m = vec![typ, code, 0, 0];
        m.extend_from_slice(&rest);
        m.extend_from_slice(body);
        let c = csum(&m, 0) ^ if valid { 0 } else { 0x0101 };
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    pub fn hex(f: &[u8]) -> String {
        f.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The Services programmed during the run: two phases, switched back and forth.
mod topo {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proxy_agent::model::Protocol;

    pub const CLIENTS: [Ipv4Addr; 3] = [
        Ipv4Addr::new(198, 19, 1, 50),
        Ipv4Addr::new(198, 19, 3, 7),
        Ipv4Addr::new(198, 18, 0, 20),
    ];
    pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    /// This node's addresses (interface entry 0: hairpin SNAT).
    pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    pub const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2);
    pub const VIP_WEB: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
    pub const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
    pub const VIP_MULTI: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 12);
    pub const VIP_SHARED: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 13);
    pub const VIP_HAIRPIN: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 14);
    pub const NOT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 99);
    pub const B1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
    pub const B2: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);
    pub const B3: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 3);
    pub const B4: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 2);
    pub const B5: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 3);
    pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
    pub const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 2);
    pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 2, 0x50);
    pub const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99);

    fn bx(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 1, 10 + i)
    }

    pub struct Svc {
        pub service: &'static str,
        pub vip: IpAddr,
        pub port: u16,
        pub protocol: Protocol,
        pub backends: Vec<(IpAddr, u16)>,
    }

    fn svc(
        service: &'static str,
        vip: impl Into<IpAddr>,
        port: u16,
        protocol: Protocol,
        backends: &[(Ipv4Addr, u16)],
    ) -> Svc {
        Svc {
            service,
            vip: vip.into(),
            port,
            protocol,
            backends: backends.iter().map(|(a, p)| (IpAddr::V4(*a), *p)).collect(),
        }
    }

    /// Phase 0 and phase 1. Between them: web's TCP backend B2 is replaced by B4 and its UDP
    /// port loses B2; the empty Service's UDP port gets an endpoint; multi's TCP port shrinks;
    /// the shared frontend disappears (and comes back with a new id in the next phase 0).
    pub fn services(phase: usize) -> Vec<Svc> {
        use Protocol::{Tcp, Udp};
        let a = phase == 0;
        let mut v = vec![
            if a {
                svc(
                    "t/web",
                    VIP_WEB,
                    80,
                    Tcp,
                    &[(B1, 8080), (B2, 8080), (B3, 8080)],
                )
            } else {
                svc(
                    "t/web",
                    VIP_WEB,
                    80,
                    Tcp,
                    &[(B1, 8080), (B3, 8080), (B4, 8080)],
                )
            },
            if a {
                svc("t/web", VIP_WEB, 53, Udp, &[(B1, 5353), (B2, 5353)])
            } else {
                svc("t/web", VIP_WEB, 53, Udp, &[(B1, 5353)])
            },
            svc("t/empty", VIP_EMPTY, 80, Tcp, &[]),
            if a {
                svc("t/empty", VIP_EMPTY, 53, Udp, &[])
            } else {
                svc("t/empty", VIP_EMPTY, 53, Udp, &[(B5, 53)])
            },
            // Backend port equal to the frontend port: only the address changes.
            svc("t/multi", VIP_MULTI, 5000, Udp, &[(B5, 5000)]),
            if a {
                let mut b: Vec<(Ipv4Addr, u16)> = (0..5).map(|i| (bx(i), 8443)).collect();
                // Same address, another port: backends told apart by port only.
                b.push((bx(0), 9443));
                svc("t/multi", VIP_MULTI, 443, Tcp, &b)
            } else {
                svc(
                    "t/multi",
                    VIP_MULTI,
                    443,
                    Tcp,
                    &[(bx(0), 8443), (bx(0), 9443)],
                )
            },
            // A pod that is its own backend through a Service.
            svc("t/hairpin", VIP_HAIRPIN, 80, Tcp, &[(CLIENTS[0], 8080)]),
            svc("t/v6", VIP6, 80, Tcp, &[]),
            svc("t/v6", VIP6, 53, Udp, &[]),
        ];
        let n = v.len();
        // The IPv6 client is also a backend: hairpin over IPv6.
        v[n - 2].backends = vec![(IpAddr::V6(B6), 8080), (IpAddr::V6(CLIENT6), 8080)];
        v[n - 1].backends = vec![(IpAddr::V6(B6), 5353)];
        if a {
            // Shares web's backend B1:8080: replies from it are told apart by the client port.
            v.push(svc("t/shared", VIP_SHARED, 8000, Tcp, &[(B1, 8080)]));
        }
        v
    }

    /// Every IPv4 frontend of either phase: (address, port, protocol number).
    pub fn frontends_v4() -> Vec<(Ipv4Addr, u16, u8)> {
        let mut v: Vec<_> = (0..2)
            .flat_map(services)
            .filter_map(|s| match s.vip {
                IpAddr::V4(a) => Some((a, s.port, s.protocol.number())),
                IpAddr::V6(_) => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Every IPv4 backend of either phase.
    pub fn backends_v4() -> Vec<(Ipv4Addr, u16)> {
        let mut v: Vec<_> = (0..2)
            .flat_map(services)
            .flat_map(|s| s.backends)
            .filter_map(|(a, p)| match a {
                IpAddr::V4(a) => Some((a, p)),
                IpAddr::V6(_) => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// The expected behaviour of the tc program, from its contract:
///
/// - Ethernet: ethertype 0x0800 and 0x86DD are parsed further; anything else, VLAN tags
///   included, is `passed_not_ip`.
/// - IPv4 header: a version other than 4, an IHL under 5, a total length under the IHL or a
///   header running past the frame is `passed_malformed`.
/// - IPv4 ICMP: an error (destination unreachable, time exceeded, parameter problem; not a
///   later fragment) quoting an IPv4 TCP/UDP header whose reply direction has a conntrack
///   entry is translated back (`icmp_translated`): the quoted destination address and port
///   become the frontend, and for a SNATed flow the quoted source and the outer destination
///   become the client; an outer source equal to the quoted destination (the backend reports
///   itself) becomes the frontend. All three checksums (outer IP, quoted IP, ICMP) follow.
///   Any other ICMP, and any other protocol, is `passed_other_protocol`.
/// - IPv6: up to four extension headers are skipped (hop-by-hop, routing, destination options,
///   and a fragment header with offset 0; with more-fragments, that first fragment records its
///   ports as an IPv4 one does, under the 32-bit identification; a later fragment (offset != 0)
///   whose next header is TCP or UDP takes the recorded ports or is `passed_fragment_unknown`,
///   with no L4 header, so only its addresses may be rewritten); a header running past the frame is `passed_malformed`; then a
///   protocol other than TCP and UDP (ICMPv6 included) is `passed_other_protocol`.
/// - An IPv4 later fragment (offset != 0) takes its ports from what the first fragment of the
///   same (source, destination, id, protocol) recorded, or is `passed_fragment_unknown`; it has
///   no L4 header, so only its addresses may be rewritten.
/// - Otherwise the L4 header must be within the frame (and, for IPv4, the total length): TCP
///   20 bytes, UDP 8, or `passed_malformed`. An IPv4 first fragment (MF, offset 0) that gets
///   this far records its ports, whatever happens to it next.
/// - Destination (address, port, protocol) is a frontend:
///   a recorded flow whose backend still exists unchanged in the same Service keeps it (and its
///   SNAT) (`translated_established`); a recorded TCP flow whose backend is gone keeps it for
///   any packet but a SYN (draining, `translated_draining`); otherwise such a flow is
///   `reselected`, a new one `translated_new`, both to any backend of the frontend, recording the flow and its
///   reply. A new or reselected flow to a frontend without endpoints is rejected
///   (`rejected_no_backend`, TC_ACT_REDIRECT): the frame becomes an ICMP port unreachable
///   (ICMPv6 type 1 code 4) from the frontend to the client, Ethernet addresses swapped, valid
///   checksums, quoting the IP header and 8 bytes; with IPv4 options or IPv6 extension headers
///   it is `dropped_no_backend`. A FIN or RST marks both entries of a recorded TCP flow closing
///   (on either direction), a SYN reopening it clears the mark. A recorded flow whose reply
///   entry was forgotten gets it back from a packet that refreshes the forward entry's
///   last_seen (due at most once a second) or marks both entries; any other packet of it
///   leaves the reply entry alone (no lookup on the established path). A client picked as its own
///   backend (hairpin) is SNATed to the node address of interface entry 0 and a free port of the
///   SNAT range; `snat` counts that too.
/// - Not a frontend: a TCP segment with SYN and without ACK opens a new connection straight to
///   its destination, which may reuse the tuple of a translated flow that ended (closing, or its
///   forward entry gone): the reverse entry of the tuple it would answer (its destination to its
///   source) is forgotten first; a live flow's is kept (a spoofed SYN). Then a reply of a
///   recorded flow gets the frontend as its source, and for a SNATed flow the client as its
///   destination (`reverse_translated`); anything else is `passed_no_match`.
/// - A rewrite changes only the addresses and ports it names and the checksums, each checksum by
///   exactly what the rewrite changed in what it covers (a zero UDP checksum over IPv4 stays
///   zero; over IPv6, where zero is not allowed, a checksum never becomes zero).
mod model {
    use std::{
        collections::HashMap,
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
    };

    use proxy_agent::{datapath::writer::Programmed, model::Scope};

    use crate::wire::{
        ETH_P_IP, ETH_P_IPV6, ICMP, IP_MF, IP_OFFSET, L3, TCP, UDP, be16, ip4_at, ip6_at,
    };

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Tuple {
        pub src: IpAddr,
        pub dst: IpAddr,
        pub sport: u16,
        pub dport: u16,
        pub proto: u8,
    }

    impl Tuple {
        /// The tuple of a reply to this one.
        pub fn reply(&self) -> Tuple {
            Tuple {
                src: self.dst,
                dst: self.src,
                sport: self.dport,
                dport: self.sport,
                proto: self.proto,
            }
        }
    }

    /// (source, destination, IP id, protocol) of a fragmented IPv4 datagram.
    /// (source, destination, identification, protocol) of a fragmented datagram (IPv4 ids are
    /// 16 bits, IPv6 ones 32).
    pub type FragId = (IpAddr, IpAddr, u32, u8);

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Backend {
        pub id: u32,
        pub addr: IpAddr,
        pub port: u16,
    }

    /// A conntrack entry as the model expects it. Forward entries: the backend, and with `snat`
    /// the node address and port the client was SNATed to (`orig`). Reverse entries: the
    /// frontend, and the client (`orig`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Ct {
        pub nat_addr: IpAddr,
        pub nat_port: u16,
        pub backend_id: u32,
        pub svc_id: u32,
        pub snat: bool,
        pub orig_addr: IpAddr,
        pub orig_port: u16,
        /// `CT_CLOSING`: the TCP connection sent a FIN or RST (cleared by a new SYN).
        pub closing: bool,
    }

    #[derive(Clone, Copy, Debug)]
    pub struct Flow {
        pub tuple: Tuple,
        /// IPv4 total length (0 for IPv6).
        pub total_len: usize,
        pub l4_off: usize,
        /// False for IPv4 later fragments.
        pub has_l4: bool,
        /// TCP flags (0 for UDP and later fragments).
        pub tcp_flags: u8,
    }

    impl Flow {
        pub fn v6(&self) -> bool {
            self.tuple.src.is_ipv6()
        }
    }

    /// An IPv4 ICMP error quoting a TCP/UDP header.
    #[derive(Clone, Copy, Debug)]
    pub struct IcmpError {
        pub icmp_off: usize,
        pub inner_off: usize,
        pub inner_ihl: usize,
        /// The quoted packet's tuple.
        pub quoted: Tuple,
        pub outer_src: Ipv4Addr,
    }

    #[derive(Clone, Debug)]
    pub enum Verdict {
        Pass(&'static str),
        Drop(&'static str),
        /// Destination rewritten to one of `choices`; a new flow whose backend is its own
        /// client is SNATed to `hairpin_node`, if set.
        Dnat {
            flow: Flow,
            choices: Vec<Backend>,
            counter: &'static str,
            svc_id: u32,
            /// For an established flow: its recorded SNAT.
            snat: Option<(IpAddr, u16)>,
            hairpin_node: Option<IpAddr>,
        },
        /// Source rewritten to the frontend of a recorded flow (and the destination to its
        /// client, if it was SNATed).
        Rnat {
            flow: Flow,
            ct: Ct,
        },
        /// A new flow to a frontend without endpoints, answered with an ICMP / ICMPv6 port
        /// unreachable from the frontend, quoting the packet's IP header and 8 bytes more.
        Reject {
            flow: Flow,
        },
        /// An ICMP error about a recorded flow, translated back.
        Icmp {
            e: IcmpError,
            ct: Ct,
        },
    }

    #[derive(Clone, Debug)]
    pub struct Expectation {
        pub verdict: Verdict,
        /// The ports a first fragment records.
        pub frag_record: Option<(FragId, (u16, u16))>,
        /// The reverse entry a pure SYN to a non-frontend forgets.
        pub rev_forget: Option<Tuple>,
        /// The closing marks a packet of a recorded TCP flow sets or clears:
        /// (forward tuple, reverse tuple, FIN or RST seen, reopened by a SYN).
        pub mark: Option<(Tuple, Tuple, bool, bool)>,
    }

    struct Svc {
        svc_id: u32,
        slots: Vec<u32>,
    }

    /// A translated flow, for the generator's replies and ICMP errors.
    #[derive(Clone, Copy, Debug)]
    pub struct Recent {
        pub fwd: Tuple,
        pub backend: (IpAddr, u16),
        /// The client's address and port as the backend sees them (SNATed or not).
        pub seen_as: (IpAddr, u16),
    }

    #[derive(Default)]
    pub struct Model {
        services: HashMap<(IpAddr, u16, u8), Svc>,
        backends: HashMap<u32, (IpAddr, u16)>,
        /// Interface entry 0: the node addresses for hairpin SNAT.
        pub node4: Option<Ipv4Addr>,
        pub node6: Option<Ipv6Addr>,
        pub fwd: HashMap<Tuple, Ct>,
        pub rev: HashMap<Tuple, Ct>,
        pub frags: HashMap<FragId, (u16, u16)>,
        pub recent: Vec<Recent>,
        recent_next: usize,
    }

    const RECENT: usize = 4096;
    const TCP_FIN: u8 = 0x01;
    const TCP_SYN: u8 = 0x02;
    const TCP_RST: u8 = 0x04;
    const TCP_ACK: u8 = 0x10;
    const MALFORMED: &str = "passed_malformed";
    /// SNAT source ports: [SNAT_PORT_MIN, SNAT_PORT_MIN + SNAT_PORT_COUNT).
    pub const SNAT_PORTS: std::ops::Range<u32> = {
        use proxy_common::limits::{SNAT_PORT_COUNT, SNAT_PORT_MIN};
        SNAT_PORT_MIN as u32..SNAT_PORT_MIN as u32 + SNAT_PORT_COUNT as u32
    };

    impl Model {
        /// Takes the frontends and backends from what the maps hold. Frames in this test do not
        /// enter an external interface, so only the internal view of each frontend applies.
        pub fn load(&mut self, p: &Programmed) {
            self.services.clear();
            self.backends.clear();
            for (fe, ps) in &p.services {
                assert_eq!(ps.value.count as usize, ps.slots.len(), "{fe}");
                if fe.scope != Scope::Internal {
                    continue;
                }
                self.services.insert(
                    (fe.addr, fe.port, fe.protocol.number()),
                    Svc {
                        svc_id: ps.svc_id,
                        slots: ps.slots.clone(),
                    },
                );
            }
            for id in p.backends.keys() {
                let ep = p.endpoint(*id).expect("backend just read");
                self.backends.insert(*id, (ep.addr, ep.port));
            }
        }

        /// Forgets every flow and fragment (after the maps were emptied).
        pub fn clear_state(&mut self) {
            self.fwd.clear();
            self.rev.clear();
            self.frags.clear();
            self.recent.clear();
            self.recent_next = 0;
        }

        pub fn expect(&self, f: &[u8]) -> Expectation {
            let mut e = Expectation {
                verdict: Verdict::Pass(""),
                frag_record: None,
                rev_forget: None,
                mark: None,
            };
            e.verdict = match self.parse(f, &mut e.frag_record) {
                Err("passed_other_protocol") => match self.icmp_error(f) {
                    Some(v) => v,
                    None => Verdict::Pass("passed_other_protocol"),
                },
                Err(c) => Verdict::Pass(c),
                Ok(flow) => self.decide(flow, &mut e),
            };
            e
        }

        fn parse(
            &self,
            f: &[u8],
            record: &mut Option<(FragId, (u16, u16))>,
        ) -> Result<Flow, &'static str> {
            if f.len() < L3 {
                return Err(MALFORMED);
            }
            match be16(f, 12) {
                ETH_P_IP => {}
                ETH_P_IPV6 => return self.parse6(f, record),
                _ => return Err("passed_not_ip"),
            }
            if f.len() < L3 + 20 {
                return Err(MALFORMED);
            }
            let ihl = (f[L3] & 0xf) as usize * 4;
            if f[L3] >> 4 != 4 || ihl < 20 {
                return Err(MALFORMED);
            }
            let total_len = be16(f, L3 + 2) as usize;
            if total_len < ihl || f.len() < L3 + ihl {
                return Err(MALFORMED);
            }
            let proto = f[L3 + 9];
            if proto != TCP && proto != UDP {
                return Err("passed_other_protocol");
            }
            let frag = be16(f, L3 + 6);
            let (src, dst, id) = (ip4_at(f, L3 + 12), ip4_at(f, L3 + 16), be16(f, L3 + 4));
            let key = (IpAddr::V4(src), IpAddr::V4(dst), id as u32, proto);
            let l4_off = L3 + ihl;
            let tuple = |sport, dport| Tuple {
                src: IpAddr::V4(src),
                dst: IpAddr::V4(dst),
                sport,
                dport,
                proto,
            };
            if frag & IP_OFFSET != 0 {
                let &(sport, dport) = self.frags.get(&key).ok_or("passed_fragment_unknown")?;
                return Ok(Flow {
                    tuple: tuple(sport, dport),
                    total_len,
                    l4_off,
                    has_l4: false,
                    tcp_flags: 0,
                });
            }
            let l4_min = if proto == TCP { 20 } else { 8 };
            if total_len < ihl + l4_min || f.len() < l4_off + l4_min {
                return Err(MALFORMED);
            }
            let (sport, dport) = (be16(f, l4_off), be16(f, l4_off + 2));
            let tcp_flags = if proto == TCP { f[l4_off + 13] } else { 0 };
            if frag & IP_MF != 0 {
                *record = Some((key, (sport, dport)));
            }
            Ok(Flow {
                tuple: tuple(sport, dport),
                total_len,
                l4_off,
                has_l4: true,
                tcp_flags,
            })
        }

        fn parse6(
            &self,
            f: &[u8],
            record: &mut Option<(FragId, (u16, u16))>,
        ) -> Result<Flow, &'static str> {
            if f.len() < L3 + 40 || f[L3] >> 4 != 6 {
                return Err(MALFORMED);
            }
            let (src, dst) = (
                IpAddr::V6(ip6_at(f, L3 + 8)),
                IpAddr::V6(ip6_at(f, L3 + 24)),
            );
            let mut next = f[L3 + 6];
            let mut off = L3 + 40;
            let mut first_fragment = None;
            for _ in 0..4 {
                match next {
                    0 | 43 | 60 => {
                        if f.len() < off + 2 {
                            return Err(MALFORMED);
                        }
                        next = f[off];
                        off += (f[off + 1] as usize + 1) * 8;
                    }
                    44 => {
                        if f.len() < off + 8 {
                            return Err(MALFORMED);
                        }
                        let frag = be16(f, off + 2);
                        let id =
                            u32::from_be_bytes([f[off + 4], f[off + 5], f[off + 6], f[off + 7]]);
                        next = f[off];
                        off += 8;
                        if frag & 0xfff8 != 0 {
                            // A later fragment: the ports its first fragment recorded.
                            if next != TCP && next != UDP {
                                return Err("passed_other_protocol");
                            }
                            let &(sport, dport) = self
                                .frags
                                .get(&(src, dst, id, next))
                                .ok_or("passed_fragment_unknown")?;
                            return Ok(Flow {
                                tuple: Tuple {
                                    src,
                                    dst,
                                    sport,
                                    dport,
                                    proto: next,
                                },
                                total_len: 0,
                                l4_off: off,
                                has_l4: false,
                                tcp_flags: 0,
                            });
                        }
                        if frag & 1 != 0 {
                            first_fragment = Some(id);
                        }
                    }
                    _ => break,
                }
            }
            if next != TCP && next != UDP {
                return Err("passed_other_protocol");
            }
            let l4_min = if next == TCP { 20 } else { 8 };
            if f.len() < off + l4_min {
                return Err(MALFORMED);
            }
            if let Some(id) = first_fragment {
                *record = Some(((src, dst, id, next), (be16(f, off), be16(f, off + 2))));
            }
            Ok(Flow {
                tuple: Tuple {
                    src,
                    dst,
                    sport: be16(f, off),
                    dport: be16(f, off + 2),
                    proto: next,
                },
                total_len: 0,
                l4_off: off,
                has_l4: true,
                tcp_flags: if next == TCP { f[off + 13] } else { 0 },
            })
        }

        /// An IPv4 frame that parsed as "other protocol": an ICMP error about a recorded flow?
        fn icmp_error(&self, f: &[u8]) -> Option<Verdict> {
            if be16(f, 12) != ETH_P_IP || f[L3 + 9] != ICMP || be16(f, L3 + 6) & IP_OFFSET != 0 {
                return None;
            }
            let icmp_off = L3 + (f[L3] & 0xf) as usize * 4;
            if !matches!(f.get(icmp_off), Some(3 | 11 | 12)) {
                return None;
            }
            let inner_off = icmp_off + 8;
            let ivihl = *f.get(inner_off)?;
            let inner_ihl = (ivihl & 0xf) as usize * 4;
            if ivihl >> 4 != 4 || inner_ihl < 20 {
                return None;
            }
            let proto = *f.get(inner_off + 9)?;
            if proto != TCP && proto != UDP {
                return None;
            }
            let inner_l4 = inner_off + inner_ihl;
            if f.len() < inner_l4 + 4 {
                return None;
            }
            let quoted = Tuple {
                src: IpAddr::V4(ip4_at(f, inner_off + 12)),
                dst: IpAddr::V4(ip4_at(f, inner_off + 16)),
                sport: be16(f, inner_l4),
                dport: be16(f, inner_l4 + 2),
                proto,
            };
            let ct = *self.rev.get(&quoted.reply())?;
            Some(Verdict::Icmp {
                e: IcmpError {
                    icmp_off,
                    inner_off,
                    inner_ihl,
                    quoted,
                    outer_src: ip4_at(f, L3 + 12),
                },
                ct,
            })
        }

        fn backend(&self, id: u32) -> Backend {
            match self.backends.get(&id) {
                Some(&(addr, port)) => Backend { id, addr, port },
                None => panic!("maps inconsistent: a slot names backend {id}, which is absent"),
            }
        }

        /// The forward tuple of the flow a reverse entry belongs to.
        fn forward_of(ct: &Ct, proto: u8) -> Tuple {
            Tuple {
                src: ct.orig_addr,
                dst: ct.nat_addr,
                sport: ct.orig_port,
                dport: ct.nat_port,
                proto,
            }
        }

        fn decide(&self, flow: Flow, e: &mut Expectation) -> Verdict {
            let t = flow.tuple;
            let tcp = t.proto == TCP;
            let closing = tcp && flow.tcp_flags & (TCP_FIN | TCP_RST) != 0;
            let Some(svc) = self.services.get(&(t.dst, t.dport, t.proto)) else {
                if flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    // Only a flow that ended (closing, or its forward entry gone) gives its
                    // tuple up: a SYN spoofed onto a live flow leaves its reply path alone.
                    if let Some(r) = self.rev.get(&t.reply()) {
                        let live = self
                            .fwd
                            .get(&Self::forward_of(r, t.proto))
                            .is_some_and(|f| !f.closing);
                        if r.closing || !live {
                            e.rev_forget = Some(t.reply());
                        }
                    }
                    if t.reply() == t && e.rev_forget.is_some() {
                        return Verdict::Pass("passed_no_match");
                    }
                }
                return match self.rev.get(&t) {
                    Some(ct) => {
                        let reopened = tcp && flow.tcp_flags & TCP_SYN != 0;
                        if closing || (reopened && ct.closing) {
                            e.mark = Some((Self::forward_of(ct, t.proto), t, closing, reopened));
                        }
                        Verdict::Rnat { flow, ct: *ct }
                    }
                    None => Verdict::Pass("passed_no_match"),
                };
            };
            let mut counter = "translated_new";
            if let Some(ct) = self.fwd.get(&t) {
                let same = self.backends.get(&ct.backend_id) == Some(&(ct.nat_addr, ct.nat_port));
                // A TCP packet other than a SYN keeps a removed backend (draining).
                let draining = !same && t.proto == TCP && flow.tcp_flags & TCP_SYN == 0;
                if (same || draining) && ct.svc_id == svc.svc_id {
                    let reopened = tcp && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
                    let (src, sport) = if ct.snat {
                        (ct.orig_addr, ct.orig_port)
                    } else {
                        (t.src, t.sport)
                    };
                    let reply = Tuple {
                        src: ct.nat_addr,
                        dst: src,
                        sport: ct.nat_port,
                        dport: sport,
                        proto: t.proto,
                    };
                    e.mark = Some((t, reply, closing, reopened));
                    return Verdict::Dnat {
                        flow,
                        choices: vec![Backend {
                            id: ct.backend_id,
                            addr: ct.nat_addr,
                            port: ct.nat_port,
                        }],
                        // A SYN on an ended connection's tuple is a new connection, on the
                        // entries it has: counted as new, the entries kept ("renewed").
                        counter: if reopened && ct.closing {
                            "renewed"
                        } else if same {
                            "translated_established"
                        } else {
                            "translated_draining"
                        },
                        svc_id: svc.svc_id,
                        snat: ct.snat.then_some((ct.orig_addr, ct.orig_port)),
                        hairpin_node: None,
                    };
                }
                counter = "reselected";
            }
            // Admission of a new flow: a frontend without endpoints rejects it (an ICMP port
            // unreachable sent back), or drops it when it cannot quote it (IPv4 options, IPv6
            // extension headers).
            if svc.slots.is_empty() {
                let plain = flow.l4_off == L3 + if flow.v6() { 40 } else { 20 };
                return if flow.has_l4 && plain {
                    Verdict::Reject { flow }
                } else {
                    Verdict::Drop("dropped_no_backend")
                };
            }
            Verdict::Dnat {
                flow,
                choices: svc.slots.iter().map(|id| self.backend(*id)).collect(),
                counter,
                svc_id: svc.svc_id,
                snat: None,
                hairpin_node: match t.src {
                    IpAddr::V4(_) => self.node4.map(IpAddr::V4),
                    IpAddr::V6(_) => self.node6.map(IpAddr::V6),
                },
            }
        }

        /// Records what a checked packet changed: its fragment record, a forgotten reverse
        /// entry and, for a new or reselected flow, the backend it got and its SNAT.
        /// `refreshed`: the packet refreshed its forward entry's last_seen (it was due, at most
        /// once a second).
        pub fn commit(
            &mut self,
            e: &Expectation,
            chosen: Option<(Backend, Option<(IpAddr, u16)>)>,
            refreshed: bool,
        ) {
            if let Some((k, v)) = e.frag_record {
                self.frags.insert(k, v);
            }
            if let Some(t) = e.rev_forget {
                self.rev.remove(&t);
            }
            // The datapath's mark: set on a FIN or RST, else cleared on a reopening SYN (so a
            // SYN+FIN on a closing entry clears it).
            let mark = |c: &mut Ct, closing: bool, reopened: bool| {
                if closing && !c.closing {
                    c.closing = true;
                } else if reopened && c.closing {
                    c.closing = false;
                }
            };
            let mut fwd_was_closing = false;
            if let Some((f, r, closing, reopened)) = e.mark {
                if let Some(c) = self.fwd.get_mut(&f) {
                    fwd_was_closing = c.closing;
                    mark(c, closing, reopened);
                }
                if let Some(c) = self.rev.get_mut(&r) {
                    mark(c, closing, reopened);
                }
            }
            let Verdict::Dnat {
                flow,
                counter,
                svc_id,
                ..
            } = &e.verdict
            else {
                return;
            };
            let t = flow.tuple;
            if matches!(
                *counter,
                "translated_established" | "translated_draining" | "renewed"
            ) {
                // The datapath puts back the reply direction's entry if it was forgotten, when
                // it looks for it: when the forward entry's refresh is due, or a FIN, RST or
                // SYN marks both entries.
                let marks = e.mark.is_some_and(|m| m.2 || m.3);
                if !refreshed && !marks {
                    return;
                }
                let ct = self.fwd[&t];
                let (src, sport) = if ct.snat {
                    (ct.orig_addr, ct.orig_port)
                } else {
                    (t.src, t.sport)
                };
                let reply = Tuple {
                    src: ct.nat_addr,
                    dst: src,
                    sport: ct.nat_port,
                    dport: sport,
                    proto: t.proto,
                };
                // Put back with the forward entry's flags as they were, plus this packet's FIN
                // or RST.
                let closing = e.mark.is_some_and(|m| m.2);
                self.rev.entry(reply).or_insert(Ct {
                    nat_addr: t.dst,
                    nat_port: t.dport,
                    orig_addr: t.src,
                    orig_port: t.sport,
                    closing: fwd_was_closing || closing,
                    ..ct
                });
                return;
            }
            let (b, snat) = chosen.expect("a new flow's backend");
            let (src, sport) = snat.unwrap_or((t.src, t.sport));
            let reply = Tuple {
                src: b.addr,
                dst: src,
                sport: b.port,
                dport: sport,
                proto: t.proto,
            };
            let ct = |nat_addr, nat_port, orig_addr, orig_port| Ct {
                nat_addr,
                nat_port,
                backend_id: b.id,
                svc_id: *svc_id,
                snat: snat.is_some(),
                orig_addr,
                orig_port,
                closing: false,
            };
            self.rev.insert(reply, ct(t.dst, t.dport, t.src, t.sport));
            self.fwd.insert(t, ct(b.addr, b.port, src, sport));
            let r = Recent {
                fwd: t,
                backend: (b.addr, b.port),
                seen_as: (src, sport),
            };
            if self.recent.len() < RECENT {
                self.recent.push(r);
            } else {
                self.recent[self.recent_next] = r;
                self.recent_next = (self.recent_next + 1) % RECENT;
            }
        }
    }
}

/// Compares one run with the model's expectation.
mod check {
    use std::net::IpAddr;

    use crate::{
        TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        model::{Backend, Expectation, Flow, IcmpError, SNAT_PORTS, Tuple, Verdict},
        wire::{L3, TCP, UDP, be16, csum, ip_at, pseudo, residual, sum},
    };

    pub struct Outcome {
        /// A wrong byte or checksum in an otherwise expected translation: a failure, but the
        /// flow is recorded as the datapath recorded it, so later frames are still checked.
        pub problem: Option<String>,
        /// Verdict class for the statistics.
        pub class: String,
        /// The backend a new or reselected flow got, and its SNAT.
        pub chosen: Option<(Backend, Option<(IpAddr, u16)>)>,
    }

    fn counters_are(moved: &[&str], want: &[&str]) -> Result<(), String> {
        let mut m = moved.to_vec();
        let mut w = want.to_vec();
        m.sort_unstable();
        w.sort_unstable();
        if m == w {
            Ok(())
        } else {
            Err(format!(
                "counters moved {moved:?}, expected exactly {want:?}"
            ))
        }
    }

    /// Address offsets in the frame: (source, destination, length).
    fn addr_offsets(v6: bool) -> (usize, usize, usize) {
        if v6 {
            (L3 + 8, L3 + 24, 16)
        } else {
            (L3 + 12, L3 + 16, 4)
        }
    }

    fn put_addr(f: &mut [u8], at: usize, a: IpAddr) {
        match a {
            IpAddr::V4(a) => f[at..at + 4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => f[at..at + 16].copy_from_slice(&a.octets()),
        }
    }

    /// `ct_backend` reads the kernel's conntrack entry of a forward tuple: the only way to tell
    /// which of two backends on one address a later fragment (no port to see) was sent to.
    pub fn check(
        f: &[u8],
        e: &Expectation,
        (rc, out, moved): (u32, &[u8], &[&str]),
        ct_backend: impl Fn(&Tuple) -> Option<u32>,
        reverse_taken: impl Fn(&Tuple) -> bool,
    ) -> Result<Outcome, String> {
        let outcome = |class: String, chosen, problem| {
            Ok(Outcome {
                class,
                chosen,
                problem,
            })
        };
        let ok_and_same_len = |what: &str| {
            if rc != TC_ACT_OK {
                return Err(format!("verdict {rc}, expected TC_ACT_OK ({what})"));
            }
            if out.len() != f.len() {
                return Err(format!("length {} -> {}", f.len(), out.len()));
            }
            Ok(())
        };
        match &e.verdict {
            Verdict::Pass(c) => {
                if rc != TC_ACT_OK {
                    return Err(format!("verdict {rc}, expected TC_ACT_OK (pass)"));
                }
                counters_are(moved, &[c])?;
                if out != f {
                    return Err(format!(
                        "passed but changed at offsets {:?}",
                        diff_offsets(f, out)
                    ));
                }
                outcome(format!("passed: {c}"), None, None)
            }
            Verdict::Drop(c) => {
                if rc != TC_ACT_SHOT {
                    return Err(format!("verdict {rc}, expected TC_ACT_SHOT (drop)"));
                }
                counters_are(moved, &[c])?;
                outcome(format!("dropped: {c}"), None, None)
            }
            Verdict::Reject { flow } => {
                if rc != TC_ACT_REDIRECT {
                    return Err(format!("verdict {rc}, expected TC_ACT_REDIRECT (reject)"));
                }
                counters_are(moved, &["rejected_no_backend"])?;
                let v6 = flow.v6();
                let (ip_len, quote) = if v6 { (40, 48) } else { (20, 28) };
                let icmp = L3 + ip_len;
                if out.len() != icmp + 8 + quote {
                    return Err(format!("reject of {} bytes", out.len()));
                }
                let mut problems = Vec::new();
                if out[..6] != f[6..12] || out[6..12] != f[..6] {
                    problems.push("Ethernet addresses not swapped".to_string());
                }
                let (s_off, d_off, _) = addr_offsets(v6);
                if ip_at(out, s_off, v6) != flow.tuple.dst
                    || ip_at(out, d_off, v6) != flow.tuple.src
                {
                    problems.push("not from the frontend to the client".into());
                }
                let (kind, sum) = if v6 {
                    let p = sum(&out[L3 + 8..L3 + 40], 0) + (8 + quote) as u64 + 58;
                    ((1, 4), csum(&out[icmp..], p))
                } else {
                    if csum(&out[L3..icmp], 0) != 0 {
                        problems.push("IPv4 header checksum".into());
                    }
                    ((3, 3), csum(&out[icmp..], 0))
                };
                if (out[icmp], out[icmp + 1]) != kind || sum != 0 {
                    problems.push(format!(
                        "ICMP type/code/checksum {:02x?}",
                        &out[icmp..icmp + 4]
                    ));
                }
                if out[icmp + 8..] != f[L3..L3 + quote] {
                    problems.push("quoted header differs from the packet".into());
                }
                let v = if v6 { " IPv6" } else { "" };
                let problem = (!problems.is_empty()).then(|| problems.join("; "));
                outcome(format!("rejected{v}"), None, problem)
            }
            Verdict::Dnat {
                flow,
                choices,
                counter,
                snat,
                hairpin_node,
                ..
            } => {
                ok_and_same_len("DNAT")?;
                let (s_off, d_off, _) = addr_offsets(flow.v6());
                let addr = ip_at(out, d_off, flow.v6());
                let port = flow.has_l4.then(|| be16(out, flow.l4_off + 2));
                let fits: Vec<Backend> = choices
                    .iter()
                    .filter(|b| b.addr == addr && port.is_none_or(|p| p == b.port))
                    .copied()
                    .collect();
                let b = match fits.as_slice() {
                    [] => {
                        return Err(format!(
                            "DNAT to {addr}:{port:?}, expected one of {choices:?}"
                        ));
                    }
                    [b] => *b,
                    _ => {
                        let id = ct_backend(&flow.tuple);
                        *fits.iter().find(|b| Some(b.id) == id).ok_or_else(|| {
                            format!(
                                "DNAT to {addr}, conntrack says backend {id:?}, not in {fits:?}"
                            )
                        })?
                    }
                };
                let t = flow.tuple;
                // The SNAT this packet must get: the recorded one, or for a new hairpin flow
                // the node address and a free port of the SNAT range (learned from the output).
                let snat = match (snat, hairpin_node) {
                    (Some(s), _) => Some(*s),
                    (None, Some(node)) if b.addr == t.src => {
                        let sport = if flow.has_l4 {
                            be16(out, flow.l4_off)
                        } else {
                            t.sport
                        };
                        if !SNAT_PORTS.contains(&(sport as u32)) {
                            return Err(format!(
                                "hairpin SNAT port {sport} outside the SNAT range {SNAT_PORTS:?}"
                            ));
                        }
                        let reply = Tuple {
                            src: b.addr,
                            dst: *node,
                            sport: b.port,
                            dport: sport,
                            proto: t.proto,
                        };
                        if reverse_taken(&reply) {
                            return Err(format!("hairpin SNAT port {sport} already in use"));
                        }
                        Some((*node, sport))
                    }
                    _ => None,
                };
                let mut want = f.to_vec();
                put_addr(&mut want, d_off, b.addr);
                if flow.has_l4 {
                    want[flow.l4_off + 2..flow.l4_off + 4].copy_from_slice(&b.port.to_be_bytes());
                }
                if let Some((a, p)) = snat {
                    put_addr(&mut want, s_off, a);
                    if flow.has_l4 {
                        want[flow.l4_off..flow.l4_off + 2].copy_from_slice(&p.to_be_bytes());
                    }
                }
                // "renewed": counted as a new flow, on the entries the tuple already has.
                let (counter, kept) = match *counter {
                    "renewed" => ("translated_new", true),
                    c => (c, c == "translated_established"),
                };
                // tc counts `snat` with every SNATed flow it counts as new, renewed ones too.
                let new_flow = snat.is_some() && counter != "translated_established";
                if new_flow {
                    counters_are(moved, &[counter, "snat"])?;
                } else {
                    counters_are(moved, &[counter])?;
                }
                let problem = rewrite_ok(f, out, &want, flow).err();
                let l3_only = if flow.has_l4 { "" } else { " (later fragment)" };
                let v6 = if flow.v6() { " IPv6" } else { "" };
                let s = if snat.is_some() { " + SNAT" } else { "" };
                let chosen = (!kept).then_some((b, snat));
                outcome(format!("DNAT{v6}: {counter}{s}{l3_only}"), chosen, problem)
            }
            Verdict::Rnat { flow, ct } => {
                ok_and_same_len("reverse NAT")?;
                counters_are(moved, &["reverse_translated"])?;
                let (s_off, d_off, _) = addr_offsets(flow.v6());
                let mut want = f.to_vec();
                put_addr(&mut want, s_off, ct.nat_addr);
                if flow.has_l4 {
                    want[flow.l4_off..flow.l4_off + 2].copy_from_slice(&ct.nat_port.to_be_bytes());
                }
                if ct.snat {
                    put_addr(&mut want, d_off, ct.orig_addr);
                    if flow.has_l4 {
                        want[flow.l4_off + 2..flow.l4_off + 4]
                            .copy_from_slice(&ct.orig_port.to_be_bytes());
                    }
                }
                let problem = rewrite_ok(f, out, &want, flow).err();
                let l3_only = if flow.has_l4 { "" } else { " (later fragment)" };
                let v6 = if flow.v6() { " IPv6" } else { "" };
                let s = if ct.snat { " + un-SNAT" } else { "" };
                outcome(
                    format!("reverse NAT{v6}: reverse_translated{s}{l3_only}"),
                    None,
                    problem,
                )
            }
            Verdict::Icmp { e, ct } => {
                ok_and_same_len("ICMP error translation")?;
                counters_are(moved, &["icmp_translated"])?;
                let problem = icmp_ok(f, out, e, ct).err();
                let s = if ct.snat { " (SNATed flow)" } else { "" };
                outcome(format!("ICMP error: icmp_translated{s}"), None, problem)
            }
        }
    }

    pub fn diff_offsets(a: &[u8], b: &[u8]) -> Vec<usize> {
        (0..a.len().max(b.len()))
            .filter(|i| a.get(*i) != b.get(*i))
            .collect()
    }

    fn same_but(want: &[u8], out: &[u8], skip: &[usize]) -> Result<(), String> {
        let bad: Vec<usize> = diff_offsets(want, out)
            .into_iter()
            .filter(|i| !skip.contains(i))
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "bytes other than the rewrite's differ from the expected frame at offsets {bad:?}"
            ))
        }
    }

    fn same_sum(
        what: &str,
        f: &[u8],
        out: &[u8],
        region: std::ops::Range<usize>,
    ) -> Result<(), String> {
        let (before, after) = (residual(&f[region.clone()], 0), residual(&out[region], 0));
        if before != after {
            return Err(format!(
                "{what} checksum not updated by the rewrite: sum {before:04x} before, {after:04x} after (ffff = valid)"
            ));
        }
        Ok(())
    }

    /// `out` is `want` but for the checksum fields; each checksum still sums to what it did (so
    /// a valid one stays valid). UDP over IPv4: "no checksum" (0) stays 0, a present one never
    /// becomes 0; over IPv6 a checksum never becomes 0 (receivers drop such datagrams).
    fn rewrite_ok(f: &[u8], out: &[u8], want: &[u8], flow: &Flow) -> Result<(), String> {
        let proto = flow.tuple.proto;
        let v6 = flow.v6();
        let csum_at = flow.l4_off + if proto == TCP { 16 } else { 6 };
        let mut skip = vec![];
        if !v6 {
            skip.extend([L3 + 10, L3 + 11]);
        }
        if flow.has_l4 {
            skip.extend([csum_at, csum_at + 1]);
        }
        same_but(want, out, &skip)?;
        if !v6 {
            same_sum("IP header", f, out, L3..flow.l4_off)?;
        }
        if !flow.has_l4 {
            return Ok(());
        }
        let end = if v6 {
            f.len()
        } else {
            f.len().min(L3 + flow.total_len)
        };
        let seg = end - flow.l4_off;
        let sum = |p: &[u8]| {
            let (s_off, d_off, _) = addr_offsets(v6);
            residual(
                &p[flow.l4_off..end],
                pseudo(ip_at(p, s_off, v6), ip_at(p, d_off, v6), proto, seg),
            )
        };
        let (c0, c1) = (be16(f, csum_at), be16(out, csum_at));
        if proto == UDP && !v6 && c0 == 0 {
            // No checksum: it must stay so, and then covers nothing.
            return if c1 == 0 {
                Ok(())
            } else {
                Err(format!("UDP checksum 0 (none) became {c1:04x}"))
            };
        }
        if proto == UDP && v6 && c0 == 0 && c1 == 0 {
            // Zero is not a valid IPv6 UDP checksum (RFC 8200 8.1): the rewrite leaves it
            // (the kernel's zero-checksum rule for UDP), and the receiver drops the datagram
            // as it would have before.
            return Ok(());
        }
        let (before, after) = (sum(f), sum(out));
        if before != after {
            return Err(format!(
                "L4 checksum not updated by the rewrite: sum {before:04x} before, {after:04x} after (ffff = valid)"
            ));
        }
        if proto == UDP && c1 == 0 {
            return Err(format!(
                "UDP checksum {c0:04x} became 0000 ({})",
                if v6 {
                    "over IPv6 a computed 0 must be sent as ffff (RFC 8200 8.1), receivers drop 0"
                } else {
                    "0 means no checksum"
                }
            ));
        }
        Ok(())
    }

    /// The ICMP error with the quoted destination restored to the frontend (and, for a SNATed
    /// flow, the quoted source and outer destination to the client; an outer source equal to
    /// the quoted destination to the frontend); outer IP, quoted IP and ICMP checksums still
    /// sum to what they did.
    fn icmp_ok(f: &[u8], out: &[u8], e: &IcmpError, ct: &crate::model::Ct) -> Result<(), String> {
        let q = e.quoted;
        let inner_l4 = e.inner_off + e.inner_ihl;
        let mut want = f.to_vec();
        put_addr(&mut want, e.inner_off + 16, ct.nat_addr);
        want[inner_l4 + 2..inner_l4 + 4].copy_from_slice(&ct.nat_port.to_be_bytes());
        if ct.snat {
            put_addr(&mut want, e.inner_off + 12, ct.orig_addr);
            want[inner_l4..inner_l4 + 2].copy_from_slice(&ct.orig_port.to_be_bytes());
            put_addr(&mut want, L3 + 16, ct.orig_addr);
        }
        if IpAddr::V4(e.outer_src) == q.dst {
            put_addr(&mut want, L3 + 12, ct.nat_addr);
        }
        let icmp_csum = e.icmp_off + 2;
        let inner_csum = e.inner_off + 10;
        same_but(
            &want,
            out,
            &[
                L3 + 10,
                L3 + 11,
                icmp_csum,
                icmp_csum + 1,
                inner_csum,
                inner_csum + 1,
            ],
        )?;
        same_sum("IP header", f, out, L3..e.icmp_off)?;
        same_sum("quoted IP header", f, out, e.inner_off..inner_l4)?;
        same_sum("ICMP", f, out, e.icmp_off..f.len())
    }
}

/// The seeded generator: structured frames, then mutations.
mod generate {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use rand::{Rng, rngs::StdRng, seq::IndexedRandom};

    use crate::{
        model::{Model, Recent},
        topo,
        wire::{self, Csum, ETH_P_IP, IP_DF, IP_MF, Ip4, L3, TCP, Tcp, UDP},
    };

    pub struct Sample {
        pub frame: Vec<u8>,
        pub kind: &'static str,
        pub mutations: Vec<&'static str>,
    }

    /// A datagram sent (or about to be sent) in two fragments.
    #[derive(Clone)]
    struct FragSeed {
        ip: Ip4,
        datagram: Vec<u8>,
        /// Bytes of the datagram in the first fragment (a multiple of 8).
        split: usize,
    }

    pub struct Gen {
        rng: StdRng,
        frontends: Vec<(Ipv4Addr, u16, u8)>,
        backends: Vec<(Ipv4Addr, u16)>,
        frags: Vec<FragSeed>,
        frags_next: usize,
        /// TCP flags for the next segment built (else random).
        next_tcp_flags: Option<u8>,
    }

    const FRAG_POOL: usize = 256;

    /// An IPv4 flow of the model's recent ones.
    #[derive(Clone, Copy)]
    struct Fwd4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        proto: u8,
    }

    #[derive(Clone, Copy)]
    struct R4 {
        fwd: Fwd4,
        backend: (Ipv4Addr, u16),
        /// The client as the backend sees it (the node address and port when SNATed).
        seen_as: (Ipv4Addr, u16),
    }

    fn v6(a: IpAddr) -> Ipv6Addr {
        match a {
            IpAddr::V6(a) => a,
            IpAddr::V4(a) => a.to_ipv6_mapped(),
        }
    }

    /// Stands in for a recorded flow before there is one.
    const SYNTHETIC: R4 = R4 {
        fwd: Fwd4 {
            src: topo::CLIENTS[0],
            dst: topo::VIP_WEB,
            sport: 40000,
            dport: 80,
            proto: TCP,
        },
        backend: (topo::B1, 8080),
        seen_as: (topo::CLIENTS[0], 40000),
    };

    impl Gen {
        pub fn new(rng: StdRng) -> Self {
            Self {
                rng,
                frontends: topo::frontends_v4(),
                backends: topo::backends_v4(),
                frags: Vec::new(),
                frags_next: 0,
                next_tcp_flags: None,
            }
        }

        pub fn next(&mut self, m: &Model) -> Sample {
            let (kind, frame) = match self.rng.random_range(0..100) {
                0..22 => ("to frontend", self.client_to_frontend(m)),
                22..26 => ("to empty Service", self.client_to_empty()),
                26..31 => ("to VIP, wrong port or protocol", self.wrong_port()),
                31..33 => ("to non-VIP", self.client_to_non_vip()),
                33..35 => (
                    "SYN straight to a backend, on a translated flow's tuple",
                    self.direct_syn(m),
                ),
                35..47 => ("reply of a recorded flow", self.reply_known(m)),
                47..51 => ("reply of an unknown flow", self.reply_unknown()),
                51..63 => self.fragment(m),
                63..70 => self.icmp(m),
                70..77 => self.ipv6(m),
                77..80 => ("ARP", self.arp()),
                80..84 => ("VLAN-tagged IPv4", self.vlan(m)),
                84..86 => ("other ethertype", self.other_ethertype()),
                86..94 => ("random IPv4 header", self.random_ipv4()),
                _ => ("garbage", self.garbage()),
            };
            let mut s = Sample {
                frame,
                kind,
                mutations: Vec::new(),
            };
            if kind != "garbage" && self.rng.random_bool(0.4) {
                self.mutate(&mut s);
            }
            s
        }

        fn pick<T: Copy>(&mut self, v: &[T]) -> T {
            *v.choose(&mut self.rng).expect("non-empty")
        }

        fn client_port(&mut self) -> u16 {
            if self.rng.random_bool(0.7) {
                40000 + self.rng.random_range(0..256)
            } else {
                self.rng.random()
            }
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.rng.random()).collect()
        }

        fn payload(&mut self) -> Vec<u8> {
            let n = match self.rng.random_range(0..20) {
                0 => self.rng.random_range(300..1400),
                1..6 => 0,
                _ => self.rng.random_range(1..64),
            };
            self.bytes(n)
        }

        fn ip_options(&mut self) -> Vec<u8> {
            let words = self.rng.random_range(1..=10);
            let mut o = Vec::new();
            while o.len() < words * 4 {
                match self.rng.random_range(0..5) {
                    0 => o.push(1),                             // NOP
                    1 => o.extend_from_slice(&[0x94, 4, 0, 0]), // router alert
                    2 => {
                        // timestamp, possibly with a lying length
                        let len = self.rng.random_range(4..=40u8);
                        o.extend_from_slice(&[0x44, len, 5, 0]);
                    }
                    3 => {
                        let b = self.bytes(4);
                        o.extend_from_slice(&b);
                    }
                    _ => o.push(0), // EOL
                }
            }
            o.truncate(words * 4);
            o
        }

        fn ip(&mut self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Ip4 {
            Ip4 {
                src,
                dst,
                proto,
                id: self.rng.random(),
                frag: if self.rng.random_bool(0.5) { IP_DF } else { 0 },
                ttl: self.rng.random(),
                tos: self.rng.random(),
                options: if self.rng.random_bool(0.15) {
                    self.ip_options()
                } else {
                    vec![]
                },
            }
        }

        fn csum_mode(&mut self, proto: u8) -> Csum {
            match self.rng.random_range(0..20) {
                0 | 1 => Csum::Bad(self.rng.random_range(1..=u16::MAX)),
                2..5 if proto == UDP => Csum::Zero,
                _ => Csum::Valid,
            }
        }

        /// A TCP segment or UDP datagram with random flags, options, payload and checksum mode.
        fn l4(&mut self, ip: &Ip4, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
            let c = self.csum_mode(ip.proto);
            if ip.proto == TCP {
                let t = Tcp {
                    sport,
                    dport,
                    seq: self.rng.random(),
                    ack: self.rng.random(),
                    // Every flag combination, NS included.
                    flags: match self.next_tcp_flags.take() {
                        Some(f) => f,
                        None => self.rng.random(),
                    },
                    ns: self.rng.random(),
                    window: self.rng.random(),
                    urg: self.rng.random(),
                    options: if self.rng.random_bool(0.2) {
                        let n = self.rng.random_range(1..=10) * 4;
                        self.bytes(n)
                    } else {
                        vec![]
                    },
                };
                wire::tcp(ip.src, ip.dst, &t, payload, c)
            } else {
                wire::udp(ip.src, ip.dst, (sport, dport), payload, c)
            }
        }

        fn l4_frame(
            &mut self,
            src: Ipv4Addr,
            dst: Ipv4Addr,
            proto: u8,
            ports: (u16, u16),
        ) -> Vec<u8> {
            let ip = self.ip(src, dst, proto);
            let payload = self.payload();
            let seg = self.l4(&ip, ports.0, ports.1, &payload);
            ip.frame(&seg)
        }

        /// A recorded IPv4 flow, if there is one.
        fn recent(&mut self, m: &Model) -> Option<R4> {
            for _ in 0..8 {
                let r: Recent = *m.recent.choose(&mut self.rng)?;
                let t = r.fwd;
                if let (
                    IpAddr::V4(src),
                    IpAddr::V4(dst),
                    (IpAddr::V4(b), bport),
                    (IpAddr::V4(seen), sport),
                ) = (t.src, t.dst, r.backend, r.seen_as)
                {
                    return Some(R4 {
                        fwd: Fwd4 {
                            src,
                            dst,
                            sport: t.sport,
                            dport: t.dport,
                            proto: t.proto,
                        },
                        backend: (b, bport),
                        seen_as: (seen, sport),
                    });
                }
            }
            None
        }

        /// A recorded IPv6 flow, if there is one.
        fn recent6(&mut self, m: &Model) -> Option<Recent> {
            (0..8)
                .filter_map(|_| m.recent.choose(&mut self.rng).copied())
                .find(|r| r.fwd.src.is_ipv6())
        }

        /// A client to a frontend: often a flow already recorded, else a port from a small pool
        /// (so flows repeat) or any port.
        fn client_to_frontend(&mut self, m: &Model) -> Vec<u8> {
            if self.rng.random_bool(0.3)
                && let Some(r) = self.recent(m)
            {
                let t = r.fwd;
                return self.l4_frame(t.src, t.dst, t.proto, (t.sport, t.dport));
            }
            let (vip, port, proto) = self.pick(&self.frontends.clone());
            let client = self.pick(&topo::CLIENTS);
            let sport = self.client_port();
            self.l4_frame(client, vip, proto, (sport, port))
        }

        fn client_to_empty(&mut self) -> Vec<u8> {
            let (port, proto) = self.pick(&[(80, TCP), (53, UDP)]);
            let client = self.pick(&topo::CLIENTS);
            let sport = self.client_port();
            self.l4_frame(client, topo::VIP_EMPTY, proto, (sport, port))
        }

        fn wrong_port(&mut self) -> Vec<u8> {
            let vip = self.pick(&[topo::VIP_WEB, topo::VIP_MULTI, topo::VIP_HAIRPIN]);
            let (port, proto) = match self.rng.random_range(0..3) {
                0 => (80, UDP),
                1 => (53, TCP),
                _ => {
                    let port = self.rng.random();
                    (port, self.pick(&[TCP, UDP]))
                }
            };
            let client = self.pick(&topo::CLIENTS);
            let sport = self.client_port();
            self.l4_frame(client, vip, proto, (sport, port))
        }

        /// A client dialling a backend directly (as socket LB does) from the source port of a
        /// flow that went through a frontend to that backend.
        fn direct_syn(&mut self, m: &Model) -> Vec<u8> {
            let r = self.recent(m).unwrap_or(SYNTHETIC);
            let t = r.fwd;
            self.next_tcp_flags = Some(self.pick(&[0x02, 0x02, 0xc2, 0x12, 0x03]));
            let proto = if self.rng.random_bool(0.9) { TCP } else { UDP };
            self.l4_frame(t.src, r.backend.0, proto, (t.sport, r.backend.1))
        }

        fn client_to_non_vip(&mut self) -> Vec<u8> {
            let dst = self.pick(&[topo::NOT_VIP, topo::ROUTER, topo::B1, topo::CLIENTS[1]]);
            let src = self.pick(&topo::CLIENTS);
            let proto = self.pick(&[TCP, UDP]);
            let ports = (self.client_port(), self.pick(&[80, 53, 8080, 5353, 443]));
            self.l4_frame(src, dst, proto, ports)
        }

        /// A backend answering a recorded flow (sometimes with one field off).
        fn reply_known(&mut self, m: &Model) -> Vec<u8> {
            let Some(r) = self.recent(m) else {
                return self.reply_unknown();
            };
            let t = r.fwd;
            let (mut src, mut sport, mut dport) = (r.backend.0, r.backend.1, r.seen_as.1);
            match self.rng.random_range(0..10) {
                0 => dport = dport.wrapping_add(1),
                1 => sport = sport.wrapping_add(1),
                2 => src = topo::B4,
                _ => {}
            }
            self.l4_frame(src, r.seen_as.0, t.proto, (sport, dport))
        }

        fn reply_unknown(&mut self) -> Vec<u8> {
            let (src, sport) = self.pick(&self.backends.clone());
            let dst = self.pick(&topo::CLIENTS);
            let proto = self.pick(&[TCP, UDP]);
            let dport = self.client_port();
            self.l4_frame(src, dst, proto, (sport, dport))
        }

        fn new_frag_seed(&mut self, m: &Model) -> FragSeed {
            let (src, dst, proto, sport, dport) = match self.rng.random_range(0..20) {
                0..12 => {
                    let (vip, port, proto) = self.pick(&self.frontends.clone());
                    let client = self.pick(&topo::CLIENTS);
                    (client, vip, proto, self.client_port(), port)
                }
                12..17 => match self.recent(m) {
                    Some(r) => (
                        r.backend.0,
                        r.fwd.src,
                        r.fwd.proto,
                        r.backend.1,
                        r.fwd.sport,
                    ),
                    None => (topo::B1, topo::CLIENTS[0], UDP, 5353, 40000),
                },
                _ => (
                    topo::CLIENTS[1],
                    topo::NOT_VIP,
                    self.pick(&[TCP, UDP]),
                    self.client_port(),
                    53,
                ),
            };
            let mut ip = self.ip(src, dst, proto);
            // Small ids so that unrelated datagrams sometimes share one.
            ip.id = self.rng.random_range(0..64);
            let n = self.rng.random_range(16..300);
            let payload = self.bytes(n);
            let datagram = self.l4(&ip, sport, dport, &payload);
            let max_split = (datagram.len() - 1) / 8;
            let split = 8 * self.rng.random_range(1..=max_split.min(8));
            FragSeed {
                ip,
                datagram,
                split,
            }
        }

        fn first_fragment(s: &FragSeed) -> Vec<u8> {
            let mut ip = s.ip.clone();
            ip.frag = IP_MF;
            ip.frame(&s.datagram[..s.split])
        }

        fn later_fragment(&mut self, s: &FragSeed) -> Vec<u8> {
            let mut ip = s.ip.clone();
            let mut off = s.split;
            if self.rng.random_bool(0.2) && s.datagram.len() > off + 8 {
                off += 8 * self.rng.random_range(0..(s.datagram.len() - off) / 8);
            }
            let mf = if self.rng.random_bool(0.3) { IP_MF } else { 0 };
            ip.frag = mf | (off / 8) as u16;
            ip.frame(&s.datagram[off..])
        }

        fn push_seed(&mut self, s: FragSeed) {
            if self.frags.len() < FRAG_POOL {
                self.frags.push(s);
            } else {
                self.frags[self.frags_next] = s;
                self.frags_next = (self.frags_next + 1) % FRAG_POOL;
            }
        }

        fn fragment(&mut self, m: &Model) -> (&'static str, Vec<u8>) {
            let r = self.rng.random_range(0..20);
            if self.frags.is_empty() || r < 7 {
                let s = self.new_frag_seed(m);
                // Sometimes the later fragment arrives first.
                let (kind, f) = if self.rng.random_bool(0.15) {
                    ("later fragment before its first", self.later_fragment(&s))
                } else {
                    ("first fragment", Self::first_fragment(&s))
                };
                self.push_seed(s);
                return (kind, f);
            }
            let i = self.rng.random_range(0..self.frags.len());
            let s = self.frags[i].clone();
            match r {
                7..15 => ("later fragment", self.later_fragment(&s)),
                15..17 => ("first fragment again", Self::first_fragment(&s)),
                _ => {
                    // A later fragment of a datagram whose first was never seen.
                    let mut u = s;
                    match self.rng.random_range(0..3) {
                        0 => u.ip.id = u.ip.id.wrapping_add(self.rng.random_range(64..65000)),
                        1 => u.ip.src = topo::CLIENTS[2],
                        _ => u.ip.dst = topo::NOT_VIP,
                    }
                    ("later fragment, unknown id", self.later_fragment(&u))
                }
            }
        }

        /// The first bytes of a packet as an ICMP error quotes them.
        fn quote(&mut self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ports: (u16, u16)) -> Vec<u8> {
            let ip = self.ip(src, dst, proto);
            let seg = self.l4(&ip, ports.0, ports.1, &[]);
            let mut q = ip.packet(&seg);
            let keep = if self.rng.random_bool(0.5) {
                20 + ip.options.len() + 8
            } else {
                q.len()
            };
            q.truncate(keep);
            q
        }

        fn icmp(&mut self, m: &Model) -> (&'static str, Vec<u8>) {
            let errors: [(u8, u8); 6] = [(3, 3), (3, 1), (3, 4), (11, 0), (12, 0), (4, 0)];
            let (kind, outer_src, outer_dst, body, (typ, code)) = match self.rng.random_range(0..20)
            {
                0..5 => {
                    let dst = self.pick(&[topo::VIP_WEB, topo::VIP_EMPTY, topo::NOT_VIP]);
                    let body = self.payload();
                    let t = self.pick(&[8u8, 0]);
                    let src = self.pick(&topo::CLIENTS);
                    ("ICMP echo", src, dst, body, (t, 0))
                }
                5..13 => {
                    // From the backend (or a router on the way) about a packet the backend saw.
                    let r = self.recent(m).unwrap_or(SYNTHETIC);
                    let t = r.fwd;
                    let (seen, seen_port) = r.seen_as;
                    let q = self.quote(seen, r.backend.0, t.proto, (seen_port, r.backend.1));
                    let src = if self.rng.random_bool(0.7) {
                        r.backend.0
                    } else {
                        topo::ROUTER
                    };
                    let e = self.pick(&errors);
                    ("ICMP error quoting a translated flow", src, seen, q, e)
                }
                13..16 => {
                    // From the client about a reply it got from the frontend.
                    let r = self.recent(m).unwrap_or(SYNTHETIC);
                    let t = r.fwd;
                    let q = self.quote(t.dst, t.src, t.proto, (t.dport, t.sport));
                    let e = self.pick(&errors);
                    ("ICMP error from a client about a reply", t.src, t.dst, q, e)
                }
                _ => {
                    let (vip, port, proto) = self.pick(&self.frontends.clone());
                    let a = self.pick(&topo::CLIENTS);
                    let sport = self.rng.random();
                    let q = self.quote(a, vip, proto, (sport, port));
                    let e = self.pick(&errors);
                    ("ICMP error quoting a foreign flow", topo::ROUTER, a, q, e)
                }
            };
            let rest = if typ == 3 && code == 4 {
                [0, 0, 0x05, 0xdc]
            } else {
                [0; 4]
            };
            let valid = self.rng.random_bool(0.9);
            let msg = wire::icmp(typ, code, rest, &body, valid);
            let ip = self.ip(outer_src, outer_dst, wire::ICMP);
            (kind, ip.frame(&msg))
        }

        fn ipv6(&mut self, m: &Model) -> (&'static str, Vec<u8>) {
            let n_ext = if self.rng.random_bool(0.5) {
                0
            } else {
                self.rng.random_range(1..=3)
            };
            let exts: Vec<u8> = (0..n_ext)
                .map(|_| self.pick(&[0u8, 43, 44, 60, 51]))
                .collect();
            match self.rng.random_range(0..20) {
                0..6 => {
                    // A client to an IPv6 frontend: a recorded flow again, or a new one.
                    let (src, (proto, dport), sport) = match self.recent6(m) {
                        Some(r) if self.rng.random_bool(0.4) => {
                            let t = r.fwd;
                            (v6(t.src), (t.proto, t.dport), t.sport)
                        }
                        _ => (
                            topo::CLIENT6,
                            self.pick(&[(TCP, 80), (UDP, 53), (TCP, 53)]),
                            self.client_port(),
                        ),
                    };
                    let f = self.ipv6_frame((src, topo::VIP6), proto, (sport, dport), &exts, false);
                    ("IPv6 to a frontend", f)
                }
                6..10 => {
                    let Some(r) = self.recent6(m) else {
                        return (
                            "IPv6 reply of a recorded flow",
                            self.ipv6_frame(
                                (topo::B6, topo::CLIENT6),
                                UDP,
                                (5353, 40000),
                                &exts,
                                false,
                            ),
                        );
                    };
                    let (b, bport) = r.backend;
                    let (c, cport) = r.seen_as;
                    let f =
                        self.ipv6_frame((v6(b), v6(c)), r.fwd.proto, (bport, cport), &exts, false);
                    ("IPv6 reply of a recorded flow", f)
                }
                10 => {
                    let sport = self.client_port();
                    let f =
                        self.ipv6_frame((topo::CLIENT6, topo::VIP6), UDP, (sport, 53), &[], true);
                    ("IPv6 UDP whose checksum is 0 once translated", f)
                }
                _ => {
                    let addrs = [topo::CLIENT6, topo::VIP6, topo::B6, topo::OTHER6];
                    let ends = (self.pick(&addrs), self.pick(&addrs));
                    let any = self.rng.random();
                    let upper = self.pick(&[TCP, UDP, wire::ICMPV6, 59, any]);
                    let ports = (self.client_port(), self.pick(&[80u16, 53, 443]));
                    ("IPv6", self.ipv6_frame(ends, upper, ports, &exts, false))
                }
            }
        }

        /// An IPv6 frame with extension headers `exts` before `upper`. With `zero_after`, a UDP
        /// datagram to the IPv6 DNS frontend whose checksum is 0 once translated to its only
        /// backend (two payload bytes are chosen for that).
        fn ipv6_frame(
            &mut self,
            (src, dst): (Ipv6Addr, Ipv6Addr),
            upper: u8,
            (sport, port): (u16, u16),
            exts: &[u8],
            zero_after: bool,
        ) -> Vec<u8> {
            let mut payload = self.payload();
            if zero_after && payload.len() < 2 {
                payload = self.bytes(8);
            }
            let mut upper_bytes = match upper {
                TCP => {
                    let mut s = vec![0u8; 20];
                    s[0..2].copy_from_slice(&sport.to_be_bytes());
                    s[2..4].copy_from_slice(&port.to_be_bytes());
                    s[12] = 0x50;
                    s[13] = self.rng.random();
                    s.extend_from_slice(&payload);
                    let c = wire::csum(&s, wire::pseudo6(src, dst, TCP, s.len()));
                    s[16..18].copy_from_slice(&c.to_be_bytes());
                    s
                }
                UDP => {
                    let mut s = vec![0u8; 8];
                    s[0..2].copy_from_slice(&sport.to_be_bytes());
                    s[2..4].copy_from_slice(&port.to_be_bytes());
                    s[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                    s.extend_from_slice(&payload);
                    if zero_after {
                        // The translated datagram's sum without checksum must fold to ffff.
                        let mut t = s.clone();
                        t[2..4].copy_from_slice(&5353u16.to_be_bytes());
                        let x =
                            wire::fold(wire::sum(&t, wire::pseudo6(src, topo::B6, UDP, t.len())));
                        let w = wire::be16(&s, 8) as u64;
                        let w = wire::fold(w + (!x) as u64);
                        s[8..10].copy_from_slice(&w.to_be_bytes());
                    }
                    let c = wire::csum(&s, wire::pseudo6(src, dst, UDP, s.len()));
                    s[6..8].copy_from_slice(&c.to_be_bytes());
                    s
                }
                wire::ICMPV6 => {
                    let mut s = vec![128, 0, 0, 0, 0, 1, 0, 1];
                    s.extend_from_slice(&payload);
                    let c = wire::csum(&s, wire::pseudo6(src, dst, wire::ICMPV6, s.len()));
                    s[2..4].copy_from_slice(&c.to_be_bytes());
                    s
                }
                _ => payload,
            };
            // Extension headers, innermost last.
            let mut next = upper;
            for &ext in exts.iter().rev() {
                let mut h = match ext {
                    44 => {
                        let mut h = vec![next, 0];
                        let off: u16 = if self.rng.random_bool(0.5) {
                            0
                        } else {
                            self.rng.random_range(1..100)
                        };
                        h.extend_from_slice(
                            &((off << 3) | self.rng.random_range(0..2)).to_be_bytes(),
                        );
                        // Small ids half the time, so that later fragments find first ones.
                        let id: u32 = if self.rng.random_bool(0.5) {
                            self.rng.random_range(0..4)
                        } else {
                            self.rng.random()
                        };
                        h.extend_from_slice(&id.to_be_bytes());
                        h
                    }
                    51 => {
                        let words = self.rng.random_range(0..4usize);
                        let mut h = vec![next, (words + 1) as u8, 0, 0];
                        let b = self.bytes(8 + words * 4);
                        h.extend_from_slice(&b);
                        h
                    }
                    _ => {
                        let len8 = self.rng.random_range(0..3usize);
                        let mut h = vec![next, len8 as u8];
                        // PadN covering the rest.
                        let rest = (len8 + 1) * 8 - 2;
                        h.push(1);
                        h.push((rest - 2) as u8);
                        h.extend(std::iter::repeat_n(0, rest - 2));
                        h
                    }
                };
                h.append(&mut upper_bytes);
                upper_bytes = h;
                next = ext;
            }
            let mut f = wire::eth(wire::ETH_P_IPV6);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(upper_bytes.len() as u16).to_be_bytes());
            f.push(next);
            f.push(64);
            f.extend_from_slice(&src.octets());
            f.extend_from_slice(&dst.octets());
            f.extend_from_slice(&upper_bytes);
            f
        }

        fn arp(&mut self) -> Vec<u8> {
            let mut f = wire::eth(wire::ETH_P_ARP);
            f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, self.pick(&[1u8, 2])]);
            f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&self.pick(&topo::CLIENTS).octets());
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&topo::VIP_WEB.octets());
            f
        }

        /// An IPv4 packet that would be translated untagged, behind an 802.1Q (or QinQ) tag.
        fn vlan(&mut self, m: &Model) -> Vec<u8> {
            let inner = self.client_to_frontend(m);
            let mut f = wire::eth(if self.rng.random_bool(0.8) {
                wire::ETH_P_8021Q
            } else {
                wire::ETH_P_8021AD
            });
            f.extend_from_slice(&self.rng.random::<u16>().to_be_bytes());
            if f[13] == 0xa8 {
                f.extend_from_slice(&wire::ETH_P_8021Q.to_be_bytes());
                f.extend_from_slice(&self.rng.random::<u16>().to_be_bytes());
            }
            f.extend_from_slice(&inner[12..]);
            f
        }

        fn other_ethertype(&mut self) -> Vec<u8> {
            let any = self.rng.random();
            let et = self.pick(&[0x88cc, 0x8847, 0x8864, 0x0005, 0x05dc, any]);
            let mut f = wire::eth(et);
            let n = self.rng.random_range(0..80);
            f.extend_from_slice(&self.bytes(n));
            f
        }

        /// IPv4 ethertype, then a header of random bytes (some fields steered to plausible
        /// values).
        fn random_ipv4(&mut self) -> Vec<u8> {
            let mut f = wire::eth(ETH_P_IP);
            let n = self.rng.random_range(20..90);
            f.extend_from_slice(&self.bytes(n));
            if self.rng.random_bool(0.7) {
                f[L3] = 0x40 | (f[L3] & 0xf);
            }
            if self.rng.random_bool(0.6) {
                f[L3 + 9] = self.pick(&[TCP, UDP]);
            }
            if self.rng.random_bool(0.5) {
                let (vip, port, _) = self.pick(&self.frontends.clone());
                f[L3 + 16..L3 + 20].copy_from_slice(&vip.octets());
                let ihl = (f[L3] & 0xf) as usize * 4;
                if f.len() >= L3 + ihl + 4 && ihl >= 20 {
                    f[L3 + ihl + 2..L3 + ihl + 4].copy_from_slice(&port.to_be_bytes());
                }
            }
            if self.rng.random_bool(0.5) {
                let l = (f.len() - L3) as u16;
                f[L3 + 2..L3 + 4].copy_from_slice(&l.to_be_bytes());
            }
            if self.rng.random_bool(0.5) {
                wire::fix_ip4_csum(&mut f);
            }
            f
        }

        fn garbage(&mut self) -> Vec<u8> {
            let n = self.rng.random_range(0..120);
            let mut f = self.bytes(n);
            if f.len() >= 14 && self.rng.random_bool(0.5) {
                let et = self.pick(&[ETH_P_IP, wire::ETH_P_IPV6]);
                f[12..14].copy_from_slice(&et.to_be_bytes());
            }
            f
        }

        fn mutate(&mut self, s: &mut Sample) {
            let n = self.rng.random_range(1..=3);
            for _ in 0..n {
                let f = &mut s.frame;
                let len = f.len();
                let fix = self.rng.random_bool(0.5);
                let name = match self.rng.random_range(0..16) {
                    0 | 1 => {
                        f.truncate(self.rng.random_range(0..=len));
                        "truncate"
                    }
                    2 if len > L3 => {
                        f.truncate(self.rng.random_range(L3..=len.min(80)));
                        "truncate in the headers"
                    }
                    3 => {
                        let n = self.rng.random_range(1..64);
                        let pad = if self.rng.random_bool(0.5) {
                            vec![0; n]
                        } else {
                            self.bytes(n)
                        };
                        f.extend_from_slice(&pad);
                        "pad"
                    }
                    4 if len > 0 => {
                        for _ in 0..self.rng.random_range(1..=4) {
                            let i = self.rng.random_range(0..len);
                            f[i] ^= self.rng.random_range(1..=255u8);
                        }
                        "flip bytes"
                    }
                    5 if len > 0 => {
                        for _ in 0..self.rng.random_range(1..=3) {
                            let i = self.rng.random_range(0..len.min(64));
                            f[i] ^= 1 << self.rng.random_range(0..8);
                        }
                        "flip header bits"
                    }
                    6 if len > L3 => {
                        f[L3] = (f[L3] & 0xf0) | self.rng.random_range(0..16);
                        if fix {
                            wire::fix_ip4_csum(f);
                        }
                        "random IHL"
                    }
                    7 if len > L3 => {
                        // IHL claiming up to 60 bytes of header, more than the frame holds.
                        f[L3] = (f[L3] & 0xf0) | 0xf;
                        let keep = self.rng.random_range(L3 + 20..L3 + 60);
                        f.truncate(keep);
                        "IHL beyond the frame"
                    }
                    8 if len >= L3 + 4 => {
                        let tl: u16 = match self.rng.random_range(0..3) {
                            0 => self.rng.random(),
                            1 => self.rng.random_range(0..60),
                            _ => ((len - L3) as i64 + self.rng.random_range(-12..12i64))
                                .clamp(0, 65535) as u16,
                        };
                        f[L3 + 2..L3 + 4].copy_from_slice(&tl.to_be_bytes());
                        if fix {
                            wire::fix_ip4_csum(f);
                        }
                        "random total length"
                    }
                    9 if len >= L3 + 8 => {
                        let v: u16 = match self.rng.random_range(0..3) {
                            0 => IP_MF,
                            1 => self.rng.random_range(1..0x2000),
                            _ => self.rng.random(),
                        };
                        f[L3 + 6..L3 + 8].copy_from_slice(&v.to_be_bytes());
                        if fix {
                            wire::fix_ip4_csum(f);
                        }
                        "fragment bits"
                    }
                    10 if len >= L3 + 12 => {
                        f[L3 + 10] ^= self.rng.random_range(1..=255u8);
                        "IP checksum"
                    }
                    11 if len > L3 => {
                        let ihl = (f[L3] & 0xf) as usize * 4;
                        let at = L3 + ihl + if f.get(L3 + 9) == Some(&TCP) { 16 } else { 6 };
                        if at + 2 <= len {
                            let v: u16 = if self.rng.random_bool(0.5) {
                                0
                            } else {
                                self.rng.random()
                            };
                            f[at..at + 2].copy_from_slice(&v.to_be_bytes());
                        }
                        "L4 checksum"
                    }
                    12 if len >= L3 + 10 => {
                        let any = self.rng.random();
                        f[L3 + 9] = self.pick(&[0u8, 1, 6, 17, 41, 58, 132, 255, any]);
                        if fix {
                            wire::fix_ip4_csum(f);
                        }
                        "protocol"
                    }
                    13 if len > L3 => {
                        f[L3] = (self.rng.random_range(0..16u8) << 4) | (f[L3] & 0xf);
                        "IP version"
                    }
                    14 if len >= L3 => {
                        let any = self.rng.random();
                        let et = self.pick(&[ETH_P_IP, wire::ETH_P_IPV6, wire::ETH_P_8021Q, any]);
                        f[12..14].copy_from_slice(&et.to_be_bytes());
                        "ethertype"
                    }
                    15 if len >= L3 + 20 => {
                        // Point it at another frontend or swap source and destination.
                        if self.rng.random_bool(0.5) {
                            let (vip, _, _) = self.pick(&self.frontends.clone());
                            f[L3 + 16..L3 + 20].copy_from_slice(&vip.octets());
                        } else {
                            let (a, b) = f[L3 + 12..L3 + 20].split_at_mut(4);
                            a.swap_with_slice(b);
                        }
                        if fix {
                            wire::fix_ip4_csum(f);
                        }
                        "addresses"
                    }
                    _ => continue,
                };
                s.mutations.push(name);
            }
        }
    }
}

/// A loaded datapath under a private bpffs directory, removed on drop.
struct Bed {
    ebpf: Ebpf,
    writer: Writer,
    bpffs: PathBuf,
    counters: PerCpuArray<MapData, u64>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    fragments: BpfHashMap<MapData, FragKey, FragValue>,
    interfaces: BpfHashMap<MapData, u32, IfaceConfig>,
    last: Vec<u64>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.bpffs);
    }
}

fn open_map(bpffs: &std::path::Path, name: &str) -> Map {
    Map::from_map_data(MapData::from_pin(maps::pin_path(bpffs, name)).expect(name)).expect(name)
}

fn ct_key(t: &model::Tuple, dir: u8) -> CtKey {
    CtKey {
        saddr: to_words(t.src),
        daddr: to_words(t.dst),
        sport_be: t.sport.to_be(),
        dport_be: t.dport.to_be(),
        proto: t.proto,
        family: family(t.src),
        dir,
        _pad: 0,
    }
}

impl Bed {
    fn new() -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "BPF_PROG_TEST_RUN tests need root (run them through `cargo xtask test`)"
        );
        let bpffs = PathBuf::from(format!(
            "/sys/fs/bpf/pxfuzz-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let ebpf = loader::load(&bpffs, loader::MapSizes::default()).unwrap_or_else(|e| {
            // Pins made before the failure must not outlive the test.
            let _ = loader::cleanup(&bpffs);
            panic!("load datapath (is bpffs mounted at /sys/fs/bpf?): {e:?}")
        });
        let writer = Writer::adopt(maps::Maps::open(&bpffs).unwrap()).unwrap();
        let mut bed = Self {
            ebpf,
            writer,
            counters: open_map(&bpffs, names::COUNTERS).try_into().unwrap(),
            conntrack: open_map(&bpffs, names::CONNTRACK).try_into().unwrap(),
            fragments: open_map(&bpffs, names::FRAGMENTS).try_into().unwrap(),
            interfaces: open_map(&bpffs, names::INTERFACES).try_into().unwrap(),
            bpffs,
            last: vec![],
        };
        bed.last = bed.read_counters();
        bed
    }

    /// Sets or removes interface entry 0, the node addresses hairpin flows are SNATed to.
    fn hairpin_node(&mut self, node: Option<(Ipv4Addr, Ipv6Addr)>) {
        match node {
            Some((a4, a6)) => {
                let c = IfaceConfig {
                    addr4: u32::from_ne_bytes(a4.octets()),
                    flags: 0,
                    addr6: to_words(a6.into()),
                };
                self.interfaces.insert(0, c, 0).unwrap();
            }
            None => {
                let _ = self.interfaces.remove(&0);
            }
        }
    }

    /// Programs `phase`'s Services through the Writer; returns what the maps now hold.
    fn program(&mut self, phase: usize) -> Programmed {
        let desired = DesiredState {
            services: topo::services(phase)
                .into_iter()
                .map(|s| {
                    let mut endpoints: Vec<Endpoint> = s
                        .backends
                        .iter()
                        .map(|(addr, port)| Endpoint {
                            addr: *addr,
                            port: *port,
                            state: EndpointState::Active,
                            local: false,
                        })
                        .collect();
                    endpoints.sort();
                    let fe = Frontend {
                        addr: s.vip,
                        port: s.port,
                        protocol: s.protocol,
                        scope: Default::default(),
                    };
                    let ds = DesiredService {
                        drop_without_endpoints: false,
                        service: s.service.to_string(),
                        name: format!("{}:{}", s.service, s.port),
                        kind: ServiceKind::ClusterIp,
                        endpoints,
                        affinity_timeout_s: 0,
                        source_ranges: Vec::new(),
                        // Maglev for multi always (its table rebuilt as it shrinks and grows)
                        // and for web in phase 1 (tables come and go with the algorithm).
                        algorithm: if s.service == "t/multi" || (phase == 1 && s.service == "t/web")
                        {
                            LbAlgorithm::Maglev
                        } else {
                            LbAlgorithm::Random
                        },
                    };
                    (fe, ds)
                })
                .collect(),
        };
        let report = self.writer.sync(&desired);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        // Read back through a fresh handle: the model follows the maps, not the writer's cache.
        Programmed::read(&maps::Maps::open(&self.bpffs).unwrap()).unwrap()
    }

    fn read_counters(&self) -> Vec<u64> {
        (0..COUNTER_NAMES.len() as u32)
            .map(|i| self.counters.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    /// Runs one frame: `Err(errno)` when the kernel refused it, else the verdict, the output
    /// and the counters that moved.
    fn run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>, Vec<&'static str>), i32> {
        let prog = loader::tc_program(&mut self.ebpf).unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        });
        let after = self.read_counters();
        let moved = (0..after.len())
            .filter(|i| after[*i] != self.last[*i])
            .map(|i| COUNTER_NAMES[i])
            .collect();
        self.last = after;
        match r {
            Ok(r) => {
                out.truncate(r.data_size_out as usize);
                Ok((r.return_value, out, moved))
            }
            Err(ProgramError::SyscallError(SyscallError { io_error, .. })) => {
                assert!(moved.is_empty(), "refused frame moved counters {moved:?}");
                Err(io_error.raw_os_error().unwrap_or(-1))
            }
            Err(e) => panic!("BPF_PROG_TEST_RUN: {e}"),
        }
    }

    fn ct_last_seen(&self, t: &model::Tuple) -> Option<u64> {
        self.conntrack
            .get(&ct_key(t, CT_FORWARD), 0)
            .ok()
            .map(|v| v.last_seen_ns)
    }

    fn ct_backend(&self, t: &model::Tuple) -> Option<u32> {
        self.conntrack
            .get(&ct_key(t, CT_FORWARD), 0)
            .ok()
            .map(|v| v.backend_id)
    }

    /// Compares the conntrack and fragment maps with the model's tables.
    fn compare(&self, m: &model::Model) -> Result<(), String> {
        let mut want: HashMap<CtKey, model::Ct> = HashMap::new();
        for (t, ct) in &m.fwd {
            want.insert(ct_key(t, CT_FORWARD), *ct);
        }
        for (t, ct) in &m.rev {
            want.insert(ct_key(t, CT_REVERSE), *ct);
        }
        let mut problems = Vec::new();
        let mut seen = 0;
        for item in self.conntrack.iter() {
            let (k, v) = item.map_err(|e| format!("reading {}: {e}", names::CONNTRACK))?;
            seen += 1;
            let got = model::Ct {
                nat_addr: from_words(v.nat_addr, k.family),
                nat_port: u16::from_be(v.nat_port_be),
                backend_id: v.backend_id,
                svc_id: v.svc_id,
                snat: v.flags & CT_SNAT != 0,
                orig_addr: from_words(v.orig_addr, k.family),
                orig_port: u16::from_be(v.orig_port_be),
                closing: v.flags & CT_CLOSING != 0,
            };
            match want.get(&k) {
                Some(w) if *w == got => {}
                w => problems.push(format!("conntrack {k:?}: map has {got:?}, model {w:?}")),
            }
        }
        if seen != want.len() {
            problems.push(format!(
                "conntrack holds {seen} entries, the model {}",
                want.len()
            ));
            for (k, w) in &want {
                if self.conntrack.get(k, 0).is_err() {
                    problems.push(format!("conntrack lacks {k:?} (model: {w:?})"));
                }
            }
        }
        let mut seen = 0;
        for item in self.fragments.iter() {
            let (k, v) = item.map_err(|e| format!("reading {}: {e}", names::FRAGMENTS))?;
            seen += 1;
            let id = (
                from_words(k.saddr, k.family),
                from_words(k.daddr, k.family),
                if k.family == proxy_common::AF_INET {
                    u16::from_be(k.id_be as u16) as u32
                } else {
                    u32::from_be(k.id_be)
                },
                k.proto,
            );
            let got = (u16::from_be(v.sport_be), u16::from_be(v.dport_be));
            if m.frags.get(&id) != Some(&got) {
                problems.push(format!(
                    "fragment {id:?}: map has {got:?}, model {:?}",
                    m.frags.get(&id)
                ));
            }
        }
        if seen != m.frags.len() {
            problems.push(format!(
                "fragment map holds {seen} entries, the model {}",
                m.frags.len()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            problems.truncate(10);
            Err(problems.join("\n"))
        }
    }

    /// Empties the conntrack and fragment maps.
    fn flush(&mut self) {
        let keys: Vec<CtKey> = self.conntrack.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.conntrack.remove(&k);
        }
        let keys: Vec<FragKey> = self.fragments.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.fragments.remove(&k);
        }
    }
}

/// Frames BPF_PROG_TEST_RUN itself refuses with EINVAL (checked on this kernel: shorter than an
/// Ethernet header, IPv4 shorter than 14+20 bytes, IPv6 shorter than 14+40).
fn kernel_refuses(f: &[u8]) -> bool {
    f.len() < 14
        || match wire::be16(f, 12) {
            wire::ETH_P_IP => f.len() < 14 + 20,
            wire::ETH_P_IPV6 => f.len() < 14 + 40,
            _ => false,
        }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

#[derive(Default)]
struct Stats {
    kinds: BTreeMap<&'static str, u64>,
    mutated: u64,
    refused: u64,
    verdicts: BTreeMap<String, u64>,
    syncs: u64,
    flushes: u64,
    failures: u64,
    /// Failures by their first line, with the kind of frame.
    failure_kinds: BTreeMap<String, u64>,
}

#[test]
fn fuzz_tc_ingress() {
    let packets = env_u64("FUZZ_PACKETS").unwrap_or(20_000);
    let seed = env_u64("FUZZ_SEED").unwrap_or_else(rand::random);
    println!("fuzz_datapath: FUZZ_SEED={seed} FUZZ_PACKETS={packets}");
    let started = Instant::now();
    let mut bed = Bed::new();
    let mut model = model::Model::default();
    let mut phase = 0;
    let enter_phase = |bed: &mut Bed, model: &mut model::Model, phase: usize| {
        // Phase 0 has a node address for hairpin SNAT, phase 1 none (hairpin flows are then
        // plain DNAT).
        let node = (phase == 0).then_some((topo::NODE, topo::NODE6));
        bed.hairpin_node(node);
        model.node4 = node.map(|n| n.0);
        model.node6 = node.map(|n| n.1);
        model.load(&bed.program(phase));
    };
    enter_phase(&mut bed, &mut model, phase);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut generator = generate::Gen::new(StdRng::seed_from_u64(rng.random()));
    let mut st = Stats::default();
    let phase_len = (packets / 20).clamp(2_000, 50_000);
    let fail = |st: &mut Stats, i: u64, what: String| {
        st.failures += 1;
        let mut lines = what.lines();
        let first = lines.next().unwrap_or("").to_string();
        let kind = lines
            .find_map(|l| l.trim().strip_prefix("kind: "))
            // Without the mutation list.
            .map(|k| format!(" [{}]", k.rsplit_once(" [").map_or(k, |(k, _)| k)))
            .unwrap_or_default();
        *st.failure_kinds
            .entry(format!("{first}{kind}"))
            .or_default() += 1;
        if st.failures as usize <= PRINT_FAILURES {
            eprintln!("FAILURE at frame {i} (FUZZ_SEED={seed}):\n{what}\n");
        }
    };

    for i in 0..packets {
        if i > 0 && i % phase_len == 0 {
            phase = 1 - phase;
            enter_phase(&mut bed, &mut model, phase);
            st.syncs += 1;
        }
        if model.fwd.len() + model.rev.len() > CT_FLUSH_AT || model.frags.len() > FRAG_FLUSH_AT {
            if let Err(e) = bed.compare(&model) {
                fail(&mut st, i, format!("maps differ from the model:\n{e}"));
            }
            bed.flush();
            model.clear_state();
            st.flushes += 1;
        }
        let s = generator.next(&model);
        *st.kinds.entry(s.kind).or_default() += 1;
        st.mutated += !s.mutations.is_empty() as u64;
        let describe = |e: &dyn std::fmt::Debug| {
            format!(
                "  kind: {} {:?}\n  frame ({} bytes): {}\n  expected: {e:?}",
                s.kind,
                s.mutations,
                s.frame.len(),
                wire::hex(&s.frame)
            )
        };
        // An established packet's forward entry: whether the run refreshes its last_seen.
        let e = model.expect(&s.frame);
        let last_seen = |bed: &Bed| match &e.verdict {
            model::Verdict::Dnat { flow, .. } => bed.ct_last_seen(&flow.tuple),
            _ => None,
        };
        let seen_before = last_seen(&bed);
        let (rc, out, moved) = match bed.run(&s.frame) {
            Ok(r) => r,
            Err(errno) if errno == libc::EINVAL && kernel_refuses(&s.frame) => {
                st.refused += 1;
                continue;
            }
            Err(errno) => {
                fail(
                    &mut st,
                    i,
                    format!(
                        "BPF_PROG_TEST_RUN refused a frame it should take (errno {errno})\n{}",
                        describe(&"a run")
                    ),
                );
                continue;
            }
        };
        let refreshed = seen_before.is_some() && last_seen(&bed) != seen_before;
        let checked = check::check(
            &s.frame,
            &e,
            (rc, &out, &moved),
            |t| bed.ct_backend(t),
            |t| model.rev.contains_key(t),
        );
        let report = |msg: &str| {
            format!(
                "{msg}\n{}\n  actual: verdict {rc}, counters {moved:?}\n  output: {}\n  differing offsets: {:?}",
                describe(&e.verdict),
                wire::hex(&out),
                check::diff_offsets(&s.frame, &out)
            )
        };
        match checked {
            Ok(o) => {
                if let Some(p) = &o.problem {
                    fail(&mut st, i, report(p));
                }
                *st.verdicts.entry(o.class).or_default() += 1;
                model.commit(&e, o.chosen, refreshed);
            }
            Err(msg) => {
                fail(&mut st, i, report(&msg));
                // The datapath's state may now differ from the model's: start both over from
                // empty tables rather than report the same flow again.
                bed.flush();
                model.clear_state();
            }
        }
    }
    if let Err(e) = bed.compare(&model) {
        fail(
            &mut st,
            packets,
            format!("maps differ from the model at the end:\n{e}"),
        );
    }

    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzz_datapath: {packets} frames in {secs:.1} s ({:.0}/s), seed {seed}; {} Service syncs, {} conntrack flushes",
        packets as f64 / secs,
        st.syncs,
        st.flushes
    );
    println!("  generated:");
    for (k, n) in &st.kinds {
        println!("    {n:>9}  {k}");
    }
    println!("    {:>9}  (of which mutated)", st.mutated);
    println!("  verdicts:");
    println!("    {:>9}  kernel refused the input (EINVAL)", st.refused);
    for (k, n) in &st.verdicts {
        println!("    {n:>9}  {k}");
    }
    println!("  failures: {}", st.failures);
    for (k, n) in &st.failure_kinds {
        println!("    {n:>9}  {k}");
    }
    assert_eq!(
        st.failures, 0,
        "{} frames broke the model (first {PRINT_FAILURES} printed above); reproduce with FUZZ_SEED={seed} FUZZ_PACKETS={packets}",
        st.failures
    );
}

//! The tc program packet by packet through BPF_PROG_TEST_RUN, with maps programmed by the real
//! writer. Needs root and a mounted bpffs; fails (never skips) when it cannot run.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use aya::{Ebpf, TestRun, TestRunOptions};
use proxy_agent::{
    datapath::{loader, maps, writer::Writer},
    model::{
        DesiredService, DesiredState, Endpoint, EndpointState, Frontend, LbAlgorithm, Protocol,
    },
};
use proxy_common::ServiceKind;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 50);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 11);
const B1: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const B2: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 12);

/// Packet construction and checking, written independently of the datapath.
mod pkt {
    use std::net::Ipv4Addr;

    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMP: u8 = 1;

    pub fn csum(data: &[u8], mut sum: u32) -> u16 {
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            sum += w as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
        let mut p = Vec::new();
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum()
    }

    /// L4 segment (header + payload) with a valid checksum.
    pub fn l4(
        proto: u8,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&sport.to_be_bytes());
        s.extend_from_slice(&dport.to_be_bytes());
        let csum_at = match proto {
            TCP => {
                s.extend_from_slice(&1u32.to_be_bytes()); // seq
                s.extend_from_slice(&0u32.to_be_bytes()); // ack
                s.extend_from_slice(&[0x50, 0x02]); // data offset 5, SYN
                s.extend_from_slice(&64240u16.to_be_bytes());
                s.extend_from_slice(&[0, 0, 0, 0]); // csum, urg
                16
            }
            _ => {
                s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                s.extend_from_slice(&[0, 0]);
                6
            }
        };
        s.extend_from_slice(payload);
        let c = csum(&s, pseudo(src, dst, proto, s.len()));
        let c = if proto == UDP && c == 0 { 0xffff } else { c };
        s[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        s
    }

    pub struct Ip {
        pub src: Ipv4Addr,
        pub dst: Ipv4Addr,
        pub proto: u8,
        pub options: Vec<u8>,
        pub id: u16,
        pub frag: u16,
    }

    impl Ip {
        pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
            Self {
                src,
                dst,
                proto,
                options: vec![],
                id: 0x1234,
                frag: 0x4000,
            }
        }
        /// Ethernet + IPv4 (valid header checksum) + `payload`.
        pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
            let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
            let ihl = 20 + self.options.len();
            assert_eq!(ihl % 4, 0);
            let mut h = vec![0x40 | (ihl / 4) as u8, 0];
            h.extend_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
            h.extend_from_slice(&self.id.to_be_bytes());
            h.extend_from_slice(&self.frag.to_be_bytes());
            h.extend_from_slice(&[64, self.proto, 0, 0]);
            h.extend_from_slice(&self.src.octets());
            h.extend_from_slice(&self.dst.octets());
            h.extend_from_slice(&self.options);
            let c = csum(&h, 0);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&h);
            f.extend_from_slice(payload);
            f
        }
    }

    /// A parsed frame: addresses, ports, and whether both checksums hold.
    #[derive(Debug)]
    pub struct Seen {
        pub src: Ipv4Addr,
        pub dst: Ipv4Addr,
        pub sport: u16,
        pub dport: u16,
        pub ip_csum_ok: bool,
        pub l4_csum_ok: bool,
        pub l4_csum: u16,
        pub options: Vec<u8>,
        pub payload: Vec<u8>,
    }

    /// Source, destination and header checksum validity of a frame (fragments have no L4 view).
    pub fn parse_ip_only(f: &[u8]) -> (Ipv4Addr, Ipv4Addr, bool) {
        let ip = &f[14..];
        let ihl = ((ip[0] & 0xf) * 4) as usize;
        (
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            csum(&ip[..ihl], 0) == 0,
        )
    }

    pub fn parse(f: &[u8]) -> Seen {
        let ip = &f[14..];
        let ihl = ((ip[0] & 0xf) * 4) as usize;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let l4 = &ip[ihl..total];
        let proto = ip[9];
        let l4_csum = match proto {
            TCP => u16::from_be_bytes([l4[16], l4[17]]),
            _ => u16::from_be_bytes([l4[6], l4[7]]),
        };
        Seen {
            src,
            dst,
            sport: u16::from_be_bytes([l4[0], l4[1]]),
            dport: u16::from_be_bytes([l4[2], l4[3]]),
            ip_csum_ok: csum(&ip[..ihl], 0) == 0,
            l4_csum_ok: csum(l4, pseudo(src, dst, proto, l4.len())) == 0,
            l4_csum,
            options: ip[20..ihl].to_vec(),
            payload: l4.to_vec(),
        }
    }
}

/// A loaded datapath under a private bpffs directory, removed on drop.
struct Bed {
    ebpf: Ebpf,
    writer: Writer,
    bpffs: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.bpffs);
    }
}

fn fe(addr: Ipv4Addr, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: IpAddr::V4(addr),
        port,
        protocol,
        scope: Default::default(),
    }
}

fn ep(addr: Ipv4Addr, port: u16) -> Endpoint {
    Endpoint {
        addr: IpAddr::V4(addr),
        port,
        state: EndpointState::Active,
        local: false,
    }
}

fn desired(services: &[(Frontend, Vec<Endpoint>)]) -> DesiredState {
    DesiredState {
        services: services
            .iter()
            .map(|(f, eps)| {
                (
                    *f,
                    DesiredService {
                        drop_without_endpoints: false,
                        service: format!("test/svc-{}-{}", f.addr, f.port),
                        name: format!("test/{}", f.port),
                        kind: ServiceKind::ClusterIp,
                        endpoints: eps.clone(),
                        affinity_timeout_s: 0,
                        source_ranges: Vec::new(),
                        algorithm: Default::default(),
                    },
                )
            })
            .collect(),
    }
}

fn bed() -> Bed {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "BPF_PROG_TEST_RUN tests need root (run them through `cargo xtask test`)"
    );
    let bpffs = PathBuf::from(format!(
        "/sys/fs/bpf/pxtr-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let ebpf = loader::load(&bpffs, loader::MapSizes::default()).unwrap_or_else(|e| {
        // Pins made before the failure must not outlive the test.
        let _ = loader::cleanup(&bpffs);
        panic!("load datapath (is bpffs mounted at /sys/fs/bpf?): {e:?}")
    });
    let mut writer = Writer::adopt(maps::Maps::open(&bpffs).unwrap()).unwrap();
    let report = writer.sync(&desired(&[
        (fe(VIP, 80, Protocol::Tcp), vec![ep(B1, 8080), ep(B2, 8080)]),
        (fe(VIP, 53, Protocol::Udp), vec![ep(B1, 5353), ep(B2, 5353)]),
        (fe(EMPTY_VIP, 80, Protocol::Tcp), vec![]),
    ]));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    Bed {
        ebpf,
        writer,
        bpffs,
    }
}

/// A bed whose one frontend has sessionAffinity ClientIP over four backends.
fn sticky_bed() -> Bed {
    let mut b = bed();
    let mut d = desired(&[(
        fe(STICKY_VIP, 80, Protocol::Tcp),
        (2..6)
            .map(|i| ep(Ipv4Addr::new(198, 19, 3, i), 8080))
            .collect(),
    )]);
    d.services
        .values_mut()
        .for_each(|s| s.affinity_timeout_s = 30);
    let report = b.writer.sync(&d);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    b
}

impl Bed {
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = loader::tc_program(&mut self.ebpf).unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        maps::read_counters(&self.bpffs)
            .unwrap()
            .into_iter()
            .collect()
    }

    /// Runs `frame` and returns the verdict, the output and which counters moved.
    fn run_counted(&mut self, frame: &[u8]) -> (u32, Vec<u8>, Vec<&'static str>) {
        let before = self.counters();
        let (rc, out) = self.run(frame);
        let after = self.counters();
        let moved = after
            .iter()
            .filter(|(k, v)| before[*k] != **v)
            .map(|(k, _)| *k)
            .collect();
        (rc, out, moved)
    }
}

fn tcp_syn(sport: u16) -> Vec<u8> {
    pkt::Ip::new(CLIENT, VIP, pkt::TCP).frame(&pkt::l4(pkt::TCP, CLIENT, VIP, sport, 80, b""))
}

#[test]
fn hit_translates_and_established_flows_keep_their_backend() {
    let mut b = bed();
    let (rc, out, moved) = b.run_counted(&tcp_syn(40000));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(moved, ["translated_new"]);
    let s = pkt::parse(&out);
    assert!(s.dst == B1 || s.dst == B2, "{s:?}");
    assert_eq!((s.src, s.sport, s.dport), (CLIENT, 40000, 8080));
    assert!(s.ip_csum_ok && s.l4_csum_ok, "{s:?}");
    for _ in 0..20 {
        let (rc, out, moved) = b.run_counted(&tcp_syn(40000));
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(moved, ["translated_established"]);
        assert_eq!(pkt::parse(&out).dst, s.dst, "established flow moved");
    }
    // Many flows: both backends are used.
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41064 {
        seen.insert(pkt::parse(&b.run(&tcp_syn(port)).1).dst);
    }
    assert_eq!(seen.len(), 2, "random choice must reach both backends");
}

#[test]
fn reply_is_reverse_translated_to_the_vip() {
    let mut b = bed();
    let out = b.run(&tcp_syn(40001)).1;
    let backend = pkt::parse(&out).dst;
    let reply = pkt::Ip::new(backend, CLIENT, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        backend,
        CLIENT,
        8080,
        40001,
        b"hello",
    ));
    let (rc, out, moved) = b.run_counted(&reply);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(moved, ["reverse_translated"]);
    let s = pkt::parse(&out);
    assert_eq!((s.src, s.sport, s.dst, s.dport), (VIP, 80, CLIENT, 40001));
    assert!(s.ip_csum_ok && s.l4_csum_ok, "{s:?}");
    // A reply to a flow never seen is not ours.
    let stray = pkt::Ip::new(backend, CLIENT, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        backend,
        CLIENT,
        8080,
        49999,
        b"",
    ));
    let (rc, out, moved) = b.run_counted(&stray);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["passed_no_match"]));
    assert_eq!(out, stray);
}

#[test]
fn misses_and_foreign_packets_pass_untouched() {
    let mut b = bed();
    let other = Ipv4Addr::new(198, 18, 100, 99);
    let arp = {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(&[0u8; 28]);
        f
    };
    let icmp = pkt::Ip::new(CLIENT, VIP, pkt::ICMP).frame(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    let wrong_port =
        pkt::Ip::new(CLIENT, VIP, pkt::TCP).frame(&pkt::l4(pkt::TCP, CLIENT, VIP, 40000, 81, b""));
    let ipv6 = {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 17, 64]);
        f.extend_from_slice(&[0u8; 32]);
        f
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unknown VIP",
            pkt::Ip::new(CLIENT, other, pkt::TCP).frame(&pkt::l4(
                pkt::TCP,
                CLIENT,
                other,
                40000,
                80,
                b"",
            )),
            "passed_no_match",
        ),
        (
            "VIP on a port it does not serve",
            wrong_port,
            "passed_no_match",
        ),
        ("ARP", arp, "passed_not_ip"),
        ("ICMP echo to the VIP", icmp, "passed_other_protocol"),
        (
            "IPv6 header without its UDP header",
            ipv6,
            "passed_malformed",
        ),
    ];
    for (what, frame, counter) in cases {
        let (rc, out, moved) = b.run_counted(&frame);
        assert_eq!(rc, TC_ACT_OK, "{what}");
        assert_eq!(out, frame, "{what}: must be untouched");
        assert_eq!(moved, [counter], "{what}");
    }
}

#[test]
fn truncated_and_malformed_headers_pass_untouched() {
    let mut b = bed();
    let full = tcp_syn(40002);
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    let mut short_ihl = full.clone();
    short_ihl[14] = 0x44;
    // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than an IP header, so a cut IP
    // header is made by an IHL that claims more than the frame holds.
    let mut long_ihl = full[..34].to_vec();
    long_ihl[14] = 0x4f;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("IHL beyond the end of the frame", long_ihl),
        ("IP header, no TCP header", full[..34].to_vec()),
        (
            "TCP header cut before its checksum",
            full[..34 + 12].to_vec(),
        ),
        ("IP version 6 in an IPv4 frame", bad_version),
        ("IHL below 5", short_ihl),
    ];
    for (what, frame) in cases {
        let (rc, out, moved) = b.run_counted(&frame);
        assert_eq!(rc, TC_ACT_OK, "{what}");
        assert_eq!(out, frame, "{what}: must be untouched");
        assert_eq!(moved, ["passed_malformed"], "{what}");
    }
}

#[test]
fn ip_options_are_skipped_and_kept() {
    let mut b = bed();
    let mut ip = pkt::Ip::new(CLIENT, VIP, pkt::TCP);
    ip.options = vec![0x94, 0x04, 0, 0, 0x01, 0x01, 0x01, 0x00]; // router alert, NOPs, EOL
    let frame = ip.frame(&pkt::l4(pkt::TCP, CLIENT, VIP, 40003, 80, b"x"));
    let (rc, out, moved) = b.run_counted(&frame);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_new"]));
    let s = pkt::parse(&out);
    assert!(s.dst == B1 || s.dst == B2);
    assert_eq!(s.dport, 8080);
    assert_eq!(s.options, ip.options);
    assert!(s.ip_csum_ok && s.l4_csum_ok, "{s:?}");
}

#[test]
fn udp_fragments_follow_their_first_fragment() {
    let mut b = bed();
    // One UDP datagram of 8 + 40 bytes split at 24 bytes of IP payload.
    let payload: Vec<u8> = (0..40u8).collect();
    let dgram = pkt::l4(pkt::UDP, CLIENT, VIP, 40004, 53, &payload);
    let mut first = pkt::Ip::new(CLIENT, VIP, pkt::UDP);
    first.id = 0x4242;
    first.frag = 0x2000; // MF, offset 0
    let mut second = pkt::Ip::new(CLIENT, VIP, pkt::UDP);
    second.id = 0x4242;
    second.frag = 24 / 8; // offset 24 bytes, last
    let (rc, out1, moved) = b.run_counted(&first.frame(&dgram[..24]));
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_new"]));
    let (rc, out2, moved) = b.run_counted(&second.frame(&dgram[24..]));
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_established"]));
    let (s1, s2) = (pkt::parse_ip_only(&out1), pkt::parse_ip_only(&out2));
    assert!(s1.1 == B1 || s1.1 == B2);
    assert_eq!(s1.1, s2.1, "both fragments must go to the same backend");
    assert!(s1.2 && s2.2, "IP header checksums");
    // Reassembled, the datagram carries the new port and a valid checksum for the new address.
    let mut whole = out1[34..].to_vec();
    whole.extend_from_slice(&out2[34..]);
    let s = pkt::parse(&pkt::Ip::new(CLIENT, s1.1, pkt::UDP).frame(&whole));
    assert_eq!(s.dport, 5353);
    assert!(s.l4_csum_ok, "reassembled checksum");
    assert_eq!(&s.payload[8..], &payload[..]);

    // A later fragment whose first fragment was never seen: passed as is and counted.
    let mut orphan = pkt::Ip::new(CLIENT, VIP, pkt::UDP);
    orphan.id = 0x7777;
    orphan.frag = 3;
    let frame = orphan.frame(&[0u8; 16]);
    let (rc, out, moved) = b.run_counted(&frame);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["passed_fragment_unknown"]));
    assert_eq!(out, frame);
}

#[test]
fn udp_without_checksum_stays_without_one() {
    let mut b = bed();
    let mut seg = pkt::l4(pkt::UDP, CLIENT, VIP, 40005, 53, b"q");
    seg[6] = 0;
    seg[7] = 0;
    let (rc, out, _) = b.run_counted(&pkt::Ip::new(CLIENT, VIP, pkt::UDP).frame(&seg));
    assert_eq!(rc, TC_ACT_OK);
    let s = pkt::parse(&out);
    assert_eq!((s.dport, s.l4_csum), (5353, 0));
    assert!(s.ip_csum_ok);
}

const TC_ACT_REDIRECT: u32 = 7;

/// Checks an ICMP port unreachable built from `orig` (IPv4): Ethernet addresses swapped, from
/// the dialled frontend to the client, valid checksums, the offending header quoted.
fn assert_port_unreachable4(orig: &[u8], out: &[u8]) {
    assert_eq!(out.len(), 14 + 20 + 8 + 28, "{out:02x?}");
    assert_eq!((&out[..6], &out[6..12]), (&orig[6..12], &orig[..6]));
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    let (src, dst, ip_ok) = pkt::parse_ip_only(out);
    let (osrc, odst, _) = pkt::parse_ip_only(orig);
    assert_eq!((src, dst, ip_ok), (odst, osrc, true));
    assert_eq!(out[14 + 9], pkt::ICMP);
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 3), "destination / port unreachable");
    assert_eq!(pkt::csum(icmp, 0), 0, "ICMP checksum");
    assert_eq!(&icmp[8..], &orig[14..42], "quoted header");
}

#[test]
fn service_without_endpoints_rejects_with_icmp_port_unreachable() {
    let mut b = bed();
    let mut d = desired(&[
        (fe(VIP, 80, Protocol::Tcp), vec![ep(B1, 8080), ep(B2, 8080)]),
        (fe(EMPTY_VIP, 80, Protocol::Tcp), vec![]),
        (fe(EMPTY_VIP, 53, Protocol::Udp), vec![]),
        (fe(EMPTY_VIP, 81, Protocol::Tcp), vec![]),
    ]);
    // Port 81: a Local policy whose endpoints are all on other nodes.
    d.services
        .get_mut(&fe(EMPTY_VIP, 81, Protocol::Tcp))
        .unwrap()
        .drop_without_endpoints = true;
    let report = b.writer.sync(&d);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    for (proto, port) in [(pkt::TCP, 80), (pkt::UDP, 53)] {
        let frame = pkt::Ip::new(CLIENT, EMPTY_VIP, proto).frame(&pkt::l4(
            proto,
            CLIENT,
            EMPTY_VIP,
            40006,
            port,
            b"some payload beyond the quoted part",
        ));
        let (rc, out, moved) = b.run_counted(&frame);
        assert_eq!(
            (rc, moved),
            (TC_ACT_REDIRECT, vec!["rejected_no_backend"]),
            "proto {proto}"
        );
        assert_port_unreachable4(&frame, &out);
    }
    // A short SYN (the reply is longer than the packet).
    let syn = pkt::Ip::new(CLIENT, EMPTY_VIP, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        CLIENT,
        EMPTY_VIP,
        40007,
        80,
        b"",
    ));
    let (rc, out, _) = b.run_counted(&syn);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_port_unreachable4(&syn, &out);
    // IPv4 options: no reject is built (the quote would miss the ports): dropped, counted.
    let mut ip = pkt::Ip::new(CLIENT, EMPTY_VIP, pkt::TCP);
    ip.options = vec![1, 1, 1, 0];
    let opt = ip.frame(&pkt::l4(pkt::TCP, CLIENT, EMPTY_VIP, 40008, 80, b""));
    let (rc, _, moved) = b.run_counted(&opt);
    assert_eq!((rc, moved), (TC_ACT_SHOT, vec!["dropped_no_backend"]));
    // kube-proxy drops (no reject) when a Local policy finds no local endpoint.
    let local = pkt::Ip::new(CLIENT, EMPTY_VIP, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        CLIENT,
        EMPTY_VIP,
        40009,
        81,
        b"",
    ));
    let (rc, _, moved) = b.run_counted(&local);
    assert_eq!((rc, moved), (TC_ACT_SHOT, vec!["dropped_no_local_backend"]));
}

#[test]
fn ipv6_service_without_endpoints_rejects_with_icmpv6_port_unreachable() {
    use std::net::Ipv6Addr;
    let mut b = bed();
    let vip6: Ipv6Addr = "fd00:18:100::12".parse().unwrap();
    let client: Ipv6Addr = "fd00:19:1::50".parse().unwrap();
    let f = Frontend {
        addr: IpAddr::V6(vip6),
        port: 53,
        protocol: Protocol::Udp,
        scope: Default::default(),
    };
    let report = b.writer.sync(&desired(&[(f, vec![])]));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let q = pkt6::udp(client, vip6, 40010, 53, false);
    let (rc, out, moved) = b.run_counted(&q);
    assert_eq!((rc, moved), (TC_ACT_REDIRECT, vec!["rejected_no_backend"]));
    assert_eq!(out.len(), 14 + 40 + 8 + 48, "{out:02x?}");
    assert_eq!((&out[..6], &out[6..12]), (&q[6..12], &q[..6]));
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    let ip = &out[14..54];
    assert_eq!((ip[0] >> 4, ip[6]), (6, 58), "IPv6, next header ICMPv6");
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 56);
    assert_eq!(&ip[8..24], &vip6.octets(), "from the frontend");
    assert_eq!(&ip[24..40], &client.octets(), "to the client");
    let icmp = &out[54..];
    assert_eq!((icmp[0], icmp[1]), (1, 4), "destination / port unreachable");
    let mut pseudo: u32 = ip[8..40]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    pseudo += 56 + 58;
    assert_eq!(pkt::csum(icmp, pseudo), 0, "ICMPv6 checksum");
    assert_eq!(&icmp[8..], &q[14..62], "quoted header");
    // Extension headers: not quoted (the ports would be missing): dropped, counted.
    let q = pkt6::udp(client, vip6, 40011, 53, true);
    let (rc, _, moved) = b.run_counted(&q);
    assert_eq!((rc, moved), (TC_ACT_SHOT, vec!["dropped_no_backend"]));
}

#[test]
fn removed_backend_flows_pick_a_surviving_one() {
    let mut b = bed();
    // Find a flow on B2, then remove B2.
    let port = (42000..42100)
        .find(|p| pkt::parse(&b.run(&tcp_syn(*p)).1).dst == B2)
        .expect("some flow lands on B2");
    let report = b.writer.sync(&desired(&[
        (fe(VIP, 80, Protocol::Tcp), vec![ep(B1, 8080)]),
        (fe(VIP, 53, Protocol::Udp), vec![ep(B1, 5353), ep(B2, 5353)]),
        (fe(EMPTY_VIP, 80, Protocol::Tcp), vec![]),
    ]));
    assert!(report.failed.is_empty());
    let (rc, out, moved) = b.run_counted(&tcp_syn(port));
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["reselected"]));
    assert_eq!(pkt::parse(&out).dst, B1);
    for p in 43000..43050 {
        assert_eq!(
            pkt::parse(&b.run(&tcp_syn(p)).1).dst,
            B1,
            "new flow reached a removed backend"
        );
    }
}

/// Issue 16 bug 3, tc path: backend ids are per frontend, so an endpoint leaving one UDP
/// Service while it still backs another ends only that Service's flows to it (their next
/// datagram chooses again, as after kube-proxy's per-Service conntrack flush); the other
/// Service's flow to the same address:port carries on, and the sync reports the pair.
#[test]
fn a_shared_udp_endpoint_removed_from_one_service_moves_only_its_flows() {
    let mut b = bed();
    let vip_b = Ipv4Addr::new(198, 18, 100, 13);
    let udp = |vip: Ipv4Addr, sport: u16| {
        pkt::Ip::new(CLIENT, vip, pkt::UDP).frame(&pkt::l4(pkt::UDP, CLIENT, vip, sport, 53, b"q"))
    };
    let both = |a: Vec<Endpoint>| {
        desired(&[
            (fe(VIP, 53, Protocol::Udp), a),
            (fe(vip_b, 53, Protocol::Udp), vec![ep(B1, 5353)]),
        ])
    };
    let r = b.writer.sync(&both(vec![ep(B1, 5353), ep(B2, 5353)]));
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    let sport_a = (44000..44100)
        .find(|p| pkt::parse(&b.run(&udp(VIP, *p)).1).dst == B1)
        .expect("some flow of A lands on B1");
    let sport_b = 45000;
    assert_eq!(pkt::parse(&b.run(&udp(vip_b, sport_b)).1).dst, B1);

    let r = b.writer.sync(&both(vec![ep(B2, 5353)]));
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    let ap = |a: Ipv4Addr, p: u16| (IpAddr::V4(a), p);
    assert_eq!(
        r.stale_udp.pairs,
        [(ap(VIP, 53), ap(B1, 5353))].into_iter().collect(),
        "{:?}",
        r.stale_udp
    );
    assert!(r.stale_udp.backends.is_empty(), "B1 still backs B");
    let (rc, out, moved) = b.run_counted(&udp(VIP, sport_a));
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["reselected"]));
    assert_eq!(pkt::parse(&out).dst, B2);
    let (rc, out, moved) = b.run_counted(&udp(vip_b, sport_b));
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_established"]));
    assert_eq!(pkt::parse(&out).dst, B1);
}

/// `tcp_syn` with only ACK set (a packet of an established connection), checksum kept valid
/// (RFC 1624 incremental update of the word holding the flags).
fn tcp_ack(sport: u16) -> Vec<u8> {
    as_ack(tcp_syn(sport))
}

/// A TCP SYN frame turned into a bare ACK.
fn as_ack(f: Vec<u8>) -> Vec<u8> {
    with_tcp_flags(f, 0x10)
}

/// A TCP frame (IPv4 without options) with other flags, checksum kept valid.
fn with_tcp_flags(mut f: Vec<u8>, flags: u8) -> Vec<u8> {
    let l4 = 14 + 20;
    let old = u16::from_be_bytes([f[l4 + 12], f[l4 + 13]]);
    f[l4 + 13] = flags;
    let new = u16::from_be_bytes([f[l4 + 12], f[l4 + 13]]);
    let c = u16::from_be_bytes([f[l4 + 16], f[l4 + 17]]);
    let mut sum = (!c as u32) + (!old as u32) + new as u32;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[l4 + 16..l4 + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f
}

#[test]
fn established_tcp_connections_to_a_removed_backend_drain() {
    let mut b = bed();
    let port = (44000..44100)
        .find(|p| pkt::parse(&b.run(&tcp_syn(*p)).1).dst == B2)
        .expect("some flow lands on B2");
    let report = b.writer.sync(&desired(&[
        (fe(VIP, 80, Protocol::Tcp), vec![ep(B1, 8080)]),
        (fe(VIP, 53, Protocol::Udp), vec![ep(B1, 5353), ep(B2, 5353)]),
        (fe(EMPTY_VIP, 80, Protocol::Tcp), vec![]),
    ]));
    assert!(report.failed.is_empty());
    // The established connection keeps its backend, with valid checksums, and is counted.
    for _ in 0..3 {
        let (rc, out, moved) = b.run_counted(&tcp_ack(port));
        assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_draining"]));
        let s = pkt::parse(&out);
        assert_eq!((s.dst, s.dport), (B2, 8080));
        assert!(s.ip_csum_ok && s.l4_csum_ok, "{s:?}");
    }
    // Its replies are still translated back.
    let reply =
        pkt::Ip::new(B2, CLIENT, pkt::TCP).frame(&pkt::l4(pkt::TCP, B2, CLIENT, 8080, port, b""));
    let (rc, out, moved) = b.run_counted(&reply);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["reverse_translated"]));
    assert_eq!(pkt::parse(&out).src, VIP);
    // A new connection reusing the tuple (a SYN) chooses a backend that exists.
    let (rc, out, moved) = b.run_counted(&tcp_syn(port));
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["reselected"]));
    assert_eq!(pkt::parse(&out).dst, B1);
    // From then on the tuple belongs to the new connection.
    let (_, out, moved) = b.run_counted(&tcp_ack(port));
    assert_eq!(moved, ["translated_established"]);
    assert_eq!(pkt::parse(&out).dst, B1);
}

#[test]
fn established_connections_outlive_the_last_endpoint_and_new_ones_are_rejected() {
    let mut b = bed();
    let port = 44200;
    let first = pkt::parse(&b.run(&tcp_syn(port)).1).dst;
    // The Service loses every endpoint (the last ones terminated).
    let report = b.writer.sync(&desired(&[
        (fe(VIP, 80, Protocol::Tcp), vec![]),
        (fe(EMPTY_VIP, 80, Protocol::Tcp), vec![]),
    ]));
    assert!(report.failed.is_empty());
    let (rc, out, moved) = b.run_counted(&tcp_ack(port));
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_draining"]));
    assert_eq!(pkt::parse(&out).dst, first);
    // A new connection is rejected.
    let (rc, _, moved) = b.run_counted(&tcp_syn(port + 1));
    assert_eq!((rc, moved), (TC_ACT_REDIRECT, vec!["rejected_no_backend"]));
}

#[test]
fn source_ranges_are_checked_when_a_flow_is_admitted() {
    let mut b = bed();
    let lb = Ipv4Addr::new(198, 18, 200, 7);
    let with_ranges = |prefix: Ipv4Addr| {
        let mut d = desired(&[(fe(lb, 80, Protocol::Tcp), vec![ep(B1, 8080)])]);
        for s in d.services.values_mut() {
            s.kind = ServiceKind::LoadBalancer;
            s.source_ranges = vec![(IpAddr::V4(prefix), 24)];
        }
        d
    };
    let syn = |sport| {
        pkt::Ip::new(CLIENT, lb, pkt::TCP).frame(&pkt::l4(pkt::TCP, CLIENT, lb, sport, 80, b""))
    };
    let report = b.writer.sync(&with_ranges(Ipv4Addr::new(198, 19, 1, 0)));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let (_, _, moved) = b.run_counted(&syn(44300));
    assert_eq!(moved, ["translated_new"]);
    // The client's range is taken out: its admitted connection carries on, a new one is not
    // admitted.
    let report = b.writer.sync(&with_ranges(Ipv4Addr::new(198, 19, 9, 0)));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let (rc, out, moved) = b.run_counted(&as_ack(syn(44300)));
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_established"]));
    assert_eq!(pkt::parse(&out).dst, B1);
    let (rc, _, moved) = b.run_counted(&syn(44301));
    assert_eq!((rc, moved), (TC_ACT_SHOT, vec!["dropped_source_range"]));
}

/// The conntrack map, opened from its pin, to evict entries as LRU pressure would.
fn conntrack(
    b: &Bed,
) -> aya::maps::HashMap<aya::maps::MapData, proxy_common::CtKey, proxy_common::CtValue> {
    let pin = b.bpffs.join(proxy_common::names::CONNTRACK);
    let data = aya::maps::MapData::from_pin(&pin).expect("conntrack pin");
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("conntrack map")
}

fn evict(
    ct: &mut aya::maps::HashMap<aya::maps::MapData, proxy_common::CtKey, proxy_common::CtValue>,
    only_reverse: bool,
) -> usize {
    let keys: Vec<proxy_common::CtKey> = ct.keys().map(|k| k.unwrap()).collect();
    let mut n = 0;
    for k in keys {
        if !only_reverse || k.dir == proxy_common::CT_REVERSE {
            ct.remove(&k).unwrap();
            n += 1;
        }
    }
    n
}

/// Moves the last_seen of every forward entry `ns` into the past.
fn age_forward_entries(
    ct: &mut aya::maps::HashMap<aya::maps::MapData, proxy_common::CtKey, proxy_common::CtValue>,
    ns: u64,
) {
    let keys: Vec<proxy_common::CtKey> = ct.keys().map(|k| k.unwrap()).collect();
    for k in keys
        .into_iter()
        .filter(|k| k.dir == proxy_common::CT_FORWARD)
    {
        let mut v = ct.get(&k, 0).unwrap();
        v.last_seen_ns -= ns;
        ct.insert(k, v, 0).unwrap();
    }
}

/// A FIN or RST marks the reply entry too, so such a packet looks it up whenever it comes, and
/// puts it back if it was evicted, closing.
#[test]
fn a_fin_puts_back_an_evicted_reply_entry_at_once() {
    let mut b = bed();
    let mut ct = conntrack(&b);
    let first = pkt::parse(&b.run(&tcp_syn(45100)).1).dst;
    assert_eq!(evict(&mut ct, true), 1);
    let (_, _, moved) = b.run_counted(&with_tcp_flags(tcp_syn(45100), 0x11));
    assert_eq!(moved, ["translated_established"]);
    let keys: Vec<proxy_common::CtKey> = ct.keys().map(|k| k.unwrap()).collect();
    let reply = keys
        .iter()
        .find(|k| k.dir == proxy_common::CT_REVERSE)
        .expect("reply entry put back");
    let v = ct.get(reply, 0).unwrap();
    assert_ne!(v.flags & proxy_common::CT_CLOSING, 0, "closing");
    assert_eq!(
        proxy_agent::datapath::addr::from_words(reply.saddr, reply.family),
        IpAddr::V4(first)
    );
}

#[test]
fn flows_whose_conntrack_entries_were_evicted_carry_on() {
    let mut b = bed();
    let mut ct = conntrack(&b);
    let mut seen = std::collections::BTreeSet::new();
    for port in 45000..45040 {
        let first = pkt::parse(&b.run(&tcp_syn(port)).1).dst;
        seen.insert(first);
        // Both entries evicted: the next packet finds the same backend again (the choice is a
        // hash of the tuple) and records the flow anew.
        assert_eq!(evict(&mut ct, false), 2);
        let (rc, out, moved) = b.run_counted(&tcp_ack(port));
        assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_new"]));
        assert_eq!(pkt::parse(&out).dst, first, "port {port}: another backend");
        // Only the reply direction evicted: an established packet looks it up (and puts it
        // back) only when its forward entry is due for its last_seen refresh (at most once a
        // second), so the next one, a moment later, does not, and one once the refresh is due
        // does (the time passing is simulated by ageing the forward entry).
        assert_eq!(evict(&mut ct, true), 1);
        let (_, _, moved) = b.run_counted(&tcp_ack(port));
        assert_eq!(moved, ["translated_established"]);
        assert_eq!(ct.keys().count(), 1, "no lookup of the reply entry");
        age_forward_entries(&mut ct, 1_100_000_000);
        let (_, _, moved) = b.run_counted(&tcp_ack(port));
        assert_eq!(moved, ["translated_established"]);
        assert_eq!(ct.keys().count(), 2, "reply entry put back");
        let reply = pkt::Ip::new(first, CLIENT, pkt::TCP).frame(&pkt::l4(
            pkt::TCP,
            first,
            CLIENT,
            8080,
            port,
            b"",
        ));
        let (rc, out, moved) = b.run_counted(&reply);
        assert_eq!((rc, moved), (TC_ACT_OK, vec!["reverse_translated"]));
        assert_eq!(pkt::parse(&out).src, VIP);
        evict(&mut ct, false);
    }
    assert_eq!(seen.len(), 2, "flows spread over both backends");
}

#[test]
fn a_direct_connection_reusing_a_translated_tuple_is_not_reverse_translated() {
    let mut b = bed();
    let backend = pkt::parse(&b.run(&tcp_syn(40007)).1).dst;
    let reply = pkt::Ip::new(backend, CLIENT, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        backend,
        CLIENT,
        8080,
        40007,
        b"",
    ));
    assert_eq!(
        pkt::parse(&b.run(&reply).1).src,
        VIP,
        "translated flow first"
    );
    // The translated connection ends (its FIN marks both entries closing)...
    let (_, _, moved) = b.run_counted(&with_tcp_flags(tcp_syn(40007), 0x11));
    assert_eq!(moved, ["translated_established"]);
    // ...and the same client port now dials the backend directly (socket LB, or a pod IP).
    let direct = pkt::Ip::new(CLIENT, backend, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        CLIENT,
        backend,
        40007,
        8080,
        b"",
    ));
    let (rc, out, moved) = b.run_counted(&direct);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["passed_no_match"]));
    assert_eq!(out, direct);
    let (rc, out, moved) = b.run_counted(&reply);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["passed_no_match"]));
    assert_eq!(
        out, reply,
        "the direct connection's reply must keep the backend's address"
    );
}

#[test]
fn a_spoofed_syn_on_a_live_translated_tuple_keeps_its_reply_path() {
    let mut b = bed();
    let backend = pkt::parse(&b.run(&tcp_syn(40017)).1).dst;
    let reply = pkt::Ip::new(backend, CLIENT, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        backend,
        CLIENT,
        8080,
        40017,
        b"",
    ));
    // A SYN with the client's address and port straight to the backend while the translated
    // connection lives (not closing): spoofed, or a reuse the backend could not tell apart.
    let spoofed = pkt::Ip::new(CLIENT, backend, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        CLIENT,
        backend,
        40017,
        8080,
        b"",
    ));
    let (rc, out, moved) = b.run_counted(&spoofed);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["passed_no_match"]));
    assert_eq!(out, spoofed);
    let (rc, out, moved) = b.run_counted(&reply);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["reverse_translated"]));
    assert_eq!(
        pkt::parse(&out).src,
        VIP,
        "the live flow's reply is still translated"
    );
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    let mut b = sticky_bed();
    let syn = |client: Ipv4Addr, sport: u16| {
        pkt::Ip::new(client, STICKY_VIP, pkt::TCP).frame(&pkt::l4(
            pkt::TCP,
            client,
            STICKY_VIP,
            sport,
            80,
            b"",
        ))
    };
    let first = pkt::parse(&b.run(&syn(CLIENT, 45000)).1).dst;
    for sport in 45001..45040 {
        assert_eq!(
            pkt::parse(&b.run(&syn(CLIENT, sport)).1).dst,
            first,
            "a new connection of the same client moved"
        );
    }
    let others: std::collections::BTreeSet<Ipv4Addr> = (10..26)
        .map(|i| pkt::parse(&b.run(&syn(Ipv4Addr::new(198, 19, 1, i), 46000)).1).dst)
        .collect();
    assert!(
        others.len() >= 2,
        "other clients are still balanced: {others:?}"
    );
}

#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    let mut b = bed();
    // A UDP flow through the VIP, then the backend reports "port unreachable" for it.
    let query =
        pkt::Ip::new(CLIENT, VIP, pkt::UDP).frame(&pkt::l4(pkt::UDP, CLIENT, VIP, 40008, 53, b"q"));
    let translated = b.run(&query).1;
    let backend = pkt::parse(&translated).dst;
    // The error quotes the translated packet's IP header and first 8 L4 bytes.
    let quoted = translated[14..14 + 28].to_vec();
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted);
    let c = pkt::csum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let error = pkt::Ip::new(backend, CLIENT, pkt::ICMP).frame(&icmp);
    let (rc, out, moved) = b.run_counted(&error);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["icmp_translated"]));
    let (src, dst, ip_ok) = pkt::parse_ip_only(&out);
    assert_eq!(
        (src, dst),
        (VIP, CLIENT),
        "reported by the backend: from the VIP"
    );
    assert!(ip_ok, "outer IP checksum");
    let icmp_out = &out[34..];
    assert_eq!(pkt::csum(icmp_out, 0), 0, "ICMP checksum");
    let inner = &icmp_out[8..];
    assert_eq!(pkt::csum(&inner[..20], 0), 0, "quoted IP header checksum");
    assert_eq!(&inner[12..16], &CLIENT.octets(), "quoted source unchanged");
    assert_eq!(
        &inner[16..20],
        &VIP.octets(),
        "quoted destination is the VIP again"
    );
    assert_eq!(
        u16::from_be_bytes([inner[22], inner[23]]),
        53,
        "quoted port is the Service port"
    );

    // An ICMP error about a flow the proxy never translated passes untouched.
    let mut foreign = icmp.clone();
    foreign[8 + 20..8 + 22].copy_from_slice(&41234u16.to_be_bytes());
    let c = {
        foreign[2] = 0;
        foreign[3] = 0;
        pkt::csum(&foreign, 0)
    };
    foreign[2..4].copy_from_slice(&c.to_be_bytes());
    let frame = pkt::Ip::new(backend, CLIENT, pkt::ICMP).frame(&foreign);
    let (rc, out, moved) = b.run_counted(&frame);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["passed_other_protocol"]));
    assert_eq!(out, frame);
}

/// IPv6 frames, built and checked independently of the datapath.
mod pkt6 {
    use std::net::Ipv6Addr;

    fn pseudo(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> u32 {
        let mut p = Vec::new();
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, next]);
        p.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum()
    }

    /// Ethernet + IPv6 (+ one destination-options extension header if `ext`) + UDP.
    pub fn udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, ext: bool) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&12u16.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(b"q6q6");
        let c = super::pkt::csum(&u, pseudo(src, dst, 17, u.len()));
        u[6..8].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
        let ext_hdr: &[u8] = if ext { &[17, 0, 1, 4, 0, 0, 0, 0] } else { &[] };
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((ext_hdr.len() + u.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[if ext { 60 } else { 17 }, 64]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(ext_hdr);
        f.extend_from_slice(&u);
        f
    }

    /// The UDP datagram (header with a valid checksum, then `payload`) from `src` to `dst`.
    pub fn udp_datagram(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        let c = super::pkt::csum(&u, pseudo(src, dst, 17, u.len()));
        u[6..8].copy_from_slice(&c.to_be_bytes());
        u
    }

    /// Whether a reassembled UDP datagram's checksum holds for `src` to `dst`.
    pub fn udp_csum_ok(src: Ipv6Addr, dst: Ipv6Addr, u: &[u8]) -> bool {
        super::pkt::csum(u, pseudo(src, dst, 17, u.len())) == 0
    }

    /// Ethernet + IPv6 + a fragment header (`offset` in bytes, more fragments `more`,
    /// identification `id`, next header UDP) + `part` of a datagram.
    pub fn fragment(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        id: u32,
        offset: usize,
        more: bool,
        part: &[u8],
    ) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((8 + part.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[44, 64]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&[17, 0]);
        f.extend_from_slice(&((offset as u16) | more as u16).to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(part);
        f
    }

    /// (source, destination, the fragment's data) of a frame built by `fragment`.
    pub fn parse_fragment(f: &[u8]) -> (Ipv6Addr, Ipv6Addr, Vec<u8>) {
        let a = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).unwrap());
        (a(&f[22..]), a(&f[38..]), f[14 + 48..].to_vec())
    }

    /// Ethernet + IPv6 + an ICMPv6 message of `kind`/`code` (4 bytes of data: the MTU for
    /// Packet Too Big) quoting `quoted`, with a valid checksum.
    pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
        let mut m = vec![kind, code, 0, 0, 0, 0, 0x05, 0x00];
        m.extend_from_slice(quoted);
        let c = super::pkt::csum(&m, pseudo(src, dst, 58, m.len()));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(m.len() as u16).to_be_bytes());
        f.extend_from_slice(&[58, 64]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&m);
        f
    }

    /// (outer source, outer destination, ICMPv6 checksum valid, quoted source, quoted
    /// destination, quoted ports) of a frame built by `icmp6`.
    #[allow(clippy::type_complexity)]
    pub fn parse_icmp6(f: &[u8]) -> (Ipv6Addr, Ipv6Addr, bool, Ipv6Addr, Ipv6Addr, u16, u16) {
        let ip = &f[14..];
        let a = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).unwrap());
        let (src, dst) = (a(&ip[8..]), a(&ip[24..]));
        let m = &ip[40..];
        let ok = super::pkt::csum(m, pseudo(src, dst, 58, m.len())) == 0;
        let q = &m[8..];
        (
            src,
            dst,
            ok,
            a(&q[8..]),
            a(&q[24..]),
            u16::from_be_bytes([q[40], q[41]]),
            u16::from_be_bytes([q[42], q[43]]),
        )
    }

    /// (source, destination, ports, UDP checksum valid) of a frame built by `udp`.
    pub fn parse(f: &[u8], ext: bool) -> (Ipv6Addr, Ipv6Addr, u16, u16, bool) {
        let ip = &f[14..];
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        let u = &ip[40 + if ext { 8 } else { 0 }..];
        let ok = super::pkt::csum(u, pseudo(src, dst, 17, u.len())) == 0;
        (
            src,
            dst,
            u16::from_be_bytes([u[0], u[1]]),
            u16::from_be_bytes([u[2], u[3]]),
            ok,
        )
    }
}

#[test]
fn ipv6_translates_with_extension_headers_and_replies() {
    use std::net::Ipv6Addr;
    let mut b = bed();
    let vip6: Ipv6Addr = "fd00:18:100::10".parse().unwrap();
    let backend: Ipv6Addr = "fd00:19:2::2".parse().unwrap();
    let client: Ipv6Addr = "fd00:19:1::50".parse().unwrap();
    let f = Frontend {
        addr: IpAddr::V6(vip6),
        port: 53,
        protocol: Protocol::Udp,
        scope: Default::default(),
    };
    let e = Endpoint {
        addr: IpAddr::V6(backend),
        port: 5353,
        state: EndpointState::Active,
        local: false,
    };
    let report = b.writer.sync(&desired(&[(f, vec![e])]));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    for ext in [false, true] {
        let q = pkt6::udp(client, vip6, 40010 + ext as u16, 53, ext);
        let (rc, out, moved) = b.run_counted(&q);
        assert_eq!(
            (rc, moved),
            (TC_ACT_OK, vec!["translated_new"]),
            "ext {ext}"
        );
        assert_eq!(
            pkt6::parse(&out, ext),
            (client, backend, 40010 + ext as u16, 5353, true)
        );
        let reply = pkt6::udp(backend, client, 5353, 40010 + ext as u16, ext);
        let (rc, out, moved) = b.run_counted(&reply);
        assert_eq!((rc, moved), (TC_ACT_OK, vec!["reverse_translated"]));
        assert_eq!(
            pkt6::parse(&out, ext),
            (vip6, client, 53, 40010 + ext as u16, true)
        );
    }
}

/// Issue 16 bug 4: an IPv4 frontend is its address in word 0 and zeros, so the IPv6 address
/// with the same first four bytes and zeros after them (198.18.102.1 and c612:6601::) was the
/// same services map key: whichever was written last took the other's traffic. The key carries
/// the family now; each reaches its own backend and each reply leaves from its own frontend.
/// (c612:6601:: is outside fd00::/8 on purpose: only the bytes of a colliding address make the
/// case. The frames exist only in BPF_PROG_TEST_RUN buffers, never on an interface.)
#[test]
fn an_ipv4_and_an_ipv6_frontend_with_the_same_address_bytes_stay_apart() {
    use std::net::Ipv6Addr;
    let mut b = bed();
    let vip4 = Ipv4Addr::new(198, 18, 102, 1);
    let vip6: Ipv6Addr = "c612:6601::".parse().unwrap();
    assert_eq!(vip6.octets()[..4], vip4.octets(), "the colliding bytes");
    let backend6: Ipv6Addr = "fd00:19:2::2".parse().unwrap();
    let client6: Ipv6Addr = "fd00:19:1::50".parse().unwrap();
    let f4 = fe(vip4, 53, Protocol::Udp);
    let f6 = Frontend {
        addr: IpAddr::V6(vip6),
        ..f4
    };
    let e6 = Endpoint {
        addr: IpAddr::V6(backend6),
        port: 5353,
        state: EndpointState::Active,
        local: false,
    };
    let want = desired(&[(f4, vec![ep(B1, 5353)]), (f6, vec![e6])]);
    let report = b.writer.sync(&want);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // What the maps hold reads back as two frontends, each of its own family.
    b.writer.reread().unwrap();
    let programmed: Vec<Frontend> = b.writer.programmed().services.keys().copied().collect();
    assert_eq!(programmed, vec![f4, f6]);
    assert_eq!(b.writer.sync(&want).writes, 0, "nothing to repair");

    let q4 = pkt::Ip::new(CLIENT, vip4, pkt::UDP).frame(&pkt::l4(
        pkt::UDP,
        CLIENT,
        vip4,
        40100,
        53,
        b"q4",
    ));
    let (rc, out, moved) = b.run_counted(&q4);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_new"]));
    let s = pkt::parse(&out);
    assert_eq!(
        (s.src, s.dst, s.dport, s.l4_csum_ok),
        (CLIENT, B1, 5353, true)
    );
    let q6 = pkt6::udp(client6, vip6, 40100, 53, false);
    let (rc, out, moved) = b.run_counted(&q6);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_new"]));
    assert_eq!(
        pkt6::parse(&out, false),
        (client6, backend6, 40100, 5353, true)
    );

    let r4 = pkt::Ip::new(B1, CLIENT, pkt::UDP).frame(&pkt::l4(
        pkt::UDP,
        B1,
        CLIENT,
        5353,
        40100,
        b"r4",
    ));
    let (rc, out, moved) = b.run_counted(&r4);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["reverse_translated"]));
    let s = pkt::parse(&out);
    assert_eq!(
        (s.src, s.sport, s.dst, s.l4_csum_ok),
        (vip4, 53, CLIENT, true)
    );
    let r6 = pkt6::udp(backend6, client6, 5353, 40100, false);
    let (rc, out, moved) = b.run_counted(&r6);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["reverse_translated"]));
    assert_eq!(pkt6::parse(&out, false), (vip6, client6, 53, 40100, true));
}

#[test]
fn ipv6_udp_fragments_follow_their_first_fragment() {
    use std::net::Ipv6Addr;
    let mut b = bed();
    let vip6: Ipv6Addr = "fd00:18:100::13".parse().unwrap();
    let backend: Ipv6Addr = "fd00:19:2::3".parse().unwrap();
    let client: Ipv6Addr = "fd00:19:1::51".parse().unwrap();
    let f = Frontend {
        addr: IpAddr::V6(vip6),
        port: 53,
        protocol: Protocol::Udp,
        scope: Default::default(),
    };
    let e = Endpoint {
        addr: IpAddr::V6(backend),
        port: 5353,
        state: EndpointState::Active,
        local: false,
    };
    let report = b.writer.sync(&desired(&[(f, vec![e])]));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let payload: Vec<u8> = (0..40u8).collect();
    let dgram = pkt6::udp_datagram(client, vip6, 40020, 53, &payload);
    // A later fragment before its first: nothing to take the ports from.
    let later = pkt6::fragment(client, vip6, 0x1234_5678, 24, false, &dgram[24..]);
    let (rc, out, moved) = b.run_counted(&later);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["passed_fragment_unknown"]));
    assert_eq!(out, later);
    // First fragment: translated (ports and checksum), ports recorded.
    let first = pkt6::fragment(client, vip6, 0x1234_5678, 0, true, &dgram[..24]);
    let (rc, out1, moved) = b.run_counted(&first);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_new"]));
    let (s1, d1, part1) = pkt6::parse_fragment(&out1);
    assert_eq!((s1, d1), (client, backend));
    assert_eq!(u16::from_be_bytes([part1[2], part1[3]]), 5353);
    // The later fragment follows: same address rewrite, its bytes untouched.
    let (rc, out2, moved) = b.run_counted(&later);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_established"]));
    let (s2, d2, part2) = pkt6::parse_fragment(&out2);
    assert_eq!((s2, d2), (client, backend));
    assert_eq!(part2, &dgram[24..]);
    // Reassembled, the datagram's checksum holds for the new addresses.
    let whole = [part1, part2].concat();
    assert!(pkt6::udp_csum_ok(client, backend, &whole), "{whole:02x?}");
    // Another datagram's id (or another source) is not confused with this one.
    let other = pkt6::fragment(client, vip6, 0x1234_5679, 24, false, &dgram[24..]);
    let (_, _, moved) = b.run_counted(&other);
    assert_eq!(moved, ["passed_fragment_unknown"]);
}

#[test]
fn icmpv6_errors_about_translated_flows_are_translated_back() {
    use std::net::Ipv6Addr;
    let mut b = bed();
    let vip6: Ipv6Addr = "fd00:18:100::11".parse().unwrap();
    let backend: Ipv6Addr = "fd00:19:2::3".parse().unwrap();
    let client: Ipv6Addr = "fd00:19:1::51".parse().unwrap();
    let router: Ipv6Addr = "fd00:19:9::1".parse().unwrap();
    let f = Frontend {
        addr: IpAddr::V6(vip6),
        port: 53,
        protocol: Protocol::Udp,
        scope: Default::default(),
    };
    let e = Endpoint {
        addr: IpAddr::V6(backend),
        port: 5353,
        state: EndpointState::Active,
        local: false,
    };
    let report = b.writer.sync(&desired(&[(f, vec![e])]));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let q = pkt6::udp(client, vip6, 40020, 53, false);
    let (rc, translated) = b.run(&q);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(pkt6::parse(&translated, false).1, backend);
    // The error quotes the translated packet: its IPv6 header and UDP header (and more).
    let quoted = translated[14..].to_vec();

    // Packet Too Big from a router on the way: only the quoted packet changes.
    let ptb = pkt6::icmp6(router, client, 2, 0, &quoted);
    let (rc, out, moved) = b.run_counted(&ptb);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["icmp_translated"]));
    assert_eq!(
        pkt6::parse_icmp6(&out),
        (router, client, true, client, vip6, 40020, 53),
        "Packet Too Big quotes what the client sent, with a valid ICMPv6 checksum"
    );
    assert_eq!(&out[14 + 44..14 + 48], &[0, 0, 0x05, 0x00], "MTU kept");

    // Port unreachable from the backend itself: it must come from the frontend.
    let unreach = pkt6::icmp6(backend, client, 1, 4, &quoted);
    let (rc, out, moved) = b.run_counted(&unreach);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["icmp_translated"]));
    assert_eq!(
        pkt6::parse_icmp6(&out),
        (vip6, client, true, client, vip6, 40020, 53)
    );

    // An error about a flow the proxy never translated passes untouched.
    let foreign_q = pkt6::udp(client, backend, 40021, 5353, false);
    let foreign = pkt6::icmp6(backend, client, 1, 4, &foreign_q[14..]);
    let (rc, out, moved) = b.run_counted(&foreign);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["passed_other_protocol"]));
    assert_eq!(out, foreign);
}

/// XDP tests run in a network namespace of their own thread (the FIB lookup consults the
/// routes of the running thread's namespace): `dummy0` (a veth) is the node's external interface,
/// 198.18.0.1/24, with static neighbours for the client (.100) and for node 2 (.2), through
/// which 198.19.2.0/24 (node 2's pods) is routed. Nothing is sent anywhere: test runs do not
/// transmit.
mod xdp {
    use super::*;
    use proxy_agent::datapath::external;
    use proxy_common::IfaceConfig;

    pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    pub const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    pub const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;

    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    /// Runs `f` in a new network namespace set up as above, on a thread of its own; returns
    /// the ifindex of dummy0 to `f`.
    pub fn in_node<R: Send>(f: impl FnOnce(u32) -> R + Send) -> R {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: affects this thread only; it ends with the scope.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
                ip(&["link", "set", "lo", "up"]);
                // A node forwards (the FIB lookup answers "forwarding disabled" otherwise);
                // /proc/sys/net is the namespace of the thread that opens it.
                std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").unwrap();
                std::fs::write("/proc/sys/net/ipv4/conf/default/forwarding", "1").unwrap();
                ip(&[
                    "link",
                    "add",
                    "dummy0",
                    "address",
                    "02:00:00:00:00:01",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "peer0",
                ]);
                ip(&["link", "set", "peer0", "up"]);
                ip(&["addr", "add", "198.18.0.1/24", "dev", "dummy0"]);
                ip(&["link", "set", "dummy0", "up"]);
                for (addr, mac) in [
                    ("198.18.0.2", "02:00:00:00:00:02"),
                    ("198.18.0.100", "02:00:00:00:00:64"),
                ] {
                    ip(&[
                        "neigh",
                        "add",
                        addr,
                        "lladdr",
                        mac,
                        "dev",
                        "dummy0",
                        "nud",
                        "permanent",
                    ]);
                }
                ip(&["route", "add", "198.19.2.0/24", "via", "198.18.0.2"]);
                let idx = std::ffi::CString::new("dummy0").unwrap();
                // SAFETY: a valid C string.
                let ifindex = unsafe { libc::if_nametoindex(idx.as_ptr()) };
                assert!(ifindex > 0);
                f(ifindex)
            })
            .join()
            .unwrap()
        })
    }

    /// The external interface as the agent programs it.
    pub fn program_iface(b: &mut Bed, ifindex: u32) {
        let mut m = std::collections::BTreeMap::new();
        m.insert(
            ifindex,
            IfaceConfig {
                addr4: u32::from_ne_bytes(NODE.octets()),
                flags: 0,
                addr6: [0; 4],
            },
        );
        external::program_interfaces(b.writer.maps_mut(), &m).unwrap();
    }

    pub fn run(b: &mut Bed, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>, Vec<&'static str>) {
        let before = b.counters();
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex }
        let mut md = Vec::new();
        for v in [0u32, frame.len() as u32, 0, ifindex, 0, 0] {
            md.extend_from_slice(&v.to_ne_bytes());
        }
        let prog = loader::xdp_program(&mut b.ebpf).unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&md),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN (xdp)");
        out.truncate(r.data_size_out as usize);
        let after = b.counters();
        let moved = after
            .iter()
            .filter(|(k, v)| before[*k] != **v)
            .map(|(k, _)| *k)
            .collect();
        (r.return_value, out, moved)
    }
}

#[test]
fn xdp_forwards_nodeport_traffic_to_another_node_and_its_replies() {
    xdp::in_node(|ifindex| {
        let mut b = bed();
        xdp::program_iface(&mut b, ifindex);
        let np = fe(xdp::NODE, 30080, Protocol::Tcp);
        let local = fe(xdp::NODE, 30081, Protocol::Tcp);
        let report = b.writer.sync(&desired(&[
            (np, vec![ep(B2, 8080)]),
            (
                local,
                vec![Endpoint {
                    local: true,
                    ..ep(B1, 8080)
                }],
            ),
            (fe(xdp::NODE, 30082, Protocol::Tcp), vec![]),
        ]));
        assert!(report.failed.is_empty(), "{:?}", report.failed);

        // Client -> NodePort, backend on node 2: DNAT + SNAT to the node, out the same way.
        let syn = pkt::Ip::new(xdp::EXT_CLIENT, xdp::NODE, pkt::TCP).frame(&pkt::l4(
            pkt::TCP,
            xdp::EXT_CLIENT,
            xdp::NODE,
            41000,
            30080,
            b"",
        ));
        let (rc, out, mut moved) = xdp::run(&mut b, &syn, ifindex);
        moved.sort();
        assert_eq!(rc, xdp::XDP_TX);
        assert_eq!(moved, ["snat", "translated_new", "xdp_forwarded"]);
        let s = pkt::parse(&out);
        assert_eq!((s.src, s.dst, s.dport), (xdp::NODE, B2, 8080));
        assert!(s.ip_csum_ok && s.l4_csum_ok, "{s:?}");
        assert_eq!(&out[0..6], &xdp::NODE2_MAC, "to node 2's MAC");
        assert_eq!(&out[6..12], &xdp::NODE_MAC, "from this node's MAC");
        assert_eq!(out[14 + 8], 63, "TTL decremented");
        let snat_port = s.sport;

        // Node 2's backend answers the node: back to the client from the NodePort.
        let reply = pkt::Ip::new(B2, xdp::NODE, pkt::TCP).frame(&pkt::l4(
            pkt::TCP,
            B2,
            xdp::NODE,
            8080,
            snat_port,
            b"",
        ));
        let (rc, out, moved) = xdp::run(&mut b, &reply, ifindex);
        assert_eq!(rc, xdp::XDP_TX);
        assert_eq!(moved, ["reverse_translated", "xdp_forwarded"]);
        let s = pkt::parse(&out);
        assert_eq!(
            (s.src, s.sport, s.dst, s.dport),
            (xdp::NODE, 30080, xdp::EXT_CLIENT, 41000)
        );
        assert!(s.ip_csum_ok && s.l4_csum_ok, "{s:?}");
        assert_eq!(&out[0..6], &xdp::CLIENT_MAC);

        // Established: the same backend, counted as such.
        let (rc, out, moved) = xdp::run(&mut b, &syn, ifindex);
        assert_eq!(rc, xdp::XDP_TX);
        let mut moved = moved;
        moved.sort();
        assert_eq!(moved, ["translated_established", "xdp_forwarded"]);
        assert_eq!(pkt::parse(&out).sport, snat_port);

        // A local backend: XDP records the flow but leaves the packet to tc, which finds the
        // same flow.
        let syn_local = pkt::Ip::new(xdp::EXT_CLIENT, xdp::NODE, pkt::TCP).frame(&pkt::l4(
            pkt::TCP,
            xdp::EXT_CLIENT,
            xdp::NODE,
            41001,
            30081,
            b"",
        ));
        let (rc, out, moved) = xdp::run(&mut b, &syn_local, ifindex);
        assert_eq!((rc, moved), (xdp::XDP_PASS, vec![]));
        assert_eq!(out, syn_local, "passed unchanged");
        // tc then translates it, to the backend XDP recorded, and counts the flow as new
        // (once: the next packet is established).
        let (rc, out, moved) = b.run_counted(&syn_local);
        assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_new"]));
        assert_eq!(pkt::parse(&out).dst, B1);
        let (_, _, moved) = b.run_counted(&syn_local);
        assert_eq!(moved, ["translated_established"]);

        // No endpoints: passed to tc uncounted, which answers it with the reject.
        let syn_empty = pkt::Ip::new(xdp::EXT_CLIENT, xdp::NODE, pkt::TCP).frame(&pkt::l4(
            pkt::TCP,
            xdp::EXT_CLIENT,
            xdp::NODE,
            41002,
            30082,
            b"",
        ));
        let (rc, out, moved) = xdp::run(&mut b, &syn_empty, ifindex);
        assert_eq!((rc, moved), (xdp::XDP_PASS, vec![]));
        assert_eq!(out, syn_empty, "passed unchanged");
        let (rc, out, moved) = b.run_counted(&syn_empty);
        assert_eq!((rc, moved), (TC_ACT_REDIRECT, vec!["rejected_no_backend"]));
        assert_port_unreachable4(&syn_empty, &out);

        // Other traffic to the node passes untouched and uncounted (tc counts it).
        let other = pkt::Ip::new(xdp::EXT_CLIENT, xdp::NODE, pkt::TCP).frame(&pkt::l4(
            pkt::TCP,
            xdp::EXT_CLIENT,
            xdp::NODE,
            41003,
            22,
            b"",
        ));
        let (rc, out, moved) = xdp::run(&mut b, &other, ifindex);
        assert_eq!((rc, out, moved), (xdp::XDP_PASS, other, vec![]));

        // TTL 1: left to the kernel (time exceeded), untouched.
        let mut ttl1 = syn.clone();
        ttl1[14 + 8] = 1;
        let c = {
            ttl1[24] = 0;
            ttl1[25] = 0;
            pkt::csum(&ttl1[14..34], 0)
        };
        ttl1[24..26].copy_from_slice(&c.to_be_bytes());
        let (rc, out, _) = xdp::run(&mut b, &ttl1, ifindex);
        assert_eq!((rc, out), (xdp::XDP_PASS, ttl1));
    });
}

const MAGLEV_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 13);

/// One frontend, MAGLEV_VIP:80/TCP, over `backends` (198.19.5.i:8080) with `algorithm`.
fn one_frontend(backends: &[u8], algorithm: LbAlgorithm) -> DesiredState {
    let mut d = desired(&[(
        fe(MAGLEV_VIP, 80, Protocol::Tcp),
        backends
            .iter()
            .map(|i| ep(Ipv4Addr::new(198, 19, 5, *i), 8080))
            .collect(),
    )]);
    d.services
        .values_mut()
        .for_each(|s| s.algorithm = algorithm);
    d
}

/// 10,000 distinct client tuples: 100 client addresses times 100 source ports.
fn client_tuples() -> Vec<(Ipv4Addr, u16)> {
    (0..100u16)
        .flat_map(|c| {
            let client = Ipv4Addr::new(198, 19, 64 + (c / 200) as u8, (c % 200) as u8 + 20);
            (0..100u16).map(move |p| (client, 30_000 + p * 7))
        })
        .collect()
}

fn syn_to_maglev_vip(client: Ipv4Addr, sport: u16) -> Vec<u8> {
    pkt::Ip::new(client, MAGLEV_VIP, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        client,
        MAGLEV_VIP,
        sport,
        80,
        b"",
    ))
}

impl Bed {
    /// The backend (last address octet) each frame is sent to, checking it was translated.
    fn backends_of(&mut self, frames: &[Vec<u8>]) -> Vec<u8> {
        frames
            .iter()
            .map(|f| {
                let (rc, out) = self.run(f);
                assert_eq!(rc, TC_ACT_OK);
                let s = pkt::parse(&out);
                assert_eq!(
                    (s.dport, s.dst.octets()[..3].to_vec()),
                    (8080, vec![198, 19, 5])
                );
                s.dst.octets()[3]
            })
            .collect()
    }
}

/// Share of the flows per backend.
fn shares(choices: &[u8]) -> BTreeMap<u8, f64> {
    let mut s = BTreeMap::new();
    for c in choices {
        *s.entry(*c).or_insert(0.0) += 1.0 / choices.len() as f64;
    }
    s
}

/// What one backend removal does to 10,000 flows of a frontend over 10 backends: (shares before,
/// fraction of flows that changed backend with fresh conntrack, fraction of the flows on
/// survivors that moved). Checks on the way that established flows do not move.
fn remove_one_of_ten(algorithm: LbAlgorithm) -> (BTreeMap<u8, f64>, f64, f64) {
    let mut b = bed();
    let all: Vec<u8> = (1..=10).collect();
    let report = b.writer.sync(&one_frontend(&all, algorithm));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let syns: Vec<Vec<u8>> = client_tuples()
        .into_iter()
        .map(|(c, p)| syn_to_maglev_vip(c, p))
        .collect();
    let acks: Vec<Vec<u8>> = syns.iter().cloned().map(as_ack).collect();
    let before = b.backends_of(&syns);

    let gone = 4u8;
    let rest: Vec<u8> = all.iter().copied().filter(|i| *i != gone).collect();
    let report = b.writer.sync(&one_frontend(&rest, algorithm));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // Conntrack kept: every established flow keeps its backend (the removed one's drain).
    assert_eq!(
        b.backends_of(&acks),
        before,
        "{algorithm}: an established flow moved"
    );

    // Conntrack gone (LRU pressure, a node the flow had not crossed before): a fresh choice.
    evict(&mut conntrack(&b), false);
    let after = b.backends_of(&syns);
    let n = before.len() as f64;
    for (x, y) in before.iter().zip(&after) {
        assert!(*y != gone, "{algorithm}: a flow chose the removed backend");
        assert!(
            *x != gone || x != y,
            "{algorithm}: a flow of the removed backend stayed"
        );
    }
    let changed = before.iter().zip(&after).filter(|(x, y)| x != y).count() as f64 / n;
    let survivors = before.iter().filter(|x| **x != gone).count() as f64;
    let survivors_moved = before
        .iter()
        .zip(&after)
        .filter(|(x, y)| **x != gone && x != y)
        .count() as f64
        / survivors;
    (shares(&before), changed, survivors_moved)
}

/// Maglev over 10 backends and 10,000 client tuples: every backend gets close to 1/10 of the
/// flows (measured: 9.53% to 10.43%); removing one backend moves about 1/10 of the flows once
/// conntrack is gone (its own, plus Maglev's small reshuffle between survivors; measured: 10.88%
/// changed, 0.50% of the survivors' flows), and none while conntrack holds the established
/// flows. The same frontend with random choice (a hash modulo the backend count) moves most
/// flows (measured: 90.2%), which is what this test tells apart.
#[test]
fn maglev_spreads_evenly_and_a_removed_backend_moves_about_its_share() {
    let (shares, changed, survivors_moved) = remove_one_of_ten(LbAlgorithm::Maglev);
    println!(
        "maglev: shares {shares:.4?}, changed {changed:.4}, survivors moved {survivors_moved:.4}"
    );
    assert_eq!(shares.len(), 10, "every backend is chosen");
    for (backend, share) in &shares {
        assert!(
            (share - 0.1).abs() < 0.015,
            "backend {backend} has {share:.4} of the flows, want 0.1"
        );
    }
    assert!(
        (changed - 0.1).abs() < 0.02,
        "{changed:.4} of the flows changed backend, want about 1/10"
    );
    assert!(
        survivors_moved < 0.02,
        "{survivors_moved:.4} of the flows on surviving backends moved"
    );

    let (_, changed, _) = remove_one_of_ten(LbAlgorithm::Random);
    println!("random: changed {changed:.4}");
    assert!(changed > 0.5, "random choice: {changed:.4} changed");
}

/// Tables are rebuilt at another size, swapped in whole, and repaired when they vanish; until
/// then the frontend falls back to its slots instead of dropping; a frontend switched to random
/// loses its table.
#[test]
fn maglev_tables_follow_the_size_fall_back_and_are_repaired() {
    let mut b = bed();
    let all: Vec<u8> = (1..=10).collect();
    let d = one_frontend(&all, LbAlgorithm::Maglev);
    let r = b.writer.sync(&d);
    assert_eq!((r.failed.len(), r.tables_built), (0, 1), "{r:?}");
    assert_eq!(
        b.writer.sync(&d).tables_built,
        0,
        "same backends: no rebuild"
    );
    let svc_id = b.writer.programmed().services[&fe(MAGLEV_VIP, 80, Protocol::Tcp)].svc_id;
    let info = |b: &Bed| b.writer.programmed().tables.get(&svc_id).map(|t| t.size);
    assert_eq!(info(&b), Some(16381));
    let syns: Vec<Vec<u8>> = client_tuples()
        .into_iter()
        .take(3000)
        .map(|(c, p)| syn_to_maglev_vip(c, p))
        .collect();
    let mut ct = conntrack(&b);

    b.writer.set_maglev_table_size(251).unwrap();
    let r = b.writer.sync(&d);
    assert_eq!((r.tables_built, info(&b)), (1, Some(251)), "{r:?}");
    let small = b.backends_of(&syns);
    let s = shares(&small);
    assert_eq!(s.len(), 10, "{s:?}");
    assert!(s.values().all(|x| (x - 0.1).abs() < 0.03), "{s:?}");

    // The table vanishes behind the writer's back: new flows still get a backend (the slots).
    let mut maps = maps::Maps::open(&b.bpffs).unwrap();
    maps.maglev.remove(&svc_id).unwrap();
    evict(&mut ct, false);
    let (rc, _, moved) = b.run_counted(&syns[0]);
    assert_eq!((rc, moved), (TC_ACT_OK, vec!["translated_new"]));
    assert_eq!(shares(&b.backends_of(&syns)).len(), 10);

    // A full reconciliation puts the same table back: the flows find their backends again.
    b.writer.reread().unwrap();
    assert_eq!(b.writer.sync(&d).tables_built, 1);
    evict(&mut ct, false);
    assert_eq!(b.backends_of(&syns), small);

    // Random from now on: the table goes, after the frontend stopped using it.
    let r = b.writer.sync(&one_frontend(&all, LbAlgorithm::Random));
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!(info(&b), None);
    assert!(maps.maglev.keys().next().is_none(), "table left behind");
}

#[test]
fn fin_and_rst_mark_both_conntrack_entries_closing_and_a_new_syn_clears_them() {
    let mut b = bed();
    let ct = conntrack(&b);
    let closing = |ct: &aya::maps::HashMap<_, proxy_common::CtKey, proxy_common::CtValue>| {
        let mut v: Vec<(u8, bool)> = ct
            .iter()
            .map(|e| e.unwrap())
            .map(|(k, v)| (k.dir, v.flags & proxy_common::CT_CLOSING != 0))
            .collect();
        v.sort();
        v
    };
    let (fwd, rev) = (proxy_common::CT_FORWARD, proxy_common::CT_REVERSE);
    for (i, flags) in [0x11u8, 0x04, 0x14].into_iter().enumerate() {
        let port = 46000 + i as u16;
        let backend = pkt::parse(&b.run(&tcp_syn(port)).1).dst;
        b.run(&tcp_ack(port));
        assert_eq!(
            closing(&ct),
            [(fwd, false), (rev, false)],
            "flags {flags:#x}"
        );
        // The client's FIN (or RST) marks both directions.
        let (rc, out, _) = b.run_counted(&with_tcp_flags(tcp_syn(port), flags));
        assert_eq!((rc, pkt::parse(&out).dst), (TC_ACT_OK, backend));
        assert_eq!(closing(&ct), [(fwd, true), (rev, true)], "flags {flags:#x}");
        // A new connection on the same tuple clears the mark in both, and counts as new.
        let (_, out, moved) = b.run_counted(&tcp_syn(port));
        assert_eq!(
            (moved, pkt::parse(&out).dst),
            (vec!["translated_new"], backend)
        );
        assert_eq!(closing(&ct), [(fwd, false), (rev, false)]);
        let synack = with_tcp_flags(
            pkt::Ip::new(backend, CLIENT, pkt::TCP).frame(&pkt::l4(
                pkt::TCP,
                backend,
                CLIENT,
                8080,
                port,
                b"",
            )),
            0x12,
        );
        b.run(&synack);
        assert_eq!(closing(&ct), [(fwd, false), (rev, false)]);
        // The backend's FIN marks both as well.
        let (_, out, moved) = b.run_counted(&with_tcp_flags(synack, 0x11));
        assert_eq!(
            (moved, pkt::parse(&out).src),
            (vec!["reverse_translated"], VIP)
        );
        assert_eq!(closing(&ct), [(fwd, true), (rev, true)]);
        let mut ct = conntrack(&b);
        evict(&mut ct, false);
    }
}

const EXPLAIN_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 14);

/// `proxy-agent explain` names the backend the tc program then picks, for 10,000 new flows, and
/// the same backend once they are established: over a random frontend, a Maglev one and one
/// with sessionAffinity ClientIP (100 clients, so most flows find a remembered backend).
#[test]
fn explain_names_the_backend_the_datapath_picks_for_10000_tuples() {
    use proxy_agent::explain::{Explainer, Origin, PathChoice, Query};
    let mut b = bed();
    let eps = |third: u8, n: u8, port: u16| -> Vec<Endpoint> {
        (2..2 + n)
            .map(|i| ep(Ipv4Addr::new(198, 19, third, i), port))
            .collect()
    };
    let mut d = desired(&[
        (fe(EXPLAIN_VIP, 80, Protocol::Tcp), eps(6, 5, 8080)),
        (fe(EXPLAIN_VIP, 53, Protocol::Udp), eps(7, 7, 5353)),
        (fe(EXPLAIN_VIP, 443, Protocol::Tcp), eps(8, 4, 8443)),
    ]);
    for (f, s) in d.services.iter_mut() {
        match f.port {
            53 => s.algorithm = LbAlgorithm::Maglev,
            443 => s.affinity_timeout_s = 600,
            _ => {}
        }
    }
    let report = b.writer.sync(&d);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let x = Explainer::open(&b.bpffs).unwrap();
    let mut kept_by_affinity = 0;
    let mut maglev = 0;
    for (i, (client, sport)) in client_tuples().into_iter().enumerate() {
        let (port, protocol, proto) = match i % 3 {
            0 => (80, Protocol::Tcp, pkt::TCP),
            1 => (53, Protocol::Udp, pkt::UDP),
            _ => (443, Protocol::Tcp, pkt::TCP),
        };
        let q = Query {
            src: (client, sport).into(),
            dst: (EXPLAIN_VIP, port).into(),
            protocol,
            from: Origin::Pod,
            path: PathChoice::Tc,
        };
        let new = x.explain(&q);
        assert_eq!((new.outcome, new.path), ("new", "tc"), "{q:?}: {new:#?}");
        let want = new.backend.clone().expect("a backend");
        kept_by_affinity += new.steps.iter().any(|s| s.contains(": kept")) as usize;
        maglev += new.steps.iter().any(|s| s.starts_with("Maglev")) as usize;
        let frame = pkt::Ip::new(client, EXPLAIN_VIP, proto).frame(&pkt::l4(
            proto,
            client,
            EXPLAIN_VIP,
            sport,
            port,
            b"x",
        ));
        let (rc, out) = b.run(&frame);
        assert_eq!(rc, TC_ACT_OK);
        let seen = pkt::parse(&out);
        assert_eq!(
            (IpAddr::V4(seen.dst), seen.dport),
            (want.address, want.port),
            "{q:?}: explain said {:#?}",
            new.steps
        );
        let est = x.explain(&q);
        assert_eq!(est.outcome, "established", "{q:?}: {est:#?}");
        assert_eq!(est.backend, Some(want));
        assert_eq!(est.conntrack.map(|c| c.admitted_by), Some("tc"));
    }
    // 3,333 flows to the affinity frontend from 100 clients: all but each client's first.
    assert_eq!(kept_by_affinity, 3_333 - 100);
    assert_eq!(maglev, 3_333);
}

/// The per-Service counters `status` shows: packets, replies and new flows of the frontend that
/// handled them, rejects of the one without endpoints, drops of one outside its source ranges;
/// nothing for a packet that is no Service's.
#[test]
fn per_service_counters_count_each_frontends_packets_flows_and_drops() {
    let mut b = bed();
    let stats = |b: &Bed, vip: Ipv4Addr, port: u16| {
        let p =
            proxy_agent::datapath::writer::Programmed::read(&maps::Maps::open(&b.bpffs).unwrap())
                .unwrap();
        let id = p.services[&fe(vip, port, Protocol::Tcp)].svc_id;
        let s = maps::read_svc_stats(&b.bpffs).unwrap();
        let c = s.get(&id).copied().unwrap_or_default().counts;
        proxy_common::SVC_COUNTER_NAMES
            .iter()
            .copied()
            .zip(c)
            .filter(|(_, v)| *v != 0)
            .collect::<BTreeMap<_, _>>()
    };
    assert!(stats(&b, VIP, 80).is_empty());
    let mut backend = CLIENT;
    for port in 42000..42003 {
        for _ in 0..4 {
            let (rc, out) = b.run(&tcp_syn(port));
            assert_eq!(rc, TC_ACT_OK);
            backend = pkt::parse(&out).dst;
        }
    }
    let reply = pkt::Ip::new(backend, CLIENT, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        backend,
        CLIENT,
        8080,
        42002,
        b"hi",
    ));
    assert_eq!(b.run(&reply).0, TC_ACT_OK);
    assert_eq!(
        stats(&b, VIP, 80),
        BTreeMap::from([("new_flows", 3), ("packets", 12), ("replies", 1)])
    );
    let empty = pkt::Ip::new(CLIENT, EMPTY_VIP, pkt::TCP).frame(&pkt::l4(
        pkt::TCP,
        CLIENT,
        EMPTY_VIP,
        43000,
        80,
        b"",
    ));
    b.run(&empty);
    b.run(&empty);
    assert_eq!(stats(&b, EMPTY_VIP, 80), BTreeMap::from([("rejected", 2)]));
    // Not a frontend: no Service counts it.
    let other =
        pkt::Ip::new(CLIENT, B1, pkt::TCP).frame(&pkt::l4(pkt::TCP, CLIENT, B1, 43001, 80, b""));
    b.run(&other);
    assert_eq!(stats(&b, VIP, 80)["packets"], 12);
    assert_eq!(maps::read_svc_stats(&b.bpffs).unwrap().len(), 2);
}

/// Issue 16 bug 7: a frontend with 5,000 endpoints (more than the 4,096 the agent used to
/// allow) is served by the kernel program over all of them: new flows reach endpoints past the
/// 4,096th slot.
#[test]
fn a_service_with_5000_endpoints_reaches_all_of_them() {
    let mut b = bed();
    let addr_of = |n: u32| Ipv4Addr::new(198, 19, 100 + (n / 250) as u8, 1 + (n % 250) as u8);
    let eps: Vec<Endpoint> = (0..5_000).map(|n| ep(addr_of(n), 8080)).collect();
    let report = b
        .writer
        .sync(&desired(&[(fe(VIP, 80, Protocol::Tcp), eps)]));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let index: BTreeMap<Ipv4Addr, u32> = (0..5_000).map(|n| (addr_of(n), n)).collect();
    let mut seen = std::collections::BTreeSet::new();
    for sport in 20_000..22_000 {
        let (rc, out) = b.run(&tcp_syn(sport));
        assert_eq!(rc, TC_ACT_OK);
        let s = pkt::parse(&out);
        let n = *index
            .get(&s.dst)
            .unwrap_or_else(|| panic!("not an endpoint: {s:?}"));
        assert_eq!(s.dport, 8080);
        seen.insert(n);
    }
    assert!(seen.len() > 1_000, "{} endpoints reached", seen.len());
    assert!(
        seen.iter().any(|n| *n >= 4_096),
        "no flow reached an endpoint past the 4,096th"
    );
}

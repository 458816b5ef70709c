//! Packet fuzzing of the XDP program through BPF_PROG_TEST_RUN, in a network namespace of its
//! own (the program's FIB lookups see its routes): `ext0` is the node's external interface,
//! 198.18.0.1/24, node 2 (198.18.0.2) routes the backends' 198.19.0.0/16, and the clients
//! (198.18.0.100 and 198.18.64.0/18 behind it) have static neighbours; this node's pods
//! (198.19.1.0/24) are behind a pod interface. NodePort Services on the
//! node address lead to backends on node 2 (TCP and UDP), to a local backend, and to none.
//!
//! Generated frames: NodePort requests from many clients, replies from the backends to the
//! SNAT ports seen so far, and other traffic, each mutated at random (truncated, bytes flipped,
//! bad checksums, IP options, fragments, TTL 0/1, VLAN tags, IPv6, other protocols).
//!
//! Property, per frame: the program returns XDP_PASS with the frame unchanged, XDP_DROP with
//! exactly a drop reason and `xdp_dropped` counted, or XDP_TX (only with a valid IP header
//! checksum, only for a next hop out of the external interface) with the frame translated exactly
//! as the conntrack map now says (forward entry: new destination, SNAT source; reverse entry:
//! frontend source, client destination), the next hop's MACs, TTL decremented, a valid IP
//! checksum, an L4 checksum exactly as valid as it came in, and nothing else changed; and
//! `xdp_forwarded` plus one translation counter moved. Never anything else.
//!
//! `FUZZ_PACKETS` (default 20,000: the fast subset in `cargo xtask test`) and `FUZZ_SEED`, as
//! for fuzz_datapath:
//! `FUZZ_PACKETS=1000000 cargo test --release -p proxy-agent --test fuzz_xdp -- --nocapture`.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Instant,
};

use aya::{
    TestRun as _, TestRunOptions,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
};
use proxy_agent::{
    datapath::{external, loader, maps, writer::Writer},
    model::{
        DesiredService, DesiredState, Endpoint, EndpointState, Frontend, LbAlgorithm, Protocol,
    },
};
use proxy_common::{
    AF_INET, COUNTER_NAMES, CT_FORWARD, CT_REVERSE, CT_SNAT, CtKey, CtValue, IfaceConfig,
    ServiceKind, names,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
const TCP: u8 = 6;
const UDP: u8 = 17;

/// (node port, protocol, backends on node 2, a local backend)
const SERVICES: [(u16, u8, &[[u8; 4]], bool); 5] = [
    (
        30080,
        TCP,
        &[[198, 19, 2, 2], [198, 19, 2, 3], [198, 19, 3, 2]],
        false,
    ),
    (30053, UDP, &[[198, 19, 2, 4], [198, 19, 3, 3]], false),
    (30081, TCP, &[], true),
    (30082, TCP, &[], false),
    (30054, UDP, &[[198, 19, 2, 5]], false),
];
const TARGET_PORT: u16 = 8080;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

fn csum(data: &[u8], mut sum: u64) -> u16 {
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u64 {
    let mut p = Vec::new();
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u64)
        .sum()
}

/// Ethernet + IPv4 + TCP/UDP with valid checksums.
fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    let payload = b"fuzz";
    let at = if proto == TCP {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        16
    } else {
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        6
    };
    l4.extend_from_slice(payload);
    let c = csum(&l4, pseudo(src, dst, proto, l4.len()));
    let c = if proto == UDP && c == 0 { 0xffff } else { c };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = csum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&h);
    f.extend_from_slice(&l4);
    f
}

fn fix_ip_csum(f: &mut [u8]) {
    if f.len() >= 34 {
        f[24] = 0;
        f[25] = 0;
        let c = csum(&f[14..34], 0);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }
}

/// Whether an IPv4 frame without options carries a valid L4 checksum (UDP zero counts as
/// valid: none).
fn l4_ok(f: &[u8]) -> bool {
    let (src, dst, proto) = (
        <[u8; 4]>::try_from(&f[26..30]).unwrap(),
        <[u8; 4]>::try_from(&f[30..34]).unwrap(),
        f[23],
    );
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    let l4 = &f[34..(14 + total).min(f.len())];
    if proto == UDP && l4[6..8] == [0, 0] {
        return true;
    }
    csum(l4, pseudo(src, dst, proto, l4.len())) == 0
}

struct Bed {
    ebpf: aya::Ebpf,
    bpffs: PathBuf,
    counters: PerCpuArray<MapData, u64>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    ifindex: u32,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.bpffs);
    }
}

impl Bed {
    fn counters(&self) -> Vec<u64> {
        (0..COUNTER_NAMES.len() as u32)
            .map(|i| self.counters.get(&i, 0).unwrap().iter().sum())
            .collect()
    }

    fn run(&mut self, f: &[u8]) -> Result<(u32, Vec<u8>, Vec<&'static str>), i32> {
        let before = self.counters();
        let mut md = Vec::new();
        for v in [0u32, f.len() as u32, 0, self.ifindex, 0, 0] {
            md.extend_from_slice(&v.to_ne_bytes());
        }
        let mut out = vec![0u8; f.len() + 256];
        let r = loader::xdp_program(&mut self.ebpf)
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                ctx_in: Some(&md),
                ..Default::default()
            })
            .map_err(|e| match e {
                aya::programs::ProgramError::SyscallError(s) => {
                    s.io_error.raw_os_error().unwrap_or(0)
                }
                _ => -1,
            })?;
        out.truncate(r.data_size_out as usize);
        let after = self.counters();
        let moved = (0..after.len())
            .filter(|i| after[*i] != before[*i])
            .map(|i| COUNTER_NAMES[i])
            .collect();
        Ok((r.return_value, out, moved))
    }

    fn ct(
        &self,
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        proto: u8,
        dir: u8,
    ) -> Option<CtValue> {
        let key = CtKey {
            saddr: [u32::from_ne_bytes(src), 0, 0, 0],
            daddr: [u32::from_ne_bytes(dst), 0, 0, 0],
            sport_be: sport.to_be(),
            dport_be: dport.to_be(),
            proto,
            family: AF_INET,
            dir,
            _pad: 0,
        };
        self.conntrack.get(&key, 0).ok()
    }
}

fn setup() -> Bed {
    // SAFETY: affects the calling thread only (each test runs on its own thread).
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    ip(&["link", "set", "lo", "up"]);
    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").unwrap();
    std::fs::write("/proc/sys/net/ipv4/conf/default/forwarding", "1").unwrap();
    ip(&[
        "link",
        "add",
        "ext0",
        "address",
        "02:00:00:00:00:01",
        "type",
        "veth",
        "peer",
        "name",
        "peer0",
    ]);
    ip(&["link", "set", "peer0", "up"]);
    ip(&["addr", "add", "198.18.0.1/24", "dev", "ext0"]);
    ip(&["link", "set", "ext0", "up"]);
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
            "ext0",
            "nud",
            "permanent",
        ]);
    }
    ip(&["route", "add", "198.19.0.0/16", "via", "198.18.0.2"]);
    // This node's pods (the local backend) are behind a pod interface, which XDP leaves to tc.
    ip(&[
        "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
    ]);
    ip(&["link", "set", "pod0", "up"]);
    ip(&["link", "set", "pod0p", "up"]);
    ip(&["route", "add", "198.19.1.0/24", "dev", "pod0"]);
    ip(&["route", "add", "198.18.64.0/18", "via", "198.18.0.100"]);
    let name = std::ffi::CString::new("ext0").unwrap();
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex > 0);

    let bpffs = PathBuf::from(format!(
        "/sys/fs/bpf/pxfx-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let ebpf = loader::load(&bpffs, loader::MapSizes::default()).unwrap_or_else(|e| {
        let _ = loader::cleanup(&bpffs);
        panic!("load datapath: {e:?}")
    });
    let mut writer = Writer::adopt(maps::Maps::open(&bpffs).unwrap()).unwrap();
    let desired = DesiredState {
        services: SERVICES
            .iter()
            .map(|(port, proto, remote, local)| {
                let mut endpoints: Vec<Endpoint> = remote
                    .iter()
                    .map(|a| Endpoint {
                        addr: IpAddr::V4((*a).into()),
                        port: TARGET_PORT,
                        state: EndpointState::Active,
                        local: false,
                    })
                    .collect();
                if *local {
                    endpoints.push(Endpoint {
                        addr: IpAddr::V4(Ipv4Addr::new(198, 19, 1, 9)),
                        port: TARGET_PORT,
                        state: EndpointState::Active,
                        local: true,
                    });
                }
                let protocol = if *proto == TCP {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                (
                    Frontend {
                        addr: IpAddr::V4(NODE),
                        port: *port,
                        protocol,
                        scope: Default::default(),
                    },
                    DesiredService {
                        drop_without_endpoints: false,
                        service: format!("fuzz/np-{port}"),
                        name: format!("fuzz/np-{port}:{port}"),
                        kind: ServiceKind::NodePort,
                        endpoints,
                        affinity_timeout_s: 0,
                        source_ranges: Vec::new(),
                        // Both selection algorithms behind XDP (the agent's default for
                        // NodePorts is Maglev).
                        algorithm: if port % 2 == 0 {
                            LbAlgorithm::Maglev
                        } else {
                            LbAlgorithm::Random
                        },
                    },
                )
            })
            .collect(),
    };
    let report = writer.sync(&desired);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let mut ifaces = BTreeMap::new();
    ifaces.insert(
        ifindex,
        IfaceConfig {
            addr4: u32::from_ne_bytes(NODE.octets()),
            flags: 0,
            addr6: [0; 4],
        },
    );
    external::program_interfaces(writer.maps_mut(), &ifaces).unwrap();
    let open = |name: &str| {
        let data = MapData::from_pin(bpffs.join(name)).unwrap();
        aya::maps::Map::PerCpuArray(data)
    };
    let counters = PerCpuArray::try_from(open(names::COUNTERS)).unwrap();
    let ct = MapData::from_pin(bpffs.join(names::CONNTRACK)).unwrap();
    let conntrack = BpfHashMap::try_from(aya::maps::Map::LruHashMap(ct)).unwrap();
    Bed {
        ebpf,
        bpffs,
        counters,
        conntrack,
        ifindex,
    }
}

/// A replies-to-be: (backend, backend port, SNAT port, protocol) seen in a forwarded frame.
type Seen = ([u8; 4], u16, u16, u8);

fn generate(rng: &mut StdRng, seen: &[Seen]) -> (Vec<u8>, &'static str) {
    let client = if rng.random_bool(0.3) {
        [198, 18, 0, 100]
    } else {
        [198, 18, rng.random_range(64..128), rng.random_range(1..255)]
    };
    let sport = rng.random_range(1024..65535);
    let flags = [0x02, 0x10, 0x18, 0x11, 0x04, 0x12, 0x00, 0xff][rng.random_range(0..8)];
    let (mut f, kind) = match rng.random_range(0..10) {
        0..=4 => {
            let (port, proto, ..) = SERVICES[rng.random_range(0..SERVICES.len())];
            (
                frame(client, NODE.octets(), proto, sport, port, flags),
                "request",
            )
        }
        5..=7 if !seen.is_empty() => {
            let (b, bport, snat, proto) = seen[rng.random_range(0..seen.len())];
            (frame(b, NODE.octets(), proto, bport, snat, flags), "reply")
        }
        _ => {
            let dst = [[198, 18, 0, 1], [198, 19, 2, 2], [198, 18, 0, 2]][rng.random_range(0..3)];
            let proto = if rng.random_bool(0.5) { TCP } else { UDP };
            (
                frame(client, dst, proto, sport, rng.random_range(1..65535), flags),
                "other",
            )
        }
    };
    // Mutations.
    match rng.random_range(0..16) {
        0 => f.truncate(rng.random_range(0..f.len())),
        1 => {
            let i = rng.random_range(0..f.len());
            f[i] = rng.random();
        }
        2 => {
            // Bad L4 checksum.
            let at = if f[23] == TCP {
                14 + 20 + 16
            } else {
                14 + 20 + 6
            };
            f[at] ^= 0x5a;
        }
        3 => {
            // IP options (NOPs): the header grows by 4.
            f.splice(34..34, [1u8, 1, 1, 1]);
            f[14] = 0x46;
            let total = u16::from_be_bytes([f[16], f[17]]) + 4;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            fix_ip_csum(&mut f);
        }
        4 => {
            // A fragment (MF, or an offset).
            f[20] = if rng.random_bool(0.5) { 0x20 } else { 0x00 };
            f[21] = rng.random_range(0..4);
            fix_ip_csum(&mut f);
        }
        5 => {
            f[22] = rng.random_range(0..2);
            fix_ip_csum(&mut f);
        }
        6 => {
            // A VLAN tag.
            f.splice(12..12, [0x81u8, 0x00, 0x00, 0x07]);
        }
        7 => {
            f[12] = 0x86;
            f[13] = 0xdd;
        }
        8 => {
            f[23] = [1u8, 47, 132][rng.random_range(0..3)];
            fix_ip_csum(&mut f);
        }
        9 => {
            // Bad IP header checksum.
            f[24] ^= 0xff;
        }
        _ => {}
    }
    (f, kind)
}

/// Checks one run; `Err` describes a violation.
fn check(bed: &Bed, f: &[u8], rc: u32, out: &[u8], moved: &[&str]) -> Result<Option<Seen>, String> {
    let drops = [
        "dropped_no_backend",
        "dropped_backend_missing",
        "dropped_conntrack_full",
        "dropped_snat_ports",
        "dropped_source_range",
        "dropped_no_local_backend",
    ];
    match rc {
        XDP_PASS => {
            if out != f {
                return Err("passed a changed frame".into());
            }
            if !moved.is_empty() {
                return Err(format!("passed, but counted {moved:?} (tc counts passes)"));
            }
            Ok(None)
        }
        XDP_DROP => {
            let ok = moved.len() == 2
                && moved.contains(&"xdp_dropped")
                && moved.iter().any(|m| drops.contains(m));
            if ok {
                Ok(None)
            } else {
                Err(format!("dropped with counters {moved:?}"))
            }
        }
        XDP_TX => {
            let translations = [
                "translated_new",
                "translated_established",
                "reselected",
                "translated_draining",
                "reverse_translated",
            ];
            let t: Vec<&&str> = moved.iter().filter(|m| translations.contains(m)).collect();
            let rest: Vec<&&str> = moved
                .iter()
                .filter(|m| !translations.contains(m) && **m != "xdp_forwarded" && **m != "snat")
                .collect();
            if t.len() != 1 || !moved.contains(&"xdp_forwarded") || !rest.is_empty() {
                return Err(format!("forwarded with counters {moved:?}"));
            }
            if out.len() != f.len() {
                return Err("forwarded frame changed length".into());
            }
            if f[14] != 0x45 || f[20] & 0x3f != 0 || f[21] != 0 {
                return Err("forwarded a frame with options or a fragment".into());
            }
            let o4 = |b: &[u8], at: usize| <[u8; 4]>::try_from(&b[at..at + 4]).unwrap();
            let p = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
            let (src, dst, sport, dport, proto) = (o4(f, 26), o4(f, 30), p(f, 34), p(f, 36), f[23]);
            let (osrc, odst, osport, odport) = (o4(out, 26), o4(out, 30), p(out, 34), p(out, 36));
            let reply = *t[0] == "reverse_translated";
            let mut seen = None;
            if reply {
                let ct = bed
                    .ct(src, dst, sport, dport, proto, CT_REVERSE)
                    .ok_or("reverse-translated without a reverse entry")?;
                let want_src = (u32::from_ne_bytes(osrc), osport);
                if (ct.nat_addr[0], u16::from_be(ct.nat_port_be)) != want_src {
                    return Err("reply's new source is not the entry's frontend".into());
                }
                let want_dst = if ct.flags & CT_SNAT != 0 {
                    (ct.orig_addr[0], u16::from_be(ct.orig_port_be))
                } else {
                    (u32::from_ne_bytes(dst), dport)
                };
                if (u32::from_ne_bytes(odst), odport) != want_dst {
                    return Err("reply's new destination is not the entry's client".into());
                }
                if out[0..6] != CLIENT_MAC {
                    return Err("reply not sent to the client's MAC".into());
                }
            } else {
                let ct = bed
                    .ct(src, dst, sport, dport, proto, CT_FORWARD)
                    .ok_or("translated without a forward entry")?;
                if (ct.nat_addr[0], u16::from_be(ct.nat_port_be))
                    != (u32::from_ne_bytes(odst), odport)
                {
                    return Err("new destination is not the entry's backend".into());
                }
                let want_src = if ct.flags & CT_SNAT != 0 {
                    (ct.orig_addr[0], u16::from_be(ct.orig_port_be))
                } else {
                    (u32::from_ne_bytes(src), sport)
                };
                if (u32::from_ne_bytes(osrc), osport) != want_src {
                    return Err("new source is not the entry's SNAT address".into());
                }
                if bed
                    .ct(odst, osrc, odport, osport, proto, CT_REVERSE)
                    .is_none()
                {
                    return Err("forwarded without a reverse entry for the reply".into());
                }
                if out[0..6] != NODE2_MAC {
                    return Err("request not sent to node 2's MAC".into());
                }
                seen = Some((odst, odport, osport, proto));
            }
            if out[6..12] != NODE_MAC {
                return Err("not sent from the node's MAC".into());
            }
            if out[22] != f[22].wrapping_sub(1) {
                return Err("TTL not decremented".into());
            }
            if csum(&f[14..34], 0) != 0 {
                return Err("forwarded a frame whose IP header checksum was invalid".into());
            }
            if csum(&out[14..34], 0) != 0 {
                return Err("IP header checksum invalid".into());
            }
            if l4_ok(out) != l4_ok(f) {
                return Err(format!(
                    "L4 checksum validity changed: {} -> {}",
                    l4_ok(f),
                    l4_ok(out)
                ));
            }
            // Nothing else changed: headers other than addresses, ports, TTL and checksums,
            // and the payload.
            let l4_csum_at = if proto == TCP { 50 } else { 40 };
            for i in 12..out.len() {
                let rewritten =
                    matches!(i, 22 | 24 | 25 | 26..=37) || i == l4_csum_at || i == l4_csum_at + 1;
                if !rewritten && out[i] != f[i] {
                    return Err(format!("byte {i} changed"));
                }
            }
            Ok(seen)
        }
        other => Err(format!("returned {other}")),
    }
}

#[test]
fn fuzz_xdp_ingress() {
    let packets = env_u64("FUZZ_PACKETS").unwrap_or(20_000);
    let seed = env_u64("FUZZ_SEED").unwrap_or_else(rand::random);
    println!("fuzz_xdp: FUZZ_SEED={seed} FUZZ_PACKETS={packets}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let started = Instant::now();
            let mut bed = setup();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut seen: Vec<Seen> = Vec::new();
            let mut verdicts: BTreeMap<String, u64> = BTreeMap::new();
            let mut failures = 0u64;
            for i in 0..packets {
                let (f, kind) = generate(&mut rng, &seen);
                let (rc, out, moved) = match bed.run(&f) {
                    Ok(r) => r,
                    // The kernel refuses frames shorter than an Ethernet header.
                    Err(libc::EINVAL) if f.len() < 14 => {
                        *verdicts.entry("refused (too short)".into()).or_default() += 1;
                        continue;
                    }
                    Err(e) => panic!("frame {i}: BPF_PROG_TEST_RUN failed with errno {e}"),
                };
                match check(&bed, &f, rc, &out, &moved) {
                    Ok(s) => {
                        let v = match rc {
                            XDP_PASS => "pass",
                            XDP_DROP => "drop",
                            _ => "tx",
                        };
                        *verdicts.entry(format!("{kind}: {v}")).or_default() += 1;
                        if let Some(s) = s {
                            if seen.len() < 4096 {
                                seen.push(s);
                            } else {
                                let k = rng.random_range(0..seen.len());
                                seen[k] = s;
                            }
                        }
                    }
                    Err(msg) => {
                        failures += 1;
                        if failures <= 10 {
                            eprintln!(
                                "FAILURE at frame {i} (FUZZ_SEED={seed}): {msg}\n  kind {kind}, verdict {rc}, counters {moved:?}\n  in:  {:02x?}\n  out: {:02x?}",
                                f, out
                            );
                        }
                    }
                }
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "fuzz_xdp: {packets} frames in {secs:.1} s ({:.0}/s), seed {seed}; failures {failures}",
                packets as f64 / secs
            );
            for (k, n) in &verdicts {
                println!("  {n:>9}  {k}");
            }
            assert!(
                verdicts.keys().any(|k| k.ends_with(": tx")) && verdicts.keys().any(|k| k == "reply: tx"),
                "the fuzz never reached the forwarding path: {verdicts:?}"
            );
            assert_eq!(failures, 0, "reproduce with FUZZ_SEED={seed} FUZZ_PACKETS={packets}");
        })
        .join()
        .unwrap()
    });
}

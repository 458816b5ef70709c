//! Per-packet cost of the agent's tc and XDP programs through BPF_PROG_TEST_RUN, on the programs
//! and the maps a running agent has programmed (found through its pinned links), with raw
//! bpf(2) calls so the bench measures exactly what the agent runs.
//!
//! With `repeat` > 1 the kernel runs the program again on the same buffer, which a DNAT has
//! already rewritten, so later runs take the miss path. Every call here is `repeat = 1` with a
//! fresh copy of the packet, and the kernel-reported duration (ns, taken around the program
//! run only) is collected over many calls; the median is reported. An empty program measured
//! the same way gives the fixed cost of that measurement, and a program that does nothing but
//! one hash lookup of a constant key in the agent's services map gives the lookup's share.
//!
//! NodePort packets ([`measure_node_port`]) are run through both programs as they would arrive
//! on the node's external interface: from a thread inside the node's network namespace (the XDP
//! program's FIB lookup and the skb's device are resolved there), with that interface as the
//! ingress device in the context, so the XDP program forwards them (XDP_TX) and tc translates
//! them exactly as for real traffic.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
pub const XDP_TX: u32 = 3;
/// proxy_common::Counter::XdpForwarded and DroppedSnatPorts, indexes of the per-CPU counters
/// map.
pub const COUNTER_XDP_FORWARDED: u32 = 22;
pub const COUNTER_DROPPED_SNAT_PORTS: u32 = 18;
const AF_INET: u8 = 2;
const CT_FORWARD: u8 = 0;
const CT_REVERSE: u8 = 1;

#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap())
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed, 8-aligned bpf_attr-sized buffer the kernel reads and writes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut a = Attr::new();
    a.u64(0, c.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut a).with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
    Ok(owned(fd))
}

/// The program inside the first pinned tc link under `<bpffs>/links`.
fn tc_prog(bpffs: &Path, prog_name: &str) -> Result<OwnedFd> {
    linked_prog(bpffs, |name| name.starts_with(&format!("{prog_name}@")))
}

/// The program inside the first pinned link under `<bpffs>/links` whose name `pick` accepts
/// (`tc_ingress@IFACE`, `xdp_native@IFACE`, `xdp_generic@IFACE`).
fn linked_prog(bpffs: &Path, pick: impl Fn(&str) -> bool) -> Result<OwnedFd> {
    let links = bpffs.join("links");
    let link = std::fs::read_dir(&links)
        .with_context(|| format!("reading {}", links.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| pick(&n.to_string_lossy())))
        .with_context(|| format!("no such pinned link in {}", links.display()))?;
    let link_fd = obj_get(&link)?;
    let mut info = [0u64; 16];
    let mut a = Attr::new();
    a.u32(0, link_fd.as_raw_fd() as u32)
        .u32(4, std::mem::size_of_val(&info) as u32)
        .u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)
        .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD on {}", link.display()))?;
    // struct bpf_link_info { __u32 type; __u32 id; __u32 prog_id; ... }
    let prog_id = (info[1] & 0xffff_ffff) as u32;
    let mut a = Attr::new();
    a.u32(0, prog_id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut a).context("BPF_PROG_GET_FD_BY_ID")?;
    Ok(owned(fd))
}

/// One BPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | ((dst as u64 & 0xf) << 8)
        | ((src as u64 & 0xf) << 12)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

fn load_prog(insns: &[u64], name: &str) -> Result<OwnedFd> {
    load_prog_type(BPF_PROG_TYPE_SCHED_CLS, insns, name)
}

fn load_prog_type(prog_type: u32, insns: &[u64], name: &str) -> Result<OwnedFd> {
    let license = CString::new("GPL")?;
    let mut log = vec![0u8; 65536];
    let mut a = Attr::new();
    a.u32(0, prog_type)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    let n = name.as_bytes();
    a.0[48..48 + n.len().min(15)].copy_from_slice(&n[..n.len().min(15)]);
    match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "BPF_PROG_LOAD {name}: {e}: {}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// `return TC_ACT_OK` (0).
fn empty_prog() -> Result<OwnedFd> {
    load_prog(
        &[insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)],
        "bench_empty",
    )
}

/// `return XDP_PASS` (2).
fn empty_xdp_prog() -> Result<OwnedFd> {
    load_prog_type(
        BPF_PROG_TYPE_XDP,
        &[insn(0xb7, 0, 0, 0, 2), insn(0x95, 0, 0, 0, 0)],
        "bench_xdp_empty",
    )
}

/// The services map key (proxy_common::ServiceKey: addr [u32; 4] network order, port_be,
/// proto, scope, family, 3 bytes of padding) of `vip:port`/TCP, as bytes.
fn service_key(vip: Ipv4Addr, port: u16) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..4].copy_from_slice(&vip.octets());
    k[16..18].copy_from_slice(&port.to_be_bytes());
    k[18] = 6;
    k[20] = 2; // AF_INET
    k
}

/// One `bpf_map_lookup_elem` of a constant key in `map`, then `return TC_ACT_OK`.
fn lookup_prog(map: &OwnedFd, key: &[u8; 24]) -> Result<OwnedFd> {
    let w = |i: usize| i32::from_le_bytes(key[i..i + 4].try_into().unwrap());
    let st = |off: i16, imm: i32| insn(0x62, 10, 0, off, imm); // *(u32 *)(r10 + off) = imm
    let prog = [
        st(-24, w(0)),
        st(-20, w(4)),
        st(-16, w(8)),
        st(-12, w(12)),
        st(-8, w(16)),
        st(-4, w(20)),
        insn(0x18, 1, 1, 0, map.as_raw_fd()), // r1 = map (BPF_PSEUDO_MAP_FD)
        0,
        insn(0xbf, 2, 10, 0, 0),  // r2 = r10
        insn(0x07, 2, 0, 0, -24), // r2 += -24
        insn(0x85, 0, 0, 0, 1),   // call bpf_map_lookup_elem
        insn(0xb7, 0, 0, 0, 0),   // r0 = 0
        insn(0x95, 0, 0, 0, 0),   // exit
    ];
    load_prog(&prog, "bench_lookup")
}

fn map_has(map: &OwnedFd, key: &[u8; 24]) -> bool {
    let mut value = [0u8; 256];
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut a).is_ok()
}

/// `repeat` runs on one buffer: the kernel's average duration per run, in ns. Only clean for
/// programs that leave the packet as it is (a miss, the empty and the lookup-only programs).
fn test_run_repeat(prog: &OwnedFd, data: &[u8], repeat: u32) -> Result<u32> {
    let mut out = vec![0u8; data.len() + 256];
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(8, data.len() as u32)
        .u32(12, out.len() as u32)
        .u64(16, data.as_ptr() as u64)
        .u64(24, out.as_mut_ptr() as u64)
        .u32(32, repeat);
    bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN")?;
    Ok(a.get_u32(36))
}

/// One run: (return value, kernel-reported duration in ns, output packet).
fn test_run(prog: &OwnedFd, data: &[u8], out: &mut [u8]) -> Result<(u32, u32, usize)> {
    test_run_ctx(prog, data, out, &[])
}

/// One run with a context (`ctx_in`; none when empty).
fn test_run_ctx(
    prog: &OwnedFd,
    data: &[u8],
    out: &mut [u8],
    ctx: &[u8],
) -> Result<(u32, u32, usize)> {
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(8, data.len() as u32)
        .u32(12, out.len() as u32)
        .u64(16, data.as_ptr() as u64)
        .u64(24, out.as_mut_ptr() as u64)
        .u32(32, 1);
    if !ctx.is_empty() {
        a.u32(40, ctx.len() as u32).u64(48, ctx.as_ptr() as u64);
    }
    bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN")?;
    Ok((a.get_u32(4), a.get_u32(36), a.get_u32(12) as usize))
}

/// `struct xdp_md` for a packet of `len` bytes arriving on `ifindex`: data, data_end,
/// data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
pub fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    [0u32, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// The start of a `struct __sk_buff` up to and including `ifindex` (offset 40): the device the
/// test skb arrives on. The kernel takes the rest as zero.
pub fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut c = vec![0u8; 44];
    c[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// A conntrack key (proxy_common::CtKey: saddr, daddr as [u32; 4] network order, sport_be,
/// dport_be, proto, family, dir, pad) of an IPv4 flow, as bytes.
pub fn ct_key(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    dir: u8,
) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..4].copy_from_slice(&src.octets());
    k[16..20].copy_from_slice(&dst.octets());
    k[32..34].copy_from_slice(&sport.to_be_bytes());
    k[34..36].copy_from_slice(&dport.to_be_bytes());
    k[36] = proto;
    k[37] = AF_INET;
    k[38] = dir;
    k
}

fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32).u64(8, key.as_ptr() as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut a).map(|_| ())
}

/// Number of possible CPUs (the per-CPU value count of a per-CPU map).
fn possible_cpus() -> Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>()? - a.parse::<usize>()? + 1,
            None => 1,
        };
    }
    Ok(n)
}

/// One counter of the agent's per-CPU counters map under `bpffs`, summed over CPUs.
pub fn counter(bpffs: &Path, index: u32) -> Result<u64> {
    let map = obj_get(&bpffs.join("counters_v1"))?;
    let mut values = vec![0u64; possible_cpus()?];
    let key = index.to_ne_bytes();
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, values.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut a).context("reading counters_v1")?;
    Ok(values.iter().sum())
}

// ---------------------------------------------------------------------------------------------
// Packets (Ethernet + IPv4 + TCP, valid checksums).

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment `src:sport -> dst:dport` (SYN, or ACK with `ack`).
pub fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, syn: bool) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes());
    tcp.extend_from_slice(&(if syn { 0u32 } else { 1 }).to_be_bytes());
    tcp.extend_from_slice(&[0x50, if syn { 0x02 } else { 0x10 }]);
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    let mut pseudo = 0u32;
    for c in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    pseudo += 6 + tcp.len() as u32;
    let c = csum(&tcp, pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

fn ip_dst(f: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(f[30], f[31], f[32], f[33])
}

fn ip_src(f: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(f[26], f[27], f[28], f[29])
}

fn dport(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[36], f[37]])
}

fn sport(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[34], f[35]])
}

// ---------------------------------------------------------------------------------------------

/// Median of the per-call durations of one packet kind, in ns.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    pub median: f64,
}

fn summarize(mut v: Vec<u32>) -> Cost {
    v.sort_unstable();
    Cost {
        median: v.get(v.len() / 2).copied().unwrap_or(0) as f64,
    }
}

#[derive(Clone, Debug, Default)]
pub struct Costs {
    /// A SYN to a VIP never seen before: service lookup, backend choice, conntrack insert, DNAT.
    pub hit_new: Cost,
    /// The same flow again: conntrack hit, DNAT.
    pub hit_established: Cost,
    /// The backend's reply: reverse NAT to the VIP.
    pub reply: Cost,
    /// A packet to an address that is not a Service.
    pub miss: Cost,
    /// An empty program (the measurement's own cost).
    pub empty: Cost,
    /// One hash lookup of a constant key in the services map.
    pub lookup: Cost,
    /// The same miss, empty program and lookup with `repeat` = 10,000 on one buffer (caches
    /// warm, no per-call setup): how much of the numbers above is the cold single run.
    pub miss_warm: Cost,
    pub empty_warm: Cost,
    pub lookup_warm: Cost,
}

/// Measures the agent under `bpffs` with `calls` runs per packet kind. `vip:port`/TCP must be a
/// programmed Service; `miss_dst` an address that is not; `client` a source address no real
/// flow uses (every call of `hit_new` uses a new source port, so a new flow).
pub fn measure(
    bpffs: &Path,
    vip: Ipv4Addr,
    port: u16,
    miss_dst: Ipv4Addr,
    client: Ipv4Addr,
    calls: usize,
) -> Result<Costs> {
    let prog = tc_prog(bpffs, "tc_ingress")?;
    let map = obj_get(&bpffs.join("svc_v2"))?;
    let key = service_key(vip, port);
    ensure!(
        map_has(&map, &key),
        "{vip}:{port}/TCP is not in the services map"
    );
    let empty = empty_prog()?;
    let lookup = lookup_prog(&map, &key)?;
    let mut out = vec![0u8; 512];
    let calls = calls.max(10);

    // New flows: one source port each.
    let mut hit_new = Vec::with_capacity(calls);
    for k in 0..calls {
        let sport = 1024 + (k % 60_000) as u16;
        let f = tcp_frame(client, sport, vip, port, true);
        let (rc, ns, len) = test_run(&prog, &f, &mut out)?;
        ensure!(
            rc == 0 && len == f.len() && ip_dst(&out) != vip,
            "hit_new: packet to {vip}:{port} not translated (return {rc})"
        );
        hit_new.push(ns);
    }
    // One established flow (opened by a SYN), its backend's replies, and a miss.
    test_run(&prog, &tcp_frame(client, 65_000, vip, port, true), &mut out)?;
    let f = tcp_frame(client, 65_000, vip, port, false);
    let (backend, bport) = (ip_dst(&out), dport(&out));
    let reply = tcp_frame(backend, bport, client, 65_000, false);
    let miss = tcp_frame(client, 65_001, miss_dst, 8080, false);
    let mut est = Vec::with_capacity(calls);
    let mut rep = Vec::with_capacity(calls);
    let mut mis = Vec::with_capacity(calls);
    let mut emp = Vec::with_capacity(calls);
    let mut lk = Vec::with_capacity(calls);
    for _ in 0..calls {
        let (rc, ns, _) = test_run(&prog, &f, &mut out)?;
        ensure!(
            rc == 0 && ip_dst(&out) == backend,
            "established flow lost its backend"
        );
        est.push(ns);
        let (rc, ns, _) = test_run(&prog, &reply, &mut out)?;
        ensure!(
            rc == 0 && ip_src(&out) == vip,
            "reply not reverse-translated to {vip} (source {})",
            ip_src(&out)
        );
        rep.push(ns);
        let (rc, ns, _) = test_run(&prog, &miss, &mut out)?;
        ensure!(
            rc == 0 && ip_dst(&out) == miss_dst,
            "miss changed the packet"
        );
        mis.push(ns);
        emp.push(test_run(&empty, &f, &mut out)?.1);
        lk.push(test_run(&lookup, &f, &mut out)?.1);
    }
    let warm = |p: &OwnedFd, pkt: &[u8]| -> Result<Cost> {
        let v = (0..15)
            .map(|_| test_run_repeat(p, pkt, 10_000))
            .collect::<Result<Vec<u32>>>()?;
        Ok(summarize(v))
    };
    let miss_warm = warm(&prog, &miss)?;
    let empty_warm = warm(&empty, &f)?;
    let lookup_warm = warm(&lookup, &f)?;
    Ok(Costs {
        miss_warm,
        empty_warm,
        lookup_warm,
        hit_new: summarize(hit_new),
        hit_established: summarize(est),
        reply: summarize(rep),
        miss: summarize(mis),
        empty: summarize(emp),
        lookup: summarize(lk),
    })
}

// ---------------------------------------------------------------------------------------------
// NodePort: XDP and tc side by side.

/// Per-packet cost of a NodePort Service whose backends are on another node, at XDP and at tc
/// on the node's external interface (medians, ns).
#[derive(Clone, Debug, Default)]
pub struct NodePortCosts {
    /// A SYN from a new client port: service lookup, backend choice, SNAT port, conntrack
    /// insert, DNAT + SNAT (and at XDP the FIB lookup and MAC rewrite, XDP_TX).
    pub xdp_new: Cost,
    pub tc_new: Cost,
    /// The same flow again.
    pub xdp_established: Cost,
    pub tc_established: Cost,
    /// The backend's reply to the node: reverse NAT to the client.
    pub xdp_reply: Cost,
    pub tc_reply: Cost,
    /// `return XDP_PASS` / `return TC_ACT_OK` with the same contexts (the measurement's cost).
    pub xdp_empty: Cost,
    pub tc_empty: Cost,
}

/// Where a NodePort measurement runs.
pub struct NodePortTarget<'a> {
    pub bpffs: &'a Path,
    /// The node's network namespace and its external interface.
    pub node_ns: &'a str,
    pub iface: &'a str,
    /// The node's address on it, and the nodePort (TCP).
    pub node_ip: Ipv4Addr,
    pub node_port: u16,
    /// The Service's endpoints (all on other nodes).
    pub backends: &'a [Ipv4Addr],
    /// Two client addresses no other flow uses, routed out of `iface` (one for XDP, one for
    /// tc, so their flows never meet).
    pub clients: [Ipv4Addr; 2],
}

/// One NodePort packet kind through one program, with what it must come out as.
fn run_np(
    prog: &OwnedFd,
    f: &[u8],
    ctx: &[u8],
    out: &mut [u8],
    want_rc: u32,
    what: &str,
) -> Result<u32> {
    let (rc, ns, len) = test_run_ctx(prog, f, out, ctx)?;
    ensure!(
        rc == want_rc && len == f.len(),
        "{what}: returned {rc} (want {want_rc}), {len} bytes out"
    );
    Ok(ns)
}

/// Measures the NodePort path of the agent at `t` with `calls` runs per packet kind. Every new
/// flow's two conntrack entries are deleted after its run (outside the measured time): each new
/// flow then finds the SNAT port space towards its backend as empty as on a quiet node, and the
/// agent's conntrack is left as it was.
pub fn measure_node_port(t: &NodePortTarget, calls: usize) -> Result<NodePortCosts> {
    let xdp = linked_prog(t.bpffs, |n| {
        n.starts_with("xdp_") && n.ends_with(&format!("@{}", t.iface))
    })
    .with_context(|| format!("the agent's XDP program on {}", t.iface))?;
    let tc = linked_prog(t.bpffs, |n| n == format!("tc_ingress@{}", t.iface))
        .with_context(|| format!("the agent's tc program on {}", t.iface))?;
    let ct = obj_get(&t.bpffs.join("ct_v2"))?;
    let svc = obj_get(&t.bpffs.join("svc_v2"))?;
    let key = service_key(t.node_ip, t.node_port);
    ensure!(
        map_has(&svc, &key),
        "NodePort {}:{}/TCP is not in the services map",
        t.node_ip,
        t.node_port
    );
    let empty_xdp = empty_xdp_prog()?;
    let empty_tc = empty_prog()?;
    let calls = calls.max(10);
    tests::in_netns(t.node_ns, move || -> Result<NodePortCosts> {
        let name = CString::new(t.iface)?;
        // SAFETY: a valid C string; the index is of this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex > 0, "no interface {} in {}", t.iface, t.node_ns);
        let mut out = vec![0u8; 512];
        let len = tcp_frame(t.node_ip, 1, t.node_ip, 1, true).len();
        let (xctx, sctx) = (xdp_md(len, ifindex), skb_ctx(ifindex));
        let paths: [(&OwnedFd, &[u8], u32, Ipv4Addr, &str); 2] = [
            (&xdp, &xctx, XDP_TX, t.clients[0], "XDP"),
            (&tc, &sctx, 0, t.clients[1], "tc"),
        ];
        let mut new = [Vec::with_capacity(calls), Vec::with_capacity(calls)];
        for k in 0..calls {
            let cport = 1024 + (k % 60_000) as u16;
            for (i, (prog, ctx, rc, client, what)) in paths.iter().enumerate() {
                let f = tcp_frame(*client, cport, t.node_ip, t.node_port, true);
                new[i].push(run_np(prog, &f, ctx, &mut out, *rc, what)?);
                let (backend, bport) = (ip_dst(&out), dport(&out));
                ensure!(
                    t.backends.contains(&backend) && ip_src(&out) == t.node_ip,
                    "{what} new flow: {}:{} -> {backend}:{bport}, want SNAT to {} and DNAT to one of {:?}",
                    ip_src(&out),
                    sport(&out),
                    t.node_ip,
                    t.backends
                );
                let fwd = ct_key(*client, t.node_ip, cport, t.node_port, 6, CT_FORWARD);
                let rev = ct_key(backend, t.node_ip, bport, sport(&out), 6, CT_REVERSE);
                map_delete(&ct, &fwd)
                    .and_then(|()| map_delete(&ct, &rev))
                    .with_context(|| format!("{what} new flow: deleting its conntrack entries"))?;
            }
        }
        // One established flow per path (opened by a SYN), and its backend's replies.
        let mut flows = Vec::new();
        for (prog, ctx, rc, client, what) in &paths {
            let cport = 65_100;
            let syn = tcp_frame(*client, cport, t.node_ip, t.node_port, true);
            run_np(prog, &syn, ctx, &mut out, *rc, what)?;
            let (backend, bport, snat) = (ip_dst(&out), dport(&out), sport(&out));
            let est = tcp_frame(*client, cport, t.node_ip, t.node_port, false);
            let reply = tcp_frame(backend, bport, t.node_ip, snat, false);
            flows.push((est, reply, *client, cport, backend, bport, snat));
        }
        let mut est = [Vec::with_capacity(calls), Vec::with_capacity(calls)];
        let mut rep = [Vec::with_capacity(calls), Vec::with_capacity(calls)];
        let mut emp = [Vec::with_capacity(calls), Vec::with_capacity(calls)];
        for _ in 0..calls {
            for (i, (prog, ctx, rc, _, what)) in paths.iter().enumerate() {
                let (e, r, client, cport, backend, _, _) = &flows[i];
                est[i].push(run_np(prog, e, ctx, &mut out, *rc, what)?);
                ensure!(
                    ip_dst(&out) == *backend,
                    "{what}: established flow lost its backend"
                );
                rep[i].push(run_np(prog, r, ctx, &mut out, *rc, what)?);
                ensure!(
                    (ip_src(&out), sport(&out), ip_dst(&out), dport(&out))
                        == (t.node_ip, t.node_port, *client, *cport),
                    "{what}: reply not reverse-translated to the client"
                );
                let empty = if i == 0 { &empty_xdp } else { &empty_tc };
                emp[i].push(test_run_ctx(empty, e, &mut out, ctx)?.1);
            }
        }
        for (_, _, client, cport, backend, bport, snat) in &flows {
            let _ = map_delete(
                &ct,
                &ct_key(*client, t.node_ip, *cport, t.node_port, 6, CT_FORWARD),
            );
            let _ = map_delete(
                &ct,
                &ct_key(*backend, t.node_ip, *bport, *snat, 6, CT_REVERSE),
            );
        }
        let [xn, tn] = new;
        let [xe, te] = est;
        let [xr, tr] = rep;
        let [xm, tm] = emp;
        Ok(NodePortCosts {
            xdp_new: summarize(xn),
            tc_new: summarize(tn),
            xdp_established: summarize(xe),
            tc_established: summarize(te),
            xdp_reply: summarize(xr),
            tc_reply: summarize(tr),
            xdp_empty: summarize(xm),
            tc_empty: summarize(tm),
        })
    })?
}

/// Offset of `last_seen_ns` (CLOCK_MONOTONIC, ns) in proxy_common::CtValue (64 bytes).
const CT_LAST_SEEN: usize = 48;
const CT_VALUE_SIZE: usize = 64;

/// Whether a conntrack entry belongs to a NodePort flow through `node_ip` from `client`: the
/// forward entry (client -> node) or the reverse entry of its SNAT (backend -> node).
pub fn is_node_port_entry(
    key: &[u8; 40],
    node_ip: Ipv4Addr,
    client: Ipv4Addr,
    backends: &[Ipv4Addr],
) -> bool {
    let src = Ipv4Addr::new(key[0], key[1], key[2], key[3]);
    let dst = Ipv4Addr::new(key[16], key[17], key[18], key[19]);
    key[37] == AF_INET
        && dst == node_ip
        && ((key[38] == CT_FORWARD && src == client)
            || (key[38] == CT_REVERSE && backends.contains(&src)))
}

/// Deletes the conntrack entries of NodePort flows (see [`is_node_port_entry`]) idle for at
/// least `min_idle`, and returns (deleted, kept). The agent keeps an entry, and the SNAT port
/// it holds, until its LRU map evicts it, so a bench that sends many NodePort flows would run
/// out of SNAT ports (4,536 per endpoint); freeing a port sooner than the endpoint's TIME_WAIT
/// (60 s) lets a new connection meet the old one's TIME_WAIT there, where PAWS drops its SYN.
pub fn delete_idle_node_port_flows(
    bpffs: &Path,
    node_ip: Ipv4Addr,
    client: Ipv4Addr,
    backends: &[Ipv4Addr],
    min_idle: std::time::Duration,
) -> Result<(usize, usize)> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let ct = obj_get(&bpffs.join("ct_v2"))?;
    let now = {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    let mut doomed = Vec::new();
    let mut kept = 0;
    let mut key = [0u8; 40];
    let mut next = [0u8; 40];
    let mut value = [0u8; CT_VALUE_SIZE];
    let mut first = true;
    // Bounded by the map's size (and a margin for entries added meanwhile).
    for _ in 0..4 * 1024 * 1024 {
        let mut a = Attr::new();
        a.u32(0, ct.as_raw_fd() as u32)
            .u64(8, if first { 0 } else { key.as_ptr() as u64 })
            .u64(16, next.as_mut_ptr() as u64);
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e).context("iterating the conntrack map"),
        }
        first = false;
        key = next;
        if !is_node_port_entry(&key, node_ip, client, backends) {
            continue;
        }
        let mut a = Attr::new();
        a.u32(0, ct.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .u64(16, value.as_mut_ptr() as u64);
        if bpf(BPF_MAP_LOOKUP_ELEM, &mut a).is_err() {
            continue;
        }
        let seen = u64::from_ne_bytes(value[CT_LAST_SEEN..CT_LAST_SEEN + 8].try_into().unwrap());
        if now.saturating_sub(seen) >= min_idle.as_nanos() as u64 {
            doomed.push(key);
        } else {
            kept += 1;
        }
    }
    let mut n = 0;
    for k in &doomed {
        if map_delete(&ct, k).is_ok() {
            n += 1;
        }
    }
    Ok((n, kept))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn frames_have_valid_checksums() {
        let f = tcp_frame(
            Ipv4Addr::new(198, 19, 1, 2),
            40000,
            Ipv4Addr::new(198, 18, 32, 1),
            80,
            true,
        );
        assert_eq!(f.len(), 54);
        assert_eq!(csum(&f[14..34], 0), 0);
        let mut pseudo = 0u32;
        for c in f[26..34].chunks(2) {
            pseudo += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        assert_eq!(csum(&f[34..], pseudo + 6 + 20), 0);
        assert_eq!(ip_dst(&f), Ipv4Addr::new(198, 18, 32, 1));
        assert_eq!(dport(&f), 80);
    }

    #[test]
    fn node_port_entries() {
        let node = Ipv4Addr::new(198, 18, 0, 1);
        let client = Ipv4Addr::new(198, 18, 0, 100);
        let be = [Ipv4Addr::new(198, 19, 2, 2)];
        let fwd = ct_key(client, node, 40_000, 30_080, 6, CT_FORWARD);
        let rev = ct_key(be[0], node, 8080, 61_000, 17, CT_REVERSE);
        assert!(is_node_port_entry(&fwd, node, client, &be));
        assert!(is_node_port_entry(&rev, node, client, &be));
        // A pod's ClusterIP flow, and a reverse entry of another backend, are not.
        let pod = ct_key(Ipv4Addr::new(198, 19, 1, 2), be[0], 1, 80, 6, CT_FORWARD);
        assert!(!is_node_port_entry(&pod, node, client, &be));
        let other = ct_key(
            Ipv4Addr::new(198, 19, 1, 3),
            node,
            8080,
            61_000,
            6,
            CT_REVERSE,
        );
        assert!(!is_node_port_entry(&other, node, client, &be));
    }

    #[test]
    fn contexts_and_conntrack_keys() {
        let md = xdp_md(54, 7);
        assert_eq!(md.len(), 24);
        assert_eq!(u32::from_ne_bytes(md[4..8].try_into().unwrap()), 54);
        assert_eq!(u32::from_ne_bytes(md[12..16].try_into().unwrap()), 7);
        let skb = skb_ctx(7);
        assert_eq!(skb.len(), 44);
        assert_eq!(u32::from_ne_bytes(skb[40..44].try_into().unwrap()), 7);
        assert!(skb[..40].iter().all(|b| *b == 0));
        let k = ct_key(
            Ipv4Addr::new(198, 19, 2, 2),
            Ipv4Addr::new(198, 18, 0, 1),
            8080,
            61_000,
            6,
            CT_REVERSE,
        );
        assert_eq!(&k[..4], &[198, 19, 2, 2]);
        assert!(k[4..16].iter().all(|b| *b == 0));
        assert_eq!(&k[16..20], &[198, 18, 0, 1]);
        assert_eq!(&k[32..36], &[0x1f, 0x90, 0xee, 0x48]);
        assert_eq!(&k[36..40], &[6, 2, 1, 0]);
    }

    #[test]
    fn instruction_encoding() {
        // r1 = 0x12 (mov64 imm): opcode 0xb7, dst 1.
        assert_eq!(insn(0xb7, 1, 0, 0, 0x12), 0x0000_0012_0000_01b7);
        // r2 = r10: opcode 0xbf, dst 2, src 10.
        assert_eq!(insn(0xbf, 2, 10, 0, 0), 0xa2bf);
        // *(u32 *)(r10 - 8) = 1
        assert_eq!(insn(0x62, 10, 0, -8, 1), 0x0000_0001_fff8_0a62);
    }
}

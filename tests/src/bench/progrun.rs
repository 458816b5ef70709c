//! Per-packet cost of the agent's tc program through BPF_PROG_TEST_RUN, on the program and the
//! maps a running agent has programmed (found through its pinned tc link), with raw bpf(2)
//! calls so the bench measures exactly what the agent runs.
//!
//! With `repeat` > 1 the kernel runs the program again on the same buffer, which a DNAT has
//! already rewritten, so later runs take the miss path. Every call here is `repeat = 1` with a
//! fresh copy of the packet, and the kernel-reported duration (ns, taken around the program
//! run only) is collected over many calls; the median is reported. An empty program measured
//! the same way gives the fixed cost of that measurement, and a program that does nothing but
//! one hash lookup of a constant key in the agent's services map gives the lookup's share.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

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
    let links = bpffs.join("links");
    let link = std::fs::read_dir(&links)
        .with_context(|| format!("reading {}", links.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{prog_name}@")))
        })
        .with_context(|| format!("no pinned {prog_name} link in {}", links.display()))?;
    let link_fd = obj_get(&link)?;
    let mut info = [0u64; 16];
    let mut a = Attr::new();
    a.u32(0, link_fd.as_raw_fd() as u32)
        .u32(4, std::mem::size_of_val(&info) as u32)
        .u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("BPF_OBJ_GET_INFO_BY_FD on the tc link")?;
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
    let license = CString::new("GPL")?;
    let mut log = vec![0u8; 65536];
    let mut a = Attr::new();
    a.u32(0, BPF_PROG_TYPE_SCHED_CLS)
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

/// The services map key (proxy_common::ServiceKey: addr [u32; 4] network order, port_be,
/// proto, scope) of `vip:port`/TCP, as bytes.
fn service_key(vip: Ipv4Addr, port: u16) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&vip.octets());
    k[16..18].copy_from_slice(&port.to_be_bytes());
    k[18] = 6;
    k
}

/// One `bpf_map_lookup_elem` of a constant key in `map`, then `return TC_ACT_OK`.
fn lookup_prog(map: &OwnedFd, key: &[u8; 20]) -> Result<OwnedFd> {
    let w = |i: usize| i32::from_le_bytes(key[i..i + 4].try_into().unwrap());
    let st = |off: i16, imm: i32| insn(0x62, 10, 0, off, imm); // *(u32 *)(r10 + off) = imm
    let prog = [
        st(-24, w(0)),
        st(-20, w(4)),
        st(-16, w(8)),
        st(-12, w(12)),
        st(-8, w(16)),
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

fn map_has(map: &OwnedFd, key: &[u8; 20]) -> bool {
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
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(8, data.len() as u32)
        .u32(12, out.len() as u32)
        .u64(16, data.as_ptr() as u64)
        .u64(24, out.as_mut_ptr() as u64)
        .u32(32, 1);
    bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN")?;
    Ok((a.get_u32(4), a.get_u32(36), a.get_u32(12) as usize))
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
    let map = obj_get(&bpffs.join("svc_v1"))?;
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
    fn instruction_encoding() {
        // r1 = 0x12 (mov64 imm): opcode 0xb7, dst 1.
        assert_eq!(insn(0xb7, 1, 0, 0, 0x12), 0x0000_0012_0000_01b7);
        // r2 = r10: opcode 0xbf, dst 2, src 10.
        assert_eq!(insn(0xbf, 2, 10, 0, 0), 0xa2bf);
        // *(u32 *)(r10 - 8) = 1
        assert_eq!(insn(0x62, 10, 0, -8, 1), 0x0000_0001_fff8_0a62);
    }
}

//! The reject of a new flow to a frontend without endpoints: the packet is rewritten in place
//! into an ICMP (IPv4) or ICMPv6 destination-unreachable / port-unreachable about it and sent
//! back out the interface it came in, as kube-proxy's `REJECT` (iptables, default
//! `--reject-with icmp-port-unreachable`, for TCP and UDP alike) and nftables' `reject` do. The
//! client's TCP connect then fails at once with ECONNREFUSED, and a connected UDP socket gets
//! ECONNREFUSED from its next call.
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
};
use proxy_common::AF_INET;

use crate::parse::{ETH_HLEN, ETH_P_IPV6, Flow};

const ETH_P_IP: u16 = 0x0800;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_ICMP: u8 = 1;
/// RFC 792 / RFC 4443 ask for as much of the offending packet as fits; the quoted IP header and
/// the first 8 bytes of its transport header are what a receiver needs to find the socket (and
/// for TCP, the sequence number it checks).
const QUOTE_L4: usize = 8;
const V4_QUOTE: usize = 20 + QUOTE_L4;
const V6_QUOTE: usize = 40 + QUOTE_L4;
const V4_LEN: usize = ETH_HLEN + 20 + 8 + V4_QUOTE;
const V6_LEN: usize = ETH_HLEN + 40 + 8 + V6_QUOTE;

/// Ones' complement sum of big-endian 16-bit words.
#[inline(always)]
fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Makes the packet exactly `len` bytes long. Also when it already is: resizing is what makes
/// the kernel drop a CHECKSUM_COMPLETE value that the rewrite would make stale.
#[inline(always)]
fn resize(skb: *mut __sk_buff, len: usize) -> bool {
    // SAFETY: `skb` is the program's context.
    unsafe {
        if (*skb).len as usize == len && bpf_skb_change_tail(skb, len as u32 + 2, 0) != 0 {
            return false;
        }
        bpf_skb_change_tail(skb, len as u32, 0) == 0
    }
}

/// Rewrites the packet into the reject and returns the tc verdict that sends it (a redirect out
/// of the interface it came in), or None when it cannot be built (an IPv4 header with options,
/// IPv6 extension headers, a later fragment: the caller drops the packet then).
#[inline(never)]
pub fn reply(skb: *mut __sk_buff, flow: &Flow) -> Option<i32> {
    // Ethernet addresses swapped: the reply goes back to the hop the packet came from.
    let mut eth = [0u8; ETH_HLEN];
    // SAFETY: `skb` is the program's context; the buffers are the lengths passed.
    if unsafe { bpf_skb_load_bytes(skb as *const _, 0, eth.as_mut_ptr() as *mut _, 12) } != 0
        || !flow.has_l4
    {
        return None;
    }
    let mut out = [0u8; ETH_HLEN];
    out[..6].copy_from_slice(&eth[6..12]);
    out[6..12].copy_from_slice(&eth[..6]);
    eth = out;
    if flow.family == AF_INET {
        if flow.l4_off != ETH_HLEN + 20 {
            return None;
        }
        let mut p = [0u8; V4_LEN - ETH_HLEN];
        // SAFETY: as above.
        if unsafe {
            bpf_skb_load_bytes(
                skb as *const _,
                ETH_HLEN as u32,
                p[28..].as_mut_ptr() as *mut _,
                V4_QUOTE as u32,
            )
        } != 0
        {
            return None;
        }
        eth[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let total = (V4_LEN - ETH_HLEN) as u16;
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[8] = 64;
        p[9] = IPPROTO_ICMP;
        // Source: the frontend the client dialled; destination: the client.
        p[12..16].copy_from_slice(&flow.daddr[0].to_ne_bytes());
        p[16..20].copy_from_slice(&flow.saddr[0].to_ne_bytes());
        let ip_csum = fold(sum16(&p[..20], 0));
        p[10..12].copy_from_slice(&ip_csum.to_be_bytes());
        // Type 3 (destination unreachable), code 3 (port unreachable).
        p[20] = 3;
        p[21] = 3;
        let icmp_csum = fold(sum16(&p[20..], 0));
        p[22..24].copy_from_slice(&icmp_csum.to_be_bytes());
        if !resize(skb, V4_LEN) {
            return None;
        }
        // SAFETY: as above; the packet is now exactly the length written.
        unsafe {
            if bpf_skb_store_bytes(skb, 0, eth.as_ptr() as *const _, ETH_HLEN as u32, 0) != 0
                || bpf_skb_store_bytes(
                    skb,
                    ETH_HLEN as u32,
                    p.as_ptr() as *const _,
                    p.len() as u32,
                    0,
                ) != 0
            {
                return None;
            }
        }
    } else {
        if flow.l4_off != ETH_HLEN + 40 {
            return None;
        }
        let mut p = [0u8; V6_LEN - ETH_HLEN];
        // SAFETY: as above.
        if unsafe {
            bpf_skb_load_bytes(
                skb as *const _,
                ETH_HLEN as u32,
                p[48..].as_mut_ptr() as *mut _,
                V6_QUOTE as u32,
            )
        } != 0
        {
            return None;
        }
        eth[12..].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        let payload = (V6_LEN - ETH_HLEN - 40) as u16;
        p[0] = 0x60;
        p[4..6].copy_from_slice(&payload.to_be_bytes());
        p[6] = IPPROTO_ICMPV6;
        p[7] = 64;
        for i in 0..4 {
            p[8 + 4 * i..12 + 4 * i].copy_from_slice(&flow.daddr[i].to_ne_bytes());
            p[24 + 4 * i..28 + 4 * i].copy_from_slice(&flow.saddr[i].to_ne_bytes());
        }
        // Type 1 (destination unreachable), code 4 (port unreachable).
        p[40] = 1;
        p[41] = 4;
        // The pseudo-header: both addresses, the upper-layer length and next header.
        let pseudo = sum16(&p[8..40], payload as u32 + IPPROTO_ICMPV6 as u32);
        let icmp_csum = fold(sum16(&p[40..], pseudo));
        p[42..44].copy_from_slice(&icmp_csum.to_be_bytes());
        if !resize(skb, V6_LEN) {
            return None;
        }
        // SAFETY: as above.
        unsafe {
            if bpf_skb_store_bytes(skb, 0, eth.as_ptr() as *const _, ETH_HLEN as u32, 0) != 0
                || bpf_skb_store_bytes(
                    skb,
                    ETH_HLEN as u32,
                    p.as_ptr() as *const _,
                    p.len() as u32,
                    0,
                ) != 0
            {
                return None;
            }
        }
    }
    // SAFETY: `skb` is the program's context.
    let ifindex = unsafe { (*skb).ifindex };
    // Egress of the interface the packet came in on: back towards its sender.
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

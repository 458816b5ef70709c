//! Conversions between std addresses and the maps' raw network-order words.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_common::{AF_INET, AF_INET6};

pub fn to_words(a: IpAddr) -> [u32; 4] {
    match a {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

pub fn from_words(w: [u32; 4], family: u8) -> IpAddr {
    if family == AF_INET6 {
        let mut o = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(w[0].to_ne_bytes()))
    }
}

pub fn family(a: IpAddr) -> u8 {
    if a.is_ipv4() { AF_INET } else { AF_INET6 }
}

//! What external (node-facing) interfaces look like to the datapath: their addresses (NodePort
//! frontends, the SNAT source), their entries in the interfaces map, and the sysctls that let the
//! kernel forward SNATed traffic back out the interface it came in on.
use std::{collections::BTreeMap, fs, net::IpAddr};

use proxy_common::IfaceConfig;

use super::{DatapathError, maps::Maps};

/// A CIDR from `--nodeport-addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: not a CIDR"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: bad address"))?;
        let prefix: u8 = p.parse().map_err(|_| format!("{s:?}: bad prefix"))?;
        if prefix > if addr.is_ipv4() { 32 } else { 128 } {
            return Err(format!("{s:?}: prefix too long"));
        }
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, a: IpAddr) -> bool {
        let bits = |x: IpAddr| -> u128 {
            match x {
                IpAddr::V4(v) => u32::from(v) as u128,
                IpAddr::V6(v) => u128::from(v),
            }
        };
        if self.addr.is_ipv4() != a.is_ipv4() {
            return false;
        }
        let width = if a.is_ipv4() { 32 } else { 128 };
        let shift = width - self.prefix as u32;
        shift >= 128 || bits(a) >> shift == bits(self.addr) >> shift
    }
}

/// Addresses of the named interfaces (in this network namespace), by interface.
pub fn addresses(interfaces: &[String]) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ifa in addrs {
        if !interfaces.contains(&ifa.interface_name) {
            continue;
        }
        let Some(sa) = ifa.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            let ip = v6.ip();
            // Link-local addresses serve no NodePort.
            if ip.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
            IpAddr::V6(ip)
        } else {
            continue;
        };
        out.entry(ifa.interface_name.clone()).or_default().push(ip);
    }
    out
}

/// The NodePort addresses: the external interfaces' addresses, narrowed to `--nodeport-addresses`
/// when given (kube-proxy's rule).
pub fn node_addresses(by_iface: &BTreeMap<String, Vec<IpAddr>>, cidrs: &[Cidr]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = by_iface
        .values()
        .flatten()
        .copied()
        .filter(|a| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(*a)))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Makes `wanted` (ifindex -> SNAT addresses) the interfaces map's whole content.
pub fn program_interfaces(
    maps: &mut Maps,
    wanted: &BTreeMap<u32, IfaceConfig>,
) -> Result<(), DatapathError> {
    let name = proxy_common::names::INTERFACES;
    let err = |source| DatapathError::Map { name, source };
    let stale: Vec<u32> = maps
        .interfaces
        .keys()
        .flatten()
        .filter(|k| !wanted.contains_key(k))
        .collect();
    for k in stale {
        maps.interfaces.remove(&k).map_err(err)?;
    }
    for (ifindex, v) in wanted {
        let v = *v;
        if maps.interfaces.get(ifindex, 0).ok() != Some(v) {
            maps.interfaces.insert(ifindex, v, 0).map_err(err)?;
        }
    }
    Ok(())
}

/// Translated packets may arrive with this node's own address as their source (replies to a
/// NodePort, SNATed requests): the kernel must accept that when forwarding (accept_local), and
/// not answer traffic that leaves the way it came with ICMP redirects.
pub fn forwarding_sysctls(iface: &str) {
    for (key, value) in [("accept_local", "1"), ("send_redirects", "0")] {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/{key}");
        if let Err(e) = fs::write(&path, value) {
            tracing::warn!(path, error = %e, "setting a forwarding sysctl");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c: Cidr = "198.18.0.0/24".parse().unwrap();
        assert!(c.contains("198.18.0.7".parse().unwrap()));
        assert!(!c.contains("198.18.1.7".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("198.19.3.4".parse().unwrap()));
        let v6: Cidr = "fd00:18::/64".parse().unwrap();
        assert!(v6.contains("fd00:18::2".parse().unwrap()));
        assert!("198.18.0.0/33".parse::<Cidr>().is_err());
        let by = BTreeMap::from([(
            "lan0".to_string(),
            vec!["198.18.0.1".parse().unwrap(), "fd00:18::1".parse().unwrap()],
        )]);
        assert_eq!(node_addresses(&by, &[]).len(), 2);
        assert_eq!(
            node_addresses(&by, &[c]),
            vec!["198.18.0.1".parse::<IpAddr>().unwrap()]
        );
    }
}

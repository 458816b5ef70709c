//! The desired datapath state: what every frontend should translate to.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use proxy_common::ServiceKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => proxy_common::IPPROTO_TCP,
            Self::Udp => proxy_common::IPPROTO_UDP,
        }
    }
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::IPPROTO_TCP => Some(Self::Tcp),
            proxy_common::IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// Which clients a frontend entry serves (see `proxy_common::SCOPE_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Everyone (and, for externalTrafficPolicy Local, pods and host processes).
    #[default]
    Internal,
    /// Traffic entering the node from outside, for externalTrafficPolicy Local.
    External,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Self::Internal => proxy_common::SCOPE_INTERNAL,
            Self::External => proxy_common::SCOPE_EXTERNAL,
        }
    }
}

/// An address, port and protocol that clients dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol.as_str())?,
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol.as_str())?,
        }
        if self.scope == Scope::External {
            write!(f, " (external)")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointState {
    Active,
    /// Serving but terminating: used only when no endpoint is ready (kube-proxy's fallback).
    Terminating,
}

/// One backend of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub state: EndpointState,
    /// Runs on this node (external traffic to other nodes' endpoints is SNATed).
    pub local: bool,
}

/// How a frontend chooses the backend of a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbAlgorithm {
    /// Any backend, evenly (kube-proxy's choice): at random for sockets, by a hash of the
    /// tuple modulo the backend count on the per-packet path.
    #[default]
    Random,
    /// Maglev consistent hashing of the tuple (`model::maglev`): a backend change moves few
    /// flows, and every node chooses the same backend for the same tuple.
    Maglev,
}

impl LbAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Maglev => "maglev",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "random" => Some(Self::Random),
            "maglev" => Some(Self::Maglev),
            _ => None,
        }
    }
}

impl fmt::Display for LbAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// "namespace/name" of the Service this frontend belongs to: programmed whole or not at all.
    pub service: String,
    /// "namespace/name:portname" (portname omitted when empty).
    pub name: String,
    pub kind: ServiceKind,
    /// Sorted and deduplicated.
    pub endpoints: Vec<Endpoint>,
    /// Set for an externalTrafficPolicy / internalTrafficPolicy Local view whose Service has
    /// endpoints, only not on this node: with no `endpoints`, new flows are dropped (kube-proxy's
    /// "has no local endpoints" DROP) instead of rejected ("has no endpoints" REJECT).
    pub drop_without_endpoints: bool,
    /// sessionAffinity ClientIP timeout; 0 when affinity is off.
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges (load-balancer frontends only): allowed client prefixes.
    pub source_ranges: Vec<(IpAddr, u8)>,
    pub algorithm: LbAlgorithm,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, DesiredService>,
}

impl DesiredState {
    pub fn backend_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }
}

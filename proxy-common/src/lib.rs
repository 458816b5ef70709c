//! Map layouts shared by the kernel programs and the agent: one definition of every key and value.
//!
//! Every type is `#[repr(C)]` with explicit padding and no `bool`/`Option`, so the kernel and
//! userspace agree on the bytes. Addresses are `[u32; 4]` holding the raw network-order words as
//! they appear on the wire: an IPv4 address sits in word 0 with words 1..3 zero, an IPv6 address
//! fills all four. Ports are network byte order (`*_be` fields).
#![no_std]

pub mod choice;

/// The nightly toolchain used to build `proxy-ebpf` (kept in one place; `cargo xtask setup`
/// installs it and bpf-linker is built against its LLVM).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

/// Map names (at most 15 characters: the kernel truncates longer ones). The `_v1` suffix is the
/// layout version: a changed layout gets a new name instead of being migrated in place.
pub mod names {
    /// `_v2`: the key gained its address family (an IPv4 frontend and an IPv6 one whose 16
    /// address bytes coincide were one key in `svc_v1`).
    pub const SERVICES: &str = "svc_v2";
    pub const SLOTS: &str = "svc_slots_v1";
    pub const BACKENDS: &str = "backends_v1";
    pub const CONNTRACK: &str = "ct_v2";
    pub const FRAGMENTS: &str = "frag_v1";
    pub const COUNTERS: &str = "counters_v1";
    pub const SVC_NAMES: &str = "svc_names_v1";
    pub const SOCKETS: &str = "sock_v1";
    pub const INTERFACES: &str = "ifaces_v1";
    pub const AFFINITY: &str = "affinity_v1";
    pub const SOURCE_RANGES: &str = "srcranges_v1";
    pub const MAGLEV: &str = "maglev_v1";
    pub const SVC_STATS: &str = "svc_stats_v1";
    /// Every map the agent pins, in the order `status` reports them.
    pub const ALL: [&str; 13] = [
        SERVICES,
        SLOTS,
        BACKENDS,
        CONNTRACK,
        FRAGMENTS,
        COUNTERS,
        SVC_NAMES,
        SOCKETS,
        INTERFACES,
        AFFINITY,
        SOURCE_RANGES,
        MAGLEV,
        SVC_STATS,
    ];
}

/// Program names in the object file.
pub mod programs {
    pub const TC_INGRESS: &str = "tc_ingress";
    pub const XDP_INGRESS: &str = "xdp_ingress";
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// The socket-LB programs, attached to the `--cgroup` directory.
    pub const SOCK_ALL: [&str; 8] = [
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
        "sock_connect6",
        "sock_sendmsg6",
        "sock_recvmsg6",
        "sock_getpeername6",
    ];
}

/// Default capacities (overridable at load time by the agent).
pub mod limits {
    pub const SERVICES: u32 = 65_536;
    pub const SLOTS: u32 = 262_144;
    pub const BACKENDS: u32 = 262_144;
    pub const CONNTRACK: u32 = 131_072;
    pub const FRAGMENTS: u32 = 8_192;
    pub const SVC_NAMES: u32 = 65_536;
    pub const SOCKETS: u32 = 131_072;
    pub const INTERFACES: u32 = 256;
    pub const AFFINITY: u32 = 131_072;
    pub const SOURCE_RANGES: u32 = 16_384;
    /// Per-Service counters (an LRU: the Services without traffic for the longest give way).
    pub const SVC_STATS: u32 = 16_384;
    /// Source ports used when SNATing external traffic to a backend on another node: above the
    /// kernel's default ephemeral range (32768-60999) and the NodePort range.
    pub const SNAT_PORT_MIN: u16 = 61_000;
    pub const SNAT_PORT_COUNT: u16 = 4_536;
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Which clients a frontend entry is for. A Service with externalTrafficPolicy Local has two
/// entries for each external address: the external one (node-local endpoints, client source
/// kept) for traffic from outside the node, and the internal one (every endpoint) for pods and
/// host processes, which kube-proxy short-circuits to the whole Service.
pub const SCOPE_INTERNAL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// Frontend: a Service address, port and protocol as clients dial it.
///
/// `family` is part of the key: an IPv4 address is word 0 with words 1..3 zero, so without it
/// 198.18.102.1 and the IPv6 address c612:6601:: (same first four bytes, the rest zero) would
/// be one key. The first 20 bytes are `svc_v1`'s key unchanged (the migration appends the
/// family, taken from the value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    /// `SCOPE_INTERNAL` or `SCOPE_EXTERNAL`.
    pub scope: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The `svc_v1` key size (before the family), for the migration.
pub const SERVICE_KEY_V1_SIZE: usize = 20;

/// What a frontend maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub svc_id: u32,
    /// Number of backend slots (0..count) in the slots map; 0 means "no endpoints".
    pub count: u32,
    pub affinity_timeout_s: u32,
    pub flags: u16,
    /// [`ServiceKind`] as u8.
    pub kind: u8,
    pub family: u8,
}

/// `ServiceValue::flags`: only clients in the frontend's loadBalancerSourceRanges may use it.
pub const SVC_SOURCE_RANGES: u16 = 1;
/// `ServiceValue::flags`: new flows choose their backend from the frontend's Maglev table in
/// `maglev_v1` (by the same pick that otherwise chooses a slot); without a table, from the
/// slots.
pub const SVC_MAGLEV: u16 = 2;
/// `ServiceValue::flags`: with count 0, the frontend has endpoints but none on this node and an
/// externalTrafficPolicy / internalTrafficPolicy Local: new flows are dropped (kube-proxy's
/// "has no local endpoints" DROP rule), not rejected as for a Service without any endpoint.
pub const SVC_NO_LOCAL: u16 = 4;

/// A Maglev table, one per frontend in `maglev_v1` (keyed by service id): an array of
/// `MaglevPair`s read as one sequence of u32 entries: entry `MAGLEV_SIZE` holds the table size
/// M, entry `MAGLEV_FINGERPRINT` a fingerprint of the backends it was built from (for the
/// agent), and entries `MAGLEV_HEADER..MAGLEV_HEADER + M` the backend id of each table slot.
/// Each table says its own size, so tables of two sizes can coexist while
/// `--maglev-table-size` changes, each swapped in whole.
pub const MAGLEV_SIZE: u32 = 0;
pub const MAGLEV_FINGERPRINT: u32 = 1;
pub const MAGLEV_HEADER: u32 = 2;
/// Two table entries per array element: array maps store each value in 8 bytes, so single u32
/// entries would take twice the memory.
pub type MaglevPair = [u32; 2];
/// Array elements of a table of size M.
pub const fn maglev_elements(size: u32) -> u32 {
    (MAGLEV_HEADER + size).div_ceil(2)
}
/// `BPF_F_MMAPABLE` (Linux 5.5): the agent fills a new table through a memory mapping, one copy
/// instead of one update per entry.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_INNER_MAP` (Linux 5.10): on an array used as an inner map, lets the map-of-maps hold
/// arrays of any size instead of only the template's.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// Flags of every Maglev table and of the inner template (the kernel wants them equal).
pub const MAGLEV_TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

/// loadBalancerSourceRanges, in an LPM trie keyed by (service id, client prefix): the prefix
/// length counts the 32 service-id bits plus the CIDR's own.
///
/// No family field: a service id is one frontend, of one family, and only ranges of that
/// family are stored under it (the translation keeps a LoadBalancer address's ranges of its
/// own family, as kube-proxy's per-family proxiers do), and only clients of that family reach
/// it, so an IPv4 and an IPv6 prefix never share a service id. Whoever reads the trie back
/// takes a prefix's family from its frontend, not from the address words.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    pub svc_id_be: u32,
    pub addr: [u32; 4],
}

/// Service types, as reported by `status`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    ClusterIp = 1,
    NodePort = 2,
    LoadBalancer = 3,
    ExternalIp = 4,
}

impl ServiceKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::ClusterIp,
            2 => Self::NodePort,
            3 => Self::LoadBalancer,
            4 => Self::ExternalIp,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "ExternalIP",
        }
    }
}

/// (service, slot) -> backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub svc_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotValue {
    pub backend_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub backend_id: u32,
}

/// A backend: the address and port a flow is translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    /// [`BackendState`] as u8.
    pub state: u8,
    /// `BACKEND_LOCAL` when the backend runs on this node.
    pub flags: u8,
    pub _pad: [u8; 3],
}

pub const BACKEND_LOCAL: u8 = 1;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Active = 0,
    Terminating = 1,
}

/// Conntrack direction: the client's flow towards the frontend, or the backend's replies.
pub const CT_FORWARD: u8 = 0;
pub const CT_REVERSE: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub _pad: u8,
}

/// Forward entries hold the chosen backend (and its address, to notice a replaced backend);
/// reverse entries hold the frontend to restore as the reply's source. With `CT_SNAT`, the
/// forward entry's `orig_*` is the node address and port the client was SNATed to, and the
/// reverse entry's `orig_*` is the client to restore as the reply's destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub nat_addr: [u32; 4],
    pub nat_port_be: u16,
    pub flags: u16,
    pub backend_id: u32,
    pub svc_id: u32,
    pub orig_addr: [u32; 4],
    pub orig_port_be: u16,
    pub _pad: u16,
    pub last_seen_ns: u64,
    /// When the entry was created (`ct_v2`; entries rewritten from `ct_v1` carry their last-seen
    /// time): a flow's age for `proxy-agent flows`. Written once, never on the per-packet path.
    pub created_ns: u64,
}

/// The size of a conntrack value in `ct_v1`, before `created_ns`.
pub const CT_VALUE_V1_SIZE: usize = 56;

pub const CT_SNAT: u16 = 1;
/// A forward entry XDP recorded for a packet it then passed to tc (a local backend, an
/// unresolved next hop...): tc counts the flow as new when it translates that packet.
pub const CT_UNCOUNTED: u16 = 2;
/// The TCP connection of this entry (either direction) sent a FIN or a RST: the agent's
/// conntrack collector removes the entry (and frees its SNAT port) after a short idle time
/// instead of the established one. A new SYN on the tuple clears it.
pub const CT_CLOSING: u16 = 4;
/// The flow was admitted (its entries created) by the XDP program; without it, by tc. For
/// `proxy-agent flows`.
pub const CT_XDP: u16 = 8;

/// An interface the agent marked as external (node-facing), keyed by ifindex: traffic entering
/// it may be SNATed to `addr4` when its backend runs on another node. Key 0 (no interface has
/// index 0) holds the node address used for hairpin traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceConfig {
    pub addr4: u32,
    pub flags: u32,
    /// The interface's IPv6 address (zero: none), for IPv6 SNAT.
    pub addr6: [u32; 4],
}

/// sessionAffinity ClientIP: the backend a client was last sent to, per frontend. The client is
/// its address on the per-packet path, and its network namespace (a pod) for socket LB.
///
/// No family field: `svc_id` is one frontend, of one family, and the clients that reach it
/// (per-packet path and socket LB alike) have that family, so an IPv4 and an IPv6 client never
/// meet under one service id. (`kind` keeps addresses apart from namespace cookies.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_id: u32,
    /// 0: `client` is an address; 1: `client[0..2]` is a network namespace cookie.
    pub kind: u32,
    pub client: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// When a connection last used it (kube-proxy's timeout counts from the last connection).
    pub last_used_ns: u64,
}

/// IPv4 and IPv6 fragments after the first carry no ports; the first fragment records them
/// here, keyed as the receiver reassembles: (source, destination, identification, protocol).
/// IPv4 identifications are 16 bits (in the low-addressed half of `id_be`'s bytes as loaded),
/// IPv6 ones 32 (the fragment header's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub id_be: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Socket-LB state, per socket cookie: the backend a socket's frontend was sent to (forward,
/// keyed by frontend), and the frontend to show for a backend (reverse, keyed by backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    pub dir: u8,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockValue {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub svc_id: u32,
}

/// Human-readable name of a programmed frontend ("namespace/name:port"), for `status` only.
pub const SVC_NAME_LEN: usize = 124;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcName {
    pub len: u32,
    pub name: [u8; SVC_NAME_LEN],
}

impl Default for SvcName {
    fn default() -> Self {
        Self {
            len: 0,
            name: [0; SVC_NAME_LEN],
        }
    }
}

/// Per-CPU counters, one slot per outcome.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// New flow to a frontend: backend chosen, packet translated.
    TranslatedNew = 0,
    /// Packet of an established flow translated to its recorded backend.
    TranslatedEstablished = 1,
    /// Reply translated back to the frontend address.
    ReverseTranslated = 2,
    /// IP packet that matched no frontend and no reply flow.
    PassedNoMatch = 3,
    /// Not IPv4/IPv6 (ARP, ...).
    PassedNotIp = 4,
    /// Not TCP/UDP (ICMP, ...).
    PassedOtherProtocol = 5,
    /// Headers too short or malformed to parse.
    PassedMalformed = 6,
    /// A later fragment whose first fragment was not seen.
    PassedFragmentUnknown = 7,
    /// IPv6 (unused: IPv6 is translated).
    PassedIpv6 = 8,
    /// Frontend without any endpoint, and the reject (`rejected_no_backend`) could not be built
    /// (an IPv4 packet with options, a frame too short to quote...).
    DroppedNoBackend = 9,
    /// The slot or backend entry was missing (mid-update); fail closed.
    DroppedBackendMissing = 10,
    /// Conntrack insert failed; fail closed rather than lose the reply path.
    DroppedConntrackFull = 11,
    /// Rewriting the packet failed.
    DroppedRewriteFailed = 12,
    /// An established flow whose backend was removed picked a new one.
    Reselected = 13,
    /// Socket LB: connect/sendmsg to a frontend rewritten to a backend.
    SockTranslated = 14,
    /// Socket LB: recvmsg/getpeername showed the frontend instead of the backend.
    SockReverseTranslated = 15,
    /// Socket LB: connect/sendmsg to a frontend without endpoints refused.
    SockDroppedNoBackend = 16,
    /// External traffic SNATed to the node address (backend on another node).
    Snat = 17,
    /// No free SNAT port for this backend; fail closed.
    DroppedSnatPorts = 18,
    /// Client outside the frontend's loadBalancerSourceRanges.
    DroppedSourceRange = 19,
    /// ICMP error about a translated flow, translated back for the client.
    IcmpTranslated = 20,
    /// Packet of an established TCP connection whose backend was removed, still sent to it
    /// (draining; new connections no longer go there).
    TranslatedDraining = 21,
    /// Packet translated and sent out again at XDP (the counter of its translation moves too).
    XdpForwarded = 22,
    /// Packet dropped at XDP (the counter of the reason moves too).
    XdpDropped = 23,
    /// New flow to a frontend without any endpoint answered with an ICMP / ICMPv6 port
    /// unreachable sent back out the interface it came in (kube-proxy's REJECT).
    RejectedNoBackend = 24,
    /// New flow to a Local-policy frontend without a local endpoint dropped (kube-proxy's
    /// "has no local endpoints" DROP).
    DroppedNoLocalBackend = 25,
    /// Socket LB: connect/sendmsg to a frontend without any endpoint failed with ECONNREFUSED
    /// (`sock_dropped_no_backend` counts the EPERM fallback on kernels before 5.18).
    SockRejectedNoBackend = 26,
}

pub const COUNTER_COUNT: u32 = 27;

/// Per-frontend counters, per CPU, in `svc_stats_v1` keyed by service id: what `status` shows
/// per Service. Created by the datapath on a frontend's first counted event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub counts: [u64; SVC_COUNTER_COUNT],
}

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvcCounter {
    /// Packets translated towards a backend (tc and XDP; established flows included).
    Packets = 0,
    /// Replies translated back to the frontend.
    Replies = 1,
    /// New flows (tc and XDP) and sockets connected or datagrams sent (socket LB).
    NewFlows = 2,
    /// New flows rejected for want of an endpoint (ICMP port unreachable, ECONNREFUSED).
    Rejected = 3,
    /// Dropped: a Local policy without a local endpoint.
    DroppedNoLocal = 4,
    /// Dropped: client outside loadBalancerSourceRanges.
    DroppedSourceRange = 5,
    /// Dropped for resources: conntrack insert, SNAT ports, a rewrite, a backend mid-update.
    DroppedOther = 6,
}

pub const SVC_COUNTER_COUNT: usize = 7;

pub const SVC_COUNTER_NAMES: [&str; SVC_COUNTER_COUNT] = [
    "packets",
    "replies",
    "new_flows",
    "rejected",
    "dropped_no_local_backend",
    "dropped_source_range",
    "dropped_other",
];

impl SvcCounter {
    /// The per-Service counter a global drop reason adds to.
    pub fn of_drop(c: Counter) -> SvcCounter {
        match c {
            Counter::DroppedNoLocalBackend => SvcCounter::DroppedNoLocal,
            Counter::DroppedSourceRange => SvcCounter::DroppedSourceRange,
            _ => SvcCounter::DroppedOther,
        }
    }
}

pub const COUNTER_NAMES: [&str; COUNTER_COUNT as usize] = [
    "translated_new",
    "translated_established",
    "reverse_translated",
    "passed_no_match",
    "passed_not_ip",
    "passed_other_protocol",
    "passed_malformed",
    "passed_fragment_unknown",
    "passed_ipv6",
    "dropped_no_backend",
    "dropped_backend_missing",
    "dropped_conntrack_full",
    "dropped_rewrite_failed",
    "reselected",
    "sock_translated",
    "sock_reverse_translated",
    "sock_dropped_no_backend",
    "snat",
    "dropped_snat_ports",
    "dropped_source_range",
    "icmp_translated",
    "translated_draining",
    "xdp_forwarded",
    "xdp_dropped",
    "rejected_no_backend",
    "dropped_no_local_backend",
    "sock_rejected_no_backend",
];

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for SlotValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for SvcName {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockValue {}
    unsafe impl aya::Pod for IfaceConfig {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SourceRange {}
    unsafe impl aya::Pod for SvcStats {}
}

// Layout checks: both sides compile these, so a size change fails the build, not the kernel.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(core::mem::size_of::<Backend>() == 24);
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);
const _: () = assert!(core::mem::size_of::<CtValue>() == 64);
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);
const _: () = assert!(core::mem::size_of::<SvcName>() == 128);
const _: () = assert!(core::mem::size_of::<SockKey>() == 32);
const _: () = assert!(core::mem::size_of::<SockValue>() == 28);

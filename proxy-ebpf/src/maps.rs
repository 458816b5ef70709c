//! The BPF maps (BTF-defined so `bpftool map dump` shows field names), pinned by the agent.
use aya_ebpf::{
    btf_maps::{
        Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray,
        lpm_trie::Key,
    },
    macros::btf_map,
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, COUNTER_COUNT, Counter, CtKey, CtValue,
    FragKey, FragValue, IfaceConfig, MAGLEV_TABLE_FLAGS, MaglevPair, ServiceKey, ServiceValue,
    SlotKey, SlotValue, SockKey, SockValue, SourceRange, SvcCounter, SvcName, SvcStats, limits,
    maglev_elements,
};

#[btf_map(name = "svc_v2")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { limits::SERVICES as usize }> =
    HashMap::new();

#[btf_map(name = "svc_slots_v1")]
pub static SLOTS: HashMap<SlotKey, SlotValue, { limits::SLOTS as usize }> = HashMap::new();

#[btf_map(name = "backends_v1")]
pub static BACKENDS: HashMap<BackendKey, Backend, { limits::BACKENDS as usize }> = HashMap::new();

#[btf_map(name = "ct_v2")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, { limits::CONNTRACK as usize }> =
    LruHashMap::new();

#[btf_map(name = "frag_v1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue, { limits::FRAGMENTS as usize }> =
    LruHashMap::new();

#[btf_map(name = "counters_v1")]
pub static COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

/// Written and read by the agent only; defined here so it is created and pinned with the rest.
#[btf_map(name = "svc_names_v1")]
pub static SVC_NAMES: HashMap<u32, SvcName, { limits::SVC_NAMES as usize }> = HashMap::new();

#[btf_map(name = "sock_v1")]
pub static SOCKETS: LruHashMap<SockKey, SockValue, { limits::SOCKETS as usize }> =
    LruHashMap::new();

#[btf_map(name = "ifaces_v1")]
pub static INTERFACES: HashMap<u32, IfaceConfig, { limits::INTERFACES as usize }> = HashMap::new();

#[btf_map(name = "affinity_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { limits::AFFINITY as usize }> =
    LruHashMap::new();

#[btf_map(name = "srcranges_v1")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u32, { limits::SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Maglev tables, per service id (layout: `proxy_common::MAGLEV_HEADER`). The inner template
/// carries `BPF_F_INNER_MAP`, so the kernel accepts inner arrays of any size: the template is
/// fixed into the pinned outer map when it is first created, while the table size is a flag
/// (`--maglev-table-size`) that may change between agent runs. Sizing the template from the
/// flag instead would make every size change a map migration, with the tables of the old size
/// unusable until rebuilt. (Lookups in such arrays are helper calls, not inlined: the verifier
/// cannot know their bounds.) The template's own size is that of a table of the default size.
pub type MaglevTable =
    Array<MaglevPair, { maglev_elements(16_381) as usize }, { MAGLEV_TABLE_FLAGS as usize }>;

#[btf_map(name = "maglev_v1")]
pub static MAGLEV: HashOfMaps<u32, MaglevTable, { limits::SERVICES as usize }> = HashOfMaps::new();

/// Per-packet scratch space for the conntrack entries a new flow creates: the verifier gives a
/// program 512 bytes of stack along any call chain, and these would take 208 of them. Not
/// pinned: nothing outlives one program run in it.
#[repr(C)]
pub struct CtScratch {
    pub fkey: CtKey,
    pub fval: CtValue,
    pub rkey: CtKey,
    pub rval: CtValue,
}

#[btf_map(name = "ct_scratch")]
pub static CT_SCRATCH: PerCpuArray<CtScratch, 1> = PerCpuArray::new();

/// Whether `client` is in the loadBalancerSourceRanges of frontend `svc_id`.
#[inline(always)]
pub fn source_allowed(svc_id: u32, client: [u32; 4]) -> bool {
    let key = Key::new(
        32 + 128,
        SourceRange {
            svc_id_be: svc_id.to_be(),
            addr: client,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

#[btf_map(name = "svc_stats_v1")]
pub static SVC_STATS: LruPerCpuHashMap<u32, SvcStats, { limits::SVC_STATS as usize }> =
    LruPerCpuHashMap::new();

/// Adds one to counter `c` of frontend `svc_id` (0: no frontend, not counted) on this CPU, and
/// one to `NewFlows` too when `new_flow`: one lookup for both. A BPF function of its own: its
/// first value's stack frame is then a sibling of the decision's, not added to the caller's
/// (the verifier allows 512 bytes along a call chain). The value is passed by reference: by
/// value it would be copied onto the stack once more.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
pub fn count_svc(svc_id: u32, c: SvcCounter, new_flow: bool) {
    if svc_id == 0 {
        return;
    }
    if let Some(p) = SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: this CPU's value, only this CPU writes it while the program runs.
        unsafe {
            (*p).counts[c as usize] += 1;
            if new_flow {
                (*p).counts[SvcCounter::NewFlows as usize] += 1;
            }
        }
        return;
    }
    let mut first = SvcStats::default();
    first.counts[c as usize] = 1;
    if new_flow {
        first.counts[SvcCounter::NewFlows as usize] = 1;
    }
    // Two CPUs may create it at once: one of the first counts is then lost, nothing else.
    let _ = SVC_STATS.insert(svc_id, &first, 0);
}

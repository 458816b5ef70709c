//! Diffs the desired state against what the maps hold and writes only the difference, in an order
//! where a packet never sees a half-written Service: new backends, then slots, then the frontend;
//! stale slots and backends are removed last. Maglev tables are built here, off the hot path,
//! and swapped in whole (many with one map update) before their frontends point at them.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use aya::maps::MapError;
use proxy_common::{
    BACKEND_LOCAL, Backend, BackendKey, BackendState, SVC_MAGLEV, SVC_NAME_LEN, SVC_NO_LOCAL,
    SVC_SOURCE_RANGES, ServiceKey, ServiceKind, ServiceValue, SlotKey, SlotValue, SourceRange,
    SvcName, names,
};

use super::{
    DatapathError,
    addr::{family, from_words, to_words},
    maglev::{self, TableInfo},
    maps::Maps,
};
use crate::model::{
    DesiredService, DesiredState, Endpoint, EndpointState, Frontend, LbAlgorithm, Protocol, Scope,
    maglev::{
        DEFAULT_TABLE_SIZE, MaglevBackend, TableSizeError, build_table, fingerprint,
        validate_table_size,
    },
};

/// One frontend as it is programmed in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService {
    pub svc_id: u32,
    pub value: ServiceValue,
    pub name: String,
    /// Backend id per slot.
    pub slots: Vec<u32>,
}

impl ProgrammedService {
    /// How the frontend chooses backends.
    pub fn algorithm(&self) -> LbAlgorithm {
        if self.value.flags & SVC_MAGLEV != 0 {
            LbAlgorithm::Maglev
        } else {
            LbAlgorithm::Random
        }
    }
}

/// What the maps hold, read back into plain Rust (also what `status` shows).
#[derive(Clone, Debug, Default)]
pub struct Programmed {
    pub services: BTreeMap<Frontend, ProgrammedService>,
    pub backends: HashMap<u32, Backend>,
    /// loadBalancerSourceRanges entries: (service id, prefix address, prefix length).
    pub source_ranges: BTreeSet<(u32, IpAddr, u8)>,
    /// Maglev tables, by service id.
    pub tables: HashMap<u32, TableInfo>,
}

impl Programmed {
    /// Reads the maps. Entries that do not parse (unknown protocol) are skipped.
    pub fn read(maps: &Maps) -> Result<Self, DatapathError> {
        let mut out = Programmed::default();
        for item in maps.services.iter() {
            let (k, v) = item.map_err(map_err(names::SERVICES))?;
            let Some(protocol) = Protocol::from_number(k.proto) else {
                continue;
            };
            let fe = Frontend {
                addr: from_words(k.addr, k.family),
                port: u16::from_be(k.port_be),
                protocol,
                scope: if k.scope == proxy_common::SCOPE_EXTERNAL {
                    Scope::External
                } else {
                    Scope::Internal
                },
            };
            let slots = (0..v.count)
                .map(|slot| {
                    maps.slots
                        .get(
                            &SlotKey {
                                svc_id: v.svc_id,
                                slot,
                            },
                            0,
                        )
                        .map(|s| s.backend_id)
                        .unwrap_or(0)
                })
                .collect();
            let name = maps
                .names
                .get(&v.svc_id, 0)
                .map(|n| {
                    String::from_utf8_lossy(&n.name[..(n.len as usize).min(SVC_NAME_LEN)])
                        .into_owned()
                })
                .unwrap_or_default();
            out.services.insert(
                fe,
                ProgrammedService {
                    svc_id: v.svc_id,
                    value: v,
                    name,
                    slots,
                },
            );
        }
        for item in maps.backends.iter() {
            let (k, v) = item.map_err(map_err("backends_v1"))?;
            out.backends.insert(k.backend_id, v);
        }
        // A prefix has its frontend's family (see `SourceRange`): the address words cannot
        // tell an IPv6 /8 (fd00::/8) from an IPv4 /8. A prefix without a frontend is left for
        // the sync to remove; its family then does not matter (same key bytes either way).
        let families: HashMap<u32, u8> = out
            .services
            .iter()
            .map(|(fe, s)| (s.svc_id, family(fe.addr)))
            .collect();
        for key in maps.source_ranges.keys() {
            let key = key.map_err(map_err("srcranges_v1"))?;
            let d = key.data();
            let family = match families.get(&u32::from_be(d.svc_id_be)) {
                Some(f) => *f,
                None if key.prefix_len() > 32 + 32 || d.addr[1..] != [0, 0, 0] => {
                    proxy_common::AF_INET6
                }
                None => proxy_common::AF_INET,
            };
            out.source_ranges.insert((
                u32::from_be(d.svc_id_be),
                from_words(d.addr, family),
                (key.prefix_len() - 32) as u8,
            ));
        }
        out.tables = maglev::read_all(&maps.maglev).into_iter().collect();
        Ok(out)
    }

    pub fn endpoint(&self, backend_id: u32) -> Option<Endpoint> {
        let b = self.backends.get(&backend_id)?;
        Some(Endpoint {
            addr: from_words(b.addr, b.family),
            port: u16::from_be(b.port_be),
            state: if b.state == BackendState::Terminating as u8 {
                EndpointState::Terminating
            } else {
                EndpointState::Active
            },
            local: b.flags & BACKEND_LOCAL != 0,
        })
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

pub fn service_key(fe: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: to_words(fe.addr),
        port_be: fe.port.to_be(),
        proto: fe.protocol.number(),
        scope: fe.scope.number(),
        family: family(fe.addr),
        _pad: [0; 3],
    }
}

/// The trie key of one loadBalancerSourceRanges prefix. IPv4 prefixes live in word 0, so an
/// IPv4 /n is 32 + n bits and an IPv6 /n is 32 + n bits of the 128-bit address.
fn range_key(svc_id: u32, addr: IpAddr, prefix: u8) -> aya::maps::lpm_trie::Key<SourceRange> {
    aya::maps::lpm_trie::Key::new(
        32 + prefix as u32,
        SourceRange {
            svc_id_be: svc_id.to_be(),
            addr: to_words(addr),
        },
    )
}

fn backend_value(ep: &Endpoint) -> Backend {
    Backend {
        addr: to_words(ep.addr),
        port_be: ep.port.to_be(),
        family: family(ep.addr),
        state: match ep.state {
            EndpointState::Active => BackendState::Active as u8,
            EndpointState::Terminating => BackendState::Terminating as u8,
        },
        flags: if ep.local { BACKEND_LOCAL } else { 0 },
        _pad: [0; 3],
    }
}

fn svc_name(name: &str) -> SvcName {
    let mut n = SvcName::default();
    let bytes = name.as_bytes();
    let len = bytes.len().min(SVC_NAME_LEN);
    n.name[..len].copy_from_slice(&bytes[..len]);
    n.len = len as u32;
    n
}

/// An address and port (a UDP frontend as clients dial it, or a backend).
pub type AddrPort = (IpAddr, u16);

/// UDP backends that frontends lost in a sync, for ending the connected sockets that still talk
/// to them. kube-proxy clears the UDP conntrack entries of a Service's removed endpoint per
/// (Service IP and port, endpoint), even when the endpoint still serves another Service
/// (pkg/proxy/conntrack/cleanup.go, CleanStaleEntries: an entry goes when its original
/// destination is a Service port and its reply source is not among that port's endpoints).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleUdp {
    /// Backends no UDP frontend uses any more: every connected UDP socket to them ends.
    pub backends: HashSet<AddrPort>,
    /// (frontend, backend) pairs that ended while other UDP frontends still use the backend:
    /// only sockets that socket LB connected through that frontend end.
    pub pairs: HashSet<(AddrPort, AddrPort)>,
}

impl StaleUdp {
    /// What changed between the (frontend, backend) pairs of the UDP frontends before and after
    /// a sync. Frontends are (address, port): socket LB connects through the internal view, so
    /// a backend that only an external (Local) view lost is still the frontend's.
    pub fn between(
        before: &HashSet<(AddrPort, AddrPort)>,
        after: &HashSet<(AddrPort, AddrPort)>,
    ) -> Self {
        let used: HashSet<AddrPort> = after.iter().map(|(_, b)| *b).collect();
        let mut out = StaleUdp::default();
        for (fe, b) in before.difference(after) {
            if used.contains(b) {
                out.pairs.insert((*fe, *b));
            } else {
                out.backends.insert(*b);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty() && self.pairs.is_empty()
    }

    /// Whether a connected UDP socket to `peer` must end; `frontend` tells, when needed,
    /// which frontend socket LB connected it through (none: not through socket LB, or its
    /// record is gone).
    pub fn ends(&self, peer: AddrPort, frontend: impl FnOnce() -> Option<AddrPort>) -> bool {
        self.backends.contains(&peer)
            || (self.pairs.iter().any(|(_, b)| *b == peer)
                && frontend().is_some_and(|fe| self.pairs.contains(&(fe, peer))))
    }
}

/// Result of one sync.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub services: usize,
    pub backends: usize,
    pub writes: usize,
    pub deletes: usize,
    /// UDP backends frontends lost: connected sockets to them must be ended.
    pub stale_udp: StaleUdp,
    /// Maglev tables built and swapped in.
    pub tables_built: usize,
    /// Services (namespace/name) that could not be programmed, with the reason. A Service
    /// is programmed whole or not changed at all.
    pub failed: Vec<(String, String)>,
    /// Frontends (display name) programmed with another backend choice than asked, and why:
    /// Maglev with more backends than table slots falls back to random.
    pub fallbacks: Vec<(String, String)>,
}

pub struct Writer {
    maps: Maps,
    programmed: Programmed,
    next_svc_id: u32,
    next_backend_id: u32,
    maglev_table_size: u32,
    /// Frontends whose new Maglev table is built, waiting to go in with others (one map update
    /// for many tables, see `maglev::insert_all`).
    waiting: Vec<WaitingForTable>,
    /// Slots the waiting frontends will drop, still in the slots map.
    stale_slots_waiting: u64,
    /// Tables no frontend points at any more, removed together at the end of the sync.
    dropped_tables: Vec<u32>,
}

/// At most this many built tables wait (each holds a file descriptor and kernel memory).
const MAX_WAITING_TABLES: usize = 64;

/// A frontend's writes after its new table is in: point it at its new state, then drop what it
/// no longer uses.
struct AfterTable {
    fe: Frontend,
    /// "namespace/name", for failures.
    service: String,
    svc_id: u32,
    /// The frontend was not programmed before.
    new: bool,
    /// Its services map entry, when changed.
    value: Option<ServiceValue>,
    /// Its source ranges (the others go).
    ranges: BTreeSet<(u32, IpAddr, u8)>,
    /// It no longer has a Maglev table.
    drop_table: bool,
    stale_slots: std::ops::Range<u32>,
    stale_backends: Vec<u32>,
}

struct WaitingForTable {
    table: maglev::Table,
    info: TableInfo,
    after: AfterTable,
}

impl Writer {
    /// Adopts whatever the maps already hold (after an agent restart), so the first sync
    /// only writes the difference and ids stay stable.
    pub fn adopt(maps: Maps) -> Result<Self, DatapathError> {
        let programmed = Programmed::read(&maps)?;
        let next_svc_id = programmed
            .services
            .values()
            .map(|s| s.svc_id)
            .max()
            .unwrap_or(0)
            + 1;
        let next_backend_id = programmed.backends.keys().copied().max().unwrap_or(0) + 1;
        Ok(Self {
            maps,
            programmed,
            next_svc_id,
            next_backend_id,
            maglev_table_size: DEFAULT_TABLE_SIZE,
            waiting: Vec::new(),
            stale_slots_waiting: 0,
            dropped_tables: Vec::new(),
        })
    }

    /// The size of the Maglev tables built from now on (`--maglev-table-size`). Tables of
    /// another size are rebuilt at the next sync.
    pub fn set_maglev_table_size(&mut self, size: u32) -> Result<(), TableSizeError> {
        validate_table_size(size)?;
        self.maglev_table_size = size;
        Ok(())
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    pub fn programmed(&self) -> &Programmed {
        &self.programmed
    }

    /// Re-reads the maps, so the next sync repairs anything changed behind the agent's back.
    pub fn reread(&mut self) -> Result<(), DatapathError> {
        self.programmed = Programmed::read(&self.maps)?;
        Ok(())
    }

    fn alloc_svc_id(&mut self) -> u32 {
        let id = self.next_svc_id;
        self.next_svc_id = self.next_svc_id.wrapping_add(1).max(1);
        id
    }

    fn alloc_backend_id(&mut self) -> u32 {
        let id = self.next_backend_id;
        self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
        id
    }

    /// Brings the maps to `desired`. A frontend whose writes fail is reported and left as it
    /// was (or absent, if new); the others are still programmed.
    /// (frontend, endpoint) of every programmed UDP frontend.
    fn udp_pairs(&self) -> HashSet<(AddrPort, AddrPort)> {
        self.programmed
            .services
            .iter()
            .filter(|(fe, _)| fe.protocol == Protocol::Udp)
            .flat_map(|(fe, s)| s.slots.iter().map(move |id| (fe, id)))
            .filter_map(|(fe, id)| {
                let e = self.programmed.endpoint(*id)?;
                Some(((fe.addr, fe.port), (e.addr, e.port)))
            })
            .collect()
    }

    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        let mut report = SyncReport::default();
        let udp_before = self.udp_pairs();
        // Removals first: they free room for what is added.
        let stale: Vec<Frontend> = self
            .programmed
            .services
            .keys()
            .filter(|fe| !desired.services.contains_key(fe))
            .copied()
            .collect();
        for fe in stale {
            if let Err(e) = self.remove_service(&fe, &mut report) {
                report.failed.push((fe.to_string(), e.to_string()));
            }
        }
        // Whole Services at a time; those already programmed first, so that new ones past
        // capacity can never push out what works.
        let mut groups: BTreeMap<(bool, &str), Vec<(&Frontend, &DesiredService)>> = BTreeMap::new();
        for (fe, ds) in &desired.services {
            groups
                .entry((false, ds.service.as_str()))
                .or_default()
                .push((fe, ds));
        }
        let groups: BTreeMap<(bool, &str), Vec<_>> = groups
            .into_iter()
            .map(|((_, name), members)| {
                let is_new = members
                    .iter()
                    .all(|(fe, _)| !self.programmed.services.contains_key(fe));
                ((is_new, name), members)
            })
            .collect();
        // Counted once and kept up to date: summing per Service made large syncs quadratic.
        let mut used_slots: u64 = self
            .programmed
            .services
            .values()
            .map(|s| s.slots.len() as u64)
            .sum();
        let slots_of = |w: &Self, fe: &Frontend| {
            w.programmed
                .services
                .get(fe)
                .map_or(0, |s| s.slots.len() as u64)
        };
        for ((_, name), members) in groups {
            let mut fits = self.fits(&members, used_slots + self.stale_slots_waiting);
            if fits.is_err() && !self.waiting.is_empty() {
                // What the waiting frontends drop may make room.
                self.enter_tables(&mut report);
                fits = self.fits(&members, used_slots);
            }
            if let Err(reason) = fits {
                report.failed.push((name.to_string(), reason));
                continue;
            }
            for (fe, ds) in members {
                let before = slots_of(self, fe);
                if let Err(e) = self.sync_service(fe, ds, &mut report) {
                    report.failed.push((name.to_string(), format!("{fe}: {e}")));
                }
                used_slots = used_slots + slots_of(self, fe) - before;
                if self.waiting.len() >= MAX_WAITING_TABLES {
                    self.enter_tables(&mut report);
                }
            }
        }
        self.enter_tables(&mut report);
        // Source ranges of frontends that no longer exist.
        let live: HashSet<u32> = self
            .programmed
            .services
            .values()
            .map(|s| s.svc_id)
            .collect();
        let dead: BTreeSet<u32> = self
            .programmed
            .source_ranges
            .iter()
            .map(|r| r.0)
            .filter(|id| !live.contains(id))
            .collect();
        for id in dead {
            self.remove_ranges(id, &BTreeSet::new(), &mut report);
        }
        // Tables of frontends that no longer exist (left by a crash).
        let dead: Vec<u32> = self
            .programmed
            .tables
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in dead {
            self.remove_table(id, &mut report);
        }
        // Backends no frontend references (left by a crash or a hand edit).
        let used: HashSet<u32> = self
            .programmed
            .services
            .values()
            .flat_map(|s| s.slots.iter().copied())
            .collect();
        let orphans: Vec<u32> = self
            .programmed
            .backends
            .keys()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        for id in orphans {
            if self
                .maps
                .backends
                .remove(&BackendKey { backend_id: id })
                .is_ok()
            {
                report.deletes += 1;
            }
            self.programmed.backends.remove(&id);
        }
        let dropped = std::mem::take(&mut self.dropped_tables);
        maglev::remove_all(&self.maps.maglev_outer, &mut self.maps.maglev, &dropped);
        if !report.failed.is_empty() {
            // Partial writes leave the maps consistent but our picture stale: read them back.
            if let Err(e) = self.reread() {
                tracing::error!(error = %e, "re-reading maps after a failed sync");
            }
        }
        report.services = self.programmed.services.len();
        report.backends = self.programmed.backends.len();
        report.stale_udp = StaleUdp::between(&udp_before, &self.udp_pairs());
        report
    }

    /// Whether a Service's frontends fit in the maps next to everything programmed now.
    fn fits(
        &self,
        members: &[(&Frontend, &DesiredService)],
        used_slots: u64,
    ) -> Result<(), String> {
        let (mut services, mut slots, mut backends) = (0u64, 0u64, 0u64);
        for (fe, ds) in members {
            let old = self.programmed.services.get(fe);
            if old.is_none() {
                services += 1;
            }
            let old_slots = old.map(|o| o.slots.as_slice()).unwrap_or(&[]);
            slots += (ds.endpoints.len() as u64).saturating_sub(old_slots.len() as u64);
            let kept: HashSet<(IpAddr, u16)> = old_slots
                .iter()
                .filter_map(|id| self.programmed.endpoint(*id))
                .map(|e| (e.addr, e.port))
                .collect();
            backends += ds
                .endpoints
                .iter()
                .filter(|e| !kept.contains(&(e.addr, e.port)))
                .count() as u64;
        }
        let cap = self.maps.capacity;
        let checks = [
            (
                names::SERVICES,
                self.programmed.services.len() as u64,
                services,
                cap.services,
            ),
            ("svc_slots_v1", used_slots, slots, cap.slots),
            (
                "backends_v1",
                self.programmed.backends.len() as u64,
                backends,
                cap.backends,
            ),
        ];
        for (map, used, need, max) in checks {
            if used + need > max as u64 {
                return Err(format!(
                    "does not fit: needs {need} more entries in {map}, which holds {used} of {max}"
                ));
            }
        }
        Ok(())
    }

    fn sync_service(
        &mut self,
        fe: &Frontend,
        ds: &DesiredService,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        let old = self.programmed.services.get(fe).cloned();
        let svc_id = match &old {
            Some(o) => o.svc_id,
            None => self.alloc_svc_id(),
        };
        // Keep the id of every endpoint that stays, so established flows keep their backend.
        let mut old_ids: HashMap<(IpAddr, u16), u32> = HashMap::new();
        for id in old.iter().flat_map(|o| o.slots.iter()) {
            if let Some(ep) = self.programmed.endpoint(*id) {
                old_ids.insert((ep.addr, ep.port), *id);
            }
        }
        let mut slots = Vec::with_capacity(ds.endpoints.len());
        for ep in &ds.endpoints {
            let id = match old_ids.get(&(ep.addr, ep.port)) {
                Some(id) => *id,
                None => self.alloc_backend_id(),
            };
            let value = backend_value(ep);
            if self.programmed.backends.get(&id) != Some(&value) {
                self.maps
                    .backends
                    .insert(BackendKey { backend_id: id }, value, 0)
                    .map_err(map_err("backends_v1"))?;
                self.programmed.backends.insert(id, value);
                report.writes += 1;
            }
            slots.push(id);
        }
        let old_slots = old.as_ref().map(|o| o.slots.as_slice()).unwrap_or(&[]);
        for (slot, id) in slots.iter().enumerate() {
            if old_slots.get(slot) != Some(id) {
                self.maps
                    .slots
                    .insert(
                        SlotKey {
                            svc_id,
                            slot: slot as u32,
                        },
                        SlotValue { backend_id: *id },
                        0,
                    )
                    .map_err(map_err("svc_slots_v1"))?;
                report.writes += 1;
            }
        }
        if old.as_ref().map(|o| o.name.as_str()) != Some(ds.name.as_str()) {
            self.maps
                .names
                .insert(svc_id, svc_name(&ds.name), 0)
                .map_err(map_err("svc_names_v1"))?;
            report.writes += 1;
        }
        let ranges: BTreeSet<(u32, IpAddr, u8)> = ds
            .source_ranges
            .iter()
            .map(|(a, p)| (svc_id, *a, *p))
            .collect();
        for (id, a, p) in ranges.difference(&self.programmed.source_ranges.clone()) {
            if *id == svc_id {
                self.maps
                    .source_ranges
                    .insert(&range_key(*id, *a, *p), 1, 0)
                    .map_err(map_err("srcranges_v1"))?;
                self.programmed.source_ranges.insert((*id, *a, *p));
                report.writes += 1;
            }
        }
        // A Maglev table of M slots cannot give each of more than M backends a slot: such a
        // frontend is programmed with the random choice over all its slots instead (kube-proxy
        // has no per-Service endpoint limit, so it is served, not rejected).
        let maglev = ds.algorithm == LbAlgorithm::Maglev;
        let too_many = maglev && slots.len() > self.maglev_table_size as usize;
        if too_many {
            report.fallbacks.push((
                ds.name.clone(),
                format!(
                    "maglev: {} backends exceed the {}-slot Maglev table; random choice instead",
                    slots.len(),
                    self.maglev_table_size
                ),
            ));
        }
        let maglev = maglev && !too_many;
        let table = if maglev && !slots.is_empty() {
            self.changed_table(svc_id, &ds.endpoints, &slots)?
        } else {
            None
        };
        let mut flags = 0;
        if !ranges.is_empty() {
            flags |= SVC_SOURCE_RANGES;
        }
        if maglev {
            flags |= SVC_MAGLEV;
        }
        if ds.drop_without_endpoints {
            flags |= SVC_NO_LOCAL;
        }
        let value = ServiceValue {
            svc_id,
            count: slots.len() as u32,
            affinity_timeout_s: ds.affinity_timeout_s,
            flags,
            kind: ds.kind as u8,
            family: family(fe.addr),
        };
        let keep: HashSet<u32> = slots.iter().copied().collect();
        let after = AfterTable {
            fe: *fe,
            service: ds.service.clone(),
            svc_id,
            new: old.is_none(),
            value: (old.as_ref().map(|o| o.value) != Some(value)).then_some(value),
            ranges,
            drop_table: !maglev || slots.is_empty(),
            stale_slots: slots.len() as u32..old_slots.len() as u32,
            stale_backends: old_slots
                .iter()
                .filter(|id| !keep.contains(id))
                .copied()
                .collect(),
        };
        let programmed = ProgrammedService {
            svc_id,
            value,
            name: ds.name.clone(),
            slots,
        };
        match table {
            // The frontend is pointed at its new table (or at its new backend count) only once
            // the table is complete and in: a packet sees either the old table or the new one.
            Some((table, info)) => {
                self.stale_slots_waiting += after.stale_slots.len() as u64;
                self.programmed.services.insert(*fe, programmed);
                self.waiting.push(WaitingForTable { table, info, after });
            }
            None => {
                self.point(&after, report)?;
                self.programmed.services.insert(*fe, programmed);
            }
        }
        Ok(())
    }

    /// Points a frontend at its new state, then drops what it no longer uses.
    fn point(&mut self, after: &AfterTable, report: &mut SyncReport) -> Result<(), DatapathError> {
        let svc_id = after.svc_id;
        if let Some(value) = after.value {
            self.maps
                .services
                .insert(service_key(&after.fe), value, 0)
                .map_err(map_err(names::SERVICES))?;
            report.writes += 1;
        }
        self.remove_ranges(svc_id, &after.ranges, report);
        if after.drop_table {
            self.remove_table(svc_id, report);
        }
        for slot in after.stale_slots.clone() {
            let _ = self.maps.slots.remove(&SlotKey { svc_id, slot });
            report.deletes += 1;
        }
        for id in &after.stale_backends {
            let _ = self.maps.backends.remove(&BackendKey { backend_id: *id });
            self.programmed.backends.remove(id);
            report.deletes += 1;
        }
        Ok(())
    }

    /// Puts the waiting tables in (one batch), then points their frontends at them. A frontend
    /// whose table does not go in keeps its old state (a new one is taken out again), and is
    /// reported.
    fn enter_tables(&mut self, report: &mut SyncReport) {
        let waiting = std::mem::take(&mut self.waiting);
        self.stale_slots_waiting = 0;
        let tables: Vec<(u32, &maglev::Table)> =
            waiting.iter().map(|w| (w.after.svc_id, &w.table)).collect();
        let failed: HashMap<u32, MapError> =
            maglev::insert_all(&self.maps.maglev_outer, &mut self.maps.maglev, &tables)
                .into_iter()
                .collect();
        for w in &waiting {
            let after = &w.after;
            let done = match failed.get(&after.svc_id) {
                Some(e) => Err(format!("map maglev_v1: {e}")),
                None => {
                    self.programmed.tables.insert(after.svc_id, w.info);
                    report.writes += 1;
                    report.tables_built += 1;
                    self.point(after, report).map_err(|e| e.to_string())
                }
            };
            if let Err(e) = done {
                report
                    .failed
                    .push((after.service.clone(), format!("{}: {e}", after.fe)));
                if after.new {
                    self.take_out(&after.fe, report);
                }
            }
        }
    }

    /// Removes what was written for a new frontend that could not be completed.
    fn take_out(&mut self, fe: &Frontend, report: &mut SyncReport) {
        let Some(p) = self.programmed.services.remove(fe) else {
            return;
        };
        let _ = self.maps.services.remove(&service_key(fe));
        for slot in 0..p.slots.len() as u32 {
            let _ = self.maps.slots.remove(&SlotKey {
                svc_id: p.svc_id,
                slot,
            });
        }
        for id in &p.slots {
            let _ = self.maps.backends.remove(&BackendKey { backend_id: *id });
            self.programmed.backends.remove(id);
        }
        let _ = self.maps.names.remove(&p.svc_id);
        self.remove_ranges(p.svc_id, &BTreeSet::new(), report);
        self.remove_table(p.svc_id, report);
    }

    fn remove_service(
        &mut self,
        fe: &Frontend,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        let Some(old) = self.programmed.services.get(fe).cloned() else {
            return Ok(());
        };
        // Frontend first, so no new packet looks up slots that are about to go.
        match self.maps.services.remove(&service_key(fe)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(DatapathError::Map {
                    name: names::SERVICES,
                    source,
                });
            }
        }
        report.deletes += 1;
        for slot in 0..old.slots.len() as u32 {
            let _ = self.maps.slots.remove(&SlotKey {
                svc_id: old.svc_id,
                slot,
            });
            report.deletes += 1;
        }
        for id in &old.slots {
            let _ = self.maps.backends.remove(&BackendKey { backend_id: *id });
            self.programmed.backends.remove(id);
            report.deletes += 1;
        }
        let _ = self.maps.names.remove(&old.svc_id);
        self.remove_ranges(old.svc_id, &BTreeSet::new(), report);
        self.remove_table(old.svc_id, report);
        self.programmed.services.remove(fe);
        Ok(())
    }

    /// A new Maglev table for `svc_id`, built off the hot path, unless the programmed one was
    /// built from the same backends (identity address:port, value the backend id) and size.
    fn changed_table(
        &self,
        svc_id: u32,
        endpoints: &[Endpoint],
        ids: &[u32],
    ) -> Result<Option<(maglev::Table, TableInfo)>, DatapathError> {
        let backends: Vec<MaglevBackend> = endpoints
            .iter()
            .zip(ids)
            .map(|(ep, id)| MaglevBackend::new(SocketAddr::new(ep.addr, ep.port).to_string(), *id))
            .collect();
        let size = self.maglev_table_size;
        let info = TableInfo {
            size,
            fingerprint: fingerprint(&backends, size),
        };
        if self.programmed.tables.get(&svc_id) == Some(&info) {
            return Ok(None);
        }
        let table = maglev::create(&build_table(&backends, size), info.fingerprint)
            .map_err(map_err("maglev_v1"))?;
        Ok(Some((table, info)))
    }

    /// Forgets the Maglev table of `svc_id`, if it has one; it leaves the map at the end of the
    /// sync, with the others, when no frontend points at it.
    fn remove_table(&mut self, svc_id: u32, report: &mut SyncReport) {
        if self.programmed.tables.remove(&svc_id).is_some() {
            self.dropped_tables.push(svc_id);
            report.deletes += 1;
        }
    }

    /// Removes the source-range entries of `svc_id` that are not in `keep`.
    fn remove_ranges(
        &mut self,
        svc_id: u32,
        keep: &BTreeSet<(u32, IpAddr, u8)>,
        report: &mut SyncReport,
    ) {
        let stale: Vec<(u32, IpAddr, u8)> = self
            .programmed
            .source_ranges
            .iter()
            .filter(|r| r.0 == svc_id && !keep.contains(r))
            .copied()
            .collect();
        for (id, a, p) in stale {
            let _ = self.maps.source_ranges.remove(&range_key(id, a, p));
            self.programmed.source_ranges.remove(&(id, a, p));
            report.deletes += 1;
        }
    }
}

/// `ServiceKind` as stored, for display.
pub fn kind_str(v: &ServiceValue) -> &'static str {
    ServiceKind::from_u8(v.kind)
        .map(|k| k.as_str())
        .unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ap(s: &str) -> AddrPort {
        let a: SocketAddr = s.parse().unwrap();
        (a.ip(), a.port())
    }

    /// Issue 16 bug 3: an endpoint leaving Service A while it still backs Service B ends A's
    /// sockets to it (through A), not B's; one no frontend uses ends every socket to it.
    #[test]
    fn stale_udp_is_per_frontend_and_backend() {
        let (a, b, c) = (
            ap("198.18.100.1:53"),
            ap("198.18.100.2:53"),
            ap("198.18.100.3:53"),
        );
        let (shared, only_c, other) = (
            ap("198.19.1.2:5353"),
            ap("198.19.1.3:5353"),
            ap("198.19.1.4:5353"),
        );
        let before = HashSet::from([(a, shared), (a, other), (b, shared), (c, only_c)]);
        let after = HashSet::from([(a, other), (b, shared)]);
        let stale = StaleUdp::between(&before, &after);
        assert_eq!(stale.backends, HashSet::from([only_c]));
        assert_eq!(stale.pairs, HashSet::from([(a, shared)]));
        assert!(
            stale.ends(shared, || Some(a)),
            "A's socket to the shared one"
        );
        assert!(!stale.ends(shared, || Some(b)), "B's socket keeps it");
        assert!(!stale.ends(shared, || None), "a direct socket keeps it");
        assert!(
            stale.ends(only_c, || None),
            "nobody's backend: every socket"
        );
        assert!(!stale.ends(other, || panic!("not asked")), "kept by A");
        assert!(StaleUdp::between(&after, &after).is_empty());
    }
}

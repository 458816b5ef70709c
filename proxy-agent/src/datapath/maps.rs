//! Typed handles on the pinned maps, opened by path so the writer, `status` and tests share them.
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use proxy_common::{
    Backend, BackendKey, COUNTER_COUNT, COUNTER_NAMES, CtKey, FragKey, ServiceKey, ServiceValue,
    SlotKey, SlotValue, SvcName, names,
};

use super::DatapathError;

/// Capacities of the maps the writer fills.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub services: u32,
    pub slots: u32,
    pub backends: u32,
}

pub struct Maps {
    pub capacity: Capacity,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, SlotValue>,
    pub backends: HashMap<MapData, BackendKey, Backend>,
    pub names: HashMap<MapData, u32, SvcName>,
    pub interfaces: HashMap<MapData, u32, proxy_common::IfaceConfig>,
    pub source_ranges: aya::maps::LpmTrie<MapData, proxy_common::SourceRange, u32>,
    pub maglev: super::maglev::Tables,
    /// `maglev_v1` again, for batch operations.
    pub maglev_outer: MapData,
}

pub fn pin_path(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join(name)
}

fn open(bpffs: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let data = MapData::from_pin(pin_path(bpffs, name))
        .map_err(|source| DatapathError::Map { name, source })?;
    Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    bpffs: &Path,
    name: &'static str,
) -> Result<T, DatapathError> {
    T::try_from(open(bpffs, name)?).map_err(|source| DatapathError::Map { name, source })
}

fn max_entries(bpffs: &Path, name: &'static str) -> Result<u32, DatapathError> {
    let data = MapData::from_pin(pin_path(bpffs, name))
        .map_err(|source| DatapathError::Map { name, source })?;
    Ok(data
        .info()
        .map_err(|source| DatapathError::Map { name, source })?
        .max_entries())
}

impl Maps {
    pub fn open(bpffs: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            capacity: Capacity {
                services: max_entries(bpffs, names::SERVICES)?,
                slots: max_entries(bpffs, names::SLOTS)?,
                backends: max_entries(bpffs, names::BACKENDS)?,
            },
            services: typed(bpffs, names::SERVICES)?,
            slots: typed(bpffs, names::SLOTS)?,
            backends: typed(bpffs, names::BACKENDS)?,
            names: typed(bpffs, names::SVC_NAMES)?,
            interfaces: typed(bpffs, names::INTERFACES)?,
            source_ranges: typed(bpffs, names::SOURCE_RANGES)?,
            maglev: typed(bpffs, names::MAGLEV)?,
            maglev_outer: MapData::from_pin(pin_path(bpffs, names::MAGLEV)).map_err(|source| {
                DatapathError::Map {
                    name: names::MAGLEV,
                    source,
                }
            })?,
        })
    }
}

/// The maps for a CLI command, with a hint when the agent is not there.
pub fn open_for_cli(bpffs: &Path) -> anyhow::Result<Maps> {
    Maps::open(bpffs).map_err(|e| {
        anyhow::anyhow!(
            "{e} (is the agent running with --bpffs {}?)",
            bpffs.display()
        )
    })
}

/// An LRU hash map (conntrack, sockets, affinity) opened from its pin.
pub fn lru<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let err = |source| DatapathError::Map { name, source };
    let data = MapData::from_pin(pin_path(bpffs, name)).map_err(err)?;
    HashMap::try_from(Map::LruHashMap(data)).map_err(err)
}

/// Per-frontend counters (`svc_stats_v1`), summed over CPUs, by service id. Frontends without
/// traffic yet (or evicted from the LRU) are missing.
pub fn read_svc_stats(
    bpffs: &Path,
) -> Result<std::collections::HashMap<u32, proxy_common::SvcStats>, DatapathError> {
    let name = names::SVC_STATS;
    let err = |source| DatapathError::Map { name, source };
    let data = MapData::from_pin(pin_path(bpffs, name)).map_err(err)?;
    let m: aya::maps::PerCpuHashMap<MapData, u32, proxy_common::SvcStats> =
        aya::maps::PerCpuHashMap::try_from(Map::PerCpuLruHashMap(data)).map_err(err)?;
    Ok(m.iter()
        .filter_map(Result::ok)
        .map(|(id, per_cpu)| {
            let mut sum = proxy_common::SvcStats::default();
            for v in per_cpu.iter() {
                for (s, c) in sum.counts.iter_mut().zip(v.counts) {
                    *s += c;
                }
            }
            (id, sum)
        })
        .collect())
}

/// Sum of each per-CPU counter, in `COUNTER_NAMES` order.
pub fn read_counters(bpffs: &Path) -> Result<Vec<(&'static str, u64)>, DatapathError> {
    let name = names::COUNTERS;
    let arr: PerCpuArray<MapData, u64> = typed(bpffs, name)?;
    (0..COUNTER_COUNT)
        .map(|i| {
            let v = arr
                .get(&i, 0)
                .map_err(|source| DatapathError::Map { name, source })?;
            Ok((COUNTER_NAMES[i as usize], v.iter().sum()))
        })
        .collect()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

fn count_keys<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &'static str,
) -> Result<u64, DatapathError> {
    let m: HashMap<MapData, K, V> = typed(bpffs, name)?;
    Ok(m.keys().filter(|k| k.is_ok()).count() as u64)
}

/// Entries and capacity of every pinned map.
pub fn usage(bpffs: &Path) -> Result<Vec<MapUsage>, DatapathError> {
    let mut out = Vec::new();
    for name in names::ALL {
        let max_entries = max_entries(bpffs, name)?;
        let entries = match name {
            names::SERVICES => count_keys::<ServiceKey, ServiceValue>(bpffs, name)?,
            names::SLOTS => count_keys::<SlotKey, SlotValue>(bpffs, name)?,
            names::BACKENDS => count_keys::<BackendKey, Backend>(bpffs, name)?,
            names::CONNTRACK => count_keys::<CtKey, proxy_common::CtValue>(bpffs, name)?,
            names::FRAGMENTS => count_keys::<FragKey, proxy_common::FragValue>(bpffs, name)?,
            names::SVC_NAMES => count_keys::<u32, SvcName>(bpffs, name)?,
            names::SOCKETS => {
                count_keys::<proxy_common::SockKey, proxy_common::SockValue>(bpffs, name)?
            }
            names::INTERFACES => count_keys::<u32, proxy_common::IfaceConfig>(bpffs, name)?,
            names::SOURCE_RANGES => {
                let m: aya::maps::LpmTrie<MapData, proxy_common::SourceRange, u32> =
                    typed(bpffs, name)?;
                m.keys().filter(|k| k.is_ok()).count() as u64
            }
            names::MAGLEV => {
                let m: super::maglev::Tables = typed(bpffs, name)?;
                m.keys().filter(|k| k.is_ok()).count() as u64
            }
            names::SVC_STATS => read_svc_stats(bpffs)?.len() as u64,
            names::AFFINITY => {
                count_keys::<proxy_common::AffinityKey, proxy_common::AffinityValue>(bpffs, name)?
            }
            // An array: every slot always exists.
            _ => max_entries as u64,
        };
        out.push(MapUsage {
            name,
            entries,
            max_entries,
        });
    }
    Ok(out)
}

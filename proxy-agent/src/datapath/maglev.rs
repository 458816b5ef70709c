//! Maglev tables in the kernel: one inner array per frontend in `maglev_v1`, created and filled
//! by the agent while packets still use the old one, then swapped in with one map update.
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    maps::{Array, HashOfMaps, IterableMap as _, MapData, MapError},
    sys::SyscallError,
};
use proxy_common::{BPF_F_INNER_MAP, MAGLEV_FINGERPRINT, MAGLEV_HEADER, MAGLEV_SIZE};

use super::loader::bpf;

/// The outer map: service id -> table.
pub type Tables = HashOfMaps<MapData, u32, Array<MapData, u32>>;

/// What a programmed table says about itself (its header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableInfo {
    /// M: the number of table slots after the header.
    pub size: u32,
    /// `model::maglev::fingerprint` of the backends the table was built from.
    pub fingerprint: u32,
}

/// The header of every table in `tables`, by service id. Tables that cannot be read are left
/// out (the writer then builds them again).
pub fn read_all(tables: &Tables) -> Vec<(u32, TableInfo)> {
    let ids: Vec<u32> = tables.keys().filter_map(Result::ok).collect();
    ids.into_iter()
        .filter_map(|id| Some((id, read(tables, id)?)))
        .collect()
}

fn read(tables: &Tables, svc_id: u32) -> Option<TableInfo> {
    let table = tables.get(&svc_id, 0).ok()?;
    Some(TableInfo {
        size: table.get(&MAGLEV_SIZE, 0).ok()?,
        fingerprint: table.get(&MAGLEV_FINGERPRINT, 0).ok()?,
    })
}

/// A new table holding `slots` (backend ids) behind its header, not yet in any outer map, so
/// no program sees it half filled.
pub fn create(slots: &[u32], fingerprint: u32) -> Result<Array<MapData, u32>, MapError> {
    let size = slots.len() as u32;
    let mut values = Vec::with_capacity(slots.len() + MAGLEV_HEADER as usize);
    values.extend([0; MAGLEV_HEADER as usize]);
    values[MAGLEV_SIZE as usize] = size;
    values[MAGLEV_FINGERPRINT as usize] = fingerprint;
    values.extend_from_slice(slots);
    // The flags must equal the inner template's (`proxy-ebpf` maps.rs) for the kernel to take
    // the array into the outer map.
    let mut table = Array::<MapData, u32>::create(MAGLEV_HEADER + size, BPF_F_INNER_MAP)?;
    if fill_batch(table.map(), &values).is_err() {
        // BPF_MAP_UPDATE_BATCH on arrays needs Linux 5.6; one update per slot otherwise.
        for (i, v) in values.iter().enumerate() {
            table.set(i as u32, v, 0)?;
        }
    }
    Ok(table)
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes `values` to entries `0..values.len()` in one BPF_MAP_UPDATE_BATCH.
fn fill_batch(map: &MapData, values: &[u32]) -> Result<(), MapError> {
    let keys: Vec<u32> = (0..values.len() as u32).collect();
    let fd = map.fd().as_fd().as_raw_fd();
    // struct { __u64 in_batch, out_batch, keys, values; __u32 count, map_fd;
    //          __u64 elem_flags, flags; } batch;
    let mut attr = [0u64; 16];
    attr[2] = keys.as_ptr() as u64;
    attr[3] = values.as_ptr() as u64;
    attr[4] = values.len() as u64 | (fd as u32 as u64) << 32;
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)
        .map(|_| ())
        .map_err(|io_error| {
            MapError::SyscallError(SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            })
        })
}

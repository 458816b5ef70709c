//! Maglev tables in the kernel: one inner array per frontend in `maglev_v1`, created and filled
//! by the agent while packets still use the old one, then swapped in with one map update.
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use aya::{
    maps::{Array, HashOfMaps, IterableMap as _, MapData, MapError},
    sys::SyscallError,
};
use proxy_common::{
    MAGLEV_FINGERPRINT, MAGLEV_HEADER, MAGLEV_SIZE, MAGLEV_TABLE_FLAGS, MaglevPair, maglev_elements,
};

use super::loader::bpf;

/// The outer map: service id -> table.
pub type Tables = HashOfMaps<MapData, u32, Table>;
/// One table (see `proxy_common::MAGLEV_HEADER`).
pub type Table = Array<MapData, MaglevPair>;

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
    let entry = |i: u32| Some(table.get(&(i / 2), 0).ok()?[(i % 2) as usize]);
    Some(TableInfo {
        size: entry(MAGLEV_SIZE)?,
        fingerprint: entry(MAGLEV_FINGERPRINT)?,
    })
}

/// A new table holding `slots` (backend ids) behind its header, not yet in any outer map, so
/// no program sees it half filled.
pub fn create(slots: &[u32], fingerprint: u32) -> Result<Table, MapError> {
    let size = slots.len() as u32;
    let elements = maglev_elements(size);
    let mut entries = vec![0u32; 2 * elements as usize];
    entries[MAGLEV_SIZE as usize] = size;
    entries[MAGLEV_FINGERPRINT as usize] = fingerprint;
    entries[MAGLEV_HEADER as usize..][..slots.len()].copy_from_slice(slots);
    // The flags must equal the inner template's (`proxy-ebpf` maps.rs) for the kernel to take
    // the array into the outer map.
    let mut table = Table::create(elements, MAGLEV_TABLE_FLAGS)?;
    let fd = table.map().fd().as_fd();
    if fill_mapped(fd, &entries).is_err() && update_batch(fd, &entries, elements).is_err() {
        for (i, pair) in entries.chunks_exact(2).enumerate() {
            table.set(i as u32, [pair[0], pair[1]], 0)?;
        }
    }
    Ok(table)
}

fn syscall_err(call: &'static str) -> impl FnOnce(std::io::Error) -> MapError {
    move |io_error| MapError::SyscallError(SyscallError { call, io_error })
}

/// Copies `entries` into a `BPF_F_MMAPABLE` array through a shared mapping: the array's values
/// are 8 bytes each, exactly one `MaglevPair`, so the mapping is the u32 sequence itself.
fn fill_mapped(fd: BorrowedFd, entries: &[u32]) -> Result<(), MapError> {
    let len = std::mem::size_of_val(entries);
    // SAFETY: a fresh mapping of the whole array (its size rounded up to pages by the kernel),
    // written within `len` bytes and unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(syscall_err("mmap")(std::io::Error::last_os_error()));
        }
        std::ptr::copy_nonoverlapping(entries.as_ptr(), p.cast::<u32>(), entries.len());
        libc::munmap(p, len);
    }
    Ok(())
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// bpf_attr for BPF_MAP_*_BATCH: `struct { __u64 in_batch, out_batch, keys, values;
/// __u32 count, map_fd; __u64 elem_flags, flags; }`.
fn batch_attr(map: BorrowedFd, keys: *const u32, values: *const u32, count: usize) -> [u64; 16] {
    let mut attr = [0u64; 16];
    attr[2] = keys as u64;
    attr[3] = values as u64;
    attr[4] = count as u64 | (map.as_raw_fd() as u32 as u64) << 32;
    attr
}

/// Writes `values` (u32 sequences of the map's value size) to keys `0..count` in one
/// BPF_MAP_UPDATE_BATCH (Linux 5.6 for arrays).
fn update_batch(map: BorrowedFd, values: &[u32], count: u32) -> Result<(), MapError> {
    let keys: Vec<u32> = (0..count).collect();
    let mut attr = batch_attr(map, keys.as_ptr(), values.as_ptr(), keys.len());
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)
        .map(|_| ())
        .map_err(syscall_err("bpf_map_update_batch"))
}

/// Swaps in several tables with one BPF_MAP_UPDATE_BATCH on the outer map. The kernel waits
/// for running programs to finish after every map-of-maps update (an RCU grace period, about
/// 12 ms on the test machines), and recent kernels wait once per batch (measured on 6.18: 50
/// tables in 12 ms; older ones wait per element, no worse than single updates). Without
/// batches, one update each.
pub fn insert_all(
    outer: &MapData,
    tables: &mut Tables,
    new: &[(u32, &Table)],
) -> Vec<(u32, MapError)> {
    let keys: Vec<u32> = new.iter().map(|(id, _)| *id).collect();
    let fds: Vec<u32> = new
        .iter()
        .map(|(_, t)| t.map().fd().as_fd().as_raw_fd() as u32)
        .collect();
    let fd = outer.fd().as_fd();
    let mut attr = batch_attr(fd, keys.as_ptr(), fds.as_ptr(), keys.len());
    if new.is_empty() || bpf(BPF_MAP_UPDATE_BATCH, &mut attr).is_ok() {
        return Vec::new();
    }
    // Part of the batch may be in: the rest one by one (an update of a present key is fine).
    new.iter()
        .filter_map(|(id, t)| tables.insert(*id, *t, 0).err().map(|e| (*id, e)))
        .collect()
}

/// Removes the tables of `ids` with one BPF_MAP_DELETE_BATCH (one wait, as for inserts), or
/// one by one. Absent ones are ignored.
pub fn remove_all(outer: &MapData, tables: &mut Tables, ids: &[u32]) {
    if ids.is_empty() {
        return;
    }
    let fd = outer.fd().as_fd();
    let mut attr = batch_attr(fd, ids.as_ptr(), std::ptr::null(), ids.len());
    if bpf(BPF_MAP_DELETE_BATCH, &mut attr).is_err() {
        // A missing key stops the batch: the rest one by one.
        for id in ids {
            let _ = tables.remove(id);
        }
    }
}

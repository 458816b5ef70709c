//! Map layout changes across agent upgrades and restarts. A pinned map whose shape (key size,
//! value size, capacity) differs from what this agent's programs need cannot be reused: it is
//! moved aside, a new map is created under the pinned name, and entries are copied across when
//! their layout is unchanged (a resize). The old programs keep using the old maps until the new
//! programs replace them inside the pinned links; entries the old programs added meanwhile are
//! copied once more after that, then the old maps are released. A layout that changed its
//! key or value gets a new versioned name (`_v2`) instead; such maps start empty and are
//! rebuilt from the desired state, unless their old entries can be rewritten into the new
//! layout (`rekey`): the services map is, so that a restarted agent adopts the same service
//! ids, and through them the backend ids its conntrack entries hold (rebuilding would give
//! every backend a new id and send established flows elsewhere).
use std::{
    fs, io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use proxy_common::{
    Backend, BackendKey, COUNTER_COUNT, CT_VALUE_V1_SIZE, CtKey, CtValue, FragKey, FragValue,
    SERVICE_KEY_V1_SIZE, ServiceKey, ServiceValue, SlotKey, SlotValue, SockKey, SockValue, SvcName,
    limits, names,
};

use super::loader::{MapSizes, bpf, obj_get};

/// Prefix of a map moved aside, inside the bpffs directory
/// (bpffs refuses names with dots.)
const ASIDE: &str = "old_";

/// (key size, value size, capacity) this agent's programs need for `name`.
pub fn wanted_shape(name: &str, sizes: MapSizes) -> Option<(u32, u32, u32)> {
    use std::mem::size_of;
    let s = |k: usize, v: usize, max: u32| Some((k as u32, v as u32, max));
    match name {
        names::SERVICES => s(
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            sizes.services,
        ),
        names::SVC_NAMES => s(4, size_of::<SvcName>(), sizes.services),
        names::SLOTS => s(size_of::<SlotKey>(), size_of::<SlotValue>(), sizes.backends),
        names::BACKENDS => s(
            size_of::<BackendKey>(),
            size_of::<Backend>(),
            sizes.backends,
        ),
        names::CONNTRACK => s(size_of::<CtKey>(), size_of::<CtValue>(), sizes.conntrack),
        names::FRAGMENTS => s(
            size_of::<FragKey>(),
            size_of::<FragValue>(),
            limits::FRAGMENTS,
        ),
        names::COUNTERS => s(4, 8, COUNTER_COUNT),
        names::SOCKETS => s(
            size_of::<SockKey>(),
            size_of::<SockValue>(),
            limits::SOCKETS,
        ),
        // service id -> inner map.
        names::MAGLEV => s(4, 4, sizes.services),
        _ => None,
    }
}

/// The new (key, value) of an old entry of another layout version.
type Rekey = fn(&[u8], &[u8]) -> (Vec<u8>, Vec<u8>);

/// `svc_v1` -> `svc_v2`: the key gained the address family after its 20 bytes, and the value
/// already held it.
fn service_key_with_family(key: &[u8], value: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut k = key.to_vec();
    k.resize(std::mem::size_of::<ServiceKey>(), 0);
    k[SERVICE_KEY_V1_SIZE] = value[std::mem::offset_of!(ServiceValue, family)];
    (k, value.to_vec())
}

/// `ct_v1` -> `ct_v2`: the value gained `created_ns` after its 56 bytes; a flow of the older
/// layout is taken as created when it was last seen (its true start is not known).
fn conntrack_value_with_created(key: &[u8], value: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let last_seen = std::mem::offset_of!(CtValue, last_seen_ns);
    let mut v = value.to_vec();
    v.extend_from_slice(&value[last_seen..last_seen + 8]);
    (key.to_vec(), v)
}

/// How the entries of `file`, a map of an older layout version of `name`, become entries of
/// `name`, if they can: by the key and value sizes of the old map.
fn rekey_of(name: &str, file: &str, old: (u32, u32)) -> Option<Rekey> {
    let svc_v1 = (
        SERVICE_KEY_V1_SIZE as u32,
        std::mem::size_of::<ServiceValue>() as u32,
    );
    let ct_v1 = (std::mem::size_of::<CtKey>() as u32, CT_VALUE_V1_SIZE as u32);
    match (name, file) {
        (names::SERVICES, "svc_v1") if old == svc_v1 => Some(service_key_with_family as Rekey),
        (names::CONNTRACK, "ct_v1") if old == ct_v1 => Some(conntrack_value_with_created as Rekey),
        _ => None,
    }
}

/// A map being replaced: the old one (moved aside) and the new one's pin.
#[derive(Debug)]
pub struct Replaced {
    pub name: &'static str,
    old: PathBuf,
    new: PathBuf,
    /// Entries can be copied (same key and value layout).
    copy: bool,
    /// Entries can be rewritten into the new layout (another layout version).
    rekey: Option<Rekey>,
}

/// Maps replaced by this start; finished once the new programs are attached.
#[derive(Debug, Default)]
pub struct Migration {
    pub replaced: Vec<Replaced>,
}

/// Before loading: moves aside every pinned map whose shape differs from what is wanted (and
/// resumes any move an interrupted agent left behind).
pub fn prepare(bpffs: &Path, sizes: MapSizes) -> io::Result<Migration> {
    let mut m = Migration::default();
    for name in names::ALL {
        let Some((key, value, max)) = wanted_shape(name, sizes) else {
            continue;
        };
        let pin = bpffs.join(name);
        let old = bpffs.join(format!("{ASIDE}{name}"));
        let shape = |p: &Path| -> Option<(u32, u32, u32)> {
            let info = MapData::from_pin(p).ok()?.info().ok()?;
            Some((info.key_size(), info.value_size(), info.max_entries()))
        };
        if old.exists() {
            // An earlier agent stopped half way: finish its move.
            let copy = shape(&old).is_some_and(|(k, v, _)| (k, v) == (key, value));
            if pin.exists() && shape(&pin) != Some((key, value, max)) {
                fs::remove_file(&pin)?;
            }
            m.replaced.push(Replaced {
                name,
                old,
                new: pin,
                copy,
                rekey: None,
            });
            continue;
        }
        let Some(have) = shape(&pin) else {
            continue;
        };
        if have == (key, value, max) {
            continue;
        }
        let copy = (have.0, have.1) == (key, value);
        tracing::warn!(
            map = name,
            have = ?have,
            want = ?(key, value, max),
            entries = if copy { "copied" } else { "rebuilt" },
            "pinned map has another shape; replacing it"
        );
        fs::rename(&pin, &old)?;
        m.replaced.push(Replaced {
            name,
            old,
            new: pin,
            copy,
            rekey: None,
        });
    }
    // Maps of another layout version (`ct_v0` beside `ct_v1`): their key or value changed, so
    // nothing is copied; they are released with the rest once the new programs run.
    // Some can be rewritten into the new layout instead.
    for e in fs::read_dir(bpffs)?.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(name) = newer_version_of(&file) {
            let old = MapData::from_pin(e.path())
                .ok()
                .and_then(|m| m.info().ok())
                .map(|i| (i.key_size(), i.value_size()));
            let rekey = old.and_then(|o| rekey_of(name, &file, o));
            tracing::warn!(
                old = %file,
                new = name,
                entries = if rekey.is_some() { "rewritten" } else { "rebuilt" },
                "map of an older layout"
            );
            m.replaced.push(Replaced {
                name,
                old: e.path(),
                new: bpffs.join(name),
                copy: false,
                rekey,
            });
        }
    }
    Ok(m)
}

/// `ct_v0` -> `ct_v1`: the current name of a map pinned under another layout version.
pub fn newer_version_of(file: &str) -> Option<&'static str> {
    let (base, version) = file.rsplit_once("_v")?;
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    names::ALL
        .into_iter()
        .find(|n| *n != file && n.rsplit_once("_v").is_some_and(|(b, _)| b == base))
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;

/// Opens a map by id (BPF_MAP_GET_FD_BY_ID).
fn map_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = id as u64;
    let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}
const BPF_NOEXIST: u64 = 1;

fn elem_attr(fd: &OwnedFd, key: &[u8], value_or_next: &mut [u8], flags: u64) -> [u64; 16] {
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u32 as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value_or_next.as_mut_ptr() as u64;
    attr[3] = flags;
    attr
}

/// Copies every entry of `from` into `to` (both with `key`/`value` sizes, or with the keys
/// `rekey` makes); with `keep_newer`, entries already in `to` win. Returns how many were
/// written.
fn copy_entries(
    from: &Path,
    to: &Path,
    keep_newer: bool,
    rekey: Option<Rekey>,
) -> io::Result<usize> {
    let info = MapData::from_pin(from)
        .and_then(|m| m.info())
        .map_err(io::Error::other)?;
    let (ks, vs) = (info.key_size() as usize, info.value_size() as usize);
    // A map of maps reads back inner map ids but is written with inner map fds.
    let of_maps = matches!(
        info.map_type(),
        Ok(aya::maps::MapType::HashOfMaps | aya::maps::MapType::ArrayOfMaps)
    );
    let (src, dst) = (obj_get(from)?, obj_get(to)?);
    let mut key = vec![0u8; ks];
    let mut next = vec![0u8; ks];
    let mut value = vec![0u8; vs];
    let mut first = true;
    let mut copied = 0;
    loop {
        // A null key pointer asks for the first key.
        let mut attr = elem_attr(&src, &key, &mut next, 0);
        if first {
            attr[1] = 0;
        }
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        first = false;
        key.copy_from_slice(&next);
        let mut attr = elem_attr(&src, &key, &mut value, 0);
        if bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).is_err() {
            continue; // evicted meanwhile
        }
        let _inner = if of_maps {
            let id = u32::from_ne_bytes(value[..4].try_into().expect("4-byte value"));
            let Ok(fd) = map_fd_by_id(id) else {
                continue; // replaced meanwhile
            };
            value[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
            Some(fd)
        } else {
            None
        };
        let flags = if keep_newer { BPF_NOEXIST } else { 0 };
        let mut rewritten = rekey.map(|f| f(&key, &value));
        let (k, v): (&[u8], &mut [u8]) = match rewritten.as_mut() {
            Some((k, v)) => (k.as_slice(), v.as_mut_slice()),
            None => (key.as_slice(), value.as_mut_slice()),
        };
        let mut attr = elem_attr(&dst, k, v, flags);
        match bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
            Ok(_) => copied += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            // A smaller new map: LRU maps evict, hash maps refuse; either way move on.
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(copied)
}

impl Migration {
    /// After loading, before the new programs run: bring the old entries across.
    pub fn copy(&self) -> io::Result<()> {
        for r in self
            .replaced
            .iter()
            .filter(|r| r.copy && r.name != names::COUNTERS)
        {
            let n = copy_entries(&r.old, &r.new, false, None)?;
            tracing::info!(map = r.name, entries = n, "copied entries into the new map");
        }
        // The services map only once: the programs never write it, and a second pass would
        // bring back what the first sync removed (conntrack, which they write, again in
        // `finish`).
        // Entries already in the new map win: an agent stopped before it released the old map
        // had already written them (what this brings back beside them, its sync removes).
        for r in &self.replaced {
            if let Some(rekey) = r.rekey {
                let n = copy_entries(&r.old, &r.new, true, Some(rekey))?;
                tracing::info!(
                    map = r.name,
                    entries = n,
                    "rewrote entries of the older layout into the new map"
                );
            }
        }
        Ok(())
    }

    /// After the new programs replaced the old ones in every link: copy what the old programs
    /// added meanwhile, then release the old maps.
    pub fn finish(self) -> io::Result<()> {
        for r in &self.replaced {
            // The old programs kept writing conntrack entries of the older layout until the
            // new ones took their links: rewrite those too (entries already there win).
            if let Some(rekey) = r.rekey.filter(|_| r.name == names::CONNTRACK) {
                let n = copy_entries(&r.old, &r.new, true, Some(rekey))?;
                tracing::info!(
                    map = r.name,
                    entries = n,
                    "rewrote late entries of the older layout into the new map"
                );
            }
            if r.copy && r.name != names::COUNTERS {
                let n = copy_entries(&r.old, &r.new, true, None)?;
                tracing::info!(
                    map = r.name,
                    entries = n,
                    "copied late entries into the new map"
                );
            }
            fs::remove_file(&r.old)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_layout_versions_are_recognised() {
        assert_eq!(newer_version_of("ct_v0"), Some(names::CONNTRACK));
        assert_eq!(newer_version_of("svc_slots_v7"), Some(names::SLOTS));
        assert_eq!(newer_version_of("ct_v2"), None, "the current one");
        assert_eq!(newer_version_of("ct_v1"), Some(names::CONNTRACK));
        assert_eq!(newer_version_of("links"), None);
        assert_eq!(newer_version_of("old_ct_v2"), None);
        assert_eq!(newer_version_of("ct_vx"), None);
        assert_eq!(newer_version_of("svc_v1"), Some(names::SERVICES));
    }

    /// An IPv6 `svc_v1` entry becomes the `svc_v2` key of the same frontend, family and all;
    /// nothing else is rewritten.
    #[test]
    fn services_v1_entries_get_their_family() {
        use proxy_common::{AF_INET6, IPPROTO_UDP, SCOPE_EXTERNAL};
        let fe = ServiceKey {
            addr: [0xc612_6601, 0, 7, 9],
            port_be: 53u16.to_be(),
            proto: IPPROTO_UDP,
            scope: SCOPE_EXTERNAL,
            family: AF_INET6,
            _pad: [0; 3],
        };
        let value = ServiceValue {
            svc_id: 7,
            count: 2,
            family: AF_INET6,
            ..Default::default()
        };
        let bytes = |p: *const u8, n: usize| unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
        let new_key = bytes((&fe as *const ServiceKey).cast(), size_of::<ServiceKey>());
        let value = bytes(
            (&value as *const ServiceValue).cast(),
            size_of::<ServiceValue>(),
        );
        let old_key = &new_key[..SERVICE_KEY_V1_SIZE];
        let rekey = rekey_of(names::SERVICES, "svc_v1", (20, 16)).expect("svc_v1 is rewritten");
        assert_eq!(rekey(old_key, &value), (new_key, value.clone()));
        assert!(rekey_of(names::SERVICES, "svc_v1", (20, 12)).is_none());
        assert!(rekey_of(names::CONNTRACK, "ct_v0", (36, 32)).is_none());
    }

    #[test]
    fn conntrack_v1_entries_take_their_last_seen_time_as_created() {
        let v = CtValue {
            backend_id: 3,
            svc_id: 9,
            flags: proxy_common::CT_SNAT,
            last_seen_ns: 0x1122_3344_5566_7788,
            created_ns: 0x1122_3344_5566_7788,
            ..Default::default()
        };
        let bytes = unsafe {
            std::slice::from_raw_parts((&v as *const CtValue).cast::<u8>(), size_of::<CtValue>())
        }
        .to_vec();
        let key = vec![7u8; size_of::<CtKey>()];
        let rekey = rekey_of(names::CONNTRACK, "ct_v1", (40, 56)).expect("ct_v1 is rewritten");
        assert_eq!(
            rekey(&key, &bytes[..CT_VALUE_V1_SIZE]),
            (key.clone(), bytes)
        );
        assert!(rekey_of(names::CONNTRACK, "ct_v1", (40, 48)).is_none());
    }
}

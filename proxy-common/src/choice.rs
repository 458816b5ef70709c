//! Backend choice: the one definition of how a new flow picks its backend, compiled into the
//! kernel programs (which read the maps through helpers) and into `proxy-agent explain` (which
//! reads the pinned maps from userspace). Both call these functions with their own map access
//! behind [`LbMaps`], so explain cannot drift from what the datapath does.
use crate::{MAGLEV_HEADER, MAGLEV_SIZE, SVC_MAGLEV, ServiceValue};

/// Read access to the maps a backend choice looks at.
pub trait LbMaps {
    /// One frontend's Maglev table.
    type Table: MaglevEntries;
    /// The Maglev table of frontend `svc_id`, if one is programmed.
    fn maglev(&self, svc_id: u32) -> Option<Self::Table>;
    /// The backend id in slot `slot` of frontend `svc_id`.
    fn slot(&self, svc_id: u32, slot: u32) -> Option<u32>;
}

/// A Maglev table read as one sequence of u32 entries (`MAGLEV_HEADER` layout).
pub trait MaglevEntries {
    fn entry(&self, index: u32) -> Option<u32>;
}

/// Where a choice came from, for `explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Slot `index` of the frontend's Maglev table of `size` slots.
    Maglev { index: u32, size: u32 },
    /// Slot `index` of the frontend's `count` backend slots.
    Slot { index: u32, count: u32 },
}

/// The backend id `pick` chooses for frontend `svc`, and how. A Maglev frontend takes the
/// backend of table slot `pick % M` (so a backend change moves few flows, and the same tuple
/// finds the same backend on every node); any other, or one whose table is missing or
/// unreadable, slot `pick % count`.
#[inline(always)]
pub fn backend_for<M: LbMaps>(maps: &M, svc: &ServiceValue, pick: u32) -> Option<(u32, Pick)> {
    if svc.flags & SVC_MAGLEV != 0
        && let Some(found) = maglev_backend(maps, svc.svc_id, pick)
    {
        return Some(found);
    }
    // `checked_rem`: no panic path for the verifier to reject, even where the compiler cannot
    // see the caller's check for zero.
    let index = pick.checked_rem(svc.count)?;
    let id = maps.slot(svc.svc_id, index)?;
    Some((
        id,
        Pick::Slot {
            index,
            count: svc.count,
        },
    ))
}

/// The table says its own size, so a table swapped for one of another size is read
/// consistently.
#[inline(always)]
fn maglev_backend<M: LbMaps>(maps: &M, svc_id: u32, pick: u32) -> Option<(u32, Pick)> {
    let table = maps.maglev(svc_id)?;
    let size = table.entry(MAGLEV_SIZE)?;
    let index = pick.checked_rem(size)?;
    let id = table.entry(MAGLEV_HEADER + index)?;
    Some((id, Pick::Maglev { index, size }))
}

/// sessionAffinity ClientIP: a remembered backend still holds while the client's connections
/// come less than the frontend's timeout apart (kube-proxy's `recent --rcheck --seconds`).
#[inline(always)]
pub fn affinity_live(now_ns: u64, last_used_ns: u64, timeout_s: u32) -> bool {
    now_ns.wrapping_sub(last_used_ns) <= timeout_s as u64 * 1_000_000_000
}

/// MurmurHash3 (x86_32) of a flow's 5-tuple (addresses as `[u32; 4]` words, ports in network
/// order): the per-packet path's `pick`. It chooses backends by this hash rather than at
/// random: the choice is as even over many flows, and a flow whose conntrack entries were
/// evicted (LRU pressure) finds the same backend again, as long as the Service's backends did
/// not change, and carries on (Katran does the same with Maglev). The seed is fixed so that
/// this holds across agent restarts and upgrades.
#[inline(always)]
pub fn flow_hash(
    saddr: &[u32; 4],
    daddr: &[u32; 4],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    #[inline(always)]
    fn mix(h: u32, k: u32) -> u32 {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let mut h = 0x5eed_1e55;
    for i in 0..4 {
        h = mix(h, saddr[i]);
        h = mix(h, daddr[i]);
    }
    h = mix(h, ((sport_be as u32) << 16) | dport_be as u32);
    h = mix(h, proto as u32);
    h ^= 37;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        table: Option<[u32; 6]>,
        slots: [u32; 3],
    }
    struct T([u32; 6]);
    impl MaglevEntries for T {
        fn entry(&self, i: u32) -> Option<u32> {
            self.0.get(i as usize).copied()
        }
    }
    impl LbMaps for Fake {
        type Table = T;
        fn maglev(&self, _: u32) -> Option<T> {
            self.table.map(T)
        }
        fn slot(&self, _: u32, slot: u32) -> Option<u32> {
            self.slots.get(slot as usize).copied()
        }
    }

    fn svc(flags: u16, count: u32) -> ServiceValue {
        ServiceValue {
            svc_id: 7,
            count,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn slots_by_pick_modulo_count() {
        let m = Fake {
            table: None,
            slots: [10, 11, 12],
        };
        assert_eq!(
            backend_for(&m, &svc(0, 3), 7),
            Some((11, Pick::Slot { index: 1, count: 3 }))
        );
        assert_eq!(backend_for(&m, &svc(0, 0), 7), None);
    }

    #[test]
    fn maglev_table_first_and_slots_without_one() {
        // size 4, fingerprint 99, entries 20..23
        let with = Fake {
            table: Some([4, 99, 20, 21, 22, 23]),
            slots: [10, 11, 12],
        };
        assert_eq!(
            backend_for(&with, &svc(SVC_MAGLEV, 3), 6),
            Some((22, Pick::Maglev { index: 2, size: 4 }))
        );
        // Not a Maglev frontend: the table is not looked at.
        assert_eq!(backend_for(&with, &svc(0, 3), 6).unwrap().0, 10);
        // A Maglev frontend whose table is missing, or says size 0, falls back to the slots.
        let without = Fake {
            table: None,
            slots: [10, 11, 12],
        };
        assert_eq!(backend_for(&without, &svc(SVC_MAGLEV, 3), 6).unwrap().0, 10);
        let empty = Fake {
            table: Some([0, 0, 0, 0, 0, 0]),
            slots: [10, 11, 12],
        };
        assert_eq!(backend_for(&empty, &svc(SVC_MAGLEV, 3), 6).unwrap().0, 10);
    }

    #[test]
    fn affinity_holds_within_the_timeout() {
        assert!(affinity_live(10_000_000_000, 0, 10));
        assert!(!affinity_live(10_000_000_001, 0, 10));
    }

    #[test]
    fn flow_hash_is_murmur3_of_the_tuple_and_stable() {
        // 198.19.50.50:14649 -> 198.18.100.10:80/TCP. Pinned: a change would move every hashed
        // flow to another backend at the next upgrade.
        let (c, v) = ([0x3232_13c6, 0, 0, 0], [0x0a64_12c6, 0, 0, 0]);
        let a = flow_hash(&c, &v, 0x3939, 0x5000, 6);
        assert_eq!(a, 137_862_442);
        assert_ne!(a, flow_hash(&c, &v, 0x3a39, 0x5000, 6));
        assert_ne!(a, flow_hash(&c, &v, 0x3939, 0x5000, 17));
    }
}

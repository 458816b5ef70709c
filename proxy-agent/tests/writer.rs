//! The map writer against real kernel maps: incremental writes, stable ids across restarts,
//! drift repair, and capacity limits that never disturb what is programmed.
use std::{net::IpAddr, path::PathBuf};

use aya::Ebpf;
use proxy_agent::{
    datapath::{
        loader::{self, MapSizes},
        maps::Maps,
        writer::{Writer, service_key},
    },
    model::{
        DesiredService, DesiredState, Endpoint, EndpointState, Frontend, LbAlgorithm, Protocol,
    },
};
use proxy_common::{ServiceKind, names};

struct Bed {
    _ebpf: Ebpf,
    bpffs: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.bpffs);
    }
}

fn bed(sizes: MapSizes) -> Bed {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "needs root (cargo xtask test)"
    );
    let bpffs = PathBuf::from(format!(
        "/sys/fs/bpf/pxwr-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let ebpf = loader::load(&bpffs, sizes).unwrap_or_else(|e| {
        let _ = loader::cleanup(&bpffs);
        panic!("load datapath: {e:?}")
    });
    Bed { _ebpf: ebpf, bpffs }
}

fn writer(b: &Bed) -> Writer {
    Writer::adopt(Maps::open(&b.bpffs).unwrap()).unwrap()
}

/// `n` Services "svc-i", each with `ports` frontends on 198.18.100.i and `eps` endpoints.
fn state(n: u8, ports: u16, eps: u8) -> DesiredState {
    let mut d = DesiredState::default();
    for i in 1..=n {
        for p in 0..ports {
            d.services.insert(
                Frontend {
                    addr: IpAddr::from([198, 18, 100, i]),
                    port: 80 + p,
                    protocol: Protocol::Tcp,
                    scope: Default::default(),
                },
                DesiredService {
                    drop_without_endpoints: false,
                    service: format!("test/svc-{i}"),
                    name: format!("test/svc-{i}:p{p}"),
                    kind: ServiceKind::ClusterIp,
                    endpoints: (1..=eps)
                        .map(|e| Endpoint {
                            addr: IpAddr::from([198, 19, i, e]),
                            port: 8080 + p,
                            state: EndpointState::Active,
                            local: false,
                        })
                        .collect(),
                    affinity_timeout_s: 0,
                    source_ranges: Vec::new(),
                    algorithm: Default::default(),
                },
            );
        }
    }
    d
}

fn backend_ids(w: &Writer) -> Vec<(Frontend, Vec<u32>)> {
    w.programmed()
        .services
        .iter()
        .map(|(f, s)| (*f, s.slots.clone()))
        .collect()
}

#[test]
fn writes_only_the_difference_and_keeps_ids_across_restarts() {
    let b = bed(MapSizes::default());
    let mut w = writer(&b);
    let want = state(3, 2, 3);
    let r = w.sync(&want);
    assert!(r.failed.is_empty());
    // 6 frontends: 6 service entries + 6 names + 18 slots + 18 backends.
    assert_eq!(
        (r.services, r.backends, r.writes, r.deletes),
        (6, 18, 48, 0)
    );
    assert_eq!(w.sync(&want).writes, 0, "nothing changed, nothing written");

    // One endpoint replaced in one frontend: one backend, one slot; the old backend removed.
    let mut changed = want.clone();
    let fe = *changed.services.keys().next().unwrap();
    changed.services.get_mut(&fe).unwrap().endpoints[1].addr = IpAddr::from([198, 19, 9, 9]);
    let before = backend_ids(&w);
    let r = w.sync(&changed);
    assert_eq!((r.writes, r.deletes), (2, 1), "{r:?}");
    let after = backend_ids(&w);
    assert_eq!(
        before[0].1[0], after[0].1[0],
        "unchanged endpoints keep their ids"
    );
    assert_eq!(before[1..], after[1..], "other frontends untouched");

    // A restarted agent adopts the maps: same ids, nothing to write.
    drop(w);
    let mut w = writer(&b);
    assert_eq!(backend_ids(&w), after);
    assert_eq!(w.sync(&changed).writes, 0);
}

#[test]
fn full_reconciliation_repairs_drift() {
    let b = bed(MapSizes::default());
    let mut w = writer(&b);
    let want = state(2, 1, 2);
    w.sync(&want);
    let ids = backend_ids(&w);
    // Delete a frontend behind the agent's back, as an operator with bpftool could.
    let mut maps = Maps::open(&b.bpffs).unwrap();
    let key = service_key(&Frontend {
        addr: IpAddr::from([198, 18, 100, 1]),
        port: 80,
        protocol: Protocol::Tcp,
        scope: Default::default(),
    });
    maps.services.remove(&key).unwrap();
    // Without re-reading, the writer believes all is well.
    assert_eq!(w.sync(&want).writes, 0);
    w.reread().unwrap();
    let r = w.sync(&want);
    assert!(r.writes >= 1, "{r:?}");
    assert!(maps.services.get(&key, 0).is_ok(), "frontend restored");
    // The untouched frontend keeps its backends; the restored one gets fresh ids for the same
    // endpoints (its slots were unreachable once its entry was gone) and orphans are removed.
    let now = backend_ids(&w);
    assert_eq!(now[1], ids[1]);
    assert_eq!(now[0].1.len(), 2);
    let p = w.programmed();
    let eps =
        |slots: &[u32]| -> Vec<_> { slots.iter().map(|id| p.endpoint(*id).unwrap()).collect() };
    assert_eq!(
        eps(&now[0].1),
        want.services.values().next().unwrap().endpoints
    );
    assert_eq!(p.backends.len(), 4, "no orphaned backends left");
}

#[test]
fn services_past_capacity_are_reported_and_leave_the_rest_intact() {
    // 5 service entries: svc-1 and svc-2 (2 ports each) fit, svc-3 (2 ports) would need 6.
    let b = bed(MapSizes {
        services: 5,
        backends: 64,
        conntrack: 64,
    });
    let mut w = writer(&b);
    let r = w.sync(&state(2, 2, 2));
    assert!(r.failed.is_empty(), "{r:?}");
    let programmed = backend_ids(&w);

    let r = w.sync(&state(3, 2, 2));
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].0, "test/svc-3");
    assert!(r.failed[0].1.contains(names::SERVICES), "{}", r.failed[0].1);
    assert_eq!(backend_ids(&w), programmed, "programmed Services untouched");
    assert!(
        !w.programmed()
            .services
            .values()
            .any(|s| s.name.starts_with("test/svc-3")),
        "no half-programmed Service"
    );

    // Too many endpoints for the backend map: reported the same way.
    let mut big = state(2, 2, 2);
    big.services.values_mut().next().unwrap().endpoints = (1..=70)
        .map(|e| Endpoint {
            addr: IpAddr::from([198, 19, 50, e]),
            port: 80,
            state: EndpointState::Active,
            local: false,
        })
        .collect();
    let r = w.sync(&big);
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(
        backend_ids(&w),
        programmed,
        "the grown Service keeps its old programming"
    );

    // Once room is made, the waiting Service is programmed.
    let r = w.sync(
        &state(3, 2, 2)
            .services
            .into_iter()
            .skip(2)
            .collect::<DesiredStateMap>()
            .0,
    );
    assert!(r.failed.is_empty(), "{r:?}");
}

/// Collects frontends into a DesiredState.
struct DesiredStateMap(DesiredState);

impl FromIterator<(Frontend, DesiredService)> for DesiredStateMap {
    fn from_iter<T: IntoIterator<Item = (Frontend, DesiredService)>>(iter: T) -> Self {
        DesiredStateMap(DesiredState {
            services: iter.into_iter().collect(),
        })
    }
}

/// A Maglev table is built when its frontend's backend set (or the table size) changes and
/// at no other sync, is adopted by a restarted agent without a rebuild, and goes with its
/// frontend, its last endpoint or its algorithm.
#[test]
fn maglev_tables_are_rebuilt_only_when_their_backends_change() {
    let b = bed(MapSizes::default());
    let maps = Maps::open(&b.bpffs).unwrap();
    let tables_in_map = || maps.maglev.keys().filter_map(Result::ok).count();
    let mut w = writer(&b);
    // svc-1 Maglev, svc-2 random.
    let mut want = state(2, 1, 3);
    let fe1 = *want.services.keys().next().unwrap();
    want.services.get_mut(&fe1).unwrap().algorithm = LbAlgorithm::Maglev;
    let r = w.sync(&want);
    assert_eq!((r.failed.len(), r.tables_built), (0, 1), "{r:?}");
    assert_eq!(tables_in_map(), 1);
    let svc_id = w.programmed().services[&fe1].svc_id;
    let size = |w: &Writer| w.programmed().tables.get(&svc_id).map(|t| t.size);
    assert_eq!(size(&w), Some(16381));
    assert_eq!(w.sync(&want).writes, 0, "nothing changed, nothing written");

    // A terminating endpoint keeps its identity and id: same table.
    let mut terminating = want.clone();
    terminating.services.get_mut(&fe1).unwrap().endpoints[0].state = EndpointState::Terminating;
    let r = w.sync(&terminating);
    assert_eq!((r.tables_built, r.writes), (0, 1), "{r:?}");
    // Another endpoint: a new table.
    let mut replaced = terminating.clone();
    replaced.services.get_mut(&fe1).unwrap().endpoints[1].addr = IpAddr::from([198, 19, 9, 9]);
    assert_eq!(w.sync(&replaced).tables_built, 1);

    // A restarted agent adopts the table; one with another table size rebuilds it.
    drop(w);
    let mut w = writer(&b);
    assert_eq!(size(&w), Some(16381));
    let r = w.sync(&replaced);
    assert_eq!((r.writes, r.tables_built), (0, 0), "{r:?}");
    w.set_maglev_table_size(251).unwrap();
    assert!(w.set_maglev_table_size(250).is_err(), "not a prime");
    assert_eq!(size(&w), Some(16381));
    assert_eq!(w.sync(&replaced).tables_built, 1);
    assert_eq!(size(&w), Some(251));

    // No endpoints: no table; endpoints again: a table again.
    let mut empty = replaced.clone();
    empty.services.get_mut(&fe1).unwrap().endpoints.clear();
    w.sync(&empty);
    assert_eq!((size(&w), tables_in_map()), (None, 0));
    assert_eq!(w.sync(&replaced).tables_built, 1);
    assert_eq!(tables_in_map(), 1);

    // The frontend goes: its table goes.
    let mut gone = replaced.clone();
    gone.services.remove(&fe1);
    let r = w.sync(&gone);
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!((size(&w), tables_in_map()), (None, 0));

    // Every frontend Maglev, then back to random: tables come and go with the algorithm.
    let mut all = state(2, 1, 3);
    all.services
        .values_mut()
        .for_each(|s| s.algorithm = LbAlgorithm::Maglev);
    assert_eq!(w.sync(&all).tables_built, 2);
    assert_eq!(tables_in_map(), 2);
    assert!(
        w.programmed()
            .services
            .values()
            .all(|s| s.algorithm() == LbAlgorithm::Maglev)
    );
    let r = w.sync(&state(2, 1, 3));
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!(tables_in_map(), 0);
    assert!(w.programmed().tables.is_empty());
}

/// A resized services map (`--map-size-services`) replaces `maglev_v1` too; its tables are
/// carried into the new map (read back as inner map ids, written as fds), not rebuilt.
#[test]
fn maglev_tables_survive_a_map_resize() {
    let mut b = bed(MapSizes {
        services: 8,
        ..MapSizes::default()
    });
    let mut want = state(2, 1, 3);
    want.services
        .values_mut()
        .for_each(|s| s.algorithm = LbAlgorithm::Maglev);
    let r = writer(&b).sync(&want);
    assert_eq!((r.failed.len(), r.tables_built), (0, 2), "{r:?}");
    let before = writer(&b).programmed().tables.clone();

    b._ebpf = loader::load(
        &b.bpffs,
        MapSizes {
            services: 16,
            ..MapSizes::default()
        },
    )
    .unwrap();
    let info = aya::maps::MapData::from_pin(b.bpffs.join(proxy_common::names::MAGLEV))
        .unwrap()
        .info()
        .unwrap();
    assert_eq!(info.max_entries(), 16, "resized");
    let mut w = writer(&b);
    assert_eq!(w.programmed().tables, before, "tables carried over");
    let r = w.sync(&want);
    assert_eq!((r.writes, r.tables_built), (0, 0), "{r:?}");
}

/// Built tables wait and go in together, a batch at a time: more than a batch of new Maglev
/// frontends, then all of them changed, end up with the right tables and nothing stale.
#[test]
fn many_maglev_tables_go_in_by_batches() {
    let b = bed(MapSizes::default());
    let maps = Maps::open(&b.bpffs).unwrap();
    let mut w = writer(&b);
    let maglev = |mut d: DesiredState| {
        d.services
            .values_mut()
            .for_each(|s| s.algorithm = LbAlgorithm::Maglev);
        d
    };
    // 150 frontends (more than two batches), 3 endpoints each.
    let want = maglev(state(75, 2, 3));
    let r = w.sync(&want);
    assert_eq!((r.failed.len(), r.tables_built), (0, 150), "{r:?}");
    let check = |w: &Writer, want: &DesiredState| {
        let p = w.programmed();
        assert_eq!(p.tables.len(), 150);
        assert_eq!(maps.maglev.keys().count(), 150);
        for (fe, s) in &p.services {
            assert_eq!(s.algorithm(), LbAlgorithm::Maglev);
            let programmed = maps.services.get(&service_key(fe), 0).unwrap();
            assert_eq!(programmed, s.value, "{fe}");
            let eps: Vec<Endpoint> = s.slots.iter().map(|id| p.endpoint(*id).unwrap()).collect();
            assert_eq!(eps, want.services[fe].endpoints, "{fe}");
        }
        assert_eq!(p.backends.len(), 450, "no stale backends");
    };
    check(&w, &want);
    // Every frontend's first endpoint replaced: 150 new tables, the old backends gone.
    let mut changed = want.clone();
    for s in changed.services.values_mut() {
        s.endpoints[0].port = 9999;
    }
    let r = w.sync(&changed);
    assert_eq!((r.failed.len(), r.tables_built), (0, 150), "{r:?}");
    check(&w, &changed);
    // What the maps hold agrees with the writer's picture.
    let before = w.programmed().tables.clone();
    w.reread().unwrap();
    assert_eq!(w.programmed().tables, before);
    assert_eq!(w.sync(&changed).writes, 0);
}

/// A Service that fits only once a waiting Maglev frontend has dropped its stale slots and
/// backends is still programmed in the same sync.
#[test]
fn a_shrinking_maglev_frontend_makes_room_in_the_same_sync() {
    let b = bed(MapSizes {
        services: 8,
        backends: 8,
        conntrack: 64,
    });
    let mut w = writer(&b);
    let mut one = state(1, 1, 6);
    one.services
        .values_mut()
        .for_each(|s| s.algorithm = LbAlgorithm::Maglev);
    let r = w.sync(&one);
    assert_eq!((r.failed.len(), r.tables_built), (0, 1), "{r:?}");
    // svc-1 shrinks to 2 endpoints (a new table), svc-2 arrives with 6: 8 slots and backends.
    let mut two = state(2, 1, 6);
    two.services
        .values_mut()
        .for_each(|s| s.algorithm = LbAlgorithm::Maglev);
    two.services
        .values_mut()
        .next()
        .unwrap()
        .endpoints
        .truncate(2);
    let r = w.sync(&two);
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!(r.tables_built, 2);
    assert_eq!(w.programmed().backends.len(), 8);
}

/// The trie cannot tell an IPv6 /8 (fd00::/8, words [0xfd.., 0, 0, 0], prefix 32 + 8) from an
/// IPv4 one by its words: a restarted agent read fd00::/8 back as 253.0.0.0/8, found it stale
/// and removed it, and with it the range (same key bytes). A prefix has its frontend's family.
#[test]
fn an_ipv6_source_range_survives_a_restart() {
    let b = bed(MapSizes::default());
    let mut want = DesiredState::default();
    let fe = Frontend {
        addr: "fd00:18:200::1".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
        scope: Default::default(),
    };
    let range: (IpAddr, u8) = ("fd00::".parse().unwrap(), 8);
    want.services.insert(
        fe,
        DesiredService {
            drop_without_endpoints: false,
            service: "test/lb6".into(),
            name: "test/lb6:80".into(),
            kind: ServiceKind::LoadBalancer,
            endpoints: vec![Endpoint {
                addr: "fd00:19:1::2".parse().unwrap(),
                port: 8080,
                state: EndpointState::Active,
                local: false,
            }],
            affinity_timeout_s: 0,
            source_ranges: vec![range],
            algorithm: Default::default(),
        },
    );
    let r = writer(&b).sync(&want);
    assert!(r.failed.is_empty(), "{r:?}");
    let mut w = writer(&b);
    let svc_id = w.programmed().services[&fe].svc_id;
    let held = |w: &Writer| w.programmed().source_ranges.clone();
    let expected = std::collections::BTreeSet::from([(svc_id, range.0, range.1)]);
    assert_eq!(held(&w), expected, "read back as IPv6");
    assert_eq!(w.sync(&want).writes, 0, "nothing to rewrite");
    w.reread().unwrap();
    assert_eq!(held(&w), expected, "still in the trie");
}

/// Issue 16 bug 7: a frontend with 5,000 backends is programmed whole (5,000 slots, the
/// datapath picks `hash % count`); Maglev with more backends than table slots falls back to the
/// random choice over the slots and says so, and gets its table back when the table is large
/// enough again.
#[test]
fn large_services_are_programmed_and_maglev_falls_back_when_the_table_is_too_small() {
    let b = bed(MapSizes::default());
    let mut w = writer(&b);
    let mut want = state(1, 1, 1);
    let fe = *want.services.keys().next().unwrap();
    let ds = want.services.get_mut(&fe).unwrap();
    ds.endpoints = (0..5_000u32)
        .map(|n| Endpoint {
            addr: IpAddr::from([198, 19, 100 + (n / 250) as u8, 1 + (n % 250) as u8]),
            port: 8080,
            state: EndpointState::Active,
            local: false,
        })
        .collect();
    let r = w.sync(&want);
    assert!(r.failed.is_empty() && r.fallbacks.is_empty(), "{r:?}");
    let svc = &w.programmed().services[&fe];
    assert_eq!((svc.slots.len(), svc.value.count), (5_000, 5_000));
    let maps = Maps::open(&b.bpffs).unwrap();
    let key = proxy_common::SlotKey {
        svc_id: svc.svc_id,
        slot: 4_999,
    };
    assert!(
        maps.slots.get(&key, 0).is_ok(),
        "the last slot is in the map"
    );

    // Maglev with the default 16,381-slot table: a table.
    want.services.get_mut(&fe).unwrap().algorithm = LbAlgorithm::Maglev;
    let r = w.sync(&want);
    assert_eq!((r.tables_built, r.fallbacks.len()), (1, 0), "{r:?}");
    let svc_id = w.programmed().services[&fe].svc_id;
    assert!(w.programmed().tables.contains_key(&svc_id));
    // A 4,999-slot table is too small for 5,000 backends: random over the slots, reported.
    w.set_maglev_table_size(4_999).unwrap();
    let r = w.sync(&want);
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!(r.fallbacks.len(), 1, "{r:?}");
    assert!(r.fallbacks[0].1.contains("random"), "{r:?}");
    let svc = &w.programmed().services[&fe];
    assert_eq!(svc.algorithm(), LbAlgorithm::Random);
    assert_eq!(svc.value.count, 5_000);
    assert!(
        !w.programmed().tables.contains_key(&svc_id),
        "the old table is gone"
    );
}

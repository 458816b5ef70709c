//! Upgrading the agent in place: a new agent whose maps must change shape (here the conntrack
//! map is resized, or the services map's key gained the address family) replaces the maps,
//! copies (or rewrites) their entries across and swaps its programs into the pinned links,
//! while established per-packet-NAT (tc path) streams keep their backends and never reset.
//! Needs root and the agent binary; fails, never skips.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, ensure};
use tests::{
    Endpoint, EndpointSlice, Proto, Service, TestBed, client::EchoStream, in_netns,
    netns_attachments,
};

const T: Duration = Duration::from_secs(2);
const SYNC: Duration = Duration::from_secs(60);

fn with_bed(f: impl FnOnce(&mut TestBed) -> Result<()>) {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    if let Err(e) = f(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

fn ct_capacity(s: &serde_json::Value) -> Option<u64> {
    s["maps"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == "ct_v2")?["max_entries"]
        .as_u64()
}

/// Service `name` on `vip`:90/TCP with an echo backend on node 1 and two on node 2; returns a
/// client pod on node 1.
fn three_backends(bed: &mut TestBed, name: &str, vip: &str) -> Result<tests::Pod> {
    let mut slice = EndpointSlice::new("default", name, "x1").port("s", 7000, Proto::Tcp);
    for (node, pod) in [(1, "1a"), (2, "2a"), (2, "2b")] {
        let p = bed.add_pod(node, &format!("{name}-{pod}"))?;
        bed.start_echo_streams(&p, &[], &[], &[7000])?;
        slice = slice.endpoint(Endpoint::ready(&p.ip.to_string(), &format!("node{node}")));
    }
    let svc = Service::cluster_ip("default", name, vip).port("s", 90, 7000, Proto::Tcp);
    bed.write_manifest(&format!("{name}-svc.yaml"), &svc.to_yaml())?;
    bed.write_manifest(&format!("{name}-slice.yaml"), &slice.to_yaml())?;
    bed.add_pod(1, "client")
}

/// Eight streams to `vip`:90 from a thread in the client pod's namespace: per-packet NAT (tc
/// path), so they live on conntrack entries in ct_v2.
fn streams(client: &tests::Pod, vip: &str) -> Result<Vec<EchoStream>> {
    let vip: SocketAddr = SocketAddr::new(vip.parse()?, 90);
    let streams = in_netns(&client.ns, move || {
        (0..8)
            .map(|_| EchoStream::connect(vip, T))
            .collect::<Result<Vec<_>>>()
    })??;
    for s in &streams {
        ensure!(s.peer == vip, "stream sees {}", s.peer);
    }
    Ok(streams)
}

#[test]
fn a_resized_map_is_migrated_without_breaking_established_flows() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.71";
        let client = three_backends(bed, "up", VIP)?;
        let dir = bed.manifests_dir().to_path_buf();
        let old = bed.start_agent_with(1, &dir, &["--map-size-conntrack", "4096"])?;
        old.wait_for_sync(1, SYNC)?;
        let node2 = bed.start_agent(2)?;
        node2.wait_for_sync(1, SYNC)?;
        ensure!(ct_capacity(&old.status_json()?) == Some(4096));
        let links_before = netns_attachments(&old.ns)?;

        let mut streams = streams(&client, VIP)?;

        // The upgrade: stop the old agent, start one that wants a bigger conntrack map.
        bed.stop_agent(&old);
        for (i, s) in streams.iter_mut().enumerate() {
            s.exchange(&format!("between agents {i}"), T)?;
        }
        let new = bed.start_agent_with(1, &dir, &["--map-size-conntrack", "8192"])?;
        new.wait_for_sync(1, SYNC)?;
        let status = new.status_json()?;
        ensure!(
            ct_capacity(&status) == Some(8192),
            "conntrack map not replaced: {status:#}"
        );
        let log = new.log_text();
        ensure!(
            log.contains("pinned map has another shape") && log.contains("copied entries"),
            "agent log: {}",
            new.log_tail(30)
        );
        // Same backend on every stream (exchange checks it), no reset, across the swap.
        for round in 0..20 {
            for (i, s) in streams.iter_mut().enumerate() {
                s.exchange(&format!("after upgrade {round} {i}"), T)?;
            }
        }
        // The links were updated in place, not detached and attached again.
        let links_after = netns_attachments(&new.ns)?;
        ensure!(
            links_before.len() == links_after.len(),
            "attachments changed: {links_before:?} -> {links_after:?}"
        );
        ensure!(
            !std::fs::read_dir(&new.bpffs)?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("old_")),
            "old maps were not released"
        );
        Ok(())
    });
}

/// A map left by an older layout version (another key/value layout, another name) is rebuilt
/// from the desired state and released once the new programs run.
#[test]
fn maps_of_an_older_layout_version_are_released() {
    with_bed(|bed| {
        let svc =
            Service::cluster_ip("default", "v0", "198.18.100.72").port("s", 90, 7000, Proto::Tcp);
        bed.write_manifest("v0-svc.yaml", &svc.to_yaml())?;
        let bpffs = std::path::PathBuf::from("/sys/fs/bpf").join(format!("{}-node1", bed.prefix()));
        std::fs::create_dir_all(&bpffs)?;
        let old = bpffs.join("ct_v0");
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&old)
            .args([
                "type", "lru_hash", "key", "36", "value", "32", "entries", "64", "name", "ct_v0",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "bpftool map create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let agent = bed.start_agent(1)?;
        agent.wait_for_sync(1, SYNC)?;
        ensure!(!old.exists(), "the older layout's map is still pinned");
        ensure!(agent.log_text().contains("map of an older layout"));
        let s = agent.status_json()?;
        ensure!(
            s["services"].as_array().is_some_and(|v| v.len() == 1),
            "{s:#}"
        );
        Ok(())
    });
}

/// (svc_id, backend ids) of every programmed frontend, as `status` shows them.
fn ids(s: &serde_json::Value) -> Vec<(u64, Vec<u64>)> {
    s["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let b = f["backends"].as_array().into_iter().flatten();
            (
                f["svc_id"].as_u64().unwrap_or(0),
                b.map(|b| b["backend_id"].as_u64().unwrap_or(0)).collect(),
            )
        })
        .collect()
}

fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or(0)
}

fn bpftool(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("bpftool").args(args).output()?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Leaves the pins as an agent of an older layout would: map `new` re-created as `old` (of
/// `map_type`), each entry cut to its first `key_len` key and `value_len` value bytes, and no
/// `new`. The attached programs keep the map they hold.
fn pin_as_older_layout(
    bpffs: &std::path::Path,
    (new, old): (&str, &str),
    map_type: &str,
    (key_len, value_len): (usize, usize),
) -> Result<usize> {
    let v2 = bpffs.join(new);
    let v1 = bpffs.join(old);
    let (v2s, v1s) = (v2.to_string_lossy(), v1.to_string_lossy());
    let info: serde_json::Value =
        serde_json::from_str(&bpftool(&["-j", "map", "show", "pinned", &v2s])?)?;
    let max = info["max_entries"].as_u64().unwrap_or(0).to_string();
    let dump: serde_json::Value =
        serde_json::from_str(&bpftool(&["-j", "map", "dump", "pinned", &v2s])?)?;
    let (k, v) = (key_len.to_string(), value_len.to_string());
    bpftool(&[
        "map", "create", &v1s, "type", map_type, "key", &k, "value", &v, "entries", &max, "name",
        old,
    ])?;
    let hex = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str())
            .map(|b| b.trim_start_matches("0x").to_string())
            .collect()
    };
    let entries = dump.as_array().cloned().unwrap_or_default();
    for e in &entries {
        let (key, value) = (hex(&e["key"]), hex(&e["value"]));
        ensure!(
            key.len() >= key_len && value.len() >= value_len,
            "entry {e}"
        );
        let mut args = vec!["map", "update", "pinned", &v1s, "key", "hex"];
        args.extend(key[..key_len].iter().map(String::as_str));
        args.extend(["value", "hex"]);
        args.extend(value[..value_len].iter().map(String::as_str));
        bpftool(&args)?;
    }
    std::fs::remove_file(&v2)?;
    Ok(entries.len())
}

/// The services map as an agent of the `svc_v1` layout left it: keyed without the family (the
/// first 20 bytes of today's key).
fn pin_services_as_v1(bpffs: &std::path::Path) -> Result<usize> {
    pin_as_older_layout(bpffs, ("svc_v2", "svc_v1"), "hash", (20, 16))
}

/// Issue 16 bug 4: `svc_v2` added the family to the services key. An agent finding the
/// services map of the older layout rewrites its entries into the new one (the family from
/// the value), so it adopts the same service and backend ids: established flows keep the
/// backend ids their conntrack entries hold (rebuilding would renumber the backends, and every
/// established packet would count as draining or reselected), and the first sync writes
/// nothing new.
#[test]
fn the_services_map_of_the_older_layout_is_rewritten_keeping_ids_and_flows() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.73";
        let client = three_backends(bed, "v1", VIP)?;
        let old = bed.start_agent(1)?;
        old.wait_for_sync(1, SYNC)?;
        let node2 = bed.start_agent(2)?;
        node2.wait_for_sync(1, SYNC)?;
        let before = ids(&old.status_json()?);
        ensure!(before.len() == 1 && before[0].1.len() == 3, "{before:?}");
        let mut streams = streams(&client, VIP)?;
        bed.stop_agent(&old);
        let n = pin_services_as_v1(&old.bpffs)?;
        ensure!(n == 1, "{n} services entries");
        for (i, s) in streams.iter_mut().enumerate() {
            s.exchange(&format!("on the old layout {i}"), T)?;
        }
        let new = bed.start_agent(1)?;
        new.wait_for_sync(1, SYNC)?;
        let log = new.log_text();
        ensure!(
            log.contains("map of an older layout") && log.contains("rewrote entries"),
            "agent log: {}",
            new.log_tail(30)
        );
        let status = new.status_json()?;
        ensure!(
            ids(&status) == before,
            "ids changed: {before:?} -> {status:#}"
        );
        let moved =
            |s: &serde_json::Value| counter(s, "translated_draining") + counter(s, "reselected");
        let (draining, new_flows) = (moved(&status), counter(&status, "translated_new"));
        for round in 0..5 {
            for (i, s) in streams.iter_mut().enumerate() {
                s.exchange(&format!("after upgrade {round} {i}"), T)?;
            }
        }
        let status = new.status_json()?;
        ensure!(
            moved(&status) == draining && counter(&status, "translated_new") == new_flows,
            "established flows lost their backend ids: {:#}",
            status["counters"]
        );
        ensure!(
            !new.bpffs.join("svc_v1").exists(),
            "the older layout's map is still pinned"
        );
        Ok(())
    });
}

/// `ct_v2` added each entry's creation time. An agent finding the conntrack map of the older
/// layout (`ct_v1`, 56-byte values) rewrites its entries into the new one instead of starting
/// empty: established flows keep their entries (no new flow, no reselection) through the
/// upgrade, `flows` shows them with an age, and `ct_v1` is released.
#[test]
fn the_conntrack_map_of_the_older_layout_is_rewritten_keeping_established_flows() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.74";
        let client = three_backends(bed, "ct1", VIP)?;
        let old = bed.start_agent(1)?;
        old.wait_for_sync(1, SYNC)?;
        let node2 = bed.start_agent(2)?;
        node2.wait_for_sync(1, SYNC)?;
        let mut streams = streams(&client, VIP)?;
        bed.stop_agent(&old);
        let n = pin_as_older_layout(&old.bpffs, ("ct_v2", "ct_v1"), "lru_hash", (40, 56))?;
        ensure!(n >= 16, "{n} conntrack entries for 8 streams");
        for (i, s) in streams.iter_mut().enumerate() {
            s.exchange(&format!("on the old layout {i}"), T)?;
        }
        let new = bed.start_agent(1)?;
        new.wait_for_sync(1, SYNC)?;
        let log = new.log_text();
        ensure!(
            log.contains("map of an older layout") && log.contains("rewrote entries"),
            "agent log: {}",
            new.log_tail(30)
        );
        let status = new.status_json()?;
        let moved = |s: &serde_json::Value| {
            counter(s, "translated_draining")
                + counter(s, "reselected")
                + counter(s, "translated_new")
        };
        let before = moved(&status);
        for round in 0..5 {
            for (i, s) in streams.iter_mut().enumerate() {
                s.exchange(&format!("after upgrade {round} {i}"), T)?;
            }
        }
        let status = new.status_json()?;
        ensure!(
            moved(&status) == before,
            "established flows were treated as new after the upgrade: {:#}",
            status["counters"]
        );
        ensure!(
            !new.bpffs.join("ct_v1").exists(),
            "the older layout's map is still pinned"
        );
        let bpffs = new.bpffs.to_string_lossy().into_owned();
        let flows: serde_json::Value = serde_json::from_str(&new.cli(&[
            "flows",
            "--bpffs",
            &bpffs,
            "--service",
            "default/ct1",
            "-o",
            "json",
        ])?)?;
        let list = flows["flows"].as_array().cloned().unwrap_or_default();
        ensure!(
            list.len() == 8
                && list.iter().all(|f| f["age_s"]
                    .as_f64()
                    .zip(f["idle_s"].as_f64())
                    .is_some_and(|(a, i)| a >= i)),
            "the 8 streams, each with an age: {flows:#}"
        );
        Ok(())
    });
}

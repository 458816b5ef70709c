//! Upgrading the agent in place: a new agent whose maps must change shape (here the conntrack
//! map is resized) replaces the maps, copies their entries across and swaps its programs into
//! the pinned links, while established per-packet-NAT (tc path) streams keep their backends and
//! never reset. Needs root and the agent binary; fails, never skips.
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
        .find(|m| m["name"] == "ct_v1")?["max_entries"]
        .as_u64()
}

#[test]
fn a_resized_map_is_migrated_without_breaking_established_flows() {
    with_bed(|bed| {
        const VIP: &str = "198.18.100.71";
        let mut slice = EndpointSlice::new("default", "up", "x1").port("s", 7000, Proto::Tcp);
        for (node, name) in [(1, "up-1a"), (2, "up-2a"), (2, "up-2b")] {
            let p = bed.add_pod(node, name)?;
            bed.start_echo_streams(&p, &[], &[], &[7000])?;
            slice = slice.endpoint(Endpoint::ready(&p.ip.to_string(), &format!("node{node}")));
        }
        let svc = Service::cluster_ip("default", "up", VIP).port("s", 90, 7000, Proto::Tcp);
        bed.write_manifest("up-svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("up-slice.yaml", &slice.to_yaml())?;
        let client = bed.add_pod(1, "client")?;
        let dir = bed.manifests_dir().to_path_buf();
        let old = bed.start_agent_with(1, &dir, &["--map-size-conntrack", "4096"])?;
        old.wait_for_sync(1, SYNC)?;
        let node2 = bed.start_agent(2)?;
        node2.wait_for_sync(1, SYNC)?;
        ensure!(ct_capacity(&old.status_json()?) == Some(4096));
        let links_before = netns_attachments(&old.ns)?;

        // Streams from a thread in the client pod's namespace: per-packet NAT (tc path), so
        // they live on conntrack entries in ct_v1.
        let vip: SocketAddr = SocketAddr::new(VIP.parse()?, 90);
        let mut streams: Vec<EchoStream> = in_netns(&client.ns, move || {
            (0..8)
                .map(|_| EchoStream::connect(vip, T))
                .collect::<Result<Vec<_>>>()
        })??;
        for s in &streams {
            ensure!(s.peer == vip, "stream sees {}", s.peer);
        }

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

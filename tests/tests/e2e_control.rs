//! End-to-end tests of the agent's control loop on the emulated cluster: periodic full
//! reconciliation repairs map entries removed behind its back, Services that do not fit the maps
//! are left out whole and reported (status, metrics), and rejected objects are reported by
//! object and field while the rest is programmed. Needs root; fails, never skips.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use tests::{Agent, Endpoint, EndpointSlice, Proto, Service, TestBed, in_netns};

const SYNC: Duration = Duration::from_secs(60);

fn with_bed(f: impl FnOnce(&mut TestBed) -> Result<()>) {
    let mut bed = TestBed::new(1).expect("building the test bed (needs root)");
    if let Err(e) = f(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

fn service(bed: &TestBed, name: &str, vip: &str, ports: &[u16]) -> Result<()> {
    let mut svc = Service::cluster_ip("default", name, vip);
    let mut slice = EndpointSlice::new("default", name, "x1")
        .endpoint(Endpoint::ready("198.19.1.200", "node1"));
    for p in ports {
        svc = svc.port(&format!("p{p}"), *p, 8080, Proto::Tcp);
        slice = slice.port(&format!("p{p}"), 8080, Proto::Tcp);
    }
    bed.write_manifest(&format!("{name}-svc.yaml"), &svc.to_yaml())?;
    bed.write_manifest(&format!("{name}-slice.yaml"), &slice.to_yaml())
}

fn wait_status(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = agent.status_json()?;
        if pred(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("status never showed {what}: {s:#}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn has_frontend(s: &Value, vip: &str, port: u16) -> bool {
    s["services"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|x| x["vip"] == vip && x["port"] == port)
}

fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<String> {
    let path = path.to_string();
    in_netns(ns, move || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?
}

#[test]
fn periodic_reconciliation_restores_an_entry_deleted_by_hand() {
    with_bed(|bed| {
        service(bed, "drift", "198.18.100.61", &[80])?;
        let dir = bed.manifests_dir().to_path_buf();
        let agent = bed.start_agent_with(1, &dir, &["--resync-period-s", "1"])?;
        agent.wait_for_sync(1, SYNC)?;
        wait_status(&agent, "the frontend", |s| {
            has_frontend(s, "198.18.100.61", 80)
        })?;
        // ServiceKey: address words (198.18.100.61, 0, 0, 0), port 80 big-endian, TCP, scope 0,
        // family AF_INET, padding.
        let key = "c6 12 64 3d 00 00 00 00 00 00 00 00 00 00 00 00 00 50 06 00 02 00 00 00";
        let pin = agent.bpffs.join("svc_v2");
        let out = Command::new("bpftool")
            .args(["map", "delete", "pinned"])
            .arg(&pin)
            .arg("key")
            .arg("hex")
            .args(key.split(' '))
            .output()
            .context("running bpftool")?;
        ensure!(
            out.status.success(),
            "bpftool map delete: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            !has_frontend(&agent.status_json()?, "198.18.100.61", 80),
            "entry was not deleted"
        );
        wait_status(&agent, "the frontend restored by reconciliation", |s| {
            has_frontend(s, "198.18.100.61", 80)
        })?;
        Ok(())
    });
}

#[test]
fn services_past_capacity_and_rejected_objects_are_reported() {
    with_bed(|bed| {
        // Room for three frontends: a and b fit, c (two ports) does not, and is left out whole.
        service(bed, "a", "198.18.100.62", &[80])?;
        service(bed, "b", "198.18.100.63", &[80])?;
        service(bed, "c", "198.18.100.64", &[80, 81])?;
        bed.write_manifest(
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\nspec: {clusterIP: 198.18.100.65, ports: [{port: 0}]}\n",
        )?;
        let dir = bed.manifests_dir().to_path_buf();
        let agent = bed.start_agent_with(1, &dir, &["--map-size-services", "3"])?;
        agent.wait_for_sync(1, SYNC)?;
        let s = agent.status_json()?;
        ensure!(has_frontend(&s, "198.18.100.62", 80) && has_frontend(&s, "198.18.100.63", 80));
        ensure!(
            !has_frontend(&s, "198.18.100.64", 80) && !has_frontend(&s, "198.18.100.64", 81),
            "c must not be half-programmed: {s:#}"
        );
        let np = &s["sync"]["not_programmed"];
        ensure!(
            np.as_array().is_some_and(|v| v.len() == 1
                && v[0]["service"] == "default/c"
                && v[0]["reason"].as_str().unwrap_or("").contains("svc_v2")),
            "status must report c: {np:#}"
        );
        let rejected = &s["sync"]["rejected"];
        ensure!(
            rejected
                .as_array()
                .is_some_and(|v| v
                    .iter()
                    .any(|r| r["object"] == "Service default/bad"
                        && r["field"] == "spec.ports[0].port")),
            "status must report the bad Service by object and field: {rejected:#}"
        );
        let table = agent.status_table()?;
        ensure!(table.contains("NOT PROGRAMMED default/c"), "{table}");
        let metrics = http_get(&agent.ns, "127.0.0.1:10249".parse()?, "/metrics")?;
        ensure!(
            metrics.contains("proxy_services_not_programmed 1")
                && metrics.contains("proxy_objects_rejected 1"),
            "{metrics}"
        );
        ensure!(agent.log_text().contains("service not programmed"));

        // Removing b makes room: c is programmed whole.
        bed.remove_manifest("b-svc.yaml")?;
        bed.remove_manifest("b-slice.yaml")?;
        wait_status(&agent, "c programmed once there is room", |s| {
            has_frontend(s, "198.18.100.64", 80) && has_frontend(s, "198.18.100.64", 81)
        })?;
        Ok(())
    });
}

/// The "bad input" rule (issue 16 bug 11): a manifest that stops parsing mid-edit keeps its last
/// good objects programmed and does not hold up another file's change; the error is in `status`
/// (file, where, why; table and JSON) and in `proxy_manifest_errors{file}`; once the broken file
/// is deleted only its objects go.
#[test]
fn a_broken_manifest_keeps_its_last_good_objects_and_is_reported() {
    with_bed(|bed| {
        const KEEP: &str = "198.18.100.231";
        const OTHER: &str = "198.18.100.232";
        service(bed, "keep", KEEP, &[80])?;
        service(bed, "other", OTHER, &[80])?;
        let agents = bed.start_agents(SYNC)?;
        let a = &agents[0];
        wait_status(a, "both Services", |s| {
            has_frontend(s, KEEP, 80) && has_frontend(s, OTHER, 80)
        })?;
        // Half-written: the file ends inside a flow mapping.
        bed.write_manifest(
            "keep-svc.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: keep, namespace: default\n",
        )?;
        service(bed, "other", OTHER, &[80, 81])?;
        let s = wait_status(a, "the other file's change and the error", |s| {
            has_frontend(s, OTHER, 81)
                && s["sync"]["source_errors"].as_array().is_some_and(|e| {
                    e.len() == 1
                        && e[0]["file"]
                            .as_str()
                            .is_some_and(|f| f.ends_with("keep-svc.yaml"))
                        && e[0]["field"].as_str().is_some_and(|f| f.contains("line"))
                })
        })?;
        ensure!(
            has_frontend(&s, KEEP, 80),
            "the broken file's Service went: {s:#}"
        );
        let table = a.status_table()?;
        ensure!(
            table.contains("SOURCE ERROR") && table.contains("keep-svc.yaml"),
            "{table}"
        );
        let metrics = http_get(&bed.node(1).ns, "127.0.0.1:10249".parse()?, "/metrics")?;
        ensure!(
            metrics
                .lines()
                .any(|l| l.starts_with("proxy_manifest_errors{file=\"")
                    && l.contains("keep-svc.yaml\"}")
                    && l.ends_with(" 1")),
            "no proxy_manifest_errors for keep-svc.yaml:\n{metrics}"
        );
        bed.remove_manifest("keep-svc.yaml")?;
        let s = wait_status(a, "the deleted file's Service gone, the error too", |s| {
            !has_frontend(s, KEEP, 80)
                && s["sync"]["source_errors"]
                    .as_array()
                    .is_some_and(|e| e.is_empty())
        })?;
        ensure!(
            has_frontend(&s, OTHER, 80) && has_frontend(&s, OTHER, 81),
            "{s:#}"
        );
        Ok(())
    })
}

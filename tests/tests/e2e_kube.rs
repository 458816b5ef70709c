//! End-to-end tests of the kube source: agents on the emulated cluster watch the test API
//! server (real kube-rs client over HTTP, inside node1's namespace on 198.18.0.1) while
//! Services and EndpointSlices change, watches are cut, history is compacted (410 Gone) and
//! the server goes away and comes back. Needs root and the agent binary; fails, never skips.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use serde_json::{Value, json};
use tests::{
    Agent, Endpoint, EndpointSlice, Pod, Proto, Service, Tally, TestBed, apiserver::ApiServer,
    find_status_service, status_backends, tcp_requests,
};

const T: Duration = Duration::from_secs(2);
const SYNC: Duration = Duration::from_secs(60);

fn with_bed(nodes: u8, f: impl FnOnce(&mut TestBed) -> Result<()>) {
    let mut bed = TestBed::new(nodes).expect("building the test bed (needs root)");
    if let Err(e) = f(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

/// The API server inside node1's namespace, reachable from every node over the LAN.
fn api(bed: &TestBed) -> Result<(ApiServer, std::path::PathBuf)> {
    let server = ApiServer::start(
        Some(&bed.node(1).ns),
        SocketAddr::from(([198, 18, 0, 1], 16443)),
    )?;
    let kubeconfig = bed.dir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    for n in bed.nodes() {
        server.apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name(), "labels": {"topology.kubernetes.io/zone": "z1"}},
        }));
    }
    Ok((server, kubeconfig))
}

fn start_agents(bed: &mut TestBed, kubeconfig: &std::path::Path) -> Result<Vec<Agent>> {
    let nodes: Vec<u8> = bed.nodes().iter().map(|n| n.index).collect();
    let agents: Vec<Agent> = nodes
        .into_iter()
        .map(|n| bed.start_agent_kube(n, kubeconfig, &[]))
        .collect::<Result<_>>()?;
    for a in &agents {
        a.wait_for_sync(1, SYNC)?;
    }
    Ok(agents)
}

fn slice(service: &str, pods: &[&Pod]) -> Value {
    let mut s = EndpointSlice::new("default", service, "k1").port("http", 8080, Proto::Tcp);
    for p in pods {
        s = s.endpoint(Endpoint::ready(
            &p.ip.to_string(),
            &format!("node{}", p.node),
        ));
    }
    s.to_value()
}

fn service(name: &str, vip: &str, port: u16) -> Value {
    Service::cluster_ip("default", name, vip)
        .port("http", port, 8080, Proto::Tcp)
        .to_value()
}

/// The backend addresses `status` shows for vip:port on every agent, once they all agree
/// with `want` (None: the frontend is absent). Returns how long that took.
fn converge(
    agents: &[Agent],
    vip: &str,
    port: u16,
    want: Option<&[&Pod]>,
    what: &str,
) -> Result<Duration> {
    let start = Instant::now();
    let want: Option<BTreeSet<String>> =
        want.map(|pods| pods.iter().map(|p| p.ip.to_string()).collect());
    loop {
        let mut all = true;
        let mut seen = Vec::new();
        for a in agents {
            let s = a.status_json()?;
            let got: Option<BTreeSet<String>> = find_status_service(&s, vip, port, Proto::Tcp)
                .map(|svc| status_backends(svc).into_iter().map(|b| b.0).collect());
            all &= got == want;
            seen.push(got);
        }
        if all {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{what}: agents never converged to {want:?}; they show {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// All requests answered, by exactly `pods`.
fn traffic(client: &Pod, vip: &str, port: u16, pods: &[&Pod], what: &str) -> Result<()> {
    let addr = SocketAddr::new(vip.parse()?, port);
    let out = tcp_requests(&client.ns, addr, 60, T)?;
    let tally = Tally::new(&out);
    tally
        .expect_no_failures()
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    tally
        .expect_spread(&names, 0.3)
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    Ok(())
}

fn backends(bed: &mut TestBed) -> Result<(Vec<Pod>, Pod)> {
    let mut v = Vec::new();
    for (node, name) in [(1, "k-1a"), (1, "k-1b"), (2, "k-2a")] {
        let p = bed.add_pod(node, name)?;
        bed.start_echo(&p, &[8080], &[])?;
        v.push(p);
    }
    let client = bed.add_pod(1, "client")?;
    Ok((v, client))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn kube_source_programs_services_and_follows_every_change() {
    with_bed(2, |bed| {
        const VIP: &str = "198.18.100.51";
        let (b, client) = backends(bed)?;
        let (server, kubeconfig) = api(bed)?;
        server.apply(service("web", VIP, 80));
        server.apply(slice("web", &[&b[0], &b[2]]));
        let agents = start_agents(bed, &kubeconfig)?;
        converge(&agents, VIP, 80, Some(&[&b[0], &b[2]]), "create")?;
        traffic(&client, VIP, 80, &[&b[0], &b[2]], "after create")?;

        server.apply(slice("web", &[&b[0], &b[1], &b[2]]));
        converge(&agents, VIP, 80, Some(&[&b[0], &b[1], &b[2]]), "scale up")?;
        traffic(&client, VIP, 80, &[&b[0], &b[1], &b[2]], "after scale up")?;

        server.apply(service("web", VIP, 81));
        converge(
            &agents,
            VIP,
            81,
            Some(&[&b[0], &b[1], &b[2]]),
            "port change",
        )?;
        converge(&agents, VIP, 80, None, "old port gone")?;
        traffic(
            &client,
            VIP,
            81,
            &[&b[0], &b[1], &b[2]],
            "after port change",
        )?;

        // Time from an API change to the datapath showing it (status reads the maps), over
        // repeated scale-downs and scale-ups.
        let mut lat = Vec::new();
        for i in 0..20 {
            let pods: Vec<&Pod> = if i % 2 == 0 {
                vec![&b[0], &b[2]]
            } else {
                vec![&b[0], &b[1], &b[2]]
            };
            server.apply(slice("web", &pods));
            lat.push(converge(&agents, VIP, 81, Some(&pods), "latency round")?);
        }
        lat.sort();
        eprintln!(
            "API change -> programmed on both nodes (via status): p50 {:?}, p99 {:?}, max {:?} over {} changes",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().unwrap(),
            lat.len()
        );

        ensure!(server.delete("EndpointSlice", Some("default"), "web-k1"));
        converge(&agents, VIP, 81, Some(&[]), "slice deleted")?;
        ensure!(server.delete("Service", Some("default"), "web"));
        converge(&agents, VIP, 81, None, "service deleted")?;
        Ok(())
    });
}

#[test]
fn kube_outages_relists_and_restarts_never_flush_the_datapath() {
    with_bed(2, |bed| {
        const VIP: &str = "198.18.100.52";
        const VIP2: &str = "198.18.100.53";
        let (b, client) = backends(bed)?;
        let (server, kubeconfig) = api(bed)?;
        server.apply(service("web", VIP, 80));
        server.apply(slice("web", &[&b[0], &b[1]]));
        let agents = start_agents(bed, &kubeconfig)?;
        converge(&agents, VIP, 80, Some(&[&b[0], &b[1]]), "create")?;

        // Cut watch streams while objects change: the watchers resume and converge.
        // Ends on the two-backend slice the next step expects.
        for i in 0..6 {
            server.drop_watches();
            let pods: Vec<&Pod> = if i % 2 == 0 {
                vec![&b[0], &b[1], &b[2]]
            } else {
                vec![&b[0], &b[1]]
            };
            server.apply(slice("web", &pods));
            converge(&agents, VIP, 80, Some(&pods), "after a cut watch")?;
        }

        // The API server is unreachable: traffic keeps flowing, nothing is flushed. Changes made
        // meanwhile (a deletion among them) arrive after a relist forced by 410 Gone.
        let lists_before = server.list_count("/apis/discovery.k8s.io/v1/endpointslices");
        server.set_unavailable(true);
        server.drop_watches();
        std::thread::sleep(Duration::from_secs(2));
        traffic(&client, VIP, 80, &[&b[0], &b[1]], "while the API is down")?;
        converge(
            &agents,
            VIP,
            80,
            Some(&[&b[0], &b[1]]),
            "still programmed while down",
        )?;
        server.apply(slice("web", &[&b[2]]));
        server.apply(service("other", VIP2, 80));
        server.apply(slice("other", &[&b[0]]));
        server.compact();
        server.set_unavailable(false);
        converge(&agents, VIP, 80, Some(&[&b[2]]), "after the outage")?;
        converge(
            &agents,
            VIP2,
            80,
            Some(&[&b[0]]),
            "service created during the outage",
        )?;
        traffic(&client, VIP, 80, &[&b[2]], "after the outage")?;
        ensure!(
            server.list_count("/apis/discovery.k8s.io/v1/endpointslices") > lists_before,
            "expected a relist after 410 Gone"
        );

        // A server restart: connections drop, the watchers come back.
        server.restart();
        ensure!(server.delete("Service", Some("default"), "other"));
        converge(&agents, VIP2, 80, None, "deleted after a server restart")?;
        server.apply(slice("web", &[&b[0], &b[2]]));
        converge(
            &agents,
            VIP,
            80,
            Some(&[&b[0], &b[2]]),
            "after a server restart",
        )?;
        traffic(&client, VIP, 80, &[&b[0], &b[2]], "after a server restart")?;
        Ok(())
    });
}

/// Full sync of 10,000 Services with 3 endpoints each from the API: time to the first
/// programmed state and the agent's memory. Measured and printed; nothing is asserted about
/// time (CI machines vary), only that everything was programmed.
#[test]
fn kube_full_sync_of_10k_services() {
    with_bed(1, |bed| {
        const N: u32 = 10_000;
        let (server, kubeconfig) = api(bed)?;
        for i in 0..N {
            let vip = format!("198.18.{}.{}", 128 + i / 256, i % 256);
            let name = format!("s{i}");
            server.apply(service(&name, &vip, 80));
            let mut s = EndpointSlice::new("default", &name, "k1").port("http", 8080, Proto::Tcp);
            for e in 0..3 {
                let j = i * 3 + e;
                s = s.endpoint(Endpoint::ready(
                    &format!("198.19.{}.{}", 100 + j / 256, j % 256),
                    "node1",
                ));
            }
            server.apply(s.to_value());
        }
        let started = Instant::now();
        let agent = bed.start_agent_kube(1, &kubeconfig, &[])?;
        agent.wait_for_sync(1, Duration::from_secs(120))?;
        let took = started.elapsed();
        let log = agent.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("sync complete"))
            .unwrap_or_default()
            .to_string();
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid))?;
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap_or("VmRSS: ?")
            .to_string();
        eprintln!(
            "full sync of {N} Services x 3 endpoints from the API: {took:?} from agent start to programmed; agent {rss}; {line}"
        );
        ensure!(
            line.contains(&format!("services={N}")) && line.contains("backends=30000"),
            "not everything was programmed: {line}"
        );
        Ok(())
    });
}

/// A Service the agents reject gets one Warning Event (events.k8s.io/v1, created over HTTP by
/// the real kube-rs client) regarding that Service by uid and naming the field: one for the
/// cluster, though both nodes' agents reject it; later syncs do not repeat it; a good Service
/// next to it gets none and is served.
#[test]
fn kube_source_reports_a_rejected_service_as_one_event() {
    with_bed(2, |bed| {
        let (server, kubeconfig) = api(bed)?;
        let (pods, client) = backends(bed)?;
        server.apply(service("good", "198.18.100.71", 80));
        server.apply(slice("good", &pods.iter().collect::<Vec<_>>()));
        server.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "bad", "namespace": "default"},
            "spec": {"clusterIP": "198.18.100.72", "ports": [{"port": 0}]},
        }));
        let agents = start_agents(bed, &kubeconfig)?;
        let bad_uid = server
            .get("Service", Some("default"), "bad")
            .and_then(|s| s["metadata"]["uid"].as_str().map(String::from))
            .ok_or_else(|| anyhow::anyhow!("bad has no uid"))?;
        let events_for_bad = || -> Vec<Value> {
            server
                .objects("Event")
                .into_iter()
                .filter(|e| e["regarding"]["name"] == "bad")
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while events_for_bad().is_empty() {
            ensure!(
                Instant::now() < deadline,
                "no Event for the rejected Service"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let ev = &events_for_bad()[0];
        ensure!(
            ev["type"] == "Warning"
                && ev["reason"] == "Rejected"
                && ev["regarding"]["kind"] == "Service"
                && ev["regarding"]["uid"] == bad_uid.as_str()
                && ev["metadata"]["namespace"] == "default"
                && ev["reportingController"] == "proxy-agent"
                && ev["note"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("spec.ports[0].port:")),
            "{ev:#}"
        );
        // More syncs (a change elsewhere): the same rejection is not reported again.
        let generation = agents[0].generation().unwrap_or(0);
        server.apply(service("good", "198.18.100.71", 81));
        agents[0].wait_for_sync(generation + 1, SYNC)?;
        converge(
            &agents,
            "198.18.100.71",
            81,
            Some(&pods.iter().collect::<Vec<_>>()),
            "good moved to 81",
        )?;
        traffic(
            &client,
            "198.18.100.71",
            81,
            &pods.iter().collect::<Vec<_>>(),
            "good",
        )?;
        std::thread::sleep(Duration::from_millis(500));
        ensure!(
            events_for_bad().len() == 1,
            "repeated: {:#?}",
            events_for_bad()
        );
        ensure!(
            server.objects("Event").len() == 1,
            "only the rejected Service has an Event: {:#?}",
            server.objects("Event")
        );
        Ok(())
    })
}

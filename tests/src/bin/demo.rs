//! demo: a 2-node emulated cluster with 4 echo backends and a client pod; one
//! proxy-agent per node balances 200 TCP connections and 200 UDP exchanges to
//! a ClusterIP Service, then shows `proxy-agent status`. Everything is torn
//! down at the end (also on failure or Ctrl-C).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tests::{Endpoint, EndpointSlice, Outcome, Pod, Proto, Service, Tally, TestBed};

const VIP: &str = "198.18.100.10";
const REQUESTS: usize = 200;
const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("==> demo finished: all requests were balanced through the Service VIP");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tests::install_interrupt_handler()?;
    let started = Instant::now();
    println!("==> building a 2-node cluster out of network namespaces");
    let mut bed = TestBed::new(2)?;
    println!(
        "    names start with {}; logs in {}",
        bed.prefix(),
        bed.dir().display()
    );
    for n in bed.nodes() {
        println!("    {}: {} (pods 198.19.{}.0/24)", n.name(), n.ip, n.index);
    }

    println!("==> starting 4 backend pods (tb-echo on tcp/8080 and udp/5353) and a client pod");
    let mut backends: Vec<Pod> = Vec::new();
    for (node, name) in [(1, "web-1a"), (1, "web-1b"), (2, "web-2a"), (2, "web-2b")] {
        let pod = bed.add_pod(node, name)?;
        bed.start_echo(&pod, &[8080], &[5353])?;
        println!("    {name:<7} on node{node}  {}", pod.ip);
        backends.push(pod);
    }
    let client = bed.add_pod(1, "client")?;
    println!("    client  on node1  {}", client.ip);

    println!(
        "==> writing Service demo/web (ClusterIP {VIP}: tcp/80 -> 8080, udp/53 -> 5353) and its EndpointSlice"
    );
    let svc = Service::cluster_ip("demo", "web", VIP)
        .port("http", 80, 8080, Proto::Tcp)
        .port("dns", 53, 5353, Proto::Udp);
    let mut slice = EndpointSlice::new("demo", "web", "abc12")
        .port("http", 8080, Proto::Tcp)
        .port("dns", 5353, Proto::Udp);
    for p in &backends {
        slice = slice.endpoint(Endpoint::ready(
            &p.ip.to_string(),
            &format!("node{}", p.node),
        ));
    }
    bed.write_manifest("web-service.yaml", &svc.to_yaml())?;
    bed.write_manifest("web-endpointslice.yaml", &slice.to_yaml())?;

    println!("==> starting proxy-agent on each node");
    let agents = bed.start_agents(Duration::from_secs(60))?;
    for a in &agents {
        println!(
            "    node{}: synced (generation {}), bpffs {}",
            a.node,
            a.generation().unwrap_or(0),
            a.bpffs.display()
        );
    }

    let vip_tcp: SocketAddr = format!("{VIP}:80").parse()?;
    let vip_udp: SocketAddr = format!("{VIP}:53").parse()?;
    println!("==> {REQUESTS} TCP connections from the client pod to {vip_tcp}");
    let tcp = bed.pod_requests(&client, Proto::Tcp, vip_tcp, REQUESTS, TIMEOUT)?;
    println!("==> {REQUESTS} UDP request/replies from the client pod to {vip_udp}");
    let udp = bed.pod_requests(&client, Proto::Udp, vip_udp, REQUESTS, TIMEOUT)?;

    let (t_tcp, t_udp) = (Tally::new(&tcp), Tally::new(&udp));
    println!();
    println!(
        "  {:<8} {:<6} {:<12} {:>5} {:>5}",
        "backend", "node", "pod IP", "TCP", "UDP"
    );
    for p in &backends {
        println!(
            "  {:<8} {:<6} {:<12} {:>5} {:>5}",
            p.name,
            format!("node{}", p.node),
            p.ip.to_string(),
            t_tcp.per_backend.get(&p.name).copied().unwrap_or(0),
            t_udp.per_backend.get(&p.name).copied().unwrap_or(0)
        );
    }
    println!(
        "  {:<8} {:<6} {:<12} {:>5} {:>5}",
        "failed",
        "",
        "",
        t_tcp.failures.len(),
        t_udp.failures.len()
    );
    println!();

    let mut problems = Vec::new();
    for (what, outcomes, tally, vip) in [
        ("TCP", &tcp, &t_tcp, vip_tcp),
        ("UDP", &udp, &t_udp, vip_udp),
    ] {
        if let Err(e) = tally.expect_no_failures() {
            problems.push(format!("{what}: {e:#}"));
        }
        let names: Vec<&str> = backends.iter().map(|p| p.name.as_str()).collect();
        if let Err(e) = tally.expect_spread(&names, 0.5) {
            problems.push(format!("{what}: {e:#}"));
        }
        problems.extend(view_problems(what, outcomes, vip, &client));
    }

    println!("==> proxy-agent status (node1)");
    match agents[0].status_table() {
        Ok(s) => println!("{}", s.trim_end()),
        Err(e) => problems.push(format!("status: {e:#}")),
    }
    println!();

    println!("==> tearing down");
    drop(bed);
    println!("    done in {:.1} s", started.elapsed().as_secs_f64());
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

/// The client must only ever see the VIP, and backends must see the client pod's
/// own address (no SNAT for pod -> ClusterIP).
fn view_problems(what: &str, outcomes: &[Outcome], vip: SocketAddr, client: &Pod) -> Vec<String> {
    let mut wrong: BTreeMap<String, usize> = BTreeMap::new();
    for r in outcomes.iter().flatten() {
        if r.peer != vip {
            *wrong
                .entry(format!("client saw peer {}", r.peer))
                .or_default() += 1;
        }
        if r.client.ip() != std::net::IpAddr::V4(client.ip) {
            *wrong
                .entry(format!("backend saw source {}", r.client.ip()))
                .or_default() += 1;
        }
    }
    wrong
        .into_iter()
        .map(|(w, n)| format!("{what}: {w} ({n} times)"))
        .collect()
}

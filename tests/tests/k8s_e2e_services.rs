//! Kubernetes' own sig-network e2e cases about the Service proxy, ported to the emulated cluster.
//!
//! Each test is named after one upstream case (kubernetes/kubernetes test/e2e/network/
//! service.go, networking.go or conntrack.go; the doc comment quotes the upstream title) and
//! runs it twice: once with the agents reading manifest files (`--manifests`), once with the
//! agents watching the test API server (`--kubeconfig`, real kube-rs over HTTP). Traffic is real
//! TCP and UDP from pods (a process in the pod's cgroup: the socket-LB path; a thread in the pod's
//! network namespace: the tc path), from a node itself, and from the external client (NodePort
//! from outside: XDP and tc on the LAN interface).
//!
//! How the bed stands in for what it lacks: there is no kubelet or controller manager, so the
//! test plays the EndpointSlice controller (it writes the slices a controller would write for the
//! pods it starts, with the conditions the pods' states imply) and the kubelet (a "pod" is a
//! network namespace running tb-echo; "deleting" it kills the server and removes its endpoint).
//! Upstream waits up to KubeProxyLagTimeout for the proxy to catch up; here every expectation is
//! polled for up to `LAG`.
//!
//! Needs root and the agent binary; fails, never skips.
use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tests::{
    Agent, EXT_IP, Endpoint, EndpointSlice, Outcome, Pod, Proto, Service, Tally, TestBed,
    apiserver::ApiServer, manifests, node_ip, tcp_requests, udp_requests,
};

/// Per-request timeout.
const T: Duration = Duration::from_secs(2);
/// Time an agent may take to load, attach and program its first sync.
const SYNC: Duration = Duration::from_secs(60);
/// How long a change may take to show in traffic (upstream: KubeProxyLagTimeout).
const LAG: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Src {
    Manifests,
    Kube,
}

impl fmt::Display for Src {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Src::Manifests => "manifests source",
            Src::Kube => "kube source",
        })
    }
}

/// Where a client's traffic is translated.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// A process in the pod's cgroup: connect/sendmsg hooks.
    SocketLb,
    /// A thread in the pod's network namespace, outside the cgroup: tc on the pod's veth.
    Tc,
}

const PATHS: [Path; 2] = [Path::SocketLb, Path::Tc];

/// One emulated cluster with one source of objects. Field order matters: the API server (in
/// node1's namespace) stops before the bed removes the namespaces.
struct Cluster {
    api: Option<ApiServer>,
    bed: TestBed,
    src: Src,
    kubeconfig: PathBuf,
    agents: Vec<Agent>,
}

impl Cluster {
    fn new(src: Src, nodes: u8) -> Result<Cluster> {
        let bed = TestBed::new(nodes).context("building the test bed (needs root)")?;
        let kubeconfig = bed.dir().join("kubeconfig");
        let api = match src {
            Src::Manifests => None,
            Src::Kube => {
                let server = ApiServer::start(
                    Some(&bed.node(1).ns),
                    SocketAddr::from(([198, 18, 0, 1], 16443)),
                )?;
                server.write_kubeconfig(&kubeconfig)?;
                for n in bed.nodes() {
                    server.apply(json!({
                        "apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": n.name(), "labels": {"topology.kubernetes.io/zone": "z1"}},
                    }));
                }
                Some(server)
            }
        };
        Ok(Cluster {
            api,
            bed,
            src,
            kubeconfig,
            agents: Vec::new(),
        })
    }

    fn file(kind: &str, ns: &str, name: &str) -> String {
        format!("{}-{ns}-{name}.yaml", kind.to_lowercase())
    }

    /// Creates or replaces an object (a manifest file per object, or an API write).
    fn put(&self, obj: Value) -> Result<()> {
        match &self.api {
            None => {
                let f = Self::file(
                    obj["kind"].as_str().unwrap_or_default(),
                    obj["metadata"]["namespace"].as_str().unwrap_or("default"),
                    obj["metadata"]["name"].as_str().unwrap_or_default(),
                );
                self.bed.write_manifest(&f, &manifests::to_yaml(&obj))
            }
            Some(api) => {
                api.apply(obj);
                Ok(())
            }
        }
    }

    fn delete(&self, kind: &str, ns: &str, name: &str) -> Result<()> {
        match &self.api {
            None => self.bed.remove_manifest(&Self::file(kind, ns, name)),
            Some(api) => {
                ensure!(api.delete(kind, Some(ns), name), "no {kind} {ns}/{name}");
                Ok(())
            }
        }
    }

    fn start_agents(&mut self, extra: &[&str]) -> Result<()> {
        let nodes: Vec<u8> = self.bed.nodes().iter().map(|n| n.index).collect();
        for n in nodes {
            let a = match self.src {
                Src::Manifests => {
                    let dir = self.bed.manifests_dir().to_path_buf();
                    self.bed.start_agent_with(n, &dir, extra)?
                }
                Src::Kube => self.bed.start_agent_kube(n, &self.kubeconfig, extra)?,
            };
            self.agents.push(a);
        }
        for a in &self.agents {
            a.wait_for_sync(1, SYNC)?;
        }
        Ok(())
    }

    /// A pod on `node` serving tb-echo on `tcp` and `udp`.
    fn backend(&mut self, node: u8, name: &str, tcp: &[u16], udp: &[u16]) -> Result<(Pod, u32)> {
        let p = self.bed.add_pod(node, name)?;
        let pid = self.bed.start_echo(&p, tcp, udp)?;
        Ok((p, pid))
    }

    /// `count` requests from `client` on `path`.
    fn requests(
        &self,
        client: &Pod,
        path: Path,
        proto: Proto,
        addr: SocketAddr,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Outcome>> {
        match (path, proto) {
            (Path::SocketLb, _) => self.bed.pod_requests(client, proto, addr, count, timeout),
            (Path::Tc, Proto::Tcp) => tcp_requests(&client.ns, addr, count, timeout),
            (Path::Tc, Proto::Udp) => udp_requests(&client.ns, addr, count, timeout),
        }
    }

    /// `count` requests from a process on node `node` itself (host network, in the node's
    /// cgroup, where socket LB is attached).
    fn node_requests(
        &self,
        node: u8,
        proto: Proto,
        addr: SocketAddr,
        count: usize,
    ) -> Result<Vec<Outcome>> {
        let n = self.bed.node(node);
        self.bed
            .client_requests(&n.ns, n.cgroup.as_deref(), proto, addr, count, T)
    }

    /// Polls until every one of `count` requests from `client` on `path` is answered by a
    /// backend of `want` and every backend of `want` answered at least once; the client must see
    /// `addr` as its peer.
    fn expect_backends(
        &self,
        what: &str,
        client: &Pod,
        path: Path,
        proto: Proto,
        addr: SocketAddr,
        want: &[&Pod],
    ) -> Result<Tally> {
        let names: BTreeSet<&str> = want.iter().map(|p| p.name.as_str()).collect();
        let count = 12 * want.len().max(1);
        eventually(&format!("{what} ({path:?} {proto:?} to {addr})"), || {
            let out = self.requests(client, path, proto, addr, count, T)?;
            let tally = Tally::new(&out);
            tally.expect_no_failures()?;
            let got: BTreeSet<&str> = tally.per_backend.keys().map(String::as_str).collect();
            ensure!(got == names, "answered by {got:?}, want {names:?}");
            for r in out.iter().flatten() {
                ensure!(
                    r.peer == addr,
                    "client saw peer {} instead of {addr}",
                    r.peer
                );
            }
            Ok(tally)
        })
    }

    /// [`Cluster::expect_backends`] on the socket-LB path and on the tc path.
    fn expect_backends_all(
        &self,
        what: &str,
        client: &Pod,
        proto: Proto,
        addr: SocketAddr,
        want: &[&Pod],
    ) -> Result<()> {
        for path in PATHS {
            self.expect_backends(what, client, path, proto, addr, want)?;
        }
        Ok(())
    }

    /// [`Cluster::expect_down`] on the socket-LB path and on the tc path.
    fn expect_down_all(
        &self,
        what: &str,
        client: &Pod,
        proto: Proto,
        addr: SocketAddr,
    ) -> Result<()> {
        for path in PATHS {
            self.expect_down(what, client, path, proto, addr)?;
        }
        Ok(())
    }

    /// Polls until requests from `client` on `path` fail (nothing answers).
    fn expect_down(
        &self,
        what: &str,
        client: &Pod,
        path: Path,
        proto: Proto,
        addr: SocketAddr,
    ) -> Result<()> {
        eventually(&format!("{what} ({path:?} {proto:?} to {addr})"), || {
            let out = self.requests(client, path, proto, addr, 3, Duration::from_millis(500))?;
            let t = Tally::new(&out);
            ensure!(t.ok == 0, "still answered: {t}");
            Ok(())
        })
    }

    fn ext_requests(&self, proto: Proto, addr: SocketAddr, count: usize) -> Result<Vec<Outcome>> {
        let ns = self.bed.ext_ns().to_string();
        match proto {
            Proto::Tcp => tcp_requests(&ns, addr, count, T),
            Proto::Udp => udp_requests(&ns, addr, count, T),
        }
    }

    /// Polls until requests from the external client to `addr` are answered by exactly `want`.
    fn expect_external(
        &self,
        what: &str,
        proto: Proto,
        addr: SocketAddr,
        want: &[&Pod],
    ) -> Result<Vec<Outcome>> {
        let names: BTreeSet<&str> = want.iter().map(|p| p.name.as_str()).collect();
        eventually(&format!("{what} (external {proto:?} to {addr})"), || {
            let out = self.ext_requests(proto, addr, 12 * want.len().max(1))?;
            let tally = Tally::new(&out);
            tally.expect_no_failures()?;
            let got: BTreeSet<&str> = tally.per_backend.keys().map(String::as_str).collect();
            ensure!(got == names, "answered by {got:?}, want {names:?}");
            Ok(out)
        })
    }
}

/// Retries `f` until it succeeds or `LAG` passes; the error is the last attempt's.
fn eventually<R>(what: &str, mut f: impl FnMut() -> Result<R>) -> Result<R> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(r) => return Ok(r),
            Err(e) if start.elapsed() > LAG => {
                return Err(e.context(format!("{what}: not within {LAG:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
        tests::check_interrupted()?;
    }
}

/// Runs one upstream case with each source on a fresh bed of `nodes` nodes.
fn for_each_source(nodes: u8, case: impl Fn(&mut Cluster) -> Result<()>) {
    for src in [Src::Manifests, Src::Kube] {
        let mut c = Cluster::new(src, nodes).expect("building the cluster (needs root)");
        if let Err(e) = case(&mut c) {
            c.bed.keep_dir();
            eprintln!("{}", c.bed.log_tails(40));
            panic!("[{src}] {e:#}");
        }
    }
}

/// An IPv4 UDP socket in network namespace `ns`, bound to `port` (0: any), with a short read
/// timeout; usable from any thread afterwards.
fn udp_socket_in(ns: &str, port: u16) -> Result<std::net::UdpSocket> {
    let s = tests::in_netns(ns, || std::net::UdpSocket::bind(("0.0.0.0", port)))??;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(s)
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("address literal"), port)
}

/// The EndpointSlice an EndpointSlice controller writes for `pods` (all ready) of `service`.
fn slice(service: &str, suffix: &str, pods: &[&Pod], ports: &[(&str, u16, Proto)]) -> Value {
    let mut s = EndpointSlice::new("default", service, suffix);
    for p in pods {
        s = s.endpoint(Endpoint::ready(
            &p.ip.to_string(),
            &format!("node{}", p.node),
        ));
    }
    for (name, port, proto) in ports {
        s = s.port(name, *port, *proto);
    }
    s.to_value()
}

fn svc(name: &str, vip: &str) -> Service {
    Service::cluster_ip("default", name, vip)
}

/// service.go: "should serve a basic endpoint from pods" [Conformance]. The Service exists
/// before any pod; pods come and go and the Service follows.
#[test]
fn should_serve_a_basic_endpoint_from_pods() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.10";
        let (pod1, pid1) = c.backend(1, "ep-pod1", &[8080], &[])?;
        let (pod2, pid2) = c.backend(2, "ep-pod2", &[8080], &[])?;
        let client = c.bed.add_pod(1, "ep-client")?;
        let http = [("", 8080, Proto::Tcp)];
        c.put(
            svc("endpoint-test2", VIP)
                .port("", 80, 8080, Proto::Tcp)
                .to_value(),
        )?;
        c.put(slice("endpoint-test2", "a", &[], &http))?;
        c.start_agents(&[])?;
        let a = addr(VIP, 80);
        c.expect_down_all("no pods yet", &client, Proto::Tcp, a)?;
        c.put(slice("endpoint-test2", "a", &[&pod1], &http))?;
        c.expect_backends_all("pod1", &client, Proto::Tcp, a, &[&pod1])?;
        c.put(slice("endpoint-test2", "a", &[&pod1, &pod2], &http))?;
        c.expect_backends_all("pod1 and pod2", &client, Proto::Tcp, a, &[&pod1, &pod2])?;
        c.bed.kill(pid1)?;
        c.put(slice("endpoint-test2", "a", &[&pod2], &http))?;
        c.expect_backends_all("pod1 deleted", &client, Proto::Tcp, a, &[&pod2])?;
        c.bed.kill(pid2)?;
        c.put(slice("endpoint-test2", "a", &[], &http))?;
        c.expect_down_all("pod2 deleted", &client, Proto::Tcp, a)?;
        Ok(())
    });
}

/// service.go: "should serve multiport endpoints from pods" [Conformance]: two Service ports
/// whose targetPorts are port names that resolve to different numbers on different pods.
#[test]
fn should_serve_multiport_endpoints_from_pods() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.11";
        let (pod1, _) = c.backend(1, "mp-pod1", &[100], &[])?;
        let (pod2, _) = c.backend(2, "mp-pod2", &[101], &[])?;
        let client = c.bed.add_pod(1, "mp-client")?;
        let service = svc("multi-endpoint-test", VIP)
            .port("portname1", 80, "svc1", Proto::Tcp)
            .port("portname2", 81, "svc2", Proto::Tcp);
        c.put(service.to_value())?;
        // The controller writes one slice per distinct port set: pod1 has svc1 = 100 only,
        // pod2 has svc2 = 101 only.
        c.put(slice(
            "multi-endpoint-test",
            "p1",
            &[&pod1],
            &[("portname1", 100, Proto::Tcp)],
        ))?;
        c.start_agents(&[])?;
        let (p80, p81) = (addr(VIP, 80), addr(VIP, 81));
        c.expect_backends_all("portname1 -> pod1", &client, Proto::Tcp, p80, &[&pod1])?;
        c.put(slice(
            "multi-endpoint-test",
            "p2",
            &[&pod2],
            &[("portname2", 101, Proto::Tcp)],
        ))?;
        c.expect_backends_all("portname1 -> pod1", &client, Proto::Tcp, p80, &[&pod1])?;
        c.expect_backends_all("portname2 -> pod2", &client, Proto::Tcp, p81, &[&pod2])?;
        c.delete("EndpointSlice", "default", "multi-endpoint-test-p1")?;
        c.expect_down_all("pod1 deleted", &client, Proto::Tcp, p80)?;
        c.expect_backends_all(
            "portname2 still -> pod2",
            &client,
            Proto::Tcp,
            p81,
            &[&pod2],
        )?;
        Ok(())
    });
}

/// service.go: "should be updated after adding or deleting ports": a port added to a running
/// Service starts to serve, a removed one stops, the other keeps serving.
#[test]
fn should_be_updated_after_adding_or_deleting_ports() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.12";
        let (pod, _) = c.backend(2, "ports-pod", &[8080, 8081], &[5353])?;
        let client = c.bed.add_pod(1, "ports-client")?;
        let one = svc("edit-port-test", VIP).port("tcp-port", 80, 8080, Proto::Tcp);
        c.put(one.to_value())?;
        c.put(slice(
            "edit-port-test",
            "a",
            &[&pod],
            &[("tcp-port", 8080, Proto::Tcp)],
        ))?;
        c.start_agents(&[])?;
        c.expect_backends(
            "one port",
            &client,
            Path::SocketLb,
            Proto::Tcp,
            addr(VIP, 80),
            &[&pod],
        )?;
        let three = one.clone().port("tcp-port2", 81, 8081, Proto::Tcp).port(
            "udp-port",
            53,
            5353,
            Proto::Udp,
        );
        c.put(three.to_value())?;
        c.put(slice(
            "edit-port-test",
            "a",
            &[&pod],
            &[
                ("tcp-port", 8080, Proto::Tcp),
                ("tcp-port2", 8081, Proto::Tcp),
                ("udp-port", 5353, Proto::Udp),
            ],
        ))?;
        c.expect_backends_all(
            "added tcp port",
            &client,
            Proto::Tcp,
            addr(VIP, 81),
            &[&pod],
        )?;
        c.expect_backends_all(
            "added udp port",
            &client,
            Proto::Udp,
            addr(VIP, 53),
            &[&pod],
        )?;
        let back = svc("edit-port-test", VIP).port("tcp-port2", 81, 8081, Proto::Tcp);
        c.put(back.to_value())?;
        c.put(slice(
            "edit-port-test",
            "a",
            &[&pod],
            &[("tcp-port2", 8081, Proto::Tcp)],
        ))?;
        c.expect_down_all("deleted tcp port", &client, Proto::Tcp, addr(VIP, 80))?;
        c.expect_down_all("deleted udp port", &client, Proto::Udp, addr(VIP, 53))?;
        c.expect_backends_all("kept port", &client, Proto::Tcp, addr(VIP, 81), &[&pod])?;
        Ok(())
    });
}

/// service.go: "should preserve source pod IP for traffic thru service cluster IP"
/// [LinuxOnly]: the backend sees the client pod's own address, from the backend's node and from
/// another node.
#[test]
fn should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.13";
        let (server, _) = c.backend(1, "src-server", &[8080], &[])?;
        let near = c.bed.add_pod(1, "src-near")?;
        let far = c.bed.add_pod(2, "src-far")?;
        c.put(
            svc("sourceip-test", VIP)
                .port("", 8080, 8080, Proto::Tcp)
                .to_value(),
        )?;
        c.put(slice(
            "sourceip-test",
            "a",
            &[&server],
            &[("", 8080, Proto::Tcp)],
        ))?;
        c.start_agents(&[])?;
        for client in [&near, &far] {
            for path in PATHS {
                c.expect_backends(
                    "reachable",
                    client,
                    path,
                    Proto::Tcp,
                    addr(VIP, 8080),
                    &[&server],
                )?;
                let out = c.requests(client, path, Proto::Tcp, addr(VIP, 8080), 5, T)?;
                for r in out.iter().flatten() {
                    ensure!(
                        r.client.ip() == IpAddr::V4(client.ip),
                        "{path:?} from {}: the server saw {} instead of {}",
                        client.name,
                        r.client.ip(),
                        client.ip
                    );
                }
            }
        }
        Ok(())
    });
}

/// service.go: "should allow pods to hairpin back to themselves through services": a pod
/// reaches its own Service and is picked itself.
#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.14";
        let (pod, _) = c.backend(1, "hairpin", &[8080], &[5353])?;
        c.put(
            svc("hairpin-test", VIP)
                .port("tcp", 8080, 8080, Proto::Tcp)
                .port("udp", 53, 5353, Proto::Udp)
                .to_value(),
        )?;
        c.put(slice(
            "hairpin-test",
            "a",
            &[&pod],
            &[("tcp", 8080, Proto::Tcp), ("udp", 5353, Proto::Udp)],
        ))?;
        c.start_agents(&[])?;
        c.expect_backends_all("hairpin", &pod, Proto::Tcp, addr(VIP, 8080), &[&pod])?;
        c.expect_backends_all("hairpin", &pod, Proto::Udp, addr(VIP, 53), &[&pod])?;
        Ok(())
    });
}

/// service.go: "should be able to up and down services": two Services up, one removed (down,
/// the other still up), a third added (both up).
#[test]
fn should_be_able_to_up_and_down_services() {
    for_each_source(2, |c| {
        let mut pods = Vec::new();
        for (i, node) in [(1, 1u8), (2, 2), (3, 1)] {
            let (p, _) = c.backend(node, &format!("updown-{i}"), &[9376], &[])?;
            pods.push(p);
        }
        let client = c.bed.add_pod(2, "updown-client")?;
        let vips = ["198.18.102.21", "198.18.102.22", "198.18.102.23"];
        for i in 0..2 {
            let name = format!("service{}", i + 1);
            c.put(
                svc(&name, vips[i])
                    .port("", 80, 9376, Proto::Tcp)
                    .to_value(),
            )?;
            c.put(slice(&name, "a", &[&pods[i]], &[("", 9376, Proto::Tcp)]))?;
        }
        c.start_agents(&[])?;
        c.expect_backends_all(
            "service1 up",
            &client,
            Proto::Tcp,
            addr(vips[0], 80),
            &[&pods[0]],
        )?;
        c.expect_backends_all(
            "service2 up",
            &client,
            Proto::Tcp,
            addr(vips[1], 80),
            &[&pods[1]],
        )?;
        c.delete("Service", "default", "service1")?;
        c.delete("EndpointSlice", "default", "service1-a")?;
        c.expect_down_all("service1 stopped", &client, Proto::Tcp, addr(vips[0], 80))?;
        c.expect_backends_all(
            "service2 still up",
            &client,
            Proto::Tcp,
            addr(vips[1], 80),
            &[&pods[1]],
        )?;
        c.put(
            svc("service3", vips[2])
                .port("", 80, 9376, Proto::Tcp)
                .to_value(),
        )?;
        c.put(slice(
            "service3",
            "a",
            &[&pods[2]],
            &[("", 9376, Proto::Tcp)],
        ))?;
        c.expect_backends_all(
            "service2 still up",
            &client,
            Proto::Tcp,
            addr(vips[1], 80),
            &[&pods[1]],
        )?;
        c.expect_backends_all(
            "service3 up",
            &client,
            Proto::Tcp,
            addr(vips[2], 80),
            &[&pods[2]],
        )?;
        Ok(())
    });
}

/// service.go: "should work after the service has been recreated": the same Service deleted
/// and created again (same cluster IP) serves again.
#[test]
fn should_work_after_the_service_has_been_recreated() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.24";
        let (pod, _) = c.backend(2, "recreate", &[9376], &[])?;
        let client = c.bed.add_pod(1, "recreate-client")?;
        let s = svc("service1", VIP).port("", 80, 9376, Proto::Tcp);
        c.put(s.to_value())?;
        c.put(slice("service1", "a", &[&pod], &[("", 9376, Proto::Tcp)]))?;
        c.start_agents(&[])?;
        c.expect_backends(
            "up",
            &client,
            Path::SocketLb,
            Proto::Tcp,
            addr(VIP, 80),
            &[&pod],
        )?;
        c.delete("Service", "default", "service1")?;
        c.expect_down(
            "deleted",
            &client,
            Path::SocketLb,
            Proto::Tcp,
            addr(VIP, 80),
        )?;
        c.put(s.to_value())?;
        c.expect_backends_all("recreated", &client, Proto::Tcp, addr(VIP, 80), &[&pod])?;
        Ok(())
    });
}

/// service.go: "should work after restarting kube-proxy [Disruptive]": the agents restart
/// and every Service keeps working, including a flow that was open across the restart.
#[test]
fn should_work_after_restarting_kube_proxy() {
    for_each_source(2, |c| {
        let vips = ["198.18.102.25", "198.18.102.26"];
        let (p1, _) = c.backend(1, "restart-1", &[9376], &[])?;
        let (p2, _) = c.backend(2, "restart-2", &[9376], &[])?;
        let client = c.bed.add_pod(1, "restart-client")?;
        for (i, p) in [&p1, &p2].into_iter().enumerate() {
            let name = format!("service{}", i + 1);
            c.put(
                svc(&name, vips[i])
                    .port("", 80, 9376, Proto::Tcp)
                    .to_value(),
            )?;
            c.put(slice(&name, "a", &[p], &[("", 9376, Proto::Tcp)]))?;
        }
        c.start_agents(&[])?;
        c.expect_backends_all("before", &client, Proto::Tcp, addr(vips[0], 80), &[&p1])?;
        c.expect_backends_all("before", &client, Proto::Tcp, addr(vips[1], 80), &[&p2])?;
        let old = std::mem::take(&mut c.agents);
        for a in &old {
            c.bed.stop_agent(a);
        }
        // Nothing runs now: the pinned datapath keeps serving.
        c.expect_backends_all("no agent", &client, Proto::Tcp, addr(vips[0], 80), &[&p1])?;
        c.start_agents(&[])?;
        c.expect_backends_all("after", &client, Proto::Tcp, addr(vips[0], 80), &[&p1])?;
        c.expect_backends_all("after", &client, Proto::Tcp, addr(vips[1], 80), &[&p2])?;
        Ok(())
    });
}

fn nodeport_service(name: &str, vip: &str, tcp_np: u16, udp_np: u16) -> Service {
    svc(name, vip).type_("NodePort").spec(
        "ports",
        json!([
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": tcp_np},
            {"name": "udp", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": udp_np},
        ]),
    )
}

const NP_PORTS: [(&str, u16, Proto); 2] = [("http", 8080, Proto::Tcp), ("udp", 5353, Proto::Udp)];

/// service.go: "should be able to create a functioning NodePort service" [Conformance], and
/// networking.go "Granular Checks: Services should function for node-Service: http/udp" and
/// "should function for endpoint-Service": the nodePort answers on every node's address from
/// outside (XDP/tc on the LAN interface), from a node itself, and from a backend pod.
#[test]
fn should_be_able_to_create_a_functioning_nodeport_service() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.30";
        let (a, _) = c.backend(1, "np-a", &[8080], &[5353])?;
        let (b, _) = c.backend(2, "np-b", &[8080], &[5353])?;
        c.put(nodeport_service("nodeport-test", VIP, 30180, 30153).to_value())?;
        c.put(slice("nodeport-test", "a", &[&a, &b], &NP_PORTS))?;
        c.start_agents(&[])?;
        for node in [1u8, 2] {
            c.expect_external(
                "nodePort tcp",
                Proto::Tcp,
                SocketAddr::new(node_ip(node).into(), 30180),
                &[&a, &b],
            )?;
            c.expect_external(
                "nodePort udp",
                Proto::Udp,
                SocketAddr::new(node_ip(node).into(), 30153),
                &[&a, &b],
            )?;
        }
        // node-Service: a host process on node2 to the cluster IP and to node1's nodePort.
        for (proto, target) in [(Proto::Tcp, addr(VIP, 80)), (Proto::Udp, addr(VIP, 53))] {
            eventually("node-Service", || {
                let out = c.node_requests(2, proto, target, 24)?;
                let t = Tally::new(&out);
                t.expect_no_failures()?;
                t.expect_spread(&["np-a", "np-b"], 0.2)
            })?;
        }
        // endpoint-Service: a backend pod to its own Service's cluster IP.
        c.expect_backends_all("endpoint-Service", &a, Proto::Tcp, addr(VIP, 80), &[&a, &b])?;
        c.expect_backends_all("endpoint-Service", &a, Proto::Udp, addr(VIP, 53), &[&a, &b])?;
        Ok(())
    });
}

/// service.go: "should be able to update service type to NodePort listening on same port
/// number but different protocols": a ClusterIP TCP Service becomes a NodePort Service with
/// TCP and UDP on the same port number; both protocols answer on the cluster IP and the nodePort.
#[test]
fn should_be_able_to_update_service_type_to_nodeport_listening_on_same_port_number_but_different_protocols()
 {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.31";
        let (pod, _) = c.backend(2, "proto-pod", &[53], &[53])?;
        let client = c.bed.add_pod(1, "proto-client")?;
        c.put(
            svc("nodeport-update-service", VIP)
                .port("tcp-port", 53, 53, Proto::Tcp)
                .to_value(),
        )?;
        c.put(slice(
            "nodeport-update-service",
            "a",
            &[&pod],
            &[("tcp-port", 53, Proto::Tcp)],
        ))?;
        c.start_agents(&[])?;
        c.expect_backends(
            "ClusterIP tcp",
            &client,
            Path::SocketLb,
            Proto::Tcp,
            addr(VIP, 53),
            &[&pod],
        )?;
        let np = svc("nodeport-update-service", VIP).type_("NodePort").spec(
            "ports",
            json!([
                {"name": "tcp-port", "port": 53, "targetPort": 53, "protocol": "TCP", "nodePort": 30253},
                {"name": "udp-port", "port": 53, "targetPort": 53, "protocol": "UDP", "nodePort": 30253},
            ]),
        );
        c.put(np.to_value())?;
        c.put(slice(
            "nodeport-update-service",
            "a",
            &[&pod],
            &[("tcp-port", 53, Proto::Tcp), ("udp-port", 53, Proto::Udp)],
        ))?;
        c.expect_backends_all("tcp", &client, Proto::Tcp, addr(VIP, 53), &[&pod])?;
        c.expect_backends_all("udp", &client, Proto::Udp, addr(VIP, 53), &[&pod])?;
        for proto in [Proto::Tcp, Proto::Udp] {
            c.expect_external(
                "nodePort",
                proto,
                SocketAddr::new(node_ip(1).into(), 30253),
                &[&pod],
            )?;
        }
        Ok(())
    });
}

/// service.go: "should serve endpoints on same port and different protocols" [Conformance]:
/// TCP and UDP on one port number of one Service reach their own endpoints' ports.
#[test]
fn should_serve_endpoints_on_same_port_and_different_protocols() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.32";
        let (pod, _) = c.backend(2, "sameport", &[8080], &[5353])?;
        let client = c.bed.add_pod(1, "sameport-client")?;
        c.put(
            svc("multiprotocol-test", VIP)
                .port("tcp-port", 80, 8080, Proto::Tcp)
                .port("udp-port", 80, 5353, Proto::Udp)
                .to_value(),
        )?;
        c.put(slice(
            "multiprotocol-test",
            "a",
            &[&pod],
            &[
                ("tcp-port", 8080, Proto::Tcp),
                ("udp-port", 5353, Proto::Udp),
            ],
        ))?;
        c.start_agents(&[])?;
        for path in PATHS {
            let t = c.expect_backends("tcp", &client, path, Proto::Tcp, addr(VIP, 80), &[&pod])?;
            ensure!(
                t.per_backend_port.keys().all(|(_, p)| *p == 8080),
                "tcp went to {t}"
            );
            let u = c.expect_backends("udp", &client, path, Proto::Udp, addr(VIP, 80), &[&pod])?;
            ensure!(
                u.per_backend_port.keys().all(|(_, p)| *p == 5353),
                "udp went to {u}"
            );
        }
        Ok(())
    });
}

fn external_name(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": "foo.example.com"},
    })
}

/// service.go: "should be able to change the type from ExternalName to ClusterIP",
/// "... from ClusterIP to ExternalName", "... from ExternalName to NodePort" and "... from
/// NodePort to ExternalName" [Conformance]: an ExternalName Service has nothing to proxy; once
/// it has a cluster IP (or a nodePort) it serves, and going back stops it.
#[test]
fn should_be_able_to_change_the_type_between_externalname_clusterip_and_nodeport() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.33";
        let (pod, _) = c.backend(2, "extname", &[8080], &[5353])?;
        let client = c.bed.add_pod(1, "extname-client")?;
        c.put(external_name("externalsvc"))?;
        c.put(slice("externalsvc", "a", &[&pod], &NP_PORTS))?;
        c.start_agents(&[])?;
        c.expect_down(
            "ExternalName",
            &client,
            Path::SocketLb,
            Proto::Tcp,
            addr(VIP, 80),
        )?;
        c.put(
            svc("externalsvc", VIP)
                .port("http", 80, 8080, Proto::Tcp)
                .port("udp", 53, 5353, Proto::Udp)
                .to_value(),
        )?;
        c.expect_backends_all(
            "ExternalName -> ClusterIP",
            &client,
            Proto::Tcp,
            addr(VIP, 80),
            &[&pod],
        )?;
        c.put(external_name("externalsvc"))?;
        c.expect_down_all(
            "ClusterIP -> ExternalName",
            &client,
            Proto::Tcp,
            addr(VIP, 80),
        )?;
        c.put(nodeport_service("externalsvc", VIP, 30380, 30353).to_value())?;
        let np = SocketAddr::new(node_ip(1).into(), 30380);
        c.expect_external("ExternalName -> NodePort", Proto::Tcp, np, &[&pod])?;
        c.put(external_name("externalsvc"))?;
        eventually("NodePort -> ExternalName", || {
            let t = Tally::new(&c.ext_requests(Proto::Tcp, np, 3)?);
            ensure!(t.ok == 0, "nodePort still answered: {t}");
            Ok(())
        })?;
        Ok(())
    });
}

fn affinity(s: Service, timeout: Option<u32>) -> Service {
    let s = s.spec("sessionAffinity", json!("ClientIP"));
    match timeout {
        Some(t) => s.spec(
            "sessionAffinityConfig",
            json!({"clientIP": {"timeoutSeconds": t}}),
        ),
        None => s,
    }
}

/// Every answered request by one backend; returns its name.
fn one_backend(out: &[Outcome]) -> Result<String> {
    let t = Tally::new(out);
    t.expect_no_failures()?;
    ensure!(t.per_backend.len() == 1, "affinity broken: {t}");
    Ok(t.per_backend.keys().next().cloned().unwrap_or_default())
}

/// service.go: "should have session affinity work for service with type clusterIP",
/// "should have session affinity timeout work for service with type clusterIP", "should be
/// able to switch session affinity for service with type clusterIP" [Conformance], and
/// networking.go "should function for client IP based session affinity: http/udp".
#[test]
fn should_have_session_affinity_work_and_switch_for_service_with_type_clusterip() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.34";
        const VIP_T: &str = "198.18.102.35";
        let mut pods = Vec::new();
        for (i, node) in [(1, 1u8), (2, 2), (3, 2)] {
            pods.push(c.backend(node, &format!("aff-{i}"), &[8080], &[5353])?.0);
        }
        let all: Vec<&Pod> = pods.iter().collect();
        let client = c.bed.add_pod(1, "aff-client")?;
        let base = svc("affinity-clusterip", VIP)
            .port("http", 80, 8080, Proto::Tcp)
            .port("udp", 53, 5353, Proto::Udp);
        c.put(affinity(base.clone(), None).to_value())?;
        c.put(slice("affinity-clusterip", "a", &all, &NP_PORTS))?;
        let timed = svc("affinity-clusterip-timeout", VIP_T).port("http", 80, 8080, Proto::Tcp);
        c.put(affinity(timed, Some(2)).to_value())?;
        c.put(slice(
            "affinity-clusterip-timeout",
            "a",
            &all,
            &[("http", 8080, Proto::Tcp)],
        ))?;
        c.start_agents(&[])?;
        for path in PATHS {
            for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
                eventually("affinity", || {
                    one_backend(&c.requests(&client, path, proto, addr(VIP, port), 20, T)?)
                })?;
            }
        }
        // Timeout: the same backend while requests come often; after more than the timeout of
        // silence, a new choice (upstream asserts "not always the same host" over many tries).
        let mut seen = BTreeSet::new();
        for _ in 0..8 {
            let b = eventually("affinity with timeout", || {
                one_backend(&c.requests(
                    &client,
                    Path::SocketLb,
                    Proto::Tcp,
                    addr(VIP_T, 80),
                    5,
                    T,
                )?)
            })?;
            seen.insert(b);
            if seen.len() > 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2500));
        }
        ensure!(
            seen.len() > 1,
            "affinity never expired after its 2 s timeout: always {seen:?}"
        );
        // Switch affinity off: the requests spread again.
        c.put(base.to_value())?;
        c.expect_backends_all("affinity off", &client, Proto::Tcp, addr(VIP, 80), &all)?;
        // And on again.
        c.put(affinity(base, None).to_value())?;
        for path in PATHS {
            eventually("affinity on again", || {
                one_backend(&c.requests(&client, path, Proto::Tcp, addr(VIP, 80), 20, T)?)
            })?;
        }
        Ok(())
    });
}

/// service.go: "should have session affinity work for NodePort service" and "should be able
/// to switch session affinity for NodePort service" [Conformance]: from outside, through the
/// nodePort, one client address keeps its backend.
#[test]
fn should_have_session_affinity_work_for_nodeport_service() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.36";
        let mut pods = Vec::new();
        for (i, node) in [(1, 1u8), (2, 2), (3, 2)] {
            pods.push(c.backend(node, &format!("npaff-{i}"), &[8080], &[5353])?.0);
        }
        let all: Vec<&Pod> = pods.iter().collect();
        let s = nodeport_service("affinity-nodeport", VIP, 30480, 30453);
        c.put(affinity(s.clone(), None).to_value())?;
        c.put(slice("affinity-nodeport", "a", &all, &NP_PORTS))?;
        c.start_agents(&[])?;
        for node in [1u8, 2] {
            for (proto, port) in [(Proto::Tcp, 30480), (Proto::Udp, 30453)] {
                let a = SocketAddr::new(node_ip(node).into(), port);
                eventually("NodePort affinity", || {
                    one_backend(&c.ext_requests(proto, a, 20)?)
                })?;
            }
        }
        c.put(s.to_value())?;
        c.expect_external(
            "affinity switched off",
            Proto::Tcp,
            SocketAddr::new(node_ip(1).into(), 30480),
            &all,
        )?;
        Ok(())
    });
}

/// service.go: "should implement service.kubernetes.io/service-proxy-name": a Service
/// labelled for another proxy is not served; removing the label makes it served.
#[test]
fn should_implement_service_kubernetes_io_service_proxy_name() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.37";
        const VIP2: &str = "198.18.102.38";
        let (pod, _) = c.backend(2, "spn", &[8080], &[])?;
        let client = c.bed.add_pod(1, "spn-client")?;
        let s = svc("service-proxy-disabled", VIP).port("", 80, 8080, Proto::Tcp);
        c.put(
            s.clone()
                .label("service.kubernetes.io/service-proxy-name", "foo-bar")
                .to_value(),
        )?;
        c.put(slice(
            "service-proxy-disabled",
            "a",
            &[&pod],
            &[("", 8080, Proto::Tcp)],
        ))?;
        c.put(
            svc("service-proxy-toggled", VIP2)
                .port("", 80, 8080, Proto::Tcp)
                .to_value(),
        )?;
        c.put(slice(
            "service-proxy-toggled",
            "a",
            &[&pod],
            &[("", 8080, Proto::Tcp)],
        ))?;
        c.start_agents(&[])?;
        c.expect_backends_all("unlabelled", &client, Proto::Tcp, addr(VIP2, 80), &[&pod])?;
        c.expect_down_all(
            "labelled for another proxy",
            &client,
            Proto::Tcp,
            addr(VIP, 80),
        )?;
        c.put(s.to_value())?;
        c.expect_backends_all("label removed", &client, Proto::Tcp, addr(VIP, 80), &[&pod])?;
        Ok(())
    });
}

/// service.go: "should implement service.kubernetes.io/headless": a Service labelled
/// `service.kubernetes.io/headless` (any value) is not served, though it has a cluster IP;
/// adding the label to a served Service stops it, removing it serves it again.
#[test]
fn should_implement_service_kubernetes_io_headless() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.63";
        const VIP2: &str = "198.18.102.64";
        let (pod, _) = c.backend(2, "hl", &[8080], &[])?;
        let client = c.bed.add_pod(1, "hl-client")?;
        let headless = |s: Service| s.label("service.kubernetes.io/headless", "");
        let s = svc("service-headless", VIP).port("", 80, 8080, Proto::Tcp);
        let toggled = svc("service-headless-toggled", VIP2).port("", 80, 8080, Proto::Tcp);
        c.put(headless(s).to_value())?;
        c.put(toggled.to_value())?;
        for name in ["service-headless", "service-headless-toggled"] {
            c.put(slice(name, "a", &[&pod], &[("", 8080, Proto::Tcp)]))?;
        }
        c.start_agents(&[])?;
        c.expect_backends_all("unlabelled", &client, Proto::Tcp, addr(VIP2, 80), &[&pod])?;
        c.expect_down_all("labelled headless", &client, Proto::Tcp, addr(VIP, 80))?;
        c.put(headless(toggled.clone()).to_value())?;
        c.expect_down_all("label added", &client, Proto::Tcp, addr(VIP2, 80))?;
        c.put(toggled.to_value())?;
        c.expect_backends_all(
            "label removed",
            &client,
            Proto::Tcp,
            addr(VIP2, 80),
            &[&pod],
        )?;
        Ok(())
    });
}

/// service.go: "should fallback to terminating endpoints when there are no ready endpoints
/// with internalTrafficPolicy=Cluster" and "... with internalTrafficPolicy=Local" (local
/// terminating endpoints only), and "should not be able to connect to terminating and unready
/// endpoints if PublishNotReadyAddresses is false": serving-terminating endpoints are used only
/// when no endpoint is ready; unready, non-serving ones never.
#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.39";
        const VIP_L: &str = "198.18.102.40";
        let (ready, ready_pid) = c.backend(2, "term-ready", &[8080], &[])?;
        let (term1, _) = c.backend(1, "term-1", &[8080], &[])?;
        let (term2, _) = c.backend(2, "term-2", &[8080], &[])?;
        let (unready, _) = c.backend(2, "term-unready", &[8080], &[])?;
        let client = c.bed.add_pod(1, "term-client")?;
        let ep = |p: &Pod| Endpoint::ready(&p.ip.to_string(), &format!("node{}", p.node));
        let write = |c: &Cluster, name: &str, with_ready: bool| -> Result<()> {
            let mut s = EndpointSlice::new("default", name, "a")
                .port("", 8080, Proto::Tcp)
                .endpoint(ep(&term1).conditions(false, true, true))
                .endpoint(ep(&term2).conditions(false, true, true))
                .endpoint(ep(&unready).conditions(false, false, false));
            if with_ready {
                s = s.endpoint(ep(&ready));
            }
            c.put(s.to_value())
        };
        c.put(
            svc("svc-cluster", VIP)
                .port("", 80, 8080, Proto::Tcp)
                .to_value(),
        )?;
        c.put(
            svc("svc-local", VIP_L)
                .port("", 80, 8080, Proto::Tcp)
                .spec("internalTrafficPolicy", json!("Local"))
                .to_value(),
        )?;
        write(c, "svc-cluster", true)?;
        write(c, "svc-local", true)?;
        c.start_agents(&[])?;
        c.expect_backends_all("ready only", &client, Proto::Tcp, addr(VIP, 80), &[&ready])?;
        c.bed.kill(ready_pid)?;
        write(c, "svc-cluster", false)?;
        write(c, "svc-local", false)?;
        c.expect_backends_all(
            "terminating fallback",
            &client,
            Proto::Tcp,
            addr(VIP, 80),
            &[&term1, &term2],
        )?;
        c.expect_backends_all(
            "local terminating fallback",
            &client,
            Proto::Tcp,
            addr(VIP_L, 80),
            &[&term1],
        )?;
        Ok(())
    });
}

/// service.go: "should respect internalTrafficPolicy=Local Pod to Pod": with
/// internalTrafficPolicy Local a pod reaches only endpoints on its own node, and a node without
/// one gets no answer.
#[test]
fn should_respect_internal_traffic_policy_local_pod_to_pod() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.41";
        let (server, _) = c.backend(1, "itp-server", &[8080], &[5353])?;
        let near = c.bed.add_pod(1, "itp-near")?;
        let far = c.bed.add_pod(2, "itp-far")?;
        c.put(
            svc("itp-local", VIP)
                .port("http", 80, 8080, Proto::Tcp)
                .port("udp", 53, 5353, Proto::Udp)
                .spec("internalTrafficPolicy", json!("Local"))
                .to_value(),
        )?;
        c.put(slice("itp-local", "a", &[&server], &NP_PORTS))?;
        c.start_agents(&[])?;
        for path in PATHS {
            for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
                c.expect_backends("same node", &near, path, proto, addr(VIP, port), &[&server])?;
                c.expect_down("other node", &far, path, proto, addr(VIP, port))?;
                // Dropped ("has no local endpoints"), not rejected.
                let out = c.requests(&far, path, proto, addr(VIP, port), 1, T)?;
                for e in out.iter().filter_map(|o| o.as_ref().err()) {
                    ensure!(
                        !e.contains("refused"),
                        "{path:?}: rejected, not dropped: {e}"
                    );
                }
            }
        }
        Ok(())
    });
}

/// service.go: "should support externalTrafficPolicy=Local for type=NodePort": only the node
/// with a local endpoint answers on the nodePort, and the endpoint sees the client's address.
#[test]
fn should_support_external_traffic_policy_local_for_type_nodeport() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.42";
        let (server, _) = c.backend(2, "etp-server", &[8080], &[5353])?;
        c.put(
            nodeport_service("external-local-nodeport", VIP, 30580, 30553)
                .spec("externalTrafficPolicy", json!("Local"))
                .to_value(),
        )?;
        c.put(slice("external-local-nodeport", "a", &[&server], &NP_PORTS))?;
        c.start_agents(&[])?;
        let via2 = SocketAddr::new(node_ip(2).into(), 30580);
        let out = c.expect_external("node with the endpoint", Proto::Tcp, via2, &[&server])?;
        for r in out.iter().flatten() {
            ensure!(
                r.client.ip() == IpAddr::V4(EXT_IP),
                "source not preserved: {}",
                r.client
            );
        }
        let via1 = SocketAddr::new(node_ip(1).into(), 30580);
        let out = c.ext_requests(Proto::Tcp, via1, 3)?;
        let t = Tally::new(&out);
        ensure!(t.ok == 0, "node1 has no local endpoint but answered: {t}");
        // kube-proxy drops there ("has no local endpoints"), it does not reject: the client
        // times out.
        for e in out.iter().filter_map(|o| o.as_ref().err()) {
            ensure!(
                !e.contains("refused"),
                "node1 rejected instead of dropping: {e}"
            );
        }
        Ok(())
    });
}

/// service.go: "should be possible to connect to a service via ExternalIP when the external
/// IP is not assigned to a node": an externalIP that no node holds, routed to node1 by the
/// client, reaches the endpoints.
#[test]
fn should_be_possible_to_connect_to_a_service_via_external_ip_when_the_external_ip_is_not_assigned_to_a_node()
 {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.43";
        const EXT: &str = "198.18.103.43";
        let (server, _) = c.backend(2, "eip-server", &[8080], &[])?;
        c.put(
            svc("externalip-test", VIP)
                .port("http", 80, 8080, Proto::Tcp)
                .spec("externalIPs", json!([EXT]))
                .to_value(),
        )?;
        c.put(slice(
            "externalip-test",
            "a",
            &[&server],
            &[("http", 8080, Proto::Tcp)],
        ))?;
        c.start_agents(&[])?;
        let ext = c.bed.ext_ns().to_string();
        tests::cmd::ip(&[
            "-n",
            &ext,
            "route",
            "replace",
            &format!("{EXT}/32"),
            "via",
            &node_ip(1).to_string(),
        ])?;
        c.expect_external("externalIP", Proto::Tcp, addr(EXT, 80), &[&server])?;
        Ok(())
    });
}

/// conntrack.go: "should be able to preserve UDP traffic when server pod cycles for a
/// ClusterIP service" and "... for a NodePort service": a client that keeps sending from one
/// source port reaches the new server after the old one is gone (its stale flow is cleared).
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.44";
        let (old, old_pid) = c.backend(2, "cycle-old", &[8080], &[5353])?;
        let client = c.bed.add_pod(1, "cycle-client")?;
        c.put(nodeport_service("svc-udp", VIP, 30680, 30653).to_value())?;
        c.put(slice("svc-udp", "a", &[&old], &NP_PORTS))?;
        c.start_agents(&[])?;
        let targets = [
            ("ClusterIP", client.ns.clone(), addr(VIP, 53)),
            (
                "NodePort",
                c.bed.ext_ns().to_string(),
                SocketAddr::new(node_ip(1).into(), 30653),
            ),
        ];
        // One socket per target, bound to a fixed source port for the whole test, as
        // upstream's `nc -u -p 12345` loop.
        let socks: Vec<std::net::UdpSocket> = targets
            .iter()
            .map(|(_, ns, _)| udp_socket_in(ns, 12345))
            .collect::<Result<_>>()?;
        let ask = |s: &std::net::UdpSocket, to: SocketAddr| -> Result<String> {
            s.send_to(b"hostname\n", to)?;
            let mut buf = [0u8; 512];
            let (n, _) = s.recv_from(&mut buf).context("no reply")?;
            let line = String::from_utf8_lossy(&buf[..n]).to_string();
            Ok(line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string())
        };
        for ((what, _, to), s) in targets.iter().zip(&socks) {
            eventually(what, || {
                let b = ask(s, *to)?;
                ensure!(b == "cycle-old", "answered by {b}");
                Ok(())
            })?;
        }
        let (new, _) = c.backend(1, "cycle-new", &[8080], &[5353])?;
        c.bed.kill(old_pid)?;
        c.put(slice("svc-udp", "a", &[&new], &NP_PORTS))?;
        for ((what, _, to), s) in targets.iter().zip(&socks) {
            eventually(&format!("{what} after the server cycled"), || {
                let b = ask(s, *to)?;
                ensure!(b == "cycle-new", "answered by {b}");
                Ok(())
            })?;
        }
        Ok(())
    });
}

/// conntrack.go: "should be able to preserve UDP traffic when initial unready endpoints get
/// ready": a client that sent while the only endpoint was not ready is answered once it is.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_initial_unready_endpoints_get_ready() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.45";
        let (server, _) = c.backend(2, "unready-server", &[], &[5353])?;
        let client = c.bed.add_pod(1, "unready-client")?;
        c.put(
            svc("svc-udp-unready", VIP)
                .port("udp", 80, 5353, Proto::Udp)
                .to_value(),
        )?;
        let ep = Endpoint::ready(&server.ip.to_string(), "node2");
        c.put(
            EndpointSlice::new("default", "svc-udp-unready", "a")
                .port("udp", 5353, Proto::Udp)
                .endpoint(ep.clone().conditions(false, false, false))
                .to_value(),
        )?;
        c.start_agents(&[])?;
        let sock = udp_socket_in(&client.ns, 12346)?;
        let to = addr(VIP, 80);
        let mut buf = [0u8; 512];
        for _ in 0..3 {
            sock.send_to(b"x\n", to)?;
            ensure!(
                sock.recv_from(&mut buf).is_err(),
                "answered while no endpoint was ready"
            );
        }
        c.put(
            EndpointSlice::new("default", "svc-udp-unready", "a")
                .port("udp", 5353, Proto::Udp)
                .endpoint(ep)
                .to_value(),
        )?;
        eventually("ready endpoint answers the same flow", || {
            sock.send_to(b"x\n", to)?;
            let (n, _) = sock.recv_from(&mut buf).context("no reply")?;
            ensure!(String::from_utf8_lossy(&buf[..n]).starts_with("unready-server"));
            Ok(())
        })?;
        Ok(())
    });
}

/// networking.go: "Granular Checks: Services should be able to handle large requests: udp"
/// and "...: http": a UDP datagram larger than the path MTU (sent in IPv4 fragments) and large
/// TCP requests and answers (many segments each way) cross the cluster IP and the nodePort.
#[test]
fn should_be_able_to_handle_large_requests() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.46";
        let server = c.bed.add_pod(2, "large")?;
        c.bed.start_echo_streams(&server, &[], &[5353], &[8081])?;
        let client = c.bed.add_pod(1, "large-client")?;
        let s = svc("large", VIP).type_("NodePort").spec(
            "ports",
            json!([
                {"name": "stream", "port": 81, "targetPort": 8081, "protocol": "TCP", "nodePort": 30781},
                {"name": "udp", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30753},
            ]),
        );
        c.put(s.to_value())?;
        c.put(slice(
            "large",
            "a",
            &[&server],
            &[("stream", 8081, Proto::Tcp), ("udp", 5353, Proto::Udp)],
        ))?;
        c.start_agents(&[])?;
        let payload = vec![b'4'; 3000];
        for (ns, to) in [
            (client.ns.clone(), addr(VIP, 53)),
            (
                c.bed.ext_ns().to_string(),
                SocketAddr::new(node_ip(1).into(), 30753),
            ),
        ] {
            eventually(&format!("large UDP datagram to {to}"), || {
                let s = udp_socket_in(&ns, 0)?;
                s.send_to(&payload, to)?;
                let mut buf = [0u8; 512];
                let (n, _) = s.recv_from(&mut buf).context("no reply")?;
                let reply = String::from_utf8_lossy(&buf[..n]);
                ensure!(reply.starts_with("large "), "reply {reply:?}");
                Ok(())
            })?;
        }
        let line = "x".repeat(2000);
        for (ns, to) in [
            (client.ns.clone(), addr(VIP, 81)),
            (
                c.bed.ext_ns().to_string(),
                SocketAddr::new(node_ip(1).into(), 30781),
            ),
        ] {
            eventually(&format!("large TCP exchanges with {to}"), || {
                let mut st = tests::in_netns(&ns, || tests::client::EchoStream::connect(to, T))??;
                ensure!(st.backend == "large", "answered by {}", st.backend);
                for _ in 0..20 {
                    st.exchange(&line, T)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    });
}

/// networking.go: "Granular Checks: Services should update nodePort: http" and "...: udp"
/// [Slow]: a Service's nodePort changed in place stops answering on the old port and answers on
/// the new one, on every node.
#[test]
fn should_update_node_port() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.47";
        let (server, _) = c.backend(2, "upd-np", &[8080], &[5353])?;
        c.put(nodeport_service("node-port-service", VIP, 30880, 30853).to_value())?;
        c.put(slice("node-port-service", "a", &[&server], &NP_PORTS))?;
        c.start_agents(&[])?;
        for node in [1u8, 2] {
            for (proto, port) in [(Proto::Tcp, 30880), (Proto::Udp, 30853)] {
                let a = SocketAddr::new(node_ip(node).into(), port);
                c.expect_external("old nodePort", proto, a, &[&server])?;
            }
        }
        c.put(nodeport_service("node-port-service", VIP, 30881, 30854).to_value())?;
        for node in [1u8, 2] {
            for (proto, old, new) in [(Proto::Tcp, 30880, 30881), (Proto::Udp, 30853, 30854)] {
                let a = SocketAddr::new(node_ip(node).into(), new);
                c.expect_external("new nodePort", proto, a, &[&server])?;
                let gone = SocketAddr::new(node_ip(node).into(), old);
                eventually("old nodePort closed", || {
                    let t = Tally::new(&c.ext_requests(proto, gone, 2)?);
                    ensure!(t.ok == 0, "old nodePort {gone} still answers: {t}");
                    Ok(())
                })?;
            }
        }
        Ok(())
    });
}

/// service.go: "should fail health check node port if there are only terminating
/// endpoints": with externalTrafficPolicy Local, a node whose local endpoints are all
/// terminating answers its healthCheckNodePort with 503 (so load balancers drain it) while
/// still serving the terminating endpoint to traffic that arrives.
#[test]
fn should_fail_health_check_node_port_if_there_are_only_terminating_endpoints() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.48";
        let (server, _) = c.backend(1, "hc-term", &[8080], &[5353])?;
        let s = nodeport_service("hc-term", VIP, 30980, 30953)
            .type_("LoadBalancer")
            .spec("externalTrafficPolicy", json!("Local"))
            .spec("healthCheckNodePort", json!(32190));
        c.put(s.to_value())?;
        c.put(slice("hc-term", "a", &[&server], &NP_PORTS))?;
        c.start_agents(&[])?;
        let ext = c.bed.ext_ns().to_string();
        let probe = || -> Result<(u16, Value)> {
            let a = SocketAddr::new(node_ip(1).into(), 32190);
            let r = tests::in_netns(&ext, move || tests::client::http_get(a, "/", T))??;
            Ok((r.status, serde_json::from_str(&r.body)?))
        };
        eventually("healthy with a ready endpoint", || {
            let (status, body) = probe()?;
            ensure!(
                status == 200 && body["localEndpoints"] == 1,
                "{status} {body}"
            );
            Ok(())
        })?;
        c.put(
            EndpointSlice::new("default", "hc-term", "a")
                .port("http", 8080, Proto::Tcp)
                .port("udp", 5353, Proto::Udp)
                .endpoint(
                    Endpoint::ready(&server.ip.to_string(), "node1").conditions(false, true, true),
                )
                .to_value(),
        )?;
        eventually("unhealthy with only a terminating endpoint", || {
            let (status, body) = probe()?;
            ensure!(
                status == 503 && body["localEndpoints"] == 0,
                "{status} {body}"
            );
            Ok(())
        })?;
        let np = SocketAddr::new(node_ip(1).into(), 30980);
        c.expect_external(
            "terminating endpoint still serves",
            Proto::Tcp,
            np,
            &[&server],
        )?;
        Ok(())
    });
}

/// service.go: "should respect internalTrafficPolicy=Local Pod and Node, to Pod (hostNetwork:
/// true)": the node itself, like its pods, reaches only its own node's endpoints of an
/// internalTrafficPolicy Local Service, and nothing from a node without one.
#[test]
fn should_respect_internal_traffic_policy_local_pod_and_node_to_pod() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.49";
        let (server, _) = c.backend(1, "itpn-server", &[8080], &[5353])?;
        c.put(
            svc("itp-node", VIP)
                .port("http", 80, 8080, Proto::Tcp)
                .port("udp", 53, 5353, Proto::Udp)
                .spec("internalTrafficPolicy", json!("Local"))
                .to_value(),
        )?;
        c.put(slice("itp-node", "a", &[&server], &NP_PORTS))?;
        c.start_agents(&[])?;
        for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
            eventually("node1 to its own endpoint", || {
                let t = Tally::new(&c.node_requests(1, proto, addr(VIP, port), 10)?);
                t.expect_no_failures()?;
                t.expect_spread(&["itpn-server"], 0.5)
            })?;
            let t = Tally::new(&c.node_requests(2, proto, addr(VIP, port), 2)?);
            ensure!(
                t.ok == 0,
                "node2 has no local endpoint but was answered: {t}"
            );
        }
        Ok(())
    });
}

/// Fails unless every outcome is a refusal (ECONNREFUSED), none a timeout or an answer, and
/// they came back at once (a refusal takes no retransmission; a drop would take `T` each).
fn expect_refused(what: &str, out: &[Outcome], took: Duration) -> Result<()> {
    ensure!(!out.is_empty(), "{what}: no outcome");
    for o in out {
        match o {
            Ok(r) => anyhow::bail!("{what}: answered by {}", r.backend),
            Err(e) => ensure!(
                e.contains("refused") || e.contains("os error 111"),
                "{what}: failed without ECONNREFUSED: {e}"
            ),
        }
    }
    ensure!(
        took < T,
        "{what}: {} refusals took {took:?} (a timeout, not a reject)",
        out.len()
    );
    Ok(())
}

/// One connected UDP socket in `ns` (the calling thread's namespace, outside any cgroup: the tc
/// path): sends a datagram to `to` and reads; the ICMP port unreachable the datapath answers
/// with makes the read fail with ECONNREFUSED.
fn connected_udp_error(ns: &str, to: SocketAddr) -> Result<std::io::ErrorKind> {
    tests::in_netns(ns, || -> Result<std::io::ErrorKind> {
        let s = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        s.set_read_timeout(Some(Duration::from_millis(1500)))?;
        s.connect(to)?;
        s.send(b"hello\n")?;
        let mut buf = [0u8; 512];
        Ok(match s.recv(&mut buf) {
            Ok(_) => anyhow::bail!("UDP answered"),
            Err(e) => e.kind(),
        })
    })?
}

/// The upstream checks of a Service without endpoints, from `client` (socket LB and tc), and
/// from the external client to node1's nodePort (XDP passes it to tc, which rejects).
fn expect_rejected_everywhere(c: &Cluster, client: &Pod, vip: &str, tcp_np: u16) -> Result<()> {
    let tcp = addr(vip, 80);
    let udp = addr(vip, 53);
    for path in PATHS {
        eventually(&format!("TCP refused ({path:?})"), || {
            let start = Instant::now();
            let out = c.requests(client, path, Proto::Tcp, tcp, 3, T)?;
            expect_refused(&format!("{path:?} TCP to {tcp}"), &out, start.elapsed())
        })?;
    }
    // Socket LB: connect() of the UDP socket itself is refused.
    eventually("UDP refused (SocketLb)", || {
        let bin = tests::helper_bin("tb-client")?;
        let out = c.bed.run_in(
            &client.ns,
            client.cgroup.as_deref(),
            &bin.to_string_lossy(),
            &[
                "--udp-connected",
                &udp.to_string(),
                "--count",
                "2",
                "--interval-ms",
                "0",
                "--timeout-ms",
                "1000",
            ],
            Duration::from_secs(20),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let outs = tests::client::parse_client_output(&text)?;
        expect_refused("SocketLb connected UDP", &outs, Duration::ZERO)
    })?;
    // tc: the connected socket's read fails once the ICMP arrives.
    eventually("UDP refused (Tc)", || {
        let kind = connected_udp_error(&client.ns, udp)?;
        ensure!(
            kind == std::io::ErrorKind::ConnectionRefused,
            "connected UDP read failed with {kind:?}, not ECONNREFUSED"
        );
        Ok(())
    })?;
    // NodePort from outside the cluster.
    let np = SocketAddr::new(node_ip(1).into(), tcp_np);
    eventually("external nodePort refused", || {
        let start = Instant::now();
        let out = c.ext_requests(Proto::Tcp, np, 3)?;
        expect_refused(&format!("external TCP to {np}"), &out, start.elapsed())
    })?;
    Ok(())
}

/// service.go: "should be rejected when no endpoints exist": a Service without endpoints
/// refuses at once (kube-proxy's REJECT: an ICMP port unreachable), a TCP connect and a
/// connected UDP socket get ECONNREFUSED, through socket LB and tc from a pod and on the
/// nodePort from outside; not a timeout.
#[test]
fn should_be_rejected_when_no_endpoints_exist() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.60";
        let client = c.bed.add_pod(1, "reject-client")?;
        c.put(nodeport_service("no-pods", VIP, 30660, 30653).to_value())?;
        c.start_agents(&[])?;
        expect_rejected_everywhere(c, &client, VIP, 30660)
    });
}

/// service.go: "should be rejected for evicted pods (no endpoints exist)": the Service had an
/// endpoint, its pod was evicted (endpoint removed): new connections are refused as above.
#[test]
fn should_be_rejected_for_evicted_pods_no_endpoints_exist() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.61";
        let (server, pid) = c.backend(2, "evicted", &[8080], &[5353])?;
        let client = c.bed.add_pod(1, "evict-client")?;
        c.put(nodeport_service("evicted-pods", VIP, 30661, 30654).to_value())?;
        c.put(slice("evicted-pods", "a", &[&server], &NP_PORTS))?;
        c.start_agents(&[])?;
        c.expect_backends_all(
            "before eviction",
            &client,
            Proto::Tcp,
            addr(VIP, 80),
            &[&server],
        )?;
        // Eviction: the kubelet kills the pod, the EndpointSlice controller empties the slice.
        c.bed.kill(pid)?;
        c.put(slice("evicted-pods", "a", &[], &NP_PORTS))?;
        expect_rejected_everywhere(c, &client, VIP, 30661)
    });
}

/// Not an upstream case by name; KEP-1669 (terminating endpoints) and kube-proxy's conntrack
/// behaviour, which upstream's conntrack.go relies on: a connection established through the
/// per-packet path (tc) keeps working after the Service lost its last endpoint (the pod is
/// terminating and no longer listed, but still serves its open connections), while new
/// connections are refused.
#[test]
fn established_connections_outlive_the_last_endpoint() {
    for_each_source(2, |c| {
        const VIP: &str = "198.18.102.62";
        let server = c.bed.add_pod(2, "drain-server")?;
        c.bed.start_echo_streams(&server, &[8080], &[], &[9000])?;
        let client = c.bed.add_pod(1, "drain-client")?;
        c.put(
            svc("drain", VIP)
                .port("http", 80, 8080, Proto::Tcp)
                .port("stream", 90, 9000, Proto::Tcp)
                .to_value(),
        )?;
        c.put(slice(
            "drain",
            "a",
            &[&server],
            &[("http", 8080, Proto::Tcp), ("stream", 9000, Proto::Tcp)],
        ))?;
        c.start_agents(&[])?;
        c.expect_backends(
            "before",
            &client,
            Path::Tc,
            Proto::Tcp,
            addr(VIP, 80),
            &[&server],
        )?;
        let mut st = tests::in_netns(&client.ns, || {
            tests::client::EchoStream::connect(addr(VIP, 90), T)
        })??;
        st.exchange("before", T)?;
        c.put(slice(
            "drain",
            "a",
            &[],
            &[("http", 8080, Proto::Tcp), ("stream", 9000, Proto::Tcp)],
        ))?;
        // The agent has synced once new connections fail.
        c.expect_down("emptied", &client, Path::Tc, Proto::Tcp, addr(VIP, 80))?;
        for i in 0..5 {
            st.exchange(&format!("after {i}"), T)
                .context("the established connection broke when its Service emptied")?;
        }
        let start = Instant::now();
        let out = c.requests(&client, Path::Tc, Proto::Tcp, addr(VIP, 90), 1, T)?;
        expect_refused("a new connection", &out, start.elapsed())
    });
}

/// Issue 16 bug 9 (not an upstream case: the apiserver never hands out one nodePort twice, but
/// manifests and a restored cluster can ask for it): a Service asking for a nodePort another
/// Service holds is rejected by name, never served by the other; the one created first keeps the
/// port though it comes later by name, and `status` names the rejected Service, the field and the
/// holder. UDP on the same nodePort number is another port (kube-proxy programs it apart).
#[test]
fn node_port_conflict_keeps_the_oldest_service() {
    for_each_source(2, |c| {
        let (first, _) = c.backend(1, "np-first", &[8080], &[])?;
        let (later, _) = c.backend(2, "np-later", &[8080], &[5353])?;
        let created = |s: Service, t: &str| {
            let mut v = s.to_value();
            v["metadata"]["creationTimestamp"] = json!(t);
            v
        };
        let np = |name: &str, vip: &str, proto: Proto, target: u16| {
            let p = if proto == Proto::Tcp { "TCP" } else { "UDP" };
            svc(name, vip).type_("NodePort").spec(
                "ports",
                json!([{"port": 80, "targetPort": target, "protocol": p, "nodePort": 30191}]),
            )
        };
        c.put(created(
            np("zz-first", "198.18.102.65", Proto::Tcp, 8080),
            "2026-01-01T00:00:00Z",
        ))?;
        c.put(created(
            np("aa-later", "198.18.102.66", Proto::Tcp, 8080),
            "2026-01-02T00:00:00Z",
        ))?;
        c.put(created(
            np("ab-udp", "198.18.102.67", Proto::Udp, 5353),
            "2026-01-03T00:00:00Z",
        ))?;
        c.put(slice("zz-first", "a", &[&first], &[("", 8080, Proto::Tcp)]))?;
        c.put(slice("aa-later", "a", &[&later], &[("", 8080, Proto::Tcp)]))?;
        c.put(slice("ab-udp", "a", &[&later], &[("", 5353, Proto::Udp)]))?;
        c.start_agents(&[])?;
        for node in [1u8, 2] {
            let at = SocketAddr::new(node_ip(node).into(), 30191);
            c.expect_external(
                "the first holder keeps the nodePort",
                Proto::Tcp,
                at,
                &[&first],
            )?;
            c.expect_external("UDP on the same number", Proto::Udp, at, &[&later])?;
        }
        for a in &c.agents {
            eventually("status names the rejected Service", || {
                let st = a.status_json()?;
                let rejected = st["sync"]["rejected"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let hit = rejected.iter().any(|r| {
                    r["object"] == "Service default/aa-later"
                        && r["field"] == "spec.ports[0].nodePort"
                        && r["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("default/zz-first"))
                });
                ensure!(hit && rejected.len() == 1, "rejected: {rejected:?}");
                Ok(())
            })?;
        }
        Ok(())
    });
}

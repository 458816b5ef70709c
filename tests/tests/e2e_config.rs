//! End-to-end tests of `proxy-agent run --config FILE` with kube-proxy's own
//! KubeProxyConfiguration (as kubeadm writes it into the kube-proxy ConfigMap): what it sets
//! changes what the agent does, command-line flags win over it, and a bad field is named before
//! anything is loaded. Needs root and the agent binary; fails, never skips.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use serde_json::json;
use tests::{Endpoint, EndpointSlice, Proto, Service, TestBed, client::http_get, node_ip};

const T: Duration = Duration::from_secs(2);
const SYNC: Duration = Duration::from_secs(60);

/// kubeadm's config.conf (v1.31) with the given top-level fields replaced.
fn kubeadm_config(overrides: &str) -> String {
    let base = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: ""
  qps: 0
clusterCIDR: 198.19.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
kind: KubeProxyConfiguration
metricsBindAddress: ""
mode: ""
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
"#;
    let keys: Vec<&str> = overrides
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split(':').next())
        .collect();
    let mut out = String::new();
    let mut skip = false;
    for line in base.lines() {
        if !line.starts_with(' ') {
            skip = keys.contains(&line.split(':').next().unwrap_or(""));
        }
        if !skip {
            out += line;
            out += "\n";
        }
    }
    out + overrides + "\n"
}

fn healthz(bed: &TestBed, node: u8, port: u16) -> Result<u16> {
    let to = SocketAddr::new(node_ip(node).into(), port);
    Ok(tests::in_netns(bed.ext_ns(), move || http_get(to, "/healthz", T))??.status)
}

/// The file's healthz address, node name, nodePort addresses, mode and conntrack settings take
/// effect; on node2 the same file with `--healthz-bind-address` on the command line serves
/// healthz where the flag says. Fields with no effect here are named in the log once.
#[test]
fn config_file_sets_what_it_says_and_flags_win() {
    let mut bed = TestBed::new(2).expect("building the test bed (needs root)");
    let r = (|| -> Result<()> {
        let server = bed.add_pod(1, "cfg-server")?;
        bed.start_echo(&server, &[8080], &[])?;
        let client = bed.add_pod(1, "cfg-client")?;
        // internalTrafficPolicy Local with its endpoint on "cfg-node1": only an agent whose node
        // name is cfg-node1 serves it to local pods.
        let svc = Service::cluster_ip("default", "cfg", "198.18.102.60")
            .port("http", 80, 8080, Proto::Tcp)
            .spec("internalTrafficPolicy", json!("Local"))
            .type_("NodePort")
            .spec(
                "ports",
                json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30960}]),
            );
        let slice = EndpointSlice::new("default", "cfg", "a")
            .port("http", 8080, Proto::Tcp)
            .endpoint(Endpoint::ready(&server.ip.to_string(), "cfg-node1"));
        bed.write_manifest("svc.yaml", &svc.to_yaml())?;
        bed.write_manifest("slice.yaml", &slice.to_yaml())?;
        let cfg = bed.dir().join("kube-proxy.conf");
        std::fs::write(
            &cfg,
            kubeadm_config(
                "healthzBindAddress: 0.0.0.0:20256\nhostnameOverride: CFG-Node1\nmode: ipvs\n\
                 nodePortAddresses: [198.18.0.2/32]\n\
                 conntrack:\n  tcpEstablishedTimeout: 24h0m0s\n  udpTimeout: 30s\n",
            ),
        )?;
        let cfg_s = cfg.to_string_lossy().into_owned();
        let dir = bed.manifests_dir().to_path_buf();
        // The bed passes --node-name node<N>; the file's hostnameOverride must lose to it, so
        // node1 runs with a separate launch that leaves --node-name to the file.
        let a1 = start_agent_without_node_name(&mut bed, 1, &cfg_s)?;
        let a2 = bed.start_agent_with(
            2,
            &dir,
            &[
                "--config",
                &cfg_s,
                "--healthz-bind-address",
                "0.0.0.0:20257",
            ],
        )?;
        a1.wait_for_sync(1, SYNC)?;
        a2.wait_for_sync(1, SYNC)?;

        ensure!(
            healthz(&bed, 1, 20256)? == 200,
            "node1 healthz from the file"
        );
        ensure!(
            healthz(&bed, 2, 20257)? == 200,
            "node2 healthz from the flag"
        );
        ensure!(
            healthz(&bed, 2, 20256).is_err(),
            "node2 serves the file's healthz port although the flag overrides it"
        );
        // hostnameOverride (lowercased, as kube-proxy does) is node1's name: its pod reaches
        // the Local endpoint.
        let out = tests::tcp_requests(&client.ns, "198.18.102.60:80".parse()?, 10, T)?;
        let t = tests::Tally::new(&out);
        t.expect_no_failures()?;
        // nodePortAddresses: node2 serves the NodePort only on 198.18.0.2 (its LAN address),
        // node1 (198.18.0.1) not at all.
        let status1 = a1.status_json()?;
        let status2 = a2.status_json()?;
        let has_np = |s: &serde_json::Value, ip: &str| {
            tests::find_status_service(s, ip, 30960, Proto::Tcp).is_some()
        };
        ensure!(
            has_np(&status2, "198.18.0.2"),
            "node2 lacks its NodePort: {status2:#}"
        );
        ensure!(
            !has_np(&status1, "198.18.0.1"),
            "node1 serves a NodePort outside nodePortAddresses"
        );
        let log = a1.log_text();
        for want in [
            "read kube-proxy configuration",
            "field=mode",
            "field=clusterCIDR",
        ] {
            ensure!(log.contains(want), "node1's log lacks {want:?}:\n{log}");
        }
        ensure!(
            log.matches("field=mode").count() == 1,
            "the no-effect line for mode is not logged exactly once"
        );
        Ok(())
    })();
    if let Err(e) = r {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

/// An agent on `node` with the bed's usual flags except --node-name, and `--config cfg`.
fn start_agent_without_node_name(bed: &mut TestBed, node: u8, cfg: &str) -> Result<tests::Agent> {
    let n = bed.node(node).clone();
    let mut args: Vec<String> = [
        "run",
        "--manifests",
        &bed.manifests_dir().to_string_lossy(),
        "--config",
        cfg,
        "--interfaces",
        "lan0",
        "--pod-interfaces",
        "pv*",
        "--bpffs",
        &bed.agent_bpffs(node).to_string_lossy(),
    ]
    .map(String::from)
    .to_vec();
    if let Some(cg) = &n.cgroup {
        args.extend(["--cgroup".into(), cg.to_string_lossy().into_owned()]);
    }
    bed.spawn_agent(node, &args)
}

/// A file with an unknown field, or a field of the wrong type, stops the agent at once with an
/// error that names the field, before anything is loaded: no bpffs directory, no program.
#[test]
fn config_file_errors_name_the_field_and_touch_nothing() {
    let mut bed = TestBed::new(1).expect("building the test bed (needs root)");
    let r = (|| -> Result<()> {
        let dir = bed.manifests_dir().to_path_buf();
        for (i, (extra, named)) in [
            (
                "ipvs:\n  schedular: rr",
                "ipvs.schedular: unknown field `schedular`",
            ),
            ("conntrack:\n  udpTimeout: thirty", "conntrack.udpTimeout"),
            ("kind: KubeletConfiguration", "kind"),
        ]
        .into_iter()
        .enumerate()
        {
            let cfg = bed.dir().join(format!("bad{i}.conf"));
            std::fs::write(&cfg, kubeadm_config(extra))?;
            let bpffs = bed.agent_bpffs(1);
            let a = bed.start_agent_with(1, &dir, &["--config", &cfg.to_string_lossy()])?;
            let start = Instant::now();
            while a.is_running() {
                if start.elapsed() > Duration::from_secs(10) {
                    bail!("agent still runs with a bad config ({extra})");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let log = a.log_text();
            ensure!(
                log.contains(named),
                "{extra}: the error does not name {named:?}:\n{log}"
            );
            ensure!(!bpffs.exists(), "{extra}: {} was created", bpffs.display());
        }
        Ok(())
    })();
    if let Err(e) = r {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

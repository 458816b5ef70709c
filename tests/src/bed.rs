//! The emulated cluster: a LAN bridge namespace, node namespaces, pod namespaces
//! behind veths, an external client namespace; processes started inside them;
//! and teardown of all of it in `Drop`.
//!
//! Layout (N = node number, K = pod number on that node, from 2):
//! - `<prefix>-lan`: bridge `br0`; ports `n<N>` (to node N) and `ext`.
//! - `<prefix>-n<N>`: `lan0` = 198.18.0.N/24; one `pv<N>-<K>` per pod with
//!   198.19.N.1/32 and a route `198.19.N.K/32 dev pv<N>-<K>`; routes
//!   `198.19.M.0/24 via 198.18.0.M` to the other nodes' pods (host-gw).
//! - `<prefix>-p<N>-<K>`: `eth0` = 198.19.N.K/32, `198.19.N.1 dev eth0 scope link`,
//!   `default via 198.19.N.1`.
//! - `<prefix>-ext`: `lan0` = 198.18.0.100/24, `198.19.N.0/24 via 198.18.0.N`.
//!
//! With cgroup v2 available, processes started in a pod also run in the cgroup
//! `<cgroup2>/<prefix>/node<N>/p<N>-<K>` and each agent gets
//! `--cgroup <cgroup2>/<prefix>/node<N>`, so socket-level load balancing stays
//! scoped to one emulated node.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::agent::Agent;
use crate::client::{Outcome, Proto};
use crate::cmd::{self, ip};
use crate::netns;

/// Address of the external client namespace on the LAN.
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The external client's IPv6 address on the LAN.
pub const EXT_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x64);

/// Node N's IPv6 LAN address: fd00:18::N (in fd00::/8, like every test address).
pub fn node_ip6(n: u8) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, n as u16)
}

/// Node N's IPv6 pod CIDR: fd00:19:N::/64.
pub fn pod_cidr6(n: u8) -> String {
    format!("fd00:19:{n:x}::/64")
}

/// Pod K on node N: fd00:19:N::K.
pub fn pod_ip6(n: u8, k: u8) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd00, 0x19, n as u16, 0, 0, 0, 0, k as u16)
}

/// The node side of every pod veth on node N: fd00:19:N::1.
pub fn pod_ip6_gateway(n: u8) -> std::net::Ipv6Addr {
    pod_ip6(n, 1)
}
/// Name of the bridge inside the LAN namespace.
pub const LAN_BRIDGE: &str = "br0";

/// Address of node `n` on the LAN: 198.18.0.n.
pub fn node_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, n)
}

/// Pod CIDR of node `n`: 198.19.n.0/24.
pub fn pod_cidr(n: u8) -> String {
    format!("198.19.{n}.0/24")
}

/// One emulated node.
#[derive(Clone, Debug)]
pub struct Node {
    /// 1-based node number; the Kubernetes node name is `node<index>`.
    pub index: u8,
    /// Network namespace name.
    pub ns: String,
    /// Address on the LAN (`lan0`).
    pub ip: Ipv4Addr,
    /// cgroup v2 directory for this node's pods (when cgroup v2 is available).
    pub cgroup: Option<PathBuf>,
}

impl Node {
    /// Kubernetes node name: `node<index>`.
    pub fn name(&self) -> String {
        format!("node{}", self.index)
    }
}

/// One emulated pod.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Name given by the test; used as the echo server's name in replies.
    pub name: String,
    /// Node number the pod lives on.
    pub node: u8,
    /// Network namespace name.
    pub ns: String,
    /// Pod address: 198.19.node.k.
    pub ip: Ipv4Addr,
    /// Pod IPv6 address: fd00:19:node::k.
    pub ip6: std::net::Ipv6Addr,
    /// Node-side veth name (starts with `pv`).
    pub host_if: String,
    /// cgroup v2 directory of the pod's processes (when cgroup v2 is available).
    pub cgroup: Option<PathBuf>,
}

struct Proc {
    child: Child,
    what: String,
    log: PathBuf,
}

/// An emulated cluster. Everything it creates is removed again when it is
/// dropped: processes (SIGTERM, then SIGKILL after 2 s, by pid), agents'
/// datapath state (`proxy-agent cleanup`), namespaces, cgroups and its
/// temporary directory (kept when the thread is panicking or `TB_KEEP=1`, so
/// that logs can be read).
///
/// Processes are started with a parent-death signal (SIGTERM) bound to the
/// thread that starts them: create and use a bed from one thread.
pub struct TestBed {
    prefix: String,
    dir: PathBuf,
    manifests: PathBuf,
    namespaces: Vec<String>,
    cgroups: Vec<PathBuf>,
    cgroup_root: Option<PathBuf>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    next_pod: BTreeMap<u8, u8>,
    procs: Vec<Proc>,
    pub(crate) agents: Vec<Agent>,
    lan_ns: String,
    ext_ns: String,
    log_seq: u32,
    keep: bool,
}

impl TestBed {
    /// Builds a bed with `nodes` nodes (1..=9), the LAN and the external client.
    pub fn new(nodes: u8) -> Result<TestBed> {
        if !(1..=9).contains(&nodes) {
            bail!("node count must be 1..=9, got {nodes}");
        }
        if unsafe { libc::geteuid() } != 0 {
            bail!("the test bed needs root (network namespaces, veths, BPF)");
        }
        let prefix = unique_prefix()?;
        let dir = std::env::temp_dir().join(format!("{prefix}-bed"));
        let manifests = dir.join("manifests");
        fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        let cgroup_root = cgroup2_mount().map(|m| m.join(&prefix));
        let mut bed = TestBed {
            lan_ns: format!("{prefix}-lan"),
            ext_ns: format!("{prefix}-ext"),
            prefix,
            dir,
            manifests,
            namespaces: Vec::new(),
            cgroups: Vec::new(),
            cgroup_root,
            nodes: Vec::new(),
            pods: Vec::new(),
            next_pod: BTreeMap::new(),
            procs: Vec::new(),
            agents: Vec::new(),
            log_seq: 0,
            keep: false,
        };
        // On error `bed` is dropped here, which removes what was made so far.
        bed.build(nodes)?;
        Ok(bed)
    }

    fn build(&mut self, nodes: u8) -> Result<()> {
        if let Some(root) = self.cgroup_root.clone() {
            self.make_cgroup(&root)?;
        }
        let lan = self.lan_ns.clone();
        self.add_ns(&lan)?;
        ip(&[
            "-n",
            &lan,
            "link",
            "add",
            LAN_BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &lan, "link", "set", LAN_BRIDGE, "up"])?;

        for n in 1..=nodes {
            let ns = format!("{}-n{n}", self.prefix);
            self.add_ns(&ns)?;
            sysctl(
                &ns,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )?;
            self.lan_port(&ns, &format!("n{n}"), node_ip(n))?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/64", node_ip6(n)),
                "dev",
                "lan0",
                "nodad",
            ])?;
            sysctl(&ns, &["net.ipv4.conf.lan0.rp_filter=0"])?;
            let cgroup = match &self.cgroup_root {
                Some(root) => {
                    let cg = root.join(format!("node{n}"));
                    self.make_cgroup(&cg)?;
                    Some(cg)
                }
                None => None,
            };
            self.nodes.push(Node {
                index: n,
                ns,
                ip: node_ip(n),
                cgroup,
            });
        }
        // host-gw routes between the nodes' pod CIDRs.
        for a in &self.nodes {
            for b in &self.nodes {
                if a.index != b.index {
                    ip(&[
                        "-n",
                        &a.ns,
                        "route",
                        "add",
                        &pod_cidr(b.index),
                        "via",
                        &b.ip.to_string(),
                    ])?;
                    ip(&[
                        "-n",
                        &a.ns,
                        "route",
                        "add",
                        &pod_cidr6(b.index),
                        "via",
                        &node_ip6(b.index).to_string(),
                    ])?;
                }
            }
        }

        let ext = self.ext_ns.clone();
        self.add_ns(&ext)?;
        sysctl(
            &ext,
            &[
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        self.lan_port(&ext, "ext", EXT_IP)?;
        let ext6 = format!("{EXT_IP6}/64");
        ip(&["-n", &ext, "addr", "add", &ext6, "dev", "lan0", "nodad"])?;
        for node in &self.nodes {
            ip(&[
                "-n",
                &ext,
                "route",
                "add",
                &pod_cidr(node.index),
                "via",
                &node.ip.to_string(),
            ])?;
        }
        Ok(())
    }

    /// veth `lan0` in `ns` with `addr/24`, its peer `port` enslaved to the bridge.
    fn lan_port(&self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        let lan = &self.lan_ns;
        ip(&[
            "link", "add", "lan0", "netns", ns, "type", "veth", "peer", "name", port, "netns", lan,
        ])?;
        ip(&["-n", lan, "link", "set", port, "master", LAN_BRIDGE])?;
        ip(&["-n", lan, "link", "set", port, "up"])?;
        // Frames a node sends back out with native XDP (XDP_TX) reach the bridge only if this
        // end has NAPI, as a NIC would.
        netns::enable_gro(lan, port)?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "lan0",
        ])?;
        ip(&["-n", ns, "link", "set", "lan0", "up"])?;
        Ok(())
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        if name.len() > 15 {
            bail!("namespace name {name} longer than 15 characters");
        }
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        // No IPv6 duplicate address detection: link-local addresses would otherwise stay
        // tentative for a second after each veth comes up, and early packets get lost.
        sysctl(
            name,
            &[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn make_cgroup(&mut self, path: &Path) -> Result<()> {
        fs::create_dir(path).with_context(|| format!("creating cgroup {}", path.display()))?;
        self.cgroups.push(path.to_path_buf());
        Ok(())
    }

    /// Unique prefix of every name this bed creates (`px` + 5 hex digits).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Temporary directory holding logs and manifests.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory the agents read manifests from (shared by all agents).
    pub fn manifests_dir(&self) -> &Path {
        &self.manifests
    }

    /// Namespace holding the LAN bridge.
    pub fn lan_ns(&self) -> &str {
        &self.lan_ns
    }

    /// Namespace of the external client (198.18.0.100 on the LAN).
    pub fn ext_ns(&self) -> &str {
        &self.ext_ns
    }

    /// All nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node number `n` (1-based). Panics when it does not exist.
    pub fn node(&self, n: u8) -> &Node {
        self.nodes
            .iter()
            .find(|x| x.index == n)
            .unwrap_or_else(|| panic!("no node {n} in this bed"))
    }

    /// All pods added so far.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Every namespace this bed has created (and will delete).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Adds a pod on node `node`; its address is 198.19.node.K with K counting
    /// from 2 on each node.
    pub fn add_pod(&mut self, node: u8, name: &str) -> Result<Pod> {
        let node_ns = self.node(node).ns.clone();
        let node_cg = self.node(node).cgroup.clone();
        let k = *self.next_pod.get(&node).unwrap_or(&2);
        if k == 255 {
            bail!("node {node} is full");
        }
        self.next_pod.insert(node, k + 1);
        let ns = format!("{}-p{node}-{k}", self.prefix);
        let host_if = format!("pv{node}-{k}");
        let pod_ip = Ipv4Addr::new(198, 19, node, k);
        let gw = Ipv4Addr::new(198, 19, node, 1);
        let pod_ip6 = pod_ip6(node, k);
        let gw6 = pod_ip6_gateway(node);

        self.add_ns(&ns)?;
        sysctl(
            &ns,
            &[
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &host_if, "netns",
            &node_ns,
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            &gw.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&["-n", &ns, "route", "add", "default", "via", &gw.to_string()])?;
        ip(&[
            "-n",
            &node_ns,
            "addr",
            "add",
            &format!("{gw}/32"),
            "dev",
            &host_if,
        ])?;
        ip(&["-n", &node_ns, "link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &node_ns,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &host_if,
        ])?;
        sysctl(&node_ns, &[&format!("net.ipv4.conf.{host_if}.rp_filter=0")])?;
        // IPv6 the same way: /128s, the node side as gateway, no duplicate address detection.
        let (p6, g6) = (format!("{pod_ip6}/128"), format!("{gw6}/128"));
        ip(&["-n", &ns, "addr", "add", &p6, "dev", "eth0", "nodad"])?;
        ip(&["-n", &ns, "route", "add", &gw6.to_string(), "dev", "eth0"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &gw6.to_string(),
        ])?;
        ip(&["-n", &node_ns, "addr", "add", &g6, "dev", &host_if, "nodad"])?;
        ip(&["-n", &node_ns, "route", "add", &p6, "dev", &host_if])?;
        let cgroup = match node_cg {
            Some(cg) => {
                let cg = cg.join(format!("p{node}-{k}"));
                self.make_cgroup(&cg)?;
                Some(cg)
            }
            None => None,
        };
        let pod = Pod {
            name: name.to_string(),
            node,
            ns,
            ip: pod_ip,
            ip6: pod_ip6,
            host_if,
            cgroup,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Starts `nsenter --net=/run/netns/NS -- cmd args...` in the background,
    /// with stdout and stderr going to a log file in the bed's directory (see
    /// [`TestBed::log_of`]). Returns the pid of `cmd` (nsenter execs it).
    pub fn spawn(&mut self, ns: &str, cmd: &str, args: &[&str]) -> Result<u32> {
        self.spawn_full(ns, None, cmd, args, &[])
            .map(|(pid, _)| pid)
    }

    /// Like [`TestBed::spawn`] inside a pod: its network namespace and its cgroup.
    pub fn spawn_in_pod(&mut self, pod: &Pod, cmd: &str, args: &[&str]) -> Result<u32> {
        let cg = pod.cgroup.clone();
        self.spawn_full(&pod.ns, cg.as_deref(), cmd, args, &[])
            .map(|(pid, _)| pid)
    }

    /// The general form of [`TestBed::spawn`]: optional cgroup and extra
    /// environment. Returns the pid and the log file.
    pub fn spawn_full(
        &mut self,
        ns: &str,
        cgroup: Option<&Path>,
        cmd: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(u32, PathBuf)> {
        let mut command = self.command_in(ns, cgroup, cmd, args)?;
        self.log_seq += 1;
        let base = Path::new(cmd)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into());
        let log = self
            .dir
            .join(format!("{:03}-{base}-{ns}.log", self.log_seq));
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            command.env(k, v);
        }
        let what = format!("{} (in {ns})", cmd::describe(&command));
        let child = command
            .spawn()
            .with_context(|| format!("spawning {what}"))?;
        let pid = child.id();
        self.procs.push(Proc {
            child,
            what,
            log: log.clone(),
        });
        Ok((pid, log))
    }

    /// Builds (but does not start) `nsenter --net=... -- cmd args`, entering
    /// `cgroup` first when given and dying with the calling thread.
    pub fn command_in(
        &self,
        ns: &str,
        cgroup: Option<&Path>,
        cmd: &str,
        args: &[&str],
    ) -> Result<Command> {
        let nspath = netns::netns_path(ns);
        if !nspath.exists() {
            bail!("no network namespace {ns}");
        }
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", nspath.display()))
            .arg("--")
            .arg(cmd)
            .args(args);
        let procs = match cgroup {
            Some(cg) => {
                let p = cg.join("cgroup.procs");
                Some(
                    OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .with_context(|| format!("opening {}", p.display()))?,
                )
            }
            None => None,
        };
        // SAFETY: only async-signal-safe calls (write, prctl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if let Some(f) = &procs {
                    // "0" moves the writing process itself.
                    if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Runs a command inside `ns` (and `cgroup`) to completion, with a time limit.
    pub fn run_in(
        &self,
        ns: &str,
        cgroup: Option<&Path>,
        cmd: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<std::process::Output> {
        let mut command = self.command_in(ns, cgroup, cmd, args)?;
        cmd::run_output(&mut command, timeout)
    }

    /// Keeps the bed's directory (logs, manifests) after teardown.
    pub fn keep_dir(&mut self) {
        self.keep = true;
    }

    /// The last `lines` lines of every log file in the bed's directory, for
    /// failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        let mut out = String::new();
        for log in logs {
            let text = crate::agent::strip_ansi(&fs::read_to_string(&log).unwrap_or_default());
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("----- {} (last {lines} lines)\n", log.display()));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Log file (stdout and stderr) of a process started by this bed.
    pub fn log_of(&self, pid: u32) -> Option<PathBuf> {
        self.procs
            .iter()
            .find(|p| p.child.id() == pid)
            .map(|p| p.log.clone())
    }

    /// True while a process started by this bed is running.
    pub fn is_running(&mut self, pid: u32) -> bool {
        match self.procs.iter_mut().find(|p| p.child.id() == pid) {
            Some(p) => matches!(p.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops a process started by this bed: SIGTERM, up to 2 s, then SIGKILL.
    pub fn kill(&mut self, pid: u32) -> Result<()> {
        let Some(idx) = self.procs.iter().position(|p| p.child.id() == pid) else {
            bail!("pid {pid} was not started by this bed");
        };
        let mut p = self.procs.remove(idx);
        stop_children(std::slice::from_mut(&mut p));
        Ok(())
    }

    /// Sends `signal` to a process started by this bed and waits up to
    /// `grace` for it to exit; SIGKILL after that. Returns whether it exited
    /// within `grace` (false: it had to be killed). The process is forgotten
    /// by the bed afterwards.
    pub fn kill_with(&mut self, pid: u32, signal: Signal, grace: Duration) -> Result<bool> {
        let Some(idx) = self.procs.iter().position(|p| p.child.id() == pid) else {
            bail!("pid {pid} was not started by this bed");
        };
        let mut p = self.procs.remove(idx);
        if matches!(p.child.try_wait(), Ok(None)) {
            kill(Pid::from_raw(pid as i32), signal)
                .with_context(|| format!("sending {signal} to {pid} ({})", p.what))?;
        }
        if cmd::wait_deadline(&mut p.child, grace).is_some() {
            return Ok(true);
        }
        eprintln!(
            "SIGKILL to {pid} ({}): still running {grace:?} after {signal}",
            p.what
        );
        let _ = p.child.kill();
        let _ = p.child.wait();
        Ok(false)
    }

    /// Starts `tb-echo` in `pod` (named after the pod) on the given ports and
    /// waits until it listens.
    pub fn start_echo(&mut self, pod: &Pod, tcp: &[u16], udp: &[u16]) -> Result<u32> {
        self.start_echo_streams(pod, tcp, udp, &[])
    }

    /// Like [`TestBed::start_echo`], plus long-lived line-echo ports
    /// (`tb-echo --stream PORT`: every line `L` is answered with `NAME L`).
    pub fn start_echo_streams(
        &mut self,
        pod: &Pod,
        tcp: &[u16],
        udp: &[u16],
        stream: &[u16],
    ) -> Result<u32> {
        let bin = crate::helper_bin("tb-echo")?;
        let mut args: Vec<String> = vec!["--name".into(), pod.name.clone()];
        for p in tcp {
            args.extend(["--tcp".into(), p.to_string()]);
        }
        for p in udp {
            args.extend(["--udp".into(), p.to_string()]);
        }
        for p in stream {
            args.extend(["--stream".into(), p.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cg = pod.cgroup.clone();
        let (pid, log) =
            self.spawn_full(&pod.ns, cg.as_deref(), &bin.to_string_lossy(), &args, &[])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.lines().any(|l| l.contains("tb-echo ready")) {
                return Ok(pid);
            }
            if !self.is_running(pid) {
                bail!("tb-echo in {} exited: {}", pod.ns, text.trim());
            }
            if Instant::now() >= deadline {
                bail!(
                    "tb-echo in {} not ready after 10 s: {}",
                    pod.ns,
                    text.trim()
                );
            }
            crate::check_interrupted()?;
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `tb-client` as a process inside `pod` (its namespace and cgroup, so
    /// that per-cgroup socket load balancing applies): `count` requests to
    /// `addr`, each with `timeout`. Stops early after 5 failures in a row.
    pub fn pod_requests(
        &self,
        pod: &Pod,
        proto: Proto,
        addr: std::net::SocketAddr,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Outcome>> {
        self.client_requests(&pod.ns, pod.cgroup.as_deref(), proto, addr, count, timeout)
    }

    /// Runs `tb-client` as a process in network namespace `ns` (and `cgroup`): `count`
    /// requests to `addr`, each with `timeout`. Stops early after 5 failures in a row.
    pub fn client_requests(
        &self,
        ns: &str,
        cgroup: Option<&Path>,
        proto: Proto,
        addr: std::net::SocketAddr,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Outcome>> {
        let bin = crate::helper_bin("tb-client")?;
        let args = [
            proto.flag(),
            &addr.to_string(),
            "--count",
            &count.to_string(),
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ];
        let limit = timeout * (count.min(50) as u32 + 5) + Duration::from_secs(30);
        let out = self.run_in(ns, cgroup, &bin.to_string_lossy(), &args, limit)?;
        if !out.status.success() {
            bail!(
                "tb-client in {ns} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        crate::client::parse_client_output(&String::from_utf8_lossy(&out.stdout))
    }

    /// Writes `yaml` to `<manifests>/<file>` atomically (temporary file in the
    /// bed directory, then rename), so an agent never reads half a file.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        write_atomic(&self.dir, &self.manifests.join(file), yaml)
    }

    /// Removes `<manifests>/<file>`.
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        let p = self.manifests.join(file);
        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    pub(crate) fn stop_pid(&mut self, pid: u32) {
        if let Some(idx) = self.procs.iter().position(|p| p.child.id() == pid) {
            let mut p = self.procs.remove(idx);
            stop_children(std::slice::from_mut(&mut p));
        }
    }

    fn teardown(&mut self) {
        stop_children(&mut self.procs);
        self.procs.clear();
        for agent in std::mem::take(&mut self.agents) {
            if let Err(e) = agent.cleanup() {
                eprintln!("testbed {}: {e:#}", self.prefix);
            }
            if agent.bpffs.exists() {
                eprintln!(
                    "testbed {}: {} still exists after cleanup; removing it",
                    self.prefix,
                    agent.bpffs.display()
                );
                let _ = fs::remove_dir_all(&agent.bpffs);
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = ip(&["netns", "delete", &ns]) {
                eprintln!("testbed {}: {e:#}", self.prefix);
            }
        }
        for cg in self.cgroups.drain(..).rev() {
            let mut tries = 0;
            while let Err(e) = fs::remove_dir(&cg) {
                tries += 1;
                if tries > 50 || e.kind() == std::io::ErrorKind::NotFound {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("testbed {}: rmdir {}: {e}", self.prefix, cg.display());
                    }
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        let keep =
            self.keep || thread::panicking() || std::env::var("TB_KEEP").is_ok_and(|v| v == "1");
        if keep {
            eprintln!(
                "testbed {}: logs kept in {}",
                self.prefix,
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// SIGTERM to every child, wait up to 2 s for all, SIGKILL the rest; reaps all.
fn stop_children(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if matches!(p.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for p in procs.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if cmd::wait_deadline(&mut p.child, left).is_none() {
            eprintln!("SIGKILL to {} ({})", p.child.id(), p.what);
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Writes `text` to `dest` through a temporary file in `tmp_dir` (same file
/// system) and a rename.
pub fn write_atomic(tmp_dir: &Path, dest: &Path, text: &str) -> Result<()> {
    let name = dest.file_name().context("destination has no file name")?;
    let tmp = tmp_dir.join(format!(".{}.tmp", name.to_string_lossy()));
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))
}

/// `nsenter --net=/run/netns/NS -- sysctl -qw k=v...`: /proc/sys/net follows the
/// writer's network namespace, so this never touches the root namespace.
fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let nspath = netns::netns_path(ns);
    cmd::run_ok(
        Command::new("nsenter")
            .arg(format!("--net={}", nspath.display()))
            .args(["--", "sysctl", "-qw"])
            .args(settings),
        cmd::SHORT,
    )?;
    Ok(())
}

fn unique_prefix() -> Result<String> {
    for _ in 0..20 {
        let mut b = [0u8; 4];
        // SAFETY: getrandom writes at most b.len() bytes into b.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            bail!("getrandom failed: {}", std::io::Error::last_os_error());
        }
        let v = u32::from_le_bytes(b) & 0xfffff;
        let prefix = format!("px{v:05x}");
        let taken = netns::netns_list()?
            .iter()
            .any(|n| n.starts_with(&format!("{prefix}-")))
            || Path::new("/sys/fs/bpf")
                .join(format!("{prefix}-node1"))
                .exists();
        if !taken {
            return Ok(prefix);
        }
    }
    bail!("could not find an unused name prefix")
}

/// Mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` or
/// `/sys/fs/cgroup/unified` on hybrid systems), if any.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

//! Driving proxy-agent through its CLI contract (ARCHITECTURE.md section 6):
//! `run` inside a node namespace, `status`, `cleanup`, and reading its log for
//! `sync complete ... generation=N`.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bed::TestBed;
use crate::client::Proto;
use crate::cmd;

/// Location of the proxy-agent binary: `$PROXY_AGENT_BIN`, else next to the
/// running executable (same cargo profile), else `<workspace>/target/debug`.
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PROXY_AGENT_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("PROXY_AGENT_BIN={} does not exist", p.display());
        }
        return Ok(p);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            candidates.push(d.join("proxy-agent"));
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target/debug/proxy-agent"),
    );
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "proxy-agent binary not found (looked at {}); build it with `cargo build -p proxy-agent` or set PROXY_AGENT_BIN",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A proxy-agent started by a [`TestBed`] in a node namespace. A plain handle:
/// the bed owns the process and cleans up after it.
#[derive(Clone, Debug)]
pub struct Agent {
    /// Node number.
    pub node: u8,
    /// The node's network namespace.
    pub ns: String,
    pub pid: u32,
    /// `--bpffs` directory (under /sys/fs/bpf).
    pub bpffs: PathBuf,
    /// stdout + stderr of the agent.
    pub log: PathBuf,
    pub bin: PathBuf,
}

impl Agent {
    /// The whole log so far, without ANSI colour codes.
    pub fn log_text(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Highest generation of a `sync complete` line so far.
    pub fn generation(&self) -> Option<u64> {
        sync_generations(&self.log_text()).into_iter().max()
    }

    /// True while the agent process runs (not exited, not a zombie).
    pub fn is_running(&self) -> bool {
        match fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            // Field 3, after the parenthesised command name, is the state.
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
            Err(_) => false,
        }
    }

    /// Waits until the agent logged `sync complete` with a generation of at
    /// least `min_generation`; returns that generation. Fails early when the
    /// agent exits, showing the end of its log.
    pub fn wait_for_sync(&self, min_generation: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(g) = self.generation().filter(|g| *g >= min_generation) {
                return Ok(g);
            }
            if !self.is_running() {
                bail!(
                    "agent on node{} exited before sync generation {min_generation}; log {}:\n{}",
                    self.node,
                    self.log.display(),
                    self.log_tail(40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent on node{}: no `sync complete` with generation >= {min_generation} within {timeout:?} (latest {:?}); log {}:\n{}",
                    self.node,
                    self.generation(),
                    self.log.display(),
                    self.log_tail(40)
                );
            }
            crate::check_interrupted()?;
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// `proxy-agent status --bpffs DIR -o json`, run inside the node namespace.
    pub fn status_json(&self) -> Result<Value> {
        let out = self.cli(&["status", "--bpffs", &self.bpffs_str(), "-o", "json"])?;
        serde_json::from_str(&out).with_context(|| format!("status -o json printed {out:?}"))
    }

    /// `proxy-agent status --bpffs DIR` (table form).
    pub fn status_table(&self) -> Result<String> {
        self.cli(&["status", "--bpffs", &self.bpffs_str()])
    }

    /// `proxy-agent cleanup --bpffs DIR` inside the node namespace.
    pub fn cleanup(&self) -> Result<String> {
        self.cli(&["cleanup", "--bpffs", &self.bpffs_str()])
    }

    /// Runs `proxy-agent ARGS...` inside the node namespace; stdout on success.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let nspath = crate::netns::netns_path(&self.ns);
        cmd::run_ok(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", nspath.display()))
                .arg("--")
                .arg(&self.bin)
                .args(args)
                .env("NO_COLOR", "1"),
            Duration::from_secs(30),
        )
    }

    fn bpffs_str(&self) -> String {
        self.bpffs.to_string_lossy().into_owned()
    }
}

impl TestBed {
    /// Starts proxy-agent on node `node` reading the bed's manifests directory.
    pub fn start_agent(&mut self, node: u8) -> Result<Agent> {
        let dir = self.manifests_dir().to_path_buf();
        self.start_agent_with(node, &dir, &[])
    }

    /// Starts `proxy-agent run --manifests DIR --node-name node<N> --interfaces lan0
    /// --pod-interfaces 'pv*' --bpffs /sys/fs/bpf/<prefix>-node<N> [--cgroup CG]
    /// EXTRA...` inside the node namespace, its output to a log file.
    pub fn start_agent_with(
        &mut self,
        node: u8,
        manifests: &Path,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let source = ["--manifests", &manifests.to_string_lossy()].map(String::from);
        self.start_agent_source(node, &source, extra_args)
    }

    /// Starts an agent that watches the API server described by `kubeconfig`.
    pub fn start_agent_kube(
        &mut self,
        node: u8,
        kubeconfig: &Path,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let source = ["--kubeconfig", &kubeconfig.to_string_lossy()].map(String::from);
        self.start_agent_source(node, &source, extra_args)
    }

    /// Starts an agent with `source` arguments (`--manifests DIR` or `--kubeconfig FILE`).
    pub fn start_agent_source(
        &mut self,
        node: u8,
        source: &[String],
        extra_args: &[&str],
    ) -> Result<Agent> {
        let n = self.node(node).clone();
        let bpffs = self.agent_bpffs(node);
        let mut args: Vec<String> = vec!["run".into()];
        args.extend(source.iter().cloned());
        args.extend([
            "--node-name".into(),
            n.name(),
            "--interfaces".into(),
            "lan0".into(),
            "--pod-interfaces".into(),
            "pv*".into(),
            "--bpffs".into(),
            bpffs.to_string_lossy().into_owned(),
        ]);
        if let Some(cg) = &n.cgroup {
            args.extend(["--cgroup".into(), cg.to_string_lossy().into_owned()]);
        }
        // TB_AGENT_ARGS: more flags for every agent (e.g. `--xdp=off` to compare runs).
        if let Ok(more) = std::env::var("TB_AGENT_ARGS") {
            args.extend(more.split_whitespace().map(str::to_string));
        }
        // TB_TC_ATTACH: `--tc-attach` for every agent whose test does not choose one (xtask's
        // second pass runs the tc attach, restart and cleanup tests with `netlink`).
        if let Ok(mode) = std::env::var("TB_TC_ATTACH")
            && !extra_args.contains(&"--tc-attach")
        {
            args.extend(["--tc-attach".into(), mode]);
        }
        args.extend(extra_args.iter().map(|s| s.to_string()));
        self.spawn_agent(node, &args)
    }

    /// The `--bpffs` directory agents on `node` use: `/sys/fs/bpf/<prefix>-node<N>`.
    pub fn agent_bpffs(&self, node: u8) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("{}-node{node}", self.prefix()))
    }

    /// Starts `proxy-agent ARGS...` (complete arguments; pass `--bpffs` [`TestBed::agent_bpffs`]
    /// so the bed cleans up after it) in node `node`'s namespace, its output to a log file.
    pub fn spawn_agent(&mut self, node: u8, args: &[String]) -> Result<Agent> {
        let bin = agent_bin()?;
        ensure_bpffs()?;
        let n = self.node(node).clone();
        let bpffs = self.agent_bpffs(node);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let (pid, log) = self.spawn_full(
            &n.ns,
            None,
            &bin.to_string_lossy(),
            &args,
            &[("NO_COLOR", "1"), ("RUST_LOG", &rust_log)],
        )?;
        let agent = Agent {
            node,
            ns: n.ns.clone(),
            pid,
            bpffs,
            log,
            bin,
        };
        if !self.agents.iter().any(|a| a.bpffs == agent.bpffs) {
            self.agents.push(agent.clone());
        }
        Ok(agent)
    }

    /// Starts an agent on every node and waits for each one's first sync.
    pub fn start_agents(&mut self, timeout: Duration) -> Result<Vec<Agent>> {
        let nodes: Vec<u8> = self.nodes().iter().map(|n| n.index).collect();
        let mut agents = Vec::new();
        for n in nodes {
            agents.push(self.start_agent(n)?);
        }
        for a in &agents {
            a.wait_for_sync(1, timeout)?;
        }
        Ok(agents)
    }

    /// Stops an agent (SIGTERM, up to 2 s, then SIGKILL). Its pins stay; the
    /// bed still runs `cleanup` for it when dropped.
    pub fn stop_agent(&mut self, agent: &Agent) {
        self.stop_pid(agent.pid);
    }
}

/// The `services` array of a `status -o json` document (empty when absent).
pub fn status_services(status: &Value) -> &[Value] {
    status["services"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The entry of a `status -o json` document for `vip:port/proto`.
pub fn find_status_service<'a>(
    status: &'a Value,
    vip: &str,
    port: u16,
    proto: Proto,
) -> Option<&'a Value> {
    status_services(status).iter().find(|s| {
        s["vip"].as_str() == Some(vip)
            && s["port"].as_u64() == Some(port.into())
            && s["protocol"]
                .as_str()
                .is_some_and(|p| p.eq_ignore_ascii_case(proto.k8s()))
    })
}

/// `(address, port, state)` of every backend of a status service entry.
pub fn status_backends(svc: &Value) -> Vec<(String, u16, String)> {
    let mut v: Vec<(String, u16, String)> = svc["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_string(),
                b["port"].as_u64().unwrap_or_default() as u16,
                b["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Makes sure /sys/fs/bpf is a bpf file system (mounts it when it is not).
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if !mounted {
        fs::create_dir_all("/sys/fs/bpf").ok();
        nix::mount::mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting bpffs on /sys/fs/bpf")?;
    }
    Ok(())
}

/// Generations of all `sync complete` lines: `generation=N` (text logs) or
/// `"generation":N` (JSON logs).
pub fn sync_generations(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("sync complete"))
        .filter_map(|l| {
            let at = l.find("generation")? + "generation".len();
            let rest = l[at..].trim_start_matches(['"', '=', ':', ' ']);
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_generations() {
        let log = "\u{1b}[2m2026\u{1b}[0m INFO sync complete \u{1b}[3mgeneration\u{1b}[0m\u{1b}[2m=\u{1b}[0m3 services=1\n\
                   {\"fields\":{\"message\":\"sync complete\",\"generation\":12}}\n\
                   INFO something else generation=99\n";
        assert_eq!(sync_generations(&strip_ansi(log)), vec![3, 12]);
    }
}

//! `cargo xtask bench`: the bench's Debian packages, release builds of the agent and the test
//! binaries, then `target/release/bench`, which measures the agent side by side with
//! kube-proxy's iptables and nftables modes and writes BENCHMARKS.md in the workspace root.
//! `BENCH_QUICK=1` makes a short run (10 and 1,000 Services, one round) for development.

use anyhow::{Context, Result, ensure};
use std::path::Path;
use std::process::Command;

/// iptables provides iptables-nft and iptables-legacy; nftables provides nft.
const PACKAGES: &[&str] = &["iptables", "nftables", "iperf3"];

pub fn bench(root: &Path) -> Result<()> {
    super::debian_packages(PACKAGES)?;
    super::run(super::cargo(root).args([
        "build",
        "--release",
        "-p",
        "proxy-agent",
        "-p",
        "tests",
        "--bins",
    ]))?;
    let release = super::target_dir(root).join("release");
    let (bench, agent) = (release.join("bench"), release.join("proxy-agent"));
    for bin in [&bench, &agent] {
        ensure!(bin.is_file(), "{} was not built", bin.display());
    }
    let mut cmd = Command::new(&bench);
    cmd.current_dir(root).env("PROXY_AGENT_BIN", &agent);
    if std::env::var_os("BENCH_OUT").is_none() {
        cmd.env("BENCH_OUT", root.join("BENCHMARKS.md"));
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", bench.display()))?;
    std::process::exit(super::exit_code(status))
}

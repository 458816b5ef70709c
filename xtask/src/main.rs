//! `cargo xtask setup | build | test | demo | bench`: everything a person or CI runs (Debian 12, as root).

mod bench;

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::{env, fs, io::BufRead, io::BufReader};

#[derive(Parser)]
#[command(about = "Project tasks for the eBPF Service proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh Debian 12 machine lacks (idempotent; a no-op when all is present).
    Setup,
    /// Setup, then build the agent (with its embedded eBPF object) and the test binaries.
    Build,
    /// Setup, build, `cargo fmt --check`, clippy, then every test.
    Test {
        /// Passed on to `cargo test`, e.g. `cargo xtask test -- e2e`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, then run the demo on an emulated two-node cluster.
    Demo,
    /// Setup, release build, then benchmark against kube-proxy's modes into BENCHMARKS.md
    /// (`BENCH_QUICK=1` for a short run).
    Bench,
}

const DEBIAN_PACKAGES: &[&str] = &["iproute2", "bpftool", "iperf3", "util-linux"];
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";

fn main() -> ExitCode {
    forward_ctrl_c();
    match xtask(Cli::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn xtask(cmd: Cmd) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().context("workspace root")?;
    env::set_current_dir(&root)?;
    match cmd {
        Cmd::Setup => setup(&root),
        Cmd::Build => setup(&root).and_then(|()| build(&root).map(drop)),
        Cmd::Test { args } => {
            setup(&root)?;
            let agent = build(&root)?;
            test(&root, &agent, &args)
        }
        Cmd::Bench => {
            setup(&root)?;
            bench::bench(&root)
        }
        Cmd::Demo => {
            setup(&root)?;
            let agent = build(&root)?;
            demo(&root, &agent)
        }
    }
}

/// Ctrl-C reaches the whole foreground process group: let the child (test, demo) handle it and
/// clean up while xtask waits for it. A handler, unlike SIG_IGN, is reset in exec'd children.
fn forward_ctrl_c() {
    extern "C" fn ignore(_: libc::c_int) {}
    let handler: extern "C" fn(libc::c_int) = ignore;
    // SAFETY: installs an async-signal-safe handler that does nothing.
    unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
}

fn setup(root: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "must run as root (it installs packages, mounts bpffs, loads eBPF)"
    );
    debian_packages(DEBIAN_PACKAGES)?;
    let tc = Toolchains::read(root)?;
    let host = host_triple()?;
    let components: Vec<&str> = tc.user_components.iter().map(String::as_str).collect();
    toolchain(&tc.user, &components, &host)?;
    toolchain(&tc.ebpf, &["rust-src", "clippy"], &host)?;
    bpf_linker(&tc)?;
    bpffs()?;
    cgroup2()
}

/// Installs whichever of `packages` are missing (one `apt-get update` first, only if needed).
fn debian_packages(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for pkg in packages {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()?;
        if String::from_utf8_lossy(&out.stdout) == "install ok installed" {
            println!("ok: Debian package {pkg}");
        } else {
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing: Debian packages {}", missing.join(" "));
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Toolchain names, read from the files that pin them (not duplicated here).
struct Toolchains {
    /// Userspace toolchain: `channel` in rust-toolchain.toml.
    user: String,
    user_components: Vec<String>,
    /// eBPF nightly: `EBPF_TOOLCHAIN` in proxy-common/src/lib.rs.
    ebpf: String,
}

impl Toolchains {
    fn read(root: &Path) -> Result<Self> {
        let toml = read(&root.join("rust-toolchain.toml"))?;
        let value = |key: &str| {
            toml.lines()
                .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix('='))
                .map(quoted)
                .unwrap_or_default()
        };
        let user = value("channel")
            .into_iter()
            .next()
            .context("no channel in rust-toolchain.toml")?;
        let common = read(&root.join("proxy-common/src/lib.rs"))?;
        let ebpf = common
            .lines()
            .find(|l| l.contains("const EBPF_TOOLCHAIN"))
            .and_then(|l| quoted(l).into_iter().next())
            .context("no EBPF_TOOLCHAIN in proxy-common/src/lib.rs")?;
        Ok(Self {
            user,
            user_components: value("components"),
            ebpf,
        })
    }
}

/// The double-quoted strings in `s`.
fn quoted(s: &str) -> Vec<String> {
    s.split('"').skip(1).step_by(2).map(str::to_owned).collect()
}

fn host_triple() -> Result<String> {
    let out = output(Command::new("rustc").arg("-vV"))?;
    out.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("no host in `rustc -vV`")
}

fn toolchain(name: &str, components: &[&str], host: &str) -> Result<()> {
    let full = format!("{name}-{host}");
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let installed = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|t| t == name || t == full);
    let missing: Vec<&str> = if installed {
        let have = output(
            Command::new("rustup")
                .args(["component", "list", "--installed"])
                .args(["--toolchain", name]),
        )?;
        let have: Vec<&str> = have.lines().map(str::trim).collect();
        let has = |c: &str| have.iter().any(|h| *h == c || *h == format!("{c}-{host}"));
        components.iter().copied().filter(|c| !has(c)).collect()
    } else {
        components.to_vec()
    };
    if installed && missing.is_empty() {
        println!("ok: toolchain {name} with {}", components.join(", "));
        return Ok(());
    }
    println!(
        "installing: toolchain {name} with {}",
        components.join(", ")
    );
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "install", name, "--profile", "minimal"]);
    if !components.is_empty() {
        cmd.args(["--component", &components.join(",")]);
    }
    run(&mut cmd)
}

/// bpf-linker built against the eBPF nightly's own libLLVM (no system LLVM needed).
fn bpf_linker(tc: &Toolchains) -> Result<()> {
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{}", tc.ebpf))
            .args(["--print", "sysroot"]),
    )?;
    let lib = Path::new(sysroot.trim()).join("lib");
    // e.g. libLLVM-22-rust-1.97.0-nightly.so: link name LLVM-22-rust-1.97.0-nightly, major 22.
    let link_name = fs::read_dir(&lib)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|f| {
            let name = f.strip_prefix("lib")?.strip_suffix(".so")?;
            (name.starts_with("LLVM-") && name.contains("-rust-")).then(|| name.to_owned())
        })
        .with_context(|| format!("no libLLVM-*-rust-*.so in {}", lib.display()))?;
    let major: u32 = link_name["LLVM-".len()..]
        .split('-')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("no LLVM major version in {link_name}"))?;
    if bpf_linker_ok(major) {
        println!("ok: bpf-linker {BPF_LINKER_VERSION} (for LLVM {major})");
        return Ok(());
    }
    println!("installing: bpf-linker {BPF_LINKER_VERSION} against {link_name} (about a minute)");
    let lib = lib.display();
    run(Command::new("cargo")
        .arg(format!("+{}", tc.user))
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major},no-llvm-linking"),
        ])
        .env(
            "RUSTFLAGS",
            format!("-L {lib} -l dylib={link_name} -C link-arg=-Wl,-rpath,{lib}"),
        ))
}

/// The right version runs, and the libLLVM it loads (if dynamic) is not older than rustc's.
fn bpf_linker_ok(llvm_major: u32) -> bool {
    let version = Command::new("bpf-linker").arg("--version").output();
    let Ok(out) = version else { return false };
    if !out.status.success()
        || String::from_utf8_lossy(&out.stdout).trim() != format!("bpf-linker {BPF_LINKER_VERSION}")
    {
        return false;
    }
    let Some(path) = env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
    else {
        return false;
    };
    let Ok(ldd) = output(Command::new("ldd").arg(&path)) else {
        return true;
    };
    // "libLLVM.so.22.1-rust-..." or "libLLVM-22.so.1": the first number after "libLLVM".
    let linked = ldd.split("libLLVM").nth(1).and_then(|rest| {
        let digits: String = rest
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<u32>().ok()
    });
    linked.is_none_or(|linked| linked >= llvm_major)
}

fn mounts() -> Result<Vec<(String, String)>> {
    let text = read(Path::new("/proc/mounts"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace().skip(1);
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .collect())
}

fn bpffs() -> Result<()> {
    if mounts()?
        .iter()
        .any(|(dir, fs)| dir == BPFFS && fs == "bpf")
    {
        println!("ok: bpffs mounted at {BPFFS}");
        return Ok(());
    }
    println!("installing: bpffs at {BPFFS} (mount -t bpf)");
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

fn cgroup2() -> Result<()> {
    match mounts()?.into_iter().find(|(_, fs)| fs == "cgroup2") {
        Some((dir, _)) => {
            println!("ok: cgroup v2 mounted at {dir}");
            Ok(())
        }
        None => bail!(
            "no cgroup v2 mount (try: mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified)"
        ),
    }
}

/// Builds the agent (its build.rs builds the eBPF object) and the test binaries; returns the agent.
fn build(root: &Path) -> Result<PathBuf> {
    run(cargo(root).args(["build", "-p", "proxy-agent", "-p", "tests", "--bins"]))?;
    let agent = target_dir(root).join("debug/proxy-agent");
    ensure!(agent.is_file(), "{} was not built", agent.display());
    println!("agent binary: {}", agent.display());
    Ok(agent)
}

fn test(root: &Path, agent: &Path, args: &[String]) -> Result<()> {
    run(cargo(root).args(["fmt", "--all", "--check"]))?;
    // Host crates (the workspace's default members), then the eBPF crate for its own target.
    run(cargo(root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    let ebpf = Toolchains::read(root)?.ebpf;
    run(cargo(root).args([
        &format!("+{ebpf}"),
        "clippy",
        "-p",
        "proxy-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut child = cargo(root)
        .args(["test", "--no-fail-fast"])
        .args(args)
        .env("PROXY_AGENT_BIN", agent)
        .env_remove("RUST_TEST_THREADS")
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // Echo the output as it comes and add up the `test result:` lines of every test binary.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = BufReader::new(child.stdout.take().context("cargo test stdout")?);
    for line in stdout.split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        println!("{line}");
        if let Some([p, f, i]) = result_counts(&line) {
            (passed, failed, ignored) = (passed + p, failed + f, ignored + i);
        }
    }
    let mut status = child.wait()?;
    // The whole end-to-end suite again with the legacy tc attach (clsact + netlink filter, for
    // kernels without tcx), but for the tests that are about tcx links themselves. Only in the
    // full run.
    if args.is_empty() {
        println!("\n== the end-to-end suite with TB_TC_ATTACH=netlink");
        let mut child = cargo(root)
            .args(["test", "-p", "tests", "--no-fail-fast", "--"])
            .args(TCX_ONLY.iter().flat_map(|t| ["--skip", t]))
            .env("PROXY_AGENT_BIN", agent)
            .env("TB_TC_ATTACH", "netlink")
            .env_remove("RUST_TEST_THREADS")
            .stdout(Stdio::piped())
            .spawn()
            .context("running cargo test (netlink pass)")?;
        let stdout = BufReader::new(child.stdout.take().context("cargo test stdout")?);
        for line in stdout.split(b'\n') {
            let line = String::from_utf8_lossy(&line?).into_owned();
            println!("{line}");
            if let Some([p, f, i]) = result_counts(&line) {
                (passed, failed, ignored) = (passed + p, failed + f, ignored + i);
            }
        }
        let s = child.wait()?;
        if !s.success() {
            status = s;
        }
    }
    let skipped = if ignored > 0 {
        format!(", {ignored} skipped")
    } else {
        String::new()
    };
    println!("{passed} passed, {failed} failed{skipped}");
    ensure!(status.success(), "cargo test failed ({status})");
    Ok(())
}

/// Tests left out of the netlink pass: they check tcx links (the pins, a blocked tcx attach).
/// Netlink mode's own restart, coexistence and cleanup are `netlink_tc_attach_coexists_restarts_and_cleans_up`.
const TCX_ONLY: &[&str] = &[
    "agent_restarts_do_not_disturb_traffic",
    "missing_hook_fails_health",
];

/// `[passed, failed, ignored]` of a libtest line like
/// `test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`.
fn result_counts(line: &str) -> Option<[u64; 3]> {
    let result = line.trim().strip_prefix("test result: ")?;
    let mut counts = [0; 3];
    for part in result.split(['.', ';']) {
        if let Some((n, word)) = part.trim().split_once(' ') {
            let i = ["passed", "failed", "ignored"]
                .iter()
                .position(|w| *w == word);
            if let (Some(i), Ok(n)) = (i, n.parse::<u64>()) {
                counts[i] += n;
            }
        }
    }
    Some(counts)
}

fn demo(root: &Path, agent: &Path) -> Result<()> {
    let demo = target_dir(root).join("debug/demo");
    ensure!(
        demo.is_file(),
        "{} was not built (the tests crate's `demo` bin)",
        demo.display()
    );
    let status = Command::new(&demo)
        .current_dir(root)
        .env("PROXY_AGENT_BIN", agent)
        .status()
        .with_context(|| format!("running {}", demo.display()))?;
    std::process::exit(exit_code(status))
}

fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root);
    cmd
}

fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_result_lines() {
        let ok = "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(result_counts(ok), Some([12, 0, 1]));
        let bad = "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 5 filtered out";
        assert_eq!(result_counts(bad), Some([3, 2, 0]));
        assert_eq!(result_counts("running 3 tests"), None);
    }

    #[test]
    fn reads_the_pinned_toolchains() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let tc = Toolchains::read(&root).unwrap();
        assert!(!tc.user.is_empty() && tc.ebpf.starts_with("nightly-"));
        assert!(tc.user_components.iter().any(|c| c == "clippy"));
        assert_eq!(
            quoted(r#"components = ["rustfmt", "clippy"]"#),
            ["rustfmt", "clippy"]
        );
    }
}

//! `proxy-agent check`: what this kernel and node offer for the given `run` flags, found
//! without loading, attaching or pinning anything; fails when `run` could not work.
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::datapath::{
    loader::{TcAttach, XdpSetting},
    probe::{self, Report},
};

/// What `check` looks at, from the flags `run` takes.
pub struct CheckConfig {
    pub interfaces: Vec<String>,
    pub xdp: XdpSetting,
    pub tc_attach: TcAttach,
    pub socket_lb_cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
}

/// One finding about the node.
#[derive(Serialize)]
pub struct Finding {
    pub what: String,
    pub ok: bool,
    pub detail: String,
    /// `run` would fail (or not proxy) because of it.
    pub fatal: bool,
}

#[derive(Serialize)]
pub struct Check {
    pub kernel: Report,
    pub node: Vec<Finding>,
    /// Everything that stops `run`, in words (empty: it can run).
    pub errors: Vec<String>,
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn fs_magic(p: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(p)
        .ok()
        .map(|s| s.filesystem_type().0)
}

/// The nearest existing ancestor of `p` (the bpffs directory is created by `run`).
fn existing_ancestor(p: &Path) -> Option<&Path> {
    p.ancestors().find(|a| a.exists())
}

pub fn check(cfg: &CheckConfig) -> Check {
    let kernel = probe::decide(probe::Wanted {
        xdp: cfg.xdp,
        socket_lb: cfg.socket_lb_cgroup.is_some(),
        tc_attach: cfg.tc_attach,
    });
    let mut node = Vec::new();
    let dir = existing_ancestor(&cfg.bpffs);
    let on_bpffs = dir.and_then(fs_magic) == Some(BPF_FS_MAGIC);
    node.push(Finding {
        what: format!("bpffs {}", cfg.bpffs.display()),
        ok: on_bpffs,
        detail: if on_bpffs {
            "on a BPF filesystem".into()
        } else {
            "not on a BPF filesystem (mount -t bpf bpf /sys/fs/bpf)".into()
        },
        fatal: !on_bpffs,
    });
    if let Some(cg) = &cfg.socket_lb_cgroup {
        let ok = fs_magic(cg) == Some(CGROUP2_SUPER_MAGIC);
        node.push(Finding {
            what: format!("cgroup {}", cg.display()),
            ok,
            detail: if ok {
                "a cgroup v2 directory".into()
            } else {
                "not a cgroup v2 directory (socket LB attaches there; --socket-lb=false runs without)"
                    .into()
            },
            fatal: !ok,
        });
    }
    let present: Vec<String> = nix::net::if_::if_nameindex()
        .map(|l| {
            l.iter()
                .map(|i| i.name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for i in &cfg.interfaces {
        let ok = present.contains(i);
        node.push(Finding {
            what: format!("interface {i}"),
            ok,
            // run attaches interfaces as they appear, so a missing one is not fatal.
            detail: if ok {
                "present".into()
            } else {
                "absent: attached when it appears".into()
            },
            fatal: false,
        });
    }
    let mut errors = kernel.fatal();
    errors.extend(
        node.iter()
            .filter(|f| f.fatal)
            .map(|f| format!("{}: {}", f.what, f.detail)),
    );
    Check {
        kernel,
        node,
        errors,
    }
}

pub fn print_table(c: &Check) {
    let p = &c.kernel.probes;
    println!("KERNEL {}", p.kernel);
    println!("  {:<34} {}", "tcx", yes(p.tcx));
    println!("  {:<34} {}", "XDP bpf_link", yes(p.xdp_link));
    println!("  {:<34} {}", "BTF (vmlinux)", yes(p.btf));
    for f in &p.features {
        println!("  {:<34} {}", f.name, yes(f.supported));
    }
    println!("\nHOOKS");
    for h in &c.kernel.hooks {
        let mark = if h.fatal { "  FAILS" } else { "" };
        println!("  {:<10} {:<12} {}{mark}", h.hook, h.mode, h.reason);
    }
    println!("\nNODE");
    for f in &c.node {
        println!("  {:<34} {:<4} {}", f.what, yes(f.ok), f.detail);
    }
    if c.errors.is_empty() {
        println!("\nrun can start with these flags");
    } else {
        println!("\nrun cannot work with these flags:");
        for e in &c.errors {
            println!("  {e}");
        }
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

//! What BPF programs are attached inside a namespace or cgroup, asked of the
//! kernel directly: tcx (BPF_PROG_QUERY), XDP (`ip -d link`), classic tc filters
//! (`tc filter show`), cgroup sock_addr hooks (BPF_PROG_QUERY on the cgroup).
//! Debian 12's bpftool (7.1) predates tcx, so `bpftool net show` alone would miss
//! tcx links.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::cmd;
use crate::netns::in_netns;

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// cgroup attach types a Service proxy may use, with readable names.
const CGROUP_TYPES: &[(u32, &str)] = &[
    (0, "cgroup_inet_ingress"),
    (1, "cgroup_inet_egress"),
    (2, "cgroup_inet_sock_create"),
    (3, "cgroup_sock_ops"),
    (8, "cgroup_inet4_bind"),
    (9, "cgroup_inet6_bind"),
    (10, "cgroup_inet4_connect"),
    (11, "cgroup_inet6_connect"),
    (12, "cgroup_inet4_post_bind"),
    (13, "cgroup_inet6_post_bind"),
    (14, "cgroup_udp4_sendmsg"),
    (15, "cgroup_udp6_sendmsg"),
    (19, "cgroup_udp4_recvmsg"),
    (20, "cgroup_udp6_recvmsg"),
    (21, "cgroup_getsockopt"),
    (22, "cgroup_setsockopt"),
    (29, "cgroup_inet4_getpeername"),
    (30, "cgroup_inet6_getpeername"),
    (31, "cgroup_inet4_getsockname"),
    (32, "cgroup_inet6_getsockname"),
    (34, "cgroup_inet_sock_release"),
];

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Number of programs attached to `target` (an ifindex for tcx, a cgroup fd)
/// for `attach_type`; 0 when the kernel does not know the attach type.
fn prog_count(target: u32, attach_type: u32) -> u32 {
    let mut attr = QueryAttr {
        target,
        attach_type,
        ..Default::default()
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix of the size passed;
    // with prog_ids = 0 the kernel only writes prog_cnt (and flags/revision) in it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as u32,
        )
    };
    if rc < 0 { 0 } else { attr.prog_cnt }
}

/// One program attached through tcx, with the id of the link holding it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TcxAttachment {
    pub iface: String,
    /// `tcx_ingress` or `tcx_egress`.
    pub direction: &'static str,
    pub prog_id: u32,
    /// 0 when the program was attached without a link.
    pub link_id: u32,
}

/// Program and link ids attached to `ifindex` for `attach_type` (tcx), from
/// the calling thread's network namespace.
fn tcx_ids(ifindex: u32, attach_type: u32) -> Vec<(u32, u32)> {
    const CAP: usize = 64;
    let mut progs = [0u32; CAP];
    let mut links = [0u32; CAP];
    let mut attr = QueryAttr {
        target: ifindex,
        attach_type,
        prog_ids: progs.as_mut_ptr() as u64,
        prog_cnt: CAP as u32,
        link_ids: links.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix of the size passed; prog_ids and
    // link_ids point to arrays of prog_cnt u32s that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as u32,
        )
    };
    if rc < 0 {
        return Vec::new();
    }
    let n = (attr.prog_cnt as usize).min(CAP);
    (0..n).map(|i| (progs[i], links[i])).collect()
}

/// Every tcx attachment (ingress and egress) on every interface of namespace
/// `ns`, with program and link ids: a link id that stays the same while the
/// program id changes means the program was replaced inside the link.
pub fn tcx_attachments(ns: &str) -> Result<Vec<TcxAttachment>> {
    let ifaces = netns_interfaces(ns)?;
    let mut found = in_netns(ns, || tcx_attachments_here(&ifaces))?;
    found.sort();
    Ok(found)
}

/// `(name, ifindex)` of every interface in namespace `ns`.
pub fn netns_interfaces(ns: &str) -> Result<Vec<(String, u32)>> {
    let links = cmd::ip(&["-n", ns, "-j", "link", "show"])?;
    let links: Value = serde_json::from_str(&links).context("parsing ip -j link output")?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["ifname"].as_str().unwrap_or("?").to_string(),
                l["ifindex"].as_u64().unwrap_or(0) as u32,
            )
        })
        .collect())
}

/// [`tcx_attachments`] for the given `(name, ifindex)` interfaces, from the
/// calling thread's network namespace (cheap enough to poll in a loop).
pub fn tcx_attachments_here(ifaces: &[(String, u32)]) -> Vec<TcxAttachment> {
    let mut v = Vec::new();
    for (name, index) in ifaces {
        for (t, direction) in [
            (BPF_TCX_INGRESS, "tcx_ingress"),
            (BPF_TCX_EGRESS, "tcx_egress"),
        ] {
            for (prog_id, link_id) in tcx_ids(*index, t) {
                v.push(TcxAttachment {
                    iface: name.clone(),
                    direction,
                    prog_id,
                    link_id,
                });
            }
        }
    }
    v
}

/// Every BPF attachment on every interface of namespace `ns`, one readable
/// line each (`lan0 tcx_ingress: 1 program(s)`, `pv1-2 xdp`, ...). Empty when
/// nothing is attached.
pub fn netns_attachments(ns: &str) -> Result<Vec<String>> {
    let links = cmd::ip(&["-n", ns, "-j", "-d", "link", "show"])?;
    let links: Value = serde_json::from_str(&links).context("parsing ip -j link output")?;
    let mut found = Vec::new();
    let mut ifaces = Vec::new();
    for l in links.as_array().into_iter().flatten() {
        let name = l["ifname"].as_str().unwrap_or("?").to_string();
        let index = l["ifindex"].as_u64().unwrap_or(0) as u32;
        if l.get("xdp").is_some() {
            found.push(format!("{name} xdp: {}", l["xdp"]));
        }
        ifaces.push((name, index));
    }
    let tcx = in_netns(ns, || {
        let mut v = Vec::new();
        for (name, index) in &ifaces {
            for (t, what) in [
                (BPF_TCX_INGRESS, "tcx_ingress"),
                (BPF_TCX_EGRESS, "tcx_egress"),
            ] {
                let n = prog_count(*index, t);
                if n > 0 {
                    v.push(format!("{name} {what}: {n} program(s)"));
                }
            }
        }
        v
    })?;
    found.extend(tcx);
    for (name, _) in &ifaces {
        for dir in ["ingress", "egress"] {
            let out = cmd::run_output(
                Command::new("tc").args(["-n", ns, "filter", "show", "dev", name, dir]),
                cmd::SHORT,
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && !text.trim().is_empty() {
                found.push(format!(
                    "{name} tc {dir} filters: {}",
                    text.trim().replace('\n', "; ")
                ));
            }
        }
    }
    Ok(found)
}

/// BPF programs attached directly to cgroup `dir` (not inherited ones).
pub fn cgroup_attachments(dir: &Path) -> Result<Vec<String>> {
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut found = Vec::new();
    for (t, what) in CGROUP_TYPES {
        let n = prog_count(f.as_raw_fd() as u32, *t);
        if n > 0 {
            found.push(format!("{} {what}: {n} program(s)", dir.display()));
        }
    }
    Ok(found)
}

/// `bpftool net show` inside `ns` (for humans; misses tcx on old bpftool).
pub fn bpftool_net_show(ns: &str) -> Result<String> {
    cmd::run_ok(
        Command::new("nsenter")
            .arg(format!("--net={}", crate::netns::netns_path(ns).display()))
            .args(["--", "bpftool", "net", "show"]),
        cmd::SHORT,
    )
}

/// `bpftool -j net show` inside `ns`, parsed.
pub fn bpftool_net_show_json(ns: &str) -> Result<Value> {
    let out = cmd::run_ok(
        Command::new("nsenter")
            .arg(format!("--net={}", crate::netns::netns_path(ns).display()))
            .args(["--", "bpftool", "-j", "net", "show"]),
        cmd::SHORT,
    )?;
    serde_json::from_str(&out).with_context(|| format!("parsing bpftool output {out:?}"))
}

/// Loaded programs (type, name) that use the map pinned at `pin`, from `bpftool`: the
/// programs an agent loaded are the ones that use its maps, whatever else the machine runs.
pub fn programs_using_map(pin: &Path) -> Result<Vec<(String, String)>> {
    let map = cmd::run_ok(
        Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(pin),
        cmd::SHORT,
    )?;
    let map: Value = serde_json::from_str(&map).context("parsing bpftool map show")?;
    let id = map["id"]
        .as_u64()
        .context("bpftool map show without an id")?;
    let progs = cmd::run_ok(
        Command::new("bpftool").args(["-j", "prog", "show"]),
        cmd::SHORT,
    )?;
    let progs: Value = serde_json::from_str(&progs).context("parsing bpftool prog show")?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["map_ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|m| m.as_u64() == Some(id)))
        })
        .map(|p| {
            (
                p["type"].as_str().unwrap_or("?").to_string(),
                p["name"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect())
}

//! What the running kernel offers the datapath (program and map types, the helpers our programs
//! call, TCX, XDP links, BTF), asked of the kernel without changing anything, and the choice
//! that follows for each hook: `run` logs it and `status` and `check` show it.
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::{Deserialize, Serialize};

use super::loader::{TcAttach, XdpSetting};

/// One probed feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    pub name: String,
    pub supported: bool,
}

/// Everything probed, as plain facts (no decision yet).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probes {
    /// `uname -r`.
    pub kernel: String,
    /// tcx attachment (BPF_TCX_INGRESS, Linux 6.6).
    pub tcx: bool,
    /// XDP through bpf_link, which a restarted agent can adopt (Linux 5.9).
    pub xdp_link: bool,
    /// Kernel BTF (/sys/kernel/btf/vmlinux); informational, the programs do not need CO-RE.
    pub btf: bool,
    /// Program types, map types and (program type, helper) pairs.
    pub features: Vec<Feature>,
}

impl Probes {
    fn has(&self, name: &str) -> bool {
        self.features.iter().any(|f| f.name == name && f.supported)
    }

    fn missing(&self, prefix: &str) -> Vec<String> {
        self.features
            .iter()
            .filter(|f| f.name.starts_with(prefix) && !f.supported)
            .map(|f| f.name.clone())
            .collect()
    }
}

/// The helpers each program calls (aya's context methods map to skb_load_bytes/skb_store_bytes
/// and the checksum helpers); `tests/floor.rs` checks the lists against the helpers the loaded
/// programs call.
const TC_HELPERS: &[(&str, BpfHelper)] = &[
    ("ktime_get_ns", BpfHelper::BPF_FUNC_ktime_get_ns),
    ("get_prandom_u32", BpfHelper::BPF_FUNC_get_prandom_u32),
    ("skb_load_bytes", BpfHelper::BPF_FUNC_skb_load_bytes),
    ("skb_store_bytes", BpfHelper::BPF_FUNC_skb_store_bytes),
    ("l3_csum_replace", BpfHelper::BPF_FUNC_l3_csum_replace),
    ("l4_csum_replace", BpfHelper::BPF_FUNC_l4_csum_replace),
    // The reject (ICMP port unreachable) resizes the packet and sends it back out.
    ("skb_change_tail", BpfHelper::BPF_FUNC_skb_change_tail),
    ("redirect", BpfHelper::BPF_FUNC_redirect),
];
const XDP_HELPERS: &[(&str, BpfHelper)] = &[
    ("ktime_get_ns", BpfHelper::BPF_FUNC_ktime_get_ns),
    ("get_prandom_u32", BpfHelper::BPF_FUNC_get_prandom_u32),
    ("xdp_load_bytes", BpfHelper::BPF_FUNC_xdp_load_bytes),
    ("xdp_store_bytes", BpfHelper::BPF_FUNC_xdp_store_bytes),
    ("fib_lookup", BpfHelper::BPF_FUNC_fib_lookup),
    ("redirect", BpfHelper::BPF_FUNC_redirect),
];
const SOCK_HELPERS: &[(&str, BpfHelper)] = &[
    // sessionAffinity timestamps.
    ("ktime_get_ns", BpfHelper::BPF_FUNC_ktime_get_ns),
    ("get_prandom_u32", BpfHelper::BPF_FUNC_get_prandom_u32),
    ("get_socket_cookie", BpfHelper::BPF_FUNC_get_socket_cookie),
    ("get_netns_cookie", BpfHelper::BPF_FUNC_get_netns_cookie),
];
/// The helpers the start-up probes check for a program kind ("tc", "xdp", "sock").
pub fn probed_helpers(kind: &str) -> Vec<&'static str> {
    let list = match kind {
        "tc" => TC_HELPERS,
        "xdp" => XDP_HELPERS,
        "sock" => SOCK_HELPERS,
        _ => &[],
    };
    list.iter().map(|(name, _)| *name).collect()
}

const MAPS: &[(&str, MapType)] = &[
    ("hash", MapType::Hash),
    ("lru_hash", MapType::LruHash),
    ("lru_percpu_hash", MapType::LruPerCpuHash),
    ("array", MapType::Array),
    ("percpu_array", MapType::PerCpuArray),
    ("hash_of_maps", MapType::HashOfMaps),
];

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u64 = 46;

/// Whether the kernel knows the tcx attach type: a query of loopback's tcx ingress hook answers
/// (with no programs) where TCX exists and fails with EINVAL where it does not.
fn tcx_supported() -> bool {
    let mut attr = [0u64; 16];
    // struct { __u32 target_ifindex; __u32 attach_type; ... }: loopback is ifindex 1 in every
    // network namespace.
    attr[0] = 1 | (BPF_TCX_INGRESS << 32);
    super::loader::bpf(BPF_PROG_QUERY, &mut attr).is_ok()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_default()
}

/// Asks the kernel (a few tiny program and map loads, no attachment).
pub fn probe() -> Probes {
    let mut features = Vec::new();
    let mut push = |name: String, supported: bool| features.push(Feature { name, supported });
    for (prefix, ty, helpers) in [
        ("tc", ProgramType::SchedClassifier, TC_HELPERS),
        ("xdp", ProgramType::Xdp, XDP_HELPERS),
        ("sock_addr", ProgramType::CgroupSockAddr, SOCK_HELPERS),
    ] {
        push(
            format!("{prefix}: program type"),
            is_program_supported(ty).unwrap_or(false),
        );
        for (name, helper) in helpers {
            push(
                format!("{prefix}: helper {name}"),
                is_helper_supported(ty, *helper).unwrap_or(false),
            );
        }
    }
    for (name, ty) in MAPS {
        push(
            format!("map: {name}"),
            is_map_supported(*ty).unwrap_or(false),
        );
    }
    Probes {
        kernel: kernel_release(),
        tcx: tcx_supported(),
        xdp_link: aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 9, 0)),
        btf: aya::Btf::from_sys_fs().is_ok(),
        features,
    }
}

/// The choice for one hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// "tc", "xdp" or "socket_lb".
    pub hook: String,
    /// How it attaches ("tcx", "bpf_link", "cgroup_link") or "off".
    pub mode: String,
    /// Why, in words (the missing features when off).
    pub reason: String,
    /// The configuration asked for it and it cannot work: `run` refuses to start.
    pub fatal: bool,
}

/// What the configuration wants of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub xdp: XdpSetting,
    pub socket_lb: bool,
    pub tc_attach: TcAttach,
}

/// The choice per hook for `want` on a kernel with `p`. The tc program carries all traffic,
/// so the datapath does not run without it; XDP under `auto` is an optimisation and turns
/// itself off where the kernel lacks what it needs; socket LB, when asked for, must work.
pub fn plan(p: &Probes, want: Wanted) -> Vec<Hook> {
    let hook = |hook: &str, mode: &str, reason: String, fatal: bool| Hook {
        hook: hook.into(),
        mode: mode.into(),
        reason,
        fatal,
    };
    let maps = p.missing("map: ");
    let mut out = Vec::new();
    let mut tc_missing = p.missing("tc: ");
    tc_missing.extend(maps.iter().cloned());
    if !tc_missing.is_empty() {
        out.push(hook(
            "tc",
            "off",
            format!("missing {}", tc_missing.join(", ")),
            true,
        ));
    } else {
        out.push(match (want.tc_attach, p.tcx) {
            (TcAttach::Netlink, _) => hook(
                "tc",
                "netlink",
                "clsact filter, direct-action (--tc-attach netlink)".into(),
                false,
            ),
            (TcAttach::Auto, false) => hook(
                "tc",
                "netlink",
                "no tcx (Linux 6.6): clsact filter, direct-action".into(),
                false,
            ),
            (TcAttach::Tcx, false) => hook(
                "tc",
                "off",
                "no tcx (Linux 6.6) and --tc-attach tcx".into(),
                true,
            ),
            (_, true) => hook("tc", "tcx", "tcx link, pinned".into(), false),
        });
    }
    let mut xdp_missing = p.missing("xdp: ");
    if !p.has("xdp: program type") && !xdp_missing.iter().any(|m| m == "xdp: program type") {
        xdp_missing.push("xdp: program type".into());
    }
    if !p.xdp_link {
        xdp_missing.push("XDP bpf_link (Linux 5.9)".into());
    }
    out.push(match want.xdp {
        XdpSetting::Off => hook("xdp", "off", "--xdp=off".into(), false),
        _ if xdp_missing.is_empty() => hook("xdp", "bpf_link", "XDP link, pinned".into(), false),
        // auto: the tc program handles everything XDP would; only the fast path is lost.
        XdpSetting::Auto => hook(
            "xdp",
            "off",
            format!(
                "missing {}; tc handles NodePort traffic",
                xdp_missing.join(", ")
            ),
            false,
        ),
        _ => hook(
            "xdp",
            "off",
            format!(
                "missing {} (--xdp {} asks for it)",
                xdp_missing.join(", "),
                format!("{:?}", want.xdp).to_lowercase()
            ),
            true,
        ),
    });
    let sock_missing = p.missing("sock_addr: ");
    out.push(match (want.socket_lb, sock_missing.is_empty()) {
        (false, _) => hook("socket_lb", "off", "--socket-lb=false".into(), false),
        (true, true) => hook(
            "socket_lb",
            "cgroup_link",
            "cgroup link, pinned".into(),
            false,
        ),
        (true, false) => hook(
            "socket_lb",
            "off",
            format!(
                "missing {} (--socket-lb=false runs without it)",
                sock_missing.join(", ")
            ),
            true,
        ),
    });
    out
}

/// Probes this kernel and decides every hook for `want`, logging each choice.
pub fn decide(want: Wanted) -> Report {
    let probes = probe();
    let hooks = plan(&probes, want);
    for h in &hooks {
        if h.fatal {
            tracing::error!(hook = %h.hook, kernel = %probes.kernel, reason = %h.reason, "hook cannot work on this kernel");
        } else {
            tracing::info!(hook = %h.hook, mode = %h.mode, reason = %h.reason, "hook");
        }
    }
    Report { probes, hooks }
}

impl Report {
    /// The hooks that cannot work as configured, in words (empty: `run` can start).
    pub fn fatal(&self) -> Vec<String> {
        self.hooks
            .iter()
            .filter(|h| h.fatal)
            .map(|h| format!("{}: {}", h.hook, h.reason))
            .collect()
    }

    /// Whether tc attaches through the legacy netlink filter.
    pub fn tc_netlink(&self) -> bool {
        self.hooks
            .iter()
            .any(|h| h.hook == "tc" && h.mode == "netlink")
    }

    /// Whether the plan turned XDP off (on a kernel without what it needs, or by flag).
    pub fn xdp_off(&self) -> bool {
        self.hooks
            .iter()
            .any(|h| h.hook == "xdp" && h.mode == "off")
    }
}

/// The probes and the choices, as `status` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub probes: Probes,
    pub hooks: Vec<Hook>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_supported() -> Probes {
        let mut names = Vec::new();
        for (prefix, helpers) in [
            ("tc", TC_HELPERS),
            ("xdp", XDP_HELPERS),
            ("sock_addr", SOCK_HELPERS),
        ] {
            names.push(format!("{prefix}: program type"));
            names.extend(helpers.iter().map(|(h, _)| format!("{prefix}: helper {h}")));
        }
        names.extend(MAPS.iter().map(|(m, _)| format!("map: {m}")));
        Probes {
            kernel: "6.18.0".into(),
            tcx: true,
            xdp_link: true,
            btf: true,
            features: names
                .into_iter()
                .map(|name| Feature {
                    name,
                    supported: true,
                })
                .collect(),
        }
    }

    fn without(mut p: Probes, name: &str) -> Probes {
        for f in &mut p.features {
            if f.name == name {
                f.supported = false;
            }
        }
        p
    }

    /// (hook, mode, fatal)
    type Choice = (String, String, bool);

    fn modes(p: &Probes, want: Wanted) -> Vec<Choice> {
        plan(p, want)
            .into_iter()
            .map(|h| (h.hook, h.mode, h.fatal))
            .collect()
    }

    #[test]
    fn choices_follow_the_kernel() {
        let s = |a: &str, b: &str, f: bool| (a.to_string(), b.to_string(), f);
        let auto = Wanted {
            xdp: XdpSetting::Auto,
            socket_lb: true,
            tc_attach: TcAttach::Auto,
        };
        let native = Wanted {
            xdp: XdpSetting::Native,
            ..auto
        };
        let bare = Wanted {
            xdp: XdpSetting::Off,
            socket_lb: false,
            tc_attach: TcAttach::Auto,
        };
        let tcx_only = Wanted {
            tc_attach: TcAttach::Tcx,
            ..bare
        };
        let netlink = Wanted {
            tc_attach: TcAttach::Netlink,
            ..auto
        };
        // 5.15 / 6.1: no xdp_load_bytes (5.18) and no tcx (6.6).
        let old = Probes {
            tcx: false,
            ..without(all_supported(), "xdp: helper xdp_load_bytes")
        };
        let cases: Vec<(&str, Probes, Wanted, Vec<Choice>)> = vec![
            (
                "everything",
                all_supported(),
                auto,
                vec![
                    s("tc", "tcx", false),
                    s("xdp", "bpf_link", false),
                    s("socket_lb", "cgroup_link", false),
                ],
            ),
            (
                "all off",
                all_supported(),
                bare,
                vec![
                    s("tc", "tcx", false),
                    s("xdp", "off", false),
                    s("socket_lb", "off", false),
                ],
            ),
            (
                "XDP helper missing under auto: XDP off, not fatal",
                without(all_supported(), "xdp: helper xdp_load_bytes"),
                auto,
                vec![
                    s("tc", "tcx", false),
                    s("xdp", "off", false),
                    s("socket_lb", "cgroup_link", false),
                ],
            ),
            (
                "XDP helper missing under native: fatal",
                without(all_supported(), "xdp: helper xdp_load_bytes"),
                native,
                vec![
                    s("tc", "tcx", false),
                    s("xdp", "off", true),
                    s("socket_lb", "cgroup_link", false),
                ],
            ),
            (
                "no XDP links",
                Probes {
                    xdp_link: false,
                    ..all_supported()
                },
                auto,
                vec![
                    s("tc", "tcx", false),
                    s("xdp", "off", false),
                    s("socket_lb", "cgroup_link", false),
                ],
            ),
            (
                "5.15/6.1-like: netlink filter, XDP off",
                old.clone(),
                auto,
                vec![
                    s("tc", "netlink", false),
                    s("xdp", "off", false),
                    s("socket_lb", "cgroup_link", false),
                ],
            ),
            (
                "no tcx but --tc-attach tcx: fatal",
                old,
                tcx_only,
                vec![
                    s("tc", "off", true),
                    s("xdp", "off", false),
                    s("socket_lb", "off", false),
                ],
            ),
            (
                "--tc-attach netlink where tcx exists",
                all_supported(),
                netlink,
                vec![
                    s("tc", "netlink", false),
                    s("xdp", "bpf_link", false),
                    s("socket_lb", "cgroup_link", false),
                ],
            ),
            (
                "a map type missing stops tc",
                without(all_supported(), "map: hash_of_maps"),
                bare,
                vec![
                    s("tc", "off", true),
                    s("xdp", "off", false),
                    s("socket_lb", "off", false),
                ],
            ),
            (
                "socket LB asked for without its helper",
                without(all_supported(), "sock_addr: helper get_netns_cookie"),
                auto,
                vec![
                    s("tc", "tcx", false),
                    s("xdp", "bpf_link", false),
                    s("socket_lb", "off", true),
                ],
            ),
        ];
        for (what, p, want, expect) in cases {
            assert_eq!(modes(&p, want), expect, "{what}");
        }
        let reason = &plan(
            &without(all_supported(), "xdp: helper xdp_load_bytes"),
            auto,
        )[1]
        .reason;
        assert!(reason.contains("xdp: helper xdp_load_bytes"), "{reason}");
    }

    /// This machine's kernel (the test bed's) has everything; a probe that fails here is wrong.
    #[test]
    fn this_kernel_has_everything() {
        let p = probe();
        let missing: Vec<&Feature> = p.features.iter().filter(|f| !f.supported).collect();
        assert!(missing.is_empty(), "{missing:?} on {}", p.kernel);
        assert!(p.tcx && p.xdp_link, "{p:?}");
        // The helper probe tells pairs apart: skb helpers do not exist for XDP.
        assert_eq!(
            is_helper_supported(ProgramType::Xdp, BpfHelper::BPF_FUNC_skb_load_bytes).ok(),
            Some(false)
        );
    }
}

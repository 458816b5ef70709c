//! The kernel floor (issue 18): the programs a 5.15 / 6.1 kernel gets (tc and socket LB; XDP
//! needs 5.18's xdp_load_bytes and is off there) load and pass the verifier with the floor's
//! variant (no bpf_set_retval), and call no helper newer than 5.15, read from the instructions
//! the kernel actually loaded (`bpftool prog dump xlated`), so a new helper call anywhere fails
//! here, not on an operator's node. Also checks that the start-up probes ask the kernel for
//! every helper the loaded programs call. Needs root, bpffs and bpftool (`cargo xtask setup`).
use std::{collections::BTreeSet, path::PathBuf, process::Command};

use proxy_agent::datapath::{
    loader::{self, Enabled, MapSizes, Variant},
    probe,
};

/// Helpers the tc and socket-LB programs may call, with the Linux release that gave them to
/// these program types (linux/include/uapi/linux/bpf.h history; bcc's docs/kernel-versions.md).
const AT_THE_FLOOR: &[(&str, &str)] = &[
    ("bpf_map_lookup_elem", "3.19"),
    ("bpf_map_update_elem", "3.19"),
    ("bpf_map_delete_elem", "3.19"),
    ("bpf_ktime_get_ns", "4.1"),
    ("bpf_get_prandom_u32", "4.1"),
    ("bpf_skb_store_bytes", "4.1"),
    ("bpf_l3_csum_replace", "4.1"),
    ("bpf_l4_csum_replace", "4.1"),
    ("bpf_redirect", "4.4"),
    ("bpf_skb_load_bytes", "4.5"),
    ("bpf_csum_diff", "4.6"),
    ("bpf_skb_change_tail", "4.9"),
    ("bpf_fib_lookup", "4.18"),
    // cgroup sock_addr programs: socket cookies from 5.0, netns cookies from 5.7.
    ("bpf_get_socket_cookie", "5.0"),
    ("bpf_get_netns_cookie", "5.7"),
];

struct Bed {
    ebpf: aya::Ebpf,
    bpffs: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.bpffs);
    }
}

fn load(variant: Variant) -> Bed {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "needs root (run through `cargo xtask test`)"
    );
    let bpffs = PathBuf::from(format!(
        "/sys/fs/bpf/pxfl-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let enabled = Enabled {
        xdp: false,
        socket_lb: true,
    };
    match loader::load_variant(&bpffs, MapSizes::default(), enabled, variant) {
        Ok((ebpf, migration)) => {
            migration.finish().expect("finish");
            Bed { ebpf, bpffs }
        }
        Err(e) => {
            let _ = loader::cleanup(&bpffs);
            panic!("the {variant:?} programs must load: {e:?}")
        }
    }
}

/// The helpers each loaded program calls, by program name, from its translated instructions.
fn helpers(bed: &Bed) -> Vec<(String, BTreeSet<String>)> {
    let mut out = Vec::new();
    for (name, prog) in bed.ebpf.programs() {
        let Ok(info) = prog.info() else {
            continue; // not loaded (XDP, off at the floor)
        };
        let dump = Command::new("bpftool")
            .args(["-j", "prog", "dump", "xlated", "id", &info.id().to_string()])
            .output()
            .expect("bpftool (installed by `cargo xtask setup`)");
        assert!(
            dump.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&dump.stderr)
        );
        let insns: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("bpftool JSON");
        // Instructions, or (with BTF function info) functions holding their instructions.
        let mut disasm = Vec::new();
        collect_disasm(&insns, &mut disasm);
        let calls = disasm
            .iter()
            // "(85) call bpf_ktime_get_ns#125104": the opcode, then the call.
            .filter_map(|d| d.split_once("call ").map(|(_, c)| c))
            .filter(|c| c.starts_with("bpf_"))
            .map(|c| uapi_name(c.split('#').next().unwrap_or(c)))
            .collect();
        out.push((name.to_string(), calls));
    }
    out.sort();
    out
}

/// The helper's uapi name for the kernel function bpftool shows (some program types get their
/// own implementation of a helper).
fn uapi_name(kernel: &str) -> String {
    match kernel {
        "bpf_user_rnd_u32" => "bpf_get_prandom_u32".into(),
        k => k.trim_end_matches("_sock_addr").into(),
    }
}

fn collect_disasm(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_disasm(x, out)),
        serde_json::Value::Object(o) => {
            if let Some(d) = o.get("disasm").and_then(|d| d.as_str()) {
                out.push(d.to_string());
            }
            o.values().for_each(|x| collect_disasm(x, out));
        }
        _ => {}
    }
}

#[test]
fn the_floor_variant_loads_and_calls_no_helper_newer_than_5_15() {
    let bed = load(Variant::FLOOR);
    let found = helpers(&bed);
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"tc_ingress"), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.starts_with("sock_")).count(),
        8,
        "{names:?}"
    );
    assert!(!names.contains(&"xdp_ingress"), "XDP is off at the floor");
    let allowed: BTreeSet<&str> = AT_THE_FLOOR.iter().map(|(h, _)| *h).collect();
    for (prog, calls) in &found {
        assert!(!calls.is_empty(), "{prog}: no helper calls read");
        for c in calls {
            assert!(
                allowed.contains(c.as_str()),
                "{prog} calls {c}, which is not in the helpers of 5.15 this test knows"
            );
        }
    }
    // The start-up probes ask for every helper these programs call (map helpers aside: the
    // map type probes cover them).
    for (prog, calls) in &found {
        let probed = probe::probed_helpers(if prog.starts_with("sock_") {
            "sock"
        } else {
            "tc"
        });
        for c in calls.iter().filter(|c| !c.starts_with("bpf_map_")) {
            let bare = c.trim_start_matches("bpf_");
            assert!(
                probed.contains(&bare),
                "{prog} calls {c}, which the start-up probes do not check: {probed:?}"
            );
        }
    }
}

/// The same object on this kernel: the socket hooks call bpf_set_retval (5.18), which the floor
/// variant cut out. Shows the check above reads what the variant changes.
#[test]
fn the_current_variant_calls_set_retval_where_the_floor_one_does_not() {
    let current = load(Variant { set_retval: true });
    let calls = |bed: &Bed| -> BTreeSet<String> {
        helpers(bed)
            .into_iter()
            .filter(|(n, _)| n == "sock_connect4")
            .flat_map(|(_, c)| c)
            .collect()
    };
    assert!(
        calls(&current).contains("bpf_set_retval"),
        "{:?}",
        calls(&current)
    );
    drop(current);
    let floor = load(Variant::FLOOR);
    assert!(
        !calls(&floor).contains("bpf_set_retval"),
        "{:?}",
        calls(&floor)
    );
}

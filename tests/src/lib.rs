//! End-to-end test bed for proxy-agent: an emulated cluster made of network
//! namespaces (ARCHITECTURE.md section 5), echo backends, clients and helpers to
//! drive the agent through its CLI contract (section 6).
//!
//! Every address lives in 198.18.0.0/15 inside namespaces the bed creates and
//! removes again in `Drop` (also when a test panics).

pub mod agent;
pub mod apiserver;
pub mod bed;
pub mod client;
pub mod cmd;
pub mod inspect;
pub mod manifests;
pub mod netns;

pub use agent::{Agent, agent_bin, find_status_service, status_backends, status_services};
pub use bed::{
    EXT_IP, EXT_IP6, LAN_BRIDGE, Node, Pod, TestBed, node_ip, node_ip6, pod_cidr, pod_cidr6,
    pod_ip6,
};
pub use client::{
    Outcome, Proto, Reply, Tally, parse_reply_line, tcp_request, tcp_requests, udp_request,
    udp_requests,
};
pub use inspect::{cgroup_attachments, netns_attachments};
pub use manifests::{Endpoint, EndpointPort, EndpointSlice, Endpoints, Service, TargetPort};
pub use netns::{in_netns, netns_list, netns_path};

/// Set by a SIGINT/SIGTERM handler installed with [`install_interrupt_handler`];
/// long waits and traffic loops stop early when it is set so that `Drop` can
/// tear the bed down.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once SIGINT or SIGTERM arrived (only after [`install_interrupt_handler`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// For binaries (the demo): turn SIGINT/SIGTERM into a flag that the bed's waits
/// and traffic loops check, so that the bed is still torn down on Ctrl-C.
pub fn install_interrupt_handler() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        sigaction(Signal::SIGINT, &action)?;
        sigaction(Signal::SIGTERM, &action)?;
    }
    Ok(())
}

/// Fails with a clear message when the interrupt flag is set.
pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// Path of a helper binary of this crate (`tb-echo`, `tb-client`): `$TB_ECHO_BIN` /
/// `$TB_CLIENT_BIN` when set, else next to the running executable (cargo puts
/// integration-test executables in `target/<profile>/deps/`, bins one level up).
pub fn helper_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let var = format!("{}_BIN", name.replace('-', "_").to_uppercase());
    if let Some(p) = std::env::var_os(&var) {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(|p| p.to_path_buf());
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(|p| p.to_path_buf());
    }
    anyhow::bail!(
        "helper binary {name} not found next to {} (build it with `cargo build -p tests --bins` or set ${var})",
        exe.display()
    )
}

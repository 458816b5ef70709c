//! Attaching the loaded programs to their hooks (interfaces, the socket-LB cgroup) and keeping
//! them attached as interfaces come and go.
use std::collections::{BTreeMap, HashSet};

use anyhow::Context as _;

use super::{external, loader};
use crate::run::RunConfig;

/// Interfaces attached by this process, by (name, ifindex): a recreated interface gets a new
/// index and is attached again.
#[derive(Default)]
pub struct Interfaces {
    attached: HashSet<(String, u32)>,
    warned_missing: HashSet<String>,
    /// Wanted interfaces present on the node whose tc hook is not attached, with the error:
    /// the datapath does not serve them, so health says so until a retry succeeds.
    failed: BTreeMap<String, String>,
}

impl Interfaces {
    pub fn reconcile(&mut self, cfg: &RunConfig, ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
        let present: Vec<(String, u32)> = match nix::net::if_::if_nameindex() {
            Ok(list) => list
                .iter()
                .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "listing interfaces");
                return Ok(());
            }
        };
        for name in &cfg.interfaces {
            if !present.iter().any(|(n, _)| n == name) && self.warned_missing.insert(name.clone()) {
                tracing::warn!(iface = %name, "interface from --interfaces does not exist (yet)");
            }
        }
        let wanted = |n: &str| {
            cfg.interfaces.iter().any(|i| i == n) || cfg.pod_interfaces.iter().any(|g| g.matches(n))
        };
        for (name, index) in &present {
            let key = (name.clone(), *index);
            if !wanted(name) || self.attached.contains(&key) {
                continue;
            }
            // Reverse-translated replies and SNATed packets carry this node's own address as
            // their source when the kernel forwards them on: allow that on every hooked interface.
            external::forwarding_sysctls(name);
            match loader::attach_tc_mode(
                loader::tc_program(ebpf)?,
                &cfg.bpffs,
                name,
                cfg.tc_attach == loader::TcAttach::Netlink,
            ) {
                Ok(()) => {
                    tracing::info!(iface = %name, ifindex = index, "attached tc ingress");
                    self.failed.remove(name);
                }
                // It may have vanished between listing and attaching, or the kernel refused:
                // retried every poll, logged when the reason changes.
                Err(e) => {
                    let reason = e.to_string();
                    if self.failed.get(name) != Some(&reason) {
                        tracing::warn!(iface = %name, error = %reason, "attach failed");
                        self.failed.insert(name.clone(), reason);
                    }
                    continue;
                }
            }
            // The XDP fast path runs on external interfaces only (pods' traffic is not
            // NodePort traffic); a failure leaves the interface to tc, which handles it all.
            if cfg.interfaces.iter().any(|i| i == name) {
                if cfg.xdp == loader::XdpSetting::Off {
                    loader::detach_xdp(&cfg.bpffs, name);
                } else {
                    match loader::attach_xdp(loader::xdp_program(ebpf)?, &cfg.bpffs, name, cfg.xdp)
                    {
                        Ok(native) => tracing::info!(
                            iface = %name,
                            mode = if native { "native" } else { "generic" },
                            "attached XDP"
                        ),
                        Err(e) => {
                            tracing::warn!(iface = %name, error = %e, "XDP not attached; tc handles this interface alone")
                        }
                    }
                }
            }
            self.attached.insert(key);
        }
        let gone: Vec<(String, u32)> = self
            .attached
            .iter()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect();
        self.failed
            .retain(|name, _| present.iter().any(|(n, _)| n == name));
        for k in gone {
            if !present.iter().any(|(n, _)| *n == k.0) {
                loader::forget_interface(&cfg.bpffs, &k.0);
            }
            tracing::info!(iface = %k.0, "interface gone");
            self.attached.remove(&k);
        }
        Ok(())
    }
}

impl Interfaces {
    /// Hooks the configuration requires that are not attached, one reason each (empty when
    /// every present wanted interface carries the tc program).
    pub fn missing(&self) -> Vec<String> {
        self.failed
            .iter()
            .map(|(iface, e)| format!("tc ingress not attached on {iface}: {e}"))
            .collect()
    }
}

/// The first attach (or in-place program swap) of every hook.
pub fn attach_all(
    cfg: &RunConfig,
    ebpf: &mut aya::Ebpf,
    ifaces: &mut Interfaces,
) -> anyhow::Result<()> {
    match &cfg.socket_lb_cgroup {
        Some(cg) => {
            loader::attach_sock(ebpf, &cfg.bpffs, cg)
                .with_context(|| format!("attaching socket LB to {}", cg.display()))?;
            tracing::info!(cgroup = %cg.display(), "socket LB attached");
        }
        None => loader::detach_sock(&cfg.bpffs),
    }
    ifaces.reconcile(cfg, ebpf)?;
    Ok(())
}

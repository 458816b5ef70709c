//! `proxy-agent run`: load and attach the datapath, then keep the maps in step with the sources.
use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::SchedClassifier;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    datapath::{loader, maps::Maps, writer::Writer},
    model::{DesiredState, Options, translate},
    source::manifests::{Loaded, ManifestSource},
};

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub manifests: Vec<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub service_proxy_name: Option<String>,
    /// External interfaces, by exact name.
    pub interfaces: Vec<String>,
    /// Pod-facing interfaces, by glob; new matching interfaces are attached as they appear.
    pub pod_interfaces: Vec<glob::Pattern>,
    pub bpffs: PathBuf,
    /// How often sources and interfaces are polled.
    pub poll_interval: Duration,
    /// How often the maps are re-read and repaired against the desired state.
    pub resync_period: Duration,
}

/// Interfaces attached by this process, by (name, ifindex): a recreated interface gets a new
/// index and is attached again.
struct Interfaces {
    attached: HashSet<(String, u32)>,
    warned_missing: HashSet<String>,
}

impl Interfaces {
    fn reconcile(&mut self, cfg: &RunConfig, prog: &mut SchedClassifier) {
        let present: Vec<(String, u32)> = match nix::net::if_::if_nameindex() {
            Ok(list) => list
                .iter()
                .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "listing interfaces");
                return;
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
            match loader::attach_tc(prog, &cfg.bpffs, name) {
                Ok(()) => {
                    tracing::info!(iface = %name, ifindex = index, "attached tc ingress");
                    self.attached.insert(key);
                }
                // It may have vanished between listing and attaching; retried next poll.
                Err(e) => tracing::warn!(iface = %name, error = %e, "attach failed"),
            }
        }
        let gone: Vec<(String, u32)> = self
            .attached
            .iter()
            .filter(|k| !present.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if !present.iter().any(|(n, _)| *n == k.0) {
                loader::forget_interface(&cfg.bpffs, &k.0);
            }
            tracing::info!(iface = %k.0, "interface gone");
            self.attached.remove(&k);
        }
    }
}

fn translate_loaded(loaded: &Loaded, opts: &Options) -> DesiredState {
    for e in &loaded.errors {
        tracing::error!(error = %e, "manifest rejected");
    }
    let t = translate(&loaded.inputs, opts);
    for e in &t.errors {
        tracing::error!(object = %e.object, field = %e.field, error = %e.message, "object rejected");
    }
    for s in &t.skipped {
        tracing::debug!(service = %s, "service not handled by this proxy");
    }
    t.state
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    if cfg.manifests.is_empty() {
        bail!(
            "no source: the Kubernetes API source is not built yet, pass --manifests PATH \
             (kubeconfig {:?} ignored)",
            cfg.kubeconfig
        );
    }
    tracing::info!(node = %cfg.node_name, bpffs = %cfg.bpffs.display(), "starting");
    let mut ebpf = loader::load(&cfg.bpffs).context("loading the datapath")?;
    let mut writer = Writer::adopt(Maps::open(&cfg.bpffs)?)?;
    tracing::info!(
        services = writer.programmed().services.len(),
        backends = writer.programmed().backends.len(),
        "adopted pinned maps"
    );
    let opts = Options {
        node_name: cfg.node_name.clone(),
        service_proxy_name: cfg.service_proxy_name.clone(),
    };
    let mut source = ManifestSource::new(cfg.manifests.clone());
    let mut ifaces = Interfaces {
        attached: HashSet::new(),
        warned_missing: HashSet::new(),
    };
    let mut desired = DesiredState::default();
    let mut generation = 0u64;
    let mut last_resync = Instant::now();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    loop {
        ifaces.reconcile(&cfg, loader::tc_program(&mut ebpf)?);

        let resync = last_resync.elapsed() >= cfg.resync_period;
        let changed = source.poll(false);
        if changed.is_some() || resync || generation == 0 {
            if let Some(loaded) = changed {
                desired = translate_loaded(&loaded, &opts);
            }
            if resync {
                // Full reconciliation: trust the maps, not our memory of them.
                writer.reread()?;
                last_resync = Instant::now();
            }
            let started = Instant::now();
            let report = writer.sync(&desired);
            for (fe, e) in &report.failed {
                tracing::error!(frontend = %fe, error = %e, "service not programmed");
            }
            generation += 1;
            tracing::info!(
                generation,
                services = report.services,
                backends = report.backends,
                writes = report.writes,
                deletes = report.deletes,
                failed = report.failed.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "sync complete"
            );
        }

        tokio::select! {
            _ = tokio::time::sleep(cfg.poll_interval) => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Programs stay attached and maps pinned: established flows keep working while no agent
    // runs, and the next agent adopts them. `proxy-agent cleanup` removes everything.
    tracing::info!("stopping; datapath left in place");
    Ok(())
}

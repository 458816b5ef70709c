//! `proxy-agent run`: load and attach the datapath, then keep the maps in step with the sources.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    datapath::{
        attach::{Interfaces, attach_all},
        external, gc, loader,
        maps::Maps,
        probe, sockets,
        writer::Writer,
    },
    model::{DesiredState, Inputs, LbAlgorithm, Options, translate},
    report,
    serve::{Health, HealthCheckState, serve, serve_health_check},
    source::{
        kube::{self, KubeSource},
        manifests::ManifestSource,
    },
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
    /// How long to wait after an API change for more changes before syncing.
    pub debounce: Duration,
    pub map_sizes: loader::MapSizes,
    /// Size (a prime) of the Maglev tables.
    pub maglev_table_size: u32,
    /// Backend choice for NodePort, load-balancer and externalIP frontends of Services without
    /// the algorithm annotation.
    pub external_lb_algorithm: LbAlgorithm,
    /// `--nodeport-addresses`: which external addresses serve NodePorts (empty: all).
    pub nodeport_cidrs: Vec<external::Cidr>,
    /// How often idle conntrack entries are removed (zero: never; the LRU alone).
    pub conntrack_gc_interval: Duration,
    pub conntrack_timeouts: gc::Timeouts,
    /// `--xdp`: the XDP fast path on the external interfaces.
    pub xdp: loader::XdpSetting,
    /// `--tc-attach`: tcx or the legacy netlink filter (auto: resolved by the probes at start).
    pub tc_attach: loader::TcAttach,
    /// cgroup v2 directory for socket LB; `None` leaves socket LB off.
    pub socket_lb_cgroup: Option<PathBuf>,
    pub metrics_bind_address: Option<std::net::SocketAddr>,
    pub healthz_bind_address: Option<std::net::SocketAddr>,
    /// A change not programmed within this long makes /healthz fail.
    pub healthz_timeout: Duration,
    /// A healthz or metrics address that cannot be bound stops the agent.
    pub bind_address_hard_fail: bool,
}

impl RunConfig {
    /// The optional programs this configuration uses; the others are not loaded.
    pub fn enabled(&self) -> loader::Enabled {
        loader::Enabled {
            xdp: self.xdp != loader::XdpSetting::Off,
            socket_lb: self.socket_lb_cgroup.is_some(),
        }
    }
}

enum Source {
    Manifests(ManifestSource),
    Kube(KubeSource),
}

impl Source {
    /// New inputs when something changed (and, for the API, once every store is listed), with
    /// what the source could not read.
    fn poll(&mut self) -> Option<(Inputs, Vec<report::SourceError>)> {
        match self {
            Self::Manifests(m) => m.poll(false).map(|loaded| {
                for e in &loaded.errors {
                    tracing::error!(file = %e.file, object = %e.object, field = %e.field, error = %e.message, "manifest rejected");
                }
                (loaded.inputs, loaded.errors)
            }),
            Self::Kube(k) => k.poll().map(|i| (i, Vec::new())),
        }
    }

    /// Resolves when the source has news to look at; manifests are only polled.
    async fn changed(&self) {
        match self {
            Self::Manifests(_) => std::future::pending().await,
            Self::Kube(k) => k.changed.notified().await,
        }
    }
}

/// Removes idle conntrack entries every `interval`, on a thread of its own (a pass over a full
/// map takes a second or so, and must not hold up syncs); it ends with the process.
fn spawn_conntrack_gc(
    bpffs: &std::path::Path,
    interval: Duration,
    timeouts: gc::Timeouts,
) -> anyhow::Result<()> {
    let pin = crate::datapath::maps::pin_path(bpffs, proxy_common::names::CONNTRACK);
    let data =
        aya::maps::MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let mut ct: aya::maps::HashMap<_, proxy_common::CtKey, proxy_common::CtValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).context("conntrack map")?;
    std::thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            let mut streams = gc::Streams::default();
            loop {
                std::thread::sleep(interval);
                match gc::collect(&mut ct, gc::monotonic_ns(), &timeouts, &mut streams) {
                    Ok(p) if p.removed > 0 => tracing::debug!(
                        scanned = p.scanned,
                        removed = p.removed,
                        "conntrack entries expired"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "conntrack collection"),
                }
            }
        })
        .context("starting the conntrack collector")?;
    Ok(())
}

/// healthCheckNodePort servers, one task per port.
#[derive(Default)]
struct HealthChecks {
    servers: std::collections::BTreeMap<u16, (HealthCheckState, tokio::task::JoinHandle<()>)>,
}

impl HealthChecks {
    fn update(&mut self, wanted: &std::collections::BTreeMap<u16, crate::model::HealthCheck>) {
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, hc) in wanted {
            if let Some((state, _)) = self.servers.get(port) {
                *state.lock().unwrap() = hc.clone();
                continue;
            }
            let state: HealthCheckState = std::sync::Arc::new(std::sync::Mutex::new(hc.clone()));
            let addr = std::net::SocketAddr::from(([0, 0, 0, 0], *port));
            let st = state.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = serve_health_check(addr, st).await {
                    tracing::error!(%addr, error = %e, "healthCheckNodePort server failed");
                }
            });
            tracing::info!(port, service = %format!("{}/{}", hc.namespace, hc.name), "serving healthCheckNodePort");
            self.servers.insert(*port, (state, task));
        }
    }
}

/// External interfaces as the datapath needs them: NodePort addresses and SNAT sources.
#[derive(Default, PartialEq)]
struct ExternalView {
    node_addresses: Vec<std::net::IpAddr>,
    /// ifindex -> the addresses used for SNAT.
    snat: std::collections::BTreeMap<u32, proxy_common::IfaceConfig>,
}

fn external_view(cfg: &RunConfig) -> ExternalView {
    let by_iface = external::addresses(&cfg.interfaces);
    let mut snat = std::collections::BTreeMap::new();
    if let Ok(list) = nix::net::if_::if_nameindex() {
        for i in list.iter() {
            let name = i.name().to_string_lossy();
            let Some(addrs) = by_iface.get(name.as_ref()) else {
                continue;
            };
            let mut c = proxy_common::IfaceConfig::default();
            for ip in addrs {
                match ip {
                    std::net::IpAddr::V4(v4) if c.addr4 == 0 => {
                        c.addr4 = u32::from_ne_bytes(v4.octets())
                    }
                    std::net::IpAddr::V6(_) if c.addr6 == [0; 4] => {
                        c.addr6 = crate::datapath::addr::to_words(*ip)
                    }
                    _ => {}
                }
            }
            snat.insert(i.index(), c);
        }
    }
    // Hairpin traffic is SNATed to the node's first external addresses (index 0).
    if let Some(first) = snat.values().next().copied() {
        snat.insert(0, first);
    }
    ExternalView {
        node_addresses: external::node_addresses(&by_iface, &cfg.nodeport_cidrs),
        snat,
    }
}

fn translate_inputs(
    inputs: &Inputs,
    opts: &Options,
    health_checks: &mut HealthChecks,
) -> (DesiredState, Vec<report::Rejected>) {
    let t = translate(inputs, opts);
    health_checks.update(&t.health_checks);
    for e in &t.errors {
        tracing::error!(object = %e.object, field = %e.field, error = %e.message, "object rejected");
    }
    for s in &t.skipped {
        tracing::debug!(service = %s, "service not handled by this proxy");
    }
    let rejected = t
        .errors
        .into_iter()
        .map(|e| report::Rejected {
            object: e.object,
            field: e.field,
            message: e.message,
        })
        .collect();
    (t.state, rejected)
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    tracing::info!(node = %cfg.node_name, bpffs = %cfg.bpffs.display(), "starting");
    let health = Health::new(cfg.bpffs.clone(), cfg.healthz_timeout);
    for (addr, metrics) in [
        (cfg.metrics_bind_address, true),
        (cfg.healthz_bind_address, false),
    ] {
        if let Some(addr) = addr {
            if cfg.bind_address_hard_fail {
                // Checked before the datapath is touched; the server binds again just after.
                std::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding {addr} (bind-address-hard-fail)"))?;
            }
            let h = health.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(addr, h, metrics).await {
                    tracing::error!(%addr, error = %e, "HTTP endpoint failed");
                }
            });
        }
    }
    let kernel = probe::decide(probe::Wanted {
        xdp: cfg.xdp,
        socket_lb: cfg.socket_lb_cgroup.is_some(),
        tc_attach: cfg.tc_attach,
    });
    let fatal = kernel.fatal();
    if !fatal.is_empty() {
        bail!(
            "this kernel ({}) cannot run the datapath as configured: {}",
            kernel.probes.kernel,
            fatal.join("; ")
        );
    }
    // A program the kernel cannot run is not loaded, and its hook stays off.
    let cfg = RunConfig {
        xdp: if kernel.xdp_off() {
            loader::XdpSetting::Off
        } else {
            cfg.xdp
        },
        tc_attach: if kernel.tc_netlink() {
            loader::TcAttach::Netlink
        } else {
            loader::TcAttach::Tcx
        },
        ..cfg
    };
    let (mut ebpf, migration) = loader::load_enabled(&cfg.bpffs, cfg.map_sizes, cfg.enabled())
        .context("loading the datapath")?;
    // Programs are attached (or swapped into the pinned links) only after the first sync, so the
    // new programs never run on maps the source has not filled yet; until then whatever an
    // earlier agent attached keeps serving.
    let mut migration = Some(migration);
    let mut writer = Writer::adopt(Maps::open(&cfg.bpffs)?)?;
    if !cfg.conntrack_gc_interval.is_zero() {
        spawn_conntrack_gc(
            &cfg.bpffs,
            cfg.conntrack_gc_interval,
            cfg.conntrack_timeouts,
        )?;
    }
    writer
        .set_maglev_table_size(cfg.maglev_table_size)
        .context("--maglev-table-size")?;
    tracing::info!(
        services = writer.programmed().services.len(),
        backends = writer.programmed().backends.len(),
        "adopted pinned maps"
    );
    let mut opts = Options {
        node_name: cfg.node_name.clone(),
        service_proxy_name: cfg.service_proxy_name.clone(),
        node_addresses: Vec::new(),
        external_lb_algorithm: cfg.external_lb_algorithm,
    };
    let mut view = ExternalView::default();
    let mut health_checks = HealthChecks::default();
    let mut last_inputs: Option<Inputs> = None;
    // Events on rejected and unprogrammed Services: with the kube source only.
    let mut events: Option<crate::events::Publisher> = None;
    let mut source = if cfg.manifests.is_empty() {
        let client = kube::client(cfg.kubeconfig.as_deref()).await?;
        tracing::info!("watching the Kubernetes API");
        events = Some(crate::events::Publisher::new(
            client.clone(),
            &cfg.node_name,
        ));
        Source::Kube(KubeSource::start(client, &cfg.node_name))
    } else {
        if cfg.kubeconfig.is_some() {
            bail!("--manifests and --kubeconfig are exclusive: pick one source");
        }
        Source::Manifests(ManifestSource::new(cfg.manifests.clone()))
    };
    let mut ifaces = Interfaces::default();
    // None until the source has delivered a complete picture once: never sync from nothing.
    let mut desired: Option<DesiredState> = None;
    let mut rejected: Vec<report::Rejected> = Vec::new();
    let mut source_errors: Vec<report::SourceError> = Vec::new();
    let source_name = match source {
        Source::Manifests(_) => "manifests",
        Source::Kube(_) => "kube",
    };
    let mut generation = 0u64;
    let mut last_report: Option<report::SyncReport> = None;
    let mut last_resync = Instant::now();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    loop {
        if generation > 0 {
            ifaces.reconcile(&cfg, &mut ebpf)?;
            // A hook that failed (or came back) between syncs shows in health and status now.
            let missing = ifaces.missing();
            if let Some(r) = last_report.as_mut().filter(|r| r.missing_hooks != missing) {
                health.set_missing_hooks(missing.clone());
                r.missing_hooks = missing;
                report::write(&cfg.bpffs, r);
            }
        }

        // Node addresses decide NodePort frontends; a change re-translates the last inputs.
        let now_view = external_view(&cfg);
        let mut changed = source.poll().map(|(inputs, errors)| {
            health.set_source_errors(&errors);
            source_errors = errors;
            inputs
        });
        if now_view != view {
            tracing::info!(addresses = ?now_view.node_addresses, "external addresses");
            if let Err(e) = external::program_interfaces(writer.maps_mut(), &now_view.snat) {
                tracing::error!(error = %e, "programming external interfaces");
            }
            opts.node_addresses = now_view.node_addresses.clone();
            view = now_view;
            if changed.is_none() {
                changed = last_inputs.clone();
            }
        }
        if let Some(inputs) = &changed {
            health.queued();
            let (state, errs) = translate_inputs(inputs, &opts, &mut health_checks);
            desired = Some(state);
            rejected = errs;
            last_inputs = changed.clone();
        }
        let resync = last_resync.elapsed() >= cfg.resync_period;
        if let Some(want) = desired.as_ref()
            && (changed.is_some() || resync)
        {
            if resync {
                // Full reconciliation: trust the maps, not our memory of them.
                writer.reread()?;
                last_resync = Instant::now();
            }
            let started = Instant::now();
            let report = writer.sync(want);
            for (svc, e) in &report.failed {
                tracing::error!(service = %svc, error = %e, "service not programmed");
            }
            if let Some(cg) = &cfg.socket_lb_cgroup
                && !report.stale_udp.is_empty()
            {
                let stale = &report.stale_udp;
                let frontends = sockets::SocketFrontends::open(&cfg.bpffs)
                    .inspect_err(|e| tracing::warn!(error = %e, "opening socket LB's records"))
                    .ok();
                match sockets::destroy_udp_to(cg, stale, frontends.as_ref()) {
                    Ok(n) => tracing::info!(
                        sockets = n,
                        backends = stale.backends.len(),
                        frontend_backends = stale.pairs.len(),
                        "ended connected UDP sockets to removed backends"
                    ),
                    Err(e) => tracing::warn!(error = %e, "ending UDP sockets to removed backends"),
                }
            }
            if generation == 0 {
                attach_all(&cfg, &mut ebpf, &mut ifaces)?;
                if let Some(m) = migration.take() {
                    m.finish().context("releasing replaced maps")?;
                }
            }
            generation += 1;
            health.set_missing_hooks(ifaces.missing());
            health.updated(started.elapsed(), report.failed.len(), rejected.len());
            let written = last_report.insert(report::SyncReport {
                pid: std::process::id(),
                generation,
                unix_time: report::now(),
                source: source_name.into(),
                rejected: rejected.clone(),
                not_programmed: report
                    .failed
                    .iter()
                    .map(|(service, reason)| report::NotProgrammed {
                        service: service.clone(),
                        reason: reason.clone(),
                    })
                    .collect(),
                missing_hooks: ifaces.missing(),
                kernel: Some(kernel.clone()),
                source_errors: source_errors.clone(),
                fallbacks: report
                    .fallbacks
                    .iter()
                    .map(|(service, reason)| report::NotProgrammed {
                        service: service.clone(),
                        reason: reason.clone(),
                    })
                    .collect(),
            });
            report::write(&cfg.bpffs, written);
            if let (Some(p), Some(inputs)) = (events.as_mut(), last_inputs.as_ref()) {
                p.publish(crate::events::wanted(
                    &written.rejected,
                    &written.not_programmed,
                    inputs,
                ));
            }
            tracing::info!(
                generation,
                services = report.services,
                backends = report.backends,
                writes = report.writes,
                deletes = report.deletes,
                maglev_tables_built = report.tables_built,
                failed = report.failed.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "sync complete"
            );
        }

        tokio::select! {
            _ = tokio::time::sleep(cfg.poll_interval) => {}
            // Let a burst of API changes settle into one sync.
            _ = source.changed() => {
                health.queued();
                tokio::time::sleep(cfg.debounce).await;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Programs stay attached and maps pinned: established flows keep working while no agent
    // runs, and the next agent adopts them. `proxy-agent cleanup` removes everything.
    tracing::info!("stopping; datapath left in place");
    Ok(())
}

//! The proxy-agent command line.
use std::{io::IsTerminal as _, path::PathBuf, time::Duration};

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use proxy_agent::{check, cleanup, run, status};

#[derive(Parser)]
#[command(name = "proxy-agent", version, about = "eBPF Kubernetes Service proxy")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log level filter (tracing syntax, e.g. info or proxy_agent=debug).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Backend selection algorithms.
#[derive(Clone, Copy, ValueEnum)]
enum LbAlgorithm {
    /// Any backend, evenly (kube-proxy's behaviour).
    Random,
    /// Maglev consistent hashing of the flow's tuple.
    Maglev,
}

impl From<LbAlgorithm> for proxy_agent::model::LbAlgorithm {
    fn from(a: LbAlgorithm) -> Self {
        match a {
            LbAlgorithm::Random => Self::Random,
            LbAlgorithm::Maglev => Self::Maglev,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// kube-proxy's configuration file (KubeProxyConfiguration, kubeproxy.config.k8s.io/v1alpha1,
    /// e.g. the kube-proxy ConfigMap's config.conf): the fields that mean something here set the
    /// matching flags; flags given on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kubernetes manifest files or directories (Service, EndpointSlice, Endpoints).
    #[arg(long)]
    manifests: Vec<PathBuf>,
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// Handle only Services labelled service.kubernetes.io/service-proxy-name=NAME.
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// External (node) interfaces.
    #[arg(long, value_delimiter = ',')]
    interfaces: Vec<String>,
    /// Pod-facing interfaces, as globs (e.g. 'veth*,lxc*').
    #[arg(long, value_delimiter = ',')]
    pod_interfaces: Vec<String>,
    /// Which addresses of the --interfaces serve NodePorts, as CIDRs (default: all of them).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// cgroup v2 directory whose processes get socket LB (default: the cgroup v2 root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Translate ClusterIPs at connect/sendmsg (socket LB); false leaves it to the tc path.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_lb: bool,
    /// XDP fast path for NodePort/LoadBalancer/externalIP traffic on the --interfaces: auto
    /// (native mode where the driver has it, generic otherwise), native, generic or off.
    #[arg(long, value_enum, default_value = "auto")]
    xdp: proxy_agent::datapath::loader::XdpSetting,
    /// How the tc program attaches: tcx (Linux 6.6), netlink (a direct-action filter on the
    /// clsact qdisc, for older kernels; coexists with other filters) or auto (tcx if present).
    #[arg(long, value_enum, default_value = "auto")]
    tc_attach: proxy_agent::datapath::loader::TcAttach,
    /// Seconds between passes of the conntrack collector, which removes idle entries (TCP
    /// after FIN/RST: 120 s, other TCP: 24 h, UDP: 30 s, UDP streams: 120 s) and frees their
    /// SNAT ports; 0: never.
    #[arg(long, default_value_t = 30)]
    conntrack_gc_interval_s: u64,
    /// Idle seconds before an established TCP flow's conntrack entries go (kube-proxy's
    /// conntrack.tcpEstablishedTimeout).
    #[arg(long, default_value_t = 24 * 3600)]
    conntrack_tcp_timeout_established_s: u64,
    /// Idle seconds before the entries of a TCP flow that sent FIN or RST go (at least the
    /// backends' TIME_WAIT, or a reused SNAT port meets the old connection).
    #[arg(long, default_value_t = 120)]
    conntrack_tcp_timeout_closing_s: u64,
    /// Idle seconds before a UDP (or other) flow's entries go (kube-proxy's udpTimeout).
    #[arg(long, default_value_t = 30)]
    conntrack_udp_timeout_s: u64,
    /// Idle seconds before the entries of a UDP stream (traffic after its first second) go
    /// (kube-proxy's udpStreamTimeout).
    #[arg(long, default_value_t = 120)]
    conntrack_udp_stream_timeout_s: u64,
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// /healthz fails when a change waits longer than this to be programmed, in seconds.
    #[arg(long, default_value_t = 60)]
    healthz_timeout_s: u64,
    /// How often manifests and interfaces are checked, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// Capacity of the services map (frontends), used when the maps are first created.
    #[arg(long, default_value_t = proxy_common::limits::SERVICES)]
    map_size_services: u32,
    /// Capacity of the backends and backend-slot maps.
    #[arg(long, default_value_t = proxy_common::limits::BACKENDS)]
    map_size_backends: u32,
    /// Capacity of the conntrack map (two entries per flow).
    #[arg(long, default_value_t = proxy_common::limits::CONNTRACK)]
    map_size_conntrack: u32,
    /// Size of the Maglev lookup tables, a prime between 2 and 131071. Each table takes 4 bytes
    /// per slot; keep it above 100 times the backends of the largest Maglev Service.
    #[arg(long, default_value_t = proxy_agent::model::maglev::DEFAULT_TABLE_SIZE)]
    maglev_table_size: u32,
    /// Backend selection for NodePort, load-balancer and externalIP frontends (traffic from
    /// outside the cluster) of Services without the proxy-agent.io/lb-algorithm annotation.
    /// Maglev by default: every node, and this node after a restart, chooses the same backend
    /// for the same flow, and a backend change moves few flows. Cluster IPs always default to
    /// random.
    #[arg(long, value_enum, default_value = "maglev")]
    external_lb_algorithm: LbAlgorithm,
    /// How long to let API changes settle before a sync, in milliseconds.
    #[arg(long, default_value_t = 100)]
    sync_debounce_ms: u64,
    /// How often the maps are re-read and repaired, in seconds.
    #[arg(long, default_value_t = 60)]
    resync_period_s: u64,
    /// Failing to serve healthz or metrics on their addresses stops the agent (kube-proxy's
    /// bindAddressHardFail); otherwise it is logged and the agent goes on.
    #[arg(long, default_value_t = false)]
    bind_address_hard_fail: bool,
}

const DEFAULT_BPFFS: &str = "/sys/fs/bpf/proxy-agent";

#[derive(Subcommand)]
enum Cmd {
    /// Program the datapath and keep it in step with the cluster.
    Run(Box<RunArgs>),
    /// Show what is programmed: services, map usage, counters, attachments.
    Status {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Pre-flight: what this kernel and node support for these `run` flags (changes nothing);
    /// exits 1 when `run` would not work.
    Check {
        #[command(flatten)]
        run: Box<RunArgs>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// For one 5-tuple: the frontend it hits, the hook that handles it, its conntrack entry, or
    /// the backend a new flow would get and why (read from the pinned maps, chosen by the
    /// datapath's own code).
    Explain {
        #[arg(long)]
        src: std::net::SocketAddr,
        #[arg(long)]
        dst: std::net::SocketAddr,
        #[arg(long, value_enum)]
        proto: proxy_agent::explain::Proto,
        #[arg(long, value_enum, default_value = "pod")]
        from: proxy_agent::explain::Origin,
        /// The hook to explain for (auto: the one that sees the packet first).
        #[arg(long, value_enum, default_value = "auto")]
        path: proxy_agent::explain::PathChoice,
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// The flows this node translates (conntrack and socket-LB entries), most recent first.
    Flows {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Only the flows of this Service: `namespace/name` or `namespace/name:port`.
        #[arg(long)]
        service: Option<String>,
        /// Only the flows to this backend address.
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// Show at most this many flows (0: all).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Detach every program and remove every pin the agent made.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
}

/// The cgroup v2 mount point, from /proc/mounts.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dir, fs) = (f.nth(1)?, f.next()?);
            (fs == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or_else(|| {
            anyhow::anyhow!("no cgroup v2 mount: pass --cgroup DIR or --socket-lb=false")
        })
}

/// An address to serve on; empty (or port 0, as in kube-proxy) turns the endpoint off.
fn bind_address(flag: &str, v: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if v.is_empty() {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = v
        .parse()
        .map_err(|e| anyhow::anyhow!("{flag} {v:?}: {e}"))?;
    Ok((addr.port() != 0).then_some(addr))
}

fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)?;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Plain text when logs go to a file or a collector, so they stay greppable.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
    Ok(())
}

/// Applies a KubeProxyConfiguration's settings to the flags that were not given on the command
/// line (flags win, as with kube-proxy's own flags and --config).
fn apply_config(
    args: &mut RunArgs,
    m: &ArgMatches,
    s: proxy_agent::kpconfig::Settings,
) -> anyhow::Result<()> {
    let unset = |id: &str| m.value_source(id) != Some(clap::parser::ValueSource::CommandLine);
    let secs = |d: Duration| d.as_secs().max(1);
    if let Some(v) = s.node_name
        && unset("node_name")
    {
        args.node_name = v;
    }
    if let Some(v) = s.kubeconfig
        && unset("kubeconfig")
    {
        args.kubeconfig = Some(v);
    }
    if let Some(v) = s.healthz_bind_address
        && unset("healthz_bind_address")
    {
        args.healthz_bind_address = v;
    }
    if let Some(v) = s.metrics_bind_address
        && unset("metrics_bind_address")
    {
        args.metrics_bind_address = v;
    }
    if let Some(v) = s.nodeport_addresses
        && unset("nodeport_addresses")
    {
        args.nodeport_addresses = v;
    }
    if let Some(v) = s.pod_interfaces
        && unset("pod_interfaces")
    {
        args.pod_interfaces = v;
    }
    if let Some(v) = s.sync_period
        && unset("resync_period_s")
    {
        args.resync_period_s = secs(v);
    }
    if let Some(v) = s.min_sync_period
        && unset("sync_debounce_ms")
    {
        // The least time between two syncs: changes wait that long to be written together.
        args.sync_debounce_ms = v.as_millis().min(u64::MAX as u128) as u64;
    }
    if let Some(v) = s.tcp_established_timeout
        && unset("conntrack_tcp_timeout_established_s")
    {
        args.conntrack_tcp_timeout_established_s = secs(v);
    }
    if let Some(v) = s.tcp_close_wait_timeout
        && unset("conntrack_tcp_timeout_closing_s")
    {
        args.conntrack_tcp_timeout_closing_s = secs(v);
    }
    if let Some(v) = s.udp_timeout
        && unset("conntrack_udp_timeout_s")
    {
        args.conntrack_udp_timeout_s = secs(v);
    }
    if let Some(v) = s.udp_stream_timeout
        && unset("conntrack_udp_stream_timeout_s")
    {
        args.conntrack_udp_stream_timeout_s = secs(v);
    }
    if let Some(flows) = s.conntrack_max_flows
        && unset("map_size_conntrack")
    {
        // Two entries per flow (forward and reply).
        args.map_size_conntrack = flows.saturating_mul(2);
    }
    if let Some(v) = s.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", v.to_string())
            .map_err(|e| anyhow::anyhow!("oomScoreAdj {v}: /proc/self/oom_score_adj: {e}"))?;
    }
    args.bind_address_hard_fail |= s.bind_address_hard_fail;
    for (field, why) in &s.no_effect {
        tracing::warn!(field = %field, reason = %why, "kube-proxy setting accepted but has no effect here");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    init_logging(cli.log_format, &cli.log_level)?;
    match cli.cmd {
        Cmd::Run(mut args) => {
            if let Some(path) = args.config.clone() {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
                // Read and checked before anything is loaded: a bad file changes nothing.
                let settings = proxy_agent::kpconfig::load(&path, cpus)?;
                let run_matches = matches
                    .subcommand_matches("run")
                    .expect("the run subcommand matched");
                apply_config(&mut args, run_matches, settings)?;
                tracing::info!(config = %path.display(), "read kube-proxy configuration");
            }
            let RunArgs {
                config: _,
                bind_address_hard_fail,
                manifests,
                kubeconfig,
                node_name,
                service_proxy_name,
                interfaces,
                pod_interfaces,
                nodeport_addresses,
                cgroup,
                socket_lb,
                xdp,
                tc_attach,
                conntrack_gc_interval_s,
                conntrack_tcp_timeout_established_s,
                conntrack_tcp_timeout_closing_s,
                conntrack_udp_timeout_s,
                conntrack_udp_stream_timeout_s,
                bpffs,
                metrics_bind_address,
                healthz_bind_address,
                poll_interval_ms,
                resync_period_s,
                sync_debounce_ms,
                map_size_services,
                map_size_backends,
                map_size_conntrack,
                maglev_table_size,
                external_lb_algorithm,
                healthz_timeout_s,
            } = *args;
            // Checked before anything is loaded, so a bad size changes nothing.
            proxy_agent::model::maglev::validate_table_size(maglev_table_size)
                .map_err(|e| anyhow::anyhow!("--maglev-table-size: {e}"))?;
            let pod_interfaces = pod_interfaces
                .iter()
                .map(|g| {
                    glob::Pattern::new(g)
                        .map_err(|e| anyhow::anyhow!("--pod-interfaces {g:?}: {e}"))
                })
                .collect::<anyhow::Result<_>>()?;
            let cfg = run::RunConfig {
                manifests,
                kubeconfig,
                node_name,
                service_proxy_name,
                interfaces,
                pod_interfaces,
                bpffs,
                poll_interval: Duration::from_millis(poll_interval_ms.max(10)),
                resync_period: Duration::from_secs(resync_period_s.max(1)),
                debounce: Duration::from_millis(sync_debounce_ms),
                metrics_bind_address: bind_address(
                    "--metrics-bind-address",
                    &metrics_bind_address,
                )?,
                healthz_bind_address: bind_address(
                    "--healthz-bind-address",
                    &healthz_bind_address,
                )?,
                healthz_timeout: Duration::from_secs(healthz_timeout_s.max(1)),
                bind_address_hard_fail,
                xdp,
                tc_attach,
                conntrack_gc_interval: Duration::from_secs(conntrack_gc_interval_s),
                conntrack_timeouts: proxy_agent::datapath::gc::Timeouts {
                    tcp_established: Duration::from_secs(conntrack_tcp_timeout_established_s),
                    tcp_closing: Duration::from_secs(conntrack_tcp_timeout_closing_s),
                    other: Duration::from_secs(conntrack_udp_timeout_s),
                    udp_stream: Duration::from_secs(conntrack_udp_stream_timeout_s),
                },
                socket_lb_cgroup: if socket_lb {
                    Some(match cgroup {
                        Some(c) => c,
                        None => cgroup2_root()?,
                    })
                } else {
                    None
                },
                nodeport_cidrs: nodeport_addresses
                    .iter()
                    .map(|c| {
                        c.parse()
                            .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                map_sizes: proxy_agent::datapath::loader::MapSizes {
                    services: map_size_services.max(1),
                    backends: map_size_backends.max(1),
                    conntrack: map_size_conntrack.max(2),
                },
                maglev_table_size,
                external_lb_algorithm: external_lb_algorithm.into(),
            };
            // Two workers: the HTTP endpoints answer while the sync loop does blocking map work.
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run::run(cfg))
        }
        Cmd::Status { bpffs, output } => {
            let s = status::collect(&bpffs)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Output::Table => status::print_table(&s),
            }
            // A node that looks synced but does not carry every required hook is not working.
            if let Some(r) = s.sync.as_ref().filter(|r| !r.missing_hooks.is_empty()) {
                eprintln!(
                    "error: required hooks not attached: {}",
                    r.missing_hooks.join("; ")
                );
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Check { run, output } => {
            let c = check::check(&check::CheckConfig {
                interfaces: run.interfaces.clone(),
                xdp: run.xdp,
                tc_attach: run.tc_attach,
                socket_lb_cgroup: if run.socket_lb {
                    Some(match &run.cgroup {
                        Some(c) => c.clone(),
                        None => cgroup2_root()?,
                    })
                } else {
                    None
                },
                bpffs: run.bpffs.clone(),
            });
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&c)?),
                Output::Table => check::print_table(&c),
            }
            if !c.errors.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Explain {
            src,
            dst,
            proto,
            from,
            path,
            bpffs,
            output,
        } => {
            anyhow::ensure!(
                src.is_ipv4() == dst.is_ipv4(),
                "--src {src} and --dst {dst} are of different address families"
            );
            let e = proxy_agent::explain::Explainer::open(&bpffs)?.explain(
                &proxy_agent::explain::Query {
                    src,
                    dst,
                    protocol: proto.protocol(),
                    from,
                    path,
                },
            );
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
                Output::Table => proxy_agent::explain::print_table(&e),
            }
            Ok(())
        }
        Cmd::Flows {
            bpffs,
            service,
            backend,
            limit,
            output,
        } => {
            let f = proxy_agent::flows::collect(
                &bpffs,
                &proxy_agent::flows::Filter {
                    service,
                    backend,
                    limit,
                },
            )?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&f)?),
                Output::Table => proxy_agent::flows::print_table(&f),
            }
            Ok(())
        }
        Cmd::Cleanup { bpffs } => cleanup::cleanup(&bpffs),
    }
}

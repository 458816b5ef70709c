//! `proxy-agent status`: what the pinned maps hold, as a table or one JSON document.
use std::{collections::BTreeMap, path::Path};

use proxy_common::SVC_COUNTER_NAMES;
use serde::Serialize;

use crate::datapath::{
    loader::{Attachment, attachments},
    maps::{MapUsage, open_for_cli, read_counters, read_svc_stats, usage},
    writer::{Programmed, kind_str},
};

#[derive(Serialize)]
pub struct BackendStatus {
    pub address: String,
    pub port: u16,
    pub state: &'static str,
    pub backend_id: u32,
}

#[derive(Serialize)]
pub struct ServiceStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub vip: String,
    pub port: u16,
    pub protocol: &'static str,
    pub svc_id: u32,
    pub backends: Vec<BackendStatus>,
    /// How new flows choose a backend: "random" or "maglev".
    pub algorithm: &'static str,
    /// Slots of the frontend's programmed Maglev table (null without one: not Maglev, no
    /// backends, or not built yet, in which case the choice falls back to random).
    pub maglev_table_size: Option<u32>,
    /// The datapath's counters of this frontend (`proxy_common::SVC_COUNTER_NAMES`), all hooks
    /// together; zero until its first packet.
    pub counters: BTreeMap<&'static str, u64>,
    /// The attached hooks that look this frontend up: "socket-lb" (internal view only: pods
    /// and host processes), "tc", "xdp".
    pub paths: Vec<&'static str>,
}

#[derive(Serialize)]
pub struct MapStatus {
    #[serde(flatten)]
    pub usage: MapUsage,
    pub usage_percent: f64,
}

#[derive(Serialize)]
pub struct Status {
    pub bpffs: String,
    pub services: Vec<ServiceStatus>,
    pub maps: Vec<MapStatus>,
    pub counters: serde_json::Map<String, serde_json::Value>,
    pub attachments: Vec<Attachment>,
    /// The agent's last sync: rejected objects and Services that were not programmed.
    pub sync: Option<crate::report::SyncReport>,
}

pub fn collect(bpffs: &Path) -> anyhow::Result<Status> {
    let maps = open_for_cli(bpffs)?;
    let p = Programmed::read(&maps)?;
    let stats = read_svc_stats(bpffs)?;
    let hooks = attachments(bpffs);
    let sock = hooks.iter().any(|a| a.interface == "cgroup");
    let xdp = hooks.iter().any(|a| a.mode.starts_with("xdp"));
    let services = p
        .services
        .iter()
        .map(|(fe, s)| ServiceStatus {
            name: s.name.clone(),
            kind: kind_str(&s.value),
            vip: fe.addr.to_string(),
            port: fe.port,
            protocol: fe.protocol.as_str(),
            svc_id: s.svc_id,
            algorithm: s.algorithm().as_str(),
            maglev_table_size: p.tables.get(&s.svc_id).map(|t| t.size),
            counters: {
                let c = stats.get(&s.svc_id).copied().unwrap_or_default();
                SVC_COUNTER_NAMES.iter().copied().zip(c.counts).collect()
            },
            paths: [
                (
                    sock && fe.scope == crate::model::Scope::Internal,
                    "socket-lb",
                ),
                (true, "tc"),
                (xdp, "xdp"),
            ]
            .into_iter()
            .filter_map(|(on, p)| on.then_some(p))
            .collect(),
            backends: s
                .slots
                .iter()
                .map(|id| match p.endpoint(*id) {
                    Some(ep) => BackendStatus {
                        address: ep.addr.to_string(),
                        port: ep.port,
                        state: match ep.state {
                            crate::model::EndpointState::Active => "active",
                            crate::model::EndpointState::Terminating => "terminating",
                        },
                        backend_id: *id,
                    },
                    None => BackendStatus {
                        address: String::new(),
                        port: 0,
                        state: "missing",
                        backend_id: *id,
                    },
                })
                .collect(),
        })
        .collect();
    let maps = usage(bpffs)?
        .into_iter()
        .map(|u| MapStatus {
            usage_percent: if u.max_entries == 0 {
                0.0
            } else {
                (u.entries as f64 * 10_000.0 / u.max_entries as f64).round() / 100.0
            },
            usage: u,
        })
        .collect();
    let counters = read_counters(bpffs)?
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    Ok(Status {
        bpffs: bpffs.display().to_string(),
        services,
        maps,
        counters,
        attachments: hooks,
        sync: crate::report::read(bpffs),
    })
}

pub fn print_table(s: &Status) {
    println!("SERVICES ({})", s.services.len());
    println!(
        "  {:<32} {:<10} {:<28} {:<7} {:>9} {:>7} {:>7} {:<18} BACKENDS",
        "NAME", "TYPE", "FRONTEND", "LB", "PACKETS", "NEW", "DROPPED", "PATHS"
    );
    for svc in &s.services {
        let fe = format!("{}:{}/{}", svc.vip, svc.port, svc.protocol);
        let backends: Vec<String> = svc
            .backends
            .iter()
            .map(|b| {
                if b.state == "active" {
                    format!("{}:{}", b.address, b.port)
                } else {
                    format!("{}:{} ({})", b.address, b.port, b.state)
                }
            })
            .collect();
        let backends = if backends.is_empty() {
            "<none: traffic dropped>".to_string()
        } else {
            backends.join(", ")
        };
        let c = |k: &str| svc.counters.get(k).copied().unwrap_or(0);
        let dropped = c("rejected")
            + c("dropped_no_local_backend")
            + c("dropped_source_range")
            + c("dropped_other");
        println!(
            "  {:<32} {:<10} {:<28} {:<7} {:>9} {:>7} {:>7} {:<18} {}",
            svc.name,
            svc.kind,
            fe,
            svc.algorithm,
            c("packets") + c("replies"),
            c("new_flows"),
            dropped,
            svc.paths.join(","),
            backends
        );
    }
    if let Some(r) = &s.sync {
        println!(
            "\nLAST SYNC  generation {} from {} (pid {})",
            r.generation, r.source, r.pid
        );
        if let Some(k) = &r.kernel {
            println!("  KERNEL {}", k.probes.kernel);
            for h in &k.hooks {
                println!("  HOOK {:<10} {:<12} {}", h.hook, h.mode, h.reason);
            }
        }
        for m in &r.missing_hooks {
            println!("  HOOK MISSING {m}");
        }
        for n in &r.not_programmed {
            println!("  NOT PROGRAMMED {}: {}", n.service, n.reason);
        }
        for e in &r.rejected {
            println!("  REJECTED {}: {}: {}", e.object, e.field, e.message);
        }
        for f in &r.fallbacks {
            println!("  FALLBACK {}: {}", f.service, f.reason);
        }
        for e in &r.source_errors {
            println!("  SOURCE ERROR {e}");
        }
    }
    println!("\nMAPS");
    for m in &s.maps {
        println!(
            "  {:<14} {:>9} / {:<9} {:>6.2}%",
            m.usage.name, m.usage.entries, m.usage.max_entries, m.usage_percent
        );
    }
    println!("\nCOUNTERS");
    for (k, v) in &s.counters {
        println!("  {k:<26} {v}");
    }
    println!("\nATTACHMENTS");
    for a in &s.attachments {
        println!("  {:<16} {:<12} {}", a.interface, a.hook, a.mode);
    }
}

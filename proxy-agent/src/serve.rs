//! Metrics (Prometheus text, kube-proxy's names where they mean the same) and health endpoints
//! with kube-proxy's semantics, over a deliberately small HTTP/1.1 responder.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::datapath::maps::{read_counters, usage};

/// Histogram buckets (seconds), as kube-proxy's sync duration metrics use.
const BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
struct State {
    /// When the oldest change not yet programmed was seen.
    oldest_queued: Option<Instant>,
    last_queued_unix: f64,
    last_updated: Option<Instant>,
    last_updated_unix: f64,
    sync_duration: Histogram,
    programming_duration: Histogram,
    not_programmed: usize,
    rejected: usize,
    /// Required hooks that are not attached: the node does not proxy what they carry.
    missing_hooks: Vec<String>,
    /// Manifest errors per file at the last load.
    source_errors: std::collections::BTreeMap<String, usize>,
}

/// Shared between the sync loop and the HTTP endpoints.
#[derive(Clone)]
pub struct Health {
    state: Arc<Mutex<State>>,
    timeout: Duration,
    bpffs: PathBuf,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn rfc3339(unix: f64) -> String {
    // Seconds precision is plenty for probes; avoids a date crate.
    let secs = unix as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Health {
    pub fn new(bpffs: PathBuf, timeout: Duration) -> Self {
        Self {
            state: Arc::default(),
            timeout,
            bpffs,
        }
    }

    /// A change arrived that the datapath does not reflect yet.
    pub fn queued(&self) {
        let mut s = self.state.lock().unwrap();
        s.oldest_queued.get_or_insert_with(Instant::now);
        s.last_queued_unix = unix_now();
    }

    /// A sync finished: `took` is the sync itself; programming latency runs from the queued change.
    pub fn updated(&self, took: Duration, not_programmed: usize, rejected: usize) {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        if let Some(q) = s.oldest_queued.take() {
            s.programming_duration
                .observe(now.duration_since(q).as_secs_f64());
        }
        s.sync_duration.observe(took.as_secs_f64());
        s.last_updated = Some(now);
        s.last_updated_unix = unix_now();
        s.not_programmed = not_programmed;
        s.rejected = rejected;
    }

    /// What the source could not read at its last load, counted per file.
    pub fn set_source_errors(&self, errors: &[crate::report::SourceError]) {
        let mut s = self.state.lock().unwrap();
        s.source_errors.clear();
        for e in errors {
            *s.source_errors.entry(e.file.clone()).or_default() += 1;
        }
    }

    /// The hooks the configuration requires that are not attached right now (empty: all are).
    pub fn set_missing_hooks(&self, missing: Vec<String>) {
        self.state.lock().unwrap().missing_hooks = missing;
    }

    /// kube-proxy's rule: healthy once synced, unless a queued change has waited longer than the
    /// timeout without being programmed.
    fn healthy(&self) -> (bool, String) {
        let s = self.state.lock().unwrap();
        let stalled = s.oldest_queued.is_some_and(|q| q.elapsed() > self.timeout);
        // Beyond kube-proxy: a node whose hooks are not all attached looks synced but does not
        // proxy, which an operator must see.
        let ok = s.last_updated.is_some() && !stalled && s.missing_hooks.is_empty();
        let missing = if s.missing_hooks.is_empty() {
            String::new()
        } else {
            format!(
                ", \"missingHooks\": {}",
                serde_json::to_string(&s.missing_hooks).unwrap_or_default()
            )
        };
        let body = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\", \"nodeEligible\": true{missing}}}",
            if s.last_updated.is_some() {
                rfc3339(s.last_updated_unix)
            } else {
                String::new()
            },
            rfc3339(unix_now())
        );
        (ok, body)
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        {
            let s = self.state.lock().unwrap();
            s.sync_duration.render(
                &mut out,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
            );
            s.programming_duration.render(
                &mut out,
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
            );
            let _ = writeln!(
                out,
                "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were successfully synced\n# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\nkubeproxy_sync_proxy_rules_last_timestamp_seconds {}",
                s.last_updated_unix
            );
            let _ = writeln!(
                out,
                "# HELP kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds The last time a sync of proxy rules was queued\n# TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge\nkubeproxy_sync_proxy_rules_last_queued_timestamp_seconds {}",
                s.last_queued_unix
            );
            let _ = writeln!(
                out,
                "# HELP proxy_services_not_programmed Services that did not fit the maps at the last sync\n# TYPE proxy_services_not_programmed gauge\nproxy_services_not_programmed {}\n# HELP proxy_objects_rejected Invalid objects rejected at the last sync\n# TYPE proxy_objects_rejected gauge\nproxy_objects_rejected {}",
                s.not_programmed, s.rejected
            );
            let _ = writeln!(
                out,
                "# HELP proxy_manifest_errors Manifest documents that did not parse at the last load, per file (the file serves its last good version)\n# TYPE proxy_manifest_errors gauge"
            );
            for (file, n) in &s.source_errors {
                let file = file.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "proxy_manifest_errors{{file=\"{file}\"}} {n}");
            }
        }
        if let Ok(counters) = read_counters(&self.bpffs) {
            let _ = writeln!(
                out,
                "# HELP proxy_datapath_packets_total Packets seen by the datapath, by outcome\n# TYPE proxy_datapath_packets_total counter"
            );
            for (name, v) in counters {
                let _ = writeln!(
                    out,
                    "proxy_datapath_packets_total{{outcome=\"{name}\"}} {v}"
                );
            }
        }
        if let Ok(maps) = usage(&self.bpffs) {
            let _ = writeln!(
                out,
                "# HELP proxy_map_entries Entries in each BPF map\n# TYPE proxy_map_entries gauge"
            );
            for m in &maps {
                let _ = writeln!(out, "proxy_map_entries{{map=\"{}\"}} {}", m.name, m.entries);
            }
            let _ = writeln!(
                out,
                "# HELP proxy_map_capacity Capacity of each BPF map\n# TYPE proxy_map_capacity gauge"
            );
            for m in &maps {
                let _ = writeln!(
                    out,
                    "proxy_map_capacity{{map=\"{}\"}} {}",
                    m.name, m.max_entries
                );
            }
        }
        out
    }

    fn respond(&self, path: &str, metrics_server: bool) -> (u16, &'static str, String) {
        match (metrics_server, path) {
            (true, "/metrics") => (200, "text/plain; version=0.0.4", self.metrics()),
            (false, "/healthz" | "/livez") => {
                let (ok, body) = self.healthy();
                (if ok { 200 } else { 503 }, "application/json", body)
            }
            _ => (404, "text/plain", "404 page not found\n".into()),
        }
    }
}

/// An endpoint's answer: status code, content type, body.
type Response = (u16, &'static str, String);

/// Serves `/metrics` (metrics_server) or `/healthz` and `/livez` until the task is dropped.
pub async fn serve(addr: SocketAddr, health: Health, metrics_server: bool) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, what = if metrics_server { "metrics" } else { "healthz" }, "serving");
    serve_http(listener, move |path| health.respond(path, metrics_server)).await
}

/// A healthCheckNodePort's state, updated by the sync loop.
pub type HealthCheckState = Arc<Mutex<crate::model::HealthCheck>>;

/// Serves one healthCheckNodePort like kube-proxy: 200 with the number of local endpoints, 503
/// when this node has none (load balancers then send the Service's traffic elsewhere).
pub async fn serve_health_check(addr: SocketAddr, state: HealthCheckState) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve_http(listener, move |_path| {
        let hc = state.lock().unwrap().clone();
        let body = format!(
            "{{\"service\": {{\"namespace\": \"{}\", \"name\": \"{}\"}}, \"localEndpoints\": {}, \"serviceProxyHealthy\": true}}",
            hc.namespace, hc.name, hc.local_endpoints
        );
        (if hc.local_endpoints > 0 { 200 } else { 503 }, "application/json", body)
    })
    .await
}

async fn serve_http(
    listener: TcpListener,
    respond: impl Fn(&str) -> Response + Clone + Send + 'static,
) -> std::io::Result<()> {
    loop {
        let (mut sock, _) = listener.accept().await?;
        let respond = respond.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            // Read the request head; bodies are not used by any endpoint.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    let m = sock.read(&mut buf[n..]).await?;
                    if m == 0 {
                        break;
                    }
                    n += m;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let mut parts = head.split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = target.split('?').next().unwrap_or("");
            let (code, ctype, body) = if method == "GET" || method == "HEAD" {
                respond(path)
            } else {
                (405, "text/plain", "method not allowed\n".into())
            };
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                _ => "Service Unavailable",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                if method == "HEAD" { "" } else { body.as_str() }
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_305_600.0), "2026-11-22T00:00:00Z");
        assert_eq!(rfc3339(951_825_599.0), "2000-02-29T11:59:59Z");
    }

    #[test]
    fn health_follows_kube_proxy() {
        let h = Health::new(PathBuf::from("/nonexistent"), Duration::from_millis(50));
        assert!(!h.healthy().0, "not healthy before the first sync");
        h.queued();
        h.updated(Duration::from_millis(1), 0, 0);
        assert!(h.healthy().0);
        h.queued();
        assert!(h.healthy().0, "a fresh queued change is fine");
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            !h.healthy().0,
            "a change waiting past the timeout is a stall"
        );
        h.updated(Duration::from_millis(1), 0, 0);
        assert!(h.healthy().0);
        h.set_missing_hooks(vec!["tc ingress not attached on lan0: refused".into()]);
        let (ok, body) = h.healthy();
        assert!(!ok, "a required hook missing fails health");
        assert!(body.contains("not attached on lan0: refused"), "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("the body stays JSON");
        h.set_missing_hooks(Vec::new());
        assert!(h.healthy().0);
        let m = h.metrics();
        assert!(
            m.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 2"),
            "{m}"
        );
        assert!(m.contains("kubeproxy_network_programming_duration_seconds_count 2"));
    }
}

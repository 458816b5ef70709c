//! Hostile input and faults, end to end on the emulated cluster:
//!
//! - the corpus of bad objects in `tests/corpus/` (see its README) through both sources, the
//!   manifest files (`corpus_through_manifests`) and the test API server
//!   (`corpus_through_kube`), next to a known-good Service that keeps answering traffic before,
//!   during (while the bad objects arrive one by one) and after;
//! - full maps: Services past the capacity of small maps are reported and never disturb the
//!   programmed ones (`services_past_map_capacity_are_reported_and_the_rest_keeps_working`);
//! - conntrack LRU pressure: established tc-path streams under a flood of short connections
//!   with a tiny conntrack map (`conntrack_pressure_keeps_busy_established_streams`);
//! - endpoint churn: an EndpointSlice changing 20 times a second while traffic flows
//!   (`endpoint_churn_under_traffic`). It runs `CHURN_SECONDS` seconds (default 20; the full run
//!   of the issue is `CHURN_SECONDS=60`).
//!
//! Each prints its figures (objects tried, connections, failures, streams broken, latencies,
//! memory); see them with `--nocapture`. These tests are heavy (many processes,
//! timing-sensitive traffic on few cores), so they run one at a time within this file. They need root and the agent binary; they fail, never skip.
//! Every address is in 198.18.0.0/15 inside the bed's namespaces; VIPs are in 198.18.101.0/24.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize as _;
use serde_json::{Value, json};
use tests::apiserver::ApiServer;
use tests::client::{EchoStream, http_get, request_loop};
use tests::{
    Agent, Endpoint, EndpointSlice, Outcome, Pod, Proto, Service, Tally, TestBed,
    find_status_service, in_netns, status_backends, tcp_request,
};

/// Per-request timeout.
const T: Duration = Duration::from_secs(2);
/// Time an agent may take to load, attach and program the maps.
const SYNC: Duration = Duration::from_secs(60);

/// One heavy test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds a bed, runs `f` on it; on failure keeps the bed's directory and prints the tail of
/// every log before failing the test.
fn with_bed(nodes: u8, f: impl FnOnce(&mut TestBed) -> Result<()>) {
    let _serial = serial();
    let mut bed = TestBed::new(nodes).expect("building the test bed (needs root)");
    if let Err(e) = f(&mut bed) {
        bed.keep_dir();
        eprintln!("{}", bed.log_tails(40));
        panic!("{e:#}");
    }
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("address literal"), port)
}

fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn now_us() -> i64 {
    unix_us(SystemTime::now())
}

/// `GET /metrics` on the agent's default metrics address inside its node namespace; the value
/// of the sample `name` (without labels).
fn metric(agent: &Agent, name: &str) -> Result<f64> {
    let resp = in_netns(&agent.ns, || {
        http_get(sa("127.0.0.1", 10249), "/metrics", T)
    })??;
    ensure!(resp.status == 200, "GET /metrics: {}", resp.status);
    let line = resp
        .body
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .with_context(|| format!("no sample {name} in /metrics"))?;
    let v = line.split_whitespace().nth(1).unwrap_or_default();
    v.parse()
        .with_context(|| format!("metric line {line:?} has no number"))
}

/// VmRSS of a process, in KiB.
fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    line.split_whitespace()
        .nth(1)
        .context("VmRSS without a value")?
        .parse()
        .context("VmRSS value")
}

/// One request of a [`Background`] loop: start and end (unix µs) and outcome.
struct Timed {
    start: i64,
    end: i64,
    outcome: Outcome,
}

/// Requests from a thread inside a network namespace, one every `every`, each outcome with its
/// start and end time, until stopped (or 15 minutes, or 200,000 requests).
struct Background {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Result<Vec<Timed>>>>,
}

impl Background {
    fn start(ns: &str, to: SocketAddr, every: Duration) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ns = ns.to_string();
        let handle = thread::spawn(move || {
            in_netns(&ns, move || {
                let limit = Instant::now() + Duration::from_secs(900);
                let mut out = Vec::new();
                while !flag.load(Ordering::Relaxed)
                    && Instant::now() < limit
                    && out.len() < 200_000
                    && !tests::interrupted()
                {
                    let start = now_us();
                    let outcome = tcp_request(to, T).map_err(|e| format!("{e:#}"));
                    out.push(Timed {
                        start,
                        end: now_us(),
                        outcome,
                    });
                    thread::sleep(every);
                }
                out
            })
        });
        Background {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Result<Vec<Timed>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().expect("joined once").join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Fails unless every outcome is a reply from one of `backends`.
fn all_answered_by(what: &str, outcomes: &[Outcome], backends: &[&str]) -> Result<Tally> {
    let tally = Tally::new(outcomes);
    tally
        .expect_no_failures()
        .with_context(|| format!("{what}: {tally}"))?;
    for b in tally.per_backend.keys() {
        ensure!(
            backends.contains(&b.as_str()),
            "{what}: answered by {b}, expected only {backends:?} ({tally})"
        );
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------------
// The corpus (tests/corpus/*.yaml)
// ---------------------------------------------------------------------------------------------

/// `VIP:PORT/PROTO` of a frontend.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Fe {
    addr: SocketAddr,
    proto: Proto,
}

impl Fe {
    fn parse(s: &str) -> Result<Fe> {
        let (addr, proto) = s
            .split_once('/')
            .with_context(|| format!("frontend {s:?} is not VIP:PORT/PROTO"))?;
        let proto = match proto {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            p => bail!("unknown protocol {p:?} in {s:?}"),
        };
        Ok(Fe {
            addr: addr
                .parse()
                .with_context(|| format!("frontend address in {s:?}"))?,
            proto,
        })
    }

    fn in_status<'a>(&self, status: &'a Value) -> Option<&'a Value> {
        find_status_service(
            status,
            &self.addr.ip().to_string(),
            self.addr.port(),
            self.proto,
        )
    }
}

impl std::fmt::Display for Fe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto.k8s())
    }
}

/// One `# expect:` directive of a corpus file.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    /// `status` `sync.rejected` has {object, field}.
    Rejected {
        object: String,
        field: String,
    },
    /// The agent log has `manifest rejected` naming the file.
    ManifestError,
    Programmed {
        fe: Fe,
        backends: Option<usize>,
        name: Option<String>,
    },
    Absent(Fe),
    /// TCP requests from the client pod are answered by the good backends.
    Answers(SocketAddr),
}

impl Expect {
    fn parse(s: &str) -> Result<Expect> {
        let words: Vec<&str> = s.split_whitespace().collect();
        Ok(match words.as_slice() {
            ["rejected", kind, obj, field] => Expect::Rejected {
                object: format!("{kind} {obj}"),
                field: field.to_string(),
            },
            ["manifest-error"] => Expect::ManifestError,
            ["programmed", fe, rest @ ..] => {
                let (mut backends, mut name) = (None, None);
                for w in rest {
                    match w.split_once('=') {
                        Some(("backends", n)) => backends = Some(n.parse()?),
                        Some(("name", n)) => name = Some(n.to_string()),
                        _ => bail!("unknown option {w:?} in {s:?}"),
                    }
                }
                Expect::Programmed {
                    fe: Fe::parse(fe)?,
                    backends,
                    name,
                }
            }
            ["absent", fe] => Expect::Absent(Fe::parse(fe)?),
            ["answers", addr] => Expect::Answers(addr.parse()?),
            _ => bail!("cannot parse expectation {s:?}"),
        })
    }
}

#[derive(Clone, Debug)]
struct Case {
    file: String,
    text: String,
    expect: Vec<Expect>,
    /// `None`: not applied to the API server; `Some`: what to expect there.
    kube: Option<Vec<Expect>>,
    gen_endpoints: Option<usize>,
    gen_annotation_bytes: Option<usize>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn load_corpus() -> Result<Vec<Case>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for path in files {
        let file = path
            .file_name()
            .context("file name")?
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path)?;
        let mut case = Case {
            file: file.clone(),
            text: text.clone(),
            expect: Vec::new(),
            kube: None,
            gen_endpoints: None,
            gen_annotation_bytes: None,
        };
        let (mut kube, mut kube_skip) = (Vec::new(), false);
        for line in text.lines() {
            let Some(comment) = line.trim_start().strip_prefix('#') else {
                continue;
            };
            let comment = comment.trim();
            let ctx = || format!("{file}: {comment:?}");
            if let Some(e) = comment.strip_prefix("expect:") {
                case.expect.push(Expect::parse(e.trim()).with_context(ctx)?);
            } else if let Some(e) = comment.strip_prefix("kube-expect:") {
                if e.trim() == "skip" {
                    kube_skip = true;
                } else {
                    kube.push(Expect::parse(e.trim()).with_context(ctx)?);
                }
            } else if let Some(g) = comment.strip_prefix("generate:") {
                match g.split_whitespace().collect::<Vec<_>>().as_slice() {
                    ["endpoints", n] => case.gen_endpoints = Some(n.parse().with_context(ctx)?),
                    ["annotation-bytes", n] => {
                        case.gen_annotation_bytes = Some(n.parse().with_context(ctx)?)
                    }
                    _ => bail!("{}: unknown generate directive", ctx()),
                }
            }
        }
        case.kube = match (kube_skip, kube.is_empty()) {
            (true, _) => None,
            (false, true) => Some(case.expect.clone()),
            (false, false) => Some(kube),
        };
        cases.push(case);
    }
    Ok(cases)
}

impl Case {
    /// The documents of the file as JSON values, with the generated parts added.
    fn objects(&self) -> Result<Vec<Value>> {
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&self.text) {
            let v = Value::deserialize(doc).with_context(|| format!("{}: YAML", self.file))?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        if let Some(n) = self.gen_annotation_bytes {
            let blob = "a".repeat(n);
            for d in docs.iter_mut().filter(|d| d["kind"] == "Service") {
                let meta = d["metadata"]
                    .as_object_mut()
                    .context("Service metadata is not a map")?;
                let ann = meta.entry("annotations").or_insert_with(|| json!({}));
                ann["example.test/blob"] = json!(blob);
            }
        }
        if let Some(n) = self.gen_endpoints {
            let svc = docs
                .iter()
                .find(|d| d["kind"] == "Service")
                .context("generate: endpoints needs a Service in the file")?;
            let ns = svc["metadata"]["namespace"].as_str().unwrap_or("default");
            let name = svc["metadata"]["name"].as_str().context("Service name")?;
            let target = svc["spec"]["ports"][0]["targetPort"].as_u64().unwrap_or(80) as u16;
            let mut slices = Vec::new();
            for chunk in 0..n.div_ceil(1000) {
                let mut s = EndpointSlice::new(ns, name, &format!("gen{chunk}")).port(
                    "",
                    target,
                    Proto::Tcp,
                );
                for j in chunk * 1000..((chunk + 1) * 1000).min(n) {
                    // 198.19.100.1 - 198.19.139.250: never a pod of the bed, never sent to.
                    let ip = format!("198.19.{}.{}", 100 + j / 250, 1 + j % 250);
                    s = s.endpoint(Endpoint::ready(&ip, "node1"));
                }
                slices.push(s.to_value());
            }
            docs.extend(slices);
        }
        Ok(docs)
    }

    /// The file as written to the manifests directory: verbatim, unless parts are generated.
    fn manifest_text(&self) -> Result<String> {
        if self.gen_endpoints.is_none() && self.gen_annotation_bytes.is_none() {
            return Ok(self.text.clone());
        }
        let header: String = self
            .text
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        Ok(header + &tests::manifests::yaml_documents(&self.objects()?))
    }
}

/// Checks every expectation but `answers` against one status document and the agent log; the
/// list of those that do not hold.
fn unmet(expects: &[Expect], status: &Value, log: &str, file: &str) -> Vec<String> {
    let mut out = Vec::new();
    let rejected = status["sync"]["rejected"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for e in expects {
        match e {
            Expect::Rejected { object, field } => {
                if !rejected
                    .iter()
                    .any(|r| r["object"] == *object && r["field"] == *field)
                {
                    out.push(format!("no rejection of {object} at {field}"));
                }
            }
            Expect::ManifestError => {
                if !log
                    .lines()
                    .any(|l| l.contains("manifest rejected") && l.contains(file))
                {
                    out.push(format!("no `manifest rejected` log line naming {file}"));
                }
            }
            Expect::Programmed { fe, backends, name } => match fe.in_status(status) {
                None => out.push(format!("{fe} not programmed")),
                Some(s) => {
                    let got = status_backends(s).len();
                    if backends.is_some_and(|b| b != got) {
                        out.push(format!("{fe} has {got} backends, want {backends:?}"));
                    }
                    if let Some(n) = name
                        && s["name"] != *n
                    {
                        out.push(format!("{fe} is programmed for {}, want {n}", s["name"]));
                    }
                }
            },
            Expect::Absent(fe) => {
                if let Some(s) = fe.in_status(status) {
                    out.push(format!("{fe} is programmed ({}), want absent", s["name"]));
                }
            }
            Expect::Answers(_) => {}
        }
    }
    out
}

/// Polls `status` and the log until every expectation of corpus file `file` holds (15 s at
/// most).
fn wait_case(agent: &Agent, file: &str, expects: &[Expect]) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = agent.status_json()?;
        let missing = unmet(expects, &status, &agent.log_text(), file);
        if missing.is_empty() {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!(
                "{file}: {}; sync report: {:#}",
                missing.join("; "),
                status["sync"]
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

const GOOD_VIP: &str = "198.18.101.10";

/// Two client pods: threads of the test in `tc` take the tc path; processes in `sock` (in its
/// cgroup) take socket LB. Separate pods, because a socket-LB connection (straight to a backend)
/// and a DNATed one from the same address and port space can meet on the same 5-tuple at a
/// backend, which is not what these tests look at.
struct Clients {
    tc: Pod,
    sock: Pod,
}

fn clients(bed: &mut TestBed) -> Result<Clients> {
    Ok(Clients {
        tc: bed.add_pod(1, "client")?,
        sock: bed.add_pod(1, "sock-client")?,
    })
}

/// The known-good Service: good/web on GOOD_VIP:80 -> good-a, good-b (198.19.1.2, .3) :8080,
/// and the client pods, all on node1.
fn good_pods(bed: &mut TestBed) -> Result<(Vec<Pod>, Clients)> {
    let mut pods = Vec::new();
    for (name, ip) in [("good-a", "198.19.1.2"), ("good-b", "198.19.1.3")] {
        let p = bed.add_pod(1, name)?;
        ensure!(
            p.ip.to_string() == ip,
            "{name} got {} (the corpus names {ip})",
            p.ip
        );
        bed.start_echo(&p, &[8080], &[])?;
        pods.push(p);
    }
    Ok((pods, clients(bed)?))
}

fn good_objects(pods: &[Pod]) -> (Value, Value) {
    let svc = Service::cluster_ip("good", "web", GOOD_VIP).port("", 80, 8080, Proto::Tcp);
    let mut slice = EndpointSlice::new("good", "web", "1").port("", 8080, Proto::Tcp);
    for p in pods {
        slice = slice.endpoint(Endpoint::ready(&p.ip.to_string(), "node1"));
    }
    (svc.to_value(), slice.to_value())
}

/// The good Service answers from a pod process (socket LB) and a pod thread (tc path).
fn good_answers(bed: &TestBed, client: &Clients, what: &str, n: usize) -> Result<()> {
    let to = sa(GOOD_VIP, 80);
    let out = bed.pod_requests(&client.sock, Proto::Tcp, to, n, T)?;
    let tally = all_answered_by(
        &format!("{what} (pod process)"),
        &out,
        &["good-a", "good-b"],
    )?;
    if n >= 40 {
        tally.expect_spread(&["good-a", "good-b"], 0.2)?;
    }
    let out = in_netns(&client.tc.ns, || request_loop(Proto::Tcp, to, n, T))?;
    all_answered_by(&format!("{what} (pod thread)"), &out, &["good-a", "good-b"])?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Source {
    Manifests,
    Kube,
}

/// Runs the corpus through one source. `apply(case)` hands a case's objects to the source.
fn run_corpus(
    bed: &TestBed,
    source: Source,
    agent: &Agent,
    client: &Clients,
    mut apply: impl FnMut(&TestBed, &Case) -> Result<()>,
) -> Result<()> {
    let started = Instant::now();
    let cases = load_corpus()?;
    let good_fe = Expect::Programmed {
        fe: Fe {
            addr: sa(GOOD_VIP, 80),
            proto: Proto::Tcp,
        },
        backends: Some(2),
        name: Some("good/web".into()),
    };
    // Before.
    wait_case(agent, "good/web", std::slice::from_ref(&good_fe))?;
    good_answers(bed, client, "before the corpus", 40)?;

    // During: continuous traffic from a pod thread while the cases arrive one by one.
    let background = Background::start(&client.tc.ns, sa(GOOD_VIP, 80), Duration::from_millis(10));
    let mut applied: Vec<(&Case, &[Expect])> = Vec::new();
    let mut applied_at: Vec<(i64, String)> = Vec::new();
    let mut skipped = Vec::new();
    for case in &cases {
        let expects: &[Expect] = match source {
            Source::Manifests => &case.expect,
            Source::Kube => match &case.kube {
                Some(e) => e,
                None => {
                    skipped.push(case.file.clone());
                    continue;
                }
            },
        };
        let generation = agent.generation().unwrap_or(0);
        let t0 = Instant::now();
        applied_at.push((now_us(), case.file.clone()));
        apply(bed, case)?;
        agent.wait_for_sync(generation + 1, SYNC)?;
        let status = wait_case(agent, &case.file, expects)?;
        // The good Service is untouched by every bad object.
        let missing = unmet(std::slice::from_ref(&good_fe), &status, "", "");
        ensure!(
            missing.is_empty(),
            "after {}: good/web: {missing:?}",
            case.file
        );
        for e in expects {
            if let Expect::Answers(to) = e {
                let out = in_netns(&client.tc.ns, || request_loop(Proto::Tcp, *to, 20, T))?;
                all_answered_by(&format!("{}: {to}", case.file), &out, &["good-a", "good-b"])?;
            }
        }
        good_answers(bed, client, &format!("after {}", case.file), 10)?;
        eprintln!(
            "corpus {:?}: {} applied and checked in {:?} ({} expectations)",
            source_name(source),
            case.file,
            t0.elapsed(),
            expects.len()
        );
        applied.push((case, expects));
    }
    let during = background.finish()?;
    // Each failure with its time and the case applied last before it.
    let failed: Vec<String> = during
        .iter()
        .filter_map(|t| {
            let e = t.outcome.as_ref().err()?;
            let case = applied_at
                .iter()
                .rev()
                .find(|(at, _)| *at <= t.start)
                .map_or("(none yet)", |(_, f)| f.as_str());
            Some(format!(
                "started at {} (unix µs) after {case} was applied, failed after {} µs: {e}",
                t.start,
                t.end - t.start
            ))
        })
        .collect();
    ensure!(
        failed.is_empty(),
        "continuous traffic to good/web while the corpus arrived: {} of {} failed: {failed:#?}; \
         datapath counters: {}",
        failed.len(),
        during.len(),
        agent.status_json()?["counters"]
    );
    let outcomes: Vec<Outcome> = during.into_iter().map(|t| t.outcome).collect();
    let tally = all_answered_by(
        "continuous traffic to good/web while the corpus arrived",
        &outcomes,
        &["good-a", "good-b"],
    )?;

    // After: everything at once still holds, and nothing else was reported.
    let status = agent.status_json()?;
    let log = agent.log_text();
    for (case, expects) in &applied {
        let missing = unmet(expects, &status, &log, &case.file);
        ensure!(
            missing.is_empty(),
            "at the end, {}: {}",
            case.file,
            missing.join("; ")
        );
    }
    let want: BTreeSet<(String, String)> = applied
        .iter()
        .flat_map(|(_, e)| e.iter())
        .filter_map(|e| match e {
            Expect::Rejected { object, field } => Some((object.clone(), field.clone())),
            _ => None,
        })
        .collect();
    let rejected = status["sync"]["rejected"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let got: Vec<(String, String)> = rejected
        .iter()
        .map(|r| {
            (
                r["object"].as_str().unwrap_or_default().to_string(),
                r["field"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let got_set: BTreeSet<(String, String)> = got.iter().cloned().collect();
    ensure!(
        got_set == want && got.len() == want.len(),
        "sync.rejected must hold exactly one entry per bad object: got {got:#?}, want {want:#?}"
    );
    let not_programmed = status["sync"]["not_programmed"]
        .as_array()
        .map_or(0, Vec::len);
    ensure!(
        not_programmed == 0,
        "nothing should be past capacity: {:#}",
        status["sync"]["not_programmed"]
    );
    let manifest_error_files: BTreeSet<String> = log
        .lines()
        .filter(|l| l.contains("manifest rejected"))
        .filter_map(|l| {
            applied
                .iter()
                .map(|(c, _)| c.file.clone())
                .find(|f| l.contains(&format!("/{f}")))
                .or_else(|| Some(format!("<unknown file> in {l}")))
        })
        .collect();
    let want_files: BTreeSet<String> = applied
        .iter()
        .filter(|(_, e)| e.contains(&Expect::ManifestError))
        .map(|(c, _)| c.file.clone())
        .collect();
    ensure!(
        manifest_error_files == want_files,
        "manifest errors logged for {manifest_error_files:?}, expected {want_files:?}"
    );
    let metric_rejected = metric(agent, "proxy_objects_rejected")?;
    ensure!(
        metric_rejected == want.len() as f64,
        "proxy_objects_rejected is {metric_rejected}, want {}",
        want.len()
    );
    good_answers(bed, client, "after the corpus", 40)?;
    ensure!(agent.is_running(), "the agent exited");
    eprintln!(
        "corpus {:?}: {} files applied ({} skipped for this source: {skipped:?}), {} rejected \
         entries reported, {} files with manifest errors logged; continuous traffic to good/web: \
         {tally}; agent VmRSS {} KiB; {:?} in all",
        source_name(source),
        applied.len(),
        skipped.len(),
        got.len(),
        manifest_error_files.len(),
        vm_rss_kib(agent.pid).unwrap_or(0),
        started.elapsed()
    );
    Ok(())
}

fn source_name(s: Source) -> &'static str {
    match s {
        Source::Manifests => "manifests",
        Source::Kube => "kube",
    }
}

/// Every corpus file parses: directives are understood, each case says what it expects, and
/// every file but the deliberately broken ones is valid YAML.
#[test]
fn corpus_files_are_well_formed() {
    let cases = load_corpus().expect("loading the corpus");
    assert!(cases.len() >= 20, "corpus has {} files", cases.len());
    for c in &cases {
        let broken = c.expect.contains(&Expect::ManifestError);
        assert!(
            c.text.starts_with('#'),
            "{}: must start with a header comment",
            c.file
        );
        if !broken {
            let objs = c.objects().unwrap_or_else(|e| panic!("{e:#}"));
            assert!(!objs.is_empty(), "{}: no objects", c.file);
        } else {
            assert!(
                c.kube.is_none(),
                "{}: a file with a parse error cannot go to the API server",
                c.file
            );
        }
    }
}

/// (a) The corpus through the manifests source.
#[test]
fn corpus_through_manifests() {
    with_bed(1, |bed| {
        let (pods, client) = good_pods(bed)?;
        let (svc, slice) = good_objects(&pods);
        bed.write_manifest(
            "00-good.yaml",
            &tests::manifests::yaml_documents(&[svc, slice]),
        )?;
        let agent = bed.start_agent(1)?;
        agent.wait_for_sync(1, SYNC)?;
        run_corpus(bed, Source::Manifests, &agent, &client, |bed, case| {
            bed.write_manifest(&case.file, &case.manifest_text()?)
        })
    });
}

/// (b) The same corpus applied to the test API server, watched by the agent.
#[test]
fn corpus_through_kube() {
    with_bed(1, |bed| {
        let (pods, client) = good_pods(bed)?;
        let server = ApiServer::start(
            Some(&bed.node(1).ns),
            SocketAddr::from(([198, 18, 0, 1], 16443)),
        )?;
        let kubeconfig = bed.dir().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}));
        let (svc, slice) = good_objects(&pods);
        server.apply(svc);
        server.apply(slice);
        let agent = bed.start_agent_kube(1, &kubeconfig, &[])?;
        agent.wait_for_sync(1, SYNC)?;
        run_corpus(bed, Source::Kube, &agent, &client, |_, case| {
            for obj in case.objects()? {
                server.apply(obj);
            }
            Ok(())
        })
    });
}

// ---------------------------------------------------------------------------------------------
// Full maps
// ---------------------------------------------------------------------------------------------

/// With room for 4 frontends and 8 backends: a, b and c (two ports) fill the maps exactly;
/// d..h arrive one by one and are reported, never programmed in part, while a, b and c keep
/// answering; growing a past the backends map leaves a as it was (reported); removing c makes
/// room and the waiting Services are programmed whole.
#[test]
fn services_past_map_capacity_are_reported_and_the_rest_keeps_working() {
    with_bed(1, |bed| {
        let mut pods = Vec::new();
        for name in ["cap-1", "cap-2", "cap-3"] {
            let p = bed.add_pod(1, name)?;
            bed.start_echo(&p, &[8080], &[])?;
            pods.push(p);
        }
        let client = clients(bed)?;
        let write = |bed: &TestBed, name: &str, vip: &str, ports: &[u16], backends: &[&Pod]| {
            let mut svc = Service::cluster_ip("cap", name, vip);
            let mut slice = EndpointSlice::new("cap", name, "1");
            for p in ports {
                let pname = if ports.len() > 1 {
                    format!("p{p}")
                } else {
                    String::new()
                };
                svc = svc.port(&pname, *p, 8080, Proto::Tcp);
                slice = slice.port(&pname, 8080, Proto::Tcp);
            }
            for b in backends {
                slice = slice.endpoint(Endpoint::ready(&b.ip.to_string(), "node1"));
            }
            bed.write_manifest(
                &format!("{name}.yaml"),
                &tests::manifests::yaml_documents(&[svc.to_value(), slice.to_value()]),
            )
        };
        let (p1, p2, p3) = (&pods[0], &pods[1], &pods[2]);
        write(bed, "a", "198.18.101.70", &[80], &[p1, p2])?;
        write(bed, "b", "198.18.101.71", &[80], &[p1, p2])?;
        write(bed, "c", "198.18.101.72", &[80, 81], &[p1, p2])?;
        let dir = bed.manifests_dir().to_path_buf();
        let agent = bed.start_agent_with(
            1,
            &dir,
            &["--map-size-services", "4", "--map-size-backends", "8"],
        )?;
        agent.wait_for_sync(1, SYNC)?;
        let status = agent.status_json()?;
        let np = |s: &Value| -> BTreeMap<String, String> {
            s["sync"]["not_programmed"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    (
                        v["service"].as_str().unwrap_or_default().to_string(),
                        v["reason"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        };
        ensure!(
            np(&status).is_empty(),
            "a, b, c fit exactly: {:#}",
            status["sync"]
        );
        let fes = [
            ("198.18.101.70", 80),
            ("198.18.101.71", 80),
            ("198.18.101.72", 80),
            ("198.18.101.72", 81),
        ];
        for (vip, port) in fes {
            ensure!(
                find_status_service(&status, vip, port, Proto::Tcp).is_some(),
                "{vip}:{port} not programmed: {status:#}"
            );
        }
        let programmed_names = ["cap-1", "cap-2"];
        let check_programmed = |bed: &TestBed, what: &str| -> Result<()> {
            for (vip, port) in fes {
                let out = bed.pod_requests(&client.sock, Proto::Tcp, sa(vip, port), 6, T)?;
                all_answered_by(&format!("{what}: {vip}:{port}"), &out, &programmed_names)?;
            }
            Ok(())
        };
        check_programmed(bed, "before")?;

        let background = Background::start(
            &client.tc.ns,
            sa("198.18.101.70", 80),
            Duration::from_millis(10),
        );
        // d..h, one frontend and one backend each: none fits (svc_v2 is full).
        let extra = [
            ("d", "198.18.101.73"),
            ("e", "198.18.101.74"),
            ("f", "198.18.101.75"),
            ("g", "198.18.101.76"),
            ("h", "198.18.101.77"),
        ];
        for (i, (name, vip)) in extra.iter().enumerate() {
            let g = agent.generation().unwrap_or(0);
            write(bed, name, vip, &[80], &[p3])?;
            agent.wait_for_sync(g + 1, SYNC)?;
            let status = agent.status_json()?;
            let reported = np(&status);
            ensure!(
                reported.len() == i + 1,
                "after adding {name}: {} reported, want {}: {reported:#?}",
                reported.len(),
                i + 1
            );
            let reason = reported
                .get(&format!("cap/{name}"))
                .with_context(|| format!("cap/{name} not reported: {reported:#?}"))?;
            ensure!(reason.contains("svc_v2"), "cap/{name}: {reason}");
            ensure!(
                find_status_service(&status, vip, 80, Proto::Tcp).is_none(),
                "{vip} must not be programmed"
            );
            let m = metric(&agent, "proxy_services_not_programmed")?;
            ensure!(
                m == (i + 1) as f64,
                "proxy_services_not_programmed {m}, want {}",
                i + 1
            );
            check_programmed(bed, &format!("after adding {name}"))?;
        }

        // a grows to three backends: the backends map is full, so a stays as it was.
        let g = agent.generation().unwrap_or(0);
        write(bed, "a", "198.18.101.70", &[80], &[p1, p2, p3])?;
        agent.wait_for_sync(g + 1, SYNC)?;
        let status = agent.status_json()?;
        let reported = np(&status);
        let reason = reported
            .get("cap/a")
            .with_context(|| format!("cap/a (grown) not reported: {reported:#?}"))?;
        ensure!(
            reason.contains("backends_v1") || reason.contains("svc_slots_v1"),
            "cap/a: {reason}"
        );
        let a = find_status_service(&status, "198.18.101.70", 80, Proto::Tcp)
            .context("a must stay programmed")?;
        ensure!(
            status_backends(a).len() == 2,
            "a must keep its two backends: {a:#}"
        );
        ensure!(metric(&agent, "proxy_services_not_programmed")? == 6.0);
        check_programmed(bed, "after a grew past capacity")?;
        let during = background.finish()?;
        let outcomes: Vec<Outcome> = during.into_iter().map(|t| t.outcome).collect();
        let tally = all_answered_by(
            "continuous traffic to a while the maps were full",
            &outcomes,
            &programmed_names,
        )?;

        // c goes: room for two frontends and four backends. a (already programmed) grows
        // first, then d and e in name order; f, g, h still wait.
        let g = agent.generation().unwrap_or(0);
        bed.remove_manifest("c.yaml")?;
        agent.wait_for_sync(g + 1, SYNC)?;
        let status = agent.status_json()?;
        let reported = np(&status);
        let want: BTreeSet<&str> = ["cap/f", "cap/g", "cap/h"].into();
        ensure!(
            reported.keys().map(String::as_str).collect::<BTreeSet<_>>() == want,
            "after removing c: {reported:#?}"
        );
        let a = find_status_service(&status, "198.18.101.70", 80, Proto::Tcp).context("a")?;
        ensure!(status_backends(a).len() == 3, "a grown: {a:#}");
        for vip in ["198.18.101.73", "198.18.101.74"] {
            let out = bed.pod_requests(&client.sock, Proto::Tcp, sa(vip, 80), 6, T)?;
            all_answered_by(&format!("{vip} once there is room"), &out, &["cap-3"])?;
        }
        let out = bed.pod_requests(&client.sock, Proto::Tcp, sa("198.18.101.70", 80), 30, T)?;
        all_answered_by("a after growing", &out, &["cap-1", "cap-2", "cap-3"])?;
        ensure!(metric(&agent, "proxy_services_not_programmed")? == 3.0);
        eprintln!(
            "full maps (4 frontends, 8 backends): 5 Services reported one by one past capacity, \
             a grown past capacity kept its old backends; continuous traffic meanwhile: {tally}; \
             after removing c: a grown, d and e programmed, {} still reported",
            reported.len()
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Conntrack LRU pressure
// ---------------------------------------------------------------------------------------------

/// What one stream worker saw.
struct StreamResult {
    backend: String,
    exchanges: u64,
    error: Option<String>,
    /// Longest time between the starts of two exchanges (or of the last one and the error):
    /// a stream is only as busy as its thread gets scheduled.
    longest_gap: Duration,
}

fn stream_worker(
    label: &str,
    mut s: EchoStream,
    stop: &AtomicBool,
    every: Duration,
    limit: Instant,
) -> StreamResult {
    let mut r = StreamResult {
        backend: s.backend.clone(),
        exchanges: 0,
        error: None,
        longest_gap: Duration::ZERO,
    };
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
        r.longest_gap = r.longest_gap.max(last.elapsed());
        last = Instant::now();
        if let Err(e) = s.exchange(&format!("{label}-{}", r.exchanges), T) {
            r.error = Some(format!("after {} exchanges: {e:#}", r.exchanges));
            return r;
        }
        r.exchanges += 1;
        // Sleep in small steps so that a stop is seen quickly.
        let until = Instant::now() + every;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            thread::sleep(every.min(Duration::from_millis(20)));
        }
    }
    r
}

/// Short connections to `to`, one after another, for `duration` (at least 1,000 and at most
/// `max`); stops after 5 failures in a row.
fn flood_loop(to: SocketAddr, duration: Duration, max: usize) -> Vec<Outcome> {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut failures_in_row = 0;
    while (out.len() < 1000 || started.elapsed() < duration)
        && out.len() < max
        && failures_in_row < 5
        && started.elapsed() < duration * 4
        && !tests::interrupted()
    {
        let r = tcp_request(to, T).map_err(|e| format!("{e:#}"));
        failures_in_row = if r.is_ok() { 0 } else { failures_in_row + 1 };
        out.push(r);
        thread::sleep(Duration::from_millis(1));
    }
    out
}

/// How long the flood of short connections lasts.
const FLOOD_FOR: Duration = Duration::from_secs(6);

/// A conntrack map of 1,024 entries (512 flows) with socket LB off, so every pod connection
/// takes the per-packet tc path with two conntrack entries per flow. Established streams
/// exchange a line every 20 ms (five), 200 ms, 1 s and 3 s (two each) while two threads open
/// short connections for 6 s (at least 2,000, typically near 10,000: the map turns over about
/// every 0.3 s). Not smaller: the kernel's LRU hands out free entries in per-CPU batches of 128,
/// so in a 256-entry map a reply entry written a moment ago can go before the backend's answer
/// comes back (seen: 200 ms streams reset once in several runs). Busy streams are looked up on
/// every packet, which refreshes them in the LRU; idle
/// ones are evicted, and must carry on all the same: their next packet finds the same backend
/// (the choice is a hash of the tuple) and records the flow again, and a forward packet due
/// for its entry's refresh (at most a second apart) puts back an evicted reply entry. Every
/// stream must survive.
#[test]
fn conntrack_pressure_keeps_established_streams() {
    with_bed(1, |bed| {
        const STREAM_VIP: &str = "198.18.101.50";
        const FLOOD_VIP: &str = "198.18.101.51";
        let mut names = Vec::new();
        let mut backends = Vec::new();
        for name in ["ct-a", "ct-b", "ct-c", "ct-d"] {
            let p = bed.add_pod(1, name)?;
            bed.start_echo_streams(&p, &[8080], &[], &[9000])?;
            names.push(name);
            backends.push(p);
        }
        let streamer = bed.add_pod(1, "streamer")?;
        let flooder = bed.add_pod(1, "flooder")?;
        let stream_svc =
            Service::cluster_ip("ct", "streams", STREAM_VIP).port("", 9000, 9000, Proto::Tcp);
        let flood_svc =
            Service::cluster_ip("ct", "flood", FLOOD_VIP).port("", 80, 8080, Proto::Tcp);
        let mut s1 = EndpointSlice::new("ct", "streams", "1").port("", 9000, Proto::Tcp);
        let mut s2 = EndpointSlice::new("ct", "flood", "1").port("", 8080, Proto::Tcp);
        for p in &backends {
            s1 = s1.endpoint(Endpoint::ready(&p.ip.to_string(), "node1"));
            s2 = s2.endpoint(Endpoint::ready(&p.ip.to_string(), "node1"));
        }
        bed.write_manifest(
            "ct.yaml",
            &tests::manifests::yaml_documents(&[
                stream_svc.to_value(),
                s1.to_value(),
                flood_svc.to_value(),
                s2.to_value(),
            ]),
        )?;
        let dir = bed.manifests_dir().to_path_buf();
        let agent = bed.start_agent_with(
            1,
            &dir,
            &["--socket-lb=false", "--map-size-conntrack", "1024"],
        )?;
        agent.wait_for_sync(1, SYNC)?;
        let status = agent.status_json()?;
        let ct = status["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == "ct_v2")
            .cloned()
            .unwrap_or_default();
        eprintln!("conntrack map before: {ct}");
        ensure!(
            find_status_service(&status, STREAM_VIP, 9000, Proto::Tcp).is_some()
                && find_status_service(&status, FLOOD_VIP, 80, Proto::Tcp).is_some(),
            "services not programmed: {status:#}"
        );

        let to = sa(STREAM_VIP, 9000);
        // (label, streams, exchange interval, asserted): the busy streams of the issue, and
        // slower ones whose entries the flood evicts.
        let groups: [(&str, usize, Duration, bool); 4] = [
            ("every 20 ms", 5, Duration::from_millis(20), true),
            ("every 200 ms", 2, Duration::from_millis(200), true),
            ("every 1 s", 2, Duration::from_secs(1), true),
            ("every 3 s", 2, Duration::from_secs(3), true),
        ];
        let streams: Vec<Vec<EchoStream>> = in_netns(&streamer.ns, || -> Result<_> {
            groups
                .iter()
                .map(|(_, n, _, _)| {
                    (0..*n)
                        .map(|_| EchoStream::connect(to, T))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()
        })??;
        for s in streams.iter().flatten() {
            ensure!(s.peer == to && names.contains(&s.backend.as_str()));
        }

        let stop = AtomicBool::new(false);
        let limit = Instant::now() + Duration::from_secs(120);
        let flood_to = sa(FLOOD_VIP, 80);
        let started = Instant::now();
        let (results, flood, flood_took) = thread::scope(|s| -> Result<_> {
            let stop = &stop;
            let workers: Vec<Vec<_>> = streams
                .into_iter()
                .zip(&groups)
                .enumerate()
                .map(|(g, (group, (_, _, every, _)))| {
                    group
                        .into_iter()
                        .enumerate()
                        .map(|(i, st)| {
                            let every = *every;
                            s.spawn(move || {
                                stream_worker(&format!("g{g}s{i}"), st, stop, every, limit)
                            })
                        })
                        .collect()
                })
                .collect();
            // Let the streams settle, then flood from two threads.
            thread::sleep(Duration::from_millis(500));
            let flood_started = Instant::now();
            let flooders: Vec<_> = (0..2)
                .map(|_| {
                    let ns = flooder.ns.clone();
                    s.spawn(move || in_netns(&ns, || flood_loop(flood_to, FLOOD_FOR, 6000)))
                })
                .collect();
            let mut flood = Vec::new();
            for f in flooders {
                flood.extend(f.join().expect("flood thread")?);
            }
            let flood_took = flood_started.elapsed();
            // The streams run on after the flood (the slowest exchange at least once more),
            // then stop.
            thread::sleep(Duration::from_secs(4));
            stop.store(true, Ordering::Relaxed);
            let results: Vec<Vec<StreamResult>> = workers
                .into_iter()
                .map(|g| {
                    g.into_iter()
                        .map(|w| w.join().expect("stream worker"))
                        .collect()
                })
                .collect();
            Ok((results, flood, flood_took))
        })?;
        let flood_tally = Tally::new(&flood);
        let status = agent.status_json()?;
        let ct = status["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == "ct_v2")
            .cloned()
            .unwrap_or_default();
        let broken = |v: &[StreamResult]| v.iter().filter(|r| r.error.is_some()).count();
        let describe = |v: &[StreamResult]| {
            v.iter()
                .map(|r| {
                    format!(
                        "{}: {} exchanges, longest gap {:?}{}",
                        r.backend,
                        r.exchanges,
                        r.longest_gap,
                        r.error
                            .as_ref()
                            .map(|e| format!(", BROKEN {e}"))
                            .unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n    ")
        };
        let mut report = format!(
            "conntrack pressure (ct_v2 capacity 1024 = 512 flows, tc path): {} short connections \
             in {flood_took:?} ({flood_tally}); {:?} in all; established streams broken:",
            flood.len(),
            started.elapsed()
        );
        for ((label, _, _, asserted), r) in groups.iter().zip(&results) {
            report.push_str(&format!(
                "\n  exchanging {label}{}: {} of {} broken\n    {}",
                if *asserted { " (asserted)" } else { "" },
                broken(r),
                r.len(),
                describe(r)
            ));
        }
        eprintln!(
            "{report}\nconntrack map after: {ct}\ncounters: {}",
            status["counters"]
        );
        ensure!(
            flood_tally.failures.is_empty(),
            "{} of {} short connections failed, e.g. {:?}",
            flood_tally.failures.len(),
            flood.len(),
            flood_tally.failures.first()
        );
        for ((label, _, _, asserted), r) in groups.iter().zip(&results) {
            ensure!(
                !asserted || broken(r) == 0,
                "{} of {} established streams exchanging {label} broke under conntrack \
                 pressure:\n    {}",
                broken(r),
                r.len(),
                describe(r)
            );
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Endpoint churn
// ---------------------------------------------------------------------------------------------

/// Unix time in µs of an RFC 3339 UTC timestamp as the agent logs it
/// (`2026-11-22T05:02:08.196533Z`).
fn parse_log_time(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().take(6).collect();
    let micros = digits.parse::<i64>().ok()? * 10_i64.pow(6 - digits.len() as u32);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + micros)
}

/// `(unix µs, services=, elapsed_us=)` of every `sync complete` line of the agent log.
fn sync_lines(log: &str) -> Vec<(i64, usize, i64)> {
    log.lines()
        .filter(|l| l.contains("sync complete"))
        .filter_map(|l| {
            let at = parse_log_time(l.split_whitespace().next()?)?;
            let field = |name: &str| -> Option<i64> {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))?
                    .parse()
                    .ok()
            };
            Some((at, field("services=")? as usize, field("elapsed_us=")?))
        })
        .collect()
}

/// A backend's absence: `pod` was removed by `change`, whose sync wrote the maps between
/// `began` and `from` (unix µs); it is written back at `until`.
struct Gone {
    pod: usize,
    change: usize,
    began: i64,
    from: i64,
    until: i64,
}

/// Churn: 6 backend pods, the EndpointSlice holds a window of 4 of them that moves by one at
/// every change (one removed, one added, always 4 ready), 20 changes a second, written
/// atomically to the manifests directory (agent polling every 20 ms). Meanwhile two threads in a
/// client pod make connections through the tc path (timed), and a process in the client pod
/// (its cgroup: socket LB) makes connections in batches.
///
/// To know which change each `sync complete` programmed, the same file carries a marker
/// Service whose number of ports is (change mod 16) + 1: the `services=` count of the sync line
/// names the change (with its time, unambiguously).
///
/// Asserts: every connection succeeds; no connection that started after the sync that removed
/// a backend, and ended before that backend was written back, reached it (connections started
/// earlier may still land on it: the in-flight window, counted and reported; so may a connection
/// whose SYN left late, which is why the end time bounds the window); the agent's VmRSS after
/// the run is at most 20 MiB above its value after warm-up.
#[test]
fn endpoint_churn_under_traffic() {
    let seconds: u64 = std::env::var("CHURN_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .clamp(2, 600);
    with_bed(1, |bed| {
        const VIP: &str = "198.18.101.60";
        const MARKER_VIP: &str = "198.18.101.61";
        const PERIOD: Duration = Duration::from_millis(50);
        // Marker values: a sync is attributed unambiguously while it reads the file less than
        // (MARKS - 1) periods after the write it programs.
        const MARKS: usize = 16;
        let mut pods = Vec::new();
        for i in 0..6 {
            let p = bed.add_pod(1, &format!("churn-{i}"))?;
            bed.start_echo(&p, &[8080], &[])?;
            pods.push(p);
        }
        let client = clients(bed)?;
        let subset = |k: usize| -> [usize; 4] { [k % 6, (k + 1) % 6, (k + 2) % 6, (k + 3) % 6] };
        let render = |k: usize| -> String {
            let svc = Service::cluster_ip("churn", "web", VIP).port("", 80, 8080, Proto::Tcp);
            let mut marker = Service::cluster_ip("churn", "marker", MARKER_VIP);
            for i in 0..(k % MARKS + 1) as u16 {
                marker = marker.port(&format!("m{i}"), 1000 + i, 8080, Proto::Tcp);
            }
            let mut slice = EndpointSlice::new("churn", "web", "1").port("", 8080, Proto::Tcp);
            for i in subset(k) {
                slice = slice.endpoint(Endpoint::ready(&pods[i].ip.to_string(), "node1"));
            }
            tests::manifests::yaml_documents(&[svc.to_value(), marker.to_value(), slice.to_value()])
        };
        // (change, unix µs when its write started)
        let mut writes: Vec<(usize, i64)> = vec![(0, now_us())];
        bed.write_manifest("churn.yaml", &render(0))?;
        let dir = bed.manifests_dir().to_path_buf();
        let agent = bed.start_agent_with(1, &dir, &["--poll-interval-ms", "20"])?;
        agent.wait_for_sync(1, SYNC)?;
        let to = sa(VIP, 80);
        let warm = in_netns(&client.tc.ns, || request_loop(Proto::Tcp, to, 20, T))?;
        all_answered_by(
            "before churn",
            &warm,
            &["churn-0", "churn-1", "churn-2", "churn-3"],
        )?;

        let traffic: Vec<Background> = (0..2)
            .map(|_| Background::start(&client.tc.ns, to, Duration::from_millis(3)))
            .collect();
        let changes = (seconds * 1000 / PERIOD.as_millis() as u64) as usize;
        let warmup = (changes / 6).max(20).min(changes);
        let mut rss_warm = None;
        let mut rss_max = 0;
        let start = Instant::now();
        // Meanwhile a process in another pod (in its cgroup: socket LB) makes connections in
        // batches of 100.
        let sock_stop = AtomicBool::new(false);
        let shared: &TestBed = bed;
        let sock_outcomes = thread::scope(|s| -> Result<Vec<Outcome>> {
            let sock = s.spawn(|| -> Result<Vec<Outcome>> {
                let mut out = Vec::new();
                while !sock_stop.load(Ordering::Relaxed) && !tests::interrupted() {
                    out.extend(shared.pod_requests(&client.sock, Proto::Tcp, to, 100, T)?);
                }
                Ok(out)
            });
            let churn = (|| -> Result<()> {
                for k in 1..=changes {
                    let due = start + PERIOD * k as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    tests::check_interrupted()?;
                    writes.push((k, now_us()));
                    shared.write_manifest("churn.yaml", &render(k))?;
                    if k % 20 == 0 {
                        let rss = vm_rss_kib(agent.pid)?;
                        rss_max = rss_max.max(rss);
                        if k >= warmup && rss_warm.is_none() {
                            rss_warm = Some(rss);
                        }
                    }
                    ensure!(agent.is_running(), "the agent exited during churn");
                }
                Ok(())
            })();
            sock_stop.store(true, Ordering::Relaxed);
            let sock = sock.join().expect("socket-LB traffic thread");
            churn?;
            sock
        })?;
        let churn_took = start.elapsed();
        // Let the last change be programmed, with traffic still flowing.
        let deadline = Instant::now() + Duration::from_secs(10);
        let last_services = changes % MARKS + 2;
        while sync_lines(&agent.log_text()).last().map(|s| s.1) != Some(last_services)
            || writes.last().map(|w| w.1).unwrap_or(0)
                > sync_lines(&agent.log_text())
                    .last()
                    .map(|s| s.0)
                    .unwrap_or(0)
        {
            ensure!(
                Instant::now() < deadline,
                "the last change was never synced"
            );
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(300));
        let mut requests: Vec<Timed> = Vec::new();
        for t in traffic {
            requests.extend(t.finish()?);
        }
        requests.sort_by_key(|r| r.start);
        let rss_end = vm_rss_kib(agent.pid)?;
        let rss_warm = rss_warm.context("no RSS sample after warm-up")?;

        // Which change each sync programmed.
        let syncs = sync_lines(&agent.log_text());
        // (log time, start of the sync) of the first sync that programmed each change
        let mut synced_at: Vec<Option<(i64, i64)>> = vec![None; changes + 1];
        let mut latencies = Vec::new();
        for &(at, services, elapsed) in &syncs {
            ensure!(
                (2..=MARKS + 1).contains(&services),
                "sync line with services={services}"
            );
            // The file was read before the sync began writing the maps.
            let read_by = at - elapsed;
            let residue = services - 2;
            let Some(&(k, w)) = writes
                .iter()
                .rev()
                .find(|(k, w)| *w <= read_by && k % MARKS == residue)
            else {
                bail!("a sync at {at} with services={services} matches no change");
            };
            // (Change 0 was written before the agent started.)
            ensure!(
                k == 0 || read_by - w < (MARKS as i64 - 1) * PERIOD.as_micros() as i64,
                "sync at {at} (began {elapsed} µs earlier) of change {k} read the file {} ms \
                 after its write: the marker is ambiguous",
                (read_by - w) / 1000
            );
            for slot in synced_at.iter_mut().take(k + 1) {
                if slot.is_none() {
                    *slot = Some((at, at - elapsed));
                }
            }
        }
        for (k, w) in &writes {
            if let Some(Some((s, _))) = synced_at.get(*k) {
                latencies.push(Duration::from_micros((s - w).max(0) as u64));
            }
        }
        latencies.sort();
        let unsynced = synced_at.iter().filter(|s| s.is_none()).count();
        ensure!(unsynced == 0, "{unsynced} changes were never synced");

        // Windows in which each backend must not be reached: from the sync of its removal to
        // the write that adds it back.
        let mut gone: Vec<Gone> = Vec::new();
        for (k, synced) in synced_at.iter().enumerate().skip(1) {
            for p in subset(k - 1) {
                if subset(k).contains(&p) {
                    continue;
                }
                let (from, began) = synced.expect("checked above");
                let until = (k + 1..=changes)
                    .find(|j| subset(*j).contains(&p))
                    .map(|j| writes[j].1)
                    .unwrap_or(i64::MAX);
                gone.push(Gone {
                    pod: p,
                    change: k,
                    began,
                    from,
                    until,
                });
            }
        }
        let pod_index: BTreeMap<String, usize> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let mut violations = Vec::new();
        let mut in_flight = 0usize;
        let mut straddling = 0usize;
        let mut failures = Vec::new();
        let mut failures_across_removal = 0;
        let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
        for req in &requests {
            let at = &req.start;
            let r = match &req.outcome {
                Ok(r) => r,
                Err(e) => {
                    // Was a removal programmed while this connection was open? The map writes
                    // happen while the sync runs: between its start and its log line.
                    let overlapping = gone
                        .iter()
                        .find(|g| g.began - 1_000 <= req.end && req.start <= g.from);
                    if overlapping.is_some() {
                        failures_across_removal += 1;
                    }
                    let nearest = overlapping
                        .or_else(|| gone.iter().min_by_key(|g| (g.from - req.start).abs()));
                    failures.push(format!(
                        "started at {at}, failed after {} µs: {e}{}",
                        req.end - req.start,
                        nearest
                            .map(|g| format!(
                                "; {} removal: {} (change {}) synced from {:+} to {:+} µs \
                                 from its start",
                                if overlapping.is_some() {
                                    "overlapping"
                                } else {
                                    "nearest"
                                },
                                pods[g.pod].name,
                                g.change,
                                g.began - req.start,
                                g.from - req.start
                            ))
                            .unwrap_or_default()
                    ));
                    continue;
                }
            };
            *per_backend.entry(r.backend.clone()).or_default() += 1;
            let p = *pod_index
                .get(&r.backend)
                .with_context(|| format!("unknown backend {}", r.backend))?;
            for &Gone {
                pod: gp,
                from,
                until,
                change: k,
                ..
            } in &gone
            {
                if gp != p || *at >= until {
                    continue;
                }
                if *at >= from && req.end >= until {
                    // Started in the window but ended after the backend was written back: its
                    // SYN may have left late (a busy CPU, a retransmission), so it proves
                    // nothing either way.
                    straddling += 1;
                } else if *at >= from {
                    // The last earlier connection from the same client port, if any: a
                    // conntrack entry of the same 5-tuple may have been reused.
                    let same_port = requests
                        .iter()
                        .take_while(|o| o.start < req.start)
                        .filter_map(|o| o.outcome.as_ref().ok().map(|x| (o.start, x)))
                        .filter(|(_, x)| x.local == r.local)
                        .last()
                        .map(|(t, x)| format!("{} at {t}", x.backend));
                    violations.push(format!(
                        "request from {} started at {at}, {} µs after the sync of change {k} \
                         (removing {}), took {} µs and reached it; its write was at {}; the \
                         client port's previous connection: {same_port:?}",
                        r.local,
                        at - from,
                        r.backend,
                        req.end - req.start,
                        writes[k].1
                    ));
                } else if *at >= writes[k].1 {
                    in_flight += 1;
                }
            }
        }
        // Connections that took longer than 200 ms (a lost SYN is retransmitted after 1 s).
        let slow: Vec<i64> = requests
            .iter()
            .filter(|r| r.outcome.is_ok() && r.end - r.start > 200_000)
            .map(|r| (r.end - r.start) / 1000)
            .collect();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len().saturating_sub(1)) as f64 * p).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        eprintln!(
            "endpoint churn: {changes} changes in {churn_took:?} ({} syncs logged); \
             write->programmed p50 {:?} p99 {:?} max {:?}; {} connections, {} failed ({} of them \
             open while a sync removing a backend ran), answered {per_backend:?}; {in_flight} reached a \
             backend whose removal was written but not yet synced (allowed); {} reached a backend \
             after its removal was synced ({straddling} more started after it but ended after the \
             backend was written back: not counted); {} connections took over 200 ms ({slow:?} \
             ms); agent VmRSS after warm-up {rss_warm} KiB, max sampled \
             {rss_max} KiB, at the end {rss_end} KiB; datapath counters {}",
            syncs.len(),
            pct(0.5),
            pct(0.99),
            latencies.last().copied().unwrap_or_default(),
            requests.len(),
            failures.len(),
            failures_across_removal,
            violations.len(),
            slow.len(),
            agent.status_json()?["counters"]
        );
        for v in violations.iter().take(10) {
            eprintln!("  after its removal: {v}");
        }
        for f in failures.iter().take(10) {
            eprintln!("  failed: {f}");
        }
        let sock_tally = Tally::new(&sock_outcomes);
        eprintln!(
            "endpoint churn, from a pod process (socket LB, connect() straight to a backend): \
             {sock_tally}"
        );
        ensure!(
            sock_tally.failures.is_empty(),
            "socket LB: {} of {} connections failed, e.g. {:?}",
            sock_tally.failures.len(),
            sock_tally.total(),
            &sock_tally.failures[..sock_tally.failures.len().min(5)]
        );
        ensure!(
            failures.is_empty(),
            "{} of {} connections failed while at least one backend was ready, e.g. {:?}",
            failures.len(),
            requests.len(),
            &failures[..failures.len().min(20)]
        );
        ensure!(
            violations.is_empty(),
            "{} connections reached a backend after its removal was synced, e.g. {:?}",
            violations.len(),
            &violations[..violations.len().min(5)]
        );
        ensure!(
            rss_end <= rss_warm + 20 * 1024,
            "agent VmRSS grew from {rss_warm} KiB after warm-up to {rss_end} KiB"
        );
        let status = agent.status_json()?;
        let svc = find_status_service(&status, VIP, 80, Proto::Tcp).context("churn/web")?;
        let want: BTreeSet<String> = subset(changes)
            .iter()
            .map(|i| pods[*i].ip.to_string())
            .collect();
        let got: BTreeSet<String> = status_backends(svc).into_iter().map(|b| b.0).collect();
        ensure!(got == want, "final backends {got:?}, want {want:?}");
        Ok(())
    });
}

#[test]
fn log_times_parse() {
    assert_eq!(parse_log_time("1970-01-01T00:00:00.000001Z"), Some(1));
    assert_eq!(
        parse_log_time("2026-11-22T05:02:08.196533Z"),
        Some(1_795_323_728_196_533)
    );
    assert_eq!(
        parse_log_time("2000-03-01T00:00:00Z"),
        Some(951_868_800_000_000)
    );
    assert_eq!(
        sync_lines(
            "2026-11-22T05:02:08.196533Z  INFO proxy_agent::run: sync complete generation=1 services=2 backends=8 writes=20 deletes=0 failed=0 elapsed_us=321\n"
        ),
        vec![(1_795_323_728_196_533, 2, 321)]
    );
}

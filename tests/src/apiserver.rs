//! A small, in-process Kubernetes API server for tests: it serves the list and
//! watch endpoints that the agent's kube source (kube-rs `Api::all` +
//! `kube::runtime::watcher`) uses, over plain HTTP/1.1, with the semantics of
//! kube-apiserver backed by etcd.
//!
//! What it implements:
//! - Resources: v1 `services`, `endpoints`, `nodes` and `discovery.k8s.io/v1`
//!   `endpointslices`; cluster-wide collections, namespaced collections and GET
//!   of a single object. Any other path answers 404 with a `Status` object.
//! - One global, monotonically increasing resourceVersion (as etcd's revision);
//!   every object carries its own `metadata.resourceVersion`, `uid` and
//!   `creationTimestamp`. Replacing an object with identical content is a no-op
//!   (no new resourceVersion, no event), as in the real apiserver.
//! - LIST: `limit` + `continue` pagination with consistent snapshots (a
//!   continued list sees the store as of the first page's resourceVersion; the
//!   token is the apiserver's format, base64 of `{"v","rv","start"}`; a token
//!   older than the retained history gets 410 Expired), `resourceVersion` +
//!   `resourceVersionMatch` (`NotOlderThan`, `Exact`), `labelSelector`
//!   (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (..)`, `k notin (..)`) and
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`, with `=`, `==`, `!=`).
//!   As in the real apiserver, list items carry no `apiVersion`/`kind`.
//! - WATCH (`watch=true|1`): newline-delimited JSON events in a chunked
//!   `application/json` response. `resourceVersion` unset/"0" sends synthetic
//!   ADDED events for the current state first; `resourceVersion=N` replays the
//!   events after N from a bounded history (10,000 events), then streams live.
//!   A version older than the history gets one `ERROR` event (410 Expired,
//!   "too old resource version") and the stream ends. With selectors, objects
//!   moving in/out of the selection are sent as ADDED/DELETED (as the watch
//!   cache does). `allowWatchBookmarks` sends BOOKMARK events every
//!   [`ApiServer::set_bookmark_interval`] (default 1 s); `sendInitialEvents=true`
//!   (with `resourceVersionMatch=NotOlderThan`, as kube-rs' streaming lists
//!   send it) ends the initial events with a bookmark annotated
//!   `k8s.io/initial-events-end: "true"`; `timeoutSeconds` ends the stream
//!   cleanly (default 1800 s).
//! - Fault injection: cut watch streams mid-chunk, compact the history,
//!   answer 503 to everything, restart the listener; request counters.
//!
//! What it does not implement: authentication/authorization (no TLS, any
//! client is admitted), writes over HTTP (POST/PUT/PATCH/DELETE answer 405;
//! the store is changed through [`ApiServer::apply`]/[`ApiServer::delete`]) except
//! for `events.k8s.io/v1` Events, which clients create (POST, 409 when the name
//! exists) and update with a JSON merge patch (PATCH, 404 when it does not), as a
//! recorder does,
//! server-side apply and field managers, admission, defaulting and validation
//! of objects, finalizers and graceful deletion, generation/status
//! subresources, protobuf/table output, discovery documents (`/api`, `/apis`),
//! HTTP/2 and gzip. A LIST with `resourceVersion` newer than the store answers
//! 504 at once (the real apiserver waits a few seconds first); a WATCH from a
//! future version just waits for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

/// Events kept for watches that resume from a resourceVersion.
const HISTORY: usize = 10_000;
/// Server-side watch timeout when the client sends no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A resource type served by the test apiserver.
struct ResourceType {
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
}

const RESOURCES: &[ResourceType] = &[
    ResourceType {
        api_version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
    },
    ResourceType {
        api_version: "v1",
        kind: "Endpoints",
        plural: "endpoints",
        namespaced: true,
    },
    ResourceType {
        api_version: "v1",
        kind: "Node",
        plural: "nodes",
        namespaced: false,
    },
    ResourceType {
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
    },
    ResourceType {
        api_version: "events.k8s.io/v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
    },
];

/// Store key: (resource index, namespace ("" when cluster-scoped), name); the
/// order is etcd's key order within one resource.
type Key = (usize, String, String);

#[derive(Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change of the store, as etcd's watch reports it.
struct Event {
    rv: u64,
    key: Key,
    kind: EventType,
    /// The object after the change (for DELETED: its last state, with the deletion's rv).
    object: Arc<Value>,
    /// The object before the change (None for ADDED); used to rebuild older snapshots.
    prev: Option<Arc<Value>>,
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    /// Every event with rv > `compacted`, oldest first, at most [`HISTORY`].
    history: VecDeque<Arc<Event>>,
    compacted: u64,
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Arc<Event>>,
    /// Bumped to cut every open watch stream.
    watch_gen: watch::Sender<u64>,
    /// Bumped to close every open connection.
    conn_gen: watch::Sender<u64>,
    unavailable: AtomicBool,
    bookmark_ms: AtomicU64,
    /// Request counts by path: [list/get, watch].
    counts: Mutex<HashMap<String, [usize; 2]>>,
}

impl Shared {
    /// Creates or replaces the object identified by (apiVersion/kind, namespace,
    /// name) and returns its new resourceVersion; emits ADDED or MODIFIED. A
    /// namespaced object without namespace goes to "default". Replacing with
    /// identical content changes nothing and returns the current version.
    /// Panics on an object of an unknown kind or without a name.
    fn apply(&self, mut obj: Value) -> String {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let res = RESOURCES
            .iter()
            .position(|r| r.api_version == api_version && r.kind == kind)
            .unwrap_or_else(|| {
                panic!("apiserver: unsupported apiVersion/kind {api_version}/{kind}")
            });
        let name = obj["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| panic!("apiserver: {kind} without metadata.name"))
            .to_string();
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        let namespace = if RESOURCES[res].namespaced {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_string();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (res, namespace, name);

        let mut store = lock(&self.store);
        let prev = store.objects.get(&key).cloned();
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        match &prev {
            Some(p) => {
                // A replace keeps the identity of the object.
                for field in ["uid", "creationTimestamp"] {
                    meta.insert(field.into(), p["metadata"][field].clone());
                }
                meta.insert(
                    "resourceVersion".into(),
                    p["metadata"]["resourceVersion"].clone(),
                );
                if **p == obj {
                    return store.rv.to_string();
                }
            }
            None => {
                if !meta.get("uid").is_some_and(Value::is_string) {
                    meta.insert("uid".into(), json!(new_uid()));
                }
                if !meta.get("creationTimestamp").is_some_and(Value::is_string) {
                    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
                }
            }
        }
        let rv = store.rv + 1;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        let obj = Arc::new(obj);
        store.objects.insert(key.clone(), obj.clone());
        self.record(&mut store, rv, key, kind, obj, prev);
        rv.to_string()
    }

    /// The object as stored (with apiVersion/kind), if present.
    fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let res = resource_by_kind(kind)?;
        let ns = if RESOURCES[res].namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        let store = lock(&self.store);
        let key = (res, ns.to_string(), name.to_string());
        store.objects.get(&key).map(|o| (**o).clone())
    }

    fn record(
        &self,
        store: &mut Store,
        rv: u64,
        key: Key,
        kind: EventType,
        object: Arc<Value>,
        prev: Option<Arc<Value>>,
    ) {
        store.rv = rv;
        let event = Arc::new(Event {
            rv,
            key,
            kind,
            object,
            prev,
        });
        store.history.push_back(event.clone());
        while store.history.len() > HISTORY {
            let old = store.history.pop_front().expect("non-empty history");
            store.compacted = old.rv;
        }
        // Sent under the store lock: the channel's order is the rv order.
        let _ = self.events.send(event);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Command {
    Restart(std::sync::mpsc::Sender<anyhow::Result<()>>),
    Shutdown,
}

/// A test Kubernetes API server on its own thread and tokio runtime. Dropping it
/// stops the server and closes every connection.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    cmd: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Adds or replaces an object (by apiVersion, kind, namespace and name) as a
    /// client's write would: a new uid and creationTimestamp for a new object, a
    /// new resourceVersion and a watch event when anything changed. Returns the
    /// store's resourceVersion. Panics on a kind it does not serve.
    pub fn apply(&self, obj: Value) -> String {
        self.shared.apply(obj)
    }

    /// The object as stored (with apiVersion/kind), if present.
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.shared.get(kind, namespace, name)
    }

    /// Every stored object of `kind` (e.g. the Events clients created), in key order.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let Some(res) = resource_by_kind(kind) else {
            return Vec::new();
        };
        let store = lock(&self.shared.store);
        store
            .objects
            .iter()
            .filter(|((r, _, _), _)| *r == res)
            .map(|(_, o)| (**o).clone())
            .collect()
    }

    /// Starts the server on its own thread with its own tokio runtime, listening on
    /// `bind` (e.g. `127.0.0.1:0`). With `netns` = Some(name) the thread first
    /// enters `/run/netns/<name>`, so the listening socket lives in that namespace.
    pub fn start(netns: Option<&str>, bind: SocketAddr) -> anyhow::Result<ApiServer> {
        let (events, _) = broadcast::channel(HISTORY + 1024);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted: 1,
            }),
            events,
            watch_gen: watch::channel(0).0,
            conn_gen: watch::channel(0).0,
            unavailable: AtomicBool::new(false),
            bookmark_ms: AtomicU64::new(1000),
            counts: Mutex::new(HashMap::new()),
        });
        let netns_path = netns.map(|n| format!("/run/netns/{n}"));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || server_thread(thread_shared, netns_path, bind, cmd_rx, ready_tx))
            .context("spawning the apiserver thread")?;
        let addr = match ready_rx.recv() {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("apiserver thread died during start"),
        };
        Ok(ApiServer {
            shared,
            addr,
            cmd: cmd_tx,
            thread: Some(thread),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context points at this server (no auth).
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\n\
             current-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (for watches
    /// started after the call). Default 1 s.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.shared.bookmark_ms.store(ms, Ordering::Relaxed);
    }

    /// Applies every document of a (multi-document) YAML string. Panics on invalid YAML
    /// or an object [`ApiServer::apply`] refuses.
    pub fn apply_yaml(&self, yaml: &str) {
        use serde::Deserialize as _;
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = Value::deserialize(doc).expect("apiserver: invalid YAML document");
            if !value.is_null() {
                self.apply(value);
            }
        }
    }

    /// Deletes an object; `kind` is the kind or plural ("Service", "services"),
    /// `namespace` None means "default" for namespaced kinds. Emits DELETED with
    /// the object's last state and a new resourceVersion. False when absent.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let Some(res) = resource_by_kind(kind) else {
            return false;
        };
        let ns = if RESOURCES[res].namespaced {
            namespace.unwrap_or("default").to_string()
        } else {
            String::new()
        };
        let key = (res, ns, name.to_string());
        let mut store = lock(&self.shared.store);
        let Some(prev) = store.objects.remove(&key) else {
            return false;
        };
        let rv = store.rv + 1;
        let mut last = (*prev).clone();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.shared.record(
            &mut store,
            rv,
            key,
            EventType::Deleted,
            Arc::new(last),
            Some(prev),
        );
        true
    }

    /// The store's current resourceVersion.
    pub fn resource_version(&self) -> String {
        lock(&self.shared.store).rv.to_string()
    }

    /// Abruptly cuts every open watch stream: the connection is closed mid-stream,
    /// without the final chunk.
    pub fn drop_watches(&self) {
        self.shared.watch_gen.send_modify(|g| *g += 1);
    }

    /// Forgets the event history, as an etcd compaction: a watch resuming from any
    /// older resourceVersion (and a list continue token) gets 410 Expired.
    pub fn compact(&self) {
        let mut store = lock(&self.shared.store);
        store.history.clear();
        store.compacted = store.rv;
    }

    /// While down, every request gets 503 and open watches are cut.
    pub fn set_unavailable(&self, down: bool) {
        self.shared.unavailable.store(down, Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    /// Stops the listener, closes every connection and listens again on the same
    /// address, keeping the store (resourceVersions continue).
    pub fn restart(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.cmd
            .send(Command::Restart(tx))
            .expect("apiserver thread is running");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("apiserver restart timed out")
            .expect("apiserver restart failed");
    }

    /// Requests (any kind) whose path starts with `path_prefix`.
    pub fn request_count(&self, path_prefix: &str) -> usize {
        lock(&self.shared.counts)
            .iter()
            .filter(|(p, _)| p.starts_with(path_prefix))
            .map(|(_, c)| c[0] + c[1])
            .sum()
    }

    /// Non-watch GET requests (lists, or gets of one object) on exactly `path`.
    pub fn list_count(&self, path: &str) -> usize {
        lock(&self.shared.counts).get(path).map_or(0, |c| c[0])
    }

    /// Watch requests on exactly `path`.
    pub fn watch_count(&self, path: &str) -> usize {
        lock(&self.shared.counts).get(path).map_or(0, |c| c[1])
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.cmd.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn resource_by_kind(kind: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.kind.eq_ignore_ascii_case(kind) || r.plural.eq_ignore_ascii_case(kind))
}

// ---------------------------------------------------------------------------
// Server thread, listener and connections

fn server_thread(
    shared: Arc<Shared>,
    netns: Option<String>,
    bind: SocketAddr,
    mut cmd: mpsc::UnboundedReceiver<Command>,
    ready: std::sync::mpsc::Sender<anyhow::Result<SocketAddr>>,
) {
    let setup = || -> anyhow::Result<tokio::runtime::Runtime> {
        if let Some(path) = &netns {
            let f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {path}"))?;
        }
        // One thread: every socket (also after restart) is made in this thread's namespace.
        Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?)
    };
    let rt = match setup() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let listener = match listen(bind) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let _ = ready.send(Ok(addr));
        let mut acceptor = tokio::spawn(accept_loop(listener, shared.clone()));
        while let Some(c) = cmd.recv().await {
            match c {
                Command::Restart(reply) => {
                    acceptor.abort();
                    let _ = (&mut acceptor).await;
                    shared.conn_gen.send_modify(|g| *g += 1);
                    tokio::task::yield_now().await;
                    match listen(addr) {
                        Ok(l) => {
                            acceptor = tokio::spawn(accept_loop(l, shared.clone()));
                            let _ = reply.send(Ok(()));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Command::Shutdown => break,
            }
        }
        acceptor.abort();
        shared.conn_gen.send_modify(|g| *g += 1);
    });
}

fn listen(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket.listen(1024)?)
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut gone = shared.conn_gen.subscribe();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = gone.changed() => {} // restart/shutdown: drop the connection
            }
        });
    }
}

// ---------------------------------------------------------------------------
// HTTP handling

type Body = BoxBody<Bytes, std::io::Error>;

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    resp
}

fn status_value(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_value(code.as_u16(), reason, message, None))
}

fn not_found() -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &status_value(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        ),
    )
}

fn bad_request(message: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "BadRequest", message)
}

/// A parsed API path.
struct Route {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let res = RESOURCES
        .iter()
        .position(|r| r.api_version == gv && r.plural == plural)?;
    let namespaced = RESOURCES[res].namespaced;
    // Namespaced objects are only addressable inside a namespace; cluster-scoped
    // resources have no namespaced paths.
    if (namespace.is_some() && !namespaced) || (name.is_some() && namespaced && namespace.is_none())
    {
        return None;
    }
    if [namespace, name].iter().flatten().any(|s| s.is_empty()) {
        return None;
    }
    Some(Route {
        res,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    })
}

fn parse_bool(v: Option<&String>) -> bool {
    matches!(
        v.map(String::as_str),
        Some("1" | "t" | "T" | "true" | "True" | "TRUE")
    )
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let is_watch = parse_bool(query.get("watch"));
    lock(&shared.counts).entry(path.clone()).or_default()[usize::from(is_watch)] += 1;

    if shared.unavailable.load(Ordering::SeqCst) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    match path.as_str() {
        "/healthz" | "/readyz" | "/livez" => {
            let mut resp =
                Response::new(Full::new(Bytes::from("ok")).map_err(|n| match n {}).boxed());
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return resp;
        }
        "/version" => {
            return json_response(
                StatusCode::OK,
                &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-test", "platform": "linux/amd64"}),
            );
        }
        _ => {}
    }
    let Some(route) = route(&path) else {
        return not_found();
    };
    if RESOURCES[route.res].kind == "Event"
        && (req.method() == Method::POST || req.method() == Method::PATCH)
    {
        return write_event(shared, route, req).await;
    }
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!(
                "the test apiserver does not allow {} on this resource",
                req.method()
            ),
        );
    }
    let sel = match Selectors::parse(&query) {
        Ok(s) => s,
        Err(msg) => return bad_request(&msg),
    };
    if let Some(name) = &route.name {
        if is_watch {
            return bad_request(
                "watch of a single object by path is not supported; use fieldSelector=metadata.name",
            );
        }
        return get_one(shared, &route, name);
    }
    if is_watch {
        start_watch(shared, &route, sel, &query)
    } else {
        list(shared, &route, &sel, &query)
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// POST (create) or PATCH (merge patch) of an Event: what an event recorder does.
async fn write_event(shared: &Arc<Shared>, route: Route, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad_request(&format!("reading the body: {e}")),
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(&format!("the body is not JSON: {e}")),
    };
    let ns = route.namespace.clone().unwrap_or_default();
    let server = shared;
    let (obj, code) = if method == Method::POST {
        if route.name.is_some() {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "POST to a collection",
            );
        }
        let Some(name) = body["metadata"]["name"].as_str().map(str::to_string) else {
            return bad_request("metadata.name is required");
        };
        if server.get("Event", Some(&ns), &name).is_some() {
            return error(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("events.events.k8s.io \"{name}\" already exists"),
            );
        }
        let mut obj = body;
        obj["apiVersion"] = json!("events.k8s.io/v1");
        obj["kind"] = json!("Event");
        obj["metadata"]["namespace"] = json!(ns);
        (obj, StatusCode::CREATED)
    } else {
        let Some(name) = route.name.clone() else {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "PATCH of a collection",
            );
        };
        let Some(mut obj) = server.get("Event", Some(&ns), &name) else {
            return error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("events.events.k8s.io \"{name}\" not found"),
            );
        };
        merge_patch(&mut obj, &body);
        (obj, StatusCode::OK)
    };
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    server.apply(obj);
    match server.get("Event", Some(&ns), &name) {
        Some(stored) => json_response(code, &stored),
        None => not_found(),
    }
}

fn get_one(shared: &Shared, route: &Route, name: &str) -> Response<Body> {
    let key = (
        route.res,
        route.namespace.clone().unwrap_or_default(),
        name.to_string(),
    );
    let store = lock(&shared.store);
    match store.objects.get(&key) {
        Some(obj) => json_response(StatusCode::OK, obj),
        None => {
            let plural = RESOURCES[route.res].plural;
            let group = RESOURCES[route.res]
                .api_version
                .rsplit_once('/')
                .map_or("", |(g, _)| g);
            let mut details = json!({"name": name, "kind": plural});
            if !group.is_empty() {
                details["group"] = json!(group);
            }
            json_response(
                StatusCode::NOT_FOUND,
                &status_value(
                    404,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                    Some(details),
                ),
            )
        }
    }
}

// ---------------------------------------------------------------------------
// LIST

fn list(
    shared: &Shared,
    route: &Route,
    sel: &Selectors,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let rt = &RESOURCES[route.res];
    let limit: usize = match query.get("limit").map(|l| l.parse::<i64>()) {
        None => 0,
        Some(Ok(l)) => usize::try_from(l.max(0)).unwrap_or(0),
        Some(Err(_)) => return bad_request("limit: invalid value"),
    };
    let rv_param = query.get("resourceVersion").filter(|v| !v.is_empty());
    let rv_match = query.get("resourceVersionMatch").filter(|v| !v.is_empty());

    let store = lock(&shared.store);
    // (snapshot rv, start after this (namespace, name))
    let (list_rv, start) = if let Some(token) = query.get("continue").filter(|c| !c.is_empty()) {
        if rv_param.is_some_and(|v| v != "0") || rv_match.is_some() {
            return bad_request("specifying resource version is not allowed when using continue");
        }
        let Some((rv, start)) = decode_continue(token) else {
            return bad_request("continue key is not valid");
        };
        if rv < store.compacted {
            return error(
                StatusCode::GONE,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            );
        }
        (rv, Some(start))
    } else {
        let requested = match rv_param.map(|v| v.parse::<u64>()) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => {
                return bad_request(&format!("invalid resource version: {}", rv_param.unwrap()));
            }
        };
        match (rv_match.map(String::as_str), requested) {
            (Some("Exact"), None | Some(0)) => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "resourceVersionMatch: Forbidden: resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                );
            }
            (Some("Exact"), Some(v)) if v < store.compacted => {
                return error(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {v} ({})", store.compacted + 1),
                );
            }
            (Some("Exact") | Some("NotOlderThan") | None, Some(v)) if v > store.rv => {
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!("Too large resource version: {v}, current: {}", store.rv),
                );
            }
            (Some("Exact"), Some(v)) => (v, None),
            (Some("NotOlderThan"), None) => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
                );
            }
            (Some("NotOlderThan") | None, _) => (store.rv, None),
            (Some(other), _) => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    &format!("resourceVersionMatch: Unsupported value: \"{other}\""),
                );
            }
        }
    };

    let snapshot = snapshot_at(&store, route.res, list_rv);
    drop(store);
    let mut matching = snapshot
        .into_iter()
        .filter(|((ns, name), _)| {
            route.namespace.as_ref().is_none_or(|n| n == ns)
                && start
                    .as_ref()
                    .is_none_or(|s| (ns.as_str(), name.as_str()) > (s.0.as_str(), s.1.as_str()))
        })
        .filter(|(_, obj)| sel.matches(obj))
        .peekable();
    let mut items = Vec::new();
    let mut last = None;
    for (key, obj) in matching.by_ref() {
        items.push(strip_type(&obj));
        if limit > 0 && items.len() == limit {
            last = Some(key);
            break;
        }
    }
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if let Some((ns, name)) = last
        && matching.peek().is_some()
    {
        metadata["continue"] = json!(encode_continue(list_rv, &ns, &name));
        if sel.is_empty() {
            metadata["remainingItemCount"] = json!(matching.count());
        }
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", rt.kind),
            "apiVersion": rt.api_version,
            "metadata": metadata,
            "items": items,
        }),
    )
}

/// The objects of one resource as of resourceVersion `rv` (>= store.compacted):
/// the current state with the later events undone.
fn snapshot_at(store: &Store, res: usize, rv: u64) -> BTreeMap<(String, String), Arc<Value>> {
    let mut objs: BTreeMap<(String, String), Arc<Value>> = store
        .objects
        .range((res, String::new(), String::new())..)
        .take_while(|(k, _)| k.0 == res)
        .map(|(k, v)| ((k.1.clone(), k.2.clone()), v.clone()))
        .collect();
    for ev in store.history.iter().rev().take_while(|e| e.rv > rv) {
        if ev.key.0 != res {
            continue;
        }
        let k = (ev.key.1.clone(), ev.key.2.clone());
        match &ev.prev {
            Some(p) => objs.insert(k, p.clone()),
            None => objs.remove(&k),
        };
    }
    objs
}

/// List items carry no apiVersion/kind in the real apiserver's JSON.
fn strip_type(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    o
}

/// The apiserver's continue token: base64url(JSON {"v","rv","start"}), start being
/// the key after which to continue, with a NUL appended.
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let start = if ns.is_empty() {
        format!("{name}\u{0}")
    } else {
        format!("{ns}/{name}\u{0}")
    };
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Option<(u64, (String, String))> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    if v["v"] != "meta.k8s.io/v1" {
        return None;
    }
    let rv = v["rv"].as_u64()?;
    let start = v["start"].as_str()?.strip_suffix('\u{0}')?;
    let (ns, name) = start.split_once('/').unwrap_or(("", start));
    Some((rv, (ns.to_string(), name.to_string())))
}

// ---------------------------------------------------------------------------
// WATCH

fn start_watch(
    shared: &Arc<Shared>,
    route: &Route,
    sel: Selectors,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let rt = &RESOURCES[route.res];
    let bookmarks = parse_bool(query.get("allowWatchBookmarks"));
    let send_initial = parse_bool(query.get("sendInitialEvents"));
    let rv_match = query.get("resourceVersionMatch").filter(|v| !v.is_empty());
    if send_initial {
        if rv_match.map(String::as_str) != Some("NotOlderThan") {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            );
        }
        if !bookmarks {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "allowWatchBookmarks: Required value: allowWatchBookmarks must be true when sendInitialEvents is set",
            );
        }
    } else if rv_match.is_some() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        );
    }
    let timeout = match query.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None | Some(Ok(0)) => DEFAULT_WATCH_TIMEOUT,
        Some(Ok(t)) => Duration::from_secs(t),
        Some(Err(_)) => return bad_request("timeoutSeconds: invalid value"),
    };
    let requested = match query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
    {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => return bad_request(&format!("invalid resource version: {v}")),
        },
    };

    // The first lines, the rv they bring the client to, and the live feed: taken
    // together under the store lock so that no event is missed or doubled.
    let mut lines: Vec<Bytes> = Vec::new();
    let store = lock(&shared.store);
    let feed = shared.events.subscribe();
    let mut last_rv = store.rv;
    match requested {
        Some(v) if !send_initial => {
            if v < store.compacted {
                let status = status_value(
                    410,
                    "Expired",
                    &format!("too old resource version: {v} ({})", store.compacted + 1),
                    None,
                );
                lines.push(event_line("ERROR", &status));
                drop(store);
                return watch_response(shared, lines, None);
            }
            let first = store.history.partition_point(|e| e.rv <= v);
            for ev in store.history.range(first..) {
                if let Some(line) = render_event(ev, route, &sel) {
                    lines.push(line);
                }
            }
            last_rv = last_rv.max(v);
        }
        _ => {
            let start = (
                route.res,
                route.namespace.clone().unwrap_or_default(),
                String::new(),
            );
            for (k, obj) in store
                .objects
                .range(start..)
                .take_while(|(k, _)| k.0 == route.res)
            {
                if route.namespace.as_ref().is_some_and(|n| *n != k.1) {
                    break;
                }
                if sel.matches(obj) {
                    lines.push(event_line("ADDED", obj));
                }
            }
            if send_initial {
                lines.push(bookmark_line(rt, last_rv, true));
            }
        }
    }
    drop(store);
    let watch = Watch {
        route: Route {
            res: route.res,
            namespace: route.namespace.clone(),
            name: None,
        },
        sel,
        bookmarks,
        timeout,
        last_rv,
        feed,
        interval: Duration::from_millis(shared.bookmark_ms.load(Ordering::Relaxed)),
    };
    watch_response(shared, lines, Some(watch))
}

struct Watch {
    route: Route,
    sel: Selectors,
    bookmarks: bool,
    timeout: Duration,
    /// Every event up to this rv has been sent (or filtered out).
    last_rv: u64,
    feed: broadcast::Receiver<Arc<Event>>,
    interval: Duration,
}

/// A chunked response: `lines` first, then (if `live`) the live events; ends cleanly
/// at the timeout and is cut mid-stream by [`ApiServer::drop_watches`].
fn watch_response(shared: &Arc<Shared>, lines: Vec<Bytes>, live: Option<Watch>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let kill = shared.watch_gen.subscribe();
    tokio::spawn(async move {
        for line in lines {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if let Some(w) = live {
            run_watch(w, tx).await;
        }
    });
    // The body: lines from the watch task until it ends (clean end of the chunked
    // response) or an error when the watches are dropped, on which hyper closes the
    // connection without the final chunk.
    let body = futures::stream::unfold((rx, kill, false), |(mut rx, mut kill, done)| async move {
        if done {
            return None;
        }
        tokio::select! {
            biased;
            _ = kill.changed() => Some((
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "watch dropped")),
                (rx, kill, true),
            )),
            line = rx.recv() => line.map(|l| (Ok(Frame::data(l)), (rx, kill, false))),
        }
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    resp
}

async fn run_watch(mut w: Watch, tx: mpsc::Sender<Bytes>) {
    let rt = &RESOURCES[w.route.res];
    let deadline = tokio::time::sleep(w.timeout);
    tokio::pin!(deadline);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + w.interval, w.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let line = tokio::select! {
            biased;
            _ = tx.closed() => return,
            _ = &mut deadline => return,
            ev = w.feed.recv() => match ev {
                Ok(ev) => {
                    if ev.rv <= w.last_rv {
                        continue;
                    }
                    w.last_rv = ev.rv;
                    match render_event(&ev, &w.route, &w.sel) {
                        Some(line) => line,
                        None => continue,
                    }
                }
                // Too slow a consumer: the apiserver closes such a watch.
                Err(_) => return,
            },
            _ = ticks.tick(), if w.bookmarks => bookmark_line(rt, w.last_rv, false),
        };
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark_line(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version, "metadata": metadata}),
    )
}

/// The line a watch on `route` with `sel` sends for `ev`, if any. Objects entering
/// the selection are ADDED, objects leaving it DELETED, as the watch cache does.
fn render_event(ev: &Event, route: &Route, sel: &Selectors) -> Option<Bytes> {
    if ev.key.0 != route.res || route.namespace.as_ref().is_some_and(|n| *n != ev.key.1) {
        return None;
    }
    let now = sel.matches(&ev.object);
    let before = ev.prev.as_ref().is_some_and(|p| sel.matches(p));
    let kind = match ev.kind {
        EventType::Deleted => before.then_some(EventType::Deleted),
        _ => match (before, now) {
            (true, true) => Some(EventType::Modified),
            (false, true) => Some(EventType::Added),
            (true, false) => Some(EventType::Deleted),
            (false, false) => None,
        },
    }?;
    Some(event_line(kind.as_str(), &ev.object))
}

// ---------------------------------------------------------------------------
// Selectors

enum LabelReq {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

enum FieldReq {
    Eq(String, String),
    Ne(String, String),
}

#[derive(Default)]
struct Selectors {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Selectors {
    fn parse(query: &HashMap<String, String>) -> Result<Selectors, String> {
        let mut s = Selectors::default();
        if let Some(ls) = query.get("labelSelector") {
            for term in split_terms(ls) {
                s.labels.push(parse_label_req(&term)?);
            }
        }
        if let Some(fs) = query.get("fieldSelector") {
            for term in split_terms(fs) {
                let (field, value, eq) = if let Some((f, v)) = term.split_once("!=") {
                    (f, v, false)
                } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('='))
                {
                    (f, v, true)
                } else {
                    return Err(format!("invalid field selector: {term}"));
                };
                let field = field.trim().to_string();
                if field != "metadata.name" && field != "metadata.namespace" {
                    return Err(format!("field label not supported: {field}"));
                }
                let value = value.trim().to_string();
                s.fields.push(if eq {
                    FieldReq::Eq(field, value)
                } else {
                    FieldReq::Ne(field, value)
                });
            }
        }
        Ok(s)
    }

    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let field = |f: &str| match f {
            "metadata.name" => obj["metadata"]["name"].as_str().unwrap_or(""),
            _ => obj["metadata"]["namespace"].as_str().unwrap_or(""),
        };
        self.labels.iter().all(|r| match r {
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::In(k, vs) => label(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|v| vs.iter().all(|x| x != v)),
        }) && self.fields.iter().all(|r| match r {
            FieldReq::Eq(f, v) => field(f) == v,
            FieldReq::Ne(f, v) => field(f) != v,
        })
    }
}

/// Splits a selector at the commas outside parentheses.
fn split_terms(s: &str) -> Vec<String> {
    let mut terms = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    terms.push(cur);
    terms
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_label_req(term: &str) -> Result<LabelReq, String> {
    let invalid = || format!("unable to parse requirement: invalid label selector term {term:?}");
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    if let Some(k) = term.strip_prefix('!') {
        let k = k.trim();
        return if valid_key(k) {
            Ok(LabelReq::NotExists(k.to_string()))
        } else {
            Err(invalid())
        };
    }
    for (op, negate) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = term.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) {
                return Err(invalid());
            }
            let vs = vec![v.to_string()];
            return Ok(if negate {
                LabelReq::NotIn(k.to_string(), vs)
            } else {
                LabelReq::In(k.to_string(), vs)
            });
        }
    }
    let mut words = term.splitn(2, char::is_whitespace);
    let k = words.next().unwrap_or_default();
    let rest = words.next().unwrap_or_default().trim();
    if !valid_key(k) {
        return Err(invalid());
    }
    if rest.is_empty() {
        return Ok(LabelReq::Exists(k.to_string()));
    }
    let (negate, set) = if let Some(s) = rest.strip_prefix("notin") {
        (true, s)
    } else if let Some(s) = rest.strip_prefix("in") {
        (false, s)
    } else {
        return Err(invalid());
    };
    let set = set
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(invalid)?;
    let vs: Vec<String> = set
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    Ok(if negate {
        LabelReq::NotIn(k.to_string(), vs)
    } else {
        LabelReq::In(k.to_string(), vs)
    })
}

// ---------------------------------------------------------------------------
// Small helpers

fn new_uid() -> String {
    let h = format!("{:032x}", rand::random::<u128>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Now as RFC 3339 in UTC with second precision, as metav1.Time serializes.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors() {
        let obj = json!({"metadata": {"name": "a", "namespace": "n", "labels": {"app": "web", "tier": "fe"}}});
        let m = |s: &str| {
            Selectors::parse(&q(&[("labelSelector", s)]))
                .unwrap()
                .matches(&obj)
        };
        assert!(m("app"));
        assert!(m("app=web,tier==fe"));
        assert!(!m("!app"));
        assert!(m("!missing"));
        assert!(m("app!=db"));
        assert!(!m("app!=web"));
        assert!(m("app in (db, web),tier notin (be)"));
        assert!(!m("app notin (web)"));
        assert!(m("missing!=x"));
        assert!(Selectors::parse(&q(&[("labelSelector", "app in web")])).is_err());
        let f = |s: &str| {
            Selectors::parse(&q(&[("fieldSelector", s)]))
                .unwrap()
                .matches(&obj)
        };
        assert!(f("metadata.name=a"));
        assert!(f("metadata.namespace!=x,metadata.name==a"));
        assert!(Selectors::parse(&q(&[("fieldSelector", "spec.type=x")])).is_err());
    }

    #[test]
    fn routes() {
        let r = route("/api/v1/services").unwrap();
        assert_eq!(
            (RESOURCES[r.res].kind, r.namespace, r.name),
            ("Service", None, None)
        );
        let r = route("/apis/discovery.k8s.io/v1/namespaces/x/endpointslices/y").unwrap();
        assert_eq!(RESOURCES[r.res].kind, "EndpointSlice");
        assert_eq!(
            (r.namespace.as_deref(), r.name.as_deref()),
            (Some("x"), Some("y"))
        );
        assert!(route("/api/v1/nodes/n1").is_some());
        assert!(route("/api/v1/namespaces/x/nodes").is_none());
        assert!(route("/api/v1/services/x").is_none());
        assert!(route("/api/v1/pods").is_none());
        assert!(route("/apis/discovery.k8s.io/v1beta1/endpointslices").is_none());
    }

    #[test]
    fn continue_token_roundtrip() {
        let t = encode_continue(42, "ns", "name");
        assert_eq!(
            decode_continue(&t),
            Some((42, ("ns".into(), "name".into())))
        );
        assert_eq!(decode_continue("garbage"), None);
    }

    #[test]
    fn timestamp_format() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }
}

//! The test apiserver (tests/src/apiserver.rs) driven by the real kube-rs client:
//! paginated lists, watcher + reflector, bookmarks, 410 relists, cut streams,
//! an unavailable and a restarted server. Loopback only, each test bounded in time.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tests::apiserver::ApiServer;

const LIMIT: Duration = Duration::from_secs(20);
const SERVICES: &str = "/api/v1/services";

fn server() -> ApiServer {
    ApiServer::start(None, "127.0.0.1:0".parse().unwrap()).expect("start apiserver")
}

fn client(s: &ApiServer) -> Client {
    Client::try_from(kube::Config::new(s.url().parse().unwrap())).expect("kube client")
}

fn svc(ns: &str, name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"clusterIP": "198.18.100.250", "ports": [{"name": "http", "port": port, "protocol": "TCP"}]},
    })
}

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test exceeded its time limit")
}

/// "ns/name" -> first port, of what a reflector store holds.
fn contents(store: &reflector::Store<Service>) -> BTreeMap<String, i32> {
    store
        .state()
        .iter()
        .map(|s| {
            let port = s
                .spec
                .as_ref()
                .and_then(|sp| sp.ports.as_ref())
                .map_or(0, |p| p[0].port);
            (
                format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
                port,
            )
        })
        .collect()
}

async fn converge(store: &reflector::Store<Service>, expected: &BTreeMap<String, i32>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = contents(store);
        if &got == expected {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("store did not converge:\n got      {got:?}\n expected {expected:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A reflector (watcher with kube's default backoff) running in the background.
fn spawn_reflector(api: Api<Service>) -> (reflector::Store<Service>, tokio::task::JoinHandle<()>) {
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    (reader, task)
}

/// Applies a service to the server and records it in `expected`.
fn put(s: &ApiServer, expected: &mut BTreeMap<String, i32>, ns: &str, name: &str, port: u16) {
    s.apply(svc(ns, name, port));
    expected.insert(format!("{ns}/{name}"), i32::from(port));
}

fn del(s: &ApiServer, expected: &mut BTreeMap<String, i32>, ns: &str, name: &str) {
    assert!(s.delete("Service", Some(ns), name));
    expected.remove(&format!("{ns}/{name}"));
}

fn api_error(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pagination_selectors_and_kubeconfig() {
    let s = server();
    for i in 0..1200u16 {
        let ns = ["ns-a", "ns-b", "ns-c"][usize::from(i % 3)];
        let mut obj = svc(ns, &format!("svc-{i:04}"), 1000 + i);
        obj["metadata"]["labels"]["parity"] = json!(if i % 2 == 0 { "even" } else { "odd" });
        s.apply(obj);
    }
    bounded(async {
        let kubeconfig = std::env::temp_dir().join(format!("apiserver-test-kubeconfig-{}", std::process::id()));
        s.write_kubeconfig(&kubeconfig).unwrap();
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
        let _ = std::fs::remove_file(&kubeconfig);
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        assert_eq!(config.cluster_url.to_string(), format!("{}/", s.url()));
        let client = Client::try_from(config).unwrap();
        let all: Api<Service> = Api::all(client.clone());

        // Pages of 500 from one consistent snapshot, even while the store changes.
        let mut lp = ListParams::default().limit(500);
        let mut names = Vec::new();
        let mut pages = 0;
        let mut list_rv = None;
        loop {
            let page = all.list(&lp).await.unwrap();
            pages += 1;
            let rv = page.metadata.resource_version.clone().expect("list resourceVersion");
            if pages == 1 {
                assert_eq!(rv, s.resource_version());
                assert_eq!(page.metadata.remaining_item_count, Some(700));
                s.apply(svc("other", "late", 80));
                assert!(s.delete("Service", Some("ns-c"), "svc-1199"));
            }
            assert_eq!(*list_rv.get_or_insert(rv.clone()), rv, "every page has the snapshot's version");
            names.extend(page.items.iter().map(|i| format!("{}/{}", i.namespace().unwrap(), i.name_any())));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(names.len(), 1200);
        assert!(names.contains(&"ns-c/svc-1199".to_string()), "deleted after the snapshot");
        assert!(!names.contains(&"other/late".to_string()), "created after the snapshot");
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, names, "etcd key order, no duplicates");

        // A new list sees the changes; typed objects round-trip.
        let fresh = all.list(&ListParams::default()).await.unwrap();
        assert_eq!(fresh.items.len(), 1200);
        assert_eq!(fresh.metadata.resource_version, Some(s.resource_version()));
        assert!(fresh.metadata.continue_.is_none());
        let first = &fresh.items[0];
        assert_eq!(first.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 1000);
        assert!(first.metadata.uid.is_some() && first.metadata.creation_timestamp.is_some());
        assert!(first.metadata.resource_version.is_some());

        // Namespaced lists, label and field selectors.
        let ns_a: Api<Service> = Api::namespaced(client.clone(), "ns-a");
        assert_eq!(ns_a.list(&ListParams::default()).await.unwrap().items.len(), 400);
        let count = |sel: &'static str| {
            let all = all.clone();
            async move { all.list(&ListParams::default().labels(sel)).await.unwrap().items.len() }
        };
        assert_eq!(count("parity=even").await, 600);
        assert_eq!(count("parity!=even").await, 600); // 599 odd + "late" without the label
        assert_eq!(count("!parity").await, 1);
        assert_eq!(count("parity in (odd),app").await, 599);
        assert_eq!(count("parity=even,app=svc-0004").await, 1);
        let by_name = all.list(&ListParams::default().fields("metadata.name=svc-0003")).await.unwrap();
        assert_eq!(by_name.items.len(), 1);
        let (code, reason) = api_error(all.list(&ListParams::default().fields("spec.type=x")).await.unwrap_err());
        assert_eq!((code, reason.as_str()), (400, "BadRequest"));
        let paged = all.list(&ListParams::default().labels("parity=odd").limit(250)).await.unwrap();
        assert_eq!(paged.items.len(), 250);
        assert!(paged.metadata.continue_.is_some());

        // Get, 404s, the other resources.
        assert_eq!(ns_a.get("svc-0000").await.unwrap().name_any(), "svc-0000");
        let (code, reason) = api_error(ns_a.get("nope").await.unwrap_err());
        assert_eq!((code, reason.as_str()), (404, "NotFound"));
        let (code, _) = api_error(Api::<Pod>::all(client.clone()).list(&ListParams::default()).await.unwrap_err());
        assert_eq!(code, 404);
        s.apply_yaml(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: ns-a\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nendpoints:\n- addresses: [\"198.19.9.1\"]\nports:\n- port: 8080\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: web\n  namespace: ns-a\n",
        );
        let slices = Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await
            .unwrap();
        assert_eq!(slices.items.len(), 1);
        assert_eq!(slices.items[0].endpoints.as_ref().unwrap()[0].addresses, vec!["198.19.9.1".to_string()]);
        let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await.unwrap();
        assert_eq!(nodes.items[0].name_any(), "node-1");
        assert_eq!(nodes.items[0].namespace(), None);
        assert_eq!(Api::<Endpoints>::all(client.clone()).list(&ListParams::default()).await.unwrap().items.len(), 1);
        assert_eq!(s.list_count(SERVICES), 12);
        // + 1 namespaced list, 2 gets, pods, nodes, endpoints and (under /apis) endpointslices
        assert_eq!(s.request_count("/api"), 19);
        assert_eq!(s.request_count("/apis/"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_and_reflector_follow_changes() {
    let s = server();
    let mut expected = BTreeMap::new();
    for i in 0..3 {
        put(&s, &mut expected, "default", &format!("web-{i}"), 80);
    }
    bounded(async {
        let api: Api<Service> = Api::all(client(&s));
        let (reader, writer) = reflector::store();
        let mut events =
            std::pin::pin!(reflector(writer, watcher(api, watcher::Config::default())));
        let mut next = async || {
            events
                .next()
                .await
                .expect("watcher stream ended")
                .expect("watcher error")
        };

        assert!(matches!(next().await, watcher::Event::Init));
        for i in 0..3 {
            match next().await {
                watcher::Event::InitApply(o) => assert_eq!(o.name_any(), format!("web-{i}")),
                other => panic!("expected InitApply, got {other:?}"),
            }
        }
        assert!(matches!(next().await, watcher::Event::InitDone));
        assert_eq!(contents(&reader), expected);
        assert_eq!((s.list_count(SERVICES), s.watch_count(SERVICES)), (1, 0));

        put(&s, &mut expected, "prod", "db", 5432);
        match next().await {
            watcher::Event::Apply(o) => {
                assert_eq!(
                    (o.namespace().as_deref(), o.name_any().as_str()),
                    (Some("prod"), "db")
                );
                assert_eq!(o.resource_version(), Some(s.resource_version()));
            }
            other => panic!("expected Apply, got {other:?}"),
        }
        put(&s, &mut expected, "default", "web-1", 8080);
        assert!(matches!(next().await, watcher::Event::Apply(o) if o.name_any() == "web-1"));
        // Replacing with identical content is a no-op: no event, same version.
        let rv = s.resource_version();
        assert_eq!(s.apply(svc("default", "web-1", 8080)), rv);
        del(&s, &mut expected, "default", "web-0");
        match next().await {
            watcher::Event::Delete(o) => {
                assert_eq!(o.name_any(), "web-0");
                assert_eq!(o.resource_version(), Some(s.resource_version()));
            }
            other => panic!("expected Delete, got {other:?}"),
        }
        assert_eq!(contents(&reader), expected);
        assert_eq!((s.list_count(SERVICES), s.watch_count(SERVICES)), (1, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_bookmarks_timeouts_streaming_lists_and_410() {
    let s = server();
    s.set_bookmark_interval(Duration::from_millis(200));
    s.apply(svc("default", "a", 80));
    bounded(async {
        let api: Api<Service> = Api::all(client(&s));
        let rv = api.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();

        // Raw watch with bookmarks: the change, then a bookmark at the current version.
        let mut stream = api.watch(&WatchParams::default().timeout(30), &rv).await.unwrap().boxed();
        let new_rv = s.apply(svc("default", "b", 81));
        let mut added = false;
        loop {
            match stream.next().await.unwrap().unwrap() {
                WatchEvent::Added(o) if !added => {
                    assert_eq!(o.name_any(), "b");
                    added = true;
                }
                WatchEvent::Bookmark(bm) => {
                    assert_eq!((bm.types.api_version.as_str(), bm.types.kind.as_str()), ("v1", "Service"));
                    assert!(bm.metadata.annotations.is_empty());
                    if !added {
                        // A tick that came before the change: at the watch's start version.
                        assert_eq!(bm.metadata.resource_version, rv);
                        continue;
                    }
                    assert_eq!(bm.metadata.resource_version, new_rv);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(stream);

        // Without bookmarks: nothing arrives; timeoutSeconds ends the stream cleanly.
        let started = std::time::Instant::now();
        let wp = WatchParams::default().disable_bookmarks().timeout(1);
        let mut quiet = api.watch(&wp, &new_rv).await.unwrap().boxed();
        assert!(quiet.next().await.is_none(), "no events, then a clean end");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");

        // Watch from "0": synthetic ADDED for the current state.
        let mut from_zero = api.watch(&WatchParams::default().disable_bookmarks(), "0").await.unwrap().boxed();
        for name in ["a", "b"] {
            assert!(matches!(from_zero.next().await.unwrap().unwrap(), WatchEvent::Added(o) if o.name_any() == name));
        }
        drop(from_zero);

        // A label-selected watch sees an object leaving the selection as DELETED.
        let mut selected = api.watch(&WatchParams::default().disable_bookmarks().labels("app=b"), &new_rv).await.unwrap().boxed();
        let mut moved = svc("default", "b", 81);
        moved["metadata"]["labels"]["app"] = json!("c");
        s.apply(moved);
        assert!(matches!(selected.next().await.unwrap().unwrap(), WatchEvent::Deleted(o) if o.name_any() == "b"));
        drop(selected);

        // Streaming lists (sendInitialEvents): the initial-events-end bookmark ends the init.
        let streaming = watcher(api.clone(), watcher::Config::default().streaming_lists());
        let mut streaming = std::pin::pin!(streaming);
        let mut init = Vec::new();
        loop {
            match streaming.next().await.unwrap().unwrap() {
                watcher::Event::Init => {}
                watcher::Event::InitApply(o) => init.push(o.name_any()),
                watcher::Event::InitDone => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(init, ["a", "b"]);
        s.apply(svc("default", "d", 82));
        assert!(matches!(streaming.next().await.unwrap().unwrap(), watcher::Event::Apply(o) if o.name_any() == "d"));

        // After a compaction, a watch from an older version gets the 410 ERROR event.
        s.compact();
        let mut old = api.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
        match old.next().await.unwrap().unwrap() {
            WatchEvent::Error(e) => {
                assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
                assert!(e.message.starts_with(&format!("too old resource version: {rv} (")), "{}", e.message);
            }
            other => panic!("expected ERROR, got {other:?}"),
        }
        assert!(old.next().await.is_none(), "the stream ends after the 410");
        // A list continue token from before the compaction is expired too.
        let page = api.list(&ListParams::default().limit(1)).await.unwrap();
        s.apply(svc("default", "e", 83));
        s.compact();
        let lp = ListParams::default().limit(1).continue_token(page.metadata.continue_.as_deref().unwrap());
        let (code, reason) = api_error(api.list(&lp).await.unwrap_err());
        assert_eq!((code, reason.as_str()), (410, "Expired"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_after_410_converges() {
    let s = server();
    let mut expected = BTreeMap::new();
    for i in 0..5 {
        put(&s, &mut expected, "default", &format!("svc-{i}"), 80);
    }
    bounded(async {
        let (store, task) = spawn_reflector(Api::all(client(&s)));
        converge(&store, &expected).await;
        assert_eq!(s.list_count(SERVICES), 1);

        // Disconnected (watches cut, reconnects refused) while objects change and the
        // history is compacted: the resumed watch gets 410 and the watcher relists.
        s.set_unavailable(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.drop_watches();
        del(&s, &mut expected, "default", "svc-0");
        put(&s, &mut expected, "default", "svc-1", 8081);
        put(&s, &mut expected, "kube-system", "dns", 53);
        s.compact();
        let lists_before = s.list_count(SERVICES);
        s.set_unavailable(false);
        converge(&store, &expected).await;
        assert_eq!(
            lists_before, 1,
            "no relist while unavailable: the watcher retries the watch"
        );
        assert!(
            s.list_count(SERVICES) > lists_before,
            "the 410 made the watcher relist"
        );

        // And it keeps following changes after the relist.
        put(&s, &mut expected, "default", "svc-9", 9);
        converge(&store, &expected).await;
        task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_streams_resume_without_relist() {
    let s = server();
    let mut expected = BTreeMap::new();
    for i in 0..10 {
        put(&s, &mut expected, "default", &format!("svc-{i}"), 80);
    }
    bounded(async {
        let (store, task) = spawn_reflector(Api::all(client(&s)));
        converge(&store, &expected).await;
        for round in 0..8u16 {
            s.drop_watches();
            put(
                &s,
                &mut expected,
                "default",
                &format!("svc-{}", round % 10),
                100 + round,
            );
            put(&s, &mut expected, "new", &format!("n-{round}"), 200 + round);
            if round % 3 == 0 {
                del(&s, &mut expected, "default", &format!("svc-{}", 9 - round));
            }
            tokio::time::sleep(Duration::from_millis(30 * u64::from(round % 4))).await;
        }
        converge(&store, &expected).await;
        // The watcher resumed from its last version each time: history replay, no relist.
        assert_eq!(s.list_count(SERVICES), 1);
        assert!(
            s.watch_count(SERVICES) >= 2,
            "watches: {}",
            s.watch_count(SERVICES)
        );
        task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_unavailable_and_restart() {
    let s = server();
    let mut expected = BTreeMap::new();
    put(&s, &mut expected, "default", "a", 80);
    bounded(async {
        let c = client(&s);
        let (store, task) = spawn_reflector(Api::all(c.clone()));
        converge(&store, &expected).await;

        s.set_unavailable(true);
        // kube's client retries 503 by itself (up to 15 times, exponential backoff from
        // 5 ms); one without that retry layer sees the error.
        let mut config = kube::Config::new(s.url().parse().unwrap());
        config.default_retry = false;
        let no_retry: Api<Service> = Api::all(Client::try_from(config).unwrap());
        let (code, reason) = api_error(no_retry.list(&ListParams::default()).await.unwrap_err());
        assert_eq!((code, reason.as_str()), (503, "ServiceUnavailable"));
        let api: Api<Service> = Api::all(c.clone());
        let retried = tokio::spawn({
            let api = api.clone();
            async move { api.list(&ListParams::default()).await }
        });
        put(&s, &mut expected, "default", "b", 81);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !contents(&store).contains_key("default/b"),
            "nothing gets through while down"
        );
        s.set_unavailable(false);
        converge(&store, &expected).await;
        // The list made while down was retried until the server came back.
        assert_eq!(retried.await.unwrap().unwrap().items.len(), 2);

        let rv_before = s.resource_version().parse::<u64>().unwrap();
        s.restart();
        put(&s, &mut expected, "default", "c", 82);
        del(&s, &mut expected, "default", "a");
        converge(&store, &expected).await;
        assert!(
            s.resource_version().parse::<u64>().unwrap() > rv_before,
            "versions continue"
        );
        assert_eq!(
            api.list(&ListParams::default()).await.unwrap().items.len(),
            2
        );
        task.abort();
    })
    .await;
}

/// With a network namespace the listener lives there: reachable from inside it.
#[test]
fn listens_inside_a_netns() {
    let ns = format!("apisrv-t{}", std::process::id());
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ip(&["netns", "add", &ns]) {
        eprintln!("skipped: cannot create a network namespace (needs root and iproute2)");
        return;
    }
    let result = std::panic::catch_unwind(|| {
        assert!(ip(&["-n", &ns, "link", "set", "lo", "up"]));
        let s = ApiServer::start(Some(&ns), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = s.addr();
        // Not in the root namespace (loopback there has no such listener)...
        assert!(std::net::TcpStream::connect(addr).is_err());
        // ...but inside the namespace.
        let path = format!("/run/netns/{ns}");
        let reply = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let f = std::fs::File::open(path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /api/v1/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        })
        .join()
        .unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains("\"kind\":\"NodeList\""), "{reply}");
        s.restart();
        drop(s);
    });
    assert!(ip(&["netns", "delete", &ns]));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Sends one raw HTTP/1.1 request and reads until the server closes (or `cut` runs
/// and the connection dies). Returns the raw bytes and whether the read ended in an error.
fn raw_request(addr: std::net::SocketAddr, request: &str, cut: impl FnOnce()) -> (String, bool) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Headers (and the first lines) first, then let `cut` act on an open stream.
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the headers");
        out.extend_from_slice(&buf[..n]);
    }
    cut();
    let failed = loop {
        match c.read(&mut buf) {
            Ok(0) => break false,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => panic!("read timed out"),
            Err(_) => break true,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), failed)
}

/// The wire format: chunked JSON lines, clean end at the timeout, a cut without the
/// final chunk, list items without apiVersion/kind, Status bodies for errors.
#[test]
fn wire_format() {
    let s = server();
    s.apply(svc("default", "a", 80));
    let a = s.addr();
    let get =
        |target: &str| format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");

    let (resp, failed) = raw_request(
        a,
        &get("/api/v1/services?&watch=true&timeoutSeconds=1&resourceVersion=0"),
        || {},
    );
    let head = resp.to_ascii_lowercase();
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(
        head.contains("content-type: application/json\r\n"),
        "{resp}"
    );
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{resp}");
    assert!(
        resp.contains(r#"{"object":{"apiVersion":"v1","kind":"Service","#),
        "{resp}"
    );
    assert!(resp.contains(r#""type":"ADDED"}"#), "{resp}");
    assert!(
        !failed && resp.ends_with("\r\n0\r\n\r\n"),
        "clean end at the timeout: {resp:?}"
    );

    let (resp, _) = raw_request(
        a,
        &get("/api/v1/services?watch=1&resourceVersion=0"),
        || {
            std::thread::sleep(Duration::from_millis(100));
            s.drop_watches();
        },
    );
    assert!(resp.contains(r#""type":"ADDED"}"#), "{resp}");
    assert!(
        !resp.ends_with("0\r\n\r\n"),
        "cut without the final chunk: {resp:?}"
    );

    let (resp, _) = raw_request(
        a,
        &get("/api/v1/namespaces/default/services?limit=1"),
        || {},
    );
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    let list: Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not plain JSON: {resp}"));
    assert_eq!(
        (list["kind"].as_str(), list["apiVersion"].as_str()),
        (Some("ServiceList"), Some("v1"))
    );
    assert_eq!(
        list["metadata"]["resourceVersion"],
        json!(s.resource_version())
    );
    assert!(list["metadata"].get("continue").is_none());
    assert!(list["items"][0].get("kind").is_none() && list["items"][0].get("apiVersion").is_none());

    for (request, code, reason) in [
        (get("/api/v1/pods"), "404", "NotFound"),
        (get("/apis/discovery.k8s.io/v1beta1/endpointslices"), "404", "NotFound"),
        ("POST /api/v1/namespaces/default/services HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}".to_string(), "405", "MethodNotAllowed"),
        (get("/api/v1/services?watch=true&resourceVersionMatch=NotOlderThan&resourceVersion=0"), "422", "Invalid"),
        (get("/api/v1/services?limit=1&continue=bogus"), "400", "BadRequest"),
    ] {
        let (resp, _) = raw_request(a, &request, || {});
        assert!(resp.starts_with(&format!("HTTP/1.1 {code} ")), "{request}: {resp}");
        let body: Value = serde_json::from_str(&resp[resp.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["reason"], reason, "{request}: {resp}");
        assert_eq!(body["code"].to_string(), code);
    }
}

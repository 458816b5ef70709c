//! The kube source: kube-rs reflectors on Services, EndpointSlices and this node's Node.
//! Desired state is rebuilt from the stores, never from single events (delete events can be
//! missed across a relist), and nothing is reported until every store has had its first list.
use std::{
    fmt::Debug,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};

use crate::model::Inputs;

pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    dirty: Arc<AtomicBool>,
    /// One flag per store, set when its first list is complete.
    ready: Vec<Arc<AtomicBool>>,
    /// Woken on every watch event (after the stores have applied it).
    pub changed: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        // In-cluster service account first, then $KUBECONFIG / ~/.kube/config.
        None => Config::infer()
            .await
            .context("no in-cluster config and no kubeconfig")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    dirty: Arc<AtomicBool>,
    changed: Arc<Notify>,
) -> (Store<K>, Arc<AtomicBool>, JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let ready = Arc::new(AtomicBool::new(false));
    let ready_flag = ready.clone();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone) {
                        ready_flag.store(true, Ordering::Release);
                    }
                    dirty.store(true, Ordering::Release);
                    changed.notify_one();
                }
                // The watcher backs off and relists by itself; the store keeps its contents
                // meanwhile, so the datapath is never flushed because the API is unreachable.
                Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    (reader, ready, task)
}

impl KubeSource {
    pub fn start(client: Client, node_name: &str) -> Self {
        let dirty = Arc::new(AtomicBool::new(false));
        let changed = Arc::new(Notify::new());
        let (services, r1, t1) = reflect(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            "Service",
            dirty.clone(),
            changed.clone(),
        );
        let (slices, r2, t2) = reflect(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            "EndpointSlice",
            dirty.clone(),
            changed.clone(),
        );
        // Only this node's labels matter (its zone), as kube-proxy watches only its own Node.
        let (nodes, r3, t3) = reflect(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            "Node",
            dirty.clone(),
            changed.clone(),
        );
        Self {
            services,
            slices,
            nodes,
            dirty,
            ready: vec![r1, r2, r3],
            changed,
            tasks: vec![t1, t2, t3],
        }
    }

    /// True once every store has completed its first list.
    pub fn is_ready(&self) -> bool {
        self.ready.iter().all(|r| r.load(Ordering::Acquire))
    }

    /// The stores' contents if anything changed since the last call and every store is ready.
    pub fn poll(&mut self) -> Option<Inputs> {
        if !self.is_ready() || !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(Inputs {
            services: owned(self.services.state()),
            slices: owned(self.slices.state()),
            endpoints: Vec::new(),
            nodes: owned(self.nodes.state()),
        })
    }
}

fn owned<K: Clone>(v: Vec<Arc<K>>) -> Vec<K> {
    v.into_iter().map(|a| (*a).clone()).collect()
}

//! Kubernetes Events on Services (and EndpointSlices) the agent rejects or does not program,
//! so `kubectl describe service` says why a Service is not served. Deduplicated (each agent
//! offers one event per object, reason and message at most every `REPEAT`, and all agents name
//! it alike, so the cluster holds one) and rate-limited (a token bucket over all objects),
//! published in the background so a slow or failing API server never delays a sync. Needs
//! `create` on `events.k8s.io` events (`patch` is granted for series, which it does not use
//! yet).
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

use crate::{
    model::Inputs,
    report::{NotProgrammed, Rejected},
};

/// The same event for the same object again after this long (the recorder makes it a series).
pub const REPEAT: Duration = Duration::from_secs(600);
/// Events per second over all objects, after a burst of `BURST`.
pub const RATE: f64 = 1.0;
pub const BURST: f64 = 25.0;

/// One event the agent wants to be seen.
#[derive(Clone, Debug, PartialEq)]
pub struct Wanted {
    pub regarding: ObjectReference,
    /// "Rejected" (a field the agent refuses) or "NotProgrammed" (does not fit the maps).
    pub reason: &'static str,
    pub note: String,
}

fn reference(kind: &str, ns: &str, name: &str, inputs: &Inputs) -> ObjectReference {
    let meta = match kind {
        "Service" => inputs
            .services
            .iter()
            .map(|s| &s.metadata)
            .find(|m| m.namespace.as_deref() == Some(ns) && m.name.as_deref() == Some(name)),
        "EndpointSlice" => inputs
            .slices
            .iter()
            .map(|s| &s.metadata)
            .find(|m| m.namespace.as_deref() == Some(ns) && m.name.as_deref() == Some(name)),
        _ => None,
    };
    ObjectReference {
        api_version: Some(
            if kind == "EndpointSlice" {
                "discovery.k8s.io/v1"
            } else {
                "v1"
            }
            .into(),
        ),
        kind: Some(kind.into()),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        // `kubectl describe` finds an object's events by its uid.
        uid: meta.and_then(|m| m.uid.clone()),
        resource_version: meta.and_then(|m| m.resource_version.clone()),
        ..Default::default()
    }
}

/// The events a sync's outcome calls for: one per rejected field and per Service that was not
/// programmed. Objects the report names as "Kind namespace/name"; others (cluster-scoped
/// Nodes) get none.
pub fn wanted(
    rejected: &[Rejected],
    not_programmed: &[NotProgrammed],
    inputs: &Inputs,
) -> Vec<Wanted> {
    let mut out = Vec::new();
    for r in rejected {
        let Some((kind, rest)) = r.object.split_once(' ') else {
            continue;
        };
        let Some((ns, name)) = rest.split_once('/') else {
            continue;
        };
        if kind != "Service" && kind != "EndpointSlice" {
            continue;
        }
        out.push(Wanted {
            regarding: reference(kind, ns, name, inputs),
            reason: "Rejected",
            note: truncate(format!("{}: {}", r.field, r.message)),
        });
    }
    for n in not_programmed {
        // "namespace/name", or "namespace/name:port" for one port.
        let svc = n.service.split(':').next().unwrap_or(&n.service);
        let Some((ns, name)) = svc.split_once('/') else {
            continue;
        };
        out.push(Wanted {
            regarding: reference("Service", ns, name, inputs),
            reason: "NotProgrammed",
            note: truncate(format!("{}: {}", n.service, n.reason)),
        });
    }
    out
}

/// Notes are at most 1 kB.
fn truncate(mut s: String) -> String {
    if s.len() > 1000 {
        let mut end = 1000;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Which events go out now: each (object, reason, note) once per `REPEAT`, within a token
/// bucket of `RATE` per second and `BURST`. Refused events are not remembered, so a later sync
/// offers them again.
#[derive(Debug)]
pub struct Limiter {
    sent: HashMap<(String, String, String, &'static str, String), Instant>,
    tokens: f64,
    refilled: Instant,
}

impl Limiter {
    pub fn new(now: Instant) -> Self {
        Self {
            sent: HashMap::new(),
            tokens: BURST,
            refilled: now,
        }
    }

    pub fn admit(&mut self, w: &Wanted, now: Instant) -> bool {
        self.tokens =
            (self.tokens + now.duration_since(self.refilled).as_secs_f64() * RATE).min(BURST);
        self.refilled = now;
        self.sent.retain(|_, at| now.duration_since(*at) < REPEAT);
        let r = &w.regarding;
        let key = (
            r.kind.clone().unwrap_or_default(),
            r.namespace.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
            w.reason,
            w.note.clone(),
        );
        if self.sent.contains_key(&key) || self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        self.sent.insert(key, now);
        true
    }
}

/// The event's name: the object's name and a hash of what the event says, the same on every
/// node. Every agent sees the same rejection; the first to create the event reports it for the
/// cluster, the others meet 409 AlreadyExists and leave it, so a cluster of N nodes gets one
/// event, not N. (After the API server expires it, the next repeat creates it again.)
pub fn event_name(w: &Wanted) -> String {
    use std::hash::{Hash as _, Hasher as _};
    // FNV-1a: stable across builds and architectures, unlike std's hasher.
    struct Fnv(u64);
    impl std::hash::Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    let r = &w.regarding;
    (&r.kind, &r.namespace, &r.name, &r.uid, w.reason, &w.note).hash(&mut h);
    format!(
        "{}.{:016x}",
        r.name.as_deref().unwrap_or("object"),
        h.finish()
    )
}

/// Builds the events.k8s.io/v1 Event for `w`.
pub fn event(w: &Wanted, node_name: &str) -> K8sEvent {
    K8sEvent {
        metadata: ObjectMeta {
            name: Some(event_name(w)),
            namespace: w.regarding.namespace.clone(),
            ..Default::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        type_: Some("Warning".into()),
        reason: Some(w.reason.into()),
        action: Some("Program".into()),
        note: Some(w.note.clone()),
        regarding: Some(w.regarding.clone()),
        reporting_controller: Some("proxy-agent".into()),
        reporting_instance: Some(format!("proxy-agent-{node_name}")),
        ..Default::default()
    }
}

/// Publishes the admitted events.
pub struct Publisher {
    client: Client,
    node_name: String,
    limiter: Limiter,
}

impl Publisher {
    pub fn new(client: Client, node_name: &str) -> Self {
        Self {
            client,
            node_name: node_name.into(),
            limiter: Limiter::new(Instant::now()),
        }
    }

    /// Sends, in the background, those of `wanted` the limiter lets through.
    pub fn publish(&mut self, wanted: Vec<Wanted>) {
        let now = Instant::now();
        for w in wanted {
            if !self.limiter.admit(&w, now) {
                continue;
            }
            let ev = event(&w, &self.node_name);
            let ns = w
                .regarding
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &ns);
            tokio::spawn(async move {
                match api.create(&PostParams::default(), &ev).await {
                    Ok(_) => {
                        tracing::info!(object = ?w.regarding.name, reason = w.reason, "event published")
                    }
                    // Another node reported it already.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => tracing::warn!(
                        object = ?w.regarding.name,
                        reason = w.reason,
                        error = %e,
                        "could not publish an event"
                    ),
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;

    fn svc(ns: &str, name: &str, uid: &str) -> Service {
        let mut s = Service::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.metadata.uid = Some(uid.into());
        s
    }

    #[test]
    fn rejected_fields_and_unprogrammed_services_become_events_on_their_objects() {
        let inputs = Inputs {
            services: vec![svc("default", "bad", "u-1"), svc("team", "big", "u-2")],
            ..Default::default()
        };
        let w = wanted(
            &[
                Rejected {
                    object: "Service default/bad".into(),
                    field: "spec.ports[0].port".into(),
                    message: "must be 1-65535".into(),
                },
                Rejected {
                    object: "Node node1".into(),
                    field: "status.addresses".into(),
                    message: "x".into(),
                },
            ],
            &[NotProgrammed {
                service: "team/big".into(),
                reason: "needs 5000 backend slots".into(),
            }],
            &inputs,
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(
            (
                w[0].reason,
                w[0].note.as_str(),
                w[0].regarding.uid.as_deref()
            ),
            (
                "Rejected",
                "spec.ports[0].port: must be 1-65535",
                Some("u-1")
            )
        );
        assert_eq!(w[0].regarding.kind.as_deref(), Some("Service"));
        assert_eq!(
            (
                w[1].reason,
                w[1].regarding.namespace.as_deref(),
                w[1].regarding.name.as_deref(),
                w[1].regarding.uid.as_deref()
            ),
            ("NotProgrammed", Some("team"), Some("big"), Some("u-2"))
        );
    }

    fn ev(name: &str, note: &str) -> Wanted {
        Wanted {
            regarding: ObjectReference {
                kind: Some("Service".into()),
                namespace: Some("default".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            reason: "Rejected",
            note: note.into(),
        }
    }

    #[test]
    fn the_same_event_goes_out_once_per_repeat_interval() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        assert!(l.admit(&ev("a", "x"), t0));
        assert!(!l.admit(&ev("a", "x"), t0 + Duration::from_secs(5)));
        // Another message for the same object is news.
        assert!(l.admit(&ev("a", "y"), t0 + Duration::from_secs(5)));
        assert!(l.admit(&ev("a", "x"), t0 + REPEAT + Duration::from_secs(1)));
    }

    #[test]
    fn every_node_names_an_event_alike_and_another_message_differently() {
        let a = event_name(&ev("web", "spec.ports[0].port: x"));
        assert_eq!(a, event_name(&ev("web", "spec.ports[0].port: x")));
        assert!(a.starts_with("web."), "{a}");
        assert_ne!(a, event_name(&ev("web", "spec.ports[0].port: y")));
        let e = event(&ev("web", "n"), "node1");
        assert_eq!(
            (
                e.type_.as_deref(),
                e.reason.as_deref(),
                e.metadata.namespace.as_deref()
            ),
            (Some("Warning"), Some("Rejected"), Some("default"))
        );
    }

    #[test]
    fn a_burst_is_capped_and_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0);
        let sent = (0..100)
            .filter(|i| l.admit(&ev(&format!("s{i}"), "x"), t0))
            .count();
        assert_eq!(sent, BURST as usize);
        // Refused ones were not remembered: offered again later, they go out as tokens come.
        let later = t0 + Duration::from_secs(3);
        let again = (0..100)
            .filter(|i| l.admit(&ev(&format!("s{i}"), "x"), later))
            .count();
        assert_eq!(again, 3);
    }
}

//! Kubernetes objects the agent reads in `--manifests` mode, rendered as YAML:
//! Service, discovery.k8s.io/v1 EndpointSlice and v1 Endpoints.
//!
//! Builders cover what the tests need; `spec` / `extra` maps take any other field
//! (sessionAffinity, externalTrafficPolicy, hints, ...) verbatim.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::client::Proto;

/// A Service port's targetPort: a number or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Num(u16),
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(p: u16) -> Self {
        TargetPort::Num(p)
    }
}

impl From<&str> for TargetPort {
    fn from(s: &str) -> Self {
        TargetPort::Name(s.to_string())
    }
}

/// A v1 Service.
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// ClusterIP, NodePort, LoadBalancer, ExternalName.
    pub type_: String,
    /// `None` renders no clusterIP; `Some("None")` makes a headless Service.
    pub cluster_ip: Option<String>,
    pub ports: Vec<Value>,
    /// `None`: a selectorless Service (endpoints written by hand).
    pub selector: Option<BTreeMap<String, String>>,
    /// Other `spec` fields, merged in as given.
    pub spec: Map<String, Value>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl Service {
    /// A ClusterIP Service with the given VIP, selector `app: <name>`, no ports yet.
    pub fn cluster_ip(namespace: &str, name: &str, vip: &str) -> Service {
        Service {
            namespace: namespace.into(),
            name: name.into(),
            type_: "ClusterIP".into(),
            cluster_ip: Some(vip.into()),
            ports: Vec::new(),
            selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            spec: Map::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    /// Adds a port; `name` may be empty (single-port Services).
    pub fn port(
        mut self,
        name: &str,
        port: u16,
        target: impl Into<TargetPort>,
        proto: Proto,
    ) -> Service {
        let mut p = Map::new();
        if !name.is_empty() {
            p.insert("name".into(), json!(name));
        }
        p.insert("port".into(), json!(port));
        p.insert(
            "targetPort".into(),
            match target.into() {
                TargetPort::Num(n) => json!(n),
                TargetPort::Name(s) => json!(s),
            },
        );
        p.insert("protocol".into(), json!(proto.k8s()));
        self.ports.push(Value::Object(p));
        self
    }

    /// Adds a fully specified port object (nodePort, appProtocol, ...).
    pub fn raw_port(mut self, port: Value) -> Service {
        self.ports.push(port);
        self
    }

    /// Replaces the selector with one label.
    pub fn selector(mut self, key: &str, value: &str) -> Service {
        self.selector = Some(BTreeMap::from([(key.to_string(), value.to_string())]));
        self
    }

    /// Makes the Service selectorless.
    pub fn no_selector(mut self) -> Service {
        self.selector = None;
        self
    }

    /// Sets the Service type (NodePort, LoadBalancer, ...).
    pub fn type_(mut self, t: &str) -> Service {
        self.type_ = t.into();
        self
    }

    /// Sets any other `spec` field.
    pub fn spec(mut self, key: &str, value: Value) -> Service {
        self.spec.insert(key.into(), value);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Service {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Service {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn to_value(&self) -> Value {
        let mut spec = Map::new();
        spec.insert("type".into(), json!(self.type_));
        if let Some(ip) = &self.cluster_ip {
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
        }
        spec.insert("ports".into(), Value::Array(self.ports.clone()));
        if let Some(sel) = &self.selector {
            spec.insert("selector".into(), json!(sel));
        }
        for (k, v) in &self.spec {
            spec.insert(k.clone(), v.clone());
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(&self.namespace, &self.name, &self.labels, &self.annotations),
            "spec": spec,
        })
    }

    pub fn to_yaml(&self) -> String {
        to_yaml(&self.to_value())
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addresses: Vec<String>,
    pub ready: bool,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    /// Other endpoint fields (hints, zone, targetRef, ...).
    pub extra: Map<String, Value>,
}

impl Endpoint {
    /// A ready endpoint with one address.
    pub fn ready(addr: &str, node_name: &str) -> Endpoint {
        Endpoint {
            addresses: vec![addr.into()],
            ready: true,
            serving: None,
            terminating: None,
            node_name: (!node_name.is_empty()).then(|| node_name.to_string()),
            extra: Map::new(),
        }
    }

    /// Sets ready/serving/terminating explicitly.
    pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        self.ready = ready;
        self.serving = Some(serving);
        self.terminating = Some(terminating);
        self
    }

    pub fn extra(mut self, key: &str, value: Value) -> Endpoint {
        self.extra.insert(key.into(), value);
        self
    }

    fn to_value(&self) -> Value {
        let mut cond = Map::new();
        cond.insert("ready".into(), json!(self.ready));
        if let Some(s) = self.serving {
            cond.insert("serving".into(), json!(s));
        }
        if let Some(t) = self.terminating {
            cond.insert("terminating".into(), json!(t));
        }
        let mut m = Map::new();
        m.insert("addresses".into(), json!(self.addresses));
        m.insert("conditions".into(), Value::Object(cond));
        if let Some(n) = &self.node_name {
            m.insert("nodeName".into(), json!(n));
        }
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }
}

/// A port of an EndpointSlice or Endpoints subset: the Service port's name and
/// the resolved target port number.
#[derive(Clone, Debug)]
pub struct EndpointPort {
    pub name: String,
    pub port: u16,
    pub protocol: Proto,
}

impl EndpointPort {
    pub fn new(name: &str, port: u16, protocol: Proto) -> EndpointPort {
        EndpointPort {
            name: name.into(),
            port,
            protocol,
        }
    }

    fn to_value(&self) -> Value {
        let mut m = Map::new();
        if !self.name.is_empty() {
            m.insert("name".into(), json!(self.name));
        }
        m.insert("port".into(), json!(self.port));
        m.insert("protocol".into(), json!(self.protocol.k8s()));
        Value::Object(m)
    }
}

/// A discovery.k8s.io/v1 EndpointSlice of one Service.
#[derive(Clone, Debug)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    pub service: String,
    /// IPv4, IPv6 or FQDN.
    pub address_type: String,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
    pub labels: BTreeMap<String, String>,
}

impl EndpointSlice {
    /// An IPv4 slice `<service>-<suffix>` labelled `kubernetes.io/service-name`.
    pub fn new(namespace: &str, service: &str, suffix: &str) -> EndpointSlice {
        EndpointSlice {
            namespace: namespace.into(),
            name: format!("{service}-{suffix}"),
            service: service.into(),
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            ports: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    pub fn endpoint(mut self, e: Endpoint) -> EndpointSlice {
        self.endpoints.push(e);
        self
    }

    pub fn port(mut self, name: &str, port: u16, protocol: Proto) -> EndpointSlice {
        self.ports.push(EndpointPort::new(name, port, protocol));
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> EndpointSlice {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn to_value(&self) -> Value {
        let mut labels = self.labels.clone();
        labels.insert("kubernetes.io/service-name".into(), self.service.clone());
        labels
            .entry("endpointslice.kubernetes.io/managed-by".into())
            .or_insert_with(|| "tests.proxy-agent".into());
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": metadata(&self.namespace, &self.name, &labels, &BTreeMap::new()),
            "addressType": self.address_type,
            "endpoints": self.endpoints.iter().map(Endpoint::to_value).collect::<Vec<_>>(),
            "ports": self.ports.iter().map(EndpointPort::to_value).collect::<Vec<_>>(),
        })
    }

    pub fn to_yaml(&self) -> String {
        to_yaml(&self.to_value())
    }
}

/// One subset of a v1 Endpoints object.
#[derive(Clone, Debug, Default)]
pub struct EndpointsSubset {
    /// (ip, nodeName) of ready addresses.
    pub addresses: Vec<(String, Option<String>)>,
    /// (ip, nodeName) of not-ready addresses.
    pub not_ready: Vec<(String, Option<String>)>,
    pub ports: Vec<EndpointPort>,
}

/// A v1 Endpoints object (same name as its Service), as written by hand for a
/// selectorless Service.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub namespace: String,
    pub name: String,
    pub subsets: Vec<EndpointsSubset>,
}

impl Endpoints {
    pub fn new(namespace: &str, name: &str) -> Endpoints {
        Endpoints {
            namespace: namespace.into(),
            name: name.into(),
            subsets: Vec::new(),
        }
    }

    /// Adds a subset with ready addresses `(ip, nodeName or "")` and ports.
    pub fn subset(mut self, addresses: &[(&str, &str)], ports: &[EndpointPort]) -> Endpoints {
        self.subsets.push(EndpointsSubset {
            addresses: addresses
                .iter()
                .map(|(a, n)| (a.to_string(), (!n.is_empty()).then(|| n.to_string())))
                .collect(),
            not_ready: Vec::new(),
            ports: ports.to_vec(),
        });
        self
    }

    pub fn to_value(&self) -> Value {
        let addr = |(ip, node): &(String, Option<String>)| {
            let mut m = Map::new();
            m.insert("ip".into(), json!(ip));
            if let Some(n) = node {
                m.insert("nodeName".into(), json!(n));
            }
            Value::Object(m)
        };
        let subsets: Vec<Value> = self
            .subsets
            .iter()
            .map(|s| {
                let mut m = Map::new();
                m.insert(
                    "addresses".into(),
                    Value::Array(s.addresses.iter().map(addr).collect()),
                );
                if !s.not_ready.is_empty() {
                    m.insert(
                        "notReadyAddresses".into(),
                        Value::Array(s.not_ready.iter().map(addr).collect()),
                    );
                }
                m.insert(
                    "ports".into(),
                    Value::Array(s.ports.iter().map(EndpointPort::to_value).collect()),
                );
                Value::Object(m)
            })
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": metadata(&self.namespace, &self.name, &BTreeMap::new(), &BTreeMap::new()),
            "subsets": subsets,
        })
    }

    pub fn to_yaml(&self) -> String {
        to_yaml(&self.to_value())
    }
}

/// Several objects as one multi-document YAML stream.
pub fn yaml_documents(objects: &[Value]) -> String {
    objects
        .iter()
        .map(to_yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}

/// One object as YAML.
pub fn to_yaml(v: &Value) -> String {
    serde_yaml::to_string(v).expect("a JSON value always renders as YAML")
}

fn metadata(
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    m.insert("namespace".into(), json!(namespace));
    if !labels.is_empty() {
        m.insert("labels".into(), json!(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), json!(annotations));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_kubernetes_shapes() {
        let svc = Service::cluster_ip("default", "web", "198.18.100.10")
            .port("http", 80, "web", Proto::Tcp)
            .port("metrics", 9100, 9090, Proto::Tcp)
            .no_selector();
        let v: Value = serde_yaml::from_str(&svc.to_yaml()).unwrap();
        assert_eq!(v["kind"], "Service");
        assert_eq!(v["spec"]["clusterIP"], "198.18.100.10");
        assert_eq!(v["spec"]["ports"][0]["targetPort"], "web");
        assert_eq!(v["spec"]["ports"][1]["targetPort"], 9090);
        assert!(v["spec"].get("selector").is_none());

        let slice = EndpointSlice::new("default", "web", "a")
            .endpoint(Endpoint::ready("198.19.1.2", "node1"))
            .port("http", 8080, Proto::Tcp);
        let v: Value = serde_yaml::from_str(&slice.to_yaml()).unwrap();
        assert_eq!(v["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(v["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(v["endpoints"][0]["nodeName"], "node1");
        assert_eq!(v["ports"][0]["name"], "http");

        let eps = Endpoints::new("default", "web").subset(
            &[("198.19.1.2", "")],
            &[EndpointPort::new("", 8080, Proto::Udp)],
        );
        let v: Value = serde_yaml::from_str(&eps.to_yaml()).unwrap();
        assert_eq!(v["subsets"][0]["addresses"][0]["ip"], "198.19.1.2");
        assert_eq!(v["subsets"][0]["ports"][0]["protocol"], "UDP");
        assert!(v["subsets"][0]["ports"][0].get("name").is_none());
    }
}

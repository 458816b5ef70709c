//! The cluster deployment: `deploy/` (kustomize base and the side-by-side overlay) and the
//! `Dockerfile`. Every manifest is parsed into its Kubernetes type and checked against what the
//! agent needs on a node (README.md, "Installing on a cluster"); the DaemonSet's flags are checked
//! against the real binary's `run --help`. No root, no cluster, no network: `kubectl kustomize`
//! renders offline, and kubectl gets an empty kubeconfig so it cannot reach any cluster.
//!
//! `kubectl apply --dry-run=client` is not run: even client-side dry runs ask the API server for
//! discovery, and no server exists here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_yaml::Value;

const NAMESPACE: &str = "kube-system";
const NAME: &str = "proxy-agent";
const HEALTHZ_PORT: i32 = 10256;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

/// Every `.yaml`/`.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    out
}

/// The YAML documents of `text` (empty ones dropped).
fn documents(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: bad YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

/// The Kubernetes objects (not the kustomizations) of the given documents, typed.
#[derive(Default)]
struct Objects {
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemonsets: Vec<DaemonSet>,
}

impl Objects {
    fn add(&mut self, doc: &Value, what: &str) {
        fn typed<T: serde::de::DeserializeOwned>(doc: &Value, what: &str) -> T {
            serde_yaml::from_value(doc.clone())
                .unwrap_or_else(|e| panic!("{what}: not a valid {}: {e}", kind(doc)))
        }
        match kind(doc) {
            "ServiceAccount" => self.service_accounts.push(typed(doc, what)),
            "ClusterRole" => self.cluster_roles.push(typed(doc, what)),
            "ClusterRoleBinding" => self.bindings.push(typed(doc, what)),
            "DaemonSet" => self.daemonsets.push(typed(doc, what)),
            other => panic!("{what}: unexpected kind {other:?}"),
        }
    }

    fn one<'a, T>(items: &'a [T], what: &str) -> &'a T {
        assert_eq!(items.len(), 1, "expected exactly one {what}");
        &items[0]
    }

    fn service_account(&self) -> &ServiceAccount {
        Self::one(&self.service_accounts, "ServiceAccount")
    }
    fn cluster_role(&self) -> &ClusterRole {
        Self::one(&self.cluster_roles, "ClusterRole")
    }
    fn binding(&self) -> &ClusterRoleBinding {
        Self::one(&self.bindings, "ClusterRoleBinding")
    }
    fn daemonset(&self) -> &DaemonSet {
        Self::one(&self.daemonsets, "DaemonSet")
    }
}

/// Every object in every file under deploy/ (kustomizations aside): each one must parse into
/// its k8s-openapi type, and each kind must appear exactly once.
fn manifests() -> Objects {
    let mut objects = Objects::default();
    for path in yaml_files(&deploy()) {
        let what = path.display().to_string();
        let text = fs::read_to_string(&path).unwrap();
        for doc in documents(&text, &what) {
            if kind(&doc) != "Kustomization" {
                objects.add(&doc, &what);
            }
        }
    }
    objects
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .expect("DaemonSet has a pod spec")
}

fn agent_container(spec: &PodSpec) -> &Container {
    spec.containers
        .iter()
        .find(|c| c.name == NAME)
        .expect("a container named proxy-agent")
}

fn args(c: &Container) -> &[String] {
    c.args.as_deref().unwrap_or_default()
}

/// The value of `--flag=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))
}

fn volume<'a>(spec: &'a PodSpec, name: &str) -> &'a Volume {
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The hostPath (path, type) of the volume mounted at `mount_path` in `c`, and the mount's
/// propagation and read-only setting.
fn host_mount(
    spec: &PodSpec,
    c: &Container,
    mount_path: &str,
) -> (String, Option<String>, Option<String>, bool) {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == mount_path)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {mount_path}", c.name));
    let host = volume(spec, &mount.name)
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("volume {} is not a hostPath", mount.name));
    (
        host.path.clone(),
        host.type_.clone(),
        mount.mount_propagation.clone(),
        mount.read_only.unwrap_or(false),
    )
}

fn is_privileged(c: &Container) -> bool {
    c.security_context.as_ref().and_then(|s| s.privileged) == Some(true)
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let files = yaml_files(&deploy());
    assert!(!files.is_empty(), "no YAML under deploy/");
    let objects = manifests();
    objects.service_account();
    objects.cluster_role();
    objects.binding();
    objects.daemonset();
    // Kustomizations are the only other documents.
    for path in files {
        let text = fs::read_to_string(&path).unwrap();
        for doc in documents(&text, &path.display().to_string()) {
            if kind(&doc) == "Kustomization" {
                assert_eq!(
                    doc["apiVersion"].as_str(),
                    Some("kustomize.config.k8s.io/v1beta1"),
                    "{}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn rbac_is_least_privilege() {
    let objects = manifests();
    let sa = objects.service_account();
    assert_eq!(sa.metadata.name.as_deref(), Some(NAME));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE));

    let role = objects.cluster_role();
    assert!(
        role.aggregation_rule.is_none(),
        "no aggregation: the rules are all there is"
    );
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.non_resource_urls.is_none() && rule.resource_names.is_none(),
            "unexpected rule shape: {rule:?}"
        );
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        for g in groups {
            for r in resources {
                for v in &rule.verbs {
                    for s in [g, r, v] {
                        assert!(!s.contains('*'), "wildcard in {rule:?}");
                    }
                    granted.insert((g.as_str(), r.as_str(), v.as_str()));
                }
            }
        }
    }
    // Read-only on what the kube source watches; Events created and patched (series), nothing
    // else written.
    let mut wanted = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            wanted.insert((group, resource, verb));
        }
    }
    wanted.insert(("events.k8s.io", "events", "create"));
    wanted.insert(("events.k8s.io", "events", "patch"));
    assert_eq!(
        granted, wanted,
        "ClusterRole grants exactly read access and Events"
    );

    let binding = objects.binding();
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(
        subjects.len(),
        1,
        "bound to the agent's ServiceAccount only"
    );
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);

    let ds = objects.daemonset();
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    assert_eq!(pod_spec(ds).service_account_name, sa.metadata.name);
}

#[test]
fn daemonset_runs_the_agent_like_kube_proxy() {
    let objects = manifests();
    let ds = objects.daemonset();
    assert_eq!(ds.metadata.name.as_deref(), Some(NAME));
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    let ds_spec = &ds.spec;
    let labels = ds_spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    for (k, v) in ds_spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.and_then(|l| l.get(k)),
            Some(v),
            "the selector matches the pod template"
        );
    }

    let strategy = ds_spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));

    let spec = pod_spec(ds);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint (operator: Exists), like kube-proxy"
    );

    let c = agent_container(spec);
    assert!(is_privileged(c), "the agent container is privileged");
    let image = c.image.as_deref().unwrap_or_default();
    assert!(image.contains(NAME), "image {image:?}");

    // NODE_NAME from the downward API, handed to --node-name.
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("env NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");

    let args = args(c);
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert_eq!(flag(args, "--node-name"), Some("$(NODE_NAME)"));
    assert_eq!(
        flag(args, "--metrics-bind-address"),
        Some("127.0.0.1:10249")
    );
    assert_eq!(
        flag(args, "--healthz-bind-address"),
        Some(&*format!("0.0.0.0:{HEALTHZ_PORT}"))
    );
    assert!(flag(args, "--interfaces").is_some_and(|v| !v.is_empty()));
    assert!(flag(args, "--pod-interfaces").is_some_and(|v| !v.is_empty()));
    assert!(
        flag(args, "--service-proxy-name").is_none(),
        "the base takes every Service; only the side-by-side overlay narrows it"
    );
    assert!(
        flag(args, "--manifests").is_none() && flag(args, "--kubeconfig").is_none(),
        "in a cluster the agent watches the API server with its ServiceAccount"
    );

    // bpffs: the host's /sys/fs/bpf, shared both ways, with the agent's pins under it.
    let bpffs = flag(args, "--bpffs").expect("--bpffs");
    assert_eq!(bpffs, "/sys/fs/bpf/proxy-agent");
    let (host, type_, propagation, ro) = host_mount(spec, c, "/sys/fs/bpf");
    assert_eq!(host, "/sys/fs/bpf");
    assert_eq!(type_.as_deref(), Some("DirectoryOrCreate"));
    assert_eq!(propagation.as_deref(), Some("Bidirectional"));
    assert!(!ro);

    // The host's cgroup v2 root where --cgroup points.
    let cgroup = flag(args, "--cgroup").expect("--cgroup");
    assert_eq!(cgroup, "/run/proxy-agent/cgroupv2");
    let (host, _, _, _) = host_mount(spec, c, cgroup);
    assert_eq!(host, "/sys/fs/cgroup");

    // The run directory (sync report for `status`) and the kernel modules.
    let (host, type_, _, _) = host_mount(spec, c, "/run/proxy-agent");
    assert_eq!(
        (host.as_str(), type_.as_deref()),
        ("/run/proxy-agent", Some("DirectoryOrCreate"))
    );
    let (host, _, _, ro) = host_mount(spec, c, "/lib/modules");
    assert_eq!(host, "/lib/modules");
    assert!(ro, "/lib/modules is mounted read-only");

    // Probes on the healthz server (hostNetwork: the node's address).
    for (probe, path) in [
        (&c.liveness_probe, "/livez"),
        (&c.readiness_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an httpGet probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(HEALTHZ_PORT), "{path}");
    }

    let resources = c.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("100m"));
    assert_eq!(requests.get("memory").map(|q| q.0.as_str()), Some("128Mi"));
    let limits = resources.limits.as_ref().expect("limits");
    assert!(limits.contains_key("memory"), "a memory limit");
    assert!(
        !limits.contains_key("cpu"),
        "no CPU limit: throttling the agent delays syncs"
    );

    // The init container that mounts a bpffs where the node has none: same image, so its tools
    // come from the image the Dockerfile builds.
    for init in spec.init_containers.iter().flatten() {
        assert_eq!(init.image, c.image, "init container {}", init.name);
        assert!(is_privileged(init), "init container {}", init.name);
        let (host, _, propagation, _) = host_mount(spec, init, "/sys/fs/bpf");
        assert_eq!(host, "/sys/fs/bpf");
        assert_eq!(propagation.as_deref(), Some("Bidirectional"));
    }
}

/// The `resources` of a kustomization file.
fn kustomize_resources(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap();
    let docs = documents(&text, &path.display().to_string());
    assert_eq!(docs.len(), 1, "{}", path.display());
    docs[0]["resources"]
        .as_sequence()
        .map(|s| {
            s.iter()
                .map(|r| r.as_str().expect("resource is a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kustomizations_list_every_manifest() {
    let deploy = deploy();
    let mut listed = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for path in yaml_files(&deploy) {
        dirs.insert(path.parent().unwrap().to_path_buf());
        if path.file_name().and_then(|n| n.to_str()) != Some("kustomization.yaml") {
            continue;
        }
        let dir = path.parent().unwrap();
        for r in kustomize_resources(&path) {
            let target = dir.join(&r);
            assert!(
                target.is_file() || target.join("kustomization.yaml").is_file(),
                "{}: resource {r} is neither a file nor a kustomization",
                path.display()
            );
            listed.insert(target.canonicalize().unwrap());
        }
    }
    for dir in &dirs {
        assert!(
            dir.join("kustomization.yaml").is_file(),
            "{} has YAML but no kustomization.yaml",
            dir.display()
        );
    }
    for path in yaml_files(&deploy) {
        if path.file_name().and_then(|n| n.to_str()) != Some("kustomization.yaml") {
            assert!(
                listed.contains(&path.canonicalize().unwrap()),
                "{} is listed by no kustomization",
                path.display()
            );
        }
    }
    // `kubectl apply -k deploy/` installs the base; the overlay builds on the same base.
    assert_eq!(
        kustomize_resources(&deploy.join("kustomization.yaml")),
        ["base"]
    );
    assert_eq!(
        kustomize_resources(&deploy.join("side-by-side/kustomization.yaml")),
        ["../base"]
    );
}

/// kubectl with no way to reach a cluster: an empty kubeconfig, no in-cluster variables.
/// `None` (and a printed reason) when kubectl is not installed.
fn kubectl(args: &[&str]) -> Option<std::process::Output> {
    let kubeconfig = env::temp_dir().join(format!("deploy-test-kubeconfig-{}", std::process::id()));
    fs::write(&kubeconfig, "").unwrap();
    let out = Command::new("kubectl")
        .args(args)
        .current_dir(root())
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output();
    let _ = fs::remove_file(&kubeconfig);
    match out {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("skipped: kubectl is not installed, `kubectl kustomize` not checked");
            None
        }
        Err(e) => panic!("running kubectl: {e}"),
    }
}

/// The objects `kubectl kustomize DIR` renders, offline.
fn kustomize(dir: &str) -> Option<Objects> {
    let out = kubectl(&["kustomize", dir])?;
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut objects = Objects::default();
    for doc in documents(&text, dir) {
        objects.add(&doc, dir);
    }
    Some(objects)
}

#[test]
fn kubectl_kustomize_renders_the_base_and_the_side_by_side_overlay() {
    let Some(base) = kustomize("deploy/") else {
        return;
    };
    let files = manifests();
    // The rendered base is exactly the files.
    assert_eq!(base.service_account(), files.service_account());
    assert_eq!(base.cluster_role(), files.cluster_role());
    assert_eq!(base.binding(), files.binding());
    assert_eq!(base.daemonset(), files.daemonset());

    // Side by side with kube-proxy: labelled Services only, off kube-proxy's host ports, and the
    // probes follow the healthz port. Nothing else changes.
    let overlay = kustomize("deploy/side-by-side/").unwrap();
    assert_eq!(overlay.cluster_role(), files.cluster_role());
    let spec = pod_spec(overlay.daemonset());
    let c = agent_container(spec);
    let args = args(c);
    assert_eq!(flag(args, "--service-proxy-name"), Some(NAME));
    let metrics = flag(args, "--metrics-bind-address").expect("--metrics-bind-address");
    let healthz = flag(args, "--healthz-bind-address").expect("--healthz-bind-address");
    assert!(
        !metrics.ends_with(":10249"),
        "{metrics} collides with kube-proxy"
    );
    assert!(
        !healthz.ends_with(":10256"),
        "{healthz} collides with kube-proxy"
    );
    let port: i32 = healthz.rsplit(':').next().unwrap().parse().unwrap();
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap();
        assert_eq!(get.port, IntOrString::Int(port));
    }
    let base_args = args_of(files.daemonset());
    let changed: Vec<_> = args.iter().filter(|a| !base_args.contains(a)).collect();
    assert_eq!(changed.len(), 3, "only the three flags differ: {changed:?}");
}

/// The overlay that keeps kube-proxy's configuration: the kube-proxy ConfigMap mounted read-only
/// where kube-proxy reads it, `--config` pointing at its config.conf, and the base's metrics and
/// healthz flags gone (they would win over the file). Nothing else changes.
#[test]
fn kubectl_kustomize_renders_the_kube_proxy_config_overlay() {
    let Some(overlay) = kustomize("deploy/kube-proxy-config/") else {
        return;
    };
    let files = manifests();
    assert_eq!(overlay.cluster_role(), files.cluster_role());
    let spec = pod_spec(overlay.daemonset());
    let c = agent_container(spec);
    let args = args(c);
    assert_eq!(
        flag(args, "--config"),
        Some("/var/lib/kube-proxy/config.conf")
    );
    assert_eq!(flag(args, "--metrics-bind-address"), None);
    assert_eq!(flag(args, "--healthz-bind-address"), None);
    let v = volume(spec, "kube-proxy-config");
    assert_eq!(
        v.config_map.as_ref().map(|c| c.name.as_str()),
        Some("kube-proxy"),
        "the kube-proxy ConfigMap itself, unchanged"
    );
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "kube-proxy-config")
        .expect("kube-proxy-config mounted");
    assert_eq!(m.mount_path, "/var/lib/kube-proxy");
    assert_eq!(m.read_only, Some(true));
    let base_args = args_of(files.daemonset());
    let added: Vec<_> = args.iter().filter(|a| !base_args.contains(a)).collect();
    assert_eq!(added, ["--config=/var/lib/kube-proxy/config.conf"]);
    assert_eq!(base_args.len(), args.len() + 1, "two flags go, one comes");
}

fn args_of(ds: &DaemonSet) -> Vec<String> {
    args(agent_container(pod_spec(ds))).to_vec()
}

/// The string values of an overlay's JSON patches that are flags.
fn overlay_flags(overlay: &str) -> Vec<String> {
    let path = deploy().join(overlay).join("kustomization.yaml");
    let text = fs::read_to_string(&path).unwrap();
    let doc = &documents(&text, &path.display().to_string())[0];
    let mut out = Vec::new();
    for patch in doc["patches"].as_sequence().expect("patches") {
        let ops: Vec<Value> =
            serde_yaml::from_str(patch["patch"].as_str().expect("inline patch")).unwrap();
        for op in ops {
            if let Some(v) = op["value"].as_str().filter(|v| v.starts_with("--")) {
                out.push(v.to_owned());
            }
        }
    }
    assert!(!out.is_empty(), "the overlay adds flags");
    out
}

#[test]
fn daemonset_flags_are_accepted_by_the_agent() {
    let bin = tests::agent_bin().expect("the proxy-agent binary");
    let out = Command::new(&bin)
        .args(["run", "--help"])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    assert!(out.status.success(), "{} run --help failed", bin.display());
    let help = String::from_utf8(out.stdout).unwrap();

    let objects = manifests();
    let mut args = args_of(objects.daemonset());
    assert_eq!(
        args.remove(0),
        "run",
        "the DaemonSet runs `proxy-agent run`"
    );
    args.extend(overlay_flags("side-by-side"));
    args.extend(overlay_flags("kube-proxy-config"));
    for arg in &args {
        assert!(arg.starts_with("--"), "not a flag: {arg}");
        let name = arg.split('=').next().unwrap();
        assert!(
            arg.contains('='),
            "{arg}: use --flag=value, so every arg stands alone"
        );
        assert!(
            help.contains(&format!("{name} <")),
            "`proxy-agent run` has no flag {name} (from {arg}):\n{help}"
        );
    }
}

/// The Dockerfile's instructions: comments dropped, continuation lines joined.
fn dockerfile() -> Vec<String> {
    let text = fs::read_to_string(root().join("Dockerfile")).expect("a Dockerfile at the root");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[test]
fn dockerfile_builds_with_the_pinned_toolchains_and_ships_only_the_agent() {
    let instructions = dockerfile();
    let froms: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, i)| i.starts_with("FROM "))
        .map(|(n, _)| n)
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {} FROM", froms.len());

    // The builder is the Rust of rust-toolchain.toml, and reads the other pins from their files.
    let toolchain = fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel")?.split('"').nth(1))
        .expect("channel in rust-toolchain.toml");
    let minor: Vec<&str> = channel.split('.').take(2).collect();
    let builder = &instructions[froms[0]];
    assert!(
        builder.starts_with(&format!("FROM rust:{}", minor.join("."))),
        "builder {builder:?} does not match channel {channel}"
    );
    let build = instructions[froms[0]..*froms.last().unwrap()].join("\n");
    for needle in [
        "rust-toolchain.toml",
        "EBPF_TOOLCHAIN",
        "rust-src",
        "BPF_LINKER_VERSION",
        "cargo +\"$user_tc\" install bpf-linker",
        "no-llvm-linking",
        "cargo build --release --locked -p proxy-agent",
    ] {
        assert!(build.contains(needle), "builder lacks {needle:?}");
    }

    // The final stage: Debian slim, the binary copied from the builder, run as the entrypoint.
    let last = &instructions[*froms.last().unwrap()..];
    assert_eq!(last[0], "FROM debian:bookworm-slim");
    let copy = last
        .iter()
        .find(|i| i.starts_with("COPY --from="))
        .expect("the final stage copies from the builder");
    let dest = copy.split_whitespace().last().unwrap();
    assert!(
        copy.contains("proxy-agent") && dest.ends_with("/proxy-agent"),
        "{copy}"
    );
    assert!(
        last.iter()
            .all(|i| !i.starts_with("COPY ") || i.starts_with("COPY --from=")),
        "the final stage holds nothing from the build context"
    );
    let entrypoint = last
        .iter()
        .find_map(|i| i.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("exec-form ENTRYPOINT");
    assert_eq!(entrypoint, [dest]);

    let ignore = fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        ".dockerignore leaves out target/"
    );
}

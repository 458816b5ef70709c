//! The manifest source: Kubernetes YAML/JSON files or directories, reloaded when they change.
use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

use crate::{model::Inputs, report::SourceError};

/// Objects read from the files, plus one error per document that could not be used.
#[derive(Debug, Default)]
pub struct Loaded {
    pub inputs: Inputs,
    pub errors: Vec<SourceError>,
}

fn path_error(p: &Path, message: String) -> SourceError {
    SourceError {
        file: p.display().to_string(),
        message,
        ..Default::default()
    }
}

/// Where in the file: the document, and the line and column when the parser knows them.
fn at(doc: &str, e: &serde_yaml::Error) -> String {
    match e.location() {
        Some(l) => format!("{doc}, line {} column {}", l.line(), l.column()),
        None => doc.to_string(),
    }
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Every manifest file under `paths` (files as given, directories recursively), sorted.
fn files(paths: &[PathBuf], errors: &mut Vec<SourceError>) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<SourceError>) {
        match fs::read_dir(p) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let path = e.path();
                    // Editors and atomic writers leave dotfiles; Kubernetes tooling skips them too.
                    if e.file_name().to_string_lossy().starts_with('.') {
                        continue;
                    }
                    if path.is_dir() {
                        walk(&path, out, errors);
                    } else if is_manifest(&path) {
                        out.push(path);
                    }
                }
            }
            Err(e) => errors.push(path_error(p, e.to_string())),
        }
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out, errors);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            errors.push(path_error(p, "no such file or directory".into()));
        }
    }
    out.sort();
    out
}

/// Parses one multi-document YAML (or JSON) text. Documents of other kinds are ignored; a bad
/// document is reported (file, document index, kind and name) and does not stop the others.
pub fn parse_into(text: &str, origin: &str, loaded: &mut Loaded) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                loaded.errors.push(SourceError {
                    file: origin.into(),
                    object: String::new(),
                    field: at(&format!("document {i}"), &e),
                    message: format!("invalid YAML: {e}"),
                });
                // The stream cannot be resumed after a syntax error.
                return;
            }
        };
        add_value(value, origin, &format!("document {i}"), loaded);
    }
}

fn add_value(value: serde_yaml::Value, origin: &str, doc: &str, loaded: &mut Loaded) {
    if value.is_null() {
        return;
    }
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    let namespace = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .map(|n| format!("{n}/"))
        .unwrap_or_default();
    let bad = |e: serde_yaml::Error| SourceError {
        file: origin.into(),
        object: format!("{kind} {namespace}{name}"),
        field: at(doc, &e),
        message: e.to_string(),
    };
    match kind.as_str() {
        "Service" => match serde_yaml::from_value::<Service>(value) {
            Ok(o) => loaded.inputs.services.push(o),
            Err(e) => loaded.errors.push(bad(e)),
        },
        "EndpointSlice" => match serde_yaml::from_value::<EndpointSlice>(value) {
            Ok(o) => loaded.inputs.slices.push(o),
            Err(e) => loaded.errors.push(bad(e)),
        },
        "Endpoints" => match serde_yaml::from_value::<Endpoints>(value) {
            Ok(o) => loaded.inputs.endpoints.push(o),
            Err(e) => loaded.errors.push(bad(e)),
        },
        "Node" => match serde_yaml::from_value::<Node>(value) {
            Ok(o) => loaded.inputs.nodes.push(o),
            Err(e) => loaded.errors.push(bad(e)),
        },
        "List" | "ServiceList" | "EndpointSliceList" | "EndpointsList" => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for (j, item) in items.iter().enumerate() {
                    add_value(item.clone(), origin, &format!("{doc} items[{j}]"), loaded);
                }
            }
        }
        // Pods and anything else: not needed by the proxy.
        _ => {}
    }
}

/// Parses text that must be entirely valid (tests and tools).
pub fn parse_documents(text: &str, origin: &str) -> Result<Inputs, String> {
    let mut l = Loaded::default();
    parse_into(text, origin, &mut l);
    if l.errors.is_empty() {
        Ok(l.inputs)
    } else {
        Err(l
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "))
    }
}

/// What identifies a file's version: path, inode, size, mtime seconds and nanoseconds.
type FileId = (PathBuf, u64, u64, i64, i64);

/// Watches manifest paths by polling file identity (path, inode, size, mtime): cheap, and it
/// sees atomic renames, edits and new files in watched directories alike.
pub struct ManifestSource {
    paths: Vec<PathBuf>,
    /// `None` until the first load.
    fingerprint: Option<Vec<FileId>>,
    /// Each file's objects as of its last version that parsed without an error.
    last_good: BTreeMap<PathBuf, Inputs>,
}

impl ManifestSource {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            fingerprint: None,
            last_good: BTreeMap::new(),
        }
    }

    fn current_fingerprint(&self) -> (Vec<FileId>, Vec<SourceError>) {
        let mut errors = Vec::new();
        let fp = files(&self.paths, &mut errors)
            .into_iter()
            .filter_map(|p| {
                let m = fs::metadata(&p).ok()?;
                Some((p, m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
            })
            .collect();
        (fp, errors)
    }

    /// Reloads everything if any file changed (or on the first call); `None` if unchanged.
    ///
    /// A file that stops parsing (an edit half-written, a typo) keeps its last good objects, so
    /// its Services stay as they were and no other file is touched; its errors are reported.
    /// A file that never parsed contributes what it could. A deleted file's objects go.
    pub fn poll(&mut self, force: bool) -> Option<Loaded> {
        let (fp, errors) = self.current_fingerprint();
        if !force && self.fingerprint.as_ref() == Some(&fp) {
            return None;
        }
        let mut loaded = Loaded {
            errors,
            ..Default::default()
        };
        let mut last_good = BTreeMap::new();
        for (path, ..) in &fp {
            let mut file = Loaded::default();
            match fs::read_to_string(path) {
                Ok(text) => parse_into(&text, &path.display().to_string(), &mut file),
                Err(e) => file.errors.push(path_error(path, e.to_string())),
            }
            let inputs = if file.errors.is_empty() {
                last_good.insert(path.clone(), file.inputs.clone());
                file.inputs
            } else if let Some(good) = self.last_good.remove(path) {
                for e in &mut file.errors {
                    e.message
                        .push_str(" (serving the file's last good version)");
                }
                last_good.insert(path.clone(), good.clone());
                good
            } else {
                file.inputs
            };
            let l = &mut loaded.inputs;
            l.services.extend(inputs.services);
            l.slices.extend(inputs.slices);
            l.endpoints.extend(inputs.endpoints);
            l.nodes.extend(inputs.nodes);
            loaded.errors.extend(file.errors);
        }
        self.last_good = last_good;
        self.fingerprint = Some(fp);
        Some(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_documents_do_not_stop_the_rest() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: notanumber}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 198.18.100.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n";
        let mut l = Loaded::default();
        parse_into(text, "f.yaml", &mut l);
        assert_eq!(l.inputs.services.len(), 1);
        assert_eq!(l.errors.len(), 1);
        let e = &l.errors[0];
        assert_eq!(
            (e.file.as_str(), e.object.as_str(), e.field.as_str()),
            ("f.yaml", "Service a", "document 0"),
            "{e}"
        );
        let mut l = Loaded::default();
        parse_into(
            "kind: Service\nmetadata: {name: x\n  bad: [\n",
            "g.yaml",
            &mut l,
        );
        assert_eq!(l.errors.len(), 1);
        assert!(
            l.errors[0].field.starts_with("document 0, line "),
            "{}",
            l.errors[0]
        );
    }

    #[test]
    fn poll_sees_changes_and_new_files() {
        let dir = std::env::temp_dir().join(format!("pxmanifest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let svc = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
            )
        };
        fs::write(dir.join("a.yaml"), svc("198.18.100.1")).unwrap();
        let mut src = ManifestSource::new(vec![dir.clone()]);
        assert_eq!(src.poll(false).unwrap().inputs.services.len(), 1);
        assert!(src.poll(false).is_none());
        fs::write(dir.join("b.yml"), svc("198.18.100.2")).unwrap();
        fs::write(dir.join(".b.yml.tmp"), "garbage: [").unwrap();
        assert_eq!(src.poll(false).unwrap().inputs.services.len(), 2);
        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(src.poll(false).unwrap().inputs.services.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The "bad input" rule: a file that stops parsing keeps its last good objects and is
    /// reported; another file's edits still apply; deleting the broken file removes only its
    /// objects.
    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("pxmanifest-bad-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: n}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
            )
        };
        let ips = |l: &Loaded| -> Vec<String> {
            let mut v: Vec<String> = l
                .inputs
                .services
                .iter()
                .filter_map(|s| s.spec.as_ref()?.cluster_ip.clone())
                .collect();
            v.sort();
            v
        };
        fs::write(dir.join("a.yaml"), svc("a", "198.18.100.1")).unwrap();
        fs::write(dir.join("b.yaml"), svc("b", "198.18.100.2")).unwrap();
        let mut src = ManifestSource::new(vec![dir.clone()]);
        assert!(src.poll(false).unwrap().errors.is_empty());
        // a.yaml half-written (a syntax error), b.yaml edited meanwhile.
        fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a\n",
        )
        .unwrap();
        fs::write(dir.join("b.yaml"), svc("b", "198.18.100.3")).unwrap();
        let l = src.poll(false).unwrap();
        assert_eq!(ips(&l), ["198.18.100.1", "198.18.100.3"]);
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        assert!(l.errors[0].file.ends_with("a.yaml"), "{}", l.errors[0]);
        assert!(
            l.errors[0].message.contains("last good version"),
            "{}",
            l.errors[0]
        );
        // A bad field in a file that parsed before: the same.
        fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: n}\nspec: {ports: [{port: eighty}]}\n",
        )
        .unwrap();
        let l = src.poll(false).unwrap();
        assert_eq!(ips(&l), ["198.18.100.1", "198.18.100.3"]);
        assert_eq!(l.errors[0].object, "Service n/a");
        // Fixed: the new version; deleted: only its objects go.
        fs::write(dir.join("a.yaml"), svc("a", "198.18.100.4")).unwrap();
        let l = src.poll(false).unwrap();
        assert_eq!(
            (ips(&l), l.errors.len()),
            (
                vec!["198.18.100.3".to_string(), "198.18.100.4".to_string()],
                0
            )
        );
        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(ips(&src.poll(false).unwrap()), ["198.18.100.3"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! The manifest source: Kubernetes YAML/JSON files or directories, reloaded when they change.
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

use crate::model::Inputs;

/// Objects read from the files, plus one message per document that could not be used.
#[derive(Debug, Default)]
pub struct Loaded {
    pub inputs: Inputs,
    pub errors: Vec<String>,
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Every manifest file under `paths` (files as given, directories recursively), sorted.
fn files(paths: &[PathBuf], errors: &mut Vec<String>) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<String>) {
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
            Err(e) => errors.push(format!("{}: {e}", p.display())),
        }
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out, errors);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            errors.push(format!("{}: no such file or directory", p.display()));
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
                loaded
                    .errors
                    .push(format!("{origin}: document {i}: invalid YAML: {e}"));
                // The stream cannot be resumed after a syntax error.
                return;
            }
        };
        add_value(value, &format!("{origin}: document {i}"), loaded);
    }
}

fn add_value(value: serde_yaml::Value, at: &str, loaded: &mut Loaded) {
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
    let bad = |e: serde_yaml::Error| format!("{at}: {kind} {name}: {e}");
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
                    add_value(item.clone(), &format!("{at} items[{j}]"), loaded);
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
        Err(l.errors.join("; "))
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
}

impl ManifestSource {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            fingerprint: None,
        }
    }

    fn current_fingerprint(&self) -> (Vec<FileId>, Vec<String>) {
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
    pub fn poll(&mut self, force: bool) -> Option<Loaded> {
        let (fp, errors) = self.current_fingerprint();
        if !force && self.fingerprint.as_ref() == Some(&fp) {
            return None;
        }
        let mut loaded = Loaded {
            errors,
            ..Default::default()
        };
        for (path, ..) in &fp {
            match fs::read_to_string(path) {
                Ok(text) => parse_into(&text, &path.display().to_string(), &mut loaded),
                Err(e) => loaded.errors.push(format!("{}: {e}", path.display())),
            }
        }
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
        assert!(
            l.errors[0].starts_with("f.yaml: document 0: Service a:"),
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
}

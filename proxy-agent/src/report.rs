//! The agent's last sync outcome (rejected objects, Services that did not fit), kept in a small
//! file beside the pins so that `status` can show what the maps alone cannot.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

const RUN_DIR: &str = "/run/proxy-agent";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Rejected {
    pub object: String,
    pub field: String,
    pub message: String,
}

/// A manifest (or part of one) the source could not read: the file, the object when its kind
/// and name are known ("Service ns/name"), where in the file ("document 2, line 7"), and why.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceError {
    pub file: String,
    pub object: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.field)?;
        if !self.object.is_empty() {
            write!(f, ": {}", self.object)?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NotProgrammed {
    pub service: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncReport {
    pub pid: u32,
    pub generation: u64,
    pub unix_time: u64,
    pub source: String,
    pub rejected: Vec<Rejected>,
    pub not_programmed: Vec<NotProgrammed>,
    /// Hooks the configuration requires that are not attached (status exits non-zero).
    #[serde(default)]
    pub missing_hooks: Vec<String>,
    /// The kernel's features as probed at start and the choice made for each hook.
    #[serde(default)]
    pub kernel: Option<crate::datapath::probe::Report>,
    /// Manifests that did not parse (manifests source); a file in this list serves its last
    /// version that parsed, if any.
    #[serde(default)]
    pub source_errors: Vec<SourceError>,
    /// Frontends (`service` is the frontend's name) programmed with a fallback, and why: e.g.
    /// Maglev asked for more backends than its table has slots, served by random choice.
    #[serde(default)]
    pub fallbacks: Vec<NotProgrammed>,
}

/// One file per bpffs directory, so agents of several emulated nodes do not collide.
pub fn path(bpffs: &Path) -> PathBuf {
    let key: String = bpffs
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Path::new(RUN_DIR).join(format!("{key}.json"))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Replaces the file atomically; failures are logged, never fatal.
pub fn write(bpffs: &Path, report: &SyncReport) {
    let p = path(bpffs);
    let tmp = p.with_extension("tmp");
    let res = fs::create_dir_all(RUN_DIR)
        .and_then(|_| fs::write(&tmp, serde_json::to_vec_pretty(report).unwrap_or_default()))
        .and_then(|_| fs::rename(&tmp, &p));
    if let Err(e) = res {
        tracing::warn!(path = %p.display(), error = %e, "writing the sync report");
    }
}

pub fn read(bpffs: &Path) -> Option<SyncReport> {
    serde_json::from_slice(&fs::read(path(bpffs)).ok()?).ok()
}

pub fn remove(bpffs: &Path) -> Option<PathBuf> {
    let p = path(bpffs);
    fs::remove_file(&p).ok().map(|_| p)
}

//! Entering network namespaces: closures on a thread inside a namespace, and
//! listing the namespaces `ip netns` knows.

use std::fs::File;
use std::path::PathBuf;
use std::thread;

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

/// `/run/netns/NAME`, where `ip netns add` bind-mounts a namespace.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `f` on a fresh thread that first joins the network namespace `ns`, and
/// returns its result. Sockets created inside `f` stay in that namespace for
/// their whole life, even when handed back to another thread. A panic inside
/// `f` is propagated to the caller.
pub fn in_netns<F, R>(ns: &str, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let path = netns_path(ns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    thread::scope(|s| {
        let handle = s.spawn(move || -> Result<R> {
            // Only this thread changes namespace; it ends after `f`.
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {}", path.display()))?;
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
    .map_err(|e| anyhow!("in network namespace {ns}: {e:#}"))
}

/// Names of all namespaces in `/run/netns` (what `ip netns list` shows).
pub fn netns_list() -> Result<Vec<String>> {
    let mut names = Vec::new();
    let dir = match std::fs::read_dir("/run/netns") {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(e).context("reading /run/netns"),
    };
    for entry in dir {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

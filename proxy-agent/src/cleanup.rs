//! `proxy-agent cleanup`: detach every program and remove every pin, like `kube-proxy --cleanup`.
use std::path::Path;

pub fn cleanup(bpffs: &Path) -> anyhow::Result<()> {
    let mut removed = crate::datapath::loader::cleanup(bpffs)?;
    if let Some(p) = crate::report::remove(bpffs) {
        removed.push(p.display().to_string());
    }
    if removed.is_empty() {
        println!("nothing to clean up under {}", bpffs.display());
    } else {
        for r in &removed {
            println!("removed {r}");
        }
    }
    Ok(())
}

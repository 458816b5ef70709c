//! Loads the embedded eBPF object with its maps pinned under the bpffs directory, and attaches
//! the tc program to interfaces through pinned tcx links, so the datapath outlives the agent.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
};
use proxy_common::{names, programs};

use super::DatapathError;

/// The kernel programs, built by build.rs for bpfel-unknown-none.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy"));

const LINKS_DIR: &str = "links";

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Map capacities chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    /// Backends and backend slots.
    pub backends: u32,
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        use proxy_common::limits;
        Self {
            services: limits::SERVICES,
            backends: limits::BACKENDS,
            conntrack: limits::CONNTRACK,
        }
    }
}

/// Loads the object. Maps already pinned under `bpffs` are reused (their contents survive an
/// agent restart, and their size stays what it was); missing ones are created with `sizes`.
pub fn load(bpffs: &Path, sizes: MapSizes) -> Result<Ebpf, DatapathError> {
    fs::create_dir_all(bpffs.join(LINKS_DIR)).map_err(io_err(bpffs))?;
    let paths: Vec<(&str, PathBuf)> = names::ALL
        .iter()
        .map(|n| (*n, super::maps::pin_path(bpffs, n)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .map_max_entries(names::SERVICES, sizes.services)
        .map_max_entries(names::SVC_NAMES, sizes.services)
        .map_max_entries(names::SLOTS, sizes.backends)
        .map_max_entries(names::BACKENDS, sizes.backends)
        .map_max_entries(names::CONNTRACK, sizes.conntrack);
    let mut ebpf = loader.load(OBJECT)?;
    tc_program(&mut ebpf)?
        .load()
        .map_err(|source| DatapathError::Program {
            name: programs::TC_INGRESS,
            source,
        })?;
    Ok(ebpf)
}

pub fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DatapathError> {
    let name = programs::TC_INGRESS;
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn link_pin(bpffs: &Path, iface: &str) -> PathBuf {
    bpffs
        .join(LINKS_DIR)
        .join(format!("{}@{iface}", programs::TC_INGRESS))
}

/// Attaches tc ingress on `iface`. If a pinned link exists (an earlier agent attached it), the
/// program inside it is replaced atomically: no packet sees the interface without a program.
pub fn attach_tc(
    prog: &mut SchedClassifier,
    bpffs: &Path,
    iface: &str,
) -> Result<(), DatapathError> {
    let pin = link_pin(bpffs, iface);
    let fail = |message: String| DatapathError::Attach {
        iface: iface.to_string(),
        message,
    };
    match PinnedLink::from_pin(&pin) {
        Ok(old) => {
            let link = SchedClassifierLink::try_from(FdLink::from(old))
                .map_err(|e| fail(format!("pinned link {}: {e}", pin.display())))?;
            match prog.attach_to_link(link) {
                // The pin still references the (now updated) link; our fd can go.
                Ok(id) => {
                    let _ = prog.take_link(id);
                    return Ok(());
                }
                // The interface was deleted and recreated: the old link is defunct.
                Err(e) => {
                    tracing::info!(iface, error = %e, "replacing a defunct pinned link");
                    fs::remove_file(&pin).map_err(io_err(&pin))?;
                }
            }
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("pinned link {}: {e}", pin.display()))),
    }
    let _ = aya::programs::tc::qdisc_add_clsact(iface);
    let id = prog
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
        )
        .map_err(|e| fail(e.to_string()))?;
    let link = prog.take_link(id).map_err(|e| fail(e.to_string()))?;
    let fd: FdLink = link
        .try_into()
        .map_err(|e: LinkError| fail(e.to_string()))?;
    fd.pin(&pin)
        .map_err(|e| fail(format!("pinning {}: {e}", pin.display())))?;
    Ok(())
}

/// One pinned attachment, as `status` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attachment {
    pub interface: String,
    pub hook: String,
    pub mode: &'static str,
}

/// Attachments recorded as pinned links under `bpffs`.
pub fn attachments(bpffs: &Path) -> Vec<Attachment> {
    let mut out: Vec<Attachment> = fs::read_dir(bpffs.join(LINKS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let (hook, iface) = name.split_once('@')?;
            Some(Attachment {
                interface: iface.to_string(),
                hook: hook.to_string(),
                mode: "tcx",
            })
        })
        .collect();
    out.sort_by(|a, b| a.interface.cmp(&b.interface));
    out
}

/// Drops the pins of links whose interface is gone (the kernel already detached them).
pub fn forget_interface(bpffs: &Path, iface: &str) {
    let _ = fs::remove_file(link_pin(bpffs, iface));
}

/// Detaches everything and removes every pin the agent made; safe to run twice.
pub fn cleanup(bpffs: &Path) -> Result<Vec<String>, DatapathError> {
    let mut removed = Vec::new();
    if !bpffs.exists() {
        return Ok(removed);
    }
    // Links first: removing the last reference to a link detaches its program.
    let links = bpffs.join(LINKS_DIR);
    for e in fs::read_dir(&links).into_iter().flatten().flatten() {
        fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
        removed.push(e.path().display().to_string());
    }
    if links.exists() {
        fs::remove_dir(&links).map_err(io_err(&links))?;
    }
    for name in names::ALL {
        let p = super::maps::pin_path(bpffs, name);
        if p.exists() {
            fs::remove_file(&p).map_err(io_err(&p))?;
            removed.push(p.display().to_string());
        }
    }
    // Only remove the directory if nothing else lives there.
    if fs::read_dir(bpffs).map_err(io_err(bpffs))?.next().is_none() {
        fs::remove_dir(bpffs).map_err(io_err(bpffs))?;
    }
    Ok(removed)
}

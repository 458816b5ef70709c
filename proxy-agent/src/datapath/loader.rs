//! Loads the embedded eBPF object with its maps pinned under the bpffs directory, and attaches
//! the tc program to interfaces through pinned tcx links, so the datapath outlives the agent.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
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

/// Which optional programs go into the kernel: a feature that is off loads nothing, so it
/// needs nothing of the kernel (the XDP program uses helpers of newer kernels than tc does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enabled {
    pub xdp: bool,
    pub socket_lb: bool,
}

impl Enabled {
    pub const ALL: Self = Self {
        xdp: true,
        socket_lb: true,
    };
}

/// Loads the object and finishes any map replacement at once (for tools and tests that do not
/// attach).
pub fn load(bpffs: &Path, sizes: MapSizes) -> Result<Ebpf, DatapathError> {
    let (ebpf, migration) = load_replacing(bpffs, sizes)?;
    migration.finish().map_err(io_err(bpffs))?;
    Ok(ebpf)
}

/// Loads the object. Maps already pinned under `bpffs` are reused (their contents survive an
/// agent restart); pinned maps of another shape are replaced (see `migrate`), and the returned
/// migration must be finished once the new programs are attached.
pub fn load_replacing(
    bpffs: &Path,
    sizes: MapSizes,
) -> Result<(Ebpf, super::migrate::Migration), DatapathError> {
    load_enabled(bpffs, sizes, Enabled::ALL)
}

/// The variant of the programs a kernel gets: code behind a feature it lacks is cut out at
/// load time (read-only globals, which the verifier folds, so the dead branch is never
/// checked against the kernel's helper list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// `bpf_set_retval` (Linux 5.18): the socket hooks refuse with ECONNREFUSED, else EPERM.
    pub set_retval: bool,
}

impl Variant {
    /// What the running kernel supports.
    pub fn current() -> Self {
        Self {
            set_retval: aya::util::KernelVersion::current()
                .map(|v| v >= aya::util::KernelVersion::new(5, 18, 0))
                .unwrap_or(true),
        }
    }
    /// The kernel floor the README names (5.15 / 6.1): none of the newer features.
    pub const FLOOR: Self = Self { set_retval: false };
}

/// [`load_replacing`], loading only the optional programs `enabled` names.
pub fn load_enabled(
    bpffs: &Path,
    sizes: MapSizes,
    enabled: Enabled,
) -> Result<(Ebpf, super::migrate::Migration), DatapathError> {
    load_variant(bpffs, sizes, enabled, Variant::current())
}

/// [`load_enabled`] for the programs' `variant`.
pub fn load_variant(
    bpffs: &Path,
    sizes: MapSizes,
    enabled: Enabled,
    variant: Variant,
) -> Result<(Ebpf, super::migrate::Migration), DatapathError> {
    fs::create_dir_all(bpffs.join(LINKS_DIR)).map_err(io_err(bpffs))?;
    let migration = super::migrate::prepare(bpffs, sizes).map_err(io_err(bpffs))?;
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
        .map_max_entries(names::MAGLEV, sizes.services)
        .map_max_entries(names::SLOTS, sizes.backends)
        .map_max_entries(names::BACKENDS, sizes.backends)
        .map_max_entries(names::CONNTRACK, sizes.conntrack);
    // bpf_set_retval (ECONNREFUSED from the socket hooks) came with Linux 5.18; before it the
    // hooks refuse with EPERM.
    let set_retval = variant.set_retval as u8;
    loader.override_global("SOCK_SET_RETVAL", &set_retval, true);
    let mut ebpf = loader.load(OBJECT)?;
    tc_program(&mut ebpf)?
        .load()
        .map_err(|source| DatapathError::Program {
            name: programs::TC_INGRESS,
            source,
        })?;
    if enabled.socket_lb {
        for name in programs::SOCK_ALL {
            sock_program(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
    }
    if enabled.xdp {
        xdp_program(&mut ebpf)?
            .load()
            .map_err(|source| DatapathError::Program {
                name: programs::XDP_INGRESS,
                source,
            })?;
    }
    migration.copy().map_err(io_err(bpffs))?;
    Ok((ebpf, migration))
}

/// The program `name` of the object, as its type `T`.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    program(ebpf, name)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer the kernel reads (and may write).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned BPF object (BPF_OBJ_GET).
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program inside a link in one step (BPF_LINK_UPDATE): the hook never runs
/// without a program, so an agent restart or upgrade does not disturb traffic.
fn link_update(link: BorrowedFd, prog: BorrowedFd) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    attr[0] = link.as_raw_fd() as u32 as u64 | (prog.as_raw_fd() as u32 as u64) << 32;
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

fn sock_pin(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join(LINKS_DIR).join(format!("{name}@cgroup"))
}

/// Attaches the socket-LB programs to a cgroup v2 directory (every process below it, in any
/// network namespace). Pinned links from an earlier agent are updated in place.
pub fn attach_sock(ebpf: &mut Ebpf, bpffs: &Path, cgroup: &Path) -> Result<(), DatapathError> {
    let cg = fs::File::open(cgroup).map_err(io_err(cgroup))?;
    let fail = |message: String| DatapathError::Attach {
        iface: format!("cgroup {}", cgroup.display()),
        message,
    };
    for name in programs::SOCK_ALL {
        let pin = sock_pin(bpffs, name);
        let prog = sock_program(ebpf, name)?;
        if pin.exists() {
            let prog_fd = prog.fd().map_err(|e| fail(e.to_string()))?;
            match obj_get(&pin).and_then(|link| link_update(link.as_fd(), prog_fd.as_fd())) {
                Ok(()) => continue,
                Err(e) => {
                    tracing::info!(program = name, error = %e, "replacing a stale pinned link");
                    fs::remove_file(&pin).map_err(io_err(&pin))?;
                }
            }
        }
        // A cgroup link is always one of many programs on the hook (the kernel refuses
        // attach flags on BPF_LINK_CREATE), so other tools' programs can coexist.
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| fail(format!("{name}: {e:?}")))?;
        let link = prog.take_link(id).map_err(|e| fail(e.to_string()))?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e: LinkError| fail(e.to_string()))?;
        fd.pin(&pin)
            .map_err(|e| fail(format!("pinning {}: {e}", pin.display())))?;
    }
    Ok(())
}

/// Detaches socket LB (used for `--socket-lb=false`, so the tc path takes over).
pub fn detach_sock(bpffs: &Path) {
    for name in programs::SOCK_ALL {
        let _ = fs::remove_file(sock_pin(bpffs, name));
    }
}

pub fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DatapathError> {
    program(ebpf, programs::TC_INGRESS)
}

fn link_pin(bpffs: &Path, iface: &str) -> PathBuf {
    bpffs
        .join(LINKS_DIR)
        .join(format!("{}@{iface}", programs::TC_INGRESS))
}

/// `--tc-attach`: how the tc program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// tcx where the kernel has it (Linux 6.6), the netlink filter otherwise.
    Auto,
    /// tcx links (pinned; one of many programs on the hook).
    Tcx,
    /// A direct-action cls_bpf filter on the clsact qdisc, for kernels without tcx.
    Netlink,
}

/// Our legacy filter's place on clsact ingress: a fixed priority and handle, so a restarted
/// agent replaces it in place and cleanup removes only it; other filters (other priorities)
/// are left alone. tcx programs run before every clsact filter.
const NL_PRIORITY: u16 = 0xc5e1;
const NL_HANDLE: aya::programs::tc::TcHandle = aya::programs::tc::TcHandle::new(0, 0x5e1);

/// An empty directory (bpffs takes no regular files) recording that we own the netlink filter
/// on `iface`: the kernel keeps a filter with no process or pin holding it.
fn netlink_marker(bpffs: &Path, iface: &str) -> PathBuf {
    bpffs.join(LINKS_DIR).join(format!("tc_netlink@{iface}"))
}

fn nl_link(iface: &str) -> io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(iface, TcAttachType::Ingress, NL_PRIORITY, NL_HANDLE, None)
}

/// Removes our netlink filter from `iface` (if the marker says we made one).
pub fn detach_tc_netlink(bpffs: &Path, iface: &str) {
    let marker = netlink_marker(bpffs, iface);
    if !marker.exists() {
        return;
    }
    use aya::programs::links::Link as _;
    if let Ok(link) = nl_link(iface)
        && let Err(e) = link.detach()
    {
        tracing::debug!(iface, error = %e, "removing our netlink tc filter");
    }
    let _ = fs::remove_dir(&marker);
}

/// Attaches tc ingress on `iface` in `mode` (Auto resolved by the caller's probe), and removes
/// an attachment of the other mode an earlier agent left there (both would translate twice).
pub fn attach_tc_mode(
    prog: &mut SchedClassifier,
    bpffs: &Path,
    iface: &str,
    netlink: bool,
) -> Result<(), DatapathError> {
    if !netlink {
        attach_tc(prog, bpffs, iface)?;
        detach_tc_netlink(bpffs, iface);
        return Ok(());
    }
    let fail = |message: String| DatapathError::Attach {
        iface: iface.to_string(),
        message,
    };
    let _ = aya::programs::tc::qdisc_add_clsact(iface);
    // Replace in place (cls_bpf swaps the program of an existing filter: no gap); where there
    // is none yet, create it (exclusive: a foreign filter at our priority and handle is an
    // error, not overwritten).
    let replaced = nl_link(iface)
        .map_err(|e| e.to_string())
        .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
    let id = match replaced {
        Ok(id) => id,
        Err(_) => prog
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(aya::programs::tc::NlOptions {
                    priority: NL_PRIORITY,
                    handle: NL_HANDLE,
                    classid: None,
                }),
            )
            .map_err(|e| fail(format!("netlink filter: {e}")))?,
    };
    // The filter must outlive this process like a pinned link: keep aya from detaching it.
    let link = prog.take_link(id).map_err(|e| fail(e.to_string()))?;
    std::mem::forget(link);
    let marker = netlink_marker(bpffs, iface);
    if !marker.exists() {
        fs::create_dir(&marker).map_err(io_err(&marker))?;
    }
    // A tcx link of an earlier agent in tcx mode would run before the filter: drop it.
    let _ = fs::remove_file(link_pin(bpffs, iface));
    Ok(())
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

pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    program(ebpf, programs::XDP_INGRESS)
}

/// `--xdp`: where the XDP fast path runs on external interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpSetting {
    /// Not attached (pinned XDP links of an earlier agent are removed).
    Off,
    /// Native (driver) mode where the driver has it, generic otherwise.
    Auto,
    /// Native mode only: an interface whose driver lacks it is an error.
    Native,
    /// Generic (socket buffer) mode: the same translation, without the driver's speed.
    Generic,
}

/// The kernel driver of `iface` (SIOCETHTOOL, ETHTOOL_GDRVINFO), if it answers.
pub fn driver_name(iface: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // struct ethtool_drvinfo: cmd, then driver[32] and more, 196 bytes in all.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    for (i, b) in iface.bytes().enumerate() {
        ifr.ifr_name[i] = b as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = info.as_mut_ptr() as *mut libc::c_char;
    // SAFETY: plain socket call; closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return None;
    }
    // SAFETY: `ifr` points at `info`, both alive for the call.
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut ifr) };
    // SAFETY: our descriptor.
    unsafe { libc::close(sock) };
    if rc != 0 {
        return None;
    }
    let driver = &info[4..36];
    let end = driver.iter().position(|&b| b == 0).unwrap_or(driver.len());
    Some(String::from_utf8_lossy(&driver[..end]).into_owned())
}

/// The pin of the XDP link on `iface`; its name records the mode (`status` reports it).
fn xdp_pin(bpffs: &Path, iface: &str, native: bool) -> PathBuf {
    let hook = if native { "xdp_native" } else { "xdp_generic" };
    bpffs.join(LINKS_DIR).join(format!("{hook}@{iface}"))
}

/// Removes the XDP links on `iface` (the kernel detaches a link with its last reference).
pub fn detach_xdp(bpffs: &Path, iface: &str) {
    for native in [true, false] {
        let _ = fs::remove_file(xdp_pin(bpffs, iface, native));
    }
}

/// Attaches XDP on `iface` in the mode `setting` allows, or swaps the program inside the
/// pinned link of an earlier agent (BPF_LINK_UPDATE: no packet meets the interface without a
/// program). Returns whether it runs in native mode.
pub fn attach_xdp(
    prog: &mut Xdp,
    bpffs: &Path,
    iface: &str,
    setting: XdpSetting,
) -> Result<bool, DatapathError> {
    let fail = |message: String| DatapathError::Attach {
        iface: iface.to_string(),
        message,
    };
    for native in [true, false] {
        let pin = xdp_pin(bpffs, iface, native);
        let allowed = match setting {
            XdpSetting::Auto => true,
            XdpSetting::Native => native,
            XdpSetting::Generic => !native,
            XdpSetting::Off => false,
        };
        if !allowed {
            let _ = fs::remove_file(&pin);
            continue;
        }
        if let Ok(old) = PinnedLink::from_pin(&pin) {
            let updated = XdpLink::try_from(FdLink::from(old))
                .map_err(|e| e.to_string())
                .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
            match updated {
                Ok(id) => {
                    let _ = prog.take_link(id);
                    return Ok(native);
                }
                Err(e) => {
                    tracing::info!(iface, error = %e, "replacing a defunct pinned XDP link");
                    fs::remove_file(&pin).map_err(io_err(&pin))?;
                }
            }
        }
    }
    let modes: &[(bool, XdpMode)] = match setting {
        XdpSetting::Off => return Err(fail("XDP is off".into())),
        // veth has a native mode, but hands XDP frames whose TCP/UDP checksums the sender
        // left to offload (CHECKSUM_PARTIAL, invisible to XDP), and its XDP_TX frames reach
        // the peer only if the peer runs NAPI: in the test bed, NodePort flows broke in native
        // mode and work in generic mode. `--xdp native` still forces it.
        XdpSetting::Auto if driver_name(iface).as_deref() == Some("veth") => {
            &[(false, XdpMode::Skb)]
        }
        XdpSetting::Auto => &[(true, XdpMode::Driver), (false, XdpMode::Skb)],
        XdpSetting::Native => &[(true, XdpMode::Driver)],
        XdpSetting::Generic => &[(false, XdpMode::Skb)],
    };
    let mut errors = Vec::new();
    for &(native, mode) in modes {
        let id = match prog.attach(iface, mode) {
            Ok(id) => id,
            Err(e) => {
                errors.push(format!("{mode:?}: {e}"));
                continue;
            }
        };
        let link = prog.take_link(id).map_err(|e| fail(e.to_string()))?;
        // Only a BPF link can be pinned (and so outlive the agent); netlink attachments
        // (kernels before 5.9) are refused rather than left behind unmanaged.
        let fd: FdLink = link
            .try_into()
            .map_err(|e: LinkError| fail(format!("XDP needs BPF links (Linux >= 5.9): {e}")))?;
        let pin = xdp_pin(bpffs, iface, native);
        fd.pin(&pin)
            .map_err(|e| fail(format!("pinning {}: {e}", pin.display())))?;
        return Ok(native);
    }
    Err(fail(format!("attaching XDP: {}", errors.join("; "))))
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
                mode: match hook {
                    _ if iface == "cgroup" => "cgroup-link",
                    "xdp_native" => "xdp-native",
                    "xdp_generic" => "xdp-generic",
                    "tc_netlink" => "tc-netlink",
                    _ => "tcx",
                },
            })
        })
        .collect();
    out.sort_by(|a, b| a.interface.cmp(&b.interface));
    out
}

/// Drops the pins of links whose interface is gone (the kernel already detached them).
pub fn forget_interface(bpffs: &Path, iface: &str) {
    let _ = fs::remove_file(link_pin(bpffs, iface));
    let _ = fs::remove_dir(netlink_marker(bpffs, iface));
    detach_xdp(bpffs, iface);
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
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(iface) = file.strip_prefix("tc_netlink@") {
            // Our filter only (priority and handle): other clsact users keep theirs.
            detach_tc_netlink(bpffs, iface);
            let _ = fs::remove_dir(e.path());
            removed.push(e.path().display().to_string());
            continue;
        }
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
    for e in fs::read_dir(bpffs).into_iter().flatten().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if file.starts_with("old_") || super::migrate::newer_version_of(&file).is_some() {
            fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
            removed.push(e.path().display().to_string());
        }
    }
    // Only remove the directory if nothing else lives there.
    if fs::read_dir(bpffs).map_err(io_err(bpffs))?.next().is_none() {
        fs::remove_dir(bpffs).map_err(io_err(bpffs))?;
    }
    Ok(removed)
}

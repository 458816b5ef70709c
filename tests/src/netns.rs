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

/// Turns GRO on for `iface` in network namespace `ns` (SIOCETHTOOL with ETHTOOL_SGRO). A veth
/// delivers frames that its peer sends with XDP_TX (native XDP) only when it has NAPI, which
/// GRO enables: the LAN bridge's ports need it for the nodes' XDP fast path.
pub fn enable_gro(ns: &str, iface: &str) -> Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let name = iface.to_string();
    in_netns(ns, move || -> Result<()> {
        // SAFETY: plain socket call; the descriptor is closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if sock < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut value = EthtoolValue {
            cmd: ETHTOOL_SGRO,
            data: 1,
        };
        // SAFETY: an all-zero ifreq is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = &mut value as *mut EthtoolValue as *mut libc::c_char;
        // SAFETY: `ifr` points at `value`, both alive for the call.
        let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut ifr) };
        let err = std::io::Error::last_os_error();
        // SAFETY: our descriptor.
        unsafe { libc::close(sock) };
        if rc != 0 {
            anyhow::bail!("enabling GRO on {name}: {err}");
        }
        Ok(())
    })?
}

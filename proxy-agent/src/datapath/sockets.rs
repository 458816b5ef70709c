//! Ends connected UDP sockets whose peer is a removed backend. Socket LB translates a ClusterIP
//! once, at connect(): such a socket keeps sending to its backend forever, which is how DNS
//! clients lose resolution for minutes after a CoreDNS pod goes away. kube-proxy flushes
//! conntrack for the same reason. Here every network namespace of the processes under the
//! socket-LB cgroup is visited, and matching sockets are destroyed with sock_diag's
//! SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY); the application's next call fails with
//! ECONNABORTED and a new socket is balanced afresh. A backend a frontend lost while another
//! still uses it ends only the sockets connected through that frontend: socket LB's reverse
//! record of the socket (by its cookie, which sock_diag reports) names the frontend.
use std::{
    collections::BTreeMap,
    fs, io,
    net::IpAddr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use proxy_common::{CT_REVERSE, SockKey, SockValue, names};

use super::{
    addr::{family, from_words, to_words},
    writer::{AddrPort, StaleUdp},
};

/// Socket LB's records (`sock_v1`): which frontend a socket was connected through.
pub struct SocketFrontends(HashMap<MapData, SockKey, SockValue>);

impl SocketFrontends {
    pub fn open(bpffs: &Path) -> io::Result<Self> {
        let data = MapData::from_pin(bpffs.join(names::SOCKETS)).map_err(io::Error::other)?;
        let map = aya::maps::Map::from_map_data(data)
            .and_then(HashMap::try_from)
            .map_err(io::Error::other)?;
        Ok(Self(map))
    }

    /// The frontend socket `cookie` was connected through, whose backend is `peer`.
    pub fn get(&self, cookie: u64, peer: AddrPort) -> Option<AddrPort> {
        let f = family(peer.0);
        let key = SockKey {
            cookie,
            addr: to_words(peer.0),
            port_be: peer.1.to_be(),
            family: f,
            dir: CT_REVERSE,
            _pad: 0,
        };
        let v = self.0.get(&key, 0).ok()?;
        Some((from_words(v.addr, f), u16::from_be(v.port_be)))
    }
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_ESTABLISHED: u32 = 1;
/// struct inet_diag_sockid: sport, dport, src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;

/// One process per network namespace below `cgroup`, by namespace inode.
fn namespaces(cgroup: &Path) -> BTreeMap<u64, u32> {
    fn walk(dir: &Path, out: &mut Vec<u32>) {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
    }
    let mut pids = Vec::new();
    walk(cgroup, &mut pids);
    let mut by_ns = BTreeMap::new();
    for pid in pids {
        if let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) {
            by_ns.entry(m.ino()).or_insert(pid);
        }
    }
    by_ns
}

fn nl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a properly sized timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
}

/// nlmsghdr + inet_diag_req_v2 for UDP over IPv4 (or IPv6), in established state.
fn request(kind: u16, flags: u16, seq: u32, v6: bool, sockid: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + 56);
    m.extend_from_slice(&((16 + 56) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8);
    m.push(libc::IPPROTO_UDP as u8);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    m.extend_from_slice(sockid);
    m
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: sending a buffer we own to the kernel (nl_pid 0).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads netlink messages until DONE (dump) or the ACK (request); calls `f` on each payload.
fn recv_all(fd: &OwnedFd, mut f: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: reading into a buffer we own.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            if len < 16 || off + len > n {
                return Ok(());
            }
            let payload = &buf[off + 16..off + len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(payload[..4].try_into().unwrap());
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
                _ => f(kind, payload),
            }
            off += (len + 3) & !3;
        }
    }
}

fn addr_of(words: &[u8], v6: bool) -> IpAddr {
    if v6 {
        let o: [u8; 16] = words[..16].try_into().unwrap();
        IpAddr::from(o)
    } else {
        let o: [u8; 4] = words[..4].try_into().unwrap();
        IpAddr::from(o)
    }
}

/// Destroys, in the current network namespace, the connected UDP sockets `stale` ends.
fn destroy_here(stale: &StaleUdp, frontends: Option<&SocketFrontends>) -> io::Result<usize> {
    let fd = nl_socket()?;
    let mut victims: Vec<(bool, [u8; SOCKID_LEN])> = Vec::new();
    for v6 in [false, true] {
        send(
            &fd,
            &request(
                SOCK_DIAG_BY_FAMILY,
                NLM_F_REQUEST | NLM_F_DUMP,
                1,
                v6,
                &[0; SOCKID_LEN],
            ),
        )?;
        recv_all(&fd, |kind, p| {
            // struct inet_diag_msg: family, state, timer, retrans, then the sockid.
            if kind != SOCK_DIAG_BY_FAMILY || p.len() < 4 + SOCKID_LEN {
                return;
            }
            let id: [u8; SOCKID_LEN] = p[4..4 + SOCKID_LEN].try_into().unwrap();
            let dport = u16::from_be_bytes([id[2], id[3]]);
            // An IPv6 socket's IPv4-mapped peer is the IPv4 backend socket LB wrote there.
            let dst = addr_of(&id[20..36], v6).to_canonical();
            let word = |at: usize| u32::from_ne_bytes(id[at..at + 4].try_into().unwrap()) as u64;
            let cookie = word(40) | word(44) << 32;
            if stale.ends((dst, dport), || frontends?.get(cookie, (dst, dport))) {
                victims.push((v6, id));
            }
        })?;
    }
    let mut destroyed = 0;
    for (i, (v6, id)) in victims.iter().enumerate() {
        send(
            &fd,
            &request(
                SOCK_DESTROY,
                NLM_F_REQUEST | NLM_F_ACK,
                2 + i as u32,
                *v6,
                id,
            ),
        )?;
        match recv_all(&fd, |_, _| {}) {
            Ok(()) => destroyed += 1,
            // Closed meanwhile: nothing left to do.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(destroyed)
}

/// Destroys the connected UDP sockets `stale` ends in every network namespace of the processes
/// below `cgroup`; `frontends` (socket LB's records) tells which frontend a socket was connected
/// through. Returns how many were destroyed.
pub fn destroy_udp_to(
    cgroup: &Path,
    stale: &StaleUdp,
    frontends: Option<&SocketFrontends>,
) -> io::Result<usize> {
    if stale.is_empty() {
        return Ok(0);
    }
    let mut total = 0;
    for (_, pid) in namespaces(cgroup) {
        let ns: PathBuf = format!("/proc/{pid}/ns/net").into();
        // setns affects only the calling thread: do it on a short-lived one.
        let r = std::thread::scope(|scope| {
            scope
                .spawn(|| -> io::Result<usize> {
                    let f = fs::File::open(&ns)?;
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(io::Error::from)?;
                    destroy_here(stale, frontends)
                })
                .join()
        })
        .map_err(|_| io::Error::other("socket destroyer thread panicked"))?;
        match r {
            Ok(n) => total += n,
            // The process may have exited since it was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

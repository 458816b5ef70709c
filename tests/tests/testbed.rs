//! Self-tests of the test bed, without proxy-agent: pod-to-pod across nodes,
//! node and external client to pod, TCP and UDP, and complete teardown.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use tests::{EXT_IP, Outcome, Proto, Tally, TestBed, netns_list, tcp_requests, udp_requests};

const T: Duration = Duration::from_secs(2);

fn check_direct(
    outcomes: &[Outcome],
    backend: &str,
    from: std::net::Ipv4Addr,
    to: SocketAddr,
) -> Result<()> {
    let tally = Tally::new(outcomes);
    tally.expect_no_failures()?;
    tally.expect_spread(&[backend], 1.0)?;
    for r in outcomes.iter().flatten() {
        ensure!(
            r.client.ip() == from,
            "backend saw {} instead of {from}",
            r.client
        );
        ensure!(r.peer == to, "client saw peer {} instead of {to}", r.peer);
        ensure!(
            r.backend_port == to.port(),
            "answered on port {}",
            r.backend_port
        );
    }
    Ok(())
}

fn leftovers(prefix: &str) -> Result<Vec<String>> {
    Ok(netns_list()?
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect())
}

#[test]
fn testbed_smoke() -> Result<()> {
    let mut bed = TestBed::new(2)?;
    let prefix = bed.prefix().to_string();
    let dir = bed.dir().to_path_buf();
    let client = bed.add_pod(1, "client")?;
    let server = bed.add_pod(2, "srv")?;
    let local = bed.add_pod(1, "srv-local")?;
    assert!(server.host_if.starts_with("pv") && client.host_if.starts_with("pv"));
    assert_eq!(client.ip.to_string(), "198.19.1.2");
    assert_eq!(local.ip.to_string(), "198.19.1.3");
    assert_eq!(server.ip.to_string(), "198.19.2.2");
    bed.start_echo(&server, &[8080, 8081], &[5353])?;
    bed.start_echo(&local, &[8080], &[])?;

    let tcp = SocketAddr::new(server.ip.into(), 8080);
    let tcp2 = SocketAddr::new(server.ip.into(), 8081);
    let udp = SocketAddr::new(server.ip.into(), 5353);

    // Pod on node1 -> pod on node2 (host-gw routing over the LAN).
    check_direct(
        &tcp_requests(&client.ns, tcp, 20, T)?,
        "srv",
        client.ip,
        tcp,
    )?;
    check_direct(
        &tcp_requests(&client.ns, tcp2, 5, T)?,
        "srv",
        client.ip,
        tcp2,
    )?;
    check_direct(
        &udp_requests(&client.ns, udp, 20, T)?,
        "srv",
        client.ip,
        udp,
    )?;
    // Pod -> pod on the same node.
    let l = SocketAddr::new(local.ip.into(), 8080);
    check_direct(
        &tcp_requests(&client.ns, l, 5, T)?,
        "srv-local",
        client.ip,
        l,
    )?;
    // External client -> pod (through node1, then node2).
    check_direct(&tcp_requests(bed.ext_ns(), tcp, 10, T)?, "srv", EXT_IP, tcp)?;
    check_direct(&udp_requests(bed.ext_ns(), udp, 10, T)?, "srv", EXT_IP, udp)?;
    // Node -> remote pod: the node's LAN address is the source.
    let n1 = bed.node(1).clone();
    check_direct(&tcp_requests(&n1.ns, tcp, 5, T)?, "srv", n1.ip, tcp)?;
    // A client process inside the pod (its cgroup too).
    check_direct(
        &bed.pod_requests(&client, Proto::Tcp, tcp, 10, T)?,
        "srv",
        client.ip,
        tcp,
    )?;
    check_direct(
        &bed.pod_requests(&client, Proto::Udp, udp, 10, T)?,
        "srv",
        client.ip,
        udp,
    )?;
    if let Some(cg) = &client.cgroup {
        assert!(cg.is_dir(), "pod cgroup {} missing", cg.display());
    }

    // A dead port fails fast and is reported, not hung on.
    let dead = SocketAddr::new(server.ip.into(), 9);
    let t = Tally::new(&tcp_requests(&client.ns, dead, 3, T)?);
    ensure!(t.ok == 0 && t.failures.len() == 3, "dead port: {t}");

    // Manifests land atomically in the shared directory.
    bed.write_manifest("svc.yaml", "kind: Service\n")?;
    ensure!(bed.manifests_dir().join("svc.yaml").is_file());

    let namespaces = bed.namespaces().to_vec();
    ensure!(namespaces.len() == 7, "namespaces: {namespaces:?}");
    ensure!(leftovers(&prefix)?.len() == 7);
    let cgroups: Vec<_> = [&client, &server, &local]
        .iter()
        .filter_map(|p| p.cgroup.clone())
        .collect();

    drop(bed);
    let left = leftovers(&prefix)?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    ensure!(!dir.exists(), "{} left behind", dir.display());
    for cg in cgroups {
        ensure!(!cg.exists(), "cgroup {} left behind", cg.display());
        ensure!(!cg.parent().unwrap().parent().unwrap().exists());
    }
    Ok(())
}

#[test]
fn testbed_cleans_up_on_panic() -> Result<()> {
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let mut bed = TestBed::new(1).expect("bed");
        *prefix.lock().unwrap() = bed.prefix().to_string();
        let pod = bed.add_pod(1, "doomed").expect("pod");
        bed.start_echo(&pod, &[8080], &[]).expect("echo");
        panic!("deliberate panic with a live bed");
    });
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    let left = leftovers(&prefix)?;
    ensure!(
        left.is_empty(),
        "namespaces left behind after panic: {left:?}"
    );
    // Logs are kept on panic for debugging; remove them here.
    let dir = std::env::temp_dir().join(format!("{prefix}-bed"));
    if Path::new(&dir).exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// Minimal BPF loader for checking the attachment inspector: loads `r0 = ret;
/// exit` as `prog_type` and links it to `target` with `attach_type`. Returns
/// the (program, link) fds; closing the link detaches.
mod rawbpf {
    use std::os::fd::{FromRawFd, OwnedFd};

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<OwnedFd> {
        // SAFETY: attr is a zero-initialised 128-byte bpf_attr with the fields for cmd set.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
    }

    fn put_u32(attr: &mut [u64; 16], off: usize, v: u32) {
        let bytes: &mut [u8; 128] = bytemuck(attr);
        bytes[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u64(attr: &mut [u64; 16], off: usize, v: u64) {
        attr[off / 8] = v;
    }

    fn bytemuck(attr: &mut [u64; 16]) -> &mut [u8; 128] {
        // SAFETY: [u64; 16] and [u8; 128] have the same size; u8 has no alignment needs.
        unsafe { &mut *(attr as *mut [u64; 16]).cast::<[u8; 128]>() }
    }

    pub fn load_and_link(
        prog_type: u32,
        expected_attach_type: u32,
        ret: i32,
        target: u32,
        attach_type: u32,
    ) -> std::io::Result<(OwnedFd, OwnedFd)> {
        // mov64 r0, ret; exit
        let mut insns = [0u8; 16];
        insns[0] = 0xb7;
        insns[4..8].copy_from_slice(&ret.to_ne_bytes());
        insns[8] = 0x95;
        static LICENSE: &[u8] = b"GPL\0";
        let mut attr = [0u64; 16];
        put_u32(&mut attr, 0, prog_type);
        put_u32(&mut attr, 4, 2);
        put_u64(&mut attr, 8, insns.as_ptr() as u64);
        put_u64(&mut attr, 16, LICENSE.as_ptr() as u64);
        put_u32(&mut attr, 68, expected_attach_type);
        let prog = bpf(BPF_PROG_LOAD, &mut attr)?;
        let mut attr = [0u64; 16];
        put_u32(&mut attr, 0, std::os::fd::AsRawFd::as_raw_fd(&prog) as u32);
        put_u32(&mut attr, 4, target);
        put_u32(&mut attr, 8, attach_type);
        let link = bpf(BPF_LINK_CREATE, &mut attr)?;
        Ok((prog, link))
    }
}

/// The inspector used by the cleanup test really sees tcx and cgroup links.
#[test]
fn testbed_inspector_sees_attachments() -> Result<()> {
    let bed = TestBed::new(1)?;
    let ns = bed.node(1).ns.clone();
    ensure!(tests::netns_attachments(&ns)?.is_empty());
    let ifindex: u32 = tests::in_netns(&ns, || {
        // SAFETY: a valid NUL-terminated interface name.
        unsafe { libc::if_nametoindex(c"lan0".as_ptr()) }
    })?;
    ensure!(ifindex != 0);
    // SCHED_CLS (3) returning TC_ACT_OK, linked as tcx ingress (46) on lan0.
    let tcx = tests::in_netns(&ns, || rawbpf::load_and_link(3, 0, 0, ifindex, 46))??;
    let seen = tests::netns_attachments(&ns)?;
    ensure!(
        seen.iter().any(|s| s.starts_with("lan0 tcx_ingress: 1")),
        "inspector missed the tcx link: {seen:?}"
    );
    drop(tcx);
    let seen = tests::netns_attachments(&ns)?;
    ensure!(
        seen.is_empty(),
        "still attached after closing the link: {seen:?}"
    );

    if let Some(cg) = bed.node(1).cgroup.clone() {
        let dir = std::fs::File::open(&cg)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dir) as u32;
        // CGROUP_SOCK_ADDR (18) for INET4_CONNECT (10), allowing everything.
        let link = rawbpf::load_and_link(18, 10, 1, fd, 10)?;
        let seen = tests::cgroup_attachments(&cg)?;
        ensure!(
            seen.iter().any(|s| s.contains("cgroup_inet4_connect: 1")),
            "inspector missed the cgroup link: {seen:?}"
        );
        drop(link);
        let seen = tests::cgroup_attachments(&cg)?;
        ensure!(seen.is_empty(), "cgroup link still attached: {seen:?}");
    }
    Ok(())
}

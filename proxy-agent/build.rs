//! Builds the eBPF object with the pinned nightly so the agent binary can embed it.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    // aya-build watches the eBPF crate; the shared layouts live next door.
    println!("cargo:rerun-if-changed=../proxy-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(proxy_common::EBPF_TOOLCHAIN),
    )
}

//! Builds the eBPF object (`flannel-ebpf`, on nightly with bpf-linker) so the
//! agent binary embeds it: one binary to deploy. `cargo xtask setup` installs
//! the toolchain pieces this needs.
fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "flannel-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../flannel-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}

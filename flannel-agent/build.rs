//! Builds the eBPF object (`flannel-ebpf`, on nightly with bpf-linker) so the
//! agent binary embeds it: one binary to deploy. `cargo xtask setup` installs
//! the toolchain pieces this needs.
fn main() -> anyhow::Result<()> {
    // aya-build watches the eBPF package; the programs also compile the
    // shared types, counter indices and decap decision of flannel-common,
    // and a stale object would count under shifted indices.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../flannel-common/src")
    );
    let ebpf = aya_build::Package {
        name: "flannel-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../flannel-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}

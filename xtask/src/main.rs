//! `cargo xtask`: the project's entry points.
//!
//! * `setup`: installs, idempotently and only what is missing, the nightly
//!   `rust-src`, `bpf-linker` built against the nightly's own libLLVM, the
//!   Debian packages the lab needs, and mounts bpffs.
//! * `build-ebpf`: builds the eBPF object.
//! * `demo`: a 3-node lab with pod traffic and the counters that show the
//!   eBPF path at work.
//! * `image`: static (musl) builds of the agent and the CNI plugin in an
//!   OCI image `FROM scratch`, built offline with buildah, saved as an
//!   archive under `target/image/`.
//! * `fuzz`: every `cargo fuzz` target for a bounded time, from the
//!   committed seeds in `fuzz/seeds/<target>`.
//! * `test`: every test, the privileged ones included, one at a time, then
//!   the quick benchmark.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Build the eBPF object.
    BuildEbpf,
    /// Run the 3-node demo.
    Demo,
    /// The benchmark: eBPF vs kernel path vs node-to-node, program costs,
    /// control plane; JSON, Markdown and SVG under target/bench.
    Bench {
        /// A short run that only proves the benchmark works (CI runs it).
        #[arg(long)]
        quick: bool,
        /// One part only (data, programs or control), written to
        /// target/bench/bench-<part>.json.
        #[arg(long, value_parser = ["data", "programs", "control"])]
        only: Option<String>,
    },
    /// Build the container image the DaemonSet runs (needs root): static
    /// binaries in an image FROM scratch, saved to
    /// target/image/flannel-ebpf-<tag>.tar and kept in buildah's store
    /// there.
    Image {
        /// Tags to build, one image build each (default: the tag
        /// deploy/kube-flannel-ebpf.yml names).
        #[arg(long)]
        tag: Vec<String>,
    },
    /// Run every fuzz target (cargo fuzz, nightly, libFuzzer) for a
    /// bounded time each, from the committed seed corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// One target only.
        #[arg(long)]
        target: Option<String>,
        /// A quick build: unoptimized, no AddressSanitizer (what `test`
        /// runs; libFuzzer's coverage guidance and the targets' own
        /// assertions and overflow checks stay).
        #[arg(long)]
        quick: bool,
    },
    /// Run all tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

/// Debian packages the build, the lab, the tests and the demo use.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("iproute2", "bridge"),
    ("iputils-ping", "ping"),
    ("procps", "sysctl"),
    ("iperf3", "iperf3"),
    // etcd-client compiles etcd's protobufs at build time.
    ("protobuf-compiler", "protoc"),
    // The etcd store's tests run a real etcd server.
    ("etcd-server", "etcd"),
    // The ip-masq tests read the rules back with nft.
    ("nftables", "nft"),
    // The reference CNI plugins: host-local (IPAM for the `flannel`
    // plugin), portmap (chained after it), bridge (stock-Flannel nodes).
    ("containernetworking-plugins", "/usr/lib/cni/host-local"),
    // portmap (Debian's 1.1) programs hostPorts with iptables.
    ("iptables", "iptables"),
    // A real container runtime for the CNI tests, with runc, and a
    // static busybox as the containers' root filesystem.
    ("podman", "podman"),
    ("runc", "runc"),
    ("busybox-static", "dpkg:busybox-static"),
    // The metrics tests check the text with promtool and scrape the lab's
    // agents with a real Prometheus server.
    ("prometheus", "promtool"),
    // The image: static binaries (musl-gcc compiles ring's C) and an OCI
    // image built FROM scratch without a registry.
    ("musl-tools", "x86_64-linux-musl-gcc"),
    ("buildah", "buildah"),
];

/// The Rust target of the image's static binaries.
const MUSL: &str = "x86_64-unknown-linux-musl";
/// The DaemonSet; the image is built under the name and tag it gives.
const MANIFEST: &str = "deploy/kube-flannel-ebpf.yml";

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => {
            setup_toolchain()?;
            run(Command::new("cargo")
                .current_dir(workspace().join("flannel-ebpf"))
                .args([
                    "+nightly",
                    "build",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                ]))
        }
        Cmd::Demo => run_lab_bin("flannel-demo", &[]),
        Cmd::Bench { quick, only } => bench(quick, only),
        Cmd::Image { tag } => image(&tag),
        Cmd::Fuzz {
            secs,
            target,
            quick,
        } => fuzz(secs, target.as_deref(), quick),
        Cmd::Test { args } => {
            setup()?;
            // The lab starts the agent binary; build it first.
            run(Command::new("cargo").current_dir(workspace()).args([
                "build",
                "-p",
                "flannel-agent",
            ]))?;
            // The container tests run the manifest's image, and roll
            // nodes from one build (`:a`) to another (`:b`).
            image(&[String::new(), "a".into(), "b".into()])?;
            let mut cmd = Command::new("cargo");
            cmd.current_dir(workspace())
                .args(["test", "--", "--test-threads=1"])
                .args(args);
            run_tests(&mut cmd)?;
            // Every fuzz target, briefly, from the committed seeds: a
            // crash fails the run.
            fuzz(FUZZ_TEST_SECS, None, true)?;
            // The benchmark must keep working: its short version, no thresholds.
            bench(true, None)
        }
    }
}

fn bench(quick: bool, only: Option<String>) -> Result<()> {
    let out = workspace().join("target").join("bench");
    let mut args = vec!["--out".to_string(), out.display().to_string()];
    if quick {
        args.push("--quick".into());
    }
    if let Some(part) = only {
        args.extend(["--only".into(), part]);
    }
    run_lab_bin("flannel-bench", &args)
}

/// Sets up, builds the agent, and runs one of the lab binaries (demo, bench).
fn run_lab_bin(bin: &str, args: &[String]) -> Result<()> {
    setup()?;
    let cargo = || {
        let mut c = Command::new("cargo");
        c.current_dir(workspace());
        c
    };
    run(cargo().args(["build", "--release", "-p", "flannel-agent"]))?;
    run(cargo()
        .args([
            "run",
            "--release",
            "-p",
            "flannel-tests",
            "--bin",
            bin,
            "--",
        ])
        .args(args))
}

/// Builds the static binaries once, then one image per tag (an empty tag
/// is the manifest's).
fn image(tags: &[String]) -> Result<()> {
    setup()?;
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|t| t.trim() == MUSL) {
        eprintln!("xtask: installing the {MUSL} target");
        run(Command::new("rustup").args(["target", "add", MUSL]))?;
    }
    run(Command::new("cargo").current_dir(workspace()).args([
        "build",
        "--release",
        "--target",
        MUSL,
        "-p",
        "flannel-agent",
        "--bins",
    ]))?;
    let bins = workspace().join("target").join(MUSL).join("release");
    for bin in ["flannel-agent", "flannel"] {
        let elf = std::fs::read(bins.join(bin))?;
        // A dynamic binary would need a loader the image does not have.
        if elf.windows(b"ld-linux".len()).any(|w| w == b"ld-linux") {
            bail!("{bin} is not statically linked");
        }
    }
    let manifest = std::fs::read_to_string(workspace().join(MANIFEST))?;
    let (name, manifest_tag) = manifest_image(&manifest)?;
    let tags: Vec<&str> = if tags.is_empty() {
        vec![manifest_tag.as_str()]
    } else {
        tags.iter()
            .map(|t| {
                if t.is_empty() {
                    manifest_tag.as_str()
                } else {
                    t.as_str()
                }
            })
            .collect()
    };
    let dir = workspace().join("target").join("image");
    std::fs::create_dir_all(&dir)?;
    let buildah = || {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(dir.join("storage"))
            .arg("--runroot")
            .arg(dir.join("run"))
            .args(["--storage-driver", "vfs"]);
        c
    };
    for tag in tags {
        let reference = format!("{name}:{tag}");
        let ctr = output(buildah().args(["from", "scratch"]))?
            .trim()
            .to_string();
        for bin in ["flannel-agent", "flannel"] {
            run(buildah()
                .args(["copy", "--chmod", "0755", &ctr])
                .arg(bins.join(bin))
                .arg(format!("/usr/local/bin/{bin}")))?;
        }
        run(buildah().args([
            "config",
            "--entrypoint",
            r#"["/usr/local/bin/flannel-agent"]"#,
            "--cmd",
            "run",
            "--label",
            "org.opencontainers.image.title=flannel-ebpf",
            "--label",
            &format!("org.opencontainers.image.version={tag}"),
            &ctr,
        ]))?;
        run(buildah().args(["commit", "--rm", &ctr, &reference]))?;
        let archive = dir.join(format!("flannel-ebpf-{tag}.tar"));
        let _ = std::fs::remove_file(&archive);
        run(buildah()
            .arg("push")
            .arg(&reference)
            .arg(format!("oci-archive:{}:{reference}", archive.display())))?;
        eprintln!("xtask: image {reference} -> {}", archive.display());
    }
    // Earlier builds of these tags, untagged now, would only fill the disk.
    let _ = buildah().args(["rmi", "--prune"]).output();
    Ok(())
}

/// The `image:` the manifest's containers run, as (name, tag).
fn manifest_image(manifest: &str) -> Result<(String, String)> {
    let image = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("image:"))
        .with_context(|| format!("{MANIFEST} names no image"))?
        .trim();
    let (name, tag) = image
        .rsplit_once(':')
        .with_context(|| format!("{MANIFEST}: image {image} has no tag"))?;
    Ok((name.to_string(), tag.to_string()))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and closes with one summary line
/// over every test binary (cargo's own last line is the last binary's).
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                match (
                    words.next().and_then(|n| n.parse::<u64>().ok()),
                    words.next(),
                ) {
                    (Some(n), Some("passed")) => passed += n,
                    (Some(n), Some("failed")) => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The fuzz targets, as `fuzz/Cargo.toml` names them.
fn fuzz_targets() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(workspace().join("fuzz").join("Cargo.toml"))?;
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let Some(name) = line.strip_prefix("name = ").filter(|_| in_bin) {
            names.push(name.trim_matches('"').to_string());
        }
    }
    anyhow::ensure!(!names.is_empty(), "fuzz/Cargo.toml names no target");
    Ok(names)
}

/// Seconds `cargo xtask test` fuzzes each target for.
const FUZZ_TEST_SECS: u64 = 10;

/// Runs each fuzz target for `secs` seconds: new inputs go to a scratch
/// corpus under target/, the committed seeds are read as they are. A crash
/// fails the run and leaves its input under fuzz/artifacts/<target>.
/// `quick`: a debug build without AddressSanitizer (a few minutes to
/// build instead of a quarter of an hour).
fn fuzz(secs: u64, only: Option<&str>, quick: bool) -> Result<()> {
    setup_fuzz()?;
    let dir = workspace().join("fuzz");
    let targets = fuzz_targets()?;
    if let Some(t) = only {
        anyhow::ensure!(targets.iter().any(|n| n == t), "no fuzz target {t}");
    }
    for target in targets
        .iter()
        .filter(|t| only.is_none_or(|o| o == t.as_str()))
    {
        let corpus = workspace().join("target").join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = dir.join("seeds").join(target);
        eprintln!("xtask: fuzzing {target} for {secs} s");
        let build: &[&std::ffi::OsStr] = if quick {
            &["--dev".as_ref(), "-s".as_ref(), "none".as_ref()]
        } else {
            &[]
        };
        run(Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly".as_ref(), "fuzz".as_ref(), "run".as_ref()] as [&std::ffi::OsStr; 3])
            .args(build)
            .args([
                target.as_ref(),
                corpus.as_os_str(),
                seeds.as_os_str(),
                "--".as_ref(),
                format!("-max_total_time={secs}").as_ref(),
                "-print_final_stats=1".as_ref(),
                "-timeout=10".as_ref(),
                "-rss_limit_mb=2048".as_ref(),
            ] as [&std::ffi::OsStr; 8]))?;
    }
    Ok(())
}

/// cargo-fuzz, if missing.
fn setup_fuzz() -> Result<()> {
    setup_toolchain()?;
    if Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

fn setup() -> Result<()> {
    setup_toolchain()?;
    setup_packages()?;
    mount_bpffs()
}

fn setup_toolchain() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // bpf-linker links the nightly's libLLVM dynamically: it runs (as
    // aya-build runs it) under `rustup run nightly`, which sets the path.
    if Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    // Build bpf-linker against the nightly's own LLVM so the two always match.
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV names no LLVM version")?
        .to_string();
    let prefix = workspace().join("target").join("llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib").join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    eprintln!(
        "xtask: building bpf-linker against {} (llvm-{major})",
        llvm.display()
    );
    run(Command::new("cargo").env("LLVM_PREFIX", &prefix).args([
        "install",
        "bpf-linker",
        "--no-default-features",
        "--features",
        &format!("llvm-{major}"),
    ]))
}

fn setup_packages() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| {
            // A command on PATH, an absolute path, or `dpkg:<package>`.
            let check = if let Some(pkg) = bin.strip_prefix("dpkg:") {
                format!("dpkg-query -W -f='${{Status}}' {pkg} 2>/dev/null | grep -q 'ok installed'")
            } else if bin.starts_with('/') {
                format!("test -x {bin}")
            } else {
                format!("command -v {bin}")
            };
            !Command::new("sh")
                .args(["-c", &check])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq"])
        .args(&missing))
}

fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

//! `cargo xtask bench` (first cut): cross-node TCP throughput over the eBPF
//! path, the kernel path (`--datapath kernel`) and node-to-node on the
//! fabric, side by side in one run, plus the verifier's instruction count for
//! each program. Issue 5 grows this into the full benchmark.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use flannel_tests::{
    lab::{NodeKind, NodeSpec},
    netns::exec,
    Lab,
};

fn iperf(server_ns: &str, client_ns: &str, dst: &str, secs: u32) -> Result<f64> {
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5301",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = exec(
        client_ns,
        &[
            "iperf3",
            "-c",
            dst,
            "-p",
            "5301",
            "-t",
            &secs.to_string(),
            "-J",
        ],
    )?;
    let _ = server.wait();
    if !out.status.success() {
        bail!("iperf3 to {dst}: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no iperf3 result")
}

fn main() -> Result<()> {
    let secs: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let runs = 3;
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 1),
        NodeSpec::new(NodeKind::Ebpf, 1),
        NodeSpec::new(NodeKind::Kernel, 1),
        NodeSpec::new(NodeKind::Kernel, 1),
    ])?;
    let paths = [
        (
            "ebpf (pod n1 -> pod n2)",
            lab.pod((1, 0)).ns.clone(),
            lab.pod((0, 0)).ns.clone(),
            lab.pod((1, 0)).ip.to_string(),
        ),
        (
            "kernel (pod n3 -> pod n4)",
            lab.pod((3, 0)).ns.clone(),
            lab.pod((2, 0)).ns.clone(),
            lab.pod((3, 0)).ip.to_string(),
        ),
        (
            "node-to-node (n3 -> n4)",
            lab.nodes[3].ns.clone(),
            lab.nodes[2].ns.clone(),
            lab.nodes[3].ip.to_string(),
        ),
    ];
    let mut medians = Vec::new();
    println!("TCP 1 stream, {secs} s x {runs} runs each, interleaved:");
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..runs {
        for (k, (_, server, client, dst)) in paths.iter().enumerate() {
            all[k].push(iperf(server, client, dst, secs)? / 1e9);
        }
    }
    for (k, (name, ..)) in paths.iter().enumerate() {
        let mut v = all[k].clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let med = v[v.len() / 2];
        medians.push(med);
        println!(
            "  {name:<28} median {med:6.2} Gbit/s  (runs: {})",
            all[k]
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "  ratio ebpf/kernel {:.2}, ebpf/node-to-node {:.2}",
        medians[0] / medians[1],
        medians[0] / medians[2]
    );

    println!("verifier instruction counts (verified_insns, one node's programs):");
    let mut seen = std::collections::HashSet::new();
    for info in aya::programs::loaded_programs().flatten() {
        let name = info.name_as_str().unwrap_or("").to_string();
        if ["tc_from_pod", "xdp_uplink", "tc_uplink_ingre"]
            .iter()
            .any(|n| name.starts_with(n))
            && seen.insert(name.clone())
        {
            println!(
                "  {name:<18} verified {:>6}  translated bytes {:>6}",
                info.verified_instruction_count().unwrap_or(0),
                info.size_translated().unwrap_or(0)
            );
        }
    }
    Ok(())
}

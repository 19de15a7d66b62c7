//! `cargo xtask demo`: builds a 3-node lab (2 pods per node, each added by
//! the `flannel` CNI plugin) running the eBPF data path, sends pod-to-pod
//! traffic same-node and cross-node, prints the counters that show which
//! path carried it, and tears everything down.

use anyhow::Result;
use flannel_tests::{
    lab::{NodeKind, NodeSpec},
    netns::link_packets,
    traffic::{bulk_transfer, tcp_exchange, udp_exchange},
    Lab,
};

fn main() -> Result<()> {
    flannel_tests::interrupt::clean_up_on_signals()?;
    println!(
        "building a 3-node lab (fabric bridge, 3 node namespaces, 2 pods each, added through the flannel CNI plugin) ..."
    );
    let lab = Lab::new(&[NodeSpec::new(NodeKind::Ebpf, 2); 3])?;
    println!(
        "lab {} is up (Ctrl-C removes it; so does the end of the demo)",
        lab.id
    );
    for (i, node) in lab.nodes.iter().enumerate() {
        let pods: Vec<String> = node.pods.iter().map(|p| p.ip.to_string()).collect();
        println!(
            "  node{} {}  lease {}  pods {}",
            i + 1,
            node.ip,
            node.subnet,
            pods.join(", ")
        );
    }
    let pods = lab.all_pods();
    let mut port = 30000;
    let mut pairs = 0;
    for &a in &pods {
        for &b in &pods {
            if a == b {
                continue;
            }
            let (pa, pb) = (lab.pod(a), lab.pod(b));
            let ok = lab.ping(a, pb.ip, 2, 56)?;
            port += 1;
            let tcp = tcp_exchange(&pa.ns, &pb.ns, pb.ip, port).is_ok();
            let udp = udp_exchange(&pa.ns, &pb.ns, pb.ip, port).is_ok();
            let kind = if a.0 == b.0 {
                "same node "
            } else {
                "cross node"
            };
            println!(
                "  {kind} {:>12} -> {:<12} icmp {} tcp {} udp {}",
                pa.ip.to_string(),
                pb.ip.to_string(),
                mark(ok),
                mark(tcp),
                mark(udp)
            );
            pairs += 1;
        }
    }
    let (a, b) = (lab.pod((0, 0)), lab.pod((1, 0)));
    let started = std::time::Instant::now();
    let bytes = bulk_transfer(&a.ns, &b.ns, b.ip, 5201, 100 << 20)?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  bulk TCP {} -> {}: {} MiB byte-exact in {:.2} s ({:.2} Gbit/s)",
        a.ip,
        b.ip,
        bytes >> 20,
        secs,
        bytes as f64 * 8.0 / secs / 1e9
    );
    println!("\n{pairs} pod pairs exercised. Data path counters (summed over CPUs):");
    let names = [
        "pod_local_redirect",
        "pod_encap_redirect",
        "pod_encap_neigh",
        "xdp_decap",
        "uplink_decap",
        "uplink_redirect",
        "pod_pass_not_ipv4",
        "pod_pass_not_pod_dst",
        "xdp_pass_not_vxlan",
        "pod_drop_encap_failed",
    ];
    print!("  {:<24}", "counter");
    for i in 0..lab.nodes.len() {
        print!("{:>12}", format!("node{}", i + 1));
    }
    println!();
    let counters: Vec<_> = lab
        .nodes
        .iter()
        .map(|n| n.counters())
        .collect::<Result<_>>()?;
    for name in names {
        print!("  {name:<24}");
        for c in &counters {
            print!("{:>12}", c[name]);
        }
        println!();
    }
    print!("  {:<24}", "flannel.1 tx/rx packets");
    for node in &lab.nodes {
        let (tx, rx) = link_packets(&node.ns, "flannel.1")?;
        print!("{:>12}", format!("{tx}/{rx}"));
    }
    println!("\n\nflannel.1 stays idle: pod traffic went through the eBPF encap/decap path.");
    println!("tearing down lab {} ...", lab.id);
    drop(lab);
    println!("done.");
    Ok(())
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "FAIL"
    }
}

//! The eBPF data path end to end on a 3-node lab (root; real packets).

use std::collections::HashMap;

use anyhow::Result;
use flannel_tests::{
    lab::{NodeKind, NodeSpec, POD_MTU},
    traffic::bulk_transfer,
    Lab,
};

fn ebpf_nodes(n: usize, pods: usize) -> Vec<NodeSpec> {
    vec![NodeSpec::new(NodeKind::Ebpf, pods); n]
}

fn snapshot(lab: &Lab) -> Result<Vec<HashMap<&'static str, u64>>> {
    lab.nodes.iter().map(|n| n.counters()).collect()
}

fn delta(
    before: &[HashMap<&str, u64>],
    after: &[HashMap<&str, u64>],
    node: usize,
    name: &str,
) -> u64 {
    after[node][name] - before[node][name]
}

#[test]
fn every_pod_pair_talks_over_the_ebpf_path() -> Result<()> {
    let lab = Lab::new(&ebpf_nodes(3, 2))?;
    lab.every_pair_over_ebpf(20000)
}

#[test]
fn bulk_transfer_is_byte_exact_and_mtu_is_honoured() -> Result<()> {
    let lab = Lab::new(&ebpf_nodes(2, 1))?;
    let (a, b) = ((0, 0), (1, 0));
    let (pa, pb) = (lab.pod(a), lab.pod(b));
    let before = snapshot(&lab)?;
    let len = 200 * 1024 * 1024;
    let got = bulk_transfer(&pa.ns, &pb.ns, pb.ip, 5201, len)?;
    assert_eq!(got, len);
    let after = snapshot(&lab)?;
    assert!(delta(&before, &after, 0, "pod_encap_redirect") > 0);
    assert!(delta(&before, &after, 1, "uplink_decap") > 0);
    assert_eq!(delta(&before, &after, 0, "pod_drop_encap_failed"), 0);

    // Largest ICMP payload that fits the pod MTU: 1450 - 20 - 8 = 1422.
    let fits = (POD_MTU - 28) as usize;
    for size in [fits - 100, fits - 1, fits] {
        assert!(lab.ping(a, pb.ip, 2, size)?, "ping -s {size} must pass");
    }
    // A pod whose MTU is too large sends 1500-byte packets: the data path
    // hands them to the stack, which answers "fragmentation needed, mtu 1450".
    flannel_tests::netns::ip(&[
        "-n",
        &lab.nodes[0].ns,
        "link",
        "set",
        &pa.host_if,
        "mtu",
        "1500",
    ])?;
    flannel_tests::netns::ip(&["-n", &pa.ns, "link", "set", "eth0", "mtu", "1500"])?;
    let before = snapshot(&lab)?;
    let out = flannel_tests::netns::exec(
        &pa.ns,
        &[
            "ping",
            "-n",
            "-c",
            "2",
            "-M",
            "do",
            "-s",
            "1472",
            "-W",
            "2",
            &pb.ip.to_string(),
        ],
    )?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "oversize DF ping must fail: {text}");
    assert!(
        text.contains("mtu = 1450") || text.contains("mtu=1450"),
        "want frag-needed with mtu 1450: {text}"
    );
    let after = snapshot(&lab)?;
    assert!(delta(&before, &after, 0, "pod_pass_too_big") >= 1);
    Ok(())
}

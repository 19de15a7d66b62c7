//! The eBPF data path end to end on a 3-node lab (root; real packets).

use std::collections::HashMap;

use anyhow::Result;
use flannel_tests::{
    lab::{NodeKind, NodeSpec, POD_MTU},
    netns::link_packets,
    traffic::{bulk_transfer, tcp_exchange, udp_exchange},
    Lab,
};

fn ebpf_nodes(n: usize, pods: usize) -> Vec<NodeSpec> {
    vec![
        NodeSpec {
            kind: NodeKind::Ebpf,
            pods
        };
        n
    ]
}

fn snapshot(lab: &Lab) -> Result<Vec<HashMap<&'static str, u64>>> {
    lab.nodes.iter().map(|n| n.counters()).collect()
}

fn vtep_packets(lab: &Lab) -> Result<Vec<(u64, u64)>> {
    lab.nodes
        .iter()
        .map(|n| link_packets(&n.ns, "flannel.1"))
        .collect()
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
    let pods = lab.all_pods();
    let mut port = 20000;
    for &a in &pods {
        for &b in &pods {
            if a == b {
                continue;
            }
            let before = snapshot(&lab)?;
            let vtep_before = vtep_packets(&lab)?;
            let (pa, pb) = (lab.pod(a), lab.pod(b));
            assert!(lab.ping(a, pb.ip, 3, 56)?, "ping {} -> {}", pa.ip, pb.ip);
            port += 1;
            tcp_exchange(&pa.ns, &pb.ns, pb.ip, port)?;
            udp_exchange(&pa.ns, &pb.ns, pb.ip, port)?;
            let after = snapshot(&lab)?;
            if a.0 == b.0 {
                // ping 3 + TCP (handshake, data, fin) + UDP 1, both ways.
                let local = delta(&before, &after, a.0, "pod_local_redirect");
                assert!(
                    local >= 10,
                    "{} -> {}: local redirects {local}",
                    pa.ip,
                    pb.ip
                );
                assert_eq!(delta(&before, &after, a.0, "pod_encap_redirect"), 0);
            } else {
                let enc = delta(&before, &after, a.0, "pod_encap_redirect")
                    + delta(&before, &after, a.0, "pod_encap_neigh");
                // The lab's veth uplinks decapsulate in TC (decap and
                // delivery are one verdict there).
                let dec = delta(&before, &after, b.0, "uplink_decap");
                let deliver = delta(&before, &after, b.0, "uplink_redirect") + dec;
                let back = delta(&before, &after, b.0, "pod_encap_redirect")
                    + delta(&before, &after, b.0, "pod_encap_neigh");
                let back_dec = delta(&before, &after, a.0, "uplink_decap");
                for (what, n) in [
                    ("encap", enc),
                    ("decap", dec),
                    ("delivery", deliver),
                    ("reply encap", back),
                    ("reply decap", back_dec),
                ] {
                    assert!(n >= 5, "{} -> {}: {what} counted {n}", pa.ip, pb.ip);
                }
            }
            let vtep_after = vtep_packets(&lab)?;
            assert_eq!(
                vtep_before, vtep_after,
                "flannel.1 carried pod traffic ({} -> {})",
                pa.ip, pb.ip
            );
        }
    }
    Ok(())
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

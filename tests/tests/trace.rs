//! `flannel-agent trace` on a live lab: same node, across nodes, to the
//! node, to outside the cluster, from another node's pod and on a kernel
//! node, each explained from the real state, and confirmed with a live
//! probe where one can be sent (the counters show the path it took).

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use flannel_tests::{
    lab::{agent_bin, command_in_netns},
    Lab, NodeKind, NodeSpec,
};
use serde_json::Value;

/// `flannel-agent trace SRC DST ARGS -o json` inside node `i`.
fn trace(lab: &Lab, i: usize, src: Ipv4Addr, dst: Ipv4Addr, args: &[&str]) -> Result<Value> {
    let out = trace_cmd(lab, i, src, dst, args, true)?;
    if !out.status.success() {
        anyhow::bail!(
            "flannel-agent trace failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("trace output")
}

fn trace_cmd(
    lab: &Lab,
    i: usize,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    args: &[&str],
    json: bool,
) -> Result<std::process::Output> {
    let n = &lab.nodes[i];
    let mut cmd = command_in_netns(agent_bin()?, &n.ns)?;
    cmd.arg("trace")
        .arg(src.to_string())
        .arg(dst.to_string())
        .args(args)
        .arg("--socket")
        .arg(n.socket())
        .arg("--bpf-dir")
        .arg(&n.bpf_dir)
        .arg("--cni-data-dir")
        .arg(n.cni_dir());
    if json {
        cmd.args(["-o", "json"]);
    }
    Ok(cmd.output()?)
}

fn steps(t: &Value) -> String {
    t["trace"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "[{}] {}",
                s["at"].as_str().unwrap_or(""),
                s["what"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn expect(t: &Value) -> Vec<String> {
    serde_json::from_value(t["trace"]["expect"].clone()).unwrap_or_default()
}

#[test]
fn trace_explains_each_path_and_live_probes_confirm_it() -> Result<()> {
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 2),
        NodeSpec::new(NodeKind::Ebpf, 1),
        NodeSpec::new(NodeKind::Kernel, 1),
    ])?;
    let (a, b) = (lab.pod((0, 0)).ip, lab.pod((0, 1)).ip);
    let remote = lab.pod((1, 0)).ip;
    let n1 = &lab.nodes[1];
    // Warm the next hops up so that the cross-node probe finds them.
    assert!(lab.ping((0, 0), remote, 2, 56)?);

    // Same node.
    let t = trace(&lab, 0, a, b, &["--live"])?;
    let s = steps(&t);
    assert_eq!(expect(&t), ["pod_local_redirect"], "{s}");
    assert!(
        s.contains("bpf_redirect_peer") && s.contains(&lab.pod((0, 1)).host_if),
        "{s}"
    );
    assert_eq!(t["live"]["confirmed"], true, "{t:#}");
    assert!(
        t["live"]["moved"]["pod_local_redirect"].as_u64() >= Some(1),
        "{t:#}"
    );

    // Across nodes, over TCP.
    let t = trace(
        &lab,
        0,
        a,
        remote,
        &["--proto", "tcp", "--dport", "8080", "--live"],
    )?;
    let s = steps(&t);
    assert_eq!(expect(&t), ["pod_encap_redirect", "pod_encap_neigh"], "{s}");
    assert!(
        s.contains(&format!("on node {} (VtepMAC {})", n1.ip, n1.vtep_mac)),
        "{s}"
    );
    assert!(s.contains("tcp") && s.contains(":8080"), "{s}");
    // The lab's 10.244.0.0/16 of /24s: found by its lease slot.
    let slot = format!(
        "(lease slot {}): {remote} is in {}",
        n1.subnet.network().octets()[2],
        n1.subnet
    );
    assert!(s.contains(&slot), "{s}");
    assert_eq!(t["live"]["confirmed"], true, "{t:#}");

    // To the node itself, ICMP.
    let t = trace(&lab, 0, a, lab.nodes[0].ip, &["--proto", "icmp", "--live"])?;
    assert_eq!(expect(&t), ["pod_pass_not_pod_dst"], "{}", steps(&t));
    assert_eq!(t["live"]["confirmed"], true, "{t:#}");

    // To outside the cluster: explained only (no packet leaves the lab).
    let outside: Ipv4Addr = "192.0.2.1".parse()?;
    let t = trace(&lab, 0, a, outside, &[])?;
    let s = steps(&t);
    assert_eq!(expect(&t), ["pod_pass_not_pod_dst"], "{s}");
    assert!(s.contains("routed by the node"), "{s}");
    assert!(t["live"].is_null());

    // From another node's pod: the receiving side, decapsulated in TC.
    let t = trace(&lab, 0, remote, a, &[])?;
    let s = steps(&t);
    assert_eq!(expect(&t), ["uplink_decap"], "{s}");
    assert!(
        s.contains(&format!("node {}", n1.ip)) && s.contains("bpf_skb_adjust_room"),
        "{s}"
    );
    assert_eq!(t["trace"]["probe_from"], "none");
    let out = trace_cmd(&lab, 0, remote, a, &["--live"], true)?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run the live trace on the node it is on"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A kernel node: Flannel's route, neighbour and FDB entry.
    let k = lab.pod((2, 0)).ip;
    let t = trace(&lab, 2, k, a, &["--live"])?;
    let s = steps(&t);
    assert!(expect(&t).is_empty(), "{s}");
    assert!(
        s.contains(&format!(
            "{} via {} dev flannel.1 onlink (in place), neighbour {}, FDB to {}",
            lab.nodes[0].subnet,
            lab.nodes[0].subnet.network(),
            lab.nodes[0].vtep_mac,
            lab.nodes[0].ip
        )),
        "{s}"
    );
    assert_eq!(t["live"]["counters"], false, "{t:#}");

    // The human form says the same.
    let out = trace_cmd(&lab, 0, a, b, &["--live"], false)?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("expect: pod_local_redirect") && text.contains("live: confirmed"),
        "{text}"
    );
    Ok(())
}

//! Interoperability: eBPF nodes with a stock-Flannel-configured node and
//! with a `--datapath kernel` node, traffic both ways (root; real packets).

use anyhow::Result;
use flannel_tests::{
    lab::{LabOptions, NodeKind, NodeSpec},
    netns::link_packets,
    traffic::{tcp_exchange, udp_exchange},
    Lab,
};

fn xdp_generic() -> LabOptions {
    LabOptions {
        agent_args: vec!["--xdp-mode".into(), "generic".into()],
        ..Default::default()
    }
}

fn both_ways(lab: &Lab, a: (usize, usize), b: (usize, usize), port: u16) -> Result<()> {
    for (x, y, p) in [(a, b, port), (b, a, port + 1)] {
        let (px, py) = (lab.pod(x), lab.pod(y));
        assert!(lab.ping(x, py.ip, 3, 56)?, "ping {} -> {}", px.ip, py.ip);
        assert!(
            lab.ping(x, py.ip, 2, 1422)?,
            "full-size ping {} -> {}",
            px.ip,
            py.ip
        );
        tcp_exchange(&px.ns, &py.ns, py.ip, p)?;
        udp_exchange(&px.ns, &py.ns, py.ip, p)?;
    }
    Ok(())
}

#[test]
fn ebpf_nodes_and_a_stock_flannel_node_exchange_pod_traffic() -> Result<()> {
    // These nodes decapsulate in XDP (generic on the lab's veth uplinks);
    // the other tests' nodes take the default there, decap in TC.
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::StockFlannel, 1),
        ],
        xdp_generic(),
    )?;
    let stock_before = link_packets(&lab.nodes[2].ns, "flannel.1")?;
    let c0 = lab.nodes[0].counters()?;
    both_ways(&lab, (0, 0), (2, 0), 21000)?;
    both_ways(&lab, (1, 0), (2, 0), 21100)?;
    let c1 = lab.nodes[0].counters()?;
    // The eBPF node encapsulated towards the stock node and decapsulated
    // what the stock node's kernel VXLAN device sent.
    assert!(
        c1["pod_encap_redirect"] + c1["pod_encap_neigh"]
            > c0["pod_encap_redirect"] + c0["pod_encap_neigh"]
    );
    let moved: Vec<_> = c1
        .iter()
        .filter(|(k, v)| **v > c0[*k])
        .map(|(k, v)| (*k, v - c0[k]))
        .collect();
    assert!(c1["xdp_decap"] > c0["xdp_decap"], "{moved:?}");
    // The stock node really used its kernel VXLAN device both ways.
    let stock_after = link_packets(&lab.nodes[2].ns, "flannel.1")?;
    assert!(stock_after.0 > stock_before.0 && stock_after.1 > stock_before.1);
    Ok(())
}

#[test]
fn an_ebpf_node_and_a_kernel_datapath_node_interoperate() -> Result<()> {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
        ],
        xdp_generic(),
    )?;
    let status = flannel_agent::api::call(
        &lab.nodes[1].socket(),
        &flannel_agent::api::Request::Status {},
    )?
    .status
    .unwrap();
    assert_eq!(status.datapath, "kernel");
    assert!(
        status.reason.contains("--datapath kernel"),
        "{}",
        status.reason
    );
    assert!(
        !lab.nodes[1].bpf_dir.exists(),
        "kernel node must pin nothing"
    );
    let kernel_before = link_packets(&lab.nodes[1].ns, "flannel.1")?;
    let c0 = lab.nodes[0].counters()?;
    both_ways(&lab, (0, 0), (1, 0), 22000)?;
    let c1 = lab.nodes[0].counters()?;
    assert!(c1["xdp_decap"] > c0["xdp_decap"]);
    assert!(
        c1["pod_encap_redirect"] + c1["pod_encap_neigh"]
            > c0["pod_encap_redirect"] + c0["pod_encap_neigh"]
    );
    let kernel_after = link_packets(&lab.nodes[1].ns, "flannel.1")?;
    assert!(kernel_after.0 > kernel_before.0 && kernel_after.1 > kernel_before.1);
    Ok(())
}

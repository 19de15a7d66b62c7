//! The kube subnet manager against the fake API server: podCIDR read,
//! Flannel's annotations and condition written, other nodes' annotations
//! turned into leases, a deleted node's lease removed, a missing podCIDR
//! reported and retried. Needs root (namespaces, BPF).

use std::time::Duration;

use flannel_agent::subnet::kube::{
    BACKEND_DATA, BACKEND_TYPE, BACKEND_V6_DATA, PUBLIC_IP, PUBLIC_IPV6, SUBNET_MANAGER,
};
use flannel_tests::{
    fakekube,
    lab::{node_name, LabOptions, LabStore},
    Lab, NodeKind, NodeSpec,
};
use ipnet::Ipv4Net;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[test]
fn kube_store_end_to_end() {
    let mut lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
        ],
        LabOptions {
            store: LabStore::Kube(fakekube::url()),
            before_agents: Some(fakekube::start_for_lab),
            agent_args: vec!["--healthz-port".into(), "10256".into()],
            ..Default::default()
        },
    )
    .unwrap();

    // The podCIDR decides the subnet (subnet.env named 10.244.1.0/24).
    assert_eq!(lab.nodes[0].subnet, net("10.244.11.0/24"));
    assert_eq!(lab.nodes[1].subnet, net("10.244.12.0/24"));
    assert_eq!(lab.nodes[0].status().unwrap().subnet_manager, "kube");

    // Annotations and condition as Flannel writes them.
    let node = fakekube::of(&lab).node("node1").unwrap();
    let ann = &node["metadata"]["annotations"];
    assert_eq!(ann[BACKEND_TYPE], "vxlan");
    assert_eq!(ann[SUBNET_MANAGER], "true");
    assert_eq!(ann[PUBLIC_IP], "172.30.0.1");
    let data: serde_json::Value =
        serde_json::from_str(ann[BACKEND_DATA].as_str().unwrap()).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"VNI": 1, "VtepMAC": lab.nodes[0].vtep_mac.to_string()})
    );
    lab.wait_for(Duration::from_secs(10), "NetworkUnavailable=False", |lab| {
        fakekube::of(lab).node("node1").is_some_and(|n| {
            n["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "NetworkUnavailable"
                        && c["status"] == "False"
                        && c["reason"] == "FlannelIsUp"
                })
            })
        })
    })
    .unwrap();

    // Each node's annotations became the other's lease; pods talk.
    assert!(lab.holds(0, net("10.244.12.0/24")) && lab.holds(1, net("10.244.11.0/24")));
    assert!(lab.ping((0, 0), lab.pod((1, 0)).ip, 3, 56).unwrap());
    assert!(lab.ping((1, 0), lab.pod((0, 0)).ip, 3, 56).unwrap());

    // A node without a podCIDR: a clear error, retried until it has one.
    fakekube::of(&lab).add_node(&node_name(2), None, serde_json::json!({}));
    let n3 = lab.join_node_nowait(NodeKind::Ebpf, None).unwrap();
    lab.wait_for(
        Duration::from_secs(10),
        "the missing podCIDR error",
        |lab| {
            lab.agent_log(n3)
                .contains("node node3 has no spec.podCIDR yet")
        },
    )
    .unwrap();
    // Alive, not ready: no lease yet.
    let probe = |lab: &Lab, path: &str| {
        flannel_tests::netns::http_get(&lab.nodes[n3].ns, "127.0.0.1:10256".parse().unwrap(), path)
            .unwrap()
    };
    assert!(probe(&lab, "/healthz").starts_with("HTTP/1.1 200 OK"));
    let readyz = probe(&lab, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
    fakekube::of(&lab).set_pod_cidr(&node_name(2), "10.244.13.0/24");
    lab.wait_agent(n3, Duration::from_secs(20)).unwrap();
    let readyz = probe(&lab, "/readyz");
    assert!(
        readyz.starts_with("HTTP/1.1 200 OK") && readyz.ends_with("ready"),
        "{readyz}"
    );
    assert_eq!(lab.nodes[n3].subnet, net("10.244.13.0/24"));
    lab.wait_for(Duration::from_secs(10), "node 3 everywhere", |lab| {
        lab.holds(0, net("10.244.13.0/24")) && lab.holds(1, net("10.244.13.0/24"))
    })
    .unwrap();
    lab.add_pod(n3).unwrap();
    assert!(lab.ping((n3, 0), lab.pod((0, 0)).ip, 3, 56).unwrap());

    // Node deleted: its lease leaves every other data path.
    lab.kill_agent(n3).unwrap();
    fakekube::of(&lab).delete_node(&node_name(2));
    lab.wait_for(Duration::from_secs(10), "node 3's state removed", |lab| {
        lab.lacks(0, net("10.244.13.0/24")) && lab.lacks(1, net("10.244.13.0/24"))
    })
    .unwrap();
}

/// Dual-stack with the kube store: each node's IPv6 podCIDR is its IPv6
/// lease, the agents write Flannel's `public-ipv6` and `backend-v6-data`
/// (the VtepMAC of their flannel-v6.1), a stock-Flannel node's IPv6
/// annotations become its IPv6 lease everywhere, and pods talk over both
/// families.
#[test]
fn kube_store_dual_stack() {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
            NodeSpec::new(NodeKind::StockFlannel, 1),
        ],
        LabOptions {
            store: LabStore::Kube(fakekube::url()),
            before_agents: Some(fakekube::start_for_lab),
            net_conf: Some(
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":1,"Port":4789}}"#
                    .into(),
            ),
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..2 {
        let n = &lab.nodes[i];
        assert_eq!(
            n.subnet6,
            Some(format!("fd00:10:244:{}::/64", 11 + i).parse().unwrap()),
            "{}",
            n.ns
        );
        let node = fakekube::of(&lab).node(&node_name(i)).unwrap();
        let ann = &node["metadata"]["annotations"];
        assert_eq!(ann[PUBLIC_IPV6], n.ip6.unwrap().to_string());
        let data: serde_json::Value =
            serde_json::from_str(ann[BACKEND_V6_DATA].as_str().unwrap()).unwrap();
        let mac6 = flannel_tests::netns::link_mac(&n.ns, "flannel-v6.1").unwrap();
        assert_eq!(
            data,
            serde_json::json!({"VNI": 1, "VtepMAC": flannel_agent::mac::MacAddr(mac6).to_string()})
        );
    }
    lab.every_pair(26000).unwrap();
}

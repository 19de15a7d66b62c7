//! Another node's lease from its Node object: podCIDR and Flannel's
//! annotations, fields separated by NUL. Never panics.
#![no_main]
use std::collections::BTreeMap;

use flannel_agent::subnet::kube::{
    node_lease, BACKEND_DATA, BACKEND_TYPE, BACKEND_V6_DATA, PUBLIC_IP, PUBLIC_IPV6,
    PUBLIC_IP_OVERWRITE,
};
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut f = text.split('\0');
    let mut next = || f.next().map(str::to_string);
    let pod_cidr = next();
    let mut ann = BTreeMap::new();
    for key in [PUBLIC_IP, PUBLIC_IP_OVERWRITE, BACKEND_TYPE, BACKEND_DATA] {
        if let Some(v) = next() {
            ann.insert(key.to_string(), v);
        }
    }
    let pod_cidrs = next().map(|c| vec![c]);
    // Dual-stack annotations after the podCIDRs.
    for key in [PUBLIC_IPV6, BACKEND_V6_DATA] {
        if let Some(v) = next() {
            ann.insert(key.to_string(), v);
        }
    }
    let mut node = Node::default();
    node.metadata.name = Some("fuzzed".into());
    node.metadata.annotations = Some(ann);
    node.spec = Some(NodeSpec {
        pod_cidr,
        pod_cidrs,
        ..Default::default()
    });
    if let Ok(lease) = node_lease(&node) {
        // A lease is a usable VXLAN one or a host-gw one (no data).
        match lease.attrs.backend_type.as_str() {
            "vxlan" => assert!(lease.attrs.vxlan_data().is_ok()),
            t => assert_eq!(t, "host-gw"),
        }
    }
});

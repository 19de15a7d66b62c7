//! `flannel-agent trace`: the observed state read as the path one packet
//! takes on this node, step by step, deciding as the programs decide
//! (`tc_from_pod`, `xdp_uplink`, `tc_uplink_ingress`) from what the maps
//! hold, or as the kernel does on the kernel data path. Pure: the agent
//! feeds it what it has just observed.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::{
    desired::{Desired, DirectRoute},
    observe::Observed,
};
use crate::{
    api::{Step, Trace},
    datapath::ebpf::{ip_key, key_ip},
    mac::MacAddr,
    netlink::RemoteEntry,
};

/// What the packet is.
pub struct Query {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: String,
    pub dport: Option<u16>,
}

fn step(at: &str, what: String) -> Step {
    Step {
        at: at.to_string(),
        what,
    }
}

/// Where the packet comes from, as this node sees it.
enum Source<'a> {
    /// A pod on this node, on this host veth.
    LocalPod(&'a str),
    /// A pod on another node, behind this lease.
    RemotePod(Ipv4Net, Ipv4Addr),
    /// A pod on another node routed to directly (DirectRouting, host-gw).
    DirectPod(IpNet, IpAddr),
    /// This node itself.
    Node,
    Other,
}

pub fn trace(want: &Desired, have: &Observed, node_ip: Ipv4Addr, q: &Query) -> Trace {
    let pod = want.pods.values().find(|p| p.ip == Some(q.src));
    let remote_of = |ip| remote_lease(want, ip);
    let src = if let Some(p) = pod {
        Source::LocalPod(&p.host_ifname)
    } else if let Some(r) = remote_of(q.src) {
        Source::RemotePod(r.subnet, r.public_ip)
    } else if let Some(d) = direct_lease(want, q.src) {
        Source::DirectPod(d.subnet, d.via)
    } else if q.src == node_ip || want.bridge.gateway.is_some_and(|g| q.src == g.addr()) {
        Source::Node
    } else {
        Source::Other
    };
    let port = q.dport.map_or(String::new(), |p| format!(":{p}"));
    let mut steps = vec![step(
        "query",
        format!("{} {} -> {}{port}", q.proto, q.src, q.dst),
    )];
    let mut expect = Vec::new();
    let ebpf = want.maps.is_some();
    let maps = have.maps.as_ref();
    let local_dst = want.pods.values().find(|p| p.ip == Some(q.dst));
    let probe_from = match src {
        Source::LocalPod(_) => "pod",
        Source::Node => "node",
        _ => "none",
    };
    match src {
        Source::LocalPod(ifname) => {
            let index = have.links.get(ifname).map(|l| l.index);
            let attached = index.and_then(|i| maps?.pod_links.get(&i).copied());
            steps.push(step(
                "pod",
                format!(
                    "leaves the pod's eth0 and arrives on its host veth {ifname} (ifindex {})",
                    index.map_or("?".into(), |i| i.to_string())
                ),
            ));
            if !ebpf {
                steps.push(step(
                    "kernel",
                    "no program on the veth (kernel data path): the cni0 bridge takes it".into(),
                ));
                kernel_from_pod(want, have, q, local_dst.is_some(), &mut steps);
            } else {
                if attached != Some(true) {
                    steps.push(step(
                        "tc_from_pod",
                        format!(
                            "not attached by this agent on {ifname} ({}): the next pass attaches it",
                            match attached {
                                Some(false) => "pinned by an earlier agent",
                                _ => "missing",
                            }
                        ),
                    ));
                }
                from_pod(want, have, q, &mut steps, &mut expect);
            }
        }
        Source::DirectPod(subnet, from) => {
            steps.push(step(
                "remote node",
                format!(
                    "node {from} (lease {subnet}) routes it directly, unencapsulated, to {node_ip}"
                ),
            ));
            match want.maps.as_ref().map(|m| m.config.flags) {
                Some(flags) if flags & flannel_common::CONFIG_F_TC_DECAP != 0 => {
                    steps.push(step(
                        "tc_uplink_ingress",
                        "a plain packet to a pod address, not to this node: nothing to decapsulate (uplink_pass_other_host); the kernel routes it to cni0 and the bridge hands it to the pod".into(),
                    ));
                    expect.push("uplink_pass_other_host".into());
                }
                Some(_) => {
                    steps.push(step(
                        "xdp_uplink",
                        "a plain packet to a pod address, not to this node: passed (xdp_pass_other_host)".into(),
                    ));
                    steps.push(step(
                        "tc_uplink_ingress",
                        "not marked as decapsulated: left to the kernel (uplink_pass), which routes it to cni0 and the bridge hands it to the pod".into(),
                    ));
                    expect.push("xdp_pass_other_host".into());
                    expect.push("uplink_pass".into());
                }
                None => steps.push(step(
                    "kernel",
                    "routes it to cni0 and the bridge hands it to the pod".into(),
                )),
            }
        }
        Source::RemotePod(subnet, from) => {
            let (port, vni) = want
                .vtep
                .as_ref()
                .map_or((0, 0), |v| (v.link.port, v.link.vni));
            steps.push(step(
                "remote node",
                format!(
                    "node {from} (lease {subnet}) encapsulates it: VXLAN UDP {port}, VNI {vni}, to {node_ip}"
                ),
            ));
            let ifname = local_dst.map(|p| p.host_ifname.as_str());
            to_local_pod_from_vxlan(want, have, q, from, ifname, &mut steps, &mut expect);
        }
        Source::Node | Source::Other => {
            steps.push(step(
                "kernel",
                if matches!(src, Source::Node) {
                    "sent by this node: no program sees a packet the node itself sends; the kernel routes it".to_string()
                } else {
                    format!("{} is no pod of this cluster and not this node: it reaches the node through the uplink and the kernel routes it", q.src)
                },
            ));
            match (local_dst, remote_of(q.dst)) {
                (Some(p), _) => steps.push(step(
                    "kernel",
                    format!("to the pod {}: route to cni0, bridge port {}", q.dst, p.host_ifname),
                )),
                (None, Some(r)) => steps.push(step(
                    "kernel",
                    format!(
                        "to {}: route {} via {} dev {} onlink, neighbour {}, FDB to {}: encapsulated by the kernel's VXLAN device",
                        q.dst, r.subnet, r.subnet.network(), vtep_name(want), r.vtep_mac, r.public_ip
                    ),
                )),
                (None, None) => match direct_lease(want, q.dst) {
                    Some(d) => steps.push(step(
                        "kernel",
                        format!("to {}: route {} via {} on the uplink: sent unencapsulated", q.dst, d.subnet, d.via),
                    )),
                    None => steps.push(step("kernel", format!("to {}: the node's own routing table", q.dst))),
                },
            }
        }
    }
    Trace {
        steps,
        expect,
        probe_from: probe_from.to_string(),
    }
}

/// `tc_from_pod`'s decisions, in its order.
fn from_pod(
    want: &Desired,
    have: &Observed,
    q: &Query,
    steps: &mut Vec<Step>,
    expect: &mut Vec<String>,
) {
    let Some(maps) = have.maps.as_ref() else {
        steps.push(step("tc_from_pod", "the maps could not be read".into()));
        return;
    };
    let Some(cfg) = maps
        .config
        .filter(|c| c.flags & flannel_common::CONFIG_F_READY != 0)
    else {
        steps.push(step(
            "tc_from_pod",
            "no config yet: pod_pass_no_config, the kernel takes it".into(),
        ));
        expect.push("pod_pass_no_config".into());
        return;
    };
    if cfg.flags & flannel_common::CONFIG_F_NETFILTER != 0 {
        steps.push(step(
            "tc_from_pod",
            "source is the pod's own; netfilter compatibility is on: left to the kernel (pod_pass_netfilter), which forwards it through its forward hook".into(),
        ));
        expect.push("pod_pass_netfilter".into());
        kernel_beyond(want, q, steps);
        return;
    }
    // A filled lease slot answers first, before the endpoints and the
    // trie (see `remote_of` in the programs).
    let slotted = cfg
        .lease_slot(ip_key(q.dst))
        .and_then(|i| Some((i, *maps.slots.get(&i)?)));
    let endpoint = match slotted {
        Some(_) => None,
        None => maps.endpoints.get(&q.dst),
    };
    if let Some(ep) = endpoint {
        let ifname = want
            .pods
            .get(&std::net::IpAddr::V4(q.dst))
            .map_or("?", |p| p.host_ifname.as_str());
        steps.push(step(
            "tc_from_pod",
            format!(
                "endpoint map: {} is a pod on this node (ifindex {}, {}): destination MAC set to {}, bpf_redirect_peer into the pod; no bridge, no routing, TTL unchanged",
                q.dst, ep.host_ifindex, ifname, MacAddr(ep.pod_mac)
            ),
        ));
        steps.push(step(
            "pod",
            format!("arrives on the pod's eth0 ({})", q.dst),
        ));
        expect.push("pod_local_redirect".into());
        return;
    }
    let hit = match slotted {
        Some((i, r)) => Ipv4Net::new(q.dst, (32 - cfg.lease_shift) as u8)
            .ok()
            .map(|n| (n.trunc(), r, format!(" (lease slot {i})"))),
        None => maps
            .remotes
            .iter()
            .filter(|(n, _)| n.contains(&q.dst))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(n, r)| (*n, *r, String::new())),
    };
    let Some((subnet, remote, slot)) = hit else {
        steps.push(step(
            "tc_from_pod",
            format!("{} is in no pod subnet the maps know: pod_pass_not_pod_dst, handed to the kernel unchanged", q.dst),
        ));
        expect.push("pod_pass_not_pod_dst".into());
        kernel_beyond(want, q, steps);
        return;
    };
    let (node_ip, vtep_mac) = (key_ip(remote.node_ip), MacAddr(remote.vtep_mac));
    let uplink = have
        .links
        .values()
        .find(|l| l.index == cfg.uplink_ifindex)
        .map_or("?".to_string(), |l| l.name.clone());
    if remote.flags & flannel_common::REMOTE_F_DIRECT != 0 {
        steps.push(step(
            "tc_from_pod",
            format!(
                "remote-subnet map{slot}: {} is in {subnet}, on node {node_ip}, routed directly (no VXLAN)",
                q.dst
            ),
        ));
        steps.push(step(
            "tc_from_pod",
            format!(
                "checks: TTL > 1 (else pod_pass_ttl), size within the uplink MTU {} (else pod_pass_too_big)",
                cfg.inner_mtu + flannel_common::VXLAN_ENCAP_LEN
            ),
        ));
        steps.push(step(
            "tc_from_pod",
            format!("FIB lookup for {node_ip} on {uplink}: TTL - 1, MACs of the next hop, redirected out of {uplink} (pod_direct_redirect), or with the next hop's neighbour still unresolved, through bpf_redirect_neigh (pod_direct_neigh)"),
        ));
        steps.push(step(
            &format!("node {node_ip}"),
            format!("the kernel routes it to cni0 and into the pod {}", q.dst),
        ));
        expect.push("pod_direct_redirect".into());
        expect.push("pod_direct_neigh".into());
        return;
    }
    steps.push(step(
        "tc_from_pod",
        format!(
            "remote-subnet map{slot}: {} is in {subnet}, on node {node_ip} (VtepMAC {vtep_mac})",
            q.dst
        ),
    ));
    steps.push(step(
        "tc_from_pod",
        format!(
            "checks: TTL > 1 (else pod_pass_ttl: the kernel sends time exceeded), size within the pod MTU {} (else pod_pass_too_big: the kernel sends fragmentation needed)",
            cfg.inner_mtu
        ),
    ));
    steps.push(step(
        "tc_from_pod",
        format!(
            "encapsulates as flannel.{} would: outer {} -> {node_ip} UDP {} VNI {}, inner MAC {} -> {vtep_mac}, inner TTL - 1",
            cfg.vni,
            key_ip(cfg.node_ip),
            cfg.udp_port,
            cfg.vni,
            MacAddr(cfg.vtep_mac)
        ),
    ));
    steps.push(step(
        "tc_from_pod",
        format!("FIB lookup for {node_ip} on {uplink}: redirected out of {uplink} (pod_encap_redirect), or with the next hop's neighbour still unresolved, through bpf_redirect_neigh (pod_encap_neigh)"),
    ));
    steps.push(step(
        &format!("node {node_ip}"),
        format!(
            "decapsulates (xdp_decap or uplink_decap) and redirects into the pod {}",
            q.dst
        ),
    ));
    expect.push("pod_encap_redirect".into());
    expect.push("pod_encap_neigh".into());
}

/// VXLAN from another node for `q.dst`, on this node's uplink.
fn to_local_pod_from_vxlan(
    want: &Desired,
    have: &Observed,
    q: &Query,
    from: Ipv4Addr,
    ifname: Option<&str>,
    steps: &mut Vec<Step>,
    expect: &mut Vec<String>,
) {
    let Some(cfg) = want.maps.as_ref().map(|m| m.config) else {
        steps.push(step(
            "kernel",
            format!(
                "{} decapsulates it, routes it to cni0 and the bridge hands it to {}",
                vtep_name(want),
                ifname.unwrap_or("no pod of this node")
            ),
        ));
        return;
    };
    if !have.maps.as_ref().is_some_and(|m| m.vteps.contains(&from)) {
        steps.push(step(
            "uplink",
            format!(
                "{from} holds no lease (not in the VTEP map): dropped (xdp_drop_unknown_vtep or uplink_drop_unknown_vtep)"
            ),
        ));
        expect.push(
            if cfg.flags & flannel_common::CONFIG_F_TC_DECAP != 0 {
                "uplink_drop_unknown_vtep"
            } else {
                "xdp_drop_unknown_vtep"
            }
            .into(),
        );
        return;
    }
    let Some(ifname) = ifname else {
        steps.push(step(
            "uplink",
            format!(
                "{} is no pod of this node: left to the kernel (xdp_pass_not_local or uplink_pass_not_local)",
                q.dst
            ),
        ));
        if cfg.flags & flannel_common::CONFIG_F_TC_DECAP != 0 {
            expect.push("uplink_pass_not_local".into());
        } else {
            expect.push("xdp_pass_not_local".into());
            expect.push("uplink_pass".into());
        }
        return;
    };
    if cfg.flags & flannel_common::CONFIG_F_NETFILTER != 0 {
        let (by, counter) = if cfg.flags & flannel_common::CONFIG_F_TC_DECAP != 0 {
            ("tc_uplink_ingress", "uplink_pass_netfilter")
        } else {
            ("xdp_uplink", "xdp_pass_netfilter")
        };
        steps.push(step(
            by,
            format!(
                "VXLAN for a local pod from a known node, every check passed; netfilter compatibility is on: left to {} ({}), which decapsulates it and routes it to {ifname} through the forward hook and rp_filter",
                vtep_name(want), counter
            ),
        ));
        expect.push(counter.into());
        return;
    }
    if cfg.flags & flannel_common::CONFIG_F_TC_DECAP != 0 {
        steps.push(step(
            "tc_uplink_ingress",
            format!("VXLAN for a local pod from a known node: outer headers removed with bpf_skb_adjust_room (whole GSO packets), TTL - 1, MACs of the cni0 hop, bpf_redirect_peer into {ifname} (uplink_decap)"),
        ));
        expect.push("uplink_decap".into());
    } else {
        steps.push(step(
            "xdp_uplink",
            "VXLAN for a local pod from a known node: outer headers removed, passed up (xdp_decap)"
                .into(),
        ));
        steps.push(step(
            "tc_uplink_ingress",
            format!(
                "TTL - 1, MACs of the cni0 hop, bpf_redirect_peer into {ifname} (uplink_redirect)"
            ),
        ));
        expect.push("xdp_decap".into());
    }
}

/// The remote lease holding `ip`, longest prefix first.
fn remote_lease(want: &Desired, ip: Ipv4Addr) -> Option<&RemoteEntry> {
    want.remotes
        .values()
        .filter(|r| r.subnet.contains(&ip))
        .max_by_key(|r| r.subnet.prefix_len())
}

/// The direct remote lease holding `ip`, longest prefix first.
fn direct_lease(want: &Desired, ip: Ipv4Addr) -> Option<&DirectRoute> {
    want.direct
        .values()
        .filter(|d| d.subnet.contains(&IpAddr::V4(ip)))
        .max_by_key(|d| d.subnet.prefix_len())
}

/// The VXLAN device's name, for remotes that only exist with one.
fn vtep_name(want: &Desired) -> &str {
    want.vtep
        .as_ref()
        .map_or("(no VXLAN device)", |v| v.link.name.as_str())
}

/// The kernel path from a pod (no programs).
fn kernel_from_pod(want: &Desired, have: &Observed, q: &Query, local: bool, steps: &mut Vec<Step>) {
    if local {
        steps.push(step(
            "kernel",
            format!("{} is on cni0: bridged to its port", q.dst),
        ));
        return;
    }
    match remote_lease(want, q.dst) {
        Some(r) => {
            let route = have
                .vtep
                .as_ref()
                .is_some_and(|e| e.routes.contains(&(r.subnet, true)));
            steps.push(step(
                "kernel",
                format!(
                    "routed by the node: {} via {} dev {} onlink ({}), neighbour {}, FDB to {}; {} encapsulates it",
                    r.subnet,
                    r.subnet.network(),
                    vtep_name(want),
                    if route { "in place" } else { "MISSING" },
                    r.vtep_mac,
                    r.public_ip,
                    vtep_name(want)
                ),
            ));
        }
        None => match direct_lease(want, q.dst) {
            Some(d) => {
                let route = have
                    .uplink_routes
                    .as_ref()
                    .is_some_and(|r| r.contains(&(d.subnet, d.via)));
                steps.push(step(
                    "kernel",
                    format!(
                        "routed by the node: {} via {} on the uplink ({}), unencapsulated",
                        d.subnet,
                        d.via,
                        if route { "in place" } else { "MISSING" }
                    ),
                ));
            }
            None => kernel_beyond(want, q, steps),
        },
    }
}

/// What the kernel does with pod traffic that is not for a pod.
fn kernel_beyond(want: &Desired, q: &Query, steps: &mut Vec<Step>) {
    let masqueraded = want
        .masq
        .and_then(|m| m.v4)
        .is_some_and(|(network, _)| !network.contains(&q.dst) && !q.dst.is_multicast());
    steps.push(step(
        "kernel",
        if masqueraded {
            "routed by the node (a Service, the node or outside); leaving the cluster network, it is masqueraded to the node's address by the ip-masq rules".into()
        } else {
            "routed by the node (a Service, the node itself or outside the cluster)".into()
        },
    ));
}

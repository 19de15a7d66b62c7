//! Flannel's other IPv4 modes end to end (root; real packets):
//! `DirectRouting` (direct routes between nodes on one L2 network, VXLAN
//! to the rest) and the `host-gw` backend, on eBPF nodes, `--datapath
//! kernel` nodes and a node wired the way stock Flannel wires it. The lab
//! puts "far" nodes on a second node network one routed hop away.

use std::net::IpAddr;

use anyhow::{Context, Result};
use flannel_common::REMOTE_F_DIRECT;
use flannel_tests::{
    lab::{LabOptions, NodeKind, NodeSpec, FABRIC_IP, FABRIC_IP6},
    netns::{exec, ip},
    progtest,
    traffic::udp_source_seen,
    Lab,
};

const DIRECT_ROUTING: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1,"Port":4789,"DirectRouting":true}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

fn with_conf(conf: &str) -> LabOptions {
    LabOptions {
        net_conf: Some(conf.into()),
        ..Default::default()
    }
}

/// `ip route show <dst>` in node `i`'s namespace, one line.
fn route(lab: &Lab, i: usize, dst: &str) -> Result<String> {
    Ok(ip(&["-n", &lab.nodes[i].ns, "route", "show", dst])?
        .trim()
        .to_string())
}

/// `ping` with DF set (`-M do`) and `size` bytes of payload from pod
/// `from` to `to`, either family; true when every echo was answered.
fn df_ping(lab: &Lab, from: (usize, usize), to: IpAddr, size: usize) -> Result<bool> {
    let (to, size) = (to.to_string(), size.to_string());
    let family = if to.contains(':') { "-6" } else { "-4" };
    let args = [
        "ping", family, "-q", "-n", "-c", "2", "-i", "0.05", "-W", "2", "-M", "do", "-s", &size,
        &to,
    ];
    Ok(exec(&lab.pod(from).ns, &args)?.status.success())
}

/// The largest ping payload that fits the lab's pod MTU passes both ways
/// between the first pods of nodes `i` and `j`; one byte more does not
/// (DF set, as `ping -M do` sends).
fn mtu_edge(lab: &Lab, i: usize, j: usize) -> Result<()> {
    let fits = (lab.pod_mtu() - 28) as usize;
    for (a, b) in [((i, 0), (j, 0)), ((j, 0), (i, 0))] {
        let to = IpAddr::V4(lab.pod(b).ip);
        assert!(df_ping(lab, a, to, fits)?, "ping -s {fits} -> {to}");
        assert!(
            !df_ping(lab, a, to, fits + 1)?,
            "ping -s {} -> {to} must not fit the pod MTU {}",
            fits + 1,
            lab.pod_mtu()
        );
    }
    Ok(())
}

/// A host-gw lab's fifth node, an eBPF one off the node network: each of
/// the first three nodes sets aside its `sides` (1 per family), and it
/// sets aside every one of theirs and routes to none. Returns its index.
fn join_far_node(lab: &mut Lab, sides: usize) -> Result<usize> {
    let far = lab.join_node_on(NodeKind::Ebpf, true)?;
    lab.wait_for(
        std::time::Duration::from_secs(10),
        "every node to set the far node's leases aside",
        |lab| {
            (0..3).all(|i| {
                lab.nodes[i]
                    .status()
                    .is_ok_and(|s| s.ignored_leases == sides)
            }) && lab.nodes[far]
                .status()
                .is_ok_and(|s| s.ignored_leases == 4 * sides && s.remote_leases == 0)
        },
    )?;
    Ok(far)
}

/// Why node 0 sets the lease `subnet` aside, as `inspect` says.
fn set_aside_because(lab: &Lab, subnet: &str) -> Result<String> {
    let inspect = flannel_agent::api::call(
        &lab.nodes[0].socket(),
        &flannel_agent::api::Request::Inspect {},
    )?
    .inspect
    .context("no inspect answer")?;
    let why = inspect
        .ignored
        .iter()
        .find(|c| c.name.starts_with(subnet))
        .with_context(|| format!("{subnet} not in {:?}", inspect.ignored))?;
    Ok(why.problems.join("; "))
}

#[test]
fn direct_routing_routes_on_link_nodes_and_encapsulates_the_far_one() -> Result<()> {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1).far(),
        ],
        with_conf(DIRECT_ROUTING),
    )?;
    // Flannel's kernel state: a plain route to the on-link node, the VXLAN
    // entries for the far one.
    let (n2, n3) = (&lab.nodes[1], &lab.nodes[2]);
    let direct = route(&lab, 0, &n2.subnet.to_string())?;
    assert!(
        direct.contains(&format!("via {} dev eth0", n2.ip)),
        "{direct}"
    );
    let far = route(&lab, 0, &n3.subnet.to_string())?;
    assert!(
        far.contains(&format!("via {} dev flannel.1", n3.subnet.network()))
            && far.contains("onlink"),
        "{far}"
    );
    // The far node reaches both the other way round over VXLAN.
    let back = route(&lab, 2, &lab.nodes[0].subnet.to_string())?;
    assert!(
        back.contains("dev flannel.1") && back.contains("onlink"),
        "{back}"
    );
    // The maps say the same.
    let remotes = flannel_agent::datapath::ebpf::read_remotes(&lab.nodes[0].bpf_dir)?;
    let entry = |subnet| {
        remotes
            .iter()
            .find(|(n, _, _)| *n == subnet)
            .map(|(_, ip, r)| (*ip, r.flags, r.vtep_mac))
    };
    assert_eq!(entry(n2.subnet), Some((n2.ip, REMOTE_F_DIRECT, [0; 6])));
    assert_eq!(entry(n3.subnet), Some((n3.ip, 0, n3.vtep_mac.0)));
    lab.every_pair(25000)?;
    mtu_edge(&lab, 0, 1)?;
    mtu_edge(&lab, 0, 2)?;

    // `trace` explains both kinds of remote from the live state.
    let trace = |src, dst| -> Result<flannel_agent::api::Trace> {
        flannel_agent::api::call(
            &lab.nodes[0].socket(),
            &flannel_agent::api::Request::Trace {
                src,
                dst,
                proto: None,
                dport: None,
            },
        )?
        .trace
        .context("no trace")
    };
    let (a, near, far) = (lab.pod((0, 0)).ip, lab.pod((1, 0)).ip, lab.pod((2, 0)).ip);
    let t = trace(a, near)?;
    assert_eq!(
        t.expect,
        ["pod_direct_redirect", "pod_direct_neigh"],
        "{t:?}"
    );
    assert!(
        t.steps.iter().any(|s| s.what.contains("routed directly")),
        "{t:?}"
    );
    let t = trace(a, far)?;
    assert_eq!(t.expect, ["pod_encap_redirect", "pod_encap_neigh"], "{t:?}");
    let t = trace(near, a)?;
    assert_eq!(t.expect, ["uplink_pass_other_host"], "{t:?}");
    Ok(())
}

#[test]
fn direct_routing_between_ebpf_kernel_and_stock_flannel_nodes() -> Result<()> {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
            NodeSpec::new(NodeKind::StockFlannel, 1),
            NodeSpec::new(NodeKind::Ebpf, 1).far(),
        ],
        with_conf(DIRECT_ROUTING),
    )?;
    // The kernel data path programs the same direct route.
    let r = route(&lab, 1, &lab.nodes[2].subnet.to_string())?;
    assert!(
        r.contains(&format!("via {} dev eth0", lab.nodes[2].ip)),
        "{r}"
    );
    lab.every_pair(25100)?;
    Ok(())
}

#[test]
fn host_gw_routes_every_pair_directly_and_refuses_a_node_off_the_network() -> Result<()> {
    let mut lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
            NodeSpec::new(NodeKind::StockFlannel, 1),
        ],
        with_conf(HOST_GW),
    )?;
    assert_eq!(lab.pod_mtu(), 1500);
    for n in &lab.nodes {
        // No VXLAN device on any node: host-gw has none.
        assert!(
            ip(&["-n", &n.ns, "link", "show", "flannel.1"]).is_err(),
            "{} has flannel.1",
            n.ns
        );
        let mtu = ip(&["-n", &n.ns, "-j", "link", "show", "cni0"])?;
        let v: serde_json::Value = serde_json::from_str(&mtu)?;
        assert_eq!(v[0]["mtu"], 1500, "{}: cni0", n.ns);
        // subnet.env carries the uplink's MTU for the CNI plugin.
        if n.kind != NodeKind::StockFlannel {
            let env = std::fs::read_to_string(n.subnet_file())?;
            assert!(env.contains("FLANNEL_MTU=1500"), "{env}");
        }
    }
    for i in [0, 2] {
        for j in (0..lab.nodes.len()).filter(|j| *j != i) {
            let r = route(&lab, i, &lab.nodes[j].subnet.to_string())?;
            let want = format!("via {} dev eth0", lab.nodes[j].ip);
            assert!(r.contains(&want), "node {i} to node {j}: {r}");
        }
    }
    lab.every_pair(25200)?;
    mtu_edge(&lab, 0, 1)?;
    mtu_edge(&lab, 0, 3)?;

    // A node off the L2 network cannot be routed to: every node leaves
    // its lease out with Flannel's reason, and the far node all of theirs.
    let far = join_far_node(&mut lab, 1)?;
    let far_subnet = lab.nodes[far].subnet;
    let why = set_aside_because(&lab, &far_subnet.to_string())?;
    assert!(why.contains("network is unreachable"), "{why}");
    assert!(
        route(&lab, 0, &far_subnet.to_string())?.is_empty(),
        "no route to a lease set aside"
    );
    Ok(())
}

const DUAL_STACK: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":1,"Port":4789}}"#;

/// Dual-stack VXLAN on an IPv4 and IPv6 node network: eBPF, kernel-path
/// and stock-Flannel nodes, every ordered pod pair over both families
/// (IPv4 by the eBPF path, IPv6 by the kernel's flannel-v6.1 on every
/// node), Flannel's IPv6 objects on the agents' nodes, and the IPv6 MTU
/// edge (flannel-v6.1 is 20 bytes shorter: the kernel says "packet too
/// big").
#[test]
fn dual_stack_vxlan_carries_both_families_between_every_kind_of_node() -> Result<()> {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
            NodeSpec::new(NodeKind::StockFlannel, 1),
        ],
        with_conf(DUAL_STACK),
    )?;
    for (i, n) in lab.nodes.iter().enumerate() {
        assert!(n.subnet6.is_some(), "{} has no IPv6 lease", n.ns);
        assert!(lab.pod((i, 0)).ip6.is_some(), "{}'s pod has no IPv6", n.ns);
        if n.kind == NodeKind::StockFlannel {
            continue;
        }
        // subnet.env carries Flannel's IPv6 pair.
        let env = std::fs::read_to_string(n.subnet_file())?;
        let s6 = n.subnet6.unwrap();
        assert!(
            env.contains("FLANNEL_IPV6_NETWORK=fd00:10:244::/56"),
            "{env}"
        );
        assert!(
            env.contains(&format!("FLANNEL_IPV6_SUBNET={}1/64", s6.network())),
            "{env}"
        );
        // flannel-v6.1 over the node's IPv6, MTU uplink − 70, and a route
        // per remote with its neighbour.
        let dev = ip(&["-n", &n.ns, "-d", "-j", "link", "show", "flannel-v6.1"])?;
        let v: serde_json::Value = serde_json::from_str(&dev)?;
        assert_eq!(v[0]["mtu"], 1430, "{dev}");
        assert_eq!(
            v[0]["linkinfo"]["info_data"]["local6"],
            n.ip6.unwrap().to_string(),
            "{dev}"
        );
        for (j, o) in lab.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let r = ip(&[
                "-n",
                &n.ns,
                "-6",
                "route",
                "show",
                &o.subnet6.unwrap().to_string(),
            ])?;
            assert!(
                r.contains("dev flannel-v6.1") && r.contains("onlink"),
                "node {i} to node {j}: {r}"
            );
            let neigh = ip(&["-n", &n.ns, "-6", "neigh", "show", "dev", "flannel-v6.1"])?;
            assert!(
                neigh.contains(&o.vtep6_mac.to_string()),
                "node {i}: no neighbour for node {j} in {neigh}"
            );
        }
    }
    lab.every_pair(25300)?;

    // VXLAN over IPv6 from a host that holds no lease (the fabric) is
    // counted and dropped by the IPv6 guard on the kernel-path node (and
    // by the programs on an eBPF one).
    let kernel = &lab.nodes[2];
    let dropped6 = || -> Result<u64> {
        let out = exec(
            &kernel.ns,
            &["nft", "list", "chain", "ip6", "flannel-guard", "input"],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let n = text
            .split("counter packets ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .with_context(|| format!("no IPv6 VXLAN rule in {text}"))?;
        Ok(n.parse()?)
    };
    let ebpf_dropped = || -> Result<u64> {
        let c = lab.nodes[0].counters()?;
        Ok(c["uplink_drop_unknown_vtep"] + c["xdp_drop_unknown_vtep"])
    };
    let (k0, e0) = (dropped6()?, ebpf_dropped()?);
    let vxlan6 = {
        let mut v = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        v.extend(progtest::eth([2; 6], [4; 6], 0x86dd, &[0x60; 40]));
        v
    };
    for node in [kernel, &lab.nodes[0]] {
        let (to, payload) = (node.ip6.unwrap(), vxlan6.clone());
        flannel_tests::netns::in_netns(&lab.fabric, move || {
            let s = std::net::UdpSocket::bind("[::]:0")?;
            s.send_to(&payload, std::net::SocketAddr::new(to.into(), 4789))?;
            Ok(())
        })?;
    }
    lab.wait_for(
        std::time::Duration::from_secs(2),
        "IPv6 VXLAN guards",
        |_| dropped6().is_ok_and(|n| n == k0 + 1) && ebpf_dropped().is_ok_and(|n| n == e0 + 1),
    )?;

    // Without --ip-masq the CNI plugin masquerades (ipMasq), both families:
    // a pod's IPv6 to outside the cluster leaves with the node's IPv6.
    let seen = udp_source_seen(&lab.pod((0, 0)).ns, &lab.fabric, FABRIC_IP6, 7205)?;
    assert_eq!(seen, IpAddr::from(lab.nodes[0].ip6.unwrap()));

    // The IPv6 MTU edge: 1430 through flannel-v6.1 (1382 bytes of ICMPv6
    // payload) passes both ways; one byte more is refused with "packet too
    // big" and the sender's path MTU drops to 1430.
    let (a, b) = ((0, 0), (1, 0));
    let to6 = lab.pod(b).ip6.unwrap();
    let to = to6.to_string();
    assert!(df_ping(&lab, a, to6.into(), 1430 - 48)?, "ping6 -s 1382");
    assert!(!df_ping(&lab, a, to6.into(), 1430 - 48 + 1)?);
    let route = exec(&lab.pod(a).ns, &["ip", "-6", "route", "get", &to])?;
    let text = String::from_utf8_lossy(&route.stdout);
    assert!(text.contains("mtu 1430"), "{text}");
    Ok(())
}

const IPV6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":1,"Port":4789}}"#;

/// An IPv6-only cluster (`EnableIPv4: false`) on a node network with no
/// IPv4 at all: leases with Flannel's empty IPv4 side
/// (`0.0.0.0-0&<IPv6 subnet>`, no IPv4 BackendData), subnet.env with the
/// IPv6 pair alone, no `flannel.1` and no IPv4 on `cni0` or in the pods;
/// every ordered pod pair between eBPF and kernel-path nodes over
/// ICMPv6, TCP and UDP, the counters proving the path (the eBPF nodes
/// encapsulate and decapsulate IPv6 themselves); and the IPv6 MTU edge.
#[test]
fn ipv6_only_cluster_carries_every_pair_over_ipv6_alone() -> Result<()> {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
        ],
        with_conf(IPV6_ONLY),
    )?;
    assert!(lab.ipv6_only());
    let leases = lab.local_store()?.leases()?;
    assert_eq!(leases.len(), 3, "{leases:?}");
    for n in &lab.nodes {
        let s6 = n.subnet6.context("no IPv6 lease")?;
        let l = &leases[&ipnet::IpNet::V6(s6)];
        assert!(!l.has_ipv4(), "{l:?}");
        assert_eq!(l.key(), format!("0.0.0.0-0&{}-64", s6.network()));
        assert_eq!(l.attrs.public_ipv6, n.ip6);
        assert!(l.attrs.backend_data.is_null(), "{l:?}");
        let env = std::fs::read_to_string(n.subnet_file())?;
        assert_eq!(
            env,
            format!(
                "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET={}1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
                s6.network()
            )
        );
        // No flannel.1; flannel-v6.1 over the node's IPv6.
        assert!(ip(&["-n", &n.ns, "link", "show", "flannel.1"]).is_err());
        let dev = ip(&["-n", &n.ns, "-d", "-j", "link", "show", "flannel-v6.1"])?;
        let v: serde_json::Value = serde_json::from_str(&dev)?;
        assert_eq!(
            v[0]["linkinfo"]["info_data"]["local6"],
            n.ip6.context("no IPv6")?.to_string(),
            "{dev}"
        );
        // IPv4 nowhere: the node network, the bridge, the pods.
        for (ns, dev) in [(&n.ns, "eth0"), (&n.ns, "cni0"), (&n.pods[0].ns, "eth0")] {
            let v4 = ip(&["-n", ns, "-4", "addr", "show", "dev", dev])?;
            assert!(!v4.contains("inet "), "{ns} {dev}: {v4}");
        }
        assert!(n.pods[0].ip.is_unspecified() && n.pods[0].ip6.is_some());
    }
    lab.every_pair(25700)?;
    // The eBPF nodes carried it all as IPv6: nothing IPv4 encapsulated,
    // decapsulated or redirected.
    for i in [0, 1] {
        let c = lab.nodes[i].counters()?;
        assert!(
            c["pod_encap6_redirect"] + c["pod_encap6_neigh"] >= 10 && c["uplink_decap6"] >= 10,
            "node {i}: {c:?}"
        );
        for v4 in ["pod_encap_redirect", "pod_local_redirect", "uplink_decap"] {
            assert_eq!(c[v4], 0, "node {i}: {v4}");
        }
    }
    assert!(lab.nodes[0].counters()?["pod_local_redirect6"] >= 10);
    // Without --ip-masq the CNI plugin masquerades (ipMasq), IPv6 alone:
    // a pod's packet to outside the cluster leaves with the node's IPv6.
    let seen = udp_source_seen(&lab.pod((0, 0)).ns, &lab.fabric, FABRIC_IP6, 7206)?;
    assert_eq!(seen, IpAddr::from(lab.nodes[0].ip6.context("no IPv6")?));
    // Pods at 1450 (Flannel's FLANNEL_MTU), flannel-v6.1 at 1430: the
    // kernel says "packet too big" past it, as in a dual-stack cluster.
    mtu_edge6(&lab, 0, 1, 1430)?;
    mtu_edge6(&lab, 0, 2, 1430)?;
    Ok(())
}

/// The IPv6-only cluster over the kube subnet manager (the store Flannel
/// carries IPv6-only clusters in): Nodes with an IPv6 podCIDR alone,
/// annotated as Flannel annotates them there (the IPv6 pair, neither
/// `public-ip` nor `backend-data`), the API server reached over IPv6, and
/// every ordered pod pair between an eBPF and a kernel-path node.
#[test]
fn ipv6_only_cluster_over_the_kube_subnet_manager() -> Result<()> {
    use flannel_agent::subnet::kube::{BACKEND_DATA, BACKEND_V6_DATA, PUBLIC_IP, PUBLIC_IPV6};
    use flannel_tests::{fakekube, lab::node_name, lab::LabStore};
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Kernel, 1),
        ],
        LabOptions {
            net_conf: Some(IPV6_ONLY.into()),
            store: LabStore::Kube(fakekube::url6()),
            before_agents: Some(fakekube::start_for_lab),
            ..Default::default()
        },
    )?;
    for (i, n) in lab.nodes.iter().enumerate() {
        let node = fakekube::of(&lab)
            .node(&node_name(i))
            .context("no Node object")?;
        let ann = &node["metadata"]["annotations"];
        assert_eq!(ann[PUBLIC_IPV6], n.ip6.context("no IPv6")?.to_string());
        assert!(
            ann[BACKEND_V6_DATA]
                .as_str()
                .is_some_and(|d| d.contains("VtepMAC")),
            "{ann}"
        );
        assert!(
            ann.get(PUBLIC_IP).is_none() && ann.get(BACKEND_DATA).is_none(),
            "{ann}"
        );
        // The podCIDR decided the lease.
        let want: ipnet::Ipv6Net = format!("fd00:10:244:{}::/64", 11 + i).parse()?;
        assert_eq!(n.subnet6, Some(want));
        assert_eq!(n.status()?.subnet, want.to_string());
    }
    lab.every_pair(25800)?;
    Ok(())
}

/// IPv6-only DirectRouting and host-gw: with DirectRouting the on-link
/// nodes routed directly (`<IPv6 subnet> via <node IPv6> dev eth0`) and
/// the far one over `flannel-v6.1`; with host-gw every node routed
/// directly and no VXLAN device at all, pods at the uplink's MTU. Every
/// ordered pod pair over ICMPv6, TCP and UDP between eBPF and
/// kernel-path nodes, the counters proving the path.
#[test]
fn ipv6_only_direct_routing_and_host_gw_route_directly_on_link() -> Result<()> {
    const DR: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":1,"Port":4789,"DirectRouting":true}}"#;
    const HOST_GW6: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#;
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Kernel, 1),
            NodeSpec::new(NodeKind::Ebpf, 1).far(),
        ],
        with_conf(DR),
    )?;
    for i in [0, 1] {
        for (j, o) in lab.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let s6 = o.subnet6.context("no IPv6 lease")?;
            let r = route6(&lab, i, &s6.to_string())?;
            let want = match o.far {
                true => format!("via {} dev flannel-v6.1", s6.network()),
                false => format!("via {} dev eth0", o.ip6.context("no IPv6")?),
            };
            assert!(r.contains(&want), "node {i} to node {j}: {r}");
        }
    }
    lab.every_pair(25900)?;
    drop(lab);

    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
        ],
        with_conf(HOST_GW6),
    )?;
    for n in &lab.nodes {
        for dev in ["flannel.1", "flannel-v6.1"] {
            assert!(ip(&["-n", &n.ns, "link", "show", dev]).is_err(), "{dev}");
        }
        let env = std::fs::read_to_string(n.subnet_file())?;
        assert!(env.contains("FLANNEL_MTU=1500"), "{env}");
    }
    let leases = lab.local_store()?.leases()?;
    for l in leases.values() {
        assert!(!l.has_ipv4() && l.attrs.backend_type == "host-gw", "{l:?}");
        assert!(l.attrs.public_ipv6.is_some() && l.attrs.backend_v6_data.is_null());
    }
    lab.every_pair(26100)?;
    Ok(())
}

const DUAL_STACK_DIRECT_ROUTING: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":1,"Port":4789,"DirectRouting":true}}"#;
const DUAL_STACK_HOST_GW: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#;

/// `ip -6 route show <dst>` in node `i`'s namespace, one line.
fn route6(lab: &Lab, i: usize, dst: &str) -> Result<String> {
    Ok(ip(&["-n", &lab.nodes[i].ns, "-6", "route", "show", dst])?
        .trim()
        .to_string())
}

/// The IPv6 MTU edge between the first pods of nodes `i` and `j`, both
/// ways: an IPv6 packet of `mtu` bytes (DF, as IPv6 always is) passes, one
/// byte more does not.
fn mtu_edge6(lab: &Lab, i: usize, j: usize, mtu: usize) -> Result<()> {
    let fits = mtu - 48;
    for (a, b) in [((i, 0), (j, 0)), ((j, 0), (i, 0))] {
        let to = IpAddr::V6(lab.pod(b).ip6.context("no IPv6")?);
        assert!(df_ping(lab, a, to, fits)?, "ping -6 -s {fits} -> {to}");
        assert!(
            !df_ping(lab, a, to, fits + 1)?,
            "ping -6 -s {} -> {to} must not fit {mtu}",
            fits + 1
        );
    }
    Ok(())
}

/// Dual-stack DirectRouting: both families routed directly between the
/// nodes of one L2 network (`<IPv6 subnet> via <node IPv6> dev eth0`, the
/// eBPF nodes' `pod_direct6_*`), both over VXLAN to a node one routed hop
/// away on each family (`flannel-v6.1` entries, `pod_encap6_*`), on eBPF,
/// kernel-path and stock-Flannel nodes, every ordered pod pair over both
/// families; the IPv6 MTU edges of each kind of remote.
#[test]
fn dual_stack_direct_routing_routes_both_families_directly_on_link() -> Result<()> {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Kernel, 1),
            NodeSpec::new(NodeKind::StockFlannel, 1),
            NodeSpec::new(NodeKind::Ebpf, 1).far(),
        ],
        with_conf(DUAL_STACK_DIRECT_ROUTING),
    )?;
    for i in [0, 1] {
        for j in (0..lab.nodes.len()).filter(|j| *j != i) {
            let o = &lab.nodes[j];
            let (s6, ip6) = (
                o.subnet6.context("no IPv6 lease")?,
                o.ip6.context("no IPv6")?,
            );
            let r = route6(&lab, i, &s6.to_string())?;
            if o.far {
                assert!(
                    r.contains(&format!("via {} dev flannel-v6.1", s6.network()))
                        && r.contains("onlink"),
                    "node {i} to far node {j}: {r}"
                );
            } else {
                assert!(
                    r.contains(&format!("via {ip6} dev eth0")),
                    "node {i} to node {j}: {r}"
                );
            }
        }
    }
    lab.every_pair(25500)?;
    // Direct: the pod MTU (1450) is the limit; over flannel-v6.1, 1430.
    mtu_edge6(&lab, 0, 2, lab.pod_mtu() as usize)?;
    mtu_edge6(&lab, 0, 3, 1430)?;
    Ok(())
}

/// Dual-stack host-gw: every node's IPv6 subnet routed via its node's
/// IPv6, no VXLAN device of either family anywhere, pods at the uplink's
/// MTU on both families, every ordered pod pair over both families
/// between eBPF, kernel-path and stock-Flannel nodes; a node off the
/// network is set aside on both families with Flannel's reason.
#[test]
fn dual_stack_host_gw_routes_both_families_via_each_node() -> Result<()> {
    let mut lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
            NodeSpec::new(NodeKind::StockFlannel, 1),
        ],
        with_conf(DUAL_STACK_HOST_GW),
    )?;
    for (i, n) in lab.nodes.iter().enumerate() {
        for dev in ["flannel.1", "flannel-v6.1"] {
            assert!(
                ip(&["-n", &n.ns, "link", "show", dev]).is_err(),
                "{} has {dev}",
                n.ns
            );
        }
        if n.kind == NodeKind::StockFlannel {
            continue;
        }
        for (j, o) in lab.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let (s6, ip6) = (
                o.subnet6.context("no IPv6 lease")?,
                o.ip6.context("no IPv6")?,
            );
            let r = route6(&lab, i, &s6.to_string())?;
            assert!(
                r.contains(&format!("via {ip6} dev eth0")),
                "node {i} to node {j}: {r}"
            );
        }
    }
    lab.every_pair(25600)?;
    mtu_edge6(&lab, 0, 1, 1500)?;
    mtu_edge6(&lab, 0, 3, 1500)?;

    // A node off both networks: its IPv4 and IPv6 sides are set aside on
    // every node, with Flannel's reason for each.
    let far = join_far_node(&mut lab, 2)?;
    let far_subnet6 = lab.nodes[far].subnet6.context("no IPv6 lease")?;
    let why = set_aside_because(&lab, &far_subnet6.to_string())?;
    assert!(why.contains("is not on this node's IPv6 network"), "{why}");
    assert!(route6(&lab, 0, &far_subnet6.to_string())?.is_empty());
    Ok(())
}

/// `--ip-masq` in a dual-stack cluster: Flannel's rules for both families
/// (`ip flannel-ipv4` and `ip6 flannel-ipv6`), pods' IPv6 to outside the
/// cluster leaves with the node's IPv6, pod-to-pod IPv6 keeps the pod's,
/// and the IPv6 table deleted by hand comes back.
#[test]
fn ip_masq_covers_ipv6_in_a_dual_stack_cluster() -> Result<()> {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
        ],
        LabOptions {
            agent_args: vec!["--ip-masq".into()],
            ..with_conf(DUAL_STACK)
        },
    )?;
    let list = |family: &str, table: &str| -> Result<String> {
        let o = exec(&lab.nodes[0].ns, &["nft", "list", "table", family, table])?;
        anyhow::ensure!(o.status.success(), "no table {family} {table}");
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let lease6 = lab.nodes[0].subnet6.context("no IPv6 lease")?;
    let rules = list("ip6", "flannel-ipv6")?;
    assert_eq!(
        rules.matches("masquerade fully-random").count(),
        2,
        "{rules}"
    );
    assert_eq!(rules.matches("return").count(), 3, "{rules}");
    for want in [
        "meta mark & 0x00004000 == 0x00004000",
        "ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244::/56",
        &format!("ip6 saddr != fd00:10:244::/56 ip6 daddr {lease6}"),
        "ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8",
        "ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56",
        "hook postrouting priority srcnat",
    ] {
        assert!(rules.contains(want), "{want} not in {rules}");
    }
    assert!(list("ip", "flannel-ipv4")?.contains("ip daddr != 224.0.0.0/4"));
    // The agent masquerades: the CNI plugin's tables are not there.
    assert!(list("ip6", "flannel-cni").is_err());

    let (pod, peer) = (lab.pod((0, 0)), lab.pod((1, 0)));
    let node_ip6 = lab.nodes[0].ip6.context("no node IPv6")?;
    let seen = udp_source_seen(&pod.ns, &lab.fabric, FABRIC_IP6, 7201)?;
    assert_eq!(seen, IpAddr::from(node_ip6));
    let pod_ip6 = pod.ip6.context("no pod IPv6")?;
    let seen = udp_source_seen(&pod.ns, &peer.ns, peer.ip6.context("no IPv6")?, 7202)?;
    assert_eq!(seen, IpAddr::from(pod_ip6));
    // IPv4 as before.
    let seen = udp_source_seen(&pod.ns, &lab.fabric, FABRIC_IP, 7203)?;
    assert_eq!(seen, IpAddr::from(lab.nodes[0].ip));

    exec(
        &lab.nodes[0].ns,
        &["nft", "delete", "table", "ip6", "flannel-ipv6"],
    )?;
    lab.wait_for(
        std::time::Duration::from_secs(5),
        "IPv6 masquerade table reinstalled",
        |_| list("ip6", "flannel-ipv6").is_ok_and(|r| r.contains("masquerade")),
    )?;
    let seen = udp_source_seen(&pod.ns, &lab.fabric, FABRIC_IP6, 7204)?;
    assert_eq!(seen, IpAddr::from(node_ip6));
    Ok(())
}

/// A dual-stack pod's IPv6 on both data paths: on an eBPF node its
/// address in the IPv6 endpoint map (and out of it after DEL), IPv6
/// between pods of one node redirected straight into the peer, another
/// source dropped, a frame cut anywhere in its IPv6 header passed as
/// malformed, and an IPv6 address outside the node's IPv6 lease refused by
/// the agent; on a kernel-path node the bridge guard drops the same
/// spoofed sources and lets the pod's own through.
#[test]
fn pod_ipv6_is_checked_and_carried_on_both_data_paths() -> Result<()> {
    use flannel_agent::{
        api::{self, EndpointRecord, Request},
        datapath::ebpf,
    };
    use flannel_tests::netns::send_frame;

    let mut lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 2),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 2),
        ],
        with_conf(DUAL_STACK),
    )?;
    let node = &lab.nodes[0];
    let (a, b) = (lab.pod((0, 0)), lab.pod((0, 1)));
    let (a6, b6) = (a.ip6.context("no IPv6")?, b.ip6.context("no IPv6")?);
    let index = |ifname: &str| -> Result<u32> {
        let out = ip(&["-n", &node.ns, "-j", "link", "show", ifname])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["ifindex"]
            .as_u64()
            .map(|i| i as u32)
            .context("ifindex")
    };
    let mut want = vec![
        (a6, index(&a.host_if)?, a.mac.0),
        (b6, index(&b.host_if)?, b.mac.0),
    ];
    want.sort();
    let mut have = ebpf::read_endpoints6(&node.bpf_dir)?;
    have.sort();
    assert_eq!(have, want);
    lab.every_pair(25400)?;

    // Raw frames from pod a to pod b, UDP to a closed port.
    let frame = |src: std::net::Ipv6Addr| {
        let udp = [0x30, 0x39, 0x30, 0x3a, 0, 12, 0, 0, 1, 2, 3, 4];
        progtest::eth(
            b.mac.0,
            a.mac.0,
            0x86dd,
            &progtest::ipv6(src, b6, 17, 64, &udp),
        )
    };
    let counted = |name: &str| -> Result<u64> { Ok(node.counters()?[name]) };
    let c0 = (
        counted("pod_local_redirect6")?,
        counted("pod_drop_spoofed_src6")?,
        counted("pod_pass_malformed")?,
    );
    send_frame(&a.ns, "eth0", frame(a6))?;
    let spoofed = [
        b6,
        lab.pod((1, 0)).ip6.context("no IPv6")?,
        "fd00:10:244:ff::1".parse()?,
        "2001:db8::1".parse()?,
    ];
    for src in spoofed {
        send_frame(&a.ns, "eth0", frame(src))?;
    }
    let whole = frame(a6);
    for len in 15..54 {
        send_frame(&a.ns, "eth0", whole[..len].to_vec())?;
    }
    let c1 = (
        counted("pod_local_redirect6")?,
        counted("pod_drop_spoofed_src6")?,
        counted("pod_pass_malformed")?,
    );
    assert!(c1.0 > c0.0, "own source: not redirected");
    assert_eq!(c1.1 - c0.1, spoofed.len() as u64, "spoofed sources");
    assert_eq!(c1.2 - c0.2, 39, "frames cut in the IPv6 header");

    // The kernel-path node's bridge guard: the same spoofed sources from
    // its pod are counted and dropped, the pod's own source is not.
    let (ka, kb) = (lab.pod((2, 0)), lab.pod((2, 1)));
    let (ka6, kb6) = (ka.ip6.context("no IPv6")?, kb.ip6.context("no IPv6")?);
    let guarded = || -> Result<u64> {
        let out = exec(
            &lab.nodes[2].ns,
            &[
                "nft",
                "list",
                "chain",
                "bridge",
                "flannel-guard",
                "prerouting",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains("@pods6"))
            .with_context(|| format!("no IPv6 rule in {text}"))?;
        let n = line
            .split("counter packets ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .context("no counter")?;
        Ok(n.parse()?)
    };
    let kframe = |src: std::net::Ipv6Addr| {
        let udp = [0x30, 0x39, 0x30, 0x3a, 0, 12, 0, 0, 1, 2, 3, 4];
        progtest::eth(
            kb.mac.0,
            ka.mac.0,
            0x86dd,
            &progtest::ipv6(src, kb6, 17, 64, &udp),
        )
    };
    let g0 = guarded()?;
    send_frame(&ka.ns, "eth0", kframe(ka6))?;
    send_frame(&ka.ns, "eth0", kframe("fe80::1234".parse()?))?;
    let kspoofed = [kb6, a6, "2001:db8::1".parse()?];
    for src in kspoofed {
        send_frame(&ka.ns, "eth0", kframe(src))?;
    }
    assert_eq!(guarded()? - g0, kspoofed.len() as u64, "kernel path");

    // The agent refuses an IPv6 address its IPv6 lease does not hold.
    let lease6 = node.subnet6.context("no IPv6 lease")?;
    let gateway6 = std::net::Ipv6Addr::from(u128::from(lease6.network()) + 1);
    for (ip6, why) in [
        (
            lab.pod((1, 0)).ip6.unwrap(),
            "is not in this node's IPv6 lease",
        ),
        (gateway6, "is the network or gateway address"),
    ] {
        let req = Request::Add(EndpointRecord {
            ip: Some(a.ip),
            mac: a.mac,
            host_ifname: a.host_if.clone(),
            ip6: Some(ip6),
        });
        let err = api::call(&node.socket(), &req).unwrap_err().to_string();
        assert!(err.contains(why), "{ip6}: {err}");
    }

    // CHECK knows the pod's IPv6: good; then with its IPv6 default route
    // gone, and with its IPv6 address gone, refused with code 101.
    let checked = {
        let mut c = lab.cni_conf(0, "1.0.0");
        c["prevResult"] = b.result.clone();
        c
    };
    let nsp = flannel_tests::lab::netns_path(&b.ns);
    let check = |lab: &Lab| lab.cni(0, "CHECK", &b.container_id, &nsp, "eth0", &checked);
    let c = check(&lab)?;
    assert!(
        c.success,
        "CHECK on a good dual-stack pod: {} {}",
        c.raw, c.stderr
    );
    for (args, why) in [
        (
            &["ip", "-6", "route", "del", "default"][..],
            "IPv6 route to ::/0 is gone",
        ),
        (
            &[
                "ip", "-6", "addr", "flush", "dev", "eth0", "scope", "global",
            ][..],
            "lost its IPv6 address",
        ),
    ] {
        exec(&b.ns, args)?;
        let c = check(&lab)?;
        assert!(!c.success, "CHECK must fail: {}", c.raw);
        assert_eq!(c.stdout["code"], 101, "{}", c.raw);
        let msg = c.stdout["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(why), "{msg}");
    }

    // DEL takes the pod's IPv6 entry with it.
    lab.del_pod((0, 1))?;
    let have = ebpf::read_endpoints6(&lab.nodes[0].bpf_dir)?;
    assert_eq!(have.iter().map(|e| e.0).collect::<Vec<_>>(), [a6]);
    lab.nodes[0].pods.remove(1);
    Ok(())
}

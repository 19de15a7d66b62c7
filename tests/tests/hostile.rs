//! Hostile packets on a live lab (root): VXLAN from a host on the node
//! network that holds no lease, and pods sending as another pod (IPv4 and
//! ARP). Each case checks the exact counter and that the target received
//! nothing; each has a control that the same packet from an honest sender
//! does arrive, so a test that passes is not a test whose packet was
//! broken.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result};
use flannel_common::decap;
use flannel_tests::{
    lab::LabOptions,
    netns::{in_netns, link_mac, link_packets, send_frame, spawn_in_netns},
    progtest::{arp_request, crafted_uplink_frames, vxlan_payload, Wire, CRAFTED_DPORT},
    Lab, NodeKind, NodeSpec,
};

const VXLAN_PORT: u16 = 4789;

/// Listens on UDP `at` in `ns` for `wait`; the payloads that arrived.
fn receive(
    ns: &str,
    at: SocketAddr,
    wait: Duration,
) -> Result<std::thread::JoinHandle<Result<Vec<Vec<u8>>>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = spawn_in_netns(ns, move || {
        let s = UdpSocket::bind(at)?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        tx.send(()).ok();
        let end = std::time::Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < end {
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }
        Ok(got)
    })?;
    rx.recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")?;
    Ok(h)
}

fn joined(h: std::thread::JoinHandle<Result<Vec<Vec<u8>>>>) -> Result<Vec<Vec<u8>>> {
    h.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?
}

/// UDP from `from` to `ns`'s `to` with a source address bound explicitly
/// (an address the sender holds on one of its interfaces).
fn send_udp(ns: &str, from: SocketAddr, to: SocketAddr, body: &'static [u8]) -> Result<()> {
    in_netns(ns, move || {
        let s = UdpSocket::bind(from)?;
        s.send_to(body, to)?;
        Ok(())
    })
}

/// `payload` as UDP from any address of `ns` to `to`, `times` times.
fn send_payload(ns: &str, to: SocketAddr, payload: &[u8], times: usize) -> Result<()> {
    let payload = payload.to_vec();
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..times {
            s.send_to(&payload, to)?;
        }
        Ok(())
    })
}

/// Gives pod namespace `ns` the address `ip` too, so that its kernel can
/// send under it (an attacker holding its victim's address).
fn hold_address(ns: &str, ip: Ipv4Addr) -> Result<()> {
    flannel_tests::netns::ip(&["-n", ns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    Ok(())
}

fn counter(lab: &Lab, i: usize, name: &str) -> u64 {
    lab.nodes[i].counters().unwrap()[name]
}

#[test]
fn vxlan_from_a_host_without_a_lease_never_reaches_a_pod() -> Result<()> {
    // TC decapsulation (the default on veth uplinks), then XDP.
    for (xdp_mode, drop_counter) in [
        ("off", "uplink_drop_unknown_vtep"),
        ("generic", "xdp_drop_unknown_vtep"),
    ] {
        let mut lab = Lab::with(
            &[NodeSpec::new(NodeKind::Ebpf, 1); 2],
            LabOptions {
                agent_args: vec!["--xdp-mode".into(), xdp_mode.into()],
                ..Default::default()
            },
        )?;
        let attacker = lab.add_fabric_host("att", Ipv4Addr::new(172, 30, 0, 200))?;
        let pod = lab.pod((0, 0));
        let (pod_ns, pod_ip) = (pod.ns.clone(), pod.ip);
        let node = SocketAddr::new(lab.nodes[0].ip.into(), VXLAN_PORT);
        let peer_pod = nth(lab.nodes[1].subnet, 9);
        let frame = vxlan_payload(
            lab.nodes[0].vtep_mac.0,
            (peer_pod, 1234),
            (pod_ip, 9999),
            b"smuggled",
        );
        let at = SocketAddr::new(pod_ip.into(), 9999);

        // Control: the same packet from a node that holds a lease arrives.
        let rx = receive(&pod_ns, at, Duration::from_millis(800))?;
        send_payload(&lab.nodes[1].ns, node, &frame, 1)?;
        assert_eq!(
            joined(rx)?,
            vec![b"smuggled".to_vec()],
            "{xdp_mode}: control"
        );

        // From the attacker: dropped in the data path, counted, nothing
        // reaches the pod.
        let before = counter(&lab, 0, drop_counter);
        let rx = receive(&pod_ns, at, Duration::from_millis(800))?;
        send_payload(&attacker, node, &frame, 5)?;
        assert!(joined(rx)?.is_empty(), "{xdp_mode}: the pod received it");
        assert_eq!(counter(&lab, 0, drop_counter) - before, 5, "{xdp_mode}");
    }
    Ok(())
}

/// The `n`th address of `net`.
fn nth(net: ipnet::Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// Counter names whose other traffic on the node network (ARP, the
/// store's TCP) can move too: for those the crafted frame must move them,
/// not alone.
const SHARED: [&str; 3] = ["pass_not_ipv4", "pass_other_host", "pass_not_vxlan"];

/// Crafted frames the kernel's VXLAN path delivers to the pod, and the
/// one the eBPF path delivers where the kernel would not: a wrong outer
/// UDP checksum, which the programs do not verify (the inner packet's own
/// checksum still protects what the pod reads).
const KERNEL_DELIVERS: [&str; 5] = [
    "valid",
    "outer IP options",
    "inner IP options",
    "to broadcast",
    "wrong UDP checksum",
];

/// Crafted frames the lab's Linux bridge (the node network) drops itself:
/// it validates IP headers (version, IHL, checksum, length) on the way.
const BRIDGE_DROPS: [&str; 5] = [
    "IPv6 ethertype",
    "outer IP version 6",
    "outer IHL 4",
    "IP total length past frame",
    "outer IP checksum",
];

#[test]
fn crafted_frames_from_a_host_on_the_node_network_get_the_kernels_verdict() -> Result<()> {
    for (xdp_mode, prefix) in [("off", "uplink_"), ("generic", "xdp_")] {
        let mut lab = Lab::with(
            &[
                NodeSpec::new(NodeKind::Ebpf, 2),
                NodeSpec::new(NodeKind::Ebpf, 1),
            ],
            LabOptions {
                agent_args: vec!["--xdp-mode".into(), xdp_mode.into()],
                ..Default::default()
            },
        )?;
        let attacker_ip = Ipv4Addr::new(172, 30, 0, 201);
        let attacker = lab.add_fabric_host("att", attacker_ip)?;
        let node0 = &lab.nodes[0];
        // The attacker spoofs node 1's address (a known VTEP) with its own
        // MAC: what the lease check alone cannot see, every other check
        // must.
        let wire = Wire {
            node_mac: link_mac(&node0.ns, "eth0")?,
            node_ip: node0.ip,
            sender_mac: link_mac(&attacker, "eth0")?,
            peer_ip: lab.nodes[1].ip,
            peer_pod: nth(lab.nodes[1].subnet, 9),
            stranger_ip: attacker_ip,
            vtep_mac: node0.vtep_mac.0,
            peer_vtep_mac: lab.nodes[1].vtep_mac.0,
            local_pod: lab.pod((0, 0)).ip,
            other_local_pod: lab.pod((0, 1)).ip,
            no_pod: nth(node0.subnet, 200),
            port: VXLAN_PORT,
            vni: 1,
        };
        let target = lab.pod((0, 0)).ns.clone();
        let at = SocketAddr::new(wire.local_pod.into(), CRAFTED_DPORT);
        let mut cases = crafted_uplink_frames(&wire);
        // An inner packet above the pod MTU makes a frame above the node
        // network's MTU, which the wire cannot carry (progtest covers it).
        cases.retain(|(_, _, reason)| *reason != "pass_too_big");
        assert!(
            cases.len() - BRIDGE_DROPS.len() >= 30,
            "{} cases",
            cases.len()
        );
        for (name, frame, reason) in cases {
            let what = format!("{xdp_mode}: {name}");
            let before = lab.nodes[0].counters()?;
            let rx = receive(&target, at, Duration::from_millis(300))?;
            let to_node = || link_packets(&lab.fabric, "n1").map(|(tx, _)| tx);
            let sent_before = to_node()?;
            send_frame(&attacker, "eth0", frame)?;
            let got = joined(rx)?;
            if BRIDGE_DROPS.contains(&name.as_str()) {
                // The node network's bridge validates IP headers and
                // drops these before any node sees them (progtest runs
                // them through the programs).
                assert_eq!(to_node()?, sent_before, "{what}: the bridge forwarded it");
                assert!(got.is_empty(), "{what}");
                continue;
            }
            let after = lab.nodes[0].counters()?;
            let moved = |name: &str| after[name] - before[name];
            let want = format!("{prefix}{reason}");
            if SHARED.contains(&reason) {
                let all: Vec<_> = before
                    .keys()
                    .filter(|k| moved(k) > 0)
                    .map(|k| (*k, moved(k)))
                    .collect();
                assert!(moved(&want) >= 1, "{what}: {want} did not move: {all:?}");
            } else {
                assert_eq!(moved(&want), 1, "{what}: {want}");
            }
            // No other verdict of this program that this frame could
            // reach moved: not a decap, not another drop.
            for name in decap::NAMES {
                let other = format!("{prefix}{name}");
                if other != want && !SHARED.contains(&name) {
                    assert_eq!(moved(&other), 0, "{what}: {other} moved too");
                }
            }
            // Delivered only where the kernel's own path delivers: a valid
            // frame, valid ones with IP options and one sent to the
            // broadcast MAC (passed to the kernel, whose flannel.1 takes
            // them).
            let delivers = KERNEL_DELIVERS.contains(&name.as_str());
            assert_eq!(
                got.len(),
                usize::from(delivers),
                "{what}: delivered {got:?}"
            );
            if reason == "decap" && prefix == "xdp_" {
                assert_eq!(moved("uplink_redirect"), 1, "{what}: TC routed it");
            }
        }
    }
    Ok(())
}

#[test]
fn a_pod_cannot_send_as_another_pod() -> Result<()> {
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 3),
        NodeSpec::new(NodeKind::Ebpf, 1),
    ])?;
    let (a, b, d, c) = (
        lab.pod((0, 0)),
        lab.pod((0, 1)),
        lab.pod((0, 2)),
        lab.pod((1, 0)),
    );
    // The attacker holds its victim's address too, so its kernel sends
    // with it.
    hold_address(&a.ns, b.ip)?;

    for (target, what) in [(c, "to another node"), (d, "on the same node")] {
        let at = SocketAddr::new(target.ip.into(), 9999);
        // Control: with its own address, A's packet arrives.
        let rx = receive(&target.ns, at, Duration::from_millis(600))?;
        send_udp(&a.ns, SocketAddr::new(a.ip.into(), 0), at, b"honest")?;
        assert_eq!(joined(rx)?, vec![b"honest".to_vec()], "{what}: control");

        let before = counter(&lab, 0, "pod_drop_spoofed_src");
        let rx = receive(&target.ns, at, Duration::from_millis(600))?;
        send_udp(&a.ns, SocketAddr::new(b.ip.into(), 0), at, b"as B")?;
        assert!(joined(rx)?.is_empty(), "{what}: the spoofed packet arrived");
        assert_eq!(
            counter(&lab, 0, "pod_drop_spoofed_src") - before,
            1,
            "{what}"
        );
    }

    // ARP: A claims B's address to the node. The node knows B first.
    let node_ns = lab.nodes[0].ns.clone();
    assert!(flannel_tests::netns::exec(
        &node_ns,
        &["ping", "-c", "1", "-W", "2", &b.ip.to_string()]
    )?
    .status
    .success());
    let neigh = || -> Result<String> {
        flannel_tests::netns::ip(&[
            "-n",
            &node_ns,
            "neigh",
            "show",
            &b.ip.to_string(),
            "dev",
            "cni0",
        ])
    };
    assert!(neigh()?.contains(&b.mac.to_string()), "{}", neigh()?);
    let mut reply = arp_request(a.mac.0, b.ip, lab.nodes[0].gateway());
    reply[20..22].copy_from_slice(&2u16.to_be_bytes()); // an ARP reply
    let before = counter(&lab, 0, "pod_drop_spoofed_arp");
    for _ in 0..3 {
        send_frame(&a.ns, "eth0", reply.clone())?;
    }
    assert_eq!(counter(&lab, 0, "pod_drop_spoofed_arp") - before, 3);
    std::thread::sleep(Duration::from_millis(200));
    let entry = neigh()?;
    assert!(
        entry.contains(&b.mac.to_string()) && !entry.contains(&a.mac.to_string()),
        "the node's neighbour entry for B was poisoned: {entry}"
    );
    // B is still reached, and A still talks with its own address.
    assert!(lab.ping((1, 0), b.ip, 2, 56)?);
    assert!(lab.ping((0, 0), c.ip, 2, 56)?);
    Ok(())
}

/// The packets an nftables rule's counter in `ns` has seen (`nft list`).
fn nft_count(ns: &str, family_table: &str, needle: &str) -> Result<u64> {
    let mut args = vec!["nft", "list", "table"];
    args.extend(family_table.split(' '));
    let out = flannel_tests::netns::exec(ns, &args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(needle))
        .with_context(|| format!("no rule with {needle:?} in {family_table}:\n{text}"))?;
    let n = line
        .split("counter packets ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .with_context(|| format!("no counter in {line:?}"))?;
    Ok(n.parse()?)
}

#[test]
fn the_kernel_path_is_guarded_by_nftables() -> Result<()> {
    let mut lab = Lab::new(&[
        NodeSpec::new(NodeKind::Kernel, 3),
        NodeSpec::new(NodeKind::Ebpf, 1),
    ])?;
    let attacker = lab.add_fabric_host("att", Ipv4Addr::new(172, 30, 0, 202))?;
    let node1 = lab.nodes[1].ns.clone();
    let node0 = lab.nodes[0].ns.clone();
    let pod = lab.pod((0, 0)).clone();
    let at = SocketAddr::new(pod.ip.into(), 9999);
    let node = SocketAddr::new(lab.nodes[0].ip.into(), VXLAN_PORT);
    let frame = vxlan_payload(
        lab.nodes[0].vtep_mac.0,
        (nth(lab.nodes[1].subnet, 9), 1234),
        (pod.ip, 9999),
        b"smuggled",
    );
    let vxlan_rule = "udp dport 4789 ip saddr != @vteps";

    // Kernel data path: VXLAN from a node holding a lease arrives ...
    let rx = receive(&pod.ns, at, Duration::from_millis(800))?;
    send_payload(&node1, node, &frame, 1)?;
    assert_eq!(joined(rx)?, vec![b"smuggled".to_vec()], "control");
    // ... and from the attacker it is dropped by the guard and counted.
    let before = nft_count(&node0, "ip flannel-guard", vxlan_rule)?;
    let rx = receive(&pod.ns, at, Duration::from_millis(800))?;
    send_payload(&attacker, node, &frame, 5)?;
    assert!(joined(rx)?.is_empty(), "the kernel path delivered it");
    assert_eq!(
        nft_count(&node0, "ip flannel-guard", vxlan_rule)? - before,
        5
    );

    // A pod on the kernel path sending as another pod: dropped on its
    // bridge port and counted; its own address still works, and ARP
    // claiming the other pod's address is dropped too.
    let (a, b, c) = (
        lab.pod((0, 1)).clone(),
        lab.pod((0, 2)).clone(),
        lab.pod((1, 0)).clone(),
    );
    hold_address(&a.ns, b.ip)?;
    let pod_rule = "iifname . ip saddr != @pods";
    for (target, what) in [(&c, "to another node"), (&pod, "on the same node")] {
        let at = SocketAddr::new(target.ip.into(), 9999);
        let rx = receive(&target.ns, at, Duration::from_millis(600))?;
        send_udp(&a.ns, SocketAddr::new(a.ip.into(), 0), at, b"honest")?;
        assert_eq!(joined(rx)?, vec![b"honest".to_vec()], "{what}: control");
        let before = nft_count(&node0, "bridge flannel-guard", pod_rule)?;
        let rx = receive(&target.ns, at, Duration::from_millis(600))?;
        send_udp(&a.ns, SocketAddr::new(b.ip.into(), 0), at, b"as B")?;
        assert!(joined(rx)?.is_empty(), "{what}: the spoofed packet arrived");
        assert_eq!(
            nft_count(&node0, "bridge flannel-guard", pod_rule)? - before,
            1,
            "{what}"
        );
    }
    let arp_rule = "arp saddr ip != @pods";
    let before = nft_count(&node0, "bridge flannel-guard", arp_rule)?;
    let mut reply = arp_request(a.mac.0, b.ip, lab.nodes[0].gateway());
    reply[20..22].copy_from_slice(&2u16.to_be_bytes());
    for _ in 0..3 {
        send_frame(&a.ns, "eth0", reply.clone())?;
    }
    assert_eq!(
        nft_count(&node0, "bridge flannel-guard", arp_rule)? - before,
        3
    );

    // On the eBPF node, what the programs leave to the kernel is guarded
    // too: VXLAN with outer IP options goes to the kernel before any
    // lease check, and from the attacker the guard drops it.
    let attacker_ip = Ipv4Addr::new(172, 30, 0, 202);
    let wire = Wire {
        node_mac: link_mac(&node1, "eth0")?,
        node_ip: lab.nodes[1].ip,
        sender_mac: link_mac(&attacker, "eth0")?,
        peer_ip: attacker_ip,
        peer_pod: nth(lab.nodes[0].subnet, 9),
        stranger_ip: attacker_ip,
        vtep_mac: lab.nodes[1].vtep_mac.0,
        peer_vtep_mac: lab.nodes[0].vtep_mac.0,
        local_pod: c.ip,
        other_local_pod: c.ip,
        no_pod: nth(lab.nodes[1].subnet, 200),
        port: VXLAN_PORT,
        vni: 1,
    };
    let (_, options, _) = crafted_uplink_frames(&wire)
        .into_iter()
        .find(|(name, _, _)| name == "outer IP options")
        .context("no options frame")?;
    let before = (
        nft_count(&node1, "ip flannel-guard", vxlan_rule)?,
        lab.nodes[1].counters()?["uplink_pass_ip_options"],
    );
    let rx = receive(
        &c.ns,
        SocketAddr::new(c.ip.into(), CRAFTED_DPORT),
        Duration::from_millis(500),
    )?;
    send_frame(&attacker, "eth0", options)?;
    assert!(
        joined(rx)?.is_empty(),
        "the eBPF node's kernel delivered it"
    );
    assert_eq!(
        (
            nft_count(&node1, "ip flannel-guard", vxlan_rule)?,
            lab.nodes[1].counters()?["uplink_pass_ip_options"],
        ),
        (before.0 + 1, before.1 + 1)
    );

    // Stopped, a kernel-path agent leaves no guard behind (uninstalling
    // and going back to Flannel both go through the kernel path).
    lab.stop_agent(0)?;
    let out = flannel_tests::netns::exec(&node0, &["nft", "list", "tables"])?;
    let tables = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!tables.contains("flannel-guard"), "{tables}");
    Ok(())
}

/// `tc_from_pod` verdicts whose counter the pods' own background traffic
/// (IPv6 router solicitations, ARP) can move as well.
const POD_SHARED: [&str; 2] = ["pass_not_ipv4", "pass_not_pod_dst"];

#[test]
fn crafted_frames_from_a_pod_get_the_kernels_verdict() -> Result<()> {
    use flannel_tests::progtest::{crafted_pod_frames, PodTarget, PodWire};
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 2),
        NodeSpec::new(NodeKind::Ebpf, 1),
        NodeSpec::new(NodeKind::Kernel, 2),
    ])?;
    // The kernel path's verdicts are taken with strict rp_filter.
    lab.strict_rp_filter()?;
    let remote = lab.pod((1, 0)).clone();
    let mut cases_run = 0;
    // The same frames from a pod on the eBPF node and on the kernel-path
    // node: the delivery verdict is the kernel's on both, and on the eBPF
    // node the counter says which check gave it.
    for s in [0, 2] {
        let node = &lab.nodes[s];
        let (pod, local) = (lab.pod((s, 0)), lab.pod((s, 1)));
        let wire = PodWire {
            pod_mac: pod.mac.0,
            pod_ip: pod.ip,
            gateway_mac: link_mac(&node.ns, "cni0")?,
            gateway_ip: node.gateway(),
            node_ip: node.ip,
            local_mac: local.mac.0,
            local_pod: local.ip,
            remote_pod: remote.ip,
            remote_no_pod: nth(lab.nodes[1].subnet, 200),
        };
        let cases = crafted_pod_frames(&wire);
        assert!(cases.len() >= 30, "{} cases", cases.len());
        for c in cases {
            let what = format!("{:?} node: {}", node.kind, c.name);
            let listen = match c.target {
                PodTarget::Remote => Some((remote.ns.as_str(), remote.ip, CRAFTED_DPORT)),
                PodTarget::Local => Some((local.ns.as_str(), local.ip, CRAFTED_DPORT)),
                PodTarget::Node => Some((node.ns.as_str(), node.gateway(), CRAFTED_DPORT)),
                PodTarget::NodeDhcp => Some((node.ns.as_str(), Ipv4Addr::UNSPECIFIED, 67)),
                PodTarget::Nothing => None,
            };
            let before = (s == 0).then(|| node.counters()).transpose()?;
            let rx = listen
                .map(|(ns, ip, port)| {
                    receive(
                        ns,
                        SocketAddr::new(ip.into(), port),
                        Duration::from_millis(300),
                    )
                })
                .transpose()?;
            send_frame(&pod.ns, "eth0", c.frame)?;
            if let Some(rx) = rx {
                let got = joined(rx)?;
                assert_eq!(
                    !got.is_empty(),
                    c.delivers,
                    "{what}: delivered {got:?}, the kernel path would {}",
                    if c.delivers { "deliver it" } else { "not" }
                );
            }
            cases_run += 1;
            let Some(before) = before else { continue };
            std::thread::sleep(Duration::from_millis(50));
            let after = node.counters()?;
            let moved = |name: &str| after[name] - before[name];
            let all: Vec<_> = before
                .keys()
                .filter(|k| k.starts_with("pod_") && moved(k) > 0)
                .map(|k| (*k, moved(k)))
                .collect();
            let wants: Vec<String> = if c.reason == "encap" {
                vec!["pod_encap_redirect".into(), "pod_encap_neigh".into()]
            } else {
                vec![format!("pod_{}", c.reason)]
            };
            let got: u64 = wants.iter().map(|w| moved(w)).sum();
            if POD_SHARED.contains(&c.reason) {
                assert!(got >= 1, "{what}: {wants:?} did not move: {all:?}");
            } else {
                assert_eq!(got, 1, "{what}: {wants:?}: {all:?}");
            }
            // Nothing else of the pod program's that this frame could
            // reach moved.
            for (name, n) in &all {
                let background = POD_SHARED.iter().any(|r| name.ends_with(r));
                assert!(
                    wants.iter().any(|w| w == name) || background,
                    "{what}: {name} moved by {n} too: {all:?}"
                );
            }
        }
    }
    assert!(cases_run >= 60);
    // Each honest pod still talks across and on its node afterwards.
    assert!(lab.ping((0, 0), remote.ip, 2, 56)?);
    assert!(lab.ping((2, 0), remote.ip, 2, 56)?);
    assert!(lab.ping((0, 0), lab.pod((0, 1)).ip, 2, 56)?);
    Ok(())
}

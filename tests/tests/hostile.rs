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
use flannel_tests::{
    lab::LabOptions,
    netns::{in_netns, send_frame, spawn_in_netns},
    progtest::{arp_request, vxlan_payload},
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
        let frame = vxlan_payload(
            lab.nodes[0].vtep_mac.0,
            (Ipv4Addr::new(10, 244, 9, 9), 1234),
            (pod_ip, 9999),
            b"smuggled",
        );
        let at = SocketAddr::new(pod_ip.into(), 9999);

        // Control: the same packet from a node that holds a lease arrives.
        let rx = receive(&pod_ns, at, Duration::from_millis(800))?;
        let (node1_ns, f) = (lab.nodes[1].ns.clone(), frame.clone());
        in_netns(&node1_ns, move || {
            UdpSocket::bind("0.0.0.0:0")?.send_to(&f, node)?;
            Ok(())
        })?;
        assert_eq!(
            joined(rx)?,
            vec![b"smuggled".to_vec()],
            "{xdp_mode}: control"
        );

        // From the attacker: dropped in the data path, counted, nothing
        // reaches the pod.
        let before = counter(&lab, 0, drop_counter);
        let rx = receive(&pod_ns, at, Duration::from_millis(800))?;
        let f = frame.clone();
        in_netns(&attacker, move || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..5 {
                s.send_to(&f, node)?;
            }
            Ok(())
        })?;
        assert!(joined(rx)?.is_empty(), "{xdp_mode}: the pod received it");
        assert_eq!(counter(&lab, 0, drop_counter) - before, 5, "{xdp_mode}");
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
    flannel_tests::netns::ip(&[
        "-n",
        &a.ns,
        "addr",
        "add",
        &format!("{}/32", b.ip),
        "dev",
        "eth0",
    ])?;

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

//! The local store (the lab's default) and the reconcile loop: lease
//! scenarios, drift repaired within the resync interval, ip-masq, and the
//! figures (convergence after a lease change, 5,000 remote leases).
//! Needs root (namespaces, BPF, nftables).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use aya::maps::{lpm_trie::Key, Array, LpmTrie, Map, MapData};
use flannel_agent::{mac::MacAddr, subnet::LeaseAttrs};
use flannel_common::{maps, RemoteNode};
use flannel_tests::{
    lab::{LabOptions, FABRIC_IP},
    netns::{exec, ip, sh},
    traffic::udp_source_seen,
    Lab, NodeKind, NodeSpec,
};
use ipnet::Ipv4Net;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn foreign(k: u32) -> (Ipv4Net, LeaseAttrs) {
    let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (k << 8)), 24).unwrap();
    let ip = Ipv4Addr::from(0x0a63_0000 + k);
    let b = k.to_be_bytes();
    (
        subnet,
        LeaseAttrs::vxlan(ip, 1, MacAddr([0x0e, 0x77, b[0], b[1], b[2], b[3]])),
    )
}

#[test]
fn local_store_scenarios() {
    let conf = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.4.0","Backend":{"Type":"vxlan","VNI":1,"Port":4789}}"#;
    let mut lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
        ],
        LabOptions {
            net_conf: Some(conf.into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(lab.nodes[0].status().unwrap().subnet_manager, "local");
    let env = std::fs::read_to_string(lab.nodes[0].subnet_file()).unwrap();
    assert_eq!(
        env,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    );

    // A third node joins and is reached from both.
    let n3 = lab
        .join_node_nowait(NodeKind::Ebpf, Some(net("10.244.3.0/24")))
        .unwrap();
    lab.wait_agent(n3, Duration::from_secs(20)).unwrap();
    lab.wait_converged(Duration::from_secs(10)).unwrap();
    lab.add_pod(n3).unwrap();
    assert!(lab.ping((0, 0), lab.pod((n3, 0)).ip, 3, 56).unwrap());
    assert!(lab.ping((1, 0), lab.pod((n3, 0)).ip, 3, 56).unwrap());

    // A reservation is respected and a full network says so.
    let store = lab.local_store().unwrap();
    let reserved = net("10.244.4.0/24");
    store.put(reserved, &foreign(1).1, None).unwrap();
    let n4 = lab
        .join_node_nowait(NodeKind::Ebpf, Some(reserved))
        .unwrap();
    lab.wait_for(Duration::from_secs(10), "node 4 out of subnets", |lab| {
        lab.agent_log(n4).contains("out of subnets")
    })
    .unwrap();

    // Node 3 removed while its agent is down: state gone everywhere, and
    // node 4 takes the freed subnet.
    lab.kill_agent(n3).unwrap();
    assert!(store.delete(net("10.244.3.0/24")).unwrap());
    lab.wait_for(Duration::from_secs(10), "node 3's state removed", |lab| {
        lab.lacks(0, net("10.244.3.0/24"))
            && exec(&lab.nodes[1].ns, &["ip", "route", "show", "10.244.3.0/24"])
                .is_ok_and(|o| o.stdout.is_empty())
    })
    .unwrap();
    lab.wait_agent(n4, Duration::from_secs(20)).unwrap();
    assert_eq!(lab.nodes[n4].subnet, net("10.244.3.0/24"));

    // A restarted agent gets its old subnet back.
    lab.kill_agent(0).unwrap();
    lab.start_agent(0).unwrap();
    assert_eq!(lab.nodes[0].subnet, net("10.244.1.0/24"));
    assert!(lab.ping((0, 0), lab.pod((1, 0)).ip, 3, 56).unwrap());
}

/// Removes subnet `s` from node `i`'s pinned remote trie, as a person with
/// bpftool would.
fn delete_map_entry(lab: &Lab, i: usize, s: Ipv4Net) {
    let data =
        MapData::from_pin(lab.nodes[i].bpf_dir.join("maps").join(maps::REMOTE_SUBNETS)).unwrap();
    let mut trie: LpmTrie<_, u32, RemoteNode> = LpmTrie::try_from(Map::LpmTrie(data)).unwrap();
    let key = Key::new(
        u32::from(s.prefix_len()),
        u32::from_ne_bytes(s.network().octets()),
    );
    trie.remove(&key).unwrap();
}

/// What node `i`'s pinned lease slot for subnet `s` (a /24 of the lab's
/// 10.244.0.0/16: slot = third byte) holds: the remote node's IP, or
/// `None` when empty. `clear` empties it first, as bpftool would.
fn lease_slot(lab: &Lab, i: usize, s: Ipv4Net, clear: bool) -> Option<Ipv4Addr> {
    let data =
        MapData::from_pin(lab.nodes[i].bpf_dir.join("maps").join(maps::LEASE_SLOTS)).unwrap();
    let mut slots: Array<_, RemoteNode> = Array::try_from(Map::Array(data)).unwrap();
    let slot = u32::from(s.network().octets()[2]);
    if clear {
        slots.set(slot, RemoteNode::default(), 0).unwrap();
    }
    let node = slots.get(&slot, 0).unwrap();
    (node.node_ip != 0).then(|| Ipv4Addr::from(node.node_ip.to_ne_bytes()))
}

#[test]
fn drift_is_repaired_and_masquerade_follows_flannel() {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
        ],
        LabOptions {
            agent_args: [
                "--ip-masq",
                "--iface-regex",
                r"^172\.30\.0\.",
                "--healthz-port",
                "10256",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        },
    )
    .unwrap();
    // The uplink found by --iface-regex on its address; healthz answers.
    assert_eq!(lab.nodes[0].status().unwrap().public_ip, "172.30.0.1");
    assert!(lab.agent_log(0).contains("eth0"));
    let health = flannel_tests::netns::http_get(
        &lab.nodes[0].ns,
        "127.0.0.1:10256".parse().unwrap(),
        "/healthz",
    )
    .unwrap();
    assert!(
        health.starts_with("HTTP/1.1 200 OK") && health.ends_with("ok"),
        "{health}"
    );
    let (ns, remote) = (lab.nodes[0].ns.clone(), lab.nodes[1].subnet);
    let gw = remote.network().to_string();
    let mac = lab.nodes[1].vtep_mac.to_string();
    let peer = lab.nodes[1].ip.to_string();
    let repaired = |lab: &Lab, what: &str| {
        // Resync is every 2 s in the lab.
        let took = lab
            .wait_for(Duration::from_secs(5), what, |lab| {
                lab.holds(0, remote)
                    && exec(
                        &lab.nodes[0].ns,
                        &["ip", "neigh", "show", &gw, "dev", "flannel.1"],
                    )
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&mac))
                    && sh(std::process::Command::new("bridge").args([
                        "-n",
                        &lab.nodes[0].ns,
                        "fdb",
                        "show",
                        "dev",
                        "flannel.1",
                    ]))
                    .is_ok_and(|o| o.contains(&format!("{mac} dst {peer}")))
            })
            .unwrap();
        assert!(
            lab.ping((0, 0), lab.pod((1, 0)).ip, 2, 56).unwrap(),
            "{what}: no traffic after repair"
        );
        eprintln!("drift: {what} repaired in {took:?}");
    };
    ip(&["-n", &ns, "route", "del", &remote.to_string()]).unwrap();
    repaired(&lab, "route deleted");
    ip(&["-n", &ns, "neigh", "del", &gw, "dev", "flannel.1"]).unwrap();
    repaired(&lab, "neighbour deleted");
    sh(std::process::Command::new("bridge").args([
        "-n",
        &ns,
        "fdb",
        "del",
        &mac,
        "dev",
        "flannel.1",
        "dst",
        &peer,
    ]))
    .unwrap();
    repaired(&lab, "FDB entry deleted");
    delete_map_entry(&lab, 0, remote);
    assert!(!lab.holds(0, remote));
    repaired(&lab, "map entry deleted");
    // The lease's slot holds the remote node; emptied by hand, it is
    // filled again.
    assert_eq!(lease_slot(&lab, 0, remote, false), Some(lab.nodes[1].ip));
    assert_eq!(lease_slot(&lab, 0, remote, true), None);
    lab.wait_for(Duration::from_secs(5), "lease slot refilled", |lab| {
        lease_slot(lab, 0, remote, false) == Some(lab.nodes[1].ip)
    })
    .unwrap();
    repaired(&lab, "lease slot emptied");
    ip(&["-n", &ns, "link", "del", "flannel.1"]).unwrap();
    repaired(&lab, "flannel.1 deleted");
    ip(&["-n", &ns, "link", "set", "eth0", "down"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    ip(&["-n", &ns, "link", "set", "eth0", "up"]).unwrap();
    repaired(&lab, "uplink flapped");

    // ip-masq: Flannel's five rules in our own table.
    let list = |lab: &Lab| {
        exec(
            &lab.nodes[0].ns,
            &["nft", "list", "table", "ip", "flannel-ipv4"],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
    };
    let rules = list(&lab).unwrap();
    assert_eq!(
        rules.matches("masquerade fully-random").count(),
        2,
        "{rules}"
    );
    assert_eq!(rules.matches("return").count(), 3, "{rules}");
    assert!(
        rules.contains("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16"),
        "{rules}"
    );
    assert!(rules.contains("ip daddr != 224.0.0.0/4"), "{rules}");
    assert!(
        rules.contains(&format!(
            "ip saddr != 10.244.0.0/16 ip daddr {}",
            lab.nodes[0].subnet
        )),
        "{rules}"
    );
    assert!(
        rules.contains("hook postrouting priority srcnat"),
        "{rules}"
    );
    // Pod to outside the cluster: masqueraded to the node's IP.
    let seen = udp_source_seen(&lab.pod((0, 0)).ns, &lab.fabric, FABRIC_IP, 7001).unwrap();
    assert_eq!(seen, IpAddr::from(lab.nodes[0].ip));
    // Pod to pod: never masqueraded.
    let seen = udp_source_seen(
        &lab.pod((0, 0)).ns,
        &lab.pod((1, 0)).ns,
        lab.pod((1, 0)).ip,
        7002,
    )
    .unwrap();
    assert_eq!(seen, IpAddr::from(lab.pod((0, 0)).ip));
    assert!(std::fs::read_to_string(lab.nodes[0].subnet_file())
        .unwrap()
        .contains("FLANNEL_IPMASQ=true"));
    // The table flushed by hand comes back.
    exec(
        &lab.nodes[0].ns,
        &["nft", "delete", "table", "ip", "flannel-ipv4"],
    )
    .unwrap();
    lab.wait_for(Duration::from_secs(5), "ip-masq table reinstalled", |lab| {
        list(lab).is_ok_and(|r| r.contains("masquerade"))
    })
    .unwrap();
}

fn median_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

/// Convergence from a lease change to every other node's data path, and the
/// cost of 5,000 remote leases on each data path. Prints the figures.
#[test]
fn convergence_and_scale_figures() {
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 0),
        NodeSpec::new(NodeKind::Ebpf, 0),
        NodeSpec::new(NodeKind::Kernel, 0),
    ])
    .unwrap();
    let store = lab.local_store().unwrap();
    let mut adds = Vec::new();
    let mut dels = Vec::new();
    for k in 0..20 {
        let (subnet, attrs) = foreign(100 + k);
        let t = Instant::now();
        store
            .put(subnet, &attrs, Some(Duration::from_secs(600)))
            .unwrap();
        lab.wait_for(Duration::from_secs(10), "lease added everywhere", |lab| {
            (0..3).all(|i| lab.holds(i, subnet))
        })
        .unwrap();
        adds.push(t.elapsed());
        let t = Instant::now();
        store.delete(subnet).unwrap();
        lab.wait_for(Duration::from_secs(10), "lease removed everywhere", |lab| {
            (0..3).all(|i| lab.lacks(i, subnet))
        })
        .unwrap();
        dels.push(t.elapsed());
    }
    let (am, ax) = median_max(adds);
    let (dm, dx) = median_max(dels);
    eprintln!("convergence over 20 changes, 3 nodes: add median {am:?} max {ax:?}; delete median {dm:?} max {dx:?}");

    let leases: Vec<_> = (1000..6000).map(foreign).collect();
    let subnets: Vec<Ipv4Net> = leases.iter().map(|(s, _)| *s).collect();
    let rss_before: Vec<u64> = (0..3).map(|i| lab.agent_rss_kib(i).unwrap()).collect();
    let t = Instant::now();
    store
        .put_many(&leases, Some(Duration::from_secs(600)))
        .unwrap();
    let last = *subnets.last().unwrap();
    let mut took = [Duration::ZERO; 3];
    let mut done = [false; 3];
    while !done.iter().all(|d| *d) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "5,000 leases not programmed in 120 s"
        );
        for i in 0..3 {
            if !done[i]
                && lab.nodes[i].status().is_ok_and(|s| s.remote_leases == 5002)
                && lab.holds(i, last)
            {
                done[i] = true;
                took[i] = t.elapsed();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (m, k) = lab.remote_state(0);
    assert_eq!((m.len(), k.len()), (5002, 5002));
    let (_, k) = lab.remote_state(2);
    assert_eq!(k.len(), 5002);
    let rss: Vec<u64> = (0..3).map(|i| lab.agent_rss_kib(i).unwrap()).collect();
    eprintln!(
        "5,000 leases: eBPF nodes {:?} and {:?}, kernel node {:?}; agent RSS KiB before {rss_before:?} after {rss:?}",
        took[0], took[1], took[2]
    );
    let t = Instant::now();
    store.delete_many(&subnets).unwrap();
    lab.wait_for(Duration::from_secs(120), "5,000 leases removed", |lab| {
        (0..3).all(|i| {
            lab.nodes[i].status().is_ok_and(|s| s.remote_leases == 2) && lab.lacks(i, last)
        })
    })
    .unwrap();
    eprintln!("5,000 leases removed from all 3 nodes in {:?}", t.elapsed());
}

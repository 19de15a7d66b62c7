//! The etcd subnet manager against a real etcd server in the lab: distinct
//! leases, a node joining, a lease deleted, a reservation, a full network,
//! a restart, a 30 s etcd outage, and a stock-Flannel node's lease written
//! the way Flannel writes it. Needs root (namespaces, BPF) and Debian's
//! `etcd-server`.

use std::time::{Duration, Instant};

use flannel_agent::{config::NetConfig, mac::MacAddr, subnet::LeaseAttrs};
use flannel_tests::{
    etcd,
    lab::{LabOptions, LabStore},
    netns::exec,
    Lab, NodeKind, NodeSpec,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const CONF: &str = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.7.0","Backend":{"Type":"vxlan","VNI":1,"Port":4789}}"#;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[test]
fn etcd_store_end_to_end() {
    let mut lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::StockFlannel, 1),
        ],
        LabOptions {
            store: LabStore::Etcd(etcd::endpoint()),
            before_agents: Some(etcd::start),
            net_conf: Some(CONF.into()),
            // Short leases so that renewal is exercised during the test.
            agent_args: vec!["--subnet-lease-ttl-secs".into(), "20".into()],
            ..Default::default()
        },
    )
    .expect("lab");

    // Three agents, three distinct subnets (the ones their subnet.env named).
    let subnets: Vec<Ipv4Net> = lab.nodes.iter().map(|n| n.subnet).collect();
    assert_eq!(
        subnets,
        [
            "10.244.1.0/24",
            "10.244.2.0/24",
            "10.244.3.0/24",
            "10.244.4.0/24"
        ]
        .map(net)
    );
    for n in &lab.nodes[..3] {
        assert_eq!(n.status().unwrap().subnet_manager, "etcd");
    }

    // Mixed: the stock-Flannel node's lease, as Flannel writes it, reaches
    // every agent, and pods talk both ways.
    for i in 0..3 {
        assert!(
            lab.holds(i, net("10.244.4.0/24")),
            "node {i} lacks the stock lease"
        );
        assert!(lab.ping((i, 0), lab.pod((3, 0)).ip, 3, 56).unwrap());
        assert!(lab.ping((3, 0), lab.pod((i, 0)).ip, 3, 56).unwrap());
    }

    // A fourth agent joins: everyone reaches its pod within seconds.
    let joined = Instant::now();
    let n5 = lab
        .join_node_nowait(NodeKind::Ebpf, Some(net("10.244.5.0/24")))
        .unwrap();
    lab.wait_agent(n5, Duration::from_secs(20)).unwrap();
    assert_eq!(lab.nodes[n5].subnet, net("10.244.5.0/24"));
    lab.wait_for(
        Duration::from_secs(10),
        "node 5's lease everywhere",
        |lab| (0..3).all(|i| lab.holds(i, net("10.244.5.0/24"))),
    )
    .unwrap();
    eprintln!(
        "join: node 5's lease programmed on every node {:?} after its agent started",
        joined.elapsed()
    );
    lab.add_pod(n5).unwrap();
    assert!(lab.ping((0, 0), lab.pod((n5, 0)).ip, 3, 56).unwrap());
    assert!(lab.ping((n5, 0), lab.pod((2, 0)).ip, 3, 56).unwrap());

    // A reservation is respected, and a full network says so.
    let (reserved, spare) = (net("10.244.6.0/24"), net("10.244.7.0/24"));
    etcd::with_store(&lab, move |s| async move {
        for (subnet, last) in [(reserved, 0x99), (spare, 0x98)] {
            let ip = std::net::Ipv4Addr::new(172, 30, 0, last);
            let attrs = LeaseAttrs::vxlan(ip, 1, MacAddr([0x0e, 0, 0, 0, 0, last]));
            s.put(subnet, &attrs, None).await?;
        }
        Ok(())
    })
    .unwrap();
    let n6 = lab
        .join_node_nowait(NodeKind::Ebpf, Some(reserved))
        .unwrap();
    lab.wait_for(
        Duration::from_secs(10),
        "node 6 to report out of subnets",
        |lab| lab.agent_log(n6).contains("out of subnets"),
    )
    .unwrap();
    assert!(
        lab.nodes[n6].status().is_err(),
        "node 6 must not be ready without a lease"
    );

    // Node 5 is removed while its agent is down: every other node drops its
    // routes and map entries, and node 6 gets the freed subnet, not the
    // reserved one.
    lab.kill_agent(n5).unwrap();
    let five = net("10.244.5.0/24");
    etcd::with_store(&lab, move |s| async move { Ok(s.delete(five).await?) }).unwrap();
    lab.wait_for(Duration::from_secs(10), "node 5's state removed", |lab| {
        (0..3).all(|i| lab.lacks(i, five))
    })
    .unwrap();
    lab.wait_agent(n6, Duration::from_secs(20)).unwrap();
    assert_eq!(lab.nodes[n6].subnet, five);
    lab.add_pod(n6).unwrap();
    assert!(lab.ping((n6, 0), lab.pod((0, 0)).ip, 3, 56).unwrap());

    // A restarted agent gets its old subnet back.
    lab.kill_agent(1).unwrap();
    lab.start_agent(1).unwrap();
    assert_eq!(lab.nodes[1].subnet, net("10.244.2.0/24"));
    assert!(lab.agent_log(1).contains("lease acquired"));

    // Renewal: the 20 s leases of the first agents are still there after
    // the test has run past their first TTL.
    std::thread::sleep(Duration::from_secs(1));
    let keys = etcd::with_store(&lab, |s| async move {
        Ok(s.list_subnets()
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>())
    })
    .unwrap();
    for want in [
        "10.244.1.0/24",
        "10.244.2.0/24",
        "10.244.3.0/24",
        "10.244.4.0/24",
        "10.244.5.0/24",
        "10.244.6.0/24",
    ] {
        assert!(
            keys.contains(&IpNet::V4(net(want))),
            "{want} missing from etcd: {keys:?}"
        );
    }

    // The operator frees the spare reservation; then etcd is away for
    // 30 s: pod traffic goes on; a node that starts meanwhile is reached
    // once etcd is back.
    etcd::with_store(&lab, move |s| async move { Ok(s.delete(spare).await?) }).unwrap();
    lab.service(etcd::SERVICE).unwrap().stop().unwrap();
    let (from, to) = (lab.pod((0, 0)).ns.clone(), lab.pod((2, 0)).ip);
    let pinger = std::thread::spawn(move || {
        exec(
            &from,
            &[
                "ping",
                "-q",
                "-n",
                "-c",
                "300",
                "-i",
                "0.1",
                "-W",
                "1",
                &to.to_string(),
            ],
        )
        .unwrap()
    });
    let n7 = lab
        .join_node_nowait(NodeKind::Ebpf, Some(net("10.244.7.0/24")))
        .unwrap();
    let out = pinger.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.contains(" 0% packet loss"),
        "{text}"
    );
    assert!(
        lab.agent_log(0).contains("lease store unreachable"),
        "node 1 did not notice the outage"
    );
    lab.service(etcd::SERVICE).unwrap().start().unwrap();
    let back = Instant::now();
    // While the agents are still backing off, a lease changes and etcd
    // compacts its history: their watches cannot resume and must list.
    etcd::wait_up(&mut lab).unwrap();
    let extra = net("10.244.100.0/24");
    etcd::with_store(&lab, move |s| async move {
        let attrs = LeaseAttrs::vxlan(
            std::net::Ipv4Addr::new(172, 30, 0, 97),
            1,
            MacAddr([0x0e, 0, 0, 0, 0, 0x97]),
        );
        s.put(extra, &attrs, Some(Duration::from_secs(600))).await?;
        Ok(s.compact_now().await?)
    })
    .unwrap();
    lab.wait_agent(n7, Duration::from_secs(30)).unwrap();
    lab.wait_for(
        Duration::from_secs(15),
        "node 7's lease everywhere",
        |lab| {
            [0, 1, 2, n6]
                .into_iter()
                .all(|i| lab.holds(i, net("10.244.7.0/24")))
        },
    )
    .unwrap();
    eprintln!(
        "outage: node 7 reached {:?} after etcd returned",
        back.elapsed()
    );
    lab.add_pod(n7).unwrap();
    assert!(lab.ping((0, 0), lab.pod((n7, 0)).ip, 3, 56).unwrap());
    assert!(lab.ping((n7, 0), lab.pod((1, 0)).ip, 3, 56).unwrap());
}

/// Dual-stack leases in etcd as Flannel keeps them: the key names both
/// subnets (`10.244.1.0-24&fd00:10:244:1::-64`), a stock-Flannel node's key
/// reads back with both, renewal keeps the key, and turning IPv6 on moves
/// a node's lease to a key with an IPv6 subnet.
#[test]
fn dual_stack_leases_use_flannels_etcd_keys() {
    const DUAL: &str = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.7.0","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetMin":"fd00:10:244:1::","IPv6SubnetMax":"fd00:10:244:7::","Backend":{"Type":"vxlan","VNI":1,"Port":4789}}"#;
    let lab = Lab::with(
        &[NodeSpec::new(NodeKind::Ebpf, 0)],
        LabOptions {
            store: LabStore::Etcd(etcd::endpoint()),
            before_agents: Some(etcd::start),
            net_conf: Some(CONF.into()),
            ..Default::default()
        },
    )
    .expect("lab");
    etcd::with_store(&lab, |s| async move {
        let dual = NetConfig::parse(DUAL)?;
        let v4 = NetConfig::parse(CONF)?;
        let attrs = |last: u8| {
            LeaseAttrs::vxlan(
                std::net::Ipv4Addr::new(172, 30, 0, last),
                1,
                MacAddr([0x0e, 0, 0, 0, 0, last]),
            )
        };
        // A stock-Flannel dual-stack node's lease, under Flannel's key.
        let (stock, stock6): (Ipv4Net, Ipv6Net) =
            (net("10.244.6.0/24"), "fd00:10:244:6::/64".parse()?);
        s.put_dual(stock, Some(stock6), &attrs(0x60), None).await?;
        let listed = s.list_subnets().await?;
        let l = &listed
            .iter()
            .find(|(n, _)| *n == IpNet::V4(stock))
            .unwrap()
            .1;
        assert_eq!(l.ipv6_subnet, Some(stock6));
        assert_eq!(l.key(), "10.244.6.0-24&fd00:10:244:6::-64");

        // A new node gets both families, neither one the stock node's.
        let prev6: Ipv6Net = "fd00:10:244:3::/64".parse()?;
        let a = s.acquire(&dual, &attrs(0x51), None, Some(prev6)).await?;
        assert_eq!(a.ipv6_subnet, Some(prev6));
        assert_ne!(a.subnet, stock);
        let b = s.acquire(&dual, &attrs(0x52), None, Some(stock6)).await?;
        let b6 = b.ipv6_subnet.expect("an IPv6 subnet");
        assert!(b6 != stock6 && b6 != prev6 && dual.in_range6(b6), "{b6}");
        // Renewal and the node's restart keep the key.
        assert_eq!(s.renew(&a).await?.ipv6_subnet, Some(prev6));
        let again = s.acquire(&dual, &attrs(0x51), None, None).await?;
        assert_eq!((again.subnet, again.ipv6_subnet), (a.subnet, Some(prev6)));

        // A lease taken without IPv6 moves to a key with an IPv6 subnet
        // once the config asks for one; the old key is gone.
        let c = s.acquire(&v4, &attrs(0x53), None, None).await?;
        assert_eq!(c.ipv6_subnet, None);
        let c2 = s.acquire(&dual, &attrs(0x53), Some(c.subnet), None).await?;
        assert_eq!(c2.subnet, c.subnet);
        assert!(c2.ipv6_subnet.is_some());
        let keys: Vec<String> = s
            .list_subnets()
            .await?
            .into_iter()
            .map(|(_, l)| l.key())
            .collect();
        assert!(keys.contains(&c2.key()), "{keys:?}");
        assert!(!keys.contains(&c.key()), "{keys:?}");
        // Two keys naming one IPv4 subnet (two nodes racing with different
        // IPv6 subnets): the older one holds it, the younger one gives way.
        // (Outside SubnetMin..SubnetMax: no node above holds it.)
        let (race, r1, r2): (Ipv4Net, Ipv6Net, Ipv6Net) = (
            net("10.244.90.0/24"),
            "fd00:10:244:70::/64".parse()?,
            "fd00:10:244:71::/64".parse()?,
        );
        s.put_dual(race, Some(r1), &attrs(0x70), None).await?;
        s.put_dual(race, Some(r2), &attrs(0x71), None).await?;
        assert!(s.holds_oldest_key(race, Some(r1)).await?);
        assert!(!s.holds_oldest_key(race, Some(r2)).await?);
        // Deleting by the IPv4 subnet removes the dual key.
        s.delete(stock).await?;
        assert!(!s
            .list_subnets()
            .await?
            .iter()
            .any(|(n, _)| *n == IpNet::V4(stock)));
        Ok(())
    })
    .unwrap();
}

//! The nftables guards as the kernel holds them (root, in a namespace of
//! its own): the agent's netlink messages read back with `nft`, replaced
//! atomically, and removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use flannel_agent::guard;
use flannel_tests::{netns::exec, progtest::Netns};

fn ruleset(ns: &str) -> Result<String> {
    let out = exec(ns, &["nft", "list", "ruleset"])?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn guards_are_written_replaced_and_removed() -> Result<()> {
    let ns = Netns::new()?;
    let name = ns.0.clone();
    let vteps: BTreeSet<Ipv4Addr> = ["172.30.0.2".parse()?, "172.30.0.3".parse()?].into();
    let pods: BTreeMap<String, Ipv4Addr> = [
        ("veth1234".to_string(), "10.244.1.5".parse()?),
        ("veth5678".to_string(), "10.244.1.6".parse()?),
    ]
    .into();
    let pods6: BTreeMap<String, Ipv6Addr> =
        [("veth1234".to_string(), "fd00:10:244:1::5".parse()?)].into();
    let vteps6: BTreeSet<Ipv6Addr> = ["fd00:30::2".parse()?].into();
    let (v, p) = (vteps.clone(), pods.clone());
    flannel_tests::netns::in_netns(&name, move || {
        Ok(guard::ensure(
            Some(4789),
            &v,
            Some(&vteps6),
            Some(&p),
            &pods6,
        )?)
    })?;
    let text = ruleset(&name)?;
    for want in [
        "table ip flannel-guard",
        "elements = { 172.30.0.2, 172.30.0.3 }",
        "type filter hook input priority filter; policy accept;",
        "udp dport 4789 ip saddr != @vteps counter packets 0 bytes 0 drop",
        "table ip6 flannel-guard",
        "type ipv6_addr",
        "elements = { fd00:30::2 }",
        "udp dport 4789 ip6 saddr != @vteps6 counter packets 0 bytes 0 drop",
        "table bridge flannel-guard",
        "type filter hook prerouting priority 0; policy accept;",
        "elements = { \"veth1234\",\n",
        "\"veth1234\" . 10.244.1.5",
        "\"veth5678\" . 10.244.1.6",
        "iifname @ports iifname . ip saddr != @pods counter packets 0 bytes 0 drop",
        "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ip != 0.0.0.0 iifname @ports iifname . arp saddr ip != @pods counter packets 0 bytes 0 drop",
        "\"veth1234\" . fd00:10:244:1::5",
        "@nh,64,16 & 0xffc0 != 0xfe80 ip6 saddr != :: iifname @ports iifname . ip6 saddr != @pods6 counter packets 0 bytes 0 drop",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // A lease gone, the kernel data path off: replaced in one step, the
    // bridge table gone.
    let one: BTreeSet<Ipv4Addr> = ["172.30.0.3".parse()?].into();
    flannel_tests::netns::in_netns(&name, move || {
        Ok(guard::ensure(
            Some(4789),
            &one,
            None,
            None,
            &BTreeMap::new(),
        )?)
    })?;
    let text = ruleset(&name)?;
    assert!(text.contains("elements = { 172.30.0.3 }"), "{text}");
    assert!(
        !text.contains("172.30.0.2") && !text.contains("table bridge") && !text.contains("ip6"),
        "{text}"
    );
    assert_eq!(
        flannel_tests::netns::in_netns(&name, || Ok(guard::present()?))?,
        (true, false, false)
    );
    // No leases at all: the set is empty and every VXLAN packet is dropped.
    flannel_tests::netns::in_netns(&name, || {
        Ok(guard::ensure(
            Some(8472),
            &BTreeSet::new(),
            None,
            None,
            &BTreeMap::new(),
        )?)
    })?;
    assert!(ruleset(&name)?.contains("udp dport 8472 ip saddr != @vteps"));
    // host-gw: no VXLAN port, no VXLAN rule (UDP 8472 is not ours).
    flannel_tests::netns::in_netns(&name, || {
        Ok(guard::ensure(
            None,
            &BTreeSet::new(),
            None,
            None,
            &BTreeMap::new(),
        )?)
    })?;
    let text = ruleset(&name)?;
    assert!(text.contains("table ip flannel-guard"), "{text}");
    assert!(!text.contains("udp dport"), "{text}");
    flannel_tests::netns::in_netns(&name, || Ok(guard::remove()?))?;
    assert!(!ruleset(&name)?.contains("flannel-guard"));
    flannel_tests::netns::in_netns(&name, || Ok(guard::remove()?))?;
    Ok(())
}

/// 5,000 leases and 300 pods: more elements than one netlink attribute
/// holds, so they go in several messages of one transaction. (One message
/// overflowed the attribute's 16-bit length, the kernel refused the batch
/// and every pass retried it.)
#[test]
fn a_large_cluster_fits() -> Result<()> {
    let ns = Netns::new()?;
    let name = ns.0.clone();
    let vteps: BTreeSet<Ipv4Addr> = (0..5000u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 31, 0, 1)) + i))
        .collect();
    let pods: BTreeMap<String, Ipv4Addr> = (0..300u32)
        .map(|i| {
            (
                format!("veth{i:08x}"),
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 2)) + i),
            )
        })
        .collect();
    let started = std::time::Instant::now();
    flannel_tests::netns::in_netns(&name, move || {
        Ok(guard::ensure(
            Some(4789),
            &vteps,
            None,
            Some(&pods),
            &BTreeMap::new(),
        )?)
    })?;
    let took = started.elapsed();
    let text = ruleset(&name)?;
    for want in [
        "172.31.0.1",
        "172.31.19.136",
        "\"veth0000012b\" . 10.244.1.45",
    ] {
        assert!(text.contains(want), "missing {want:?}");
    }
    let count = |family: &str, set: &str| -> Result<usize> {
        let out = exec(
            &name,
            &["nft", "-j", "list", "set", family, "flannel-guard", set],
        )?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["nftables"]
            .as_array()
            .and_then(|a| a.iter().find_map(|o| o["set"]["elem"].as_array()))
            .map_or(0, |e| e.len()))
    };
    assert_eq!(count("ip", "vteps")?, 5000);
    assert_eq!(count("bridge", "pods")?, 300);
    assert_eq!(count("bridge", "ports")?, 300);
    println!("5,000 leases and 300 pods written in {took:?}");
    Ok(())
}

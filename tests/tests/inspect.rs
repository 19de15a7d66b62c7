//! `flannel-agent inspect` on a live lab: every remote and pod in order,
//! then a route deleted and a map entry removed by hand show up as
//! mismatches naming what is wrong, until a pass (SIGHUP) repairs them.
//! The kernel-only node answers too, with what applies there.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use aya::maps::{lpm_trie::Key, LpmTrie, Map, MapData};
use flannel_agent::api::Inspect;
use flannel_common::{maps, RemoteNode};
use flannel_tests::{
    lab::{agent_bin, command_in_netns, LabOptions},
    Lab, NodeKind, NodeSpec,
};

/// `flannel-agent inspect` run as an operator would, inside node `i`.
fn inspect_cli(lab: &Lab, i: usize, json: bool) -> Result<String> {
    let mut cmd = command_in_netns(agent_bin()?, &lab.nodes[i].ns)?;
    cmd.arg("inspect")
        .arg("--socket")
        .arg(lab.nodes[i].socket());
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().context("running flannel-agent inspect")?;
    if !out.status.success() {
        bail!(
            "flannel-agent inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn inspect(lab: &Lab, i: usize) -> Result<Inspect> {
    Ok(serde_json::from_str(&inspect_cli(lab, i, true)?)?)
}

fn in_order(i: &Inspect) -> bool {
    i.pending.is_empty()
        && i.devices.iter().all(|d| d.problems.is_empty())
        && i.remotes.iter().all(|r| r.problems.is_empty())
        && i.pods.iter().all(|p| p.problems.is_empty())
}

#[test]
fn inspect_shows_maps_and_kernel_side_by_side_and_names_mismatches() -> Result<()> {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
        ],
        LabOptions {
            // No timed pass may repair the drift before inspect sees it.
            resync_secs: Some(3600),
            ..Default::default()
        },
    )?;
    assert!(lab.ping((0, 0), lab.pod((1, 0)).ip, 3, 56)?);
    let i = inspect(&lab, 0)?;
    assert!(in_order(&i), "{i:#?}");
    assert_eq!(i.node.datapath, "ebpf");
    assert_eq!(i.remotes.len(), 2);
    for (r, n) in i.remotes.iter().zip([&lab.nodes[1], &lab.nodes[2]]) {
        assert_eq!(r.subnet, n.subnet.to_string());
        assert_eq!(r.public_ip, n.ip.to_string());
        assert_eq!(r.vtep_mac, n.vtep_mac.to_string());
        assert_eq!(r.map, Some(format!("{} {}", n.ip, n.vtep_mac)));
        assert_eq!(r.neighbour, Some(n.vtep_mac.to_string()));
        assert_eq!(r.fdb, Some(n.ip.to_string()));
        assert!(r.route && r.map_vtep == Some(true));
    }
    let pod = &lab.nodes[0].pods[0];
    assert_eq!(i.pods.len(), 1);
    assert_eq!(i.pods[0].ip, pod.ip.to_string());
    assert_eq!(i.pods[0].host_ifname, pod.host_if);
    assert_eq!(i.pods[0].program, "attached");
    assert!(i.counters["pod_encap_redirect"] > 0);
    let table = inspect_cli(&lab, 0, false)?;
    assert!(
        table.contains("in order") && !table.contains("MISMATCH"),
        "{table}"
    );

    // Drift by hand: node 2's route, node 3's map entry.
    let (r1, r2) = (lab.nodes[1].subnet, lab.nodes[2].subnet);
    flannel_tests::netns::ip(&[
        "-n",
        &lab.nodes[0].ns,
        "route",
        "del",
        &r1.to_string(),
        "dev",
        "flannel.1",
    ])?;
    let data = MapData::from_pin(lab.nodes[0].bpf_dir.join("maps").join(maps::REMOTE_SUBNETS))?;
    let mut trie: LpmTrie<_, u32, RemoteNode> = LpmTrie::try_from(Map::LpmTrie(data))?;
    trie.remove(&Key::new(
        u32::from(r2.prefix_len()),
        u32::from_ne_bytes(r2.network().octets()),
    ))?;
    let i = inspect(&lab, 0)?;
    let problems = |i: &Inspect, s: ipnet::Ipv4Net| {
        i.remotes
            .iter()
            .find(|r| r.subnet == s.to_string())
            .map(|r| r.problems.clone())
            .unwrap_or_default()
    };
    assert_eq!(problems(&i, r1), ["kernel: no onlink route"], "{i:#?}");
    assert_eq!(
        problems(&i, r2),
        [format!(
            "map: entry is missing, the lease says {} {}",
            lab.nodes[2].ip, lab.nodes[2].vtep_mac
        )],
        "{i:#?}"
    );
    assert_eq!(
        i.pending,
        [
            format!(
                "program remote {r1} (node {}, VtepMAC {})",
                lab.nodes[1].ip, lab.nodes[1].vtep_mac
            ),
            format!("map remote subnet {r2}"),
        ]
    );
    let table = inspect_cli(&lab, 0, false)?;
    assert!(
        table.contains("MISMATCH: kernel: no onlink route"),
        "{table}"
    );
    // A pass repairs both; inspect says so.
    lab.signal_agent(0, libc::SIGHUP, "SIGHUP")?;
    lab.wait_for(Duration::from_secs(10), "inspect in order", |lab| {
        inspect(lab, 0).is_ok_and(|i| in_order(&i))
    })?;

    // The kernel-only node: the kernel side only.
    let k = inspect(&lab, 2)?;
    assert!(in_order(&k), "{k:#?}");
    assert_eq!(k.node.datapath, "kernel");
    assert!(k.counters.is_empty());
    assert!(k.remotes.iter().all(|r| r.map.is_none() && r.route));
    assert_eq!(k.pods.len(), 1);
    assert_eq!(k.pods[0].program, "-");
    // The monitor says why it has nothing to show there.
    let out = command_in_netns(agent_bin()?, &lab.nodes[2].ns)?
        .arg("monitor")
        .arg("--bpf-dir")
        .arg(&lab.nodes[2].bpf_dir)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("on the kernel data path no program runs"),
        "{err}"
    );
    Ok(())
}

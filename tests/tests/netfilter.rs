//! Netfilter compatibility (root): a node's forward-path firewall rules
//! and `rp_filter` give pod traffic on the eBPF path the verdict they give
//! on the kernel path. With `--netfilter-compat auto` (the default) the
//! agent finds the rules (nftables, iptables-legacy) on a pass, logs why,
//! and from then on lets pod traffic cross the kernel's forward hook:
//! VXLAN that passed the programs' checks is left to `flannel.1`, pods'
//! packets (their source checked) go to the kernel. Without rules the
//! full fast path runs again.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result};
use flannel_tests::{
    lab::{strip_ansi, LabOptions},
    netns::{in_netns, spawn_in_netns},
    Lab, NodeKind, NodeSpec,
};

/// Sends one UDP datagram from pod `from` to `to`:`port` and says whether
/// it arrived.
fn delivered(lab: &Lab, from: (usize, usize), to: (usize, usize), port: u16) -> Result<bool> {
    let (src, dst) = (lab.pod(from).clone(), lab.pod(to).clone());
    let at = SocketAddr::new(dst.ip.into(), port);
    let (tx, rx) = std::sync::mpsc::channel();
    let h = spawn_in_netns(&dst.ns, move || {
        let s = UdpSocket::bind(at)?;
        s.set_read_timeout(Some(Duration::from_millis(700)))?;
        tx.send(()).ok();
        let mut buf = [0u8; 64];
        Ok(s.recv_from(&mut buf).is_ok())
    })?;
    rx.recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")?;
    in_netns(&src.ns, move || {
        let s = UdpSocket::bind(SocketAddr::new(src.ip.into(), 0))?;
        s.send_to(b"through the firewall?", at)?;
        Ok(())
    })?;
    h.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?
}

fn sh(ns: &str, cmd: &[&str]) -> Result<()> {
    let out = flannel_tests::netns::exec(ns, cmd)?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The forward rule of the finding: UDP 9999 to the pod network dropped.
fn add_forward_drop(ns: &str) -> Result<()> {
    let nft = |words: &str| {
        let mut args = vec!["nft"];
        args.extend(words.split('|'));
        sh(ns, &args)
    };
    nft("add|table|inet|fw")?;
    nft("add|chain|inet|fw|podfw|{ type filter hook forward priority 0 ; }")?;
    nft("add|rule|inet|fw|podfw|ip|daddr|10.244.0.0/16|udp|dport|9999|counter|drop")?;
    // Beside it, rules on another hook, which concern no forwarded packet
    // and are not counted as the forward chain's.
    nft("add|chain|inet|fw|hostin|{ type filter hook input priority 0 ; }")?;
    nft("add|rule|inet|fw|hostin|tcp|dport|22|counter|accept")?;
    nft("add|rule|inet|fw|hostin|tcp|dport|23|counter|drop")
}

fn moved(lab: &Lab, i: usize, f: impl Fn() -> Result<()>, name: &str) -> Result<u64> {
    let before = lab.nodes[i].counters()?[name];
    f()?;
    Ok(lab.nodes[i].counters()?[name] - before)
}

/// UDP 9999 from node 1's pod reaches node 0's, decapsulated straight
/// into it (the fast path).
fn fast_path_delivers(lab: &Lab) -> Result<()> {
    let d = moved(
        lab,
        0,
        || {
            anyhow::ensure!(delivered(lab, (1, 0), (0, 0), 9999)?);
            Ok(())
        },
        "uplink_decap",
    )?;
    anyhow::ensure!(d == 1, "uplink_decap moved by {d}");
    Ok(())
}

fn log_says(lab: &Lab, i: usize, what: &str) -> bool {
    strip_ansi(&lab.agent_log(i)).contains(what)
}

#[test]
fn forward_rules_and_rp_filter_hold_on_the_ebpf_path() -> Result<()> {
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 1),
        NodeSpec::new(NodeKind::Ebpf, 1),
        NodeSpec::new(NodeKind::Kernel, 1),
    ])?;
    lab.strict_rp_filter()?;
    assert!(log_says(&lab, 0, "netfilter compatibility off"));

    // No rules: the fast path (decapsulated straight into the pod).
    fast_path_delivers(&lab)?;

    // The rule on node 0 and on the kernel-path node 2.
    add_forward_drop(&lab.nodes[0].ns)?;
    add_forward_drop(&lab.nodes[2].ns)?;
    // Until a pass sees it, the fast path skips it: what auto mode is for.
    assert!(delivered(&lab, (1, 0), (0, 0), 9999)?);
    lab.signal_agent(0, libc::SIGHUP, "SIGHUP")?;
    lab.wait_for(Duration::from_secs(10), "compat on", |lab| {
        log_says(lab, 0, "netfilter compatibility on")
    })?;
    let log = strip_ansi(&lab.agent_log(0));
    assert!(
        log.contains("nftables inet table fw chain podfw (1 rules)"),
        "{log}"
    );

    // Into the pod: the kernel's verdict on both nodes.
    for to in [(0, 0), (2, 0)] {
        assert!(
            !delivered(&lab, (1, 0), to, 9999)?,
            "{to:?}: 9999 got through"
        );
        assert!(delivered(&lab, (1, 0), to, 9998)?, "{to:?}: 9998 dropped");
    }
    // It was node 0's programs that decapsulated, and the kernel that
    // routed (rp_filter sees the packet arrive on flannel.1, as it does
    // on the kernel path).
    let n = moved(
        &lab,
        0,
        || {
            anyhow::ensure!(!delivered(&lab, (1, 0), (0, 0), 9999)?);
            anyhow::ensure!(delivered(&lab, (1, 0), (0, 0), 9998)?);
            Ok(())
        },
        "uplink_pass_netfilter",
    )?;
    assert_eq!(n, 2);
    // Out of the pod: the forward hook of the sending node.
    let n = moved(
        &lab,
        0,
        || {
            anyhow::ensure!(!delivered(&lab, (0, 0), (1, 0), 9999)?);
            anyhow::ensure!(delivered(&lab, (0, 0), (1, 0), 9998)?);
            Ok(())
        },
        "pod_pass_netfilter",
    )?;
    assert!(n >= 2, "{n}");
    assert!(!delivered(&lab, (2, 0), (1, 0), 9999)?);
    assert!(lab.ping((0, 0), lab.pod((1, 0)).ip, 3, 56)?);
    assert!(lab.ping((1, 0), lab.pod((0, 0)).ip, 3, 56)?);

    // The rule goes: the fast path comes back at the next pass.
    sh(&lab.nodes[0].ns, &["nft", "delete", "table", "inet", "fw"])?;
    lab.signal_agent(0, libc::SIGHUP, "SIGHUP")?;
    lab.wait_for(Duration::from_secs(10), "compat off again", |lab| {
        strip_ansi(&lab.agent_log(0))
            .rsplit("netfilter compatibility")
            .next()
            .is_some_and(|tail| tail.starts_with(" off"))
    })?;
    fast_path_delivers(&lab)?;

    // Legacy iptables counts as much as nftables.
    sh(
        &lab.nodes[0].ns,
        &[
            "iptables-legacy",
            "-A",
            "FORWARD",
            "-d",
            "10.244.0.0/16",
            "-p",
            "udp",
            "--dport",
            "9999",
            "-j",
            "DROP",
        ],
    )?;
    lab.signal_agent(0, libc::SIGHUP, "SIGHUP")?;
    lab.wait_for(Duration::from_secs(10), "compat on for iptables", |lab| {
        log_says(
            lab,
            0,
            "iptables-legacy table filter chain FORWARD (1 rules)",
        )
    })?;
    assert!(!delivered(&lab, (1, 0), (0, 0), 9999)?);
    assert!(delivered(&lab, (1, 0), (0, 0), 9998)?);
    Ok(())
}

#[test]
fn compat_on_and_off_are_obeyed_in_xdp_and_tc() -> Result<()> {
    for (xdp, compat) in [("generic", "on"), ("off", "on"), ("off", "off")] {
        let lab = Lab::with(
            &[
                NodeSpec::new(NodeKind::Ebpf, 1),
                NodeSpec::new(NodeKind::Ebpf, 1),
            ],
            LabOptions {
                agent_args: vec![
                    "--xdp-mode".into(),
                    xdp.into(),
                    "--netfilter-compat".into(),
                    compat.into(),
                ],
                ..Default::default()
            },
        )?;
        let what = format!("xdp {xdp}, compat {compat}");
        assert!(
            log_says(&lab, 0, &format!("reason=--netfilter-compat {compat}")),
            "{what}"
        );
        if compat == "off" {
            // Rules present, and skipped: the documented price of `off`.
            add_forward_drop(&lab.nodes[0].ns)?;
            lab.signal_agent(0, libc::SIGHUP, "SIGHUP")?;
        }
        let before = lab.nodes[0].counters()?;
        // Delivered either way: no rule with `on`, a rule skipped with
        // `off`.
        assert!(delivered(&lab, (1, 0), (0, 0), 9999)?, "{what}");
        assert!(delivered(&lab, (0, 0), (1, 0), 9998)?, "{what}");
        assert!(lab.ping((1, 0), lab.pod((0, 0)).ip, 3, 56)?, "{what}");
        let after = lab.nodes[0].counters()?;
        let m = |n: &str| after[n] - before[n];
        if compat == "on" {
            // No rule here: 9999 is dropped by nobody; it arrived. The
            // programs judged the VXLAN and left it to flannel.1.
            let judged = if xdp == "generic" {
                "xdp_pass_netfilter"
            } else {
                "uplink_pass_netfilter"
            };
            assert!(m(judged) >= 4, "{what}: {judged} {}", m(judged));
            assert!(m("pod_pass_netfilter") >= 1, "{what}");
            assert_eq!(
                m("uplink_decap") + m("uplink_redirect") + m("xdp_decap"),
                0,
                "{what}"
            );
        } else {
            assert_eq!(
                m("uplink_pass_netfilter") + m("xdp_pass_netfilter") + m("pod_pass_netfilter"),
                0,
                "{what}"
            );
            assert!(m("uplink_decap") >= 4, "{what}");
        }
    }
    Ok(())
}

//! The data path survives the agent: SIGKILL during traffic loses nothing,
//! and the restarted agent adopts the pinned maps and links (root).

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use flannel_tests::{
    lab::{LabOptions, NodeKind, NodeSpec},
    traffic::tcp_exchange,
    Lab,
};

#[test]
fn sigkill_loses_no_ping_and_restart_adopts_pinned_state() -> Result<()> {
    // XDP decap (generic on the lab's veths), so that the restarted agent
    // has an XDP link to adopt as well as its TC links.
    let mut lab = Lab::with(
        &[NodeSpec::new(NodeKind::Ebpf, 1); 2],
        LabOptions {
            agent_args: vec!["--xdp-mode".into(), "generic".into()],
            ..Default::default()
        },
    )?;
    let (a, b) = ((0, 0), (1, 0));
    let dst = lab.pod(b).ip.to_string();
    // 100 pings, 50 ms apart: the agents are killed and restarted meanwhile.
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.pod(a).ns,
            "ping",
            "-n",
            "-q",
            "-c",
            "100",
            "-i",
            "0.05",
            "-W",
            "2",
            &dst,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    lab.kill_agent(0)?;
    lab.kill_agent(1)?;
    let links_before = std::fs::read_dir(lab.nodes[0].bpf_dir.join("links"))?.count();
    let decap_while_down = lab.nodes[1].counters()?["xdp_decap"];
    std::thread::sleep(Duration::from_secs(2));
    // Still forwarding with no agent at all.
    assert!(
        lab.nodes[1].counters()?["xdp_decap"] > decap_while_down,
        "decap stopped with the agent"
    );
    lab.start_agent(0)?;
    lab.start_agent(1)?;
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed: {text}");
    let loss = text
        .lines()
        .find(|l| l.contains("packet loss"))
        .context("no ping summary")?;
    assert!(loss.contains(" 0% packet loss"), "{loss}");

    // Adopted, not rebuilt: the same pins, counters kept counting from where
    // they were, and the pod is still registered and reachable.
    let links_after = std::fs::read_dir(lab.nodes[0].bpf_dir.join("links"))?.count();
    assert_eq!(links_before, links_after);
    assert!(lab.nodes[1].counters()?["xdp_decap"] >= 100);
    let log = lab.agent_log(0);
    assert!(log.matches("data path selected").count() == 2, "{log}");
    assert!(
        log.contains("adopted"),
        "restart must adopt the pinned XDP link: {log}"
    );
    let (pa, pb) = (lab.pod(a), lab.pod(b));
    tcp_exchange(&pa.ns, &pb.ns, pb.ip, 23000)?;
    Ok(())
}

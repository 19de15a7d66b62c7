//! `flannel-agent monitor` on a live lab (XDP decapsulation, so that the
//! uplink's verdicts are the specific ones): a VXLAN packet from a host
//! that holds no lease (dropped) and a truncated VXLAN packet from a node
//! (passed) each give exactly the event expected, a flood is held to the rate limit in the
//! kernel, and the monitor turns events off when it stops.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use flannel_agent::datapath::monitor;
use flannel_common::{MONITOR_DROP, MONITOR_PASS};
use flannel_tests::{
    lab::{agent_bin, command_in_netns, LabOptions, FABRIC_IP},
    netns::in_netns,
    progtest::vxlan_payload,
    Lab, NodeKind, NodeSpec,
};
use serde_json::{json, Value};

const PORT: u16 = 4789;

/// `flannel-agent monitor --type all -o json` in node `i`, once its
/// events are on.
fn start_monitor(lab: &Lab, i: usize, extra: &[&str]) -> Result<Child> {
    let mut cmd = command_in_netns(agent_bin()?, &lab.nodes[i].ns)?;
    cmd.arg("monitor")
        .arg("--bpf-dir")
        .arg(&lab.nodes[i].bpf_dir)
        .args(["--type", "all", "-o", "json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("starting flannel-agent monitor")?;
    lab.wait_for(Duration::from_secs(10), "events on", |lab| {
        monitor::config(&lab.nodes[i].bpf_dir).is_ok_and(|c| c.mask == MONITOR_PASS | MONITOR_DROP)
    })?;
    Ok(child)
}

/// Stops the monitor as Ctrl-C would and returns the events it printed.
fn stop_monitor(lab: &Lab, i: usize, mut child: Child) -> Result<Vec<Value>> {
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait()?;
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out)?;
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err)?;
    assert!(status.success(), "monitor failed: {err}");
    // Events are off again.
    assert_eq!(monitor::config(&lab.nodes[i].bpf_dir)?.mask, 0);
    out.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("event line {l:?}")))
        .collect()
}

/// Sends `payloads` over UDP from namespace `ns` to `to`; returns the
/// source port used.
fn send_from(ns: &str, to: SocketAddr, payloads: Vec<Vec<u8>>) -> Result<u16> {
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for p in &payloads {
            s.send_to(p, to)?;
        }
        Ok(s.local_addr()?.port())
    })
}

fn with_verdict<'a>(events: &'a [Value], verdict: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["verdict"] == verdict).collect()
}

/// The single event of `verdict`, without its time, and with an interface
/// index that names a real interface.
fn the_one(events: &[Value], verdict: &str) -> Value {
    let hits = with_verdict(events, verdict);
    assert_eq!(hits.len(), 1, "{events:#?}");
    let mut e = hits[0].clone();
    let o = e.as_object_mut().unwrap();
    o.remove("time_ns");
    let ifindex = o.remove("ifindex").and_then(|v| v.as_u64());
    assert!(ifindex.is_some_and(|i| i > 0), "{events:#?}");
    e
}

#[test]
fn monitor_reports_each_drop_and_pass_with_its_reason_and_holds_the_rate() -> Result<()> {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
        ],
        LabOptions {
            agent_args: vec!["--xdp-mode".into(), "generic".into()],
            ..Default::default()
        },
    )?;
    let node0 = lab.nodes[0].ip;
    let pod = lab.pod((0, 0)).ip;
    let to = SocketAddr::new(node0.into(), PORT);

    // From the fabric's own address: a host on the node network that holds
    // no lease.
    let mon = start_monitor(&lab, 0, &[])?;
    let inner_src: Ipv4Addr = "10.244.9.9".parse()?;
    let payload = vxlan_payload(
        [0x0e, 0, 0, 0, 0, 1],
        (inner_src, 1234),
        (pod, 80),
        b"probe",
    );
    let sent_len = 14 + 20 + 8 + payload.len();
    let sport = send_from(&lab.fabric, to, vec![payload])?;
    // From node 2, a VXLAN header and six bytes: too short for a frame.
    let mut short = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    short.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 1]);
    let node1_ns = lab.nodes[1].ns.clone();
    let short_sport = send_from(&node1_ns, to, vec![short])?;
    let events = stop_monitor(&lab, 0, mon)?;

    assert_eq!(
        the_one(&events, "xdp_drop_unknown_vtep"),
        json!({
            "type": "drop", "verdict": "xdp_drop_unknown_vtep", "program": "xdp_uplink",
            "ifname": "eth0", "len": sent_len, "eth_type": "0x0800",
            "src": FABRIC_IP.to_string(), "dst": node0.to_string(), "proto": "udp",
            "sport": sport, "dport": PORT, "vni": 1,
            "inner": {"src": inner_src.to_string(), "dst": pod.to_string(), "proto": "udp",
                      "sport": 1234, "dport": 80},
        })
    );
    assert_eq!(
        the_one(&events, "xdp_drop_bad_length"),
        json!({
            "type": "drop", "verdict": "xdp_drop_bad_length", "program": "xdp_uplink",
            "ifname": "eth0", "len": 14 + 20 + 8 + 14,
            "eth_type": "0x0800", "src": lab.nodes[1].ip.to_string(),
            "dst": node0.to_string(), "proto": "udp", "sport": short_sport, "dport": PORT,
            "vni": 1, "inner": null,
        })
    );
    // Nothing is reported for packets the data path handles: pod traffic
    // across nodes gives no event on the receiving node.
    let mon = start_monitor(&lab, 0, &[])?;
    assert!(lab.ping((1, 0), pod, 20, 56)?);
    let events = stop_monitor(&lab, 0, mon)?;
    assert!(with_verdict(&events, "xdp_decap").is_empty(), "{events:#?}");

    // A flood of 300 truncated packets against 10 events a second per
    // CPU, in bursts of 5: the kernel holds the rest back and counts them.
    let (_, suppressed0, _) = monitor::totals(&lab.nodes[0].bpf_dir)?;
    let mon = start_monitor(&lab, 0, &["--rate", "10", "--burst", "5"])?;
    let started = Instant::now();
    let mut short = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    short.extend_from_slice(&[0; 6]);
    send_from(&node1_ns, to, vec![short; 300])?;
    let events = stop_monitor(&lab, 0, mon)?;
    let secs = started.elapsed().as_secs_f64();
    let reported = with_verdict(&events, "xdp_drop_bad_length").len() as f64;
    let cpus = std::thread::available_parallelism()?.get() as f64;
    let bound = cpus * (5.0 + 10.0 * secs + 1.0);
    assert!(
        reported >= 1.0 && reported <= bound,
        "{reported} events, bound {bound}"
    );
    let (_, suppressed1, _) = monitor::totals(&lab.nodes[0].bpf_dir)?;
    assert!(
        (suppressed1 - suppressed0) as f64 >= 300.0 - bound,
        "suppressed {} of 300",
        suppressed1 - suppressed0
    );
    Ok(())
}

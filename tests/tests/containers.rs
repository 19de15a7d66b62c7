//! The agent as the DaemonSet runs it: every node's agent is the pod
//! template of `deploy/kube-flannel-ebpf.yml`, run from the image
//! `cargo xtask image` builds, under podman in the node's namespace, with
//! the template's capabilities, read-only root, mounts, args, env and
//! init containers (see `flannel_tests::kubelet`), against the fake API
//! server over HTTPS with a service account token. Root, podman, and the
//! image archives under target/image (`cargo xtask test` builds them).

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, Result};
use flannel_agent::caps;
use flannel_tests::{
    fakekube,
    lab::{ContainerOptions, LabOptions, LabStore},
    manifest,
    netns::http_get,
    traffic::{tcp_exchange, udp_exchange, LongStream, Pinger},
    Lab, NodeKind, NodeSpec,
};

const HEALTHZ: &str = "127.0.0.1:9876";

fn lab(nodes: usize, pods: usize, containers: ContainerOptions) -> Result<Lab> {
    Lab::with(
        &vec![NodeSpec::new(NodeKind::Ebpf, pods); nodes],
        LabOptions {
            store: LabStore::Kube(fakekube::url()),
            before_agents: Some(fakekube::start_for_lab),
            containers: Some(containers),
            ..Default::default()
        },
    )
}

fn snapshot(lab: &Lab) -> Result<Vec<HashMap<&'static str, u64>>> {
    lab.nodes.iter().map(|n| n.counters()).collect()
}

fn readyz(lab: &Lab, i: usize) -> String {
    http_get(&lab.nodes[i].ns, HEALTHZ.parse().unwrap(), "/readyz").unwrap_or_default()
}

/// The agent process's capability set and no-new-privileges flag, from
/// the kernel's view of the container's pid 1.
fn process_caps(lab: &Lab, i: usize) -> Result<(u64, bool)> {
    let pod = lab.nodes[i].agent_pod.as_ref().context("no pod")?;
    let pid = pod
        .podman
        .run(&["inspect", "--format", "{{.State.Pid}}", &pod.container])?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(String::from)
            .with_context(|| format!("no {name}"))
    };
    Ok((
        u64::from_str_radix(&field("CapEff:")?, 16)?,
        field("NoNewPrivs:")? == "1",
    ))
}

#[test]
fn daemonset_pods_carry_every_pod_pair_over_the_ebpf_path() -> Result<()> {
    let lab = lab(3, 2, ContainerOptions::default())?;
    let m = manifest::load()?;

    for (i, node) in lab.nodes.iter().enumerate() {
        // The kube store through in-cluster config: the podCIDR decides.
        let st = node.status()?;
        assert_eq!(
            (st.datapath.as_str(), st.subnet_manager.as_str()),
            ("ebpf", "kube")
        );
        assert_eq!(node.subnet.to_string(), format!("10.244.{}.0/24", 11 + i));
        assert!(
            readyz(&lab, i).starts_with("HTTP/1.1 200"),
            "{}",
            readyz(&lab, i)
        );
        // Exactly the manifest's capabilities, no privilege escalation,
        // a read-only root.
        let (eff, nnp) = process_caps(&lab, i)?;
        let want = caps::DAEMONSET.iter().fold(0u64, |m, c| m | 1 << c.bit);
        assert_eq!(eff, want, "CapEff {eff:x}, want {want:x}");
        assert!(nnp, "no_new_privs not set");
        let pod = node.agent_pod.as_ref().unwrap();
        let ro = pod.podman.run(&[
            "inspect",
            "--format",
            "{{.HostConfig.ReadonlyRootfs}}",
            &pod.container,
        ])?;
        assert_eq!(ro, "true");
        // The init containers installed the image's plugin and the
        // ConfigMap's conflist, under Flannel's file names.
        let conflist = std::fs::read_to_string(node.cni_conf_dir().join("10-flannel.conflist"))?;
        assert_eq!(conflist, m.config_file("cni-conf.json")?);
        let plugin = std::fs::read(node.cni_bin_dir().join("flannel"))?;
        let built = std::fs::read(
            manifest::deploy_dir().join("../target/x86_64-unknown-linux-musl/release/flannel"),
        )?;
        assert!(plugin == built, "the installed plugin is not the image's");
        // The agent wrote Flannel's annotations with the mounted token.
        let n = fakekube::of(&lab)
            .node(&flannel_tests::lab::node_name(i))
            .unwrap();
        assert_eq!(
            n["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-type"],
            "vxlan"
        );
    }

    lab.every_pair_over_ebpf(24000)?;
    Ok(())
}

#[test]
fn a_killed_container_restarts_without_losing_a_ping() -> Result<()> {
    let mut lab = lab(2, 1, ContainerOptions::default())?;
    let (a, b) = ((0, 0), (1, 0));
    let ping = Pinger::start(&lab.pod(a).ns, lab.pod(b).ip, Duration::from_millis(100))?;
    std::thread::sleep(Duration::from_secs(1));
    let decap_before = lab.nodes[1].counters()?["uplink_decap"];
    lab.kill_agent(0)?;
    lab.kill_agent(1)?;
    let state = lab.agent_pod_state(0);
    assert!(
        matches!(state.as_deref(), Some("exited" | "stopped")),
        "{state:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    // No agent anywhere, and the pinned data path still forwards.
    assert!(lab.nodes[1].counters()?["uplink_decap"] > decap_before);
    lab.restart_agent_container(0)?;
    lab.restart_agent_container(1)?;
    std::thread::sleep(Duration::from_secs(1));
    let (sent, received) = ping.stop()?;
    assert!(sent >= 30, "only {sent} pings sent");
    assert_eq!(received, sent, "lost {} of {sent} pings", sent - received);
    // The restarted container adopted what was pinned, and serves again.
    let log = lab.agent_log(0);
    assert_eq!(log.matches("data path selected").count(), 2, "{log}");
    assert!(readyz(&lab, 0).starts_with("HTTP/1.1 200"));
    let (pa, pb) = (lab.pod(a), lab.pod(b));
    tcp_exchange(&pa.ns, &pb.ns, pb.ip, 24500)?;
    Ok(())
}

#[test]
fn a_rolling_upgrade_keeps_streams_and_pings() -> Result<()> {
    let mut lab = lab(
        3,
        1,
        ContainerOptions {
            tag: "a".into(),
            ..Default::default()
        },
    )?;
    let image = |lab: &Lab, i: usize| {
        let pod = lab.nodes[i].agent_pod.as_ref().unwrap();
        pod.podman
            .run(&[
                "inspect",
                "--format",
                "{{.ImageName}} {{.Image}}",
                &pod.container,
            ])
            .unwrap()
    };
    let old: Vec<String> = (0..3).map(|i| image(&lab, i)).collect();
    assert!(
        old.iter()
            .all(|i| i.starts_with("localhost/flannel-ebpf:a ")),
        "{old:?}"
    );

    let (p1, p2, p3) = ((0, 0), (1, 0), (2, 0));
    let stream = LongStream::start(&lab.pod(p1).ns, &lab.pod(p2).ns, lab.pod(p2).ip, 24600)?;
    let ping = Pinger::start(&lab.pod(p3).ns, lab.pod(p1).ip, Duration::from_millis(100))?;
    std::thread::sleep(Duration::from_secs(1));
    // As the DaemonSet controller does with maxUnavailable 1: one node's
    // pod replaced, its successor ready, then the next.
    for i in 0..3 {
        lab.start_agent_pod(
            i,
            &ContainerOptions {
                tag: "b".into(),
                ..Default::default()
            },
        )?;
        lab.wait_agent(i, Duration::from_secs(30))?;
        lab.wait_for(Duration::from_secs(30), "the new pod to be ready", |lab| {
            readyz(lab, i).starts_with("HTTP/1.1 200")
        })?;
        assert!(
            !stream.failed(),
            "the stream broke while node {} rolled",
            i + 1
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let (sent, received) = ping.stop()?;
    let echoed = stream
        .stop()
        .context("the TCP stream did not survive the upgrade")?;
    assert!(echoed >= 50, "only {echoed} messages echoed");
    assert!(sent >= 30, "only {sent} pings sent");
    assert_eq!(received, sent, "lost {} of {sent} pings", sent - received);

    for (i, before) in old.iter().enumerate() {
        let now = image(&lab, i);
        assert!(now.starts_with("localhost/flannel-ebpf:b "), "{now}");
        // Another build, not the same image under a second name.
        let id = |s: &str| s.split_whitespace().nth(1).unwrap_or("").to_string();
        assert_ne!(id(&now), id(before));
        assert!(lab.nodes[i].status()?.datapath == "ebpf");
    }
    lab.wait_converged(Duration::from_secs(20))?;
    let (pa, pb) = (lab.pod(p2), lab.pod(p3));
    udp_exchange(&pa.ns, &pb.ns, pb.ip, 24601)?;
    Ok(())
}

#[test]
fn a_missing_capability_is_named_at_start() {
    for cap in caps::DAEMONSET {
        let err = match lab(
            1,
            0,
            ContainerOptions {
                without_caps: vec![cap.name.to_string()],
                ..Default::default()
            },
        ) {
            Ok(_) => panic!("the agent started without CAP_{}", cap.name),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&format!("missing capability: CAP_{}", cap.name)),
            "CAP_{} removed: {err}",
            cap.name
        );
        // The container ended (podman says exited, or stopped once its
        // clean-up ran).
        assert!(
            err.contains("is exited") || err.contains("is stopped"),
            "{err}"
        );
    }
}

#[test]
fn a_flannel_node_moves_to_the_daemonset_in_place_and_back() -> Result<()> {
    // Node 2 is as a stock Flannel pod leaves a node: cni0, flannel.1 with
    // its neighbours, FDB entries and routes, a pod wired by the bridge
    // plugin, Flannel's annotations on its Node. Node 1 already runs the
    // DaemonSet's pod.
    let mut lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::StockFlannel, 1),
        ],
        LabOptions {
            store: LabStore::Kube(fakekube::url()),
            before_agents: Some(fakekube::start_for_lab),
            containers: Some(ContainerOptions::default()),
            ..Default::default()
        },
    )?;
    let (a, old) = ((0, 0), (1, 0));
    let subnet = lab.nodes[1].subnet;
    let vtep = lab.nodes[1].vtep_mac;
    assert!(lab.ping(a, lab.pod(old).ip, 3, 56)?);
    let ping = Pinger::start(&lab.pod(a).ns, lab.pod(old).ip, Duration::from_millis(100))?;
    std::thread::sleep(Duration::from_millis(500));

    // The DaemonSet's pod lands on the Flannel node (kubectl apply -l
    // flannel-ebpf/part=agent): it takes over Flannel's devices, lease
    // and VtepMAC, so its peers' entries stay right.
    lab.start_agent_pod(1, &ContainerOptions::default())?;
    lab.wait_agent(1, Duration::from_secs(30))?;
    let st = lab.nodes[1].status()?;
    assert_eq!(st.datapath, "ebpf");
    assert_eq!(lab.nodes[1].subnet, subnet, "the lease moved");
    let n2 = fakekube::of(&lab).node("node2").unwrap();
    let data = n2["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(data.contains(&vtep.to_string()), "VtepMAC changed: {data}");
    // A new pod on it is wired by the installed plugin and rides eBPF.
    let new = (1, lab.add_pod(1)?);
    let before = snapshot(&lab)?;
    assert!(lab.ping(new, lab.pod(a).ip, 5, 56)?);
    let after = snapshot(&lab)?;
    let d = |node: usize, name: &str| after[node][name] - before[node][name];
    assert!(d(1, "pod_encap_redirect") + d(1, "pod_encap_neigh") >= 5);
    assert!(d(0, "uplink_decap") >= 5);

    // And back, as the README says: --datapath=kernel rolled out takes
    // every program and pin away and leaves Flannel's own wiring, which
    // stock Flannel then adopts.
    for i in 0..2 {
        lab.start_agent_pod(
            i,
            &ContainerOptions {
                extra_args: vec!["--datapath=kernel".into()],
                ..Default::default()
            },
        )?;
        lab.wait_agent(i, Duration::from_secs(30))?;
        assert_eq!(lab.nodes[i].status()?.datapath, "kernel");
        assert!(
            !lab.nodes[i].bpf_dir.exists(),
            "pins left under {}",
            lab.nodes[i].bpf_dir.display()
        );
    }
    let vtep_before = flannel_tests::netns::link_packets(&lab.nodes[1].ns, "flannel.1")?;
    assert!(lab.ping(new, lab.pod(a).ip, 5, 56)?);
    let vtep_after = flannel_tests::netns::link_packets(&lab.nodes[1].ns, "flannel.1")?;
    assert!(
        vtep_after.0 >= vtep_before.0 + 5 && vtep_after.1 >= vtep_before.1 + 5,
        "flannel.1 did not carry the traffic: {vtep_before:?} -> {vtep_after:?}"
    );
    let (sent, received) = ping.stop()?;
    assert!(sent >= 20, "only {sent} pings sent");
    assert_eq!(received, sent, "lost {} of {sent} pings", sent - received);
    Ok(())
}

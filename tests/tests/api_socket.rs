//! The agent's API socket against hostile callers: it is root's alone
//! whatever the umask, a caller that is not root is refused by its peer
//! credentials (and logged), and garbage, a line too long, a half-written
//! request and 1,000 connections at once leave the agent answering others
//! and forwarding.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    time::Duration,
};

use anyhow::Result;
use flannel_tests::{lab::agent_bin, Lab, NodeKind, NodeSpec};

fn answer(s: &mut UnixStream) -> Result<serde_json::Value> {
    let mut line = String::new();
    BufReader::new(s.try_clone()?).read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
}

#[test]
fn the_api_socket_refuses_strangers_and_survives_abuse() -> Result<()> {
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 1),
        NodeSpec::new(NodeKind::Ebpf, 1),
    ])?;
    let sock = lab.nodes[0].socket();
    let meta = std::fs::metadata(&sock)?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);

    // A user that is not root: the mode keeps it out; opened up by hand,
    // its peer credentials still do, and the agent logs who it was.
    let as_nobody = || {
        std::process::Command::new(agent_bin().unwrap())
            .arg("status")
            .arg("--socket")
            .arg(&sock)
            .uid(65534)
            .gid(65534)
            .output()
    };
    let out = as_nobody()?;
    assert!(!out.status.success());
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))?;
    let out = as_nobody()?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("permission denied"),
        "{err}"
    );
    let log = flannel_tests::lab::strip_ansi(&lab.agent_log(0));
    assert!(
        log.contains("refused an API caller") && log.contains("uid=65534"),
        "{log}"
    );

    // Garbage is answered, and the connection goes on.
    let mut s = UnixStream::connect(&sock)?;
    s.write_all(b"\x00\xffnot json\n")?;
    let a = answer(&mut s)?;
    assert_eq!(a["ok"], false);
    assert!(
        a["error"].as_str().unwrap().contains("malformed request"),
        "{a}"
    );
    s.write_all(b"{\"op\":\"status\"}\n")?;
    assert_eq!(answer(&mut s)?["ok"], true);

    // A line over 64 KiB: refused and closed.
    let mut s = UnixStream::connect(&sock)?;
    s.write_all(&vec![b'a'; 100 * 1024])?;
    let a = answer(&mut s)?;
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("longer than 65536 bytes"),
        "{a}"
    );
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest)?, 0, "closed after the refusal");

    // Half a request, held open, and 1,000 idle connections: the agent
    // answers others and forwards meanwhile.
    let mut half = UnixStream::connect(&sock)?;
    half.write_all(b"{\"op\":\"sta")?;
    flannel_tests::netns::raise_open_files(4096)?;
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&sock))
        .collect::<std::io::Result<_>>()?;
    let st = lab.nodes[0].status()?;
    assert_eq!(st.endpoints, 1);
    assert!(lab.ping((0, 0), lab.pod((1, 0)).ip, 5, 56)?);
    // The half-written request is given up on after the read timeout.
    half.set_read_timeout(Some(Duration::from_secs(20)))?;
    let a = answer(&mut half)?;
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("no whole request within"),
        "{a}"
    );
    drop(idle);
    assert!(lab.nodes[0].status().is_ok());
    Ok(())
}

/// One request on a new connection; the answer.
fn call(sock: &std::path::Path, req: serde_json::Value) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    answer(&mut s)
}

fn add(ip: impl ToString, mac: &str, host_ifname: &str) -> serde_json::Value {
    serde_json::json!({
        "op": "add",
        "ip": ip.to_string(),
        "mac": mac,
        "host_ifname": host_ifname,
    })
}

fn nth(net: ipnet::Ipv4Net, n: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(net.network()) + n)
}

#[test]
fn add_takes_only_a_pods_veth_on_the_bridge_and_an_address_nobody_holds() -> Result<()> {
    use flannel_tests::netns::ip;
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 2),
        NodeSpec::new(NodeKind::Ebpf, 1),
    ])?;
    let node = &lab.nodes[0];
    let (ns, sock, subnet) = (node.ns.as_str(), node.socket(), node.subnet);
    let (p0, p1) = (lab.pod((0, 0)), lab.pod((0, 1)));
    let mac = "0e:42:00:00:00:01";
    // A veth of the node's that is not on the pod bridge.
    ip(&[
        "-n", ns, "link", "add", "stray0", "type", "veth", "peer", "name", "stray1",
    ])?;
    let free = nth(subnet, 77);
    for (req, why) in [
        (add(free, mac, "lo"), "is the loopback"),
        (add(free, mac, "eth0"), "is the node's uplink"),
        (add(free, mac, "stray0"), "is not a port of the pod bridge"),
        (add(free, mac, "nosuch0"), "does not exist on this node"),
        (
            add(subnet.network(), mac, &p0.host_if),
            "is the network address",
        ),
        (
            add(node.gateway(), mac, &p0.host_if),
            "is the gateway address",
        ),
        (
            add(subnet.broadcast(), mac, &p0.host_if),
            "is the broadcast address",
        ),
        (
            add(lab.pod((1, 0)).ip, mac, &p0.host_if),
            "is not in this node's lease",
        ),
        (
            add(free, "ff:ff:ff:ff:ff:ff", &p0.host_if),
            "is not a unicast address",
        ),
        // Another pod's address, on this pod's veth: the hijack that sent
        // 6 of 10 pings for one pod to another.
        (add(p1.ip, mac, &p0.host_if), "is held by the endpoint on"),
        // An IPv6 address on an IPv4-only node.
        (
            {
                let mut a = add(free, mac, &p0.host_if);
                a["ip6"] = "fd00:10:244:1::5".into();
                a
            },
            "this node has no IPv6 lease",
        ),
    ] {
        let a = call(&sock, req.clone())?;
        assert_eq!(a["ok"], false, "{req}: {a}");
        let err = a["error"].as_str().unwrap_or_default();
        assert!(err.contains(why), "{req}: {err}");
    }
    let st = node.status()?;
    assert_eq!(st.endpoints, 2);
    // Both pods are still reached, each at its own address: every ping of
    // ten arrives, and the node still maps each address to its own veth.
    let decapped = || -> Result<u64> {
        let c = node.counters()?;
        Ok(c["uplink_decap"] + c["uplink_redirect"])
    };
    let before = decapped()?;
    assert!(lab.ping((1, 0), p1.ip, 10, 56)?);
    assert!(lab.ping((1, 0), p0.ip, 10, 56)?);
    assert!(decapped()? - before >= 20);
    let list = call(&sock, serde_json::json!({"op": "list"}))?;
    let eps = list["endpoints"].as_array().cloned().unwrap_or_default();
    for p in [p0, p1] {
        assert!(
            eps.iter()
                .any(|e| e["ip"] == p.ip.to_string() && e["host_ifname"] == p.host_if),
            "{p:?} in {list}"
        );
    }

    // The same endpoint again is fine (a retried ADD); a record whose
    // veth is gone gives way to the next pod at its address.
    for name in ["old0", "new0"] {
        ip(&[
            "-n",
            ns,
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{name}p"),
        ])?;
        ip(&["-n", ns, "link", "set", name, "master", "cni0", "up"])?;
    }
    for _ in 0..2 {
        let a = call(&sock, add(free, mac, "old0"))?;
        assert_eq!(a["ok"], true, "{a}");
    }
    let a = call(&sock, add(free, mac, "new0"))?;
    assert!(
        a["error"]
            .as_str()
            .unwrap_or_default()
            .contains("held by the endpoint on old0"),
        "{a}"
    );
    ip(&["-n", ns, "link", "del", "old0"])?;
    let a = call(&sock, add(free, mac, "new0"))?;
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(node.status()?.endpoints, 3);
    Ok(())
}

#[test]
fn twenty_thousand_idle_connections_leave_cni_add_on_the_fast_path() -> Result<()> {
    use flannel_tests::netns::{hold_connections, ConnectTo};
    const HTTP: u16 = 10256;
    const FLOOD: usize = 20_000;
    let mut lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
        ],
        flannel_tests::lab::LabOptions {
            agent_args: vec!["--healthz-port".into(), HTTP.to_string()],
            ..Default::default()
        },
    )?;
    let ns = lab.nodes[0].ns.clone();
    let sock = lab.nodes[0].socket();
    let health = std::net::SocketAddrV4::new(lab.nodes[0].ip, HTTP);
    let pid = lab.agent_pid(0).expect("the agent runs as a process");
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count());
    let idle_fds = fds()?;

    // 20,000 idle connections to each server, held open by child
    // processes (this machine caps a process at 20,000 open files).
    let t = std::time::Instant::now();
    let api = hold_connections(&ConnectTo::Unix(sock.clone()), FLOOD, 5_000)?;
    eprintln!("{FLOOD} API connections in {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let http = hold_connections(
        &ConnectTo::Tcp {
            ns: ns.clone(),
            addr: health,
        },
        FLOOD,
        5_000,
    )?;
    eprintln!("{FLOOD} HTTP connections in {:?}", t.elapsed());
    let held = fds()?;
    // The agent holds at most its caps (4,096 API, 1,024 HTTP) more.
    assert!(
        held < idle_fds + 4096 + 1024 + 64,
        "{held} descriptors (from {idle_fds})"
    );

    // Meanwhile: /healthz answers, and a pod added through CNI is
    // registered with the agent (not left to the kernel path).
    let body = flannel_tests::netns::http_get(&ns, health.into(), "/healthz")?;
    assert!(body.contains("ok"), "{body}");
    let j = lab.add_pod(0)?;
    let new = lab.pod((0, j)).clone();
    assert_eq!(lab.nodes[0].status()?.endpoints, 2);
    let before = lab.nodes[0].counters()?;
    assert!(lab.ping((0, j), lab.pod((1, 0)).ip, 5, 56)?);
    let after = lab.nodes[0].counters()?;
    let encap =
        |c: &std::collections::HashMap<&str, u64>| c["pod_encap_redirect"] + c["pod_encap_neigh"];
    assert!(
        encap(&after) - encap(&before) >= 5,
        "{new:?}: not encapsulated in eBPF"
    );
    let log = flannel_tests::lab::strip_ansi(&lab.agent_log(0));
    assert!(log.contains("connection cap reached"), "{log}");
    drop((api, http));
    assert!(lab.nodes[0].status().is_ok());
    Ok(())
}

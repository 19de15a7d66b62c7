//! The `flannel` CNI plugin, driven the way a container runtime drives it:
//! the spec's commands over every version, chaining with the reference
//! plugins, pods made while the agent is down, many pods at once, and a
//! real runtime (podman).

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use flannel_agent::{
    api::{self, Request},
    cni::spec::SUPPORTED,
    ebpf,
};
use flannel_tests::{
    lab::{
        built_bin, command_in_netns, netns_path, run_cni, run_cni_raw, CniCall, LabOptions,
        NodeKind, NodeSpec, CNI_NETWORK, FABRIC_IP, REFERENCE_PLUGINS,
    },
    netns::{exec, ip},
    traffic::{tcp_connects, tcp_exchange_via, udp_source_seen},
    Lab,
};
use serde_json::{json, Value};

fn at_least(v: &str, min: &str) -> bool {
    flannel_agent::cni::spec::at_least(v, min)
}

/// What the plugin leaves on node `i`, to compare before and after.
#[derive(Debug, PartialEq, Eq)]
struct Traces {
    host_veths: Vec<String>,
    records: Vec<String>,
    reserved: Vec<String>,
    registered: Vec<Ipv4Addr>,
    in_map: Vec<Ipv4Addr>,
    pod_links: usize,
    masq: Vec<Ipv4Addr>,
}

fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn host_veths(lab: &Lab, i: usize) -> Vec<String> {
    let out = ip(&["-n", &lab.nodes[i].ns, "-j", "link", "show"]).unwrap_or_default();
    let v: Value = serde_json::from_str(&out).unwrap_or_default();
    let mut names: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with("vethfl"))
        .map(String::from)
        .collect();
    names.sort();
    names
}

fn masq_set(lab: &Lab, i: usize) -> Vec<Ipv4Addr> {
    let out = exec(
        &lab.nodes[i].ns,
        &["nft", "-j", "list", "set", "ip", "flannel-cni", "masq-pods"],
    )
    .ok()
    .filter(|o| o.status.success())
    .map(|o| o.stdout)
    .unwrap_or_default();
    let v: Value = serde_json::from_slice(&out).unwrap_or_default();
    let mut ips: Vec<Ipv4Addr> = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| e.as_str()?.parse().ok())
        .collect();
    ips.sort();
    ips
}

fn traces(lab: &Lab, i: usize) -> Traces {
    let node = &lab.nodes[i];
    let registered = api::call(&node.socket(), &Request::List {})
        .ok()
        .and_then(|r| r.endpoints)
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.ip)
        .collect();
    Traces {
        host_veths: host_veths(lab, i),
        records: dir_names(&node.cni_dir()),
        reserved: dir_names(&node.ipam_dir().join(CNI_NETWORK))
            .into_iter()
            .filter(|n| n.parse::<Ipv4Addr>().is_ok())
            .collect(),
        registered,
        in_map: ebpf::read_endpoints(&node.bpf_dir)
            .map(|v| v.into_iter().map(|(ip, _, _)| ip).collect())
            .unwrap_or_default(),
        pod_links: ebpf::read_pod_links(&node.bpf_dir).len(),
        masq: masq_set(lab, i),
    }
}

fn code_of(call: &CniCall) -> u64 {
    assert!(!call.success, "expected a failure, got {}", call.raw);
    call.stdout["code"].as_u64().unwrap_or(0)
}

fn addr_of(result: &Value) -> Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no address in {result}"))
}

fn with(conf: &Value, key: &str, value: Value) -> Value {
    let mut c = conf.clone();
    c[key] = value;
    c
}

/// Everything the spec asks of ADD, DEL, CHECK, VERSION and GC, for every
/// version from 0.3.0 to 1.1.0, on an eBPF node whose agent is up.
#[test]
fn spec_commands_over_every_cni_version() {
    let mut lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 0),
        NodeSpec::new(NodeKind::Ebpf, 1),
    ])
    .unwrap();
    let before = traces(&lab, 0);
    let gateway = lab.nodes[0].gateway();
    let subnet = lab.nodes[0].subnet;

    for (k, v) in SUPPORTED.iter().enumerate() {
        let conf = lab.cni_conf(0, v);
        let ns = lab.netns(&format!("s{k}")).unwrap();
        let nsp = netns_path(&ns);
        let id = format!("spec-{k}");

        // ADD: the result in the requested version's shape.
        let r = lab
            .cni(0, "ADD", &id, &nsp, "eth0", &conf)
            .unwrap()
            .ok()
            .unwrap();
        assert_eq!(r["cniVersion"], *v);
        let ifs = r["interfaces"].as_array().unwrap();
        assert_eq!(ifs.len(), 3, "{r}");
        assert_eq!(ifs[0]["name"], "cni0");
        assert!(ifs[1]["name"].as_str().unwrap().starts_with("vethfl"));
        assert_eq!(ifs[2]["name"], "eth0");
        assert_eq!(ifs[2]["sandbox"], json!(nsp));
        assert_eq!(
            ifs[2].get("mtu").is_some(),
            at_least(v, "1.1.0"),
            "{v}: {r}"
        );
        let ipc = &r["ips"][0];
        assert_eq!(
            ipc.get("version").is_some(),
            !at_least(v, "1.0.0"),
            "{v}: {r}"
        );
        assert_eq!(ipc["interface"], 2);
        assert_eq!(ipc["gateway"], json!(gateway.to_string()));
        let pod_ip = addr_of(&r);
        assert!(subnet.contains(&pod_ip), "{pod_ip} outside {subnet}");
        let dsts: Vec<&str> = r["routes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|x| x["dst"].as_str())
            .collect();
        assert!(
            dsts.contains(&"0.0.0.0/0") && dsts.contains(&"10.244.0.0/16"),
            "{r}"
        );

        // Registered before ADD returned: API, BPF map and TC link.
        let t = traces(&lab, 0);
        assert!(
            t.registered.contains(&pod_ip) && t.in_map.contains(&pod_ip),
            "{v}: {t:?}"
        );
        assert_eq!(t.pod_links, before.pod_links + 1);
        // The agent does not masquerade (FLANNEL_IPMASQ=false): the plugin does.
        assert!(t.masq.contains(&pod_ip), "{t:?}");
        // Reached from a pod on the other node, over the eBPF path.
        assert!(
            lab.ping((1, 0), pod_ip, 2, 56).unwrap(),
            "{v}: {pod_ip} unreachable"
        );

        // ADD again for the same container and interface: refused, and
        // the existing attachment is untouched.
        let again = lab.cni(0, "ADD", &id, &nsp, "eth0", &conf).unwrap();
        assert_eq!(code_of(&again), 100, "{}", again.raw);
        assert_eq!(traces(&lab, 0), t);

        // CHECK (from 0.4.0): good, then broken.
        let checked = with(&conf, "prevResult", r.clone());
        let c = lab.cni(0, "CHECK", &id, &nsp, "eth0", &checked).unwrap();
        if at_least(v, "0.4.0") {
            assert!(
                c.success,
                "{v}: CHECK on a good pod: {} {}",
                c.raw, c.stderr
            );
            ip_in(&ns, &["addr", "flush", "dev", "eth0"]);
            let c = lab.cni(0, "CHECK", &id, &nsp, "eth0", &checked).unwrap();
            assert_eq!(code_of(&c), 101, "{}", c.raw);
            assert!(c.stdout["msg"]
                .as_str()
                .unwrap()
                .contains("lost its address"));
        } else {
            assert_eq!(code_of(&c), 1, "{v}: CHECK must be refused: {}", c.raw);
        }

        // DEL twice: everything undone, the second is a no-op.
        for _ in 0..2 {
            let d = lab.cni(0, "DEL", &id, &nsp, "eth0", &checked).unwrap();
            assert!(d.success, "{v}: DEL: {} {}", d.raw, d.stderr);
        }
        assert_eq!(traces(&lab, 0), before, "{v}: DEL left traces");
        // DEL of something never added.
        let d = lab
            .cni(0, "DEL", &format!("never-{k}"), &nsp, "eth0", &conf)
            .unwrap();
        assert!(d.success, "{}", d.raw);

        // DEL after the network namespace is gone.
        let ns2 = lab.netns(&format!("g{k}")).unwrap();
        let id2 = format!("gone-{k}");
        lab.cni(0, "ADD", &id2, &netns_path(&ns2), "eth0", &conf)
            .unwrap()
            .ok()
            .unwrap();
        ip(&["netns", "del", &ns2]).unwrap();
        let d = lab
            .cni(0, "DEL", &id2, &netns_path(&ns2), "eth0", &conf)
            .unwrap();
        assert!(d.success, "{v}: DEL without netns: {} {}", d.raw, d.stderr);
        assert_eq!(
            traces(&lab, 0),
            before,
            "{v}: DEL without netns left traces"
        );

        // VERSION.
        let plugin = command_in_netns(built_bin("flannel").unwrap(), &lab.nodes[0].ns).unwrap();
        let ver = run_cni(plugin, "VERSION", "", "", "", &json!({"cniVersion": v})).unwrap();
        let ver = ver.ok().unwrap();
        assert_eq!(ver["supportedVersions"], json!(SUPPORTED));

        // STATUS and GC exist from 1.1.0.
        let st = lab.cni(0, "STATUS", "", "", "", &conf).unwrap();
        let gc = lab
            .cni(
                0,
                "GC",
                "",
                "",
                "",
                &with(&conf, "cni.dev/valid-attachments", json!([])),
            )
            .unwrap();
        if at_least(v, "1.1.0") {
            assert!(st.success, "STATUS: {} {}", st.raw, st.stderr);
            assert!(gc.success, "GC: {} {}", gc.raw, gc.stderr);
        } else {
            assert_eq!(code_of(&st), 1, "{v}: {}", st.raw);
            assert_eq!(code_of(&gc), 1, "{v}: {}", gc.raw);
        }
    }

    // The other node's pod took no part in any of it.
    assert!(lab.ping((1, 0), lab.nodes[1].gateway(), 1, 56).unwrap());
}

fn ip_in(ns: &str, args: &[&str]) {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    ip(&a).unwrap();
}

/// Bad calls get the spec's error object and create nothing; an ADD that
/// fails half way undoes what it did; GC removes every attachment not in
/// the valid list and nothing else.
#[test]
fn bad_calls_rollback_and_gc() {
    let mut lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 0),
        NodeSpec::new(NodeKind::Ebpf, 1),
    ])
    .unwrap();
    let conf = lab.cni_conf(0, "1.1.0");
    let ns = lab.netns("bad").unwrap();
    let nsp = netns_path(&ns);
    let before = traces(&lab, 0);
    let plugin = || command_in_netns(built_bin("flannel").unwrap(), &lab.nodes[0].ns).unwrap();

    // (command, container id, netns, ifname, stdin, code, text in msg)
    let table: Vec<(&str, &str, String, &str, Vec<u8>, u64, &str)> = vec![
        (
            "ADD",
            "c",
            nsp.clone(),
            "eth0",
            b"not json".to_vec(),
            6,
            "not JSON",
        ),
        (
            "ADD",
            "c",
            nsp.clone(),
            "eth0",
            b"{}".to_vec(),
            7,
            "cniVersion is missing",
        ),
        (
            "ADD",
            "c",
            nsp.clone(),
            "eth0",
            br#"{"cniVersion":"9.9.9","name":"n"}"#.to_vec(),
            1,
            "incompatible",
        ),
        (
            "",
            "c",
            nsp.clone(),
            "eth0",
            serde_json::to_vec(&conf).unwrap(),
            4,
            "CNI_COMMAND is not set",
        ),
        (
            "FROB",
            "c",
            nsp.clone(),
            "eth0",
            serde_json::to_vec(&conf).unwrap(),
            4,
            "FROB",
        ),
        (
            "ADD",
            "c",
            String::new(),
            "eth0",
            serde_json::to_vec(&conf).unwrap(),
            4,
            "CNI_NETNS",
        ),
        (
            "ADD",
            "",
            nsp.clone(),
            "eth0",
            serde_json::to_vec(&conf).unwrap(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "ADD",
            "c",
            nsp.clone(),
            "",
            serde_json::to_vec(&conf).unwrap(),
            4,
            "CNI_IFNAME",
        ),
        (
            "ADD",
            "c",
            nsp.clone(),
            "a/b",
            serde_json::to_vec(&conf).unwrap(),
            4,
            "not a valid interface name",
        ),
        (
            "ADD",
            "../x",
            nsp.clone(),
            "eth0",
            serde_json::to_vec(&conf).unwrap(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "ADD",
            "c",
            "/run/netns/does-not-exist".into(),
            "eth0",
            serde_json::to_vec(&conf).unwrap(),
            3,
            "cannot be opened",
        ),
        (
            "DEL",
            "",
            nsp.clone(),
            "eth0",
            serde_json::to_vec(&conf).unwrap(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "CHECK",
            "c",
            nsp.clone(),
            "eth0",
            serde_json::to_vec(&conf).unwrap(),
            7,
            "prevResult is required",
        ),
        (
            "GC",
            "",
            String::new(),
            "",
            serde_json::to_vec(&conf).unwrap(),
            7,
            "valid-attachments",
        ),
    ];
    for (cmd, id, netns, ifname, stdin, want, text) in table {
        let call = run_cni_raw(plugin(), cmd, id, &netns, ifname, &stdin).unwrap();
        assert_eq!(
            code_of(&call),
            want,
            "{cmd} {id:?} {netns:?} {ifname:?}: {}",
            call.raw
        );
        let msg = call.stdout["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(text), "{cmd}: {msg:?} lacks {text:?}");
        assert!(call.stdout["cniVersion"].is_string(), "{}", call.raw);
        assert!(!call.stderr.is_empty(), "errors are logged on stderr");
        assert_eq!(
            traces(&lab, 0),
            before,
            "{cmd} {text}: something was created"
        );
    }

    // Half-way failure: a route that cannot be added fails ADD after the
    // address was taken and the veth made; all of it is undone.
    let broken = with(
        &conf,
        "ipam",
        json!({"dataDir": lab.nodes[0].ipam_dir(), "routes": [{"dst": "192.0.2.0/24", "gw": "203.0.113.1"}]}),
    );
    let call = lab.cni(0, "ADD", "half", &nsp, "eth0", &broken).unwrap();
    assert!(!call.success);
    assert!(
        call.stdout["msg"].as_str().unwrap().contains("route"),
        "{}",
        call.raw
    );
    assert_eq!(traces(&lab, 0), before, "a failed ADD left traces");
    let links = ip(&["-n", &ns, "-j", "link", "show"]).unwrap();
    assert!(
        !links.contains("eth0"),
        "pod interface left behind: {links}"
    );

    // GC: three attachments, one valid; plus an address host-local holds
    // for a container nobody knows and a veth of ours without a record.
    let mut ids = Vec::new();
    for k in 0..3 {
        let ns = lab.netns(&format!("gc{k}")).unwrap();
        let r = lab
            .cni(
                0,
                "ADD",
                &format!("gc-{k}"),
                &netns_path(&ns),
                "eth0",
                &conf,
            )
            .unwrap()
            .ok()
            .unwrap();
        ids.push((format!("gc-{k}"), addr_of(&r)));
    }
    let hl = command_in_netns(format!("{REFERENCE_PLUGINS}/host-local"), &lab.nodes[0].ns).unwrap();
    let ipam_conf = json!({"cniVersion": "1.0.0", "name": CNI_NETWORK,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": lab.nodes[0].subnet.to_string()}]], "dataDir": lab.nodes[0].ipam_dir()}});
    let leaked = run_cni(hl, "ADD", "leaked", &nsp, "eth0", &ipam_conf)
        .unwrap()
        .ok()
        .unwrap();
    let leaked_ip = addr_of(&leaked);
    ip_in(
        &lab.nodes[0].ns,
        &[
            "link",
            "add",
            "vethfl0000dead",
            "type",
            "veth",
            "peer",
            "name",
            "fltmp0",
        ],
    );
    assert_eq!(traces(&lab, 0).reserved.len(), 4);

    let valid = json!([{"containerID": "gc-0", "ifname": "eth0"}]);
    let gc = lab
        .cni(
            0,
            "GC",
            "",
            "",
            "",
            &with(&conf, "cni.dev/valid-attachments", valid),
        )
        .unwrap();
    assert!(gc.success, "GC: {} {}", gc.raw, gc.stderr);
    let t = traces(&lab, 0);
    assert_eq!(t.registered, vec![ids[0].1], "{t:?}");
    assert_eq!(t.in_map, vec![ids[0].1], "{t:?}");
    assert_eq!(t.reserved, vec![ids[0].1.to_string()], "{t:?}");
    assert_eq!(t.records.len(), 1, "{t:?}");
    assert_eq!(t.host_veths.len(), 1, "{t:?}");
    assert!(!t.reserved.contains(&leaked_ip.to_string()));
    assert_eq!(t.masq, vec![ids[0].1]);
    // The valid attachment still works.
    assert!(lab.ping((1, 0), ids[0].1, 2, 56).unwrap());
}

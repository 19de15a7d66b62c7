//! The `flannel` CNI plugin, driven the way a container runtime drives it:
//! the spec's commands over every version, chaining with the reference
//! plugins, pods made while the agent is down, many pods at once, and a
//! real runtime (podman).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use flannel_agent::{
    api::{self, Request},
    cni::spec::{at_least, SUPPORTED},
    datapath::ebpf,
};
use flannel_tests::{
    lab::{
        built_bin, cni_in, command_in_netns, netns_path, run_cni, run_cni_raw, CniCall, LabOptions,
        NodeKind, NodeSpec, CNI_NETWORK, FABRIC_IP, REFERENCE_PLUGINS,
    },
    netns::{exec, ip},
    podman::{busybox_rootfs, Podman},
    traffic::{tcp_connects, tcp_exchange_via, udp_source_seen},
    Lab,
};
use serde_json::{json, Value};

/// What the plugin leaves on node `i`, to compare before and after.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Traces {
    host_veths: Vec<String>,
    records: Vec<String>,
    reserved: Vec<String>,
    registered: Vec<Ipv4Addr>,
    in_map: Vec<Ipv4Addr>,
    pod_links: usize,
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

/// The plugin's masquerade rule on node `i`, as `nft` prints it.
fn masq_rule(lab: &Lab, i: usize) -> String {
    exec(
        &lab.nodes[i].ns,
        &["nft", "list", "chain", "ip", "flannel-cni", "postrouting"],
    )
    .ok()
    .filter(|o| o.status.success())
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_default()
}

/// The lab most tests here use: node 1 with no pods, the one the plugin is
/// driven on, and node 2 with one pod for the new pods to reach.
fn subject_and_peer() -> Lab {
    Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 0),
        NodeSpec::new(NodeKind::Ebpf, 1),
    ])
    .unwrap()
}

fn traces(lab: &Lab, i: usize) -> Traces {
    let node = &lab.nodes[i];
    let registered = api::call(&node.socket(), &Request::List {})
        .ok()
        .and_then(|r| r.endpoints)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| e.ip)
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
    }
}

/// (command, container id, netns, ifname, stdin, code, text in msg)
type BadCall<'a> = (&'a str, &'a str, String, &'a str, Vec<u8>, u64, &'a str);

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
    let mut lab = subject_and_peer();
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
        let rule = masq_rule(&lab, 0);
        assert!(
            rule.contains(&format!("ip saddr {subnet} ip daddr != 10.244.0.0/16"))
                && rule.contains("masquerade"),
            "{rule}"
        );
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
    let mut lab = subject_and_peer();
    let conf = lab.cni_conf(0, "1.1.0");
    let ns = lab.netns("bad").unwrap();
    let nsp = netns_path(&ns);
    let before = traces(&lab, 0);
    let plugin = || command_in_netns(built_bin("flannel").unwrap(), &lab.nodes[0].ns).unwrap();

    let good = serde_json::to_vec(&conf).unwrap();
    let table: Vec<BadCall> = vec![
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
            good.clone(),
            4,
            "CNI_COMMAND is not set",
        ),
        ("FROB", "c", nsp.clone(), "eth0", good.clone(), 4, "FROB"),
        (
            "ADD",
            "c",
            String::new(),
            "eth0",
            good.clone(),
            4,
            "CNI_NETNS",
        ),
        (
            "ADD",
            "",
            nsp.clone(),
            "eth0",
            good.clone(),
            4,
            "CNI_CONTAINERID",
        ),
        ("ADD", "c", nsp.clone(), "", good.clone(), 4, "CNI_IFNAME"),
        (
            "ADD",
            "c",
            nsp.clone(),
            "a/b",
            good.clone(),
            4,
            "not a valid interface name",
        ),
        (
            "ADD",
            "../x",
            nsp.clone(),
            "eth0",
            good.clone(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "ADD",
            "c",
            nsp.clone(),
            "eth\u{7}0",
            good.clone(),
            4,
            "not a valid interface name",
        ),
        (
            "ADD",
            "c",
            "relative/netns".into(),
            "eth0",
            good.clone(),
            4,
            "CNI_NETNS",
        ),
        (
            "ADD",
            "c",
            nsp.clone(),
            "eth0",
            br#"{"cniVersion":"1.0.0","name":"cbr0"}"#.to_vec(),
            7,
            "type is missing",
        ),
        (
            "ADD",
            "c",
            nsp.clone(),
            "eth0",
            serde_json::to_vec(&with(&conf, "dataDir", json!("/var/lib/cni/../../etc"))).unwrap(),
            7,
            "dataDir",
        ),
        (
            "ADD",
            "c",
            "/run/netns/does-not-exist".into(),
            "eth0",
            good.clone(),
            3,
            "cannot be opened",
        ),
        (
            "DEL",
            "",
            nsp.clone(),
            "eth0",
            good.clone(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "CHECK",
            "c",
            nsp.clone(),
            "eth0",
            good.clone(),
            7,
            "prevResult is required",
        ),
        (
            "GC",
            "",
            String::new(),
            "",
            good.clone(),
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
    // The valid attachment still works.
    assert!(lab.ping((1, 0), ids[0].1, 2, 56).unwrap());
}

/// Chained as Flannel's conflist chains it: `portmap` after the plugin,
/// with the real reference plugins; host-local state that was there
/// before is respected; the plugin masquerades what leaves the cluster.
#[test]
fn chained_with_the_reference_plugins() {
    let mut lab = subject_and_peer();
    let node = &lab.nodes[0];
    let (node_ip, subnet) = (node.ip, node.subnet);
    // An address an earlier pod still holds, as host-local wrote it.
    let held = Ipv4Addr::from(u32::from(subnet.network()) + 2);
    let hl_dir = node.ipam_dir().join(CNI_NETWORK);
    std::fs::create_dir_all(&hl_dir).unwrap();
    std::fs::write(hl_dir.join(held.to_string()), "earlier-pod\r\neth0").unwrap();

    let list = lab.conflist(0);
    let version = list["cniVersion"].as_str().unwrap().to_string();
    // What a runtime hands each plugin of the list.
    let entry = |k: usize, prev: Option<&Value>| {
        let mut c = list["plugins"][k].clone();
        c["cniVersion"] = json!(version);
        c["name"] = json!(CNI_NETWORK);
        if c["capabilities"]["portMappings"] == json!(true) {
            c["runtimeConfig"] = json!({"portMappings": [
                {"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]});
        }
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    };
    let ns = lab.netns("chain").unwrap();
    let nsp = netns_path(&ns);
    let r = lab
        .cni(0, "ADD", "chained", &nsp, "eth0", &entry(0, None))
        .unwrap()
        .ok()
        .unwrap();
    let pod_ip = addr_of(&r);
    assert_ne!(pod_ip, held, "host-local's earlier reservation was ignored");
    let r2 = lab
        .cni(0, "ADD", "chained", &nsp, "eth0", &entry(1, Some(&r)))
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(addr_of(&r2), pod_ip, "portmap passes the result on");

    // The hostPort on the node's address reaches the pod.
    let fabric = lab.fabric.clone();
    tcp_exchange_via(
        &fabric,
        &ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080),
        SocketAddrV4::new(node_ip, 18080),
    )
    .unwrap();
    // Pod to the fabric is masqueraded by the plugin's rule (the agent
    // runs without --ip-masq); pod to pod keeps the pod's address.
    let seen = udp_source_seen(&ns, &fabric, FABRIC_IP, 7101).unwrap();
    assert_eq!(seen, IpAddr::from(node_ip));
    let other = lab.pod((1, 0));
    let seen = udp_source_seen(&ns, &other.ns, other.ip, 7102).unwrap();
    assert_eq!(seen, IpAddr::from(pod_ip));

    // DEL in reverse order, as runtimes do.
    for k in [1, 0] {
        let d = lab
            .cni(0, "DEL", "chained", &nsp, "eth0", &entry(k, Some(&r)))
            .unwrap();
        assert!(d.success, "DEL {k}: {} {}", d.raw, d.stderr);
    }
    assert!(!tcp_connects(&fabric, SocketAddrV4::new(node_ip, 18080)).unwrap());
    let t = traces(&lab, 0);
    assert_eq!(t.reserved, vec![held.to_string()], "{t:?}");
    assert!(t.host_veths.is_empty() && t.records.is_empty(), "{t:?}");
}

/// The node's agent is down: STATUS says why and ADD refuses cleanly
/// until subnet.env exists; with subnet.env, ADD works without the agent
/// (over the kernel path) and the agent registers the pod when it is back.
#[test]
fn pods_added_while_the_agent_is_down_are_registered_later() {
    let mut lab = subject_and_peer();
    let conf = lab.cni_conf(0, "1.1.0");
    let before = traces(&lab, 0);
    lab.kill_agent(0).unwrap();

    // Before the agent has written subnet.env.
    std::fs::remove_file(lab.nodes[0].subnet_file()).unwrap();
    let st = lab.cni(0, "STATUS", "", "", "", &conf).unwrap();
    assert_eq!(code_of(&st), 50, "{}", st.raw);
    assert!(st.stdout["msg"]
        .as_str()
        .unwrap()
        .contains("Check the agent on this node"));
    let ns = lab.netns("down").unwrap();
    let nsp = netns_path(&ns);
    let add = lab.cni(0, "ADD", "early", &nsp, "eth0", &conf).unwrap();
    assert_eq!(code_of(&add), 11, "{}", add.raw);
    assert!(add.stdout["msg"]
        .as_str()
        .unwrap()
        .starts_with("failed to load flannel 'subnet.env' file"));
    let mut expect = Traces {
        registered: Vec::new(),
        ..before.clone()
    };
    assert_eq!(traces(&lab, 0), expect, "a refused ADD created something");

    // The agent writes subnet.env; STATUS turns ready.
    lab.start_agent(0).unwrap();
    let st = lab.cni(0, "STATUS", "", "", "", &conf).unwrap();
    assert!(st.success, "{} {}", st.raw, st.stderr);

    // Agent down again: ADD still completes.
    lab.kill_agent(0).unwrap();
    let add = lab.cni(0, "ADD", "early", &nsp, "eth0", &conf).unwrap();
    assert!(add.success, "{} {}", add.raw, add.stderr);
    assert!(add.stderr.contains("agent unavailable"), "{}", add.stderr);
    let pod_ip = addr_of(&add.stdout);
    let t = traces(&lab, 0);
    assert_eq!(t.records.len(), 1);
    assert!(!t.in_map.contains(&pod_ip), "nobody registered it: {t:?}");
    // Reachable, through the kernel's flannel.1 on this node.
    let c0 = lab.nodes[0].counters().unwrap();
    assert!(lab.ping((1, 0), pod_ip, 5, 56).unwrap());
    let c1 = lab.nodes[0].counters().unwrap();
    assert!(
        c1["uplink_pass_not_local"] >= c0["uplink_pass_not_local"] + 5,
        "{c0:?} {c1:?}"
    );
    assert_eq!(c1["uplink_decap"], c0["uplink_decap"]);

    // The agent comes back and registers it from the records.
    lab.start_agent(0).unwrap();
    lab.wait_for(
        Duration::from_secs(10),
        "the agent to adopt the pod",
        |lab| {
            let t = traces(lab, 0);
            t.in_map.contains(&pod_ip) && t.registered.contains(&pod_ip) && t.pod_links == 1
        },
    )
    .unwrap();
    assert!(lab
        .agent_log(0)
        .contains("registering a pod from the CNI plugin's records"));
    let c2 = lab.nodes[0].counters().unwrap();
    assert!(lab.ping((1, 0), pod_ip, 5, 56).unwrap());
    let c3 = lab.nodes[0].counters().unwrap();
    assert!(
        c3["uplink_decap"] >= c2["uplink_decap"] + 5,
        "now on the eBPF path: {c2:?} {c3:?}"
    );
    let check = lab
        .cni(
            0,
            "CHECK",
            "early",
            &nsp,
            "eth0",
            &with(&conf, "prevResult", add.stdout.clone()),
        )
        .unwrap();
    assert!(check.success, "{} {}", check.raw, check.stderr);

    // DEL while the agent is down; the agent forgets the pod on return.
    lab.kill_agent(0).unwrap();
    let del = lab.cni(0, "DEL", "early", &nsp, "eth0", &conf).unwrap();
    assert!(del.success, "{} {}", del.raw, del.stderr);
    lab.start_agent(0).unwrap();
    expect = before;
    lab.wait_for(
        Duration::from_secs(10),
        "the agent to forget the pod",
        |lab| traces(lab, 0) == expect,
    )
    .unwrap();
}

/// ADD → reachable → DEL for `n` pods on node 0 with `workers` calls in
/// flight at once; returns the ADD and DEL latencies.
fn churn(
    lab: &mut Lab,
    conf: &Value,
    n: usize,
    workers: usize,
    tag: &str,
    reach_from: &str,
) -> (Vec<Duration>, Vec<Duration>) {
    let namespaces: Vec<String> = (0..n)
        .map(|k| lab.netns(&format!("{tag}{k}")).unwrap())
        .collect();
    let node_ns = lab.nodes[0].ns.clone();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if k >= n {
                    break;
                }
                let nsp = netns_path(&namespaces[k]);
                let id = format!("{tag}-{k}");
                let t0 = Instant::now();
                let add = cni_in(&node_ns, "ADD", &id, &nsp, "eth0", conf).unwrap();
                let add_t = t0.elapsed();
                assert!(add.success, "{tag} ADD {k}: {} {}", add.raw, add.stderr);
                let pod_ip = addr_of(&add.stdout);
                let reached = (0..3).any(|_| {
                    exec(
                        reach_from,
                        &["ping", "-c", "1", "-W", "2", &pod_ip.to_string()],
                    )
                    .is_ok_and(|o| o.status.success())
                });
                assert!(
                    reached,
                    "{tag}: pod {k} ({pod_ip}) unreachable while it exists"
                );
                let t1 = Instant::now();
                let del = cni_in(&node_ns, "DEL", &id, &nsp, "eth0", conf).unwrap();
                let del_t = t1.elapsed();
                assert!(del.success, "{tag} DEL {k}: {} {}", del.raw, del.stderr);
                results.lock().unwrap().push((add_t, del_t));
            });
        }
    });
    let r = results.into_inner().unwrap();
    assert_eq!(r.len(), n);
    r.into_iter().unzip()
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

/// 200 pods added, reached and deleted concurrently on one node, then
/// nothing left behind; the same job with the reference bridge +
/// host-local chain, side by side, for the latency figures.
#[test]
fn two_hundred_pods_concurrently() {
    const N: usize = 200;
    let mut lab = subject_and_peer();
    let before = traces(&lab, 0);
    let conf = lab.cni_conf(0, "1.0.0");
    let prober = lab.pod((1, 0)).ns.clone();
    let reference = json!({
        "cniVersion": "1.0.0", "name": "refnet", "type": "bridge", "bridge": "cniref0",
        "isGateway": true, "isDefaultGateway": true, "hairpinMode": true, "ipMasq": false,
        "mtu": 1450,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/24"}]],
                 "routes": [{"dst": "10.244.0.0/16"}], "dataDir": lab.nodes[0].ipam_dir()},
    });
    let node_ns = lab.nodes[0].ns.clone();
    let mut rows = Vec::new();
    for workers in [N, 8] {
        let started = Instant::now();
        let (mut fa, mut fd) = churn(
            &mut lab,
            &conf,
            N,
            workers,
            &format!("f{workers}x"),
            &prober,
        );
        let f_total = started.elapsed();
        assert_eq!(traces(&lab, 0), before, "flannel churn left traces");
        let started = Instant::now();
        let (mut ra, mut rd) = churn(
            &mut lab,
            &reference,
            N,
            workers,
            &format!("r{workers}x"),
            &node_ns,
        );
        let r_total = started.elapsed();
        rows.push(format!(
            "{workers:>3} in flight | flannel ADD p50 {:6.1} p99 {:6.1} DEL p50 {:6.1} p99 {:6.1} ({:.1} s) | bridge+host-local ADD p50 {:6.1} p99 {:6.1} DEL p50 {:6.1} p99 {:6.1} ({:.1} s)",
            pct(&mut fa, 0.5), pct(&mut fa, 0.99), pct(&mut fd, 0.5), pct(&mut fd, 0.99), f_total.as_secs_f64(),
            pct(&mut ra, 0.5), pct(&mut ra, 0.99), pct(&mut rd, 0.5), pct(&mut rd, 0.99), r_total.as_secs_f64(),
        ));
    }
    let t = traces(&lab, 0);
    assert_eq!(t, before, "leftovers after {N} pods");
    let refs = dir_names(&lab.nodes[0].ipam_dir().join("refnet"));
    assert!(
        refs.iter().all(|n| n.parse::<Ipv4Addr>().is_err()),
        "{refs:?}"
    );
    eprintln!("CNI latency over {N} pods (ms):");
    for r in rows {
        eprintln!("  {r}");
    }
}

/// A real runtime: podman with its CNI backend and the conflist the agent
/// installed, containers on two nodes reaching each other over the eBPF
/// path, and `podman rm` leaving nothing behind.
#[test]
fn podman_containers_on_two_nodes() {
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 0),
            NodeSpec::new(NodeKind::Ebpf, 0),
        ],
        LabOptions {
            install_cni: true,
            ..Default::default()
        },
    )
    .unwrap();
    // --install-cni put the plugin and each node's conflist in place.
    let built = std::fs::read(built_bin("flannel").unwrap()).unwrap();
    for i in 0..2 {
        let node = &lab.nodes[i];
        let bin = node.cni_bin_dir().join("flannel");
        assert!(
            std::fs::read(&bin).unwrap() == built,
            "installed plugin differs"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let conf: Value = serde_json::from_slice(
            &std::fs::read(node.cni_conf_dir().join("10-flannel.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(conf, lab.conflist(i));
    }
    let before: Vec<Traces> = (0..2).map(|i| traces(&lab, i)).collect();
    let rootfs = busybox_rootfs(&lab.dir).unwrap();
    let rootfs_arg = format!("{}:O", rootfs.display());
    let podmen: Vec<Podman> = (0..2)
        .map(|i| {
            let n = &lab.nodes[i];
            Podman::new(
                &n.ns,
                &n.run_dir.join("podman"),
                &n.cni_conf_dir(),
                &n.cni_bin_dir(),
            )
            .unwrap()
        })
        .collect();
    let mut ips = Vec::new();
    for (i, p) in podmen.iter().enumerate() {
        let name = format!("c{i}");
        p.run(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            CNI_NETWORK,
            "--rootfs",
            &rootfs_arg,
            "/bin/sleep",
            "3600",
        ])
        .unwrap();
        let ip: Ipv4Addr = p
            .run(&[
                "inspect",
                "-f",
                "{{.NetworkSettings.Networks.cbr0.IPAddress}}",
                &name,
            ])
            .unwrap()
            .parse()
            .unwrap();
        assert!(lab.nodes[i].subnet.contains(&ip));
        let t = traces(&lab, i);
        assert!(
            t.in_map.contains(&ip) && t.registered.contains(&ip),
            "{t:?}"
        );
        assert_eq!(
            p.cni_cache().len(),
            1,
            "podman's CNI cache stays in the test dir"
        );
        ips.push(ip);
    }
    let c0 = lab.nodes[0].counters().unwrap();
    let c1 = lab.nodes[1].counters().unwrap();
    let out = podmen[0]
        .run(&[
            "exec",
            "c0",
            "ping",
            "-c",
            "5",
            "-W",
            "2",
            &ips[1].to_string(),
        ])
        .unwrap();
    assert!(out.contains("5 packets received"), "{out}");
    let out = podmen[1]
        .run(&[
            "exec",
            "c1",
            "ping",
            "-c",
            "3",
            "-W",
            "2",
            &ips[0].to_string(),
        ])
        .unwrap();
    assert!(out.contains("3 packets received"), "{out}");
    let d0 = lab.nodes[0].counters().unwrap();
    let d1 = lab.nodes[1].counters().unwrap();
    assert!(
        d0["pod_encap_redirect"] + d0["pod_encap_neigh"]
            >= c0["pod_encap_redirect"] + c0["pod_encap_neigh"] + 5,
        "{c0:?} {d0:?}"
    );
    assert!(
        d1["uplink_decap"] >= c1["uplink_decap"] + 5,
        "{c1:?} {d1:?}"
    );

    for (i, p) in podmen.iter().enumerate() {
        p.run(&["rm", "--force", "--time", "0", &format!("c{i}")])
            .unwrap();
        assert_eq!(
            traces(&lab, i),
            before[i],
            "podman rm left traces on node {i}"
        );
        assert!(p.cni_cache().is_empty(), "{:?}", p.cni_cache());
    }
}

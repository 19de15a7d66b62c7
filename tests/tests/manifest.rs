//! `deploy/kube-flannel-ebpf.yml` against what the agent needs: parsed
//! strictly as its Kubernetes types, Flannel's names, least-privilege
//! RBAC, the security context, the mounts, the probes, the image. No
//! privileges needed.

use std::{collections::BTreeSet, path::Path};

use flannel_agent::{
    agent::defaults,
    caps,
    cni::install::{install_conflist, FLANNEL_CONFLIST},
    config::NetConfig,
};
use flannel_tests::manifest::{self, Object, PART_LABEL};
use k8s_openapi::api::core::v1::{Container, PodSpec};

/// The value of `--name` in `args` (`--name=v` or `--name v`).
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(name)?.strip_prefix('=')
        }
    })
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The mount that holds `path` in container `c`: (host path or
/// "configmap", read-only).
fn mount_of(spec: &PodSpec, c: &Container, path: &str) -> Option<(String, bool)> {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let vol = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap_or_else(|| panic!("mount {} names no volume", m.name));
    let source = match (&vol.host_path, &vol.config_map) {
        (Some(h), None) => h.path.clone(),
        (None, Some(_)) => "configmap".to_string(),
        _ => panic!("volume {} is neither hostPath nor configMap", vol.name),
    };
    Some((source, m.read_only.unwrap_or(false)))
}

fn writable(spec: &PodSpec, c: &Container, path: &str) -> bool {
    matches!(mount_of(spec, c, path), Some((src, false)) if src != "configmap")
}

#[test]
fn the_manifest_parses_strictly_with_flannels_names() {
    let m = manifest::load().unwrap();
    let kinds: Vec<(&str, String)> = m
        .objects
        .iter()
        .map(|o| (o.kind(), o.metadata().name.clone().unwrap_or_default()))
        .collect();
    let want = [
        ("Namespace", "kube-flannel"),
        ("ServiceAccount", "flannel"),
        ("ClusterRole", "flannel"),
        ("ClusterRoleBinding", "flannel"),
        ("ConfigMap", "kube-flannel-cfg"),
        ("DaemonSet", "kube-flannel-ds"),
    ];
    assert_eq!(
        kinds,
        want.iter()
            .map(|(k, n)| (*k, n.to_string()))
            .collect::<Vec<_>>()
    );
    for o in &m.objects {
        let ns = o.metadata().namespace.as_deref();
        match o {
            Object::Namespace(_) | Object::ClusterRole(_) | Object::ClusterRoleBinding(_) => {
                assert_eq!(ns, None, "{} is cluster-wide", o.kind())
            }
            _ => assert_eq!(ns, Some("kube-flannel"), "{}", o.kind()),
        }
    }
}

#[test]
fn migration_applies_everything_but_the_users_config() {
    // `kubectl apply -f kube-flannel-ebpf.yml -l flannel-ebpf/part=agent`
    // over a Flannel install keeps its ConfigMap (and so its network,
    // VNI and port) and replaces the rest under the same names.
    let m = manifest::load().unwrap();
    for o in &m.objects {
        let part = o
            .metadata()
            .labels
            .as_ref()
            .and_then(|l| l.get(PART_LABEL))
            .map(String::as_str);
        let want = if matches!(o, Object::ConfigMap(_)) {
            "config"
        } else {
            "agent"
        };
        assert_eq!(part, Some(want), "{} {PART_LABEL}", o.kind());
    }
    // The pod template refers to the ConfigMap by Flannel's name.
    let spec = m.pod_spec().unwrap();
    let cfg = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.config_map.as_ref())
        .unwrap();
    assert_eq!(cfg.name, "kube-flannel-cfg");
}

#[test]
fn the_config_map_holds_flannels_files() {
    let m = manifest::load().unwrap();
    let net = NetConfig::parse(m.config_file("net-conf.json").unwrap()).unwrap();
    assert_eq!(net.network.to_string(), "10.244.0.0/16");
    assert_eq!(net.backend.vni, 1);
    assert_eq!(
        net.backend.port, 4789,
        "the shipped configs set IANA's port"
    );
    let cni = m.config_file("cni-conf.json").unwrap();
    let parsed: serde_json::Value = serde_json::from_str(cni).unwrap();
    let flannels: serde_json::Value = serde_json::from_str(FLANNEL_CONFLIST).unwrap();
    assert_eq!(parsed, flannels, "Flannel's conflist, unchanged");
    // The installer takes it.
    let dir = std::env::temp_dir().join(format!("flannel-manifest-{}", std::process::id()));
    assert!(install_conflist(cni, &dir, defaults::CNI_CONF_NAME)
        .unwrap()
        .is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rbac_is_what_the_kube_store_calls_and_nothing_more() {
    let m = manifest::load().unwrap();
    let role = m.cluster_role().unwrap();
    let mut rules: Vec<(String, String, String)> = Vec::new();
    for r in role.rules.iter().flatten() {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    rules.push((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    rules.sort();
    let want: Vec<(String, String, String)> = [
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "nodes/status", "patch"),
    ]
    .iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(rules, want);
    let binding = m
        .objects
        .iter()
        .find_map(|o| match o {
            Object::ClusterRoleBinding(b) => Some(b),
            _ => None,
        })
        .unwrap();
    assert_eq!(binding.role_ref.name, "flannel");
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "flannel", Some("kube-flannel"))
    );
    assert_eq!(
        m.pod_spec().unwrap().service_account_name.as_deref(),
        Some("flannel")
    );
}

#[test]
fn the_daemonset_runs_like_flannels_without_privileges() {
    let m = manifest::load().unwrap();
    let ds = m.daemonset().unwrap();
    let strategy = ds.spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .unwrap()
            .max_unavailable
            .as_ref()
            .map(|v| serde_json::to_value(v).unwrap()),
        Some(serde_json::json!(1))
    );
    let spec = m.pod_spec().unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tol = spec.tolerations.as_ref().unwrap();
    assert!(tol.iter().any(|t| t.operator.as_deref() == Some("Exists")
        && t.effect.as_deref() == Some("NoSchedule")
        && t.key.is_none()));
    let names: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["install-cni-plugin", "install-cni"]);

    // One image, the one `cargo xtask image` builds.
    assert_eq!(
        m.image().unwrap(),
        format!("localhost/flannel-ebpf:v{}", env!("CARGO_PKG_VERSION"))
    );

    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(false), "{}", c.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        let caps_ = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps_.drop.as_deref(), Some(&["ALL".to_string()][..]));
        let res = c.resources.as_ref().unwrap();
        for key in ["cpu", "memory"] {
            assert!(
                res.requests.as_ref().unwrap().contains_key(key),
                "{} requests {key}",
                c.name
            );
            assert!(
                res.limits.as_ref().unwrap().contains_key(key),
                "{} limits {key}",
                c.name
            );
        }
        assert_eq!(
            c.command.as_deref(),
            Some(&["/usr/local/bin/flannel-agent".to_string()][..])
        );
        // Only the paths the issue allows, never the whole host.
        for v in spec.volumes.iter().flatten() {
            if let Some(h) = &v.host_path {
                assert!(
                    [
                        "/run/flannel",
                        "/sys/fs/bpf",
                        "/etc/cni/net.d",
                        "/opt/cni/bin",
                        "/var/lib/cni"
                    ]
                    .contains(&h.path.as_str()),
                    "hostPath {}",
                    h.path
                );
            }
        }
    }

    // Init containers need no capability at all, and take the runtime's
    // syscall filter; the agent states its profile.
    for c in spec.init_containers.iter().flatten() {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.capabilities.as_ref().unwrap().add, None, "{}", c.name);
        let profile = sc.seccomp_profile.as_ref().map(|p| p.type_.as_str());
        assert_eq!(profile, Some("RuntimeDefault"), "{}", c.name);
    }
    for c in &spec.containers {
        let sc = c.security_context.as_ref().unwrap();
        assert!(
            sc.seccomp_profile.is_some(),
            "{}: no seccompProfile",
            c.name
        );
    }
}

#[test]
fn init_containers_install_into_mounted_host_directories() {
    let m = manifest::load().unwrap();
    let spec = m.pod_spec().unwrap();
    let plugin = container(spec, "install-cni-plugin");
    let args = plugin.args.clone().unwrap();
    assert_eq!(args[0], "install-cni-plugin");
    let bin_dir = flag(&args, "--cni-bin-dir").unwrap_or(defaults::CNI_BIN_DIR);
    assert_eq!(
        mount_of(spec, plugin, bin_dir),
        Some(("/opt/cni/bin".into(), false))
    );
    // The plugin it copies is in the image, not under a mount.
    let src = flag(&args, "--plugin").unwrap();
    assert_eq!(mount_of(spec, plugin, src), None);

    let conf = container(spec, "install-cni");
    let args = conf.args.clone().unwrap();
    assert_eq!(args[0], "install-cni");
    let conf_dir = flag(&args, "--cni-conf-dir").unwrap_or(defaults::CNI_CONF_DIR);
    assert_eq!(
        mount_of(spec, conf, conf_dir),
        Some(("/etc/cni/net.d".into(), false))
    );
    assert_eq!(
        flag(&args, "--cni-conf-name").unwrap_or(defaults::CNI_CONF_NAME),
        "10-flannel.conflist",
        "Flannel's file name, so a migration replaces it"
    );
    let file = flag(&args, "--cni-conf-file").unwrap();
    assert_eq!(mount_of(spec, conf, file), Some(("configmap".into(), true)));
    assert!(file.ends_with("/cni-conf.json"));
}

#[test]
fn the_agent_has_its_capabilities_mounts_env_and_probes() {
    let m = manifest::load().unwrap();
    let spec = m.pod_spec().unwrap();
    let agent = container(spec, "kube-flannel");
    let args = agent.args.clone().unwrap();
    assert_eq!(args[0], "run");
    assert!(args.iter().any(|a| a == "--kube-subnet-mgr"));

    // Capabilities: exactly what the agent checks for at start with
    // these flags, which is what caps::DAEMONSET lists.
    let added: BTreeSet<&str> = agent
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.as_ref())
        .unwrap()
        .iter()
        .map(String::as_str)
        .collect();
    let datapath = match flag(&args, "--datapath") {
        Some("kernel") => flannel_agent::datapath::DatapathMode::Kernel,
        _ => flannel_agent::datapath::DatapathMode::Auto,
    };
    let needed: BTreeSet<&str> =
        caps::required(datapath, flag(&args, "--api-socket-group").is_some())
            .iter()
            .map(|c| c.name)
            .collect();
    assert_eq!(added, needed);
    let daemonset: BTreeSet<&str> = caps::DAEMONSET.iter().map(|c| c.name).collect();
    assert_eq!(added, daemonset);

    // Every path the agent writes is on a writable host mount; what it
    // only reads may be read-only.
    let path = |name: &str, default: &'static str| flag(&args, name).unwrap_or(default).to_string();
    for p in [
        path("--run-dir", defaults::RUN_DIR),
        path("--subnet-file", defaults::SUBNET_FILE),
        path("--bpf-dir", defaults::BPF_DIR),
    ] {
        assert!(writable(spec, agent, &p), "{p} is not on a writable mount");
    }
    assert_eq!(
        mount_of(spec, agent, &path("--bpf-dir", defaults::BPF_DIR)).map(|m| m.0),
        Some("/sys/fs/bpf".into()),
        "pins must be on the host's bpffs to outlive the container"
    );
    assert!(
        mount_of(spec, agent, &path("--cni-data-dir", defaults::CNI_DATA_DIR))
            .is_some_and(|(src, _)| src == "/var/lib/cni")
    );
    assert_eq!(
        mount_of(
            spec,
            agent,
            &path("--net-config-path", defaults::NET_CONFIG)
        ),
        Some(("configmap".into(), true))
    );
    assert!(Path::new(&path("--net-config-path", defaults::NET_CONFIG)).ends_with("net-conf.json"));

    // The downward API gives the kube store its node.
    let env: Vec<(String, String)> = agent
        .env
        .iter()
        .flatten()
        .map(|e| {
            let field = e
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.clone())
                .unwrap_or_default();
            (e.name.clone(), field)
        })
        .collect();
    for (name, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert!(
            env.contains(&(name.to_string(), field.to_string())),
            "{name} from {field}: {env:?}"
        );
    }

    // Probes on the port the agent serves.
    let port: i32 = flag(&args, "--healthz-port")
        .expect("the probes need --healthz-port")
        .parse()
        .unwrap();
    assert_ne!(
        port, 10256,
        "kube-proxy's healthz port, also on the host network"
    );
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe.and_then(|p| p.http_get.as_ref()).unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            serde_json::to_value(&get.port).unwrap(),
            serde_json::json!(port)
        );
    }
    let ports: Vec<i32> = agent
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(ports, [port]);
}

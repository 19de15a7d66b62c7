//! A small kubelet for the lab: runs the DaemonSet's pod template from
//! `deploy/kube-flannel-ebpf.yml` under podman on one lab node, init
//! containers first, each with exactly the template's settings turned into
//! `podman run` flags (podman 4.3's `kube play` has no per-node hostPath
//! remapping, which the lab needs so that nodes on one machine do not
//! share `/run/flannel`). Whatever the template asks for that this does
//! not know how to honour is an error, so a manifest that grows a setting
//! makes the container tests fail until they run it too.
//!
//! What kubelet adds to every pod is added here as well: the downward API
//! variables, `KUBERNETES_SERVICE_HOST`/`_PORT` and the service account
//! volume.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use k8s_openapi::{
    api::core::v1::{Container, PodSpec},
    apimachinery::pkg::api::resource::Quantity,
};

use crate::podman::Podman;

/// Where a service account's files appear in every container.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What the pod runs with on this node.
pub struct PodContext<'a> {
    pub pod_name: String,
    pub namespace: String,
    pub node_name: String,
    /// The image for every container (the template's unless a rollout
    /// changes it).
    pub image: String,
    /// Host directory standing for a `hostPath` path on this node.
    pub host_path: &'a dyn Fn(&str) -> Result<PathBuf>,
    /// Where the ConfigMap's files are written for this pod.
    pub config_dir: PathBuf,
    /// The service account volume's directory and kubelet's variables.
    pub service_account: Option<(PathBuf, Vec<(String, String)>)>,
    /// Capabilities to take out of every container's `add` (the tests'
    /// "one capability removed").
    pub without_caps: Vec<String>,
    /// Arguments appended to the pod's (not the init containers')
    /// container, as a JSON patch of the DaemonSet would add them.
    pub extra_args: Vec<String>,
}

/// `podman run` arguments for container `c` of `spec`, named `name`:
/// detached for the pod's container, run to completion for an init
/// container.
pub fn run_args(
    spec: &PodSpec,
    c: &Container,
    ctx: &PodContext,
    name: &str,
    detach: bool,
) -> Result<Vec<String>> {
    let mut a: Vec<String> = vec!["run".into(), "--name".into(), name.into()];
    a.push(if detach { "--detach" } else { "--rm" }.into());
    a.extend(["--pull".into(), "never".into()]);
    if spec.host_network != Some(true) {
        bail!("the lab runs only hostNetwork pods (each node is a network namespace)");
    }
    // The node's namespace is the one podman runs in.
    a.extend(["--network".into(), "host".into()]);
    if spec.host_pid == Some(true) || spec.host_ipc == Some(true) {
        bail!("hostPID/hostIPC: not emulated");
    }

    let sc = c.security_context.clone().unwrap_or_default();
    let psc = spec.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        a.push("--privileged".into());
    }
    if sc.allow_privilege_escalation == Some(false) {
        a.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    if sc.read_only_root_filesystem == Some(true) {
        // Kubernetes adds no tmpfs to a read-only root; podman would.
        a.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if let Some(caps) = &sc.capabilities {
        for d in caps.drop.iter().flatten() {
            a.extend(["--cap-drop".into(), d.to_ascii_lowercase()]);
        }
        for add in caps.add.iter().flatten() {
            if !ctx.without_caps.iter().any(|w| w == add) {
                a.extend(["--cap-add".into(), add.clone()]);
            }
        }
    }
    // Kubernetes runs pods unconfined unless a profile is named.
    let seccomp = sc
        .seccomp_profile
        .as_ref()
        .or(psc.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    match seccomp {
        Some("RuntimeDefault") => {}
        None | Some("Unconfined") => {
            a.extend(["--security-opt".into(), "seccomp=unconfined".into()]);
        }
        Some(other) => bail!("seccompProfile {other}: not emulated"),
    }
    let user = sc.run_as_user.or(psc.run_as_user);
    let group = sc.run_as_group.or(psc.run_as_group);
    match (user, group) {
        (Some(u), Some(g)) => a.extend(["--user".into(), format!("{u}:{g}")]),
        (Some(u), None) => a.extend(["--user".into(), u.to_string()]),
        (None, Some(_)) => bail!("runAsGroup without runAsUser: not emulated"),
        (None, None) => {}
    }
    if sc.se_linux_options.is_some() || sc.windows_options.is_some() {
        bail!("seLinuxOptions/windowsOptions: not emulated");
    }

    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let field = from
                    .field_ref
                    .as_ref()
                    .with_context(|| format!("env {}: only fieldRef is emulated", e.name))?;
                match field.field_path.as_str() {
                    "spec.nodeName" => ctx.node_name.clone(),
                    "metadata.name" => ctx.pod_name.clone(),
                    "metadata.namespace" => ctx.namespace.clone(),
                    other => bail!("env {}: fieldRef {other} is not emulated", e.name),
                }
            }
            _ => String::new(),
        };
        a.extend(["--env".into(), format!("{}={value}", e.name)]);
    }
    if c.env_from.is_some() {
        bail!("envFrom: not emulated");
    }
    if spec.automount_service_account_token != Some(false) {
        if let Some((dir, env)) = &ctx.service_account {
            for (k, v) in env {
                a.extend(["--env".into(), format!("{k}={v}")]);
            }
            a.extend([
                "--volume".into(),
                format!("{}:{SERVICE_ACCOUNT_DIR}:ro", dir.display()),
            ]);
        }
    }

    for m in c.volume_mounts.iter().flatten() {
        let vol = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .with_context(|| format!("volumeMount {} names no volume", m.name))?;
        let source = if let Some(h) = &vol.host_path {
            (ctx.host_path)(&h.path)?
        } else if vol.config_map.is_some() {
            ctx.config_dir.clone()
        } else {
            bail!(
                "volume {}: only hostPath and configMap are emulated",
                vol.name
            );
        };
        if m.sub_path.is_some() || m.sub_path_expr.is_some() {
            bail!("volumeMount {}: subPath is not emulated", m.name);
        }
        let mut opts = vec![if m.read_only == Some(true) {
            "ro"
        } else {
            "rw"
        }];
        match m.mount_propagation.as_deref() {
            None | Some("None") => {}
            Some("HostToContainer") => opts.push("rslave"),
            Some("Bidirectional") => opts.push("rshared"),
            Some(other) => bail!("mountPropagation {other}: unknown"),
        }
        a.extend([
            "--volume".into(),
            format!("{}:{}:{}", source.display(), m.mount_path, opts.join(",")),
        ]);
    }

    if let Some(limits) = c.resources.as_ref().and_then(|r| r.limits.as_ref()) {
        for (k, q) in limits {
            match k.as_str() {
                "memory" => a.extend(["--memory".into(), memory(q)?]),
                "cpu" => a.extend(["--cpus".into(), cpus(q)?]),
                other => bail!("limit {other}: not emulated"),
            }
        }
    }

    let command = c
        .command
        .as_ref()
        .context("the lab needs each container's command (the image has no shell)")?;
    a.extend([
        "--entrypoint".into(),
        serde_json::to_string(command).expect("strings encode"),
    ]);
    a.push(ctx.image.clone());
    a.extend(c.args.iter().flatten().cloned());
    Ok(a)
}

/// A memory quantity in podman's units.
fn memory(q: &Quantity) -> Result<String> {
    let s = q.0.as_str();
    for (suffix, unit) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(n) = s.strip_suffix(suffix) {
            let n: u64 = n.parse().with_context(|| format!("memory {s}"))?;
            return Ok(format!("{n}{unit}"));
        }
    }
    let bytes: u64 = s
        .parse()
        .with_context(|| format!("memory {s}: unsupported unit"))?;
    Ok(bytes.to_string())
}

/// A CPU quantity as podman's `--cpus`.
fn cpus(q: &Quantity) -> Result<String> {
    let s = q.0.as_str();
    let cpus = match s.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().with_context(|| format!("cpu {s}"))? / 1000.0,
        None => s.parse::<f64>().with_context(|| format!("cpu {s}"))?,
    };
    Ok(format!("{cpus}"))
}

/// Makes the `DirectoryOrCreate` host paths and checks the `Directory`
/// ones exist, as kubelet does before it starts a pod.
fn host_dirs(spec: &PodSpec, ctx: &PodContext) -> Result<()> {
    for vol in spec.volumes.iter().flatten() {
        let Some(h) = &vol.host_path else { continue };
        let dir = (ctx.host_path)(&h.path)?;
        match h.type_.as_deref() {
            Some("DirectoryOrCreate") => std::fs::create_dir_all(&dir)?,
            Some("Directory") if dir.is_dir() => {}
            Some("Directory") => bail!(
                "hostPath {} ({}) is not a directory on the node",
                h.path,
                dir.display()
            ),
            other => bail!("hostPath type {other:?}: not emulated"),
        }
    }
    Ok(())
}

/// Writes the ConfigMap's files, runs every init container to completion
/// (a failure stops the pod, with their output, as kubelet does), then
/// starts the container. Returns its name.
pub fn start_pod(
    podman: &Podman,
    spec: &PodSpec,
    ctx: &PodContext,
    config: &std::collections::BTreeMap<String, String>,
) -> Result<String> {
    host_dirs(spec, ctx)?;
    std::fs::create_dir_all(&ctx.config_dir)?;
    for (file, text) in config {
        std::fs::write(ctx.config_dir.join(file), text)?;
    }
    let mut log = String::new();
    for c in spec.init_containers.iter().flatten() {
        let name = format!("{}-{}", ctx.pod_name, c.name);
        let args = run_args(spec, c, ctx, &name, false)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = podman.output(&args)?;
        log.push_str(&String::from_utf8_lossy(&out.stdout));
        log.push_str(&String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("init container {} failed ({}): {log}", c.name, out.status);
        }
    }
    let [c] = spec.containers.as_slice() else {
        bail!("the lab runs pods of one container");
    };
    let name = format!("{}-{}", ctx.pod_name, c.name);
    let mut args = run_args(spec, c, ctx, &name, true)?;
    args.extend(ctx.extra_args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman.run(&args)?;
    Ok(name)
}

/// Loads an image archive made by `cargo xtask image` into `podman`'s
/// store and tags it `reference`.
pub fn load_image(podman: &Podman, archive: &Path, reference: &str) -> Result<()> {
    if !archive.is_file() {
        bail!(
            "{} is missing: run `cargo xtask image` (cargo xtask test does)",
            archive.display()
        );
    }
    let loaded = podman.run(&["load", "--quiet", "--input", &archive.display().to_string()])?;
    // "Loaded image: <name>" (podman 4).
    let name = loaded
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .or_else(|| {
            loaded
                .lines()
                .find_map(|l| l.strip_prefix("Loaded image(s): "))
        })
        .with_context(|| format!("podman load said {loaded:?}"))?
        .trim()
        .to_string();
    if name != reference {
        podman.run(&["tag", &name, reference])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    #[test]
    fn quantities_become_podman_units() {
        assert_eq!(memory(&q("256Mi")).unwrap(), "256m");
        assert_eq!(memory(&q("1Gi")).unwrap(), "1g");
        assert_eq!(memory(&q("1048576")).unwrap(), "1048576");
        assert!(memory(&q("1.5Gi")).is_err());
        assert_eq!(cpus(&q("100m")).unwrap(), "0.1");
        assert_eq!(cpus(&q("1")).unwrap(), "1");
        assert!(cpus(&q("x")).is_err());
    }

    #[test]
    fn the_template_becomes_podman_flags() {
        let m = crate::manifest::load().unwrap();
        let spec = m.pod_spec().unwrap();
        let host = |p: &str| Ok(PathBuf::from(format!("/lab/n1{p}")));
        let ctx = PodContext {
            pod_name: "kube-flannel-ds-n1".into(),
            namespace: "kube-flannel".into(),
            node_name: "node1".into(),
            image: "localhost/flannel-ebpf:a".into(),
            host_path: &host,
            config_dir: "/lab/cfg".into(),
            service_account: Some(("/lab/sa".into(), vec![("K".into(), "V".into())])),
            without_caps: vec!["BPF".into()],
            extra_args: vec![],
        };
        let agent = &spec.containers[0];
        let a = run_args(spec, agent, &ctx, "c", true).unwrap().join(" ");
        for want in [
            "--network host",
            "--read-only --read-only-tmpfs=false",
            "--security-opt no-new-privileges",
            "--cap-drop all",
            "--cap-add NET_ADMIN",
            "--cap-add PERFMON",
            "--env NODE_NAME=node1",
            "--env POD_NAMESPACE=kube-flannel",
            "--env K=V",
            "--volume /lab/sa:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            "--volume /lab/n1/sys/fs/bpf:/sys/fs/bpf:rw,rslave",
            "--volume /lab/n1/var/lib/cni:/var/lib/cni:ro",
            "--volume /lab/cfg:/etc/kube-flannel/:ro",
            "--memory 256m",
            "--entrypoint [\"/usr/local/bin/flannel-agent\"] localhost/flannel-ebpf:a run",
        ] {
            assert!(a.contains(want), "{want:?} not in {a}");
        }
        assert!(!a.contains("--cap-add BPF"), "removed capability kept: {a}");
        assert!(!a.contains("--privileged"));
    }
}

//! A real container runtime on a lab node: podman 4 with its CNI network
//! backend, containers from a local busybox root filesystem (no registry
//! is reachable), runc and cgroupfs.
//!
//! Everything podman keeps stays in the test's directory: storage, run
//! root, runc's state, and the CNI result cache libcni writes to
//! `/var/lib/cni` (podman 4.3 has no setting for it). For that, every
//! podman call runs in one private mount namespace per node, held open by
//! a `sleep`, where `/var/lib` is the test's directory and `/run/netns`
//! a private tmpfs for the containers' namespaces; nothing of it is
//! visible on the host, and it all goes when the holder is killed.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::lab::REFERENCE_PLUGINS;

pub struct Podman {
    node_ns: String,
    dir: PathBuf,
    holder: Child,
}

/// A root filesystem of busybox-static and its applets under `dir`.
pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = Path::new("/bin/busybox");
    let elf = std::fs::read(busybox).context("reading /bin/busybox (busybox-static)")?;
    // A dynamic busybox would need its libraries inside the rootfs.
    if elf
        .windows(b"/lib64/ld-linux".len())
        .any(|w| w == b"/lib64/ld-linux")
    {
        bail!("/bin/busybox is dynamically linked; install busybox-static");
    }
    std::fs::write(root.join("bin/busybox"), &elf)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    for applet in [
        "sh", "sleep", "ping", "ip", "nc", "cat", "wget", "httpd", "ls",
    ] {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    Ok(root)
}

impl Podman {
    /// podman for the node in network namespace `node_ns`, with its state
    /// under `dir`, CNI configs from `conf_dir` and plugins from
    /// `bin_dir` then the reference plugins.
    pub fn new(node_ns: &str, dir: &Path, conf_dir: &Path, bin_dir: &Path) -> Result<Self> {
        for d in ["storage", "run", "runc", "tmp", "varlib/cni"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let (nofile, nproc) = (1024, 1024);
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                r#"[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{dir}/events.log"
tmp_dir = "{dir}/tmp"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}", "{REFERENCE_PLUGINS}"]
network_config_dir = "{conf}"
"#,
                dir = dir.display(),
                bin = bin_dir.display(),
                conf = conf_dir.display(),
            ),
        )?;
        let script = format!(
            "mount --bind {} /var/lib && mount -t tmpfs podman-netns /run/netns && echo ready && exec sleep 1000000",
            dir.join("varlib").display()
        );
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the mount namespace holder")?;
        let mut line = String::new();
        BufReader::new(holder.stdout.take().context("no stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = holder.kill();
            let _ = holder.wait();
            bail!("podman's mount namespace could not be set up");
        }
        Ok(Self {
            node_ns: node_ns.to_string(),
            dir: dir.to_path_buf(),
            holder,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let d = |s: &str| self.dir.join(s).display().to_string();
        let mut cmd = Command::new("nsenter");
        // nsenter opens both namespaces before entering either, so the
        // node's namespace is found on the host's /run/netns.
        cmd.arg(format!("--net=/run/netns/{}", self.node_ns))
            .arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .arg("podman")
            .args(["--root", &d("storage"), "--runroot", &d("run")])
            .args(["--storage-driver", "vfs"])
            .args(["--runtime-flag", &format!("root={}", d("runc"))])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `podman <args>`; fails with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "podman {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("running podman {args:?}"))
    }

    /// Removes runc's state of a container that has exited, so that it
    /// can be started again: conmon's clean-up runs podman without this
    /// instance's runc root and leaves that state behind.
    pub fn forget_runc_state(&self, container: &str) -> Result<()> {
        let id = self.run(&["inspect", "--format", "{{.Id}}", container])?;
        let out = Command::new("runc")
            .arg("--root")
            .arg(self.dir.join("runc"))
            .args(["delete", "--force", &id])
            .output()
            .context("running runc delete")?;
        let err = String::from_utf8_lossy(&out.stderr);
        // Podman's own clean-up may have got there first.
        if !out.status.success() && !err.contains("does not exist") {
            bail!("runc delete {id}: {}", err.trim());
        }
        Ok(())
    }

    /// Files in libcni's result cache (podman's view of live attachments).
    pub fn cni_cache(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("varlib/cni/results"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.output(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

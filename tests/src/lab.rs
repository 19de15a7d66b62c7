//! The lab builder. See the crate docs for the shape of a lab.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use flannel_agent::{
    api::{self, Request},
    config::{BackendType, NetConfig},
    datapath::ebpf,
    mac::MacAddr,
    subnet::{env::SubnetEnv, local::LocalStore, LeaseAttrs, LeaseTiming},
};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::netns::{exec, ip, sh};

/// How a lab node runs its network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// `flannel-agent --datapath ebpf`.
    Ebpf,
    /// `flannel-agent --datapath kernel`: no eBPF, pure Flannel behaviour.
    Kernel,
    /// No agent: set up with `ip` exactly the way stock Flannel's VXLAN
    /// backend programs a node (the interop reference).
    StockFlannel,
}

#[derive(Clone, Copy, Debug)]
pub struct NodeSpec {
    pub kind: NodeKind,
    pub pods: usize,
    /// Arguments for this node's agent only, after the lab's.
    pub args: &'static [&'static str],
    /// On the far node network ([`FAR_NET`]), reached through the fabric's
    /// router: not on the other nodes' L2 network.
    pub far: bool,
}

impl NodeSpec {
    pub const fn new(kind: NodeKind, pods: usize) -> Self {
        Self {
            kind,
            pods,
            args: &[],
            far: false,
        }
    }

    pub const fn with_args(self, args: &'static [&'static str]) -> Self {
        Self { args, ..self }
    }

    /// The node sits on [`FAR_NET`], one routed hop away.
    pub const fn far(self) -> Self {
        Self { far: true, ..self }
    }
}

pub const VNI: u32 = 1;
pub const PORT: u16 = 4789;
pub const POD_MTU: u32 = 1450;
/// The fabric bridge's own address: where lab-wide services (etcd, the
/// fake API server) listen, and the nodes' default gateway.
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 254);
/// A second node network on the same fabric bridge: its nodes reach the
/// others only through the fabric namespace, which routes between the two
/// (a node there is not on-link for DirectRouting or host-gw).
pub const FAR_NET: [u8; 3] = [172, 30, 1];
/// Dual-stack labs: the IPv6 node network (node `n` is `fd00:30::n`) and
/// the fabric's address on it.
pub const NODE_NET6: &str = "fd00:30::/64";
pub const FABRIC_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 0xfe);
/// The fabric's address on [`FAR_NET`], the far nodes' default gateway.
pub const FAR_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 30, 1, 254);
/// Dual-stack labs: the far nodes' IPv6 network (node `n` is
/// `fd00:31::n`) and the fabric's address on it, their gateway.
pub const FAR_NET6: u16 = 0x31;
pub const FAR_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, FAR_NET6, 0, 0, 0, 0, 0, 0xfe);
/// The CNI network name (Flannel's conflist calls it `cbr0`).
pub const CNI_NETWORK: &str = "cbr0";
/// The lab's net-conf.json.
pub const NET_CONF: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1,"Port":4789}}"#;

/// Where the lab's agents keep their leases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LabStore {
    /// The embedded file store, shared through the lab's directory.
    #[default]
    Local,
    /// Agents use `--subnet-mgr etcd` against this endpoint; the caller
    /// runs etcd and writes the lab's config and stock-Flannel leases.
    Etcd(String),
    /// Agents use `--kube-subnet-mgr` against this API server URL; the
    /// caller serves Node objects.
    Kube(String),
}

#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    pub store: LabStore,
    /// Extra `flannel-agent run` arguments for every agent.
    pub agent_args: Vec<String>,
    /// Called once the fabric exists and before any agent starts (starts
    /// the store's server, writes the config and stock-Flannel leases).
    pub before_agents: Option<fn(&mut Lab) -> Result<()>>,
    /// net-conf.json for the lab (default [`NET_CONF`]).
    pub net_conf: Option<String>,
    /// Agents install the plugin and their node's conflist into the
    /// node's own CNI directories (`--install-cni`).
    pub install_cni: bool,
    /// `--resync-secs` (default 2).
    pub resync_secs: Option<u64>,
    /// MTU of the node network (the fabric bridge, its ports and every
    /// node's `eth0`); default 1500. Pods get 50 bytes less, as Flannel's
    /// VXLAN backend gives them.
    pub uplink_mtu: Option<u32>,
    /// Run every agent as the DaemonSet does: the pod template of
    /// `deploy/kube-flannel-ebpf.yml` under podman in the node's
    /// namespace, with in-cluster config against the fake API server
    /// (the store must be [`LabStore::Kube`]). `agent_args`,
    /// `install_cni` and `resync_secs` do not apply: the manifest decides.
    pub containers: Option<ContainerOptions>,
}

/// How the lab runs its agents in containers.
#[derive(Clone, Debug, Default)]
pub struct ContainerOptions {
    /// The image tag (`target/image/flannel-ebpf-<tag>.tar`, made by
    /// `cargo xtask image`); empty: the manifest's.
    pub tag: String,
    /// Capabilities taken out of the agent's `add` list.
    pub without_caps: Vec<String>,
    /// Arguments appended to the agent's, as the README's `kubectl patch`
    /// adds them (`--datapath=kernel` on the way back to Flannel).
    pub extra_args: Vec<String>,
}

/// A node's agent running as a pod: its podman (which keeps the images
/// loaded on this node) and its container.
pub struct AgentPod {
    pub podman: crate::podman::Podman,
    pub container: String,
}

/// A process the lab runs in one of its namespaces (etcd, say), killed
/// when the lab ends; stoppable and restartable with the same arguments.
pub struct Service {
    pub name: String,
    ns: String,
    argv: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

/// A command that runs inside network namespace `ns` (setns before exec;
/// `ip netns exec` would remount /sys and hide bpffs).
pub fn command_in_netns(program: impl AsRef<std::ffi::OsStr>, ns: &str) -> Result<Command> {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening netns {ns}"))?;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (setns, sigprocmask) between
    // fork and exec. The closure owns the namespace file; it closes when
    // the Command drops.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The run's signal thread blocks SIGINT/SIGTERM/SIGHUP here, and
            // a mask survives exec: the lab's processes get them again.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    Ok(cmd)
}

#[derive(Clone, Debug)]
pub struct Pod {
    /// Namespace name.
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Dual-stack labs: the pod's IPv6 address.
    pub ip6: Option<Ipv6Addr>,
    pub mac: MacAddr,
    /// Host side of the veth, inside the node namespace.
    pub host_if: String,
    /// The CNI container ID the pod was added with.
    pub container_id: String,
    /// The ADD result (a CHECK's `prevResult`).
    pub result: serde_json::Value,
}

pub struct Node {
    pub ns: String,
    pub kind: NodeKind,
    /// On [`FAR_NET`] (see [`NodeSpec::far`]).
    pub far: bool,
    /// The lab's backend, as this node advertises it.
    pub backend: BackendType,
    pub ip: Ipv4Addr,
    /// Dual-stack labs: the node's IPv6, its IPv6 lease and the VtepMAC
    /// of its `flannel-v6.1`.
    pub ip6: Option<Ipv6Addr>,
    pub subnet6: Option<Ipv6Net>,
    pub vtep6_mac: MacAddr,
    pub subnet: Ipv4Net,
    pub vtep_mac: MacAddr,
    pub bpf_dir: PathBuf,
    pub run_dir: PathBuf,
    pub pods: Vec<Pod>,
    agent: Option<Child>,
    /// The agent's pod, in container mode.
    pub agent_pod: Option<AgentPod>,
    /// Arguments for this node's agent only ([`NodeSpec::with_args`]).
    pub agent_args: &'static [&'static str],
}

impl Node {
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    /// The lease attrs this node advertises (as Flannel writes them).
    pub fn attrs(&self) -> LeaseAttrs {
        let attrs = match self.backend {
            BackendType::Vxlan => LeaseAttrs::vxlan(self.ip, VNI, self.vtep_mac),
            BackendType::HostGw => LeaseAttrs::host_gw(self.ip),
        };
        match (self.ip6, self.subnet6) {
            (Some(ip6), Some(_)) => attrs.with_v6(ip6, VNI, self.vtep6_mac),
            _ => attrs,
        }
    }

    /// The pods' IPv6 gateway (dual-stack labs).
    pub fn gateway6(&self) -> Option<Ipv6Addr> {
        self.subnet6
            .map(|s| Ipv6Addr::from(u128::from(s.network()) + 1))
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.run_dir.join("subnet.env")
    }

    /// What stands for the host's `/var/lib/cni` on this node.
    pub fn var_lib_cni(&self) -> PathBuf {
        self.run_dir.join("var-lib-cni")
    }

    /// The CNI plugin's dataDir (attachment records).
    pub fn cni_dir(&self) -> PathBuf {
        self.var_lib_cni().join("flannel")
    }

    /// host-local's dataDir.
    pub fn ipam_dir(&self) -> PathBuf {
        self.var_lib_cni().join("networks")
    }

    /// What stands for the host's `/sys/fs/bpf` on this node (container
    /// mode): a directory of the real bpffs.
    pub fn bpffs(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.ns))
    }

    /// Whether an agent runs on this node (process or container).
    pub fn has_agent(&self) -> bool {
        self.agent.is_some() || self.agent_pod.is_some()
    }

    /// Where `--install-cni` puts the plugin and the conflist.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.run_dir.join("cni-bin")
    }

    pub fn cni_conf_dir(&self) -> PathBuf {
        self.run_dir.join("net.d")
    }

    /// The agent's status, if it answers.
    pub fn status(&self) -> Result<api::Status> {
        api::call(&self.socket(), &Request::Status {})?
            .status
            .context("agent sent no status")
    }

    /// Counters of this node's data path, by name.
    pub fn counters(&self) -> Result<std::collections::HashMap<&'static str, u64>> {
        Ok(ebpf::read_counters(&self.bpf_dir)?.into_iter().collect())
    }
}

pub struct Lab {
    pub id: String,
    pub fabric: String,
    pub nodes: Vec<Node>,
    pub dir: PathBuf,
    pub opts: LabOptions,
    pub services: Vec<Service>,
    /// Things the lab keeps alive until it ends (a fake API server).
    pub extras: Vec<Box<dyn std::any::Any>>,
    namespaces: Vec<String>,
}

/// A short id unique to this run (and to each lab inside it).
pub fn unique_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = std::process::id()
        ^ nanos.rotate_left(7)
        ^ SEQ
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9);
    let id = format!("fl{:06x}", mix & 0xff_ffff);
    crate::interrupt::remember(&id);
    id
}

/// Path of the agent binary: `FLANNEL_AGENT_BIN`, or next to the test binary.
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLANNEL_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    built_bin("flannel-agent")
}

/// A binary of this workspace (`flannel-agent`, `flannel`), found next
/// to the running executable.
pub fn built_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join(name);
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "{name} binary not found near {} (run `cargo build -p flannel-agent`)",
        exe.display()
    )
}

/// Where the Debian package `containernetworking-plugins` puts the
/// reference plugins (host-local, bridge, portmap).
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// `CNI_PATH` for the lab: the directory with the built `flannel`
/// plugin, then the reference plugins.
pub fn cni_path() -> Result<String> {
    let flannel = built_bin("flannel")?;
    let dir = flannel.parent().context("plugin has no directory")?;
    Ok(format!("{}:{REFERENCE_PLUGINS}", dir.display()))
}

pub fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// One plugin run: exit status, stdout (JSON when it parses), stderr.
#[derive(Debug)]
pub struct CniCall {
    pub success: bool,
    pub stdout: serde_json::Value,
    pub raw: String,
    pub stderr: String,
}

impl CniCall {
    /// The result, or an error carrying the plugin's error object.
    pub fn ok(self) -> Result<serde_json::Value> {
        if !self.success {
            bail!("CNI call failed: {} {}", self.raw, self.stderr);
        }
        Ok(self.stdout)
    }
}

/// Runs a CNI command in node namespace `node_ns` the way a runtime does:
/// the plugin of the config's `type`, found in [`cni_path`].
pub fn cni_in(
    node_ns: &str,
    command: &str,
    container_id: &str,
    netns: &str,
    ifname: &str,
    conf: &serde_json::Value,
) -> Result<CniCall> {
    cni_in_path(
        &cni_path()?,
        node_ns,
        command,
        container_id,
        netns,
        ifname,
        conf,
    )
}

/// [`cni_in`] with the plugins of `path` (a `CNI_PATH`).
pub fn cni_in_path(
    path: &str,
    node_ns: &str,
    command: &str,
    container_id: &str,
    netns: &str,
    ifname: &str,
    conf: &serde_json::Value,
) -> Result<CniCall> {
    let plugin = conf["type"].as_str().context("config has no type")?;
    let bin = path
        .split(':')
        .map(|d| PathBuf::from(d).join(plugin))
        .find(|p| p.is_file())
        .with_context(|| format!("CNI plugin {plugin} not found in {path}"))?;
    run_cni_with(
        command_in_netns(bin, node_ns)?,
        path,
        command,
        container_id,
        netns,
        ifname,
        &serde_json::to_vec(conf)?,
    )
}

/// Runs a CNI plugin command: `cmd` (already placed in its namespace),
/// the `CNI_*` variables, `conf` on stdin.
pub fn run_cni(
    cmd: Command,
    command: &str,
    container_id: &str,
    netns: &str,
    ifname: &str,
    conf: &serde_json::Value,
) -> Result<CniCall> {
    run_cni_raw(
        cmd,
        command,
        container_id,
        netns,
        ifname,
        &serde_json::to_vec(conf)?,
    )
}

/// [`run_cni`] with any bytes on stdin (malformed input tests); empty
/// values leave their variable empty.
pub fn run_cni_raw(
    cmd: Command,
    command: &str,
    container_id: &str,
    netns: &str,
    ifname: &str,
    stdin: &[u8],
) -> Result<CniCall> {
    run_cni_with(
        cmd,
        &cni_path()?,
        command,
        container_id,
        netns,
        ifname,
        stdin,
    )
}

fn run_cni_with(
    mut cmd: Command,
    path: &str,
    command: &str,
    container_id: &str,
    netns: &str,
    ifname: &str,
    stdin: &[u8],
) -> Result<CniCall> {
    use std::io::Write;
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting a CNI plugin")?;
    child.stdin.take().context("no stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(CniCall {
        success: out.status.success(),
        stdout: serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null),
        raw,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

impl Lab {
    /// Builds the fabric, the nodes (agents started and ready) and the pods.
    pub fn new(specs: &[NodeSpec]) -> Result<Self> {
        Self::with(specs, LabOptions::default())
    }

    pub fn with(specs: &[NodeSpec], opts: LabOptions) -> Result<Self> {
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("flannel-lab-{id}"));
        std::fs::create_dir_all(&dir)?;
        let mut lab = Lab {
            fabric: format!("{id}-fab"),
            id,
            nodes: Vec::new(),
            dir,
            opts,
            services: Vec::new(),
            extras: Vec::new(),
            namespaces: Vec::new(),
        };
        lab.build(specs)?;
        Ok(lab)
    }

    /// The node network's MTU (see [`LabOptions::uplink_mtu`]).
    pub fn uplink_mtu(&self) -> u32 {
        self.opts.uplink_mtu.unwrap_or(1500)
    }

    /// The pods' MTU: the node network's less the VXLAN overhead
    /// ([`POD_MTU`] on the default node network); host-gw's pods get the
    /// node network's.
    pub fn pod_mtu(&self) -> u32 {
        match self.backend() {
            BackendType::HostGw => self.uplink_mtu(),
            BackendType::Vxlan => self.uplink_mtu() - (1500 - POD_MTU),
        }
    }

    /// The lab's net-conf.json, parsed.
    pub fn net_config(&self) -> NetConfig {
        NetConfig::parse(&self.net_conf_text()).expect("the lab's net-conf.json is valid")
    }

    pub fn backend(&self) -> BackendType {
        self.net_config().backend.kind
    }

    /// Whether the lab's config has IPv6 (`EnableIPv6`: dual-stack or
    /// IPv6-only).
    pub fn dual(&self) -> bool {
        self.net_config().enable_ipv6
    }

    /// Whether the lab is an IPv6-only cluster (`EnableIPv4: false`): its
    /// node network is IPv6 alone, and nodes and pods have no IPv4
    /// address (their `ip` is `0.0.0.0`, their `subnet` Flannel's empty
    /// one).
    pub fn ipv6_only(&self) -> bool {
        !self.net_config().enable_ipv4
    }

    /// Whether nodes `i` and `j` route pod traffic to each other directly
    /// (unencapsulated), as Flannel decides it: host-gw, or DirectRouting
    /// between nodes on one L2 network. Both families alike: a far node
    /// is far on its IPv4 and its IPv6 network.
    pub fn direct_between(&self, i: usize, j: usize) -> bool {
        let cfg = self.net_config();
        let same_link = self.nodes[i].far == self.nodes[j].far;
        same_link && (cfg.backend.kind == BackendType::HostGw || cfg.backend.direct_routing)
    }

    /// A fresh namespace `<lab id>-<suffix>`, removed with the lab.
    pub fn netns(&mut self, suffix: &str) -> Result<String> {
        let name = format!("{}-{suffix}", self.id);
        self.add_ns(&name)?;
        Ok(name)
    }

    /// A host on the node network that is not a node (holds no lease):
    /// namespace `<lab id>-<suffix>` with `eth0` on the fabric at `addr`.
    pub fn add_fabric_host(&mut self, suffix: &str, addr: Ipv4Addr) -> Result<String> {
        let ns = self.netns(suffix)?;
        let port = format!("h-{suffix}");
        ip(&[
            "-n",
            &self.fabric,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        ip(&[
            "-n",
            &self.fabric,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        if self.dual() {
            // Addresses usable at once (no duplicate address detection),
            // and no router advertisements to follow.
            for key in ["all", "default"] {
                sysctl(name, &format!("net.ipv6.conf.{key}.accept_dad"), "0")?;
                sysctl(name, &format!("net.ipv6.conf.{key}.accept_ra"), "0")?;
            }
            return Ok(());
        }
        // The lab is IPv4-only; IPv6 autoconfiguration would add noise to
        // the interface counters the tests compare.
        sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")?;
        sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(())
    }

    fn build(&mut self, specs: &[NodeSpec]) -> Result<()> {
        let fab = self.fabric.clone();
        self.add_ns(&fab)?;
        ip(&["-n", &fab, "link", "add", "br0", "type", "bridge"])?;
        // A bridge without an address of its own takes the lowest of its
        // ports' and changes it when a node joins with a lower one; every
        // node's neighbour entry for the fabric address (etcd, the API
        // server, the default gateway) then points nowhere until it is
        // probed again, up to tens of seconds later.
        let mtu = self.uplink_mtu().to_string();
        ip(&[
            "-n",
            &fab,
            "link",
            "set",
            "br0",
            "address",
            "0e:fa:b0:00:00:fe",
            "mtu",
            &mtu,
            "up",
        ])?;
        ip(&[
            "-n",
            &fab,
            "addr",
            "add",
            &format!("{FABRIC_IP}/24"),
            "dev",
            "br0",
        ])?;
        // The fabric routes between the node network and the far one.
        ip(&[
            "-n",
            &fab,
            "addr",
            "add",
            &format!("{FAR_GATEWAY}/24"),
            "dev",
            "br0",
        ])?;
        sysctl(&fab, "net.ipv4.ip_forward", "1")?;
        if self.dual() {
            for addr in [FABRIC_IP6, FAR_GATEWAY6] {
                let addr = format!("{addr}/64");
                ip(&["-n", &fab, "addr", "add", &addr, "dev", "br0", "nodad"])?;
            }
            sysctl(&fab, "net.ipv6.conf.all.forwarding", "1")?;
        }
        // A bridge port's packets routed back out of the same bridge would
        // otherwise draw ICMP redirects, which nodes would then follow.
        sysctl(&fab, "net.ipv4.conf.all.send_redirects", "0")?;
        sysctl(&fab, "net.ipv4.conf.br0.send_redirects", "0")?;
        for spec in specs {
            let i = self.create_node(spec.kind, spec.far)?;
            self.nodes[i].agent_args = spec.args;
        }
        std::fs::write(self.net_conf(), self.net_conf_text())?;
        if let Some(f) = self.opts.before_agents {
            f(self)?;
        }
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            std::fs::create_dir_all(&node.run_dir)?;
            if node.kind == NodeKind::StockFlannel {
                if self.opts.store == LabStore::Local {
                    self.local_store()?.put_dual(
                        node.subnet,
                        node.subnet6,
                        &node.attrs(),
                        Some(Duration::from_secs(3600)),
                    )?;
                }
                self.setup_stock_flannel(i)?;
            } else {
                // Flannel reuses the subnet of an existing subnet.env when
                // it is free: that keeps the lab's addresses predictable.
                let v4 = Some(("10.244.0.0/16".parse()?, node.subnet));
                let env = SubnetEnv::of(
                    v4.filter(|_| !self.ipv6_only()),
                    self.net_config().ipv6_network.zip(node.subnet6),
                    self.pod_mtu(),
                    false,
                );
                env.write(&node.subnet_file())?;
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].kind != NodeKind::StockFlannel {
                self.start_agent(i)?;
            }
        }
        self.wait_converged(Duration::from_secs(20))?;
        // The agents' leases may differ from what the lab guessed (a
        // podCIDR decides in the kube store).
        for i in 0..self.nodes.len() {
            if self.nodes[i].kind == NodeKind::StockFlannel && !self.nodes[i].has_agent() {
                self.program_stock_remotes(i)?;
            }
        }
        for (i, spec) in specs.iter().enumerate() {
            for _ in 0..spec.pods {
                self.add_pod(i)?;
            }
        }
        Ok(())
    }

    /// Adds node namespace number `len+1` to the fabric (no agent yet),
    /// on [`FAR_NET`] when `far`.
    fn create_node(&mut self, kind: NodeKind, far: bool) -> Result<usize> {
        let n = self.nodes.len() + 1;
        let fab = self.fabric.clone();
        let ns = format!("{}-n{n}", self.id);
        self.add_ns(&ns)?;
        let port = format!("n{n}");
        let mtu = self.uplink_mtu().to_string();
        ip(&[
            "-n", &fab, "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", "eth0",
            "mtu", &mtu, "netns", &ns,
        ])?;
        ip(&["-n", &fab, "link", "set", &port, "master", "br0", "up"])?;
        let (node_ip, gateway) = if far {
            let [a, b, c] = FAR_NET;
            (Ipv4Addr::new(a, b, c, n as u8), FAR_GATEWAY)
        } else {
            (Ipv4Addr::new(172, 30, 0, n as u8), FABRIC_IP)
        };
        // An IPv6-only lab's node network has no IPv4.
        let only6 = self.ipv6_only();
        let node_ip = if only6 {
            Ipv4Addr::UNSPECIFIED
        } else {
            node_ip
        };
        if !only6 {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{node_ip}/24"),
                "dev",
                "eth0",
            ])?;
        }
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        // A default route, so the agent finds its uplink as Flannel does
        // (in an IPv6-only lab the IPv6 one, below).
        if !only6 {
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
                "dev",
                "eth0",
                "onlink",
            ])?;
        }
        sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        let (ip6, subnet6) = if self.dual() {
            // The far nodes on their own IPv6 network too; each network
            // reaches the other through the fabric.
            let (net6, other, gateway6) = match far {
                true => (FAR_NET6, 0x30, FAR_GATEWAY6),
                false => (0x30, FAR_NET6, FABRIC_IP6),
            };
            let ip6 = Ipv6Addr::new(0xfd00, net6, 0, 0, 0, 0, 0, n as u16);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            let (gw6, other6) = (gateway6.to_string(), format!("fd00:{other:x}::/64"));
            ip(&[
                "-n", &ns, "-6", "route", "add", &other6, "via", &gw6, "dev", "eth0",
            ])?;
            if only6 {
                ip(&[
                    "-n", &ns, "-6", "route", "add", "default", "via", &gw6, "dev", "eth0",
                ])?;
            }
            sysctl(&ns, "net.ipv6.conf.all.forwarding", "1")?;
            let subnet6 =
                Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x10, 0x244, n as u16, 0, 0, 0, 0), 64)?;
            (Some(ip6), Some(subnet6))
        } else {
            (None, None)
        };
        // In a container the agent pins under the node's /sys/fs/bpf, at
        // its default place.
        let bpf_dir = if self.opts.containers.is_some() {
            PathBuf::from(format!("/sys/fs/bpf/{ns}/flannel"))
        } else {
            PathBuf::from(format!("/sys/fs/bpf/{ns}"))
        };
        self.nodes.push(Node {
            bpf_dir,
            run_dir: self.dir.join(format!("n{n}")),
            ns,
            kind,
            far,
            backend: self.backend(),
            ip: node_ip,
            ip6,
            subnet6,
            vtep6_mac: match (kind, ip6) {
                (NodeKind::StockFlannel, _) => MacAddr([0x0e, 0x66, 0, 0, 6, n as u8]),
                (_, Some(ip6)) => MacAddr::for_vtep6(ip6, VNI),
                (_, None) => MacAddr([0x0e, 0x66, 0, 0, 6, n as u8]),
            },
            subnet: match only6 {
                true => Ipv4Net::default(),
                false => Ipv4Net::new(Ipv4Addr::new(10, 244, n as u8, 0), 24)?,
            },
            vtep_mac: match kind {
                NodeKind::StockFlannel => MacAddr([0x0e, 0x66, 0, 0, 0, n as u8]),
                // What the agent derives for a fresh flannel.<VNI>.
                _ => MacAddr::for_vtep(node_ip, VNI),
            },
            pods: Vec::new(),
            agent: None,
            agent_pod: None,
            agent_args: &[],
        });
        Ok(n - 1)
    }

    /// A node joining the running lab: its namespace, then its agent, which
    /// takes a lease like any other node would.
    pub fn join_node(&mut self, kind: NodeKind) -> Result<usize> {
        self.join_node_on(kind, false)
    }

    /// [`Lab::join_node`], on [`FAR_NET`] when `far`.
    pub fn join_node_on(&mut self, kind: NodeKind, far: bool) -> Result<usize> {
        let i = self.create_node(kind, far)?;
        std::fs::create_dir_all(&self.nodes[i].run_dir)?;
        self.start_agent(i)?;
        Ok(i)
    }

    /// Like [`Lab::join_node`] but returns once the agent runs, ready or
    /// not, with `prefer` written to its subnet.env first.
    pub fn join_node_nowait(&mut self, kind: NodeKind, prefer: Option<Ipv4Net>) -> Result<usize> {
        let i = self.create_node(kind, false)?;
        std::fs::create_dir_all(&self.nodes[i].run_dir)?;
        if let Some(p) = prefer {
            SubnetEnv::new("10.244.0.0/16".parse()?, p, self.pod_mtu(), false)
                .write(&self.nodes[i].subnet_file())?;
        }
        self.spawn_agent(i)?;
        Ok(i)
    }

    /// Waits for node `i`'s agent to answer (and learns its subnet).
    pub fn wait_agent(&mut self, i: usize, timeout: Duration) -> Result<()> {
        self.wait_ready_within(i, timeout)
    }

    pub fn net_conf(&self) -> PathBuf {
        self.dir.join("net-conf.json")
    }

    pub fn net_conf_text(&self) -> String {
        self.opts
            .net_conf
            .clone()
            .unwrap_or_else(|| NET_CONF.to_string())
    }

    /// Starts a service in namespace `ns`, logging to the lab directory.
    pub fn start_service(&mut self, name: &str, ns: &str, argv: &[String]) -> Result<()> {
        let mut svc = Service {
            name: name.to_string(),
            ns: ns.to_string(),
            argv: argv.to_vec(),
            log: self.dir.join(format!("{name}.log")),
            child: None,
        };
        svc.start()?;
        self.services.push(svc);
        Ok(())
    }

    pub fn service(&mut self, name: &str) -> Result<&mut Service> {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name}"))
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// The lab's local store, as a test or another tool would open it.
    pub fn local_store(&self) -> Result<LocalStore> {
        Ok(LocalStore::open(&self.store_dir(), LeaseTiming::default())?)
    }

    /// Waits until every running agent has the lease of every other node in
    /// its data path.
    pub fn wait_converged(&self, timeout: Duration) -> Result<()> {
        let want = self.nodes.len() - 1;
        self.wait_for(
            timeout,
            "every agent to see every other node's lease",
            |lab| {
                lab.nodes
                    .iter()
                    .filter(|n| n.has_agent())
                    .all(|n| n.status().is_ok_and(|s| s.remote_leases == want))
            },
        )?;
        Ok(())
    }

    /// Polls `cond` every 20 ms until it holds or `timeout` passes.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&Lab) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        while !cond(self) {
            if start.elapsed() > timeout {
                let status: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("{}: {:?}", n.ns, n.status().ok()))
                    .collect();
                // The end of each agent's log, to tell a slow node from a
                // stuck one when this happens in CI.
                let logs: Vec<String> = (0..self.nodes.len())
                    .map(|i| {
                        let log = strip_ansi(&self.agent_log(i));
                        let lines: Vec<&str> = log.lines().collect();
                        let tail = lines[lines.len().saturating_sub(8)..].join("\n");
                        format!("--- {} agent log, last lines:\n{tail}", self.nodes[i].ns)
                    })
                    .collect();
                bail!(
                    "timed out after {timeout:?} waiting for {what}; {status:#?}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    }

    /// Starts (or restarts) node `i`'s agent and waits until it answers.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        self.spawn_agent(i)?;
        self.wait_ready(i)
    }

    fn spawn_agent(&mut self, i: usize) -> Result<()> {
        if let Some(c) = self.opts.containers.clone() {
            return self.start_agent_pod(i, &c);
        }
        let bin = agent_bin()?;
        let node = &self.nodes[i];
        std::fs::create_dir_all(&node.run_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.run_dir.join("agent.log"))?;
        let mode = match node.kind {
            NodeKind::Kernel => "kernel",
            _ => "ebpf",
        };
        let mut cmd = command_in_netns(bin, &node.ns)?;
        cmd.args(["run", "--datapath", mode])
            .arg("--net-config-path")
            .arg(self.net_conf())
            .arg("--subnet-file")
            .arg(node.subnet_file());
        match &self.opts.store {
            LabStore::Local => {
                cmd.args(["--subnet-mgr", "local", "--store-dir"])
                    .arg(self.store_dir());
            }
            LabStore::Etcd(endpoint) => {
                cmd.args(["--subnet-mgr", "etcd", "--etcd-endpoints", endpoint]);
            }
            LabStore::Kube(url) => {
                cmd.args(["--kube-subnet-mgr", "--kube-api-url", url, "--node-name"])
                    .arg(node_name(i));
            }
        }
        if self.opts.install_cni {
            let conf = node.run_dir.join("cni-conf.json");
            std::fs::write(&conf, serde_json::to_vec_pretty(&self.conflist(i))?)?;
            cmd.arg("--install-cni")
                .arg("--cni-bin-dir")
                .arg(node.cni_bin_dir())
                .arg("--cni-conf-dir")
                .arg(node.cni_conf_dir())
                .arg("--cni-conf-file")
                .arg(conf);
        }
        cmd.args(&self.opts.agent_args)
            .args(node.agent_args)
            .arg("--bpf-dir")
            .arg(&node.bpf_dir)
            .arg("--run-dir")
            .arg(&node.run_dir)
            .arg("--cni-data-dir")
            .arg(node.cni_dir())
            .arg("--resync-secs")
            .arg(self.opts.resync_secs.unwrap_or(2).to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting flannel-agent")?;
        self.nodes[i].agent = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self, i: usize) -> Result<()> {
        self.wait_ready_within(i, Duration::from_secs(20))
    }

    fn wait_ready_within(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(st) = self.nodes[i].status() {
                // The store decides the subnet; the lab follows it (an
                // IPv6-only node's lease is named by its IPv6 subnet).
                if let ipnet::IpNet::V4(subnet) = st.subnet.parse()? {
                    self.nodes[i].subnet = subnet;
                }
                if let Some(env) = SubnetEnv::read(&self.nodes[i].subnet_file()) {
                    if env.lease6().is_some() {
                        self.nodes[i].subnet6 = env.lease6();
                    }
                }
                return Ok(());
            }
            let exited = match self.nodes[i].agent.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                bail!(
                    "agent on {} exited ({status}): {}",
                    self.nodes[i].ns,
                    self.agent_log(i)
                );
            }
            if let Some(state) = self.agent_pod_state(i) {
                if state != "running" && state != "created" && state != "configured" {
                    bail!(
                        "agent container on {} is {state}: {}",
                        self.nodes[i].ns,
                        self.agent_log(i)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {} not ready after {timeout:?}: {}",
                    self.nodes[i].ns,
                    self.agent_log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn agent_log(&self, i: usize) -> String {
        if let Some(pod) = &self.nodes[i].agent_pod {
            return pod
                .podman
                .output(&["logs", &pod.container])
                .map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_default();
        }
        std::fs::read_to_string(self.nodes[i].run_dir.join("agent.log")).unwrap_or_default()
    }

    /// Remote subnets node `i`'s data path holds: the pinned trie (eBPF)
    /// and the kernel routes on flannel.1.
    pub fn remote_state(&self, i: usize) -> (Vec<Ipv4Net>, Vec<Ipv4Net>) {
        let node = &self.nodes[i];
        let maps = ebpf::read_remotes(&node.bpf_dir)
            .map(|v| v.into_iter().map(|(n, _, _)| n).collect())
            .unwrap_or_default();
        let routes: serde_json::Value =
            exec(&node.ns, &["ip", "-j", "route", "show", "dev", "flannel.1"])
                .ok()
                .and_then(|o| serde_json::from_slice(&o.stdout).ok())
                .unwrap_or_default();
        let mut kernel: Vec<Ipv4Net> = routes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["dst"].as_str()?.parse().ok())
            .collect();
        kernel.sort();
        (maps, kernel)
    }

    /// Node `i` has `subnet` in its routes and, on the eBPF path, its map.
    pub fn holds(&self, i: usize, subnet: Ipv4Net) -> bool {
        let (m, k) = self.remote_state(i);
        (m.contains(&subnet) || self.nodes[i].kind != NodeKind::Ebpf) && k.contains(&subnet)
    }

    /// Node `i` has `subnet` in neither.
    pub fn lacks(&self, i: usize, subnet: Ipv4Net) -> bool {
        let (m, k) = self.remote_state(i);
        !m.contains(&subnet) && !k.contains(&subnet)
    }

    /// Resident memory of node `i`'s agent, in KiB.
    pub fn agent_rss_kib(&self, i: usize) -> Result<u64> {
        let pid = self.nodes[i].agent.as_ref().context("no agent")?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) node `i`'s agent. A stopped
    /// agent holds no CPU or lock; it catches up on what changed when it
    /// continues.
    pub fn pause_agent(&self, i: usize, paused: bool) -> Result<()> {
        if paused {
            self.signal_agent(i, libc::SIGSTOP, "SIGSTOP")
        } else {
            self.signal_agent(i, libc::SIGCONT, "SIGCONT")
        }
    }

    /// Sends signal `sig` (called `name` in errors) to node `i`'s agent.
    /// Strict reverse-path filtering (`rp_filter=1`) on every node, as
    /// hardened nodes run.
    pub fn strict_rp_filter(&self) -> Result<()> {
        for n in &self.nodes {
            for key in ["all", "default"] {
                let setting = format!("net.ipv4.conf.{key}.rp_filter=1");
                let out = crate::netns::exec(&n.ns, &["sysctl", "-qw", &setting])?;
                anyhow::ensure!(out.status.success(), "{setting} on {}", n.ns);
            }
        }
        Ok(())
    }

    /// The process ID of node `i`'s agent (run directly, not in a
    /// container).
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].agent.as_ref().map(|c| c.id())
    }

    pub fn signal_agent(&self, i: usize, sig: i32, name: &str) -> Result<()> {
        let pid = self.nodes[i].agent.as_ref().context("no agent")?.id();
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid as i32, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending {name} to node {}'s agent (pid {pid})", i + 1));
        }
        Ok(())
    }

    /// Stops node `i`'s agent with SIGTERM, as kubelet does, and waits
    /// for it to exit.
    pub fn stop_agent(&mut self, i: usize) -> Result<()> {
        self.signal_agent(i, libc::SIGTERM, "SIGTERM")?;
        if let Some(mut child) = self.nodes[i].agent.take() {
            child.wait()?;
        }
        Ok(())
    }

    /// SIGKILLs node `i`'s agent (the pinned data path stays). A
    /// container is killed and stays, to be started again.
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].agent.take() {
            child.kill()?;
            child.wait()?;
        }
        if let Some(pod) = &self.nodes[i].agent_pod {
            pod.podman
                .run(&["kill", "--signal", "KILL", &pod.container])?;
            pod.podman.run(&["wait", &pod.container])?;
            pod.podman.forget_runc_state(&pod.container)?;
        }
        Ok(())
    }

    /// The state podman reports for node `i`'s agent container, if it
    /// runs one.
    pub fn agent_pod_state(&self, i: usize) -> Option<String> {
        let pod = self.nodes[i].agent_pod.as_ref()?;
        pod.podman
            .run(&["inspect", "--format", "{{.State.Status}}", &pod.container])
            .ok()
    }

    /// Starts node `i`'s agent as the DaemonSet's pod, from the image and
    /// with the changes `how` names. A pod already there is replaced:
    /// stopped with SIGTERM (as kubelet stops it), removed, and its
    /// successor's init containers run again, as a rolling update does.
    pub fn start_agent_pod(&mut self, i: usize, how: &ContainerOptions) -> Result<()> {
        let tag = how.tag.as_str();
        let m = crate::manifest::load()?;
        let spec = m.pod_spec()?.clone();
        let config = m.config_map()?.data.clone().unwrap_or_default();
        let template = m.image()?;
        let (name, manifest_tag) = template
            .rsplit_once(':')
            .context("the manifest's image has no tag")?;
        let tag = if tag.is_empty() { manifest_tag } else { tag };
        let image = format!("{name}:{tag}");
        let fake = self
            .extras
            .iter()
            .find_map(|e| e.downcast_ref::<crate::fakekube::FakeKube>())
            .context("container mode needs the fake API server (fakekube::start_for_lab)")?;
        let n = i + 1;
        let sa_dir = self.dir.join(format!("n{n}-serviceaccount"));
        let sa_env = fake.service_account(&sa_dir, "kube-flannel")?;
        let node = &mut self.nodes[i];
        std::fs::create_dir_all(node.bpffs())?;
        if node.agent_pod.is_none() {
            let dir = self.dir.join(format!("podman-n{n}"));
            let net_d = dir.join("podman-net.d");
            std::fs::create_dir_all(&net_d)?;
            let podman = crate::podman::Podman::new(&node.ns, &dir, &net_d, &net_d)?;
            node.agent_pod = Some(AgentPod {
                podman,
                container: String::new(),
            });
        }
        let run_dir = node.run_dir.clone();
        let (conf_dir, bin_dir, var_lib_cni, bpffs) = (
            node.cni_conf_dir(),
            node.cni_bin_dir(),
            node.var_lib_cni(),
            node.bpffs(),
        );
        let kube_node = node_name(i);
        let pod = node.agent_pod.as_mut().expect("set above");
        let loaded = pod
            .podman
            .output(&["image", "exists", &image])?
            .status
            .success();
        if !loaded {
            crate::kubelet::load_image(&pod.podman, &crate::manifest::image_archive(tag), &image)?;
        }
        if !pod.container.is_empty() {
            let grace = spec.termination_grace_period_seconds.unwrap_or(30);
            pod.podman
                .run(&["stop", "--time", &grace.to_string(), &pod.container])?;
            pod.podman.run(&["rm", "--force", &pod.container])?;
        }
        let host_path = move |p: &str| -> Result<PathBuf> {
            Ok(match p {
                "/run/flannel" => run_dir.clone(),
                "/var/lib/cni" => var_lib_cni.clone(),
                "/etc/cni/net.d" => conf_dir.clone(),
                "/opt/cni/bin" => bin_dir.clone(),
                "/sys/fs/bpf" => bpffs.clone(),
                other => bail!("hostPath {other}: the lab has no stand-in for it"),
            })
        };
        // A pod name as the DaemonSet controller makes them, unique to the
        // run; podman's names are the pod's plus the container's.
        let pod_name = format!("kube-flannel-ds-{}-n{n}-{tag}", self.id);
        let ctx = crate::kubelet::PodContext {
            pod_name,
            namespace: "kube-flannel".into(),
            node_name: kube_node,
            image,
            host_path: &host_path,
            config_dir: self.dir.join(format!("n{n}-kube-flannel-cfg")),
            service_account: Some((sa_dir, sa_env)),
            without_caps: how.without_caps.clone(),
            extra_args: how.extra_args.clone(),
        };
        pod.container = crate::kubelet::start_pod(&pod.podman, &spec, &ctx, &config)?;
        Ok(())
    }

    /// Starts node `i`'s killed agent container again (a container
    /// restart: no init containers, same pod).
    pub fn restart_agent_container(&mut self, i: usize) -> Result<()> {
        let pod = self.nodes[i].agent_pod.as_ref().context("no agent pod")?;
        pod.podman.run(&["start", &pod.container])?;
        self.wait_ready(i)
    }

    /// Programs node `i` the way stock Flannel's VXLAN backend does.
    fn setup_stock_flannel(&mut self, i: usize) -> Result<()> {
        let pod_mtu = self.pod_mtu().to_string();
        let node = &self.nodes[i];
        let ns = node.ns.as_str();
        let gw = format!("{}/24", node.gateway());
        ip(&["-n", ns, "link", "add", "cni0", "type", "bridge"])?;
        ip(&["-n", ns, "addr", "add", &gw, "dev", "cni0"])?;
        ip(&["-n", ns, "link", "set", "cni0", "mtu", &pod_mtu, "up"])?;
        // Dual-stack: the IPv6 gateway on cni0.
        if let (Some(s6), Some(gw6)) = (node.subnet6, node.gateway6()) {
            let gw6 = format!("{gw6}/{}", s6.prefix_len());
            ip(&["-n", ns, "addr", "add", &gw6, "dev", "cni0", "nodad"])?;
        }
        // host-gw has no VXLAN device at all.
        if self.backend() == BackendType::HostGw {
            return self.program_stock_remotes(i);
        }
        let local = node.ip.to_string();
        ip(&[
            "-n",
            ns,
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            &VNI.to_string(),
            "local",
            &local,
            "dev",
            "eth0",
            "dstport",
            &PORT.to_string(),
            "nolearning",
        ])?;
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "flannel.1",
            "address",
            &node.vtep_mac.to_string(),
            "mtu",
            &pod_mtu,
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/32", node.subnet.network()),
            "dev",
            "flannel.1",
        ])?;
        ip(&["-n", ns, "link", "set", "flannel.1", "up"])?;
        // Dual-stack: Flannel's flannel-v6.1, VXLAN over the node's IPv6.
        if let (Some(ip6), Some(s6)) = (node.ip6, node.subnet6) {
            let mtu6 = (self.uplink_mtu() - 70).to_string();
            let mac6 = node.vtep6_mac.to_string();
            let local6 = ip6.to_string();
            ip(&[
                "-n",
                ns,
                "link",
                "add",
                "flannel-v6.1",
                "type",
                "vxlan",
                "id",
                &VNI.to_string(),
                "local",
                &local6,
                "dev",
                "eth0",
                "dstport",
                &PORT.to_string(),
                "nolearning",
            ])?;
            ip(&[
                "-n",
                ns,
                "link",
                "set",
                "flannel-v6.1",
                "address",
                &mac6,
                "mtu",
                &mtu6,
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/128", s6.network()),
                "dev",
                "flannel-v6.1",
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", "flannel-v6.1", "up"])?;
        }
        self.program_stock_remotes(i)
    }

    /// Stock-Flannel node `i`'s entries for every other node (replace: run
    /// again once the agents' leases are known, as flanneld follows its
    /// watch): a direct route `<subnet> via <node IP>` to a node it routes
    /// to directly (host-gw, DirectRouting on one L2 network), and
    /// `<IPv6 subnet> via <node IPv6>` beside it in a dual-stack lab; with
    /// VXLAN otherwise the neighbour, FDB entry and route, in Flannel's
    /// order; with host-gw nothing for a node off its network (Flannel's
    /// route add fails there).
    fn program_stock_remotes(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let ns = node.ns.as_str();
        for (j, other) in self.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            if self.direct_between(i, j) {
                let mut routes = vec![(other.subnet.to_string(), other.ip.to_string())];
                if let (Some(_), Some(ip6), Some(s6)) = (node.subnet6, other.ip6, other.subnet6) {
                    routes.push((s6.to_string(), ip6.to_string()));
                }
                for (dst, via) in routes {
                    ip(&[
                        "-n", ns, "route", "replace", &dst, "via", &via, "dev", "eth0",
                    ])?;
                }
                continue;
            }
            if self.backend() == BackendType::HostGw {
                continue;
            }
            stock_vxlan_entries(
                ns,
                "flannel.1",
                &other.subnet.to_string(),
                &other.subnet.network().to_string(),
                &other.vtep_mac.to_string(),
                &other.ip.to_string(),
            )?;
            // The other node's IPv6 side on flannel-v6.1, in the same order.
            if let (Some(_), Some(ip6), Some(s6)) = (node.subnet6, other.ip6, other.subnet6) {
                stock_vxlan_entries(
                    ns,
                    "flannel-v6.1",
                    &s6.to_string(),
                    &s6.network().to_string(),
                    &other.vtep6_mac.to_string(),
                    &ip6.to_string(),
                )?;
            }
        }
        Ok(())
    }

    /// The CNI network config node `i`'s pods are made with: Flannel's
    /// conflist entry, with the lab's subnet file and state directories.
    /// Stock-Flannel nodes get what Flannel's plugin hands the reference
    /// `bridge` plugin.
    pub fn cni_conf(&self, i: usize, version: &str) -> serde_json::Value {
        let node = &self.nodes[i];
        if node.kind == NodeKind::StockFlannel && node.agent_pod.is_none() {
            return serde_json::json!({
                "cniVersion": version,
                "name": CNI_NETWORK,
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "hairpinMode": true,
                "ipMasq": false,
                "mtu": self.pod_mtu(),
                "ipam": {
                    "type": "host-local",
                    "ranges": match node.subnet6 {
                        Some(s6) => serde_json::json!([[{"subnet": node.subnet.to_string()}], [{"subnet": s6.to_string()}]]),
                        None => serde_json::json!([[{"subnet": node.subnet.to_string()}]]),
                    },
                    "routes": match self.net_config().ipv6_network {
                        Some(n6) if node.subnet6.is_some() => serde_json::json!([{"dst": "10.244.0.0/16"}, {"dst": n6.to_string()}]),
                        _ => serde_json::json!([{"dst": "10.244.0.0/16"}]),
                    },
                    "dataDir": node.ipam_dir(),
                },
            });
        }
        if node.agent_pod.is_some() {
            // What the init container installed, with this node's
            // stand-ins for the host paths Flannel's conflist leaves to
            // their defaults.
            let file = node.cni_conf_dir().join("10-flannel.conflist");
            let installed: serde_json::Value = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_else(|| panic!("no installed conflist at {}", file.display()));
            let mut conf = installed["plugins"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["type"] == "flannel"))
                .cloned()
                .unwrap_or_else(|| panic!("{} has no flannel plugin", file.display()));
            conf["cniVersion"] = version.into();
            conf["name"] = installed["name"].clone();
            conf["subnetFile"] = node.subnet_file().display().to_string().into();
            conf["dataDir"] = node.cni_dir().display().to_string().into();
            conf["ipam"] = serde_json::json!({"dataDir": node.ipam_dir()});
            return conf;
        }
        serde_json::json!({
            "cniVersion": version,
            "name": CNI_NETWORK,
            "type": "flannel",
            "subnetFile": node.subnet_file(),
            "dataDir": node.cni_dir(),
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"dataDir": node.ipam_dir()},
        })
    }

    /// Node `i`'s conflist: Flannel's, with the lab's paths in the
    /// `flannel` entry, then `portmap`.
    pub fn conflist(&self, i: usize) -> serde_json::Value {
        let mut flannel = self.cni_conf(i, "0.3.1");
        if let Some(o) = flannel.as_object_mut() {
            o.remove("cniVersion");
            o.remove("name");
        }
        serde_json::json!({
            "name": CNI_NETWORK,
            "cniVersion": "0.3.1",
            "plugins": [
                flannel,
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        })
    }

    /// Runs a CNI command on node `i` the way a runtime does: the plugin
    /// of the config's `type`, found in [`cni_path`], inside the node's
    /// namespace. Returns (exit status, stdout as JSON, stderr).
    pub fn cni(
        &self,
        i: usize,
        command: &str,
        container_id: &str,
        netns: &str,
        ifname: &str,
        conf: &serde_json::Value,
    ) -> Result<CniCall> {
        let node = &self.nodes[i];
        // In container mode, the plugin the init container installed.
        let path = if node.agent_pod.is_some() {
            format!("{}:{REFERENCE_PLUGINS}", node.cni_bin_dir().display())
        } else {
            cni_path()?
        };
        cni_in_path(&path, &node.ns, command, container_id, netns, ifname, conf)
    }

    /// Creates a pod on node `i` through CNI: a namespace, then ADD (the
    /// project's `flannel` plugin; the reference `bridge` plugin on a
    /// stock-Flannel node), which wires it and registers it with the agent.
    pub fn add_pod(&mut self, i: usize) -> Result<usize> {
        let j = self.nodes[i].pods.len() + 1;
        let pod_ns = format!("{}p{j}", self.nodes[i].ns);
        self.add_ns(&pod_ns)?;
        let id = format!("{pod_ns}-c");
        let conf = self.cni_conf(i, "1.0.0");
        let call = self.cni(i, "ADD", &id, &netns_path(&pod_ns), "eth0", &conf)?;
        let out = call.ok()?;
        // No IPv4 address in an IPv6-only lab (`0.0.0.0` stands for none).
        let ip = out["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["address"].as_str()?.parse::<Ipv4Net>().ok())
            .map(|n| n.addr())
            .next();
        if ip.is_none() && !self.ipv6_only() {
            bail!("ADD result has no IPv4 address: {out}");
        }
        let ip6 = out["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["address"].as_str()?.parse::<Ipv6Net>().ok())
            .map(|n| n.addr())
            .next();
        let mac: MacAddr = out["interfaces"][2]["mac"]
            .as_str()
            .context("ADD result has no pod MAC")?
            .parse()?;
        let host_if = out["interfaces"][1]["name"]
            .as_str()
            .context("ADD result has no host interface")?
            .to_string();
        self.nodes[i].pods.push(Pod {
            ns: pod_ns,
            ip: ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            ip6,
            mac,
            host_if,
            container_id: id,
            result: out,
        });
        Ok(j - 1)
    }

    /// DEL of pod `(i, j)` through CNI (its namespace stays).
    pub fn del_pod(&self, (i, j): (usize, usize)) -> Result<()> {
        let pod = &self.nodes[i].pods[j];
        let conf = self.cni_conf(i, "1.0.0");
        self.cni(
            i,
            "DEL",
            &pod.container_id,
            &netns_path(&pod.ns),
            "eth0",
            &conf,
        )?
        .ok()?;
        Ok(())
    }

    /// Every pod in the lab as (node index, pod index).
    pub fn all_pods(&self) -> Vec<(usize, usize)> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| (0..n.pods.len()).map(move |j| (i, j)))
            .collect()
    }

    pub fn pod(&self, (i, j): (usize, usize)) -> &Pod {
        &self.nodes[i].pods[j]
    }

    /// Every ordered pair of pods exchanges ICMP (3 pings), TCP and UDP
    /// (ports from `first_port` up), and the counters prove the eBPF path
    /// carried it: a local redirect on the same node; encap, TC decap and
    /// delivery both ways across nodes, with `flannel.1` idle.
    pub fn every_pair_over_ebpf(&self, first_port: u16) -> Result<()> {
        if let Some(n) = self.nodes.iter().find(|n| n.kind != NodeKind::Ebpf) {
            bail!("{} is not an eBPF node", n.ns);
        }
        self.every_pair(first_port)
    }

    /// Every ordered pair of pods exchanges ICMP (3 pings), TCP and UDP
    /// (ports from `first_port` up), and what each node counts proves the
    /// path it took, as the lab's mode decides it ([`Lab::direct_between`]):
    /// - on an eBPF node: a local redirect on the same node; across nodes
    ///   the sender's encapsulation (`pod_encap_*`) or direct route
    ///   (`pod_direct_*`, nothing encapsulated), and the receiver's decap
    ///   (`uplink_decap`, `xdp_decap`) or, for a direct packet, a plain
    ///   packet left to the kernel (`uplink_pass_other_host` in TC decap
    ///   mode, `uplink_pass` after XDP; nothing decapsulated);
    /// - on a kernel or stock-Flannel node: `flannel.1` carried the
    ///   VXLAN pairs both ways and nothing of the direct ones;
    /// - an eBPF node's `flannel.1` never carries pod traffic;
    /// - over IPv6, when both pods have it: across nodes an eBPF node
    ///   encapsulated (`pod_encap6_*`) and decapsulated (`uplink_decap6`
    ///   or `xdp_decap6`) its side itself, its `flannel-v6.1` receiving
    ///   nothing, and another node did both with `flannel-v6.1`; on one
    ///   node nothing crossed `flannel-v6.1` and an eBPF node counted
    ///   `pod_local_redirect6`.
    pub fn every_pair(&self, first_port: u16) -> Result<()> {
        let ebpf = |i: usize| self.nodes[i].kind == NodeKind::Ebpf;
        let snapshot = || -> Result<Vec<std::collections::HashMap<&'static str, u64>>> {
            (0..self.nodes.len())
                .map(|i| match ebpf(i) {
                    true => self.nodes[i].counters(),
                    false => Ok(Default::default()),
                })
                .collect()
        };
        // (tx, rx) packets of each node's flannel.1; `None` without one.
        let vtep = || -> Vec<Option<(u64, u64)>> {
            self.nodes
                .iter()
                .map(|n| crate::netns::link_packets(&n.ns, "flannel.1").ok())
                .collect()
        };
        let pods = self.all_pods();
        let mut port = first_port;
        for &a in &pods {
            for &b in &pods {
                if a == b {
                    continue;
                }
                let (pa, pb) = (self.pod(a), self.pod(b));
                // IPv6-only pods have no IPv4 side to exercise.
                if pa.ip.is_unspecified() || pb.ip.is_unspecified() {
                    if let Some(b6) = pb.ip6.filter(|_| pa.ip6.is_some()) {
                        port += 1;
                        self.ipv6_pair(a, b, b6, port)?;
                    } else {
                        bail!("{} -> {}: neither family is shared", pa.ns, pb.ns);
                    }
                    continue;
                }
                let (before, vtep_before) = (snapshot()?, vtep());
                if !self.ping(a, pb.ip, 3, 56)? {
                    bail!("ping {} -> {} failed", pa.ip, pb.ip);
                }
                port += 1;
                crate::traffic::tcp_exchange(&pa.ns, &pb.ns, pb.ip, port)?;
                crate::traffic::udp_exchange(&pa.ns, &pb.ns, pb.ip, port)?;
                let (after, vtep_after) = (snapshot()?, vtep());
                let d = |node: usize, name: &str| {
                    after[node].get(name).copied().unwrap_or(0)
                        - before[node].get(name).copied().unwrap_or(0)
                };
                let pair = format!("{} -> {}", pa.ip, pb.ip);
                // ping 3 + TCP (handshake, data, fin) + UDP 1: each way
                // carries at least 5 packets.
                let mut counted: Vec<(String, u64)> = Vec::new();
                let mut none: Vec<(String, u64)> = Vec::new();
                let encap = |n| d(n, "pod_encap_redirect") + d(n, "pod_encap_neigh");
                let direct_out = |n| d(n, "pod_direct_redirect") + d(n, "pod_direct_neigh");
                let decap = |n| d(n, "uplink_decap") + d(n, "xdp_decap");
                if a.0 == b.0 {
                    if ebpf(a.0) {
                        none.push(("same-node encap".into(), encap(a.0)));
                        counted.push(("local redirect".into(), d(a.0, "pod_local_redirect") / 2));
                    }
                } else {
                    let direct = self.direct_between(a.0, b.0);
                    for (from, to, way) in [(a.0, b.0, ""), (b.0, a.0, "reply ")] {
                        if ebpf(from) {
                            if direct {
                                counted.push((format!("{way}direct route"), direct_out(from)));
                                none.push((format!("{way}encap"), encap(from)));
                            } else {
                                counted.push((format!("{way}encap"), encap(from)));
                            }
                        }
                        if ebpf(to) {
                            if direct {
                                // Not for this node's address: no VXLAN
                                // to judge (TC decap), or passed by XDP.
                                counted.push((
                                    format!("{way}plain arrival"),
                                    d(to, "uplink_pass") + d(to, "uplink_pass_other_host"),
                                ));
                                none.push((format!("{way}decap"), decap(to)));
                            } else {
                                counted.push((format!("{way}decap"), decap(to)));
                                counted.push((
                                    format!("{way}delivery"),
                                    d(to, "uplink_redirect") + d(to, "uplink_decap"),
                                ));
                            }
                        }
                    }
                    for n in [a.0, b.0] {
                        let moved = match (vtep_before[n], vtep_after[n]) {
                            (Some((rx0, tx0)), Some((rx1, tx1))) => (rx1 - rx0, tx1 - tx0),
                            _ => (0, 0),
                        };
                        let ns = &self.nodes[n].ns;
                        if direct || ebpf(n) {
                            if moved != (0, 0) {
                                bail!("{pair}: flannel.1 of {ns} carried {moved:?} packets");
                            }
                        } else if moved.0 < 5 || moved.1 < 5 {
                            bail!("{pair}: flannel.1 of {ns} carried only {moved:?} packets");
                        }
                    }
                }
                for (what, n) in counted {
                    if n < 5 {
                        bail!("{pair}: {what} counted {n}");
                    }
                }
                for (what, n) in none {
                    if n != 0 {
                        bail!("{pair}: {what} counted {n}, expected none");
                    }
                }
                if let (Some(_), Some(b6)) = (pa.ip6, pb.ip6) {
                    port += 1;
                    self.ipv6_pair(a, b, b6, port)?;
                }
            }
        }
        Ok(())
    }

    /// One ordered pod pair over IPv6 (dual-stack labs): ICMPv6, TCP and
    /// UDP. Across nodes over VXLAN an eBPF node encapsulates and
    /// decapsulates itself, another node with `flannel-v6.1`; between
    /// nodes routed to directly ([`Lab::direct_between`]) an eBPF node
    /// routes its side itself (`pod_direct6_*`) and receives plain packets
    /// (`uplink_pass*`, nothing decapsulated), and no node's
    /// `flannel-v6.1` carries anything. On one node the bridge (or the
    /// eBPF local redirect) carries it.
    fn ipv6_pair(
        &self,
        a: (usize, usize),
        b: (usize, usize),
        to: Ipv6Addr,
        port: u16,
    ) -> Result<()> {
        let (pa, pb) = (self.pod(a), self.pod(b));
        let pair = format!("{} -> {}", pa.ip6.unwrap_or(Ipv6Addr::UNSPECIFIED), to);
        let ebpf = |n: usize| self.nodes[n].kind == NodeKind::Ebpf;
        let direct = a.0 != b.0 && self.direct_between(a.0, b.0);
        let host_gw = self.backend() == BackendType::HostGw;
        // Per node: flannel-v6.1's (tx, rx) packets, and on an eBPF node
        // its local redirects, encapsulations, decapsulations, direct
        // routes and plain arrivals of IPv6 (the last counts IPv4 too).
        type Snap = (Option<(u64, u64)>, [u64; 5]);
        let snap = |n: usize| -> Result<Snap> {
            let dev = match crate::netns::link_packets(&self.nodes[n].ns, "flannel-v6.1") {
                Ok(d) => Some(d),
                // host-gw has none: nothing crosses it.
                Err(_) if host_gw => Some((0, 0)),
                Err(_) => None,
            };
            if !ebpf(n) {
                return Ok((dev, [0; 5]));
            }
            let c = self.nodes[n].counters()?;
            let encap = c["pod_encap6_redirect"] + c["pod_encap6_neigh"];
            let decap = c["uplink_decap6"] + c["xdp_decap6"];
            let direct = c["pod_direct6_redirect"] + c["pod_direct6_neigh"];
            let plain = c["uplink_pass"] + c["uplink_pass_other_host"];
            Ok((dev, [c["pod_local_redirect6"], encap, decap, direct, plain]))
        };
        let before = [snap(a.0)?, snap(b.0)?];
        if !self.ping6(a, to, 3)? {
            bail!("ping {pair} failed");
        }
        crate::traffic::tcp_exchange(&pa.ns, &pb.ns, IpAddr::V6(to), port)?;
        crate::traffic::udp_exchange(&pa.ns, &pb.ns, IpAddr::V6(to), port)?;
        let after = [snap(a.0)?, snap(b.0)?];
        for (k, n) in [a.0, b.0].into_iter().enumerate() {
            let ns = &self.nodes[n].ns;
            let ((Some((t0, r0)), c0), (Some((t1, r1)), c1)) = (before[k], after[k]) else {
                bail!("{pair}: {ns} has no flannel-v6.1");
            };
            let (tx, rx) = (t1 - t0, r1 - r0);
            let [local, encap, decap, routed, plain] = [0, 1, 2, 3, 4].map(|i| c1[i] - c0[i]);
            if a.0 == b.0 {
                // Bridged (or on an eBPF node redirected) on the node.
                if (tx, rx) != (0, 0) {
                    bail!(
                        "{pair}: same-node IPv6 crossed flannel-v6.1 of {ns}: {:?}",
                        (tx, rx)
                    );
                }
                if ebpf(n) && local < 5 {
                    bail!("{pair}: pod_local_redirect6 counted {local} on {ns}");
                }
                break;
            }
            if direct {
                if (tx, rx) != (0, 0) {
                    bail!(
                        "{pair}: flannel-v6.1 of {ns} carried {:?} of a direct pair",
                        (tx, rx)
                    );
                }
                if ebpf(n) && (routed < 3 || plain < 3 || encap + decap != 0) {
                    bail!(
                        "{pair}: {ns} routed {routed} IPv6 packets directly and got {plain} plain, encapsulated {encap}, decapsulated {decap}"
                    );
                }
                continue;
            }
            // Across nodes an eBPF node encapsulates (GSO aside) and
            // decapsulates in its programs, flannel-v6.1 receiving nothing;
            // the others do both with flannel-v6.1.
            if ebpf(n) {
                if encap < 3 || decap < 3 || rx != 0 {
                    bail!(
                        "{pair}: {ns} encapsulated {encap} and decapsulated {decap} IPv6 packets, flannel-v6.1 received {rx}"
                    );
                }
            } else if tx < 3 || rx < 3 {
                bail!("{pair}: flannel-v6.1 of {ns} sent {tx} and received {rx} packets");
            }
        }
        Ok(())
    }

    /// `ping` over IPv6 from a pod (default payload); true when every echo
    /// was answered.
    pub fn ping6(&self, from: (usize, usize), to: Ipv6Addr, count: u32) -> Result<bool> {
        self.ping_ip(from, IpAddr::V6(to), count, 56)
    }

    /// `ping` from a pod; true when every echo was answered.
    pub fn ping(
        &self,
        from: (usize, usize),
        to: Ipv4Addr,
        count: u32,
        size: usize,
    ) -> Result<bool> {
        self.ping_ip(from, IpAddr::V4(to), count, size)
    }

    /// `ping` of either family from a pod, `size` bytes of payload.
    fn ping_ip(&self, from: (usize, usize), to: IpAddr, count: u32, size: usize) -> Result<bool> {
        let family = if to.is_ipv6() { "-6" } else { "-4" };
        let out = exec(
            &self.pod(from).ns,
            &[
                "ping",
                family,
                "-q",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.05",
                "-W",
                "2",
                "-s",
                &size.to_string(),
                &to.to_string(),
            ],
        )?;
        Ok(out.status.success())
    }
}

/// One remote's VXLAN entries on a stock-Flannel node's device `dev`, in
/// Flannel's order: neighbour `<gw> lladdr <mac>`, FDB `<mac> dst <dst>`,
/// route `<subnet> via <gw> onlink` (either family: `ip` picks it from the
/// addresses).
fn stock_vxlan_entries(
    ns: &str,
    dev: &str,
    subnet: &str,
    gw: &str,
    mac: &str,
    dst: &str,
) -> Result<()> {
    ip(&[
        "-n",
        ns,
        "neigh",
        "replace",
        gw,
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ])?;
    sh(Command::new("bridge").args([
        "-n",
        ns,
        "fdb",
        "replace",
        mac,
        "dev",
        dev,
        "dst",
        dst,
        "self",
        "permanent",
    ]))?;
    ip(&[
        "-n", ns, "route", "replace", subnet, "via", gw, "dev", dev, "onlink",
    ])?;
    Ok(())
}

/// The Node object name of lab node `i` (kube store).
/// `text` without terminal colour codes (the agent's logs have them).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn node_name(i: usize) -> String {
    format!("node{}", i + 1)
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let out = exec(ns, &["sysctl", "-q", "-w", &format!("{key}={value}")])?;
    if !out.status.success() {
        bail!(
            "sysctl {key} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Service {
    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = command_in_netns(&self.argv[0], &self.ns)?
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.argv[0]))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, as a crash or a pulled cable would look to its clients.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.services.clear();
        self.extras.clear();
        for node in &mut self.nodes {
            if let Some(mut child) = node.agent.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            // Removes its containers and state.
            let containers = node.agent_pod.take().is_some();
            let _ = ebpf::remove_pins(&node.bpf_dir);
            if containers {
                let _ = std::fs::remove_dir_all(node.bpffs());
            }
        }
        // Pods first, nodes next, the fabric last: veths die with them.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::env::var_os("FLANNEL_LAB_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn strip_ansi_keeps_the_text() {
        let log = "\u{1b}[2m2026-11-25T03:08:12Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ready";
        assert_eq!(super::strip_ansi(log), "2026-11-25T03:08:12Z  INFO ready");
        assert_eq!(super::strip_ansi("plain"), "plain");
        assert_eq!(super::strip_ansi("cut \u{1b}[3"), "cut ");
    }
}

//! The lab builder. See the crate docs for the shape of a lab.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use flannel_agent::{
    api::{self, EndpointRecord, Request},
    ebpf,
    lease::Lease,
    mac::MacAddr,
};
use ipnet::Ipv4Net;

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
}

impl NodeSpec {
    pub const fn new(kind: NodeKind, pods: usize) -> Self {
        Self { kind, pods }
    }
}

pub const VNI: u32 = 1;
pub const PORT: u16 = 4789;
pub const POD_MTU: u32 = 1450;

pub struct Pod {
    /// Namespace name.
    pub ns: String,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    /// Host side of the veth, inside the node namespace.
    pub host_if: String,
}

pub struct Node {
    pub ns: String,
    pub kind: NodeKind,
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub vtep_mac: MacAddr,
    pub bpf_dir: PathBuf,
    pub run_dir: PathBuf,
    pub pods: Vec<Pod>,
    agent: Option<Child>,
}

impl Node {
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }

    pub fn lease(&self) -> Lease {
        Lease {
            subnet: self.subnet,
            public_ip: self.ip,
            vtep_mac: self.vtep_mac,
        }
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
    format!("fl{:06x}", mix & 0xff_ffff)
}

/// Path of the agent binary: `FLANNEL_AGENT_BIN`, or next to the test binary.
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLANNEL_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join("flannel-agent");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!("flannel-agent binary not found near {} (run `cargo build -p flannel-agent` or set FLANNEL_AGENT_BIN)", exe.display())
}

impl Lab {
    /// Builds the fabric, the nodes (agents started and ready) and the pods.
    pub fn new(specs: &[NodeSpec]) -> Result<Self> {
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("flannel-lab-{id}"));
        std::fs::create_dir_all(&dir)?;
        let mut lab = Lab {
            fabric: format!("{id}-fab"),
            id,
            nodes: Vec::new(),
            dir,
            namespaces: Vec::new(),
        };
        lab.build(specs)?;
        Ok(lab)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
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
        ip(&["-n", &fab, "link", "set", "br0", "up"])?;
        for (i, spec) in specs.iter().enumerate() {
            let n = i + 1;
            let ns = format!("{}-n{n}", self.id);
            self.add_ns(&ns)?;
            let port = format!("n{n}");
            ip(&[
                "-n", &fab, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &fab, "link", "set", &port, "master", "br0", "up"])?;
            let node_ip = Ipv4Addr::new(172, 30, 0, n as u8);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{node_ip}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            // A default route, so the agent finds its uplink as Flannel does.
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                "172.30.0.254",
                "dev",
                "eth0",
                "onlink",
            ])?;
            sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            self.nodes.push(Node {
                bpf_dir: PathBuf::from(format!("/sys/fs/bpf/{ns}")),
                run_dir: self.dir.join(format!("n{n}")),
                ns,
                kind: spec.kind,
                ip: node_ip,
                subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, n as u8, 0), 24)?,
                vtep_mac: MacAddr([0x0e, 0x66, 0, 0, 0, n as u8]),
                pods: Vec::new(),
                agent: None,
            });
        }
        self.write_leases()?;
        for i in 0..self.nodes.len() {
            match self.nodes[i].kind {
                NodeKind::StockFlannel => self.setup_stock_flannel(i)?,
                _ => self.start_agent(i)?,
            }
        }
        for (i, spec) in specs.iter().enumerate() {
            for _ in 0..spec.pods {
                self.add_pod(i)?;
            }
        }
        Ok(())
    }

    pub fn lease_file(&self) -> PathBuf {
        self.dir.join("leases.json")
    }

    /// Writes every node's lease to the shared lease file.
    pub fn write_leases(&self) -> Result<()> {
        let leases: Vec<Lease> = self.nodes.iter().map(|n| n.lease()).collect();
        flannel_agent::agent::write_atomic(
            &self.lease_file(),
            &serde_json::to_vec_pretty(&leases)?,
        )?;
        Ok(())
    }

    /// Starts (or restarts) node `i`'s agent and waits until it answers.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
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
        let netns = std::fs::File::open(format!("/run/netns/{}", node.ns))?;
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--lease-file"])
            .arg(self.lease_file())
            .args([
                "--port",
                &PORT.to_string(),
                "--vni",
                &VNI.to_string(),
                "--datapath",
                mode,
            ])
            .arg("--bpf-dir")
            .arg(&node.bpf_dir)
            .arg("--run-dir")
            .arg(&node.run_dir)
            .args(["--resync-secs", "2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        {
            use std::os::{fd::AsRawFd, unix::process::CommandExt};
            let fd = netns.as_raw_fd();
            // SAFETY: only async-signal-safe setns between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().context("starting flannel-agent")?;
        drop(netns);
        self.nodes[i].agent = Some(child);
        self.wait_ready(i)
    }

    fn wait_ready(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = api::call(&self.nodes[i].socket(), &Request::Status {}) {
                if r.status.is_some() {
                    return Ok(());
                }
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
            if Instant::now() > deadline {
                bail!(
                    "agent on {} not ready after 20 s: {}",
                    self.nodes[i].ns,
                    self.agent_log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].run_dir.join("agent.log")).unwrap_or_default()
    }

    /// SIGKILLs node `i`'s agent (the pinned data path stays).
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].agent.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Programs node `i` the way stock Flannel's VXLAN backend does.
    fn setup_stock_flannel(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let ns = node.ns.as_str();
        let gw = format!("{}/24", node.gateway());
        ip(&["-n", ns, "link", "add", "cni0", "type", "bridge"])?;
        ip(&["-n", ns, "addr", "add", &gw, "dev", "cni0"])?;
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            "cni0",
            "mtu",
            &POD_MTU.to_string(),
            "up",
        ])?;
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
            &POD_MTU.to_string(),
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
        for other in self.nodes.iter().filter(|o| o.ns != node.ns) {
            let gw = other.subnet.network().to_string();
            let mac = other.vtep_mac.to_string();
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &gw,
                "lladdr",
                &mac,
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ])?;
            sh(Command::new("bridge").args([
                "-n",
                ns,
                "fdb",
                "replace",
                &mac,
                "dev",
                "flannel.1",
                "dst",
                &other.ip.to_string(),
                "self",
                "permanent",
            ]))?;
            ip(&[
                "-n",
                ns,
                "route",
                "replace",
                &other.subnet.to_string(),
                "via",
                &gw,
                "dev",
                "flannel.1",
                "onlink",
            ])?;
        }
        Ok(())
    }

    /// Creates a pod on node `i`: namespace, veth onto `cni0`, address,
    /// routes, and registration with the node's agent.
    pub fn add_pod(&mut self, i: usize) -> Result<usize> {
        let j = self.nodes[i].pods.len() + 1;
        let node = &self.nodes[i];
        let pod_ns = format!("{}p{j}", node.ns);
        let host_if = format!("vp{j}");
        let pod_ip = Ipv4Addr::from(u32::from(node.subnet.network()) + 10 + j as u32);
        let gateway = node.gateway().to_string();
        let node_ns = node.ns.clone();
        let has_agent = node.agent.is_some();
        let socket = node.socket();
        self.add_ns(&pod_ns)?;
        ip(&[
            "-n",
            &node_ns,
            "link",
            "add",
            &host_if,
            "mtu",
            &POD_MTU.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod_ns,
        ])?;
        ip(&[
            "-n", &node_ns, "link", "set", &host_if, "master", "cni0", "up",
        ])?;
        ip(&[
            "-n",
            &pod_ns,
            "link",
            "set",
            "eth0",
            "mtu",
            &POD_MTU.to_string(),
            "up",
        ])?;
        ip(&[
            "-n",
            &pod_ns,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n", &pod_ns, "route", "add", "default", "via", &gateway, "dev", "eth0",
        ])?;
        let link: serde_json::Value =
            serde_json::from_str(&ip(&["-n", &pod_ns, "-j", "link", "show", "eth0"])?)?;
        let mac: MacAddr = link[0]["address"]
            .as_str()
            .context("pod eth0 has no MAC")?
            .parse()?;
        if has_agent {
            api::call(
                &socket,
                &Request::Add(EndpointRecord {
                    ip: pod_ip,
                    mac,
                    host_ifname: host_if.clone(),
                }),
            )?;
        }
        self.nodes[i].pods.push(Pod {
            ns: pod_ns,
            ip: pod_ip,
            mac,
            host_if,
        });
        Ok(j - 1)
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

    /// `ping` from a pod; true when every echo was answered.
    pub fn ping(
        &self,
        from: (usize, usize),
        to: Ipv4Addr,
        count: u32,
        size: usize,
    ) -> Result<bool> {
        let out = exec(
            &self.pod(from).ns,
            &[
                "ping",
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

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.agent.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = ebpf::remove_pins(&node.bpf_dir);
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

//! The node agent: gets this node's lease, picks the data path, keeps
//! Flannel's kernel objects and the BPF maps in step with every node's
//! lease and the registered pods, and serves the local API.
//!
//! Reconciliation is level-triggered: each pass computes the desired state
//! from the lease set and the pod records, reads what the kernel and the
//! maps hold, and applies only the difference. It runs at start, whenever
//! the lease set changes, after every API change, on SIGHUP and on a timer,
//! so drift is repaired, not just logged.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use flannel_common::{
    Config, Endpoint, RemoteNode, CONFIG_F_READY, CONFIG_F_TC_DECAP, VXLAN_ENCAP_LEN,
};
use ipnet::Ipv4Net;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use crate::{
    api::{EndpointRecord, Request, Response, Status},
    config::NetConfig,
    control::{self, LeaseFeed, StoreOptions},
    ebpf::{self, Datapath},
    mac::MacAddr,
    masq,
    netlink::{Link, Netlink, RemoteEntry, VxlanSpec},
    subnet::{env::SubnetEnv, Lease, LeaseAttrs, LeaseSet, LeaseTiming, SubnetManager},
};

/// How XDP is attached to the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Native XDP, except on a veth uplink (`off` there): native XDP on a
    /// veth makes the kernel turn off segmentation offload on its peer
    /// (every TCP super-packet toward the node is then cut to MTU size),
    /// and generic XDP copies each GSO packet before it runs.
    Auto,
    /// In the driver (falls back to generic when the driver lacks it).
    Native,
    /// In the stack (`XDP_FLAGS_SKB_MODE`); sees GSO packets whole but
    /// copies non-linear ones first.
    Generic,
    /// No XDP: the uplink's TC program decapsulates, on whole GSO packets
    /// without a copy.
    Off,
}

/// Which data path the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathMode {
    /// eBPF when it loads, the kernel path otherwise.
    Auto,
    /// eBPF or fail.
    Ebpf,
    /// Pure Flannel behaviour: bridge, flannel.<VNI>, routes; no eBPF.
    Kernel,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub net_config_path: PathBuf,
    /// `--iface`: interface names or addresses, first match wins.
    pub iface: Vec<String>,
    /// `--iface-regex`: matched against interface names and addresses.
    pub iface_regex: Vec<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub store: StoreOptions,
    pub timing: LeaseTiming,
    pub ip_masq: bool,
    pub healthz: Option<SocketAddr>,
    pub datapath: DatapathMode,
    pub xdp_mode: XdpMode,
    pub bpf_dir: PathBuf,
    pub run_dir: PathBuf,
    pub bridge: String,
    pub resync: Duration,
    /// The CNI plugin's records, read to register pods it wired while the
    /// agent was away.
    pub cni_data_dir: PathBuf,
    /// Install the plugin and conflist once the node is ready.
    pub install_cni: Option<crate::cni::install::InstallSpec>,
}

impl Options {
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    fn endpoints_file(&self) -> PathBuf {
        self.run_dir.join("endpoints.json")
    }
}

/// Facts about this node fixed at start.
struct Node {
    uplink: Link,
    ip: Ipv4Addr,
    lease: Lease,
    vtep_mac: MacAddr,
}

struct Agent {
    opts: Options,
    cfg: NetConfig,
    nl: Netlink,
    node: Node,
    store: SubnetManager,
    dp: Option<Datapath>,
    reason: String,
    /// The lease set last published by the store (kept while it is away).
    leases: LeaseSet,
    feed: LeaseFeed,
    endpoints: BTreeMap<Ipv4Addr, EndpointRecord>,
    /// Pod links this process has already (re)attached or adopted.
    attached: HashSet<u32>,
    /// Remote nodes' data path state, derived from `leases` once per pass.
    remotes: Vec<RemoteEntry>,
    /// Subnets whose lease was unusable, already logged.
    skipped: HashSet<Ipv4Net>,
    /// Pod interfaces whose TC program is being attached right now.
    pending: HashSet<u32>,
    /// Where attach workers report back.
    attached_tx: mpsc::UnboundedSender<Attached>,
    /// No XDP on the uplink: TC decapsulates.
    tc_decap: bool,
}

type ApiCall = (Request, oneshot::Sender<Response>);

/// A pod's TC program attached on a worker thread, back to the loop.
struct Attached {
    rec: EndpointRecord,
    index: u32,
    result: std::io::Result<()>,
    reply: oneshot::Sender<Response>,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("creating run directory {}", opts.run_dir.display()))?;
    let nl = Netlink::connect()?;

    let store = control::retry("connecting to the lease store", || {
        control::connect(&opts.store, opts.timing)
    })
    .await;
    // A bad config is refused at once; a store that has none yet is waited for.
    let cfg = loop {
        match control::network_config(&store, &opts.net_config_path).await {
            Ok(cfg) => break cfg,
            Err(err) if matches!(store, SubnetManager::Etcd(_)) && !is_config_error(&err) => {
                tracing::warn!(err = %format!("{err:#}"), "waiting for the network config");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => return Err(err),
        }
    };

    let mut public_ip = opts.public_ip;
    if let (None, SubnetManager::Kube(k)) = (public_ip, &store) {
        public_ip = control::retry("reading this node's node-public-ip", || async {
            Ok(k.node_public_ip().await?)
        })
        .await;
    }
    let (uplink, ip) = choose_uplink(&nl, &opts.iface, &opts.iface_regex, public_ip).await?;
    let vtep_name = format!("flannel.{}", cfg.backend.vni);
    // Flannel keeps the VTEP's MAC across restarts; so do we.
    let vtep_mac = match nl.link_by_name(&vtep_name).await?.and_then(|l| l.mac) {
        Some(mac) if mac.is_unicast() => mac,
        _ => MacAddr::for_vtep(ip, cfg.backend.vni),
    };
    let attrs = LeaseAttrs::vxlan(ip, cfg.backend.vni, vtep_mac);
    let previous = control::previous_subnet(&opts.subnet_file);
    let lease = control::retry("acquiring a subnet lease", || async {
        Ok(store.acquire(&cfg, &attrs, previous).await?)
    })
    .await;
    tracing::info!(
        store = store.name(),
        uplink = %uplink.name,
        %ip,
        subnet = %lease.subnet,
        vtep_mac = %vtep_mac,
        "lease acquired"
    );
    if let Some(mtu) = cfg.backend.mtu {
        if mtu + VXLAN_ENCAP_LEN > uplink.mtu {
            bail!(
                "Backend.MTU: {mtu} is invalid: the uplink {} has MTU {}, so at most {}",
                uplink.name,
                uplink.mtu,
                uplink.mtu - VXLAN_ENCAP_LEN
            );
        }
    }
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        tracing::warn!(
            "net.ipv4.ip_forward is 0: neither data path can route pod traffic off this node"
        );
    }

    let mut feed = control::spawn_watch(store.clone());
    // The first full listing decides which remote state is stale; until it
    // arrives, whatever is programmed keeps forwarding.
    let first = feed
        .wait_for(|s| s.is_some())
        .await
        .map_err(|_| anyhow!("the lease watch stopped"))?
        .clone()
        .unwrap_or_default();
    let mut fatal = control::spawn_renew(store.clone(), lease.clone(), opts.timing, feed.clone());
    let (attached_tx, mut attached_rx) = mpsc::unbounded_channel::<Attached>();

    let mut agent = Agent {
        endpoints: load_endpoints(&opts.endpoints_file())?,
        opts,
        cfg,
        nl,
        node: Node {
            uplink,
            ip,
            lease,
            vtep_mac,
        },
        store,
        dp: None,
        reason: String::new(),
        leases: first,
        feed,
        attached: HashSet::new(),
        remotes: Vec::new(),
        skipped: HashSet::new(),
        pending: HashSet::new(),
        attached_tx,
        tc_decap: false,
    };
    agent.ensure_kernel_objects().await?;
    agent.choose_datapath().await?;
    agent.reconcile().await;
    if agent.opts.ip_masq {
        masq::ensure(agent.cfg.network, agent.node.lease.subnet)
            .context("installing the ip-masq rules")?;
        // The agent masquerades now; the CNI plugin's rule is redundant.
        masq::pod_remove().context("removing the CNI plugin's masquerade rule")?;
    } else {
        masq::remove().context("removing ip-masq rules of an earlier run")?;
    }
    // subnet.env last: the CNI plugin may create pods once it exists.
    let env = SubnetEnv::new(
        agent.cfg.network,
        agent.node.lease.subnet,
        agent.pod_mtu(),
        agent.opts.ip_masq,
    );
    env.write(&agent.opts.subnet_file)
        .with_context(|| format!("writing {}", agent.opts.subnet_file.display()))?;
    // The conflist goes in last: a runtime that sees it may ADD at once.
    if let Some(spec) = &agent.opts.install_cni {
        let changed = crate::cni::install::install(spec).context("installing the CNI plugin")?;
        tracing::info!(
            bin_dir = %spec.bin_dir.display(),
            conf = %spec.conf_dir.join(&spec.conf_name).display(),
            changed = changed.len(),
            "CNI plugin and conflist installed"
        );
    }
    if let SubnetManager::Kube(k) = &agent.store {
        let k = k.clone();
        tokio::spawn(async move {
            control::retry("setting NetworkUnavailable=False", || async {
                Ok(k.mark_network_available().await?)
            })
            .await
        });
    }

    let socket = agent.opts.socket();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("binding the agent socket {}", socket.display()))?;
    let (tx, mut rx) = mpsc::channel::<ApiCall>(64);
    tokio::spawn(accept_loop(listener, tx));
    if let Some(addr) = agent.opts.healthz {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the healthz port {addr}"))?;
        tokio::spawn(healthz(l));
    }

    let mut tick = tokio::time::interval(agent.opts.resync);
    tick.tick().await;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tracing::info!(socket = %socket.display(), subnet_file = %agent.opts.subnet_file.display(), "ready");
    let result = loop {
        tokio::select! {
            _ = tick.tick() => agent.reconcile().await,
            _ = hup.recv() => agent.reconcile().await,
            changed = agent.feed.changed() => {
                if changed.is_err() {
                    break Err(anyhow!("the lease watch stopped"));
                }
                let set = agent.feed.borrow_and_update().clone();
                if let Some(set) = set {
                    let started = Instant::now();
                    agent.leases = set;
                    agent.reconcile().await;
                    tracing::debug!(took = ?started.elapsed(), leases = agent.leases.len(), "lease change applied");
                }
            }
            Some((req, reply)) = rx.recv() => agent.handle(req, reply).await,
            Some(done) = attached_rx.recv() => agent.finish_add(done),
            Some(err) = fatal.recv() => break Err(err),
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
        }
    };
    // Pinned maps and links stay: the data path keeps forwarding.
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped; the data path stays in place");
    result
}

/// A config that is there but wrong: waiting will not fix it.
fn is_config_error(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<crate::config::ConfigError>().is_some())
}

/// The uplink and public IP, chosen as Flannel does: `--iface` entries
/// (names or addresses) in order, else `--iface-regex` against names and
/// addresses, else the interface holding `--public-ip`, else the interface
/// of the default route.
async fn choose_uplink(
    nl: &Netlink,
    ifaces: &[String],
    regexes: &[String],
    public_ip: Option<Ipv4Addr>,
) -> anyhow::Result<(Link, Ipv4Addr)> {
    let links = nl.links().await?;
    let mut addrs = Vec::new();
    for l in &links {
        for a in nl.ipv4_addrs(l.index).await? {
            addrs.push((l.clone(), a.addr()));
        }
    }
    let first_addr = |l: &Link| {
        addrs
            .iter()
            .find(|(x, _)| x.index == l.index)
            .map(|(_, a)| *a)
    };
    let found: Option<(Link, Option<Ipv4Addr>)> = if !ifaces.is_empty() {
        let hit = ifaces
            .iter()
            .find_map(|want| match want.parse::<Ipv4Addr>() {
                Ok(ip) => addrs
                    .iter()
                    .find(|(_, a)| *a == ip)
                    .map(|(l, a)| (l.clone(), Some(*a))),
                Err(_) => links
                    .iter()
                    .find(|l| &l.name == want)
                    .map(|l| (l.clone(), first_addr(l))),
            });
        Some(hit.ok_or_else(|| {
            anyhow!("--iface: none of {ifaces:?} is an interface name or address on this node")
        })?)
    } else if !regexes.is_empty() {
        let mut hit = None;
        for text in regexes {
            let re = regex::Regex::new(text).with_context(|| {
                format!("--iface-regex: {text:?} is not a valid regular expression")
            })?;
            hit = addrs
                .iter()
                .find(|(_, a)| re.is_match(&a.to_string()))
                .map(|(l, a)| (l.clone(), Some(*a)))
                .or_else(|| {
                    links
                        .iter()
                        .find(|l| re.is_match(&l.name))
                        .map(|l| (l.clone(), first_addr(l)))
                });
            if hit.is_some() {
                break;
            }
        }
        Some(hit.ok_or_else(|| {
            anyhow!("--iface-regex: no interface name or address matches {regexes:?}")
        })?)
    } else {
        public_ip.and_then(|ip| {
            addrs
                .iter()
                .find(|(_, a)| *a == ip)
                .map(|(l, a)| (l.clone(), Some(*a)))
        })
    };
    let (link, addr) = match found {
        Some(f) => f,
        None => {
            let l = nl.default_route_link().await?;
            let a = first_addr(&l);
            (l, a)
        }
    };
    let ip = public_ip
        .or(addr)
        .ok_or_else(|| anyhow!("uplink {} has no IPv4 address; pass --public-ip", link.name))?;
    Ok((link, ip))
}

async fn healthz(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let reply = if req.starts_with("GET /healthz ") || req.starts_with("GET / ") {
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let _ = s.write_all(reply.as_bytes()).await;
        });
    }
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<ApiCall>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, tx.clone()));
            }
            Err(err) => {
                tracing::warn!(%err, "accepting an API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<ApiCall>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (rtx, rrx) = oneshot::channel();
                if tx.send((req, rtx)).await.is_err() {
                    return;
                }
                rrx.await
                    .unwrap_or_else(|_| Response::err("agent is stopping"))
            }
            Err(err) => Response::err(format!("malformed request: {err}")),
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn load_endpoints(path: &Path) -> anyhow::Result<BTreeMap<Ipv4Addr, EndpointRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let list: Vec<EndpointRecord> = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading pod records {}", path.display()))?;
            Ok(list.into_iter().map(|e| (e.ip, e)).collect())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("reading pod records {}", path.display())),
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

impl Agent {
    fn pod_mtu(&self) -> u32 {
        self.cfg
            .backend
            .mtu
            .unwrap_or(self.node.uplink.mtu.saturating_sub(VXLAN_ENCAP_LEN))
    }

    fn gateway(&self) -> Ipv4Net {
        let subnet = self.node.lease.subnet;
        Ipv4Net::new(
            Ipv4Addr::from(u32::from(subnet.network()) + 1),
            subnet.prefix_len(),
        )
        .expect("prefix length comes from a valid subnet")
    }

    fn vxlan_spec(&self) -> VxlanSpec {
        VxlanSpec {
            name: format!("flannel.{}", self.cfg.backend.vni),
            vni: self.cfg.backend.vni,
            local: self.node.ip,
            uplink: self.node.uplink.index,
            port: self.cfg.backend.port,
            mtu: self.pod_mtu(),
            mac: self.node.vtep_mac,
        }
    }

    /// `cni0` and `flannel.<VNI>`, created or repaired. Returns their links.
    async fn ensure_kernel_objects(&mut self) -> anyhow::Result<(Link, Link)> {
        // The uplink may have been replaced or flapped; refresh what we know.
        if let Some(up) = self.nl.link_by_name(&self.node.uplink.name).await? {
            if !up.up {
                tracing::warn!(uplink = %up.name, "uplink is down");
            }
            self.node.uplink = up;
        }
        let bridge = self
            .nl
            .ensure_bridge(
                &self.opts.bridge,
                self.gateway(),
                self.pod_mtu(),
                MacAddr::for_bridge(self.gateway().addr()),
            )
            .await?;
        let vtep_addr = Ipv4Net::new(self.node.lease.subnet.network(), 32)?;
        let vtep = self.nl.ensure_vxlan(&self.vxlan_spec(), vtep_addr).await?;
        Ok((bridge, vtep))
    }

    async fn choose_datapath(&mut self) -> anyhow::Result<()> {
        match self.opts.datapath {
            DatapathMode::Kernel => {
                // Coming from an eBPF run: take its programs off the interfaces.
                ebpf::remove_pins(&self.opts.bpf_dir)?;
                self.reason = "requested with --datapath kernel".into();
            }
            DatapathMode::Auto | DatapathMode::Ebpf => match self.start_ebpf() {
                Ok(mode) => {
                    self.reason = if mode == "off" {
                        format!(
                            "TC decap on {} (no XDP), TC on pod veths",
                            self.node.uplink.name
                        )
                    } else {
                        format!("XDP ({mode}) on {}, TC on pod veths", self.node.uplink.name)
                    };
                }
                Err(err) if self.opts.datapath == DatapathMode::Auto => {
                    self.dp = None;
                    ebpf::remove_pins(&self.opts.bpf_dir)?;
                    self.reason = format!("eBPF unavailable: {err:#}");
                }
                Err(err) => {
                    return Err(err.context("starting the eBPF data path (--datapath ebpf)"))
                }
            },
        }
        let which = if self.dp.is_some() { "ebpf" } else { "kernel" };
        tracing::info!(datapath = which, reason = %self.reason, "data path selected");
        Ok(())
    }

    fn start_ebpf(&mut self) -> anyhow::Result<&'static str> {
        let mut dp = Datapath::load(&self.opts.bpf_dir)?;
        let veth = self.node.uplink.kind == Some(netlink_packet_route::link::InfoKind::Veth);
        let xdp = match self.opts.xdp_mode {
            XdpMode::Generic => Some(true),
            XdpMode::Native => Some(false),
            XdpMode::Auto => (!veth).then_some(false),
            XdpMode::Off => None,
        };
        self.tc_decap = xdp.is_none();
        let mode = dp.attach_uplink(&self.node.uplink.name, self.node.uplink.index, xdp)?;
        self.dp = Some(dp);
        Ok(mode)
    }

    fn status(&self) -> Status {
        Status {
            datapath: if self.dp.is_some() { "ebpf" } else { "kernel" }.into(),
            reason: self.reason.clone(),
            subnet: self.node.lease.subnet.to_string(),
            remote_leases: self.remotes.len(),
            endpoints: self.endpoints.len(),
            subnet_manager: self.store.name().into(),
            public_ip: self.node.ip.to_string(),
            ignored_leases: self.skipped.len(),
        }
    }

    /// A remote node's lease as data path state; `Ok(None)` for our own.
    fn remote(&self, l: &Lease) -> Result<Option<RemoteEntry>, String> {
        let own = &self.node.lease.subnet;
        if l.attrs.public_ip == self.node.ip || l.subnet == *own {
            return Ok(None);
        }
        if own.contains(&l.subnet.network()) || l.subnet.contains(&own.network()) {
            return Err(format!("overlaps this node's lease {own}"));
        }
        let data = l.attrs.vxlan_data()?;
        Ok(Some(RemoteEntry {
            subnet: l.subnet,
            public_ip: l.attrs.public_ip,
            vtep_mac: data.vtep_mac,
        }))
    }

    /// Derives the remote entries from the lease set, logging each
    /// unusable lease once (they are left out of the data path).
    fn refresh_remotes(&mut self) {
        let mut remotes = Vec::with_capacity(self.leases.len());
        let mut skipped = HashSet::new();
        for l in self.leases.values() {
            match self.remote(l) {
                Ok(Some(r)) => remotes.push(r),
                Ok(None) => {}
                Err(why) => {
                    if !self.skipped.contains(&l.subnet) {
                        tracing::warn!(subnet = %l.subnet, node = %l.attrs.public_ip, %why, "ignoring a lease");
                    }
                    skipped.insert(l.subnet);
                }
            }
        }
        self.remotes = remotes;
        self.skipped = skipped;
    }

    async fn handle(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let resp = match req {
            Request::Status {} => Response {
                status: Some(self.status()),
                ..Response::ok()
            },
            Request::List {} => Response {
                endpoints: Some(self.endpoints.values().cloned().collect()),
                ..Response::ok()
            },
            // Answered once its TC program is attached.
            Request::Add(rec) => return self.begin_add(rec, reply),
            Request::Del { ip } => match self.del_endpoint(ip) {
                Ok(()) => Response::ok(),
                Err(err) => Response::err(format!("{err:#}")),
            },
        };
        let _ = reply.send(resp);
    }

    /// Checks a pod and starts attaching its TC program. A tcx attach
    /// waits for an RCU grace period in the kernel; done on a worker
    /// thread, many pods being added at once overlap their waits instead
    /// of queueing behind each other on this loop.
    fn begin_add(&mut self, rec: EndpointRecord, reply: oneshot::Sender<Response>) {
        let index = match self.check_endpoint(&rec) {
            Ok(i) => i,
            Err(err) => {
                let _ = reply.send(Response::err(format!("{err:#}")));
                return;
            }
        };
        let done = |result| Attached {
            rec: rec.clone(),
            index,
            result,
            reply,
        };
        let Some(dp) = self.dp.as_mut() else {
            return self.finish_add(done(Ok(())));
        };
        if dp.pod_link_alive(index) {
            // Pinned by an earlier run: take it over (no grace period).
            let r = dp
                .attach_pod(&rec.host_ifname, index)
                .map_err(std::io::Error::other);
            return self.finish_add(done(r));
        }
        let prog = match dp.pod_program() {
            Ok(p) => p,
            Err(err) => return self.finish_add(done(Err(std::io::Error::other(err)))),
        };
        let pin = dp.pod_link_path(index);
        self.pending.insert(index);
        let tx = self.attached_tx.clone();
        let mut msg = done(Ok(()));
        tokio::task::spawn_blocking(move || {
            use std::os::fd::AsFd;
            msg.result = ebpf::attach_tcx_ingress_pinned(prog.as_fd(), index, &pin);
            let _ = tx.send(msg);
        });
    }

    /// The pod's address, MAC and host interface, checked; returns the
    /// interface index.
    fn check_endpoint(&self, rec: &EndpointRecord) -> anyhow::Result<u32> {
        if !self.node.lease.subnet.contains(&rec.ip) || rec.ip == self.gateway().addr() {
            bail!(
                "pod IP {} is not a pod address of this node's lease {}",
                rec.ip,
                self.node.lease.subnet
            );
        }
        if !rec.mac.is_unicast() {
            bail!("pod MAC {} is not a unicast address", rec.mac);
        }
        // if_nametoindex: no RTNL round trip while many pods are wired.
        ebpf::ifindex(&rec.host_ifname).ok_or_else(|| {
            anyhow!(
                "host interface {} does not exist on this node",
                rec.host_ifname
            )
        })
    }

    /// Records an attached pod (map entry, pod records) and answers.
    fn finish_add(&mut self, a: Attached) {
        self.pending.remove(&a.index);
        let result = a
            .result
            .with_context(|| format!("attaching tc_from_pod to {}", a.rec.host_ifname))
            .and_then(|()| self.commit_endpoint(a.rec, a.index));
        let resp = match result {
            Ok(()) => Response::ok(),
            Err(err) => Response::err(format!("{err:#}")),
        };
        let _ = a.reply.send(resp);
    }

    fn commit_endpoint(&mut self, rec: EndpointRecord, index: u32) -> anyhow::Result<()> {
        if let Some(dp) = self.dp.as_mut() {
            self.attached.insert(index);
            dp.put_endpoint(
                rec.ip,
                &Endpoint {
                    host_ifindex: index,
                    pod_mac: rec.mac.0,
                    _pad: [0; 2],
                },
            )?;
        }
        self.endpoints.insert(rec.ip, rec);
        self.save_endpoints()
    }

    fn del_endpoint(&mut self, ip: Ipv4Addr) -> anyhow::Result<()> {
        let rec = self.endpoints.remove(&ip);
        if let Some(dp) = self.dp.as_mut() {
            dp.remove_endpoint(ip)?;
            if let Some(rec) = rec {
                if let Some(index) = ebpf::ifindex(&rec.host_ifname) {
                    dp.detach_pod(index);
                    self.attached.remove(&index);
                }
            }
        }
        self.save_endpoints()
    }

    fn save_endpoints(&self) -> anyhow::Result<()> {
        let list: Vec<_> = self.endpoints.values().collect();
        write_atomic(
            &self.opts.endpoints_file(),
            &serde_json::to_vec_pretty(&list)?,
        )
        .context("saving pod records")
    }

    /// Registers pods the CNI plugin wired while this agent was not there
    /// to hear about it: a record in the plugin's dataDir whose host veth
    /// is on our bridge and whose address the IPAM plugin still holds.
    async fn adopt_cni_pods(&mut self) -> anyhow::Result<()> {
        let (records, bad) = crate::cni::record::list(&self.opts.cni_data_dir);
        if records.is_empty() {
            return Ok(());
        }
        for b in bad {
            tracing::debug!(record = %b, "unreadable CNI record");
        }
        let links = self.nl.links().await?;
        let Some(bridge) = links.iter().find(|l| l.name == self.opts.bridge) else {
            return Ok(());
        };
        let on_bridge: HashSet<&str> = links
            .iter()
            .filter(|l| l.controller == Some(bridge.index))
            .map(|l| l.name.as_str())
            .collect();
        let mut adopted = 0;
        for rec in records {
            let want = EndpointRecord {
                ip: rec.ip.addr(),
                mac: rec.mac,
                host_ifname: rec.host_ifname.clone(),
            };
            if rec.deleting
                || self.endpoints.get(&want.ip) == Some(&want)
                || !self.node.lease.subnet.contains(&want.ip)
                || !on_bridge.contains(rec.host_ifname.as_str())
                || !rec.ipam_holds()
            {
                continue;
            }
            tracing::info!(pod = %want.ip, container = %rec.container_id, host_if = %want.host_ifname, "registering a pod from the CNI plugin's records");
            self.endpoints.insert(want.ip, want);
            adopted += 1;
        }
        if adopted > 0 {
            self.save_endpoints()?;
        }
        Ok(())
    }

    /// One full pass. Errors are logged; the next pass retries.
    async fn reconcile(&mut self) {
        self.refresh_remotes();
        if let Err(err) = self.adopt_cni_pods().await {
            tracing::warn!(err = %format!("{err:#}"), "reading the CNI plugin's records");
        }
        if self.opts.ip_masq {
            match masq::present() {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("the ip-masq table is gone; installing it again");
                    if let Err(err) = masq::ensure(self.cfg.network, self.node.lease.subnet) {
                        tracing::warn!(%err, "installing the ip-masq rules");
                    }
                }
                Err(err) => tracing::warn!(%err, "checking the ip-masq rules"),
            }
        }
        if let Err(err) = self.reconcile_kernel().await {
            tracing::warn!(err = %format!("{err:#}"), "reconciling kernel objects");
        }
        if let Err(err) = self.reconcile_ebpf().await {
            tracing::warn!(err = %format!("{err:#}"), "reconciling the eBPF data path");
        }
    }

    async fn reconcile_kernel(&mut self) -> anyhow::Result<()> {
        let (_, vtep) = self.ensure_kernel_objects().await?;
        let want: HashMap<Ipv4Net, RemoteEntry> =
            self.remotes.iter().map(|r| (r.subnet, *r)).collect();
        let routes = self.nl.vtep_routes(vtep.index).await?;
        let neigh: HashMap<Ipv4Addr, MacAddr> = self
            .nl
            .vtep_neighbours(vtep.index)
            .await?
            .into_iter()
            .collect();
        let fdb: HashSet<(MacAddr, Option<IpAddr>)> =
            self.nl.vtep_fdb(vtep.index).await?.into_iter().collect();
        let have_routes: HashSet<Ipv4Net> = routes
            .iter()
            .filter(|r| Netlink::route_onlink(r))
            .filter_map(Netlink::route_dst)
            .collect();
        let stale: Vec<&RemoteEntry> = want
            .values()
            .filter(|r| {
                let ok = have_routes.contains(&r.subnet)
                    && neigh.get(&r.subnet.network()) == Some(&r.vtep_mac)
                    && fdb.contains(&(r.vtep_mac, Some(IpAddr::V4(r.public_ip))));
                if !ok {
                    tracing::debug!(
                        subnet = %r.subnet,
                        route = have_routes.contains(&r.subnet),
                        neighbour = ?neigh.get(&r.subnet.network()),
                        fdb = fdb.contains(&(r.vtep_mac, Some(IpAddr::V4(r.public_ip)))),
                        "reprogramming a remote"
                    );
                }
                !ok
            })
            .collect();
        let programmed = stale.len();
        // Each remote's neighbour, FDB entry and route go in Flannel's order;
        // different remotes are independent, so their requests are in flight
        // together rather than one netlink round trip after another.
        let nl = &self.nl;
        let vtep_index = vtep.index;
        concurrently(stale, |r| nl.program_remote(vtep_index, r)).await?;

        let old_routes: Vec<_> = routes
            .into_iter()
            .filter(|route| Netlink::route_dst(route).is_some_and(|d| !want.contains_key(&d)))
            .collect();
        let want_gw: HashMap<Ipv4Addr, MacAddr> = want
            .values()
            .map(|r| (r.subnet.network(), r.vtep_mac))
            .collect();
        let old_neigh: Vec<Ipv4Addr> = neigh
            .iter()
            .filter(|(ip, mac)| want_gw.get(ip) != Some(mac))
            .map(|(ip, _)| *ip)
            .collect();
        let want_fdb: HashSet<(MacAddr, Option<IpAddr>)> = want
            .values()
            .map(|r| (r.vtep_mac, Some(IpAddr::V4(r.public_ip))))
            .collect();
        let old_fdb: Vec<(MacAddr, Option<IpAddr>)> = fdb
            .iter()
            .filter(|e| !want_fdb.contains(e))
            .copied()
            .collect();
        let removed = old_routes.len() + old_neigh.len() + old_fdb.len();
        concurrently(old_routes, |route| nl.delete_route(route)).await?;
        concurrently(old_neigh, |ip| nl.delete_neighbour(vtep_index, ip)).await?;
        concurrently(old_fdb, |(mac, dst)| nl.delete_fdb(vtep_index, mac, dst)).await?;
        if programmed + removed > 0 {
            tracing::info!(
                programmed,
                removed,
                "kernel routes, neighbours and FDB updated"
            );
        }
        Ok(())
    }

    async fn reconcile_ebpf(&mut self) -> anyhow::Result<()> {
        if self.dp.is_none() {
            return Ok(());
        }
        let bridge = self.nl.require_link(&self.opts.bridge).await?;
        let uplink = self.node.uplink.clone();
        let cfg = Config {
            vni: self.cfg.backend.vni,
            udp_port: self.cfg.backend.port,
            node_ip: ebpf::ip_key(self.node.ip),
            uplink_ifindex: uplink.index,
            inner_mtu: self.pod_mtu(),
            flags: CONFIG_F_READY | if self.tc_decap { CONFIG_F_TC_DECAP } else { 0 },
            vtep_mac: self.node.vtep_mac.0,
            uplink_mac: uplink.mac.unwrap_or_default().0,
            gateway_mac: bridge.mac.unwrap_or_default().0,
            ..Default::default()
        };
        let vteps: HashSet<Ipv4Addr> = self.remotes.iter().map(|r| r.public_ip).collect();
        let remotes: HashMap<Ipv4Net, RemoteNode> = self
            .remotes
            .iter()
            .map(|r| {
                (
                    r.subnet,
                    RemoteNode {
                        node_ip: ebpf::ip_key(r.public_ip),
                        vtep_mac: r.vtep_mac.0,
                        _pad: [0; 2],
                    },
                )
            })
            .collect();

        // Pods whose interface vanished are gone: forget them. One listing
        // of the node's links serves every pod.
        let indexes: HashMap<String, u32> = self
            .nl
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name, l.index))
            .collect();
        let mut live = BTreeMap::new();
        for (ip, rec) in &self.endpoints {
            match indexes.get(&rec.host_ifname) {
                Some(index) => {
                    live.insert(*ip, (rec.clone(), *index));
                }
                None => {
                    tracing::info!(pod = %ip, ifname = %rec.host_ifname, "pod interface gone; removing")
                }
            }
        }
        let vanished = live.len() != self.endpoints.len();

        let dp = self.dp.as_mut().expect("checked above");
        dp.set_config(&cfg)?;
        let (rs, rr) = dp.sync_remotes(&remotes)?;
        let (vs, vr) = dp.sync_vteps(&vteps)?;
        if rs + rr + vs + vr > 0 {
            tracing::info!(
                set = rs,
                removed = rr,
                vteps_set = vs,
                vteps_removed = vr,
                "remote subnets updated"
            );
        }
        let in_map = dp.endpoints()?;
        let pinned: HashSet<u32> = dp.pinned_pod_links().into_iter().collect();
        for (ip, (rec, index)) in &live {
            if !self.attached.contains(index) || !pinned.contains(index) {
                dp.attach_pod(&rec.host_ifname, *index)?;
                self.attached.insert(*index);
            }
            let want = Endpoint {
                host_ifindex: *index,
                pod_mac: rec.mac.0,
                _pad: [0; 2],
            };
            if in_map.get(ip) != Some(&want) {
                dp.put_endpoint(*ip, &want)?;
            }
        }
        for ip in in_map.keys().filter(|ip| !live.contains_key(ip)) {
            dp.remove_endpoint(*ip)?;
        }
        let live_indexes: HashSet<u32> = live.values().map(|(_, i)| *i).collect();
        for index in pinned {
            if !live_indexes.contains(&index) && !self.pending.contains(&index) {
                dp.detach_pod(index);
                self.attached.remove(&index);
            }
        }
        if vanished {
            self.endpoints = live.into_iter().map(|(ip, (rec, _))| (ip, rec)).collect();
            self.save_endpoints()?;
        }
        Ok(())
    }
}

/// Netlink requests kept in flight at once by [`concurrently`]: enough to
/// hide the round trips, few enough not to fill the socket's buffers.
const NETLINK_IN_FLIGHT: usize = 64;

/// Runs `f` on every item with up to [`NETLINK_IN_FLIGHT`] at a time. One
/// failing item does not hold back the others: every item is tried, and
/// the first error is returned at the end.
async fn concurrently<T, E, F, Fut>(items: Vec<T>, f: F) -> Result<(), E>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    use futures::StreamExt;
    let mut results = futures::stream::iter(items)
        .map(f)
        .buffer_unordered(NETLINK_IN_FLIGHT);
    let mut first = None;
    while let Some(r) = results.next().await {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

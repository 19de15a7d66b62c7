//! Start-up, the event loop and shutdown. The agent gets this node's
//! lease, picks the data path, then runs one reconcile pass at start,
//! whenever the lease set changes, on SIGHUP and on a timer; each pass
//! observes, computes the desired state, diffs and applies (see
//! [`crate::reconcile`]). API calls add or remove their own pod at once
//! and answer `status`, `inspect` and `trace` from a fresh observation.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use anyhow::{anyhow, bail, Context};
use flannel_common::VXLAN_ENCAP_LEN;
use ipnet::IpNet;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use super::{
    pods::Pods,
    store::{self, LeaseFeed},
    uplink, Options,
};
use crate::{
    api::{Inspect, Request, Response, Status},
    config::{BackendType, NetConfig},
    datapath::{self, Active},
    mac::MacAddr,
    metrics::Metrics,
    netlink::Netlink,
    reconcile::{
        self, desired::Ignored, diff::Op, observe::Devices, EbpfMode, Inputs, Node, Report,
    },
    server::{self, socket::ApiCall},
    subnet::{env::SubnetEnv, LeaseAttrs, LeaseSet, SubnetManager},
};

struct Agent {
    opts: Options,
    cfg: NetConfig,
    nl: Netlink,
    node: Node,
    store: SubnetManager,
    datapath: Active,
    /// Why this data path is the one.
    reason: String,
    /// The lease set last published by the store (kept while it is away).
    leases: LeaseSet,
    feed: LeaseFeed,
    pods: Pods,
    /// The last pass's usable remote leases, and the unusable ones
    /// (logged once each).
    remotes: usize,
    ignored: BTreeMap<IpNet, Ignored>,
    /// What this process last wrote to the masquerade table.
    masq_written: Option<reconcile::desired::MasqSpec>,
    guard_written: Option<reconcile::desired::GuardSpec>,
    /// On the kernel path, pods were added or deleted since the last
    /// pass: the bridge guard's pod set is behind until one runs.
    pods_changed: bool,
    /// Whether pod traffic crosses the forward hook, and why (the last
    /// pass's decision; logged when it changes).
    netfilter: Option<(bool, String)>,
    metrics: Arc<Metrics>,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    // Before any syscall that would fail with a bare EPERM.
    crate::caps::check(opts.datapath, opts.api_group.is_some())?;
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("creating run directory {}", opts.run_dir.display()))?;
    let nl = Netlink::connect()?;
    let metrics = Arc::new(Metrics::new());
    // Liveness and metrics from the first moment; readiness once the node
    // can take pods.
    let readiness = Arc::new(server::http::Readiness::default());
    if let Some(addr) = opts.healthz {
        let l = server::http::listen(addr)
            .with_context(|| format!("binding the healthz port {addr}"))?;
        tokio::spawn(server::http::serve(l, metrics.clone(), readiness.clone()));
    }

    let store = store::retry("connecting to the lease store", || {
        store::connect(&opts.store, opts.timing)
    })
    .await;
    // A bad config is refused at once; a store that has none yet is waited for.
    let cfg = loop {
        let read = store::network_config(&store, &opts.net_config_path);
        match store::counted(&metrics, store.name(), "config", read).await {
            Ok(cfg) => break cfg,
            Err(err) if matches!(store, SubnetManager::Etcd(_)) && !is_config_error(&err) => {
                tracing::warn!(err = %format!("{err:#}"), "waiting for the network config");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(err) => return Err(err),
        }
    };

    let mut public_ip = opts.public_ip;
    if let (None, SubnetManager::Kube(k)) = (public_ip, &store) {
        public_ip = store::retry("reading this node's node-public-ip", || async {
            Ok(store::counted(&metrics, "kube", "node", k.node_public_ip()).await?)
        })
        .await;
    }
    let (uplink, ip) = uplink::choose(
        &nl,
        &opts.iface,
        &opts.iface_regex,
        public_ip,
        cfg.enable_ipv4,
    )
    .await?;
    // Pod routes must not shadow the node network.
    let uplink_nets = nl.ipv4_addrs(uplink.index).await?;
    for addr in uplink_nets.iter().filter(|_| cfg.enable_ipv4) {
        crate::config::check_uplink_overlap(cfg.network, *addr)?;
    }
    // Flannel's host-gw check: other nodes route to the public IP as a
    // gateway, so it must be the uplink's own.
    if cfg.enable_ipv4
        && cfg.backend.kind == BackendType::HostGw
        && !uplink_nets.iter().any(|n| n.addr() == ip)
    {
        bail!(
            "your PublicIP {ip} differs from interface IP (uplink {}: {:?}), meaning that probably you're on a NAT, which is not supported by host-gw backend",
            uplink.name,
            uplink_nets.iter().map(|n| n.addr().to_string()).collect::<Vec<_>>()
        );
    }
    let vtep_name = format!("flannel.{}", cfg.backend.vni);
    // Flannel keeps the VTEP's MAC across restarts; so do we.
    let vtep_mac = match nl.link_by_name(&vtep_name).await?.and_then(|l| l.mac) {
        Some(mac) if mac.is_unicast() => mac,
        _ => MacAddr::for_vtep(ip, cfg.backend.vni),
    };
    // IPv6: the node's public IPv6 (the uplink's first global one unless
    // given) and the VtepMAC of flannel-v6.<VNI>, kept across restarts.
    let (ip6, vtep6_mac) = if cfg.enable_ipv6 {
        let ip6 = match opts.public_ipv6 {
            Some(ip6) => ip6,
            None => nl
                .ipv6_addrs(uplink.index)
                .await?
                .first()
                .map(|n| n.addr())
                .ok_or_else(|| {
                    anyhow!(
                        "EnableIPv6: the uplink {} has no global IPv6 address; give one or pass --public-ipv6",
                        uplink.name
                    )
                })?,
        };
        let name6 = format!("flannel-v6.{}", cfg.backend.vni);
        let mac6 = match nl.link_by_name(&name6).await?.and_then(|l| l.mac) {
            Some(mac) if mac.is_unicast() => mac,
            _ => MacAddr::for_vtep6(ip6, cfg.backend.vni),
        };
        // Flannel's host-gw check for IPv6, as for IPv4 above.
        if cfg.backend.kind == BackendType::HostGw
            && !nl
                .ipv6_addrs(uplink.index)
                .await?
                .iter()
                .any(|n| n.addr() == ip6)
        {
            bail!(
                "your PublicIPv6 {ip6} differs from interface IP (uplink {}), meaning that probably you're on a NAT, which is not supported by host-gw backend",
                uplink.name
            );
        }
        (Some(ip6), mac6)
    } else {
        (
            None,
            MacAddr::for_vtep6(std::net::Ipv6Addr::UNSPECIFIED, cfg.backend.vni),
        )
    };
    let mut attrs = match cfg.backend.kind {
        BackendType::Vxlan => LeaseAttrs::vxlan(ip, cfg.backend.vni, vtep_mac),
        BackendType::HostGw => LeaseAttrs::host_gw(ip),
    };
    // An IPv6-only node has no IPv4 side: Flannel leaves its VXLAN
    // BackendData out (null) and its PublicIP empty.
    if !cfg.enable_ipv4 {
        attrs.backend_data = serde_json::Value::Null;
    }
    // Flannel's host-gw lease has the public IPv6 and no BackendV6Data.
    match (ip6, cfg.backend.kind) {
        (Some(ip6), BackendType::Vxlan) => attrs = attrs.with_v6(ip6, cfg.backend.vni, vtep6_mac),
        (Some(ip6), BackendType::HostGw) => attrs.public_ipv6 = Some(ip6),
        (None, _) => {}
    }
    let previous = store::previous_subnet(&opts.subnet_file);
    let previous6 = store::previous_subnet6(&opts.subnet_file);
    let lease = store::retry("acquiring a subnet lease", || async {
        let acquire = store.acquire(&cfg, &attrs, previous, previous6);
        Ok(store::counted(&metrics, store.name(), "acquire", acquire).await?)
    })
    .await;
    metrics.renewed_now();
    tracing::info!(
        store = store.name(),
        uplink = %uplink.name,
        ip = %lease.public_addr(),
        subnet = %lease.id(),
        vtep_mac = %vtep_mac,
        "lease acquired"
    );
    if let (Some(mtu), BackendType::Vxlan) = (cfg.backend.mtu, cfg.backend.kind) {
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

    let mut feed = store::spawn_watch(store.clone(), metrics.clone());
    // The first full listing decides which remote state is stale; until it
    // arrives, whatever is programmed keeps forwarding.
    let first = feed
        .wait_for(|s| s.is_some())
        .await
        .map_err(|_| anyhow!("the lease watch stopped"))?
        .clone()
        .unwrap_or_default();
    let mut fatal = store::spawn_renew(
        store.clone(),
        lease.clone(),
        opts.timing,
        feed.clone(),
        metrics.clone(),
    );
    let (pods, mut attached_rx) = Pods::load(opts.endpoints_file())?;
    let selected = datapath::select(
        opts.datapath,
        opts.xdp_mode,
        &opts.bpf_dir,
        &uplink,
        cfg.lease_slots(),
    )?;
    let bpf_dir = matches!(selected.active, Active::Ebpf { .. }).then(|| opts.bpf_dir.clone());
    metrics.set_datapath(selected.active.name(), selected.xdp_mode, bpf_dir);

    let uplink_nets6 = nl.ipv6_addrs(uplink.index).await?;
    let mut agent = Agent {
        opts,
        cfg,
        nl,
        node: Node {
            uplink,
            uplink_nets,
            uplink_nets6,
            ip,
            ip6,
            lease,
            vtep_mac,
            vtep6_mac,
        },
        store,
        datapath: selected.active,
        reason: selected.reason,
        leases: first,
        feed,
        pods,
        remotes: 0,
        ignored: BTreeMap::new(),
        masq_written: None,
        guard_written: None,
        pods_changed: false,
        netfilter: None,
        metrics,
    };
    // At start, devices and masquerading that cannot be set up are fatal,
    // as a bad config is: retrying would not fix them.
    let report = agent.reconcile("start").await;
    if let Some((op, err)) = report
        .failed
        .iter()
        .find(|(op, _)| matches!(op, Op::Device(_) | Op::Masq(_)))
    {
        bail!("{op}: {err}");
    }
    // subnet.env last: the CNI plugin may create pods once it exists.
    let env = SubnetEnv::of(
        Some((agent.cfg.network, agent.node.lease.subnet)).filter(|_| agent.cfg.enable_ipv4),
        agent.cfg.ipv6_network.zip(agent.node.lease.ipv6_subnet),
        agent.node.pod_mtu(&agent.cfg),
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
        let (k, metrics) = (k.clone(), agent.metrics.clone());
        tokio::spawn(async move {
            store::retry("setting NetworkUnavailable=False", || async {
                let mark = k.mark_network_available();
                Ok(store::counted(&metrics, "kube", "status", mark).await?)
            })
            .await
        });
    }

    let socket = agent.opts.socket();
    let access = server::socket::Access {
        group: agent.opts.api_group,
    };
    let listener = server::socket::bind(&socket, access)?;
    let (tx, mut rx) = mpsc::channel::<ApiCall>(64);
    tokio::spawn(server::socket::accept_loop(listener, tx, access));
    readiness.set_ready();

    let mut tick = tokio::time::interval(agent.opts.resync);
    tick.tick().await;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tracing::info!(socket = %socket.display(), subnet_file = %agent.opts.subnet_file.display(), "ready");
    let result = loop {
        tokio::select! {
            _ = tick.tick() => { agent.reconcile("resync").await; }
            _ = hup.recv() => { agent.reconcile("signal").await; }
            changed = agent.feed.changed() => {
                if changed.is_err() {
                    break Err(anyhow!("the lease watch stopped"));
                }
                let set = agent.feed.borrow_and_update().clone();
                if let Some(set) = set {
                    let started = Instant::now();
                    agent.leases = set;
                    agent.reconcile("leases").await;
                    tracing::debug!(took = ?started.elapsed(), leases = agent.leases.len(), "lease change applied");
                }
            }
            Some((req, reply)) = rx.recv() => {
                let changes_pods = matches!(req, Request::Add(_) | Request::Del { .. });
                agent.handle(req, reply).await;
                agent.publish_state();
                // On the kernel path no program checks pod sources: the
                // bridge guard does, and must learn the new pod set. One
                // pass once a burst of calls has drained (the callers
                // have their answers already).
                agent.pods_changed |= changes_pods && agent.datapath.ebpf().is_none();
                if agent.pods_changed && rx.is_empty() {
                    agent.pods_changed = false;
                    agent.reconcile("api").await;
                }
            }
            Some(done) = attached_rx.recv() => {
                agent.pods.finish_add(agent.datapath.ebpf(), done);
                agent.publish_state();
            }
            Some(err) = fatal.recv() => break Err(err),
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
        }
    };
    // Pinned maps and links stay: the data path keeps forwarding, and so
    // do the guard tables that go with it. On the kernel path the agent
    // leaves nothing of its own: the guards go (they would keep new nodes
    // out with nobody to follow the leases), so that uninstalling and
    // going back to Flannel, both done from the kernel path, leave none.
    let _ = std::fs::remove_file(&socket);
    if agent.datapath.ebpf().is_none() {
        if let Err(err) = crate::guard::remove() {
            tracing::warn!(%err, "removing the guard tables");
        }
    }
    tracing::info!("stopped; the data path stays in place");
    result
}

/// A config that is there but wrong: waiting will not fix it.
fn is_config_error(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<crate::config::ConfigError>().is_some())
}

impl Agent {
    fn status(&self) -> Status {
        Status {
            datapath: self.datapath.name().into(),
            reason: self.reason.clone(),
            // The lease by its id: the IPv6 subnet in an IPv6-only cluster.
            subnet: self.node.lease.id().to_string(),
            remote_leases: self.remotes,
            endpoints: self.pods.records().len(),
            subnet_manager: self.store.name().into(),
            public_ip: self.node.lease.public_addr().to_string(),
            ignored_leases: self.ignored.len(),
        }
    }

    async fn handle(&mut self, req: Request, reply: oneshot::Sender<Response>) {
        let reply = match &req {
            Request::Add(_) => counted_reply(self.metrics.clone(), "add", reply),
            Request::Del { .. } => counted_reply(self.metrics.clone(), "del", reply),
            _ => reply,
        };
        let resp = match req {
            Request::Status {} => Response {
                status: Some(self.status()),
                ..Response::ok()
            },
            Request::List {} => Response {
                endpoints: Some(self.pods.records().values().cloned().collect()),
                ..Response::ok()
            },
            Request::Trace {
                src,
                dst,
                proto,
                dport,
            } => {
                let q = reconcile::trace::Query {
                    src,
                    dst,
                    proto: proto.unwrap_or_else(|| "udp".into()),
                    dport,
                };
                match self.trace(&q).await {
                    Ok(t) => Response {
                        trace: Some(t),
                        ..Response::ok()
                    },
                    Err(err) => Response::err(format!("{err:#}")),
                }
            }
            Request::Inspect {} => match self.inspect().await {
                Ok(i) => Response {
                    inspect: Some(Box::new(i)),
                    ..Response::ok()
                },
                Err(err) => Response::err(format!("{err:#}")),
            },
            // Answered once its TC program is attached.
            Request::Add(rec) => {
                let (bridge, host) = match self.host_links(&rec.host_ifname).await {
                    Ok(found) => found,
                    Err(err) => {
                        let _ = reply.send(Response::err(format!("{err:#}")));
                        return;
                    }
                };
                return self.pods.begin_add(
                    &self.node,
                    bridge,
                    host.as_ref(),
                    self.datapath.ebpf(),
                    rec,
                    reply,
                );
            }
            Request::Del { ip } => match self.pods.delete(self.datapath.ebpf(), ip) {
                Ok(()) => Response::ok(),
                Err(err) => Response::err(format!("{err:#}")),
            },
        };
        let _ = reply.send(resp);
    }

    /// The pod bridge's index and a pod's host interface, as netlink
    /// sees them now (an `add` is checked against them).
    async fn host_links(
        &self,
        host_ifname: &str,
    ) -> anyhow::Result<(Option<u32>, Option<crate::agent::pods::HostLink>)> {
        let bridge = self.nl.link_by_name(&self.opts.bridge).await?;
        let host = self.nl.link_by_name(host_ifname).await?;
        Ok((
            bridge.map(|b| b.index),
            host.map(|h| crate::agent::pods::HostLink {
                index: h.index,
                controller: h.controller,
            }),
        ))
    }

    /// One full pass: observe, desired state, diff, apply. Failures are
    /// logged (naming their object) and reported; the next pass retries.
    /// `trigger` says what asked for it (`start`, `leases`, `api`,
    /// `resync`, `signal`).
    async fn reconcile(&mut self, trigger: &'static str) -> Report {
        let started = Instant::now();
        let report = self.pass().await;
        self.metrics.pass(trigger, started.elapsed(), &report);
        self.publish_state();
        report
    }

    /// Leases, remotes and pods, as the gauges show them.
    fn publish_state(&self) {
        self.metrics.set_state(
            self.leases.len(),
            self.remotes,
            self.ignored.len(),
            self.pods.records().len(),
        );
    }

    async fn pass(&mut self) -> Report {
        let observed = match self.observe().await {
            Ok(o) => o,
            Err(err) => {
                tracing::warn!(%err, "reading the node's links and addresses; retrying at the next pass");
                return Report::default();
            }
        };
        // The uplink may have been replaced or flapped; refresh what we know.
        if let Some(up) = observed.links.get(&self.node.uplink.name) {
            if !up.up {
                tracing::warn!(uplink = %up.name, "uplink is down");
            }
            self.node.uplink = up.clone();
            self.node.uplink_nets = observed.uplink_addrs.clone();
            self.node.uplink_nets6 = observed.uplink_addrs6.clone();
        }
        self.decide_netfilter();
        if let Err(err) = self.pods.adopt(
            &self.opts.cni_data_dir,
            &self.node,
            &observed.links,
            &self.opts.bridge,
        ) {
            tracing::warn!(err = %format!("{err:#}"), "reading the CNI plugin's records");
        }
        let want = self.desired();
        for (subnet, i) in &want.ignored {
            if !self.ignored.contains_key(subnet) {
                tracing::warn!(%subnet, node = %i.node, why = %i.why, "ignoring a lease");
            }
        }
        // Remote leases, each once: over VXLAN or routed directly (its
        // IPv6 side, routed either way, is the same lease); in an
        // IPv6-only cluster each lease is its IPv6 side.
        self.remotes = if self.cfg.enable_ipv4 {
            want.remotes.len() + want.direct.keys().filter(|n| n.addr().is_ipv4()).count()
        } else {
            want.remotes6.len() + want.direct.keys().filter(|n| n.addr().is_ipv6()).count()
        };
        self.ignored = want.ignored.clone();
        let ops = reconcile::diff(&want, &observed);
        let report = reconcile::apply(
            ops,
            reconcile::Target {
                nl: &self.nl,
                dp: self.datapath.ebpf(),
                vtep: want
                    .vtep
                    .as_ref()
                    .and_then(|v| observed.links.get(&v.link.name))
                    .map(|l| l.index),
                vtep6: want
                    .vtep6
                    .as_ref()
                    .and_then(|v| observed.links.get(&v.link.name))
                    .map(|l| l.index),
                masq_written: &mut self.masq_written,
                guard_written: &mut self.guard_written,
            },
        )
        .await;
        if let Err(err) = self.pods.forget(&report.forgotten) {
            tracing::warn!(err = %format!("{err:#}"), "saving pod records");
        }
        report
    }

    async fn observe(&mut self) -> Result<reconcile::Observed, crate::netlink::NetlinkError> {
        let vtep = format!("flannel.{}", self.cfg.backend.vni);
        let vtep6 = format!("flannel-v6.{}", self.cfg.backend.vni);
        let devices = Devices {
            bridge: &self.opts.bridge,
            vtep: &vtep,
            vtep6: &vtep6,
            uplink: &self.node.uplink.name,
        };
        reconcile::observe(
            &self.nl,
            self.datapath.ebpf(),
            &devices,
            self.masq_written,
            self.guard_written.as_ref(),
        )
        .await
    }

    fn desired(&self) -> reconcile::Desired {
        reconcile::desired(&Inputs {
            node: &self.node,
            cfg: &self.cfg,
            bridge: &self.opts.bridge,
            leases: &self.leases,
            pods: self.pods.records(),
            attaching: self.pods.attaching(),
            ebpf: matches!(self.datapath, Active::Ebpf { .. }).then(|| EbpfMode {
                tc_decap: self.datapath.tc_decap(),
                strict_source: self.opts.vxlan_source_check
                    == crate::datapath::VxlanSourceCheck::Strict,
                netfilter: self.netfilter.as_ref().is_some_and(|(on, _)| *on),
            }),
            ip_masq: self.opts.ip_masq,
        })
    }

    /// On the eBPF path, whether pod traffic must cross the kernel's
    /// forward hook: `--netfilter-compat on|off`, or with `auto` whether
    /// the node has forward-path rules now. Logged and shown in the
    /// metrics when the answer changes.
    fn decide_netfilter(&mut self) {
        use crate::netfilter::Compat;
        if self.datapath.ebpf().is_none() {
            return;
        }
        let (on, why) = match self.opts.netfilter_compat {
            Compat::On => (true, "--netfilter-compat on".to_string()),
            Compat::Off => (false, "--netfilter-compat off".to_string()),
            Compat::Auto => match crate::netfilter::forward_chains() {
                Ok(found) if found.is_empty() => (
                    false,
                    "no forward-path rules on the node (nftables, iptables)".to_string(),
                ),
                Ok(found) => (
                    true,
                    format!(
                        "forward-path rules on the node: {}",
                        found
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                ),
                // Unknown: the safe side.
                Err(err) => (true, format!("the node's firewall cannot be read ({err})")),
            },
        };
        if self.netfilter.as_ref() != Some(&(on, why.clone())) {
            if on {
                tracing::info!(reason = %why, "netfilter compatibility on: pod traffic crosses the kernel's forward hook");
            } else {
                tracing::info!(reason = %why, "netfilter compatibility off: the full eBPF fast path");
            }
            self.metrics.set_netfilter_compat(on);
            self.netfilter = Some((on, why));
        }
    }

    /// One packet's path on this node, for `flannel-agent trace`.
    async fn trace(&mut self, q: &reconcile::trace::Query) -> anyhow::Result<crate::api::Trace> {
        let observed = self
            .observe()
            .await
            .context("reading the node's links and addresses")?;
        Ok(reconcile::trace::trace(
            &self.desired(),
            &observed,
            self.node.ip,
            q,
        ))
    }

    /// The node's state object by object, for `flannel-agent inspect`.
    async fn inspect(&mut self) -> anyhow::Result<Inspect> {
        let observed = self
            .observe()
            .await
            .context("reading the node's links and addresses")?;
        let counters = match self.datapath {
            Active::Ebpf { .. } => datapath::ebpf::counters_by_name(&self.opts.bpf_dir)
                .with_context(|| {
                    format!(
                        "reading the data path counters pinned under {}",
                        self.opts.bpf_dir.display()
                    )
                })?,
            Active::Kernel => BTreeMap::new(),
        };
        Ok(reconcile::inspect::inspect(
            self.status(),
            &self.desired(),
            &observed,
            counters,
        ))
    }
}

/// A reply channel that counts the answer and its latency as CNI
/// request `op` before passing it on.
fn counted_reply(
    metrics: Arc<Metrics>,
    op: &'static str,
    reply: oneshot::Sender<Response>,
) -> oneshot::Sender<Response> {
    let (tx, rx) = oneshot::channel::<Response>();
    let started = Instant::now();
    tokio::spawn(async move {
        if let Ok(resp) = rx.await {
            metrics.cni_request(op, resp.ok, started.elapsed());
            let _ = reply.send(resp);
        }
    });
    tx
}

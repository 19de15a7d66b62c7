//! The pod registry: the pods registered with this agent, by the CNI
//! plugin over the API socket or adopted from the plugin's records, kept
//! in `endpoints.json` so that a restarted agent knows them. Adding a pod
//! attaches `tc_from_pod` to its host veth before the answer goes back;
//! the reconciler then keeps the pod's map entry and link in step.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context};
use flannel_common::Endpoint;
use tokio::sync::{mpsc, oneshot};

use crate::{
    api::{EndpointRecord, Response},
    cni::record::Record,
    datapath::ebpf::{self, Datapath},
    fsutil::write_atomic,
    netlink::Link,
    reconcile::Node,
};

/// A pod's TC program attached on a worker thread, back to the loop.
pub struct Attached {
    rec: EndpointRecord,
    index: u32,
    result: std::io::Result<()>,
    reply: oneshot::Sender<Response>,
}

pub struct Pods {
    file: PathBuf,
    records: BTreeMap<Ipv4Addr, EndpointRecord>,
    /// Pod interfaces whose TC program is being attached right now.
    attaching: BTreeSet<u32>,
    /// Where attach workers report back.
    attached_tx: mpsc::UnboundedSender<Attached>,
}

impl Pods {
    /// The registry saved in `file` (empty when there is none yet), and
    /// the channel its attach workers answer on.
    pub fn load(file: PathBuf) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<Attached>)> {
        let records = read_records(&file)?;
        let (attached_tx, rx) = mpsc::unbounded_channel();
        let pods = Pods {
            file,
            records,
            attaching: BTreeSet::new(),
            attached_tx,
        };
        Ok((pods, rx))
    }

    pub fn records(&self) -> &BTreeMap<Ipv4Addr, EndpointRecord> {
        &self.records
    }

    pub fn attaching(&self) -> &BTreeSet<u32> {
        &self.attaching
    }

    /// Checks a pod and starts attaching its TC program. A tcx attach
    /// waits for an RCU grace period in the kernel; done on a worker
    /// thread, many pods being added at once overlap their waits instead
    /// of queueing behind each other on the agent's loop. The answer goes
    /// out from [`Pods::finish_add`].
    #[allow(clippy::too_many_arguments)]
    pub fn begin_add(
        &mut self,
        node: &Node,
        bridge: Option<u32>,
        host: Option<&HostLink>,
        dp: Option<&mut Datapath>,
        rec: EndpointRecord,
        reply: oneshot::Sender<Response>,
    ) {
        let index = match check(node, &self.records, bridge, host, &rec) {
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
        let Some(dp) = dp else {
            return self.finish_add(None, done(Ok(())));
        };
        if dp.pod_link_alive(index) {
            // Pinned by an earlier run: take it over (no grace period).
            let r = dp
                .attach_pod(&rec.host_ifname, index)
                .map_err(std::io::Error::other);
            return self.finish_add(Some(dp), done(r));
        }
        let prog = match dp.pod_program() {
            Ok(p) => p,
            Err(err) => return self.finish_add(Some(dp), done(Err(std::io::Error::other(err)))),
        };
        let pin = dp.pod_link_path(index);
        self.attaching.insert(index);
        let tx = self.attached_tx.clone();
        let mut msg = done(Ok(()));
        tokio::task::spawn_blocking(move || {
            use std::os::fd::AsFd;
            msg.result = ebpf::attach_tcx_ingress_pinned(prog.as_fd(), index, &pin);
            let _ = tx.send(msg);
        });
    }

    /// Records an attached pod (map entry, registry) and answers.
    pub fn finish_add(&mut self, dp: Option<&mut Datapath>, a: Attached) {
        self.attaching.remove(&a.index);
        let result = a
            .result
            .with_context(|| format!("attaching tc_from_pod to {}", a.rec.host_ifname))
            .and_then(|()| self.commit(dp, a.rec, a.index));
        let resp = match result {
            Ok(()) => Response::ok(),
            Err(err) => Response::err(format!("{err:#}")),
        };
        let _ = a.reply.send(resp);
    }

    fn commit(
        &mut self,
        dp: Option<&mut Datapath>,
        rec: EndpointRecord,
        index: u32,
    ) -> anyhow::Result<()> {
        if let Some(dp) = dp {
            dp.attached_pod(index);
            let ep = Endpoint {
                host_ifindex: index,
                pod_mac: rec.mac.0,
                _pad: [0; 2],
            };
            dp.put_endpoint(rec.ip, &ep)?;
            if let Some(ip6) = rec.ip6 {
                dp.put_endpoint6(ip6, &ep)?;
            }
        }
        self.records.insert(rec.ip, rec);
        self.save()
    }

    /// Removes a pod: its record, map entry and pinned link.
    pub fn delete(&mut self, dp: Option<&mut Datapath>, ip: Ipv4Addr) -> anyhow::Result<()> {
        let rec = self.records.remove(&ip);
        if let Some(dp) = dp {
            // The interface may be gone already (its namespace deleted
            // before DEL): the map entry still names the ifindex its
            // pinned link was made for.
            let index = dp
                .endpoint(ip)?
                .map(|ep| ep.host_ifindex)
                .or_else(|| rec.as_ref().and_then(|r| ebpf::ifindex(&r.host_ifname)));
            dp.remove_endpoint(ip)?;
            if let Some(ip6) = rec.as_ref().and_then(|r| r.ip6) {
                dp.remove_endpoint6(ip6)?;
            }
            if let Some(index) = index {
                dp.detach_pod(index);
            }
        }
        self.save()
    }

    /// Drops the records of pods whose interface the reconciler found gone.
    pub fn forget(&mut self, ips: &[Ipv4Addr]) -> anyhow::Result<()> {
        if ips.is_empty() {
            return Ok(());
        }
        for ip in ips {
            if let Some(rec) = self.records.remove(ip) {
                tracing::info!(pod = %ip, ifname = %rec.host_ifname, "pod interface gone; removing");
            }
        }
        self.save()
    }

    /// Registers pods the CNI plugin wired while this agent was not there
    /// to hear about it: a record in the plugin's dataDir whose host veth
    /// is on our bridge and whose address the IPAM plugin still holds.
    pub fn adopt(
        &mut self,
        cni_data_dir: &Path,
        node: &Node,
        links: &BTreeMap<String, Link>,
        bridge: &str,
    ) -> anyhow::Result<()> {
        let (records, bad) = crate::cni::record::list(cni_data_dir);
        if records.is_empty() {
            return Ok(());
        }
        for b in bad {
            tracing::debug!(record = %b, "unreadable CNI record");
        }
        let Some(bridge) = links.get(bridge) else {
            return Ok(());
        };
        let on_bridge = |rec: &Record| {
            links
                .get(&rec.host_ifname)
                .is_some_and(|l| l.controller == Some(bridge.index))
        };
        let mut adopted = 0;
        for rec in records {
            let want = rec.endpoint();
            if rec.deleting
                || self.records.get(&want.ip) == Some(&want)
                || !node.lease.subnet.contains(&want.ip)
                || !on_bridge(&rec)
                || !rec.ipam_holds()
            {
                continue;
            }
            tracing::info!(pod = %want.ip, container = %rec.container_id, host_if = %want.host_ifname, "registering a pod from the CNI plugin's records");
            self.records.insert(want.ip, want);
            adopted += 1;
        }
        if adopted > 0 {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> anyhow::Result<()> {
        let list: Vec<_> = self.records.values().collect();
        write_atomic(&self.file, &serde_json::to_vec_pretty(&list)?)
            .with_context(|| format!("saving pod records {}", self.file.display()))
    }
}

/// What the agent's end of a pod's veth must be: a port of the node's
/// pod bridge (so neither `lo`, the uplink nor any other interface of the
/// node gets a pod's program and map entry), as netlink reports it.
#[derive(Clone, Debug)]
pub struct HostLink {
    pub index: u32,
    pub controller: Option<u32>,
}

/// Checks an `add`: an address of the lease that a pod can hold (not the
/// network, gateway or broadcast address), a unicast MAC, a host
/// interface that is a port of the bridge (`bridge`: its index) and not
/// the uplink or `lo`, and an address no other live endpoint holds.
/// Returns the host interface's index.
fn check(
    node: &Node,
    records: &BTreeMap<Ipv4Addr, EndpointRecord>,
    bridge: Option<u32>,
    host: Option<&HostLink>,
    rec: &EndpointRecord,
) -> anyhow::Result<u32> {
    let subnet = node.lease.subnet;
    let Some(gateway) = node.gateway() else {
        bail!("pod IP {} given, but this node has no IPv4 lease", rec.ip);
    };
    if !subnet.contains(&rec.ip) {
        bail!("pod IP {} is not in this node's lease {subnet}", rec.ip);
    }
    for (addr, what) in [
        (subnet.network(), "network"),
        (gateway.addr(), "gateway"),
        (subnet.broadcast(), "broadcast"),
    ] {
        if rec.ip == addr {
            bail!(
                "pod IP {} is the {what} address of this node's lease {subnet}",
                rec.ip
            );
        }
    }
    if let Some(ip6) = rec.ip6 {
        let Some(lease6) = node.lease.ipv6_subnet else {
            bail!("pod IPv6 {ip6} given, but this node has no IPv6 lease");
        };
        if !lease6.contains(&ip6) {
            bail!("pod IPv6 {ip6} is not in this node's IPv6 lease {lease6}");
        }
        let first = u128::from(lease6.network());
        if u128::from(ip6) == first || u128::from(ip6) == first + 1 {
            bail!("pod IPv6 {ip6} is the network or gateway address of this node's IPv6 lease {lease6}");
        }
    }
    if !rec.mac.is_unicast() {
        bail!("pod MAC {} is not a unicast address", rec.mac);
    }
    let name = &rec.host_ifname;
    if name == "lo" {
        bail!("host interface {name} is the loopback, not a pod's veth");
    }
    if *name == node.uplink.name {
        bail!("host interface {name} is the node's uplink, not a pod's veth");
    }
    let host = host.ok_or_else(|| anyhow!("host interface {name} does not exist on this node"))?;
    if host.index == node.uplink.index {
        bail!("host interface {name} is the node's uplink, not a pod's veth");
    }
    match bridge {
        Some(b) if host.controller == Some(b) => {}
        Some(_) => bail!("host interface {name} is not a port of the pod bridge"),
        None => bail!("the pod bridge does not exist yet; host interface {name} cannot be on it"),
    }
    // Another endpoint with this address whose interface is still there
    // holds it (a stale record, its veth gone, gives way).
    if let Some(other) = records.get(&rec.ip) {
        if other.host_ifname != *name && ebpf::ifindex(&other.host_ifname).is_some() {
            bail!(
                "pod IP {} is held by the endpoint on {}; delete it first",
                rec.ip,
                other.host_ifname
            );
        }
    }
    Ok(host.index)
}

fn read_records(path: &Path) -> anyhow::Result<BTreeMap<Ipv4Addr, EndpointRecord>> {
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

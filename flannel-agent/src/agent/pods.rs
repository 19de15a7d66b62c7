//! The pod registry: the pods registered with this agent, by the CNI
//! plugin over the API socket or adopted from the plugin's records, kept
//! in `endpoints.json` so that a restarted agent knows them. Adding a pod
//! attaches `tc_from_pod` to its host veth before the answer goes back;
//! the reconciler then keeps the pod's map entry and link in step.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
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
    records: BTreeMap<IpAddr, EndpointRecord>,
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

    pub fn records(&self) -> &BTreeMap<IpAddr, EndpointRecord> {
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
            if let Some(ip) = rec.ip {
                dp.put_endpoint(ip, &ep)?;
            }
            if let Some(ip6) = rec.ip6 {
                dp.put_endpoint6(ip6, &ep)?;
            }
        }
        let key = rec.key().context("a pod with no address")?;
        self.records.insert(key, rec);
        self.save()
    }

    /// Removes a pod (by `EndpointRecord::key`): its record, map entries
    /// and pinned link.
    pub fn delete(&mut self, dp: Option<&mut Datapath>, ip: IpAddr) -> anyhow::Result<()> {
        let rec = self.records.remove(&ip);
        if let Some(dp) = dp {
            let (v4, v6) = match ip {
                IpAddr::V4(a) => (Some(a), rec.as_ref().and_then(|r| r.ip6)),
                IpAddr::V6(a) => (None, Some(a)),
            };
            // The interface may be gone already (its namespace deleted
            // before DEL): the map entry still names the ifindex its
            // pinned link was made for.
            let index = match v4 {
                Some(a) => dp.endpoint(a)?.map(|ep| ep.host_ifindex),
                None => None,
            }
            .or_else(|| rec.as_ref().and_then(|r| ebpf::ifindex(&r.host_ifname)));
            if let Some(a) = v4 {
                dp.remove_endpoint(a)?;
            }
            if let Some(ip6) = v6 {
                dp.remove_endpoint6(ip6)?;
            }
            if let Some(index) = index {
                dp.detach_pod(index);
            }
        }
        self.save()
    }

    /// Drops the records of pods whose interface the reconciler found gone.
    pub fn forget(&mut self, ips: &[IpAddr]) -> anyhow::Result<()> {
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
            let Some(key) = want.key() else { continue };
            let in_lease = match key {
                IpAddr::V4(ip) => node.lease.has_ipv4() && node.lease.subnet.contains(&ip),
                IpAddr::V6(ip) => node.lease.ipv6_subnet.is_some_and(|l| l.contains(&ip)),
            };
            if rec.deleting
                || self.records.get(&key) == Some(&want)
                || !in_lease
                || !on_bridge(&rec)
                || !rec.ipam_holds()
            {
                continue;
            }
            tracing::info!(pod = %key, container = %rec.container_id, host_if = %want.host_ifname, "registering a pod from the CNI plugin's records");
            self.records.insert(key, want);
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
    records: &BTreeMap<IpAddr, EndpointRecord>,
    bridge: Option<u32>,
    host: Option<&HostLink>,
    rec: &EndpointRecord,
) -> anyhow::Result<u32> {
    let subnet = node.lease.subnet;
    // An IPv4 address exactly when the node's lease has IPv4; in an
    // IPv6-only cluster the pod is named by its IPv6 address.
    let key = match (rec.ip, node.gateway()) {
        (Some(ip), None) => bail!("pod IP {ip} given, but this node has no IPv4 lease"),
        (None, Some(_)) => bail!("pod has no IPv4 address, but this node's lease {subnet} is IPv4"),
        (None, None) => match rec.ip6 {
            Some(ip6) => IpAddr::V6(ip6),
            None => bail!("pod has no IPv6 address, which an IPv6-only node needs"),
        },
        (Some(ip), Some(gateway)) => {
            if !subnet.contains(&ip) {
                bail!("pod IP {ip} is not in this node's lease {subnet}");
            }
            for (addr, what) in [
                (subnet.network(), "network"),
                (gateway.addr(), "gateway"),
                (subnet.broadcast(), "broadcast"),
            ] {
                if ip == addr {
                    bail!("pod IP {ip} is the {what} address of this node's lease {subnet}");
                }
            }
            IpAddr::V4(ip)
        }
    };
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
    if let Some(other) = records.get(&key) {
        if other.host_ifname != *name && ebpf::ifindex(&other.host_ifname).is_some() {
            bail!(
                "pod IP {key} is held by the endpoint on {}; delete it first",
                other.host_ifname
            );
        }
    }
    Ok(host.index)
}

fn read_records(path: &Path) -> anyhow::Result<BTreeMap<IpAddr, EndpointRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let list: Vec<EndpointRecord> = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading pod records {}", path.display()))?;
            Ok(list
                .into_iter()
                .filter_map(|e| Some((e.key()?, e)))
                .collect())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("reading pod records {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mac::MacAddr, subnet::Lease, subnet::LeaseAttrs};

    fn node(v4: bool) -> Node {
        let subnet = if v4 {
            "10.244.1.0/24".parse().unwrap()
        } else {
            ipnet::Ipv4Net::default()
        };
        Node {
            uplink: Link::plain(2, "eth0"),
            uplink_nets: Vec::new(),
            uplink_nets6: Vec::new(),
            ip: std::net::Ipv4Addr::UNSPECIFIED,
            ip6: Some("fd00:30::1".parse().unwrap()),
            lease: Lease {
                subnet,
                ipv6_subnet: Some("fd00:10:244:1::/64".parse().unwrap()),
                attrs: LeaseAttrs::host_gw(std::net::Ipv4Addr::UNSPECIFIED),
                expiration: None,
            },
            vtep_mac: MacAddr([0x0e, 0, 0, 0, 0, 1]),
            vtep6_mac: MacAddr([0x0e, 0, 0, 0, 6, 1]),
        }
    }

    /// A pod has an IPv4 address exactly when its node's lease has IPv4;
    /// on an IPv6-only node it is named by its IPv6 address, and another
    /// live endpoint holding that address refuses it.
    #[test]
    fn ipv6_only_pods_are_checked_by_their_ipv6_address() {
        let host = HostLink {
            index: 9,
            controller: Some(5),
        };
        let rec = |ip: Option<&str>, ip6: Option<&str>| EndpointRecord {
            ip: ip.map(|s| s.parse().unwrap()),
            mac: MacAddr([0x0e, 0, 0, 0, 0, 9]),
            host_ifname: "vethtest".into(),
            ip6: ip6.map(|s| s.parse().unwrap()),
        };
        let none = BTreeMap::new();
        let only6 = node(false);
        let pod6 = rec(None, Some("fd00:10:244:1::9"));
        assert_eq!(
            check(&only6, &none, Some(5), Some(&host), &pod6).unwrap(),
            9
        );
        assert_eq!(pod6.key(), Some("fd00:10:244:1::9".parse().unwrap()));
        for (bad, why) in [
            (
                rec(Some("10.244.1.9"), Some("fd00:10:244:1::9")),
                "this node has no IPv4 lease",
            ),
            (rec(None, None), "no IPv6 address"),
            (
                rec(None, Some("fd00:10:244:2::9")),
                "not in this node's IPv6 lease",
            ),
            (rec(None, Some("fd00:10:244:1::1")), "gateway address"),
        ] {
            let err = check(&only6, &none, Some(5), Some(&host), &bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        // A node with IPv4 wants the pod's IPv4 address.
        let err = check(&node(true), &none, Some(5), Some(&host), &pod6).unwrap_err();
        assert!(err.to_string().contains("has no IPv4 address"), "{err}");
        // The address is held by a live endpoint (`lo` always exists).
        let held: BTreeMap<IpAddr, EndpointRecord> = [(
            pod6.key().unwrap(),
            EndpointRecord {
                host_ifname: "lo".into(),
                ..pod6.clone()
            },
        )]
        .into();
        let err = check(&only6, &held, Some(5), Some(&host), &pod6).unwrap_err();
        assert!(
            err.to_string().contains("is held by the endpoint on lo"),
            "{err}"
        );
    }
}

//! The observed state: what the kernel and the BPF maps hold now, read at
//! the start of every pass so that the diff works from facts, not from
//! what the agent believes it wrote.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use flannel_common::{Config, Endpoint, RemoteNode, RemoteNode6};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::desired::{GuardSpec, MasqSpec};
use crate::{
    datapath::ebpf::{Datapath, EbpfError},
    mac::MacAddr,
    masq,
    netlink::{Link, Netlink, NetlinkError},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Every link of the node's namespace, by name.
    pub links: BTreeMap<String, Link>,
    /// IPv4 addresses on the bridge and on the VTEP device.
    pub bridge_addrs: Vec<Ipv4Net>,
    pub vtep_addrs: Vec<Ipv4Net>,
    /// IPv4 addresses on the uplink (with their prefixes).
    pub uplink_addrs: Vec<Ipv4Net>,
    /// Global IPv6 addresses on the uplink (with their prefixes).
    pub uplink_addrs6: Vec<Ipv6Net>,
    /// Main-table routes through the uplink that have a gateway, of both
    /// families: (destination, gateway). `None` when they could not be
    /// read.
    pub uplink_routes: Option<Vec<(IpNet, IpAddr)>>,
    /// What hangs on the VTEP device (empty when it does not exist);
    /// `None` when it could not be read.
    pub vtep: Option<VtepEntries>,
    /// Global IPv6 addresses on the bridge and on `flannel-v6.<VNI>`.
    pub bridge_addrs6: Vec<Ipv6Net>,
    pub vtep6_addrs: Vec<Ipv6Net>,
    /// What hangs on `flannel-v6.<VNI>`, as `vtep` for `flannel.<VNI>`.
    pub vtep6: Option<VtepEntries6>,
    pub masq: MasqTable,
    /// The CNI plugin's own masquerade table; `None` when unreadable.
    pub cni_masq: Option<bool>,
    /// `None` on the kernel data path, or when the maps could not be read.
    pub maps: Option<Maps>,
    pub guard: GuardTables,
}

/// The guard tables (`ip` and `bridge flannel-guard`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum GuardTables {
    /// Could not be read (logged).
    #[default]
    Unknown,
    Seen {
        ip: bool,
        /// `ip6 flannel-guard` (dual-stack).
        ip6: bool,
        bridge: bool,
        /// What this process last wrote (contents are not read back).
        written: Option<GuardSpec>,
    },
}

/// Routes, neighbours and FDB entries on a VXLAN device, in the family
/// of `N` (subnets) and `A` (addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entries<N, A> {
    /// Universe-scope routes through the device: (destination, onlink).
    pub routes: Vec<(N, bool)>,
    /// Permanent neighbours: gateway IP → MAC.
    pub neighbours: BTreeMap<A, MacAddr>,
    /// Permanent FDB entries: (MAC, VXLAN destination).
    pub fdb: BTreeSet<(MacAddr, Option<IpAddr>)>,
}

impl<N, A> Default for Entries<N, A> {
    fn default() -> Self {
        Entries {
            routes: Vec::new(),
            neighbours: BTreeMap::new(),
            fdb: BTreeSet::new(),
        }
    }
}

/// What hangs on `flannel.<VNI>`.
pub type VtepEntries = Entries<Ipv4Net, Ipv4Addr>;
/// What hangs on `flannel-v6.<VNI>`.
pub type VtepEntries6 = Entries<Ipv6Net, Ipv6Addr>;

/// The agent's masquerade table (`ip flannel-ipv4`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MasqTable {
    /// Could not be read (logged).
    #[default]
    Unknown,
    Absent,
    /// There, with the rules for this spec when this process wrote them;
    /// `None`: written by an earlier run, contents unknown.
    Present(Option<MasqSpec>),
}

/// What the eBPF maps and pinned pod links hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    pub config: Option<Config>,
    pub remotes: BTreeMap<Ipv4Net, RemoteNode>,
    /// The filled lease slots, by slot.
    pub slots: BTreeMap<u32, RemoteNode>,
    pub remotes6: BTreeMap<Ipv6Net, RemoteNode6>,
    pub vteps: BTreeSet<Ipv4Addr>,
    pub vteps6: BTreeSet<Ipv6Addr>,
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    pub endpoints6: BTreeMap<Ipv6Addr, Endpoint>,
    /// Pinned pod links by interface index: whether this process
    /// attached (or took over) each.
    pub pod_links: BTreeMap<u32, bool>,
}

/// The names of the devices the pass looks at.
pub struct Devices<'a> {
    pub bridge: &'a str,
    pub vtep: &'a str,
    pub vtep6: &'a str,
    pub uplink: &'a str,
}

/// Reads everything a pass needs. Failing to list links or addresses
/// fails the pass; the VTEP's entries, the masquerade tables and the maps
/// are each left unknown (and logged) when they cannot be read, so that
/// the other parts still reconcile.
pub async fn observe(
    nl: &Netlink,
    dp: Option<&mut Datapath>,
    devices: &Devices<'_>,
    masq_written: Option<MasqSpec>,
    guard_written: Option<&GuardSpec>,
) -> Result<Observed, NetlinkError> {
    let links: BTreeMap<String, Link> = nl
        .links()
        .await?
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect();
    let addrs = |name: &str| {
        let index = links.get(name).map(|l| l.index);
        async move {
            match index {
                Some(i) => nl.ipv4_addrs(i).await,
                None => Ok(Vec::new()),
            }
        }
    };
    let bridge_addrs = addrs(devices.bridge).await?;
    let vtep_addrs = addrs(devices.vtep).await?;
    let addrs6 = |name: &str| {
        let index = links.get(name).map(|l| l.index);
        async move {
            match index {
                Some(i) => nl.ipv6_addrs(i).await,
                None => Ok(Vec::new()),
            }
        }
    };
    let bridge_addrs6 = addrs6(devices.bridge).await?;
    let vtep6_addrs = addrs6(devices.vtep6).await?;
    let vtep6 = match links.get(devices.vtep6) {
        None => Some(VtepEntries6::default()),
        Some(l) => match vtep6_entries(nl, l.index).await {
            Ok(e) => Some(e),
            Err(err) => {
                tracing::warn!(device = devices.vtep6, %err, "reading the IPv6 VTEP's routes, neighbours and FDB");
                None
            }
        },
    };
    let uplink_addrs = addrs(devices.uplink).await?;
    let uplink_addrs6 = addrs6(devices.uplink).await?;
    let uplink_routes = match links.get(devices.uplink) {
        None => Some(Vec::new()),
        Some(l) => match futures::try_join!(nl.routes_via(l.index), nl.routes6_via(l.index)) {
            Ok((routes, routes6)) => Some(
                routes
                    .into_iter()
                    .filter_map(|(dst, gw)| Some((IpNet::V4(dst), IpAddr::V4(gw?))))
                    .chain(
                        routes6
                            .into_iter()
                            .filter_map(|(dst, gw)| Some((IpNet::V6(dst), IpAddr::V6(gw?)))),
                    )
                    .collect(),
            ),
            Err(err) => {
                tracing::warn!(device = devices.uplink, %err, "reading the uplink's routes");
                None
            }
        },
    };
    let vtep = match links.get(devices.vtep) {
        None => Some(VtepEntries::default()),
        Some(l) => match vtep_entries(nl, l.index).await {
            Ok(e) => Some(e),
            Err(err) => {
                tracing::warn!(device = devices.vtep, %err, "reading the VTEP's routes, neighbours and FDB");
                None
            }
        },
    };
    let masq = match masq::present() {
        Ok((false, false)) => MasqTable::Absent,
        // What this process wrote, while both tables are as it left them.
        Ok((true, v6)) => MasqTable::Present(masq_written.filter(|m| m.v6.is_some() == v6)),
        Ok((false, true)) => MasqTable::Present(None),
        Err(err) => {
            tracing::debug!(%err, table = masq::TABLE, "checking the ip-masq table");
            MasqTable::Unknown
        }
    };
    let guard = match crate::guard::present() {
        Ok((ip, ip6, bridge)) => GuardTables::Seen {
            ip,
            ip6,
            bridge,
            written: guard_written.cloned(),
        },
        Err(err) => {
            tracing::debug!(%err, "checking the guard tables");
            GuardTables::Unknown
        }
    };
    let cni_masq = masq::pod_present()
        .map_err(|err| tracing::debug!(%err, table = masq::POD_TABLE, "checking the CNI plugin's masquerade table"))
        .ok();
    let maps = match dp {
        None => None,
        Some(dp) => match read_maps(dp) {
            Ok(m) => Some(m),
            Err(err) => {
                tracing::warn!(%err, "reading the eBPF maps");
                None
            }
        },
    };
    Ok(Observed {
        links,
        bridge_addrs,
        vtep_addrs,
        bridge_addrs6,
        vtep6_addrs,
        vtep6,
        uplink_addrs,
        uplink_addrs6,
        uplink_routes,
        vtep,
        masq,
        cni_masq,
        maps,
        guard,
    })
}

async fn vtep_entries(nl: &Netlink, index: u32) -> Result<VtepEntries, NetlinkError> {
    Ok(VtepEntries {
        routes: nl.vtep_routes(index).await?,
        neighbours: nl.vtep_neighbours(index).await?.into_iter().collect(),
        fdb: nl.vtep_fdb(index).await?.into_iter().collect(),
    })
}

async fn vtep6_entries(nl: &Netlink, index: u32) -> Result<VtepEntries6, NetlinkError> {
    Ok(VtepEntries6 {
        routes: nl.vtep_routes6(index).await?,
        neighbours: nl.vtep_neighbours6(index).await?.into_iter().collect(),
        fdb: nl.vtep_fdb(index).await?.into_iter().collect(),
    })
}

fn read_maps(dp: &mut Datapath) -> Result<Maps, EbpfError> {
    Ok(Maps {
        config: dp.config()?,
        remotes: dp.remotes()?,
        slots: dp.lease_slots()?,
        remotes6: dp.remotes6()?,
        vteps: dp.vteps()?,
        vteps6: dp.vteps6()?,
        endpoints: dp.endpoints()?,
        endpoints6: dp.endpoints6()?,
        pod_links: dp.pod_links(),
    })
}

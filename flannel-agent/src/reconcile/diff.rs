//! The diff: a pure function from the desired and the observed state to
//! the operations that make the second match the first. Every operation
//! is idempotent (create-or-replace, delete-if-there), so a pass that
//! fails half-way is finished by the next one.
//!
//! Operations come out in the order they are applied: devices first
//! (everything else hangs on them), then each remote's kernel entries,
//! the stale ones' removal, masquerading, the eBPF maps, and last the pod
//! records whose interface is gone.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use flannel_common::{Config, Endpoint, RemoteNode, RemoteNode6};
use ipnet::{Ipv4Net, Ipv6Net};
use netlink_packet_route::link::InfoKind;

use super::{
    desired::{BridgeSpec, Desired, DirectRoute, GuardSpec, MapsSpec, MasqSpec, VtepSpec},
    observe::{Entries, GuardTables, Maps, MasqTable, Observed},
};
use crate::{
    api::EndpointRecord,
    mac::MacAddr,
    netlink::{Remote, RemoteEntry, RemoteEntry6},
};

/// One change to the node, grouped by what it changes so that each
/// applier takes only its own kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Device(DeviceOp),
    Vtep(VtepOp),
    /// The same on `flannel-v6.<VNI>`.
    Vtep6(VtepOp<RemoteEntry6>),
    Direct(DirectOp),
    Masq(MasqOp),
    /// Write the guard tables (atomically replacing them).
    Guard(GuardSpec),
    Map(MapOp),
    /// A registered pod whose host interface is gone: drop its record.
    ForgetPod(IpAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceOp {
    /// Create the pod bridge, or set its MTU, MAC, address or state.
    Bridge(BridgeSpec),
    /// Create `flannel.<VNI>` or `flannel-v6.<VNI>` (recreate it when
    /// incompatible), or set its MTU, MAC, address or state.
    Vtep(VtepSpec),
}

/// Entries on `flannel.<VNI>` (or, with `RemoteEntry6`, on
/// `flannel-v6.<VNI>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtepOp<R: Remote = RemoteEntry> {
    /// A remote's neighbour, FDB entry and route, in Flannel's order.
    Program(R),
    /// A route through the VTEP to a subnet no lease holds.
    DeleteRoute(R::Net),
    DeleteNeighbour(R::Addr),
    DeleteFdb {
        mac: MacAddr,
        dst: Option<IpAddr>,
    },
}

impl<R: Remote> VtepOp<R> {
    fn kind(&self) -> &'static str {
        match self {
            VtepOp::Program(_) => "remote",
            VtepOp::DeleteRoute(_) => "route",
            VtepOp::DeleteNeighbour(_) => "neighbour",
            VtepOp::DeleteFdb { .. } => "fdb",
        }
    }
}

impl<R: Remote> fmt::Display for VtepOp<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VtepOp::Program(r) => write!(
                f,
                "program remote {} (node {}, VtepMAC {})",
                r.subnet(),
                r.public(),
                r.vtep_mac()
            ),
            VtepOp::DeleteRoute(d) => write!(f, "delete route {d}"),
            VtepOp::DeleteNeighbour(ip) => write!(f, "delete neighbour {ip}"),
            VtepOp::DeleteFdb { mac, dst } => match dst {
                Some(d) => write!(f, "delete FDB entry {mac} dst {d}"),
                None => write!(f, "delete FDB entry {mac}"),
            },
        }
    }
}

/// Direct routes through the uplink (DirectRouting, host-gw).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirectOp {
    /// `<subnet> via <node IP> dev <uplink>` (created or replaced).
    Route(DirectRoute),
    /// A route through the uplink to a subnet of the cluster network that
    /// no direct remote wants.
    Delete { subnet: IpNet, uplink: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MasqOp {
    /// Write Flannel's masquerade table (atomically replacing it).
    Install(MasqSpec),
    Remove,
    /// The CNI plugin's rule, redundant once the agent masquerades.
    RemoveCni,
}

/// The eBPF maps and the pinned pod links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    SetConfig(Config),
    PutRemote(Ipv4Net, RemoteNode),
    /// A lease slot filled with its lease's remote (see
    /// `desired::lease_slots`).
    PutSlot(u32, RemoteNode),
    /// A slot that no lease should fill, emptied: its addresses go to the
    /// trie.
    ClearSlot(u32),
    PutRemote6(Ipv6Net, RemoteNode6),
    DeleteRemote6(Ipv6Net),
    DeleteRemote(Ipv4Net),
    PutVtep(Ipv4Addr),
    DeleteVtep(Ipv4Addr),
    PutVtep6(Ipv6Addr),
    DeleteVtep6(Ipv6Addr),
    /// Attach `tc_from_pod` to a pod's host veth (or take over its link).
    AttachPod {
        ifname: String,
        ifindex: u32,
    },
    PutEndpoint(Ipv4Addr, Endpoint),
    DeleteEndpoint(Ipv4Addr),
    /// A dual-stack pod's IPv6 entry (the same endpoint as its IPv4's).
    PutEndpoint6(Ipv6Addr, Endpoint),
    DeleteEndpoint6(Ipv6Addr),
    /// Unpin the link of an interface that is no pod's.
    DetachPod(u32),
}

impl Op {
    /// Every value [`Op::kind`] takes.
    pub const KINDS: [&'static str; 11] = [
        "device",
        "remote",
        "direct_route",
        "route",
        "neighbour",
        "fdb",
        "masquerade",
        "guard",
        "map_entry",
        "pod_link",
        "pod_record",
    ];

    /// The kind of object the operation changes, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Device(_) => "device",
            Op::Vtep(v) => v.kind(),
            Op::Vtep6(v) => v.kind(),
            Op::Direct(_) => "direct_route",
            Op::Masq(_) => "masquerade",
            Op::Guard(_) => "guard",
            Op::Map(MapOp::AttachPod { .. } | MapOp::DetachPod(_)) => "pod_link",
            Op::Map(_) => "map_entry",
            Op::ForgetPod(_) => "pod_record",
        }
    }
}

/// Names the operation and its object, as logs and errors say it.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Device(DeviceOp::Bridge(b)) => {
                let gateways: Vec<String> = (b.gateway.map(IpNet::V4).into_iter())
                    .chain(b.gateway6.map(IpNet::V6))
                    .map(|g| g.to_string())
                    .collect();
                write!(f, "ensure bridge {} ({})", b.name, gateways.join(", "))
            }
            Op::Device(DeviceOp::Vtep(v)) => write!(f, "ensure VXLAN device {}", v.link.name),
            Op::Direct(DirectOp::Route(d)) => {
                write!(f, "route {} via {} (direct)", d.subnet, d.via)
            }
            Op::Direct(DirectOp::Delete { subnet, .. }) => {
                write!(f, "delete direct route {subnet}")
            }
            Op::Vtep(v) => write!(f, "{v}"),
            Op::Vtep6(v) => write!(f, "{v} (IPv6)"),
            Op::Masq(MasqOp::Install(m)) => {
                let nets: Vec<String> = (m.v4.map(|(n, l)| (IpNet::V4(n), IpNet::V4(l))))
                    .into_iter()
                    .chain(m.v6.map(|(n, l)| (IpNet::V6(n), IpNet::V6(l))))
                    .map(|(n, l)| format!("{n} / {l}"))
                    .collect();
                write!(f, "install ip-masq rules ({})", nets.join(", "))
            }
            Op::Masq(MasqOp::Remove) => write!(f, "remove the ip-masq table"),
            Op::Guard(g) => write!(
                f,
                "write the guard tables ({} lease IPs, {})",
                g.vteps.len(),
                match &g.pods {
                    Some(p) => format!("{} pod sources", p.len()),
                    None => "no pod check: the programs do it".into(),
                }
            ),
            Op::Masq(MasqOp::RemoveCni) => {
                write!(f, "remove the CNI plugin's masquerade table")
            }
            Op::Map(MapOp::SetConfig(_)) => write!(f, "write the data path config"),
            Op::Map(MapOp::PutRemote(n, _)) => write!(f, "map remote subnet {n}"),
            Op::Map(MapOp::DeleteRemote(n)) => write!(f, "unmap remote subnet {n}"),
            Op::Map(MapOp::PutSlot(i, node)) => write!(
                f,
                "map lease slot {i} to node {}",
                crate::datapath::ebpf::key_ip(node.node_ip)
            ),
            Op::Map(MapOp::ClearSlot(i)) => write!(f, "clear lease slot {i}"),
            Op::Map(MapOp::PutRemote6(n, _)) => write!(f, "map remote subnet {n}"),
            Op::Map(MapOp::DeleteRemote6(n)) => write!(f, "unmap remote subnet {n}"),
            Op::Map(MapOp::PutVtep(ip)) => write!(f, "map VTEP {ip}"),
            Op::Map(MapOp::DeleteVtep(ip)) => write!(f, "unmap VTEP {ip}"),
            Op::Map(MapOp::PutVtep6(ip)) => write!(f, "map VTEP {ip}"),
            Op::Map(MapOp::DeleteVtep6(ip)) => write!(f, "unmap VTEP {ip}"),
            Op::Map(MapOp::AttachPod { ifname, .. }) => {
                write!(f, "attach tc_from_pod to {ifname}")
            }
            Op::Map(MapOp::PutEndpoint(ip, e)) => {
                write!(f, "map pod {ip} (ifindex {})", e.host_ifindex)
            }
            Op::Map(MapOp::DeleteEndpoint(ip)) => write!(f, "unmap pod {ip}"),
            Op::Map(MapOp::PutEndpoint6(ip, e)) => {
                write!(f, "map pod {ip} (ifindex {})", e.host_ifindex)
            }
            Op::Map(MapOp::DeleteEndpoint6(ip)) => write!(f, "unmap pod {ip}"),
            Op::Map(MapOp::DetachPod(i)) => write!(f, "unpin the pod link of ifindex {i}"),
            Op::ForgetPod(ip) => write!(f, "forget pod {ip}"),
        }
    }
}

/// The operations that take `have` to `want`, in the order to apply them.
pub fn diff(want: &Desired, have: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    if !bridge_in_order(&want.bridge, have) {
        ops.push(Op::Device(DeviceOp::Bridge(want.bridge.clone())));
    }
    // Unwanted direct routes go before the VTEP's routes are put in (a
    // remote moving back to VXLAN), wanted ones after the VTEP's stale
    // ones went (a remote moving to a direct route).
    let (direct_adds, direct_deletes) = direct_routes(want, have);
    ops.extend(direct_deletes);
    if let Some(spec) = &want.vtep {
        let addrs: Vec<IpNet> = have.vtep_addrs.iter().map(|a| IpNet::V4(*a)).collect();
        if let Some(entries) = vtep_device(spec, &addrs, have, have.vtep.as_ref(), &mut ops) {
            for op in vtep_entries(&want.remotes, &entries) {
                ops.push(Op::Vtep(op));
            }
        }
    }
    if let Some(spec) = &want.vtep6 {
        let addrs: Vec<IpNet> = have.vtep6_addrs.iter().map(|a| IpNet::V6(*a)).collect();
        if let Some(entries) = vtep_device(spec, &addrs, have, have.vtep6.as_ref(), &mut ops) {
            for op in vtep_entries(&want.remotes6, &entries) {
                ops.push(Op::Vtep6(op));
            }
        }
    }
    ops.extend(direct_adds);
    masquerade(want.masq, have, &mut ops);
    guard(&want.guard, have, &mut ops);

    // Pods whose interface is gone are gone, on either data path.
    let mut live = BTreeMap::new();
    let mut gone = Vec::new();
    for (ip, rec) in &want.pods {
        match have.links.get(&rec.host_ifname) {
            Some(l) => {
                live.insert(
                    *ip,
                    (
                        rec.host_ifname.as_str(),
                        Endpoint {
                            host_ifindex: l.index,
                            pod_mac: rec.mac.0,
                            _pad: [0; 2],
                        },
                    ),
                );
            }
            None => gone.push(Op::ForgetPod(*ip)),
        }
    }
    if let (Some(maps), Some(seen)) = (&want.maps, &have.maps) {
        map_entries(maps, seen, &mut ops);
        pod_entries(&live, &want.pods, &want.attaching, seen, &mut ops);
    }
    ops.extend(gone);
    ops
}

fn bridge_in_order(want: &BridgeSpec, have: &Observed) -> bool {
    have.links.get(&want.name).is_some_and(|l| {
        l.kind == Some(InfoKind::Bridge) && l.up && l.mtu == want.mtu && l.mac == Some(want.mac)
    }) && have.bridge_addrs == want.gateway.as_slice()
        // IPv6 addresses are the agent's only with IPv6 on: an IPv4-only
        // node leaves any it finds alone.
        && want
            .gateway6
            .is_none_or(|g| have.bridge_addrs6 == [g])
}

/// A VXLAN device as `spec` says (an op when it is not), and the entries
/// its remotes are compared with: none on a device being created or
/// recreated (it starts empty), those read (`None`: unreadable, left for
/// the next pass) otherwise.
fn vtep_device<'a, N, A>(
    spec: &VtepSpec,
    addrs: &[IpNet],
    have: &Observed,
    entries: Option<&'a Entries<N, A>>,
    ops: &mut Vec<Op>,
) -> Option<std::borrow::Cow<'a, Entries<N, A>>>
where
    Entries<N, A>: Clone,
{
    let vtep = have.links.get(&spec.link.name);
    let recreate = !vtep.is_some_and(|l| spec.link.compatible(l));
    let vtep_ok = !recreate
        && vtep.is_some_and(|l| l.up && l.mtu == spec.link.mtu && l.mac == Some(spec.link.mac))
        && addrs == [spec.addr];
    if !vtep_ok {
        ops.push(Op::Device(DeviceOp::Vtep(spec.clone())));
    }
    if recreate {
        Some(std::borrow::Cow::Owned(Entries::default()))
    } else {
        entries.map(std::borrow::Cow::Borrowed)
    }
}

/// Per remote: neighbour, FDB entry and route all as wanted, or the three
/// are programmed again (with replace). Then whatever no remote wants
/// goes. A neighbour whose MAC is wrong is not deleted: the remote's
/// replace has just put the right one in its place.
fn vtep_entries<R: Remote>(
    want: &BTreeMap<R::Net, R>,
    have: &Entries<R::Net, R::Addr>,
) -> Vec<VtepOp<R>> {
    let mut ops = Vec::new();
    let onlink: BTreeSet<R::Net> = have
        .routes
        .iter()
        .filter(|(_, onlink)| *onlink)
        .map(|(d, _)| *d)
        .collect();
    let fdb_of = |r: &R| (r.vtep_mac(), Some(r.public()));
    for r in want.values() {
        let ok = onlink.contains(&r.subnet())
            && have.neighbours.get(&r.gateway()) == Some(&r.vtep_mac())
            && have.fdb.contains(&fdb_of(r));
        if !ok {
            ops.push(VtepOp::Program(*r));
        }
    }
    let gateways: BTreeSet<R::Addr> = want.values().map(|r| r.gateway()).collect();
    let fdb: BTreeSet<_> = want.values().map(fdb_of).collect();
    let mut routes: Vec<R::Net> = have
        .routes
        .iter()
        .map(|(d, _)| *d)
        .filter(|d| !want.contains_key(d))
        .collect();
    routes.sort();
    routes.dedup();
    ops.extend(routes.into_iter().map(VtepOp::DeleteRoute));
    ops.extend(
        have.neighbours
            .keys()
            .filter(|ip| !gateways.contains(ip))
            .map(|ip| VtepOp::DeleteNeighbour(*ip)),
    );
    ops.extend(
        have.fdb
            .iter()
            .filter(|e| !fdb.contains(e))
            .map(|&(mac, dst)| VtepOp::DeleteFdb { mac, dst }),
    );
    ops
}

/// Direct routes to add or replace (missing, or via another gateway), and
/// routes through the uplink into the cluster network that no direct
/// remote wants. Nothing when the uplink's routes could not be read.
fn direct_routes(want: &Desired, have: &Observed) -> (Vec<Op>, Vec<Op>) {
    let Some(routes) = &have.uplink_routes else {
        return (Vec::new(), Vec::new());
    };
    let adds = want
        .direct
        .values()
        .filter(|d| !routes.contains(&(d.subnet, d.via)))
        .map(|d| Op::Direct(DirectOp::Route(*d)))
        .collect();
    // Inside the cluster network of its family, and longer than it.
    let ours = |dst: &IpNet| match (dst, want.network6) {
        (IpNet::V4(d), _) => want
            .network
            .is_some_and(|n| n.contains(d) && d.prefix_len() > n.prefix_len()),
        (IpNet::V6(d), Some(n)) => n.contains(d) && d.prefix_len() > n.prefix_len(),
        (IpNet::V6(_), None) => false,
    };
    let mut stale: Vec<IpNet> = routes
        .iter()
        .map(|(dst, _)| *dst)
        .filter(|dst| ours(dst) && !want.direct.contains_key(dst))
        .collect();
    stale.sort();
    stale.dedup();
    let deletes = stale
        .into_iter()
        .map(|subnet| {
            Op::Direct(DirectOp::Delete {
                subnet,
                uplink: want.uplink,
            })
        })
        .collect();
    (adds, deletes)
}

/// A table whose contents this process did not write is written again:
/// an earlier run may have had another lease. A table that could not be
/// read is written anyway when wanted (a failure then says why).
fn masquerade(want: Option<MasqSpec>, have: &Observed, ops: &mut Vec<Op>) {
    match want {
        Some(spec) => {
            if have.masq != MasqTable::Present(Some(spec)) {
                ops.push(Op::Masq(MasqOp::Install(spec)));
            }
            if have.cni_masq == Some(true) {
                ops.push(Op::Masq(MasqOp::RemoveCni));
            }
        }
        None => {
            if matches!(have.masq, MasqTable::Present(_)) {
                ops.push(Op::Masq(MasqOp::Remove));
            }
        }
    }
}

/// The guard tables as they should be: pods whose interface is gone (their
/// records go in this pass) are left out.
pub fn guard_spec(want: &GuardSpec, have: &Observed) -> GuardSpec {
    let mut spec = want.clone();
    if let Some(pods) = &mut spec.pods {
        pods.retain(|ifname, _| have.links.contains_key(ifname));
    }
    spec.pods6
        .retain(|ifname, _| have.links.contains_key(ifname));
    spec
}

/// Tables this process did not write, or wrote for other leases or pods,
/// are written again; so are tables that could not be read.
fn guard(want: &GuardSpec, have: &Observed, ops: &mut Vec<Op>) {
    let want = guard_spec(want, have);
    let current = matches!(&have.guard, GuardTables::Seen { ip: true, ip6, bridge, written: Some(w) }
        if *w == want && *bridge == want.pods.is_some() && *ip6 == want.vteps6.is_some());
    if !current {
        ops.push(Op::Guard(want));
    }
}

/// Slots are emptied before the config and the trie entries they stand
/// in for (a slot no longer wanted must not outlive its lease, nor be read
/// with another network's layout: with a new config every slot that is to
/// change is emptied first), and are filled after them.
fn map_entries(want: &MapsSpec, have: &Maps, ops: &mut Vec<Op>) {
    let new_config = have.config != Some(want.config);
    for (slot, node) in &have.slots {
        match want.slots.get(slot) {
            None => ops.push(Op::Map(MapOp::ClearSlot(*slot))),
            Some(w) if new_config && w != node => ops.push(Op::Map(MapOp::ClearSlot(*slot))),
            Some(_) => {}
        }
    }
    if new_config {
        ops.push(Op::Map(MapOp::SetConfig(want.config)));
    }
    for (net, node) in &want.remotes {
        if have.remotes.get(net) != Some(node) {
            ops.push(Op::Map(MapOp::PutRemote(*net, *node)));
        }
    }
    for net in have
        .remotes
        .keys()
        .filter(|n| !want.remotes.contains_key(n))
    {
        ops.push(Op::Map(MapOp::DeleteRemote(*net)));
    }
    for (net, node) in &want.remotes6 {
        if have.remotes6.get(net) != Some(node) {
            ops.push(Op::Map(MapOp::PutRemote6(*net, *node)));
        }
    }
    for net in have
        .remotes6
        .keys()
        .filter(|n| !want.remotes6.contains_key(n))
    {
        ops.push(Op::Map(MapOp::DeleteRemote6(*net)));
    }
    for (slot, node) in &want.slots {
        if have.slots.get(slot) != Some(node) {
            ops.push(Op::Map(MapOp::PutSlot(*slot, *node)));
        }
    }
    for ip in want.vteps.difference(&have.vteps) {
        ops.push(Op::Map(MapOp::PutVtep(*ip)));
    }
    for ip in have.vteps.difference(&want.vteps) {
        ops.push(Op::Map(MapOp::DeleteVtep(*ip)));
    }
    for ip in want.vteps6.difference(&have.vteps6) {
        ops.push(Op::Map(MapOp::PutVtep6(*ip)));
    }
    for ip in have.vteps6.difference(&want.vteps6) {
        ops.push(Op::Map(MapOp::DeleteVtep6(*ip)));
    }
}

/// Live pods get this process's program and their map entry; entries and
/// pinned links of anything else go, except links being attached now.
fn pod_entries(
    live: &BTreeMap<IpAddr, (&str, Endpoint)>,
    pods: &BTreeMap<IpAddr, EndpointRecord>,
    attaching: &BTreeSet<u32>,
    have: &Maps,
    ops: &mut Vec<Op>,
) {
    for (ifname, ep) in live.values() {
        if have.pod_links.get(&ep.host_ifindex) != Some(&true) {
            ops.push(Op::Map(MapOp::AttachPod {
                ifname: ifname.to_string(),
                ifindex: ep.host_ifindex,
            }));
        }
    }
    // Each pod's IPv4 entry and, dual-stack or IPv6-only, its IPv6 one:
    // the same endpoint.
    let live4: BTreeMap<Ipv4Addr, Endpoint> = live
        .iter()
        .filter_map(|(key, (_, ep))| Some((pods.get(key)?.ip?, *ep)))
        .collect();
    for (ip, ep) in &live4 {
        if have.endpoints.get(ip) != Some(ep) {
            ops.push(Op::Map(MapOp::PutEndpoint(*ip, *ep)));
        }
    }
    for ip in have.endpoints.keys().filter(|ip| !live4.contains_key(ip)) {
        ops.push(Op::Map(MapOp::DeleteEndpoint(*ip)));
    }
    let live6: BTreeMap<Ipv6Addr, Endpoint> = live
        .iter()
        .filter_map(|(key, (_, ep))| Some((pods.get(key)?.ip6?, *ep)))
        .collect();
    for (ip, ep) in &live6 {
        if have.endpoints6.get(ip) != Some(ep) {
            ops.push(Op::Map(MapOp::PutEndpoint6(*ip, *ep)));
        }
    }
    for ip in have.endpoints6.keys().filter(|ip| !live6.contains_key(ip)) {
        ops.push(Op::Map(MapOp::DeleteEndpoint6(*ip)));
    }
    let indexes: BTreeSet<u32> = live.values().map(|(_, ep)| ep.host_ifindex).collect();
    for index in have.pod_links.keys() {
        if !indexes.contains(index) && !attaching.contains(index) {
            ops.push(Op::Map(MapOp::DetachPod(*index)));
        }
    }
}

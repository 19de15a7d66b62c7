//! The desired state and the diff, table-driven, without root or a
//! kernel. Every row starts from a node that is in order (the observed
//! state built from the baseline's desired state), changes the inputs or
//! the observed state the way the scenario says, and lists the exact
//! operations the diff must return.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use flannel_common::{
    Config, Endpoint, RemoteNode, RemoteNode6, CONFIG_F_READY, CONFIG_F_TC_DECAP, REMOTE_F_DIRECT,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::link::{InfoKind, InfoVxlan};

use super::{
    desired::{desired, DirectRoute, EbpfMode, Inputs, MasqSpec, Node, VtepSpec},
    diff::{diff, DeviceOp, DirectOp, MapOp, MasqOp, Op, VtepOp},
    observe::{Entries, GuardTables, Maps, MasqTable, Observed, VtepEntries, VtepEntries6},
    Desired,
};
use crate::{
    api::EndpointRecord,
    config::NetConfig,
    datapath::ebpf::ip_key,
    mac::MacAddr,
    netlink::{Link, Remote, RemoteEntry, RemoteEntry6},
    subnet::{Lease, LeaseAttrs},
};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// An address or subnet of either family.
fn aip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn anet(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x0e, 0, 0, 0, 0, last])
}

const UPLINK: u32 = 2;
const BRIDGE: u32 = 3;
const VTEP: u32 = 4;
const VTEP6: u32 = 5;
const POD_A: u32 = 20;
const POD_B: u32 = 21;

fn link(index: u32, name: &str, kind: Option<InfoKind>) -> Link {
    Link {
        index,
        name: name.into(),
        mac: Some(mac(index as u8)),
        mtu: 1500,
        up: true,
        kind,
        controller: None,
        vxlan: Vec::new(),
    }
}

fn lease(subnet: &str, node: &str, vtep_mac: MacAddr) -> Lease {
    Lease {
        subnet: net(subnet),
        ipv6_subnet: None,
        attrs: LeaseAttrs::vxlan(ip(node), 1, vtep_mac),
        expiration: None,
    }
}

fn remote(subnet: &str, node: &str, vtep_mac: MacAddr) -> RemoteEntry {
    RemoteEntry {
        subnet: net(subnet),
        public_ip: ip(node),
        vtep_mac,
    }
}

fn pod(addr: &str, ifname: &str, last: u8) -> EndpointRecord {
    EndpointRecord {
        ip: Some(ip(addr)),
        mac: mac(last),
        host_ifname: ifname.into(),
        ip6: None,
    }
}

/// Node 1 (10.0.0.1, lease 10.244.1.0/24) with two remotes and two pods,
/// on the eBPF data path, without --ip-masq.
struct World {
    node: Node,
    cfg: NetConfig,
    leases: BTreeMap<IpNet, Lease>,
    pods: BTreeMap<IpAddr, EndpointRecord>,
    attaching: BTreeSet<u32>,
    ebpf: Option<EbpfMode>,
    ip_masq: bool,
    have: Observed,
}

impl World {
    fn new() -> Self {
        let mut w = World {
            node: Node {
                uplink: link(UPLINK, "eth0", Some(InfoKind::Veth)),
                uplink_nets: vec![net("10.0.0.1/24")],
                uplink_nets6: Vec::new(),
                ip: ip("10.0.0.1"),
                ip6: None,
                vtep6_mac: mac(0x61),
                lease: lease("10.244.1.0/24", "10.0.0.1", mac(0x11)),
                vtep_mac: mac(0x11),
            },
            cfg: NetConfig::parse(
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Port":4789}}"#,
            )
            .unwrap(),
            leases: BTreeMap::new(),
            pods: BTreeMap::new(),
            attaching: BTreeSet::new(),
            ebpf: Some(EbpfMode {
                tc_decap: true,
                strict_source: false,
                netfilter: false,
            }),
            ip_masq: false,
            have: Observed::default(),
        };
        for l in [
            w.node.lease.clone(),
            lease("10.244.2.0/24", "10.0.0.2", mac(0x22)),
            lease("10.244.3.0/24", "10.0.0.3", mac(0x33)),
        ] {
            w.leases.insert(l.id(), l);
        }
        for p in [
            pod("10.244.1.2", "vethfl-a", 0xa),
            pod("10.244.1.3", "vethfl-b", 0xb),
        ] {
            w.pods.insert(p.key().unwrap(), p);
        }
        w.have = converged(&w);
        w
    }

    fn want(&self) -> Desired {
        desired(&Inputs {
            node: &self.node,
            cfg: &self.cfg,
            bridge: "cni0",
            leases: &Arc::new(self.leases.clone()),
            pods: &self.pods,
            attaching: &self.attaching,
            ebpf: self.ebpf,
            ip_masq: self.ip_masq,
        })
    }

    fn add_lease(&mut self, l: Lease) {
        self.leases.insert(l.id(), l);
    }

    fn maps(&mut self) -> &mut Maps {
        self.have.maps.as_mut().unwrap()
    }

    fn entries(&mut self) -> &mut VtepEntries {
        self.have.vtep.as_mut().unwrap()
    }
}

/// What a VXLAN device holds once `remotes` are programmed on it.
fn entries_of<R: Remote>(remotes: &BTreeMap<R::Net, R>) -> Entries<R::Net, R::Addr> {
    Entries {
        routes: remotes.keys().map(|n| (*n, true)).collect(),
        neighbours: remotes
            .values()
            .map(|r| (r.gateway(), r.vtep_mac()))
            .collect(),
        fdb: remotes
            .values()
            .map(|r| (r.vtep_mac(), Some(r.public())))
            .collect(),
    }
}

/// A VXLAN device as the kernel shows it once created from `v`.
fn vtep_link(v: &VtepSpec) -> Link {
    let index = if v4(v.addr).is_some() { VTEP } else { VTEP6 };
    let mut l = link(index, &v.link.name, Some(InfoKind::Vxlan));
    l.mtu = v.link.mtu;
    l.mac = Some(v.link.mac);
    l.vxlan = vec![
        InfoVxlan::Id(v.link.vni),
        InfoVxlan::Link(v.link.uplink),
        match v.link.local {
            IpAddr::V4(a) => InfoVxlan::Local(a),
            IpAddr::V6(a) => InfoVxlan::Local6(a),
        },
        InfoVxlan::Learning(false),
        InfoVxlan::Port(v.link.port),
    ];
    l
}

fn v4(n: IpNet) -> Option<Ipv4Net> {
    match n {
        IpNet::V4(n) => Some(n),
        IpNet::V6(_) => None,
    }
}

fn v6(n: IpNet) -> Option<Ipv6Net> {
    match n {
        IpNet::V6(n) => Some(n),
        IpNet::V4(_) => None,
    }
}

/// What the kernel and the maps hold once `w`'s desired state is applied.
fn converged(w: &World) -> Observed {
    let want = w.want();
    let mut links = BTreeMap::new();
    links.insert("eth0".to_string(), w.node.uplink.clone());
    let mut bridge = link(BRIDGE, "cni0", Some(InfoKind::Bridge));
    bridge.mtu = want.bridge.mtu;
    bridge.mac = Some(want.bridge.mac);
    links.insert(bridge.name.clone(), bridge);
    for v in want.vtep.iter().chain(&want.vtep6) {
        let l = vtep_link(v);
        links.insert(l.name.clone(), l);
    }
    for (i, p) in w.pods.values().enumerate() {
        let mut l = link(POD_A + i as u32, &p.host_ifname, Some(InfoKind::Veth));
        l.controller = Some(BRIDGE);
        links.insert(l.name.clone(), l);
    }
    let entries = entries_of(&want.remotes);
    let ep = |p: &EndpointRecord| Endpoint {
        host_ifindex: links[&p.host_ifname].index,
        pod_mac: p.mac.0,
        _pad: [0; 2],
    };
    let maps = want.maps.as_ref().map(|m| Maps {
        config: Some(m.config),
        remotes: m.remotes.clone(),
        slots: m.slots.clone(),
        remotes6: m.remotes6.clone(),
        vteps: m.vteps.clone(),
        vteps6: m.vteps6.clone(),
        endpoints: w
            .pods
            .values()
            .filter_map(|p| Some((p.ip?, ep(p))))
            .collect(),
        endpoints6: w
            .pods
            .values()
            .filter_map(|p| Some((p.ip6?, ep(p))))
            .collect(),
        pod_links: w
            .pods
            .values()
            .map(|p| (links[&p.host_ifname].index, true))
            .collect(),
    });
    Observed {
        links,
        bridge_addrs: want.bridge.gateway.into_iter().collect(),
        vtep_addrs: want.vtep.iter().filter_map(|v| v4(v.addr)).collect(),
        bridge_addrs6: want.bridge.gateway6.into_iter().collect(),
        vtep6_addrs: want.vtep6.iter().filter_map(|v| v6(v.addr)).collect(),
        vtep6: Some(entries_of(&want.remotes6)),
        uplink_addrs: w.node.uplink_nets.clone(),
        uplink_addrs6: w.node.uplink_nets6.clone(),
        uplink_routes: Some(want.direct.values().map(|d| (d.subnet, d.via)).collect()),
        vtep: Some(entries),
        masq: match want.masq {
            Some(s) => MasqTable::Present(Some(s)),
            None => MasqTable::Absent,
        },
        cni_masq: Some(false),
        maps,
        guard: GuardTables::Seen {
            ip: true,
            ip6: want.guard.vteps6.is_some(),
            bridge: want.guard.pods.is_some(),
            written: Some(want.guard.clone()),
        },
    }
}

// Operation builders, so that each row reads as what it expects.
fn program(r: RemoteEntry) -> Op {
    Op::Vtep(VtepOp::Program(r))
}
fn del_route(n: &str) -> Op {
    Op::Vtep(VtepOp::DeleteRoute(net(n)))
}
fn del_neigh(a: &str) -> Op {
    Op::Vtep(VtepOp::DeleteNeighbour(ip(a)))
}
fn del_fdb(m: MacAddr, dst: &str) -> Op {
    Op::Vtep(VtepOp::DeleteFdb {
        mac: m,
        dst: Some(IpAddr::V4(ip(dst))),
    })
}
fn node_of(r: RemoteEntry) -> RemoteNode {
    RemoteNode {
        node_ip: ip_key(r.public_ip),
        vtep_mac: r.vtep_mac.0,
        flags: 0,
        _pad: 0,
    }
}
fn put_remote(r: RemoteEntry) -> Op {
    Op::Map(MapOp::PutRemote(r.subnet, node_of(r)))
}
/// The slot of a /24 in the tests' 10.244.0.0/16: its third byte.
fn slot_of(subnet: Ipv4Net) -> u32 {
    u32::from(subnet.network().octets()[2])
}
fn put_slot(r: RemoteEntry) -> Op {
    Op::Map(MapOp::PutSlot(slot_of(r.subnet), node_of(r)))
}
fn clear_slot(n: &str) -> Op {
    Op::Map(MapOp::ClearSlot(slot_of(net(n))))
}
fn del_remote(n: &str) -> Op {
    Op::Map(MapOp::DeleteRemote(net(n)))
}
fn put_vtep(a: &str) -> Op {
    Op::Map(MapOp::PutVtep(ip(a)))
}
fn del_vtep(a: &str) -> Op {
    Op::Map(MapOp::DeleteVtep(ip(a)))
}
fn attach(ifname: &str, ifindex: u32) -> Op {
    Op::Map(MapOp::AttachPod {
        ifname: ifname.into(),
        ifindex,
    })
}
fn put_endpoint(p: &EndpointRecord, ifindex: u32) -> Op {
    Op::Map(MapOp::PutEndpoint(
        p.ip.unwrap(),
        Endpoint {
            host_ifindex: ifindex,
            pod_mac: p.mac.0,
            _pad: [0; 2],
        },
    ))
}
fn del_endpoint(a: &str) -> Op {
    Op::Map(MapOp::DeleteEndpoint(ip(a)))
}
fn detach(ifindex: u32) -> Op {
    Op::Map(MapOp::DetachPod(ifindex))
}
fn ensure_bridge(w: &World) -> Op {
    Op::Device(DeviceOp::Bridge(w.want().bridge))
}
fn ensure_vtep(w: &World) -> Op {
    Op::Device(DeviceOp::Vtep(w.want().vtep.unwrap()))
}
fn masq_spec() -> MasqSpec {
    MasqSpec {
        v4: Some((net("10.244.0.0/16"), net("10.244.1.0/24"))),
        v6: None,
    }
}

fn r2() -> RemoteEntry {
    remote("10.244.2.0/24", "10.0.0.2", mac(0x22))
}
fn r3() -> RemoteEntry {
    remote("10.244.3.0/24", "10.0.0.3", mac(0x33))
}

type Row = (&'static str, fn(&mut World), fn(&World) -> Vec<Op>);

const ROWS: &[Row] = &[
    ("in order: nothing to do", |_| {}, |_| vec![]),
    (
        "a fresh node: devices, every remote, every map entry",
        |w| {
            w.pods.clear();
            let uplink = w.have.links["eth0"].clone();
            w.have = Observed {
                links: [("eth0".to_string(), uplink)].into(),
                vtep: Some(VtepEntries::default()),
                masq: MasqTable::Absent,
                cni_masq: Some(false),
                maps: Some(Maps::default()),
                ..Default::default()
            };
        },
        |w| {
            vec![
                ensure_bridge(w),
                ensure_vtep(w),
                program(r2()),
                program(r3()),
                Op::Map(MapOp::SetConfig(w.want().maps.unwrap().config)),
                put_remote(r2()),
                put_remote(r3()),
                put_slot(r2()),
                put_slot(r3()),
                put_vtep("10.0.0.2"),
                put_vtep("10.0.0.3"),
            ]
        },
    ),
    (
        "new remote",
        |w| w.add_lease(lease("10.244.4.0/24", "10.0.0.4", mac(0x44))),
        |_| {
            let r4 = remote("10.244.4.0/24", "10.0.0.4", mac(0x44));
            vec![
                program(r4),
                put_remote(r4),
                put_slot(r4),
                put_vtep("10.0.0.4"),
            ]
        },
    ),
    (
        "remote gone",
        |w| {
            w.leases.remove(&IpNet::V4(net("10.244.3.0/24")));
        },
        |_| {
            vec![
                del_route("10.244.3.0/24"),
                del_neigh("10.244.3.0"),
                del_fdb(mac(0x33), "10.0.0.3"),
                clear_slot("10.244.3.0/24"),
                del_remote("10.244.3.0/24"),
                del_vtep("10.0.0.3"),
            ]
        },
    ),
    (
        "empty lease set: every remote goes",
        |w| w.leases.clear(),
        |_| {
            vec![
                del_route("10.244.2.0/24"),
                del_route("10.244.3.0/24"),
                del_neigh("10.244.2.0"),
                del_neigh("10.244.3.0"),
                del_fdb(mac(0x22), "10.0.0.2"),
                del_fdb(mac(0x33), "10.0.0.3"),
                clear_slot("10.244.2.0/24"),
                clear_slot("10.244.3.0/24"),
                del_remote("10.244.2.0/24"),
                del_remote("10.244.3.0/24"),
                del_vtep("10.0.0.2"),
                del_vtep("10.0.0.3"),
            ]
        },
    ),
    (
        "VTEP MAC changed: the neighbour is replaced, not deleted",
        |w| w.add_lease(lease("10.244.2.0/24", "10.0.0.2", mac(0x2f))),
        |_| {
            let r = remote("10.244.2.0/24", "10.0.0.2", mac(0x2f));
            vec![
                program(r),
                del_fdb(mac(0x22), "10.0.0.2"),
                put_remote(r),
                put_slot(r),
            ]
        },
    ),
    (
        "public IP changed",
        |w| w.add_lease(lease("10.244.2.0/24", "10.0.0.12", mac(0x22))),
        |_| {
            let r = remote("10.244.2.0/24", "10.0.0.12", mac(0x22));
            vec![
                program(r),
                del_fdb(mac(0x22), "10.0.0.2"),
                put_remote(r),
                put_slot(r),
                put_vtep("10.0.0.12"),
                del_vtep("10.0.0.2"),
            ]
        },
    ),
    (
        "stale neighbour with the right route",
        |w| {
            w.entries().neighbours.insert(ip("10.244.2.0"), mac(0x99));
        },
        |_| vec![program(r2())],
    ),
    (
        "hand-deleted FDB entry",
        |w| {
            w.entries()
                .fdb
                .remove(&(mac(0x22), Some(IpAddr::V4(ip("10.0.0.2")))));
        },
        |_| vec![program(r2())],
    ),
    (
        "hand-deleted route",
        |w| {
            w.entries()
                .routes
                .retain(|(d, _)| *d != net("10.244.3.0/24"))
        },
        |_| vec![program(r3())],
    ),
    (
        "route without onlink is programmed again",
        |w| w.entries().routes = vec![(net("10.244.2.0/24"), true), (net("10.244.3.0/24"), false)],
        |_| vec![program(r3())],
    ),
    (
        "strays for a subnet no lease holds",
        |w| {
            let e = w.entries();
            e.routes.push((net("10.244.9.0/24"), true));
            e.neighbours.insert(ip("10.244.9.0"), mac(0x99));
            e.fdb.insert((mac(0x99), Some(IpAddr::V4(ip("10.0.0.9")))));
            let m = w.maps();
            let stray = node_of(remote("10.244.9.0/24", "10.0.0.9", mac(0x99)));
            m.remotes.insert(net("10.244.9.0/24"), stray);
            m.slots.insert(9, stray);
            m.vteps.insert(ip("10.0.0.9"));
        },
        |_| {
            vec![
                del_route("10.244.9.0/24"),
                del_neigh("10.244.9.0"),
                del_fdb(mac(0x99), "10.0.0.9"),
                clear_slot("10.244.9.0/24"),
                del_remote("10.244.9.0/24"),
                del_vtep("10.0.0.9"),
            ]
        },
    ),
    (
        "map entry removed by hand",
        |w| {
            w.maps().remotes.remove(&net("10.244.3.0/24"));
        },
        |_| vec![put_remote(r3())],
    ),
    (
        "lease slot emptied or changed by hand",
        |w| {
            let m = w.maps();
            m.slots.remove(&3);
            m.slots.insert(2, node_of(r3()));
        },
        |_| vec![put_slot(r2()), put_slot(r3())],
    ),
    (
        "a new config: a slot that changes is emptied before it, filled after",
        |w| {
            let m = w.maps();
            m.config.as_mut().unwrap().vni = 7;
            m.slots.insert(2, node_of(r3()));
        },
        |w| {
            vec![
                clear_slot("10.244.2.0/24"),
                Op::Map(MapOp::SetConfig(w.want().maps.unwrap().config)),
                put_slot(r2()),
            ]
        },
    ),
    (
        "pod added",
        |w| {
            let p = pod("10.244.1.4", "vethfl-c", 0xc);
            let mut l = link(22, "vethfl-c", Some(InfoKind::Veth));
            l.controller = Some(BRIDGE);
            w.have.links.insert(l.name.clone(), l);
            w.pods.insert(p.key().unwrap(), p);
        },
        |w| {
            let p = &w.pods[&aip("10.244.1.4")];
            vec![attach("vethfl-c", 22), put_endpoint(p, 22)]
        },
    ),
    (
        "pod removed",
        |w| {
            w.pods.remove(&aip("10.244.1.3"));
        },
        |_| vec![del_endpoint("10.244.1.3"), detach(POD_B)],
    ),
    (
        "pod interface gone: entry, link and record go",
        |w| {
            w.have.links.remove("vethfl-a");
        },
        |_| {
            vec![
                del_endpoint("10.244.1.2"),
                detach(POD_A),
                Op::ForgetPod(aip("10.244.1.2")),
            ]
        },
    ),
    (
        "pod link pinned by an earlier agent is taken over",
        |w| {
            w.maps().pod_links.insert(POD_A, false);
        },
        |_| vec![attach("vethfl-a", POD_A)],
    ),
    (
        "pod link being attached is left alone",
        |w| {
            w.maps().pod_links.insert(30, false);
            w.attaching.insert(30);
        },
        |_| vec![],
    ),
    (
        "pod veth recreated under a new index",
        |w| {
            w.have.links.get_mut("vethfl-b").unwrap().index = 31;
        },
        |w| {
            let p = &w.pods[&aip("10.244.1.3")];
            vec![attach("vethfl-b", 31), put_endpoint(p, 31), detach(POD_B)]
        },
    ),
    (
        "masquerade table missing",
        |w| {
            w.ip_masq = true;
            w.have.masq = MasqTable::Absent;
        },
        |_| vec![Op::Masq(MasqOp::Install(masq_spec()))],
    ),
    (
        "masquerade table from an earlier run is written again",
        |w| {
            w.ip_masq = true;
            w.have.masq = MasqTable::Present(None);
        },
        |_| vec![Op::Masq(MasqOp::Install(masq_spec()))],
    ),
    (
        "masquerade in place; the CNI plugin's rule goes",
        |w| {
            w.ip_masq = true;
            w.have.masq = MasqTable::Present(Some(masq_spec()));
            w.have.cni_masq = Some(true);
        },
        |_| vec![Op::Masq(MasqOp::RemoveCni)],
    ),
    (
        "masquerade not wanted: an earlier run's table goes",
        |w| w.have.masq = MasqTable::Present(None),
        |_| vec![Op::Masq(MasqOp::Remove)],
    ),
    (
        "kernel mode: kernel entries and records only, no map operations",
        |w| {
            w.ebpf = None;
            w.have.maps = None;
            w.add_lease(lease("10.244.4.0/24", "10.0.0.4", mac(0x44)));
            w.entries()
                .routes
                .retain(|(d, _)| *d != net("10.244.2.0/24"));
            w.have.links.remove("vethfl-b");
        },
        |_| {
            vec![
                program(r2()),
                program(remote("10.244.4.0/24", "10.0.0.4", mac(0x44))),
                Op::ForgetPod(aip("10.244.1.3")),
            ]
        },
    ),
    (
        "eBPF mode with unreadable maps: no map operations",
        |w| {
            w.have.maps = None;
            w.pods.clear();
        },
        |_| vec![],
    ),
    (
        "VTEP incompatible (other port): recreated, every remote again, nothing deleted",
        |w| {
            let v = w.have.links.get_mut("flannel.1").unwrap();
            v.vxlan.retain(|i| !matches!(i, InfoVxlan::Port(_)));
            v.vxlan.push(InfoVxlan::Port(8472));
            w.entries().routes.push((net("10.244.9.0/24"), true));
        },
        |w| vec![ensure_vtep(w), program(r2()), program(r3())],
    ),
    (
        "VTEP with the wrong MTU: repaired in place",
        |w| w.have.links.get_mut("flannel.1").unwrap().mtu = 1400,
        |w| vec![ensure_vtep(w)],
    ),
    (
        "VTEP down",
        |w| w.have.links.get_mut("flannel.1").unwrap().up = false,
        |w| vec![ensure_vtep(w)],
    ),
    (
        "bridge missing",
        |w| {
            w.have.links.remove("cni0");
            w.have.bridge_addrs.clear();
        },
        |w| vec![ensure_bridge(w)],
    ),
    (
        "bridge with an address too many",
        |w| w.have.bridge_addrs.push(net("192.168.9.1/24")),
        |w| vec![ensure_bridge(w)],
    ),
    (
        "uplink MAC changed: the data path config is written again",
        |w| {
            w.node.uplink.mac = Some(mac(0x77));
        },
        |w| vec![Op::Map(MapOp::SetConfig(w.want().maps.unwrap().config))],
    ),
    (
        "VTEP entries unreadable: they are left for the next pass",
        |w| {
            w.have.vtep = None;
            w.leases.remove(&IpNet::V4(net("10.244.3.0/24")));
        },
        |_| {
            vec![
                clear_slot("10.244.3.0/24"),
                del_remote("10.244.3.0/24"),
                del_vtep("10.0.0.3"),
            ]
        },
    ),
    (
        "unusable and overlapping leases are left out",
        |w| {
            let mut bad = lease("10.244.5.0/24", "10.0.0.5", mac(0x55));
            bad.attrs.backend_type = "host-gw".into();
            w.add_lease(bad);
            w.add_lease(lease("10.244.0.0/16", "10.0.0.6", mac(0x66)));
        },
        |_| vec![],
    ),
    (
        "DirectRouting on: on-link remotes move from VXLAN to direct routes, the far one stays",
        |w| {
            w.cfg.backend.direct_routing = true;
            w.add_lease(lease("10.244.4.0/24", "10.0.1.4", mac(0x44)));
        },
        |w| {
            let r4 = remote("10.244.4.0/24", "10.0.1.4", mac(0x44));
            vec![
                program(r4),
                del_route("10.244.2.0/24"),
                del_route("10.244.3.0/24"),
                del_neigh("10.244.2.0"),
                del_neigh("10.244.3.0"),
                del_fdb(mac(0x22), "10.0.0.2"),
                del_fdb(mac(0x33), "10.0.0.3"),
                direct("10.244.2.0/24", "10.0.0.2"),
                direct("10.244.3.0/24", "10.0.0.3"),
                // The config's MTU is unchanged; only the maps' entries move.
                Op::Map(MapOp::PutRemote(
                    net("10.244.2.0/24"),
                    direct_node("10.0.0.2"),
                )),
                Op::Map(MapOp::PutRemote(
                    net("10.244.3.0/24"),
                    direct_node("10.0.0.3"),
                )),
                put_remote(r4),
                Op::Map(MapOp::PutSlot(2, direct_node("10.0.0.2"))),
                Op::Map(MapOp::PutSlot(3, direct_node("10.0.0.3"))),
                put_slot(r4),
                put_vtep("10.0.1.4"),
            ]
            .into_iter()
            .filter(|o| !matches!(o, Op::Map(MapOp::SetConfig(_))) || w.ebpf.is_some())
            .collect()
        },
    ),
    (
        "a stale direct route in the cluster network goes; other routes on the uplink stay",
        |w| {
            let up = w.have.uplink_routes.as_mut().unwrap();
            up.push((anet("10.244.9.0/24"), aip("10.0.0.9")));
            up.push((anet("192.168.0.0/16"), aip("10.0.0.254")));
            up.push((anet("0.0.0.0/0"), aip("10.0.0.254")));
        },
        |_| {
            vec![Op::Direct(DirectOp::Delete {
                subnet: anet("10.244.9.0/24"),
                uplink: UPLINK,
            })]
        },
    ),
    (
        "a direct route via the wrong gateway is replaced",
        |w| {
            w.cfg.backend.direct_routing = true;
            w.have = converged(w);
            let up = w.have.uplink_routes.as_mut().unwrap();
            up.retain(|(d, _)| *d != anet("10.244.2.0/24"));
            up.push((anet("10.244.2.0/24"), aip("10.0.0.99")));
        },
        |_| vec![direct("10.244.2.0/24", "10.0.0.2")],
    ),
    (
        "DirectRouting off again: direct routes go before the VTEP's entries come back",
        |w| {
            w.cfg.backend.direct_routing = true;
            w.have = converged(w);
            w.cfg.backend.direct_routing = false;
        },
        |_| {
            vec![
                Op::Direct(DirectOp::Delete {
                    subnet: anet("10.244.2.0/24"),
                    uplink: UPLINK,
                }),
                Op::Direct(DirectOp::Delete {
                    subnet: anet("10.244.3.0/24"),
                    uplink: UPLINK,
                }),
                program(r2()),
                program(r3()),
                put_remote(r2()),
                put_remote(r3()),
                put_slot(r2()),
                put_slot(r3()),
            ]
        },
    ),
    (
        "uplink routes unreadable: direct routes are left for the next pass",
        |w| {
            w.cfg.backend.direct_routing = true;
            w.have = converged(w);
            w.have.uplink_routes = None;
            w.leases.remove(&IpNet::V4(net("10.244.3.0/24")));
        },
        |_| {
            vec![
                clear_slot("10.244.3.0/24"),
                del_remote("10.244.3.0/24"),
                del_vtep("10.0.0.3"),
            ]
        },
    ),
];

fn direct(subnet: &str, via: &str) -> Op {
    Op::Direct(DirectOp::Route(DirectRoute {
        subnet: anet(subnet),
        via: aip(via),
        uplink: UPLINK,
    }))
}

fn direct_node(via: &str) -> RemoteNode {
    RemoteNode {
        node_ip: ip_key(ip(via)),
        vtep_mac: [0; 6],
        flags: REMOTE_F_DIRECT,
        _pad: 0,
    }
}

#[test]
fn diff_table() {
    assert!(ROWS.len() >= 20);
    for (name, setup, expect) in ROWS {
        let mut w = World::new();
        setup(&mut w);
        holders_are_vteps(&w.want(), name);
        let got = diff(&w.want(), &w.have);
        // The guard tables are rewritten whenever what they hold changes
        // (the rows below check when); the rest is each row's own list.
        let want_guard = super::diff::guard_spec(&w.want().guard, &w.have);
        let seen = matches!(&w.have.guard, GuardTables::Seen { ip: true, ip6, bridge, written: Some(g) }
            if *g == want_guard && *bridge == want_guard.pods.is_some()
                && *ip6 == want_guard.vteps6.is_some());
        let guards: Vec<_> = got.iter().filter(|o| matches!(o, Op::Guard(_))).collect();
        let expect_guard = (!seen).then(|| Op::Guard(want_guard.clone()));
        assert_eq!(
            guards,
            expect_guard.iter().collect::<Vec<_>>(),
            "row: {name}: guard"
        );
        let rest: Vec<Op> = got
            .iter()
            .filter(|o| !matches!(o, Op::Guard(_)))
            .cloned()
            .collect();
        assert_eq!(rest, expect(&w), "row: {name}");
        // The operations are enough: once they are applied, the next pass
        // has nothing to do.
        simulate(&got, &mut w);
        assert_eq!(diff(&w.want(), &w.have), vec![], "row after apply: {name}");
    }
}

/// With VXLAN, every node a remote-lease entry names is a known VTEP,
/// which the programs' decapsulation relies on (`decap::Tables`): it asks
/// the VTEP set only of packets it does not take.
fn holders_are_vteps(want: &Desired, what: &str) {
    let Some(m) = &want.maps else { return };
    if m.config.udp_port == 0 {
        return;
    }
    for r in m.remotes.values() {
        let ip = crate::datapath::ebpf::key_ip(r.node_ip);
        assert!(m.vteps.contains(&ip), "{what}: {ip} not a VTEP");
    }
    for r in m.remotes6.values() {
        let ip = std::net::Ipv6Addr::from(r.node_ip6);
        assert!(m.vteps6.contains(&ip), "{what}: {ip} not a VTEP");
    }
}

/// Applies `ops` to the world's observed state the way the kernel and the
/// maps take them (replace semantics; an FDB entry is keyed by its MAC; a
/// recreated VXLAN device starts empty).
fn simulate(ops: &[Op], w: &mut World) {
    let have = &mut w.have;
    for op in ops {
        match op {
            Op::Guard(g) => {
                have.guard = GuardTables::Seen {
                    ip: true,
                    ip6: g.vteps6.is_some(),
                    bridge: g.pods.is_some(),
                    written: Some(g.clone()),
                };
            }
            Op::Device(DeviceOp::Bridge(b)) => {
                let mut l = link(BRIDGE, &b.name, Some(InfoKind::Bridge));
                l.mtu = b.mtu;
                l.mac = Some(b.mac);
                have.links.insert(b.name.clone(), l);
                have.bridge_addrs = b.gateway.into_iter().collect();
                have.bridge_addrs6 = b.gateway6.into_iter().collect();
            }
            Op::Device(DeviceOp::Vtep(v)) => {
                let old = have.links.get(&v.link.name);
                let recreated = !old.is_some_and(|l| v.link.compatible(l));
                match v.addr {
                    IpNet::V4(a) => {
                        if recreated {
                            have.vtep = Some(VtepEntries::default());
                        }
                        have.vtep_addrs = vec![a];
                    }
                    IpNet::V6(a) => {
                        if recreated {
                            have.vtep6 = Some(VtepEntries6::default());
                        }
                        have.vtep6_addrs = vec![a];
                    }
                }
                have.links.insert(v.link.name.clone(), vtep_link(v));
            }
            Op::Vtep6(v) => {
                let e = have.vtep6.as_mut().expect("no VTEP op on unread entries");
                match *v {
                    VtepOp::Program(r) => {
                        e.neighbours.insert(r.subnet.network(), r.vtep_mac);
                        e.fdb.retain(|(m, _)| *m != r.vtep_mac);
                        e.fdb.insert((r.vtep_mac, Some(IpAddr::V6(r.public_ip))));
                        e.routes.retain(|(d, _)| *d != r.subnet);
                        e.routes.push((r.subnet, true));
                    }
                    VtepOp::DeleteRoute(d) => e.routes.retain(|(x, _)| *x != d),
                    VtepOp::DeleteNeighbour(a) => {
                        e.neighbours.remove(&a);
                    }
                    VtepOp::DeleteFdb { mac, dst } => {
                        e.fdb.remove(&(mac, dst));
                    }
                }
            }
            Op::Vtep(v) => {
                let e = have.vtep.as_mut().expect("no VTEP op on unread entries");
                match *v {
                    VtepOp::Program(r) => {
                        e.neighbours.insert(r.subnet.network(), r.vtep_mac);
                        e.fdb.retain(|(m, _)| *m != r.vtep_mac);
                        e.fdb.insert((r.vtep_mac, Some(IpAddr::V4(r.public_ip))));
                        e.routes.retain(|(d, _)| *d != r.subnet);
                        e.routes.push((r.subnet, true));
                        // One main table: a replace takes the destination
                        // from whichever device had it.
                        if let Some(up) = have.uplink_routes.as_mut() {
                            up.retain(|(d, _)| *d != IpNet::V4(r.subnet));
                        }
                    }
                    VtepOp::DeleteRoute(d) => e.routes.retain(|(x, _)| *x != d),
                    VtepOp::DeleteNeighbour(a) => {
                        e.neighbours.remove(&a);
                    }
                    VtepOp::DeleteFdb { mac, dst } => {
                        e.fdb.remove(&(mac, dst));
                    }
                }
            }
            Op::Direct(DirectOp::Route(d)) => {
                let up = have
                    .uplink_routes
                    .as_mut()
                    .expect("no route op on unread routes");
                up.retain(|(x, _)| *x != d.subnet);
                up.push((d.subnet, d.via));
                match d.subnet {
                    IpNet::V4(n) => {
                        if let Some(e) = have.vtep.as_mut() {
                            e.routes.retain(|(x, _)| *x != n);
                        }
                    }
                    IpNet::V6(n) => {
                        if let Some(e) = have.vtep6.as_mut() {
                            e.routes.retain(|(x, _)| *x != n);
                        }
                    }
                }
            }
            Op::Direct(DirectOp::Delete { subnet, .. }) => {
                let up = have
                    .uplink_routes
                    .as_mut()
                    .expect("no route op on unread routes");
                up.retain(|(x, _)| x != subnet);
            }
            Op::Masq(MasqOp::Install(spec)) => have.masq = MasqTable::Present(Some(*spec)),
            Op::Masq(MasqOp::Remove) => have.masq = MasqTable::Absent,
            Op::Masq(MasqOp::RemoveCni) => have.cni_masq = Some(false),
            Op::Map(m) => {
                let maps = have.maps.as_mut().expect("no map op on unread maps");
                match m {
                    MapOp::SetConfig(c) => maps.config = Some(*c),
                    MapOp::PutRemote(n, r) => {
                        maps.remotes.insert(*n, *r);
                    }
                    MapOp::DeleteRemote(n) => {
                        maps.remotes.remove(n);
                    }
                    MapOp::PutSlot(i, r) => {
                        maps.slots.insert(*i, *r);
                    }
                    MapOp::ClearSlot(i) => {
                        maps.slots.remove(i);
                    }
                    MapOp::PutRemote6(n, r) => {
                        maps.remotes6.insert(*n, *r);
                    }
                    MapOp::DeleteRemote6(n) => {
                        maps.remotes6.remove(n);
                    }
                    MapOp::PutVtep(a) => {
                        maps.vteps.insert(*a);
                    }
                    MapOp::DeleteVtep(a) => {
                        maps.vteps.remove(a);
                    }
                    MapOp::PutVtep6(a) => {
                        maps.vteps6.insert(*a);
                    }
                    MapOp::DeleteVtep6(a) => {
                        maps.vteps6.remove(a);
                    }
                    MapOp::AttachPod { ifindex, .. } => {
                        maps.pod_links.insert(*ifindex, true);
                    }
                    MapOp::PutEndpoint(a, ep) => {
                        maps.endpoints.insert(*a, *ep);
                    }
                    MapOp::PutEndpoint6(a, ep) => {
                        maps.endpoints6.insert(*a, *ep);
                    }
                    MapOp::DeleteEndpoint6(a) => {
                        maps.endpoints6.remove(a);
                    }
                    MapOp::DeleteEndpoint(a) => {
                        maps.endpoints.remove(a);
                    }
                    MapOp::DetachPod(i) => {
                        maps.pod_links.remove(i);
                    }
                }
            }
            Op::ForgetPod(a) => {
                w.pods.remove(a);
            }
        }
    }
}

#[test]
fn desired_state_from_node_config_and_leases() {
    let mut w = World::new();
    let mut bad = lease("10.244.5.0/24", "10.0.0.5", mac(0x55));
    bad.attrs.backend_type = "host-gw".into();
    w.add_lease(bad);
    w.add_lease(lease("10.244.0.0/16", "10.0.0.6", mac(0x66)));
    w.add_lease(lease(
        "10.244.7.0/24",
        "10.0.0.7",
        MacAddr([0x01, 0, 0, 0, 0, 7]),
    ));
    let want = w.want();
    // Our own lease is no remote; the unusable ones say why.
    assert_eq!(
        want.remotes.keys().copied().collect::<Vec<_>>(),
        [net("10.244.2.0/24"), net("10.244.3.0/24")]
    );
    let why: Vec<(IpNet, &str)> = want
        .ignored
        .iter()
        .map(|(n, i)| (*n, i.why.as_str()))
        .collect();
    assert_eq!(why.len(), 3, "{why:?}");
    assert!(why[0].0 == anet("10.244.0.0/16") && why[0].1.contains("overlaps"));
    assert!(why[1].0 == anet("10.244.5.0/24") && why[1].1.contains("not vxlan"));
    assert!(why[2].0 == anet("10.244.7.0/24") && why[2].1.contains("not unicast"));
    // Flannel's devices: gateway .1 on the bridge, the lease's .0/32 on
    // flannel.1, MTU = uplink − 50, the port from the config.
    assert_eq!(want.bridge.gateway, Some(net("10.244.1.1/24")));
    assert_eq!(want.bridge.mtu, 1450);
    assert_eq!(
        want.vtep.as_ref().unwrap().addr,
        IpNet::V4(net("10.244.1.0/32"))
    );
    assert_eq!(want.vtep.as_ref().unwrap().link.name, "flannel.1");
    assert_eq!(want.vtep.as_ref().unwrap().link.port, 4789);
    assert_eq!(want.vtep.as_ref().unwrap().link.uplink, UPLINK);
    let maps = want.maps.unwrap();
    assert_eq!(
        maps.config,
        Config {
            vni: 1,
            udp_port: 4789,
            node_ip: ip_key(ip("10.0.0.1")),
            uplink_ifindex: UPLINK,
            inner_mtu: 1450,
            flags: CONFIG_F_READY | CONFIG_F_TC_DECAP,
            vtep_mac: mac(0x11).0,
            uplink_mac: mac(UPLINK as u8).0,
            gateway_mac: MacAddr::for_bridge(ip("10.244.1.1")).0,
            // 10.244.0.0/16 of /24 leases: 256 slots, by the third byte.
            network: ip_key(ip("10.244.0.0")),
            network_mask: ip_key(ip("255.255.0.0")),
            lease_shift: 8,
            lease_slots: 256,
            ..Default::default()
        }
    );
    assert_eq!(
        maps.slots,
        [(2, node_of(r2())), (3, node_of(r3()))]
            .into_iter()
            .collect()
    );
    assert_eq!(
        maps.vteps,
        [ip("10.0.0.2"), ip("10.0.0.3")].into_iter().collect()
    );
    assert_eq!(want.masq, None);

    // Backend.MTU wins over the uplink's; XDP decap clears the TC flag;
    // kernel mode wants no maps; --ip-masq wants the rules.
    w.cfg =
        NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":1400}}"#)
            .unwrap();
    w.ebpf = Some(EbpfMode {
        tc_decap: false,
        strict_source: false,
        netfilter: false,
    });
    w.ip_masq = true;
    let want = w.want();
    assert_eq!(want.bridge.mtu, 1400);
    assert_eq!(want.vtep.as_ref().unwrap().link.port, 8472);
    assert_eq!(want.maps.unwrap().config.flags, CONFIG_F_READY);
    assert_eq!(want.masq, Some(masq_spec()));
    w.ebpf = None;
    assert_eq!(w.want().maps, None);
}

/// A dual-stack world with nodes 2, 3 and 4: node 2 on this node's IPv4
/// and IPv6 networks, node 3 on the IPv4 one only, node 4 on the IPv6 one
/// only. `host_gw` gives Flannel's host-gw leases (public IPv6, no
/// BackendV6Data), else VXLAN ones with both VtepMACs.
fn dual_stack_world(config: &str, host_gw: bool) -> World {
    let mut w = World::new();
    w.cfg = NetConfig::parse(config).unwrap();
    w.node.ip6 = Some(aip6("fd00:30::1"));
    w.node.uplink_nets6 = vec!["fd00:30::1/64".parse().unwrap()];
    w.node.lease.ipv6_subnet = Some("fd00:10:244:1::/64".parse().unwrap());
    w.leases.clear();
    for (n, node4, node6) in [
        (1u8, "10.0.0.1", "fd00:30::1"),
        (2, "10.0.0.2", "fd00:30::2"),
        (3, "10.0.0.3", "fd00:31::3"),
        (4, "10.0.1.4", "fd00:30::4"),
    ] {
        let mut l = lease(&format!("10.244.{n}.0/24"), node4, mac(n * 0x11));
        l.ipv6_subnet = Some(format!("fd00:10:244:{n}::/64").parse().unwrap());
        l.attrs = if host_gw {
            LeaseAttrs {
                public_ipv6: Some(aip6(node6)),
                ..LeaseAttrs::host_gw(ip(node4))
            }
        } else {
            l.attrs.with_v6(aip6(node6), 1, mac(0x60 + n))
        };
        w.add_lease(l);
    }
    w.have = converged(&w);
    w
}

fn aip6(s: &str) -> std::net::Ipv6Addr {
    s.parse().unwrap()
}

/// What [`dual_stack_world`] routes directly with DirectRouting or
/// host-gw: nodes 2 and 3 over IPv4, nodes 2 and 4 over IPv6.
const DIRECT_BOTH_FAMILIES: [(&str, &str); 4] = [
    ("10.244.2.0/24", "10.0.0.2"),
    ("10.244.3.0/24", "10.0.0.3"),
    ("fd00:10:244:2::/64", "fd00:30::2"),
    ("fd00:10:244:4::/64", "fd00:30::4"),
];

/// The direct routes wanted, as (subnet, via) text.
fn direct_routes(want: &Desired) -> Vec<(String, String)> {
    want.direct
        .values()
        .map(|d| (d.subnet.to_string(), d.via.to_string()))
        .collect()
}

/// Flannel decides each family on its own: with DirectRouting a remote
/// whose IPv6 is on this node's IPv6 network gets `<IPv6 subnet> via <node
/// IPv6> dev <uplink>`, whatever its IPv4 side does, and one off it keeps
/// `flannel-v6.<VNI>`. The programs get the same split (`REMOTE_F_DIRECT`
/// in the IPv6 trie); every lease holder's IPv6 may still send VXLAN.
#[test]
fn dual_stack_direct_routing_decides_each_family_on_its_own() {
    let mut w = dual_stack_world(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
        false,
    );
    let want = w.want();
    holders_are_vteps(&want, "dual-stack DirectRouting");
    assert_eq!(
        direct_routes(&want),
        DIRECT_BOTH_FAMILIES.map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(
        want.remotes.keys().copied().collect::<Vec<_>>(),
        [net("10.244.4.0/24")]
    );
    assert_eq!(
        want.remotes6
            .values()
            .map(|r| r.public_ip)
            .collect::<Vec<_>>(),
        [aip6("fd00:31::3")]
    );
    assert!(
        want.vtep6.is_some() && want.ignored.is_empty(),
        "{:?}",
        want.ignored
    );
    let maps = want.maps.as_ref().unwrap();
    let flags = |n: &str| maps.remotes6[&n.parse::<Ipv6Net>().unwrap()].flags;
    assert_eq!(flags("fd00:10:244:2::/64"), REMOTE_F_DIRECT);
    assert_eq!(flags("fd00:10:244:3::/64"), 0);
    assert_eq!(flags("fd00:10:244:4::/64"), REMOTE_F_DIRECT);
    assert_eq!(
        maps.remotes6[&"fd00:10:244:4::/64".parse::<Ipv6Net>().unwrap()].node_ip6,
        aip6("fd00:30::4").octets()
    );
    assert_eq!(maps.vteps6.len(), 3);
    assert_eq!(want.guard.vteps6.as_ref(), Some(&maps.vteps6));
    assert_eq!(maps.config.node_ip6, aip6("fd00:30::1").octets());
    // The observed state built from it needs nothing more.
    assert_eq!(diff(&want, &w.have), vec![]);

    // A stale IPv6 route through the uplink inside the IPv6 network goes
    // (with a wrong gateway, replaced); one outside it, or an IPv4-only
    // agent's view, is left alone.
    let up = w.have.uplink_routes.as_mut().unwrap();
    up.retain(|(d, _)| *d != anet("fd00:10:244:4::/64"));
    up.push((anet("fd00:10:244:4::/64"), aip("fd00:30::99")));
    up.push((anet("fd00:10:244:9::/64"), aip("fd00:30::9")));
    up.push((anet("fd00:99::/64"), aip("fd00:30::9")));
    let ops = diff(&w.want(), &w.have);
    assert_eq!(
        ops,
        [
            Op::Direct(DirectOp::Delete {
                subnet: anet("fd00:10:244:9::/64"),
                uplink: UPLINK
            }),
            direct("fd00:10:244:4::/64", "fd00:30::4"),
        ]
    );
    simulate(&ops, &mut w);
    assert_eq!(diff(&w.want(), &w.have), vec![]);

    // Node 4 moves its IPv6 off our network: back to flannel-v6.1, the
    // direct route going first.
    let l4 = w.leases.get_mut(&IpNet::V4(net("10.244.4.0/24"))).unwrap();
    l4.attrs.public_ipv6 = Some(aip6("fd00:31::4"));
    let ops = diff(&w.want(), &w.have);
    let r4 = RemoteEntry6 {
        subnet: "fd00:10:244:4::/64".parse().unwrap(),
        public_ip: aip6("fd00:31::4"),
        vtep_mac: mac(0x64),
    };
    let del = ops
        .iter()
        .position(|o| {
            *o == Op::Direct(DirectOp::Delete {
                subnet: anet("fd00:10:244:4::/64"),
                uplink: UPLINK,
            })
        })
        .expect("the direct route goes");
    let add = ops
        .iter()
        .position(|o| *o == Op::Vtep6(VtepOp::Program(r4)))
        .expect("flannel-v6.1 entries come");
    assert!(del < add, "{ops:?}");
    simulate(&ops, &mut w);
    assert_eq!(diff(&w.want(), &w.have), vec![]);

    // IPv6 off: the IPv6 routes are no longer the agent's business.
    w.cfg = NetConfig::parse(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
    )
    .unwrap();
    let ops = diff(&w.want(), &w.have);
    assert!(
        !ops.iter().any(|o| matches!(
            o,
            Op::Direct(DirectOp::Delete {
                subnet: IpNet::V6(_),
                ..
            })
        )),
        "{ops:?}"
    );
}

/// Dual-stack host-gw: every remote's IPv6 side routed via its node's
/// IPv6, decided apart from its IPv4 side; one off the IPv6 network set
/// aside with Flannel's reason. No VXLAN device of either family.
#[test]
fn dual_stack_host_gw_routes_ipv6_via_each_node() {
    let w = dual_stack_world(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#,
        true,
    );
    let want = w.want();
    assert_eq!(
        direct_routes(&want),
        DIRECT_BOTH_FAMILIES.map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!((want.vtep.clone(), want.vtep6.clone()), (None, None));
    assert!(want.remotes.is_empty() && want.remotes6.is_empty());
    let why: BTreeMap<String, &str> = want
        .ignored
        .iter()
        .map(|(n, i)| (n.to_string(), i.why.as_str()))
        .collect();
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(why["10.244.4.0/24"].contains("network is unreachable"));
    assert!(
        why["fd00:10:244:3::/64"]
            .contains("node fd00:31::3 is not on this node's IPv6 network (fd00:30::/64)"),
        "{why:?}"
    );
    let maps = want.maps.as_ref().unwrap();
    assert_eq!(maps.config.node_ip6, aip6("fd00:30::1").octets());
    assert_eq!(maps.config.vtep6_mac, [0; 6]);
    assert!(maps.remotes6.values().all(|r| r.flags == REMOTE_F_DIRECT));
    assert_eq!(maps.remotes6.len(), 2);
    assert!(maps.vteps6.is_empty() && want.guard.vteps6.is_none());
    let mut w = w;
    assert_eq!(diff(&want, &w.have), vec![]);
    // From a node with nothing: the IPv6 routes come with the IPv4 ones.
    w.have.uplink_routes = Some(Vec::new());
    let ops = diff(&w.want(), &w.have);
    assert!(ops.contains(&direct("fd00:10:244:2::/64", "fd00:30::2")));
    assert!(ops.contains(&direct("fd00:10:244:4::/64", "fd00:30::4")));
    simulate(&ops, &mut w);
    assert_eq!(diff(&w.want(), &w.have), vec![]);
}

/// Flannel's host-gw: no VXLAN device, every on-link remote routed via its
/// node, a remote off the L2 network and a VXLAN lease ignored with the
/// reason, pods at the uplink's MTU, no VXLAN guard rule.
#[test]
fn host_gw_routes_every_on_link_remote_directly() {
    let mut w = World::new();
    w.cfg =
        NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
    w.leases.clear();
    let host_gw = |subnet: &str, node: &str| Lease {
        subnet: net(subnet),
        ipv6_subnet: None,
        attrs: LeaseAttrs::host_gw(ip(node)),
        expiration: None,
    };
    for l in [
        host_gw("10.244.1.0/24", "10.0.0.1"),
        host_gw("10.244.2.0/24", "10.0.0.2"),
        host_gw("10.244.3.0/24", "10.0.0.3"),
        host_gw("10.244.4.0/24", "10.0.1.4"),
        lease("10.244.5.0/24", "10.0.0.5", mac(0x55)),
    ] {
        w.add_lease(l);
    }
    let want = w.want();
    assert_eq!(want.vtep, None);
    assert!(want.remotes.is_empty());
    assert_eq!(
        want.direct
            .values()
            .map(|d| (d.subnet, d.via))
            .collect::<Vec<_>>(),
        [
            (anet("10.244.2.0/24"), aip("10.0.0.2")),
            (anet("10.244.3.0/24"), aip("10.0.0.3"))
        ]
    );
    let why: BTreeMap<IpNet, &str> = want
        .ignored
        .iter()
        .map(|(n, i)| (*n, i.why.as_str()))
        .collect();
    assert!(
        why[&anet("10.244.4.0/24")]
            .contains("node 10.0.1.4 is not on this node's network (10.0.0.0/24)")
            && why[&anet("10.244.4.0/24")].contains("network is unreachable"),
        "{why:?}"
    );
    assert!(
        why[&anet("10.244.5.0/24")].contains("\"vxlan\" is not host-gw"),
        "{why:?}"
    );
    assert_eq!(want.bridge.mtu, 1500);
    let maps = want.maps.as_ref().unwrap();
    assert_eq!(maps.config.inner_mtu, 1450);
    assert_eq!(maps.config.udp_port, 0, "host-gw judges no VXLAN");
    assert!(maps.vteps.is_empty());
    assert!(maps.remotes.values().all(|r| r.flags == REMOTE_F_DIRECT));
    assert_eq!(maps.remotes.len(), 2);
    assert_eq!(want.guard.port, None);
    assert!(want.guard.vteps.is_empty());

    // From a node with nothing: bridge, routes, maps; never a VXLAN device.
    let uplink = w.have.links["eth0"].clone();
    w.have = Observed {
        links: [("eth0".to_string(), uplink)].into(),
        vtep: Some(VtepEntries::default()),
        uplink_routes: Some(Vec::new()),
        masq: MasqTable::Absent,
        cni_masq: Some(false),
        maps: Some(Maps::default()),
        ..Default::default()
    };
    w.pods.clear();
    let ops = diff(&want, &w.have);
    assert!(
        !ops.iter()
            .any(|o| matches!(o, Op::Device(DeviceOp::Vtep(_)) | Op::Vtep(_))),
        "{ops:?}"
    );
    assert!(ops.contains(&direct("10.244.2.0/24", "10.0.0.2")));
    assert!(ops.contains(&direct("10.244.3.0/24", "10.0.0.3")));
    simulate(&ops, &mut w);
    assert_eq!(diff(&w.want(), &w.have), vec![]);

    // The uplink's address moves to another network: the remotes become
    // unreachable and their routes and map entries go.
    w.node.uplink_nets = vec![net("10.0.1.1/24")];
    let ops = diff(&w.want(), &w.have);
    for subnet in ["10.244.2.0/24", "10.244.3.0/24"] {
        assert!(ops.contains(&Op::Direct(DirectOp::Delete {
            subnet: anet(subnet),
            uplink: UPLINK
        })));
        assert!(ops.contains(&del_remote(subnet)));
    }
    assert!(ops.contains(&direct("10.244.4.0/24", "10.0.1.4")));
}

/// Dual-stack VXLAN as Flannel wires it: `flannel-v6.<VNI>` over the IPv6
/// node network (MTU uplink − 70, `<IPv6 lease>/128`), the IPv6 gateway on
/// the bridge, and per remote with an IPv6 side its neighbour, FDB entry
/// and route on that device.
/// An IPv6-only cluster (`EnableIPv4: false`): leases with Flannel's empty
/// IPv4 subnet, no `flannel.<VNI>`, no IPv4 address on the bridge, no
/// IPv4 map entries or lease slots, every remote over `flannel-v6.<VNI>`;
/// and in a cluster with IPv4 such a lease is set aside, with the reason.
#[test]
fn ipv6_only_programs_every_remote_over_ipv6_and_nothing_of_ipv4() {
    let ip6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
    let net6 = |s: &str| s.parse::<Ipv6Net>().unwrap();
    let only6 = |n: u8, kind: &str| {
        let attrs = LeaseAttrs {
            backend_data: serde_json::Value::Null,
            ..LeaseAttrs::vxlan(Ipv4Addr::UNSPECIFIED, 1, mac(n * 0x11))
        }
        .with_v6(ip6(&format!("fd00:30::{n}")), 1, mac(0x60 + n));
        Lease {
            subnet: Ipv4Net::default(),
            ipv6_subnet: Some(net6(&format!("fd00:10:244:{n}::/64"))),
            attrs: LeaseAttrs {
                backend_type: kind.into(),
                ..attrs
            },
            expiration: None,
        }
    };
    let mut w = World::new();
    w.cfg = NetConfig::parse(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","Port":4789}}"#,
    )
    .unwrap();
    w.node.ip = Ipv4Addr::UNSPECIFIED;
    w.node.uplink_nets = Vec::new();
    w.node.ip6 = Some(ip6("fd00:30::1"));
    w.node.uplink_nets6 = vec!["fd00:30::1/64".parse().unwrap()];
    w.node.lease = only6(1, "vxlan");
    w.leases.clear();
    w.pods.clear();
    w.ip_masq = true;
    for (n, kind) in [(1, "vxlan"), (2, "vxlan"), (3, "vxlan"), (4, "host-gw")] {
        w.add_lease(only6(n, kind));
    }
    let want = w.want();
    assert_eq!(want.vtep, None, "no flannel.1 without IPv4");
    assert_eq!(want.network, None);
    assert!(want.remotes.is_empty() && want.direct.is_empty());
    assert_eq!(want.bridge.gateway, None);
    assert_eq!(want.bridge.gateway6, Some(net6("fd00:10:244:1::1/64")));
    assert_eq!(want.bridge.mac, MacAddr([0x0e, 0xb6, 0x02, 0x44, 0, 0x01]));
    assert_eq!(want.vtep6.as_ref().unwrap().link.name, "flannel-v6.1");
    assert_eq!(
        want.remotes6
            .keys()
            .map(|n| n.to_string())
            .collect::<Vec<_>>(),
        ["fd00:10:244:2::/64", "fd00:10:244:3::/64"]
    );
    assert_eq!(
        want.remotes6[&net6("fd00:10:244:3::/64")].vtep_mac,
        mac(0x63)
    );
    // The host-gw lease: set aside under its IPv6 subnet and node.
    let aside = &want.ignored[&IpNet::V6(net6("fd00:10:244:4::/64"))];
    assert_eq!(aside.node, IpAddr::V6(ip6("fd00:30::4")));
    assert!(aside.why.contains("not vxlan"), "{}", aside.why);
    assert_eq!(
        want.masq.unwrap(),
        MasqSpec {
            v4: None,
            v6: Some((net6("fd00:10:244::/56"), net6("fd00:10:244:1::/64")))
        }
    );
    let maps = want.maps.clone().unwrap();
    assert_eq!(maps.config.node_ip, 0);
    assert_eq!(maps.config.lease_slots, 0);
    assert!(maps.remotes.is_empty() && maps.slots.is_empty() && maps.vteps.is_empty());
    assert_eq!(maps.config.node_ip6, ip6("fd00:30::1").octets());
    assert_eq!(maps.vteps6.len(), 2);
    assert!(want.guard.vteps.is_empty());
    // From an empty node: nothing of IPv4 is created.
    let ops = diff(&want, &Observed::default());
    assert!(
        !ops.iter().any(|op| matches!(op, Op::Vtep(_))
            || matches!(op, Op::Device(DeviceOp::Vtep(v)) if v.link.name == "flannel.1")
            || matches!(op, Op::Map(MapOp::PutRemote(..) | MapOp::PutSlot(..)))),
        "{ops:?}"
    );
    assert!(ops.contains(&Op::Device(DeviceOp::Vtep(want.vtep6.clone().unwrap()))));
    // An IPv6-only pod: named by its IPv6 address, an IPv6 endpoint entry
    // and none of IPv4; forgotten by that name once its veth is gone.
    let pod6 = EndpointRecord {
        ip: None,
        ip6: Some(ip6("fd00:10:244:1::5")),
        ..pod("10.244.1.5", "vethfl-6", 0x6)
    };
    w.pods.insert(pod6.key().unwrap(), pod6.clone());
    let want = w.want();
    let mut have = Observed {
        maps: Some(Maps::default()),
        ..Observed::default()
    };
    have.links.insert(
        "vethfl-6".into(),
        link(POD_A, "vethfl-6", Some(InfoKind::Veth)),
    );
    let ops = diff(&want, &have);
    let ep = Endpoint {
        host_ifindex: POD_A,
        pod_mac: mac(0x6).0,
        _pad: [0; 2],
    };
    assert!(ops.contains(&Op::Map(MapOp::PutEndpoint6(ip6("fd00:10:244:1::5"), ep))));
    assert!(!ops
        .iter()
        .any(|op| matches!(op, Op::Map(MapOp::PutEndpoint(..)))));
    have.links.clear();
    let ops = diff(&want, &have);
    assert!(
        ops.contains(&Op::ForgetPod(aip("fd00:10:244:1::5"))),
        "{ops:?}"
    );

    // A cluster with IPv4 cannot use such a lease: set aside, IPv6 too.
    let mut dual = dual_stack_world(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","Port":4789}}"#,
        false,
    );
    dual.add_lease(only6(5, "vxlan"));
    let want = dual.want();
    let aside = &want.ignored[&IpNet::V6(net6("fd00:10:244:5::/64"))];
    assert!(aside.why.contains("no IPv4 subnet"), "{}", aside.why);
    assert!(!want.remotes6.contains_key(&net6("fd00:10:244:5::/64")));
    assert_eq!(want.remotes.len(), 3);
}

#[test]
fn dual_stack_adds_flannels_ipv6_device_and_entries() {
    let mut w = World::new();
    w.cfg = NetConfig::parse(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","Port":4789}}"#,
    )
    .unwrap();
    let ip6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
    let net6 = |s: &str| s.parse::<Ipv6Net>().unwrap();
    w.node.ip6 = Some(ip6("fd00:30::1"));
    w.node.lease.ipv6_subnet = Some(net6("fd00:10:244:1::/64"));
    w.leases.clear();
    let dual = |subnet: &str, subnet6: &str, node: u8| {
        let mut l = lease(subnet, &format!("10.0.0.{node}"), mac(node * 0x11));
        l.ipv6_subnet = Some(net6(subnet6));
        l.attrs = l
            .attrs
            .with_v6(ip6(&format!("fd00:30::{node}")), 1, mac(0x60 + node));
        l
    };
    w.add_lease(dual("10.244.1.0/24", "fd00:10:244:1::/64", 1));
    w.add_lease(dual("10.244.2.0/24", "fd00:10:244:2::/64", 2));
    w.add_lease(dual("10.244.3.0/24", "fd00:10:244:3::/64", 3));
    // A node that has not turned IPv6 on yet: reached over IPv4 only.
    w.add_lease(lease("10.244.4.0/24", "10.0.0.4", mac(0x44)));
    let want = w.want();
    let v6 = want.vtep6.clone().expect("flannel-v6.1");
    assert_eq!(v6.link.name, "flannel-v6.1");
    assert_eq!(v6.link.local, IpAddr::V6(ip6("fd00:30::1")));
    assert_eq!(v6.link.mtu, 1430);
    assert_eq!(v6.link.mac, mac(0x61));
    assert_eq!(v6.addr, IpNet::V6(net6("fd00:10:244:1::/128")));
    assert_eq!(want.bridge.gateway6, Some(net6("fd00:10:244:1::1/64")));
    assert_eq!(want.remotes.len(), 3);
    assert_eq!(
        want.remotes6.values().copied().collect::<Vec<_>>(),
        [
            RemoteEntry6 {
                subnet: net6("fd00:10:244:2::/64"),
                public_ip: ip6("fd00:30::2"),
                vtep_mac: mac(0x62)
            },
            RemoteEntry6 {
                subnet: net6("fd00:10:244:3::/64"),
                public_ip: ip6("fd00:30::3"),
                vtep_mac: mac(0x63)
            }
        ]
    );
    // From the IPv4-only node it was: the bridge, the new device and both
    // remotes' IPv6 entries; nothing of IPv4 changes but the new remote.
    let ops = diff(&want, &w.have);
    assert!(ops.contains(&Op::Device(DeviceOp::Bridge(want.bridge.clone()))));
    assert!(ops.contains(&Op::Device(DeviceOp::Vtep(v6.clone()))));
    for r in want.remotes6.values() {
        assert!(ops.contains(&Op::Vtep6(VtepOp::Program(*r))), "{ops:?}");
    }
    // The programs encapsulate IPv6 as flannel-v6.1 would: this node's
    // IPv6 and the device's MAC in the config, each remote IPv6 lease in
    // the IPv6 trie.
    let maps = want.maps.clone().expect("eBPF maps");
    assert_eq!(maps.config.node_ip6, ip6("fd00:30::1").octets());
    assert_eq!(maps.config.vtep6_mac, mac(0x61).0);
    assert!(ops.contains(&Op::Map(MapOp::SetConfig(maps.config))));
    for (subnet, node) in [("fd00:10:244:2::/64", 2u8), ("fd00:10:244:3::/64", 3)] {
        let entry = RemoteNode6 {
            node_ip6: ip6(&format!("fd00:30::{node}")).octets(),
            vtep_mac: mac(0x60 + node).0,
            flags: 0,
            _pad: 0,
        };
        assert_eq!(maps.remotes6[&net6(subnet)], entry);
        assert!(ops.contains(&Op::Map(MapOp::PutRemote6(net6(subnet), entry))));
        let node6 = ip6(&format!("fd00:30::{node}"));
        assert!(maps.vteps6.contains(&node6));
        assert!(ops.contains(&Op::Map(MapOp::PutVtep6(node6))));
    }
    assert_eq!(maps.vteps6.len(), 2);
    // The kernel's VXLAN over IPv6 is guarded by the same set.
    assert_eq!(want.guard.vteps6.as_ref(), Some(&maps.vteps6));
    assert_eq!(maps.remotes6.len(), 2);
    simulate(&ops, &mut w);
    assert_eq!(diff(&w.want(), &w.have), vec![]);
    // --ip-masq: the rules cover the IPv6 network and lease too, and rules
    // this process wrote for IPv4 only are written again.
    w.ip_masq = true;
    let spec = w.want().masq.expect("masquerade rules");
    assert_eq!(
        spec.v6,
        Some((net6("fd00:10:244::/56"), net6("fd00:10:244:1::/64")))
    );
    w.have.masq = MasqTable::Present(Some(MasqSpec { v6: None, ..spec }));
    assert_eq!(
        diff(&w.want(), &w.have),
        vec![Op::Masq(MasqOp::Install(spec))]
    );
    (w.ip_masq, w.have.masq) = (false, MasqTable::Absent);
    // A dual-stack pod gets its IPv6 entry, the same endpoint as its
    // IPv4's; an IPv6 entry no pod has goes.
    let pod = w.pods.values_mut().next().unwrap();
    pod.ip6 = Some(ip6("fd00:10:244:1::2"));
    let pod = pod.clone();
    let maps = w.have.maps.as_mut().unwrap();
    let ep = maps.endpoints[&pod.ip.unwrap()];
    maps.endpoints6.insert(ip6("fd00:10:244:1::99"), ep);
    let ops = diff(&w.want(), &w.have);
    assert_eq!(
        ops,
        [
            Op::Map(MapOp::PutEndpoint6(ip6("fd00:10:244:1::2"), ep)),
            Op::Map(MapOp::DeleteEndpoint6(ip6("fd00:10:244:1::99"))),
        ]
    );
    simulate(&ops, &mut w);
    assert_eq!(diff(&w.want(), &w.have), vec![]);
    // A remote's IPv6 side goes: its entries on flannel-v6.1 go with it.
    w.leases
        .get_mut(&IpNet::V4(net("10.244.3.0/24")))
        .unwrap()
        .attrs
        .public_ipv6 = None;
    let ops = diff(&w.want(), &w.have);
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::Vtep6(_)))
            .cloned()
            .collect::<Vec<_>>(),
        [
            Op::Vtep6(VtepOp::DeleteRoute(net6("fd00:10:244:3::/64"))),
            Op::Vtep6(VtepOp::DeleteNeighbour(ip6("fd00:10:244:3::"))),
            Op::Vtep6(VtepOp::DeleteFdb {
                mac: mac(0x63),
                dst: Some(IpAddr::V6(ip6("fd00:30::3")))
            }),
        ]
    );
    simulate(&ops, &mut w);
    assert_eq!(diff(&w.want(), &w.have), vec![]);
    // IPv6 off again: neither the device nor the bridge's IPv6 address is
    // the agent's business any more; both are left as they are.
    w.cfg =
        NetConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Port":4789}}"#)
            .unwrap();
    let want = w.want();
    assert_eq!((want.vtep6.clone(), want.bridge.gateway6), (None, None));
    // The programs leave IPv6 to the kernel again.
    let maps = want.maps.clone().expect("eBPF maps");
    assert_eq!(maps.config.node_ip6, [0; 16]);
    assert!(maps.remotes6.is_empty() && maps.vteps6.is_empty());
    assert_eq!(want.guard.vteps6, None);
    assert!(!diff(&want, &w.have)
        .iter()
        .any(|o| matches!(o, Op::Device(_) | Op::Vtep6(_))));
}

#[test]
fn inspect_names_every_disagreement() {
    use super::inspect::inspect;
    let w = World::new();
    let i = inspect(Default::default(), &w.want(), &w.have, BTreeMap::new());
    assert!(i.pending.is_empty(), "{:?}", i.pending);
    assert_eq!(i.remotes.len(), 2);
    assert_eq!(i.pods.len(), 2);
    for r in &i.remotes {
        assert!(r.problems.is_empty(), "{r:?}");
        assert!(r.route && r.map_vtep == Some(true));
        assert_eq!(r.neighbour.as_deref(), Some(r.vtep_mac.as_str()));
        assert_eq!(r.fdb.as_deref(), Some(r.public_ip.as_str()));
        assert_eq!(r.map, Some(format!("{} {}", r.public_ip, r.vtep_mac)));
    }
    for p in &i.pods {
        assert!(p.problems.is_empty() && p.program == "attached", "{p:?}");
    }
    assert!(i.devices.iter().all(|d| d.problems.is_empty()));

    // Break one of each: a route, a map entry, a VTEP, a neighbour, a
    // pod's program, the VXLAN device's MTU.
    let mut w = World::new();
    w.entries()
        .routes
        .retain(|(d, _)| *d != net("10.244.2.0/24"));
    w.entries().neighbours.insert(ip("10.244.3.0"), mac(0x99));
    w.maps().remotes.remove(&net("10.244.3.0/24"));
    w.maps().vteps.remove(&ip("10.0.0.2"));
    w.maps().pod_links.insert(POD_B, false);
    w.have.links.get_mut("flannel.1").unwrap().mtu = 1400;
    let i = inspect(Default::default(), &w.want(), &w.have, BTreeMap::new());
    let problems = |subnet: &str| remote_problems(&i, subnet);
    assert_eq!(
        problems("10.244.2.0/24"),
        [
            "kernel: no onlink route",
            "map: 10.0.0.2 is not a known VTEP"
        ]
    );
    assert_eq!(
        problems("10.244.3.0/24"),
        [
            "kernel: neighbour 10.244.3.0 is 0e:00:00:00:00:99, the lease says 0e:00:00:00:00:33",
            "map: entry is missing, the lease says 10.0.0.3 0e:00:00:00:00:33"
        ]
    );
    let b = i.pods.iter().find(|p| p.ip == "10.244.1.3").unwrap();
    assert_eq!(b.problems, ["tc_from_pod: pinned by an earlier agent"]);
    assert_eq!(
        i.devices
            .iter()
            .map(|d| (d.name.as_str(), d.problems.len()))
            .collect::<Vec<_>>(),
        [("cni0", 0), ("flannel.1", 1)]
    );
    assert_eq!(i.pending.len(), diff(&w.want(), &w.have).len());
    assert!(i
        .pending
        .iter()
        .any(|p| p == "ensure VXLAN device flannel.1"));
}

/// `inspect` in a dual-stack DirectRouting cluster: each remote's IPv6
/// side is listed beside its IPv4 one, over `flannel-v6.1` or routed
/// directly, and a broken IPv6 neighbour, FDB entry, map entry or direct
/// route is named; `flannel-v6.1` is a device of its own.
#[test]
fn inspect_covers_the_ipv6_side() {
    use super::inspect::inspect;
    let mut w = dual_stack_world(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
        false,
    );
    let i = inspect(Default::default(), &w.want(), &w.have, BTreeMap::new());
    let listed = |i: &crate::api::Inspect| -> Vec<(String, bool, Vec<String>)> {
        i.remotes
            .iter()
            .map(|r| (r.subnet.clone(), r.direct, r.problems.clone()))
            .collect()
    };
    let ok = |s: &str, direct: bool| (s.to_string(), direct, Vec::<String>::new());
    assert_eq!(
        listed(&i),
        [
            ok("10.244.4.0/24", false),
            ok("fd00:10:244:3::/64", false),
            ok("10.244.2.0/24", true),
            ok("10.244.3.0/24", true),
            ok("fd00:10:244:2::/64", true),
            ok("fd00:10:244:4::/64", true),
        ]
    );
    assert_eq!(
        i.devices
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
        ["cni0", "flannel.1", "flannel-v6.1"]
    );
    let v6 = w.have.vtep6.as_mut().unwrap();
    v6.neighbours.clear();
    v6.fdb.clear();
    let maps = w.have.maps.as_mut().unwrap();
    maps.remotes6
        .remove(&"fd00:10:244:4::/64".parse::<Ipv6Net>().unwrap());
    maps.vteps6.remove(&aip6("fd00:31::3"));
    w.have
        .uplink_routes
        .as_mut()
        .unwrap()
        .retain(|(d, _)| *d != anet("fd00:10:244:2::/64"));
    w.have.links.get_mut("flannel-v6.1").unwrap().mtu = 1400;
    let i = inspect(Default::default(), &w.want(), &w.have, BTreeMap::new());
    let problems = |subnet: &str| remote_problems(&i, subnet);
    assert_eq!(
        problems("fd00:10:244:3::/64"),
        [
            "kernel: neighbour fd00:10:244:3:: is missing, the lease says 0e:00:00:00:00:63",
            "kernel: FDB sends 0e:00:00:00:00:63 to nowhere, the lease says fd00:31::3",
            "map: fd00:31::3 is not a known VTEP",
        ]
    );
    assert_eq!(
        problems("fd00:10:244:2::/64"),
        ["kernel: no route via fd00:30::2 on the uplink"]
    );
    assert_eq!(
        problems("fd00:10:244:4::/64"),
        ["map: entry is missing, the lease says fd00:30::4 direct"]
    );
    assert!(problems("10.244.4.0/24").is_empty());
    assert_eq!(
        i.devices
            .iter()
            .map(|d| (d.name.as_str(), d.problems.len()))
            .collect::<Vec<_>>(),
        [("cni0", 0), ("flannel.1", 0), ("flannel-v6.1", 1)]
    );
}

#[test]
fn every_operation_kind_is_listed() {
    let w = World::new();
    let mut ops: Vec<Op> = ROWS
        .iter()
        .flat_map(|(_, setup, _)| {
            let mut w = World::new();
            setup(&mut w);
            diff(&w.want(), &w.have)
        })
        .collect();
    ops.push(Op::Device(DeviceOp::Bridge(w.want().bridge)));
    for op in ops {
        assert!(Op::KINDS.contains(&op.kind()), "{op}: {}", op.kind());
    }
}

#[test]
fn guard_tables_follow_leases_pods_and_drift() {
    let guard_ops = |w: &World| -> Vec<super::desired::GuardSpec> {
        diff(&w.want(), &w.have)
            .into_iter()
            .filter_map(|o| match o {
                Op::Guard(g) => Some(g),
                _ => None,
            })
            .collect()
    };
    // Converged: nothing to write.
    let w = World::new();
    assert_eq!(guard_ops(&w), vec![]);
    // eBPF mode: every remote's public IP, no pod check (the programs do it).
    let mut w = World::new();
    w.add_lease(lease("10.244.4.0/24", "10.0.0.4", mac(0x44)));
    let g = guard_ops(&w);
    assert_eq!(g.len(), 1);
    assert_eq!(
        g[0].vteps,
        [ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.4")].into()
    );
    assert_eq!((g[0].pods.clone(), g[0].pods6.len()), (None, 0));
    assert_eq!(g[0].port, Some(w.want().vtep.unwrap().link.port));
    // Kernel mode: the live pods' ports and addresses; a pod whose
    // interface is gone is left out.
    // Dual-stack pods' IPv6 addresses beside them.
    let mut w = World::new();
    w.ebpf = None;
    w.have.maps = None;
    w.have.links.remove("vethfl-b");
    let six = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
    for (p, a) in w
        .pods
        .values_mut()
        .zip(["fd00:10:244:1::2", "fd00:10:244:1::3"])
    {
        p.ip6 = Some(six(a));
    }
    let g = guard_ops(&w);
    assert_eq!(g.len(), 1);
    assert_eq!(
        g[0].pods,
        Some([("vethfl-a".to_string(), ip("10.244.1.2"))].into())
    );
    assert_eq!(
        g[0].pods6,
        [("vethfl-a".to_string(), six("fd00:10:244:1::2"))].into()
    );
    // Flushed by hand, or unreadable: written again.
    for have in [
        GuardTables::Seen {
            ip: false,
            ip6: false,
            bridge: false,
            written: Some(World::new().want().guard),
        },
        GuardTables::Unknown,
    ] {
        let mut w = World::new();
        w.have.guard = have.clone();
        assert_eq!(guard_ops(&w), vec![w.want().guard], "{have:?}");
    }
}

/// What `inspect` found wrong with the remote lease for `subnet`.
fn remote_problems(i: &crate::api::Inspect, subnet: &str) -> Vec<String> {
    i.remotes
        .iter()
        .find(|r| r.subnet == subnet)
        .unwrap_or_else(|| panic!("no remote {subnet} in the inspection"))
        .problems
        .clone()
}

/// What the trie answers for `ip`: the longest prefix that holds it.
fn longest_match(remotes: &BTreeMap<Ipv4Net, RemoteNode>, ip: Ipv4Addr) -> Option<RemoteNode> {
    remotes
        .iter()
        .filter(|(n, _)| n.trunc().contains(&ip))
        .max_by_key(|(n, _)| n.prefix_len())
        .map(|(_, r)| *r)
}

/// A config placing /`subnet_len` leases of `network` in slots, as
/// `desired` writes it.
fn slot_config(network: &str, subnet_len: u8) -> Config {
    let cfg = NetConfig::parse(&format!(
        r#"{{"Network":"{network}","SubnetLen":{subnet_len},"Backend":{{"Type":"vxlan"}}}}"#
    ))
    .unwrap();
    super::desired::lease_layout(&cfg)
}

#[test]
fn lease_slots_hold_only_leases_the_trie_would_answer_alike() {
    let cfg = slot_config("10.244.0.0/16", 24);
    assert_eq!(cfg.lease_slots, 256);
    let node = |last: u8| RemoteNode {
        node_ip: ip_key(Ipv4Addr::new(10, 0, 0, last)),
        ..Default::default()
    };
    let remotes: BTreeMap<Ipv4Net, RemoteNode> = [
        ("10.244.2.0/24", node(2)),
        // Another length: the trie only.
        ("10.244.4.0/23", node(4)),
        ("10.244.8.128/25", node(8)),
        // Overlapping: a /24 holding a /26, a /22 holding a /24.
        ("10.244.9.0/24", node(9)),
        ("10.244.9.64/26", node(19)),
        ("10.244.12.0/22", node(12)),
        ("10.244.13.0/24", node(13)),
        // Outside the network, and a node IP of 0 (an empty slot).
        ("10.245.1.0/24", node(45)),
        ("10.244.20.0/24", RemoteNode::default()),
        ("10.244.255.0/24", node(255)),
    ]
    .into_iter()
    .map(|(n, r)| (net(n), r))
    .collect();
    let slots = super::desired::lease_slots(&cfg, &remotes);
    assert_eq!(
        slots,
        [(2, node(2)), (255, node(255))].into_iter().collect(),
    );
    // No slots in a network with more than the map holds (a /8 of /28s),
    // nor for a config without them.
    let huge = slot_config("10.0.0.0/8", 28);
    assert_eq!(huge.lease_slots, 0);
    assert!(super::desired::lease_slots(&huge, &remotes).is_empty());
    assert_eq!(slot_config("10.0.0.0/8", 24).lease_slots, 65_536);
    assert_eq!(slot_config("10.244.0.0/16", 30).lease_slots, 16_384);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

    /// For any set of leases (any lengths, overlapping or not, inside the
    /// network or not) and any address, the programs' lookup (the slot
    /// when filled, else the trie) answers what the trie alone would.
    #[test]
    fn slot_then_trie_is_the_trie(
        subnet_len in 18u8..=28,
        leases in proptest::collection::vec((0u32..1 << 14, 14u8..=30, 1u8..=255), 0..40),
        probes in proptest::collection::vec(0u32..1 << 14, 64),
    ) {
        let cfg = slot_config("10.244.0.0/16", subnet_len);
        // Addresses around 10.244.0.0/16 (and a little past it), 8 apart,
        // so that short prefixes meet; a quarter of the leases have the
        // network's SubnetLen, to fill slots.
        let addr = |x: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 243, 192, 0)) + x * 8);
        let remotes: BTreeMap<Ipv4Net, RemoteNode> = leases
            .iter()
            .map(|&(at, len, last)| {
                let len = if len >= 27 { subnet_len } else { len };
                let n = Ipv4Net::new(addr(at), len).unwrap().trunc();
                let r = RemoteNode { node_ip: ip_key(Ipv4Addr::new(10, 0, 0, last)), ..Default::default() };
                (n, r)
            })
            .collect();
        let slots = super::desired::lease_slots(&cfg, &remotes);
        for ip in probes.iter().map(|&p| addr(p)).chain(remotes.keys().map(|n| n.network())) {
            let by_slot = cfg
                .lease_slot(ip_key(ip))
                .and_then(|s| slots.get(&s).copied())
                .or_else(|| longest_match(&remotes, ip));
            proptest::prop_assert_eq!(by_slot, longest_match(&remotes, ip), "{}", ip);
        }
    }
}

//! The desired state: a pure function from this node, the network config,
//! every node's lease and the registered pods to what the kernel and the
//! BPF maps should hold. No I/O and no logging: what it decides can be
//! checked from a table of inputs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use flannel_common::{
    Config, RemoteNode, RemoteNode6, CONFIG_F_NETFILTER, CONFIG_F_READY, CONFIG_F_STRICT_SOURCE,
    CONFIG_F_TC_DECAP, REMOTE_F_DIRECT, VXLAN_ENCAP_LEN,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    api::EndpointRecord,
    config::{BackendType, NetConfig},
    datapath::ebpf::ip_key,
    mac::MacAddr,
    netlink::{Link, RemoteEntry, RemoteEntry6, VxlanSpec},
    subnet::{Lease, LeaseSet},
};

/// Facts about this node: fixed at start but for the uplink, which is
/// read again at every pass (it may flap or be replaced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub uplink: Link,
    /// The uplink's IPv4 addresses with their prefixes: the L2 network a
    /// remote must be on to be routed to directly.
    pub uplink_nets: Vec<Ipv4Net>,
    /// The uplink's global IPv6 addresses with their prefixes: the same
    /// for a remote's IPv6 (DirectRouting and host-gw over IPv6).
    pub uplink_nets6: Vec<Ipv6Net>,
    /// The public IP other nodes send VXLAN to.
    pub ip: Ipv4Addr,
    /// With IPv6: the public IPv6 other nodes send `flannel-v6.<VNI>`'s
    /// VXLAN to.
    pub ip6: Option<Ipv6Addr>,
    pub lease: Lease,
    pub vtep_mac: MacAddr,
    /// The VtepMAC of `flannel-v6.<VNI>`.
    pub vtep6_mac: MacAddr,
}

/// The extra headers of VXLAN over IPv6: outer IPv6 (40), UDP (8), VXLAN
/// (8), inner Ethernet (14).
pub const VXLAN6_ENCAP_LEN: u32 = 70;

impl Node {
    /// The pods' IPv6 gateway: the IPv6 lease's first address
    /// (`fd00:10:244:1::1/64`), on the bridge.
    pub fn gateway6(&self) -> Option<Ipv6Net> {
        let subnet = self.lease.ipv6_subnet?;
        Ipv6Net::new(
            Ipv6Addr::from(u128::from(subnet.network()) + 1),
            subnet.prefix_len(),
        )
        .ok()
    }

    /// The pods' gateway: the lease's first address (`10.244.1.1/24`), on
    /// the bridge; `None` in an IPv6-only cluster.
    pub fn gateway(&self) -> Option<Ipv4Net> {
        let subnet = self.lease.subnet;
        self.lease.has_ipv4().then(|| {
            Ipv4Net::new(
                Ipv4Addr::from(u32::from(subnet.network()) + 1),
                subnet.prefix_len(),
            )
            .expect("prefix length comes from a valid subnet")
        })
    }

    /// Pod MTU: `Backend.MTU`, or the uplink's less the VXLAN headers;
    /// with host-gw the uplink's (Flannel's host-gw ignores `MTU`).
    pub fn pod_mtu(&self, cfg: &NetConfig) -> u32 {
        match cfg.backend.kind {
            BackendType::HostGw => self.uplink.mtu,
            BackendType::Vxlan => cfg
                .backend
                .mtu
                .unwrap_or(self.uplink.mtu.saturating_sub(VXLAN_ENCAP_LEN)),
        }
    }

    /// Whether `ip` is on this node's L2 network: inside the prefix of one
    /// of the uplink's addresses, so that the kernel reaches it without a
    /// gateway (Flannel asks `ip route get` for a route without one).
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        self.uplink_nets.iter().any(|n| n.trunc().contains(&ip))
    }

    /// `on_link` for a remote's public IPv6.
    pub fn on_link6(&self, ip: Ipv6Addr) -> bool {
        self.uplink_nets6.iter().any(|n| n.trunc().contains(&ip))
    }
}

/// Everything the desired state is computed from.
pub struct Inputs<'a> {
    pub node: &'a Node,
    pub cfg: &'a NetConfig,
    /// The pod bridge's name (`cni0`).
    pub bridge: &'a str,
    pub leases: &'a LeaseSet,
    /// Registered pods, by `EndpointRecord::key`.
    pub pods: &'a BTreeMap<IpAddr, EndpointRecord>,
    /// Pod interfaces whose TC program is being attached right now.
    pub attaching: &'a BTreeSet<u32>,
    /// `Some` when the eBPF data path runs.
    pub ebpf: Option<EbpfMode>,
    /// `--ip-masq`.
    pub ip_masq: bool,
}

/// How the eBPF data path runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EbpfMode {
    /// No XDP on the uplink: its TC program decapsulates.
    pub tc_decap: bool,
    /// `--vxlan-source-check strict`.
    pub strict_source: bool,
    /// Pod traffic crosses the kernel's forward hook (`--netfilter-compat`).
    pub netfilter: bool,
}

/// The pod bridge as Flannel's CNI plugin leaves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeSpec {
    pub name: String,
    /// The IPv4 gateway address; `None` in an IPv6-only cluster.
    pub gateway: Option<Ipv4Net>,
    /// With IPv6: the IPv6 gateway address.
    pub gateway6: Option<Ipv6Net>,
    pub mtu: u32,
    /// Set by hand: a bridge otherwise takes its ports' lowest MAC, and
    /// the data path writes this one as the pods' gateway.
    pub mac: MacAddr,
}

/// `flannel.<VNI>` and its one address (`<lease network>/32`), or
/// `flannel-v6.<VNI>` and its (`<IPv6 lease network>/128`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VtepSpec {
    pub link: VxlanSpec,
    pub addr: IpNet,
}

/// A remote lease routed without encapsulation: `<subnet> via <node IP>
/// dev <uplink>` (Flannel's DirectRouting and host-gw), or its IPv6 side,
/// `<IPv6 subnet> via <node IPv6> dev <uplink>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectRoute {
    pub subnet: IpNet,
    pub via: IpAddr,
    pub uplink: u32,
}

/// Flannel's masquerade rules for this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasqSpec {
    /// The network and lease, when IPv4 is on (not in an IPv6-only
    /// cluster).
    pub v4: Option<(Ipv4Net, Ipv4Net)>,
    /// The IPv6 network and lease, when IPv6 is on: the same rules in
    /// `ip6 flannel-ipv6`.
    pub v6: Option<(Ipv6Net, Ipv6Net)>,
}

/// The nftables guards (`crate::guard`): VXLAN only from lease holders,
/// and on the kernel data path the pods' source check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSpec {
    /// The VXLAN port; `None` with host-gw (no VXLAN, no rule).
    pub port: Option<u16>,
    /// Every remote lease's public IP (VXLAN only).
    pub vteps: BTreeSet<Ipv4Addr>,
    /// Dual-stack: every remote IPv6 lease's public IPv6, for the same
    /// rule over IPv6 (`flannel-v6.<VNI>`'s VXLAN); `None` without IPv6.
    pub vteps6: Option<BTreeSet<Ipv6Addr>>,
    /// Kernel data path: each registered pod's host-side port and address.
    /// `None` on the eBPF path, whose programs check pods themselves.
    pub pods: Option<BTreeMap<String, Ipv4Addr>>,
    /// The same pods' IPv6 addresses (dual-stack), checked with them.
    pub pods6: BTreeMap<String, Ipv6Addr>,
}

/// What the eBPF maps should hold (pods aside: their entries need the
/// interface index, an observed fact, so the diff derives them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsSpec {
    pub config: Config,
    pub remotes: BTreeMap<Ipv4Net, RemoteNode>,
    /// The same leases' slots, where they have one (`lease_slots`).
    pub slots: BTreeMap<u32, RemoteNode>,
    /// Dual-stack: the remote IPv6 leases, as `flannel-v6.<VNI>` has them.
    pub remotes6: BTreeMap<Ipv6Net, RemoteNode6>,
    /// Node IPv6 addresses allowed to send VXLAN over IPv6: those of the
    /// remote IPv6 leases.
    pub vteps6: BTreeSet<Ipv6Addr>,
    /// Node IPs allowed to send VXLAN: every remote lease's public IP.
    pub vteps: BTreeSet<Ipv4Addr>,
}

/// A config holding only `cfg`'s lease-slot layout (see
/// `Config::lease_slot`): the network, its mask, the shift and the count
/// (none in an IPv6-only cluster, see `NetConfig::lease_slots`).
pub fn lease_layout(cfg: &NetConfig) -> Config {
    Config {
        network: ip_key(cfg.network.network()),
        network_mask: ip_key(cfg.network.netmask()),
        lease_shift: 32 - u32::from(cfg.subnet_len),
        lease_slots: cfg.lease_slots(),
        ..Default::default()
    }
}

/// The lease slots (`FLANNEL_LEASE_SLOTS`) for `remotes`: each lease of
/// exactly `SubnetLen` inside the network, in the slot `config` places it
/// in, unless another lease overlaps it (one inside it, or one holding
/// it). The programs take a filled slot's answer without asking the trie,
/// so a slot may only hold what the trie's longest match would give for
/// every address in it; the leases left out are found in the trie.
pub fn lease_slots(
    config: &Config,
    remotes: &BTreeMap<Ipv4Net, RemoteNode>,
) -> BTreeMap<u32, RemoteNode> {
    if config.lease_slots == 0 {
        return BTreeMap::new();
    }
    let subnet_len = 32 - config.lease_shift;
    // As the trie has them: the prefix's network address.
    let nets: BTreeSet<Ipv4Net> = remotes.keys().map(|n| n.trunc()).collect();
    let overlapped = |net: &Ipv4Net| {
        let inside = nets
            .range(*net..)
            .take_while(|n| net.contains(&n.network()))
            .any(|n| n != net);
        let holding = (0..net.prefix_len())
            .any(|p| Ipv4Net::new(net.network(), p).is_ok_and(|s| nets.contains(&s.trunc())));
        inside || holding
    };
    remotes
        .iter()
        .filter(|(net, node)| {
            u32::from(net.prefix_len()) == subnet_len
                && net.addr() == net.network()
                && node.node_ip != 0
                && !overlapped(net)
        })
        .filter_map(|(net, node)| Some((config.lease_slot(ip_key(net.network()))?, *node)))
        .collect()
}

/// A lease left out of the data path, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored {
    pub node: IpAddr,
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub bridge: BridgeSpec,
    /// `None` with host-gw, which has no VXLAN device.
    pub vtep: Option<VtepSpec>,
    /// Every usable remote lease (not ours) reached over VXLAN, by subnet.
    pub remotes: BTreeMap<Ipv4Net, RemoteEntry>,
    /// Every usable remote lease routed directly, by subnet (IPv4 and,
    /// with IPv6, each lease's IPv6 side that is routed directly).
    pub direct: BTreeMap<IpNet, DirectRoute>,
    /// With IPv6: `flannel-v6.<VNI>`, and every remote lease's IPv6 side
    /// on it, by IPv6 subnet.
    pub vtep6: Option<VtepSpec>,
    pub remotes6: BTreeMap<Ipv6Net, RemoteEntry6>,
    /// The cluster's `Network`: a route through the uplink (with a
    /// gateway) to a subnet inside it is a direct route of ours. `None` in
    /// an IPv6-only cluster.
    pub network: Option<Ipv4Net>,
    /// With IPv6: the `IPv6Network`, the same for IPv6 routes.
    pub network6: Option<Ipv6Net>,
    /// The uplink's interface index.
    pub uplink: u32,
    /// Leases (or a lease's IPv6 side) left out, by subnet.
    pub ignored: BTreeMap<IpNet, Ignored>,
    /// `Some` with `--ip-masq`.
    pub masq: Option<MasqSpec>,
    pub pods: BTreeMap<IpAddr, EndpointRecord>,
    pub attaching: BTreeSet<u32>,
    /// `Some` when the eBPF data path runs.
    pub maps: Option<MapsSpec>,
    pub guard: GuardSpec,
}

/// The state the node should be in.
pub fn desired(i: &Inputs<'_>) -> Desired {
    let node = i.node;
    let ipv4 = i.cfg.enable_ipv4;
    let gateway = node.gateway().filter(|_| ipv4);
    let gateway6 = node.gateway6().filter(|_| i.cfg.enable_ipv6);
    let mtu = node.pod_mtu(i.cfg);
    let bridge = BridgeSpec {
        name: i.bridge.to_string(),
        gateway,
        gateway6,
        mtu,
        mac: MacAddr::for_bridge_of(gateway.map(|g| g.addr()), gateway6.map(|g| g.addr())),
    };
    let vxlan = i.cfg.backend.kind == BackendType::Vxlan;
    // flannel.<VNI> carries IPv4 only: none in an IPv6-only cluster.
    let vtep = (vxlan && ipv4).then(|| VtepSpec {
        link: VxlanSpec {
            name: format!("flannel.{}", i.cfg.backend.vni),
            vni: i.cfg.backend.vni,
            local: IpAddr::V4(node.ip),
            uplink: node.uplink.index,
            port: i.cfg.backend.port,
            mtu,
            mac: node.vtep_mac,
        },
        addr: IpNet::V4(
            Ipv4Net::new(node.lease.subnet.network(), 32).expect("/32 is a valid prefix"),
        ),
    });
    // Flannel's IPv6 side, when the config, the lease and the node all
    // have IPv6: with VXLAN over the IPv6 node network.
    let v6 = match (i.cfg.enable_ipv6, node.ip6, node.lease.ipv6_subnet) {
        (true, Some(ip6), Some(lease6)) => Some((ip6, lease6)),
        _ => None,
    };
    let vtep6 = v6.filter(|_| vxlan).map(|(ip6, lease6)| VtepSpec {
        link: VxlanSpec {
            name: format!("flannel-v6.{}", i.cfg.backend.vni),
            vni: i.cfg.backend.vni,
            local: IpAddr::V6(ip6),
            uplink: node.uplink.index,
            port: i.cfg.backend.port,
            mtu: node.uplink.mtu.saturating_sub(VXLAN6_ENCAP_LEN),
            mac: node.vtep6_mac,
        },
        addr: IpNet::V6(Ipv6Net::new(lease6.network(), 128).expect("/128 is a valid prefix")),
    });
    let Remotes {
        vxlan: remotes,
        mut direct,
        mut ignored,
        with6,
    } = if ipv4 {
        remotes(node, i.cfg, i.leases)
    } else {
        remotes_ipv6_only(node, i.cfg, i.leases)
    };
    let Remotes6 {
        vxlan: remotes6,
        direct: direct6,
        ignored: ignored6,
    } = match v6 {
        Some(_) => remotes6(node, i.cfg, &with6, i.leases),
        None => Remotes6::default(),
    };
    direct.extend(direct6.iter().map(|d| (d.subnet, *d)));
    ignored.extend(ignored6);
    // The largest packet a pod may send to a VXLAN remote; a direct one
    // takes VXLAN_ENCAP_LEN more, the uplink's MTU.
    // Who may send us VXLAN: with VXLAN every lease holder, the direct ones
    // too (a node that does not see us as on-link encapsulates); with
    // host-gw nobody.
    let vteps: BTreeSet<Ipv4Addr> = if vxlan {
        remotes
            .values()
            .map(|r| r.public_ip)
            .chain(direct.values().filter_map(|d| match d.via {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            }))
            .collect()
    } else {
        BTreeSet::new()
    };
    let vteps6: BTreeSet<Ipv6Addr> = if vxlan {
        remotes6
            .values()
            .map(|r| r.public_ip)
            .chain(direct6.iter().filter_map(|d| match d.via {
                IpAddr::V6(ip) => Some(ip),
                IpAddr::V4(_) => None,
            }))
            .collect()
    } else {
        BTreeSet::new()
    };
    let inner_mtu = match i.cfg.backend.kind {
        BackendType::Vxlan => mtu,
        BackendType::HostGw => node.uplink.mtu.saturating_sub(VXLAN_ENCAP_LEN),
    };
    let mut maps = i.ebpf.map(|mode| MapsSpec {
        slots: BTreeMap::new(),
        config: Config {
            vni: i.cfg.backend.vni,
            // host-gw carries no VXLAN: port 0 (which no sender uses)
            // makes the uplink programs leave every UDP packet alone
            // (`pass_not_vxlan`) instead of judging another VXLAN user's.
            udp_port: if vxlan { i.cfg.backend.port } else { 0 },
            node_ip: ip_key(node.ip),
            uplink_ifindex: node.uplink.index,
            inner_mtu,
            flags: CONFIG_F_READY
                | if mode.tc_decap { CONFIG_F_TC_DECAP } else { 0 }
                | if mode.strict_source {
                    CONFIG_F_STRICT_SOURCE
                } else {
                    0
                }
                | if mode.netfilter {
                    CONFIG_F_NETFILTER
                } else {
                    0
                },
            vtep_mac: node.vtep_mac.0,
            uplink_mac: node.uplink.mac.unwrap_or_default().0,
            gateway_mac: bridge.mac.0,
            // With IPv6 on the programs carry it: encapsulated as
            // flannel-v6.<VNI> would, or routed directly.
            node_ip6: v6.map_or([0; 16], |(ip6, _)| ip6.octets()),
            vtep6_mac: vtep6.as_ref().map_or([0; 6], |_| node.vtep6_mac.0),
            ..lease_layout(i.cfg)
        },
        vteps6: vteps6.clone(),
        remotes6: remotes6
            .values()
            .map(|r| {
                (
                    r.subnet,
                    RemoteNode6 {
                        node_ip6: r.public_ip.octets(),
                        vtep_mac: r.vtep_mac.0,
                        flags: 0,
                        _pad: 0,
                    },
                )
            })
            .chain(direct6.iter().filter_map(|d| match (d.subnet, d.via) {
                (IpNet::V6(subnet), IpAddr::V6(via)) => Some((
                    subnet,
                    RemoteNode6 {
                        node_ip6: via.octets(),
                        vtep_mac: [0; 6],
                        flags: REMOTE_F_DIRECT,
                        _pad: 0,
                    },
                )),
                _ => None,
            }))
            .collect(),
        remotes: remotes
            .values()
            .map(|r| {
                (
                    r.subnet,
                    RemoteNode {
                        node_ip: ip_key(r.public_ip),
                        vtep_mac: r.vtep_mac.0,
                        flags: 0,
                        _pad: 0,
                    },
                )
            })
            .chain(direct.values().filter_map(|d| match (d.subnet, d.via) {
                (IpNet::V4(subnet), IpAddr::V4(via)) => Some((
                    subnet,
                    RemoteNode {
                        node_ip: ip_key(via),
                        vtep_mac: [0; 6],
                        flags: REMOTE_F_DIRECT,
                        _pad: 0,
                    },
                )),
                _ => None,
            }))
            .collect(),
        vteps: vteps.clone(),
    });
    if let Some(m) = &mut maps {
        m.slots = lease_slots(&m.config, &m.remotes);
    }
    let guard = GuardSpec {
        port: vxlan.then_some(i.cfg.backend.port),
        vteps,
        vteps6: vtep6.as_ref().map(|_| vteps6),
        pods: i.ebpf.is_none().then(|| {
            i.pods
                .values()
                .filter_map(|p| Some((p.host_ifname.clone(), p.ip?)))
                .collect()
        }),
        pods6: match i.ebpf {
            None => i
                .pods
                .values()
                .filter_map(|p| Some((p.host_ifname.clone(), p.ip6?)))
                .collect(),
            Some(_) => BTreeMap::new(),
        },
    };
    Desired {
        guard,
        bridge,
        vtep,
        remotes,
        direct,
        vtep6,
        remotes6,
        network: Some(i.cfg.network).filter(|_| ipv4),
        network6: i.cfg.ipv6_network.filter(|_| i.cfg.enable_ipv6),
        uplink: node.uplink.index,
        ignored,
        masq: i.ip_masq.then_some(MasqSpec {
            v4: Some((i.cfg.network, node.lease.subnet)).filter(|_| ipv4),
            v6: match (
                i.cfg.enable_ipv6,
                i.cfg.ipv6_network,
                node.lease.ipv6_subnet,
            ) {
                (true, Some(net), Some(lease)) => Some((net, lease)),
                _ => None,
            },
        }),
        pods: i.pods.clone(),
        attaching: i.attaching.clone(),
        maps,
    }
}

/// The remote leases, sorted by how they are reached.
#[derive(Default)]
struct Remotes {
    vxlan: BTreeMap<Ipv4Net, RemoteEntry>,
    direct: BTreeMap<IpNet, DirectRoute>,
    ignored: BTreeMap<IpNet, Ignored>,
    /// The leases whose IPv6 side is to be decided: those of our backend
    /// type with usable data (Flannel decides each family on its own, so
    /// a host-gw lease whose IPv4 is off the network still counts).
    with6: Vec<IpNet>,
}

/// The remote leases' IPv6 sides, sorted the same way.
#[derive(Default)]
struct Remotes6 {
    vxlan: BTreeMap<Ipv6Net, RemoteEntry6>,
    direct: Vec<DirectRoute>,
    ignored: Vec<(IpNet, Ignored)>,
}

/// Every other node's lease as data path state, as Flannel decides it:
/// a lease of another backend type is ignored; with VXLAN a remote on this
/// node's L2 network is routed directly when `DirectRouting` is on, and
/// encapsulated otherwise; with host-gw every remote is routed directly,
/// and one off this node's L2 network cannot be (Flannel's route add fails
/// with "network is unreachable"). Leases that cannot be used (bad
/// VtepMAC, overlapping ours, unreachable) are set aside with the reason.
fn remotes(node: &Node, cfg: &NetConfig, leases: &LeaseSet) -> Remotes {
    let own = node.lease.subnet;
    let kind = cfg.backend.kind;
    let mut out = Remotes::default();
    for l in leases.values() {
        if l.attrs.public_ip == node.ip || l.subnet == own {
            continue;
        }
        let ip = l.attrs.public_ip;
        if !l.has_ipv4() {
            let why = "no IPv4 subnet: an IPv6-only node in a cluster with EnableIPv4 (give every node the same net-conf.json; Flannel cannot read its lease either)".to_string();
            out.ignored.insert(
                l.id(),
                Ignored {
                    node: l.public_addr(),
                    why,
                },
            );
            continue;
        }
        let direct = DirectRoute {
            subnet: IpNet::V4(l.subnet),
            via: IpAddr::V4(ip),
            uplink: node.uplink.index,
        };
        let why = if own.contains(&l.subnet.network()) || l.subnet.contains(&own.network()) {
            format!("overlaps this node's lease {own}")
        } else if l.attrs.backend_type != kind.lease_name() {
            other_backend(l, kind)
        } else {
            match kind {
                BackendType::HostGw if node.on_link(ip) => {
                    out.direct.insert(direct.subnet, direct);
                    out.with6.push(l.id());
                    continue;
                }
                BackendType::HostGw => {
                    out.with6.push(l.id());
                    format!(
                    "node {ip} is not on this node's network ({}): host-gw routes only to nodes on one L2 network (Flannel's route add fails: network is unreachable)",
                    nets(&node.uplink_nets)
                )
                }
                BackendType::Vxlan => match l.attrs.vxlan_data() {
                    Ok(_) if cfg.backend.direct_routing && node.on_link(ip) => {
                        out.direct.insert(direct.subnet, direct);
                        out.with6.push(l.id());
                        continue;
                    }
                    Ok(data) => {
                        out.with6.push(l.id());
                        out.vxlan.insert(
                            l.subnet,
                            RemoteEntry {
                                subnet: l.subnet,
                                public_ip: ip,
                                vtep_mac: data.vtep_mac,
                            },
                        );
                        continue;
                    }
                    Err(why) => why,
                },
            }
        };
        out.ignored.insert(
            IpNet::V4(l.subnet),
            Ignored {
                node: IpAddr::V4(ip),
                why,
            },
        );
    }
    out
}

/// Why a lease of another backend type is set aside.
fn other_backend(l: &Lease, kind: BackendType) -> String {
    format!(
        "backend type {:?} is not {} (Flannel ignores it too)",
        l.attrs.backend_type,
        kind.lease_name()
    )
}

/// An IPv6-only cluster's remote leases: no IPv4 side to decide, so every
/// other node's lease of our backend type has its IPv6 side decided (by
/// `remotes6`); one of another type is set aside.
fn remotes_ipv6_only(node: &Node, cfg: &NetConfig, leases: &LeaseSet) -> Remotes {
    let kind = cfg.backend.kind;
    let mut out = Remotes::default();
    for l in leases.values() {
        if l.id() == node.lease.id() {
            continue;
        }
        if l.attrs.backend_type == kind.lease_name() {
            out.with6.push(l.id());
            continue;
        }
        let why = other_backend(l, kind);
        out.ignored.insert(
            l.id(),
            Ignored {
                node: l.public_addr(),
                why,
            },
        );
    }
    out
}

/// The IPv6 side of every remote lease in `with6` (by `Lease::id`)
/// that has one: an IPv6 subnet and a public IPv6. Each family is decided
/// on its own, as Flannel does: routed directly when DirectRouting is on
/// (or the backend is host-gw) and the node's IPv6 is on this node's IPv6
/// network, else over `flannel-v6.<VNI>` with the lease's
/// `backend-v6-data`. A host-gw remote off the network, or a VXLAN one
/// without a usable VtepMAC, is set aside with the reason; a remote
/// without an IPv6 side is reached over IPv4 only.
fn remotes6(node: &Node, cfg: &NetConfig, with6: &[IpNet], leases: &LeaseSet) -> Remotes6 {
    let own = node.lease.ipv6_subnet;
    let mut out = Remotes6::default();
    for l in with6.iter().filter_map(|id| leases.get(id)) {
        let (Some(subnet), Some(public_ip)) = (l.ipv6_subnet, l.attrs.public_ipv6) else {
            continue;
        };
        let overlaps =
            own.is_some_and(|o| o.contains(&subnet.network()) || subnet.contains(&o.network()));
        if overlaps || Some(public_ip) == node.ip6 {
            continue;
        }
        let on_link = node.on_link6(public_ip);
        let why = match cfg.backend.kind {
            BackendType::HostGw if !on_link => format!(
                "node {public_ip} is not on this node's IPv6 network ({}): host-gw routes only to nodes on one L2 network (Flannel's route add fails: network is unreachable)",
                nets6(&node.uplink_nets6)
            ),
            BackendType::Vxlan if !(cfg.backend.direct_routing && on_link) => {
                match l.attrs.vxlan_v6_data() {
                    Ok(data) => {
                        let entry = RemoteEntry6 {
                            subnet,
                            public_ip,
                            vtep_mac: data.vtep_mac,
                        };
                        out.vxlan.insert(subnet, entry);
                        continue;
                    }
                    Err(why) => format!("IPv6: {why}"),
                }
            }
            _ => {
                out.direct.push(DirectRoute {
                    subnet: IpNet::V6(subnet),
                    via: IpAddr::V6(public_ip),
                    uplink: node.uplink.index,
                });
                continue;
            }
        };
        let node = IpAddr::V6(public_ip);
        out.ignored.push((IpNet::V6(subnet), Ignored { node, why }));
    }
    out
}

fn nets6(nets: &[Ipv6Net]) -> String {
    if nets.is_empty() {
        return "no global IPv6 address on the uplink".into();
    }
    nets.iter()
        .map(|n| n.trunc().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn nets(nets: &[Ipv4Net]) -> String {
    if nets.is_empty() {
        return "no IPv4 address on the uplink".into();
    }
    nets.iter()
        .map(|n| n.trunc().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

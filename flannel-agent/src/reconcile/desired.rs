//! The desired state: a pure function from this node, the network config,
//! every node's lease and the registered pods to what the kernel and the
//! BPF maps should hold. No I/O and no logging: what it decides can be
//! checked from a table of inputs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use flannel_common::{
    Config, RemoteNode, CONFIG_F_NETFILTER, CONFIG_F_READY, CONFIG_F_STRICT_SOURCE,
    CONFIG_F_TC_DECAP, VXLAN_ENCAP_LEN,
};
use ipnet::Ipv4Net;

use crate::{
    api::EndpointRecord,
    config::NetConfig,
    datapath::ebpf::ip_key,
    mac::MacAddr,
    netlink::{Link, RemoteEntry, VxlanSpec},
    subnet::{Lease, LeaseSet},
};

/// Facts about this node: fixed at start but for the uplink, which is
/// read again at every pass (it may flap or be replaced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub uplink: Link,
    /// The public IP other nodes send VXLAN to.
    pub ip: Ipv4Addr,
    pub lease: Lease,
    pub vtep_mac: MacAddr,
}

impl Node {
    /// The pods' gateway: the lease's first address (`10.244.1.1/24`), on
    /// the bridge.
    pub fn gateway(&self) -> Ipv4Net {
        let subnet = self.lease.subnet;
        Ipv4Net::new(
            Ipv4Addr::from(u32::from(subnet.network()) + 1),
            subnet.prefix_len(),
        )
        .expect("prefix length comes from a valid subnet")
    }

    /// Pod MTU: `Backend.MTU`, or the uplink's less the VXLAN headers.
    pub fn pod_mtu(&self, cfg: &NetConfig) -> u32 {
        cfg.backend
            .mtu
            .unwrap_or(self.uplink.mtu.saturating_sub(VXLAN_ENCAP_LEN))
    }
}

/// Everything the desired state is computed from.
pub struct Inputs<'a> {
    pub node: &'a Node,
    pub cfg: &'a NetConfig,
    /// The pod bridge's name (`cni0`).
    pub bridge: &'a str,
    pub leases: &'a LeaseSet,
    /// Registered pods, by IP.
    pub pods: &'a BTreeMap<Ipv4Addr, EndpointRecord>,
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
    pub gateway: Ipv4Net,
    pub mtu: u32,
    /// Set by hand: a bridge otherwise takes its ports' lowest MAC, and
    /// the data path writes this one as the pods' gateway.
    pub mac: MacAddr,
}

/// `flannel.<VNI>` and its one address (`<lease network>/32`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VtepSpec {
    pub link: VxlanSpec,
    pub addr: Ipv4Net,
}

/// Flannel's masquerade rules for this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasqSpec {
    pub network: Ipv4Net,
    pub lease: Ipv4Net,
}

/// The nftables guards (`crate::guard`): VXLAN only from lease holders,
/// and on the kernel data path the pods' source check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSpec {
    pub port: u16,
    /// Every remote lease's public IP.
    pub vteps: BTreeSet<Ipv4Addr>,
    /// Kernel data path: each registered pod's host-side port and address.
    /// `None` on the eBPF path, whose programs check pods themselves.
    pub pods: Option<BTreeMap<String, Ipv4Addr>>,
}

/// What the eBPF maps should hold (pods aside: their entries need the
/// interface index, an observed fact, so the diff derives them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsSpec {
    pub config: Config,
    pub remotes: BTreeMap<Ipv4Net, RemoteNode>,
    /// Node IPs allowed to send VXLAN: every remote lease's public IP.
    pub vteps: BTreeSet<Ipv4Addr>,
}

/// A lease left out of the data path, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored {
    pub node: Ipv4Addr,
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub bridge: BridgeSpec,
    pub vtep: VtepSpec,
    /// Every usable remote lease (not ours), by subnet.
    pub remotes: BTreeMap<Ipv4Net, RemoteEntry>,
    pub ignored: BTreeMap<Ipv4Net, Ignored>,
    /// `Some` with `--ip-masq`.
    pub masq: Option<MasqSpec>,
    pub pods: BTreeMap<Ipv4Addr, EndpointRecord>,
    pub attaching: BTreeSet<u32>,
    /// `Some` when the eBPF data path runs.
    pub maps: Option<MapsSpec>,
    pub guard: GuardSpec,
}

/// The state the node should be in.
pub fn desired(i: &Inputs<'_>) -> Desired {
    let node = i.node;
    let gateway = node.gateway();
    let mtu = node.pod_mtu(i.cfg);
    let bridge = BridgeSpec {
        name: i.bridge.to_string(),
        gateway,
        mtu,
        mac: MacAddr::for_bridge(gateway.addr()),
    };
    let vtep = VtepSpec {
        link: VxlanSpec {
            name: format!("flannel.{}", i.cfg.backend.vni),
            vni: i.cfg.backend.vni,
            local: node.ip,
            uplink: node.uplink.index,
            port: i.cfg.backend.port,
            mtu,
            mac: node.vtep_mac,
        },
        addr: Ipv4Net::new(node.lease.subnet.network(), 32).expect("/32 is a valid prefix"),
    };
    let (remotes, ignored) = remotes(node, i.leases);
    let maps = i.ebpf.map(|mode| MapsSpec {
        config: Config {
            vni: i.cfg.backend.vni,
            udp_port: i.cfg.backend.port,
            node_ip: ip_key(node.ip),
            uplink_ifindex: node.uplink.index,
            inner_mtu: mtu,
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
            ..Default::default()
        },
        remotes: remotes
            .values()
            .map(|r| {
                (
                    r.subnet,
                    RemoteNode {
                        node_ip: ip_key(r.public_ip),
                        vtep_mac: r.vtep_mac.0,
                        _pad: [0; 2],
                    },
                )
            })
            .collect(),
        vteps: remotes.values().map(|r| r.public_ip).collect(),
    });
    let guard = GuardSpec {
        port: i.cfg.backend.port,
        vteps: remotes.values().map(|r| r.public_ip).collect(),
        pods: i.ebpf.is_none().then(|| {
            i.pods
                .values()
                .map(|p| (p.host_ifname.clone(), p.ip))
                .collect()
        }),
    };
    Desired {
        guard,
        bridge,
        vtep,
        remotes,
        ignored,
        masq: i.ip_masq.then_some(MasqSpec {
            network: i.cfg.network,
            lease: node.lease.subnet,
        }),
        pods: i.pods.clone(),
        attaching: i.attaching.clone(),
        maps,
    }
}

type Remotes = BTreeMap<Ipv4Net, RemoteEntry>;

/// Every other node's lease as data path state; leases that cannot be
/// used (wrong backend, bad VtepMAC, overlapping ours) are set aside with
/// the reason.
fn remotes(node: &Node, leases: &LeaseSet) -> (Remotes, BTreeMap<Ipv4Net, Ignored>) {
    let own = node.lease.subnet;
    let mut usable = BTreeMap::new();
    let mut ignored = BTreeMap::new();
    for l in leases.values() {
        if l.attrs.public_ip == node.ip || l.subnet == own {
            continue;
        }
        let entry = if own.contains(&l.subnet.network()) || l.subnet.contains(&own.network()) {
            Err(format!("overlaps this node's lease {own}"))
        } else {
            l.attrs.vxlan_data().map(|data| RemoteEntry {
                subnet: l.subnet,
                public_ip: l.attrs.public_ip,
                vtep_mac: data.vtep_mac,
            })
        };
        match entry {
            Ok(r) => {
                usable.insert(l.subnet, r);
            }
            Err(why) => {
                ignored.insert(
                    l.subnet,
                    Ignored {
                        node: l.attrs.public_ip,
                        why,
                    },
                );
            }
        }
    }
    (usable, ignored)
}

//! The kernel objects Flannel keeps, programmed through rtnetlink: the `cni0`
//! bridge, the `flannel.<VNI>` VXLAN device, and per remote lease the
//! neighbour, FDB entry and route. Operations "ensure" (create, or reuse when
//! compatible, or recreate when not) and use replace semantics, so running
//! them again repairs drift.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{
        InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    },
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    AddressFamily,
};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan,
    RouteMessageBuilder,
};

use crate::mac::MacAddr;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening the rtnetlink socket: {0}")]
    Connect(std::io::Error),
    #[error("{op} {target}: {source}")]
    Request {
        op: &'static str,
        target: String,
        source: rtnetlink::Error,
    },
    #[error("route to {dst} via {gw}: the gateway is of the other family")]
    MixedFamilies { dst: IpNet, gw: IpAddr },
    #[error("interface {0} not found")]
    NoSuchLink(String),
    #[error("no IPv4 default route to choose the uplink from (pass --iface)")]
    NoDefaultRoute,
    #[error("entering network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(e),
                ..
            } => Some(-e.raw_code()),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, NetlinkError>;

fn req(op: &'static str, target: impl ToString) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let target = target.to_string();
    move |source| NetlinkError::Request { op, target, source }
}

/// What the agent needs to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    pub up: bool,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
    pub vxlan: Vec<InfoVxlan>,
}

impl Link {
    /// A plain link that is up, MTU 1500, no MAC (tests).
    #[cfg(test)]
    pub fn plain(index: u32, name: &str) -> Self {
        Link {
            index,
            name: name.into(),
            mac: None,
            mtu: 1500,
            up: true,
            kind: None,
            controller: None,
            vxlan: Vec::new(),
        }
    }

    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            kind: None,
            controller: None,
            vxlan: Vec::new(),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(a);
                    link.mac = Some(MacAddr(m));
                }
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k.clone()),
                            LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = v.clone(),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// How Flannel configures its VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// The node's address: IPv4 for `flannel.<VNI>`, IPv6 for
    /// `flannel-v6.<VNI>` (VXLAN over the IPv6 node network).
    pub local: IpAddr,
    pub uplink: u32,
    pub port: u16,
    pub mtu: u32,
    pub mac: MacAddr,
}

impl VxlanSpec {
    /// Whether an existing device can be reused as is (MTU and MAC are set
    /// in place; VNI, port, local address and uplink need a new device).
    pub fn compatible(&self, link: &Link) -> bool {
        if link.kind != Some(InfoKind::Vxlan) {
            return false;
        }
        let has = |want: &InfoVxlan| link.vxlan.iter().any(|v| v == want);
        let local = match self.local {
            IpAddr::V4(a) => InfoVxlan::Local(a),
            IpAddr::V6(a) => InfoVxlan::Local6(a),
        };
        has(&InfoVxlan::Id(self.vni))
            && has(&InfoVxlan::Port(self.port))
            && has(&local)
            && has(&InfoVxlan::Link(self.uplink))
            && has(&InfoVxlan::Learning(false))
    }
}

/// A remote lease as programmed on `flannel.<VNI>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RemoteEntry {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
}

/// What a VXLAN device holds per remote, in either family: its subnet, the
/// gateway address (the subnet's network address) its neighbour entry and
/// route use, the VtepMAC and the node address the FDB sends to.
pub trait Remote: Copy + PartialEq + std::fmt::Debug {
    type Net: Copy + Ord + std::fmt::Debug + std::fmt::Display + Into<IpNet>;
    type Addr: Copy + Ord + std::fmt::Debug + std::fmt::Display + Into<IpAddr>;
    fn subnet(&self) -> Self::Net;
    fn gateway(&self) -> Self::Addr;
    fn vtep_mac(&self) -> MacAddr;
    fn public(&self) -> IpAddr;
    /// The subnet, as either family.
    fn ip_subnet(&self) -> IpNet;
}

impl Remote for RemoteEntry {
    type Net = Ipv4Net;
    type Addr = Ipv4Addr;
    fn subnet(&self) -> Ipv4Net {
        self.subnet
    }
    fn gateway(&self) -> Ipv4Addr {
        self.subnet.network()
    }
    fn vtep_mac(&self) -> MacAddr {
        self.vtep_mac
    }
    fn public(&self) -> IpAddr {
        IpAddr::V4(self.public_ip)
    }
    fn ip_subnet(&self) -> IpNet {
        IpNet::V4(self.subnet)
    }
}

impl Remote for RemoteEntry6 {
    type Net = Ipv6Net;
    type Addr = Ipv6Addr;
    fn subnet(&self) -> Ipv6Net {
        self.subnet
    }
    fn gateway(&self) -> Ipv6Addr {
        self.subnet.network()
    }
    fn vtep_mac(&self) -> MacAddr {
        self.vtep_mac
    }
    fn public(&self) -> IpAddr {
        IpAddr::V6(self.public_ip)
    }
    fn ip_subnet(&self) -> IpNet {
        IpNet::V6(self.subnet)
    }
}

/// A remote lease's IPv6 side as programmed on `flannel-v6.<VNI>`: its
/// IPv6 subnet, IPv6 public address and the VtepMAC of its v6 device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RemoteEntry6 {
    pub subnet: Ipv6Net,
    pub public_ip: Ipv6Addr,
    pub vtep_mac: MacAddr,
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Opens a netlink socket inside the network namespace `ns` (an open
    /// `/proc/<pid>/ns/net` or `/run/netns/<name>` file). The socket lives
    /// in that namespace for good; no thread of ours stays in it. Needs a
    /// tokio runtime.
    pub fn connect_in(ns: &std::fs::File, label: &str) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let rt = tokio::runtime::Handle::current();
        let fd = ns.as_raw_fd();
        let made = std::thread::scope(|s| {
            s.spawn(|| {
                let _guard = rt.enter();
                // SAFETY: setns on a namespace fd we hold open; it changes
                // only this short-lived thread.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(NetlinkError::Netns {
                        path: label.to_string(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                rtnetlink::new_connection().map_err(NetlinkError::Connect)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetlinkError::Connect(std::io::Error::other(
                    "netns thread panicked",
                )))
            })
        })?;
        let (conn, handle, _) = made;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(req("get link", name)(e)),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(req("get link", index)(e)),
        }
    }

    pub async fn require_link(&self, name: &str) -> Result<Link> {
        self.link_by_name(name)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_string()))
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let mut stream = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(req("list links", "*"))? {
            out.push(Link::from_message(&msg));
        }
        Ok(out)
    }

    /// The interface of the IPv4 default route, as Flannel picks its uplink.
    /// The interface of the IPv4 default route, or with `v6` of the IPv6
    /// one.
    pub async fn default_route_link(&self, v6: bool) -> Result<Link> {
        let filter = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        let mut stream = self.handle.route().get(filter).execute();
        while let Some(route) = stream
            .try_next()
            .await
            .map_err(req("list routes", "main"))?
        {
            if route.header.destination_prefix_length != 0 {
                continue;
            }
            if let Some(oif) = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            }) {
                if let Some(link) = self.link_by_index(oif).await? {
                    return Ok(link);
                }
            }
        }
        Err(NetlinkError::NoDefaultRoute)
    }

    pub async fn ipv4_addrs(&self, index: u32) -> Result<Vec<Ipv4Net>> {
        Ok(self
            .addr_messages(index)
            .await?
            .into_iter()
            .filter_map(|(net, _)| match net {
                IpNet::V4(n) => Some(n),
                IpNet::V6(_) => None,
            })
            .collect())
    }

    /// Global IPv6 addresses of `index` (link-local ones left out).
    pub async fn ipv6_addrs(&self, index: u32) -> Result<Vec<Ipv6Net>> {
        Ok(self
            .addr_messages(index)
            .await?
            .into_iter()
            .filter_map(|(net, _)| match net {
                IpNet::V6(n) => Some(n),
                IpNet::V4(_) => None,
            })
            .collect())
    }

    /// IPv4 and global IPv6 addresses of `index` with the messages that
    /// delete them.
    async fn addr_messages(&self, index: u32) -> Result<Vec<(IpNet, AddressMessage)>> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(req("list addresses", index))?
        {
            if msg.header.index != index {
                continue;
            }
            let plen = msg.header.prefix_len;
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(a)) => {
                    Ipv4Net::new(*a, plen).ok().map(IpNet::V4)
                }
                // IPv6 has no IFA_LOCAL on most links: the address is in
                // IFA_ADDRESS.
                AddressAttribute::Address(IpAddr::V6(a)) if !is_link_local6(a) => {
                    Ipv6Net::new(*a, plen).ok().map(IpNet::V6)
                }
                _ => None,
            });
            if let Some(net) = local {
                out.push((net, msg));
            }
        }
        Ok(out)
    }

    /// Makes `index` carry exactly `want` as its IPv4 address(es).
    pub async fn ensure_only_addrs(&self, index: u32, want: &[Ipv4Net]) -> Result<()> {
        let want: Vec<IpNet> = want.iter().copied().map(IpNet::V4).collect();
        self.ensure_only(index, &want, false).await
    }

    /// Makes `index` carry exactly `want` as its global IPv6 address(es).
    pub async fn ensure_only_addrs6(&self, index: u32, want: &[Ipv6Net]) -> Result<()> {
        let want: Vec<IpNet> = want.iter().copied().map(IpNet::V6).collect();
        self.ensure_only(index, &want, true).await
    }

    /// `want` on `index`, and no other address of the family (`v6`).
    async fn ensure_only(&self, index: u32, want: &[IpNet], v6: bool) -> Result<()> {
        let have: Vec<_> = self
            .addr_messages(index)
            .await?
            .into_iter()
            .filter(|(n, _)| matches!(n, IpNet::V6(_)) == v6)
            .collect();
        for net in want {
            if !have.iter().any(|(h, _)| h == net) {
                let mut add = self
                    .handle
                    .address()
                    .add(index, net.addr(), net.prefix_len())
                    .replace();
                if v6 {
                    // No duplicate address detection: the address is the
                    // node's own (a lease), usable at once.
                    add.message_mut().attributes.push(AddressAttribute::Flags(
                        netlink_packet_route::address::AddressFlags::Nodad,
                    ));
                }
                add.execute().await.map_err(req("add address", net))?;
            }
        }
        for (net, msg) in have.into_iter().filter(|(h, _)| !want.contains(h)) {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(req("delete address", net))?;
        }
        Ok(())
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(req("set up", index))
    }

    async fn set_mtu_mac(&self, index: u32, mtu: u32, mac: Option<MacAddr>) -> Result<()> {
        let mut b = LinkUnspec::new_with_index(index).mtu(mtu);
        if let Some(mac) = mac {
            b = b.address(mac.0.to_vec());
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(req("set mtu/mac", index))
    }

    pub async fn delete_link(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(req("delete link", index)(e)),
        }
    }

    /// A veth pair in one request: `host` here, on bridge `bridge`, up;
    /// `peer` created straight inside the namespace `peer_ns` (an open
    /// fd); both with `mtu`. Every rtnetlink write takes the kernel's
    /// RTNL lock, which many pods being wired at once queue on, so the
    /// host side is made, enslaved and brought up with a single one. (The
    /// peer cannot be brought up in the same request: the kernel opens it
    /// before the pair is linked and refuses with ENOTCONN.)
    pub async fn add_veth(
        &self,
        host: &str,
        peer: &str,
        peer_ns: std::os::fd::RawFd,
        mtu: u32,
        bridge: u32,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_ns)
            .build();
        let msg = LinkVeth::new(host, peer)
            .mtu(mtu)
            .controller(bridge)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req("create veth", host))
    }

    /// Turns on hairpin mode on bridge port `index`.
    pub async fn set_hairpin(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).hairpin(true).build())
            .execute()
            .await
            .map_err(req("set hairpin", index))
    }

    /// Adds (or replaces) an IPv4 address.
    pub async fn add_addr(&self, index: u32, net: Ipv4Net) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(net.addr()), net.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(req("add address", net))
    }

    /// Adds (or replaces) an IPv6 address, without duplicate address
    /// detection (a pod's address from IPAM, usable at once).
    pub async fn add_addr6(&self, index: u32, net: Ipv6Net) -> Result<()> {
        let mut add = self
            .handle
            .address()
            .add(index, IpAddr::V6(net.addr()), net.prefix_len())
            .replace();
        add.message_mut().attributes.push(AddressAttribute::Flags(
            netlink_packet_route::address::AddressFlags::Nodad,
        ));
        add.execute().await.map_err(req("add address", net))
    }

    /// Adds (or replaces) an IPv6 route through `index`, via `gw` when given.
    pub async fn add_route6(&self, index: u32, dst: Ipv6Net, gw: Option<Ipv6Addr>) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(index);
        if let Some(gw) = gw {
            b = b.gateway(gw);
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(req("add route", dst))
    }

    /// Adds (or replaces) a route of either family through `index` via
    /// `gw`, which must be of the same family.
    pub async fn add_route_via(&self, index: u32, dst: IpNet, gw: IpAddr) -> Result<()> {
        match (dst, gw) {
            (IpNet::V4(dst), IpAddr::V4(gw)) => self.add_route(index, dst, Some(gw)).await,
            (IpNet::V6(dst), IpAddr::V6(gw)) => self.add_route6(index, dst, Some(gw)).await,
            _ => Err(NetlinkError::MixedFamilies { dst, gw }),
        }
    }

    /// Adds (or replaces) a route through `index`, via `gw` when given.
    pub async fn add_route(&self, index: u32, dst: Ipv4Net, gw: Option<Ipv4Addr>) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(index);
        if let Some(gw) = gw {
            b = b.gateway(gw);
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(req("add route", dst))
    }

    /// IPv4 routes of the main table through `index`: (destination, gateway).
    pub async fn routes_via(&self, index: u32) -> Result<Vec<(Ipv4Net, Option<Ipv4Addr>)>> {
        Ok(self
            .routes_out(index)
            .await?
            .iter()
            .map(|route| {
                let dst = Self::route_dst(route).unwrap_or_else(|| {
                    Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid default route")
                });
                let gw = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                    _ => None,
                });
                (dst, gw)
            })
            .collect())
    }

    /// IPv6 routes of the main table through `index`: (destination,
    /// gateway), `::/0` for the default route.
    pub async fn routes6_via(&self, index: u32) -> Result<Vec<(Ipv6Net, Option<Ipv6Addr>)>> {
        let filter = RouteMessageBuilder::<Ipv6Addr>::new().build();
        let mut stream = self.handle.route().get(filter).execute();
        let mut out = Vec::new();
        while let Some(route) = stream.try_next().await.map_err(req("list routes", index))? {
            if !route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
            {
                continue;
            }
            let mut dst = Ipv6Addr::UNSPECIFIED;
            let mut gw = None;
            for a in &route.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some(*g),
                    _ => {}
                }
            }
            if let Ok(net) = Ipv6Net::new(dst, route.header.destination_prefix_length) {
                out.push((net, gw));
            }
        }
        Ok(out)
    }

    /// IPv4 routes of the main table whose output interface is `index`.
    async fn routes_out(&self, index: u32) -> Result<Vec<RouteMessage>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut stream = self.handle.route().get(filter).execute();
        let mut out = Vec::new();
        while let Some(route) = stream.try_next().await.map_err(req("list routes", index))? {
            if route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
            {
                out.push(route);
            }
        }
        Ok(out)
    }

    /// Deletes the link called `name`; absent is fine. Returns whether it
    /// was there.
    pub async fn delete_link_by_name(&self, name: &str) -> Result<bool> {
        match self.link_by_name(name).await? {
            Some(l) => {
                self.delete_link(l.index).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The pod bridge (`cni0`), with the gateway address(es) and pod MTU.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        gateway: Option<Ipv4Net>,
        gateway6: Option<Ipv6Net>,
        mtu: u32,
        mac: MacAddr,
    ) -> Result<Link> {
        let link = match self.link_by_name(name).await? {
            Some(l) if l.kind == Some(InfoKind::Bridge) => l,
            Some(l) => {
                self.delete_link(l.index).await?;
                self.create_bridge(name).await?
            }
            None => self.create_bridge(name).await?,
        };
        // A bridge without a set MAC takes its ports' lowest; pin it so the
        // gateway MAC the data path writes stays true.
        if link.mtu != mtu || link.mac != Some(mac) {
            self.set_mtu_mac(link.index, mtu, Some(mac)).await?;
        }
        self.ensure_only_addrs(link.index, gateway.as_slice())
            .await?;
        if let Some(g) = gateway6 {
            self.ensure_only_addrs6(link.index, &[g]).await?;
        }
        if !link.up {
            self.set_up(link.index).await?;
        }
        self.require_link(name).await
    }

    async fn create_bridge(&self, name: &str) -> Result<Link> {
        match self
            .handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(e) => return Err(req("create bridge", name)(e)),
        }
        self.require_link(name).await
    }

    /// `flannel.<VNI>` as Flannel creates it: nolearning, local = node IP,
    /// dev = uplink, MTU = uplink MTU − 50, MAC = VtepMAC, address
    /// `<subnet network>/32`; `flannel-v6.<VNI>` the same over IPv6 (MTU
    /// uplink − 70, address `<IPv6 subnet network>/128`).
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec, addr: IpNet) -> Result<Link> {
        let link = match self.link_by_name(&spec.name).await? {
            Some(l) if spec.compatible(&l) => l,
            Some(l) => {
                tracing::warn!(device = %spec.name, "existing VXLAN device is incompatible; recreating it");
                self.delete_link(l.index).await?;
                self.create_vxlan(spec).await?
            }
            None => self.create_vxlan(spec).await?,
        };
        if link.mtu != spec.mtu || link.mac != Some(spec.mac) {
            self.set_mtu_mac(link.index, spec.mtu, Some(spec.mac))
                .await?;
        }
        match addr {
            IpNet::V4(a) => self.ensure_only_addrs(link.index, &[a]).await?,
            IpNet::V6(a) => self.ensure_only_addrs6(link.index, &[a]).await?,
        }
        if !link.up {
            self.set_up(link.index).await?;
        }
        self.require_link(&spec.name).await
    }

    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<Link> {
        let b = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.uplink)
            .port(spec.port);
        let b = match spec.local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        let msg = b
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec())
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req("create vxlan", &spec.name))?;
        self.require_link(&spec.name).await
    }

    /// Neighbour, FDB and route for one remote lease, in Flannel's order:
    /// neighbour `<subnet network> lladdr <VtepMAC>`, FDB `<VtepMAC> dst
    /// <public IP>`, route `<subnet> via <subnet network> onlink` — on
    /// `flannel.<VNI>` for IPv4, on `flannel-v6.<VNI>` for a remote's IPv6
    /// side.
    pub async fn program_remote<R: Remote>(&self, vtep: u32, r: &R) -> Result<()> {
        let subnet = r.ip_subnet();
        let gw = subnet.network();
        let mac = r.vtep_mac();
        self.handle
            .neighbours()
            .add(vtep, gw)
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(req("replace neighbour", gw))?;
        self.handle
            .neighbours()
            .add_bridge(vtep, &mac.0)
            .destination(r.public())
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(req("replace fdb", mac))?;
        let route = match subnet {
            IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .gateway(n.network())
                .output_interface(vtep)
                .onlink()
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .gateway(n.network())
                .output_interface(vtep)
                .onlink()
                .build(),
        };
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(req("replace route", subnet))?;
        Ok(())
    }

    /// IPv6 routes of the main table through `vtep` with a destination:
    /// (destination, whether it is `onlink`).
    pub async fn vtep_routes6(&self, vtep: u32) -> Result<Vec<(Ipv6Net, bool)>> {
        let filter = RouteMessageBuilder::<Ipv6Addr>::new().build();
        let mut stream = self.handle.route().get(filter).execute();
        let mut out = Vec::new();
        while let Some(route) = stream.try_next().await.map_err(req("list routes", vtep))? {
            let oif = route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == vtep));
            let dst = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => {
                    Ipv6Net::new(*d, route.header.destination_prefix_length).ok()
                }
                _ => None,
            });
            if let (true, Some(dst), RouteScope::Universe) = (oif, dst, route.header.scope) {
                // The kernel's own routes on the device (its address, its
                // link-local prefix) are not remotes.
                if route.header.protocol != RouteProtocol::Kernel {
                    out.push((dst, Self::route_onlink(&route)));
                }
            }
        }
        Ok(out)
    }

    /// Permanent IPv6 neighbours on `vtep`: (IP, MAC).
    pub async fn vtep_neighbours6(&self, vtep: u32) -> Result<Vec<(Ipv6Addr, MacAddr)>> {
        self.neighbours(vtep, AddressFamily::Inet6).await.map(|v| {
            v.into_iter()
                .filter_map(|(ip, mac)| match ip {
                    Some(IpAddr::V6(ip)) => Some((ip, mac)),
                    _ => None,
                })
                .collect()
        })
    }

    /// Universe-scope routes through `vtep` (the remote leases' routes):
    /// (destination, whether it is `onlink`). Routes without a destination
    /// attribute (a default route) are left out.
    pub async fn vtep_routes(&self, vtep: u32) -> Result<Vec<(Ipv4Net, bool)>> {
        Ok(self
            .routes_out(vtep)
            .await?
            .iter()
            .filter(|r| r.header.scope == RouteScope::Universe)
            .filter_map(|r| Some((Self::route_dst(r)?, Self::route_onlink(r))))
            .collect())
    }

    fn route_dst(route: &RouteMessage) -> Option<Ipv4Net> {
        route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                Ipv4Net::new(*d, route.header.destination_prefix_length).ok()
            }
            _ => None,
        })
    }

    fn route_onlink(route: &RouteMessage) -> bool {
        route.header.flags.contains(RouteFlags::Onlink)
    }

    /// Deletes the main-table route to `dst` through `index`, whatever its
    /// gateway, protocol, scope or type (as `ip route del <dst> dev ..`);
    /// absent is fine.
    /// Either family.
    pub async fn delete_route(&self, index: u32, dst: impl Into<IpNet>) -> Result<()> {
        let dst: IpNet = dst.into();
        let route = match dst {
            IpNet::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .output_interface(index)
                .protocol(RouteProtocol::Unspec)
                .scope(RouteScope::NoWhere)
                .kind(RouteType::Unspec)
                .build(),
            IpNet::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .output_interface(index)
                .protocol(RouteProtocol::Unspec)
                .scope(RouteScope::NoWhere)
                .kind(RouteType::Unspec)
                .build(),
        };
        match self.handle.route().del(route).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(e) => Err(req("delete route", dst)(e)),
        }
    }

    /// Permanent IPv4 neighbours on `vtep`: (IP, MAC).
    pub async fn vtep_neighbours(&self, vtep: u32) -> Result<Vec<(Ipv4Addr, MacAddr)>> {
        self.neighbours(vtep, AddressFamily::Inet).await.map(|v| {
            v.into_iter()
                .filter_map(|(ip, mac)| match ip {
                    Some(IpAddr::V4(ip)) => Some((ip, mac)),
                    _ => None,
                })
                .collect()
        })
    }

    /// FDB entries on `vtep`: (MAC, destination IP).
    pub async fn vtep_fdb(&self, vtep: u32) -> Result<Vec<(MacAddr, Option<IpAddr>)>> {
        self.neighbours(vtep, AddressFamily::Bridge)
            .await
            .map(|v| v.into_iter().map(|(ip, mac)| (mac, ip)).collect())
    }

    async fn neighbours(
        &self,
        index: u32,
        family: AddressFamily,
    ) -> Result<Vec<(Option<IpAddr>, MacAddr)>> {
        let mut stream = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(req("list neighbours", index))?
        {
            if msg.header.ifindex != index || msg.header.state != NeighbourState::Permanent {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        ip = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        ip = Some(IpAddr::V6(*a))
                    }
                    // In an AF_BRIDGE (FDB) dump the VXLAN dst arrives as
                    // raw bytes: the parser keys the address type on the
                    // message family, not on the length.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                        ip = Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b))
                        if b.len() == 16 =>
                    {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        ip = Some(IpAddr::V6(Ipv6Addr::from(a)))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        let mut m = [0u8; 6];
                        m.copy_from_slice(l);
                        mac = Some(MacAddr(m));
                    }
                    _ => {}
                }
            }
            if let Some(mac) = mac {
                out.push((ip, mac));
            }
        }
        Ok(out)
    }

    /// Deletes the neighbour `ip` (either family) on `vtep`; absent is fine.
    pub async fn delete_neighbour(&self, vtep: u32, ip: impl Into<IpAddr>) -> Result<()> {
        let ip: IpAddr = ip.into();
        let mut msg = netlink_packet_route::neighbour::NeighbourMessage::default();
        msg.header.ifindex = vtep;
        let (family, dst) = match ip {
            IpAddr::V4(a) => (AddressFamily::Inet, NeighbourAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, NeighbourAddress::Inet6(a)),
        };
        msg.header.family = family;
        msg.attributes.push(NeighbourAttribute::Destination(dst));
        self.ignore_missing(
            self.handle.neighbours().del(msg).execute().await,
            "delete neighbour",
            ip,
        )
    }

    pub async fn delete_fdb(&self, vtep: u32, mac: MacAddr, dst: Option<IpAddr>) -> Result<()> {
        let mut msg = netlink_packet_route::neighbour::NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = vtep;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        match dst {
            Some(IpAddr::V4(d)) => msg
                .attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(d))),
            Some(IpAddr::V6(d)) => msg
                .attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(d))),
            None => {}
        }
        self.ignore_missing(
            self.handle.neighbours().del(msg).execute().await,
            "delete fdb",
            mac,
        )
    }

    fn ignore_missing(
        &self,
        res: std::result::Result<(), rtnetlink::Error>,
        op: &'static str,
        target: impl ToString,
    ) -> Result<()> {
        match res {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::ENOENT || e.raw_code() == -libc::ENODEV =>
            {
                Ok(())
            }
            Err(e) => Err(req(op, target)(e)),
        }
    }
}

/// fe80::/10.
fn is_link_local6(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

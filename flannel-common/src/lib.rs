//! Plain-data types shared by the eBPF programs and the agent.
//!
//! Every type here crosses the kernel boundary through a BPF map, so each is
//! `#[repr(C)]`, has explicit padding, no `bool`, no Rust enum and no
//! `Option`. IPv4 addresses are stored as the four address bytes in network
//! order (`u32::from_ne_bytes(addr.octets())`), so the kernel side compares
//! them with packet bytes without swapping.
#![no_std]

/// Map names, shared so that the agent and the programs cannot disagree.
pub mod maps {
    pub const CONFIG: &str = "FLANNEL_CONFIG";
    pub const REMOTE_SUBNETS: &str = "FLANNEL_REMOTES";
    /// LPM trie of remote IPv6 leases (dual-stack): IPv6 subnet →
    /// [`crate::RemoteNode6`].
    pub const REMOTE_SUBNETS6: &str = "FLANNEL_REMOTES6";
    /// Array of [`crate::RemoteNode`]s, one slot per lease-sized block of
    /// the IPv4 `Network` (see [`crate::Config::lease_slot`]): the remote
    /// leases of exactly `SubnetLen` that no other lease overlaps, found
    /// with one array index instead of the trie's walk. The trie holds
    /// every lease still; an empty slot sends the lookup there.
    pub const LEASE_SLOTS: &str = "FLANNEL_LEASE_SLOTS";
    pub const ENDPOINTS: &str = "FLANNEL_ENDPOINTS";
    /// Pod IPv6 (the 16 address bytes) → [`crate::Endpoint`], for pods
    /// with an IPv6 address (dual-stack).
    pub const ENDPOINTS6: &str = "FLANNEL_ENDPOINTS6";
    pub const VTEPS: &str = "FLANNEL_VTEPS";
    /// The remote nodes' IPv6 addresses allowed to send VXLAN over IPv6.
    pub const VTEPS6: &str = "FLANNEL_VTEPS6";
    pub const COUNTERS: &str = "FLANNEL_COUNTERS";
    /// Per-CPU array of [`crate::NextHop`]s, a direct-mapped cache by
    /// remote node IP (`next_hop_slot`): `tc_from_pod`'s copy of the FIB's
    /// answer for the outer packet. A cache, not state: never pinned, each
    /// load of the programs starts it empty.
    pub const NEXT_HOPS: &str = "FLANNEL_NEXT_HOPS";
    /// Ring buffer of [`crate::Event`]s for `flannel-agent monitor`.
    pub const EVENTS: &str = "FLANNEL_EVENTS";
    /// [`crate::MonitorConfig`] at index 0: which events to send, how many.
    pub const MONITOR: &str = "FLANNEL_MONITOR";
    /// Per-CPU [`crate::MonitorState`] at index 0: the rate limiter.
    pub const MONITOR_STATE: &str = "FLANNEL_MONITOR_STATE";
    /// Every map the agent pins, in the order it pins them.
    pub const ALL: [&str; 12] = [
        CONFIG,
        REMOTE_SUBNETS,
        REMOTE_SUBNETS6,
        LEASE_SLOTS,
        ENDPOINTS,
        ENDPOINTS6,
        VTEPS,
        VTEPS6,
        COUNTERS,
        EVENTS,
        MONITOR,
        MONITOR_STATE,
    ];
}

/// Program (function) names in the eBPF object.
pub mod programs {
    /// TC ingress on the host side of each pod veth: traffic leaving a pod.
    pub const TC_FROM_POD: &str = "tc_from_pod";
    /// XDP on the uplink: VXLAN decapsulation.
    pub const XDP_UPLINK: &str = "xdp_uplink";
    /// TC ingress on the uplink: hands decapsulated packets straight to the pod.
    pub const TC_UPLINK_INGRESS: &str = "tc_uplink_ingress";
}

/// Capacity of the maps; the agent refuses to program more than this.
pub const MAX_REMOTE_SUBNETS: u32 = 16_384;
pub const MAX_ENDPOINTS: u32 = 16_384;
pub const MAX_VTEPS: u32 = 16_384;
/// The most lease slots a network may have (`2^(SubnetLen − prefix)`);
/// the object declares this many and the agent creates the map with as
/// many as its network has. A larger network (a /8 of /26 leases, say)
/// gets no slots: every lookup walks the trie.
pub const MAX_LEASE_SLOTS: u32 = 65_536;

/// VXLAN overhead added in front of the inner Ethernet frame:
/// outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_ENCAP_LEN: u32 = 50;
/// The same over IPv6 (`flannel-v6.<VNI>`): outer IPv6 is 40 bytes.
pub const VXLAN6_ENCAP_LEN: u32 = 70;

/// `Config::flags`: the data path is configured and may act.
pub const CONFIG_F_READY: u32 = 1;
/// No XDP on the uplink: `tc_uplink_ingress` decapsulates VXLAN itself
/// (whole GSO packets, no copy).
pub const CONFIG_F_TC_DECAP: u32 = 2;
/// `--vxlan-source-check strict`: VXLAN's outer source MAC must be the
/// neighbour entry (`bpf_fib_lookup`) of its outer source IP.
pub const CONFIG_F_STRICT_SOURCE: u32 = 4;
/// Netfilter-compatible: pod traffic crosses the kernel's forward hook
/// (and `rp_filter`). `tc_from_pod` checks the source and leaves the rest
/// to the kernel; VXLAN is judged as ever (drops counted) and what would
/// be decapsulated is left to the kernel's VXLAN device, untouched.
pub const CONFIG_F_NETFILTER: u32 = 8;

/// What `xdp_uplink` writes in the metadata in front of a packet it
/// decapsulated, so that `tc_uplink_ingress` routes into a pod only what
/// came out of a VXLAN packet it accepted, never a plain packet sent to a
/// pod address from outside. Nothing on the wire can set metadata.
pub const XDP_META_DECAPPED: u32 = 0x464c_4e31;

/// Node-wide configuration, one entry at index 0 of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// VXLAN network identifier (24 bits used).
    pub vni: u32,
    /// VXLAN UDP destination port, host byte order.
    pub udp_port: u16,
    pub _pad0: u16,
    /// This node's IPv4 address on the uplink (network order bytes).
    pub node_ip: u32,
    /// Interface index of the uplink.
    pub uplink_ifindex: u32,
    /// Largest inner IPv4 packet (IP header included) that fits once
    /// encapsulated: uplink MTU − 50.
    pub inner_mtu: u32,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// MAC of this node's VTEP (`flannel.<VNI>`), the inner source MAC.
    pub vtep_mac: [u8; 6],
    /// MAC of the uplink, the outer source MAC and the inner destination
    /// MAC of decapsulated packets handed to the stack.
    pub uplink_mac: [u8; 6],
    /// MAC of the pod gateway (`cni0`), the source MAC of routed packets
    /// delivered to pods.
    pub gateway_mac: [u8; 6],
    pub _pad1: [u8; 2],
    /// Dual-stack: this node's IPv6 (`flannel-v6.<VNI>`'s local address),
    /// the outer source of IPv6 encapsulation; all zero without IPv6,
    /// and the programs then leave pods' IPv6 to the kernel.
    pub node_ip6: [u8; 16],
    /// MAC of `flannel-v6.<VNI>`, the inner source MAC over IPv6.
    pub vtep6_mac: [u8; 6],
    pub _pad2: [u8; 2],
    /// The IPv4 `Network` (network order bytes) and its mask: the range
    /// the lease slots cover.
    pub network: u32,
    pub network_mask: u32,
    /// `32 − SubnetLen`: an address's slot is its offset in the network
    /// shifted right by this much.
    pub lease_shift: u32,
    /// How many slots `FLANNEL_LEASE_SLOTS` has; 0: none (every lookup
    /// walks the trie).
    pub lease_slots: u32,
}

impl Config {
    /// The slot of `FLANNEL_LEASE_SLOTS` that covers `ip` (network order
    /// bytes, as the programs read it from a packet), or `None` outside
    /// the network or without slots. The programs and the agent both
    /// place leases with this, so they cannot disagree.
    #[inline(always)]
    pub fn lease_slot(&self, ip: u32) -> Option<u32> {
        if ip & self.network_mask != self.network {
            return None;
        }
        let offset = u32::from_be(ip).wrapping_sub(u32::from_be(self.network));
        let slot = offset.checked_shr(self.lease_shift)?;
        (slot < self.lease_slots).then_some(slot)
    }
}

/// Value of the remote-subnet LPM trie: where a remote lease lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteNode {
    /// The remote node's public IP (outer destination), network order bytes.
    pub node_ip: u32,
    /// The remote node's VtepMAC (inner destination MAC); zero for a
    /// direct route.
    pub vtep_mac: [u8; 6],
    /// `REMOTE_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
}

/// Value of the IPv6 remote-subnet LPM trie: where a remote IPv6 lease
/// lives (Flannel's `flannel-v6.<VNI>` entries for it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteNode6 {
    /// The remote node's public IPv6 (outer destination).
    pub node_ip6: [u8; 16],
    /// The remote node's IPv6 VtepMAC (`backend-v6-data`); zero for a
    /// direct remote.
    pub vtep_mac: [u8; 6],
    /// `REMOTE_F_DIRECT`: routed to `node_ip6` without encapsulation
    /// (DirectRouting or host-gw over IPv6).
    pub flags: u8,
    pub _pad: u8,
}

/// `RemoteNode::flags`: the remote is reached without encapsulation
/// (`DirectRouting` to a node on this node's L2 network, or the `host-gw`
/// backend): its pods' packets go to the node's IP as they are, routed
/// once (TTL − 1), like the kernel's route `<subnet> via <node IP>`.
pub const REMOTE_F_DIRECT: u8 = 1;

/// Bytes `tc_from_pod` puts in front of an inner IPv4 packet: outer
/// Ethernet, IPv4, UDP, VXLAN and inner Ethernet.
pub const VXLAN_HEADERS_LEN: usize = 64;

/// A slot of the next-hop cache: for one remote node, where the FIB sent
/// its outer packets, when it said so, and the headers to write, ready but
/// for the per-packet fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// `bpf_ktime_get_coarse_ns` of the FIB lookup; 0: an empty slot.
    pub stamp_ns: u64,
    /// The interface the outer packet leaves by.
    pub ifindex: u32,
    /// The remote node's IPv4 (network order bytes): whose slot this is.
    pub node_ip: u32,
    /// `Config::uplink_ifindex` when the FIB answered: a new uplink makes
    /// the entry stale at once.
    pub uplink_ifindex: u32,
    /// The outer IPv4 identification of the next packet to this node from
    /// this CPU: a counter started at a random value by the FIB lookup, as
    /// the kernel counts identifications per destination (no helper call
    /// per packet).
    pub ip_id: u32,
    /// The headers with the next hop's and the leaving interface's MACs as
    /// outer Ethernet, and zero in the outer IPv4 total length,
    /// identification, the UDP source port and length (the IPv4 checksum
    /// is that of this form).
    pub headers: [u8; VXLAN_HEADERS_LEN],
}

impl Default for NextHop {
    fn default() -> Self {
        Self {
            stamp_ns: 0,
            ifindex: 0,
            node_ip: 0,
            uplink_ifindex: 0,
            ip_id: 0,
            headers: [0; VXLAN_HEADERS_LEN],
        }
    }
}

// `tc_from_pod` checks a cached template with 16-bit loads: the headers
// start 8-aligned, and the MACs it compares them with are 2-aligned.
const _: () = assert!(core::mem::align_of::<NextHop>() == 8);
const _: () = assert!(core::mem::offset_of!(NextHop, headers) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(Config, vtep_mac) % 2 == 0);
const _: () = assert!(core::mem::offset_of!(RemoteNode, vtep_mac) % 2 == 0);

/// How long `tc_from_pod` trusts a cached FIB answer before asking again:
/// a changed route or neighbour MAC takes effect within this long (the
/// kernel's own path would switch at once). An unresolved neighbour is
/// never cached, and an entry whose headers no longer match the config or
/// the remote's VTEP MAC, or made for another uplink, is not used.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;
/// Slots of the next-hop cache on each CPU. Two remotes sharing a slot
/// only cost each other a FIB lookup per packet.
pub const NEXT_HOP_SLOTS: u32 = 1024;

/// The next-hop cache slot of a remote node (a multiplicative hash of its
/// address, so that nodes numbered in a row spread).
#[inline(always)]
pub const fn next_hop_slot(node_ip: u32) -> u32 {
    node_ip.wrapping_mul(0x9e37_79b1) >> (32 - NEXT_HOP_SLOTS.trailing_zeros())
}

/// Key of the remote-subnet LPM trie data part: IPv4 address bytes.
pub type SubnetKey = u32;

/// Value of the local endpoint maps, keyed by pod IPv4 (network order
/// bytes) and by pod IPv6 (the address bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Interface index of the host side of the pod's veth.
    pub host_ifindex: u32,
    /// MAC of the pod's interface.
    pub pod_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Value of the known-VTEP map, keyed by node IPv4 (network order bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vtep {
    /// Reserved for per-node flags; zero today.
    pub flags: u32,
}

/// Size of the event ring buffer (a power of two, whole pages).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// `MonitorConfig::mask` bits: which verdicts send an [`Event`].
pub const MONITOR_DROP: u32 = 1;
pub const MONITOR_PASS: u32 = 2;

/// What `flannel-agent monitor` asks the programs for. All zero (the
/// default): no events, and no cost beyond one map lookup on the verdicts
/// that could send one (never on a redirect).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorConfig {
    /// `MONITOR_*` bits.
    pub mask: u32,
    /// Events per second per CPU, on average.
    pub rate: u32,
    /// Events a CPU may send at once after a quiet spell.
    pub burst: u32,
    pub _pad: u32,
}

/// The per-CPU token bucket behind the rate limit, and what it did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorState {
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
    /// Tokens, in thousandths of an event.
    pub tokens_milli: u64,
    /// Events written to the ring buffer.
    pub sent: u64,
    /// Events the rate limit held back.
    pub suppressed: u64,
    /// Events lost because the ring buffer was full.
    pub lost: u64,
}

/// `Event::flags`: which fields hold something.
pub const EVENT_F_IPV4: u32 = 1;
/// `sport`/`dport` are the outer (or only) TCP or UDP ports.
pub const EVENT_F_L4: u32 = 2;
/// The packet is VXLAN on our port: `vni` and the `inner_*` fields are set.
pub const EVENT_F_VXLAN: u32 = 4;
/// `inner_sport`/`inner_dport` are the inner TCP or UDP ports.
pub const EVENT_F_INNER_L4: u32 = 8;

/// One packet a program passed to the kernel or dropped, as it saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    /// The verdict: an index into `counters::NAMES`.
    pub counter: u32,
    /// The interface the packet arrived on.
    pub ifindex: u32,
    pub len: u32,
    /// `EVENT_F_*` bits.
    pub flags: u32,
    /// Outer (or only) IPv4 addresses, network order bytes.
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub inner_proto: u8,
    pub eth_type: u16,
    pub inner_src: u32,
    pub inner_dst: u32,
    pub inner_sport: u16,
    pub inner_dport: u16,
    pub vni: u32,
    pub _pad: u64,
}

#[macro_use]
pub mod decap;
pub mod csum;

/// Builds the counter name table from the decap reason list.
macro_rules! counter_names {
    ($($id:ident = $n:literal, $name:literal, $action:ident;)*) => {
        /// Stable names, indexed by counter.
        pub const NAMES: [&str; COUNT as usize] = [
            "pod_local_redirect",
            "pod_encap_redirect",
            "pod_encap_neigh",
            "pod_pass_not_ipv4",
            "pod_pass_not_pod_dst",
            "pod_pass_ttl",
            "pod_pass_too_big",
            "pod_pass_no_config",
            "pod_pass_no_route",
            "pod_pass_malformed",
            "pod_drop_encap_failed",
            $(concat!("xdp_", $name),)*
            "xdp_pass_no_meta",
            $(concat!("uplink_", $name),)*
            "uplink_redirect",
            "uplink_pass",
            "uplink_pass_ttl",
            "uplink_drop_redirect_failed",
            "pod_drop_spoofed_src",
            "pod_drop_spoofed_arp",
            "pod_pass_netfilter",
            "uplink_pass_netfilter",
            "xdp_pass_netfilter",
            "pod_direct_redirect",
            "pod_direct_neigh",
            "pod_local_redirect6",
            "pod_drop_spoofed_src6",
            "pod_encap6_redirect",
            "pod_encap6_neigh",
            "pod_pass_gso6",
            "pod_pass_ext6",
            "pod_direct6_redirect",
            "pod_direct6_neigh",
        ];
    };
}

/// Per-CPU counters, one per verdict and per drop reason. The index is the
/// position in the counter array; `NAMES` gives each a stable name.
pub mod counters {
    use crate::decap::{self, Action};

    // tc_from_pod
    pub const POD_LOCAL_REDIRECT: u32 = 0;
    pub const POD_ENCAP_REDIRECT: u32 = 1;
    pub const POD_ENCAP_NEIGH: u32 = 2;
    pub const POD_PASS_NOT_IPV4: u32 = 3;
    pub const POD_PASS_NOT_POD_DST: u32 = 4;
    pub const POD_PASS_TTL: u32 = 5;
    pub const POD_PASS_TOO_BIG: u32 = 6;
    pub const POD_PASS_NO_CONFIG: u32 = 7;
    pub const POD_PASS_NO_ROUTE: u32 = 8;
    pub const POD_PASS_MALFORMED: u32 = 9;
    pub const POD_DROP_ENCAP_FAILED: u32 = 10;
    // xdp_uplink: `xdp_<reason>` for every decap reason, from here.
    pub const XDP_FIRST: u32 = 11;
    /// The driver keeps no metadata in front of the packet, so a
    /// decapsulated packet could not be told from one sent to a pod from
    /// outside: VXLAN is left to the kernel.
    pub const XDP_PASS_NO_META: u32 = XDP_FIRST + decap::COUNT;
    // tc_uplink_ingress: `uplink_<reason>` when it decapsulates
    // (`CONFIG_F_TC_DECAP`), from here.
    pub const UPLINK_FIRST: u32 = XDP_PASS_NO_META + 1;
    /// A packet `xdp_uplink` decapsulated, routed into its pod.
    pub const UPLINK_REDIRECT: u32 = UPLINK_FIRST + decap::COUNT;
    /// Not decapsulated here (XDP judged it, or it is not for a pod).
    pub const UPLINK_PASS: u32 = UPLINK_REDIRECT + 1;
    pub const UPLINK_PASS_TTL: u32 = UPLINK_REDIRECT + 2;
    pub const UPLINK_DROP_REDIRECT_FAILED: u32 = UPLINK_REDIRECT + 3;
    // tc_from_pod: a pod sending as another. IPv4 whose source is not the
    // pod's own address (as registered for this veth).
    pub const POD_DROP_SPOOFED_SRC: u32 = UPLINK_REDIRECT + 4;
    /// ARP whose sender address is not the pod's own (0.0.0.0, a probe,
    /// is let through).
    pub const POD_DROP_SPOOFED_ARP: u32 = UPLINK_REDIRECT + 5;

    /// `CONFIG_F_NETFILTER`: a pod's packet (its source checked) left to
    /// the kernel, so that its forward hook judges it.
    pub const POD_PASS_NETFILTER: u32 = UPLINK_REDIRECT + 6;
    /// `CONFIG_F_NETFILTER`: VXLAN that TC would decapsulate, left to the
    /// kernel's VXLAN device (which routes it to the pod through the
    /// forward hook and `rp_filter`).
    pub const UPLINK_PASS_NETFILTER: u32 = UPLINK_REDIRECT + 7;
    /// The same in XDP.
    pub const XDP_PASS_NETFILTER: u32 = UPLINK_REDIRECT + 8;

    /// A packet for a direct remote (`REMOTE_F_DIRECT`), routed to the
    /// node's IP and redirected to the uplink with the next hop's MAC.
    pub const POD_DIRECT_REDIRECT: u32 = UPLINK_REDIRECT + 9;
    /// The same with the next hop's MAC unresolved: handed to the kernel's
    /// neighbour layer (`bpf_redirect_neigh`), which resolves it.
    pub const POD_DIRECT_NEIGH: u32 = UPLINK_REDIRECT + 10;

    /// IPv6 from a pod to a pod on this node, redirected straight into it
    /// (the bridge's job, without the bridge).
    pub const POD_LOCAL_REDIRECT6: u32 = UPLINK_REDIRECT + 11;
    /// IPv6 from a pod whose source is not the pod's registered IPv6, a
    /// link-local address (neighbour discovery) or `::` (address
    /// duplicate detection).
    pub const POD_DROP_SPOOFED_SRC6: u32 = UPLINK_REDIRECT + 12;

    /// IPv6 from a pod to a remote IPv6 lease, encapsulated as
    /// `flannel-v6.<VNI>` would (VXLAN over IPv6) and redirected to the
    /// uplink.
    pub const POD_ENCAP6_REDIRECT: u32 = UPLINK_REDIRECT + 13;
    /// The same with the next hop's MAC unresolved (`bpf_redirect_neigh`).
    pub const POD_ENCAP6_NEIGH: u32 = UPLINK_REDIRECT + 14;
    /// IPv6 for a remote lease in a GSO packet: left to the kernel's
    /// `flannel-v6.<VNI>`, which segments it and gives each segment its
    /// outer UDP checksum (mandatory over IPv6; a program cannot make the
    /// kernel compute it per segment).
    pub const POD_PASS_GSO6: u32 = UPLINK_REDIRECT + 15;

    /// IPv6 for a remote lease whose next header is not TCP, UDP or
    /// ICMPv6 (an extension header, a fragment): left to the kernel's
    /// `flannel-v6.<VNI>` (the outer checksum is computed from the
    /// upper-layer header's, which must follow the IPv6 header).
    pub const POD_PASS_EXT6: u32 = UPLINK_REDIRECT + 16;

    /// IPv6 for a direct remote (`RemoteNode6::flags`), routed to the
    /// node's IPv6 (hop limit − 1) and redirected to the uplink with the
    /// next hop's MAC.
    pub const POD_DIRECT6_REDIRECT: u32 = UPLINK_REDIRECT + 17;
    /// The same with the next hop's MAC unresolved (`bpf_redirect_neigh`).
    pub const POD_DIRECT6_NEIGH: u32 = UPLINK_REDIRECT + 18;

    /// Size of the counter array.
    pub const COUNT: u32 = POD_DIRECT6_NEIGH + 1;

    /// The XDP counter of a decap reason.
    #[inline(always)]
    pub const fn xdp(reason: u32) -> u32 {
        XDP_FIRST + reason
    }

    /// The TC counter of a decap reason.
    #[inline(always)]
    pub const fn uplink(reason: u32) -> u32 {
        UPLINK_FIRST + reason
    }

    pub const XDP_DECAP: u32 = xdp(decap::DECAP);
    pub const XDP_DROP_UNKNOWN_VTEP: u32 = xdp(decap::DROP_UNKNOWN_VTEP);
    pub const UPLINK_DECAP: u32 = uplink(decap::DECAP);
    pub const XDP_DECAP6: u32 = xdp(decap::DECAP6);
    pub const UPLINK_DECAP6: u32 = uplink(decap::DECAP6);
    pub const UPLINK_DROP_ADJUST_FAILED: u32 = uplink(decap::DROP_ADJUST_FAILED);

    decap_reasons!(counter_names);

    /// Index of a counter by its name.
    pub fn index(name: &str) -> Option<u32> {
        NAMES.iter().position(|n| *n == name).map(|i| i as u32)
    }

    /// What kind of event counter `index` sends to the monitor: 0 (none:
    /// the packet was handled), `MONITOR_DROP` or `MONITOR_PASS`.
    #[inline(always)]
    pub const fn event_kind(index: u32) -> u32 {
        let action = if index >= XDP_FIRST && index < XDP_PASS_NO_META {
            decap::ACTIONS[(index - XDP_FIRST) as usize]
        } else if index >= UPLINK_FIRST && index < UPLINK_REDIRECT {
            decap::ACTIONS[(index - UPLINK_FIRST) as usize]
        } else {
            match index {
                POD_DROP_ENCAP_FAILED
                | POD_DROP_SPOOFED_SRC
                | POD_DROP_SPOOFED_ARP
                | POD_DROP_SPOOFED_SRC6
                | UPLINK_DROP_REDIRECT_FAILED => Action::Drop,
                POD_LOCAL_REDIRECT | POD_ENCAP_REDIRECT | POD_ENCAP_NEIGH | POD_DIRECT_REDIRECT
                | POD_DIRECT_NEIGH | POD_LOCAL_REDIRECT6 | POD_ENCAP6_REDIRECT
                | POD_ENCAP6_NEIGH | POD_DIRECT6_REDIRECT | POD_DIRECT6_NEIGH | UPLINK_REDIRECT => {
                    Action::Decap
                }
                _ => Action::Pass,
            }
        };
        match action {
            Action::Drop => super::MONITOR_DROP,
            Action::Pass => super::MONITOR_PASS,
            Action::Decap => 0,
        }
    }

    /// The program that counts counter `index`.
    pub fn program(index: u32) -> &'static str {
        match index {
            POD_LOCAL_REDIRECT..=POD_DROP_ENCAP_FAILED
            | POD_DROP_SPOOFED_SRC
            | POD_DROP_SPOOFED_ARP
            | POD_PASS_NETFILTER
            | POD_DIRECT_REDIRECT
            | POD_DIRECT_NEIGH
            | POD_LOCAL_REDIRECT6
            | POD_DROP_SPOOFED_SRC6
            | POD_ENCAP6_REDIRECT
            | POD_ENCAP6_NEIGH
            | POD_PASS_GSO6
            | POD_PASS_EXT6
            | POD_DIRECT6_REDIRECT
            | POD_DIRECT6_NEIGH => super::programs::TC_FROM_POD,
            XDP_FIRST..=XDP_PASS_NO_META | XDP_PASS_NETFILTER => super::programs::XDP_UPLINK,
            _ => super::programs::TC_UPLINK_INGRESS,
        }
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are repr(C), made only of integers and byte
    // arrays, with every padding byte spelled out as a field.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::RemoteNode {}
    unsafe impl aya::Pod for super::RemoteNode6 {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::Vtep {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::MonitorConfig {}
    unsafe impl aya::Pod for super::MonitorState {}
    unsafe impl aya::Pod for super::Event {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn lease_slots_are_the_offset_in_the_network_by_lease() {
        let ip = |a: [u8; 4]| u32::from_ne_bytes(a);
        // 10.244.0.0/16 of /24 leases.
        let mut c = Config {
            network: ip([10, 244, 0, 0]),
            network_mask: ip([255, 255, 0, 0]),
            lease_shift: 8,
            lease_slots: 256,
            ..Default::default()
        };
        assert_eq!(c.lease_slot(ip([10, 244, 0, 0])), Some(0));
        assert_eq!(c.lease_slot(ip([10, 244, 2, 11])), Some(2));
        assert_eq!(c.lease_slot(ip([10, 244, 255, 255])), Some(255));
        assert_eq!(c.lease_slot(ip([10, 245, 2, 11])), None);
        assert_eq!(c.lease_slot(ip([172, 30, 9, 50])), None);
        // Fewer slots than the network's leases (a map sized for less):
        // the rest are not slotted.
        c.lease_slots = 3;
        assert_eq!(c.lease_slot(ip([10, 244, 2, 11])), Some(2));
        assert_eq!(c.lease_slot(ip([10, 244, 3, 0])), None);
        // No slots; a shift past the word (never written) finds none.
        c.lease_slots = 0;
        assert_eq!(c.lease_slot(ip([10, 244, 0, 1])), None);
        c.lease_slots = 256;
        c.lease_shift = 32;
        assert_eq!(c.lease_slot(ip([10, 244, 0, 1])), None);
        // /30 leases: four addresses a slot.
        c.lease_shift = 2;
        c.lease_slots = 1 << 14;
        assert_eq!(c.lease_slot(ip([10, 244, 1, 7])), Some(65));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 84);
        assert_eq!(size_of::<RemoteNode>(), 12);
        assert_eq!(size_of::<RemoteNode6>(), 24);
        assert_eq!(size_of::<Endpoint>(), 12);
        assert_eq!(size_of::<Vtep>(), 4);
        assert_eq!(size_of::<NextHop>(), 88);
        assert_eq!(size_of::<MonitorConfig>(), 16);
        assert_eq!(size_of::<MonitorState>(), 40);
        assert_eq!(size_of::<Event>(), 64);
    }

    #[test]
    fn next_hop_slots_spread_a_subnet_of_nodes() {
        assert!(NEXT_HOP_SLOTS.is_power_of_two());
        // 200 nodes numbered in a row, as a node network assigns them.
        let slots: std::collections::BTreeSet<u32> = (1..=200u8)
            .map(|i| next_hop_slot(u32::from_ne_bytes([172, 30, 0, i])))
            .collect();
        assert!(slots.iter().all(|&s| s < NEXT_HOP_SLOTS));
        assert!(slots.len() >= 180, "{} distinct slots", slots.len());
    }

    #[test]
    fn counter_names_are_unique_and_indexed() {
        for (i, name) in counters::NAMES.iter().enumerate() {
            assert_eq!(counters::index(name), Some(i as u32), "{name}");
        }
        assert_eq!(counters::index("no_such_counter"), None);
    }

    #[test]
    fn every_counter_belongs_to_the_program_its_name_says() {
        for (i, name) in counters::NAMES.iter().enumerate() {
            let want = match name.split('_').next() {
                Some("pod") => programs::TC_FROM_POD,
                Some("xdp") => programs::XDP_UPLINK,
                _ => programs::TC_UPLINK_INGRESS,
            };
            assert_eq!(counters::program(i as u32), want, "{name}");
            let kind = if name.contains("_drop_") {
                MONITOR_DROP
            } else if name.contains("_pass") {
                MONITOR_PASS
            } else {
                0
            };
            assert_eq!(counters::event_kind(i as u32), kind, "{name}");
        }
    }
}

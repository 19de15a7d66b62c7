//! The flannel-ebpf data path: three small programs over five maps.
//!
//! * `tc_from_pod` (TC ingress on the host side of every pod veth): a packet
//!   for a pod on this node is redirected straight into that pod; a packet for
//!   a remote lease is VXLAN-encapsulated exactly as Flannel's `flannel.<VNI>`
//!   would and redirected to the uplink; anything else goes to the stack.
//! * `xdp_uplink` (XDP on the uplink): VXLAN for our port and VNI, from a known
//!   node, for a pod on this node, is stripped of its outer headers and passed
//!   up already decapsulated. Everything else passes untouched.
//! * `tc_uplink_ingress` (TC ingress on the uplink): a (decapsulated) packet
//!   for a local pod is routed straight into it, skipping routing and bridge.
//!
//! Each entry point is a thin wrapper over a function returning the verdict
//! and the counter that records it; every verdict is counted.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod monitor;
mod parse;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams, bpf_redir_neigh,
        xdp_action, BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_redirect,
        bpf_redirect_neigh, bpf_redirect_peer, bpf_xdp_adjust_head, bpf_xdp_adjust_meta,
    },
    macros::{classifier, map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use flannel_common::{
    counters::{self, *},
    csum,
    decap::{self, Action},
    next_hop_slot, Config, Endpoint, NextHop, RemoteNode, RemoteNode6, Vtep, CONFIG_F_NETFILTER,
    CONFIG_F_READY, CONFIG_F_TC_DECAP, MAX_ENDPOINTS, MAX_LEASE_SLOTS, MAX_REMOTE_SUBNETS,
    MAX_VTEPS, NEXT_HOP_SLOTS, NEXT_HOP_TTL_NS, REMOTE_F_DIRECT, VXLAN6_ENCAP_LEN, VXLAN_ENCAP_LEN,
    XDP_META_DECAPPED,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use parse::{Headers, ETH_P_ARP_BE, ETH_P_IPV6_BE, ETH_P_IP_BE, IPV6_HDR_LEN};

#[map(name = "FLANNEL_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "FLANNEL_REMOTES")]
static REMOTES: LpmTrie<u32, RemoteNode> =
    LpmTrie::with_max_entries(MAX_REMOTE_SUBNETS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Remote IPv6 leases (dual-stack): where `flannel-v6.<VNI>` would send
/// their packets.
#[map(name = "FLANNEL_REMOTES6")]
static REMOTES6: LpmTrie<[u8; 16], RemoteNode6> =
    LpmTrie::with_max_entries(MAX_REMOTE_SUBNETS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// The remote leases of the network's `SubnetLen` by slot (see
/// `Config::lease_slot`); an empty slot (node IP 0) sends the lookup to
/// `REMOTES`. The agent sizes it to the network when it creates it.
#[map(name = "FLANNEL_LEASE_SLOTS")]
static LEASE_SLOTS: Array<RemoteNode> = Array::with_max_entries(MAX_LEASE_SLOTS, 0);

/// The remote lease that holds `ip`: its slot when it has one (an array
/// index, no trie walk), else the trie's longest match. The agent fills a
/// slot only for a lease no other lease overlaps, so both give the same
/// answer.
#[inline(always)]
fn remote_of(cfg: &Config, ip: u32) -> Option<&'static RemoteNode> {
    slotted_remote(cfg, ip).or_else(|| REMOTES.get(Key::new(32, ip)))
}

/// The remote lease in `ip`'s slot, if the slot is filled.
#[inline(always)]
fn slotted_remote(cfg: &Config, ip: u32) -> Option<&'static RemoteNode> {
    let r = LEASE_SLOTS.get(cfg.lease_slot(ip)?)?;
    (r.node_ip != 0).then_some(r)
}

#[map(name = "FLANNEL_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// Pods' IPv6 addresses (dual-stack): the pod source check and the
/// same-node redirect for IPv6.
#[map(name = "FLANNEL_ENDPOINTS6")]
static ENDPOINTS6: HashMap<[u8; 16], Endpoint> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

#[map(name = "FLANNEL_VTEPS")]
static VTEPS: HashMap<u32, Vtep> = HashMap::with_max_entries(MAX_VTEPS, 0);

#[map(name = "FLANNEL_VTEPS6")]
static VTEPS6: HashMap<[u8; 16], Vtep> = HashMap::with_max_entries(MAX_VTEPS, 0);

/// `tc_from_pod`'s cache of the FIB's answers (see `cached_hop`). Per CPU:
/// a CPU reads and writes only its own slots, so an entry is never seen
/// half-written, and array lookups cost no helper call.
#[map(name = "FLANNEL_NEXT_HOPS")]
static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(NEXT_HOP_SLOTS, 0);

/// Where `encap6` builds its headers (more than the stack has room for
/// beside the rest of `tc_from_pod`). Per CPU: a program runs to its end
/// on one CPU, so nothing else touches the slot meanwhile. Not state:
/// never pinned.
#[map(name = "FLANNEL_SCRATCH6")]
static SCRATCH6: PerCpuArray<[u8; ENCAP6_HEADERS]> = PerCpuArray::with_max_entries(1, 0);

/// What `encap6` writes: outer Ethernet, IPv6, UDP, VXLAN, inner Ethernet
/// and the inner IPv6 header.
const ENCAP6_HEADERS: usize = EthHdr::LEN + IPV6_HDR_LEN + csum::VXLAN6_BLOCK;

#[map(name = "FLANNEL_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNT, 0);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMPV6: u8 = 58;
/// Outer UDP source ports come from the flow hash, spread over the kernel's
/// default ephemeral range like the Linux VXLAN driver does.
const SPORT_MIN: u32 = 32768;
const SPORT_MAX: u32 = 61000;

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & CONFIG_F_READY == 0 {
        return None;
    }
    Some(cfg)
}

/// The VXLAN port, for describing packets to the monitor (0 before the
/// agent has written the config). Read only once an event is to be sent,
/// never on a redirect.
#[inline(always)]
pub(crate) fn vxlan_port() -> u16 {
    CONFIG.get(0).map_or(0, |c| c.udp_port)
}

// ---------------------------------------------------------------------------
// tc_from_pod
// ---------------------------------------------------------------------------

/// IPv4 (and ARP) and IPv6 are judged by two functions of their own (BPF
/// subprograms): the stack holds only one of them at a time, and each
/// counts its own verdicts, so that every counter stays a constant the
/// verifier follows.
#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    match tc_from_pod4(skb) {
        IPV6_ELSEWHERE => tc_from_pod6(skb),
        action => action,
    }
}

/// What `from_pod` answers for IPv6 (no TC action has this value):
/// `tc_from_pod6` judges it.
const IPV6_ELSEWHERE: i32 = i32::MIN;

#[inline(never)]
fn tc_from_pod4(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let (action, counter) = from_pod(&ctx);
    if action == IPV6_ELSEWHERE {
        return action;
    }
    count(counter);
    monitor::report(&ctx, counter);
    action
}

#[inline(never)]
fn tc_from_pod6(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let (action, counter) = from_pod6(&ctx);
    count(counter);
    monitor::report(&ctx, counter);
    action
}

/// What `from_pod` reads in place: Ethernet, an IPv4 header without
/// options and the L4 ports after it.
const POD_HEAD: usize = EthHdr::LEN + Ipv4Hdr::LEN + 4;

/// The packet's linear bytes, its first `n` pulled into the linear part
/// first when they are not all there (a shorter packet: all of it). Reading
/// in place costs no helper call per header; a packet whose headers are not
/// linear (rare: the stack builds them linear) pays for one pull.
#[inline(always)]
fn linear(ctx: &TcContext, n: usize) -> parse::Packet {
    let pkt = parse::Packet::new(ctx.data(), ctx.data_end());
    let len = ctx.len() as usize;
    if pkt.len() >= n || pkt.len() >= len {
        return pkt;
    }
    // On failure the bytes stay out of reach and the packet counts as
    // malformed: passed to the kernel as it is.
    let _ = ctx.pull_data(core::cmp::min(n, len) as u32);
    parse::Packet::new(ctx.data(), ctx.data_end())
}

#[inline(always)]
fn from_pod(ctx: &TcContext) -> (i32, u32) {
    let pass = TC_ACT_OK;
    let Some(cfg) = config() else {
        return (pass, POD_PASS_NO_CONFIG);
    };
    let pkt = linear(ctx, POD_HEAD);
    let Some(eth_type) = pkt.read::<u16>(12) else {
        return (pass, POD_PASS_MALFORMED);
    };
    // The veth this program runs on belongs to one pod: what it sends must
    // carry that pod's address.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if eth_type == ETH_P_ARP_BE {
        return from_pod_arp(ctx, ifindex);
    }
    if eth_type == ETH_P_IPV6_BE {
        return (IPV6_ELSEWHERE, 0);
    }
    if eth_type != ETH_P_IP_BE {
        return (pass, POD_PASS_NOT_IPV4);
    }
    let Some(ip) = pkt.read_ipv4(EthHdr::LEN) else {
        return (pass, POD_PASS_MALFORMED);
    };
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return (pass, POD_PASS_MALFORMED);
    }
    if !pod_owns(u32::from_ne_bytes(ip.src_addr), ifindex) {
        return (TC_ACT_SHOT, POD_DROP_SPOOFED_SRC);
    }
    // The node has forward-path firewall rules: the kernel routes (or
    // bridges) the packet, through its forward hook and rp_filter.
    if cfg.flags & CONFIG_F_NETFILTER != 0 {
        return (pass, POD_PASS_NETFILTER);
    }
    let dst = u32::from_ne_bytes(ip.dst_addr);

    // A filled lease slot is another node's lease, which holds no pod of
    // this node (our own lease is never a remote one, nor is a lease that
    // overlaps it): no need to ask the endpoints first, as the kernel's
    // route to that lease would win over `cni0`'s too.
    let remote = match slotted_remote(cfg, dst) {
        Some(r) => r,
        None => {
            // Same node: what the bridge would do, without the bridge. No
            // routing happens on a bridged path, so the TTL is left alone.
            if let Some(ep) = unsafe { ENDPOINTS.get(dst) } {
                if ctx.store(0, &ep.pod_mac, 0).is_err() {
                    return (TC_ACT_SHOT, POD_DROP_ENCAP_FAILED);
                }
                let action = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) } as i32;
                return (action, POD_LOCAL_REDIRECT);
            }
            let Some(r) = REMOTES.get(Key::new(32, dst)) else {
                return (pass, POD_PASS_NOT_POD_DST);
            };
            r
        }
    };
    // Let the stack send "time exceeded" and "fragmentation needed".
    if ip.ttl <= 1 {
        return (pass, POD_PASS_TTL);
    }
    let direct = remote.flags & REMOTE_F_DIRECT != 0;
    // A direct packet is not encapsulated: it may be as large as the
    // uplink's MTU, which is `inner_mtu` plus the VXLAN headers.
    let limit = if direct {
        cfg.inner_mtu + VXLAN_ENCAP_LEN
    } else {
        cfg.inner_mtu
    };
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let too_big = if gso_size == 0 {
        u32::from(u16::from_be_bytes(ip.tot_len)) > limit
    } else {
        // IPv4 and TCP headers without options: the smallest a segment carries.
        gso_size + 40 > limit
    };
    if too_big {
        return (pass, POD_PASS_TOO_BIG);
    }
    if direct {
        return route_direct(ctx, cfg, &ip, remote);
    }
    // The kernel's flow hash when the packet has one (a TCP socket's), or
    // one of our own over the addresses and ports: far cheaper than
    // `bpf_get_hash_recalc`'s flow dissector, and as stable per flow.
    let hash = match unsafe { (*ctx.skb.skb).hash } {
        0 => {
            let l4 = EthHdr::LEN + usize::from(ip.vihl & 0x0f) * 4;
            let whole = u16::from_be_bytes(ip.frags) & 0x3fff == 0;
            let ports = if whole && (ip.proto == IPPROTO_TCP || ip.proto == parse::IPPROTO_UDP) {
                pkt.read::<u32>(l4).unwrap_or(0)
            } else {
                0
            };
            csum::flow_hash(u32::from_ne_bytes(ip.src_addr), dst, ports, ip.proto)
        }
        h => h,
    };
    encap(ctx, cfg, &ip, remote, hash)
}

/// IPv6 from a pod. Its source must be the pod's registered IPv6, a
/// link-local address (neighbour and router discovery, which never leave
/// the link) or `::` (duplicate address detection); anything else is
/// dropped. A packet for a pod on this node goes straight into it, as the
/// bridge would take it; the rest (neighbour discovery, other nodes' pods
/// through `flannel-v6.<VNI>`) is the kernel's.
#[inline(always)]
fn from_pod6(ctx: &TcContext) -> (i32, u32) {
    let pass = TC_ACT_OK;
    let Some(cfg) = config() else {
        return (pass, POD_PASS_NO_CONFIG);
    };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let pkt = linear(ctx, EthHdr::LEN + IPV6_HDR_LEN);
    let Some(head) = pkt.read::<[u8; 8]>(EthHdr::LEN) else {
        return (pass, POD_PASS_MALFORMED);
    };
    let (Some(src), Some(dst)) = (
        pkt.read::<[u8; 16]>(EthHdr::LEN + 8),
        pkt.read::<[u8; 16]>(EthHdr::LEN + 24),
    ) else {
        return (pass, POD_PASS_MALFORMED);
    };
    if head[0] >> 4 != 6 {
        return (pass, POD_PASS_MALFORMED);
    }
    let own = unsafe { ENDPOINTS6.get(src) }.is_some_and(|ep| ep.host_ifindex == ifindex);
    let link_local = src[0] == 0xfe && src[1] & 0xc0 == 0x80;
    if !own && !link_local && src != [0; 16] {
        return (TC_ACT_SHOT, POD_DROP_SPOOFED_SRC6);
    }
    if cfg.flags & CONFIG_F_NETFILTER != 0 {
        return (pass, POD_PASS_NETFILTER);
    }
    if let Some(ep) = unsafe { ENDPOINTS6.get(dst) } {
        if ctx.store(0, &ep.pod_mac, 0).is_err() {
            return (TC_ACT_SHOT, POD_DROP_ENCAP_FAILED);
        }
        let action = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) } as i32;
        return (action, POD_LOCAL_REDIRECT6);
    }
    if cfg.node_ip6 == [0; 16] {
        return (pass, POD_PASS_NOT_IPV4);
    }
    let Some(remote) = REMOTES6.get(Key::new(128, dst)) else {
        return (pass, POD_PASS_NOT_IPV4);
    };
    let Some(ip6) = pkt.get::<[u8; IPV6_HDR_LEN]>(EthHdr::LEN) else {
        return (pass, POD_PASS_MALFORMED);
    };
    // SAFETY: `get` checked that the header lies inside the packet; it
    // is read before anything changes the packet.
    let ip6 = unsafe { &*ip6 };
    // Let the stack send "time exceeded" and "packet too big".
    if ip6[7] <= 1 {
        return (pass, POD_PASS_TTL);
    }
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if remote.flags & REMOTE_F_DIRECT != 0 {
        // Unencapsulated: up to the uplink's MTU (`inner_mtu` plus the
        // IPv4 VXLAN headers), for a whole packet or a GSO segment (IPv6
        // and TCP headers: the smallest a segment carries).
        let len = u32::from(u16::from_be_bytes([ip6[4], ip6[5]])) + IPV6_HDR_LEN as u32;
        let seg = if gso_size == 0 { len } else { gso_size + 60 };
        if seg > cfg.inner_mtu + VXLAN_ENCAP_LEN {
            return (pass, POD_PASS_TOO_BIG);
        }
        return route_direct6(ctx, cfg, remote);
    }
    if gso_size != 0 {
        return (pass, POD_PASS_GSO6);
    }
    if !matches!(ip6[6], IPPROTO_TCP | parse::IPPROTO_UDP | IPPROTO_ICMPV6) {
        return (pass, POD_PASS_EXT6);
    }
    // flannel-v6.<VNI>'s MTU: 20 bytes less than IPv4's inner MTU.
    let len = u32::from(u16::from_be_bytes([ip6[4], ip6[5]])) + IPV6_HDR_LEN as u32;
    if len + (VXLAN6_ENCAP_LEN - VXLAN_ENCAP_LEN) > cfg.inner_mtu {
        return (pass, POD_PASS_TOO_BIG);
    }
    let hash = match unsafe { (*ctx.skb.skb).hash } {
        0 => {
            let word = |a: &[u8; 16]| {
                let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
                w(0) ^ w(4) ^ w(8) ^ w(12)
            };
            let ports = if ip6[6] == IPPROTO_ICMPV6 {
                0
            } else {
                pkt.read::<u32>(EthHdr::LEN + IPV6_HDR_LEN).unwrap_or(0)
            };
            csum::flow_hash(word(&src), word(&dst), ports, ip6[6])
        }
        h => h,
    };
    let Some(h) = SCRATCH6.get_ptr_mut(0) else {
        return (TC_ACT_SHOT, POD_DROP_ENCAP_FAILED);
    };
    // SAFETY: this CPU's slot, used by nobody else while we run.
    let h = unsafe { &mut *h };
    // The inner header goes to the end of the block now, while the
    // packet is as it was.
    h[ENCAP6_HEADERS - IPV6_HDR_LEN..].copy_from_slice(ip6);
    encap6(ctx, cfg, h, remote, len, hash)
}

/// VXLAN over IPv6 as `flannel-v6.<VNI>` sends it: outer IPv6 from this
/// node's IPv6 to the remote's (hop limit 64, a flow label from the flow
/// hash), UDP with its checksum (mandatory over IPv6; see
/// `csum::vxlan6_udp_check`), VXLAN, and the inner frame from our IPv6
/// VTEP MAC to the remote's, its hop limit one less. The next hop comes
/// from the FIB each time (the IPv4 cache is keyed by IPv4 nodes).
#[inline(always)]
fn encap6(
    ctx: &TcContext,
    cfg: &Config,
    h: &mut [u8; ENCAP6_HEADERS],
    remote: &RemoteNode6,
    len: u32,
    hash: u32,
) -> (i32, u32) {
    let drop = TC_ACT_SHOT;
    let Some(Hop6 {
        ifindex,
        dmac,
        smac,
        via,
    }) = hop6(ctx, cfg, &remote.node_ip6)
    else {
        return (TC_ACT_OK, POD_PASS_NO_ROUTE);
    };

    // Outer Ethernet, IPv6, UDP, VXLAN, inner Ethernet, then the inner
    // IPv6 header again with its hop limit one less.
    const O: usize = EthHdr::LEN;
    const UDP: usize = O + IPV6_HDR_LEN;
    h[0..6].copy_from_slice(&dmac);
    h[6..12].copy_from_slice(&smac);
    h[12..14].copy_from_slice(&[0x86, 0xdd]);
    let label = hash.rotate_left(16) & 0x000f_ffff;
    h[O..O + 4].copy_from_slice(&(0x6000_0000 | label).to_be_bytes());
    let udp_len = (len + VXLAN6_ENCAP_LEN - IPV6_HDR_LEN as u32) as u16;
    h[O + 4..O + 6].copy_from_slice(&udp_len.to_be_bytes());
    h[O + 6] = parse::IPPROTO_UDP;
    h[O + 7] = parse::OUTER_TTL;
    h[O + 8..O + 24].copy_from_slice(&cfg.node_ip6);
    h[O + 24..O + 40].copy_from_slice(&remote.node_ip6);
    h[UDP..UDP + 2].copy_from_slice(&outer_sport(hash).to_be_bytes());
    h[UDP + 2..UDP + 4].copy_from_slice(&cfg.udp_port.to_be_bytes());
    h[UDP + 4..UDP + 6].copy_from_slice(&udp_len.to_be_bytes());
    h[UDP + 6..UDP + 12].copy_from_slice(&[0, 0, 0x08, 0, 0, 0]);
    h[UDP + 12..UDP + 15].copy_from_slice(&cfg.vni.to_be_bytes()[1..4]);
    h[UDP + 15] = 0;
    const INNER: usize = UDP + 16;
    h[INNER..INNER + 6].copy_from_slice(&remote.vtep_mac);
    h[INNER + 6..INNER + 12].copy_from_slice(&cfg.vtep6_mac);
    h[INNER + 12..INNER + 14].copy_from_slice(&[0x86, 0xdd]);
    h[INNER + 14 + 7] -= 1;
    // SAFETY: `UDP + VXLAN6_BLOCK == N`: the block lies inside `h`.
    let block = unsafe { &*(h.as_ptr().add(UDP) as *const [u8; csum::VXLAN6_BLOCK]) };
    let check = csum::vxlan6_udp_check(&cfg.node_ip6, &remote.node_ip6, block);
    h[UDP + 6..UDP + 8].copy_from_slice(&check.to_be_bytes());

    if !encap_room(ctx, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, VXLAN6_ENCAP_LEN) {
        return (drop, POD_DROP_ENCAP_FAILED);
    }
    if ctx.store(0, h, 0).is_err() {
        return (drop, POD_DROP_ENCAP_FAILED);
    }
    redirect6(ifindex, via, (POD_ENCAP6_REDIRECT, POD_ENCAP6_NEIGH))
}

/// The FIB's answer for IPv6 from this node to `dst`, as the kernel
/// would route it.
struct Hop6 {
    ifindex: u32,
    /// The next hop's MAC (zero while unresolved) and ours.
    dmac: [u8; 6],
    smac: [u8; 6],
    /// The next hop's address while its MAC is unresolved: the kernel's
    /// neighbour layer is to resolve it.
    via: Option<[u32; 4]>,
}

/// Asks the FIB for `dst`; `None`: no route, or the node does not
/// forward, and the stack decides.
#[inline(always)]
fn hop6(ctx: &TcContext, cfg: &Config, dst: &[u8; 16]) -> Option<Hop6> {
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET6;
    fib.ifindex = cfg.uplink_ifindex;
    fib.__bindgen_anon_3.ipv6_src = words6(&cfg.node_ip6);
    fib.__bindgen_anon_4.ipv6_dst = words6(dst);
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    } as u32;
    let (dmac, smac, via) = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => (fib.dmac, fib.smac, None),
        BPF_FIB_LKUP_RET_NO_NEIGH => (
            [0; 6],
            cfg.uplink_mac,
            Some(unsafe { fib.__bindgen_anon_4.ipv6_dst }),
        ),
        _ => return None,
    };
    Some(Hop6 {
        ifindex: fib.ifindex,
        dmac,
        smac,
        via,
    })
}

/// Redirects to `ifindex`, or through its neighbour layer to `via`;
/// counted as `counters.0` or `counters.1`.
#[inline(always)]
fn redirect6(ifindex: u32, via: Option<[u32; 4]>, counters: (u32, u32)) -> (i32, u32) {
    match via {
        None => {
            let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
            (action, counters.0)
        }
        Some(via) => {
            let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            nh.nh_family = u32::from(AF_INET6);
            nh.__bindgen_anon_1.ipv6_nh = via;
            (neigh_redirect(ifindex, nh), counters.1)
        }
    }
}

/// What the kernel's route `<IPv6 subnet> via <node IPv6> dev <uplink>`
/// does (DirectRouting and host-gw over IPv6): the packet, hop limit − 1
/// (IPv6 has no header checksum), leaves by the uplink to the next hop's
/// MAC from the uplink's. Extension headers and GSO packets go as they
/// are: nothing past the fixed header changes.
#[inline(always)]
fn route_direct6(ctx: &TcContext, cfg: &Config, remote: &RemoteNode6) -> (i32, u32) {
    let Some(hop) = hop6(ctx, cfg, &remote.node_ip6) else {
        return (TC_ACT_OK, POD_PASS_NO_ROUTE);
    };
    let pkt = parse::Packet::new(ctx.data(), ctx.data_end());
    let Some(p) = pkt.get_mut::<[u8; EthHdr::LEN + IPV6_HDR_LEN]>(0) else {
        return (TC_ACT_OK, POD_PASS_MALFORMED);
    };
    // SAFETY: `get_mut` checked that the Ethernet and IPv6 headers are in
    // the packet.
    let p = unsafe { &mut *p };
    p[0..6].copy_from_slice(&hop.dmac);
    p[6..12].copy_from_slice(&hop.smac);
    p[EthHdr::LEN + 7] = p[EthHdr::LEN + 7].wrapping_sub(1);
    redirect6(
        hop.ifindex,
        hop.via,
        (POD_DIRECT6_REDIRECT, POD_DIRECT6_NEIGH),
    )
}

/// Whether `ip` is the address registered for the pod behind `ifindex`.
#[inline(always)]
fn pod_owns(ip: u32, ifindex: u32) -> bool {
    unsafe { ENDPOINTS.get(ip) }.is_some_and(|ep| ep.host_ifindex == ifindex)
}

/// ARP from a pod: IPv4-over-Ethernet requests and replies must name the
/// pod's own address as sender, or none (a probe, RFC 5227); the kernel
/// answers the rest.
#[inline(always)]
fn from_pod_arp(ctx: &TcContext, ifindex: u32) -> (i32, u32) {
    // htype 1, ptype 0x0800, hlen 6, plen 4, then the operation.
    const ETHER_IPV4: [u8; 6] = [0, 1, 8, 0, 6, 4];
    let Ok(head) = ctx.load::<[u8; 6]>(EthHdr::LEN) else {
        return (TC_ACT_OK, POD_PASS_MALFORMED);
    };
    if head != ETHER_IPV4 {
        return (TC_ACT_OK, POD_PASS_NOT_IPV4);
    }
    // Sender protocol address: after the operation and the sender's MAC.
    let Ok(spa) = ctx.load::<[u8; 4]>(EthHdr::LEN + 14) else {
        return (TC_ACT_OK, POD_PASS_MALFORMED);
    };
    let spa = u32::from_ne_bytes(spa);
    if spa != 0 && !pod_owns(spa, ifindex) {
        return (TC_ACT_SHOT, POD_DROP_SPOOFED_ARP);
    }
    (TC_ACT_OK, POD_PASS_NOT_IPV4)
}

/// The headers for a remote node from the next-hop cache, while the entry is
/// fresh and matches the config and the remote (see `NEXT_HOP_TTL_NS`).
/// The FIB lookup behind an entry is the largest single cost of the
/// encapsulation (about 75 ns of 290 through `BPF_PROG_TEST_RUN`), and its
/// answer for a node changes rarely.
#[inline(always)]
fn cached_hop(cfg: &Config, remote: &RemoteNode, now: u64) -> Option<(&'static NextHop, u16)> {
    let h = NEXT_HOPS.get_ptr_mut(next_hop_slot(remote.node_ip))?;
    // SAFETY: this CPU's slot; only this CPU touches it while we run.
    let h = unsafe { &mut *h };
    if h.node_ip != remote.node_ip
        || h.uplink_ifindex != cfg.uplink_ifindex
        || now.wrapping_sub(h.stamp_ns) >= NEXT_HOP_TTL_NS
        || !Headers::current(h, cfg, remote)
    {
        return None;
    }
    let id = h.ip_id;
    h.ip_id = id.wrapping_add(1);
    Some((h, id as u16))
}

/// Asks the FIB for the outer packet to `remote`, as the kernel would route
/// it: the hop, and the next-hop address when its MAC is not resolved yet
/// (the kernel is then to resolve it; such an answer is not cached). A
/// resolved hop is cached. `None`: no route, or the node does not forward,
/// and the stack decides.
#[inline(always)]
fn resolve_hop(
    ctx: &TcContext,
    cfg: &Config,
    remote: &RemoteNode,
    now: u64,
) -> Option<(NextHop, Option<u32>)> {
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.ifindex = cfg.uplink_ifindex;
    fib.__bindgen_anon_3.ipv4_src = cfg.node_ip;
    fib.__bindgen_anon_4.ipv4_dst = remote.node_ip;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    } as u32;
    let hop = |dmac: &[u8; 6], smac: &[u8; 6]| NextHop {
        stamp_ns: now,
        ifindex: fib.ifindex,
        node_ip: remote.node_ip,
        uplink_ifindex: cfg.uplink_ifindex,
        ip_id: unsafe { bpf_get_prandom_u32() },
        headers: Headers::vxlan(cfg, remote, dmac, smac),
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let h = hop(&fib.dmac, &fib.smac);
            if let Some(slot) = NEXT_HOPS.get_ptr_mut(next_hop_slot(remote.node_ip)) {
                // SAFETY: this CPU's slot; only this CPU touches it. This
                // packet takes the first identification.
                unsafe {
                    *slot = NextHop {
                        ip_id: h.ip_id.wrapping_add(1),
                        ..h
                    }
                };
            }
            Some((h, None))
        }
        // The FIB rewrites the destination to the next hop (a gateway, or
        // the node itself when on-link).
        BPF_FIB_LKUP_RET_NO_NEIGH => Some((
            hop(&[0; 6], &cfg.uplink_mac),
            Some(unsafe { fib.__bindgen_anon_4.ipv4_dst }),
        )),
        _ => None,
    }
}

/// The next hop for `remote`'s node: the cached FIB answer while it holds,
/// else a new lookup, kept in `fresh` (no copy of a cached entry); and the
/// outer IPv4 identification for this packet. `None`: no route, the stack
/// decides.
#[inline(always)]
fn next_hop<'a>(
    ctx: &TcContext,
    cfg: &Config,
    remote: &RemoteNode,
    fresh: &'a mut core::mem::MaybeUninit<NextHop>,
) -> Option<(&'a NextHop, Option<u32>, u16)> {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match cached_hop(cfg, remote, now) {
        Some((h, id)) => Some((h, None, id)),
        None => {
            let (h, via) = resolve_hop(ctx, cfg, remote, now)?;
            let h = fresh.write(h);
            Some((h, via, h.ip_id as u16))
        }
    }
}

/// What the kernel's route `<subnet> via <node IP> dev <uplink>` does
/// (Flannel's DirectRouting and host-gw): the packet, TTL − 1, leaves by
/// the uplink to the next hop's MAC (the node's own when on-link), from
/// the uplink's. The FIB answer comes from the next-hop cache, as for
/// encapsulation.
#[inline(always)]
fn route_direct(ctx: &TcContext, cfg: &Config, ip: &Ipv4Hdr, remote: &RemoteNode) -> (i32, u32) {
    let mut fresh = core::mem::MaybeUninit::uninit();
    let Some((hop, via, _)) = next_hop(ctx, cfg, remote, &mut fresh) else {
        return (TC_ACT_OK, POD_PASS_NO_ROUTE);
    };
    // The helper calls above left the packet as it was, but the verifier
    // wants its bounds proven again.
    let pkt = parse::Packet::new(ctx.data(), ctx.data_end());
    let Some(p) = pkt.get_mut::<[u8; EthHdr::LEN + Ipv4Hdr::LEN]>(0) else {
        return (TC_ACT_OK, POD_PASS_MALFORMED);
    };
    let p = p as *mut u8;
    let check = csum::ttl_decremented(
        u16::from_be_bytes(ip.check),
        u16::from_be_bytes([ip.ttl, ip.proto]),
    );
    // SAFETY: `get_mut` checked that all of these bytes are in the packet;
    // the template's first 12 bytes are the next hop's and our MACs.
    unsafe {
        core::ptr::copy_nonoverlapping(hop.headers.as_ptr(), p, 12);
        *p.add(EthHdr::LEN + 8) = ip.ttl - 1;
        parse::put16(p.add(EthHdr::LEN + 10), check);
    }
    match via {
        None => {
            let action = unsafe { bpf_redirect(hop.ifindex, 0) } as i32;
            (action, POD_DIRECT_REDIRECT)
        }
        Some(via) => (redirect_neigh(hop.ifindex, via), POD_DIRECT_NEIGH),
    }
}

/// Hands the packet to `ifindex`'s neighbour layer, which resolves `via`
/// and fills in the Ethernet header.
#[inline(always)]
fn redirect_neigh(ifindex: u32, via: u32) -> i32 {
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = u32::from(AF_INET);
    nh.__bindgen_anon_1.ipv4_nh = via;
    neigh_redirect(ifindex, nh)
}

/// `bpf_redirect_neigh` to `nh`, of either family.
#[inline(always)]
fn neigh_redirect(ifindex: u32, mut nh: bpf_redir_neigh) -> i32 {
    let action = unsafe {
        bpf_redirect_neigh(
            ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    action as i32
}

/// The outer UDP source port for a flow hash, spread over the kernel's
/// ephemeral range as its VXLAN driver does.
#[inline(always)]
fn outer_sport(hash: u32) -> u16 {
    ((((u64::from(hash)) * u64::from(SPORT_MAX - SPORT_MIN)) >> 32) as u32 + SPORT_MIN) as u16
}

/// Room for VXLAN headers of `len` bytes in front of the inner frame
/// (`l3`: the outer family's `BPF_F_ADJ_ROOM_ENCAP_L3_*`), GSO kept.
#[inline(always)]
fn encap_room(ctx: &TcContext, l3: u32, len: u32) -> bool {
    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO | l3 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
    ) | ((EthHdr::LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    ctx.adjust_room(len as i32, BPF_ADJ_ROOM_MAC, flags).is_ok()
}

/// Builds the outer headers Flannel's VXLAN device would build and hands the
/// packet to the uplink. Everything that can fail without touching the packet
/// is done first, so that such a failure still passes it to the stack intact.
#[inline(always)]
fn encap(
    ctx: &TcContext,
    cfg: &Config,
    ip: &Ipv4Hdr,
    remote: &RemoteNode,
    hash: u32,
) -> (i32, u32) {
    let pass = TC_ACT_OK;
    let drop = TC_ACT_SHOT;

    let mut fresh = core::mem::MaybeUninit::uninit();
    let Some((hop, via, ip_id)) = next_hop(ctx, cfg, remote, &mut fresh) else {
        return (pass, POD_PASS_NO_ROUTE);
    };
    let ifindex = hop.ifindex;
    let sport = outer_sport(hash);

    if !encap_room(ctx, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, VXLAN_ENCAP_LEN) {
        return (drop, POD_DROP_ENCAP_FAILED);
    }
    // One copy of the template, then the per-packet fields in place: the
    // new headers and the inner IPv4 header are in the linear part (the
    // room was made in front of headers that were).
    let outer_len = (ctx.len() - EthHdr::LEN as u32) as u16;
    let pkt = parse::Packet::new(ctx.data(), ctx.data_end());
    let Some(out) = pkt.get_mut::<[u8; parse::HEADERS_LEN + Ipv4Hdr::LEN]>(0) else {
        return (drop, POD_DROP_ENCAP_FAILED);
    };
    let out = out as *mut u8;
    // SAFETY: `get_mut` checked the bytes.
    unsafe { parse::copy_template(out, hop) };
    Headers::fill(out, outer_len, ip_id, sport);
    // The inner packet is routed once by this node, as through flannel.1.
    let check = csum::ttl_decremented(
        u16::from_be_bytes(ip.check),
        u16::from_be_bytes([ip.ttl, ip.proto]),
    );
    // SAFETY: `get_mut` checked that all of these bytes are in the packet.
    unsafe {
        let inner = out.add(parse::INNER_IP);
        *inner.add(8) = ip.ttl - 1;
        parse::put16(inner.add(10), check);
    }

    match via {
        None => {
            let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
            (action, POD_ENCAP_REDIRECT)
        }
        // Neighbour not resolved yet: let the kernel resolve it and fill L2.
        Some(via) => (redirect_neigh(ifindex, via), POD_ENCAP_NEIGH),
    }
}

// ---------------------------------------------------------------------------
// The uplink: what the maps know, for the shared decap decision
// ---------------------------------------------------------------------------

/// The maps and the neighbour table as `decap::Tables`. `ctx` is the
/// program's context, for `bpf_fib_lookup`.
struct Maps<'a> {
    ctx: *mut core::ffi::c_void,
    cfg: &'a Config,
    /// The local pod `local_pod` found, kept so that the redirect needs
    /// no second lookup.
    pod: core::cell::Cell<Option<&'static Endpoint>>,
}

impl decap::Tables for Maps<'_> {
    #[inline(always)]
    fn known_vtep(&self, ip: u32) -> bool {
        unsafe { VTEPS.get(ip) }.is_some()
    }

    #[inline(always)]
    fn lease_node(&self, ip: u32) -> Option<u32> {
        remote_of(self.cfg, ip).map(|r| r.node_ip)
    }

    #[inline(always)]
    fn local_pod(&self, ip: u32) -> bool {
        let ep = unsafe { ENDPOINTS.get(ip) };
        self.pod.set(ep);
        ep.is_some()
    }

    /// The MAC this node would send to `ip` with (the next hop's), as the
    /// FIB and neighbour table say; no resolved neighbour, no match.
    #[inline(always)]
    fn neighbour_is(&self, ip: u32, mac: &[u8; 6]) -> bool {
        let mut fib: FibParams = unsafe { core::mem::zeroed() };
        fib.family = AF_INET;
        fib.ifindex = self.cfg.uplink_ifindex;
        fib.__bindgen_anon_3.ipv4_src = self.cfg.node_ip;
        fib.__bindgen_anon_4.ipv4_dst = ip;
        let rc = unsafe {
            bpf_fib_lookup(
                self.ctx,
                &mut fib,
                core::mem::size_of::<FibParams>() as i32,
                BPF_FIB_LOOKUP_OUTPUT,
            )
        } as u32;
        rc == BPF_FIB_LKUP_RET_SUCCESS && fib.dmac == *mac
    }

    #[inline(always)]
    fn known_vtep6(&self, ip: &[u8; 16]) -> bool {
        unsafe { VTEPS6.get(ip) }.is_some()
    }

    #[inline(always)]
    fn lease_node6(&self, ip: &[u8; 16]) -> Option<[u8; 16]> {
        REMOTES6.get(Key::new(128, *ip)).map(|r| r.node_ip6)
    }

    #[inline(always)]
    fn local_pod6(&self, ip: &[u8; 16]) -> bool {
        let ep = unsafe { ENDPOINTS6.get(ip) };
        self.pod.set(ep);
        ep.is_some()
    }

    #[inline(always)]
    fn neighbour_is6(&self, ip: &[u8; 16], mac: &[u8; 6]) -> bool {
        let mut fib: FibParams = unsafe { core::mem::zeroed() };
        fib.family = AF_INET6;
        fib.ifindex = self.cfg.uplink_ifindex;
        fib.__bindgen_anon_3.ipv6_src = words6(&self.cfg.node_ip6);
        fib.__bindgen_anon_4.ipv6_dst = words6(ip);
        let rc = unsafe {
            bpf_fib_lookup(
                self.ctx,
                &mut fib,
                core::mem::size_of::<FibParams>() as i32,
                BPF_FIB_LOOKUP_OUTPUT,
            )
        } as u32;
        rc == BPF_FIB_LKUP_RET_SUCCESS && fib.dmac == *mac
    }
}

/// An IPv6 address as the FIB helper's four words.
#[inline(always)]
fn words6(a: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Packet bytes read in place, bounds-checked against `data_end`. In XDP
/// the packet is all there; in TC `len` is the whole packet's length,
/// which may reach past the linear bytes (see `uplink_ingress`).
struct Direct {
    pkt: parse::Packet,
    len: usize,
}

impl decap::Frame for Direct {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.pkt.read_words::<N>(offset)
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }
}

/// Socket-buffer bytes through `bpf_skb_load_bytes` (works on non-linear
/// packets too).
struct SkbBytes<'a>(&'a TcContext);

impl decap::Frame for SkbBytes<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }
}

// ---------------------------------------------------------------------------
// xdp_uplink
// ---------------------------------------------------------------------------

#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    let (action, counter) = uplink(&ctx);
    count(counter);
    monitor::report(&ctx, counter);
    action
}

#[inline(always)]
fn uplink(ctx: &XdpContext) -> (u32, u32) {
    let pass = xdp_action::XDP_PASS;
    let Some(cfg) = config() else {
        return (pass, counters::xdp(decap::PASS_NO_CONFIG));
    };
    let pkt = parse::Packet::new(ctx.data(), ctx.data_end());
    let frame = Direct {
        len: pkt.len(),
        pkt,
    };
    let maps = Maps {
        ctx: ctx.ctx as *mut _,
        cfg,
        pod: Default::default(),
    };
    let v = decap::classify(&frame, cfg, &maps, 0);
    match v.action {
        Action::Pass => return (pass, counters::xdp(v.reason)),
        Action::Drop => return (xdp_action::XDP_DROP, counters::xdp(v.reason)),
        Action::Decap => {}
    }
    // The node has forward-path rules: the kernel's VXLAN device takes
    // what passed every check, and routes it through the forward hook.
    if cfg.flags & CONFIG_F_NETFILTER != 0 {
        return (pass, XDP_PASS_NETFILTER);
    }
    // Mark it for tc_uplink_ingress, which routes into pods only what was
    // marked. Without metadata support the kernel decapsulates instead.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -4) } != 0 {
        return (pass, XDP_PASS_NO_META);
    }
    let (meta, data) = unsafe { ((*ctx.ctx).data_meta as usize, (*ctx.ctx).data as usize) };
    if meta + 4 > data {
        return (
            xdp_action::XDP_DROP,
            counters::xdp(decap::DROP_ADJUST_FAILED),
        );
    }
    unsafe { core::ptr::write_unaligned(meta as *mut u32, XDP_META_DECAPPED) };
    // Addressed to the uplink, the stack (or tc_uplink_ingress) takes it as
    // a packet to route to the pod.
    let pkt = parse::Packet::new(ctx.data(), ctx.data_end());
    let (inner_eth, strip, done) = if v.reason == decap::DECAP6 {
        (decap::INNER_ETH6, VXLAN6_ENCAP_LEN, XDP_DECAP6)
    } else {
        (parse::INNER_ETH, VXLAN_ENCAP_LEN, XDP_DECAP)
    };
    let Some(inner_eth) = pkt.get_mut::<EthHdr>(inner_eth) else {
        return (
            xdp_action::XDP_DROP,
            counters::xdp(decap::DROP_ADJUST_FAILED),
        );
    };
    unsafe { (*inner_eth).dst_addr = cfg.uplink_mac };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return (
            xdp_action::XDP_DROP,
            counters::xdp(decap::DROP_ADJUST_FAILED),
        );
    }
    (pass, done)
}

// ---------------------------------------------------------------------------
// tc_uplink_ingress
// ---------------------------------------------------------------------------

#[classifier]
pub fn tc_uplink_ingress(ctx: TcContext) -> i32 {
    let (action, counter) = uplink_ingress(&ctx);
    count(counter);
    monitor::report(&ctx, counter);
    action
}

/// Whether `xdp_uplink` decapsulated this packet (its metadata mark).
#[inline(always)]
fn xdp_decapsulated(ctx: &TcContext) -> bool {
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    if meta + 4 > data {
        return false;
    }
    unsafe { core::ptr::read_unaligned(meta as *const u32) == XDP_META_DECAPPED }
}

#[inline(always)]
fn uplink_ingress(ctx: &TcContext) -> (i32, u32) {
    let pass = TC_ACT_OK;
    let Some(cfg) = config() else {
        return (pass, counters::uplink(decap::PASS_NO_CONFIG));
    };
    let found = if cfg.flags & CONFIG_F_TC_DECAP != 0 {
        let maps = Maps {
            ctx: ctx.skb.skb as *mut _,
            cfg,
            pod: Default::default(),
        };
        let gso_size = unsafe { (*ctx.skb.skb).gso_size };
        // Every byte `classify` reads lies within the inner IP header.
        // When the linear part holds that much (as GRO and drivers leave
        // it), they are read in place; otherwise through the helper.
        let pkt = parse::Packet::new(ctx.data(), ctx.data_end());
        let needed = match pkt.read::<u16>(12) {
            Some(ETH_P_IPV6_BE) => decap::INNER_IP6 + IPV6_HDR_LEN,
            _ => parse::INNER_IP + Ipv4Hdr::LEN,
        };
        let v = if pkt.len() >= needed {
            let frame = Direct {
                pkt,
                len: ctx.len() as usize,
            };
            decap::classify(&frame, cfg, &maps, gso_size)
        } else {
            decap::classify(&SkbBytes(ctx), cfg, &maps, gso_size)
        };
        match v.action {
            Action::Pass => return (pass, counters::uplink(v.reason)),
            Action::Drop => return (TC_ACT_SHOT, counters::uplink(v.reason)),
            Action::Decap => {}
        }
        if cfg.flags & CONFIG_F_NETFILTER != 0 {
            return (pass, UPLINK_PASS_NETFILTER);
        }
        // The outer IP, UDP, VXLAN and inner Ethernet headers go, with
        // `bpf_skb_adjust_room`, which works on whole GSO packets (the
        // inner MSS is unchanged, hence FIXED_GSO).
        let shrink = if v.reason == decap::DECAP6 {
            VXLAN6_ENCAP_LEN as i32
        } else {
            (parse::INNER_IP - EthHdr::LEN) as i32
        };
        if ctx
            .adjust_room(
                -shrink,
                BPF_ADJ_ROOM_MAC,
                u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
            )
            .is_err()
        {
            return (TC_ACT_SHOT, UPLINK_DROP_ADJUST_FAILED);
        }
        // `classify` found the pod (its `local_pod`).
        Some(maps.pod.get())
    } else if xdp_decapsulated(ctx) {
        None
    } else {
        // XDP judged it already, or it is not for us: a plain packet to a
        // pod address from outside is the kernel's to route (and filter).
        return (pass, UPLINK_PASS);
    };
    // What is left is an IPv6 packet when it came over flannel-v6.
    if parse::Packet::new(ctx.data(), ctx.data_end()).read::<u16>(12) == Some(ETH_P_IPV6_BE) {
        return deliver6(ctx, cfg, found);
    }
    // The inner (now only) IPv4 header was linear or was read through the
    // helper above; pulling it in makes it writable in place either way.
    let pkt = linear(ctx, EthHdr::LEN + Ipv4Hdr::LEN);
    let Some(p) = pkt.get_mut::<[u8; EthHdr::LEN + Ipv4Hdr::LEN]>(0) else {
        return (TC_ACT_SHOT, UPLINK_DROP_REDIRECT_FAILED);
    };
    let p = p as *mut u8;
    let Some(ip) = pkt.read_ipv4(EthHdr::LEN) else {
        return (TC_ACT_SHOT, UPLINK_DROP_REDIRECT_FAILED);
    };
    let decapped = found.is_some();
    let ep = match found {
        Some(ep) => ep,
        None => unsafe { ENDPOINTS.get(u32::from_ne_bytes(ip.dst_addr)) },
    };
    let Some(ep) = ep else {
        // The pod went away in between: the kernel has the packet.
        return (pass, UPLINK_PASS);
    };
    if ip.ttl <= 1 {
        return (pass, UPLINK_PASS_TTL);
    }
    // Routed by this node into the pod: TTL − 1, MACs of the cni0 hop.
    let check = csum::ttl_decremented(
        u16::from_be_bytes(ip.check),
        u16::from_be_bytes([ip.ttl, ip.proto]),
    );
    // SAFETY: as above.
    unsafe {
        core::ptr::write_unaligned(p as *mut [u8; 6], ep.pod_mac);
        core::ptr::write_unaligned(p.add(6) as *mut [u8; 6], cfg.gateway_mac);
        *p.add(EthHdr::LEN + 8) = ip.ttl - 1;
        parse::put16(p.add(EthHdr::LEN + 10), check);
    }
    let action = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) } as i32;
    if action == TC_ACT_SHOT {
        return (action, UPLINK_DROP_REDIRECT_FAILED);
    }
    (
        action,
        if decapped {
            UPLINK_DECAP
        } else {
            UPLINK_REDIRECT
        },
    )
}

/// `uplink_ingress`'s delivery of an IPv6 packet (decapsulated here, or
/// by `xdp_uplink` when `found` is `None`) to its pod: routed by this
/// node, hop limit − 1, the MACs of the `cni0` hop.
#[inline(always)]
fn deliver6(ctx: &TcContext, cfg: &Config, found: Option<Option<&'static Endpoint>>) -> (i32, u32) {
    let pass = TC_ACT_OK;
    let pkt = linear(ctx, EthHdr::LEN + IPV6_HDR_LEN);
    let Some(p) = pkt.get_mut::<[u8; EthHdr::LEN + IPV6_HDR_LEN]>(0) else {
        return (TC_ACT_SHOT, UPLINK_DROP_REDIRECT_FAILED);
    };
    let p = p as *mut u8;
    // SAFETY: `get_mut` checked that these bytes are in the packet.
    let (hops, dst) = unsafe {
        (
            *p.add(EthHdr::LEN + 7),
            core::ptr::read_unaligned(p.add(EthHdr::LEN + 24) as *const [u8; 16]),
        )
    };
    let decapped = found.is_some();
    let ep = match found {
        Some(ep) => ep,
        None => unsafe { ENDPOINTS6.get(dst) },
    };
    let Some(ep) = ep else {
        return (pass, UPLINK_PASS);
    };
    if hops <= 1 {
        return (pass, UPLINK_PASS_TTL);
    }
    // SAFETY: as above.
    unsafe {
        core::ptr::write_unaligned(p as *mut [u8; 6], ep.pod_mac);
        core::ptr::write_unaligned(p.add(6) as *mut [u8; 6], cfg.gateway_mac);
        *p.add(EthHdr::LEN + 7) = hops - 1;
    }
    let action = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) } as i32;
    if action == TC_ACT_SHOT {
        return (action, UPLINK_DROP_REDIRECT_FAILED);
    }
    (
        action,
        if decapped {
            UPLINK_DECAP6
        } else {
            UPLINK_REDIRECT
        },
    )
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // An endless loop makes the verifier reject any program that can panic.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

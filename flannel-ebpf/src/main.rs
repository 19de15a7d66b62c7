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

mod monitor;
mod parse;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams, bpf_redir_neigh,
        xdp_action, BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_fib_lookup, bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect, bpf_redirect_neigh,
        bpf_redirect_peer, bpf_xdp_adjust_head,
    },
    macros::{classifier, map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use flannel_common::{
    counters::*, Config, Endpoint, RemoteNode, Vtep, CONFIG_F_READY, CONFIG_F_TC_DECAP,
    MAX_ENDPOINTS, MAX_REMOTE_SUBNETS, MAX_VTEPS, VXLAN_ENCAP_LEN,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use parse::{Headers, ETH_P_ARP_BE, ETH_P_IP_BE, IPPROTO_UDP};

#[map(name = "FLANNEL_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "FLANNEL_REMOTES")]
static REMOTES: LpmTrie<u32, RemoteNode> =
    LpmTrie::with_max_entries(MAX_REMOTE_SUBNETS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "FLANNEL_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

#[map(name = "FLANNEL_VTEPS")]
static VTEPS: HashMap<u32, Vtep> = HashMap::with_max_entries(MAX_VTEPS, 0);

#[map(name = "FLANNEL_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNT, 0);

const AF_INET: u8 = 2;
/// Outer UDP source ports come from the flow hash, spread over the kernel's
/// default ephemeral range like the Linux VXLAN driver does.
const SPORT_MIN: u32 = 32768;
const SPORT_MAX: u32 = 61000;
const OUTER_TTL: u8 = 64;

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

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    let (action, counter) = from_pod(&ctx);
    count(counter);
    monitor::report(&ctx, counter);
    action
}

#[inline(always)]
fn from_pod(ctx: &TcContext) -> (i32, u32) {
    let pass = TC_ACT_OK;
    let Some(cfg) = config() else {
        return (pass, POD_PASS_NO_CONFIG);
    };
    let Ok(eth_type) = ctx.load::<u16>(12) else {
        return (pass, POD_PASS_MALFORMED);
    };
    // The veth this program runs on belongs to one pod: what it sends must
    // carry that pod's address.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if eth_type == ETH_P_ARP_BE {
        return from_pod_arp(ctx, ifindex);
    }
    if eth_type != ETH_P_IP_BE {
        return (pass, POD_PASS_NOT_IPV4);
    }
    let Ok(ip) = ctx.load::<Ipv4Hdr>(EthHdr::LEN) else {
        return (pass, POD_PASS_MALFORMED);
    };
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return (pass, POD_PASS_MALFORMED);
    }
    if !pod_owns(u32::from_ne_bytes(ip.src_addr), ifindex) {
        return (TC_ACT_SHOT, POD_DROP_SPOOFED_SRC);
    }
    let dst = u32::from_ne_bytes(ip.dst_addr);

    // Same node: what the bridge would do, without the bridge. No routing
    // happens on a bridged path, so the TTL is left alone.
    if let Some(ep) = unsafe { ENDPOINTS.get(dst) } {
        if ctx.store(0, &ep.pod_mac, 0).is_err() {
            return (TC_ACT_SHOT, POD_DROP_ENCAP_FAILED);
        }
        let action = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) } as i32;
        return (action, POD_LOCAL_REDIRECT);
    }

    let Some(remote) = REMOTES.get(Key::new(32, dst)) else {
        return (pass, POD_PASS_NOT_POD_DST);
    };
    // Let the stack send "time exceeded" and "fragmentation needed".
    if ip.ttl <= 1 {
        return (pass, POD_PASS_TTL);
    }
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let too_big = if gso_size == 0 {
        u32::from(u16::from_be_bytes(ip.tot_len)) > cfg.inner_mtu
    } else {
        // IPv4 and TCP headers without options: the smallest a segment carries.
        gso_size + 40 > cfg.inner_mtu
    };
    if too_big {
        return (pass, POD_PASS_TOO_BIG);
    }
    encap(ctx, cfg, &ip, remote)
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

/// Builds the outer headers Flannel's VXLAN device would build and hands the
/// packet to the uplink. Everything that can fail without touching the packet
/// is done first, so that such a failure still passes it to the stack intact.
#[inline(always)]
fn encap(ctx: &TcContext, cfg: &Config, ip: &Ipv4Hdr, remote: &RemoteNode) -> (i32, u32) {
    let pass = TC_ACT_OK;
    let drop = TC_ACT_SHOT;

    // Outer next hop through the FIB, as the kernel would route the outer packet.
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
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return (pass, POD_PASS_NO_ROUTE);
    }

    // Flow hash of the inner packet, before the headers change.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let sport = (((u64::from(hash)) * u64::from(SPORT_MAX - SPORT_MIN)) >> 32) as u32 + SPORT_MIN;

    let flags = u64::from(
        BPF_F_ADJ_ROOM_FIXED_GSO
            | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
            | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
            | BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
    ) | ((EthHdr::LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    if ctx
        .adjust_room(VXLAN_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return (drop, POD_DROP_ENCAP_FAILED);
    }

    let total = ctx.len();
    let hdr = Headers::vxlan(
        cfg,
        remote,
        &fib,
        rc == BPF_FIB_LKUP_RET_SUCCESS,
        (total - EthHdr::LEN as u32) as u16,
        (unsafe { bpf_get_prandom_u32() } & 0xffff) as u16,
        sport as u16,
        OUTER_TTL,
    );
    if ctx.store(0, &hdr, 0).is_err() {
        return (drop, POD_DROP_ENCAP_FAILED);
    }

    // The inner packet is routed once by this node, as through flannel.1.
    let inner_ip = EthHdr::LEN + VXLAN_ENCAP_LEN as usize;
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    let new = u16::from_ne_bytes([ip.ttl - 1, ip.proto]);
    if ctx.store(inner_ip + 8, &(ip.ttl - 1), 0).is_err()
        || ctx
            .l3_csum_replace(inner_ip + 10, u64::from(old), u64::from(new), 2)
            .is_err()
    {
        return (drop, POD_DROP_ENCAP_FAILED);
    }

    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let action = unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
        (action, POD_ENCAP_REDIRECT)
    } else {
        // Neighbour not resolved yet: let the kernel resolve it and fill L2.
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = u32::from(AF_INET);
        nh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
        let action = unsafe {
            bpf_redirect_neigh(
                fib.ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        } as i32;
        (action, POD_ENCAP_NEIGH)
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
        return (pass, XDP_PASS_NO_CONFIG);
    };
    let pkt = parse::Packet::new(ctx.data(), ctx.data_end());

    let Some(eth) = pkt.get::<EthHdr>(0) else {
        return (pass, XDP_PASS_MALFORMED);
    };
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return (pass, XDP_PASS_NOT_IPV4);
    }
    let Some(ip) = pkt.get::<Ipv4Hdr>(parse::OUTER_IP) else {
        return (pass, XDP_PASS_MALFORMED);
    };
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return (pass, XDP_PASS_MALFORMED);
    }
    // Offsets below assume a 20-byte outer header; options are legal but
    // never used by VXLAN senders, so the stack handles them.
    if ip.vihl & 0x0f != 5 {
        return (pass, XDP_PASS_IP_OPTIONS);
    }
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return (pass, XDP_PASS_FRAGMENT);
    }
    if ip.proto != IPPROTO_UDP {
        return (pass, XDP_PASS_NOT_VXLAN);
    }
    let Some(udp) = pkt.get::<network_types::udp::UdpHdr>(parse::OUTER_UDP) else {
        return (pass, XDP_PASS_MALFORMED);
    };
    let udp = unsafe { &*udp };
    if u16::from_be_bytes(udp.dst) != cfg.udp_port {
        return (pass, XDP_PASS_NOT_VXLAN);
    }
    // The IP and UDP lengths must cover a whole VXLAN frame and fit in what
    // arrived; anything else is truncated or lying about its size.
    let ip_len = usize::from(u16::from_be_bytes(ip.tot_len));
    let udp_len = usize::from(u16::from_be_bytes(udp.len));
    if udp_len < parse::MIN_VXLAN_UDP_LEN
        || ip_len < Ipv4Hdr::LEN + udp_len
        || parse::OUTER_IP + ip_len > pkt.len()
    {
        return (pass, XDP_PASS_MALFORMED);
    }
    let Some(vx) = pkt.get::<network_types::vxlan::VxlanHdr>(parse::VXLAN) else {
        return (pass, XDP_PASS_MALFORMED);
    };
    let vx = unsafe { &*vx };
    let vni = u32::from_be_bytes([0, vx.vni[0], vx.vni[1], vx.vni[2]]);
    if vx.flags & network_types::vxlan::VXLAN_I_FLAG_MASK == 0 || vni != cfg.vni {
        return (pass, XDP_PASS_WRONG_VNI);
    }
    let src = u32::from_ne_bytes(ip.src_addr);
    // Only nodes that hold a lease may send us VXLAN (the kernel's
    // flannel.1 would take it from anyone).
    if unsafe { VTEPS.get(src) }.is_none() {
        return (xdp_action::XDP_DROP, XDP_DROP_UNKNOWN_VTEP);
    }
    let Some(inner_eth) = pkt.get_mut::<EthHdr>(parse::INNER_ETH) else {
        return (pass, XDP_PASS_MALFORMED);
    };
    if unsafe { (*inner_eth).ether_type } != ETH_P_IP_BE {
        return (pass, XDP_PASS_INNER_NOT_IPV4);
    }
    let Some(inner_ip) = pkt.get::<Ipv4Hdr>(parse::INNER_IP) else {
        return (pass, XDP_PASS_MALFORMED);
    };
    let inner_ip = unsafe { &*inner_ip };
    if inner_ip.vihl >> 4 != 4 || inner_ip.vihl & 0x0f < 5 {
        return (pass, XDP_PASS_MALFORMED);
    }
    let dst = u32::from_ne_bytes(inner_ip.dst_addr);
    if unsafe { ENDPOINTS.get(dst) }.is_none() {
        return (pass, XDP_PASS_NOT_LOCAL);
    }
    // Addressed to the uplink, the stack (or tc_uplink_ingress) takes it as a
    // packet to route to the pod.
    unsafe { (*inner_eth).dst_addr = cfg.uplink_mac };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN_ENCAP_LEN as i32) } != 0 {
        return (xdp_action::XDP_DROP, XDP_DROP_ADJUST_FAILED);
    }
    (pass, XDP_DECAP)
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

#[inline(always)]
fn uplink_ingress(ctx: &TcContext) -> (i32, u32) {
    let pass = TC_ACT_OK;
    let Some(cfg) = config() else {
        return (pass, UPLINK_PASS);
    };
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return (pass, UPLINK_PASS);
    };
    if eth.ether_type != ETH_P_IP_BE || eth.dst_addr != cfg.uplink_mac {
        return (pass, UPLINK_PASS);
    }
    let Ok(mut ip) = ctx.load::<Ipv4Hdr>(EthHdr::LEN) else {
        return (pass, UPLINK_PASS);
    };
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return (pass, UPLINK_PASS);
    }
    let mut decapped = false;
    if cfg.flags & CONFIG_F_TC_DECAP != 0 && ip.proto == IPPROTO_UDP {
        match tc_decap(ctx, cfg, &ip) {
            Decap::Done(inner) => {
                ip = inner;
                decapped = true;
            }
            Decap::NotOurs => {}
            Decap::UnknownVtep => return (TC_ACT_SHOT, UPLINK_DROP_UNKNOWN_VTEP),
            Decap::Failed => return (TC_ACT_SHOT, UPLINK_DROP_DECAP_FAILED),
        }
    }
    let dst = u32::from_ne_bytes(ip.dst_addr);
    let Some(ep) = (unsafe { ENDPOINTS.get(dst) }) else {
        return (pass, UPLINK_PASS);
    };
    if ip.ttl <= 1 {
        return (pass, UPLINK_PASS_TTL);
    }
    // Routed by this node into the pod: TTL − 1, MACs of the cni0 hop.
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    let new = u16::from_ne_bytes([ip.ttl - 1, ip.proto]);
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&ep.pod_mac);
    macs[6..].copy_from_slice(&cfg.gateway_mac);
    if ctx.store(0, &macs, 0).is_err()
        || ctx.store(EthHdr::LEN + 8, &(ip.ttl - 1), 0).is_err()
        || ctx
            .l3_csum_replace(EthHdr::LEN + 10, u64::from(old), u64::from(new), 2)
            .is_err()
    {
        return (TC_ACT_SHOT, UPLINK_DROP_REDIRECT_FAILED);
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

enum Decap {
    /// Headers removed; the inner IPv4 header, now right after Ethernet.
    Done(Ipv4Hdr),
    /// Not VXLAN for a local pod from a known VTEP: the stack decides.
    NotOurs,
    /// VXLAN for us from an address that holds no lease.
    UnknownVtep,
    /// The kernel refused to shrink the packet.
    Failed,
}

/// VXLAN decapsulation in TC, for uplinks without XDP: the same checks as
/// `xdp_uplink`, then the outer IP, UDP, VXLAN and inner Ethernet headers
/// are removed with `bpf_skb_adjust_room`, which works on whole GSO
/// packets (the inner MSS is unchanged, hence FIXED_GSO).
#[inline(always)]
fn tc_decap(ctx: &TcContext, cfg: &Config, ip: &Ipv4Hdr) -> Decap {
    if ip.vihl & 0x0f != 5
        || u16::from_be_bytes(ip.frags) & 0x3fff != 0
        || u32::from_ne_bytes(ip.dst_addr) != cfg.node_ip
    {
        return Decap::NotOurs;
    }
    let Ok(udp) = ctx.load::<network_types::udp::UdpHdr>(parse::OUTER_UDP) else {
        return Decap::NotOurs;
    };
    if u16::from_be_bytes(udp.dst) != cfg.udp_port {
        return Decap::NotOurs;
    }
    let Ok(vx) = ctx.load::<network_types::vxlan::VxlanHdr>(parse::VXLAN) else {
        return Decap::NotOurs;
    };
    let vni = u32::from_be_bytes([0, vx.vni[0], vx.vni[1], vx.vni[2]]);
    if vx.flags & network_types::vxlan::VXLAN_I_FLAG_MASK == 0 || vni != cfg.vni {
        return Decap::NotOurs;
    }
    if unsafe { VTEPS.get(u32::from_ne_bytes(ip.src_addr)) }.is_none() {
        return Decap::UnknownVtep;
    }
    let Ok(inner_eth) = ctx.load::<EthHdr>(parse::INNER_ETH) else {
        return Decap::NotOurs;
    };
    if inner_eth.ether_type != ETH_P_IP_BE {
        return Decap::NotOurs;
    }
    let Ok(inner) = ctx.load::<Ipv4Hdr>(parse::INNER_IP) else {
        return Decap::NotOurs;
    };
    if inner.vihl >> 4 != 4 || inner.vihl & 0x0f < 5 {
        return Decap::NotOurs;
    }
    if unsafe { ENDPOINTS.get(u32::from_ne_bytes(inner.dst_addr)) }.is_none() {
        return Decap::NotOurs;
    }
    let shrink = (parse::INNER_IP - EthHdr::LEN) as i32;
    if ctx
        .adjust_room(
            -shrink,
            BPF_ADJ_ROOM_MAC,
            u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
        )
        .is_err()
    {
        return Decap::Failed;
    }
    Decap::Done(inner)
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

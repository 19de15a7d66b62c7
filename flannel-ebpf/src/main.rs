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
        bpf_redirect_peer, bpf_xdp_adjust_head, bpf_xdp_adjust_meta,
    },
    macros::{classifier, map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use flannel_common::{
    counters::{self, *},
    decap::{self, Action},
    Config, Endpoint, RemoteNode, Vtep, CONFIG_F_NETFILTER, CONFIG_F_READY, CONFIG_F_TC_DECAP,
    MAX_ENDPOINTS, MAX_REMOTE_SUBNETS, MAX_VTEPS, VXLAN_ENCAP_LEN, XDP_META_DECAPPED,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use parse::{Headers, ETH_P_ARP_BE, ETH_P_IP_BE};

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
    // The node has forward-path firewall rules: the kernel routes (or
    // bridges) the packet, through its forward hook and rp_filter.
    if cfg.flags & CONFIG_F_NETFILTER != 0 {
        return (pass, POD_PASS_NETFILTER);
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
// The uplink: what the maps know, for the shared decap decision
// ---------------------------------------------------------------------------

/// The maps and the neighbour table as `decap::Tables`. `ctx` is the
/// program's context, for `bpf_fib_lookup`.
struct Maps<'a> {
    ctx: *mut core::ffi::c_void,
    cfg: &'a Config,
}

impl decap::Tables for Maps<'_> {
    #[inline(always)]
    fn known_vtep(&self, ip: u32) -> bool {
        unsafe { VTEPS.get(ip) }.is_some()
    }

    #[inline(always)]
    fn lease_node(&self, ip: u32) -> Option<u32> {
        REMOTES.get(Key::new(32, ip)).map(|r| r.node_ip)
    }

    #[inline(always)]
    fn local_pod(&self, ip: u32) -> bool {
        unsafe { ENDPOINTS.get(ip) }.is_some()
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
}

/// XDP packet bytes, bounds-checked against `data_end`.
struct XdpBytes(parse::Packet);

impl decap::Frame for XdpBytes {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let p = self.0.get::<[u8; N]>(offset)?;
        Some(unsafe { core::ptr::read_unaligned(p) })
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
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
    let frame = XdpBytes(parse::Packet::new(ctx.data(), ctx.data_end()));
    let maps = Maps {
        ctx: ctx.ctx as *mut _,
        cfg,
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
    let Some(inner_eth) = pkt.get_mut::<EthHdr>(parse::INNER_ETH) else {
        return (
            xdp_action::XDP_DROP,
            counters::xdp(decap::DROP_ADJUST_FAILED),
        );
    };
    unsafe { (*inner_eth).dst_addr = cfg.uplink_mac };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN_ENCAP_LEN as i32) } != 0 {
        return (
            xdp_action::XDP_DROP,
            counters::xdp(decap::DROP_ADJUST_FAILED),
        );
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
    let decapped = if cfg.flags & CONFIG_F_TC_DECAP != 0 {
        let maps = Maps {
            ctx: ctx.skb.skb as *mut _,
            cfg,
        };
        let gso_size = unsafe { (*ctx.skb.skb).gso_size };
        let v = decap::classify(&SkbBytes(ctx), cfg, &maps, gso_size);
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
        let shrink = (parse::INNER_IP - EthHdr::LEN) as i32;
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
        true
    } else if xdp_decapsulated(ctx) {
        false
    } else {
        // XDP judged it already, or it is not for us: a plain packet to a
        // pod address from outside is the kernel's to route (and filter).
        return (pass, UPLINK_PASS);
    };
    let Ok(ip) = ctx.load::<Ipv4Hdr>(EthHdr::LEN) else {
        return (TC_ACT_SHOT, UPLINK_DROP_REDIRECT_FAILED);
    };
    let Some(ep) = (unsafe { ENDPOINTS.get(u32::from_ne_bytes(ip.dst_addr)) }) else {
        // The pod went away in between: the kernel has the packet.
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // An endless loop makes the verifier reject any program that can panic.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

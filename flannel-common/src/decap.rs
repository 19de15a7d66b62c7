//! The uplink's VXLAN decision, shared by `xdp_uplink` and
//! `tc_uplink_ingress` and compiled for the host too (unit tests, fuzzing).
//!
//! A packet is decapsulated in eBPF only when the kernel's `flannel.<VNI>`
//! path would accept it and deliver its inner packet to a local pod:
//! addressed to this node (MAC and IP), lengths that agree with the frame, a
//! valid outer IPv4 checksum, VXLAN flags exactly as the kernel's device
//! accepts them, our VNI, from a node that holds a lease, inner Ethernet to
//! our VTEP, a valid inner IPv4 header whose source lies in the sending
//! node's lease, a local pod as destination, and an inner packet that fits
//! the pod MTU. What the kernel would certainly drop is dropped here, with
//! its own counter; what depends on kernel state (another VNI, a packet
//! too big for the pod, not for a local pod) is passed to the kernel
//! untouched, also with its own counter. One check is the kernel's alone:
//! the outer UDP checksum is not verified here (see `classify`).
//!
//! With IPv6 on (`Config::node_ip6` set), VXLAN over IPv6 as
//! `flannel-v6.<VNI>` receives it is judged the same way (`classify6`):
//! IPv6 outer and inner headers, the IPv6 maps, and a zero outer UDP
//! checksum dropped, as the kernel drops one over IPv6.

use crate::{Config, CONFIG_F_STRICT_SOURCE};

/// Bytes of a packet, bounds-checked: `load` returns `None` past the end.
#[allow(clippy::len_without_is_empty)]
pub trait Frame {
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
    fn len(&self) -> usize;
}

impl Frame for [u8] {
    fn load<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }

    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

/// What the maps (and, for the strict source check, the neighbour table)
/// know. Addresses as network-order bytes in a `u32`, as in the maps.
///
/// Every node `lease_node` names must be a known VTEP (the agent writes
/// every lease holder's IP into `FLANNEL_VTEPS`): a packet whose inner
/// source lies in its sender's lease is taken without `known_vtep` being
/// asked, which is asked only for the packets not taken.
pub trait Tables {
    /// `ip` holds a lease (is a known VTEP).
    fn known_vtep(&self, ip: u32) -> bool;
    /// The public IP of the node whose lease contains `ip`.
    fn lease_node(&self, ip: u32) -> Option<u32>;
    /// `ip` is a pod on this node.
    fn local_pod(&self, ip: u32) -> bool;
    /// `mac` is the neighbour entry of `ip` on the uplink (asked only with
    /// `CONFIG_F_STRICT_SOURCE`).
    fn neighbour_is(&self, ip: u32, mac: &[u8; 6]) -> bool;
    /// The same four over IPv6 (dual-stack), addresses as their bytes.
    fn known_vtep6(&self, ip: &[u8; 16]) -> bool;
    fn lease_node6(&self, ip: &[u8; 16]) -> Option<[u8; 16]>;
    fn local_pod6(&self, ip: &[u8; 16]) -> bool;
    fn neighbour_is6(&self, ip: &[u8; 16], mac: &[u8; 6]) -> bool;
}

/// What to do with the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Strip the outer headers and deliver the inner packet.
    Decap,
    /// Leave it to the kernel untouched.
    Pass,
    /// Drop it (the kernel would have too, or it comes from a stranger).
    Drop,
}

/// Hands the reason list to `$then!`, which declares from it what it needs:
/// here the constants, names and actions; in `counters` the XDP and TC
/// counter names. One list, so the two cannot drift apart.
macro_rules! decap_reasons {
    ($then:ident) => {
        $then! {
            DECAP = 0, "decap", Decap;
            PASS_NO_CONFIG = 1, "pass_no_config", Pass;
            // Too short for its Ethernet, IPv4 or UDP header, or not IPv4
            // version 4 with IHL >= 5.
            PASS_MALFORMED = 2, "pass_malformed", Pass;
            PASS_NOT_IPV4 = 3, "pass_not_ipv4", Pass;
            // Outer destination MAC or IP is not this node's.
            PASS_OTHER_HOST = 4, "pass_other_host", Pass;
            // Outer or inner IPv4 options: left to the stack.
            PASS_IP_OPTIONS = 5, "pass_ip_options", Pass;
            PASS_FRAGMENT = 6, "pass_fragment", Pass;
            // Not UDP to the VXLAN port.
            PASS_NOT_VXLAN = 7, "pass_not_vxlan", Pass;
            // Outer IPv4 or UDP length disagrees with the frame or is too
            // short for VXLAN.
            DROP_BAD_LENGTH = 8, "drop_bad_length", Drop;
            // Outer IPv4 header checksum wrong.
            DROP_BAD_CHECKSUM = 9, "drop_bad_checksum", Drop;
            // VXLAN flags other than exactly I, or reserved bits set (the
            // kernel drops these, unlike RFC 7348's "ignore").
            DROP_BAD_FLAGS = 10, "drop_bad_flags", Drop;
            PASS_WRONG_VNI = 11, "pass_wrong_vni", Pass;
            // From an address that holds no lease.
            DROP_UNKNOWN_VTEP = 12, "drop_unknown_vtep", Drop;
            // `--vxlan-source-check strict`: the outer source MAC is not
            // the neighbour entry of the outer source IP.
            DROP_SOURCE_MAC = 13, "drop_source_mac", Drop;
            PASS_INNER_NOT_IPV4 = 14, "pass_inner_not_ipv4", Pass;
            // Inner destination MAC is not this node's VTEP MAC.
            DROP_INNER_MAC = 15, "drop_inner_mac", Drop;
            // Inner IPv4 header invalid: version, IHL, length or checksum.
            DROP_INNER_MALFORMED = 16, "drop_inner_malformed", Drop;
            // Inner source outside the sending node's lease.
            DROP_INNER_SOURCE = 17, "drop_inner_source", Drop;
            // Inner destination is not a pod on this node.
            PASS_NOT_LOCAL = 18, "pass_not_local", Pass;
            // Inner packet larger than the pod MTU: the kernel fragments it
            // or answers with ICMP.
            PASS_TOO_BIG = 19, "pass_too_big", Pass;
            // The kernel refused to remove the headers.
            DROP_ADJUST_FAILED = 20, "drop_adjust_failed", Drop;
            // VXLAN over IPv6 (flannel-v6.<VNI>'s) for a local pod.
            DECAP6 = 21, "decap6", Decap;
            // VXLAN over IPv6 whose inner frame is not IPv6.
            PASS_INNER_NOT_IPV6 = 22, "pass_inner_not_ipv6", Pass;
        }
    };
}

macro_rules! define_reasons {
    ($($id:ident = $n:literal, $name:literal, $action:ident;)*) => {
        $(pub const $id: u32 = $n;)*
        /// Number of reasons.
        pub const COUNT: u32 = [$($n),*].len() as u32;
        /// Reason names; the XDP and TC counters are `xdp_<name>` and
        /// `uplink_<name>`.
        pub const NAMES: [&str; COUNT as usize] = [$($name),*];
        /// The action each reason stands for.
        pub const ACTIONS: [Action; COUNT as usize] = [$(Action::$action),*];
    };
}

decap_reasons!(define_reasons);

/// Header offsets in a VXLAN frame whose outer IPv4 header has no options.
pub const OUTER_IP: usize = 14;
pub const OUTER_UDP: usize = OUTER_IP + 20;
pub const VXLAN: usize = OUTER_UDP + 8;
pub const INNER_ETH: usize = VXLAN + 8;
pub const INNER_IP: usize = INNER_ETH + 14;
/// Smallest UDP length that carries VXLAN, Ethernet and IPv4 headers.
pub const MIN_UDP_LEN: usize = 8 + 8 + 14 + 20;
/// The same offsets over IPv6 (a 40-byte outer header, no extension
/// headers).
pub const OUTER_UDP6: usize = OUTER_IP + 40;
pub const VXLAN6: usize = OUTER_UDP6 + 8;
pub const INNER_ETH6: usize = VXLAN6 + 8;
pub const INNER_IP6: usize = INNER_ETH6 + 14;
pub const MIN_UDP6_LEN: usize = 8 + 8 + 14 + 40;

/// The decision and its reason (an index into [`NAMES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    pub reason: u32,
}

#[inline(always)]
const fn verdict(reason: u32) -> Verdict {
    Verdict {
        action: ACTIONS[reason as usize],
        reason,
    }
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

#[inline(always)]
fn addr(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether a 20-byte IPv4 header's checksum is right.
#[inline(always)]
pub fn ipv4_checksum_ok(h: &[u8; 20]) -> bool {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// Decides what the uplink does with `f`. `gso_size` is the skb's segment
/// size (0 when not GSO, and always 0 in XDP).
#[inline(always)]
pub fn classify<F: Frame + ?Sized, T: Tables>(
    f: &F,
    cfg: &Config,
    t: &T,
    gso_size: u32,
) -> Verdict {
    let Some(eth) = f.load::<14>(0) else {
        return verdict(PASS_MALFORMED);
    };
    if eth[12..14] == [0x86, 0xdd] && cfg.node_ip6 != [0; 16] {
        return classify6(f, &eth, cfg, t, gso_size);
    }
    if eth[12..14] != [0x08, 0x00] {
        return verdict(PASS_NOT_IPV4);
    }
    let Some(ip) = f.load::<20>(OUTER_IP) else {
        return verdict(PASS_MALFORMED);
    };
    if ip[0] >> 4 != 4 || ip[0] & 0x0f < 5 {
        return verdict(PASS_MALFORMED);
    }
    if eth[0..6] != cfg.uplink_mac || addr(&ip, 16) != cfg.node_ip {
        return verdict(PASS_OTHER_HOST);
    }
    // Offsets below assume a 20-byte outer header; VXLAN senders never use
    // options, so the stack handles those.
    if ip[0] & 0x0f != 5 {
        return verdict(PASS_IP_OPTIONS);
    }
    if be16(&ip, 6) & 0x3fff != 0 {
        return verdict(PASS_FRAGMENT);
    }
    if ip[9] != 17 {
        return verdict(PASS_NOT_VXLAN);
    }
    let Some(udp) = f.load::<8>(OUTER_UDP) else {
        return verdict(PASS_MALFORMED);
    };
    // Port 0: no VXLAN on this node (host-gw).
    if be16(&udp, 2) != usize::from(cfg.udp_port) || cfg.udp_port == 0 {
        return verdict(PASS_NOT_VXLAN);
    }
    // From here on it is VXLAN for us: judged, as the kernel would.
    let (ip_len, udp_len) = (be16(&ip, 2), be16(&udp, 4));
    if udp_len < MIN_UDP_LEN || ip_len < 20 + udp_len || OUTER_IP + ip_len > f.len() {
        return verdict(DROP_BAD_LENGTH);
    }
    if !ipv4_checksum_ok(&ip) {
        return verdict(DROP_BAD_CHECKSUM);
    }
    let Some(vx) = f.load::<8>(VXLAN) else {
        return verdict(PASS_MALFORMED);
    };
    if vx[0..4] != [0x08, 0, 0, 0] || vx[7] != 0 {
        return verdict(DROP_BAD_FLAGS);
    }
    if u32::from_be_bytes([0, vx[4], vx[5], vx[6]]) != cfg.vni {
        return verdict(PASS_WRONG_VNI);
    }
    let src = addr(&ip, 12);
    // Whether the sender is a known VTEP is asked only of what is not
    // taken (see `Tables`); the verdicts are those of asking it here.
    let v = from_node(f, &eth, cfg, t, gso_size, src, ip_len);
    if v.action != Action::Decap && !t.known_vtep(src) {
        return verdict(DROP_UNKNOWN_VTEP);
    }
    v
}

/// `classify` from the strict source check on, for VXLAN from `src` with
/// outer IP length `ip_len`, as if `src` were a known VTEP.
#[inline(always)]
fn from_node<F: Frame + ?Sized, T: Tables>(
    f: &F,
    eth: &[u8; 14],
    cfg: &Config,
    t: &T,
    gso_size: u32,
    src: u32,
    ip_len: usize,
) -> Verdict {
    if cfg.flags & CONFIG_F_STRICT_SOURCE != 0 {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&eth[6..12]);
        if !t.neighbour_is(src, &mac) {
            return verdict(DROP_SOURCE_MAC);
        }
    }
    let Some(inner_eth) = f.load::<14>(INNER_ETH) else {
        return verdict(PASS_MALFORMED);
    };
    if inner_eth[12..14] != [0x08, 0x00] {
        return verdict(PASS_INNER_NOT_IPV4);
    }
    if inner_eth[0..6] != cfg.vtep_mac {
        return verdict(DROP_INNER_MAC);
    }
    let Some(inner) = f.load::<20>(INNER_IP) else {
        return verdict(PASS_MALFORMED);
    };
    if inner[0] >> 4 != 4 || inner[0] & 0x0f < 5 {
        return verdict(DROP_INNER_MALFORMED);
    }
    if inner[0] & 0x0f != 5 {
        return verdict(PASS_IP_OPTIONS);
    }
    let inner_len = be16(&inner, 2);
    if inner_len < 20 || INNER_IP + inner_len > OUTER_IP + ip_len || !ipv4_checksum_ok(&inner) {
        return verdict(DROP_INNER_MALFORMED);
    }
    if t.lease_node(addr(&inner, 12)) != Some(src) {
        return verdict(DROP_INNER_SOURCE);
    }
    if !t.local_pod(addr(&inner, 16)) {
        return verdict(PASS_NOT_LOCAL);
    }
    let too_big = if gso_size == 0 {
        inner_len as u32 > cfg.inner_mtu
    } else {
        // IPv4 and TCP headers without options: the smallest a segment carries.
        gso_size + 40 > cfg.inner_mtu
    };
    if too_big {
        return verdict(PASS_TOO_BIG);
    }
    // The outer UDP checksum, when present (the kernel's VXLAN device sends
    // one by default), is not verified: that would mean summing the whole
    // packet here. The inner packet's own checksums are verified end to
    // end by the pod's stack.
    verdict(DECAP)
}

/// [`classify`] for VXLAN over IPv6 (`flannel-v6.<VNI>`'s), with the
/// same checks and reasons: IPv6 has no header checksum, but a zero UDP
/// checksum is dropped (the kernel does, `udp6zerocsumrx` being off), and
/// an extension header or fragment is the kernel's.
#[inline(always)]
fn classify6<F: Frame + ?Sized, T: Tables>(
    f: &F,
    eth: &[u8; 14],
    cfg: &Config,
    t: &T,
    gso_size: u32,
) -> Verdict {
    let Some(ip) = f.load::<40>(OUTER_IP) else {
        return verdict(PASS_MALFORMED);
    };
    if ip[0] >> 4 != 6 {
        return verdict(PASS_MALFORMED);
    }
    if eth[0..6] != cfg.uplink_mac || ip[24..40] != cfg.node_ip6 {
        return verdict(PASS_OTHER_HOST);
    }
    match ip[6] {
        17 => {}
        44 => return verdict(PASS_FRAGMENT),
        // Hop-by-hop, routing and destination options.
        0 | 43 | 60 => return verdict(PASS_IP_OPTIONS),
        _ => return verdict(PASS_NOT_VXLAN),
    }
    let Some(udp) = f.load::<8>(OUTER_UDP6) else {
        return verdict(PASS_MALFORMED);
    };
    if be16(&udp, 2) != usize::from(cfg.udp_port) || cfg.udp_port == 0 {
        return verdict(PASS_NOT_VXLAN);
    }
    let (payload_len, udp_len) = (be16(&ip, 4), be16(&udp, 4));
    if udp_len < MIN_UDP6_LEN || payload_len < udp_len || OUTER_UDP6 + payload_len > f.len() {
        return verdict(DROP_BAD_LENGTH);
    }
    if udp[6..8] == [0, 0] {
        return verdict(DROP_BAD_CHECKSUM);
    }
    let Some(vx) = f.load::<8>(VXLAN6) else {
        return verdict(PASS_MALFORMED);
    };
    if vx[0..4] != [0x08, 0, 0, 0] || vx[7] != 0 {
        return verdict(DROP_BAD_FLAGS);
    }
    if u32::from_be_bytes([0, vx[4], vx[5], vx[6]]) != cfg.vni {
        return verdict(PASS_WRONG_VNI);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    // As over IPv4: the VTEP is asked only of what is not taken.
    let v = from_node6(f, eth, cfg, t, gso_size, &src, udp_len);
    if v.action != Action::Decap && !t.known_vtep6(&src) {
        return verdict(DROP_UNKNOWN_VTEP);
    }
    v
}

/// `classify6` from the strict source check on, for VXLAN from `src` with
/// UDP length `udp_len`, as if `src` were a known VTEP.
#[inline(always)]
fn from_node6<F: Frame + ?Sized, T: Tables>(
    f: &F,
    eth: &[u8; 14],
    cfg: &Config,
    t: &T,
    gso_size: u32,
    src: &[u8; 16],
    udp_len: usize,
) -> Verdict {
    if cfg.flags & CONFIG_F_STRICT_SOURCE != 0 {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&eth[6..12]);
        if !t.neighbour_is6(src, &mac) {
            return verdict(DROP_SOURCE_MAC);
        }
    }
    let Some(inner_eth) = f.load::<14>(INNER_ETH6) else {
        return verdict(PASS_MALFORMED);
    };
    if inner_eth[12..14] != [0x86, 0xdd] {
        return verdict(PASS_INNER_NOT_IPV6);
    }
    if inner_eth[0..6] != cfg.vtep6_mac {
        return verdict(DROP_INNER_MAC);
    }
    let Some(inner) = f.load::<40>(INNER_IP6) else {
        return verdict(PASS_MALFORMED);
    };
    let inner_len = 40 + be16(&inner, 4);
    if inner[0] >> 4 != 6 || INNER_IP6 + inner_len > OUTER_UDP6 + udp_len {
        return verdict(DROP_INNER_MALFORMED);
    }
    let mut a = [0u8; 16];
    a.copy_from_slice(&inner[8..24]);
    if t.lease_node6(&a) != Some(*src) {
        return verdict(DROP_INNER_SOURCE);
    }
    a.copy_from_slice(&inner[24..40]);
    if !t.local_pod6(&a) {
        return verdict(PASS_NOT_LOCAL);
    }
    let too_big = if gso_size == 0 {
        inner_len as u32 > cfg.inner_mtu
    } else {
        // IPv6 and TCP headers: the smallest a segment carries.
        gso_size + 60 > cfg.inner_mtu
    };
    if too_big {
        return verdict(PASS_TOO_BIG);
    }
    verdict(DECAP6)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    const NODE: [u8; 4] = [172, 30, 0, 1];
    const PEER: [u8; 4] = [172, 30, 0, 2];
    const STRANGER: [u8; 4] = [172, 30, 0, 99];
    const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const VTEP_MAC: [u8; 6] = [2, 0x66, 0, 0, 0, 1];
    const POD: [u8; 4] = [10, 244, 1, 5];
    const PEER_POD: [u8; 4] = [10, 244, 2, 5];

    struct Fake {
        strict_mac: [u8; 6],
    }

    impl Tables for Fake {
        fn known_vtep(&self, ip: u32) -> bool {
            ip == u32::from_ne_bytes(PEER)
        }
        fn lease_node(&self, ip: u32) -> Option<u32> {
            let b = ip.to_ne_bytes();
            (b[..3] == [10, 244, 2]).then(|| u32::from_ne_bytes(PEER))
        }
        fn local_pod(&self, ip: u32) -> bool {
            ip == u32::from_ne_bytes(POD)
        }
        fn neighbour_is(&self, _ip: u32, mac: &[u8; 6]) -> bool {
            *mac == self.strict_mac
        }
        fn known_vtep6(&self, ip: &[u8; 16]) -> bool {
            *ip == PEER6
        }
        fn lease_node6(&self, ip: &[u8; 16]) -> Option<[u8; 16]> {
            (ip[..8] == PEER_POD6[..8]).then_some(PEER6)
        }
        fn local_pod6(&self, ip: &[u8; 16]) -> bool {
            *ip == POD6
        }
        fn neighbour_is6(&self, _ip: &[u8; 16], mac: &[u8; 6]) -> bool {
            *mac == self.strict_mac
        }
    }

    const NODE6: [u8; 16] = [0xfd, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const PEER6: [u8; 16] = [0xfd, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const STRANGER6: [u8; 16] = [0xfd, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 99];
    const VTEP6_MAC: [u8; 6] = [2, 0x66, 0, 0, 6, 1];
    const POD6: [u8; 16] = [0xfd, 0, 0, 0x10, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5];
    const PEER_POD6: [u8; 16] = [0xfd, 0, 0, 0x10, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5];

    fn cfg6() -> Config {
        Config {
            node_ip6: NODE6,
            vtep6_mac: VTEP6_MAC,
            ..cfg()
        }
    }

    fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(&[next, 64]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(payload);
        h
    }

    /// VXLAN over IPv6 from PEER6 to NODE6 carrying `inner_src -> inner_dst`
    /// (UDP checksum not zero; its value is not judged).
    fn frame6(inner_src: [u8; 16], inner_dst: [u8; 16], payload: usize) -> Vec<u8> {
        let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        vx.extend_from_slice(&VTEP6_MAC);
        vx.extend_from_slice(&[2, 0x66, 0, 0, 6, 2, 0x86, 0xdd]);
        vx.extend_from_slice(&ipv6(inner_src, inner_dst, 17, &vec![0u8; payload]));
        let mut udp = vec![0x9c, 0x40, 0x12, 0xb5];
        udp.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0x12, 0x34]);
        udp.extend_from_slice(&vx);
        let mut f = UPLINK_MAC.to_vec();
        f.extend_from_slice(&PEER_MAC);
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&ipv6(PEER6, NODE6, 17, &udp));
        f
    }

    fn good6() -> Vec<u8> {
        frame6(PEER_POD6, POD6, 16)
    }

    fn edited6(edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
        let mut f = good6();
        edit(&mut f);
        f
    }

    fn cfg() -> Config {
        Config {
            vni: 1,
            udp_port: 4789,
            node_ip: u32::from_ne_bytes(NODE),
            inner_mtu: 1450,
            flags: crate::CONFIG_F_READY,
            vtep_mac: VTEP_MAC,
            uplink_mac: UPLINK_MAC,
            ..Default::default()
        }
    }

    fn csum(h: &mut [u8]) {
        h[10] = 0;
        h[11] = 0;
        let mut sum: u32 = h
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, proto, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        csum(&mut h);
        h.extend_from_slice(payload);
        h
    }

    /// A VXLAN frame from PEER to NODE carrying `inner_src -> inner_dst`.
    fn frame(inner_src: [u8; 4], inner_dst: [u8; 4], payload: usize) -> Vec<u8> {
        let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        vx.extend_from_slice(&VTEP_MAC);
        vx.extend_from_slice(&[2, 0x66, 0, 0, 0, 2, 0x08, 0x00]);
        vx.extend_from_slice(&ipv4(inner_src, inner_dst, 17, &vec![0u8; payload]));
        let mut udp = vec![0x9c, 0x40, 0x12, 0xb5];
        udp.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&vx);
        let mut f = UPLINK_MAC.to_vec();
        f.extend_from_slice(&PEER_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&ipv4(PEER, NODE, 17, &udp));
        f
    }

    fn good() -> Vec<u8> {
        frame(PEER_POD, POD, 16)
    }

    fn run(f: &[u8]) -> Verdict {
        run_with(f, &cfg(), 0)
    }

    fn run_with(f: &[u8], c: &Config, gso: u32) -> Verdict {
        classify(
            f,
            c,
            &Fake {
                strict_mac: PEER_MAC,
            },
            gso,
        )
    }

    fn name(v: Verdict) -> &'static str {
        NAMES[v.reason as usize]
    }

    /// `f` with `edit` applied, the outer (or, `inner`, the inner) IPv4
    /// checksum recomputed.
    fn edited(edit: impl Fn(&mut Vec<u8>), fix: Option<usize>) -> Vec<u8> {
        let mut f = good();
        edit(&mut f);
        if let Some(at) = fix {
            csum(&mut f[at..at + 20]);
        }
        f
    }

    #[test]
    fn a_valid_frame_is_decapsulated() {
        assert_eq!(run(&good()), verdict(DECAP));
    }

    #[test]
    fn every_crafted_frame_gets_its_reason() {
        let o = Some(OUTER_IP);
        let i = Some(INNER_IP);
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            (
                "IPv6",
                edited(|f| f[12..14].copy_from_slice(&[0x86, 0xdd]), None),
                PASS_NOT_IPV4,
            ),
            (
                "outer version 6",
                edited(|f| f[14] = 0x65, o),
                PASS_MALFORMED,
            ),
            ("outer IHL 4", edited(|f| f[14] = 0x44, o), PASS_MALFORMED),
            ("other MAC", edited(|f| f[0] = 4, None), PASS_OTHER_HOST),
            (
                "broadcast MAC",
                edited(|f| f[0..6].copy_from_slice(&[0xff; 6]), None),
                PASS_OTHER_HOST,
            ),
            ("other IP", edited(|f| f[33] = 7, o), PASS_OTHER_HOST),
            ("options", edited(|f| f[14] = 0x46, o), PASS_IP_OPTIONS),
            ("more fragments", edited(|f| f[20] = 0x20, o), PASS_FRAGMENT),
            ("fragment offset", edited(|f| f[21] = 1, o), PASS_FRAGMENT),
            ("TCP", edited(|f| f[23] = 6, o), PASS_NOT_VXLAN),
            ("other port", edited(|f| f[37] = 0xb6, None), PASS_NOT_VXLAN),
            (
                "UDP length 8",
                edited(|f| f[38..40].copy_from_slice(&8u16.to_be_bytes()), None),
                DROP_BAD_LENGTH,
            ),
            (
                "UDP length past IP",
                edited(|f| f[38..40].copy_from_slice(&2000u16.to_be_bytes()), None),
                DROP_BAD_LENGTH,
            ),
            (
                "IP length 28",
                edited(|f| f[16..18].copy_from_slice(&28u16.to_be_bytes()), o),
                DROP_BAD_LENGTH,
            ),
            (
                "IP length past frame",
                edited(|f| f[16..18].copy_from_slice(&3000u16.to_be_bytes()), o),
                DROP_BAD_LENGTH,
            ),
            (
                "outer checksum",
                edited(|f| f[24] ^= 1, None),
                DROP_BAD_CHECKSUM,
            ),
            ("I flag clear", edited(|f| f[42] = 0, None), DROP_BAD_FLAGS),
            ("flags 0xff", edited(|f| f[42] = 0xff, None), DROP_BAD_FLAGS),
            (
                "reserved after flags",
                edited(|f| f[44] = 1, None),
                DROP_BAD_FLAGS,
            ),
            (
                "reserved after VNI",
                edited(|f| f[49] = 1, None),
                DROP_BAD_FLAGS,
            ),
            ("other VNI", edited(|f| f[48] = 2, None), PASS_WRONG_VNI),
            (
                "stranger",
                edited(|f| f[26..30].copy_from_slice(&STRANGER), o),
                DROP_UNKNOWN_VTEP,
            ),
            (
                "inner ARP",
                edited(|f| f[62..64].copy_from_slice(&[8, 6]), None),
                PASS_INNER_NOT_IPV4,
            ),
            ("inner MAC", edited(|f| f[50] = 4, None), DROP_INNER_MAC),
            (
                "inner broadcast",
                edited(|f| f[50..56].copy_from_slice(&[0xff; 6]), None),
                DROP_INNER_MAC,
            ),
            (
                "inner version 6",
                edited(|f| f[64] = 0x65, i),
                DROP_INNER_MALFORMED,
            ),
            (
                "inner options",
                edited(|f| f[64] = 0x46, i),
                PASS_IP_OPTIONS,
            ),
            (
                "inner length 10",
                edited(|f| f[66..68].copy_from_slice(&10u16.to_be_bytes()), i),
                DROP_INNER_MALFORMED,
            ),
            (
                "inner length past outer",
                edited(|f| f[66..68].copy_from_slice(&900u16.to_be_bytes()), i),
                DROP_INNER_MALFORMED,
            ),
            (
                "inner checksum",
                edited(|f| f[75] ^= 1, None),
                DROP_INNER_MALFORMED,
            ),
            (
                "inner source 8.8.8.8",
                frame([8, 8, 8, 8], POD, 16),
                DROP_INNER_SOURCE,
            ),
            (
                "inner source local",
                frame([10, 244, 1, 9], POD, 16),
                DROP_INNER_SOURCE,
            ),
            (
                "not local",
                frame(PEER_POD, [10, 244, 1, 6], 16),
                PASS_NOT_LOCAL,
            ),
            ("too big", frame(PEER_POD, POD, 1500), PASS_TOO_BIG),
            (
                "UDP checksum, not verified",
                edited(|f| f[41] = 1, None),
                DECAP,
            ),
        ];
        for (what, f, want) in &cases {
            let v = run(f);
            assert_eq!(name(v), NAMES[*want as usize], "{what}");
            assert_eq!(v.action, ACTIONS[*want as usize], "{what}");
        }
        // Every reason but those the caller decides is reachable here.
        for r in 0..COUNT {
            let covered = r == DECAP
                || cases.iter().any(|c| c.2 == r)
                || [PASS_NO_CONFIG, DROP_SOURCE_MAC, DROP_ADJUST_FAILED].contains(&r)
                // VXLAN over IPv6's own, covered below.
                || [DECAP6, PASS_INNER_NOT_IPV6].contains(&r);
            assert!(covered, "{} has no case", NAMES[r as usize]);
        }
    }

    /// VXLAN over IPv6: every check of `classify6`, each with its reason.
    #[test]
    fn every_crafted_ipv6_frame_gets_its_reason() {
        assert_eq!(run_with(&good6(), &cfg6(), 0), verdict(DECAP6));
        // Without IPv6 in the config, IPv6 is the kernel's.
        assert_eq!(run(&good6()), verdict(PASS_NOT_IPV4));
        let len = |at: usize, v: u16| {
            move |f: &mut Vec<u8>| f[at..at + 2].copy_from_slice(&v.to_be_bytes())
        };
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            ("outer version 4", edited6(|f| f[14] = 0x45), PASS_MALFORMED),
            ("other MAC", edited6(|f| f[0] = 4), PASS_OTHER_HOST),
            ("other IP", edited6(|f| f[53] = 7), PASS_OTHER_HOST),
            (
                "hop-by-hop options",
                edited6(|f| f[20] = 0),
                PASS_IP_OPTIONS,
            ),
            ("routing header", edited6(|f| f[20] = 43), PASS_IP_OPTIONS),
            (
                "destination options",
                edited6(|f| f[20] = 60),
                PASS_IP_OPTIONS,
            ),
            ("fragment", edited6(|f| f[20] = 44), PASS_FRAGMENT),
            ("TCP", edited6(|f| f[20] = 6), PASS_NOT_VXLAN),
            ("other port", edited6(|f| f[57] = 0xb6), PASS_NOT_VXLAN),
            ("UDP length 8", edited6(len(58, 8)), DROP_BAD_LENGTH),
            (
                "UDP length past IP",
                edited6(len(58, 2000)),
                DROP_BAD_LENGTH,
            ),
            ("payload length 20", edited6(len(18, 20)), DROP_BAD_LENGTH),
            (
                "payload length past frame",
                edited6(len(18, 3000)),
                DROP_BAD_LENGTH,
            ),
            ("zero UDP checksum", edited6(len(60, 0)), DROP_BAD_CHECKSUM),
            ("I flag clear", edited6(|f| f[62] = 0), DROP_BAD_FLAGS),
            ("reserved after VNI", edited6(|f| f[69] = 1), DROP_BAD_FLAGS),
            ("other VNI", edited6(|f| f[68] = 2), PASS_WRONG_VNI),
            (
                "stranger",
                edited6(|f| f[22..38].copy_from_slice(&STRANGER6)),
                DROP_UNKNOWN_VTEP,
            ),
            (
                "inner IPv4",
                edited6(|f| f[82..84].copy_from_slice(&[8, 0])),
                PASS_INNER_NOT_IPV6,
            ),
            ("inner MAC", edited6(|f| f[70] = 4), DROP_INNER_MAC),
            (
                "inner version 4",
                edited6(|f| f[84] = 0x45),
                DROP_INNER_MALFORMED,
            ),
            (
                "inner length past outer",
                edited6(len(88, 900)),
                DROP_INNER_MALFORMED,
            ),
            (
                "inner source outside the lease",
                frame6(STRANGER6, POD6, 16),
                DROP_INNER_SOURCE,
            ),
            (
                "inner source local",
                frame6(POD6, POD6, 16),
                DROP_INNER_SOURCE,
            ),
            (
                "not local",
                frame6(PEER_POD6, PEER_POD6, 16),
                PASS_NOT_LOCAL,
            ),
            ("too big", frame6(PEER_POD6, POD6, 1411), PASS_TOO_BIG),
            (
                "UDP checksum, not verified",
                edited6(|f| f[61] ^= 1),
                DECAP6,
            ),
        ];
        for (what, f, want) in &cases {
            let v = run_with(f, &cfg6(), 0);
            assert_eq!(name(v), NAMES[*want as usize], "{what}");
        }
        // The largest inner packet that fits the pod MTU decapsulates.
        assert_eq!(
            run_with(&frame6(PEER_POD6, POD6, 1410), &cfg6(), 0),
            verdict(DECAP6)
        );
        // GSO: by segment size (IPv6 and TCP headers: 60 bytes).
        assert_eq!(run_with(&good6(), &cfg6(), 1390).reason, DECAP6);
        assert_eq!(run_with(&good6(), &cfg6(), 1391).reason, PASS_TOO_BIG);
        // Strict source: the outer source MAC must be the neighbour's.
        let mut c = cfg6();
        c.flags |= crate::CONFIG_F_STRICT_SOURCE;
        assert_eq!(run_with(&good6(), &c, 0).reason, DECAP6);
        let f = edited6(|f| f[6] = 6);
        assert_eq!(run_with(&f, &c, 0).reason, DROP_SOURCE_MAC);
        // Cut anywhere: never decapsulated.
        let whole = good6();
        for cut in 0..whole.len() {
            let v = run_with(&whole[..cut], &cfg6(), 0);
            let want = if cut < OUTER_UDP6 + 8 {
                PASS_MALFORMED
            } else {
                DROP_BAD_LENGTH
            };
            assert_eq!(name(v), NAMES[want as usize], "cut at {cut}");
        }
    }

    #[test]
    fn truncation_at_every_length_never_decapsulates() {
        let f = good();
        for cut in 0..f.len() {
            let v = run(&f[..cut]);
            let want = match cut {
                0..=33 => PASS_MALFORMED,
                34..=41 => PASS_MALFORMED,
                _ => DROP_BAD_LENGTH,
            };
            assert_eq!(name(v), NAMES[want as usize], "cut at {cut}");
        }
    }

    #[test]
    fn gso_packets_are_judged_by_their_segment_size() {
        let f = good();
        assert_eq!(run_with(&f, &cfg(), 1400).reason, DECAP);
        assert_eq!(run_with(&f, &cfg(), 1411).reason, PASS_TOO_BIG);
    }

    #[test]
    fn strict_source_checks_the_neighbour_mac() {
        let mut c = cfg();
        c.flags |= crate::CONFIG_F_STRICT_SOURCE;
        assert_eq!(run_with(&good(), &c, 0).reason, DECAP);
        let mut f = good();
        f[6] = 6;
        assert_eq!(run_with(&f, &c, 0).reason, DROP_SOURCE_MAC);
        assert_eq!(run_with(&f, &cfg(), 0).reason, DECAP, "off by default");
    }

    /// `Fake`, counting how often the VTEP set is asked.
    struct Counting(Fake, core::cell::Cell<u32>);

    impl Tables for Counting {
        fn known_vtep(&self, ip: u32) -> bool {
            self.1.set(self.1.get() + 1);
            self.0.known_vtep(ip)
        }
        fn lease_node(&self, ip: u32) -> Option<u32> {
            self.0.lease_node(ip)
        }
        fn local_pod(&self, ip: u32) -> bool {
            self.0.local_pod(ip)
        }
        fn neighbour_is(&self, ip: u32, mac: &[u8; 6]) -> bool {
            self.0.neighbour_is(ip, mac)
        }
        fn known_vtep6(&self, ip: &[u8; 16]) -> bool {
            self.1.set(self.1.get() + 1);
            self.0.known_vtep6(ip)
        }
        fn lease_node6(&self, ip: &[u8; 16]) -> Option<[u8; 16]> {
            self.0.lease_node6(ip)
        }
        fn local_pod6(&self, ip: &[u8; 16]) -> bool {
            self.0.local_pod6(ip)
        }
        fn neighbour_is6(&self, ip: &[u8; 16], mac: &[u8; 6]) -> bool {
            self.0.neighbour_is6(ip, mac)
        }
    }

    /// The verdict and how many VTEP lookups it took.
    fn counted(f: &[u8], c: &Config) -> (u32, u32) {
        let t = Counting(
            Fake {
                strict_mac: PEER_MAC,
            },
            Default::default(),
        );
        (classify(f, c, &t, 0).reason, t.1.get())
    }

    #[test]
    fn the_vtep_set_is_asked_only_of_what_is_not_taken() {
        let (c, c6) = (cfg(), cfg6());
        assert_eq!(counted(&good(), &c), (DECAP, 0));
        assert_eq!(counted(&good6(), &c6), (DECAP6, 0));
        let not_local = frame(PEER_POD, [10, 244, 1, 6], 16);
        assert_eq!(counted(&not_local, &c), (PASS_NOT_LOCAL, 1));
        // From a stranger, whatever else is wrong, the verdict is the one
        // asking first would give.
        let from = |src: [u8; 4], edit: &dyn Fn(&mut Vec<u8>)| {
            let mut f = good();
            f[OUTER_IP + 12..OUTER_IP + 16].copy_from_slice(&src);
            edit(&mut f);
            csum(&mut f[OUTER_IP..OUTER_IP + 20]);
            f
        };
        let mut strict = cfg();
        strict.flags |= crate::CONFIG_F_STRICT_SOURCE;
        for (what, f, c) in [
            ("valid inner", from(STRANGER, &|_| {}), &c),
            (
                "inner version 5",
                from(STRANGER, &|f| f[INNER_IP] = 0x55),
                &c,
            ),
            ("inner MAC", from(STRANGER, &|f| f[INNER_ETH] ^= 1), &c),
            (
                "inner not IPv4",
                from(STRANGER, &|f| f[INNER_IP - 1] = 0),
                &c,
            ),
            ("source MAC", from(STRANGER, &|f| f[6] = 6), &strict),
        ] {
            assert_eq!(
                counted(&f, c),
                (DROP_UNKNOWN_VTEP, 1),
                "{what}: {}",
                name(run_with(&f, c, 0))
            );
        }
        // The same frames from the peer get their own reasons.
        let f = from(PEER, &|f| f[INNER_IP] = 0x55);
        assert_eq!(counted(&f, &c), (DROP_INNER_MALFORMED, 1));
        let mut f6 = good6();
        f6[OUTER_IP + 8..OUTER_IP + 24].copy_from_slice(&STRANGER6);
        assert_eq!(counted(&f6, &c6), (DROP_UNKNOWN_VTEP, 1));
    }

    /// host-gw writes port 0: no UDP packet is VXLAN, not even one sent to
    /// port 0.
    #[test]
    fn port_zero_means_no_vxlan() {
        let mut f = good();
        f[OUTER_UDP + 2..OUTER_UDP + 4].copy_from_slice(&[0, 0]);
        let mut c = cfg();
        c.udp_port = 0;
        assert_eq!(counted(&f, &c), (PASS_NOT_VXLAN, 0));
        let mut f6 = good6();
        f6[OUTER_UDP6 + 2..OUTER_UDP6 + 4].copy_from_slice(&[0, 0]);
        let mut c6 = cfg6();
        c6.udp_port = 0;
        assert_eq!(counted(&f6, &c6), (PASS_NOT_VXLAN, 0));
    }

    #[test]
    fn reason_names_say_their_action() {
        for r in 0..COUNT as usize {
            let want = match NAMES[r].split('_').next() {
                Some("drop") => Action::Drop,
                Some("pass") => Action::Pass,
                _ => Action::Decap,
            };
            assert_eq!(ACTIONS[r], want, "{}", NAMES[r]);
        }
    }
}

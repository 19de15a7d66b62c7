//! Bounds-checked packet access for XDP and the VXLAN header block that
//! `tc_from_pod` writes in front of a pod packet.

use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use flannel_common::{Config, RemoteNode};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr, vxlan::VxlanHdr};

/// `ETH_P_IP` as it appears in a packet read into a native-endian `u16`.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_ARP_BE: u16 = 0x0806u16.to_be();
pub const IPPROTO_UDP: u8 = 17;

/// Offsets in a VXLAN frame whose outer IPv4 header has no options.
pub const OUTER_IP: usize = EthHdr::LEN;
pub const OUTER_UDP: usize = OUTER_IP + Ipv4Hdr::LEN;
pub const VXLAN: usize = OUTER_UDP + UdpHdr::LEN;
pub const INNER_ETH: usize = VXLAN + VxlanHdr::LEN;
pub const INNER_IP: usize = INNER_ETH + EthHdr::LEN;

/// Everything `tc_from_pod` writes in front of the inner IPv4 header.
pub const HEADERS_LEN: usize = INNER_IP;

/// A linear packet `[start, end)`; every access checks its bounds first so
/// that the verifier (and a truncated packet) can never read past the end.
pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    pub fn get<T>(&self, offset: usize) -> Option<*const T> {
        self.get_mut(offset).map(|p| p as *const T)
    }

    #[inline(always)]
    pub fn get_mut<T>(&self, offset: usize) -> Option<*mut T> {
        let at = self.start + offset;
        if at + core::mem::size_of::<T>() > self.end {
            return None;
        }
        Some(at as *mut T)
    }
}

/// One's-complement checksum of a 20-byte IPv4 header.
#[inline(always)]
pub fn ip_checksum(hdr: &[u8; Ipv4Hdr::LEN]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < Ipv4Hdr::LEN {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Outer Ethernet + IPv4 + UDP + VXLAN + inner Ethernet, as bytes.
pub struct Headers;

impl Headers {
    /// The block Flannel's VXLAN device puts in front of an inner IPv4
    /// packet. `outer_len` is the outer IPv4 total length.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn vxlan(
        cfg: &Config,
        remote: &RemoteNode,
        fib: &FibParams,
        neigh_resolved: bool,
        outer_len: u16,
        ip_id: u16,
        sport: u16,
        ttl: u8,
    ) -> [u8; HEADERS_LEN] {
        let mut h = [0u8; HEADERS_LEN];
        // Outer Ethernet. Without a resolved neighbour the kernel fills it.
        if neigh_resolved {
            h[0..6].copy_from_slice(&fib.dmac);
            h[6..12].copy_from_slice(&fib.smac);
        } else {
            h[6..12].copy_from_slice(&cfg.uplink_mac);
        }
        h[12] = 0x08;
        // Outer IPv4: no options, no DF (as the kernel's VXLAN default).
        let ip = OUTER_IP;
        h[ip] = 0x45;
        h[ip + 2..ip + 4].copy_from_slice(&outer_len.to_be_bytes());
        h[ip + 4..ip + 6].copy_from_slice(&ip_id.to_be_bytes());
        h[ip + 8] = ttl;
        h[ip + 9] = IPPROTO_UDP;
        h[ip + 12..ip + 16].copy_from_slice(&cfg.node_ip.to_ne_bytes());
        h[ip + 16..ip + 20].copy_from_slice(&remote.node_ip.to_ne_bytes());
        let mut iph = [0u8; Ipv4Hdr::LEN];
        iph.copy_from_slice(&h[ip..ip + Ipv4Hdr::LEN]);
        h[ip + 10..ip + 12].copy_from_slice(&ip_checksum(&iph).to_be_bytes());
        // UDP, checksum zero as the kernel sends VXLAN over IPv4 by default.
        let udp = OUTER_UDP;
        let udp_len = outer_len - Ipv4Hdr::LEN as u16;
        h[udp..udp + 2].copy_from_slice(&sport.to_be_bytes());
        h[udp + 2..udp + 4].copy_from_slice(&cfg.udp_port.to_be_bytes());
        h[udp + 4..udp + 6].copy_from_slice(&udp_len.to_be_bytes());
        // VXLAN: I flag, 24-bit VNI.
        h[VXLAN] = 0x08;
        let vni = cfg.vni.to_be_bytes();
        h[VXLAN + 4..VXLAN + 7].copy_from_slice(&vni[1..4]);
        // Inner Ethernet: our VTEP to theirs.
        h[INNER_ETH..INNER_ETH + 6].copy_from_slice(&remote.vtep_mac);
        h[INNER_ETH + 6..INNER_ETH + 12].copy_from_slice(&cfg.vtep_mac);
        h[INNER_ETH + 12] = 0x08;
        h
    }
}

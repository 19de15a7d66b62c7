//! Bounds-checked packet access for XDP and the VXLAN header block that
//! `tc_from_pod` writes in front of a pod packet.

use flannel_common::{csum, Config, NextHop, RemoteNode, VXLAN_HEADERS_LEN};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr, vxlan::VxlanHdr};

/// `ETH_P_IP` as it appears in a packet read into a native-endian `u16`.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_ARP_BE: u16 = 0x0806u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// The fixed IPv6 header.
pub const IPV6_HDR_LEN: usize = 40;
pub const IPPROTO_UDP: u8 = 17;

/// Offsets in a VXLAN frame whose outer IPv4 header has no options.
pub const OUTER_IP: usize = EthHdr::LEN;
pub const OUTER_UDP: usize = OUTER_IP + Ipv4Hdr::LEN;
pub const VXLAN: usize = OUTER_UDP + UdpHdr::LEN;
pub const INNER_ETH: usize = VXLAN + VxlanHdr::LEN;
pub const INNER_IP: usize = INNER_ETH + EthHdr::LEN;

/// Everything `tc_from_pod` writes in front of the inner IPv4 header.
pub const HEADERS_LEN: usize = INNER_IP;
const _: () = assert!(HEADERS_LEN == VXLAN_HEADERS_LEN);

/// The outer TTL, as the kernel's VXLAN device sets it by default.
pub const OUTER_TTL: u8 = 64;

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

    /// A copy of the `T` at `offset`, if the packet holds all of it.
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let p = self.get::<T>(offset)?;
        // SAFETY: `get` checked that the bytes lie inside the packet.
        Some(unsafe { core::ptr::read_unaligned(p) })
    }

    /// The `N` bytes at `offset`, if the packet holds them all, read with
    /// 64-, 32- and 16-bit loads (a plain copy is compiled to a load per
    /// byte, the packet's alignment being unknown to the compiler; the
    /// kernel allows unaligned packet loads where these programs run).
    #[inline(always)]
    pub fn read_words<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let p = self.get::<[u8; N]>(offset)? as *const u8;
        #[repr(C, align(8))]
        struct Buf<const N: usize>([u8; N]);
        let mut out = Buf([0u8; N]);
        let o = out.0.as_mut_ptr();
        let mut i = 0;
        // Loads as many `$ty`s as fit from `p + i` into `out`.
        macro_rules! words {
            ($ty:ty, $load:literal) => {
                while i + core::mem::size_of::<$ty>() <= N {
                    let v: u64;
                    // SAFETY: `get` checked the `N` bytes from `p`; `out`
                    // is 8-aligned, so the store is aligned.
                    unsafe {
                        core::arch::asm!(
                            $load,
                            v = out(reg) v,
                            p = in(reg) p.add(i),
                            options(nostack, preserves_flags, readonly),
                        );
                        (o.add(i) as *mut $ty).write(v as $ty);
                    }
                    i += core::mem::size_of::<$ty>();
                }
            };
        }
        words!(u64, "{v} = *(u64 *)({p} + 0)");
        words!(u32, "{v} = *(u32 *)({p} + 0)");
        words!(u16, "{v} = *(u16 *)({p} + 0)");
        if i < N {
            // SAFETY: as above.
            unsafe { *o.add(i) = *p.add(i) };
        }
        Some(out.0)
    }

    /// The IPv4 header at `offset`, read as `read_words` reads.
    #[inline(always)]
    pub fn read_ipv4(&self, offset: usize) -> Option<Ipv4Hdr> {
        const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == Ipv4Hdr::LEN);
        // SAFETY: `Ipv4Hdr` is 20 bytes of byte fields: any bytes make one.
        self.read_words::<{ Ipv4Hdr::LEN }>(offset)
            .map(|b| unsafe { core::mem::transmute::<[u8; Ipv4Hdr::LEN], Ipv4Hdr>(b) })
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
    /// packet, as a template: `dmac` is the next hop's MAC (zero when the
    /// kernel is to resolve it and fill it), and the per-packet fields
    /// (outer total length, identification, UDP source port and length)
    /// are zero, the IPv4 checksum being that of this form. `fill` completes
    /// a copy in the packet.
    #[inline(always)]
    pub fn vxlan(
        cfg: &Config,
        remote: &RemoteNode,
        dmac: &[u8; 6],
        smac: &[u8; 6],
    ) -> [u8; HEADERS_LEN] {
        let mut h = [0u8; HEADERS_LEN];
        // Outer Ethernet. Without a resolved neighbour the kernel fills it.
        h[0..6].copy_from_slice(dmac);
        h[6..12].copy_from_slice(smac);
        h[12] = 0x08;
        // Outer IPv4: no options, no DF (as the kernel's VXLAN default).
        let ip = OUTER_IP;
        h[ip] = 0x45;
        h[ip + 8] = OUTER_TTL;
        h[ip + 9] = IPPROTO_UDP;
        h[ip + 12..ip + 16].copy_from_slice(&cfg.node_ip.to_ne_bytes());
        h[ip + 16..ip + 20].copy_from_slice(&remote.node_ip.to_ne_bytes());
        let mut iph = [0u8; Ipv4Hdr::LEN];
        iph.copy_from_slice(&h[ip..ip + Ipv4Hdr::LEN]);
        h[ip + 10..ip + 12].copy_from_slice(&ip_checksum(&iph).to_be_bytes());
        // UDP, checksum zero as the kernel sends VXLAN over IPv4 by default.
        let udp = OUTER_UDP;
        h[udp + 2..udp + 4].copy_from_slice(&cfg.udp_port.to_be_bytes());
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

    /// Whether a cached hop's template still says what `vxlan` would
    /// build now for `remote` (the next hop's MACs aside, which the cache's
    /// age bounds; the outer destination is the hop's own `node_ip`, which
    /// the caller compares). Read in 16-bit words, all at even offsets of
    /// the 8-aligned template (see the layout assertions by `NextHop`).
    #[inline(always)]
    pub fn current(hop: &NextHop, cfg: &Config, remote: &RemoteNode) -> bool {
        let h = hop.headers.as_ptr() as *const u16;
        // SAFETY: every offset below is even and inside the template.
        let w = |i: usize| u64::from(unsafe { h.add(i / 2).read() });
        let w32 = |i: usize| (w(i) | w(i + 2) << 16) as u32;
        let w48 = |i: usize| w(i) | w(i + 2) << 16 | w(i + 4) << 32;
        w32(OUTER_IP + 12) == cfg.node_ip
            && w(OUTER_UDP + 2) == u64::from(cfg.udp_port.to_be())
            // The VNI's three bytes and the reserved zero after them.
            && w32(VXLAN + 4) == (cfg.vni << 8).to_be()
            // SAFETY: both MACs are 2-aligned (the assertions by `NextHop`).
            && w48(INNER_ETH) == unsafe { mac48(&remote.vtep_mac) }
            && w48(INNER_ETH + 6) == unsafe { mac48(&cfg.vtep_mac) }
    }

    /// Completes a template written at the start of `out`: the outer
    /// lengths (`outer_len` is the outer IPv4 total length), identification
    /// and UDP source port, and the checksum updated for them.
    #[inline(always)]
    pub fn fill(out: *mut u8, outer_len: u16, ip_id: u16, sport: u16) {
        let ip = OUTER_IP;
        let udp = OUTER_UDP;
        // SAFETY: the caller holds `out` as HEADERS_LEN checked packet bytes.
        unsafe {
            let check = u16::from_be_bytes([*out.add(ip + 10), *out.add(ip + 11)]);
            let check = csum::replace16(csum::replace16(check, 0, outer_len), 0, ip_id);
            put16(out.add(ip + 2), outer_len);
            put16(out.add(ip + 4), ip_id);
            put16(out.add(ip + 10), check);
            put16(out.add(udp), sport);
            put16(out.add(udp + 4), outer_len - Ipv4Hdr::LEN as u16);
        }
    }
}

/// A MAC address as the 48-bit number its bytes make in memory order.
///
/// # Safety
/// `mac` must be 2-aligned, as the MACs in `Config` and `RemoteNode` are.
#[inline(always)]
unsafe fn mac48(mac: &[u8; 6]) -> u64 {
    let p = mac.as_ptr() as *const u16;
    // SAFETY: three 16-bit words of the six bytes, at a 2-aligned address.
    let w = |i: usize| u64::from(unsafe { p.add(i).read() });
    w(0) | w(1) << 16 | w(2) << 32
}

/// Copies a next hop's template (8-aligned in `NextHop`) to the start
/// of the packet, eight bytes at a time: one 64-bit store per word where a
/// plain copy would be compiled to a store per byte (the packet's alignment
/// is unknown to the compiler, while the kernel allows unaligned packet
/// stores on the architectures it runs these programs on).
///
/// # Safety
/// `out` must hold `HEADERS_LEN` checked packet bytes.
#[inline(always)]
pub unsafe fn copy_template(out: *mut u8, hop: &NextHop) {
    let src = hop.headers.as_ptr() as *const u64;
    let mut i = 0;
    while i < HEADERS_LEN / 8 {
        unsafe {
            let v = src.add(i).read();
            core::arch::asm!(
                "*(u64 *)({p} + 0) = {v}",
                p = in(reg) out.add(i * 8),
                v = in(reg) v,
                options(nostack, preserves_flags),
            );
        }
        i += 1;
    }
}

/// Writes `v` big-endian at `p`.
///
/// # Safety
/// `p` and `p + 1` must be writable packet bytes.
#[inline(always)]
pub unsafe fn put16(p: *mut u8, v: u16) {
    let b = v.to_be_bytes();
    unsafe {
        *p = b[0];
        *p.add(1) = b[1];
    }
}

//! Header arithmetic the programs do in place, without a helper call, and
//! that the host can test: incremental checksum updates, the outer UDP
//! checksum of VXLAN over IPv6, and the flow hash behind the outer UDP
//! source port.

/// RFC 1624 (eqn. 3): the one's-complement checksum `check` after one
/// 16-bit word of what it covers changes from `old` to `new`. All three
/// as read big-endian from the packet.
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The IPv4 header checksum after the TTL drops by one: `ttl_proto` is
/// the header's 9th and 10th bytes (TTL, protocol) as read big-endian.
#[inline(always)]
pub const fn ttl_decremented(check: u16, ttl_proto: u16) -> u16 {
    replace16(check, ttl_proto, ttl_proto.wrapping_sub(0x100))
}

/// `acc` plus `b[from..to]` as big-endian 16-bit words (`to - from`
/// even), not folded.
#[inline(always)]
pub const fn sum16<const N: usize>(b: &[u8; N], from: usize, to: usize, acc: u32) -> u32 {
    let mut sum = acc;
    let mut i = from;
    while i + 1 < to {
        sum += ((b[i] as u32) << 8) | b[i + 1] as u32;
        i += 2;
    }
    sum
}

/// A one's-complement sum folded to 16 bits.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The part of a VXLAN-over-IPv6 datagram [`vxlan6_udp_check`] reads: the
/// UDP header, VXLAN header, inner Ethernet and inner IPv6 header.
pub const VXLAN6_BLOCK: usize = 70;
/// Where the inner IPv6 header starts in that block.
pub const VXLAN6_INNER_IP: usize = 30;

/// The outer UDP checksum of VXLAN over IPv6 from `src` to `dst`, whose
/// datagram starts with `block` (the UDP header with checksum zero, the
/// VXLAN header, the inner Ethernet and the inner IPv6 header), computed
/// from those headers only. The inner packet's upper-layer header (TCP,
/// UDP or ICMPv6, right after its IPv6 header) carries a checksum over
/// everything after the IPv6 header and the inner pseudo-header; when that
/// checksum is valid, or is made valid later by checksum offload, that
/// part sums to the complement of the inner pseudo-header's sum, whatever
/// the payload (the kernel's "local checksum offload"). So the payload is
/// never read, and one formula serves a packet whose inner checksum is
/// already final and one whose offload is still pending.
#[inline(always)]
pub const fn vxlan6_udp_check(src: &[u8; 16], dst: &[u8; 16], block: &[u8; VXLAN6_BLOCK]) -> u16 {
    let udp_len = ((block[4] as u32) << 8) | block[5] as u32;
    // The outer pseudo-header: addresses, UDP length, next header 17.
    let mut sum = sum16(src, 0, 16, 0);
    sum = sum16(dst, 0, 16, sum);
    sum += udp_len + 17;
    sum = sum16(block, 0, VXLAN6_BLOCK, sum);
    // The inner pseudo-header: addresses, payload length, next header.
    let ip = VXLAN6_INNER_IP;
    let mut inner = sum16(block, ip + 8, ip + 40, 0);
    inner += (((block[ip + 4] as u32) << 8) | block[ip + 5] as u32) + block[ip + 6] as u32;
    sum += !fold(inner) as u32;
    match !fold(sum) {
        // Zero means "no checksum" in UDP; the same value in one's
        // complement is all ones.
        0 => 0xffff,
        c => c,
    }
}

/// A 32-bit hash of a flow's addresses, L4 ports and protocol (MurmurHash3's
/// 64-bit finalizer over them), for packets the kernel gave no hash. Only
/// spreading matters: every packet of a flow gets the same outer source
/// port, and different flows spread over the range.
#[inline(always)]
pub const fn flow_hash(src: u32, dst: u32, ports: u32, proto: u8) -> u32 {
    let mut x =
        ((src as u64) << 32 | dst as u64) ^ ((ports as u64) << 8 | proto as u64).rotate_left(29);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeSet;

    use super::*;

    /// The checksum of a header, computed from scratch.
    fn full(h: &[u8; 20]) -> u16 {
        let mut sum = 0u32;
        for w in h.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn header(seed: u32, ttl: u8, proto: u8) -> [u8; 20] {
        let mut h = [0u8; 20];
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        for b in h.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        h[0] = 0x45;
        h[8] = ttl;
        h[9] = proto;
        h[10] = 0;
        h[11] = 0;
        let c = full(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn ttl_decrement_matches_a_full_recompute() {
        for seed in 0..200 {
            for ttl in 2..=255u8 {
                for proto in [1u8, 6, 17, 0xff, 0] {
                    let mut h = header(seed, ttl, proto);
                    let check = u16::from_be_bytes([h[10], h[11]]);
                    let got = ttl_decremented(check, u16::from_be_bytes([ttl, proto]));
                    h[8] = ttl - 1;
                    h[10] = 0;
                    h[11] = 0;
                    let want = full(&h);
                    // 0x0000 and 0xffff are the same one's-complement value;
                    // a receiver accepts both, but the kernel writes the
                    // recomputed form and so must we.
                    assert_eq!(got, want, "seed {seed} ttl {ttl} proto {proto}");
                }
            }
        }
    }

    #[test]
    fn replace16_updates_any_word() {
        for seed in 0..500u32 {
            let mut h = header(seed, 64, 6);
            let check = u16::from_be_bytes([h[10], h[11]]);
            // Any word but the checksum's own (bytes 10 and 11).
            let at = [0, 2, 4, 6, 8, 12, 14, 16, 18][seed as usize % 9];
            let old = u16::from_be_bytes([h[at], h[at + 1]]);
            let new = old.wrapping_mul(31).wrapping_add(seed as u16);
            h[at..at + 2].copy_from_slice(&new.to_be_bytes());
            h[10] = 0;
            h[11] = 0;
            assert_eq!(replace16(check, old, new), full(&h), "seed {seed}");
        }
    }

    /// A pseudo-random byte stream.
    fn bytes(seed: u32, n: usize) -> std::vec::Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// The Internet checksum of an IPv6 pseudo-header and `data`, from
    /// scratch (an odd byte padded with zero).
    fn checksum6(src: &[u8], dst: &[u8], next: u8, data: &[u8]) -> u16 {
        let mut sum = 0u64;
        let mut words = |b: &[u8]| {
            for w in b.chunks(2) {
                sum += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
            }
        };
        words(src);
        words(dst);
        words(&(data.len() as u32).to_be_bytes());
        words(&[0, 0, 0, next]);
        words(data);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Whole VXLAN-over-IPv6 datagrams carrying inner TCP, UDP and ICMPv6
    /// packets of every length class, with valid inner checksums: the
    /// header-only formula gives the checksum a full computation over the
    /// whole datagram gives, and a receiver verifying it finds it valid.
    #[test]
    fn vxlan6_check_matches_a_full_computation() {
        for seed in 0..300u32 {
            let (osrc, odst) = (bytes(seed, 16), bytes(seed + 7, 16));
            let (isrc, idst) = (bytes(seed + 11, 16), bytes(seed + 13, 16));
            let next = [6u8, 17, 58][seed as usize % 3];
            let payload_len = [0usize, 1, 7, 64, 1379, 1380][seed as usize % 6];
            // The inner upper-layer segment with its checksum made valid.
            let (hdr_len, check_at) = match next {
                6 => (20, 16),
                17 => (8, 6),
                _ => (8, 2),
            };
            let mut seg = bytes(seed + 17, hdr_len + payload_len);
            seg[check_at] = 0;
            seg[check_at + 1] = 0;
            if next == 17 {
                let len = seg.len() as u16;
                seg[4..6].copy_from_slice(&len.to_be_bytes());
            }
            let c = checksum6(&isrc, &idst, next, &seg);
            seg[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
            assert_eq!(checksum6(&isrc, &idst, next, &seg), 0);
            // The inner IPv6 header.
            let mut ip6 = std::vec![0x60, 0, 0, 0];
            ip6.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            ip6.extend_from_slice(&[next, 63]);
            ip6.extend_from_slice(&isrc);
            ip6.extend_from_slice(&idst);
            // UDP (checksum zero), VXLAN, inner Ethernet, inner IPv6.
            let mut dgram = std::vec::Vec::new();
            let udp_len = (8 + 8 + 14 + 40 + seg.len()) as u16;
            dgram.extend_from_slice(&bytes(seed + 19, 2));
            dgram.extend_from_slice(&4789u16.to_be_bytes());
            dgram.extend_from_slice(&udp_len.to_be_bytes());
            dgram.extend_from_slice(&[0, 0]);
            dgram.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]);
            dgram.extend_from_slice(&bytes(seed + 23, 12));
            dgram.extend_from_slice(&[0x86, 0xdd]);
            dgram.extend_from_slice(&ip6);
            let mut block = [0u8; VXLAN6_BLOCK];
            block.copy_from_slice(&dgram[..VXLAN6_BLOCK]);
            dgram.extend_from_slice(&seg);
            let src: [u8; 16] = osrc.clone().try_into().unwrap();
            let dst: [u8; 16] = odst.clone().try_into().unwrap();
            let got = vxlan6_udp_check(&src, &dst, &block);
            let want = match checksum6(&osrc, &odst, 17, &dgram) {
                0 => 0xffff,
                c => c,
            };
            assert_eq!(got, want, "seed {seed} next {next} payload {payload_len}");
            dgram[6..8].copy_from_slice(&got.to_be_bytes());
            assert_eq!(checksum6(&osrc, &odst, 17, &dgram), 0, "seed {seed}");
        }
    }

    #[test]
    fn flow_hash_is_stable_and_spreads() {
        let a = flow_hash(0x0a01_f40a, 0x0b02_f40a, 0x1234_5678, 6);
        assert_eq!(a, flow_hash(0x0a01_f40a, 0x0b02_f40a, 0x1234_5678, 6));
        // Each field changes it.
        assert_ne!(a, flow_hash(0x0a01_f40b, 0x0b02_f40a, 0x1234_5678, 6));
        assert_ne!(a, flow_hash(0x0a01_f40a, 0x0b02_f40b, 0x1234_5678, 6));
        assert_ne!(a, flow_hash(0x0a01_f40a, 0x0b02_f40a, 0x1234_5679, 6));
        assert_ne!(a, flow_hash(0x0a01_f40a, 0x0b02_f40a, 0x1234_5678, 17));
        // 1,000 flows that differ only in the client port land on nearly as
        // many outer source ports (as the VXLAN code scales the hash).
        let ports: BTreeSet<u32> = (0..1000u32)
            .map(|p| {
                let h = flow_hash(0x0a01_f40a, 0x0b02_f40a, (40_000 + p) << 16 | 5201, 6);
                ((u64::from(h) * 28_232) >> 32) as u32
            })
            .collect();
        assert!(ports.len() > 970, "{} distinct ports", ports.len());
    }
}

//! Header arithmetic the programs do in place, without a helper call, and
//! that the host can test: incremental checksum updates and the flow hash
//! behind the outer UDP source port.

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

//! A lease as etcd holds it (key, newline, value): Flannel's key format
//! (with or without the IPv6 part) and `LeaseAttrs` JSON. Never panics; an
//! accepted key and value survive a round trip.
#![no_main]
use flannel_agent::subnet::{decode_lease, parse_subnet_key, subnet_key, LeaseAttrs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let Ok(key) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let value = data.get(split + 1..).unwrap_or_default();
    if let Ok(Some((v4, v6, attrs))) = decode_lease(key, value) {
        assert_eq!(parse_subnet_key(&subnet_key(v4, v6)), Some((v4, v6)));
        let _ = attrs.vxlan_data();
        let _ = attrs.vxlan_v6_data();
        let again: LeaseAttrs =
            serde_json::from_slice(&serde_json::to_vec(&attrs).unwrap()).unwrap();
        assert_eq!(again, attrs);
    }
});

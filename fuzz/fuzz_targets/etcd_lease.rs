//! A lease as etcd holds it (key, newline, value): Flannel's key format and
//! `LeaseAttrs` JSON. Never panics; an accepted value survives a round trip.
#![no_main]
use flannel_agent::subnet::{decode_lease, LeaseAttrs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let Ok(key) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let value = data.get(split + 1..).unwrap_or_default();
    if let Ok(Some((_, attrs))) = decode_lease(key, value) {
        let _ = attrs.vxlan_data();
        let again: LeaseAttrs =
            serde_json::from_slice(&serde_json::to_vec(&attrs).unwrap()).unwrap();
        assert_eq!(again, attrs);
    }
});

//! The uplink's VXLAN decision (the code the XDP and TC programs run),
//! compiled for the host: never panics, never reads past the frame, and
//! decapsulates only what a valid VXLAN frame from a known node to a local
//! pod looks like, over IPv4 and (with IPv6 configured) over IPv6.
#![no_main]
use flannel_common::{
    decap::{classify, Action, Tables, DECAP6, INNER_IP, INNER_IP6},
    Config, CONFIG_F_READY,
};
use libfuzzer_sys::fuzz_target;

const NODE: [u8; 4] = [172, 30, 0, 1];
const PEER: [u8; 4] = [172, 30, 0, 2];
const NODE6: [u8; 16] = [0xfd, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const PEER6: [u8; 16] = [0xfd, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

struct Fixed;

impl Tables for Fixed {
    fn known_vtep(&self, ip: u32) -> bool {
        ip == u32::from_ne_bytes(PEER)
    }
    fn lease_node(&self, ip: u32) -> Option<u32> {
        (ip.to_ne_bytes()[..3] == [10, 244, 2]).then(|| u32::from_ne_bytes(PEER))
    }
    fn local_pod(&self, ip: u32) -> bool {
        ip.to_ne_bytes()[..3] == [10, 244, 1]
    }
    fn neighbour_is(&self, _ip: u32, mac: &[u8; 6]) -> bool {
        mac[0] & 1 == 0
    }
    fn known_vtep6(&self, ip: &[u8; 16]) -> bool {
        *ip == PEER6
    }
    fn lease_node6(&self, ip: &[u8; 16]) -> Option<[u8; 16]> {
        (ip[..8] == [0xfd, 0, 0, 0x10, 2, 0x44, 0, 2]).then_some(PEER6)
    }
    fn local_pod6(&self, ip: &[u8; 16]) -> bool {
        ip[..8] == [0xfd, 0, 0, 0x10, 2, 0x44, 0, 1]
    }
    fn neighbour_is6(&self, _ip: &[u8; 16], mac: &[u8; 6]) -> bool {
        mac[0] & 1 == 0
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the options; the rest is the frame.
    let Some((&opts, frame)) = data.split_first() else {
        return;
    };
    let cfg = Config {
        vni: 1,
        udp_port: 4789,
        node_ip: u32::from_ne_bytes(NODE),
        inner_mtu: 1450,
        flags: CONFIG_F_READY | u32::from(opts & 4),
        vtep_mac: [2, 0x66, 0, 0, 0, 1],
        uplink_mac: [2, 0, 0, 0, 0, 1],
        node_ip6: if opts & 16 != 0 { NODE6 } else { [0; 16] },
        vtep6_mac: [2, 0x66, 0, 0, 6, 1],
        ..Default::default()
    };
    let gso = if opts & 8 != 0 { 1400 } else { 0 };
    let v = classify(frame, &cfg, &Fixed, gso);
    if v.reason == DECAP6 {
        assert!(opts & 16 != 0);
        assert!(frame.len() >= INNER_IP6 + 40);
        assert_eq!(frame[..6], cfg.uplink_mac);
        assert_eq!(frame[12..14], [0x86, 0xdd]);
        assert_eq!(frame[22..38], PEER6);
        assert_eq!(frame[38..54], NODE6);
        assert_eq!(frame[62..70], [0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_ne!(frame[60..62], [0, 0]);
    } else if v.action == Action::Decap {
        assert!(frame.len() >= INNER_IP + 20);
        assert_eq!(frame[..6], cfg.uplink_mac);
        assert_eq!(frame[26..30], PEER);
        assert_eq!(frame[30..34], NODE);
        assert_eq!(frame[42..50], [0x08, 0, 0, 0, 0, 0, 1, 0]);
    }
});

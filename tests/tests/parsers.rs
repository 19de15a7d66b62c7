//! Crafted packets through `BPF_PROG_TEST_RUN` (aya `TestRun`): every parser
//! branch of the XDP and TC programs gets its verdict and its counter, and
//! the encapsulation is checked byte by byte against the VXLAN wire format.
//! Needs root (BPF) and runs in a network namespace it creates.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use flannel_common::{
    decap, programs, RemoteNode, RemoteNode6, CONFIG_F_NETFILTER, CONFIG_F_READY,
    CONFIG_F_STRICT_SOURCE, CONFIG_F_TC_DECAP, REMOTE_F_DIRECT, XDP_META_DECAPPED,
};
use flannel_tests::progtest::*;

#[test]
fn xdp_decapsulates_valid_vxlan_for_local_pods() -> Result<()> {
    in_lab_netns(|ns| {
        let h = Harness::new(ns.uplink_index()?)?;
        let inner = inner_frame(LOCAL_POD);
        let pkt = vxlan_frame(REMOTE_IP, PORT, VNI, 0x08, &inner);
        let out = h.expect(
            programs::XDP_UPLINK,
            &pkt,
            XDP_PASS,
            "xdp_decap",
            "valid VXLAN",
        )?;
        // The test run hands back the metadata too: the mark that tells
        // tc_uplink_ingress this packet came out of accepted VXLAN.
        let (meta, out) = out.split_at(4);
        assert_eq!(meta, XDP_META_DECAPPED.to_ne_bytes(), "metadata mark");
        assert_eq!(out.len(), pkt.len() - 50, "outer headers stripped");
        assert_eq!(
            &out[0..6],
            &UPLINK_MAC,
            "addressed to the uplink for the stack"
        );
        assert_eq!(&out[6..], &inner[6..], "rest of the inner frame untouched");
        Ok(())
    })
}

#[test]
fn xdp_judges_every_crafted_frame_as_the_kernel_would() -> Result<()> {
    in_lab_netns(|ns| {
        let mut h = Harness::new(ns.uplink_index()?)?;
        let table = crafted_uplink_frames(&Wire::progtest());
        assert!(table.len() >= 30, "{} cases", table.len());
        for (what, pkt, reason) in &table {
            let action = decap::ACTIONS[decap::NAMES.iter().position(|n| n == reason).unwrap()];
            let (verdict, counter) = (
                match action {
                    decap::Action::Drop => XDP_DROP,
                    _ => XDP_PASS,
                },
                format!("xdp_{reason}"),
            );
            let out = h.expect(programs::XDP_UPLINK, pkt, verdict, &counter, what)?;
            if action == decap::Action::Pass {
                assert_eq!(&out, pkt, "{what}: must pass untouched");
            }
        }
        // Truncated at every length, across every header boundary (the
        // kernel refuses test frames shorter than an Ethernet header):
        // never decapsulated, and lying lengths dropped.
        let good = vxlan_frame(REMOTE_IP, PORT, VNI, 0x08, &inner_frame(LOCAL_POD));
        for cut in 14..good.len() {
            let pkt = &good[..cut];
            let (verdict, counter) = if cut < 42 {
                (XDP_PASS, "xdp_pass_malformed")
            } else {
                (XDP_DROP, "xdp_drop_bad_length")
            };
            h.expect(
                programs::XDP_UPLINK,
                pkt,
                verdict,
                counter,
                &format!("cut at {cut}"),
            )?;
        }
        // --vxlan-source-check strict: the outer source MAC must be the
        // neighbour entry of the outer source IP.
        let uplink = ns.uplink_index()?;
        h.set_config(uplink, CONFIG_F_READY | CONFIG_F_STRICT_SOURCE)?;
        ns.set_neigh(true)?;
        h.expect(
            programs::XDP_UPLINK,
            &good,
            XDP_PASS,
            "xdp_decap",
            "strict, neighbour MAC",
        )?;
        let mut other_mac = good.clone();
        other_mac[11] = 0x77;
        h.expect(
            programs::XDP_UPLINK,
            &other_mac,
            XDP_DROP,
            "xdp_drop_source_mac",
            "strict, another MAC",
        )?;
        ns.set_neigh(false)?;
        h.expect(
            programs::XDP_UPLINK,
            &good,
            XDP_DROP,
            "xdp_drop_source_mac",
            "strict, no neighbour entry",
        )?;
        // Not configured yet: hands off.
        h.set_config(uplink, 0)?;
        h.expect(
            programs::XDP_UPLINK,
            &good,
            XDP_PASS,
            "xdp_pass_no_config",
            "no config",
        )?;
        Ok(())
    })
}

#[test]
fn tc_from_pod_verdicts() -> Result<()> {
    in_lab_netns(|ns| {
        let mut h = Harness::new(ns.uplink_index()?)?;
        let tc = programs::TC_FROM_POD;
        let out = h.expect(
            tc,
            &pod_frame(LOCAL_POD, 64),
            TC_ACT_REDIRECT,
            "pod_local_redirect",
            "same node",
        )?;
        assert_eq!(&out[0..6], &POD_MAC, "to the destination pod's MAC");
        assert_eq!(out[22], 64, "bridged: TTL untouched");
        // ARP: the pod's own sender address, or none (a probe), goes to
        // the kernel; another's is dropped. Other ARP the kernel judges.
        for (what, pkt, verdict, counter) in [
            (
                "ARP from the pod",
                arp_request(POD_MAC, SOURCE_POD, LOCAL_POD),
                TC_ACT_OK,
                "pod_pass_not_ipv4",
            ),
            (
                "ARP probe",
                arp_request(POD_MAC, Ipv4Addr::UNSPECIFIED, SOURCE_POD),
                TC_ACT_OK,
                "pod_pass_not_ipv4",
            ),
            (
                "ARP as another pod",
                arp_request(POD_MAC, LOCAL_POD, Ipv4Addr::new(10, 244, 1, 1)),
                TC_ACT_SHOT,
                "pod_drop_spoofed_arp",
            ),
            (
                "ARP as the gateway",
                arp_request(POD_MAC, Ipv4Addr::new(10, 244, 1, 1), LOCAL_POD),
                TC_ACT_SHOT,
                "pod_drop_spoofed_arp",
            ),
            (
                "not IPv4-over-Ethernet ARP",
                eth([0xff; 6], POD_MAC, 0x0806, &[0u8; 28]),
                TC_ACT_OK,
                "pod_pass_not_ipv4",
            ),
            (
                "ARP cut after its operation",
                eth([0xff; 6], POD_MAC, 0x0806, &[0, 1, 8, 0, 6, 4, 0, 1]),
                TC_ACT_OK,
                "pod_pass_malformed",
            ),
        ] {
            h.expect(tc, &pkt, verdict, counter, what)?;
        }
        // IPv4 whose source is not the pod's: another pod's (registered
        // behind another veth), the gateway, a node, the outside, none.
        for src in [
            LOCAL_POD,
            Ipv4Addr::new(10, 244, 1, 1),
            Ipv4Addr::new(10, 244, 1, 99),
            NODE_IP,
            Ipv4Addr::new(8, 8, 8, 8),
            Ipv4Addr::UNSPECIFIED,
        ] {
            for dst in [LOCAL_POD, REMOTE_POD, NODE_IP] {
                let pkt = eth(
                    GATEWAY_MAC,
                    POD_MAC,
                    0x0800,
                    &ipv4(src, dst, 1, 64, &icmp_echo()),
                );
                h.expect(
                    tc,
                    &pkt,
                    TC_ACT_SHOT,
                    "pod_drop_spoofed_src",
                    &format!("{src} -> {dst}"),
                )?;
            }
        }
        // (The kernel refuses test frames with a cut IPv4 header; the XDP
        // test covers truncation at every length.)
        let mut v6_in_v4 = pod_frame(LOCAL_POD, 64);
        v6_in_v4[14] = 0x65;
        h.expect(
            tc,
            &v6_in_v4,
            TC_ACT_OK,
            "pod_pass_malformed",
            "IP version 6 in an IPv4 frame",
        )?;
        let mut short_ihl = pod_frame(LOCAL_POD, 64);
        short_ihl[14] = 0x44;
        h.expect(
            tc,
            &short_ihl,
            TC_ACT_OK,
            "pod_pass_malformed",
            "IHL below 5",
        )?;
        h.expect(
            tc,
            &pod_frame(Ipv4Addr::new(172, 30, 9, 50), 64),
            TC_ACT_OK,
            "pod_pass_not_pod_dst",
            "node network",
        )?;
        h.expect(
            tc,
            &pod_frame(REMOTE_POD, 1),
            TC_ACT_OK,
            "pod_pass_ttl",
            "TTL 1",
        )?;
        let big = eth(
            GATEWAY_MAC,
            POD_MAC,
            0x0800,
            &ipv4(SOURCE_POD, REMOTE_POD, 17, 64, &[0u8; 1480]),
        );
        h.expect(tc, &big, TC_ACT_OK, "pod_pass_too_big", "1500-byte packet")?;
        // No route to the remote node: the stack gets the packet intact.
        h.set_config(999, CONFIG_F_READY)?;
        let pkt = pod_frame(REMOTE_POD, 64);
        let out = h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_no_route", "no route")?;
        assert_eq!(out, pkt);
        h.set_config(0, 0)?;
        h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_no_config", "no config")?;
        Ok(())
    })
}

/// IPv6 from a pod (dual-stack): its source must be its own registered
/// IPv6, link-local or `::`; a pod on this node gets it straight, the rest
/// is the kernel's. The decision reads the fixed header only, so extension
/// headers and fragments change nothing.
#[test]
fn tc_from_pod_ipv6_verdicts() -> Result<()> {
    in_lab_netns(|ns| {
        let mut h = Harness::new(ns.uplink_index()?)?;
        let tc = programs::TC_FROM_POD;
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let pkt = pod_frame6(SOURCE_POD6, LOCAL_POD6);
        let out = h.expect(
            tc,
            &pkt,
            TC_ACT_REDIRECT,
            "pod_local_redirect6",
            "same node",
        )?;
        assert_eq!(&out[0..6], &POD_MAC, "to the destination pod's MAC");
        assert_eq!(out[6..], pkt[6..], "bridged: nothing else changes");
        for (what, src, dst) in [
            ("to another node's pod", SOURCE_POD6, REMOTE_POD6),
            ("to outside the cluster", SOURCE_POD6, v6("2001:db8::1")),
            ("router solicitation", v6("fe80::12"), v6("ff02::2")),
            ("neighbour solicitation", SOURCE_POD6, v6("ff02::1:ff00:11")),
            (
                "duplicate address detection",
                Ipv6Addr::UNSPECIFIED,
                v6("ff02::1:ff00:12"),
            ),
        ] {
            let pkt = pod_frame6(src, dst);
            let out = h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_not_ipv4", what)?;
            assert_eq!(out, pkt, "{what}: left as it was");
        }
        // Extension headers and a fragment: the fixed header decides.
        for (what, next) in [("hop-by-hop options", 0u8), ("fragment", 44)] {
            let mut ext = vec![58, 0, 0, 0, 0, 0, 0, 0];
            ext.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
            let pkt = eth(
                GATEWAY_MAC,
                POD_MAC,
                0x86dd,
                &ipv6(SOURCE_POD6, LOCAL_POD6, next, 64, &ext),
            );
            h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_local_redirect6", what)?;
            let pkt = eth(
                GATEWAY_MAC,
                POD_MAC,
                0x86dd,
                &ipv6(LOCAL_POD6, REMOTE_POD6, next, 64, &ext),
            );
            h.expect(tc, &pkt, TC_ACT_SHOT, "pod_drop_spoofed_src6", what)?;
        }
        // A source that is not the pod's: another pod's (registered behind
        // another veth), an unregistered address of the lease, the
        // gateway, another node's pod, the outside, multicast.
        for src in [
            LOCAL_POD6,
            v6("fd00:10:244:1::99"),
            v6("fd00:10:244:1::1"),
            REMOTE_POD6,
            v6("2001:db8::1"),
            v6("ff02::1"),
        ] {
            for dst in [LOCAL_POD6, REMOTE_POD6, v6("ff02::1")] {
                h.expect(
                    tc,
                    &pod_frame6(src, dst),
                    TC_ACT_SHOT,
                    "pod_drop_spoofed_src6",
                    &format!("{src} -> {dst}"),
                )?;
            }
        }
        // Not version 6. (The kernel refuses test frames with a cut IPv6
        // header; the lab sends them from a pod at every length, see
        // `modes.rs`.)
        let whole = pod_frame6(SOURCE_POD6, LOCAL_POD6);
        let mut v4 = whole.clone();
        v4[14] = 0x45;
        h.expect(tc, &v4, TC_ACT_OK, "pod_pass_malformed", "version 4")?;
        // Netfilter compatibility: the source is still checked, the rest
        // goes to the kernel's forward path.
        h.update_config(|c| c.flags |= CONFIG_F_NETFILTER)?;
        h.expect(
            tc,
            &whole,
            TC_ACT_OK,
            "pod_pass_netfilter",
            "own source, netfilter",
        )?;
        h.expect(
            tc,
            &pod_frame6(LOCAL_POD6, REMOTE_POD6),
            TC_ACT_SHOT,
            "pod_drop_spoofed_src6",
            "spoofed, netfilter",
        )?;
        h.set_config(0, 0)?;
        h.expect(tc, &whole, TC_ACT_OK, "pod_pass_no_config", "no config")?;
        Ok(())
    })
}

/// The lab namespace's uplink as an IPv6 node's: forwarding on, the
/// node's IPv6 on it. The function sets or removes the remote node's
/// neighbour entry.
fn ipv6_uplink(ns: &Netns) -> Result<impl Fn(bool) -> Result<()> + '_> {
    let n = ns.0.as_str();
    flannel_tests::netns::exec(n, &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])?;
    let addr = format!("{NODE_IP6}/64");
    flannel_tests::netns::ip(&["-n", n, "addr", "add", &addr, "dev", "up0", "nodad"])?;
    Ok(move |present: bool| ns.set_neigh_of(REMOTE_IP6.into(), present.then_some(NEIGH_MAC)))
}

/// IPv6 for a direct remote (DirectRouting or host-gw over IPv6) leaves
/// as the kernel's route `<IPv6 subnet> via <node IPv6>` sends it: the
/// same bytes with the next hop's MACs and the hop limit one less, up to
/// the uplink's MTU, extension headers and GSO packets included.
#[test]
fn tc_from_pod_routes_ipv6_direct_remotes_without_encapsulation() -> Result<()> {
    in_lab_netns(|ns| {
        let neigh = ipv6_uplink(ns)?;
        let mut h = Harness::new(ns.uplink_index()?)?;
        h.set_ipv6()?;
        h.set_remote6(RemoteNode6 {
            node_ip6: REMOTE_IP6.octets(),
            flags: REMOTE_F_DIRECT,
            ..Default::default()
        })?;
        let tc = programs::TC_FROM_POD;
        let pkt = pod_frame6(SOURCE_POD6, REMOTE_POD6);
        neigh(false)?;
        let out = h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_direct6_neigh", "unresolved")?;
        assert_eq!(out[14..], routed6(&pkt)[14..]);
        neigh(true)?;
        let out = h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_direct6_redirect", "direct")?;
        assert_eq!(out.len(), pkt.len(), "no headers added");
        assert_eq!(out[0..6], NEIGH_MAC);
        assert_eq!(out[6..12], UPLINK_MAC);
        assert_eq!(out[12..], routed6(&pkt)[12..], "only the hop limit changes");
        // The uplink's MTU (1450 + 50), not flannel-v6.1's 1430, is the
        // limit: 1500 bytes of IPv6 go, 1501 are the kernel's.
        let sized = |len: usize| sized_pod_frame6(SOURCE_POD6, REMOTE_POD6, len - 48);
        let out = h.expect(
            tc,
            &sized(1500),
            TC_ACT_REDIRECT,
            "pod_direct6_redirect",
            "1500",
        )?;
        assert_eq!(out[12..], routed6(&sized(1500))[12..]);
        h.expect(tc, &sized(1501), TC_ACT_OK, "pod_pass_too_big", "1501")?;
        let mut last_hop = pkt.clone();
        last_hop[21] = 1;
        h.expect(tc, &last_hop, TC_ACT_OK, "pod_pass_ttl", "hop limit 1")?;
        // Extension headers and fragments go as they are: nothing past the
        // fixed header is touched.
        for next in [0u8, 44, 60] {
            let mut ext = vec![58, 0, 0, 0, 0, 0, 0, 0];
            ext.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
            let p = eth(
                GATEWAY_MAC,
                POD_MAC,
                0x86dd,
                &ipv6(SOURCE_POD6, REMOTE_POD6, next, 64, &ext),
            );
            let what = format!("next {next}");
            let out = h.expect(tc, &p, TC_ACT_REDIRECT, "pod_direct6_redirect", &what)?;
            assert_eq!(out[12..], routed6(&p)[12..], "{what}");
        }
        // A GSO packet is segmented by the uplink: its segments must fit.
        h.gso_size = 1440;
        h.expect(
            tc,
            &pkt,
            TC_ACT_REDIRECT,
            "pod_direct6_redirect",
            "GSO 1440",
        )?;
        h.gso_size = 1441;
        h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_too_big", "GSO 1441")?;
        h.gso_size = 0;
        // No route to the node: the stack gets it intact.
        h.update_config(|c| c.uplink_ifindex = 999)?;
        let out = h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_no_route", "no route")?;
        assert_eq!(out, pkt);
        Ok(())
    })
}

/// `pkt` routed once: hop limit one less.
fn routed6(pkt: &[u8]) -> Vec<u8> {
    let mut p = pkt.to_vec();
    p[21] -= 1;
    p
}

/// IPv6 from a pod to a remote IPv6 lease (dual-stack) leaves as
/// `flannel-v6.1` would send it, byte by byte: VXLAN over IPv6 with the
/// outer UDP checksum a receiver verifies. What the kernel must do (hop
/// limit 1, too big, extension headers, GSO, no route) goes to it intact.
#[test]
fn tc_from_pod_encapsulates_ipv6_like_flannel_v6() -> Result<()> {
    in_lab_netns(|ns| {
        let neigh = ipv6_uplink(ns)?;
        neigh(true)?;
        let mut h = Harness::new(ns.uplink_index()?)?;
        h.set_ipv6()?;
        let tc = programs::TC_FROM_POD;
        let pkt = pod_frame6(SOURCE_POD6, REMOTE_POD6);
        let out = h.expect(
            tc,
            &pkt,
            TC_ACT_REDIRECT,
            "pod_encap6_redirect",
            "remote IPv6 lease",
        )?;
        let inner = &pkt[14..];
        assert_eq!(out.len(), pkt.len() + 70);
        // Outer Ethernet: the neighbour's MAC from the uplink's.
        assert_eq!(out[0..6], NEIGH_MAC);
        assert_eq!(out[6..12], UPLINK_MAC);
        assert_eq!(out[12..14], [0x86, 0xdd]);
        // Outer IPv6: version 6, traffic class 0, UDP, hop limit 64.
        let o = 14;
        assert_eq!(out[o] >> 4, 6);
        assert_eq!(out[o] & 0x0f, 0);
        assert_eq!(out[o + 1] >> 4, 0);
        let udp_len = (8 + 8 + 14 + inner.len()) as u16;
        assert_eq!(out[o + 4..o + 6], udp_len.to_be_bytes());
        assert_eq!(out[o + 6..o + 8], [17, 64]);
        assert_eq!(out[o + 8..o + 24], NODE_IP6.octets());
        assert_eq!(out[o + 24..o + 40], REMOTE_IP6.octets());
        // UDP: a source port in the kernel's range, the VXLAN port, the
        // length, and a checksum that verifies over the whole datagram.
        let u = o + 40;
        let sport = u16::from_be_bytes([out[u], out[u + 1]]);
        assert!((32768..61000).contains(&sport), "source port {sport}");
        assert_eq!(out[u + 2..u + 4], PORT.to_be_bytes());
        assert_eq!(out[u + 4..u + 6], udp_len.to_be_bytes());
        assert_ne!(out[u + 6..u + 8], [0, 0], "IPv6 needs the UDP checksum");
        assert_eq!(checksum6(NODE_IP6, REMOTE_IP6, 17, &out[u..]), 0);
        // VXLAN: I flag and the VNI.
        assert_eq!(out[u + 8..u + 16], [0x08, 0, 0, 0, 0, 0, 1, 0]);
        // Inner Ethernet: our IPv6 VTEP's MAC to the remote's.
        let ie = u + 16;
        assert_eq!(out[ie..ie + 6], REMOTE_VTEP6_MAC);
        assert_eq!(out[ie + 6..ie + 12], VTEP6_MAC);
        assert_eq!(out[ie + 12..ie + 14], [0x86, 0xdd]);
        // The inner packet, routed once: hop limit 63, nothing else.
        let ii = ie + 14;
        let mut want = inner.to_vec();
        want[7] = 63;
        assert_eq!(out[ii..], want[..]);
        // The flow label and source port are the flow's: the same packet
        // gets the same ones.
        let again = h.run(tc, &pkt)?.1;
        assert_eq!(again[o..o + 4], out[o..o + 4]);
        assert_eq!(again[u..u + 2], out[u..u + 2]);

        // Every payload length up to flannel-v6.1's MTU (1430 with the
        // harness's 1450 for IPv4): each checksum verifies; one byte more
        // is the kernel's (it answers "packet too big").
        for data in [0usize, 1, 2, 3, 511, 512, 1000, 1382] {
            let pkt = sized_pod_frame6(SOURCE_POD6, REMOTE_POD6, data);
            let out = h.expect(
                tc,
                &pkt,
                TC_ACT_REDIRECT,
                "pod_encap6_redirect",
                &format!("{data} bytes"),
            )?;
            assert_eq!(
                checksum6(NODE_IP6, REMOTE_IP6, 17, &out[u..]),
                0,
                "{data} bytes"
            );
        }
        let big = sized_pod_frame6(SOURCE_POD6, REMOTE_POD6, 1383);
        let out = h.expect(tc, &big, TC_ACT_OK, "pod_pass_too_big", "1431 bytes")?;
        assert_eq!(out, big);
        // Hop limit 1: the kernel says "time exceeded".
        let mut last_hop = pod_frame6(SOURCE_POD6, REMOTE_POD6);
        last_hop[21] = 1;
        h.expect(tc, &last_hop, TC_ACT_OK, "pod_pass_ttl", "hop limit 1")?;
        // Extension headers and fragments: flannel-v6.1's.
        for next in [0u8, 44, 60] {
            let mut ext = vec![58, 0, 0, 0, 0, 0, 0, 0];
            ext.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
            let pkt = eth(
                GATEWAY_MAC,
                POD_MAC,
                0x86dd,
                &ipv6(SOURCE_POD6, REMOTE_POD6, next, 64, &ext),
            );
            let out = h.expect(
                tc,
                &pkt,
                TC_ACT_OK,
                "pod_pass_ext6",
                &format!("next {next}"),
            )?;
            assert_eq!(out, pkt);
        }
        // A GSO packet: its segments' outer checksums are the kernel's.
        h.gso_size = 1000;
        let out = h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_gso6", "GSO")?;
        assert_eq!(out, pkt);
        h.gso_size = 0;
        // No neighbour yet: the kernel resolves it.
        neigh(false)?;
        let out = h.expect(
            tc,
            &pkt,
            TC_ACT_REDIRECT,
            "pod_encap6_neigh",
            "no neighbour",
        )?;
        assert_eq!(checksum6(NODE_IP6, REMOTE_IP6, 17, &out[u..]), 0);
        assert_eq!(out[ii..], want[..]);
        // No route to the node: the stack gets it intact.
        h.update_config(|c| c.uplink_ifindex = 999)?;
        let out = h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_no_route", "no route")?;
        assert_eq!(out, pkt);
        Ok(())
    })
}

#[test]
fn tc_from_pod_encapsulates_like_flannel() -> Result<()> {
    in_lab_netns(|ns| {
        let h = Harness::new(ns.uplink_index()?)?;
        ns.set_neigh(true)?;
        let pkt = pod_frame(REMOTE_POD, 64);
        let out = h.expect(
            programs::TC_FROM_POD,
            &pkt,
            TC_ACT_REDIRECT,
            "pod_encap_redirect",
            "encap",
        )?;
        assert_eq!(out.len(), pkt.len() + 50);
        // Outer Ethernet: from the uplink to the resolved next hop.
        assert_eq!(&out[0..6], &NEIGH_MAC);
        assert_eq!(&out[6..12], &UPLINK_MAC);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        // Outer IPv4: valid checksum, UDP, node to node, right length.
        let oip = &out[14..34];
        assert_eq!(oip[0], 0x45);
        assert_eq!(checksum(oip), 0, "outer IPv4 checksum");
        assert_eq!(
            u16::from_be_bytes([oip[2], oip[3]]) as usize,
            out.len() - 14
        );
        assert_eq!(oip[9], 17);
        assert_eq!(&oip[12..16], &NODE_IP.octets());
        assert_eq!(&oip[16..20], &REMOTE_IP.octets());
        // UDP: source port from the flow hash, VXLAN port, length, no checksum.
        let sport = u16::from_be_bytes([out[34], out[35]]);
        assert!((32768..61000).contains(&sport), "sport {sport}");
        assert_eq!(u16::from_be_bytes([out[36], out[37]]), PORT);
        assert_eq!(
            u16::from_be_bytes([out[38], out[39]]) as usize,
            out.len() - 34
        );
        // VXLAN: I flag and VNI.
        assert_eq!(&out[42..50], &[0x08, 0, 0, 0, 0, 0, VNI as u8, 0]);
        // Inner Ethernet: our VTEP to theirs.
        assert_eq!(&out[50..56], &REMOTE_VTEP_MAC);
        assert_eq!(&out[56..62], &VTEP_MAC);
        // Inner IPv4: TTL decremented once, checksum still valid, rest intact.
        let iip = &out[64..84];
        assert_eq!(iip[8], 63);
        assert_eq!(checksum(iip), 0, "inner IPv4 checksum");
        assert_eq!(&out[84..], &pkt[34..]);

        // Same flow, same source port; other flows spread.
        let (_, again) = h.run(programs::TC_FROM_POD, &pkt)?;
        assert_eq!(&again[34..36], &out[34..36]);
        let sports: std::collections::BTreeSet<[u8; 2]> = (0..64u16)
            .map(|i| {
                // UDP from client port 40000 + i.
                let mut udp = (40_000 + i).to_be_bytes().to_vec();
                udp.extend_from_slice(&[0x13, 0x89, 0, 12, 0, 0, 1, 2, 3, 4]);
                let p = eth(
                    GATEWAY_MAC,
                    POD_MAC,
                    0x0800,
                    &ipv4(SOURCE_POD, REMOTE_POD, 17, 64, &udp),
                );
                let (_, o) = h.run(programs::TC_FROM_POD, &p)?;
                Ok([o[34], o[35]])
            })
            .collect::<Result<_>>()?;
        assert!(
            sports.len() >= 60,
            "{} source ports for 64 flows",
            sports.len()
        );
        Ok(())
    })
}

/// A direct remote (DirectRouting, host-gw): the packet leaves as it came,
/// routed once (TTL − 1, checksum kept valid) with the next hop's MACs,
/// up to the uplink's MTU rather than the VXLAN inner MTU.
#[test]
fn tc_from_pod_routes_direct_remotes_without_encapsulation() -> Result<()> {
    in_lab_netns(|ns| {
        let mut h = Harness::new(ns.uplink_index()?)?;
        h.set_remote(RemoteNode {
            node_ip: u32::from_ne_bytes(REMOTE_IP.octets()),
            flags: REMOTE_F_DIRECT,
            ..Default::default()
        })?;
        let tc = programs::TC_FROM_POD;
        let pkt = pod_frame(REMOTE_POD, 64);
        // No neighbour yet: the kernel resolves it (and nothing is cached).
        ns.set_neigh(false)?;
        h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_direct_neigh", "unresolved")?;
        ns.set_neigh(true)?;
        let out = h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_direct_redirect", "direct")?;
        assert_eq!(out.len(), pkt.len(), "no headers added");
        assert_eq!(&out[0..6], &NEIGH_MAC);
        assert_eq!(&out[6..12], &UPLINK_MAC);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(out[14 + 8], 63, "TTL decremented once");
        assert_eq!(checksum(&out[14..34]), 0, "IPv4 checksum");
        let mut rest = pkt[14..34].to_vec();
        rest[8] = 63;
        rest[10..12].copy_from_slice(&out[24..26]);
        assert_eq!(&out[14..34], &rest[..], "only TTL and checksum change");
        assert_eq!(&out[34..], &pkt[34..]);
        // The uplink's MTU (inner MTU 1450 + 50) is the limit, not 1450.
        let sized = |len: usize| {
            eth(
                GATEWAY_MAC,
                POD_MAC,
                0x0800,
                &ipv4(SOURCE_POD, REMOTE_POD, 17, 64, &vec![0u8; len - 20]),
            )
        };
        h.expect(
            tc,
            &sized(1500),
            TC_ACT_REDIRECT,
            "pod_direct_redirect",
            "1500",
        )?;
        h.expect(tc, &sized(1501), TC_ACT_OK, "pod_pass_too_big", "1501")?;
        h.expect(
            tc,
            &pod_frame(REMOTE_POD, 1),
            TC_ACT_OK,
            "pod_pass_ttl",
            "TTL 1",
        )?;
        // The same remote without the flag is encapsulated again.
        h.set_remote_vtep(REMOTE_VTEP_MAC)?;
        let out = h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_encap_redirect", "VXLAN")?;
        assert_eq!(out.len(), pkt.len() + 50);
        h.expect(
            tc,
            &sized(1451),
            TC_ACT_OK,
            "pod_pass_too_big",
            "VXLAN 1451",
        )?;
        Ok(())
    })
}

/// The lease slots come before the trie: a filled slot is the answer
/// (neither the trie nor the local endpoints are asked), an empty one or a
/// config without slots sends the lookup to the endpoints and the trie. The agent keeps both saying the same; here
/// they are made to differ so that the outer destination shows which one
/// answered, for encapsulation and for decapsulation's source check.
#[test]
fn remote_leases_are_found_by_slot_before_the_trie() -> Result<()> {
    in_lab_netns(|ns| {
        flannel_tests::netns::pin_thread(0)?;
        let mut h = Harness::new(ns.uplink_index()?)?;
        const OTHER_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 9, 3);
        const OTHER_MAC: [u8; 6] = [0x0e, 0xaa, 0, 0, 0, 3];
        ns.set_neigh(true)?;
        ns.set_neigh_of(OTHER_IP.into(), Some(OTHER_MAC))?;
        let subnet = Ipv4Addr::new(10, 244, 2, 0);
        let other = RemoteNode {
            node_ip: u32::from_ne_bytes(OTHER_IP.octets()),
            vtep_mac: REMOTE_VTEP_MAC,
            ..Default::default()
        };
        let tc = programs::TC_FROM_POD;
        let pkt = pod_frame(REMOTE_POD, 64);
        let outer_dst = |out: &[u8]| Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let out = h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_encap_redirect", "both")?;
        assert_eq!(outer_dst(&out), REMOTE_IP);
        // The slot says another node, the trie REMOTE_IP: the slot wins.
        h.set_slot(subnet, other)?;
        let out = h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_encap_redirect", "slot")?;
        assert_eq!(outer_dst(&out), OTHER_IP);
        assert_eq!(&out[0..6], &OTHER_MAC);
        // VXLAN from REMOTE_IP for a pod in that lease is now spoofed:
        // decapsulation's source check reads the slot too.
        let vx = vxlan_frame(REMOTE_IP, PORT, VNI, 0x08, &inner_frame(LOCAL_POD));
        h.expect(
            programs::XDP_UPLINK,
            &vx,
            XDP_DROP,
            "xdp_drop_inner_source",
            "slot says another node",
        )?;
        // An empty slot: the trie answers, for both.
        h.set_slot(subnet, RemoteNode::default())?;
        let out = h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_encap_redirect", "trie")?;
        assert_eq!(outer_dst(&out), REMOTE_IP);
        h.expect(programs::XDP_UPLINK, &vx, XDP_PASS, "xdp_decap", "trie")?;
        // A filled slot is another node's lease: it wins over an endpoint
        // in it (a pod left from a lease this node no longer holds), as
        // the kernel's route to that lease wins over cni0's.
        let local = pod_frame(LOCAL_POD, 64);
        let here = Ipv4Addr::new(10, 244, 1, 0);
        h.expect(tc, &local, TC_ACT_REDIRECT, "pod_local_redirect", "local")?;
        h.set_slot(here, other)?;
        let out = h.expect(tc, &local, TC_ACT_REDIRECT, "pod_encap_redirect", "slot")?;
        assert_eq!(outer_dst(&out), OTHER_IP);
        h.set_slot(here, RemoteNode::default())?;
        h.expect(tc, &local, TC_ACT_REDIRECT, "pod_local_redirect", "again")?;
        // Neither: no remote.
        h.remove_remote_trie()?;
        h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_not_pod_dst", "neither")?;
        // The slot alone is enough...
        h.set_slot(subnet, other)?;
        let out = h.expect(tc, &pkt, TC_ACT_REDIRECT, "pod_encap_redirect", "slot only")?;
        assert_eq!(outer_dst(&out), OTHER_IP);
        // ...while the config has slots: without them, only the trie counts.
        h.update_config(|c| c.lease_slots = 0)?;
        h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_not_pod_dst", "slots off")?;
        // A network that does not hold the address: the same.
        h.update_config(|c| {
            c.lease_slots = 1 << 16;
            c.network = u32::from_ne_bytes([10, 128, 0, 0]);
            c.network_mask = u32::from_ne_bytes([255, 128, 0, 0]);
        })?;
        h.expect(tc, &pkt, TC_ACT_OK, "pod_pass_not_pod_dst", "off network")?;
        Ok(())
    })
}

/// `tc_from_pod` keeps the FIB's answer per remote node and CPU for up to
/// `NEXT_HOP_TTL_NS`: a changed neighbour MAC, or a vanished neighbour,
/// takes effect once that long has passed; a changed remote VTEP MAC or
/// config takes effect at once.
#[test]
fn tc_from_pod_caches_the_next_hop_for_a_second() -> Result<()> {
    in_lab_netns(|ns| {
        // The cache is per CPU: stay on one.
        flannel_tests::netns::pin_thread(0)?;
        let mut h = Harness::new(ns.uplink_index()?)?;
        let pkt = pod_frame(REMOTE_POD, 64);
        let encap = |h: &Harness, what: &str| {
            h.expect(
                programs::TC_FROM_POD,
                &pkt,
                TC_ACT_REDIRECT,
                "pod_encap_redirect",
                what,
            )
        };
        const OTHER_MAC: [u8; 6] = [0x0e, 0xaa, 0, 0, 0, 3];
        const OTHER_VTEP: [u8; 6] = [0x0e, 0x66, 0, 0, 0, 3];
        let ttl = std::time::Duration::from_nanos(flannel_common::NEXT_HOP_TTL_NS);
        ns.set_neigh(true)?;
        assert_eq!(&encap(&h, "first packet")?[0..6], &NEIGH_MAC);
        // The neighbour's MAC changes: the cached answer stands, for now.
        ns.set_neigh_mac(Some(OTHER_MAC))?;
        assert_eq!(&encap(&h, "cached")?[0..6], &NEIGH_MAC);
        // The remote's VTEP MAC changes: the entry is stale at once, and
        // the FIB is asked again.
        h.set_remote_vtep(OTHER_VTEP)?;
        let out = encap(&h, "new VTEP MAC")?;
        assert_eq!(&out[50..56], &OTHER_VTEP);
        assert_eq!(&out[0..6], &OTHER_MAC);
        assert_eq!(checksum(&out[14..34]), 0, "outer IPv4 checksum");
        // So does a new config (another VNI).
        let uplink = ns.uplink_index()?;
        h.set_config(uplink, CONFIG_F_READY)?;
        h.update_config(|c| c.vni = 77)?;
        let out = encap(&h, "new VNI")?;
        assert_eq!(&out[42..50], &[0x08, 0, 0, 0, 0, 0, 77, 0]);
        // A new uplink (another ifindex in the config) makes the entry
        // stale at once too: the FIB is asked again, and from `lo` it
        // finds no route.
        h.update_config(|c| c.uplink_ifindex = 1)?;
        h.expect(
            programs::TC_FROM_POD,
            &pkt,
            TC_ACT_OK,
            "pod_pass_no_route",
            "new uplink",
        )?;
        h.set_config(uplink, CONFIG_F_READY)?;
        assert_eq!(&encap(&h, "uplink back")?[0..6], &OTHER_MAC);
        // The neighbour goes: packets still leave by the cached hop until
        // it expires, then the kernel is asked to resolve it.
        ns.set_neigh(false)?;
        assert_eq!(&encap(&h, "cached, neighbour gone")?[0..6], &OTHER_MAC);
        std::thread::sleep(ttl + std::time::Duration::from_millis(100));
        h.expect(
            programs::TC_FROM_POD,
            &pkt,
            TC_ACT_REDIRECT,
            "pod_encap_neigh",
            "expired, neighbour gone",
        )?;
        // Unresolved answers are not cached: once the neighbour is back,
        // the next packet has it.
        ns.set_neigh(true)?;
        assert_eq!(&encap(&h, "neighbour back")?[0..6], &NEIGH_MAC);
        Ok(())
    })
}

#[test]
fn tc_uplink_ingress_routes_only_what_xdp_decapsulated() -> Result<()> {
    in_lab_netns(|ns| {
        let h = Harness::new(ns.uplink_index()?)?;
        let up = programs::TC_UPLINK_INGRESS;
        // A plain packet to a pod address, as a decapsulated one looks but
        // without XDP's metadata mark (a test run cannot carry one; the
        // lab tests cover the marked path): the kernel routes it.
        let plain = eth(
            UPLINK_MAC,
            REMOTE_VTEP_MAC,
            0x0800,
            &ipv4(REMOTE_POD, LOCAL_POD, 1, 63, &icmp_echo()),
        );
        let out = h.expect(up, &plain, TC_ACT_OK, "uplink_pass", "plain, to a pod")?;
        assert_eq!(out, plain);
        // With XDP doing the decapsulation, TC leaves VXLAN alone.
        let vx = vxlan_frame(REMOTE_IP, PORT, VNI, 0x08, &inner_frame(LOCAL_POD));
        let out = h.expect(up, &vx, TC_ACT_OK, "uplink_pass", "VXLAN, XDP mode")?;
        assert_eq!(out, vx);
        Ok(())
    })
}

/// VXLAN over IPv6 (`flannel-v6.1`'s) for a local pod: TC decapsulates it
/// and routes it into the pod, XDP strips it for the stack, each with the
/// IPv6 judgement of `decap::classify6` and its counters.
#[test]
fn uplink_decapsulates_vxlan_over_ipv6() -> Result<()> {
    in_lab_netns(|ns| {
        let mut h = Harness::new(ns.uplink_index()?)?;
        let uplink = ns.uplink_index()?;
        let up = programs::TC_UPLINK_INGRESS;
        let inner_to = |src: Ipv6Addr, dst: Ipv6Addr, hops: u8| {
            let mut echo = vec![128, 0, 0, 0, 0, 1, 0, 1];
            echo.extend_from_slice(&[0x5a; 32]);
            eth(
                VTEP6_MAC,
                REMOTE_VTEP6_MAC,
                0x86dd,
                &ipv6(src, dst, 58, hops, &echo),
            )
        };
        let inner = inner_to(REMOTE_POD6, LOCAL_POD6, 64);
        let vx = vxlan6_frame(REMOTE_IP6, &inner);
        // IPv6 off: the kernel's.
        h.set_config(uplink, CONFIG_F_READY | CONFIG_F_TC_DECAP)?;
        h.expect(
            up,
            &vx,
            TC_ACT_OK,
            "uplink_pass_not_ipv4",
            "no IPv6 configured",
        )?;
        h.set_ipv6()?;
        let out = h.expect(up, &vx, TC_ACT_REDIRECT, "uplink_decap6", "VXLAN over IPv6")?;
        assert_eq!(out.len(), vx.len() - 70);
        assert_eq!(out[0..6], POD_MAC);
        assert_eq!(out[6..12], GATEWAY_MAC);
        assert_eq!(out[12..14], [0x86, 0xdd]);
        assert_eq!(out[21], 63, "routed: hop limit - 1");
        assert_eq!(out[14..21], inner[14..21]);
        assert_eq!(out[22..], inner[22..], "the rest untouched");
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let mut zero_check = vx.clone();
        zero_check[60..62].copy_from_slice(&[0, 0]);
        for (what, pkt, verdict, counter) in [
            (
                "zero UDP checksum",
                zero_check,
                TC_ACT_SHOT,
                "uplink_drop_bad_checksum",
            ),
            (
                "from a stranger",
                vxlan6_frame(v6("fd00:30:9::99"), &inner),
                TC_ACT_SHOT,
                "uplink_drop_unknown_vtep",
            ),
            (
                "inner source outside the sender's lease",
                vxlan6_frame(
                    REMOTE_IP6,
                    &inner_to(v6("fd00:10:244:7::1"), LOCAL_POD6, 64),
                ),
                TC_ACT_SHOT,
                "uplink_drop_inner_source",
            ),
            (
                "not a local pod",
                vxlan6_frame(
                    REMOTE_IP6,
                    &inner_to(REMOTE_POD6, v6("fd00:10:244:1::99"), 64),
                ),
                TC_ACT_OK,
                "uplink_pass_not_local",
            ),
            (
                "inner IPv4",
                vxlan6_frame(REMOTE_IP6, &inner_frame(LOCAL_POD)),
                TC_ACT_OK,
                "uplink_pass_inner_not_ipv6",
            ),
            (
                "hop limit 1",
                vxlan6_frame(REMOTE_IP6, &inner_to(REMOTE_POD6, LOCAL_POD6, 1)),
                TC_ACT_OK,
                "uplink_pass_ttl",
            ),
        ] {
            h.expect(up, &pkt, verdict, counter, what)?;
        }
        // XDP: stripped and marked for tc_uplink_ingress.
        h.set_config(uplink, CONFIG_F_READY)?;
        h.set_ipv6()?;
        let out = h.expect(programs::XDP_UPLINK, &vx, XDP_PASS, "xdp_decap6", "XDP")?;
        let (meta, out) = out.split_at(4);
        assert_eq!(meta, XDP_META_DECAPPED.to_ne_bytes(), "metadata mark");
        assert_eq!(out.len(), vx.len() - 70);
        assert_eq!(out[0..6], UPLINK_MAC);
        assert_eq!(out[6..], inner[6..]);
        h.expect(
            programs::XDP_UPLINK,
            &vxlan6_frame(v6("fd00:30:9::99"), &inner),
            XDP_DROP,
            "xdp_drop_unknown_vtep",
            "XDP, from a stranger",
        )?;
        Ok(())
    })
}

#[test]
fn tc_uplink_ingress_decapsulates_when_there_is_no_xdp() -> Result<()> {
    in_lab_netns(|ns| {
        let mut h = Harness::new(ns.uplink_index()?)?;
        let uplink = ns.uplink_index()?;
        h.set_config(uplink, CONFIG_F_READY | CONFIG_F_TC_DECAP)?;
        let up = programs::TC_UPLINK_INGRESS;
        let inner = inner_frame(LOCAL_POD);
        let vx = vxlan_frame(REMOTE_IP, PORT, VNI, 0x08, &inner);
        let out = h.expect(
            up,
            &vx,
            TC_ACT_REDIRECT,
            "uplink_decap",
            "VXLAN to a local pod",
        )?;
        // Outer headers and inner Ethernet gone; routed into the pod.
        assert_eq!(out.len(), vx.len() - 50);
        assert_eq!(&out[0..6], &POD_MAC);
        assert_eq!(&out[6..12], &GATEWAY_MAC);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(out[22], 62, "routed: TTL - 1");
        assert_eq!(checksum(&out[14..34]), 0);
        assert_eq!(&out[34..], &inner[34..], "payload untouched");
        // The same judgement as XDP, frame by frame, with TC's counters.
        for (what, pkt, reason) in crafted_uplink_frames(&Wire::progtest()) {
            let action = decap::ACTIONS[decap::NAMES.iter().position(|n| *n == reason).unwrap()];
            let verdict = match action {
                decap::Action::Drop => TC_ACT_SHOT,
                decap::Action::Pass => TC_ACT_OK,
                decap::Action::Decap => TC_ACT_REDIRECT,
            };
            let out = h.expect(up, &pkt, verdict, &format!("uplink_{reason}"), &what)?;
            if action == decap::Action::Pass {
                assert_eq!(out, pkt, "{what}: changed");
            }
        }
        // Decapsulated with TTL 1: the kernel answers "time exceeded".
        let ttl1 = vxlan_frame(
            REMOTE_IP,
            PORT,
            VNI,
            0x08,
            &eth(
                VTEP_MAC,
                REMOTE_VTEP_MAC,
                0x0800,
                &ipv4(REMOTE_POD, LOCAL_POD, 1, 1, &icmp_echo()),
            ),
        );
        h.expect(up, &ttl1, TC_ACT_OK, "uplink_pass_ttl", "inner TTL 1")?;
        // Strict source check, as in XDP.
        h.set_config(
            uplink,
            CONFIG_F_READY | CONFIG_F_TC_DECAP | CONFIG_F_STRICT_SOURCE,
        )?;
        ns.set_neigh(false)?;
        h.expect(
            up,
            &vx,
            TC_ACT_SHOT,
            "uplink_drop_source_mac",
            "strict, no neighbour entry",
        )?;
        ns.set_neigh(true)?;
        h.expect(
            up,
            &vx,
            TC_ACT_REDIRECT,
            "uplink_decap",
            "strict, neighbour MAC",
        )?;
        h.set_config(uplink, 0)?;
        h.expect(up, &vx, TC_ACT_OK, "uplink_pass_no_config", "no config")?;
        Ok(())
    })
}

//! Crafted packets through `BPF_PROG_TEST_RUN` (aya `TestRun`): every parser
//! branch of the XDP and TC programs gets its verdict and its counter, and
//! the encapsulation is checked byte by byte against the VXLAN wire format.
//! Needs root (BPF) and runs in a network namespace it creates.

use std::net::Ipv4Addr;

use anyhow::Result;
use flannel_common::{programs, CONFIG_F_READY, CONFIG_F_TC_DECAP};
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
fn xdp_passes_everything_else_untouched_with_its_reason() -> Result<()> {
    in_lab_netns(|ns| {
        let mut h = Harness::new(ns.uplink_index()?)?;
        let local = inner_frame(LOCAL_POD);
        let good = vxlan_frame(REMOTE_IP, PORT, VNI, 0x08, &local);
        let mut options = good.clone();
        options[14] = 0x46; // IHL 6: 4 bytes of options (NOPs) after the header
        options.splice(34..34, [1u8, 1, 1, 1]);
        let mut more_frags = good.clone();
        more_frags[20] = 0x20;
        let mut frag_offset = good.clone();
        frag_offset[21] = 0x10;
        let mut tcp = good.clone();
        tcp[23] = 6;
        let mut udp_len_lies = good.clone();
        udp_len_lies[38..40].copy_from_slice(&2000u16.to_be_bytes());
        let mut ip_len_lies = good.clone();
        ip_len_lies[16..18].copy_from_slice(&3000u16.to_be_bytes());
        let mut bad_version = good.clone();
        bad_version[14] = 0x65;
        let mut inner_bad_version = good.clone();
        inner_bad_version[64] = 0x35;
        let arp = eth([0xff; 6], NEIGH_MAC, 0x0806, &[0u8; 28]);
        let v6 = eth(UPLINK_MAC, NEIGH_MAC, 0x86dd, &[0x60; 60]);
        let inner_arp = vxlan_frame(
            REMOTE_IP,
            PORT,
            VNI,
            0x08,
            &eth(VTEP_MAC, REMOTE_VTEP_MAC, 0x0806, &[0u8; 28]),
        );

        let table: Vec<(&str, Vec<u8>, &str)> = vec![
            ("ARP", arp, "xdp_pass_not_ipv4"),
            ("IPv6", v6, "xdp_pass_not_ipv4"),
            (
                "wrong VNI",
                vxlan_frame(REMOTE_IP, PORT, VNI + 1, 0x08, &local),
                "xdp_pass_wrong_vni",
            ),
            (
                "I flag clear",
                vxlan_frame(REMOTE_IP, PORT, VNI, 0x00, &local),
                "xdp_pass_wrong_vni",
            ),
            (
                "wrong port",
                vxlan_frame(REMOTE_IP, 8472, VNI, 0x08, &local),
                "xdp_pass_not_vxlan",
            ),
            ("TCP", tcp, "xdp_pass_not_vxlan"),
            ("outer IP options", options, "xdp_pass_ip_options"),
            ("more fragments", more_frags, "xdp_pass_fragment"),
            ("fragment offset", frag_offset, "xdp_pass_fragment"),
            ("inner ARP", inner_arp, "xdp_pass_inner_not_ipv4"),
            (
                "inner dst not local",
                vxlan_frame(
                    REMOTE_IP,
                    PORT,
                    VNI,
                    0x08,
                    &inner_frame(Ipv4Addr::new(10, 244, 1, 99)),
                ),
                "xdp_pass_not_local",
            ),
            (
                "UDP length beyond packet",
                udp_len_lies,
                "xdp_pass_malformed",
            ),
            ("IP length beyond packet", ip_len_lies, "xdp_pass_malformed"),
            ("outer IP version 6", bad_version, "xdp_pass_malformed"),
            (
                "inner IP version 3",
                inner_bad_version,
                "xdp_pass_malformed",
            ),
        ];
        for (what, pkt, counter) in &table {
            let out = h.expect(programs::XDP_UPLINK, pkt, XDP_PASS, counter, what)?;
            assert_eq!(&out, pkt, "{what}: must pass untouched");
        }
        // VXLAN from an address that holds no lease never reaches the
        // kernel's flannel.1, which would take it from anyone.
        h.expect(
            programs::XDP_UPLINK,
            &vxlan_frame(STRANGER_IP, PORT, VNI, 0x08, &local),
            XDP_DROP,
            "xdp_drop_unknown_vtep",
            "unknown node",
        )?;
        // Truncated at every length, across every header boundary (the
        // kernel refuses test frames shorter than an Ethernet header).
        for cut in 14..good.len() {
            let pkt = &good[..cut];
            let out = h.expect(
                programs::XDP_UPLINK,
                pkt,
                XDP_PASS,
                "xdp_pass_malformed",
                &format!("cut at {cut}"),
            )?;
            assert_eq!(out, pkt, "cut at {cut}: untouched");
        }
        // Not configured yet: hands off.
        h.set_config(ns.uplink_index()?, 0)?;
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

        // Next hop not resolved yet: the kernel resolves it (redirect_neigh).
        ns.set_neigh(false)?;
        h.expect(
            programs::TC_FROM_POD,
            &pkt,
            TC_ACT_REDIRECT,
            "pod_encap_neigh",
            "unresolved neighbour",
        )?;

        // Same flow, same source port; other flows spread.
        ns.set_neigh(true)?;
        let (_, again) = h.run(programs::TC_FROM_POD, &pkt)?;
        assert_eq!(&again[34..36], &out[34..36]);
        Ok(())
    })
}

#[test]
fn tc_uplink_ingress_routes_into_local_pods_only() -> Result<()> {
    in_lab_netns(|ns| {
        let h = Harness::new(ns.uplink_index()?)?;
        let up = programs::TC_UPLINK_INGRESS;
        let decapped = eth(
            UPLINK_MAC,
            REMOTE_VTEP_MAC,
            0x0800,
            &ipv4(REMOTE_POD, LOCAL_POD, 1, 63, &icmp_echo()),
        );
        let out = h.expect(
            up,
            &decapped,
            TC_ACT_REDIRECT,
            "uplink_redirect",
            "to local pod",
        )?;
        assert_eq!(&out[0..6], &POD_MAC);
        assert_eq!(&out[6..12], &GATEWAY_MAC);
        assert_eq!(out[22], 62, "routed: TTL - 1");
        assert_eq!(checksum(&out[14..34]), 0);
        let other_mac = eth(
            [0x0e, 1, 2, 3, 4, 5],
            REMOTE_VTEP_MAC,
            0x0800,
            &ipv4(REMOTE_POD, LOCAL_POD, 1, 63, &icmp_echo()),
        );
        h.expect(
            up,
            &other_mac,
            TC_ACT_OK,
            "uplink_pass",
            "not addressed to us",
        )?;
        let ttl1 = eth(
            UPLINK_MAC,
            REMOTE_VTEP_MAC,
            0x0800,
            &ipv4(REMOTE_POD, LOCAL_POD, 1, 1, &icmp_echo()),
        );
        h.expect(up, &ttl1, TC_ACT_OK, "uplink_pass_ttl", "TTL 1")?;
        let vx = vxlan_frame(REMOTE_IP, PORT, VNI, 0x08, &inner_frame(LOCAL_POD));
        h.expect(
            up,
            &vx,
            TC_ACT_OK,
            "uplink_pass",
            "VXLAN to the node itself",
        )?;
        Ok(())
    })
}

#[test]
fn tc_uplink_ingress_decapsulates_when_there_is_no_xdp() -> Result<()> {
    in_lab_netns(|ns| {
        let mut h = Harness::new(ns.uplink_index()?)?;
        h.set_config(ns.uplink_index()?, CONFIG_F_READY | CONFIG_F_TC_DECAP)?;
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
        // Everything the XDP program would pass, TC passes too, intact.
        for (what, pkt) in [
            ("wrong VNI", vxlan_frame(REMOTE_IP, PORT, 7, 0x08, &inner)),
            (
                "wrong port",
                vxlan_frame(REMOTE_IP, 4790, VNI, 0x08, &inner),
            ),
            ("I flag clear", vxlan_frame(REMOTE_IP, PORT, VNI, 0, &inner)),
            (
                "not a local pod",
                vxlan_frame(REMOTE_IP, PORT, VNI, 0x08, &inner_frame(REMOTE_POD)),
            ),
        ] {
            let out = h.expect(up, &pkt, TC_ACT_OK, "uplink_pass", what)?;
            assert_eq!(out, pkt, "{what}: changed");
        }
        // VXLAN from an address that holds no lease is dropped, whatever
        // it carries.
        for inner_dst in [LOCAL_POD, REMOTE_POD] {
            h.expect(
                up,
                &vxlan_frame(STRANGER_IP, PORT, VNI, 0x08, &inner_frame(inner_dst)),
                TC_ACT_SHOT,
                "uplink_drop_unknown_vtep",
                &format!("unknown VTEP, inner {inner_dst}"),
            )?;
        }
        // Without the flag (XDP decapsulates), VXLAN is left alone.
        h.set_config(ns.uplink_index()?, CONFIG_F_READY)?;
        let out = h.expect(up, &vx, TC_ACT_OK, "uplink_pass", "flag off")?;
        assert_eq!(out, vx);
        Ok(())
    })
}

//! Programs run on crafted packets through `BPF_PROG_TEST_RUN` (aya
//! `TestRun`), outside any lab: the parser tests check verdicts and
//! counters with it, the benchmark times each program with it.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use flannel_agent::datapath::ebpf::{ip_key, OBJECT};
use flannel_common::{
    counters, maps, programs, Config, Endpoint, RemoteNode, Vtep, CONFIG_F_READY,
};

use crate::netns::{in_netns, ip};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 9, 1);
pub const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 9, 2);
pub const STRANGER_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 9, 99);
pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
/// The pod the TC test packets come from, registered behind the device a
/// test run uses (the namespace's loopback, ifindex 1).
pub const SOURCE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 12);
pub const TEST_RUN_IFINDEX: u32 = 1;
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
pub const UPLINK_MAC: [u8; 6] = [0x0e, 0xaa, 0, 0, 0, 1];
pub const NEIGH_MAC: [u8; 6] = [0x0e, 0xaa, 0, 0, 0, 2];
pub const VTEP_MAC: [u8; 6] = [0x0e, 0x66, 0, 0, 0, 1];
pub const REMOTE_VTEP_MAC: [u8; 6] = [0x0e, 0x66, 0, 0, 0, 2];
pub const POD_MAC: [u8; 6] = [0x0e, 0x99, 0, 0, 0, 11];
pub const GATEWAY_MAC: [u8; 6] = [0x0e, 0xb7, 10, 244, 1, 1];
pub const VNI: u32 = 1;
pub const PORT: u16 = 4789;

/// A private namespace with an "uplink" that can route to REMOTE_IP.
pub struct Netns(pub String);

impl Netns {
    pub fn new() -> Result<Self> {
        let name = format!("{}-pt", crate::lab::unique_id());
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        let n = ns.0.as_str();
        // A veth pair stands in for the uplink (this kernel has no dummy).
        ip(&[
            "-n", n, "link", "add", "up0", "type", "veth", "peer", "name", "up0p",
        ])?;
        ip(&["-n", n, "link", "set", "up0p", "up"])?;
        ip(&[
            "-n",
            n,
            "link",
            "set",
            "up0",
            "address",
            &mac(UPLINK_MAC),
            "up",
        ])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "up0",
        ])?;
        // The FIB helper refuses to route on a node that does not forward.
        crate::netns::exec(n, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        Ok(ns)
    }

    pub fn set_neigh(&self, present: bool) -> Result<()> {
        let n = self.0.as_str();
        let _ = Command::new("ip")
            .args([
                "-n",
                n,
                "neigh",
                "del",
                &REMOTE_IP.to_string(),
                "dev",
                "up0",
            ])
            .output();
        if present {
            ip(&[
                "-n",
                n,
                "neigh",
                "replace",
                &REMOTE_IP.to_string(),
                "lladdr",
                &mac(NEIGH_MAC),
                "dev",
                "up0",
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    pub fn uplink_index(&self) -> Result<u32> {
        let v: serde_json::Value =
            serde_json::from_str(&ip(&["-n", &self.0, "-j", "link", "show", "up0"])?)?;
        Ok(v[0]["ifindex"].as_u64().context("ifindex")? as u32)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn mac(m: [u8; 6]) -> String {
    flannel_agent::mac::MacAddr(m).to_string()
}

pub struct Harness {
    pub bpf: Ebpf,
}

impl Harness {
    pub fn new(uplink_ifindex: u32) -> Result<Self> {
        let mut bpf = Ebpf::load(OBJECT)?;
        for name in [programs::TC_FROM_POD, programs::TC_UPLINK_INGRESS] {
            let p: &mut SchedClassifier = bpf.program_mut(name).context(name)?.try_into()?;
            p.load()?;
        }
        let x: &mut Xdp = bpf
            .program_mut(programs::XDP_UPLINK)
            .context("xdp")?
            .try_into()?;
        x.load()?;
        let mut h = Harness { bpf };
        h.set_config(uplink_ifindex, CONFIG_F_READY)?;
        let mut remotes: LpmTrie<_, u32, RemoteNode> =
            LpmTrie::try_from(h.bpf.map_mut(maps::REMOTE_SUBNETS).unwrap())?;
        remotes.insert(
            &Key::new(24, ip_key(Ipv4Addr::new(10, 244, 2, 0))),
            RemoteNode {
                node_ip: ip_key(REMOTE_IP),
                vtep_mac: REMOTE_VTEP_MAC,
                _pad: [0; 2],
            },
            0,
        )?;
        let mut vteps: HashMap<_, u32, Vtep> =
            HashMap::try_from(h.bpf.map_mut(maps::VTEPS).unwrap())?;
        vteps.insert(ip_key(REMOTE_IP), Vtep::default(), 0)?;
        let mut eps: HashMap<_, u32, Endpoint> =
            HashMap::try_from(h.bpf.map_mut(maps::ENDPOINTS).unwrap())?;
        eps.insert(
            ip_key(LOCAL_POD),
            Endpoint {
                host_ifindex: 4242,
                pod_mac: POD_MAC,
                _pad: [0; 2],
            },
            0,
        )?;
        eps.insert(
            ip_key(SOURCE_POD),
            Endpoint {
                host_ifindex: TEST_RUN_IFINDEX,
                pod_mac: POD_MAC,
                _pad: [0; 2],
            },
            0,
        )?;
        Ok(h)
    }

    pub fn set_config(&mut self, uplink_ifindex: u32, flags: u32) -> Result<()> {
        let mut cfg: Array<_, Config> = Array::try_from(self.bpf.map_mut(maps::CONFIG).unwrap())?;
        cfg.set(
            0,
            Config {
                vni: VNI,
                udp_port: PORT,
                node_ip: ip_key(NODE_IP),
                uplink_ifindex,
                inner_mtu: 1450,
                flags,
                vtep_mac: VTEP_MAC,
                uplink_mac: UPLINK_MAC,
                gateway_mac: GATEWAY_MAC,
                ..Default::default()
            },
            0,
        )?;
        Ok(())
    }

    pub fn counter(&self, name: &str) -> u64 {
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.bpf.map(maps::COUNTERS).unwrap()).unwrap();
        let idx = counters::index(name).unwrap_or_else(|| panic!("no counter {name}"));
        arr.get(&idx, 0).unwrap().iter().sum()
    }

    pub fn all_counters(&self) -> Vec<u64> {
        counters::NAMES.iter().map(|n| self.counter(n)).collect()
    }

    pub fn run(&self, prog: &str, pkt: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        let res = match prog {
            programs::XDP_UPLINK => {
                let p: &Xdp = self.bpf.program(prog).unwrap().try_into()?;
                p.test_run(opts)?
            }
            _ => {
                let p: &SchedClassifier = self.bpf.program(prog).unwrap().try_into()?;
                p.test_run(opts)?
            }
        };
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// Runs `pkt` and asserts the verdict and that exactly `counter` moved by one.
    pub fn expect(
        &self,
        prog: &str,
        pkt: &[u8],
        verdict: u32,
        counter: &str,
        what: &str,
    ) -> Result<Vec<u8>> {
        let before = self.all_counters();
        let (ret, out) = self
            .run(prog, pkt)
            .with_context(|| format!("{what}: test run"))?;
        let after = self.all_counters();
        let moved: Vec<_> = counters::NAMES
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a != b)
            .map(|(n, (b, a))| (*n, a - b))
            .collect();
        assert_eq!(
            (ret, moved),
            (verdict, vec![(counter, 1)]),
            "{what}: verdict and counters"
        );
        Ok(out)
    }
}

/// An IPv4-over-Ethernet ARP request from `sender` (MAC, address) for
/// `target`.
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    eth([0xff; 6], sender_mac, 0x0806, &a)
}

pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0, 0, ttl, proto, 0, 0];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let len = (h.len() + payload.len()) as u16;
    h[2..4].copy_from_slice(&len.to_be_bytes());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn icmp_echo() -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0, 0, 1, 0, 1];
    p.extend_from_slice(&[0x5a; 32]);
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// A pod frame as it leaves a pod: to the gateway MAC, an ICMP echo.
pub fn pod_frame(dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
    eth(
        GATEWAY_MAC,
        POD_MAC,
        0x0800,
        &ipv4(SOURCE_POD, dst, 1, ttl, &icmp_echo()),
    )
}

/// A VXLAN frame from `src` node as Flannel's VXLAN device builds it.
pub fn vxlan_frame(src: Ipv4Addr, port: u16, vni: u32, flags: u8, inner: &[u8]) -> Vec<u8> {
    let mut vx = vec![flags, 0, 0, 0];
    vx.extend_from_slice(&vni.to_be_bytes()[1..]);
    vx.push(0);
    vx.extend_from_slice(inner);
    let mut udp = 40000u16.to_be_bytes().to_vec();
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&vx);
    eth(
        UPLINK_MAC,
        NEIGH_MAC,
        0x0800,
        &ipv4(src, NODE_IP, 17, 64, &udp),
    )
}

/// What a node sends as the UDP payload to a VXLAN port (VNI 1): the
/// VXLAN header, then an Ethernet frame to `vtep_mac` carrying IPv4 (valid
/// checksum) and UDP `sport -> dport` with `body`.
pub fn vxlan_payload(
    vtep_mac: [u8; 6],
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    body: &[u8],
) -> Vec<u8> {
    let mut udp = sport.to_be_bytes().to_vec();
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + body.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(body);
    let inner = eth(
        vtep_mac,
        [0x0e, 0x0b, 0xad, 0, 0, 1],
        0x0800,
        &ipv4(src, dst, 17, 64, &udp),
    );
    let mut p = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    p.extend_from_slice(&inner);
    p
}

pub fn inner_frame(dst: Ipv4Addr) -> Vec<u8> {
    eth(
        VTEP_MAC,
        REMOTE_VTEP_MAC,
        0x0800,
        &ipv4(REMOTE_POD, dst, 1, 63, &icmp_echo()),
    )
}

pub fn in_lab_netns<T: Send + 'static>(
    f: impl FnOnce(&Netns) -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = Netns::new()?;
    let name = ns.0.clone();
    let ns = std::sync::Arc::new(ns);
    let inner = ns.clone();
    in_netns(&name, move || f(&inner))
}

/// A pod frame of exactly `size` bytes (Ethernet included) to `dst`.
pub fn sized_pod_frame(dst: Ipv4Addr, size: usize) -> Vec<u8> {
    eth(
        GATEWAY_MAC,
        POD_MAC,
        0x0800,
        &ipv4(SOURCE_POD, dst, 17, 64, &vec![0u8; size.saturating_sub(34)]),
    )
}

/// An inner frame of exactly `size` bytes from the remote pod to `dst`.
pub fn sized_inner_frame(dst: Ipv4Addr, size: usize) -> Vec<u8> {
    eth(
        VTEP_MAC,
        REMOTE_VTEP_MAC,
        0x0800,
        &ipv4(REMOTE_POD, dst, 17, 63, &vec![0u8; size.saturating_sub(34)]),
    )
}

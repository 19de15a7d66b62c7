//! Programs run on crafted packets through `BPF_PROG_TEST_RUN` (aya
//! `TestRun`), outside any lab: the parser tests check verdicts and
//! counters with it, the benchmark times each program with it.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
};

use anyhow::{Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use flannel_agent::datapath::ebpf::{ip_key, OBJECT};
use flannel_common::{
    counters, maps, programs, Config, Endpoint, RemoteNode, RemoteNode6, Vtep, CONFIG_F_READY,
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
/// The IPv6 addresses of `LOCAL_POD` and `SOURCE_POD` (dual-stack), and a
/// remote node's pod's.
pub const LOCAL_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x11);
pub const SOURCE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x12);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x30, 9, 0, 0, 0, 0, 1);
pub const REMOTE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x30, 9, 0, 0, 0, 0, 2);
pub const VTEP6_MAC: [u8; 6] = [0x0e, 0x66, 0, 0, 6, 1];
pub const REMOTE_VTEP6_MAC: [u8; 6] = [0x0e, 0x66, 0, 0, 6, 2];
pub const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0x11);
pub const UPLINK_MAC: [u8; 6] = [0x0e, 0xaa, 0, 0, 0, 1];
pub const NEIGH_MAC: [u8; 6] = [0x0e, 0xaa, 0, 0, 0, 2];
pub const VTEP_MAC: [u8; 6] = [0x0e, 0x66, 0, 0, 0, 1];
pub const REMOTE_VTEP_MAC: [u8; 6] = [0x0e, 0x66, 0, 0, 0, 2];
pub const POD_MAC: [u8; 6] = [0x0e, 0x99, 0, 0, 0, 11];
pub const GATEWAY_MAC: [u8; 6] = [0x0e, 0xb7, 10, 244, 1, 1];
pub const VNI: u32 = 1;
pub const PORT: u16 = 4789;
/// The harness's `Network`, 10.0.0.0/8 with /24 leases: 65,536 lease
/// slots, as many as the object declares, so that every lease the cases
/// and `fill` use (10.244.x and 10.128.x up) has one.
pub const NETWORK: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 0);
pub const NETWORK_PREFIX: u8 = 8;
pub const SUBNET_LEN: u8 = 24;

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
        self.set_neigh_mac(present.then_some(NEIGH_MAC))
    }

    /// The uplink's neighbour entry for the remote node: `mac`, or none.
    pub fn set_neigh_mac(&self, mac: Option<[u8; 6]>) -> Result<()> {
        self.set_neigh_of(REMOTE_IP.into(), mac)
    }

    /// The uplink's neighbour entry for `addr` (either family): `mac`, or
    /// none.
    pub fn set_neigh_of(&self, addr: std::net::IpAddr, mac: Option<[u8; 6]>) -> Result<()> {
        let (n, addr) = (self.0.as_str(), addr.to_string());
        let _ = Command::new("ip")
            .args(["-n", n, "neigh", "del", &addr, "dev", "up0"])
            .output();
        if let Some(lladdr) = mac {
            ip(&[
                "-n",
                n,
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &self::mac(lladdr),
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
    /// The GSO segment size the TC test runs' socket buffers get (0: not
    /// GSO).
    pub gso_size: u32,
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
        let mut h = Harness { bpf, gso_size: 0 };
        h.set_config(uplink_ifindex, CONFIG_F_READY)?;
        h.set_remote_vtep(REMOTE_VTEP_MAC)?;
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
        let mut eps6: HashMap<_, [u8; 16], Endpoint> =
            HashMap::try_from(h.bpf.map_mut(maps::ENDPOINTS6).unwrap())?;
        for (ip, ifindex) in [(LOCAL_POD6, 4242), (SOURCE_POD6, TEST_RUN_IFINDEX)] {
            let ep = Endpoint {
                host_ifindex: ifindex,
                pod_mac: POD_MAC,
                _pad: [0; 2],
            };
            eps6.insert(ip.octets(), ep, 0)?;
        }
        Ok(h)
    }

    /// Fills the maps as a big cluster would: `remotes` more remote
    /// subnets (10.128.0.0/24 up, each on its own node, that node a known
    /// VTEP) and `pods` more local endpoints (10.250.0.0 up), beside the
    /// entries the cases use.
    pub fn fill(&mut self, remotes: u32, pods: u32) -> Result<()> {
        let nth = |base: [u8; 2], i: u32, last: u8| {
            Ipv4Addr::new(base[0], base[1] + (i / 256) as u8, (i % 256) as u8, last)
        };
        let node = |i: u32| RemoteNode {
            node_ip: ip_key(nth([172, 100], i, 1)),
            vtep_mac: REMOTE_VTEP_MAC,
            ..Default::default()
        };
        {
            let mut trie: LpmTrie<_, u32, RemoteNode> =
                LpmTrie::try_from(self.bpf.map_mut(maps::REMOTE_SUBNETS).unwrap())?;
            for i in 0..remotes {
                trie.insert(&Key::new(24, ip_key(nth([10, 128], i, 0))), node(i), 0)?;
            }
        }
        for i in 0..remotes {
            self.set_slot(nth([10, 128], i, 0), node(i))?;
        }
        {
            let mut vteps: HashMap<_, u32, Vtep> =
                HashMap::try_from(self.bpf.map_mut(maps::VTEPS).unwrap())?;
            for i in 0..remotes {
                vteps.insert(ip_key(nth([172, 100], i, 1)), Vtep::default(), 0)?;
            }
        }
        let mut eps: HashMap<_, u32, Endpoint> =
            HashMap::try_from(self.bpf.map_mut(maps::ENDPOINTS).unwrap())?;
        for i in 0..pods {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + i);
            eps.insert(
                ip_key(ip),
                Endpoint {
                    host_ifindex: 5000 + i,
                    pod_mac: POD_MAC,
                    _pad: [0; 2],
                },
                0,
            )?;
        }
        Ok(())
    }

    /// The remote lease 10.244.2.0/24 on `REMOTE_IP`, with VTEP MAC `mac`.
    pub fn set_remote_vtep(&mut self, mac: [u8; 6]) -> Result<()> {
        self.set_remote(RemoteNode {
            node_ip: ip_key(REMOTE_IP),
            vtep_mac: mac,
            ..Default::default()
        })
    }

    /// Dual-stack: this node's IPv6 and IPv6 VTEP MAC in the config, and
    /// the remote IPv6 lease fd00:10:244:2::/64 on `REMOTE_IP6`.
    pub fn set_ipv6(&mut self) -> Result<()> {
        self.update_config(|c| {
            c.node_ip6 = NODE_IP6.octets();
            c.vtep6_mac = VTEP6_MAC;
        })?;
        self.set_remote6(RemoteNode6 {
            node_ip6: REMOTE_IP6.octets(),
            vtep_mac: REMOTE_VTEP6_MAC,
            flags: 0,
            _pad: 0,
        })?;
        let mut vteps: HashMap<_, [u8; 16], Vtep> =
            HashMap::try_from(self.bpf.map_mut(maps::VTEPS6).unwrap())?;
        vteps.insert(REMOTE_IP6.octets(), Vtep::default(), 0)?;
        Ok(())
    }

    /// The remote IPv6 lease fd00:10:244:2::/64 as `node` says.
    pub fn set_remote6(&mut self, node: RemoteNode6) -> Result<()> {
        let mut remotes: LpmTrie<_, [u8; 16], RemoteNode6> =
            LpmTrie::try_from(self.bpf.map_mut(maps::REMOTE_SUBNETS6).unwrap())?;
        let subnet: Ipv6Addr = "fd00:10:244:2::".parse()?;
        remotes.insert(&Key::new(64, subnet.octets()), node, 0)?;
        Ok(())
    }

    /// The remote lease 10.244.2.0/24 as `node` says, in the trie and in
    /// its slot, as the agent writes it.
    pub fn set_remote(&mut self, node: RemoteNode) -> Result<()> {
        self.set_remote_trie(node)?;
        self.set_slot(Ipv4Addr::new(10, 244, 2, 0), node)
    }

    /// The remote lease 10.244.2.0/24 as `node` says, in the trie only.
    pub fn set_remote_trie(&mut self, node: RemoteNode) -> Result<()> {
        let mut remotes: LpmTrie<_, u32, RemoteNode> =
            LpmTrie::try_from(self.bpf.map_mut(maps::REMOTE_SUBNETS).unwrap())?;
        remotes.insert(&Key::new(24, ip_key(Ipv4Addr::new(10, 244, 2, 0))), node, 0)?;
        Ok(())
    }

    /// Takes 10.244.2.0/24 out of the trie (its slot stays as it is).
    pub fn remove_remote_trie(&mut self) -> Result<()> {
        let mut remotes: LpmTrie<_, u32, RemoteNode> =
            LpmTrie::try_from(self.bpf.map_mut(maps::REMOTE_SUBNETS).unwrap())?;
        remotes.remove(&Key::new(24, ip_key(Ipv4Addr::new(10, 244, 2, 0))))?;
        Ok(())
    }

    /// The lease slot of the /24 at `subnet` holds `node` (all zero: empty).
    pub fn set_slot(&mut self, subnet: Ipv4Addr, node: RemoteNode) -> Result<()> {
        let cfg: Array<_, Config> = Array::try_from(self.bpf.map(maps::CONFIG).unwrap())?;
        let slot = cfg
            .get(&0, 0)?
            .lease_slot(ip_key(subnet))
            .with_context(|| format!("{subnet} has no lease slot in the harness's network"))?;
        let mut slots: Array<_, RemoteNode> =
            Array::try_from(self.bpf.map_mut(maps::LEASE_SLOTS).unwrap())?;
        slots.set(slot, node, 0)?;
        Ok(())
    }

    /// Changes the config in place (`set_config` writes the whole of it).
    pub fn update_config(&mut self, edit: impl FnOnce(&mut Config)) -> Result<()> {
        let mut cfg: Array<_, Config> = Array::try_from(self.bpf.map_mut(maps::CONFIG).unwrap())?;
        let mut c = cfg.get(&0, 0)?;
        edit(&mut c);
        cfg.set(0, c, 0)?;
        Ok(())
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
                network: ip_key(NETWORK),
                network_mask: ip_key(Ipv4Addr::from(u32::MAX << (32 - NETWORK_PREFIX))),
                lease_shift: u32::from(32 - SUBNET_LEN),
                lease_slots: 1 << (SUBNET_LEN - NETWORK_PREFIX),
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
        // A `__sk_buff` with only `gso_segs` (offset 164) and `gso_size`
        // (offset 176) set, which the kernel copies into the test skb.
        let mut skb = [0u8; 192];
        skb[164..168].copy_from_slice(&1u32.to_ne_bytes());
        skb[176..180].copy_from_slice(&self.gso_size.to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: (self.gso_size != 0 && prog != programs::XDP_UPLINK).then_some(&skb[..]),
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

/// An IPv6 header (hop limit `hops`, next header `next`) and `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, hops: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, hops]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A pod's IPv6 frame, to the gateway MAC: an ICMPv6 echo request from
/// `src` to `dst` with `data` bytes of payload and a valid checksum.
pub fn sized_pod_frame6(src: Ipv6Addr, dst: Ipv6Addr, data: usize) -> Vec<u8> {
    let mut echo = vec![128, 0, 0, 0, 0, 1, 0, 1];
    echo.extend((0..data).map(|i| i as u8));
    let c = checksum6(src, dst, 58, &echo);
    echo[2..4].copy_from_slice(&c.to_be_bytes());
    eth(GATEWAY_MAC, POD_MAC, 0x86dd, &ipv6(src, dst, 58, 64, &echo))
}

/// VXLAN over IPv6 from `src` to this node as `flannel-v6.1` sends it
/// (UDP checksum filled in), carrying `inner` (an Ethernet frame).
pub fn vxlan6_frame(src: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let mut udp = vec![0x9c, 0x40];
    udp.extend_from_slice(&PORT.to_be_bytes());
    udp.extend_from_slice(&((16 + inner.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0, 0x08, 0, 0, 0]);
    udp.extend_from_slice(&VNI.to_be_bytes()[1..]);
    udp.push(0);
    udp.extend_from_slice(inner);
    let c = checksum6(src, NODE_IP6, 17, &udp);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    eth(
        UPLINK_MAC,
        NEIGH_MAC,
        0x86dd,
        &ipv6(src, NODE_IP6, 17, 64, &udp),
    )
}

/// [`sized_pod_frame6`] with 32 bytes of payload.
pub fn pod_frame6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    sized_pod_frame6(src, dst, 32)
}

/// The Internet checksum of `data` under an IPv6 pseudo-header (0 when
/// `data` already carries a valid one).
pub fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, data: &[u8]) -> u16 {
    let mut b = src.octets().to_vec();
    b.extend_from_slice(&dst.octets());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, next]);
    b.extend_from_slice(data);
    if b.len() % 2 == 1 {
        b.push(0);
    }
    checksum(&b)
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

/// Recomputes the IPv4 header checksum of the header at `at` (options
/// included, as its IHL says).
pub fn fix_checksum(f: &mut [u8], at: usize) {
    let ihl = usize::from(f[at] & 0x0f).max(5) * 4;
    f[at + 10..at + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&f[at..at + ihl]);
    f[at + 10..at + 12].copy_from_slice(&c.to_be_bytes());
}

/// The addresses a crafted uplink frame is built from: the progtest
/// constants, or a live lab's.
#[derive(Clone, Debug)]
pub struct Wire {
    /// The receiving node's uplink MAC and IP.
    pub node_mac: [u8; 6],
    pub node_ip: Ipv4Addr,
    /// Outer source MAC of every frame.
    pub sender_mac: [u8; 6],
    /// A node that holds a lease, and one of its pods (inner source).
    pub peer_ip: Ipv4Addr,
    pub peer_pod: Ipv4Addr,
    /// An address that holds no lease.
    pub stranger_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    pub peer_vtep_mac: [u8; 6],
    /// The target pod on the receiving node, another pod there, and an
    /// address in its lease that no pod has.
    pub local_pod: Ipv4Addr,
    pub other_local_pod: Ipv4Addr,
    pub no_pod: Ipv4Addr,
    pub port: u16,
    pub vni: u32,
}

/// UDP port the inner datagrams of crafted frames go to.
pub const CRAFTED_DPORT: u16 = 9999;

impl Wire {
    pub fn progtest() -> Self {
        Wire {
            node_mac: UPLINK_MAC,
            node_ip: NODE_IP,
            sender_mac: NEIGH_MAC,
            peer_ip: REMOTE_IP,
            peer_pod: REMOTE_POD,
            stranger_ip: STRANGER_IP,
            vtep_mac: VTEP_MAC,
            peer_vtep_mac: REMOTE_VTEP_MAC,
            local_pod: LOCAL_POD,
            other_local_pod: SOURCE_POD,
            no_pod: Ipv4Addr::new(10, 244, 1, 99),
            port: PORT,
            vni: VNI,
        }
    }

    /// The inner frame: `src -> dst`, UDP to `CRAFTED_DPORT` with a body
    /// that makes the IPv4 packet `size` bytes (at least 28 + 7).
    pub fn inner(&self, src: Ipv4Addr, dst: Ipv4Addr, size: usize) -> Vec<u8> {
        let body_len = size.saturating_sub(28).max(7);
        let mut udp = 1234u16.to_be_bytes().to_vec();
        udp.extend_from_slice(&CRAFTED_DPORT.to_be_bytes());
        udp.extend_from_slice(&((8 + body_len) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(b"crafted");
        udp.resize(8 + body_len, 0x5a);
        eth(
            self.vtep_mac,
            self.peer_vtep_mac,
            0x0800,
            &ipv4(src, dst, 17, 63, &udp),
        )
    }

    /// A VXLAN frame from `src` carrying `inner`, as a VXLAN device sends it.
    pub fn vxlan(&self, src: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
        let mut vx = vec![0x08, 0, 0, 0];
        vx.extend_from_slice(&self.vni.to_be_bytes()[1..]);
        vx.push(0);
        vx.extend_from_slice(inner);
        let mut udp = 40000u16.to_be_bytes().to_vec();
        udp.extend_from_slice(&self.port.to_be_bytes());
        udp.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&vx);
        eth(
            self.node_mac,
            self.sender_mac,
            0x0800,
            &ipv4(src, self.node_ip, 17, 64, &udp),
        )
    }

    /// The valid frame every crafted one starts from.
    pub fn good(&self) -> Vec<u8> {
        self.vxlan(self.peer_ip, &self.inner(self.peer_pod, self.local_pod, 64))
    }
}

/// Crafted frames for the uplink programs, each with the decap reason
/// (`flannel_common::decap::NAMES`) the kernel's own VXLAN path implies:
/// every header field a hostile sender controls, one at a time, on an
/// otherwise valid VXLAN frame from a known node to a local pod.
pub fn crafted_uplink_frames(w: &Wire) -> Vec<(String, Vec<u8>, &'static str)> {
    const O: Option<usize> = Some(14);
    const I: Option<usize> = Some(64);
    let edit = |what: &str, f: &dyn Fn(&mut Vec<u8>), fix: Option<usize>, reason| {
        let mut p = w.good();
        f(&mut p);
        if let Some(at) = fix {
            fix_checksum(&mut p, at);
        }
        (what.to_string(), p, reason)
    };
    let from_peer = |what: &str, src: Ipv4Addr, dst: Ipv4Addr, size: usize, reason| {
        (
            what.to_string(),
            w.vxlan(w.peer_ip, &w.inner(src, dst, size)),
            reason,
        )
    };
    let be = |v: u16| v.to_be_bytes();
    let mut options = w.good();
    options[14] = 0x46;
    options.splice(34..34, [1u8, 1, 1, 1]);
    let len = be((options.len() - 14) as u16);
    options[16..18].copy_from_slice(&len);
    fix_checksum(&mut options, 14);
    let mut inner_options = w.good();
    inner_options[64] = 0x46;
    inner_options.splice(84..84, [1u8, 1, 1, 1]);
    for (at, by) in [(16, 4u16), (38, 4), (66, 4)] {
        let v = u16::from_be_bytes([inner_options[at], inner_options[at + 1]]) + by;
        inner_options[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    fix_checksum(&mut inner_options, 14);
    fix_checksum(&mut inner_options, 64);
    let arp = arp_request(w.sender_mac, w.stranger_ip, w.node_ip);
    let stranger = w.stranger_ip.octets();
    vec![
        ("valid".into(), w.good(), "decap"),
        ("ARP".into(), arp, "pass_not_ipv4"),
        edit(
            "IPv6 ethertype",
            &|p| p[12..14].copy_from_slice(&be(0x86dd)),
            None,
            "pass_not_ipv4",
        ),
        edit("outer IP version 6", &|p| p[14] = 0x65, O, "pass_malformed"),
        edit("outer IHL 4", &|p| p[14] = 0x44, O, "pass_malformed"),
        edit("to another MAC", &|p| p[5] ^= 0x70, None, "pass_other_host"),
        edit(
            "to broadcast",
            &|p| p[0..6].copy_from_slice(&[0xff; 6]),
            None,
            "pass_other_host",
        ),
        edit("to another IP", &|p| p[33] ^= 0x70, O, "pass_other_host"),
        ("outer IP options".into(), options, "pass_ip_options"),
        edit("more fragments", &|p| p[20] = 0x20, O, "pass_fragment"),
        edit("fragment offset", &|p| p[21] = 0x10, O, "pass_fragment"),
        edit("TCP", &|p| p[23] = 6, O, "pass_not_vxlan"),
        edit(
            "other UDP port",
            &|p| p[36..38].copy_from_slice(&be(8472)),
            None,
            "pass_not_vxlan",
        ),
        edit(
            "UDP length 8",
            &|p| p[38..40].copy_from_slice(&be(8)),
            None,
            "drop_bad_length",
        ),
        edit(
            "UDP length past IP",
            &|p| p[38..40].copy_from_slice(&be(2000)),
            None,
            "drop_bad_length",
        ),
        edit(
            "IP total length 28",
            &|p| p[16..18].copy_from_slice(&be(28)),
            O,
            "drop_bad_length",
        ),
        edit(
            "IP total length past frame",
            &|p| p[16..18].copy_from_slice(&be(3000)),
            O,
            "drop_bad_length",
        ),
        edit(
            "outer IP checksum",
            &|p| p[24] ^= 0x40,
            None,
            "drop_bad_checksum",
        ),
        edit("VXLAN I flag clear", &|p| p[42] = 0, None, "drop_bad_flags"),
        edit(
            "VXLAN flags 0xff",
            &|p| p[42] = 0xff,
            None,
            "drop_bad_flags",
        ),
        edit(
            "VXLAN reserved after flags",
            &|p| p[45] = 1,
            None,
            "drop_bad_flags",
        ),
        edit(
            "VXLAN reserved after VNI",
            &|p| p[49] = 1,
            None,
            "drop_bad_flags",
        ),
        edit("other VNI", &|p| p[48] ^= 0x10, None, "pass_wrong_vni"),
        edit(
            "from an unknown VTEP",
            &|p| p[26..30].copy_from_slice(&stranger),
            O,
            "drop_unknown_vtep",
        ),
        edit(
            "inner ARP",
            &|p| p[62..64].copy_from_slice(&be(0x0806)),
            None,
            "pass_inner_not_ipv4",
        ),
        edit(
            "inner MAC not our VTEP",
            &|p| p[55] ^= 0x70,
            None,
            "drop_inner_mac",
        ),
        edit(
            "inner broadcast MAC",
            &|p| p[50..56].copy_from_slice(&[0xff; 6]),
            None,
            "drop_inner_mac",
        ),
        edit(
            "inner IP version 3",
            &|p| p[64] = 0x35,
            I,
            "drop_inner_malformed",
        ),
        ("inner IP options".into(), inner_options, "pass_ip_options"),
        edit(
            "inner total length 12",
            &|p| p[66..68].copy_from_slice(&be(12)),
            I,
            "drop_inner_malformed",
        ),
        edit(
            "inner total length past outer",
            &|p| p[66..68].copy_from_slice(&be(1000)),
            I,
            "drop_inner_malformed",
        ),
        edit(
            "inner IP checksum",
            &|p| p[74] ^= 0x40,
            None,
            "drop_inner_malformed",
        ),
        from_peer(
            "inner source 8.8.8.8",
            Ipv4Addr::new(8, 8, 8, 8),
            w.local_pod,
            64,
            "drop_inner_source",
        ),
        from_peer(
            "inner source a local pod",
            w.other_local_pod,
            w.local_pod,
            64,
            "drop_inner_source",
        ),
        from_peer(
            "inner destination not a pod",
            w.peer_pod,
            w.no_pod,
            64,
            "pass_not_local",
        ),
        from_peer(
            "inner packet above the pod MTU",
            w.peer_pod,
            w.local_pod,
            1500,
            "pass_too_big",
        ),
        // Not verified in eBPF (see flannel_common::decap::classify).
        edit("wrong UDP checksum", &|p| p[41] = 1, None, "decap"),
    ]
}

/// The addresses a crafted pod frame is built from: a sending pod on the
/// node under test, its node, another pod there and one on another node.
#[derive(Clone, Debug)]
pub struct PodWire {
    pub pod_mac: [u8; 6],
    pub pod_ip: Ipv4Addr,
    /// `cni0`'s MAC and address (the pod's gateway).
    pub gateway_mac: [u8; 6],
    pub gateway_ip: Ipv4Addr,
    /// The node's address on the node network.
    pub node_ip: Ipv4Addr,
    pub local_mac: [u8; 6],
    pub local_pod: Ipv4Addr,
    pub remote_pod: Ipv4Addr,
    /// An address in the other node's lease that no pod holds.
    pub remote_no_pod: Ipv4Addr,
}

/// Where a crafted pod frame's UDP datagram goes, for the test to listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodTarget {
    /// The pod on the other node.
    Remote,
    /// The other pod on the same node.
    Local,
    /// The node itself (the gateway's address).
    Node,
    /// The node, on DHCP's server port (any address, broadcasts too).
    NodeDhcp,
    /// No datagram to listen for (ARP, IPv6, malformed headers...).
    Nothing,
}

/// One crafted frame a pod sends.
pub struct PodCase {
    pub name: &'static str,
    pub frame: Vec<u8>,
    /// The `tc_from_pod` counter it moves (`pod_` + this); `encap` is
    /// either of `pod_encap_redirect` / `pod_encap_neigh` (which one
    /// depends on the node's neighbour cache).
    pub reason: &'static str,
    pub target: PodTarget,
    /// Whether the kernel's own path (Flannel's bridge, `flannel.1`, the
    /// receiving stack, this project's bridge guard) delivers the datagram
    /// to `target`: the verdict the eBPF path must give too.
    pub delivers: bool,
}

impl PodWire {
    /// UDP from `src` to `dst`:`CRAFTED_DPORT`, no UDP checksum, as an
    /// IPv4 packet of `ttl`.
    fn udp(&self, src: Ipv4Addr, dst: Ipv4Addr, ttl: u8) -> Vec<u8> {
        let mut udp = 1234u16.to_be_bytes().to_vec();
        udp.extend_from_slice(&CRAFTED_DPORT.to_be_bytes());
        udp.extend_from_slice(&15u16.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(b"crafted");
        ipv4(src, dst, 17, ttl, &udp)
    }

    /// The frame a pod sends: to the gateway's MAC, or to the local pod's
    /// for an address on its own bridge.
    fn frame(&self, dst_ip: Ipv4Addr, ip: &[u8]) -> Vec<u8> {
        let dst = if dst_ip == self.local_pod {
            self.local_mac
        } else {
            self.gateway_mac
        };
        eth(dst, self.pod_mac, 0x0800, ip)
    }

    fn arp(&self, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        arp_request(self.pod_mac, sender, target)
    }
}

/// Crafted frames a pod sends from its `eth0`, each with the verdict the
/// pod program must give and the kernel path's delivery: the pod's own
/// traffic (controls), spoofed sources (another pod, the node, outside,
/// DHCP's 0.0.0.0), headers truncated at each boundary or inconsistent,
/// TTL, fragments, options, ARP as pods use it (probe, gateway lookup)
/// and as an attacker would, IPv6 link-local and other ethertypes.
pub fn crafted_pod_frames(w: &PodWire) -> Vec<PodCase> {
    use PodTarget::*;
    let own = |dst| w.frame(dst, &w.udp(w.pod_ip, dst, 64));
    let edit = |dst, f: &dyn Fn(&mut Vec<u8>), fix: bool| {
        let mut p = own(dst);
        f(&mut p);
        if fix {
            fix_checksum(&mut p, 14);
        }
        p
    };
    let spoofed = |src, dst| w.frame(dst, &w.udp(src, dst, 64));
    let case = |name, frame, reason, target, delivers| PodCase {
        name,
        frame,
        reason,
        target,
        delivers,
    };
    // A UDP datagram in two fragments (16 + 8 bytes of its 24).
    let fragment = |offset8: u16, more: bool, body: &[u8]| {
        let mut ip = ipv4(w.pod_ip, w.remote_pod, 17, 64, body);
        ip[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
        let ff = (u16::from(more) << 13) | offset8;
        ip[6..8].copy_from_slice(&ff.to_be_bytes());
        let mut f = w.frame(w.remote_pod, &ip);
        fix_checksum(&mut f, 14);
        f
    };
    let mut datagram = 1234u16.to_be_bytes().to_vec();
    datagram.extend_from_slice(&CRAFTED_DPORT.to_be_bytes());
    datagram.extend_from_slice(&24u16.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(b"fragmented-body!");
    let with_options = {
        let ip = w.udp(w.pod_ip, w.remote_pod, 64);
        let mut o = vec![0x46];
        o.extend_from_slice(&ip[1..20]);
        o.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
        o.extend_from_slice(&ip[20..]);
        let len = o.len() as u16;
        o[2..4].copy_from_slice(&len.to_be_bytes());
        let mut f = w.frame(w.remote_pod, &o);
        fix_checksum(&mut f, 14);
        f
    };
    let mut dhcp = eth([0xff; 6], w.pod_mac, 0x0800, &{
        let mut udp = 68u16.to_be_bytes().to_vec();
        udp.extend_from_slice(&67u16.to_be_bytes());
        udp.extend_from_slice(&16u16.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&[1, 1, 6, 0, 0xde, 0xad, 0xbe, 0xef]);
        ipv4(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 17, 64, &udp)
    });
    fix_checksum(&mut dhcp, 14);
    let mut neighbour_solicitation = vec![0x60, 0, 0, 0, 0, 24, 58, 255];
    neighbour_solicitation
        .extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    neighbour_solicitation
        .extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2]);
    neighbour_solicitation.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    neighbour_solicitation
        .extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    let ns_frame = eth(
        [0x33, 0x33, 0xff, 0, 0, 2],
        w.pod_mac,
        0x86dd,
        &neighbour_solicitation,
    );
    let mut arp_htype = w.arp(w.pod_ip, w.gateway_ip);
    arp_htype[14..16].copy_from_slice(&6u16.to_be_bytes());
    let good_remote = own(w.remote_pod);
    vec![
        case(
            "own source, to a pod on another node",
            own(w.remote_pod),
            "encap",
            Remote,
            true,
        ),
        case(
            "own source, to a pod on this node",
            own(w.local_pod),
            "local_redirect",
            Local,
            true,
        ),
        case(
            "own source, to the node",
            own(w.gateway_ip),
            "pass_not_pod_dst",
            Node,
            true,
        ),
        case(
            "own source, TTL 1 across nodes",
            w.frame(w.remote_pod, &w.udp(w.pod_ip, w.remote_pod, 1)),
            "pass_ttl",
            Remote,
            false,
        ),
        case(
            "own source, TTL 1 on this node (bridged)",
            w.frame(w.local_pod, &w.udp(w.pod_ip, w.local_pod, 1)),
            "local_redirect",
            Local,
            true,
        ),
        case(
            "own source, IP options",
            with_options,
            "encap",
            Remote,
            true,
        ),
        case(
            "fragment 1 of 2",
            fragment(0, true, &datagram[..16]),
            "encap",
            Remote,
            false,
        ),
        case(
            "fragment 2 of 2 (completes the datagram)",
            fragment(2, false, &datagram[16..]),
            "encap",
            Remote,
            true,
        ),
        case(
            "own source, to an address no pod holds",
            own(w.remote_no_pod),
            "encap",
            Nothing,
            false,
        ),
        case(
            "wrong IP checksum, across nodes",
            edit(w.remote_pod, &|p| p[24] ^= 0xff, false),
            "encap",
            Remote,
            false,
        ),
        case(
            "wrong IP checksum, on this node",
            edit(w.local_pod, &|p| p[24] ^= 0xff, false),
            "local_redirect",
            Local,
            false,
        ),
        case(
            "IP total length past the frame",
            edit(
                w.remote_pod,
                &|p| p[16..18].copy_from_slice(&600u16.to_be_bytes()),
                true,
            ),
            "encap",
            Remote,
            false,
        ),
        case(
            "IP total length above the pod MTU",
            edit(
                w.remote_pod,
                &|p| p[16..18].copy_from_slice(&9000u16.to_be_bytes()),
                true,
            ),
            "pass_too_big",
            Remote,
            false,
        ),
        case(
            "IHL 4",
            edit(w.remote_pod, &|p| p[14] = 0x44, true),
            "pass_malformed",
            Remote,
            false,
        ),
        case(
            "IP version 6 in an IPv4 frame",
            edit(w.remote_pod, &|p| p[14] = 0x65, true),
            "pass_malformed",
            Remote,
            false,
        ),
        case(
            "Ethernet header only",
            good_remote[..14].to_vec(),
            "pass_malformed",
            Nothing,
            false,
        ),
        case(
            "IPv4 header cut at 19 bytes",
            good_remote[..33].to_vec(),
            "pass_malformed",
            Nothing,
            false,
        ),
        case(
            "spoofed: another pod on this node, across nodes",
            spoofed(w.local_pod, w.remote_pod),
            "drop_spoofed_src",
            Remote,
            false,
        ),
        case(
            "spoofed: a pod on another node, on this node",
            spoofed(w.remote_pod, w.local_pod),
            "drop_spoofed_src",
            Local,
            false,
        ),
        case(
            "spoofed: the node's address",
            spoofed(w.node_ip, w.remote_pod),
            "drop_spoofed_src",
            Remote,
            false,
        ),
        case(
            "spoofed: the gateway's address",
            spoofed(w.gateway_ip, w.local_pod),
            "drop_spoofed_src",
            Local,
            false,
        ),
        case(
            "spoofed: an outside address",
            spoofed(Ipv4Addr::new(8, 8, 8, 8), w.remote_pod),
            "drop_spoofed_src",
            Remote,
            false,
        ),
        case(
            "DHCP discover from 0.0.0.0 (pods are addressed by IPAM)",
            dhcp,
            "drop_spoofed_src",
            NodeDhcp,
            false,
        ),
        case(
            "ARP for the gateway",
            w.arp(w.pod_ip, w.gateway_ip),
            "pass_not_ipv4",
            Nothing,
            false,
        ),
        case(
            "ARP probe (sender 0.0.0.0, RFC 5227)",
            w.arp(Ipv4Addr::UNSPECIFIED, w.local_pod),
            "pass_not_ipv4",
            Nothing,
            false,
        ),
        case(
            "ARP as another pod",
            w.arp(w.local_pod, w.gateway_ip),
            "drop_spoofed_arp",
            Nothing,
            false,
        ),
        case(
            "ARP as the gateway",
            w.arp(w.gateway_ip, w.local_pod),
            "drop_spoofed_arp",
            Nothing,
            false,
        ),
        case(
            "ARP cut after the operation",
            w.arp(w.pod_ip, w.gateway_ip)[..22].to_vec(),
            "pass_malformed",
            Nothing,
            false,
        ),
        case(
            "ARP, not Ethernet hardware",
            arp_htype,
            "pass_not_ipv4",
            Nothing,
            false,
        ),
        case(
            "IPv6 link-local neighbour solicitation",
            ns_frame,
            "pass_not_ipv4",
            Nothing,
            false,
        ),
        case(
            "unknown ethertype",
            eth(w.gateway_mac, w.pod_mac, 0x88b5, b"local experimental"),
            "pass_not_ipv4",
            Nothing,
            false,
        ),
    ]
}

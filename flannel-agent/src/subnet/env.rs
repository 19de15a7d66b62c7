//! `/run/flannel/subnet.env`: what the CNI plugin reads, in Flannel's keys.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`; `None` in an IPv6-only cluster (as
    /// `FLANNEL_SUBNET`: Flannel writes neither there).
    pub network: Option<Ipv4Net>,
    /// The lease with the gateway address: `10.244.1.1/24`.
    pub subnet: Option<Ipv4Net>,
    /// With IPv6: `FLANNEL_IPV6_NETWORK` and `FLANNEL_IPV6_SUBNET` (the
    /// IPv6 lease with its gateway address, `fd00:10:244:1::1/64`).
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    pub fn new(network: Ipv4Net, lease: Ipv4Net, mtu: u32, ipmasq: bool) -> Self {
        let gw = Ipv4Addr::from(u32::from(lease.network()) + 1);
        SubnetEnv {
            network: Some(network),
            subnet: Some(Ipv4Net::new(gw, lease.prefix_len()).expect("prefix from a valid net")),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu,
            ipmasq,
        }
    }

    /// The IPv6 pair beside the IPv4 one: the network and the node's IPv6
    /// lease, written with its first address as Flannel writes it.
    pub fn with_ipv6(mut self, network: Ipv6Net, lease: Ipv6Net) -> Self {
        let gw = Ipv6Addr::from(u128::from(lease.network()) + 1);
        self.ipv6_network = Some(network);
        self.ipv6_subnet =
            Some(Ipv6Net::new(gw, lease.prefix_len()).expect("prefix from a valid net"));
        self
    }

    /// The file for whichever families the cluster has: `v4` and `v6` as
    /// (network, lease) pairs; an IPv6-only cluster's has the IPv6 pair
    /// alone.
    pub fn of(
        v4: Option<(Ipv4Net, Ipv4Net)>,
        v6: Option<(Ipv6Net, Ipv6Net)>,
        mtu: u32,
        ipmasq: bool,
    ) -> Self {
        let env = match v4 {
            Some((network, lease)) => SubnetEnv::new(network, lease, mtu, ipmasq),
            None => SubnetEnv {
                network: None,
                subnet: None,
                ipv6_network: None,
                ipv6_subnet: None,
                mtu,
                ipmasq,
            },
        };
        match v6 {
            Some((network, lease)) => env.with_ipv6(network, lease),
            None => env,
        }
    }

    /// Flannel's file, in its order: the IPv4 pair, the IPv6 pair, MTU,
    /// masquerading.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let (Some(n), Some(s)) = (self.network, self.subnet) {
            out += &format!("FLANNEL_NETWORK={n}\nFLANNEL_SUBNET={s}\n");
        }
        if let (Some(n), Some(s)) = (self.ipv6_network, self.ipv6_subnet) {
            out += &format!("FLANNEL_IPV6_NETWORK={n}\nFLANNEL_IPV6_SUBNET={s}\n");
        }
        out += &format!("FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n", self.mtu, self.ipmasq);
        out
    }

    /// The IPv6 lease this file names (`fd00:10:244:1::/64`).
    pub fn lease6(&self) -> Option<Ipv6Net> {
        self.ipv6_subnet.map(|s| s.trunc())
    }

    /// Parses the file; unknown keys are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut network = None;
        let mut subnet = None;
        let mut ipv6_network = None;
        let mut ipv6_subnet = None;
        let mut mtu = None;
        let mut ipmasq = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?} is not KEY=VALUE"))?;
            let bad = |what: &str| format!("{k}={v} is not {what}");
            match k {
                "FLANNEL_NETWORK" => network = Some(v.parse().map_err(|_| bad("a CIDR"))?),
                "FLANNEL_SUBNET" => subnet = Some(v.parse().map_err(|_| bad("a CIDR"))?),
                "FLANNEL_IPV6_NETWORK" => {
                    ipv6_network = Some(v.parse().map_err(|_| bad("an IPv6 CIDR"))?)
                }
                "FLANNEL_IPV6_SUBNET" => {
                    ipv6_subnet = Some(v.parse().map_err(|_| bad("an IPv6 CIDR"))?)
                }
                "FLANNEL_MTU" => mtu = Some(v.parse().map_err(|_| bad("a number"))?),
                "FLANNEL_IPMASQ" => ipmasq = Some(v.parse().map_err(|_| bad("true or false"))?),
                _ => {}
            }
        }
        if ipv6_network.is_some() != ipv6_subnet.is_some() {
            return Err(
                "FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET go together: one is missing".into(),
            );
        }
        // IPv4 or not at all (an IPv6-only cluster's file has the IPv6
        // pair alone).
        if ipv6_network.is_none() || network.is_some() || subnet.is_some() {
            network.ok_or("FLANNEL_NETWORK is missing")?;
            subnet.ok_or("FLANNEL_SUBNET is missing")?;
        }
        Ok(SubnetEnv {
            network,
            subnet,
            ipv6_network,
            ipv6_subnet,
            mtu: mtu.ok_or("FLANNEL_MTU is missing")?,
            ipmasq: ipmasq.unwrap_or(false),
        })
    }

    /// The lease subnet this file names (`10.244.1.0/24`); `None` in an
    /// IPv6-only cluster.
    pub fn lease(&self) -> Option<Ipv4Net> {
        self.subnet.map(|s| s.trunc())
    }

    pub fn read(path: &Path) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Writes the file atomically (temp file in the same directory + rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::fsutil::write_atomic(path, self.render().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flannels_keys_and_reads_them_back() {
        let env = SubnetEnv::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.7.0/24".parse().unwrap(),
            1450,
            true,
        );
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&env.render()).unwrap(), env);
        assert_eq!(
            env.lease(),
            Some("10.244.7.0/24".parse::<Ipv4Net>().unwrap())
        );
        let dir = std::env::temp_dir().join(format!("subnet-env-{}", std::process::id()));
        let path = dir.join("subnet.env");
        env.write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path), Some(env.clone()));
        std::fs::remove_dir_all(dir).unwrap();
        // Dual-stack: Flannel's file, key for key, in its order.
        let dual = env.clone().with_ipv6(
            "fd00:10:244::/56".parse().unwrap(),
            "fd00:10:244:7::/64".parse().unwrap(),
        );
        assert_eq!(
            dual.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&dual.render()).unwrap(), dual);
        assert_eq!(dual.lease6(), Some("fd00:10:244:7::/64".parse().unwrap()));
        assert_eq!(env.lease6(), None);
        // IPv6-only: Flannel writes the IPv6 pair alone.
        let only6 = SubnetEnv::of(
            None,
            Some((
                "fd00:10:244::/56".parse().unwrap(),
                "fd00:10:244:7::/64".parse().unwrap(),
            )),
            1430,
            false,
        );
        assert_eq!(
            only6.render(),
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
        );
        assert_eq!(SubnetEnv::parse(&only6.render()).unwrap(), only6);
        assert_eq!((only6.lease(), only6.network), (None, None));
        for (bad, want) in [
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_IPV6_SUBNET=10.0.0.1/24\nFLANNEL_MTU=1",
                "FLANNEL_IPV6_SUBNET=10.0.0.1/24 is not an IPv6 CIDR",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_MTU=1",
                "go together",
            ),
            (
                "FLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450",
                "FLANNEL_NETWORK is missing",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=x\nFLANNEL_MTU=1",
                "FLANNEL_SUBNET=x is not a CIDR",
            ),
            ("garbage", "not KEY=VALUE"),
            (
                "FLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00::1/64\nFLANNEL_MTU=1",
                "FLANNEL_NETWORK is missing",
            ),
        ] {
            assert!(SubnetEnv::parse(bad).unwrap_err().contains(want), "{bad}");
        }
    }
}

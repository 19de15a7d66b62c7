//! Ethernet MAC addresses: parsing, printing, and the VtepMAC derivation.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex octets like 0e:12:34:56:78:9a")]
pub struct MacParseError(pub String);

impl MacAddr {
    /// A stable, locally administered unicast MAC derived from the node IP
    /// and VNI, so that a restarted agent recreates the same VTEP.
    pub fn for_vtep(node_ip: std::net::Ipv4Addr, vni: u32) -> Self {
        let o = node_ip.octets();
        let v = vni.to_be_bytes();
        // 0x0e: locally administered, unicast.
        MacAddr([0x0e, o[0] ^ v[3], o[1] ^ v[2], o[2], o[3], 0x01 ^ v[1]])
    }

    /// A stable VtepMAC for `flannel-v6.<VNI>`, from the node's IPv6
    /// address: its last four bytes, so that nodes numbered in a row
    /// differ, and a byte that tells it from the IPv4 device's.
    pub fn for_vtep6(node_ip: std::net::Ipv6Addr, vni: u32) -> Self {
        let o = node_ip.octets();
        let v = vni.to_be_bytes();
        MacAddr([0x0e, 0x06 ^ v[3], o[12], o[13], o[14], o[15]])
    }

    /// The fixed MAC of the pod bridge, so that the gateway MAC the data
    /// path writes does not follow the bridge's ports.
    pub fn for_bridge(gateway: std::net::Ipv4Addr) -> Self {
        let o = gateway.octets();
        MacAddr([0x0e, 0xb7, o[0], o[1], o[2], o[3]])
    }

    /// The bridge's MAC in an IPv6-only cluster, from its IPv6 gateway:
    /// the address's bits 32 to 63 (where the node's lease sits in a
    /// network of /64 leases).
    pub fn for_bridge6(gateway: std::net::Ipv6Addr) -> Self {
        let o = gateway.octets();
        MacAddr([0x0e, 0xb6, o[4], o[5], o[6], o[7]])
    }

    /// The bridge's MAC from its gateways, as the agent and the CNI plugin
    /// both set it: from the IPv4 one, or without IPv4 from the IPv6 one.
    pub fn for_bridge_of(
        gateway: Option<std::net::Ipv4Addr>,
        gateway6: Option<std::net::Ipv6Addr>,
    ) -> Self {
        match (gateway, gateway6) {
            (None, Some(g6)) => Self::for_bridge6(g6),
            (g, _) => Self::for_bridge(g.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)),
        }
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok = [
            ("0e:00:00:00:00:01", [0x0e, 0, 0, 0, 0, 1]),
            ("AA:bb:CC:dd:EE:ff", [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<MacAddr>().unwrap().0, want, "{s}");
        }
        for bad in [
            "",
            "0e:00:00:00:00",
            "0e:00:00:00:00:01:02",
            "0e-00-00-00-00-01",
            "0e:0:00:00:00:01",
            "zz:00:00:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn display_round_trips() {
        let m: MacAddr = "0e:12:34:56:78:9a".parse().unwrap();
        assert_eq!(m.to_string(), "0e:12:34:56:78:9a");
    }

    #[test]
    fn vtep_mac_is_stable_local_unicast() {
        let a = MacAddr::for_vtep("10.0.0.1".parse().unwrap(), 1);
        let b = MacAddr::for_vtep("10.0.0.1".parse().unwrap(), 1);
        let c = MacAddr::for_vtep("10.0.0.2".parse().unwrap(), 1);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.is_unicast());
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered bit");
    }
}

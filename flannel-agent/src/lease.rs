//! The static lease file: every node's subnet, public IP and VtepMAC.
//!
//! This is the first-cut subnet source; the subnet managers (local, etcd,
//! Kubernetes) replace it. Format: a JSON list of
//! `{"subnet": "10.244.1.0/24", "public_ip": "10.0.0.1", "vtep_mac": "0e:…"}`.

use std::{collections::HashSet, net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("reading lease file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("lease file {path} is not a JSON list of leases: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("lease for {public_ip}: subnet {subnet} is not a network address (did you mean {}?)", .subnet.trunc())]
    NotNetwork {
        public_ip: Ipv4Addr,
        subnet: Ipv4Net,
    },
    #[error("lease for {public_ip}: VtepMAC {mac} is not a unicast address")]
    BadMac { public_ip: Ipv4Addr, mac: MacAddr },
    #[error("subnets {a} and {b} overlap")]
    Overlap { a: Ipv4Net, b: Ipv4Net },
    #[error("public IP {0} holds more than one lease")]
    DuplicateNode(Ipv4Addr),
}

/// Parses and validates a lease list.
pub fn parse(path: &str, text: &str) -> Result<Vec<Lease>, LeaseError> {
    let leases: Vec<Lease> = serde_json::from_str(text).map_err(|source| LeaseError::Parse {
        path: path.to_string(),
        source,
    })?;
    validate(&leases)?;
    Ok(leases)
}

pub fn load(path: &Path) -> Result<Vec<Lease>, LeaseError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LeaseError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)
}

pub fn validate(leases: &[Lease]) -> Result<(), LeaseError> {
    let mut nodes = HashSet::new();
    for (i, l) in leases.iter().enumerate() {
        if l.subnet.trunc() != l.subnet {
            return Err(LeaseError::NotNetwork {
                public_ip: l.public_ip,
                subnet: l.subnet,
            });
        }
        if !l.vtep_mac.is_unicast() {
            return Err(LeaseError::BadMac {
                public_ip: l.public_ip,
                mac: l.vtep_mac,
            });
        }
        if !nodes.insert(l.public_ip) {
            return Err(LeaseError::DuplicateNode(l.public_ip));
        }
        for other in &leases[..i] {
            if other.subnet.contains(&l.subnet) || l.subnet.contains(&other.subnet) {
                return Err(LeaseError::Overlap {
                    a: other.subnet,
                    b: l.subnet,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"[
        {"subnet":"10.244.1.0/24","public_ip":"10.0.0.1","vtep_mac":"0e:00:00:00:00:01"},
        {"subnet":"10.244.2.0/24","public_ip":"10.0.0.2","vtep_mac":"0e:00:00:00:00:02"}
    ]"#;

    #[test]
    fn good_file_parses() {
        let l = parse("t", GOOD).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].subnet, "10.244.2.0/24".parse().unwrap());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let table = [
            ("{}", "not a JSON list"),
            ("[{\"subnet\":\"10.244.1.0/24\"}]", "not a JSON list"),
            (
                r#"[{"subnet":"10.244.1.5/24","public_ip":"10.0.0.1","vtep_mac":"0e:00:00:00:00:01"}]"#,
                "not a network address",
            ),
            (
                r#"[{"subnet":"10.244.1.0/24","public_ip":"10.0.0.1","vtep_mac":"01:00:00:00:00:01"}]"#,
                "not a unicast",
            ),
            (
                r#"[{"subnet":"10.244.1.0/24","public_ip":"10.0.0.1","vtep_mac":"0e:00:00:00:00:01"},
                {"subnet":"10.244.0.0/16","public_ip":"10.0.0.2","vtep_mac":"0e:00:00:00:00:02"}]"#,
                "overlap",
            ),
            (
                r#"[{"subnet":"10.244.1.0/24","public_ip":"10.0.0.1","vtep_mac":"0e:00:00:00:00:01"},
                {"subnet":"10.244.2.0/24","public_ip":"10.0.0.1","vtep_mac":"0e:00:00:00:00:02"}]"#,
                "more than one lease",
            ),
            (
                r#"[{"subnet":"10.244.1.0/24","public_ip":"10.0.0.1","vtep_mac":"0e:00:00:00:00:01","x":1}]"#,
                "unknown field",
            ),
        ];
        for (text, want) in table {
            let err = parse("t", text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: got {err:?}, want {want:?}");
        }
    }
}

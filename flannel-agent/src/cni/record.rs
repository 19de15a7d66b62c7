//! One file per attachment in the plugin's `dataDir`: what ADD did, so
//! that DEL and GC can undo it after subnet.env or the network namespace
//! are gone (Flannel keeps its delegate config there for the same
//! reason), and so that an agent that was down during ADD can find the
//! pod later.
//!
//! Files are `<containerID>-<ifname>.json`; Flannel's own files in the
//! same directory (named by container ID, no suffix) are left alone.

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::mac::MacAddr;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The network's `name`.
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    /// The pod's address with the lease's prefix length, and its gateway;
    /// `None` in an IPv6-only cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Dual-stack: the pod's IPv6 address (with the IPv6 lease's prefix
    /// length) and its gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<ipnet::Ipv6Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<std::net::Ipv6Addr>,
    pub mac: MacAddr,
    pub host_ifname: String,
    pub bridge: String,
    /// Whether the plugin masquerades this pod.
    pub masq: bool,
    /// The IPAM plugin's name and the stdin it was given (with the
    /// version it accepted), replayed for DEL.
    pub ipam_type: String,
    pub ipam: Map<String, Value>,
    /// DEL has started: the agent must not register this pod again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

pub fn path(dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    dir.join(format!("{container_id}-{ifname}.json"))
}

impl Record {
    /// The pod as the agent registers it.
    pub fn endpoint(&self) -> crate::api::EndpointRecord {
        crate::api::EndpointRecord {
            ip: self.ip.map(|n| n.addr()),
            mac: self.mac,
            host_ifname: self.host_ifname.clone(),
            ip6: self.ip6.map(|n| n.addr()),
        }
    }

    /// The pod's name with the agent (`EndpointRecord::key`): its IPv4
    /// address, or in an IPv6-only cluster its IPv6 one.
    pub fn key(&self) -> Option<std::net::IpAddr> {
        self.endpoint().key()
    }

    pub fn path(&self, dir: &Path) -> PathBuf {
        path(dir, &self.container_id, &self.ifname)
    }

    /// Writes atomically (temp file + rename in the same directory).
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        crate::fsutil::write_atomic(&self.path(dir), &bytes)
    }

    pub fn load(dir: &Path, container_id: &str, ifname: &str) -> io::Result<Option<Self>> {
        match std::fs::read(path(dir, container_id, ifname)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the IPAM plugin still holds this address for this
    /// attachment. Only host-local's files can be read; other IPAM
    /// plugins are trusted.
    pub fn ipam_holds(&self) -> bool {
        if self.ipam_type != "host-local" {
            return true;
        }
        let Some(key) = self.key() else {
            return false;
        };
        let file = host_local_dir(&self.ipam, &self.network).join(key.to_string());
        std::fs::read_to_string(file)
            .is_ok_and(|t| t.lines().next().map(str::trim) == Some(self.container_id.as_str()))
    }
}

pub fn remove(dir: &Path, container_id: &str, ifname: &str) -> io::Result<()> {
    match std::fs::remove_file(path(dir, container_id, ifname)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Every record in `dir`. Unreadable files are reported, not fatal.
pub fn list(dir: &Path) -> (Vec<Record>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (out, bad);
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&p)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => out.push(r),
            Err(e) => bad.push(format!("{}: {e}", p.display())),
        }
    }
    out.sort_by_key(Record::key);
    (out, bad)
}

/// host-local's directory for `network`: `<ipam.dataDir>/<network>`.
pub fn host_local_dir(ipam: &Map<String, Value>, network: &str) -> PathBuf {
    let base = ipam
        .get("ipam")
        .and_then(|i| i.get("dataDir"))
        .or_else(|| ipam.get("dataDir"))
        .and_then(Value::as_str)
        .unwrap_or("/var/lib/cni/networks");
    Path::new(base).join(network)
}

/// The host side of an attachment's veth: `vethfl` and 8 hex digits of
/// a hash of (container ID, ifname). Stable, so DEL finds it without a
/// record; its own prefix, so GC never touches other plugins' veths.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bit: stable across builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{HOST_PREFIX}{:08x}", (h ^ (h >> 32)) as u32)
}

pub const HOST_PREFIX: &str = "vethfl";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with(HOST_PREFIX));
        let mut seen = std::collections::HashSet::new();
        for i in 0..5000 {
            assert!(seen.insert(host_ifname(&format!("c{i}"), "eth0")));
        }
        assert_ne!(host_ifname("abc", "eth1"), a);
    }

    #[test]
    fn records_round_trip_and_bad_files_are_reported() {
        let dir = std::env::temp_dir().join(format!("flannel-rec-{}", std::process::id()));
        let r = Record {
            network: "cbr0".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            ip: Some("10.244.1.5/24".parse().unwrap()),
            gateway: Some("10.244.1.1".parse().unwrap()),
            ip6: Some("fd00:10:244:1::5/64".parse().unwrap()),
            gateway6: Some("fd00:10:244:1::1".parse().unwrap()),
            mac: "0a:00:00:00:00:05".parse().unwrap(),
            host_ifname: host_ifname("c1", "eth0"),
            bridge: "cni0".into(),
            masq: false,
            ipam_type: "host-local".into(),
            ipam: serde_json::json!({"cniVersion":"1.0.0","ipam":{"type":"host-local","dataDir":dir.join("ipam")}})
                .as_object()
                .unwrap()
                .clone(),
            deleting: false,
        };
        r.save(&dir).unwrap();
        std::fs::write(dir.join("junk.json"), "{").unwrap();
        std::fs::write(dir.join("c0"), "flannel's own file").unwrap();
        assert_eq!(Record::load(&dir, "c1", "eth0").unwrap(), Some(r.clone()));
        let (all, bad) = list(&dir);
        assert_eq!(all, vec![r.clone()]);
        assert_eq!(bad.len(), 1);
        // host-local's reservation decides whether the record still counts.
        assert!(!r.ipam_holds());
        let hl = dir.join("ipam").join("cbr0");
        std::fs::create_dir_all(&hl).unwrap();
        std::fs::write(hl.join("10.244.1.5"), "c1\r\neth0").unwrap();
        assert!(r.ipam_holds());
        std::fs::write(hl.join("10.244.1.5"), "c2\r\neth0").unwrap();
        assert!(!r.ipam_holds());
        remove(&dir, "c1", "eth0").unwrap();
        remove(&dir, "c1", "eth0").unwrap();
        assert_eq!(Record::load(&dir, "c1", "eth0").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

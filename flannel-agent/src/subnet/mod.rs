//! Subnet leases: what every node holds, where it is stored, and how a node
//! gets its own.
//!
//! One interface ([`SubnetManager`]) over three stores:
//! * [`local`]: a file-locked store on disk (single machine, the lab);
//! * [`etcd`]: Flannel's etcd layout under `/coreos.com/network`;
//! * [`kube`]: the Node objects of a Kubernetes API server.
//!
//! Every store publishes the full lease set through a
//! `tokio::sync::watch` channel; the agent reconciles against the latest
//! set, so bursts of changes coalesce into one pass.

pub mod env;
pub mod etcd;
pub mod kube;
pub mod local;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::{config::NetConfig, mac::MacAddr};

/// Flannel's `LeaseAttrs`, field for field, as stored in etcd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "serde_json::Value::is_null"
    )]
    pub backend_data: serde_json::Value,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "serde_json::Value::is_null"
    )]
    pub backend_v6_data: serde_json::Value,
}

/// The VXLAN backend's `BackendData`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

impl LeaseAttrs {
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: MacAddr) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: serde_json::to_value(VxlanData { vni, vtep_mac })
                .expect("plain struct serializes"),
            backend_v6_data: serde_json::Value::Null,
        }
    }

    /// The IPv6 side Flannel adds to a VXLAN lease: the public IPv6 and
    /// the VtepMAC of `flannel-v6.<VNI>`.
    pub fn with_v6(mut self, public_ipv6: Ipv6Addr, vni: u32, vtep_mac: MacAddr) -> Self {
        self.public_ipv6 = Some(public_ipv6);
        self.backend_v6_data =
            serde_json::to_value(VxlanData { vni, vtep_mac }).expect("plain struct serializes");
        self
    }

    /// The VXLAN data of a lease's IPv6 side (`BackendV6Data`), or why it
    /// cannot be used.
    pub fn vxlan_v6_data(&self) -> std::result::Result<VxlanData, String> {
        if self.backend_type != "vxlan" {
            return Err(format!("backend type {:?} is not vxlan", self.backend_type));
        }
        let data: VxlanData = serde_json::from_value(self.backend_v6_data.clone())
            .map_err(|e| format!("BackendV6Data {}: {e}", self.backend_v6_data))?;
        if !data.vtep_mac.is_unicast() {
            return Err(format!("v6 VtepMAC {} is not unicast", data.vtep_mac));
        }
        Ok(data)
    }

    /// Flannel's host-gw lease: a type and the public IP, no data.
    pub fn host_gw(public_ip: Ipv4Addr) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: "host-gw".into(),
            backend_data: serde_json::Value::Null,
            backend_v6_data: serde_json::Value::Null,
        }
    }

    /// The VXLAN data of a lease, or why it cannot be used.
    pub fn vxlan_data(&self) -> std::result::Result<VxlanData, String> {
        if self.backend_type != "vxlan" {
            return Err(format!("backend type {:?} is not vxlan", self.backend_type));
        }
        let data: VxlanData = serde_json::from_value(self.backend_data.clone())
            .map_err(|e| format!("BackendData {}: {e}", self.backend_data))?;
        if !data.vtep_mac.is_unicast() {
            return Err(format!("VtepMAC {} is not unicast", data.vtep_mac));
        }
        Ok(data)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The IPv4 subnet; `0.0.0.0/0` (Flannel's empty `IP4Net`) for a lease
    /// of an IPv6-only cluster, which has none.
    pub subnet: Ipv4Net,
    /// With `EnableIPv6`: the node's IPv6 subnet (Flannel's `IPv6Subnet`,
    /// the part after `&` in its etcd key).
    pub ipv6_subnet: Option<Ipv6Net>,
    pub attrs: LeaseAttrs,
    /// `None`: a reservation (a key without TTL), never expires.
    pub expiration: Option<SystemTime>,
}

/// Every lease in the store, by [`Lease::id`].
pub type LeaseSet = Arc<BTreeMap<IpNet, Lease>>;

/// Where a store publishes: `None` until its first full listing.
pub type LeaseTx = tokio::sync::watch::Sender<Option<LeaseSet>>;

impl Lease {
    /// Flannel's key for this lease (see [`subnet_key`]).
    pub fn key(&self) -> String {
        subnet_key(self.subnet, self.ipv6_subnet)
    }

    /// Whether the lease has an IPv4 subnet (not Flannel's empty one).
    pub fn has_ipv4(&self) -> bool {
        has_ipv4(self.subnet)
    }

    /// What names the lease in a [`LeaseSet`]: its IPv4 subnet, or in an
    /// IPv6-only cluster its IPv6 one.
    pub fn id(&self) -> IpNet {
        lease_id(self.subnet, self.ipv6_subnet)
    }

    /// The node's public address: the IPv4 one, or in an IPv6-only
    /// cluster the IPv6 one.
    pub fn public_addr(&self) -> IpAddr {
        match (self.has_ipv4(), self.attrs.public_ipv6) {
            (false, Some(ip6)) => IpAddr::V6(ip6),
            _ => IpAddr::V4(self.attrs.public_ip),
        }
    }
}

/// Whether `subnet` is a real IPv4 subnet, not Flannel's empty `IP4Net`
/// (`0.0.0.0/0`), which an IPv6-only lease carries.
pub fn has_ipv4(subnet: Ipv4Net) -> bool {
    subnet != Ipv4Net::default()
}

/// The [`Lease::id`] of a lease with these subnets.
pub fn lease_id(subnet: Ipv4Net, v6: Option<Ipv6Net>) -> IpNet {
    match v6 {
        Some(v6) if !has_ipv4(subnet) => IpNet::V6(v6),
        _ => IpNet::V4(subnet),
    }
}

/// A lease as etcd holds it: the key below `<prefix>/subnets/` and the
/// `LeaseAttrs` JSON value. `Ok(None)` for a key that names no subnet.
pub fn decode_lease(
    key: &str,
    value: &[u8],
) -> std::result::Result<Option<(Ipv4Net, Option<Ipv6Net>, LeaseAttrs)>, serde_json::Error> {
    let Some((subnet, v6)) = parse_subnet_key(key) else {
        return Ok(None);
    };
    Ok(Some((subnet, v6, serde_json::from_slice(value)?)))
}

/// Flannel's key for a lease: `10.244.1.0-24`, or with an IPv6 subnet
/// `10.244.1.0-24&fd00:10:244:1::-64` (its `MakeSubnetKey`); in an
/// IPv6-only cluster `0.0.0.0-0&fd00:10:244:1::-64`.
pub fn subnet_key(subnet: Ipv4Net, v6: Option<Ipv6Net>) -> String {
    match v6 {
        None => format!("{}-{}", subnet.network(), subnet.prefix_len()),
        Some(v6) => format!(
            "{}-{}&{}-{}",
            subnet.network(),
            subnet.prefix_len(),
            v6.network(),
            v6.prefix_len()
        ),
    }
}

/// The subnets a Flannel key names (its `ParseSubnetKey`); `None` for a
/// key that names none (`0.0.0.0-0` alone), or names one with host bits
/// set.
pub fn parse_subnet_key(key: &str) -> Option<(Ipv4Net, Option<Ipv6Net>)> {
    let (v4, v6) = match key.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (key, None),
    };
    let (ip, len) = v4.rsplit_once('-')?;
    let net = Ipv4Net::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    let v6 = match v6 {
        None => None,
        Some(text) => {
            let (ip, len) = text.rsplit_once('-')?;
            let net6 = Ipv6Net::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
            (net6.trunc() == net6).then_some(())?;
            Some(net6)
        }
    };
    (net.trunc() == net && (has_ipv4(net) || v6.is_some())).then_some((net, v6))
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error("out of subnets: all {total} subnets from {min} to {max} are leased or reserved; widen Network/SubnetMin/SubnetMax or remove stale leases")]
    OutOfSubnets {
        total: usize,
        min: Ipv4Addr,
        max: Ipv4Addr,
    },
    #[error("out of IPv6 subnets: every subnet from {min} to {max} is leased or reserved; widen IPv6Network/IPv6SubnetMin/IPv6SubnetMax or remove stale leases")]
    OutOfSubnets6 { min: Ipv6Addr, max: Ipv6Addr },
    #[error("lease for {subnet} was taken by {holder}")]
    LeaseLost { subnet: IpNet, holder: IpAddr },
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, SubnetError>;

/// How long a lease lives and when it is renewed.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    pub ttl: Duration,
    /// Renew this long before expiry.
    pub renew_margin: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        // Flannel: 24 h leases, renewed an hour before they expire.
        LeaseTiming {
            ttl: Duration::from_secs(24 * 3600),
            renew_margin: Duration::from_secs(3600),
        }
    }
}

/// Picks a subnet the way Flannel does: the subnet from the last
/// subnet.env if it is in range and free, else one at random among the
/// first 100 free ones. Without `EnableIPv4`, Flannel's empty subnet
/// (`0.0.0.0/0`, see [`has_ipv4`]).
pub fn choose_subnet(
    cfg: &NetConfig,
    taken: &dyn Fn(Ipv4Net) -> bool,
    previous: Option<Ipv4Net>,
) -> Result<Ipv4Net> {
    if !cfg.enable_ipv4 {
        return Ok(Ipv4Net::default());
    }
    if let Some(prev) = previous.filter(|p| cfg.in_range(*p) && !taken(*p)) {
        return Ok(prev);
    }
    let free: Vec<Ipv4Net> = cfg.subnets().filter(|s| !taken(*s)).take(100).collect();
    if free.is_empty() {
        return Err(SubnetError::OutOfSubnets {
            total: cfg.subnets().count(),
            min: cfg.subnet_min,
            max: cfg.subnet_max,
        });
    }
    Ok(free[random_index(free.len())])
}

/// The IPv6 subnet for a new lease, as Flannel picks it: the previous
/// one if in range and free, else one at random among the first 100 free
/// ones. `None` without `EnableIPv6`.
pub fn choose_subnet6(
    cfg: &NetConfig,
    taken: &dyn Fn(Ipv6Net) -> bool,
    previous: Option<Ipv6Net>,
) -> Result<Option<Ipv6Net>> {
    if !cfg.enable_ipv6 {
        return Ok(None);
    }
    if let Some(prev) = previous.filter(|p| cfg.in_range6(*p) && !taken(*p)) {
        return Ok(Some(prev));
    }
    let free: Vec<Ipv6Net> = cfg.subnets6().filter(|s| !taken(*s)).take(100).collect();
    if free.is_empty() {
        return Err(SubnetError::OutOfSubnets6 {
            min: cfg.ipv6_subnet_min,
            max: cfg.ipv6_subnet_max,
        });
    }
    Ok(Some(free[random_index(free.len())]))
}

fn random_index(n: usize) -> usize {
    // Random enough to spread racing nodes; not security relevant.
    use std::hash::BuildHasher;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (std::collections::hash_map::RandomState::new().hash_one(nanos) % n as u64) as usize
}

/// One of the three stores.
#[derive(Clone)]
pub enum SubnetManager {
    Local(local::LocalStore),
    // Boxed: the clients are hundreds of bytes to a few KiB; the enum is
    // cloned into each task.
    Etcd(Box<etcd::EtcdStore>),
    Kube(Box<kube::KubeStore>),
}

impl SubnetManager {
    pub fn name(&self) -> &'static str {
        match self {
            SubnetManager::Local(_) => "local",
            SubnetManager::Etcd(_) => "etcd",
            SubnetManager::Kube(_) => "kube",
        }
    }

    /// The network config this store serves (etcd) or `None` when it comes
    /// from `--net-config-path` (local, kube).
    pub async fn network_config(&self) -> Result<Option<String>> {
        match self {
            SubnetManager::Etcd(s) => s.network_config().await.map(Some),
            _ => Ok(None),
        }
    }

    /// Gets this node a lease (see [`choose_subnet`], [`choose_subnet6`]).
    pub async fn acquire(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        previous6: Option<Ipv6Net>,
    ) -> Result<Lease> {
        match self {
            SubnetManager::Local(s) => s.acquire(cfg, attrs, previous, previous6),
            SubnetManager::Etcd(s) => s.acquire(cfg, attrs, previous, previous6).await,
            SubnetManager::Kube(s) => s.acquire(cfg, attrs).await,
        }
    }

    /// Extends the lease (recreating it if it was deleted).
    pub async fn renew(&self, lease: &Lease) -> Result<Lease> {
        match self {
            SubnetManager::Local(s) => s.renew(lease),
            SubnetManager::Etcd(s) => s.renew(lease).await,
            SubnetManager::Kube(s) => s.renew(lease).await,
        }
    }

    /// Lists, then follows changes, publishing every new lease set; returns
    /// only on error (the caller backs off and calls again).
    pub async fn watch(&self, tx: &LeaseTx) -> Result<()> {
        match self {
            SubnetManager::Local(s) => s.watch(tx).await,
            SubnetManager::Etcd(s) => s.watch(tx).await,
            SubnetManager::Kube(s) => s.watch(tx).await,
        }
    }
}

/// Publishes `set` unless it equals what was last sent.
pub(crate) fn publish(tx: &LeaseTx, set: BTreeMap<IpNet, Lease>) {
    tx.send_if_modified(|cur| {
        if cur.as_deref() == Some(&set) {
            false
        } else {
            *cur = Some(Arc::new(set));
            true
        }
    });
}

/// Exponential backoff from 200 ms to 5 s.
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(200))
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }
    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> NetConfig {
        NetConfig::parse(text).unwrap()
    }

    #[test]
    fn keys_round_trip_and_bad_keys_are_refused() {
        let s: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        assert_eq!(subnet_key(s, None), "10.244.3.0-24");
        assert_eq!(parse_subnet_key("10.244.3.0-24"), Some((s, None)));
        // Flannel's dual-stack key (its MakeSubnetKey), both ways.
        let s6: Ipv6Net = "fd00:10:244:3::/64".parse().unwrap();
        assert_eq!(subnet_key(s, Some(s6)), "10.244.3.0-24&fd00:10:244:3::-64");
        assert_eq!(
            parse_subnet_key("10.244.3.0-24&fd00:10:244:3::-64"),
            Some((s, Some(s6)))
        );
        // An IPv6-only cluster's key: Flannel's empty IPv4 subnet first.
        // Alone, the empty subnet names no lease.
        assert_eq!(
            subnet_key(Ipv4Net::default(), Some(s6)),
            "0.0.0.0-0&fd00:10:244:3::-64"
        );
        assert_eq!(
            parse_subnet_key("0.0.0.0-0&fd00:10:244:3::-64"),
            Some((Ipv4Net::default(), Some(s6)))
        );
        assert_eq!(lease_id(Ipv4Net::default(), Some(s6)), IpNet::V6(s6));
        assert_eq!(lease_id(s, Some(s6)), IpNet::V4(s));
        for bad in [
            "0.0.0.0-0",
            "10.244.3.1-24",
            "x-24",
            "10.244.3.0-33",
            "",
            "-",
            "10.244.3.0-24&",
            "10.244.3.0-24&fd00::1-64",
            "10.244.3.0-24&fd00::-129",
            "10.244.3.0-24&10.0.0.0-8",
        ] {
            assert_eq!(parse_subnet_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn ipv6_subnets_are_chosen_as_flannel_chooses_them() {
        let c = cfg(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","IPv6SubnetMin":"fd00:5:0:10::","IPv6SubnetMax":"fd00:5:0:12::","Backend":{"Type":"vxlan"}}"#,
        );
        let none = |_: Ipv6Net| false;
        let prev: Ipv6Net = "fd00:5:0:11::/64".parse().unwrap();
        assert_eq!(choose_subnet6(&c, &none, Some(prev)).unwrap(), Some(prev));
        // Out of range or taken: another one from the range.
        let out: Ipv6Net = "fd00:5:0:13::/64".parse().unwrap();
        let got = choose_subnet6(&c, &none, Some(out)).unwrap().unwrap();
        assert!(c.in_range6(got), "{got}");
        let taken = |n: Ipv6Net| n != "fd00:5:0:12::/64".parse::<Ipv6Net>().unwrap();
        assert_eq!(
            choose_subnet6(&c, &taken, Some(prev)).unwrap(),
            Some("fd00:5:0:12::/64".parse().unwrap())
        );
        let err = choose_subnet6(&c, &|_| true, None).unwrap_err().to_string();
        assert!(
            err.contains("out of IPv6 subnets") && err.contains("fd00:5:0:12::"),
            "{err}"
        );
        // IPv6-only: Flannel's empty IPv4 subnet.
        let only6 = cfg(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{"Type":"vxlan"}}"#,
        );
        assert_eq!(
            choose_subnet(&only6, &|_| true, None).unwrap(),
            Ipv4Net::default()
        );
        // Without EnableIPv6: no IPv6 subnet.
        let v4 = cfg(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#);
        assert_eq!(choose_subnet6(&v4, &none, Some(prev)).unwrap(), None);
    }

    #[test]
    fn attrs_match_flannels_json() {
        let a = LeaseAttrs::vxlan(
            Ipv4Addr::new(192, 168, 64, 3),
            1,
            "c6:d2:32:6f:8f:44".parse().unwrap(),
        );
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(
            text,
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
        );
        // What Flannel itself writes decodes to the same.
        let flannel: LeaseAttrs = serde_json::from_str(&text).unwrap();
        assert_eq!(flannel, a);
        assert_eq!(flannel.vxlan_data().unwrap().vni, 1);
        let hostgw: LeaseAttrs =
            serde_json::from_str(r#"{"PublicIP":"10.0.0.1","BackendType":"host-gw"}"#).unwrap();
        assert!(hostgw.vxlan_data().unwrap_err().contains("not vxlan"));
        // Ours is Flannel's host-gw lease, field for field, no data.
        assert_eq!(hostgw, LeaseAttrs::host_gw(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            serde_json::to_string(&hostgw).unwrap(),
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        let broken: LeaseAttrs = serde_json::from_str(
            r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#,
        )
        .unwrap();
        assert!(broken.vxlan_data().unwrap_err().contains("BackendData"));
    }

    #[test]
    fn allocation_follows_flannels_rules() {
        let c = cfg(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.13.0","Backend":{"Type":"vxlan"}}"#,
        );
        let none = |_: Ipv4Net| false;
        // The previous subnet is reused when free and in range.
        let prev: Ipv4Net = "10.5.12.0/24".parse().unwrap();
        assert_eq!(choose_subnet(&c, &none, Some(prev)).unwrap(), prev);
        // Out of range or taken: a free one instead.
        let outside: Ipv4Net = "10.5.99.0/24".parse().unwrap();
        let got = choose_subnet(&c, &none, Some(outside)).unwrap();
        assert!(c.in_range(got));
        let taken = |s: Ipv4Net| s == prev || s.network() == Ipv4Addr::new(10, 5, 10, 0);
        for _ in 0..50 {
            let got = choose_subnet(&c, &taken, Some(prev)).unwrap();
            assert!(got != prev && c.in_range(got) && got.network() != Ipv4Addr::new(10, 5, 10, 0));
        }
        // Full.
        let all = |_: Ipv4Net| true;
        let err = choose_subnet(&c, &all, None).unwrap_err().to_string();
        assert!(
            err.starts_with("out of subnets: all 4 subnets from 10.5.10.0 to 10.5.13.0"),
            "{err}"
        );
    }

    #[test]
    fn random_choice_stays_among_the_first_hundred_free() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            let s = choose_subnet(&c, &|_| false, None).unwrap();
            let idx = (u32::from(s.network()) - u32::from(c.subnet_min)) / c.subnet_size();
            assert!(idx < 100, "{s} is not among the first 100");
            seen.insert(s);
        }
        assert!(seen.len() > 20, "choices are not spread: {}", seen.len());
    }
}

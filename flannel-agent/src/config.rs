//! `net-conf.json`: Flannel's network configuration, its defaults and its
//! validation.
//!
//! Field names match Flannel's, case-insensitively as Go's `encoding/json`
//! matches them, so a `kube-flannel-cfg` ConfigMap loads unchanged; two
//! spellings of one field in one object are refused (Go would silently
//! keep the last). Fields
//! Flannel knows but this project does not act on (`EnableNFTables`) are
//! accepted; fields nobody knows are reported back as warnings, as Flannel
//! silently ignores them. Every refusal names the field, the value and what
//! would be valid.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

/// The Linux kernel's VXLAN port, used when `Backend.Port` is absent or 0.
pub const KERNEL_VXLAN_PORT: u16 = 8472;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    pub network: Ipv4Net,
    pub subnet_len: u8,
    /// First and last subnet the allocator may hand out (network addresses).
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet_len: u8,
    /// First and last IPv6 subnet the allocator may hand out (with
    /// `EnableIPv6`; unspecified otherwise).
    pub ipv6_subnet_min: Ipv6Addr,
    pub ipv6_subnet_max: Ipv6Addr,
    pub backend: Backend,
    /// Fields nobody knows, reported so a typo does not go unnoticed.
    pub unknown_fields: Vec<String>,
}

/// `Backend.Type`: the two Flannel backends this project carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendType {
    /// VXLAN (`flannel.<VNI>`), with `DirectRouting` to nodes on this
    /// node's L2 network when asked.
    Vxlan,
    /// Plain routes to every remote lease via its node's IP; every node
    /// must be on one L2 network.
    HostGw,
}

impl BackendType {
    /// The name Flannel writes in a lease's `BackendType`.
    pub fn lease_name(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub kind: BackendType,
    /// VXLAN only: the network identifier and UDP port (host-gw keeps the
    /// defaults, unused).
    pub vni: u32,
    /// The UDP port on the wire (0 already turned into 8472).
    pub port: u16,
    /// Explicit pod MTU; `None` means uplink MTU − 50 (VXLAN) or the
    /// uplink's MTU (host-gw, which ignores `MTU` as Flannel does).
    pub mtu: Option<u32>,
    /// VXLAN's `DirectRouting`: remotes on this node's L2 network get a
    /// plain route instead of encapsulation.
    pub direct_routing: bool,
    pub gbp: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("net-conf.json is not a JSON object: {0}")]
    NotJson(String),
    #[error("{field}: {value} is invalid: {expected}")]
    Invalid {
        field: &'static str,
        value: String,
        expected: String,
    },
    #[error("{field} is missing: {expected}")]
    Missing {
        field: &'static str,
        expected: &'static str,
    },
    #[error("{first} and {second} name the same field (names match regardless of case); keep one (Flannel would silently take the last)")]
    Duplicate { first: String, second: String },
}

fn invalid(field: &'static str, value: impl ToString, expected: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

const TOP_FIELDS: &[&str] = &[
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "EnableNFTables",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "Backend",
];
const BACKEND_FIELDS: &[&str] = &[
    "Type",
    "VNI",
    "Port",
    "MTU",
    "DirectRouting",
    "GBP",
    "Learning",
    "MacPrefix",
];

/// The object's fields under their canonical names (Go's case-insensitive
/// match), plus the names that matched nothing.
/// Two keys that differ only in case are refused, naming both.
fn canonical<'a>(
    obj: &'a Map<String, Value>,
    known: &[&'static str],
    prefix: &str,
    unknown: &mut Vec<String>,
) -> Result<Vec<(&'static str, &'a Value)>, ConfigError> {
    let mut out = Vec::new();
    let mut seen: Vec<(&'static str, &str)> = Vec::new();
    for (key, value) in obj {
        match known.iter().find(|k| k.eq_ignore_ascii_case(key)) {
            Some(k) => {
                if let Some((_, first)) = seen.iter().find(|(c, _)| c == k) {
                    return Err(ConfigError::Duplicate {
                        first: format!("{prefix}{first}"),
                        second: format!("{prefix}{key}"),
                    });
                }
                seen.push((k, key));
                out.push((*k, value));
            }
            None => unknown.push(format!("{prefix}{key}")),
        }
    }
    Ok(out)
}

fn get<'a>(fields: &[(&'static str, &'a Value)], name: &str) -> Option<&'a Value> {
    fields
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| *v)
        .filter(|v| !v.is_null())
}

fn get_bool(
    fields: &[(&'static str, &Value)],
    name: &'static str,
) -> Result<Option<bool>, ConfigError> {
    match get(fields, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(name, v, "expected true or false")),
    }
}

fn get_uint(
    fields: &[(&'static str, &Value)],
    name: &'static str,
    max: u64,
) -> Result<Option<u64>, ConfigError> {
    match get(fields, name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(invalid(
                name,
                v,
                format!("expected an integer from 0 to {max}"),
            )),
        },
    }
}

fn get_str<'a>(
    fields: &[(&'static str, &'a Value)],
    name: &'static str,
    expected: &str,
) -> Result<Option<&'a str>, ConfigError> {
    match get(fields, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(invalid(name, v, expected)),
    }
}

impl NetConfig {
    /// Parses and validates net-conf.json text, filling Flannel's defaults.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(ConfigError::NotJson(format!("found {}", type_name(&value))));
        };
        let mut unknown = Vec::new();
        let top = canonical(&obj, TOP_FIELDS, "", &mut unknown)?;

        let enable_ipv4 = get_bool(&top, "EnableIPv4")?.unwrap_or(true);
        let enable_ipv6 = get_bool(&top, "EnableIPv6")?.unwrap_or(false);
        get_bool(&top, "EnableNFTables")?;
        if !enable_ipv4 && !enable_ipv6 {
            return Err(invalid(
                "EnableIPv4",
                false,
                "at least one of EnableIPv4 and EnableIPv6 must be true",
            ));
        }

        let cidr4 = "expected an IPv4 CIDR such as \"10.244.0.0/16\"";
        let network = match get_str(&top, "Network", cidr4)? {
            Some(s) => {
                let net: Ipv4Net = s.parse().map_err(|_| invalid("Network", s, cidr4))?;
                if net.trunc() != net {
                    return Err(invalid(
                        "Network",
                        s,
                        format!("host bits are set; did you mean {}?", net.trunc()),
                    ));
                }
                if let Some((range, what)) = not_unicast(net) {
                    return Err(invalid(
                        "Network",
                        s,
                        format!("overlaps {range} ({what}); expected a unicast range for pods such as 10.244.0.0/16"),
                    ));
                }
                Some(net)
            }
            None => None,
        };
        let subnet_len_given = get_uint(&top, "SubnetLen", 32)?;
        let subnet_min_given = parse_ip4(&top, "SubnetMin")?;
        let subnet_max_given = parse_ip4(&top, "SubnetMax")?;

        let (network, subnet_len, subnet_min, subnet_max) = if enable_ipv4 {
            let network = network.ok_or(ConfigError::Missing {
                field: "Network",
                expected:
                    "an IPv4 CIDR such as \"10.244.0.0/16\" (required while EnableIPv4 is true)",
            })?;
            let (len, min, max) = subnet_range4(
                network,
                subnet_len_given,
                subnet_min_given,
                subnet_max_given,
            )?;
            (network, len, min, max)
        } else {
            let none = Ipv4Net::default();
            (none, 0, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED)
        };

        let cidr6 = "expected an IPv6 CIDR such as \"fd00:10:244::/56\"";
        let ipv6_network = match get_str(&top, "IPv6Network", cidr6)? {
            Some(s) => {
                let net: Ipv6Net = s.parse().map_err(|_| invalid("IPv6Network", s, cidr6))?;
                if net.trunc() != net {
                    return Err(invalid(
                        "IPv6Network",
                        s,
                        format!("host bits are set; did you mean {}?", net.trunc()),
                    ));
                }
                Some(net)
            }
            None => None,
        };
        let ipv6_len_given = get_uint(&top, "IPv6SubnetLen", 128)?;
        let mut ipv6_bounds = [None, None];
        for (slot, name) in ipv6_bounds
            .iter_mut()
            .zip(["IPv6SubnetMin", "IPv6SubnetMax"])
        {
            if let Some(s) = get_str(&top, name, "expected an IPv6 address")? {
                *slot = Some(
                    s.parse::<Ipv6Addr>()
                        .map_err(|_| invalid(name, s, "expected an IPv6 address"))?,
                );
            }
        }
        let (ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max) = if enable_ipv6 {
            let net = ipv6_network.ok_or(ConfigError::Missing {
                field: "IPv6Network",
                expected: "an IPv6 CIDR (required while EnableIPv6 is true)",
            })?;
            subnet_range6(net, ipv6_len_given, ipv6_bounds[0], ipv6_bounds[1])?
        } else {
            (
                ipv6_len_given.unwrap_or(64) as u8,
                Ipv6Addr::UNSPECIFIED,
                Ipv6Addr::UNSPECIFIED,
            )
        };

        let backend = parse_backend(get(&top, "Backend"), &mut unknown)?;
        Ok(NetConfig {
            enable_ipv4,
            enable_ipv6,
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            ipv6_network,
            ipv6_subnet_len,
            ipv6_subnet_min,
            ipv6_subnet_max,
            backend,
            unknown_fields: unknown,
        })
    }

    /// Refuses what the store `store` (`local`, `etcd`, `kube`) cannot
    /// hold: an IPv6-only cluster in etcd, as Flannel's etcd registry
    /// gives every lease an IPv4 subnet (and so cannot hold a second
    /// IPv6-only one).
    pub fn check_store(&self, store: &str) -> Result<(), ConfigError> {
        if store == "etcd" && !self.enable_ipv4 {
            return Err(invalid(
                "EnableIPv4",
                false,
                "IPv6-only clusters need --kube-subnet-mgr (or the local store): Flannel's etcd registry gives every lease an IPv4 subnet",
            ));
        }
        Ok(())
    }

    /// How many lease slots the eBPF maps give this network (see
    /// `flannel_common::Config::lease_slot`): one per subnet of
    /// `SubnetLen` in `Network`, or 0 when that is more than
    /// `MAX_LEASE_SLOTS` (every lookup then walks the trie).
    pub fn lease_slots(&self) -> u32 {
        if !self.enable_ipv4 {
            return 0;
        }
        let bits = u32::from(self.subnet_len).saturating_sub(u32::from(self.network.prefix_len()));
        match 1u32.checked_shl(bits) {
            Some(n) if n <= flannel_common::MAX_LEASE_SLOTS => n,
            _ => 0,
        }
    }

    /// Size of one node subnet, in addresses.
    pub fn subnet_size(&self) -> u32 {
        1u32 << (32 - self.subnet_len)
    }

    /// Every subnet between SubnetMin and SubnetMax, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let size = self.subnet_size() as u64;
        let (min, max) = (
            u32::from(self.subnet_min) as u64,
            u32::from(self.subnet_max) as u64,
        );
        (0..)
            .map(move |i| min + i * size)
            .take_while(move |a| *a <= max)
            .map(move |a| {
                Ipv4Net::new(Ipv4Addr::from(a as u32), self.subnet_len)
                    .expect("subnet_len was validated")
            })
    }

    /// Every IPv6 subnet from IPv6SubnetMin up to IPv6SubnetMax, in order
    /// (lazily: an IPv6 network may hold 2^64 of them).
    pub fn subnets6(&self) -> impl Iterator<Item = Ipv6Net> + '_ {
        let size = 1u128 << (128 - self.ipv6_subnet_len);
        let (min, max) = (
            u128::from(self.ipv6_subnet_min),
            u128::from(self.ipv6_subnet_max),
        );
        (0u128..)
            .map_while(move |i| min.checked_add(i.checked_mul(size)?))
            .take_while(move |a| *a <= max && self.enable_ipv6)
            .map(move |a| {
                Ipv6Net::new(Ipv6Addr::from(a), self.ipv6_subnet_len)
                    .expect("ipv6_subnet_len was validated")
            })
    }

    /// Whether `subnet` is an IPv6 subnet the allocator could hand out.
    pub fn in_range6(&self, subnet: Ipv6Net) -> bool {
        self.enable_ipv6
            && subnet.prefix_len() == self.ipv6_subnet_len
            && subnet.trunc() == subnet
            && subnet.network() >= self.ipv6_subnet_min
            && subnet.network() <= self.ipv6_subnet_max
    }

    /// Whether `subnet` is one the allocator could hand out.
    pub fn in_range(&self, subnet: Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.trunc() == subnet
            && subnet.network() >= self.subnet_min
            && subnet.network() <= self.subnet_max
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_ip4(
    fields: &[(&'static str, &Value)],
    name: &'static str,
) -> Result<Option<Ipv4Addr>, ConfigError> {
    let expected = "expected an IPv4 address such as \"10.244.10.0\"";
    match get_str(fields, name, expected)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| invalid(name, s, expected)),
    }
}

/// Flannel's rules for SubnetLen, SubnetMin and SubnetMax.
/// Longest interface name the kernel takes (IFNAMSIZ − 1).
pub const MAX_IFNAME: usize = 15;

/// A name the kernel takes for an interface, and that is safe in a path:
/// 1 to 15 printable ASCII bytes, not `.` or `..`, no `/` or `:`.
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':')
}

/// The address ranges pods cannot be given, and why.
const NOT_UNICAST: [(&str, &str); 6] = [
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and the broadcast address"),
    ("255.255.255.255/32", "broadcast"),
];

/// The first range of [`NOT_UNICAST`] that `net` overlaps.
fn not_unicast(net: Ipv4Net) -> Option<(Ipv4Net, &'static str)> {
    NOT_UNICAST.iter().find_map(|(r, what)| {
        let r: Ipv4Net = r.parse().ok()?;
        (r.contains(&net.network()) || net.contains(&r.network())).then_some((r, *what))
    })
}

/// Refuses a `Network` that overlaps the subnet of the node's uplink
/// (`uplink`: its address and prefix): pod routes would shadow the node
/// network.
pub fn check_uplink_overlap(network: Ipv4Net, uplink: Ipv4Net) -> Result<(), ConfigError> {
    let up = uplink.trunc();
    if network.contains(&up.network()) || up.contains(&network.network()) {
        return Err(invalid(
            "Network",
            network,
            format!(
                "overlaps the node network {up} (the uplink's address {uplink}); pod routes would shadow it"
            ),
        ));
    }
    Ok(())
}

/// Flannel's rules for IPv6SubnetLen, IPv6SubnetMin and IPv6SubnetMax:
/// a /64 per node when the network is a /62 or larger (else prefix + 2),
/// at least four subnets, the first one never handed out, bounds inside
/// the network and on a subnet boundary.
fn subnet_range6(
    network: Ipv6Net,
    len: Option<u64>,
    min: Option<Ipv6Addr>,
    max: Option<Ipv6Addr>,
) -> Result<(u8, Ipv6Addr, Ipv6Addr), ConfigError> {
    let plen = network.prefix_len();
    let len = match len.filter(|l| *l > 0) {
        Some(l) if l > 126 => return Err(invalid("IPv6SubnetLen", l, "expected at most 126")),
        Some(l) if l < u64::from(plen) + 2 => {
            return Err(invalid(
                "IPv6SubnetLen",
                l,
                format!(
                    "IPv6Network {network} must hold at least four subnets: expected {} to 126",
                    plen + 2
                ),
            ))
        }
        Some(l) => l as u8,
        None if plen > 124 => {
            return Err(invalid(
                "IPv6Network",
                network,
                "too small: the smallest useful IPv6 network is a /124",
            ))
        }
        None if plen <= 62 => 64,
        None => plen + 2,
    };
    let size = 1u128 << (128 - len);
    let mask = !(size - 1);
    let check = |name: &'static str, ip: Ipv6Addr| -> Result<Ipv6Addr, ConfigError> {
        if !network.contains(&ip) {
            return Err(invalid(
                name,
                ip,
                format!("expected an address inside IPv6Network {network}"),
            ));
        }
        if u128::from(ip) & mask != u128::from(ip) {
            return Err(invalid(
                name,
                ip,
                format!(
                    "not on a /{len} boundary; did you mean {}?",
                    Ipv6Addr::from(u128::from(ip) & mask)
                ),
            ));
        }
        Ok(ip)
    };
    let base = u128::from(network.network());
    let min = match min.filter(|m| !m.is_unspecified()) {
        Some(m) => check("IPv6SubnetMin", m)?,
        None => Ipv6Addr::from(base + size),
    };
    let max = match max.filter(|m| !m.is_unspecified()) {
        Some(m) => check("IPv6SubnetMax", m)?,
        None => Ipv6Addr::from(u128::from(network.broadcast()) & mask),
    };
    if min > max {
        return Err(invalid(
            "IPv6SubnetMin",
            min,
            format!("expected an address not above IPv6SubnetMax {max}"),
        ));
    }
    Ok((len, min, max))
}

fn subnet_range4(
    network: Ipv4Net,
    len: Option<u64>,
    min: Option<Ipv4Addr>,
    max: Option<Ipv4Addr>,
) -> Result<(u8, Ipv4Addr, Ipv4Addr), ConfigError> {
    let plen = network.prefix_len();
    let len = match len.filter(|l| *l > 0) {
        Some(l) => {
            // Room for the bridge gateway, the VTEP address and pods.
            if l > 30 {
                return Err(invalid("SubnetLen", l, "expected at most 30"));
            }
            // More than two subnets: the first one is never handed out.
            if l < u64::from(plen) + 2 {
                return Err(invalid(
                    "SubnetLen",
                    l,
                    format!(
                        "Network {network} must hold at least four subnets: expected {} to 30",
                        plen + 2
                    ),
                ));
            }
            l as u8
        }
        None if plen > 28 => {
            return Err(invalid(
                "Network",
                network,
                "too small: the smallest useful network is a /28",
            ))
        }
        None if plen <= 22 => 24,
        None => plen + 2,
    };
    let size = 1u64 << (32 - len);
    let base = u64::from(u32::from(network.network()));
    let last = u64::from(u32::from(network.broadcast()));
    let mask = !((size - 1) as u32);
    let check = |name: &'static str, ip: Ipv4Addr| -> Result<Ipv4Addr, ConfigError> {
        if !network.contains(&ip) {
            return Err(invalid(
                name,
                ip,
                format!("expected an address inside Network {network}"),
            ));
        }
        if u32::from(ip) & mask != u32::from(ip) {
            return Err(invalid(
                name,
                ip,
                format!(
                    "not on a /{len} boundary; did you mean {}?",
                    Ipv4Addr::from(u32::from(ip) & mask)
                ),
            ));
        }
        Ok(ip)
    };
    let min = match min.filter(|m| !m.is_unspecified()) {
        Some(m) => check("SubnetMin", m)?,
        // The first subnet is skipped: its network address would be the
        // whole network's.
        None => Ipv4Addr::from((base + size) as u32),
    };
    let max = match max.filter(|m| !m.is_unspecified()) {
        Some(m) => check("SubnetMax", m)?,
        None => Ipv4Addr::from((last + 1 - size) as u32),
    };
    if min > max {
        return Err(invalid(
            "SubnetMin",
            min,
            format!("expected an address not above SubnetMax {max}"),
        ));
    }
    Ok((len, min, max))
}

fn parse_backend(value: Option<&Value>, unknown: &mut Vec<String>) -> Result<Backend, ConfigError> {
    let Some(value) = value else {
        return Err(ConfigError::Missing {
            field: "Backend",
            expected: "{\"Type\": \"vxlan\"} (Flannel's default without it is \"udp\", which this project does not carry)",
        });
    };
    let Value::Object(obj) = value else {
        return Err(invalid(
            "Backend",
            value,
            "expected an object such as {\"Type\": \"vxlan\"}",
        ));
    };
    let f = canonical(obj, BACKEND_FIELDS, "Backend.", unknown)?;
    const TYPES: &str = "expected \"vxlan\" or \"host-gw\"";
    let kind = get_str(&f, "Type", TYPES)
        .map_err(|_| {
            invalid(
                "Backend.Type",
                get(&f, "Type").unwrap_or(&Value::Null),
                TYPES,
            )
        })?
        .unwrap_or("udp");
    // Flannel lower-cases the name before looking the backend up.
    let kind = match kind.to_ascii_lowercase().as_str() {
        "vxlan" => BackendType::Vxlan,
        "host-gw" => BackendType::HostGw,
        other => {
            return Err(invalid(
                "Backend.Type",
                format!("{other:?}"),
                format!("{TYPES}, the backends this project implements"),
            ))
        }
    };
    let field = |name: &'static str, full: &'static str| -> Result<Option<u64>, ConfigError> {
        let max = match name {
            "VNI" => 0xff_ffff,
            "Port" => 65535,
            _ => 65535,
        };
        get_uint(&f, name, max).map_err(|e| match e {
            ConfigError::Invalid {
                value, expected, ..
            } => ConfigError::Invalid {
                field: full,
                value,
                expected,
            },
            other => other,
        })
    };
    let vni = field("VNI", "Backend.VNI")?.unwrap_or(1) as u32;
    // The VXLAN device is Flannel's `flannel.<VNI>`; the kernel takes
    // names of at most 15 bytes.
    let device = format!("flannel.{vni}");
    if device.len() > MAX_IFNAME {
        return Err(invalid(
            "Backend.VNI",
            vni,
            format!(
                "the VXLAN device would be named {device} ({} bytes), over the kernel's {MAX_IFNAME}: expected at most 9999999",
                device.len()
            ),
        ));
    }
    let port = match field("Port", "Backend.Port")?.unwrap_or(0) {
        0 => KERNEL_VXLAN_PORT,
        p => p as u16,
    };
    let mtu = match field("MTU", "Backend.MTU")? {
        None | Some(0) => None,
        Some(m) if m < 68 => {
            return Err(invalid(
                "Backend.MTU",
                m,
                "expected 0 (uplink MTU − 50) or at least 68",
            ))
        }
        Some(m) => Some(m as u32),
    };
    let flag = |name: &'static str, full: &'static str| -> Result<bool, ConfigError> {
        match get(&f, name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(invalid(full, v, "expected true or false")),
        }
    };
    let direct_routing = flag("DirectRouting", "Backend.DirectRouting")?;
    let gbp = flag("GBP", "Backend.GBP")?;
    if flag("Learning", "Backend.Learning")? {
        return Err(invalid(
            "Backend.Learning",
            true,
            "this project programs the FDB itself; set it to false or leave it out",
        ));
    }
    if gbp {
        return Err(invalid(
            "Backend.GBP",
            true,
            "the eBPF data path does not carry VXLAN group policy; set it to false or leave it out",
        ));
    }
    if direct_routing && kind == BackendType::HostGw {
        return Err(invalid(
            "Backend.DirectRouting",
            true,
            "a vxlan option: host-gw routes every remote directly already; leave it out",
        ));
    }
    if let Some(v) = get(&f, "MacPrefix") {
        if !v.is_string() {
            return Err(invalid(
                "Backend.MacPrefix",
                v,
                "expected a string such as \"0E:2A\"",
            ));
        }
    }
    Ok(Backend {
        kind,
        vni,
        port,
        mtu,
        direct_routing,
        gbp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The net-conf.json of Flannel's own kube-flannel.yml.
    const KUBE_FLANNEL: &str = r#"{
      "Network": "10.244.0.0/16",
      "EnableNFTables": false,
      "Backend": {
        "Type": "vxlan"
      }
    }"#;

    #[test]
    fn interface_names_are_what_the_kernel_takes() {
        for ok in ["cni0", "flannel.1", "a", "flannel.9999999", "br-pods_2"] {
            assert!(is_interface_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "flannel.16777215",
            "a/b",
            "eth:1",
            "cni 0",
            "eth\u{7}0",
            "cnï0",
        ] {
            assert!(!is_interface_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_network_overlapping_the_node_network_is_refused() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        for (network, uplink, refused) in [
            ("10.244.0.0/16", "172.30.0.1/24", false),
            ("10.244.0.0/16", "10.244.7.3/24", true),
            ("10.0.0.0/8", "10.1.2.3/16", true),
            ("10.244.0.0/16", "10.0.0.5/8", true),
            ("10.244.0.0/16", "10.245.0.1/16", false),
        ] {
            let r = check_uplink_overlap(net(network), net(uplink));
            assert_eq!(r.is_err(), refused, "{network} beside {uplink}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("overlaps the node network"), "{e}");
            }
        }
    }

    #[test]
    fn kube_flannel_cfg_loads_with_flannel_defaults() {
        let c = NetConfig::parse(KUBE_FLANNEL).unwrap();
        assert_eq!(c.network, "10.244.0.0/16".parse().unwrap());
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert_eq!(c.backend.mtu, None);
        assert!(c.enable_ipv4 && !c.enable_ipv6);
        assert!(c.unknown_fields.is_empty());
        assert_eq!(c.subnets().count(), 255);
    }

    /// (input, Ok(check) or Err(substring of the message)).
    #[test]
    fn table() {
        type Check = fn(&NetConfig) -> bool;
        let ok = |c: Check| Ok::<Check, &str>(c);
        let table: Vec<(&str, Result<Check, &str>)> = vec![
            // Defaults and Flannel's SubnetLen rule.
            (r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#,
             ok(|c| c.subnet_len == 24 && c.subnet_min == Ipv4Addr::new(10, 0, 1, 0) && c.subnet_max == Ipv4Addr::new(10, 255, 255, 0))),
            (r#"{"Network":"10.1.0.0/22","Backend":{"Type":"vxlan"}}"#, ok(|c| c.subnet_len == 24)),
            (r#"{"Network":"10.1.0.0/23","Backend":{"Type":"vxlan"}}"#, ok(|c| c.subnet_len == 25 && c.subnets().count() == 3)),
            (r#"{"Network":"10.1.0.0/28","Backend":{"Type":"vxlan"}}"#, ok(|c| c.subnet_len == 30 && c.subnets().count() == 3)),
            (r#"{"Network":"10.1.0.0/29","Backend":{"Type":"vxlan"}}"#, Err("Network: 10.1.0.0/29 is invalid: too small")),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":26,"Backend":{"Type":"vxlan"}}"#, ok(|c| c.subnet_len == 26 && c.subnet_min == Ipv4Addr::new(10, 244, 0, 64))),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#, Err("SubnetLen: 31 is invalid: expected at most 30")),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":17,"Backend":{"Type":"vxlan"}}"#, Err("SubnetLen: 17 is invalid: Network 10.244.0.0/16 must hold at least four subnets: expected 18 to 30")),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":-1,"Backend":{"Type":"vxlan"}}"#, Err("SubnetLen: -1 is invalid: expected an integer from 0 to 32")),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":"24","Backend":{"Type":"vxlan"}}"#, Err("SubnetLen: \"24\" is invalid")),
            // SubnetMin / SubnetMax.
            (r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.20.0","Backend":{"Type":"vxlan"}}"#,
             ok(|c| c.subnets().count() == 11 && c.in_range("10.244.15.0/24".parse().unwrap()) && !c.in_range("10.244.21.0/24".parse().unwrap()))),
            (r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0","Backend":{"Type":"vxlan"}}"#, Err("SubnetMin: 10.245.0.0 is invalid: expected an address inside Network 10.244.0.0/16")),
            (r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.3.7","Backend":{"Type":"vxlan"}}"#, Err("SubnetMax: 10.244.3.7 is invalid: not on a /24 boundary; did you mean 10.244.3.0?")),
            (r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.3.0","Backend":{"Type":"vxlan"}}"#, Err("SubnetMin: 10.244.9.0 is invalid: expected an address not above SubnetMax 10.244.3.0")),
            (r#"{"Network":"10.244.0.0/16","SubnetMin":"banana","Backend":{"Type":"vxlan"}}"#, Err("SubnetMin: banana is invalid: expected an IPv4 address")),
            // Network.
            (r#"{"Backend":{"Type":"vxlan"}}"#, Err("Network is missing")),
            (r#"{"Network":"10.244.0.0","Backend":{"Type":"vxlan"}}"#, Err("Network: 10.244.0.0 is invalid: expected an IPv4 CIDR")),
            (r#"{"Network":"10.244.1.0/16","Backend":{"Type":"vxlan"}}"#, Err("did you mean 10.244.0.0/16?")),
            (r#"{"Network":16,"Backend":{"Type":"vxlan"}}"#, Err("Network: 16 is invalid")),
            // Case-insensitive names, as Go decodes them; unknown names kept.
            (r#"{"network":"10.244.0.0/16","backend":{"type":"VXLAN","vni":7,"port":4789},"Netwrok":"x"}"#,
             ok(|c| c.backend.vni == 7 && c.backend.port == 4789 && c.unknown_fields == ["Netwrok"])),
            // Two spellings of one field: refused, naming both.
            (r#"{"Network":"10.244.0.0/16","network":"10.245.0.0/16","Backend":{"Type":"vxlan"}}"#,
             Err("Network and network name the same field")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1,"vni":2}}"#,
             Err("Backend.VNI and Backend.vni name the same field")),
            // Ranges pods cannot have.
            (r#"{"Network":"0.0.0.0/0","Backend":{"Type":"vxlan"}}"#, Err("Network: 0.0.0.0/0 is invalid: overlaps 0.0.0.0/8")),
            (r#"{"Network":"127.0.0.0/8","Backend":{"Type":"vxlan"}}"#, Err("overlaps 127.0.0.0/8 (loopback)")),
            (r#"{"Network":"224.0.0.0/4","Backend":{"Type":"vxlan"}}"#, Err("overlaps 224.0.0.0/4 (multicast)")),
            (r#"{"Network":"239.1.0.0/16","Backend":{"Type":"vxlan"}}"#, Err("overlaps 224.0.0.0/4 (multicast)")),
            (r#"{"Network":"169.254.0.0/16","Backend":{"Type":"vxlan"}}"#, Err("(link-local)")),
            (r#"{"Network":"240.0.0.0/8","Backend":{"Type":"vxlan"}}"#, Err("overlaps 240.0.0.0/4")),
            (r#"{"Network":"100.64.0.0/10","Backend":{"Type":"vxlan"}}"#, ok(|c| c.subnet_len == 24)),
            // The VXLAN device's name must fit the kernel's 15 bytes.
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":16777215}}"#,
             Err("Backend.VNI: 16777215 is invalid: the VXLAN device would be named flannel.16777215 (16 bytes), over the kernel's 15")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":9999999}}"#, ok(|c| c.backend.vni == 9_999_999)),
            // Backend.
            (r#"{"Network":"10.244.0.0/16"}"#, Err("Backend is missing")),
            (r#"{"Network":"10.244.0.0/16","Backend":"vxlan"}"#, Err("Backend: \"vxlan\" is invalid: expected an object")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#, ok(|c| c.backend.kind == BackendType::HostGw && !c.backend.direct_routing)),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"Host-GW"}}"#, ok(|c| c.backend.kind == BackendType::HostGw)),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"VXLAN"}}"#, ok(|c| c.backend.kind == BackendType::Vxlan)),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#, Err("Backend.Type: \"udp\" is invalid: expected \"vxlan\" or \"host-gw\"")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw","DirectRouting":true}}"#, Err("Backend.DirectRouting: true is invalid: a vxlan option")),
            (r#"{"Network":"10.244.0.0/16","Backend":{}}"#, Err("Backend.Type: \"udp\" is invalid")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#, Err("Backend.VNI: 16777216 is invalid: expected an integer from 0 to 16777215")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Port":0}}"#, ok(|c| c.backend.port == 8472)),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Port":70000}}"#, Err("Backend.Port: 70000 is invalid: expected an integer from 0 to 65535")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":1400}}"#, ok(|c| c.backend.mtu == Some(1400))),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":40}}"#, Err("Backend.MTU: 40 is invalid: expected 0 (uplink MTU − 50) or at least 68")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#, Err("Backend.GBP: true is invalid")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":false,"DirectRouting":false}}"#, ok(|c| !c.backend.gbp)),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":"yes"}}"#, Err("Backend.DirectRouting: \"yes\" is invalid: expected true or false")),
            (r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#, ok(|c| c.backend.direct_routing && c.backend.kind == BackendType::Vxlan)),
            // IP families.
            (r#"{"Network":"10.244.0.0/16","EnableIPv4":false,"Backend":{"Type":"vxlan"}}"#, Err("at least one of EnableIPv4 and EnableIPv6")),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#, Err("IPv6Network is missing")),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#,
                ok(|c| c.enable_ipv6 && c.ipv6_subnet_len == 64 && c.ipv6_subnet_min == "fd00:0:0:1::".parse::<Ipv6Addr>().unwrap() && c.ipv6_subnet_max == "fd00:0:0:ff::".parse::<Ipv6Addr>().unwrap() && c.subnets6().count() == 255)),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/64","Backend":{"Type":"vxlan"}}"#, ok(|c| c.ipv6_subnet_len == 66 && c.subnets6().count() == 3)),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/125","Backend":{"Type":"vxlan"}}"#, Err("IPv6Network: fd00::/125 is invalid: too small")),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetLen":57,"Backend":{"Type":"vxlan"}}"#, Err("IPv6SubnetLen: 57 is invalid: IPv6Network fd00::/56 must hold at least four subnets: expected 58 to 126")),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetLen":127,"Backend":{"Type":"vxlan"}}"#, Err("IPv6SubnetLen: 127 is invalid: expected at most 126")),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00:0:0:1::1","Backend":{"Type":"vxlan"}}"#, Err("IPv6SubnetMin: fd00:0:0:1::1 is invalid: not on a /64 boundary; did you mean fd00:0:0:1::?")),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMax":"fd01::","Backend":{"Type":"vxlan"}}"#, Err("IPv6SubnetMax: fd01:: is invalid: expected an address inside IPv6Network fd00::/56")),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00:0:0:10::","IPv6SubnetMax":"fd00:0:0:12::","Backend":{"Type":"vxlan"}}"#, ok(|c| c.subnets6().count() == 3 && c.in_range6("fd00:0:0:11::/64".parse().unwrap()) && !c.in_range6("fd00:0:0:13::/64".parse().unwrap()))),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::1/56","Backend":{"Type":"vxlan"}}"#, Err("IPv6Network: fd00::1/56 is invalid: host bits are set; did you mean fd00::/56?")),
            (r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#, ok(|c| !c.enable_ipv4 && c.enable_ipv6 && c.lease_slots() == 0 && c.check_store("kube").is_ok() && c.check_store("local").is_ok() && c.check_store("etcd").unwrap_err().to_string().contains("need --kube-subnet-mgr"))),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#, ok(|c| c.check_store("etcd").is_ok())),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"host-gw"}}"#, ok(|c| c.backend.kind == BackendType::HostGw)),
            (r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan","DirectRouting":true}}"#, ok(|c| c.backend.direct_routing)),
            (r#"{"Network":"10.244.0.0/16","IPv6Network":"nope","Backend":{"Type":"vxlan"}}"#, Err("IPv6Network: nope is invalid")),
            (r#"{"Network":"10.244.0.0/16","EnableIPv4":"true","Backend":{"Type":"vxlan"}}"#, Err("EnableIPv4: \"true\" is invalid: expected true or false")),
            // Not JSON objects.
            ("", Err("not a JSON object")),
            ("[1,2]", Err("not a JSON object: found an array")),
            ("{\"Network\":", Err("not a JSON object")),
        ];
        for (text, want) in table {
            match (NetConfig::parse(text), want) {
                (Ok(c), Ok(check)) => assert!(check(&c), "{text}: unexpected {c:?}"),
                (Err(e), Err(sub)) => {
                    let msg = e.to_string();
                    assert!(msg.contains(sub), "{text}: got {msg:?}, want {sub:?}");
                }
                (got, _) => panic!("{text}: got {got:?}"),
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// Arbitrary text never panics.
        #[test]
        fn any_text_is_answered(text in ".{0,200}") {
            let _ = NetConfig::parse(&text);
        }

        /// Plausible configs with random values never panic, and whatever is
        /// accepted keeps the allocator's invariants.
        #[test]
        fn accepted_configs_are_consistent(
            a in 0u8..=255, b in 0u8..=255, plen in 0u8..=33,
            len in proptest::option::of(0i64..=40),
            min in proptest::option::of((0u8..=255, 0u8..=255)),
            max in proptest::option::of((0u8..=255, 0u8..=255)),
            vni in proptest::option::of(-2i64..=20_000_000),
            port in proptest::option::of(-1i64..=70_000),
            mtu in proptest::option::of(-1i64..=10_000),
        ) {
            let mut obj = serde_json::json!({
                "Network": format!("{a}.{b}.0.0/{plen}"),
                "Backend": {"Type": "vxlan"},
            });
            if let Some(l) = len { obj["SubnetLen"] = l.into(); }
            if let Some((x, y)) = min { obj["SubnetMin"] = format!("{a}.{b}.{x}.{y}").into(); }
            if let Some((x, y)) = max { obj["SubnetMax"] = format!("{a}.{b}.{x}.{y}").into(); }
            if let Some(v) = vni { obj["Backend"]["VNI"] = v.into(); }
            if let Some(p) = port { obj["Backend"]["Port"] = p.into(); }
            if let Some(m) = mtu { obj["Backend"]["MTU"] = m.into(); }
            if let Ok(c) = NetConfig::parse(&obj.to_string()) {
                proptest::prop_assert!(c.subnet_len <= 30 && c.subnet_len >= c.network.prefix_len() + 2);
                proptest::prop_assert!(c.subnet_min <= c.subnet_max);
                proptest::prop_assert!(c.network.contains(&c.subnet_min) && c.network.contains(&c.subnet_max));
                let first = c.subnets().next().unwrap();
                proptest::prop_assert!(c.in_range(first));
                proptest::prop_assert!(c.backend.port != 0);
            }
        }
    }
}

//! The CNI protocol as the plugin speaks it: versions, the error object,
//! the result object in each version's shape, and the environment.
//!
//! Spec versions 0.3.0 to 1.1.0 are served. The result shapes differ in
//! small ways only: before 1.0.0 each IP carries `"version": "4"`; 1.1.0
//! adds the interface MTU.

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{json, Map, Value};

pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// Well-known error codes (spec section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific (100 and up): the container interface is there already.
    pub const INTERFACE_EXISTS: u32 = 100;
    /// Plugin-specific: CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 101;
    /// Plugin-specific: the agent refused the pod.
    pub const AGENT_REFUSED: u32 = 102;
}

/// An error as the spec returns it on stdout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    pub fn io(msg: impl Into<String>, err: impl fmt::Display) -> Self {
        Self::new(code::IO, msg).details(err)
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }

    /// Reads an error another plugin printed (IPAM), if it is one.
    pub fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            code: u32::try_from(v.get("code")?.as_u64()?).ok()?,
            msg: v.get("msg")?.as_str().unwrap_or_default().to_string(),
            details: v
                .get("details")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

pub type CniResult<T> = Result<T, CniError>;

/// `a.b.c` as a comparable triple.
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(t)
}

/// Refuses a version outside the served range with the spec's code 1.
pub fn check_version(v: &str) -> CniResult<()> {
    if SUPPORTED.contains(&v) {
        return Ok(());
    }
    Err(CniError::new(
        code::INCOMPATIBLE_VERSION,
        format!(
            "incompatible CNI versions: config is \"{v}\", plugin supports {}",
            SUPPORTED.join(", ")
        ),
    ))
}

pub fn at_least(v: &str, min: &str) -> bool {
    matches!((parse_version(v), parse_version(min)), (Some(a), Some(b)) if a >= b)
}

/// `VERSION`'s answer.
pub fn version_info() -> Value {
    json!({"cniVersion": LATEST, "supportedVersions": SUPPORTED})
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub sandbox: Option<String>,
    pub mtu: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gw: Option<Ipv4Addr>,
}

/// An IPv6 address of a result (dual-stack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig6 {
    pub address: Ipv6Net,
    pub gateway: Option<Ipv6Addr>,
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route6 {
    pub dst: Ipv6Net,
    pub gw: Option<Ipv6Addr>,
}

/// A result in the plugin's own terms; rendered per version. IPv6
/// addresses and routes (dual-stack) are kept apart from the IPv4 ones
/// and rendered after them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CniOutput {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub ips6: Vec<IpConfig6>,
    pub routes6: Vec<Route6>,
    pub dns: Value,
}

impl CniOutput {
    pub fn to_json(&self, version: &str) -> Value {
        let before_1 = !at_least(version, "1.0.0");
        let with_mtu = at_least(version, "1.1.0");
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({"name": i.name, "mac": i.mac});
                if let Some(s) = &i.sandbox {
                    v["sandbox"] = json!(s);
                }
                if let (true, Some(m)) = (with_mtu, i.mtu) {
                    v["mtu"] = json!(m);
                }
                v
            })
            .collect();
        let ip = |address: String, gateway: Option<String>, interface: Option<usize>, family| {
            let mut v = json!({ "address": address });
            if before_1 {
                v["version"] = json!(family);
            }
            if let Some(g) = gateway {
                v["gateway"] = json!(g);
            }
            if let Some(i) = interface {
                v["interface"] = json!(i);
            }
            v
        };
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|i| {
                ip(
                    i.address.to_string(),
                    i.gateway.map(|g| g.to_string()),
                    i.interface,
                    "4",
                )
            })
            .chain(self.ips6.iter().map(|i| {
                ip(
                    i.address.to_string(),
                    i.gateway.map(|g| g.to_string()),
                    i.interface,
                    "6",
                )
            }))
            .collect();
        let route = |dst: String, gw: Option<String>| {
            let mut v = json!({ "dst": dst });
            if let Some(g) = gw {
                v["gw"] = json!(g);
            }
            v
        };
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| route(r.dst.to_string(), r.gw.map(|g| g.to_string())))
            .chain(
                self.routes6
                    .iter()
                    .map(|r| route(r.dst.to_string(), r.gw.map(|g| g.to_string()))),
            )
            .collect();
        let dns = if self.dns.is_object() {
            self.dns.clone()
        } else {
            json!({})
        };
        json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": dns,
        })
    }

    /// Reads a result of any served version (an IPAM plugin's answer, or a
    /// `prevResult`), both families.
    pub fn from_json(v: &Value) -> CniResult<Self> {
        let bad = |what: &str| CniError::new(code::DECODE, format!("result: {what}"));
        let mut out = CniOutput {
            dns: v.get("dns").cloned().unwrap_or(Value::Null),
            ..Default::default()
        };
        for i in v
            .get("interfaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.interfaces.push(Interface {
                name: i
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("an interface has no name"))?
                    .to_string(),
                mac: i
                    .get("mac")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                sandbox: i.get("sandbox").and_then(Value::as_str).map(String::from),
                mtu: i.get("mtu").and_then(Value::as_u64).map(|m| m as u32),
            });
        }
        for ip in v.get("ips").and_then(Value::as_array).into_iter().flatten() {
            let addr = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("an IP has no address"))?;
            let interface = ip
                .get("interface")
                .and_then(Value::as_u64)
                .map(|i| i as usize);
            if addr.contains(':') {
                out.ips6.push(IpConfig6 {
                    address: addr
                        .parse()
                        .map_err(|_| bad(&format!("address {addr:?} is not an IPv6 CIDR")))?,
                    gateway: opt_addr6(ip, "gateway")?,
                    interface,
                });
                continue;
            }
            out.ips.push(IpConfig {
                address: addr
                    .parse()
                    .map_err(|_| bad(&format!("address {addr:?} is not a CIDR")))?,
                gateway: opt_addr(ip, "gateway")?,
                interface: ip
                    .get("interface")
                    .and_then(Value::as_u64)
                    .map(|i| i as usize),
            });
        }
        for r in v
            .get("routes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let dst = r
                .get("dst")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("a route has no dst"))?;
            if dst.contains(':') {
                out.routes6.push(Route6 {
                    dst: dst
                        .parse()
                        .map_err(|_| bad(&format!("route dst {dst:?} is not an IPv6 CIDR")))?,
                    gw: opt_addr6(r, "gw")?,
                });
                continue;
            }
            out.routes.push(Route {
                dst: dst
                    .parse()
                    .map_err(|_| bad(&format!("route dst {dst:?} is not a CIDR")))?,
                gw: opt_addr(r, "gw")?,
            });
        }
        Ok(out)
    }
}

/// An optional IPv6 address field of a result entry.
fn opt_addr6(entry: &Value, key: &str) -> CniResult<Option<Ipv6Addr>> {
    entry
        .get(key)
        .and_then(Value::as_str)
        .map(|g| {
            g.parse().map_err(|_| {
                CniError::new(
                    code::DECODE,
                    format!("result: {key} {g:?} is not an IPv6 address"),
                )
            })
        })
        .transpose()
}

/// An optional IPv4 address field of a result entry.
fn opt_addr(entry: &Value, key: &str) -> CniResult<Option<Ipv4Addr>> {
    entry
        .get(key)
        .and_then(Value::as_str)
        .map(|g| {
            g.parse().map_err(|_| {
                CniError::new(
                    code::DECODE,
                    format!("result: {key} {g:?} is not an IPv4 address"),
                )
            })
        })
        .transpose()
}

/// The `CNI_*` variables of one call.
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

impl CniEnv {
    pub fn from_env() -> Self {
        Self::from_map(&std::env::vars().collect())
    }

    pub fn from_map(vars: &HashMap<String, String>) -> Self {
        let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
        Self {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    /// Fails with code 4 naming every variable in `need` that is empty.
    pub fn require(&self, need: &[&str]) -> CniResult<()> {
        let missing: Vec<&str> = need
            .iter()
            .copied()
            .filter(|k| match *k {
                "CNI_CONTAINERID" => self.container_id.is_empty(),
                "CNI_NETNS" => self.netns.is_empty(),
                "CNI_IFNAME" => self.ifname.is_empty(),
                "CNI_PATH" => self.path.is_empty(),
                _ => false,
            })
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "required environment variables missing: {}",
                    missing.join(", ")
                ),
            ));
        }
        if !self.container_id.is_empty() {
            valid_container_id(&self.container_id)?;
        }
        if !self.ifname.is_empty() {
            valid_ifname(&self.ifname)?;
        }
        if !self.netns.is_empty() {
            valid_netns(&self.netns)?;
        }
        Ok(())
    }

    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAME=x;IgnoreUnknown=1`).
    pub fn args_map(&self) -> Map<String, Value> {
        self.args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect()
    }
}

/// The spec's rule: alphanumerics, then also `_`, `.` and `-`.
pub fn valid_container_id(id: &str) -> CniResult<()> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID {id:?} is invalid: it must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"),
        ))
    }
}

/// A Linux interface name: 1 to 15 printable ASCII bytes, no `/`, `:`
/// or whitespace, not `.`/`..` (the kernel takes other bytes too, but
/// they end up in file names, logs and terminals).
pub fn valid_ifname(name: &str) -> CniResult<()> {
    if crate::config::is_interface_name(name) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME {name:?} is not a valid interface name (1-15 printable ASCII bytes, no '/', ':' or spaces)"),
        ))
    }
}

/// `CNI_NETNS`: an absolute path with no `.` or `..` component (a
/// runtime passes `/proc/<pid>/ns/net` or `/run/netns/<name>`).
pub fn valid_netns(path: &str) -> CniResult<()> {
    if crate::fsutil::plain_absolute(path) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {path:?} must be an absolute path without '.' or '..'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniOutput {
        CniOutput {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "0e:b7:0a:f4:01:01".into(),
                    sandbox: None,
                    mtu: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    sandbox: Some("/run/netns/x".into()),
                    mtu: Some(1450),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.5/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.1.1".parse().unwrap()),
            }],
            ips6: vec![IpConfig6 {
                address: "fd00:10:244:1::5/64".parse().unwrap(),
                gateway: Some("fd00:10:244:1::1".parse().unwrap()),
                interface: Some(1),
            }],
            routes6: vec![Route6 {
                dst: "::/0".parse().unwrap(),
                gw: Some("fd00:10:244:1::1".parse().unwrap()),
            }],
            dns: json!({}),
        }
    }

    #[test]
    fn results_take_each_versions_shape_and_read_back() {
        for v in SUPPORTED {
            let j = sample().to_json(v);
            assert_eq!(j["cniVersion"], *v);
            let ip = &j["ips"][0];
            assert_eq!(ip.get("version").is_some(), !at_least(v, "1.0.0"), "{v}");
            assert_eq!(
                j["interfaces"][1].get("mtu").is_some(),
                at_least(v, "1.1.0"),
                "{v}"
            );
            assert_eq!(ip["interface"], 1);
            // Dual-stack: the IPv6 address and route after the IPv4 ones.
            let ip6 = &j["ips"][1];
            assert_eq!(ip6["address"], "fd00:10:244:1::5/64");
            if !at_least(v, "1.0.0") {
                assert_eq!(ip6["version"], "6", "{v}");
            }
            assert_eq!(j["routes"][1]["dst"], "::/0");
            let mut back = CniOutput::from_json(&j).unwrap();
            if !at_least(v, "1.1.0") {
                back.interfaces[1].mtu = Some(1450);
            }
            assert_eq!(back, sample(), "{v}");
        }
    }

    #[test]
    fn versions_outside_the_range_are_refused_with_code_1() {
        for bad in ["0.2.0", "0.1.0", "1.2.0", "", "x", "1.0"] {
            assert_eq!(check_version(bad).unwrap_err().code, 1, "{bad:?}");
        }
        assert!(at_least("0.4.0", "0.4.0") && !at_least("0.3.1", "0.4.0"));
        assert!(at_least("1.1.0", "1.0.0") && !at_least("garbage", "0.3.0"));
    }

    #[test]
    fn environment_is_checked_and_names_what_is_missing() {
        let env = CniEnv::from_map(&HashMap::from([(
            "CNI_CONTAINERID".to_string(),
            "abc".to_string(),
        )]));
        let e = env
            .require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])
            .unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_NETNS, CNI_IFNAME"), "{}", e.msg);
        for id in ["-abc", "a/b", "a b", "../x"] {
            assert!(valid_container_id(id).is_err(), "{id}");
        }
        for name in [
            "",
            "eth0/1",
            "a:b",
            ".",
            "..",
            "sixteen-chars-xx",
            "a b",
            "eth\u{7}0",
            "eth0\n",
            "\u{1b}[31m",
            "\u{e9}th0",
        ] {
            assert!(valid_ifname(name).is_err(), "{name:?}");
        }
        assert!(valid_ifname("eth0").is_ok() && valid_container_id("k8s_pod-1.a").is_ok());
        for netns in ["net", "proc/1/ns/net", "/run/netns/../x", "/run/./netns/x"] {
            assert!(valid_netns(netns).is_err(), "{netns:?}");
        }
        for netns in ["/proc/42/ns/net", "/run/netns/cni-1234", "/var/run/netns/x"] {
            assert!(valid_netns(netns).is_ok(), "{netns:?}");
        }
        // The checks run with the variables present.
        let bad = CniEnv::from_map(&HashMap::from([
            ("CNI_CONTAINERID".to_string(), "abc".to_string()),
            ("CNI_NETNS".to_string(), "relative/ns".to_string()),
            ("CNI_IFNAME".to_string(), "eth0".to_string()),
        ]));
        let e = bad
            .require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])
            .unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"), "{}", e.msg);
    }

    #[test]
    fn ipam_errors_are_recognised() {
        let e = CniError::from_json(
            &json!({"cniVersion":"1.0.0","code":11,"msg":"busy","details":"d"}),
        )
        .unwrap();
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (11, "busy", "d")
        );
        assert!(CniError::from_json(&json!({"ips": []})).is_none());
    }
}

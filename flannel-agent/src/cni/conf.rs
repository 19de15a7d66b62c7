//! The plugin's network configuration: Flannel's `type: flannel` keys
//! (`subnetFile`, `dataDir`, `delegate`, `ipam`) plus the spec's common
//! ones (`cniVersion`, `name`, `prevResult`, `runtimeConfig`, `args`).
//!
//! Flannel hands a delegate config to the reference `bridge` plugin; this
//! plugin wires the pod itself and reads the same delegate keys with the
//! same defaults: `bridge` (cni0), `mtu` (FLANNEL_MTU), `ipMasq`
//! (!FLANNEL_IPMASQ), `hairpinMode`, `isDefaultGateway`.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::spec::{check_version, code, CniError, CniResult};
use crate::subnet::env::SubnetEnv;

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
pub const DEFAULT_BRIDGE: &str = "cni0";

/// Keys of `delegate` this plugin honours.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delegate {
    pub bridge: Option<String>,
    pub mtu: Option<u32>,
    pub ip_masq: Option<bool>,
    pub hairpin_mode: bool,
    pub is_default_gateway: bool,
}

/// One attachment the runtime still uses (GC's valid list).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    /// The agent's socket; by default `agent.sock` next to the subnet file.
    pub agent_socket: PathBuf,
    pub delegate: Delegate,
    /// Flannel's top-level `ipam` (merged into the IPAM config).
    pub ipam: Map<String, Value>,
    pub prev_result: Option<Value>,
    pub runtime_config: Option<Value>,
    pub args: Option<Value>,
    /// GC's `cni.dev/valid-attachments`.
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn decode(msg: impl Into<String>) -> CniError {
    CniError::new(code::DECODE, msg)
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

fn opt_str(m: &Map<String, Value>, key: &str) -> CniResult<Option<String>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!("{key} must be a string, not {other}"))),
    }
}

fn opt_bool(m: &Map<String, Value>, key: &str) -> CniResult<Option<bool>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(format!("{key} must be true or false, not {other}"))),
    }
}

impl NetConf {
    /// Parses stdin. `cniVersion` is checked first so that a version
    /// mismatch is reported as such (code 1).
    pub fn parse(bytes: &[u8]) -> CniResult<Self> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| decode(format!("network configuration is not JSON: {e}")))?;
        let m = v
            .as_object()
            .ok_or_else(|| decode("network configuration must be a JSON object"))?;
        let cni_version = opt_str(m, "cniVersion")?
            .ok_or_else(|| invalid("cniVersion is missing from the network configuration"))?;
        check_version(&cni_version)?;
        let name = opt_str(m, "name")?.unwrap_or_default();
        if name.is_empty() {
            return Err(invalid("name is missing from the network configuration"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(invalid(format!(
                "name {name:?} may hold only letters, digits, '_', '.' and '-'"
            )));
        }
        // The runtime chose this plugin by `type`; a config without one
        // was not meant for any plugin.
        if opt_str(m, "type")?.is_none_or(|t| t.is_empty()) {
            return Err(invalid("type is missing from the network configuration"));
        }
        let subnet_file =
            PathBuf::from(opt_str(m, "subnetFile")?.unwrap_or(DEFAULT_SUBNET_FILE.into()));
        let data_dir = PathBuf::from(opt_str(m, "dataDir")?.unwrap_or(DEFAULT_DATA_DIR.into()));
        // Records are written under it: it must be a plain absolute path.
        if !crate::fsutil::plain_absolute(&data_dir.to_string_lossy()) {
            return Err(invalid(format!(
                "dataDir {data_dir:?} must be an absolute path without '.' or '..'"
            )));
        }
        let agent_socket = match opt_str(m, "agentSocket")? {
            Some(s) => PathBuf::from(s),
            None => subnet_file
                .parent()
                .unwrap_or(std::path::Path::new("/run/flannel"))
                .join("agent.sock"),
        };
        let delegate = match m.get("delegate") {
            None | Some(Value::Null) => Delegate::default(),
            Some(Value::Object(d)) => {
                if let Some(t) = opt_str(d, "type")? {
                    if t != "bridge" {
                        return Err(CniError::new(
                            code::UNSUPPORTED_FIELD,
                            format!("delegate.type {t:?} is not supported: this plugin wires pods onto a bridge itself (leave type out or set \"bridge\")"),
                        ));
                    }
                }
                let mtu = match d.get("mtu") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_u64().filter(|m| (68..=65535).contains(m)).ok_or_else(
                        || {
                            invalid(format!(
                                "delegate.mtu {v} must be a number from 68 to 65535"
                            ))
                        },
                    )? as u32),
                };
                Delegate {
                    bridge: opt_str(d, "bridge")?,
                    mtu,
                    ip_masq: opt_bool(d, "ipMasq")?,
                    hairpin_mode: opt_bool(d, "hairpinMode")?.unwrap_or(false),
                    is_default_gateway: opt_bool(d, "isDefaultGateway")?.unwrap_or(false),
                }
            }
            Some(other) => return Err(invalid(format!("delegate must be an object, not {other}"))),
        };
        if let Some(b) = &delegate.bridge {
            super::spec::valid_ifname(b)
                .map_err(|_| invalid(format!("delegate.bridge {b:?} is not an interface name")))?;
        }
        let ipam = match m.get("ipam") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(other) => return Err(invalid(format!("ipam must be an object, not {other}"))),
        };
        if let Some(t) = ipam.get("type") {
            let t = t
                .as_str()
                .ok_or_else(|| invalid("ipam.type must be a string"))?;
            if t.is_empty() || t.contains('/') {
                return Err(invalid(format!("ipam.type {t:?} is not a plugin name")));
            }
        }
        let valid_attachments = match m.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(list)) => Some(
                list.iter()
                    .map(|a| {
                        let id = a.get("containerID").and_then(Value::as_str);
                        let ifname = a.get("ifname").and_then(Value::as_str);
                        match (id, ifname) {
                            (Some(id), Some(ifname)) => Ok(Attachment {
                                container_id: id.to_string(),
                                ifname: ifname.to_string(),
                            }),
                            _ => Err(invalid(format!(
                                "cni.dev/valid-attachments entry {a} needs containerID and ifname"
                            ))),
                        }
                    })
                    .collect::<CniResult<Vec<_>>>()?,
            ),
            Some(other) => {
                return Err(invalid(format!(
                    "cni.dev/valid-attachments must be a list, not {other}"
                )))
            }
        };
        Ok(NetConf {
            cni_version,
            name,
            subnet_file,
            data_dir,
            agent_socket,
            delegate,
            ipam,
            prev_result: m.get("prevResult").cloned().filter(|v| !v.is_null()),
            runtime_config: m.get("runtimeConfig").cloned().filter(|v| !v.is_null()),
            args: m.get("args").cloned().filter(|v| !v.is_null()),
            valid_attachments,
        })
    }

    pub fn bridge(&self) -> &str {
        self.delegate.bridge.as_deref().unwrap_or(DEFAULT_BRIDGE)
    }

    /// subnet.env, with Flannel's message when it is not there.
    pub fn subnet_env(&self) -> CniResult<SubnetEnv> {
        let path = &self.subnet_file;
        let text = std::fs::read_to_string(path).map_err(|e| {
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "failed to load flannel 'subnet.env' file: open {}: {e}. Check the agent on this node (flannel-agent): it writes this file once the node has its lease",
                    path.display()
                ),
            )
        })?;
        SubnetEnv::parse(&text).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "failed to load flannel 'subnet.env' file {}: {e}",
                    path.display()
                ),
            )
        })
    }

    pub fn ipam_type(&self) -> String {
        self.ipam
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("host-local")
            .to_string()
    }

    /// The IPAM plugin's config, built the way Flannel builds it: the
    /// top-level `ipam` with `type` (host-local), `ranges` (the node's
    /// lease) and `routes` (the cluster network) filled in when absent.
    pub fn ipam_config(&self, env: &SubnetEnv) -> Map<String, Value> {
        let mut ipam = self.ipam.clone();
        ipam.insert("type".into(), json!(self.ipam_type()));
        // As Flannel's plugin: one range per family, from subnet.env.
        if !ipam.contains_key("subnet") && !ipam.contains_key("ranges") {
            let mut ranges: Vec<Value> = env
                .lease()
                .map(|lease| json!([{"subnet": lease.to_string()}]))
                .into_iter()
                .collect();
            if let Some(lease6) = env.lease6() {
                ranges.push(json!([{"subnet": lease6.to_string()}]));
            }
            ipam.insert("ranges".into(), Value::Array(ranges));
        }
        let mut routes = ipam
            .get("routes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let nets = env
            .network
            .map(|n| n.to_string())
            .into_iter()
            .chain(env.ipv6_network.map(|n| n.to_string()));
        for net in nets {
            if !routes.iter().any(|r| r["dst"] == json!(net)) {
                routes.push(json!({ "dst": net }));
            }
        }
        ipam.insert("routes".into(), Value::Array(routes));
        ipam
    }

    /// The IPAM plugin's stdin: our config with `ipam` replaced.
    pub fn ipam_stdin(&self, version: &str, ipam: &Map<String, Value>) -> Value {
        let mut v = json!({
            "cniVersion": version,
            "name": self.name,
            "type": "flannel",
            "ipam": ipam,
        });
        if let Some(rc) = &self.runtime_config {
            v["runtimeConfig"] = rc.clone();
        }
        if let Some(a) = &self.args {
            v["args"] = a.clone();
        }
        if let Some(p) = &self.prev_result {
            v["prevResult"] = p.clone();
        }
        v
    }

    /// Whether the plugin masquerades this pod's traffic (Flannel: when
    /// the agent does not).
    pub fn ip_masq(&self, env: &SubnetEnv) -> bool {
        self.delegate.ip_masq.unwrap_or(!env.ipmasq)
    }

    pub fn mtu(&self, env: &SubnetEnv) -> u32 {
        self.delegate.mtu.unwrap_or(env.mtu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;

    fn env() -> SubnetEnv {
        SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap()
    }

    #[test]
    fn flannels_own_config_is_read_with_flannels_defaults() {
        let c = NetConf::parse(FLANNEL.as_bytes()).unwrap();
        assert_eq!(c.name, "cbr0");
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.agent_socket, PathBuf::from("/run/flannel/agent.sock"));
        assert_eq!(c.bridge(), "cni0");
        assert!(c.delegate.hairpin_mode && c.delegate.is_default_gateway);
        // The agent masquerades (FLANNEL_IPMASQ=true), so the plugin does not.
        assert!(!c.ip_masq(&env()));
        assert_eq!(c.mtu(&env()), 1450);
        let ipam = c.ipam_config(&env());
        assert_eq!(
            Value::Object(ipam),
            json!({"type":"host-local","ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}]})
        );
        // Dual-stack subnet.env: a range and a route per family, as
        // Flannel's plugin hands host-local.
        let dual = env().with_ipv6(
            "fd00:10:244::/56".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        );
        assert_eq!(
            Value::Object(c.ipam_config(&dual)),
            json!({"type":"host-local","ranges":[[{"subnet":"10.244.1.0/24"}],[{"subnet":"fd00:10:244:1::/64"}]],"routes":[{"dst":"10.244.0.0/16"},{"dst":"fd00:10:244::/56"}]})
        );
    }

    #[test]
    fn ipam_and_delegate_overrides_are_kept() {
        let c = NetConf::parse(br#"{"name":"n","type":"flannel","cniVersion":"1.1.0","subnetFile":"/x/subnet.env","dataDir":"/d","delegate":{"bridge":"br9","mtu":1400,"ipMasq":true},"ipam":{"type":"host-local","dataDir":"/ipam","routes":[{"dst":"10.244.0.0/16"}]}}"#).unwrap();
        assert_eq!(c.agent_socket, PathBuf::from("/x/agent.sock"));
        assert_eq!(c.bridge(), "br9");
        assert!(c.ip_masq(&env()));
        assert_eq!(c.mtu(&env()), 1400);
        let ipam = c.ipam_config(&env());
        assert_eq!(ipam["dataDir"], "/ipam");
        assert_eq!(ipam["routes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn bad_configs_get_the_specs_codes() {
        let table: &[(&str, u32, &str)] = &[
            ("", 6, "not JSON"),
            ("[]", 6, "JSON object"),
            (r#"{"name":"n"}"#, 7, "cniVersion is missing"),
            (
                r#"{"cniVersion":"0.2.0","name":"n"}"#,
                1,
                "incompatible CNI versions",
            ),
            (r#"{"cniVersion":"1.0.0"}"#, 7, "name is missing"),
            (
                r#"{"cniVersion":"1.0.0","name":"a/b","type":"flannel"}"#,
                7,
                "may hold only",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, 7, "type is missing"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":""}"#,
                7,
                "type is missing",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"flannel","dataDir":"var/lib"}"#,
                7,
                "dataDir",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"flannel","dataDir":"/var/lib/cni/../../etc"}"#,
                7,
                "dataDir",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"flannel","delegate":{"type":"ipvlan"}}"#,
                2,
                "delegate.type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"flannel","delegate":{"mtu":"big"}}"#,
                7,
                "delegate.mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"flannel","delegate":{"hairpinMode":"yes"}}"#,
                7,
                "hairpinMode",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"flannel","delegate":{"bridge":"a b"}}"#,
                7,
                "delegate.bridge",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"flannel","ipam":{"type":"../x"}}"#,
                7,
                "ipam.type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"flannel","subnetFile":5}"#,
                7,
                "subnetFile must be a string",
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"flannel","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#,
                7,
                "needs containerID",
            ),
        ];
        for (text, want_code, want) in table {
            let e = NetConf::parse(text.as_bytes()).unwrap_err();
            assert_eq!(e.code, *want_code, "{text}: {e}");
            assert!(e.msg.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn missing_subnet_env_says_to_check_the_agent() {
        let c = NetConf::parse(
            br#"{"name":"n","type":"flannel","cniVersion":"1.0.0","subnetFile":"/nonexistent/subnet.env"}"#,
        )
        .unwrap();
        let e = c.subnet_env().unwrap_err();
        assert_eq!(e.code, 11);
        assert!(
            e.msg.starts_with(
                "failed to load flannel 'subnet.env' file: open /nonexistent/subnet.env"
            ),
            "{e}"
        );
        assert!(e.msg.contains("Check the agent on this node"), "{e}");
    }
}

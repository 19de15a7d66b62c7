//! The agent's local API: one JSON request and one JSON response per line
//! over a unix socket. The lab and the CNI plugin register and remove pods
//! through it; `status` tells whether the node is ready and on which path.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;

/// A pod as registered with the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRecord {
    /// The pod's IPv4 address; `None` in an IPv6-only cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    pub mac: MacAddr,
    /// The host side of the pod's veth, in the agent's network namespace.
    pub host_ifname: String,
    /// The pod's IPv6 address (dual-stack): its IPv6 is checked and
    /// delivered by the programs too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
}

impl EndpointRecord {
    /// What names the pod among the registered ones: its IPv4 address, or
    /// in an IPv6-only cluster its IPv6 one (`None`: it has neither).
    pub fn key(&self) -> Option<IpAddr> {
        self.ip.map(IpAddr::V4).or(self.ip6.map(IpAddr::V6))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Add(EndpointRecord),
    /// Removes the pod of this [`EndpointRecord::key`].
    Del {
        ip: IpAddr,
    },
    // Struct variants (not unit) so that unknown fields are refused here too.
    List {},
    Status {},
    /// This node's state object by object: what the leases and pods ask
    /// for beside what the kernel and the maps hold.
    Inspect {},
    /// The path a packet from `src` to `dst` takes on this node.
    Trace {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        /// `tcp`, `udp` or `icmp` (default `udp`).
        #[serde(default)]
        proto: Option<String>,
        #[serde(default)]
        dport: Option<u16>,
    },
}

/// The answer to [`Request::Trace`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// What happens, in order.
    pub steps: Vec<Step>,
    /// Counters on this node of which one must move for the packet to
    /// have taken this path.
    pub expect: Vec<String>,
    /// Where a live probe can be sent from: `pod` (the source pod's
    /// namespace), `node` (this node) or `none` (another node's pod).
    pub probe_from: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Where it happens: a program, `kernel`, or another node.
    pub at: String,
    pub what: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `ebpf` or `kernel`.
    pub datapath: String,
    /// Why this data path is the active one.
    pub reason: String,
    pub subnet: String,
    pub remote_leases: usize,
    pub endpoints: usize,
    /// `local`, `etcd` or `kube`.
    #[serde(default)]
    pub subnet_manager: String,
    #[serde(default)]
    pub public_ip: String,
    /// Leases left out of the data path (wrong backend, bad data, overlap).
    #[serde(default)]
    pub ignored_leases: usize,
}

/// The answer to [`Request::Inspect`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspect {
    pub node: Status,
    /// `flannel.<VNI>` and the bridge: `ok`, or what is wrong.
    pub devices: Vec<Check>,
    pub remotes: Vec<RemoteCheck>,
    pub pods: Vec<PodCheck>,
    /// Leases left out of the data path, with the reason.
    pub ignored: Vec<Check>,
    /// What the next reconcile pass would change (empty when in order).
    pub pending: Vec<String>,
    /// Data path counters, summed over CPUs (empty in kernel mode).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// One object and its problems (none: in order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub problems: Vec<String>,
}

/// A remote lease beside its entries in the BPF maps and the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCheck {
    pub subnet: String,
    /// From the lease.
    pub public_ip: String,
    /// Empty for a direct remote.
    pub vtep_mac: String,
    /// Routed directly (DirectRouting, host-gw): `route` is then the
    /// route via the node's IP through the uplink, and there is no
    /// neighbour or FDB entry.
    #[serde(default)]
    pub direct: bool,
    /// The remote-subnet map's entry: `<node IP> <VtepMAC>`; `None`
    /// when absent (or on the kernel data path).
    pub map: Option<String>,
    /// Whether the node IP is in the known-VTEP map.
    pub map_vtep: Option<bool>,
    /// `onlink` route through `flannel.<VNI>`.
    pub route: bool,
    /// The permanent neighbour's MAC for the remote's gateway.
    pub neighbour: Option<String>,
    /// Where the FDB sends the remote's VtepMAC.
    pub fdb: Option<String>,
    pub problems: Vec<String>,
}

/// A registered pod beside its interface, map entry and program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodCheck {
    pub ip: String,
    pub mac: String,
    pub host_ifname: String,
    pub ifindex: Option<u32>,
    /// The endpoint map's entry: `ifindex <N> <MAC>`.
    pub map: Option<String>,
    /// `attached`, `pinned by an earlier agent`, `missing`, or `-` on the
    /// kernel data path.
    pub program: String,
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<EndpointRecord>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inspect: Option<Box<Inspect>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
}

impl Response {
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Default::default()
        }
    }

    pub fn err(msg: impl ToString) -> Self {
        Self {
            ok: false,
            error: Some(msg.to_string()),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent socket {path}: {source} (is the agent running on this node?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("agent sent an unreadable response: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("agent refused: {0}")]
    Refused(String),
}

/// Sends one request and waits for its response (blocking).
pub fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reader = BufReader::new(&stream);
    let mut buf = String::new();
    reader.read_line(&mut buf)?;
    let resp: Response = serde_json::from_str(&buf)?;
    if !resp.ok {
        return Err(ClientError::Refused(
            resp.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_from_their_wire_form() {
        let table = [
            (
                r#"{"op":"add","ip":"10.244.1.2","mac":"0e:00:00:00:00:02","host_ifname":"veth1"}"#,
                Request::Add(EndpointRecord {
                    ip: Some("10.244.1.2".parse().unwrap()),
                    mac: "0e:00:00:00:00:02".parse().unwrap(),
                    host_ifname: "veth1".into(),
                    ip6: None,
                }),
            ),
            (
                r#"{"op":"add","ip":"10.244.1.2","mac":"0e:00:00:00:00:02","host_ifname":"veth1","ip6":"fd00:10:244:1::2"}"#,
                Request::Add(EndpointRecord {
                    ip: Some("10.244.1.2".parse().unwrap()),
                    mac: "0e:00:00:00:00:02".parse().unwrap(),
                    host_ifname: "veth1".into(),
                    ip6: Some("fd00:10:244:1::2".parse().unwrap()),
                }),
            ),
            // An IPv6-only cluster's pod: no IPv4 address, named by its
            // IPv6 one.
            (
                r#"{"op":"add","mac":"0e:00:00:00:00:02","host_ifname":"veth1","ip6":"fd00:10:244:1::2"}"#,
                Request::Add(EndpointRecord {
                    ip: None,
                    mac: "0e:00:00:00:00:02".parse().unwrap(),
                    host_ifname: "veth1".into(),
                    ip6: Some("fd00:10:244:1::2".parse().unwrap()),
                }),
            ),
            (
                r#"{"op":"del","ip":"10.244.1.2"}"#,
                Request::Del {
                    ip: "10.244.1.2".parse().unwrap(),
                },
            ),
            (
                r#"{"op":"del","ip":"fd00:10:244:1::2"}"#,
                Request::Del {
                    ip: "fd00:10:244:1::2".parse().unwrap(),
                },
            ),
            (r#"{"op":"list"}"#, Request::List {}),
            (r#"{"op":"status"}"#, Request::Status {}),
            (r#"{"op":"inspect"}"#, Request::Inspect {}),
            (
                r#"{"op":"trace","src":"10.244.1.2","dst":"10.244.2.3","dport":80}"#,
                Request::Trace {
                    src: "10.244.1.2".parse().unwrap(),
                    dst: "10.244.2.3".parse().unwrap(),
                    proto: None,
                    dport: Some(80),
                },
            ),
        ];
        for (text, want) in table {
            assert_eq!(
                serde_json::from_str::<Request>(text).unwrap(),
                want,
                "{text}"
            );
        }
    }

    #[test]
    fn malformed_requests_are_refused() {
        for bad in [
            "",
            "{}",
            r#"{"op":"add","ip":"10.244.1.2"}"#,
            r#"{"op":"add","ip":"300.1.1.1","mac":"0e:00:00:00:00:02","host_ifname":"v"}"#,
            r#"{"op":"del"}"#,
            r#"{"op":"reboot"}"#,
            r#"{"op":"list","extra":1}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad:?}");
        }
    }
}

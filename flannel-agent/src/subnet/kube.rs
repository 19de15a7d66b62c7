//! The `kube` store: leases are Kubernetes Node objects.
//!
//! The subnet is the node's `spec.podCIDR` (or the first IPv4 entry of
//! `spec.podCIDRs`), allocated by kube-controller-manager, never by us. The
//! rest of the lease lives in Flannel's annotations under
//! `flannel.alpha.coreos.com/`, written by patching the node's status as
//! Flannel does; other nodes' annotations become their leases through a
//! kube-runtime watcher on Nodes.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use futures::StreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use kube::{
    api::{Api, Patch, PatchParams},
    Client, Config,
};

use super::{publish, Lease, LeaseAttrs, LeaseTx, Result, SubnetError};
use crate::config::NetConfig;

pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const PUBLIC_IP_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
pub const NODE_PUBLIC_IP: &str = "flannel.alpha.coreos.com/node-public-ip";
pub const BACKEND_V6_DATA: &str = "flannel.alpha.coreos.com/backend-v6-data";
pub const PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
pub const PUBLIC_IPV6_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ipv6-overwrite";

/// How to reach the API server (Flannel's `--kube-api-url`,
/// `--kubeconfig-file`; in-cluster config otherwise).
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    pub api_url: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
}

#[derive(Clone)]
pub struct KubeStore {
    nodes: Api<Node>,
    node_name: String,
}

fn err(what: &str, e: impl std::fmt::Display) -> SubnetError {
    SubnetError::Store(format!("kube: {what}: {e:#}"))
}

fn annotations(node: &Node) -> BTreeMap<String, String> {
    node.metadata.annotations.clone().unwrap_or_default()
}

/// The node's IPv4 pod CIDR: `spec.podCIDR`, else the first IPv4 entry of
/// `spec.podCIDRs`.
/// The node's IPv6 pod CIDR, from `spec.podCIDRs` (dual-stack clusters).
pub fn pod_cidr6(node: &Node) -> Option<Ipv6Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidr
        .iter()
        .chain(spec.pod_cidrs.iter().flatten())
        .find_map(|c| c.parse::<Ipv6Net>().ok())
        .map(|n| n.trunc())
}

pub fn pod_cidr(node: &Node) -> Option<Ipv4Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidr
        .iter()
        .chain(spec.pod_cidrs.iter().flatten())
        .find_map(|c| c.parse::<Ipv4Net>().ok())
        .map(|n| n.trunc())
}

/// Another node's lease from its annotations, as Flannel reads them; `None`
/// for nodes that run no Flannel (yet), with the reason.
pub fn node_lease(node: &Node) -> std::result::Result<Lease, String> {
    let name = node.metadata.name.as_deref().unwrap_or("?");
    let ann = annotations(node);
    let get = |k: &str| {
        ann.get(k)
            .ok_or_else(|| format!("node {name} has no {k} annotation"))
    };
    // IPv6: the address (overwritten as the IPv4 one is) and the VXLAN
    // data of `flannel-v6.<VNI>`, when the node has them.
    let public_ipv6 = match ann
        .get(PUBLIC_IPV6_OVERWRITE)
        .filter(|v| !v.is_empty())
        .or_else(|| ann.get(PUBLIC_IPV6))
    {
        None => None,
        Some(text) => Some(
            text.parse()
                .map_err(|_| format!("node {name}: public IPv6 {text:?} is not IPv6"))?,
        ),
    };
    let backend_v6_data = match ann.get(BACKEND_V6_DATA) {
        None => serde_json::Value::Null,
        Some(text) => serde_json::from_str(text)
            .map_err(|e| format!("node {name}: {BACKEND_V6_DATA} is not JSON: {e}"))?,
    };
    let ipv6_subnet = pod_cidr6(node);
    // The IPv4 side: the IPv4 podCIDR and the public IP. A node of an
    // IPv6-only cluster has neither (Flannel writes no `public-ip` for
    // VXLAN there): its lease carries Flannel's empty IPv4 subnet.
    let ip_overwrite = ann.get(PUBLIC_IP_OVERWRITE).filter(|v| !v.is_empty());
    let v6_only = ipv6_subnet.is_some()
        && public_ipv6.is_some()
        && (pod_cidr(node).is_none() || ip_overwrite.or(ann.get(PUBLIC_IP)).is_none());
    let (subnet, public_ip) = if v6_only {
        (Ipv4Net::default(), Ipv4Addr::UNSPECIFIED)
    } else {
        let subnet = pod_cidr(node).ok_or_else(|| format!("node {name} has no IPv4 podCIDR"))?;
        let ip_text = match ip_overwrite {
            Some(v) => v,
            None => get(PUBLIC_IP)?,
        };
        let ip: Ipv4Addr = ip_text
            .parse()
            .map_err(|_| format!("node {name}: public IP {ip_text:?} is not IPv4"))?;
        (subnet, ip)
    };
    let backend_data: serde_json::Value = match ann.get(BACKEND_DATA) {
        None if v6_only => serde_json::Value::Null,
        _ => serde_json::from_str(get(BACKEND_DATA)?)
            .map_err(|e| format!("node {name}: {BACKEND_DATA} is not JSON: {e}"))?,
    };
    let attrs = LeaseAttrs {
        public_ip,
        public_ipv6,
        backend_type: get(BACKEND_TYPE)?.clone(),
        backend_data,
        backend_v6_data,
    };
    // A VXLAN lease must carry usable data; a host-gw one carries none
    // (Flannel writes "null").
    match attrs.backend_type.as_str() {
        "vxlan" if v6_only => drop(
            attrs
                .vxlan_v6_data()
                .map_err(|e| format!("node {name}: {e}"))?,
        ),
        "vxlan" => drop(
            attrs
                .vxlan_data()
                .map_err(|e| format!("node {name}: {e}"))?,
        ),
        "host-gw" => {}
        other => {
            return Err(format!(
                "node {name}: backend type {other:?} is not vxlan or host-gw"
            ))
        }
    }
    Ok(Lease {
        subnet,
        ipv6_subnet,
        attrs,
        expiration: None,
    })
}

impl KubeStore {
    pub async fn connect(opts: &KubeOptions) -> Result<Self> {
        if opts.node_name.is_empty() {
            return Err(SubnetError::Config(
                "the kube subnet manager needs this node's name: set --node-name or NODE_NAME"
                    .into(),
            ));
        }
        let config = match (&opts.api_url, &opts.kubeconfig) {
            (_, Some(path)) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| err(&format!("reading {}", path.display()), e))?;
                let mut c = Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| err("loading the kubeconfig", e))?;
                if let Some(url) = &opts.api_url {
                    c.cluster_url = url.parse().map_err(|e| err("--kube-api-url", e))?;
                }
                c
            }
            (Some(url), None) => Config::new(url.parse().map_err(|e| err("--kube-api-url", e))?),
            (None, None) => Config::infer()
                .await
                .map_err(|e| err("finding the API server", e))?,
        };
        let client = Client::try_from(config).map_err(|e| err("building the client", e))?;
        Ok(KubeStore {
            nodes: Api::all(client),
            node_name: opts.node_name.clone(),
        })
    }

    async fn node(&self) -> Result<Node> {
        self.nodes
            .get(&self.node_name)
            .await
            .map_err(|e| err(&format!("reading node {}", self.node_name), e))
    }

    /// The `node-public-ip` annotation of this node, if set: Flannel uses it
    /// as the public IP when none is given on the command line.
    pub async fn node_public_ip(&self) -> Result<Option<Ipv4Addr>> {
        let node = self.node().await?;
        match annotations(&node).get(NODE_PUBLIC_IP) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                SubnetError::Config(format!(
                    "node {}: {NODE_PUBLIC_IP} {v:?} is not IPv4",
                    self.node_name
                ))
            }),
        }
    }

    pub async fn acquire(&self, cfg: &NetConfig, attrs: &LeaseAttrs) -> Result<Lease> {
        let node = self.node().await?;
        // An IPv6-only cluster's lease has Flannel's empty IPv4 subnet.
        let subnet = match pod_cidr(&node) {
            _ if !cfg.enable_ipv4 => Ipv4Net::default(),
            Some(subnet) => subnet,
            None => {
                return Err(SubnetError::Config(format!(
                    "node {} has no spec.podCIDR yet: kube-controller-manager assigns it with --allocate-node-cidrs and --cluster-cidr={}",
                    self.node_name, cfg.network
                )))
            }
        };
        if cfg.enable_ipv4 && !cfg.network.contains(&subnet) {
            return Err(SubnetError::Config(format!(
                "node {}'s podCIDR {subnet} is outside Network {}: make --cluster-cidr and net-conf.json agree",
                self.node_name, cfg.network
            )));
        }
        let ipv6_subnet = if cfg.enable_ipv6 {
            let net6 = cfg.ipv6_network.unwrap_or_default();
            let v6 = pod_cidr6(&node).ok_or_else(|| {
                SubnetError::Config(format!(
                    "node {} has no IPv6 podCIDR: with EnableIPv6, kube-controller-manager must assign both families (--cluster-cidr={},{net6})",
                    self.node_name, cfg.network
                ))
            })?;
            if !net6.contains(&v6) {
                return Err(SubnetError::Config(format!(
                    "node {}'s IPv6 podCIDR {v6} is outside IPv6Network {net6}: make --cluster-cidr and net-conf.json agree",
                    self.node_name
                )));
            }
            Some(v6)
        } else {
            None
        };
        let mut attrs = attrs.clone();
        let ann = annotations(&node);
        if let Some(ip) = ann
            .get(PUBLIC_IP_OVERWRITE)
            .and_then(|v| v.parse().ok())
            .filter(|_| cfg.enable_ipv4)
        {
            attrs.public_ip = ip;
        }
        if let Some(ip) = ann.get(PUBLIC_IPV6_OVERWRITE).and_then(|v| v.parse().ok()) {
            attrs.public_ipv6 = Some(ip);
        }
        self.write_annotations(&node, &attrs).await?;
        Ok(Lease {
            subnet,
            ipv6_subnet,
            attrs,
            expiration: None,
        })
    }

    async fn write_annotations(&self, node: &Node, attrs: &LeaseAttrs) -> Result<()> {
        let mut want = vec![
            (BACKEND_TYPE, attrs.backend_type.clone()),
            (SUBNET_MANAGER, "true".to_string()),
        ];
        // As Flannel: a VXLAN node of an IPv6-only cluster (no IPv4
        // BackendData) writes neither the IPv4 data nor the public IP.
        if attrs.backend_type != "vxlan" || !attrs.backend_data.is_null() {
            want.push((BACKEND_DATA, attrs.backend_data.to_string()));
            want.push((PUBLIC_IP, attrs.public_ip.to_string()));
        }
        // Flannel writes the IPv6 pair only when the node has IPv6.
        if let Some(ip) = attrs.public_ipv6 {
            want.push((BACKEND_V6_DATA, attrs.backend_v6_data.to_string()));
            want.push((PUBLIC_IPV6, ip.to_string()));
        }
        let have = annotations(node);
        if want.iter().all(|(k, v)| have.get(*k) == Some(v)) {
            return Ok(());
        }
        let ann: serde_json::Map<String, serde_json::Value> = want
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        let patch = serde_json::json!({"metadata": {"annotations": ann}});
        self.patch_status(patch, "annotating the node").await
    }

    /// A strategic merge patch of this node's status subresource, the way
    /// Flannel writes both its annotations and its condition.
    async fn patch_status(&self, patch: serde_json::Value, what: &str) -> Result<()> {
        self.nodes
            .patch_status(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await
            .map_err(|e| err(&format!("{what} {}", self.node_name), e))?;
        Ok(())
    }

    /// Nodes carry no TTL; renewal puts back annotations someone removed.
    pub async fn renew(&self, lease: &Lease) -> Result<Lease> {
        let node = self.node().await?;
        self.write_annotations(&node, &lease.attrs).await?;
        Ok(lease.clone())
    }

    /// Condition `NetworkUnavailable=False`, reason `FlannelIsUp`.
    pub async fn mark_network_available(&self) -> Result<()> {
        let now = rfc3339_now();
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        self.patch_status(patch, "setting NetworkUnavailable=False on")
            .await
    }

    pub async fn watch(&self, tx: &LeaseTx) -> Result<()> {
        let mut stream = watcher(self.nodes.clone(), watcher::Config::default()).boxed();
        let mut nodes: BTreeMap<String, Lease> = BTreeMap::new();
        let mut init: Option<BTreeMap<String, Lease>> = None;
        let lease = |n: &Node| match node_lease(n) {
            Ok(l) => Some(l),
            Err(why) => {
                tracing::debug!(%why, "node carries no usable lease");
                None
            }
        };
        let publish_nodes = |nodes: &BTreeMap<String, Lease>| {
            publish(tx, nodes.values().map(|l| (l.id(), l.clone())).collect());
        };
        while let Some(ev) = stream.next().await {
            match ev.map_err(|e| err("watching nodes", e))? {
                watcher::Event::Init => init = Some(BTreeMap::new()),
                watcher::Event::InitApply(n) => {
                    if let (Some(buf), Some(l)) = (init.as_mut(), lease(&n)) {
                        buf.insert(n.metadata.name.clone().unwrap_or_default(), l);
                    }
                }
                watcher::Event::InitDone => {
                    nodes = init.take().unwrap_or_default();
                    publish_nodes(&nodes);
                }
                watcher::Event::Apply(n) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    match lease(&n) {
                        Some(l) => nodes.insert(name, l),
                        None => nodes.remove(&name),
                    };
                    publish_nodes(&nodes);
                }
                watcher::Event::Delete(n) => {
                    nodes.remove(n.metadata.name.as_deref().unwrap_or_default());
                    publish_nodes(&nodes);
                }
            }
        }
        Err(err("watching nodes", "the watch stream ended"))
    }
}

/// RFC 3339 UTC time in whole seconds, as the API server writes times.
fn rfc3339_now() -> String {
    use k8s_openapi::jiff::{Timestamp, Unit};
    let now = Timestamp::now();
    now.round(Unit::Second).unwrap_or(now).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn annotations_become_leases_as_flannel_reads_them() {
        let good = serde_json::json!({
            "metadata": {"name": "n2", "annotations": {
                BACKEND_DATA: "{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:02\"}",
                BACKEND_TYPE: "vxlan",
                SUBNET_MANAGER: "true",
                PUBLIC_IP: "172.30.0.2",
            }},
            "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24", "fd00::/64"]},
        });
        let l = node_lease(&node(good.clone())).unwrap();
        assert_eq!(l.subnet, "10.244.2.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(l.attrs.public_ip, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(l.attrs.vxlan_data().unwrap().vni, 1);
        // Dual-stack: the IPv6 podCIDR, and the IPv6 annotations when there.
        assert_eq!(l.ipv6_subnet, Some("fd00::/64".parse().unwrap()));
        assert_eq!(l.attrs.public_ipv6, None);
        let mut v6 = good.clone();
        v6["metadata"]["annotations"][PUBLIC_IPV6] = "fd00:30::2".into();
        v6["metadata"]["annotations"][BACKEND_V6_DATA] =
            "{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:06:02\"}".into();
        let l6 = node_lease(&node(v6.clone())).unwrap();
        assert_eq!(l6.attrs.public_ipv6, Some("fd00:30::2".parse().unwrap()));
        assert_eq!(l6.attrs.backend_v6_data["VtepMAC"], "0e:00:00:00:06:02");
        v6["metadata"]["annotations"][PUBLIC_IPV6_OVERWRITE] = "fd00:30::99".into();
        assert_eq!(
            node_lease(&node(v6.clone())).unwrap().attrs.public_ipv6,
            Some("fd00:30::99".parse().unwrap())
        );
        v6["metadata"]["annotations"][PUBLIC_IPV6_OVERWRITE] = "10.0.0.1".into();
        assert!(node_lease(&node(v6)).unwrap_err().contains("is not IPv6"));

        let mut over = good.clone();
        over["metadata"]["annotations"][PUBLIC_IP_OVERWRITE] = "192.0.2.9".into();
        assert_eq!(
            node_lease(&node(over)).unwrap().attrs.public_ip,
            Ipv4Addr::new(192, 0, 2, 9)
        );

        let mut only_list = good.clone();
        only_list["spec"] = serde_json::json!({"podCIDRs": ["fd00::/64", "10.244.9.0/24"]});
        assert_eq!(
            node_lease(&node(only_list)).unwrap().subnet.to_string(),
            "10.244.9.0/24"
        );

        // Flannel's host-gw node: no backend data ("null").
        let mut hostgw = good.clone();
        hostgw["metadata"]["annotations"][BACKEND_TYPE] = "host-gw".into();
        hostgw["metadata"]["annotations"][BACKEND_DATA] = "null".into();
        let l = node_lease(&node(hostgw)).unwrap();
        assert_eq!(l.attrs, LeaseAttrs::host_gw(Ipv4Addr::new(172, 30, 0, 2)));

        let cases: [(&str, serde_json::Value, &str); 6] = [
            ("spec", serde_json::json!({}), "no IPv4 podCIDR"),
            (
                "metadata",
                serde_json::json!({"name": "n2"}),
                "has no flannel.alpha.coreos.com/public-ip",
            ),
            ("public", serde_json::json!("not-an-ip"), "is not IPv4"),
            ("data", serde_json::json!("{bad"), "is not JSON"),
            (
                "type",
                serde_json::json!("wireguard"),
                "not vxlan or host-gw",
            ),
            ("type", serde_json::json!("vxlan"), "is not unicast"),
        ];
        for (what, value, want) in cases {
            let mut n = good.clone();
            match what {
                "spec" => n["spec"] = value,
                "metadata" => n["metadata"] = value,
                "public" => n["metadata"]["annotations"][PUBLIC_IP] = value,
                "data" => n["metadata"]["annotations"][BACKEND_DATA] = value,
                _ if value == "vxlan" => {
                    n["metadata"]["annotations"][BACKEND_DATA] =
                        "{\"VNI\":1,\"VtepMAC\":\"ff:ff:ff:ff:ff:ff\"}".into()
                }
                _ => n["metadata"]["annotations"][BACKEND_TYPE] = value,
            }
            let e = node_lease(&node(n)).unwrap_err();
            assert!(e.contains(want), "{what}: {e}");
        }
    }

    /// A node of an IPv6-only cluster, as Flannel annotates it: the IPv6
    /// pair only (no `public-ip`, no `backend-data` with VXLAN).
    #[test]
    fn ipv6_only_nodes_become_leases_without_an_ipv4_side() {
        let v6only = serde_json::json!({
            "metadata": {"name": "n3", "annotations": {
                BACKEND_TYPE: "vxlan",
                SUBNET_MANAGER: "true",
                PUBLIC_IPV6: "fd00:30::3",
                BACKEND_V6_DATA: "{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:06:03\"}",
            }},
            "spec": {"podCIDR": "fd00:10:244:3::/64", "podCIDRs": ["fd00:10:244:3::/64"]},
        });
        let l = node_lease(&node(v6only.clone())).unwrap();
        assert!(!l.has_ipv4(), "{l:?}");
        assert_eq!(l.subnet, Ipv4Net::default());
        assert_eq!(l.attrs.public_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(l.ipv6_subnet, Some("fd00:10:244:3::/64".parse().unwrap()));
        assert_eq!(
            l.id(),
            ipnet::IpNet::V6("fd00:10:244:3::/64".parse().unwrap())
        );
        assert_eq!(
            l.public_addr(),
            "fd00:30::3".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(l.key(), "0.0.0.0-0&fd00:10:244:3::-64");
        // Its VXLAN data is the IPv6 one, and must be usable.
        let mut bad = v6only.clone();
        bad["metadata"]["annotations"][BACKEND_V6_DATA] =
            "{\"VNI\":1,\"VtepMAC\":\"ff:ff:ff:ff:ff:ff\"}".into();
        assert!(node_lease(&node(bad)).unwrap_err().contains("not unicast"));
        // A dual-stack podCIDR list without the IPv4 annotations is read
        // the same way (an IPv6-only cluster on dual-stack nodes).
        let mut both = v6only.clone();
        both["spec"]["podCIDRs"] = serde_json::json!(["10.244.3.0/24", "fd00:10:244:3::/64"]);
        assert!(!node_lease(&node(both)).unwrap().has_ipv4());
        // Without the IPv6 pair it is neither: the IPv4 reason is given.
        let mut none = v6only;
        none["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(PUBLIC_IPV6);
        assert!(node_lease(&node(none))
            .unwrap_err()
            .contains("no IPv4 podCIDR"));
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }
}

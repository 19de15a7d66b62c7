//! The node agent: start-up, the event loop and shutdown ([`run`]), the
//! uplink choice ([`uplink`]), the lease store's tasks ([`store`]) and the
//! pod registry ([`pods`]). It drives the rooms below it (the reconciler,
//! the data path, the servers); none of them imports it.

pub mod pods;
mod run;
pub mod store;
pub mod uplink;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use run::run;

/// Where the agent looks and writes by default: the DaemonSet mounts
/// these, and its test checks that it does.
pub mod defaults {
    pub const NET_CONFIG: &str = "/etc/kube-flannel/net-conf.json";
    pub const RUN_DIR: &str = "/run/flannel";
    pub const SOCKET: &str = "/run/flannel/agent.sock";
    pub const SUBNET_FILE: &str = crate::cni::conf::DEFAULT_SUBNET_FILE;
    pub const BPF_DIR: &str = "/sys/fs/bpf/flannel";
    pub const CNI_DATA_DIR: &str = crate::cni::conf::DEFAULT_DATA_DIR;
    pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
    pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
    pub const CNI_CONF_NAME: &str = "10-flannel.conflist";
}

use crate::{
    datapath::{DatapathMode, XdpMode},
    subnet::LeaseTiming,
};

#[derive(Clone, Debug)]
pub struct Options {
    pub net_config_path: PathBuf,
    /// `--iface`: interface names or addresses, first match wins.
    pub iface: Vec<String>,
    /// `--iface-regex`: matched against interface names and addresses.
    pub iface_regex: Vec<String>,
    pub public_ip: Option<std::net::Ipv4Addr>,
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    pub subnet_file: PathBuf,
    pub store: store::StoreOptions,
    pub timing: LeaseTiming,
    pub ip_masq: bool,
    pub healthz: Option<SocketAddr>,
    pub datapath: DatapathMode,
    pub xdp_mode: XdpMode,
    /// `--vxlan-source-check`.
    pub vxlan_source_check: crate::datapath::VxlanSourceCheck,
    /// `--netfilter-compat`.
    pub netfilter_compat: crate::netfilter::Compat,
    pub bpf_dir: PathBuf,
    pub run_dir: PathBuf,
    pub bridge: String,
    pub resync: Duration,
    /// The CNI plugin's records, read to register pods it wired while the
    /// agent was away.
    pub cni_data_dir: PathBuf,
    /// Install the plugin and conflist once the node is ready.
    pub install_cni: Option<crate::cni::install::InstallSpec>,
    /// Who besides root may call the API socket (`--api-socket-group`).
    pub api_group: Option<u32>,
}

impl Options {
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    fn endpoints_file(&self) -> PathBuf {
        self.run_dir.join("endpoints.json")
    }
}

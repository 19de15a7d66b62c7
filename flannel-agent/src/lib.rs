//! flannel-agent: the node agent of flannel-ebpf.
//!
//! * [`agent`]: the daemon (data path selection, reconcile loop, local API).
//! * [`ebpf`]: loading, pinning and feeding the eBPF programs.
//! * [`netlink`]: Flannel's kernel objects (`cni0`, `flannel.<VNI>`, routes).
//! * [`config`]: net-conf.json; [`subnet`]: leases and their stores;
//!   [`control`]: the agent's store tasks (watch, renew).
//! * [`masq`]: the ip-masq rules (nftables over netlink).
//! * [`api`]: the local API; [`mac`]: MAC addresses.
//! * [`cni`]: the `flannel` CNI plugin.
pub mod agent;
pub mod api;
pub mod cni;
pub mod config;
pub mod control;
pub mod ebpf;
pub mod mac;
pub mod masq;
pub mod netlink;
pub mod subnet;

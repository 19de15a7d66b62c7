//! flannel-agent: the node agent of flannel-ebpf.
//!
//! * [`agent`]: the daemon (data path selection, reconcile loop, local API).
//! * [`ebpf`]: loading, pinning and feeding the eBPF programs.
//! * [`netlink`]: Flannel's kernel objects (`cni0`, `flannel.<VNI>`, routes).
//! * [`lease`]: the lease file; [`api`]: the local API; [`mac`]: MAC addresses.
pub mod agent;
pub mod api;
pub mod config;
pub mod ebpf;
pub mod lease;
pub mod mac;
pub mod netlink;
pub mod subnet;

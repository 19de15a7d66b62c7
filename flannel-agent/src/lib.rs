//! flannel-agent: the node agent of flannel-ebpf, and the `flannel` CNI
//! plugin. Data flows one way: leases ([`subnet`]) → desired state → diff
//! → appliers → observed state ([`reconcile`]), driven by the [`agent`],
//! with the pod registry and the [`server`]s beside it.
//!
//! * [`agent`]: start-up, the event loop, the uplink, the store's tasks,
//!   the pod registry.
//! * [`reconcile`]: observe, desired state, diff, apply.
//! * [`datapath`]: the eBPF programs and maps, or the kernel-only path.
//! * [`server`]: the local API socket and the HTTP port.
//! * [`netlink`]: Flannel's kernel objects (`cni0`, `flannel.<VNI>`,
//!   routes, neighbours, FDB) over rtnetlink; [`masq`]: the ip-masq rules
//!   (nftables over netlink).
//! * [`config`]: net-conf.json; [`subnet`]: leases, their stores and
//!   subnet.env.
//! * [`caps`]: the Linux capabilities a run needs, checked at start.
//! * [`api`]: the local API's wire format and client; [`mac`]: MAC
//!   addresses; [`fsutil`]: atomic file writes.
//! * [`cni`]: the `flannel` CNI plugin.
pub mod agent;
pub mod api;
pub mod caps;
pub mod cni;
pub mod config;
pub mod datapath;
pub mod fsutil;
pub mod guard;
pub mod mac;
pub mod masq;
pub mod metrics;
pub mod netfilter;
pub mod netlink;
pub mod nft;
pub mod reconcile;
pub mod render;
pub mod server;
pub mod subnet;

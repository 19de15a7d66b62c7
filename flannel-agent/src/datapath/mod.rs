//! The data path: the eBPF programs and their maps ([`ebpf`]), or, when
//! they are not wanted or cannot load, the kernel's own path (Flannel's
//! `cni0`, `flannel.<VNI>` and routes, which the reconciler programs in
//! both modes). [`select`] decides which one runs on this node and says
//! why.

pub mod ebpf;
pub mod monitor;
pub mod probe;

use std::path::{Path, PathBuf};

use crate::netlink::Link;

/// Which data path the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathMode {
    /// eBPF when it loads, the kernel path otherwise.
    Auto,
    /// eBPF or fail.
    Ebpf,
    /// Pure Flannel behaviour: bridge, flannel.<VNI>, routes; no eBPF.
    Kernel,
}

/// What VXLAN's outer source must show before it is decapsulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum VxlanSourceCheck {
    /// The outer source IP holds a lease (is a cluster node).
    #[default]
    Lease,
    /// And the outer source MAC is that IP's neighbour entry on the uplink
    /// (its MAC, or the router's when the node is behind one): a host on
    /// the node network that spoofs a node's IP but not its MAC is dropped.
    Strict,
}

/// How XDP is attached to the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Native XDP, except on a veth uplink (`off` there): native XDP on a
    /// veth makes the kernel turn off segmentation offload on its peer
    /// (every TCP super-packet toward the node is then cut to MTU size),
    /// and generic XDP copies each GSO packet before it runs.
    Auto,
    /// In the driver (falls back to generic when the driver lacks it).
    Native,
    /// In the stack (`XDP_FLAGS_SKB_MODE`); sees GSO packets whole but
    /// copies non-linear ones first.
    Generic,
    /// No XDP: the uplink's TC program decapsulates, on whole GSO packets
    /// without a copy.
    Off,
}

impl XdpMode {
    /// What [`ebpf::Datapath::attach_uplink`] takes: `Some(generic)` to
    /// attach XDP, `None` for TC decapsulation.
    fn attach(self, uplink: &Link) -> Option<bool> {
        let veth = uplink.kind == Some(netlink_packet_route::link::InfoKind::Veth);
        match self {
            XdpMode::Generic => Some(true),
            XdpMode::Native => Some(false),
            XdpMode::Auto => (!veth).then_some(false),
            XdpMode::Off => None,
        }
    }
}

/// The data path in use on this node.
pub enum Active {
    /// eBPF programs on the uplink and the pod veths, fed from maps.
    Ebpf {
        dp: ebpf::Datapath,
        /// No XDP on the uplink: its TC program decapsulates.
        tc_decap: bool,
    },
    /// No eBPF: the kernel forwards through Flannel's devices.
    Kernel,
}

impl Active {
    /// `ebpf` or `kernel`, as `status` and the logs name it.
    pub fn name(&self) -> &'static str {
        match self {
            Active::Ebpf { .. } => "ebpf",
            Active::Kernel => "kernel",
        }
    }

    pub fn ebpf(&mut self) -> Option<&mut ebpf::Datapath> {
        match self {
            Active::Ebpf { dp, .. } => Some(dp),
            Active::Kernel => None,
        }
    }

    pub fn tc_decap(&self) -> bool {
        matches!(self, Active::Ebpf { tc_decap: true, .. })
    }
}

/// The chosen data path and why it is the one.
pub struct Selected {
    pub active: Active,
    pub reason: String,
    /// Where VXLAN is decapsulated: `native`, `generic` or `adopted` XDP,
    /// `off` (TC), `none` (the kernel's `flannel.<VNI>`).
    pub xdp_mode: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("starting the eBPF data path (--datapath ebpf): {0}")]
    Ebpf(#[source] ebpf::EbpfError),
    #[error("removing the eBPF state pinned under {path}: {source}")]
    RemovePins {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Starts the data path `mode` asks for on `uplink`, with maps and links
/// pinned under `bpf_dir` (`lease_slots` sizes the lease slots: see
/// `NetConfig::lease_slots`). In `auto`, an eBPF data path that cannot load
/// leaves the kernel path in charge, and the reason says why.
pub fn select(
    mode: DatapathMode,
    xdp: XdpMode,
    bpf_dir: &Path,
    uplink: &Link,
    lease_slots: u32,
) -> Result<Selected, SelectError> {
    let remove_pins = || {
        ebpf::remove_pins(bpf_dir).map_err(|source| SelectError::RemovePins {
            path: bpf_dir.to_path_buf(),
            source,
        })
    };
    let start = || -> Result<(ebpf::Datapath, &'static str, bool), ebpf::EbpfError> {
        let mut dp = ebpf::Datapath::load(bpf_dir, lease_slots)?;
        let attach = xdp.attach(uplink);
        let mode = dp.attach_uplink(&uplink.name, uplink.index, attach)?;
        Ok((dp, mode, attach.is_none()))
    };
    let selected = match mode {
        DatapathMode::Kernel => {
            // Coming from an eBPF run: take its programs off the interfaces.
            remove_pins()?;
            Selected {
                active: Active::Kernel,
                reason: "requested with --datapath kernel".into(),
                xdp_mode: "none",
            }
        }
        DatapathMode::Auto | DatapathMode::Ebpf => match start() {
            Ok((dp, xdp_mode, tc_decap)) => Selected {
                active: Active::Ebpf { dp, tc_decap },
                xdp_mode,
                reason: if tc_decap {
                    format!("TC decap on {} (no XDP), TC on pod veths", uplink.name)
                } else {
                    format!("XDP ({xdp_mode}) on {}, TC on pod veths", uplink.name)
                },
            },
            Err(err) if mode == DatapathMode::Auto => {
                remove_pins()?;
                Selected {
                    active: Active::Kernel,
                    reason: format!("eBPF unavailable: {err}"),
                    xdp_mode: "none",
                }
            }
            Err(err) => return Err(SelectError::Ebpf(err)),
        },
    };
    tracing::info!(datapath = selected.active.name(), reason = %selected.reason, "data path selected");
    Ok(selected)
}

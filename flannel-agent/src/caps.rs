//! The Linux capabilities the agent needs, checked once at start so that a
//! container started without one fails with its name and what it is for,
//! instead of an `EPERM` from whichever syscall happens to need it first.
//!
//! The DaemonSet (`deploy/kube-flannel-ebpf.yml`) drops every capability
//! and adds back exactly [`DAEMONSET`]; its test checks the two agree, and
//! the lab runs the agent in a container with each one removed in turn.

use crate::datapath::DatapathMode;

/// One capability: its number, its name as `securityContext` spells it,
/// and why the agent needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub bit: u32,
    pub name: &'static str,
    pub why: &'static str,
}

pub const NET_ADMIN: Cap = Cap {
    bit: 12,
    name: "NET_ADMIN",
    why: "create cni0 and flannel.<VNI>, program routes, neighbours, FDB entries and the \
          nftables masquerade table, attach TC and XDP programs",
};
pub const BPF: Cap = Cap {
    bit: 39,
    name: "BPF",
    why: "load the eBPF programs and create, pin and update their maps",
};
pub const PERFMON: Cap = Cap {
    bit: 38,
    name: "PERFMON",
    why: "let the verifier accept the programs' map-value pointer arithmetic (without it \
          the kernel applies its Spectre rules for unprivileged programs and refuses them)",
};
pub const CHOWN: Cap = Cap {
    bit: 0,
    name: "CHOWN",
    why: "give the API socket to --api-socket-group",
};
/// Holds every right of [`BPF`] and [`PERFMON`] (kernels before 5.8 know
/// only this one).
const SYS_ADMIN: u32 = 21;

/// What the DaemonSet adds after dropping ALL: the needs of the eBPF data
/// path with the default flags.
pub const DAEMONSET: [Cap; 3] = [NET_ADMIN, BPF, PERFMON];

/// The capabilities a run with these settings needs.
pub fn required(datapath: DatapathMode, api_group: bool) -> Vec<Cap> {
    let mut caps = vec![NET_ADMIN];
    if datapath != DatapathMode::Kernel {
        caps.extend([BPF, PERFMON]);
    }
    if api_group {
        caps.push(CHOWN);
    }
    caps
}

/// Those of `wanted` missing from the effective set `eff` (a bit mask,
/// as `/proc/self/status` shows it). `CAP_SYS_ADMIN` stands in for
/// `CAP_BPF` and `CAP_PERFMON`, as it does in the kernel.
pub fn missing(wanted: &[Cap], eff: u64) -> Vec<Cap> {
    let has = |bit: u32| eff & (1 << bit) != 0;
    let covered_by_sys_admin = |c: &Cap| c.bit == BPF.bit || c.bit == PERFMON.bit;
    let held = |c: &Cap| has(c.bit) || (covered_by_sys_admin(c) && has(SYS_ADMIN));
    wanted.iter().filter(|c| !held(c)).copied().collect()
}

/// This process's effective capability set.
pub fn effective() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_cap_eff(&status).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "/proc/self/status has no readable CapEff line",
        )
    })
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum CapError {
    #[error("reading this process's capabilities: {0}")]
    Read(#[source] std::io::Error),
    #[error(
        "missing capabilit{}: {}; add {} to the container's securityContext.capabilities.add{}",
        if .missing.len() == 1 { "y" } else { "ies" },
        .missing.iter().map(|c| format!("CAP_{} (to {})", c.name, c.why)).collect::<Vec<_>>().join("; "),
        .missing.iter().map(|c| c.name).collect::<Vec<_>>().join(", "),
        if .missing.iter().any(|c| c.bit == BPF.bit || c.bit == PERFMON.bit) {
            ", or run with --datapath kernel (no eBPF)"
        } else { "" }
    )]
    Missing { missing: Vec<Cap> },
}

/// Fails, naming each missing capability and its use, unless this process
/// holds all that a run with these settings needs.
pub fn check(datapath: DatapathMode, api_group: bool) -> Result<(), CapError> {
    let eff = effective().map_err(CapError::Read)?;
    let missing = missing(&required(datapath, api_group), eff);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CapError::Missing { missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(caps: &[u32]) -> u64 {
        caps.iter().fold(0, |m, b| m | 1 << b)
    }

    #[test]
    fn required_follows_the_settings() {
        let names = |v: Vec<Cap>| v.iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(
            names(required(DatapathMode::Auto, false)),
            ["NET_ADMIN", "BPF", "PERFMON"]
        );
        assert_eq!(names(required(DatapathMode::Kernel, false)), ["NET_ADMIN"]);
        assert_eq!(
            names(required(DatapathMode::Kernel, true)),
            ["NET_ADMIN", "CHOWN"]
        );
        assert_eq!(required(DatapathMode::Ebpf, false), DAEMONSET);
    }

    #[test]
    fn missing_names_each_absent_capability() {
        let all = required(DatapathMode::Ebpf, true);
        assert!(missing(&all, mask(&[0, 12, 38, 39])).is_empty());
        assert_eq!(missing(&all, mask(&[0, 12, 38])), [BPF]);
        assert_eq!(missing(&all, mask(&[12, 39])), [PERFMON, CHOWN]);
        assert_eq!(missing(&all, 0).len(), 4);
        // CAP_SYS_ADMIN covers BPF and PERFMON, not NET_ADMIN.
        assert_eq!(missing(&all, mask(&[0, 21])), [NET_ADMIN]);
        // A full root set (what a privileged container has).
        assert!(missing(&all, 0x1ff_ffff_ffff).is_empty());
    }

    #[test]
    fn the_error_names_the_capability_and_the_fix() {
        let msg = CapError::Missing {
            missing: vec![PERFMON],
        }
        .to_string();
        assert!(
            msg.starts_with("missing capability: CAP_PERFMON (to "),
            "{msg}"
        );
        assert!(msg.contains("capabilities.add"), "{msg}");
        assert!(msg.contains("--datapath kernel"), "{msg}");
        let msg = CapError::Missing {
            missing: vec![NET_ADMIN, CHOWN],
        }
        .to_string();
        assert!(
            msg.starts_with("missing capabilities: CAP_NET_ADMIN"),
            "{msg}"
        );
        assert!(!msg.contains("--datapath kernel"), "{msg}");
    }

    #[test]
    fn cap_eff_is_read_from_proc_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\n";
        assert_eq!(parse_cap_eff(status), Some(mask(&[12, 38, 39])));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
        // This process's own set parses (whatever it holds).
        assert!(effective().is_ok());
    }
}

//! Whether the node filters forwarded traffic: nftables base chains on
//! the forward hook (families `ip`, `inet`, `bridge`; iptables-nft's
//! `FORWARD` chains are such chains) and legacy iptables `FORWARD` chains
//! (any table) that hold a rule or drop by policy. Where they exist, the
//! eBPF data path must let pod traffic cross the kernel's forward hook
//! (`--netfilter-compat auto`), or host firewalls and netfilter-based
//! network policy would silently be skipped.

use std::{fmt, io};

use crate::nft::{self, NftError};

const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_BRIDGE: u8 = 7;
/// `NF_INET_FORWARD` and `NF_BR_FORWARD` alike.
const HOOK_FORWARD: u32 = 2;
const NF_DROP: u32 = 0;

/// `--netfilter-compat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Compat {
    /// On where the node has forward-path rules, off where it has none;
    /// looked at again on every reconcile pass.
    #[default]
    Auto,
    /// Pod traffic always crosses the kernel's forward hook.
    On,
    /// The full fast path, whatever the node's firewall says.
    Off,
}

/// One chain that filters forwarded packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardChain {
    /// `nftables ip`, `nftables inet`, `nftables bridge`, `iptables-legacy`.
    pub source: &'static str,
    pub table: String,
    pub chain: String,
    pub rules: usize,
    pub policy_drop: bool,
}

impl fmt::Display for ForwardChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} table {} chain {} ({} rules{})",
            self.source,
            self.table,
            self.chain,
            self.rules,
            if self.policy_drop {
                ", policy drop"
            } else {
                ""
            }
        )
    }
}

/// The chains on the node's forward path that hold rules or drop by
/// policy. Tables of this project's own (`flannel-*`) have none there.
pub fn forward_chains() -> Result<Vec<ForwardChain>, NftError> {
    let mut found = nft_forward_chains()?;
    found.extend(legacy_forward_chains().map_err(NftError::Socket)?);
    Ok(found)
}

/// A netlink attribute list: (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

fn attr_str(a: &[(u16, &[u8])], kind: u16) -> String {
    a.iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(&[])).into())
        .unwrap_or_default()
}

fn attr_be32(a: &[(u16, &[u8])], kind: u16) -> Option<u32> {
    a.iter()
        .find(|(k, _)| *k == kind)
        .and_then(|(_, v)| v.get(..4))
        .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

fn nft_forward_chains() -> Result<Vec<ForwardChain>, NftError> {
    let mut s = nft::Socket::open()?;
    let mut chains = Vec::new();
    for (family, payload) in s.dump(NFT_MSG_GETCHAIN, NFPROTO_UNSPEC, &nft::Attrs::default())? {
        let source = match family {
            NFPROTO_IPV4 => "nftables ip",
            NFPROTO_INET => "nftables inet",
            NFPROTO_BRIDGE => "nftables bridge",
            _ => continue,
        };
        let a = attrs(&payload);
        // NFTA_CHAIN_HOOK { NFTA_HOOK_HOOKNUM }: base chains only.
        let Some((_, hook)) = a.iter().find(|(k, _)| *k == 4) else {
            continue;
        };
        if attr_be32(&attrs(hook), 1) != Some(HOOK_FORWARD) {
            continue;
        }
        chains.push((
            family,
            ForwardChain {
                source,
                table: attr_str(&a, 1),
                chain: attr_str(&a, 3),
                rules: 0,
                policy_drop: attr_be32(&a, 5) == Some(NF_DROP),
            },
        ));
    }
    if chains.is_empty() {
        return Ok(Vec::new());
    }
    // Only the forward chains' rules: a node with kube-proxy holds
    // thousands elsewhere.
    for (family, c) in &mut chains {
        let mut filter = nft::Attrs::default();
        filter.str(1, &c.table).str(2, &c.chain);
        c.rules = s.dump(NFT_MSG_GETRULE, *family, &filter)?.len();
    }
    Ok(chains
        .into_iter()
        .map(|(_, c)| c)
        .filter(|c| c.rules > 0 || c.policy_drop)
        .collect())
}

/// Legacy iptables (`x_tables`): each loaded table's `FORWARD` chain, read
/// with `IPT_SO_GET_INFO` / `IPT_SO_GET_ENTRIES` as `iptables-legacy`
/// does. No table is loaded (the usual case with iptables-nft): nothing.
fn legacy_forward_chains() -> io::Result<Vec<ForwardChain>> {
    let names = match std::fs::read_to_string("/proc/net/ip_tables_names") {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for table in names.lines().map(str::trim).filter(|t| !t.is_empty()) {
        if let Some(c) = legacy_forward(table)? {
            out.push(c);
        }
    }
    Ok(out)
}

const IPT_SO_GET_INFO: i32 = 64;
const IPT_SO_GET_ENTRIES: i32 = 65;
const NF_IP_FORWARD: usize = 2;
/// `struct ipt_entry`: `ipt_ip` (84) + nfcache (4) + offsets (2 + 2) +
/// comefrom (4) + counters (16).
const IPT_ENTRY_LEN: usize = 112;
/// `struct xt_entry_target`'s header.
const XT_TARGET_HEADER: usize = 32;

#[repr(C)]
struct IptGetinfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; 5],
    underflow: [u32; 5],
    num_entries: u32,
    size: u32,
}

fn legacy_forward(table: &str) -> io::Result<Option<ForwardChain>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if table.len() >= 32 {
        return Ok(None);
    }
    // Any IPv4 socket reaches x_tables' socket options (CAP_NET_ADMIN is
    // what they check); a UDP one needs no CAP_NET_RAW, which the
    // DaemonSet does not grant.
    // SAFETY: plain socket(2), owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and valid.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = IptGetinfo {
        name: [0; 32],
        valid_hooks: 0,
        hook_entry: [0; 5],
        underflow: [0; 5],
        num_entries: 0,
        size: 0,
    };
    info.name[..table.len()].copy_from_slice(table.as_bytes());
    let mut len = std::mem::size_of::<IptGetinfo>() as libc::socklen_t;
    // SAFETY: getsockopt into a struct of the size given.
    if unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            IPT_SO_GET_INFO,
            &mut info as *mut _ as *mut libc::c_void,
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    if info.valid_hooks & (1 << NF_IP_FORWARD) == 0 {
        return Ok(None);
    }
    let (entry, underflow) = (
        info.hook_entry[NF_IP_FORWARD] as usize,
        info.underflow[NF_IP_FORWARD] as usize,
    );
    // The entries: the name, the size, then the table's blob (aligned to
    // 8 bytes, as `struct ipt_entry` holds 64-bit counters).
    const HEAD: usize = 40;
    let mut buf = vec![0u8; HEAD + info.size as usize];
    buf[..table.len()].copy_from_slice(table.as_bytes());
    buf[32..36].copy_from_slice(&info.size.to_ne_bytes());
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt into our buffer of the size given.
    if unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            IPT_SO_GET_ENTRIES,
            buf.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let blob = &buf[HEAD..];
    // Rules: the entries between the chain's start and its policy.
    let mut rules = 0;
    let mut at = entry;
    while at < underflow && at + IPT_ENTRY_LEN <= blob.len() {
        let next = usize::from(u16::from_ne_bytes([blob[at + 90], blob[at + 91]]));
        if next == 0 {
            break;
        }
        rules += 1;
        at += next;
    }
    // The policy: the standard target's verdict (-NF_DROP - 1 is drop).
    let verdict_at = underflow + IPT_ENTRY_LEN + XT_TARGET_HEADER;
    let policy_drop = blob
        .get(verdict_at..verdict_at + 4)
        .map(|v| i32::from_ne_bytes([v[0], v[1], v[2], v[3]]) == -(NF_DROP as i32) - 1)
        .unwrap_or(false);
    Ok((rules > 0 || policy_drop).then(|| ForwardChain {
        source: "iptables-legacy",
        table: table.to_string(),
        chain: "FORWARD".into(),
        rules,
        policy_drop,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_walked_and_malformed_ones_stop_the_walk() {
        // NFTA_CHAIN_TABLE "filter", NFTA_CHAIN_NAME "forward", then a
        // truncated attribute claiming 64 bytes.
        let mut b = Vec::new();
        for (kind, v) in [(1u16, &b"filter\0"[..]), (3, &b"forward\0"[..])] {
            b.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(v);
            b.resize((b.len() + 3) & !3, 0);
        }
        b.extend_from_slice(&64u16.to_ne_bytes());
        b.extend_from_slice(&5u16.to_ne_bytes());
        let a = attrs(&b);
        assert_eq!(a.len(), 2);
        assert_eq!(attr_str(&a, 1), "filter");
        assert_eq!(attr_str(&a, 3), "forward");
        assert_eq!(attr_be32(&a, 5), None);
    }
}

//! The kernel path's guards, in nftables: what the eBPF programs check,
//! for packets no program judges (`--datapath kernel`, and what the
//! programs leave to the kernel).
//!
//! * `ip flannel-guard`, chain `input` (filter, hook input): UDP to the
//!   VXLAN port from an address not in set `vteps` (the public IPs of the
//!   current leases) is counted and dropped, so the kernel's
//!   `flannel.<VNI>` takes VXLAN only from cluster nodes:
//!   `meta l4proto udp udp dport <port> ip saddr != @vteps counter drop`.
//! * `bridge flannel-guard`, chain `prerouting` (kernel data path only): on
//!   a pod's port of the bridge (set `ports`), IPv4 whose source and
//!   IPv4-over-Ethernet ARP whose sender (other than 0.0.0.0, a probe) is
//!   not that pod's address (set `pods` of `iifname . address`) is counted
//!   and dropped. A port the agent does not know yet (a pod wired while it
//!   was down, until it adopts it) is not checked. IPv6 from a pod's port
//!   whose source is neither link-local, `::`, nor that pod's IPv6 (set
//!   `pods6`; a pod without IPv6 has none) is dropped the same way.
//!
//! * `ip6 flannel-guard` (dual-stack), chain `input`: the same VXLAN rule
//!   over IPv6 for `flannel-v6.<VNI>`, from the remote IPv6 leases' public
//!   IPv6 addresses (set `vteps6`).
//!
//! The tables are rebuilt in one transaction whenever what they hold
//! changes, as the masquerade table is.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use crate::nft::*;

pub const TABLE: &str = "flannel-guard";
pub const VXLAN_CHAIN: &str = "input";
pub const VTEP_SET: &str = "vteps";
pub const VTEP6_SET: &str = "vteps6";
pub const POD_CHAIN: &str = "prerouting";
pub const PORT_SET: &str = "ports";
pub const POD_SET: &str = "pods";
pub const POD6_SET: &str = "pods6";

const VTEP_SET_ID: u32 = 1;
const PORT_SET_ID: u32 = 2;
const POD_SET_ID: u32 = 3;
const POD6_SET_ID: u32 = 4;
/// nftables' `ipv6_addr` type.
const TYPE_IP6ADDR: u32 = 8;
const IFNAMSIZ: usize = 16;

fn ifname_key(name: &str) -> [u8; IFNAMSIZ] {
    let mut k = [0u8; IFNAMSIZ];
    let n = name.len().min(IFNAMSIZ - 1);
    k[..n].copy_from_slice(&name.as_bytes()[..n]);
    k
}

/// A set of `key_len`-byte keys of nftables type `key_type`. Interface
/// names are kept in host byte order, which `nft` learns from the set's
/// user data (the kernel compares bytes either way).
fn set(table: &str, name: &str, id: u32, key_type: u32, key_len: u32) -> Attrs {
    const NFTA_SET_USERDATA: u16 = 13;
    const NFTNL_UDATA_SET_KEYBYTEORDER: u8 = 0;
    const BYTEORDER_HOST_ENDIAN: u32 = 1;
    let mut a = Attrs::default();
    a.str(1, table)
        .str(2, name)
        .be32(3, 0)
        .be32(4, key_type)
        .be32(5, key_len)
        .be32(10, id);
    if key_type == TYPE_IFNAME {
        let mut udata = vec![NFTNL_UDATA_SET_KEYBYTEORDER, 4];
        udata.extend_from_slice(&BYTEORDER_HOST_ENDIAN.to_ne_bytes());
        a.raw(NFTA_SET_USERDATA, &udata);
    }
    a
}

/// The elements of set `name` (`id` in this batch).
fn elements<'a>(table: &str, name: &str, id: u32, keys: impl Iterator<Item = &'a [u8]>) -> Attrs {
    let mut a = Attrs::default();
    a.str(1, table)
        .str(2, name)
        .nest(3, |list| {
            for key in keys {
                list.nest(1, |e| {
                    e.value(1, key);
                });
            }
        })
        .be32(4, id);
    a
}

/// Adds `keys` to set `name` of this batch, in messages of at most
/// [`ELEMENTS_PER_MESSAGE`] elements.
fn fill<K: AsRef<[u8]>>(
    s: &mut Socket,
    family: u8,
    name: &str,
    id: u32,
    keys: &[K],
    what: &'static str,
) {
    for chunk in keys.chunks(ELEMENTS_PER_MESSAGE) {
        s.nft_in(
            family,
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            &elements(TABLE, name, id, chunk.iter().map(|k| k.as_ref())),
            what,
        );
    }
}

fn chain(table: &str, name: &str, hook: u32) -> Attrs {
    let mut a = Attrs::default();
    a.str(1, table)
        .str(3, name)
        .nest(4, |h| {
            h.be32(1, hook).be32(2, 0);
        })
        .str(7, "filter");
    a
}

fn rule_attrs(table: &str, chain: &str, rule: &Rule) -> Attrs {
    let mut a = Attrs::default();
    a.str(1, table)
        .str(2, chain)
        .raw(4 | NLA_F_NESTED, &rule.0 .0);
    a
}

/// Starts table `TABLE` of `family` afresh in this batch.
fn fresh_table(s: &mut Socket, family: u8) {
    let t = table_attrs(TABLE);
    s.nft_in(
        family,
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        &t,
        "creating the guard table",
    );
    s.nft_in(family, NFT_MSG_DELTABLE, 0, &t, "clearing the guard table");
}

/// Queues table `TABLE` of `family` (IPv4 or IPv6) with its VTEP set
/// holding `keys` and, with a VXLAN `port`, the rule dropping VXLAN from
/// any other source.
fn vxlan_table<const N: usize>(s: &mut Socket, family: u8, port: Option<u16>, keys: &[[u8; N]]) {
    let (set_name, key_type, saddr) = match family {
        NFPROTO_IPV6 => (VTEP6_SET, TYPE_IP6ADDR, 8),
        _ => (VTEP_SET, TYPE_IPADDR, 12),
    };
    s.nft_in(
        family,
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        &table_attrs(TABLE),
        "creating the guard table",
    );
    s.nft_in(
        family,
        NFT_MSG_NEWSET,
        NLM_F_CREATE,
        &set(TABLE, set_name, VTEP_SET_ID, key_type, N as u32),
        "creating the VTEP set",
    );
    fill(
        s,
        family,
        set_name,
        VTEP_SET_ID,
        keys,
        "filling the VTEP set",
    );
    s.nft_in(
        family,
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        &chain(TABLE, VXLAN_CHAIN, NF_INET_LOCAL_IN),
        "creating the VXLAN chain",
    );
    if let Some(port) = port {
        let mut r = Rule::default();
        r.meta(NFT_META_L4PROTO, NFT_REG_1)
            .cmp(NFT_REG_1, NFT_CMP_EQ, &[17])
            .payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG_1)
            .cmp(NFT_REG_1, NFT_CMP_EQ, &port.to_be_bytes())
            .payload(NFT_PAYLOAD_NETWORK_HEADER, saddr, N as u32, NFT_REG_1)
            .lookup(set_name, VTEP_SET_ID, NFT_REG_1, true)
            .drop_counted();
        s.nft_in(
            family,
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            &rule_attrs(TABLE, VXLAN_CHAIN, &r),
            "adding the VXLAN rule",
        );
    }
}

/// Installs (or atomically replaces) the guards: VXLAN on `port` only from
/// `vteps` (no VXLAN rule without a port: host-gw carries no VXLAN), and
/// with `vteps6` over IPv6 only from those; with `pods` (port name → the
/// pod's address) and `pods6`, the pod source check on those ports, else
/// no bridge table.
pub fn ensure(
    port: Option<u16>,
    vteps: &BTreeSet<Ipv4Addr>,
    vteps6: Option<&BTreeSet<Ipv6Addr>>,
    pods: Option<&BTreeMap<String, Ipv4Addr>>,
    pods6: &BTreeMap<String, Ipv6Addr>,
) -> Result<(), NftError> {
    let mut s = Socket::open()?;
    s.batch(NFNL_MSG_BATCH_BEGIN);

    fresh_table(&mut s, NFPROTO_IPV4);
    let keys: Vec<[u8; 4]> = vteps.iter().map(|a| a.octets()).collect();
    vxlan_table(&mut s, NFPROTO_IPV4, port, &keys);
    fresh_table(&mut s, NFPROTO_IPV6);
    if let Some(vteps6) = vteps6 {
        let keys: Vec<[u8; 16]> = vteps6.iter().map(|a| a.octets()).collect();
        vxlan_table(&mut s, NFPROTO_IPV6, port, &keys);
    }

    let br = NFPROTO_BRIDGE;
    fresh_table(&mut s, br);
    if let Some(pods) = pods {
        s.nft_in(
            br,
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            &table_attrs(TABLE),
            "creating the pod guard table",
        );
        s.nft_in(
            br,
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            &set(TABLE, PORT_SET, PORT_SET_ID, TYPE_IFNAME, IFNAMSIZ as u32),
            "creating the port set",
        );
        s.nft_in(
            br,
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            &set(
                TABLE,
                POD_SET,
                POD_SET_ID,
                (TYPE_IFNAME << 6) | TYPE_IPADDR,
                IFNAMSIZ as u32 + 4,
            ),
            "creating the pod set",
        );
        s.nft_in(
            br,
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            &set(
                TABLE,
                POD6_SET,
                POD6_SET_ID,
                (TYPE_IFNAME << 6) | TYPE_IP6ADDR,
                IFNAMSIZ as u32 + 16,
            ),
            "creating the pod IPv6 set",
        );
        if !pods6.is_empty() {
            let pairs: Vec<Vec<u8>> = pods6
                .iter()
                .map(|(n, ip)| [&ifname_key(n)[..], &ip.octets()[..]].concat())
                .collect();
            fill(
                &mut s,
                br,
                POD6_SET,
                POD6_SET_ID,
                &pairs,
                "filling the pod IPv6 set",
            );
        }
        if !pods.is_empty() {
            let ports: Vec<[u8; IFNAMSIZ]> = pods.keys().map(|n| ifname_key(n)).collect();
            fill(
                &mut s,
                br,
                PORT_SET,
                PORT_SET_ID,
                &ports,
                "filling the port set",
            );
            let pairs: Vec<Vec<u8>> = pods
                .iter()
                .map(|(n, ip)| [&ifname_key(n)[..], &ip.octets()[..]].concat())
                .collect();
            fill(
                &mut s,
                br,
                POD_SET,
                POD_SET_ID,
                &pairs,
                "filling the pod set",
            );
        }
        s.nft_in(
            br,
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            &chain(TABLE, POD_CHAIN, NF_BR_PRE_ROUTING),
            "creating the pod chain",
        );
        // On a known pod port: the source must be that pod's.
        let known_port = |r: &mut Rule| {
            r.meta(NFT_META_IIFNAME, NFT_REG_1)
                .lookup(PORT_SET, PORT_SET_ID, NFT_REG_1, false);
        };
        let mut v4 = Rule::default();
        v4.meta(NFT_META_PROTOCOL, NFT_REG_1)
            .cmp(NFT_REG_1, NFT_CMP_EQ, &[0x08, 0x00]);
        known_port(&mut v4);
        v4.payload(NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG32_04)
            .lookup(POD_SET, POD_SET_ID, NFT_REG_1, true)
            .drop_counted();
        let mut arp = Rule::default();
        arp.meta(NFT_META_PROTOCOL, NFT_REG_1)
            .cmp(NFT_REG_1, NFT_CMP_EQ, &[0x08, 0x06])
            .payload(NFT_PAYLOAD_NETWORK_HEADER, 0, 6, NFT_REG_1)
            .cmp(NFT_REG_1, NFT_CMP_EQ, &[0, 1, 8, 0, 6, 4])
            .payload(NFT_PAYLOAD_NETWORK_HEADER, 14, 4, NFT_REG_1)
            .cmp(NFT_REG_1, NFT_CMP_NEQ, &[0; 4]);
        known_port(&mut arp);
        arp.payload(NFT_PAYLOAD_NETWORK_HEADER, 14, 4, NFT_REG32_04)
            .lookup(POD_SET, POD_SET_ID, NFT_REG_1, true)
            .drop_counted();
        // IPv6: link-local (fe80::/10) and :: pass; else the pod's own.
        let mut v6 = Rule::default();
        v6.meta(NFT_META_PROTOCOL, NFT_REG_1)
            .cmp(NFT_REG_1, NFT_CMP_EQ, &[0x86, 0xdd])
            .payload(NFT_PAYLOAD_NETWORK_HEADER, 8, 2, NFT_REG_1)
            .masked_cmp(&[0xff, 0xc0], NFT_CMP_NEQ, &[0xfe, 0x80])
            .payload(NFT_PAYLOAD_NETWORK_HEADER, 8, 16, NFT_REG_1)
            .cmp(NFT_REG_1, NFT_CMP_NEQ, &[0; 16]);
        known_port(&mut v6);
        v6.payload(NFT_PAYLOAD_NETWORK_HEADER, 8, 16, NFT_REG32_04)
            .lookup(POD6_SET, POD6_SET_ID, NFT_REG_1, true)
            .drop_counted();
        for (rule, what) in [
            (v4, "adding the pod IPv4 rule"),
            (arp, "adding the pod ARP rule"),
            (v6, "adding the pod IPv6 rule"),
        ] {
            s.nft_in(
                br,
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                &rule_attrs(TABLE, POD_CHAIN, &rule),
                what,
            );
        }
    }
    s.batch(NFNL_MSG_BATCH_END);
    s.exchange()
}

/// Whether the guard tables are there: (`ip`, `ip6`, `bridge`).
pub fn present() -> Result<(bool, bool, bool), NftError> {
    Ok((
        table_present(NFPROTO_IPV4, TABLE)?,
        table_present(NFPROTO_IPV6, TABLE)?,
        table_present(NFPROTO_BRIDGE, TABLE)?,
    ))
}

/// Removes every guard table; absent is fine.
pub fn remove() -> Result<(), NftError> {
    delete_table(NFPROTO_IPV4, TABLE)?;
    delete_table(NFPROTO_IPV6, TABLE)?;
    delete_table(NFPROTO_BRIDGE, TABLE)
}

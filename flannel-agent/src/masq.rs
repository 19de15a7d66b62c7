//! `--ip-masq`: masquerade pod traffic leaving the cluster network, never
//! pod-to-pod traffic, with Flannel's rules, in nftables.
//!
//! The rules go to the kernel over netlink ([`crate::nft`]) in one batch,
//! which nftables applies as a transaction: the table is created, deleted
//! and recreated with its chain and rules in a single step, so a rerun
//! replaces the rules atomically and never leaves a half-built table.
//!
//! The table (`ip flannel-ipv4`, chain `postrtg`, nat postrouting, priority
//! srcnat) holds Flannel's rules, in Flannel's order:
//! 1. `meta mark & 0x4000 == 0x4000 return` (kube-proxy already masquerades it)
//! 2. `ip saddr <net> ip daddr <net> return` (pod to pod)
//! 3. `ip saddr != <net> ip daddr <lease> return` (external traffic to our pods)
//! 4. `ip saddr <net> ip daddr != 224.0.0.0/4 masquerade fully-random`
//! 5. `ip saddr != <net> ip daddr <net> masquerade fully-random`

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::nft::*;

pub use crate::nft::NftError as MasqError;

const KUBE_PROXY_MARK: u32 = 0x4000;

pub const TABLE: &str = "flannel-ipv4";
pub const CHAIN: &str = "postrtg";

/// Flannel's rules for the cluster network `net` and this node's `lease`.
fn rules(net: Ipv4Net, lease: Ipv4Net) -> Vec<Rule> {
    let multicast: Ipv4Net = Ipv4Net::new(Ipv4Addr::new(224, 0, 0, 0), 4).expect("valid");
    let mut out = Vec::new();
    let mut r = Rule::default();
    r.expr("meta", |a| {
        a.be32(2, NFT_META_MARK).be32(1, NFT_REG_1);
    })
    .masked_cmp(
        KUBE_PROXY_MARK.to_ne_bytes(),
        NFT_CMP_EQ,
        KUBE_PROXY_MARK.to_ne_bytes(),
    )
    .ret();
    out.push(r);
    let mut r = Rule::default();
    r.ip_in(false, net, true).ip_in(true, net, true).ret();
    out.push(r);
    let mut r = Rule::default();
    r.ip_in(false, net, false).ip_in(true, lease, true).ret();
    out.push(r);
    let mut r = Rule::default();
    r.ip_in(false, net, true)
        .ip_in(true, multicast, false)
        .masquerade();
    out.push(r);
    let mut r = Rule::default();
    r.ip_in(false, net, false)
        .ip_in(true, net, true)
        .masquerade();
    out.push(r);
    out
}

/// A nat chain on postrouting at srcnat priority in table `table`.
fn nat_chain(table: &str, chain: &str) -> Attrs {
    let mut a = Attrs::default();
    a.str(1, table)
        .str(3, chain)
        .nest(4, |h| {
            h.be32(1, NF_INET_POST_ROUTING)
                .be32(2, NF_IP_PRI_NAT_SRC as u32);
        })
        .str(7, "nat");
    a
}

/// Installs (or atomically replaces) the masquerade rules.
pub fn ensure(network: Ipv4Net, lease: Ipv4Net) -> Result<(), MasqError> {
    let mut s = Socket::open()?;
    s.batch(NFNL_MSG_BATCH_BEGIN);
    // Create-if-missing, delete, create: one transaction that replaces
    // whatever an earlier run left.
    s.nft(
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        &table_attrs(TABLE),
        "creating the table",
    );
    s.nft(
        NFT_MSG_DELTABLE,
        0,
        &table_attrs(TABLE),
        "clearing the table",
    );
    s.nft(
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        &table_attrs(TABLE),
        "creating the table",
    );
    s.nft(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        &nat_chain(TABLE, CHAIN),
        "creating the chain",
    );
    for rule in rules(network, lease) {
        let mut a = Attrs::default();
        a.str(1, TABLE)
            .str(2, CHAIN)
            .raw(4 | NLA_F_NESTED, &rule.0 .0);
        s.nft(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            &a,
            "adding a rule",
        );
    }
    s.batch(NFNL_MSG_BATCH_END);
    s.exchange()
}

/// Removes the table (after `--ip-masq` was turned off); absent is fine.
pub fn remove() -> Result<(), MasqError> {
    delete_table(NFPROTO_IPV4, TABLE)
}

/// Whether the table is there (drift check: someone may flush nftables).
pub fn present() -> Result<bool, MasqError> {
    table_present(NFPROTO_IPV4, TABLE)
}

/// Masquerading done by the CNI plugin when the agent does not (`ipMasq`,
/// Flannel's `!FLANNEL_IPMASQ`): table `ip flannel-cni` with one rule
/// `ip saddr <lease> ip daddr != <cluster net> ip daddr != 224.0.0.0/4 masquerade`.
/// Every pod of the node shares it, so ADD and DEL pay nothing per pod
/// (the reference bridge plugin writes iptables rules per container).
pub const POD_TABLE: &str = "flannel-cni";
pub const POD_CHAIN: &str = "postrouting";

/// Whether the plugin's table is there.
pub fn pod_present() -> Result<bool, MasqError> {
    table_present(NFPROTO_IPV4, POD_TABLE)
}

/// Makes sure pods of `lease` are masqueraded when leaving `network`. A
/// read in the common case; when the table is missing it is built in one
/// transaction, and `NLM_F_EXCL` on the table lets exactly one of several
/// racing ADDs build it.
pub fn pod_ensure(network: Ipv4Net, lease: Ipv4Net) -> Result<(), MasqError> {
    if pod_present()? {
        return Ok(());
    }
    let mut s = Socket::open()?;
    s.batch(NFNL_MSG_BATCH_BEGIN);
    s.nft(
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE | NLM_F_EXCL,
        &table_attrs(POD_TABLE),
        "creating the pod table",
    );
    s.nft(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        &nat_chain(POD_TABLE, POD_CHAIN),
        "creating the pod chain",
    );
    let multicast = Ipv4Net::new(Ipv4Addr::new(224, 0, 0, 0), 4).expect("valid");
    let mut rule = Rule::default();
    rule.ip_in(false, lease, true)
        .ip_in(true, network, false)
        .ip_in(true, multicast, false)
        .masquerade();
    let mut a = Attrs::default();
    a.str(1, POD_TABLE)
        .str(2, POD_CHAIN)
        .raw(4 | NLA_F_NESTED, &rule.0 .0);
    s.nft(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        &a,
        "adding the pod rule",
    );
    s.batch(NFNL_MSG_BATCH_END);
    match s.exchange() {
        Err(MasqError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
            Ok(())
        }
        other => other,
    }
}

/// Removes the plugin's table (the agent masquerades itself now); absent
/// is fine.
pub fn pod_remove() -> Result<(), MasqError> {
    delete_table(NFPROTO_IPV4, POD_TABLE)
}

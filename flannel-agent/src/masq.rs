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
//!
//! With IPv6, `ip6 flannel-ipv6` holds the same chain and rules over the
//! IPv6 network and lease (multicast is `ff00::/8`), as Flannel's do.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::nft::*;

pub use crate::nft::NftError as MasqError;

const KUBE_PROXY_MARK: u32 = 0x4000;

pub const TABLE: &str = "flannel-ipv4";
/// The IPv6 rules' table (`ip6 flannel-ipv6`), Flannel's name, with the
/// same chain and the same rules over the IPv6 network and lease.
pub const TABLE6: &str = "flannel-ipv6";
pub const CHAIN: &str = "postrtg";

/// One family's cluster network and node lease, with that family's
/// address matches.
#[derive(Clone, Copy)]
enum Nets {
    V4(Ipv4Net, Ipv4Net),
    V6(Ipv6Net, Ipv6Net),
}

/// Which of a family's prefixes a match is against.
#[derive(Clone, Copy)]
enum Prefix {
    Network,
    Lease,
    Multicast,
}

impl Nets {
    fn family(self) -> u8 {
        match self {
            Nets::V4(..) => NFPROTO_IPV4,
            Nets::V6(..) => NFPROTO_IPV6,
        }
    }

    /// `ip[6] saddr|daddr [!=] <prefix>`.
    fn matches(self, r: &mut Rule, daddr: bool, p: Prefix, inside: bool) {
        match self {
            Nets::V4(net, lease) => {
                let m = Ipv4Net::new(Ipv4Addr::new(224, 0, 0, 0), 4).expect("valid");
                let n = [net, lease, m][p as usize];
                r.ip_in(daddr, n, inside);
            }
            Nets::V6(net, lease) => {
                let m = Ipv6Net::new(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8).expect("valid");
                let n = [net, lease, m][p as usize];
                r.ip6_in(daddr, n, inside);
            }
        }
    }
}

/// Flannel's rules for one family's cluster network and this node's lease.
fn rules(nets: Nets) -> Vec<Rule> {
    use Prefix::*;
    let mut out = Vec::new();
    let mut r = Rule::default();
    r.expr("meta", |a| {
        a.be32(2, NFT_META_MARK).be32(1, NFT_REG_1);
    })
    .masked_cmp(
        &KUBE_PROXY_MARK.to_ne_bytes(),
        NFT_CMP_EQ,
        &KUBE_PROXY_MARK.to_ne_bytes(),
    )
    .ret();
    out.push(r);
    // (saddr inside Network?, daddr prefix, daddr inside?, masquerade?)
    for (src_in, dst, dst_in, masq) in [
        (true, Network, true, false),
        (false, Lease, true, false),
        (true, Multicast, false, true),
        (false, Network, true, true),
    ] {
        let mut r = Rule::default();
        nets.matches(&mut r, false, Network, src_in);
        nets.matches(&mut r, true, dst, dst_in);
        if masq {
            r.masquerade();
        } else {
            r.ret();
        }
        out.push(r);
    }
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

/// Queues, in `s`'s batch, the replacement of `table` (create-if-missing,
/// delete, then with `nets` create it again with its chain and rules).
fn replace_table(s: &mut Socket, family: u8, table: &'static str, nets: Option<Nets>) {
    let t = table_attrs(table);
    s.nft_in(
        family,
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        &t,
        "creating the table",
    );
    s.nft_in(family, NFT_MSG_DELTABLE, 0, &t, "clearing the table");
    let Some(nets) = nets else {
        return;
    };
    s.nft_in(
        family,
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        &t,
        "creating the table",
    );
    s.nft_in(
        family,
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        &nat_chain(table, CHAIN),
        "creating the chain",
    );
    for rule in rules(nets) {
        let mut a = Attrs::default();
        a.str(1, table)
            .str(2, CHAIN)
            .raw(4 | NLA_F_NESTED, &rule.0 .0);
        s.nft_in(
            family,
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            &a,
            "adding a rule",
        );
    }
}

/// Installs (or atomically replaces) the masquerade rules: IPv4's when `v4`
/// (the network and lease) is given (not in an IPv6-only cluster), and
/// IPv6's when `v6` (the IPv6 network and lease) is given; without it an
/// IPv6 table an earlier run left goes, in the same transaction.
pub fn ensure(
    v4: Option<(Ipv4Net, Ipv4Net)>,
    v6: Option<(Ipv6Net, Ipv6Net)>,
) -> Result<(), MasqError> {
    let mut s = Socket::open()?;
    s.batch(NFNL_MSG_BATCH_BEGIN);
    replace_table(&mut s, NFPROTO_IPV4, TABLE, v4.map(|(n, l)| Nets::V4(n, l)));
    replace_table(
        &mut s,
        NFPROTO_IPV6,
        TABLE6,
        v6.map(|(n, l)| Nets::V6(n, l)),
    );
    s.batch(NFNL_MSG_BATCH_END);
    s.exchange()
}

/// Removes both tables (after `--ip-masq` was turned off); absent is fine.
pub fn remove() -> Result<(), MasqError> {
    delete_table(NFPROTO_IPV4, TABLE)?;
    delete_table(NFPROTO_IPV6, TABLE6)
}

/// Whether the IPv4 and the IPv6 tables are there (drift check: someone
/// may flush nftables).
pub fn present() -> Result<(bool, bool), MasqError> {
    Ok((
        table_present(NFPROTO_IPV4, TABLE)?,
        table_present(NFPROTO_IPV6, TABLE6)?,
    ))
}

/// Masquerading done by the CNI plugin when the agent does not (`ipMasq`,
/// Flannel's `!FLANNEL_IPMASQ`): table `ip flannel-cni` with one rule
/// `ip saddr <lease> ip daddr != <cluster net> ip daddr != 224.0.0.0/4 masquerade`,
/// and for a dual-stack pod `ip6 flannel-cni` with the same rule over the
/// IPv6 lease and network (`ff00::/8`), as the bridge plugin Flannel
/// delegates to masquerades every address it gives. Every pod of the node
/// shares them, so ADD and DEL pay nothing per pod (the reference bridge
/// plugin writes iptables rules per container).
pub const POD_TABLE: &str = "flannel-cni";
pub const POD_CHAIN: &str = "postrouting";

/// Whether either family's table of the plugin is there.
pub fn pod_present() -> Result<bool, MasqError> {
    Ok(table_present(NFPROTO_IPV4, POD_TABLE)? || table_present(NFPROTO_IPV6, POD_TABLE)?)
}

/// Makes sure pods of the lease in `v4` (the network and lease) are
/// masqueraded when leaving the network, and with `v6` (the IPv6 network
/// and lease) their IPv6 traffic too.
pub fn pod_ensure(
    v4: Option<(Ipv4Net, Ipv4Net)>,
    v6: Option<(Ipv6Net, Ipv6Net)>,
) -> Result<(), MasqError> {
    if let Some((network, lease)) = v4 {
        pod_ensure_family(Nets::V4(network, lease))?;
    }
    match v6 {
        Some((n, l)) => pod_ensure_family(Nets::V6(n, l)),
        None => Ok(()),
    }
}

/// One family's table: a read in the common case; when the table is
/// missing it is built in one transaction, and `NLM_F_EXCL` on the table
/// lets exactly one of several racing ADDs build it.
fn pod_ensure_family(nets: Nets) -> Result<(), MasqError> {
    let family = nets.family();
    if table_present(family, POD_TABLE)? {
        return Ok(());
    }
    let mut s = Socket::open()?;
    s.batch(NFNL_MSG_BATCH_BEGIN);
    s.nft_in(
        family,
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE | NLM_F_EXCL,
        &table_attrs(POD_TABLE),
        "creating the pod table",
    );
    s.nft_in(
        family,
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        &nat_chain(POD_TABLE, POD_CHAIN),
        "creating the pod chain",
    );
    let mut rule = Rule::default();
    nets.matches(&mut rule, false, Prefix::Lease, true);
    nets.matches(&mut rule, true, Prefix::Network, false);
    nets.matches(&mut rule, true, Prefix::Multicast, false);
    rule.masquerade();
    let mut a = Attrs::default();
    a.str(1, POD_TABLE)
        .str(2, POD_CHAIN)
        .raw(4 | NLA_F_NESTED, &rule.0 .0);
    s.nft_in(
        family,
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

/// Removes the plugin's tables (the agent masquerades itself now); absent
/// is fine.
pub fn pod_remove() -> Result<(), MasqError> {
    delete_table(NFPROTO_IPV4, POD_TABLE)?;
    delete_table(NFPROTO_IPV6, POD_TABLE)
}

//! `--ip-masq`: masquerade pod traffic leaving the cluster network, never
//! pod-to-pod traffic, with Flannel's rules, in nftables.
//!
//! The rules go to the kernel over netlink (`NETLINK_NETFILTER`) in one
//! batch, which nftables applies as a transaction: the table is created,
//! deleted and recreated with its chain and rules in a single step, so a
//! rerun replaces the rules atomically and never leaves a half-built table.
//! Written by hand because the crates that do this either link the C
//! libnftnl (nftnl, mnl) or are GPL (rustables); the messages needed are
//! few and fixed.
//!
//! The table (`ip flannel-ipv4`, chain `postrtg`, nat postrouting, priority
//! srcnat) holds Flannel's rules, in Flannel's order:
//! 1. `meta mark & 0x4000 == 0x4000 return` (kube-proxy already masquerades it)
//! 2. `ip saddr <net> ip daddr <net> return` (pod to pod)
//! 3. `ip saddr != <net> ip daddr <lease> return` (external traffic to our pods)
//! 4. `ip saddr <net> ip daddr != 224.0.0.0/4 masquerade fully-random`
//! 5. `ip saddr != <net> ip daddr <net> masquerade fully-random`

use std::{io, net::Ipv4Addr, os::fd::AsRawFd};

use ipnet::Ipv4Net;

pub const TABLE: &str = "flannel-ipv4";
pub const CHAIN: &str = "postrtg";

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_IPV4: u8 = 2;

const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

const NF_INET_POST_ROUTING: u32 = 4;
const NF_IP_PRI_NAT_SRC: i32 = 100;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_META_MARK: u32 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_RETURN: i32 = -5;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 1 << 4;
const KUBE_PROXY_MARK: u32 = 0x4000;

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("nftables netlink socket: {0}")]
    Socket(io::Error),
    #[error("nftables {what}: {source}")]
    Kernel {
        what: &'static str,
        source: io::Error,
    },
}

/// One netlink attribute tree, encoded as the kernel expects.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.raw(kind, &b)
    }
    /// nftables takes its integers in network byte order.
    fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.raw(kind, &v.to_be_bytes())
    }
    fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::default();
        f(&mut inner);
        self.raw(kind | NLA_F_NESTED, &inner.0)
    }
    /// NFTA_DATA_VALUE inside `kind`.
    fn value(&mut self, kind: u16, bytes: &[u8]) -> &mut Self {
        self.nest(kind, |a| {
            a.raw(1, bytes);
        })
    }
}

/// Expressions of one rule.
#[derive(Default)]
struct Rule(Attrs);

impl Rule {
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Attrs)) -> &mut Self {
        // NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA }
        self.0.nest(1, |e| {
            e.str(1, name);
            e.nest(2, data);
        });
        self
    }
    /// Loads 4 bytes of the IPv4 header at `offset` into register 1.
    fn ip_field(&mut self, offset: u32) -> &mut Self {
        self.expr("payload", |a| {
            a.be32(1, NFT_REG_1)
                .be32(2, NFT_PAYLOAD_NETWORK_HEADER)
                .be32(3, offset)
                .be32(4, 4);
        })
    }
    fn masked_cmp(&mut self, mask: [u8; 4], op: u32, want: [u8; 4]) -> &mut Self {
        self.expr("bitwise", |a| {
            a.be32(1, NFT_REG_1)
                .be32(2, NFT_REG_1)
                .be32(3, 4)
                .value(4, &mask)
                .value(5, &[0; 4]);
        })
        .expr("cmp", |a| {
            a.be32(1, NFT_REG_1).be32(2, op).value(3, &want);
        })
    }
    /// `ip saddr|daddr [!=] net`.
    fn ip_in(&mut self, daddr: bool, net: Ipv4Net, inside: bool) -> &mut Self {
        self.ip_field(if daddr { 16 } else { 12 }).masked_cmp(
            net.netmask().octets(),
            if inside { NFT_CMP_EQ } else { NFT_CMP_NEQ },
            net.network().octets(),
        )
    }
    fn counter(&mut self) -> &mut Self {
        self.expr("counter", |a| {
            a.raw(1, &0u64.to_be_bytes()).raw(2, &0u64.to_be_bytes());
        })
    }
    fn ret(&mut self) -> &mut Self {
        self.counter().expr("immediate", |a| {
            a.be32(1, NFT_REG_VERDICT).nest(2, |d| {
                d.nest(2, |v| {
                    v.be32(1, NFT_RETURN as u32);
                });
            });
        })
    }
    fn masquerade(&mut self) -> &mut Self {
        self.counter().expr("masq", |a| {
            a.be32(1, NF_NAT_RANGE_PROTO_RANDOM_FULLY);
        })
    }
}

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

struct Socket {
    fd: std::os::fd::OwnedFd,
    seq: u32,
    buf: Vec<u8>,
    /// Sequence numbers that asked for an ack.
    acks: Vec<(u32, &'static str)>,
}

impl Socket {
    fn open() -> Result<Self, MasqError> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(MasqError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a properly sized timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Socket {
            fd,
            seq: 1,
            buf: Vec::new(),
            acks: Vec::new(),
        })
    }

    fn push(
        &mut self,
        kind: u16,
        flags: u16,
        family: u8,
        res_id: u16,
        attrs: &Attrs,
        what: &'static str,
    ) {
        let len = 16 + 4 + attrs.0.len();
        self.buf.extend_from_slice(&(len as u32).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.buf.extend_from_slice(&attrs.0);
        if flags & NLM_F_ACK != 0 {
            self.acks.push((self.seq, what));
        }
        self.seq += 1;
    }

    fn nft(&mut self, msg: u16, flags: u16, attrs: &Attrs, what: &'static str) {
        self.push(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            NFPROTO_IPV4,
            0,
            attrs,
            what,
        );
    }

    fn batch(&mut self, kind: u16) {
        self.push(
            kind,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &Attrs::default(),
            "batch",
        );
    }

    /// Sends what was pushed and waits for every ack; the first error wins.
    fn exchange(&mut self) -> Result<(), MasqError> {
        // SAFETY: sending our own buffer on our own socket; the kernel
        // address is the zeroed sockaddr_nl.
        let sent = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                self.buf.as_ptr() as *const libc::c_void,
                self.buf.len(),
                0,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(MasqError::Socket(io::Error::last_os_error()));
        }
        self.buf.clear();
        let mut pending = std::mem::take(&mut self.acks);
        let mut rx = vec![0u8; 65536];
        while !pending.is_empty() {
            // SAFETY: receiving into our own buffer.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    rx.as_mut_ptr() as *mut libc::c_void,
                    rx.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(MasqError::Socket(io::Error::last_os_error()));
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes(rx[off..off + 4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(rx[off + 4..off + 6].try_into().expect("2 bytes"));
                let seq = u32::from_ne_bytes(rx[off + 8..off + 12].try_into().expect("4 bytes"));
                if len < 16 || off + len > n {
                    break;
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let code =
                        i32::from_ne_bytes(rx[off + 16..off + 20].try_into().expect("4 bytes"));
                    if let Some(pos) = pending.iter().position(|(s, _)| *s == seq) {
                        let (_, what) = pending.remove(pos);
                        if code != 0 {
                            return Err(MasqError::Kernel {
                                what,
                                source: io::Error::from_raw_os_error(-code),
                            });
                        }
                    }
                }
                off += (len + 3) & !3;
            }
        }
        Ok(())
    }
}

fn table_attrs(name: &str) -> Attrs {
    let mut a = Attrs::default();
    a.str(1, name);
    a
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

/// Deletes table `name`; absent is fine.
fn delete_table(name: &str) -> Result<(), MasqError> {
    let mut s = Socket::open()?;
    s.batch(NFNL_MSG_BATCH_BEGIN);
    s.nft(
        NFT_MSG_DELTABLE,
        0,
        &table_attrs(name),
        "deleting the table",
    );
    s.batch(NFNL_MSG_BATCH_END);
    match s.exchange() {
        Err(MasqError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// Whether table `name` exists.
fn table_present(name: &str) -> Result<bool, MasqError> {
    let mut s = Socket::open()?;
    s.nft(NFT_MSG_GETTABLE, 0, &table_attrs(name), "reading the table");
    match s.exchange() {
        Ok(()) => Ok(true),
        Err(MasqError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
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
    delete_table(TABLE)
}

/// Whether the table is there (drift check: someone may flush nftables).
pub fn present() -> Result<bool, MasqError> {
    table_present(TABLE)
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
    table_present(POD_TABLE)
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
    delete_table(POD_TABLE)
}

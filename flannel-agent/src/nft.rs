//! nftables over netlink (`NETLINK_NETFILTER`), written by hand: the
//! crates that do this either link the C libnftnl (nftnl, mnl) or are GPL
//! (rustables), and the messages needed are few and fixed. Messages go in
//! one batch, which nftables applies as a transaction. Used by the ip-masq
//! rules ([`crate::masq`]) and the VXLAN and pod source guards
//! ([`crate::guard`]).

use std::{io, os::fd::AsRawFd};

use ipnet::{Ipv4Net, Ipv6Net};

pub const NETLINK_NETFILTER: i32 = 12;
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub const NFNL_MSG_BATCH_END: u16 = 0x11;
pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
pub const NLMSG_ERROR: u16 = 2;
pub const NLA_F_NESTED: u16 = 0x8000;

pub const NF_INET_LOCAL_IN: u32 = 1;
pub const NF_INET_POST_ROUTING: u32 = 4;
pub const NF_IP_PRI_NAT_SRC: i32 = 100;
pub const NFT_REG_VERDICT: u32 = 0;
pub const NFT_REG_1: u32 = 1;
pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub const NFT_META_MARK: u32 = 3;
pub const NFT_CMP_EQ: u32 = 0;
pub const NFT_CMP_NEQ: u32 = 1;
pub const NFT_RETURN: i32 = -5;
pub const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 1 << 4;

pub const NFPROTO_BRIDGE: u8 = 7;
pub const NF_BR_PRE_ROUTING: u32 = 0;
pub const NFT_MSG_NEWSET: u16 = 9;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub const NFT_META_PROTOCOL: u32 = 1;
pub const NFT_META_L4PROTO: u32 = 16;
pub const NFT_META_IIFNAME: u32 = 6;
/// The 4-byte register right after the 16 bytes of `NFT_REG_1`.
pub const NFT_REG32_04: u32 = 12;
pub const NFT_LOOKUP_F_INV: u32 = 1;
pub const NF_DROP: u32 = 0;
/// nftables' data types, as sets name their keys.
pub const TYPE_IPADDR: u32 = 7;
pub const TYPE_IFNAME: u32 = 41;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables netlink socket: {0}")]
    Socket(io::Error),
    #[error("nftables {what}: {source}")]
    Kernel {
        what: &'static str,
        source: io::Error,
    },
}

/// Set elements per `NEWSETELEM` message: the element list is one
/// attribute, whose 16-bit length 5,000 addresses would overflow (the
/// kernel then reads a different message and refuses it).
pub const ELEMENTS_PER_MESSAGE: usize = 1000;

/// One netlink attribute tree, encoded as the kernel expects.
#[derive(Default)]
pub struct Attrs(pub Vec<u8>);

impl Attrs {
    /// An attribute's length is 16 bits: callers keep one under 64 KiB
    /// (set elements go in chunks, [`ELEMENTS_PER_MESSAGE`]).
    pub fn raw(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        debug_assert!(
            len <= usize::from(u16::MAX),
            "netlink attribute of {len} bytes"
        );
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    pub fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.raw(kind, &b)
    }
    /// nftables takes its integers in network byte order.
    pub fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.raw(kind, &v.to_be_bytes())
    }
    pub fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::default();
        f(&mut inner);
        self.raw(kind | NLA_F_NESTED, &inner.0)
    }
    /// NFTA_DATA_VALUE inside `kind`.
    pub fn value(&mut self, kind: u16, bytes: &[u8]) -> &mut Self {
        self.nest(kind, |a| {
            a.raw(1, bytes);
        })
    }
}

/// Expressions of one rule.
#[derive(Default)]
pub struct Rule(pub Attrs);

impl Rule {
    pub fn expr(&mut self, name: &str, data: impl FnOnce(&mut Attrs)) -> &mut Self {
        // NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA }
        self.0.nest(1, |e| {
            e.str(1, name);
            e.nest(2, data);
        });
        self
    }
    /// Loads `len` bytes of the network header at `offset` into register 1.
    pub fn ip_field(&mut self, offset: u32, len: u32) -> &mut Self {
        self.expr("payload", |a| {
            a.be32(1, NFT_REG_1)
                .be32(2, NFT_PAYLOAD_NETWORK_HEADER)
                .be32(3, offset)
                .be32(4, len);
        })
    }
    /// Register 1 masked with `mask`, compared with `want` (of the same
    /// length).
    pub fn masked_cmp(&mut self, mask: &[u8], op: u32, want: &[u8]) -> &mut Self {
        let zero = vec![0; mask.len()];
        self.expr("bitwise", |a| {
            a.be32(1, NFT_REG_1)
                .be32(2, NFT_REG_1)
                .be32(3, mask.len() as u32)
                .value(4, mask)
                .value(5, &zero);
        })
        .expr("cmp", |a| {
            a.be32(1, NFT_REG_1).be32(2, op).value(3, want);
        })
    }
    /// `ip saddr|daddr [!=] net`.
    pub fn ip_in(&mut self, daddr: bool, net: Ipv4Net, inside: bool) -> &mut Self {
        self.ip_field(if daddr { 16 } else { 12 }, 4).masked_cmp(
            &net.netmask().octets(),
            if inside { NFT_CMP_EQ } else { NFT_CMP_NEQ },
            &net.network().octets(),
        )
    }
    /// `ip6 saddr|daddr [!=] net`.
    pub fn ip6_in(&mut self, daddr: bool, net: Ipv6Net, inside: bool) -> &mut Self {
        self.ip_field(if daddr { 24 } else { 8 }, 16).masked_cmp(
            &net.netmask().octets(),
            if inside { NFT_CMP_EQ } else { NFT_CMP_NEQ },
            &net.network().octets(),
        )
    }
    pub fn counter(&mut self) -> &mut Self {
        self.expr("counter", |a| {
            a.raw(1, &0u64.to_be_bytes()).raw(2, &0u64.to_be_bytes());
        })
    }
    pub fn ret(&mut self) -> &mut Self {
        self.counter().expr("immediate", |a| {
            a.be32(1, NFT_REG_VERDICT).nest(2, |d| {
                d.nest(2, |v| {
                    v.be32(1, NFT_RETURN as u32);
                });
            });
        })
    }
    /// Loads meta key `key` into register `reg`.
    pub fn meta(&mut self, key: u32, reg: u32) -> &mut Self {
        self.expr("meta", |a| {
            a.be32(2, key).be32(1, reg);
        })
    }
    /// Loads `len` bytes at `offset` of header `base` into register `reg`.
    pub fn payload(&mut self, base: u32, offset: u32, len: u32, reg: u32) -> &mut Self {
        self.expr("payload", |a| {
            a.be32(1, reg).be32(2, base).be32(3, offset).be32(4, len);
        })
    }
    /// Compares register `reg` with `data`.
    pub fn cmp(&mut self, reg: u32, op: u32, data: &[u8]) -> &mut Self {
        self.expr("cmp", |a| {
            a.be32(1, reg).be32(2, op).value(3, data);
        })
    }
    /// Matches when the key starting at register `reg` is in (or, with
    /// `absent`, is not in) set `name` created in the same batch as `id`.
    pub fn lookup(&mut self, name: &str, id: u32, reg: u32, absent: bool) -> &mut Self {
        self.expr("lookup", |a| {
            a.str(1, name).be32(2, reg).be32(4, id);
            if absent {
                a.be32(5, NFT_LOOKUP_F_INV);
            }
        })
    }
    /// Counts and drops.
    pub fn drop_counted(&mut self) -> &mut Self {
        self.counter().expr("immediate", |a| {
            a.be32(1, NFT_REG_VERDICT).nest(2, |d| {
                d.nest(2, |v| {
                    v.be32(1, NF_DROP);
                });
            });
        })
    }
    pub fn masquerade(&mut self) -> &mut Self {
        self.counter().expr("masq", |a| {
            a.be32(1, NF_NAT_RANGE_PROTO_RANDOM_FULLY);
        })
    }
}

pub struct Socket {
    fd: std::os::fd::OwnedFd,
    seq: u32,
    buf: Vec<u8>,
    /// Sequence numbers that asked for an ack.
    acks: Vec<(u32, &'static str)>,
}

impl Socket {
    pub fn open() -> Result<Self, NftError> {
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
            return Err(NftError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // Answers within 2 s, or an error rather than a hang.
        set_option(
            &fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            },
        );
        // Errors are acknowledged with their code only, not with the
        // whole request echoed (a set of thousands of elements is larger
        // than any receive buffer, and its error would be lost).
        set_option(&fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, &1i32);
        Ok(Socket {
            fd,
            seq: 1,
            buf: Vec::new(),
            acks: Vec::new(),
        })
    }

    pub fn push(
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

    pub fn nft(&mut self, msg: u16, flags: u16, attrs: &Attrs, what: &'static str) {
        self.nft_in(NFPROTO_IPV4, msg, flags, attrs, what);
    }

    /// An nftables message for a table of address family `family`.
    pub fn nft_in(&mut self, family: u8, msg: u16, flags: u16, attrs: &Attrs, what: &'static str) {
        self.push(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            family,
            0,
            attrs,
            what,
        );
    }

    pub fn batch(&mut self, kind: u16) {
        self.push(
            kind,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &Attrs::default(),
            "batch",
        );
    }

    /// Sends what was pushed.
    fn send(&mut self) -> Result<(), NftError> {
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
        self.buf.clear();
        if sent < 0 {
            return Err(NftError::Socket(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// One datagram of answers into `rx`; its length.
    fn recv(&self, rx: &mut [u8]) -> Result<usize, NftError> {
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
            return Err(NftError::Socket(io::Error::last_os_error()));
        }
        Ok(n as usize)
    }

    /// Sends what was pushed and waits for every ack; the first error wins.
    pub fn exchange(&mut self) -> Result<(), NftError> {
        self.send()?;
        let mut pending = std::mem::take(&mut self.acks);
        let mut rx = vec![0u8; 65536];
        while !pending.is_empty() {
            let n = self.recv(&mut rx)?;
            for (kind, seq, msg) in messages(&rx[..n]) {
                if kind == NLMSG_ERROR && msg.len() >= 20 {
                    let code = i32::from_ne_bytes(msg[16..20].try_into().expect("4 bytes"));
                    if let Some(pos) = pending.iter().position(|(s, _)| *s == seq) {
                        let (_, what) = pending.remove(pos);
                        if code != 0 {
                            return Err(NftError::Kernel {
                                what,
                                source: io::Error::from_raw_os_error(-code),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Socket {
    /// A dump request (`msg` of the nftables subsystem, every object of
    /// `family`, 0 for all): each answer's family and attributes.
    /// `filter`: attributes the kernel narrows the dump with (a rule dump
    /// takes the table and the chain).
    pub fn dump(
        &mut self,
        msg: u16,
        family: u8,
        filter: &Attrs,
    ) -> Result<Vec<(u8, Vec<u8>)>, NftError> {
        const NLM_F_DUMP: u16 = 0x300;
        const NLMSG_DONE: u16 = 3;
        self.push(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            0,
            filter,
            "dumping",
        );
        self.acks.clear();
        self.send()?;
        let mut out = Vec::new();
        let mut rx = vec![0u8; 1 << 16];
        loop {
            let n = self.recv(&mut rx)?;
            for (kind, _, msg) in messages(&rx[..n]) {
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR if msg.len() >= 20 => {
                        let code = i32::from_ne_bytes(msg[16..20].try_into().expect("4 bytes"));
                        if code != 0 {
                            return Err(NftError::Kernel {
                                what: "dumping",
                                source: io::Error::from_raw_os_error(-code),
                            });
                        }
                    }
                    _ if msg.len() >= 20 => out.push((msg[16], msg[20..].to_vec())),
                    _ => {}
                }
            }
        }
    }
}

/// The netlink messages in one received datagram: type, sequence number
/// and the whole message (header included). A truncated one ends the walk.
fn messages(rx: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let head = rx.get(off..off + 16)?;
        let len = u32::from_ne_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(head[4..6].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(head[8..12].try_into().expect("4 bytes"));
        let msg = rx.get(off..off + len).filter(|_| len >= 16)?;
        off += (len + 3) & !3;
        Some((kind, seq, msg))
    })
}

/// setsockopt(2) with a plain value; a refusal leaves the default.
fn set_option<T>(fd: &std::os::fd::OwnedFd, level: i32, name: i32, value: &T) {
    // SAFETY: `value` is a valid T of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as u32,
        );
    }
}

pub fn table_attrs(name: &str) -> Attrs {
    let mut a = Attrs::default();
    a.str(1, name);
    a
}

/// Deletes table `name`; absent is fine.
pub fn delete_table(family: u8, name: &str) -> Result<(), NftError> {
    let mut s = Socket::open()?;
    s.batch(NFNL_MSG_BATCH_BEGIN);
    s.nft_in(
        family,
        NFT_MSG_DELTABLE,
        0,
        &table_attrs(name),
        "deleting the table",
    );
    s.batch(NFNL_MSG_BATCH_END);
    match s.exchange() {
        Err(NftError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

/// Whether table `name` exists.
pub fn table_present(family: u8, name: &str) -> Result<bool, NftError> {
    let mut s = Socket::open()?;
    s.nft_in(
        family,
        NFT_MSG_GETTABLE,
        0,
        &table_attrs(name),
        "reading the table",
    );
    match s.exchange() {
        Ok(()) => Ok(true),
        Err(NftError::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

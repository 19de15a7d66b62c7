//! Choosing the uplink and the public IP, as Flannel does: `--iface`
//! entries (names or addresses) in order, else `--iface-regex` against
//! addresses and names, else the interface holding `--public-ip`, else the
//! interface of the default route.

use std::net::Ipv4Addr;

use anyhow::{anyhow, Context};

use crate::netlink::{Link, Netlink};

/// The uplink and the IP other nodes reach this one at. Without `ipv4`
/// (an IPv6-only cluster) the default route is the IPv6 one, and the IP is
/// Flannel's empty one (`0.0.0.0`) unless given.
pub async fn choose(
    nl: &Netlink,
    ifaces: &[String],
    regexes: &[String],
    public_ip: Option<Ipv4Addr>,
    ipv4: bool,
) -> anyhow::Result<(Link, Ipv4Addr)> {
    let links = nl.links().await?;
    let mut addrs = Vec::new();
    for l in &links {
        for a in nl.ipv4_addrs(l.index).await? {
            addrs.push((l.index, a.addr()));
        }
    }
    let (link, addr) = match pick(&links, &addrs, ifaces, regexes, public_ip)? {
        Some(found) => found,
        None => {
            let l = nl.default_route_link(!ipv4).await?;
            let a = first_addr(&addrs, &l);
            (l, a)
        }
    };
    if !ipv4 {
        return Ok((link, Ipv4Addr::UNSPECIFIED));
    }
    let ip = public_ip
        .or(addr)
        .ok_or_else(|| anyhow!("uplink {} has no IPv4 address; pass --public-ip", link.name))?;
    Ok((link, ip))
}

fn first_addr(addrs: &[(u32, Ipv4Addr)], l: &Link) -> Option<Ipv4Addr> {
    addrs.iter().find(|(i, _)| *i == l.index).map(|(_, a)| *a)
}

/// The flags' choice among `links` and their `addrs` (interface index,
/// address); `None` when the flags leave it to the default route.
fn pick(
    links: &[Link],
    addrs: &[(u32, Ipv4Addr)],
    ifaces: &[String],
    regexes: &[String],
    public_ip: Option<Ipv4Addr>,
) -> anyhow::Result<Option<(Link, Option<Ipv4Addr>)>> {
    let by_addr = |pred: &dyn Fn(&Ipv4Addr) -> bool| {
        addrs.iter().find(|(_, a)| pred(a)).and_then(|(i, a)| {
            links
                .iter()
                .find(|l| l.index == *i)
                .map(|l| (l.clone(), Some(*a)))
        })
    };
    let by_name = |pred: &dyn Fn(&str) -> bool| {
        links
            .iter()
            .find(|l| pred(&l.name))
            .map(|l| (l.clone(), first_addr(addrs, l)))
    };
    if !ifaces.is_empty() {
        let hit = ifaces
            .iter()
            .find_map(|want| match want.parse::<Ipv4Addr>() {
                Ok(ip) => by_addr(&|a| *a == ip),
                Err(_) => by_name(&|n| n == want),
            });
        return hit.map(Some).ok_or_else(|| {
            anyhow!("--iface: none of {ifaces:?} is an interface name or address on this node")
        });
    }
    if !regexes.is_empty() {
        for text in regexes {
            let re = regex::Regex::new(text).with_context(|| {
                format!("--iface-regex: {text:?} is not a valid regular expression")
            })?;
            if let Some(hit) =
                by_addr(&|a| re.is_match(&a.to_string())).or_else(|| by_name(&|n| re.is_match(n)))
            {
                return Ok(Some(hit));
            }
        }
        return Err(anyhow!(
            "--iface-regex: no interface name or address matches {regexes:?}"
        ));
    }
    Ok(public_ip.and_then(|ip| by_addr(&|a| *a == ip)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link::plain(index, name)
    }

    #[test]
    fn flags_choose_as_flannel_does() {
        let links = [link(1, "lo"), link(2, "eth0"), link(3, "eth1")];
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let addrs = [
            (1, ip("127.0.0.1")),
            (2, ip("10.0.0.5")),
            (3, ip("172.30.0.1")),
            (3, ip("172.30.0.2")),
        ];
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        type Want = Result<Option<(&'static str, Option<&'static str>)>, &'static str>;
        type Row<'a> = (&'a [&'a str], &'a [&'a str], Option<&'a str>, Want);
        let table: [Row; 9] = [
            (&[], &[], None, Ok(None)),
            (&["eth1"], &[], None, Ok(Some(("eth1", Some("172.30.0.1"))))),
            (
                &["172.30.0.2"],
                &[],
                None,
                Ok(Some(("eth1", Some("172.30.0.2")))),
            ),
            // The first entry that exists wins.
            (
                &["eth9", "eth0"],
                &[],
                None,
                Ok(Some(("eth0", Some("10.0.0.5")))),
            ),
            (&["eth9"], &[], None, Err("--iface")),
            // Addresses are tried before names.
            (
                &[],
                &["^172\\.30\\."],
                None,
                Ok(Some(("eth1", Some("172.30.0.1")))),
            ),
            (&[], &["^eth0$"], None, Ok(Some(("eth0", Some("10.0.0.5"))))),
            (&[], &["("], None, Err("not a valid regular expression")),
            (
                &[],
                &[],
                Some("10.0.0.5"),
                Ok(Some(("eth0", Some("10.0.0.5")))),
            ),
        ];
        for (ifaces, regexes, public, want) in table {
            let got = pick(&links, &addrs, &s(ifaces), &s(regexes), public.map(ip));
            let row = format!("{ifaces:?} {regexes:?} {public:?}");
            match want {
                Ok(w) => {
                    let got = got.unwrap_or_else(|e| panic!("{row}: {e:#}"));
                    assert_eq!(
                        got.map(|(l, a)| (l.name, a)),
                        w.map(|(n, a)| (n.to_string(), a.map(ip))),
                        "{row}"
                    );
                }
                Err(text) => {
                    let err = format!("{:#}", got.expect_err(&row));
                    assert!(err.contains(text), "{row}: {err}");
                }
            }
        }
    }
}

//! `flannel-agent inspect`: the desired and the observed state side by
//! side, object by object, with every disagreement spelled out. Pure, like
//! the diff it leans on for the devices and for what the next pass would
//! change.

use ipnet::IpNet;

use flannel_common::REMOTE_F_DIRECT;

use super::{
    desired::Desired,
    diff::{diff, DeviceOp, Op},
    observe::{Entries, Observed},
};
use crate::{
    api::{Check, Inspect, PodCheck, RemoteCheck, Status},
    datapath::ebpf::key_ip,
    mac::MacAddr,
    netlink::Remote,
};

/// The comparison; `node` and `counters` are passed through.
pub fn inspect(
    node: Status,
    want: &Desired,
    have: &Observed,
    counters: std::collections::BTreeMap<String, u64>,
) -> Inspect {
    let ops = diff(want, have);
    let device = |name: &str, wrong: bool| Check {
        name: name.to_string(),
        problems: if wrong {
            vec!["not as configured: the next pass sets it up again".to_string()]
        } else {
            Vec::new()
        },
    };
    let mut devices = vec![device(
        &want.bridge.name,
        ops.iter()
            .any(|o| matches!(o, Op::Device(DeviceOp::Bridge(_)))),
    )];
    for vtep in [&want.vtep, &want.vtep6].into_iter().flatten() {
        devices.push(device(
            &vtep.link.name,
            ops.iter().any(
                |o| matches!(o, Op::Device(DeviceOp::Vtep(v)) if v.link.name == vtep.link.name),
            ),
        ));
    }
    let remotes = want
        .remotes
        .values()
        .map(|r| {
            let mut c = vxlan_check(r, have.vtep.as_ref());
            if let (Some(maps), Some(seen)) = (&want.maps, &have.maps) {
                let entry = seen.remotes.get(&r.subnet);
                c.map = entry.map(|e| format!("{} {}", key_ip(e.node_ip), MacAddr(e.vtep_mac)));
                c.map_vtep = Some(seen.vteps.contains(&r.public_ip));
                map_problems(&mut c, entry != maps.remotes.get(&r.subnet));
            }
            c
        })
        .chain(want.remotes6.values().map(|r| {
            let mut c = vxlan_check(r, have.vtep6.as_ref());
            if let (Some(maps), Some(seen)) = (&want.maps, &have.maps) {
                let entry = seen.remotes6.get(&r.subnet);
                c.map = entry.map(|e| {
                    let ip = std::net::Ipv6Addr::from(e.node_ip6);
                    format!("{ip} {}", MacAddr(e.vtep_mac))
                });
                c.map_vtep = Some(seen.vteps6.contains(&r.public_ip));
                map_problems(&mut c, entry != maps.remotes6.get(&r.subnet));
            }
            c
        }))
        .chain(want.direct.values().map(|d| {
            let mut c = RemoteCheck {
                subnet: d.subnet.to_string(),
                public_ip: d.via.to_string(),
                direct: true,
                ..Default::default()
            };
            match &have.uplink_routes {
                None => c.problems.push("kernel routes could not be read".into()),
                Some(routes) => {
                    c.route = routes.contains(&(d.subnet, d.via));
                    if !c.route {
                        c.problems
                            .push(format!("kernel: no route via {} on the uplink", d.via));
                    }
                }
            }
            if let (Some(maps), Some(seen)) = (&want.maps, &have.maps) {
                let how = |flags: u8, mac: [u8; 6]| {
                    if flags & REMOTE_F_DIRECT != 0 {
                        "direct".to_string()
                    } else {
                        MacAddr(mac).to_string()
                    }
                };
                let (seen_entry, wanted) = match d.subnet {
                    IpNet::V4(subnet) => {
                        let e = seen.remotes.get(&subnet);
                        (
                            e.map(|e| {
                                format!("{} {}", key_ip(e.node_ip), how(e.flags, e.vtep_mac))
                            }),
                            e == maps.remotes.get(&subnet),
                        )
                    }
                    IpNet::V6(subnet) => {
                        let e = seen.remotes6.get(&subnet);
                        (
                            e.map(|e| {
                                let ip = std::net::Ipv6Addr::from(e.node_ip6);
                                format!("{ip} {}", how(e.flags, e.vtep_mac))
                            }),
                            e == maps.remotes6.get(&subnet),
                        )
                    }
                };
                c.map = seen_entry;
                if !wanted {
                    c.problems.push(format!(
                        "map: entry is {}, the lease says {} direct",
                        c.map.as_deref().unwrap_or("missing"),
                        c.public_ip
                    ));
                }
            }
            c
        }))
        .collect();
    let pods = want
        .pods
        .values()
        .map(|p| {
            let link = have.links.get(&p.host_ifname);
            let mut c = PodCheck {
                ip: p.key().map_or_else(String::new, |k| k.to_string()),
                mac: p.mac.to_string(),
                host_ifname: p.host_ifname.clone(),
                ifindex: link.map(|l| l.index),
                program: "-".into(),
                ..Default::default()
            };
            if link.is_none() {
                c.problems.push("host interface is gone".into());
            }
            if let (Some(_), Some(seen)) = (&want.maps, &have.maps) {
                let entry = match (p.ip, p.ip6) {
                    (Some(ip), _) => seen.endpoints.get(&ip),
                    (None, Some(ip6)) => seen.endpoints6.get(&ip6),
                    (None, None) => None,
                };
                c.map = entry.map(|e| format!("ifindex {} {}", e.host_ifindex, MacAddr(e.pod_mac)));
                if entry.map(|e| (Some(e.host_ifindex), e.pod_mac)) != Some((c.ifindex, p.mac.0)) {
                    c.problems.push(format!(
                        "map: entry is {}",
                        c.map.as_deref().unwrap_or("missing")
                    ));
                }
                c.program = match c.ifindex.and_then(|i| seen.pod_links.get(&i)) {
                    Some(true) => "attached",
                    Some(false) => "pinned by an earlier agent",
                    None => "missing",
                }
                .into();
                if c.program != "attached" {
                    c.problems.push(format!("tc_from_pod: {}", c.program));
                }
            }
            c
        })
        .collect();
    let ignored = want
        .ignored
        .iter()
        .map(|(subnet, i)| Check {
            name: format!("{subnet} (node {})", i.node),
            problems: vec![i.why.clone()],
        })
        .collect();
    Inspect {
        node,
        devices,
        remotes,
        pods,
        ignored,
        pending: ops.iter().map(Op::to_string).collect(),
        counters,
    }
}

/// A VXLAN remote of either family beside its VXLAN device's entries
/// (`None`: they could not be read): the onlink route, the neighbour for
/// its gateway and the FDB entry to its node.
fn vxlan_check<R: Remote>(r: &R, entries: Option<&Entries<R::Net, R::Addr>>) -> RemoteCheck {
    let mut c = RemoteCheck {
        subnet: r.subnet().to_string(),
        public_ip: r.public().to_string(),
        vtep_mac: r.vtep_mac().to_string(),
        ..Default::default()
    };
    let Some(e) = entries else {
        c.problems.push("kernel entries could not be read".into());
        return c;
    };
    c.route = e.routes.contains(&(r.subnet(), true));
    c.neighbour = e.neighbours.get(&r.gateway()).map(MacAddr::to_string);
    let fdb: Vec<String> = e
        .fdb
        .iter()
        .filter(|(m, _)| *m == r.vtep_mac())
        .filter_map(|(_, d)| d.map(|d| d.to_string()))
        .collect();
    c.fdb = (!fdb.is_empty()).then(|| fdb.join(","));
    if !c.route {
        c.problems.push("kernel: no onlink route".into());
    }
    if c.neighbour.as_deref() != Some(c.vtep_mac.as_str()) {
        c.problems.push(format!(
            "kernel: neighbour {} is {}, the lease says {}",
            r.gateway(),
            c.neighbour.as_deref().unwrap_or("missing"),
            c.vtep_mac
        ));
    }
    if !e.fdb.contains(&(r.vtep_mac(), Some(r.public()))) {
        c.problems.push(format!(
            "kernel: FDB sends {} to {}, the lease says {}",
            c.vtep_mac,
            c.fdb.as_deref().unwrap_or("nowhere"),
            c.public_ip
        ));
    }
    c
}

/// The map's problems for a VXLAN remote: its entry differs from the
/// lease's (`wrong`), or its node is not a known VTEP.
fn map_problems(c: &mut RemoteCheck, wrong: bool) {
    if wrong {
        c.problems.push(format!(
            "map: entry is {}, the lease says {} {}",
            c.map.as_deref().unwrap_or("missing"),
            c.public_ip,
            c.vtep_mac
        ));
    }
    if c.map_vtep == Some(false) {
        c.problems
            .push(format!("map: {} is not a known VTEP", c.public_ip));
    }
}

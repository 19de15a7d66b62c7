//! Runs the diff's operations against the kernel (rtnetlink, nftables)
//! and the BPF maps. Devices go first and one at a time; each remote's
//! neighbour, FDB entry and route go in Flannel's order, but different
//! remotes are independent, so their requests are in flight together
//! rather than one netlink round trip after another. Every operation is
//! tried; each failure is logged naming its object and reported.

use std::collections::BTreeMap;

use super::{
    desired::{GuardSpec, MasqSpec},
    diff::{DeviceOp, DirectOp, MapOp, MasqOp, Op, VtepOp},
};
use crate::{
    datapath::ebpf::{Datapath, EbpfError},
    masq,
    netlink::{Netlink, Remote, RemoteEntry6},
};
use ipnet::IpNet;

/// What the operations run against.
pub struct Target<'a> {
    pub nl: &'a Netlink,
    /// `None` on the kernel data path.
    pub dp: Option<&'a mut Datapath>,
    /// The VTEP device's index as observed; ensuring the device replaces
    /// it (with `None` when that fails).
    pub vtep: Option<u32>,
    /// The same for `flannel-v6.<VNI>`.
    pub vtep6: Option<u32>,
    /// What this process last wrote to the masquerade table (the table's
    /// contents are not read back).
    pub masq_written: &'a mut Option<MasqSpec>,
    /// What this process last wrote to the guard tables.
    pub guard_written: &'a mut Option<GuardSpec>,
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct Report {
    /// Operations done, by [`Op::kind`].
    pub done: BTreeMap<&'static str, usize>,
    /// Operations that failed, with the error.
    pub failed: Vec<(Op, String)>,
    /// Pods whose records are to go (their interface is gone).
    pub forgotten: Vec<std::net::IpAddr>,
}

impl Report {
    fn record<E: std::fmt::Display>(&mut self, op: Op, result: Result<(), E>) {
        match result {
            Ok(()) => *self.done.entry(op.kind()).or_default() += 1,
            Err(err) => {
                tracing::warn!(kind = op.kind(), err = %err, "{op}: failed");
                self.failed.push((op, err.to_string()));
            }
        }
    }
}

/// Netlink requests kept in flight at once: enough to hide the round
/// trips, few enough not to fill the socket's buffers.
const NETLINK_IN_FLIGHT: usize = 64;

pub async fn apply(ops: Vec<Op>, t: Target<'_>) -> Report {
    let Target {
        nl,
        mut dp,
        mut vtep,
        mut vtep6,
        masq_written,
        guard_written,
    } = t;
    let mut report = Report::default();
    // Each remote's three entries go together; all programs before any
    // delete, then routes, neighbours and FDB entries.
    let mut stages: [Vec<VtepOp>; 4] = Default::default();
    let mut stages6: [Vec<VtepOp<RemoteEntry6>>; 4] = Default::default();
    let (mut masq_ops, mut map_ops, mut guard_ops) = (Vec::new(), Vec::new(), Vec::new());
    // Direct routes: deletes before the VTEP's entries, adds after (the
    // diff's order; see `diff`).
    let (mut direct_deletes, mut direct_adds) = (Vec::new(), Vec::new());
    for op in ops {
        match op {
            Op::Device(d) => {
                let r = match &d {
                    DeviceOp::Bridge(b) => nl
                        .ensure_bridge(&b.name, b.gateway, b.gateway6, b.mtu, b.mac)
                        .await
                        .map(drop),
                    // The entries below go on the device as it is now;
                    // none go on one that could not be put in order.
                    DeviceOp::Vtep(v) => {
                        let r = nl.ensure_vxlan(&v.link, v.addr).await;
                        let index = r.as_ref().ok().map(|link| link.index);
                        match v.addr {
                            IpNet::V4(_) => vtep = index,
                            IpNet::V6(_) => vtep6 = index,
                        }
                        r.map(drop)
                    }
                };
                let op = Op::Device(d);
                if r.is_ok() {
                    tracing::info!("{op}: done");
                }
                report.record(op, r);
            }
            Op::Vtep(v) => stages[stage(&v)].push(v),
            Op::Vtep6(v) => stages6[stage(&v)].push(v),
            Op::Direct(d @ DirectOp::Delete { .. }) => direct_deletes.push(d),
            Op::Direct(d @ DirectOp::Route(_)) => direct_adds.push(d),
            Op::Masq(m) => masq_ops.push(m),
            Op::Guard(g) => guard_ops.push(g),
            Op::Map(m) => map_ops.push(m),
            Op::ForgetPod(ip) => {
                report.forgotten.push(ip);
                report.record(op, Ok::<(), String>(()));
            }
        }
    }
    direct(nl, direct_deletes, &mut report).await;
    let programmed = stages[0].len() + stages6[0].len();
    let removed: usize = stages[1..]
        .iter()
        .map(Vec::len)
        .chain(stages6[1..].iter().map(Vec::len))
        .sum();
    for stage in stages {
        concurrently(nl, vtep, stage, Op::Vtep, &mut report).await;
    }
    for stage in stages6 {
        concurrently(nl, vtep6, stage, Op::Vtep6, &mut report).await;
    }
    if programmed + removed > 0 {
        tracing::info!(
            programmed,
            removed,
            "kernel routes, neighbours and FDB updated"
        );
    }
    direct(nl, direct_adds, &mut report).await;
    for m in masq_ops {
        let r = match m {
            MasqOp::Install(spec) => masq::ensure(spec.v4, spec.v6).map(|()| {
                *masq_written = Some(spec);
            }),
            MasqOp::Remove => masq::remove().map(|()| *masq_written = None),
            MasqOp::RemoveCni => masq::pod_remove(),
        };
        report.record(Op::Masq(m), r);
    }
    for g in guard_ops {
        let r = crate::guard::ensure(
            g.port,
            &g.vteps,
            g.vteps6.as_ref(),
            g.pods.as_ref(),
            &g.pods6,
        );
        if r.is_ok() {
            *guard_written = Some(g.clone());
        }
        report.record(Op::Guard(g), r);
    }
    let mut remotes = [0usize; 4];
    for m in map_ops {
        match m {
            MapOp::PutRemote(..) | MapOp::PutRemote6(..) => remotes[0] += 1,
            MapOp::DeleteRemote(_) | MapOp::DeleteRemote6(_) => remotes[1] += 1,
            MapOp::PutVtep(_) | MapOp::PutVtep6(_) => remotes[2] += 1,
            MapOp::DeleteVtep(_) | MapOp::DeleteVtep6(_) => remotes[3] += 1,
            _ => {}
        }
        let r = match dp.as_deref_mut() {
            Some(dp) => on_maps(dp, &m).map_err(|e| e.to_string()),
            None => Err("the eBPF data path is not running".to_string()),
        };
        report.record(Op::Map(m), r);
    }
    if remotes != [0; 4] {
        tracing::info!(
            set = remotes[0],
            removed = remotes[1],
            vteps_set = remotes[2],
            vteps_removed = remotes[3],
            "remote subnets updated"
        );
    }
    report
}

/// Each remote's three entries go together; all programs before any
/// delete, then routes, neighbours and FDB entries.
fn stage<R: Remote>(op: &VtepOp<R>) -> usize {
    match op {
        VtepOp::Program(_) => 0,
        VtepOp::DeleteRoute(_) => 1,
        VtepOp::DeleteNeighbour(_) => 2,
        VtepOp::DeleteFdb { .. } => 3,
    }
}

/// Runs operations on the VTEP `vtep` (`None`: it is not in order, and
/// each fails saying so), up to [`NETLINK_IN_FLIGHT`] at a time; every
/// one is tried.
async fn concurrently<R: Remote>(
    nl: &Netlink,
    vtep: Option<u32>,
    ops: Vec<VtepOp<R>>,
    wrap: fn(VtepOp<R>) -> Op,
    report: &mut Report,
) {
    use futures::StreamExt;
    let Some(vtep) = vtep else {
        for v in ops {
            report.record(wrap(v), Err("the VXLAN device is not in order"));
        }
        return;
    };
    let mut results = futures::stream::iter(ops)
        .map(|op| async move {
            let r = match op {
                VtepOp::Program(r) => nl.program_remote(vtep, &r).await,
                VtepOp::DeleteRoute(dst) => nl.delete_route(vtep, dst).await,
                VtepOp::DeleteNeighbour(ip) => nl.delete_neighbour(vtep, ip).await,
                VtepOp::DeleteFdb { mac, dst } => nl.delete_fdb(vtep, mac, dst).await,
            };
            (op, r)
        })
        .buffer_unordered(NETLINK_IN_FLIGHT);
    while let Some((op, r)) = results.next().await {
        report.record(wrap(op), r);
    }
}

fn on_maps(dp: &mut Datapath, op: &MapOp) -> Result<(), EbpfError> {
    match op {
        MapOp::SetConfig(cfg) => dp.set_config(cfg),
        MapOp::PutRemote(net, node) => dp.put_remote(*net, node),
        MapOp::DeleteRemote(net) => dp.remove_remote(*net),
        MapOp::PutSlot(slot, node) => dp.put_lease_slot(*slot, node),
        MapOp::ClearSlot(slot) => dp.clear_lease_slot(*slot),
        MapOp::PutRemote6(net, node) => dp.put_remote6(*net, node),
        MapOp::DeleteRemote6(net) => dp.remove_remote6(*net),
        MapOp::PutVtep(ip) => dp.put_vtep(*ip),
        MapOp::DeleteVtep(ip) => dp.remove_vtep(*ip),
        MapOp::PutVtep6(ip) => dp.put_vtep6(*ip),
        MapOp::DeleteVtep6(ip) => dp.remove_vtep6(*ip),
        MapOp::AttachPod { ifname, ifindex } => dp.attach_pod(ifname, *ifindex),
        MapOp::PutEndpoint(ip, ep) => dp.put_endpoint(*ip, ep),
        MapOp::DeleteEndpoint(ip) => dp.remove_endpoint(*ip),
        MapOp::PutEndpoint6(ip, ep) => dp.put_endpoint6(*ip, ep),
        MapOp::DeleteEndpoint6(ip) => dp.remove_endpoint6(*ip),
        MapOp::DetachPod(index) => {
            dp.detach_pod(*index);
            Ok(())
        }
    }
}

/// Direct routes, each request in flight with the others.
async fn direct(nl: &Netlink, ops: Vec<DirectOp>, report: &mut Report) {
    use futures::StreamExt;
    let n = ops.len();
    let mut results = futures::stream::iter(ops)
        .map(|d| async move {
            let r = match d {
                DirectOp::Route(r) => nl.add_route_via(r.uplink, r.subnet, r.via).await,
                DirectOp::Delete { subnet, uplink } => nl.delete_route(uplink, subnet).await,
            };
            (d, r)
        })
        .buffer_unordered(NETLINK_IN_FLIGHT);
    while let Some((d, r)) = results.next().await {
        report.record(Op::Direct(d), r);
    }
    if n > 0 {
        tracing::info!(routes = n, "direct routes updated");
    }
}

//! The `flannel` CNI plugin: wires a pod onto `cni0` the way Flannel's
//! plugin and the reference `bridge` plugin do together, with the
//! interface work done natively over netlink, addresses from the IPAM
//! plugin named in the config (host-local by default), and the pod
//! registered with the node's agent (BPF endpoint map, TC program on the
//! host veth) before ADD returns.
//!
//! * [`spec`]: versions, errors, results; [`conf`]: the network config;
//! * [`ipam`]: running the IPAM plugin; [`record`]: per-attachment state;
//! * [`install`]: the agent's install of the binary and conflist.

pub mod conf;
pub mod install;
pub mod ipam;
pub mod record;
pub mod spec;

use std::{collections::HashSet, io::Read, net::Ipv4Addr, path::Path};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{json, Value};

use crate::{
    api::{self, ClientError, Request},
    mac::MacAddr,
    masq,
    netlink::{Link, Netlink, NetlinkError},
    subnet::env::SubnetEnv,
};
use conf::NetConf;
use ipam::Ipam;
use record::Record;
use spec::{
    at_least, code, CniEnv, CniError, CniOutput, CniResult, Interface, IpConfig, IpConfig6, Route,
    Route6,
};

fn log(msg: impl std::fmt::Display) {
    eprintln!("flannel-cni: {msg}");
}

/// The plugin's entry point: reads the environment and stdin, prints the
/// result or the error object, returns the exit code.
pub fn main() -> i32 {
    let env = CniEnv::from_env();
    let mut stdin = Vec::new();
    // SAFETY: isatty only inspects fd 0.
    if unsafe { libc::isatty(0) } == 0 {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let (code, out) = handle(&env, &stdin);
    if let Some(out) = out {
        println!("{out}");
    }
    code
}

/// One invocation: (exit code, what goes to stdout).
pub fn handle(env: &CniEnv, stdin: &[u8]) -> (i32, Option<Value>) {
    // Errors are reported in the config's version when it can be read.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .filter(|v| spec::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| spec::LATEST.to_string());
    match run(env, stdin) {
        Ok(out) => (0, out),
        Err(e) => {
            log(format_args!(
                "{} {} {}: {e}",
                env.command, env.container_id, env.ifname
            ));
            (1, Some(e.to_json(&version)))
        }
    }
}

fn run(env: &CniEnv, stdin: &[u8]) -> CniResult<Option<Value>> {
    let cmd = env.command.as_str();
    match cmd {
        "VERSION" => return Ok(Some(spec::version_info())),
        "ADD" | "DEL" | "CHECK" | "STATUS" | "GC" => {}
        "" => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
            ))
        }
    }
    let conf = NetConf::parse(stdin)?;
    let needs = |min: &str| {
        if at_least(&conf.cni_version, min) {
            Ok(())
        } else {
            Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "config version {} does not allow {cmd} (needs {min} or later)",
                    conf.cni_version
                ),
            ))
        }
    };
    match cmd {
        "CHECK" => needs("0.4.0")?,
        "STATUS" | "GC" => needs("1.1.0")?,
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::io("starting the plugin's runtime", e))?;
    rt.block_on(async {
        match cmd {
            "ADD" => add(env, &conf).await.map(Some),
            "DEL" => del(env, &conf).await.map(|_| None),
            "CHECK" => check(env, &conf).await.map(|_| None),
            "STATUS" => status(env, &conf).map(|_| None),
            _ => gc(env, &conf).await.map(|_| None),
        }
    })
}

fn nl_err(what: &str) -> impl FnOnce(NetlinkError) -> CniError + '_ {
    move |e| CniError::io(what.to_string(), e)
}

fn open_netns(path: &str) -> CniResult<std::fs::File> {
    std::fs::File::open(path).map_err(|e| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("network namespace {path:?} cannot be opened"),
        )
        .details(e)
    })
}

async fn pod_netlink(path: &str) -> CniResult<(std::fs::File, Netlink)> {
    let ns = open_netns(path)?;
    let nl = Netlink::connect_in(&ns, path).map_err(|e| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("{path:?} is not a usable network namespace"),
        )
        .details(e)
    })?;
    Ok((ns, nl))
}

fn host_netlink() -> CniResult<Netlink> {
    Netlink::connect().map_err(|e| CniError::io("opening netlink", e))
}

/// The IPAM plugin for `conf`, with its stdin built from subnet.env.
fn ipam_for<'a>(env: &'a CniEnv, conf: &NetConf, senv: &SubnetEnv) -> CniResult<Ipam<'a>> {
    let plugin = ipam::find_plugin(&env.path, &conf.ipam_type())?;
    let mut stdin = conf.ipam_stdin(&conf.cni_version, &conf.ipam_config(senv));
    if let Some(o) = stdin.as_object_mut() {
        o.remove("prevResult");
    }
    Ok(Ipam {
        plugin,
        env,
        stdin: stdin.as_object().cloned().unwrap_or_default(),
    })
}

/// The IPAM plugin as ADD ran it, from the attachment's record.
fn ipam_replay<'a>(env: &'a CniEnv, rec: &Record) -> CniResult<Ipam<'a>> {
    Ok(Ipam {
        plugin: ipam::find_plugin(&env.path, &rec.ipam_type)?,
        env,
        stdin: rec.ipam.clone(),
    })
}

/// `cni0`: created as the agent creates it when missing; when present, a
/// bridge that gets the gateway address if it lacks it. Anything else by
/// that name is an error, never replaced. `gateway` is `None` in an
/// IPv6-only cluster, where `gateway6` names the bridge's MAC as the
/// agent does (the IPv6 address itself is added by the caller).
async fn pod_bridge(
    nl: &Netlink,
    name: &str,
    gateway: Option<Ipv4Net>,
    gateway6: Option<std::net::Ipv6Addr>,
    mtu: u32,
) -> CniResult<Link> {
    let mac = MacAddr::for_bridge_of(gateway.map(|g| g.addr()), gateway6);
    match nl
        .link_by_name(name)
        .await
        .map_err(nl_err("reading the bridge"))?
    {
        None => nl
            .ensure_bridge(name, gateway, None, mtu, mac)
            .await
            .map_err(nl_err("creating the bridge")),
        Some(l) if l.kind == Some(netlink_packet_route::link::InfoKind::Bridge) => {
            let addrs = nl
                .ipv4_addrs(l.index)
                .await
                .map_err(nl_err("reading the bridge's addresses"))?;
            if let Some(gateway) = gateway.filter(|g| !addrs.iter().any(|a| a.addr() == g.addr())) {
                nl.add_addr(l.index, gateway)
                    .await
                    .map_err(nl_err("adding the gateway address"))?;
            }
            if !l.up {
                nl.set_up(l.index)
                    .await
                    .map_err(nl_err("bringing the bridge up"))?;
            }
            Ok(l)
        }
        Some(_) => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("{name} exists and is not a bridge"),
        )
        .details("remove or rename that interface, or name another bridge in delegate.bridge")),
    }
}

/// What ADD did so far, for the rollback of a failed ADD.
struct Teardown<'a> {
    env: &'a CniEnv,
    conf: &'a NetConf,
    host_ifname: String,
    /// The pod's name with the agent (`EndpointRecord::key`).
    ip: Option<std::net::IpAddr>,
    ipam: Option<Ipam<'a>>,
}

impl Teardown<'_> {
    /// Undoes an attachment; every step tolerates what is already gone.
    /// The address is released last, once nothing uses it.
    async fn run(mut self, host: &Netlink) -> CniResult<()> {
        let (id, ifname) = (&self.env.container_id, &self.env.ifname);
        // First mark the record, so that an agent reading records while
        // this runs does not register the pod again.
        if let Ok(Some(mut rec)) = Record::load(&self.conf.data_dir, id, ifname) {
            if !rec.deleting {
                rec.deleting = true;
                rec.save(&self.conf.data_dir)
                    .map_err(|e| CniError::io("marking the attachment record", e))?;
            }
        }
        if let Some(ip) = self.ip {
            match api::call(&self.conf.agent_socket, &Request::Del { ip }) {
                Ok(_) => {}
                Err(e) => log(format_args!(
                    "{id}: agent not told that pod {ip} is gone ({e}); it notices on its own"
                )),
            }
        }
        host.delete_link_by_name(&self.host_ifname)
            .await
            .map_err(nl_err("deleting the host veth"))?;
        if let Some(ipam) = self.ipam.as_mut() {
            ipam.run("DEL", id, ifname)?;
        }
        record::remove(&self.conf.data_dir, id, ifname)
            .map_err(|e| CniError::io("removing the attachment record", e))
    }
}

async fn add(env: &CniEnv, conf: &NetConf) -> CniResult<Value> {
    env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"])?;
    let senv = conf.subnet_env()?;
    let (ns, pod) = pod_netlink(&env.netns).await?;
    if pod
        .link_by_name(&env.ifname)
        .await
        .map_err(nl_err("reading the container's interfaces"))?
        .is_some()
    {
        return Err(CniError::new(
            code::INTERFACE_EXISTS,
            format!(
                "container interface {} already exists in {}",
                env.ifname, env.netns
            ),
        )
        .details("ADD ran before for this container and interface; DEL it first"));
    }
    let host = host_netlink()?;
    let mut ipam = ipam_for(env, conf, &senv)?;
    let res = ipam.run("ADD", &env.container_id, &env.ifname)?;
    let ipres = match CniOutput::from_json(&res.unwrap_or(Value::Null)) {
        Ok(r) => r,
        Err(e) => {
            // An answer we cannot read may still have reserved an address.
            let _ = ipam.run("DEL", &env.container_id, &env.ifname);
            return Err(e);
        }
    };
    let host_ifname = record::host_ifname(&env.container_id, &env.ifname);
    // An IPv4 address in a cluster with IPv4 (subnet.env has its pair), an
    // IPv6 one in an IPv6-only cluster.
    let ipc = ipres.ips.first().cloned();
    let missing = match (&ipc, senv.network, ipres.ips6.first()) {
        (None, Some(_), _) => Some(("IPv4", "an IPv4 range")),
        (None, None, None) => Some(("IPv6", "an IPv6 range")),
        _ => None,
    };
    if let Some((family, range)) = missing {
        let undo = Teardown {
            env,
            conf,
            host_ifname,
            ip: None,
            ipam: Some(ipam),
        };
        let _ = undo.run(&host).await;
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "IPAM plugin {} returned no {family} address",
                conf.ipam_type()
            ),
        )
        .details(format!("give it {range} (ipam.ranges or ipam.subnet)")));
    }
    let key = ipc
        .as_ref()
        .map(|c| std::net::IpAddr::V4(c.address.addr()))
        .or(ipres
            .ips6
            .first()
            .map(|c| std::net::IpAddr::V6(c.address.addr())));
    let wired = wire(
        env,
        conf,
        &senv,
        &ns,
        &pod,
        &host,
        &ipam,
        &ipres,
        ipc.as_ref(),
    )
    .await;
    match wired {
        Ok(out) => Ok(out.to_json(&conf.cni_version)),
        Err(e) => {
            let undo = Teardown {
                env,
                conf,
                host_ifname,
                ip: key,
                ipam: Some(ipam),
            };
            if let Err(u) = undo.run(&host).await {
                log(format_args!("rolling back a failed ADD: {u}"));
            }
            Err(e)
        }
    }
}

/// Everything ADD does after IPAM; the caller rolls back on error.
#[allow(clippy::too_many_arguments)]
async fn wire(
    env: &CniEnv,
    conf: &NetConf,
    senv: &SubnetEnv,
    ns: &std::fs::File,
    pod: &Netlink,
    host: &Netlink,
    ipam: &Ipam<'_>,
    ipres: &CniOutput,
    ipc: Option<&IpConfig>,
) -> CniResult<CniOutput> {
    use std::os::fd::AsRawFd;
    let mtu = conf.mtu(senv);
    // Each family's gateway: the one IPAM gave, or subnet.env's.
    let gateway = ipc
        .map(|c| gateway_of(c.gateway, senv.subnet.map(|s| s.addr()), "IPv4"))
        .transpose()?;
    let gw_net = match (gateway, ipc) {
        (Some(gateway), Some(ipc)) => Some(
            Ipv4Net::new(gateway, ipc.address.prefix_len())
                .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("gateway: {e}")))?,
        ),
        _ => None,
    };
    let ip6 = ipres.ips6.first().cloned();
    let gateway6 = ip6
        .as_ref()
        .map(|c| gateway_of(c.gateway, senv.ipv6_subnet.map(|s| s.addr()), "IPv6"))
        .transpose()?;
    let bridge = pod_bridge(host, conf.bridge(), gw_net, gateway6, mtu).await?;
    let host_ifname = record::host_ifname(&env.container_id, &env.ifname);
    let made = host
        .add_veth(&host_ifname, &env.ifname, ns.as_raw_fd(), mtu, bridge.index)
        .await;
    if made.as_ref().err().and_then(NetlinkError::errno) == Some(libc::EEXIST) {
        // A leftover of an earlier, interrupted ADD of this attachment
        // (the container side was checked to be free).
        host.delete_link_by_name(&host_ifname)
            .await
            .map_err(nl_err("removing a stale host veth"))?;
        log(format_args!("removed stale {host_ifname}"));
        host.add_veth(&host_ifname, &env.ifname, ns.as_raw_fd(), mtu, bridge.index)
            .await
            .map_err(nl_err("creating the veth pair"))?;
    } else {
        made.map_err(nl_err("creating the veth pair"))?;
    }
    let hlink = host
        .require_link(&host_ifname)
        .await
        .map_err(nl_err("reading the host veth"))?;
    if conf.delegate.hairpin_mode {
        host.set_hairpin(hlink.index)
            .await
            .map_err(nl_err("setting hairpin mode"))?;
    }
    let plink = pod
        .require_link(&env.ifname)
        .await
        .map_err(nl_err("reading the container interface"))?;
    if let Some(ipc) = ipc {
        pod.add_addr(plink.index, ipc.address)
            .await
            .map_err(nl_err("addressing the container interface"))?;
    }
    pod.set_up(plink.index)
        .await
        .map_err(nl_err("bringing the container interface up"))?;
    let mut routes: Vec<Route> = Vec::new();
    if let Some(gateway) = gateway {
        routes = ipres
            .routes
            .iter()
            .map(|r| Route {
                dst: r.dst,
                gw: Some(r.gw.unwrap_or(gateway)),
            })
            .collect();
        if conf.delegate.is_default_gateway && !routes.iter().any(|r| r.dst.prefix_len() == 0) {
            routes.push(Route {
                dst: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid"),
                gw: Some(gateway),
            });
        }
    }
    for r in &routes {
        pod.add_route(plink.index, r.dst, r.gw)
            .await
            .map_err(nl_err("adding a container route"))?;
    }
    // Dual-stack or IPv6-only: the IPv6 address IPAM gave, and the IPv6
    // routes (the IPv6 network's, and a default one with
    // isDefaultGateway) via the bridge's IPv6 gateway.
    let mut routes6 = Vec::new();
    if let (Some(c6), Some(gw6)) = (&ip6, gateway6) {
        let gw_net6 = Ipv6Net::new(gw6, c6.address.prefix_len())
            .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("IPv6 gateway: {e}")))?;
        let have = host
            .ipv6_addrs(bridge.index)
            .await
            .map_err(nl_err("reading the bridge's IPv6 addresses"))?;
        if !have.iter().any(|a| a.addr() == gw6) {
            host.add_addr6(bridge.index, gw_net6)
                .await
                .map_err(nl_err("adding the IPv6 gateway address"))?;
        }
        pod.add_addr6(plink.index, c6.address)
            .await
            .map_err(nl_err("addressing the container interface (IPv6)"))?;
        routes6 = ipres
            .routes6
            .iter()
            .map(|r| Route6 {
                dst: r.dst,
                gw: Some(r.gw.unwrap_or(gw6)),
            })
            .collect();
        if conf.delegate.is_default_gateway && !routes6.iter().any(|r| r.dst.prefix_len() == 0) {
            routes6.push(Route6 {
                dst: Ipv6Net::default(),
                gw: Some(gw6),
            });
        }
        for r in &routes6 {
            pod.add_route6(plink.index, r.dst, r.gw)
                .await
                .map_err(nl_err("adding a container IPv6 route"))?;
        }
    }
    let masq_on = conf.ip_masq(senv);
    if masq_on {
        let v6 = senv
            .ipv6_network
            .zip(senv.lease6())
            .filter(|_| ip6.is_some());
        masq::pod_ensure(senv.network.zip(senv.lease()), v6)
            .map_err(|e| CniError::io("installing the pods' masquerade rule", e))?;
    }
    let mac = plink.mac.unwrap_or_default();
    let rec = Record {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        ip: ipc.map(|c| c.address),
        gateway,
        ip6: ip6.as_ref().map(|c| c.address),
        gateway6,
        mac,
        host_ifname: host_ifname.clone(),
        bridge: conf.bridge().to_string(),
        masq: masq_on,
        ipam_type: conf.ipam_type(),
        ipam: ipam.stdin.clone(),
        deleting: false,
    };
    rec.save(&conf.data_dir)
        .map_err(|e| CniError::io("saving the attachment record", e))?;
    register(conf, &rec)?;
    Ok(CniOutput {
        interfaces: vec![
            Interface {
                name: bridge.name.clone(),
                mac: bridge.mac.unwrap_or_default().to_string(),
                sandbox: None,
                mtu: Some(mtu),
            },
            Interface {
                name: host_ifname,
                mac: hlink.mac.unwrap_or_default().to_string(),
                sandbox: None,
                mtu: Some(mtu),
            },
            Interface {
                name: env.ifname.clone(),
                mac: mac.to_string(),
                sandbox: Some(env.netns.clone()),
                mtu: Some(mtu),
            },
        ],
        ips: ipc
            .map(|c| IpConfig {
                address: c.address,
                gateway,
                interface: Some(2),
            })
            .into_iter()
            .collect(),
        routes,
        ips6: ip6
            .map(|c| IpConfig6 {
                address: c.address,
                gateway: gateway6,
                interface: Some(2),
            })
            .into_iter()
            .collect(),
        routes6,
        dns: ipres.dns.clone(),
    })
}

/// A family's gateway for the pod: the one IPAM gave, else subnet.env's.
fn gateway_of<A>(given: Option<A>, env: Option<A>, family: &str) -> CniResult<A> {
    given.or(env).ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("IPAM gave an {family} address but neither it nor subnet.env names an {family} gateway"),
        )
    })
}

/// Tells the agent about the pod. An agent that is down (or not
/// answering) is not an error: it registers the pod from the record
/// when it is back. An agent that refuses the pod is.
fn register(conf: &NetConf, rec: &Record) -> CniResult<()> {
    let req = Request::Add(rec.endpoint());
    match api::call(&conf.agent_socket, &req) {
        Ok(_) => Ok(()),
        Err(ClientError::Refused(why)) => Err(CniError::new(
            code::AGENT_REFUSED,
            format!("the agent refused pod {}", pod_name(rec)),
        )
        .details(why)),
        Err(e) => {
            log(format_args!(
                "{}: agent unavailable ({e}); the pod works over the kernel path until the agent registers it",
                rec.container_id
            ));
            Ok(())
        }
    }
}

/// The pod's address as messages name it.
fn pod_name(rec: &Record) -> String {
    rec.key().map_or_else(|| "?".into(), |k| k.to_string())
}

fn load_record(conf: &NetConf, id: &str, ifname: &str) -> Option<Record> {
    match Record::load(&conf.data_dir, id, ifname) {
        Ok(r) => r,
        Err(e) => {
            log(format_args!(
                "{id}: unreadable attachment record ({e}); cleaning up without it"
            ));
            None
        }
    }
}

async fn del(env: &CniEnv, conf: &NetConf) -> CniResult<()> {
    env.require(&["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"])?;
    let host = host_netlink()?;
    let rec = load_record(conf, &env.container_id, &env.ifname);
    let undo = match &rec {
        Some(rec) => Teardown {
            env,
            conf,
            host_ifname: rec.host_ifname.clone(),
            ip: rec.key(),
            ipam: Some(ipam_replay(env, rec)?),
        },
        None => Teardown {
            env,
            conf,
            host_ifname: record::host_ifname(&env.container_id, &env.ifname),
            ip: None,
            // Without a record, release by container ID if subnet.env
            // still says how to reach the IPAM plugin.
            ipam: match conf.subnet_env() {
                Ok(senv) => Some(ipam_for(env, conf, &senv)?),
                Err(_) => None,
            },
        },
    };
    undo.run(&host).await
}

fn check_failed(msg: impl Into<String>) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

async fn check(env: &CniEnv, conf: &NetConf) -> CniResult<()> {
    env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"])?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "prevResult is required for CHECK"))?;
    let prev = CniOutput::from_json(prev)?;
    conf.subnet_env()?;
    let rec = load_record(conf, &env.container_id, &env.ifname).ok_or_else(|| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "no attachment of {} on {} (ADD did not run or DEL already did)",
                env.container_id, env.ifname
            ),
        )
    })?;
    if let Some(ip) = rec
        .ip
        .filter(|ip| !prev.ips.iter().any(|i| i.address == *ip))
    {
        return Err(check_failed(format!(
            "prevResult does not hold the pod's address {ip}"
        )));
    }
    if let Some(ip6) = rec.ip6 {
        if !prev.ips6.iter().any(|i| i.address == ip6) {
            return Err(check_failed(format!(
                "prevResult does not hold the pod's IPv6 address {ip6}"
            )));
        }
    }
    let mut ipam = ipam_replay(env, &rec)?;
    if let Some(p) = &conf.prev_result {
        ipam.stdin.insert("prevResult".into(), p.clone());
    }
    ipam.run("CHECK", &env.container_id, &env.ifname)?;

    let (_ns, pod) = pod_netlink(&env.netns).await?;
    let plink = pod
        .link_by_name(&env.ifname)
        .await
        .map_err(nl_err("reading the container interface"))?
        .ok_or_else(|| check_failed(format!("{} is gone from {}", env.ifname, env.netns)))?;
    if plink.mac != Some(rec.mac) {
        return Err(check_failed(format!(
            "{} has MAC {:?}, ADD gave it {}",
            env.ifname, plink.mac, rec.mac
        )));
    }
    if let Some(i) = prev.interfaces.iter().find(|i| i.sandbox.is_some()) {
        if i.mac != rec.mac.to_string() {
            return Err(check_failed(format!(
                "prevResult names MAC {} for {}, the interface has {}",
                i.mac, i.name, rec.mac
            )));
        }
    }
    if !plink.up {
        return Err(check_failed(format!("{} is down", env.ifname)));
    }
    let addrs = pod
        .ipv4_addrs(plink.index)
        .await
        .map_err(nl_err("reading the container's addresses"))?;
    if let Some(ip) = rec.ip.filter(|ip| !addrs.contains(ip)) {
        return Err(check_failed(format!(
            "{} has lost its address {ip} (has {addrs:?})",
            env.ifname
        )));
    }
    let routes = pod
        .routes_via(plink.index)
        .await
        .map_err(nl_err("reading the container's routes"))?;
    for r in &prev.routes {
        if !routes.iter().any(|(dst, _)| *dst == r.dst) {
            return Err(check_failed(format!(
                "the container's route to {} is gone",
                r.dst
            )));
        }
    }
    // A dual-stack pod: its IPv6 address and routes too.
    if let Some(ip6) = rec.ip6 {
        let addrs6 = pod
            .ipv6_addrs(plink.index)
            .await
            .map_err(nl_err("reading the container's IPv6 addresses"))?;
        if !addrs6.contains(&ip6) {
            return Err(check_failed(format!(
                "{} has lost its IPv6 address {ip6} (has {addrs6:?})",
                env.ifname
            )));
        }
        let routes6 = pod
            .routes6_via(plink.index)
            .await
            .map_err(nl_err("reading the container's IPv6 routes"))?;
        for r in &prev.routes6 {
            if !routes6.iter().any(|(dst, _)| *dst == r.dst) {
                return Err(check_failed(format!(
                    "the container's IPv6 route to {} is gone",
                    r.dst
                )));
            }
        }
    }
    let host = host_netlink()?;
    let hlink = host
        .link_by_name(&rec.host_ifname)
        .await
        .map_err(nl_err("reading the host veth"))?
        .ok_or_else(|| check_failed(format!("host veth {} is gone", rec.host_ifname)))?;
    let bridge = host
        .link_by_name(&rec.bridge)
        .await
        .map_err(nl_err("reading the bridge"))?
        .ok_or_else(|| check_failed(format!("bridge {} is gone", rec.bridge)))?;
    if hlink.controller != Some(bridge.index) {
        return Err(check_failed(format!(
            "host veth {} is not on {}",
            rec.host_ifname, rec.bridge
        )));
    }
    // The data path: when the agent answers, it must hold the pod.
    if let Ok(resp) = api::call(&conf.agent_socket, &Request::List {}) {
        let want = rec.endpoint();
        if !resp.endpoints.unwrap_or_default().contains(&want) {
            return Err(check_failed(format!(
                "the agent does not have pod {} registered",
                pod_name(&rec)
            )));
        }
    }
    Ok(())
}

fn status(env: &CniEnv, conf: &NetConf) -> CniResult<()> {
    env.require(&["CNI_PATH"])?;
    let unavailable = |e: CniError| CniError::new(code::NOT_AVAILABLE, e.msg).details(e.details);
    conf.subnet_env().map_err(unavailable)?;
    let plugin = ipam::find_plugin(&env.path, &conf.ipam_type()).map_err(unavailable)?;
    // Pass STATUS on to an IPAM plugin that knows it.
    if ipam::negotiate(&plugin, env, spec::LATEST).is_ok_and(|v| v == spec::LATEST) {
        ipam::exec(
            &plugin,
            "STATUS",
            env,
            "",
            "",
            &json!({"cniVersion": conf.cni_version, "name": conf.name, "ipam": conf.ipam}),
        )?;
    }
    Ok(())
}

async fn gc(env: &CniEnv, conf: &NetConf) -> CniResult<()> {
    env.require(&["CNI_PATH"])?;
    let valid: HashSet<(String, String)> = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "GC needs cni.dev/valid-attachments (an empty list removes everything)",
            )
        })?
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let host = host_netlink()?;
    let (records, bad) = record::list(&conf.data_dir);
    for b in bad {
        log(format_args!("GC: skipping an unreadable record: {b}"));
    }
    let mut kept_hosts: HashSet<String> = HashSet::new();
    let mut removed = 0;
    for rec in records {
        if rec.network != conf.name
            || valid.contains(&(rec.container_id.clone(), rec.ifname.clone()))
        {
            kept_hosts.insert(rec.host_ifname.clone());
            continue;
        }
        let scoped = CniEnv {
            container_id: rec.container_id.clone(),
            ifname: rec.ifname.clone(),
            ..env.clone()
        };
        let undo = Teardown {
            env: &scoped,
            conf,
            host_ifname: rec.host_ifname.clone(),
            ip: rec.key(),
            ipam: Some(ipam_replay(&scoped, &rec)?),
        };
        undo.run(&host).await?;
        removed += 1;
    }
    // Addresses host-local still holds for attachments that are gone.
    if let (Ok(senv), "host-local") = (conf.subnet_env(), conf.ipam_type().as_str()) {
        let dir = record::host_local_dir(&conf.ipam, &conf.name);
        for (id, ifname) in host_local_holders(&dir) {
            if valid.contains(&(id.clone(), ifname.clone())) {
                continue;
            }
            let scoped = CniEnv {
                container_id: id.clone(),
                ifname: ifname.clone(),
                ..env.clone()
            };
            ipam_for(&scoped, conf, &senv)?.run("DEL", &id, &ifname)?;
            removed += 1;
        }
    }
    // Host veths of ours that no attachment explains.
    for name in valid
        .iter()
        .map(|(id, ifname)| record::host_ifname(id, ifname))
    {
        kept_hosts.insert(name);
    }
    for l in host.links().await.map_err(nl_err("listing links"))? {
        if l.name.starts_with(record::HOST_PREFIX) && !kept_hosts.contains(&l.name) {
            host.delete_link(l.index)
                .await
                .map_err(nl_err("deleting a leaked host veth"))?;
            removed += 1;
        }
    }
    if removed > 0 {
        log(format_args!(
            "GC removed {removed} stale attachment resources"
        ));
    }
    Ok(())
}

/// (container ID, ifname) of every address file in a host-local directory.
fn host_local_holders(dir: &Path) -> Vec<(String, String)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<Ipv4Addr>().is_ok())
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| {
            let mut lines = t.lines().map(str::trim);
            let id = lines.next()?.to_string();
            let ifname = lines.next().unwrap_or("eth0").to_string();
            (!id.is_empty()).then_some((id, ifname))
        })
        .collect()
}

//! `flannel-agent`: run the node agent, read its counters, talk to it.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use flannel_agent::{
    agent::{self, defaults, store::StoreOptions, Options},
    api::{self, EndpointRecord, Request},
    cni,
    datapath::{ebpf, monitor::EventType, DatapathMode, VxlanSourceCheck, XdpMode},
    mac::MacAddr,
    subnet::{etcd, kube, LeaseTiming},
};

#[derive(Parser)]
#[command(
    name = "flannel-agent",
    version,
    about = "Flannel-compatible pod network with an eBPF VXLAN data path"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Print the data path's per-verdict counters (summed over CPUs).
    Stats {
        #[arg(long, default_value = defaults::BPF_DIR)]
        bpf_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Register a pod with the agent on this node.
    AddPod {
        #[arg(long, default_value = defaults::SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        ip: Ipv4Addr,
        #[arg(long)]
        mac: MacAddr,
        #[arg(long)]
        host_if: String,
    },
    /// Remove a pod from the agent on this node.
    DelPod {
        #[arg(long, default_value = defaults::SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        ip: std::net::IpAddr,
    },
    /// Print the agent's status (data path and why) as JSON.
    Status {
        #[arg(long, default_value = defaults::SOCKET)]
        socket: PathBuf,
    },
    /// Stream the data path's drops and passes to the kernel as they
    /// happen, with the reason, program, interface and addresses (inner
    /// ones for VXLAN). Rate-limited in the kernel.
    Monitor {
        #[arg(long, default_value = defaults::BPF_DIR)]
        bpf_dir: PathBuf,
        /// Which verdicts: drops, passes to the kernel, or both.
        #[arg(long = "type", value_enum, default_value_t = EventType::All)]
        kind: EventType,
        /// `table` (one line per event, the default) or `json` (JSON lines).
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Events per second per CPU the programs may send.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Events a CPU may send at once.
        #[arg(long, default_value_t = 100)]
        burst: u32,
        /// Stop after this many events (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Explain the path a packet from SRC to DST takes on this node, step
    /// by step, from the maps and the kernel as they are now; `--live`
    /// sends a probe and shows which counters it moved.
    Trace {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        /// `udp` (default), `tcp` or `icmp`.
        #[arg(long, default_value = "udp", value_parser = ["udp", "tcp", "icmp"])]
        proto: String,
        #[arg(long)]
        dport: Option<u16>,
        /// Send a probe from SRC (a pod of this node, or this node) and
        /// confirm the path with the counters.
        #[arg(long)]
        live: bool,
        #[arg(long, default_value = defaults::SOCKET)]
        socket: PathBuf,
        #[arg(long, default_value = defaults::BPF_DIR)]
        bpf_dir: PathBuf,
        /// The CNI plugin's dataDir, where a pod's namespace is recorded.
        #[arg(long, default_value = defaults::CNI_DATA_DIR)]
        cni_data_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show this node's state object by object: every remote lease beside
    /// its BPF map entries and kernel route, neighbour and FDB entry, every
    /// pod beside its interface, map entry and program; mismatches named.
    Inspect {
        #[arg(long, default_value = defaults::SOCKET)]
        socket: PathBuf,
        /// `table` (default) or `json`.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Install the `flannel` CNI plugin binary into the CNI bin directory
    /// (the DaemonSet's `install-cni-plugin` init container).
    InstallCniPlugin {
        /// The binary to install (default: `flannel` next to this executable).
        #[arg(long)]
        plugin: Option<PathBuf>,
        #[arg(long, default_value = defaults::CNI_BIN_DIR)]
        cni_bin_dir: PathBuf,
    },
    /// Install the conflist into the CNI config directory (the
    /// DaemonSet's `install-cni` init container).
    InstallCni {
        /// The conflist to install (the ConfigMap's cni-conf.json; default:
        /// Flannel's).
        #[arg(long)]
        cni_conf_file: Option<PathBuf>,
        #[arg(long, default_value = defaults::CNI_CONF_DIR)]
        cni_conf_dir: PathBuf,
        #[arg(long, default_value = defaults::CNI_CONF_NAME)]
        cni_conf_name: String,
    },
    /// Remove this instance's pinned maps and links (stops the eBPF data path).
    Cleanup {
        #[arg(long, default_value = defaults::BPF_DIR)]
        bpf_dir: PathBuf,
    },
}

/// How a command prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Where leases live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SubnetMgr {
    /// A file-locked store on this machine (`--store-dir`).
    Local,
    /// etcd v3, Flannel's layout under `--etcd-prefix`.
    Etcd,
    /// The Kubernetes API: node podCIDRs and Flannel's annotations.
    Kube,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Flannel's net-conf.json (read by the local and kube stores; etcd
    /// serves it under <etcd-prefix>/config).
    #[arg(long, default_value = defaults::NET_CONFIG)]
    net_config_path: PathBuf,
    /// Uplink interface name or address; repeat to give fallbacks (default:
    /// the interface of the IPv4 default route).
    #[arg(long)]
    iface: Vec<String>,
    /// Regular expression matched against interface names and addresses;
    /// repeatable.
    #[arg(long)]
    iface_regex: Vec<String>,
    /// The IP other nodes reach this one at (default: the uplink's address).
    #[arg(long)]
    public_ip: Option<Ipv4Addr>,
    /// With IPv6: the IPv6 other nodes reach this one at (default: the
    /// uplink's first global IPv6 address).
    #[arg(long)]
    public_ipv6: Option<std::net::Ipv6Addr>,
    /// Where the lease is written for the CNI plugin.
    #[arg(long, default_value = defaults::SUBNET_FILE)]
    subnet_file: PathBuf,
    #[arg(long, value_enum, default_value_t = SubnetMgr::Local)]
    subnet_mgr: SubnetMgr,
    /// Flannel's switch for the Kubernetes store (same as --subnet-mgr kube).
    #[arg(long)]
    kube_subnet_mgr: bool,
    /// The local store's directory (shared by every agent on the machine).
    #[arg(long, default_value = "/var/lib/flannel-ebpf/store")]
    store_dir: PathBuf,
    /// Comma-separated etcd endpoints.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    #[arg(long, default_value = etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    #[arg(long)]
    etcd_cafile: Option<PathBuf>,
    #[arg(long)]
    etcd_certfile: Option<PathBuf>,
    #[arg(long)]
    etcd_keyfile: Option<PathBuf>,
    #[arg(long)]
    etcd_username: Option<String>,
    #[arg(long, env = "ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// API server URL (default: kubeconfig or in-cluster config).
    #[arg(long)]
    kube_api_url: Option<String>,
    #[arg(long)]
    kubeconfig_file: Option<PathBuf>,
    /// This node's Node object (kube store).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// Lease lifetime in seconds (etcd and local stores).
    #[arg(long, default_value_t = 24 * 3600)]
    subnet_lease_ttl_secs: u64,
    /// Renew this many minutes before the lease expires (Flannel's flag).
    #[arg(long, default_value_t = 60)]
    subnet_lease_renew_margin: u64,
    /// Masquerade traffic from pods to outside the cluster network.
    #[arg(long)]
    ip_masq: bool,
    #[arg(long, default_value = "0.0.0.0")]
    healthz_ip: std::net::IpAddr,
    /// Serve GET /healthz on this port (0: off).
    #[arg(long, default_value_t = 0)]
    healthz_port: u16,
    #[arg(long, value_enum, default_value_t = DatapathMode::Auto)]
    datapath: DatapathMode,
    /// How XDP attaches to the uplink (auto: generic on a veth, where
    /// native XDP turns off segmentation offload on its peer).
    #[arg(long, env = "FLANNEL_XDP_MODE", value_enum, default_value_t = XdpMode::Auto)]
    xdp_mode: XdpMode,
    /// What VXLAN's outer source must show to be accepted: `lease` (its IP
    /// holds a lease) or `strict` (and its MAC is that IP's neighbour
    /// entry).
    #[arg(long, value_enum, default_value_t = VxlanSourceCheck::Lease)]
    vxlan_source_check: VxlanSourceCheck,
    /// Whether pod traffic crosses the kernel's forward hook (firewall
    /// rules, netfilter-based network policy, rp_filter): `auto` where the
    /// node has forward-path rules, `on` always, `off` never (the full
    /// fast path).
    #[arg(long, env = "FLANNEL_NETFILTER_COMPAT", value_enum, default_value_t = flannel_agent::netfilter::Compat::Auto)]
    netfilter_compat: flannel_agent::netfilter::Compat,
    /// Where maps and links are pinned (one directory per instance).
    #[arg(long, default_value = defaults::BPF_DIR)]
    bpf_dir: PathBuf,
    /// Socket and pod records live here.
    #[arg(long, default_value = defaults::RUN_DIR)]
    run_dir: PathBuf,
    /// The pod bridge (an interface name: 1 to 15 printable bytes).
    #[arg(long, default_value = "cni0", value_parser = interface_name)]
    bridge: String,
    /// Full resync period in seconds.
    #[arg(long, default_value_t = 10)]
    resync_secs: u64,
    /// The CNI plugin's dataDir: pods it wired while this agent was down
    /// are registered from the records there.
    #[arg(long, default_value = defaults::CNI_DATA_DIR)]
    cni_data_dir: PathBuf,
    /// Install the `flannel` plugin and the conflist into the CNI
    /// directories once the node is ready (Flannel's install-cni).
    #[arg(long)]
    install_cni: bool,
    #[arg(long, default_value = defaults::CNI_BIN_DIR)]
    cni_bin_dir: PathBuf,
    #[arg(long, default_value = defaults::CNI_CONF_DIR)]
    cni_conf_dir: PathBuf,
    #[arg(long, default_value = defaults::CNI_CONF_NAME)]
    cni_conf_name: String,
    /// The conflist to install (default: Flannel's cni-conf.json).
    #[arg(long)]
    cni_conf_file: Option<PathBuf>,
    /// The plugin binary to install (default: `flannel` next to this
    /// executable).
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
    /// A group (name or number) whose members may call the agent's socket
    /// besides root (the socket is then 0660, else 0600).
    #[arg(long)]
    api_socket_group: Option<String>,
}

impl RunArgs {
    fn install_spec(&self) -> anyhow::Result<Option<cni::install::InstallSpec>> {
        if !self.install_cni {
            return Ok(None);
        }
        Ok(Some(cni::install::InstallSpec {
            plugin: plugin_path(self.cni_plugin.as_deref())?,
            conflist: conflist_text(self.cni_conf_file.as_deref())?,
            bin_dir: self.cni_bin_dir.clone(),
            conf_dir: self.cni_conf_dir.clone(),
            conf_name: self.cni_conf_name.clone(),
        }))
    }

    fn options(self) -> anyhow::Result<Options> {
        let install_cni = self.install_spec()?;
        let api_group = self.api_socket_group.as_deref().map(group_id).transpose()?;
        let mgr = if self.kube_subnet_mgr {
            SubnetMgr::Kube
        } else {
            self.subnet_mgr
        };
        let store = match mgr {
            SubnetMgr::Local => StoreOptions::Local {
                dir: self.store_dir,
            },
            SubnetMgr::Etcd => StoreOptions::Etcd(etcd::EtcdOptions {
                endpoints: self.etcd_endpoints,
                prefix: self.etcd_prefix,
                cafile: self.etcd_cafile,
                certfile: self.etcd_certfile,
                keyfile: self.etcd_keyfile,
                username: self.etcd_username,
                password: self.etcd_password,
            }),
            SubnetMgr::Kube => StoreOptions::Kube(kube::KubeOptions {
                api_url: self.kube_api_url,
                kubeconfig: self.kubeconfig_file,
                node_name: self.node_name,
            }),
        };
        let ttl = Duration::from_secs(self.subnet_lease_ttl_secs.max(1));
        Ok(Options {
            net_config_path: self.net_config_path,
            iface: self.iface,
            iface_regex: self.iface_regex,
            public_ip: self.public_ip,
            public_ipv6: self.public_ipv6,
            subnet_file: self.subnet_file,
            store,
            timing: LeaseTiming {
                ttl,
                // A margin longer than half the TTL would renew constantly.
                renew_margin: Duration::from_secs(self.subnet_lease_renew_margin * 60).min(ttl / 2),
            },
            ip_masq: self.ip_masq,
            healthz: (self.healthz_port != 0)
                .then(|| std::net::SocketAddr::new(self.healthz_ip, self.healthz_port)),
            datapath: self.datapath,
            xdp_mode: self.xdp_mode,
            vxlan_source_check: self.vxlan_source_check,
            netfilter_compat: self.netfilter_compat,
            bpf_dir: self.bpf_dir,
            run_dir: self.run_dir,
            bridge: self.bridge,
            resync: Duration::from_secs(self.resync_secs.max(1)),
            cni_data_dir: self.cni_data_dir,
            install_cni,
            api_group,
        })
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(agent::run(a.options()?)),
        Cmd::Stats { bpf_dir, json } => {
            let counters = ebpf::read_counters(&bpf_dir)
                .with_context(|| format!("reading counters pinned under {}", bpf_dir.display()))?;
            if json {
                let map: serde_json::Map<_, _> = counters
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                    .collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                for (name, value) in counters {
                    println!("{name:<28} {value}");
                }
            }
            Ok(())
        }
        Cmd::AddPod {
            socket,
            ip,
            mac,
            host_if,
        } => {
            api::call(
                &socket,
                &Request::Add(EndpointRecord {
                    ip: Some(ip),
                    mac,
                    host_ifname: host_if,
                    ip6: None,
                }),
            )?;
            Ok(())
        }
        Cmd::DelPod { socket, ip } => {
            api::call(&socket, &Request::Del { ip })?;
            Ok(())
        }
        Cmd::Status { socket } => {
            let resp = api::call(&socket, &Request::Status {})?;
            println!("{}", serde_json::to_string_pretty(&resp.status)?);
            Ok(())
        }
        Cmd::Monitor {
            bpf_dir,
            kind,
            output,
            rate,
            burst,
            count,
        } => {
            static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            extern "C" fn on_signal(_: libc::c_int) {
                STOP.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            // SAFETY: sigset and handler set-up on this thread before any
            // other runs; the handler only stores to an atomic, which is
            // async-signal-safe.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::signal(sig, on_signal as *const () as libc::sighandler_t);
                    libc::sigaddset(&mut set, sig);
                }
                // A parent may have blocked them (a mask survives exec):
                // the monitor must still stop, and turn events off, on them.
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
            let mut seen = 0u64;
            let stop = || STOP.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!("listening for {kind:?} events under {}", bpf_dir.display());
            flannel_agent::datapath::monitor::stream(
                &bpf_dir,
                kind,
                rate,
                burst,
                &stop,
                &mut |ev| {
                    let line = match output {
                        Output::Json => serde_json::to_string(&ev).unwrap_or_default(),
                        Output::Table => ev.line(),
                    };
                    println!("{line}");
                    seen += 1;
                    count == 0 || seen < count
                },
            )?;
            Ok(())
        }
        Cmd::Trace {
            src,
            dst,
            proto,
            dport,
            live,
            socket,
            bpf_dir,
            cni_data_dir,
            output,
        } => {
            let resp = api::call(
                &socket,
                &Request::Trace {
                    src,
                    dst,
                    proto: Some(proto.clone()),
                    dport,
                },
            )?;
            let trace = resp.trace.context("the agent sent no trace")?;
            let live = if live {
                Some(probe(
                    &trace,
                    &bpf_dir,
                    &cni_data_dir,
                    &proto,
                    src,
                    dst,
                    dport,
                )?)
            } else {
                None
            };
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"trace": trace, "live": live})
                    )?
                ),
                Output::Table => print!("{}", flannel_agent::render::trace(&trace, live.as_ref())),
            }
            Ok(())
        }
        Cmd::Inspect { socket, output } => {
            let resp = api::call(&socket, &Request::Inspect {})?;
            let inspect = resp.inspect.context("the agent sent no inspect answer")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&inspect)?),
                Output::Table => print!("{}", flannel_agent::render::inspect(&inspect)),
            }
            Ok(())
        }
        Cmd::InstallCniPlugin {
            plugin,
            cni_bin_dir,
        } => {
            let plugin = plugin_path(plugin.as_deref())?;
            let changed = cni::install::install_plugin(&plugin, &cni_bin_dir)
                .with_context(|| format!("installing the plugin into {}", cni_bin_dir.display()))?;
            report_install(&cni_bin_dir.join("flannel"), changed.is_some());
            Ok(())
        }
        Cmd::InstallCni {
            cni_conf_file,
            cni_conf_dir,
            cni_conf_name,
        } => {
            let conflist = conflist_text(cni_conf_file.as_deref())?;
            let changed = cni::install::install_conflist(&conflist, &cni_conf_dir, &cni_conf_name)
                .with_context(|| {
                    format!("installing the conflist into {}", cni_conf_dir.display())
                })?;
            report_install(&cni_conf_dir.join(&cni_conf_name), changed.is_some());
            Ok(())
        }
        Cmd::Cleanup { bpf_dir } => {
            ebpf::remove_pins(&bpf_dir).with_context(|| format!("removing {}", bpf_dir.display()))
        }
    }
}

/// Sends the probe from where the trace says it can be sent and returns
/// which counters moved, and whether one the trace expects did.
fn probe(
    trace: &api::Trace,
    bpf_dir: &std::path::Path,
    cni_data_dir: &std::path::Path,
    proto: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: Option<u16>,
) -> anyhow::Result<flannel_agent::render::Live> {
    let netns = match trace.probe_from.as_str() {
        "pod" => {
            let (records, _) = cni::record::list(cni_data_dir);
            let rec = records
                .into_iter()
                .find(|r| r.ip.map(|n| n.addr()) == Some(src))
                .with_context(|| {
                    format!(
                        "no CNI record for pod {src} under {}: is it a pod of this node added by \
                         the flannel plugin? (pass the plugin's dataDir as --cni-data-dir)",
                        cni_data_dir.display()
                    )
                })?;
            Some(PathBuf::from(rec.netns))
        }
        "node" => None,
        _ => anyhow::bail!("{src} is not on this node: run the live trace on the node it is on"),
    };
    let counters = || {
        ebpf::counters_by_name(bpf_dir).with_context(|| {
            format!(
                "reading the counters pinned under {} (pass --bpf-dir)",
                bpf_dir.display()
            )
        })
    };
    let before = counters()?;
    flannel_agent::datapath::probe::send(netns, proto, dst, dport)
        .with_context(|| format!("sending a {proto} probe to {dst}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let after = counters()?;
    let moved: std::collections::BTreeMap<String, u64> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect();
    Ok(flannel_agent::render::Live {
        confirmed: trace.expect.iter().any(|c| moved.contains_key(c)),
        counters: !after.is_empty(),
        moved,
    })
}

/// The plugin binary to install: `given`, or `flannel` next to this
/// executable (where the image keeps it).
fn plugin_path(given: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => Ok(std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("flannel")),
    }
}

/// The conflist to install: the file given, or Flannel's cni-conf.json.
fn conflist_text(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    match file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading --cni-conf-file {}", p.display())),
        None => Ok(cni::install::FLANNEL_CONFLIST.to_string()),
    }
}

fn report_install(path: &std::path::Path, changed: bool) {
    let what = if changed {
        "installed"
    } else {
        "already up to date"
    };
    eprintln!("{}: {what}", path.display());
}

/// A group's id from its name or number.
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)
        .with_context(|| format!("--api-socket-group: {group:?} is not a group name"))?;
    // SAFETY: getgrnam reads a valid C string; the result is read at once
    // on this thread, before any other call that could reuse its buffer.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        anyhow::bail!("--api-socket-group: no group {group:?} on this node");
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}

/// `--bridge`: a name the kernel takes for an interface.
fn interface_name(name: &str) -> Result<String, String> {
    if flannel_agent::config::is_interface_name(name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{name:?} is not an interface name the kernel takes (1 to {} printable ASCII bytes, no '/' or ':')",
            flannel_agent::config::MAX_IFNAME
        ))
    }
}

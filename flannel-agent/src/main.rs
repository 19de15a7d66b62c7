//! `flannel-agent`: run the node agent, read its counters, talk to it.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use flannel_agent::{
    agent::{self, DatapathMode, Options},
    api::{self, EndpointRecord, Request},
    ebpf,
    mac::MacAddr,
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
    Run(RunArgs),
    /// Print the data path's per-verdict counters (summed over CPUs).
    Stats {
        #[arg(long, default_value = "/sys/fs/bpf/flannel")]
        bpf_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Register a pod with the agent on this node.
    AddPod {
        #[arg(long, default_value = "/run/flannel/agent.sock")]
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
        #[arg(long, default_value = "/run/flannel/agent.sock")]
        socket: PathBuf,
        #[arg(long)]
        ip: Ipv4Addr,
    },
    /// Print the agent's status (data path and why) as JSON.
    Status {
        #[arg(long, default_value = "/run/flannel/agent.sock")]
        socket: PathBuf,
    },
    /// Remove this instance's pinned maps and links (stops the eBPF data path).
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/flannel")]
        bpf_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Uplink interface (default: the interface of the IPv4 default route).
    #[arg(long)]
    iface: Option<String>,
    /// This node's public IP (default: the uplink's first IPv4 address).
    #[arg(long)]
    public_ip: Option<Ipv4Addr>,
    /// Static lease file: JSON list of {subnet, public_ip, vtep_mac}.
    #[arg(long)]
    lease_file: PathBuf,
    #[arg(long, default_value_t = 1)]
    vni: u32,
    /// VXLAN UDP port; 0 means the Linux default, 8472, as in Flannel.
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[arg(long, value_enum, default_value_t = DatapathMode::Auto)]
    datapath: DatapathMode,
    /// Where maps and links are pinned (one directory per instance).
    #[arg(long, default_value = "/sys/fs/bpf/flannel")]
    bpf_dir: PathBuf,
    /// Socket and pod records live here.
    #[arg(long, default_value = "/run/flannel")]
    run_dir: PathBuf,
    #[arg(long, default_value = "cni0")]
    bridge: String,
    /// Full resync period in seconds.
    #[arg(long, default_value_t = 10)]
    resync_secs: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run(a) => {
            let opts = Options {
                iface: a.iface,
                public_ip: a.public_ip,
                lease_file: a.lease_file,
                vni: a.vni,
                port: if a.port == 0 { 8472 } else { a.port },
                datapath: a.datapath,
                bpf_dir: a.bpf_dir,
                run_dir: a.run_dir,
                bridge: a.bridge,
                resync: Duration::from_secs(a.resync_secs.max(1)),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(opts))
        }
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
                    ip,
                    mac,
                    host_ifname: host_if,
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
        Cmd::Cleanup { bpf_dir } => {
            ebpf::remove_pins(&bpf_dir).with_context(|| format!("removing {}", bpf_dir.display()))
        }
    }
}

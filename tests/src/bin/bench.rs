//! `cargo xtask bench [--quick]`: the same workloads over the eBPF data
//! path, the kernel path (`--datapath kernel`, what stock Flannel does) and
//! node-to-node on the fabric (the limit), in one run, interleaved; the
//! programs' own cost through `BPF_PROG_TEST_RUN`; and the control plane's
//! cost for 1,000 and 5,000 remote leases. Writes `bench.json`, `bench.md`
//! and `bench.svg` under the output directory (`target/bench`).

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use flannel_common::programs;
use flannel_tests::{
    lab::{command_in_netns, NodeKind, NodeSpec},
    netns::{in_netns, pin_thread, spawn_in_netns},
    progtest::{self, Harness, Netns},
    Lab,
};
use serde_json::{json, Map, Value};

struct Opts {
    quick: bool,
    secs: u32,
    runs: usize,
    rr_count: usize,
    test_runs: u32,
    leases: Vec<usize>,
    out: PathBuf,
    /// `--only data|programs|control`: one part, for working on it.
    only: Option<String>,
}

impl Opts {
    fn parse() -> Result<Self> {
        let mut quick = false;
        let mut out = PathBuf::from("target/bench");
        let mut only = None;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--out" => out = args.next().context("--out needs a directory")?.into(),
                "--only" => match args.next().as_deref() {
                    Some(
                        part @ ("data" | "jumbo" | "direct" | "ipv6" | "ipv6-direct" | "programs"
                        | "control"),
                    ) => only = Some(part.to_string()),
                    other => bail!(
                        "--only takes data, jumbo, direct, ipv6, ipv6-direct, programs or control, not {other:?}"
                    ),
                },
                other => bail!("unknown argument {other:?} (use --quick, --out DIR, --only PART)"),
            }
        }
        Ok(if quick {
            Opts {
                quick,
                secs: 1,
                runs: 1,
                rr_count: 2_000,
                test_runs: 10_000,
                leases: vec![1_000],
                out,
                only,
            }
        } else {
            Opts {
                quick,
                secs: 2,
                runs: 15,
                rr_count: 20_000,
                test_runs: 1_000_000,
                leases: vec![1_000, 5_000],
                out,
                only,
            }
        })
    }
}

/// Median, min and max of the runs.
fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    json!({"median": s[s.len() / 2], "min": s[0], "max": s[s.len() - 1], "runs": v})
}

fn median(v: &Value) -> f64 {
    v["median"].as_f64().unwrap_or(f64::NAN)
}

/// A point to measure the machine's busy CPU time from.
///
/// Busy time is wall time on every online CPU minus idle time. The kernel
/// measures idle time exactly on a tickless kernel, while the user, system
/// and softirq columns of `/proc/stat` are sampled at each tick, which on
/// a half-idle VM was seen to swing 4x between identical runs.
struct CpuMark {
    at: Instant,
    idle: f64,
}

impl CpuMark {
    fn now() -> Result<Self> {
        Ok(CpuMark {
            at: Instant::now(),
            idle: Self::read()?.0,
        })
    }

    /// Idle plus iowait seconds, summed over CPUs, and the number of CPUs.
    fn read() -> Result<(f64, usize)> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 5 {
            bail!("unexpected /proc/stat line {line:?}");
        }
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(((v[3] + v[4]) / hz, cpus))
    }

    /// Busy CPU seconds of the whole machine since the mark.
    fn busy(&self) -> Result<f64> {
        let (idle, cpus) = Self::read()?;
        Ok(self.at.elapsed().as_secs_f64() * cpus as f64 - (idle - self.idle))
    }
}

/// The CPUs the client and the server of every workload run on, when the
/// machine has two or more: on a small VM an unpinned run's figure depends
/// on whether the scheduler happens to put both ends on one CPU, and that
/// swamps the differences between paths. Every path gets the same pinning.
fn pinned() -> Option<(usize, usize)> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (n >= 2).then_some((0, 1))
}

/// The rate CPU per Gbit is measured at: below what every path reaches
/// on the development VM, so that all three move the same data and the
/// figure shows what each path costs, not how fast it saturates a CPU.
const PACED_GBIT: u32 = 4;

/// iperf3 servers, one per server namespace, started on first use and
/// kept for the whole run (a fresh server per run cost 0.3 s each time);
/// killed on drop.
#[derive(Default)]
struct Iperf {
    servers: std::cell::RefCell<std::collections::HashMap<String, std::process::Child>>,
}

impl Drop for Iperf {
    fn drop(&mut self) {
        for (_, mut c) in self.servers.borrow_mut().drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Iperf {
    fn server(&self, ns: &str, ip: IpAddr) -> Result<()> {
        if self.servers.borrow().contains_key(ns) {
            return Ok(());
        }
        let cpu = pinned().map(|(_, s)| vec!["-A".to_string(), s.to_string()]);
        let child = command_in_netns("iperf3", ns)?
            .args(["-s", "-p", "5301"])
            .args(cpu.unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (apt-get install iperf3)")?;
        self.servers.borrow_mut().insert(ns.to_string(), child);
        // Ready when it accepts a connection (from its own namespace).
        let started = Instant::now();
        let addr = SocketAddr::new(ip, 5301);
        while in_netns(ns, move || Ok(TcpStream::connect(addr)?)).is_err() {
            if started.elapsed() > Duration::from_secs(5) {
                bail!("iperf3 server in {ns} did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// One iperf3 run over `path`; the JSON end.
    fn run(&self, path: &Path, args: &[&str]) -> Result<Value> {
        let (client, server_ip) = (path.client.as_str(), path.ip);
        self.server(&path.server, server_ip)?;
        let cpu = pinned().map(|(c, _)| vec!["-A".to_string(), c.to_string()]);
        let out = command_in_netns("iperf3", client)?
            .args(["-c", &server_ip.to_string(), "-p", "5301", "-J"])
            .args(cpu.unwrap_or_default())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "iperf3 to {server_ip}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["end"].clone())
    }
}

/// TCP throughput in Gbit/s and the machine's busy CPU seconds per Gbit,
/// as fast as it goes or (`rate`) paced to that many Gbit/s.
fn tcp(
    iperf: &Iperf,
    path: &Path,
    secs: u32,
    streams: u32,
    rate: Option<u32>,
) -> Result<(f64, f64)> {
    let mut args = vec![
        "-t".to_string(),
        secs.to_string(),
        "-P".to_string(),
        streams.to_string(),
    ];
    if let Some(g) = rate {
        args.extend(["-b".to_string(), format!("{g}G")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let once = || -> Result<(f64, f64)> {
        let mark = CpuMark::now()?;
        let end = iperf.run(path, &args)?;
        let cpu = mark.busy()?;
        let bps = end["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("no iperf3 throughput on the {} path: {end}", path.name))?;
        let gbits = end["sum_received"]["bytes"].as_f64().unwrap_or(0.0) * 8.0 / 1e9;
        Ok((bps / 1e9, cpu / gbits.max(1e-9)))
    };
    // iperf3 now and then ends a run without its summary; such a run is
    // said and made once more (twice in a row fails the bench).
    once().or_else(|e| {
        eprintln!("{e:#}; running it once more");
        once()
    })
}

/// UDP datagrams of 64 bytes, as fast as the sender goes: received kpps.
fn udp64(iperf: &Iperf, path: &Path, secs: u32) -> Result<f64> {
    let end = iperf.run(
        path,
        &["-u", "-l", "64", "-b", "0", "-t", &secs.to_string()],
    )?;
    let s = &end["sum"];
    let got = s["packets"].as_f64().unwrap_or(0.0) - s["lost_packets"].as_f64().unwrap_or(0.0);
    Ok(got / s["seconds"].as_f64().unwrap_or(1.0) / 1e3)
}

/// A TCP request/response connection with `size`-byte messages, kept
/// open across rounds so that each round's share of transactions on every
/// path runs back to back with the other paths' shares. Client and server
/// each live on a thread in their namespace, pinned like iperf3.
struct RrSession {
    go: std::sync::mpsc::Sender<usize>,
    done: std::sync::mpsc::Receiver<Result<Vec<f64>>>,
    client: std::thread::JoinHandle<Result<()>>,
    server: std::thread::JoinHandle<Result<()>>,
}

impl RrSession {
    fn open(path: &Path, port: u16, size: usize) -> Result<Self> {
        let ip = path.ip;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let family = path.ip;
        let srv = spawn_in_netns(&path.server, move || {
            let l = server_listener(family, port)?;
            ready_tx.send(()).ok();
            let (mut s, _) = l.accept()?;
            s.set_nodelay(true)?;
            let mut buf = vec![0u8; size];
            loop {
                if s.read_exact(&mut buf).is_err() {
                    return Ok(());
                }
                s.write_all(&buf)?;
            }
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("RR server did not start")?;
        let (go, go_rx) = std::sync::mpsc::channel::<usize>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let cli = spawn_in_netns(&path.client, move || {
            if let Some((cpu, _)) = pinned() {
                pin_thread(cpu)?;
            }
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            let msg = vec![0x5au8; size];
            let mut buf = vec![0u8; size];
            // Each share starts with a tenth more, not timed, to warm the path.
            while let Ok(count) = go_rx.recv() {
                let mut run = || -> Result<Vec<f64>> {
                    let mut times = Vec::with_capacity(count);
                    for k in 0..count + count / 10 {
                        let t = Instant::now();
                        s.write_all(&msg)?;
                        s.read_exact(&mut buf)?;
                        if k >= count / 10 {
                            times.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                    }
                    Ok(times)
                };
                if done_tx.send(run()).is_err() {
                    break;
                }
            }
            Ok(())
        })?;
        Ok(RrSession {
            go,
            done,
            client: cli,
            server: srv,
        })
    }

    /// `count` transactions: (p50 µs, p99 µs, transactions per second).
    fn run(&self, count: usize) -> Result<(f64, f64, f64)> {
        self.go.send(count).context("RR client is gone")?;
        let times = self
            .done
            .recv_timeout(Duration::from_secs(120))
            .context("RR client did not answer")??;
        let total: f64 = times.iter().sum::<f64>() / 1e6;
        let mut t = times;
        t.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| t[((t.len() - 1) as f64 * p) as usize];
        Ok((pct(0.5), pct(0.99), t.len() as f64 / total))
    }

    fn close(self) -> Result<()> {
        drop(self.go);
        self.client
            .join()
            .map_err(|_| anyhow::anyhow!("RR client panicked"))??;
        self.server
            .join()
            .map_err(|_| anyhow::anyhow!("RR server panicked"))??;
        Ok(())
    }
}

/// A server's listener on `port` for clients of `ip`'s family, its thread
/// pinned to the server CPU.
fn server_listener(ip: IpAddr, port: u16) -> Result<TcpListener> {
    if let Some((_, cpu)) = pinned() {
        pin_thread(cpu)?;
    }
    let any = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    Ok(TcpListener::bind(SocketAddr::new(any, port))?)
}

/// TCP connection rate, as netperf's TCP_CRR: for `secs`, connect, send
/// one byte, read one back, and close (the server closes first, so the
/// client's ports do not pile up in TIME_WAIT); connections per second.
fn crr(path: &Path, port: u16, secs: u32) -> Result<f64> {
    const STOP: u8 = 0xff;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let family = path.ip;
    let srv = spawn_in_netns(&path.server, move || {
        let l = server_listener(family, port)?;
        ready_tx.send(()).ok();
        loop {
            let (mut s, _) = l.accept()?;
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).is_err() {
                continue;
            }
            if b[0] == STOP {
                return Ok(());
            }
            let _ = s.write_all(&b);
        }
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("CRR server did not start")?;
    let ip = path.ip;
    let cli = spawn_in_netns(&path.client, move || {
        if let Some((cpu, _)) = pinned() {
            pin_thread(cpu)?;
        }
        let to = SocketAddr::new(ip, port);
        let connect = || -> Result<TcpStream> {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            Ok(s)
        };
        let end = Instant::now() + Duration::from_secs(u64::from(secs));
        let started = Instant::now();
        let mut done = 0u64;
        let mut b = [0u8; 1];
        while Instant::now() < end {
            let mut s = connect()?;
            s.write_all(&[1])?;
            s.read_exact(&mut b)?;
            // The server's close.
            let _ = s.read(&mut b)?;
            done += 1;
        }
        let rate = done as f64 / started.elapsed().as_secs_f64();
        connect()?.write_all(&[STOP])?;
        Ok(rate)
    })?;
    let rate = cli
        .join()
        .map_err(|_| anyhow::anyhow!("CRR client panicked"))??;
    srv.join()
        .map_err(|_| anyhow::anyhow!("CRR server panicked"))??;
    Ok(rate)
}

/// Concurrent flows for the many-flows workloads.
const FLOWS: usize = 1_000;

/// Many TCP flows between two pods at once: `FLOWS` connections, driven
/// by one pinned thread on each side (tokio, one task per connection), as
/// a busy node's many RPC clients are. `bulk`: every flow sends as fast as
/// it can, and the result is the aggregate Gbit/s the server receives.
/// Otherwise every flow keeps one 1-byte request in flight, and the result
/// is (p99 µs, transactions per second) over all of them. The first half
/// second is not measured.
fn many_flows(path: &Path, port: u16, secs: u32, bulk: bool) -> Result<(f64, f64)> {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Two sockets per flow in this process, with room to spare.
    flannel_tests::netns::raise_open_files(4 * FLOWS as u64)?;
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a tokio runtime")
    };
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (srv_received, srv_stop) = (received.clone(), stop.clone());
    let family = path.ip;
    let srv = spawn_in_netns(&path.server, move || {
        let l = server_listener(family, port)?;
        l.set_nonblocking(true)?;
        runtime()?.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l)?;
            ready_tx.send(()).ok();
            let mut tasks = Vec::with_capacity(FLOWS);
            for _ in 0..FLOWS {
                let (mut s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                let (received, stop) = (srv_received.clone(), srv_stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; if bulk { 64 * 1024 } else { 1 }];
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        received.fetch_add(n as u64, Relaxed);
                        if !bulk && (stop.load(Relaxed) || s.write_all(&buf).await.is_err()) {
                            return;
                        }
                    }
                }));
            }
            for t in tasks {
                t.await?;
            }
            anyhow::Ok(())
        })
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("many-flows server did not start")?;
    let ip = path.ip;
    let (cli_stop, cli_measuring) = (stop.clone(), measuring.clone());
    let cli = spawn_in_netns(&path.client, move || {
        if let Some((cpu, _)) = pinned() {
            pin_thread(cpu)?;
        }
        runtime()?.block_on(async move {
            let to = SocketAddr::new(ip, port);
            let mut conns = Vec::with_capacity(FLOWS);
            for _ in 0..FLOWS {
                let s = tokio::net::TcpStream::connect(to).await?;
                s.set_nodelay(true)?;
                conns.push(s);
            }
            let tasks: Vec<_> = conns
                .into_iter()
                .map(|mut s| {
                    let (stop, measuring) = (cli_stop.clone(), cli_measuring.clone());
                    tokio::spawn(async move {
                        let mut times = Vec::new();
                        let msg = vec![0x5au8; if bulk { 16 * 1024 } else { 1 }];
                        let mut b = [0u8; 1];
                        while !stop.load(Relaxed) {
                            let t = Instant::now();
                            if s.write_all(&msg).await.is_err() {
                                break;
                            }
                            if !bulk {
                                if s.read_exact(&mut b).await.is_err() {
                                    break;
                                }
                                if measuring.load(Relaxed) {
                                    times.push(t.elapsed().as_secs_f64() * 1e6);
                                }
                            }
                        }
                        times
                    })
                })
                .collect();
            let mut times = Vec::new();
            for t in tasks {
                times.extend(t.await?);
            }
            anyhow::Ok(times)
        })
    })?;
    let settle = Instant::now() + Duration::from_secs(10);
    // Measured once every flow is connected and moving.
    while received.load(Relaxed) < FLOWS as u64 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (b0, t0) = (received.load(Relaxed), Instant::now());
    measuring.store(true, Relaxed);
    std::thread::sleep(Duration::from_secs(u64::from(secs)));
    measuring.store(false, Relaxed);
    let (b1, window) = (received.load(Relaxed), t0.elapsed().as_secs_f64());
    stop.store(true, Relaxed);
    let times = cli
        .join()
        .map_err(|_| anyhow::anyhow!("many-flows client panicked"))??;
    srv.join()
        .map_err(|_| anyhow::anyhow!("many-flows server panicked"))??;
    if bulk {
        return Ok(((b1 - b0) as f64 * 8.0 / window / 1e9, 0.0));
    }
    if times.is_empty() {
        bail!(
            "no transaction completed over {FLOWS} flows on the {} path",
            path.name
        );
    }
    let mut t = times;
    t.sort_by(|a, b| a.total_cmp(b));
    let p99 = t[((t.len() - 1) as f64 * 0.99) as usize];
    Ok((p99, t.len() as f64 / window))
}

/// What each round measures on every cross-node path.
const METRICS: [&str; 16] = [
    "tcp1",
    "tcp4",
    "cpu_per_gbit",
    "paced_gbit",
    "cpu_per_gbit_max",
    "udp64_kpps",
    "rr1_p50",
    "rr1_p99",
    "rr1_tps",
    "rr1k_p50",
    "rr1k_p99",
    "rr1k_tps",
    "crr_cps",
    "flows_gbit",
    "flows_rr_p99",
    "flows_rr_tps",
];

/// Each path's figures: metric → the statistics of its rounds.
fn per_path(
    paths: &[Path],
    m: &std::collections::BTreeMap<&str, Vec<Vec<f64>>>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, p) in paths.iter().enumerate() {
        let o: Map<String, Value> = m
            .iter()
            .map(|(key, runs)| (key.to_string(), stats(&runs[k])))
            .collect();
        out.insert(p.name.into(), Value::Object(o));
    }
    out
}

struct Path {
    name: &'static str,
    client: String,
    server: String,
    ip: IpAddr,
}

fn data_path(o: &Opts) -> Result<(Value, Value, Value)> {
    println!(
        "building the lab: 2 eBPF nodes, 2 kernel-path nodes, 2 eBPF nodes with --netfilter-compat on ..."
    );
    const COMPAT: &[&str] = &["--netfilter-compat", "on"];
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 2),
        NodeSpec::new(NodeKind::Ebpf, 1),
        NodeSpec::new(NodeKind::Kernel, 2),
        NodeSpec::new(NodeKind::Kernel, 1),
        NodeSpec::new(NodeKind::Ebpf, 1).with_args(COMPAT),
        NodeSpec::new(NodeKind::Ebpf, 1).with_args(COMPAT),
    ])?;
    // Pod (i, j) to pod (k, l).
    let pods = |name, (i, j), (k, l)| Path {
        name,
        client: lab.pod((i, j)).ns.clone(),
        server: lab.pod((k, l)).ns.clone(),
        ip: lab.pod((k, l)).ip.into(),
    };
    let cross = [
        pods("ebpf", (0, 0), (1, 0)),
        pods("kernel", (2, 0), (3, 0)),
        // Pod traffic through the kernel's forward hook (decapsulated in
        // eBPF, routed by the kernel; encapsulated by flannel.1).
        pods("ebpf_netfilter", (4, 0), (5, 0)),
        Path {
            name: "limit",
            client: lab.nodes[2].ns.clone(),
            server: lab.nodes[3].ns.clone(),
            ip: lab.nodes[3].ip.into(),
        },
    ];
    let same = [pods("ebpf", (0, 0), (0, 1)), pods("kernel", (2, 0), (2, 1))];
    type Runs = Vec<Vec<f64>>;
    let n = cross.len();
    let mut m: std::collections::BTreeMap<&str, Runs> = Default::default();
    for key in METRICS {
        m.insert(key, vec![Vec::new(); n]);
    }
    let iperf = Iperf::default();
    // One RR connection per path and message size, open for all rounds.
    let mut sessions = Vec::new();
    for (k, p) in cross.iter().enumerate() {
        let one = RrSession::open(p, 5302 + 2 * k as u16, 1)?;
        let kb = RrSession::open(p, 5303 + 2 * k as u16, 1024)?;
        sessions.push((one, kb));
    }
    let share = (o.rr_count / o.runs).max(100);
    for run in 0..o.runs {
        println!("cross-node round {}/{} ...", run + 1, o.runs);
        for (k, p) in cross.iter().enumerate() {
            let mut put = |key: &str, v: f64| m.get_mut(key).expect("a METRICS key")[k].push(v);
            let (g, cpu) = tcp(&iperf, p, o.secs, 1, None)?;
            put("tcp1", g);
            put("cpu_per_gbit_max", cpu);
            let (g, cpu) = tcp(&iperf, p, o.secs, 1, Some(PACED_GBIT))?;
            put("paced_gbit", g);
            put("cpu_per_gbit", cpu);
            put("tcp4", tcp(&iperf, p, o.secs, 4, None)?.0);
            put("udp64_kpps", udp64(&iperf, p, o.secs)?);
            let (a, b, c) = sessions[k].0.run(share)?;
            put("rr1_p50", a);
            put("rr1_p99", b);
            put("rr1_tps", c);
            let (a, b, c) = sessions[k].1.run(share)?;
            put("rr1k_p50", a);
            put("rr1k_p99", b);
            put("rr1k_tps", c);
            put("crr_cps", crr(p, 5320 + k as u16, o.secs)?);
            put(
                "flows_gbit",
                many_flows(p, 5340 + k as u16, o.secs, true)?.0,
            );
            let (p99, tps) = many_flows(p, 5340 + k as u16, o.secs, false)?;
            put("flows_rr_p99", p99);
            put("flows_rr_tps", tps);
        }
    }
    for (one, kb) in sessions {
        one.close()?;
        kb.close()?;
    }
    let mut cross_json = per_path(&cross, &m);
    let mut same_json = Map::new();
    let sessions = same
        .iter()
        .enumerate()
        .map(|(k, p)| RrSession::open(p, 5310 + k as u16, 1))
        .collect::<Result<Vec<_>>>()?;
    let mut t = vec![Vec::new(); same.len()];
    let mut l = vec![Vec::new(); same.len()];
    let mut c = vec![Vec::new(); same.len()];
    for run in 0..o.runs {
        println!("same-node round {}/{} ...", run + 1, o.runs);
        for (k, p) in same.iter().enumerate() {
            t[k].push(tcp(&iperf, p, o.secs, 1, None)?.0);
            l[k].push(sessions[k].run(share)?.0);
            c[k].push(crr(p, 5330 + k as u16, o.secs)?);
        }
    }
    for s in sessions {
        s.close()?;
    }
    for (k, p) in same.iter().enumerate() {
        same_json.insert(
            p.name.into(),
            json!({"tcp1": stats(&t[k]), "rr1_p50": stats(&l[k]), "crr_cps": stats(&c[k])}),
        );
    }
    let monitor_json = monitor_rounds(o, &lab, &iperf, &cross[0])?;
    // Which path the eBPF runs took, from the counters.
    let c0 = lab.nodes[0].counters()?;
    let c1 = lab.nodes[1].counters()?;
    // How the eBPF nodes run (XDP mode and uplink), for comparing runs.
    cross_json.insert("ebpf_datapath".into(), json!(lab.nodes[0].status()?.reason));
    cross_json.insert(
        "ebpf_counters".into(),
        json!({
            "node1_pod_encap_redirect": c0["pod_encap_redirect"],
            "node1_pod_local_redirect": c0["pod_local_redirect"],
            "node2_xdp_decap": c1["xdp_decap"],
            "node2_uplink_decap": c1["uplink_decap"],
            "node2_uplink_redirect": c1["uplink_redirect"],
        }),
    );
    Ok((
        Value::Object(cross_json),
        Value::Object(same_json),
        monitor_json,
    ))
}

/// What each round measures on an uplink MTU of 9000.
const JUMBO_METRICS: [&str; 5] = ["tcp1", "tcp4", "cpu_per_gbit", "rr1k_p50", "flows_gbit"];

/// What each round measures on the DirectRouting lab.
const DIRECT_METRICS: [&str; 8] = [
    "tcp1",
    "tcp4",
    "cpu_per_gbit",
    "udp64_kpps",
    "rr1_p50",
    "rr1_p99",
    "rr1k_p50",
    "crr_cps",
];

/// A lab beside the main one, for the paths of another setting: its
/// eBPF pod pair, kernel-path pod pair and node-to-node, each round the
/// same `metrics` (names as in [`METRICS`]) back to back.
struct SideLab {
    title: &'static str,
    opts: flannel_tests::lab::LabOptions,
    metrics: &'static [&'static str],
    /// First of the ports the round's servers listen on.
    port: u16,
    /// Measure over IPv6 (a dual-stack lab's pods and nodes).
    ipv6: bool,
}

/// The MTU 9000 lab: the workloads the MTU changes (bulk TCP, its CPU
/// cost, 1 KB request/response and many flows), pods at 8950.
fn jumbo(o: &Opts) -> Result<Value> {
    side_lab(
        o,
        SideLab {
            title: "MTU 9000",
            opts: flannel_tests::lab::LabOptions {
                uplink_mtu: Some(9000),
                ..Default::default()
            },
            metrics: &JUMBO_METRICS,
            port: 5350,
            ipv6: false,
        },
    )
}

/// The DirectRouting lab: every node on one L2 network, so pods are
/// routed to directly (`pod_direct_redirect`), no VXLAN, on the eBPF and
/// the kernel path alike; pods keep the VXLAN MTU (1450), as Flannel's.
fn direct(o: &Opts) -> Result<Value> {
    side_lab(
        o,
        SideLab {
            title: "DirectRouting",
            opts: flannel_tests::lab::LabOptions {
                net_conf: Some(
                    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1,"Port":4789,"DirectRouting":true}}"#
                        .into(),
                ),
                ..Default::default()
            },
            metrics: &DIRECT_METRICS,
            port: 5370,
            ipv6: false,
        },
    )
}

/// The IPv6 cross-node path of a dual-stack VXLAN lab: pods over IPv6 on
/// eBPF nodes (the programs encapsulate and decapsulate, GSO packets
/// aside) and on kernel-path nodes (`flannel-v6.1`), and node-to-node over
/// IPv6.
fn ipv6(o: &Opts) -> Result<Value> {
    side_lab(
        o,
        SideLab {
            title: "IPv6 (dual-stack)",
            opts: flannel_tests::lab::LabOptions {
                net_conf: Some(
                    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":1,"Port":4789}}"#
                        .into(),
                ),
                ..Default::default()
            },
            metrics: &DIRECT_METRICS,
            port: 5390,
            ipv6: true,
        },
    )
}

/// The IPv6 path of a dual-stack DirectRouting lab: pods over IPv6 routed
/// directly by the eBPF programs (`pod_direct6_redirect`) and by the
/// kernel's routes via the node's IPv6, against node-to-node over IPv6.
fn ipv6_direct(o: &Opts) -> Result<Value> {
    side_lab(
        o,
        SideLab {
            title: "IPv6 DirectRouting (dual-stack)",
            opts: flannel_tests::lab::LabOptions {
                net_conf: Some(
                    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":1,"Port":4789,"DirectRouting":true}}"#
                        .into(),
                ),
                ..Default::default()
            },
            metrics: &DIRECT_METRICS,
            port: 5410,
            ipv6: true,
        },
    )
}

fn side_lab(o: &Opts, side: SideLab) -> Result<Value> {
    println!(
        "building the {} lab: 2 eBPF nodes, 2 kernel-path nodes ...",
        side.title
    );
    let lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
        ],
        side.opts,
    )?;
    let pod_ip = |k: usize| -> Result<IpAddr> {
        Ok(match side.ipv6 {
            true => lab.pod((k, 0)).ip6.context("a pod without IPv6")?.into(),
            false => lab.pod((k, 0)).ip.into(),
        })
    };
    let node_ip = match side.ipv6 {
        true => lab.nodes[3].ip6.context("a node without IPv6")?.into(),
        false => lab.nodes[3].ip.into(),
    };
    let pods = |name, i: usize, k: usize| -> Result<Path> {
        Ok(Path {
            name,
            client: lab.pod((i, 0)).ns.clone(),
            server: lab.pod((k, 0)).ns.clone(),
            ip: pod_ip(k)?,
        })
    };
    let paths = [
        pods("ebpf", 0, 1)?,
        pods("kernel", 2, 3)?,
        Path {
            name: "limit",
            client: lab.nodes[2].ns.clone(),
            server: lab.nodes[3].ns.clone(),
            ip: node_ip,
        },
    ];
    let iperf = Iperf::default();
    let mut m: std::collections::BTreeMap<&str, Vec<Vec<f64>>> = side
        .metrics
        .iter()
        .map(|k| (*k, vec![Vec::new(); paths.len()]))
        .collect();
    let port = |n: usize, k: usize| side.port + (n * paths.len() + k) as u16;
    let sessions = paths
        .iter()
        .enumerate()
        .map(|(k, p)| {
            Ok((
                RrSession::open(p, port(0, k), 1)?,
                RrSession::open(p, port(1, k), 1024)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let share = (o.rr_count / o.runs).max(100);
    for run in 0..o.runs {
        println!("{} round {}/{} ...", side.title, run + 1, o.runs);
        for (k, p) in paths.iter().enumerate() {
            let mut got: Vec<(String, f64)> = Vec::new();
            for key in side.metrics {
                match *key {
                    "tcp1" => got.push((key.to_string(), tcp(&iperf, p, o.secs, 1, None)?.0)),
                    "tcp4" => got.push((key.to_string(), tcp(&iperf, p, o.secs, 4, None)?.0)),
                    "cpu_per_gbit" => got.push((
                        key.to_string(),
                        tcp(&iperf, p, o.secs, 1, Some(PACED_GBIT))?.1,
                    )),
                    "udp64_kpps" => got.push((key.to_string(), udp64(&iperf, p, o.secs)?)),
                    "crr_cps" => got.push((key.to_string(), crr(p, port(2, k), o.secs)?)),
                    "flows_gbit" => {
                        got.push((key.to_string(), many_flows(p, port(3, k), o.secs, true)?.0))
                    }
                    "rr1_p50" | "rr1k_p50" => {
                        let s = if *key == "rr1_p50" {
                            &sessions[k].0
                        } else {
                            &sessions[k].1
                        };
                        let (p50, p99, _) = s.run(share)?;
                        got.push((key.to_string(), p50));
                        got.push((key.replace("p50", "p99"), p99));
                    }
                    // Measured with its p50.
                    "rr1_p99" | "rr1k_p99" => {}
                    other => bail!("no metric {other} in a side lab"),
                }
            }
            for (key, v) in got {
                if let Some(runs) = m.get_mut(key.as_str()) {
                    runs[k].push(v);
                }
            }
        }
    }
    for (one, kb) in sessions {
        one.close()?;
        kb.close()?;
    }
    let c0 = lab.nodes[0].counters()?;
    let c = lab.nodes[1].counters()?;
    let mut out = per_path(&paths, &m);
    out.insert("pod_mtu".into(), json!(lab.pod_mtu()));
    out.insert(
        "ebpf_counters".into(),
        json!({
            "node1_pod_encap_redirect": c0["pod_encap_redirect"],
            "node1_pod_direct_redirect": c0["pod_direct_redirect"],
            "node1_pod_pass_not_ipv4": c0["pod_pass_not_ipv4"],
            "node1_pod_encap6_redirect": c0["pod_encap6_redirect"],
            "node1_pod_direct6_redirect": c0["pod_direct6_redirect"],
            "node1_pod_pass_gso6": c0["pod_pass_gso6"],
            "node2_uplink_decap6": c["uplink_decap6"],
            "node2_xdp_decap6": c["xdp_decap6"],
            "node2_uplink_decap": c["uplink_decap"],
            "node2_xdp_decap": c["xdp_decap"],
        }),
    );
    Ok(Value::Object(out))
}

/// The eBPF cross-node path with `flannel-agent monitor --type all`
/// running on both of its nodes against without, in paired rounds (off
/// then on), for TCP 1 stream and UDP 64 B.
fn monitor_rounds(o: &Opts, lab: &Lab, iperf: &Iperf, path: &Path) -> Result<Value> {
    let mut runs: [[Vec<f64>; 2]; 2] = Default::default();
    for run in 0..o.runs {
        println!("monitor off/on round {}/{} ...", run + 1, o.runs);
        for (on, slot) in runs.iter_mut().enumerate() {
            let mut monitors = Vec::new();
            if on == 1 {
                for i in [0, 1] {
                    let mut cmd =
                        command_in_netns(flannel_tests::lab::agent_bin()?, &lab.nodes[i].ns)?;
                    cmd.arg("monitor")
                        .arg("--bpf-dir")
                        .arg(&lab.nodes[i].bpf_dir)
                        .args(["--type", "all", "-o", "json"])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null());
                    monitors.push(cmd.spawn().context("starting flannel-agent monitor")?);
                }
                lab.wait_for(Duration::from_secs(10), "monitors on", |lab| {
                    [0, 1].iter().all(|&i| {
                        flannel_agent::datapath::monitor::config(&lab.nodes[i].bpf_dir)
                            .is_ok_and(|c| c.mask != 0)
                    })
                })?;
            }
            slot[0].push(tcp(iperf, path, o.secs, 1, None)?.0);
            slot[1].push(udp64(iperf, path, o.secs)?);
            for mut m in monitors {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(m.id() as i32, libc::SIGINT) };
                m.wait()?;
            }
        }
    }
    let (sent, suppressed, lost) = flannel_agent::datapath::monitor::totals(&lab.nodes[0].bpf_dir)?;
    let side = |k: usize| json!({"tcp1": stats(&runs[k][0]), "udp64_kpps": stats(&runs[k][1])});
    Ok(json!({
        "off": side(0),
        "on": side(1),
        "node1_events": {"sent": sent, "suppressed": suppressed, "lost": lost},
    }))
}

/// ns per packet for each program and verdict, each run checked by its
/// counter to have taken the intended path.
fn program_costs(o: &Opts) -> Result<Value> {
    let runs = o.test_runs;
    let ns = Netns::new()?;
    let name = ns.0.clone();
    let ns = std::sync::Arc::new(ns);
    let inner = ns.clone();
    in_netns(&name, move || {
        let mut h = Harness::new(inner.uplink_index()?)?;
        // TC decap on too: it only changes tc_uplink_ingress.
        h.set_config(
            inner.uplink_index()?,
            flannel_common::CONFIG_F_READY | flannel_common::CONFIG_F_TC_DECAP,
        )?;
        inner.set_neigh(true)?;
        let mut out = Map::new();
        // One packet per run: encap and decap change the packet, and the
        // kernel's `repeat` would run them on their own output.
        let measure = |h: &Harness, what: &str, prog: &str, pkt: &[u8], counter: &str| {
            let before = h.counter(counter);
            let mut total = Duration::ZERO;
            for _ in 0..runs {
                let opts = TestRunOptions {
                    data_in: Some(pkt),
                    ..TestRunOptions::new()
                };
                let r = if prog == programs::XDP_UPLINK {
                    let p: &Xdp = h.bpf.program(prog).context(prog.to_string())?.try_into()?;
                    p.test_run(opts)?
                } else {
                    let p: &SchedClassifier =
                        h.bpf.program(prog).context(prog.to_string())?.try_into()?;
                    p.test_run(opts)?
                };
                total += r.duration;
            }
            let moved = h.counter(counter) - before;
            if moved != u64::from(runs) {
                bail!("{what}: {counter} moved {moved}, not {runs}");
            }
            Ok(total.as_secs_f64() * 1e9 / f64::from(runs))
        };
        let cases = |size: usize| -> [(&str, &str, Vec<u8>, &str); 5] {
            let vx = progtest::vxlan_frame(
                progtest::REMOTE_IP,
                progtest::PORT,
                progtest::VNI,
                0x08,
                &progtest::sized_inner_frame(progtest::LOCAL_POD, size),
            );
            [
                (
                    "encap",
                    programs::TC_FROM_POD,
                    progtest::sized_pod_frame(progtest::REMOTE_POD, size),
                    "pod_encap_redirect",
                ),
                (
                    "local_redirect",
                    programs::TC_FROM_POD,
                    progtest::sized_pod_frame(progtest::LOCAL_POD, size),
                    "pod_local_redirect",
                ),
                (
                    "pass",
                    programs::TC_FROM_POD,
                    progtest::sized_pod_frame(Ipv4Addr::new(172, 30, 9, 50), size),
                    "pod_pass_not_pod_dst",
                ),
                ("decap", programs::XDP_UPLINK, vx.clone(), "xdp_decap"),
                ("tc_decap", programs::TC_UPLINK_INGRESS, vx, "uplink_decap"),
            ]
        };
        for size in [64usize, 512, 1450] {
            for (what, prog, pkt, counter) in cases(size) {
                let ns = measure(&h, &format!("{what} at {size} B"), prog, &pkt, counter)?;
                out.insert(format!("{what}_{size}"), json!(ns));
            }
        }
        // The same 64-byte cases as the maps grow: 10 remote leases, then
        // 5,000 remote leases and 250 pods (the cost must not grow). The
        // harness holds one remote and two pods of its own.
        for (remotes, pods, label) in [(9, 0, "10_remotes"), (4_999, 248, "5000_remotes_250_pods")]
        {
            h.fill(remotes, pods)?;
            for (what, prog, pkt, counter) in cases(64) {
                let ns = measure(&h, &format!("{what} with {label}"), prog, &pkt, counter)?;
                out.insert(format!("{what}_64_{label}"), json!(ns));
            }
        }
        Ok(Value::Object(out))
    })
}

/// Time and agent memory to program N remote leases, eBPF and kernel node.
fn control_plane(o: &Opts) -> Result<Value> {
    use flannel_agent::{mac::MacAddr, subnet::LeaseAttrs};
    use ipnet::Ipv4Net;
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 0),
        NodeSpec::new(NodeKind::Kernel, 0),
        NodeSpec::new(NodeKind::Ebpf, 0),
    ])?;
    let store = lab.local_store()?;
    let mut out = Map::new();
    for &n in &o.leases {
        let leases: Vec<(Ipv4Net, LeaseAttrs)> = (1000..1000 + n as u32)
            .map(|k| {
                let b = k.to_be_bytes();
                (
                    Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (k << 8)), 24).expect("valid"),
                    LeaseAttrs::vxlan(
                        Ipv4Addr::from(0x0a63_0000 + k),
                        1,
                        MacAddr([0x0e, 0x77, b[0], b[1], b[2], b[3]]),
                    ),
                )
            })
            .collect();
        let rss0: Vec<u64> = (0..2)
            .map(|i| lab.agent_rss_kib(i))
            .collect::<Result<_>>()?;
        // All the lab's nodes share one kernel, and with it the RTNL lock
        // and the CPUs; on a cluster each node has its own. So each
        // measured node programs the leases alone: the others are paused
        // while it does, and it is timed from the moment it may run. The
        // wait after the write outlasts the local store's 100 ms poll, so
        // every node finds the change at once when it runs: the figure is
        // the node's programming, not the store's propagation delay.
        for i in 0..lab.nodes.len() {
            lab.pause_agent(i, true)?;
        }
        store.put_many(&leases, Some(Duration::from_secs(600)))?;
        std::thread::sleep(Duration::from_millis(300));
        let want = n + 2;
        let mut took = [f64::NAN; 2];
        for (i, slot) in took.iter_mut().enumerate() {
            lab.pause_agent(i, false)?;
            let t = Instant::now();
            loop {
                if t.elapsed() > Duration::from_secs(300) {
                    bail!("{n} leases not programmed on node {} in 300 s", i + 1);
                }
                if lab.nodes[i].status().is_ok_and(|s| s.remote_leases == want) {
                    let (m, k) = lab.remote_state(i);
                    if k.len() == want && (lab.nodes[i].kind != NodeKind::Ebpf || m.len() == want) {
                        *slot = t.elapsed().as_secs_f64();
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            lab.pause_agent(i, true)?;
        }
        for i in 0..lab.nodes.len() {
            lab.pause_agent(i, false)?;
        }
        let rss1: Vec<u64> = (0..2)
            .map(|i| lab.agent_rss_kib(i))
            .collect::<Result<_>>()?;
        out.insert(
            format!("leases_{n}"),
            json!({
                "ebpf_secs": took[0], "kernel_secs": took[1],
                "ebpf_rss_kib": [rss0[0], rss1[0]], "kernel_rss_kib": [rss0[1], rss1[1]],
            }),
        );
        let subnets: Vec<Ipv4Net> = leases.iter().map(|(s, _)| *s).collect();
        store.delete_many(&subnets)?;
        lab.wait_for(Duration::from_secs(300), "leases removed", |lab| {
            (0..2).all(|i| lab.nodes[i].status().is_ok_and(|s| s.remote_leases == 2))
        })?;
    }
    Ok(Value::Object(out))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    json!({"cpu": cpu, "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "memory_gib": mem, "kernel": kernel})
}

/// Per-round ratios of path `a` to path `b` for `metric` in `section`
/// (`cross_node` or `same_node`): median, min, max and the rounds.
fn paired(section: &Value, metric: &str, a: &str, b: &str) -> Value {
    let runs = |p: &str| -> Vec<f64> {
        section[p][metric]["runs"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let r: Vec<f64> = runs(a)
        .iter()
        .zip(runs(b))
        .filter(|(_, y)| *y != 0.0)
        .map(|(x, y)| (x / y * 1000.0).round() / 1000.0)
        .collect();
    if r.is_empty() {
        Value::Null
    } else {
        stats(&r)
    }
}

fn markdown(r: &Value) -> String {
    let c = &r["cross_node"];
    let g = |p: &str, k: &str| median(&c[p][k]);
    let mut s = String::new();
    s += &format!(
        "Machine: {} ({} CPUs, {} GiB), kernel {}. Mode: {} ({} rounds of {} s runs, client/server CPUs {}). eBPF nodes: {}.\n\n",
        r["machine"]["cpu"].as_str().unwrap_or(""),
        r["machine"]["cpus"],
        r["machine"]["memory_gib"],
        r["machine"]["kernel"].as_str().unwrap_or(""),
        r["mode"].as_str().unwrap_or(""),
        r["settings"]["runs"],
        r["settings"]["secs"],
        match &r["settings"]["client_server_cpus"] {
            Value::Array(v) => format!("{}/{}", v[0], v[1]),
            _ => "not pinned".to_string(),
        },
        r["cross_node"]["ebpf_datapath"].as_str().unwrap_or("?"),
    );
    s += "| cross-node, median of rounds | eBPF | eBPF, netfilter-compat | kernel path | node-to-node | eBPF / node-to-node | eBPF / kernel | compat / kernel |\n|---|---|---|---|---|---|---|---|\n";
    let pr = |k: String| {
        let v = &r["paired_ratios"][k];
        if v.is_object() {
            format!(
                "{:.2} ({:.2}–{:.2})",
                median(v),
                v["min"].as_f64().unwrap_or(f64::NAN),
                v["max"].as_f64().unwrap_or(f64::NAN)
            )
        } else {
            "–".to_string()
        }
    };
    let paced = format!("CPU s per Gbit, 1 stream paced to {PACED_GBIT} Gbit/s");
    let rows: [(&str, &str); 16] = [
        ("TCP 1 stream (Gbit/s)", "tcp1"),
        ("TCP 4 streams (Gbit/s)", "tcp4"),
        (&paced, "cpu_per_gbit"),
        ("(paced stream's Gbit/s)", "paced_gbit"),
        ("CPU s per Gbit, 1 stream at full speed", "cpu_per_gbit_max"),
        ("UDP 64 B (kpps received)", "udp64_kpps"),
        ("TCP RR 1 B p50 (µs)", "rr1_p50"),
        ("TCP RR 1 B p99 (µs)", "rr1_p99"),
        ("TCP RR 1 B (trans/s)", "rr1_tps"),
        ("TCP RR 1 KB p50 (µs)", "rr1k_p50"),
        ("TCP RR 1 KB p99 (µs)", "rr1k_p99"),
        ("TCP RR 1 KB (trans/s)", "rr1k_tps"),
        ("TCP connect/1 B RR/close (conn/s)", "crr_cps"),
        ("1,000 TCP flows, aggregate (Gbit/s)", "flows_gbit"),
        ("1,000 TCP flows, 1 B RR p99 (µs)", "flows_rr_p99"),
        ("1,000 TCP flows, 1 B RR (trans/s)", "flows_rr_tps"),
    ];
    for (label, k) in rows {
        let (e, nf, kk, l) = (
            g("ebpf", k),
            g("ebpf_netfilter", k),
            g("kernel", k),
            g("limit", k),
        );
        let f = |x: f64| {
            if x >= 100.0 {
                format!("{x:.0}")
            } else if x >= 1.0 {
                format!("{x:.2}")
            } else {
                format!("{x:.3}")
            }
        };
        s += &format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |\n",
            f(e),
            f(nf),
            f(kk),
            f(l),
            pr(format!("{k}_ebpf_over_limit")),
            pr(format!("{k}_ebpf_over_kernel")),
            pr(format!("{k}_netfilter_over_kernel")),
        );
    }
    let j = &r["jumbo"];
    s += &format!(
        "\n| cross-node, uplink MTU 9000 (pods {}), median of rounds | eBPF | kernel path | node-to-node | eBPF / node-to-node | eBPF / kernel |\n|---|---|---|---|---|---|\n",
        j["pod_mtu"]
    );
    for (label, k) in [
        ("TCP 1 stream (Gbit/s)", "tcp1"),
        ("TCP 4 streams (Gbit/s)", "tcp4"),
        (paced.as_str(), "cpu_per_gbit"),
        ("TCP RR 1 KB p50 (µs)", "rr1k_p50"),
        ("1,000 TCP flows, aggregate (Gbit/s)", "flows_gbit"),
    ] {
        s += &format!(
            "| {label} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            median(&j["ebpf"][k]),
            median(&j["kernel"][k]),
            median(&j["limit"][k]),
            pr(format!("jumbo_{k}_ebpf_over_limit")),
            pr(format!("jumbo_{k}_ebpf_over_kernel")),
        );
    }
    for (section, title) in [
        ("direct", "cross-node, DirectRouting (no VXLAN)"),
        ("ipv6", "cross-node over IPv6, dual-stack VXLAN"),
        (
            "ipv6_direct",
            "cross-node over IPv6, dual-stack DirectRouting (no VXLAN)",
        ),
    ] {
        let d = &r[section];
        s += &format!(
            "\n| {title}, pods {}, median of rounds | eBPF | kernel path | node-to-node | eBPF / node-to-node | eBPF / kernel |\n|---|---|---|---|---|---|\n",
            d["pod_mtu"]
        );
        for (label, k) in [
            ("TCP 1 stream (Gbit/s)", "tcp1"),
            ("TCP 4 streams (Gbit/s)", "tcp4"),
            (paced.as_str(), "cpu_per_gbit"),
            ("UDP 64 B (kpps received)", "udp64_kpps"),
            ("TCP RR 1 B p50 (µs)", "rr1_p50"),
            ("TCP RR 1 B p99 (µs)", "rr1_p99"),
            ("TCP RR 1 KB p50 (µs)", "rr1k_p50"),
            ("TCP connect/1 B RR/close (conn/s)", "crr_cps"),
        ] {
            s += &format!(
                "| {label} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
                median(&d["ebpf"][k]),
                median(&d["kernel"][k]),
                median(&d["limit"][k]),
                pr(format!("{section}_{k}_ebpf_over_limit")),
                pr(format!("{section}_{k}_ebpf_over_kernel")),
            );
        }
    }
    let sm = &r["same_node"];
    s += &format!(
        "\n| same node, median of rounds | eBPF (redirect) | kernel (bridge) | eBPF / kernel |\n|---|---|---|---|\n| TCP 1 stream (Gbit/s) | {:.2} | {:.2} | {} |\n| TCP RR 1 B p50 (µs) | {:.1} | {:.1} | {} |\n| TCP connect/1 B RR/close (conn/s) | {:.0} | {:.0} | {} |\n",
        median(&sm["ebpf"]["tcp1"]), median(&sm["kernel"]["tcp1"]), pr("same_node_tcp1_ebpf_over_kernel".into()),
        median(&sm["ebpf"]["rr1_p50"]), median(&sm["kernel"]["rr1_p50"]), pr("same_node_rr1_p50_ebpf_over_kernel".into()),
        median(&sm["ebpf"]["crr_cps"]), median(&sm["kernel"]["crr_cps"]), pr("same_node_crr_cps_ebpf_over_kernel".into()),
    );
    let mo = &r["monitor"];
    s += &format!(
        "\n| eBPF cross-node, `flannel-agent monitor --type all` on both nodes | off | on | on / off |\n|---|---|---|---|\n| TCP 1 stream (Gbit/s) | {:.2} | {:.2} | {} |\n| UDP 64 B (kpps received) | {:.0} | {:.0} | {} |\n",
        median(&mo["off"]["tcp1"]), median(&mo["on"]["tcp1"]), pr("monitor_on_over_off_tcp1".into()),
        median(&mo["off"]["udp64_kpps"]), median(&mo["on"]["udp64_kpps"]), pr("monitor_on_over_off_udp64_kpps".into()),
    );
    s +=
        "\n| program (BPF_PROG_TEST_RUN, ns/packet) | 64 B | 512 B | 1450 B |\n|---|---|---|---|\n";
    for p in ["encap", "decap", "tc_decap", "local_redirect", "pass"] {
        let v = |n: usize| {
            r["programs"][format!("{p}_{n}")]
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        s += &format!("| {p} | {:.0} | {:.0} | {:.0} |\n", v(64), v(512), v(1450));
    }
    s += "\n| program at 64 B (ns/packet) | 10 remote leases | 5,000 remote leases, 250 pods | / pass (10) | / pass (5,000) |\n|---|---|---|---|---|\n";
    for p in ["encap", "decap", "tc_decap", "local_redirect", "pass"] {
        let v = |p: &str, l: &str| {
            r["programs"][format!("{p}_64_{l}")]
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        let (small, big) = (v(p, "10_remotes"), v(p, "5000_remotes_250_pods"));
        s += &format!(
            "| {p} | {small:.0} | {big:.0} | {:.2} | {:.2} |\n",
            small / v("pass", "10_remotes"),
            big / v("pass", "5000_remotes_250_pods")
        );
    }
    s += "\n| remote leases | eBPF node (s) | kernel node (s) | eBPF agent RSS (MiB, before → after) | kernel agent RSS (MiB) |\n|---|---|---|---|---|\n";
    if let Some(cp) = r["control_plane"].as_object() {
        for (k, v) in cp {
            let mib = |a: &Value, i: usize| a[i].as_f64().unwrap_or(0.0) / 1024.0;
            s += &format!(
                "| {} | {:.2} | {:.2} | {:.0} → {:.0} | {:.0} → {:.0} |\n",
                k.trim_start_matches("leases_"),
                v["ebpf_secs"].as_f64().unwrap_or(f64::NAN),
                v["kernel_secs"].as_f64().unwrap_or(f64::NAN),
                mib(&v["ebpf_rss_kib"], 0),
                mib(&v["ebpf_rss_kib"], 1),
                mib(&v["kernel_rss_kib"], 0),
                mib(&v["kernel_rss_kib"], 1),
            );
        }
    }
    s += &format!("\nRatios: `{}`\n", r["ratios"]);
    s += "\nRatios are medians of per-round ratios (each round runs every path back to back), with the lowest and highest round in brackets.\n";
    s
}

/// Two grouped bar charts: throughput (Gbit/s) and RR latency (µs).
fn svg(r: &Value) -> String {
    let c = &r["cross_node"];
    let paths = [
        ("ebpf", "#2b8a3e"),
        ("kernel", "#c92a2a"),
        ("limit", "#868e96"),
    ];
    let panels: [(&str, [(&str, &str); 2]); 2] = [
        (
            "Throughput, Gbit/s (higher is better)",
            [("TCP 1 stream", "tcp1"), ("TCP 4 streams", "tcp4")],
        ),
        (
            "TCP RR 1 B latency, µs (lower is better)",
            [("p50", "rr1_p50"), ("p99", "rr1_p99")],
        ),
    ];
    let (w, ph) = (720.0, 220.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="12">"#,
        ph * 2.0 + 40.0
    );
    for (pi, (title, groups)) in panels.iter().enumerate() {
        let y0 = pi as f64 * ph + 20.0;
        s += &format!(
            r#"<text x="10" y="{}" font-weight="bold">{title}</text>"#,
            y0 + 4.0
        );
        let max = groups
            .iter()
            .flat_map(|(_, k)| paths.iter().map(move |(p, _)| median(&c[*p][*k])))
            .fold(0.0f64, |a, b| a.max(if b.is_finite() { b } else { 0.0 }));
        for (gi, (label, key)) in groups.iter().enumerate() {
            let gx = 60.0 + gi as f64 * 330.0;
            for (k, (p, color)) in paths.iter().enumerate() {
                let v = median(&c[*p][*key]);
                let h = if max > 0.0 && v.is_finite() {
                    v / max * (ph - 80.0)
                } else {
                    0.0
                };
                let x = gx + k as f64 * 90.0;
                let base = y0 + ph - 40.0;
                s += &format!(
                    r#"<rect x="{x}" y="{}" width="70" height="{h}" fill="{color}"/>"#,
                    base - h
                );
                s += &format!(
                    r#"<text x="{}" y="{}" text-anchor="middle">{v:.2}</text>"#,
                    x + 35.0,
                    base - h - 4.0
                );
                s += &format!(
                    r#"<text x="{}" y="{}" text-anchor="middle">{p}</text>"#,
                    x + 35.0,
                    base + 14.0
                );
            }
            s += &format!(
                r#"<text x="{}" y="{}" text-anchor="middle" font-style="italic">{label}</text>"#,
                gx + 125.0,
                y0 + ph - 10.0
            );
        }
    }
    s += "</svg>\n";
    s
}

/// One program cost over another, from the program-cost JSON.
fn prog_ratio(progs: &Value, a: &str, b: &str) -> Value {
    match (progs[a].as_f64(), progs[b].as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    }
}

fn main() -> Result<()> {
    flannel_tests::interrupt::clean_up_on_signals()?;
    let o = Opts::parse()?;
    std::fs::create_dir_all(&o.out)?;
    let started = Instant::now();
    if let Some(part) = &o.only {
        // One part on its own: its JSON only, beside (not over) a full report.
        let v = match part.as_str() {
            "data" => {
                let (cross, same, monitor) = data_path(&o)?;
                json!({"cross_node": cross, "same_node": same, "monitor": monitor})
            }
            "jumbo" => jumbo(&o)?,
            "direct" => direct(&o)?,
            "ipv6" => ipv6(&o)?,
            "ipv6-direct" => ipv6_direct(&o)?,
            "programs" => program_costs(&o)?,
            _ => control_plane(&o)?,
        };
        let file = o.out.join(format!("bench-{part}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&v)?)?;
        println!(
            "{}\nwrote {}",
            serde_json::to_string_pretty(&v)?,
            file.display()
        );
        return Ok(());
    }
    let (cross, same, monitor) = data_path(&o)?;
    let jumbo = jumbo(&o)?;
    let direct = direct(&o)?;
    let ipv6 = ipv6(&o)?;
    let ipv6_direct = ipv6_direct(&o)?;
    println!("program costs ({} runs per case) ...", o.test_runs);
    let progs = program_costs(&o)?;
    println!("control plane ({:?} leases) ...", o.leases);
    let cp = control_plane(&o)?;
    // Each round runs the paths back to back, so one round's ratio compares
    // runs made under the same conditions. The ratios reported are the
    // medians of those per-round ratios; their min and max, in
    // `paired_ratios`, show how much of a difference is the machine's noise.
    let mut paired_ratios = Map::new();
    for metric in METRICS {
        for (vs, b) in [("limit", "limit"), ("kernel", "kernel")] {
            paired_ratios.insert(
                format!("{metric}_ebpf_over_{vs}"),
                paired(&cross, metric, "ebpf", b),
            );
        }
    }
    for metric in METRICS {
        paired_ratios.insert(
            format!("{metric}_netfilter_over_kernel"),
            paired(&cross, metric, "ebpf_netfilter", "kernel"),
        );
    }
    for metric in JUMBO_METRICS {
        for vs in ["limit", "kernel"] {
            paired_ratios.insert(
                format!("jumbo_{metric}_ebpf_over_{vs}"),
                paired(&jumbo, metric, "ebpf", vs),
            );
        }
    }
    for metric in DIRECT_METRICS {
        for vs in ["limit", "kernel"] {
            paired_ratios.insert(
                format!("direct_{metric}_ebpf_over_{vs}"),
                paired(&direct, metric, "ebpf", vs),
            );
            paired_ratios.insert(
                format!("ipv6_{metric}_ebpf_over_{vs}"),
                paired(&ipv6, metric, "ebpf", vs),
            );
            paired_ratios.insert(
                format!("ipv6_direct_{metric}_ebpf_over_{vs}"),
                paired(&ipv6_direct, metric, "ebpf", vs),
            );
        }
    }
    for metric in ["tcp1", "rr1_p50", "crr_cps"] {
        paired_ratios.insert(
            format!("same_node_{metric}_ebpf_over_kernel"),
            paired(&same, metric, "ebpf", "kernel"),
        );
    }
    for metric in ["tcp1", "udp64_kpps"] {
        paired_ratios.insert(
            format!("monitor_on_over_off_{metric}"),
            paired(&monitor, metric, "on", "off"),
        );
    }
    let r = |k: &str| {
        paired_ratios
            .get(k)
            .map_or(Value::Null, |v| v["median"].clone())
    };
    let mut ratios = json!({
        "tcp1_ebpf_over_limit": r("tcp1_ebpf_over_limit"),
        "tcp1_ebpf_over_kernel": r("tcp1_ebpf_over_kernel"),
        "tcp4_ebpf_over_kernel": r("tcp4_ebpf_over_kernel"),
        "rr_p50_ebpf_over_limit": r("rr1_p50_ebpf_over_limit"),
        "rr_p50_ebpf_over_kernel": r("rr1_p50_ebpf_over_kernel"),
        "cpu_per_gbit_ebpf_over_kernel": r("cpu_per_gbit_ebpf_over_kernel"),
        "cpu_per_gbit_ebpf_over_limit": r("cpu_per_gbit_ebpf_over_limit"),
        "cpu_per_gbit_max_ebpf_over_kernel": r("cpu_per_gbit_max_ebpf_over_kernel"),
        "udp64_ebpf_over_kernel": r("udp64_kpps_ebpf_over_kernel"),
        "tcp1_netfilter_over_kernel": r("tcp1_netfilter_over_kernel"),
        "tcp4_netfilter_over_kernel": r("tcp4_netfilter_over_kernel"),
        "udp64_netfilter_over_kernel": r("udp64_kpps_netfilter_over_kernel"),
        "rr_p50_netfilter_over_kernel": r("rr1_p50_netfilter_over_kernel"),
        "cpu_per_gbit_netfilter_over_kernel": r("cpu_per_gbit_netfilter_over_kernel"),
        "same_node_tcp1_ebpf_over_kernel": r("same_node_tcp1_ebpf_over_kernel"),
        "crr_ebpf_over_limit": r("crr_cps_ebpf_over_limit"),
        "crr_ebpf_over_kernel": r("crr_cps_ebpf_over_kernel"),
        "crr_netfilter_over_kernel": r("crr_cps_netfilter_over_kernel"),
        "same_node_crr_ebpf_over_kernel": r("same_node_crr_cps_ebpf_over_kernel"),
        "monitor_on_over_off_tcp1": r("monitor_on_over_off_tcp1"),
        "encap_over_pass_64": prog_ratio(&progs, "encap_64", "pass_64"),
        "tc_decap_over_pass_64": prog_ratio(&progs, "tc_decap_64", "pass_64"),
        "encap_over_pass_5000_remotes": prog_ratio(&progs, "encap_64_5000_remotes_250_pods", "pass_64_5000_remotes_250_pods"),
        "tc_decap_over_pass_5000_remotes": prog_ratio(&progs, "tc_decap_64_5000_remotes_250_pods", "pass_64_5000_remotes_250_pods"),
        "encap_5000_over_10_remotes": prog_ratio(&progs, "encap_64_5000_remotes_250_pods", "encap_64_10_remotes"),
        "monitor_on_over_off_udp64": r("monitor_on_over_off_udp64_kpps"),
    });
    // The many-flows, MTU 9000 and DirectRouting ratios, under their
    // paired names.
    for key in paired_ratios.keys().filter(|k| {
        k.starts_with("jumbo_")
            || k.starts_with("direct_")
            || k.starts_with("ipv6_")
            || (k.starts_with("flows_") && k.contains("_ebpf_over_"))
    }) {
        ratios[key] = r(key);
    }
    let report = json!({
        "paired_ratios": paired_ratios,
        "mode": if o.quick { "quick" } else { "full" },
        "machine": machine(),
        "settings": {
            "secs": o.secs, "runs": o.runs, "rr_transactions": o.rr_count, "test_runs": o.test_runs,
            "client_server_cpus": pinned().map(|(c, s)| json!([c, s])),
        },
        "cross_node": cross,
        "jumbo": jumbo,
        "direct": direct,
        "ipv6": ipv6,
        "ipv6_direct": ipv6_direct,
        "same_node": same,
        "monitor": monitor,
        "programs": progs,
        "control_plane": cp,
        "ratios": ratios,
        "took_secs": started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        o.out.join("bench.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    let md = markdown(&report);
    std::fs::write(o.out.join("bench.md"), &md)?;
    std::fs::write(o.out.join("bench.svg"), svg(&report))?;
    println!("\n{md}");
    println!(
        "wrote {}/bench.{{json,md,svg}} in {:.0} s",
        o.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

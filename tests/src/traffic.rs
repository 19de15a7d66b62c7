//! Real traffic between lab pods: TCP and UDP request/response exchanges and
//! a byte-exact bulk transfer, over sockets opened inside pod namespaces.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::netns::{in_netns, spawn_in_netns};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Starts `serve` in `ns` and waits until it says it listens (it calls the
/// `ready` closure it is given once its socket is bound).
fn start_server<T: Send + 'static>(
    ns: &str,
    serve: impl FnOnce(&dyn Fn()) -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = spawn_in_netns(ns, move || {
        serve(&|| {
            ready_tx.send(()).ok();
        })
    })?;
    ready_rx
        .recv_timeout(TIMEOUT)
        .context("server did not start")?;
    Ok(handle)
}

fn join<T>(server: std::thread::JoinHandle<Result<T>>) -> Result<T> {
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))?
}

/// Waits for the echo server, then fails if the client saw a wrong echo.
fn finish(
    server: std::thread::JoinHandle<Result<()>>,
    echoed: Result<bool>,
    proto: &str,
) -> Result<()> {
    let served = join(server);
    if !echoed? {
        bail!("{proto} echo differs");
    }
    served
}

/// Deterministic pseudo-random payload (xorshift), so the receiver can
/// verify every byte without the sender shipping a copy.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A server in `server_ns` echoes one message from a client in
/// `client_ns` over TCP; the client checks the echo.
pub fn tcp_exchange(
    client_ns: &str,
    server_ns: &str,
    server_ip: impl Into<IpAddr>,
    port: u16,
) -> Result<()> {
    let addr = SocketAddr::new(server_ip.into(), port);
    tcp_exchange_via(client_ns, server_ns, addr, addr)
}

/// Like [`tcp_exchange`], with the server listening on `listen` and the
/// client connecting to `connect` (a NATed address, say a hostPort).
pub fn tcp_exchange_via(
    client_ns: &str,
    server_ns: &str,
    listen: impl Into<SocketAddr>,
    connect: impl Into<SocketAddr>,
) -> Result<()> {
    let (listen, connect): (SocketAddr, SocketAddr) = (listen.into(), connect.into());
    // The client goes first on failure, so the server never waits forever.
    let server = start_server(server_ns, move |ready| {
        let l = TcpListener::bind(listen)?;
        l.set_nonblocking(true)?;
        ready();
        let deadline = std::time::Instant::now() + TIMEOUT;
        let (mut s, _) = loop {
            match l.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        bail!("no client connected to {listen}");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf)?;
        s.write_all(&buf[..n])?;
        Ok(())
    })?;
    let msg = pattern(u64::from(connect.port()), 1000);
    let got = in_netns(client_ns, move || {
        let mut s = TcpStream::connect_timeout(&connect, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(&msg)?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf)?;
        Ok(buf == msg)
    });
    finish(server, got, "TCP")
}

/// Whether a TCP connection from `client_ns` to `to` is accepted within
/// a second (refused or unanswered: false).
pub fn tcp_connects(client_ns: &str, to: SocketAddrV4) -> Result<bool> {
    in_netns(client_ns, move || {
        Ok(TcpStream::connect_timeout(&to.into(), Duration::from_secs(1)).is_ok())
    })
}

/// UDP request/response between two pods.
pub fn udp_exchange(
    client_ns: &str,
    server_ns: &str,
    server_ip: impl Into<IpAddr>,
    port: u16,
) -> Result<()> {
    let server_ip: IpAddr = server_ip.into();
    let server = start_server(server_ns, move |ready| {
        let s = UdpSocket::bind(SocketAddr::new(server_ip, port))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        ready();
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf)?;
        s.send_to(&buf[..n], from)?;
        Ok(())
    })?;
    let msg = pattern(u64::from(port) + 7, 512);
    let ok = in_netns(client_ns, move || {
        let any = if server_ip.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let s = UdpSocket::bind(any)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.send_to(&msg, SocketAddr::new(server_ip, port))?;
        let mut buf = [0u8; 2048];
        let (n, _) = s.recv_from(&mut buf)?;
        Ok(buf[..n] == msg[..])
    });
    finish(server, ok, "UDP")
}

/// Sends `len` bytes over TCP and returns how many arrived intact.
pub fn bulk_transfer(
    client_ns: &str,
    server_ns: &str,
    server_ip: Ipv4Addr,
    port: u16,
    len: usize,
) -> Result<usize> {
    const CHUNK: usize = 1 << 20;
    let block = pattern(42, CHUNK);
    let expect = block.clone();
    let server = start_server(server_ns, move |ready| {
        let l = TcpListener::bind(SocketAddrV4::new(server_ip, port))?;
        ready();
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut got = 0usize;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                if *b != expect[(got + k) % CHUNK] {
                    bail!("byte {} differs", got + k);
                }
            }
            got += n;
        }
        Ok(got)
    })?;
    in_netns(client_ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddrV4::new(server_ip, port).into(), TIMEOUT)?;
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            s.write_all(&block[..n])?;
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    })?;
    join(server)
}

/// One UDP datagram from `client_ns` to a listener in `server_ns`, over
/// `server_ip`'s family; returns the source address the listener saw (to
/// tell masqueraded traffic).
pub fn udp_source_seen(
    client_ns: &str,
    server_ns: &str,
    server_ip: impl Into<IpAddr>,
    port: u16,
) -> Result<IpAddr> {
    let server_ip: IpAddr = server_ip.into();
    let to = SocketAddr::new(server_ip, port);
    let server = start_server(server_ns, move |ready| {
        let s = UdpSocket::bind(to)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        ready();
        let mut buf = [0u8; 64];
        let (_, from) = s.recv_from(&mut buf)?;
        Ok(from.ip())
    })?;
    in_netns(client_ns, move || {
        let any: IpAddr = match to {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        let s = UdpSocket::bind(SocketAddr::new(any, 0))?;
        s.send_to(b"who am i", to)?;
        Ok(())
    })?;
    join(server)
}

/// A TCP connection between two pods that stays open and busy until
/// stopped: the client sends a numbered 1 KiB message every 20 ms and
/// reads back its echo, checking every byte. Any reset, timeout or wrong
/// byte ends it with an error, so a stream that reaches [`LongStream::stop`]
/// survived everything that happened meanwhile.
pub struct LongStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    client: std::thread::JoinHandle<Result<u64>>,
    server: std::thread::JoinHandle<Result<()>>,
}

impl LongStream {
    pub fn start(client_ns: &str, server_ns: &str, server_ip: Ipv4Addr, port: u16) -> Result<Self> {
        let addr = SocketAddrV4::new(server_ip, port);
        let server = start_server(server_ns, move |ready| {
            let l = TcpListener::bind(addr)?;
            ready();
            let (mut s, _) = l.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(()),
                    n => s.write_all(&buf[..n])?,
                }
            }
        })?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let client = spawn_in_netns(client_ns, move || {
            let mut s = TcpStream::connect_timeout(&addr.into(), TIMEOUT)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_nodelay(true)?;
            let mut sent = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let msg = pattern(sent + 1, 1024);
                s.write_all(&msg)
                    .with_context(|| format!("message {sent}: send"))?;
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back)
                    .with_context(|| format!("message {sent}: echo"))?;
                if back != msg {
                    bail!("message {sent}: echo differs");
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            s.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        })?;
        Ok(Self {
            stop,
            client,
            server,
        })
    }

    /// Whether the client has already failed.
    pub fn failed(&self) -> bool {
        self.client.is_finished()
    }

    /// Ends the stream; the number of messages echoed, or what broke it.
    pub fn stop(self) -> Result<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = join(self.client)?;
        join(self.server)?;
        Ok(sent)
    }
}

/// `ping` running in the background from a pod until stopped (killed
/// if the test ends first).
pub struct Pinger {
    child: Option<std::process::Child>,
}

impl Pinger {
    /// Pings `dst` from namespace `ns` every `interval`.
    pub fn start(ns: &str, dst: Ipv4Addr, interval: Duration) -> Result<Self> {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-n", "-q", "-W", "2", "-i"])
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg(dst.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting ping")?;
        Ok(Self { child: Some(child) })
    }

    /// Stops it (SIGINT, so it prints its summary): (sent, received).
    pub fn stop(mut self) -> Result<(u64, u64)> {
        // Let the last echo come back before asking for the summary.
        std::thread::sleep(Duration::from_millis(500));
        let child = self.child.take().context("ping already stopped")?;
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .with_context(|| format!("no ping summary: {text}"))?;
        let num = |word: &str| -> Result<u64> {
            let before = line
                .split(',')
                .find(|p| p.contains(word))
                .with_context(|| format!("no {word} in {line}"))?;
            before
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("bad count in {line}"))
        };
        Ok((num("transmitted")?, num("received")?))
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

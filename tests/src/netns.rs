//! Running code and commands inside the lab's network namespaces.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};

/// Runs `f` on a fresh thread that has entered namespace `ns`; sockets it
/// opens belong to that namespace.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    spawn_in_netns(ns, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let file =
        File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening netns {ns}"))?;
    let ns = ns.to_string();
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on this thread only; the fd is valid for the call.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({ns}): {}", std::io::Error::last_os_error());
        }
        f()
    }))
}

/// `ip <args>`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    sh(Command::new("ip").args(args))
}

/// A command inside `ns` (through `ip netns exec`).
pub fn exec(ns: &str, args: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .with_context(|| format!("running {args:?} in {ns}"))
}

pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// tx/rx packet counters of a link inside `ns`.
pub fn link_packets(ns: &str, dev: &str) -> Result<(u64, u64)> {
    let out = ip(&["-n", ns, "-j", "-s", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let stats = &v[0]["stats64"];
    let get = |dir: &str| stats[dir]["packets"].as_u64().context("no packet counter");
    Ok((get("tx")?, get("rx")?))
}

/// The MAC address of a link inside `ns`.
pub fn link_mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = ip(&["-n", ns, "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let text = v[0]["address"].as_str().context("no address")?;
    let mut mac = [0u8; 6];
    let parts: Vec<_> = text.split(':').collect();
    anyhow::ensure!(parts.len() == 6, "not a MAC: {text}");
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

/// `GET path` from inside `ns` to `addr` (HTTP/1.1, `Connection: close`):
/// the whole response, status line and headers included, with a chunked
/// body (as Prometheus sends past 4 KiB) joined back into one.
pub fn http_get(ns: &str, addr: std::net::SocketAddr, path: &str) -> Result<String> {
    let path = path.to_string();
    in_netns(ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        // One write: a server that reads once still sees the whole request.
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        dechunk(&out)
    })
}

/// `resp` with its body de-chunked when the headers say it is chunked.
fn dechunk(resp: &str) -> Result<String> {
    let Some((head, mut rest)) = resp.split_once("\r\n\r\n") else {
        return Ok(resp.to_string());
    };
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    if !chunked {
        return Ok(resp.to_string());
    }
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size:?}"))?;
        if size == 0 {
            break;
        }
        body.push_str(after.get(..size).context("chunk shorter than its size")?);
        rest = after[size..]
            .strip_prefix("\r\n")
            .context("no CRLF after a chunk")?;
    }
    Ok(format!("{head}\r\n\r\n{body}"))
}

/// Sends one raw Ethernet `frame` out of interface `ifname` inside `ns`
/// (an AF_PACKET socket: the frame leaves exactly as given).
pub fn send_frame(ns: &str, ifname: &str, frame: Vec<u8>) -> Result<()> {
    let ifname = std::ffi::CString::new(ifname)?;
    in_netns(ns, move || {
        // SAFETY: plain socket calls on a descriptor this closure owns;
        // the address struct is zeroed and filled before use.
        unsafe {
            let ifindex = libc::if_nametoindex(ifname.as_ptr());
            if ifindex == 0 {
                bail!(
                    "no interface {ifname:?}: {}",
                    std::io::Error::last_os_error()
                );
            }
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if sent != frame.len() as isize {
                bail!("sending a raw frame on {ifname:?}: {err}");
            }
        }
        Ok(())
    })
}

/// Where [`hold_connections`] connects.
pub enum ConnectTo {
    Unix(std::path::PathBuf),
    /// An IPv4 TCP address, from inside network namespace `ns`.
    Tcp {
        ns: String,
        addr: std::net::SocketAddrV4,
    },
}

/// Child processes holding idle connections open (more than one process
/// may: the test's own open-file limit is the machine's hard limit). The
/// children are killed and reaped when this is dropped, panics included.
pub struct HeldConnections {
    children: Vec<libc::pid_t>,
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        for pid in self.children.drain(..) {
            // SAFETY: signalling and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Opens `n` connections to `to`, idle and held, spread over child
/// processes of at most `per_child` each; returns once every one is
/// connected.
pub fn hold_connections(to: &ConnectTo, n: usize, per_child: usize) -> Result<HeldConnections> {
    // Everything the child needs is made here: after fork in a threaded
    // process it may only make plain system calls (no allocation).
    let (family, addr, len, ns) = match to {
        ConnectTo::Unix(path) => {
            // SAFETY: sockaddr_un is plain data; zeroed is valid.
            let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            a.sun_family = libc::AF_UNIX as _;
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            anyhow::ensure!(bytes.len() < a.sun_path.len(), "socket path too long");
            for (d, s) in a.sun_path.iter_mut().zip(bytes) {
                *d = *s as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
            let mut storage = [0u8; std::mem::size_of::<libc::sockaddr_un>()];
            // SAFETY: copying a plain struct into a byte buffer of its size.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    &a as *const _ as *const u8,
                    storage.as_mut_ptr(),
                    storage.len(),
                )
            };
            (libc::AF_UNIX, storage.to_vec(), len, None)
        }
        ConnectTo::Tcp { ns, addr } => {
            // SAFETY: as above.
            let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            a.sin_family = libc::AF_INET as _;
            a.sin_port = addr.port().to_be();
            a.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
            let mut storage = vec![0u8; std::mem::size_of::<libc::sockaddr_in>()];
            // SAFETY: as above.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    &a as *const _ as *const u8,
                    storage.as_mut_ptr(),
                    storage.len(),
                )
            };
            let file = File::open(format!("/run/netns/{ns}"))
                .with_context(|| format!("opening netns {ns}"))?;
            (
                libc::AF_INET,
                storage,
                std::mem::size_of::<libc::sockaddr_in>(),
                Some(file),
            )
        }
    };
    let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
    let mut pipe = [0; 2];
    // SAFETY: pipe2 into a two-int array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let [ready_r, ready_w] = pipe;
    let mut held = HeldConnections {
        children: Vec::new(),
    };
    let mut left = n;
    while left > 0 {
        let count = left.min(per_child);
        left -= count;
        // SAFETY: the child makes only async-signal-safe calls on memory
        // prepared before the fork, then waits to be killed.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            unsafe {
                if let Some(fd) = ns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        libc::_exit(2);
                    }
                }
                for _ in 0..count {
                    let s = libc::socket(family, libc::SOCK_STREAM, 0);
                    if s < 0
                        || libc::connect(
                            s,
                            addr.as_ptr() as *const libc::sockaddr,
                            len as libc::socklen_t,
                        ) != 0
                    {
                        libc::_exit(3);
                    }
                }
                let one = 1u8;
                libc::write(ready_w, &one as *const u8 as *const libc::c_void, 1);
                loop {
                    libc::pause();
                }
            }
        }
        held.children.push(pid);
    }
    // SAFETY: closing our copy of the write end; the children keep theirs.
    unsafe { libc::close(ready_w) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut ready = 0;
    while ready < held.children.len() {
        let mut pfd = libc::pollfd {
            fd: ready_r,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll and read on our pipe's read end.
        let r = unsafe { libc::poll(&mut pfd, 1, 1000) };
        if r > 0 {
            let mut b = 0u8;
            let got = unsafe { libc::read(ready_r, &mut b as *mut u8 as *mut libc::c_void, 1) };
            if got == 1 {
                ready += 1;
                continue;
            }
        }
        for &pid in &held.children {
            let mut status = 0;
            // SAFETY: polling our own child's state.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                unsafe { libc::close(ready_r) };
                bail!(
                    "a connection holder exited with {}",
                    libc::WEXITSTATUS(status)
                );
            }
        }
        if std::time::Instant::now() > deadline {
            unsafe { libc::close(ready_r) };
            bail!(
                "{ready} of {} connection holders ready after 120 s",
                held.children.len()
            );
        }
    }
    // SAFETY: our read end, no longer used.
    unsafe { libc::close(ready_r) };
    Ok(held)
}

/// Pins the calling thread to `cpu` (for per-CPU state: the benchmark's
/// client and server threads, and tests of per-CPU caches).
pub fn pin_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in
    // bounds for any cpu below CPU_SETSIZE, and pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning a thread to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Raises this process's open-file limit to at least `n` (the hard limit
/// too, which root may raise when it holds CAP_SYS_RESOURCE).
pub fn raise_open_files(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit");
        }
        if lim.rlim_cur >= n {
            return Ok(());
        }
        lim.rlim_cur = n;
        lim.rlim_max = lim.rlim_max.max(n);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("raising the open-file limit to {n}"));
        }
    }
    Ok(())
}

//! `flannel-agent trace --live`: one real packet sent from a pod's (or the
//! node's) network namespace, so that the counters can show which path it
//! took. UDP to port 33434 by default (as traceroute), a TCP connection
//! attempt, or an ICMP echo request.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

/// Sends one probe of `proto` to `dst` (`dport` for TCP and UDP) from the
/// namespace at `netns` (this one when `None`).
pub fn send(
    netns: Option<PathBuf>,
    proto: &str,
    dst: Ipv4Addr,
    dport: Option<u16>,
) -> std::io::Result<()> {
    let proto = proto.to_string();
    std::thread::spawn(move || {
        if let Some(path) = netns {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on this short-lived thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        match proto.as_str() {
            "tcp" => {
                let to = SocketAddr::new(dst.into(), dport.unwrap_or(80));
                // Refused or timed out, the SYN went out.
                let _ = TcpStream::connect_timeout(&to, Duration::from_millis(500));
                Ok(())
            }
            "icmp" => icmp_echo(dst),
            _ => {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.send_to(b"flannel-agent trace", (dst, dport.unwrap_or(33434)))?;
                Ok(())
            }
        }
    })
    .join()
    .map_err(|_| std::io::Error::other("the probe thread panicked"))?
}

/// An ICMP echo request over a raw socket (root), checksum filled in.
fn icmp_echo(dst: Ipv4Addr) -> std::io::Result<()> {
    // SAFETY: plain socket call; the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut msg = [8u8, 0, 0, 0, 0x66, 0x6c, 0, 1, b'f', b'l', b'a', b'n'];
    let mut sum: u32 = msg
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    msg[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: msg and addr are valid for the sizes given.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

//! The agent's API socket against hostile callers: it is root's alone
//! whatever the umask, a caller that is not root is refused by its peer
//! credentials (and logged), and garbage, a line too long, a half-written
//! request and 1,000 connections at once leave the agent answering others
//! and forwarding.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    time::Duration,
};

use anyhow::Result;
use flannel_tests::{lab::agent_bin, Lab, NodeKind, NodeSpec};

fn answer(s: &mut UnixStream) -> Result<serde_json::Value> {
    let mut line = String::new();
    BufReader::new(s.try_clone()?).read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
}

#[test]
fn the_api_socket_refuses_strangers_and_survives_abuse() -> Result<()> {
    let lab = Lab::new(&[
        NodeSpec::new(NodeKind::Ebpf, 1),
        NodeSpec::new(NodeKind::Ebpf, 1),
    ])?;
    let sock = lab.nodes[0].socket();
    let meta = std::fs::metadata(&sock)?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);

    // A user that is not root: the mode keeps it out; opened up by hand,
    // its peer credentials still do, and the agent logs who it was.
    let as_nobody = || {
        std::process::Command::new(agent_bin().unwrap())
            .arg("status")
            .arg("--socket")
            .arg(&sock)
            .uid(65534)
            .gid(65534)
            .output()
    };
    let out = as_nobody()?;
    assert!(!out.status.success());
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))?;
    let out = as_nobody()?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("permission denied"),
        "{err}"
    );
    let log = flannel_tests::lab::strip_ansi(&lab.agent_log(0));
    assert!(
        log.contains("refused an API caller") && log.contains("uid=65534"),
        "{log}"
    );

    // Garbage is answered, and the connection goes on.
    let mut s = UnixStream::connect(&sock)?;
    s.write_all(b"\x00\xffnot json\n")?;
    let a = answer(&mut s)?;
    assert_eq!(a["ok"], false);
    assert!(
        a["error"].as_str().unwrap().contains("malformed request"),
        "{a}"
    );
    s.write_all(b"{\"op\":\"status\"}\n")?;
    assert_eq!(answer(&mut s)?["ok"], true);

    // A line over 64 KiB: refused and closed.
    let mut s = UnixStream::connect(&sock)?;
    s.write_all(&vec![b'a'; 100 * 1024])?;
    let a = answer(&mut s)?;
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("longer than 65536 bytes"),
        "{a}"
    );
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest)?, 0, "closed after the refusal");

    // Half a request, held open, and 1,000 idle connections: the agent
    // answers others and forwards meanwhile.
    let mut half = UnixStream::connect(&sock)?;
    half.write_all(b"{\"op\":\"sta")?;
    raise_open_files(4096)?;
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&sock))
        .collect::<std::io::Result<_>>()?;
    let st = lab.nodes[0].status()?;
    assert_eq!(st.endpoints, 1);
    assert!(lab.ping((0, 0), lab.pod((1, 0)).ip, 5, 56)?);
    // The half-written request is given up on after the read timeout.
    half.set_read_timeout(Some(Duration::from_secs(20)))?;
    let a = answer(&mut half)?;
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("no whole request within"),
        "{a}"
    );
    drop(idle);
    assert!(lab.nodes[0].status().is_ok());
    Ok(())
}

fn raise_open_files(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid struct; root may raise
    // the hard limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        lim.rlim_cur = lim.rlim_cur.max(n);
        lim.rlim_max = lim.rlim_max.max(n);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

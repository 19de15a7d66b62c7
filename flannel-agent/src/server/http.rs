//! The agent's HTTP port (`--healthz-ip`, `--healthz-port`), open from the
//! agent's first moment: `GET /healthz` (and `/`) answer `200 ok` while the
//! process runs (a liveness probe); `GET /readyz` answers `200 ready` once
//! the lease is held, the data path programmed and subnet.env written,
//! `503` until then (a readiness probe); `GET /metrics` the Prometheus
//! text. Anything else is 404.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::slots::Slots;
use crate::metrics::{Metrics, CONTENT_TYPE};

/// Whether the node is ready for pods, as `/readyz` says.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// HTTP connections served at once at most (a quarter of the file
/// descriptors the process may open, if that is fewer); at the cap a new
/// one takes the slot of the oldest still waiting for its request.
pub const MAX_CONNECTIONS: usize = 1024;

pub fn connection_cap() -> usize {
    MAX_CONNECTIONS
        .min((super::slots::open_files_limit() / 4) as usize)
        .max(16)
}

/// The HTTP port's listener, with a backlog deep enough that a burst of
/// connections waits for the cap's room instead of retrying its SYNs.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ready: Arc<Readiness>) {
    let slots = Slots::new("HTTP port", connection_cap());
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(slot) = slots.admit().await else {
            continue;
        };
        let (metrics, ready, slots) = (metrics.clone(), ready.clone(), slots.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let (idle, evicted) = slots.idle();
            let req = tokio::select! {
                req = read_head(&mut s) => req,
                _ = evicted => None,
            };
            drop(idle);
            let Some(req) = req else {
                return;
            };
            let path = req
                .strip_prefix("GET ")
                .and_then(|r| r.split(' ').next())
                .unwrap_or("");
            let (status, content_type, body) = match path {
                "/healthz" | "/" => ("200 OK", "text/plain", "ok".to_string()),
                "/readyz" if ready.is_ready() => ("200 OK", "text/plain", "ready".to_string()),
                "/readyz" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready: the lease, the data path or subnet.env is not in place yet"
                        .to_string(),
                ),
                // Reading the pinned maps is a few thousand syscalls at
                // 5,000 leases: off the agent's loop.
                "/metrics" => match tokio::task::spawn_blocking(move || metrics.encode()).await {
                    Ok(text) => ("200 OK", CONTENT_TYPE, text),
                    Err(_) => ("500 Internal Server Error", "text/plain", String::new()),
                },
                _ => ("404 Not Found", "text/plain", String::new()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
    }
}

/// Largest request head read; longer requests are answered as they stand.
const MAX_HEAD: usize = 8192;

/// Reads the request line and headers (up to the blank line), however
/// the client's writes were split, within [`MAX_HEAD`] bytes and 5 s.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

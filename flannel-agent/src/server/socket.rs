//! The local API socket: one JSON request and one JSON response per line
//! (the wire format is [`crate::api`]). Each request goes to the agent's
//! loop with a channel for the answer.
//!
//! Whoever may write to this socket may register and remove pods, so it
//! is guarded: the socket is created mode 0600 (0660 with a group) owned
//! by root whatever the umask, every connection's peer credentials are
//! checked (uid 0, or the configured group), a message is at most
//! [`MAX_MESSAGE`] bytes and must arrive within [`READ_TIMEOUT`], and at
//! most [`connection_cap`] connections are served at once, so that a
//! flood cannot take the agent's file descriptors.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::slots::Slots;
use crate::api::{Request, Response};

/// A request and where its answer goes.
pub type ApiCall = (Request, oneshot::Sender<Response>);

/// Largest request line; a pod's registration is under 200 bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Time a client has to send one whole request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once at most (half the file descriptors the
/// process may open, if that is fewer); at the cap a new one takes the
/// slot of the oldest idle one ([`super::slots`]).
pub const MAX_CONNECTIONS: usize = 4096;

/// How many API connections to serve at once.
pub fn connection_cap() -> usize {
    MAX_CONNECTIONS
        .min((super::slots::open_files_limit() / 2) as usize)
        .max(16)
}

/// Raises the soft limit on open files to the hard one (as Go's runtime
/// does for Flannel) and returns it.
pub(super) fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("binding the agent socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("setting owner and mode of the agent socket {path}: {source}")]
    Permissions {
        path: String,
        source: std::io::Error,
    },
}

/// Who may call: root, and members of `group` when one is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub group: Option<u32>,
}

impl Access {
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || self.group.is_some_and(|g| g == gid)
    }

    fn mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// Binds the socket at `path` with the mode and group `access` asks for.
/// The umask is tightened around the bind, so the socket is never
/// reachable by others, not even for an instant.
pub fn bind(path: &Path, access: Access) -> Result<UnixListener, SocketError> {
    let _ = std::fs::remove_file(path);
    let shown = || path.display().to_string();
    // SAFETY: umask only changes this process's file creation mask; it is
    // restored right after the bind.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| SocketError::Bind {
        path: shown(),
        source,
    })?;
    let perm = |source| SocketError::Permissions {
        path: shown(),
        source,
    };
    // The agent (root) owns what it binds; only a group needs setting.
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(perm)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode())).map_err(perm)?;
    Ok(listener)
}

/// Accepts connections for as long as the process lives; each is served
/// on its own task once its caller is checked.
pub async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<ApiCall>, access: Access) {
    let slots = Slots::new("API socket", connection_cap());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(slot) = slots.admit().await else {
                    continue;
                };
                let (tx, slots) = (tx.clone(), slots.clone());
                tokio::spawn(async move {
                    serve(stream, tx, access, &slots).await;
                    drop(slot);
                });
            }
            Err(err) => {
                tracing::warn!(%err, "accepting an API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn reply(write: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> bool {
    let mut out = serde_json::to_vec(resp).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await.is_ok()
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<ApiCall>, access: Access, slots: &Arc<Slots>) {
    let cred = stream.peer_cred();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    match cred {
        Ok(c) if access.allows(c.uid(), c.gid()) => {}
        Ok(c) => {
            tracing::warn!(
                uid = c.uid(),
                gid = c.gid(),
                pid = c.pid(),
                "refused an API caller: only root (or the --api-socket-group) may call"
            );
            // Take the caller's request first (bounded, briefly): closing
            // on a client still writing would leave it a broken pipe
            // instead of the reason.
            let mut discard = Vec::new();
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                (&mut lines)
                    .take(MAX_MESSAGE as u64)
                    .read_until(b'\n', &mut discard),
            )
            .await;
            reply(
                &mut write,
                &Response::err("permission denied: only root may call the agent"),
            )
            .await;
            return;
        }
        Err(err) => {
            tracing::warn!(%err, "refused an API caller whose credentials cannot be read");
            return;
        }
    }
    loop {
        let mut line = Vec::new();
        // Waiting for a request, the connection's slot may be taken by a
        // newer one (the cap is reached and this is the oldest waiting).
        let (idle, evicted) = slots.idle();
        let mut limited = (&mut lines).take(MAX_MESSAGE as u64 + 1);
        let read = tokio::select! {
            read = tokio::time::timeout(READ_TIMEOUT, limited.read_until(b'\n', &mut line)) => read,
            _ = evicted => return,
        };
        drop(idle);
        // A refusal that ends the connection: the rest of what the caller
        // sends cannot be told apart from the request that went wrong.
        let closing = match read {
            Err(_) => format!(
                "no whole request within {} s; closing",
                READ_TIMEOUT.as_secs()
            ),
            Ok(Err(_)) | Ok(Ok(0)) => return,
            // One byte past the limit, and still no end of line.
            Ok(Ok(_)) if line.len() > MAX_MESSAGE => {
                format!("request longer than {MAX_MESSAGE} bytes; closing")
            }
            // The caller closed half way through a request.
            Ok(Ok(_)) if line.last() != Some(&b'\n') => return,
            Ok(Ok(_)) => {
                let resp = match serde_json::from_slice::<Request>(&line) {
                    Ok(req) => {
                        let (rtx, rrx) = oneshot::channel();
                        if tx.send((req, rtx)).await.is_err() {
                            return;
                        }
                        rrx.await
                            .unwrap_or_else(|_| Response::err("agent is stopping"))
                    }
                    Err(err) => Response::err(format!("malformed request: {err}")),
                };
                if !reply(&mut write, &resp).await {
                    return;
                }
                continue;
            }
        };
        reply(&mut write, &Response::err(closing)).await;
        // The caller may still be sending what follows: closing with it
        // unread would turn the answer into a connection reset on its
        // side. Say "no more" first, then take (and drop) what is still
        // coming, a bounded amount for a bounded time.
        let _ = write.shutdown().await;
        let mut sink = tokio::io::sink();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::io::copy(&mut (&mut lines).take(16 * MAX_MESSAGE as u64), &mut sink),
        )
        .await;
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_group_may_call() {
        let root_only = Access { group: None };
        assert!(root_only.allows(0, 0));
        assert!(!root_only.allows(1000, 1000));
        assert!(!root_only.allows(1000, 0));
        let group = Access { group: Some(42) };
        assert!(group.allows(0, 7));
        assert!(group.allows(1000, 42));
        assert!(!group.allows(1000, 43));
        assert_eq!(root_only.mode(), 0o600);
        assert_eq!(group.mode(), 0o660);
    }
}

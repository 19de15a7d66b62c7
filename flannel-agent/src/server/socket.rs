//! The local API socket: one JSON request and one JSON response per line
//! (the wire format is [`crate::api`]). Each request goes to the agent's
//! loop with a channel for the answer.

use std::time::Duration;

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::api::{Request, Response};

/// A request and where its answer goes.
pub type ApiCall = (Request, oneshot::Sender<Response>);

/// Accepts connections for as long as the process lives; each is served
/// on its own task.
pub async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<ApiCall>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, tx.clone()));
            }
            Err(err) => {
                tracing::warn!(%err, "accepting an API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(stream: UnixStream, tx: mpsc::Sender<ApiCall>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let resp = match serde_json::from_str::<Request>(&line) {
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
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

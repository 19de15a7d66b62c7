//! A small, faithful stand-in for the Kubernetes API server, for the calls
//! the kube subnet manager makes on Nodes: get, list, watch (JSON lines
//! with resource versions and `410 Gone` for versions too old), and patch
//! of the status subresource (JSON merge patch; strategic merge patch
//! merging `conditions` by `type`, as the real server does). It listens on
//! the fabric bridge's address inside the lab's fabric namespace: plain
//! HTTP on [`PORT`], and HTTPS on [`TLS_PORT`] with a certificate made for
//! this run and a bearer token, for agents that find the server the way a
//! pod does (in-cluster config: `KUBERNETES_SERVICE_HOST`/`_PORT` and a
//! service account directory, see [`FakeKube::service_account`]). Tests
//! add, change and delete nodes through [`FakeKube`].

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use axum::{
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::{
    lab::{FABRIC_IP, FABRIC_IP6},
    netns::spawn_in_netns,
};

pub const PORT: u16 = 6443;
/// The HTTPS side, which also checks the bearer token.
pub const TLS_PORT: u16 = 6444;

#[derive(Default)]
struct Inner {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    /// Every event, for watches that start from an older version.
    history: Vec<(u64, Value)>,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<(u64, Value)>,
}

impl Shared {
    /// Records a change: new resourceVersion, history, live watches.
    fn emit(&self, inner: &mut Inner, kind: &str, mut node: Value) -> Value {
        inner.rv += 1;
        node["metadata"]["resourceVersion"] = inner.rv.to_string().into();
        let ev = json!({"type": kind, "object": node});
        inner.history.push((inner.rv, ev.clone()));
        let _ = self.events.send((inner.rv, ev));
        node
    }
}

/// The running fake; stops when dropped.
pub struct FakeKube {
    shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The HTTPS side's certificate (PEM), the service account's `ca.crt`.
    ca_pem: String,
    token: String,
}

/// Accepts TLS connections for axum; a client that does not finish its
/// handshake within 5 s is dropped without holding up the others for
/// longer.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A self-signed certificate for the fabric address: (PEM, TLS config).
fn tls_config() -> Result<(String, tokio_rustls::rustls::ServerConfig)> {
    use tokio_rustls::rustls::{self, pki_types};
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(FABRIC_IP.into()));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "flannel-lab-apiserver");
    let cert = params.self_signed(&key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    Ok((cert.pem(), config))
}

pub fn url() -> String {
    format!("http://{FABRIC_IP}:{PORT}")
}

/// The plain endpoint over IPv6, for labs whose nodes have no IPv4 (it
/// listens there when the fabric has its IPv6 address, as labs with IPv6
/// give it).
pub fn url6() -> String {
    format!("http://[{FABRIC_IP6}]:{PORT}")
}

fn status(code: StatusCode, reason: &str, msg: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": msg, "reason": reason, "code": code.as_u16()});
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok_json(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn get_node(State(s): State<Shared>, Path(name): Path<String>) -> Response {
    match s.inner.lock().unwrap().nodes.get(&name) {
        Some(n) => ok_json(n),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("nodes \"{name}\" not found"),
        ),
    }
}

/// RFC 7386 merge, with the strategic rule for `conditions` (keyed by type).
fn merge(target: &mut Value, patch: &Value, strategic: bool) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else if strategic && k == "conditions" && v.is_array() {
                    let list = t.entry(k.clone()).or_insert_with(|| json!([]));
                    if !list.is_array() {
                        *list = json!([]);
                    }
                    let items = list.as_array_mut().expect("array");
                    for c in v.as_array().expect("array") {
                        match items.iter_mut().find(|i| i["type"] == c["type"]) {
                            Some(i) => merge(i, c, true),
                            None => items.push(c.clone()),
                        }
                    }
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v, strategic);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn patch_status(
    State(s): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let strategic = ct.starts_with("application/strategic-merge-patch+json");
    if !strategic && !ct.starts_with("application/merge-patch+json") {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {ct}"),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "patch is not JSON".into(),
        );
    };
    let mut inner = s.inner.lock().unwrap();
    let Some(mut node) = inner.nodes.get(&name).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("nodes \"{name}\" not found"),
        );
    };
    // The status subresource takes metadata and status, never spec.
    let mut patch = patch;
    if let Some(o) = patch.as_object_mut() {
        o.remove("spec");
    }
    merge(&mut node, &patch, strategic);
    let node = s.emit(&mut inner, "MODIFIED", node);
    inner.nodes.insert(name, node.clone());
    ok_json(&node)
}

async fn list_or_watch(
    State(s): State<Shared>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let watch = q.get("watch").is_some_and(|v| v == "true" || v == "1");
    if !watch {
        let inner = s.inner.lock().unwrap();
        let items: Vec<Value> = inner.nodes.values().cloned().collect();
        return ok_json(&json!({"kind": "NodeList", "apiVersion": "v1",
            "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}));
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64);
    let (backlog, mut rx) = {
        let inner = s.inner.lock().unwrap();
        let oldest = inner
            .history
            .first()
            .map(|(rv, _)| *rv)
            .unwrap_or(inner.rv + 1);
        if from != 0 && from + 1 < oldest {
            return status(
                StatusCode::GONE,
                "Expired",
                format!("too old resource version: {from}"),
            );
        }
        let backlog: Vec<Value> = inner
            .history
            .iter()
            .filter(|(rv, _)| *rv > from)
            .map(|(_, e)| e.clone())
            .collect();
        (backlog, s.events.subscribe())
    };
    let stream = async_stream(backlog, move |tx| async move {
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                ev = rx.recv() => match ev {
                    Ok((rv, ev)) if rv > from => { if tx.send(ev).await.is_err() { return; } }
                    Ok(_) => {}
                    Err(_) => return,
                },
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(stream)
        .expect("valid response")
}

/// A streaming body: first `backlog`, then whatever `feed` sends, one JSON
/// object per line.
fn async_stream<F, Fut>(backlog: Vec<Value>, feed: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Value>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(256);
    tokio::spawn(async move {
        for ev in backlog {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        feed(tx).await;
    });
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        Some((Ok::<_, std::io::Error>(Bytes::from(format!("{ev}\n"))), rx))
    });
    Body::from_stream(lines)
}

impl FakeKube {
    /// Starts the server inside namespace `ns`.
    pub fn start(ns: &str) -> Result<Self> {
        let (events, _) = broadcast::channel(4096);
        let shared = Shared {
            inner: Arc::default(),
            events,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ca_pem, tls) = tls_config()?;
        let token = format!("lab-token-{:x}", std::process::id() ^ 0x5a5a_1234);
        let app = Router::new()
            .route("/api/v1/nodes", get(list_or_watch))
            .route("/api/v1/nodes/{name}", get(get_node))
            .route(
                "/api/v1/nodes/{name}/status",
                axum::routing::patch(patch_status),
            )
            .with_state(shared.clone());
        let bearer = format!("Bearer {token}");
        let tls_app = app.clone().layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let ok = req
                    .headers()
                    .get("authorization")
                    .is_some_and(|v| v.as_bytes() == bearer.as_bytes());
                async move {
                    if ok {
                        next.run(req).await
                    } else {
                        status(
                            StatusCode::UNAUTHORIZED,
                            "Unauthorized",
                            "Unauthorized".into(),
                        )
                    }
                }
            },
        ));
        spawn_in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind((FABRIC_IP, PORT)).await?;
                let l6 = tokio::net::TcpListener::bind((FABRIC_IP6, PORT)).await.ok();
                let tls = TlsListener {
                    tcp: tokio::net::TcpListener::bind((FABRIC_IP, TLS_PORT)).await?,
                    acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
                };
                ready_tx.send(()).ok();
                let (stop_all, _) = broadcast::channel::<()>(1);
                let stopped = |tx: &broadcast::Sender<()>| {
                    let mut rx = tx.subscribe();
                    async move {
                        let _ = rx.recv().await;
                    }
                };
                let plain6 = l6.map(|l6| {
                    axum::serve(l6, app.clone()).with_graceful_shutdown(stopped(&stop_all))
                });
                let plain = axum::serve(l, app).with_graceful_shutdown(stopped(&stop_all));
                let secure = axum::serve(tls, tls_app).with_graceful_shutdown(stopped(&stop_all));
                let stop = async move {
                    let _ = stop_rx.await;
                    let _ = stop_all.send(());
                    anyhow::Ok(())
                };
                tokio::try_join!(
                    async { plain.await.map_err(anyhow::Error::from) },
                    async {
                        match plain6 {
                            Some(p) => p.await.map_err(anyhow::Error::from),
                            None => Ok(()),
                        }
                    },
                    async { secure.await.map_err(anyhow::Error::from) },
                    stop
                )?;
                anyhow::Ok(())
            })
        })?;
        ready_rx.recv_timeout(Duration::from_secs(5))?;
        Ok(FakeKube {
            shared,
            stop: Some(stop_tx),
            ca_pem,
            token,
        })
    }

    /// Writes what a pod's service account volume holds (`token`,
    /// `ca.crt`, `namespace`) into `dir`, and returns the environment
    /// kubelet gives every container to find the API server.
    pub fn service_account(
        &self,
        dir: &std::path::Path,
        namespace: &str,
    ) -> Result<Vec<(String, String)>> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), &self.token)?;
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        std::fs::write(dir.join("namespace"), namespace)?;
        Ok(vec![
            ("KUBERNETES_SERVICE_HOST".into(), FABRIC_IP.to_string()),
            ("KUBERNETES_SERVICE_PORT".into(), TLS_PORT.to_string()),
        ])
    }

    /// Adds a Node (as kubelet registers it), with its podCIDR if given.
    pub fn add_node(&self, name: &str, pod_cidr: Option<&str>, annotations: Value) {
        let cidrs: Vec<String> = pod_cidr.into_iter().map(String::from).collect();
        self.add_node_cidrs(name, &cidrs, annotations)
    }

    /// A node with `cidrs` as its podCIDRs (dual-stack: one per family; the
    /// first is `podCIDR`).
    pub fn add_node_cidrs(&self, name: &str, cidrs: &[String], annotations: Value) {
        let mut node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "annotations": annotations},
            "spec": {}, "status": {"conditions": []}});
        if let Some(c) = cidrs.first() {
            node["spec"] = json!({"podCIDR": c, "podCIDRs": cidrs});
        }
        let mut inner = self.shared.inner.lock().unwrap();
        let node = self.shared.emit(&mut inner, "ADDED", node);
        inner.nodes.insert(name.to_string(), node);
    }

    /// Sets a node's podCIDR (as kube-controller-manager does).
    pub fn set_pod_cidr(&self, name: &str, cidr: &str) {
        let mut inner = self.shared.inner.lock().unwrap();
        let mut node = inner.nodes.get(name).cloned().expect("node exists");
        node["spec"] = json!({"podCIDR": cidr, "podCIDRs": [cidr]});
        let node = self.shared.emit(&mut inner, "MODIFIED", node);
        inner.nodes.insert(name.to_string(), node);
    }

    pub fn delete_node(&self, name: &str) {
        let mut inner = self.shared.inner.lock().unwrap();
        if let Some(node) = inner.nodes.remove(name) {
            self.shared.emit(&mut inner, "DELETED", node);
        }
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared.inner.lock().unwrap().nodes.get(name).cloned()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// `before_agents` hook: the fake API server in the fabric, with a Node per
/// lab node whose podCIDR is 10.244.(10+N).0/24 (deliberately not the
/// subnet its subnet.env names: the podCIDR must win).
///
/// A stock-Flannel node is registered as a running flanneld leaves its
/// Node: its podCIDR is its subnet and Flannel's annotations name its
/// public IP and VtepMAC.
pub fn start_for_lab(lab: &mut crate::Lab) -> Result<()> {
    use flannel_agent::subnet::kube::{
        BACKEND_DATA, BACKEND_TYPE, BACKEND_V6_DATA, PUBLIC_IP, PUBLIC_IPV6, SUBNET_MANAGER,
    };
    let fake = FakeKube::start(&lab.fabric)?;
    let dual = lab.dual();
    for (i, node) in lab.nodes.iter().enumerate() {
        if node.kind == crate::NodeKind::StockFlannel {
            let data = json!({"VNI": crate::lab::VNI, "VtepMAC": node.vtep_mac.to_string()});
            let mut ann = json!({
                BACKEND_TYPE: "vxlan",
                BACKEND_DATA: data.to_string(),
                SUBNET_MANAGER: "true",
                PUBLIC_IP: node.ip.to_string(),
            });
            let mut cidrs = vec![node.subnet.to_string()];
            if let (Some(ip6), Some(s6)) = (node.ip6, node.subnet6) {
                let data6 = json!({"VNI": crate::lab::VNI, "VtepMAC": node.vtep6_mac.to_string()});
                ann[PUBLIC_IPV6] = json!(ip6.to_string());
                ann[BACKEND_V6_DATA] = json!(data6.to_string());
                cidrs.push(s6.to_string());
            }
            fake.add_node_cidrs(&crate::lab::node_name(i), &cidrs, ann);
            continue;
        }
        // An IPv6-only cluster's nodes get an IPv6 podCIDR alone.
        let mut cidrs = Vec::new();
        if !lab.ipv6_only() {
            cidrs.push(format!("10.244.{}.0/24", 11 + i));
        }
        if dual {
            cidrs.push(format!("fd00:10:244:{}::/64", 11 + i));
        }
        fake.add_node_cidrs(&crate::lab::node_name(i), &cidrs, json!({}));
    }
    lab.extras.push(Box::new(fake));
    Ok(())
}

/// The lab's fake API server.
pub fn of(lab: &crate::Lab) -> &FakeKube {
    lab.extras
        .iter()
        .find_map(|e| e.downcast_ref::<FakeKube>())
        .expect("the lab runs a fake API server")
}

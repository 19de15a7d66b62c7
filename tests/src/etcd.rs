//! A real etcd server for the lab (Debian's `etcd-server`), listening on
//! the fabric bridge's address inside the lab's fabric namespace, and a
//! client that reaches it from there.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use flannel_agent::subnet::{
    etcd::{EtcdOptions, EtcdStore, DEFAULT_PREFIX},
    LeaseTiming,
};

use crate::{
    lab::{Lab, NodeKind, FABRIC_IP},
    netns::in_netns,
};

pub const SERVICE: &str = "etcd";

pub fn endpoint() -> String {
    format!("http://{FABRIC_IP}:2379")
}

/// `before_agents` hook: etcd up, the lab's config and every stock-Flannel
/// node's lease written (as Flannel writes them: a 24 h etcd lease).
pub fn start(lab: &mut Lab) -> Result<()> {
    let data = lab.dir.join("etcd-data");
    let argv: Vec<String> = [
        "etcd",
        "--name",
        "lab",
        "--data-dir",
        &data.display().to_string(),
        "--listen-client-urls",
        &endpoint(),
        "--advertise-client-urls",
        &endpoint(),
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "lab=http://127.0.0.1:2380",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let fabric = lab.fabric.clone();
    lab.start_service(SERVICE, &fabric, &argv)?;
    wait_up(lab)?;
    let conf = lab.net_conf_text();
    let stock: Vec<_> = lab
        .nodes
        .iter()
        .filter(|n| n.kind == NodeKind::StockFlannel)
        .map(|n| (n.subnet, n.attrs()))
        .collect();
    with_store(lab, move |s| async move {
        s.put_config(&conf).await?;
        for (subnet, attrs) in stock {
            s.put(subnet, &attrs, Some(Duration::from_secs(24 * 3600)))
                .await?;
        }
        Ok(())
    })
}

/// Waits until etcd answers.
pub fn wait_up(lab: &mut Lab) -> Result<()> {
    let start = Instant::now();
    loop {
        if with_store(lab, |s| async move { Ok(s.list_subnets().await?) }).is_ok() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            let log = lab.service(SERVICE)?.log();
            bail!("etcd did not come up in 20 s: {log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` with a store client connected from inside the fabric namespace.
pub fn with_store<T, F, Fut>(lab: &Lab, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(EtcdStore) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    in_netns(&lab.fabric, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let opts = EtcdOptions {
                endpoints: vec![endpoint()],
                prefix: DEFAULT_PREFIX.to_string(),
                ..Default::default()
            };
            let store = EtcdStore::connect(&opts, LeaseTiming::default()).await?;
            f(store).await
        })
    })
}

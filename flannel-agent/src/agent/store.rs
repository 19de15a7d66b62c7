//! The agent's side of the lease store: which store, the network config,
//! getting this node's lease, and the two tasks that keep the lease set
//! current (watch) and this node's lease alive (renew).
//!
//! A store that cannot be reached never stops the data path: the watch
//! task keeps the last published lease set, logs, and retries with backoff;
//! the reconcile loop goes on with what it has.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};

use crate::{
    config::NetConfig,
    metrics::Metrics,
    subnet::{
        etcd::{EtcdOptions, EtcdStore},
        kube::{KubeOptions, KubeStore},
        local::LocalStore,
        Backoff, Lease, LeaseSet, LeaseTiming, SubnetError, SubnetManager,
    },
};

/// Which store, and how to reach it.
#[derive(Clone, Debug)]
pub enum StoreOptions {
    Local { dir: PathBuf },
    Etcd(EtcdOptions),
    Kube(KubeOptions),
}

/// What the watch task publishes: `None` until the first full listing.
pub type LeaseFeed = watch::Receiver<Option<LeaseSet>>;

/// Retries `f` with backoff until it succeeds, logging each failure.
pub async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::default();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(err = %format!("{err:#}"), retry_in = ?delay, "{what}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Runs one call to the store, counting it (and its failure) as `op`.
pub async fn counted<T, E>(
    metrics: &Metrics,
    store: &'static str,
    op: &'static str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let r = call.await;
    metrics.store_call(store, op, r.is_ok());
    r
}

pub async fn connect(opts: &StoreOptions, timing: LeaseTiming) -> anyhow::Result<SubnetManager> {
    Ok(match opts {
        StoreOptions::Local { dir } => SubnetManager::Local(LocalStore::open(dir, timing)?),
        StoreOptions::Etcd(o) => {
            SubnetManager::Etcd(Box::new(EtcdStore::connect(o, timing).await?))
        }
        StoreOptions::Kube(o) => SubnetManager::Kube(Box::new(KubeStore::connect(o).await?)),
    })
}

/// net-conf.json from the store (etcd) or from `path` (local, kube).
pub async fn network_config(
    store: &SubnetManager,
    path: &std::path::Path,
) -> anyhow::Result<NetConfig> {
    let (text, source) = match store.network_config().await? {
        Some(text) => (text, format!("{} store", store.name())),
        None => (
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the network config {}", path.display()))?,
            path.display().to_string(),
        ),
    };
    let cfg = NetConfig::parse(&text).with_context(|| format!("network config from {source}"))?;
    cfg.check_store(store.name())
        .with_context(|| format!("network config from {source}"))?;
    for field in &cfg.unknown_fields {
        tracing::warn!(
            field,
            source,
            "unknown field in the network config, ignored"
        );
    }
    Ok(cfg)
}

/// Starts the task that lists and watches leases, for as long as the
/// process lives.
pub fn spawn_watch(store: SubnetManager, metrics: Arc<Metrics>) -> LeaseFeed {
    let (tx, rx) = watch::channel(None);
    metrics.watch_started(store.name());
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        loop {
            let started = Instant::now();
            let result = counted(&metrics, store.name(), "watch", store.watch(&tx)).await;
            metrics.watch_restarted(store.name());
            let Err(err) = result else {
                continue;
            };
            if started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::warn!(
                store = store.name(),
                err = %err,
                retry_in = ?delay,
                "lease store unreachable; the data path keeps the last known leases"
            );
            tokio::time::sleep(delay).await;
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// Why the renew task gave up.
pub type Fatal = mpsc::Receiver<anyhow::Error>;

/// Keeps this node's lease alive: renews `margin` before expiry, and at
/// once when the lease vanishes from the store (deleted by hand, expired
/// while the store was away). Reports a lease taken by another node.
pub fn spawn_renew(
    store: SubnetManager,
    mut lease: Lease,
    timing: LeaseTiming,
    mut feed: LeaseFeed,
    metrics: Arc<Metrics>,
) -> Fatal {
    let (fatal_tx, fatal_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        loop {
            let due = match lease.expiration {
                Some(exp) => exp
                    .checked_sub(timing.renew_margin)
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default(),
                // Reservations and Node objects do not expire: check now
                // and then that ours is still there.
                None => Duration::from_secs(60),
            };
            let (id, ip) = (lease.id(), lease.public_addr());
            let missing = move |set: &Option<LeaseSet>| {
                set.as_ref()
                    .is_some_and(|s| s.get(&id).map(Lease::public_addr) != Some(ip))
            };
            tokio::select! {
                _ = tokio::time::sleep(due) => {}
                r = feed.wait_for(missing) => {
                    if r.is_err() { return; }
                    tracing::warn!(subnet = %id, "this node's lease is gone from the store; writing it back");
                }
            }
            match counted(&metrics, store.name(), "renew", store.renew(&lease)).await {
                Ok(l) => {
                    tracing::debug!(subnet = %l.id(), "lease renewed");
                    lease = l;
                    backoff.reset();
                    // Let the store's watch catch up before checking again.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        feed.wait_for(|s| !missing(s)),
                    )
                    .await;
                }
                Err(SubnetError::LeaseLost { subnet, holder }) => {
                    let _ = fatal_tx
                        .send(anyhow::anyhow!(
                            "this node's lease {subnet} now belongs to {holder}: restarting to get a new one"
                        ))
                        .await;
                    return;
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%err, retry_in = ?delay, "renewing the lease");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    });
    fatal_rx
}

/// The lease subnet in an existing subnet.env (Flannel reuses it if free).
pub fn previous_subnet(path: &std::path::Path) -> Option<Ipv4Net> {
    crate::subnet::env::SubnetEnv::read(path).and_then(|e| e.lease())
}

/// The IPv6 subnet of the last subnet.env, to keep it across restarts.
pub fn previous_subnet6(path: &std::path::Path) -> Option<ipnet::Ipv6Net> {
    crate::subnet::env::SubnetEnv::read(path).and_then(|e| e.lease6())
}

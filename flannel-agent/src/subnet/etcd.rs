//! The `etcd` store: Flannel's layout under `--etcd-prefix`
//! (`/coreos.com/network`): `config` holds net-conf.json, and
//! `subnets/<ip>-<len>` holds each node's `LeaseAttrs` as JSON, attached to
//! an etcd lease with the lease TTL (24 h). A key without an etcd lease is a
//! reservation: never expires, never handed to another node.
//!
//! Allocation writes with a transaction that only succeeds if the key does
//! not exist yet (`create_revision == 0`), so two nodes racing for a subnet
//! never both get it. The watch resumes from the last revision it saw, and
//! re-lists when etcd has compacted that revision away.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::sync::Mutex;

use super::{
    choose_subnet, choose_subnet6, lease_id, parse_subnet_key, publish, subnet_key, Lease,
    LeaseAttrs, LeaseTiming, LeaseTx, Result, SubnetError,
};
use crate::config::NetConfig;

pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// How to reach etcd (Flannel's `--etcd-*` flags).
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub cafile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// The last revision a watch delivered, and the lease set at it.
type Seen = Option<(i64, BTreeMap<IpNet, Lease>)>;

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    timing: LeaseTiming,
    /// The last revision the watch delivered and the set at that revision.
    seen: Arc<Mutex<Seen>>,
}

/// Unary calls fail after this long instead of hanging on a dead store.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn err(what: &str, e: impl std::fmt::Display) -> SubnetError {
    SubnetError::Store(format!("etcd: {what}: {e}"))
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(err(what, e)),
        Err(_) => Err(err(what, format!("no answer within {CALL_TIMEOUT:?}"))),
    }
}

impl EtcdStore {
    pub async fn connect(opts: &EtcdOptions, timing: LeaseTiming) -> Result<Self> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let (Some(u), Some(p)) = (&opts.username, &opts.password) {
            co = co.with_user(u, p);
        }
        if opts.cafile.is_some() || opts.certfile.is_some() {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| err(&format!("reading {}", p.display()), e))
            };
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.cafile {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            match (&opts.certfile, &opts.keyfile) {
                (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => {
                    return Err(SubnetError::Config(
                        "--etcd-certfile and --etcd-keyfile go together".into(),
                    ))
                }
            }
            co = co.with_tls(tls);
        }
        let client = timed("connecting", Client::connect(&opts.endpoints, Some(co))).await?;
        Ok(EtcdStore {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            timing,
            seen: Arc::default(),
        })
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, subnet: Ipv4Net, v6: Option<Ipv6Net>) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key(subnet, v6))
    }

    pub async fn network_config(&self) -> Result<String> {
        let key = format!("{}/config", self.prefix);
        let resp = timed(
            "reading the network config",
            self.client.clone().get(key.clone(), None),
        )
        .await?;
        let kv = resp.kvs().first().ok_or_else(|| {
            SubnetError::Config(format!(
                "no network config at {key}: write net-conf.json there (etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}')"
            ))
        })?;
        kv.value_str()
            .map(str::to_string)
            .map_err(|e| err(&format!("{key} is not UTF-8"), e))
    }

    /// Writes net-conf.json where Flannel reads it (`<prefix>/config`).
    pub async fn put_config(&self, text: &str) -> Result<()> {
        let key = format!("{}/config", self.prefix);
        timed(
            "writing the network config",
            self.client.clone().put(key, text, None),
        )
        .await?;
        Ok(())
    }

    fn decode(&self, kv: &KeyValue) -> Option<Lease> {
        let key = kv.key_str().ok()?;
        let (subnet, ipv6_subnet, attrs) =
            match super::decode_lease(key.strip_prefix(&self.subnets_prefix())?, kv.value()) {
                Ok(Some(lease)) => lease,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(key, err = %e, "skipping a lease whose value is not LeaseAttrs");
                    return None;
                }
            };
        Some(Lease {
            subnet,
            ipv6_subnet,
            attrs,
            // etcd holds the TTL on the lease, not the key: the bound is
            // enough here, since only reservations are told apart.
            expiration: (kv.lease() != 0).then(|| SystemTime::now() + self.timing.ttl),
        })
    }

    async fn list(&self) -> Result<(i64, BTreeMap<IpNet, Lease>, Vec<KeyValue>)> {
        let resp = timed(
            "listing subnets",
            self.client
                .clone()
                .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let kvs = resp.kvs().to_vec();
        let set = kvs
            .iter()
            .filter_map(|kv| self.decode(kv))
            .map(|l| (l.id(), l))
            .collect();
        Ok((rev, set, kvs))
    }

    /// Compacts etcd's history up to now (operators and tests: a watch
    /// resuming from before this point must list again).
    pub async fn compact_now(&self) -> Result<()> {
        let rev = timed("reading the revision", self.client.clone().get("x", None))
            .await?
            .header()
            .map(|h| h.revision())
            .unwrap_or(0);
        timed("compacting", self.client.clone().compact(rev, None)).await?;
        Ok(())
    }

    /// Every lease in the store now.
    pub async fn list_subnets(&self) -> Result<Vec<(IpNet, Lease)>> {
        Ok(self.list().await?.1.into_iter().collect())
    }

    async fn grant(&self) -> Result<i64> {
        let ttl = self.timing.ttl.as_secs().max(1) as i64;
        Ok(timed(
            "granting a lease",
            self.client.clone().lease_grant(ttl, None),
        )
        .await?
        .id())
    }

    /// Writes `attrs` at `subnet` on a fresh etcd lease if the key still has
    /// `mod_revision` (0: does not exist). False when someone else won.
    async fn put_if(
        &self,
        subnet: Ipv4Net,
        v6: Option<Ipv6Net>,
        attrs: &LeaseAttrs,
        mod_revision: i64,
    ) -> Result<bool> {
        let key = self.key(subnet, v6);
        let lease = self.grant().await?;
        let value = serde_json::to_vec(attrs).map_err(|e| err("encoding", e))?;
        let cmp = if mod_revision == 0 {
            Compare::create_revision(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.clone(), CompareOp::Equal, mod_revision)
        };
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let ok = timed("writing a lease", self.client.clone().txn(txn))
            .await?
            .succeeded();
        if !ok {
            let _ = self.client.clone().lease_revoke(lease).await;
        }
        Ok(ok)
    }

    fn leased(&self, subnet: Ipv4Net, v6: Option<Ipv6Net>, attrs: &LeaseAttrs) -> Lease {
        Lease {
            subnet,
            ipv6_subnet: v6,
            attrs: attrs.clone(),
            expiration: Some(SystemTime::now() + self.timing.ttl),
        }
    }

    pub async fn acquire(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        previous6: Option<Ipv6Net>,
    ) -> Result<Lease> {
        if !cfg.enable_ipv4 {
            return Err(SubnetError::Config(
                "IPv6-only clusters (EnableIPv4 false) need --kube-subnet-mgr: Flannel's etcd registry gives every lease an IPv4 subnet, and cannot hold a second IPv6-only one".into(),
            ));
        }
        // The IPv6 subnet a lease should have under this config.
        let v6_fits = |l: &Lease| match l.ipv6_subnet {
            Some(n) => cfg.in_range6(n),
            None => !cfg.enable_ipv6,
        };
        for _ in 0..10 {
            let (_, set, kvs) = self.list().await?;
            if let Some(own) = set
                .values()
                .find(|l| l.attrs.public_ip == attrs.public_ip && cfg.in_range(l.subnet))
            {
                let kv = kvs
                    .iter()
                    .find(|kv| {
                        kv.key_str().ok() == Some(self.key(own.subnet, own.ipv6_subnet).as_str())
                    })
                    .expect("listed");
                if kv.lease() == 0 {
                    // A reservation for this node: used as it is.
                    return Ok(own.clone());
                }
                if v6_fits(own) {
                    return self.renew(own).await;
                }
                // IPv6 turned on (or off) since the lease was taken: the
                // key names the subnets, so the lease moves to a new one.
                self.delete_key(&self.key(own.subnet, own.ipv6_subnet))
                    .await?;
                continue;
            }
            let taken = |n: Ipv4Net| set.contains_key(&IpNet::V4(n));
            let taken6 = |n: Ipv6Net| {
                set.values()
                    .filter_map(|l| l.ipv6_subnet)
                    .any(|t| t.contains(&n.network()) || n.contains(&t.network()))
            };
            let subnet = choose_subnet(cfg, &taken, previous)?;
            let v6 = choose_subnet6(cfg, &taken6, previous6)?;
            if self.put_if(subnet, v6, attrs, 0).await? {
                // A key that names an IPv6 subnet too can be created beside
                // another node's for the same IPv4 (or IPv6) subnet: the
                // transaction only sees its own key. The older key wins;
                // the younger one goes and chooses again.
                if v6.is_some() && !self.holds_oldest_key(subnet, v6).await? {
                    self.delete_key(&self.key(subnet, v6)).await?;
                    tracing::info!(%subnet, "another node took the subnet first; choosing again");
                    continue;
                }
                return Ok(self.leased(subnet, v6, attrs));
            }
            tracing::info!(%subnet, "another node took the subnet first; choosing again");
        }
        Err(err("acquiring a lease", "lost the race ten times in a row"))
    }

    /// Whether the key for `subnet`/`v6` is the oldest of the keys that
    /// name either subnet.
    pub async fn holds_oldest_key(&self, subnet: Ipv4Net, v6: Option<Ipv6Net>) -> Result<bool> {
        let (_, _, kvs) = self.list().await?;
        let ours = self.key(subnet, v6);
        let oldest = kvs
            .iter()
            .filter(|kv| {
                kv.key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(&self.subnets_prefix()))
                    .and_then(parse_subnet_key)
                    .is_some_and(|(n, n6)| n == subnet || (n6.is_some() && n6 == v6))
            })
            .min_by_key(|kv| kv.create_revision());
        Ok(oldest.is_none_or(|kv| kv.key_str().ok() == Some(ours.as_str())))
    }

    async fn delete_key(&self, key: &str) -> Result<()> {
        timed(
            "deleting a lease",
            self.client.clone().delete(key.to_string(), None),
        )
        .await?;
        Ok(())
    }

    /// Moves the key to a fresh etcd lease (Flannel renews the same way:
    /// a new TTL, the same attrs), recreating it if it was deleted.
    pub async fn renew(&self, lease: &Lease) -> Result<Lease> {
        let key = self.key(lease.subnet, lease.ipv6_subnet);
        let resp = timed(
            "reading the lease",
            self.client.clone().get(key.clone(), None),
        )
        .await?;
        let cur = resp.kvs().first();
        if let Some(kv) = cur {
            match self.decode(kv) {
                Some(l) if l.attrs.public_ip != lease.attrs.public_ip => {
                    return Err(SubnetError::LeaseLost {
                        subnet: lease.id(),
                        holder: l.public_addr(),
                    })
                }
                Some(l) if kv.lease() == 0 => return Ok(l),
                _ => {}
            }
        }
        let (mod_rev, old) = cur
            .map(|kv| (kv.mod_revision(), kv.lease()))
            .unwrap_or((0, 0));
        if !self
            .put_if(lease.subnet, lease.ipv6_subnet, &lease.attrs, mod_rev)
            .await?
        {
            return Err(err(
                "renewing",
                format!("{key} changed while renewing; retrying"),
            ));
        }
        if old != 0 {
            // The key now hangs on the new lease; the old one can go.
            let _ = self.client.clone().lease_revoke(old).await;
        }
        Ok(self.leased(lease.subnet, lease.ipv6_subnet, &lease.attrs))
    }

    /// Writes a lease as another node or an operator would (tests, tools):
    /// with a TTL, or as a reservation (`ttl` `None`).
    pub async fn put(
        &self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.put_dual(subnet, None, attrs, ttl).await
    }

    /// [`EtcdStore::put`] with an IPv6 subnet in the key beside the IPv4 one.
    pub async fn put_dual(
        &self,
        subnet: Ipv4Net,
        v6: Option<Ipv6Net>,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let mut opts = None;
        if let Some(ttl) = ttl {
            let id = timed(
                "granting a lease",
                self.client
                    .clone()
                    .lease_grant(ttl.as_secs().max(1) as i64, None),
            )
            .await?
            .id();
            opts = Some(PutOptions::new().with_lease(id));
        }
        let value = serde_json::to_vec(attrs).map_err(|e| err("encoding", e))?;
        timed(
            "writing a lease",
            self.client.clone().put(self.key(subnet, v6), value, opts),
        )
        .await?;
        Ok(())
    }

    /// Deletes the lease of IPv4 subnet `subnet`, whatever IPv6 subnet its
    /// key names.
    pub async fn delete(&self, subnet: Ipv4Net) -> Result<()> {
        let (_, set, _) = self.list().await?;
        let v6 = set.get(&IpNet::V4(subnet)).and_then(|l| l.ipv6_subnet);
        self.delete_key(&self.key(subnet, v6)).await
    }

    pub async fn watch(&self, tx: &LeaseTx) -> Result<()> {
        let mut seen = self.seen.lock().await;
        loop {
            let (rev, mut set) = match seen.take() {
                Some(s) => s,
                None => {
                    let (rev, set, _) = self.list().await?;
                    (rev, set)
                }
            };
            publish(tx, set.clone());
            *seen = Some((rev, set.clone()));
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(rev + 1);
            let mut stream = timed(
                "starting the watch",
                self.client.clone().watch(self.subnets_prefix(), Some(opts)),
            )
            .await?;
            let mut rev = rev;
            loop {
                let msg = stream
                    .message()
                    .await
                    .map_err(|e| err("watching", e))?
                    .ok_or_else(|| err("watching", "the stream ended"))?;
                if msg.compact_revision() > 0 || (msg.canceled() && !msg.created()) {
                    tracing::info!(
                        from = rev + 1,
                        compacted = msg.compact_revision(),
                        reason = msg.cancel_reason(),
                        "watch revision compacted away; listing again"
                    );
                    *seen = None;
                    break;
                }
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    rev = rev.max(kv.mod_revision());
                    let subnet = kv
                        .key_str()
                        .ok()
                        .and_then(|k| k.strip_prefix(&self.subnets_prefix()))
                        .and_then(parse_subnet_key);
                    let Some((subnet, v6)) = subnet else { continue };
                    let id = lease_id(subnet, v6);
                    // A key gone takes its lease with it, not a newer key's
                    // for the same IPv4 subnet.
                    let remove = |set: &mut BTreeMap<IpNet, Lease>| {
                        if set.get(&id).is_some_and(|l| l.ipv6_subnet == v6) {
                            set.remove(&id);
                        }
                    };
                    match ev.event_type() {
                        EventType::Put => match self.decode(kv) {
                            Some(l) => {
                                set.insert(id, l);
                            }
                            None => remove(&mut set),
                        },
                        EventType::Delete => remove(&mut set),
                    }
                }
                publish(tx, set.clone());
                *seen = Some((rev, set.clone()));
            }
        }
    }
}

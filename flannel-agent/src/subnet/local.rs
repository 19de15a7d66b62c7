//! The `local` store: leases in one JSON file on disk, for a single machine
//! and for the lab, with etcd's semantics (TTL, renewal, reservations,
//! watch).
//!
//! Writers take an exclusive `flock` on `<dir>/lock`, read, change and
//! replace `<dir>/leases.json` (temp file, fsync, rename), so several agents
//! on one host never hand out the same subnet and a crash never leaves a
//! half-written file. Readers need no lock: rename is atomic. Watch polls
//! the file's metadata every 100 ms and re-reads only when it changed; a
//! crate for inotify would save the polling but not a line of logic.

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::{
    choose_subnet, choose_subnet6, has_ipv4, lease_id, parse_subnet_key, publish, subnet_key,
    Lease, LeaseAttrs, LeaseTiming, LeaseTx, Result, SubnetError,
};
use crate::config::NetConfig;

#[derive(Clone, Debug)]
pub struct LocalStore {
    dir: PathBuf,
    timing: LeaseTiming,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreFile {
    revision: u64,
    /// Flannel's subnet keys (`10.244.1.0-24`, with IPv6
    /// `10.244.1.0-24&fd00:10:244:1::-64`) to lease records.
    subnets: BTreeMap<String, Record>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    attrs: LeaseAttrs,
    /// Milliseconds since the epoch; absent for a reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_ms: Option<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn store_err(what: &str, path: &Path, e: impl std::fmt::Display) -> SubnetError {
    SubnetError::Store(format!("local store: {what} {}: {e}", path.display()))
}

impl StoreFile {
    fn live(&self, now: u64) -> BTreeMap<IpNet, Lease> {
        self.subnets
            .iter()
            .filter(|(_, r)| r.expires_ms.is_none_or(|e| e > now))
            .filter_map(|(k, r)| {
                let (subnet, v6) = parse_subnet_key(k)?;
                Some((lease_id(subnet, v6), lease_of(subnet, v6, r)))
            })
            .collect()
    }

    /// The key holding the lease `id` names (see `Lease::id`): of an IPv4
    /// subnet whatever its IPv6 part, or an IPv6-only lease.
    fn key_of(&self, id: impl Into<IpNet>) -> Option<String> {
        let id = id.into();
        self.subnets
            .keys()
            .find(|k| parse_subnet_key(k).is_some_and(|(n, v6)| lease_id(n, v6) == id))
            .cloned()
    }

    fn expire(&mut self, now: u64) -> bool {
        let before = self.subnets.len();
        self.subnets
            .retain(|_, r| r.expires_ms.is_none_or(|e| e > now));
        before != self.subnets.len()
    }
}

impl LocalStore {
    pub fn open(dir: &Path, timing: LeaseTiming) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| store_err("creating", dir, e))?;
        Ok(LocalStore {
            dir: dir.to_path_buf(),
            timing,
        })
    }

    fn file(&self) -> PathBuf {
        self.dir.join("leases.json")
    }

    fn read(&self) -> Result<StoreFile> {
        let path = self.file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| store_err("parsing", &path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreFile::default()),
            Err(e) => Err(store_err("reading", &path, e)),
        }
    }

    /// Runs `f` on the store under the lock; writes it back when `f` says
    /// it changed something.
    fn update<T>(&self, f: impl FnOnce(&mut StoreFile) -> Result<(T, bool)>) -> Result<T> {
        let lock_path = self.dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| store_err("opening", &lock_path, e))?;
        // SAFETY: flock on a descriptor we own; released when `lock` drops.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(store_err(
                "locking",
                &lock_path,
                std::io::Error::last_os_error(),
            ));
        }
        let mut store = self.read()?;
        let expired = store.expire(now_ms());
        let (out, changed) = f(&mut store)?;
        if changed || expired {
            store.revision += 1;
            let path = self.file();
            let tmp = self
                .dir
                .join(format!(".leases.json.{}", std::process::id()));
            let bytes = serde_json::to_vec(&store).map_err(|e| store_err("encoding", &path, e))?;
            (|| -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            })()
            .map_err(|e| store_err("writing", &path, e))?;
        }
        drop(lock);
        Ok(out)
    }

    fn expiry(&self) -> u64 {
        now_ms() + self.timing.ttl.as_millis() as u64
    }

    /// Every live lease (expired ones are treated as gone).
    pub fn leases(&self) -> Result<BTreeMap<IpNet, Lease>> {
        Ok(self.read()?.live(now_ms()))
    }

    pub fn acquire(
        &self,
        cfg: &NetConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Net>,
        previous6: Option<Ipv6Net>,
    ) -> Result<Lease> {
        let expires = self.expiry();
        self.update(|s| {
            let keys: Vec<(Ipv4Net, Option<Ipv6Net>)> = s
                .subnets
                .keys()
                .filter_map(|k| parse_subnet_key(k))
                .collect();
            let taken6 = |n: Ipv6Net, except: &str| {
                s.subnets
                    .keys()
                    .filter(|k| *k != except)
                    .filter_map(|k| parse_subnet_key(k)?.1)
                    .any(|t| t.contains(&n.network()) || n.contains(&t.network()))
            };
            // Reuse this node's lease: same public IP (IPv6 in an
            // IPv6-only cluster). It gains an IPv6 subnet when the config
            // asks for one and it has none (or one out of range), and
            // loses it when the config has no IPv6.
            let own = s
                .subnets
                .iter()
                .find(|(k, r)| {
                    if cfg.enable_ipv4 {
                        r.attrs.public_ip == attrs.public_ip
                    } else {
                        r.attrs.public_ipv6.is_some()
                            && r.attrs.public_ipv6 == attrs.public_ipv6
                            && parse_subnet_key(k).is_some_and(|(n, _)| !has_ipv4(n))
                    }
                })
                .map(|(k, _)| k.clone());
            if let Some(key) = own {
                if let Some((subnet, v6)) = parse_subnet_key(&key)
                    .filter(|(s, _)| cfg.in_range(*s) || !(cfg.enable_ipv4 || has_ipv4(*s)))
                {
                    let v6 = match v6.filter(|n| cfg.in_range6(*n)) {
                        Some(n) => Some(n),
                        None => choose_subnet6(cfg, &|n| taken6(n, &key), previous6)?,
                    };
                    let mut rec = s.subnets.remove(&key).expect("the key was found");
                    rec.attrs = attrs.clone();
                    if rec.expires_ms.is_some() {
                        rec.expires_ms = Some(expires);
                    }
                    let lease = lease_of(subnet, v6, &rec);
                    s.subnets.insert(subnet_key(subnet, v6), rec);
                    return Ok((lease, true));
                }
            }
            let taken = |n: Ipv4Net| {
                keys.iter()
                    .filter(|(t, _)| has_ipv4(*t))
                    .any(|(t, _)| t.contains(&n.network()) || n.contains(&t.network()))
            };
            let subnet = choose_subnet(cfg, &taken, previous)?;
            let v6 = choose_subnet6(cfg, &|n| taken6(n, ""), previous6)?;
            let rec = Record {
                attrs: attrs.clone(),
                expires_ms: Some(expires),
            };
            let lease = lease_of(subnet, v6, &rec);
            s.subnets.insert(subnet_key(subnet, v6), rec);
            Ok((lease, true))
        })
    }

    pub fn renew(&self, lease: &Lease) -> Result<Lease> {
        let expires = self.expiry();
        self.update(|s| {
            let key = s.key_of(lease.id()).unwrap_or_else(|| lease.key());
            match s.subnets.get_mut(&key) {
                Some(rec)
                    if rec.attrs.public_ip != lease.attrs.public_ip
                        || (!lease.has_ipv4()
                            && rec.attrs.public_ipv6 != lease.attrs.public_ipv6) =>
                {
                    let holder = match (lease.has_ipv4(), rec.attrs.public_ipv6) {
                        (false, Some(ip6)) => IpAddr::V6(ip6),
                        _ => IpAddr::V4(rec.attrs.public_ip),
                    };
                    Err(SubnetError::LeaseLost {
                        subnet: lease.id(),
                        holder,
                    })
                }
                Some(rec) => {
                    rec.attrs = lease.attrs.clone();
                    if rec.expires_ms.is_some() {
                        rec.expires_ms = Some(expires);
                    }
                    let v6 = parse_subnet_key(&key).and_then(|(_, v6)| v6);
                    Ok((lease_of(lease.subnet, v6, rec), true))
                }
                None => {
                    let rec = Record {
                        attrs: lease.attrs.clone(),
                        expires_ms: Some(expires),
                    };
                    let out = lease_of(lease.subnet, lease.ipv6_subnet, &rec);
                    s.subnets.insert(key, rec);
                    Ok((out, true))
                }
            }
        })
    }

    /// Writes a lease as another node (or an operator) would: with a TTL,
    /// or as a reservation when `ttl` is `None`.
    pub fn put(&self, subnet: Ipv4Net, attrs: &LeaseAttrs, ttl: Option<Duration>) -> Result<()> {
        self.put_dual(subnet, None, attrs, ttl)
    }

    /// [`LocalStore::put`] with an IPv6 subnet beside the IPv4 one (or,
    /// with `subnet` `0.0.0.0/0`, an IPv6-only lease).
    pub fn put_dual(
        &self,
        subnet: Ipv4Net,
        v6: Option<Ipv6Net>,
        attrs: &LeaseAttrs,
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.update(|s| {
            let rec = Record {
                attrs: attrs.clone(),
                expires_ms: ttl.map(|t| now_ms() + t.as_millis() as u64),
            };
            if let Some(old) = s.key_of(lease_id(subnet, v6)) {
                s.subnets.remove(&old);
            }
            s.subnets.insert(subnet_key(subnet, v6), rec);
            Ok(((), true))
        })
    }

    /// Writes many leases in one update (tools, tests, bulk imports).
    pub fn put_many(&self, leases: &[(Ipv4Net, LeaseAttrs)], ttl: Option<Duration>) -> Result<()> {
        self.update(|s| {
            let expires_ms = ttl.map(|t| now_ms() + t.as_millis() as u64);
            for (subnet, attrs) in leases {
                let rec = Record {
                    attrs: attrs.clone(),
                    expires_ms,
                };
                if let Some(old) = s.key_of(*subnet) {
                    s.subnets.remove(&old);
                }
                s.subnets.insert(subnet_key(*subnet, None), rec);
            }
            Ok(((), !leases.is_empty()))
        })
    }

    /// Deletes many leases in one update.
    pub fn delete_many(&self, subnets: &[Ipv4Net]) -> Result<()> {
        self.update(|s| {
            let before = s.subnets.len();
            for subnet in subnets {
                if let Some(key) = s.key_of(*subnet) {
                    s.subnets.remove(&key);
                }
            }
            Ok(((), s.subnets.len() != before))
        })
    }

    /// Deletes a lease (by `Lease::id`); true when it existed.
    pub fn delete(&self, id: impl Into<IpNet>) -> Result<bool> {
        let id = id.into();
        self.update(|s| {
            let gone = s
                .key_of(id)
                .is_some_and(|key| s.subnets.remove(&key).is_some());
            Ok((gone, gone))
        })
    }

    /// Publishes the lease set now and whenever the file or an expiry
    /// changes it.
    pub async fn watch(&self, tx: &LeaseTx) -> Result<()> {
        let path = self.file();
        let mut seen: Option<(u64, SystemTime, u64)> = None;
        let mut store = StoreFile::default();
        loop {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => {
                    use std::os::unix::fs::MetadataExt;
                    Some((m.ino(), m.modified().unwrap_or(UNIX_EPOCH), m.len()))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(store_err("watching", &path, e)),
            };
            if meta != seen {
                store = self.read()?;
                seen = meta;
            }
            publish(tx, store.live(now_ms()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn lease_of(subnet: Ipv4Net, ipv6_subnet: Option<Ipv6Net>, rec: &Record) -> Lease {
    Lease {
        subnet,
        ipv6_subnet,
        attrs: rec.attrs.clone(),
        expiration: rec
            .expires_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::mac::MacAddr;
    use crate::subnet::LeaseSet;

    fn store(name: &str, ttl: Duration) -> (LocalStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("local-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let timing = LeaseTiming {
            ttl,
            renew_margin: ttl / 2,
        };
        (LocalStore::open(&dir, timing).unwrap(), dir)
    }

    fn attrs(n: u8) -> LeaseAttrs {
        LeaseAttrs::vxlan(
            Ipv4Addr::new(10, 0, 0, n),
            1,
            MacAddr([0x0e, 0, 0, 0, 0, n]),
        )
    }

    fn cfg(text: &str) -> NetConfig {
        NetConfig::parse(text).unwrap()
    }

    #[test]
    fn leases_are_reused_reserved_and_run_out() {
        let (s, dir) = store("alloc", Duration::from_secs(60));
        let c = cfg(
            r#"{"Network":"10.7.0.0/16","SubnetMin":"10.7.1.0","SubnetMax":"10.7.4.0","Backend":{"Type":"vxlan"}}"#,
        );
        let reserved: Ipv4Net = "10.7.2.0/24".parse().unwrap();
        s.put(reserved, &attrs(99), None).unwrap();
        let a = s.acquire(&c, &attrs(1), None, None).unwrap();
        let b = s.acquire(&c, &attrs(2), None, None).unwrap();
        assert_ne!(a.subnet, b.subnet);
        assert!(a.subnet != reserved && b.subnet != reserved);
        // Same public IP: the same lease again.
        assert_eq!(
            s.acquire(&c, &attrs(1), None, None).unwrap().subnet,
            a.subnet
        );
        // The reservation's holder gets it, and it stays without TTL.
        let r = s.acquire(&c, &attrs(99), None, None).unwrap();
        assert_eq!((r.subnet, r.expiration), (reserved, None));
        s.acquire(&c, &attrs(3), None, None).unwrap();
        let err = s
            .acquire(&c, &attrs(4), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of subnets"), "{err}");
        // A deleted lease frees its subnet; renew of a lost lease says so.
        assert!(s.delete(a.subnet).unwrap());
        let d = s.acquire(&c, &attrs(4), None, None).unwrap();
        assert_eq!(d.subnet, a.subnet);
        let err = s.renew(&a).unwrap_err().to_string();
        assert!(err.contains("taken by 10.0.0.4"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn leases_expire_unless_renewed() {
        let (s, dir) = store("ttl", Duration::from_millis(300));
        let c = cfg(r#"{"Network":"10.8.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let a = s.acquire(&c, &attrs(1), None, None).unwrap();
        let b = s.acquire(&c, &attrs(2), None, None).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        s.renew(&a).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let live = s.leases().unwrap();
        assert!(live.contains_key(&a.id()), "renewed lease expired");
        assert!(!live.contains_key(&b.id()), "unrenewed lease still live");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Many agents at once on one host: every subnet handed out once.
    #[test]
    fn concurrent_agents_never_share_a_subnet() {
        let (s, dir) = store("race", Duration::from_secs(60));
        let c = cfg(
            r#"{"Network":"10.9.0.0/16","SubnetMin":"10.9.1.0","SubnetMax":"10.9.40.0","Backend":{"Type":"vxlan"}}"#,
        );
        let threads: Vec<_> = (1..=40u8)
            .map(|n| {
                let (s, c) = (s.clone(), c.clone());
                std::thread::spawn(move || s.acquire(&c, &attrs(n), None, None).unwrap().subnet)
            })
            .collect();
        let mut got: Vec<Ipv4Net> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 40);
        assert_eq!(s.leases().unwrap().len(), 40);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn watch_sees_changes_and_expiry() {
        let (s, dir) = store("watch", Duration::from_millis(400));
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let w = s.clone();
        let task = tokio::spawn(async move { w.watch(&tx).await });
        let subnet: Ipv4Net = "10.10.5.0/24".parse().unwrap();
        s.put(subnet, &attrs(5), Some(Duration::from_millis(400)))
            .unwrap();
        let wait = |rx: &mut tokio::sync::watch::Receiver<Option<LeaseSet>>, want: bool| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(3),
                    rx.wait_for(|s| {
                        s.as_ref()
                            .is_some_and(|s| s.contains_key(&IpNet::V4(subnet)) == want)
                    }),
                )
                .await
                .expect("watch did not deliver")
                .unwrap();
            }
        };
        wait(&mut rx, true).await;
        // Expiry alone (no write) removes it.
        wait(&mut rx, false).await;
        s.put(subnet, &attrs(5), None).unwrap();
        wait(&mut rx, true).await;
        s.delete(subnet).unwrap();
        wait(&mut rx, false).await;
        task.abort();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// IPv6-only: leases with Flannel's empty IPv4 subnet, told apart and
    /// reused by the node's public IPv6.
    #[test]
    fn ipv6_only_leases_are_keyed_and_reused_by_their_ipv6_side() {
        let (s, dir) = store("v6only", Duration::from_secs(60));
        let c = cfg(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:6::/48","IPv6SubnetMin":"fd00:6:0:1::","IPv6SubnetMax":"fd00:6:0:2::","Backend":{"Type":"vxlan"}}"#,
        );
        let node = |n: u8| {
            LeaseAttrs::vxlan(Ipv4Addr::UNSPECIFIED, 1, MacAddr([0x0e, 0, 0, 0, 0, n])).with_v6(
                format!("fd00:99::{n}").parse().unwrap(),
                1,
                MacAddr([0x0e, 0, 0, 0, 6, n]),
            )
        };
        let a = s.acquire(&c, &node(1), None, None).unwrap();
        let b = s.acquire(&c, &node(2), None, None).unwrap();
        for l in [&a, &b] {
            assert!(!l.has_ipv4() && l.ipv6_subnet.is_some(), "{l:?}");
            assert!(l.key().starts_with("0.0.0.0-0&"), "{}", l.key());
        }
        assert_ne!(a.ipv6_subnet, b.ipv6_subnet);
        let all = s.leases().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[&a.id()], a);
        // The same node again: its lease, not a third one (there is none).
        assert_eq!(
            s.acquire(&c, &node(1), None, None).unwrap().ipv6_subnet,
            a.ipv6_subnet
        );
        let err = s.acquire(&c, &node(3), None, None).unwrap_err().to_string();
        assert!(err.contains("out of IPv6 subnets"), "{err}");
        // Renewal keeps it; a lease taken by another node says by whom.
        assert_eq!(s.renew(&a).unwrap().ipv6_subnet, a.ipv6_subnet);
        assert!(s.delete(a.id()).unwrap());
        let c3 = s.acquire(&c, &node(3), None, None).unwrap();
        assert_eq!(c3.ipv6_subnet, a.ipv6_subnet);
        let err = s.renew(&a).unwrap_err().to_string();
        assert!(err.contains("taken by fd00:99::3"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn dual_stack_leases_carry_both_subnets_in_flannels_key() {
        let (s, dir) = store("dual", Duration::from_secs(60));
        let c = cfg(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0","EnableIPv6":true,"IPv6Network":"fd00:5::/48","IPv6SubnetMin":"fd00:5:0:1::","IPv6SubnetMax":"fd00:5:0:3::","Backend":{"Type":"vxlan"}}"#,
        );
        let prev6: Ipv6Net = "fd00:5:0:2::/64".parse().unwrap();
        let a = s.acquire(&c, &attrs(1), None, Some(prev6)).unwrap();
        assert_eq!(
            a.ipv6_subnet,
            Some(prev6),
            "the previous IPv6 subnet is kept"
        );
        let b = s.acquire(&c, &attrs(2), None, Some(prev6)).unwrap();
        let b6 = b.ipv6_subnet.expect("an IPv6 subnet");
        assert_ne!(b6, prev6, "a taken IPv6 subnet is not handed out twice");
        assert!(c.in_range6(b6));
        // Stored under Flannel's key, read back with both subnets.
        let text = std::fs::read_to_string(dir.join("leases.json")).unwrap();
        assert!(text.contains(&format!("\"{}\"", a.key())), "{text}");
        assert!(a.key().contains('&'), "{}", a.key());
        let all = s.leases().unwrap();
        assert_eq!(all[&a.id()].ipv6_subnet, Some(prev6));
        // Renewal and a restart of the node keep both.
        assert_eq!(s.renew(&a).unwrap().ipv6_subnet, Some(prev6));
        assert_eq!(
            s.acquire(&c, &attrs(1), None, None).unwrap(),
            s.leases().unwrap()[&a.id()]
        );
        // A lease taken before IPv6 was on gains an IPv6 subnet at the
        // next acquire, and loses it when IPv6 is off again.
        let v4 = cfg(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0","Backend":{"Type":"vxlan"}}"#,
        );
        let off = s.acquire(&v4, &attrs(1), None, None).unwrap();
        assert_eq!((off.subnet, off.ipv6_subnet), (a.subnet, None));
        let on = s.acquire(&c, &attrs(1), None, None).unwrap();
        assert_eq!(on.subnet, a.subnet);
        assert!(on.ipv6_subnet.is_some_and(|n| n != b6));
        assert!(s.delete(a.subnet).unwrap());
        assert_eq!(s.leases().unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! Loading, attaching and feeding the eBPF data path.
//!
//! Maps and program links are pinned under one directory per agent instance
//! (`<bpf-dir>/maps/<MAP>`, `<bpf-dir>/links/<name>`), so the data path keeps
//! forwarding while the agent is down. A starting agent loads its programs
//! against the pinned maps (reusing them) and swaps its programs into the
//! pinned links atomically (`bpf_link_update`) instead of tearing anything
//! down. A pinned map whose shape (type, key and value size, capacity,
//! flags) is not this build's is replaced first: aya reuses a pinned map
//! without comparing, and new programs over an old layout would read
//! garbage or, for a grown counter array, count nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::{
        links::LinkError,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use flannel_common::{counters, maps, programs, Config, Endpoint, RemoteNode, RemoteNode6, Vtep};
use ipnet::{Ipv4Net, Ipv6Net};

/// The eBPF object, built by `build.rs` and embedded in the binary.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flannel"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("creating pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("duplicating the program fd: {0}")]
    Dup(io::Error),
    #[error("reading the eBPF object's map definitions: {0}")]
    Object(#[from] aya_obj::ParseError),
    #[error("replacing the pinned map {path} (its shape is not this build's): {source}")]
    Replace { path: PathBuf, source: io::Error },
}

/// A map's shape, as the kernel reports a pinned map and as the object
/// declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The shapes of the maps `object` declares, by name.
pub fn object_shapes(object: &[u8]) -> Result<BTreeMap<String, MapShape>> {
    let obj = aya_obj::Object::parse(object)?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let shape = MapShape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

/// The shape of the map pinned at `path`, if one is.
pub fn pinned_shape(path: &Path) -> Option<MapShape> {
    let info = MapData::from_pin(path).ok()?.info().ok()?;
    Some(MapShape {
        map_type: info.map_type().ok()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// The shapes the maps are created with: as `object` declares them, but
/// `FLANNEL_LEASE_SLOTS` sized to the network's `lease_slots` (at least
/// one slot; an array cannot be empty).
pub fn wanted_shapes(object: &[u8], lease_slots: u32) -> Result<BTreeMap<String, MapShape>> {
    let mut shapes = object_shapes(object)?;
    if let Some(s) = shapes.get_mut(maps::LEASE_SLOTS) {
        s.max_entries = lease_slots.max(1);
    }
    Ok(shapes)
}

/// Unpins every map under `<dir>/maps` whose shape differs from the one
/// it is to have (`wanted_shapes`), so that loading creates it anew;
/// returns their names. The programs still attached keep their own
/// reference to the old map until their links are swapped to the new
/// programs. A network of another size thus gets new lease slots, filled
/// by the next reconcile pass; until then lookups walk the trie.
pub fn replace_incompatible_pins(
    dir: &Path,
    object: &[u8],
    lease_slots: u32,
) -> Result<Vec<String>> {
    let want = wanted_shapes(object, lease_slots)?;
    let mut replaced = Vec::new();
    for name in maps::ALL {
        let path = dir.join("maps").join(name);
        let Some(have) = pinned_shape(&path) else {
            continue;
        };
        if want.get(name) != Some(&have) {
            tracing::warn!(
                map = name,
                pinned = ?have,
                this_build = ?want.get(name),
                "pinned map has another shape: replacing it"
            );
            std::fs::remove_file(&path).map_err(|source| EbpfError::Replace {
                path: path.clone(),
                source,
            })?;
            replaced.push(name.to_string());
        }
    }
    Ok(replaced)
}

type Result<T> = std::result::Result<T, EbpfError>;

/// Address bytes as the programs compare them (network order in memory).
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn key_ip(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

pub struct Datapath {
    bpf: Ebpf,
    dir: PathBuf,
    /// Pod links this process has attached or taken over; a pinned link
    /// not in here still runs the program of the agent that pinned it.
    attached: BTreeSet<u32>,
}

impl Datapath {
    /// Loads the programs; maps are reused from `dir` when pinned there.
    /// `lease_slots`: how many lease slots the network has (see
    /// `Config::lease_slot`; 0 when it has too many for the map).
    pub fn load(dir: &Path, lease_slots: u32) -> Result<Self> {
        for sub in ["maps", "links"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| EbpfError::PinDir { path, source })?;
        }
        replace_incompatible_pins(dir, OBJECT, lease_slots)?;
        let map_paths: Vec<(&str, PathBuf)> = maps::ALL
            .iter()
            .map(|m| (*m, dir.join("maps").join(m)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::LEASE_SLOTS, lease_slots.max(1));
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut bpf = loader.load(OBJECT)?;
        for name in [programs::TC_FROM_POD, programs::TC_UPLINK_INGRESS] {
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or(EbpfError::Missing(name))?
                .try_into()
                .map_err(|source| EbpfError::Program { name, source })?;
            prog.load()
                .map_err(|source| EbpfError::Program { name, source })?;
        }
        xdp_program(&mut bpf)?
            .load()
            .map_err(|source| EbpfError::Program {
                name: programs::XDP_UPLINK,
                source,
            })?;
        Ok(Self {
            bpf,
            dir: dir.to_path_buf(),
            attached: BTreeSet::new(),
        })
    }

    fn link_path(&self, name: &str) -> PathBuf {
        self.dir.join("links").join(name)
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        self.bpf
            .program_mut(name)
            .ok_or(EbpfError::Missing(name))?
            .try_into()
            .map_err(|source| EbpfError::Program { name, source })
    }

    /// Opens a pinned link, or `None` when nothing is pinned there.
    fn pinned(path: &Path) -> Result<Option<FdLink>> {
        match PinnedLink::from_pin(path) {
            Ok(p) => Ok(Some(FdLink::from(p))),
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                Ok(None)
            }
            Err(source) => Err(EbpfError::Link {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Attaches (or takes over the pinned attachment of) a TC ingress
    /// program on `ifname`, pinned as `link_name`.
    fn attach_tc(&mut self, prog: &'static str, ifname: &str, link_name: &str) -> Result<()> {
        let path = self.link_path(link_name);
        if Self::tc_link_alive(&path, ifname) {
            if let Some(old) = Self::pinned(&path)? {
                let link =
                    SchedClassifierLink::try_from(old).map_err(|source| EbpfError::Link {
                        path: path.clone(),
                        source,
                    })?;
                let p = self.classifier(prog)?;
                let id = p
                    .attach_to_link(link)
                    .map_err(|source| EbpfError::Program { name: prog, source })?;
                // The pin keeps the link attached; our fd may close.
                drop(p.take_link(id));
                return Ok(());
            }
        }
        // Nothing pinned, or pinned for an interface that is gone.
        let _ = std::fs::remove_file(&path);
        let p = self.classifier(prog)?;
        let id = p
            .attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| EbpfError::Program { name: prog, source })?;
        let link = p
            .take_link(id)
            .map_err(|source| EbpfError::Program { name: prog, source })?;
        pin_link(link, path)?;
        Ok(())
    }

    /// A tcx link whose device went away reports ifindex 0.
    fn tc_link_alive(path: &Path, ifname: &str) -> bool {
        let want = ifindex(ifname);
        pinned_link_ifindex(path).is_some_and(|i| i != 0 && Some(i) == want)
    }

    /// XDP decap and TC redirect on the uplink. `xdp`: `Some(false)` for
    /// native XDP when the driver has it (generic otherwise), `Some(true)`
    /// for generic, `None` for none (TC decapsulates). Returns the XDP
    /// mode in use (`off` without XDP).
    pub fn attach_uplink(
        &mut self,
        ifname: &str,
        ifindex: u32,
        xdp: Option<bool>,
    ) -> Result<&'static str> {
        self.attach_tc(programs::TC_UPLINK_INGRESS, ifname, "tc_uplink")?;
        let path = self.link_path("xdp_uplink");
        let Some(generic) = xdp else {
            // Coming from a run with XDP: its pinned link goes, and with
            // it the program on the interface.
            let _ = std::fs::remove_file(&path);
            return Ok("off");
        };
        let xdp = xdp_program(&mut self.bpf)?;
        let prog_err = |source| EbpfError::Program {
            name: programs::XDP_UPLINK,
            source,
        };
        if let Some(old) = Self::pinned(&path)? {
            let alive = pinned_link_ifindex(&path).is_some_and(|i| i == ifindex);
            if alive {
                let link = XdpLink::try_from(old).map_err(|source| EbpfError::Link {
                    path: path.clone(),
                    source,
                })?;
                let id = xdp.attach_to_link(link).map_err(prog_err)?;
                drop(xdp.take_link(id));
                return Ok("adopted");
            }
            let _ = std::fs::remove_file(&path);
        }
        let native = if generic {
            Err(None)
        } else {
            xdp.attach_to_if_index(ifindex, XdpMode::Driver)
                .map_err(Some)
        };
        let (id, mode) = match native {
            Ok(id) => (id, "native"),
            Err(None) => (
                xdp.attach_to_if_index(ifindex, XdpMode::Skb)
                    .map_err(prog_err)?,
                "generic",
            ),
            Err(Some(err)) => {
                tracing::warn!(%err, uplink = ifname, "native XDP unavailable; using generic XDP");
                (
                    xdp.attach_to_if_index(ifindex, XdpMode::Skb)
                        .map_err(prog_err)?,
                    "generic",
                )
            }
        };
        let link = xdp.take_link(id).map_err(prog_err)?;
        pin_link(link, path)?;
        Ok(mode)
    }

    /// Attaches `tc_from_pod` to a pod's host-side veth.
    pub fn attach_pod(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        self.attach_tc(programs::TC_FROM_POD, ifname, &format!("pod_{ifindex}"))?;
        self.attached.insert(ifindex);
        Ok(())
    }

    /// Records a pod link attached off the loop with
    /// [`attach_tcx_ingress_pinned`] and this process's program.
    pub fn attached_pod(&mut self, ifindex: u32) {
        self.attached.insert(ifindex);
    }

    /// A duplicate of `tc_from_pod`'s fd, to attach it off the agent's
    /// event loop with [`attach_tcx_ingress_pinned`].
    pub fn pod_program(&mut self) -> Result<aya::programs::ProgramFd> {
        let name = programs::TC_FROM_POD;
        self.classifier(name)?
            .fd()
            .map_err(|source| EbpfError::Program { name, source })?
            .try_clone()
            .map_err(EbpfError::Dup)
    }

    /// Where a pod's link is pinned.
    pub fn pod_link_path(&self, ifindex: u32) -> PathBuf {
        self.link_path(&format!("pod_{ifindex}"))
    }

    /// Whether the pod link pinned for `ifindex` is attached to that
    /// interface.
    pub fn pod_link_alive(&self, ifindex: u32) -> bool {
        pinned_link_ifindex(&self.pod_link_path(ifindex)) == Some(ifindex)
    }

    /// Forgets a pod's attachment (the link dies with the interface).
    pub fn detach_pod(&mut self, ifindex: u32) {
        let _ = std::fs::remove_file(self.pod_link_path(ifindex));
        self.attached.remove(&ifindex);
    }

    /// Interface indexes with a pinned pod link, each with whether this
    /// process attached it (or took it over).
    pub fn pod_links(&self) -> BTreeMap<u32, bool> {
        read_pod_links(&self.dir)
            .into_iter()
            .map(|i| (i, self.attached.contains(&i)))
            .collect()
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.bpf.map_mut(name).ok_or(EbpfError::Missing(name))
    }

    fn config_map(&mut self) -> Result<Array<&mut MapData, Config>> {
        Array::try_from(self.map_mut(maps::CONFIG)?).map_err(map_err(maps::CONFIG))
    }

    fn remote_map(&mut self) -> Result<LpmTrie<&mut MapData, u32, RemoteNode>> {
        LpmTrie::try_from(self.map_mut(maps::REMOTE_SUBNETS)?)
            .map_err(map_err(maps::REMOTE_SUBNETS))
    }

    fn slot_map(&mut self) -> Result<Array<&mut MapData, RemoteNode>> {
        Array::try_from(self.map_mut(maps::LEASE_SLOTS)?).map_err(map_err(maps::LEASE_SLOTS))
    }

    fn remote6_map(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 16], RemoteNode6>> {
        LpmTrie::try_from(self.map_mut(maps::REMOTE_SUBNETS6)?)
            .map_err(map_err(maps::REMOTE_SUBNETS6))
    }

    fn vtep_map(&mut self) -> Result<HashMap<&mut MapData, u32, Vtep>> {
        HashMap::try_from(self.map_mut(maps::VTEPS)?).map_err(map_err(maps::VTEPS))
    }

    fn vtep6_map(&mut self) -> Result<HashMap<&mut MapData, [u8; 16], Vtep>> {
        HashMap::try_from(self.map_mut(maps::VTEPS6)?).map_err(map_err(maps::VTEPS6))
    }

    fn endpoint_map(&mut self) -> Result<HashMap<&mut MapData, u32, Endpoint>> {
        HashMap::try_from(self.map_mut(maps::ENDPOINTS)?).map_err(map_err(maps::ENDPOINTS))
    }

    fn endpoint6_map(&mut self) -> Result<HashMap<&mut MapData, [u8; 16], Endpoint>> {
        HashMap::try_from(self.map_mut(maps::ENDPOINTS6)?).map_err(map_err(maps::ENDPOINTS6))
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<()> {
        self.config_map()?
            .set(0, cfg, 0)
            .map_err(map_err(maps::CONFIG))
    }

    /// What the config map holds (`None` before the first write).
    pub fn config(&mut self) -> Result<Option<Config>> {
        let cfg = self
            .config_map()?
            .get(&0, 0)
            .map_err(map_err(maps::CONFIG))?;
        Ok((cfg != Config::default()).then_some(cfg))
    }

    /// The remote-subnet trie: subnet → remote node.
    pub fn remotes(&mut self) -> Result<BTreeMap<Ipv4Net, RemoteNode>> {
        remotes_in(&self.remote_map()?).map_err(map_err(maps::REMOTE_SUBNETS))
    }

    pub fn put_remote(&mut self, net: Ipv4Net, node: &RemoteNode) -> Result<()> {
        self.remote_map()?
            .insert(&trie_key(net), node, 0)
            .map_err(map_err(maps::REMOTE_SUBNETS))
    }

    pub fn remove_remote(&mut self, net: Ipv4Net) -> Result<()> {
        absent_is_fine(self.remote_map()?.remove(&trie_key(net)))
            .map_err(map_err(maps::REMOTE_SUBNETS))
    }

    /// The lease slots that hold a remote (node IP not 0), by slot.
    pub fn lease_slots(&mut self) -> Result<BTreeMap<u32, RemoteNode>> {
        let slots = self.slot_map()?;
        let mut out = BTreeMap::new();
        for i in 0..slots.len() {
            let node = slots.get(&i, 0).map_err(map_err(maps::LEASE_SLOTS))?;
            if node.node_ip != 0 {
                out.insert(i, node);
            }
        }
        Ok(out)
    }

    pub fn put_lease_slot(&mut self, slot: u32, node: &RemoteNode) -> Result<()> {
        self.slot_map()?
            .set(slot, node, 0)
            .map_err(map_err(maps::LEASE_SLOTS))
    }

    /// Empties a slot: its addresses are looked up in the trie again.
    pub fn clear_lease_slot(&mut self, slot: u32) -> Result<()> {
        self.put_lease_slot(slot, &RemoteNode::default())
    }

    /// The IPv6 remote-subnet trie: IPv6 subnet → remote node.
    pub fn remotes6(&mut self) -> Result<BTreeMap<Ipv6Net, RemoteNode6>> {
        let trie = self.remote6_map()?;
        let mut out = BTreeMap::new();
        for item in trie.iter() {
            let (k, v) = item.map_err(map_err(maps::REMOTE_SUBNETS6))?;
            if let Ok(net) = Ipv6Net::new(Ipv6Addr::from(k.data()), k.prefix_len() as u8) {
                out.insert(net, v);
            }
        }
        Ok(out)
    }

    pub fn put_remote6(&mut self, net: Ipv6Net, node: &RemoteNode6) -> Result<()> {
        let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
        self.remote6_map()?
            .insert(&key, node, 0)
            .map_err(map_err(maps::REMOTE_SUBNETS6))
    }

    pub fn remove_remote6(&mut self, net: Ipv6Net) -> Result<()> {
        let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
        absent_is_fine(self.remote6_map()?.remove(&key)).map_err(map_err(maps::REMOTE_SUBNETS6))
    }

    /// The node IPs allowed to send VXLAN.
    pub fn vteps(&mut self) -> Result<BTreeSet<Ipv4Addr>> {
        self.vtep_map()?
            .keys()
            .map(|k| k.map(key_ip).map_err(map_err(maps::VTEPS)))
            .collect()
    }

    pub fn put_vtep(&mut self, ip: Ipv4Addr) -> Result<()> {
        self.vtep_map()?
            .insert(ip_key(ip), Vtep::default(), 0)
            .map_err(map_err(maps::VTEPS))
    }

    pub fn remove_vtep(&mut self, ip: Ipv4Addr) -> Result<()> {
        absent_is_fine(self.vtep_map()?.remove(&ip_key(ip))).map_err(map_err(maps::VTEPS))
    }

    /// The node IPv6 addresses allowed to send VXLAN over IPv6.
    pub fn vteps6(&mut self) -> Result<BTreeSet<Ipv6Addr>> {
        self.vtep6_map()?
            .keys()
            .map(|k| k.map(Ipv6Addr::from).map_err(map_err(maps::VTEPS6)))
            .collect()
    }

    pub fn put_vtep6(&mut self, ip: Ipv6Addr) -> Result<()> {
        self.vtep6_map()?
            .insert(ip.octets(), Vtep::default(), 0)
            .map_err(map_err(maps::VTEPS6))
    }

    pub fn remove_vtep6(&mut self, ip: Ipv6Addr) -> Result<()> {
        absent_is_fine(self.vtep6_map()?.remove(&ip.octets())).map_err(map_err(maps::VTEPS6))
    }

    /// The endpoint map: pod IP → host veth and pod MAC.
    pub fn endpoints(&mut self) -> Result<BTreeMap<Ipv4Addr, Endpoint>> {
        Ok(endpoints_in(&self.endpoint_map()?, key_ip))
    }

    pub fn put_endpoint(&mut self, ip: Ipv4Addr, ep: &Endpoint) -> Result<()> {
        self.endpoint_map()?
            .insert(ip_key(ip), ep, 0)
            .map_err(map_err(maps::ENDPOINTS))
    }

    /// The endpoint entry of `ip`, if the map holds one.
    pub fn endpoint(&mut self, ip: Ipv4Addr) -> Result<Option<Endpoint>> {
        match self.endpoint_map()?.get(&ip_key(ip), 0) {
            Ok(ep) => Ok(Some(ep)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(map_err(maps::ENDPOINTS)(e)),
        }
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<()> {
        absent_is_fine(self.endpoint_map()?.remove(&ip_key(ip))).map_err(map_err(maps::ENDPOINTS))
    }

    /// The IPv6 endpoint map: pod IPv6 → host veth and pod MAC.
    pub fn endpoints6(&mut self) -> Result<BTreeMap<Ipv6Addr, Endpoint>> {
        Ok(endpoints_in(&self.endpoint6_map()?, Ipv6Addr::from))
    }

    pub fn put_endpoint6(&mut self, ip: Ipv6Addr, ep: &Endpoint) -> Result<()> {
        self.endpoint6_map()?
            .insert(ip.octets(), ep, 0)
            .map_err(map_err(maps::ENDPOINTS6))
    }

    pub fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<()> {
        absent_is_fine(self.endpoint6_map()?.remove(&ip.octets()))
            .map_err(map_err(maps::ENDPOINTS6))
    }
}

/// Pins an attachment at `path`, where it outlives this process.
fn pin_link<L>(link: L, path: PathBuf) -> Result<()>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let fd = FdLink::try_from(link).map_err(|source| EbpfError::Link {
        path: path.clone(),
        source,
    })?;
    fd.pin(&path)
        .map_err(|source| EbpfError::Pin { path, source })?;
    Ok(())
}

fn xdp_program(bpf: &mut Ebpf) -> Result<&mut Xdp> {
    let name = programs::XDP_UPLINK;
    bpf.program_mut(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn remotes_in<T: std::borrow::Borrow<MapData>>(
    trie: &LpmTrie<T, u32, RemoteNode>,
) -> std::result::Result<BTreeMap<Ipv4Net, RemoteNode>, aya::maps::MapError> {
    let mut out = BTreeMap::new();
    for item in trie.iter() {
        let (k, v) = item?;
        if let Ok(net) = Ipv4Net::new(key_ip(k.data()), k.prefix_len() as u8) {
            out.insert(net, v);
        }
    }
    Ok(out)
}

/// An endpoint map's entries by address: the IPv4 map's keys read with
/// `key_ip`, the IPv6 map's with `Ipv6Addr::from`.
fn endpoints_in<T: std::borrow::Borrow<MapData>, K: aya::Pod, A: Ord>(
    map: &HashMap<T, K, Endpoint>,
    addr: impl Fn(K) -> A,
) -> BTreeMap<A, Endpoint> {
    map.iter()
        .filter_map(|r| r.ok())
        .map(|(k, v)| (addr(k), v))
        .collect()
}

fn trie_key(net: Ipv4Net) -> Key<u32> {
    Key::new(u32::from(net.prefix_len()), ip_key(net.network()))
}

/// Whether `e` says the key is not in the map (aya 0.14 reports a missing
/// key on delete as the syscall's ENOENT, on lookup as `KeyNotFound`).
fn is_absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A delete of a key that is not there has nothing to do.
fn absent_is_fine(
    r: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(e) if is_absent(&e) => Ok(()),
        other => other,
    }
}

/// `bpf(cmd, attr, sizeof attr)`: the syscall's result, or errno.
///
/// # Safety
/// `attr` must be a `bpf_attr` prefix valid for `cmd`, with every pointer
/// in it valid for the call.
unsafe fn bpf_sys<T>(cmd: libc::c_long, attr: *const T) -> io::Result<libc::c_long> {
    // SAFETY: upheld by the caller.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, std::mem::size_of::<T>() as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches `prog` at TCX ingress of `ifindex` and pins the link at
/// `pin` (replacing a stale pin). Blocking: the kernel waits for an RCU
/// grace period on every tcx attach, so the agent runs this on a worker
/// thread and many pods attach at once instead of one after another.
///
/// Hand-written `BPF_LINK_CREATE` because aya's attach needs `&mut` on
/// the program, which lives on the agent's loop.
pub fn attach_tcx_ingress_pinned(
    prog: std::os::fd::BorrowedFd<'_>,
    ifindex: u32,
    pin: &Path,
) -> io::Result<()> {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TCX_INGRESS: u32 = 46;
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        relative_fd: u32,
        _pad: u32,
        expected_revision: u64,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        flags: 0,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix.
    let fd = unsafe { bpf_sys(BPF_LINK_CREATE, &attr) }?;
    // SAFETY: the kernel just returned this fd; OwnedFd closes it.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let _ = std::fs::remove_file(pin);
    let cpath = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjPin {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: link.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: attr points at a valid C string and an open link fd.
    unsafe { bpf_sys(BPF_OBJ_PIN, &attr) }?;
    Ok(())
}

/// The index of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: plain libc call on a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The interface the link pinned at `path` is attached to; 0 once the
/// device is gone.
///
/// Hand-written because aya 0.14 neither exposes a link's fd nor the union
/// part of `struct bpf_link_info`: `BPF_OBJ_GET` on the pin, then one
/// `BPF_OBJ_GET_INFO_BY_FD`.
fn pinned_link_ifindex(path: &Path) -> Option<u32> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let obj = ObjAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: obj points at a valid C string for the duration of the call.
    let fd = unsafe { bpf_sys(BPF_OBJ_GET, &obj) }.ok()?;
    // SAFETY: the kernel just returned this fd to us; OwnedFd closes it.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8
    // whose xdp and tcx variants both start with the ifindex.
    let mut info = [0u64; 12];
    let attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr and info are valid for the sizes given for the call.
    let rc = unsafe { bpf_sys(BPF_OBJ_GET_INFO_BY_FD, &attr) };
    drop(owned);
    rc.ok().map(|_| (info[2] & 0xffff_ffff) as u32)
}

/// The map `name` pinned under `dir`, for tools that read a running data
/// path from outside the agent.
pub fn pinned_map(dir: &Path, name: &str) -> std::result::Result<MapData, aya::maps::MapError> {
    MapData::from_pin(dir.join("maps").join(name))
}

/// Reads the pinned per-CPU counters, summed over CPUs, by name.
pub fn read_counters(
    dir: &Path,
) -> std::result::Result<Vec<(&'static str, u64)>, aya::maps::MapError> {
    let data = pinned_map(dir, maps::COUNTERS)?;
    let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let mut out = Vec::with_capacity(counters::COUNT as usize);
    for (i, name) in counters::NAMES.iter().enumerate() {
        let values = arr.get(&(i as u32), 0)?;
        out.push((*name, values.iter().sum()));
    }
    Ok(out)
}

/// The pinned counters as `name → packets`, or an empty map where nothing
/// is pinned (the kernel data path); other failures are errors.
pub fn counters_by_name(
    dir: &Path,
) -> std::result::Result<BTreeMap<String, u64>, aya::maps::MapError> {
    if !dir.join("maps").join(maps::COUNTERS).exists() {
        return Ok(BTreeMap::new());
    }
    Ok(read_counters(dir)?
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect())
}

/// The pinned remote-subnet trie: subnet → (node IP, VtepMAC). For
/// `flannel-agent` tools and tests that check what the data path holds.
pub fn read_remotes(
    dir: &Path,
) -> std::result::Result<Vec<(Ipv4Net, Ipv4Addr, RemoteNode)>, aya::maps::MapError> {
    let data = pinned_map(dir, maps::REMOTE_SUBNETS)?;
    let trie: LpmTrie<_, u32, RemoteNode> = LpmTrie::try_from(Map::LpmTrie(data))?;
    Ok(remotes_in(&trie)?
        .into_iter()
        .map(|(net, v)| (net, key_ip(v.node_ip), v))
        .collect())
}

/// The pinned endpoint map: pod IP → (host veth ifindex, pod MAC). For
/// tools and tests that check what the data path holds.
pub fn read_endpoints(
    dir: &Path,
) -> std::result::Result<Vec<(Ipv4Addr, u32, [u8; 6])>, aya::maps::MapError> {
    let data = pinned_map(dir, maps::ENDPOINTS)?;
    let map: HashMap<_, u32, Endpoint> = HashMap::try_from(Map::HashMap(data))?;
    Ok(endpoints_in(&map, key_ip)
        .into_iter()
        .map(|(ip, v)| (ip, v.host_ifindex, v.pod_mac))
        .collect())
}

/// The pinned IPv6 endpoint map: pod IPv6 → (host veth ifindex, pod MAC).
pub fn read_endpoints6(
    dir: &Path,
) -> std::result::Result<Vec<(Ipv6Addr, u32, [u8; 6])>, aya::maps::MapError> {
    let data = pinned_map(dir, maps::ENDPOINTS6)?;
    let map: HashMap<_, [u8; 16], Endpoint> = HashMap::try_from(Map::HashMap(data))?;
    Ok(endpoints_in(&map, Ipv6Addr::from)
        .into_iter()
        .map(|(ip, v)| (ip, v.host_ifindex, v.pod_mac))
        .collect())
}

/// Entries in each pinned map that grows with the cluster, against its
/// capacity: (map, entries, capacity).
pub fn read_occupancy(
    dir: &Path,
) -> std::result::Result<Vec<(&'static str, usize, u32)>, aya::maps::MapError> {
    let pin = |name| pinned_map(dir, name);
    let trie: LpmTrie<_, u32, RemoteNode> =
        LpmTrie::try_from(Map::LpmTrie(pin(maps::REMOTE_SUBNETS)?))?;
    let endpoints: HashMap<_, u32, Endpoint> =
        HashMap::try_from(Map::HashMap(pin(maps::ENDPOINTS)?))?;
    let vteps: HashMap<_, u32, Vtep> = HashMap::try_from(Map::HashMap(pin(maps::VTEPS)?))?;
    let endpoints6: HashMap<_, [u8; 16], Endpoint> =
        HashMap::try_from(Map::HashMap(pin(maps::ENDPOINTS6)?))?;
    Ok(vec![
        (
            maps::REMOTE_SUBNETS,
            trie.keys().filter(|k| k.is_ok()).count(),
            flannel_common::MAX_REMOTE_SUBNETS,
        ),
        (
            maps::ENDPOINTS,
            endpoints.keys().filter(|k| k.is_ok()).count(),
            flannel_common::MAX_ENDPOINTS,
        ),
        (
            maps::ENDPOINTS6,
            endpoints6.keys().filter(|k| k.is_ok()).count(),
            flannel_common::MAX_ENDPOINTS,
        ),
        (
            maps::VTEPS,
            vteps.keys().filter(|k| k.is_ok()).count(),
            flannel_common::MAX_VTEPS,
        ),
    ])
}

/// Interface indexes with a pinned pod link under `dir`.
pub fn read_pod_links(dir: &Path) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir(dir.join("links")) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("pod_")?.parse().ok())
        .collect()
}

/// Removes everything pinned under `dir` (maps and links): the data path of
/// that instance stops. Used by `flannel-agent cleanup` and the lab.
pub fn remove_pins(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

//! The reading side of the data path's event stream (`flannel-agent
//! monitor`): turns the programs' events on (which kinds, how many a
//! second), reads them from the pinned ring buffer, and decodes each into
//! names and addresses. The programs hold the rate limit, so a flood of
//! drops or passes costs the data path nothing beyond its token bucket.

use std::{net::Ipv4Addr, os::fd::AsRawFd, path::Path, time::Duration};

use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use flannel_common::{
    counters, maps, Event, MonitorConfig, MonitorState, EVENT_F_INNER_L4, EVENT_F_IPV4, EVENT_F_L4,
    EVENT_F_VXLAN, MONITOR_DROP, MONITOR_PASS,
};
use serde::Serialize;

use super::ebpf::key_ip;

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("map {name} pinned under {dir}: {source} (is the eBPF data path running here?)")]
    Map {
        name: &'static str,
        dir: String,
        source: aya::maps::MapError,
    },
    #[error("waiting for events: {0}")]
    Poll(std::io::Error),
    #[error(
        "no eBPF data path is pinned under {0}: on the kernel data path no program runs, so \
         there is nothing to monitor (`flannel-agent inspect` and /metrics still work)"
    )]
    NoDatapath(String),
}

fn pinned(dir: &Path, name: &'static str) -> Result<MapData, MonitorError> {
    if !dir.join("maps").exists() {
        return Err(MonitorError::NoDatapath(dir.display().to_string()));
    }
    super::ebpf::pinned_map(dir, name).map_err(map_err(dir, name))
}

fn map_err<'a>(
    dir: &'a Path,
    name: &'static str,
) -> impl Fn(aya::maps::MapError) -> MonitorError + 'a {
    move |source| MonitorError::Map {
        name,
        dir: dir.display().to_string(),
        source,
    }
}

/// Which events to ask the programs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EventType {
    Drop,
    Pass,
    All,
}

impl EventType {
    fn mask(self) -> u32 {
        match self {
            EventType::Drop => MONITOR_DROP,
            EventType::Pass => MONITOR_PASS,
            EventType::All => MONITOR_DROP | MONITOR_PASS,
        }
    }
}

/// Writes the programs' monitor config (mask 0: no events).
pub fn configure(dir: &Path, cfg: &MonitorConfig) -> Result<(), MonitorError> {
    let mut arr: Array<_, MonitorConfig> = Array::try_from(Map::Array(pinned(dir, maps::MONITOR)?))
        .map_err(map_err(dir, maps::MONITOR))?;
    arr.set(0, cfg, 0).map_err(map_err(dir, maps::MONITOR))
}

/// The config the programs hold now.
pub fn config(dir: &Path) -> Result<MonitorConfig, MonitorError> {
    let arr: Array<_, MonitorConfig> = Array::try_from(Map::Array(pinned(dir, maps::MONITOR)?))
        .map_err(map_err(dir, maps::MONITOR))?;
    arr.get(&0, 0).map_err(map_err(dir, maps::MONITOR))
}

/// The rate limiter's figures, summed over CPUs: (sent, suppressed, lost).
pub fn totals(dir: &Path) -> Result<(u64, u64, u64), MonitorError> {
    let arr: PerCpuArray<_, MonitorState> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned(dir, maps::MONITOR_STATE)?))
            .map_err(map_err(dir, maps::MONITOR_STATE))?;
    let per_cpu = arr.get(&0, 0).map_err(map_err(dir, maps::MONITOR_STATE))?;
    Ok(per_cpu.iter().fold((0, 0, 0), |(s, x, l), st| {
        (s + st.sent, x + st.suppressed, l + st.lost)
    }))
}

/// Turns events of `kind` on at `rate` a second per CPU (bursts of
/// `burst`) and reads them until `f` returns false or `stop` says so.
/// Events are off again when it returns.
pub fn stream(
    dir: &Path,
    kind: EventType,
    rate: u32,
    burst: u32,
    stop: &dyn Fn() -> bool,
    f: &mut dyn FnMut(MonitorEvent) -> bool,
) -> Result<(), MonitorError> {
    let mut ring = RingBuf::try_from(Map::RingBuf(pinned(dir, maps::EVENTS)?))
        .map_err(map_err(dir, maps::EVENTS))?;
    // Whatever an earlier monitor left unread is not news.
    while ring.next().is_some() {}
    configure(
        dir,
        &MonitorConfig {
            mask: kind.mask(),
            rate,
            burst,
            _pad: 0,
        },
    )?;
    let result = (|| {
        loop {
            while let Some(item) = ring.next() {
                if item.len() < std::mem::size_of::<Event>() {
                    continue;
                }
                // SAFETY: the programs write whole `Event`s; the length is
                // checked and the read is unaligned-safe.
                let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                if !f(MonitorEvent::decode(&ev)) {
                    return Ok(());
                }
            }
            if stop() {
                return Ok(());
            }
            let mut pfd = libc::pollfd {
                fd: ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let rc =
                unsafe { libc::poll(&mut pfd, 1, Duration::from_millis(200).as_millis() as i32) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(MonitorError::Poll(err));
                }
            }
        }
    })();
    configure(dir, &MonitorConfig::default())?;
    result
}

/// One event, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MonitorEvent {
    /// Kernel time (`CLOCK_MONOTONIC`), nanoseconds.
    pub time_ns: u64,
    /// `drop` or `pass` (to the kernel).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The counter the verdict went to: the reason.
    pub verdict: &'static str,
    pub program: &'static str,
    pub ifindex: u32,
    pub ifname: Option<String>,
    pub len: u32,
    pub eth_type: String,
    pub src: Option<Ipv4Addr>,
    pub dst: Option<Ipv4Addr>,
    pub proto: Option<&'static str>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// Set for VXLAN on the node's port.
    pub vni: Option<u32>,
    pub inner: Option<Inner>,
}

/// The packet inside a VXLAN frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Inner {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: &'static str,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        58 => "icmpv6",
        _ => "other",
    }
}

fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

impl MonitorEvent {
    pub fn decode(ev: &Event) -> Self {
        let has = |f| ev.flags & f != 0;
        let verdict = counters::NAMES
            .get(ev.counter as usize)
            .copied()
            .unwrap_or("unknown");
        let ipv4 = has(EVENT_F_IPV4);
        let l4 = has(EVENT_F_L4);
        MonitorEvent {
            time_ns: ev.ts_ns,
            kind: if counters::event_kind(ev.counter) == MONITOR_DROP {
                "drop"
            } else {
                "pass"
            },
            verdict,
            program: counters::program(ev.counter),
            ifindex: ev.ifindex,
            ifname: ifname(ev.ifindex),
            len: ev.len,
            eth_type: format!("{:#06x}", ev.eth_type),
            src: ipv4.then(|| key_ip(ev.src)),
            dst: ipv4.then(|| key_ip(ev.dst)),
            proto: ipv4.then(|| proto_name(ev.proto)),
            sport: l4.then_some(ev.sport),
            dport: l4.then_some(ev.dport),
            vni: has(EVENT_F_VXLAN).then_some(ev.vni),
            inner: (has(EVENT_F_VXLAN) && ev.inner_src | ev.inner_dst != 0).then(|| Inner {
                src: key_ip(ev.inner_src),
                dst: key_ip(ev.inner_dst),
                proto: proto_name(ev.inner_proto),
                sport: has(EVENT_F_INNER_L4).then_some(ev.inner_sport),
                dport: has(EVENT_F_INNER_L4).then_some(ev.inner_dport),
            }),
        }
    }

    /// One line, as `cilium monitor` prints.
    pub fn line(&self) -> String {
        let ep = |a: Option<Ipv4Addr>, p: Option<u16>| match (a, p) {
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.to_string(),
            _ => "?".into(),
        };
        let mut s = format!(
            "{} ({}) by {} on {}({}): ",
            self.kind,
            self.verdict,
            self.program,
            self.ifname.as_deref().unwrap_or("?"),
            self.ifindex
        );
        if self.src.is_some() {
            s += &format!(
                "{} -> {} {}",
                ep(self.src, self.sport),
                ep(self.dst, self.dport),
                self.proto.unwrap_or("?")
            );
        } else {
            s += &format!("ethertype {}", self.eth_type);
        }
        if let Some(vni) = self.vni {
            s += &format!(" vxlan vni {vni}");
        }
        if let Some(i) = &self.inner {
            s += &format!(
                " [{} -> {} {}]",
                ep(Some(i.src), i.sport),
                ep(Some(i.dst), i.dport),
                i.proto
            );
        }
        s + &format!(" len {}", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode_to_names_and_addresses() {
        let ip = |s: &str| u32::from_ne_bytes(s.parse::<Ipv4Addr>().unwrap().octets());
        let ev = Event {
            ts_ns: 7,
            counter: counters::XDP_DROP_UNKNOWN_VTEP,
            ifindex: 0,
            len: 98,
            flags: EVENT_F_IPV4 | EVENT_F_L4 | EVENT_F_VXLAN | EVENT_F_INNER_L4,
            src: ip("172.30.0.254"),
            dst: ip("172.30.0.1"),
            sport: 40000,
            dport: 4789,
            proto: 17,
            inner_proto: 6,
            eth_type: 0x0800,
            inner_src: ip("10.244.2.9"),
            inner_dst: ip("10.244.1.2"),
            inner_sport: 1234,
            inner_dport: 80,
            vni: 1,
            _pad: 0,
        };
        let m = MonitorEvent::decode(&ev);
        assert_eq!(m.kind, "drop");
        assert_eq!(m.verdict, "xdp_drop_unknown_vtep");
        assert_eq!(m.program, "xdp_uplink");
        assert_eq!(
            m.line(),
            "drop (xdp_drop_unknown_vtep) by xdp_uplink on ?(0): 172.30.0.254:40000 -> 172.30.0.1:4789 udp vxlan vni 1 [10.244.2.9:1234 -> 10.244.1.2:80 tcp] len 98"
        );
        let drop = MonitorEvent::decode(&Event {
            counter: counters::UPLINK_DROP_ADJUST_FAILED,
            eth_type: 0x0806,
            ..Default::default()
        });
        assert_eq!(drop.kind, "drop");
        assert_eq!(drop.src, None);
        assert!(drop.line().contains("ethertype 0x0806"), "{}", drop.line());
        // A verdict index from a newer program is named, not a panic.
        assert_eq!(
            MonitorEvent::decode(&Event {
                counter: 999,
                ..Default::default()
            })
            .verdict,
            "unknown"
        );
    }
}

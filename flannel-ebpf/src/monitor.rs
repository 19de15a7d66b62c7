//! Events for `flannel-agent monitor`: a packet a program passed to the
//! kernel or dropped, described (addresses, ports, VXLAN inner headers)
//! into a ring buffer. Off unless a monitor asks (`FLANNEL_MONITOR`), and
//! then held to a per-CPU token bucket, so that a flood of passes costs
//! the data path one map lookup and a few compares per packet, never a
//! ring buffer write per packet. Redirects never send events.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use flannel_common::{
    counters::event_kind, Event, MonitorConfig, MonitorState, EVENTS_BYTES, EVENT_F_INNER_L4,
    EVENT_F_IPV4, EVENT_F_L4, EVENT_F_VXLAN,
};
use network_types::{ip::Ipv4Hdr, vxlan::VxlanHdr};

use crate::parse::{self, ETH_P_IP_BE, IPPROTO_UDP};

#[map(name = "FLANNEL_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "FLANNEL_MONITOR")]
static MONITOR: Array<MonitorConfig> = Array::with_max_entries(1, 0);

#[map(name = "FLANNEL_MONITOR_STATE")]
static MONITOR_STATE: PerCpuArray<MonitorState> = PerCpuArray::with_max_entries(1, 0);

const IPPROTO_TCP: u8 = 6;

/// Reads a `T` at an offset of the packet, bounds-checked.
pub trait Bytes {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    fn ifindex(&self) -> u32;
    fn len(&self) -> u32;
}

impl Bytes for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load::<T>(offset).ok()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
}

impl Bytes for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let p = parse::Packet::new(self.data(), self.data_end()).get::<T>(offset)?;
        Some(unsafe { core::ptr::read_unaligned(p) })
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
}

/// Sends an event for verdict `counter` if a monitor wants this kind and
/// the rate limit allows. A verdict that sends no event (every redirect)
/// costs a few compares, no map lookup.
#[inline(always)]
pub fn report<B: Bytes>(b: &B, counter: u32) {
    let kind = event_kind(counter);
    if kind == 0 {
        return;
    }
    let Some(mon) = MONITOR.get(0) else {
        return;
    };
    if mon.mask & kind == 0 {
        return;
    }
    let Some(st) = MONITOR_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU touches it while we run.
    let st = unsafe { &mut *st };
    let now = unsafe { bpf_ktime_get_ns() };
    // Refill: `rate` events a second, in thousandths, at most `burst`.
    let elapsed = now.wrapping_sub(st.last_ns).min(1_000_000_000);
    st.last_ns = now;
    let cap = u64::from(mon.burst) * 1000;
    let tokens = (st.tokens_milli + elapsed * u64::from(mon.rate) / 1_000_000).min(cap);
    if tokens < 1000 {
        st.tokens_milli = tokens;
        st.suppressed += 1;
        return;
    }
    st.tokens_milli = tokens - 1000;
    let mut ev = Event {
        ts_ns: now,
        counter,
        ifindex: b.ifindex(),
        len: b.len(),
        ..Default::default()
    };
    describe(b, &mut ev, crate::vxlan_port());
    if EVENTS.output::<Event>(&ev, 0).is_ok() {
        st.sent += 1;
    } else {
        st.lost += 1;
    }
}

/// Fills in what the packet's headers say. Ports are read when the IPv4
/// header has no options and the packet is not a later fragment.
#[inline(always)]
fn describe<B: Bytes>(b: &B, ev: &mut Event, vxlan_port: u16) {
    let Some(eth_type) = b.read::<u16>(12) else {
        return;
    };
    ev.eth_type = u16::from_be(eth_type);
    if eth_type != ETH_P_IP_BE {
        return;
    }
    let Some(ip) = b.read::<Ipv4Hdr>(parse::OUTER_IP) else {
        return;
    };
    ev.flags |= EVENT_F_IPV4;
    ev.src = u32::from_ne_bytes(ip.src_addr);
    ev.dst = u32::from_ne_bytes(ip.dst_addr);
    ev.proto = ip.proto;
    if !has_ports(&ip) {
        return;
    }
    let Some(ports) = b.read::<[u8; 4]>(parse::OUTER_UDP) else {
        return;
    };
    ev.flags |= EVENT_F_L4;
    ev.sport = u16::from_be_bytes([ports[0], ports[1]]);
    ev.dport = u16::from_be_bytes([ports[2], ports[3]]);
    if ip.proto != IPPROTO_UDP || ev.dport != vxlan_port || vxlan_port == 0 {
        return;
    }
    let Some(vx) = b.read::<VxlanHdr>(parse::VXLAN) else {
        return;
    };
    ev.flags |= EVENT_F_VXLAN;
    ev.vni = u32::from_be_bytes([0, vx.vni[0], vx.vni[1], vx.vni[2]]);
    if b.read::<u16>(parse::INNER_ETH + 12) != Some(ETH_P_IP_BE) {
        return;
    }
    let Some(inner) = b.read::<Ipv4Hdr>(parse::INNER_IP) else {
        return;
    };
    ev.inner_src = u32::from_ne_bytes(inner.src_addr);
    ev.inner_dst = u32::from_ne_bytes(inner.dst_addr);
    ev.inner_proto = inner.proto;
    if !has_ports(&inner) {
        return;
    }
    let Some(ports) = b.read::<[u8; 4]>(parse::INNER_IP + Ipv4Hdr::LEN) else {
        return;
    };
    ev.flags |= EVENT_F_INNER_L4;
    ev.inner_sport = u16::from_be_bytes([ports[0], ports[1]]);
    ev.inner_dport = u16::from_be_bytes([ports[2], ports[3]]);
}

#[inline(always)]
fn has_ports(ip: &Ipv4Hdr) -> bool {
    ip.vihl == 0x45
        && u16::from_be_bytes(ip.frags) & 0x1fff == 0
        && (ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP)
}

//! The agent's Prometheus metrics (`GET /metrics`, text format 0.0.4).
//!
//! Counts the agent keeps (reconcile passes, store calls, CNI
//! registrations, leases and pods) live in atomics the agent updates as it
//! works; the data path's per-CPU counters and the maps' occupancy are
//! read from the pinned maps at scrape time, so they are current and cost
//! nothing between scrapes. Labels stay of low cardinality: program,
//! verdict, map, kind, store, operation; never an address.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::{Registry, Unit},
};

use crate::datapath::ebpf;

/// The `Content-Type` of what [`Metrics::encode`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

pub struct Metrics {
    registry: Registry,
    leases: Gauge,
    remotes: Gauge,
    ignored: Gauge,
    pods: Gauge,
    passes: Family<Labels1, Counter>,
    pass_seconds: Histogram,
    operations: Family<Labels2, Counter>,
    errors: Family<Labels1, Counter>,
    store_requests: Family<Labels2, Counter>,
    store_errors: Family<Labels2, Counter>,
    watch_restarts: Family<Labels1, Counter>,
    cni: Family<Labels2, Counter>,
    cni_seconds: Histogram,
    datapath: Family<Labels2, Gauge>,
    netfilter_compat: Gauge,
    /// Shared with the scrape-time collector.
    scraped: std::sync::Arc<Scraped>,
}

/// What is read when Prometheus asks.
#[derive(Debug, Default)]
struct Scraped {
    /// Where the maps are pinned, while the eBPF data path runs.
    bpf_dir: Mutex<Option<PathBuf>>,
    /// Unix time of the last successful lease renewal (0: none yet).
    renewed_at: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let scraped = std::sync::Arc::new(Scraped::default());
        let mut m = Metrics {
            registry: Registry::default(),
            leases: Gauge::default(),
            remotes: Gauge::default(),
            ignored: Gauge::default(),
            pods: Gauge::default(),
            passes: Family::default(),
            pass_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            operations: Family::default(),
            errors: Family::default(),
            store_requests: Family::default(),
            store_errors: Family::default(),
            watch_restarts: Family::default(),
            cni: Family::default(),
            cni_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            datapath: Family::default(),
            netfilter_compat: Gauge::default(),
            scraped: scraped.clone(),
        };
        let r = &mut m.registry;
        r.register(
            "flannel_leases",
            "Leases in the store, this node's included",
            m.leases.clone(),
        );
        r.register(
            "flannel_remote_leases",
            "Other nodes' leases the data path is programmed for",
            m.remotes.clone(),
        );
        r.register(
            "flannel_ignored_leases",
            "Leases left out of the data path (wrong backend, bad VtepMAC, overlap)",
            m.ignored.clone(),
        );
        r.register(
            "flannel_pods",
            "Pods registered with this agent",
            m.pods.clone(),
        );
        r.register(
            "flannel_reconcile_passes",
            "Reconcile passes, by what asked for them",
            m.passes.clone(),
        );
        r.register_with_unit(
            "flannel_reconcile_duration",
            "How long a reconcile pass takes, observing to applying",
            Unit::Seconds,
            m.pass_seconds.clone(),
        );
        r.register(
            "flannel_reconcile_operations",
            "Changes made to the kernel and the maps, by kind and by what asked for the pass (resync and signal: repairs of drift)",
            m.operations.clone(),
        );
        r.register(
            "flannel_reconcile_errors",
            "Operations that failed, by kind",
            m.errors.clone(),
        );
        r.register(
            "flannel_store_requests",
            "Calls to the lease store, by store and operation",
            m.store_requests.clone(),
        );
        r.register(
            "flannel_store_errors",
            "Failed calls to the lease store, by store and operation",
            m.store_errors.clone(),
        );
        r.register(
            "flannel_store_watch_restarts",
            "Times the lease watch ended and was started again",
            m.watch_restarts.clone(),
        );
        r.register(
            "flannel_cni_requests",
            "Pod registrations and removals from the CNI plugin, by operation and result",
            m.cni.clone(),
        );
        r.register_with_unit(
            "flannel_cni_request_duration",
            "Time from a CNI request's arrival to its answer (TC program attached)",
            Unit::Seconds,
            m.cni_seconds.clone(),
        );
        r.register(
            "flannel_datapath_info",
            "The data path in use (mode ebpf or kernel) and where VXLAN is decapsulated (xdp_mode)",
            m.datapath.clone(),
        );
        r.register(
            "flannel_netfilter_compat",
            "1 while pod traffic crosses the kernel's forward hook (--netfilter-compat, or forward-path rules found on the node); 0 on the full fast path",
            m.netfilter_compat.clone(),
        );
        let build: Family<Labels1, Gauge> = Family::default();
        build
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register("flannel_build_info", "The agent's version", build);
        r.register_collector(Box::new(ScrapeCollector(scraped)));
        // Every kind starts at zero, so that a rate over errors exists
        // before the first one.
        for kind in crate::reconcile::Op::KINDS {
            let _ = m.errors.get_or_create(&[("kind", kind)]);
        }
        m
    }

    /// The text Prometheus scrapes. Reads the pinned maps: call it off
    /// the agent's loop.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// The data path chosen at start.
    pub fn set_datapath(
        &self,
        mode: &'static str,
        xdp_mode: &'static str,
        bpf_dir: Option<PathBuf>,
    ) {
        self.datapath
            .get_or_create(&[("mode", mode), ("xdp_mode", xdp_mode)])
            .set(1);
        *self
            .scraped
            .bpf_dir
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = bpf_dir;
    }

    /// One reconcile pass: what asked for it, how long it took, what it
    /// changed and what failed.
    pub fn pass(&self, trigger: &'static str, took: Duration, report: &crate::reconcile::Report) {
        self.passes.get_or_create(&[("trigger", trigger)]).inc();
        self.pass_seconds.observe(took.as_secs_f64());
        for (kind, n) in &report.done {
            self.operations
                .get_or_create(&[("kind", kind), ("trigger", trigger)])
                .inc_by(*n as u64);
        }
        for (op, _) in &report.failed {
            self.errors.get_or_create(&[("kind", op.kind())]).inc();
        }
    }

    pub fn set_netfilter_compat(&self, on: bool) {
        self.netfilter_compat.set(i64::from(on));
    }

    pub fn set_state(&self, leases: usize, remotes: usize, ignored: usize, pods: usize) {
        self.leases.set(leases as i64);
        self.remotes.set(remotes as i64);
        self.ignored.set(ignored as i64);
        self.pods.set(pods as i64);
    }

    /// A call to the lease store and whether it worked.
    pub fn store_call(&self, store: &'static str, op: &'static str, ok: bool) {
        let labels = [("store", store), ("op", op)];
        self.store_requests.get_or_create(&labels).inc();
        let errors = self.store_errors.get_or_create(&labels);
        if !ok {
            errors.inc();
        }
        if ok && op == "renew" {
            self.renewed_now();
        }
    }

    /// This node's lease was written (acquired or renewed) just now.
    pub fn renewed_now(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.scraped.renewed_at.store(now, Ordering::Relaxed);
    }

    /// The lease watch of `store` runs (its restart count starts at 0).
    pub fn watch_started(&self, store: &'static str) {
        let _ = self.watch_restarts.get_or_create(&[("store", store)]);
    }

    pub fn watch_restarted(&self, store: &'static str) {
        self.watch_restarts.get_or_create(&[("store", store)]).inc();
    }

    /// A CNI request answered after `took`.
    pub fn cni_request(&self, op: &'static str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.cni
            .get_or_create(&[("op", op), ("result", result)])
            .inc();
        self.cni_seconds.observe(took.as_secs_f64());
    }
}

#[derive(Debug)]
struct ScrapeCollector(std::sync::Arc<Scraped>);

impl Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let renewed = self.0.renewed_at.load(Ordering::Relaxed);
        if renewed > 0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let g = ConstGauge::new(renewed as i64);
            g.encode(encoder.encode_descriptor(
                "flannel_lease_last_renewal_timestamp_seconds",
                "When this node's lease was last written to the store (Unix time).",
                None,
                g.metric_type(),
            )?)?;
            let g = ConstGauge::new(now.saturating_sub(renewed) as i64);
            g.encode(encoder.encode_descriptor(
                "flannel_lease_renewal_age",
                "Time since this node's lease was last written to the store.",
                Some(&Unit::Seconds),
                g.metric_type(),
            )?)?;
        }
        let dir = self
            .0
            .bpf_dir
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(dir) = dir else {
            return Ok(());
        };
        // Maps that cannot be read (removed by `cleanup`) leave their
        // metrics out rather than failing the scrape.
        if let Ok(counters) = ebpf::read_counters(&dir) {
            let mut family = encoder.encode_descriptor(
                "flannel_datapath_packets",
                "Packets each eBPF program handled, by verdict (redirect, pass to the kernel with its reason, drop with its reason), summed over CPUs.",
                None,
                MetricType::Counter,
            )?;
            for (i, (verdict, value)) in counters.iter().enumerate() {
                let labels = [
                    ("program", flannel_common::counters::program(i as u32)),
                    ("verdict", *verdict),
                ];
                ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Ok(maps) = ebpf::read_occupancy(&dir) {
            let mut family = encoder.encode_descriptor(
                "flannel_bpf_map_entries",
                "Entries in each eBPF map.",
                None,
                MetricType::Gauge,
            )?;
            for (map, entries, _) in &maps {
                ConstGauge::new(*entries as i64).encode(family.encode_family(&[("map", *map)])?)?;
            }
            let mut family = encoder.encode_descriptor(
                "flannel_bpf_map_capacity",
                "Entries each eBPF map can hold.",
                None,
                MetricType::Gauge,
            )?;
            for (map, _, capacity) in &maps {
                ConstGauge::new(*capacity as i64)
                    .encode(family.encode_family(&[("map", *map)])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_family_with_units_and_totals() {
        let m = Metrics::new();
        m.set_datapath("kernel", "none", None);
        m.set_state(3, 2, 0, 5);
        m.store_call("local", "renew", true);
        m.store_call("etcd", "watch", false);
        m.watch_restarted("etcd");
        m.cni_request("add", true, Duration::from_millis(3));
        m.pass("start", Duration::from_millis(7), &Default::default());
        let text = m.encode();
        for line in [
            "flannel_leases 3",
            "flannel_remote_leases 2",
            "flannel_pods 5",
            "flannel_reconcile_passes_total{trigger=\"start\"} 1",
            "flannel_reconcile_duration_seconds_count 1",
            "flannel_store_requests_total{store=\"local\",op=\"renew\"} 1",
            "flannel_store_errors_total{store=\"etcd\",op=\"watch\"} 1",
            "flannel_store_watch_restarts_total{store=\"etcd\"} 1",
            "flannel_cni_requests_total{op=\"add\",result=\"ok\"} 1",
            "flannel_cni_request_duration_seconds_count 1",
            "flannel_datapath_info{mode=\"kernel\",xdp_mode=\"none\"} 1",
            "flannel_lease_renewal_age_seconds 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        assert!(text.contains("flannel_build_info{version="));
        // No data path maps in kernel mode: no data path families.
        assert!(!text.contains("flannel_datapath_packets"));
    }
}

//! `/metrics` as Prometheus sees it: the text passes `promtool check
//! metrics` (Debian's `prometheus` package), its figures match the data
//! path's own counters and the lab's state, and a real Prometheus server
//! started in the lab's fabric namespace scrapes two agents and finds
//! encapsulated traffic on both.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context, Result};
use flannel_tests::{
    lab::{LabOptions, FABRIC_IP},
    netns::http_get,
    Lab, NodeKind, NodeSpec,
};

const PORT: u16 = 10256;

/// The body of `GET /metrics` on node `i`, checked to be the text format.
fn scrape(lab: &Lab, i: usize) -> Result<String> {
    let addr = SocketAddr::new(lab.nodes[i].ip.into(), PORT);
    let resp = http_get(&lab.nodes[i].ns, addr, "/metrics")?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no header end")?;
    if !head.starts_with("HTTP/1.1 200 OK")
        || !head.contains("Content-Type: text/plain; version=0.0.4")
    {
        bail!("unexpected response head: {head}");
    }
    Ok(body.to_string())
}

/// The value of the sample `series` (name and labels, as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn promtool_accepts(text: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (Debian's prometheus package)")?;
    child.stdin.take().unwrap().write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics refused the text: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn metrics_pass_promtool_and_a_prometheus_server_scrapes_them() -> Result<()> {
    let mut lab = Lab::with(
        &[
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Ebpf, 1),
            NodeSpec::new(NodeKind::Kernel, 1),
        ],
        LabOptions {
            agent_args: vec!["--healthz-port".into(), PORT.to_string()],
            ..Default::default()
        },
    )?;
    let to = lab.pod((1, 0)).ip;
    assert!(lab.ping((0, 0), to, 10, 56)?);

    let text = scrape(&lab, 0)?;
    promtool_accepts(&text)?;
    // The data path's counters, as the pinned map has them (nothing else
    // moves on node 0 between the two reads).
    let counters = lab.nodes[0].counters()?;
    let encap = sample(
        &text,
        r#"flannel_datapath_packets_total{program="tc_from_pod",verdict="pod_encap_redirect"}"#,
    )
    .context("no pod_encap_redirect sample")?;
    let neigh = sample(
        &text,
        r#"flannel_datapath_packets_total{program="tc_from_pod",verdict="pod_encap_neigh"}"#,
    )
    .context("no pod_encap_neigh sample")?;
    // Ten echo requests, each encapsulated (the first may wait for the
    // next hop's neighbour entry); the map read after the scrape agrees.
    assert_eq!(encap + neigh, 10.0, "{text}");
    assert_eq!(encap, counters["pod_encap_redirect"] as f64);
    let decap = sample(
        &text,
        r#"flannel_datapath_packets_total{program="tc_uplink_ingress",verdict="uplink_decap"}"#,
    )
    .context("no uplink_decap sample")?;
    assert!(decap >= 10.0, "{text}");
    // The lab's state: three leases, two remotes, one pod, in maps and
    // gauges.
    for (series, want) in [
        ("flannel_leases", 3.0),
        ("flannel_remote_leases", 2.0),
        ("flannel_pods", 1.0),
        (r#"flannel_bpf_map_entries{map="FLANNEL_REMOTES"}"#, 2.0),
        (r#"flannel_bpf_map_entries{map="FLANNEL_ENDPOINTS"}"#, 1.0),
        (r#"flannel_bpf_map_entries{map="FLANNEL_VTEPS"}"#, 2.0),
        (
            r#"flannel_bpf_map_capacity{map="FLANNEL_REMOTES"}"#,
            16384.0,
        ),
        (r#"flannel_datapath_info{mode="ebpf",xdp_mode="off"}"#, 1.0),
        (r#"flannel_reconcile_passes_total{trigger="start"}"#, 1.0),
        (r#"flannel_cni_requests_total{op="add",result="ok"}"#, 1.0),
        (
            r#"flannel_store_requests_total{store="local",op="acquire"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series} in:\n{text}");
    }
    for family in [
        "flannel_reconcile_duration_seconds_count",
        "flannel_reconcile_operations_total{kind=\"device\",trigger=\"start\"}",
        "flannel_lease_renewal_age_seconds",
        "flannel_cni_request_duration_seconds_count",
    ] {
        assert!(sample(&text, family).is_some(), "{family} in:\n{text}");
    }

    // A real Prometheus in the fabric namespace scrapes both agents.
    let dir = lab.dir.join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let targets: Vec<String> = lab.nodes[..2]
        .iter()
        .map(|n| format!("\"{}:{PORT}\"", n.ip))
        .collect();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: flannel\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )?;
    let listen = SocketAddr::new(FABRIC_IP.into(), 9090);
    let fabric = lab.fabric.clone();
    lab.start_service(
        "prometheus",
        &fabric,
        &[
            "prometheus".into(),
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={listen}"),
        ],
    )?;
    let query = format!(
        "/api/v1/query?query={}",
        url_encode(r#"rate(flannel_datapath_packets_total{verdict="pod_encap_redirect"}[5s])"#)
    );
    let mut last = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if std::time::Instant::now() > deadline {
            let log = lab.service("prometheus")?.log();
            bail!("no rate > 0 for both agents; last answer {last}\nprometheus log:\n{log}");
        }
        // Traffic both ways: echo requests and replies are encapsulated
        // on both nodes.
        lab.ping((0, 0), to, 10, 56)?;
        let Ok(resp) = http_get(&fabric, listen, &query) else {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        last = resp
            .split_once("\r\n\r\n")
            .map_or(resp.clone(), |(_, b)| b.to_string());
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&last) else {
            continue;
        };
        let rates: Vec<f64> = v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["value"][1].as_str()?.parse().ok())
            .collect();
        if rates.len() == 2 && rates.iter().all(|r| *r > 0.0) {
            break;
        }
    }
    dashboard_queries_work(&lab, listen, &scrape(&lab, 0)?)?;

    // Kernel-only mode: no data path families, the rest as on eBPF.
    let text = scrape(&lab, 2)?;
    promtool_accepts(&text)?;
    assert!(!text.contains("flannel_datapath_packets"), "{text}");
    assert!(!text.contains("flannel_bpf_map"), "{text}");
    for (series, want) in [
        (
            r#"flannel_datapath_info{mode="kernel",xdp_mode="none"}"#,
            1.0,
        ),
        ("flannel_remote_leases", 2.0),
        ("flannel_pods", 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series} in:\n{text}");
    }
    Ok(())
}

/// Every metric the shipped Grafana dashboard queries is one the agent
/// serves, and every query is valid PromQL that the lab's Prometheus runs.
fn dashboard_queries_work(lab: &Lab, prometheus: SocketAddr, text: &str) -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/monitoring/grafana-dashboard.json"
    );
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .context("dashboard has no panels")?
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut names = std::collections::BTreeSet::new();
    for e in &exprs {
        for (at, _) in e.match_indices("flannel_") {
            let name: String = e[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    for name in &names {
        // A sample, or at least the family (an error counter with no
        // error yet has no sample).
        let family = name.trim_end_matches("_bucket");
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name}{{"))
                || l.starts_with(&format!("{name} "))
                || l == format!("# TYPE {family} counter")
                || l.starts_with(&format!("# TYPE {family} "))),
            "the dashboard queries {name}, which /metrics does not serve:\n{text}"
        );
    }
    for e in &exprs {
        let q = e
            .replace("$instance", ".*")
            .replace("$__rate_interval", "10s");
        let url = format!("/api/v1/query?query={}", url_encode(&q));
        let resp = http_get(&lab.fabric, prometheus, &url)?;
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: serde_json::Value =
            serde_json::from_str(body).with_context(|| format!("answer to {q}: {resp}"))?;
        assert_eq!(v["status"], "success", "{q}: {body}");
    }
    Ok(())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

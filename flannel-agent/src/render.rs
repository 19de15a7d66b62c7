//! Human-readable renderings of the agent's answers for the command line
//! (`flannel-agent inspect`); `-o json` prints the answers as they are.

use std::fmt::Write;

use crate::api::{Check, Inspect, Trace};

/// Columns padded to their widest cell.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(out, header.to_vec());
    for r in rows {
        line(out, r.iter().map(String::as_str).collect());
    }
}

fn status(problems: &[String]) -> String {
    if problems.is_empty() {
        "ok".into()
    } else {
        format!("MISMATCH: {}", problems.join("; "))
    }
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "NO" }.into()
}

fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

pub fn inspect(i: &Inspect) -> String {
    let mut out = String::new();
    let n = &i.node;
    let _ = writeln!(
        out,
        "node {}  lease {}  store {}  data path {} ({})",
        n.public_ip, n.subnet, n.subnet_manager, n.datapath, n.reason
    );
    let _ = writeln!(out);
    let checks = |out: &mut String, title: &str, c: &[Check]| {
        let rows: Vec<Vec<String>> = c
            .iter()
            .map(|c| vec![c.name.clone(), status(&c.problems)])
            .collect();
        table(out, &[title, "STATUS"], &rows);
    };
    checks(&mut out, "DEVICE", &i.devices);
    let _ = writeln!(out);
    let rows: Vec<Vec<String>> = i
        .remotes
        .iter()
        .map(|r| {
            vec![
                r.subnet.clone(),
                r.public_ip.clone(),
                if r.direct {
                    "(direct)".into()
                } else {
                    r.vtep_mac.clone()
                },
                opt(&r.map),
                r.map_vtep.map_or("-".into(), yes),
                yes(r.route),
                opt(&r.neighbour),
                opt(&r.fdb),
                status(&r.problems),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "REMOTE",
            "NODE IP",
            "VTEP MAC",
            "MAP",
            "MAP VTEP",
            "ROUTE",
            "NEIGHBOUR",
            "FDB",
            "STATUS",
        ],
        &rows,
    );
    let _ = writeln!(out);
    let rows: Vec<Vec<String>> = i
        .pods
        .iter()
        .map(|p| {
            vec![
                p.ip.clone(),
                p.mac.clone(),
                p.host_ifname.clone(),
                p.ifindex.map_or("-".into(), |i| i.to_string()),
                opt(&p.map),
                p.program.clone(),
                status(&p.problems),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "POD", "MAC", "HOST IF", "IFINDEX", "MAP", "PROGRAM", "STATUS",
        ],
        &rows,
    );
    if !i.ignored.is_empty() {
        let _ = writeln!(out);
        checks(&mut out, "IGNORED LEASE", &i.ignored);
    }
    let _ = writeln!(out);
    if i.pending.is_empty() {
        let _ = writeln!(out, "in order: the next pass has nothing to change");
    } else {
        let _ = writeln!(out, "the next pass will:");
        for p in &i.pending {
            let _ = writeln!(out, "  {p}");
        }
    }
    let counters: Vec<Vec<String>> = i
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| vec![k.clone(), v.to_string()])
        .collect();
    if !counters.is_empty() {
        let _ = writeln!(out);
        table(&mut out, &["COUNTER", "PACKETS"], &counters);
    }
    out
}

/// What a live probe showed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Live {
    /// Counters that moved while the probe went, and by how much.
    pub moved: std::collections::BTreeMap<String, u64>,
    /// One of the counters the trace expects moved.
    pub confirmed: bool,
    /// The node has counters at all (not on the kernel data path).
    pub counters: bool,
}

pub fn trace(t: &Trace, live: Option<&Live>) -> String {
    let mut out = String::new();
    for (i, s) in t.steps.iter().enumerate() {
        let _ = writeln!(out, "{:>2}. [{}] {}", i, s.at, s.what);
    }
    if !t.expect.is_empty() {
        let _ = writeln!(out, "expect: {}", t.expect.join(" or "));
    }
    if let Some(l) = live {
        if !l.counters {
            let _ = writeln!(
                out,
                "live: probe sent; the kernel data path has no counters to confirm it"
            );
        } else {
            let moved: Vec<String> = l.moved.iter().map(|(k, v)| format!("{k} +{v}")).collect();
            let _ = writeln!(
                out,
                "live: {} (moved: {})",
                if l.confirmed {
                    "confirmed"
                } else {
                    "NOT confirmed"
                },
                if moved.is_empty() {
                    "nothing".into()
                } else {
                    moved.join(", ")
                }
            );
        }
    }
    out
}

//! The agent's rooms import one way: no module imports another that
//! imports it back, and only the binaries drive the agent. Read from the
//! sources' `crate::` paths (uses and inline paths alike), at the level
//! of the top-level modules (`agent`, `reconcile`, `subnet`, …).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules named after each `crate::` in `src`.
fn crate_refs(src: &str) -> BTreeSet<String> {
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::b, c, d::{e, f}}`: the first name of each item.
            let (mut depth, mut item_start) = (0usize, true);
            for (i, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

#[test]
fn modules_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if ["lib", "main", "bin"].contains(&module.as_str()) {
            continue;
        }
        let refs = crate_refs(&std::fs::read_to_string(f).unwrap());
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(refs.into_iter().filter(|r| *r != module));
    }
    assert!(graph.len() > 10, "read the modules: {graph:?}");
    assert!(
        graph["agent"].contains("reconcile"),
        "the scan sees imports: {graph:?}"
    );
    for (m, deps) in &graph {
        assert!(
            !deps.contains("agent"),
            "{m} imports the agent, which drives it"
        );
    }
    // Depth-first search for a path back to where it started.
    fn reaches(
        graph: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        for next in graph.get(from).into_iter().flatten() {
            if next == to {
                return Some(vec![next.clone()]);
            }
            if seen.insert(next.clone()) {
                if let Some(mut path) = reaches(graph, next, to, seen) {
                    path.insert(0, next.clone());
                    return Some(path);
                }
            }
        }
        None
    }
    for m in graph.keys() {
        if let Some(path) = reaches(&graph, m, m, &mut BTreeSet::new()) {
            panic!("import circle: {m} -> {}", path.join(" -> "));
        }
    }
}

#[test]
fn the_scan_reads_grouped_and_inline_paths() {
    let src = "use crate::{\n    api::{Request, Response},\n    config::NetConfig, // crate::ignored\n    datapath::{self, Active},\n};\nfn f() { crate::fsutil::write_atomic(); }\n";
    assert_eq!(
        crate_refs(src),
        ["api", "config", "datapath", "fsutil"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}

//! An interrupted demo leaves nothing behind: SIGTERM (and Ctrl-C's SIGINT)
//! in the middle of its traffic removes the run's namespaces, pins, lab
//! directory and processes before the process exits.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

fn leftovers(id: &str) -> Vec<String> {
    let mut left = Vec::new();
    for dir in ["/run/netns", "/sys/fs/bpf"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(&format!("{id}-")) {
                left.push(format!("{dir}/{name}"));
            }
        }
    }
    let lab_dir = std::env::temp_dir().join(format!("flannel-lab-{id}"));
    if lab_dir.exists() {
        left.push(lab_dir.display().to_string());
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(id) {
                left.push(format!(
                    "process {}: {cmd}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    left
}

fn interrupt_demo(signal: libc::c_int) -> Result<()> {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_flannel-demo"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting flannel-demo")?;
    let mut out = BufReader::new(demo.stdout.take().context("no stdout")?);
    let mut id = None;
    let mut seen = String::new();
    let started = Instant::now();
    // Wait for the lab and its first cross-node traffic, then interrupt.
    while started.elapsed() < Duration::from_secs(120) {
        let mut line = String::new();
        if out.read_line(&mut line)? == 0 {
            break;
        }
        seen.push_str(&line);
        if let Some(rest) = line.strip_prefix("lab ") {
            id = rest.split_whitespace().next().map(str::to_string);
        }
        if line.contains("cross node") {
            break;
        }
    }
    let Some(id) = id else {
        let _ = demo.kill();
        bail!("the demo never reported its lab id:\n{seen}");
    };
    assert!(
        !leftovers(&id).is_empty(),
        "the lab {id} should exist while the demo runs"
    );
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(demo.id() as i32, signal) };
    let status = demo.wait()?;
    let mut err = String::new();
    if let Some(mut e) = demo.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err)?;
    }
    assert_eq!(
        status.code(),
        Some(128 + signal),
        "the demo should exit through its signal clean-up; stderr:\n{err}"
    );
    let left = leftovers(&id);
    assert!(left.is_empty(), "left behind by lab {id}: {left:#?}");
    assert!(Path::new("/run/netns").exists());
    Ok(())
}

#[test]
fn sigterm_mid_demo_removes_everything() -> Result<()> {
    interrupt_demo(libc::SIGTERM)
}

#[test]
fn sigint_mid_demo_removes_everything() -> Result<()> {
    interrupt_demo(libc::SIGINT)
}

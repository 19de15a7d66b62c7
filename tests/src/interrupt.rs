//! Clean-up when a run is interrupted. `Drop` removes a lab when the run
//! ends, fails or panics; an operator's Ctrl-C (SIGINT), a `kill` (SIGTERM)
//! or a closed terminal (SIGHUP) would skip it. [`clean_up_on_signals`],
//! called first thing by the demo and the bench, takes those signals on a
//! thread of its own and removes what every lab of this run made before the
//! process exits: child processes (agents, iperf3, etcd), the namespaces
//! `<id>-*`, the pins `/sys/fs/bpf/<id>-*` and the directory
//! `$TMPDIR/flannel-lab-<id>`, for every id [`crate::lab::unique_id`] handed out.

use std::{collections::HashMap, path::Path, sync::Mutex};

use anyhow::{bail, Result};

static RUN_IDS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Remembers an id handed out to this run, for [`clean_up_run`].
pub(crate) fn remember(id: &str) {
    if let Ok(mut ids) = RUN_IDS.lock() {
        ids.push(id.to_string());
    }
}

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Blocks SIGINT, SIGTERM and SIGHUP on this thread (and so on every
/// thread it starts later) and starts the thread that waits for them.
/// Call it before any other thread exists.
pub fn clean_up_on_signals() -> Result<()> {
    // SAFETY: the set is initialised by sigemptyset before use and only
    // valid signal numbers are added; pthread_sigmask changes this thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set and `sig` a valid out slot.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            eprintln!(
                "\nsignal {sig}: removing this run's namespaces, pins, files and processes ..."
            );
            clean_up_run();
            std::process::exit(128 + sig);
        })?;
    Ok(())
}

/// Kills this process's descendants and removes every namespace, pin
/// directory and lab directory named after this run's ids. The run's
/// other threads go on meanwhile and may start a process (a ping into a
/// pod) after the first kill; once the namespaces are gone such a start
/// fails at once, so the descendants are killed again until none is left.
pub fn clean_up_run() {
    kill_descendants();
    let ids = RUN_IDS.lock().map(|v| v.clone()).unwrap_or_default();
    for id in &ids {
        let prefix = format!("{id}-");
        // Pods and nodes before the fabric, as `Drop` does: longest names first.
        let mut namespaces = names_with_prefix(Path::new("/run/netns"), &prefix);
        namespaces.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for ns in namespaces {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &ns])
                .status();
        }
        for pins in names_with_prefix(Path::new("/sys/fs/bpf"), &prefix) {
            let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(pins));
        }
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("flannel-lab-{id}")));
    }
    // Two quiet looks in a row, 20 ms apart (at most about 2 s in all).
    let mut quiet = 0;
    for _ in 0..100 {
        if kill_descendants() == 0 {
            quiet += 1;
            if quiet == 2 {
                break;
            }
        } else {
            quiet = 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn names_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// SIGKILLs every process below this one, deepest first, and reaps the
/// direct children; returns how many there were.
fn kill_descendants() -> usize {
    let mut parent_of = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(ppid) = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(parent_pid)
        {
            parent_of.insert(pid, ppid);
        }
    }
    let me = std::process::id() as i32;
    let depth = |mut pid: i32| -> Option<usize> {
        let mut d = 0;
        while let Some(&pp) = parent_of.get(&pid) {
            d += 1;
            if pp == me {
                return Some(d);
            }
            if d > 64 {
                break;
            }
            pid = pp;
        }
        None
    };
    let mut below: Vec<(usize, i32)> = parent_of
        .keys()
        .filter_map(|&p| depth(p).map(|d| (d, p)))
        .collect();
    below.sort_by(|a, b| b.cmp(a));
    for &(_, pid) in &below {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &(d, pid) in &below {
        if d == 1 {
            // SAFETY: a null status pointer is allowed.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
    }
    below.len()
}

/// The parent pid from `/proc/<pid>/stat`: the fourth field, counted
/// after the command name, which may itself contain spaces and parens.
fn parent_pid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parent_pid;

    #[test]
    fn parent_pid_survives_odd_command_names() {
        assert_eq!(parent_pid("42 (iperf3) S 7 42 42 0"), Some(7));
        assert_eq!(parent_pid("42 (a) b (c)) R 9 1 1"), Some(9));
        assert_eq!(parent_pid("42 (truncated"), None);
    }
}

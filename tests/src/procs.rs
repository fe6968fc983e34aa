//! What runs on this host, read from `/proc`: the ground truth for "no
//! process left behind", independent of what the node says it runs.

use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub cwd: PathBuf,
    pub cmdline: String,
}

/// Returns the live (not zombie) processes whose working directory is `dir`
/// or below it. Daemons run in their instance directory, so this finds them
/// whatever they were started as.
pub fn processes_under(dir: &Path) -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let base = entry.path();
        let Ok(cwd) = std::fs::read_link(base.join("cwd")) else {
            continue;
        };
        if !cwd.starts_with(dir) || is_zombie(pid) {
            continue;
        }
        let cmdline = std::fs::read(base.join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        found.push(Proc {
            pid,
            cwd,
            cmdline: cmdline.trim_end().to_string(),
        });
    }
    found
}

/// Returns true when process `pid` exists and has not exited (a zombie has
/// exited: only its parent has not collected it yet).
pub fn is_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    // Field 3 of /proc/<pid>/stat, after the parenthesised command name
    // (which may itself contain spaces or parentheses).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(|f| f == "Z"))
        })
        .unwrap_or(false)
}

/// SIGKILLs every process found under `dir` and its process group: the
/// last line of defence against daemons outliving a failed test.
pub fn kill_all_under(dir: &Path) {
    for p in processes_under(dir) {
        let pid = Pid::from_raw(p.pid);
        if let Ok(pgid) = nix::unistd::getpgid(Some(pid))
            && pgid != nix::unistd::getpgrp()
        {
            let _ = nix::sys::signal::killpg(pgid, Signal::SIGKILL);
        }
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// Returns the parent pid of `pid` (field 4 of `/proc/<pid>/stat`).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// SIGKILLs what test stacks of killed test processes left running: a test
/// process that nextest terminates (timeout) or that is killed never runs
/// its `Drop`s, so its gateway child and its node's daemons live on,
/// reparented to init. Only orphans (parent pid 1) whose working directory
/// or command line lies in a stack directory under `tmp` are touched, so a
/// live test's processes (children of a live test process) never are.
pub fn reap_orphans_of_killed_tests(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let prefix = tmp.join(crate::stack::DIR_PREFIX);
    let prefix = prefix.to_string_lossy();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if parent_of(pid) != Some(1) || is_zombie(pid) {
            continue;
        }
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if cwd.to_string_lossy().starts_with(&*prefix) || cmdline.contains(&*prefix) {
            tracing::warn!(pid, cmdline = %cmdline.replace('\0', " "), "killing an orphan of a killed test");
            let pid = Pid::from_raw(pid);
            if nix::unistd::getpgid(Some(pid)) == Ok(pid) {
                let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
            }
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

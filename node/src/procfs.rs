//! Just enough of `/proc` and process-group signalling to stop daemons and
//! to recognise our own processes after a node restart.
//!
//! A pid alone is not an identity: after a node restart the recorded pid may
//! belong to an unrelated process. The start time (field 22 of
//! `/proc/<pid>/stat`, clock ticks since boot) makes the pair unique.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// The fields of `/proc/<pid>/stat` the node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Single-letter state; `Z` (zombie) and `X` (dead) mean "gone".
    pub state: char,
    /// Process group id.
    pub pgrp: i32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

impl ProcStat {
    /// Returns true unless the process is a zombie or dead: a zombie is
    /// gone for every purpose except holding its pid.
    pub fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/<pid>/stat` text. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so fields are
/// counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Reads `/proc/<pid>/stat`; `None` when there is no such process.
pub(crate) fn stat(pid: u32) -> Option<ProcStat> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_stat(&t))
}

/// Returns true when `pid` is a live process that started at `start_time`
/// and leads its own process group, i.e. it is the daemon the node started.
pub(crate) fn is_our_leader(pid: u32, start_time: u64) -> bool {
    pid > 1
        && stat(pid)
            .is_some_and(|s| s.is_live() && s.start_time == start_time && s.pgrp == pid as i32)
}

/// Returns the live process-group leaders whose working directory is `dir`:
/// daemons started there, each in a group of its own, found even when their
/// metadata was never written (the node died between starting one and
/// recording its pid).
pub(crate) fn leaders_in(dir: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid > 1)
        .filter(|&pid| stat(pid).is_some_and(|s| s.is_live() && s.pgrp == pid as i32))
        .filter(|&pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == dir))
        .collect()
}

/// Returns true while any non-zombie process is in group `pgid`. Zombies are
/// skipped because the container's init may never reap orphans.
pub(crate) fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        stat(pid).is_some_and(|s| s.pgrp == pgid && s.is_live())
    })
}

/// Sends `signal` to process group `pgid`; a group that is already gone is
/// not an error.
pub(crate) fn signal_group(pgid: i32, signal: Signal) {
    // pgid 0 or 1 would address our own group or everything: never.
    if pgid <= 1 {
        return;
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, %signal, error = %e, "cannot signal process group"),
    }
}

/// Stops group `pgid` of a process that is not our child: SIGTERM, up to
/// `grace` for it to go, then SIGKILL, then a short wait for the kernel to
/// finish the job.
pub(crate) async fn terminate_foreign_group(pgid: i32, grace: Duration) {
    if !group_alive(pgid) {
        return;
    }
    signal_group(pgid, Signal::SIGTERM);
    if wait_group_gone(pgid, grace).await {
        return;
    }
    tracing::warn!(pgid, "process group ignored SIGTERM; sending SIGKILL");
    signal_group(pgid, Signal::SIGKILL);
    wait_group_gone(pgid, Duration::from_secs(5)).await;
}

/// Polls until group `pgid` has no live process; false on timeout.
pub(crate) async fn wait_group_gone(pgid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !group_alive(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.pgrp, 1234);
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn reads_own_process() {
        let s = stat(std::process::id()).unwrap();
        assert!(s.is_live());
        assert!(s.start_time > 0);
        assert!(stat(u32::MAX).is_none());
    }
}

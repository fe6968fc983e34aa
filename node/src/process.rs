//! Starting one daemon in its instance directory, waiting for its port, and
//! stopping its process group.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::error::Error;
use crate::procfs;
use crate::spec::{FileWrite, RunSpec, STDERR_LOG, STDOUT_LOG};

/// How much of stderr an error message carries at most.
const TAIL_BYTES: u64 = 2048;
const TAIL_LINES: usize = 20;

/// Creates a directory readable by the node's user only.
pub(crate) fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(path)
}

/// Writes the instance's files. Parent directories are created 0700, and no
/// path component may be a symlink: a daemon could otherwise plant one in
/// its directory to make the node write outside it on the next provision.
pub(crate) fn write_files(dir: &Path, files: &[FileWrite]) -> Result<(), Error> {
    for f in files {
        let mut at = dir.to_path_buf();
        if let Some(parent) = f.path.parent() {
            for part in parent.components() {
                at.push(part);
                match std::fs::symlink_metadata(&at) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(Error::Conflict(format!(
                            "cannot write file {}: {} is not a directory",
                            f.path.display(),
                            at.display()
                        )));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        create_private_dir(&at).map_err(Error::io("cannot create", &at))?;
                    }
                    Err(e) => return Err(Error::io("cannot inspect", &at)(e)),
                }
            }
        }
        let full = dir.join(&f.path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(f.mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&full)
            .map_err(Error::io("cannot write", &full))?;
        // `mode` only applies when the file is created; an existing file
        // gets the requested bits too.
        file.set_permissions(std::fs::Permissions::from_mode(f.mode))
            .and_then(|()| file.write_all(f.content.as_bytes()))
            .map_err(Error::io("cannot write", &full))?;
    }
    Ok(())
}

/// A daemon that was just started.
pub(crate) struct Spawned {
    pub child: Child,
    /// Pid, also its process group id.
    pub pid: u32,
    /// Its `/proc` start time, for the metadata file.
    pub start_time: u64,
    /// Length of `stderr.log` before this start, so that error messages
    /// quote only this run's output.
    pub stderr_offset: u64,
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Starts `spec.argv` in `dir`, in a process group of its own (so that
/// stopping it reaches every process it forks), with stdout and stderr
/// appended to the instance's log files. Returns the failure reason as text.
pub(crate) fn spawn(dir: &Path, spec: &RunSpec) -> Result<Spawned, String> {
    let stdout =
        open_log(&dir.join(STDOUT_LOG)).map_err(|e| format!("cannot open {STDOUT_LOG}: {e}"))?;
    let stderr =
        open_log(&dir.join(STDERR_LOG)).map_err(|e| format!("cannot open {STDERR_LOG}: {e}"))?;
    let stderr_offset = stderr.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = Command::new(&spec.argv[0]);
    scrub_node_env(cmd.as_std_mut());
    let child = cmd
        .args(&spec.argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        // The supervisor decides when a daemon dies, never a dropped handle:
        // with keep_instances_on_shutdown the daemon must outlive the node.
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", spec.argv[0]))?;
    let pid = child.id().unwrap_or(0);
    let start_time = procfs::stat(pid).map(|s| s.start_time).unwrap_or(0);
    Ok(Spawned {
        child,
        pid,
        start_time,
        stderr_offset,
    })
}

/// Removes the node's own `SVCBROKER_*` variables from a child's
/// environment: they are node configuration, and one of them
/// (`SVCBROKER_POSTGRES_URL`) holds the database server's admin password,
/// which no daemon or hook should inherit.
pub(crate) fn scrub_node_env(cmd: &mut std::process::Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SVCBROKER_") {
            cmd.env_remove(name);
        }
    }
}

/// The address readiness probes connect to for daemons told to listen on
/// `bind_host`: a specific address is probed there (the daemon listens on
/// nothing else); a wildcard or a host name is probed on 127.0.0.1.
pub(crate) fn probe_ip(bind_host: &str) -> IpAddr {
    match bind_host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => ip,
        _ => IpAddr::from([127, 0, 0, 1]),
    }
}

/// Returns true when `<host>:<port>` accepts a TCP connection.
pub(crate) async fn port_accepts(host: IpAddr, port: u32) -> bool {
    let Ok(port) = u16::try_from(port) else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

/// How waiting for readiness ended.
pub(crate) enum Readiness {
    /// The port accepts connections and the daemon still runs.
    Accepting,
    /// The daemon exited first.
    Exited(ExitStatus),
    /// The timeout passed.
    TimedOut,
}

/// Waits until the daemon's port accepts connections, it exits, or
/// `timeout` passes.
pub(crate) async fn wait_ready(
    child: &mut Child,
    host: IpAddr,
    port: u32,
    timeout: Duration,
) -> Readiness {
    let deadline = Instant::now() + timeout;
    // Start polling fast: most daemons listen within milliseconds, and a
    // provision waits for this probe (a loopback connect costs tens of
    // microseconds); back off for the slow ones.
    let mut poll = Duration::from_millis(2);
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(s) => Readiness::Exited(s),
                    // wait() only fails if the child was already reaped,
                    // which means it exited.
                    Err(_) => Readiness::Exited(ExitStatus::default()),
                };
            }
            _ = tokio::time::sleep(poll) => {}
        }
        if port_accepts(host, port).await {
            // Something answered: make sure it is not a stranger on a port
            // our daemon failed to bind.
            if let Ok(Some(s)) = child.try_wait() {
                return Readiness::Exited(s);
            }
            return Readiness::Accepting;
        }
        if Instant::now() >= deadline {
            return Readiness::TimedOut;
        }
        poll = (poll * 3 / 2).min(Duration::from_millis(100));
    }
}

/// Stops our child `child` (leader of group `pgid`): SIGTERM to the whole
/// group, up to `grace` for every member to exit, then SIGKILL; always reaps
/// the leader.
pub(crate) async fn terminate_child(child: &mut Child, pgid: i32, grace: Duration) {
    let started = Instant::now();
    procfs::signal_group(pgid, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_ok()
        && procfs::wait_group_gone(pgid, grace.saturating_sub(started.elapsed())).await
    {
        return;
    }
    tracing::warn!(
        pgid,
        "daemon ignored SIGTERM for {} ms; sending SIGKILL",
        grace.as_millis()
    );
    procfs::signal_group(pgid, Signal::SIGKILL);
    let _ = child.wait().await;
    procfs::wait_group_gone(pgid, Duration::from_secs(5)).await;
}

/// Returns the last lines of `stderr.log` written after `offset`: at most
/// 20 lines and 2 KiB, so that error messages stay readable.
pub(crate) fn stderr_tail(dir: &Path, offset: u64) -> String {
    let Ok(mut f) = std::fs::File::open(dir.join(STDERR_LOG)) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = offset.max(len.saturating_sub(TAIL_BYTES));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_err() || f.take(TAIL_BYTES).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let text = text.trim_end();
    let lines: Vec<&str> = text.lines().collect();
    // A cut at `from` may split the first line: drop it unless it is all
    // there is.
    let skip_partial = usize::from(from > offset && lines.len() > 1);
    let start = lines.len().saturating_sub(TAIL_LINES).max(skip_partial);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_specific_bind_addresses_only() {
        assert_eq!(probe_ip("127.0.0.1").to_string(), "127.0.0.1");
        assert_eq!(probe_ip("0.0.0.0").to_string(), "127.0.0.1");
        assert_eq!(probe_ip("::").to_string(), "127.0.0.1");
        assert_eq!(probe_ip("10.1.2.3").to_string(), "10.1.2.3");
        assert_eq!(probe_ip("[::1]").to_string(), "::1");
        assert_eq!(probe_ip("localhost").to_string(), "127.0.0.1");
    }

    #[test]
    fn tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = String::from("old run\n");
        let offset = s.len() as u64;
        for i in 0..100 {
            s.push_str(&format!("line {i}\n"));
        }
        std::fs::write(dir.path().join(STDERR_LOG), &s).unwrap();
        let t = stderr_tail(dir.path(), offset);
        assert_eq!(t.lines().count(), 20);
        assert!(t.ends_with("line 99"));
        assert!(!t.contains("old run"));

        std::fs::write(dir.path().join(STDERR_LOG), "old\nnew error\n").unwrap();
        assert_eq!(stderr_tail(dir.path(), 4), "new error");
        let long = "x".repeat(10_000);
        std::fs::write(dir.path().join(STDERR_LOG), &long).unwrap();
        assert!(stderr_tail(dir.path(), 0).len() <= 2048);
    }

    #[test]
    fn files_refuse_symlinked_parents() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("conf")).unwrap();
        let f = FileWrite {
            path: "conf/x".into(),
            content: "secret".into(),
            mode: 0o600,
        };
        assert!(write_files(dir.path(), std::slice::from_ref(&f)).is_err());
        assert!(!outside.path().join("x").exists());
        let g = FileWrite {
            path: "a/b/c.conf".into(),
            content: "k v".into(),
            mode: 0o640,
        };
        write_files(dir.path(), &[g]).unwrap();
        let meta = std::fs::metadata(dir.path().join("a/b/c.conf")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    }
}

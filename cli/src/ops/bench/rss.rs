//! Finding the broker's processes on this host and sampling their memory.
//!
//! The gateway is the process listening on the port of SVCBROKER_URL; the
//! allocator and the node are the processes listening on ports the gateway
//! has connections to, recognised by their executable's name. Matching on
//! sockets rather than names alone keeps other stacks on the same machine
//! (test runs, a second broker) out of the figures.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The components reported, in order.
pub const COMPONENTS: [&str; 3] = ["gateway", "allocator", "node"];

/// A process being sampled.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    /// Peak VmRSS seen by the sampler, kB.
    pub peak_rss_kb: u64,
    /// VmHWM at the last sample (peak over the process's whole life), kB.
    pub hwm_kb: u64,
    /// VmRSS at the last sample, kB.
    pub rss_kb: u64,
}

/// What is known of each component.
#[derive(Debug, Clone, Default)]
pub struct Components {
    /// `svcbroker up` holds all three: reported once, under this name.
    pub all_in_one: bool,
    pub found: BTreeMap<&'static str, Proc>,
    /// Where the gateway keeps its SQLite database, when visible.
    pub gateway_db_dir: Option<PathBuf>,
    /// Why a component is missing, for the report.
    pub note: Option<String>,
}

impl Components {
    /// Looks for the processes behind the gateway at `port` (on this host).
    pub fn discover(port: u16) -> Components {
        let sockets = SocketTable::read();
        let owners = socket_owners();
        let mut out = Components::default();
        let Some(gw) = sockets
            .listening_on(port)
            .find_map(|inode| owners.get(&inode).copied())
        else {
            out.note = Some(format!(
                "no process on this host visibly listens on port {port}: the components are \
                 elsewhere (another host, container or user)"
            ));
            return out;
        };
        out.gateway_db_dir = sqlite_dir_of(gw);
        match exe_name(gw).as_deref() {
            Some("svcbroker") => {
                out.all_in_one = true;
                out.found.insert("svcbroker up", Proc::new(gw));
                return out;
            }
            Some("gateway") => {}
            other => {
                out.note = Some(format!(
                    "the process on port {port} is {other:?}, not a gateway or svcbroker up"
                ));
                return out;
            }
        }
        out.found.insert("gateway", Proc::new(gw));
        let own: HashSet<u64> = socket_inodes(gw).into_iter().collect();
        for peer_port in sockets.remote_ports_of(&own) {
            for inode in sockets.listening_on(peer_port) {
                let Some(&pid) = owners.get(&inode) else {
                    continue;
                };
                if let Some(name) = exe_name(pid)
                    && let Some(c) = COMPONENTS.iter().find(|c| **c == name)
                {
                    out.found.entry(c).or_insert_with(|| Proc::new(pid));
                }
            }
        }
        out
    }

    /// True when every component has been found (or `svcbroker up`).
    pub fn complete(&self) -> bool {
        self.all_in_one || COMPONENTS.iter().all(|c| self.found.contains_key(c))
    }

    /// Adds the components `other` found that this one has not.
    pub fn merge(&mut self, other: Components) {
        for (name, p) in other.found {
            self.found.entry(name).or_insert(p);
        }
        self.all_in_one |= other.all_in_one;
        if self.gateway_db_dir.is_none() {
            self.gateway_db_dir = other.gateway_db_dir;
        }
        if self.found.is_empty() {
            self.note = other.note;
        }
    }

    /// Reads each process's memory, keeping the peak.
    pub fn sample(&mut self) {
        for p in self.found.values_mut() {
            if let Some((rss, hwm)) = vm_rss_hwm(p.pid) {
                p.rss_kb = rss;
                p.hwm_kb = hwm;
                p.peak_rss_kb = p.peak_rss_kb.max(rss);
            }
        }
    }

    /// The report: one entry per component, `visible: false` with the
    /// reason for one not found.
    pub fn to_json(&self) -> Value {
        let mut out = serde_json::Map::new();
        let names: Vec<&str> = if self.all_in_one {
            vec!["svcbroker up"]
        } else {
            COMPONENTS.to_vec()
        };
        for name in names {
            let v = match self.found.get(name) {
                Some(p) => json!({
                    "visible": true,
                    "pid": p.pid,
                    "peak_rss_mb": mb(p.peak_rss_kb),
                    "rss_mb": mb(p.rss_kb),
                    "hwm_mb": mb(p.hwm_kb),
                }),
                None => json!({
                    "visible": false,
                    "why": self.note.clone().unwrap_or_else(|| format!(
                        "no `{name}` process listens on a port the gateway is connected to"
                    )),
                }),
            };
            out.insert(name.to_owned(), v);
        }
        Value::Object(out)
    }
}

impl Proc {
    fn new(pid: u32) -> Proc {
        let (rss, hwm) = vm_rss_hwm(pid).unwrap_or((0, 0));
        Proc {
            pid,
            peak_rss_kb: rss,
            hwm_kb: hwm,
            rss_kb: rss,
        }
    }
}

/// Megabytes (MiB) with two decimals.
pub fn mb(kb: u64) -> f64 {
    super::stats::round(kb as f64 / 1024.0)
}

/// (VmRSS, VmHWM) in kB from /proc/PID/status.
fn vm_rss_hwm(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The file name of the process's executable ("gateway", "svcbroker").
fn exe_name(pid: u32) -> Option<String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    // A binary rebuilt while running shows as "gateway (deleted)".
    Some(name.trim_end_matches(" (deleted)").to_owned())
}

/// The socket inodes a process holds open.
fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Socket inode -> pid, for every process whose descriptors this user may
/// read.
fn socket_owners() -> HashMap<u64, u32> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        for inode in socket_inodes(pid) {
            out.entry(inode).or_insert(pid);
        }
    }
    out
}

/// The directory of the first `*.sqlite` file the process has open.
fn sqlite_dir_of(pid: u32) -> Option<PathBuf> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .find(|p| p.extension().is_some_and(|x| x == "sqlite"))
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

/// One row of /proc/net/tcp{,6}.
#[derive(Debug)]
struct TcpRow {
    local_port: u16,
    remote_port: u16,
    listening: bool,
    inode: u64,
}

/// This network namespace's TCP sockets.
struct SocketTable(Vec<TcpRow>);

impl SocketTable {
    fn read() -> SocketTable {
        let mut rows = Vec::new();
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(file) {
                rows.extend(text.lines().skip(1).filter_map(parse_tcp_row));
            }
        }
        SocketTable(rows)
    }

    fn listening_on(&self, port: u16) -> impl Iterator<Item = u64> + '_ {
        self.0
            .iter()
            .filter(move |r| r.listening && r.local_port == port)
            .map(|r| r.inode)
    }

    /// Remote ports of the connected sockets among `inodes`.
    fn remote_ports_of(&self, inodes: &HashSet<u64>) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .0
            .iter()
            .filter(|r| !r.listening && inodes.contains(&r.inode))
            .map(|r| r.remote_port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`, with
/// addresses as `HEXADDR:HEXPORT` and state 0A for LISTEN.
fn parse_tcp_row(line: &str) -> Option<TcpRow> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let port = |s: &str| u16::from_str_radix(s.rsplit(':').next()?, 16).ok();
    Some(TcpRow {
        local_port: port(f.get(1)?)?,
        remote_port: port(f.get(2)?)?,
        listening: *f.get(3)? == "0A",
        inode: f.get(9)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let l = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        let r = parse_tcp_row(l).unwrap();
        assert_eq!(
            (r.local_port, r.remote_port, r.listening, r.inode),
            (8080, 0, true, 12345)
        );
        let c = "   1: 0100007F:C350 0100007F:1F91 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 20 4 30 10 -1";
        let r = parse_tcp_row(c).unwrap();
        assert_eq!((r.remote_port, r.listening, r.inode), (8081, false, 777));
    }

    #[test]
    fn finds_itself_listening() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let table = SocketTable::read();
        let owners = socket_owners();
        let pids: Vec<u32> = table
            .listening_on(port)
            .filter_map(|i| owners.get(&i).copied())
            .collect();
        assert_eq!(pids, vec![std::process::id()]);
        assert!(vm_rss_hwm(std::process::id()).is_some_and(|(rss, hwm)| rss > 0 && hwm >= rss));
    }
}

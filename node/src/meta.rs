//! The one small file the node keeps per instance directory, so that a node
//! restarted after SIGKILL can find and verify the daemons it started.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::spec::META_FILE;

/// Contents of `.svcbroker-instance.json`. Holds no secret: only ids, the
/// port, the daemon's identity and a hash of its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InstanceMeta {
    pub instance_id: String,
    pub service: String,
    pub plan: String,
    pub kind: String,
    pub port: u32,
    /// Pid of the daemon, which also leads its process group.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` when it was started.
    pub start_time: u64,
    pub spec_hash: String,
    /// Size cap of a directory instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit_bytes: Option<u64>,
    /// How a directory instance's cap is enforced ("loop" or "supervised").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<String>,
}

/// Writes the metadata atomically (temp file + rename), mode 0600, so a
/// crash never leaves a half-written file.
pub(crate) fn write(dir: &Path, meta: &InstanceMeta) -> Result<(), Error> {
    write_at(&dir.join(META_FILE), meta)
}

/// Writes the metadata to `path` (temp file beside it + rename).
pub(crate) fn write_at(path: &Path, meta: &InstanceMeta) -> Result<(), Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let json = serde_json::to_vec_pretty(meta).expect("metadata serialises");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(Error::io("cannot write", &tmp))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .map_err(Error::io("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("cannot rename", path))
}

/// Reads the metadata of `dir`; `None` when it is missing or unreadable
/// (such a directory is simply not adoptable).
pub(crate) fn read(dir: &Path) -> Option<InstanceMeta> {
    read_at(&dir.join(META_FILE))
}

/// Reads the metadata file at `path`.
pub(crate) fn read_at(path: &Path) -> Option<InstanceMeta> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable instance metadata");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = InstanceMeta {
            instance_id: "i".into(),
            service: "redis".into(),
            plan: "p".into(),
            kind: "process".into(),
            port: 10001,
            pid: 42,
            start_time: 7,
            spec_hash: "abc".into(),
            size_limit_bytes: None,
            cap: None,
        };
        write(dir.path(), &m).unwrap();
        assert_eq!(read(dir.path()), Some(m));
        std::fs::write(dir.path().join(META_FILE), "{").unwrap();
        assert_eq!(read(dir.path()), None);
    }
}

//! The service definitions shipped with svcbroker, embedded at build time.

use std::io;
use std::path::Path;

include!(concat!(env!("OUT_DIR"), "/shipped.rs"));

/// Writes the shipped definitions into `dir` when `dir` does not exist yet;
/// an existing directory is the operator's and is left alone. Returns true
/// when it wrote them.
pub fn install(dir: &Path) -> io::Result<bool> {
    if dir.exists() {
        return Ok(false);
    }
    // Written to a sibling and renamed, so an interrupted first start never
    // leaves a half-filled services.d that later starts would trust.
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = tempdir_in(parent)?;
    for (name, yaml) in SHIPPED {
        std::fs::write(tmp.join(name), yaml)?;
    }
    std::fs::rename(&tmp, dir)?;
    Ok(true)
}

fn tempdir_in(parent: &Path) -> io::Result<std::path::PathBuf> {
    let tmp = parent.join(format!(".services.d.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ships_echo_and_redis_and_they_load() {
        let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&"echo.yaml"), "{names:?}");
        assert!(names.contains(&"redis.yaml"), "{names:?}");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("services.d");
        assert!(install(&dir).unwrap());
        let catalog = svcbroker_svcdef::Catalog::load_dir(&dir).unwrap();
        assert!(catalog.service_by_name("echo").is_some());
        assert!(catalog.service_by_name("redis").is_some());
        // A second start keeps what is there.
        std::fs::remove_file(dir.join("echo.yaml")).unwrap();
        assert!(!install(&dir).unwrap());
        assert!(!dir.join("echo.yaml").exists());
    }
}

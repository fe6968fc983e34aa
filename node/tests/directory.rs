//! Directory instances: the cap mode this host supports (a loop-mounted
//! image where root and loop devices are available, else supervised), and
//! the supervised mode forced, so both are tested wherever loop mounts work.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use svcbroker_node::DirectoryCap;
use svcbroker_proto::v1::{
    BindRequest, DeprovisionRequest, DirectorySpec, InstanceState, ProvisionRequest,
};

const MIB: u64 = 1024 * 1024;

fn request(id: &str, limit: u64) -> ProvisionRequest {
    ProvisionRequest {
        instance_id: id.into(),
        service: "volume".into(),
        plan: "small".into(),
        kind: "directory".into(),
        directory: Some(DirectorySpec {
            size_limit_bytes: limit,
        }),
        ..Default::default()
    }
}

fn deprovision(id: &str) -> DeprovisionRequest {
    DeprovisionRequest {
        instance_id: id.into(),
        kind: "directory".into(),
        ..Default::default()
    }
}

/// The mount source of `dir` per /proc/self/mountinfo, if it is a mount point.
fn mounted(dir: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (Path::new(f[4]) == dir).then(|| {
            let sep = f.iter().position(|x| *x == "-").unwrap();
            f[sep + 2].to_owned()
        })
    })
}

/// Whether loop mounts work here, found out the way an operator would (by
/// mounting one), so that the test demands the real cap exactly where it is
/// possible and cannot pass by wrongly falling back.
fn loop_possible() -> bool {
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
        return false;
    }
    let t = tempfile::tempdir().unwrap();
    let (img, point) = (t.path().join("probe.img"), t.path().join("m"));
    std::fs::create_dir(&point).unwrap();
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
        std::process::Command::new(cmd)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    run(
        "mkfs.ext4",
        &["-q".as_ref(), "-F".as_ref(), img.as_os_str()],
    ) && run(
        "mount",
        &[
            "-o".as_ref(),
            "loop".as_ref(),
            img.as_os_str(),
            point.as_os_str(),
        ],
    ) && run("umount", &[point.as_os_str()])
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Writes `bytes` into a new file; returns the I/O error, if any.
fn fill(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

#[tokio::test]
async fn directory_with_the_hosts_cap_mode() {
    let sb = Sandbox::new();
    let node = TestNode::start(sb.config()).await;
    let mut c = node.client.clone();
    let data = sb.data_dir();
    let dir = data.join("d1");

    let r = c
        .provision(request("d1", 2 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    let inst = r.instance.unwrap();
    assert_eq!(inst.kind, "directory");
    assert_eq!(inst.dir, dir.to_string_lossy());
    assert_eq!(mode(&dir), 0o770);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join(".images/d1.json")).unwrap()).unwrap();
    assert_eq!(record["kind"], "directory");
    assert_eq!(record["size_limit_bytes"], 2 * MIB);
    let cap = record["cap"].as_str().unwrap().to_owned();
    let img = data.join(".images/d1.img");
    assert!(
        !c.provision(request("d1", 2 * MIB))
            .await
            .unwrap()
            .into_inner()
            .created
    );

    if loop_possible() {
        // Root with loop devices here: the real cap must be what was chosen.
        assert_eq!(cap, "loop");
        let src = mounted(&dir).expect("directory is a mount point");
        assert!(src.starts_with("/dev/loop"), "{src}");
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 * MIB);
        // The cap is real: writing past it fails.
        let err = tokio::task::spawn_blocking({
            let f = dir.join("big");
            move || fill(&f, 3 * MIB)
        })
        .await
        .unwrap()
        .expect_err("wrote past the cap");
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC), "{err}");
        std::fs::remove_file(dir.join("big")).unwrap();
        std::fs::write(dir.join("keep"), b"data").unwrap();

        // Node restart: the mounted directory is re-adopted, not remounted.
        node.stop().await;
        assert!(mounted(&dir).is_some(), "node shutdown unmounts");
        let node = TestNode::start(sb.config()).await;
        let listed = node.instance("d1").await.expect("re-adopted");
        assert_eq!(listed.kind, "directory");
        node.stop().await;

        // A host reboot unmounts it: the next node mounts it again.
        assert!(
            std::process::Command::new("umount")
                .arg(&dir)
                .status()
                .unwrap()
                .success()
        );
        assert!(mounted(&dir).is_none());
        let node = TestNode::start(sb.config()).await;
        assert!(node.instance("d1").await.is_some());
        assert!(mounted(&dir).is_some(), "re-adoption mounts the image");
        assert_eq!(std::fs::read(dir.join("keep")).unwrap(), b"data");
        let mut c = node.client.clone();

        // Resizing a loop-mounted directory is refused, not half done.
        let e = c.provision(request("d1", 4 * MIB)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

        assert!(
            c.deprovision(deprovision("d1"))
                .await
                .unwrap()
                .into_inner()
                .removed
        );
        assert!(mounted(&dir).is_none());
        let out = std::process::Command::new("losetup")
            .arg("-j")
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.stdout.is_empty(), "loop device left attached");
        node.stop().await;
    } else {
        assert_eq!(cap, "supervised");
        assert!(
            c.deprovision(deprovision("d1"))
                .await
                .unwrap()
                .into_inner()
                .removed
        );
        node.stop().await;
    }
    assert!(!dir.exists());
    assert!(!img.exists());
    assert!(!data.join(".images/d1.json").exists());
}

#[tokio::test]
async fn supervised_cap_makes_the_directory_read_only_while_over() {
    let sb = Sandbox::new();
    let mut cfg = sb.config();
    cfg.directory_cap = DirectoryCap::Supervised;
    cfg.directory_check_interval_ms = 100;
    cfg.directory_default_limit_bytes = MIB;
    let node = TestNode::start(cfg.clone()).await;
    let mut c = node.client.clone();
    let dir = sb.data_dir().join("s1");
    // 0: the node's default (1 MiB here).
    c.provision(request("s1", 0)).await.unwrap();
    assert!(mounted(&dir).is_none());
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/small"), b"x").unwrap();

    tokio::task::spawn_blocking({
        let f = dir.join("sub/big");
        move || fill(&f, 2 * MIB)
    })
    .await
    .unwrap()
    .unwrap();
    let over = node
        .wait_for("s1", Duration::from_secs(10), |i| {
            i.message == "over size limit"
        })
        .await;
    assert_eq!(state(&over), InstanceState::Running);
    assert_eq!(mode(&dir) & 0o222, 0);
    assert_eq!(mode(&dir.join("sub")) & 0o222, 0);
    assert_eq!(mode(&dir.join("sub/small")) & 0o222, 0);

    // The lock survives a node restart (it is recorded), and lifts once
    // usage is back under the cap.
    node.stop().await;
    let node = TestNode::start(cfg).await;
    assert_eq!(
        node.instance("s1").await.expect("re-adopted").message,
        "over size limit"
    );
    std::fs::remove_file(dir.join("sub/big")).unwrap();
    node.wait_for("s1", Duration::from_secs(10), |i| i.message.is_empty())
        .await;
    assert_eq!(mode(&dir), 0o770);
    assert_ne!(mode(&dir.join("sub/small")) & 0o200, 0);

    // Bind needs the directory; hooks run.
    let mut c = node.client.clone();
    c.bind(BindRequest {
        instance_id: "s1".into(),
        binding_id: "b".into(),
        kind: "directory".into(),
        hooks: vec![command_hook(&["true"], &[], "")],
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        c.deprovision(deprovision("s1"))
            .await
            .unwrap()
            .into_inner()
            .removed
    );
    assert!(!dir.exists());
    assert!(!sb.data_dir().join(".images/s1.json").exists());
    assert!(!sb.data_dir().join(".images/s1.lock.json").exists());
    let e = c
        .bind(BindRequest {
            instance_id: "s1".into(),
            binding_id: "b".into(),
            kind: "directory".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    node.stop().await;
}

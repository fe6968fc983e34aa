//! The `directory` model: one directory per instance, `<data_dir>/<id>`,
//! with a size cap enforced one of two ways, chosen at node start:
//!
//! - **loop** (a real cap): a sparse ext4 image `<data_dir>/.images/<id>.img`
//!   of the cap's size, loop-mounted on the directory. Needs root and loop
//!   devices, which containers usually lack.
//! - **supervised** (a soft cap): the node measures the directory every
//!   `directory_check_interval_ms` and, while usage is over the cap, takes
//!   the write bits off everything in it (remembering the old modes) and
//!   reports "over size limit"; it restores them once usage is back under.
//!   Writers running as root are not stopped, and data written between two
//!   checks can overshoot.
//!
//! The node's record of a directory instance lives in the node-private
//! `<data_dir>/.images/<id>.json`, not inside the directory: the directory
//! belongs to the application, which could otherwise forge a record (e.g.
//! one naming a foreign pid for the node to adopt and later kill).
//!
//! Walks of the directory use file descriptors (`openat` with
//! `O_NOFOLLOW`), never paths, so that an application swapping a
//! directory for a symlink cannot make the node measure or chmod anything
//! outside it.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::DirectoryCap;
use crate::error::Error;
use crate::supervisor::stopped;

/// Folder under `data_dir` holding images and directory records; not a
/// valid instance id.
pub(crate) const IMAGES_DIR: &str = ".images";
/// Mode of an instance directory: the application's user and group.
const DIR_MODE: u32 = 0o770;
/// Deepest level the supervised cap measures; deeper content is not
/// counted (each level holds an open descriptor).
const MAX_DEPTH: usize = 128;
/// How long mount, umount and mkfs may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// What ListInstances says about a directory over its cap.
pub(crate) const OVER_LIMIT: &str = "over size limit";

/// How a directory's cap is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapMode {
    /// Loop-mounted ext4 image of the cap's size.
    Loop,
    /// Periodic measurement, read-only while over.
    Supervised,
}

impl CapMode {
    /// The name recorded in metadata and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CapMode::Loop => "loop",
            CapMode::Supervised => "supervised",
        }
    }

    /// Parses a recorded name.
    pub fn parse(s: &str) -> Option<CapMode> {
        match s {
            "loop" => Some(CapMode::Loop),
            "supervised" => Some(CapMode::Supervised),
            _ => None,
        }
    }
}

/// Path of the image of instance `id`.
pub(crate) fn image_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join(IMAGES_DIR).join(format!("{id}.img"))
}

/// Path of the node's record of directory instance `id`.
pub(crate) fn record_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join(IMAGES_DIR).join(format!("{id}.json"))
}

/// Path where the supervised cap keeps the modes it took write bits from.
fn lock_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join(IMAGES_DIR).join(format!("{id}.lock.json"))
}

/// Creates `<data_dir>/.images` (0700) if missing.
pub(crate) fn ensure_images_dir(data_dir: &Path) -> Result<PathBuf, Error> {
    let dir = data_dir.join(IMAGES_DIR);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
        Err(e) => Err(Error::io("cannot create", &dir)(e)),
    }
}

/// Runs a system command with a timeout; the error carries its exit status
/// and stderr (these commands handle no secret).
async fn system(program: &str, args: &[&OsStr]) -> Result<(), Error> {
    let what = format!(
        "{program} {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    crate::process::scrub_node_env(cmd.as_std_mut());
    let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .map_err(|_| Error::System {
            command: what.clone(),
            message: format!("timed out after {} s", COMMAND_TIMEOUT.as_secs()),
        })?
        .map_err(|e| Error::System {
            command: what.clone(),
            message: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let cut = stderr.len().saturating_sub(500);
    let cut = (cut..=stderr.len())
        .find(|i| stderr.is_char_boundary(*i))
        .unwrap_or(stderr.len());
    Err(Error::System {
        command: what,
        message: format!("{}: {}", out.status, &stderr[cut..]),
    })
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` is a space).
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Returns the mount source when `dir` is a mount point (in this mount
/// namespace), e.g. `/dev/loop3`.
pub(crate) fn mount_source(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_source_in(&text, dir)
}

fn mount_source_in(mountinfo: &str, dir: &Path) -> Option<String> {
    // The last mount on a path is the visible one.
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let point = fields.get(4)?;
        if unescape_mount_path(point) != dir {
            return None;
        }
        let sep = fields.iter().position(|f| *f == "-")?;
        fields.get(sep + 2).map(|s| s.to_string())
    })
}

/// Finds out whether this host can loop-mount images, by doing it once
/// with a small image in `.images`.
pub(crate) async fn detect(data_dir: &Path, wanted: DirectoryCap) -> Result<CapMode, Error> {
    if wanted == DirectoryCap::Supervised {
        tracing::info!("directory size caps: supervised (configured)");
        return Ok(CapMode::Supervised);
    }
    match probe_loop(data_dir).await {
        Ok(()) => {
            tracing::info!("directory size caps: loop-mounted ext4 images");
            Ok(CapMode::Loop)
        }
        Err(why) if wanted == DirectoryCap::Auto => {
            tracing::info!(reason = %why, "directory size caps: supervised (loop mounts unavailable)");
            Ok(CapMode::Supervised)
        }
        Err(why) => Err(Error::Unsupported(format!(
            "directory_cap is \"loop\" but loop mounts do not work here: {why}"
        ))),
    }
}

async fn probe_loop(data_dir: &Path) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".to_owned());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control".to_owned());
    }
    let images = ensure_images_dir(data_dir).map_err(|e| e.to_string())?;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let img = images.join(format!(".probe-{tag}.img"));
    let point = images.join(format!(".probe-{tag}"));
    let result = async {
        make_image(&img, 1024 * 1024).await?;
        std::fs::create_dir(&point).map_err(Error::io("cannot create", &point))?;
        mount(&img, &point).await?;
        system("umount", &[point.as_os_str()]).await
    }
    .await;
    if mount_source(&point).is_some() {
        let _ = system("umount", &[OsStr::new("-l"), point.as_os_str()]).await;
    }
    let _ = std::fs::remove_dir(&point);
    let _ = std::fs::remove_file(&img);
    // Only when empty: a data directory without directory instances stays
    // as it was.
    let _ = std::fs::remove_dir(&images);
    result.map_err(|e| e.to_string())
}

/// Creates a sparse file of `size` bytes and makes an ext4 file system in
/// it (no reserved blocks: the whole cap is the application's).
async fn make_image(img: &Path, size: u64) -> Result<(), Error> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(img)
        .map_err(Error::io("cannot create", img))?;
    if let Err(e) = f.set_len(size) {
        drop(f);
        let _ = std::fs::remove_file(img);
        return Err(Error::io("cannot size", img)(e));
    }
    drop(f);
    let made = system(
        "mkfs.ext4",
        &[
            OsStr::new("-q"),
            OsStr::new("-F"),
            OsStr::new("-m"),
            OsStr::new("0"),
            img.as_os_str(),
        ],
    )
    .await;
    if made.is_err() {
        let _ = std::fs::remove_file(img);
    }
    made
}

async fn mount(img: &Path, point: &Path) -> Result<(), Error> {
    system(
        "mount",
        &[
            OsStr::new("-o"),
            OsStr::new("loop,nosuid,nodev"),
            img.as_os_str(),
            point.as_os_str(),
        ],
    )
    .await
}

/// Unmounts `dir` if it is a mount point; a busy file system is detached
/// lazily (it goes away when its last user closes it). The loop device is
/// freed with it (mount sets autoclear).
pub(crate) async fn unmount(dir: &Path) -> Result<bool, Error> {
    if mount_source(dir).is_none() {
        return Ok(false);
    }
    if let Err(e) = system("umount", &[dir.as_os_str()]).await {
        tracing::warn!(dir = %dir.display(), error = %e, "busy directory: detaching it lazily");
        system("umount", &[OsStr::new("-l"), dir.as_os_str()]).await?;
    }
    Ok(true)
}

/// Makes the loop-backed directory exist and be mounted: creates the image
/// when missing, mounts it when not mounted (first provision, or a host
/// reboot). Returns true when the image was created by this call.
pub(crate) async fn setup_loop(
    data_dir: &Path,
    id: &str,
    dir: &Path,
    limit: u64,
) -> Result<bool, Error> {
    ensure_images_dir(data_dir)?;
    let img = image_path(data_dir, id);
    let dir_existed = dir.exists();
    create_dir(dir)?;
    if mount_source(dir).is_some() {
        return Ok(false);
    }
    // A first provision that fails leaves nothing behind: not the (empty)
    // directory it made, not an images folder no instance uses.
    let undo = || {
        if !dir_existed {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(data_dir.join(IMAGES_DIR));
    };
    let created = match std::fs::symlink_metadata(&img) {
        Ok(m) if m.is_file() => false,
        Ok(_) => {
            return Err(Error::Conflict(format!(
                "{} exists and is not a file",
                img.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Err(e) = make_image(&img, limit).await {
                undo();
                return Err(e);
            }
            true
        }
        Err(e) => return Err(Error::io("cannot inspect", &img)(e)),
    };
    if let Err(e) = mount(&img, dir).await {
        if created {
            let _ = std::fs::remove_file(&img);
            undo();
        }
        return Err(e);
    }
    // The file system's root is the directory now: give it the mode the
    // application expects (mkfs made it 0755).
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
        .map_err(Error::io("cannot chmod", dir))?;
    Ok(created)
}

/// Creates the instance directory (0770) if missing.
pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Conflict(format!(
            "{} exists and is not a directory",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(DIR_MODE)
                .create(dir)
                .map_err(Error::io("cannot create", dir))?;
            // The umask may have taken bits off.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
                .map_err(Error::io("cannot chmod", dir))
        }
        Err(e) => Err(Error::io("cannot inspect", dir)(e)),
    }
}

/// Removes everything of directory instance `id`: mount, directory, image,
/// record, lock file. Returns true when anything existed.
pub(crate) async fn remove(data_dir: &Path, id: &str, dir: &Path) -> Result<bool, Error> {
    let mut removed = unmount(dir).await?;
    if mount_source(dir).is_some() {
        return Err(Error::Conflict(format!(
            "{} is still mounted; not removing it",
            dir.display()
        )));
    }
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(dir).map_err(Error::io("cannot remove", dir))?;
            removed = true;
        }
        Ok(_) => {
            std::fs::remove_file(dir).map_err(Error::io("cannot remove", dir))?;
            removed = true;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("cannot inspect", dir)(e)),
    }
    for path in [
        image_path(data_dir, id),
        lock_path(data_dir, id),
        record_path(data_dir, id),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("cannot remove", &path)(e)),
        }
    }
    Ok(removed)
}

/// What the walker hands to its visitor.
enum Visit<'a> {
    /// A directory, open.
    Dir(BorrowedFd<'a>),
    /// A regular file, by its parent and name (opened only if needed).
    File {
        parent: BorrowedFd<'a>,
        name: &'a CStr,
    },
    /// Anything else (symlink, socket, fifo, device): never followed.
    Other,
}

fn is_type(st: &FileStat, t: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == t
}

/// Walks `root` (which must be a real directory, not a symlink) through
/// descriptors, calling `visit` with each entry's path relative to `root`
/// ("" for `root` itself) and its stat.
fn walk(
    root: &Path,
    visit: &mut dyn FnMut(&Path, &FileStat, Visit<'_>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let fd = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let st = nix::sys::stat::fstat(&fd)?;
    visit(Path::new(""), &st, Visit::Dir(fd.as_fd()))?;
    walk_dir(fd, Path::new(""), 0, visit)
}

fn walk_dir(
    fd: OwnedFd,
    rel: &Path,
    depth: usize,
    visit: &mut dyn FnMut(&Path, &FileStat, Visit<'_>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut dir = nix::dir::Dir::from_fd(fd)?;
    let names: Vec<std::ffi::CString> = dir
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for name in names {
        let child = rel.join(OsStr::from_bytes(name.as_bytes()));
        let st = match nix::sys::stat::fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        {
            Ok(st) => st,
            // Removed meanwhile: the application is still writing.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        if is_type(&st, SFlag::S_IFDIR) {
            if depth >= MAX_DEPTH {
                continue;
            }
            let sub = match nix::fcntl::openat(
                &dir,
                name.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                // Swapped for a symlink or removed since the stat: skip.
                Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => continue,
                Err(e) => return Err(e.into()),
            };
            let st = nix::sys::stat::fstat(&sub)?;
            visit(&child, &st, Visit::Dir(sub.as_fd()))?;
            walk_dir(sub, &child, depth + 1, visit)?;
        } else if is_type(&st, SFlag::S_IFREG) {
            visit(
                &child,
                &st,
                Visit::File {
                    parent: dir.as_fd(),
                    name: name.as_c_str(),
                },
            )?;
        } else {
            visit(&child, &st, Visit::Other)?;
        }
    }
    Ok(())
}

/// Bytes of disk `root` uses (allocated blocks, hard links counted once),
/// like `du`.
pub(crate) fn usage(root: &Path) -> std::io::Result<u64> {
    let mut total: u64 = 0;
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    walk(root, &mut |_, st, _| {
        if st.st_nlink > 1 && !is_type(st, SFlag::S_IFDIR) && !seen.insert((st.st_dev, st.st_ino)) {
            return Ok(());
        }
        total = total.saturating_add((st.st_blocks as u64).saturating_mul(512));
        Ok(())
    })?;
    Ok(total)
}

/// Runs `f` on a descriptor of the visited entry (directories are open
/// already; files are opened without following symlinks).
fn with_fd(v: Visit<'_>, f: impl FnOnce(BorrowedFd<'_>) -> nix::Result<()>) -> nix::Result<()> {
    match v {
        Visit::Dir(fd) => f(fd),
        Visit::File { parent, name } => {
            let fd = nix::fcntl::openat(
                parent,
                name,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            f(fd.as_fd())
        }
        Visit::Other => Ok(()),
    }
}

/// Modes the supervised cap took write bits from, by relative path (raw
/// bytes: file names need not be UTF-8).
#[derive(Default, Serialize, Deserialize)]
struct Locked {
    modes: Vec<(Vec<u8>, u32)>,
}

/// Takes every write bit off `root` and everything in it; returns the old
/// modes of what changed.
fn make_read_only(root: &Path) -> std::io::Result<Locked> {
    let mut locked = Locked::default();
    walk(root, &mut |rel, st, v| {
        let mode = st.st_mode & 0o7777;
        if mode & 0o222 == 0 || matches!(v, Visit::Other) {
            return Ok(());
        }
        match with_fd(v, |fd| {
            nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode & !0o222))
        }) {
            Ok(()) => locked
                .modes
                .push((rel.as_os_str().as_bytes().to_vec(), mode)),
            Err(Errno::ENOENT | Errno::ELOOP) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    })?;
    Ok(locked)
}

/// Gives back the write bits [`make_read_only`] took, to entries that are
/// still there.
fn restore_writable(root: &Path, locked: &Locked) -> std::io::Result<()> {
    let want: HashMap<&[u8], u32> = locked
        .modes
        .iter()
        .map(|(p, m)| (p.as_slice(), *m))
        .collect();
    walk(root, &mut |rel, st, v| {
        let Some(old) = want.get(rel.as_os_str().as_bytes()) else {
            return Ok(());
        };
        let mode = (st.st_mode & 0o7777) | (old & 0o222);
        match with_fd(v, |fd| {
            nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode))
        }) {
            Ok(()) | Err(Errno::ENOENT | Errno::ELOOP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    })
}

/// The supervised cap of one directory: a task measuring it periodically.
pub(crate) struct Watch {
    limit: Arc<AtomicU64>,
    over: Arc<AtomicBool>,
    stop_tx: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Everything the checker needs, shared with its blocking calls.
struct Checked {
    id: String,
    root: PathBuf,
    lock_file: PathBuf,
}

impl Checked {
    fn read_lock(&self) -> Option<Locked> {
        let text = std::fs::read(&self.lock_file).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// One measurement; returns whether the directory is over its cap now.
    fn check(&self, limit: u64) -> std::io::Result<bool> {
        let used = usage(&self.root)?;
        let locked = self.read_lock();
        if used > limit {
            if locked.is_none() {
                let l = make_read_only(&self.root)?;
                let json = serde_json::to_vec(&l).expect("modes serialise");
                write_private(&self.lock_file, &json)?;
                tracing::warn!(instance_id = %self.id, used, limit, "directory over its size cap: made read-only");
            }
            Ok(true)
        } else {
            if let Some(l) = locked {
                restore_writable(&self.root, &l)?;
                std::fs::remove_file(&self.lock_file)?;
                tracing::info!(instance_id = %self.id, used, limit, "directory back under its size cap: writable again");
            }
            Ok(false)
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes))?;
    std::fs::rename(&tmp, path)
}

impl Watch {
    /// Starts measuring `dir` (instance `id`) every `interval` against
    /// `limit`. A lock file left by an earlier node keeps applying.
    pub fn start(
        data_dir: &Path,
        id: &str,
        dir: &Path,
        limit: u64,
        interval: Duration,
    ) -> Arc<Watch> {
        let checked = Arc::new(Checked {
            id: id.to_owned(),
            root: dir.to_owned(),
            lock_file: lock_path(data_dir, id),
        });
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let limit = Arc::new(AtomicU64::new(limit));
        let over = Arc::new(AtomicBool::new(checked.lock_file.exists()));
        let w = Arc::new(Watch {
            limit: limit.clone(),
            over: over.clone(),
            stop_tx,
            task: Mutex::new(None),
        });
        let task = tokio::spawn(async move {
            let mut logged = false;
            loop {
                let c = checked.clone();
                let lim = limit.load(Ordering::SeqCst);
                match tokio::task::spawn_blocking(move || c.check(lim)).await {
                    Ok(Ok(is_over)) => {
                        over.store(is_over, Ordering::SeqCst);
                        logged = false;
                    }
                    Ok(Err(e)) if !logged => {
                        tracing::warn!(instance_id = %checked.id, error = %e, "cannot measure directory");
                        logged = true;
                    }
                    _ => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stopped(&mut stop_rx) => return,
                }
            }
        });
        *w.task.lock().unwrap() = Some(task);
        w
    }

    /// The message ListInstances shows ("" when under the cap).
    pub fn message(&self) -> &'static str {
        if self.over.load(Ordering::SeqCst) {
            OVER_LIMIT
        } else {
            ""
        }
    }

    /// Changes the cap (a plan update); the next check applies it.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::SeqCst);
    }

    /// Stops measuring and waits for the task to end.
    pub async fn stop(&self) {
        self.stop_tx.send_replace(true);
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by tests/grpc_bad_input.rs (a directory of u64::MAX bytes,
    /// now refused up front): a first provision whose image cannot be made
    /// leaves no instance directory, image or images folder behind.
    #[tokio::test]
    async fn failed_first_setup_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let dir = data.join("i1");
        // Beyond off_t: set_len fails before mkfs or mount would run.
        let r = setup_loop(&data, "i1", &dir, u64::MAX).await;
        assert!(r.is_err());
        let left: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn mountinfo_parsing() {
        let info = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    40 22 7:3 / /data/my\\040dir rw,nosuid - ext4 /dev/loop3 rw\n";
        assert_eq!(
            mount_source_in(info, Path::new("/data/my dir")).as_deref(),
            Some("/dev/loop3")
        );
        assert_eq!(mount_source_in(info, Path::new("/data")), None);
        assert_eq!(
            mount_source_in(info, Path::new("/")).as_deref(),
            Some("/dev/sda1")
        );
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn usage_counts_blocks_and_skips_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("d");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a"), vec![1u8; 300 * 1024]).unwrap();
        std::fs::hard_link(root.join("sub/a"), root.join("b")).unwrap();
        // A symlink to a big tree outside must not be followed.
        std::os::unix::fs::symlink("/usr", root.join("usr")).unwrap();
        let u = usage(&root).unwrap();
        assert!((300 * 1024..400 * 1024).contains(&u), "{u}");
        // Sparse files count what they use, not their length.
        let f = std::fs::File::create(root.join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        assert!(usage(&root).unwrap() < 400 * 1024);
    }

    #[test]
    fn read_only_and_back_restores_exact_modes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("d");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a"), b"x").unwrap();
        std::fs::write(root.join("ro"), b"x").unwrap();
        std::fs::set_permissions(root.join("ro"), std::fs::Permissions::from_mode(0o444)).unwrap();
        std::fs::set_permissions(root.join("sub/a"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o770)).unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();

        let locked = make_read_only(&root).unwrap();
        assert_eq!(mode(&root), 0o550);
        assert_eq!(mode(&root.join("sub/a")), 0o440);
        assert_eq!(mode(&root.join("ro")), 0o444);
        assert_eq!(mode(&outside), 0o666, "symlink target outside was changed");
        restore_writable(&root, &locked).unwrap();
        assert_eq!(mode(&root), 0o770);
        assert_eq!(mode(&root.join("sub/a")), 0o640);
        assert_eq!(mode(&root.join("ro")), 0o444);
    }

    #[test]
    fn check_locks_over_the_cap_and_unlocks_below() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("d");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o770)).unwrap();
        let c = Checked {
            id: "i".into(),
            root: root.clone(),
            lock_file: t.path().join("i.lock.json"),
        };
        assert!(!c.check(64 * 1024).unwrap());
        std::fs::write(root.join("big"), vec![7u8; 128 * 1024]).unwrap();
        assert!(c.check(64 * 1024).unwrap());
        assert_eq!(mode(&root) & 0o222, 0);
        assert_eq!(mode(&root.join("big")) & 0o222, 0);
        assert!(c.lock_file.exists());
        // Still over: stays locked, lock file unchanged.
        assert!(c.check(64 * 1024).unwrap());
        // The cap is raised (plan update): writable again.
        assert!(!c.check(1024 * 1024).unwrap());
        assert_eq!(mode(&root), 0o770);
        assert!(!c.lock_file.exists());
    }
}

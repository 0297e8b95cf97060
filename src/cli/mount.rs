//! `ebsfs mount` and the `mount.fuse3` helper form.
//!
//! The foreground mount blocks SIGINT/SIGTERM/SIGHUP in every thread and waits for
//! them on one: a signal unmounts (lazily if the mount is busy, e.g. a loop device
//! is still attached), the FUSE session then ends, running captures finish, and the
//! data directory is marked as cleanly stopped.
//!
//! As `mount -t fuse.ebsfs DATA_DIR MOUNTPOINT -o OPTS` (or an fstab line), mount(8)
//! runs `ebsfs DATA_DIR MOUNTPOINT -o OPTS` and waits for it to exit, so the process
//! forks first; the child mounts and reports success through a pipe before the parent
//! exits, and then serves the mount in the background.

use std::ffi::{CString, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use clap::CommandFactory;
use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use log::{error, info, warn};

use super::init_logging;
use crate::config::Settings;
use crate::fs::FsCore;
use crate::fuse::EbsFuse;
use crate::snapshot::Scheduling;
use crate::storage::linux::LinuxStorage;

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Where to mount (default: `mountpoint` from the config).
    mountpoint: Option<PathBuf>,
    /// Data directory (default: `data_dir` from the config).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Config file (default: ./config.toml if present, else the built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Everything a mount needs, however it was asked for.
#[derive(Debug)]
struct MountPlan {
    settings: Settings,
    options: Vec<MountOption>,
}

pub fn run(args: MountArgs) -> i32 {
    init_logging("info", None);
    let mut settings = match Settings::discover(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ebsfs: {e}");
            return 2;
        }
    };
    if let Some(dir) = args.data_dir {
        settings.data_dir = dir;
    }
    if let Some(dir) = args.mountpoint {
        settings.mountpoint = dir;
    }
    if let Err(message) = check_data_dir_outside_mount(&settings.data_dir, &settings.mountpoint) {
        eprintln!("ebsfs: {message}");
        return 2;
    }
    match mount_and_serve(
        MountPlan {
            settings,
            options: Vec::new(),
        },
        None,
    ) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("ebsfs: {message}");
            1
        }
    }
}

/// Refuses a data directory inside the mount point (or the mount point itself): once
/// mounted, its path would lead into the mount. Runs before anything is created.
fn check_data_dir_outside_mount(data_dir: &Path, mountpoint: &Path) -> Result<(), String> {
    let resolve = |path: &Path| resolved_path(path).map_err(|e| format!("{}: {e}", path.display()));
    if resolve(data_dir)?.starts_with(resolve(mountpoint)?) {
        return Err(format!(
            "data directory {} is inside the mount point {}: the mount would hide it; \
             choose a data directory outside the mount point",
            data_dir.display(),
            mountpoint.display()
        ));
    }
    Ok(())
}

/// The absolute path `path` names, symlinks resolved, even where it does not exist
/// yet: its nearest existing ancestor, canonicalized, with the rest appended (a part
/// that does not exist holds no symlinks, so `..` in it simply goes up).
fn resolved_path(path: &Path) -> std::io::Result<PathBuf> {
    let path = std::path::absolute(path)?;
    for ancestor in path.ancestors() {
        let Ok(mut resolved) = fs::canonicalize(ancestor) else {
            continue;
        };
        let rest = path.strip_prefix(ancestor).unwrap_or(Path::new(""));
        for part in rest.components() {
            match part {
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => resolved.push(name),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        return Ok(resolved);
    }
    Ok(path)
}

/// Checks the mount point: created if missing, refused if mounted or not empty. A dead
/// ebsfs mount left by a killed daemon is detached first.
fn prepare_mountpoint(path: &Path) -> Result<PathBuf, String> {
    if let Err(e) = fs::metadata(path)
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        warn!(
            "{}: detaching a dead FUSE mount left by a daemon that stopped abruptly",
            path.display()
        );
        unmount(path, true)
            .map_err(|e| format!("{}: cannot detach the dead mount: {e}", path.display()))?;
    }
    fs::create_dir_all(path)
        .map_err(|e| format!("cannot create mount point {}: {e}", path.display()))?;
    let path =
        fs::canonicalize(path).map_err(|e| format!("mount point {}: {e}", path.display()))?;
    if is_mountpoint(&path) {
        return Err(format!(
            "{} is already a mount point: unmount it first (umount {0})",
            path.display()
        ));
    }
    let mut entries =
        fs::read_dir(&path).map_err(|e| format!("mount point {}: {e}", path.display()))?;
    if entries.next().is_some() {
        return Err(format!("mount point {} is not empty", path.display()));
    }
    Ok(path)
}

/// Creates the data directory if missing and returns its canonical path.
fn prepare_data_dir(path: &Path) -> Result<PathBuf, String> {
    let fail = |e: std::io::Error| {
        let why = match e.raw_os_error() {
            Some(libc::EROFS | libc::EACCES | libc::EPERM) => "it is not writable".to_string(),
            _ => e.to_string(),
        };
        format!("cannot open data directory {}: {why}", path.display())
    };
    fs::create_dir_all(path).map_err(fail)?;
    fs::canonicalize(path).map_err(fail)
}

/// Whether `/proc/self/mountinfo` lists `path` as a mount point.
fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mnt| unescape_mountinfo(mnt) == path.as_os_str().as_bytes())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|o| std::str::from_utf8(o).ok());
        if bytes[i] == b'\\'
            && let Some(Ok(v)) = octal.map(|o| u8::from_str_radix(o, 8))
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Unmounts `path`; `lazy` detaches it even while busy.
pub fn unmount(path: &Path, lazy: bool) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 reads the NUL-terminated path only.
    if unsafe { libc::umount2(c_path.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        // Not root: fusermount3 is setuid and may unmount our own mounts.
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        if cmd.arg(path).status().is_ok_and(|s| s.success()) {
            return Ok(());
        }
    }
    Err(err)
}

/// One malloc arena for the whole daemon. glibc gives busy threads arenas of their
/// own, and memory that capture batches free in one arena is not reused by another:
/// measured over three 8 GiB captures, peak RSS was 270 MiB with the default arenas
/// and 119 MiB with one. The request path allocates nothing per request, so the
/// shared arena costs no contention where it matters. Must run before threads start.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only adjusts allocator tuning; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Blocks the termination signals in this thread and every thread it starts.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn spawn_signal_watcher(set: libc::sigset_t, mut unmounter: SessionUnmounter, mountpoint: PathBuf) {
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait writes the received signal number into `sig`.
        while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
        info!("signal {sig}: unmounting {}", mountpoint.display());
        if let Err(e) = unmounter.unmount() {
            if e.raw_os_error() == Some(libc::EBUSY) {
                warn!(
                    "{} is busy (a loop device or an open file): detaching it; ebsfs serves it until the last user lets go",
                    mountpoint.display()
                );
            } else {
                warn!("cannot unmount {}: {e}; detaching it", mountpoint.display());
            }
            if let Err(e) = unmount(&mountpoint, true) {
                error!("cannot detach {}: {e}", mountpoint.display());
            }
        }
    });
}

/// Opens the data directory, mounts, reports readiness on `ready` (helper mode),
/// serves until unmounted and shuts down cleanly.
fn mount_and_serve(plan: MountPlan, ready: Option<OwnedFd>) -> Result<(), String> {
    let mut settings = plan.settings;
    let mountpoint = prepare_mountpoint(&settings.mountpoint)?;
    settings.data_dir = prepare_data_dir(&settings.data_dir)?;
    limit_malloc_arenas();
    let signals = block_signals();
    let core = FsCore::start(settings.clone(), LinuxStorage, Scheduling::Threads).map_err(|e| {
        format!(
            "cannot open data directory {}: {e}",
            settings.data_dir.display()
        )
    })?;
    let core = Arc::new(core);
    core.start_hydrator();
    core.start_policies();

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("ebsfs:{}", settings.data_dir.display())),
        // The kernel option (not fuser's Subtype) is what makes mounts show fuse.ebsfs.
        MountOption::CUSTOM("subtype=ebsfs".into()),
        MountOption::DefaultPermissions,
    ];
    config.mount_options.extend(plan.options);
    config.n_threads = Some(settings.fuse_threads);
    config.clone_fd = true;
    config.acl = if settings.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };

    let mut session = match Session::new(EbsFuse::new(core.clone()), &mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            core.shutdown();
            return Err(format!("cannot mount at {}: {e}", mountpoint.display()));
        }
    };
    info!(
        "mounted {} at {} ({} threads)",
        settings.data_dir.display(),
        mountpoint.display(),
        settings.fuse_threads
    );
    if let Some(fd) = ready {
        let mut pipe = fs::File::from(fd);
        let _ = pipe.write_all(b"ok");
    }
    spawn_signal_watcher(signals, session.unmount_callable(), mountpoint.clone());
    raise_readahead(&mountpoint);
    let served = session.run();
    core.shutdown();
    info!("unmounted {}", mountpoint.display());
    match served {
        // The kernel ends a read of /dev/fuse with ECONNABORTED instead of ENODEV when
        // it hands out a request while tearing the connection down (fuse_dev_do_read,
        // more likely with several cloned descriptors): the end of a detached mount
        // whose last user just left. The session is over either way.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            info!("the kernel closed the FUSE connection ({e})");
            Ok(())
        }
        served => served.map_err(|e| format!("FUSE session ended with an error: {e}")),
    }
}

/// Readahead the mount gets: the kernel's default (128 KiB) starves sequential reads
/// of snapshot images, whose blocks are verified and decompressed one request at a time.
const READAHEAD_KB: u32 = 1024;

/// Raises the readahead of this mount's backing device info. Best effort: it needs
/// root, and only tunes speed.
fn raise_readahead(mountpoint: &Path) {
    let Some(device) = mount_device(mountpoint) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(e) = fs::write(&knob, READAHEAD_KB.to_string()) {
        log::debug!("cannot raise readahead ({knob}): {e}");
    }
}

/// The `major:minor` of the filesystem mounted at `path`, from mountinfo (a `stat`
/// of the mount point would wait for the FUSE session to answer).
fn mount_device(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        let mnt = fields.nth(1)?;
        (unescape_mountinfo(mnt) == path.as_os_str().as_bytes()).then(|| device.to_string())
    })
}

/// `ebsfs DATA_DIR MOUNTPOINT [-o OPTIONS]`, as run by mount(8).
#[derive(Debug)]
pub struct HelperArgs {
    data_dir: PathBuf,
    mountpoint: PathBuf,
    options: Vec<String>,
}

impl HelperArgs {
    /// Recognises the helper form: two positional arguments that are not a subcommand.
    pub fn detect(args: &[OsString]) -> Option<HelperArgs> {
        let first = args.get(1)?.to_str()?;
        // A subcommand's name is never a data directory here: `ebsfs check --bogus x`
        // must be refused as a usage error, not mount `check` on `x`.
        let subcommand = super::Cli::command().find_subcommand(first).is_some();
        if subcommand || first == "help" || first.starts_with('-') {
            return None;
        }
        let mut positional = Vec::new();
        let mut options = Vec::new();
        let mut rest = args[1..].iter();
        while let Some(arg) = rest.next() {
            let text = arg.to_string_lossy();
            if text == "-o" {
                options.extend(
                    rest.next()?
                        .to_string_lossy()
                        .split(',')
                        .map(str::to_string),
                );
            } else if let Some(opts) = text.strip_prefix("-o") {
                options.extend(opts.split(',').map(str::to_string));
            } else if text.starts_with('-') {
                // mount(8) may pass -n, -s, -f, -v: nothing to do for them.
            } else {
                positional.push(PathBuf::from(arg));
            }
        }
        let [data_dir, mountpoint] = <[PathBuf; 2]>::try_from(positional).ok()?;
        Some(HelperArgs {
            data_dir,
            mountpoint,
            options,
        })
    }

    fn plan(self) -> Result<MountPlan, String> {
        let mut config_file = None;
        let mut options = Vec::new();
        let mut allow_other = None;
        for opt in self.options.iter().filter(|o| !o.is_empty()) {
            let (key, value) = opt
                .split_once('=')
                .map_or((opt.as_str(), None), |(k, v)| (k, Some(v)));
            match (key, value) {
                ("config", Some(file)) => config_file = Some(PathBuf::from(file)),
                ("allow_other", None) => allow_other = Some(true),
                ("rw", None) => options.push(MountOption::RW),
                ("ro", None) => options.push(MountOption::RO),
                ("dev", None) => options.push(MountOption::Dev),
                ("nodev", None) => options.push(MountOption::NoDev),
                ("suid", None) => options.push(MountOption::Suid),
                ("nosuid", None) => options.push(MountOption::NoSuid),
                ("exec", None) => options.push(MountOption::Exec),
                ("noexec", None) => options.push(MountOption::NoExec),
                ("atime", None) => options.push(MountOption::Atime),
                ("noatime", None) => options.push(MountOption::NoAtime),
                ("sync", None) => options.push(MountOption::Sync),
                ("async", None) => options.push(MountOption::Async),
                ("dirsync", None) => options.push(MountOption::DirSync),
                // Options for mount(8) itself, or without meaning for a FUSE mount.
                (
                    "defaults"
                    | "_netdev"
                    | "nofail"
                    | "auto"
                    | "noauto"
                    | "user"
                    | "users"
                    | "owner"
                    | "group"
                    | "relatime"
                    | "norelatime"
                    | "strictatime"
                    | "lazytime"
                    | "nolazytime"
                    | "default_permissions",
                    _,
                ) => {}
                (k, _) if k.starts_with("x-") || k.starts_with("comment=") => {}
                _ => return Err(format!("unknown mount option `{opt}`")),
            }
        }
        let mut settings = Settings::discover(config_file.as_deref()).map_err(|e| e.to_string())?;
        settings.data_dir = self.data_dir;
        settings.mountpoint = self.mountpoint;
        if let Some(allow) = allow_other {
            settings.allow_other = allow;
        }
        Ok(MountPlan { settings, options })
    }
}

/// Forks: the child mounts and serves; the parent exits once the mount is live.
pub fn run_helper(args: HelperArgs) -> i32 {
    let plan = match args.plan() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("ebsfs: {e}");
            return 2;
        }
    };
    let settings = &plan.settings;
    if let Err(message) = check_data_dir_outside_mount(&settings.data_dir, &settings.mountpoint) {
        eprintln!("ebsfs: {message}");
        return 2;
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe fills the two-element array with fresh descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("ebsfs: pipe: {}", std::io::Error::last_os_error());
        return 1;
    }
    // SAFETY: the descriptors were just created and are owned by nothing else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet in this process, so fork is safe.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("ebsfs: fork: {}", std::io::Error::last_os_error());
            1
        }
        0 => {
            drop(read_end);
            // SAFETY: setsid detaches from mount(8)'s session; no memory effects.
            unsafe { libc::setsid() };
            let log = fs::create_dir_all(&plan.settings.data_dir)
                .and_then(|_| {
                    fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(plan.settings.data_dir.join("ebsfs.log"))
                })
                .ok();
            init_logging("info", log);
            redirect_stdio_to_null();
            let mut report = fs::File::from(write_end);
            match mount_and_serve(plan, report.try_clone().ok().map(OwnedFd::from)) {
                Ok(()) => 0,
                Err(message) => {
                    error!("{message}");
                    let _ = report.write_all(message.as_bytes());
                    1
                }
            }
        }
        _child => {
            drop(write_end);
            // The child keeps the pipe open while it serves: "ok" arrives alone; an
            // error message is followed by the child's exit (end of file).
            let mut pipe = fs::File::from(read_end);
            let mut first = [0u8; 2];
            let n = pipe.read(&mut first).unwrap_or(0);
            let mut message = String::from_utf8_lossy(&first[..n]).into_owned();
            if message != "ok" {
                let _ = pipe.read_to_string(&mut message);
            }
            if message == "ok" {
                0
            } else {
                eprintln!(
                    "ebsfs: {}",
                    if message.is_empty() {
                        "the mount process died"
                    } else {
                        &message
                    }
                );
                1
            }
        }
    }
}

fn redirect_stdio_to_null() {
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this process.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn helper_form_is_recognised() {
        let h = HelperArgs::detect(&os(&[
            "ebsfs",
            "/var/lib/ebsfs",
            "/mnt/e",
            "-o",
            "rw,noatime,_netdev,config=/etc/e.toml",
        ]))
        .unwrap();
        assert_eq!(h.data_dir, Path::new("/var/lib/ebsfs"));
        assert_eq!(h.mountpoint, Path::new("/mnt/e"));
        assert_eq!(
            h.options,
            ["rw", "noatime", "_netdev", "config=/etc/e.toml"]
        );
        assert!(HelperArgs::detect(&os(&["ebsfs", "mount", "x"])).is_none());
        // Fault: `ebsfs check --bogus x` mounted data directory `check` on `x`.
        for sub in ["check", "scrub", "snapshot"] {
            assert!(HelperArgs::detect(&os(&["ebsfs", sub, "--bogus", "x"])).is_none());
        }
        assert!(HelperArgs::detect(&os(&["ebsfs", "--help"])).is_none());
        assert!(HelperArgs::detect(&os(&["ebsfs", "one"])).is_none());
    }

    #[test]
    fn helper_options_are_checked() {
        let h = HelperArgs::detect(&os(&["ebsfs", "d", "m", "-o", "rw,bogus"])).unwrap();
        assert!(h.plan().unwrap_err().contains("bogus"));
        let h = HelperArgs::detect(&os(&[
            "ebsfs",
            "d",
            "m",
            "-o",
            "ro,nofail,x-systemd.automount,allow_other",
        ]))
        .unwrap();
        let plan = h.plan().unwrap();
        assert_eq!(plan.options, vec![MountOption::RO]);
        assert!(plan.settings.allow_other);
        assert_eq!(plan.settings.data_dir, Path::new("d"));
    }

    #[test]
    fn paths_resolve_through_symlinks_even_where_missing() {
        let root = tempfile::tempdir().unwrap();
        let root_path = fs::canonicalize(root.path()).unwrap();
        let mnt = root_path.join("mnt");
        fs::create_dir(&mnt).unwrap();
        std::os::unix::fs::symlink(&mnt, root_path.join("link")).unwrap();
        for (given, expected) in [
            ("link/data", mnt.join("data")),
            ("link/not/yet/../data", mnt.join("not/data")),
            ("mnt/./x/../../elsewhere", root_path.join("elsewhere")),
            ("link", mnt.clone()),
        ] {
            assert_eq!(
                resolved_path(&root.path().join(given)).unwrap(),
                expected,
                "{given}"
            );
        }
    }

    #[test]
    fn a_data_dir_inside_the_mount_point_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let mountpoint = root.path().join("mnt");
        for (inside, data_dir) in [
            (true, "mnt/data"),
            (true, "mnt"),
            (false, "data"),
            (false, "mnt-data"),
            (false, "mnt/../data"),
        ] {
            let refused = check_data_dir_outside_mount(&root.path().join(data_dir), &mountpoint);
            assert_eq!(refused.is_err(), inside, "{data_dir}: {refused:?}");
        }
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), b"/plain");
    }
}

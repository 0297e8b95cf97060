//! Shared harness for the integration tests: a real `ebsfs` daemon on a temporary
//! data directory and mount point, driven with real tools.
//!
//! Every test starts with [`require_fuse`]: with `CI=true` a missing `/dev/fuse` or
//! missing root fails the test; elsewhere the test prints why and skips.
#![allow(dead_code)]

pub mod s3;
pub mod users;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ebsfs");

/// Returns false (after saying why) when FUSE tests cannot run here; panics under CI.
pub fn require_fuse() -> bool {
    let is_root = unsafe { libc::geteuid() } == 0;
    let problem = if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse is missing")
    } else if !is_root {
        Some("these tests mount filesystems and loop devices and need root")
    } else {
        None
    };
    match problem {
        None => true,
        Some(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but {reason}")
        }
        Some(reason) => {
            eprintln!("skipping: {reason}");
            false
        }
    }
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {:?} failed ({}):\nstdout: {}\nstderr: {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a shell script with `set -euo pipefail`, panicking unless it succeeds.
pub fn sh(script: &str) -> String {
    let out = run("bash", &["-euo", "pipefail", "-c", script]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's exit status and output, for assertion messages.
pub fn describe_output(out: &Output) -> String {
    format!(
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command and returns its output whatever the status.
pub fn try_run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Lazily unmounts `path` if something is mounted there; ignores errors.
pub fn lazy_unmount(path: &Path) {
    let _ = Command::new("umount")
        .arg("-l")
        .arg(path)
        .stderr(Stdio::null())
        .status();
}

/// Waits until `check` holds, panicking with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_mounted(path: &Path) -> bool {
    let Ok(canonical) = fs::canonicalize(path) else {
        return false;
    };
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == canonical)
}

/// A start-up that did not mount: the daemon's exit status and its stderr.
#[derive(Debug)]
pub struct Refusal {
    pub status: std::process::ExitStatus,
    pub stderr: String,
}

/// A running `ebsfs mount` on a temporary data directory.
pub struct Ebsfs {
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub mnt: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    loops: Vec<PathBuf>,
    /// Variables set (`Some`) or removed (`None`) in the daemon's environment.
    env: Vec<(String, Option<String>)>,
}

impl Ebsfs {
    /// Mounts with the default config.
    pub fn start() -> Ebsfs {
        Ebsfs::start_with("")
    }

    /// Mounts with extra `config.toml` lines (e.g. `block_size = "4KiB"`).
    pub fn start_with(config: &str) -> Ebsfs {
        let root = tempfile::Builder::new()
            .prefix("ebsfs-test")
            .tempdir()
            .expect("tempdir");
        let data = root.path().join("data");
        Ebsfs::start_in(root, data, config)
    }

    /// Mounts with a data directory that may live elsewhere (e.g. a small filesystem).
    pub fn start_in(root: tempfile::TempDir, data: PathBuf, config: &str) -> Ebsfs {
        let mut fs = Ebsfs::unstarted_in(root, data, config);
        fs.spawn();
        fs
    }

    /// Mounts with `config` and these variables in the daemon's environment
    /// (e.g. a snapshot store's credentials).
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Ebsfs {
        let mut fs = Ebsfs::unstarted(config);
        for (key, value) in env {
            fs.set_env(key, Some(value));
        }
        fs.spawn();
        fs
    }

    /// A temporary data directory, mount point and `config`, with no daemon yet:
    /// [`Ebsfs::set_env`], then [`Ebsfs::restart`] or [`Ebsfs::try_restart`] start it.
    pub fn unstarted(config: &str) -> Ebsfs {
        let root = tempfile::Builder::new()
            .prefix("ebsfs-test")
            .tempdir()
            .expect("tempdir");
        let data = root.path().join("data");
        Ebsfs::unstarted_in(root, data, config)
    }

    fn unstarted_in(root: tempfile::TempDir, data: PathBuf, config: &str) -> Ebsfs {
        let mnt = root.path().join("mnt");
        let config_path = root.path().join("config.toml");
        fs::write(&config_path, config).expect("write config");
        Ebsfs {
            root,
            data,
            mnt,
            config: config_path,
            child: None,
            loops: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Sets (`Some`) or removes (`None`) a variable of the daemon's environment, from
    /// its next start on.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.map(str::to_string)));
    }

    /// Replaces the daemon's `config.toml` (read at its next start).
    pub fn write_config(&self, config: &str) {
        fs::write(&self.config, config).expect("write config");
    }

    fn spawn(&mut self) {
        let log = self.root.path().join("ebsfs.log");
        if let Err(refusal) = self.launch(&log) {
            panic!(
                "ebsfs exited with {} before mounting:\n{}",
                refusal.status,
                self.log()
            );
        }
    }

    /// Starts the daemon again on the same data directory (or first, after
    /// [`Ebsfs::unstarted`]), where it may refuse to mount: returns its exit status and stderr if it exits before the mount is live.
    /// Its stderr goes to a file of its own, which [`Ebsfs::log`] includes.
    pub fn try_restart(&mut self) -> Result<(), Refusal> {
        assert!(self.child.is_none(), "restart of a running daemon");
        let stderr = self.root.path().join("ebsfs.stderr");
        self.launch(&stderr)
    }

    /// Spawns the daemon (stdout to the log, stderr to `stderr_path`) and waits until
    /// its mount is live or it exits.
    fn launch(&mut self, stderr_path: &Path) -> Result<(), Refusal> {
        let append = |path: &Path| {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("log file")
        };
        let stdout = append(&self.root.path().join("ebsfs.log"));
        let stderr = append(stderr_path);
        let stderr_start = stderr.metadata().map_or(0, |m| m.len()) as usize;
        let mut command = Command::new(BIN);
        command
            .arg("mount")
            .arg(&self.mnt)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for (key, value) in &self.env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        let child = command.spawn().expect("spawn ebsfs");
        self.child = Some(child);
        let mnt = self.mnt.clone();
        let start = Instant::now();
        while !(is_mounted(&mnt) && mnt.join("volumes").is_dir()) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let stderr = fs::read(stderr_path).unwrap_or_default();
                return Err(Refusal {
                    status,
                    stderr: String::from_utf8_lossy(&stderr[stderr_start.min(stderr.len())..])
                        .into_owned(),
                });
            }
            if start.elapsed() > Duration::from_secs(30) {
                let status = self.child.take().and_then(|mut child| {
                    let _ = child.kill();
                    child.wait().ok()
                });
                lazy_unmount(&self.mnt);
                return Err(Refusal {
                    status: status.unwrap_or_default(),
                    stderr: format!("ebsfs did not mount within 30s:\n{}", self.log()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The names in directory `dir` of the mount (`volumes`, `snapshots`,
    /// `recycle-bin`), sorted.
    pub fn names_in(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.mnt.join(dir))
            .unwrap_or_else(|e| panic!("readdir {dir}/: {e}"))
            .map(|e| {
                e.unwrap_or_else(|e| panic!("{dir}/ entry: {e}"))
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    /// The daemon's log: everything it printed, then the stderr of [`Ebsfs::try_restart`].
    pub fn log(&self) -> String {
        let mut log = fs::read_to_string(self.root.path().join("ebsfs.log")).unwrap_or_default();
        if let Ok(stderr) = fs::read_to_string(self.root.path().join("ebsfs.stderr")) {
            log.push_str("--- stderr of try_restart ---\n");
            log.push_str(&stderr);
        }
        log
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn volume(&self, name: &str) -> PathBuf {
        self.mnt.join("volumes").join(format!("{name}.img"))
    }

    pub fn snapshot(&self, id: &str) -> PathBuf {
        self.mnt.join("snapshots").join(id)
    }

    /// A scratch path outside the mount.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Reads a snapshot's `status` (trimmed).
    pub fn status(&self, id: &str) -> String {
        fs::read_to_string(self.snapshot(id).join("status"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// A snapshot's `progress` in percent (0 when unreadable). With a store, the
    /// capture is the first half.
    pub fn progress(&self, id: &str) -> u64 {
        fs::read_to_string(self.snapshot(id).join("progress"))
            .unwrap_or_default()
            .trim()
            .trim_end_matches('%')
            .parse()
            .unwrap_or(0)
    }

    /// Waits until a snapshot is no longer pending; returns its final status.
    pub fn wait_snapshot(&self, id: &str) -> String {
        let mut status = String::new();
        wait_until(
            &format!("snapshot {id} to finish"),
            Duration::from_secs(600),
            || {
                status = self.status(id);
                status != "pending"
            },
        );
        status
    }

    /// A snapshot's `info` file as a TOML table.
    pub fn info(&self, id: &str) -> toml::Table {
        let text = fs::read_to_string(self.snapshot(id).join("info")).expect("read info");
        toml::from_str(&text).unwrap_or_else(|e| panic!("info of {id} is not TOML ({e}):\n{text}"))
    }

    pub fn info_u64(&self, id: &str, key: &str) -> u64 {
        self.info(id)
            .get(key)
            .and_then(|v| v.as_integer())
            .unwrap_or_else(|| panic!("info of {id} has no integer {key}")) as u64
    }

    /// Loop-mounts `image` at a new directory under the test root; unmounted on drop.
    pub fn loop_mount(&mut self, image: &Path, dir_name: &str, options: &str) -> PathBuf {
        let dir = self.scratch(dir_name);
        fs::create_dir_all(&dir).expect("mkdir");
        let opts = if options.is_empty() {
            "loop".to_string()
        } else {
            format!("loop,{options}")
        };
        run(
            "mount",
            &[
                OsStr::new("-o"),
                OsStr::new(&opts),
                image.as_os_str(),
                dir.as_os_str(),
            ],
        );
        self.loops.push(dir.clone());
        dir
    }

    /// Unmounts a loop mount made by [`Ebsfs::loop_mount`].
    pub fn loop_unmount(&mut self, dir: &Path) {
        run("umount", &[dir]);
        self.loops.retain(|d| d != dir);
    }

    /// Unmounts cleanly with SIGTERM and waits for the daemon to exit.
    pub fn stop(&mut self) {
        for dir in std::mem::take(&mut self.loops) {
            lazy_unmount(&dir);
        }
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            loop {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(120) {
                    let _ = child.kill();
                    panic!("ebsfs did not exit within 120s of SIGTERM:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert!(
            !is_mounted(&self.mnt),
            "mount left behind after a clean stop:\n{}",
            self.log()
        );
    }

    /// `kill -9` the daemon and detach its dead mount.
    pub fn kill9(&mut self) {
        for dir in std::mem::take(&mut self.loops) {
            lazy_unmount(&dir);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        lazy_unmount(&self.mnt);
    }

    /// Starts the daemon again on the same data directory (or first, after
    /// [`Ebsfs::unstarted`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running daemon");
        self.spawn();
    }

    /// Writes [`pattern`]`(len, seed)` to a file outside the mount; returns its path.
    pub fn scratch_pattern(&self, len: usize, seed: u64) -> PathBuf {
        self.write_scratch(&format!("pattern-{len}-{seed}"), &pattern(len, seed))
    }

    /// Writes `bytes` to a file outside the mount and returns its path.
    pub fn write_scratch(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.scratch(name);
        fs::File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .expect("write scratch");
        path
    }
}

impl Drop for Ebsfs {
    fn drop(&mut self) {
        for dir in std::mem::take(&mut self.loops) {
            lazy_unmount(&dir);
        }
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none()
                && start.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        lazy_unmount(&self.mnt);
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests can regenerate expectations.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of a file, via sha256sum.
pub fn sha256(path: &Path) -> String {
    let out = run("sha256sum", &[path]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// SHA-256 of `bytes`, via sha256sum.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    // sha256sum writes nothing until its input ends: no deadlock on the pipes.
    child
        .stdin
        .take()
        .expect("sha256sum stdin")
        .write_all(bytes)
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Allocated bytes of everything under `path` (what `du` reports).
pub fn du_bytes(path: &Path) -> u64 {
    let out = run(
        "du",
        &[OsStr::new("-s"), OsStr::new("-B1"), path.as_os_str()],
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

impl Ebsfs {
    /// Sends `signal` to the daemon without waiting.
    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Makes the last session look like it ended with the host going down: the daemon
    /// dies, the session file names another boot, and the volumes' dirty maps lost
    /// their bits; then starts the daemon again.
    pub fn simulate_host_crash(&mut self) {
        self.kill9();
        let session = self.data.join("session");
        let text = fs::read_to_string(&session).expect("a killed daemon leaves its session file");
        let rewritten: String = text
            .lines()
            .map(|l| {
                if l.starts_with("boot_id=") {
                    "boot_id=another-boot".to_string()
                } else {
                    l.to_string()
                }
            })
            .map(|l| l + "\n")
            .collect();
        fs::write(&session, rewritten).unwrap();
        for entry in fs::read_dir(self.data.join("volumes")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "dirty") {
                fs::remove_file(path).unwrap();
            }
        }
        self.restart();
    }

    /// Waits up to `timeout` for the daemon to exit (after [`Ebsfs::signal`]) and
    /// returns its status; the daemon then counts as stopped for [`Ebsfs::restart`].
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("daemon running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait for ebsfs") {
                self.child = None;
                return status;
            }
            if start.elapsed() > timeout {
                panic!("ebsfs did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether no daemon holds the data directory's lock (`ebsfs.lock`): the one that
/// had it has exited, and a new mount may start.
pub fn data_dir_unlocked(data: &Path) -> bool {
    let Ok(file) = fs::File::open(data.join("ebsfs.lock")) else {
        return true;
    };
    // SAFETY: flock only takes the descriptor `file` owns; the lock goes with it.
    unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        ) == 0
    }
}

/// How many mounts `/proc/self/mountinfo` lists at `path`.
pub fn mounts_at(path: &Path) -> usize {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m) == path)
        .count()
}

/// A loop device attached to an image with `losetup`; detached on drop.
pub struct LoopDevice {
    pub dev: PathBuf,
    attached: bool,
}

impl LoopDevice {
    /// `losetup --direct-io=on|off --find --show image`.
    pub fn attach(image: &Path, direct_io: bool) -> LoopDevice {
        let dio = if direct_io {
            "--direct-io=on"
        } else {
            "--direct-io=off"
        };
        let out = run(
            "losetup",
            &[
                OsStr::new(dio),
                OsStr::new("--find"),
                OsStr::new("--show"),
                image.as_os_str(),
            ],
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDevice {
            dev: PathBuf::from(dev),
            attached: true,
        }
    }

    /// Whether the kernel does direct I/O to the backing file (`/sys/block/loopN/loop/dio`).
    pub fn direct_io(&self) -> bool {
        let name = self
            .dev
            .file_name()
            .expect("loop device name")
            .to_string_lossy()
            .into_owned();
        fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
            .unwrap_or_default()
            .trim()
            == "1"
    }

    /// `losetup -d`, panicking if it fails.
    pub fn detach(mut self) {
        self.attached = false;
        run("losetup", &[OsStr::new("-d"), self.dev.as_os_str()]);
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The last `lines` lines of `text`, with a note of how many were left out.
pub fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[... {skip} earlier lines]\n"));
    }
    for line in &all[skip..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

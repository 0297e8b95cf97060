//! Helpers shared by the snapshot integration tests (`tests/snapshot*.rs`): errno
//! checks, extended attributes, random data and snapshot shortcuts on top of the
//! common harness.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::*;

/// A small, seedable PRNG (splitmix64); tests print the seed so a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeded from the clock unless `EBSFS_TEST_SEED` is set; prints the seed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("EBSFS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{test}: EBSFS_TEST_SEED={seed}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `count` distinct values below `n`, sorted.
    pub fn distinct(&mut self, count: usize, n: u64) -> Vec<u64> {
        let mut picked = std::collections::BTreeSet::new();
        while picked.len() < count {
            picked.insert(self.below(n));
        }
        picked.into_iter().collect()
    }
}

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::EROFS => "EROFS",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECANCELED => "ECANCELED",
        libc::ENOTEMPTY => "ENOTEMPTY",
        _ => "E?",
    }
}

/// Asserts that `result` failed with exactly `expected`.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(what: &str, result: io::Result<T>, expected: i32) {
    match result {
        Ok(v) => panic!(
            "{what}: succeeded ({v:?}), expected {}",
            errno_name(expected)
        ),
        Err(e) => {
            let got = e.raw_os_error().unwrap_or(-1);
            assert_eq!(
                got,
                expected,
                "{what}: failed with {} ({e}), expected {}",
                errno_name(got),
                errno_name(expected)
            );
        }
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `truncate(2)` on a path.
pub fn truncate_path(path: &Path, len: u64) -> io::Result<()> {
    let p = c_path(path);
    // SAFETY: p is a valid NUL-terminated string.
    check(unsafe { libc::truncate(p.as_ptr(), len as libc::off_t) })
}

/// `chmod(2)` on a path.
pub fn chmod_path(path: &Path, mode: u32) -> io::Result<()> {
    let p = c_path(path);
    // SAFETY: p is a valid NUL-terminated string.
    check(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) })
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    set_xattr_flags(path, name, value, 0)
}

/// `setxattr(2)` with `flags` (`XATTR_CREATE`, `XATTR_REPLACE`).
pub fn set_xattr_flags(path: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (p, n) = (c_path(path), CString::new(name).unwrap());
    // SAFETY: valid strings; value is valid for its length.
    check(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

pub fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (c_path(path), CString::new(name).unwrap());
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid strings; buf is valid for its length.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(buf)
}

pub fn list_xattr(path: &Path) -> io::Result<Vec<String>> {
    let p = c_path(path);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid string; buf is valid for its length.
    let rc = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// Writes `mib` MiB of /dev/urandom into `file` at `offset_mib` MiB, in place.
pub fn write_urandom(file: &Path, offset_mib: u64, mib: u64) {
    run(
        "dd",
        &[
            "if=/dev/urandom".to_string(),
            format!("of={}", file.display()),
            "bs=1M".into(),
            format!("count={mib}"),
            format!("seek={offset_mib}"),
            "conv=notrunc".into(),
            "status=none".into(),
        ],
    );
}

/// `mkdir snapshots/<id>`.
pub fn mkdir_snapshot(fs: &Ebsfs, id: &str) -> io::Result<()> {
    fs::create_dir(fs.snapshot(id))
}

/// Creates a snapshot and waits until it is completed (panics otherwise).
#[track_caller]
pub fn take_snapshot(fs: &Ebsfs, id: &str) {
    mkdir_snapshot(fs, id).unwrap_or_else(|e| panic!("mkdir snapshots/{id}: {e}\n{}", fs.log()));
    let status = fs.wait_snapshot(id);
    assert_eq!(
        status,
        "completed",
        "snapshot {id} ended {status:?}\ninfo: {:?}\n{}",
        fs.info(id),
        fs.log()
    );
}

/// `snapshots/<id>/volume.img`.
pub fn image(fs: &Ebsfs, id: &str) -> PathBuf {
    fs.snapshot(id).join("volume.img")
}

/// Names listed in `snapshots/`, sorted.
pub fn listed_snapshots(fs: &Ebsfs) -> Vec<String> {
    fs.names_in("snapshots")
}

/// A string value of a snapshot's `info`.
pub fn info_str(fs: &Ebsfs, id: &str, key: &str) -> Option<String> {
    fs.info(id)
        .get(key)
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// Bytes allocated under the data directory's `chunks/` (snapshot storage).
pub fn chunks_bytes(fs: &Ebsfs) -> u64 {
    du_bytes(&fs.data.join("chunks"))
}

/// Polls until `status` of `id` is pending and `progress` has reached `min_percent`;
/// panics if the capture finishes first (the test's precondition failed).
pub fn wait_for_progress(fs: &Ebsfs, id: &str, min_percent: u64) -> u64 {
    let start = Instant::now();
    loop {
        let status = fs.status(id);
        let percent = fs.progress(id);
        if status != "pending" {
            panic!(
                "precondition: snapshot {id} became {status:?} before its progress reached \
                 {min_percent}% (capture too fast for this test; give it more data)"
            );
        }
        if percent >= min_percent {
            return percent;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "snapshot {id} stuck at {percent}%"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Unix seconds of an RFC 3339 time as `info` writes it (via `date`).
pub fn unix_seconds(rfc3339: &str) -> i64 {
    let out = run("date", &["-u", "-d", rfc3339, "+%s"]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("date gave no number for {rfc3339}: {e}"))
}

/// `fsfreeze -f` a mount point; thawed when dropped (even if the test panics).
pub struct Frozen(PathBuf);

impl Frozen {
    pub fn new(dir: &Path) -> Frozen {
        run("fsfreeze", &[std::ffi::OsStr::new("-f"), dir.as_os_str()]);
        Frozen(dir.to_path_buf())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.0)
            .status();
    }
}

// Volumes made from snapshots (tests/clones.rs, tests/bucket.rs).

/// How long hydration of a few hundred MiB may take on a slow machine.
pub const HYDRATE_TIMEOUT: Duration = Duration::from_secs(400);

/// Creates volume `name` of `size_mib` MiB holding `data_mib` MiB of random data at
/// `offset_mib` MiB, the rest holes.
pub fn random_volume(fs: &Ebsfs, name: &str, size_mib: u64, offset_mib: u64, data_mib: u64) {
    let img = fs.volume(name);
    run("truncate", &[format!("-s{size_mib}M"), path_str(&img)]);
    write_urandom(&img, offset_mib, data_mib);
}

pub fn path_str(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}

/// `user.ebsfs.hydrated` of a volume, as a number of percent.
pub fn hydrated_percent(volume: &Path) -> u64 {
    let value = get_xattr(volume, "user.ebsfs.hydrated")
        .unwrap_or_else(|e| panic!("user.ebsfs.hydrated of {}: {e}", volume.display()));
    let text = String::from_utf8_lossy(&value);
    text.strip_suffix('%')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("user.ebsfs.hydrated is {text:?}, not a percentage"))
}

/// Waits until a volume made from a snapshot holds every block itself.
pub fn wait_hydrated(fs: &Ebsfs, name: &str) {
    let start = Instant::now();
    let volume = fs.volume(name);
    loop {
        let percent = hydrated_percent(&volume);
        if percent == 100 {
            break;
        }
        assert!(
            start.elapsed() < HYDRATE_TIMEOUT,
            "volume {name} still {percent}% hydrated after {HYDRATE_TIMEOUT:?}:\n{}",
            tail_lines(&fs.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "volume {name} hydrated in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

/// SHA-256 of every file under `dir` (lost+found aside), by path relative to `dir`.
pub fn tree_sums(dir: &Path) -> BTreeMap<String, String> {
    let out = sh(&format!(
        "cd '{}' && find . -path ./lost+found -prune -o -type f -print0 | sort -z \
         | xargs -0 -r sha256sum",
        dir.display()
    ));
    out.lines()
        .filter_map(|line| {
            let (sum, name) = line.split_once("  ")?;
            Some((name.to_string(), sum.to_string()))
        })
        .collect()
}

/// Where two trees of [`tree_sums`] differ, for assertion messages.
pub fn tree_diff(expected: &BTreeMap<String, String>, found: &BTreeMap<String, String>) -> String {
    let mut lines = Vec::new();
    for (name, sum) in expected {
        match found.get(name) {
            None => lines.push(format!("{name} missing")),
            Some(other) if other != sum => lines.push(format!("{name} differs")),
            Some(_) => {}
        }
    }
    for name in found.keys().filter(|n| !expected.contains_key(*n)) {
        lines.push(format!("{name} unexpected"));
    }
    lines.join(", ")
}

/// Writes a tree of files with pseudo-random contents and sizes under `dir`.
pub fn write_tree(dir: &Path) {
    for d in 0..5u64 {
        let sub = dir.join(format!("d{d}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..8u64 {
            let len = ((d * 7919 + f * 104_729) * 977 % (4 * MIB)) as usize + 1;
            fs::write(sub.join(format!("f{f}")), pattern(len, d * 100 + f)).unwrap();
        }
    }
    fs::create_dir_all(dir.join("empty/dir")).unwrap();
    fs::write(dir.join("small"), b"a small file\n").unwrap();
}

/// Volume `name` of `size` (as `truncate -s` takes it) formatted as ext4 and holding
/// [`write_tree`]: the files' [`tree_sums`].
pub fn ext4_volume_with_tree(fs: &mut Ebsfs, name: &str, size: &str) -> BTreeMap<String, String> {
    let volume = fs.volume(name);
    run("truncate", &[&format!("-s{size}"), &path_str(&volume)]);
    run("mkfs.ext4", &["-q", "-F", &path_str(&volume)]);
    let dir = fs.loop_mount(&volume, name, "");
    write_tree(&dir);
    let files = tree_sums(&dir);
    assert!(files.len() > 40, "tree written: {files:?}");
    fs.loop_unmount(&dir);
    files
}

/// `cp snapshots/<id>/volume.img volumes/<name>.img`, timed.
pub fn cp_image(fs: &Ebsfs, id: &str, name: &str) {
    let start = Instant::now();
    run("cp", &[image(fs, id), fs.volume(name)]);
    let took = start.elapsed();
    eprintln!(
        "cp of {id} ({} MiB) into volume {name}: {:.1} ms",
        fs::metadata(image(fs, id)).unwrap().len() / MIB,
        took.as_secs_f64() * 1000.0
    );
}

/// `len` bytes of a file at `offset`.
pub fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {len} at {offset} of {}: {e}", path.display()));
    buf
}

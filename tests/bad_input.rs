//! Bad input gets the documented errno or a clear refusal, never a half-made object:
//! invalid names, sizes past the limit, things that are not volumes, a full or
//! read-only data disk, broken config files, busy mount points, and signals.

mod common;

use std::ffi::{CString, OsStr};
use std::fmt::Debug;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn errno_name(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

/// Asserts that `result` failed with exactly `expected`.
fn assert_errno<T: Debug>(what: &str, result: io::Result<T>, expected: i32) {
    match result {
        Ok(value) => panic!(
            "{what}: succeeded ({value:?}), expected {}",
            errno_name(expected)
        ),
        Err(e) => assert!(
            e.raw_os_error() == Some(expected),
            "{what}: failed with {e}, expected {}",
            errno_name(expected)
        ),
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn mkfifo(path: &Path) -> io::Result<()> {
    // SAFETY: mkfifo reads the NUL-terminated path only.
    match unsafe { libc::mkfifo(c_path(path).as_ptr(), 0o644) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn statvfs(path: &Path) -> libc::statvfs {
    // SAFETY: statvfs writes only into the zeroed struct we pass.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path(path).as_ptr(), &mut stats) };
    assert_eq!(
        rc,
        0,
        "statvfs {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
    stats
}

/// Bytes available to root (the daemon) on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let s = statvfs(path);
    s.f_bfree * s.f_frsize
}

/// Names in the mount's `volumes/`, sorted.
fn volume_names(fs: &Ebsfs) -> Vec<String> {
    fs.names_in("volumes")
}

fn test_root() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ebsfs-test")
        .tempdir()
        .expect("tempdir")
}

/// A small ext4 filesystem on a loop device, mounted in its own temporary directory:
/// a data disk that fills up or is read-only. Unmounted on drop, which must come after
/// the daemon using it has stopped: declare it before the [`Ebsfs`].
struct SmallFs {
    _root: tempfile::TempDir,
    dir: PathBuf,
}

impl SmallFs {
    fn new(size_mib: u64, mkfs_args: &[&OsStr], mount_options: &str) -> SmallFs {
        let root = tempfile::Builder::new()
            .prefix("ebsfs-test-small")
            .tempdir()
            .expect("tempdir");
        let image = root.path().join("fs.img");
        let dir = root.path().join("fs");
        fs::create_dir(&dir).expect("mkdir");
        run(
            "truncate",
            &[
                OsStr::new("-s"),
                OsStr::new(&format!("{size_mib}M")),
                image.as_os_str(),
            ],
        );
        let mut args = vec![
            OsStr::new("-q"),
            OsStr::new("-F"),
            OsStr::new("-m"),
            OsStr::new("0"),
        ];
        args.extend_from_slice(mkfs_args);
        args.push(image.as_os_str());
        run("mkfs.ext4", &args);
        let options = format!("loop,{mount_options}");
        run(
            "mount",
            &[
                OsStr::new("-o"),
                OsStr::new(&options),
                image.as_os_str(),
                dir.as_os_str(),
            ],
        );
        SmallFs { _root: root, dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let clean = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        if !clean.is_ok_and(|s| s.success()) {
            lazy_unmount(&self.dir);
        }
    }
}

/// Something mounted for the test (a tmpfs); lazily unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        lazy_unmount(&self.0);
    }
}

/// Runs `ebsfs mount MNT --data-dir DATA --config CONFIG`, which must fail; returns its
/// stderr. If it mounts instead, it is stopped and the test fails.
fn mount_must_fail(mnt: &Path, data: &Path, config: &Path) -> String {
    let mounts_before = mounts_at(mnt);
    let mut child = Command::new(BIN)
        .arg("mount")
        .arg(mnt)
        .arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ebsfs");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ebsfs") {
            break status;
        }
        if start.elapsed() > Duration::from_secs(20) || mounts_at(mnt) > mounts_before {
            // SAFETY: signals our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(1));
            let _ = child.kill();
            let _ = child.wait();
            lazy_unmount(mnt);
            panic!(
                "ebsfs mount at {} did not fail (it mounted or hung)",
                mnt.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(
        !status.success(),
        "ebsfs mount exited with {status}; stderr:\n{stderr}"
    );
    assert_eq!(
        mounts_at(mnt),
        mounts_before,
        "a failed ebsfs mount left a mount at {}",
        mnt.display()
    );
    stderr
}

/// Creating volume files with invalid names fails with EINVAL (or ENAMETOOLONG) and
/// creates nothing; a 64-character name works.
#[test]
fn invalid_volume_names_are_refused() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let volumes = fs.mnt.join("volumes");
    let too_long = format!("{}.img", "v".repeat(65));
    let cases: [(&[u8], i32); 9] = [
        (b"noext", libc::EINVAL),
        (b"disk.raw", libc::EINVAL),
        (b".x.img", libc::EINVAL),
        (b".img", libc::EINVAL),
        (b"a b.img", libc::EINVAL),
        ("é.img".as_bytes(), libc::EINVAL),
        (b"\xff\xfe.img", libc::EINVAL),
        (b"a@b.img", libc::EINVAL),
        (too_long.as_bytes(), libc::ENAMETOOLONG),
    ];
    for (name, errno) in cases {
        let path = volumes.join(OsStr::from_bytes(name));
        assert_errno(
            &format!("create volumes/{}", String::from_utf8_lossy(name)),
            fs::File::create(&path),
            errno,
        );
    }
    let out = try_run(
        "truncate",
        &[
            OsStr::new("-s"),
            OsStr::new("1M"),
            volumes.join("a b.img").as_os_str(),
        ],
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Invalid argument"),
        "truncate of volumes/'a b.img': {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        volume_names(&fs),
        Vec::<String>::new(),
        "a refused name left something behind"
    );

    let longest = format!("{}.img", "v".repeat(64));
    fs::write(volumes.join(&longest), b"ok").expect("a 64-character volume name must work");
    assert_eq!(fs::read(volumes.join(&longest)).unwrap(), b"ok");
    assert_eq!(volume_names(&fs), [longest]);
}

/// Writes and sizes past `max_volume_size` fail with EFBIG; exactly the maximum works;
/// reads far past the end return nothing.
#[test]
fn sizes_beyond_the_limit_fail_with_efbig() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start_with("max_volume_size = \"1GiB\"\n");
    let img = fs.volume("big");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&img)
        .unwrap();
    let max = 1u64 << 30;

    assert_errno("write at 2^62", file.write_at(b"x", 1 << 62), libc::EFBIG);
    assert_errno(
        "write 1 byte at max_volume_size",
        file.write_at(b"x", max),
        libc::EFBIG,
    );
    assert_errno(
        "truncate to max_volume_size + 1",
        file.set_len(max + 1),
        libc::EFBIG,
    );
    for (mode, what) in [(0, ""), (libc::FALLOC_FL_KEEP_SIZE, " with KEEP_SIZE")] {
        // SAFETY: fallocate on an owned fd, integer arguments only.
        let rc = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                mode,
                max as i64,
                MIB as i64,
            )
        };
        assert_errno(
            &format!("fallocate past max_volume_size{what}"),
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            },
            libc::EFBIG,
        );
    }
    let meta = file.metadata().unwrap();
    assert_eq!(meta.len(), 0, "a refused change altered the size");
    assert_eq!(
        std::os::unix::fs::MetadataExt::blocks(&meta),
        0,
        "a refused fallocate allocated space"
    );

    let out = try_run(
        "truncate",
        &[OsStr::new("-s"), OsStr::new("2G"), img.as_os_str()],
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("File too large"),
        "truncate -s 2G: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    file.set_len(max)
        .expect("truncate to exactly max_volume_size");
    assert_eq!(file.metadata().unwrap().len(), max);
    let tail = pattern(4096, 3);
    assert_eq!(
        file.write_at(&tail, max - 4096)
            .expect("write ending at max_volume_size"),
        4096
    );
    assert_errno(
        "write crossing max_volume_size",
        file.write_at(&tail, max - 2048),
        libc::EFBIG,
    );
    assert_eq!(file.metadata().unwrap().len(), max);
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, max - 4096).unwrap();
    assert!(
        buf == tail,
        "the write ending at max_volume_size reads back differently"
    );

    for offset in [max, max + 4096, 1 << 40, 1 << 62] {
        assert_eq!(
            file.read_at(&mut buf, offset).expect("read past the end"),
            0,
            "read at {offset} past the end"
        );
    }
    assert_eq!(
        file.read_at(&mut buf, max - 10).unwrap(),
        10,
        "read across the end"
    );
}

/// open(O_CREAT|O_EXCL) of an existing volume fails with EEXIST and leaves it alone.
#[test]
fn exclusive_create_of_an_existing_volume_fails_with_eexist() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("taken");
    fs::write(&img, b"keep me").unwrap();
    assert_errno(
        "O_CREAT|O_EXCL of volumes/taken.img",
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&img),
        libc::EEXIST,
    );
    assert_eq!(fs::read(&img).unwrap(), b"keep me");
    let fresh = fs.volume("fresh");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&fresh)
        .expect("O_EXCL create of a new name");
    assert_eq!(volume_names(&fs), ["fresh.img", "taken.img"]);
}

/// Only volume files can be made: directories, links, fifos and files outside
/// `volumes/` fail with EPERM.
#[test]
fn only_volume_files_can_be_created() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let volumes = fs.mnt.join("volumes");
    let img = fs.volume("real");
    fs::write(&img, b"data").unwrap();

    assert_errno(
        "mkdir volumes/d.img",
        fs::create_dir(volumes.join("d.img")),
        libc::EPERM,
    );
    assert_errno(
        "mkdir volumes/d",
        fs::create_dir(volumes.join("d")),
        libc::EPERM,
    );
    assert_errno(
        "symlink volumes/s.img",
        std::os::unix::fs::symlink(&img, volumes.join("s.img")),
        libc::EPERM,
    );
    assert_errno(
        "hard link volumes/h.img",
        fs::hard_link(&img, volumes.join("h.img")),
        libc::EPERM,
    );
    assert_errno(
        "mkfifo volumes/f.img",
        mkfifo(&volumes.join("f.img")),
        libc::EPERM,
    );
    assert_errno(
        "create x.img in the mount root",
        fs::File::create(fs.mnt.join("x.img")),
        libc::EPERM,
    );
    assert_errno(
        "mkdir in the mount root",
        fs::create_dir(fs.mnt.join("extra")),
        libc::EPERM,
    );
    assert_errno(
        "create a file in snapshots/",
        fs::File::create(fs.mnt.join("snapshots").join("x.img")),
        libc::EPERM,
    );

    assert_eq!(
        volume_names(&fs),
        ["real.img"],
        "a refused create left something in volumes/"
    );
    let mut top: Vec<String> = fs::read_dir(&fs.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["snapshots", "volumes"]);
    assert_eq!(fs::read(&img).unwrap(), b"data");
}

/// rename within `volumes/` keeps the data and replaces an existing target; invalid
/// names get EINVAL, and nothing leaves `volumes/` (EPERM).
#[test]
fn rename_rules() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let volumes = fs.mnt.join("volumes");
    let a_data = pattern(3 * MIB as usize + 5, 1);
    let (a, b) = (fs.volume("a"), fs.volume("b"));
    fs::write(&a, &a_data).unwrap();

    fs::rename(&a, &b).expect("rename a.img to b.img");
    assert!(!a.exists(), "a.img still there after the rename");
    assert!(
        fs::read(&b).unwrap() == a_data,
        "b.img does not hold a.img's data"
    );

    for bad in ["bad name.img", "noext", ".hidden.img", "é.img"] {
        assert_errno(
            &format!("rename to volumes/{bad}"),
            fs::rename(&b, volumes.join(bad)),
            libc::EINVAL,
        );
    }
    assert_errno(
        "rename into snapshots/",
        fs::rename(&b, fs.mnt.join("snapshots").join("b.img")),
        libc::EPERM,
    );
    assert_errno(
        "rename into snapshots/ as a snapshot name",
        fs::rename(&b, fs.mnt.join("snapshots").join("b@x")),
        libc::EPERM,
    );
    assert_errno(
        "rename into the mount root",
        fs::rename(&b, fs.mnt.join("b.img")),
        libc::EPERM,
    );
    assert_errno(
        "rename of volumes/ itself",
        fs::rename(&volumes, fs.mnt.join("vols")),
        libc::EPERM,
    );
    assert_eq!(
        volume_names(&fs),
        ["b.img"],
        "a refused rename changed volumes/"
    );
    assert!(
        fs::read(&b).unwrap() == a_data,
        "a refused rename changed the data"
    );

    // Onto an existing volume: the target is replaced by the source.
    let c = fs.volume("c");
    let c_data = pattern(2 * MIB as usize, 2);
    fs::write(&c, &c_data).unwrap();
    fs::rename(&c, &b).expect("rename c.img onto b.img");
    assert_eq!(volume_names(&fs), ["b.img"]);
    assert!(
        fs::read(&b).unwrap() == c_data,
        "b.img does not hold c.img's data after the replacing rename"
    );
}

/// unlink removes the volume at once and frees its space in the data directory; a
/// file still open keeps reading it until closed.
#[test]
fn unlink_frees_space_and_open_files_keep_reading() {
    if !require_fuse() {
        return;
    }
    let small = SmallFs::new(128, &[], "");
    let mut fs = Ebsfs::start_in(test_root(), small.dir.join("data"), "");
    let img = fs.volume("gone");
    let data = pattern(32 * MIB as usize, 5);
    {
        let file = fs::File::create(&img).unwrap();
        file.write_all_at(&data, 0).unwrap();
        file.sync_all().unwrap();
    }
    let free_with_volume = free_bytes(&small.dir);
    let reader = fs::File::open(&img).unwrap();
    fs::remove_file(&img).expect("rm volumes/gone.img");
    assert!(!img.exists(), "gone.img still resolves after rm");
    assert_eq!(volume_names(&fs), Vec::<String>::new());

    let mut back = vec![0u8; data.len()];
    reader
        .read_exact_at(&mut back, 0)
        .expect("read through a file opened before the rm");
    assert!(
        back == data,
        "an open file read different bytes after the rm"
    );
    drop(reader);
    wait_until(
        "the deleted volume's space to be freed",
        Duration::from_secs(10),
        || free_bytes(&small.dir) >= free_with_volume + 30 * MIB,
    );

    // The name is free again, for a new, empty volume.
    fs::File::create(&img).unwrap();
    assert_eq!(fs::metadata(&img).unwrap().len(), 0);
    fs.stop();
    drop(small);
}

/// statfs of the mount is that of the data directory's filesystem, live.
#[test]
fn statfs_reports_the_data_directory() {
    if !require_fuse() {
        return;
    }
    let small = SmallFs::new(96, &[], "");
    let mut fs = Ebsfs::start_in(test_root(), small.dir.join("data"), "");
    let compare = |when: &str| {
        let (m, d) = (statvfs(&fs.mnt), statvfs(&small.dir));
        assert_eq!(
            (m.f_bsize, m.f_frsize, m.f_blocks),
            (d.f_bsize, d.f_frsize, d.f_blocks),
            "{when}: bsize, frsize, blocks"
        );
        for (what, mine, theirs) in [
            ("f_bfree", m.f_bfree, d.f_bfree),
            ("f_bavail", m.f_bavail, d.f_bavail),
        ] {
            let diff = mine.abs_diff(theirs) * d.f_frsize;
            assert!(
                diff <= MIB,
                "{when}: {what} of the mount is {mine}, of the data directory {theirs}"
            );
        }
        m.f_bavail * m.f_frsize
    };
    let before = compare("empty");
    let img = fs.volume("fill");
    {
        let file = fs::File::create(&img).unwrap();
        file.write_all_at(&pattern(16 * MIB as usize, 9), 0)
            .unwrap();
        file.sync_all().unwrap();
    }
    let after = compare("after writing 16 MiB");
    assert!(
        after + 15 * MIB <= before,
        "the mount's free space went from {before} to {after} after writing 16 MiB"
    );

    let df = |path: &Path| {
        String::from_utf8_lossy(
            &run(
                "df",
                &[
                    OsStr::new("-B1"),
                    OsStr::new("--output=size"),
                    path.as_os_str(),
                ],
            )
            .stdout,
        )
        .into_owned()
    };
    assert_eq!(
        df(&fs.mnt),
        df(&small.dir),
        "df size of the mount and of the data directory"
    );
    fs.stop();
    drop(small);
}

/// A full data disk fails writes with ENOSPC; everything acknowledged before reads
/// back, and writes work again once space is freed.
#[test]
fn full_data_disk_returns_enospc_and_keeps_acknowledged_data() {
    if !require_fuse() {
        return;
    }
    let small = SmallFs::new(64, &[], "");
    let mut fs = Ebsfs::start_in(test_root(), small.dir.join("data"), "");
    let img = fs.volume("full");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&img)
        .unwrap();
    let chunk = MIB as usize;
    let mut written = 0u64;
    let error = loop {
        assert!(
            written < 128 * MIB,
            "wrote {written} bytes to a 64 MiB data disk without an error"
        );
        match file.write_all_at(&pattern(chunk, written / MIB), written) {
            Ok(()) => written += chunk as u64,
            Err(e) => break e,
        }
        if written.is_multiple_of(4 * MIB) {
            file.sync_all().expect("fsync before the disk is full");
        }
    };
    assert!(
        error.raw_os_error() == Some(libc::ENOSPC),
        "writing to a full data disk failed with {error}, expected {}",
        errno_name(libc::ENOSPC)
    );
    assert!(
        written >= 32 * MIB,
        "only {written} bytes fit on a 64 MiB data disk"
    );
    file.sync_all()
        .expect("fsync of the acknowledged writes after ENOSPC");

    let mut buf = vec![0u8; chunk];
    for i in 0..written / MIB {
        file.read_exact_at(&mut buf, i * MIB)
            .unwrap_or_else(|e| panic!("read of chunk {i} after ENOSPC: {e}"));
        assert!(
            buf == pattern(chunk, i),
            "acknowledged chunk {i} reads back differently after ENOSPC"
        );
    }
    assert_eq!(
        volume_names(&fs),
        ["full.img"],
        "the daemon no longer lists volumes"
    );

    // Freeing space makes the volume writable again.
    file.set_len(0).expect("truncate a volume on a full disk");
    file.write_all_at(&pattern(chunk, 99), 0)
        .expect("write after freeing space");
    file.sync_all().unwrap();
    file.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == pattern(chunk, 99));
    drop(file);
    fs.stop();
    drop(small);
}

/// A data directory that does not exist yet is created, parents included.
#[test]
fn missing_data_dir_is_created() {
    if !require_fuse() {
        return;
    }
    let root = test_root();
    let data = root.path().join("not").join("yet").join("data");
    let fs = Ebsfs::start_in(root, data.clone(), "");
    assert!(
        data.is_dir(),
        "data directory {} was not created",
        data.display()
    );
    fs::write(fs.volume("v"), b"x").unwrap();
    assert_eq!(fs::read(fs.volume("v")).unwrap(), b"x");
    assert!(
        data.join("ebsfs.redb").is_file(),
        "no metadata database in {}",
        data.display()
    );
}

/// A data directory on a read-only filesystem makes `ebsfs mount` fail, naming it.
#[test]
fn unwritable_data_dir_fails_the_mount() {
    if !require_fuse() {
        return;
    }
    let content = test_root();
    fs::create_dir(content.path().join("data")).unwrap();
    let ro = SmallFs::new(16, &[OsStr::new("-d"), content.path().as_os_str()], "ro");
    let root = test_root();
    let config = root.path().join("config.toml");
    fs::write(&config, "").unwrap();
    for (i, data) in [ro.dir.join("data"), ro.dir.join("new").join("data")]
        .into_iter()
        .enumerate()
    {
        let mnt = root.path().join(format!("mnt{i}"));
        let stderr = mount_must_fail(&mnt, &data, &config);
        assert!(
            stderr.contains(&*data.to_string_lossy()),
            "the error for read-only data directory {} does not name it:\n{stderr}",
            data.display()
        );
    }
}

/// A data directory inside the mount point (directly, as the mount point itself, or
/// through a symlink) is refused at mount time, naming both, and nothing is created
/// in the mount point.
#[test]
fn data_dir_inside_the_mount_point_is_refused() {
    if !require_fuse() {
        return;
    }
    let root = test_root();
    let config = root.path().join("config.toml");
    fs::write(&config, "").unwrap();
    let mnt = root.path().join("mnt");
    let link = root.path().join("link");
    let cases = [
        (mnt.join("data"), false),
        (mnt.clone(), false),
        (link.join("data"), true),
    ];
    for (data, through_link) in cases {
        if through_link {
            fs::create_dir_all(&mnt).unwrap();
            std::os::unix::fs::symlink(&mnt, &link).unwrap();
        }
        let stderr = mount_must_fail(&mnt, &data, &config);
        assert!(
            stderr.contains("inside the mount point")
                && stderr.contains(&*data.to_string_lossy())
                && stderr.contains(&*mnt.to_string_lossy()),
            "data directory {}:\n{stderr}",
            data.display()
        );
        let left: Vec<_> = fs::read_dir(&mnt)
            .map(|entries| entries.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "data directory {}: the refused mount left {left:?} in the mount point",
            data.display()
        );
    }
}

/// A broken config file stops `ebsfs mount` with the file, line and key in the error.
#[test]
fn malformed_config_names_file_line_and_key() {
    if !require_fuse() {
        return;
    }
    let root = test_root();
    let cases = [
        (
            "unknown-key",
            "# tuning\nblock_size = \"64KiB\"\nblok_size = 3\n",
            3,
            "blok_size",
        ),
        (
            "bad-value",
            "compression_level = 3\nblock_size = \"3KiB\"\n",
            2,
            "block_size",
        ),
        (
            "bad-size",
            "block_size = \"64KiB\"\n\n\nmax_volume_size = \"lots\"\n",
            4,
            "max_volume_size",
        ),
        (
            "syntax",
            "block_size = \"64KiB\"\n\n# limit\nmax_volume_size = 1GiB\n",
            4,
            "max_volume_size",
        ),
        (
            "unterminated",
            "compression_level = 3\ncache_size = \"64MiB\n",
            2,
            "cache_size",
        ),
    ];
    // Every case is tried; the failures are reported together.
    let mut problems = Vec::new();
    for (name, text, line, key) in cases {
        let config = root.path().join(format!("{name}.toml"));
        fs::write(&config, text).unwrap();
        let mnt = root.path().join(format!("mnt-{name}"));
        let stderr = mount_must_fail(&mnt, &root.path().join("data"), &config);
        let file = config.to_string_lossy();
        let names_line =
            stderr.contains(&format!("{file}:{line}")) || stderr.contains(&format!("line {line}"));
        for (ok, what) in [
            (stderr.contains(&*file), format!("the file {file}")),
            (names_line, format!("line {line}")),
            (stderr.contains(key), format!("the key `{key}`")),
        ] {
            if !ok {
                problems.push(format!(
                    "{name}: the error does not name {what}: {}",
                    stderr.trim()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A mount point that is not empty or already mounted is refused, and nothing is
/// mounted over it.
#[test]
fn busy_mount_point_is_refused() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let root = test_root();
    let config = root.path().join("config.toml");
    fs::write(&config, "").unwrap();
    let data = root.path().join("data");

    let full = root.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep"), b"mine").unwrap();
    let stderr = mount_must_fail(&full, &data, &config);
    assert!(
        stderr.contains("not empty") && stderr.contains(&*full.to_string_lossy()),
        "non-empty mount point:\n{stderr}"
    );
    assert_eq!(fs::read(full.join("keep")).unwrap(), b"mine");

    let tmpfs = root.path().join("tmpfs");
    fs::create_dir(&tmpfs).unwrap();
    run(
        "mount",
        &[
            OsStr::new("-t"),
            OsStr::new("tmpfs"),
            OsStr::new("none"),
            tmpfs.as_os_str(),
        ],
    );
    let _tmpfs = Mounted(tmpfs.clone());
    let stderr = mount_must_fail(&tmpfs, &data, &config);
    assert!(
        stderr.contains("already") && stderr.contains(&*tmpfs.to_string_lossy()),
        "empty but mounted mount point:\n{stderr}"
    );

    let stderr = mount_must_fail(&fs.mnt, &data, &config);
    assert!(
        stderr.contains("already") || stderr.contains("not empty"),
        "live ebsfs mount point:\n{stderr}"
    );
    fs::write(fs.volume("still"), b"served").expect("the first mount stopped working");
    assert_eq!(fs::read(fs.volume("still")).unwrap(), b"served");
}

/// A second `ebsfs mount` of a data directory in use (at another mount point) is
/// refused, naming the directory and the running daemon's pid, before it touches any
/// file: the first daemon's session file is byte-identical and its mount still works.
#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    fs::write(fs.volume("first"), b"served").unwrap();
    let session = fs.data.join("session");
    let session_before = fs::read(&session).expect("the running daemon's session file");

    let stderr = mount_must_fail(&fs.scratch("mnt2"), &fs.data, &fs.config);
    let data = fs::canonicalize(&fs.data).unwrap();
    for expected in [
        "in use by another ebsfs".to_string(),
        format!("pid {}", fs.pid()),
        data.display().to_string(),
    ] {
        assert!(
            stderr.contains(&expected),
            "the refusal does not say `{expected}`:\n{stderr}"
        );
    }
    assert!(
        fs::read(&session).unwrap() == session_before,
        "the refused daemon rewrote the session file"
    );
    assert!(
        !fs.data.join("session.tmp").exists(),
        "the refused daemon left session.tmp"
    );
    assert_eq!(fs::read(fs.volume("first")).unwrap(), b"served");
    fs::write(fs.volume("second"), b"still").expect("the first mount stopped working");
    assert_eq!(volume_names(&fs), ["first.img", "second.img"]);
}

/// SIGINT unmounts, records a clean stop and exits 0.
#[test]
fn sigint_unmounts_cleanly() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let data = pattern(2 * MIB as usize, 4);
    fs::write(fs.volume("v"), &data).unwrap();
    fs.signal(libc::SIGINT);
    let status = fs.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "ebsfs exited with {status} after SIGINT:\n{}",
        fs.log()
    );
    assert_eq!(mounts_at(&fs.mnt), 0, "mount left after SIGINT");
    assert!(
        !fs.data.join("session").exists(),
        "SIGINT did not record a clean stop:\n{}",
        fs.log()
    );
    fs.restart();
    assert!(fs::read(fs.volume("v")).unwrap() == data);
}

/// SIGTERM with a loop device attached detaches the mount at once; the device keeps
/// working until it is detached, then the daemon exits cleanly with every write kept.
#[test]
fn sigterm_with_a_loop_device_attached_detaches_lazily() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("busy");
    run(
        "truncate",
        &[OsStr::new("-s"), OsStr::new("32M"), img.as_os_str()],
    );
    let lo = LoopDevice::attach(&img, false);
    let dev = lo.dev.display().to_string();
    let before = fs.write_scratch("before", &pattern(MIB as usize, 6));
    sh(&format!(
        "dd if={} of={dev} bs=1M oflag=direct conv=fsync status=none",
        before.display()
    ));

    fs.signal(libc::SIGTERM);
    wait_until(
        "the mount to be detached after SIGTERM",
        Duration::from_secs(30),
        || mounts_at(&fs.mnt) == 0,
    );
    let after = fs.write_scratch("after", &pattern(MIB as usize, 7));
    sh(&format!(
        "dd if={} of={dev} bs=1M seek=8 oflag=direct conv=fsync status=none",
        after.display()
    ));
    let back = fs.scratch("back");
    sh(&format!(
        "dd if={dev} of={} bs=1M skip=8 count=1 iflag=direct status=none",
        back.display()
    ));
    run("cmp", &[&after, &back]);
    lo.detach();

    let status = fs.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "ebsfs exited with {status} after SIGTERM:\n{}",
        fs.log()
    );
    assert!(
        !fs.data.join("session").exists(),
        "no clean stop recorded:\n{}",
        fs.log()
    );
    fs.restart();
    let volume = fs::read(&img).unwrap();
    assert_eq!(volume.len() as u64, 32 * MIB);
    assert!(
        volume[..MIB as usize] == fs::read(&before).unwrap()[..],
        "write before SIGTERM lost"
    );
    assert!(
        volume[8 * MIB as usize..9 * MIB as usize] == fs::read(&after).unwrap()[..],
        "write after the lazy unmount lost"
    );
}

/// `ebsfs snapshot create|wait|delete` refuse an id that is not VOLUME@LABEL with exit
/// status 2 and a message naming it, before touching anything: a directory beside
/// the mount point survives `delete ../../victim`, and `create` makes nothing outside
/// `snapshots/`.
#[test]
fn cli_refuses_snapshot_ids_that_are_paths() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    fs::write(fs.volume("db"), b"x").unwrap();
    // Beside the mount point: MNT/snapshots/../../victim.
    let victim = fs.scratch("victim");
    fs::create_dir(&victim).unwrap();
    let escape = fs.scratch("escape@x");
    let cases: [&[&str]; 7] = [
        &["delete", "../victim"],
        &["delete", "../../victim"],
        &["delete", "db"],
        &["wait", "../../victim"],
        &["create", "../../escape", "x"],
        &["create", "db", "../../../escape"],
        &["create", "db", "a@b"],
    ];
    for args in cases {
        let mut argv = vec!["snapshot"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--mount", fs.mnt.to_str().unwrap()]);
        let out = try_run(BIN, &argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && stderr.contains("invalid snapshot id"),
            "ebsfs {}: {}",
            argv.join(" "),
            describe_output(&out)
        );
        assert!(
            victim.is_dir(),
            "ebsfs {} removed {}",
            argv.join(" "),
            victim.display()
        );
        assert!(
            !escape.exists(),
            "ebsfs {} created {}",
            argv.join(" "),
            escape.display()
        );
    }
    assert_eq!(
        fs::read_dir(fs.mnt.join("snapshots")).unwrap().count(),
        0,
        "a refused create made a snapshot"
    );
}

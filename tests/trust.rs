//! What users trust ebsfs not to do, on a real mount: take a lost database for an
//! empty one, break readers of a deleted snapshot, let one damaged file stop the
//! daemon, reuse a damaged chunk, recreate missing files empty, become unmountable
//! after a `kill -9`, or read every hole of a sparse volume after a host crash.

mod common;
mod snapshot_support;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use snapshot_support::*;

const BLOCK: u64 = 64 * KIB;

// ---------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------

/// SHA-256 of every file under `volumes/` and `chunks/` of a data directory, by path.
fn data_file_sums(data: &Path) -> BTreeMap<String, String> {
    let mut sums = BTreeMap::new();
    for dir in ["volumes", "chunks"] {
        for entry in fs::read_dir(data.join(dir)).expect("list data directory") {
            let path = entry.expect("dirent").path();
            let name = format!("{dir}/{}", path.file_name().unwrap().to_string_lossy());
            sums.insert(name, sha256(&path));
        }
    }
    sums
}

/// What changed between two [`data_file_sums`], for assertion messages.
fn describe_changes(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> String {
    let mut changes = Vec::new();
    for (name, sum) in before {
        match after.get(name) {
            None => changes.push(format!("{name} deleted")),
            Some(now) if now != sum => changes.push(format!("{name} changed")),
            Some(_) => {}
        }
    }
    for name in after.keys().filter(|n| !before.contains_key(*n)) {
        changes.push(format!("{name} created"));
    }
    if changes.is_empty() {
        "every file kept".into()
    } else {
        changes.join(", ")
    }
}

/// Ids of the volumes with a data file (`<id>.raw`) in `DATA/volumes/`.
fn volume_ids(fs: &Ebsfs) -> BTreeSet<u64> {
    fs::read_dir(fs.data.join("volumes"))
        .expect("list volumes/")
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".raw")?.parse().ok()
        })
        .collect()
}

/// Creates volume `name` holding `bytes`; returns its id (the name of its files).
fn create_volume(fs: &Ebsfs, name: &str, bytes: &[u8]) -> u64 {
    let before = volume_ids(fs);
    fs::write(fs.volume(name), bytes).unwrap_or_else(|e| panic!("creating {name}: {e}"));
    let new: Vec<u64> = volume_ids(fs).difference(&before).copied().collect();
    assert_eq!(new.len(), 1, "volume {name} made data files {new:?}");
    new[0]
}

fn volume_file(fs: &Ebsfs, id: u64, suffix: &str) -> PathBuf {
    fs.data.join("volumes").join(format!("{id}.{suffix}"))
}

/// `pwrite` + `fsync` on a volume.
fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
    file.sync_all().unwrap();
}

/// Reads `len` bytes at `offset`, bypassing what the page cache holds and without
/// readahead: each call reaches the daemon and sees only its own range's errors.
fn read_at(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let file = fs::File::open(path)?;
    for advice in [libc::POSIX_FADV_RANDOM, libc::POSIX_FADV_DONTNEED] {
        // SAFETY: posix_fadvise only takes a valid descriptor and a range.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice) };
    }
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether a line of the daemon's log holds every one of `words`.
fn log_has(fs: &Ebsfs, words: &[&str]) -> bool {
    fs.log()
        .lines()
        .any(|l| words.iter().all(|w| l.contains(w)))
}

/// Whether `bytes` sit in some file of `DATA/lost+found/`.
fn in_lost_found(fs: &Ebsfs, bytes: &[u8]) -> bool {
    fs::read_dir(fs.data.join("lost+found"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .any(|e| fs::read(e.path()).is_ok_and(|b| b == bytes))
        })
        .unwrap_or(false)
}

/// Drops clean page cache everywhere, so the next reads reach the daemon.
fn drop_caches() {
    sh("sync; echo 3 > /proc/sys/vm/drop_caches");
}

/// The kernel log, line by line.
fn kernel_log() -> BTreeSet<String> {
    String::from_utf8_lossy(&run("dmesg", &[] as &[&str]).stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Whether a kernel log line names block device `name` (`loop3`, not `loop30`).
fn names_device(line: &str, name: &str) -> bool {
    line.match_indices(name).any(|(at, _)| {
        !line[at + name.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// A python3 process holding a file open, reading it with `pread` on request.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const HOLDER: &str = r#"
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "read":
        # Drop cached pages first: the read must reach the filesystem.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            data = os.pread(fd, int(cmd[2]), int(cmd[1]))
            print("ok", hashlib.sha256(data).hexdigest(), flush=True)
        except OSError as e:
            print("err", e.errno, flush=True)
    elif cmd[0] == "close":
        os.close(fd)
        print("closed", flush=True)
        break
"#;

impl Holder {
    fn open(path: &Path) -> Holder {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(HOLDER)
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut holder = Holder {
            child,
            stdin,
            stdout,
        };
        assert_eq!(holder.reply(), "open", "python3 could not open {path:?}");
        holder
    }

    fn reply(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("python3 reply");
        line.trim().to_string()
    }

    /// `pread(len, offset)` on the open descriptor: the bytes' SHA-256, or the errno.
    fn read(&mut self, offset: u64, len: usize) -> Result<String, String> {
        writeln!(self.stdin, "read {offset} {len}").expect("python3 stdin");
        let reply = self.reply();
        match reply.split_once(' ') {
            Some(("ok", sum)) => Ok(sum.to_string()),
            Some(("err", errno)) => Err(errno_name(errno.parse().unwrap_or(-1)).to_string()),
            _ => panic!("python3 replied {reply:?}"),
        }
    }

    fn close(mut self) {
        writeln!(self.stdin, "close").expect("python3 stdin");
        assert_eq!(self.reply(), "closed");
        self.child.wait().expect("python3 exit");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// 1. A lost metadata database, a missing marker or a newer format stop the mount.
// ---------------------------------------------------------------------------------

/// A stopped data directory with one volume and one snapshot of it, changed since.
/// Returns the daemon and the volume's and the snapshot's contents.
fn stopped_with_data() -> (Ebsfs, Vec<u8>, Vec<u8>) {
    let mut fs = Ebsfs::start();
    let snapshot = pattern(4 * MIB as usize, 11);
    create_volume(&fs, "v", &snapshot);
    take_snapshot(&fs, "v@one");
    let change = pattern(MIB as usize, 12);
    write_at(&fs.volume("v"), MIB, &change);
    let mut live = snapshot.clone();
    live[MIB as usize..2 * MIB as usize].copy_from_slice(&change);
    fs.stop();
    (fs, live, snapshot)
}

/// Tampers with the stopped data directory, then starts: the start must be refused
/// with every one of `expected` in its stderr (the data directory's path left out),
/// and no file of `volumes/` or `chunks/` may change. With the tampered files put
/// back, the directory mounts and serves the same bytes.
fn start_is_refused(tamper: impl FnOnce(&Path), expected: &[&str]) {
    let (mut fs, live, snapshot) = stopped_with_data();
    let before = data_file_sums(&fs.data);
    let top_files = ["ebsfs.redb", "ebsfs.format"].map(|name| {
        let path = fs.data.join(name);
        let bytes = fs::read(&path).ok();
        (path, bytes)
    });
    tamper(&fs.data);

    let outcome = fs.try_restart();
    if outcome.is_ok() {
        fs.stop();
    }
    let after = data_file_sums(&fs.data);
    let Err(refusal) = outcome else {
        panic!(
            "the mount came up ({}):\n{}",
            describe_changes(&before, &after),
            fs.log()
        )
    };
    assert!(
        !refusal.status.success(),
        "refused with a success status: {refusal:?}"
    );
    let canonical = fs::canonicalize(&fs.data).unwrap();
    let message = refusal
        .stderr
        .replace(&canonical.display().to_string(), "DATA")
        .replace(&fs.data.display().to_string(), "DATA");
    for word in expected {
        assert!(
            message.contains(word),
            "the refusal does not say {word:?}: {message}"
        );
    }
    assert_eq!(after, before, "{}", describe_changes(&before, &after));

    for (path, bytes) in top_files {
        match bytes {
            Some(bytes) => fs::write(&path, bytes).unwrap(),
            None => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    fs.restart();
    assert_eq!(sha256(&fs.volume("v")), sha256_bytes(&live));
    assert_eq!(sha256(&image(&fs, "v@one")), sha256_bytes(&snapshot));
}

#[test]
fn an_empty_database_refuses_the_mount_and_keeps_every_file() {
    if !require_fuse() {
        return;
    }
    start_is_refused(
        |data| fs::write(data.join("ebsfs.redb"), b"").unwrap(),
        &["ebsfs check", "ebsfs.redb"],
    );
}

#[test]
fn a_missing_database_refuses_the_mount_and_keeps_every_file() {
    if !require_fuse() {
        return;
    }
    start_is_refused(
        |data| fs::remove_file(data.join("ebsfs.redb")).unwrap(),
        &["ebsfs check", "ebsfs.redb"],
    );
}

#[test]
fn a_data_directory_without_its_format_marker_is_refused() {
    if !require_fuse() {
        return;
    }
    start_is_refused(
        // (A data directory of a build without markers has none to remove.)
        |data| {
            let _ = fs::remove_file(data.join("ebsfs.format"));
        },
        &["ebsfs check", "ebsfs.format"],
    );
}

#[test]
fn a_newer_format_is_refused_naming_its_version() {
    if !require_fuse() {
        return;
    }
    start_is_refused(
        |data| fs::write(data.join("ebsfs.format"), "format = 99\n").unwrap(),
        &["99"],
    );
}

// ---------------------------------------------------------------------------------
// 2. A deleted snapshot stays readable through open handles; its space comes back
//    after the last close.
// ---------------------------------------------------------------------------------

/// README's workflow: a snapshot loop-mounted read-only, then `rmdir`ed. Every file
/// still reads back through the loop mount, with no I/O error in the kernel log.
#[test]
fn a_loop_mounted_snapshot_stays_readable_after_rmdir() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("fsv");
    run("truncate", &["-s", "256M", img.to_str().unwrap()]);
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    let live = fs.loop_mount(&img, "live", "");
    let mut files = Vec::new();
    for i in 0..6u64 {
        let bytes = pattern(((i + 1) * 1536 * KIB + 777 * i) as usize, 100 + i);
        let name = format!("file{i}");
        fs::write(live.join(&name), &bytes).unwrap();
        files.push((name, sha256_bytes(&bytes)));
    }
    fs.loop_unmount(&live);
    take_snapshot(&fs, "fsv@ro");
    let snap = fs.loop_mount(&image(&fs, "fsv@ro"), "snap", "ro");
    let source = run(
        "findmnt",
        &[
            OsStr::new("-n"),
            OsStr::new("-o"),
            OsStr::new("SOURCE"),
            snap.as_os_str(),
        ],
    );
    let device = String::from_utf8_lossy(&source.stdout).trim().to_string();
    let loop_name = device.trim_start_matches("/dev/").to_string();
    assert!(
        loop_name.starts_with("loop"),
        "{snap:?} is mounted from {device:?}"
    );
    let kernel_before = kernel_log();

    fs::remove_dir(fs.snapshot("fsv@ro"))
        .unwrap_or_else(|e| panic!("rmdir of a loop-mounted snapshot: {e}\n{}", fs.log()));
    assert!(
        !listed_snapshots(&fs).contains(&"fsv@ro".to_string()),
        "the deleted snapshot is still listed"
    );
    drop_caches();
    let wrong: Vec<String> = files
        .iter()
        .filter_map(|(name, sum)| {
            let read = fs::read(snap.join(name)).map(|b| sha256_bytes(&b));
            (read.as_ref().ok() != Some(sum)).then(|| format!("{name}: {read:?}"))
        })
        .collect();
    let kernel_errors: Vec<String> = kernel_log()
        .difference(&kernel_before)
        .filter(|l| names_device(l, &loop_name) && l.to_lowercase().contains("error"))
        .cloned()
        .collect();
    assert!(
        wrong.is_empty() && kernel_errors.is_empty(),
        "reading through the loop mount after rmdir: {wrong:#?}\nkernel log for {device}: \
         {kernel_errors:#?}\n{}",
        fs.log()
    );
    fs.loop_unmount(&snap);
}

/// A process holds `volume.img` open; after `rmdir`, `pread` on its descriptor
/// returns the snapshot's bytes, up to its end.
#[test]
fn an_open_snapshot_image_keeps_reading_after_rmdir() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let old = pattern(8 * MIB as usize, 21);
    create_volume(&fs, "v", &old);
    take_snapshot(&fs, "v@open");
    let mut holder = Holder::open(&image(&fs, "v@open"));
    fs::remove_dir(fs.snapshot("v@open")).unwrap();
    assert!(!listed_snapshots(&fs).contains(&"v@open".to_string()));
    // The volume moves on: nothing the reads return can come from it.
    write_at(&fs.volume("v"), 0, &pattern(old.len(), 22));
    for (offset, len) in [
        (0, BLOCK as usize),
        (MIB + 123, 200_000),
        (5 * MIB, 4096),
        (8 * MIB - 4096, 4096),
    ] {
        let at = offset as usize;
        assert_eq!(
            holder.read(offset, len),
            Ok(sha256_bytes(&old[at..at + len])),
            "pread({len}, {offset}) on the open image after rmdir\n{}",
            fs.log()
        );
    }
    // A read reaching the end (as `cat` and `cp` make) has the kernel ask for the
    // file's attributes first.
    assert_eq!(
        holder.read(8 * MIB - 4096, 65536),
        Ok(sha256_bytes(&old[old.len() - 4096..])),
        "pread to the end of the open image after rmdir\n{}",
        fs.log()
    );
    holder.close();
}

/// 32 MiB in snapshot `v@old`, all overwritten before `v@new`: `v@old` alone holds
/// them. Opens `v@old`'s image in a python3 process, deletes the snapshot and checks
/// a read. Returns the holder and the bytes allocated in `chunks/` at that point.
fn delete_an_open_snapshot(fs: &Ebsfs) -> (Holder, u64) {
    let old = pattern(32 * MIB as usize, 31);
    create_volume(fs, "v", &old);
    take_snapshot(fs, "v@old");
    write_at(&fs.volume("v"), 0, &pattern(old.len(), 32));
    take_snapshot(fs, "v@new");
    let mut holder = Holder::open(&image(fs, "v@old"));
    fs::remove_dir(fs.snapshot("v@old")).unwrap();
    assert_eq!(
        holder.read(3 * MIB, MIB as usize),
        Ok(sha256_bytes(&old[3 * MIB as usize..4 * MIB as usize])),
        "reading the open image after rmdir\n{}",
        fs.log()
    );
    (holder, chunks_bytes(fs))
}

fn wait_for_space_back(fs: &Ebsfs, before: u64) {
    let started = Instant::now();
    while chunks_bytes(fs) + 24 * MIB > before {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "chunks/ still holds {} of {before} bytes 60s after the last close\n{}",
            chunks_bytes(fs),
            fs.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        sha256(&image(fs, "v@new")),
        sha256_bytes(&pattern(32 * MIB as usize, 32)),
        "the remaining snapshot changed"
    );
}

#[test]
fn a_deleted_snapshot_gives_its_space_back_after_the_last_close() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let (holder, before) = delete_an_open_snapshot(&fs);
    holder.close();
    wait_for_space_back(&fs, before);
}

#[test]
fn a_deleted_snapshot_gives_its_space_back_after_a_kill9_with_it_open() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let (holder, before) = delete_an_open_snapshot(&fs);
    // The daemon dies while the image is open: it never sees the last close.
    fs.kill9();
    drop(holder);
    fs.restart();
    wait_for_space_back(&fs, before);
}

#[test]
fn a_deleted_snapshot_gives_its_space_back_after_a_clean_stop_with_it_open() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let (mut holder, before) = delete_an_open_snapshot(&fs);
    // Asked to stop while the image is open, the daemon detaches the mount and
    // serves the open image until it is closed.
    fs.signal(libc::SIGTERM);
    wait_until("the mount to be detached", Duration::from_secs(30), || {
        mounts_at(&fs.mnt) == 0
    });
    let old = pattern(32 * MIB as usize, 31);
    assert_eq!(
        holder.read(20 * MIB, MIB as usize),
        Ok(sha256_bytes(&old[20 * MIB as usize..21 * MIB as usize])),
        "reading the open image of a deleted snapshot while the daemon stops\n{}",
        fs.log()
    );
    holder.close();
    let status = fs.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "ebsfs exited with {status}\n{}", fs.log());
    fs.restart();
    wait_for_space_back(&fs, before);
}

// ---------------------------------------------------------------------------------
// 3. A damaged per-volume file affects only its volume.
// ---------------------------------------------------------------------------------

/// Volumes `alpha` and `bravo` (with a snapshot); `alpha`'s dirty map is replaced
/// with `damaged` while stopped. The daemon mounts; `bravo` reads back and takes a
/// snapshot; `alpha` fails to open with EIO and the log names it; the damaged file
/// is kept for inspection.
fn a_damaged_dirty_map_affects_only_its_volume(damaged: &[u8]) {
    let mut fs = Ebsfs::start();
    let alpha = create_volume(&fs, "alpha", &pattern(8 * MIB as usize, 41));
    let bravo_bytes = pattern(8 * MIB as usize, 42);
    create_volume(&fs, "bravo", &bravo_bytes);
    take_snapshot(&fs, "bravo@one");
    fs.stop();
    let dirty = volume_file(&fs, alpha, "dirty");
    fs::write(&dirty, damaged).unwrap();
    fs.restart();

    assert_eq!(sha256(&fs.volume("bravo")), sha256_bytes(&bravo_bytes));
    assert_eq!(sha256(&image(&fs, "bravo@one")), sha256_bytes(&bravo_bytes));
    write_at(&fs.volume("bravo"), 2 * MIB, &pattern(MIB as usize, 43));
    take_snapshot(&fs, "bravo@two");
    assert_eq!(
        sha256(&image(&fs, "bravo@two")),
        sha256(&fs.volume("bravo"))
    );

    let alpha_img = fs.volume("alpha");
    assert_errno("open alpha.img", fs::File::open(&alpha_img), libc::EIO);
    assert_errno(
        "open alpha.img for writing",
        fs::OpenOptions::new().write(true).open(&alpha_img),
        libc::EIO,
    );
    assert!(
        log_has(&fs, &["alpha", "damaged"]),
        "no log line names the damaged volume:\n{}",
        fs.log()
    );
    assert!(
        fs::read(&dirty).is_ok_and(|b| b == damaged) || in_lost_found(&fs, damaged),
        "the damaged dirty map is gone"
    );
}

#[test]
fn a_garbage_dirty_map_affects_only_its_volume() {
    if !require_fuse() {
        return;
    }
    a_damaged_dirty_map_affects_only_its_volume(&pattern(4096, 44));
}

#[test]
fn an_empty_dirty_map_affects_only_its_volume() {
    if !require_fuse() {
        return;
    }
    a_damaged_dirty_map_affects_only_its_volume(&[]);
}

#[test]
fn a_stray_capture_file_goes_to_lost_found() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let bytes = pattern(4 * MIB as usize, 45);
    create_volume(&fs, "v", &bytes);
    take_snapshot(&fs, "v@one");
    fs.stop();
    let stray = fs.data.join("captures").join("9-99.set");
    let garbage = pattern(1000, 46);
    fs::write(&stray, &garbage).unwrap();
    fs.restart();
    assert!(
        !stray.exists(),
        "the stray capture file is still in captures/"
    );
    assert!(
        in_lost_found(&fs, &garbage),
        "the stray capture file is not in lost+found/"
    );
    assert_eq!(sha256(&image(&fs, "v@one")), sha256_bytes(&bytes));
    write_at(&fs.volume("v"), MIB, &pattern(MIB as usize, 47));
    take_snapshot(&fs, "v@two");
    assert_eq!(sha256(&image(&fs, "v@two")), sha256(&fs.volume("v")));
}

/// A `kill -9` between a freeze's two renames leaves `<id>.dirty.new` and no
/// `<id>.dirty`: the fresh map is put in place. Here the map left as `.dirty.new`
/// is the one tracking a change, so a map not put in place shows as a lost change.
#[test]
fn a_fresh_dirty_map_left_by_an_interrupted_freeze_is_put_in_place() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let mut bytes = pattern(8 * MIB as usize, 48);
    let id = create_volume(&fs, "v", &bytes);
    take_snapshot(&fs, "v@one");
    // Tracked only by the dirty map.
    let change = pattern(256 * KIB as usize, 49);
    write_at(&fs.volume("v"), 3 * MIB, &change);
    bytes[3 * MIB as usize..][..change.len()].copy_from_slice(&change);
    fs.stop();
    let dirty = volume_file(&fs, id, "dirty");
    let fresh = volume_file(&fs, id, "dirty.new");
    fs::rename(&dirty, &fresh).unwrap();
    fs.restart();

    assert!(
        dirty.exists() && !fresh.exists(),
        "the fresh dirty map was not put in place"
    );
    assert_eq!(sha256(&fs.volume("v")), sha256_bytes(&bytes));
    take_snapshot(&fs, "v@two");
    assert_eq!(
        sha256(&image(&fs, "v@two")),
        sha256_bytes(&bytes),
        "the next snapshot lost a change"
    );
}

// ---------------------------------------------------------------------------------
// 4. A damaged chunk is never reused: a new snapshot stores a fresh copy, which
//    heals the old one.
// ---------------------------------------------------------------------------------

/// Where the known bytes are written again before `v@s2`.
#[derive(Clone, Copy)]
enum Rewrite {
    /// To another block: `v@s2` holds them twice.
    OtherBlock,
    /// To the same block, after other bytes: `v@s2` equals `v@s1`.
    SameBlock,
}

/// Asserts that snapshot `id` reads back as `expected`.
#[track_caller]
fn assert_reads_back(fs: &Ebsfs, id: &str, expected: &[u8], what: &str) {
    assert_eq!(
        read_at(&image(fs, id), 0, expected.len())
            .map(|b| sha256_bytes(&b))
            .ok(),
        Some(sha256_bytes(expected)),
        "{id} {what}\n{}",
        fs.log()
    );
}

/// `known` at block 0 in `v@s1`; one byte of its chunk flipped in the pack while
/// stopped; the same bytes written again (see [`Rewrite`]) before `v@s2`. With
/// `read_first`, `v@s1` is read (EIO) before `v@s2`, so the chunk is already known
/// to be bad; otherwise only the capture can find out.
fn a_damaged_chunk_is_not_reused(read_first: bool, rewrite: Rewrite) {
    let mut fs = Ebsfs::start();
    let known = pattern(BLOCK as usize, 51);
    let mut s1 = vec![0u8; MIB as usize];
    s1[..known.len()].copy_from_slice(&known);
    create_volume(&fs, "v", &s1);
    take_snapshot(&fs, "v@s1");
    fs.stop();
    let pack_path = fs.data.join("chunks").join("pack-00000001.dat");
    let pack = fs::read(&pack_path).unwrap();
    let at = find(&pack, &known).expect("the chunk is stored raw in pack 1");
    let pack_file = fs::OpenOptions::new().write(true).open(&pack_path).unwrap();
    pack_file
        .write_all_at(&[pack[at + 1000] ^ 0xff], (at + 1000) as u64)
        .unwrap();
    drop(pack_file);
    fs.restart();

    if read_first {
        assert_errno(
            "reading v@s1's damaged block",
            read_at(&image(&fs, "v@s1"), 0, BLOCK as usize),
            libc::EIO,
        );
        assert!(
            log_has(&fs, &["ERROR", "chunk"]),
            "no log line reports the damaged chunk:\n{}",
            fs.log()
        );
    }
    let s2 = match rewrite {
        Rewrite::OtherBlock => {
            write_at(&fs.volume("v"), 8 * BLOCK, &known);
            let mut s2 = s1.clone();
            s2[8 * BLOCK as usize..][..known.len()].copy_from_slice(&known);
            s2
        }
        Rewrite::SameBlock => {
            write_at(&fs.volume("v"), 0, &pattern(known.len(), 52));
            write_at(&fs.volume("v"), 0, &known);
            s1.clone()
        }
    };
    take_snapshot(&fs, "v@s2");
    assert_reads_back(&fs, "v@s2", &s2, "does not read back");
    assert_reads_back(&fs, "v@s1", &s1, "was not healed by the fresh copy");
    // The fresh copy is committed: both still read back after a restart.
    fs.stop();
    fs.restart();
    assert_reads_back(&fs, "v@s2", &s2, "does not read back after a restart");
    assert_reads_back(&fs, "v@s1", &s1, "does not read back after a restart");
}

#[test]
fn a_chunk_that_failed_a_read_is_not_reused() {
    if !require_fuse() {
        return;
    }
    a_damaged_chunk_is_not_reused(true, Rewrite::OtherBlock);
}

#[test]
fn a_chunk_that_fails_verification_is_not_reused() {
    if !require_fuse() {
        return;
    }
    a_damaged_chunk_is_not_reused(false, Rewrite::OtherBlock);
}

#[test]
fn a_chunk_that_failed_a_read_is_not_kept_for_a_rewritten_block() {
    if !require_fuse() {
        return;
    }
    a_damaged_chunk_is_not_reused(true, Rewrite::SameBlock);
}

#[test]
fn a_chunk_that_fails_verification_is_not_kept_for_a_rewritten_block() {
    if !require_fuse() {
        return;
    }
    a_damaged_chunk_is_not_reused(false, Rewrite::SameBlock);
}

// ---------------------------------------------------------------------------------
// 5. Missing or truncated files are reported, never recreated.
// ---------------------------------------------------------------------------------

#[test]
fn a_missing_volume_file_is_served_as_damaged_and_not_recreated() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let gone = create_volume(&fs, "gone", &pattern(4 * MIB as usize, 61));
    let kept = pattern(4 * MIB as usize, 62);
    create_volume(&fs, "kept", &kept);
    fs.stop();
    let raw = volume_file(&fs, gone, "raw");
    fs::remove_file(&raw).unwrap();
    fs.restart();

    assert_errno(
        "open gone.img",
        fs::File::open(fs.volume("gone")),
        libc::EIO,
    );
    assert!(!raw.exists(), "the missing volume file was recreated");
    assert_eq!(sha256(&fs.volume("kept")), sha256_bytes(&kept));
    assert!(
        log_has(&fs, &["gone", "damaged"]),
        "no log line names the damaged volume:\n{}",
        fs.log()
    );
}

#[test]
fn a_missing_pack_is_reported_and_not_recreated() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let bytes = pattern(2 * MIB as usize, 63);
    create_volume(&fs, "v", &bytes);
    take_snapshot(&fs, "v@one");
    fs.stop();
    let pack = fs.data.join("chunks").join("pack-00000001.dat");
    fs::remove_file(&pack).unwrap();
    fs.restart();

    assert_errno(
        "reading a snapshot whose pack is missing",
        fs::read(image(&fs, "v@one")),
        libc::EIO,
    );
    assert!(!pack.exists(), "the missing pack was recreated");
    assert_eq!(sha256(&fs.volume("v")), sha256_bytes(&bytes));
    assert!(
        log_has(&fs, &["pack 1", "missing"]),
        "no log line says pack 1 is missing:\n{}",
        fs.log()
    );
}

/// A pack cut in the middle of a snapshot's chunks: the blocks whose chunks are
/// gone read as EIO, every other block reads back, and a warning names the pack.
#[test]
fn a_truncated_pack_fails_only_the_lost_range() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let bytes = pattern(MIB as usize, 64);
    create_volume(&fs, "v", &bytes);
    take_snapshot(&fs, "v@one");
    fs.stop();
    let pack_path = fs.data.join("chunks").join("pack-00000001.dat");
    let pack = fs::read(&pack_path).unwrap();
    let blocks: Vec<&[u8]> = bytes.chunks(BLOCK as usize).collect();
    let offsets: Vec<u64> = blocks
        .iter()
        .map(|b| find(&pack, b).expect("each chunk is stored raw in pack 1") as u64)
        .collect();
    let mut sorted = offsets.clone();
    sorted.sort_unstable();
    let cut = sorted[sorted.len() / 2] + 100;
    fs::OpenOptions::new()
        .write(true)
        .open(&pack_path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    fs.restart();

    let img = image(&fs, "v@one");
    for (block, expected) in blocks.iter().enumerate() {
        let read = read_at(&img, block as u64 * BLOCK, BLOCK as usize);
        if offsets[block] + BLOCK <= cut {
            assert!(
                read.as_ref().is_ok_and(|b| b == expected),
                "block {block} (stored before the cut) reads {:?}",
                read.map(|b| sha256_bytes(&b))
            );
        } else {
            assert_errno(
                &format!("block {block} (stored past the cut)"),
                read,
                libc::EIO,
            );
        }
    }
    assert!(
        log_has(&fs, &["WARN", "pack 1"]),
        "no warning about the truncated pack:\n{}",
        fs.log()
    );
}

// ---------------------------------------------------------------------------------
// 6. A kill -9 during mkdir never makes the data directory unmountable.
// ---------------------------------------------------------------------------------

/// Rounds of write, mkdir, kill -9, restart. A round hits a given window of a few
/// microseconds only now and then: one in about 50 made the old core unmountable
/// (a fresh dirty map created but not yet written), so 30 rounds would miss it half
/// of the time.
const KILL_ROUNDS: u64 = 250;

#[test]
fn kill9_during_mkdir_never_makes_the_data_directory_unmountable() {
    if !require_fuse() {
        return;
    }
    const VOLUME: usize = 32 << 20;
    let mut rng = Rng::from_env("kill9_during_mkdir");
    let mut fs = Ebsfs::start();
    let mut model = pattern(VOLUME, rng.next());
    create_volume(&fs, "v", &model);
    // How long a mkdir takes here: the kills land within that window.
    let started = Instant::now();
    take_snapshot(&fs, "v@warm");
    let mkdir_started = Instant::now();
    mkdir_snapshot(&fs, "v@timed").unwrap();
    let mkdir_micros = mkdir_started.elapsed().as_micros() as u64;
    fs.wait_snapshot("v@timed");
    eprintln!(
        "mkdir takes {mkdir_micros} us (first snapshot {:?})",
        started.elapsed()
    );
    let window = (2 * mkdir_micros).max(2000);
    let mut previous: Option<String> = None;
    for round in 0..KILL_ROUNDS {
        let len = (4 * KIB + rng.below(256 * KIB)) as usize;
        let offset = rng.below((VOLUME - len) as u64) as usize;
        let change = pattern(len, rng.next());
        write_at(&fs.volume("v"), offset as u64, &change);
        model[offset..offset + len].copy_from_slice(&change);
        if let Some(id) = &previous
            && fs.snapshot(id).exists()
        {
            fs.wait_snapshot(id);
        }
        let id = format!("v@s{round}");
        let delay = Duration::from_micros(rng.below(window));
        let dir = fs.snapshot(&id);
        let mkdir = std::thread::spawn(move || fs::create_dir(dir));
        std::thread::sleep(delay);
        fs.kill9();
        let result = mkdir.join().expect("mkdir thread");
        eprintln!("round {round}: kill after {delay:?}, mkdir {result:?}");
        fs.restart();
        previous = Some(id);
    }
    if let Some(id) = &previous
        && fs.snapshot(id).exists()
    {
        fs.wait_snapshot(id);
    }
    assert_eq!(
        sha256(&fs.volume("v")),
        sha256_bytes(&model),
        "fsynced writes were lost"
    );
    take_snapshot(&fs, "v@final");
    assert_eq!(
        sha256(&image(&fs, "v@final")),
        sha256_bytes(&model),
        "the final snapshot differs from the volume\n{}",
        fs.log()
    );
}

// ---------------------------------------------------------------------------------
// 7. After a host crash, the full comparison reads only the data of a sparse volume.
// ---------------------------------------------------------------------------------

/// The first offset where two files differ (either one ending counts), comparing
/// them 4 MiB at a time with direct reads: as exact as comparing their SHA-256, at
/// the speed of the reads (hashing 32 GiB twice, or filling the page cache with it,
/// takes minutes here).
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    const CHUNK: usize = 4 << 20;
    let open = |path: &Path| {
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap_or_else(|e| panic!("open {path:?} with O_DIRECT: {e}"))
    };
    let (a, b) = (open(a), open(b));
    // O_DIRECT wants page-aligned buffers.
    let mut raw = vec![0u8; 2 * CHUNK + 4096];
    let start = raw.as_ptr().align_offset(4096);
    let (buf_a, buf_b) = raw[start..start + 2 * CHUNK].split_at_mut(CHUNK);
    let mut offset = 0u64;
    loop {
        let n = read_full(&a, buf_a, offset);
        let m = read_full(&b, buf_b, offset);
        if n != m || buf_a[..n] != buf_b[..m] {
            let at = buf_a[..n.min(m)]
                .iter()
                .zip(&buf_b[..n.min(m)])
                .position(|(x, y)| x != y)
                .unwrap_or(n.min(m));
            return Some(offset + at as u64);
        }
        if n == 0 {
            return None;
        }
        offset += n as u64;
    }
}

/// Fills `buf` from `file` at `offset` unless the file ends first; returns the
/// bytes read.
fn read_full(file: &fs::File, buf: &mut [u8], offset: u64) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file
            .read_at(&mut buf[filled..], offset + filled as u64)
            .expect("read")
        {
            0 => break,
            n => filled += n,
        }
    }
    filled
}

/// Bytes the process `pid` has read with read(2)-like calls (`rchar`).
fn bytes_read_by(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .expect("read /proc/PID/io")
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar in /proc/PID/io")
}

/// A 32 GiB sparse volume with 6 MiB of data and a completed snapshot; a host
/// crash; the next snapshot compares every block, yet the daemon reads little more
/// than the data (all 32 GiB before).
#[test]
fn after_a_host_crash_a_sparse_volume_is_compared_by_its_data_only() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("big");
    create_volume(&fs, "big", &[]);
    run("truncate", &["-s", "32G", img.to_str().unwrap()]);
    for (i, offset) in [0, 7 * GIB + 3 * MIB, 20 * GIB, 32 * GIB - 2 * MIB]
        .into_iter()
        .enumerate()
    {
        write_at(&img, offset, &pattern(MIB as usize, 70 + i as u64));
    }
    take_snapshot(&fs, "big@before");
    // 1 MiB changed (16 blocks), acknowledged with fsync, then the host goes down.
    write_at(&img, 11 * GIB, &pattern(MIB as usize, 79));
    fs.simulate_host_crash();
    assert!(
        log_has(&fs, &["host crashed"]),
        "the restart did not notice the host crash"
    );

    let read_before = bytes_read_by(fs.pid());
    let started = Instant::now();
    mkdir_snapshot(&fs, "big@after").unwrap();
    assert_eq!(fs.wait_snapshot("big@after"), "completed", "{}", fs.log());
    let took = started.elapsed();
    let read = bytes_read_by(fs.pid()) - read_before;
    eprintln!("capture after the host crash: {took:?}, {read} bytes read by the daemon");
    assert_eq!(
        fs.info_u64("big@after", "changed_blocks"),
        16,
        "the capture missed the change or stored unchanged blocks"
    );
    assert!(
        read < 256 * MIB,
        "the capture read {read} bytes for 6 MiB of data in a 32 GiB volume"
    );

    assert_eq!(
        first_difference(&image(&fs, "big@after"), &img),
        None,
        "the snapshot differs from the volume"
    );
}

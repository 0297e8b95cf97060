//! Snapshots on a real mount: point-in-time contents (with a filesystem and raw),
//! errno of every refused operation, cancellation, persistence, the CLI and metadata.
//! Space accounting is in `snapshot_space.rs`, crashes in `snapshot_crash.rs`.

mod common;
mod snapshot_support;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use snapshot_support::*;

// ---------------------------------------------------------------------------------
// 1. Point in time, with ext4 on the volume.
// ---------------------------------------------------------------------------------

/// How the filesystem on the volume is quiesced before `mkdir`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Quiesce {
    /// `sync` + `fsfreeze -f`, mkdir, `fsfreeze -u`: the filesystem stays mounted.
    Frozen,
    /// The filesystem is unmounted for the mkdir and mounted again right after.
    Unmounted,
}

fn ext4_point_in_time(mode: Quiesce) {
    let mut fs = Ebsfs::start();
    let img = fs.volume("fsvol");
    run("truncate", &["-s", "1G", img.to_str().unwrap()]);
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    let mut live = fs.loop_mount(&img, "live", "");
    // Ballast: enough changed blocks that the capture is still running while the test
    // overwrites A and writes B (checked below), so those writes race the capture.
    write_urandom(&live.join("ballast"), 0, 384);
    let ballast_sum = sha256(&live.join("ballast"));
    let old_a = pattern(3 * MIB as usize + 4097, 1);
    let new_a = pattern(old_a.len(), 2);
    let b = pattern(2 * MIB as usize + 511, 3);
    fs::write(live.join("A"), &old_a).unwrap();
    run("sync", &[] as &[&str]);

    let id = "fsvol@before";
    match mode {
        Quiesce::Frozen => {
            let frozen = Frozen::new(&live);
            mkdir_snapshot(&fs, id).unwrap_or_else(|e| panic!("mkdir {id}: {e}\n{}", fs.log()));
            drop(frozen);
        }
        Quiesce::Unmounted => {
            fs.loop_unmount(&live);
            mkdir_snapshot(&fs, id).unwrap_or_else(|e| panic!("mkdir {id}: {e}\n{}", fs.log()));
            live = fs.loop_mount(&img, "live", "");
        }
    }
    // At once: overwrite A in place (same blocks) and write B, while the capture runs.
    let a = fs::OpenOptions::new()
        .write(true)
        .open(live.join("A"))
        .unwrap();
    a.write_all_at(&new_a, 0).unwrap();
    a.sync_all().unwrap();
    drop(a);
    fs::write(live.join("B"), &b).unwrap();
    run("sync", &[] as &[&str]);
    let status_after_writes = fs.status(id);
    assert_eq!(
        status_after_writes, "pending",
        "precondition: the capture finished before A was overwritten, so this run did not \
         race writes against it (give it more ballast)"
    );

    let status = fs.wait_snapshot(id);
    assert_eq!(status, "completed", "info: {:?}\n{}", fs.info(id), fs.log());
    let snap_img = image(&fs, id);
    assert_eq!(
        fs::metadata(&snap_img).unwrap().len(),
        GIB,
        "snapshot image size"
    );
    // Both ways of quiescing must give a consistent filesystem: e2fsck finds nothing
    // to fix (a frozen ext4 has flushed its journal and cleared needs_recovery).
    let out = try_run("e2fsck", &["-fn", snap_img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "e2fsck -fn on the snapshot image ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A frozen ext4 has flushed its journal and cleared needs_recovery, so a plain
    // read-only mount works without `noload`; no option is needed in either mode.
    let snap = fs.loop_mount(&snap_img, "snap", "ro");
    assert_eq!(
        sha256(&snap.join("A")),
        sha256_bytes(&old_a),
        "snapshot holds a changed A"
    );
    assert!(
        !snap.join("B").exists(),
        "B, written after mkdir, is in the snapshot"
    );
    assert_eq!(
        sha256(&snap.join("ballast")),
        ballast_sum,
        "ballast differs in the snapshot"
    );
    fs.loop_unmount(&snap);

    assert_eq!(
        fs::read(live.join("A")).unwrap(),
        new_a,
        "volume lost the new A"
    );
    assert_eq!(fs::read(live.join("B")).unwrap(), b, "volume lost B");
    fs.loop_unmount(&live);
    let out = try_run("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "e2fsck on the volume: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// ext4 frozen with fsfreeze around the mkdir: the snapshot, mounted read-only,
/// holds A as it was and no B, although both changed while the capture ran.
#[test]
fn ext4_frozen_snapshot_is_point_in_time() {
    if !require_fuse() {
        return;
    }
    ext4_point_in_time(Quiesce::Frozen);
}

/// ext4 unmounted for the mkdir: the snapshot image is e2fsck-clean and holds the
/// old A and no B.
#[test]
fn ext4_unmounted_snapshot_is_point_in_time_and_clean() {
    if !require_fuse() {
        return;
    }
    ext4_point_in_time(Quiesce::Unmounted);
}

// ---------------------------------------------------------------------------------
// 2. Point in time on a raw volume, with writers racing the mkdir and the capture.
// ---------------------------------------------------------------------------------

const PAGE: u64 = 4096;

/// Contents of 4 KiB block `block` at generation `generation`: a header naming both,
/// then bytes derived from them.
fn block_contents(block: u64, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAGE as usize);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&pattern(
        PAGE as usize - 16,
        (block << 24) ^ generation ^ 0xb10c,
    ));
    out
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Writers hammer random 4 KiB blocks (several share each 64 KiB snapshot block)
/// across each mkdir and during the capture. Every block of each snapshot holds the
/// generation acknowledged before mkdir (or the one in flight during it), never one
/// written after mkdir returned.
#[test]
fn raw_volume_snapshot_is_point_in_time_under_concurrent_writes() {
    if !require_fuse() {
        return;
    }
    const SIZE: u64 = 128 * MIB;
    const BLOCKS: u64 = SIZE / PAGE;
    const WRITERS: u64 = 3;
    const ITERATIONS: usize = 4;
    let fs = Ebsfs::start_with("block_size = \"64KiB\"\n");
    let img = fs.volume("raw");
    // Generation 0 of every block, so the first capture has the whole volume to copy.
    {
        let f = fs::File::create(&img).unwrap();
        let mut buf = Vec::with_capacity(MIB as usize);
        for block in 0..BLOCKS {
            buf.extend_from_slice(&block_contents(block, 0));
            if buf.len() as u64 == MIB {
                f.write_all_at(&buf, (block + 1) * PAGE - MIB).unwrap();
                buf.clear();
            }
        }
        f.sync_all().unwrap();
    }
    let issued: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
    let writes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Set while the test checks an image, so the writers do not compete for the CPU.
    let paused = Arc::new(AtomicBool::new(false));
    // Stops the writers if an assertion fails, before the mount goes away under them.
    let _stop_writers = StopOnDrop(stop.clone());
    let mut seeds = Rng::from_env("raw_volume_snapshot_is_point_in_time_under_concurrent_writes");
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (issued, acked, writes, stop, paused) = (
                issued.clone(),
                acked.clone(),
                writes.clone(),
                stop.clone(),
                paused.clone(),
            );
            let img = img.clone();
            let mut rng = Rng::new(seeds.next());
            std::thread::spawn(move || {
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&img)
                    .unwrap();
                // Writer t owns blocks t, t+WRITERS, ...: one write in flight per block.
                while !stop.load(Ordering::Relaxed) {
                    if paused.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    let block = rng.below(BLOCKS / WRITERS) * WRITERS + t;
                    let generation = issued[block as usize].load(Ordering::Relaxed) + 1;
                    issued[block as usize].store(generation, Ordering::SeqCst);
                    if let Err(e) =
                        file.write_all_at(&block_contents(block, generation), block * PAGE)
                    {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        panic!("write of block {block}: {e}");
                    }
                    acked[block as usize].store(generation, Ordering::SeqCst);
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut writes_while_pending = 0;
    let started = Instant::now();
    for iteration in 0..ITERATIONS {
        paused.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        let id = format!("raw@it{iteration}");
        // Acknowledged before mkdir started: must be in the snapshot.
        let low: Vec<u64> = acked.iter().map(|g| g.load(Ordering::SeqCst)).collect();
        mkdir_snapshot(&fs, &id).unwrap_or_else(|e| panic!("mkdir {id}: {e}\n{}", fs.log()));
        // Issued after mkdir returned: must not be in the snapshot.
        let high: Vec<u64> = issued.iter().map(|g| g.load(Ordering::SeqCst)).collect();
        let writes_at_mkdir = writes.load(Ordering::Relaxed);
        let status = fs.wait_snapshot(&id);
        writes_while_pending += writes.load(Ordering::Relaxed) - writes_at_mkdir;
        assert_eq!(
            status,
            "completed",
            "{id}: info {:?}\n{}",
            fs.info(&id),
            fs.log()
        );

        paused.store(true, Ordering::Relaxed);
        eprintln!("{id} completed at {:?}", started.elapsed());
        let snap = fs::read(image(&fs, &id)).unwrap();
        assert_eq!(snap.len() as u64, SIZE, "{id}: image size");
        let mut bad = Vec::new();
        for block in 0..BLOCKS {
            let got = &snap[(block * PAGE) as usize..][..PAGE as usize];
            let named_block = u64::from_le_bytes(got[..8].try_into().unwrap());
            let generation = u64::from_le_bytes(got[8..16].try_into().unwrap());
            let (lo, hi) = (low[block as usize], high[block as usize]);
            let problem = if named_block != block {
                Some(format!("holds the header of block {named_block}"))
            } else if generation < lo {
                Some(format!(
                    "holds generation {generation}, older than {lo} acknowledged before mkdir"
                ))
            } else if generation > hi {
                Some(format!(
                    "holds generation {generation}, written after mkdir returned (newest then: {hi})"
                ))
            } else if got != block_contents(block, generation).as_slice() {
                Some(format!(
                    "header says generation {generation} but the bytes differ"
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                bad.push(format!(
                    "4K block {block} (64K block {}): {problem}",
                    block * PAGE / (64 * KIB)
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{id}: {} of {BLOCKS} blocks are not the point-in-time contents:\n{}",
            bad.len(),
            bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
        eprintln!("{id} checked at {:?}", started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        writes_while_pending > 0,
        "precondition: no write landed while a capture was pending"
    );
    eprintln!(
        "{} writes in total, {writes_while_pending} while a capture was pending",
        writes.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------------------
// 6. Refused operations and their errno.
// ---------------------------------------------------------------------------------

/// mkdir of an unknown volume is ENOENT; malformed names are EINVAL; a part over
/// 64 characters is ENAMETOOLONG; an existing name is EEXIST. Nothing is created.
#[test]
fn mkdir_with_bad_names_or_unknown_volume_fails_with_the_documented_errno() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    fs::write(fs.volume("vol"), pattern(256 * KIB as usize, 7)).unwrap();
    let cases: Vec<(String, i32)> = vec![
        ("nosuch@label".into(), libc::ENOENT),
        ("vol".into(), libc::EINVAL),
        ("vol@".into(), libc::EINVAL),
        ("@label".into(), libc::EINVAL),
        ("vol@a b".into(), libc::EINVAL),
        ("vol@a*b".into(), libc::EINVAL),
        ("vol@a:b".into(), libc::EINVAL),
        ("vol@a@b".into(), libc::EINVAL),
        ("vol@caf\u{e9}".into(), libc::EINVAL),
        ("vol@.hidden".into(), libc::EINVAL),
        (".vol@label".into(), libc::EINVAL),
        ("vol@..".into(), libc::EINVAL),
        (format!("vol@{}", "l".repeat(65)), libc::ENAMETOOLONG),
        (format!("{}@label", "v".repeat(65)), libc::ENAMETOOLONG),
    ];
    for (name, errno) in &cases {
        assert_errno(
            &format!("mkdir snapshots/{name}"),
            mkdir_snapshot(&fs, name),
            *errno,
        );
    }
    assert_eq!(
        listed_snapshots(&fs),
        Vec::<String>::new(),
        "a refused mkdir left an entry"
    );

    // The longest valid label works; an existing name is EEXIST.
    let longest = format!("vol@{}", "L".repeat(64));
    take_snapshot(&fs, &longest);
    take_snapshot(&fs, "vol@a-b_c.1");
    assert_errno(
        "mkdir of an existing snapshot",
        mkdir_snapshot(&fs, "vol@a-b_c.1"),
        libc::EEXIST,
    );
    assert_eq!(
        listed_snapshots(&fs),
        vec![longest, "vol@a-b_c.1".to_string()]
    );
}

/// While a snapshot is pending: its volume.img opens and reads the point-in-time
/// bytes, through a handle and through a read-only loop device, even after the whole
/// volume is overwritten; a second snapshot of the same volume is EBUSY (another
/// volume is not affected), progress is below 100%. Once completed, both work.
#[test]
fn a_pending_snapshot_reads_its_point_in_time_and_a_second_one_is_ebusy() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("busy");
    write_urandom(&img, 0, 384);
    let at_snapshot = fs::read(&img).unwrap();
    fs::write(fs.volume("other"), pattern(MIB as usize, 1)).unwrap();
    mkdir_snapshot(&fs, "busy@one").unwrap();
    let status_at_start = fs.status("busy@one");
    let progress = fs::read_to_string(fs.snapshot("busy@one").join("progress")).unwrap();
    let open_pending = fs::File::open(image(&fs, "busy@one"));
    let loop_dev = LoopDevice::attach(&image(&fs, "busy@one"), false);
    let second = mkdir_snapshot(&fs, "busy@two");
    let other = mkdir_snapshot(&fs, "other@while-busy");
    let status_after = fs.status("busy@one");
    assert_eq!(
        (status_at_start.as_str(), status_after.as_str()),
        ("pending", "pending"),
        "precondition: the capture must still be pending during the checks"
    );
    let pending =
        open_pending.unwrap_or_else(|e| panic!("open volume.img of a pending snapshot: {e}"));
    // Every block changes after the snapshot: the image must not follow.
    write_urandom(&img, 0, 384);
    let mut through_handle = vec![0u8; at_snapshot.len()];
    pending.read_exact_at(&mut through_handle, 0).unwrap();
    assert!(
        through_handle == at_snapshot,
        "the pending image read through a handle is not its point in time"
    );
    assert_eq!(
        sha256(&loop_dev.dev),
        sha256_bytes(&at_snapshot),
        "the pending image read through a loop device is not its point in time"
    );
    loop_dev.detach();
    drop(pending);
    assert_errno(
        "mkdir of a second snapshot while one is pending",
        second,
        libc::EBUSY,
    );
    assert!(
        !fs.snapshot("busy@two").exists(),
        "the refused snapshot is visible"
    );
    let percent: u64 = progress
        .trim()
        .strip_suffix('%')
        .and_then(|p| p.parse().ok())
        .unwrap_or(999);
    assert!(
        percent < 100,
        "progress of a pending snapshot is {progress:?}"
    );
    other.unwrap_or_else(|e| {
        panic!("snapshot of another volume refused while busy@one is pending: {e}")
    });

    assert_eq!(fs.wait_snapshot("busy@one"), "completed");
    assert_eq!(
        fs::read_to_string(fs.snapshot("busy@one").join("progress"))
            .unwrap()
            .trim(),
        "100%"
    );
    assert_eq!(
        sha256(&image(&fs, "busy@one")),
        sha256_bytes(&at_snapshot),
        "completed image differs from the volume at the snapshot"
    );
    take_snapshot(&fs, "busy@two");
    assert_eq!(fs.wait_snapshot("other@while-busy"), "completed");
}

/// Every way of changing a snapshot is EROFS: opening volume.img (or status) for
/// writing, truncating or chmod-ing it, creating or removing files in the directory.
/// The image is unchanged afterwards.
#[test]
fn writes_into_a_snapshot_are_erofs() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("ro");
    fs::write(&img, pattern(4 * MIB as usize + 100, 9)).unwrap();
    take_snapshot(&fs, "ro@s");
    let snap_img = image(&fs, "ro@s");
    let sum = sha256(&snap_img);
    let dir = fs.snapshot("ro@s");

    let open = |write: bool, read: bool, extra: i32| {
        fs::OpenOptions::new()
            .read(read)
            .write(write)
            .custom_flags(extra)
            .open(&snap_img)
    };
    assert_errno(
        "open volume.img O_WRONLY",
        open(true, false, 0),
        libc::EROFS,
    );
    assert_errno("open volume.img O_RDWR", open(true, true, 0), libc::EROFS);
    assert_errno(
        "open volume.img O_WRONLY|O_APPEND",
        open(true, false, libc::O_APPEND),
        libc::EROFS,
    );
    assert_errno(
        "truncate volume.img",
        truncate_path(&snap_img, 0),
        libc::EROFS,
    );
    assert_errno(
        "truncate volume.img larger",
        truncate_path(&snap_img, 8 * MIB),
        libc::EROFS,
    );
    assert_errno(
        "chmod volume.img",
        chmod_path(&snap_img, 0o666),
        libc::EROFS,
    );
    assert_errno(
        "open status for writing",
        fs::OpenOptions::new().write(true).open(dir.join("status")),
        libc::EROFS,
    );
    assert_errno(
        "create a file in the snapshot",
        fs::File::create(dir.join("new.img")),
        libc::EROFS,
    );
    assert_errno(
        "mkdir in the snapshot",
        fs::create_dir(dir.join("sub")),
        libc::EROFS,
    );
    assert_errno("unlink volume.img", fs::remove_file(&snap_img), libc::EROFS);
    assert_errno(
        "set an xattr on volume.img",
        set_xattr(&snap_img, "user.x", b"y"),
        libc::EROFS,
    );

    let meta = fs::metadata(&snap_img).unwrap();
    assert_eq!(meta.len(), 4 * MIB + 100, "size of volume.img changed");
    // 0644 (owner-writable, so that `cp` makes a writable volume), yet read-only.
    assert_eq!(meta.mode() & 0o777, 0o644, "mode of volume.img changed");
    assert_eq!(sha256(&snap_img), sum, "contents of volume.img changed");
    let mut entries: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["changed", "info", "progress", "status", "volume.img"]
    );
}

/// `touch` (or any utime) of a snapshot directory fails with EROFS, logged, and leaves
/// its times alone; chmod (sharing) still works.
#[test]
fn snapshot_directory_times_are_erofs() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    fs::write(fs.volume("t"), b"x").unwrap();
    take_snapshot(&fs, "t@s");
    let dir = fs.snapshot("t@s");
    let before = fs::metadata(&dir).unwrap();
    for args in [
        vec!["touch"],
        vec!["touch", "-d", "2001-01-01"],
        vec!["touch", "-m"],
    ] {
        let mut argv: Vec<&str> = args[1..].to_vec();
        argv.push(dir.to_str().unwrap());
        let out = try_run(args[0], &argv);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
            "touch {argv:?} of a snapshot directory: {}",
            describe_output(&out)
        );
    }
    let after = fs::metadata(&dir).unwrap();
    for (what, old, new) in [
        ("atime", before.atime(), after.atime()),
        ("mtime", before.mtime(), after.mtime()),
    ] {
        assert_eq!(old, new, "{what} of the snapshot directory changed");
    }
    assert!(
        fs.log().contains("the time of snapshot t@s is read-only"),
        "no log line for the refused time change:\n{}",
        fs.log()
    );
    chmod_path(&dir, 0o755).expect("chmod of a snapshot directory");
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o755);
}

// ---------------------------------------------------------------------------------
// 7. rmdir of a pending snapshot cancels it.
// ---------------------------------------------------------------------------------

/// rmdir while pending: the directory disappears at once, and the volume's next
/// snapshot still holds every change since the last completed one (including the
/// blocks the cancelled capture had already copied).
#[test]
fn rmdir_of_a_pending_snapshot_cancels_it_and_loses_no_change() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("cv");
    write_urandom(&img, 0, 32);
    take_snapshot(&fs, "cv@base");
    let base_sum = sha256(&image(&fs, "cv@base"));
    // A large change (also growing the volume), then a capture cancelled part-way.
    write_urandom(&img, 0, 384);
    mkdir_snapshot(&fs, "cv@cancelled").unwrap();
    wait_for_progress(&fs, "cv@cancelled", 20);
    // A write racing the capture (preserved for it, then the capture is dropped).
    write_urandom(&img, 300, 4);
    let progress = fs::read_to_string(fs.snapshot("cv@cancelled").join("progress")).unwrap();
    assert_eq!(
        fs.status("cv@cancelled"),
        "pending",
        "precondition: capture must be pending at rmdir"
    );
    eprintln!("rmdir at progress {}", progress.trim());
    let started = Instant::now();
    fs::remove_dir(fs.snapshot("cv@cancelled"))
        .unwrap_or_else(|e| panic!("rmdir of a pending snapshot: {e}\n{}", fs.log()));
    eprintln!("rmdir of the pending snapshot took {:?}", started.elapsed());
    assert!(
        !fs.snapshot("cv@cancelled").exists(),
        "cancelled snapshot still visible"
    );
    assert_eq!(listed_snapshots(&fs), vec!["cv@base".to_string()]);

    write_urandom(&img, 100, 2);
    take_snapshot(&fs, "cv@next");
    assert_eq!(
        sha256(&image(&fs, "cv@next")),
        sha256(&img),
        "next snapshot misses changes"
    );
    assert_eq!(
        info_str(&fs, "cv@next", "parent").as_deref(),
        Some("cv@base"),
        "the cancelled capture became the next snapshot's parent (did it complete?)"
    );
    assert_eq!(
        sha256(&image(&fs, "cv@base")),
        base_sum,
        "base snapshot changed"
    );
    // The cancelled name is free again.
    take_snapshot(&fs, "cv@cancelled");
    assert_eq!(sha256(&image(&fs, "cv@cancelled")), sha256(&img));
}

// ---------------------------------------------------------------------------------
// 8. Persistence across a clean restart.
// ---------------------------------------------------------------------------------

fn unix_time(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Snapshots, their info and images survive stop + restart; `ls snapshots/` lists
/// them; stat shows the owner's uid and the creation time.
#[test]
fn snapshots_survive_a_clean_restart() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("p");
    write_urandom(&img, 0, 16);
    let t0 = unix_time(SystemTime::now());
    take_snapshot(&fs, "p@one");
    let t1 = unix_time(SystemTime::now());
    // Grows the volume to 18 MiB.
    write_urandom(&img, 16, 2);
    take_snapshot(&fs, "p@two");
    let ids = ["p@one", "p@two"];
    let before: Vec<_> = ids
        .iter()
        .map(|id| {
            (
                fs.info(id),
                sha256(&image(&fs, id)),
                fs::metadata(fs.snapshot(id)).unwrap(),
            )
        })
        .collect();
    let volume_sum = sha256(&img);
    assert_ne!(before[0].1, before[1].1, "the two snapshots should differ");
    // The documented info keys, with the values of this volume.
    for (id, (info, _, _)) in ids.iter().zip(&before) {
        assert_eq!(
            info.get("volume").and_then(|v| v.as_str()),
            Some("p"),
            "{id}: {info:?}"
        );
        let size = if *id == "p@one" { 16 * MIB } else { 18 * MIB };
        assert_eq!(
            info.get("size").and_then(|v| v.as_integer()),
            Some(size as i64),
            "{id}: {info:?}"
        );
        let created = unix_seconds(info["created"].as_str().expect("created"));
        let completed = unix_seconds(
            info.get("completed")
                .and_then(|v| v.as_str())
                .expect("completed"),
        );
        assert!(
            (created..=created + 60).contains(&completed),
            "{id}: completed before created: {info:?}"
        );
        assert!(
            info.get("error").is_none(),
            "{id}: a completed snapshot has an error: {info:?}"
        );
    }
    assert_eq!(
        before[1].0.get("parent").and_then(|v| v.as_str()),
        Some("p@one")
    );

    fs.stop();
    fs.restart();

    let ls = sh(&format!("ls {}", fs.mnt.join("snapshots").display()));
    assert_eq!(
        ls.split_whitespace().collect::<Vec<_>>(),
        ids,
        "ls snapshots/ after restart"
    );
    for (id, (info, sum, meta)) in ids.iter().zip(&before) {
        assert_eq!(fs.status(id), "completed", "{id} status after restart");
        assert_eq!(&fs.info(id), info, "{id} info changed across restart");
        assert_eq!(
            &sha256(&image(&fs, id)),
            sum,
            "{id} image changed across restart"
        );
        let now = fs::metadata(fs.snapshot(id)).unwrap();
        assert!(now.is_dir());
        assert_eq!(now.uid(), 0, "{id} owner uid");
        assert_eq!(
            info.get("owner").and_then(|v| v.as_integer()),
            Some(0),
            "{id} info owner"
        );
        assert_eq!(
            (now.mtime(), now.mtime_nsec()),
            (meta.mtime(), meta.mtime_nsec()),
            "{id} time changed"
        );
        let created = unix_seconds(info["created"].as_str().expect("created"));
        assert!(
            (now.mtime() - created).abs() <= 1,
            "{id}: stat mtime {} is not the creation time in info ({created})",
            now.mtime()
        );
    }
    let created = before[0].2.mtime();
    assert!(
        (t0 - 1..=t1 + 1).contains(&created),
        "creation time {created} outside {t0}..{t1}"
    );
    assert_eq!(sha256(&img), volume_sum, "volume changed across restart");
    // The restarted daemon still takes incremental snapshots on top of them.
    write_urandom(&img, 8, 1);
    take_snapshot(&fs, "p@three");
    assert_eq!(info_str(&fs, "p@three", "parent").as_deref(), Some("p@two"));
    assert_eq!(sha256(&image(&fs, "p@three")), sha256(&img));
}

// ---------------------------------------------------------------------------------
// 9. The CLI.
// ---------------------------------------------------------------------------------

fn cli(fs: &Ebsfs, args: &[&str]) -> std::process::Output {
    let mut all: Vec<&str> = vec!["snapshot"];
    all.extend_from_slice(args);
    all.push("--mount");
    let mnt = fs.mnt.to_str().unwrap();
    all.push(mnt);
    try_run(BIN, &all)
}

/// `ebsfs snapshot create --wait`, `list`, `wait` and `delete` do what they say and
/// exit non-zero on failure.
#[test]
fn cli_creates_lists_waits_for_and_deletes_snapshots() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("cli");
    write_urandom(&img, 0, 8);
    fs::write(fs.volume("big"), b"").unwrap();
    write_urandom(&fs.volume("big"), 0, 256);

    let out = cli(
        &fs,
        &[
            "create",
            "cli",
            "first",
            "--wait",
            "--description",
            "before upgrade",
        ],
    );
    assert!(
        out.status.success(),
        "create --wait: {}",
        describe_output(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("cli@first"),
        "create printed: {}",
        describe_output(&out)
    );
    assert_eq!(
        fs.status("cli@first"),
        "completed",
        "create --wait returned before completion"
    );
    assert_eq!(
        info_str(&fs, "cli@first", "description").as_deref(),
        Some("before upgrade")
    );
    assert_eq!(sha256(&image(&fs, "cli@first")), sha256(&img));

    // Without --wait it returns at once; `wait` then blocks until completed.
    let out = cli(&fs, &["create", "big", "later"]);
    assert!(out.status.success(), "create: {}", describe_output(&out));
    let out = cli(&fs, &["list"]);
    assert!(out.status.success(), "list: {}", describe_output(&out));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let line_of = |name: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("list does not show {name}:\n{listing}"))
            .to_string()
    };
    assert!(
        line_of("cli@first")
            .split_whitespace()
            .any(|w| w == "completed"),
        "{listing}"
    );
    // The last two columns: the host that took it, and where it is kept (no snapshot
    // store here: in the data directory only).
    let header: Vec<&str> = listing.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header[header.len() - 2..],
        ["HOST", "LOCATION"],
        "{listing}"
    );
    let host = info_str(&fs, "cli@first", "host").expect("info names the host");
    let first = line_of("cli@first");
    let words: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(
        words[words.len() - 2..],
        [host.as_str(), "local"],
        "{listing}"
    );
    let big_status = fs.status("big@later");
    if big_status == "pending" {
        assert!(
            line_of("big@later")
                .split_whitespace()
                .any(|w| w == "pending"),
            "{listing}"
        );
    }
    let out = cli(&fs, &["wait", "big@later"]);
    assert!(out.status.success(), "wait: {}", describe_output(&out));
    assert_eq!(
        fs.status("big@later"),
        "completed",
        "wait returned before completion"
    );
    let out = cli(&fs, &["list"]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("big@later") && l.split_whitespace().any(|w| w == "completed")),
        "{listing}"
    );

    // Failures exit non-zero.
    let out = cli(&fs, &["wait", "cli@nosuch"]);
    assert!(
        !out.status.success(),
        "wait on an unknown snapshot: {}",
        describe_output(&out)
    );
    let out = cli(&fs, &["wait", "nosuch@x"]);
    assert!(
        !out.status.success(),
        "wait on an unknown volume: {}",
        describe_output(&out)
    );
    let out = cli(&fs, &["create", "nosuch", "x"]);
    assert!(
        !out.status.success(),
        "create on an unknown volume: {}",
        describe_output(&out)
    );
    let out = cli(&fs, &["create", "cli", "first"]);
    assert!(
        !out.status.success(),
        "create of an existing name: {}",
        describe_output(&out)
    );

    let out = cli(&fs, &["delete", "cli@first"]);
    assert!(out.status.success(), "delete: {}", describe_output(&out));
    assert!(
        !fs.snapshot("cli@first").exists(),
        "deleted snapshot still there"
    );
    let out = cli(&fs, &["list"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("cli@first"),
        "list after delete: {}",
        describe_output(&out)
    );
    let out = cli(&fs, &["delete", "cli@first"]);
    assert!(
        !out.status.success(),
        "second delete: {}",
        describe_output(&out)
    );
}

// ---------------------------------------------------------------------------------
// 10. Metadata copied from the volume.
// ---------------------------------------------------------------------------------

/// user.* attributes of the volume at mkdir time are the snapshot directory's;
/// user.description becomes `description` in info. Later changes to the volume's
/// attributes do not alter an existing snapshot.
#[test]
fn volume_xattrs_propagate_to_the_snapshot() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("tagged");
    fs::write(&img, pattern(MIB as usize, 4)).unwrap();
    set_xattr(&img, "user.product-codes", b"abc").unwrap();
    set_xattr(&img, "user.description", b"nightly db backup").unwrap();
    assert_eq!(get_xattr(&img, "user.product-codes").unwrap(), b"abc");
    let out = run(
        "getfattr",
        &[
            "--only-values",
            "-n",
            "user.product-codes",
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(out.stdout, b"abc", "getfattr on the volume");

    take_snapshot(&fs, "tagged@s1");
    let dir = fs.snapshot("tagged@s1");
    assert_eq!(
        get_xattr(&dir, "user.product-codes").map_err(|e| e.to_string()),
        Ok(b"abc".to_vec())
    );
    let mut names = list_xattr(&dir).unwrap();
    names.sort();
    assert_eq!(names, ["user.description", "user.product-codes"]);
    assert_eq!(
        info_str(&fs, "tagged@s1", "description").as_deref(),
        Some("nightly db backup")
    );

    // Later changes to the volume stay on the volume.
    set_xattr(&img, "user.product-codes", b"xyz").unwrap();
    set_xattr(&img, "user.description", b"changed").unwrap();
    assert_eq!(get_xattr(&dir, "user.product-codes").unwrap(), b"abc");
    assert_eq!(
        info_str(&fs, "tagged@s1", "description").as_deref(),
        Some("nightly db backup")
    );
    take_snapshot(&fs, "tagged@s2");
    assert_eq!(
        get_xattr(&fs.snapshot("tagged@s2"), "user.product-codes").unwrap(),
        b"xyz"
    );
    assert_eq!(
        info_str(&fs, "tagged@s2", "description").as_deref(),
        Some("changed")
    );

    // A volume without attributes gives a snapshot without them.
    fs::write(fs.volume("plain"), b"x").unwrap();
    take_snapshot(&fs, "plain@s");
    assert_errno(
        "getxattr user.product-codes on an untagged snapshot",
        get_xattr(&fs.snapshot("plain@s"), "user.product-codes"),
        libc::ENODATA,
    );
    assert_eq!(info_str(&fs, "plain@s", "description").as_deref(), Some(""));
}

/// setxattr with XATTR_CREATE fails with EEXIST when the attribute exists, with
/// XATTR_REPLACE with ENODATA when it does not, on volumes and snapshot directories
/// alike; a refused call changes nothing.
#[test]
fn setxattr_honours_create_and_replace_flags() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("flags");
    fs::write(&img, b"x").unwrap();
    take_snapshot(&fs, "flags@s");
    for path in [img, fs.snapshot("flags@s")] {
        let on = path.display();
        assert_errno(
            &format!("XATTR_REPLACE of a missing attribute on {on}"),
            set_xattr_flags(&path, "user.tag", b"1", libc::XATTR_REPLACE),
            libc::ENODATA,
        );
        assert_errno(
            &format!("getxattr after a refused XATTR_REPLACE on {on}"),
            get_xattr(&path, "user.tag"),
            libc::ENODATA,
        );
        set_xattr_flags(&path, "user.tag", b"1", libc::XATTR_CREATE)
            .unwrap_or_else(|e| panic!("XATTR_CREATE of a new attribute on {on}: {e}"));
        assert_errno(
            &format!("XATTR_CREATE of an existing attribute on {on}"),
            set_xattr_flags(&path, "user.tag", b"2", libc::XATTR_CREATE),
            libc::EEXIST,
        );
        assert_eq!(
            get_xattr(&path, "user.tag").unwrap(),
            b"1",
            "a refused XATTR_CREATE changed the value on {on}"
        );
        set_xattr_flags(&path, "user.tag", b"3", libc::XATTR_REPLACE)
            .unwrap_or_else(|e| panic!("XATTR_REPLACE of an existing attribute on {on}: {e}"));
        assert_eq!(get_xattr(&path, "user.tag").unwrap(), b"3", "on {on}");
    }
}

/// Many long user.* names: setxattr fails with ENOSPC (and a log line saying why) once
/// the names would pass what listxattr can return (64 KiB), so listxattr keeps working
/// on the volume and on its snapshots. The values' total is capped the same way.
#[test]
fn xattr_space_is_capped_so_listxattr_always_works() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("tags");
    fs::write(&img, b"x").unwrap();
    // 255-byte names: 256 bytes each in the list, with the NUL.
    let name = |i: usize| format!("user.{i:0>250}");
    let mut accepted = 0;
    let refused = loop {
        assert!(
            accepted <= 300,
            "{accepted} names of 256 bytes accepted: over 64 KiB of names"
        );
        match set_xattr(&img, &name(accepted), b"") {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(
        refused.raw_os_error(),
        Some(libc::ENOSPC),
        "setxattr past the cap failed with {refused}"
    );
    assert_eq!(accepted, 256, "names accepted before the cap");
    assert!(
        fs.log().contains("no room for attribute"),
        "no log line says why setxattr was refused:\n{}",
        fs.log()
    );
    assert_eq!(list_xattr(&img).expect("listxattr at the cap").len(), 256);
    run("getfattr", &[Path::new("-d"), &img]);

    take_snapshot(&fs, "tags@s");
    let dir = fs.snapshot("tags@s");
    assert_eq!(
        list_xattr(&dir).expect("listxattr of the snapshot").len(),
        256
    );
    assert_errno(
        "a new attribute on a snapshot at the cap",
        set_xattr(&dir, "user.more", b""),
        libc::ENOSPC,
    );

    let values = fs.volume("values");
    fs::write(&values, b"x").unwrap();
    assert_errno(
        "a value over 64 KiB",
        set_xattr(&values, "user.huge", &vec![1u8; 64 * KIB as usize + 1]),
        libc::E2BIG,
    );
    set_xattr(&values, "user.big", &vec![1u8; 64 * KIB as usize]).expect("a 64 KiB value");
    assert_errno(
        "another value once 64 KiB of values are stored",
        set_xattr(&values, "user.more", b"1"),
        libc::ENOSPC,
    );
    assert_eq!(list_xattr(&values).unwrap(), ["user.big"]);
}

/// `changed` lists the byte ranges a snapshot changed since its parent, and
/// `ebsfs snapshot diff` adds them up between any two snapshots, as text and JSON.
#[test]
fn changed_and_snapshot_diff_list_the_ranges_written_in_between() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("d");
    write_urandom(&img, 0, 4);
    take_snapshot(&fs, "d@one");
    let file = fs::OpenOptions::new().write(true).open(&img).unwrap();
    file.write_all_at(&pattern(100, 3), MIB + 10).unwrap();
    drop(file);
    take_snapshot(&fs, "d@two");
    write_urandom(&img, 3, 2);
    take_snapshot(&fs, "d@three");
    let block = 64 * KIB;
    assert_eq!(
        fs::read_to_string(fs.snapshot("d@one").join("changed")).unwrap(),
        format!("0 {}\n", 4 * MIB),
        "the first snapshot changed all its data"
    );
    assert_eq!(
        fs::read_to_string(fs.snapshot("d@two").join("changed")).unwrap(),
        format!("{MIB} {block}\n")
    );
    assert_eq!(
        fs::read_to_string(fs.snapshot("d@three").join("changed")).unwrap(),
        format!("{} {}\n", 3 * MIB, 2 * MIB)
    );
    let diff = |args: &[&str]| {
        let mut all = vec!["snapshot", "diff"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--mount", fs.mnt.to_str().unwrap()]);
        try_run(BIN, &all)
    };
    let out = diff(&["d@one", "d@three"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{MIB} {block}\n{} {}\n", 3 * MIB, 2 * MIB)
    );
    let out = diff(&["d@one", "d@three", "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "[{{\"offset\": {MIB}, \"length\": {block}}}, {{\"offset\": {}, \"length\": {}}}]\n",
            3 * MIB,
            2 * MIB
        )
    );
    let out = diff(&["d@three", "d@one"]);
    assert!(
        !out.status.success(),
        "diff from a newer snapshot succeeded"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an earlier snapshot"),
        "{}",
        describe_output(&out)
    );
}

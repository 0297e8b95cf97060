//! Volumes made from snapshots, on a real mount with real tools: `cp` of a snapshot
//! image is an equal copy that costs no space, ext4 on a copy leaves its snapshot
//! untouched, a copy outlives its source snapshot, a `kill -9` mid-hydration loses
//! nothing, a copy's snapshots are incremental against its source, the CLI, holes in
//! snapshot images, partial copies, reads of a copy through a loop device, and copies
//! longer than one of the kernel's `copy_file_range` requests.
//!
//! Timings are printed, never asserted (machines are noisy).

mod common;
mod snapshot_support;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use snapshot_support::*;

const BLOCK: u64 = 64 * KIB;

// ---------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------

/// `ebsfs volume ARGS --mount MNT`.
fn volume_cli(fs: &Ebsfs, args: &[&str]) -> std::process::Output {
    let mut all = vec!["volume"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--mount", fs.mnt.to_str().unwrap()]);
    try_run(BIN, &all)
}

/// `e2fsck -fn` on an image, panicking with its output unless it is clean.
fn assert_fsck_clean(img: &Path) {
    let out = try_run("e2fsck", &[OsStr::new("-fn"), img.as_os_str()]);
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}",
        img.display(),
        describe_output(&out)
    );
}

/// `pwrite` + `fdatasync` on a volume.
fn write_synced(path: &Path, offset: u64, bytes: &[u8]) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset)
        .unwrap_or_else(|e| panic!("write at {offset} of {}: {e}", path.display()));
    file.sync_data().unwrap();
}

/// Copies a snapshot image to a scratch file outside the mount (holes stay holes).
fn scratch_copy(fs: &Ebsfs, id: &str, name: &str) -> PathBuf {
    let copy = fs.scratch(name);
    run(
        "cp",
        &[
            OsStr::new("--sparse=always"),
            image(fs, id).as_os_str(),
            copy.as_os_str(),
        ],
    );
    copy
}

// ---------------------------------------------------------------------------------
// 1. cp makes an equal, instant, space-free copy.
// ---------------------------------------------------------------------------------

/// `cp` of a snapshot image into `volumes/`: the copy equals the snapshot, takes no
/// space, is writable by its creator, and says where it came from (`volume list`,
/// `user.ebsfs.source`), which nobody can change.
#[test]
fn cp_of_a_snapshot_image_is_an_equal_copy_that_takes_no_space() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start_with("hydrate = false\n");
    let data_bytes = 256 * MIB;
    random_volume(&fs, "src", 1024, 64, data_bytes / MIB);
    // Zeros written explicitly, next to never-written holes.
    run(
        "dd",
        &[
            "if=/dev/zero".to_string(),
            format!("of={}", fs.volume("src").display()),
            "bs=1M".into(),
            "count=4".into(),
            "seek=600".into(),
            "conv=notrunc".into(),
            "status=none".into(),
        ],
    );
    take_snapshot(&fs, "src@s");
    let source_sum = sha256(&fs.volume("src"));

    let du_before = du_bytes(&fs.data);
    cp_image(&fs, "src@s", "copy");
    let du_after = du_bytes(&fs.data);
    let growth = du_after.saturating_sub(du_before);
    eprintln!(
        "data directory: {du_before} bytes before the cp, {du_after} after (+{growth} bytes, \
         {:.4}% of the data)",
        growth as f64 * 100.0 / data_bytes as f64
    );
    assert!(
        growth < data_bytes / 100,
        "cp of a snapshot grew the data directory by {growth} bytes (data: {data_bytes})"
    );

    let copy = fs.volume("copy");
    assert_eq!(fs::metadata(&copy).unwrap().len(), GIB, "size of the copy");
    let copy_sum = sha256(&copy);
    assert_eq!(copy_sum, sha256(&image(&fs, "src@s")), "copy vs snapshot");
    assert_eq!(copy_sum, source_sum, "copy vs its source volume");
    eprintln!(
        "after reading the whole copy: data directory +{} bytes",
        du_bytes(&fs.data).saturating_sub(du_before)
    );

    let mode = fs::metadata(&copy).unwrap().permissions().mode();
    assert_ne!(
        mode & 0o200,
        0,
        "copy is mode {mode:o}: its owner cannot write"
    );
    write_synced(&copy, 0, b"writable");
    assert_eq!(read_range(&copy, 0, 8), b"writable");

    let out = volume_cli(&fs, &["list"]);
    assert!(
        out.status.success(),
        "volume list: {}",
        describe_output(&out)
    );
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{listing}");
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some("copy"))
        .unwrap_or_else(|| panic!("volume list has no line for copy:\n{listing}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(
        fields.contains(&"src@s"),
        "volume list does not name the source of copy: {line}"
    );
    let hydrated = fields.last().unwrap();
    assert!(
        hydrated
            .strip_suffix('%')
            .is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n <= 100)),
        "volume list shows no hydrated percentage for copy: {line}"
    );

    let out = run(
        "getfattr",
        &[
            OsStr::new("--only-values"),
            OsStr::new("-n"),
            OsStr::new("user.ebsfs.source"),
            copy.as_os_str(),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "src@s");
    let out = try_run(
        "setfattr",
        &[
            OsStr::new("-n"),
            OsStr::new("user.ebsfs.source"),
            OsStr::new("-v"),
            OsStr::new("other@x"),
            copy.as_os_str(),
        ],
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not permitted"),
        "setfattr -n user.ebsfs.source: {}",
        describe_output(&out)
    );
    assert_errno(
        "setxattr user.ebsfs.source",
        set_xattr(&copy, "user.ebsfs.source", b"other@x"),
        libc::EPERM,
    );
    assert_errno(
        "setxattr user.ebsfs.hydrated",
        set_xattr(&copy, "user.ebsfs.hydrated", b"100%"),
        libc::EPERM,
    );
    assert_eq!(get_xattr(&copy, "user.ebsfs.source").unwrap(), b"src@s");
}

// ---------------------------------------------------------------------------------
// 2. ext4 on a clone.
// ---------------------------------------------------------------------------------

/// ext4 on a copy of a snapshot: the files are there, heavy writes and deletions
/// leave a clean filesystem, and the snapshot's image and files are untouched.
#[test]
fn ext4_on_a_clone_is_writable_and_leaves_its_snapshot_untouched() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let original = ext4_volume_with_tree(&mut fs, "base", "1G");
    take_snapshot(&fs, "base@fs");
    let snap_sum = sha256(&image(&fs, "base@fs"));

    cp_image(&fs, "base@fs", "clone");
    let clone = fs.volume("clone");
    let dir = fs.loop_mount(&clone, "clone", "");
    let found = tree_sums(&dir);
    assert!(
        found == original,
        "files on the clone: {}",
        tree_diff(&original, &found)
    );

    // Heavy writes: fio (verified), new files, an overwrite, deletions.
    let start = Instant::now();
    let out = try_run(
        "fio",
        &[
            "--name=heavy".to_string(),
            format!("--directory={}", dir.display()),
            "--rw=randwrite".into(),
            "--bsrange=4k-1m".into(),
            "--size=96m".into(),
            "--numjobs=2".into(),
            "--ioengine=psync".into(),
            "--direct=1".into(),
            "--verify=crc32c".into(),
            // No verify state files left in the working directory.
            "--verify_state_save=0".into(),
            "--fsync_on_close=1".into(),
            "--group_reporting".into(),
        ],
    );
    assert!(
        out.status.success(),
        "fio on the clone: {}",
        describe_output(&out)
    );
    fs::create_dir_all(dir.join("new")).unwrap();
    for i in 0..4 {
        write_urandom(&dir.join(format!("new/big{i}")), 0, 32);
    }
    run(
        "dd",
        &[
            "if=/dev/urandom".to_string(),
            format!("of={}", dir.join("d2/f3").display()),
            "bs=4k".into(),
            "count=100".into(),
            "seek=3".into(),
            "conv=notrunc".into(),
            "status=none".into(),
        ],
    );
    fs::remove_dir_all(dir.join("d1")).unwrap();
    fs::remove_file(dir.join("d4/f0")).unwrap();
    run("sync", &[] as &[&str]);
    eprintln!(
        "heavy writes on the clone: {:.1} s (hydrated {}% now)",
        start.elapsed().as_secs_f64(),
        hydrated_percent(&clone)
    );
    let expected = tree_sums(&dir);
    fs.loop_unmount(&dir);
    assert_fsck_clean(&clone);
    let dir = fs.loop_mount(&clone, "clone", "");
    let found = tree_sums(&dir);
    assert!(
        found == expected,
        "files on the clone after a remount: {}",
        tree_diff(&expected, &found)
    );
    fs.loop_unmount(&dir);

    assert_eq!(
        sha256(&image(&fs, "base@fs")),
        snap_sum,
        "the snapshot's image changed"
    );
    let snap = fs.loop_mount(&image(&fs, "base@fs"), "snap", "ro");
    let found = tree_sums(&snap);
    assert!(
        found == original,
        "files of the snapshot: {}",
        tree_diff(&original, &found)
    );
    fs.loop_unmount(&snap);
}

// ---------------------------------------------------------------------------------
// 3. Deleting the source mid-hydration.
// ---------------------------------------------------------------------------------

/// A copy outlives its source snapshot (and the source volume), hydrates after a
/// restart with hydration on, and its deletion gives the snapshot's space back.
#[test]
fn deleting_the_source_snapshot_mid_hydration_keeps_the_clone_whole() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start_with("hydrate = false\n");
    let data_bytes = 256 * MIB;
    random_volume(&fs, "src", 512, 32, data_bytes / MIB);
    take_snapshot(&fs, "src@s");
    let sum = sha256(&image(&fs, "src@s"));
    cp_image(&fs, "src@s", "clone");
    let clone = fs.volume("clone");
    assert_eq!(hydrated_percent(&clone), 0, "hydrated with hydrate = false");

    fs::remove_dir(fs.snapshot("src@s")).expect("rmdir of the clone's source snapshot");
    assert!(
        !listed_snapshots(&fs).contains(&"src@s".to_string()),
        "snapshots/ still lists src@s"
    );
    // The source volume goes too: only the clone holds the snapshot's blocks now.
    fs::remove_file(fs.volume("src")).unwrap();
    eprintln!(
        "source of the clone after the rmdir: {:?}",
        String::from_utf8_lossy(&get_xattr(&clone, "user.ebsfs.source").unwrap())
    );
    assert_eq!(sha256(&clone), sum, "clone after rmdir of its source");

    fs.stop();
    fs::write(&fs.config, "hydrate = true\n").unwrap();
    fs.restart();
    assert_eq!(sha256(&clone), sum, "clone after a restart");
    wait_hydrated(&fs, "clone");
    assert_eq!(sha256(&clone), sum, "clone once hydrated");

    let chunks_before = chunks_bytes(&fs);
    eprintln!("chunks/ with the clone: {chunks_before} bytes");
    assert!(
        chunks_before >= data_bytes,
        "the source's chunks are gone while a clone may still need them"
    );
    fs::remove_file(&clone).unwrap();
    let mut chunks_after = chunks_before;
    wait_until(
        "the deleted snapshot's space to come back",
        Duration::from_secs(120),
        || {
            chunks_after = chunks_bytes(&fs);
            chunks_after < chunks_before - data_bytes * 9 / 10
        },
    );
    eprintln!("chunks/ after deleting the clone: {chunks_after} bytes");
}

// ---------------------------------------------------------------------------------
// 4. kill -9 mid-hydration.
// ---------------------------------------------------------------------------------

/// Writes to a clone (offset, bytes) before hydration begins: a whole block in the
/// middle of the data, part of a block in the zeros past it.
fn early_writes(data_bytes: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (data_bytes / 2 / BLOCK * BLOCK, pattern(BLOCK as usize, 41)),
        (data_bytes + 3 * BLOCK + 17, pattern(5000, 42)),
    ]
}

/// Writes once hydration is under way: part of a block and across a block boundary
/// near the start (hydrated by then), part of a block near the end of the data (not
/// yet).
fn late_writes(data_bytes: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (5 * BLOCK + 123, pattern(1000, 43)),
        (9 * BLOCK - 700, pattern(1500, 44)),
        (data_bytes - 2 * BLOCK + 999, pattern(3000, 45)),
    ]
}

/// `kill -9` while a clone hydrates: after a restart the clone equals the snapshot
/// plus the fdatasync'd writes made before the kill, and hydration finishes.
#[test]
fn kill9_mid_hydration_loses_nothing_and_hydration_resumes() {
    if !require_fuse() {
        return;
    }
    let mut data_mib = 512;
    let (mut fs, writes, percent) = loop {
        let fs = Ebsfs::start();
        random_volume(&fs, "src", 2 * data_mib, 0, data_mib);
        take_snapshot(&fs, "src@s");
        cp_image(&fs, "src@s", "clone");
        let clone = fs.volume("clone");
        let mut writes = early_writes(data_mib * MIB);
        for (offset, bytes) in &writes {
            write_synced(&clone, *offset, bytes);
        }
        wait_until("hydration to begin", HYDRATE_TIMEOUT, || {
            hydrated_percent(&clone) >= 2
        });
        writes.extend(late_writes(data_mib * MIB));
        for (offset, bytes) in &writes[2..] {
            write_synced(&clone, *offset, bytes);
        }
        let percent = hydrated_percent(&clone);
        if percent < 100 {
            break (fs, writes, percent);
        }
        assert!(
            data_mib < 2048,
            "precondition: hydration of {data_mib} MiB finished before the kill"
        );
        eprintln!("hydration of {data_mib} MiB finished before the kill: again, bigger");
        data_mib *= 2;
    };
    fs.kill9();
    eprintln!("killed with the clone ({data_mib} MiB of data) {percent}% hydrated");

    fs.restart();
    let expected = scratch_copy(&fs, "src@s", "expected");
    let file = fs::OpenOptions::new().write(true).open(&expected).unwrap();
    for (offset, bytes) in &writes {
        file.write_all_at(bytes, *offset).unwrap();
    }
    drop(file);
    let expected_sum = sha256(&expected);
    let clone = fs.volume("clone");
    let after_restart = hydrated_percent(&clone);
    eprintln!("after the restart: {after_restart}% hydrated");
    for (offset, bytes) in &writes {
        assert!(
            read_range(&clone, *offset, bytes.len()) == *bytes,
            "the write at {offset} ({} bytes) was lost",
            bytes.len()
        );
    }
    assert_eq!(
        sha256(&clone),
        expected_sum,
        "clone after kill -9 and restart"
    );
    wait_hydrated(&fs, "clone");
    assert_eq!(sha256(&clone), expected_sum, "clone once hydrated");
}

// ---------------------------------------------------------------------------------
// 5. Incremental lineage.
// ---------------------------------------------------------------------------------

/// Writes 16 MiB of random data to a clone at block-aligned offsets and snapshots it
/// twice: hydrated first (`hydrate` on) or reading from its snapshot (off).
fn clone_snapshots_are_incremental(hydrate: bool) {
    let fs = Ebsfs::start_with(&format!("hydrate = {hydrate}\n"));
    random_volume(&fs, "src", 512, 0, 256);
    take_snapshot(&fs, "src@s");
    cp_image(&fs, "src@s", "clone");
    let clone = fs.volume("clone");
    if hydrate {
        // Hydration copies every block into the clone: none of that is a change.
        wait_hydrated(&fs, "clone");
    }

    let mut rng = Rng::from_env(&format!(
        "clone_snapshots_are_incremental(hydrate = {hydrate})"
    ));
    let new_bytes = 16 * MIB;
    let blocks = rng.distinct((new_bytes / BLOCK) as usize, 512 * MIB / BLOCK);
    let file = fs::OpenOptions::new().write(true).open(&clone).unwrap();
    for &block in &blocks {
        let bytes = pattern(BLOCK as usize, rng.next());
        file.write_all_at(&bytes, block * BLOCK).unwrap();
    }
    file.sync_data().unwrap();
    drop(file);

    take_snapshot(&fs, "clone@one");
    let stored = fs.info_u64("clone@one", "stored_bytes");
    eprintln!(
        "clone@one: {} changed blocks, {stored} bytes stored for {new_bytes} bytes written",
        fs.info_u64("clone@one", "changed_blocks")
    );
    assert!(
        stored <= new_bytes * 105 / 100,
        "the clone's first snapshot stored {stored} bytes for {new_bytes} written"
    );
    assert_eq!(
        info_str(&fs, "clone@one", "parent").as_deref(),
        Some("src@s"),
        "parent of the clone's first snapshot"
    );
    assert_eq!(
        sha256(&image(&fs, "clone@one")),
        sha256(&clone),
        "clone@one vs the clone"
    );

    // In the source's data, in a block the first writes may have missed.
    write_synced(&clone, 100 * MIB + 3 * BLOCK + 4096, &pattern(4096, 7));
    take_snapshot(&fs, "clone@two");
    let stored = fs.info_u64("clone@two", "stored_bytes");
    eprintln!("clone@two: {stored} bytes stored for a 4 KiB write");
    assert!(
        stored <= BLOCK,
        "a 4 KiB change stored {stored} bytes (block: {BLOCK})"
    );
    assert_eq!(fs.info_u64("clone@two", "changed_blocks"), 1);
    assert_eq!(
        info_str(&fs, "clone@two", "parent").as_deref(),
        Some("clone@one")
    );
    assert_eq!(
        sha256(&image(&fs, "clone@two")),
        sha256(&clone),
        "clone@two vs the clone"
    );
}

/// A hydrated clone's first snapshot stores only what was written to it (its parent
/// is the source snapshot), and the next one only the next change.
#[test]
fn a_hydrated_clones_snapshots_are_incremental_against_its_source() {
    if !require_fuse() {
        return;
    }
    clone_snapshots_are_incremental(true);
}

/// The same for a clone that still reads its unwritten blocks from the snapshot.
#[test]
fn an_unhydrated_clones_snapshots_are_incremental_against_its_source() {
    if !require_fuse() {
        return;
    }
    clone_snapshots_are_incremental(false);
}

// ---------------------------------------------------------------------------------
// 6. The CLI.
// ---------------------------------------------------------------------------------

/// `ebsfs volume create --from`: an equal copy, grown with zeros by `--size`; a
/// smaller `--size`, a missing snapshot or an existing name fail with exit 1 and
/// leave nothing behind or changed; an invalid name exits 2.
#[test]
fn volume_create_from_a_snapshot_on_the_command_line() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    random_volume(&fs, "v", 64, 8, 32);
    take_snapshot(&fs, "v@s");
    let snap_sum = sha256(&image(&fs, "v@s"));

    let out = volume_cli(&fs, &["create", "c", "--from", "v@s"]);
    assert!(
        out.status.success(),
        "volume create: {}",
        describe_output(&out)
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("volume create c: {said}");
    assert!(
        said.contains(" ms"),
        "volume create printed no time: {said}"
    );
    assert_eq!(sha256(&fs.volume("c")), snap_sum, "c vs v@s");

    let out = volume_cli(&fs, &["create", "big", "--from", "v@s", "--size", "96MiB"]);
    assert!(
        out.status.success(),
        "create --size: {}",
        describe_output(&out)
    );
    let big = fs.volume("big");
    assert_eq!(fs::metadata(&big).unwrap().len(), 96 * MIB, "size of big");
    assert!(
        read_range(&big, 0, 64 * MIB as usize) == fs::read(image(&fs, "v@s")).unwrap(),
        "big does not start with the snapshot"
    );
    assert!(
        read_range(&big, 64 * MIB, 32 * MIB as usize)
            .iter()
            .all(|&b| b == 0),
        "big is not zeros past the snapshot's end"
    );

    // (arguments, the volume it must not leave, a word its message must hold)
    let refusals: [(&[&str], &str, &str); 3] = [
        (
            &["create", "small", "--from", "v@s", "--size", "32MiB"],
            "small",
            "smaller",
        ),
        (
            &["create", "lost", "--from", "v@missing"],
            "lost",
            "v@missing",
        ),
        (
            &["create", "orphan", "--from", "gone@s"],
            "orphan",
            "gone@s",
        ),
    ];
    for (args, name, word) in refusals {
        let out = volume_cli(&fs, args);
        eprint!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            describe_output(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(word),
            "{args:?}: the message does not say {word:?}: {}",
            describe_output(&out)
        );
        assert!(
            !fs.volume(name).exists(),
            "{args:?} left volume {name} behind"
        );
    }

    let out = volume_cli(&fs, &["create", "c", "--from", "v@s"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "create over c: {}",
        describe_output(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists"),
        "create over c: {}",
        describe_output(&out)
    );
    assert_eq!(
        sha256(&fs.volume("c")),
        snap_sum,
        "c after a refused create"
    );

    for args in [
        &["create", "bad/name", "--from", "v@s"][..],
        &["create", ".hidden", "--from", "v@s"],
        &["create", "fine", "--from", "no-at-sign"],
    ] {
        let out = volume_cli(&fs, args);
        eprint!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            describe_output(&out)
        );
    }
    assert_eq!(
        fs.names_in("volumes"),
        ["big.img", "c.img", "v.img"],
        "volumes left"
    );
}

// ---------------------------------------------------------------------------------
// 7. Holes.
// ---------------------------------------------------------------------------------

/// Lists the data extents of a file with `SEEK_DATA`/`SEEK_HOLE`, as `start end` lines.
const EXTENTS: &str = r#"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
at = 0
while at < size:
    try:
        start = os.lseek(fd, at, os.SEEK_DATA)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        break
    end = os.lseek(fd, start, os.SEEK_HOLE)
    print(start, end)
    at = end
try:
    os.lseek(fd, size, os.SEEK_DATA)
    print("no ENXIO at the end")
except OSError as e:
    print("end", errno.errorcode[e.errno])
"#;

/// A snapshot image of a sparse volume reports its written blocks as data and the
/// rest (never written, or zeros) as holes; `cp --sparse=always` and `qemu-img
/// convert` of it give equal, small files.
#[test]
fn snapshot_images_report_holes_so_sparse_copies_stay_small() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("sparse");
    run("truncate", &["-s1G", &path_str(&img)]);
    write_urandom(&img, 0, 8);
    write_urandom(&img, 100, 3);
    write_urandom(&img, 512, 16);
    // Zeros written over the middle of the last extent: a hole in the image.
    write_synced(&img, 516 * MIB, &vec![0u8; 2 * MIB as usize]);
    // One byte: its whole block is data.
    write_synced(&img, 700 * MIB + 5, b"x");
    take_snapshot(&fs, "sparse@s");
    let expected: Vec<(u64, u64)> = vec![
        (0, 8 * MIB),
        (100 * MIB, 103 * MIB),
        (512 * MIB, 516 * MIB),
        (518 * MIB, 528 * MIB),
        (700 * MIB, 700 * MIB + BLOCK),
    ];
    let data_bytes: u64 = expected.iter().map(|(s, e)| e - s).sum();
    let snap = image(&fs, "sparse@s");

    let out = run(
        "python3",
        &[OsStr::new("-c"), OsStr::new(EXTENTS), snap.as_os_str()],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("extents of the snapshot image:\n{text}");
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.pop(), Some("end ENXIO"), "SEEK_DATA at the end");
    let found: Vec<(u64, u64)> = lines
        .iter()
        .map(|l| {
            let (s, e) = l.split_once(' ').unwrap();
            (s.parse().unwrap(), e.parse().unwrap())
        })
        .collect();
    assert_eq!(found, expected, "data extents of the snapshot image");

    let sum = sha256(&snap);
    let start = Instant::now();
    let copy = scratch_copy(&fs, "sparse@s", "sparse-copy.img");
    let cp_time = start.elapsed();
    let du = du_bytes(&copy);
    eprintln!(
        "cp --sparse=always: {:.1} ms, {du} bytes allocated for {data_bytes} bytes of data",
        cp_time.as_secs_f64() * 1000.0
    );
    assert_eq!(sha256(&copy), sum, "cp --sparse=always of the image");
    assert!(
        (data_bytes - BLOCK..=data_bytes + MIB).contains(&du),
        "cp --sparse=always allocated {du} bytes for {data_bytes} bytes of data"
    );

    let converted = fs.scratch("converted.img");
    let start = Instant::now();
    run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            snap.as_os_str(),
            converted.as_os_str(),
        ],
    );
    eprintln!(
        "qemu-img convert: {:.1} ms, {} bytes allocated",
        start.elapsed().as_secs_f64() * 1000.0,
        du_bytes(&converted)
    );
    assert_eq!(sha256(&converted), sum, "qemu-img convert of the image");
}

// ---------------------------------------------------------------------------------
// 8. Partial and unaligned copies.
// ---------------------------------------------------------------------------------

/// For each case `name off_in off_out len prefill_len [target]`: `copy_file_range`
/// from the image (argv[1]) into a new volume `name` (or into existing volume
/// `target`), and the same copy done by read + write into a scratch file; then both
/// grown by 200000 bytes. Prints `name sha_volume sha_reference` twice per case
/// (copied, grown).
const PARTIAL_COPIES: &str = r#"
import hashlib, os, sys
image, volumes, scratch = sys.argv[1], sys.argv[2], sys.argv[3]
src = os.open(image, os.O_RDONLY)
size = os.fstat(src).st_size

def digest(fd):
    h = hashlib.sha256()
    at, end = 0, os.fstat(fd).st_size
    while at < end:
        piece = os.pread(fd, min(1 << 20, end - at), at)
        h.update(piece)
        at += len(piece)
    return h.hexdigest()

def copy_range(dst, n, off_in, off_out):
    done = 0
    while done < n:
        k = os.copy_file_range(src, dst, n - done, off_in + done, off_out + done)
        if k == 0:
            break
        done += k

def read_write(dst, n, off_in, off_out):
    n = max(0, min(n, size - off_in))
    data = os.pread(src, n, off_in)
    os.pwrite(dst, data, off_out)

for line in sys.stdin:
    name, off_in, off_out, n, prefill, *target = line.split()
    off_in, off_out, n, prefill = int(off_in), int(off_out), int(n), int(prefill)
    if target:
        vol = os.open(os.path.join(volumes, target[0] + ".img"), os.O_RDWR)
        ref = os.open(os.path.join(scratch, target[0]), os.O_RDWR)
    else:
        vol = os.open(os.path.join(volumes, name + ".img"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        ref = os.open(os.path.join(scratch, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fill = bytes([0x5a]) * prefill
    os.pwrite(vol, fill, 0)
    os.pwrite(ref, fill, 0)
    copy_range(vol, n, off_in, off_out)
    read_write(ref, n, off_in, off_out)
    print(name, "copied", digest(vol), digest(ref), flush=True)
    for fd in (vol, ref):
        os.ftruncate(fd, os.fstat(fd).st_size + 200000)
    print(name, "grown", digest(vol), digest(ref), flush=True)
    os.close(vol)
    os.close(ref)
"#;

/// `copy_file_range` from a snapshot image with other offsets, unaligned ranges, into
/// a volume with data or into a copy of the same snapshot gives the bytes a read +
/// write copy gives, also once the volume grows.
#[test]
fn partial_and_unaligned_copies_equal_a_read_and_write_copy() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start_with("hydrate = false\n");
    random_volume(&fs, "src", 16, 0, 12);
    take_snapshot(&fs, "src@s");
    let size = 16 * MIB;
    // (name, offset in, offset out, length, bytes of data already in the volume,
    // the volume copied into when not a new one named after the case)
    let cases: [(&str, u64, u64, u64, u64, &str); 12] = [
        ("whole", 0, 0, size, 0, ""),
        ("past_the_end", 0, 0, size + 5000, 0, ""),
        ("other_offsets", 4096, 0, 300_000, 0, ""),
        ("to_unaligned", 0, MIB + 7, 2 * MIB, 0, ""),
        ("same_aligned_offset", BLOCK, BLOCK, 3 * BLOCK, 0, ""),
        ("same_unaligned_offset", 1000, 1000, 100_000, 0, ""),
        ("unaligned_end", 0, 0, 100_000, 0, ""),
        ("aligned_end", 0, 0, 3 * BLOCK, 0, ""),
        ("into_data", 0, 0, size, 5000, ""),
        ("into_data_partly", 12345, 12345, 3 * MIB, 4 * MIB, ""),
        // Into `whole`, already a copy of the same snapshot.
        ("again_same_offset", MIB + 3, MIB + 3, MIB, 0, "whole"),
        ("again_other_offset", 5 * MIB, 77, MIB, 0, "whole"),
    ];
    let input: String = cases
        .iter()
        .map(|(name, off_in, off_out, len, prefill, target)| {
            format!("{name} {off_in} {off_out} {len} {prefill} {target}\n")
        })
        .collect();
    let scratch = fs.scratch("references");
    fs::create_dir_all(&scratch).unwrap();
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(PARTIAL_COPIES)
        .arg(image(&fs, "src@s"))
        .arg(fs.mnt.join("volumes"))
        .arg(&scratch)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3: {}", describe_output(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut mismatches = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields[2] != fields[3] {
            mismatches.push(format!("{} ({})", fields[0], fields[1]));
        }
    }
    assert_eq!(
        text.lines().count(),
        2 * cases.len(),
        "python3 printed:\n{text}"
    );
    assert!(
        mismatches.is_empty(),
        "copies that differ from a read + write copy: {}\n{}",
        mismatches.join(", "),
        tail_lines(&fs.log(), 20)
    );
}

// ---------------------------------------------------------------------------------
// 9. An unhydrated clone through a loop device.
// ---------------------------------------------------------------------------------

/// 4 KiB random reads for 5 s on a block device (O_DIRECT, QD32); returns IOPS.
fn fio_random_read_iops(dev: &Path, size: u64) -> f64 {
    let out = run(
        "fio",
        &[
            "--name=randread".to_string(),
            format!("--filename={}", dev.display()),
            "--readonly".into(),
            "--rw=randread".into(),
            "--bs=4k".into(),
            "--iodepth=32".into(),
            "--ioengine=libaio".into(),
            "--direct=1".into(),
            format!("--size={size}"),
            "--runtime=5".into(),
            "--time_based".into(),
            "--minimal".into(),
        ],
    );
    // Terse output: field 8 (from 1) is the read IOPS.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .last()
        .and_then(|l| l.split(';').nth(7))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no read IOPS in fio's output: {text}"))
}

/// A clone that is not hydrated, attached with `losetup --direct-io=on`, reads the
/// snapshot's bytes; 4 KiB random read IOPS of the clone and of the snapshot image
/// are printed.
#[test]
fn an_unhydrated_clone_reads_the_snapshot_through_a_loop_device() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start_with("hydrate = false\n");
    random_volume(&fs, "src", 512, 0, 256);
    take_snapshot(&fs, "src@s");
    let sum = sha256(&image(&fs, "src@s"));
    cp_image(&fs, "src@s", "clone");
    let clone = fs.volume("clone");

    let lo = LoopDevice::attach(&clone, true);
    assert!(
        lo.direct_io(),
        "{} attached without direct I/O",
        lo.dev.display()
    );
    let read = sh(&format!(
        "dd if={} iflag=direct bs=1M status=none | sha256sum",
        lo.dev.display()
    ));
    assert_eq!(
        read.split_whitespace().next(),
        Some(sum.as_str()),
        "the clone through a direct-I/O loop device"
    );
    let clone_iops = fio_random_read_iops(&lo.dev, 256 * MIB);
    lo.detach();
    assert_eq!(hydrated_percent(&clone), 0, "hydrated with hydrate = false");

    let lo = LoopDevice::attach(&image(&fs, "src@s"), true);
    let image_iops = fio_random_read_iops(&lo.dev, 256 * MIB);
    lo.detach();
    eprintln!(
        "4 KiB random reads, QD32, direct-I/O loop: unhydrated clone {clone_iops:.0} IOPS, \
         snapshot image {image_iops:.0} IOPS (clone/image {:.2})",
        clone_iops / image_iops
    );
}

// ---------------------------------------------------------------------------------
// 10. Copies longer than one kernel request.
// ---------------------------------------------------------------------------------

/// Writes the file `data` (outside the mount) into `file` at byte `offset`.
fn write_at_bytes(file: &Path, offset: u64, data: &Path) {
    run(
        "dd",
        &[
            format!("if={}", data.display()),
            format!("of={}", file.display()),
            "bs=1M".into(),
            format!("seek={offset}"),
            "oflag=seek_bytes".into(),
            "conv=notrunc".into(),
            "status=none".into(),
        ],
    );
}

/// A snapshot image with runs of data in holes, and the same bytes outside the
/// mount.
struct SparseImage<'a> {
    id: String,
    reference: PathBuf,
    /// (offset, MiB)
    data: &'a [(u64, u64)],
}

impl SparseImage<'_> {
    /// Whether `copy` has the image's bytes: all of them (`whole`), or its runs of
    /// data and the MiB before each (holes, or the end of the run before).
    fn same_as(&self, copy: &Path, whole: bool) -> bool {
        if whole {
            return sha256(copy) == sha256(&self.reference);
        }
        self.data.iter().all(|&(offset, mib)| {
            let start = offset.saturating_sub(MIB);
            let len = (offset - start + mib * MIB) as usize;
            read_range(copy, start, len) == read_range(&self.reference, start, len)
        })
    }
}

/// Makes volume `name` of `size` bytes, holes but for random data at `data`
/// ((offset, MiB)), the same bytes in a scratch file, and snapshot `<name>@s`.
fn sparse_snapshot<'a>(
    fs: &Ebsfs,
    name: &str,
    size: u64,
    data: &'a [(u64, u64)],
) -> SparseImage<'a> {
    let volume = fs.volume(name);
    let reference = fs.scratch(&format!("{name}-reference"));
    for file in [&volume, &reference] {
        run("truncate", &[format!("-s{size}"), path_str(file)]);
    }
    for (i, &(offset, mib)) in data.iter().enumerate() {
        let piece = fs.scratch(&format!("{name}-piece-{i}"));
        run(
            "dd",
            &[
                "if=/dev/urandom".to_string(),
                format!("of={}", piece.display()),
                "bs=1M".into(),
                format!("count={mib}"),
                "status=none".into(),
            ],
        );
        write_at_bytes(&volume, offset, &piece);
        write_at_bytes(&reference, offset, &piece);
    }
    let id = format!("{name}@s");
    take_snapshot(fs, &id);
    assert_eq!(fs::metadata(image(fs, &id)).unwrap().len(), size);
    SparseImage {
        id,
        reference,
        data,
    }
}

/// Copies `from` into the new file `to` as a tool that skips holes does: for each
/// run of data `SEEK_DATA` and `SEEK_HOLE` find, in order, `copy_file_range(2)` at
/// the same offset on both sides until the run is copied; then the size set with
/// `ftruncate`. Returns what each call returned.
fn copy_runs_skipping_holes(from: &Path, to: &Path) -> Vec<u64> {
    use std::os::fd::AsRawFd;
    let src = fs::File::open(from).unwrap();
    let dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .unwrap();
    let size = src.metadata().unwrap().len();
    let seek = |offset: u64, whence| {
        // SAFETY: the descriptor is open; lseek has no memory effects.
        let at = unsafe { libc::lseek(src.as_raw_fd(), offset as libc::off_t, whence) };
        (at >= 0).then_some(at as u64)
    };
    let mut calls = Vec::new();
    let mut at = 0;
    while let Some(data) = seek(at, libc::SEEK_DATA) {
        let hole = seek(data, libc::SEEK_HOLE).expect("SEEK_HOLE after data");
        let mut done = data;
        while done < hole {
            let (mut off_in, mut off_out) = (done as libc::loff_t, done as libc::loff_t);
            // SAFETY: both descriptors are open and the offsets point at locals.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    (hole - done) as usize,
                    0,
                )
            };
            assert!(
                n > 0,
                "copy_file_range at {done} into {}: {n}, {}",
                to.display(),
                std::io::Error::last_os_error()
            );
            calls.push(n as u64);
            done += n as u64;
        }
        at = hole;
    }
    dst.set_len(size).unwrap();
    calls
}

/// Checks a copy `name` of `image` made by `make` (timed): it has the image's bytes
/// (all of them compared if `whole`, else its runs of data: see
/// [`SparseImage::same_as`]), the data directory grew by less than 1 MiB (nothing
/// was copied), it is 0% hydrated (hydration is off) and `ebsfs volume list` names
/// the snapshot as its source.
fn check_copy_by_reference(
    fs: &Ebsfs,
    image_of: &SparseImage,
    name: &str,
    whole: bool,
    make: impl FnOnce(),
) {
    let id = image_of.id.as_str();
    let du_before = du_bytes(&fs.data);
    let start = Instant::now();
    make();
    let took = start.elapsed();
    let grew = du_bytes(&fs.data).saturating_sub(du_before);
    let copy = fs.volume(name);
    let size = fs::metadata(&copy).unwrap().len();
    eprintln!(
        "{name}, a copy of {id} ({size} bytes): {:.1} ms, data directory grew by {grew} bytes",
        took.as_secs_f64() * 1000.0
    );
    assert!(
        grew < MIB,
        "{name}: the data directory grew by {grew} bytes\n{}",
        tail_lines(&fs.log(), 20)
    );
    assert_eq!(
        size,
        fs::metadata(image(fs, id)).unwrap().len(),
        "size of {name}"
    );
    assert_eq!(
        hydrated_percent(&copy),
        0,
        "{name} hydrated with hydrate = false"
    );
    assert!(image_of.same_as(&copy, whole), "{name} differs from {id}");
    let out = volume_cli(fs, &["list"]);
    assert!(
        out.status.success(),
        "volume list: {}",
        describe_output(&out)
    );
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("volume list has no line for {name}:\n{listing}"));
    assert!(
        line.split_whitespace().any(|field| field == id),
        "volume list does not name {id} as the source of {name}: {line}"
    );
}

/// Copies of snapshot images longer than one of the requests the kernel cuts a
/// `copy_file_range` into (at most 4 GiB − 4 KiB each), all made by reference
/// (equal, the data directory growing by less than 1 MiB, listed as copies):
/// - a 9 GiB (and 5000 bytes) image, mostly holes, with data at its start, across
///   the end of the first request and at its very end: by `cp` (the kernel's
///   requests from 0), by a copy that skips holes (one request per run of data),
///   and by `ebsfs volume create --from`;
/// - a 6 GiB image with data only in its last GiB, by `cp` and by a copy that skips
///   holes (whose first request starts there).
#[test]
fn copies_longer_than_one_kernel_request_are_made_by_reference() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start_with("hydrate = false\n");
    let size = 9 * GIB + 5000;
    let data = [(0, 3), (4 * GIB - 2 * MIB, 4), (size - 3 * MIB, 3)];
    let src = sparse_snapshot(&fs, "src", size, &data);

    check_copy_by_reference(&fs, &src, "copy", true, || {
        run("cp", &[image(&fs, "src@s"), fs.volume("copy")]);
    });
    check_copy_by_reference(&fs, &src, "runs", false, || {
        let calls = copy_runs_skipping_holes(&image(&fs, "src@s"), &fs.volume("runs"));
        eprintln!("copy_file_range calls returned {calls:?}");
        assert_eq!(calls.len(), 3, "{calls:?}: one request a run");
    });
    check_copy_by_reference(&fs, &src, "made", false, || {
        let out = volume_cli(&fs, &["create", "made", "--from", "src@s"]);
        assert!(
            out.status.success(),
            "volume create --from: {}",
            describe_output(&out)
        );
    });

    let size = 6 * GIB;
    let data = [(5 * GIB + 100 * MIB, 8), (size - 2 * MIB, 2)];
    let late = sparse_snapshot(&fs, "late", size, &data);
    check_copy_by_reference(&fs, &late, "late-copy", true, || {
        run("cp", &[image(&fs, "late@s"), fs.volume("late-copy")]);
    });
    check_copy_by_reference(&fs, &late, "late-runs", false, || {
        let calls = copy_runs_skipping_holes(&image(&fs, "late@s"), &fs.volume("late-runs"));
        eprintln!("copy_file_range calls returned {calls:?}");
        assert_eq!(calls.len(), 2, "{calls:?}: one request a run");
    });
}

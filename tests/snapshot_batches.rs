//! Captures larger than one commit batch. What a cancelled capture committed must
//! vanish, or later snapshots would read through it; a capture a kill -9 interrupts
//! resumes after its committed batches and completes with its point in time. With
//! 4 KiB blocks, 128 MiB is 32768 manifest entries: two batches.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

const SIZE: usize = 128 << 20;

/// A mount with 4 KiB blocks: volume `b` of pattern 1 and its snapshot `b@c`, then
/// the whole volume rewritten with pattern 2 and the capture of `b@e` past its first
/// batch (or ended). Returns the mount and the size of `chunks/` after `b@c`.
fn capture_past_its_first_batch() -> (Ebsfs, u64) {
    let fs = Ebsfs::start_with("block_size = \"4KiB\"\ncapture_threads = 1\n");
    let img = fs.volume("b");
    fs::write(&img, pattern(SIZE, 1)).unwrap();
    fs::create_dir(fs.snapshot("b@c")).unwrap();
    assert_eq!(fs.wait_snapshot("b@c"), "completed");
    let chunks_after_c = du_bytes(&fs.data.join("chunks"));

    fs::write(&img, pattern(SIZE, 2)).unwrap();
    fs::create_dir(fs.snapshot("b@e")).unwrap();
    wait_until(
        "the capture to pass its first batch",
        Duration::from_secs(120),
        || fs.progress("b@e") >= 60 || fs.status("b@e") != "pending",
    );
    (fs, chunks_after_c)
}

/// Snapshot `c` of pattern 1; the whole volume rewritten with pattern 2 and a capture
/// of it started and interrupted past its first batch by `interrupt`; the volume
/// written back to pattern 1; the next snapshot must be pattern 1 exactly (it skips
/// blocks equal to `c`, so anything left of the interrupted capture would show).
fn interrupted_capture_leaves_nothing_behind(interrupt: impl Fn(&mut Ebsfs)) {
    let (mut fs, chunks_after_c) = capture_past_its_first_batch();
    assert_eq!(
        fs.status("b@e"),
        "pending",
        "precondition: interrupt while pending"
    );
    interrupt(&mut fs);

    let img = fs.volume("b");
    let p1 = pattern(SIZE, 1);
    fs::write(&img, &p1).unwrap();
    fs::create_dir(fs.snapshot("b@s")).unwrap();
    assert_eq!(fs.wait_snapshot("b@s"), "completed");
    assert!(
        sha256(&fs.snapshot("b@s").join("volume.img")) == sha256(&fs.scratch_pattern(SIZE, 1)),
        "entries of the interrupted capture show through the next snapshot"
    );
    assert_eq!(fs.info_u64("b@s", "changed_blocks"), 0, "b@s equals b@c");
    // Nothing the interrupted capture stored is still held.
    let chunks_now = du_bytes(&fs.data.join("chunks"));
    assert!(
        chunks_now < chunks_after_c + chunks_after_c / 10,
        "the interrupted capture leaked space: {chunks_after_c} -> {chunks_now} bytes"
    );
}

#[test]
fn crash_after_committed_batches_resumes_and_completes() {
    if !require_fuse() {
        return;
    }
    let (mut fs, chunks_after_c) = capture_past_its_first_batch();
    let img = fs.volume("b");
    // Written after the freeze (at both ends, captured or not yet): not in b@e.
    let file = fs::OpenOptions::new().write(true).open(&img).unwrap();
    let later = pattern(1 << 20, 3);
    file.write_all_at(&later, 0).unwrap();
    file.write_all_at(&later, (SIZE - later.len()) as u64)
        .unwrap();
    drop(file);
    assert_eq!(
        fs.status("b@e"),
        "pending",
        "precondition: kill while pending"
    );
    fs.kill9();
    fs.restart();
    assert_eq!(fs.wait_snapshot("b@e"), "completed", "{}", fs.log());
    let log = fs.log();
    let resumed = log
        .lines()
        .find(|l| l.contains("resumes its capture"))
        .unwrap_or_else(|| panic!("no resumed capture in the log:\n{log}"));
    assert!(
        !resumed.contains(": 0 entries"),
        "precondition: the first batch was committed before the kill: {resumed}"
    );
    assert!(
        sha256(&fs.snapshot("b@e").join("volume.img")) == sha256(&fs.scratch_pattern(SIZE, 2)),
        "the resumed snapshot is not its point in time"
    );
    assert_eq!(fs.info_u64("b@e", "changed_blocks"), (SIZE / 4096) as u64);
    // The chunks the capture wrote but had not committed at the kill are reclaimed.
    let chunks_now = du_bytes(&fs.data.join("chunks"));
    assert!(
        chunks_now < 2 * chunks_after_c + chunks_after_c / 10,
        "the interrupted capture leaked space: {chunks_after_c} -> {chunks_now} bytes"
    );
    fs::create_dir(fs.snapshot("b@s")).unwrap();
    assert_eq!(fs.wait_snapshot("b@s"), "completed");
    assert!(
        sha256(&fs.snapshot("b@s").join("volume.img")) == sha256(&img),
        "the next snapshot misses the writes made during the interrupted capture"
    );
}

#[test]
fn cancel_after_committed_batches_leaves_nothing_behind() {
    if !require_fuse() {
        return;
    }
    interrupted_capture_leaves_nothing_behind(|fs| {
        fs::remove_dir(fs.snapshot("b@e")).unwrap();
        assert!(!fs.snapshot("b@e").exists());
    });
}

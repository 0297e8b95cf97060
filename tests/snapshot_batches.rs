//! Captures larger than one commit batch: what a capture committed before it was
//! interrupted (crash or cancel) must vanish, or later snapshots would read through
//! it. With 4 KiB blocks, 128 MiB is 32768 manifest entries: two batches.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

const SIZE: usize = 128 << 20;

fn progress(fs: &Ebsfs, id: &str) -> u64 {
    fs::read_to_string(fs.snapshot(id).join("progress"))
        .unwrap_or_default()
        .trim()
        .trim_end_matches('%')
        .parse()
        .unwrap_or(0)
}

/// Snapshot `c` of pattern 1; the whole volume rewritten with pattern 2 and a capture
/// of it started and interrupted past its first batch by `interrupt`; the volume
/// written back to pattern 1; the next snapshot must be pattern 1 exactly (it skips
/// blocks equal to `c`, so anything left of the interrupted capture would show).
fn interrupted_capture_leaves_nothing_behind(interrupt: impl Fn(&mut Ebsfs)) {
    let mut fs = Ebsfs::start_with("block_size = \"4KiB\"\ncapture_threads = 1\n");
    let img = fs.volume("b");
    let p1 = pattern(SIZE, 1);
    fs::write(&img, &p1).unwrap();
    fs::create_dir(fs.snapshot("b@c")).unwrap();
    assert_eq!(fs.wait_snapshot("b@c"), "completed");
    let chunks_after_c = du_bytes(&fs.data.join("chunks"));

    fs::write(&img, pattern(SIZE, 2)).unwrap();
    fs::create_dir(fs.snapshot("b@e")).unwrap();
    wait_until(
        "the capture to pass its first batch",
        Duration::from_secs(120),
        || progress(&fs, "b@e") >= 60 || fs.status("b@e") != "pending",
    );
    assert_eq!(
        fs.status("b@e"),
        "pending",
        "precondition: interrupt while pending"
    );
    interrupt(&mut fs);

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
fn crash_after_committed_batches_leaves_nothing_behind() {
    if !require_fuse() {
        return;
    }
    interrupted_capture_leaves_nothing_behind(|fs| {
        fs.kill9();
        fs.restart();
        assert_eq!(fs.status("b@e"), "error");
        assert!(fs.info("b@e").contains_key("error"));
    });
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

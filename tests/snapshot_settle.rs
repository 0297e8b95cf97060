//! Large deletions settle in the background, one bounded transaction at a time:
//! `rmdir` and `rm` return at once, other snapshots stay exact throughout, other
//! volumes can be snapshotted meanwhile, and the space comes back in the end.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn large_deletions_settle_in_the_background() {
    if !require_fuse() {
        return;
    }
    // 4 KiB blocks: 160 MiB is 40960 manifest entries, more than one settling batch.
    let fs = Ebsfs::start_with("block_size = \"4KiB\"\n");
    let big = fs.volume("big");
    fs::write(&big, pattern(160 << 20, 1)).unwrap();
    fs::create_dir(fs.snapshot("big@a")).unwrap();
    assert_eq!(fs.wait_snapshot("big@a"), "completed");
    let chunks = fs.data.join("chunks");
    let full = du_bytes(&chunks);

    fs::write(&big, pattern(160 << 20, 2)).unwrap();
    fs::create_dir(fs.snapshot("big@b")).unwrap();
    assert_eq!(fs.wait_snapshot("big@b"), "completed");
    let sum_b = sha256(&fs.snapshot("big@b").join("volume.img"));

    // Deleting a: its entries are all overridden by b and dropped in batches.
    fs::remove_dir(fs.snapshot("big@a")).unwrap();
    assert!(!fs.snapshot("big@a").exists());
    assert_eq!(sha256(&fs.snapshot("big@b").join("volume.img")), sum_b);

    // Deleting the volume and then b: b becomes hidden... then dropped in batches,
    // while another volume is snapshotted without waiting for it.
    let other = fs.volume("other");
    fs::write(&other, pattern(1 << 20, 3)).unwrap();
    fs::remove_file(&big).unwrap();
    fs::remove_dir(fs.snapshot("big@b")).unwrap();
    let started = Instant::now();
    fs::create_dir(fs.snapshot("other@x")).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "mkdir waited {:?} for a deletion on another volume",
        started.elapsed()
    );
    assert_eq!(fs.wait_snapshot("other@x"), "completed");
    assert_eq!(
        sha256(&fs.snapshot("other@x").join("volume.img")),
        sha256(&other)
    );

    // The space of both big snapshots comes back once settling is done.
    wait_until(
        "the deleted snapshots' space to be freed",
        Duration::from_secs(120),
        || du_bytes(&chunks) < full / 8,
    );
}

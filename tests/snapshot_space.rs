//! Snapshot storage: incremental captures store only what changed, and deleting
//! snapshots (or the volume) frees space without disturbing the others.

mod common;
mod snapshot_support;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;
use snapshot_support::*;

/// 1 GiB of random data, snapshot 1; 1% of its 64 KiB blocks rewritten, snapshot 2.
/// Snapshot 2 stores ~1% of snapshot 1's bytes, grows `chunks/` by ~1% of what
/// snapshot 1 did, and counts ~1% of the blocks as changed.
#[test]
fn incremental_snapshot_stores_only_the_changed_blocks() {
    if !require_fuse() {
        return;
    }
    const BLOCK: u64 = 64 * KIB;
    const BLOCKS: u64 = GIB / BLOCK;
    let mut rng = Rng::from_env("incremental_snapshot_stores_only_the_changed_blocks");
    let fs = Ebsfs::start_with("block_size = \"64KiB\"\n");
    let img = fs.volume("inc");
    write_urandom(&img, 0, 1024);
    let original_sum = sha256(&img);

    let chunks_0 = chunks_bytes(&fs);
    take_snapshot(&fs, "inc@1");
    let chunks_1 = chunks_bytes(&fs);

    let changed = rng.distinct((BLOCKS / 100) as usize, BLOCKS);
    let file = fs::OpenOptions::new().write(true).open(&img).unwrap();
    for &block in &changed {
        file.write_all_at(&pattern(BLOCK as usize, rng.next()), block * BLOCK)
            .unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    take_snapshot(&fs, "inc@2");
    let chunks_2 = chunks_bytes(&fs);

    let stored_1 = fs.info_u64("inc@1", "stored_bytes");
    let stored_2 = fs.info_u64("inc@2", "stored_bytes");
    let changed_1 = fs.info_u64("inc@1", "changed_blocks");
    let changed_2 = fs.info_u64("inc@2", "changed_blocks");
    let growth_1 = chunks_1.saturating_sub(chunks_0);
    let growth_2 = chunks_2.saturating_sub(chunks_1);
    let report = format!(
        "stored_bytes {stored_1} / {stored_2}, changed_blocks {changed_1} / {changed_2} \
         (rewrote {} of {BLOCKS}), chunks/ growth {growth_1} / {growth_2}",
        changed.len()
    );
    eprintln!("{report}");
    // Random data does not compress: the first snapshot stores the whole volume.
    assert_eq!(changed_1, BLOCKS, "{report}");
    assert!(
        stored_1 >= GIB * 99 / 100,
        "first snapshot stored too little: {report}"
    );
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    let in_band = |r: f64| (0.005..=0.02).contains(&r);
    assert!(
        in_band(ratio(stored_2, stored_1)),
        "stored_bytes ratio {:.4}: {report}",
        ratio(stored_2, stored_1)
    );
    assert!(
        in_band(ratio(growth_2, growth_1)),
        "chunks/ growth ratio {:.4}: {report}",
        ratio(growth_2, growth_1)
    );
    assert!(
        in_band(ratio(changed_2, BLOCKS)),
        "changed_blocks ratio {:.4}: {report}",
        ratio(changed_2, BLOCKS)
    );
    assert_eq!(
        changed_2,
        changed.len() as u64,
        "changed_blocks is not the number of rewritten blocks: {report}"
    );
    assert_eq!(info_str(&fs, "inc@2", "parent").as_deref(), Some("inc@1"));

    // And both images are right.
    assert_eq!(
        sha256(&image(&fs, "inc@2")),
        sha256(&img),
        "inc@2 differs from the volume"
    );
    assert_eq!(
        sha256(&image(&fs, "inc@1")),
        original_sum,
        "inc@1 differs from the original volume"
    );
}

fn sum(fs: &Ebsfs, id: &str) -> String {
    sha256(&image(fs, id))
}

/// Snapshots 1, 2, 3 with different changes between them. Deleting 2 then 1 leaves
/// 3 and the volume intact and frees space each time; deleting the volume leaves 3
/// readable (also after a restart); deleting 3 then frees nearly everything.
#[test]
fn deleting_snapshots_and_the_volume_keeps_the_rest_intact() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start_with("block_size = \"64KiB\"\n");
    let img = fs.volume("ind");
    write_urandom(&img, 0, 64);
    take_snapshot(&fs, "ind@1");
    // Snapshot 2 owns MiB 0..8; snapshot 3 overrides half of that and MiB 32..36.
    write_urandom(&img, 0, 8);
    take_snapshot(&fs, "ind@2");
    write_urandom(&img, 0, 4);
    write_urandom(&img, 32, 4);
    take_snapshot(&fs, "ind@3");
    // The volume moves on past snapshot 3.
    write_urandom(&img, 48, 4);
    let (sum_1, sum_2, sum_3, sum_vol) = (
        sum(&fs, "ind@1"),
        sum(&fs, "ind@2"),
        sum(&fs, "ind@3"),
        sha256(&img),
    );
    let mut all = vec![&sum_1, &sum_2, &sum_3, &sum_vol];
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "snapshots and volume should all differ");
    assert_eq!(info_str(&fs, "ind@2", "parent").as_deref(), Some("ind@1"));
    assert_eq!(info_str(&fs, "ind@3", "parent").as_deref(), Some("ind@2"));

    let before = chunks_bytes(&fs);
    fs::remove_dir(fs.snapshot("ind@2")).unwrap();
    let after_2 = chunks_bytes(&fs);
    assert_eq!(listed_snapshots(&fs), ["ind@1", "ind@3"]);
    assert_eq!(
        sum(&fs, "ind@3"),
        sum_3,
        "ind@3 changed when ind@2 was deleted"
    );
    assert_eq!(
        sum(&fs, "ind@1"),
        sum_1,
        "ind@1 changed when ind@2 was deleted"
    );
    assert_eq!(
        sha256(&img),
        sum_vol,
        "volume changed when ind@2 was deleted"
    );
    // ind@2's copy of MiB 0..4 is needed by nobody any more.
    assert!(
        before.saturating_sub(after_2) >= 3 * MIB,
        "deleting ind@2 freed {} bytes of chunks/ ({before} -> {after_2}), expected ~4 MiB",
        before as i64 - after_2 as i64
    );

    fs::remove_dir(fs.snapshot("ind@1")).unwrap();
    let after_1 = chunks_bytes(&fs);
    assert_eq!(listed_snapshots(&fs), ["ind@3"]);
    assert_eq!(
        sum(&fs, "ind@3"),
        sum_3,
        "ind@3 changed when ind@1 was deleted"
    );
    assert_eq!(
        sha256(&img),
        sum_vol,
        "volume changed when ind@1 was deleted"
    );
    // ind@1's copies of MiB 0..8 and 32..36 are overridden by ind@3.
    assert!(
        after_2.saturating_sub(after_1) >= 10 * MIB,
        "deleting ind@1 freed {} bytes of chunks/ ({after_2} -> {after_1}), expected ~12 MiB",
        after_2 as i64 - after_1 as i64
    );

    fs::remove_file(&img).unwrap();
    assert!(!img.exists(), "volume still listed after rm");
    assert_eq!(
        listed_snapshots(&fs),
        ["ind@3"],
        "deleting the volume touched its snapshots"
    );
    assert_eq!(
        sum(&fs, "ind@3"),
        sum_3,
        "ind@3 changed when its volume was deleted"
    );
    assert_eq!(info_str(&fs, "ind@3", "volume").as_deref(), Some("ind"));
    fs.stop();
    fs.restart();
    assert_eq!(fs.status("ind@3"), "completed");
    assert_eq!(
        sum(&fs, "ind@3"),
        sum_3,
        "ind@3 of a deleted volume changed across a restart"
    );
    let with_3_only = chunks_bytes(&fs);
    assert!(
        with_3_only >= 60 * MIB,
        "chunks/ holds {with_3_only} bytes, less than ind@3 needs"
    );

    fs::remove_dir(fs.snapshot("ind@3")).unwrap();
    assert_eq!(listed_snapshots(&fs), Vec::<String>::new());
    let empty = chunks_bytes(&fs);
    assert!(
        empty < MIB,
        "after deleting every snapshot and the volume, chunks/ still holds {empty} bytes \
         (was {with_3_only})"
    );
}

/// Deleting a volume's latest snapshot (the base of its next capture), also while
/// the next capture is running: every remaining and later snapshot still reads
/// back exactly, and the deleted name can be used again.
#[test]
fn deleting_the_latest_snapshot_keeps_later_snapshots_complete() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start_with("block_size = \"64KiB\"\n");
    let img = fs.volume("lt");
    write_urandom(&img, 0, 64);
    take_snapshot(&fs, "lt@1");
    let sum_1 = sum(&fs, "lt@1");
    write_urandom(&img, 8, 8);
    take_snapshot(&fs, "lt@2");
    // lt@2 is the base of the next capture; delete it, change more, snapshot again.
    fs::remove_dir(fs.snapshot("lt@2")).unwrap();
    assert_eq!(listed_snapshots(&fs), ["lt@1"]);
    write_urandom(&img, 12, 8);
    take_snapshot(&fs, "lt@3");
    assert_eq!(
        sum(&fs, "lt@3"),
        sha256(&img),
        "lt@3 after deleting its base"
    );
    assert_eq!(sum(&fs, "lt@1"), sum_1, "lt@1 changed");
    let after_3 = chunks_bytes(&fs);

    // Delete the base while the next capture (which compares against it) runs.
    write_urandom(&img, 0, 256);
    let volume_sum = sha256(&img);
    mkdir_snapshot(&fs, "lt@4").unwrap();
    assert_eq!(
        fs.status("lt@4"),
        "pending",
        "precondition: lt@4 must be pending"
    );
    fs::remove_dir(fs.snapshot("lt@3")).unwrap();
    assert_eq!(
        fs.status("lt@4"),
        "pending",
        "precondition: lt@4 must still be pending"
    );
    assert_eq!(fs.wait_snapshot("lt@4"), "completed", "{}", fs.log());
    assert_eq!(
        sum(&fs, "lt@4"),
        volume_sum,
        "lt@4 after deleting its base during capture"
    );
    assert_eq!(sum(&fs, "lt@1"), sum_1, "lt@1 changed");
    assert_eq!(listed_snapshots(&fs), ["lt@1", "lt@4"]);
    assert!(chunks_bytes(&fs) > after_3, "lt@4 should have added chunks");

    // Deleted names are free again and snapshot the current volume.
    write_urandom(&img, 100, 1);
    take_snapshot(&fs, "lt@2");
    take_snapshot(&fs, "lt@3");
    assert_eq!(sum(&fs, "lt@2"), sha256(&img));
    assert_eq!(sum(&fs, "lt@3"), sha256(&img));
    assert_eq!(sum(&fs, "lt@4"), volume_sum);
}

/// Deleting a volume while its snapshot is pending: the capture still completes
/// with the volume as it was at mkdir.
#[test]
fn deleting_a_volume_during_its_capture_keeps_the_snapshot() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("gone");
    write_urandom(&img, 0, 384);
    let volume_sum = sha256(&img);
    mkdir_snapshot(&fs, "gone@last").unwrap();
    fs::remove_file(&img).unwrap_or_else(|e| panic!("rm of a volume with a pending snapshot: {e}"));
    assert!(!img.exists(), "volume still there after rm");
    assert_eq!(
        fs.status("gone@last"),
        "pending",
        "precondition: capture must be pending at rm"
    );
    assert_eq!(fs.wait_snapshot("gone@last"), "completed", "{}", fs.log());
    assert_eq!(
        sum(&fs, "gone@last"),
        volume_sum,
        "snapshot of a volume deleted during capture"
    );
    // A new volume of the same name starts a new lineage; the old snapshot stays.
    fs::write(&img, pattern(MIB as usize, 5)).unwrap();
    take_snapshot(&fs, "gone@new");
    assert_eq!(sum(&fs, "gone@new"), sha256(&img));
    assert_eq!(sum(&fs, "gone@last"), volume_sum);
    assert_eq!(
        info_str(&fs, "gone@new", "parent"),
        None,
        "a new volume's first snapshot has a parent"
    );
}

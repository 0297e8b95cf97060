//! After a host crash the dirty map cannot be trusted: the next snapshot compares
//! every block with the previous one, so it still holds every change, and it stays
//! incremental (unchanged blocks are not stored again).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn snapshot_after_a_host_crash_compares_every_block() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("h");
    fs::write(&img, pattern(16 << 20, 3)).unwrap();
    fs::create_dir(fs.snapshot("h@before")).unwrap();
    assert_eq!(fs.wait_snapshot("h@before"), "completed");

    // 1 MiB changed (16 blocks of 64 KiB), acknowledged with fsync, then the crash.
    let file = fs::OpenOptions::new().write(true).open(&img).unwrap();
    file.write_all_at(&pattern(1 << 20, 4), 5 << 20).unwrap();
    file.sync_all().unwrap();
    drop(file);
    fs.simulate_host_crash();
    assert!(
        fs.log().contains("host crashed"),
        "the restart did not notice the host crash"
    );

    fs::create_dir(fs.snapshot("h@after")).unwrap();
    assert_eq!(fs.wait_snapshot("h@after"), "completed");
    assert_eq!(
        sha256(&fs.snapshot("h@after").join("volume.img")),
        sha256(&img),
        "the change made before the host crash is missing from the snapshot"
    );
    assert_eq!(
        fs.info_u64("h@after", "changed_blocks"),
        16,
        "unchanged blocks were stored again"
    );

    // The comparison is a one-off: the next snapshot trusts the dirty map again.
    fs::create_dir(fs.snapshot("h@next")).unwrap();
    assert_eq!(fs.wait_snapshot("h@next"), "completed");
    assert_eq!(fs.info_u64("h@next", "changed_blocks"), 0);
    assert_eq!(
        sha256(&fs.snapshot("h@before").join("volume.img")),
        sha256(&fs.scratch_pattern(16 << 20, 3))
    );
}

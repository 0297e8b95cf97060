//! After a host crash the dirty map cannot be trusted: the next snapshot compares
//! every block with the previous one, so it still holds every change, and it stays
//! incremental (unchanged blocks are not stored again).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;

/// Makes the last session look like it ended with the host going down: the session
/// file names another boot, and the volume's dirty map lost its bits.
fn simulate_host_crash(fs: &mut Ebsfs) {
    fs.kill9();
    let session = fs.data.join("session");
    let text = fs::read_to_string(&session).expect("a killed daemon leaves its session file");
    let rewritten: String = text
        .lines()
        .map(|l| {
            if l.starts_with("boot_id=") {
                "boot_id=another-boot".to_string()
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    fs::write(&session, rewritten).unwrap();
    for entry in fs::read_dir(fs.data.join("volumes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "dirty") {
            fs::remove_file(path).unwrap();
        }
    }
    fs.restart();
}

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
    simulate_host_crash(&mut fs);
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

//! Volumes on a real mount, driven with real tools (issue: volumes as loop-mountable files).

mod common;

use common::*;

/// mkfs.ext4 on a volume, loop-mount, write random files, remount everything:
/// checksums match and e2fsck is clean.
#[test]
fn ext4_on_a_volume_survives_remount() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("disk");
    run("truncate", &["-s", "1G", img.to_str().unwrap()]);
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    let dir = fs.loop_mount(&img, "ext4", "");
    let mut sums = Vec::new();
    for i in 0..4u64 {
        let path = dir.join(format!("file{i}"));
        std::fs::write(&path, pattern(3 << 20 | (i as usize * 4097), i)).unwrap();
        sums.push((format!("file{i}"), sha256(&path)));
    }
    fs.loop_unmount(&dir);
    fs.stop();
    fs.restart();
    let out = try_run("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert!(out.status.success(), "e2fsck: {}", String::from_utf8_lossy(&out.stdout));
    let dir = fs.loop_mount(&img, "ext4", "");
    for (name, sum) in sums {
        assert_eq!(sha256(&dir.join(&name)), sum, "{name} changed across remount");
    }
}

//! Snapshots of volumes that shrink and grow: bytes cut off by a shrink read as
//! zeros in every later snapshot, even after the volume grows back, while older
//! snapshots keep them.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;

fn snapshot(fs: &Ebsfs, id: &str) -> Vec<u8> {
    fs::create_dir(fs.snapshot(id)).unwrap();
    assert_eq!(fs.wait_snapshot(id), "completed", "{id}: {:?}", fs.info(id));
    fs::read(fs.snapshot(id).join("volume.img")).unwrap()
}

fn resize_round_trip(cut_to: u64) {
    let fs = Ebsfs::start();
    let img = fs.volume("r");
    let original = pattern(8 << 20, 7);
    fs::write(&img, &original).unwrap();
    let a = snapshot(&fs, "r@a");
    assert_eq!(a, original);

    let file = fs::OpenOptions::new().write(true).open(&img).unwrap();
    file.set_len(cut_to).unwrap();
    let b = snapshot(&fs, "r@b");
    assert_eq!(b, original[..cut_to as usize]);

    file.set_len(8 << 20).unwrap();
    let mut expected = original[..cut_to as usize].to_vec();
    expected.resize(8 << 20, 0);
    assert_eq!(
        fs::read(&img).unwrap(),
        expected,
        "the live volume reads zeros past the cut"
    );
    let c = snapshot(&fs, "r@c");
    assert!(
        c == expected,
        "snapshot after regrowth shows bytes from before the shrink"
    );

    // A write into the regrown area and another snapshot: still exact.
    file.write_all_at(b"back again", 5 << 20).unwrap();
    expected[5 << 20..(5 << 20) + 10].copy_from_slice(b"back again");
    let d = snapshot(&fs, "r@d");
    assert!(d == expected);
    // The oldest snapshot is untouched by all of this.
    assert_eq!(
        fs::read(fs.snapshot("r@a").join("volume.img")).unwrap(),
        original
    );
}

#[test]
fn shrink_then_regrow_reads_zeros_block_aligned() {
    if !require_fuse() {
        return;
    }
    resize_round_trip(1 << 20);
}

#[test]
fn shrink_then_regrow_reads_zeros_unaligned() {
    if !require_fuse() {
        return;
    }
    resize_round_trip((1 << 20) + 1000);
}

#[test]
fn shrink_to_zero_while_capturing_keeps_the_snapshot_whole() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("s");
    let original = pattern(64 << 20, 11);
    fs::write(&img, &original).unwrap();
    fs::create_dir(fs.snapshot("s@pit")).unwrap();
    // Cut the volume at once, while the capture is (most likely) still running.
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(fs.wait_snapshot("s@pit"), "completed");
    let image = fs::read(fs.snapshot("s@pit").join("volume.img")).unwrap();
    assert!(
        image == original,
        "snapshot lost data cut off after its mkdir"
    );
    assert_eq!(fs::metadata(&img).unwrap().len(), 0);
}

/// `rmdir` the moment a snapshot reads `completed` deletes it (the capture's
/// bookkeeping may still be finishing: that must not look like a pending capture).
#[test]
fn rmdir_right_after_completion_deletes_the_snapshot() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("q");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&img)
        .unwrap();
    for round in 0..200u64 {
        file.write_all_at(&pattern(64 << 10, round), (round % 64) * (256 << 10))
            .unwrap();
        let id = format!("q@r{round}");
        fs::create_dir(fs.snapshot(&id)).unwrap();
        // Poll without sleeping, to rmdir as close to the completion as possible.
        let start = std::time::Instant::now();
        while fs.status(&id) != "completed" {
            assert!(start.elapsed().as_secs() < 60, "{id} did not complete");
        }
        fs::remove_dir(fs.snapshot(&id)).unwrap();
        assert!(
            !fs.snapshot(&id).exists(),
            "round {round}: {id} still listed after rmdir"
        );
    }
}

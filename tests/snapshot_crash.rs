//! `kill -9` of the daemon around a snapshot capture, then a restart.

mod common;
mod snapshot_support;

use std::fs;
use std::time::{Duration, Instant};

use common::*;
use snapshot_support::*;

/// kill -9 in the middle of a large capture: after a restart the completed snapshots
/// read back unchanged, and the interrupted one resumes and completes with exactly
/// its point in time (not the writes made while it ran); the next snapshot is
/// incremental on it and holds every later change.
#[test]
fn kill9_during_capture_resumes_and_completes_with_its_point_in_time() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("cr");
    write_urandom(&img, 0, 64);
    take_snapshot(&fs, "cr@s1");
    write_urandom(&img, 32, 64);
    take_snapshot(&fs, "cr@s2");
    let sum_1 = sha256(&image(&fs, "cr@s1"));
    let sum_2 = sha256(&image(&fs, "cr@s2"));

    // A large change, captured part-way, with more writes racing the capture.
    write_urandom(&img, 0, 512);
    let sum_3 = sha256(&img);
    mkdir_snapshot(&fs, "cr@s3").unwrap();
    let percent = wait_for_progress(&fs, "cr@s3", 10);
    write_urandom(&img, 8, 2);
    write_urandom(&img, 520, 2);
    let status = fs.status("cr@s3");
    assert_eq!(
        status, "pending",
        "precondition: capture must be pending at the kill (was {percent}%)"
    );
    fs.kill9();
    fs.restart();

    assert_eq!(listed_snapshots(&fs), ["cr@s1", "cr@s2", "cr@s3"]);
    for (id, sum) in [("cr@s1", &sum_1), ("cr@s2", &sum_2)] {
        assert_eq!(fs.status(id), "completed", "{id} after kill -9");
        assert_eq!(&sha256(&image(&fs, id)), sum, "{id} changed by the kill -9");
    }
    assert_eq!(
        fs.wait_snapshot("cr@s3"),
        "completed",
        "interrupted snapshot\n{}",
        fs.log()
    );
    assert_eq!(
        sha256(&image(&fs, "cr@s3")),
        sum_3,
        "the resumed snapshot is not its point in time"
    );

    take_snapshot(&fs, "cr@s4");
    assert_eq!(info_str(&fs, "cr@s4", "parent").as_deref(), Some("cr@s3"));
    assert_eq!(
        sha256(&image(&fs, "cr@s4")),
        sha256(&img),
        "the snapshot after the crash misses changes\n{}",
        fs.log()
    );
    assert_eq!(sha256(&image(&fs, "cr@s2")), sum_2);
}

/// After a host crash a pending capture cannot resume (its preserved pages were never
/// synced): it is `error` with the reason, its image does not open, `snapshot wait`
/// fails, and the next snapshot holds every change since the last completed one.
#[test]
fn a_capture_a_host_crash_interrupts_is_an_error_and_loses_no_change() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("hc");
    write_urandom(&img, 0, 64);
    take_snapshot(&fs, "hc@s1");
    write_urandom(&img, 0, 512);
    mkdir_snapshot(&fs, "hc@s2").unwrap();
    let percent = wait_for_progress(&fs, "hc@s2", 10);
    write_urandom(&img, 8, 2);
    assert_eq!(
        fs.status("hc@s2"),
        "pending",
        "precondition: capture must be pending at the crash (was {percent}%)"
    );
    fs.simulate_host_crash();
    assert_eq!(fs.status("hc@s2"), "error", "{}", fs.log());
    let error = info_str(&fs, "hc@s2", "error").unwrap_or_default();
    assert!(
        error.contains("host crash"),
        "info error of hc@s2: {error:?}"
    );
    assert!(
        fs::File::open(image(&fs, "hc@s2")).is_err(),
        "the image of a failed snapshot opened"
    );
    let out = try_run(
        BIN,
        &[
            "snapshot",
            "wait",
            "hc@s2",
            "--mount",
            fs.mnt.to_str().unwrap(),
        ],
    );
    assert!(
        !out.status.success(),
        "ebsfs snapshot wait on an error snapshot exited 0"
    );
    take_snapshot(&fs, "hc@s3");
    assert_eq!(info_str(&fs, "hc@s3", "parent").as_deref(), Some("hc@s1"));
    assert_eq!(
        sha256(&image(&fs, "hc@s3")),
        sha256(&img),
        "the snapshot after the crash misses changes"
    );
    fs::remove_dir(fs.snapshot("hc@s2")).unwrap();
    assert_eq!(listed_snapshots(&fs), ["hc@s1", "hc@s3"]);
}

/// kill -9 right after a capture completes: after a restart the snapshot is
/// completed with the volume's contents, and the next one is incremental on it.
#[test]
fn kill9_right_after_completion_keeps_the_snapshot() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("done");
    write_urandom(&img, 0, 64);
    take_snapshot(&fs, "done@s1");
    let sum_1 = sha256(&image(&fs, "done@s1"));
    write_urandom(&img, 16, 192);
    let volume_sum = sha256(&img);

    mkdir_snapshot(&fs, "done@s2").unwrap();
    let start = Instant::now();
    let mut was_pending = false;
    loop {
        match fs.status("done@s2").as_str() {
            "pending" => was_pending = true,
            "completed" => break,
            other => panic!("done@s2 became {other:?}\n{}", fs.log()),
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "capture did not complete"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    fs.kill9();
    assert!(was_pending, "mkdir returned after the capture completed");
    fs.restart();

    assert_eq!(
        fs.status("done@s2"),
        "completed",
        "completed snapshot after kill -9\n{}",
        fs.log()
    );
    assert_eq!(
        sha256(&image(&fs, "done@s2")),
        volume_sum,
        "done@s2 is not the volume at mkdir"
    );
    assert_eq!(sha256(&image(&fs, "done@s1")), sum_1, "done@s1 changed");
    assert_eq!(sha256(&img), volume_sum, "volume changed across kill -9");
    write_urandom(&img, 100, 4);
    take_snapshot(&fs, "done@s3");
    assert_eq!(
        info_str(&fs, "done@s3", "parent").as_deref(),
        Some("done@s2")
    );
    assert_eq!(sha256(&image(&fs, "done@s3")), sha256(&img));
    let changed = fs.info_u64("done@s3", "changed_blocks");
    assert!(
        changed <= 4 * 1024 / 64 + 1,
        "done@s3 recaptured {changed} blocks for a 4 MiB change"
    );
}

//! The recycle bin on a real mount (`recycle_bin = "3s"`): `rmdir` moves a snapshot
//! to `recycle-bin/`, `mv` brings it back with identical bytes, the bin is purged
//! after its period, a locked snapshot is refused even to root, and the
//! `ebsfs recycle-bin` commands do the same.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

fn ebsfs_cli(fs: &Ebsfs, args: &[&str]) -> std::process::Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--mount", fs.mnt.to_str().unwrap()]);
    run(env!("CARGO_BIN_EXE_ebsfs"), &all)
}

fn in_bin(fs: &Ebsfs) -> Vec<String> {
    fs.names_in("recycle-bin")
}

#[test]
fn deleted_snapshots_wait_in_the_bin_come_back_whole_and_are_purged_in_time() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start_with("recycle_bin = \"3s\"\n");
    fs::write(fs.volume("db"), pattern(4 << 20, 1)).unwrap();
    fs::create_dir(fs.snapshot("db@one")).unwrap();
    assert_eq!(fs.wait_snapshot("db@one"), "completed");
    let image = fs.snapshot("db@one").join("volume.img");
    let before = sha256(&image);
    // The volume moves on; the snapshot must not.
    fs::write(fs.volume("db"), pattern(4 << 20, 2)).unwrap();

    fs::remove_dir(fs.snapshot("db@one")).unwrap();
    assert!(!fs.snapshot("db@one").exists());
    assert_eq!(in_bin(&fs), ["db@one"]);
    assert_eq!(
        sha256(&fs.mnt.join("recycle-bin/db@one/volume.img")),
        before
    );
    let err = fs::create_dir(fs.snapshot("db@one")).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EEXIST),
        "the name stays taken"
    );

    let out = run(
        "mv",
        &[
            fs.mnt.join("recycle-bin/db@one").to_str().unwrap(),
            fs.mnt.join("snapshots/").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(in_bin(&fs).is_empty());
    assert_eq!(fs.status("db@one"), "completed");
    assert_eq!(sha256(&image), before, "restored byte for byte");

    // The CLI forms.
    let out = ebsfs_cli(&fs, &["snapshot", "delete", "db@one"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("moved to the recycle bin"),
        "{}",
        describe_output(&out)
    );
    let out = ebsfs_cli(&fs, &["recycle-bin", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(listed.lines().any(|l| l.starts_with("db@one ")), "{listed}");
    let out = ebsfs_cli(&fs, &["recycle-bin", "restore", "db@one"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(sha256(&image), before);

    // A locked snapshot cannot be deleted, by root either: it never reaches the bin.
    let out = run(
        "setfattr",
        &[
            "-n",
            "user.ebsfs.lock",
            "-v",
            "2200-01-01T00:00:00Z",
            fs.snapshot("db@one").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", describe_output(&out));
    let err = fs::remove_dir(fs.snapshot("db@one")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    assert!(in_bin(&fs).is_empty());

    // Purged by hand, and by the daemon once the period is over.
    fs::create_dir(fs.snapshot("db@two")).unwrap();
    fs::create_dir(fs.snapshot("db@three")).unwrap_or_else(|e| {
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
        fs.wait_snapshot("db@two");
        fs::create_dir(fs.snapshot("db@three")).unwrap();
    });
    assert_eq!(fs.wait_snapshot("db@two"), "completed");
    assert_eq!(fs.wait_snapshot("db@three"), "completed");
    fs::remove_dir(fs.snapshot("db@two")).unwrap();
    let out = ebsfs_cli(&fs, &["recycle-bin", "purge", "db@two"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(in_bin(&fs).is_empty());
    fs::remove_dir(fs.snapshot("db@three")).unwrap();
    assert_eq!(in_bin(&fs), ["db@three"]);
    wait_until("db@three purged after 3 s", Duration::from_secs(30), || {
        in_bin(&fs).is_empty()
    });
    fs::create_dir(fs.snapshot("db@three")).expect("its name is free again");
    assert_eq!(fs.wait_snapshot("db@three"), "completed");
    assert_eq!(sha256(&image), before, "db@one is untouched by the purges");
}

//! The mount(8) form: `mount -t fuse.ebsfs DATA_DIR MOUNTPOINT -o OPTS`, as an fstab
//! line runs it. mount.fuse3 runs `ebsfs DATA_DIR MOUNTPOINT -o OPTS` and waits for
//! it to exit, so the mount must be live when `mount` returns and `umount` must stop
//! the daemon cleanly. The tests name the binary by path (`-t fuse PROGRAM#SOURCE`,
//! the same helper invocation) so that nothing has to be installed in the system.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;

/// `mount -t fuse BIN#DATA MNT -o OPTIONS`.
fn mount_helper(data: &Path, mnt: &Path, options: &str) -> Output {
    try_run(
        "mount",
        &[
            "-t".to_string(),
            "fuse".to_string(),
            format!("{BIN}#{}", data.display()),
            mnt.display().to_string(),
            "-o".to_string(),
            options.to_string(),
        ],
    )
}

/// A temporary directory with an empty mount point `mnt` in it.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::Builder::new()
        .prefix("ebsfs-helper")
        .tempdir()
        .unwrap();
    let mnt = root.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    (root, mnt)
}

#[test]
fn mount_helper_form_serves_in_the_background_and_umount_stops_it() {
    if !require_fuse() {
        return;
    }
    let (root, mnt) = scratch();
    let data = root.path().join("data");
    let config = root.path().join("ebsfs.toml");
    fs::write(&config, "block_size = \"4KiB\"\n").unwrap();
    let options = format!(
        "config={},noatime,_netdev,nofail,x-systemd.automount",
        config.display()
    );

    let out = mount_helper(&data, &mnt, &options);
    assert!(
        out.status.success(),
        "mount failed: {}",
        describe_output(&out)
    );
    // mount(8) has returned: the mount is live and served by a background daemon.
    assert_eq!(mounts_at(&mnt), 1);
    let image = mnt.join("volumes/v.img");
    let bytes = pattern(3 << 20, 11);
    fs::write(&image, &bytes).unwrap();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.contains(&mnt.display().to_string()))
        .unwrap();
    assert!(line.contains("fuse.ebsfs"), "mount type: {line}");
    assert!(
        line.contains("noatime"),
        "generic option not passed on: {line}"
    );

    run("umount", &[&mnt]);
    assert_eq!(mounts_at(&mnt), 0);
    wait_until(
        "the background daemon to stop cleanly after umount",
        Duration::from_secs(30),
        || !data.join("session").exists(),
    );
    // The daemon has recorded a clean stop; the next mount needs it gone.
    wait_until(
        "the background daemon to exit",
        Duration::from_secs(30),
        || data_dir_unlocked(&data),
    );
    let log = fs::read_to_string(data.join("ebsfs.log")).unwrap_or_default();
    assert!(log.contains("mounted"), "daemon log missing:\n{log}");

    // The same command mounts the data again, with the volume intact.
    let out = mount_helper(&data, &mnt, &options);
    assert!(
        out.status.success(),
        "second mount failed: {}",
        describe_output(&out)
    );
    assert!(
        fs::read(&image).unwrap() == bytes,
        "volume changed across umount"
    );
    run("umount", &[&mnt]);
    wait_until("the second daemon to stop", Duration::from_secs(30), || {
        !data.join("session").exists()
    });
}

#[test]
fn mount_helper_form_refuses_unknown_options_and_bad_data_dirs() {
    if !require_fuse() {
        return;
    }
    let (root, mnt) = scratch();

    let out = mount_helper(&root.path().join("data"), &mnt, "rw,bogus_option");
    assert!(!out.status.success(), "unknown option accepted");
    assert!(
        describe_output(&out).contains("bogus_option"),
        "error does not name the option: {}",
        describe_output(&out)
    );
    assert_eq!(mounts_at(&mnt), 0);

    // A data directory that cannot be created: the error reaches mount(8)'s caller.
    let file = root.path().join("not-a-dir");
    fs::write(&file, b"x").unwrap();
    let out = mount_helper(&file.join("data"), &mnt, "rw");
    assert!(
        !out.status.success(),
        "mount over a file as data dir succeeded"
    );
    assert!(
        describe_output(&out).contains("not-a-dir"),
        "error does not name the data directory: {}",
        describe_output(&out)
    );
    assert_eq!(mounts_at(&mnt), 0);
}

//! Permissions on a shared (`allow_other`) mount, driven by real users with real
//! supplementary groups: the decisions the daemon makes itself (snapshot `mkdir`,
//! volume xattrs, chgrp) must agree with the kernel's checks of every other access.
//!
//! Users (see `common::users`): `ebsfs-alice` owns the volume and is a supplementary
//! member of `ebsfs-g`; `ebsfs-bob` is a supplementary (never primary) member of
//! `ebsfs-g`; `ebsfs-carol` is in no shared group.

mod common;

use common::users::*;
use common::*;

fn snapshot_names(fs: &Ebsfs) -> Vec<String> {
    std::fs::read_dir(fs.mnt.join("snapshots"))
        .expect("list snapshots/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// `user` reads `volume.img` of a completed snapshot `id` and gets `expected`.
fn assert_snapshot_reads(fs: &Ebsfs, user: &User, id: &str, expected: &[u8]) {
    assert_eq!(fs.wait_snapshot(id), "completed", "{}", fs.log());
    let out = as_user(user, "cat", &[path(&fs.snapshot(id).join("volume.img"))]);
    assert_ok(&out, &format!("{} reads {id}/volume.img", user.name));
    assert!(out.stdout == expected, "{id}/volume.img differs from a.img");
}

#[test]
fn supplementary_group_without_read_cannot_read_or_snapshot() {
    if !require_fuse() {
        return;
    }
    let users = users();
    let fs = shared_mount_with_volume(&users, "0604");
    let volume = path(&fs.volume("a")).to_string();
    let expected = pattern(VOLUME_BYTES, 7);

    // bob is in ebsfs-g through a supplementary group only: the group bits (0) apply.
    let out = as_user(&users.bob, "cat", &[&volume]);
    assert_refused(&out, libc::EACCES, "bob reads a.img");
    assert!(out.stdout.is_empty(), "bob got bytes of a.img");
    let leak = fs.snapshot("a@leak");
    assert_refused(
        &as_user(&users.bob, "mkdir", &[path(&leak)]),
        libc::EACCES,
        "bob snapshots a.img",
    );
    assert!(!leak.exists(), "a@leak exists after a refused mkdir");
    assert!(
        !snapshot_names(&fs).contains(&"a@leak".to_string()),
        "snapshots/ lists a@leak"
    );

    // carol is in no group of the file: the other bits (4) apply.
    let out = as_user(&users.carol, "cat", &[&volume]);
    assert_ok(&out, "carol reads a.img");
    assert!(
        out.stdout == expected,
        "carol read other bytes than a.img holds"
    );
    assert_ok(
        &as_user(&users.carol, "mkdir", &[path(&fs.snapshot("a@carol"))]),
        "carol snapshots a.img",
    );
    assert_snapshot_reads(&fs, &users.carol, "a@carol", &expected);
}

#[test]
fn supplementary_group_with_read_can_read_and_snapshot() {
    if !require_fuse() {
        return;
    }
    let users = users();
    let fs = shared_mount_with_volume(&users, "0640");
    let volume = path(&fs.volume("a")).to_string();
    let expected = pattern(VOLUME_BYTES, 7);

    let out = as_user(&users.bob, "cat", &[&volume]);
    assert_ok(&out, "bob reads a.img");
    assert!(
        out.stdout == expected,
        "bob read other bytes than a.img holds"
    );
    assert_ok(
        &as_user(&users.bob, "mkdir", &[path(&fs.snapshot("a@bob"))]),
        "bob snapshots a.img",
    );
    assert_snapshot_reads(&fs, &users.bob, "a@bob", &expected);

    let out = as_user(&users.carol, "cat", &[&volume]);
    assert_refused(&out, libc::EACCES, "carol reads a.img");
    assert!(out.stdout.is_empty(), "carol got bytes of a.img");
    let refused = fs.snapshot("a@carol");
    assert_refused(
        &as_user(&users.carol, "mkdir", &[path(&refused)]),
        libc::EACCES,
        "carol snapshots a.img",
    );
    assert!(!refused.exists(), "a@carol exists after a refused mkdir");
}

#[test]
fn volume_xattrs_follow_write_permission_of_all_groups() {
    if !require_fuse() {
        return;
    }
    let users = users();
    let fs = shared_mount_with_volume(&users, "0660");
    let volume = path(&fs.volume("a")).to_string();
    let set = |user: &User, value: &str| {
        as_user(
            user,
            "setfattr",
            &["-n", "user.tag", "-v", value, volume.as_str()],
        )
    };
    let tag = || {
        let out = try_run("getfattr", &["--only-values", "-n", "user.tag", &volume]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // 0660: the group's write bit lets bob, a supplementary member; not carol.
    assert_ok(&set(&users.bob, "bob"), "bob sets user.tag at 0660");
    assert_eq!(tag(), "bob");
    assert_refused(
        &set(&users.carol, "carol"),
        libc::EACCES,
        "carol sets user.tag at 0660",
    );
    assert_ok(
        &as_user(&users.bob, "setfattr", &["-x", "user.tag", &volume]),
        "bob removes user.tag at 0660",
    );
    assert_ok(&set(&users.alice, "alice"), "alice sets user.tag");

    // 0606: the group bits (0) bind bob even though the other bits would let him.
    assert_ok(
        &as_user(&users.alice, "chmod", &["0606", &volume]),
        "alice sets 0606",
    );
    assert_refused(
        &set(&users.bob, "bob"),
        libc::EACCES,
        "bob sets user.tag at 0606",
    );
    assert_refused(
        &as_user(&users.bob, "setfattr", &["-x", "user.tag", &volume]),
        libc::EACCES,
        "bob removes user.tag at 0606",
    );
    assert_ok(&set(&users.carol, "carol"), "carol sets user.tag at 0606");
    assert_eq!(tag(), "carol");

    // 0604: nobody but the owner writes.
    assert_ok(
        &as_user(&users.alice, "chmod", &["0604", &volume]),
        "alice sets 0604",
    );
    for user in [&users.bob, &users.carol] {
        assert_refused(
            &set(user, user.name),
            libc::EACCES,
            &format!("{} sets user.tag at 0604", user.name),
        );
    }
    assert_eq!(tag(), "carol");
}

#[test]
fn owner_may_chgrp_only_to_own_groups() {
    if !require_fuse() {
        return;
    }
    let users = users();
    let fs = shared_mount_with_volume(&users, "0640");
    let volume = path(&fs.volume("a")).to_string();
    let group_of = || {
        sh(&format!("stat -c %g {volume}"))
            .trim()
            .parse::<u32>()
            .expect("gid")
    };
    let shared = group_id(SHARED_GROUP);
    assert_eq!(group_of(), shared);

    let alice = &users.alice;
    assert_ok(
        &as_user(alice, "chgrp", &[alice.name, &volume]),
        "alice gives a.img to her primary group",
    );
    assert_eq!(group_of(), alice.gid);
    assert_ok(
        &as_user(alice, "chgrp", &[SHARED_GROUP, &volume]),
        "alice gives a.img to her supplementary group",
    );
    assert_eq!(group_of(), shared);
    assert_refused(
        &as_user(alice, "chgrp", &[users.bob.name, &volume]),
        libc::EPERM,
        "alice gives a.img to bob's private group",
    );
    assert_eq!(group_of(), shared);

    // Only the owner changes the group, only root gives the file away.
    assert_refused(
        &as_user(&users.bob, "chgrp", &[SHARED_GROUP, &volume]),
        libc::EPERM,
        "bob changes the group of alice's a.img",
    );
    assert_refused(
        &as_user(alice, "chown", &[users.bob.name, &volume]),
        libc::EPERM,
        "alice gives a.img to bob",
    );
    assert_refused(
        &as_user(&users.bob, "chmod", &["0666", &volume]),
        libc::EPERM,
        "bob changes the mode of alice's a.img",
    );
    run("chown", &[users.bob.name, volume.as_str()]);
    assert_eq!(
        sh(&format!("stat -c %u {volume}")).trim(),
        users.bob.uid.to_string()
    );
}

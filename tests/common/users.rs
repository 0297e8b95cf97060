//! Real users for the tests of a shared (`allow_other`) mount, and running tools as
//! them.
//!
//! `ebsfs-alice` is a supplementary member of `ebsfs-g`; `ebsfs-bob` is a
//! supplementary (never primary) member of `ebsfs-g`; `ebsfs-carol` is in no shared
//! group. Each has a private primary group of the same name.

use std::path::Path;
use std::process::Output;

use super::{Ebsfs, describe_output, pattern, run, sh, try_run};

pub const SHARED_GROUP: &str = "ebsfs-g";
/// Size of volume `a` made by [`shared_mount_with_volume`].
pub const VOLUME_BYTES: usize = 1 << 20;

pub struct User {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
}

impl User {
    pub fn root() -> User {
        User {
            name: "root",
            uid: 0,
            gid: 0,
        }
    }
}

pub struct Users {
    pub alice: User,
    pub bob: User,
    pub carol: User,
}

/// Creates the test users and group unless they exist. Test processes run in
/// parallel, so the creation is serialised with a lock file (useradd refuses to run
/// while another holds /etc/passwd).
pub fn users() -> Users {
    let script = format!(
        "getent group {g} >/dev/null || groupadd {g}
         for u in ebsfs-alice ebsfs-bob ebsfs-carol; do
           getent passwd $u >/dev/null || useradd -M -U -s /usr/sbin/nologin $u
         done
         usermod -aG {g} ebsfs-alice
         usermod -aG {g} ebsfs-bob",
        g = SHARED_GROUP
    );
    run(
        "flock",
        &["/run/lock/ebsfs-test-users", "bash", "-euc", &script],
    );
    let user = |name: &'static str| {
        let id = |flag: &str| -> u32 {
            sh(&format!("id {flag} {name}"))
                .trim()
                .parse()
                .expect("numeric id")
        };
        User {
            name,
            uid: id("-u"),
            gid: id("-g"),
        }
    };
    let users = Users {
        alice: user("ebsfs-alice"),
        bob: user("ebsfs-bob"),
        carol: user("ebsfs-carol"),
    };
    let shared = group_id(SHARED_GROUP);
    assert_ne!(
        users.bob.gid, shared,
        "bob's membership must be supplementary"
    );
    users
}

pub fn group_id(name: &str) -> u32 {
    let line = sh(&format!("getent group {name}"));
    line.split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .unwrap_or_else(|| panic!("no gid in {line:?}"))
}

/// Runs `program args` as `user`, with the user's primary and supplementary groups.
pub fn as_user(user: &User, program: &str, args: &[&str]) -> Output {
    let mut argv = vec![
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--init-groups".to_string(),
        "--".to_string(),
        program.to_string(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    try_run("setpriv", &argv)
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// Asserts that `out` succeeded.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", describe_output(out));
}

/// The message the C library prints for `errno`, as tools show it on stderr.
pub fn errno_message(errno: i32) -> String {
    let message = std::io::Error::from_raw_os_error(errno).to_string();
    message
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Asserts that `out` failed with exit status 1 and the message of `errno`.
pub fn assert_refused(out: &Output, errno: i32, what: &str) {
    let message = errno_message(errno);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains(&message),
        "{what}: expected exit 1 with {message:?}, got {}",
        describe_output(out)
    );
}

/// A shared mount whose test root the users can traverse, with volume `a` owned by
/// alice, holding [`pattern`] bytes, in group `ebsfs-g` with `mode`.
pub fn shared_mount_with_volume(users: &Users, mode: &str) -> Ebsfs {
    let fs = Ebsfs::start_with("allow_other = true\n");
    run("chmod", &["0755", path(fs.root.path())]);
    let source = fs.write_scratch("a.src", &pattern(VOLUME_BYTES, 7));
    let volume = fs.volume("a");
    let alice = &users.alice;
    assert_ok(
        &as_user(alice, "cp", &[path(&source), path(&volume)]),
        "alice creates a.img",
    );
    assert_ok(
        &as_user(alice, "chgrp", &[SHARED_GROUP, path(&volume)]),
        "alice gives a.img to a group she is a supplementary member of",
    );
    assert_ok(
        &as_user(alice, "chmod", &[mode, path(&volume)]),
        "alice sets the mode",
    );
    fs
}

//! Sharing snapshots as EBS does, with shell tools, on a shared (`allow_other`) mount
//! driven by real users: private by default, shared with chosen users and groups by
//! POSIX ACLs or group ownership, public with `chmod o+rx`, taken back, and
//! `block_public_access`. For each state, every user (and root) tries to read the
//! snapshot image, clone it into a volume, delete the snapshot and chmod it; the test
//! prints the matrix of what each got.
//!
//! Users (see `common::users`): alice owns volume `a` and snapshot `a@s1`; bob is a
//! supplementary member of `ebsfs-g` (as is alice); carol is in no shared group.

mod common;

use std::fmt::Write as _;

use common::users::*;
use common::*;

const SNAPSHOT: &str = "a@s1";

/// What one attempt got: success or the errno its tool reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Got {
    Ok,
    Refused(i32),
    /// Not tried: deleting the snapshot would end the test.
    Skipped,
}

impl Got {
    fn show(self) -> String {
        match self {
            Got::Ok => "ok".into(),
            Got::Skipped => "-".into(),
            Got::Refused(libc::EACCES) => "EACCES".into(),
            Got::Refused(libc::EPERM) => "EPERM".into(),
            Got::Refused(errno) => format!("errno {errno}"),
        }
    }
}

/// The chmod each user tries.
#[derive(Clone, Copy)]
enum Chmod {
    /// To the mode shown: a change of nothing, which still takes being the owner.
    Same,
    /// To this mode, which nobody may set (block public access).
    Refused(&'static str),
}

/// What one user got for read / clone / rmdir / chmod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cell {
    read: Got,
    clone: Got,
    rmdir: Got,
    chmod: Got,
}

impl Cell {
    fn show(&self) -> String {
        [self.read, self.clone, self.rmdir, self.chmod]
            .map(Got::show)
            .join("/")
    }
}

/// The outcome of a tool run: `Ok`, or the errno whose message it printed.
fn got(out: &std::process::Output) -> Got {
    if out.status.success() {
        return Got::Ok;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    [
        libc::EACCES,
        libc::EPERM,
        libc::ENOENT,
        libc::EROFS,
        libc::EIO,
    ]
    .into_iter()
    .find(|&errno| stderr.contains(&errno_message(errno)))
    .map(Got::Refused)
    .unwrap_or_else(|| panic!("unexpected failure: {}", describe_output(out)))
}

struct Sharing {
    fs: Ebsfs,
    users: Users,
    root: User,
    expected_image: Vec<u8>,
    matrix: String,
}

impl Sharing {
    /// Alice's volume `a` (mode 0600) and her completed snapshot `a@s1`.
    fn new() -> Sharing {
        let users = users();
        let fs = shared_mount_with_volume(&users, "0600");
        let dir = fs.snapshot(SNAPSHOT);
        assert_ok(
            &as_user(&users.alice, "mkdir", &[path(&dir)]),
            "alice snapshots a.img",
        );
        assert_eq!(fs.wait_snapshot(SNAPSHOT), "completed", "{}", fs.log());
        let mut matrix = String::new();
        let _ = writeln!(
            matrix,
            "{:<44} | {:<25} | {:<25} | {:<25} | root (each: read/clone/rmdir/chmod)",
            "case", "alice", "bob", "carol"
        );
        Sharing {
            fs,
            users,
            root: User::root(),
            expected_image: pattern(VOLUME_BYTES, 7),
            matrix,
        }
    }

    fn dir(&self) -> String {
        path(&self.fs.snapshot(SNAPSHOT)).to_string()
    }

    /// Alice runs `program args` on the snapshot directory (appended), which must work.
    fn alice(&self, program: &str, args: &[&str]) {
        let dir = self.dir();
        let mut argv = args.to_vec();
        argv.push(&dir);
        let out = as_user(&self.users.alice, program, &argv);
        assert_ok(&out, &format!("alice: {program} {args:?}"));
    }

    /// The snapshot directory's mode as `stat` shows it (octal, e.g. "750").
    fn shown_mode(&self) -> String {
        sh(&format!("stat -c %a {}", self.dir())).trim().to_string()
    }

    /// `user` reads the image: the exact bytes, or refused.
    fn read(&self, user: &User) -> Got {
        let image = format!("{}/volume.img", self.dir());
        let out = as_user(user, "cat", &[&image]);
        let result = got(&out);
        match result {
            Got::Ok => assert!(
                out.stdout == self.expected_image,
                "{} read other bytes than a.img held",
                user.name
            ),
            _ => assert!(out.stdout.is_empty(), "{} got bytes", user.name),
        }
        result
    }

    /// `user` clones the image into `volumes/<user>-copy.img`: an equal volume, which
    /// the user then deletes, or refused with nothing created.
    fn clone_image(&self, user: &User) -> Got {
        let image = self.fs.snapshot(SNAPSHOT).join("volume.img");
        let copy = self.fs.volume(&format!("{}-copy", user.name));
        let out = as_user(user, "cp", &[path(&image), path(&copy)]);
        let result = got(&out);
        if result == Got::Ok {
            assert_eq!(sha256(&copy), sha256(&image), "{}'s clone", user.name);
            assert_ok(
                &as_user(user, "rm", &["-f", path(&copy)]),
                &format!("{} deletes the clone", user.name),
            );
        } else {
            assert!(
                !copy.exists(),
                "a refused clone by {} left {}",
                user.name,
                copy.display()
            );
        }
        result
    }

    /// `user` deletes the snapshot: only tried by those who must be refused.
    fn rmdir(&self, user: &User) -> Got {
        let result = got(&as_user(user, "rmdir", &[&self.dir()]));
        assert_eq!(
            self.fs.status(SNAPSHOT),
            "completed",
            "{} deleted the snapshot",
            user.name
        );
        result
    }

    /// `user` chmods the snapshot directory.
    fn chmod(&self, user: &User, chmod: Chmod) -> Got {
        let mode = match chmod {
            Chmod::Same => self.shown_mode(),
            Chmod::Refused(mode) => mode.to_string(),
        };
        got(&as_user(user, "chmod", &[&mode, &self.dir()]))
    }

    /// Every user tries everything; the row joins the matrix, then is compared with
    /// what `readers` (who may read) and `chmod` imply.
    fn check(&mut self, case: &str, readers: &[&str], chmod: Chmod) {
        let users = [
            &self.users.alice,
            &self.users.bob,
            &self.users.carol,
            &self.root,
        ];
        let owner_or_root = |user: &User| user.uid == 0 || user.uid == self.users.alice.uid;
        let mut row = format!("{case:<44}");
        let mut wrong = Vec::new();
        for user in users {
            let may_read = readers.contains(&user.name);
            let got = Cell {
                read: self.read(user),
                clone: self.clone_image(user),
                rmdir: if owner_or_root(user) {
                    Got::Skipped
                } else {
                    self.rmdir(user)
                },
                chmod: self.chmod(user, chmod),
            };
            let refused_unless = |ok: bool, errno| if ok { Got::Ok } else { Got::Refused(errno) };
            let expected = Cell {
                read: refused_unless(may_read, libc::EACCES),
                clone: refused_unless(may_read, libc::EACCES),
                // The sticky snapshots/ directory: only the owner (or root) deletes.
                rmdir: if owner_or_root(user) {
                    Got::Skipped
                } else {
                    Got::Refused(libc::EPERM)
                },
                chmod: refused_unless(
                    owner_or_root(user) && matches!(chmod, Chmod::Same),
                    libc::EPERM,
                ),
            };
            let _ = write!(row, " | {:<25}", got.show());
            if got != expected {
                wrong.push(format!(
                    "{}: got {}, expected {}",
                    user.name,
                    got.show(),
                    expected.show()
                ));
            }
        }
        let _ = writeln!(self.matrix, "{}", row.trim_end());
        assert!(
            wrong.is_empty(),
            "{case}: {}\n{}\nlog:\n{}",
            wrong.join("; "),
            self.matrix,
            self.fs.log()
        );
    }

    /// Restarts the daemon with `block_public_access` as given.
    fn restart_with_block_public_access(&mut self, on: bool) {
        self.fs.stop();
        std::fs::write(
            &self.fs.config,
            format!("allow_other = true\nblock_public_access = {on}\n"),
        )
        .expect("write config");
        self.fs.restart();
    }

    /// Whether the snapshot directory lists an ACL attribute.
    fn has_acl(&self) -> bool {
        attribute_names(&self.dir()).contains("posix_acl")
    }

    /// The ACL `getfacl` shows, entries only, one line each.
    fn getfacl(&self) -> String {
        sh(&format!("getfacl --omit-header --numeric {}", self.dir()))
    }
}

/// `getfattr -d -m -` of `path`: every attribute, ACLs included.
fn attribute_names(path: &str) -> String {
    sh(&format!("getfattr --absolute-names -d -m - {path}"))
}

/// The whole sharing life of one snapshot; see the module comment.
#[test]
fn snapshot_sharing_matrix() {
    if !require_fuse() {
        return;
    }
    let mut s = Sharing::new();
    let bob_acl = format!("u:{}:rx", s.users.bob.name);
    let bob_entry = format!("u:{}", s.users.bob.name);
    let alice_group = s.users.alice.name;
    assert_eq!(s.shown_mode(), "700", "a new snapshot is private");
    assert!(!s.has_acl(), "a new snapshot has an ACL");
    s.check(
        "private (new snapshot, 0700)",
        &["ebsfs-alice", "root"],
        Chmod::Same,
    );

    s.alice("setfacl", &["-m", &bob_acl]);
    assert_eq!(s.shown_mode(), "750", "the mask shows as the group bits");
    s.check(
        "setfacl -m u:bob:rx",
        &["ebsfs-alice", "ebsfs-bob", "root"],
        Chmod::Same,
    );

    s.alice("setfacl", &["-x", &bob_entry]);
    s.check("setfacl -x u:bob", &["ebsfs-alice", "root"], Chmod::Same);

    s.alice("setfacl", &["-m", &format!("g:{SHARED_GROUP}:rx")]);
    s.check(
        "setfacl -m g:ebsfs-g:rx (bob: supplementary)",
        &["ebsfs-alice", "ebsfs-bob", "root"],
        Chmod::Same,
    );

    s.alice("setfacl", &["-b"]);
    assert_eq!(s.shown_mode(), "700");
    assert!(!s.has_acl(), "setfacl -b left an ACL");
    s.check("setfacl -b", &["ebsfs-alice", "root"], Chmod::Same);

    s.alice("chgrp", &[SHARED_GROUP]);
    s.alice("chmod", &["g+rx"]);
    s.check(
        "chgrp ebsfs-g + chmod g+rx",
        &["ebsfs-alice", "ebsfs-bob", "root"],
        Chmod::Same,
    );

    s.alice("chmod", &["g-rx"]);
    s.alice("chgrp", &[alice_group]);
    s.check(
        "chmod g-rx + chgrp ebsfs-alice",
        &["ebsfs-alice", "root"],
        Chmod::Same,
    );

    let everyone = ["ebsfs-alice", "ebsfs-bob", "ebsfs-carol", "root"];
    s.alice("chmod", &["o+rx"]);
    s.check("chmod o+rx (public)", &everyone, Chmod::Same);

    s.alice("setfacl", &["-m", &bob_acl]);
    s.check("public + setfacl -m u:bob:rx", &everyone, Chmod::Same);
    assert_eq!(s.shown_mode(), "755");

    // Block public access: the public bits are hidden and enforced as hidden; named
    // users keep their way in; nobody may make it public again.
    s.restart_with_block_public_access(true);
    assert_eq!(s.shown_mode(), "750", "other bits hidden");
    let acl = s.getfacl();
    assert!(acl.contains("other::---"), "getfacl shows others: {acl}");
    assert!(
        acl.contains(&format!("user:{}:r-x", s.users.bob.uid)),
        "{acl}"
    );
    s.check(
        "block_public_access = true (chmod o+rx)",
        &["ebsfs-alice", "ebsfs-bob", "root"],
        Chmod::Refused("o+rx"),
    );
    let out = as_user(&s.users.alice, "setfacl", &["-m", "o::rx", &s.dir()]);
    assert_refused(&out, libc::EPERM, "alice: setfacl -m o::rx");
    assert!(
        s.fs.log().contains("block_public_access is on"),
        "no log line says why chmod was refused:\n{}",
        s.fs.log()
    );
    assert_eq!(s.shown_mode(), "750");

    s.restart_with_block_public_access(false);
    assert_eq!(
        s.shown_mode(),
        "755",
        "turning it off shows what was stored"
    );
    s.check("block_public_access = false again", &everyone, Chmod::Same);

    s.alice("chmod", &["o-rx"]);
    s.check(
        "chmod o-rx (taken back from others)",
        &["ebsfs-alice", "ebsfs-bob", "root"],
        Chmod::Same,
    );

    s.alice("setfacl", &["-x", &bob_entry]);
    s.check(
        "setfacl -x u:bob (taken back from bob)",
        &["ebsfs-alice", "root"],
        Chmod::Same,
    );

    // Deleting stays the owner's, or root's.
    let second = s.fs.snapshot("a@s2");
    assert_ok(
        &as_user(&s.users.alice, "mkdir", &[path(&second)]),
        "alice snapshots a.img again",
    );
    assert_eq!(s.fs.wait_snapshot("a@s2"), "completed");
    assert_ok(
        &as_user(&s.root, "rmdir", &[path(&second)]),
        "root deletes a@s2",
    );
    assert_ok(
        &as_user(&s.users.alice, "rmdir", &[&s.dir()]),
        "alice deletes a@s1",
    );
    assert!(!second.exists() && !s.fs.snapshot(SNAPSHOT).exists());
    println!("\n{}", s.matrix);
}

/// ACLs on a volume: the daemon's own decisions (a snapshot needs read permission, a
/// `user.*` attribute write permission) follow them as the kernel does, and a
/// snapshot inherits the volume's `user.*` attributes but not its ACL.
#[test]
fn volume_acls_decide_snapshots_and_attributes_and_stay_on_the_volume() {
    if !require_fuse() {
        return;
    }
    let users = users();
    let fs = shared_mount_with_volume(&users, "0600");
    let volume = path(&fs.volume("a")).to_string();
    let (alice, bob, carol) = (&users.alice, &users.bob, &users.carol);
    let snapshot_as = |user: &User, label: &str| {
        let dir = fs.snapshot(&format!("a@{label}"));
        as_user(user, "mkdir", &[path(&dir)])
    };
    let setfacl = |args: &[&str]| {
        let mut argv = args.to_vec();
        argv.push(&volume);
        assert_ok(
            &as_user(alice, "setfacl", &argv),
            &format!("setfacl {args:?}"),
        );
    };
    assert_refused(
        &snapshot_as(bob, "bob0"),
        libc::EACCES,
        "bob snapshots 0600",
    );

    // A named user entry lets bob read, so snapshot; not carol.
    setfacl(&["-m", &format!("u:{}:r", bob.name)]);
    assert_ok(&as_user(bob, "cat", &[&volume]), "bob reads a.img");
    assert_ok(&snapshot_as(bob, "bob1"), "bob snapshots a.img");
    assert_refused(&snapshot_as(carol, "carol1"), libc::EACCES, "carol");

    // A named group entry counts through a supplementary group.
    setfacl(&["-x", &format!("u:{}", bob.name)]);
    assert_refused(&snapshot_as(bob, "bob2"), libc::EACCES, "bob without entry");
    setfacl(&["-m", &format!("g:{SHARED_GROUP}:r")]);
    assert_ok(&snapshot_as(bob, "bob3"), "bob snapshots through ebsfs-g");
    assert_refused(&snapshot_as(carol, "carol3"), libc::EACCES, "carol");

    // Write permission for user.* attributes comes through the ACL too.
    let tag = |user: &User| {
        as_user(
            user,
            "setfattr",
            &["-n", "user.tag", "-v", user.name, &volume],
        )
    };
    assert_refused(&tag(bob), libc::EACCES, "bob tags with r--");
    setfacl(&["-m", &format!("g:{SHARED_GROUP}:rw")]);
    assert_ok(&tag(bob), "bob tags with rw-");

    // The kernel consults an ACL only while the mask (group bits) is not empty; with
    // mask::--- a named user gets the other bits. The daemon agrees.
    setfacl(&["-m", &format!("u:{}:---", carol.name)]);
    assert_ok(&as_user(alice, "chmod", &["0604", &volume]), "mask ---");
    assert_ok(
        &as_user(carol, "cat", &[&volume]),
        "carol reads with mask ---",
    );
    assert_ok(
        &snapshot_as(carol, "carol4"),
        "carol snapshots with mask ---",
    );
    assert_ok(&as_user(alice, "chmod", &["0644", &volume]), "mask r--");
    assert_refused(
        &as_user(carol, "cat", &[&volume]),
        libc::EACCES,
        "carol, named ---",
    );
    assert_refused(
        &snapshot_as(carol, "carol5"),
        libc::EACCES,
        "carol, named ---",
    );

    // Only the owner changes the ACL; others get EPERM from the kernel.
    let out = as_user(
        bob,
        "setfacl",
        &["-m", &format!("u:{}:rw", bob.name), &volume],
    );
    assert_refused(&out, libc::EPERM, "bob changes alice's ACL");

    // The snapshots bob took are his and private, with the volume's user.* only.
    let dir = fs.snapshot("a@bob3");
    assert_eq!(fs.wait_snapshot("a@bob3"), "completed");
    let shown = sh(&format!("stat -c '%a %U' {}", path(&dir)));
    assert_eq!(shown.trim(), "700 ebsfs-bob");
    let names = attribute_names(path(&dir));
    assert!(
        !names.contains("posix_acl"),
        "the volume's ACL was copied: {names}"
    );
    let volume_names = attribute_names(&volume);
    assert!(
        volume_names.contains("system.posix_acl_access"),
        "{volume_names}"
    );
    // bob tagged the volume after a@bob3 was taken: the tag is not in it.
    assert!(!names.contains("user.tag"), "{names}");
    let late = fs.snapshot("a@late");
    assert_ok(&as_user(alice, "mkdir", &[path(&late)]), "alice snapshots");
    assert_eq!(fs.wait_snapshot("a@late"), "completed");
    let names = attribute_names(path(&late));
    assert!(
        names.contains("user.tag=\"ebsfs-bob\""),
        "user.* not copied: {names}"
    );
    assert!(
        !names.contains("posix_acl"),
        "the volume's ACL was copied: {names}"
    );
}

//! Permission decisions the daemon makes itself, by the kernel's rules.
//!
//! The mount uses `default_permissions`, so the kernel checks every ordinary access
//! against a node's mode. A few decisions are the daemon's alone: a snapshot needs
//! read permission on its volume, a volume's xattrs need write permission, and chmod,
//! chown and chgrp have owner rules. They must agree with the kernel's, or a user gets
//! through one door what another refuses: owner bits if the caller's fs uid owns the
//! object, else group bits if its group is any of the caller's groups (fs gid or a
//! supplementary group), else other bits; root passes.
//!
//! A request carries only the fs uid and fs gid. Supplementary groups are read from
//! `/proc/<pid>/status` of the calling thread, and only when a decision depends on
//! them; if they cannot be read (the process is gone, or its ids no longer match the
//! request's) the answer is "denied", never a guess.

use std::cell::OnceCell;
use std::fs;

use super::{FsError, FsResult};
use crate::namespace::Owner;

/// The permission a decision asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// The bit within one class (owner, group, other) of a mode.
    fn bit(self) -> u16 {
        match self {
            Access::Read => 4,
            Access::Write => 2,
        }
    }
}

/// Who is asking: the fs uid and gid the kernel checked the request with, and where
/// to find the supplementary groups.
#[derive(Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    groups: Groups,
}

#[derive(Debug)]
enum Groups {
    /// Read from `/proc/<pid>/status` on first use.
    OfProcess {
        pid: u32,
        read: OnceCell<Result<Vec<u32>, String>>,
    },
    Known(Vec<u32>),
}

impl Caller {
    /// The thread `pid` that sent a request with fs ids `uid`/`gid`.
    pub fn of_process(uid: u32, gid: u32, pid: u32) -> Caller {
        Caller {
            uid,
            gid,
            groups: Groups::OfProcess {
                pid,
                read: OnceCell::new(),
            },
        }
    }

    /// A caller whose supplementary groups are already known.
    pub fn with_groups(uid: u32, gid: u32, groups: Vec<u32>) -> Caller {
        Caller {
            uid,
            gid,
            groups: Groups::Known(groups),
        }
    }

    fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether `gid` is one of the caller's groups (the kernel's `in_group_p`).
    pub fn in_group(&self, gid: u32) -> FsResult<bool> {
        if gid == self.gid {
            return Ok(true);
        }
        Ok(self.supplementary_groups()?.contains(&gid))
    }

    fn supplementary_groups(&self) -> FsResult<&[u32]> {
        match &self.groups {
            Groups::Known(groups) => Ok(groups),
            Groups::OfProcess { pid, read } => read
                .get_or_init(|| read_groups(*pid, self.uid, self.gid))
                .as_deref()
                .map_err(|why| FsError::AccessDenied(why.clone())),
        }
    }

    /// May the caller have `want` on an object with `owner`'s uid, gid and mode?
    pub fn permits(&self, owner: &Owner, want: Access) -> FsResult<bool> {
        if self.is_root() {
            return Ok(true);
        }
        let class = if self.uid == owner.uid {
            owner.mode >> 6
        } else if self.in_group(owner.gid)? {
            owner.mode >> 3
        } else {
            owner.mode
        };
        Ok(class & want.bit() != 0)
    }

    /// chmod: only the owner or root.
    pub fn may_change_mode(&self, owner: &Owner) -> bool {
        self.is_root() || self.uid == owner.uid
    }

    /// chown: root gives an object to anyone; its owner may only "change" it to
    /// itself (the kernel's `chown_ok`).
    pub fn may_change_owner(&self, owner: &Owner, uid: u32) -> bool {
        self.is_root() || (self.uid == owner.uid && uid == owner.uid)
    }

    /// chgrp: root to any group; the owner to the object's current group or to one
    /// of its own groups (the kernel's `chgrp_ok`).
    pub fn may_change_group(&self, owner: &Owner, gid: u32) -> FsResult<bool> {
        if self.is_root() {
            return Ok(true);
        }
        if self.uid != owner.uid {
            return Ok(false);
        }
        Ok(gid == owner.gid || self.in_group(gid)?)
    }
}

/// The ids `/proc/<pid>/status` reports that file access is checked with.
#[derive(Debug, PartialEq, Eq)]
struct ProcessIds {
    fs_uid: u32,
    fs_gid: u32,
    groups: Vec<u32>,
}

/// Parses the `Uid:`, `Gid:` (real, effective, saved, fs) and `Groups:` lines.
fn parse_status(text: &str) -> Result<ProcessIds, String> {
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .ok_or_else(|| format!("no {key} line"))
    };
    let numbers = |key: &str| -> Result<Vec<u32>, String> {
        field(key)?
            .split_whitespace()
            .map(|n| n.parse().map_err(|_| format!("{key} {n:?} is not an id")))
            .collect()
    };
    let fs_id = |key: &str| -> Result<u32, String> {
        numbers(key)?
            .get(3)
            .copied()
            .ok_or_else(|| format!("{key} line has no fs id"))
    };
    Ok(ProcessIds {
        fs_uid: fs_id("Uid:")?,
        fs_gid: fs_id("Gid:")?,
        groups: numbers("Groups:")?,
    })
}

/// Supplementary groups of thread `pid`, provided it still has the fs ids its request
/// was sent with (otherwise the pid may belong to another process by now).
fn read_groups(pid: u32, uid: u32, gid: u32) -> Result<Vec<u32>, String> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the caller's groups from {path}: {e}"))?;
    let ids = parse_status(&text).map_err(|e| format!("{path}: {e}"))?;
    if (ids.fs_uid, ids.fs_gid) != (uid, gid) {
        return Err(format!(
            "process {pid} now has fs ids {}:{}, not {uid}:{gid} as in its request",
            ids.fs_uid, ids.fs_gid
        ));
    }
    Ok(ids.groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: u32 = 1001;
    const BOB: u32 = 1002;
    const ALICE_GROUP: u32 = 2001;
    const BOB_GROUP: u32 = 2002;
    const SHARED: u32 = 3000;

    fn volume(mode: u16) -> Owner {
        Owner {
            uid: ALICE,
            gid: SHARED,
            mode,
        }
    }

    fn alice() -> Caller {
        Caller::with_groups(ALICE, ALICE_GROUP, vec![ALICE_GROUP, SHARED])
    }

    /// Bob is in the shared group only as a supplementary member.
    fn bob() -> Caller {
        Caller::with_groups(BOB, BOB_GROUP, vec![BOB_GROUP, SHARED])
    }

    fn carol() -> Caller {
        Caller::with_groups(1003, 2003, vec![2003])
    }

    fn root() -> Caller {
        Caller::with_groups(0, 0, vec![])
    }

    fn permits(caller: &Caller, mode: u16, want: Access) -> bool {
        caller.permits(&volume(mode), want).unwrap()
    }

    #[test]
    fn owner_bits_bind_the_owner_even_when_others_may_more() {
        assert!(permits(&alice(), 0o600, Access::Read));
        assert!(permits(&alice(), 0o600, Access::Write));
        assert!(!permits(&alice(), 0o077, Access::Read));
        assert!(!permits(&alice(), 0o477, Access::Write));
    }

    #[test]
    fn supplementary_group_gets_the_group_bits() {
        assert!(!permits(&bob(), 0o604, Access::Read));
        assert!(permits(&bob(), 0o640, Access::Read));
        assert!(permits(&bob(), 0o660, Access::Write));
        assert!(!permits(&bob(), 0o646, Access::Write));
    }

    #[test]
    fn primary_group_gets_the_group_bits() {
        let primary = Caller::with_groups(BOB, SHARED, vec![]);
        assert!(!permits(&primary, 0o604, Access::Read));
        assert!(permits(&primary, 0o640, Access::Read));
    }

    #[test]
    fn other_users_get_the_other_bits() {
        assert!(permits(&carol(), 0o604, Access::Read));
        assert!(!permits(&carol(), 0o640, Access::Read));
        assert!(permits(&carol(), 0o606, Access::Write));
        assert!(!permits(&carol(), 0o664, Access::Write));
    }

    #[test]
    fn root_reads_and_writes_anything() {
        assert!(permits(&root(), 0o000, Access::Read));
        assert!(permits(&root(), 0o000, Access::Write));
    }

    #[test]
    fn owner_changes_the_group_only_to_own_groups() {
        let owner = volume(0o640);
        assert!(alice().may_change_group(&owner, SHARED).unwrap());
        assert!(alice().may_change_group(&owner, ALICE_GROUP).unwrap());
        assert!(!alice().may_change_group(&owner, BOB_GROUP).unwrap());
        // The current group stays allowed even after the owner left it.
        let left = Caller::with_groups(ALICE, ALICE_GROUP, vec![]);
        assert!(left.may_change_group(&owner, SHARED).unwrap());
        // A member of the target group who is not the owner may not.
        assert!(!bob().may_change_group(&owner, BOB_GROUP).unwrap());
        assert!(root().may_change_group(&owner, BOB_GROUP).unwrap());
    }

    #[test]
    fn only_root_gives_an_object_away() {
        let owner = volume(0o640);
        assert!(alice().may_change_owner(&owner, ALICE));
        assert!(!alice().may_change_owner(&owner, BOB));
        assert!(!bob().may_change_owner(&owner, ALICE));
        assert!(root().may_change_owner(&owner, BOB));
        assert!(alice().may_change_mode(&owner));
        assert!(!bob().may_change_mode(&owner));
        assert!(root().may_change_mode(&owner));
    }

    #[test]
    fn groups_are_read_only_when_a_decision_needs_them() {
        // pid 0 has no /proc entry: any read of the groups would deny.
        let gone = |uid, gid| Caller::of_process(uid, gid, 0);
        assert!(
            gone(ALICE, ALICE_GROUP)
                .permits(&volume(0o600), Access::Read)
                .unwrap()
        );
        assert!(gone(0, 0).permits(&volume(0o000), Access::Write).unwrap());
        assert!(
            gone(BOB, SHARED)
                .permits(&volume(0o640), Access::Read)
                .unwrap()
        );
        assert!(
            gone(ALICE, ALICE_GROUP)
                .may_change_group(&volume(0o600), ALICE_GROUP)
                .unwrap()
        );
        assert!(
            !gone(BOB, BOB_GROUP)
                .may_change_group(&volume(0o600), BOB_GROUP)
                .unwrap()
        );
    }

    #[test]
    fn unreadable_groups_deny_with_eacces() {
        let err = Caller::of_process(BOB, BOB_GROUP, 0)
            .permits(&volume(0o604), Access::Read)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EACCES, "{err}");
    }

    #[test]
    fn groups_of_this_process_come_from_proc() {
        // SAFETY: these only read the calling thread's credentials.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let me = Caller::of_process(uid, gid, std::process::id());
        assert!(me.in_group(gid).unwrap());
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let expected = parse_status(&status).unwrap().groups;
        assert_eq!(me.supplementary_groups().unwrap(), expected.as_slice());
        // A pid whose ids differ from the request's is refused, not trusted.
        let other = Caller::of_process(uid.wrapping_add(1), gid, std::process::id());
        assert!(matches!(
            other.in_group(gid.wrapping_add(1)),
            Err(FsError::AccessDenied(_))
        ));
    }

    const STATUS: &str = "Name:\tcat\nUmask:\t0022\nState:\tR (running)\n\
        Tgid:\t4242\nPid:\t4242\nPPid:\t1\n\
        Uid:\t1002\t1002\t1002\t1005\nGid:\t2002\t2003\t2002\t2004\n\
        FDSize:\t64\nGroups:\t2002 3000 \nNStgid:\t4242\n";

    #[test]
    fn status_gives_fs_ids_and_groups() {
        assert_eq!(
            parse_status(STATUS),
            Ok(ProcessIds {
                fs_uid: 1005,
                fs_gid: 2004,
                groups: vec![2002, 3000],
            })
        );
    }

    #[test]
    fn status_with_no_supplementary_groups() {
        let text = STATUS.replace("Groups:\t2002 3000 \n", "Groups:\t\n");
        assert_eq!(parse_status(&text).unwrap().groups, Vec::<u32>::new());
    }

    #[test]
    fn damaged_status_is_an_error() {
        assert!(parse_status("Name:\tcat\n").is_err());
        assert!(parse_status(&STATUS.replace("\t1005", "")).is_err());
        assert!(parse_status(&STATUS.replace("3000", "x")).is_err());
    }
}

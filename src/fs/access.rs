//! Permission decisions the daemon makes itself, by the kernel's rules.
//!
//! The mount uses `default_permissions` and `FUSE_POSIX_ACL`, so the kernel checks
//! every ordinary access against a node's mode and access ACL. A few decisions are the
//! daemon's alone: a snapshot needs read permission on its volume, a volume's xattrs
//! need write permission, and chmod, chown, chgrp and ACL changes have owner rules.
//! They must agree with the kernel's (`acl_permission_check`, `posix_acl_permission`),
//! or a user gets through one door what another refuses:
//!
//! 1. root passes; the owner gets the mode's owner bits;
//! 2. if the object has an access ACL and the mode's group bits (its mask) are not
//!    all clear: a named user entry for the caller, limited by the mask; else the
//!    owning group and the named group entries, for each that is one of the caller's
//!    groups: granted if any grants it (limited by the mask), denied if none does;
//!    else the OTHER entry;
//! 3. otherwise the group bits if the object's group is one of the caller's groups
//!    (fs gid or a supplementary group), else the other bits.
//!
//! A request carries only the fs uid and fs gid. Supplementary groups are read from
//! `/proc/<pid>/status` of the calling thread, and only when a decision depends on
//! them; if they cannot be read (the process is gone, or its ids no longer match the
//! request's) the answer is "denied", never a guess.

use std::cell::OnceCell;
use std::fs;

use super::acl::{PosixAcl, Tag};
use super::{FsError, FsResult};
use crate::namespace::Owner;

/// The permission a decision asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// The bit within one class (owner, group, other) of a mode, or of an ACL entry.
    fn bit(self) -> u8 {
        match self {
            Access::Read => 4,
            Access::Write => 2,
        }
    }
}

/// Whether the class of `mode` that starts at bit `shift` holds `want`.
fn mode_grants(mode: u16, shift: u16, want: Access) -> bool {
    (mode >> shift) & u16::from(want.bit()) != 0
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

    /// May the caller have `want` on an object with `owner`'s uid, gid and mode, and
    /// the access ACL `acl`? The kernel's algorithm (see the module comment).
    pub fn permits(&self, owner: &Owner, acl: Option<&PosixAcl>, want: Access) -> FsResult<bool> {
        if self.is_root() {
            return Ok(true);
        }
        if self.uid == owner.uid {
            return Ok(mode_grants(owner.mode, 6, want));
        }
        // The kernel consults the ACL only when the mask (the group bits) is not
        // empty; with an empty mask the group and other bits decide.
        if let Some(acl) = acl
            && owner.mode & 0o070 != 0
        {
            return self.acl_permits(acl, owner.gid, want);
        }
        // Group membership matters only where the group and other bits differ.
        let (group, other) = (
            mode_grants(owner.mode, 3, want),
            mode_grants(owner.mode, 0, want),
        );
        if group != other && self.in_group(owner.gid)? {
            return Ok(group);
        }
        Ok(other)
    }

    /// The kernel's `posix_acl_permission` for a caller who is not the owner.
    fn acl_permits(&self, acl: &PosixAcl, owning_gid: u32, want: Access) -> FsResult<bool> {
        let bit = want.bit();
        let mask = acl
            .entries()
            .iter()
            .find(|e| e.tag == Tag::Mask)
            .map_or(0o7, |e| e.perm);
        let mut in_a_group = false;
        for entry in acl.entries() {
            let member = match entry.tag {
                Tag::User(uid) if uid == self.uid => return Ok(entry.perm & mask & bit != 0),
                Tag::GroupObj => self.in_group(owning_gid)?,
                Tag::Group(gid) => self.in_group(gid)?,
                Tag::Other => return Ok(!in_a_group && entry.perm & bit != 0),
                Tag::UserObj | Tag::User(_) | Tag::Mask => false,
            };
            if member {
                in_a_group = true;
                if entry.perm & bit != 0 {
                    return Ok(mask & bit != 0);
                }
            }
        }
        // A valid ACL always ends with OTHER.
        Ok(false)
    }

    /// chmod, chown to itself and ACL changes: only the owner or root (the kernel's
    /// `inode_owner_or_capable`).
    pub fn owns(&self, owner: &Owner) -> bool {
        self.is_root() || self.uid == owner.uid
    }

    /// chown: root gives an object to anyone; its owner may only "change" it to
    /// itself (the kernel's `chown_ok`).
    pub fn may_change_owner(&self, owner: &Owner, uid: u32) -> bool {
        self.is_root() || (self.owns(owner) && uid == owner.uid)
    }

    /// chgrp: root to any group; the owner to the object's current group or to one
    /// of its own groups (the kernel's `chgrp_ok`).
    pub fn may_change_group(&self, owner: &Owner, gid: u32) -> FsResult<bool> {
        if self.is_root() {
            return Ok(true);
        }
        if !self.owns(owner) {
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
        caller.permits(&volume(mode), None, want).unwrap()
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

    /// `volume(mode)` with an access ACL whose base entries agree with `mode` and the
    /// named entries `named`; the mask is the mode's group bits.
    fn with_acl(mode: u16, named: &[(Tag, u8)]) -> (Owner, PosixAcl) {
        let class = |shift: u16| ((mode >> shift) & 0o7) as u8;
        let mut entries = vec![(Tag::UserObj, class(6)), (Tag::GroupObj, 0)];
        entries.extend_from_slice(named);
        entries.extend([(Tag::Mask, class(3)), (Tag::Other, class(0))]);
        entries.sort_by_key(|(tag, _)| *tag);
        (volume(mode), crate::fs::acl::tests::acl(&entries))
    }

    fn acl_permits(caller: &Caller, mode: u16, named: &[(Tag, u8)], want: Access) -> bool {
        let (owner, acl) = with_acl(mode, named);
        caller.permits(&owner, Some(&acl), want).unwrap()
    }

    #[test]
    fn a_named_user_gets_its_entry_limited_by_the_mask() {
        // acl(5): user:bob:rw- with mask::r-- is effectively r--.
        let named = [(Tag::User(BOB), 6)];
        assert!(acl_permits(&bob(), 0o740, &named, Access::Read));
        assert!(!acl_permits(&bob(), 0o740, &named, Access::Write));
        assert!(acl_permits(&bob(), 0o760, &named, Access::Write));
        // carol is named nowhere: OTHER (none here).
        assert!(!acl_permits(&carol(), 0o740, &named, Access::Read));
    }

    #[test]
    fn a_named_user_entry_wins_over_group_and_other() {
        // carol named with nothing is refused what others may.
        let named = [(Tag::User(1003), 0)];
        assert!(!acl_permits(&carol(), 0o744, &named, Access::Read));
        assert!(acl_permits(&carol(), 0o744, &[], Access::Read));
        // bob named with nothing, although his group could read.
        let named = [(Tag::User(BOB), 0), (Tag::Group(SHARED), 4)];
        assert!(!acl_permits(&bob(), 0o744, &named, Access::Read));
    }

    #[test]
    fn named_groups_count_through_supplementary_groups() {
        let named = [(Tag::Group(SHARED), 4)];
        assert!(acl_permits(&bob(), 0o740, &named, Access::Read));
        assert!(!acl_permits(&bob(), 0o740, &named, Access::Write));
        assert!(!acl_permits(&carol(), 0o740, &named, Access::Read));
        // A group entry that matches but does not grant denies, whatever OTHER says;
        // another matching entry that grants is enough.
        let denying = [(Tag::Group(SHARED), 0)];
        assert!(!acl_permits(&bob(), 0o744, &denying, Access::Read));
        let either = [(Tag::Group(BOB_GROUP), 0), (Tag::Group(SHARED), 4)];
        assert!(acl_permits(&bob(), 0o740, &either, Access::Read));
        // The mask limits group entries too.
        let writer = [(Tag::Group(SHARED), 6)];
        assert!(!acl_permits(&bob(), 0o740, &writer, Access::Write));
    }

    #[test]
    fn the_owning_group_entry_applies_to_members() {
        // volume() is in SHARED; GROUP_OBJ is --- in with_acl, so set it here.
        let owner = volume(0o750);
        let acl = crate::fs::acl::tests::acl(&[
            (Tag::UserObj, 7),
            (Tag::GroupObj, 4),
            (Tag::Mask, 5),
            (Tag::Other, 0),
        ]);
        assert!(bob().permits(&owner, Some(&acl), Access::Read).unwrap());
        assert!(!bob().permits(&owner, Some(&acl), Access::Write).unwrap());
        assert!(!carol().permits(&owner, Some(&acl), Access::Read).unwrap());
    }

    #[test]
    fn the_owner_and_root_ignore_the_acl() {
        let named = [(Tag::User(ALICE), 7), (Tag::Group(ALICE_GROUP), 7)];
        assert!(!acl_permits(&alice(), 0o070, &named, Access::Read));
        assert!(acl_permits(
            &alice(),
            0o400,
            &[(Tag::User(ALICE), 0)],
            Access::Read
        ));
        assert!(acl_permits(
            &root(),
            0o000,
            &[(Tag::User(0), 0)],
            Access::Write
        ));
    }

    #[test]
    fn other_applies_to_everyone_else() {
        let named = [(Tag::User(BOB), 4)];
        assert!(acl_permits(&carol(), 0o744, &named, Access::Read));
        assert!(!acl_permits(&carol(), 0o744, &named, Access::Write));
    }

    #[test]
    fn an_empty_mask_leaves_the_decision_to_the_mode_as_the_kernel_does() {
        // The kernel consults an ACL only when the group bits are not all clear: with
        // mask::--- a named user gets the other bits, not nothing (acl(5) would say
        // nothing), and a member of the owning group the group bits.
        let named = [(Tag::User(1003), 7), (Tag::User(BOB), 7)];
        assert!(acl_permits(&carol(), 0o704, &named, Access::Read));
        assert!(!acl_permits(&carol(), 0o700, &named, Access::Read));
        assert!(!acl_permits(&bob(), 0o704, &named, Access::Read));
    }

    #[test]
    fn groups_are_read_only_when_an_acl_decision_needs_them() {
        let gone = Caller::of_process(BOB, BOB_GROUP, 0);
        assert!(acl_permits(
            &gone,
            0o740,
            &[(Tag::User(BOB), 4)],
            Access::Read
        ));
        let (owner, acl) = with_acl(0o740, &[(Tag::Group(SHARED), 4)]);
        let err = gone.permits(&owner, Some(&acl), Access::Read).unwrap_err();
        assert_eq!(err.errno(), libc::EACCES, "{err}");
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
        assert!(alice().owns(&owner));
        assert!(!bob().owns(&owner));
        assert!(root().owns(&owner));
    }

    #[test]
    fn groups_are_read_only_when_a_decision_needs_them() {
        // pid 0 has no /proc entry: any read of the groups would deny.
        let gone = |uid, gid| Caller::of_process(uid, gid, 0);
        assert!(
            gone(ALICE, ALICE_GROUP)
                .permits(&volume(0o600), None, Access::Read)
                .unwrap()
        );
        assert!(
            gone(0, 0)
                .permits(&volume(0o000), None, Access::Write)
                .unwrap()
        );
        assert!(
            gone(BOB, SHARED)
                .permits(&volume(0o640), None, Access::Read)
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
            .permits(&volume(0o604), None, Access::Read)
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

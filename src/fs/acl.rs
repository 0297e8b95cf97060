//! POSIX access control lists on volumes and snapshot directories.
//!
//! With `FUSE_POSIX_ACL` the kernel loads and stores ACLs through the extended
//! attributes `system.posix_acl_access` and `system.posix_acl_default`, in its xattr
//! form (a header `u32` version 2, then entries `{tag u16, perm u16, id u32}`, all
//! little-endian), and enforces them itself. It leaves three things to the daemon:
//!
//! - refusing what its own `posix_acl_valid` would refuse (`EINVAL`);
//! - keeping the mode and the access ACL one: setting an ACL sets the mode's
//!   permission bits (USER_OBJ, MASK or else GROUP_OBJ, OTHER), and chmod sets those
//!   entries; an ACL that says no more than a mode is not kept (as on ext4), so
//!   `setfacl -b` leaves no attribute behind;
//! - making its own decisions with the same algorithm ([`super::Caller::permits`]).
//!
//! Invariant: a stored access ACL is valid, never minimal, and its base entries agree
//! with the mode's permission bits.

use super::{Caller, FsError, FsResult, xattr};
use crate::namespace::{NamespaceError, Owner, Xattrs};

/// The two ACLs an inode may have, and the xattr each is kept in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclKind {
    /// Who may do what with the object itself.
    Access,
    /// What a new object in a directory inherits (kept, but nothing is ever created
    /// inside a snapshot directory).
    Default,
}

impl AclKind {
    pub fn xattr_name(self) -> &'static str {
        match self {
            AclKind::Access => "system.posix_acl_access",
            AclKind::Default => "system.posix_acl_default",
        }
    }

    pub fn from_xattr_name(name: &str) -> Option<AclKind> {
        [AclKind::Access, AclKind::Default]
            .into_iter()
            .find(|kind| kind.xattr_name() == name)
    }
}

/// The xattr form's version (`POSIX_ACL_XATTR_VERSION`).
const VERSION: u32 = 2;
const HEADER_BYTES: usize = 4;
const ENTRY_BYTES: usize = 8;
/// The id the kernel writes for entries that name nobody (`ACL_UNDEFINED_ID`).
const UNDEFINED_ID: u32 = u32::MAX;
/// Read, write, execute: the only permission bits an entry may hold.
const RWX: u8 = 0o7;

/// Whom an entry is about. The derived order is the order the kernel requires:
/// by tag, and named entries by id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tag {
    UserObj,
    User(u32),
    GroupObj,
    Group(u32),
    Mask,
    Other,
}

impl Tag {
    fn code(self) -> u16 {
        match self {
            Tag::UserObj => 0x01,
            Tag::User(_) => 0x02,
            Tag::GroupObj => 0x04,
            Tag::Group(_) => 0x08,
            Tag::Mask => 0x10,
            Tag::Other => 0x20,
        }
    }

    fn id(self) -> u32 {
        match self {
            Tag::User(id) | Tag::Group(id) => id,
            _ => UNDEFINED_ID,
        }
    }

    fn decode(code: u16, id: u32) -> Option<Tag> {
        Some(match code {
            0x01 => Tag::UserObj,
            0x02 => Tag::User(id),
            0x04 => Tag::GroupObj,
            0x08 => Tag::Group(id),
            0x10 => Tag::Mask,
            0x20 => Tag::Other,
            _ => return None,
        })
    }

    fn is_named(self) -> bool {
        matches!(self, Tag::User(_) | Tag::Group(_))
    }
}

/// One entry: whom, and which of read (4), write (2), execute (1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclEntry {
    pub tag: Tag,
    pub perm: u8,
}

/// Why bytes are not an ACL the kernel would accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("{0} bytes are not a 4-byte header and whole 8-byte entries")]
    Size(usize),
    #[error("version {0}, not 2")]
    Version(u32),
    #[error("entry {index}: unknown tag {code:#x}")]
    UnknownTag { index: usize, code: u16 },
    #[error("entry {index}: permissions {perm:#o} are more than rwx")]
    Permissions { index: usize, perm: u16 },
    #[error("entry {index} is out of order or repeats an earlier one")]
    Order { index: usize },
    #[error("there is no {0} entry")]
    Missing(&'static str),
    #[error("named user or group entries need a mask entry")]
    NoMask,
    #[error("entry {index} names id {UNDEFINED_ID}, which is no user or group")]
    UndefinedId { index: usize },
}

/// A valid ACL: entries in the kernel's order, one each of USER_OBJ, GROUP_OBJ and
/// OTHER, a MASK whenever a named entry exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PosixAcl {
    entries: Vec<AclEntry>,
}

impl PosixAcl {
    /// Checks `entries` as the kernel's `posix_acl_valid` does.
    pub fn new(entries: Vec<AclEntry>) -> Result<PosixAcl, AclError> {
        for (index, pair) in entries.windows(2).enumerate() {
            if pair[0].tag >= pair[1].tag {
                return Err(AclError::Order { index: index + 1 });
            }
        }
        let has = |tag: Tag| entries.iter().any(|e| e.tag == tag);
        for (tag, name) in [
            (Tag::UserObj, "USER_OBJ"),
            (Tag::GroupObj, "GROUP_OBJ"),
            (Tag::Other, "OTHER"),
        ] {
            if !has(tag) {
                return Err(AclError::Missing(name));
            }
        }
        if entries.iter().any(|e| e.tag.is_named()) && !has(Tag::Mask) {
            return Err(AclError::NoMask);
        }
        Ok(PosixAcl { entries })
    }

    /// Parses and validates the xattr form. The ids of entries that name nobody are
    /// ignored, as the kernel ignores them.
    pub fn from_xattr(bytes: &[u8]) -> Result<PosixAcl, AclError> {
        let body = bytes.len().checked_sub(HEADER_BYTES);
        let Some(body) = body.filter(|b| *b > 0 && b % ENTRY_BYTES == 0) else {
            return Err(AclError::Size(bytes.len()));
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let version = u32_at(0);
        if version != VERSION {
            return Err(AclError::Version(version));
        }
        let entries = (0..body / ENTRY_BYTES)
            .map(|index| {
                let at = HEADER_BYTES + index * ENTRY_BYTES;
                let (code, perm, id) = (u16_at(at), u16_at(at + 2), u32_at(at + 4));
                let tag = Tag::decode(code, id).ok_or(AclError::UnknownTag { index, code })?;
                if tag.is_named() && id == UNDEFINED_ID {
                    return Err(AclError::UndefinedId { index });
                }
                if perm & !u16::from(RWX) != 0 {
                    return Err(AclError::Permissions { index, perm });
                }
                Ok(AclEntry {
                    tag,
                    perm: perm as u8,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        PosixAcl::new(entries)
    }

    /// The xattr form, as the kernel writes it.
    pub fn to_xattr(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + self.entries.len() * ENTRY_BYTES);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        for entry in &self.entries {
            bytes.extend_from_slice(&entry.tag.code().to_le_bytes());
            bytes.extend_from_slice(&u16::from(entry.perm).to_le_bytes());
            bytes.extend_from_slice(&entry.tag.id().to_le_bytes());
        }
        bytes
    }

    pub fn entries(&self) -> &[AclEntry] {
        &self.entries
    }

    fn perm_of(&self, tag: Tag) -> Option<u8> {
        self.entries.iter().find(|e| e.tag == tag).map(|e| e.perm)
    }

    fn set_perm(&mut self, tag: Tag, perm: u8) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.tag == tag) {
            entry.perm = perm & RWX;
        }
    }

    /// The entry the mode's group bits stand for: the mask if there is one.
    fn group_class(&self) -> Tag {
        if self.perm_of(Tag::Mask).is_some() {
            Tag::Mask
        } else {
            Tag::GroupObj
        }
    }

    /// The permission bits (`0o777` part) of the mode this ACL implies.
    pub fn mode_bits(&self) -> u16 {
        let perm = |tag| u16::from(self.perm_of(tag).unwrap_or(0));
        perm(Tag::UserObj) << 6 | perm(self.group_class()) << 3 | perm(Tag::Other)
    }

    /// Whether a mode says all this ACL says (only the three base entries).
    pub fn is_minimal(&self) -> bool {
        self.entries.len() == 3
    }

    /// chmod: the mode's permission bits become the base entries (the group bits
    /// the mask, when there is one), as the kernel's `posix_acl_chmod` does.
    pub fn set_mode_bits(&mut self, mode: u16) {
        let class = |shift: u16| ((mode >> shift) & 0o7) as u8;
        self.set_perm(Tag::UserObj, class(6));
        self.set_perm(self.group_class(), class(3));
        self.set_perm(Tag::Other, class(0));
    }

    /// The same ACL with `bits` taken from the OTHER entry.
    pub fn without_other(&self, bits: u8) -> PosixAcl {
        let mut acl = self.clone();
        let other = acl.perm_of(Tag::Other).unwrap_or(0);
        acl.set_perm(Tag::Other, other & !bits);
        acl
    }
}

/// The stored ACL of `kind`; `owner` ("volume db") names the object in errors. Bytes
/// that do not parse were damaged after they were checked: `EIO`, never a guess.
pub(super) fn stored(xattrs: &Xattrs, kind: AclKind, owner: &str) -> FsResult<Option<PosixAcl>> {
    let Some(bytes) = xattrs.get(kind.xattr_name()) else {
        return Ok(None);
    };
    PosixAcl::from_xattr(&bytes).map(Some).map_err(|e| {
        FsError::Namespace(NamespaceError::Corrupt {
            what: format!("{} of {owner}", kind.xattr_name()),
            reason: e.to_string(),
        })
    })
}

/// chmod of an object: its access ACL, if any, follows the new permission bits.
pub(super) fn follow_mode(xattrs: &mut Xattrs, mode: u16, owner: &str) -> FsResult<()> {
    if let Some(mut acl) = stored(xattrs, AclKind::Access, owner)? {
        acl.set_mode_bits(mode);
        xattrs.set(AclKind::Access.xattr_name(), &acl.to_xattr());
    }
    Ok(())
}

/// `setfacl` (`value` is the new ACL) or removal (`None`) of the ACL `kind` of an
/// object with `owner` and `xattrs`; `is_dir` says whether it may have a default ACL,
/// `what` ("volume db") names it in errors. Only the owner or root may (`EPERM`),
/// as the kernel's `inode_owner_or_capable`. Removing an ACL that is not there
/// succeeds, as on ext4 and tmpfs.
pub(super) fn set(
    owner: &mut Owner,
    xattrs: &mut Xattrs,
    kind: AclKind,
    value: Option<&[u8]>,
    is_dir: bool,
    caller: &Caller,
    what: &str,
) -> FsResult<()> {
    let name = kind.xattr_name();
    if !caller.owns(owner) {
        return Err(FsError::NotPermitted(format!(
            "{what}: only its owner may change its ACL"
        )));
    }
    if kind == AclKind::Default && !is_dir {
        // The kernel's answer for a default ACL on anything but a directory.
        return Err(FsError::AccessDenied(format!(
            "{what}: only directories have a default ACL"
        )));
    }
    let Some(value) = value else {
        xattrs.remove(name);
        return Ok(());
    };
    let acl = PosixAcl::from_xattr(value)
        .map_err(|e| FsError::Invalid(format!("{what}: {name} is not a valid ACL: {e}")))?;
    if kind == AclKind::Access {
        owner.mode = (owner.mode & !0o777) | acl.mode_bits();
        if acl.is_minimal() {
            xattrs.remove(name);
            return Ok(());
        }
    }
    xattr::set(xattrs, name, &acl.to_xattr(), Default::default(), what)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An ACL from `(tag, perm)` pairs, as `setfacl` would send it.
    pub(crate) fn acl(entries: &[(Tag, u8)]) -> PosixAcl {
        PosixAcl::new(
            entries
                .iter()
                .map(|&(tag, perm)| AclEntry { tag, perm })
                .collect(),
        )
        .expect("valid ACL")
    }

    /// What `setfacl -m u:nobody:rx` on a 0700 directory sends (seen on tmpfs).
    const SETFACL_BYTES: &str = "0200000001000700ffffffff02000500feff000004000000ffffffff\
                                 10000500ffffffff20000000ffffffff";

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_kernels_bytes_parse_and_encode_back_the_same() {
        let bytes = hex(SETFACL_BYTES);
        let parsed = PosixAcl::from_xattr(&bytes).unwrap();
        assert_eq!(
            parsed,
            acl(&[
                (Tag::UserObj, 7),
                (Tag::User(65534), 5),
                (Tag::GroupObj, 0),
                (Tag::Mask, 5),
                (Tag::Other, 0),
            ])
        );
        assert_eq!(parsed.to_xattr(), bytes);
        assert_eq!(parsed.mode_bits(), 0o750);
        assert!(!parsed.is_minimal());
    }

    #[test]
    fn ids_of_unnamed_entries_are_ignored() {
        let mut bytes = hex(SETFACL_BYTES);
        bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
        let parsed = PosixAcl::from_xattr(&bytes).unwrap();
        assert_eq!(parsed.to_xattr(), hex(SETFACL_BYTES));
    }

    #[test]
    fn garbage_is_refused() {
        let good = hex(SETFACL_BYTES);
        let with = |at: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            PosixAcl::from_xattr(&b).unwrap_err()
        };
        assert_eq!(
            PosixAcl::from_xattr(&good[..4]).unwrap_err(),
            AclError::Size(4)
        );
        assert_eq!(
            PosixAcl::from_xattr(&good[..good.len() - 1]).unwrap_err(),
            AclError::Size(good.len() - 1)
        );
        assert_eq!(PosixAcl::from_xattr(b"").unwrap_err(), AclError::Size(0));
        assert_eq!(with(0, &[1]), AclError::Version(1));
        assert_eq!(
            with(4, &[0x40]),
            AclError::UnknownTag {
                index: 0,
                code: 0x40
            }
        );
        assert_eq!(
            with(6, &[0o10]),
            AclError::Permissions {
                index: 0,
                perm: 0o10
            }
        );
        // USER_OBJ twice, and a named user before USER_OBJ.
        assert_eq!(with(12, &[0x01]), AclError::Order { index: 1 });
        assert_eq!(with(4, &[0x02]), AclError::UndefinedId { index: 0 });
        assert_eq!(with(4, &[0x02, 0, 7, 0, 1]), AclError::Order { index: 1 });
    }

    #[test]
    fn required_entries_and_order() {
        let entry = |tag, perm| AclEntry { tag, perm };
        let base = [
            entry(Tag::UserObj, 7),
            entry(Tag::GroupObj, 5),
            entry(Tag::Other, 0),
        ];
        assert!(PosixAcl::new(base.to_vec()).is_ok());
        for (missing, name) in [(0, "USER_OBJ"), (1, "GROUP_OBJ"), (2, "OTHER")] {
            let mut entries = base.to_vec();
            entries.remove(missing);
            assert_eq!(PosixAcl::new(entries), Err(AclError::Missing(name)));
        }
        let named = |tag| {
            let mut entries = base.to_vec();
            entries.insert(1, entry(tag, 5));
            entries.sort_by_key(|e| e.tag);
            entries
        };
        assert_eq!(PosixAcl::new(named(Tag::User(5))), Err(AclError::NoMask));
        assert_eq!(PosixAcl::new(named(Tag::Group(5))), Err(AclError::NoMask));
        // A mask alone is allowed (setfacl -x leaves one behind).
        let mut masked = base.to_vec();
        masked.insert(2, entry(Tag::Mask, 0));
        assert!(PosixAcl::new(masked.clone()).is_ok());
        // Named entries sorted by id, each id once.
        let mut users = masked.clone();
        users.insert(1, entry(Tag::User(9), 4));
        users.insert(1, entry(Tag::User(7), 4));
        assert!(PosixAcl::new(users.clone()).is_ok());
        users.swap(1, 2);
        assert_eq!(PosixAcl::new(users), Err(AclError::Order { index: 2 }));
        let mut twice = masked;
        twice.insert(1, entry(Tag::User(7), 4));
        twice.insert(1, entry(Tag::User(7), 5));
        assert_eq!(PosixAcl::new(twice), Err(AclError::Order { index: 2 }));
    }

    #[test]
    fn chmod_sets_the_mask_not_the_owning_group() {
        let mut shared = acl(&[
            (Tag::UserObj, 7),
            (Tag::User(1002), 5),
            (Tag::GroupObj, 4),
            (Tag::Mask, 5),
            (Tag::Other, 0),
        ]);
        shared.set_mode_bits(0o715);
        assert_eq!(shared.perm_of(Tag::Mask), Some(1));
        assert_eq!(shared.perm_of(Tag::GroupObj), Some(4));
        assert_eq!(shared.perm_of(Tag::Other), Some(5));
        assert_eq!(shared.mode_bits(), 0o715);

        let mut minimal = acl(&[(Tag::UserObj, 7), (Tag::GroupObj, 0), (Tag::Other, 0)]);
        minimal.set_mode_bits(0o750);
        assert_eq!(minimal.perm_of(Tag::GroupObj), Some(5));
        assert!(minimal.is_minimal());
    }

    #[test]
    fn without_other_clears_only_the_other_entry() {
        let public = acl(&[
            (Tag::UserObj, 7),
            (Tag::User(1002), 5),
            (Tag::GroupObj, 5),
            (Tag::Mask, 5),
            (Tag::Other, 7),
        ]);
        let hidden = public.without_other(0o5);
        assert_eq!(hidden.mode_bits(), 0o752);
        assert_eq!(hidden.entries()[..4], public.entries()[..4]);
    }

    fn alices() -> Owner {
        Owner {
            uid: 1001,
            gid: 1001,
            mode: 0o2700,
        }
    }

    #[test]
    fn setting_an_access_acl_sets_the_mode_and_a_minimal_one_is_not_kept() {
        let alice = Caller::with_groups(1001, 1001, vec![]);
        let (mut owner, mut xattrs) = (alices(), Xattrs::default());
        let shared = hex(SETFACL_BYTES);
        set(
            &mut owner,
            &mut xattrs,
            AclKind::Access,
            Some(&shared),
            true,
            &alice,
            "snapshot a@s",
        )
        .unwrap();
        assert_eq!(owner.mode, 0o2750, "the mask is the group bits");
        assert_eq!(xattrs.get("system.posix_acl_access"), Some(shared));

        follow_mode(&mut xattrs, 0o700, "snapshot a@s").unwrap();
        let after = stored(&xattrs, AclKind::Access, "s").unwrap().unwrap();
        assert_eq!(after.perm_of(Tag::Mask), Some(0));
        assert_eq!(after.perm_of(Tag::User(65534)), Some(5));

        // setfacl -b sends the minimal ACL: the mode keeps it, the attribute goes.
        let minimal = acl(&[(Tag::UserObj, 7), (Tag::GroupObj, 0), (Tag::Other, 0)]);
        set(
            &mut owner,
            &mut xattrs,
            AclKind::Access,
            Some(&minimal.to_xattr()),
            true,
            &alice,
            "snapshot a@s",
        )
        .unwrap();
        assert_eq!(owner.mode, 0o2700);
        assert!(!xattrs.contains("system.posix_acl_access"));
        // Removing what is not there succeeds.
        set(
            &mut owner,
            &mut xattrs,
            AclKind::Default,
            None,
            true,
            &alice,
            "a",
        )
        .unwrap();
    }

    #[test]
    fn only_the_owner_or_root_sets_acls_and_only_valid_ones() {
        let (mut owner, mut xattrs) = (alices(), Xattrs::default());
        let shared = hex(SETFACL_BYTES);
        let mut set_as = |caller: &Caller, kind, value: Option<&[u8]>, is_dir| {
            set(
                &mut owner,
                &mut xattrs,
                kind,
                value,
                is_dir,
                caller,
                "volume a",
            )
            .map_err(|e| e.errno())
        };
        let bob = Caller::with_groups(1002, 1001, vec![1001]);
        let root = Caller::with_groups(0, 0, vec![]);
        let access = AclKind::Access;
        assert_eq!(set_as(&bob, access, Some(&shared), false), Err(libc::EPERM));
        assert_eq!(set_as(&bob, access, None, false), Err(libc::EPERM));
        assert_eq!(
            set_as(&root, access, Some(b"\x02\0\0\0"), false),
            Err(libc::EINVAL)
        );
        assert_eq!(
            set_as(&root, AclKind::Default, Some(&shared), false),
            Err(libc::EACCES)
        );
        assert_eq!(set_as(&root, access, Some(&shared), false), Ok(()));
        assert_eq!(owner.mode, 0o2750);
    }

    #[test]
    fn a_damaged_stored_acl_is_eio() {
        let mut xattrs = Xattrs::default();
        xattrs.set("system.posix_acl_access", b"\x02\0\0\0junk");
        let err = stored(&xattrs, AclKind::Access, "volume a").unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{err}");
    }
}

//! Rules shared by the extended attributes of volumes and snapshot directories.
//!
//! Two kinds are kept, side by side in a record's [`Xattrs`]: `user.*` attributes
//! (tags, product codes, a description), which a volume's snapshots inherit, and the
//! POSIX ACLs `system.posix_acl_access` / `system.posix_acl_default` (see
//! [`super::acl`]), which belong to the one object they were set on.
//!
//! What one volume or snapshot may hold is capped so that `listxattr` can always
//! answer: the kernel refuses (`E2BIG`) a name list over `XATTR_LIST_MAX`. Values are
//! capped too, because a record is copied whole by `stat` and rewritten by every
//! change. ACLs count towards the caps, as on ext4, where they share the attribute
//! space. A `setxattr` that would pass a cap fails with `ENOSPC`, as on ext4 when its
//! attribute space is full; a single value over `XATTR_SIZE_MAX` with `E2BIG`.

use std::ffi::OsStr;

use super::acl::AclKind;
use super::{FsError, FsResult};
use crate::namespace::Xattrs;

/// An extended attribute name the daemon keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum XattrName<'a> {
    /// `user.<key>`: set by whoever may write the volume, or the snapshot's owner.
    User(&'a str),
    /// A POSIX ACL: set by the owner.
    Acl(AclKind),
}

impl XattrName<'_> {
    /// The name as stored and listed.
    pub(super) fn as_str(&self) -> &str {
        match self {
            XattrName::User(name) => name,
            XattrName::Acl(kind) => kind.xattr_name(),
        }
    }
}

/// Which kept attribute `name` is; others (`security.*`, `trusted.*`, …) are not
/// supported.
pub(super) fn parse_name(name: &OsStr) -> FsResult<XattrName<'_>> {
    let text = name.to_str().unwrap_or_default();
    if text.starts_with("user.") && text.len() > 5 {
        return Ok(XattrName::User(text));
    }
    match AclKind::from_xattr_name(text) {
        Some(kind) => Ok(XattrName::Acl(kind)),
        None => Err(FsError::NotSupported(format!(
            "extended attribute {} is not supported: only user.* attributes and POSIX ACLs \
             are kept",
            name.to_string_lossy()
        ))),
    }
}

/// Longest single value (the kernel's `XATTR_SIZE_MAX`).
pub const MAX_VALUE_BYTES: usize = 64 << 10;
/// Total of the names, each with its NUL: what `listxattr` returns (`XATTR_LIST_MAX`).
pub const MAX_NAMES_BYTES: usize = 64 << 10;
/// Total of the values; one value of the largest size still fits.
pub const MAX_VALUES_BYTES: usize = 64 << 10;

/// What `setxattr` requires of the attribute's current state. Both may be asked for
/// at once; then no call succeeds, as on ext4 and tmpfs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XattrFlags {
    /// `XATTR_CREATE`: fail with `EEXIST` if the attribute exists.
    pub create_only: bool,
    /// `XATTR_REPLACE`: fail with `ENODATA` if it does not.
    pub replace_only: bool,
}

/// Sets `name` to `value` if `flags` allow it; `owner` ("volume db") names the
/// attributes' owner in errors.
pub(super) fn set(
    xattrs: &mut Xattrs,
    name: &str,
    value: &[u8],
    flags: XattrFlags,
    owner: &str,
) -> FsResult<()> {
    let exists = xattrs.contains(name);
    if flags.create_only && exists {
        return Err(FsError::Exists(format!(
            "attribute {name} of {owner} (XATTR_CREATE)"
        )));
    }
    if flags.replace_only && !exists {
        return Err(FsError::NoAttribute(format!(
            "{name} on {owner} to replace (XATTR_REPLACE)"
        )));
    }
    check_room(xattrs, name, value, owner)?;
    xattrs.set(name, value);
    Ok(())
}

/// Whether setting `name` to `value` keeps the attributes within the caps.
fn check_room(xattrs: &Xattrs, name: &str, value: &[u8], owner: &str) -> FsResult<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(FsError::TooBig(format!(
            "{owner}: attribute {name}: a value of {} bytes is over the limit of {MAX_VALUE_BYTES}",
            value.len()
        )));
    }
    let (mut names_bytes, mut values_bytes) = (name.len() + 1, value.len());
    for (other, value_len) in xattrs.sizes().filter(|(other, _)| *other != name) {
        names_bytes += other.len() + 1;
        values_bytes += value_len;
    }
    if names_bytes > MAX_NAMES_BYTES {
        return Err(FsError::NoSpace(format!(
            "{owner}: no room for attribute {name}: the names would take {names_bytes} bytes, \
             over the limit of {MAX_NAMES_BYTES} (what listxattr can return)"
        )));
    }
    if values_bytes > MAX_VALUES_BYTES {
        return Err(FsError::NoSpace(format!(
            "{owner}: no room for attribute {name}: the values would take {values_bytes} bytes, \
             over the limit of {MAX_VALUES_BYTES}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATE: XattrFlags = XattrFlags {
        create_only: true,
        replace_only: false,
    };
    const REPLACE: XattrFlags = XattrFlags {
        create_only: false,
        replace_only: true,
    };

    #[test]
    fn create_and_replace_flags_check_existence() {
        let mut xattrs = Xattrs::default();
        let err = set(&mut xattrs, "user.a", b"1", REPLACE, "volume v").unwrap_err();
        assert_eq!(err.errno(), libc::ENODATA, "{err}");
        assert!(!xattrs.contains("user.a"), "a refused replace created it");

        set(&mut xattrs, "user.a", b"1", CREATE, "volume v").unwrap();
        let err = set(&mut xattrs, "user.a", b"2", CREATE, "volume v").unwrap_err();
        assert_eq!(err.errno(), libc::EEXIST, "{err}");
        assert_eq!(
            xattrs.get("user.a").unwrap(),
            b"1",
            "a refused create changed it"
        );

        set(&mut xattrs, "user.a", b"3", REPLACE, "volume v").unwrap();
        set(
            &mut xattrs,
            "user.a",
            b"4",
            XattrFlags::default(),
            "volume v",
        )
        .unwrap();
        assert_eq!(xattrs.get("user.a").unwrap(), b"4");
        let both = XattrFlags {
            create_only: true,
            replace_only: true,
        };
        assert!(set(&mut xattrs, "user.a", b"5", both, "volume v").is_err());
        assert!(set(&mut xattrs, "user.b", b"5", both, "volume v").is_err());
    }

    /// `user.` and a number, padded to 255 bytes (the kernel's longest name).
    fn long_name(i: usize) -> String {
        format!("user.{i:0>250}")
    }

    #[test]
    fn names_stay_within_what_listxattr_can_return() {
        let mut xattrs = Xattrs::default();
        let fitting = MAX_NAMES_BYTES / 256;
        for i in 0..fitting {
            set(&mut xattrs, &long_name(i), b"", XattrFlags::default(), "v").unwrap();
        }
        let err = set(&mut xattrs, "user.x", b"", XattrFlags::default(), "v").unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC, "{err}");
        assert!(!xattrs.contains("user.x"));
        let list_bytes: usize = xattrs.names().map(|n| n.len() + 1).sum();
        assert_eq!(list_bytes, MAX_NAMES_BYTES);
        // Replacing an existing attribute needs no new room for its name.
        set(
            &mut xattrs,
            &long_name(0),
            b"new",
            XattrFlags::default(),
            "v",
        )
        .unwrap();
        assert!(xattrs.remove(&long_name(1)));
        set(&mut xattrs, "user.x", b"", XattrFlags::default(), "v").unwrap();
    }

    #[test]
    fn values_are_capped_one_by_one_and_in_total() {
        let mut xattrs = Xattrs::default();
        let too_big = vec![7u8; MAX_VALUE_BYTES + 1];
        let err = set(&mut xattrs, "user.a", &too_big, XattrFlags::default(), "v").unwrap_err();
        assert_eq!(err.errno(), libc::E2BIG, "{err}");
        let half = vec![7u8; MAX_VALUES_BYTES / 2];
        set(&mut xattrs, "user.a", &half, XattrFlags::default(), "v").unwrap();
        set(&mut xattrs, "user.b", &half, XattrFlags::default(), "v").unwrap();
        let err = set(&mut xattrs, "user.c", b"1", XattrFlags::default(), "v").unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC, "{err}");
        assert!(!xattrs.contains("user.c"));
        // A smaller value in place of a larger one always fits.
        set(&mut xattrs, "user.b", b"1", XattrFlags::default(), "v").unwrap();
        set(&mut xattrs, "user.c", b"1", XattrFlags::default(), "v").unwrap();
    }
}

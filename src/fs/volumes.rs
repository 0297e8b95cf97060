//! `volumes/`: creating, resizing, renaming and deleting volumes, and their data I/O.

use std::ffi::OsStr;
use std::sync::Arc;

use log::{info, warn};

use super::acl::{self, AclKind};
use super::inode::Node;
use super::xattr::{self, XattrFlags, XattrName};
use super::{
    Access, Attr, Caller, FileKind, FsCore, FsError, FsResult, Handle, SetAttr, VolumeSlot,
};
use crate::layout::VolumeFile;
use crate::names::VolumeName;
use crate::namespace::{NsGuard, Owner, Timestamp, VolumeId, VolumeRecord, Xattrs};
use crate::snapshot::settle::Settle;
use crate::storage::Storage;
use crate::volume::Volume;

impl<S: Storage> FsCore<S> {
    /// The volume's live data, or `EIO` if it is damaged.
    pub(super) fn live_volume(&self, id: VolumeId) -> FsResult<Arc<Volume<S>>> {
        match self.volumes.get(&id).map(|slot| slot.clone()) {
            Some(VolumeSlot::Live(volume)) => Ok(volume),
            Some(VolumeSlot::Damaged(reason)) => Err(FsError::Damaged {
                name: self
                    .ns
                    .view()
                    .volumes
                    .get(&id)
                    .map_or_else(|| id.to_string(), |v| v.name.clone()),
                reason: reason.to_string(),
            }),
            None => Err(FsError::NotFound(format!("volume {id}"))),
        }
    }

    fn volume_record(&self, id: VolumeId) -> FsResult<VolumeRecord> {
        self.ns
            .view()
            .volumes
            .get(&id)
            .cloned()
            .ok_or_else(|| FsError::NotFound(format!("volume {id}")))
    }

    pub(super) fn volume_attr(&self, id: VolumeId) -> FsResult<Attr> {
        let record = self.volume_record(id)?;
        let created = record.created.to_system_time();
        // A damaged volume still shows (so that it can be found and removed), empty.
        let (size, allocated, times) = match self.live_volume(id) {
            Ok(volume) => {
                let times = volume.times()?;
                (
                    volume.size()?,
                    volume.allocated_bytes()?,
                    (times.accessed, times.modified, times.changed),
                )
            }
            Err(FsError::Damaged { .. }) => (0, 0, (created, created, created)),
            Err(e) => return Err(e),
        };
        Ok(Attr {
            ino: Node::Volume(id).ino(),
            kind: FileKind::RegularFile,
            size,
            blocks: allocated / 512,
            perm: record.owner.mode,
            nlink: 1,
            uid: record.owner.uid,
            gid: record.owner.gid,
            atime: times.0,
            mtime: times.1,
            ctime: times.2,
        })
    }

    pub(super) fn lookup_volume(&self, file_name: &OsStr) -> FsResult<Attr> {
        let name = VolumeName::from_file_name(file_name).map_err(|e| match e {
            // A lookup of a name that cannot exist is simply "not found" (shells and
            // tools probe names); creating such a name is what gets EINVAL.
            crate::names::NameError::TooLong(_) => FsError::Name(e),
            _ => FsError::NotFound(file_name.to_string_lossy().into_owned()),
        })?;
        let id = self
            .ns
            .view()
            .volume_id(name.as_str())
            .ok_or_else(|| FsError::NotFound(name.file_name()))?;
        self.volume_attr(id)
    }

    /// `open(O_CREAT)`, `mknod`, `truncate` of a new name: creates an empty volume.
    /// An existing volume is opened instead unless `exclusive`.
    pub fn create_volume(
        &self,
        parent: u64,
        file_name: &OsStr,
        mode: u32,
        caller: &Caller,
        exclusive: bool,
    ) -> FsResult<Attr> {
        match Node::from_ino(parent) {
            Some(Node::VolumesDir) => {}
            Some(Node::SnapshotsDir) => {
                return Err(FsError::NotPermitted(
                    "snapshots/ holds only snapshot directories: create one with mkdir snapshots/<volume>@<label>".into(),
                ));
            }
            Some(Node::SnapshotDir(_)) => {
                return Err(FsError::ReadOnly("a snapshot directory".into()));
            }
            _ => {
                return Err(FsError::NotPermitted(
                    "new files belong in volumes/ as <name>.img".into(),
                ));
            }
        }
        let name = VolumeName::from_file_name(file_name)?;
        let guard = self.ns.lock();
        if let Some(id) = self.ns.view().volume_id(name.as_str()) {
            if exclusive {
                return Err(FsError::Exists(name.file_name()));
            }
            return self.volume_attr(id);
        }
        // Files first (created whole, names durable), then the record: a crash before
        // the commit leaves only empty files of an id never committed, which start-up
        // proves garbage; never a record without its files.
        let id = self.ns.change(&guard, |c| -> FsResult<VolumeId> {
            let id = c.next_volume_id()?;
            let volume = Volume::create(
                &self.storage,
                &self.layout,
                id,
                u64::from(self.settings.block_size_bytes),
                self.settings.max_volume_size_bytes,
            )?;
            c.put_volume(VolumeRecord {
                id,
                name: name.as_str().to_string(),
                block_size: self.settings.block_size_bytes,
                created: Timestamp::now(),
                owner: Owner {
                    uid: caller.uid,
                    gid: caller.gid,
                    mode: (mode & 0o7777) as u16,
                },
                xattrs: Xattrs::default(),
                base_snapshot: None,
                full_compare: false,
                high_water_bytes: 0,
                hydrated: false,
            })?;
            self.volumes.insert(id, VolumeSlot::Live(Arc::new(volume)));
            Ok(id)
        });
        let id = match id {
            Ok(id) => id,
            Err(e) => {
                // The files of an id whose creation failed: nothing refers to them.
                self.volumes
                    .retain(|id, _| self.ns.view().volumes.contains_key(id));
                return Err(e);
            }
        };
        drop(guard);
        info!("volume {name} created");
        // A policy may cover it: its first run is due now.
        self.policy_signal.notify();
        self.volume_attr(id)
    }

    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        match Node::from_ino(ino) {
            Some(Node::Volume(id)) => {
                let volume = match self.handle_volume(fh) {
                    Some(v) => v,
                    None => self.live_volume(id)?,
                };
                self.note_io();
                Ok(volume.write_at(data, offset)?)
            }
            Some(Node::SnapshotFile(..)) => Err(FsError::ReadOnly("snapshot files".into())),
            _ => Err(FsError::Invalid(format!("write to inode {ino}"))),
        }
    }

    pub(super) fn volume_for(&self, ino: u64, fh: Option<u64>) -> FsResult<Arc<Volume<S>>> {
        match Node::from_ino(ino) {
            Some(Node::Volume(id)) => match fh.and_then(|fh| self.handle_volume(fh)) {
                Some(v) => Ok(v),
                None => self.live_volume(id),
            },
            Some(Node::SnapshotFile(..)) => Err(FsError::ReadOnly("snapshot files".into())),
            Some(node) if node.is_dir() => Err(FsError::IsDir(format!("inode {ino}"))),
            _ => Err(FsError::NotFound(format!("inode {ino}"))),
        }
    }

    pub fn fsync(&self, ino: u64, fh: u64, data_only: bool) -> FsResult<()> {
        match Node::from_ino(ino) {
            Some(Node::Volume(_)) => Ok(self.volume_for(ino, Some(fh))?.sync(data_only)?),
            _ => Ok(()),
        }
    }

    pub fn fallocate(&self, ino: u64, fh: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let volume = self.volume_for(ino, Some(fh))?;
        self.note_io();
        Ok(volume.fallocate(mode, offset, len)?)
    }

    /// `SEEK_DATA`/`SEEK_HOLE`: real holes for volumes; other files are all data.
    pub fn lseek(&self, ino: u64, fh: u64, offset: u64, whence: i32) -> FsResult<u64> {
        let past_end =
            |size: u64| FsError::PastEnd(format!("offset {offset} is past the end ({size})"));
        if let Some(Node::Volume(_)) = Node::from_ino(ino) {
            let volume = self.volume_for(ino, Some(fh))?;
            let size = volume.size()?;
            return match whence {
                libc::SEEK_DATA => volume.seek_data(offset)?.ok_or_else(|| past_end(size)),
                libc::SEEK_HOLE if offset < size => Ok(volume.seek_hole(offset)?),
                libc::SEEK_HOLE => Err(past_end(size)),
                _ => Err(FsError::Invalid(format!("lseek whence {whence}"))),
            };
        }
        if let Some(Handle::Remote(image)) = self.handles.get(&fh).map(|h| h.clone()) {
            let size = image.blocks.size_bytes();
            let found = match whence {
                libc::SEEK_DATA => image.seek(offset, true)?,
                libc::SEEK_HOLE => image.seek(offset, false)?,
                _ => return Err(FsError::Invalid(format!("lseek whence {whence}"))),
            };
            return found.ok_or_else(|| past_end(size));
        }
        if let Some(Handle::Image(image)) = self.handles.get(&fh).map(|h| h.clone()) {
            let size = image.record.size_bytes;
            let found = match whence {
                libc::SEEK_DATA => image.seek(offset, true)?,
                libc::SEEK_HOLE => image.seek(offset, false)?,
                _ => return Err(FsError::Invalid(format!("lseek whence {whence}"))),
            };
            return found.ok_or_else(|| past_end(size));
        }
        let size = self.getattr(ino)?.size;
        match whence {
            libc::SEEK_DATA if offset < size => Ok(offset),
            libc::SEEK_HOLE if offset < size => Ok(size),
            libc::SEEK_DATA | libc::SEEK_HOLE => Err(past_end(size)),
            _ => Err(FsError::Invalid(format!("lseek whence {whence}"))),
        }
    }

    /// Changes a volume's size, owner, mode or times.
    pub(super) fn setattr_volume(
        &self,
        id: VolumeId,
        changes: SetAttr,
        caller: &Caller,
    ) -> FsResult<Attr> {
        if changes.size.is_some() || changes.atime.is_some() || changes.mtime.is_some() {
            let volume = self.live_volume(id)?;
            if let Some(size) = changes.size {
                volume.set_size(size)?;
            }
            if changes.atime.is_some() || changes.mtime.is_some() {
                volume.set_times(changes.atime, changes.mtime)?;
            }
        }
        if changes.mode.is_some() || changes.uid.is_some() || changes.gid.is_some() {
            self.update_volume(id, |record| {
                let what = format!("volume {}", record.name);
                apply_owner_change(
                    &mut record.owner,
                    &mut record.xattrs,
                    changes,
                    caller,
                    &what,
                )
            })?;
        }
        self.volume_attr(id)
    }

    /// Commits a change to a volume's record, then shows it in the catalog.
    fn update_volume(
        &self,
        id: VolumeId,
        change: impl FnOnce(&mut VolumeRecord) -> FsResult<()>,
    ) -> FsResult<()> {
        let guard = self.ns.lock();
        let mut record = self.volume_record(id)?;
        change(&mut record)?;
        self.ns.change(&guard, |c| c.put_volume(record))?;
        Ok(())
    }

    /// `rm volumes/<name>.img`: the volume goes, its snapshots stay. Open files keep
    /// working until closed; the space is freed then.
    pub fn unlink(&self, parent: u64, file_name: &OsStr) -> FsResult<()> {
        match Node::from_ino(parent) {
            Some(Node::VolumesDir) => {}
            Some(Node::SnapshotDir(_)) => {
                return Err(FsError::ReadOnly("a snapshot directory".into()));
            }
            Some(Node::SnapshotsDir) => {
                return Err(FsError::IsDir(format!(
                    "snapshot {}: delete it with rmdir",
                    file_name.to_string_lossy()
                )));
            }
            _ => {
                return Err(FsError::NotPermitted(
                    "volumes/ and snapshots/ cannot be removed".into(),
                ));
            }
        }
        let name = VolumeName::from_file_name(file_name)?;
        let settle = {
            let guard = self.ns.lock();
            let id = self
                .ns
                .view()
                .volume_id(name.as_str())
                .ok_or_else(|| FsError::NotFound(name.file_name()))?;
            self.delete_volume_locked(&guard, id)?
        };
        self.engine.settled(settle);
        info!("volume {name} deleted");
        Ok(())
    }

    /// Deletes volume `id`: its record goes in one commit (which also records the
    /// deletion, so that files a crash leaves behind are known garbage), then its
    /// files. The caller passes the returned [`Settle`] to the engine once it has let
    /// go of the namespace lock.
    fn delete_volume_locked(&self, guard: &NsGuard<'_>, id: VolumeId) -> FsResult<Settle> {
        let settle = self.engine.delete_volume_record(guard, id)?;
        self.volumes.remove(&id);
        for kind in [VolumeFile::Data, VolumeFile::Dirty] {
            let path = self.layout.volume_file(id, kind);
            if let Err(e) = self.storage.remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!("cannot remove {}: {e}", path.display());
            }
        }
        Ok(settle)
    }

    /// `mv volumes/a.img volumes/b.img`. Replaces `b` (as rename(2) does) unless
    /// `no_replace`; never moves a volume out of `volumes/`. Also `mv
    /// recycle-bin/X snapshots/`, which restores snapshot X.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
        caller: &Caller,
    ) -> FsResult<()> {
        if (Node::from_ino(parent), Node::from_ino(new_parent))
            == (Some(Node::RecycleBinDir), Some(Node::SnapshotsDir))
        {
            return self.restore_binned(name, new_name, caller);
        }
        if Node::from_ino(parent) != Some(Node::VolumesDir)
            || Node::from_ino(new_parent) != Some(Node::VolumesDir)
        {
            return Err(FsError::NotPermitted(
                "only volumes can be renamed, and only within volumes/ (a snapshot in the \
                 recycle bin is restored with mv recycle-bin/X snapshots/)"
                    .into(),
            ));
        }
        let from = VolumeName::from_file_name(name)?;
        let to = VolumeName::from_file_name(new_name)?;
        let guard = self.ns.lock();
        let (id, target) = {
            let view = self.ns.view();
            let id = view
                .volume_id(from.as_str())
                .ok_or_else(|| FsError::NotFound(from.file_name()))?;
            (id, view.volume_id(to.as_str()))
        };
        if target == Some(id) {
            return Ok(());
        }
        if target.is_some() && no_replace {
            return Err(FsError::Exists(to.file_name()));
        }
        let replaced = target
            .map(|t| self.delete_volume_locked(&guard, t))
            .transpose()?;
        let mut record = self.volume_record(id)?;
        record.name = to.as_str().to_string();
        self.ns.change(&guard, |c| c.put_volume(record))?;
        drop(guard);
        if let Some(settle) = replaced {
            self.engine.settled(settle);
        }
        info!("volume {from} renamed to {to}");
        Ok(())
    }

    pub(super) fn volume_xattr_get(&self, id: VolumeId, name: &OsStr) -> FsResult<Vec<u8>> {
        // The kernel's security.* probes just miss.
        let missing = || FsError::NoAttribute(name.to_string_lossy().into_owned());
        let name = self.xattr_name(name).map_err(|_| missing())?;
        if let XattrName::User(user_name) = name
            && let Some(value) = self
                .copy_info(id)
                .and_then(|(source, hydrated)| match user_name {
                    SOURCE_XATTR => Some(source),
                    HYDRATED_XATTR => Some(hydrated),
                    _ => None,
                })
        {
            return Ok(value.into_bytes());
        }
        self.volume_record(id)?
            .xattrs
            .get(name.as_str())
            .ok_or_else(missing)
    }

    pub(super) fn volume_xattr_list(&self, id: VolumeId) -> FsResult<Vec<String>> {
        let mut names: Vec<String> = self
            .volume_record(id)?
            .xattrs
            .names()
            .map(str::to_string)
            .collect();
        if self.copy_info(id).is_some() {
            names.extend([SOURCE_XATTR.to_string(), HYDRATED_XATTR.to_string()]);
        }
        Ok(names)
    }

    /// Sets (`Some`) or removes (`None`) an attribute of a volume: `user.*` by
    /// whoever may write it, ACLs by its owner.
    pub(super) fn volume_xattr_set(
        &self,
        id: VolumeId,
        name: &OsStr,
        value: Option<&[u8]>,
        flags: XattrFlags,
        caller: &Caller,
    ) -> FsResult<()> {
        let name = self.xattr_name(name)?;
        if let XattrName::User(user_name) = name {
            check_settable(user_name)?;
        }
        self.update_volume(id, |record| {
            let what = format!("volume {}", record.name);
            let user_name = match name {
                XattrName::Acl(kind) => {
                    let (owner, xattrs) = (&mut record.owner, &mut record.xattrs);
                    return acl::set(owner, xattrs, kind, value, false, caller, &what);
                }
                XattrName::User(user_name) => user_name,
            };
            check_volume_write(record, caller)?;
            match value {
                Some(value) => xattr::set(&mut record.xattrs, user_name, value, flags, &what),
                None if record.xattrs.remove(user_name) => Ok(()),
                None => Err(FsError::NoAttribute(user_name.to_string())),
            }
        })
    }
}

/// Read-only attributes of a volume made from a snapshot: the snapshot's name, and
/// how much of it the volume holds itself (`ebsfs volume list` shows them).
pub const SOURCE_XATTR: &str = "user.ebsfs.source";
pub const HYDRATED_XATTR: &str = "user.ebsfs.hydrated";

/// `user.ebsfs.*` names are the daemon's: nobody sets or removes them.
fn check_settable(name: &str) -> FsResult<()> {
    if name.starts_with("user.ebsfs.") {
        return Err(FsError::NotPermitted(format!(
            "extended attribute {name} is maintained by ebsfs and read-only"
        )));
    }
    Ok(())
}

/// Whether `caller` may have `want` on `volume`, by its mode and access ACL.
pub(super) fn volume_permits(
    volume: &VolumeRecord,
    caller: &Caller,
    want: Access,
) -> FsResult<bool> {
    let what = format!("volume {}", volume.name);
    let acl = acl::stored(&volume.xattrs, AclKind::Access, &what)?;
    caller.permits(&volume.owner, acl.as_ref(), want)
}

fn check_volume_write(record: &VolumeRecord, caller: &Caller) -> FsResult<()> {
    if volume_permits(record, caller, Access::Write)? {
        Ok(())
    } else {
        Err(FsError::AccessDenied(format!(
            "volume {}: no write permission",
            record.name
        )))
    }
}

/// Applies chmod/chown/chgrp to an owner record by the kernel's rules (checked
/// before any change, so a refusal changes nothing): only the owner (or root)
/// changes the mode, only root gives an object away, and the owner changes the group
/// only to one of its own groups. A new mode also sets the access ACL's base entries
/// (its mask for the group bits), as chmod does on any filesystem with ACLs; `what`
/// ("volume db") names the object in errors.
pub(super) fn apply_owner_change(
    owner: &mut Owner,
    xattrs: &mut Xattrs,
    changes: SetAttr,
    caller: &Caller,
    what: &str,
) -> FsResult<()> {
    if let Some(uid) = changes.uid
        && !caller.may_change_owner(owner, uid)
    {
        return Err(FsError::NotPermitted(
            "only root may change the owner".into(),
        ));
    }
    if let Some(gid) = changes.gid
        && !caller.may_change_group(owner, gid)?
    {
        return Err(FsError::NotPermitted(format!(
            "only the owner may change the group, and only to a group it is in (not {gid})"
        )));
    }
    if changes.mode.is_some() && !caller.owns(owner) {
        return Err(FsError::NotPermitted(
            "only the owner may change the mode".into(),
        ));
    }
    if let Some(uid) = changes.uid {
        owner.uid = uid;
    }
    if let Some(gid) = changes.gid {
        owner.gid = gid;
    }
    if let Some(mode) = changes.mode {
        owner.mode = (mode & 0o7777) as u16;
        acl::follow_mode(xattrs, owner.mode, what)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: u32 = 1001;
    const SHARED: u32 = 3000;

    fn alices() -> Owner {
        Owner {
            uid: ALICE,
            gid: 2001,
            mode: 0o640,
        }
    }

    #[test]
    fn owner_changes_group_and_mode_together() {
        let alice = Caller::with_groups(ALICE, 2001, vec![SHARED]);
        let mut owner = alices();
        let changes = SetAttr {
            gid: Some(SHARED),
            mode: Some(0o100604),
            ..SetAttr::default()
        };
        apply_owner_change(&mut owner, &mut Xattrs::default(), changes, &alice, "v").unwrap();
        assert_eq!((owner.gid, owner.mode), (SHARED, 0o604));
    }

    #[test]
    fn a_refused_change_changes_nothing() {
        let alice = Caller::with_groups(ALICE, 2001, vec![]);
        let mut owner = alices();
        let changes = SetAttr {
            gid: Some(SHARED),
            mode: Some(0o600),
            ..SetAttr::default()
        };
        let err = apply_owner_change(&mut owner, &mut Xattrs::default(), changes, &alice, "v")
            .unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        let changes = SetAttr {
            uid: Some(1002),
            mode: Some(0o600),
            ..SetAttr::default()
        };
        let err = apply_owner_change(&mut owner, &mut Xattrs::default(), changes, &alice, "v")
            .unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        assert_eq!(owner, alices());
    }
}

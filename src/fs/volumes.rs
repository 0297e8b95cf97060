//! `volumes/`: creating, resizing, renaming and deleting volumes, and their data I/O.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs as stdfs;
use std::path::Path;
use std::sync::Arc;

use log::info;

use super::inode::Node;
use super::{Attr, Caller, FileKind, FsCore, FsError, FsResult, SetAttr, io_error, permits};
use crate::meta::{self, MetaError, Owner, Timestamp, VolumeRecord, Xattrs};
use crate::names::VolumeName;
use crate::snapshot::Settle;
use crate::volume::{self, Volume};

/// Extended attributes users may set: the `user.` namespace (tags, product codes).
fn check_xattr_name(name: &OsStr) -> FsResult<&str> {
    match name.to_str() {
        Some(n) if n.starts_with("user.") && n.len() > 5 => Ok(n),
        _ => Err(FsError::NotSupported(format!(
            "extended attribute {} is not supported: only user.* attributes are kept",
            name.to_string_lossy()
        ))),
    }
}

impl FsCore {
    pub(super) fn live_volume(&self, id: u64) -> FsResult<Arc<Volume>> {
        self.live
            .get(&id)
            .map(|v| v.clone())
            .ok_or_else(|| FsError::NotFound(format!("volume {id}")))
    }

    fn volume_record(&self, id: u64) -> FsResult<VolumeRecord> {
        self.catalog
            .read()
            .volumes
            .get(&id)
            .cloned()
            .ok_or_else(|| FsError::NotFound(format!("volume {id}")))
    }

    pub(super) fn volume_attr(&self, id: u64) -> FsResult<Attr> {
        let record = self.volume_record(id)?;
        let volume = self.live_volume(id)?;
        let stat = volume
            .data_file()
            .metadata()
            .map_err(io_error(format!("stat of volume {}", record.name)))?;
        let time = |t: std::io::Result<std::time::SystemTime>| {
            t.unwrap_or_else(|_| record.created.to_system_time())
        };
        Ok(Attr {
            ino: Node::Volume(id).ino(),
            kind: FileKind::RegularFile,
            size: stat.len(),
            blocks: std::os::unix::fs::MetadataExt::blocks(&stat),
            perm: record.owner.mode,
            nlink: 1,
            uid: record.owner.uid,
            gid: record.owner.gid,
            atime: time(stat.accessed()),
            mtime: time(stat.modified()),
            ctime: std::time::UNIX_EPOCH
                + std::time::Duration::new(
                    std::os::unix::fs::MetadataExt::ctime(&stat).max(0) as u64,
                    std::os::unix::fs::MetadataExt::ctime_nsec(&stat).clamp(0, 999_999_999) as u32,
                ),
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
            .catalog
            .read()
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
        caller: Caller,
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
        let _ns = self.engine.namespace_lock();
        if let Some(id) = self.catalog.read().volume_id(name.as_str()) {
            if exclusive {
                return Err(FsError::Exists(name.file_name()));
            }
            return self.volume_attr(id);
        }
        let txn = self.meta.begin_write()?;
        let id = meta::next_volume_id(&txn)?;
        let record = VolumeRecord {
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
        };
        // Files first: a crash before the commit leaves only orphan files, removed at
        // the next start; never a record without its data file.
        let volume = Volume::open(
            &self.volumes_dir,
            id,
            u64::from(record.block_size),
            self.settings.max_volume_size_bytes,
        )
        .map_err(io_error(format!("creating volume {name}")))?;
        meta::put_volume(&txn, &record)?;
        txn.commit().map_err(MetaError::from)?;
        self.live.insert(id, Arc::new(volume));
        self.catalog.write().upsert_volume(record);
        info!("volume {name} created");
        self.volume_attr(id)
    }

    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        match Node::from_ino(ino) {
            Some(Node::Volume(id)) => {
                let volume = match self.handle_volume(fh) {
                    Some(v) => v,
                    None => self.live_volume(id)?,
                };
                Ok(volume.write_at(data, offset)?)
            }
            Some(Node::SnapshotFile(..)) => Err(FsError::ReadOnly("snapshot files".into())),
            _ => Err(FsError::Invalid(format!("write to inode {ino}"))),
        }
    }

    fn volume_for(&self, ino: u64, fh: Option<u64>) -> FsResult<Arc<Volume>> {
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
        Ok(self
            .volume_for(ino, Some(fh))?
            .fallocate(mode, offset, len)?)
    }

    /// `SEEK_DATA`/`SEEK_HOLE`: real holes for volumes; other files are all data.
    pub fn lseek(&self, ino: u64, fh: u64, offset: u64, whence: i32) -> FsResult<u64> {
        if let Some(Node::Volume(_)) = Node::from_ino(ino) {
            return Ok(self.volume_for(ino, Some(fh))?.seek(offset, whence)?);
        }
        let size = self.getattr(ino)?.size;
        match whence {
            libc::SEEK_DATA if offset < size => Ok(offset),
            libc::SEEK_HOLE if offset < size => Ok(size),
            libc::SEEK_DATA | libc::SEEK_HOLE => Err(FsError::PastEnd(format!(
                "offset {offset} is past the end ({size})"
            ))),
            _ => Err(FsError::Invalid(format!("lseek whence {whence}"))),
        }
    }

    /// Changes a volume's size, owner, mode or times.
    pub(super) fn setattr_volume(
        &self,
        id: u64,
        changes: SetAttr,
        caller: Caller,
    ) -> FsResult<Attr> {
        let volume = self.live_volume(id)?;
        if let Some(size) = changes.size {
            volume.set_size(size)?;
        }
        if changes.atime.is_some() || changes.mtime.is_some() {
            let mut times = std::fs::FileTimes::new();
            if let Some(t) = changes.atime {
                times = times.set_accessed(t);
            }
            if let Some(t) = changes.mtime {
                times = times.set_modified(t);
            }
            volume
                .data_file()
                .set_times(times)
                .map_err(io_error("setting volume times"))?;
        }
        if changes.mode.is_some() || changes.uid.is_some() || changes.gid.is_some() {
            self.update_volume(id, |record| {
                apply_owner_change(&mut record.owner, changes, caller)
            })?;
        }
        self.volume_attr(id)
    }

    /// Commits a change to a volume's record, then shows it in the catalog.
    fn update_volume(
        &self,
        id: u64,
        change: impl FnOnce(&mut VolumeRecord) -> FsResult<()>,
    ) -> FsResult<()> {
        let _ns = self.engine.namespace_lock();
        let mut record = self.volume_record(id)?;
        change(&mut record)?;
        let txn = self.meta.begin_write()?;
        meta::put_volume(&txn, &record)?;
        txn.commit().map_err(MetaError::from)?;
        self.catalog.write().upsert_volume(record);
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
            let _ns = self.engine.namespace_lock();
            let id = self
                .catalog
                .read()
                .volume_id(name.as_str())
                .ok_or_else(|| FsError::NotFound(name.file_name()))?;
            self.delete_volume_locked(id)?
        };
        self.engine.settled(settle);
        info!("volume {name} deleted");
        Ok(())
    }

    /// Deletes volume `id`; the caller holds the namespace lock and passes the
    /// returned [`Settle`] to the engine once it has let go of it.
    fn delete_volume_locked(&self, id: u64) -> FsResult<Settle> {
        let settle = self.engine.delete_volume_record(id)?;
        self.live.remove(&id);
        for path in [
            volume::data_path(&self.volumes_dir, id),
            volume::dirty_path(&self.volumes_dir, id),
        ] {
            if let Err(e) = stdfs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                log::warn!("cannot remove {}: {e}", path.display());
            }
        }
        Ok(settle)
    }

    /// `mv volumes/a.img volumes/b.img`. Replaces `b` (as rename(2) does) unless
    /// `no_replace`; never moves a volume out of `volumes/`.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> FsResult<()> {
        if Node::from_ino(parent) != Some(Node::VolumesDir)
            || Node::from_ino(new_parent) != Some(Node::VolumesDir)
        {
            return Err(FsError::NotPermitted(
                "only volumes can be renamed, and only within volumes/".into(),
            ));
        }
        let from = VolumeName::from_file_name(name)?;
        let to = VolumeName::from_file_name(new_name)?;
        let ns = self.engine.namespace_lock();
        let (id, target) = {
            let records = self.catalog.read();
            let id = records
                .volume_id(from.as_str())
                .ok_or_else(|| FsError::NotFound(from.file_name()))?;
            (id, records.volume_id(to.as_str()))
        };
        if target == Some(id) {
            return Ok(());
        }
        if target.is_some() && no_replace {
            return Err(FsError::Exists(to.file_name()));
        }
        let replaced = target.map(|t| self.delete_volume_locked(t)).transpose()?;
        let mut record = self.volume_record(id)?;
        record.name = to.as_str().to_string();
        let txn = self.meta.begin_write()?;
        meta::put_volume(&txn, &record)?;
        txn.commit().map_err(MetaError::from)?;
        self.catalog.write().upsert_volume(record);
        drop(ns);
        if let Some(settle) = replaced {
            self.engine.settled(settle);
        }
        info!("volume {from} renamed to {to}");
        Ok(())
    }

    pub(super) fn volume_xattr_get(&self, id: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        // Only user.* attributes exist; the kernel's security.* probes just miss.
        let name = check_xattr_name(name)
            .map_err(|_| FsError::NoAttribute(name.to_string_lossy().into_owned()))?;
        self.volume_record(id)?
            .xattrs
            .get(name)
            .ok_or_else(|| FsError::NoAttribute(name.to_string()))
    }

    pub(super) fn volume_xattr_list(&self, id: u64) -> FsResult<Vec<String>> {
        Ok(self
            .volume_record(id)?
            .xattrs
            .names()
            .map(str::to_string)
            .collect())
    }

    pub(super) fn volume_xattr_set(
        &self,
        id: u64,
        name: &OsStr,
        value: &[u8],
        caller: Caller,
    ) -> FsResult<()> {
        let name = check_xattr_name(name)?;
        self.update_volume(id, |record| {
            if !permits(&record.owner, caller, 2) {
                return Err(FsError::NotPermitted(format!(
                    "volume {}: no write permission",
                    record.name
                )));
            }
            record.xattrs.set(name, value);
            Ok(())
        })
    }

    pub(super) fn volume_xattr_remove(
        &self,
        id: u64,
        name: &OsStr,
        caller: Caller,
    ) -> FsResult<()> {
        let name = check_xattr_name(name)?;
        self.update_volume(id, |record| {
            if !permits(&record.owner, caller, 2) {
                return Err(FsError::NotPermitted(format!(
                    "volume {}: no write permission",
                    record.name
                )));
            }
            if record.xattrs.remove(name) {
                Ok(())
            } else {
                Err(FsError::NoAttribute(name.to_string()))
            }
        })
    }
}

/// Applies chmod/chown to an owner record with the usual rules: only the owner (or
/// root) changes the mode, only root gives a file away.
pub(super) fn apply_owner_change(
    owner: &mut Owner,
    changes: SetAttr,
    caller: Caller,
) -> FsResult<()> {
    let is_owner = caller.uid == 0 || caller.uid == owner.uid;
    if let Some(mode) = changes.mode {
        if !is_owner {
            return Err(FsError::NotPermitted(
                "only the owner may change the mode".into(),
            ));
        }
        owner.mode = (mode & 0o7777) as u16;
    }
    if let Some(uid) = changes.uid
        && uid != owner.uid
    {
        if caller.uid != 0 {
            return Err(FsError::NotPermitted(
                "only root may change the owner".into(),
            ));
        }
        owner.uid = uid;
    }
    if let Some(gid) = changes.gid {
        if !is_owner {
            return Err(FsError::NotPermitted(
                "only the owner may change the group".into(),
            ));
        }
        owner.gid = gid;
    }
    Ok(())
}

/// Removes data files that belong to no volume: left by a crash between creating a
/// volume's files and committing its record, or after deleting it.
pub(super) fn remove_orphan_files(dir: &Path, live: &HashMap<u64, Arc<Volume>>) -> FsResult<()> {
    for entry in stdfs::read_dir(dir).map_err(io_error(format!("listing {}", dir.display())))? {
        let entry = entry.map_err(io_error(format!("listing {}", dir.display())))?;
        let file_name = entry.file_name();
        let id = file_name
            .to_str()
            .and_then(|n| n.split_once('.'))
            .and_then(|(id, _)| id.parse::<u64>().ok());
        if let Some(id) = id
            && !live.contains_key(&id)
        {
            info!(
                "removing {}: it belongs to no volume",
                entry.path().display()
            );
            stdfs::remove_file(entry.path())
                .map_err(io_error(format!("removing {}", entry.path().display())))?;
        }
    }
    Ok(())
}

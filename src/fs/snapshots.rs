//! `snapshots/`: `mkdir` to create, `rmdir` to delete, and the files inside each
//! snapshot directory (`status`, `progress`, `info`, `volume.img`).

use std::ffi::OsStr;

use serde::Serialize;

use super::inode::{Node, SnapshotFile};
use super::volumes::apply_owner_change;
use super::xattr::{self, XattrFlags, check_xattr_name};
use super::{Access, Attr, Caller, FileKind, FsCore, FsError, FsResult, SetAttr};
use crate::names::SnapshotName;
use crate::namespace::{Owner, SnapshotId, SnapshotRecord, SnapshotStatus};
use crate::snapshot::read::OpenImage;
use crate::storage::Storage;

/// Snapshot directories are private to their owner until shared with chmod.
const SNAPSHOT_DIR_MODE: u16 = 0o700;

/// The `info` file: TOML, one `key = value` per line.
#[derive(Serialize)]
struct Info<'a> {
    id: SnapshotId,
    volume: &'a str,
    status: &'a str,
    size: u64,
    block_size: u32,
    created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    completed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<&'a str>,
    changed_blocks: u64,
    stored_bytes: u64,
    owner: u32,
    description: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

fn render_info(record: &SnapshotRecord) -> String {
    let info = Info {
        id: record.id,
        volume: &record.volume,
        status: record.status.as_str(),
        size: record.size_bytes,
        block_size: record.block_size,
        created: record.created.to_rfc3339(),
        completed: record.completed.map(|t| t.to_rfc3339()),
        parent: record.parent.as_deref(),
        changed_blocks: record.changed_blocks,
        stored_bytes: record.stored_bytes,
        owner: record.owner.uid,
        description: &record.description,
        error: record.error.as_deref(),
    };
    toml::to_string(&info).unwrap_or_else(|e| format!("error = \"cannot render info: {e}\"\n"))
}

impl<S: Storage> FsCore<S> {
    /// A visible snapshot's record.
    pub(super) fn snapshot_record(&self, id: SnapshotId) -> FsResult<SnapshotRecord> {
        self.ns
            .view()
            .snapshots
            .get(&id)
            .filter(|s| !s.hidden)
            .cloned()
            .ok_or_else(|| FsError::NotFound(format!("snapshot {id}")))
    }

    pub(super) fn lookup_snapshot(&self, name: &OsStr) -> FsResult<Attr> {
        let shown = name.to_string_lossy().into_owned();
        let id = name
            .to_str()
            .and_then(|n| self.ns.view().snapshot_id(n))
            .ok_or(FsError::NotFound(shown))?;
        self.snapshot_dir_attr(id)
    }

    pub(super) fn snapshot_dir_attr(&self, id: SnapshotId) -> FsResult<Attr> {
        let record = self.snapshot_record(id)?;
        let time = record.completed.unwrap_or(record.created).to_system_time();
        Ok(Attr {
            ino: Node::SnapshotDir(id).ino(),
            kind: FileKind::Directory,
            size: 0,
            blocks: 0,
            perm: record.owner.mode,
            nlink: 2,
            uid: record.owner.uid,
            gid: record.owner.gid,
            atime: time,
            mtime: record.created.to_system_time(),
            ctime: time,
        })
    }

    pub(super) fn snapshot_file_attr(&self, id: SnapshotId, file: SnapshotFile) -> FsResult<Attr> {
        let record = self.snapshot_record(id)?;
        let size = match file {
            SnapshotFile::Image => record.size_bytes,
            _ => self.snapshot_file_text(id, file)?.len() as u64,
        };
        let time = record.completed.unwrap_or(record.created).to_system_time();
        Ok(Attr {
            ino: Node::SnapshotFile(id, file).ino(),
            kind: FileKind::RegularFile,
            size,
            // The image's blocks are shared with other snapshots and volumes: it is
            // counted at its full size (`stored_bytes` in `info` is what it added).
            // That also tells `cp` it is not sparse, so that it copies with
            // `copy_file_range`, which makes the copy by reference; `SEEK_HOLE` still
            // finds the holes for the tools that ask.
            blocks: if file == SnapshotFile::Image {
                size.div_ceil(512)
            } else {
                0
            },
            // Owner-writable, so that a copy (`cp` copies the mode) is a writable
            // volume; writes to the snapshot itself fail with EROFS.
            perm: if file == SnapshotFile::Image {
                0o644
            } else {
                0o444
            },
            nlink: 1,
            uid: record.owner.uid,
            gid: record.owner.gid,
            atime: time,
            mtime: time,
            ctime: time,
        })
    }

    /// Current contents of `status`, `progress` or `info`.
    pub(super) fn snapshot_file_text(
        &self,
        id: SnapshotId,
        file: SnapshotFile,
    ) -> FsResult<Vec<u8>> {
        let record = self.snapshot_record(id)?;
        let text = match file {
            SnapshotFile::Status => format!("{}\n", record.status.as_str()),
            SnapshotFile::Progress => {
                let percent = match record.status {
                    SnapshotStatus::Completed => 100,
                    _ => self.engine.progress(id).map_or(0, |p| p.percent()),
                };
                format!("{percent}%\n")
            }
            SnapshotFile::Info => render_info(&record),
            SnapshotFile::Image => {
                return Err(FsError::Invalid("volume.img is not a text file".into()));
            }
        };
        Ok(text.into_bytes())
    }

    /// Opens `volume.img`, once the snapshot is completed (`EAGAIN` while pending).
    /// The handle keeps reading it even after the snapshot is deleted.
    pub(super) fn open_image(&self, id: SnapshotId) -> FsResult<OpenImage<S>> {
        Ok(self.engine.open_image(id)?)
    }

    /// `mkdir snapshots/<volume>@<label>`: starts a snapshot, returns at once.
    pub fn mkdir(&self, parent: u64, name: &OsStr, caller: &Caller) -> FsResult<Attr> {
        match Node::from_ino(parent) {
            Some(Node::SnapshotsDir) => {}
            Some(Node::VolumesDir) => {
                return Err(FsError::NotPermitted(
                    "volumes/ holds only volume files (<name>.img)".into(),
                ));
            }
            Some(Node::SnapshotDir(_)) => {
                return Err(FsError::ReadOnly("a snapshot directory".into()));
            }
            _ => {
                return Err(FsError::NotPermitted(
                    "the mount's top level is fixed: volumes/ and snapshots/".into(),
                ));
            }
        }
        let name = SnapshotName::from_file_name(name)?;
        let view = self.ns.view();
        let volume_id = view
            .volume_id(name.volume().as_str())
            .ok_or_else(|| FsError::NotFound(format!("volume {}", name.volume())))?;
        let volume_owner = view.volumes.get(&volume_id).map(|v| v.owner);
        if let Some(owner) = volume_owner
            && !caller.permits(&owner, Access::Read)?
        {
            return Err(FsError::AccessDenied(format!(
                "snapshot {name}: no read permission on volume {}",
                name.volume()
            )));
        }
        let volume = self.live_volume(volume_id)?;
        let owner = Owner {
            uid: caller.uid,
            gid: caller.gid,
            mode: SNAPSHOT_DIR_MODE,
        };
        let record = self.engine.create(&name, &volume, owner)?;
        self.snapshot_dir_attr(record.id)
    }

    /// `rmdir snapshots/<name>`: deletes it (cancelling a pending capture).
    pub fn rmdir(&self, parent: u64, name: &OsStr, caller: &Caller) -> FsResult<()> {
        match Node::from_ino(parent) {
            Some(Node::SnapshotsDir) => {}
            Some(Node::Root) => {
                return Err(FsError::NotPermitted(
                    "volumes/ and snapshots/ cannot be removed".into(),
                ));
            }
            _ => return Err(FsError::NotFound(name.to_string_lossy().into_owned())),
        }
        let text = name
            .to_str()
            .ok_or(FsError::Name(crate::names::NameError::NotUtf8))?;
        let id = self
            .ns
            .view()
            .snapshot_id(text)
            .ok_or_else(|| FsError::NotFound(text.to_string()))?;
        let record = self.snapshot_record(id)?;
        if caller.uid != 0 && caller.uid != record.owner.uid {
            return Err(FsError::NotPermitted(format!(
                "snapshot {text}: only its owner may delete it"
            )));
        }
        self.engine.delete(text)?;
        Ok(())
    }

    pub(super) fn setattr_snapshot(
        &self,
        node: Node,
        changes: SetAttr,
        caller: &Caller,
    ) -> FsResult<Attr> {
        let Node::SnapshotDir(id) = node else {
            return Err(FsError::ReadOnly("snapshot files".into()));
        };
        if changes.size.is_some() {
            return Err(FsError::IsDir(format!("snapshot {id}")));
        }
        // Only sharing (mode and owner) may change: the times are the snapshot's own.
        if changes.atime.is_some() || changes.mtime.is_some() {
            return Err(FsError::ReadOnly(format!(
                "the time of snapshot {}",
                self.snapshot_record(id)?.name()
            )));
        }
        if changes.mode.is_some() || changes.uid.is_some() || changes.gid.is_some() {
            self.update_snapshot(id, |record| {
                apply_owner_change(&mut record.owner, changes, caller)
            })?;
        }
        self.snapshot_dir_attr(id)
    }

    fn update_snapshot(
        &self,
        id: SnapshotId,
        change: impl FnOnce(&mut SnapshotRecord) -> FsResult<()>,
    ) -> FsResult<()> {
        let guard = self.ns.lock();
        let mut record = self.snapshot_record(id)?;
        change(&mut record)?;
        self.ns.change(&guard, |c| c.put_snapshot(record))?;
        Ok(())
    }

    pub(super) fn snapshot_xattr_get(&self, id: SnapshotId, name: &OsStr) -> FsResult<Vec<u8>> {
        let record = self.snapshot_record(id)?;
        let key = name.to_string_lossy();
        record
            .xattrs
            .get(&key)
            .ok_or(FsError::NoAttribute(key.into_owned()))
    }

    pub(super) fn snapshot_xattr_list(&self, id: SnapshotId) -> FsResult<Vec<String>> {
        Ok(self
            .snapshot_record(id)?
            .xattrs
            .names()
            .map(str::to_string)
            .collect())
    }

    /// Sets a `user.*` attribute of a snapshot directory; `user.description` also
    /// becomes the `description` in `info`.
    pub(super) fn snapshot_xattr_set(
        &self,
        id: SnapshotId,
        name: &OsStr,
        value: Option<&[u8]>,
        flags: XattrFlags,
        caller: &Caller,
    ) -> FsResult<()> {
        let key = check_xattr_name(name)?.to_string();
        self.update_snapshot(id, |record| {
            if caller.uid != 0 && caller.uid != record.owner.uid {
                return Err(FsError::NotPermitted(format!(
                    "snapshot {}: only its owner may change it",
                    record.name()
                )));
            }
            match value {
                Some(v) => {
                    let owner = format!("snapshot {}", record.name());
                    xattr::set(&mut record.xattrs, &key, v, flags, &owner)?;
                }
                None if !record.xattrs.remove(&key) => {
                    return Err(FsError::NoAttribute(key.clone()));
                }
                None => {}
            }
            if key == "user.description" {
                record.description = value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::{Timestamp, Xattrs};

    #[test]
    fn info_is_toml_with_the_documented_keys() {
        let record = SnapshotRecord {
            id: SnapshotId(4),
            volume: "db".into(),
            label: "nightly".into(),
            lineage: crate::namespace::VolumeId(1),
            size_bytes: 1 << 30,
            block_size: 65536,
            created: Timestamp(0),
            completed: None,
            status: SnapshotStatus::Error,
            hidden: false,
            parent: Some("db@before".into()),
            changed_blocks: 3,
            stored_bytes: 4096,
            owner: Owner {
                uid: 1000,
                gid: 1000,
                mode: 0o700,
            },
            description: "weekly \"full\"".into(),
            xattrs: Xattrs::default(),
            error: Some("disk full".into()),
        };
        let text = render_info(&record);
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        for key in [
            "volume",
            "size",
            "created",
            "parent",
            "changed_blocks",
            "stored_bytes",
            "owner",
            "description",
            "error",
        ] {
            assert!(parsed.contains_key(key), "{key} missing from {text}");
        }
        assert!(!parsed.contains_key("completed"));
        assert_eq!(parsed["description"].as_str(), Some("weekly \"full\""));
        assert_eq!(parsed["size"].as_integer(), Some(1 << 30));
    }
}

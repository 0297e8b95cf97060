//! `snapshots/`: `mkdir` to create, `rmdir` to delete, and the files inside each
//! snapshot directory (`status`, `progress`, `info`, `volume.img`).
//!
//! Sharing, as EBS does it: a snapshot directory starts private to its creator (mode
//! `0700`, no ACL: nothing of the volume's ACL is inherited); its owner shares it
//! with chosen users or groups (`setfacl`, `chgrp` + `chmod g+rx`) or makes it public
//! (`chmod o+rx`). The kernel enforces all of it: the files inside are `0444`, so the
//! directory's search permission decides who reads, and so clones, `volume.img`.
//! Deleting and changing the sharing stay the owner's (or root's).
//!
//! With `block_public_access` on, nothing is public: a chmod or ACL that would give
//! others read or search is refused (`EPERM`), and the mode and access ACL shown for
//! a snapshot that was public before have those bits cleared, so the kernel lets only
//! its owner and named users and groups in. The stored bits stay, so turning the
//! setting off again shows them as they were.

use std::ffi::OsStr;

use serde::Serialize;

use super::acl::{self, AclKind};
use super::inode::{Node, SnapshotFile};
use super::volumes::{apply_owner_change, volume_permits};
use super::xattr::{self, XattrFlags, XattrName};
use super::{Access, Attr, Caller, FileKind, FsCore, FsError, FsResult, SetAttr};
use crate::names::SnapshotName;
use crate::namespace::{Owner, SnapshotId, SnapshotRecord, SnapshotStatus, Timestamp};
use crate::snapshot::diff;
use crate::snapshot::read::OpenImage;
use crate::storage::Storage;

/// Snapshot directories are private to their owner until shared.
const SNAPSHOT_DIR_MODE: u16 = 0o700;

/// What makes a snapshot public: others may read or search its directory.
const PUBLIC_BITS: u16 = 0o005;

/// The mode shown for a snapshot directory: under block public access, without
/// [`PUBLIC_BITS`].
fn shown_mode(mode: u16, block_public: bool) -> u16 {
    if block_public {
        mode & !PUBLIC_BITS
    } else {
        mode
    }
}

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
    /// Until when it cannot be deleted (`user.ebsfs.lock`), while that is ahead.
    #[serde(skip_serializing_if = "Option::is_none")]
    locked_until: Option<String>,
    /// The host that took it.
    host: &'a str,
    /// `local` (in the data directory only), `local+bucket` (also in the bucket),
    /// `bucket` (another host's, read from the bucket).
    location: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upload_error: Option<&'a str>,
    /// In the recycle bin since.
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted: Option<String>,
    /// Purged from the recycle bin at (with the bin on).
    #[serde(skip_serializing_if = "Option::is_none")]
    purge_after: Option<String>,
}

/// A rendered `changed` listing: the snapshot, the parent it is against, the text.
pub(super) type ChangedText = (SnapshotId, Option<String>, std::sync::Arc<[u8]>);

/// Where a snapshot lives, for `info`.
pub(super) struct Location {
    pub host: String,
    pub location: &'static str,
    pub upload_error: Option<String>,
    /// When its recycle bin period ends, if it is in the bin and the bin is on.
    pub purge_after: Option<Timestamp>,
}

fn render_info(record: &SnapshotRecord, at: &Location) -> String {
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
        locked_until: crate::snapshot::locked_until(record).map(|t| t.to_rfc3339()),
        host: &at.host,
        location: at.location,
        upload_error: at.upload_error.as_deref(),
        deleted: record.binned.map(|t| t.to_rfc3339()),
        purge_after: at.purge_after.map(|t| t.to_rfc3339()),
    };
    toml::to_string(&info).unwrap_or_else(|e| format!("error = \"cannot render info: {e}\"\n"))
}

impl<S: Storage> FsCore<S> {
    /// Which host a snapshot belongs to and where it is kept.
    pub(super) fn location(&self, record: &SnapshotRecord) -> Location {
        if let Some(foreign) = self.foreign(record.id) {
            return Location {
                host: foreign.host().to_string(),
                location: "bucket",
                upload_error: None,
                purge_after: None,
            };
        }
        let up = self.uploader();
        Location {
            host: self.settings.host_id.clone(),
            location: if record.remote_root.is_some() {
                "local+bucket"
            } else {
                "local"
            },
            // A completed snapshot has no upload to fail, whatever the last attempt said.
            upload_error: up
                .filter(|_| record.status == SnapshotStatus::Pending)
                .and_then(|up| up.upload_error(record.id)),
            purge_after: record.binned.and_then(|t| self.purge_time(t)),
        }
    }

    /// A visible snapshot's record.
    pub(super) fn snapshot_record(&self, id: SnapshotId) -> FsResult<SnapshotRecord> {
        if super::remote::is_foreign(id) {
            return self
                .foreign(id)
                .map(|f| f.record())
                .ok_or_else(|| FsError::NotFound(format!("snapshot {id}")));
        }
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
            .and_then(|n| {
                self.ns
                    .view()
                    .snapshot_id(n)
                    .or_else(|| Some(self.foreign_by_name(n)?.id))
            })
            .ok_or(FsError::NotFound(shown))?;
        self.snapshot_dir_attr(id)
    }

    fn block_public(&self) -> bool {
        self.settings.block_public_access
    }

    pub(super) fn snapshot_dir_attr(&self, id: SnapshotId) -> FsResult<Attr> {
        let record = self.snapshot_record(id)?;
        let time = record.completed.unwrap_or(record.created).to_system_time();
        Ok(Attr {
            ino: Node::SnapshotDir(id).ino(),
            kind: FileKind::Directory,
            size: 0,
            blocks: 0,
            perm: shown_mode(record.owner.mode, self.block_public()),
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
            // Listed only once captured, and not for other hosts' snapshots: its open
            // says why.
            SnapshotFile::Changed if super::remote::is_foreign(id) || !record.is_captured() => 0,
            _ => self.snapshot_file_text(id, file)?.len() as u64,
        };
        Ok(file_attr(&record, file, size))
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
                let uploading = self.uploader().map(|up| up.upload_percent(id));
                let percent = match (record.status, uploading) {
                    (SnapshotStatus::Completed, _) => 100,
                    // With a store, capturing is the first half and uploading the second.
                    (_, Some(upload)) if record.captured => 50 + upload.unwrap_or(0) / 2,
                    (_, Some(_)) => self.engine.progress(id).map_or(0, |p| p.percent()) / 2,
                    (_, None) => self.engine.progress(id).map_or(0, |p| p.percent()),
                };
                format!("{percent}%\n")
            }
            SnapshotFile::Info => render_info(&record, &self.location(&record)),
            SnapshotFile::Changed => {
                if super::remote::is_foreign(id) {
                    return Err(FsError::NotSupported(
                        "the changed blocks of another host's snapshot are not listed".into(),
                    ));
                }
                return Ok(self.changed_text(&record)?.to_vec());
            }
            SnapshotFile::Image => {
                return Err(FsError::Invalid("volume.img is not a text file".into()));
            }
        };
        Ok(text.into_bytes())
    }

    /// The `changed` listing of captured snapshot `record`, rendered once for a `cat`
    /// (its getattr and its open). It stays right for as long as the parent `info`
    /// names does: neither image ever changes, and ids are never reused.
    fn changed_text(&self, record: &SnapshotRecord) -> FsResult<std::sync::Arc<[u8]>> {
        let fits = |c: &&ChangedText| c.0 == record.id && c.1 == record.parent;
        let cached = self
            .last_changed
            .lock()
            .ok()
            .and_then(|c| c.as_ref().filter(fits).map(|c| c.2.clone()));
        if let Some(text) = cached {
            return Ok(text);
        }
        let text: std::sync::Arc<[u8]> = diff::render_ranges(&self.engine.changed_ranges(record)?)
            .into_bytes()
            .into();
        if let Ok(mut last) = self.last_changed.lock() {
            *last = Some((record.id, record.parent.clone(), text.clone()));
        }
        Ok(text)
    }

    /// Opens `volume.img`: the point-in-time image, also while the snapshot is
    /// pending. The handle keeps reading it even after the snapshot is deleted.
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
            Some(Node::RecycleBinDir) => {
                return Err(FsError::NotPermitted(
                    "recycle-bin/ holds deleted snapshots only: make snapshots in snapshots/"
                        .into(),
                ));
            }
            _ => {
                return Err(FsError::NotPermitted(
                    "the mount's top level is fixed: volumes/ and snapshots/".into(),
                ));
            }
        }
        let name = SnapshotName::from_file_name(name)?;
        let volume = self.volume_to_snapshot(&name, caller)?;
        let record = self.engine.create(&name, &volume, snapshot_owner(caller))?;
        self.snapshot_dir_attr(record.id)
    }

    /// The live volume snapshot `name` is of, if `caller` may read it (what `mkdir`
    /// of a snapshot needs).
    fn volume_to_snapshot(
        &self,
        name: &SnapshotName,
        caller: &Caller,
    ) -> FsResult<std::sync::Arc<crate::volume::Volume<S>>> {
        let view = self.ns.view();
        let volume_id = view
            .volume_id(name.volume().as_str())
            .ok_or_else(|| FsError::NotFound(format!("volume {}", name.volume())))?;
        if let Some(volume) = view.volumes.get(&volume_id)
            && !volume_permits(volume, caller, Access::Read)?
        {
            return Err(FsError::AccessDenied(format!(
                "snapshot {name}: no read permission on volume {}",
                name.volume()
            )));
        }
        self.live_volume(volume_id)
    }

    /// `setfattr -n user.ebsfs.snapshot -v VOL[,VOL…]@LABEL snapshots`: snapshots of
    /// every volume named, at one instant (a crash-consistent set: see
    /// [`crate::snapshot::SnapshotEngine::create_set`]). All or nothing; each needs
    /// read permission on its volume, like `mkdir`.
    pub fn snapshot_set(&self, spec: &[u8], caller: &Caller) -> FsResult<Vec<SnapshotId>> {
        let spec = std::str::from_utf8(spec)
            .map_err(|_| FsError::Invalid("a snapshot set must be UTF-8".into()))?;
        let (volumes, label) = spec.rsplit_once('@').ok_or_else(|| {
            FsError::Invalid(format!(
                "snapshot set {spec:?}: expected VOLUME[,VOLUME...]@LABEL"
            ))
        })?;
        let mut members = Vec::new();
        let names: Vec<&str> = volumes.split(',').collect();
        if let Some(twice) = names
            .iter()
            .enumerate()
            .find_map(|(i, v)| names[..i].contains(v).then_some(v))
        {
            return Err(FsError::Invalid(format!(
                "snapshot set {spec:?}: volume {twice} appears twice"
            )));
        }
        for volume in names {
            let name = SnapshotName::parse(&format!("{volume}@{label}"))?;
            let volume = self.volume_to_snapshot(&name, caller)?;
            members.push((name, volume));
        }
        let records = self.engine.create_set(&members, snapshot_owner(caller))?;
        Ok(records.iter().map(|r| r.id).collect())
    }

    /// `rmdir snapshots/<name>`: deletes it (cancelling a pending capture).
    pub fn rmdir(&self, parent: u64, name: &OsStr, caller: &Caller) -> FsResult<()> {
        match Node::from_ino(parent) {
            Some(Node::SnapshotsDir) => {}
            Some(Node::RecycleBinDir) => return self.purge_binned(name, caller),
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
        if let Some(foreign) = self.foreign_by_name(text) {
            self.refuse_foreign(foreign.id, "delete")?;
        }
        let id = self
            .ns
            .view()
            .snapshot_id(text)
            .ok_or_else(|| FsError::NotFound(text.to_string()))?;
        let record = self.snapshot_record(id)?;
        if !caller.owns(&record.owner) {
            return Err(FsError::NotPermitted(format!(
                "snapshot {text}: only its owner may delete it"
            )));
        }
        if !self.move_to_bin(text)? {
            self.engine.delete(text)?;
        }
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
                let what = format!("snapshot {}", record.name());
                apply_owner_change(
                    &mut record.owner,
                    &mut record.xattrs,
                    changes,
                    caller,
                    &what,
                )?;
                match changes.mode {
                    Some(_) => self.refuse_public(&record.owner, &what, "chmod"),
                    None => Ok(()),
                }
            })?;
        }
        self.snapshot_dir_attr(id)
    }

    /// Under block public access, refuses a change (`change`: "chmod") that would
    /// leave `owner`'s mode public.
    fn refuse_public(&self, owner: &Owner, what: &str, change: &str) -> FsResult<()> {
        if self.block_public() && owner.mode & PUBLIC_BITS != 0 {
            return Err(FsError::NotPermitted(format!(
                "{what}: {change} refused: it would make the mode {:04o}, letting others read \
                 the snapshot, and block_public_access is on",
                owner.mode
            )));
        }
        Ok(())
    }

    fn update_snapshot(
        &self,
        id: SnapshotId,
        change: impl FnOnce(&mut SnapshotRecord) -> FsResult<()>,
    ) -> FsResult<()> {
        self.refuse_foreign(id, "change")?;
        self.refuse_binned(id, "change")?;
        let guard = self.ns.lock();
        let mut record = self.snapshot_record(id)?;
        change(&mut record)?;
        let uploaded = record.remote_root.is_some();
        self.ns.change(&guard, |c| c.put_snapshot(record))?;
        drop(guard);
        if uploaded {
            // Other hosts see the new sharing once its `meta` object is rewritten.
            self.engine.meta_due(id);
        }
        Ok(())
    }

    /// An attribute of a snapshot directory or, with `on_image`, of its
    /// `volume.img`, which shows the `user.*` attributes only: the directory's ACL
    /// guards the directory.
    pub(super) fn snapshot_xattr_get(
        &self,
        id: SnapshotId,
        name: &OsStr,
        on_image: bool,
    ) -> FsResult<Vec<u8>> {
        let missing = || FsError::NoAttribute(name.to_string_lossy().into_owned());
        let record = self.snapshot_record(id)?;
        match self.xattr_name(name).map_err(|_| missing())? {
            XattrName::User(key) => record.xattrs.get(key).ok_or_else(missing),
            XattrName::Acl(_) if on_image => Err(missing()),
            XattrName::Acl(kind) => {
                let what = format!("snapshot {}", record.name());
                let acl = acl::stored(&record.xattrs, kind, &what)?.ok_or_else(missing)?;
                let shown = if kind == AclKind::Access && self.block_public() {
                    acl.without_other(PUBLIC_BITS as u8)
                } else {
                    acl
                };
                Ok(shown.to_xattr())
            }
        }
    }

    pub(super) fn snapshot_xattr_list(
        &self,
        id: SnapshotId,
        on_image: bool,
    ) -> FsResult<Vec<String>> {
        Ok(self
            .snapshot_record(id)?
            .xattrs
            .names()
            .filter(|name| !on_image || name.starts_with("user."))
            .map(str::to_string)
            .collect())
    }

    /// Sets (`Some`) or removes (`None`) an attribute of a snapshot directory: only
    /// its owner may. `user.description` also becomes the `description` in `info`;
    /// an access ACL sets the mode's permission bits, and is refused under block
    /// public access if it lets others in.
    pub(super) fn snapshot_xattr_set(
        &self,
        id: SnapshotId,
        name: &OsStr,
        value: Option<&[u8]>,
        flags: XattrFlags,
        caller: &Caller,
    ) -> FsResult<()> {
        let name = self.xattr_name(name)?;
        self.update_snapshot(id, |record| {
            let what = format!("snapshot {}", record.name());
            let key = match name {
                XattrName::Acl(kind) => {
                    let (owner, xattrs) = (&mut record.owner, &mut record.xattrs);
                    acl::set(owner, xattrs, kind, value, true, caller, &what)?;
                    return match (kind, value) {
                        (AclKind::Access, Some(_)) => {
                            self.refuse_public(owner, &what, "setting its ACL")
                        }
                        _ => Ok(()),
                    };
                }
                XattrName::User(key) => key,
            };
            if !caller.owns(&record.owner) {
                return Err(FsError::NotPermitted(format!(
                    "{what}: only its owner may change it"
                )));
            }
            if key == crate::snapshot::LOCK_XATTR {
                return set_lock(record, value, flags, &what);
            }
            if key == crate::snapshot::ORIGIN_XATTR {
                return set_origin(record, value, flags, &what);
            }
            match value {
                Some(v) => xattr::set(&mut record.xattrs, key, v, flags, &what)?,
                None if !record.xattrs.remove(key) => {
                    return Err(FsError::NoAttribute(key.to_string()));
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

/// Who owns a snapshot `caller` takes: the caller, with the private mode.
fn snapshot_owner(caller: &Caller) -> Owner {
    Owner {
        uid: caller.uid,
        gid: caller.gid,
        mode: SNAPSHOT_DIR_MODE,
    }
}

/// Sets or removes a snapshot's deletion lock (see [`crate::snapshot::LOCK_XATTR`]).
/// A lock in force can be extended, never shortened or removed, even by root.
fn set_lock(
    record: &mut SnapshotRecord,
    value: Option<&[u8]>,
    flags: XattrFlags,
    what: &str,
) -> FsResult<()> {
    let key = crate::snapshot::LOCK_XATTR;
    let current = crate::snapshot::locked_until(record);
    let Some(value) = value else {
        if let Some(until) = current {
            return Err(FsError::NotPermitted(format!(
                "{what} is locked until {}: the lock cannot be removed",
                until.to_rfc3339()
            )));
        }
        return if record.xattrs.remove(key) {
            Ok(())
        } else {
            Err(FsError::NoAttribute(key.to_string()))
        };
    };
    let until = std::str::from_utf8(value)
        .ok()
        .and_then(Timestamp::parse_rfc3339)
        .ok_or_else(|| {
            FsError::Invalid(format!(
                "{key} takes a time in UTC such as 2027-01-01T00:00:00Z, before 2262-04-11, not {:?}",
                String::from_utf8_lossy(value)
            ))
        })?;
    if let Some(current) = current
        && until < current
    {
        return Err(FsError::NotPermitted(format!(
            "{what} is locked until {}: a lock can be extended, not shortened",
            current.to_rfc3339()
        )));
    }
    xattr::set(
        &mut record.xattrs,
        key,
        until.to_rfc3339().as_bytes(),
        flags,
        what,
    )
}

/// Sets a snapshot's identity from where it was received (see
/// [`crate::snapshot::ORIGIN_XATTR`]): once, never changed or removed, since an
/// incremental receive trusts it to name the snapshot.
fn set_origin(
    record: &mut SnapshotRecord,
    value: Option<&[u8]>,
    flags: XattrFlags,
    what: &str,
) -> FsResult<()> {
    let key = crate::snapshot::ORIGIN_XATTR;
    let current = record.xattrs.get(key);
    let Some(value) = value else {
        return Err(match current {
            Some(_) => FsError::NotPermitted(format!("{what}: {key} cannot be removed")),
            None => FsError::NoAttribute(key.to_string()),
        });
    };
    let identity = std::str::from_utf8(value)
        .ok()
        .and_then(crate::snapshot::stream::Identity::parse)
        .ok_or_else(|| {
            FsError::Invalid(format!(
                "{key} takes a snapshot identity (64 hex digits), not {:?}",
                String::from_utf8_lossy(value)
            ))
        })?;
    let text = identity.to_string();
    match current {
        Some(old) if old != text.as_bytes() => Err(FsError::NotPermitted(format!(
            "{what} already has {key} {}: it cannot change",
            String::from_utf8_lossy(&old)
        ))),
        _ => xattr::set(&mut record.xattrs, key, text.as_bytes(), flags, what),
    }
}

/// The attributes of file `file` of snapshot `record`, `size` bytes long.
pub(super) fn file_attr(record: &SnapshotRecord, file: SnapshotFile, size: u64) -> Attr {
    let time = record.completed.unwrap_or(record.created).to_system_time();
    Attr {
        ino: Node::SnapshotFile(record.id, file).ino(),
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::fs::acl::tests::acl;
    use crate::fs::acl::{PosixAcl, Tag};
    use crate::fs::inode::{SNAPSHOTS_DIR, VOLUMES_DIR};
    use crate::namespace::{Timestamp, Xattrs};
    use crate::snapshot::Scheduling;
    use crate::storage::memory::MemStorage;

    #[test]
    fn block_public_access_hides_only_the_public_bits() {
        assert_eq!(shown_mode(0o755, false), 0o755);
        assert_eq!(shown_mode(0o755, true), 0o750);
        assert_eq!(shown_mode(0o707, true), 0o702);
        assert_eq!(shown_mode(0o1750, true), 0o1750);
    }

    const ALICE: u32 = 1001;
    const ACCESS: &str = "system.posix_acl_access";

    fn alice() -> Caller {
        Caller::with_groups(ALICE, ALICE, vec![ALICE])
    }

    fn bob() -> Caller {
        Caller::with_groups(1002, 1002, vec![1002])
    }

    /// A core on `storage` (ACLs enforced), with `block_public_access` as given.
    fn start(storage: &MemStorage, block_public_access: bool) -> FsCore<MemStorage> {
        let mut settings = Settings::embedded();
        settings.data_dir = "/data".into();
        settings.block_public_access = block_public_access;
        let core = FsCore::start(settings, storage.clone(), Scheduling::Manual).unwrap();
        core.enable_posix_acls();
        core
    }

    /// Alice's volume `a` and her completed snapshot `a@s`; the snapshot's inode.
    fn alices_snapshot(core: &FsCore<MemStorage>) -> u64 {
        let name = OsStr::new("a.img");
        core.create_volume(VOLUMES_DIR, name, 0o600, &alice(), true)
            .unwrap();
        let ino = core
            .mkdir(SNAPSHOTS_DIR, OsStr::new("a@s"), &alice())
            .unwrap()
            .ino;
        core.engine().run_queued();
        ino
    }

    /// user::rwx user:1002:r-x group::--- mask::r-x other::`other`.
    fn bob_and_other(other: u8) -> PosixAcl {
        acl(&[
            (Tag::UserObj, 7),
            (Tag::User(1002), 5),
            (Tag::GroupObj, 0),
            (Tag::Mask, 5),
            (Tag::Other, other),
        ])
    }

    fn set_acl(
        core: &FsCore<MemStorage>,
        ino: u64,
        acl: &PosixAcl,
        caller: &Caller,
    ) -> FsResult<()> {
        let value = acl.to_xattr();
        core.setxattr(
            ino,
            OsStr::new(ACCESS),
            Some(&value),
            XattrFlags::default(),
            caller,
        )
    }

    fn chmod(core: &FsCore<MemStorage>, ino: u64, mode: u32, caller: &Caller) -> FsResult<Attr> {
        let changes = SetAttr {
            mode: Some(mode),
            ..SetAttr::default()
        };
        core.setattr(ino, changes, caller)
    }

    fn shown_acl(core: &FsCore<MemStorage>, ino: u64) -> PosixAcl {
        PosixAcl::from_xattr(&core.getxattr(ino, OsStr::new(ACCESS)).unwrap()).unwrap()
    }

    #[test]
    fn only_the_owner_shares_and_the_acl_sets_the_mode() {
        let storage = MemStorage::new();
        let core = start(&storage, false);
        let ino = alices_snapshot(&core);
        assert_eq!(core.getattr(ino).unwrap().perm, 0o700);
        let err = set_acl(&core, ino, &bob_and_other(0), &bob()).unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        let err = chmod(&core, ino, 0o755, &bob()).unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        set_acl(&core, ino, &bob_and_other(0), &alice()).unwrap();
        assert_eq!(core.getattr(ino).unwrap().perm, 0o750);
        assert_eq!(shown_acl(&core, ino), bob_and_other(0));
        // chmod moves the mask (and other), not bob's entry.
        chmod(&core, ino, 0o715, &alice()).unwrap();
        let after = shown_acl(&core, ino);
        assert_eq!(after.mode_bits(), 0o715);
        assert!(after.entries().contains(&crate::fs::acl::AclEntry {
            tag: Tag::User(1002),
            perm: 5
        }));
        // The image shows the directory's user.* attributes, never its ACL.
        let image = core.lookup(ino, OsStr::new("volume.img")).unwrap().ino;
        let err = core.getxattr(image, OsStr::new(ACCESS)).unwrap_err();
        assert_eq!(err.errno(), libc::ENODATA, "{err}");
        assert!(core.listxattr(image).unwrap().is_empty());
        assert_eq!(core.listxattr(ino).unwrap(), [ACCESS]);
    }

    #[test]
    fn a_volumes_acl_stays_on_the_volume_and_its_user_attributes_go_along() {
        let storage = MemStorage::new();
        let core = start(&storage, false);
        let volume = core
            .create_volume(VOLUMES_DIR, OsStr::new("a.img"), 0o600, &alice(), true)
            .unwrap()
            .ino;
        let flags = XattrFlags::default();
        core.setxattr(volume, OsStr::new("user.tag"), Some(b"x"), flags, &alice())
            .unwrap();
        set_acl(&core, volume, &bob_and_other(0), &alice()).unwrap();
        assert_eq!(core.getattr(volume).unwrap().perm, 0o750);
        // The ACL is what lets bob snapshot the volume (read permission).
        let ino = core
            .mkdir(SNAPSHOTS_DIR, OsStr::new("a@bob"), &bob())
            .unwrap()
            .ino;
        assert_eq!(core.getattr(ino).unwrap().perm, 0o700);
        assert_eq!(core.listxattr(ino).unwrap(), ["user.tag"]);
        let err = core.getxattr(ino, OsStr::new(ACCESS)).unwrap_err();
        assert_eq!(err.errno(), libc::ENODATA, "{err}");
        let carol = Caller::with_groups(1003, 1003, vec![]);
        let err = core
            .mkdir(SNAPSHOTS_DIR, OsStr::new("a@carol"), &carol)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EACCES, "{err}");
    }

    #[test]
    fn acls_are_refused_until_the_kernel_enforces_them() {
        let mut settings = Settings::embedded();
        settings.data_dir = "/data".into();
        let core = FsCore::start(settings, MemStorage::new(), Scheduling::Manual).unwrap();
        let volume = core
            .create_volume(VOLUMES_DIR, OsStr::new("a.img"), 0o600, &alice(), true)
            .unwrap()
            .ino;
        let err = set_acl(&core, volume, &bob_and_other(0), &alice()).unwrap_err();
        assert_eq!(err.errno(), libc::EOPNOTSUPP, "{err}");
    }

    #[test]
    fn block_public_access_refuses_and_hides_public_snapshots() {
        let storage = MemStorage::new();
        let core = start(&storage, false);
        let ino = alices_snapshot(&core);
        set_acl(&core, ino, &bob_and_other(5), &alice()).unwrap();
        assert_eq!(core.getattr(ino).unwrap().perm, 0o755);
        core.shutdown();
        drop(core);

        let core = start(&storage, true);
        assert_eq!(core.getattr(ino).unwrap().perm, 0o750, "other bits hidden");
        assert_eq!(shown_acl(&core, ino), bob_and_other(0), "OTHER hidden");
        for caller in [alice(), Caller::with_groups(0, 0, vec![])] {
            let err = chmod(&core, ino, 0o755, &caller).unwrap_err();
            assert_eq!(err.errno(), libc::EPERM, "{err}");
            assert!(err.to_string().contains("block_public_access"), "{err}");
            let err = set_acl(&core, ino, &bob_and_other(4), &caller).unwrap_err();
            assert_eq!(err.errno(), libc::EPERM, "{err}");
            let err = chmod(&core, ino, 0o701, &caller).unwrap_err();
            assert_eq!(err.errno(), libc::EPERM, "{err}");
        }
        // Others' write bit makes nothing public; user attributes are no sharing.
        chmod(&core, ino, 0o752, &alice()).unwrap();
        assert_eq!(core.getattr(ino).unwrap().perm, 0o752);
        let flags = XattrFlags::default();
        core.setxattr(ino, OsStr::new("user.tag"), Some(b"x"), flags, &alice())
            .unwrap();
        chmod(&core, ino, 0o755, &alice()).unwrap_err();
        core.shutdown();
        drop(core);

        // Refused changes left the stored bits alone; the allowed chmod replaced them.
        let core = start(&storage, false);
        assert_eq!(core.getattr(ino).unwrap().perm, 0o752);
        chmod(&core, ino, 0o755, &alice()).unwrap();
        core.shutdown();
        drop(core);
        let core = start(&storage, true);
        assert_eq!(core.getattr(ino).unwrap().perm, 0o750);
        core.shutdown();
        drop(core);
        let core = start(&storage, false);
        assert_eq!(
            core.getattr(ino).unwrap().perm,
            0o755,
            "turning it off restores"
        );
        assert_eq!(shown_acl(&core, ino), bob_and_other(5));
    }

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
            captured: false,
            remote_root: None,
            reexamine: None,
            binned: None,
        };
        let text = render_info(
            &record,
            &Location {
                host: "h1".into(),
                location: "local",
                upload_error: None,
                purge_after: None,
            },
        );
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

    #[test]
    fn a_snapshots_origin_is_set_once_and_volumes_refuse_it() {
        let storage = MemStorage::new();
        let core = start(&storage, false);
        let ino = alices_snapshot(&core);
        let origin = OsStr::new(crate::snapshot::ORIGIN_XATTR);
        let flags = XattrFlags::default();
        let one = "ab".repeat(32);
        let err = core
            .setxattr(ino, origin, Some(b"not hex"), flags, &alice())
            .unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{err}");
        let err = core
            .setxattr(ino, origin, Some(one.as_bytes()), flags, &bob())
            .unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        core.setxattr(
            ino,
            origin,
            Some(one.to_uppercase().as_bytes()),
            flags,
            &alice(),
        )
        .unwrap();
        assert_eq!(core.getxattr(ino, origin).unwrap(), one.as_bytes());
        // The same again is no change; another, or removing it, is refused.
        core.setxattr(ino, origin, Some(one.as_bytes()), flags, &alice())
            .unwrap();
        let other = "cd".repeat(32);
        let err = core
            .setxattr(ino, origin, Some(other.as_bytes()), flags, &alice())
            .unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        let err = core
            .setxattr(ino, origin, None, flags, &alice())
            .unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        assert_eq!(core.getxattr(ino, origin).unwrap(), one.as_bytes());

        let volume = core.lookup(VOLUMES_DIR, OsStr::new("a.img")).unwrap().ino;
        let err = core
            .setxattr(volume, origin, Some(one.as_bytes()), flags, &alice())
            .unwrap_err();
        assert_eq!(err.errno(), libc::EPERM, "{err}");
        assert!(err.to_string().contains("read-only"), "{err}");
    }
}

//! The filesystem core: the namespace (`volumes/`, `snapshots/`), attributes, open
//! files and control files, with no FUSE types. [`crate::fuse`] only translates
//! requests into calls here and results back into replies.
//!
//! The core is generic over the [`Storage`] it keeps its files in: a mount uses the
//! data directory ([`crate::storage::linux::LinuxStorage`]); tests and examples use
//! memory ([`crate::storage::memory::MemStorage`]) and crash it at will. The data
//! directory's layout is in [`crate::layout`].

pub mod access;
pub mod acl;
mod clones;
pub mod error;
pub mod inode;
mod policies;
mod recovery;
mod recycle_bin;
pub mod remote;
mod snapshots;
mod startup;
mod volumes;
mod xattr;

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use dashmap::DashMap;

use crate::config::Settings;
use crate::layout::Layout;
use crate::namespace::{Namespace, VolumeId};
use crate::snapshot::read::OpenImage;
use crate::snapshot::{Scheduling, SnapshotEngine};
use crate::storage::Storage;
use crate::volume::Volume;
pub use access::{Access, Caller};
pub use error::{FsError, FsResult};
use inode::{Node, SnapshotFile};
pub use policies::PolicyPass;
pub use xattr::XattrFlags;

/// Extended attribute set on `snapshots/` to snapshot several volumes at one instant
/// (a crash-consistent set): `setfattr -n user.ebsfs.snapshot -v db,log@nightly
/// snapshots`.
pub const SNAPSHOT_SET_XATTR: &str = "user.ebsfs.snapshot";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    RegularFile,
}

/// Attributes of a node, as `stat` shows them.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    /// Allocated bytes / 512.
    pub blocks: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// Attribute changes requested by `setattr`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub name: String,
}

/// `statfs` figures for the data directory's filesystem.
pub struct FsStats {
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub files: u64,
    pub files_free: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// How an open file is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Volume data: no kernel page cache (it would double-cache the data file) and
    /// parallel writes.
    Volume,
    /// Generated text whose size is only known when read.
    Text,
    /// A snapshot image: immutable, so the kernel may cache it.
    Image,
}

enum Handle<S: Storage> {
    Volume(Arc<Volume<S>>),
    Text(Arc<[u8]>),
    Image(Arc<OpenImage<S>>),
    /// Another host's snapshot image, read from the bucket.
    Remote(Arc<remote::RemoteImage>),
}

impl<S: Storage> Clone for Handle<S> {
    fn clone(&self) -> Self {
        match self {
            Handle::Volume(v) => Handle::Volume(v.clone()),
            Handle::Text(t) => Handle::Text(t.clone()),
            Handle::Image(i) => Handle::Image(i.clone()),
            Handle::Remote(i) => Handle::Remote(i.clone()),
        }
    }
}

/// A volume as the daemon serves it: live, or damaged (its files are missing or
/// unreadable; every open fails with `EIO` until `ebsfs check --repair`).
enum VolumeSlot<S: Storage> {
    Live(Arc<Volume<S>>),
    Damaged(Arc<str>),
}

impl<S: Storage> Clone for VolumeSlot<S> {
    fn clone(&self) -> Self {
        match self {
            VolumeSlot::Live(v) => VolumeSlot::Live(v.clone()),
            VolumeSlot::Damaged(reason) => VolumeSlot::Damaged(reason.clone()),
        }
    }
}

pub struct FsCore<S: Storage> {
    settings: Settings,
    storage: S,
    layout: Layout,
    ns: Arc<Namespace>,
    engine: Arc<SnapshotEngine<S>>,
    volumes: DashMap<VolumeId, VolumeSlot<S>>,
    handles: DashMap<u64, Handle<S>>,
    next_handle: AtomicU64,
    session: recovery::Session,
    /// Held for the daemon's lifetime: one daemon per data directory.
    _lock: S::Lock,
    /// The mounting user: owner of the top-level directories.
    owner_ids: (u32, u32),
    mounted_at: SystemTime,
    stopped: AtomicBool,
    /// Whether the kernel enforces POSIX ACLs (see [`FsCore::enable_posix_acls`]).
    posix_acls: AtomicBool,
    hydrate_signal: Arc<clones::HydrateSignal>,
    /// Wakes the policy thread early, and tells it to stop.
    policy_signal: Arc<clones::HydrateSignal>,
    /// When volume I/O last happened, in ms since `epoch_start` (the hydrator yields).
    last_io: AtomicU64,
    epoch_start: Instant,
    /// The `changed` listing last rendered, by snapshot and parent: `cat` asks for its
    /// size (getattr) and then opens it, and the listing costs a walk of the change.
    last_changed: std::sync::Mutex<Option<snapshots::ChangedText>>,
}

impl<S: Storage> Drop for FsCore<S> {
    fn drop(&mut self) {
        self.hydrate_signal.stop();
        self.policy_signal.stop();
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FsError {
    let what = what.into();
    move |source| FsError::Io { what, source }
}

impl<S: Storage> FsCore<S> {
    /// Opens (or initialises) the data directory `settings.data_dir` in `storage`
    /// and recovers from any crash. See [`startup`] for what start-up checks.
    pub fn start(settings: Settings, storage: S, scheduling: Scheduling) -> FsResult<FsCore<S>> {
        let remote = match &settings.store {
            Some(store) => Some(Arc::new(
                crate::remote::RemoteStore::connect(store, &settings.host_id)
                    .map_err(FsError::Remote)?,
            )),
            None => None,
        };
        FsCore::start_with_store(settings, storage, scheduling, remote)
    }

    /// [`FsCore::start`] with the snapshot store given (tests use an in-memory one).
    pub fn start_with_store(
        settings: Settings,
        storage: S,
        scheduling: Scheduling,
        remote: Option<Arc<crate::remote::RemoteStore>>,
    ) -> FsResult<FsCore<S>> {
        let opened = startup::open(&settings, &storage, scheduling, remote)?;
        // SAFETY: geteuid/getegid only read process credentials.
        let owner_ids = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(FsCore {
            layout: Layout::new(settings.data_dir.clone()),
            settings,
            storage,
            ns: opened.ns,
            engine: opened.engine,
            volumes: opened.volumes.into_iter().collect(),
            handles: DashMap::new(),
            next_handle: AtomicU64::new(1),
            session: opened.session,
            _lock: opened.lock,
            owner_ids,
            mounted_at: SystemTime::now(),
            stopped: AtomicBool::new(false),
            hydrate_signal: Arc::default(),
            policy_signal: Arc::default(),
            last_io: AtomicU64::new(0),
            epoch_start: Instant::now(),
            posix_acls: AtomicBool::new(false),
            last_changed: std::sync::Mutex::default(),
        })
    }

    /// Keeps POSIX ACLs from now on. The FUSE adapter calls this once the kernel has
    /// agreed to enforce them (`FUSE_POSIX_ACL`); until then `system.posix_acl_*`
    /// attributes are refused (`EOPNOTSUPP`), because a kernel that does not enforce
    /// an ACL would only pass it through, and the mask it puts in the mode's group
    /// bits would let the whole group in.
    pub fn enable_posix_acls(&self) {
        self.posix_acls.store(true, Ordering::Release);
    }

    /// Which kept attribute `name` is; ACLs only once they are enforced.
    fn xattr_name<'a>(&self, name: &'a OsStr) -> FsResult<xattr::XattrName<'a>> {
        let parsed = xattr::parse_name(name)?;
        if matches!(parsed, xattr::XattrName::Acl(_)) && !self.posix_acls.load(Ordering::Acquire) {
            return Err(FsError::NotSupported(format!(
                "{}: the kernel does not enforce POSIX ACLs on this mount",
                parsed.as_str()
            )));
        }
        Ok(parsed)
    }

    /// The snapshot engine (for running queued captures under manual scheduling).
    pub fn engine(&self) -> &Arc<SnapshotEngine<S>> {
        &self.engine
    }

    /// Finishes running captures and the settling batch at hand, makes volume data
    /// durable and records a clean stop. Only the first call does anything.
    pub fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.hydrate_signal.stop();
        self.policy_signal.stop();
        self.engine.wait_all();
        self.engine.stop_remote_worker();
        self.engine.stop_settler();
        for slot in self.volumes.iter() {
            if let VolumeSlot::Live(volume) = slot.value()
                && let Err(e) = volume.sync(false).and_then(|()| volume.sync_dirty_map())
            {
                log::error!("syncing volume {} at shutdown: {e}", volume.id);
            }
        }
        self.session.end(&self.storage);
    }

    fn dir_attr(&self, ino: u64) -> Attr {
        // On a shared mount anyone may create volumes and snapshots; the sticky bit
        // lets only an object's owner delete or rename it.
        let shared = self.settings.allow_other && ino != inode::ROOT;
        Attr {
            ino,
            kind: FileKind::Directory,
            size: 0,
            blocks: 0,
            perm: if shared { 0o1777 } else { 0o755 },
            nlink: 2,
            uid: self.owner_ids.0,
            gid: self.owner_ids.1,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        match Node::from_ino(ino) {
            Some(Node::Root | Node::VolumesDir | Node::SnapshotsDir) => Ok(self.dir_attr(ino)),
            Some(Node::RecycleBinDir) if self.recycle_bin_shown() => Ok(self.dir_attr(ino)),
            Some(Node::RecycleBinDir) => Err(FsError::NotFound(inode::RECYCLE_BIN.into())),
            Some(Node::Volume(id)) => self.volume_attr(id),
            Some(Node::SnapshotDir(id)) => self.snapshot_dir_attr(id),
            Some(Node::SnapshotFile(id, file)) => self.snapshot_file_attr(id, file),
            None => Err(FsError::NotFound(format!("inode {ino}"))),
        }
    }

    /// [`FsCore::getattr`] asked through open file `fh`: the image of a snapshot
    /// deleted while open still has its attributes (the kernel asks for them when a
    /// read reaches the end of the file).
    pub fn getattr_open(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let found = self.getattr(ino);
        let Err(FsError::NotFound(_)) = found else {
            return found;
        };
        let record = match fh.and_then(|fh| self.handles.get(&fh).map(|h| h.clone())) {
            Some(Handle::Image(image)) => (*image.record).clone(),
            Some(Handle::Remote(image)) => image.record.clone(),
            _ => return found,
        };
        let attr = snapshots::file_attr(&record, SnapshotFile::Image, record.size_bytes);
        if attr.ino == ino { Ok(attr) } else { found }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let shown = name.to_string_lossy();
        match Node::from_ino(parent) {
            Some(Node::Root) => match name.to_str() {
                Some("volumes") => Ok(self.dir_attr(inode::VOLUMES_DIR)),
                Some("snapshots") => Ok(self.dir_attr(inode::SNAPSHOTS_DIR)),
                Some(inode::RECYCLE_BIN) if self.recycle_bin_shown() => {
                    Ok(self.dir_attr(inode::RECYCLE_BIN_DIR))
                }
                _ => Err(FsError::NotFound(shown.into_owned())),
            },
            Some(Node::VolumesDir) => self.lookup_volume(name),
            Some(Node::SnapshotsDir) => self.lookup_snapshot(name),
            Some(Node::RecycleBinDir) => self.lookup_binned(name),
            Some(Node::SnapshotDir(id)) => {
                let file = name
                    .to_str()
                    .and_then(SnapshotFile::from_name)
                    .ok_or_else(|| FsError::NotFound(shown.into_owned()))?;
                self.snapshot_file_attr(id, file)
            }
            Some(_) => Err(FsError::NotDir(format!("inode {parent}"))),
            None => Err(FsError::NotFound(format!("inode {parent}"))),
        }
    }

    pub fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let dir = |ino: u64, name: &str| DirEntry {
            ino,
            kind: FileKind::Directory,
            name: name.to_string(),
        };
        let mut entries = vec![dir(ino, "."), dir(inode::ROOT, "..")];
        match Node::from_ino(ino) {
            Some(Node::Root) => {
                entries.push(dir(inode::VOLUMES_DIR, "volumes"));
                entries.push(dir(inode::SNAPSHOTS_DIR, "snapshots"));
                if self.recycle_bin_shown() {
                    entries.push(dir(inode::RECYCLE_BIN_DIR, inode::RECYCLE_BIN));
                }
            }
            Some(Node::VolumesDir) => {
                let view = self.ns.view();
                entries.extend(view.volumes.values().map(|v| DirEntry {
                    ino: Node::Volume(v.id).ino(),
                    kind: FileKind::RegularFile,
                    name: format!("{}{}", v.name, crate::names::VOLUME_SUFFIX),
                }));
            }
            Some(Node::SnapshotsDir) => {
                let view = self.ns.view();
                entries.extend(
                    view.visible_snapshots()
                        .map(|s| dir(Node::SnapshotDir(s.id).ino(), &s.name())),
                );
                entries.extend(
                    self.foreign_list()
                        .iter()
                        .map(|f| dir(Node::SnapshotDir(f.id).ino(), &f.name)),
                );
            }
            Some(Node::RecycleBinDir) => {
                let view = self.ns.view();
                entries.extend(
                    view.binned_snapshots()
                        .map(|s| dir(Node::SnapshotDir(s.id).ino(), &s.name())),
                );
            }
            Some(Node::SnapshotDir(id)) => {
                let record = self.snapshot_record(id)?;
                entries[1].ino = match record.binned {
                    Some(_) => inode::RECYCLE_BIN_DIR,
                    None => inode::SNAPSHOTS_DIR,
                };
                entries.extend(SnapshotFile::ALL.into_iter().map(|f| DirEntry {
                    ino: Node::SnapshotFile(id, f).ino(),
                    kind: FileKind::RegularFile,
                    name: f.name().to_string(),
                }));
            }
            Some(_) => return Err(FsError::NotDir(format!("inode {ino}"))),
            None => return Err(FsError::NotFound(format!("inode {ino}"))),
        }
        Ok(entries)
    }

    pub fn statfs(&self) -> FsResult<FsStats> {
        let space = self
            .storage
            .space(self.layout.root())
            .map_err(io_error("statfs of the data directory"))?;
        Ok(FsStats {
            blocks: space.blocks,
            blocks_free: space.blocks_free,
            blocks_available: space.blocks_available,
            files: space.files,
            files_free: space.files_free,
            block_size: space.block_size,
            name_max: (crate::names::MAX_NAME_LEN * 2 + 1) as u32,
        })
    }

    fn add_handle(&self, handle: Handle<S>) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.insert(fh, handle);
        fh
    }

    /// Closes an open file. The last close of a deleted snapshot's image lets it settle.
    pub fn release(&self, fh: u64) {
        self.handles.remove(&fh);
    }

    fn handle_volume(&self, fh: u64) -> Option<Arc<Volume<S>>> {
        match self.handles.get(&fh).as_deref() {
            Some(Handle::Volume(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// Opens a node for I/O; `write` is whether the caller asked for write access.
    pub fn open(&self, ino: u64, write: bool) -> FsResult<(u64, OpenMode)> {
        match Node::from_ino(ino) {
            Some(Node::Volume(id)) => Ok((
                self.add_handle(Handle::Volume(self.live_volume(id)?)),
                OpenMode::Volume,
            )),
            Some(Node::SnapshotFile(id, file)) => {
                if write {
                    return Err(FsError::ReadOnly(format!("snapshot file {}", file.name())));
                }
                match file {
                    SnapshotFile::Image if remote::is_foreign(id) => {
                        let image = self.open_remote_image(id)?;
                        Ok((
                            self.add_handle(Handle::Remote(Arc::new(image))),
                            OpenMode::Image,
                        ))
                    }
                    SnapshotFile::Image => {
                        let image = self.open_image(id)?;
                        Ok((
                            self.add_handle(Handle::Image(Arc::new(image))),
                            OpenMode::Image,
                        ))
                    }
                    _ => {
                        let text = self.snapshot_file_text(id, file)?;
                        Ok((self.add_handle(Handle::Text(text.into())), OpenMode::Text))
                    }
                }
            }
            Some(node) if node.is_dir() => Err(FsError::IsDir(format!("inode {ino}"))),
            _ => Err(FsError::NotFound(format!("inode {ino}"))),
        }
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, buf: &mut [u8]) -> FsResult<usize> {
        let handle = self.handles.get(&fh).map(|h| h.clone());
        let n = match handle {
            Some(Handle::Volume(volume)) => {
                self.note_io();
                volume.read_at(buf, offset)?
            }
            Some(Handle::Text(text)) => {
                let start = (offset as usize).min(text.len());
                let n = (text.len() - start).min(buf.len());
                buf[..n].copy_from_slice(&text[start..start + n]);
                n
            }
            Some(Handle::Image(image)) => image.read(buf, offset)?,
            Some(Handle::Remote(image)) => image.read(buf, offset)?,
            None => match Node::from_ino(ino) {
                Some(Node::Volume(id)) => self.live_volume(id)?.read_at(buf, offset)?,
                _ => {
                    return Err(FsError::Invalid(format!(
                        "read on inode {ino} without an open file"
                    )));
                }
            },
        };
        Ok(n)
    }

    pub fn setattr(&self, ino: u64, changes: SetAttr, caller: &Caller) -> FsResult<Attr> {
        match Node::from_ino(ino) {
            Some(Node::Volume(id)) => self.setattr_volume(id, changes, caller),
            Some(node @ (Node::SnapshotDir(_) | Node::SnapshotFile(..))) => {
                self.setattr_snapshot(node, changes, caller)
            }
            Some(_) => Err(FsError::NotPermitted(
                "the top-level directories cannot be changed".into(),
            )),
            None => Err(FsError::NotFound(format!("inode {ino}"))),
        }
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        match Node::from_ino(ino) {
            Some(Node::Volume(id)) => self.volume_xattr_get(id, name),
            Some(Node::SnapshotDir(id)) => self.snapshot_xattr_get(id, name, false),
            Some(Node::SnapshotFile(id, SnapshotFile::Image)) => {
                self.snapshot_xattr_get(id, name, true)
            }
            _ => Err(FsError::NoAttribute(name.to_string_lossy().into_owned())),
        }
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<String>> {
        match Node::from_ino(ino) {
            Some(Node::Volume(id)) => self.volume_xattr_list(id),
            Some(Node::SnapshotDir(id)) => self.snapshot_xattr_list(id, false),
            Some(Node::SnapshotFile(id, SnapshotFile::Image)) => self.snapshot_xattr_list(id, true),
            _ => Ok(Vec::new()),
        }
    }

    /// Sets (`Some`) or removes (`None`) an extended attribute; `flags` apply to
    /// setting only.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &OsStr,
        value: Option<&[u8]>,
        flags: XattrFlags,
        caller: &Caller,
    ) -> FsResult<()> {
        match Node::from_ino(ino) {
            Some(Node::Volume(id)) => self.volume_xattr_set(id, name, value, flags, caller),
            Some(Node::SnapshotDir(id)) => self.snapshot_xattr_set(id, name, value, flags, caller),
            Some(Node::SnapshotFile(..)) => Err(FsError::ReadOnly("snapshot files".into())),
            Some(Node::SnapshotsDir) if name == SNAPSHOT_SET_XATTR => {
                let spec = value.ok_or_else(|| {
                    FsError::NotSupported(format!("{SNAPSHOT_SET_XATTR} cannot be removed"))
                })?;
                self.snapshot_set(spec, caller).map(|_| ())
            }
            _ => Err(FsError::NotSupported(
                "extended attributes are kept on volumes and snapshots only".into(),
            )),
        }
    }
}

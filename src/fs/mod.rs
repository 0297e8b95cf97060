//! The filesystem core: the namespace (`volumes/`, `snapshots/`), attributes, open
//! files and control files, with no FUSE types. [`crate::fuse`] only translates
//! requests into calls here and results back into replies.
//!
//! Layout of the data directory:
//! ```text
//! ebsfs.redb              metadata database (see meta.rs)
//! volumes/<id>.raw        live volume data, sparse
//! volumes/<id>.dirty      blocks changed since the volume's last snapshot
//! captures/<vol>-<snap>.* capture set and preserved blocks of a pending snapshot
//! chunks/pack-<n>.dat     snapshot chunks
//! session                 present while mounted; left behind by a crash
//! ```

pub mod error;
pub mod inode;
mod recovery;
mod snapshots;
mod volumes;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs as stdfs;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use std::time::SystemTime;

use log::info;

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::meta::{Meta, Owner};
use crate::snapshot::SnapshotEngine;
use crate::store::ChunkStore;
use crate::volume::Volume;
pub use error::{FsError, FsResult};
use inode::{Node, SnapshotFile};

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

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
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

#[derive(Clone)]
enum Handle {
    Volume(Arc<Volume>),
    Text(Arc<[u8]>),
    Image(u64),
}

pub struct FsCore {
    settings: Settings,
    volumes_dir: PathBuf,
    meta: Arc<Meta>,
    catalog: Arc<Catalog>,
    engine: Arc<SnapshotEngine>,
    live: DashMap<u64, Arc<Volume>>,
    handles: DashMap<u64, Handle>,
    next_handle: AtomicU64,
    session: recovery::Session,
    owner: Caller,
    mounted_at: SystemTime,
    stopped: AtomicBool,
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FsError {
    let what = what.into();
    move |source| FsError::Io { what, source }
}

impl FsCore {
    /// Opens (or initialises) the data directory and recovers from any crash.
    pub fn start(mut settings: Settings) -> FsResult<FsCore> {
        let data_dir = settings.data_dir.clone();
        stdfs::create_dir_all(&data_dir).map_err(io_error(format!(
            "creating data directory {}",
            data_dir.display()
        )))?;
        let data_dir = stdfs::canonicalize(&data_dir)
            .map_err(io_error(format!("data directory {}", data_dir.display())))?;
        settings.data_dir = data_dir.clone();
        let session = recovery::Session::begin(&data_dir)?;
        let volumes_dir = data_dir.join("volumes");
        stdfs::create_dir_all(&volumes_dir)
            .map_err(io_error(format!("creating {}", volumes_dir.display())))?;
        let meta = Arc::new(Meta::open(&data_dir.join("ebsfs.redb"))?);
        let store = Arc::new(ChunkStore::open(
            &data_dir.join("chunks"),
            &meta,
            settings.compression_level,
            settings.cache_size_bytes,
        )?);
        let catalog = Arc::new(Catalog::new(meta.load_volumes()?, meta.load_snapshots()?));
        let engine = Arc::new(SnapshotEngine::new(
            meta.clone(),
            store.clone(),
            catalog.clone(),
            data_dir.join("captures"),
            settings.capture_threads,
        ));
        let mut live = HashMap::new();
        for record in catalog.read().volumes.values() {
            let volume = Volume::open(
                &volumes_dir,
                record.id,
                u64::from(record.block_size),
                settings.max_volume_size_bytes,
            )
            .map_err(io_error(format!("opening volume {}", record.name)))?;
            live.insert(record.id, Arc::new(volume));
        }
        volumes::remove_orphan_files(&volumes_dir, &live)?;
        engine.start_settler();
        engine.recover(&live)?;
        recovery::after_crash(&session, &meta, &catalog, &store)?;
        // SAFETY: geteuid/getegid only read process credentials.
        let owner = unsafe {
            Caller {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        };
        info!(
            "data directory {}: {} volumes, {} snapshots",
            data_dir.display(),
            live.len(),
            catalog.read().visible_snapshots().count()
        );
        Ok(FsCore {
            settings,
            volumes_dir,
            meta,
            catalog,
            engine,
            live: live.into_iter().collect(),
            handles: DashMap::new(),
            next_handle: AtomicU64::new(1),
            session,
            owner,
            mounted_at: SystemTime::now(),
            stopped: AtomicBool::new(false),
        })
    }

    /// Finishes running captures, makes volume data durable and records a clean stop.
    /// Only the first call does anything.
    pub fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.engine.wait_all();
        for volume in self.live.iter() {
            if let Err(e) = volume.sync(false) {
                log::error!("syncing volume {} at shutdown: {e}", volume.id);
            }
        }
        self.session.end();
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
            uid: self.owner.uid,
            gid: self.owner.gid,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        match Node::from_ino(ino) {
            Some(Node::Root | Node::VolumesDir | Node::SnapshotsDir) => Ok(self.dir_attr(ino)),
            Some(Node::Volume(id)) => self.volume_attr(id),
            Some(Node::SnapshotDir(id)) => self.snapshot_dir_attr(id),
            Some(Node::SnapshotFile(id, file)) => self.snapshot_file_attr(id, file),
            None => Err(FsError::NotFound(format!("inode {ino}"))),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let shown = name.to_string_lossy();
        match Node::from_ino(parent) {
            Some(Node::Root) => match name.to_str() {
                Some("volumes") => Ok(self.dir_attr(inode::VOLUMES_DIR)),
                Some("snapshots") => Ok(self.dir_attr(inode::SNAPSHOTS_DIR)),
                _ => Err(FsError::NotFound(shown.into_owned())),
            },
            Some(Node::VolumesDir) => self.lookup_volume(name),
            Some(Node::SnapshotsDir) => self.lookup_snapshot(name),
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
            }
            Some(Node::VolumesDir) => {
                let records = self.catalog.read();
                entries.extend(records.volumes.values().map(|v| DirEntry {
                    ino: Node::Volume(v.id).ino(),
                    kind: FileKind::RegularFile,
                    name: format!("{}{}", v.name, crate::names::VOLUME_SUFFIX),
                }));
            }
            Some(Node::SnapshotsDir) => {
                let records = self.catalog.read();
                entries.extend(
                    records
                        .visible_snapshots()
                        .map(|s| dir(Node::SnapshotDir(s.id).ino(), &s.name())),
                );
            }
            Some(Node::SnapshotDir(id)) => {
                self.snapshot_record(id)?;
                entries[1].ino = inode::SNAPSHOTS_DIR;
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
        let path = std::ffi::CString::new(self.settings.data_dir.as_os_str().as_encoded_bytes())
            .map_err(|_| FsError::Invalid("data directory path contains a NUL byte".into()))?;
        // SAFETY: statvfs writes only into the zeroed struct we pass.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
            return Err(io_error("statfs of the data directory")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(FsStats {
            blocks: stats.f_blocks,
            blocks_free: stats.f_bfree,
            blocks_available: stats.f_bavail,
            files: stats.f_files,
            files_free: stats.f_ffree,
            block_size: stats.f_frsize as u32,
            name_max: (crate::names::MAX_NAME_LEN * 2 + 1) as u32,
        })
    }

    fn add_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.insert(fh, handle);
        fh
    }

    pub fn release(&self, fh: u64) {
        self.handles.remove(&fh);
    }

    fn handle_volume(&self, fh: u64) -> Option<Arc<Volume>> {
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
                    SnapshotFile::Image => {
                        self.check_image_readable(id)?;
                        Ok((self.add_handle(Handle::Image(id)), OpenMode::Image))
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
            Some(Handle::Volume(volume)) => volume.read_at(buf, offset)?,
            Some(Handle::Text(text)) => {
                let start = (offset as usize).min(text.len());
                let n = (text.len() - start).min(buf.len());
                buf[..n].copy_from_slice(&text[start..start + n]);
                n
            }
            Some(Handle::Image(id)) => {
                let record = self.snapshot_record(id)?;
                self.engine.read_image(&record, buf, offset)?
            }
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
}

impl FsCore {
    pub fn setattr(&self, ino: u64, changes: SetAttr, caller: Caller) -> FsResult<Attr> {
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
            Some(Node::SnapshotDir(id) | Node::SnapshotFile(id, SnapshotFile::Image)) => {
                self.snapshot_xattr_get(id, name)
            }
            _ => Err(FsError::NoAttribute(name.to_string_lossy().into_owned())),
        }
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<String>> {
        match Node::from_ino(ino) {
            Some(Node::Volume(id)) => self.volume_xattr_list(id),
            Some(Node::SnapshotDir(id) | Node::SnapshotFile(id, SnapshotFile::Image)) => {
                self.snapshot_xattr_list(id)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Sets (`Some`) or removes (`None`) an extended attribute.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &OsStr,
        value: Option<&[u8]>,
        caller: Caller,
    ) -> FsResult<()> {
        match (Node::from_ino(ino), value) {
            (Some(Node::Volume(id)), Some(value)) => self.volume_xattr_set(id, name, value, caller),
            (Some(Node::Volume(id)), None) => self.volume_xattr_remove(id, name, caller),
            (Some(Node::SnapshotDir(id)), value) => {
                self.snapshot_xattr_set(id, name, value, caller)
            }
            (Some(Node::SnapshotFile(..)), _) => Err(FsError::ReadOnly("snapshot files".into())),
            _ => Err(FsError::NotSupported(
                "extended attributes are kept on volumes and snapshots only".into(),
            )),
        }
    }
}

/// Unix permission check against an owner record: may `caller` do `want` (4 read,
/// 2 write, 1 execute)?
fn permits(owner: &Owner, caller: Caller, want: u16) -> bool {
    if caller.uid == 0 {
        return true;
    }
    let mode = owner.mode;
    let bits = if caller.uid == owner.uid {
        mode >> 6
    } else if caller.gid == owner.gid {
        mode >> 3
    } else {
        mode
    };
    bits & want == want
}

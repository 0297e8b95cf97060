//! The storage seam: every byte ebsfs keeps goes through a [`Storage`].
//!
//! Two implementations exist: [`linux::LinuxStorage`] (files in the data directory,
//! direct I/O for volume data, redb's own file backend) and [`memory::MemStorage`]
//! (everything in memory, with durable and not-yet-durable bytes kept apart so that
//! tests can "crash" the process or the host at any operation). The core is generic
//! over the trait, so the hot path is static dispatch with no cost.
//!
//! Durability contract every implementation keeps, and the core relies on:
//! - bytes written with [`StorageFile::write_all_at`] survive a crash of the process
//!   (`kill -9`) at once, and a crash of the host only after [`StorageFile::sync_data`];
//! - a new name (create, rename, remove) survives a host crash only after
//!   [`Storage::sync_dir`] of its directory;
//! - a rename replaces its target atomically.

pub mod direct;
pub mod linux;
pub mod memory;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// How [`Storage::open`] treats a missing or existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// The file must exist (`NotFound` otherwise).
    No,
    /// Created empty when missing; kept as is when it exists.
    IfMissing,
    /// Created empty; an existing file is cut to zero length.
    Truncate,
}

/// Options for [`Storage::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    pub create: Create,
    /// Large aligned requests may bypass the host page cache (volume data).
    pub direct_io: bool,
}

impl OpenOptions {
    pub const EXISTING: OpenOptions = OpenOptions {
        create: Create::No,
        direct_io: false,
    };
    pub const CREATE: OpenOptions = OpenOptions {
        create: Create::IfMissing,
        direct_io: false,
    };
    pub const TRUNCATE: OpenOptions = OpenOptions {
        create: Create::Truncate,
        direct_io: false,
    };

    pub fn direct(self) -> OpenOptions {
        OpenOptions {
            direct_io: true,
            ..self
        }
    }
}

/// The `fallocate(2)` operations ebsfs uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocate {
    /// Reserve space; `keep_size` leaves the length as it is.
    Reserve { keep_size: bool },
    /// Free the range: it reads as zeros afterwards. The length stays.
    PunchHole,
    /// Make the range read as zeros.
    ZeroRange { keep_size: bool },
}

/// Times of a file, as `stat` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileTimes {
    pub accessed: SystemTime,
    pub modified: SystemTime,
    pub changed: SystemTime,
}

/// One open file.
#[allow(clippy::len_without_is_empty)]
pub trait StorageFile: Send + Sync + 'static {
    /// Reads at `offset` until `buf` is full or the file ends; returns the bytes read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `data` at `offset`, growing the file if needed.
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Bytes of storage the file really occupies.
    fn allocated_bytes(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn allocate(&self, how: Allocate, offset: u64, len: u64) -> io::Result<()>;
    /// The first offset at or after `offset` that holds data, or `None` when only
    /// holes follow. A file without hole tracking reports everything as data.
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>>;
    /// The first offset at or after `offset` that starts a hole (the length at worst).
    fn seek_hole(&self, offset: u64) -> io::Result<u64>;
    fn sync_data(&self) -> io::Result<()>;
    fn sync_all(&self) -> io::Result<()>;
    fn times(&self) -> io::Result<FileTimes>;
    fn set_times(
        &self,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
    ) -> io::Result<()>;
    /// Hint: `[offset, offset + len)` will be read soon.
    fn will_need(&self, _offset: u64, _len: u64) {}
    /// Hint: start writing `[offset, offset + len)` back to stable storage.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
}

/// A place to keep files: the data directory, or memory in tests.
pub trait Storage: Clone + Send + Sync + 'static {
    type File: StorageFile;
    /// What redb stores the metadata database in.
    type Database: redb::StorageBackend;
    /// An exclusive claim on a directory, held while the value lives.
    type Lock: Send + Sync + 'static;

    fn open(&self, path: &Path, options: OpenOptions) -> io::Result<Self::File>;
    /// Opens (creating when `create`) the file a database lives in.
    fn open_database(&self, path: &Path, create: bool) -> io::Result<Self::Database>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the names in directory `path` durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of directory `path`, sorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;
    /// Length of the file at `path`, `None` if there is none. Directories are `Err`.
    fn file_len(&self, path: &Path) -> io::Result<Option<u64>>;
    fn is_dir(&self, path: &Path) -> bool;
    /// Claims `path` (a lock file) for this process; `WouldBlock` when another holds it.
    fn try_lock(&self, path: &Path) -> io::Result<Self::Lock>;
    /// Identifies the current boot of the host: it changes when the host restarts.
    fn boot_id(&self) -> String;
    /// Size and free space of the filesystem holding `path`.
    fn space(&self, path: &Path) -> io::Result<Space>;
}

/// `statvfs` figures of the filesystem under a [`Storage`].
#[derive(Clone, Copy, Debug)]
pub struct Space {
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub files: u64,
    pub files_free: u64,
    pub block_size: u32,
}

/// Reads the whole file at `path`, `None` if there is none.
pub fn read_file<S: Storage>(storage: &S, path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match storage.open(path, OpenOptions::EXISTING) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = vec![0u8; file.len()? as usize];
    let n = file.read_at(&mut bytes, 0)?;
    bytes.truncate(n);
    Ok(Some(bytes))
}

/// The temporary name a file is written under before [`publish_file`] renames it.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` as the file at `path`, whole or not at all: a temporary file is
/// written and synced, renamed over `path`, and the directory synced. A crash at any
/// point leaves either the old file (and perhaps a stray temporary) or the new one.
pub fn publish_file<S: Storage>(storage: &S, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let file = storage.open(&tmp, OpenOptions::TRUNCATE)?;
    file.write_all_at(bytes, 0)?;
    file.sync_data()?;
    drop(file);
    storage.rename(&tmp, path)?;
    storage.sync_dir(parent_of(path))
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::memory::{CrashMode, MemStorage};
    use super::*;

    #[test]
    fn published_files_are_whole_after_any_crash() {
        // Crash at every operation of a publish over an existing file: the file is
        // always either the old or the new contents, never empty or mixed.
        for crash_at in 1..10 {
            for mode in [CrashMode::Process, CrashMode::PowerLoss] {
                let storage = MemStorage::new();
                storage.create_dir_all(Path::new("/d")).unwrap();
                let path = Path::new("/d/f");
                publish_file(&storage, path, b"old contents").unwrap();
                storage.crash_after(crash_at);
                let result = publish_file(&storage, path, b"new");
                let storage = storage.restart(mode);
                let now = read_file(&storage, path).unwrap().unwrap();
                assert!(
                    now == b"old contents" || now == b"new",
                    "crash at {crash_at} ({mode:?}): {now:?}"
                );
                if result.is_ok() {
                    assert_eq!(now, b"new", "published, then lost ({mode:?})");
                }
            }
        }
    }
}

//! [`LinuxStorage`]: files in a directory of the host, the storage of a real mount.
//!
//! Volume data opened with `direct_io` keeps a second, `O_DIRECT` descriptor: aligned
//! writes (everything a loop device sends) and large aligned reads bypass the host
//! page cache (see [`super::direct`]); everything else is ordinary buffered I/O.

use std::ffi::{CString, OsString};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::direct::DirectFile;
use super::{Allocate, Create, FileTimes, OpenOptions, Space, Storage, StorageFile};

/// Reads this large (or larger) go direct when aligned; smaller ones go through the
/// page cache, whose readahead serves sequential readers with small requests. Measured
/// on a 1 GiB volume, cold: `dd bs=4K` 70 MB/s direct vs 179 MB/s buffered; 1 MiB
/// reads at QD8 from a loop device 1.2-2.5 GB/s direct vs ~0.95 GB/s buffered;
/// 4 KiB random reads the same either way.
const DIRECT_READ_MIN_BYTES: usize = 256 << 10;

#[derive(Clone, Copy, Debug, Default)]
pub struct LinuxStorage;

pub struct LinuxFile {
    file: File,
    direct: Option<DirectFile>,
}

fn last_error(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `pread` until `buf` is full or the file ends; the rest of `buf` is left as is.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an owned fd has no memory effects; the offset is not shared
    // because every other access uses positioned I/O.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

fn system_time(secs: i64, nanos: i64) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
}

impl StorageFile for LinuxFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if buf.len() >= DIRECT_READ_MIN_BYTES
            && let Some(direct) = &self.direct
            && let Some(n) = direct.read_at(buf, offset)?
        {
            return Ok(n);
        }
        read_full_at(&self.file, buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = &self.direct
            && direct.write_at(data, offset)?
        {
            return Ok(());
        }
        self.file.write_all_at(data, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, how: Allocate, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let mode = match how {
            Allocate::Reserve { keep_size } => {
                if keep_size {
                    keep
                } else {
                    0
                }
            }
            Allocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | keep,
            Allocate::ZeroRange { keep_size } => {
                libc::FALLOC_FL_ZERO_RANGE | if keep_size { keep } else { 0 }
            }
        };
        // SAFETY: fallocate reads only its integer arguments; the fd is owned.
        last_error(unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        })
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        seek(&self.file, offset, libc::SEEK_DATA)
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        match seek(&self.file, offset, libc::SEEK_HOLE)? {
            Some(hole) => Ok(hole),
            None => self.len(),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn times(&self) -> io::Result<FileTimes> {
        let stat = self.file.metadata()?;
        Ok(FileTimes {
            accessed: system_time(stat.atime(), stat.atime_nsec()),
            modified: system_time(stat.mtime(), stat.mtime_nsec()),
            changed: system_time(stat.ctime(), stat.ctime_nsec()),
        })
    }

    fn set_times(
        &self,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
    ) -> io::Result<()> {
        let mut times = fs::FileTimes::new();
        if let Some(t) = accessed {
            times = times.set_accessed(t);
        }
        if let Some(t) = modified {
            times = times.set_modified(t);
        }
        self.file.set_times(times)
    }

    fn will_need(&self, offset: u64, len: u64) {
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is owned.
        // It is a hint: failure costs nothing but speed.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // SAFETY: sync_file_range only reads its integer arguments; the fd is owned.
        // A failure only means the final fsync has more to do.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
}

/// An exclusive `flock` on a lock file, released when dropped (or when the process dies).
pub struct DirLock {
    _file: File,
}

impl Storage for LinuxStorage {
    type File = LinuxFile;
    type Database = redb::backends::FileBackend;
    type Lock = DirLock;

    fn open(&self, path: &Path, options: OpenOptions) -> io::Result<LinuxFile> {
        let mut open = fs::OpenOptions::new();
        open.read(true).write(true);
        match options.create {
            Create::No => {}
            Create::IfMissing => {
                open.create(true).truncate(false);
            }
            Create::Truncate => {
                open.create(true).truncate(true);
            }
        }
        let file = open.open(path)?;
        let direct = options.direct_io.then(|| DirectFile::open(path));
        Ok(LinuxFile { file, direct })
    }

    fn open_database(&self, path: &Path, create: bool) -> io::Result<Self::Database> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        redb::backends::FileBackend::new(file).map_err(io::Error::other)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let mut names = fs::read_dir(path)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    fn file_len(&self, path: &Path) -> io::Result<Option<u64>> {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{} is a directory", path.display()),
            )),
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn try_lock(&self, path: &Path) -> io::Result<DirLock> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // SAFETY: flock only reads its integer arguments; the fd is owned by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                io::Error::new(io::ErrorKind::WouldBlock, err)
            } else {
                err
            });
        }
        Ok(DirLock { _file: file })
    }

    fn boot_id(&self) -> String {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn space(&self, path: &Path) -> io::Result<Space> {
        let path = c_path(path)?;
        // SAFETY: statvfs writes only into the zeroed struct we pass.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        last_error(unsafe { libc::statvfs(path.as_ptr(), &mut stats) })?;
        Ok(Space {
            blocks: stats.f_blocks,
            blocks_free: stats.f_bfree,
            blocks_available: stats.f_bavail,
            files: stats.f_files,
            files_free: stats.f_ffree,
            block_size: stats.f_frsize as u32,
        })
    }
}

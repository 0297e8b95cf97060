//! Pack files: append-only files holding chunk payloads.
//!
//! Layout: `chunks/pack-<id>.dat`, payloads back to back, each starting on a 4 KiB
//! boundary so that freeing a chunk can punch its pages out of the file and give the
//! space back at once. Nothing in a pack describes itself: the chunk index in the
//! metadata database records where each chunk lives, and the pack's committed length.
//! Bytes past the committed length belong to a capture that never committed and are
//! cut off when the store opens.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every payload starts at a multiple of this.
pub const PACK_ALIGN: u64 = 4096;

/// A pack at or past this size takes no new captures.
pub const PACK_TARGET_BYTES: u64 = 1 << 30;

pub fn align_up(value: u64) -> u64 {
    value.div_ceil(PACK_ALIGN) * PACK_ALIGN
}

pub fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("pack-{id:08}.dat"))
}

/// Parses `pack-<id>.dat`.
pub fn pack_id_of(file_name: &str) -> Option<u32> {
    file_name
        .strip_prefix("pack-")?
        .strip_suffix(".dat")?
        .parse()
        .ok()
}

#[derive(Debug)]
pub struct PackFile {
    pub id: u32,
    file: File,
}

impl PackFile {
    pub fn open(dir: &Path, id: u32) -> io::Result<PackFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(pack_path(dir, id))?;
        Ok(PackFile { id, file })
    }

    pub fn read_into(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Returns the pages of `[offset, offset + len)` to the filesystem. The range is
    /// widened to the page the next payload starts on, so only this chunk's pages go.
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = align_up(offset + len);
        punch_hole(&self.file, offset, end - offset)
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the range reads as zeros and frees its blocks.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How much appended data may sit in the page cache before writeback starts.
pub const WRITEBACK_STEP: u64 = 16 << 20;

/// Asks the kernel to start writing a range back (without waiting for it).
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range only reads its integer arguments; the fd is owned.
    // A failure only means the final fsync has more to do.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Exclusive appender on one pack for the lifetime of one capture. Appends may run
/// from several threads at once: each reserves its aligned range atomically.
#[derive(Debug)]
pub struct PackWriter {
    pub pack: Arc<PackFile>,
    /// The pack's committed length when the writer was handed out.
    pub start: u64,
    next: AtomicU64,
}

impl PackWriter {
    pub fn new(pack: Arc<PackFile>, committed_len: u64) -> PackWriter {
        PackWriter {
            pack,
            start: committed_len,
            next: AtomicU64::new(committed_len),
        }
    }

    /// Writes `payload` at the next aligned offset and returns that offset. Every
    /// [`WRITEBACK_STEP`] bytes, writeback of the step just filled starts, so the
    /// disk works while the capture hashes and the final fsync finds little to do.
    pub fn append(&self, payload: &[u8]) -> io::Result<u64> {
        let len = align_up(payload.len() as u64);
        let offset = self.next.fetch_add(len, Ordering::Relaxed);
        self.pack.file.write_all_at(payload, offset)?;
        // Steps this append completed: from the step it started in to the one it ends in.
        let (from, to) = (
            offset / WRITEBACK_STEP * WRITEBACK_STEP,
            (offset + len) / WRITEBACK_STEP * WRITEBACK_STEP,
        );
        if to > from {
            let from = from.max(self.start);
            start_writeback(&self.pack.file, from, to - from);
        }
        Ok(offset)
    }

    /// The length the pack has once everything appended so far is committed.
    pub fn end(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn appends_are_aligned_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let pack = Arc::new(PackFile::open(dir.path(), 3).unwrap());
        let writer = PackWriter::new(pack.clone(), 0);
        let a = writer.append(&[1u8; 100]).unwrap();
        let b = writer.append(&[2u8; 5000]).unwrap();
        assert_eq!((a, b), (0, 4096));
        assert_eq!(writer.end(), 4096 + 8192);
        let mut back = vec![0u8; 5000];
        pack.read_into(&mut back, b).unwrap();
        assert_eq!(back, vec![2u8; 5000]);
        assert_eq!(pack_id_of("pack-00000003.dat"), Some(3));
        assert!(pack_path(dir.path(), 3).exists());
    }

    #[test]
    fn punch_frees_space_and_reads_zero() {
        let dir = tempfile::tempdir().unwrap();
        let pack = Arc::new(PackFile::open(dir.path(), 1).unwrap());
        let writer = PackWriter::new(pack.clone(), 0);
        let offset = writer.append(&vec![7u8; 1 << 20]).unwrap();
        pack.sync_data().unwrap();
        let before = std::fs::metadata(pack_path(dir.path(), 1))
            .unwrap()
            .blocks();
        pack.punch(offset, 1 << 20).unwrap();
        let after = std::fs::metadata(pack_path(dir.path(), 1))
            .unwrap()
            .blocks();
        assert!(after < before, "blocks {before} -> {after}");
        let mut back = [1u8; 16];
        pack.read_into(&mut back, 0).unwrap();
        assert_eq!(back, [0u8; 16]);
    }
}

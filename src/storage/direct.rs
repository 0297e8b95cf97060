//! Direct I/O to a volume's data file or a pack: aligned requests bypass the host
//! page cache.
//!
//! A loop device over a volume already has a page cache above it (the filesystem on
//! the device); caching the same bytes again in the data file's page cache costs a
//! copy, page allocation and writeback on every write, and buffered writes to one
//! file serialise on its inode lock. Requests whose offset, length and buffer are
//! [`ALIGN`]-aligned (every request a loop device sends) go through an `O_DIRECT`
//! descriptor instead; anything else uses the ordinary descriptor. (Small reads stay
//! buffered by the volume's choice, for readahead.) The kernel keeps
//! the two coherent: a direct write invalidates the cached pages of its range, a
//! direct read writes back dirty ones first.
//!
//! Where the data directory's filesystem refuses `O_DIRECT` (at open or on the first
//! request), the volume quietly stays on buffered I/O.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use log::warn;

/// Alignment of offsets, lengths and memory for direct requests. 4 KiB satisfies
/// every block device and filesystem block size in common use.
pub const ALIGN: usize = 4096;

/// A zero-initialised heap buffer whose start is [`ALIGN`]-aligned.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub const fn new() -> AlignedBuf {
        AlignedBuf {
            ptr: NonNull::dangling(),
            len: 0,
        }
    }

    /// The first `len` bytes, growing (and zeroing) the buffer if it is shorter.
    /// Never shrinks, so a reused buffer costs nothing after its first use.
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        if len > self.len {
            self.grow(len.next_multiple_of(ALIGN));
        }
        // SAFETY: ptr is valid for self.len >= len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }

    /// The first `len` bytes, growing the buffer if it is shorter while keeping the
    /// bytes it held (bytes past the old capacity read as zeros).
    pub fn slice_mut_keeping(&mut self, len: usize) -> &mut [u8] {
        if len > self.len {
            let mut grown = AlignedBuf::new();
            let new = grown.slice_mut(len.max(2 * self.len));
            new[..self.len].copy_from_slice(self.slice_mut(self.len));
            std::mem::swap(self, &mut grown);
        }
        self.slice_mut(len)
    }

    fn grow(&mut self, len: usize) {
        let layout = Layout::from_size_align(len, ALIGN).expect("aligned buffer layout");
        // SAFETY: layout has a non-zero size (len >= ALIGN).
        let ptr = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout);
        };
        self.release();
        self.ptr = ptr;
        self.len = len;
    }

    fn release(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr was allocated by grow with exactly this layout.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.len, ALIGN),
                )
            };
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> AlignedBuf {
        AlignedBuf::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.release();
    }
}

thread_local! {
    /// Staging buffer for direct writes whose source is not aligned.
    static WRITE_STAGING: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf::new()) };
}

fn aligned_range(offset: u64, len: usize) -> bool {
    len > 0 && offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

fn aligned_memory(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(ALIGN)
}

/// The `O_DIRECT` side of a data file.
pub struct DirectFile {
    file: Option<File>,
    /// Cleared when the filesystem rejects a direct request.
    enabled: AtomicBool,
}

impl DirectFile {
    /// Opens `path` for direct I/O; a filesystem without `O_DIRECT` support gives a
    /// `DirectFile` that declines every request.
    pub fn open(path: &Path) -> DirectFile {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        DirectFile {
            enabled: AtomicBool::new(file.is_some()),
            file,
        }
    }

    fn usable(&self) -> Option<&File> {
        self.file
            .as_ref()
            .filter(|_| self.enabled.load(Ordering::Relaxed))
    }

    /// `EINVAL` from a direct request means the filesystem's alignment rules are
    /// stricter than [`ALIGN`] or it does not really do direct I/O: stop trying.
    fn declined(&self, e: &io::Error) -> bool {
        if e.raw_os_error() == Some(libc::EINVAL) {
            if self.enabled.swap(false, Ordering::Relaxed) {
                warn!("direct I/O refused by the filesystem ({e}); using buffered I/O");
            }
            true
        } else {
            false
        }
    }

    /// Writes `data` at `offset` directly if the request is aligned. `Ok(false)`
    /// means it was not taken and the caller writes it through the page cache.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<bool> {
        let Some(file) = self.usable() else {
            return Ok(false);
        };
        if !aligned_range(offset, data.len()) {
            return Ok(false);
        }
        let result = if aligned_memory(data) {
            file.write_all_at(data, offset)
        } else {
            WRITE_STAGING.with_borrow_mut(|staging| {
                let staged = staging.slice_mut(data.len());
                staged.copy_from_slice(data);
                file.write_all_at(staged, offset)
            })
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if self.declined(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads into `buf` at `offset` directly if offset, length and buffer are all
    /// aligned, returning the bytes read (fewer only at the end of the file).
    /// `Ok(None)` means it was not taken.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
        let Some(file) = self.usable() else {
            return Ok(None);
        };
        if !aligned_range(offset, buf.len()) || !aligned_memory(buf) {
            return Ok(None);
        }
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                // A short direct read ends at the end of the file; what is left is
                // not aligned any more and past the end anyway.
                Ok(n) if !n.is_multiple_of(ALIGN) => {
                    filled += n;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if filled == 0 && self.declined(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(filled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_zeroed_and_reused() {
        let mut buf = AlignedBuf::new();
        let first = buf.slice_mut(100);
        assert_eq!(first.as_ptr() as usize % ALIGN, 0);
        assert!(first.iter().all(|&b| b == 0));
        first[0] = 7;
        let ptr = first.as_ptr();
        assert_eq!(
            buf.slice_mut(ALIGN).as_ptr(),
            ptr,
            "no regrowth within capacity"
        );
        let big = buf.slice_mut(3 * ALIGN + 1);
        assert_eq!(big.len(), 3 * ALIGN + 1);
        assert_eq!(big.as_ptr() as usize % ALIGN, 0);

        big[..ALIGN].fill(3);
        let kept = buf.slice_mut_keeping(9 * ALIGN);
        assert_eq!(kept.as_ptr() as usize % ALIGN, 0);
        assert!(kept[..ALIGN].iter().all(|&b| b == 3), "contents kept");
        assert!(kept[4 * ALIGN..].iter().all(|&b| b == 0), "new bytes zero");
    }

    #[test]
    fn direct_and_buffered_io_see_each_other() {
        // The package directory: unlike /tmp, never a tmpfs that lacks O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("data");
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let direct = DirectFile::open(&path);

        // Unaligned requests are declined, never half done.
        assert!(!direct.write_at(&[1u8; 100], 0).unwrap());
        assert!(!direct.write_at(&[1u8; ALIGN], 512).unwrap());
        let mut odd = vec![0u8; 100];
        assert_eq!(direct.read_at(&mut odd, 0).unwrap(), None);

        // Buffered bytes are visible to a direct read and the other way round.
        buffered.write_all_at(&[5u8; 2 * ALIGN], 0).unwrap();
        let mut aligned = AlignedBuf::new();
        let buf = aligned.slice_mut(2 * ALIGN);
        assert_eq!(direct.read_at(buf, 0).unwrap(), Some(2 * ALIGN));
        assert!(buf.iter().all(|&b| b == 5));
        // An unaligned source is staged through an aligned buffer.
        let source = vec![9u8; ALIGN + 1];
        assert!(direct.write_at(&source[1..], ALIGN as u64).unwrap());
        let mut back = vec![0u8; 2 * ALIGN];
        buffered.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..ALIGN].iter().all(|&b| b == 5));
        assert!(back[ALIGN..].iter().all(|&b| b == 9));

        // A direct read across the end of the file returns what is there.
        buffered.set_len(ALIGN as u64 + 10).unwrap();
        let buf = aligned.slice_mut(2 * ALIGN);
        assert_eq!(direct.read_at(buf, 0).unwrap(), Some(ALIGN + 10));
        assert!(buf[ALIGN..ALIGN + 10].iter().all(|&b| b == 9));
    }
}

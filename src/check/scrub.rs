//! `ebsfs scrub`: reading snapshot images through a mount. Every read of a snapshot
//! image makes the daemon verify the hashes of the chunks it reads, so reading an
//! image in full verifies every chunk it names; damage comes back as `EIO`.
//!
//! Plain file I/O on the mount, nothing else: the page cache is bypassed (`O_DIRECT`)
//! so that each byte really is read from the daemon, and a failed read is retried a
//! block at a time to name exactly the blocks that fail.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Bytes asked for per read.
const READ_BYTES: usize = 1 << 20;
/// Alignment `O_DIRECT` needs for buffers, offsets and lengths.
const DIRECT_ALIGN: usize = 4096;

/// What reading one image found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImageScrub {
    pub size_bytes: u64,
    /// Byte ranges `[start, end)` that failed with `EIO`, merged.
    pub failed: Vec<(u64, u64)>,
}

/// A buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let bytes = vec![0u8; len + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { bytes, start }
    }

    fn get(&mut self, len: usize) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + len]
    }
}

fn open_uncached(path: &Path) -> io::Result<File> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // No direct I/O here: drop what the page cache holds instead.
            let file = File::open(path)?;
            // SAFETY: posix_fadvise only reads its integer arguments.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
            Ok(file)
        }
        other => other,
    }
}

/// Reads `[offset, offset + len)`: `Ok(false)` when it failed with `EIO`.
fn read_range(file: &File, buf: &mut AlignedBuf, offset: u64, len: usize) -> io::Result<bool> {
    let aligned = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let buf = buf.get(aligned);
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn note_failed(failed: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    match failed.last_mut() {
        Some(last) if last.1 == start => last.1 = end,
        _ => failed.push((start, end)),
    }
}

/// Reads the image at `path` in full; `progress(bytes_done)` after each read. A read
/// that fails with `EIO` is retried in `block_size` pieces, and the pieces that fail
/// are reported.
pub fn scrub_image(
    path: &Path,
    block_size: u64,
    progress: &mut dyn FnMut(u64),
) -> io::Result<ImageScrub> {
    let file = open_uncached(path)?;
    let size_bytes = file.metadata()?.len();
    let block = (block_size.max(DIRECT_ALIGN as u64) as usize).min(READ_BYTES);
    let mut buf = AlignedBuf::new(READ_BYTES);
    let mut scrub = ImageScrub {
        size_bytes,
        failed: Vec::new(),
    };
    let mut pos = 0;
    while pos < size_bytes {
        let len = (size_bytes - pos).min(READ_BYTES as u64) as usize;
        if !read_range(&file, &mut buf, pos, len)? {
            let mut piece = pos;
            while piece < pos + len as u64 {
                let piece_len = (pos + len as u64 - piece).min(block as u64);
                if !read_range(&file, &mut buf, piece, piece_len as usize)? {
                    note_failed(&mut scrub.failed, piece, piece + piece_len);
                }
                piece += piece_len;
            }
        }
        pos += len as u64;
        progress(pos);
    }
    Ok(scrub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_file_reads_back_whole_with_progress() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, vec![7u8; READ_BYTES * 2 + 5000]).unwrap();
        let mut seen = Vec::new();
        let scrub = scrub_image(&path, 65536, &mut |done| seen.push(done)).unwrap();
        assert_eq!(
            scrub,
            ImageScrub {
                size_bytes: READ_BYTES as u64 * 2 + 5000,
                failed: Vec::new()
            }
        );
        assert_eq!(
            seen,
            [READ_BYTES as u64, READ_BYTES as u64 * 2, scrub.size_bytes]
        );
    }

    #[test]
    fn failed_ranges_merge_when_adjacent() {
        let mut failed = Vec::new();
        note_failed(&mut failed, 0, 10);
        note_failed(&mut failed, 10, 20);
        note_failed(&mut failed, 30, 40);
        assert_eq!(failed, [(0, 20), (30, 40)]);
    }
}

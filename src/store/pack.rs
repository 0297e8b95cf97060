//! Pack files: append-only files holding chunk payloads.
//!
//! Layout (`chunks/pack-<id>.dat`, docs/FORMAT.md): a [`HEADER_BYTES`] header — magic,
//! format version, the pack's own id — then payloads, each starting on a 4 KiB
//! boundary so that freeing a chunk can punch its pages out of the file and give the
//! space back at once. Payloads do not describe themselves: the chunk index in the
//! metadata database records where each chunk lives, and the pack's committed length.
//! Bytes past the committed length belong to a capture that never committed.
//!
//! Packs are opened for direct I/O as well ([`crate::storage::direct`]): a capture
//! appends whole padded runs from page-aligned buffers, and reads of long runs of
//! chunks are whole pages into page-aligned buffers, so both bypass the page cache
//! where the filesystem allows; smaller or unaligned requests stay buffered. Direct
//! writes are no more durable than buffered ones until the `fdatasync` a capture
//! makes before it commits (which also flushes the device's cache).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::{Allocate, OpenOptions, Storage, StorageFile, parent_of};

/// Every payload starts at a multiple of this.
pub const PACK_ALIGN: u64 = 4096;

/// A pack at or past this size takes no new captures.
pub const PACK_TARGET_BYTES: u64 = 1 << 30;

/// Magic at offset 0 of a pack.
pub const MAGIC: &[u8; 8] = b"EBSPACK\0";
/// Format version at [`VERSION_OFFSET`] (little-endian u32).
pub const VERSION: u32 = 1;
pub const VERSION_OFFSET: usize = 8;
/// The pack's id at [`ID_OFFSET`] (little-endian u32), so a renamed pack is noticed.
pub const ID_OFFSET: usize = 12;
/// Payloads start here: one aligned page.
pub const HEADER_BYTES: u64 = PACK_ALIGN;

/// How much appended data may sit in the page cache before writeback starts.
pub const WRITEBACK_STEP: u64 = 16 << 20;

pub fn align_up(value: u64) -> u64 {
    value.div_ceil(PACK_ALIGN) * PACK_ALIGN
}

/// The ranges between the header and `committed_len` that no extent in `extents`
/// (sorted `(start, end)` pairs, see [`super::index::live_extents`]) covers: space
/// nothing references.
pub fn unreferenced_ranges(extents: &[(u64, u64)], committed_len: u64) -> Vec<(u64, u64)> {
    let mut gaps = Vec::new();
    let mut cursor = HEADER_BYTES;
    for &(start, end) in extents.iter().chain([&(committed_len, committed_len)]) {
        if start > cursor {
            gaps.push((cursor, start));
        }
        cursor = cursor.max(end);
    }
    gaps
}

fn header(id: u32) -> Vec<u8> {
    let mut header = vec![0u8; HEADER_BYTES as usize];
    header[..8].copy_from_slice(MAGIC);
    header[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&VERSION.to_le_bytes());
    header[ID_OFFSET..ID_OFFSET + 4].copy_from_slice(&id.to_le_bytes());
    header
}

/// Checks the header of pack `id` (its first bytes, `bytes`).
pub fn check_header(bytes: &[u8], id: u32) -> Result<(), String> {
    if bytes.len() < ID_OFFSET + 4 {
        return Err("shorter than its header".into());
    }
    if &bytes[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(VERSION_OFFSET);
    if version != VERSION {
        return Err(format!(
            "format version {version}, this ebsfs reads {VERSION}"
        ));
    }
    let found = word(ID_OFFSET);
    if found != id {
        return Err(format!("header names pack {found}"));
    }
    Ok(())
}

pub struct PackFile<S: Storage> {
    pub id: u32,
    pub path: PathBuf,
    file: S::File,
}

impl<S: Storage> PackFile<S> {
    /// Opens an existing pack (never creates one: a missing pack is damage).
    pub fn open(storage: &S, path: PathBuf, id: u32) -> io::Result<PackFile<S>> {
        let file = storage.open(&path, OpenOptions::EXISTING.direct())?;
        Ok(PackFile { id, path, file })
    }

    /// Creates pack `id` with its header, synced, its name durable.
    pub fn create(storage: &S, path: PathBuf, id: u32) -> io::Result<PackFile<S>> {
        let file = storage.open(&path, OpenOptions::TRUNCATE.direct())?;
        file.write_all_at(&header(id), 0)?;
        file.sync_data()?;
        storage.sync_dir(parent_of(&path))?;
        Ok(PackFile { id, path, file })
    }

    /// Reads and checks the header.
    pub fn verify_header(&self) -> io::Result<Result<(), String>> {
        let mut head = [0u8; 16];
        let n = self.file.read_at(&mut head, 0)?;
        Ok(check_header(&head[..n], self.id))
    }

    /// Reads exactly `buf.len()` bytes at `offset`; a pack cut short is an error.
    pub fn read_into(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at_least(buf, offset, buf.len())
    }

    /// Reads up to `buf.len()` bytes at `offset`, of which at least `needed`; a pack
    /// cut short before them is an error. A read of whole pages into a page-aligned
    /// `buf` may go direct (see [`crate::storage::direct`]) even where the last
    /// payload it needs ends inside its last page.
    pub fn read_at_least(&self, buf: &mut [u8], offset: u64, needed: usize) -> io::Result<()> {
        let n = self.file.read_at(buf, offset)?;
        if n < needed {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "pack {} ends at {} (needed {})",
                    self.id,
                    offset + n as u64,
                    offset + needed as u64
                ),
            ));
        }
        Ok(())
    }

    pub fn file_len(&self) -> io::Result<u64> {
        self.file.len()
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
        self.file
            .allocate(Allocate::PunchHole, offset, end - offset)
    }

    /// The first offset at or after `offset` that holds data (see [`StorageFile::seek_data`]).
    pub fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.file.seek_data(offset)
    }

    /// The first offset at or after `offset` that starts a hole.
    pub fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        self.file.seek_hole(offset)
    }

    /// Hint that `[offset, offset + len)` will be read soon.
    pub fn will_need(&self, offset: u64, len: u64) {
        self.file.will_need(offset, len);
    }
}

/// Exclusive appender on one pack for the lifetime of one capture. Appends may run
/// from several threads at once: each reserves its aligned range atomically.
pub struct PackWriter<S: Storage> {
    pub pack: Arc<PackFile<S>>,
    /// The pack's committed length when the writer was handed out.
    pub start: u64,
    next: AtomicU64,
}

impl<S: Storage> PackWriter<S> {
    pub fn new(pack: Arc<PackFile<S>>, committed_len: u64) -> PackWriter<S> {
        let start = committed_len.max(HEADER_BYTES);
        PackWriter {
            pack,
            start,
            next: AtomicU64::new(start),
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
            self.pack.file.start_writeback(from, to - from);
        }
        Ok(offset)
    }

    /// The length the pack has once everything appended so far is committed.
    pub fn end(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use crate::storage::memory::MemStorage;
    use std::path::Path;

    fn setup() -> (MemStorage, PathBuf) {
        let storage = MemStorage::new();
        storage.create_dir_all(Path::new("/c")).unwrap();
        (storage, PathBuf::from("/c/pack-00000003.dat"))
    }

    #[test]
    fn appends_are_aligned_after_the_header_and_read_back() {
        let (storage, path) = setup();
        let pack = Arc::new(PackFile::create(&storage, path.clone(), 3).unwrap());
        let writer = PackWriter::new(pack.clone(), 0);
        let a = writer.append(&[1u8; 100]).unwrap();
        let b = writer.append(&[2u8; 5000]).unwrap();
        assert_eq!((a, b), (HEADER_BYTES, HEADER_BYTES + 4096));
        assert_eq!(writer.end(), HEADER_BYTES + 4096 + 8192);
        let mut back = vec![0u8; 5000];
        pack.read_into(&mut back, b).unwrap();
        assert_eq!(back, vec![2u8; 5000]);
        assert_eq!(pack.verify_header().unwrap(), Ok(()));
        let renamed = PackFile::<MemStorage>::open(&storage, path, 4).unwrap();
        assert!(renamed.verify_header().unwrap().is_err());
    }

    #[test]
    fn runs_written_and_read_direct_on_a_real_filesystem_read_back() {
        use crate::storage::direct::AlignedBuf;
        use crate::storage::linux::LinuxStorage;
        // The package directory: unlike /tmp, never a tmpfs that lacks O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("pack-00000003.dat");
        let pack = Arc::new(PackFile::create(&LinuxStorage, path.clone(), 3).unwrap());
        let writer = PackWriter::new(pack.clone(), 0);
        // A run of two payloads, each padded to a page, from an aligned buffer.
        let mut run = AlignedBuf::new();
        let bytes = run.slice_mut(3 * 4096 + (256 << 10));
        bytes[..5000].fill(7);
        bytes[8192..].fill(9);
        let at = writer.append(bytes).unwrap();
        pack.sync_data().unwrap();
        // Reread through a fresh descriptor, whole pages into an aligned buffer.
        let reopened = PackFile::<LinuxStorage>::open(&LinuxStorage, path, 3).unwrap();
        assert_eq!(reopened.verify_header().unwrap(), Ok(()));
        let mut back = AlignedBuf::new();
        let len = bytes.len();
        let buf = back.slice_mut(len);
        reopened.read_at_least(buf, at, len).unwrap();
        assert_eq!(&buf[..], &bytes[..]);
        // A pack cut inside its last page still gives what is needed of it, and an
        // error when cut before that.
        reopened.truncate(at + len as u64 - 100).unwrap();
        let buf = back.slice_mut(len);
        reopened.read_at_least(buf, at, len - 100).unwrap();
        assert!(buf[8192..len - 100].iter().all(|&b| b == 9));
        let err = reopened.read_at_least(buf, at, len).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn punch_frees_space_and_short_reads_are_errors() {
        let (storage, path) = setup();
        let pack = Arc::new(PackFile::create(&storage, path, 3).unwrap());
        let writer = PackWriter::new(pack.clone(), 0);
        let offset = writer.append(&vec![7u8; 1 << 20]).unwrap();
        pack.punch(offset, 1 << 20).unwrap();
        let mut back = [1u8; 16];
        pack.read_into(&mut back, offset).unwrap();
        assert_eq!(back, [0u8; 16]);
        pack.truncate(offset + 100).unwrap();
        let mut long = vec![0u8; 200];
        assert_eq!(
            pack.read_into(&mut long, offset).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}

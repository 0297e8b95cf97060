//! [`Freeze`]: the point-in-time view of a volume while a snapshot is captured.
//!
//! At the freeze, the volume's dirty map becomes the *capture set*: the blocks this
//! snapshot must read as they were at that instant. Besides the set's bits, a freeze
//! may *re-examine* a range of blocks: those a shrink cut off since the last snapshot
//! (they read as zeros now, whatever older snapshots hold), or every block when the
//! dirty map cannot be trusted after a host crash.
//!
//! Nobody waits on anybody:
//! - a writer about to change pages of a block not yet captured first copies those
//!   4 KiB pages (only those) to the preservation file (`captures/<id>.cow`), records
//!   them, then writes;
//! - the capture worker reads the block from the live file, *then* lays the recorded
//!   pages over it, then marks the block done; writers stop preserving it.
//!
//! Why this is exact: a write lands after its pages were recorded. If it lands before
//! the worker's read of the page, the record exists before the worker looks for it and
//! the old page comes from the copy; if after, the worker read the old page itself.
//! Each block's records are guarded by one lock (of [`SHARDS`]), held across "is this
//! page recorded? copy it, record it", so a page is copied once, before any write.
//!
//! Bytes at or past the frozen size read as zeros, so a capture never sees data
//! written after the freeze beyond the old end of the volume.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::bitmap::Bitmap;
use super::dirty::DirtyMap;

/// Unit of preservation: what one small write can change.
pub const PAGE: u64 = 4096;

/// Locks over the preservation records; a block always uses the same one.
const SHARDS: usize = 64;

/// Page index (byte offset / [`PAGE`]) → offset of its preserved copy.
type Records = HashMap<u64, u64>;

pub struct Freeze {
    /// The blocks this snapshot captures (file `captures/<id>.set`).
    pub blocks: DirtyMap,
    /// Blocks captured whether or not their bit is set.
    pub reexamine: Range<u64>,
    pub size_bytes: u64,
    pub block_size: u64,
    /// Blocks the worker has read: writers no longer preserve them.
    done: Bitmap,
    /// Words of `blocks` with bits set, fixed at the freeze: the first work units.
    words: Vec<usize>,
    cow: File,
    cow_path: PathBuf,
    cow_next: AtomicU64,
    preserved: Vec<Mutex<Records>>,
    /// First failure to preserve a page; the snapshot then ends in error.
    failure: Mutex<Option<String>>,
}

impl Freeze {
    /// Creates the (empty) preservation file for a freeze.
    pub fn create_cow_file(cow_path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(cow_path)
    }

    pub fn new(
        blocks: DirtyMap,
        reexamine: Range<u64>,
        size_bytes: u64,
        block_size: u64,
        cow: File,
        cow_path: &Path,
    ) -> Freeze {
        let words = blocks.nonzero_words();
        Freeze {
            blocks,
            reexamine,
            size_bytes,
            block_size,
            done: Bitmap::new(),
            words,
            cow,
            cow_path: cow_path.to_path_buf(),
            cow_next: AtomicU64::new(0),
            preserved: (0..SHARDS).map(|_| Mutex::new(Records::new())).collect(),
            failure: Mutex::new(None),
        }
    }

    pub fn cow_path(&self) -> &Path {
        &self.cow_path
    }

    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn in_set(&self, block: u64) -> bool {
        self.reexamine.contains(&block) || self.blocks.is_set(block)
    }

    /// Work is handed out in units: first one per word of set bits, then one per 64
    /// blocks of the re-examined range (minus blocks already covered by bits).
    pub fn unit_count(&self) -> usize {
        self.words.len() + (self.reexamine.end - self.reexamine.start).div_ceil(64) as usize
    }

    pub fn unit_blocks(&self, unit: usize) -> Vec<u64> {
        if let Some(&w) = self.words.get(unit) {
            return self.blocks.blocks_in_word(w).collect();
        }
        let start = self.reexamine.start + 64 * (unit - self.words.len()) as u64;
        let end = (start + 64).min(self.reexamine.end);
        (start..end).filter(|&b| !self.blocks.is_set(b)).collect()
    }

    /// Asks the kernel to start reading unit `unit`'s blocks from the live file, so
    /// that a capture of data that is not cached overlaps disk reads with hashing.
    pub fn prefetch_unit(&self, live: &File, unit: usize) {
        let blocks = if unit < self.unit_count() {
            self.unit_blocks(unit)
        } else {
            return;
        };
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
            return;
        };
        let start = first * self.block_size;
        let end = ((last + 1) * self.block_size).min(self.size_bytes);
        if end > start {
            // SAFETY: posix_fadvise only reads its integer arguments; the fd is owned
            // by `live`. It is a hint: failure costs nothing but speed.
            unsafe {
                libc::posix_fadvise(
                    std::os::unix::io::AsRawFd::as_raw_fd(live),
                    start as libc::off_t,
                    (end - start) as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }

    /// Number of blocks this freeze captures.
    pub fn block_count(&self) -> u64 {
        let range = &self.reexamine;
        let bits_in_range = self
            .words
            .iter()
            .flat_map(|&w| self.blocks.blocks_in_word(w))
            .filter(|b| range.contains(b))
            .count() as u64;
        self.blocks.count() + (range.end - range.start) - bits_in_range
    }

    /// The captured blocks in `first..=last`, without visiting every block of a
    /// large range.
    fn captured_blocks_in(&self, first: u64, last: u64) -> impl Iterator<Item = u64> + '_ {
        let from = self.words.partition_point(|&w| (w as u64) < first / 64);
        let marked = self.words[from..]
            .iter()
            .take_while(move |&&w| w as u64 <= last / 64)
            .flat_map(|&w| self.blocks.blocks_in_word(w))
            .filter(move |b| (first..=last).contains(b));
        let range = &self.reexamine;
        let reexamined =
            (first.max(range.start)..(last + 1).min(range.end)).filter(|&b| !self.blocks.is_set(b));
        marked.chain(reexamined)
    }

    fn records(&self, block: u64) -> MutexGuard<'_, Records> {
        self.preserved[(block % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `[offset, offset + buf.len())` of the live file as the frozen view shows
    /// it: zeros past the frozen size (and past the live end of file).
    fn read_frozen(&self, live: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let valid = self.size_bytes.saturating_sub(offset).min(buf.len() as u64) as usize;
        let read = read_full_at(live, &mut buf[..valid], offset)?;
        buf[read..].fill(0);
        Ok(())
    }

    /// Called before bytes `[start, end)` of the live file change. Returns once the
    /// frozen contents of every page they touch in a block not yet captured are
    /// safe. A failure to preserve is recorded (the snapshot will end in error) but
    /// never fails the write: the volume comes first.
    pub fn protect(&self, live: &File, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let bs = self.block_size;
        for block in self.captured_blocks_in(start / bs, (end - 1) / bs) {
            if self.done.get(block) {
                continue;
            }
            let block_start = block * bs;
            let first_page = start.max(block_start) / PAGE;
            let end_page = end.min(block_start + bs).div_ceil(PAGE);
            if let Err(e) = self.preserve(live, block, first_page..end_page) {
                let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
                failure.get_or_insert_with(|| {
                    format!("cannot preserve block {block} before a write: {e}")
                });
            }
        }
    }

    /// Copies the pages of `pages` (all in `block`) not yet preserved.
    fn preserve(&self, live: &File, block: u64, pages: Range<u64>) -> io::Result<()> {
        let mut records = self.records(block);
        let mut page = pages.start;
        while page < pages.end {
            if records.contains_key(&page) {
                page += 1;
                continue;
            }
            // A run of pages not yet preserved: one read, one write.
            let run_end = (page..pages.end)
                .find(|p| records.contains_key(p))
                .unwrap_or(pages.end);
            let mut copy = vec![0u8; ((run_end - page) * PAGE) as usize];
            self.read_frozen(live, &mut copy, page * PAGE)?;
            let offset = self
                .cow_next
                .fetch_add(copy.len() as u64, Ordering::Relaxed);
            self.cow.write_all_at(&copy, offset)?;
            for (i, p) in (page..run_end).enumerate() {
                records.insert(p, offset + i as u64 * PAGE);
            }
            page = run_end;
        }
        Ok(())
    }

    /// The frozen contents of `block`, for the capture worker, into `buf` (resized
    /// to one block). Each block of the set is taken once.
    pub fn take_into(&self, live: &File, block: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        let bs = self.block_size;
        buf.resize(bs as usize, 0);
        self.read_frozen(live, buf, block * bs)?;
        // Only now look for preserved pages: see the module documentation.
        let first_page = block * bs / PAGE;
        let overlay: Vec<(u64, u64)> = {
            let records = self.records(block);
            (first_page..first_page + bs / PAGE)
                .filter_map(|p| records.get(&p).map(|&offset| (p, offset)))
                .collect()
        };
        for (page, offset) in overlay {
            let at = ((page - first_page) * PAGE) as usize;
            self.cow
                .read_exact_at(&mut buf[at..at + PAGE as usize], offset)?;
        }
        self.done.set(block);
        Ok(())
    }

    /// [`Freeze::take_into`] a new buffer.
    pub fn take(&self, live: &File, block: u64) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.take_into(live, block, &mut buf)?;
        Ok(buf)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Four pages per block, to exercise partial preservation.
    const BS: u64 = 4 * PAGE;

    fn setup(blocks: &[u64]) -> (tempfile::TempDir, File, Freeze) {
        let dir = tempfile::tempdir().unwrap();
        let live = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("live"))
            .unwrap();
        for b in 0..8u64 {
            live.write_all_at(&vec![b as u8 + 1; BS as usize], b * BS)
                .unwrap();
        }
        let set =
            DirtyMap::create(&dir.path().join("set"), crate::volume::dirty::NEVER_SHRUNK).unwrap();
        for &b in blocks {
            set.mark(b, b).unwrap();
        }
        let cow_path = dir.path().join("cow");
        let cow = Freeze::create_cow_file(&cow_path).unwrap();
        let freeze = Freeze::new(set, 0..0, 7 * BS + 100, BS, cow, &cow_path);
        (dir, live, freeze)
    }

    fn write(live: &File, freeze: &Freeze, offset: u64, data: &[u8]) {
        freeze.protect(live, offset, offset + data.len() as u64);
        live.write_all_at(data, offset).unwrap();
    }

    #[test]
    fn writes_before_the_capture_keep_the_old_pages_only() {
        let (_dir, live, freeze) = setup(&[1, 2]);
        // One unaligned write over pages 1 and 2 of block 1.
        write(&live, &freeze, BS + PAGE + 10, &[0xaa; 5000]);
        assert_eq!(freeze.cow_next.load(Ordering::Relaxed), 2 * PAGE);
        assert_eq!(freeze.take(&live, 1).unwrap(), vec![2u8; BS as usize]);
        // After the capture, writes are no longer preserved.
        write(&live, &freeze, BS, &[0xbb; 100]);
        assert_eq!(freeze.cow_next.load(Ordering::Relaxed), 2 * PAGE);
        // Untouched block is read live; a block outside the set is never preserved.
        assert_eq!(freeze.take(&live, 2).unwrap(), vec![3u8; BS as usize]);
        write(&live, &freeze, 5 * BS, &[0xcc; 100]);
        assert_eq!(freeze.cow_next.load(Ordering::Relaxed), 2 * PAGE);
    }

    #[test]
    fn bytes_past_the_frozen_size_read_as_zero() {
        let (_dir, live, freeze) = setup(&[7]);
        write(&live, &freeze, 7 * BS + 50, &[9; 200]);
        let data = freeze.take(&live, 7).unwrap();
        assert_eq!(&data[..100], &[8u8; 100][..]);
        assert!(data[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn racing_writers_and_worker_always_see_the_frozen_block() {
        for round in 0..50u8 {
            let (_dir, live, freeze) = setup(&[0, 1, 2, 3, 4, 5, 6]);
            let (live, freeze) = (Arc::new(live), Arc::new(freeze));
            let writers: Vec<_> = (0..3u64)
                .map(|t| {
                    let (live, freeze) = (live.clone(), freeze.clone());
                    std::thread::spawn(move || {
                        for i in 0..28u64 {
                            let page = (i * 7 + t * 3 + u64::from(round)) % 28;
                            write(&live, &freeze, page * PAGE, &[0xee; PAGE as usize]);
                        }
                    })
                })
                .collect();
            for b in 0..7u64 {
                assert_eq!(
                    freeze.take(&live, b).unwrap(),
                    vec![b as u8 + 1; BS as usize],
                    "round {round} block {b}"
                );
            }
            for w in writers {
                w.join().unwrap();
            }
        }
    }
}

//! [`Freeze`]: the point-in-time view of a volume while a snapshot is captured.
//!
//! At the freeze, the volume's dirty map becomes the *capture set*: the blocks this
//! snapshot must read as they were at that instant. Each block of the set is taken
//! exactly once, by whoever gets there first:
//! - the capture worker, which reads the block from the live file, or
//! - a writer about to change it, which first copies the old contents to the
//!   preservation file (`captures/<id>.cow`); the worker later reads that copy.
//!
//! A block's `claimed` bit says someone is taking it; its `done` bit says the frozen
//! contents are safe (read by the worker, or preserved). A writer that finds a block
//! claimed but not done waits for `done` before touching it. Invariant: no byte of a
//! block in the capture set changes before that block is done.
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
use std::sync::{Condvar, Mutex};

use super::bitmap::Bitmap;
use super::dirty::DirtyMap;

pub struct Freeze {
    /// The blocks this snapshot captures (file `captures/<id>.set`).
    pub blocks: DirtyMap,
    /// Blocks captured whether or not their bit is set.
    pub reexamine: Range<u64>,
    pub size_bytes: u64,
    pub block_size: u64,
    claimed: Bitmap,
    done: Bitmap,
    /// Words of `blocks` with bits set, fixed at the freeze: the first work units.
    words: Vec<usize>,
    cow: File,
    cow_path: PathBuf,
    cow_next: AtomicU64,
    /// Block index → offset of its preserved copy in the cow file.
    preserved: Mutex<HashMap<u64, u64>>,
    /// First failure to preserve a block; the snapshot then ends in error.
    failure: Mutex<Option<String>>,
    done_signal: (Mutex<()>, Condvar),
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
            claimed: Bitmap::new(),
            done: Bitmap::new(),
            words,
            cow,
            cow_path: cow_path.to_path_buf(),
            cow_next: AtomicU64::new(0),
            preserved: Mutex::new(HashMap::new()),
            failure: Mutex::new(None),
            done_signal: (Mutex::new(()), Condvar::new()),
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

    fn is_done(&self, block: u64) -> bool {
        self.done.get(block)
    }

    fn try_claim(&self, block: u64) -> bool {
        self.claimed.set(block)
    }

    fn mark_done(&self, block: u64) {
        self.done.set(block);
        let _guard = self.done_signal.0.lock().unwrap_or_else(|p| p.into_inner());
        self.done_signal.1.notify_all();
    }

    fn wait_done(&self, block: u64) {
        let mut guard = self.done_signal.0.lock().unwrap_or_else(|p| p.into_inner());
        while !self.is_done(block) {
            guard = self
                .done_signal
                .1
                .wait(guard)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Reads `block` of the live file as the frozen view shows it into `buf` (one
    /// block long): zeros past the frozen size (and past the live end of file).
    fn read_frozen_from_live(&self, live: &File, block: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = block * self.block_size;
        let valid = self.size_bytes.saturating_sub(start).min(self.block_size) as usize;
        let read = read_full_at(live, &mut buf[..valid], start)?;
        buf[read..].fill(0);
        Ok(())
    }

    /// Called before any change to `block` of the live file. Returns once the
    /// frozen contents of the block are safe. A failure to preserve is recorded (the
    /// snapshot will end in error) but never fails the write: the volume comes first.
    pub fn protect(&self, live: &File, block: u64) {
        if !self.in_set(block) || self.is_done(block) {
            return;
        }
        if !self.try_claim(block) {
            self.wait_done(block);
            return;
        }
        if let Err(e) = self.preserve(live, block) {
            let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            failure.get_or_insert_with(|| {
                format!("cannot preserve block {block} before a write: {e}")
            });
        }
        self.mark_done(block);
    }

    fn preserve(&self, live: &File, block: u64) -> io::Result<()> {
        let mut data = vec![0u8; self.block_size as usize];
        self.read_frozen_from_live(live, block, &mut data)?;
        let offset = self.cow_next.fetch_add(self.block_size, Ordering::Relaxed);
        self.cow.write_all_at(&data, offset)?;
        self.preserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(block, offset);
        Ok(())
    }

    /// [`Freeze::protect`] for every captured block in `first..=last`.
    pub fn protect_range(&self, live: &File, first: u64, last: u64) {
        let from = self.words.partition_point(|&w| (w as u64) < first / 64);
        for &w in self.words[from..]
            .iter()
            .take_while(|&&w| w as u64 <= last / 64)
        {
            for block in self.blocks.blocks_in_word(w) {
                if (first..=last).contains(&block) {
                    self.protect(live, block);
                }
            }
        }
        let range = &self.reexamine;
        for block in first.max(range.start)..(last + 1).min(range.end) {
            self.protect(live, block);
        }
    }

    /// The frozen contents of `block`, for the capture worker, into `buf` (resized
    /// to one block). Each block of the set must be taken once.
    pub fn take_into(&self, live: &File, block: u64, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.resize(self.block_size as usize, 0);
        if self.try_claim(block) {
            let read = self.read_frozen_from_live(live, block, buf);
            self.mark_done(block);
            return read;
        }
        self.wait_done(block);
        let offset = self
            .preserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&block)
            .copied();
        match offset {
            Some(offset) => self.cow.read_exact_at(buf, offset),
            None => {
                Err(io::Error::other(self.failure().unwrap_or_else(|| {
                    format!("block {block} was not preserved")
                })))
            }
        }
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

    const BS: u64 = 4096;

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

    #[test]
    fn writer_first_preserves_old_contents() {
        let (_dir, live, freeze) = setup(&[1, 2]);
        freeze.protect(&live, 1);
        live.write_all_at(&vec![0xaa; BS as usize], BS).unwrap();
        assert_eq!(freeze.take(&live, 1).unwrap(), vec![2u8; BS as usize]);
        // Untouched block is read live; a block outside the set is never preserved.
        assert_eq!(freeze.take(&live, 2).unwrap(), vec![3u8; BS as usize]);
        freeze.protect(&live, 5);
        assert!(freeze.preserved.lock().unwrap().get(&5).is_none());
    }

    #[test]
    fn bytes_past_the_frozen_size_read_as_zero() {
        let (_dir, live, freeze) = setup(&[7]);
        let data = freeze.take(&live, 7).unwrap();
        assert_eq!(&data[..100], &[8u8; 100][..]);
        assert!(data[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn racing_writers_and_worker_always_see_the_frozen_block() {
        let (_dir, live, freeze) = setup(&[0, 1, 2, 3, 4, 5, 6]);
        let (live, freeze) = (std::sync::Arc::new(live), std::sync::Arc::new(freeze));
        let writer = {
            let (live, freeze) = (live.clone(), freeze.clone());
            std::thread::spawn(move || {
                for b in (0..7u64).rev() {
                    freeze.protect(&live, b);
                    live.write_all_at(&vec![0xee; BS as usize], b * BS).unwrap();
                }
            })
        };
        for b in 0..7u64 {
            assert_eq!(
                freeze.take(&live, b).unwrap(),
                vec![b as u8 + 1; BS as usize]
            );
        }
        writer.join().unwrap();
    }
}

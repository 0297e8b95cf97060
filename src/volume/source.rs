//! Volumes made from a snapshot: a block the volume has not written (or copied) yet
//! is read from the snapshot, so the volume is usable the instant it is made.
//!
//! A *present map* (`volumes/<id>.present`, the dirty-map file format) records which
//! blocks live in the volume's own data file; its low-water size is the *source
//! limit*: blocks at or past it (beyond the snapshot's size, or cut off by a shrink
//! since) never come from the snapshot. Every other block reads from the snapshot
//! until it is *hydrated*: its snapshot contents copied into the data file, then its
//! bit set. Hydration happens on the first partial write (the untouched part must
//! hold the snapshot's bytes), and in the background.
//!
//! What stays true:
//! - the data-file region of a block that is not present is a hole, or holds exactly
//!   the snapshot's bytes (a hydration a crash cut short before its bit);
//! - a block's bit is set only after its data is in the data file, and a write that
//!   needed it is acknowledged only after the bit is in the map's file (the dirty
//!   map's rule, for the same reason: see `dirty`);
//! - hydrating a block and writing it are serialised by the block's lock, so a
//!   hydration never overwrites a write, and two partial writes never both copy.

use std::io;
use std::sync::Arc;

use crate::storage::{Storage, StorageFile};
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Mutex, MutexGuard, lock};

use super::dirty::DirtyMap;

/// Blocks of the snapshot listed at a time by background hydration.
pub const LIST_WINDOW: u64 = 16 * 1024;

/// Locks over hydration; a block always uses the same one.
const SHARDS: usize = 64;

/// Blocks of the snapshot a volume was made from.
pub trait SnapshotBlocks: Send + Sync {
    /// Reads block `block` of the snapshot into `buf` (one block long).
    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The blocks holding anything but zeros, below `limit`, in order.
    fn data_blocks(&self, limit: u64) -> io::Result<Vec<u64>>;
}

pub struct Source<S: Storage> {
    pub blocks: Arc<dyn SnapshotBlocks>,
    /// Blocks whose contents live in the data file.
    pub present: DirtyMap<S>,
    block_size: u64,
    locks: Vec<Mutex<()>>,
    /// Every block below the limit is present: the snapshot is no longer read.
    hydrated: AtomicBool,
}

impl<S: Storage> Source<S> {
    pub fn new(
        blocks: Arc<dyn SnapshotBlocks>,
        present: DirtyMap<S>,
        block_size: u64,
    ) -> Source<S> {
        Source {
            blocks,
            present,
            block_size,
            locks: (0..SHARDS).map(|_| Mutex::new(())).collect(),
            hydrated: AtomicBool::new(false),
        }
    }

    pub fn is_hydrated(&self) -> bool {
        self.hydrated.load(Ordering::Acquire)
    }

    pub fn set_hydrated(&self) {
        self.hydrated.store(true, Ordering::Release);
    }

    /// Blocks at or past this index never come from the snapshot.
    pub fn limit_blocks(&self) -> u64 {
        self.present.low_water().div_ceil(self.block_size)
    }

    /// Whether block `block` reads from the data file (in memory: for reads).
    pub fn is_own(&self, block: u64) -> bool {
        self.is_hydrated() || block >= self.limit_blocks() || self.present.is_set(block)
    }

    /// Whether block `block` is present in the map's file: a write may then go on
    /// without its lock.
    fn is_own_in_file(&self, block: u64) -> bool {
        self.is_hydrated() || block >= self.limit_blocks() || self.present.is_set_in_file(block)
    }

    /// The locks of the blocks in `first..=last` that are not present yet, taken in
    /// shard order; returns the guards and those blocks (rechecked under the locks).
    pub fn lock_missing(&self, first: u64, last: u64) -> (Vec<MutexGuard<'_, ()>>, Vec<u64>) {
        let missing: Vec<u64> = (first..=last)
            .filter(|&b| !self.is_own_in_file(b))
            .collect();
        if missing.is_empty() {
            return (Vec::new(), missing);
        }
        let mut shards: Vec<usize> = missing
            .iter()
            .map(|b| (b % SHARDS as u64) as usize)
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let guards = shards.into_iter().map(|s| lock(&self.locks[s])).collect();
        let missing = missing
            .into_iter()
            .filter(|&b| !self.is_own_in_file(b))
            .collect();
        (guards, missing)
    }

    /// Copies block `block`'s snapshot contents into `data` (up to `size_bytes`, the
    /// volume's size) and marks it present. The caller holds the block's lock.
    pub fn hydrate_locked(&self, data: &S::File, block: u64, size_bytes: u64) -> io::Result<()> {
        let start = block * self.block_size;
        let end = (start + self.block_size).min(size_bytes);
        if end > start {
            let mut buf = vec![0u8; self.block_size as usize];
            self.blocks.read_block(block, &mut buf)?;
            let len = (end - start) as usize;
            // Zeros need no copy: the region of a block not present is a hole.
            if buf[..len].iter().any(|&b| b != 0) {
                data.write_all_at(&buf[..len], start)?;
            }
        }
        self.present.mark(block, block)
    }

    /// Hydrates block `block` unless it is present (background hydration).
    pub fn hydrate(&self, data: &S::File, block: u64, size_bytes: u64) -> io::Result<()> {
        let (_guards, missing) = self.lock_missing(block, block);
        if missing.is_empty() {
            return Ok(());
        }
        self.hydrate_locked(data, block, size_bytes)
    }

    /// Background hydration: copies up to `budget` blocks still missing, stopping
    /// early when `yield_now` says volume I/O wants the disk; once every data block
    /// is present, marks the rest (zeros in the snapshot) present without copying.
    /// Returns whether every block below the limit is present.
    pub fn hydrate_some(
        &self,
        data: &S::File,
        size_bytes: u64,
        budget: usize,
        yield_now: impl Fn() -> bool,
    ) -> io::Result<bool> {
        let limit = self.limit_blocks();
        let data_blocks = self.blocks.data_blocks(limit)?;
        let missing = data_blocks.iter().filter(|&&b| !self.is_own(b));
        for (done, &block) in missing.enumerate() {
            if done >= budget || yield_now() {
                return Ok(false);
            }
            self.hydrate(data, block, size_bytes)?;
        }
        // The rest reads zeros in the snapshot: marking them present copies nothing.
        let mut word = 0;
        while word * 64 < limit {
            let (first, last) = (word * 64, (word * 64 + 63).min(limit - 1));
            self.mark_zero_blocks(first, last, &data_blocks)?;
            word += 1;
        }
        let (present, total) = self.progress();
        Ok(present >= total)
    }

    /// Marks the blocks of `words` (64-block words) that are still missing and hold
    /// zeros in the snapshot as present, without copying anything.
    fn mark_zero_blocks(&self, first: u64, last: u64, data_blocks: &[u64]) -> io::Result<()> {
        let (_guards, missing) = self.lock_missing(first, last);
        for block in missing {
            if data_blocks.binary_search(&block).is_err() {
                self.present.mark(block, block)?;
            }
        }
        Ok(())
    }

    /// Blocks present so far and blocks in all (below the limit).
    pub fn progress(&self) -> (u64, u64) {
        let limit = self.limit_blocks();
        if self.is_hydrated() {
            return (limit, limit);
        }
        (self.present.count().min(limit), limit)
    }
}
